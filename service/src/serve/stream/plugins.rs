//! Which plugin version each connection runs, agreed by every host on the
//! stream: the active version's SHA-256 per connection in the KV bucket
//! `chord_active`, and the versions' bytes in the object store
//! `chord_plugins`, named by SHA-256. A swap or rollback through any
//! host's admin API (or its plugin directory) is announced there; every
//! host follows, loading the bytes it lacks and swapping through the same
//! canary as a local swap. Each event is mapped by the one version its
//! host's slot held when it was mapped, and that version is recorded with
//! the event's outcome.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv, object_store};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use super::super::Shared;
use super::Log;

pub(super) const ACTIVE_BUCKET: &str = "chord_active";
pub(super) const PLUGINS_BUCKET: &str = "chord_plugins";
/// The largest plugin read back from the object store.
const MAX_PLUGIN_BYTES: u64 = 64 << 20;

/// Makes the bucket and the object store if they are not there.
pub(super) async fn setup(js: &jetstream::Context, replicas: usize) -> anyhow::Result<()> {
    if js.get_key_value(ACTIVE_BUCKET).await.is_err() {
        js.create_key_value(kv::Config {
            bucket: ACTIVE_BUCKET.to_string(),
            history: 5,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream key-value bucket {ACTIVE_BUCKET}"))?;
    }
    if js.get_object_store(PLUGINS_BUCKET).await.is_err() {
        js.create_object_store(object_store::Config {
            bucket: PLUGINS_BUCKET.to_string(),
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream object store {PLUGINS_BUCKET}"))?;
    }
    Ok(())
}

/// Tells every host that `connection` now runs the version `sha256`
/// (whose bytes are `bytes`): the bytes first, then the pointer.
pub async fn announce(log: &Log, connection: &str, sha256: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let objects = log.js.get_object_store(PLUGINS_BUCKET).await?;
    if objects.info(sha256).await.is_err() {
        objects
            .put(sha256, &mut &bytes[..])
            .await
            .with_context(|| format!("storing plugin {sha256} in the object store"))?;
    }
    let active = log.js.get_key_value(ACTIVE_BUCKET).await?;
    let current = active.get(connection).await?;
    if current.as_deref() != Some(sha256.as_bytes()) {
        active
            .put(connection, sha256.to_string().into())
            .await
            .with_context(|| format!("announcing connection {connection}'s plugin"))?;
    }
    Ok(())
}

/// Brings every connection here to the version the bucket names, once.
pub(crate) async fn catch_up(log: &Log, shared: &Arc<Shared>) -> anyhow::Result<()> {
    let active = log.js.get_key_value(ACTIVE_BUCKET).await?;
    let mut keys = active.keys().await?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        names.push(key?);
    }
    for connection in names {
        if let Some(sha) = active.get(&connection).await? {
            follow_one(log, shared, &connection, &String::from_utf8_lossy(&sha)).await;
        }
    }
    Ok(())
}

/// Follows the bucket for as long as the host runs.
pub(crate) async fn follow(log: Arc<Log>, shared: Arc<Shared>) {
    loop {
        let watched = async {
            let active = log.js.get_key_value(ACTIVE_BUCKET).await?;
            let mut changes = active.watch_with_history(">").await?;
            while let Some(entry) = changes.next().await {
                let entry = entry?;
                if entry.operation == kv::Operation::Put {
                    follow_one(&log, &shared, &entry.key, &String::from_utf8_lossy(&entry.value)).await;
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = watched.await {
            tracing::warn!("following the active plugin versions: {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Swaps `connection` here to `sha256` unless it runs it already.
async fn follow_one(log: &Log, shared: &Arc<Shared>, connection: &str, sha256: &str) {
    let Some(here) = shared.connections.get(connection) else {
        return;
    };
    if here.slot.current().plugin.sha256_hex() == sha256 {
        return;
    }
    let plugin = match load(log, shared, sha256).await {
        Ok(plugin) => plugin,
        Err(e) => {
            tracing::error!(connection, sha256, "cannot follow the swap: {e:#}");
            return;
        }
    };
    match shared.connections.swap(connection, plugin).await {
        Ok(loaded) => tracing::info!(connection, plugin = %loaded.plugin, "swapped, as another host announced"),
        Err(e) => tracing::error!(connection, sha256, "refused the version another host announced: {e:#}"),
    }
}

/// The version by SHA-256: stored here, or fetched from the object store
/// (and checked against its name) and stored.
pub(super) async fn load(log: &Log, shared: &Arc<Shared>, sha256: &str) -> anyhow::Result<Arc<plugin_runtime::Plugin>> {
    let this = shared.clone();
    let sha = sha256.to_string();
    if let Ok(Ok(plugin)) = tokio::task::spawn_blocking(move || this.connections.store.get(&sha)).await {
        return Ok(plugin);
    }
    let objects = log.js.get_object_store(PLUGINS_BUCKET).await?;
    let object = objects
        .get(sha256)
        .await
        .with_context(|| format!("plugin {sha256} is not in the object store"))?;
    let mut bytes = Vec::new();
    object.take(MAX_PLUGIN_BYTES + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > MAX_PLUGIN_BYTES {
        anyhow::bail!("plugin {sha256} in the object store is over {MAX_PLUGIN_BYTES} bytes");
    }
    if plugin_runtime::sha256_hex(&bytes) != sha256 {
        anyhow::bail!("the object store's plugin {sha256} does not have that SHA-256");
    }
    let this = shared.clone();
    let name = format!("plugin version {sha256} from the object store");
    Ok(tokio::task::spawn_blocking(move || this.connections.store.add(&bytes, &name)).await??)
}
