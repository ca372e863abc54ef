//! `cdp-host serve`: the host run the way a CDP runs a destination. Events
//! come in over HTTP (`ingest`), are committed to the spool before they are
//! acknowledged, and a feeder hands pending rows to the delivery engine in
//! order; each outcome is written back to its row with the plugin version
//! that mapped it. At-least-once to the destination, which must drop what it
//! already had by the stable ids the plugin derives (Klaviyo's `unique_id`):
//! after a crash the pending rows are delivered again and the destination
//! drops what it already had.

mod admin;
pub mod connections;
pub mod console;
pub mod dead_letters;
mod engine;
mod ingest;
mod log;
mod metrics;
pub mod store;
pub mod stream;
#[cfg(test)]
mod testing;

pub use ingest::wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};

use plugin_runtime::{Plugin, PluginSlot};

use crate::spool::{DEFAULT_CONNECTION, Spool};
use cdp_core::settings::{DestinationSettings, Secret};
use connections::{Connection, Connections, NewConnection};
use engine::Engines;
use log::EventLog;
use log::rows::RowLog;

/// `serve`'s defaults, each defined once (the command line shows them).
pub struct Defaults;

impl Defaults {
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const SPOOL: &str = "cdp-spool.sqlite";
    pub const RETENTION_HOURS: u64 = 24;
    pub const SHUTDOWN_GRACE_SECONDS: u64 = 20;
    /// Events a second each write key may send (`ingest::KeyLimits`).
    pub const INGEST_RATE: u32 = 5_000;
}

/// The connection `serve`'s flags describe (`serve` without a connection
/// config): its write keys, its slot and its settings.
pub struct FlagsConnection {
    pub write_keys: Vec<Secret>,
    pub slot: Arc<PluginSlot>,
    pub settings: DestinationSettings,
}

/// A connection of the config file, with the bytes of its plugin when it
/// names one (and the file's name).
pub struct FileConnection {
    pub new: NewConnection,
    pub plugin: Option<(Vec<u8>, String)>,
}

/// How `serve` runs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub spool: Arc<Spool>,
    /// The version connections get when they name none, and its bytes.
    pub plugin: Arc<Plugin>,
    pub plugin_bytes: Vec<u8>,
    /// The connection of the flags, if they give write keys.
    pub flags_connection: Option<FlagsConnection>,
    /// Connections from the config file: created if the spool has no
    /// connection with that id (after that, the spool's copy, changed
    /// through the admin API, is the one served).
    pub file_connections: Vec<FileConnection>,
    pub delivery: cdp_core::delivery::DeliveryConfig,
    /// Delivered and skipped rows are deleted after this long.
    pub retention: Duration,
    /// How long SIGTERM waits for in-flight deliveries.
    pub shutdown_grace: Duration,
    /// Enables the admin API (connections, hot swap, rollback) for bearers
    /// of this token.
    pub admin_token: Option<Secret>,
    /// Watched for new versions of the plugin (`*.wasm`), as an alternative
    /// to uploading them through the admin API: each is rolled to every
    /// connection serving that destination.
    pub plugin_dir: Option<std::path::PathBuf>,
    /// Keep events in a NATS JetStream stream shared by several hosts
    /// instead of the spool (which then keeps connections and plugins only).
    pub stream: Option<stream::StreamOptions>,
    /// Base URLs a connection made through the admin API may send to
    /// instead of its plugin's host (besides the host's own base URL).
    pub approved_base_urls: Vec<url::Url>,
    /// The secret sources a connection made through the admin API may name.
    pub admin_secret_sources: connections::SecretSources,
    /// Events a second each write key may send; 0 for no limit.
    pub ingest_rate: u32,
    /// The operator console at `/console/` (with an admin token), and what
    /// it keeps; none for no console.
    pub console: Option<console::ConsoleOptions>,
}

/// What the HTTP handlers and the engines share.
pub(crate) struct Shared {
    connections: Connections,
    draining: AtomicBool,
    metrics: Arc<metrics::Metrics>,
    /// Each connection's delivery engine.
    engines: Arc<Engines>,
    admin_token: Option<Secret>,
    /// Each write key's rate (none: no limit).
    key_limits: Option<ingest::KeyLimits>,
    /// Where events are kept: the spool, or the stream.
    log: Arc<dyn EventLog>,
    /// Why the last write of outcomes to the spool failed, while it fails
    /// (`/healthz` says so).
    outcomes_failing: std::sync::Mutex<Option<String>>,
    /// The console, when on.
    console: Option<console::Console>,
    /// The dead letters, wherever the log keeps them.
    dead: Box<dyn dead_letters::DeadLetters>,
    /// This host among those sharing a stream (its worker's id, in the
    /// outcome records it publishes).
    host_id: String,
}

impl Shared {
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Tells the other hosts sharing the event log how each of these
    /// connections is now, and which version it runs. A failure is logged:
    /// this host has the change; the others do not.
    async fn announce(self: &Arc<Self>, ids: &[String]) {
        for id in ids {
            let Some(connection) = self.connections.get(id) else {
                continue;
            };
            if !connection.from_flags
                && let Err(e) = self.log.announce_connection(&connection.stored()).await
            {
                tracing::error!(connection = %id, "announcing the connection to the other hosts: {e:#}");
            }
            let sha = connection.slot.current().plugin.sha256_hex();
            let (this, key) = (self.clone(), sha.clone());
            let bytes =
                Box::pin(async move { tokio::task::spawn_blocking(move || this.connections.store.bytes(&key)).await? });
            if let Err(e) = self.log.announce_plugin(id, &sha, bytes).await {
                tracing::error!(connection = %id, "announcing the swap to the other hosts: {e:#}");
            }
        }
    }

    /// Lets a connection that may have events to deliver deliver them.
    fn ensure_running(self: &Arc<Self>, connection: &Arc<Connection>) {
        if self.draining() || !connection.state().delivers() {
            return;
        }
        self.log.wake(self, connection);
    }
}

/// Compares keys without leaking, through timing, how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sets up the connections: those kept in the spool, those of the config
/// file the spool lacks, and the one of the flags.
pub fn connections(config: &ServeConfig, runtime: Arc<plugin_runtime::Runtime>) -> anyhow::Result<Connections> {
    let store = store::PluginStore::new(runtime, config.spool.clone());
    store.keep(&config.plugin, &config.plugin_bytes)?;
    let connections = Connections::new(
        store,
        config.plugin.clone(),
        config.delivery.clone(),
        config.spool.clone(),
    )?;
    connections.approve_base_urls(config.approved_base_urls.clone());
    connections.allow_secret_sources(config.admin_secret_sources.clone());
    connections.load_stored()?;
    Ok(connections)
}

/// Serves until SIGTERM or Ctrl-C, then drains and returns.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    run(config, None, shutdown_signal(), |_| {}).await
}

/// Runs `serve` until `stop` resolves. `log`, when given, keeps the events
/// instead of the log `config` names (tests keep them in memory);
/// `listening` is told the address once the service listens.
pub(crate) async fn run(
    mut config: ServeConfig,
    log: Option<Arc<dyn EventLog>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    // The console is behind the admin token: without one, there is none,
    // and nothing is kept for it. It shows each event's requests and
    // answers: delivery keeps them.
    if config.admin_token.is_none() {
        config.console = None;
    }
    config.delivery.trace = config.console.is_some();
    let runtime = config.plugin.runtime().clone();
    let connections = tokio::task::block_in_place(|| connections(&config, runtime))?;
    for FileConnection { new, plugin } in std::mem::take(&mut config.file_connections) {
        if connections.get(&new.id).is_some() {
            continue;
        }
        let id = new.id.clone();
        let plugin = match plugin {
            Some((bytes, name)) => Some(
                tokio::task::block_in_place(|| connections.store.add(&bytes, &name))
                    .with_context(|| format!("connection {id}"))?,
            ),
            None => None,
        };
        connections
            .create(new, plugin)
            .await
            .with_context(|| format!("creating connection {id} from the config file"))?;
        tracing::info!(connection = %id, "created from the config file");
    }
    if let Some(flags) = config.flags_connection.take() {
        let keys: Vec<String> = flags.write_keys.iter().map(|k| k.expose().to_string()).collect();
        connections.add_from_flags(DEFAULT_CONNECTION, &keys, flags.slot, flags.settings)?;
    }
    if connections.is_empty() && config.admin_token.is_none() {
        anyhow::bail!(
            "serve has no connection: give write keys (--write-key, write_keys in the config, or $CDP_HOST_WRITE_KEYS), [[connections]] in the config, or an admin token to create them through the admin API"
        );
    }
    let log: Arc<dyn EventLog> = match (log, config.stream.clone()) {
        (Some(log), _) => log,
        (None, Some(options)) => {
            let log = stream::Log::connect(options.clone()).await?;
            tracing::info!(nats = %options.access.describe(), role = ?options.role, replicas = options.replicas, "events go through the JetStream stream");
            Arc::new(log)
        }
        (None, None) => Arc::new(RowLog::new(config.spool.clone())?),
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let recorder = config
        .console
        .clone()
        .map(|options| Arc::new(console::Recorder::new(options)));
    let (engines, written) = Engines::new(metrics.clone(), recorder.clone());
    let shared = Arc::new(Shared {
        connections,
        draining: AtomicBool::new(false),
        metrics,
        engines,
        admin_token: config.admin_token.clone(),
        key_limits: ingest::KeyLimits::new(config.ingest_rate),
        dead: log.dead_letters(),
        log: log.clone(),
        outcomes_failing: std::sync::Mutex::new(None),
        console: recorder.map(console::Console::new),
        host_id: format!("w{}", uuid::Uuid::new_v4().simple()),
    });
    let mut app = Router::new();
    if shared.console.is_some() {
        app = app.merge(console::routes());
    }
    let app = app
        .route("/api/s/s2s/{kind}", post(ingest::s2s))
        .route("/v1/batch", post(ingest::segment_batch))
        .route("/v1/{kind}", post(ingest::segment_single))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics_text))
        .route("/admin/plugins", get(admin::list).put(admin::store_plugin))
        .route("/admin/plugins/{destination}", axum::routing::put(admin::upload))
        .route("/admin/plugins/{destination}/rollback", post(admin::rollback))
        .route("/admin/connections", get(admin::connections).post(admin::create))
        .route(
            "/admin/connections/{id}",
            get(admin::connection).patch(admin::update).delete(admin::delete),
        )
        .route("/admin/connections/{id}/pause", post(admin::pause))
        .route("/admin/connections/{id}/resume", post(admin::resume))
        .route("/admin/connections/{id}/plugin", post(admin::swap))
        .route("/admin/connections/{id}/rollback", post(admin::rollback_one))
        .layer(DefaultBodyLimit::max(ingest::MAX_BATCH_BYTES + 1))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        connections = shared.connections.len(),
        plugin = %config.plugin,
        admin = config.admin_token.is_some(),
        "serving"
    );
    listening(listener.local_addr()?);

    // Outcomes are settled where the events are kept: written to their
    // rows, or acked on the stream by this host's worker.
    let started = log.clone().start(&shared, written, config.shutdown_grace).await?;
    for connection in shared.connections.all() {
        shared.ensure_running(&connection);
    }
    let supervisor = tokio::spawn(supervise(shared.clone()));
    let pruner = tokio::spawn(prune(config.spool.clone(), config.retention));
    let watcher = config
        .plugin_dir
        .clone()
        .map(|dir| tokio::spawn(watch_plugin_dir(shared.clone(), dir)));

    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    tracing::info!("stopping intake; finishing deliveries in flight");
    shared.draining.store(true, Ordering::Relaxed);
    started.stop.await;
    supervisor.abort();
    pruner.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    // Each feeder sees the flag and stops; each engine then finishes what
    // it has in flight.
    let feeders: Vec<_> = shared
        .connections
        .all()
        .iter()
        .filter_map(|c| {
            c.wake.notify_one();
            c.feeder.lock().unwrap().take()
        })
        .collect();
    let engines = shared.engines.close();
    let all_stopped = async {
        for task in feeders.into_iter().chain(engines) {
            let _ = task.await;
        }
    };
    // The engines are done (or out of time): the log settles what it was
    // given.
    let stopped = tokio::time::timeout(config.shutdown_grace, all_stopped).await;
    match stopped {
        Ok(()) => {
            started.finish.await;
            tracing::info!(
                "stopped after finishing {} events",
                shared.metrics.finished.load(Ordering::Relaxed)
            );
        }
        // Rows still in flight stay pending and are delivered after restart.
        Err(_) => tracing::warn!(
            "shutdown grace of {:?} passed; unfinished events stay pending",
            config.shutdown_grace
        ),
    }
    Ok(())
}

/// Now and then: starts the engines of connections with events ready (a
/// Retry-After passed, dead letters replayed), and removes deleted
/// connections once their events are finished.
async fn supervise(shared: Arc<Shared>) {
    let mut warned = std::collections::HashSet::new();
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        finish_deletions(&shared).await;
        if !tick.is_multiple_of(5) {
            continue;
        }
        let Ok(ready) = shared.log.ready_connections().await else {
            continue;
        };
        for id in ready {
            match shared.connections.get(&id) {
                Some(connection) => shared.ensure_running(&connection),
                None => {
                    if warned.insert(id.clone()) {
                        tracing::warn!(connection = %id, "events are pending for a connection this serve does not have; they wait for it");
                    }
                }
            }
        }
    }
}

/// Removes the connections being deleted whose events are all finished.
async fn finish_deletions(shared: &Arc<Shared>) {
    for connection in shared.connections.draining_idle() {
        match shared.log.has_pending(&connection.id).await {
            Ok(false) => {
                let (this, gone) = (shared.clone(), connection.clone());
                let _ = tokio::task::spawn_blocking(move || this.connections.remove_deleted(&gone)).await;
                if let Some(console) = &shared.console {
                    console.recorder.forget(&connection.id);
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(connection = %connection.id, "checking for pending events: {e:#}"),
        }
    }
}

/// 200 while the service can record what it does; 503 naming the cause
/// while outcomes cannot be written (their events wait meanwhile).
async fn health(State(shared): State<Arc<Shared>>) -> (axum::http::StatusCode, String) {
    match shared.outcomes_failing.lock().unwrap().as_ref() {
        None => (axum::http::StatusCode::OK, "ok\n".to_string()),
        Some(cause) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("outcomes cannot be recorded in the spool ({cause}); deliveries wait until they can\n"),
        ),
    }
}

/// Offers each new or changed `*.wasm` in `dir` as a candidate, exactly as
/// an upload through the admin API would be; refusals are logged and the
/// file is not tried again until it changes.
async fn watch_plugin_dir(shared: Arc<Shared>, dir: std::path::PathBuf) {
    let mut seen: std::collections::HashMap<std::path::PathBuf, std::time::SystemTime> = Default::default();
    loop {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                let Some(modified) = modified.filter(|_| path.extension().is_some_and(|e| e == "wasm")) else {
                    continue;
                };
                if seen.get(&path) == Some(&modified) {
                    continue;
                }
                seen.insert(path.clone(), modified);
                let Ok(bytes) = std::fs::read(&path) else { continue };
                let name = path.display().to_string();
                match admin::roll_out(&shared, None, bytes, name).await {
                    Ok((_, swapped)) if swapped.is_empty() => {}
                    Ok((plugin, swapped)) => {
                        tracing::info!(file = %path.display(), %plugin, connections = swapped.len(), "swapped in from the plugin directory")
                    }
                    Err(refused) => {
                        tracing::warn!(file = %path.display(), %refused, "refused a plugin from the plugin directory")
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn prune(spool: Arc<Spool>, retention: Duration) {
    loop {
        tokio::time::sleep(Duration::from_secs(60).min(retention.max(Duration::from_secs(1)))).await;
        let spool = spool.clone();
        match tokio::task::spawn_blocking(move || spool.prune(retention)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!("pruned {n} finished events older than {retention:?}"),
            Ok(Err(e)) => tracing::warn!("pruning the spool: {e:#}"),
            _ => {}
        }
    }
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> String {
    let depths = shared.log.backlog().await.unwrap_or_default();
    metrics::render(&shared.metrics, &shared.connections, &depths, shared.engines.running())
}

/// Resolves at SIGTERM or Ctrl-C. The handlers are installed here, before
/// the listener is bound, so that a signal sent as soon as the service
/// answers is never met by the default action (which would kill it
/// without draining).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    async move {
        let terminate = async {
            match terminate {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        let interrupt = async {
            match interrupt {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
}

/// Counted for `/metrics`.
pub(crate) type Counter = AtomicU64;
