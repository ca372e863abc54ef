//! One event through the plugin's `map-event`: the host reads the envelope
//! it needs (`messageId`, `type`, and the person it is about), hands the
//! event to whichever version the slot holds, on an instance from that
//! version's pool, and checks what comes back. A plugin failure becomes that
//! event's error, marked so that it can be mapped again with a fresh
//! instance before it is called poison; the failed instance is dropped.
//! `stage` maps a stream of events on several workers.

mod stage;

pub use stage::{MappingPool, Prepared, Stage, StageActivity, StageConfig, StageInput};

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use json_scan::Scanner;
use plugin_runtime::{
    BatchItem, CallError, HttpRequest, Loaded, Mapping, Outcome, Plugin, PluginSlot, Use, now_unix_ms,
};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::settings::{DestinationSettings, SettingsCell};

/// Which event this is, as the operator finds it again: a line of `send`'s
/// or `map`'s input, or a row of `serve`'s spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventId {
    Line(u64),
    SpoolRow(i64),
    /// A message's sequence in the JetStream stream (`serve --stream`).
    Stream(u64),
}

impl EventId {
    /// The number alone (line or row id).
    pub fn number(self) -> i64 {
        match self {
            EventId::Line(line) => line as i64,
            EventId::SpoolRow(row) => row,
            EventId::Stream(sequence) => sequence as i64,
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventId::Line(line) => write!(f, "line {line}"),
            EventId::SpoolRow(row) => write!(f, "spool row {row}"),
            EventId::Stream(sequence) => write!(f, "stream message {sequence}"),
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
    /// Whom the event is about, by the host's one person key
    /// (`Envelope::person_key`); set by the mapping stage.
    pub person: Option<String>,
    /// The plugin call itself failed (trap, deadline, bad output), as
    /// opposed to the plugin judging the event unmappable.
    pub plugin_failed: bool,
    /// The version that mapped it; its requests are judged by it too.
    pub plugin: Arc<Plugin>,
    /// For each request, what it is as a batch item, when the plugin
    /// batches it (empty unless the mapper asks, see `with_batch_items`).
    pub batch_items: Vec<Option<BatchItem>>,
    /// Where the event's text holds `properties`, an object this host has
    /// checked to be JSON while reading the envelope: a body that copies it
    /// need not have that part checked again (`shown.rs`).
    pub checked: Option<Range<usize>>,
}

/// Plugin calls in progress at once, up to a bound; a caller past it waits.
pub struct CallGate {
    max: usize,
    in_use: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl CallGate {
    pub fn new(max: usize) -> Arc<CallGate> {
        Arc::new(CallGate {
            max: max.max(1),
            in_use: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        })
    }

    fn enter(self: &Arc<Self>) -> GatePass {
        let mut in_use = self.in_use.lock().unwrap();
        while *in_use >= self.max {
            in_use = self.freed.wait(in_use).unwrap();
        }
        *in_use += 1;
        GatePass(self.clone())
    }
}

struct GatePass(Arc<CallGate>);

impl Drop for GatePass {
    fn drop(&mut self) {
        *self.0.in_use.lock().unwrap() -= 1;
        self.0.freed.notify_one();
    }
}

/// The gates a connection's mapping passes: its own (its fair share) and
/// the host's (one instance each, so bounded memory however many
/// connections are busy). A connection stuck on poison events holds at
/// most its own share, and the others keep mapping.
#[derive(Clone)]
pub struct CallGates {
    pub own: Arc<CallGate>,
    pub host: Arc<CallGate>,
}

/// Maps events through whichever version the slot holds when each starts.
pub struct EventMapper {
    slot: Arc<PluginSlot>,
    settings: SettingsCell,
    batch_items: bool,
    gates: Option<CallGates>,
}

impl EventMapper {
    pub fn new(slot: Arc<PluginSlot>, settings: DestinationSettings) -> EventMapper {
        EventMapper::with_cell(slot, crate::settings::cell(settings))
    }

    /// Maps with whichever settings the cell holds when each event starts.
    pub fn with_cell(slot: Arc<PluginSlot>, settings: SettingsCell) -> EventMapper {
        EventMapper {
            slot,
            settings,
            batch_items: false,
            gates: None,
        }
    }

    /// Waits at `gates` before each plugin call.
    pub fn with_gates(mut self, gates: CallGates) -> EventMapper {
        self.gates = Some(gates);
        self
    }

    /// The plugin calls this mapper may have in progress at once (its own
    /// gate), if it is bounded.
    pub fn max_calls(&self) -> Option<usize> {
        self.gates.as_ref().map(|gates| gates.own.max)
    }

    /// Also asks a batching plugin (1.1) what each request is as a batch
    /// item, on the same instance right after mapping.
    pub fn with_batch_items(mut self) -> EventMapper {
        self.batch_items = true;
        self
    }

    /// Maps the text of one JSON event.
    pub fn map(&self, id: EventId, text: &str) -> MappedEvent {
        self.map_read(id, text, Envelope::read(id, text))
    }

    /// Maps an event whose envelope has been read already.
    pub(crate) fn map_read(&self, id: EventId, text: &str, envelope: Result<Envelope, String>) -> MappedEvent {
        let loaded = self.slot.current();
        let mut mapped = MappedEvent {
            plugin: loaded.plugin.clone(),
            id,
            message_id: None,
            kind: None,
            outcome: MappedOutcome::Error(String::new()),
            warnings: Vec::new(),
            ordering_key: None,
            person: None,
            plugin_failed: false,
            batch_items: Vec::new(),
            checked: None,
        };
        match envelope {
            Ok(envelope) => {
                mapped.message_id = envelope.message_id;
                mapped.kind = envelope.kind;
                mapped.checked = envelope.properties_span;
            }
            Err(reason) => {
                mapped.outcome = MappedOutcome::Error(reason);
                return mapped;
            }
        }

        loaded.count_mapped();
        match self.call(&loaded, text) {
            Ok((mapping, batch_items)) => {
                mapped.batch_items = batch_items;
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

    fn call(&self, loaded: &Loaded, event: &str) -> Result<(Mapping, Vec<Option<BatchItem>>), CallError> {
        let plugin = &loaded.plugin;
        // The connection's gate first: waiting there holds none of the
        // host's passes.
        let _passes = self.gates.as_ref().map(|g| (g.own.enter(), g.host.enter()));
        let settings = self.settings.load();
        let settings = settings.public_json();
        let mut instance = plugin.pool().checkout_waiting(plugin, Use::Mapping)?;
        let result = instance
            .map_event(settings, event, now_unix_ms())
            .and_then(|mapping| Ok(plugin.check_mapping(&mapping).map(|()| mapping)?))
            .and_then(|mapping| {
                let items = match &mapping.outcome {
                    Outcome::Send(requests) if self.batch_items && plugin.batches() => requests
                        .iter()
                        .map(|request| instance.batchable(settings, request))
                        .collect::<Result<_, _>>()?,
                    _ => Vec::new(),
                };
                Ok((mapping, items))
            });
        // Only an instance whose work succeeded goes back, the host's own
        // check of the mapping included.
        if result.is_err() {
            instance.discard();
        }
        result
    }
}

/// What the host reads of an event itself: the rest is the plugin's. Read
/// without building the event (every other field is skipped unparsed), so
/// a 200 KB event costs the host a scan, not a tree.
#[derive(Deserialize)]
pub(crate) struct Envelope {
    #[serde(rename = "messageId", default, deserialize_with = "message_id")]
    message_id: Option<String>,
    #[serde(rename = "type", default, deserialize_with = "kind")]
    kind: Option<String>,
    #[serde(rename = "userId", default, deserialize_with = "id_text")]
    user_id: Option<String>,
    #[serde(rename = "anonymousId", default, deserialize_with = "id_text")]
    anonymous_id: Option<String>,
    #[serde(default)]
    traits: Email,
    #[serde(default)]
    context: ContextTraits,
    #[serde(default)]
    properties: Email,
    /// Where `properties` is in the text, when it is an object and the scan
    /// checked it (`MappedEvent::checked`).
    #[serde(skip)]
    properties_span: Option<Range<usize>>,
}

impl Envelope {
    /// The envelope of an event object, or why the text is not one.
    pub(crate) fn read(id: EventId, text: &str) -> Result<Envelope, String> {
        if let Some(envelope) = Envelope::scan(text) {
            return Ok(envelope);
        }
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
                Ok(Value::Object(_)) => Ok(Envelope::default()),
                Ok(other) => Err(format!("{id} is a JSON {}, not an event object", kind_of(&other))),
                Err(e) => Err(format!("{id} is not JSON: {e}")),
            },
        }
    }

    /// The envelope read in one pass of `json_scan`: the few values it
    /// needs parsed from their own text, everything else skipped. `None`
    /// leaves the text to serde_json (whose reading stays the definition):
    /// text that is not an object or not JSON, that holds a lone surrogate
    /// or a number out of range, that repeats one of the fields read, or
    /// whose `context` is not an object.
    fn scan(text: &str) -> Option<Envelope> {
        /// One value, read by the same function serde_json's path uses.
        fn parse<T>(
            scanner: &mut Scanner<'_>,
            read: impl FnOnce(Value) -> serde_json::Result<T>,
        ) -> Result<T, json_scan::Error> {
            scanner.peek();
            let start = scanner.offset();
            scanner.value()?;
            serde_json::from_str(scanner.since(start))
                .and_then(read)
                .map_err(|_| json_scan::Error { offset: start })
        }
        /// `Email`: the first `email` member of an object.
        fn email(scanner: &mut Scanner<'_>) -> Result<Email, json_scan::Error> {
            if scanner.peek() != Some(b'{') {
                scanner.value()?;
                return Ok(Email(None));
            }
            let mut email = Email(None);
            scanner.object(|key, scanner| {
                if key == "email" && email.0.is_none() {
                    email = Email(match parse(scanner, Ok)? {
                        Value::String(text) if !text.trim().is_empty() => Some(text),
                        _ => None,
                    });
                } else {
                    scanner.value()?;
                }
                Ok(())
            })?;
            Ok(email)
        }
        let refused = json_scan::Error { offset: 0 };
        let mut scanner = Scanner::new(text).strict(true);
        let mut envelope = Envelope::default();
        let mut seen = [false; 7];
        let mut once = |field: usize| match std::mem::replace(&mut seen[field], true) {
            false => Ok(()),
            true => Err(refused),
        };
        scanner
            .object(|key, scanner| {
                match &*key {
                    "messageId" => {
                        once(0)?;
                        envelope.message_id = parse(scanner, message_id)?;
                    }
                    "type" => {
                        once(1)?;
                        envelope.kind = parse(scanner, kind)?;
                    }
                    "userId" => {
                        once(2)?;
                        envelope.user_id = parse(scanner, id_text)?;
                    }
                    "anonymousId" => {
                        once(3)?;
                        envelope.anonymous_id = parse(scanner, id_text)?;
                    }
                    "traits" => {
                        once(4)?;
                        envelope.traits = email(scanner)?;
                    }
                    "properties" => {
                        once(5)?;
                        let object = scanner.peek() == Some(b'{');
                        let start = scanner.offset();
                        envelope.properties = email(scanner)?;
                        envelope.properties_span = object.then(|| start..scanner.offset());
                    }
                    "context" => {
                        once(6)?;
                        if scanner.peek() != Some(b'{') {
                            return Err(refused);
                        }
                        let mut traits_seen = false;
                        scanner.object(|key, scanner| {
                            if key == "traits" {
                                if std::mem::replace(&mut traits_seen, true) {
                                    return Err(refused);
                                }
                                envelope.context.traits = email(scanner)?;
                            } else {
                                scanner.value()?;
                            }
                            Ok(())
                        })?;
                    }
                    _ => {
                        scanner.value()?;
                    }
                }
                Ok(())
            })
            .ok()?;
        scanner.end().ok()?;
        scanner.unreadable().is_none().then_some(envelope)
    }

    /// Who the event is about, as the host can tell without the plugin:
    /// `userId`, else `anonymousId`, else the email in `traits`,
    /// `context.traits` or `properties` (trimmed, lowercased). An id sent
    /// as a number is the same person as that number sent as a string, as
    /// it is at Klaviyo (`external_id`). The one rule for the whole host:
    /// events with the same key are mapped one after another in the order
    /// they came, and share a partition of the stream (`serve --stream`).
    ///
    /// The key is a letter for its kind and the id as a JSON string
    /// (`u"42"`): its bytes are hashed for the stream's partitions, so
    /// they must not change between versions.
    pub(crate) fn person_key(&self) -> Option<String> {
        let quoted = |id: &str| serde_json::to_string(id).expect("a string is always JSON");
        if let Some(user) = &self.user_id {
            return Some(format!("u{}", quoted(user)));
        }
        if let Some(anonymous) = &self.anonymous_id {
            return Some(format!("a{}", quoted(anonymous)));
        }
        [&self.traits.0, &self.context.traits.0, &self.properties.0]
            .into_iter()
            .flatten()
            .next()
            .map(|email| format!("e{}", quoted(&email.trim().to_lowercase())))
    }
}

/// The person key (`Envelope::person_key`) of an event's text; none for
/// text that is not an event object or names no person.
pub fn person_key(text: &str) -> Option<String> {
    match Envelope::scan(text) {
        Some(envelope) => envelope.person_key(),
        None => serde_json::from_str::<Envelope>(text).ok()?.person_key(),
    }
}

/// The person key of an event already parsed.
pub fn person_key_of(event: &Value) -> Option<String> {
    Envelope::deserialize(event).ok()?.person_key()
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            message_id: None,
            kind: None,
            user_id: None,
            anonymous_id: None,
            traits: Email(None),
            context: ContextTraits::default(),
            properties: Email(None),
            properties_span: None,
        }
    }
}

/// `context.traits.email`, everything else in `context` skipped.
#[derive(Default, Deserialize)]
struct ContextTraits {
    #[serde(default)]
    traits: Email,
}

/// The `email` member of an object; any other value, or an object without
/// a string `email`, reads as none. Other members are skipped unparsed.
#[derive(Default)]
struct Email(Option<String>);

impl<'de> Deserialize<'de> for Email {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Email;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Email, A::Error> {
                let mut email = None;
                while let Some(IsEmail(is_email)) = map.next_key()? {
                    if is_email && email.is_none() {
                        email = match map.next_value::<Value>()? {
                            Value::String(text) if !text.trim().is_empty() => Some(text),
                            _ => None,
                        };
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(Email(email))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Email, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Email(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Email, E> {
                Ok(Email(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Email, E> {
                Ok(Email(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Email, E> {
                Ok(Email(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Email, E> {
                Ok(Email(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Email, E> {
                Ok(Email(None))
            }
            fn visit_unit<E>(self) -> Result<Email, E> {
                Ok(Email(None))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// Whether an object key is `email`, read without copying it.
struct IsEmail(bool);

impl<'de> Deserialize<'de> for IsEmail {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = IsEmail;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<IsEmail, E> {
                Ok(IsEmail(key == "email"))
            }
        }
        deserializer.deserialize_str(Visit)
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

/// A person's id as text, whether sent as a string or a number.
fn id_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(id) if !id.is_empty() => Some(id),
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

#[cfg(test)]
mod tests {
    use super::{Envelope, EventId, person_key};

    /// The one-pass read and serde_json's read give the same envelope, or
    /// the one-pass read leaves the text to serde_json.
    #[test]
    fn the_scanned_envelope_is_the_one_serde_json_reads() {
        let seen = |envelope: Envelope| {
            (
                envelope.message_id.clone(),
                envelope.kind.clone(),
                envelope.person_key(),
            )
        };
        let by_serde = |text: &str| match serde_json::from_str::<Envelope>(text) {
            Ok(envelope) if text.trim_start().starts_with('{') => seen(envelope),
            _ => seen(Envelope::default()),
        };
        let mut scanned = 0;
        for text in [
            r#"{"type":"track","messageId":12.5,"userId":"","anonymousId":7,"properties":{"email":"  ","email":"l@x.co"}}"#,
            r#"{"type":"track","properties":{"email":5,"email":"l@x.co"}}"#,
            r#"{"type":7,"messageId":null,"traits":"str","context":{"traits":{"email":"C@x.co"},"page":{}}}"#,
            r#"{"messageId":"m\u00e9","type":"tr\u0061ck","\u0075serId":"u"}"#,
            r#" {"context":{"traits":[1],"ip":"1.2.3.4"},"properties":{"a":{"email":"deep@x.co"}}} "#,
            r#"{"type":"track","type":"identify","userId":"u"}"#,
            r#"{"context":{"traits":{},"traits":{"email":"e@x.co"}}}"#,
            r#"{"context":[],"userId":"u"}"#,
            r#"{"context":["a"],"userId":"u"}"#,
            r#"{"userId":"u","junk":"\ud800"}"#,
            r#"{"userId":"\ud800"}"#,
            r#"{"userId":"u","n":1e999}"#,
            r#"{"userId":"u"} x"#,
            r#"[{"userId":"u"}]"#,
            "",
        ] {
            match Envelope::scan(text) {
                Some(envelope) => {
                    scanned += 1;
                    assert_eq!(seen(envelope), by_serde(text), "{text}");
                }
                None => {
                    // serde_json's path decides, as it did before the scan.
                    let _ = Envelope::read(EventId::Line(1), text);
                }
            }
        }
        assert_eq!(scanned, 5, "the plain events are read in one pass");
    }

    /// The span handed on as checked is exactly `properties`' text, and only
    /// when it is an object the scan read.
    #[test]
    fn the_checked_span_is_the_properties_object() {
        let properties = r#"{"email":"a@x.co","items":[{"sku":"1"}], "n" :2 }"#;
        let text = format!(r#"{{"type":"track","properties": {properties} ,"userId":"u"}}"#);
        let span = Envelope::read(EventId::Line(1), &text)
            .unwrap()
            .properties_span
            .unwrap();
        assert_eq!(&text[span], properties);
        for text in [
            r#"{"type":"track","properties":"not an object"}"#,
            r#"{"type":"track"}"#,
            // Left to serde_json (a lone surrogate): no span.
            r#"{"type":"track","properties":{"a":1},"x":"\ud800"}"#,
        ] {
            assert_eq!(
                Envelope::read(EventId::Line(1), text).unwrap().properties_span,
                None,
                "{text}"
            );
        }
    }

    #[test]
    fn the_person_key_prefers_user_then_anonymous_then_email() {
        let both = r#"{"userId":"u1","anonymousId":"a1","traits":{"email":"x@y.z"}}"#;
        assert_eq!(person_key(both).as_deref(), Some(r#"u"u1""#));
        let anonymous = r#"{"userId":null,"anonymousId":"a1"}"#;
        assert_eq!(person_key(anonymous).as_deref(), Some(r#"a"a1""#));
        let email = r#"{"type":"track","properties":{"email":" X@Y.z "}}"#;
        assert_eq!(person_key(email).as_deref(), Some(r#"e"x@y.z""#));
        let in_context = r#"{"context":{"traits":{"email":"c@d.e"}}}"#;
        assert_eq!(person_key(in_context).as_deref(), Some(r#"e"c@d.e""#));
        assert_eq!(person_key(r#"{"type":"track"}"#), None);
        assert_eq!(person_key(r#"{"userId":""}"#), None);
        assert_eq!(person_key("not json"), None);
    }

    #[test]
    fn a_user_id_sent_as_a_number_is_the_same_person_as_that_id_sent_as_a_string() {
        assert_eq!(person_key(r#"{"userId":7}"#), person_key(r#"{"userId":"7"}"#));
        assert_ne!(person_key(r#"{"userId":7}"#), person_key(r#"{"anonymousId":"7"}"#));
    }
}
