//! The ingest parsers on any bytes, as `serve` calls them: the body decoded
//! from gzip, deflate or nothing within its limit, the write key found, and
//! one s2s or Segment event or a Segment batch checked and completed. Never
//! a panic; whatever is accepted is an event object with its `messageId`,
//! `receivedAt` and any `writeKey` masked, each within the event limit.
//! The first byte picks the encoding and the endpoint; an `Authorization`
//! header is the text up to the first newline of the rest.

#![no_main]

use cdp_service::serve::wire::{self, MAX_BATCH_BYTES, MAX_EVENT_BYTES, Received};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Small limits let the fuzzer reach the "decodes past the limit" paths.
const SMALL_LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (authorization, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(end) => (std::str::from_utf8(&rest[..end]).ok(), &rest[end + 1..]),
        None => (None, rest),
    };
    let encoding = [None, Some("gzip"), Some("deflate"), Some("identity")][usize::from(selector & 3)];
    let limit = if selector & 4 == 0 { SMALL_LIMIT } else { MAX_EVENT_BYTES };
    let Ok(decoded) = wire::decode(encoding, body, limit) else { return };
    assert!(decoded.len() <= limit, "decoded past the limit");
    let _ = wire::segment_key(authorization, &decoded);
    let received_at = "2026-12-02T00:00:00.000Z";
    match (selector >> 3) % 3 {
        0 => {
            if let Ok(event) = wire::batch(&decoded, received_at) {
                assert!(decoded.len() <= MAX_BATCH_BYTES);
                event.iter().for_each(check);
            }
        }
        1 => {
            if let Ok(event) = wire::single(&decoded, Some("track"), received_at) {
                check(&event);
                assert_eq!(parse(&event)["type"], "track", "the path's type wins");
            }
        }
        _ => {
            if let Ok(event) = wire::single(&decoded, None, received_at) {
                check(&event);
            }
        }
    }
});

fn parse(event: &Received) -> Value {
    serde_json::from_str(&event.text).expect("a stored event is JSON")
}

fn check(event: &Received) {
    let value = parse(event);
    let object = value.as_object().expect("a stored event is an object");
    let id = match &object["messageId"] {
        Value::String(id) => id.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("messageId {other} is neither a string nor a number"),
    };
    assert_eq!(id, event.message_id);
    assert!(!event.message_id.is_empty());
    assert_eq!(object["receivedAt"], event.received_at.as_str());
    if let Some(key) = object.get("writeKey") {
        assert_eq!(key, "***", "a write key was stored");
    }
}
