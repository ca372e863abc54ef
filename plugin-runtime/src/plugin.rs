//! A loaded plugin and its instances. Each instance lives in its own store
//! with a memory cap and an epoch deadline; WASI is linked with nothing
//! granted, and stderr goes to a small in-memory buffer so a plugin's panic
//! message reaches the operator. After any failure an instance is dropped
//! (a trapped component store refuses all later calls anyway).
//!
//! Calls block, and must be made from a plain or `spawn_blocking` thread,
//! never from an async task: WASI's synchronous bindings (the guest's
//! stderr, say) drive tokio themselves and panic inside a runtime worker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::batching_bindings::{BatchingDestination, BatchingDestinationIndices};
use crate::bindings::{Destination, DestinationIndices};
use crate::call_env::CallEnv;
use crate::egress::EgressPolicy;
use crate::output::{self, OutputError};
use crate::pool::InstancePool;
use crate::runtime::{Limits, LoadError, Runtime, SlotTicket, TICK, hex};
use crate::skip_codes_bindings::{SkipCodingDestination, SkipCodingDestinationIndices};
use crate::{
    BatchClass, BatchItem, BatchVerdict, DestinationManifest, HttpRequest, HttpResponse, ItemVerdict, Mapping,
    SettingError, SkipCode, Verdict,
};

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

/// What a plugin exports, found at load: the `plugin` interface, and
/// `batching` when it has it.
pub(crate) struct Exports {
    pub(crate) pre: wasmtime::component::InstancePre<PluginState>,
    pub(crate) indices: DestinationIndices,
    pub(crate) batching: Option<BatchingDestinationIndices>,
    pub(crate) skip_codes: Option<SkipCodingDestinationIndices>,
}

/// A loaded, checked plugin, ready to instantiate.
pub struct Plugin {
    runtime: Arc<Runtime>,
    exports: Exports,
    interface: String,
    sha256: [u8; 32],
    size: usize,
    manifest: DestinationManifest,
    egress: EgressPolicy,
    pool: InstancePool,
    /// Its skip codes (`skip-codes`, since 1.2): (code, reason prefix).
    skip_codes: Vec<SkipCode>,
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
    /// Reads the manifest from a first instance, which then waits in the
    /// pool for the first call.
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        exports: Exports,
        source_name: String,
        interface: String,
        sha256: [u8; 32],
        size: usize,
    ) -> Result<Plugin, LoadError> {
        let mut plugin = Plugin {
            runtime,
            exports,
            interface,
            sha256,
            size,
            manifest: empty_manifest(),
            egress: EgressPolicy::new(&[]),
            pool: InstancePool::default(),
            skip_codes: Vec::new(),
        };
        let manifest_error = |e: CallError| LoadError::Manifest {
            source_name: source_name.clone(),
            reason: e.to_string(),
        };
        let mut instance = plugin.instance().map_err(manifest_error)?;
        plugin.manifest = instance.manifest().map_err(manifest_error)?;
        plugin.egress = EgressPolicy::new(&plugin.manifest.allowed_hosts);
        if instance.skip_coding.is_some() {
            plugin.skip_codes = instance.skip_codes().map_err(manifest_error)?;
        }
        plugin.pool.add(crate::pool::Use::Mapping, instance);
        Ok(plugin)
    }

    pub fn manifest(&self) -> &DestinationManifest {
        &self.manifest
    }

    /// `chord:destination/plugin@1.0.0`.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Whether it exports `batching` (since 1.1).
    pub fn batches(&self) -> bool {
        self.exports.batching.is_some()
    }

    /// Its skip codes (since 1.2; none for an older plugin).
    pub fn skip_codes(&self) -> &[SkipCode] {
        &self.skip_codes
    }

    /// The code of one of its skip reasons, for a metric's label: the first
    /// code whose prefix begins the reason, else `other`. Never the
    /// reason's own text, which may quote the event.
    pub fn skip_code(&self, reason: &str) -> &str {
        self.skip_codes
            .iter()
            .find(|c| reason.starts_with(&c.reason_prefix))
            .map_or("other", |c| c.code.as_str())
    }

    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The hosts this plugin may reach, from its manifest.
    pub fn egress(&self) -> &EgressPolicy {
        &self.egress
    }

    /// Its idle instances, shared by every caller.
    pub fn pool(&self) -> &InstancePool {
        &self.pool
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// A fresh instance in its own store.
    pub fn instance(&self) -> Result<Instance, CallError> {
        let limits = &self.runtime.limits;
        let stderr = MemoryOutputPipe::new(limits.stderr_bytes);
        let env = Arc::new(CallEnv::default());
        let mut wasi = WasiCtx::builder();
        wasi.stderr(stderr.clone());
        env.install(&mut wasi);
        let state = PluginState {
            wasi: wasi.build(),
            env,
            table: ResourceTable::new(),
            memory: MemoryCap {
                limit: limits.memory_bytes,
                hit: false,
                size: 0,
            },
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.memory);
        store.set_epoch_deadline(deadline_ticks(limits.deadline));
        let instance = self.exports.pre.instantiate(&mut store).map_err(|e| {
            if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
                CallError::Busy(self.runtime.instance_slots)
            } else {
                classify(e.into(), &store, &stderr, limits)
            }
        })?;
        let bindings = self
            .exports
            .indices
            .load(&mut store, &instance)
            .map_err(|e| classify(e.into(), &store, &stderr, limits))?;
        let batching = match &self.exports.batching {
            Some(indices) => Some(
                indices
                    .load(&mut store, &instance)
                    .map_err(|e| classify(e.into(), &store, &stderr, limits))?,
            ),
            None => None,
        };
        let skip_coding = match &self.exports.skip_codes {
            Some(indices) => Some(
                indices
                    .load(&mut store, &instance)
                    .map_err(|e| classify(e.into(), &store, &stderr, limits))?,
            ),
            None => None,
        };
        Ok(Instance {
            store,
            bindings,
            batching,
            skip_coding,
            stderr,
            limits: limits.clone(),
            calls: 0,
            failed: false,
            _slot: SlotTicket(self.runtime.freed.clone()),
            replacement_requested: false,
        })
    }

    /// Checks a mapping's requests against the manifest and the limits.
    pub fn check_mapping(&self, mapping: &Mapping) -> Result<(), OutputError> {
        output::check_mapping(mapping, &self.manifest, &self.egress, &self.runtime.limits)
    }

    /// Checks one request (e.g. a replacement from `interpret`).
    pub fn check_requests(&self, requests: &[HttpRequest]) -> Result<(), OutputError> {
        output::check_requests(requests, &self.manifest, &self.egress, &self.runtime.limits)
    }
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
    batching: Option<BatchingDestination>,
    skip_coding: Option<SkipCodingDestination>,
    stderr: MemoryOutputPipe,
    limits: Limits,
    calls: u32,
    /// A call failed: the instance must not serve again.
    pub(crate) failed: bool,
    /// A replacement is being prepared (see the pool).
    pub(crate) replacement_requested: bool,
    /// Last, so it drops after the store: tells waiters a slot is free.
    _slot: SlotTicket,
}

impl Instance {
    /// Whether it has served its share of calls and should be replaced by
    /// a fresh one (bounding what a long-lived instance can accumulate).
    /// Also when its memory has grown past what an idle instance may keep
    /// (a wasm memory never shrinks: one very large event would otherwise
    /// hold its high-water mark in every instance that saw one).
    pub fn worn_out(&self) -> bool {
        self.calls >= self.limits.calls_per_instance || self.memory_bytes() > self.limits.keep_memory_bytes
    }

    /// Its linear memory's size.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().memory.size
    }

    fn call<R>(
        &mut self,
        now_unix_ms: Option<i64>,
        f: impl FnOnce(&Destination, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        self.calls += 1;
        self.store.data().env.begin(now_unix_ms, self.calls);
        self.store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        let result = f(&self.bindings, &mut self.store);
        self.settle(result)
    }

    /// A call's result; an error leaves the instance failed.
    fn settle<R>(&mut self, result: wasmtime::Result<R>) -> Result<R, CallError> {
        result.map_err(|err| {
            self.failed = true;
            classify(err.into(), &self.store, &self.stderr, &self.limits)
        })
    }

    /// Output that breaks the limits also leaves the instance failed: it is
    /// not trusted with another call.
    fn refuse<R>(&mut self, checked: Result<R, OutputError>) -> Result<R, CallError> {
        checked.map_err(|e| {
            self.failed = true;
            CallError::Output(e)
        })
    }

    /// A call to `batching`, which only a batching plugin's instance has.
    fn call_batching<R>(
        &mut self,
        f: impl FnOnce(&BatchingDestination, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let Some(batching) = &self.batching else {
            self.failed = true;
            return Err(CallError::Trap("does not export batching".to_string()));
        };
        self.calls += 1;
        self.store.data().env.begin(None, self.calls);
        self.store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        let result = f(batching, &mut self.store);
        self.settle(result)
    }

    /// The batch classes these settings allow (`batching.batch-classes`).
    pub fn batch_classes(&mut self, settings: &str) -> Result<Vec<BatchClass>, CallError> {
        let classes = self.call_batching(|b, s| b.chord_destination_batching().call_batch_classes(s, settings))?;
        let checked = output::check_batch_classes(&classes, &self.limits);
        self.refuse(checked)?;
        Ok(classes)
    }

    /// Whether a mapped request may be batched, and as what.
    pub fn batchable(&mut self, settings: &str, request: &HttpRequest) -> Result<Option<BatchItem>, CallError> {
        let item = self.call_batching(|b, s| b.chord_destination_batching().call_batchable(s, settings, request))?;
        if let Some(item) = &item {
            let checked = output::check_batch_item(item, &self.limits);
            self.refuse(checked)?;
        }
        Ok(item)
    }

    /// One request carrying `items` of `class`.
    pub fn assemble(
        &mut self,
        settings: &str,
        class: &str,
        items: &[String],
    ) -> Result<Result<HttpRequest, String>, CallError> {
        let assembled =
            self.call_batching(|b, s| b.chord_destination_batching().call_assemble(s, settings, class, items))?;
        if let Err(reason) = &assembled {
            let checked = output::text("a reason a batch cannot be assembled", reason, &self.limits);
            self.refuse(checked)?;
        }
        Ok(assembled)
    }

    /// Judges the response to a batch request or a follow-up of one: one
    /// verdict per item, a retry of the whole batch, or a follow-up.
    pub fn judge(
        &mut self,
        settings: &str,
        class: &str,
        items: &[String],
        request: &HttpRequest,
        response: &HttpResponse,
    ) -> Result<BatchVerdict, CallError> {
        let verdict = self.call_batching(|b, s| {
            b.chord_destination_batching()
                .call_judge(s, settings, class, items, request, response)
        })?;
        if let BatchVerdict::Items(verdicts) = &verdict {
            if verdicts.len() != items.len() {
                let count = OutputError::VerdictCount {
                    verdicts: verdicts.len(),
                    items: items.len(),
                };
                return self.refuse(Err(count));
            }
            for verdict in verdicts {
                if let ItemVerdict::Rejected(reason) = verdict {
                    let checked = output::text("an item's rejection reason", reason, &self.limits);
                    self.refuse(checked)?;
                }
            }
        }
        Ok(verdict)
    }

    /// The plugin's skip codes (`skip-codes.codes`), checked.
    fn skip_codes(&mut self) -> Result<Vec<SkipCode>, CallError> {
        let Some(coding) = self.skip_coding.take() else {
            return Ok(Vec::new());
        };
        let codes = self.call(None, |_, s| coding.chord_destination_skip_codes().call_codes(s));
        self.skip_coding = Some(coding);
        let codes = codes?;
        let checked = output::check_skip_codes(&codes);
        self.refuse(checked)?;
        Ok(codes)
    }

    pub fn manifest(&mut self) -> Result<DestinationManifest, CallError> {
        let manifest = self.call(None, |b, s| b.chord_destination_plugin().call_manifest(s))?;
        let checked = output::check_manifest(&manifest, &self.limits);
        self.refuse(checked)?;
        Ok(manifest)
    }

    pub fn validate_settings(&mut self, settings: &str) -> Result<Result<(), Vec<SettingError>>, CallError> {
        let verdict = self.call(None, |b, s| {
            b.chord_destination_plugin().call_validate_settings(s, settings)
        })?;
        if let Err(errors) = &verdict {
            let checked = output::check_setting_errors(errors, &self.limits);
            self.refuse(checked)?;
        }
        Ok(verdict)
    }

    pub fn map_event(&mut self, settings: &str, event: &str, now_unix_ms: i64) -> Result<Mapping, CallError> {
        let mapping = self.call(Some(now_unix_ms), |b, s| {
            b.chord_destination_plugin()
                .call_map_event(s, settings, event, now_unix_ms)
        })?;
        let checked = output::check_mapping_texts(&mapping, &self.limits);
        self.refuse(checked)?;
        Ok(mapping)
    }

    pub fn interpret(
        &mut self,
        settings: &str,
        request: &HttpRequest,
        response: &HttpResponse,
    ) -> Result<Verdict, CallError> {
        let verdict = self.call(None, |b, s| {
            b.chord_destination_plugin()
                .call_interpret(s, settings, request, response)
        })?;
        let checked = output::check_verdict_texts(&verdict, &self.limits);
        self.refuse(checked)?;
        Ok(verdict)
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
pub(crate) struct PluginState {
    wasi: WasiCtx,
    /// The clocks and randomness the plugin sees (see `call_env`).
    env: Arc<CallEnv>,
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
    /// The largest linear memory grown to so far.
    size: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.size = self.size.max(desired);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
