//! What the benches share: Chord's sample events, how to name an event,
//! and the CPU time of the child processes a bench ran.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Chord's sample events (`../shared/chord/sample-events.ndjson` beside
/// the checkout, or `$CHORD_SAMPLES`), if they are there.
pub fn samples() -> Option<Vec<String>> {
    let path = std::env::var_os("CHORD_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/chord/sample-events.ndjson"));
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// `track` events by name, others by type.
pub fn name(event: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(event).unwrap();
    match value["event"].as_str() {
        Some(name) => name.to_string(),
        None => value["type"].as_str().unwrap_or("?").to_string(),
    }
}

/// User and system time of the waited-for children so far.
pub fn children_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}
