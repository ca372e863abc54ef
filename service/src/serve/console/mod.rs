//! The operator console, served by `serve` at `/console/` behind the
//! admin token: every connection's delivery live, one connection's recent
//! events (searchable), the dead letters (replayed or purged), and the
//! plugin versions (a canary on one connection, a rollback). It works the
//! same on both backends: what it shows comes from the one engine
//! (`recent`), the dead-letter interface and the connections.
//!
//! Trust: a login with the admin token opens a session, kept in memory
//! and named by an HttpOnly, SameSite=Strict cookie; every change is a
//! POST carrying the session's CSRF token. Pages are rendered on the
//! server and everything from an event or a connection is escaped (maud
//! escapes by default); the Content-Security-Policy lets only the
//! console's own script run, and nothing is fetched from elsewhere, so the
//! page works with no internet. Secrets appear as their sources only
//! (`env:NAME`, `file:PATH`), keys in requests masked as delivery shows
//! them, write keys not at all.

mod pages;
pub mod recent;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::Shared;
use super::connections::ConnState;
pub use recent::{ConsoleOptions, Recorder};

/// How long a session lasts after its login.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest goes first.
const SESSIONS: usize = 64;
/// The cookie naming a session.
const COOKIE: &str = "cdp_console";

/// The console's state beside the service's.
pub struct Console {
    pub recorder: Arc<Recorder>,
    sessions: Mutex<HashMap<String, Session>>,
}

#[derive(Clone)]
struct Session {
    csrf: String,
    expires: Instant,
}

impl Console {
    pub fn new(recorder: Arc<Recorder>) -> Console {
        Console {
            recorder,
            sessions: Mutex::default(),
        }
    }

    /// A new session: its cookie value and its CSRF token.
    fn open(&self) -> (String, String) {
        let id = random();
        let csrf = random();
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, s| s.expires > Instant::now());
        if sessions.len() >= SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: Instant::now() + SESSION_LIFE,
            },
        );
        (id, csrf)
    }

    fn session(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap();
        sessions.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    fn close(&self, id: &str) {
        self.sessions.lock().unwrap().remove(id);
    }
}

/// 256 random bits, as hex.
fn random() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The console's routes, under `/console/`.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(overview))
        .route("/console/live.json", get(live))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/static/console.js", get(script))
        .route("/console/static/console.css", get(style))
        .route("/console/connections/{id}", get(connection))
        .route("/console/connections/{id}/tail", get(tail))
        .route("/console/connections/{id}/state", post(set_state))
        .route("/console/connections/{id}/plugin", post(swap))
        .route("/console/connections/{id}/rollback", post(rollback))
        .route("/console/dead-letters", get(dead_letters))
        .route("/console/dead-letters/replay", post(replay))
        .route("/console/dead-letters/purge", post(purge))
        .route("/console/plugins", get(plugins))
}

/// A signed-in operator, with the session's CSRF token for the forms it
/// is shown.
pub(super) struct Operator {
    csrf: String,
}

/// Why a console request was not served.
pub(super) enum Refused {
    /// No admin token configured: the console is off with the admin API.
    Off,
    /// Not signed in: to the login page.
    SignIn,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Off => guarded(
                StatusCode::NOT_FOUND,
                pages::message("Console off", "The console needs an admin token: start serve with one."),
            ),
            Refused::SignIn => Redirect::to("/console/login").into_response(),
        }
    }
}

impl FromRequestParts<Arc<Shared>> for Operator {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Operator, Refused> {
        let console = shared.console.as_ref().ok_or(Refused::Off)?;
        if shared.admin_token.is_none() {
            return Err(Refused::Off);
        }
        let id = cookie(&parts.headers).ok_or(Refused::SignIn)?;
        let session = console.session(&id).ok_or(Refused::SignIn)?;
        Ok(Operator { csrf: session.csrf })
    }
}

impl Operator {
    /// The refusal of a form that does not carry this session's CSRF
    /// token; none if it does.
    fn refuse(&self, form: &HashMap<String, String>) -> Option<Response> {
        let given = form.get("csrf").map(String::as_str).unwrap_or_default();
        if super::constant_time_eq(given.as_bytes(), self.csrf.as_bytes()) {
            None
        } else {
            Some(guarded(
                StatusCode::FORBIDDEN,
                pages::message(
                    "Refused",
                    "This form's CSRF token is missing or not this session's: reload the page and try again.",
                ),
            ))
        }
    }
}

/// A change a signed-in operator asked for: its form, which carried the
/// session's CSRF token. Every change handler takes one, so none can
/// forget the check.
pub(super) struct Change(HashMap<String, String>);

impl axum::extract::FromRequest<Arc<Shared>> for Change {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, shared: &Arc<Shared>) -> Result<Change, Response> {
        let (mut parts, body) = request.into_parts();
        let operator = Operator::from_request_parts(&mut parts, shared)
            .await
            .map_err(IntoResponse::into_response)?;
        let request = axum::extract::Request::from_parts(parts, body);
        let Form(form) = Form::<HashMap<String, String>>::from_request(request, shared)
            .await
            .map_err(IntoResponse::into_response)?;
        match operator.refuse(&form) {
            Some(refused) => Err(refused),
            None => Ok(Change(form)),
        }
    }
}

/// The session cookie's value, if the request has one.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// A page with the console's headers: no script but its own, no framing,
/// nothing cached, nothing sniffed.
fn guarded(status: StatusCode, body: maud::Markup) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body.into_string(),
    )
        .into_response();
    secure(response.headers_mut());
    response
}

fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

async fn login_page(State(shared): State<Arc<Shared>>) -> Response {
    if shared.console.is_none() || shared.admin_token.is_none() {
        return Refused::Off.into_response();
    }
    guarded(StatusCode::OK, pages::login(None))
}

async fn login(State(shared): State<Arc<Shared>>, Form(form): Form<HashMap<String, String>>) -> Response {
    let (Some(console), Some(token)) = (&shared.console, &shared.admin_token) else {
        return Refused::Off.into_response();
    };
    let given = form.get("token").map(|t| t.trim()).unwrap_or_default();
    if !super::constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        tracing::warn!("a console login with a wrong token");
        // Slows guessing; the token is long in any case.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return guarded(
            StatusCode::UNAUTHORIZED,
            pages::login(Some("That is not the admin token.")),
        );
    }
    let (id, _) = console.open();
    let mut response = Redirect::to("/console/").into_response();
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFE.as_secs()
    );
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex is a valid header"),
    );
    secure(response.headers_mut());
    response
}

async fn logout(State(shared): State<Arc<Shared>>, headers: HeaderMap, _: Change) -> Response {
    if let (Some(console), Some(id)) = (&shared.console, cookie(&headers)) {
        console.close(&id);
    }
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("cdp_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

/// One of the console's own files, with its headers.
fn asset(content_type: &'static str, text: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], text).into_response();
    secure(response.headers_mut());
    response
}

/// Each connection's unfinished events, when the log counts them (the
/// spool does; the stream's backlog is in JetStream).
async fn backlog(shared: &Arc<Shared>) -> Option<std::collections::BTreeMap<String, u64>> {
    shared.log.backlog().await
}

async fn overview(operator: Operator, State(shared): State<Arc<Shared>>) -> Response {
    let backlog = backlog(&shared).await;
    let rows = pages::rows(&shared, backlog.as_ref());
    guarded(
        StatusCode::OK,
        pages::overview(&operator.csrf, &rows, shared.log.shared_by_hosts()),
    )
}

/// The overview's figures, for the page to update itself.
async fn live(_: Operator, State(shared): State<Arc<Shared>>) -> Response {
    let backlog = backlog(&shared).await;
    let rows = pages::rows(&shared, backlog.as_ref());
    let mut response = axum::Json(pages::live_json(&rows)).into_response();
    secure(response.headers_mut());
    response
}

#[derive(serde::Deserialize, Default)]
pub(super) struct Search {
    /// A messageId, a person (email or userId), or any text of the event.
    #[serde(default)]
    pub q: String,
    /// delivered, skipped, dead-lettered, or empty for all.
    #[serde(default)]
    pub outcome: String,
    /// For the live tail: only entries after this serial.
    #[serde(default)]
    pub after: u64,
}

async fn connection(
    operator: Operator,
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(search): Query<Search>,
) -> Response {
    let Some(connection) = shared.connections.get(&id) else {
        return guarded(
            StatusCode::NOT_FOUND,
            pages::message("Not found", &format!("No connection {id:?}.")),
        );
    };
    let entries = pages::search(&shared, &id, &search);
    guarded(
        StatusCode::OK,
        pages::connection(&shared, &operator.csrf, &connection, &search, &entries),
    )
}

/// The connection's events after `after` that match the search, as table
/// rows (rendered and escaped here, inserted as they are by the page).
async fn tail(
    _: Operator,
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(search): Query<Search>,
) -> Response {
    let entries = pages::search(&shared, &id, &search);
    guarded(StatusCode::OK, pages::tail(&entries))
}

/// A change's result: back to `to` when it went through, else the words
/// of its refusal.
fn done(result: anyhow::Result<()>, to: &str, refused_status: StatusCode) -> Response {
    match result {
        Ok(()) => Redirect::to(to).into_response(),
        Err(e) => guarded(refused_status, pages::refusal(&format!("{e:#}"), to)),
    }
}

async fn set_state(State(shared): State<Arc<Shared>>, Path(id): Path<String>, Change(form): Change) -> Response {
    let state = match form.get("state").map(String::as_str) {
        Some("paused") => ConnState::Paused,
        Some("active") => ConnState::Active,
        _ => {
            return done(
                Err(anyhow::anyhow!("state must be paused or active")),
                "/console/",
                StatusCode::BAD_REQUEST,
            );
        }
    };
    let result = async {
        let connection = shared.connections.set_state(&id, state).await?;
        tracing::info!(connection = %id, state = state.as_str(), "state changed in the console");
        shared.announce(std::slice::from_ref(&id)).await;
        shared.ensure_running(&connection);
        Ok(())
    }
    .await;
    done(
        result,
        &format!("/console/connections/{}", urlencode(&id)),
        StatusCode::CONFLICT,
    )
}

async fn swap(State(shared): State<Arc<Shared>>, Path(id): Path<String>, Change(form): Change) -> Response {
    let sha = form.get("sha256").cloned().unwrap_or_default();
    let result = async {
        let this = shared.clone();
        let plugin = tokio::task::spawn_blocking(move || this.connections.store.get(&sha)).await??;
        let loaded = shared.connections.swap(&id, plugin).await?;
        tracing::info!(connection = %id, plugin = %loaded.plugin, "swapped in the console");
        shared.announce(std::slice::from_ref(&id)).await;
        Ok(())
    }
    .await;
    done(result, "/console/plugins", StatusCode::UNPROCESSABLE_ENTITY)
}

async fn rollback(State(shared): State<Arc<Shared>>, Path(id): Path<String>, _: Change) -> Response {
    let result = async {
        let loaded = shared.connections.rollback(&id).await?;
        tracing::info!(connection = %id, plugin = %loaded.plugin, "rolled back in the console");
        shared.announce(std::slice::from_ref(&id)).await;
        Ok(())
    }
    .await;
    done(result, "/console/plugins", StatusCode::CONFLICT)
}

#[derive(serde::Deserialize, Default)]
pub(super) struct LettersOf {
    #[serde(default)]
    pub connection: String,
}

async fn dead_letters(
    operator: Operator,
    State(shared): State<Arc<Shared>>,
    Query(which): Query<LettersOf>,
) -> Response {
    let connection = Some(which.connection.as_str()).filter(|c| !c.is_empty());
    match shared.dead.list(connection, 200).await {
        Ok(letters) => guarded(
            StatusCode::OK,
            pages::dead_letters(&operator.csrf, &shared, connection, &letters),
        ),
        Err(e) => guarded(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::message("Dead letters", &format!("Reading the dead letters failed: {e:#}")),
        ),
    }
}

/// The letters a replay or purge form names: one id, or all of a
/// connection's (or all), only with the confirmation ticked.
fn named(form: &HashMap<String, String>) -> Result<(Option<String>, Vec<i64>), String> {
    if form.get("confirm").map(String::as_str) != Some("yes") {
        return Err("not confirmed: tick the box to say you mean it".into());
    }
    let connection = form.get("connection").filter(|c| !c.is_empty()).cloned();
    let ids = match form.get("id").filter(|i| !i.is_empty()) {
        Some(id) => vec![
            id.parse::<i64>()
                .map_err(|_| format!("{id:?} is not a dead letter's id"))?,
        ],
        None => Vec::new(),
    };
    Ok((connection, ids))
}

async fn replay(State(shared): State<Arc<Shared>>, Change(form): Change) -> Response {
    on_letters(shared, form, Letters::Replay).await
}

async fn purge(State(shared): State<Arc<Shared>>, Change(form): Change) -> Response {
    on_letters(shared, form, Letters::Purge).await
}

/// What a dead-letter form asks.
#[derive(Clone, Copy, Debug)]
enum Letters {
    Replay,
    Purge,
}

/// Replays or purges the letters a confirmed form names, then back to
/// the list.
async fn on_letters(shared: Arc<Shared>, form: HashMap<String, String>, what: Letters) -> Response {
    let back = back_to_letters(&form);
    let (connection, ids) = match named(&form) {
        Ok(named) => named,
        Err(e) => return done(Err(anyhow::anyhow!(e)), &back, StatusCode::BAD_REQUEST),
    };
    let result = match what {
        Letters::Replay => shared.dead.replay(connection.as_deref(), &ids).await,
        Letters::Purge => shared.dead.purge(connection.as_deref(), &ids).await,
    };
    let result = result.map(|n| {
        tracing::info!(letters = n, connection = ?connection, "dead letters: {what:?} in the console");
        if let Letters::Replay = what {
            for c in shared.connections.all() {
                shared.ensure_running(&c);
            }
        }
    });
    done(result, &back, StatusCode::INTERNAL_SERVER_ERROR)
}

fn back_to_letters(form: &HashMap<String, String>) -> String {
    match form.get("back").filter(|c| !c.is_empty()) {
        Some(connection) => format!("/console/dead-letters?connection={}", urlencode(connection)),
        None => "/console/dead-letters".to_string(),
    }
}

async fn plugins(operator: Operator, State(shared): State<Arc<Shared>>) -> Response {
    guarded(StatusCode::OK, pages::plugins(&operator.csrf, &shared))
}

/// A path segment or query value, percent-encoded.
pub(super) fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
