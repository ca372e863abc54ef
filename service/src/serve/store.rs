//! The plugin store: each plugin version once, by SHA-256. Its bytes are
//! kept in the spool (so a version uploaded through the admin API outlives
//! a restart), it is compiled once (the runtime's cache keeps the compiled
//! code across restarts), and every connection that serves it shares the
//! one `Plugin`, with its instance pool: instances are never held per
//! connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use plugin_runtime::{Plugin, Runtime, sha256_hex};

use crate::spool::Spool;

pub struct PluginStore {
    runtime: Arc<Runtime>,
    spool: Arc<Spool>,
    loaded: Mutex<HashMap<String, Arc<Plugin>>>,
}

impl PluginStore {
    pub fn new(runtime: Arc<Runtime>, spool: Arc<Spool>) -> PluginStore {
        PluginStore {
            runtime,
            spool,
            loaded: Mutex::default(),
        }
    }

    /// Keeps a version already loaded (the one the flags name).
    pub fn keep(&self, plugin: &Arc<Plugin>, bytes: &[u8]) -> anyhow::Result<()> {
        let sha = plugin.sha256_hex();
        self.spool.put_plugin(&sha, bytes)?;
        self.loaded.lock().unwrap().entry(sha).or_insert_with(|| plugin.clone());
        Ok(())
    }

    /// Stores and loads `bytes` (or finds them stored); blocking, as
    /// loading compiles. A component the runtime refuses is not stored.
    pub fn add(&self, bytes: &[u8], source_name: &str) -> Result<Arc<Plugin>, plugin_runtime::LoadError> {
        let sha = sha256_hex(bytes);
        if let Some(plugin) = self.loaded.lock().unwrap().get(&sha) {
            return Ok(plugin.clone());
        }
        let plugin = Arc::new(self.runtime.load(bytes, source_name)?);
        if let Err(e) = self.spool.put_plugin(&sha, bytes) {
            // It serves now; after a restart a connection on it would
            // find it missing, and says so.
            tracing::error!(%plugin, "keeping the plugin in the spool: {e:#}");
        }
        Ok(self.loaded.lock().unwrap().entry(sha).or_insert(plugin).clone())
    }

    /// The version with this SHA-256: loaded, or loaded from the spool.
    pub fn get(&self, sha256: &str) -> anyhow::Result<Arc<Plugin>> {
        if let Some(plugin) = self.loaded.lock().unwrap().get(sha256) {
            return Ok(plugin.clone());
        }
        let bytes = self
            .spool
            .plugin(sha256)?
            .with_context(|| format!("no plugin version {sha256} is stored; upload it first (PUT /admin/plugins)"))?;
        Ok(self.add(&bytes, &format!("plugin version {sha256}"))?)
    }

    /// The bytes of a stored version.
    pub fn bytes(&self, sha256: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.spool.plugin(sha256)
    }

    /// Every version loaded.
    pub fn loaded(&self) -> Vec<Arc<Plugin>> {
        let mut all: Vec<_> = self.loaded.lock().unwrap().values().cloned().collect();
        all.sort_by_key(|p| (p.manifest().name.clone(), p.manifest().version.clone(), p.sha256_hex()));
        all
    }

    /// After swaps: the idle instances of versions no connection serves
    /// are freed (their pools closed), and pools of versions serving again
    /// reopened.
    pub fn tidy(&self, serving: &[Arc<Plugin>]) {
        for plugin in self.loaded.lock().unwrap().values() {
            if serving.iter().any(|s| Arc::ptr_eq(s, plugin)) {
                plugin.pool().reopen();
            } else {
                plugin.pool().close();
            }
        }
    }
}
