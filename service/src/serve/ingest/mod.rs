//! Ingest, as Chord (Jitsu) and Segment senders speak it: the server-to-
//! server API `POST /api/s/s2s/{type}` with `X-Write-Key`, and Segment's
//! `POST /v1/batch` and `/v1/{type}`, for each of the six types in `KINDS`,
//! with the write key where Segment's HTTP API takes it: the basic-auth
//! user, the basic-auth password under an empty user, or `writeKey` in the
//! body. Bodies may be gzip- or deflate-encoded, as Segment's libraries
//! send them; the size limits apply to the decoded bytes, so a small
//! compressed body cannot expand past them. An event is acknowledged (200) only once it is
//! committed to the spool; a request with any bad event stores nothing.

pub mod wire;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

mod limit;

pub use limit::KeyLimits;

use super::Shared;
use super::connections::Connection;
use crate::spool::NewEvent;
pub use wire::MAX_BATCH_BYTES;
use wire::{KINDS, MAX_EVENT_BYTES, Received, Refused};

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
    let key = header(&headers, "x-write-key");
    let targets = routed(&shared, key);
    if targets.is_empty() {
        return unauthorized("a valid X-Write-Key header is required");
    }
    let key_hash = super::connections::key_hash(key.unwrap_or_default());
    if let Err(over) = over_rate(&shared, &key_hash, 0) {
        return *over;
    }
    let body = match wire::decode(header(&headers, "content-encoding"), &body, MAX_EVENT_BYTES) {
        Ok(body) => body,
        Err(refused) => return refusal(refused),
    };
    match wire::single(&body, Some(&kind), &now()) {
        Ok(event) => store(&shared, &key_hash, &targets, vec![event]).await,
        Err(message) => problem(StatusCode::BAD_REQUEST, message),
    }
}

pub async fn segment_single(
    State(shared): State<Arc<Shared>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !KINDS.contains(&kind.as_str()) {
        return problem(StatusCode::NOT_FOUND, format!("unknown endpoint /v1/{kind}"));
    }
    let Routed {
        targets,
        body,
        key_hash,
    } = match segment_routed(&shared, &headers, &body, MAX_EVENT_BYTES) {
        Ok(routed) => routed,
        Err(response) => return *response,
    };
    match wire::single(&body, Some(&kind), &now()) {
        Ok(event) => store(&shared, &key_hash, &targets, vec![event]).await,
        Err(message) => problem(StatusCode::BAD_REQUEST, message),
    }
}

pub async fn segment_batch(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let Routed {
        targets,
        body,
        key_hash,
    } = match segment_routed(&shared, &headers, &body, MAX_BATCH_BYTES) {
        Ok(routed) => routed,
        Err(response) => return *response,
    };
    match wire::batch(&body, &now()) {
        Ok(events) => store(&shared, &key_hash, &targets, events).await,
        Err(message) => problem(StatusCode::BAD_REQUEST, message),
    }
}

/// The connections a Segment request's write key feeds, and its body
/// decoded. A key in the `Authorization` header is checked before the body
/// is inflated or read, so a request without a valid key costs no more
/// than its headers; only a key sent in the body needs the body decoded
/// first.
fn segment_routed<'b>(
    shared: &Shared,
    headers: &HeaderMap,
    body: &'b [u8],
    limit: usize,
) -> Result<Routed<'b>, Box<Response>> {
    let in_header = wire::header_key(header(headers, "authorization"));
    if let Some(key) = &in_header {
        if routed(shared, Some(key)).is_empty() {
            return Err(Box::new(unauthorized(SEGMENT_KEY_NEEDED)));
        }
        over_rate(shared, &super::connections::key_hash(key), 0)?;
    }
    let body = wire::decode(header(headers, "content-encoding"), body, limit).map_err(|r| Box::new(refusal(r)))?;
    let key = in_header.or_else(|| wire::body_key(&body));
    let targets = routed(shared, key.as_deref());
    if targets.is_empty() {
        return Err(Box::new(unauthorized(SEGMENT_KEY_NEEDED)));
    }
    let key_hash = super::connections::key_hash(key.as_deref().unwrap_or_default());
    Ok(Routed {
        targets,
        body,
        key_hash,
    })
}

/// A request's connections, its decoded body, and its key's hash.
struct Routed<'b> {
    targets: Vec<Arc<Connection>>,
    body: std::borrow::Cow<'b, [u8]>,
    key_hash: String,
}

/// A 429 with `Retry-After` if the key has not `events` left in its rate
/// now (0: whether it has any at all, before its body is read).
fn over_rate(shared: &Shared, key_hash: &str, events: usize) -> Result<(), Box<Response>> {
    let Some(limits) = &shared.key_limits else {
        return Ok(());
    };
    limits.take(key_hash, events).map_err(|after| {
        let mut response = problem(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this write key is over its rate of {} events a second; nothing was stored, send again in {after} s",
                limits.per_second()
            ),
        );
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(after));
        Box::new(response)
    })
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The connections a write key feeds (none: the key is not valid here).
fn routed(shared: &Shared, key: Option<&str>) -> Vec<Arc<Connection>> {
    match key.filter(|k| !k.is_empty()) {
        Some(key) => shared.connections.route(key),
        None => Vec::new(),
    }
}

/// Stores each event once per connection its key feeds, in one
/// transaction, and only then answers 200.
async fn store(shared: &Arc<Shared>, key_hash: &str, targets: &[Arc<Connection>], events: Vec<Received>) -> Response {
    if shared.draining() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is shutting down; send again later".to_string(),
        );
    }
    if let Some(why) = shared.log.refuses_ingest() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, why.to_string());
    }
    if let Err(over) = over_rate(shared, key_hash, events.len()) {
        return *over;
    }
    let count = events.len();
    let row = |target: &Connection, event: &Received, body: String| NewEvent {
        connection: target.id.clone(),
        message_id: Some(event.message_id.clone()),
        received_at: event.received_at.clone(),
        body,
        person: event.person.clone(),
    };
    // A copy of each event per connection its key feeds; the last one
    // takes the texts themselves.
    let (last, others) = targets.split_last().expect("a routed key has a connection");
    let mut rows = Vec::with_capacity(count * targets.len());
    for target in others {
        rows.extend(events.iter().map(|e| row(target, e, e.text.clone())));
    }
    for mut event in events {
        let text = std::mem::take(&mut event.text);
        rows.push(row(last, &event, text));
    }
    match shared.log.append(rows).await {
        Ok(()) => {
            for target in targets {
                shared.ensure_running(target);
            }
            stored_ok(shared, targets, count)
        }
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

/// The 200 for `count` events stored for each of `targets`, counted.
fn stored_ok(shared: &Shared, targets: &[Arc<Connection>], count: usize) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    shared.metrics.received.fetch_add(count as u64, Relaxed);
    for target in targets {
        target.metrics.received.fetch_add(count as u64, Relaxed);
    }
    (StatusCode::OK, axum::Json(json!({ "ok": true, "stored": count }))).into_response()
}

const SEGMENT_KEY_NEEDED: &str = "a valid write key is required: the basic-auth user name (or password, with an empty user), or `writeKey` in the body";

fn refusal(refused: Refused) -> Response {
    match refused {
        Refused::BadRequest(message) => problem(StatusCode::BAD_REQUEST, message),
        Refused::UnsupportedEncoding(message) => problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, message),
    }
}

fn unauthorized(message: &str) -> Response {
    problem(StatusCode::UNAUTHORIZED, message.to_string())
}

fn problem(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "ok": false, "error": message }))).into_response()
}
