//! The ingest wire formats, as pure functions of the bytes received (the
//! handlers in `ingest` add the HTTP and the spool; the fuzz targets call
//! these directly): content decoding within a decoded-size limit, the
//! write key's placements, and one event or a Segment batch checked and
//! completed into what the spool stores.

use std::borrow::Cow;
use std::io::Read;

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// The largest event accepted, as received and as stored (completed).
/// 8 KiB under NATS's 1 MiB message limit, which counts the headers an
/// event carries on the stream (its `Nats-Msg-Id` of up to 321 bytes, its
/// connection and its time): the stream can carry every event ingest
/// accepts, and the spool takes the same.
pub const MAX_EVENT_BYTES: usize = (1 << 20) - (8 << 10);
/// The largest batch request accepted.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// The most events one batch request may hold. Segment's own clients send
/// at most 500 KB a batch with events of 32 KB at most, so a real batch
/// holds hundreds; without a bound, 16 MB of `{}` items (a 16 KB gzip)
/// became 5.6 million rows in one transaction.
pub const MAX_BATCH_EVENTS: usize = 2_500;
/// The longest `messageId` accepted: it travels as a header on the stream
/// and as Klaviyo's `unique_id`.
pub const MAX_MESSAGE_ID_BYTES: usize = 256;

/// The event types ingest takes.
pub const KINDS: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// An event as the spool stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub message_id: String,
    pub received_at: String,
    /// The event as JSON text, `type`, `receivedAt` and `messageId` filled
    /// in and any `writeKey` masked.
    pub text: String,
    /// Who it is about (`mapping::person_key`), read while it was parsed.
    pub person: Option<String>,
}

/// Why a body was refused, and which HTTP status says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// 400: the body is not what it should be.
    BadRequest(String),
    /// 415: a `Content-Encoding` this service does not read.
    UnsupportedEncoding(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::BadRequest(message) | Refused::UnsupportedEncoding(message) => f.write_str(message),
        }
    }
}

/// The body, decoded from its `Content-Encoding`, and refused once its
/// decoded size passes `limit` (a zip bomb is cut off there, not decoded
/// whole).
pub fn decode<'a>(content_encoding: Option<&str>, body: &'a [u8], limit: usize) -> Result<Cow<'a, [u8]>, Refused> {
    let encoding = content_encoding
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let mut out = Vec::new();
    let read = match encoding.as_str() {
        "" | "identity" if body.len() > limit => {
            return Err(Refused::BadRequest(format!(
                "the body is {} bytes, over the {limit} byte limit; nothing was stored",
                body.len()
            )));
        }
        "" | "identity" => return Ok(Cow::Borrowed(body)),
        "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(body)
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        // HTTP's "deflate" is zlib-wrapped; some clients send it raw.
        "deflate" => match flate2::read::ZlibDecoder::new(body)
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
        {
            Ok(n) => Ok(n),
            Err(_) => {
                out.clear();
                flate2::read::DeflateDecoder::new(body)
                    .take(limit as u64 + 1)
                    .read_to_end(&mut out)
            }
        },
        other => {
            return Err(Refused::UnsupportedEncoding(format!(
                "Content-Encoding {other:?} is not supported; send gzip, deflate or none"
            )));
        }
    };
    match read {
        Ok(_) if out.len() > limit => Err(Refused::BadRequest(format!(
            "the body decodes to more than the {limit} byte limit; nothing was stored"
        ))),
        Ok(_) => Ok(Cow::Owned(out)),
        Err(e) => Err(Refused::BadRequest(format!(
            "the body is not valid {encoding} data: {e}; nothing was stored"
        ))),
    }
}

/// One event checked and completed; `kind` (from the path) sets `type`.
pub fn single(body: &[u8], kind: Option<&str>, received_at: &str) -> Result<Received, String> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "the event is {} bytes, over the {MAX_EVENT_BYTES} byte limit",
            body.len()
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    complete(value, kind, received_at)
}

/// Every event of a Segment batch (`{"batch": [...]}`), or why the batch
/// is refused as a whole, naming the first bad item.
pub fn batch(body: &[u8], received_at: &str) -> Result<Vec<Received>, String> {
    if body.len() > MAX_BATCH_BYTES {
        return Err(format!(
            "the batch is {} bytes, over the {MAX_BATCH_BYTES} byte limit",
            body.len()
        ));
    }
    #[derive(serde::Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        batch: Items<'a>,
    }
    // Each item is read as its own text (so its size is what it was sent
    // as), and the count is bounded while reading, not after.
    let items: Batch = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data if e.to_string().starts_with(TOO_MANY) => e.to_string(),
        serde_json::error::Category::Data => "the body must be an object with a `batch` array of events".to_string(),
        _ => format!("the body is not valid JSON: {e}"),
    })?;
    let items = items.batch.0;
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match single(item.get().as_bytes(), None, received_at) {
            Ok(event) => events.push(event),
            Err(message) => return Err(format!("batch[{i}]: {message}; nothing was stored")),
        }
    }
    Ok(events)
}

const TOO_MANY: &str = "the batch holds more than";

/// A batch's items, each as its JSON text: at most `MAX_BATCH_EVENTS`.
struct Items<'a>(Vec<&'a serde_json::value::RawValue>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Items<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Items<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Items<'a>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<&'de serde_json::value::RawValue>()? {
                    if items.len() == MAX_BATCH_EVENTS {
                        return Err(serde::de::Error::custom(format!(
                            "{TOO_MANY} {MAX_BATCH_EVENTS} events; send it in smaller batches (nothing was stored)"
                        )));
                    }
                    items.push(item);
                }
                Ok(Items(items))
            }
        }
        deserializer.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

fn complete(value: Value, kind: Option<&str>, received_at: &str) -> Result<Received, String> {
    let Value::Object(mut event) = value else {
        return Err(format!(
            "the body must be a JSON object (an event), not a JSON {}",
            cdp_core::mapping::kind_of(&value)
        ));
    };
    if let Some(kind) = kind {
        event.insert("type".into(), json!(kind));
    }
    mask_write_key(&mut event);
    let message_id = message_id(&mut event)?;
    event.insert("receivedAt".into(), json!(received_at));
    let event = Value::Object(event);
    let person = cdp_core::mapping::person_key_of(&event);
    // Written out again, an event can grow (`1e9` is written
    // `1000000000.0`): the limit holds for what is stored, too.
    let text = event.to_string();
    if text.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "the event is {} bytes once completed (numbers written out in full, receivedAt and messageId added), over the {MAX_EVENT_BYTES} byte limit",
            text.len()
        ));
    }
    Ok(Received {
        message_id,
        received_at: received_at.to_string(),
        text,
        person,
    })
}

/// The event's `messageId`, or why it cannot be one. It is refused when it
/// holds a control character (it travels as a header on the stream) or
/// is over `MAX_MESSAGE_ID_BYTES`. When it is absent it is filled in with a
/// hash of the event's content, so that a client sending the same event
/// again (after a timeout, say) sends the same event, which Klaviyo then
/// counts once. The hash leaves out what changes between two sends of one
/// event: `sentAt`, and the `receivedAt` this service adds.
fn message_id(event: &mut Map<String, Value>) -> Result<String, String> {
    let id = match event.get("messageId") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            let mut content = event.clone();
            for varying in ["messageId", "sentAt", "receivedAt"] {
                content.remove(varying);
            }
            // serde_json's maps keep keys sorted: one text per content.
            let hash = plugin_runtime::sha256_hex(Value::Object(content).to_string().as_bytes());
            let id = format!("content-{}", &hash[..32]);
            event.insert("messageId".into(), json!(id));
            return Ok(id);
        }
    };
    if id.len() > MAX_MESSAGE_ID_BYTES {
        return Err(format!(
            "messageId is {} bytes, over the {MAX_MESSAGE_ID_BYTES} byte limit",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(format!(
            "messageId holds the control character {:?}, which an id may not hold",
            c
        ));
    }
    Ok(id)
}

/// A write key sent inside an event is a secret: it is not kept.
fn mask_write_key(event: &mut Map<String, Value>) {
    if event.contains_key("writeKey") {
        event.insert("writeKey".into(), json!("***"));
    }
}

/// The write key of a Segment request: the basic-auth user, else its
/// password when the user is empty, else the body's `writeKey`.
pub fn segment_key(authorization: Option<&str>, body: &[u8]) -> Option<String> {
    header_key(authorization).or_else(|| body_key(body))
}

/// The write key of a Segment request's `Authorization` header: the
/// basic-auth user, else its password when the user is empty.
pub fn header_key(authorization: Option<&str>) -> Option<String> {
    let (user, password) = authorization.and_then(basic_credentials)?;
    let key = if user.is_empty() { password } else { user };
    (!key.is_empty()).then_some(key)
}

/// The `writeKey` of a Segment request's (decoded) body.
pub fn body_key(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WithKey {
        #[serde(rename = "writeKey")]
        write_key: Option<String>,
    }
    serde_json::from_slice::<WithKey>(body).ok()?.write_key
}

fn basic_credentials(authorization: &str) -> Option<(String, String)> {
    let encoded = authorization.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':').unwrap_or((&text, ""));
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `ingest` fuzz target: the limit held for gzip and
    /// deflate only, and an unencoded body passed through whatever its size.
    #[test]
    fn an_unencoded_body_over_the_limit_is_refused_like_a_decoded_one() {
        let body = vec![b' '; 11];
        for encoding in [None, Some("identity")] {
            assert!(
                matches!(decode(encoding, &body, 10), Err(Refused::BadRequest(m)) if m.contains("11 bytes, over the 10 byte limit"))
            );
            assert_eq!(decode(encoding, &body[..10], 10).unwrap().len(), 10);
        }
    }

    #[test]
    fn a_gzip_bomb_is_cut_off_at_the_limit() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&vec![b'{'; 1 << 20]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 4096);
        assert!(
            matches!(decode(Some("gzip"), &bomb, 1000), Err(Refused::BadRequest(m)) if m.contains("more than the 1000 byte limit"))
        );
    }

    #[test]
    fn a_batch_names_its_first_bad_item_and_masks_write_keys() {
        let ok = br#"{"batch": [{"type": "track", "writeKey": "secret", "messageId": "m1"}, {"type": "identify"}]}"#;
        let events = batch(ok, "2026-12-02T00:00:00.000Z").unwrap();
        assert_eq!(events.len(), 2);
        assert!(!events[0].text.contains("secret") && events[0].message_id == "m1");
        assert!(
            events[1].message_id.starts_with("content-"),
            "a missing messageId is filled in"
        );
        let bad = br#"{"batch": [{"type": "track"}, 7]}"#;
        let refused = batch(bad, "2026-12-02T00:00:00.000Z").unwrap_err();
        assert!(
            refused.starts_with("batch[1]: ") && refused.contains("not a JSON number"),
            "{refused}"
        );
    }

    #[test]
    fn a_missing_message_id_is_the_same_for_the_same_event_sent_twice() {
        let first = single(
            br#"{"type":"track","event":"Order Completed","sentAt":"2026-12-02T00:00:00Z","properties":{"total":42}}"#,
            None,
            "2026-12-02T00:00:01.000Z",
        )
        .unwrap();
        let again = single(
            br#"{"properties":{"total":42},"event":"Order Completed","type":"track","sentAt":"2026-12-02T00:00:09Z"}"#,
            None,
            "2026-12-02T00:00:10.000Z",
        )
        .unwrap();
        assert_eq!(first.message_id, again.message_id);
        let other = single(
            br#"{"type":"track","event":"Order Completed","properties":{"total":43}}"#,
            None,
            "2026-12-02T00:00:01.000Z",
        )
        .unwrap();
        assert_ne!(first.message_id, other.message_id);
        assert!(first.text.contains(&first.message_id));
    }

    #[test]
    fn a_message_id_with_a_line_break_refuses_the_whole_batch_naming_the_item() {
        let body = br#"{"batch": [{"type":"track","messageId":"ok-1"}, {"type":"track","messageId":"bad\r\nX-Evil: 1"}, {"type":"track","messageId":"ok-2"}]}"#;
        let refused = batch(body, "2026-12-02T00:00:00.000Z").unwrap_err();
        assert!(
            refused.starts_with("batch[1]: messageId holds the control character '\\r'")
                && refused.ends_with("nothing was stored"),
            "{refused}"
        );
        let long = format!(
            r#"{{"type":"track","messageId":"{}"}}"#,
            "m".repeat(MAX_MESSAGE_ID_BYTES + 1)
        );
        assert!(
            single(long.as_bytes(), None, "t")
                .unwrap_err()
                .contains("over the 256 byte limit")
        );
    }

    #[test]
    fn a_batch_of_too_many_events_is_refused_before_any_is_read() {
        let body = format!(r#"{{"batch": [{}]}}"#, vec!["{}"; MAX_BATCH_EVENTS + 1].join(","));
        let refused = batch(body.as_bytes(), "t").unwrap_err();
        assert!(refused.contains("more than 2500 events"), "{refused}");
        let body = format!(r#"{{"batch": [{}]}}"#, vec!["{}"; MAX_BATCH_EVENTS].join(","));
        assert_eq!(batch(body.as_bytes(), "t").unwrap().len(), MAX_BATCH_EVENTS);
        assert!(batch(br#"{"batch": 7}"#, "t").unwrap_err().contains("`batch` array"));
        assert!(batch(br#"[1]"#, "t").unwrap_err().contains("`batch` array"));
        assert!(batch(br#"{"batch": [}"#, "t").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn an_event_that_grows_when_completed_is_held_to_the_limit_as_stored() {
        let numbers = vec!["1e9"; MAX_EVENT_BYTES / 8].join(",");
        let body = format!(r#"{{"type":"track","properties":{{"n":[{numbers}]}}}}"#);
        assert!(body.len() <= MAX_EVENT_BYTES);
        let refused = single(body.as_bytes(), None, "t").unwrap_err();
        assert!(refused.contains("once completed"), "{refused}");
        let near = format!(
            r#"{{"type":"track","properties":{{"pad":"{}"}}}}"#,
            "x".repeat(MAX_EVENT_BYTES - 200)
        );
        assert!(
            single(near.as_bytes(), None, "2026-12-03T00:00:00.000Z")
                .unwrap()
                .text
                .len()
                <= MAX_EVENT_BYTES
        );
    }
}
