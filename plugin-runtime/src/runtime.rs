//! The engine every plugin shares, and loading: compile (or read from the
//! cache), check the interface version, pre-instantiate, read the manifest.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::batching_bindings::BatchingDestinationIndices;
use crate::bindings::DestinationIndices;
use crate::cache::ComponentCache;
use crate::plugin::{Exports, Plugin, PluginState};
use crate::skip_codes_bindings::SkipCodingDestinationIndices;
use crate::{BATCHING_INTERFACE, INTERFACE, INTERFACE_MAJOR, SKIP_CODES_INTERFACE};

/// Epoch tick: the granularity of call deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(10);

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
    /// Linear memory an instance may keep between calls; one that grew
    /// beyond it is replaced by a fresh one.
    pub keep_memory_bytes: usize,
    /// Any one text a plugin returns: a skip or error reason, a warning, a
    /// verdict's reason, a setting error, a manifest field.
    pub max_text_bytes: usize,
    /// Warnings one mapping may return; also setting errors, and the
    /// entries of each manifest list.
    pub max_items: usize,
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
            keep_memory_bytes: 32 << 20,
            max_text_bytes: 16 << 10,
            max_items: 200,
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
    /// Write `/tmp/perf-PID.map`, so that `perf` names the plugin's own
    /// functions (compile with no cache: cached code is not listed).
    pub perf_map: bool,
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the WebAssembly engine could not be configured: {0}")]
    Engine(String),
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

/// The engine, linker and deadline ticker shared by every plugin.
pub struct Runtime {
    pub(crate) engine: Engine,
    linker: Linker<PluginState>,
    pub(crate) limits: Limits,
    cache: Option<ComponentCache>,
    pooling: bool,
    /// Instances that may exist at once (pooling slots).
    pub(crate) instance_slots: u32,
    /// Signalled each time an instance is dropped and its slot freed.
    pub(crate) freed: Arc<SlotsFreed>,
    ticker_stop: Arc<AtomicBool>,
}

/// Counts instances dropped, so a caller waiting for a free slot sleeps
/// until one is freed rather than polling.
#[derive(Default)]
pub(crate) struct SlotsFreed {
    count: std::sync::Mutex<u64>,
    changed: std::sync::Condvar,
}

impl SlotsFreed {
    /// How many have been freed so far: read before trying for a slot.
    pub(crate) fn seen(&self) -> u64 {
        *self.count.lock().unwrap()
    }

    /// Waits up to `timeout` for a slot freed after `seen`.
    pub(crate) fn wait_after(&self, seen: u64, timeout: std::time::Duration) {
        let count = self.count.lock().unwrap();
        let _ = self.changed.wait_timeout_while(count, timeout, |count| *count == seen);
    }

    fn freed(&self) {
        *self.count.lock().unwrap() += 1;
        self.changed.notify_all();
    }
}

/// Held by an instance as its last field: dropped after its store, so the
/// slot is free when waiters are told.
pub(crate) struct SlotTicket(pub(crate) Arc<SlotsFreed>);

impl Drop for SlotTicket {
    fn drop(&mut self) {
        self.0.freed();
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Arc<Runtime>, RuntimeError> {
        let engine_error = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let limits = config.limits.clone();
        let (engine, pooling) = match Engine::new(&engine_config(&config, true)) {
            Ok(engine) => (engine, true),
            // The pooling allocator reserves its address space up front;
            // where the system refuses that, allocate on demand instead.
            Err(err) => {
                tracing::warn!("pooling allocator unavailable ({err}); allocating instances on demand");
                (
                    Engine::new(&engine_config(&config, false)).map_err(engine_error)?,
                    false,
                )
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_error)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(&engine, ticker_stop.clone());
        let slots = instance_slots(&config);
        let cache = config.cache_dir.map(ComponentCache::new);
        Ok(Arc::new(Runtime {
            engine,
            linker,
            limits,
            cache,
            pooling,
            instance_slots: slots,
            freed: Arc::default(),
            ticker_stop,
        }))
    }

    /// How many instances may exist at once; callers keep their instances
    /// (idle and busy) within it.
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
        let indices = DestinationIndices::new(&pre).map_err(|e| LoadError::Incompatible {
            source_name: source_name.clone(),
            found: format!("{interface} with other functions ({e:#})"),
        })?;
        // Batching is optional: only a plugin that exports it is asked.
        let batching = match exports_optional(&self.engine, &component, BATCHING_INTERFACE) {
            false => None,
            true => Some(
                BatchingDestinationIndices::new(&pre).map_err(|e| LoadError::Incompatible {
                    source_name: source_name.clone(),
                    found: format!("{BATCHING_INTERFACE} with other functions ({e:#})"),
                })?,
            ),
        };
        let skip_codes = match exports_optional(&self.engine, &component, SKIP_CODES_INTERFACE) {
            false => None,
            true => Some(
                SkipCodingDestinationIndices::new(&pre).map_err(|e| LoadError::Incompatible {
                    source_name: source_name.clone(),
                    found: format!("{SKIP_CODES_INTERFACE} with other functions ({e:#})"),
                })?,
            ),
        };
        Plugin::new(
            self.clone(),
            Exports {
                pre,
                indices,
                batching,
                skip_codes,
            },
            source_name,
            interface,
            sha256,
            bytes.len(),
        )
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
    if config.perf_map {
        wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
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

pub(crate) fn hex(bytes: &[u8]) -> String {
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

/// Whether the component exports an optional interface (`batching`,
/// `skip-codes`) in this host's major version.
fn exports_optional(engine: &Engine, component: &Component, interface: &str) -> bool {
    component.component_type().exports(engine).any(|(name, _)| {
        name.strip_prefix(interface)
            .and_then(|rest| rest.strip_prefix('@'))
            .and_then(|version| version.split('.').next())
            .and_then(|major| major.parse::<u64>().ok())
            == Some(INTERFACE_MAJOR)
    })
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
