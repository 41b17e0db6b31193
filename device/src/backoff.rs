//! Capped exponential backoff with jitter, for reconnecting devices.

use std::time::Duration;

use crate::rng::Rng;

/// Reconnect delays: each failure doubles the delay up to `max`; each delay
/// is drawn from `[d/2, d]` ("equal jitter") so devices that lost the same
/// gateway at once do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `base`, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        let base = base.max(Duration::from_millis(1));
        let max = max.max(base);
        Backoff {
            base,
            max,
            next: base,
        }
    }

    /// The delay before the next attempt; the one after will be twice as
    /// long (capped).
    pub fn next_delay(&mut self, rng: &mut Rng) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rng.next_f64())
    }

    /// Back to `base`, after a successful connection.
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut rng = Rng::new(9);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let d = b.next_delay(&mut rng);
            let ceiling = Duration::from_millis(ceiling);
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
        }
        b.reset();
        let d = b.next_delay(&mut rng);
        assert!(d <= Duration::from_millis(100), "{d:?}");
    }

    #[test]
    fn degenerate_settings_are_made_sane() {
        let mut rng = Rng::new(1);
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        let d = b.next_delay(&mut rng);
        assert!(d <= Duration::from_millis(1));
    }
}
