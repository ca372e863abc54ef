//! The active version of a destination, replaceable while events flow.
//!
//! A candidate is compiled and checked off the hot path: the interface
//! version (at load), the same destination name, hosts within what the
//! operator approved, the current settings, and a canary of golden events
//! mapped under the sandbox limits without a single plugin failure. Only
//! then is it swapped in, atomically: mapping reads the slot once per
//! event, and each mapped event carries the version that mapped it, so
//! calls in flight finish on the version they started on. The previous
//! version stays loaded for an instant rollback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;

use super::{Instance, Outcome, Plugin};
use crate::settings::DestinationSettings;

/// One loaded version and what it has done.
pub struct Loaded {
    pub plugin: Arc<Plugin>,
    pub loaded_at: SystemTime,
    pub events_mapped: AtomicU64,
    /// An instance the canary already warmed (lazy plugin state built), for
    /// the first mapping after the swap.
    warm: Mutex<Option<Instance>>,
}

impl Loaded {
    fn new(plugin: Arc<Plugin>, warm: Option<Instance>) -> Arc<Loaded> {
        Arc::new(Loaded {
            plugin,
            loaded_at: SystemTime::now(),
            events_mapped: AtomicU64::new(0),
            warm: Mutex::new(warm),
        })
    }

    /// The pre-warmed instance, once.
    pub fn take_warm(&self) -> Option<Instance> {
        self.warm.lock().unwrap().take()
    }
}

/// Why a candidate was refused; the active version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Load(#[from] super::LoadError),
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

pub struct PluginSlot {
    name: String,
    approved_hosts: Vec<String>,
    active: ArcSwap<Loaded>,
    previous: Mutex<Option<Arc<Loaded>>>,
}

impl PluginSlot {
    /// A slot serving `plugin`; the hosts it declares are the approved ones.
    pub fn new(plugin: Arc<Plugin>) -> Arc<PluginSlot> {
        Arc::new(PluginSlot {
            name: plugin.manifest().name.clone(),
            approved_hosts: plugin.manifest().allowed_hosts.clone(),
            active: ArcSwap::new(Loaded::new(plugin, None)),
            previous: Mutex::new(None),
        })
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
    pub fn swap_in(
        &self,
        bytes: &[u8],
        source_name: &str,
        settings: &DestinationSettings,
        golden_events: &str,
    ) -> Result<Arc<Loaded>, SwapError> {
        let runtime = self.current().plugin.runtime().clone();
        let candidate = Arc::new(runtime.load(bytes, source_name)?);
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
        let warm = warmed_instance(&candidate, settings, golden_events)?;
        tracing::info!(plugin = %candidate, elapsed = ?started.elapsed(), "canary passed");
        let loaded = Loaded::new(candidate, Some(warm));
        let old = self.active.swap(loaded.clone());
        *self.previous.lock().unwrap() = Some(old);
        Ok(loaded)
    }

    /// Back to the previous version (which becomes the previous in turn).
    pub fn rollback(&self) -> Result<Arc<Loaded>, SwapError> {
        let mut previous = self.previous.lock().unwrap();
        let back = previous.take().ok_or(SwapError::NoPrevious)?;
        let old = self.active.swap(back.clone());
        *previous = Some(old);
        Ok(back)
    }
}

/// The canary: maps every golden event through the candidate; any plugin
/// failure (trap, deadline, memory, unusable output) refuses it. Returns the
/// instance it warmed (the plugin's lazy state built: 14 ms of phone
/// metadata for the Klaviyo plugin), which is also how a worn-out mapping
/// instance's replacement is prepared off the hot path.
pub fn warmed_instance(
    candidate: &Arc<Plugin>,
    settings: &DestinationSettings,
    golden_events: &str,
) -> Result<Instance, SwapError> {
    let started = Instant::now();
    let mut instance = candidate
        .instance()
        .map_err(|e| SwapError::Canary(format!("{candidate} {e} while starting")))?;
    match instance.validate_settings(settings.public_json()) {
        Ok(Ok(())) => {}
        Ok(Err(errors)) => {
            let problems: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.name, e.reason)).collect();
            return Err(SwapError::Settings(problems.join("; ")));
        }
        Err(e) => return Err(SwapError::Canary(format!("{candidate} {e} while validating settings"))),
    }
    let mut sent = 0;
    for (index, event) in golden_events.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if serde_json::from_str::<serde_json::Value>(event).is_err() {
            continue;
        }
        let mapping = instance
            .map_event(settings.public_json(), event, crate::mapper::now_unix_ms())
            .map_err(|e| SwapError::Canary(format!("{candidate} {e} on golden event {}", index + 1)))?;
        candidate.check_mapping(&mapping).map_err(|e| {
            SwapError::Canary(format!(
                "{candidate} returned unusable output on golden event {}: {e}",
                index + 1
            ))
        })?;
        if matches!(mapping.outcome, Outcome::Send(_)) {
            sent += 1;
        }
    }
    if sent == 0 {
        return Err(SwapError::Canary(format!(
            "{candidate} would send none of the golden events"
        )));
    }
    tracing::debug!(plugin = %candidate, elapsed = ?started.elapsed(), "golden events mapped");
    Ok(instance)
}

/// Counts an event mapped by `loaded`.
pub fn count_mapped(loaded: &Loaded) {
    loaded.events_mapped.fetch_add(1, Ordering::Relaxed);
}
