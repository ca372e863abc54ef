//! Read-only looks into a `serve` spool file, for tests and benchmarks:
//! what they check is the database a user's `serve` wrote, read with
//! SQLite directly rather than through the host's own API.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// Where each event's state is read: the `event_states` view of the
/// spool's format 2, or the rows of format 1 (so that a benchmark can
/// drive a build from before format 2 too).
fn states(conn: &Connection) -> &'static str {
    let view: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'view' AND name = 'event_states'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if view { "event_states" } else { "events" }
}

fn open(path: &Path) -> Connection {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening the spool {}: {e}", path.display()));
    conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    conn
}

/// The state of the newest event with this message id.
pub fn state_of(path: &Path, message_id: &str) -> Option<String> {
    let conn = open(path);
    conn.query_row(
        &format!(
            "SELECT state FROM {t} WHERE message_id = ?1 ORDER BY id DESC LIMIT 1",
            t = states(&conn)
        ),
        [message_id],
        |r| r.get(0),
    )
    .optional()
    .unwrap()
}

/// message id -> (state, plugin version).
pub fn versions_by_message_id(path: &Path) -> HashMap<String, (String, String)> {
    let conn = open(path);
    let mut query = conn
        .prepare(&format!(
            "SELECT message_id, state, coalesce(plugin_version, '') FROM {t} WHERE message_id IS NOT NULL",
            t = states(&conn)
        ))
        .unwrap();
    let rows = query
        .query_map([], |row| Ok((row.get::<_, String>(0)?, (row.get(1)?, row.get(2)?))))
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// Events not yet finished (read from the pending table where there is
/// one: benchmarks ask this many times a second, and counting through
/// the view would load the machine they measure).
pub fn pending(path: &Path) -> u64 {
    let conn = open(path);
    let query = match states(&conn) {
        "events" => "SELECT count(*) FROM events WHERE state = 'pending'",
        _ => "SELECT count(*) FROM pending",
    };
    conn.query_row(query, [], |r| r.get::<_, i64>(0)).unwrap() as u64
}

/// The same, leaving out events whose message id starts with `prefix`.
pub fn latencies_ms_except(path: &Path, prefix: &str) -> Vec<f64> {
    let conn = open(path);
    let mut query = conn
        .prepare(&format!(
            "SELECT (julianday(updated_at) - julianday(received_at)) * 86400000.0 FROM {t}
             WHERE updated_at IS NOT NULL AND substr(coalesce(message_id, ''), 1, length(?1)) <> ?1",
            t = states(&conn)
        ))
        .unwrap();
    query
        .query_map([prefix], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// When each delivered event's outcome was recorded, in seconds (Julian
/// day based, so only differences mean anything), in order.
pub fn delivered_at_seconds(path: &Path) -> Vec<f64> {
    let conn = open(path);
    let mut query = conn
        .prepare(&format!(
            "SELECT julianday(updated_at) * 86400.0 FROM {t} WHERE state = 'delivered' ORDER BY 1",
            t = states(&conn)
        ))
        .unwrap();
    query
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// For each finished event, milliseconds from ingest (`received_at`) to
/// its outcome being recorded.
pub fn latencies_ms(path: &Path) -> Vec<f64> {
    let conn = open(path);
    let mut query = conn
        .prepare(
            &format!("SELECT (julianday(updated_at) - julianday(received_at)) * 86400000.0 FROM {t} WHERE updated_at IS NOT NULL", t = states(&conn)),
        )
        .unwrap();
    let rows = query.query_map([], |row| row.get::<_, f64>(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// Every event's stored text.
pub fn bodies(path: &Path) -> Vec<String> {
    let conn = open(path);
    let mut query = conn.prepare("SELECT body FROM events ORDER BY id").unwrap();
    let rows = query.query_map([], |row| row.get::<_, String>(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// Ingest-to-outcome latencies (ms) of one connection's events, leaving
/// out those whose message id starts with `except`.
pub fn latencies_ms_of(path: &Path, connection: &str, except: &str) -> Vec<f64> {
    let conn = open(path);
    let mut query = conn
        .prepare(&format!(
            "SELECT (julianday(updated_at) - julianday(received_at)) * 86400000.0 FROM {t}
             WHERE updated_at IS NOT NULL AND connection = ?1
               AND substr(coalesce(message_id, ''), 1, length(?2)) <> ?2",
            t = states(&conn)
        ))
        .unwrap();
    query
        .query_map([connection, except], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// One connection's events not yet finished.
pub fn pending_of(path: &Path, connection: &str) -> u64 {
    let conn = open(path);
    let query = match states(&conn) {
        "events" => "SELECT count(*) FROM events WHERE state = 'pending' AND connection = ?1",
        _ => "SELECT count(*) FROM pending WHERE connection = ?1",
    };
    conn.query_row(query, [connection], |r| r.get::<_, i64>(0)).unwrap() as u64
}

/// The first and last moment an outcome was recorded, in seconds
/// (Julian-day based), and how many events have one.
pub fn finished_span_seconds(path: &Path) -> (f64, f64, u64) {
    let conn = open(path);
    conn.query_row(
            &format!("SELECT coalesce(min(julianday(updated_at)), 0) * 86400.0, coalesce(max(julianday(updated_at)), 0) * 86400.0, count(*)
             FROM {t} WHERE updated_at IS NOT NULL", t = states(&conn)),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)),
        )
        .unwrap()
}

/// How many pending events carry a not-before time (a Retry-After kept).
pub fn deferred(path: &Path) -> usize {
    let conn = open(path);
    conn.query_row(
        &format!(
            "SELECT count(*) FROM {t} WHERE state = 'pending' AND not_before IS NOT NULL",
            t = states(&conn)
        ),
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as usize
}
