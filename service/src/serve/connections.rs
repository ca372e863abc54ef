//! Connections: one shop's route from its sources to its destination
//! account. A connection has an id, the source write keys routed to it,
//! the plugin version it is served by, its settings, the sources of its
//! secrets (an environment variable or a file the operator names, never a
//! value), an optional base URL the operator approves in place of the
//! plugin's host, and a state: active, paused (events are stored, not
//! delivered) or draining (no new events; deleted once its events are
//! finished).
//!
//! Connections are kept in the spool, so they survive a restart and a
//! `kill -9`: the config file seeds those the spool does not have, and the
//! admin API changes them. Each has its own delivery (ordering, retries,
//! settings, version, counters), but shares with the others what should
//! be shared: the compiled plugin versions and their instances (the
//! `PluginStore`), the HTTP client, and the budget of the destination
//! account its key belongs to (`Budgets`, by a hash of the key).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use plugin_runtime::{Canary, Plugin, PluginSlot};

use super::store::PluginStore;
use crate::spool::{Spool, StoredConnection};
use cdp_core::delivery::{Budgets, DeferObserver, Delivery, DeliveryConfig, Parts, Progress};
use cdp_core::mapping::{CallGate, CallGates, MappingPool, StageConfig};
use cdp_core::settings::DestinationSettings;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    Active,
    Paused,
    Draining,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Active => "active",
            ConnState::Paused => "paused",
            ConnState::Draining => "draining",
        }
    }

    fn parse(text: &str) -> anyhow::Result<ConnState> {
        match text {
            "active" => Ok(ConnState::Active),
            "paused" => Ok(ConnState::Paused),
            "draining" => Ok(ConnState::Draining),
            other => bail!("state {other:?} is not active, paused or draining"),
        }
    }

    /// Whether ingest stores new events for it.
    pub fn accepts(self) -> bool {
        self != ConnState::Draining
    }

    /// Whether its events are delivered.
    pub fn delivers(self) -> bool {
        self != ConnState::Paused
    }
}

/// A connection as it is kept: what the operator chose, with write keys
/// as hashes. Its secrets are the sources the operator names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// SHA-256 (hex) of each source write key routed to it.
    pub write_key_hashes: Vec<String>,
    /// The SHA-256 of the plugin version serving it, and of the one
    /// before (for a rollback).
    pub plugin: String,
    #[serde(default)]
    pub previous_plugin: Option<String>,
    /// Settings as the operator gave them: secrets as their sources.
    pub settings: Map<String, Value>,
    #[serde(default)]
    pub base_url: Option<url::Url>,
}

/// The secret sources the operator lets an admin name (`serve
/// --admin-secret-env-prefix`, `--admin-secret-dir`).
#[derive(Debug, Clone, Default)]
pub struct SecretSources {
    pub env_prefixes: Vec<String>,
    /// Real paths (links resolved) of the allowed directories.
    pub dirs: Vec<std::path::PathBuf>,
}

/// A new connection, as the config file and `POST /admin/connections`
/// describe it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewConnection {
    pub id: String,
    pub write_keys: Vec<String>,
    /// The SHA-256 of a stored version (the admin API), or a file path
    /// (the config file); the version `serve` starts with when absent.
    #[serde(default)]
    pub plugin: Option<String>,
    #[serde(default)]
    pub settings: Map<String, Value>,
    #[serde(default)]
    pub base_url: Option<url::Url>,
    #[serde(default)]
    pub state: Option<String>,
}

/// Checks a connection id: 1 to 64 of `A-Z a-z 0-9 - _ .`.
pub fn check_id(id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("connection id {id:?} must be 1 to 64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// The SHA-256 of a write key, as routes and the spool keep it.
pub fn key_hash(key: &str) -> String {
    plugin_runtime::sha256_hex(key.as_bytes())
}

/// The bounded label a skipped event is counted under: its type, which
/// the host reads itself (the plugin's reason is free text; it stays in
/// the spool and the logs).
pub fn kind_label(kind: Option<&str>) -> &'static str {
    match kind {
        Some("track") => "track",
        Some("identify") => "identify",
        Some("page") => "page",
        Some("screen") => "screen",
        Some("group") => "group",
        Some("alias") => "alias",
        _ => "other",
    }
}

/// Counted per connection, for `/metrics` and the admin list.
#[derive(Default)]
pub struct ConnMetrics {
    pub received: AtomicU64,
    pub finished: AtomicU64,
    skipped_by_code: Mutex<BTreeMap<&'static str, u64>>,
}

impl ConnMetrics {
    pub fn skipped(&self, code: &'static str) {
        *self.skipped_by_code.lock().unwrap().entry(code).or_default() += 1;
    }

    pub fn skipped_by_code(&self) -> BTreeMap<&'static str, u64> {
        self.skipped_by_code.lock().unwrap().clone()
    }
}

/// One connection, serving.
pub struct Connection {
    pub id: String,
    spec: Mutex<Spec>,
    state: Mutex<ConnState>,
    pub slot: Arc<PluginSlot>,
    pub delivery: Arc<Delivery>,
    pub metrics: ConnMetrics,
    /// Events admitted to its engine and not yet released (their outcome
    /// recorded). Each with the passes it holds (its connection's and the
    /// host's): what a connection and all of them hold in memory is bounded.
    pub(super) in_flight: Mutex<HashMap<cdp_core::mapping::EventId, super::engine::Held>>,
    /// When each event handed in with a Retry-After may be sent: set by
    /// `Engines::hand`, taken by delivery, dropped at `Engines::release`.
    pub(super) waits: Waits,
    /// Its events in flight, at most.
    pub(super) held: Arc<tokio::sync::Semaphore>,
    /// Their bodies' KiB, at most (`CONNECTION_BYTES`).
    pub(super) held_bytes: Arc<tokio::sync::Semaphore>,
    /// Its spool feeder, run while it has work.
    pub(super) feeder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub(super) feeding: AtomicBool,
    pub(super) wake: Notify,
    /// Whether this one is defined by `serve`'s flags (not kept in the
    /// spool: the flags describe it at each start).
    pub from_flags: bool,
}

impl Connection {
    pub fn state(&self) -> ConnState {
        *self.state.lock().unwrap()
    }

    pub fn spec(&self) -> Spec {
        self.spec.lock().unwrap().clone()
    }

    /// As the spool keeps it (and `serve --stream` shares it).
    pub fn stored(&self) -> StoredConnection {
        StoredConnection {
            id: self.id.clone(),
            state: self.state().as_str().to_string(),
            spec: serde_json::to_value(self.spec()).expect("a spec serializes"),
        }
    }

    /// The settings as shown: public ones as they are, secrets as their
    /// sources (an environment variable's name, a file's path).
    pub fn shown_settings(&self) -> Map<String, Value> {
        self.spec.lock().unwrap().settings.clone()
    }
}

/// The connections of this `serve`, their routes, and what they share.
pub struct Connections {
    by_id: RwLock<BTreeMap<String, Arc<Connection>>>,
    /// Write-key hash to the connections it feeds.
    routes: ArcSwap<HashMap<String, Vec<Arc<Connection>>>>,
    pub store: PluginStore,
    budgets: Budgets,
    client: reqwest::Client,
    base: DeliveryConfig,
    spool: Arc<Spool>,
    /// The version a connection gets when it names none.
    default_plugin: Arc<Plugin>,
    /// Told of each Retry-After, by the event log that keeps it (on the
    /// event's row), once the log has started; none for a log that keeps
    /// none.
    pub(crate) defer: Arc<std::sync::OnceLock<Defer>>,
    /// Set while outcomes cannot be recorded: every connection's requests
    /// wait (`delivery::Hold`).
    pub(crate) hold: cdp_core::delivery::Hold,
    /// Serializes changes (create, update, swap, delete), so that the
    /// spool and the routes change together.
    changing: tokio::sync::Mutex<()>,
    /// Plugin calls in progress at once, host-wide (see `CallGates`):
    /// mapping, and interpreting.
    host_gate: Arc<CallGate>,
    host_interpreters: Arc<tokio::sync::Semaphore>,
    /// (version, public settings) that passed the golden events: a
    /// thousand shops with the same settings are checked once.
    canaried: Mutex<HashSet<(String, String)>>,
    /// `approve_base_urls`.
    approved_base_urls: RwLock<Vec<url::Url>>,
    /// `allow_secret_sources`.
    secret_sources: RwLock<SecretSources>,
    /// Whether an event may still be sent from this host: set by a
    /// stream worker (its lease fence), shared by every connection.
    pub fence: cdp_core::delivery::Fence,
    /// The workers that map every connection's events, in turn.
    mapping_pool: Arc<MappingPool>,
}

/// Events' not-before times, by event.
pub(super) type Waits = Arc<Mutex<HashMap<cdp_core::mapping::EventId, std::time::SystemTime>>>;

/// Events in flight (read, not yet finished) at most, for all connections
/// together: with many busy connections, each one's share of memory is
/// what this bounds, not its own limit times their number. 4,096 a core,
/// and never fewer than the flags' connection may hold. With 100 busy
/// connections, 16,384 in flight on two cores held eight times one
/// connection's working set (bodies, mapped requests, tasks: 300 MiB
/// against 235 with 8,192), for more CPU an event and less throughput
/// (BENCHMARKS §10). It is still far more than Klaviyo's latency needs
/// (Little's law: 4,096 events at 200 ms is 20,000 events a second).
pub fn host_events() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    (4_096 * cores).max(FLAGS_CONNECTION_EVENTS)
}

/// Bytes of event bodies in flight at most, for all connections together,
/// and for one: memory under a backlog of large events is bounded by these,
/// not by the counts above (1,000 events of 1 MB were 1.65 GB of memory).
/// An event holds its body, its mapped requests and Klaviyo's answers:
/// about twice to three times its size.
pub const HOST_BYTES: usize = 64 << 20;
pub(crate) const CONNECTION_BYTES: usize = 32 << 20;

/// Events in flight at most for one connection of many (room for two
/// bulk batches of Klaviyo's 1,000 events to fill), and for the one of the
/// flags, which has the host to itself (a backlog keeps up to 4,000 in
/// flight for its batches).
const CONNECTION_EVENTS: usize = 2_048;
pub(crate) const FLAGS_CONNECTION_EVENTS: usize = 8_192;

/// Plugin calls in progress at once, host-wide: two per core. Each one
/// holds an instance, so this also bounds the mapping instances (and their
/// memory) however many connections are busy.
fn host_calls() -> usize {
    2 * std::thread::available_parallelism().map_or(2, usize::from)
}

/// Records a Retry-After where the event is kept.
pub(crate) type Defer = Box<dyn Fn(cdp_core::mapping::EventId, std::time::SystemTime) + Send + Sync>;

impl Connections {
    pub fn new(
        store: PluginStore,
        default_plugin: Arc<Plugin>,
        base: DeliveryConfig,
        spool: Arc<Spool>,
    ) -> anyhow::Result<Connections> {
        // One client for every connection: they mostly send to the same
        // host (Klaviyo's), so its idle connections are kept for as many
        // requests as all connections have in flight, not one's share;
        // otherwise each request past it opens a new TCP connection.
        let client = Delivery::client(&DeliveryConfig {
            concurrency: base.concurrency * 16,
            ..base.clone()
        })?;
        Ok(Connections {
            by_id: RwLock::default(),
            routes: ArcSwap::default(),
            store,
            budgets: Budgets::default(),
            client,
            base,
            spool,
            default_plugin,
            defer: Default::default(),
            changing: tokio::sync::Mutex::new(()),
            host_gate: CallGate::new(host_calls()),
            host_interpreters: Arc::new(tokio::sync::Semaphore::new(host_calls())),
            canaried: Mutex::default(),
            approved_base_urls: RwLock::default(),
            secret_sources: RwLock::default(),
            fence: Default::default(),
            hold: Default::default(),
            mapping_pool: MappingPool::new(StageConfig::default_workers()).context("starting the mapping workers")?,
        })
    }

    /// The version a connection gets when it names none.
    pub fn default_plugin(&self) -> Arc<Plugin> {
        self.default_plugin.clone()
    }

    /// The base URLs a connection made through the admin API (or announced
    /// on the stream) may send to instead of its plugin's host: the
    /// operator's, given at start. The host's own base URL is always one.
    pub fn approve_base_urls(&self, urls: Vec<url::Url>) {
        let mut approved = urls;
        approved.extend(self.base.base_url.clone());
        *self.approved_base_urls.write().unwrap() = approved;
    }

    /// The secret sources a connection made or changed through the admin
    /// API (or announced on the stream) may name: the operator's choice at
    /// start. None by default.
    pub fn allow_secret_sources(&self, sources: SecretSources) {
        *self.secret_sources.write().unwrap() = sources;
    }

    /// Refuses a setting that names a secret source the operator did not
    /// allow: an environment variable without an allowed prefix, or a file
    /// outside the allowed directories (checked on its real path, links
    /// followed). The answer never says whether a path exists.
    pub fn check_secret_sources(&self, id: &str, settings: &Map<String, Value>) -> anyhow::Result<()> {
        let allowed = self.secret_sources.read().unwrap();
        for (name, value) in settings {
            let Some(source) = value.as_object().filter(|o| o.len() == 1) else {
                continue;
            };
            if let Some(Value::String(variable)) = source.get("env")
                && !allowed.env_prefixes.iter().any(|p| variable.starts_with(p.as_str()))
            {
                bail!(
                    "connection {id}: setting {name} names ${variable}, which the operator has not allowed (allowed prefixes: {}); an operator allows a prefix with serve --admin-secret-env-prefix",
                    if allowed.env_prefixes.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.env_prefixes.join(", ")
                    }
                );
            }
            if let Some(Value::String(path)) = source.get("file") {
                let inside = std::fs::canonicalize(path)
                    .ok()
                    .is_some_and(|real| allowed.dirs.iter().any(|dir| real.starts_with(dir)));
                if !inside {
                    bail!(
                        "connection {id}: setting {name} names the file {path}, which is not inside a directory the operator allowed for secrets (allowed: {}); an operator allows one with serve --admin-secret-dir",
                        if allowed.dirs.is_empty() {
                            "none".to_string()
                        } else {
                            allowed
                                .dirs
                                .iter()
                                .map(|d| d.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    );
                }
            }
        }
        Ok(())
    }

    /// What an admin token (or a writer of the stream's KV bucket) may put
    /// on a connection, and what it may not: a base URL the operator did
    /// not approve at start (it would receive the connection's key in the
    /// `Authorization` header), or a plugin that declares a host the
    /// operator's plugin does not (the same, through the plugin). Each
    /// refusal says what to change.
    pub fn check_approved(&self, id: &str, base_url: Option<&url::Url>, plugin: &Plugin) -> anyhow::Result<()> {
        if let Some(url) = base_url {
            let approved = self.approved_base_urls.read().unwrap();
            if !approved
                .iter()
                .any(|a| a.as_str().trim_end_matches('/') == url.as_str().trim_end_matches('/'))
            {
                let list: Vec<&str> = approved.iter().map(url::Url::as_str).collect();
                bail!(
                    "connection {id}: base_url {url} is not one the operator approved (approved: {}); an operator adds it with serve --approve-base-url",
                    if list.is_empty() {
                        "none".to_string()
                    } else {
                        list.join(", ")
                    }
                );
            }
        }
        let approved_hosts = &self.default_plugin.manifest().allowed_hosts;
        if let Some(host) = plugin
            .manifest()
            .allowed_hosts
            .iter()
            .find(|h| !approved_hosts.contains(h))
        {
            bail!(
                "connection {id}: plugin {plugin} declares host {host}, which the operator has not approved (approved: {})",
                approved_hosts.join(", ")
            );
        }
        Ok(())
    }

    /// The budgets of the accounts sent to, one per account.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    pub fn get(&self, id: &str) -> Option<Arc<Connection>> {
        self.by_id.read().unwrap().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.by_id.read().unwrap().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connections that take events sent with `key`: none for a key
    /// no connection has (or only draining ones).
    pub fn route(&self, key: &str) -> Vec<Arc<Connection>> {
        let routes = self.routes.load();
        routes
            .get(&key_hash(key))
            .map(|all| all.iter().filter(|c| c.state().accepts()).cloned().collect())
            .unwrap_or_default()
    }

    fn rebuild_routes(&self) {
        let mut routes: HashMap<String, Vec<Arc<Connection>>> = HashMap::new();
        for connection in self.by_id.read().unwrap().values() {
            for hash in &connection.spec.lock().unwrap().write_key_hashes {
                routes.entry(hash.clone()).or_default().push(connection.clone());
            }
        }
        self.routes.store(Arc::new(routes));
    }

    /// The connection the flags describe (`serve` without a connection
    /// config, as before connections): not kept in the spool.
    pub fn add_from_flags(
        &self,
        id: &str,
        write_keys: &[String],
        slot: Arc<PluginSlot>,
        settings: DestinationSettings,
    ) -> anyhow::Result<()> {
        if self.get(id).is_some() {
            bail!(
                "the spool or the config file has a connection named {id:?}, the name of the connection serve's flags describe; rename it, or give no write keys to the flags"
            );
        }
        let plugin = slot.current().plugin.clone();
        let spec = Spec {
            write_key_hashes: write_keys.iter().map(|k| key_hash(k)).collect(),
            plugin: plugin.sha256_hex(),
            previous_plugin: None,
            settings: Map::new(),
            base_url: None,
        };
        let connection = self.assemble(id, spec, ConnState::Active, slot, settings, true)?;
        self.by_id.write().unwrap().insert(id.to_string(), connection);
        self.rebuild_routes();
        self.tidy();
        Ok(())
    }

    /// The connections kept in the spool, loaded at start; each is checked
    /// as it would be if it were created now, and one that fails is
    /// skipped with the reason logged (its events wait for it).
    pub fn load_stored(&self) -> anyhow::Result<()> {
        for stored in self.spool.connections()? {
            let loaded = serde_json::from_value::<Spec>(stored.spec.clone())
                .map_err(anyhow::Error::from)
                .and_then(|spec| Ok((spec, ConnState::parse(&stored.state)?)))
                .and_then(|(spec, state)| self.build(&stored.id, spec, state, false));
            match loaded {
                Ok(connection) => {
                    self.by_id.write().unwrap().insert(stored.id.clone(), connection);
                }
                Err(e) => tracing::error!(connection = %stored.id, "cannot serve this connection: {e:#}"),
            }
        }
        self.rebuild_routes();
        self.tidy();
        Ok(())
    }

    /// Creates a connection (durably) from its description; `plugin` is
    /// resolved by the caller (a file path in the config file, a SHA-256
    /// in the admin API).
    pub async fn create(&self, new: NewConnection, plugin: Option<Arc<Plugin>>) -> anyhow::Result<Arc<Connection>> {
        check_id(&new.id)?;
        if new.write_keys.iter().any(|k| k.trim().is_empty()) || new.write_keys.is_empty() {
            bail!("connection {}: write_keys must name at least one non-empty key", new.id);
        }
        let _changing = self.changing.lock().await;
        if self.get(&new.id).is_some() {
            bail!("connection {} exists already", new.id);
        }
        let plugin = plugin.unwrap_or_else(|| self.default_plugin.clone());
        let state = match new.state.as_deref() {
            None => ConnState::Active,
            Some(text) => ConnState::parse(text).with_context(|| format!("connection {}", new.id))?,
        };
        if state == ConnState::Draining {
            bail!("connection {}: a new connection cannot be draining", new.id);
        }
        let spec = Spec {
            write_key_hashes: new.write_keys.iter().map(|k| key_hash(k)).collect(),
            plugin: plugin.sha256_hex(),
            previous_plugin: None,
            settings: new.settings,
            base_url: new.base_url,
        };
        let id = new.id.clone();
        let connection = {
            let (spool, this) = (self.spool.clone(), self);
            let connection = tokio::task::block_in_place(|| this.build(&id, spec, state, true))?;
            spool.save_connection(&connection.stored())?;
            connection
        };
        self.by_id.write().unwrap().insert(id, connection.clone());
        self.rebuild_routes();
        // Its version's pool serves again if no one served it before.
        self.tidy();
        Ok(connection)
    }

    /// Builds a connection from its spec: resolves its secrets, checks its
    /// settings with its plugin (`canary`: and maps the golden events, as a
    /// swap would; at start, the settings are checked alone).
    fn build(&self, id: &str, spec: Spec, state: ConnState, canary: bool) -> anyhow::Result<Arc<Connection>> {
        check_id(id)?;
        let plugin = self.store.get(&spec.plugin)?;
        let settings = resolve(id, &spec.settings, &plugin)?;
        let slot = PluginSlot::sharing(plugin.clone(), crate::canary::canary(&settings));
        let tried = (plugin.sha256_hex(), settings.public_json().to_string());
        let golden = canary && !self.canaried.lock().unwrap().contains(&tried);
        check_settings(&plugin, &settings, golden)?;
        if golden {
            self.canaried.lock().unwrap().insert(tried);
        }
        if let Some(previous) = &spec.previous_plugin
            && let Ok(previous) = self.store.get(previous)
        {
            // Kept for a rollback, as a swap leaves it.
            slot.remember_previous(previous);
        }
        self.assemble(id, spec, state, slot, settings, false)
    }

    fn assemble(
        &self,
        id: &str,
        spec: Spec,
        state: ConnState,
        slot: Arc<PluginSlot>,
        settings: DestinationSettings,
        from_flags: bool,
    ) -> anyhow::Result<Arc<Connection>> {
        let mut config = self.base.clone();
        if spec.base_url.is_some() {
            config.base_url = spec.base_url.clone();
        }
        if !from_flags {
            // One event of a connection of many mapped at a time (and one
            // more per event stuck in the plugin): one core's worth of
            // mapping is far more than one shop's Klaviyo budget, and the
            // pool's other workers stay free for the other shops.
            config.mapping_workers = 1;
        }
        let pacer = self.budgets.of(&settings.account_hash(slot.name()));
        let defer = self.defer.clone();
        let deferred: DeferObserver = Box::new(move |id, until| {
            if let Some(defer) = defer.get() {
                defer(id, until)
            }
        });
        // Retry-After waits of events handed in (`Engines::hand`), taken by
        // delivery before each event's first request.
        let waits: Waits = Arc::default();
        let parts = Parts {
            client: Some(self.client.clone()),
            pacer: Some(pacer),
            progress: Some(Arc::new(Progress::default())),
            deferred: Some(deferred),
            map_gates: Some(CallGates {
                // A fair share: a quarter of the host's calls, half its
                // cores, so that one connection whose plugin loops until
                // its deadline (burning a core each call) leaves the
                // others room, in calls and in CPU. The flags' connection
                // alone has the host to itself.
                own: CallGate::new(if from_flags { host_calls() } else { host_calls() / 4 }),
                host: self.host_gate.clone(),
            }),
            host_interpreters: Some(self.host_interpreters.clone()),
            fence: Some(self.fence.clone()),
            hold: Some(self.hold.clone()),
            mapping_pool: Some(self.mapping_pool.clone()),
            not_before: Some({
                let waits = waits.clone();
                Arc::new(move |id| waits.lock().unwrap().remove(&id))
            }),
        };
        let delivery = Delivery::build(slot.clone(), cdp_core::settings::cell(settings), config, parts)
            .with_context(|| format!("connection {id}"))?;
        Ok(Arc::new(Connection {
            id: id.to_string(),
            spec: Mutex::new(spec),
            state: Mutex::new(state),
            slot,
            delivery,
            metrics: ConnMetrics::default(),
            in_flight: Mutex::default(),
            held: Arc::new(tokio::sync::Semaphore::new(if from_flags {
                FLAGS_CONNECTION_EVENTS
            } else {
                CONNECTION_EVENTS
            })),
            held_bytes: Arc::new(tokio::sync::Semaphore::new(CONNECTION_BYTES / 1024)),
            waits,
            feeder: Mutex::default(),
            feeding: AtomicBool::new(false),
            wake: Notify::new(),
            from_flags,
        }))
    }

    /// Updates settings (merged: a key set to null is removed) and write
    /// keys. The new settings are checked by the connection's plugin and
    /// take effect from the next call and the next request; events in
    /// flight finish as they are. A secret is rotated by naming its new
    /// source here: the value is read now, and the budget follows the key.
    pub async fn update(&self, id: &str, change: &Value) -> anyhow::Result<Arc<Connection>> {
        let _changing = self.changing.lock().await;
        let connection = self.get(id).with_context(|| format!("no connection {id}"))?;
        let Some(change) = change.as_object() else {
            bail!("the change must be a JSON object with settings and/or write_keys");
        };
        if let Some(unknown) = change.keys().find(|k| !matches!(k.as_str(), "settings" | "write_keys")) {
            bail!("unknown field {unknown:?}; a connection's settings and write_keys can be changed");
        }
        let mut spec = connection.spec();
        if let Some(settings) = change.get("settings") {
            let Some(settings) = settings.as_object() else {
                bail!("settings must be a JSON object");
            };
            for (name, value) in settings {
                if value.is_null() {
                    spec.settings.remove(name);
                } else {
                    spec.settings.insert(name.clone(), value.clone());
                }
            }
        }
        if let Some(keys) = change.get("write_keys") {
            let keys: Vec<String> =
                serde_json::from_value(keys.clone()).context("write_keys must be a list of strings")?;
            if keys.is_empty() || keys.iter().any(|k| k.trim().is_empty()) {
                bail!("write_keys must name at least one non-empty key");
            }
            spec.write_key_hashes = keys.iter().map(|k| key_hash(k)).collect();
        }
        let plugin = connection.slot.current().plugin.clone();
        let settings = resolve(id, &spec.settings, &plugin)?;
        tokio::task::block_in_place(|| check_settings(&plugin, &settings, false))?;
        let pacer = self.budgets.of(&settings.account_hash(connection.slot.name()));
        connection.slot.set_canary_settings(settings.public_json());
        connection.delivery.update_settings(settings, pacer)?;
        *connection.spec.lock().unwrap() = spec;
        self.save(&connection)?;
        self.rebuild_routes();
        Ok(connection)
    }

    /// A connection as another host on the stream announced it: made here
    /// if it is not (with the canary, as a create), or brought to its
    /// write keys, settings and state if it is. Its plugin version follows
    /// the stream's `chord_active` bucket, so the spec's version is used
    /// only to make it. The flags' connection is each host's own. Whether
    /// anything changed.
    pub async fn adopt(&self, stored: &StoredConnection) -> anyhow::Result<bool> {
        let spec: Spec = serde_json::from_value(stored.spec.clone()).context("the announced spec")?;
        let state = ConnState::parse(&stored.state)?;
        let _changing = self.changing.lock().await;
        self.check_secret_sources(&stored.id, &spec.settings)?;
        let Some(connection) = self.get(&stored.id) else {
            let plugin = self.store.get(&spec.plugin)?;
            self.check_approved(&stored.id, spec.base_url.as_ref(), &plugin)?;
            let connection = tokio::task::block_in_place(|| self.build(&stored.id, spec, state, true))?;
            self.spool.save_connection(&connection.stored())?;
            self.by_id.write().unwrap().insert(stored.id.clone(), connection);
            self.rebuild_routes();
            self.tidy();
            return Ok(true);
        };
        if connection.from_flags {
            return Ok(false);
        }
        let mut changed = false;
        let mut current = connection.spec();
        if current.settings != spec.settings || current.write_key_hashes != spec.write_key_hashes {
            let plugin = connection.slot.current().plugin.clone();
            let settings = resolve(&stored.id, &spec.settings, &plugin)?;
            tokio::task::block_in_place(|| check_settings(&plugin, &settings, false))?;
            let pacer = self.budgets.of(&settings.account_hash(connection.slot.name()));
            connection.slot.set_canary_settings(settings.public_json());
            connection.delivery.update_settings(settings, pacer)?;
            current.settings = spec.settings;
            current.write_key_hashes = spec.write_key_hashes;
            *connection.spec.lock().unwrap() = current;
            changed = true;
        }
        if connection.state() != state {
            *connection.state.lock().unwrap() = state;
            connection.wake.notify_one();
            changed = true;
        }
        if changed {
            self.save(&connection)?;
            self.rebuild_routes();
        }
        Ok(changed)
    }

    /// Pauses or resumes delivery (ingest keeps storing either way).
    pub async fn set_state(&self, id: &str, state: ConnState) -> anyhow::Result<Arc<Connection>> {
        let _changing = self.changing.lock().await;
        let connection = self.get(id).with_context(|| format!("no connection {id}"))?;
        let current = connection.state();
        if current == ConnState::Draining {
            bail!("connection {id} is being deleted");
        }
        *connection.state.lock().unwrap() = state;
        self.save(&connection)?;
        if current != state {
            connection.wake.notify_one();
        }
        Ok(connection)
    }

    /// Starts deleting a connection: it takes no new events, delivers the
    /// ones it has, and is removed once they are finished (its dead
    /// letters stay, for `dlq`).
    pub async fn delete(&self, id: &str) -> anyhow::Result<Arc<Connection>> {
        let _changing = self.changing.lock().await;
        let connection = self.get(id).with_context(|| format!("no connection {id}"))?;
        *connection.state.lock().unwrap() = ConnState::Draining;
        self.save(&connection)?;
        connection.wake.notify_one();
        Ok(connection)
    }

    /// Connections being deleted with no event in flight here: each is
    /// removed (`remove_deleted`) once its log has no event of it left.
    pub(crate) fn draining_idle(&self) -> Vec<Arc<Connection>> {
        self.all()
            .into_iter()
            .filter(|c| c.state() == ConnState::Draining && c.in_flight.lock().unwrap().is_empty())
            .collect()
    }

    /// Removes a deleted connection whose events are all finished (its
    /// dead letters stay, for `dlq`).
    pub(crate) fn remove_deleted(&self, connection: &Arc<Connection>) {
        if let Err(e) = self.spool.delete_connection(&connection.id) {
            tracing::error!(connection = %connection.id, "deleting: {e:#}");
            return;
        }
        let mut by_id = self.by_id.write().unwrap();
        if by_id.get(&connection.id).is_some_and(|c| Arc::ptr_eq(c, connection)) {
            by_id.remove(&connection.id);
        }
        drop(by_id);
        self.rebuild_routes();
        self.tidy();
        tracing::info!(connection = %connection.id, "deleted, its events delivered");
    }

    /// Rolls a stored version to one connection (a canary), checked with
    /// that connection's settings; the version it had is kept for a
    /// rollback.
    pub async fn swap(&self, id: &str, plugin: Arc<Plugin>) -> anyhow::Result<Arc<plugin_runtime::Loaded>> {
        let _changing = self.changing.lock().await;
        let connection = self.get(id).with_context(|| format!("no connection {id}"))?;
        let slot = connection.slot.clone();
        let loaded = tokio::task::spawn_blocking(move || slot.swap_to(plugin)).await??;
        {
            let mut spec = connection.spec.lock().unwrap();
            spec.previous_plugin = Some(std::mem::replace(&mut spec.plugin, loaded.plugin.sha256_hex()));
        }
        self.save(&connection)?;
        self.tidy();
        Ok(loaded)
    }

    /// Back to the version a connection had before its last swap.
    pub async fn rollback(&self, id: &str) -> anyhow::Result<Arc<plugin_runtime::Loaded>> {
        let _changing = self.changing.lock().await;
        let connection = self.get(id).with_context(|| format!("no connection {id}"))?;
        let loaded = connection.slot.rollback()?;
        {
            let mut spec = connection.spec.lock().unwrap();
            spec.previous_plugin = Some(std::mem::replace(&mut spec.plugin, loaded.plugin.sha256_hex()));
        }
        self.save(&connection)?;
        self.tidy();
        Ok(loaded)
    }

    fn save(&self, connection: &Connection) -> anyhow::Result<()> {
        if connection.from_flags {
            return Ok(());
        }
        self.spool.save_connection(&connection.stored())
    }

    /// Frees the instances of versions no connection serves.
    fn tidy(&self) {
        let serving: Vec<Arc<Plugin>> = self.all().iter().map(|c| c.slot.current().plugin.clone()).collect();
        self.store.tidy(&serving);
    }

    /// A connection as the admin API lists it.
    pub fn describe(&self, connection: &Connection, counts: Option<&crate::spool::Counts>) -> Value {
        let spec = connection.spec();
        let progress = &connection.delivery.progress;
        json!({
            "id": connection.id,
            "state": connection.state().as_str(),
            "write_keys": spec.write_key_hashes.len(),
            "plugin": describe(&connection.slot.current()),
            "previous_plugin": connection.slot.previous().map(|p| describe(&p)),
            "settings": spec.settings,
            "base_url": spec.base_url,
            "from_flags": connection.from_flags,
            "spool": counts,
            "since_start": {
                "received": connection.metrics.received.load(Ordering::Relaxed),
                "delivered": progress.delivered.load(Ordering::Relaxed),
                "dead_lettered": progress.dead_lettered.load(Ordering::Relaxed),
                "skipped": connection.metrics.skipped_by_code(),
            },
        })
    }
}

/// A connection's settings with its secrets read from the sources they
/// name. A secret given as a value is refused: the operator binds secrets
/// to sources, so that neither the spool nor the admin API holds a key.
fn resolve(id: &str, settings: &Map<String, Value>, plugin: &Plugin) -> anyhow::Result<DestinationSettings> {
    for spec in plugin.manifest().settings.iter().filter(|s| s.secret) {
        match settings.get(&spec.name) {
            None | Some(Value::Object(_)) => {}
            Some(_) => bail!(
                "connection {id}: setting {} is a secret; name its source as {{\"env\": \"VAR\"}} or {{\"file\": \"PATH\"}}, not its value",
                spec.name
            ),
        }
    }
    DestinationSettings::from_object(settings.clone(), plugin.manifest(), &[], |name| {
        std::env::var(name).ok()
    })
    .with_context(|| format!("connection {id}"))
}

/// The plugin's verdict on settings; with `canary`, also the golden events
/// mapped under them.
fn check_settings(plugin: &Arc<Plugin>, settings: &DestinationSettings, canary: bool) -> anyhow::Result<()> {
    let canary_run = Canary {
        settings_json: settings.public_json().to_string(),
        golden_events: std::borrow::Cow::Borrowed(if canary { crate::canary::EXAMPLE_EVENTS } else { "" }),
    };
    // On a pooled instance: a thousand connections checked at start must
    // not leave a thousand instances behind.
    let mut instance = plugin
        .pool()
        .checkout(plugin, plugin_runtime::Use::Mapping)
        .map_err(|e| anyhow::anyhow!("{plugin} {e} while starting"))?;
    Ok(canary_run.run(plugin, &mut instance)?)
}

/// A plugin version as the admin API shows it.
pub(super) fn version(plugin: &Plugin) -> Value {
    json!({
        "name": plugin.manifest().name,
        "version": plugin.manifest().version,
        "interface": plugin.interface(),
        "sha256": plugin.sha256_hex(),
    })
}

/// A loaded version: what it is, since when, and how much it mapped.
pub(super) fn describe(loaded: &plugin_runtime::Loaded) -> Value {
    let mut described = version(&loaded.plugin);
    described["loaded_at_unix_ms"] = json!(
        loaded
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    );
    described["events_mapped"] = json!(loaded.events_mapped.load(std::sync::atomic::Ordering::Relaxed));
    described
}
