//! Capped exponential backoff with jitter.

use std::time::Duration;

use crate::raft::SplitMix64;

/// Reconnect delays: the base doubles from `min` up to `max` after every
/// failure; each delay is drawn uniformly from `[base/2, base]` ("equal
/// jitter"), so peers that lost a node at the same moment do not redial in
/// lockstep.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
    rng: SplitMix64,
}

impl Backoff {
    /// A backoff between `min` and `max`, jittered from `seed`.
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            base: min,
            rng: SplitMix64::new(seed),
        }
    }

    /// Back to the shortest delay (after a successful connection).
    pub(crate) fn reset(&mut self) {
        self.base = self.min;
    }

    /// The delay before the next attempt; grows the base for the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = base.saturating_mul(2).min(self.max);
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        let jitter = self.rng.range(0, nanos - half + 1);
        Duration::from_nanos(half + jitter)
    }
}
