//! A small seeded random number generator (SplitMix64): the back-off
//! jitter, and the choices of simulators (which commands fail, when devices
//! report or churn), so a run with the same seed makes the same choices.

use std::time::Duration;

/// SplitMix64: tiny, fast, and good enough for simulation choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// An independent generator for stream `stream` of `seed` (e.g. one per
    /// device), so devices do not share a sequence.
    pub fn derive(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p.clamp(0.0, 1.0)
    }

    /// A uniform integer in `[0, n)` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }

    /// The wait until the next event of a Poisson process with `rate` events
    /// per second (exponentially distributed, mean `1 / rate`). `None` when
    /// `rate` is not positive: the event never happens.
    pub fn exp_interval(&mut self, rate: f64) -> Option<Duration> {
        if !(rate > 0.0 && rate.is_finite()) {
            return None;
        }
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u = 1.0 - self.next_f64();
        let secs = -u.ln() / rate;
        Some(Duration::from_secs_f64(secs.min(1e9)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        let mut s1 = Rng::derive(7, 1);
        let mut s2 = Rng::derive(7, 2);
        assert_ne!(s1.next_u64(), s2.next_u64());
    }

    #[test]
    fn floats_and_chances_stay_in_range() {
        let mut r = Rng::new(1);
        let mut hits = 0;
        for _ in 0..10_000 {
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
            if r.chance(0.25) {
                hits += 1;
            }
            assert!(r.below(10) < 10);
        }
        assert!((2_000..3_000).contains(&hits), "{hits}");
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
    }

    #[test]
    fn exponential_intervals_have_the_right_mean() {
        let mut r = Rng::new(3);
        assert_eq!(r.exp_interval(0.0), None);
        assert_eq!(r.exp_interval(f64::NAN), None);
        let n = 20_000;
        let total: f64 = (0..n)
            .map(|_| r.exp_interval(4.0).map_or(0.0, |d| d.as_secs_f64()))
            .sum();
        let mean = total / n as f64;
        assert!((0.23..0.27).contains(&mean), "{mean}");
    }
}
