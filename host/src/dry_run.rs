//! `cdp-host map`: the dry run. One NDJSON line out per line in, in input
//! order, showing each event's outcome and the requests that would be sent,
//! with secrets masked.

use std::io::{BufRead, Write};

use serde::Serialize;

use crate::mapping::{EventId, EventMapper, MappedEvent, MappedOutcome, line_text};
use crate::settings::DestinationSettings;
use crate::shown::ShownRequest;

/// One output line.
#[derive(Serialize)]
pub struct MapRow {
    pub line: u64,
    pub message_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub requests: Vec<ShownRequest>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl MapRow {
    pub fn new(mapped: MappedEvent, settings: &DestinationSettings) -> MapRow {
        let (outcome, reason, requests) = match mapped.outcome {
            MappedOutcome::Send(requests) => (
                "send",
                None,
                requests
                    .into_iter()
                    .map(|r| ShownRequest::from_owned(r, settings))
                    .collect(),
            ),
            MappedOutcome::Skip(reason) => ("skip", Some(reason), Vec::new()),
            MappedOutcome::Error(reason) => ("error", Some(reason), Vec::new()),
        };
        MapRow {
            line: mapped.id.number() as u64,
            message_id: mapped.message_id,
            kind: mapped.kind,
            outcome,
            reason: reason.map(|r| settings.scrub(&r)),
            requests,
            warnings: mapped.warnings.iter().map(|w| settings.scrub(w)).collect(),
        }
    }
}

/// Maps every line of `input` and writes one row per line to `output`.
pub fn run(
    mapper: &EventMapper,
    settings: &DestinationSettings,
    mut input: impl BufRead,
    mut output: impl Write,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let text = line_text(line.strip_suffix(b"\n").unwrap_or(&line));
        let mapped = mapper.map(EventId::Line(number), &text);
        summary.count(&mapped.outcome);
        let row = MapRow::new(mapped, settings);
        serde_json::to_writer(&mut output, &row)?;
        output.write_all(b"\n")?;
    }
    output.flush()?;
    Ok(summary)
}

/// Counts of outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub send: u64,
    pub skip: u64,
    pub error: u64,
}

impl Summary {
    fn count(&mut self, outcome: &MappedOutcome) {
        match outcome {
            MappedOutcome::Send(_) => self.send += 1,
            MappedOutcome::Skip(_) => self.skip += 1,
            MappedOutcome::Error(_) => self.error += 1,
        }
    }
}
