//! What delivery hands back, as data: each event's record, with a dead
//! letter as a value (cause, the request with the key masked, the answer),
//! and the run's totals. Where a dead letter is kept is the caller's
//! business: `send` appends it to a file, `serve` writes it to the spool.

use std::collections::BTreeMap;
use std::time::Duration;

use plugin_runtime::HttpResponse;
use serde_json::{Value, json};

use crate::mapping::EventId;
use crate::shown::ShownRequest;

/// What became of one event.
#[derive(Debug, Clone)]
pub enum EventOutcome {
    Delivered {
        requests: usize,
    },
    Skipped(String),
    DeadLettered(DeadLetter),
    /// Not finished: this host may no longer send it (a stream worker
    /// whose lease on the event's partition it cannot prove it still
    /// holds), so it was dropped unsent, to be delivered by the partition's
    /// holder. Only a `Fence` yields it.
    Abandoned(String),
}

/// Why an event could not be delivered, with what an operator needs to
/// understand and replay it. Secrets are masked in all of it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    /// The event as received.
    pub event: String,
    /// The request that failed; none when the event could not be mapped.
    pub request: Option<ShownRequest>,
    /// The destination's last answer, if there was one.
    pub response: Option<HttpResponse>,
}

impl DeadLetter {
    /// The request as JSON, for dead-letter files and the spool.
    pub fn request_json(&self) -> Value {
        serde_json::to_value(&self.request).unwrap_or(Value::Null)
    }

    /// The answer as JSON (`status`, and the body as JSON when it is JSON).
    pub fn response_json(&self) -> Value {
        match &self.response {
            None => Value::Null,
            Some(response) => {
                let body = serde_json::from_str::<Value>(&response.body)
                    .unwrap_or_else(|_| Value::String(response.body.clone()));
                json!({ "status": response.status, "body": body })
            }
        }
    }
}

/// One event's result, as reported to an observer.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub id: EventId,
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub outcome: EventOutcome,
    pub warnings: Vec<String>,
    pub retries: u64,
    /// `name@version` of the plugin that mapped the event.
    pub plugin_version: String,
    /// What its delivery looked like, when the delivery keeps traces
    /// (`DeliveryConfig::trace`): for an operator's view of recent events.
    pub trace: Option<std::sync::Arc<Trace>>,
}

/// An event's delivery as an operator may see it: the event, each request
/// the plugin made (its key masked) with the answer to it, and how long
/// the sending took. Secrets are masked in all of it.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The event as received.
    pub event: String,
    /// Whom it is about, by the host's person key (`u"…"` a userId,
    /// `a"…"` an anonymousId, `e"…"` an email); none if it names nobody.
    pub person: Option<String>,
    pub requests: Vec<TracedRequest>,
    /// From the first request leaving to the last answer judged, retries
    /// and waits included; zero when nothing was sent.
    pub sending: Duration,
}

/// One request of a trace, and the destination's answer to it.
#[derive(Debug, Clone)]
pub struct TracedRequest {
    /// As the plugin made it, shared with delivery (not copied): its
    /// headers name secrets, never hold them; show it with `shown`.
    pub request: std::sync::Arc<plugin_runtime::HttpRequest>,
    /// The answer the request settled on; none when it went in a bulk
    /// request (whose answer covers many events) or never got one.
    pub response: Option<HttpResponse>,
    /// It went in a bulk request with other events.
    pub batched: bool,
}

/// The totals of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub read: u64,
    pub delivered: u64,
    pub skipped: BTreeMap<String, u64>,
    pub dead_lettered: u64,
    /// Dropped unsent by the fence, not finished (see `EventOutcome`).
    pub abandoned: u64,
    /// HTTP attempts beyond the first, over all requests.
    pub retries: u64,
    pub requests_sent: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    pub fn events_per_second(&self) -> f64 {
        self.read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Counts one finished event.
    pub(crate) fn count(&mut self, record: &EventRecord) {
        self.retries += record.retries;
        match &record.outcome {
            EventOutcome::Delivered { .. } => self.delivered += 1,
            EventOutcome::Skipped(reason) => *self.skipped.entry(reason.clone()).or_default() += 1,
            EventOutcome::DeadLettered(_) => self.dead_lettered += 1,
            EventOutcome::Abandoned(_) => self.abandoned += 1,
        }
    }

    /// The human summary printed at the end of `send`.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{} events read: {} delivered, {} skipped, {} dead-lettered; {} requests sent, {} retried; {:.2}s, {:.0} events/s",
            self.read,
            self.delivered,
            self.skipped_total(),
            self.dead_lettered,
            self.requests_sent,
            self.retries,
            self.elapsed.as_secs_f64(),
            self.events_per_second()
        );
        for (reason, count) in &self.skipped {
            text.push_str(&format!("\n  skipped {count}: {reason}"));
        }
        text
    }
}

impl TracedRequest {
    /// The request as a person may see it: secrets masked.
    pub fn shown(&self) -> ShownRequest {
        ShownRequest::redacted(&self.request)
    }
}
