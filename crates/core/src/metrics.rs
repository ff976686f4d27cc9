//! Lock-free metrics rendered in the Prometheus text exposition format.
//!
//! Tiers own their metric structs (built from the types here) and render them into one page
//! served by the admin listener. Recording is a few relaxed atomic adds; nothing allocates on
//! the request path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Counts per HTTP status code (100–599), for `..._requests_total{status="..."}`.
#[derive(Debug)]
pub struct StatusCounter {
    counts: Box<[AtomicU64]>,
}

impl Default for StatusCounter {
    fn default() -> Self {
        Self {
            counts: (100..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl StatusCounter {
    /// Counts one response with `status`.
    pub fn inc(&self, status: u16) {
        if let Some(slot) = status
            .checked_sub(100)
            .and_then(|i| self.counts.get(i as usize))
        {
            slot.fetch_add(1, Relaxed);
        }
    }

    /// Renders one sample per status seen.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "counter");
        for (i, slot) in self.counts.iter().enumerate() {
            let value = slot.load(Relaxed);
            if value > 0 {
                let _ = writeln!(out, "{name}{{status=\"{}\"}} {value}", i + 100);
            }
        }
    }
}

/// A latency histogram with fixed bucket bounds in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Bucket bounds suited to request latencies, from 1 ms to 60 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    /// A histogram with the given upper bounds (ascending, seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|bound| seconds <= *bound) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_micros
            .fetch_add(elapsed.as_micros().min(u64::MAX as u128) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Renders cumulative buckets, sum and count.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders a metric of one unlabelled sample (a counter or a gauge).
pub fn render_value(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// Renders a family of samples that differ by one label.
pub fn render_labeled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    header(out, name, help, kind);
    for (value_label, value) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value_label}\"}} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::new(LATENCY_BOUNDS);
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(20));
        histogram.observe(Duration::from_secs(100));
        let mut out = String::new();
        histogram.render(&mut out, "x_seconds", "test");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(out.contains("x_seconds_bucket{le=\"0.025\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{le=\"60\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_seconds_count 3\n"));
    }

    #[test]
    fn status_counter_renders_seen_codes_only() {
        let counter = StatusCounter::default();
        counter.inc(200);
        counter.inc(200);
        counter.inc(503);
        counter.inc(42); // ignored: not an HTTP status
        let mut out = String::new();
        counter.render(&mut out, "r_total", "test");
        assert!(out.contains("r_total{status=\"200\"} 2\n"));
        assert!(out.contains("r_total{status=\"503\"} 1\n"));
        assert_eq!(out.matches("r_total{").count(), 2);
    }
}
