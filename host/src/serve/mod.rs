//! `cdp-host serve`: the host run the way a CDP runs a destination. Events
//! come in over HTTP (`ingest`), are committed to the spool before they are
//! acknowledged, and a feeder hands pending rows to the delivery engine in
//! order; each outcome is written back to its row with the plugin version
//! that mapped it. At-least-once to the destination, which must drop what it
//! already had by the stable ids the plugin derives (Klaviyo's `unique_id`):
//! after a crash the pending rows are delivered again and the destination
//! drops what it already had.

mod admin;
mod ingest;
mod metrics;

pub use ingest::wire;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use tokio::sync::Notify;

use plugin_runtime::PluginSlot;

use crate::delivery::{Delivery, DeliveryConfig, EventOutcome, EventRecord};
use crate::mapping::EventId;
use crate::settings::{DestinationSettings, Secret};
use crate::spool::{Finished, Spool, State as RowState, outcome_json};

/// `serve`'s defaults, each defined once (the command line shows them).
pub struct Defaults;

impl Defaults {
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const SPOOL: &str = "cdp-spool.sqlite";
    pub const RETENTION_HOURS: u64 = 24;
    pub const SHUTDOWN_GRACE_SECONDS: u64 = 20;
}

/// How `serve` runs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub spool: Arc<Spool>,
    pub write_keys: Vec<Secret>,
    pub settings: DestinationSettings,
    pub delivery: DeliveryConfig,
    /// Delivered and skipped rows are deleted after this long.
    pub retention: Duration,
    /// How long SIGTERM waits for in-flight deliveries.
    pub shutdown_grace: Duration,
    /// Enables the admin API (hot swap, rollback) for bearers of this token.
    pub admin_token: Option<Secret>,
    /// Watched for new versions of the plugin (`*.wasm`), as an alternative
    /// to uploading them through the admin API.
    pub plugin_dir: Option<std::path::PathBuf>,
}

/// What the HTTP handlers share.
pub(crate) struct Shared {
    spool: Arc<Spool>,
    write_keys: Vec<Secret>,
    wake_feeder: Notify,
    draining: AtomicBool,
    metrics: metrics::Metrics,
    delivery: Arc<Delivery>,
    admin_token: Option<Secret>,
}

impl Shared {
    fn write_key_ok(&self, key: Option<&str>) -> bool {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return false;
        };
        self.write_keys
            .iter()
            .any(|k| constant_time_eq(k.expose().as_bytes(), key.as_bytes()))
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Compares keys without leaking, through timing, how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves until SIGTERM or Ctrl-C, then drains and returns.
pub async fn serve(config: ServeConfig, slot: Arc<PluginSlot>) -> anyhow::Result<()> {
    let plugin = slot.current().plugin.clone();
    let spool = config.spool.clone();
    let deferred = Box::new(move |id: EventId, until: std::time::SystemTime| {
        if let EventId::SpoolRow(row) = id
            && let Err(e) = spool.defer(row, until.into())
        {
            tracing::warn!("recording the Retry-After of event {row}: {e:#}");
        }
    });
    let delivery = Delivery::with_deferrals(slot, config.settings.clone(), config.delivery.clone(), deferred)?;
    let shared = Arc::new(Shared {
        spool: config.spool.clone(),
        write_keys: config.write_keys.clone(),
        wake_feeder: Notify::new(),
        draining: AtomicBool::new(false),
        metrics: metrics::Metrics::default(),
        delivery: delivery.clone(),
        admin_token: config.admin_token.clone(),
    });
    let app = Router::new()
        .route("/api/s/s2s/{kind}", post(ingest::s2s))
        .route("/v1/batch", post(ingest::segment_batch))
        .route("/v1/{kind}", post(ingest::segment_single))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .route("/admin/plugins", get(admin::list))
        .route("/admin/plugins/{destination}", axum::routing::put(admin::upload))
        .route("/admin/plugins/{destination}/rollback", post(admin::rollback))
        .layer(DefaultBodyLimit::max(ingest::MAX_BATCH_BYTES + 1))
        .with_state(shared.clone());
    let stop = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, plugin = %plugin, admin = config.admin_token.is_some(), "serving");

    // Events go from the spool to the engine through a small channel: the
    // engine pulls as it has room, so the spool, not memory, holds backlog.
    let (tx, rx) = tokio::sync::mpsc::channel::<(EventId, String)>(512);
    let in_flight = Arc::new(Mutex::new(HashSet::<i64>::new()));
    let feeder = tokio::spawn(feed(shared.clone(), tx, in_flight.clone()));
    let (outcomes, written) = std::sync::mpsc::channel::<Finished>();
    let writer = std::thread::Builder::new().name("outcome-writer".into()).spawn({
        let (shared, in_flight) = (shared.clone(), in_flight.clone());
        move || write_outcomes(&shared, &in_flight, written)
    })?;
    let engine = {
        let shared = shared.clone();
        let mut rx = rx;
        let events = std::iter::from_fn(move || rx.blocking_recv().map(Ok));
        tokio::spawn(async move {
            delivery
                .run_events(events, move |record| {
                    // The writer goes with the engine: a send fails only
                    // if it is gone, and then the row stays pending.
                    let _ = outcomes.send(finished(&shared, record));
                })
                .await
        })
    };
    let pruner = tokio::spawn(prune(config.spool.clone(), config.retention));
    let watcher = config
        .plugin_dir
        .clone()
        .map(|dir| tokio::spawn(watch_plugin_dir(shared.clone(), dir)));

    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    tracing::info!("stopping intake; finishing deliveries in flight");
    shared.draining.store(true, Ordering::Relaxed);
    feeder.abort();
    pruner.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let stopped = tokio::time::timeout(config.shutdown_grace, engine).await;
    if stopped.is_ok() {
        // The engine is done, and with it the writer's input: the writer
        // records what it was given, then ends.
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    }
    match stopped {
        Ok(Ok(Ok(report))) => tracing::info!("stopped after delivering {} events", report.delivered),
        Ok(Ok(Err(e))) => tracing::error!("delivery ended with an error: {e:#}"),
        Ok(Err(e)) => tracing::error!("delivery task failed: {e}"),
        // Rows still in flight stay pending and are delivered after restart.
        Err(_) => tracing::warn!(
            "shutdown grace of {:?} passed; unfinished events stay pending",
            config.shutdown_grace
        ),
    }
    Ok(())
}

/// Hands pending rows to the engine, oldest first, each once while it is
/// in flight; a row replayed from the dead letters is picked up on the next
/// full sweep.
async fn feed(
    shared: Arc<Shared>,
    tx: tokio::sync::mpsc::Sender<(EventId, String)>,
    in_flight: Arc<Mutex<HashSet<i64>>>,
) {
    let mut cursor = 0i64;
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        if last_sweep.elapsed() > Duration::from_secs(5) {
            cursor = 0;
            last_sweep = tokio::time::Instant::now();
        }
        let spool = shared.spool.clone();
        let rows = match tokio::task::spawn_blocking(move || spool.pending_after(cursor, 256)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!("reading the spool: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(_) => return,
        };
        if rows.is_empty() {
            tokio::select! {
                _ = shared.wake_feeder.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            continue;
        }
        for row in rows {
            cursor = cursor.max(row.id);
            if !in_flight.lock().unwrap().insert(row.id) {
                continue;
            }
            if tx.send((EventId::SpoolRow(row.id), row.body)).await.is_err() {
                return;
            }
        }
    }
}

/// An event's outcome as its row records it, counted.
fn finished(shared: &Shared, record: &EventRecord) -> Finished {
    let id = record.id.number();
    let (state, outcome) = match &record.outcome {
        EventOutcome::Delivered { .. } => (RowState::Delivered, outcome_json("delivered", None, &record.warnings)),
        EventOutcome::Skipped(reason) => {
            shared.metrics.skipped(reason);
            (
                RowState::Skipped,
                outcome_json("skipped", Some(reason), &record.warnings),
            )
        }
        EventOutcome::DeadLettered(letter) => {
            tracing::warn!(event = id, message_id = ?record.message_id, reason = %letter.reason, "dead-lettered");
            let mut outcome = outcome_json("dead", Some(&letter.reason), &record.warnings);
            outcome["request"] = letter.request_json();
            outcome["response"] = letter.response_json();
            (RowState::Dead, outcome)
        }
    };
    Finished {
        id,
        state,
        outcome,
        plugin_version: record.plugin_version.clone(),
    }
}

/// Writes outcomes to their rows, as many per transaction as have come
/// in, and only then lets the feeder see those rows again (a row not yet
/// written stays in flight, so it is not handed out twice).
fn write_outcomes(shared: &Shared, in_flight: &Mutex<HashSet<i64>>, outcomes: std::sync::mpsc::Receiver<Finished>) {
    while let Ok(first) = outcomes.recv() {
        let mut batch = vec![first];
        while batch.len() < 256
            && let Ok(more) = outcomes.try_recv()
        {
            batch.push(more);
        }
        if let Err(e) = shared.spool.finish_all(&batch) {
            // The rows stay pending and are delivered again (idempotently).
            tracing::error!("recording the outcomes of {} events: {e:#}", batch.len());
        }
        shared.metrics.finished.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut in_flight = in_flight.lock().unwrap();
        for finished in &batch {
            in_flight.remove(&finished.id);
        }
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
                let slot = shared.delivery.slot().clone();
                if slot.current().plugin.sha256_hex() == plugin_runtime::sha256_hex(&bytes) {
                    continue;
                }
                let name = path.display().to_string();
                let result = tokio::task::spawn_blocking(move || slot.swap_in(&bytes, &name)).await;
                match result {
                    Ok(Ok(loaded)) => {
                        tracing::info!(file = %path.display(), plugin = %loaded.plugin, "swapped in from the plugin directory")
                    }
                    Ok(Err(refused)) => {
                        tracing::warn!(file = %path.display(), %refused, "refused a plugin from the plugin directory")
                    }
                    Err(e) => tracing::error!("the swap task failed: {e}"),
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
    let spool = shared.spool.clone();
    let depth = tokio::task::spawn_blocking(move || spool.count(RowState::Pending).unwrap_or(0))
        .await
        .unwrap_or(0);
    metrics::render(&shared.metrics, &shared.delivery, depth)
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
