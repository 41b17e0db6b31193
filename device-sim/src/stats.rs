//! Measurement helpers: latency histograms and their summaries, this
//! process's resident memory, and table formatting.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, from 1 µs to 1 hour, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Latency {
        // Constant, valid bounds: this cannot fail.
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("1 µs to 1 h at 3 significant digits is a valid histogram");
        Latency(h)
    }

    /// Records one latency (clamped to the range).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.max(1));
    }

    /// Records microsecond values.
    pub fn record_us(&mut self, values: &[u64]) {
        for v in values {
            self.0.saturating_record((*v).max(1));
        }
    }

    /// Adds another histogram's samples.
    pub fn add(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Percentiles in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            mean: self.0.mean() / 1000.0,
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p99: ms(self.0.value_at_quantile(0.99)),
            p999: ms(self.0.value_at_quantile(0.999)),
            max: ms(self.0.max()),
        }
    }
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencySummary {
    /// The header of [`LatencySummary::row`].
    pub fn header(label_width: usize) -> String {
        format!(
            "{:<label_width$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "count"
        )
    }

    /// One table row.
    pub fn row(&self, label: &str, label_width: usize) -> String {
        format!(
            "{label:<label_width$} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9}",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }
}

/// This process's resident memory in bytes, from `/proc/self/statm`
/// (Linux; `None` elsewhere). Pages are taken as 4 KiB, as on every
/// platform the project builds for (the gateway's metric does the same).
pub fn own_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// `n / secs`, or 0 when `secs` is not positive.
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// Bytes as KiB with one decimal.
pub fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_in_milliseconds() {
        let mut l = Latency::new();
        assert_eq!(l.summary(), LatencySummary::default());
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50 - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99 - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max - 100.0).abs() < 0.1, "{s:?}");
        let mut other = Latency::new();
        other.record_us(&[0, 5]);
        l.add(&other);
        assert_eq!(l.count(), 102);
        assert!(LatencySummary::header(10).contains("p99.9"));
    }

    #[test]
    fn rss_and_rates() {
        if cfg!(target_os = "linux") {
            assert!(own_rss_bytes().is_some_and(|b| b > 0));
        }
        assert_eq!(per_sec(10, 2.0), 5.0);
        assert_eq!(per_sec(10, 0.0), 0.0);
        assert_eq!(mib(1024.0 * 1024.0), "1.0 MiB");
    }
}
