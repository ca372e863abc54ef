//! Where `serve` keeps its events, as the service asks it: one interface,
//! two backends (the SQLite spool here, the JetStream stream in
//! `stream`). What a 200 promises, and whether a connection still has
//! events to finish, are each backend's to answer; the service does not
//! ask which backend it has.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::Shared;
use super::connections::Connection;
use crate::spool::{NewEvent, Spool, StoredConnection};

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

    /// A connection may have events to deliver now (it was created,
    /// resumed or deleted, or events came): a log this host feeds its
    /// engines from starts feeding it. One whose events reach the engines
    /// by another way (a stream's worker) has nothing to do.
    fn wake(&self, _shared: &Arc<Shared>, _connection: &Arc<Connection>) {}

    /// The connections with events ready for delivery, which the service
    /// then wakes (now and then: a Retry-After passed, dead letters
    /// replayed). Empty for a log that feeds its engines by itself.
    fn ready_connections(&self) -> BoxFuture<'_, anyhow::Result<Vec<String>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Tells the other hosts sharing this log how a connection now is.
    /// Nothing when no other host shares it.
    fn announce_connection<'a>(&'a self, _stored: &'a StoredConnection) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Tells the other hosts sharing this log that a connection is deleted.
    fn announce_deleted<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Tells the other hosts sharing this log which plugin version a
    /// connection runs; `bytes` reads that version's bytes, and is only
    /// awaited by a log that shares them.
    fn announce_plugin<'a>(
        &'a self,
        _connection: &'a str,
        _sha256: &'a str,
        _bytes: BoxFuture<'a, anyhow::Result<Option<Vec<u8>>>>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The spool as an event log. Appends go through one writer thread that
/// commits whatever has queued up meanwhile in one transaction (group
/// commit): under load, one commit serves many requests instead of one
/// each, and no request waits for a blocking-pool thread of its own. Each
/// sender is still answered only once its own events are committed.
pub(crate) struct SpoolLog {
    spool: Arc<Spool>,
    appends: std::sync::mpsc::Sender<Append>,
}

/// One sender's events, and where to say whether they were committed.
struct Append {
    events: Vec<NewEvent>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// What one commit takes at most, of appends already waiting.
const GROUP_EVENTS: usize = 1_000;
const GROUP_BYTES: usize = 8 << 20;

impl SpoolLog {
    pub(crate) fn new(spool: Arc<Spool>) -> anyhow::Result<SpoolLog> {
        let (appends, queued) = std::sync::mpsc::channel::<Append>();
        let writer = spool.clone();
        // Ends when the log is dropped (its sender with it).
        std::thread::Builder::new()
            .name("spool-append".into())
            .spawn(move || append_in_groups(&writer, &queued))?;
        Ok(SpoolLog { spool, appends })
    }
}

/// The writer thread: waits for an append, takes those queued behind it,
/// commits them together, answers each.
fn append_in_groups(spool: &Spool, queued: &std::sync::mpsc::Receiver<Append>) {
    while let Ok(first) = queued.recv() {
        let (mut events, mut bytes) = (first.events.len(), size(&first.events));
        let mut group = vec![first];
        while events < GROUP_EVENTS && bytes < GROUP_BYTES {
            let Ok(next) = queued.try_recv() else { break };
            events += next.events.len();
            bytes += size(&next.events);
            group.push(next);
        }
        let result = spool.append_groups(group.iter().map(|a| &a.events[..])).map_err(|e| {
            tracing::error!("the spool could not store {events} events: {e:#}");
            e.to_string()
        });
        for append in group {
            let _ = append.done.send(result.clone());
        }
    }
}

fn size(events: &[NewEvent]) -> usize {
    events.iter().map(|e| e.body.len()).sum()
}

impl EventLog for SpoolLog {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let (done, committed) = tokio::sync::oneshot::channel();
            let sent = self.appends.send(Append { events, done });
            if sent.is_err() {
                anyhow::bail!("the spool's writer has stopped; nothing was stored, send again later");
            }
            match committed.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    anyhow::bail!("the spool cannot store events right now ({e}); nothing was stored, send again later")
                }
                Err(_) => anyhow::bail!("storing failed: the spool's writer stopped"),
            }
        })
    }

    fn has_pending<'a>(&'a self, connection: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        let (spool, connection) = (self.spool.clone(), connection.to_string());
        Box::pin(async move { tokio::task::spawn_blocking(move || spool.has_pending(&connection)).await? })
    }

    /// Starts the connection's feeder, which reads its rows in order.
    fn wake(&self, shared: &Arc<Shared>, connection: &Arc<Connection>) {
        shared.start_feeder(connection);
    }

    fn ready_connections(&self) -> BoxFuture<'_, anyhow::Result<Vec<String>>> {
        let spool = self.spool.clone();
        Box::pin(async move { tokio::task::spawn_blocking(move || spool.pending_connections()).await? })
    }
}
