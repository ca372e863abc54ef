//! The connections, agreed by every host on the stream: each one as the
//! spool keeps it (its write keys as hashes, its secrets as the sources
//! the operator named, never their values) under its id in the KV bucket
//! `chord_connections`. A create, update, pause, resume or delete through
//! any host's admin API is announced there, and every host follows: it
//! makes the connection (with the canary, as a create does), brings its
//! write keys, settings and state to the announced ones, or deletes it.
//! Each host resolves the secret sources itself, so each needs them (the
//! same environment variable or file). The connection of `serve`'s flags
//! is each host's own and is not shared.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::super::Shared;
use super::Log;
use crate::spool::StoredConnection;

pub(super) const CONNECTIONS_BUCKET: &str = "chord_connections";

pub(super) async fn setup(js: &jetstream::Context, replicas: usize) -> anyhow::Result<()> {
    if js.get_key_value(CONNECTIONS_BUCKET).await.is_err() {
        js.create_key_value(kv::Config {
            bucket: CONNECTIONS_BUCKET.to_string(),
            history: 5,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream key-value bucket {CONNECTIONS_BUCKET}"))?;
    }
    Ok(())
}

/// Tells every host how `stored` is now.
pub async fn announce(log: &Log, stored: &StoredConnection) -> anyhow::Result<()> {
    let bucket = log.js.get_key_value(CONNECTIONS_BUCKET).await?;
    let value = json!({"id": stored.id, "state": stored.state, "spec": stored.spec});
    bucket
        .put(&stored.id, value.to_string().into())
        .await
        .with_context(|| format!("announcing connection {}", stored.id))?;
    Ok(())
}

/// Tells every host that connection `id` is deleted.
pub async fn announce_deleted(log: &Log, id: &str) -> anyhow::Result<()> {
    let bucket = log.js.get_key_value(CONNECTIONS_BUCKET).await?;
    bucket
        .delete(id)
        .await
        .with_context(|| format!("announcing connection {id} deleted"))?;
    Ok(())
}

/// Follows the bucket for as long as the host runs: first every
/// connection as it is, then each change.
pub(crate) async fn follow(log: Arc<Log>, shared: Arc<Shared>) {
    loop {
        let watched = async {
            let bucket = log.js.get_key_value(CONNECTIONS_BUCKET).await?;
            let mut changes = bucket.watch_with_history(">").await?;
            while let Some(entry) = changes.next().await {
                let entry = entry?;
                match entry.operation {
                    kv::Operation::Put => follow_one(&log, &shared, &entry.key, &entry.value).await,
                    kv::Operation::Delete | kv::Operation::Purge => {
                        let Some(here) = shared.connections.get(&entry.key) else {
                            continue;
                        };
                        if here.from_flags || !here.state().accepts() {
                            continue;
                        }
                        match shared.connections.delete(&entry.key).await {
                            Ok(_) => tracing::info!(connection = %entry.key, "deleted, as another host announced"),
                            Err(e) => tracing::error!(connection = %entry.key, "following a deletion: {e:#}"),
                        }
                    }
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = watched.await {
            tracing::warn!("following the connections: {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow_one(log: &Log, shared: &Arc<Shared>, id: &str, value: &[u8]) {
    let parsed = serde_json::from_slice::<Value>(value).ok().and_then(|v| {
        Some(StoredConnection {
            id: v["id"].as_str()?.to_string(),
            state: v["state"].as_str()?.to_string(),
            spec: v["spec"].clone(),
        })
    });
    let Some(stored) = parsed.filter(|s| s.id == id) else {
        tracing::error!(connection = id, "the announced connection is not one");
        return;
    };
    // A new one needs its version here: from the object store if need be.
    if shared.connections.get(id).is_none()
        && let Some(sha) = stored.spec["plugin"].as_str()
        && let Err(e) = super::plugins::load(log, shared, sha).await
    {
        tracing::error!(connection = id, "cannot make the announced connection: {e:#}");
        return;
    }
    match shared.connections.adopt(&stored).await {
        Ok(true) => {
            tracing::info!(connection = id, state = %stored.state, "made or changed, as another host announced")
        }
        Ok(false) => {}
        Err(e) => tracing::error!(connection = id, "refused the announced connection: {e:#}"),
    }
}
