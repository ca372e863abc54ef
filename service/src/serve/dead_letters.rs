//! Dead letters, wherever `serve` keeps them: one interface for listing,
//! replaying and purging them, with a log's rows (the spool's) and the
//! stream as its two implementations. `cdp-host dlq` opens one and runs
//! the same command on either. A letter's `id` is its row in the spool,
//! its sequence in `CHORD_DLQ` on the stream.
//!
//! A letter reads the same from either: `id`, `connection`, `message_id`,
//! `plugin_version`, `reason`, `request` (its key masked), `response`
//! (Klaviyo's answer, when there was one) and `event`. The spool adds when
//! the event was received (`received_at`) and its `warnings`; the stream,
//! the `subject` its event came from (its partition) and when it died (`at`).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use super::log::rows::{Rows, off_thread};
use super::stream::dead;
use crate::spool::DeadRow;

pub trait DeadLetters: Send + Sync {
    /// The letters, oldest first, of one connection or of all, at most `limit`.
    fn list<'a>(&'a self, connection: Option<&'a str>, limit: usize) -> BoxFuture<'a, anyhow::Result<Vec<Value>>>;

    /// Puts the letters (`ids`, or else all of the connection's, or all)
    /// back to be delivered; how many.
    fn replay<'a>(&'a self, connection: Option<&'a str>, ids: &'a [i64]) -> BoxFuture<'a, anyhow::Result<usize>>;

    /// Deletes the letters (`ids`, or else all of the connection's, or
    /// all); how many.
    fn purge<'a>(&'a self, connection: Option<&'a str>, ids: &'a [i64]) -> BoxFuture<'a, anyhow::Result<usize>>;
}

/// The dead rows of a log of rows (the spool's, `cdp-host dlq` reads
/// them).
pub struct RowDeadLetters<R: Rows>(pub Arc<R>);

impl<R: Rows> DeadLetters for RowDeadLetters<R> {
    fn list<'a>(&'a self, connection: Option<&'a str>, limit: usize) -> BoxFuture<'a, anyhow::Result<Vec<Value>>> {
        let connection = connection.map(str::to_string);
        off_thread(&self.0, move |spool| {
            let rows = spool.dead(connection.as_deref(), limit)?;
            Ok(rows.into_iter().map(letter_of_row).collect())
        })
    }

    fn replay<'a>(&'a self, connection: Option<&'a str>, ids: &'a [i64]) -> BoxFuture<'a, anyhow::Result<usize>> {
        let (connection, ids) = (connection.map(str::to_string), ids.to_vec());
        off_thread(&self.0, move |spool| spool.replay(connection.as_deref(), &ids))
    }

    fn purge<'a>(&'a self, connection: Option<&'a str>, ids: &'a [i64]) -> BoxFuture<'a, anyhow::Result<usize>> {
        let (connection, ids) = (connection.map(str::to_string), ids.to_vec());
        off_thread(&self.0, move |spool| spool.purge(connection.as_deref(), &ids))
    }
}

/// A spool row as a letter: the outcome's parts at the top, as the stream
/// keeps them.
fn letter_of_row(row: DeadRow) -> Value {
    let mut outcome = match row.outcome {
        Value::Object(outcome) => outcome,
        _ => Map::new(),
    };
    let mut take = |key: &str| outcome.remove(key).unwrap_or(Value::Null);
    let (reason, request, response, warnings) = (take("reason"), take("request"), take("response"), take("warnings"));
    serde_json::json!({
        "id": row.id,
        "connection": row.connection,
        "message_id": row.message_id,
        "received_at": row.received_at,
        "plugin_version": row.plugin_version,
        "reason": reason,
        "request": request,
        "response": response,
        "warnings": warnings,
        "event": row.event,
    })
}

/// The letters in the stream's `CHORD_DLQ`.
pub struct StreamDeadLetters {
    /// The servers, and how to reach them.
    pub access: super::stream::NatsAccess,
    /// The event stream's partitions, for letters stored before a letter
    /// kept its partition's subject.
    pub partitions: u32,
}

/// Stream sequences: a negative id names no letter.
fn sequences(ids: &[i64]) -> anyhow::Result<Vec<u64>> {
    ids.iter()
        .map(|&id| u64::try_from(id).map_err(|_| anyhow::anyhow!("--id {id} is not a dead letter's id")))
        .collect()
}

impl DeadLetters for StreamDeadLetters {
    fn list<'a>(&'a self, connection: Option<&'a str>, limit: usize) -> BoxFuture<'a, anyhow::Result<Vec<Value>>> {
        Box::pin(dead::list(&self.access, connection, limit))
    }

    fn replay<'a>(&'a self, connection: Option<&'a str>, ids: &'a [i64]) -> BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move { dead::replay(&self.access, connection, &sequences(ids)?, self.partitions).await })
    }

    fn purge<'a>(&'a self, connection: Option<&'a str>, ids: &'a [i64]) -> BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move { dead::purge(&self.access, connection, &sequences(ids)?).await })
    }
}
