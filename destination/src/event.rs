//! Read-only access to a Chord (Jitsu/Segment-shaped) event: where each
//! field lives, and nothing about Klaviyo.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use json_scan::{Scanner, Shape};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
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
///
/// `properties`, often most of an event's bytes and nearly always passed on
/// as they are, is kept as the text it was sent as, with each top-level
/// member's text and shape found in the same pass that reads the event
/// (`json_scan`); it is built as a tree only when something needs the whole
/// of it.
pub struct ChordEvent<'a> {
    /// The event as received, for the content hash of an event without a
    /// `messageId`.
    text: &'a str,
    fields: Fields<'a>,
    /// `properties` as a tree, built on first use.
    properties: OnceCell<Option<Value>>,
    /// `properties`' top-level members: found while the event is read, or
    /// on first use when serde_json read it.
    members: OnceCell<Members<'a>>,
}

/// One top-level member of `properties`, as sent.
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    pub text: &'a str,
    /// What the value holds at most, for Klaviyo's limits.
    pub shape: Shape,
}

/// `properties`' members, or why serde_json would not read them.
pub struct Members<'a> {
    pub members: Vec<Member<'a>>,
    /// serde_json's words when the text holds something it will not read (a
    /// lone UTF-16 surrogate in an escape, a number out of range), which
    /// only reading finds.
    pub unreadable: Option<String>,
}

#[derive(Default)]
struct Fields<'a> {
    kind: Option<Value>,
    name: Option<Value>,
    message_id: Option<Value>,
    user_id: Option<Value>,
    anonymous_id: Option<Value>,
    timestamp: Option<Value>,
    /// Only when it is an object.
    properties: Option<&'a str>,
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
        if let Some(event) = Self::scan(text) {
            return Ok(event);
        }
        // What the scan leaves to serde_json: text that is not an event
        // object, that is not JSON (serde_json's words say where), or that
        // holds what only serde_json decides (see `scan`).
        match serde_json::from_str::<ObjectOr<Fields>>(text) {
            Ok(ObjectOr::Object(fields)) => Ok(ChordEvent {
                text,
                fields,
                properties: OnceCell::new(),
                members: OnceCell::new(),
            }),
            Ok(ObjectOr::Other(kind)) => Err(format!("the event is a JSON {kind}, not an object")),
            Err(e) => Err(format!("the event is not valid JSON: {e}")),
        }
    }

    /// The event read in one pass: the fields the mapping reads parsed from
    /// their own text, `properties`' members found and measured, the rest
    /// skipped. `None` when serde_json must decide: the text is not an
    /// object or not JSON, or it holds a lone surrogate or a number out of
    /// range anywhere (serde_json refuses some of those and not others,
    /// depending on where they are), or it nests 128 deep.
    fn scan(text: &'a str) -> Option<ChordEvent<'a>> {
        let mut scanner = Scanner::new(text).strict(true);
        let mut fields = Fields::default();
        let mut members = None;
        scanner
            .object(|key, scanner| {
                match &*key {
                    "type" => fields.kind = read(scanner)?,
                    "event" => fields.name = read(scanner)?,
                    "messageId" => fields.message_id = read(scanner)?,
                    "userId" => fields.user_id = read(scanner)?,
                    "anonymousId" => fields.anonymous_id = read(scanner)?,
                    "timestamp" => fields.timestamp = read(scanner)?,
                    "traits" => fields.traits = read(scanner)?,
                    "requestIp" => fields.request_ip = read(scanner)?,
                    "properties" if scanner.peek() == Some(b'{') => {
                        let start = scanner.offset();
                        members = Some(scan_members(scanner)?);
                        fields.properties = Some(scanner.since(start));
                    }
                    "properties" => {
                        scanner.value()?;
                        members = None;
                        fields.properties = None;
                    }
                    "context" => fields.context = read_context(scanner)?,
                    _ => {
                        scanner.value()?;
                    }
                }
                Ok(())
            })
            .ok()?;
        scanner.end().ok()?;
        if scanner.unreadable().is_some() {
            return None;
        }
        let members = members.map(|members| Members {
            members,
            unreadable: None,
        });
        Some(ChordEvent {
            text,
            fields,
            properties: OnceCell::new(),
            members: members.map_or_else(OnceCell::new, OnceCell::from),
        })
    }

    /// The whole event as a JSON tree (built on demand: only the content
    /// hash needs it). `None` for text that only a full read finds invalid
    /// (a number out of range, a lone surrogate in `properties`, which is
    /// kept as text when the event is parsed).
    pub fn to_value(&self) -> Option<Value> {
        serde_json::from_str(self.text).ok()
    }

    /// The event exactly as received.
    pub fn text(&self) -> &str {
        self.text
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

    /// `properties` as sent, when it is an object.
    pub fn properties_text(&self) -> Option<&'a str> {
        self.fields.properties
    }

    /// `properties`' top-level members as sent, each with its shape, in the
    /// order sent (none when `properties` is not an object).
    pub fn members(&self) -> &Members<'a> {
        self.members.get_or_init(|| match self.fields.properties {
            Some(text) => members_of(text),
            None => Members {
                members: Vec::new(),
                unreadable: None,
            },
        })
    }

    /// `properties` as a tree (built on first use).
    pub fn properties(&self) -> Option<&Map<String, Value>> {
        self.properties
            .get_or_init(|| {
                let raw = self.fields.properties?;
                serde_json::from_str(raw).ok()
            })
            .as_ref()
            .and_then(Value::as_object)
    }

    /// One top-level member of `properties`, without building the rest;
    /// `null` reads as absent. A repeated key keeps its last value.
    pub fn property(&self, key: &str) -> Option<Value> {
        if let Some(tree) = self.properties.get() {
            return tree.as_ref()?.get(key).filter(|v| !v.is_null()).cloned();
        }
        let member = self.members().members.iter().rev().find(|m| m.key == key)?;
        serde_json::from_str::<Value>(member.text).ok().filter(|v| !v.is_null())
    }

    /// The members of `properties` named `keys`, as a small object.
    pub fn properties_subset(&self, keys: &[&str]) -> Map<String, Value> {
        keys.iter()
            .filter_map(|key| Some((key.to_string(), self.property(key)?)))
            .collect()
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
trait ReadObject<'de>: Sized {
    fn read<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl<'de, T: ReadObject<'de>> Deserialize<'de> for ObjectOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectOrVisitor(std::marker::PhantomData))
    }
}

struct ObjectOrVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: ReadObject<'de>> Visitor<'de> for ObjectOrVisitor<T> {
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

/// `properties` as sent, when it is an object. Capturing it checks its
/// syntax; the few things only a full read finds (a lone UTF-16 surrogate
/// in an escape, a number out of range) are found when its members are
/// (`members_of`).
fn raw_object<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<&'de str>, A::Error> {
    let raw = map.next_value::<&'de RawValue>()?.get();
    Ok(raw.starts_with('{').then_some(raw))
}

/// A field the mapping reads, parsed from its own text once the scanner has
/// found where it ends; `null` reads as absent.
fn read(scanner: &mut Scanner<'_>) -> Result<Option<Value>, json_scan::Error> {
    scanner.peek();
    let start = scanner.offset();
    scanner.value()?;
    let value = serde_json::from_str::<Value>(scanner.since(start)).map_err(|_| json_scan::Error { offset: start })?;
    Ok(Some(value).filter(|v| !v.is_null()))
}

/// The parts of `context` the mapping reads; anything but an object reads
/// as none of them.
fn read_context(scanner: &mut Scanner<'_>) -> Result<Context, json_scan::Error> {
    let mut context = Context::default();
    if scanner.peek() != Some(b'{') {
        scanner.value()?;
        return Ok(context);
    }
    scanner.object(|key, scanner| {
        match &*key {
            "traits" => context.traits = read(scanner)?,
            "locale" => context.locale = read(scanner)?,
            "timezone" => context.timezone = read(scanner)?,
            "ip" => context.ip = read(scanner)?,
            "geo" => context.geo = read(scanner)?,
            "location" => context.location = read(scanner)?,
            _ => {
                scanner.value()?;
            }
        }
        Ok(())
    })?;
    Ok(context)
}

/// The members of the object the scanner is at, each measured.
fn scan_members<'a>(scanner: &mut Scanner<'a>) -> Result<Vec<Member<'a>>, json_scan::Error> {
    let mut members = Vec::new();
    scanner.take_shape(0);
    scanner.object(|key, scanner| {
        scanner.peek();
        let start = scanner.offset();
        let depth = scanner.value()?;
        members.push(Member {
            key,
            text: scanner.since(start),
            shape: scanner.take_shape(depth),
        });
        Ok(())
    })?;
    Ok(members)
}

/// The members of `properties` captured by serde_json (the event took its
/// path): scanned again on their own, noting what serde_json will not read.
fn members_of(text: &str) -> Members<'_> {
    let mut scanner = Scanner::new(text).strict(true);
    let members = scan_members(&mut scanner);
    let unreadable = match (&members, scanner.unreadable()) {
        (Ok(_), None) => None,
        // serde_json says why, as it says it for the whole event.
        _ => Some(match serde_json::from_str::<Value>(text) {
            Err(e) => e.to_string(),
            Ok(_) => format!("nested deeper than {} levels", json_scan::MAX_DEPTH - 1),
        }),
    };
    // Text nested deeper than the scanner goes: its members as serde_json
    // captures them (it does not limit what it skips), so that the email a
    // shop put in `properties` is still found; the event is refused anyway.
    let members =
        members.unwrap_or_else(|_| serde_json::from_str::<Captured>(text).map_or_else(|_| Vec::new(), |c| c.0));
    Members { members, unreadable }
}

/// An object's top-level members as serde_json captures them, unmeasured.
struct Captured<'a>(Vec<Member<'a>>);

impl<'de> Deserialize<'de> for Captured<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CapturedVisitor;
        impl<'de> Visitor<'de> for CapturedVisitor {
            type Value = Captured<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Captured<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    members.push(Member {
                        key: Cow::Owned(key),
                        text: map.next_value::<&'de RawValue>()?.get(),
                        shape: Shape::default(),
                    });
                }
                Ok(Captured(members))
            }
        }
        deserializer.deserialize_map(CapturedVisitor)
    }
}

impl<'de> ReadObject<'de> for Fields<'de> {
    fn read<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<TopKey>()? {
            match key {
                TopKey::Kind => fields.kind = value(&mut map)?,
                TopKey::Name => fields.name = value(&mut map)?,
                TopKey::MessageId => fields.message_id = value(&mut map)?,
                TopKey::UserId => fields.user_id = value(&mut map)?,
                TopKey::AnonymousId => fields.anonymous_id = value(&mut map)?,
                TopKey::Timestamp => fields.timestamp = value(&mut map)?,
                TopKey::Properties => fields.properties = raw_object(&mut map)?,
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

impl<'de> ReadObject<'de> for Context {
    fn read<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
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
