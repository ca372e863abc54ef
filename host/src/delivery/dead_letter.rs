//! Dead letters: events that could not be delivered, written as NDJSON
//! with everything needed to understand and replay them: the event as
//! received, the request (key masked), Klaviyo's answer and the reason.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde_json::{Value, json};

use crate::dry_run::ShownRequest;
use crate::plugin::HttpResponse;

pub struct DeadLetters {
    sink: Sink,
}

enum Sink {
    File { path: PathBuf, out: Mutex<BufWriter<File>> },
    Memory(Mutex<Vec<Value>>),
}

impl DeadLetters {
    /// Appends to `path` (an earlier run's dead letters are kept).
    pub fn to_file(path: &Path) -> anyhow::Result<DeadLetters> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening dead-letter file {}", path.display()))?;
        Ok(DeadLetters {
            sink: Sink::File {
                path: path.to_path_buf(),
                out: Mutex::new(BufWriter::new(file)),
            },
        })
    }

    /// Kept in memory (for the demo and tests), read back with `entries`.
    pub fn in_memory() -> DeadLetters {
        DeadLetters {
            sink: Sink::Memory(Mutex::new(Vec::new())),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match &self.sink {
            Sink::File { path, .. } => Some(path),
            Sink::Memory(_) => None,
        }
    }

    pub fn entries(&self) -> Vec<Value> {
        match &self.sink {
            Sink::File { .. } => Vec::new(),
            Sink::Memory(entries) => entries.lock().unwrap().clone(),
        }
    }

    pub fn write(
        &self,
        line: u64,
        message_id: Option<&str>,
        raw: &str,
        request: Option<&ShownRequest>,
        response: Option<&HttpResponse>,
        reason: &str,
    ) {
        let entry = json!({
            "line": line,
            "message_id": message_id,
            "reason": reason,
            "event": serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string())),
            "request": request,
            "response": response.map(super::response_json),
            "at": chrono::Utc::now().to_rfc3339(),
        });
        match &self.sink {
            Sink::File { out, path } => {
                let mut out = out.lock().unwrap();
                let written = serde_json::to_writer(&mut *out, &entry)
                    .map_err(std::io::Error::from)
                    .and_then(|_| out.write_all(b"\n"));
                if let Err(e) = written {
                    tracing::error!("could not write a dead letter to {}: {e}", path.display());
                }
            }
            Sink::Memory(entries) => entries.lock().unwrap().push(entry),
        }
    }

    /// Removes and returns the in-memory dead letter of `line`.
    pub fn take(&self, line: u64) -> Option<Value> {
        match &self.sink {
            Sink::File { .. } => None,
            Sink::Memory(entries) => {
                let mut entries = entries.lock().unwrap();
                let index = entries.iter().position(|e| e["line"] == line)?;
                Some(entries.swap_remove(index))
            }
        }
    }

    pub fn flush(&self) -> std::io::Result<()> {
        match &self.sink {
            Sink::File { out, .. } => out.lock().unwrap().flush(),
            Sink::Memory(_) => Ok(()),
        }
    }
}
