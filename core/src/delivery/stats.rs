//! Live counters of a delivery run, for a progress display and `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{EventOutcome, EventRecord};

/// Live counters, for a progress display and `/metrics`.
#[derive(Default)]
pub struct Progress {
    pub read: AtomicU64,
    pub delivered: AtomicU64,
    pub skipped: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retries: AtomicU64,
    /// Responses received, by HTTP status.
    pub statuses: Mutex<BTreeMap<u16, u64>>,
    /// Time to map one event (plugin call and checks).
    pub map_seconds: Histogram,
    /// Time from an event's first request to its outcome.
    pub delivery_seconds: Histogram,
}

impl Progress {
    /// Counts one finished event.
    pub(crate) fn count(&self, record: &EventRecord) {
        let counter = match &record.outcome {
            EventOutcome::Delivered { .. } => &self.delivered,
            EventOutcome::Skipped(_) => &self.skipped,
            EventOutcome::DeadLettered(_) => &self.dead_lettered,
            EventOutcome::Abandoned(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A latency histogram with fixed buckets, in seconds.
pub struct Histogram {
    /// Cumulative counts per upper bound in `BUCKETS`.
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    max_micros: AtomicU64,
}

/// Upper bounds of the histogram buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.max_micros.fetch_max(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Adds `other`'s observations to these (a sum over connections).
    pub fn add(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter().zip(&other.counts) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.count
            .fetch_add(other.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.sum_micros
            .fetch_add(other.sum_micros.load(Ordering::Relaxed), Ordering::Relaxed);
        self.max_micros
            .fetch_max(other.max_micros.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The longest observation so far, in seconds.
    pub fn max_seconds(&self) -> f64 {
        self.max_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// (cumulative bucket counts, count, sum in seconds)
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let buckets = BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, self.count.load(Ordering::Relaxed), sum)
    }
}
