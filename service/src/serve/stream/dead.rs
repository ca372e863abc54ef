//! Dead letters on the stream: one message each in `CHORD_DLQ`, kept until
//! replayed (published to its partition again) or purged. `cdp-host dlq
//! list | replay | purge --stream …` work on them; a letter's `id` is its
//! sequence in `CHORD_DLQ`.

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{CONNECTION_HEADER, DLQ_STREAM, DLQ_SUBJECT, EVENTS_STREAM, Log, RECEIVED_AT_HEADER};
use cdp_core::delivery::{DeadLetter, EventRecord};

/// Stores a dead letter, waiting for the stream to confirm it.
pub(super) async fn store(
    log: &Log,
    connection: &str,
    sequence: u64,
    subject: &str,
    record: &EventRecord,
    letter: &DeadLetter,
) -> anyhow::Result<()> {
    let body = json!({
        "connection": connection,
        // Where a replay puts it back: its partition's subject.
        "subject": subject,
        "message_id": record.message_id,
        "reason": letter.reason,
        "event": serde_json::from_str::<Value>(&letter.event).unwrap_or_else(|_| Value::String(letter.event.clone())),
        "request": letter.request_json(),
        "response": letter.response_json(),
        "plugin_version": record.plugin_version,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    let mut headers = HeaderMap::new();
    // The same event dead-lettered twice (redelivered after a crash before
    // its ack) is one letter.
    headers.insert(
        "Nats-Msg-Id",
        HeaderValue::from(format!("dead:{EVENTS_STREAM}:{sequence}").as_str()),
    );
    headers.insert(CONNECTION_HEADER, HeaderValue::from(connection));
    log.js
        .publish_with_headers(DLQ_SUBJECT, headers, serde_json::to_vec(&body)?.into())
        .await?
        .await
        .context("the dead-letter stream did not confirm the letter")?;
    Ok(())
}

/// The letters (each with its `id`), oldest first, of one connection or all.
pub async fn list(access: &super::NatsAccess, connection: Option<&str>, limit: usize) -> anyhow::Result<Vec<Value>> {
    let js = super::context_now(access).await?;
    let letters = letters(&js, connection).await?;
    Ok(letters.into_iter().take(limit).map(|(_, letter)| letter).collect())
}

/// Publishes the letters (`ids`, or all of the connection's, or all) to
/// their partitions again and deletes them; how many.
pub async fn replay(
    access: &super::NatsAccess,
    connection: Option<&str>,
    ids: &[u64],
    partitions: u32,
) -> anyhow::Result<usize> {
    let js = super::context_now(access).await?;
    let dlq = js
        .get_stream(DLQ_STREAM)
        .await
        .context("opening the dead-letter stream")?;
    let mut replayed = 0;
    for (id, letter) in letters(&js, connection).await? {
        if !ids.is_empty() && !ids.contains(&id) {
            continue;
        }
        let event = match &letter["event"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let connection = letter["connection"].as_str().unwrap_or_default();
        let mut headers = HeaderMap::new();
        // New: the first try's id may still be in the dedupe window.
        let message_id = letter["message_id"].as_str().unwrap_or_default();
        headers.insert(
            "Nats-Msg-Id",
            HeaderValue::from(format!("{connection}:{message_id}:replay:{id}").as_str()),
        );
        headers.insert(CONNECTION_HEADER, HeaderValue::from(connection));
        headers.insert(
            RECEIVED_AT_HEADER,
            HeaderValue::from(chrono::Utc::now().to_rfc3339().as_str()),
        );
        // Back where it came from; a letter stored before letters kept
        // their subject goes to the partition its person hashes to.
        let subject = match letter["subject"].as_str() {
            Some(subject) if subject.starts_with("chord.events.") => subject.to_string(),
            _ => super::event_subject(super::partition_of(&event, partitions), connection),
        };
        js.publish_with_headers(subject, headers, event.into())
            .await?
            .await
            .with_context(|| format!("replaying dead letter {id}"))?;
        dlq.delete_message(id)
            .await
            .with_context(|| format!("deleting dead letter {id} once replayed"))?;
        replayed += 1;
    }
    Ok(replayed)
}

/// Deletes the letters (`ids`, or all of the connection's, or all); how many.
pub async fn purge(access: &super::NatsAccess, connection: Option<&str>, ids: &[u64]) -> anyhow::Result<usize> {
    let js = super::context_now(access).await?;
    let dlq = js
        .get_stream(DLQ_STREAM)
        .await
        .context("opening the dead-letter stream")?;
    let mut purged = 0;
    for (id, _) in letters(&js, connection).await? {
        if ids.is_empty() || ids.contains(&id) {
            dlq.delete_message(id)
                .await
                .with_context(|| format!("deleting dead letter {id}"))?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// Every letter in the stream, of one connection or all, by sequence.
async fn letters(js: &jetstream::Context, connection: Option<&str>) -> anyhow::Result<Vec<(u64, Value)>> {
    let mut dlq = js
        .get_stream(DLQ_STREAM)
        .await
        .context("opening the dead-letter stream")?;
    let state = dlq.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = match dlq.get_raw_message(sequence).await {
            Ok(message) => message,
            // Deleted (replayed or purged): a gap.
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading dead letter {sequence}")),
        };
        let mut letter: Value =
            serde_json::from_slice(&message.payload).with_context(|| format!("dead letter {sequence} is not JSON"))?;
        if connection.is_some_and(|c| letter["connection"] != c) {
            continue;
        }
        letter["id"] = json!(sequence);
        out.push((sequence, letter));
    }
    Ok(out)
}
