//! Each write key's rate: a token bucket of events per key, so that one
//! key (Segment's keys ship in browser JavaScript) cannot flood the host
//! and crowd out the others. Over its rate a key is answered 429 with a
//! `Retry-After`, before its body is read when its bucket is empty, and
//! nothing of the refused request is stored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept at most; past this the full ones (idle keys) are dropped.
const KEPT: usize = 100_000;

pub struct KeyLimits {
    /// Events a second each key may send, sustained.
    rate: f64,
    /// Events a key may send at once: twice its second, and at least one
    /// whole batch.
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl KeyLimits {
    /// None when `per_second` is 0 (no limit).
    pub fn new(per_second: u32) -> Option<KeyLimits> {
        (per_second > 0).then(|| KeyLimits {
            rate: f64::from(per_second),
            burst: (2.0 * f64::from(per_second)).max(super::wire::MAX_BATCH_EVENTS as f64),
            buckets: Mutex::default(),
        })
    }

    pub fn per_second(&self) -> f64 {
        self.rate
    }

    /// Takes `events` from the key's bucket; if it lacks them, takes
    /// nothing and says in how many seconds it will have them. `events` of
    /// 0 asks only whether the bucket holds anything (before the body is
    /// read).
    pub fn take(&self, key_hash: &str, events: usize) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= KEPT && !buckets.contains_key(key_hash) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key_hash.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        let wanted = (events as f64).max(1.0);
        if bucket.tokens >= wanted {
            if events > 0 {
                bucket.tokens -= wanted;
            }
            return Ok(());
        }
        Err(((wanted - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_waits_and_other_keys_are_untouched() {
        let limits = KeyLimits::new(1_000).unwrap();
        // The burst: 2,500 (one whole batch), then nothing for now.
        assert_eq!(limits.take("a", 2_500), Ok(()));
        let wait = limits.take("a", 500).unwrap_err();
        assert!((1..=1).contains(&wait), "{wait}");
        assert!(
            limits.take("a", 0).is_err(),
            "an empty bucket is refused before the body"
        );
        assert_eq!(limits.take("b", 2_500), Ok(()));
    }
}
