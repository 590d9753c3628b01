//! Latency samples and their summaries: nearest-rank percentiles over nanosecond samples.

use serde::Serialize;

/// A summary of durations, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// The `p`-th percentile (0 < p <= 100) of sorted samples, by nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sort the samples (nanoseconds) and summarise them.
pub fn summarize(samples: &mut [u64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    Summary {
        count: samples.len(),
        p50_us: us(percentile(samples, 50.0)),
        p99_us: us(percentile(samples, 99.0)),
        mean_us: sum as f64 / samples.len() as f64 / 1000.0,
        max_us: us(*samples.last().unwrap_or(&0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn summary_in_microseconds() {
        let mut v = vec![3000, 1000, 2000];
        let s = summarize(&mut v);
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.p99_us, 3.0);
        assert_eq!(s.mean_us, 2.0);
        assert_eq!(s.max_us, 3.0);
    }
}
