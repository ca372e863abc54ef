//! The outcome records other hosts publish on `chord.outcomes.<partition>`
//! (or, before their records named a partition, `chord.outcomes`), followed
//! for this host's console: a shop's events are delivered by whichever
//! host holds their partition, and an operator looking at any host should
//! see them all. Only what the record says is shown (no requests: they
//! stay on the host that sent them). A plain subscription: a record
//! published while this host was down is not read back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::{Log, OUTCOMES_SUBJECT, OUTCOMES_SUBJECTS};
use crate::serve::Shared;
use crate::serve::console::recent::{Elsewhere, Verdict};

pub(crate) async fn follow(log: Arc<Log>, shared: Arc<Shared>) {
    let Some(console) = shared.console.as_ref() else {
        return;
    };
    loop {
        let client = log.js.client();
        let subscribed = async {
            anyhow::Ok((
                client.subscribe(OUTCOMES_SUBJECTS).await?,
                client.subscribe(OUTCOMES_SUBJECT).await?,
            ))
        };
        match subscribed.await {
            Ok((partitioned, older)) => {
                let mut records = futures_util::stream::select(partitioned, older);
                while let Some(message) = records.next().await {
                    let Ok(record) = serde_json::from_slice::<Value>(&message.payload) else {
                        continue;
                    };
                    let Some(outcome) = elsewhere(&record, &shared.host_id) else {
                        continue;
                    };
                    let Some(connection) = record["connection"].as_str() else {
                        continue;
                    };
                    // Only connections this host knows: a record names any.
                    if shared.connections.get(connection).is_some() {
                        let activity = console.recorder.activity(connection);
                        console.recorder.record_elsewhere(&activity, outcome);
                    }
                }
            }
            Err(e) => tracing::warn!("following other hosts' outcomes: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A record of another host's, as the console keeps it; none for this
/// host's own (its engine recorded it) or one it cannot read.
fn elsewhere(record: &Value, this_host: &str) -> Option<Elsewhere> {
    let host = record["worker"].as_str()?;
    if host == this_host {
        return None;
    }
    let reason = || record["reason"].as_str().unwrap_or_default().into();
    let verdict = match record["state"].as_str()? {
        "delivered" => Verdict::Delivered,
        "skipped" => Verdict::Skipped(reason()),
        "dead" => Verdict::DeadLettered(reason()),
        _ => return None,
    };
    Some(Elsewhere {
        message_id: record["message_id"].as_str().map(str::to_string),
        verdict,
        plugin_version: record["plugin_version"].as_str().unwrap_or("?").to_string(),
        host: host.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_another_hosts_record_and_skips_its_own() {
        let record = json!({"sequence": 7, "connection": "shop", "message_id": "m1", "state": "dead",
                            "reason": "HTTP 400", "plugin_version": "klaviyo@1.0.0", "worker": "wB"});
        let read = elsewhere(&record, "wA").expect("another host's");
        assert_eq!(read.verdict, Verdict::DeadLettered("HTTP 400".into()));
        assert_eq!((read.message_id.as_deref(), read.host.as_str()), (Some("m1"), "wB"));
        assert!(elsewhere(&record, "wB").is_none(), "this host's own");
        assert!(elsewhere(&json!({"worker": "wB", "state": "?"}), "wA").is_none());
    }
}
