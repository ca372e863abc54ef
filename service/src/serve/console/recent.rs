//! What the console shows of each connection's recent delivery, kept in
//! memory on this host: per minute of the last hour, the events delivered,
//! skipped, dead-lettered and retried and the 429s met; the time each of
//! the last events took from being received to its outcome;
//! and a ring of the last events with their traces (the event, the
//! requests with their keys masked, the answers).
//!
//! The engine records what this host delivers. On the stream, the
//! outcomes other hosts publish are recorded too (`record_elsewhere`):
//! counted alike, listed without a trace (it stays on the host that sent
//! the requests).
//!
//! Bounded: `ConsoleOptions::ring` events a connection, and their traces
//! within `body_budget` bytes for the whole host. A connection keeps
//! traces within an even share of the budget (the budget divided by the
//! connections with activity, when it records) and within what the others
//! leave of it; its older events lose their traces first, and one larger
//! than its share keeps none. Nothing is written anywhere: a restart
//! starts empty.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use cdp_core::delivery::{EventOutcome, EventRecord, Trace};
use cdp_core::mapping::EventId;

/// How much the console keeps.
#[derive(Clone, Debug)]
pub struct ConsoleOptions {
    /// Recent events kept a connection.
    pub ring: usize,
    /// Keep the events' bodies (the event, the requests, the answers);
    /// without, only what became of each (for privacy).
    pub bodies: bool,
    /// Bytes of bodies kept on this host, across connections.
    pub body_budget: usize,
}

impl ConsoleOptions {
    pub const RING: usize = 32;
    pub const BODY_BUDGET: usize = 6 << 20;
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            ring: Self::RING,
            bodies: true,
            body_budget: Self::BODY_BUDGET,
        }
    }
}

/// One minute's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the Unix epoch; 0 for a slot never used.
    pub at: u32,
    pub delivered: u32,
    pub skipped: u32,
    pub dead_lettered: u32,
    pub retried: u32,
    pub throttled: u32,
}

/// What became of an event, as the console names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Skipped(Box<str>),
    DeadLettered(Box<str>),
    /// Left for another host (a stream lease lost).
    Abandoned(Box<str>),
}

impl Verdict {
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Delivered => "delivered",
            Verdict::Skipped(_) => "skipped",
            Verdict::DeadLettered(_) => "dead-lettered",
            Verdict::Abandoned(_) => "left to another host",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Verdict::Delivered => None,
            Verdict::Skipped(r) | Verdict::DeadLettered(r) | Verdict::Abandoned(r) => Some(r),
        }
    }
}

/// One recent event, kept small: a thousand connections keep 32 each.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Counts the connection's entries from 1: the live tail asks for
    /// those after the last it has.
    pub serial: u64,
    pub finished: SystemTime,
    pub event_id: EventId,
    pub message_id: Option<Box<str>>,
    /// The event's type (`track`, `identify`, …; `other`).
    pub kind: &'static str,
    pub verdict: Verdict,
    /// Shared by the entries of one version.
    pub plugin_version: Arc<str>,
    pub retries: u32,
    pub warnings: Box<[String]>,
    /// Milliseconds from received by ingest to its outcome (from handed to
    /// the engine, when the log kept no time).
    pub took_ms: Option<u32>,
    /// Whom it is about (`Trace::person`).
    pub person: Option<Box<str>>,
    /// The statuses of the answers its requests settled on (0: none).
    pub statuses: [u16; 4],
    /// Its trace, while kept (see the module's bounds).
    pub trace: Option<Arc<Trace>>,
    /// Why there is no trace, when there is none.
    pub no_trace: Option<&'static str>,
}

/// An outcome another host recorded (on the stream).
#[derive(Clone, Debug)]
pub struct Elsewhere {
    pub message_id: Option<String>,
    pub verdict: Verdict,
    pub plugin_version: String,
    /// The host that delivered it.
    pub host: String,
}

/// Events finished since this host started, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub delivered: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    /// Of those, finished by other hosts (on the stream).
    pub elsewhere: u64,
}

/// The latencies kept a connection, for its p50 and p99.
const LATENCIES: usize = 128;

#[derive(Default)]
struct Inner {
    minutes: Vec<Minute>,
    latencies: Vec<u32>,
    next_latency: usize,
    recent: VecDeque<Entry>,
    /// When each event in the engine was received (or, if its log kept no
    /// time, handed in).
    handed: HashMap<EventId, SystemTime>,
    body_bytes: usize,
    serial: u64,
    /// The connection's 429s counted when last looked.
    throttled_seen: u64,
    /// The last plugin version recorded, shared by its entries.
    version: Option<Arc<str>>,
    totals: Totals,
}

impl Inner {
    /// This minute's counts, and the totals, for one more outcome.
    fn count(&mut self, now: SystemTime, verdict: &Verdict, retries: u64) -> &mut Minute {
        if self.minutes.is_empty() {
            self.minutes = vec![Minute::default(); 60];
        }
        match verdict {
            Verdict::Delivered => self.totals.delivered += 1,
            Verdict::Skipped(_) => self.totals.skipped += 1,
            Verdict::DeadLettered(_) => self.totals.dead_lettered += 1,
            Verdict::Abandoned(_) => {}
        }
        let at = minute_of(now);
        let slot = &mut self.minutes[at as usize % 60];
        if slot.at != at {
            *slot = Minute {
                at,
                ..Minute::default()
            };
        }
        match verdict {
            Verdict::Delivered => slot.delivered += 1,
            Verdict::Skipped(_) => slot.skipped += 1,
            Verdict::DeadLettered(_) => slot.dead_lettered += 1,
            Verdict::Abandoned(_) => {}
        }
        slot.retried += retries as u32;
        slot
    }

    /// The plugin version, shared with the entries before it when the same.
    fn version(&mut self, version: &str) -> Arc<str> {
        match &self.version {
            Some(v) if **v == *version => v.clone(),
            _ => {
                let v: Arc<str> = version.into();
                self.version = Some(v.clone());
                v
            }
        }
    }

    /// Adds an entry, dropping the oldest past the ring; the bytes of the
    /// traces dropped.
    fn push(&mut self, entry: Entry, ring: usize) -> usize {
        self.recent.push_back(entry);
        let mut freed = 0;
        while self.recent.len() > ring {
            let old = self.recent.pop_front().expect("longer than the ring");
            freed += old.trace.as_deref().map_or(0, trace_size);
        }
        freed
    }
}

/// One connection's recent delivery.
#[derive(Default)]
pub struct Activity {
    inner: Mutex<Inner>,
}

/// The activity of every connection on this host.
pub struct Recorder {
    pub options: ConsoleOptions,
    by_connection: RwLock<HashMap<String, Arc<Activity>>>,
    /// Bytes of traces kept, across connections.
    body_bytes: AtomicUsize,
}

/// The minute `at` falls in, since the epoch.
fn minute_of(at: SystemTime) -> u32 {
    (at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() / 60) as u32
}

/// What a trace holds in memory, about (the requests are shared with no
/// one once delivered, so they count too).
fn trace_size(trace: &Trace) -> usize {
    let requests: usize = trace
        .requests
        .iter()
        .map(|r| {
            let request = &r.request;
            let headers: usize = request.headers.iter().map(|h| h.name.len() + h.value.len() + 48).sum();
            let answer = r.response.as_ref().map_or(0, |a| a.body.len() + 64);
            request.body.len() + request.url.len() + headers + answer + 160
        })
        .sum();
    trace.event.len() + requests + 96
}

impl Recorder {
    pub fn new(options: ConsoleOptions) -> Recorder {
        Recorder {
            options,
            by_connection: RwLock::default(),
            body_bytes: AtomicUsize::new(0),
        }
    }

    /// A connection's activity, made at its first use.
    pub fn activity(&self, connection: &str) -> Arc<Activity> {
        if let Some(activity) = self.by_connection.read().unwrap().get(connection) {
            return activity.clone();
        }
        self.by_connection
            .write()
            .unwrap()
            .entry(connection.to_string())
            .or_default()
            .clone()
    }

    /// A connection's activity, if it has any.
    pub fn get(&self, connection: &str) -> Option<Arc<Activity>> {
        self.by_connection.read().unwrap().get(connection).cloned()
    }

    /// Forgets a deleted connection's activity.
    pub fn forget(&self, connection: &str) {
        if let Some(gone) = self.by_connection.write().unwrap().remove(connection) {
            let bytes = gone.inner.lock().unwrap().body_bytes;
            self.body_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Bytes of traces kept on this host.
    pub fn body_bytes(&self) -> usize {
        self.body_bytes.load(Ordering::Relaxed)
    }

    /// A connection's share of the body budget.
    fn share(&self) -> usize {
        let connections = self.by_connection.read().unwrap().len().max(1);
        self.options.body_budget / connections
    }

    /// Notes that an event was handed to its connection's engine; it was
    /// received at `received_at` (RFC 3339), if the log kept that.
    pub fn handed(&self, activity: &Activity, id: EventId, received_at: Option<&str>) {
        let since = received_at
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(SystemTime::from)
            .unwrap_or_else(SystemTime::now);
        let mut inner = activity.inner.lock().unwrap();
        // Events released unfinished (the service stopping) leave theirs
        // behind; bounded all the same.
        if inner.handed.len() >= 1 << 16 {
            inner.handed.clear();
        }
        inner.handed.insert(id, since);
    }

    /// Records an outcome. `throttled` is the connection's count of 429
    /// answers so far (its delivery counts them, retries included).
    pub fn record(&self, activity: &Activity, record: &EventRecord, throttled: u64) {
        let now = SystemTime::now();
        let share = self.share();
        let mut inner = activity.inner.lock().unwrap();
        let inner = &mut *inner;
        let took = inner
            .handed
            .remove(&record.id)
            .map(|since| now.duration_since(since).unwrap_or_default());

        let verdict = match &record.outcome {
            EventOutcome::Delivered { .. } => Verdict::Delivered,
            EventOutcome::Skipped(reason) => Verdict::Skipped(reason.as_str().into()),
            EventOutcome::DeadLettered(letter) => Verdict::DeadLettered(letter.reason.as_str().into()),
            EventOutcome::Abandoned(reason) => Verdict::Abandoned(reason.as_str().into()),
        };
        if inner.minutes.is_empty() {
            inner.throttled_seen = throttled;
        }
        let seen = inner.throttled_seen;
        let slot = inner.count(now, &verdict, record.retries);
        slot.throttled += throttled.saturating_sub(seen) as u32;
        inner.throttled_seen = seen.max(throttled);
        if let (Some(took), EventOutcome::Delivered { .. }) = (took, &record.outcome) {
            let ms = took.as_millis().min(u32::MAX as u128) as u32;
            if inner.latencies.len() < LATENCIES {
                inner.latencies.push(ms);
            } else {
                inner.latencies[inner.next_latency] = ms;
            }
            inner.next_latency = (inner.next_latency + 1) % LATENCIES;
        }

        // The event itself.
        if self.options.ring == 0 {
            return;
        }
        let (mut trace, mut no_trace) = (None, None);
        let (mut person, mut statuses) = (None, [0u16; 4]);
        if let Some(t) = &record.trace {
            person = t.person.as_deref().map(Box::from);
            for (status, request) in statuses.iter_mut().zip(&t.requests) {
                *status = request.response.as_ref().map_or(0, |a| a.status);
            }
            if !self.options.bodies {
                no_trace = Some("bodies are not kept (--console-bodies off)");
            } else if trace_size(t) > share {
                no_trace = Some("too large to keep within this connection's share of the console's memory");
            } else {
                trace = Some(t.clone());
            }
        }
        inner.serial += 1;
        let plugin_version = inner.version(&record.plugin_version);
        let entry = Entry {
            serial: inner.serial,
            finished: now,
            event_id: record.id,
            message_id: record.message_id.as_deref().map(Box::from),
            kind: crate::serve::connections::kind_label(record.kind.as_deref()),
            verdict,
            plugin_version,
            retries: record.retries.min(u32::MAX as u64) as u32,
            warnings: record.warnings.clone().into_boxed_slice(),
            took_ms: took.map(|t| t.as_millis().min(u32::MAX as u128) as u32),
            person,
            statuses,
            trace,
            no_trace,
        };
        let added = entry.trace.as_deref().map_or(0, trace_size);
        inner.body_bytes += added;
        let mut freed = inner.push(entry, self.options.ring);
        // Over its share, or the host over its budget: its oldest lose
        // their traces first.
        let mut kept = inner.body_bytes - freed;
        let others = self
            .body_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(inner.body_bytes - added);
        for old in inner.recent.iter_mut() {
            if kept <= share && others + kept <= self.options.body_budget {
                break;
            }
            if let Some(t) = old.trace.take() {
                let size = trace_size(&t);
                kept -= size;
                freed += size;
                old.no_trace = Some("dropped to keep the console's memory bounded");
            }
        }
        inner.body_bytes = kept;
        if added >= freed {
            self.body_bytes.fetch_add(added - freed, Ordering::Relaxed);
        } else {
            self.body_bytes.fetch_sub(freed - added, Ordering::Relaxed);
        }
    }
}

impl Recorder {
    /// Records an outcome another host published (on the stream): counted
    /// as this host's are, listed without a trace.
    pub fn record_elsewhere(&self, activity: &Activity, outcome: Elsewhere) {
        let now = SystemTime::now();
        let mut inner = activity.inner.lock().unwrap();
        inner.count(now, &outcome.verdict, 0);
        inner.totals.elsewhere += 1;
        if self.options.ring == 0 {
            return;
        }
        inner.serial += 1;
        let plugin_version = inner.version(&outcome.plugin_version);
        let entry = Entry {
            serial: inner.serial,
            finished: now,
            event_id: EventId::Stream(0),
            message_id: outcome.message_id.as_deref().map(Box::from),
            kind: "other",
            verdict: outcome.verdict,
            plugin_version,
            retries: 0,
            warnings: Box::default(),
            took_ms: None,
            person: None,
            statuses: [0; 4],
            trace: None,
            no_trace: Some("finished by another host; its requests and answers are in that host's console"),
        };
        let freed = inner.push(entry, self.options.ring);
        inner.body_bytes -= freed;
        self.body_bytes.fetch_sub(freed, Ordering::Relaxed);
    }
}

/// What the overview shows of a connection.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The last 60 minutes, oldest first (this minute last).
    pub minutes: Vec<Minute>,
    pub p50_ms: Option<u32>,
    pub p99_ms: Option<u32>,
    /// Events in its engine now.
    pub in_engine: usize,
    pub totals: Totals,
}

impl Activity {
    pub fn summary(&self) -> Summary {
        let inner = self.inner.lock().unwrap();
        let now = minute_of(SystemTime::now());
        let minutes = (0..60u32)
            .rev()
            .map(|ago| {
                let at = now.saturating_sub(ago);
                match inner.minutes.get(at as usize % 60) {
                    Some(m) if m.at == at => *m,
                    _ => Minute {
                        at,
                        ..Minute::default()
                    },
                }
            })
            .collect();
        let mut sorted = inner.latencies.clone();
        sorted.sort_unstable();
        let pick = |q: f64| (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * q).round() as usize]);
        Summary {
            minutes,
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            in_engine: inner.handed.len(),
            totals: inner.totals,
        }
    }

    /// The recent events after `after` (by serial) that `keep` accepts,
    /// newest first.
    pub fn recent(&self, after: u64, keep: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let inner = self.inner.lock().unwrap();
        inner
            .recent
            .iter()
            .rev()
            .take_while(|e| e.serial > after)
            .filter(|e| keep(e))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use cdp_core::delivery::TracedRequest;

    fn record(row: i64, outcome: EventOutcome, body: usize) -> EventRecord {
        let request = plugin_runtime::HttpRequest {
            method: "POST".into(),
            url: "https://a.klaviyo.com/api/events".into(),
            headers: vec![],
            body: format!("{{\"pad\":\"{}\"}}", "x".repeat(body)),
            rate_class: "events".into(),
            idempotency_key: None,
        };
        EventRecord {
            id: EventId::SpoolRow(row),
            message_id: Some(format!("m{row}")),
            kind: Some("track".into()),
            outcome,
            warnings: vec![],
            retries: 1,
            plugin_version: "klaviyo@1.0.0".into(),
            trace: Some(Arc::new(Trace {
                event: "{}".into(),
                person: Some(format!("e\"p{row}@example.org\"")),
                requests: vec![TracedRequest {
                    request: Arc::new(request),
                    response: Some(plugin_runtime::HttpResponse {
                        status: 202,
                        headers: vec![],
                        body: String::new(),
                    }),
                    batched: false,
                }],
                sending: Duration::from_millis(3),
            })),
        }
    }

    #[test]
    fn keeps_the_ring_and_counts_the_minute() {
        let recorder = Recorder::new(ConsoleOptions {
            ring: 4,
            ..ConsoleOptions::default()
        });
        let shop = recorder.activity("shop");
        for row in 1..=10 {
            recorder.handed(&shop, EventId::SpoolRow(row), None);
            let outcome = if row % 5 == 0 {
                EventOutcome::Skipped("no email".into())
            } else {
                EventOutcome::Delivered { requests: 1 }
            };
            recorder.record(&shop, &record(row, outcome, 100), row as u64);
        }
        let recent = shop.recent(0, |_| true);
        assert_eq!(recent.iter().map(|e| e.serial).collect::<Vec<_>>(), [10, 9, 8, 7]);
        assert_eq!(recent[0].verdict, Verdict::Skipped("no email".into()));
        assert_eq!(recent[1].statuses, [202, 0, 0, 0]);
        assert!(recent.iter().all(|e| e.trace.is_some() && e.took_ms.is_some()));
        assert_eq!(shop.recent(8, |_| true).len(), 2, "the tail after serial 8");
        let summary = shop.summary();
        let now = summary.minutes.last().unwrap();
        // A minute may turn during the test; the counts go to both.
        let all = |f: fn(&Minute) -> u32| summary.minutes.iter().map(f).sum::<u32>();
        assert_eq!(
            (all(|m| m.delivered), all(|m| m.skipped), all(|m| m.retried)),
            (8, 2, 10)
        );
        assert_eq!(all(|m| m.throttled), 9, "429s counted from the first record on");
        assert!(now.at > 0);
        assert!(summary.p50_ms.is_some() && summary.p99_ms.is_some());
        assert_eq!(summary.in_engine, 0);
    }

    #[test]
    fn traces_stay_within_the_budget_oldest_dropped_first() {
        let recorder = Recorder::new(ConsoleOptions {
            ring: 100,
            bodies: true,
            body_budget: 20_000,
        });
        let (a, b) = (recorder.activity("a"), recorder.activity("b"));
        let c = recorder.activity("c");
        // Alone a while: all of the budget is its to use.
        recorder.record(&c, &record(1, EventOutcome::Delivered { requests: 1 }, 15_000), 0);
        for row in 1..=50 {
            recorder.record(&a, &record(row, EventOutcome::Delivered { requests: 1 }, 1_000), 0);
        }
        // Three connections: 6,666 bytes each, and what c leaves.
        recorder.record(&b, &record(1, EventOutcome::Delivered { requests: 1 }, 30_000), 0);
        let kept = a.recent(0, |e| e.trace.is_some());
        assert!(!kept.is_empty() && kept.len() < 6, "{} kept", kept.len());
        assert_eq!(kept[0].serial, 50, "the newest keep theirs");
        assert!(recorder.body_bytes() <= 20_000, "{}", recorder.body_bytes());
        let big = &b.recent(0, |_| true)[0];
        assert!(big.trace.is_none() && big.no_trace.is_some(), "larger than its share");
        assert_eq!(
            a.recent(0, |_| true).len(),
            50,
            "what became of each is kept all the same"
        );
        recorder.forget("a");
        recorder.forget("c");
        assert_eq!(recorder.body_bytes(), 0);
    }

    #[test]
    fn without_bodies_keeps_what_became_of_each_and_no_trace() {
        let recorder = Recorder::new(ConsoleOptions {
            bodies: false,
            ..ConsoleOptions::default()
        });
        let shop = recorder.activity("shop");
        recorder.record(&shop, &record(1, EventOutcome::Delivered { requests: 1 }, 10), 0);
        let entry = &shop.recent(0, |_| true)[0];
        assert!(entry.trace.is_none());
        assert_eq!(entry.person.as_deref(), Some("e\"p1@example.org\""));
        assert!(Arc::ptr_eq(
            &entry.plugin_version,
            &shop.recent(0, |_| true)[0].plugin_version
        ));
        assert_eq!(recorder.body_bytes(), 0);
    }

    #[test]
    fn another_hosts_outcomes_are_counted_and_listed_without_a_trace() {
        let recorder = Recorder::new(ConsoleOptions::default());
        let shop = recorder.activity("shop");
        recorder.record(&shop, &record(1, EventOutcome::Delivered { requests: 1 }, 10), 0);
        recorder.record_elsewhere(
            &shop,
            Elsewhere {
                message_id: Some("m-b".into()),
                verdict: Verdict::DeadLettered("HTTP 400".into()),
                plugin_version: "klaviyo@1.0.0".into(),
                host: "wB".into(),
            },
        );
        let totals = shop.summary().totals;
        assert_eq!(
            totals,
            Totals {
                delivered: 1,
                skipped: 0,
                dead_lettered: 1,
                elsewhere: 1
            }
        );
        let recent = shop.recent(0, |_| true);
        assert_eq!(recent[0].message_id.as_deref(), Some("m-b"));
        assert!(recent[0].trace.is_none() && recent[0].no_trace.is_some());
        assert!(recent[1].trace.is_some());
    }

    #[test]
    fn time_to_delivery_counts_from_when_ingest_received_the_event() {
        let recorder = Recorder::new(ConsoleOptions::default());
        let shop = recorder.activity("shop");
        let received = chrono::Utc::now() - chrono::Duration::seconds(3);
        let received = received.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        recorder.handed(&shop, EventId::SpoolRow(1), Some(&received));
        recorder.handed(&shop, EventId::SpoolRow(2), Some("not a time"));
        for row in [1, 2] {
            recorder.record(&shop, &record(row, EventOutcome::Delivered { requests: 1 }, 10), 0);
        }
        let recent = shop.recent(0, |_| true);
        let took = |serial: u64| recent.iter().find(|e| e.serial == serial).unwrap().took_ms.unwrap();
        assert!((3_000..10_000).contains(&took(1)), "{}", took(1));
        assert!(took(2) < 1_000, "unreadable: from the hand-in");
        assert!(shop.summary().p99_ms.unwrap() >= 3_000);
    }
}
