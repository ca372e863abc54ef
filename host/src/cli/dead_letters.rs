//! `send`'s dead-letter file: NDJSON, one letter per line, appended to (an
//! earlier run's letters are kept). The file is created only when there is
//! a first letter to write, so a clean run leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use cdp_host::delivery::{EventOutcome, EventRecord};
use serde_json::{Value, json};

pub struct DeadLetterFile {
    path: PathBuf,
    out: Mutex<Option<BufWriter<File>>>,
    /// The first error, reported when the run finishes.
    error: Mutex<Option<anyhow::Error>>,
}

impl DeadLetterFile {
    pub fn new(path: &Path) -> DeadLetterFile {
        DeadLetterFile {
            path: path.to_path_buf(),
            out: Mutex::new(None),
            error: Mutex::new(None),
        }
    }

    /// Appends the record's dead letter, if it has one.
    pub fn write(&self, record: &EventRecord) {
        let EventOutcome::DeadLettered(letter) = &record.outcome else {
            return;
        };
        let entry = json!({
            "line": record.id.number(),
            "message_id": record.message_id,
            "reason": letter.reason,
            "event": serde_json::from_str::<Value>(&letter.event).unwrap_or_else(|_| Value::String(letter.event.clone())),
            "request": letter.request_json(),
            "response": letter.response_json(),
            "at": chrono::Utc::now().to_rfc3339(),
        });
        if let Err(e) = self.append(&entry) {
            self.error.lock().unwrap().get_or_insert(e);
        }
    }

    fn append(&self, entry: &Value) -> anyhow::Result<()> {
        let mut out = self.out.lock().unwrap();
        if out.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .with_context(|| format!("opening dead-letter file {}", self.path.display()))?;
            *out = Some(BufWriter::new(file));
        }
        let out = out.as_mut().expect("opened above");
        serde_json::to_writer(&mut *out, entry)?;
        out.write_all(b"\n")
            .with_context(|| format!("writing dead-letter file {}", self.path.display()))
    }

    /// Flushes what was written; the first write error, if any.
    pub fn finish(&self) -> anyhow::Result<()> {
        if let Some(e) = self.error.lock().unwrap().take() {
            return Err(e);
        }
        if let Some(out) = self.out.lock().unwrap().as_mut() {
            out.flush()
                .with_context(|| format!("writing dead-letter file {}", self.path.display()))?;
        }
        Ok(())
    }
}
