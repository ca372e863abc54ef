//! The spool: every accepted event, durably, until it is delivered,
//! skipped or dead. An embedded SQLite database in WAL mode; `serve`
//! acknowledges an event only after its row is committed, and delivers
//! from the rows, so a crash at any moment loses nothing (pending rows are
//! delivered again after a restart) and duplicates nothing at Klaviyo (the
//! plugin derives the same `unique_id` from the same event).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, params};
use serde_json::{Value, json};

/// Where an event is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Delivered,
    Skipped,
    Dead,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Skipped => "skipped",
            State::Dead => "dead",
        }
    }
}

/// The spool's format: 2 keeps outcomes in a table of their own (1, the
/// format before it, kept them in each event's row). Set in SQLite's
/// `user_version`.
const FORMAT: i64 = 2;

/// How hard a commit is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Survives the process being killed (WAL, synchronous=NORMAL): the
    /// default, and what `kill -9` tests prove.
    ProcessCrash,
    /// Also survives power loss (synchronous=FULL: an fsync per commit).
    PowerLoss,
}

/// A spooled event.
#[derive(Clone, Debug)]
pub struct SpooledEvent {
    pub id: i64,
    pub body: String,
    /// Not to be sent before this (a Retry-After kept across a restart).
    pub not_before: Option<std::time::SystemTime>,
    /// When ingest received it (RFC 3339), as stored.
    pub received_at: String,
}

/// An event to store for one connection.
pub struct NewEvent {
    pub connection: String,
    pub message_id: Option<String>,
    pub received_at: String,
    pub body: String,
    /// Who the event is about (`mapping::person_key`): a Retry-After on
    /// one of a person's events holds back their later ones too.
    pub person: Option<String>,
}

/// The connection of `serve` without a connection config: the one the
/// flags describe, and the one spools written before connections existed
/// hold every event for.
pub const DEFAULT_CONNECTION: &str = "default";

/// A connection as the spool keeps it: its id, its state, and its
/// configuration as JSON (which `serve::connections` reads; the spool
/// does not look inside it).
#[derive(Clone, Debug)]
pub struct StoredConnection {
    pub id: String,
    pub state: String,
    pub spec: Value,
}

/// Events of one connection by state.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counts {
    pub pending: u64,
    pub delivered: u64,
    pub skipped: u64,
    pub dead: u64,
}

/// A dead letter as `dlq list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeadRow {
    pub id: i64,
    pub connection: String,
    pub message_id: Option<String>,
    pub received_at: String,
    pub plugin_version: Option<String>,
    pub outcome: Value,
    pub event: Value,
}

pub struct Spool {
    conn: Mutex<Connection>,
    /// Read-only connections for what only reads (the feeders' reads of
    /// pending rows, counts): in WAL mode a read sees the last commit
    /// without waiting for the one being written, so feeders and the
    /// outcome writer do not take turns on one lock.
    readers: Vec<Mutex<Connection>>,
}

/// Read-only connections a spool keeps (as many as the row log lets
/// feeders read at once).
pub(crate) const READERS: usize = 2;

/// How one event ended, for `finish_all`.
pub struct Finished {
    pub connection: String,
    pub id: i64,
    pub state: State,
    pub outcome: Value,
    pub plugin_version: String,
}

impl Spool {
    pub fn open(path: &Path, durability: Durability) -> anyhow::Result<Spool> {
        let conn = Connection::open(path).with_context(|| format!("opening the spool {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let synchronous = match durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        // 16 MiB of pages (the default is 2): many connections' feeders
        // read the pending rows of as many parts of the table at once.
        conn.pragma_update(None, "cache_size", -16_000)?;
        let format: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if format > FORMAT {
            anyhow::bail!(
                "the spool {} was written by a newer version of cdp-host (format {format}; this one reads up to {FORMAT})",
                path.display()
            );
        }
        if has_column(&conn, "events", "state")? {
            migrate_from_rows(&conn)
                .with_context(|| format!("moving the spool {} to format {FORMAT}", path.display()))?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", FORMAT)?;
        let readers = (0..READERS)
            .map(|_| open_reader(path).map(Mutex::new))
            .collect::<anyhow::Result<_>>()?;
        Ok(Spool {
            conn: Mutex::new(conn),
            readers,
        })
    }

    /// Stores events in one transaction; returns once it is committed.
    pub fn append(&self, events: &[NewEvent]) -> anyhow::Result<()> {
        self.append_groups(std::iter::once(events))
    }

    /// Stores several senders' events, in the order given, in one
    /// transaction: one commit for all (group commit).
    pub fn append_groups<'e>(&self, groups: impl IntoIterator<Item = &'e [NewEvent]>) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (connection, message_id, received_at, body, person) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut pending = tx.prepare_cached("INSERT INTO pending (connection, id) VALUES (?1, ?2)")?;
            for e in groups.into_iter().flatten() {
                let id = insert.insert(params![e.connection, e.message_id, e.received_at, e.body, e.person])?;
                pending.execute(params![e.connection, id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A connection's pending events with an id above `after`, oldest
    /// first, each with the time before which it must not be sent
    /// (a Retry-After Klaviyo gave), if any. Nothing is left out: a
    /// reader that skipped an event to wait would go past it, and the
    /// person's later events would overtake it (the fault run's checker
    /// found that). Delivery waits instead, holding the person's later
    /// events behind it.
    /// Reads at most `limit` rows, and stops after the row that takes their
    /// bodies to `max_bytes` (at least one row is read): a backlog of large
    /// events is read a few at a time.
    pub fn pending_after(
        &self,
        connection: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<SpooledEvent>> {
        let conn = self.reader();
        let mut query = conn.prepare_cached(
            "SELECT e.id, e.body, e.not_before, e.received_at FROM pending p JOIN events e ON e.id = p.id
                 WHERE p.connection = ?1 AND p.id > ?2 ORDER BY p.id LIMIT ?3",
        )?;
        let rows = query.query_map(params![connection, after, limit as i64], |row| {
            let not_before: Option<String> = row.get(2)?;
            Ok(SpooledEvent {
                id: row.get(0)?,
                body: row.get(1)?,
                not_before: not_before
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                    .map(std::time::SystemTime::from),
                received_at: row.get(3)?,
            })
        })?;
        let (mut read, mut bytes) = (Vec::new(), 0usize);
        for row in rows {
            let row = row?;
            bytes += row.body.len();
            read.push(row);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(read)
    }

    /// A read-only connection: the first one free, else the first.
    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.readers
            .iter()
            .find_map(|r| r.try_lock().ok())
            .unwrap_or_else(|| self.readers[0].lock().unwrap())
    }

    /// The connections with pending events ready to deliver. Each
    /// connection is found by a step through the index of `pending` (not by
    /// reading every pending row: with a backlog of 100,000 that read took
    /// about a tenth of a second every 5 s, BENCHMARKS §10), then asked for one
    /// ready row, which is nearly always its first.
    pub fn pending_connections(&self) -> anyhow::Result<Vec<String>> {
        let conn = self.reader();
        let mut query = conn.prepare_cached(
            "WITH RECURSIVE each (connection) AS (
                 SELECT (SELECT min(connection) FROM pending)
                 UNION ALL
                 SELECT (SELECT min(connection) FROM pending WHERE connection > each.connection) FROM each
                     WHERE each.connection IS NOT NULL)
             SELECT connection FROM each WHERE connection IS NOT NULL AND EXISTS (
                 SELECT 1 FROM pending p JOIN events e ON e.id = p.id WHERE p.connection = each.connection
                     AND (e.not_before IS NULL OR e.not_before <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
        )?;
        let rows = query.query_map([], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether a connection has any pending event, ready or waiting.
    pub fn has_pending(&self, connection: &str) -> anyhow::Result<bool> {
        let conn = self.reader();
        Ok(conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM pending WHERE connection = ?1)")?
            .query_row([connection], |r| r.get(0))?)
    }

    /// Each connection's pending events (the pending table alone: cheap
    /// enough for every `/metrics` scrape).
    pub fn pending_by_connection(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let conn = self.reader();
        let mut query = conn.prepare_cached("SELECT connection, count(*) FROM pending GROUP BY connection")?;
        let rows = query.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Each connection's events, by state.
    pub fn counts(&self) -> anyhow::Result<std::collections::BTreeMap<String, Counts>> {
        let conn = self.reader();
        let mut query = conn.prepare_cached(
            "SELECT connection, 'pending', count(*) FROM pending GROUP BY connection
             UNION ALL
             SELECT connection, state, count(*) FROM outcomes GROUP BY connection, state",
        )?;
        let mut counts = std::collections::BTreeMap::<String, Counts>::new();
        let rows = query.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (connection, state, n) = row?;
            let entry = counts.entry(connection).or_default();
            let n = n as u64;
            match state.as_str() {
                "pending" => entry.pending = n,
                "delivered" => entry.delivered = n,
                "skipped" => entry.skipped = n,
                "dead" => entry.dead = n,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// Saves a connection (created or changed), durably.
    pub fn save_connection(&self, connection: &StoredConnection) -> anyhow::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.prepare_cached(
            "INSERT INTO connections (id, state, spec, updated_at) VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, spec = excluded.spec, updated_at = excluded.updated_at",
        )?
        .execute(params![connection.id, connection.state, connection.spec.to_string()])?;
        Ok(())
    }

    pub fn delete_connection(&self, id: &str) -> anyhow::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.execute("DELETE FROM connections WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Every saved connection, by id.
    pub fn connections(&self) -> anyhow::Result<Vec<StoredConnection>> {
        let conn = self.conn.lock().unwrap();
        let mut query = conn.prepare("SELECT id, state, spec FROM connections ORDER BY id")?;
        let rows = query.query_map([], |row| {
            let spec: String = row.get(2)?;
            Ok(StoredConnection {
                id: row.get(0)?,
                state: row.get(1)?,
                spec: serde_json::from_str(&spec).unwrap_or(Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Keeps a plugin version's bytes, once per SHA-256.
    pub fn put_plugin(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.prepare_cached(
            "INSERT OR IGNORE INTO plugins (sha256, bytes, added_at) VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        )?
        .execute(params![sha256, bytes])?;
        Ok(())
    }

    /// A kept plugin version's bytes.
    pub fn plugin(&self, sha256: &str) -> anyhow::Result<Option<Vec<u8>>> {
        use rusqlite::OptionalExtension;
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .prepare_cached("SELECT bytes FROM plugins WHERE sha256 = ?1")?
            .query_row([sha256], |r| r.get(0))
            .optional()?)
    }

    /// Records that the destination asked for this event not to be sent
    /// again before `until` (its Retry-After), so that a restarted process
    /// waits as this one would have.
    pub fn defer(&self, id: i64, until: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()> {
        let until = until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let conn = self.conn.lock().unwrap();
        conn.prepare_cached("UPDATE events SET not_before = ?2 WHERE id = ?1")?
            .execute(params![id, until])?;
        Ok(())
    }

    /// Records how an event ended and which plugin version mapped it.
    pub fn finish(
        &self,
        connection: &str,
        id: i64,
        state: State,
        outcome: &Value,
        plugin_version: &str,
    ) -> anyhow::Result<()> {
        self.finish_all(&[Finished {
            connection: connection.to_string(),
            id,
            state,
            outcome: outcome.clone(),
            plugin_version: plugin_version.to_string(),
        }])
    }

    /// Records many outcomes in one transaction: at thousands of events a
    /// second, a transaction per outcome is what would bound delivery.
    /// An outcome is appended to a table of its own and the event leaves
    /// the pending table; the event's row, with its body, is not written
    /// again (rewriting it and moving it in two indexes by state cost one
    /// busy connection about a fifth of serve's CPU an event: BENCHMARKS
    /// §10).
    pub fn finish_all<'a>(&self, finished: impl IntoIterator<Item = &'a Finished>) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        {
            let mut unpend = tx.prepare_cached("DELETE FROM pending WHERE connection = ?1 AND id = ?2")?;
            let mut record = tx.prepare_cached(
                "INSERT OR REPLACE INTO outcomes (id, connection, state, outcome, plugin_version, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            )?;
            for f in finished {
                unpend.execute(params![f.connection, f.id])?;
                record.execute(params![
                    f.id,
                    f.connection,
                    f.state.as_str(),
                    f.outcome.to_string(),
                    f.plugin_version
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn count(&self, state: State) -> anyhow::Result<u64> {
        let conn = self.conn.lock().unwrap();
        let n: i64 = match state {
            State::Pending => conn.query_row("SELECT count(*) FROM pending", [], |r| r.get(0))?,
            _ => conn.query_row(
                "SELECT count(*) FROM outcomes WHERE state = ?1",
                [state.as_str()],
                |r| r.get(0),
            )?,
        };
        Ok(n as u64)
    }

    /// Dead letters, oldest first, of one connection or of all.
    pub fn dead(&self, connection: Option<&str>, limit: usize) -> anyhow::Result<Vec<DeadRow>> {
        let conn = self.conn.lock().unwrap();
        let mut query = conn.prepare(
            "SELECT e.id, e.connection, e.message_id, e.received_at, o.plugin_version, o.outcome, e.body
                 FROM outcomes o JOIN events e ON e.id = o.id
                 WHERE o.state = 'dead' AND (?1 IS NULL OR o.connection = ?1) ORDER BY o.id LIMIT ?2",
        )?;
        let rows = query.query_map(params![connection, limit as i64], |row| {
            let outcome: Option<String> = row.get(5)?;
            let body: String = row.get(6)?;
            Ok(DeadRow {
                id: row.get(0)?,
                connection: row.get(1)?,
                message_id: row.get(2)?,
                received_at: row.get(3)?,
                plugin_version: row.get(4)?,
                outcome: outcome
                    .and_then(|o| serde_json::from_str(&o).ok())
                    .unwrap_or(Value::Null),
                event: serde_json::from_str(&body).unwrap_or(Value::String(body)),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Dead letters back to pending (all, or those ids; of one connection
    /// or of all); returns how many.
    pub fn replay(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        self.on_dead(connection, ids, |tx, (connection, id)| {
            tx.prepare_cached("INSERT OR IGNORE INTO pending (connection, id) VALUES (?1, ?2)")?
                .execute(params![connection, id])?;
            tx.prepare_cached("UPDATE events SET not_before = NULL WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        })
    }

    /// Deletes dead letters (all, or those ids; of one connection or of
    /// all); returns how many.
    pub fn purge(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        self.on_dead(connection, ids, |tx, (_, id)| {
            tx.prepare_cached("DELETE FROM events WHERE id = ?1")?.execute([id])?;
            Ok(())
        })
    }

    /// Does `each` to the chosen dead letters and takes their outcomes
    /// away, all in one transaction; returns how many.
    fn on_dead(
        &self,
        connection: Option<&str>,
        ids: &[i64],
        each: impl Fn(&rusqlite::Transaction, (&str, i64)) -> anyhow::Result<()>,
    ) -> anyhow::Result<usize> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        let mut chosen: Vec<(String, i64)> = Vec::new();
        {
            let mut query = tx.prepare_cached(
                "SELECT connection, id FROM outcomes
                     WHERE state = 'dead' AND (?1 IS NULL OR connection = ?1) AND (?2 IS NULL OR id = ?2) ORDER BY id",
            )?;
            let wanted: Vec<Option<i64>> = if ids.is_empty() {
                vec![None]
            } else {
                ids.iter().copied().map(Some).collect()
            };
            for id in wanted {
                let rows = query.query_map(params![connection, id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                for row in rows {
                    chosen.push(row?);
                }
            }
        }
        for (connection, id) in &chosen {
            each(&tx, (connection, *id))?;
            tx.prepare_cached("DELETE FROM outcomes WHERE id = ?1")?.execute([id])?;
        }
        tx.commit()?;
        Ok(chosen.len())
    }

    /// Deletes delivered and skipped events older than `retention`.
    pub fn prune(&self, retention: Duration) -> anyhow::Result<usize> {
        let mut conn = self.conn.lock().unwrap();
        let cutoff = format!("-{} seconds", retention.as_secs());
        let old = "state IN ('delivered', 'skipped') AND updated_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)";
        let tx = conn.transaction()?;
        tx.execute(
            &format!("DELETE FROM events WHERE id IN (SELECT id FROM outcomes WHERE {old})"),
            [&cutoff],
        )?;
        let n = tx.execute(&format!("DELETE FROM outcomes WHERE {old}"), [&cutoff])?;
        tx.commit()?;
        Ok(n)
    }
}

/// The tables of format 2. An event's row is written once; while it
/// waits it has an entry in `pending` (by connection, in order: what each
/// feeder reads), and once it ends its outcome is a row of `outcomes`,
/// appended in the order outcomes are recorded (`seq`) and found by event
/// through a unique index (many connections finish events spread over the
/// whole table at once; their outcomes still go to its end).
/// `event_states` shows every event with its state, for tests and for an
/// operator at the `sqlite3` prompt.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT,
        received_at TEXT NOT NULL,
        body TEXT NOT NULL,
        not_before TEXT,
        connection TEXT NOT NULL DEFAULT 'default',
        person TEXT
    );
    CREATE TABLE IF NOT EXISTS pending (
        connection TEXT NOT NULL,
        id INTEGER NOT NULL,
        PRIMARY KEY (connection, id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS outcomes (
        seq INTEGER PRIMARY KEY,
        id INTEGER NOT NULL UNIQUE,
        connection TEXT NOT NULL,
        state TEXT NOT NULL,
        outcome TEXT,
        plugin_version TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS outcomes_dead ON outcomes (id) WHERE state = 'dead';
    CREATE VIEW IF NOT EXISTS event_states AS
        SELECT e.id, e.connection, e.message_id, e.received_at, e.body, e.not_before, e.person,
               coalesce(o.state, 'pending') AS state, o.outcome, o.plugin_version, o.updated_at
        FROM events e LEFT JOIN outcomes o ON o.id = e.id;
    CREATE TABLE IF NOT EXISTS connections (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS plugins (
        sha256 TEXT PRIMARY KEY,
        bytes BLOB NOT NULL,
        added_at TEXT NOT NULL
    );";

/// A read-only connection to the spool at `path` (opened after the
/// writer's, so the schema is there).
fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("opening the spool {} to read", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Its own cache of pages, 1 MiB: a feeder reads each row once, so a
    // larger cache would mostly keep pages no read asks for again.
    conn.pragma_update(None, "cache_size", -1_000)?;
    Ok(conn)
}

/// Moves a spool of format 1 (each event's state and outcome in its own
/// row) to format 2, in one transaction: a crash half way leaves format 1.
/// The columns that held the state go, so that an earlier cdp-host stops
/// at start-up on such a spool ("no such column: state") instead of
/// taking every event for pending and sending it again.
fn migrate_from_rows(conn: &Connection) -> anyhow::Result<()> {
    // Spools older still lack these columns: rows written before
    // `not_before` existed have none, those written before connections
    // existed hold the default connection's events, and those written
    // before `person` existed are about nobody in particular.
    add_column(conn, "not_before", "TEXT")?;
    add_column(conn, "connection", "TEXT NOT NULL DEFAULT 'default'")?;
    add_column(conn, "person", "TEXT")?;
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         {SCHEMA}
         INSERT OR IGNORE INTO pending (connection, id) SELECT connection, id FROM events WHERE state = 'pending';
         INSERT OR REPLACE INTO outcomes (id, connection, state, outcome, plugin_version, updated_at)
             SELECT id, connection, state, outcome, plugin_version, coalesce(updated_at, received_at)
             FROM events WHERE state <> 'pending' ORDER BY id;
         DROP INDEX IF EXISTS events_state;
         DROP INDEX IF EXISTS events_connection;
         DROP INDEX IF EXISTS events_deferred;
         ALTER TABLE events DROP COLUMN state;
         ALTER TABLE events DROP COLUMN outcome;
         ALTER TABLE events DROP COLUMN plugin_version;
         ALTER TABLE events DROP COLUMN updated_at;
         PRAGMA user_version = {FORMAT};
         COMMIT;"
    ))
    .inspect_err(|_| {
        let _ = conn.execute_batch("ROLLBACK");
    })?;
    Ok(())
}

fn has_column(conn: &Connection, table: &str, name: &str) -> anyhow::Result<bool> {
    Ok(conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        [table, name],
        |r| r.get(0),
    )?)
}

/// Adds a column to `events` if a spool written by an older version lacks it.
fn add_column(conn: &Connection, name: &str, definition: &str) -> anyhow::Result<()> {
    if !has_column(conn, "events", name)? {
        conn.execute_batch(&format!("ALTER TABLE events ADD COLUMN {name} {definition}"))?;
    }
    Ok(())
}

/// The outcome column of a finished event.
pub fn outcome_json(kind: &str, reason: Option<&str>, warnings: &[String]) -> Value {
    json!({ "outcome": kind, "reason": reason, "warnings": warnings })
}

#[cfg(test)]
mod tests {
    use rusqlite::OptionalExtension;

    use super::*;

    /// A directory of its own for a test's spool (removed by the test), and
    /// the spool's path in it.
    fn spool_path(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("cdp-host-spool-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spool.db");
        (dir, path)
    }

    /// A new spool in a directory of its own (removed by the test).
    fn new_spool(name: &str) -> (std::path::PathBuf, Spool) {
        let (dir, path) = spool_path(name);
        (dir, Spool::open(&path, Durability::ProcessCrash).unwrap())
    }

    #[test]
    fn pruning_deletes_only_finished_events_older_than_the_retention() {
        let (dir, spool) = new_spool("prune");
        let ids = [
            "old-delivered",
            "old-skipped",
            "old-dead",
            "old-pending",
            "new-delivered",
        ];
        let events: Vec<_> = ids
            .iter()
            .map(|id| NewEvent {
                connection: DEFAULT_CONNECTION.to_string(),
                message_id: Some(id.to_string()),
                received_at: "2026-11-28T00:00:00Z".to_string(),
                body: "{}".to_string(),
                person: None,
            })
            .collect();
        spool.append(&events).unwrap();
        let rows = spool.pending_after(DEFAULT_CONNECTION, 0, 10, usize::MAX).unwrap();
        let outcome = outcome_json("send", None, &[]);
        for (row, state) in rows.iter().zip([State::Delivered, State::Skipped, State::Dead]) {
            spool
                .finish(DEFAULT_CONNECTION, row.id, state, &outcome, "1.0.0")
                .unwrap();
        }
        spool
            .finish(DEFAULT_CONNECTION, rows[4].id, State::Delivered, &outcome, "1.0.0")
            .unwrap();
        // Two hours pass for the first four.
        spool
            .conn
            .lock()
            .unwrap()
            .execute_batch(
                "UPDATE outcomes SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours')
                     WHERE id IN (SELECT id FROM events WHERE message_id LIKE 'old-%');
                 UPDATE events SET received_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours')
                     WHERE message_id LIKE 'old-%';",
            )
            .unwrap();

        assert_eq!(spool.prune(Duration::from_secs(3600)).unwrap(), 2);
        let state_of = |id: &str| -> Option<String> {
            let conn = spool.conn.lock().unwrap();
            conn.query_row("SELECT state FROM event_states WHERE message_id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .unwrap()
        };
        let states: Vec<Option<String>> = ids.iter().map(|id| state_of(id)).collect();
        assert_eq!(
            states,
            [
                None,
                None,
                Some("dead".to_string()),
                Some("pending".to_string()),
                Some("delivered".to_string())
            ],
            "dead letters wait for an operator, pending events for delivery, recent ones for the retention"
        );
        // Pruning again finds nothing more.
        assert_eq!(spool.prune(Duration::from_secs(3600)).unwrap(), 0);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Found by the fault run: a Retry-After recorded for a person's
    /// identify, then a restart, and the person's later identify went
    /// first (the older one then overwrote it at Klaviyo).
    #[test]
    fn a_deferred_event_is_read_in_its_place_with_its_wait() {
        let (dir, spool) = new_spool("defer");
        let event = |id: &str, person: Option<&str>| NewEvent {
            connection: DEFAULT_CONNECTION.to_string(),
            message_id: Some(id.to_string()),
            received_at: "2026-12-03T00:00:00Z".to_string(),
            body: format!(r#"{{"messageId":"{id}"}}"#),
            person: person.map(str::to_string),
        };
        spool
            .append(&[
                event("p-v1", Some("u\"p\"")),
                event("q-v1", Some("u\"q\"")),
                event("p-v2", Some("u\"p\"")),
                event("nobody", None),
            ])
            .unwrap();
        let ids = |spool: &Spool| -> Vec<String> {
            spool
                .pending_after(DEFAULT_CONNECTION, 0, 10, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|row| {
                    serde_json::from_str::<Value>(&row.body).unwrap()["messageId"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(ids(&spool), ["p-v1", "q-v1", "p-v2", "nobody"]);
        let first = spool.pending_after(DEFAULT_CONNECTION, 0, 1, usize::MAX).unwrap()[0].id;
        let until = chrono::Utc::now() + chrono::Duration::seconds(40);
        spool.defer(first, until).unwrap();
        // Still read, in order, with its wait: delivery holds it (and the
        // person's later events behind it) until then.
        assert_eq!(ids(&spool), ["p-v1", "q-v1", "p-v2", "nobody"]);
        let waits: Vec<Option<std::time::SystemTime>> = spool
            .pending_after(DEFAULT_CONNECTION, 0, 10, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|row| row.not_before)
            .collect();
        let kept = waits[0].expect("the wait is read back");
        let wanted = std::time::SystemTime::from(until);
        assert!(
            kept.duration_since(wanted).unwrap_or_else(|e| e.duration()) < std::time::Duration::from_millis(2),
            "{kept:?} {wanted:?}"
        );
        assert!(waits[1..].iter().all(Option::is_none));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A spool written by the previous format (each event's state and
    /// outcome in its row) opens with nothing lost: pending events read
    /// in order with their waits, finished ones counted and dead letters
    /// listed with their outcomes; the old columns are gone, so that an
    /// earlier cdp-host stops at start-up instead of sending everything
    /// again; and opening it again changes nothing.
    #[test]
    fn a_spool_of_the_previous_format_is_moved_with_nothing_lost() {
        let (dir, path) = spool_path("format1");
        {
            // What the previous version wrote.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE events (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    message_id TEXT,
                    received_at TEXT NOT NULL,
                    body TEXT NOT NULL,
                    state TEXT NOT NULL DEFAULT 'pending',
                    outcome TEXT,
                    plugin_version TEXT,
                    updated_at TEXT
                 );
                 CREATE INDEX events_state ON events (state, id);
                 ALTER TABLE events ADD COLUMN not_before TEXT;
                 ALTER TABLE events ADD COLUMN connection TEXT NOT NULL DEFAULT 'default';
                 ALTER TABLE events ADD COLUMN person TEXT;
                 CREATE INDEX events_connection ON events (connection, state, id);
                 CREATE INDEX events_deferred ON events (connection, person, id)
                    WHERE not_before IS NOT NULL AND state = 'pending';
                 CREATE TABLE connections (id TEXT PRIMARY KEY, state TEXT NOT NULL, spec TEXT NOT NULL, updated_at TEXT NOT NULL);
                 CREATE TABLE plugins (sha256 TEXT PRIMARY KEY, bytes BLOB NOT NULL, added_at TEXT NOT NULL);
                 INSERT INTO connections VALUES ('shop-a', 'active', '{}', '2026-12-01T00:00:00Z');
                 INSERT INTO events (message_id, received_at, body, state, outcome, plugin_version, updated_at, connection)
                    VALUES ('a-delivered', '2026-12-01T00:00:00Z', '{\"n\":1}', 'delivered', '{\"outcome\":\"delivered\"}', '1.0.0', '2026-12-01T00:00:01Z', 'shop-a');
                 INSERT INTO events (message_id, received_at, body, state, outcome, plugin_version, updated_at, connection)
                    VALUES ('a-dead', '2026-12-01T00:00:00Z', '{\"n\":2}', 'dead', '{\"outcome\":\"dead\",\"reason\":\"400\"}', '1.0.0', '2026-12-01T00:00:02Z', 'shop-a');
                 INSERT INTO events (message_id, received_at, body, not_before, connection, person)
                    VALUES ('a-waiting', '2026-12-01T00:00:00Z', '{\"n\":3}', '2026-12-01T00:10:00.000Z', 'shop-a', 'u\"p\"');
                 INSERT INTO events (message_id, received_at, body, state, outcome, updated_at)
                    VALUES ('d-skipped', '2026-12-01T00:00:00Z', '{\"n\":4}', 'skipped', '{\"outcome\":\"skipped\"}', '2026-12-01T00:00:03Z');
                 INSERT INTO events (message_id, received_at, body) VALUES ('d-pending', '2026-12-01T00:00:00Z', '{\"n\":5}');",
            )
            .unwrap();
        }
        let check = |spool: &Spool| {
            let pending: Vec<(i64, String, bool)> = ["shop-a", DEFAULT_CONNECTION]
                .iter()
                .flat_map(|c| spool.pending_after(c, 0, 10, usize::MAX).unwrap())
                .map(|row| (row.id, row.body, row.not_before.is_some()))
                .collect();
            assert_eq!(
                pending,
                [
                    (3, r#"{"n":3}"#.to_string(), true),
                    (5, r#"{"n":5}"#.to_string(), false)
                ]
            );
            let counts = spool.counts().unwrap();
            let a = counts["shop-a"];
            let d = counts[DEFAULT_CONNECTION];
            assert_eq!((a.pending, a.delivered, a.skipped, a.dead), (1, 1, 0, 1));
            assert_eq!((d.pending, d.delivered, d.skipped, d.dead), (1, 0, 1, 0));
            let dead = spool.dead(None, 10).unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!((dead[0].id, dead[0].connection.as_str()), (2, "shop-a"));
            assert_eq!(dead[0].outcome["reason"], "400");
            assert_eq!(dead[0].plugin_version.as_deref(), Some("1.0.0"));
            assert_eq!(spool.connections().unwrap().len(), 1);
        };
        let spool = Spool::open(&path, Durability::ProcessCrash).unwrap();
        check(&spool);
        {
            let conn = spool.conn.lock().unwrap();
            // The statement an earlier version runs at start-up now fails.
            let earlier = conn.execute_batch("CREATE INDEX IF NOT EXISTS events_state ON events (state, id)");
            assert!(
                earlier.unwrap_err().to_string().contains("no such column: state"),
                "an earlier cdp-host must refuse this spool"
            );
            let format: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
            assert_eq!(format, FORMAT);
        }
        drop(spool);
        let again = Spool::open(&path, Durability::ProcessCrash).unwrap();
        check(&again);
        // Ids go on rising after the old rows.
        again
            .append(&[NewEvent {
                connection: DEFAULT_CONNECTION.to_string(),
                message_id: Some("new".to_string()),
                received_at: "2026-12-05T00:00:00Z".to_string(),
                body: "{}".to_string(),
                person: None,
            }])
            .unwrap();
        let ids: Vec<i64> = again
            .pending_after(DEFAULT_CONNECTION, 0, 10, usize::MAX)
            .unwrap()
            .iter()
            .map(|row| row.id)
            .collect();
        assert_eq!(ids, [5, 6]);
        // Dead letters replay and purge on the moved spool.
        assert_eq!(again.replay(Some("shop-a"), &[]).unwrap(), 1);
        assert_eq!(again.counts().unwrap()["shop-a"].pending, 2);
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A later version's spool is not read as if it were this one's.
    #[test]
    fn a_spool_of_a_newer_format_is_refused_by_name() {
        let (dir, path) = spool_path("format9");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 9)
            .unwrap();
        let e = Spool::open(&path, Durability::ProcessCrash).err().expect("refused");
        assert!(
            format!("{e:#}").contains("newer version of cdp-host (format 9"),
            "{e:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Replaying and purging dead letters, by id and all at once.
    #[test]
    fn dead_letters_replay_and_purge_by_id_and_all() {
        let (dir, spool) = new_spool("dead");
        let events: Vec<_> = (0..4)
            .map(|n| NewEvent {
                connection: if n < 3 { "a" } else { "b" }.to_string(),
                message_id: Some(format!("m{n}")),
                received_at: "2026-12-05T00:00:00Z".to_string(),
                body: format!("{{\"n\":{n}}}"),
                person: None,
            })
            .collect();
        spool.append(&events).unwrap();
        let dead = outcome_json("dead", Some("400"), &[]);
        for (connection, id) in [("a", 1), ("a", 2), ("a", 3), ("b", 4)] {
            spool.defer(id, chrono::Utc::now()).unwrap();
            spool.finish(connection, id, State::Dead, &dead, "1.0.0").unwrap();
        }
        assert_eq!(spool.count(State::Pending).unwrap(), 0);
        assert_eq!(spool.count(State::Dead).unwrap(), 4);
        assert_eq!(spool.replay(Some("a"), &[2]).unwrap(), 1);
        assert_eq!(spool.replay(Some("b"), &[2]).unwrap(), 0, "2 is a's");
        let back = spool.pending_after("a", 0, 10, usize::MAX).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].id, 2);
        assert!(back[0].not_before.is_none(), "a replayed event waits for nothing");
        assert_eq!(spool.purge(Some("a"), &[]).unwrap(), 2);
        assert_eq!(
            spool.dead(None, 10).unwrap().iter().map(|d| d.id).collect::<Vec<_>>(),
            [4]
        );
        assert_eq!(spool.purge(None, &[4, 99]).unwrap(), 1);
        assert_eq!(spool.count(State::Dead).unwrap(), 0);
        let left: i64 = spool
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 1, "only the replayed event's row is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
