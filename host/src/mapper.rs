//! One event through the plugin: the host reads the envelope it needs
//! (`messageId`, `type`), hands the event to the plugin's `map-event`, and
//! checks what comes back. A plugin failure becomes that event's error;
//! the failed instance is dropped and the next event gets a fresh one.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::plugin::{CallError, HttpRequest, Instance, Loaded, Outcome, Plugin, PluginSlot};
use crate::settings::DestinationSettings;

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
    /// 1-based input line.
    pub line: u64,
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

/// Maps events with one plugin instance at a time, from whichever version
/// the slot holds when each event starts.
pub struct EventMapper {
    slot: Arc<PluginSlot>,
    loaded: Arc<Loaded>,
    settings: DestinationSettings,
    instance: Option<Instance>,
    /// The replacement for a worn-out instance, being built and warmed on
    /// another thread while the worn-out one keeps serving.
    replacement: Option<JoinHandle<Option<Instance>>>,
}

impl EventMapper {
    pub fn new(plugin: Arc<Plugin>, settings: DestinationSettings) -> EventMapper {
        EventMapper::with_slot(PluginSlot::new(plugin), settings)
    }

    pub fn with_slot(slot: Arc<PluginSlot>, settings: DestinationSettings) -> EventMapper {
        EventMapper {
            loaded: slot.current(),
            slot,
            settings,
            instance: None,
            replacement: None,
        }
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.loaded.plugin
    }

    /// Follows a swap: the next event is mapped by the new version, on the
    /// instance its canary warmed.
    fn follow_slot(&mut self) {
        let current = self.slot.current();
        if !Arc::ptr_eq(&current, &self.loaded) {
            if let Some(old) = std::mem::replace(&mut self.instance, current.take_warm()) {
                crate::plugin::retire(old);
            }
            // A replacement being warmed is for the old version: it is
            // dropped on its own thread when done.
            self.replacement = None;
            self.loaded = current;
        }
    }

    /// Maps one input line (the text of one JSON event).
    pub fn map_line(&mut self, line: u64, text: &str) -> MappedEvent {
        self.follow_slot();
        let mut mapped = MappedEvent {
            plugin: self.loaded.plugin.clone(),
            line,
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
                mapped.outcome = MappedOutcome::Error(format!(
                    "line {line} is a JSON {}, not an event object",
                    kind_of(&other)
                ));
                return mapped;
            }
            Err(e) if text.trim().is_empty() => {
                let _ = e;
                mapped.outcome = MappedOutcome::Error(format!("line {line} is empty"));
                return mapped;
            }
            Err(e) => {
                mapped.outcome = MappedOutcome::Error(format!("line {line} is not JSON: {e}"));
                return mapped;
            }
        };
        mapped.message_id = match envelope.get("messageId") {
            Some(Value::String(id)) => Some(id.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        mapped.kind = envelope.get("type").and_then(Value::as_str).map(str::to_string);

        crate::plugin::count_mapped(&self.loaded);
        match self.call(text) {
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
                    Some(id) => format!("event {id} (line {line})"),
                    None => format!("the event on line {line}"),
                };
                mapped.outcome = MappedOutcome::Error(format!("{} {err} while mapping {event}", self.loaded.plugin));
                mapped.plugin_failed = true;
            }
        }
        mapped
    }

    fn call(&mut self, event: &str) -> Result<crate::plugin::Mapping, CallError> {
        self.renew_worn_out();
        let mut instance = match self.instance.take() {
            Some(instance) => instance,
            None => self.loaded.plugin.instance()?,
        };
        let result = instance
            .map_event(self.settings.public_json(), event, now_unix_ms())
            .and_then(|mapping| Ok(self.loaded.plugin.check_mapping(&mapping).map(|()| mapping)?));
        // Only an instance whose call succeeded is kept. A failed one is
        // dropped here, not on the retire thread: failures can come one per
        // event (a plugin that traps on everything), and each must free its
        // pool slot before the next fresh instance takes one.
        if result.is_ok() {
            self.instance = Some(instance);
        }
        result
    }

    /// Replaces an instance that has served its share of calls without
    /// stalling the events: a fresh instance pays the plugin's lazy setup
    /// on its first events (measured: up to 25 ms for the Klaviyo plugin),
    /// so the replacement is built and warmed on the golden events on
    /// another thread while the worn-out one keeps serving, then swapped in.
    fn renew_worn_out(&mut self) {
        if !self.instance.as_ref().is_some_and(Instance::worn_out) {
            return;
        }
        match &self.replacement {
            None => {
                let (plugin, settings) = (self.loaded.plugin.clone(), self.settings.clone());
                let warming = std::thread::Builder::new()
                    .name("plugin-warm".into())
                    .spawn(move || crate::plugin::warmed_instance(&plugin, &settings, crate::EXAMPLE_EVENTS).ok());
                match warming {
                    Ok(handle) => self.replacement = Some(handle),
                    // No thread to warm on: replace it here and now.
                    Err(_) => self.instance.take().into_iter().for_each(crate::plugin::retire),
                }
            }
            Some(handle) if handle.is_finished() => {
                let fresh = self.replacement.take().and_then(|h| h.join().ok()).flatten();
                // If warming failed, the next call starts a fresh instance.
                if let Some(old) = std::mem::replace(&mut self.instance, fresh) {
                    crate::plugin::retire(old);
                }
            }
            Some(_) => {}
        }
    }
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// "array", "string", ...: what kind of JSON value was sent.
pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
