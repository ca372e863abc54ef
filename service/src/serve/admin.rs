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
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Shared;
use super::connections::{ConnState, Connection, NewConnection, describe, version};
use plugin_runtime::Plugin;

/// Proof that the caller holds the admin token. Every handler takes one,
/// so none can forget to check.
pub struct Admin;

impl FromRequestParts<Arc<Shared>> for Admin {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Admin, AdminError> {
        authorize(shared, &parts.headers).map(|()| Admin)
    }
}

/// Why an admin call failed: each cause answered with one status code,
/// whichever handler met it.
#[derive(Debug)]
pub enum AdminError {
    /// No admin token was configured: the API is off (404).
    Off,
    /// The bearer token is missing or wrong (401).
    Unauthorized,
    /// No such connection, version or destination (404).
    NotFound(String),
    /// The request itself is malformed or invalid (400).
    BadRequest(String),
    /// Not allowed by the operator's policy: a base URL or secret source
    /// not approved (403).
    Forbidden(String),
    /// Not possible in the connection's state now (409).
    Conflict(String),
    /// A plugin candidate refused by its checks or its canary (422).
    Refused(String),
    /// The host could not do it: storage failed, a task died (500).
    Internal(String),
}

impl AdminError {
    /// A failed change, as `otherwise` unless the cause is the host's own
    /// (the spool could not write): then a 500, not the caller's fault.
    fn of(e: anyhow::Error, otherwise: fn(String) -> AdminError) -> AdminError {
        let text = format!("{e:#}");
        let storage = e
            .chain()
            .any(|cause| cause.is::<rusqlite::Error>() || cause.is::<std::io::Error>());
        if storage {
            tracing::error!("an admin change failed in storage: {text}");
            AdminError::Internal(text)
        } else {
            otherwise(text)
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            AdminError::Off => (
                StatusCode::NOT_FOUND,
                "the admin API is off: start serve with an admin token".to_string(),
            ),
            AdminError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "the admin token is required as a bearer token".to_string(),
            ),
            AdminError::NotFound(e) => (StatusCode::NOT_FOUND, e),
            AdminError::BadRequest(e) => (StatusCode::BAD_REQUEST, e),
            AdminError::Forbidden(e) => (StatusCode::FORBIDDEN, e),
            AdminError::Conflict(e) => (StatusCode::CONFLICT, e),
            AdminError::Refused(e) => (StatusCode::UNPROCESSABLE_ENTITY, e),
            AdminError::Internal(e) => (StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        answer(status, json!({ "error": error }))
    }
}

type Answer = Result<Response, AdminError>;

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
    _: Admin,
    State(shared): State<Arc<Shared>>,
    Path(destination): Path<String>,
    body: Bytes,
) -> Answer {
    if !shared.connections.all().iter().any(|c| c.slot.name() == destination) {
        return Err(AdminError::NotFound(format!(
            "no connection serves destination {destination:?}"
        )));
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
            Ok(answer(
                StatusCode::OK,
                json!({
                    "active": first.map(|c| describe(&c.slot.current())),
                    "connections": swapped,
                    "swap_ms": started.elapsed().as_millis() as u64,
                }),
            ))
        }
        Err(refused) => {
            tracing::warn!(%refused, "refused a plugin candidate; the active version keeps serving");
            Err(AdminError::Refused(refused))
        }
    }
}

/// Stores a version without serving it; a connection is then swapped to it
/// by its SHA-256.
pub async fn store_plugin(_: Admin, State(shared): State<Arc<Shared>>, body: Bytes) -> Answer {
    let this = shared.clone();
    let source = format!("the uploaded plugin ({} bytes)", body.len());
    match tokio::task::spawn_blocking(move || this.connections.store.add(&body, &source)).await {
        Ok(Ok(plugin)) => Ok(answer(StatusCode::OK, json!({"stored": version(&plugin)}))),
        Ok(Err(refused)) => Err(AdminError::Refused(refused.to_string())),
        Err(e) => Err(AdminError::Internal(format!("the load task failed: {e}"))),
    }
}

pub async fn list(_: Admin, State(shared): State<Arc<Shared>>) -> Response {
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

pub async fn rollback(_: Admin, State(shared): State<Arc<Shared>>, Path(destination): Path<String>) -> Answer {
    let serving: Vec<_> = shared
        .connections
        .all()
        .into_iter()
        .filter(|c| c.slot.name() == destination)
        .collect();
    if serving.is_empty() {
        return Err(AdminError::NotFound(format!("no destination {destination:?} here")));
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
                return Err(AdminError::of(
                    e.context(format!("connection {}", connection.id)),
                    AdminError::Conflict,
                ));
            }
        }
    }
    Ok(answer(StatusCode::OK, json!({"active": active.map(|a| describe(&a))})))
}

pub async fn connections(_: Admin, State(shared): State<Arc<Shared>>) -> Response {
    let counts = counts(&shared).await;
    let listed: Vec<Value> = shared
        .connections
        .all()
        .iter()
        .map(|c| shared.connections.describe(c, counts.get(&c.id)))
        .collect();
    answer(StatusCode::OK, json!({"connections": listed}))
}

pub async fn connection(_: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    let connection = known(&shared, &id)?;
    let counts = counts(&shared).await;
    Ok(answer(
        StatusCode::OK,
        shared.connections.describe(&connection, counts.get(&id)),
    ))
}

pub async fn create(_: Admin, State(shared): State<Arc<Shared>>, body: Bytes) -> Answer {
    let new: NewConnection =
        serde_json::from_slice(&body).map_err(|e| AdminError::BadRequest(format!("the connection: {e}")))?;
    let plugin = match &new.plugin {
        None => None,
        Some(sha) => Some(
            stored(&shared, sha)
                .await
                .map_err(|e| AdminError::of(e.context("plugin"), AdminError::BadRequest))?,
        ),
    };
    let serving = plugin.clone().unwrap_or_else(|| shared.connections.default_plugin());
    let approved = shared
        .connections
        .check_approved(&new.id, new.base_url.as_ref(), &serving)
        .and_then(|()| shared.connections.check_secret_sources(&new.id, &new.settings));
    approved.map_err(|e| AdminError::Forbidden(format!("{e:#}")))?;
    let connection = shared
        .connections
        .create(new, plugin)
        .await
        .map_err(|e| AdminError::of(e, AdminError::BadRequest))?;
    tracing::info!(connection = %connection.id, "created");
    shared.announce(std::slice::from_ref(&connection.id)).await;
    shared.ensure_running(&connection);
    Ok(answer(
        StatusCode::CREATED,
        shared.connections.describe(&connection, None),
    ))
}

pub async fn update(_: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>, body: Bytes) -> Answer {
    known(&shared, &id)?;
    let change: Value =
        serde_json::from_slice(&body).map_err(|e| AdminError::BadRequest(format!("the change: {e}")))?;
    if let Some(settings) = change.get("settings").and_then(Value::as_object) {
        shared
            .connections
            .check_secret_sources(&id, settings)
            .map_err(|e| AdminError::Forbidden(format!("{e:#}")))?;
    }
    let connection = shared
        .connections
        .update(&id, &change)
        .await
        .map_err(|e| AdminError::of(e, AdminError::BadRequest))?;
    tracing::info!(connection = %id, "updated");
    shared.announce(std::slice::from_ref(&id)).await;
    Ok(answer(StatusCode::OK, shared.connections.describe(&connection, None)))
}

pub async fn pause(admin: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    set_state(admin, shared, id, ConnState::Paused).await
}

pub async fn resume(admin: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    set_state(admin, shared, id, ConnState::Active).await
}

async fn set_state(_: Admin, shared: Arc<Shared>, id: String, state: ConnState) -> Answer {
    known(&shared, &id)?;
    let connection = shared
        .connections
        .set_state(&id, state)
        .await
        .map_err(|e| AdminError::of(e, AdminError::Conflict))?;
    tracing::info!(connection = %id, state = state.as_str(), "state changed");
    shared.announce(std::slice::from_ref(&id)).await;
    shared.ensure_running(&connection);
    Ok(answer(StatusCode::OK, json!({"id": id, "state": state.as_str()})))
}

pub async fn delete(_: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    known(&shared, &id)?;
    let connection = shared
        .connections
        .delete(&id)
        .await
        .map_err(|e| AdminError::of(e, AdminError::Conflict))?;
    tracing::info!(connection = %id, "draining before deletion");
    if let Err(e) = shared.log.announce_deleted(&id).await {
        tracing::error!(connection = %id, "announcing the deletion to the other hosts: {e:#}");
    }
    shared.ensure_running(&connection);
    Ok(answer(
        StatusCode::ACCEPTED,
        json!({"id": id, "state": "draining", "note": "deleted once its pending events are finished"}),
    ))
}

/// A canary: one connection to a stored version, `{"sha256": "…"}`.
pub async fn swap(_: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>, body: Bytes) -> Answer {
    known(&shared, &id)?;
    let sha = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => match o.get("sha256").and_then(Value::as_str) {
            Some(sha) => sha.to_string(),
            None => return Err(AdminError::BadRequest("sha256 (a stored version) is required".into())),
        },
        _ => return Err(AdminError::BadRequest("the body must be {\"sha256\": \"…\"}".into())),
    };
    let plugin = stored(&shared, &sha)
        .await
        .map_err(|e| AdminError::of(e, AdminError::NotFound))?;
    let started = Instant::now();
    let loaded = shared
        .connections
        .swap(&id, plugin)
        .await
        .map_err(|e| AdminError::of(e, AdminError::Refused))?;
    tracing::info!(connection = %id, plugin = %loaded.plugin, "swapped");
    shared.announce(std::slice::from_ref(&id)).await;
    Ok(answer(
        StatusCode::OK,
        json!({"id": id, "active": describe(&loaded), "swap_ms": started.elapsed().as_millis() as u64}),
    ))
}

pub async fn rollback_one(_: Admin, State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    known(&shared, &id)?;
    let loaded = shared
        .connections
        .rollback(&id)
        .await
        .map_err(|e| AdminError::of(e, AdminError::Conflict))?;
    shared.announce(std::slice::from_ref(&id)).await;
    Ok(answer(StatusCode::OK, json!({"id": id, "active": describe(&loaded)})))
}

/// Each connection's events kept on this host, by state (none if it
/// cannot say).
async fn counts(shared: &Arc<Shared>) -> std::collections::BTreeMap<String, crate::spool::Counts> {
    shared.log.counts().await
}

/// A stored plugin version by SHA-256 (loaded, or loaded from the spool).
async fn stored(shared: &Arc<Shared>, sha256: &str) -> anyhow::Result<Arc<Plugin>> {
    let (this, sha256) = (shared.clone(), sha256.to_string());
    tokio::task::spawn_blocking(move || this.connections.store.get(&sha256)).await?
}

/// The connection, if it exists.
fn known(shared: &Shared, id: &str) -> Result<Arc<Connection>, AdminError> {
    shared
        .connections
        .get(id)
        .ok_or_else(|| AdminError::NotFound(format!("no connection {id:?}")))
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = &shared.admin_token else {
        return Err(AdminError::Off);
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if super::constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err(AdminError::Unauthorized),
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}
