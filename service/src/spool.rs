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
}

/// How one event ended, for `finish_all`.
pub struct Finished {
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT,
                received_at TEXT NOT NULL,
                body TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'pending',
                outcome TEXT,
                plugin_version TEXT,
                updated_at TEXT
             );
             CREATE INDEX IF NOT EXISTS events_state ON events (state, id);",
        )?;
        // Spools written before `not_before` existed gain it; those written
        // before connections existed hold the default connection's events.
        add_column(&conn, "not_before", "TEXT")?;
        add_column(&conn, "connection", "TEXT NOT NULL DEFAULT 'default'")?;
        // Rows written before `person` existed have none, and are held
        // back by no other row.
        add_column(&conn, "person", "TEXT")?;
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS events_connection ON events (connection, state, id);
             CREATE INDEX IF NOT EXISTS events_deferred ON events (connection, person, id)
                WHERE not_before IS NOT NULL AND state = 'pending';
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
             );",
        )?;
        Ok(Spool { conn: Mutex::new(conn) })
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
            for e in groups.into_iter().flatten() {
                insert.execute(params![e.connection, e.message_id, e.received_at, e.body, e.person])?;
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
        let conn = self.conn.lock().unwrap();
        let mut query = conn.prepare_cached(
            "SELECT id, body, not_before, received_at FROM events WHERE connection = ?1 AND state = 'pending' AND id > ?2
                 ORDER BY id LIMIT ?3",
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

    /// The connections with pending events ready to deliver.
    pub fn pending_connections(&self) -> anyhow::Result<Vec<String>> {
        let conn = self.conn.lock().unwrap();
        let mut query = conn.prepare_cached(
            "SELECT DISTINCT connection FROM events WHERE state = 'pending'
                 AND (not_before IS NULL OR not_before <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        )?;
        let rows = query.query_map([], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether a connection has any pending event, ready or waiting.
    pub fn has_pending(&self, connection: &str) -> anyhow::Result<bool> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE connection = ?1 AND state = 'pending')")?
            .query_row([connection], |r| r.get(0))?)
    }

    /// Each connection's pending events (through the state index: cheap
    /// enough for every `/metrics` scrape).
    pub fn pending_by_connection(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let conn = self.conn.lock().unwrap();
        let mut query =
            conn.prepare_cached("SELECT connection, count(*) FROM events WHERE state = 'pending' GROUP BY connection")?;
        let rows = query.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Each connection's events, by state.
    pub fn counts(&self) -> anyhow::Result<std::collections::BTreeMap<String, Counts>> {
        let conn = self.conn.lock().unwrap();
        let mut query =
            conn.prepare_cached("SELECT connection, state, count(*) FROM events GROUP BY connection, state")?;
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
    pub fn finish(&self, id: i64, state: State, outcome: &Value, plugin_version: &str) -> anyhow::Result<()> {
        self.finish_all(&[Finished {
            id,
            state,
            outcome: outcome.clone(),
            plugin_version: plugin_version.to_string(),
        }])
    }

    /// Records many outcomes in one transaction: at thousands of events a
    /// second, a transaction per outcome is what would bound delivery.
    pub fn finish_all<'a>(&self, finished: impl IntoIterator<Item = &'a Finished>) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        {
            let mut update = tx.prepare_cached(
                "UPDATE events SET state = ?2, outcome = ?3, plugin_version = ?4, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
            )?;
            for f in finished {
                update.execute(params![f.id, f.state.as_str(), f.outcome.to_string(), f.plugin_version])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn count(&self, state: State) -> anyhow::Result<u64> {
        let conn = self.conn.lock().unwrap();
        let n: i64 = conn.query_row("SELECT count(*) FROM events WHERE state = ?1", [state.as_str()], |r| {
            r.get(0)
        })?;
        Ok(n as u64)
    }

    /// Dead letters, oldest first, of one connection or of all.
    pub fn dead(&self, connection: Option<&str>, limit: usize) -> anyhow::Result<Vec<DeadRow>> {
        let conn = self.conn.lock().unwrap();
        let mut query = conn.prepare(
            "SELECT id, connection, message_id, received_at, plugin_version, outcome, body FROM events
                 WHERE state = 'dead' AND (?1 IS NULL OR connection = ?1) ORDER BY id LIMIT ?2",
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
        self.on_dead(
            connection,
            ids,
            "UPDATE events SET state = 'pending', outcome = NULL, not_before = NULL",
        )
    }

    /// Deletes dead letters (all, or those ids; of one connection or of
    /// all); returns how many.
    pub fn purge(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        self.on_dead(connection, ids, "DELETE FROM events")
    }

    fn on_dead(&self, connection: Option<&str>, ids: &[i64], statement: &str) -> anyhow::Result<usize> {
        let conn = self.conn.lock().unwrap();
        let filter = "WHERE state = 'dead' AND (?1 IS NULL OR connection = ?1)";
        if ids.is_empty() {
            return Ok(conn.execute(&format!("{statement} {filter}"), params![connection])?);
        }
        let mut one = conn.prepare(&format!("{statement} {filter} AND id = ?2"))?;
        let mut n = 0;
        for id in ids {
            n += one.execute(params![connection, id])?;
        }
        Ok(n)
    }

    /// Deletes delivered and skipped events older than `retention`.
    pub fn prune(&self, retention: Duration) -> anyhow::Result<usize> {
        let conn = self.conn.lock().unwrap();
        let cutoff = format!("-{} seconds", retention.as_secs());
        Ok(conn.execute(
            "DELETE FROM events WHERE state IN ('delivered', 'skipped') AND updated_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
            [cutoff],
        )?)
    }
}

/// Adds a column to `events` if a spool written by an older version lacks it.
fn add_column(conn: &Connection, name: &str, definition: &str) -> anyhow::Result<()> {
    let present: bool = conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('events') WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?;
    if !present {
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

    #[test]
    fn pruning_deletes_only_finished_events_older_than_the_retention() {
        let dir = std::env::temp_dir().join(format!("cdp-host-spool-prune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = Spool::open(&dir.join("spool.db"), Durability::ProcessCrash).unwrap();
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
            spool.finish(row.id, state, &outcome, "1.0.0").unwrap();
        }
        spool.finish(rows[4].id, State::Delivered, &outcome, "1.0.0").unwrap();
        // Two hours pass for the first four.
        spool
            .conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE events SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours'),
                                   received_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours')
                 WHERE message_id LIKE 'old-%'",
                [],
            )
            .unwrap();

        assert_eq!(spool.prune(Duration::from_secs(3600)).unwrap(), 2);
        let state_of = |id: &str| -> Option<String> {
            let conn = spool.conn.lock().unwrap();
            conn.query_row("SELECT state FROM events WHERE message_id = ?1", [id], |r| r.get(0))
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
        let dir = std::env::temp_dir().join(format!("cdp-host-spool-defer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = Spool::open(&dir.join("spool.db"), Durability::ProcessCrash).unwrap();
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
}
