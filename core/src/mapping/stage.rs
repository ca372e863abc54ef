//! Maps streams of events on one pool of workers, so that many streams (one
//! per busy connection) share a worker per core instead of each having
//! threads of its own, and one event the plugin is stuck on (a loop running
//! into its deadline, and the re-maps after it) holds up only the events of
//! the same person, not its stream or the others.
//!
//! - A `MappingPool` is a fixed set of workers. Each stream (`Stage`) with
//!   an event ready to map waits in the pool's queue; a worker takes the
//!   stage at the front, maps one of its events, and puts it at the back if
//!   it has more: the stages are served in turn.
//! - Within a stage, events with the same person key
//!   (`Envelope::person_key`) are mapped one at a time, in the order they
//!   came; the others in parallel, up to the stage's `parallel`.
//! - Mapped events leave in input order (`Stage::next`), so that delivery
//!   sees them as they came, with one exception: an event still unmapped
//!   `overtake_after` after it started (or, waiting behind its own person's
//!   stuck event, after it arrived) is overtaken by the events behind it,
//!   and leaves when it is done. Order between two events can then change
//!   only if they have different person keys. A stuck event has a worker
//!   added to the pool in its place while it lasts, and its stage may map
//!   one more event at once, within what its connection's own gate lets
//!   call (so a stage never holds a worker waiting at that gate).
//! - An event whose mapping failed in the plugin itself is mapped again on
//!   the same worker, each time with a fresh instance, `poison_attempts`
//!   times in all; the other workers go on meanwhile.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Envelope, EventId, EventMapper, MappedEvent, MappedOutcome};

/// How a stage runs.
#[derive(Clone, Debug)]
pub struct StageConfig {
    /// Events of this stage mapped at once, at most (one more for each
    /// event stuck in the plugin).
    pub parallel: usize,
    /// Attempts to map an event whose mapping failed in the plugin.
    pub poison_attempts: u32,
    /// How long an unfinished event may hold up the ones behind it.
    pub overtake_after: Duration,
    /// Events pushed with `StageInput::push_waiting` wait while this many
    /// are unfinished: bounds memory, and makes a slow consumer slow the
    /// input down. (`push` does not wait: its caller bounds what it hands
    /// in, as `serve`'s engines do.)
    pub max_queued: usize,
}

impl StageConfig {
    /// Workers by default: one per core, at least two (so that one stuck
    /// on a poison event leaves another). More cost latency on a busy
    /// machine: on two cores, `serve`'s p99 at 3,000 events/s went from
    /// about 30 ms with one or two workers to over 200 ms with eight.
    pub fn default_workers() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        cores.max(2)
    }
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            parallel: StageConfig::default_workers(),
            poison_attempts: 3,
            overtake_after: Duration::from_millis(100),
            max_queued: 1024,
        }
    }
}

/// Workers added at most, each for an event stuck in the plugin.
const MAX_EXTRA_WORKERS: usize = 16;

/// A fixed set of mapping workers, shared by every stage made on it. The
/// workers end when the pool is dropped (after the map each is in).
pub struct MappingPool {
    shared: Arc<Pool>,
}

struct Pool {
    state: Mutex<PoolState>,
    /// Workers wait here for a stage with work (one is woken per stage
    /// queued: on two cores, waking every thread for every event cost more
    /// CPU than the mapping).
    work: Condvar,
}

#[derive(Default)]
struct PoolState {
    /// Stages with an event to map, each at most once (`State::scheduled`).
    ready: VecDeque<Arc<StageShared>>,
    closed: bool,
    /// Workers added for stuck events, still running.
    extra_workers: usize,
    /// Events stuck in the plugin now, across stages: as many extra
    /// workers as these are kept.
    stuck: usize,
}

impl MappingPool {
    /// A pool of `workers` threads (at least one).
    pub fn new(workers: usize) -> std::io::Result<Arc<MappingPool>> {
        let shared = Arc::new(Pool {
            state: Mutex::default(),
            work: Condvar::new(),
        });
        for n in 0..workers.max(1) {
            let pool = shared.clone();
            std::thread::Builder::new()
                .name(format!("mapping-{n}"))
                .spawn(move || pool.work(false))?;
        }
        Ok(Arc::new(MappingPool { shared }))
    }
}

impl Drop for MappingPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().expect("a mapping worker panicked")
    }

    /// Puts a stage in line for a worker.
    fn schedule(&self, stage: Arc<StageShared>) {
        self.lock().ready.push_back(stage);
        self.work.notify_one();
    }

    /// An event was found stuck: a worker is added in its place.
    fn stuck(self: &Arc<Self>) {
        let mut state = self.lock();
        state.stuck += 1;
        if state.extra_workers >= MAX_EXTRA_WORKERS || state.closed {
            return;
        }
        let pool = self.clone();
        let added = std::thread::Builder::new()
            .name("mapping-extra".into())
            .spawn(move || pool.work(true));
        match added {
            Ok(_) => state.extra_workers += 1,
            Err(e) => tracing::warn!("could not add a mapping worker for a stuck event: {e}"),
        }
    }

    /// A stuck event is done: an extra worker may no longer be needed.
    fn unstuck(&self) {
        self.lock().stuck -= 1;
        self.work.notify_all();
    }

    /// One worker: the stage at the front of the line, one event of it, in
    /// turn. An `extra` one ends as soon as it is no longer needed.
    fn work(&self, extra: bool) {
        loop {
            let stage = {
                let mut state = self.lock();
                loop {
                    if extra && (state.closed || state.extra_workers > state.stuck) {
                        state.extra_workers -= 1;
                        return;
                    }
                    if let Some(stage) = state.ready.pop_front() {
                        break stage;
                    }
                    if state.closed {
                        return;
                    }
                    state = self.work.wait(state).expect("a mapping worker panicked");
                }
            };
            stage.map_one(self);
        }
    }
}

/// An event read and not yet started.
struct Queued {
    seq: u64,
    event: Prepared,
}

/// An event ready to go into a stage: its envelope is read by whoever
/// pushes it, outside the stage's lock.
pub struct Prepared(Box<Read>);

struct Read {
    key: Option<String>,
    id: EventId,
    text: String,
    envelope: Result<Envelope, String>,
}

impl Prepared {
    pub fn new(id: EventId, text: String) -> Prepared {
        let envelope = Envelope::read(id, &text);
        let key = envelope.as_ref().ok().and_then(Envelope::person_key);
        Prepared(Box::new(Read {
            key,
            id,
            text,
            envelope,
        }))
    }

    fn key(&self) -> Option<&String> {
        self.0.key.as_ref()
    }
}

/// An event read and not yet handed on, in input order.
enum Slot {
    Waiting { since: Instant, key: Option<String> },
    Mapping { since: Instant },
    Done(Box<(MappedEvent, String)>),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Person keys with an event being mapped.
    busy: HashSet<String>,
    /// By input order.
    slots: BTreeMap<u64, Slot>,
    /// Overtaken and still being mapped (or waiting).
    overtaken: HashSet<u64>,
    /// Overtaken and now done: handed on next.
    late: VecDeque<Box<(MappedEvent, String)>>,
    next_seq: u64,
    /// Events being mapped now.
    mapping: usize,
    /// In the pool's line (or being served by a worker that will put it
    /// back if it has more).
    scheduled: bool,
    input_done: bool,
    /// The consumer has gone, or the input failed: stop.
    stopped: bool,
    /// Events overtaken while the plugin was still mapping them, not done.
    stuck: HashSet<u64>,
}

impl State {
    fn unfinished(&self) -> usize {
        self.slots.len() + self.overtaken.len() + self.late.len()
    }
}

struct StageShared {
    mapper: EventMapper,
    config: StageConfig,
    pool: Arc<Pool>,
    /// Kept alive while the stage is (a pool made for it alone ends with it).
    _pool: Arc<MappingPool>,
    timed: Box<dyn Fn(Duration) + Send + Sync>,
    state: Mutex<State>,
    /// Events pushed so far.
    pushed: AtomicU64,
    /// The consumer waits here for a mapped event.
    ready: tokio::sync::Notify,
    /// `push_waiting` waits here for room.
    room: Condvar,
}

/// One stream of events on a pool: its consumer's side. Dropping it stops
/// the stage (what is unmapped is left).
pub struct Stage {
    shared: Arc<StageShared>,
}

/// Where a stage's events go in. Dropping it ends the input: the stage
/// ends once everything pushed has been handed on.
pub struct StageInput {
    shared: Arc<StageShared>,
}

/// Tells how many events a stage was given, for one who watches it idle.
#[derive(Clone)]
pub struct StageActivity {
    shared: Arc<StageShared>,
}

impl StageActivity {
    pub fn pushed(&self) -> u64 {
        self.shared.pushed.load(Ordering::Acquire)
    }
}

impl Stage {
    /// A stage mapping with `mapper` on `pool`; `timed` is told how long
    /// each mapping took.
    pub fn new(
        mapper: EventMapper,
        config: StageConfig,
        pool: Arc<MappingPool>,
        timed: impl Fn(Duration) + Send + Sync + 'static,
    ) -> (StageInput, Stage) {
        let shared = Arc::new(StageShared {
            mapper,
            config,
            pool: pool.shared.clone(),
            _pool: pool,
            timed: Box::new(timed),
            state: Mutex::default(),
            pushed: AtomicU64::new(0),
            ready: tokio::sync::Notify::new(),
            room: Condvar::new(),
        });
        (StageInput { shared: shared.clone() }, Stage { shared })
    }

    pub fn activity(&self) -> StageActivity {
        StageActivity {
            shared: self.shared.clone(),
        }
    }

    /// The next event in order (see the module's text), once it is mapped;
    /// None at the end of the input, or when the stage stopped. Nothing is
    /// lost if the future is dropped before it is ready.
    pub async fn next(&self) -> Option<(MappedEvent, String)> {
        loop {
            let notified = self.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.shared.take_next() {
                Next::Event(event) => return Some(*event),
                Next::End => return None,
                Next::WaitAtMost(wait) => {
                    let _ = tokio::time::timeout(wait.max(Duration::from_millis(1)), notified).await;
                }
            }
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

impl StageInput {
    /// Puts an event in, without waiting for room; gives it back if the
    /// stage has stopped.
    pub fn push(&self, event: Prepared) -> Result<(), Prepared> {
        let state = self.shared.lock();
        self.shared.push_locked(state, event)
    }

    /// Puts an event in once fewer than `max_queued` are unfinished; false
    /// if the stage has stopped.
    pub fn push_waiting(&self, event: Prepared) -> bool {
        let mut state = self.shared.lock();
        while state.unfinished() >= self.shared.config.max_queued && !state.stopped {
            state = self.shared.room.wait(state).expect("a mapping worker panicked");
        }
        self.shared.push_locked(state, event).is_ok()
    }

    /// The input failed: the stage stops, handing on nothing more.
    pub fn fail(self) {
        self.shared.stop();
    }
}

impl Drop for StageInput {
    fn drop(&mut self) {
        self.shared.lock().input_done = true;
        self.shared.ready.notify_one();
    }
}

/// What the consumer finds.
enum Next {
    Event(Box<(MappedEvent, String)>),
    End,
    /// Nothing yet; look again when told, or after this long (an event may
    /// be overtaken then).
    WaitAtMost(Duration),
}

impl StageShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("a mapping worker panicked")
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.ready.notify_one();
        self.room.notify_all();
    }

    /// The events this stage may map at once now: one more for each stuck
    /// in the plugin, but never more than its mapper's own gate lets call
    /// at once. A worker is the pool's, shared by every stage: one that
    /// waited at a connection's gate (behind that connection's event
    /// looping into its deadline) would hold up every other connection.
    fn limit(&self, state: &State) -> usize {
        let wanted = self.config.parallel.max(1) + state.stuck.len();
        wanted.min(self.mapper.max_calls().unwrap_or(usize::MAX))
    }

    /// Whether a worker would find an event of this stage to map now.
    fn has_work(&self, state: &State) -> bool {
        !state.stopped
            && state.mapping < self.limit(state)
            && state
                .queue
                .iter()
                .any(|q| q.event.key().is_none_or(|key| !state.busy.contains(key)))
    }

    /// Puts this stage in the pool's line if it has work and is not there.
    fn schedule_if_needed(self: &Arc<Self>, mut state: MutexGuard<'_, State>) {
        if state.scheduled || !self.has_work(&state) {
            return;
        }
        state.scheduled = true;
        drop(state);
        self.pool.schedule(self.clone());
    }

    fn push_locked(self: &Arc<Self>, mut state: MutexGuard<'_, State>, event: Prepared) -> Result<(), Prepared> {
        if state.stopped || state.input_done {
            return Err(event);
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.slots.insert(
            seq,
            Slot::Waiting {
                since: Instant::now(),
                key: event.key().cloned(),
            },
        );
        let free = event.key().is_none_or(|key| !state.busy.contains(key));
        state.queue.push_back(Queued { seq, event });
        self.pushed.fetch_add(1, Ordering::Release);
        if free && !state.scheduled && !state.stopped && state.mapping < self.limit(&state) {
            state.scheduled = true;
            drop(state);
            self.pool.schedule(self.clone());
        }
        Ok(())
    }

    /// On a worker: maps the first queued event whose person is not being
    /// mapped, then puts the stage back in line if it has more.
    fn map_one(self: &Arc<Self>, pool: &Pool) {
        let mut state = self.lock();
        let limit = self.limit(&state);
        let free = state
            .queue
            .iter()
            .position(|q| q.event.key().is_none_or(|key| !state.busy.contains(key)));
        let index = match free {
            Some(index) if !state.stopped && state.mapping < limit => index,
            _ => {
                state.scheduled = false;
                return;
            }
        };
        let job = state.queue.remove(index).expect("found above");
        if let Some(key) = job.event.key() {
            state.busy.insert(key.clone());
        }
        if let Some(slot) = state.slots.get_mut(&job.seq) {
            *slot = Slot::Mapping { since: Instant::now() };
        }
        state.mapping += 1;
        // More for another worker: back in line now, behind the others.
        if self.has_work(&state) {
            drop(state);
            pool.schedule(self.clone());
        } else {
            state.scheduled = false;
            drop(state);
        }

        let seq = job.seq;
        let Read {
            key,
            id,
            text,
            envelope,
        } = *job.event.0;
        let started = Instant::now();
        let mut mapped = self.map(id, &text, envelope);
        (self.timed)(started.elapsed());

        let mut state = self.lock();
        state.mapping -= 1;
        if let Some(key) = &key {
            state.busy.remove(key);
        }
        mapped.person = key;
        let was_stuck = state.stuck.remove(&seq);
        if state.overtaken.remove(&seq) {
            state.late.push_back(Box::new((mapped, text)));
        } else {
            state.slots.insert(seq, Slot::Done(Box::new((mapped, text))));
        }
        self.ready.notify_one();
        self.schedule_if_needed(state);
        if was_stuck {
            pool.unstuck();
        }
    }

    /// Maps one event, again with a fresh instance while the plugin fails
    /// (reading the envelope again then: failures are rare, events many).
    fn map(&self, id: EventId, text: &str, envelope: Result<Envelope, String>) -> MappedEvent {
        let attempts = self.config.poison_attempts.max(1);
        let mut mapped = self.mapper.map_read(id, text, envelope);
        let mut tries = 1;
        while mapped.plugin_failed && tries < attempts {
            mapped = self.mapper.map(id, text);
            tries += 1;
        }
        if mapped.plugin_failed
            && let MappedOutcome::Error(reason) = &mut mapped.outcome
        {
            reason.push_str(&format!(" (poison: failed {tries} times with fresh instances)"));
        }
        mapped
    }

    /// The next event to hand on, in input order, letting the ones behind
    /// an event that takes too long overtake it.
    fn take_next(self: &Arc<Self>) -> Next {
        let overtake_after = self.config.overtake_after;
        let mut state = self.lock();
        if state.stopped {
            return Next::End;
        }
        if let Some(event) = state.late.pop_front() {
            drop(state);
            self.room.notify_one();
            return Next::Event(event);
        }
        let mut newly_stuck = 0;
        let mut wait = overtake_after;
        let fields = &mut *state;
        let mut found = None;
        while let Some(entry) = fields.slots.first_entry() {
            let held_since = match entry.get() {
                Slot::Done(_) => None,
                Slot::Mapping { since } => Some(*since),
                // Waiting for a worker is not being stuck; waiting behind
                // the same person's stuck event is.
                Slot::Waiting { since, key } => match key {
                    Some(key) if fields.busy.contains(key) => Some(*since),
                    _ => break,
                },
            };
            match held_since {
                None => {
                    let Slot::Done(done) = entry.remove() else {
                        unreachable!()
                    };
                    found = Some(done);
                    break;
                }
                Some(since) if since.elapsed() >= overtake_after => {
                    let seq = *entry.key();
                    let stuck = matches!(entry.remove(), Slot::Mapping { .. });
                    fields.overtaken.insert(seq);
                    if stuck {
                        fields.stuck.insert(seq);
                        newly_stuck += 1;
                    }
                }
                Some(since) => {
                    wait = overtake_after.saturating_sub(since.elapsed());
                    break;
                }
            }
        }
        let end = found.is_none() && state.input_done && state.unfinished() == 0;
        if newly_stuck > 0 {
            // Counted in the pool before the lock goes, so that the worker
            // finishing one cannot take it off first.
            for _ in 0..newly_stuck {
                self.pool.stuck();
            }
            // The stage may map one more at once for each: whatever waited
            // for room in it goes to the line.
            self.schedule_if_needed(state);
        } else {
            drop(state);
        }
        match found {
            Some(event) => {
                self.room.notify_one();
                Next::Event(event)
            }
            None if end => Next::End,
            None => Next::WaitAtMost(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicUsize;

    use plugin_runtime::{PluginSlot, Runtime, RuntimeConfig};
    use serde_json::json;

    use super::*;
    use crate::settings::DestinationSettings;

    fn mapper() -> EventMapper {
        static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
        let runtime = RUNTIME.get_or_init(|| {
            Runtime::new(RuntimeConfig {
                concurrency: 8,
                cache_dir: Some(std::env::temp_dir().join("cdp-host-stage-tests")),
                ..RuntimeConfig::default()
            })
            .unwrap()
        });
        let plugin = Arc::new(
            runtime
                .load(&std::fs::read(plugin_fixtures::KLAVIYO).unwrap(), "bundled")
                .unwrap(),
        );
        let settings = json!({"api_key": "pk_test"}).as_object().unwrap().clone();
        let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
        let canary = plugin_runtime::Canary {
            settings_json: settings.public_json().to_string(),
            golden_events: "".into(),
        };
        let slot = PluginSlot::new(plugin, canary);
        EventMapper::new(slot, settings)
    }

    /// A sendable track of one of seven people.
    fn event(n: u64) -> Prepared {
        let text = json!({
            "type": "track",
            "event": "Order Completed",
            "messageId": format!("m{n}"),
            "userId": format!("u{}", n % 7),
            "context": {"traits": {"email": format!("u{}@example.com", n % 7)}},
            "properties": {"order_id": format!("o{n}"), "total": 42},
        });
        Prepared::new(EventId::Line(n), text.to_string())
    }

    fn stage(pool: &Arc<MappingPool>, parallel: usize, mapped: Arc<AtomicUsize>) -> (StageInput, Stage) {
        let config = StageConfig {
            parallel,
            ..StageConfig::default()
        };
        Stage::new(mapper(), config, pool.clone(), move |_| {
            mapped.fetch_add(1, Ordering::Relaxed);
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_leave_in_the_order_they_came_and_the_stage_ends_with_its_input() {
        let pool = MappingPool::new(2).unwrap();
        let (input, stage) = stage(&pool, 2, Arc::default());
        for n in 0..300 {
            input.push(event(n)).ok().unwrap();
        }
        drop(input);
        let mut seen = Vec::new();
        while let Some((mapped, text)) = stage.next().await {
            assert!(text.contains(&format!("\"m{}\"", mapped.id.number())), "{text}");
            seen.push(mapped.id.number());
        }
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
    }

    /// Two streams on one pool of two workers: the one with a long backlog
    /// and room to use both workers does not keep the other's single event
    /// waiting behind it; the pool serves the stages in turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_with_a_backlog_does_not_hold_up_another_on_the_same_pool() {
        let pool = MappingPool::new(2).unwrap();
        let busy_mapped = Arc::new(AtomicUsize::new(0));
        let (busy_input, busy) = stage(&pool, 2, busy_mapped.clone());
        // What the backlog's count was when the other stage's event was
        // mapped (its `timed` is called on the worker, right after).
        let seen_then = Arc::new(AtomicUsize::new(0));
        let (quiet_input, quiet) = {
            let (busy_mapped, seen_then) = (busy_mapped.clone(), seen_then.clone());
            Stage::new(mapper(), StageConfig::default(), pool.clone(), move |_| {
                seen_then.store(busy_mapped.load(Ordering::Relaxed), Ordering::Relaxed);
            })
        };
        // Each stage's first event also makes its plugin instance: out of
        // the way before the race.
        quiet_input.push(event(0)).ok().unwrap();
        quiet.next().await.unwrap();
        busy_input.push(event(0)).ok().unwrap();
        busy.next().await.unwrap();
        let backlog: Vec<Prepared> = (1..2_000).map(event).collect();
        let single = event(1);
        for event in backlog {
            busy_input.push(event).ok().unwrap();
        }
        let at_push = busy_mapped.load(Ordering::Relaxed);
        quiet_input.push(single).ok().unwrap();
        let (mapped, _) = quiet.next().await.unwrap();
        assert_eq!(mapped.id, EventId::Line(1));
        let meanwhile = seen_then.load(Ordering::Relaxed) - at_push;
        assert!(
            at_push < 1_900 && meanwhile < 10,
            "{meanwhile} of the backlog were mapped while the other stage's one waited ({at_push} before it came)"
        );
        drop((busy_input, quiet_input));
        let mut rest = 0;
        while busy.next().await.is_some() {
            rest += 1;
        }
        assert_eq!(rest, 1_999);
        assert!(quiet.next().await.is_none());
    }

    /// A stage whose consumer has gone takes nothing more, and the pool's
    /// workers go on serving the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_stage_stops_and_the_pool_serves_the_rest() {
        let pool = MappingPool::new(2).unwrap();
        let (gone_input, gone) = stage(&pool, 2, Arc::default());
        for n in 0..500 {
            gone_input.push(event(n)).ok().unwrap();
        }
        drop(gone);
        assert!(gone_input.push(event(500)).is_err());
        let (input, stage) = stage(&pool, 1, Arc::default());
        input.push(event(7)).ok().unwrap();
        drop(input);
        assert_eq!(stage.next().await.unwrap().0.id, EventId::Line(7));
        assert!(stage.next().await.is_none());
    }

    /// A connection whose event makes the plugin loop, with a backlog of
    /// other people's events, holds its own share of calls (one) and no
    /// more of the pool's workers: another connection's event is mapped at
    /// once, not after the loop. (A worker once waited at the looping
    /// connection's gate for each of its events; the workers added for
    /// stuck events went the same way, until none was left.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_looping_in_its_plugin_leaves_the_pool_to_the_others() {
        use crate::mapping::{CallGate, CallGates};
        let runtime = Runtime::new(RuntimeConfig {
            concurrency: 32,
            limits: plugin_runtime::Limits {
                deadline: Duration::from_millis(3_000),
                ..plugin_runtime::Limits::default()
            },
            cache_dir: Some(std::env::temp_dir().join("cdp-host-stage-tests")),
            ..RuntimeConfig::default()
        })
        .unwrap();
        let hostile = Arc::new(
            runtime
                .load(&std::fs::read(plugin_fixtures::HOSTILE).unwrap(), "hostile")
                .unwrap(),
        );
        let settings = DestinationSettings::from_object(Default::default(), hostile.manifest(), &[], |_| None).unwrap();
        let canary = plugin_runtime::Canary {
            settings_json: settings.public_json().to_string(),
            golden_events: "".into(),
        };
        let host = CallGate::new(64);
        let mapper = |own| {
            EventMapper::new(PluginSlot::new(hostile.clone(), canary.clone()), settings.clone()).with_gates(CallGates {
                own: CallGate::new(own),
                host: host.clone(),
            })
        };
        // One attempt: the loop holds its call for the whole deadline.
        let config = StageConfig {
            parallel: 1,
            poison_attempts: 1,
            ..StageConfig::default()
        };
        let pool = MappingPool::new(2).unwrap();
        let (victim_input, victim) = Stage::new(mapper(1), config.clone(), pool.clone(), |_| {});
        let (other_input, other) = Stage::new(mapper(1), config, pool.clone(), |_| {});
        let event = |n: u64, extra: serde_json::Value| {
            let mut event =
                json!({"type": "track", "event": "Viewed", "messageId": format!("m{n}"), "userId": format!("p{n}")});
            event
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Prepared::new(EventId::Line(n), event.to_string())
        };
        victim_input.push(event(0, json!({"misbehave": "loop"}))).ok().unwrap();
        for n in 1..40 {
            victim_input.push(event(n, json!({}))).ok().unwrap();
        }
        drop(victim_input);
        // The victim's consumer, as its engine runs it: it finds the loop
        // stuck, which is when more may be asked of the pool.
        let drained = tokio::spawn(async move { while victim.next().await.is_some() {} });
        // Well into the loop's deadline: long enough for every worker the
        // pool may add to have been taken, had the victim been let.
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        let started = Instant::now();
        other_input.push(event(100, json!({}))).ok().unwrap();
        let (mapped, _) = other.next().await.unwrap();
        let took = started.elapsed();
        assert_eq!(mapped.id, EventId::Line(100));
        assert!(
            took < Duration::from_millis(500),
            "the other connection's event waited {took:?}"
        );
        drained.await.unwrap();
    }

    #[test]
    fn the_default_stage_maps_on_every_core() {
        assert_eq!(StageConfig::default().parallel, StageConfig::default_workers());
    }
}
