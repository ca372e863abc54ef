//! Where `serve` keeps its events, as the service asks it: one interface,
//! and its backends: a log of rows this host feeds its engines from
//! (`rows`: the SQLite spool, or memory for tests) and the JetStream
//! stream several hosts share (`stream`). What a 200 promises, how events
//! reach the engines, how an outcome is settled, and where dead letters
//! are kept are each backend's to answer; outside start-up the service
//! does not ask which backend it has.

#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod rows;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::Shared;
use super::connections::Connection;
use super::dead_letters::DeadLetters;
use super::engine::Outcomes;
use crate::spool::{Counts, NewEvent, StoredConnection};

pub(crate) trait EventLog: Send + Sync {
    /// Stores every event (one per connection it is for) as durably as a
    /// 200 promises, or fails; the error says what the sender should do.
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, anyhow::Result<()>>;

    /// Starts what this log runs beside the engines: what settles their
    /// `outcomes` (a row written, a message acked) and, for a log that
    /// does not feed the engines through `wake`, what reads its events.
    /// `grace` is how long stopping may wait for events in flight.
    fn start(
        self: Arc<Self>,
        shared: &Arc<Shared>,
        outcomes: Outcomes,
        grace: Duration,
    ) -> BoxFuture<'static, anyhow::Result<Started>>;

    /// Where this log keeps its dead letters.
    fn dead_letters(&self) -> Box<dyn DeadLetters>;

    /// Whether any of the connection's events is not finished yet
    /// (delivered, skipped or dead-lettered), on any host.
    fn has_pending<'a>(&'a self, connection: &'a str) -> BoxFuture<'a, anyhow::Result<bool>>;

    /// Each connection's unfinished events, when this log can count them
    /// cheaply (every console refresh and `/metrics` scrape asks); none
    /// when it cannot.
    fn backlog(&self) -> BoxFuture<'_, Option<BTreeMap<String, u64>>> {
        Box::pin(async { None })
    }

    /// Each connection's events by state, as far as this host keeps them
    /// (the admin API shows them); empty when it keeps none.
    fn counts(&self) -> BoxFuture<'_, BTreeMap<String, Counts>> {
        Box::pin(async { BTreeMap::new() })
    }

    /// Whether other hosts share this log (and so this host's counts are
    /// not all there is).
    fn shared_by_hosts(&self) -> bool {
        false
    }

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

/// What a log started, and how the service stops it.
pub(crate) struct Started {
    /// Run first when the service stops, before the engines are closed:
    /// stops reading events and lets what is in flight be settled.
    pub(crate) stop: BoxFuture<'static, ()>,
    /// Run once the engines have finished (within the grace): settles the
    /// last outcomes.
    pub(crate) finish: BoxFuture<'static, ()>,
}
