//! The operator's controls, authenticated by the admin token as a bearer
//! token (without a configured token the admin API is off):
//!
//! - plugin versions: `PUT /admin/plugins` stores a version (the component
//!   as the body) by SHA-256 without serving it; `GET /admin/plugins`
//!   lists the versions serving and stored; `PUT /admin/plugins/{name}`
//!   stores a version and rolls it to every connection of that
//!   destination, `POST /admin/plugins/{name}/rollback` rolls them all
//!   back;
//! - connections: `GET|POST /admin/connections`, `GET|PATCH|DELETE
//!   /admin/connections/{id}`, `POST …/{id}/pause`, `…/resume`,
//!   `…/plugin` (`{"sha256": …}`: a canary on one connection) and
//!   `…/rollback`.
//!
//! A refused candidate leaves the version serving untouched. Answers are
//! JSON; errors say what was wrong.

use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Shared;
use super::connections::{ConnState, NewConnection};
use plugin_runtime::{Loaded, Plugin};

/// Stores a version and rolls it to every connection serving `destination`
/// (every connection, when none is named) that is not on it already; the
/// version, and the connections swapped. Each connection's canary runs with
/// its own settings; the first refusal stops the roll-out.
pub(super) async fn roll_out(
    shared: &Arc<Shared>,
    destination: Option<&str>,
    bytes: Vec<u8>,
    source: String,
) -> Result<(Arc<Plugin>, Vec<String>), String> {
    let this = shared.clone();
    let plugin = tokio::task::spawn_blocking(move || this.connections.store.add(&bytes, &source))
        .await
        .map_err(|e| format!("the load task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let mut swapped = Vec::new();
    for connection in shared.connections.all() {
        let current = connection.slot.current();
        let serves = destination.is_none_or(|d| d == connection.slot.name());
        if !serves || current.plugin.sha256_hex() == plugin.sha256_hex() {
            continue;
        }
        if let Err(e) = shared.connections.swap(&connection.id, plugin.clone()).await {
            let done = if swapped.is_empty() {
                String::new()
            } else {
                format!(" (already swapped: {})", swapped.join(", "))
            };
            return Err(format!("connection {}: {e:#}{done}", connection.id));
        }
        swapped.push(connection.id.clone());
    }
    shared.announce(&swapped).await;
    Ok((plugin, swapped))
}

pub async fn upload(
    State(shared): State<Arc<Shared>>,
    Path(destination): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    if !shared.connections.all().iter().any(|c| c.slot.name() == destination) {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no connection serves destination {destination:?}")}),
        );
    }
    let started = Instant::now();
    let source = format!("the uploaded {destination} plugin ({} bytes)", body.len());
    match roll_out(&shared, Some(&destination), body.to_vec(), source).await {
        Ok((plugin, swapped)) => {
            tracing::info!(%plugin, connections = swapped.len(), took = ?started.elapsed(), "swapped in a new plugin version");
            let first = shared
                .connections
                .all()
                .into_iter()
                .find(|c| c.slot.name() == destination);
            answer(
                StatusCode::OK,
                json!({
                    "active": first.map(|c| describe(&c.slot.current())),
                    "connections": swapped,
                    "swap_ms": started.elapsed().as_millis() as u64,
                }),
            )
        }
        Err(refused) => {
            tracing::warn!(%refused, "refused a plugin candidate; the active version keeps serving");
            answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": refused}))
        }
    }
}

/// Stores a version without serving it; a connection is then swapped to it
/// by its SHA-256.
pub async fn store_plugin(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let this = shared.clone();
    let source = format!("the uploaded plugin ({} bytes)", body.len());
    match tokio::task::spawn_blocking(move || this.connections.store.add(&body, &source)).await {
        Ok(Ok(plugin)) => answer(StatusCode::OK, json!({"stored": version(&plugin)})),
        Ok(Err(refused)) => answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": refused.to_string()})),
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": format!("the load task failed: {e}")}),
        ),
    }
}

pub async fn list(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    // Per destination, as its first connection serves it (the flags' one
    // when there is one); each connection's own in /admin/connections.
    let mut destinations: Vec<Value> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut all = shared.connections.all();
    all.sort_by_key(|c| !c.from_flags);
    for connection in all {
        if seen.insert(connection.slot.name().to_string()) {
            destinations.push(json!({
                "name": connection.slot.name(),
                "active": describe(&connection.slot.current()),
                "previous": connection.slot.previous().map(|p| describe(&p)),
            }));
        }
    }
    let stored: Vec<Value> = shared.connections.store.loaded().iter().map(|p| version(p)).collect();
    answer(StatusCode::OK, json!({"destinations": destinations, "stored": stored}))
}

pub async fn rollback(
    State(shared): State<Arc<Shared>>,
    Path(destination): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let serving: Vec<_> = shared
        .connections
        .all()
        .into_iter()
        .filter(|c| c.slot.name() == destination)
        .collect();
    if serving.is_empty() {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no destination {destination:?} here")}),
        );
    }
    let mut active = None;
    for connection in serving {
        match shared.connections.rollback(&connection.id).await {
            Ok(loaded) => {
                tracing::info!(connection = %connection.id, plugin = %loaded.plugin, "rolled back");
                shared.announce(std::slice::from_ref(&connection.id)).await;
                active.get_or_insert(loaded);
            }
            Err(e) => {
                return answer(
                    StatusCode::CONFLICT,
                    json!({"error": format!("connection {}: {e:#}", connection.id)}),
                );
            }
        }
    }
    answer(StatusCode::OK, json!({"active": active.map(|a| describe(&a))}))
}

pub async fn connections(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let counts = counts(&shared).await;
    let listed: Vec<Value> = shared
        .connections
        .all()
        .iter()
        .map(|c| shared.connections.describe(c, counts.get(&c.id)))
        .collect();
    answer(StatusCode::OK, json!({"connections": listed}))
}

pub async fn connection(State(shared): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let Some(connection) = shared.connections.get(&id) else {
        return no_connection(&id);
    };
    let counts = counts(&shared).await;
    answer(
        StatusCode::OK,
        shared.connections.describe(&connection, counts.get(&id)),
    )
}

pub async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = authorize(&shared, &headers) {
        return *denied;
    }
    let new: NewConnection = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("the connection: {e}")}),
            );
        }
    };
    let plugin = match &new.plugin {
        None => None,
        Some(sha) => match stored(&shared, sha).await {
            Ok(plugin) => Some(plugin),
            Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": format!("plugin: {e:#}")})),
        },
    };
    let serving = plugin.clone().unwrap_or_else(|| shared.connections.default_plugin());
    let approved = shared
        .connections
        .check_approved(&new.id, new.base_url.as_ref(), &serving)
        .and_then(|()| shared.connections.check_secret_sources(&new.id, &new.settings));
    if let Err(e) = approved {
        return answer(StatusCode::FORBIDDEN, json!({"error": format!("{e:#}")}));
    }
    match shared.connections.create(new, plugin).await {
        Ok(connection) => {
            tracing::info!(connection = %connection.id, "created");
            shared.announce(std::slice::from_ref(&connection.id)).await;
            shared.ensure_running(&connection);
            answer(StatusCode::CREATED, shared.connections.describe(&connection, None))
        }
        Err(e) => answer(StatusCode::BAD_REQUEST, json!({"error": format!("{e:#}")})),
    }
}

pub async fn update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = known(&shared, &headers, &id) {
        return *denied;
    }
    let change: Value = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": format!("the change: {e}")})),
    };
    if let Some(settings) = change.get("settings").and_then(Value::as_object)
        && let Err(e) = shared.connections.check_secret_sources(&id, settings)
    {
        return answer(StatusCode::FORBIDDEN, json!({"error": format!("{e:#}")}));
    }
    match shared.connections.update(&id, &change).await {
        Ok(connection) => {
            tracing::info!(connection = %id, "updated");
            shared.announce(std::slice::from_ref(&id)).await;
            answer(StatusCode::OK, shared.connections.describe(&connection, None))
        }
        Err(e) => answer(StatusCode::BAD_REQUEST, json!({"error": format!("{e:#}")})),
    }
}

pub async fn pause(State(shared): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    set_state(shared, id, headers, ConnState::Paused).await
}

pub async fn resume(State(shared): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    set_state(shared, id, headers, ConnState::Active).await
}

async fn set_state(shared: Arc<Shared>, id: String, headers: HeaderMap, state: ConnState) -> Response {
    if let Err(denied) = known(&shared, &headers, &id) {
        return *denied;
    }
    match shared.connections.set_state(&id, state).await {
        Ok(connection) => {
            tracing::info!(connection = %id, state = state.as_str(), "state changed");
            shared.announce(std::slice::from_ref(&id)).await;
            shared.ensure_running(&connection);
            answer(StatusCode::OK, json!({"id": id, "state": state.as_str()}))
        }
        Err(e) => answer(StatusCode::CONFLICT, json!({"error": format!("{e:#}")})),
    }
}

pub async fn delete(State(shared): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(denied) = known(&shared, &headers, &id) {
        return *denied;
    }
    match shared.connections.delete(&id).await {
        Ok(connection) => {
            tracing::info!(connection = %id, "draining before deletion");
            if let Some(log) = &shared.stream
                && let Err(e) = super::stream::connections::announce_deleted(log, &id).await
            {
                tracing::error!(connection = %id, "announcing the deletion to the other hosts: {e:#}");
            }
            shared.ensure_running(&connection);
            answer(
                StatusCode::ACCEPTED,
                json!({"id": id, "state": "draining", "note": "deleted once its pending events are finished"}),
            )
        }
        Err(e) => answer(StatusCode::CONFLICT, json!({"error": format!("{e:#}")})),
    }
}

/// A canary: one connection to a stored version, `{"sha256": "…"}`.
pub async fn swap(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = known(&shared, &headers, &id) {
        return *denied;
    }
    let sha = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => match o.get("sha256").and_then(Value::as_str) {
            Some(sha) => sha.to_string(),
            None => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "sha256 (a stored version) is required"}),
                );
            }
        },
        _ => {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": "the body must be {\"sha256\": \"…\"}"}),
            );
        }
    };
    let plugin = match stored(&shared, &sha).await {
        Ok(plugin) => plugin,
        Err(e) => return answer(StatusCode::NOT_FOUND, json!({"error": format!("{e:#}")})),
    };
    let started = Instant::now();
    match shared.connections.swap(&id, plugin).await {
        Ok(loaded) => {
            tracing::info!(connection = %id, plugin = %loaded.plugin, "swapped");
            shared.announce(std::slice::from_ref(&id)).await;
            answer(
                StatusCode::OK,
                json!({"id": id, "active": describe(&loaded), "swap_ms": started.elapsed().as_millis() as u64}),
            )
        }
        Err(e) => answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": format!("{e:#}")})),
    }
}

pub async fn rollback_one(State(shared): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(denied) = known(&shared, &headers, &id) {
        return *denied;
    }
    match shared.connections.rollback(&id).await {
        Ok(loaded) => {
            shared.announce(std::slice::from_ref(&id)).await;
            answer(StatusCode::OK, json!({"id": id, "active": describe(&loaded)}))
        }
        Err(e) => answer(StatusCode::CONFLICT, json!({"error": format!("{e:#}")})),
    }
}

/// Each connection's events in the spool, by state (none if it cannot say).
async fn counts(shared: &Arc<Shared>) -> std::collections::BTreeMap<String, crate::spool::Counts> {
    let spool = shared.spool.clone();
    tokio::task::spawn_blocking(move || spool.counts())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// A stored plugin version by SHA-256 (loaded, or loaded from the spool).
async fn stored(shared: &Arc<Shared>, sha256: &str) -> anyhow::Result<Arc<Plugin>> {
    let (this, sha256) = (shared.clone(), sha256.to_string());
    tokio::task::spawn_blocking(move || this.connections.store.get(&sha256)).await?
}

/// The caller may use the admin API, and the connection exists.
fn known(shared: &Shared, headers: &HeaderMap, id: &str) -> Result<(), Box<Response>> {
    authorize(shared, headers)?;
    match shared.connections.get(id) {
        Some(_) => Ok(()),
        None => Err(Box::new(no_connection(id))),
    }
}

fn no_connection(id: &str) -> Response {
    answer(StatusCode::NOT_FOUND, json!({"error": format!("no connection {id:?}")}))
}

fn version(plugin: &Plugin) -> Value {
    json!({
        "name": plugin.manifest().name,
        "version": plugin.manifest().version,
        "interface": plugin.interface(),
        "sha256": plugin.sha256_hex(),
    })
}

pub(super) fn describe(loaded: &Loaded) -> Value {
    let mut described = version(&loaded.plugin);
    described["loaded_at_unix_ms"] = json!(
        loaded
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    );
    described["events_mapped"] = json!(loaded.events_mapped.load(std::sync::atomic::Ordering::Relaxed));
    described
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
