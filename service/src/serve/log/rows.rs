//! A log of rows that this host feeds its engines from: each connection's
//! feeder reads its pending rows in order and hands them in, and one
//! writer records each outcome on its row. The rows are kept by a `Rows`
//! store: the SQLite spool, or memory (for tests of everything above it,
//! with no file).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::super::Shared;
use super::super::connections::Connection;
use super::super::dead_letters::{DeadLetters, RowDeadLetters};
use super::super::engine::{self, Outcomes};
use super::{EventLog, Started};
use crate::spool::{Counts, DeadRow, Finished, NewEvent, Spool, SpooledEvent, State as RowState, outcome_json};
use cdp_core::delivery::{EventOutcome, EventRecord};
use cdp_core::mapping::EventId;

/// What keeps the rows: each event a row with an id rising in the order
/// rows were appended, pending until its outcome is recorded. Calls block
/// (they run off the async threads).
pub trait Rows: Send + Sync + 'static {
    /// Stores every group's events in one commit, or none of them.
    fn append_groups<'e>(&self, groups: impl IntoIterator<Item = &'e [NewEvent]>) -> anyhow::Result<()>;

    /// A connection's pending rows after row `after`, oldest first: at
    /// most `limit`, stopping after the row that takes their bodies to
    /// `max_bytes` (at least one is read).
    fn pending_after(
        &self,
        connection: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<SpooledEvent>>;

    /// Records outcomes, all or none.
    fn finish_all<'a>(&self, finished: impl IntoIterator<Item = &'a Finished>) -> anyhow::Result<()>;

    /// Records that a row is not to be sent before `until` (a Retry-After).
    fn defer(&self, id: i64, until: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()>;

    /// Whether a connection has any pending row, ready or waiting.
    fn has_pending(&self, connection: &str) -> anyhow::Result<bool>;

    /// The connections with pending rows ready to deliver.
    fn pending_connections(&self) -> anyhow::Result<Vec<String>>;

    /// Each connection's pending rows.
    fn pending_by_connection(&self) -> anyhow::Result<BTreeMap<String, u64>>;

    /// Each connection's rows by state.
    fn counts(&self) -> anyhow::Result<BTreeMap<String, Counts>>;

    /// Dead rows, oldest first, of one connection or of all.
    fn dead(&self, connection: Option<&str>, limit: usize) -> anyhow::Result<Vec<DeadRow>>;

    /// Dead rows back to pending (all, or those ids); how many.
    fn replay(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize>;

    /// Deletes dead rows (all, or those ids); how many.
    fn purge(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize>;
}

impl Rows for Spool {
    fn append_groups<'e>(&self, groups: impl IntoIterator<Item = &'e [NewEvent]>) -> anyhow::Result<()> {
        Spool::append_groups(self, groups)
    }

    fn pending_after(
        &self,
        connection: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<SpooledEvent>> {
        Spool::pending_after(self, connection, after, limit, max_bytes)
    }

    fn finish_all<'a>(&self, finished: impl IntoIterator<Item = &'a Finished>) -> anyhow::Result<()> {
        Spool::finish_all(self, finished)
    }

    fn defer(&self, id: i64, until: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()> {
        Spool::defer(self, id, until)
    }

    fn has_pending(&self, connection: &str) -> anyhow::Result<bool> {
        Spool::has_pending(self, connection)
    }

    fn pending_connections(&self) -> anyhow::Result<Vec<String>> {
        Spool::pending_connections(self)
    }

    fn pending_by_connection(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Spool::pending_by_connection(self)
    }

    fn counts(&self) -> anyhow::Result<BTreeMap<String, Counts>> {
        Spool::counts(self)
    }

    fn dead(&self, connection: Option<&str>, limit: usize) -> anyhow::Result<Vec<DeadRow>> {
        Spool::dead(self, connection, limit)
    }

    fn replay(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        Spool::replay(self, connection, ids)
    }

    fn purge(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        Spool::purge(self, connection, ids)
    }
}

/// Rows as an event log. Appends go through one writer thread that
/// commits whatever has queued up meanwhile in one transaction (group
/// commit): under load, one commit serves many requests instead of one
/// each, and no request waits for a blocking-pool thread of its own. Each
/// sender is still answered only once its own events are committed.
pub(crate) struct RowLog<R: Rows> {
    rows: Arc<R>,
    appends: std::sync::mpsc::Sender<Append>,
    finishing: Arc<Finishing>,
    /// Feeders' reads under way, at most [`READS_AT_ONCE`].
    reads: Arc<tokio::sync::Semaphore>,
}

/// Feeders' reads of the rows at once, at most; the others wait their
/// turn without a thread. The spool keeps this many read-only SQLite
/// connections, so a read more than this only waits for one in a thread
/// of its own: 1,000 connections woken at once held 500 threads, and 100
/// busy connections' feeders spent their time switching threads.
const READS_AT_ONCE: usize = crate::spool::READERS;

/// Rows whose outcomes are recorded while a feeder's read may still hold
/// them as pending. A feeder reads a batch of pending rows, then admits
/// them one by one; a row in flight when it was read may be finished and
/// released before the feeder reaches it, and admitting it then would
/// send it again (an older identify after its person's newer ones). So
/// the writer marks each row it finishes here before it releases it, and
/// the feeder drops a row it admitted that is marked. Marks are kept by
/// connection (only its own feeder reads its rows), and only while a read
/// of that connection begun before them is still being handed in: a
/// feeder waiting long for room (a failing shop) keeps its own
/// connection's marks, never every connection's.
#[derive(Default)]
struct Finishing {
    by_connection: std::sync::Mutex<std::collections::HashMap<String, FinishingState>>,
}

#[derive(Default)]
struct FinishingState {
    /// Reads begun so far (the next read's number).
    reads: u64,
    /// Reads begun and not yet handed in.
    active: std::collections::BTreeSet<u64>,
    /// Finished rows, each with the number of reads begun before it was
    /// finished.
    finished: std::collections::HashMap<i64, u64>,
}

impl Finishing {
    /// A read of a connection's pending rows begins; until the guard goes,
    /// its rows finished from now on stay marked.
    fn begin_read(self: &Arc<Self>, connection: &str) -> ReadGuard {
        let mut by_connection = self.by_connection.lock().unwrap();
        let state = by_connection.entry(connection.to_string()).or_default();
        let read = state.reads;
        state.reads += 1;
        state.active.insert(read);
        ReadGuard {
            finishing: self.clone(),
            connection: connection.to_string(),
            read,
        }
    }

    /// These rows' outcomes are recorded; called before they are released.
    fn finished<'a>(&self, rows: impl Iterator<Item = (&'a str, i64)>) {
        let mut by_connection = self.by_connection.lock().unwrap();
        for (connection, row) in rows {
            // No read of it under way: a later read sees the row finished.
            if let Some(state) = by_connection.get_mut(connection)
                && !state.active.is_empty()
            {
                let before = state.reads;
                state.finished.insert(row, before);
            }
        }
    }

    fn is_finished(&self, connection: &str, row: i64) -> bool {
        let by_connection = self.by_connection.lock().unwrap();
        by_connection
            .get(connection)
            .is_some_and(|state| state.finished.contains_key(&row))
    }
}

/// A read under way, and the rows it hands in.
struct ReadGuard {
    finishing: Arc<Finishing>,
    connection: String,
    read: u64,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut by_connection = self.finishing.by_connection.lock().unwrap();
        let Some(state) = by_connection.get_mut(&self.connection) else {
            return;
        };
        state.active.remove(&self.read);
        // A mark matters to reads begun before it; keep those still out.
        match state.active.first().copied() {
            None => {
                by_connection.remove(&self.connection);
            }
            Some(oldest) => state.finished.retain(|_, before| *before > oldest),
        }
    }
}

/// One sender's events, and where to say whether they were committed.
struct Append {
    events: Vec<NewEvent>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// What one commit takes at most, of appends already waiting.
const GROUP_EVENTS: usize = 1_000;
const GROUP_BYTES: usize = 8 << 20;

impl<R: Rows> RowLog<R> {
    pub(crate) fn new(rows: Arc<R>) -> anyhow::Result<RowLog<R>> {
        let (appends, queued) = std::sync::mpsc::channel::<Append>();
        let writer = rows.clone();
        // Ends when the log is dropped (its sender with it).
        std::thread::Builder::new()
            .name("spool-append".into())
            .spawn(move || append_in_groups(&*writer, &queued))?;
        Ok(RowLog {
            rows,
            appends,
            finishing: Arc::default(),
            reads: Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE)),
        })
    }
}

/// Runs a call on rows off the async threads (their calls block).
pub(crate) fn off_thread<R: Rows, T: Send + 'static>(
    rows: &Arc<R>,
    call: impl FnOnce(&R) -> anyhow::Result<T> + Send + 'static,
) -> BoxFuture<'static, anyhow::Result<T>> {
    let rows = rows.clone();
    Box::pin(async move { tokio::task::spawn_blocking(move || call(&rows)).await? })
}

/// The writer thread: waits for an append, takes those queued behind it,
/// commits them together, answers each.
fn append_in_groups(rows: &impl Rows, queued: &std::sync::mpsc::Receiver<Append>) {
    while let Ok(first) = queued.recv() {
        let (mut events, mut bytes) = (first.events.len(), size(&first.events));
        let mut group = vec![first];
        while events < GROUP_EVENTS && bytes < GROUP_BYTES {
            let Ok(next) = queued.try_recv() else { break };
            events += next.events.len();
            bytes += size(&next.events);
            group.push(next);
        }
        let result = rows.append_groups(group.iter().map(|a| &a.events[..])).map_err(|e| {
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

impl<R: Rows> EventLog for RowLog<R> {
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

    /// Starts the thread that writes outcomes to their rows, and records
    /// each Retry-After on its row.
    fn start(
        self: Arc<Self>,
        shared: &Arc<Shared>,
        outcomes: Outcomes,
        _grace: Duration,
    ) -> BoxFuture<'static, anyhow::Result<Started>> {
        let rows = self.rows.clone();
        let _ = shared
            .connections
            .defer
            .set(Box::new(move |id, until: std::time::SystemTime| {
                if let EventId::SpoolRow(row) = id
                    && let Err(e) = rows.defer(row, until.into())
                {
                    tracing::warn!("recording the Retry-After of event {row}: {e:#}");
                }
            }));
        let writer = std::thread::Builder::new().name("outcome-writer".into()).spawn({
            let (shared, rows, finishing) = (shared.clone(), self.rows.clone(), self.finishing.clone());
            move || write_outcomes(&shared, &*rows, &finishing, outcomes)
        });
        Box::pin(async move {
            let writer = writer?;
            Ok(Started {
                stop: Box::pin(async {}),
                // The writer records what it was given, then ends.
                finish: Box::pin(async move {
                    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                }),
            })
        })
    }

    fn dead_letters(&self) -> Box<dyn DeadLetters> {
        Box::new(RowDeadLetters(self.rows.clone()))
    }

    fn has_pending<'a>(&'a self, connection: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        let connection = connection.to_string();
        off_thread(&self.rows, move |rows| rows.has_pending(&connection))
    }

    fn backlog(&self) -> BoxFuture<'_, Option<BTreeMap<String, u64>>> {
        let counted = off_thread(&self.rows, |rows| rows.pending_by_connection());
        Box::pin(async move { Some(counted.await.unwrap_or_default()) })
    }

    fn counts(&self) -> BoxFuture<'_, BTreeMap<String, Counts>> {
        let counted = off_thread(&self.rows, |rows| rows.counts());
        Box::pin(async move { counted.await.unwrap_or_default() })
    }

    /// Starts the connection's feeder unless it is running (then wakes it).
    fn wake(&self, shared: &Arc<Shared>, connection: &Arc<Connection>) {
        let mut feeder = connection.feeder.lock().unwrap();
        if connection.feeding.load(Ordering::Acquire) {
            connection.wake.notify_one();
            return;
        }
        connection.feeding.store(true, Ordering::Release);
        let last = feeder.take();
        let (shared, connection, rows) = (shared.clone(), connection.clone(), self.rows.clone());
        let (finishing, reads) = (self.finishing.clone(), self.reads.clone());
        *feeder = Some(tokio::spawn(async move {
            if let Some(last) = last {
                let _ = last.await;
            }
            feed(shared, rows, finishing, reads, connection).await;
        }));
    }

    fn ready_connections(&self) -> BoxFuture<'_, anyhow::Result<Vec<String>>> {
        off_thread(&self.rows, |rows| rows.pending_connections())
    }
}

/// Rows a feeder reads at once, at most. Rows read wait in memory for room
/// in flight, so with many busy connections every feeder's read beyond its
/// share of the host's bound is memory held for nothing: at 100 busy
/// connections, reads of 256 peaked at 264-321 MiB and reads of 64 at
/// 225-236, with the same throughput at 1 and at 100 (BENCHMARKS §10).
const READ_AHEAD: usize = 64;

/// Rows a feeder reads at once stop at this many bytes of bodies.
const READ_AHEAD_BYTES: usize = 4 << 20;

/// Hands a connection's pending rows to its engine, oldest first, each once
/// while it is in flight; a row replayed from the dead letters is picked up
/// on the next full sweep.
async fn feed<R: Rows>(
    shared: Arc<Shared>,
    rows: Arc<R>,
    finishing: Arc<Finishing>,
    reads: Arc<tokio::sync::Semaphore>,
    connection: Arc<Connection>,
) {
    let mut cursor = 0i64;
    let mut last_sweep = tokio::time::Instant::now();
    let mut last_work = tokio::time::Instant::now();
    loop {
        if shared.draining() || !connection.state().delivers() {
            break;
        }
        // Deleted (and perhaps made anew under the same id): this engine
        // is no longer the connection's.
        let current = shared.connections.get(&connection.id);
        if !current.is_some_and(|c| Arc::ptr_eq(&c, &connection)) {
            break;
        }
        if last_sweep.elapsed() > Duration::from_secs(5) {
            cursor = 0;
            last_sweep = tokio::time::Instant::now();
        }
        let (reader, id) = (rows.clone(), connection.id.clone());
        let _reading = finishing.begin_read(&connection.id);
        let Ok(turn) = reads.clone().acquire_owned().await else {
            break;
        };
        let read = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            reader.pending_after(&id, cursor, READ_AHEAD, READ_AHEAD_BYTES)
        });
        let read = match read.await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::error!(connection = %connection.id, "reading the spool: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(_) => break,
        };
        if read.is_empty() {
            let idle = connection.in_flight.lock().unwrap().is_empty();
            if !idle {
                last_work = tokio::time::Instant::now();
            } else if last_work.elapsed() > engine::IDLE && cursor == 0 {
                break;
            }
            tokio::select! {
                _ = connection.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            continue;
        }
        last_work = tokio::time::Instant::now();
        for row in read {
            cursor = cursor.max(row.id);
            let id = EventId::SpoolRow(row.id);
            // Room for it in the connection's share and the host's.
            if !shared.engines.admit(&connection, id, row.body.len()).await {
                continue;
            }
            // Finished since it was read (checked once admitted: the
            // writer marks a row before it releases it).
            if finishing.is_finished(&connection.id, row.id) {
                shared.engines.release(&connection, id, false);
                continue;
            }
            if !shared
                .engines
                .hand(&connection, id, row.body, row.not_before, Some(&row.received_at))
            {
                break;
            }
        }
    }
    connection.feeding.store(false, Ordering::Release);
    // Events stored after the last look start a new engine (which waits
    // for this one to finish).
    if !shared.draining() && connection.state().delivers() {
        let id = connection.id.clone();
        if let Ok(turn) = reads.acquire_owned().await
            && let Ok(Ok(true)) = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                rows.has_pending(&id)
            })
            .await
        {
            shared.ensure_running(&connection);
        }
    }
}

/// An event's outcome as its row records it; none for an event dropped
/// unsent (its row stays pending).
fn finished(connection: &str, record: &EventRecord) -> Option<Finished> {
    let id = record.id.number();
    let (state, outcome) = match &record.outcome {
        EventOutcome::Abandoned(_) => return None,
        EventOutcome::Delivered { .. } => (RowState::Delivered, outcome_json("delivered", None, &record.warnings)),
        EventOutcome::Skipped(reason) => (
            RowState::Skipped,
            outcome_json("skipped", Some(reason), &record.warnings),
        ),
        EventOutcome::DeadLettered(letter) => {
            let mut outcome = outcome_json("dead", Some(&letter.reason), &record.warnings);
            outcome["request"] = letter.request_json();
            outcome["response"] = letter.response_json();
            (RowState::Dead, outcome)
        }
    };
    Some(Finished {
        connection: connection.to_string(),
        id,
        state,
        outcome,
        plugin_version: record.plugin_version.clone(),
    })
}

/// How long the writer waits before it tries a failed write of outcomes
/// again, at most.
const OUTCOME_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long the outcome writer waits for more outcomes when it has few,
/// at a time.
const GATHER: Duration = Duration::from_millis(2);
/// How many times at most it waits, before one commit.
const GATHER_ROUNDS: u32 = 5;
/// Fewer outcomes than this are worth waiting for more.
const GATHER_BELOW: usize = 32;
/// ... and fewer than this many an event's connection among them: a
/// commit writes a page of `pending` for each connection it finishes
/// events of, so outcomes of 100 busy connections written 50 at a time
/// wrote a page for nearly every one (BENCHMARKS §10).
const GATHER_PER_CONNECTION: usize = 4;
/// Outcomes one commit records at most, of those waiting. A commit writes
/// each page it touched once: the rows' pages, and in the index by
/// connection a place for each connection among the outcomes. With 100
/// busy connections a commit of 256 wrote about 200 index pages, 2,048
/// about as many, so larger commits write far fewer pages an event
/// (BENCHMARKS §10).
const OUTCOMES_PER_COMMIT: usize = 2_048;

/// Writes outcomes to their rows, as many per transaction as have come
/// in, and only then lets the feeders see those rows again (a row not yet
/// written stays in flight, so it is not handed out twice).
///
/// A write that fails (a full disk) is tried again, with the outcomes
/// that came meanwhile, until it succeeds: its rows stay in flight all
/// that time, so their events are not sent again, and `/healthz` says
/// why. Only when the service stops with the write still failing are the
/// rows left pending, to be delivered again (idempotently) after restart.
fn write_outcomes(shared: &Shared, rows: &impl Rows, finishing: &Finishing, mut outcomes: Outcomes) {
    let mut batch: Vec<(Arc<Connection>, Finished)> = Vec::new();
    let mut wait = Duration::from_millis(100);
    loop {
        if batch.is_empty() {
            match outcomes.blocking_recv() {
                Some(outcome) => take(shared, &mut batch, outcome),
                None => return,
            }
        }
        // A moment for more to come: a commit writes every page it
        // touched, so outcomes written one or two at a time under a steady
        // flow wrote each page of rows many times over.
        let mut rounds = 0;
        while rounds < GATHER_ROUNDS && gather_more(batch.len(), connections_among(&batch), rounds) {
            std::thread::sleep(GATHER);
            rounds += 1;
            while batch.len() < OUTCOMES_PER_COMMIT {
                match outcomes.try_recv() {
                    Ok(outcome) => take(shared, &mut batch, outcome),
                    Err(_) => break,
                }
            }
        }
        let mut closed = false;
        while batch.len() < OUTCOMES_PER_COMMIT || shared.outcomes_failing.lock().unwrap().is_some() {
            match outcomes.try_recv() {
                Ok(outcome) => take(shared, &mut batch, outcome),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if let Err(e) = rows.finish_all(batch.iter().map(|(_, f)| f)) {
            tracing::error!(
                "recording the outcomes of {} events: {e:#}; their events wait, and the write is tried again",
                batch.len()
            );
            *shared.outcomes_failing.lock().unwrap() = Some(format!("{e:#}"));
            // No more requests leave until outcomes can be recorded: one
            // sent now would be sent again after a crash, behind its
            // person's newer events.
            shared.connections.hold.store(true, Ordering::Release);
            if closed {
                tracing::warn!(
                    "stopping with {} outcomes unrecorded: their events stay pending",
                    batch.len()
                );
                return;
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(OUTCOME_RETRY_MAX);
            continue;
        }
        if shared.outcomes_failing.lock().unwrap().take().is_some() {
            shared.connections.hold.store(false, Ordering::Release);
            tracing::info!("recording outcomes works again");
        }
        wait = Duration::from_millis(100);
        finishing.finished(batch.iter().map(|(c, f)| (c.id.as_str(), f.id)));
        for (connection, finished) in batch.drain(..) {
            shared
                .engines
                .release(&connection, EventId::SpoolRow(finished.id), true);
        }
        if closed {
            return;
        }
    }
}

/// Whether the writer waits for more outcomes before its commit, having
/// `gathered` of `connections` and waited `rounds` times: once when it has
/// fewer than [`GATHER_BELOW`] (as a steady flow of a few connections'
/// events does), and again while they are spread over many connections,
/// fewer than [`GATHER_PER_CONNECTION`] each. A trickle over many
/// connections is written at once: its commits are small whatever their
/// spread.
fn gather_more(gathered: usize, connections: usize, rounds: u32) -> bool {
    let spread = connections * GATHER_PER_CONNECTION;
    (rounds == 0 && gathered < GATHER_BELOW) || (spread > GATHER_BELOW && gathered < spread)
}

/// How many connections the outcomes gathered are of.
fn connections_among(batch: &[(Arc<Connection>, Finished)]) -> usize {
    batch
        .iter()
        .map(|(c, _)| Arc::as_ptr(c))
        .collect::<HashSet<*const Connection>>()
        .len()
}

/// Adds an outcome to the batch to write; an event dropped unsent is let
/// go at once, its row left pending.
fn take(
    shared: &Shared,
    batch: &mut Vec<(Arc<Connection>, Finished)>,
    (connection, record): (Arc<Connection>, EventRecord),
) {
    match finished(&connection.id, &record) {
        Some(finished) => batch.push((connection, finished)),
        None => shared.engines.release(&connection, record.id, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_waits_for_more_outcomes_only_when_a_commit_of_them_would_be_spread_thin() {
        // A steady flow of one connection: one wait when few have come.
        assert!(gather_more(10, 1, 0));
        assert!(!gather_more(10, 1, 1));
        assert!(!gather_more(40, 1, 0));
        // A trickle over a few connections: the same.
        assert!(gather_more(5, 5, 0) && !gather_more(5, 5, 1));
        // Many busy connections: more waits, until four each.
        assert!(gather_more(50, 40, 0) && gather_more(120, 40, 3));
        assert!(!gather_more(160, 40, 1));
    }

    /// Which connections have events ready: one with only waiting rows (a
    /// Retry-After) is not among them, one with a waiting row and a ready
    /// one after it is; on both row stores.
    fn ready_connections_are_those_with_a_row_not_waiting(rows: &impl Rows) {
        let event = |connection: &str| NewEvent {
            connection: connection.to_string(),
            message_id: None,
            received_at: "2026-12-06T00:00:00Z".to_string(),
            body: "{}".to_string(),
            person: None,
        };
        assert!(rows.pending_connections().unwrap().is_empty());
        let appended = ["a", "b", "b", "c", "c", "d"].map(event);
        rows.append_groups([&appended[..]]).unwrap();
        let first = |connection: &str| rows.pending_after(connection, 0, 10, usize::MAX).unwrap();
        let later = chrono::Utc::now() + chrono::Duration::seconds(60);
        // b: every row waits; c: its first row waits, not its second.
        for row in first("b") {
            rows.defer(row.id, later).unwrap();
        }
        rows.defer(first("c")[0].id, later).unwrap();
        // d: its one row finished.
        let d = first("d")[0].id;
        rows.finish_all([&Finished {
            connection: "d".to_string(),
            id: d,
            state: RowState::Delivered,
            outcome: outcome_json("delivered", None, &[]),
            plugin_version: "1.0.0".to_string(),
        }])
        .unwrap();
        let mut ready = rows.pending_connections().unwrap();
        ready.sort();
        assert_eq!(ready, ["a", "c"]);
        assert!(rows.has_pending("b").unwrap() && !rows.has_pending("d").unwrap());
    }

    #[test]
    fn ready_connections_on_the_spool() {
        let dir = crate::serve::testing::TempDir::new();
        let spool = Spool::open(&dir.0.join("spool.sqlite"), crate::spool::Durability::ProcessCrash).unwrap();
        ready_connections_are_those_with_a_row_not_waiting(&spool);
    }

    #[test]
    fn ready_connections_in_memory() {
        ready_connections_are_those_with_a_row_not_waiting(&crate::serve::log::memory::MemoryRows::default());
    }

    #[test]
    fn a_mark_lasts_only_while_a_read_of_its_own_connection_begun_before_it_is_out() {
        let finishing = Arc::new(Finishing::default());
        // A feeder of x waits long in its read (a failing shop).
        let x = finishing.begin_read("x");
        // y's rows finished with no read of y out: nothing kept.
        finishing.finished([("y", 1)].into_iter());
        assert!(!finishing.is_finished("y", 1));
        // A read of y out: marked, until that read is handed in.
        let y = finishing.begin_read("y");
        finishing.finished([("y", 2), ("x", 3)].into_iter());
        assert!(finishing.is_finished("y", 2) && finishing.is_finished("x", 3));
        drop(y);
        assert!(!finishing.is_finished("y", 2));
        assert!(!finishing.by_connection.lock().unwrap().contains_key("y"));
        // x's mark stays for x's read begun before it, then goes.
        let x_later = finishing.begin_read("x");
        drop(x);
        assert!(!finishing.is_finished("x", 3), "kept for a read begun after it");
        drop(x_later);
        assert!(finishing.by_connection.lock().unwrap().is_empty());
    }
}
