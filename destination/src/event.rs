//! Read-only access to a Chord (Jitsu/Segment-shaped) event: where each
//! field lives, and nothing about Klaviyo.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// One parsed Chord event: the fields the mapping reads, each kept as the
/// JSON it was sent as (so a field of the wrong type is reported, not a
/// parse failure of the whole event). Fields nobody reads (`library`,
/// `userAgent`, `page`...) are skipped while parsing, never built: building
/// and dropping them was a fifth of a small event's mapping. JSON `null` and
/// an absent field read the same.
pub struct ChordEvent<'a> {
    /// The event as received, for the content hash of an event without a
    /// `messageId`.
    text: &'a str,
    fields: Fields,
}

#[derive(Default)]
struct Fields {
    kind: Option<Value>,
    name: Option<Value>,
    message_id: Option<Value>,
    user_id: Option<Value>,
    anonymous_id: Option<Value>,
    timestamp: Option<Value>,
    properties: Option<Value>,
    traits: Option<Value>,
    request_ip: Option<Value>,
    context: Context,
}

/// The parts of `context` the mapping reads.
#[derive(Default)]
struct Context {
    traits: Option<Value>,
    locale: Option<Value>,
    timezone: Option<Value>,
    ip: Option<Value>,
    geo: Option<Value>,
    location: Option<Value>,
}

impl<'a> ChordEvent<'a> {
    /// Parses event JSON; the reason names what is wrong.
    pub fn parse(text: &'a str) -> Result<ChordEvent<'a>, String> {
        match serde_json::from_str::<ObjectOr<Fields>>(text) {
            Ok(ObjectOr::Object(fields)) => Ok(ChordEvent { text, fields }),
            Ok(ObjectOr::Other(kind)) => Err(format!("the event is a JSON {kind}, not an object")),
            Err(e) => Err(format!("the event is not valid JSON: {e}")),
        }
    }

    /// The whole event as a JSON tree (built on demand: only the content
    /// hash needs it).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.text).expect("parsed once already")
    }

    /// The call type, or why it cannot be read.
    pub fn kind(&self) -> Result<Kind, String> {
        match &self.fields.kind {
            None => Err("the event has no `type`".to_string()),
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
        self.fields.name.as_ref()
    }

    pub fn message_id(&self) -> Option<String> {
        id_text(self.fields.message_id.as_ref())
    }

    pub fn user_id(&self) -> Option<String> {
        id_text(self.fields.user_id.as_ref())
    }

    pub fn anonymous_id(&self) -> Option<String> {
        id_text(self.fields.anonymous_id.as_ref())
    }

    pub fn timestamp(&self) -> Option<&Value> {
        self.fields.timestamp.as_ref()
    }

    /// `requestIp`, the address Jitsu received the event from.
    pub fn request_ip(&self) -> Option<&Value> {
        self.fields.request_ip.as_ref()
    }

    pub fn properties(&self) -> Option<&Map<String, Value>> {
        self.fields.properties.as_ref().and_then(Value::as_object)
    }

    /// Top-level `traits` (identify and group calls).
    pub fn traits(&self) -> Option<&Map<String, Value>> {
        self.fields.traits.as_ref().and_then(Value::as_object)
    }

    /// `context.traits`: the identify traits Jitsu copies into later calls.
    pub fn context_traits(&self) -> Option<&Map<String, Value>> {
        self.context_value(&["traits"]).and_then(Value::as_object)
    }

    /// A value under `context` by path, e.g. `["geo", "country", "code"]`.
    /// Only the context fields the mapping reads are kept.
    pub fn context_value(&self, path: &[&str]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let context = &self.fields.context;
        let mut value = match *first {
            "traits" => context.traits.as_ref(),
            "locale" => context.locale.as_ref(),
            "timezone" => context.timezone.as_ref(),
            "ip" => context.ip.as_ref(),
            "geo" => context.geo.as_ref(),
            "location" => context.location.as_ref(),
            other => unreachable!("context.{other} is not kept; add it to event::Context"),
        }?;
        for key in rest {
            value = value.get(key)?;
        }
        Some(value)
    }
}

/// A JSON value that is either an object read into `T`, or something else,
/// of which only its kind is kept (for the error that names it).
enum ObjectOr<T> {
    Object(T),
    Other(&'static str),
}

/// Reads an object's members into a struct, skipping unread keys unbuilt.
trait ReadObject: Sized {
    fn read<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl<'de, T: ReadObject> Deserialize<'de> for ObjectOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectOrVisitor(std::marker::PhantomData))
    }
}

struct ObjectOrVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: ReadObject> Visitor<'de> for ObjectOrVisitor<T> {
    type Value = ObjectOr<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::read(map).map(ObjectOr::Object)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(ObjectOr::Other("array"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other("boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other("number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other("number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other("number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other("string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other("null"))
    }
}

/// The top-level keys the mapping reads; any other is skipped unbuilt.
#[derive(Deserialize)]
#[serde(field_identifier)]
enum TopKey {
    #[serde(rename = "type")]
    Kind,
    #[serde(rename = "event")]
    Name,
    #[serde(rename = "messageId")]
    MessageId,
    #[serde(rename = "userId")]
    UserId,
    #[serde(rename = "anonymousId")]
    AnonymousId,
    #[serde(rename = "timestamp")]
    Timestamp,
    #[serde(rename = "properties")]
    Properties,
    #[serde(rename = "traits")]
    Traits,
    #[serde(rename = "requestIp")]
    RequestIp,
    #[serde(rename = "context")]
    Context,
    #[serde(other)]
    Other,
}

/// A member's value; `null` reads as absent, as in a `serde_json::Value`
/// tree. A repeated key keeps its last value, as a tree does too.
fn value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Value>, A::Error> {
    Ok(Some(map.next_value::<Value>()?).filter(|v| !v.is_null()))
}

impl ReadObject for Fields {
    fn read<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<TopKey>()? {
            match key {
                TopKey::Kind => fields.kind = value(&mut map)?,
                TopKey::Name => fields.name = value(&mut map)?,
                TopKey::MessageId => fields.message_id = value(&mut map)?,
                TopKey::UserId => fields.user_id = value(&mut map)?,
                TopKey::AnonymousId => fields.anonymous_id = value(&mut map)?,
                TopKey::Timestamp => fields.timestamp = value(&mut map)?,
                TopKey::Properties => fields.properties = value(&mut map)?,
                TopKey::Traits => fields.traits = value(&mut map)?,
                TopKey::RequestIp => fields.request_ip = value(&mut map)?,
                TopKey::Context => {
                    fields.context = match map.next_value::<ObjectOr<Context>>()? {
                        ObjectOr::Object(context) => context,
                        ObjectOr::Other(_) => Context::default(),
                    }
                }
                TopKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ContextKey {
    Traits,
    Locale,
    Timezone,
    Ip,
    Geo,
    Location,
    #[serde(other)]
    Other,
}

impl ReadObject for Context {
    fn read<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut context = Context::default();
        while let Some(key) = map.next_key::<ContextKey>()? {
            match key {
                ContextKey::Traits => context.traits = value(&mut map)?,
                ContextKey::Locale => context.locale = value(&mut map)?,
                ContextKey::Timezone => context.timezone = value(&mut map)?,
                ContextKey::Ip => context.ip = value(&mut map)?,
                ContextKey::Geo => context.geo = value(&mut map)?,
                ContextKey::Location => context.location = value(&mut map)?,
                ContextKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(context)
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
