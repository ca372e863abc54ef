//! Where `serve` keeps its events, as the service asks it: one interface,
//! two backends (the SQLite spool here, the JetStream stream in
//! `stream`). What a 200 promises, and whether a connection still has
//! events to finish, are each backend's to answer; the service does not
//! ask which backend it has.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::spool::{NewEvent, Spool};

pub(crate) trait EventLog: Send + Sync {
    /// Stores every event (one per connection it is for) as durably as a
    /// 200 promises, or fails; the error says what the sender should do.
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, anyhow::Result<()>>;

    /// Whether any of the connection's events is not finished yet
    /// (delivered, skipped or dead-lettered), on any host.
    fn has_pending<'a>(&'a self, connection: &'a str) -> BoxFuture<'a, anyhow::Result<bool>>;

    /// Why this host takes no events, if it takes none.
    fn refuses_ingest(&self) -> Option<&'static str> {
        None
    }
}

/// The spool as an event log: rows in one SQLite transaction.
pub(crate) struct SpoolLog(pub Arc<Spool>);

impl EventLog for SpoolLog {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, anyhow::Result<()>> {
        let spool = self.0.clone();
        Box::pin(async move {
            let count = events.len();
            match tokio::task::spawn_blocking(move || spool.append(&events)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::error!("the spool could not store {count} events: {e:#}");
                    anyhow::bail!("the spool cannot store events right now ({e}); nothing was stored, send again later")
                }
                Err(e) => anyhow::bail!("storing failed: {e}"),
            }
        })
    }

    fn has_pending<'a>(&'a self, connection: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        let (spool, connection) = (self.0.clone(), connection.to_string());
        Box::pin(async move { tokio::task::spawn_blocking(move || spool.has_pending(&connection)).await? })
    }
}
