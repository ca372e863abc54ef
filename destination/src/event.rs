//! Read-only access to a Chord (Jitsu/Segment-shaped) event: where each
//! field lives, and nothing about Klaviyo.

use serde_json::{Map, Value};

/// The Segment/Jitsu call types Chord sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

/// One parsed Chord event.
pub struct ChordEvent {
    root: Map<String, Value>,
}

impl ChordEvent {
    /// Parses event JSON; the reason names what is wrong.
    pub fn parse(text: &str) -> Result<ChordEvent, String> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(root)) => Ok(ChordEvent { root }),
            Ok(other) => Err(format!("the event is a JSON {}, not an object", json_kind(&other))),
            Err(e) => Err(format!("the event is not valid JSON: {e}")),
        }
    }

    pub fn root(&self) -> &Map<String, Value> {
        &self.root
    }

    /// The call type, or why it cannot be read.
    pub fn kind(&self) -> Result<Kind, String> {
        match self.root.get("type") {
            None | Some(Value::Null) => Err("the event has no `type`".to_string()),
            Some(Value::String(kind)) => match kind.as_str() {
                "track" => Ok(Kind::Track),
                "identify" => Ok(Kind::Identify),
                "page" => Ok(Kind::Page),
                "screen" => Ok(Kind::Screen),
                "group" => Ok(Kind::Group),
                "alias" => Ok(Kind::Alias),
                other => Err(format!(
                    "`type` {other:?} is not a Chord event type (track, identify, page, screen, group, alias)"
                )),
            },
            Some(other) => Err(format!("`type` is a JSON {}, not a string", json_kind(other))),
        }
    }

    /// `event`, the name of a track call, exactly as sent.
    pub fn name(&self) -> Option<&Value> {
        self.root.get("event")
    }

    pub fn message_id(&self) -> Option<String> {
        id_text(self.root.get("messageId"))
    }

    pub fn user_id(&self) -> Option<String> {
        id_text(self.root.get("userId"))
    }

    pub fn anonymous_id(&self) -> Option<String> {
        id_text(self.root.get("anonymousId"))
    }

    pub fn timestamp(&self) -> Option<&Value> {
        self.root.get("timestamp").filter(|v| !v.is_null())
    }

    pub fn properties(&self) -> Option<&Map<String, Value>> {
        self.root.get("properties").and_then(Value::as_object)
    }

    /// Top-level `traits` (identify and group calls).
    pub fn traits(&self) -> Option<&Map<String, Value>> {
        self.root.get("traits").and_then(Value::as_object)
    }

    /// `context.traits`: the identify traits Jitsu copies into later calls.
    pub fn context_traits(&self) -> Option<&Map<String, Value>> {
        self.context_value(&["traits"]).and_then(Value::as_object)
    }

    /// A value under `context` by path, e.g. `["geo", "country", "code"]`.
    pub fn context_value(&self, path: &[&str]) -> Option<&Value> {
        let mut value = self.root.get("context")?;
        for key in path {
            value = value.get(key)?;
        }
        Some(value)
    }
}

/// An identifier as text: strings as they are (if not blank), numbers
/// printed; anything else is no identifier.
pub fn id_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
