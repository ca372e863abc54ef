//! The operator's plugin controls: upload a new version of a destination
//! (`PUT /admin/plugins/{destination}`, the component as the body), list
//! the active and previous versions (`GET /admin/plugins`), and roll back
//! (`POST /admin/plugins/{destination}/rollback`). Authenticated by the
//! admin token as a bearer token; without a configured token the admin API
//! is off. A refused candidate leaves the active version serving untouched.

use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Shared;
use plugin_runtime::Loaded;

pub async fn upload(
    State(shared): State<Arc<Shared>>,
    Path(destination): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let slot = shared.delivery.slot().clone();
    if destination != slot.name() {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no destination {destination:?} here (serving {:?})", slot.name())}),
        );
    }
    let started = Instant::now();
    let source = format!("the uploaded {destination} plugin ({} bytes)", body.len());
    // Compiling and the canary take a while: never on the async workers.
    let swapped = tokio::task::spawn_blocking(move || slot.swap_in(&body, &source)).await;
    match swapped {
        Ok(Ok(loaded)) => {
            tracing::info!(plugin = %loaded.plugin, took = ?started.elapsed(), "swapped in a new plugin version");
            answer(
                StatusCode::OK,
                json!({"active": describe(&loaded), "swap_ms": started.elapsed().as_millis() as u64}),
            )
        }
        Ok(Err(refused)) => {
            tracing::warn!(%refused, "refused a plugin candidate; the active version keeps serving");
            answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": refused.to_string()}))
        }
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": format!("the swap task failed: {e}")}),
        ),
    }
}

pub async fn list(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let slot = shared.delivery.slot();
    answer(
        StatusCode::OK,
        json!({"destinations": [{
            "name": slot.name(),
            "active": describe(&slot.current()),
            "previous": slot.previous().map(|p| describe(&p)),
        }]}),
    )
}

pub async fn rollback(
    State(shared): State<Arc<Shared>>,
    Path(destination): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let slot = shared.delivery.slot();
    if destination != slot.name() {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no destination {destination:?} here")}),
        );
    }
    match slot.rollback() {
        Ok(loaded) => {
            tracing::info!(plugin = %loaded.plugin, "rolled back");
            answer(StatusCode::OK, json!({"active": describe(&loaded)}))
        }
        Err(e) => answer(StatusCode::CONFLICT, json!({"error": e.to_string()})),
    }
}

fn describe(loaded: &Loaded) -> Value {
    let plugin = &loaded.plugin;
    json!({
        "name": plugin.manifest().name,
        "version": plugin.manifest().version,
        "interface": plugin.interface(),
        "sha256": plugin.sha256_hex(),
        "loaded_at_unix_ms": loaded.loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "events_mapped": loaded.events_mapped.load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &shared.admin_token else {
        return Err(Box::new(answer(
            StatusCode::NOT_FOUND,
            json!({"error": "the admin API is off: start serve with an admin token"}),
        )));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if super::constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err(Box::new(answer(
            StatusCode::UNAUTHORIZED,
            json!({"error": "the admin token is required as a bearer token"}),
        ))),
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}
