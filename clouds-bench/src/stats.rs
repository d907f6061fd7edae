//! Percentiles, medians and the figures one measured run boils down to.

use std::time::Duration;

/// What one measured run produced: per-call latencies, failures and wall time.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// Latency of every call that returned, successful or not.
    pub(crate) latencies: Vec<Duration>,
    /// Calls that failed, plus calls not even started before the run's time limit.
    pub(crate) errors: usize,
    /// From the first call started to the last call returned.
    pub(crate) elapsed: Duration,
    /// What went wrong first, if anything did.
    pub(crate) first_error: Option<String>,
}

/// The figures of one run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub(crate) calls_per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) errors: usize,
}

impl Run {
    pub(crate) fn figures(mut self) -> Figures {
        self.latencies.sort_unstable();
        let done = self.latencies.len();
        let secs = self.elapsed.as_secs_f64();
        Figures {
            calls_per_sec: if secs > 0.0 { done as f64 / secs } else { 0.0 },
            p50: percentile(&self.latencies, 50.0),
            p99: percentile(&self.latencies, 99.0),
            errors: self.errors,
        }
    }
}

/// The nearest-rank percentile of sorted samples (zero when there are none).
pub(crate) fn percentile(sorted: &[Duration], pct: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `a ÷ b` of two durations (a p50 over another), safe for a zero `b`.
pub(crate) fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

/// The median of some values (the lower middle one for an even count; zero when empty).
pub(crate) fn median<T: Copy + Default + PartialOrd>(values: &[T]) -> T {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => T::default(),
        n => v[(n - 1) / 2],
    }
}

/// Several runs of the same figure, reduced to their medians; errors are summed.
pub(crate) fn median_figures(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
    Figures {
        calls_per_sec: median(&runs.iter().map(|r| r.calls_per_sec).collect::<Vec<_>>()),
        p50: pick(|r| r.p50),
        p99: pick(|r| r.p99),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&ms(&[7]), 99.0), Duration::from_millis(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn medians_take_the_middle_and_sum_errors() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4, 1, 3, 2]), 2);
        let runs = [
            Figures {
                calls_per_sec: 10.0,
                p50: Duration::from_millis(3),
                p99: Duration::from_millis(9),
                errors: 1,
            },
            Figures {
                calls_per_sec: 30.0,
                p50: Duration::from_millis(1),
                p99: Duration::from_millis(7),
                errors: 0,
            },
            Figures {
                calls_per_sec: 20.0,
                p50: Duration::from_millis(2),
                p99: Duration::from_millis(8),
                errors: 2,
            },
        ];
        let m = median_figures(&runs);
        assert_eq!(m.calls_per_sec, 20.0);
        assert_eq!(m.p50, Duration::from_millis(2));
        assert_eq!(m.p99, Duration::from_millis(8));
        assert_eq!(m.errors, 3);
    }
}
