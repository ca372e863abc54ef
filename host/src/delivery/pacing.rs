//! Client-side pacing per rate class, from the budgets the plugin declares
//! (the host knows no destination's limits of its own). A sliding window
//! of send times keeps any one-second span under the burst budget and any
//! one-minute span under the steady one, which also keeps every fixed
//! window the server counts in under them; a small margin absorbs the
//! difference between when we send and when the server counts.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use plugin_runtime::RateClass;

// The margins cover the time between taking a slot and the request
// reaching the server, which on a loaded machine (a backlog through the
// bulk endpoints keeps both cores busy) was seen to pass 30 ms: one 429 in
// 300,000 events with a 30 ms and 300 ms margin.
const BURST_WINDOW: Duration = Duration::from_millis(1_000 + 100);
const STEADY_WINDOW: Duration = Duration::from_millis(60_000 + 1_000);

/// Windows per rate class, made from the budgets of whichever plugin
/// version first sends in that class.
#[derive(Default)]
pub struct Pacer {
    classes: Mutex<HashMap<String, std::sync::Arc<Window>>>,
}

/// The pacers of the destination accounts being sent to, one per account,
/// so that every connection with the same key stays inside one budget.
/// An account is known by a hash of its key, never by the key.
#[derive(Default)]
pub struct Budgets {
    accounts: Mutex<HashMap<String, std::sync::Weak<Pacer>>>,
}

impl Budgets {
    /// The pacer of the account `account_hash` names, shared while anyone
    /// holds it.
    pub fn of(&self, account_hash: &str) -> std::sync::Arc<Pacer> {
        let mut accounts = self.accounts.lock().unwrap();
        if let Some(pacer) = accounts.get(account_hash).and_then(std::sync::Weak::upgrade) {
            return pacer;
        }
        accounts.retain(|_, pacer| pacer.strong_count() > 0);
        let pacer = std::sync::Arc::new(Pacer::default());
        accounts.insert(account_hash.to_string(), std::sync::Arc::downgrade(&pacer));
        pacer
    }
}

struct Window {
    burst: usize,
    steady: usize,
    sent: Mutex<VecDeque<Instant>>,
}

impl Pacer {
    /// The window of `class`, made on first use; none for a class the
    /// plugin does not declare.
    fn window(&self, class: &str, declared: &[RateClass]) -> Option<std::sync::Arc<Window>> {
        let mut classes = self.classes.lock().unwrap();
        if let Some(window) = classes.get(class) {
            return Some(window.clone());
        }
        let budget = declared.iter().find(|c| c.name == class)?;
        let window = std::sync::Arc::new(Window {
            burst: budget.burst_per_second.max(1) as usize,
            steady: budget.steady_per_minute.max(1) as usize,
            sent: Mutex::new(VecDeque::new()),
        });
        classes.insert(class.to_string(), window.clone());
        Some(window)
    }

    /// Waits until a request of `class` may be sent, and counts it. A class
    /// the plugin does not declare is refused before it gets here.
    pub async fn acquire(&self, class: &str, declared: &[RateClass]) {
        let Some(window) = self.window(class, declared) else {
            return;
        };
        loop {
            let wait = window.try_take(Instant::now());
            match wait {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

impl Pacer {
    /// Takes a slot for a request of `class` if one is free now, without
    /// waiting; false when the request would have to wait.
    pub fn try_acquire(&self, class: &str, declared: &[RateClass]) -> bool {
        match self.window(class, declared) {
            Some(window) => window.try_take(Instant::now()).is_none(),
            None => true,
        }
    }
}

impl Window {
    /// `None` when taken; otherwise how long until a slot may free up.
    fn try_take(&self, now: Instant) -> Option<Duration> {
        let mut sent = self.sent.lock().unwrap();
        while sent.front().is_some_and(|t| now.duration_since(*t) >= STEADY_WINDOW) {
            sent.pop_front();
        }
        let in_burst = sent.len() - sent.partition_point(|t| now.duration_since(*t) >= BURST_WINDOW);
        if sent.len() < self.steady && in_burst < self.burst {
            sent.push_back(now);
            return None;
        }
        let steady_free = if sent.len() >= self.steady {
            sent.front()
                .map(|t| STEADY_WINDOW.saturating_sub(now.duration_since(*t)))
        } else {
            None
        };
        let burst_free = if in_burst >= self.burst {
            let oldest_in_burst = sent[sent.len() - in_burst];
            Some(BURST_WINDOW.saturating_sub(now.duration_since(oldest_in_burst)))
        } else {
            None
        };
        let wait = steady_free
            .into_iter()
            .chain(burst_free)
            .max()
            .unwrap_or(Duration::from_millis(1));
        Some(wait.max(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(burst: usize, steady: usize) -> Window {
        Window {
            burst,
            steady,
            sent: Mutex::new(VecDeque::new()),
        }
    }

    #[test]
    fn the_burst_budget_holds_within_a_second() {
        let w = window(3, 100);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(w.try_take(start), None);
        }
        let wait = w.try_take(start).expect("the fourth must wait");
        assert!(wait >= Duration::from_millis(1_000), "{wait:?}");
        assert_eq!(w.try_take(start + BURST_WINDOW), None);
    }

    #[test]
    fn the_steady_budget_holds_within_a_minute() {
        let w = window(100, 5);
        let start = Instant::now();
        for i in 0..5 {
            assert_eq!(w.try_take(start + Duration::from_secs(i * 2)), None);
        }
        let wait = w
            .try_take(start + Duration::from_secs(11))
            .expect("the sixth must wait");
        assert!(wait >= Duration::from_secs(49), "{wait:?}");
        assert_eq!(w.try_take(start + STEADY_WINDOW), None);
    }
}
