//! `cdp-host map`: the dry run. One NDJSON line out per line in, in input
//! order, showing each event's outcome and the requests that would be sent,
//! with secrets masked. With `--batch`, a batching plugin's batchable
//! requests are shown as the batches they would go in, as under a backlog
//! (one line per batch, after the events' lines).

use std::io::{BufRead, Write};

use plugin_runtime::batching::{next_batch, split_taken};
use plugin_runtime::{BatchItem, PluginSlot, Use};
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
    /// The row of `mapped`, the event whose text is `text`.
    pub fn new(mapped: MappedEvent, settings: &DestinationSettings, text: &str) -> MapRow {
        let checked = mapped.checked.clone().and_then(|span| text.get(span));
        let (outcome, reason, requests) = match mapped.outcome {
            MappedOutcome::Send(requests) => (
                "send",
                None,
                requests
                    .into_iter()
                    .map(|r| ShownRequest::from_owned_around(r, settings, checked))
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

impl MapRow {
    /// The row as `serde_json` writes it (a test holds the two to the same
    /// bytes), with request bodies copied out as they are instead of being
    /// checked as JSON again: a 200 KB body costs a copy.
    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(br#"{"line":"#)?;
        serde_json::to_writer(&mut *out, &self.line)?;
        out.write_all(br#","message_id":"#)?;
        serde_json::to_writer(&mut *out, &self.message_id)?;
        out.write_all(br#","type":"#)?;
        serde_json::to_writer(&mut *out, &self.kind)?;
        out.write_all(br#","outcome":"#)?;
        serde_json::to_writer(&mut *out, self.outcome)?;
        if let Some(reason) = &self.reason {
            out.write_all(br#","reason":"#)?;
            serde_json::to_writer(&mut *out, reason)?;
        }
        out.write_all(br#","requests":["#)?;
        for (index, request) in self.requests.iter().enumerate() {
            if index > 0 {
                out.write_all(b",")?;
            }
            request.write_json(out)?;
        }
        out.write_all(b"]")?;
        if !self.warnings.is_empty() {
            out.write_all(br#","warnings":"#)?;
            serde_json::to_writer(&mut *out, &self.warnings)?;
        }
        out.write_all(b"}")
    }
}

/// One batch, as `--batch` shows it.
#[derive(Serialize)]
pub struct BatchRow {
    pub batch: u64,
    pub class: String,
    /// The input lines whose requests it carries, in its order.
    pub lines: Vec<u64>,
    pub outcome: &'static str,
    pub requests: Vec<ShownRequest>,
}

/// Maps every line of `input` and writes one row per line to `output`.
pub fn run(
    mapper: &EventMapper,
    settings: &DestinationSettings,
    input: impl BufRead,
    output: impl Write,
) -> anyhow::Result<Summary> {
    run_with(mapper, settings, input, output, None)
}

/// The same, with each batchable request moved into the batches it would
/// go in: a line keeps its unbatchable requests, and each batch follows as
/// a row of its own.
pub fn run_batched(
    mapper: &EventMapper,
    settings: &DestinationSettings,
    slot: &PluginSlot,
    input: impl BufRead,
    output: impl Write,
) -> anyhow::Result<Summary> {
    run_with(mapper, settings, input, output, Some(slot))
}

fn run_with(
    mapper: &EventMapper,
    settings: &DestinationSettings,
    mut input: impl BufRead,
    mut output: impl Write,
    batching: Option<&PluginSlot>,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut line = Vec::new();
    let mut number = 0;
    let mut items: Vec<(u64, BatchItem)> = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let text = line_text(line.strip_suffix(b"\n").unwrap_or(&line));
        let mut mapped = mapper.map(EventId::Line(number), &text);
        summary.count(&mapped.outcome);
        if batching.is_some()
            && let MappedOutcome::Send(requests) = &mut mapped.outcome
        {
            let batch_items = std::mem::take(&mut mapped.batch_items);
            let mut kept = Vec::new();
            for (request, item) in std::mem::take(requests)
                .into_iter()
                .zip(batch_items.into_iter().chain(std::iter::repeat(None)))
            {
                match item {
                    Some(item) => items.push((number, item)),
                    None => kept.push(request),
                }
            }
            *requests = kept;
        }
        let row = MapRow::new(mapped, settings, &text);
        row.write_json(&mut output)?;
        output.write_all(b"\n")?;
    }
    if let Some(slot) = batching {
        write_batches(slot, settings, items, &mut output)?;
    }
    output.flush()?;
    Ok(summary)
}

/// Packs `items` per class, as delivery does under a backlog, and writes
/// each batch's assembled request.
fn write_batches(
    slot: &PluginSlot,
    settings: &DestinationSettings,
    mut items: Vec<(u64, BatchItem)>,
    mut output: impl Write,
) -> anyhow::Result<()> {
    let plugin = slot.current().plugin.clone();
    let mut instance = plugin.pool().checkout(&plugin, Use::Interpreting)?;
    let public = settings.public_json();
    let classes = instance.batch_classes(public)?;
    let mut number = 0;
    for class in classes {
        let (mut queue, rest): (Vec<_>, Vec<_>) = items.into_iter().partition(|(_, item)| item.class == class.name);
        items = rest;
        while !queue.is_empty() {
            let taken = next_batch(
                &class,
                queue.iter().map(|(_, i)| (i.item.len(), i.dedupe_key.as_deref(), true)),
            );
            if taken.is_empty() {
                anyhow::bail!(
                    "an item of batch class {} does not fit in a batch of its own",
                    class.name
                );
            }
            let (batch, left) = split_taken(queue, &taken);
            queue = left;
            let texts: Vec<String> = batch.iter().map(|(_, item)| item.item.clone()).collect();
            let request = instance
                .assemble(public, &class.name, &texts)?
                .map_err(|reason| anyhow::anyhow!("{plugin} could not assemble a {} batch: {reason}", class.name))?;
            number += 1;
            let row = BatchRow {
                batch: number,
                class: class.name.clone(),
                lines: batch.iter().map(|(line, _)| *line).collect(),
                outcome: "send",
                requests: vec![ShownRequest::from_owned(request, settings)],
            };
            serde_json::to_writer(&mut output, &row)?;
            output.write_all(b"\n")?;
        }
    }
    if let Some((line, item)) = items.first() {
        anyhow::bail!(
            "line {line}: a batch item of class {:?}, which the plugin does not declare",
            item.class
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::MapRow;
    use crate::shown::{ShownBody, ShownRequest};

    #[test]
    fn a_row_written_by_hand_is_the_row_serde_json_writes() {
        let request = |body: ShownBody| ShownRequest {
            method: "POST".into(),
            url: "https://a.klaviyo.com/api/events".into(),
            headers: [("authorization".to_string(), serde_json::json!("Klaviyo-API-Key ***"))]
                .into_iter()
                .collect(),
            body,
        };
        let rows = [
            MapRow {
                line: 7,
                message_id: Some("m\"1é".into()),
                kind: Some("track".into()),
                outcome: "send",
                reason: None,
                requests: vec![
                    request(ShownBody::Json(" {\"data\": {\"a\": [1, \"\\u00e9\"]}}\n".into())),
                    request(ShownBody::Text("not \"json\"\n".into())),
                    request(ShownBody::Text(String::new())),
                ],
                warnings: vec!["currency \"xx\" is not an ISO 4217 code".into()],
            },
            MapRow {
                line: 8,
                message_id: None,
                kind: None,
                outcome: "skip",
                reason: Some("no email or phone number".into()),
                requests: Vec::new(),
                warnings: Vec::new(),
            },
        ];
        for row in rows {
            let mut written = Vec::new();
            row.write_json(&mut written).unwrap();
            assert_eq!(
                String::from_utf8(written).unwrap(),
                serde_json::to_string(&row).unwrap()
            );
        }
    }
}
