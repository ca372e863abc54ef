//! One event through the plugin's `map-event`: the host reads the envelope
//! it needs (`messageId`, `type`), hands the event to whichever version the
//! slot holds, on an instance from that version's pool, and checks what
//! comes back. A plugin failure becomes that event's error, marked so that
//! delivery can map it again with a fresh instance before calling it
//! poison; the failed instance is dropped.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugin_runtime::{CallError, HttpRequest, Instance, Loaded, Mapping, Outcome, Plugin, PluginSlot, now_unix_ms};
use serde_json::Value;

use crate::settings::DestinationSettings;

/// Which event this is, as the operator finds it again: a line of `send`'s
/// or `map`'s input, or a row of `serve`'s spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventId {
    Line(u64),
    SpoolRow(i64),
}

impl EventId {
    /// The number alone (line or row id).
    pub fn number(self) -> i64 {
        match self {
            EventId::Line(line) => line as i64,
            EventId::SpoolRow(row) => row,
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventId::Line(line) => write!(f, "line {line}"),
            EventId::SpoolRow(row) => write!(f, "spool row {row}"),
        }
    }
}

/// What became of one event.
#[derive(Clone, Debug)]
pub enum MappedOutcome {
    Send(Vec<HttpRequest>),
    Skip(String),
    Error(String),
}

/// One event, mapped.
#[derive(Clone, Debug)]
pub struct MappedEvent {
    pub id: EventId,
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub outcome: MappedOutcome,
    pub warnings: Vec<String>,
    pub ordering_key: Option<String>,
    /// The plugin call itself failed (trap, deadline, bad output), as
    /// opposed to the plugin judging the event unmappable.
    pub plugin_failed: bool,
    /// The version that mapped it; its requests are judged by it too.
    pub plugin: Arc<Plugin>,
}

/// Maps events through whichever version the slot holds when each starts.
pub struct EventMapper {
    slot: Arc<PluginSlot>,
    settings: DestinationSettings,
}

impl EventMapper {
    pub fn new(slot: Arc<PluginSlot>, settings: DestinationSettings) -> EventMapper {
        EventMapper { slot, settings }
    }

    /// Maps the text of one JSON event.
    pub fn map(&self, id: EventId, text: &str) -> MappedEvent {
        let loaded = self.slot.current();
        let mut mapped = MappedEvent {
            plugin: loaded.plugin.clone(),
            id,
            message_id: None,
            kind: None,
            outcome: MappedOutcome::Error(String::new()),
            warnings: Vec::new(),
            ordering_key: None,
            plugin_failed: false,
        };
        let envelope = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                mapped.outcome =
                    MappedOutcome::Error(format!("{id} is a JSON {}, not an event object", kind_of(&other)));
                return mapped;
            }
            Err(_) if text.trim().is_empty() => {
                mapped.outcome = MappedOutcome::Error(format!("{id} is empty"));
                return mapped;
            }
            Err(e) => {
                mapped.outcome = MappedOutcome::Error(format!("{id} is not JSON: {e}"));
                return mapped;
            }
        };
        mapped.message_id = match envelope.get("messageId") {
            Some(Value::String(id)) => Some(id.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        mapped.kind = envelope.get("type").and_then(Value::as_str).map(str::to_string);

        loaded.count_mapped();
        match self.call(&loaded, text) {
            Ok(mapping) => {
                mapped.warnings = mapping.warnings;
                mapped.ordering_key = mapping.ordering_key;
                mapped.outcome = match mapping.outcome {
                    Outcome::Send(requests) => MappedOutcome::Send(requests),
                    Outcome::Skip(reason) => MappedOutcome::Skip(reason),
                    Outcome::Error(reason) => MappedOutcome::Error(reason),
                };
            }
            Err(err) => {
                let event = match &mapped.message_id {
                    Some(message_id) => format!("event {message_id} ({id})"),
                    None => format!("the event on {id}"),
                };
                mapped.outcome = MappedOutcome::Error(format!("{} {err} while mapping {event}", loaded.plugin));
                mapped.plugin_failed = true;
            }
        }
        mapped
    }

    fn call(&self, loaded: &Loaded, event: &str) -> Result<Mapping, CallError> {
        let plugin = &loaded.plugin;
        let mut instance = take_waiting(plugin)?;
        let result = instance
            .map_event(self.settings.public_json(), event, now_unix_ms())
            .and_then(|mapping| Ok(plugin.check_mapping(&mapping).map(|()| mapping)?));
        // Only an instance whose call succeeded goes back. A failed one is
        // dropped here, not on the retire thread: failures can come one per
        // event (a plugin that traps on everything), and each must free its
        // pool slot before the next fresh instance takes one.
        if result.is_ok() {
            plugin.pool().give_back(plugin, instance);
        }
        result
    }
}

/// An instance of `plugin`, waiting while every instance slot is in use:
/// a busy pool is not the plugin's fault, so the event waits for a slot
/// (back-pressure on the input) rather than counting as a failure.
fn take_waiting(plugin: &Arc<Plugin>) -> Result<Instance, CallError> {
    let mut wait = Duration::from_millis(1);
    let started = Instant::now();
    let mut warned = false;
    loop {
        match plugin.pool().take(plugin) {
            Err(CallError::Busy(slots)) => {
                if !warned && started.elapsed() > Duration::from_secs(1) {
                    tracing::warn!(%plugin, "all {slots} plugin instance slots are in use; mapping waits for one");
                    warned = true;
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// "array", "string", ...: what kind of JSON value was sent.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
