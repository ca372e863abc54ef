//! Delivering what the plugin describes: each event is mapped, its requests
//! are sent in order, and each response is judged by the plugin's
//! `interpret` (delivered, retry, rejected, or replace). The host stays
//! generic: pacing comes from the budgets the plugin declares, ordering
//! from the key it returns, and it sends only to the hosts the plugin
//! declares (or the one base URL the operator names instead).
//!
//! Nothing is dropped silently: every event read ends delivered, skipped
//! (with the plugin's reason) or dead-lettered (with the request, the
//! answer and the reason), and the report's counts add up to the input.

mod dead_letter;
mod pacing;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use dead_letter::DeadLetters;
use pacing::Pacer;

use crate::dry_run::ShownRequest;
use crate::mapper::{EventMapper, MappedEvent, MappedOutcome};
use crate::plugin::{CallError, Header, HttpRequest, HttpResponse, Instance, Plugin, PluginSlot, Verdict};
use crate::settings::{DestinationSettings, Render};

/// How hard delivery tries, and how much at once.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Send every request to this base URL (scheme, host, port) instead of
    /// the plugin's declared host: the operator's one approved override,
    /// e.g. the local Klaviyo sandbox.
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
        }
    }
}

/// What became of one event.
#[derive(Debug, Clone)]
pub enum EventOutcome {
    Delivered { requests: usize },
    Skipped(String),
    DeadLettered(String),
}

/// One event's result, as reported to an observer.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub line: u64,
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub outcome: EventOutcome,
    pub warnings: Vec<String>,
    pub retries: u64,
    /// `name@version` of the plugin that mapped the event.
    pub plugin_version: String,
}

/// The totals of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub read: u64,
    pub delivered: u64,
    pub skipped: BTreeMap<String, u64>,
    pub dead_lettered: u64,
    /// HTTP attempts beyond the first, over all requests.
    pub retries: u64,
    pub requests_sent: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    pub fn events_per_second(&self) -> f64 {
        self.read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The human summary printed at the end of `send`.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{} events read: {} delivered, {} skipped, {} dead-lettered; {} requests sent, {} retried; {:.2}s, {:.0} events/s",
            self.read,
            self.delivered,
            self.skipped_total(),
            self.dead_lettered,
            self.requests_sent,
            self.retries,
            self.elapsed.as_secs_f64(),
            self.events_per_second()
        );
        for (reason, count) in &self.skipped {
            text.push_str(&format!("\n  skipped {count}: {reason}"));
        }
        text
    }
}

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

/// Sends events through one plugin.
pub struct Delivery {
    slot: Arc<PluginSlot>,
    settings: DestinationSettings,
    config: DeliveryConfig,
    client: reqwest::Client,
    pacer: Pacer,
    /// Idle interpreting instances, each with the address of its plugin, so
    /// a response is judged by the version that made the request.
    instances: Mutex<Vec<(usize, Instance)>>,
    /// Bounds the interpreting instances (idle and busy) within the
    /// runtime's instance slots.
    interpreters: tokio::sync::Semaphore,
    dead_letters: DeadLetters,
    requests_sent: AtomicU64,
    pub progress: Arc<Progress>,
}

/// Why a request ended undelivered.
struct Undelivered {
    reason: String,
    request: HttpRequest,
    response: Option<HttpResponse>,
}

impl Delivery {
    pub fn new(
        plugin: Arc<Plugin>,
        settings: DestinationSettings,
        config: DeliveryConfig,
        dead_letters: DeadLetters,
    ) -> anyhow::Result<Arc<Delivery>> {
        Delivery::with_slot(PluginSlot::new(plugin), settings, config, dead_letters)
    }

    /// Delivers through whichever version `slot` holds (see hot swap).
    pub fn with_slot(
        slot: Arc<PluginSlot>,
        settings: DestinationSettings,
        config: DeliveryConfig,
        dead_letters: DeadLetters,
    ) -> anyhow::Result<Arc<Delivery>> {
        let plugin = slot.current().plugin.clone();
        let missing = settings.missing_for_send(plugin.manifest());
        if !missing.is_empty() {
            anyhow::bail!("{plugin} cannot send without: {}", missing.join(", "));
        }
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("cdp-host/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(config.concurrency.max(1))
            .build()?;
        let pacer = Pacer::default();
        // Half the slots, less the mapping instance and one for loading.
        let interpreters = (plugin.runtime().instance_slots() / 2).saturating_sub(2).max(1) as usize;
        Ok(Arc::new(Delivery {
            slot,
            settings,
            config,
            client,
            pacer,
            instances: Mutex::new(Vec::new()),
            interpreters: tokio::sync::Semaphore::new(interpreters),
            dead_letters,
            requests_sent: AtomicU64::new(0),
            progress: Arc::new(Progress::default()),
        }))
    }

    /// The slot holding the active version, for swapping and rollback.
    pub fn slot(&self) -> &Arc<PluginSlot> {
        &self.slot
    }

    pub fn dead_letters(&self) -> &DeadLetters {
        &self.dead_letters
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
            let text = String::from_utf8_lossy(&bytes);
            Ok((index as u64 + 1, text.strip_suffix('\r').unwrap_or(&text).to_string()))
        });
        self.run_events(lines, observe).await
    }

    /// Maps and delivers a stream of (id, event text), in order per person,
    /// until the stream ends. The id comes back as the record's `line`.
    pub async fn run_events(
        self: &Arc<Self>,
        events: impl Iterator<Item = anyhow::Result<(u64, String)>> + Send + 'static,
        observe: impl Fn(&EventRecord) + Send + Sync,
    ) -> anyhow::Result<Report> {
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel::<(MappedEvent, String)>(256);
        let mapper = self.mapping_stage(events, tx);

        let mut report = Report::default();
        let mut lanes: HashMap<String, VecDeque<(MappedEvent, String)>> = HashMap::new();
        let mut running: JoinSet<(Option<String>, EventRecord)> = JoinSet::new();
        let mut input_done = false;
        loop {
            tokio::select! {
                job = rx.recv(), if !input_done && running.len() < self.config.concurrency => {
                    let Some((mapped, raw)) = job else {
                        input_done = true;
                        continue;
                    };
                    report.read += 1;
                    self.progress.read.fetch_add(1, Ordering::Relaxed);
                    match &mapped.ordering_key {
                        Some(key) if lanes.contains_key(key) => lanes.get_mut(key).unwrap().push_back((mapped, raw)),
                        Some(key) => {
                            lanes.insert(key.clone(), VecDeque::new());
                            self.spawn_event(&mut running, mapped, raw);
                        }
                        None => self.spawn_event(&mut running, mapped, raw),
                    }
                }
                Some(done) = running.join_next() => {
                    let (key, record) = done?;
                    self.record(&mut report, &record);
                    observe(&record);
                    if let Some(key) = key {
                        match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                            Some((mapped, raw)) => self.spawn_event(&mut running, mapped, raw),
                            None => {
                                lanes.remove(&key);
                            }
                        }
                    }
                }
                else => break,
            }
        }
        mapper.await??;
        self.dead_letters.flush()?;
        report.requests_sent = self.requests_sent.load(Ordering::Relaxed);
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Maps events on a blocking thread, in input order.
    fn mapping_stage(
        self: &Arc<Self>,
        events: impl Iterator<Item = anyhow::Result<(u64, String)>> + Send + 'static,
        tx: mpsc::Sender<(MappedEvent, String)>,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let slot = self.slot.clone();
        let settings = self.settings.clone();
        let attempts = self.config.poison_attempts.max(1);
        let progress = self.progress.clone();
        tokio::task::spawn_blocking(move || {
            let mut mapper = EventMapper::with_slot(slot, settings);
            for event in events {
                let (line, text) = event?;
                let started = std::time::Instant::now();
                let mut mapped = mapper.map_line(line, &text);
                let mut tries = 1;
                while mapped.plugin_failed && tries < attempts {
                    mapped = mapper.map_line(line, &text);
                    tries += 1;
                }
                progress.map_seconds.observe(started.elapsed());
                if mapped.plugin_failed
                    && let MappedOutcome::Error(reason) = &mut mapped.outcome
                {
                    reason.push_str(&format!(" (poison: failed {tries} times with fresh instances)"));
                }
                if tx.blocking_send((mapped, text)).is_err() {
                    break;
                }
            }
            Ok(())
        })
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
            let record = this.deliver_event(mapped, &raw).await;
            (key, record)
        });
    }

    fn record(&self, report: &mut Report, record: &EventRecord) {
        report.retries += record.retries;
        match &record.outcome {
            EventOutcome::Delivered { .. } => {
                report.delivered += 1;
                self.progress.delivered.fetch_add(1, Ordering::Relaxed);
            }
            EventOutcome::Skipped(reason) => {
                *report.skipped.entry(reason.clone()).or_default() += 1;
                self.progress.skipped.fetch_add(1, Ordering::Relaxed);
            }
            EventOutcome::DeadLettered(_) => {
                report.dead_lettered += 1;
                self.progress.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn deliver_event(&self, mapped: MappedEvent, raw: &str) -> EventRecord {
        let mut record = EventRecord {
            line: mapped.line,
            message_id: mapped.message_id.clone(),
            kind: mapped.kind.clone(),
            outcome: EventOutcome::Skipped(String::new()),
            warnings: mapped.warnings.iter().map(|w| self.settings.scrub(w)).collect(),
            retries: 0,
            plugin_version: format!("{}@{}", mapped.plugin.manifest().name, mapped.plugin.manifest().version),
        };
        let plugin = mapped.plugin.clone();
        record.outcome = match mapped.outcome {
            MappedOutcome::Skip(reason) => EventOutcome::Skipped(reason),
            MappedOutcome::Error(reason) => {
                let reason = self.settings.scrub(&reason);
                self.dead_letters
                    .write(record.line, record.message_id.as_deref(), raw, None, None, &reason);
                EventOutcome::DeadLettered(reason)
            }
            MappedOutcome::Send(requests) => {
                let started = Instant::now();
                let count = requests.len();
                let mut failed = None;
                for request in requests {
                    if let Err(undelivered) = self.deliver_request(&plugin, request, false, &mut record.retries).await {
                        failed = Some(undelivered);
                        break;
                    }
                }
                self.progress.delivery_seconds.observe(started.elapsed());
                match failed {
                    None => EventOutcome::Delivered { requests: count },
                    Some(undelivered) => {
                        let reason = self.settings.scrub(&undelivered.reason);
                        let shown = ShownRequest::new(&undelivered.request, &self.settings);
                        self.dead_letters.write(
                            record.line,
                            record.message_id.as_deref(),
                            raw,
                            Some(&shown),
                            undelivered.response.as_ref(),
                            &reason,
                        );
                        EventOutcome::DeadLettered(reason)
                    }
                }
            }
        };
        record
    }

    /// Sends one request until the plugin judges it delivered, or it ends
    /// undelivered. `replacement` marks a request the plugin offered in
    /// place of a failed one: it may not be replaced again.
    async fn deliver_request(
        &self,
        plugin: &Arc<Plugin>,
        request: HttpRequest,
        replacement: bool,
        retries: &mut u64,
    ) -> Result<(), Undelivered> {
        let undelivered = |reason: String, response: Option<HttpResponse>| Undelivered {
            reason,
            request: request.clone(),
            response,
        };
        let target = self
            .target(plugin, &request.url)
            .map_err(|reason| undelivered(reason, None))?;
        let headers = self
            .settings
            .render_headers(&request, Render::Send)
            .map_err(|e| undelivered(format!("{e:#}"), None))?;
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if self.config.pacing {
                self.pacer
                    .acquire(&request.rate_class, &plugin.manifest().rate_classes)
                    .await;
            }
            self.requests_sent.fetch_add(1, Ordering::Relaxed);
            let (verdict, response, transport_error) = match self.send(&request, &target, &headers).await {
                Ok(response) => match self.interpret(plugin, &request, &response).await {
                    Ok(verdict) => (verdict, Some(response), None),
                    Err(busy @ CallError::Busy(_)) => (Verdict::Retry(None), Some(response), Some(busy.to_string())),
                    Err(e) => {
                        let reason = format!("{plugin} {e} while interpreting the answer");
                        return Err(undelivered(reason, Some(response)));
                    }
                },
                // Connection failures and timeouts are worth another try
                // whatever the destination: the request may not have arrived.
                Err(error) => (Verdict::Retry(None), None, Some(error)),
            };
            match verdict {
                Verdict::Delivered => return Ok(()),
                Verdict::Rejected(reason) => return Err(undelivered(reason, response)),
                Verdict::Replace(requests) => {
                    if replacement {
                        return Err(undelivered(
                            format!("{plugin} asked to replace a replacement request; refused to avoid a loop"),
                            response,
                        ));
                    }
                    if let Err(e) = plugin.check_requests(&requests) {
                        return Err(undelivered(
                            format!("{plugin} offered a replacement that {e}"),
                            response,
                        ));
                    }
                    for replacement in requests {
                        Box::pin(self.deliver_request(plugin, replacement, true, retries)).await?;
                    }
                    return Ok(());
                }
                Verdict::Retry(after) => {
                    let delay = self.backoff(attempt, after.map(Duration::from_millis));
                    let last = match (&transport_error, &response) {
                        (Some(error), _) => error.clone(),
                        (None, Some(r)) => format!("HTTP {}", r.status),
                        (None, None) => "no answer".to_string(),
                    };
                    if attempt >= self.config.max_attempts || started.elapsed() + delay > self.config.max_retry_time {
                        return Err(undelivered(
                            format!(
                                "gave up after {attempt} attempts over {:.1}s; the last was {last}",
                                started.elapsed().as_secs_f64()
                            ),
                            response,
                        ));
                    }
                    *retries += 1;
                    self.progress.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Full-jitter exponential backoff, never sooner than the server asked.
    fn backoff(&self, attempt: u32, at_least: Option<Duration>) -> Duration {
        let ceiling = self
            .config
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.backoff_cap);
        let jittered = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        jittered.max(at_least.unwrap_or_default())
    }

    /// Where a request goes: its own URL if its host is declared, rebased
    /// onto the operator's override when one is set; anything else refused.
    fn target(&self, plugin: &Plugin, url: &str) -> Result<url::Url, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("refused to send to {url:?}: {e}"))?;
        let host = parsed.host_str().unwrap_or("");
        let declared = plugin
            .manifest()
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host));
        if !declared || parsed.scheme() != "https" {
            return Err(format!(
                "refused to send to {url}: {host} is not a host {plugin} declares"
            ));
        }
        let Some(base) = &self.config.base_url else {
            return Ok(parsed);
        };
        let mut target = base.clone();
        target.set_path(parsed.path());
        target.set_query(parsed.query());
        Ok(target)
    }

    async fn send(&self, request: &HttpRequest, target: &url::Url, headers: &[Header]) -> Result<HttpResponse, String> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut builder = self.client.request(method, target.clone());
        for header in headers {
            builder = builder.header(&header.name, &header.value);
        }
        if !request.body.is_empty() {
            builder = builder.body(request.body.clone());
        }
        let mut response = builder.send().await.map_err(describe_transport_error)?;
        let status = response.status().as_u16();
        *self.progress.statuses.lock().unwrap().entry(status).or_default() += 1;
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| Header {
                name: name.as_str().to_ascii_lowercase(),
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe_transport_error)? {
            let room = RESPONSE_BODY_LIMIT.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Asks the plugin what a response means, on a blocking thread (the
    /// call is bounded by the plugin deadline, not by the async runtime).
    async fn interpret(
        &self,
        plugin: &Arc<Plugin>,
        request: &HttpRequest,
        response: &HttpResponse,
    ) -> Result<Verdict, CallError> {
        let _permit = self.interpreters.acquire().await.expect("never closed");
        let key = Arc::as_ptr(plugin) as usize;
        let instance = {
            let mut idle = self.instances.lock().unwrap();
            let found = idle.iter().position(|(k, _)| *k == key);
            match found {
                Some(index) => Some(idle.swap_remove(index).1),
                // An idle instance of another version is dropped, freeing
                // its slot: after a swap the old version drains away.
                None => {
                    idle.drain(..).for_each(|(_, instance)| crate::plugin::retire(instance));
                    None
                }
            }
        };
        let plugin = plugin.clone();
        let settings = self.settings.public_json().to_string();
        let (request, response) = (request.clone(), response.clone());
        let (instance, verdict) = tokio::task::spawn_blocking(move || {
            let mut instance = match instance {
                Some(instance) if !instance.worn_out() => instance,
                _ => match plugin.instance() {
                    Ok(instance) => instance,
                    Err(e) => return (None, Err(e)),
                },
            };
            match instance.interpret(&settings, &request, &response) {
                Ok(verdict) => (Some(instance), Ok(verdict)),
                Err(e) => (None, Err(e)),
            }
        })
        .await
        .map_err(|e| CallError::Trap(format!("interpret task failed: {e}")))?;
        if let Some(instance) = instance {
            self.instances.lock().unwrap().push((key, instance));
        }
        verdict
    }
}

/// Response bodies beyond this are cut before the plugin sees them.
const RESPONSE_BODY_LIMIT: usize = 64 * 1024;

fn describe_transport_error(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else {
        "the connection failed"
    };
    let mut text = format!("{kind} ({error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text.push(')');
    text
}

/// A JSON value for a response, for dead letters.
pub(crate) fn response_json(response: &HttpResponse) -> Value {
    let body = serde_json::from_str::<Value>(&response.body).unwrap_or_else(|_| Value::String(response.body.clone()));
    json!({ "status": response.status, "body": body })
}
