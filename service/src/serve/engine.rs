//! One delivery engine per connection, whichever log keeps the events.
//!
//! A backend (the spool's feeder, a stream worker's partition readers)
//! *admits* an event, which takes room in its connection's bound and the
//! host's, and *hands* it in. The connection's engine, started at its
//! first event and stopped once it has been idle for `IDLE`, maps and
//! delivers it (in order per person, retrying while other people's events
//! go on) and sends each outcome, counted, to the backend's receiver. The
//! backend makes the outcome durable (a row written; a dead letter stored
//! and the message acked) and then *releases* the event, which frees its
//! room. Until then the event stays admitted, so a backend that reads it
//! again does not hand it out twice.
//!
//! Nothing here knows which backend it serves: the backends differ in how
//! they find events and how they settle them, not in how events are
//! delivered, counted or bounded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::connections::{self, Connection};
use super::console::Recorder;
use super::metrics::Metrics;
use cdp_core::delivery::{EventOutcome, EventRecord};
use cdp_core::mapping::{EventId, Prepared, Stage, StageInput};

/// A connection's engine stops after this long with nothing handed in
/// and nothing in flight (and starts again at its next event). An engine
/// holds no thread of its own in any case: its events are mapped on the
/// host's mapping pool and delivered on the async runtime.
pub(crate) const IDLE: Duration = Duration::from_secs(10);

/// How often an engine waiting for events looks whether it is idle.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// An admitted event: its room (a place among its connection's events and
/// the host's, then its body's bytes in both), and who waits for its
/// outcome to be recorded (its person's next event, after an identify).
pub(crate) struct Held {
    _room: [OwnedSemaphorePermit; 4],
    /// Dropped at release, which is what the waiter hears.
    settled: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Held {
    fn new(room: [OwnedSemaphorePermit; 4]) -> Held {
        Held {
            _room: room,
            settled: None,
        }
    }
}

/// The permits an event of `size` bytes takes from a byte bound of
/// `bound` bytes: one a KiB, at least one, and never more than the whole
/// bound (an event larger than that goes alone).
fn kib(size: usize, bound: usize) -> u32 {
    size.div_ceil(1024).clamp(1, bound / 1024) as u32
}

/// An outcome, with the connection it belongs to.
type Outcome = (Arc<Connection>, EventRecord);

/// Outcomes on their way to the backend that settles them.
pub(crate) type Outcomes = tokio::sync::mpsc::UnboundedReceiver<Outcome>;

/// Whether an event was let in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Admitted,
    /// It is in already (handed out and not yet released).
    AlreadyIn,
    /// Its connection or the host has no room now; `Engines::room` is
    /// told when some is freed.
    Full,
}

struct Running {
    connection: Arc<Connection>,
    events: StageInput,
    task: tokio::task::JoinHandle<()>,
    /// Tells this engine from a later one of the same connection.
    serial: u64,
}

/// The engines of every connection on this host.
pub(crate) struct Engines {
    running: Mutex<HashMap<String, Running>>,
    serial: std::sync::atomic::AtomicU64,
    /// Events admitted across connections (`connections::host_events`).
    host: Arc<Semaphore>,
    /// Their bodies' KiB (`connections::HOST_BYTES`).
    host_bytes: Arc<Semaphore>,
    outcomes: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Outcome>>>,
    metrics: Arc<Metrics>,
    closed: std::sync::atomic::AtomicBool,
    /// Told whenever an event is released (room freed).
    pub(crate) room: Notify,
    /// Keeps each connection's recent delivery for the console, when on.
    recorder: Option<Arc<Recorder>>,
}

impl Engines {
    /// The engines, and where their outcomes come out (for the backend
    /// that settles them).
    pub(crate) fn new(metrics: Arc<Metrics>, recorder: Option<Arc<Recorder>>) -> (Arc<Engines>, Outcomes) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let engines = Arc::new(Engines {
            running: Mutex::default(),
            serial: Default::default(),
            host: Arc::new(Semaphore::new(connections::host_events())),
            host_bytes: Arc::new(Semaphore::new(connections::HOST_BYTES / 1024)),
            outcomes: Mutex::new(Some(tx)),
            metrics,
            closed: Default::default(),
            room: Notify::new(),
            recorder,
        });
        (engines, rx)
    }

    /// Lets an event of `size` bytes in if its connection and the host
    /// have room for it.
    pub(crate) fn try_admit(&self, connection: &Connection, id: EventId, size: usize) -> Admit {
        let mut in_flight = connection.in_flight.lock().unwrap();
        if in_flight.contains_key(&id) {
            return Admit::AlreadyIn;
        }
        let room = (|| {
            Some([
                connection.held.clone().try_acquire_owned().ok()?,
                self.host.clone().try_acquire_owned().ok()?,
                connection
                    .held_bytes
                    .clone()
                    .try_acquire_many_owned(kib(size, connections::CONNECTION_BYTES))
                    .ok()?,
                self.host_bytes
                    .clone()
                    .try_acquire_many_owned(kib(size, connections::HOST_BYTES))
                    .ok()?,
            ])
        })();
        let Some(room) = room else {
            return Admit::Full;
        };
        in_flight.insert(id, Held::new(room));
        Admit::Admitted
    }

    /// Lets an event of `size` bytes in once its connection and the host
    /// have room for it; false if it is in already.
    pub(crate) async fn admit(&self, connection: &Connection, id: EventId, size: usize) -> bool {
        if connection.in_flight.lock().unwrap().contains_key(&id) {
            return false;
        }
        let closed = "never closed";
        let room = [
            connection.held.clone().acquire_owned().await.expect(closed),
            self.host.clone().acquire_owned().await.expect(closed),
            connection
                .held_bytes
                .clone()
                .acquire_many_owned(kib(size, connections::CONNECTION_BYTES))
                .await
                .expect(closed),
            self.host_bytes
                .clone()
                .acquire_many_owned(kib(size, connections::HOST_BYTES))
                .await
                .expect(closed),
        ];
        connection.in_flight.lock().unwrap().insert(id, Held::new(room));
        true
    }

    /// Frees an admitted event's room, once its outcome is final (or it
    /// was never handed in), and counts it finished if it was.
    pub(crate) fn release(&self, connection: &Connection, id: EventId, finished: bool) {
        connection.in_flight.lock().unwrap().remove(&id);
        connection.waits.lock().unwrap().remove(&id);
        if finished {
            self.metrics.finished.fetch_add(1, Ordering::Relaxed);
            connection.metrics.finished.fetch_add(1, Ordering::Relaxed);
        }
        self.room.notify_waiters();
    }

    /// Hands an admitted event to its connection's engine, starting one if
    /// none runs; `not_before`, a recorded Retry-After, holds it (and its
    /// person's later events) until then. `received_at` (RFC 3339), when
    /// the log kept it, is when ingest took it: the console times the
    /// event's delivery from then. False once the engines are
    /// closed (the service stops): the event is then released, unsent.
    pub(crate) fn hand(
        self: &Arc<Self>,
        connection: &Arc<Connection>,
        id: EventId,
        body: String,
        not_before: Option<std::time::SystemTime>,
        received_at: Option<&str>,
    ) -> bool {
        if let Some(until) = not_before.filter(|t| *t > std::time::SystemTime::now()) {
            connection.waits.lock().unwrap().insert(id, until);
        }
        if let Some(recorder) = &self.recorder {
            recorder.handed(&recorder.activity(&connection.id), id, received_at);
        }
        // The envelope is read here, outside the engines' lock.
        let mut event = Prepared::new(id, body);
        let mut running = self.running.lock().unwrap();
        if self.closed.load(Ordering::Acquire) {
            drop(running);
            self.release(connection, id, false);
            return false;
        }
        if let Some(engine) = running.get(&connection.id)
            && Arc::ptr_eq(&engine.connection, connection)
        {
            match engine.events.push(event) {
                Ok(()) => return true,
                // Its delivery ended an instant ago (an error).
                Err(back) => event = back,
            }
        }
        // A new engine: it delivers after the last one of this id (deleted
        // and made anew, or stopped when idle) has finished what it had.
        let last = running.remove(&connection.id).map(|r| r.task);
        let (input, stage) = match connection.delivery.stage() {
            Ok(stage) => stage,
            Err(e) => {
                drop(running);
                tracing::error!(connection = %connection.id, "could not start its engine: {e:#}");
                self.release(connection, id, false);
                return false;
            }
        };
        if input.push(event).is_err() {
            unreachable!("a new stage takes events");
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(self.clone().run(connection.clone(), stage, serial, last));
        running.insert(
            connection.id.clone(),
            Running {
                connection: connection.clone(),
                events: input,
                task,
                serial,
            },
        );
        true
    }

    /// How many engines run now.
    pub(crate) fn running(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    /// Takes no more events: each engine finishes what it has and stops.
    /// What to wait for.
    pub(crate) fn close(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut running = self.running.lock().unwrap();
        self.closed.store(true, Ordering::Release);
        let tasks = running.drain().map(|(_, r)| r.task).collect();
        self.outcomes.lock().unwrap().take();
        tasks
    }

    /// A connection's engine: delivers what is handed in until it is idle
    /// or closed.
    async fn run(
        self: Arc<Self>,
        connection: Arc<Connection>,
        stage: Stage,
        serial: u64,
        last: Option<tokio::task::JoinHandle<()>>,
    ) {
        if let Some(last) = last {
            let _ = last.await;
        }
        let Some(outcomes) = self.outcomes.lock().unwrap().clone() else {
            return;
        };
        let activity = stage.activity();
        let recent = self.recorder.as_ref().map(|r| (r.clone(), r.activity(&connection.id)));
        let observer = {
            let (engines, connection) = (self.clone(), connection.clone());
            move |record: &EventRecord| {
                engines.count(&connection, record);
                if let Some((recorder, activity)) = &recent {
                    let throttled = connection.delivery.progress.statuses.lock().unwrap().get(&429).copied();
                    recorder.record(activity, record, throttled.unwrap_or(0));
                }
                // A profile write (an identify) holds its person's next
                // event until its outcome is recorded: were its record lost
                // (the worker killed first), the next holder would send it
                // again, and after a newer identify already sent that would
                // leave the profile stale. Other events are keyed by their
                // message downstream (Klaviyo keeps one event per
                // unique_id), so one sent again changes nothing, and they
                // do not wait. Asked before the outcome goes, so that its
                // release cannot come first.
                let profile_write = record
                    .kind
                    .as_deref()
                    .is_some_and(|kind| kind.eq_ignore_ascii_case("identify"));
                let settling = profile_write
                    .then(|| {
                        connection.in_flight.lock().unwrap().get_mut(&record.id).map(|held| {
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            held.settled = Some(tx);
                            rx
                        })
                    })
                    .flatten();
                // The receiver goes with the service: a send fails only if
                // it is gone, and then the event stays unfinished, and its
                // person's next event is not held for it.
                outcomes.send((connection.clone(), record.clone())).ok()?;
                settling
            }
        };
        let delivery = connection.delivery.clone();
        let delivered = delivery.deliver_stage(stage, observer);
        tokio::pin!(delivered);
        let mut seen = activity.pushed();
        let mut last_event = Instant::now();
        let result = loop {
            tokio::select! {
                result = &mut delivered => break result,
                _ = tokio::time::sleep(IDLE_CHECK) => {
                    let pushed = activity.pushed();
                    if pushed != seen {
                        (seen, last_event) = (pushed, Instant::now());
                        continue;
                    }
                    if last_event.elapsed() < IDLE || !connection.in_flight.lock().unwrap().is_empty() {
                        continue;
                    }
                    // Idle: stop, unless an event was handed in meanwhile
                    // (handing in takes this lock too). Its input goes with
                    // its entry, and delivery ends once all is done.
                    let mut running = self.running.lock().unwrap();
                    if activity.pushed() != seen {
                        continue;
                    }
                    if running.get(&connection.id).is_some_and(|r| r.serial == serial) {
                        running.remove(&connection.id);
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::error!(connection = %connection.id, "delivery ended with an error: {e:#}");
        }
    }

    /// Counts an outcome, and logs a dead letter.
    fn count(&self, connection: &Connection, record: &EventRecord) {
        match &record.outcome {
            EventOutcome::Delivered { .. } => {}
            EventOutcome::Skipped(reason) => {
                let current = connection.slot.current();
                let code = current.plugin.skip_code(reason);
                tracing::debug!(connection = %connection.id, event = %record.id, code, "skipped: {reason}");
                self.metrics.skipped(code);
                connection
                    .metrics
                    .skipped(connections::kind_label(record.kind.as_deref()));
            }
            EventOutcome::DeadLettered(letter) => {
                tracing::warn!(connection = %connection.id, event = %record.id, message_id = ?record.message_id, reason = %letter.reason, "dead-lettered");
            }
            EventOutcome::Abandoned(reason) => {
                tracing::debug!(connection = %connection.id, event = %record.id, "{reason}");
            }
        }
    }
}

/// The engine against an event log kept in memory: no spool feeder, no
/// stream, no server but the Klaviyo stand-in on loopback. The test is the
/// backend: it admits and hands events in, takes each outcome, and
/// releases the event, as the spool and the stream do.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use klaviyo_mock::{DEMO_KEY, Faults, KlaviyoMock};
    use plugin_runtime::PluginSlot;
    use serde_json::json;

    use super::*;
    use crate::serve::connections::Connections;
    use crate::serve::store::PluginStore;
    use crate::serve::testing::{TempDir, identify, runtime, sandbox, track};
    use crate::spool::{Durability, Spool};
    use cdp_core::delivery::DeliveryConfig;
    use cdp_core::settings::DestinationSettings;

    /// One shop: its connection, delivering to its own stand-in.
    struct Shop {
        connection: Arc<Connection>,
        sandbox: KlaviyoMock,
        _connections: Connections,
        _dir: TempDir,
    }

    async fn shop(id: &str, faults: Faults) -> Shop {
        let sandbox = sandbox(faults).await;
        let dir = TempDir::new();
        let spool = Arc::new(Spool::open(&dir.0.join("spool.sqlite"), Durability::ProcessCrash).unwrap());
        let plugin = Arc::new(
            runtime()
                .load(&std::fs::read(plugin_fixtures::KLAVIYO).unwrap(), "bundled")
                .unwrap(),
        );
        let config = DeliveryConfig {
            base_url: Some(sandbox.url().parse().unwrap()),
            pacing: false,
            max_attempts: 1000,
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(500),
            ..DeliveryConfig::default()
        };
        let store = PluginStore::new(runtime().clone(), spool.clone());
        let connections = Connections::new(store, plugin.clone(), config, spool).unwrap();
        let settings = json!({"api_key": DEMO_KEY}).as_object().unwrap().clone();
        let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
        let slot = PluginSlot::new(plugin, crate::canary::canary(&settings));
        connections
            .add_from_flags(id, &[format!("wk_{id}")], slot, settings)
            .unwrap();
        Shop {
            connection: connections.get(id).unwrap(),
            sandbox,
            _connections: connections,
            _dir: dir,
        }
    }

    /// Admits and hands in each event, in order, as a log's reader would.
    async fn feed(engines: &Arc<Engines>, shop: &Shop, events: &[(EventId, String)]) {
        for (id, body) in events {
            assert!(engines.admit(&shop.connection, *id, body.len()).await);
            assert!(engines.hand(&shop.connection, *id, body.clone(), None, None));
        }
    }

    /// Takes outcomes until `count` have come for `connection`, releasing
    /// each; the others' are released too. Their records, by event.
    async fn settle(
        engines: &Engines,
        outcomes: &mut Outcomes,
        connection: &str,
        count: usize,
        within: Duration,
    ) -> BTreeMap<EventId, EventRecord> {
        let mut settled = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + within;
        while settled.len() < count {
            let next = tokio::time::timeout_at(deadline, outcomes.recv()).await;
            let Ok(Some((from, record))) = next else {
                panic!(
                    "{} of {count} outcomes of {connection} within {within:?}",
                    settled.len()
                );
            };
            engines.release(&from, record.id, true);
            if from.id == connection {
                settled.insert(record.id, record);
            }
        }
        settled
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_persons_events_arrive_in_order_through_429s_with_retry_after() {
        let (engines, mut outcomes) = Engines::new(Arc::default(), None);
        let shop = shop(
            "a",
            Faults {
                throttle_storm: 0.4,
                storm_retry_after: 1,
                ..Faults::default()
            },
        )
        .await;
        let mut events = Vec::new();
        for seq in 0..8 {
            for person in 0..6 {
                let body = if seq % 4 == 0 {
                    identify(person, seq)
                } else {
                    track(person, seq)
                };
                events.push((EventId::Line(events.len() as u64), body));
            }
        }
        feed(&engines, &shop, &events).await;
        let settled = settle(&engines, &mut outcomes, "a", events.len(), Duration::from_secs(60)).await;
        assert!(
            settled
                .values()
                .all(|r| matches!(r.outcome, EventOutcome::Delivered { .. }))
        );
        let throttled: u64 = shop.sandbox.stats().throttled.values().sum();
        assert!(throttled > 0, "the stand-in throttled nothing");
        // Per person, the tracks arrived in sequence, and the profile is
        // the last identify's.
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for event in shop.sandbox.events() {
            let seq = event.properties["seq"].as_u64().unwrap();
            let before = last.insert(event.profile_id.clone(), seq);
            assert!(before.is_none_or(|b| b < seq), "{} after {before:?}", seq);
        }
        for profile in shop.sandbox.profiles() {
            assert_eq!(profile.attributes.get("first_name"), Some(&json!("v4")), "{profile:?}");
        }
    }

    /// The residual of the stream's long fault runs: a worker killed after
    /// Klaviyo took an identify and before its outcome record was stored
    /// left it to the next holder, which sent it again after the person's
    /// newer identify had gone out, and the profile was stale until that
    /// was sent again too. A person's next event now waits until their last
    /// identify's outcome is recorded (released), so an identify sent again
    /// is always their newest. Tracks do not wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_persons_next_event_waits_until_their_last_identify_is_recorded() {
        let (engines, mut outcomes) = Engines::new(Arc::default(), None);
        let shop = shop("h", Faults::default()).await;
        let events = [
            (EventId::Line(1), identify(1, 1)),
            (EventId::Line(2), identify(1, 2)),
            (EventId::Line(3), identify(2, 1)),
            (EventId::Line(4), track(3, 1)),
            (EventId::Line(5), track(3, 2)),
        ];
        feed(&engines, &shop, &events).await;
        // Person 1's first identify, person 2's, and both of person 3's
        // tracks (the second not waiting for the first's record) come out;
        // nothing is recorded yet.
        let mut first = Vec::new();
        for _ in 0..4 {
            let next = tokio::time::timeout(Duration::from_secs(10), outcomes.recv()).await;
            first.push(next.expect("an outcome within 10 s").expect("open").1.id);
        }
        first.sort();
        assert_eq!(
            first,
            [EventId::Line(1), EventId::Line(3), EventId::Line(4), EventId::Line(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            outcomes.try_recv().is_err(),
            "person 1's second identify went before the first was recorded"
        );
        let names = || {
            let mut names: Vec<String> = shop
                .sandbox
                .profiles()
                .iter()
                .filter_map(|p| p.attributes.get("first_name").map(|n| n.to_string()))
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(), ["\"v1\"", "\"v1\""]);
        // Recorded: the second goes.
        engines.release(&shop.connection, EventId::Line(1), true);
        let settled = settle(&engines, &mut outcomes, "h", 1, Duration::from_secs(10)).await;
        assert!(settled.contains_key(&EventId::Line(2)), "{settled:?}");
        assert_eq!(names(), ["\"v1\"", "\"v2\""]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_shop_does_not_hold_up_another() {
        let (engines, mut outcomes) = Engines::new(Arc::default(), None);
        let failing = shop(
            "x",
            Faults {
                server_errors: 1.0,
                ..Faults::default()
            },
        )
        .await;
        let healthy = shop("y", Faults::default()).await;
        let backlog: Vec<_> = (0..1_500)
            .map(|i| (EventId::Line(i), track(i as usize % 50, i as usize)))
            .collect();
        feed(&engines, &failing, &backlog).await;
        let events: Vec<_> = (0..16).map(|i| (EventId::Line(i), track(i as usize, 0))).collect();
        let started = Instant::now();
        feed(&engines, &healthy, &events).await;
        settle(&engines, &mut outcomes, "y", 16, Duration::from_secs(5)).await;
        assert_eq!(healthy.sandbox.events().len(), 16);
        // The failing shop's events are still being retried meanwhile.
        assert!(failing.connection.in_flight.lock().unwrap().len() > 1_000);
        eprintln!("16 events of a healthy shop delivered in {:?}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_admits_no_more_than_its_bound_and_no_event_twice() {
        let (engines, _outcomes) = Engines::new(Arc::default(), None);
        let shop = shop("b", Faults::default()).await;
        let mut admitted = 0u64;
        while let Admit::Admitted = engines.try_admit(&shop.connection, EventId::Line(admitted), 100) {
            admitted += 1;
        }
        assert_eq!(admitted as usize, super::super::connections::FLAGS_CONNECTION_EVENTS);
        assert!(matches!(
            engines.try_admit(&shop.connection, EventId::Line(0), 100),
            Admit::AlreadyIn
        ));
        assert!(matches!(
            engines.try_admit(&shop.connection, EventId::Line(admitted), 100),
            Admit::Full
        ));
        engines.release(&shop.connection, EventId::Line(0), false);
        assert!(matches!(
            engines.try_admit(&shop.connection, EventId::Line(admitted), 100),
            Admit::Admitted
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_skipped_event_handed_in_with_a_wait_leaves_no_wait_behind() {
        let (engines, mut outcomes) = Engines::new(Arc::default(), None);
        let shop = shop("d", Faults::default()).await;
        let id = EventId::SpoolRow(7);
        let no_email = json!({"type": "track", "event": "Step", "messageId": "m7", "userId": "u7"}).to_string();
        assert!(engines.admit(&shop.connection, id, 100).await);
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        assert!(engines.hand(&shop.connection, id, no_email, Some(later), None));
        let settled = settle(&engines, &mut outcomes, "d", 1, Duration::from_secs(10)).await;
        assert!(
            matches!(settled[&id].outcome, EventOutcome::Skipped(_)),
            "{:?}",
            settled[&id].outcome
        );
        assert!(shop.connection.waits.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_engine_stops_and_a_new_event_starts_another() {
        let (engines, mut outcomes) = Engines::new(Arc::default(), None);
        let shop = shop("c", Faults::default()).await;
        feed(&engines, &shop, &[(EventId::Line(1), track(1, 1))]).await;
        settle(&engines, &mut outcomes, "c", 1, Duration::from_secs(10)).await;
        assert_eq!(engines.running(), 1);
        let deadline = Instant::now() + IDLE + Duration::from_secs(5);
        while engines.running() > 0 {
            assert!(Instant::now() < deadline, "the engine did not stop when idle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        feed(&engines, &shop, &[(EventId::Line(2), track(1, 2))]).await;
        settle(&engines, &mut outcomes, "c", 1, Duration::from_secs(10)).await;
        assert_eq!(shop.sandbox.events().len(), 2);
    }
}
