//! Loading and calling destination plugins: a narrow wrapper around
//! wasmtime that fixes the few choices a CDP host must get right for code
//! it did not write.
//!
//! - One `Engine` per process, with epoch interruption driven by a ticker
//!   thread, so every call has a deadline a loop cannot escape (epochs, not
//!   fuel: the check is cheaper and a wall-clock deadline is what an
//!   operator sets).
//! - WASI is linked with nothing granted: no files, environment, arguments,
//!   network or inherited stdio; stderr goes to a small in-memory buffer so
//!   a plugin's panic message reaches the operator.
//! - Each instance has a memory cap; after any failure its store is dropped
//!   (a trapped component store refuses all later calls anyway) and the next
//!   call gets a fresh instance from the pre-instantiated `InstancePre`.
//! - What a plugin returns is checked before the host acts on it: request
//!   count and size, https URLs to declared hosts only, declared rate
//!   classes and secrets.
//!
//! Calls block, and must be made from a plain or `spawn_blocking` thread,
//! never from an async task: WASI's synchronous bindings (the guest's
//! stderr, say) drive tokio themselves and panic inside a runtime worker.

mod cache;
mod output;
mod slot;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use output::OutputError;
pub use slot::{Loaded, PluginSlot, SwapError, count_mapped, warmed_instance};

mod bindings {
    wasmtime::component::bindgen!({
        world: "destination",
        path: "../wit",
    });
}

pub use bindings::chord::destination::types::{
    DestinationManifest, Header, HttpRequest, HttpResponse, Mapping, Outcome, RateClass, SettingError, SettingKind,
    SettingSpec, Verdict,
};
use bindings::{Destination, DestinationPre};

/// The interface a plugin must export, and the major version this host speaks.
pub const INTERFACE: &str = "chord:destination/plugin";
pub const INTERFACE_MAJOR: u64 = 1;

/// The Klaviyo destination built with this host, used when no `--plugin`
/// is given.
pub const BUNDLED_KLAVIYO: &[u8] = include_bytes!(env!("KLAVIYO_COMPONENT"));

/// Epoch tick: the granularity of call deadlines.
const TICK: Duration = Duration::from_millis(10);

/// What one plugin call may use. Defaults suit the Klaviyo plugin with wide
/// margins: its heaviest call (a 5 MB event) takes milliseconds and a few
/// MiB of memory.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time for one call.
    pub deadline: Duration,
    /// Linear memory of one instance.
    pub memory_bytes: usize,
    /// Requests one mapping may return.
    pub max_requests: usize,
    /// Total body bytes one mapping may return.
    pub max_output_bytes: usize,
    /// Captured stderr per instance.
    pub stderr_bytes: usize,
    /// Calls an instance serves before it is replaced by a fresh one.
    pub calls_per_instance: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(1_000),
            memory_bytes: 128 << 20,
            max_requests: 1_000,
            max_output_bytes: 64 << 20,
            stderr_bytes: 64 << 10,
            calls_per_instance: 10_000,
        }
    }
}

/// How the runtime is set up.
#[derive(Clone, Debug, Default)]
pub struct RuntimeConfig {
    pub limits: Limits,
    /// Concurrent instances to size the pooling allocator for.
    pub concurrency: u32,
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
}

/// Why a plugin could not be loaded. Each is one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{source_name} is not a WebAssembly file (it does not start with the \\0asm magic number)")]
    NotWasm { source_name: String },
    #[error(
        "{source_name} is a core WebAssembly module, not a component; build the plugin for the wasm32-wasip2 target"
    )]
    CoreModule { source_name: String },
    #[error("{source_name} is not a valid WebAssembly component: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error(
        "{source_name} is not a compatible destination plugin: expected it to export {INTERFACE}@{INTERFACE_MAJOR}.x, found {found}"
    )]
    Incompatible { source_name: String, found: String },
    #[error("{source_name} needs imports this host does not provide: {reason}")]
    Link { source_name: String, reason: String },
    #[error("{source_name} failed while describing itself: {reason}")]
    Manifest { source_name: String, reason: String },
}

/// Why one plugin call failed. The instance that failed is discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("exceeded its {0:?} deadline")]
    Deadline(Duration),
    #[error("reached its memory limit of {} MiB", .0 >> 20)]
    Memory(usize),
    #[error("panicked: {0}")]
    Panic(String),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned unusable output: {0}")]
    Output(#[from] OutputError),
    /// Not the plugin's fault: every instance slot the host reserved is in
    /// use. Worth another try once one frees up.
    #[error("could not be instantiated: all {0} instance slots are in use")]
    Busy(u32),
}

/// The engine, linker and deadline ticker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    limits: Limits,
    cache: Option<cache::ComponentCache>,
    pooling: bool,
    /// Instances that may exist at once (pooling slots).
    instance_slots: u32,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Arc<Runtime>> {
        let limits = config.limits.clone();
        let (engine, pooling) = match Engine::new(&engine_config(&config, true)) {
            Ok(engine) => (engine, true),
            // The pooling allocator reserves its address space up front;
            // where the system refuses that, allocate on demand instead.
            Err(err) => {
                tracing::warn!("pooling allocator unavailable ({err}); allocating instances on demand");
                (
                    Engine::new(&engine_config(&config, false)).map_err(anyhow::Error::from)?,
                    false,
                )
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(anyhow::Error::from)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(&engine, ticker_stop.clone());
        let slots = instance_slots(&config);
        let cache = config.cache_dir.map(cache::ComponentCache::new);
        Ok(Arc::new(Runtime {
            engine,
            linker,
            limits,
            cache,
            pooling,
            instance_slots: slots,
            ticker_stop,
        }))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many instances may exist at once; callers keep their pools of
    /// idle and busy instances within it.
    pub fn instance_slots(&self) -> u32 {
        self.instance_slots
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// Compiles (or loads from the cache), checks and pre-instantiates a plugin.
    pub fn load(self: &Arc<Self>, bytes: &[u8], source_name: &str) -> Result<Plugin, LoadError> {
        let source_name = source_name.to_string();
        check_header(bytes, &source_name)?;
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        let component = match &self.cache {
            Some(cache) => cache.load_or_compile(&self.engine, bytes, &sha256),
            None => Component::from_binary(&self.engine, bytes).map_err(anyhow::Error::from),
        }
        .map_err(|e| LoadError::Invalid {
            source_name: source_name.clone(),
            reason: format!("{e:#}"),
        })?;
        let interface = exported_interface(&self.engine, &component, &source_name)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::Link {
            source_name: source_name.clone(),
            reason: format!("{e:#}"),
        })?;
        let pre = DestinationPre::new(pre).map_err(|e| LoadError::Incompatible {
            source_name: source_name.clone(),
            found: format!("{interface} with other functions ({e:#})"),
        })?;
        let mut plugin = Plugin {
            runtime: self.clone(),
            pre,
            source_name: source_name.clone(),
            interface,
            sha256,
            size: bytes.len(),
            manifest: empty_manifest(),
        };
        let mut instance = plugin.instance().map_err(|e| LoadError::Manifest {
            source_name: source_name.clone(),
            reason: e.to_string(),
        })?;
        plugin.manifest = instance.manifest().map_err(|e| LoadError::Manifest {
            source_name,
            reason: e.to_string(),
        })?;
        Ok(plugin)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(config: &RuntimeConfig, pooling: bool) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.epoch_interruption(true);
    if pooling {
        let slots = instance_slots(config);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots);
        pool.total_core_instances(slots * 4);
        pool.total_memories(slots * 4);
        pool.total_tables(slots * 4);
        pool.total_stacks(slots);
        pool.max_memory_size(config.limits.memory_bytes.max(1 << 20));
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    wasm
}

/// Room for one instance per unit of concurrency for each of mapping and
/// interpreting, plus a few for loading and validating plugins.
fn instance_slots(config: &RuntimeConfig) -> u32 {
    config.concurrency.max(1) * 2 + 4
}

/// Advances the engine's epoch every tick, for as long as the runtime lives.
fn spawn_ticker(engine: &Engine, stop: Arc<AtomicBool>) {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("plugin-deadlines".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .expect("spawning the deadline ticker");
}

/// Hex SHA-256, the identity of a plugin's bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tells a component from a core module or other bytes before compiling.
fn check_header(bytes: &[u8], source_name: &str) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm {
            source_name: source_name.to_string(),
        });
    }
    // Core modules have version 1 and layer 0; components layer 1.
    if bytes[6..8] == [0, 0] {
        return Err(LoadError::CoreModule {
            source_name: source_name.to_string(),
        });
    }
    Ok(())
}

/// The versioned name of the `plugin` interface the component exports,
/// refused unless its major version is the one this host speaks.
fn exported_interface(engine: &Engine, component: &Component, source_name: &str) -> Result<String, LoadError> {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let incompatible = |found: String| LoadError::Incompatible {
        source_name: source_name.to_string(),
        found,
    };
    let Some(name) = exports.iter().find(|n| n.starts_with(&format!("{INTERFACE}@"))) else {
        let found = if exports.is_empty() {
            "no exports".to_string()
        } else {
            format!("exports {}", exports.join(", "))
        };
        return Err(incompatible(found));
    };
    let version = &name[INTERFACE.len() + 1..];
    let major = version.split('.').next().and_then(|m| m.parse::<u64>().ok());
    if major != Some(INTERFACE_MAJOR) || version.contains('-') {
        return Err(incompatible(name.clone()));
    }
    Ok(name.clone())
}

fn empty_manifest() -> DestinationManifest {
    DestinationManifest {
        name: String::new(),
        version: String::new(),
        api_revision: String::new(),
        allowed_hosts: Vec::new(),
        rate_classes: Vec::new(),
        settings: Vec::new(),
    }
}

/// A loaded, checked plugin, ready to instantiate.
pub struct Plugin {
    runtime: Arc<Runtime>,
    pre: DestinationPre<PluginState>,
    source_name: String,
    interface: String,
    sha256: [u8; 32],
    size: usize,
    manifest: DestinationManifest,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Plugin({}@{}, {})",
            self.manifest.name,
            self.manifest.version,
            self.sha256_hex()
        )
    }
}

impl fmt::Display for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plugin {}@{}", self.manifest.name, self.manifest.version)
    }
}

impl Plugin {
    pub fn manifest(&self) -> &DestinationManifest {
        &self.manifest
    }

    /// `chord:destination/plugin@1.0.0`.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// A fresh instance in its own store.
    pub fn instance(&self) -> Result<Instance, CallError> {
        let limits = &self.runtime.limits;
        let stderr = MemoryOutputPipe::new(limits.stderr_bytes);
        let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
        let state = PluginState {
            wasi,
            table: ResourceTable::new(),
            memory: MemoryCap {
                limit: limits.memory_bytes,
                hit: false,
            },
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.memory);
        store.set_epoch_deadline(deadline_ticks(limits.deadline));
        let bindings = self.pre.instantiate(&mut store).map_err(|e| {
            if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
                CallError::Busy(self.runtime.instance_slots)
            } else {
                classify(e.into(), &store, &stderr, limits)
            }
        })?;
        Ok(Instance {
            store,
            bindings,
            stderr,
            limits: limits.clone(),
            calls: 0,
        })
    }

    /// Checks a mapping's requests against the manifest and the limits.
    pub fn check_mapping(&self, mapping: &Mapping) -> Result<(), OutputError> {
        output::check_mapping(mapping, &self.manifest, &self.runtime.limits)
    }

    /// Checks one request (e.g. a replacement from `interpret`).
    pub fn check_requests(&self, requests: &[HttpRequest]) -> Result<(), OutputError> {
        output::check_requests(requests, &self.manifest, &self.runtime.limits)
    }
}

/// Drops an instance on a background thread. Dropping a used instance
/// resets its memory (`madvise` over every page it touched): 0.6-0.8 ms
/// for a mapping instance, measured by `cargo bench --bench swap`, which a
/// mapping thread must not wait for. For the rare, bounded retirements (a
/// version swap, a worn-out instance): its pool slot is freed only when the
/// drop has run, so a loop that retires an instance per call can outrun
/// the thread and find the pool busy.
pub fn retire(instance: Instance) {
    static RETIRED: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Instance>>> =
        std::sync::OnceLock::new();
    let sender = RETIRED.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Instance>();
        std::thread::Builder::new()
            .name("plugin-retire".into())
            .spawn(move || receiver.into_iter().for_each(drop))
            .expect("spawning the instance retirer");
        std::sync::Mutex::new(sender)
    });
    // If the retirer is gone, the instance is dropped here instead.
    let _ = sender.lock().unwrap().send(instance);
}

/// Epoch ticks for a deadline. The call is interrupted at the N-th tick
/// after it starts, which comes between N-1 and N ticks later, so one more
/// tick than the deadline holds: a call gets at least its deadline and at
/// most one tick beyond it, never less.
fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_millis() as u64).div_ceil(TICK.as_millis() as u64).max(1) + 1
}

/// One instance of a plugin. Any failed call leaves it unusable: drop it
/// and take a fresh one.
pub struct Instance {
    store: Store<PluginState>,
    bindings: Destination,
    stderr: MemoryOutputPipe,
    limits: Limits,
    calls: u32,
}

impl Instance {
    /// Whether it has served its share of calls and should be replaced by
    /// a fresh one (bounding what a long-lived instance can accumulate).
    pub fn worn_out(&self) -> bool {
        self.calls >= self.limits.calls_per_instance
    }

    fn call<R>(
        &mut self,
        f: impl FnOnce(&Destination, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        self.calls += 1;
        self.store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        f(&self.bindings, &mut self.store).map_err(|err| classify(err.into(), &self.store, &self.stderr, &self.limits))
    }

    pub fn manifest(&mut self) -> Result<DestinationManifest, CallError> {
        self.call(|b, s| b.chord_destination_plugin().call_manifest(s))
    }

    pub fn validate_settings(&mut self, settings: &str) -> Result<Result<(), Vec<SettingError>>, CallError> {
        self.call(|b, s| b.chord_destination_plugin().call_validate_settings(s, settings))
    }

    pub fn map_event(&mut self, settings: &str, event: &str, now_unix_ms: i64) -> Result<Mapping, CallError> {
        self.call(|b, s| {
            b.chord_destination_plugin()
                .call_map_event(s, settings, event, now_unix_ms)
        })
    }

    pub fn interpret(
        &mut self,
        settings: &str,
        request: &HttpRequest,
        response: &HttpResponse,
    ) -> Result<Verdict, CallError> {
        self.call(|b, s| {
            b.chord_destination_plugin()
                .call_interpret(s, settings, request, response)
        })
    }
}

/// Turns a wasmtime error into the reason an operator reads.
fn classify(err: anyhow::Error, store: &Store<PluginState>, stderr: &MemoryOutputPipe, limits: &Limits) -> CallError {
    if store.data().memory.hit {
        return CallError::Memory(limits.memory_bytes);
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Deadline(limits.deadline),
        Some(trap) => {
            let stderr = String::from_utf8_lossy(&stderr.contents()).into_owned();
            match panic_message(&stderr) {
                Some(message) => CallError::Panic(message),
                None if stderr.contains("memory allocation of") => CallError::Memory(limits.memory_bytes),
                None => CallError::Trap(trap.to_string()),
            }
        }
        None => CallError::Trap(format!("{err}")),
    }
}

/// The message of a Rust panic as the guest printed it to stderr:
/// "thread '<unnamed>' panicked at src/lib.rs:4:5:\nthe message".
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at ")?;
    let rest = &stderr[start..];
    let (location, message) = rest.split_once(":\n").unwrap_or((rest, ""));
    let location = location.trim_start_matches("panicked at ");
    let message = message
        .lines()
        .take_while(|l| !l.starts_with("note:"))
        .collect::<Vec<_>>()
        .join(" ");
    let message: String = message.chars().take(500).collect();
    Some(format!("{message} (at {location})"))
}

/// What a store holds: WASI with nothing granted, and the memory cap.
struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory, remembering whether the cap was hit so the failure
/// can be named (the guest sees a failed grow and aborts).
struct MemoryCap {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
