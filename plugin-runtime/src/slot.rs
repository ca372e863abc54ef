//! The active version of a destination, replaceable while events flow.
//!
//! A candidate is compiled and checked off the hot path: the interface
//! version (at load), the same destination name, hosts within what the
//! operator approved, the current settings, and a canary of golden events
//! mapped under the plugin limits without a single plugin failure. Only
//! then is it swapped in, atomically: callers read the slot once per event,
//! and each event carries the version that mapped it, so calls in flight
//! finish on the version they started on. The previous version stays
//! loaded for an instant rollback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::plugin::{CallError, Instance, Plugin};
use crate::pool::Use;
use crate::runtime::LoadError;

/// One loaded version and what it has done.
pub struct Loaded {
    pub plugin: Arc<Plugin>,
    pub loaded_at: SystemTime,
    pub events_mapped: AtomicU64,
}

impl Loaded {
    fn new(plugin: Arc<Plugin>) -> Arc<Loaded> {
        Arc::new(Loaded {
            plugin,
            loaded_at: SystemTime::now(),
            events_mapped: AtomicU64::new(0),
        })
    }

    /// Counts an event mapped by this version.
    pub fn count_mapped(&self) {
        self.events_mapped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a candidate was refused; the active version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("the candidate is destination {found:?}, but this slot serves {expected:?}")]
    OtherDestination { expected: String, found: String },
    #[error("the candidate declares host {host}, which the operator has not approved (approved: {approved})")]
    UnapprovedHost { host: String, approved: String },
    #[error("the candidate rejects the current settings: {0}")]
    Settings(String),
    #[error("the candidate failed its canary: {0}")]
    Canary(String),
    #[error("there is no previous version to roll back to")]
    NoPrevious,
}

/// What every version must get through before it serves: the settings it
/// will be called with (secrets left out), and golden events it must map
/// without a plugin failure. Skipping or refusing an event is a verdict,
/// not a failure: a destination that sends none of them passes.
#[derive(Clone, Debug)]
pub struct Canary {
    pub settings_json: String,
    /// Shared, not copied, by the slots of many connections.
    pub golden_events: std::borrow::Cow<'static, str>,
}

impl Canary {
    /// Runs the canary on `instance`, leaving it warmed (the plugin's lazy
    /// state built: 14 ms of phone metadata for the Klaviyo plugin).
    pub fn run(&self, plugin: &Plugin, instance: &mut Instance) -> Result<(), SwapError> {
        let started = Instant::now();
        match instance.validate_settings(&self.settings_json) {
            Ok(Ok(())) => {}
            Ok(Err(errors)) => {
                let problems: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.name, e.reason)).collect();
                return Err(SwapError::Settings(problems.join("; ")));
            }
            Err(e) => return Err(SwapError::Canary(format!("{plugin} {e} while validating settings"))),
        }
        let events = self
            .golden_events
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        for (index, event) in events {
            let mapping = instance
                .map_event(&self.settings_json, event, now_unix_ms())
                .map_err(|e| SwapError::Canary(format!("{plugin} {e} on golden event {}", index + 1)))?;
            plugin.check_mapping(&mapping).map_err(|e| {
                SwapError::Canary(format!(
                    "{plugin} returned unusable output on golden event {}: {e}",
                    index + 1
                ))
            })?;
        }
        tracing::debug!(%plugin, elapsed = ?started.elapsed(), "golden events mapped");
        Ok(())
    }

    /// A fresh instance of `plugin` that passed the canary.
    pub fn warmed_instance(&self, plugin: &Plugin) -> Result<Instance, SwapError> {
        let mut instance = plugin
            .instance()
            .map_err(|e| SwapError::Canary(format!("{plugin} {e} while starting")))?;
        self.run(plugin, &mut instance)?;
        Ok(instance)
    }
}

pub struct PluginSlot {
    name: String,
    approved_hosts: Vec<String>,
    canary: Mutex<Arc<Canary>>,
    active: ArcSwap<Loaded>,
    previous: Mutex<Option<Arc<Loaded>>>,
    /// Whether a swap closes the pool of the version it replaces (and a
    /// rollback reopens it). Not when versions are shared between slots:
    /// whoever shares them knows when no slot uses one any more.
    manages_pools: bool,
}

impl PluginSlot {
    /// A slot serving `plugin`; the hosts it declares are the approved ones.
    pub fn new(plugin: Arc<Plugin>, canary: Canary) -> Arc<PluginSlot> {
        PluginSlot::make(plugin, canary, true)
    }

    /// A slot serving a version other slots may serve too (one connection
    /// of many): swapping leaves the pools of the versions to their owner.
    pub fn sharing(plugin: Arc<Plugin>, canary: Canary) -> Arc<PluginSlot> {
        PluginSlot::make(plugin, canary, false)
    }

    fn make(plugin: Arc<Plugin>, canary: Canary, manages_pools: bool) -> Arc<PluginSlot> {
        let canary = Arc::new(canary);
        set_warmer(&plugin, &canary);
        Arc::new(PluginSlot {
            name: plugin.manifest().name.clone(),
            approved_hosts: plugin.manifest().allowed_hosts.clone(),
            canary: Mutex::new(canary),
            active: ArcSwap::new(Loaded::new(plugin)),
            previous: Mutex::new(None),
            manages_pools,
        })
    }

    /// The settings later candidates are checked with (after an update).
    pub fn set_canary_settings(&self, settings_json: &str) {
        let mut canary = self.canary.lock().unwrap();
        let mut updated = (**canary).clone();
        updated.settings_json = settings_json.to_string();
        *canary = Arc::new(updated);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.active.load_full()
    }

    pub fn previous(&self) -> Option<Arc<Loaded>> {
        self.previous.lock().unwrap().clone()
    }

    /// Checks `bytes` as a candidate and, if it passes, makes it active.
    /// Blocking (compiles and runs the canary): call it off the hot path.
    pub fn swap_in(&self, bytes: &[u8], source_name: &str) -> Result<Arc<Loaded>, SwapError> {
        let runtime = self.current().plugin.runtime().clone();
        let candidate = Arc::new(runtime.load(bytes, source_name)?);
        self.swap_to(candidate)
    }

    /// Checks a loaded version as a candidate and, if it passes, makes it
    /// active. Blocking (runs the canary): call it off the hot path.
    pub fn swap_to(&self, candidate: Arc<Plugin>) -> Result<Arc<Loaded>, SwapError> {
        let manifest = candidate.manifest();
        if manifest.name != self.name {
            return Err(SwapError::OtherDestination {
                expected: self.name.clone(),
                found: manifest.name.clone(),
            });
        }
        if let Some(host) = manifest.allowed_hosts.iter().find(|h| !self.approved_hosts.contains(h)) {
            return Err(SwapError::UnapprovedHost {
                host: host.clone(),
                approved: self.approved_hosts.join(", "),
            });
        }
        let started = Instant::now();
        // The canary's instance serves the first events after the swap.
        let canary = self.canary.lock().unwrap().clone();
        let warm = canary.warmed_instance(&candidate)?;
        tracing::info!(plugin = %candidate, elapsed = ?started.elapsed(), "canary passed");
        candidate.pool().add(Use::Mapping, warm);
        set_warmer(&candidate, &canary);
        let loaded = Loaded::new(candidate);
        let old = self.active.swap(loaded.clone());
        // Its idle instances make room for the new version's.
        if self.manages_pools {
            old.plugin.pool().close();
        }
        *self.previous.lock().unwrap() = Some(old);
        Ok(loaded)
    }

    /// Keeps `plugin` as the version to roll back to (a slot rebuilt after
    /// a restart, from what was recorded of its last swap).
    pub fn remember_previous(&self, plugin: Arc<Plugin>) {
        *self.previous.lock().unwrap() = Some(Loaded::new(plugin));
    }

    /// Back to the previous version (which becomes the previous in turn).
    pub fn rollback(&self) -> Result<Arc<Loaded>, SwapError> {
        let mut previous = self.previous.lock().unwrap();
        let back = previous.take().ok_or(SwapError::NoPrevious)?;
        if self.manages_pools {
            back.plugin.pool().reopen();
        }
        let old = self.active.swap(back.clone());
        if self.manages_pools {
            old.plugin.pool().close();
        }
        *previous = Some(old);
        Ok(back)
    }
}

/// A worn-out instance's replacement is warmed on the canary too.
fn set_warmer(plugin: &Arc<Plugin>, canary: &Arc<Canary>) {
    let (canary, weak) = (canary.clone(), Arc::downgrade(plugin));
    plugin.pool().set_warmer(Arc::new(move |instance: &mut Instance| {
        let Some(plugin) = weak.upgrade() else {
            return Ok(());
        };
        canary.run(&plugin, instance).map_err(|e| match e {
            SwapError::Canary(reason) | SwapError::Settings(reason) => CallError::Trap(reason),
            other => CallError::Trap(other.to_string()),
        })
    }));
}

/// Milliseconds since the Unix epoch, the `now` a call is given.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
