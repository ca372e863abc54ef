//! Idle instances of one plugin version, shared by every caller: mapping
//! and interpreting check an instance out, call it, and the checkout gives
//! it back when dropped. A fresh
//! instance costs tens of microseconds and, for the Klaviyo plugin, up to
//! 25 ms of lazy setup on its first events, so instances are reused.
//!
//! The pool belongs to its `Plugin`, so an instance can only ever serve
//! the version it was made from. It keeps mapping and interpreting
//! instances apart (`Use`): a mapping instance builds the plugin's lazy
//! state (for Klaviyo, libphonenumber's metadata and compiled regexes,
//! 6-15 MiB), which an interpreting one never needs, so letting them mix
//! gave every instance that weight. An instance whose call failed is never
//! given back (a trapped store refuses every later call). A mapping
//! instance that has served its share keeps serving while a replacement is
//! built and warmed on another thread, and is retired once that one is
//! ready, so renewal never stalls an event; a worn-out interpreting one is
//! simply retired (a fresh one costs tens of microseconds). A closed pool
//! (a version swapped out) retires what is given back, freeing its slots
//! for the new version.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::plugin::{CallError, Instance, Plugin};

/// Prepares a fresh instance the way the first events would (the plugin's
/// lazy state built), so a replacement serves its first event at full speed.
pub type Warmer = dyn Fn(&mut Instance) -> Result<(), CallError> + Send + Sync;

/// What an instance is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Mapping,
    Interpreting,
}

#[derive(Default)]
pub struct InstancePool {
    /// Idle mapping and interpreting instances.
    idle: Mutex<[Vec<Instance>; 2]>,
    closed: AtomicBool,
    /// Warmed replacements made ready and not yet matched by a retirement.
    ready: AtomicUsize,
    warmer: OnceLock<Arc<Warmer>>,
}

impl InstancePool {
    /// How replacements are warmed; set once, by whoever serves the plugin.
    pub fn set_warmer(&self, warmer: Arc<Warmer>) {
        let _ = self.warmer.set(warmer);
    }

    /// An instance of `plugin` for `used`, given back when the checkout is
    /// dropped, unless a call on it failed. `Busy` when every instance slot
    /// of the runtime is taken.
    pub fn checkout<'p>(&self, plugin: &'p Arc<Plugin>, used: Use) -> Result<Checkout<'p>, CallError> {
        Ok(Checkout {
            plugin,
            used,
            instance: Some(self.take(plugin, used)?),
        })
    }

    /// Like `checkout`, but waits while every instance slot is in use: a
    /// busy pool is not the plugin's fault, so the caller waits for a slot
    /// (back-pressure on its input) rather than failing. Woken when an
    /// instance is dropped; warns once after a second of waiting.
    pub fn checkout_waiting<'p>(&self, plugin: &'p Arc<Plugin>, used: Use) -> Result<Checkout<'p>, CallError> {
        let freed = &plugin.runtime().freed;
        let started = Instant::now();
        let mut warned = false;
        loop {
            // The count is read only once the pool is found busy (not on
            // every call); trying again after reading it catches a slot
            // freed in between.
            match self.checkout(plugin, used) {
                Err(CallError::Busy(_)) => {}
                other => return other,
            }
            let seen = freed.seen();
            match self.checkout(plugin, used) {
                Err(CallError::Busy(slots)) => {
                    if !warned && started.elapsed() > Duration::from_secs(1) {
                        tracing::warn!(%plugin, "all {slots} plugin instance slots are in use; waiting for one");
                        warned = true;
                    }
                    freed.wait_after(seen, Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// An instance of `plugin` for `used`: an idle one, or else a fresh one.
    fn take(&self, plugin: &Plugin, used: Use) -> Result<Instance, CallError> {
        let idle = self.idle.lock().unwrap()[used as usize].pop();
        match idle {
            Some(instance) => Ok(instance),
            None => plugin.instance(),
        }
    }

    /// Gives back an instance whose calls (for `used`) succeeded.
    fn give_back(&self, plugin: &Arc<Plugin>, used: Use, mut instance: Instance) {
        if self.closed.load(Ordering::Acquire) || (used == Use::Interpreting && instance.worn_out()) {
            retire(instance);
            return;
        }
        if instance.worn_out() {
            if !instance.replacement_requested {
                instance.replacement_requested = true;
                self.replace_in_background(plugin);
            } else if self
                .ready
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                retire(instance);
                return;
            }
        }
        self.idle.lock().unwrap()[used as usize].push(instance);
    }

    /// Stops taking instances back and retires the idle ones.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let idle = std::mem::take(&mut *self.idle.lock().unwrap());
        idle.into_iter().flatten().for_each(retire);
    }

    /// Whether instances are taken back (the version is serving).
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Takes instances back again (a rolled-back version serving anew).
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::Release);
    }

    /// Adds an instance that is ready to serve (a canary's warmed one).
    pub fn add(&self, used: Use, instance: Instance) {
        if self.closed.load(Ordering::Acquire) {
            retire(instance);
        } else {
            self.idle.lock().unwrap()[used as usize].push(instance);
        }
    }

    fn replace_in_background(&self, plugin: &Arc<Plugin>) {
        let weak: Weak<Plugin> = Arc::downgrade(plugin);
        let warmer = self.warmer.get().cloned();
        let spawned = std::thread::Builder::new().name("plugin-warm".into()).spawn(move || {
            let Some(plugin) = weak.upgrade() else { return };
            let fresh = plugin.instance().and_then(|mut instance| {
                if let Some(warm) = &warmer {
                    warm(&mut instance)?;
                }
                Ok(instance)
            });
            let fresh = match fresh {
                Ok(instance) => Some(instance),
                Err(e) => {
                    tracing::warn!(plugin = %plugin, "could not prepare a replacement instance: {e}");
                    None
                }
            };
            plugin.pool().replacement_ready(fresh);
        });
        if spawned.is_err() {
            self.replacement_ready(None);
        }
    }

    /// A replacement is ready (or failed: the next call then starts a fresh
    /// instance). The worn-out instance it replaces is retired now if it is
    /// idle, or else when it is given back.
    fn replacement_ready(&self, fresh: Option<Instance>) {
        let mut all = self.idle.lock().unwrap();
        let idle = &mut all[Use::Mapping as usize];
        match idle.iter().position(|i| i.replacement_requested) {
            Some(index) => retire(idle.swap_remove(index)),
            None => {
                self.ready.fetch_add(1, Ordering::AcqRel);
            }
        }
        if let Some(fresh) = fresh {
            if self.closed.load(Ordering::Acquire) {
                retire(fresh);
            } else {
                idle.push(fresh);
            }
        }
    }
}

/// An instance checked out of its plugin's pool. Dropped, it goes back to
/// the pool if every call on it succeeded; one whose call failed is dropped
/// at once instead, not on the retire thread: failures can come one per
/// event (a plugin that traps on everything), and each must free its slot
/// before the next fresh instance takes one.
pub struct Checkout<'p> {
    plugin: &'p Arc<Plugin>,
    used: Use,
    instance: Option<Instance>,
}

impl Checkout<'_> {
    /// Drops the instance instead of giving it back (its work failed in a
    /// way the host found, after calls that succeeded).
    pub fn discard(mut self) {
        drop(self.instance.take());
    }

    /// The instance itself, never to go back to the pool.
    pub fn detach(mut self) -> Instance {
        self.instance.take().expect("present until dropped")
    }
}

impl Deref for Checkout<'_> {
    type Target = Instance;

    fn deref(&self) -> &Instance {
        self.instance.as_ref().expect("present until dropped")
    }
}

impl DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Instance {
        self.instance.as_mut().expect("present until dropped")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take()
            && !instance.failed
        {
            self.plugin.pool().give_back(self.plugin, self.used, instance);
        }
    }
}

/// Drops an instance on a background thread. Dropping a used instance
/// resets its memory (`madvise` over every page it touched): 0.6-0.8 ms
/// for a mapping instance, measured by `cargo bench --bench swap`, which a
/// caller must not wait for. For the rare, bounded retirements (a version
/// swap, a worn-out instance): its pool slot is freed only when the drop
/// has run, so a loop that retires an instance per call can outrun the
/// thread and find the pool busy. A failed instance is dropped at once by
/// its caller instead.
pub fn retire(instance: Instance) {
    static RETIRED: OnceLock<Mutex<std::sync::mpsc::Sender<Instance>>> = OnceLock::new();
    let sender = RETIRED.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Instance>();
        std::thread::Builder::new()
            .name("plugin-retire".into())
            .spawn(move || receiver.into_iter().for_each(drop))
            .expect("spawning the instance retirer");
        Mutex::new(sender)
    });
    // If the retirer is gone, the instance is dropped here instead.
    let _ = sender.lock().unwrap().send(instance);
}
