//! One event through the plugin's `map-event`: the host reads the envelope
//! it needs (`messageId`, `type`), hands the event to whichever version the
//! slot holds, on an instance from that version's pool, and checks what
//! comes back. A plugin failure becomes that event's error, marked so that
//! delivery can map it again with a fresh instance before calling it
//! poison; the failed instance is dropped.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugin_runtime::{
    CallError, HttpRequest, Instance, Loaded, Mapping, Outcome, Plugin, PluginSlot, Use, now_unix_ms,
};
use serde::{Deserialize, Deserializer};
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
        match Envelope::read(id, text) {
            Ok(envelope) => {
                mapped.message_id = envelope.message_id;
                mapped.kind = envelope.kind;
            }
            Err(reason) => {
                mapped.outcome = MappedOutcome::Error(reason);
                return mapped;
            }
        }

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
            plugin.pool().give_back(plugin, Use::Mapping, instance);
        }
        result
    }
}

/// What the host reads of an event itself: the rest is the plugin's. Read
/// without building the event (every other field is skipped unparsed), so
/// a 200 KB event costs the host a scan, not a tree.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "messageId", default, deserialize_with = "message_id")]
    message_id: Option<String>,
    #[serde(rename = "type", default, deserialize_with = "kind")]
    kind: Option<String>,
}

impl Envelope {
    /// The envelope of an event object, or why the text is not one.
    fn read(id: EventId, text: &str) -> Result<Envelope, String> {
        if text.trim().is_empty() {
            return Err(format!("{id} is empty"));
        }
        // Only an object is an event (a derived struct would also read an
        // array, by position).
        let object = text.trim_start().starts_with('{');
        match serde_json::from_str::<Envelope>(text) {
            Ok(envelope) if object => Ok(envelope),
            // Not an object, or not JSON: say which, from the whole value.
            _ => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(_)) => Ok(Envelope {
                    message_id: None,
                    kind: None,
                }),
                Ok(other) => Err(format!("{id} is a JSON {}, not an event object", kind_of(&other))),
                Err(e) => Err(format!("{id} is not JSON: {e}")),
            },
        }
    }
}

/// `messageId` as text, whether sent as a string or a number.
fn message_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(id) => Some(id),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// `type` when it is a string.
fn kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(kind) => Some(kind),
        _ => None,
    })
}

/// An instance of `plugin`, waiting while every instance slot is in use:
/// a busy pool is not the plugin's fault, so the event waits for a slot
/// (back-pressure on the input) rather than counting as a failure.
fn take_waiting(plugin: &Arc<Plugin>) -> Result<Instance, CallError> {
    let mut wait = Duration::from_millis(1);
    let started = Instant::now();
    let mut warned = false;
    loop {
        match plugin.pool().take(plugin, Use::Mapping) {
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

/// An input line as text: as it is when it is UTF-8, which `from_utf8`
/// checks at full speed; otherwise with each invalid byte replaced (the
/// plugin then sees U+FFFD, and the event is still mapped).
pub fn line_text(bytes: &[u8]) -> Cow<'_, str> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
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
