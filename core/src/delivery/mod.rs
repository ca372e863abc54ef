//! Delivering what the plugin describes: each event is mapped, its requests
//! are sent in order, and each response is judged by the plugin's
//! `interpret` (delivered, retry, rejected, or replace). The host stays
//! generic: pacing comes from the budgets the plugin declares, ordering
//! from the key it returns, and it sends only to the hosts the plugin
//! declares (or the one base URL the operator names instead).
//!
//! Nothing is dropped silently: every event read ends delivered, skipped
//! (with the plugin's reason) or dead-lettered (a `DeadLetter` value in its
//! record: the request, the answer and the reason), and the report's counts
//! add up to the input.

mod batch;
mod outcome;
mod pacing;
mod request;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use plugin_runtime::PluginSlot;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use outcome::{DeadLetter, EventOutcome, EventRecord, Report, Trace, TracedRequest};
pub use pacing::{Budgets, Pacer};
pub use stats::{BUCKETS, Histogram, Progress};

use crate::mapping::{
    CallGates, EventId, EventMapper, MappedEvent, MappedOutcome, MappingPool, Prepared, Stage, StageConfig, StageInput,
    line_text,
};
use crate::settings::{DestinationSettings, SettingsCell};
use crate::shown::ShownRequest;

/// How hard delivery tries, and how much at once.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Send every request to this base URL (scheme, host, port) instead of
    /// the plugin's declared host: the operator's one approved override,
    /// e.g. a local stand-in of the destination.
    pub base_url: Option<url::Url>,
    /// Events in flight at once.
    pub concurrency: usize,
    /// Pace requests to the budgets the plugin declares. Off only against
    /// a destination with no limits (the sandbox with its limits off).
    pub pacing: bool,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Time a request may spend being retried before it is dead-lettered.
    pub max_retry_time: Duration,
    /// First backoff step; doubles per attempt, with full jitter.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Per HTTP attempt.
    pub request_timeout: Duration,
    /// Times an event is mapped again after the plugin itself failed
    /// (trap, deadline) before it is dead-lettered as poison.
    pub poison_attempts: u32,
    /// Events of this delivery mapped at once (see `Stage`); also the
    /// workers of the pool made for it when it shares none (`Parts`).
    pub mapping_workers: usize,
    /// Send every request the plugin can batch in a batch, even at a
    /// trickle (a backfill); otherwise batches form only under a backlog.
    pub batch_always: bool,
    /// Events read and not yet mapped and handed on, at most: memory per
    /// delivery, which matters when many run at once (`StageConfig`).
    pub mapping_queue: usize,
    /// Keep each event's trace on its record (`EventRecord::trace`): the
    /// event, the requests it sent (shared, not copied; masked when shown)
    /// and the answers. Off unless something shows them.
    pub trace: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            base_url: None,
            concurrency: 64,
            pacing: true,
            max_attempts: 10,
            max_retry_time: Duration::from_secs(300),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            poison_attempts: 3,
            mapping_workers: StageConfig::default_workers(),
            batch_always: false,
            mapping_queue: StageConfig::default().max_queued,
            trace: false,
        }
    }
}

/// Sends events through whichever version a slot holds.
pub struct Delivery {
    slot: Arc<PluginSlot>,
    settings: SettingsCell,
    config: DeliveryConfig,
    client: reqwest::Client,
    /// The budget this destination account's requests are paced by,
    /// shared by every connection with the same key (see `Budgets`).
    pacer: arc_swap::ArcSwap<Pacer>,
    /// Bounds the interpreting instances in use within the runtime's
    /// instance slots.
    interpreters: tokio::sync::Semaphore,
    /// The host's bound on interpreting calls, shared by deliveries.
    host_interpreters: Option<Arc<tokio::sync::Semaphore>>,
    requests_sent: AtomicU64,
    pub progress: Arc<Progress>,
    /// Told when the destination asks for an event not to be sent again
    /// before a time (Retry-After), so that a caller can keep it.
    deferred: Option<DeferObserver>,
    /// Batch queues per plugin version (by SHA-256), for plugins that batch.
    batching: std::sync::Mutex<HashMap<String, Arc<batch::PluginBatching>>>,
    /// Events kept in flight beyond `concurrency` so that batches can fill.
    batch_room: std::sync::atomic::AtomicUsize,
    map_gates: Option<CallGates>,
    fence: Option<Fence>,
    not_before: Option<NotBefore>,
    hold: Option<Hold>,
    mapping_pool: Option<Arc<MappingPool>>,
}

/// When an event may first be sent, if not at once (a Retry-After its
/// log kept): delivery waits, holding the person's later events behind
/// it. Asked once per event, before its first request.
pub type NotBefore = Arc<dyn Fn(EventId) -> Option<std::time::SystemTime> + Send + Sync>;

/// Whether an event may still be sent from this host, asked right before
/// each attempt: set once (a stream worker sets it when it starts, for
/// every connection), absent for everything else.
pub type Fence = Arc<std::sync::OnceLock<Box<dyn Fn(EventId) -> bool + Send + Sync>>>;

/// Set while no request may leave: the outcomes of those sent cannot be
/// recorded (a full disk), and an event sent now could be sent again after
/// a crash, behind its person's newer events. Requests wait, in order.
pub type Hold = Arc<std::sync::atomic::AtomicBool>;

/// What a delivery may share with others: the HTTP client, the budget of
/// the account it sends to, its counters; and who is told of Retry-After.
#[derive(Default)]
pub struct Parts {
    pub client: Option<reqwest::Client>,
    pub pacer: Option<Arc<Pacer>>,
    pub progress: Option<Arc<Progress>>,
    pub deferred: Option<DeferObserver>,
    /// Bounds this delivery's plugin calls in progress, and everyone's.
    pub map_gates: Option<CallGates>,
    /// Bounds everyone's interpreting calls in progress (this delivery's
    /// own are bounded anyway).
    pub host_interpreters: Option<Arc<tokio::sync::Semaphore>>,
    /// Asked before each attempt whether the event may still be sent.
    pub fence: Option<Fence>,
    /// Asked before an event's first request when it may be sent.
    pub not_before: Option<NotBefore>,
    /// While set, no request leaves (see `Hold`).
    pub hold: Option<Hold>,
    /// The workers that map its events, shared with other deliveries;
    /// without one, each run makes a pool of `mapping_workers` of its own.
    pub mapping_pool: Option<Arc<MappingPool>>,
}

/// Resolves once an event's outcome is recorded where whoever delivers its
/// events next reads it (a spool row written; on the stream, its record
/// stored and its ack confirmed), or once the event is no longer in flight
/// at all (its sender dropped). `deliver_stage` holds the person's next
/// event until then, so that this event is never out and unrecorded behind
/// a newer one of its person: a crash sends again only it, their newest.
pub type Settling = tokio::sync::oneshot::Receiver<()>;

/// Called with an event and the time before which it must not be resent.
pub type DeferObserver = Box<dyn Fn(EventId, std::time::SystemTime) + Send + Sync>;

impl Delivery {
    /// Delivers through whichever version `slot` holds (see hot swap).
    pub fn new(
        slot: Arc<PluginSlot>,
        settings: DestinationSettings,
        config: DeliveryConfig,
    ) -> anyhow::Result<Arc<Delivery>> {
        Delivery::build(slot, crate::settings::cell(settings), config, Parts::default())
    }

    /// The same, telling `deferred` of each Retry-After (`serve` persists
    /// it, so that a restart does not resend sooner than it was asked).
    pub fn with_deferrals(
        slot: Arc<PluginSlot>,
        settings: DestinationSettings,
        config: DeliveryConfig,
        deferred: DeferObserver,
    ) -> anyhow::Result<Arc<Delivery>> {
        let parts = Parts {
            deferred: Some(deferred),
            ..Parts::default()
        };
        Delivery::build(slot, crate::settings::cell(settings), config, parts)
    }

    /// Delivers with settings that may be replaced while it runs, and with
    /// what it may share with other deliveries (`Parts`).
    pub fn build(
        slot: Arc<PluginSlot>,
        settings: SettingsCell,
        config: DeliveryConfig,
        parts: Parts,
    ) -> anyhow::Result<Arc<Delivery>> {
        let plugin = slot.current().plugin.clone();
        let missing = settings.load().missing_for_send(plugin.manifest());
        if !missing.is_empty() {
            anyhow::bail!("{plugin} cannot send without: {}", missing.join(", "));
        }
        let client = match parts.client {
            Some(client) => client,
            None => Delivery::client(&config)?,
        };
        // An interpret call takes microseconds, so a few instances judge
        // every answer of a busy run; each one more costs its linear
        // memory (about a megabyte). Two per core, within half the slots.
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let slots = (plugin.runtime().instance_slots() / 2).saturating_sub(2).max(1) as usize;
        let interpreters = cores.min(slots);
        Ok(Arc::new(Delivery {
            slot,
            settings,
            config,
            client,
            pacer: arc_swap::ArcSwap::new(parts.pacer.unwrap_or_default()),
            interpreters: tokio::sync::Semaphore::new(interpreters),
            host_interpreters: parts.host_interpreters,
            requests_sent: AtomicU64::new(0),
            progress: parts.progress.unwrap_or_default(),
            deferred: parts.deferred,
            batching: Default::default(),
            batch_room: Default::default(),
            map_gates: parts.map_gates,
            fence: parts.fence,
            not_before: parts.not_before,
            hold: parts.hold,
            mapping_pool: parts.mapping_pool,
        }))
    }

    /// Whether the fence (if any) lets `id` be sent now.
    fn may_send(&self, id: EventId) -> bool {
        match self.fence.as_ref().and_then(|fence| fence.get()) {
            Some(fence) => fence(id),
            None => true,
        }
    }

    /// The HTTP client a delivery sends with (one may serve many).
    pub fn client(config: &DeliveryConfig) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("cdp-host/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(config.concurrency.max(1))
            .build()?)
    }

    /// New settings (an update, a rotated key), from the next call and the
    /// next request on; with the budget of the account they send to.
    pub fn update_settings(&self, settings: DestinationSettings, pacer: Arc<Pacer>) -> anyhow::Result<()> {
        let plugin = self.slot.current().plugin.clone();
        let missing = settings.missing_for_send(plugin.manifest());
        if !missing.is_empty() {
            anyhow::bail!("{plugin} cannot send without: {}", missing.join(", "));
        }
        self.settings.store(Arc::new(settings));
        self.pacer.store(pacer);
        Ok(())
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<DestinationSettings> {
        self.settings.load_full()
    }

    /// The slot holding the active version, for swapping and rollback.
    pub fn slot(&self) -> &Arc<PluginSlot> {
        &self.slot
    }

    /// Maps and delivers every line of `input` (numbered from 1), calling
    /// `observe` with each event's record as it completes.
    pub async fn run(
        self: &Arc<Self>,
        input: impl BufRead + Send + 'static,
        observe: impl Fn(&EventRecord) + Send + Sync,
    ) -> anyhow::Result<Report> {
        let lines = input.split(b'\n').enumerate().map(|(index, line)| {
            let bytes = line?;
            Ok((EventId::Line(index as u64 + 1), line_text(&bytes).into_owned()))
        });
        self.run_events(lines, observe).await
    }

    /// Maps and delivers a stream of (id, event text), in order per person,
    /// until the stream ends.
    pub async fn run_events(
        self: &Arc<Self>,
        events: impl Iterator<Item = anyhow::Result<(EventId, String)>> + Send + 'static,
        observe: impl Fn(&EventRecord) + Send + Sync,
    ) -> anyhow::Result<Report> {
        let (input, stage) = self.stage()?;
        // The input may block (a file, a pipe): it is read on a thread of
        // its own, which waits while the stage has too much unfinished.
        let (done, read) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("mapping-reader".into())
            .spawn(move || {
                for event in events {
                    match event {
                        Ok((id, text)) => {
                            if !input.push_waiting(Prepared::new(id, text)) {
                                break;
                            }
                        }
                        Err(e) => {
                            input.fail();
                            let _ = done.send(Err(e));
                            return;
                        }
                    }
                }
                drop(input);
                let _ = done.send(Ok(()));
            })
            .map_err(|e| anyhow::anyhow!("starting the mapping reader: {e}"))?;
        let report = self
            .deliver_stage(stage, |record| {
                observe(record);
                None
            })
            .await?;
        read.await
            .map_err(|_| anyhow::anyhow!("the mapping reader ended without a word"))??;
        Ok(report)
    }

    /// A stage that maps this delivery's events (see `Stage`): on the pool
    /// it shares, or on one of its own. What is pushed into the input is
    /// delivered by `deliver_stage`.
    pub fn stage(self: &Arc<Self>) -> anyhow::Result<(StageInput, Stage)> {
        let mut mapper = EventMapper::with_cell(self.slot.clone(), self.settings.clone());
        if let Some(gates) = &self.map_gates {
            mapper = mapper.with_gates(gates.clone());
        }
        // Batches form only when delivery is paced (or told to batch
        // always); otherwise asking the plugin is wasted work.
        if self.config.pacing || self.config.batch_always {
            mapper = mapper.with_batch_items();
        }
        let pool = match &self.mapping_pool {
            Some(pool) => pool.clone(),
            None => MappingPool::new(self.config.mapping_workers)
                .map_err(|e| anyhow::anyhow!("starting the mapping workers: {e}"))?,
        };
        let progress = self.progress.clone();
        Ok(Stage::new(
            mapper,
            StageConfig {
                parallel: self.config.mapping_workers,
                poison_attempts: self.config.poison_attempts,
                max_queued: self.config.mapping_queue,
                ..StageConfig::default()
            },
            pool,
            move |took| progress.map_seconds.observe(took),
        ))
    }

    /// Delivers what `stage` maps, in order per person, until its input
    /// ends (or it stops). `observe` is shown each event's record as it
    /// completes, and may answer with when that outcome is recorded
    /// (`Settling`): the person's next event waits until then.
    pub async fn deliver_stage(
        self: &Arc<Self>,
        stage: Stage,
        observe: impl Fn(&EventRecord) -> Option<Settling> + Send + Sync,
    ) -> anyhow::Result<Report> {
        let started = Instant::now();
        let mut report = Report::default();
        let mut lanes: HashMap<String, VecDeque<(MappedEvent, String)>> = HashMap::new();
        // Events waiting in a lane behind their person's event in flight:
        // bounded too (eight times the room in flight), so that memory stays
        // bounded when people's events are slow, without letting a few
        // busy people take the room of everyone else.
        let mut waiting = 0usize;
        let mut running: JoinSet<(Option<String>, EventRecord)> = JoinSet::new();
        // People whose last event's outcome is not recorded yet, when the
        // observer asked for that: their lanes stay, their next events wait.
        let mut settling: JoinSet<String> = JoinSet::new();
        let mut input_done = false;
        loop {
            let room = self.config.concurrency + self.batch_room.load(Ordering::Relaxed);
            tokio::select! {
                job = stage.next(), if !input_done && running.len() < room && waiting < 8 * room => {
                    let Some((mapped, raw)) = job else {
                        input_done = true;
                        continue;
                    };
                    report.read += 1;
                    self.progress.read.fetch_add(1, Ordering::Relaxed);
                    match &mapped.ordering_key {
                        Some(key) if lanes.contains_key(key) => {
                            lanes.get_mut(key).unwrap().push_back((mapped, raw));
                            waiting += 1;
                        }
                        Some(key) => {
                            lanes.insert(key.clone(), VecDeque::new());
                            self.spawn_event(&mut running, mapped, raw);
                        }
                        None => self.spawn_event(&mut running, mapped, raw),
                    }
                }
                Some(done) = running.join_next() => {
                    let (key, record) = done?;
                    report.count(&record);
                    self.progress.count(&record);
                    let recorded = observe(&record);
                    match (key, recorded) {
                        (Some(key), Some(recorded)) => {
                            settling.spawn(async move {
                                // A sender dropped unsent says the same: the
                                // event is no longer in flight.
                                let _ = recorded.await;
                                key
                            });
                        }
                        (Some(key), None) => self.next_in_lane(&mut lanes, &key, &mut waiting, &mut running),
                        (None, _) => {}
                    }
                }
                Some(settled) = settling.join_next() => {
                    self.next_in_lane(&mut lanes, &settled?, &mut waiting, &mut running);
                }
                else => break,
            }
        }
        report.requests_sent = self.requests_sent.load(Ordering::Relaxed);
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Sends the next event of a person whose last one is finished, or
    /// closes their lane.
    fn next_in_lane(
        self: &Arc<Self>,
        lanes: &mut HashMap<String, VecDeque<(MappedEvent, String)>>,
        key: &str,
        waiting: &mut usize,
        running: &mut JoinSet<(Option<String>, EventRecord)>,
    ) {
        match lanes.get_mut(key).and_then(VecDeque::pop_front) {
            Some((mapped, raw)) => {
                *waiting -= 1;
                self.spawn_event(running, mapped, raw);
            }
            None => {
                lanes.remove(key);
            }
        }
    }

    fn spawn_event(
        self: &Arc<Self>,
        running: &mut JoinSet<(Option<String>, EventRecord)>,
        mapped: MappedEvent,
        raw: String,
    ) {
        let this = self.clone();
        running.spawn(async move {
            let key = mapped.ordering_key.clone();
            let record = this.deliver_event(mapped, raw).await;
            (key, record)
        });
    }

    /// Delivers one mapped event; `raw` is its text as received, kept for
    /// its dead letter.
    async fn deliver_event(self: &Arc<Self>, mapped: MappedEvent, mut raw: String) -> EventRecord {
        let settings = self.settings.load_full();
        let mut record = EventRecord {
            id: mapped.id,
            message_id: mapped.message_id.clone(),
            kind: mapped.kind.clone(),
            outcome: EventOutcome::Skipped(String::new()),
            warnings: mapped.warnings.iter().map(|w| settings.scrub(w)).collect(),
            retries: 0,
            plugin_version: format!("{}@{}", mapped.plugin.manifest().name, mapped.plugin.manifest().version),
            trace: None,
        };
        let mut trace = self.config.trace.then(|| Trace {
            person: mapped.person.clone(),
            ..Trace::default()
        });
        // The event's text for a dead letter: moved there, unless the trace
        // keeps it too.
        let letter_text = |raw: &mut String, traced: bool| {
            if traced { raw.clone() } else { std::mem::take(raw) }
        };
        let plugin = mapped.plugin.clone();
        record.outcome = match mapped.outcome {
            MappedOutcome::Skip(reason) => EventOutcome::Skipped(reason),
            MappedOutcome::Error(reason) => EventOutcome::DeadLettered(DeadLetter {
                reason: settings.scrub(&reason),
                event: letter_text(&mut raw, trace.is_some()),
                request: None,
                response: None,
            }),
            MappedOutcome::Send(requests) => {
                // Asked to wait (a Retry-After from before a restart): the
                // person's later events wait in its lane meanwhile.
                if let Some(until) = self.not_before.as_ref().and_then(|ask| ask(record.id))
                    && let Ok(wait) = until.duration_since(std::time::SystemTime::now())
                {
                    tokio::time::sleep(wait).await;
                }
                let started = Instant::now();
                let count = requests.len();
                let mut failed = None;
                let mut items = mapped.batch_items.into_iter();
                for request in requests {
                    let item = items.next().flatten();
                    let request = Arc::new(request);
                    let shown = trace.as_ref().map(|_| request.clone());
                    let batched = item.is_some();
                    let delivered = self
                        .deliver_request(record.id, &plugin, request, item, &mut record.retries)
                        .await;
                    let (undelivered, response) = match delivered {
                        Ok(response) => (None, response),
                        // Copied only for a trace; the dead letter keeps it.
                        Err(undelivered) => {
                            let response = shown.as_ref().and(undelivered.response.clone());
                            (Some(undelivered), response)
                        }
                    };
                    if let (Some(trace), Some(request)) = (trace.as_mut(), shown) {
                        trace.requests.push(TracedRequest {
                            request,
                            batched: batched && response.is_none() && undelivered.is_none(),
                            response,
                        });
                    }
                    if let Some(undelivered) = undelivered {
                        failed = Some(undelivered);
                        break;
                    }
                }
                self.progress.delivery_seconds.observe(started.elapsed());
                if let Some(trace) = trace.as_mut() {
                    trace.sending = started.elapsed();
                }
                match failed {
                    None => EventOutcome::Delivered { requests: count },
                    Some(undelivered) if undelivered.abandoned => EventOutcome::Abandoned(undelivered.reason),
                    Some(undelivered) => EventOutcome::DeadLettered(DeadLetter {
                        reason: settings.scrub(&undelivered.reason),
                        event: letter_text(&mut raw, trace.is_some()),
                        request: Some(ShownRequest::new(&undelivered.request, &settings)),
                        response: undelivered.response,
                    }),
                }
            }
        };
        if let Some(mut trace) = trace {
            trace.event = raw;
            record.trace = Some(Arc::new(trace));
        }
        record
    }
}
