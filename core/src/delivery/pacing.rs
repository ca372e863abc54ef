//! Client-side pacing per rate class, from the budgets the plugin declares
//! (the host knows no destination's limits of its own). A sliding window
//! of send times keeps any one-second span under the burst budget and any
//! one-minute span under the steady one, which also keeps every fixed
//! window the server counts in under them; a small margin absorbs the
//! difference between when we send and when the server counts.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use plugin_runtime::RateClass;

// The margins cover the time between taking a slot and the request
// reaching the server, which on a loaded machine (a backlog through the
// bulk endpoints keeps both cores busy) was seen to pass 30 ms: one 429 in
// 300,000 events with a 30 ms and 300 ms margin.
const BURST_WINDOW: Duration = Duration::from_millis(1_000 + 100);
const STEADY_WINDOW: Duration = Duration::from_millis(60_000 + 1_000);

/// The whole budget, in millionths (`Pacer::set_share`).
const WHOLE: u32 = 1_000_000;

/// Windows per rate class, made from the budgets of whichever plugin
/// version first sends in that class.
pub struct Pacer {
    classes: Mutex<HashMap<String, std::sync::Arc<Window>>>,
    /// This host's share of each budget, in millionths: the whole budget
    /// for a host alone, less when several hosts send for one account.
    share: AtomicU32,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            classes: Default::default(),
            share: AtomicU32::new(WHOLE),
        }
    }
}

/// The pacers of the destination accounts being sent to, one per account,
/// so that every connection with the same key stays inside one budget.
/// An account is known by a hash of its key, never by the key.
pub struct Budgets {
    accounts: Mutex<HashMap<String, std::sync::Weak<Pacer>>>,
    /// The share every pacer here gets (`set_share`).
    share: AtomicU32,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            accounts: Default::default(),
            share: AtomicU32::new(WHOLE),
        }
    }
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
        pacer.share.store(self.share.load(Ordering::Relaxed), Ordering::Relaxed);
        accounts.insert(account_hash.to_string(), std::sync::Arc::downgrade(&pacer));
        pacer
    }

    /// Every account's pacer here (now and later) keeps to `part / whole`
    /// of its budgets: several hosts delivering for the same accounts each
    /// take a part, and together they stay inside each budget.
    pub fn set_share(&self, part: u32, whole: u32) {
        let share = (u64::from(part) * u64::from(WHOLE) / u64::from(whole.max(1))).min(u64::from(WHOLE)) as u32;
        if self.share.swap(share, Ordering::Relaxed) == share {
            return;
        }
        for pacer in self
            .accounts
            .lock()
            .unwrap()
            .values()
            .filter_map(std::sync::Weak::upgrade)
        {
            pacer.share.store(share, Ordering::Relaxed);
        }
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
            let wait = window.try_take(Instant::now(), self.share.load(Ordering::Relaxed));
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
            Some(window) => window
                .try_take(Instant::now(), self.share.load(Ordering::Relaxed))
                .is_none(),
            None => true,
        }
    }
}

impl Window {
    /// `None` when taken; otherwise how long until a slot may free up.
    /// `share` of the budgets, in millionths. A part under one request
    /// per window is one request per window stretched to match (a floor of
    /// one per window let sixteen hosts with a sixteenth share each send
    /// 14.5 a second against a budget of ten): the hosts' parts add up
    /// to the budget at most, and a host with a tiny share still sends.
    fn try_take(&self, now: Instant, share: u32) -> Option<Duration> {
        let part = |budget: usize, window: Duration| -> (usize, Duration) {
            let exact = budget as f64 * f64::from(share) / f64::from(WHOLE);
            if exact >= 1.0 {
                (exact as usize, window)
            } else {
                // At most a day: a share of zero holds no partition, and
                // sends nothing anyway.
                (1, window.mul_f64((1.0 / exact.max(1e-9)).min(86_400.0)))
            }
        };
        let (burst, burst_window) = part(self.burst, BURST_WINDOW);
        let (steady, steady_window) = part(self.steady, STEADY_WINDOW);
        let kept = burst_window.max(steady_window);
        let mut sent = self.sent.lock().unwrap();
        while sent.front().is_some_and(|t| now.duration_since(*t) >= kept) {
            sent.pop_front();
        }
        let within = |window: Duration| sent.len() - sent.partition_point(|t| now.duration_since(*t) >= window);
        let (in_steady, in_burst) = (within(steady_window), within(burst_window));
        if in_steady < steady && in_burst < burst {
            sent.push_back(now);
            return None;
        }
        // How long until the oldest request counted in a full window leaves it.
        let free_after = |count: usize, limit: usize, window: Duration| {
            (count >= limit).then(|| window.saturating_sub(now.duration_since(sent[sent.len() - count])))
        };
        let wait = free_after(in_steady, steady, steady_window)
            .into_iter()
            .chain(free_after(in_burst, burst, burst_window))
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
            assert_eq!(w.try_take(start, WHOLE), None);
        }
        let wait = w.try_take(start, WHOLE).expect("the fourth must wait");
        assert!(wait >= Duration::from_millis(1_000), "{wait:?}");
        assert_eq!(w.try_take(start + BURST_WINDOW, WHOLE), None);
    }

    #[test]
    fn the_steady_budget_holds_within_a_minute() {
        let w = window(100, 5);
        let start = Instant::now();
        for i in 0..5 {
            assert_eq!(w.try_take(start + Duration::from_secs(i * 2), WHOLE), None);
        }
        let wait = w
            .try_take(start + Duration::from_secs(11), WHOLE)
            .expect("the sixth must wait");
        assert!(wait >= Duration::from_secs(49), "{wait:?}");
        assert_eq!(w.try_take(start + STEADY_WINDOW, WHOLE), None);
    }

    #[test]
    fn a_share_keeps_to_its_part_of_each_budget() {
        let w = window(10, 100);
        let start = Instant::now();
        // Three eighths of a burst of 10: 3 a second.
        let share = 3 * WHOLE / 8;
        for _ in 0..3 {
            assert_eq!(w.try_take(start, share), None);
        }
        assert!(w.try_take(start, share).is_some());
        // A tiny share still sends one.
        let w = window(10, 100);
        assert_eq!(w.try_take(start, 1), None);
        assert!(w.try_take(start, 1).is_some());
    }

    /// Sixteen hosts each holding one partition of sixteen, so each with a
    /// sixteenth of a burst budget of 10 (0.625 a second): together at
    /// most 10 a second. The floor of one per window sent 14.5.
    #[test]
    fn parts_under_one_request_a_window_add_up_to_the_budget_at_most() {
        let hosts: Vec<Window> = (0..16).map(|_| window(10, 10_000)).collect();
        let share = WHOLE / 16;
        let start = Instant::now();
        let mut sent = 0;
        for tick in 0..10_000u64 {
            let now = start + Duration::from_millis(tick);
            sent += hosts.iter().filter(|w| w.try_take(now, share).is_none()).count();
        }
        // 10 s: at most the budget's 10 a second (plus the first burst),
        // and not far under it.
        assert!(sent <= 10 * 10 + 16, "{sent} sent in 10 s");
        assert!(sent >= 80, "{sent} sent in 10 s");
    }

    #[test]
    fn budgets_hand_their_share_to_every_pacer() {
        let budgets = Budgets::default();
        let before = budgets.of("a");
        budgets.set_share(6, 16);
        let after = budgets.of("b");
        for pacer in [&before, &after] {
            assert_eq!(pacer.share.load(Ordering::Relaxed), 375_000);
        }
    }
}
