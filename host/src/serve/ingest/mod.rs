//! Ingest, as Chord (Jitsu) and Segment senders speak it: the server-to-
//! server API `POST /api/s/s2s/{type}` with `X-Write-Key`, and Segment's
//! `POST /v1/batch` and `/v1/{type}`, for each of the six types in `KINDS`,
//! with the write key where Segment's HTTP API takes it: the basic-auth
//! user, the basic-auth password under an empty user, or `writeKey` in the
//! body. Bodies may be gzip- or deflate-encoded, as Segment's libraries
//! send them; the size limits apply to the decoded bytes, so a small
//! compressed body cannot expand past them. An event is acknowledged (200) only once it is
//! committed to the spool; a request with any bad event stores nothing.

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::Shared;

/// The largest event accepted.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// The largest batch request accepted.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

const KINDS: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

pub async fn s2s(
    State(shared): State<Arc<Shared>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !KINDS.contains(&kind.as_str()) {
        return problem(
            StatusCode::NOT_FOUND,
            format!("unknown event type {kind:?}; expected one of {}", KINDS.join(", ")),
        );
    }
    let key = headers.get("x-write-key").and_then(|v| v.to_str().ok());
    if !shared.write_key_ok(key) {
        return unauthorized("a valid X-Write-Key header is required");
    }
    let body = match decoded(&headers, &body, MAX_EVENT_BYTES) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    match single(&body, Some(&kind)) {
        Ok(event) => store(&shared, vec![event]).await,
        Err(message) => problem(StatusCode::BAD_REQUEST, message),
    }
}

pub async fn segment_single(
    State(shared): State<Arc<Shared>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !["track", "identify", "page", "screen", "group", "alias"].contains(&kind.as_str()) {
        return problem(StatusCode::NOT_FOUND, format!("unknown endpoint /v1/{kind}"));
    }
    let body = match decoded(&headers, &body, MAX_EVENT_BYTES) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    if !shared.write_key_ok(segment_key(&headers, &body).as_deref()) {
        return unauthorized(SEGMENT_KEY_NEEDED);
    }
    match single(&body, Some(&kind)) {
        Ok(event) => store(&shared, vec![event]).await,
        Err(message) => problem(StatusCode::BAD_REQUEST, message),
    }
}

pub async fn segment_batch(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let body = match decoded(&headers, &body, MAX_BATCH_BYTES) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    if !shared.write_key_ok(segment_key(&headers, &body).as_deref()) {
        return unauthorized(SEGMENT_KEY_NEEDED);
    }
    if body.len() > MAX_BATCH_BYTES {
        return problem(
            StatusCode::BAD_REQUEST,
            format!(
                "the batch is {} bytes, over the {MAX_BATCH_BYTES} byte limit",
                body.len()
            ),
        );
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}")),
    };
    let Some(items) = value.get("batch").and_then(Value::as_array) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "the body must be an object with a `batch` array of events".to_string(),
        );
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let mut item = item.clone();
        if let Some(event) = item.as_object_mut() {
            mask_write_key(event);
        }
        let text = item.to_string();
        match single(text.as_bytes(), None) {
            Ok(event) => events.push(event),
            Err(message) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    format!("batch[{i}]: {message}; nothing was stored"),
                );
            }
        }
    }
    store(&shared, events).await
}

/// One event checked and completed: (messageId, receivedAt, JSON text).
fn single(body: &[u8], kind: Option<&str>) -> Result<(Option<String>, String, String), String> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "the event is {} bytes, over the {MAX_EVENT_BYTES} byte limit",
            body.len()
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let Value::Object(mut event) = value else {
        return Err(format!(
            "the body must be a JSON object (an event), not a JSON {}",
            crate::mapping::kind_of(&value)
        ));
    };
    if let Some(kind) = kind {
        event.insert("type".into(), json!(kind));
    }
    mask_write_key(&mut event);
    let received_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    event.insert("receivedAt".into(), json!(received_at));
    let message_id = message_id(&mut event);
    Ok((Some(message_id), received_at, Value::Object(event).to_string()))
}

/// The event's `messageId`, filled in when absent so a retried delivery
/// keeps one idempotency key.
fn message_id(event: &mut Map<String, Value>) -> String {
    match event.get("messageId") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            event.insert("messageId".into(), json!(id));
            id
        }
    }
}

async fn store(shared: &Arc<Shared>, events: Vec<(Option<String>, String, String)>) -> Response {
    if shared.draining() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is shutting down; send again later".to_string(),
        );
    }
    let count = events.len();
    let spool = shared.spool.clone();
    let stored = tokio::task::spawn_blocking(move || spool.append(&events)).await;
    match stored {
        Ok(Ok(())) => {
            shared
                .metrics
                .received
                .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
            shared.wake_feeder.notify_one();
            (StatusCode::OK, axum::Json(json!({ "ok": true, "stored": count }))).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!("the spool could not store {count} events: {e:#}");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the spool cannot store events right now ({e}); nothing was stored, send again later"),
            )
        }
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, format!("storing failed: {e}")),
    }
}

const SEGMENT_KEY_NEEDED: &str = "a valid write key is required: the basic-auth user name (or password, with an empty user), or `writeKey` in the body";

/// The write key of a Segment request: the basic-auth user, else its
/// password when the user is empty, else the body's `writeKey`.
fn segment_key(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    if let Some((user, password)) = basic_credentials(headers) {
        let key = if user.is_empty() { password } else { user };
        if !key.is_empty() {
            return Some(key);
        }
    }
    #[derive(serde::Deserialize)]
    struct WithKey {
        #[serde(rename = "writeKey")]
        write_key: Option<String>,
    }
    serde_json::from_slice::<WithKey>(body).ok()?.write_key
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':').unwrap_or((&text, ""));
    Some((user.to_string(), password.to_string()))
}

/// A write key sent inside an event is a secret: it is not kept.
fn mask_write_key(event: &mut Map<String, Value>) {
    if event.contains_key("writeKey") {
        event.insert("writeKey".into(), json!("***"));
    }
}

/// The body, decoded from its `Content-Encoding`, and refused with a 400
/// once its decoded size passes `limit` (a zip bomb is cut off there, not
/// decoded whole), or with a 415 for an encoding this service does not
/// read.
fn decoded<'a>(headers: &HeaderMap, body: &'a [u8], limit: usize) -> Result<Cow<'a, [u8]>, Box<Response>> {
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let mut out = Vec::new();
    let read = match encoding.as_str() {
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
            return Err(Box::new(problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {other:?} is not supported; send gzip, deflate or none"),
            )));
        }
    };
    match read {
        Ok(_) if out.len() > limit => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!("the body decodes to more than the {limit} byte limit; nothing was stored"),
        ))),
        Ok(_) => Ok(Cow::Owned(out)),
        Err(e) => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid {encoding} data: {e}; nothing was stored"),
        ))),
    }
}

fn unauthorized(message: &str) -> Response {
    problem(StatusCode::UNAUTHORIZED, message.to_string())
}

fn problem(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "ok": false, "error": message }))).into_response()
}
