//! A local stand-in for the Klaviyo endpoints this destination uses, in the
//! spirit of stripe-mock: it checks what Klaviyo checks (key, scopes,
//! revision, content type, body rules, rate limits) and keeps state like
//! Klaviyo (profile upsert, event dedup), so tests, demos and users without
//! an account see the same answers. Faults can be injected to prove that
//! delivery loses nothing. `/sandbox/*` shows what it holds.

// An `ApiError` is what the sandbox answers, built once per rejected request;
// its size on the error path costs nothing worth boxing for.
#![allow(clippy::result_large_err)]

mod bulk;
mod model;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Timelike, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use model::{Arrival, Profile, Stats, StoredEvent};
use model::{Model, Upsert};
use validate::{ApiError, MAX_BODY_BYTES};

/// A private API key the sandbox knows, and its scopes.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key: String,
    pub scopes: Vec<String>,
}

impl ApiKey {
    pub fn new(key: &str, scopes: &[&str]) -> ApiKey {
        ApiKey {
            key: key.to_string(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The key demos and tests use: every scope this destination needs.
pub const DEMO_KEY: &str = "pk_sandbox_demo";
/// A key with only Events write, as Chord's setup guide creates.
pub const EVENTS_ONLY_KEY: &str = "pk_sandbox_events_only";

/// Misbehaviour to inject, each as a share of requests (0.0 to 1.0).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer 500/502/503/504 (half of them after storing the request,
    /// as a real timeout-after-commit would).
    pub server_errors: f64,
    /// Close the connection without answering (half after storing).
    pub drop_connections: f64,
    /// Answer 429 `throttled` regardless of load, with `Retry-After` of
    /// `storm_retry_after` seconds (at least 1).
    pub throttle_storm: f64,
    pub storm_retry_after: u64,
    /// Injected 5xx answers carry an HTML page, as Klaviyo's edge does.
    pub html_errors: bool,
    /// Added before the answer (after storing) of a `slow` share of requests.
    pub latency: Duration,
    pub slow: f64,
    /// Any event or profile whose JSON contains this text is invalid, as
    /// data Klaviyo refuses for reasons a sender cannot check beforehand:
    /// a 400 naming it (in a bulk request, pointing at it among the rest;
    /// in a bulk import, one of the job's import errors).
    pub invalid_marker: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub keys: Vec<ApiKey>,
    /// Enforce each endpoint's burst and steady rate limits.
    pub rate_limits: bool,
    pub faults: Faults,
    /// Seed for fault injection, so a failing test can be replayed.
    pub seed: u64,
    /// How long a bulk profile import stays queued and processing before
    /// it is applied.
    pub import_job_time: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            keys: vec![
                ApiKey::new(
                    DEMO_KEY,
                    &[
                        "events:write",
                        "profiles:write",
                        "profiles:read",
                        "lists:write",
                        "lists:read",
                        "accounts:read",
                    ],
                ),
                ApiKey::new(EVENTS_ONLY_KEY, &["events:write", "accounts:read"]),
            ],
            rate_limits: true,
            faults: Faults::default(),
            seed: 1,
            import_job_time: Duration::from_millis(200),
        }
    }
}

/// One Klaviyo endpoint the sandbox serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Endpoint {
    Events,
    ProfileImport,
    EventBulkCreateJobs,
    ProfileBulkImportJobs,
    ProfileBulkImportJob,
    ProfileBulkImportErrors,
    Accounts,
}

impl Endpoint {
    /// The endpoint, and the job id in its path if it has one.
    fn route(method: &Method, path: &str) -> Option<(Endpoint, Option<String>)> {
        let path = path.trim_end_matches('/');
        let fixed = match (method, path) {
            (&Method::POST, "/api/events") => Some(Endpoint::Events),
            (&Method::POST, "/api/profile-import") => Some(Endpoint::ProfileImport),
            (&Method::POST, "/api/event-bulk-create-jobs") => Some(Endpoint::EventBulkCreateJobs),
            (&Method::POST, "/api/profile-bulk-import-jobs") => Some(Endpoint::ProfileBulkImportJobs),
            (&Method::GET, "/api/accounts") => Some(Endpoint::Accounts),
            _ => None,
        };
        if let Some(endpoint) = fixed {
            return Some((endpoint, None));
        }
        let job = path.strip_prefix("/api/profile-bulk-import-jobs/")?;
        if *method != Method::GET {
            return None;
        }
        match job.split_once('/') {
            None => Some((Endpoint::ProfileBulkImportJob, Some(job.to_string()))),
            Some((id, "import-errors")) => Some((Endpoint::ProfileBulkImportErrors, Some(id.to_string()))),
            Some(_) => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Events => "POST /api/events",
            Endpoint::ProfileImport => "POST /api/profile-import",
            Endpoint::EventBulkCreateJobs => "POST /api/event-bulk-create-jobs",
            Endpoint::ProfileBulkImportJobs => "POST /api/profile-bulk-import-jobs",
            Endpoint::ProfileBulkImportJob => "GET /api/profile-bulk-import-jobs/{id}",
            Endpoint::ProfileBulkImportErrors => "GET /api/profile-bulk-import-jobs/{id}/import-errors",
            Endpoint::Accounts => "GET /api/accounts",
        }
    }

    /// Scopes Klaviyo requires (OpenAPI `x-klaviyo-scopes`).
    fn scopes(self) -> &'static [&'static str] {
        match self {
            Endpoint::Events | Endpoint::EventBulkCreateJobs => &["events:write"],
            Endpoint::ProfileImport => &["profiles:write"],
            Endpoint::ProfileBulkImportJobs => &["lists:write", "profiles:write"],
            Endpoint::ProfileBulkImportJob => &["lists:read", "profiles:read"],
            Endpoint::ProfileBulkImportErrors => &["profiles:read"],
            Endpoint::Accounts => &["accounts:read"],
        }
    }

    /// Burst per second and steady per minute (OpenAPI `x-klaviyo-ratelimit`).
    fn rate(self) -> (u32, u32) {
        match self {
            Endpoint::Events => (350, 3500),
            Endpoint::ProfileImport => (75, 750),
            Endpoint::EventBulkCreateJobs
            | Endpoint::ProfileBulkImportJobs
            | Endpoint::ProfileBulkImportJob
            | Endpoint::ProfileBulkImportErrors => (10, 150),
            Endpoint::Accounts => (1, 15),
        }
    }
}

/// Fixed one-second and one-minute windows per endpoint, as Klaviyo counts.
#[derive(Default)]
struct RateWindows {
    windows: HashMap<Endpoint, (i64, u32, i64, u32)>,
}

impl RateWindows {
    /// `Err(seconds to wait)` when either window is full.
    fn admit(&mut self, endpoint: Endpoint, now: DateTime<Utc>) -> Result<(), u64> {
        let (burst, steady) = endpoint.rate();
        let second = now.timestamp();
        let minute = second / 60;
        let w = self.windows.entry(endpoint).or_insert((second, 0, minute, 0));
        if w.0 != second {
            (w.0, w.1) = (second, 0);
        }
        if w.2 != minute {
            (w.2, w.3) = (minute, 0);
        }
        if w.3 >= steady {
            return Err(60 - u64::from(now.second()));
        }
        if w.1 >= burst {
            return Err(1);
        }
        w.1 += 1;
        w.3 += 1;
        Ok(())
    }
}

struct Shared {
    config: MockConfig,
    /// The faults now: the config's at start, changed by `set_faults`.
    faults: Mutex<Faults>,
    model: Mutex<Model>,
    windows: Mutex<RateWindows>,
    rng: Mutex<StdRng>,
    /// Keys revoked since start (`revoke_key`): refused as unknown ones are.
    revoked: Mutex<Vec<String>>,
}

/// A running sandbox.
pub struct KlaviyoMock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for KlaviyoMock {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl KlaviyoMock {
    /// Listens on `addr` (port 0 picks a free port) and serves until dropped.
    pub async fn start(config: MockConfig, addr: SocketAddr) -> std::io::Result<KlaviyoMock> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            faults: Mutex::new(config.faults.clone()),
            config,
            model: Mutex::new(Model::default()),
            windows: Mutex::new(RateWindows::default()),
            revoked: Mutex::default(),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        Ok(KlaviyoMock { addr, shared, server })
    }

    /// `http://127.0.0.1:PORT`, to pass as `--klaviyo-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Injects other faults from now on (a test's nemesis: Klaviyo
    /// failing, then healing).
    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    /// Revokes a key, as an account owner does after rotating it: from now
    /// on it is refused with 401.
    pub fn revoke_key(&self, key: &str) {
        self.shared.revoked.lock().unwrap().push(key.to_string());
    }

    pub fn stats(&self) -> Stats {
        self.shared.model.lock().unwrap().stats.clone()
    }

    pub fn events(&self) -> Vec<StoredEvent> {
        self.shared.model.lock().unwrap().events().to_vec()
    }

    /// The profiles, with every bulk import whose time has come applied.
    pub fn profiles(&self) -> Vec<Profile> {
        let mut model = self.shared.model.lock().unwrap();
        model.settle(Utc::now());
        model.profiles().to_vec()
    }

    /// Every accepted write, in the order the sandbox stored it.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.model.lock().unwrap().arrivals().to_vec()
    }

    /// Serves until the process ends.
    pub async fn wait(mut self) {
        let _ = (&mut self.server).await;
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| handle(shared.clone(), request));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An answer, or a dropped connection.
type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Answer {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    if method == Method::GET && path.starts_with("/sandbox/") {
        return Ok(inspect(&shared, &path));
    }
    let Some((endpoint, job)) = Endpoint::route(&method, &path) else {
        return Ok(json_response(
            404,
            &ApiError::new(
                404,
                "not_found",
                "Not found.",
                format!("{method} {path} is not an endpoint of this sandbox"),
            )
            .body(&error_id(&shared)),
        ));
    };
    {
        let mut model = shared.model.lock().unwrap();
        model.stats.requests += 1;
        *model.stats.by_endpoint.entry(endpoint.name().to_string()).or_default() += 1;
    }
    let headers = request.headers().clone();
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES + 1).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return reject(
                &shared,
                ApiError::new(
                    413,
                    "payload_too_large",
                    "Payload too large.",
                    "The request body exceeds 5MB.",
                ),
            );
        }
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);

    let (storm, fault_5xx, drop, after, slow) = {
        let mut rng = shared.rng.lock().unwrap();
        let f = shared.faults.lock().unwrap().clone();
        (
            rng.random_bool(f.throttle_storm.clamp(0.0, 1.0)),
            rng.random_bool(f.server_errors.clamp(0.0, 1.0)),
            rng.random_bool(f.drop_connections.clamp(0.0, 1.0)),
            rng.random_bool(0.5),
            rng.random_bool(f.slow.clamp(0.0, 1.0)),
        )
    };
    if storm {
        count_fault(&shared, "throttle_storm");
        // Read first: `throttled` takes the model's lock, and no lock is
        // taken while the faults' is held.
        let retry_after = shared.faults.lock().unwrap().storm_retry_after.max(1);
        return Ok(throttled(&shared, endpoint, retry_after));
    }
    if let Err(error) = authorize(&shared, endpoint, header("authorization"), header("revision")) {
        return reject(&shared, error);
    }
    if shared.config.rate_limits
        && let Err(wait) = shared.windows.lock().unwrap().admit(endpoint, Utc::now())
    {
        return Ok(throttled(&shared, endpoint, wait));
    }
    if (fault_5xx || drop) && !after {
        return fault(&shared, drop).await;
    }
    let answer = match job {
        Some(id) => job_document(&shared, endpoint, &id),
        None => process(&shared, endpoint, header("content-type"), &body),
    };
    if (fault_5xx || drop) && after {
        return fault(&shared, drop).await;
    }
    let latency = shared.faults.lock().unwrap().latency;
    if slow && !latency.is_zero() {
        count_fault(&shared, "slow_answer");
        tokio::time::sleep(latency).await;
    }
    match answer {
        Ok((status, body)) => {
            shared.model.lock().unwrap().stats.accepted += 1;
            Ok(match body {
                Some(body) => json_response(status, &body),
                None => empty_response(status),
            })
        }
        Err(error) => reject(&shared, error),
    }
}

fn authorize(
    shared: &Shared,
    endpoint: Endpoint,
    authorization: Option<String>,
    revision: Option<String>,
) -> Result<(), ApiError> {
    let key = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Klaviyo-API-Key "))
        .map(str::trim);
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        let mut error = ApiError::new(
            401,
            "not_authenticated",
            "Authentication credentials were not provided.",
            "Missing or invalid authorization scheme. Please use Klaviyo-API-Key.",
        );
        error.pointer = Some("/data/".to_string());
        return Err(error);
    };
    let revoked = shared.revoked.lock().unwrap().iter().any(|k| k == key);
    let Some(known) = shared.config.keys.iter().find(|k| k.key == key && !revoked) else {
        return Err(ApiError::new(
            401,
            "authentication_failed",
            "Incorrect authentication credentials.",
            "Incorrect authentication credentials.",
        ));
    };
    if let Some(missing) = endpoint.scopes().iter().find(|s| !known.scopes.iter().any(|k| k == *s)) {
        return Err(ApiError::new(
            403,
            "permission_denied",
            "You do not have permission to perform this action.",
            format!("This API key is missing required scopes: {missing}."),
        ));
    }
    let revision = revision.unwrap_or_default();
    let date = revision.strip_suffix(".pre").unwrap_or(&revision);
    let Ok(date) = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d") else {
        let mut error = ApiError::new(
            400,
            "invalid",
            "Invalid input.",
            "A valid revision header is required (YYYY-MM-DD).",
        );
        error.pointer = None;
        return Err(error);
    };
    if date > Utc::now().date_naive() {
        return Err(ApiError::new(
            400,
            "invalid",
            "Invalid input.",
            format!("No valid revisions found for method: revision {revision} is in the future."),
        ));
    }
    Ok(())
}

/// Runs the request against the model: a status and an optional body.
fn process(
    shared: &Shared,
    endpoint: Endpoint,
    content_type: Option<String>,
    body: &Bytes,
) -> Result<(u16, Option<Value>), ApiError> {
    if endpoint == Endpoint::Accounts {
        return Ok((
            200,
            Some(
                json!({"data": [{"type": "account", "id": "SANDBOX", "attributes": {"contact_information": {"organization_name": "Klaviyo sandbox"}}}]}),
            ),
        ));
    }
    let media = content_type.unwrap_or_default();
    let media = media.split(';').next().unwrap_or("").trim();
    if !matches!(media, "application/json" | "application/vnd.api+json") {
        return Err(ApiError::new(
            415,
            "unsupported_media_type",
            "Unsupported media type.",
            format!("Unsupported media type \"{media}\" in request."),
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "parse_error",
            "Malformed request.",
            format!("JSON parse error - {e}"),
        )
    })?;
    let now = Utc::now();
    let mut model = shared.model.lock().unwrap();
    model.settle(now);
    match endpoint {
        Endpoint::Events => {
            let marker = shared.faults.lock().unwrap().invalid_marker.clone();
            let marker = marker.as_deref();
            bulk::refuse_marked(&value, marker, "/data/attributes/properties")?;
            let event = validate::event(&value, now)?;
            model.add_event(event, &now.to_rfc3339())?;
            Ok((202, None))
        }
        Endpoint::ProfileImport => {
            let marker = shared.faults.lock().unwrap().invalid_marker.clone();
            let marker = marker.as_deref();
            bulk::refuse_marked(&value, marker, "/data/attributes")?;
            let profile = validate::profile_import(&value, body.len())?;
            let (status, id) = match model.import_profile(&profile)? {
                Upsert::Created(id) => (201, id),
                Upsert::Updated(id) => (200, id),
            };
            Ok((
                status,
                Some(json!({"data": {"type": "profile", "id": id, "attributes": profile.attributes}})),
            ))
        }
        Endpoint::EventBulkCreateJobs => {
            let marker = shared.faults.lock().unwrap().invalid_marker.clone();
            let events = bulk::events(&value, now, marker.as_deref())?;
            for event in events {
                model.add_event(event, &now.to_rfc3339())?;
            }
            Ok((202, None))
        }
        Endpoint::ProfileBulkImportJobs => {
            let marker = shared.faults.lock().unwrap().invalid_marker.clone();
            let profiles = bulk::profiles(&value, marker.as_deref())?;
            let processing = chrono::Duration::from_std(shared.config.import_job_time).unwrap_or_default();
            Ok((202, Some(model.create_job(profiles, now, processing))))
        }
        Endpoint::ProfileBulkImportJob | Endpoint::ProfileBulkImportErrors => unreachable!("answered by job_document"),
        Endpoint::Accounts => unreachable!("answered above"),
    }
}

/// A bulk import job's status or its import errors.
fn job_document(shared: &Shared, endpoint: Endpoint, id: &str) -> Result<(u16, Option<Value>), ApiError> {
    let now = Utc::now();
    let mut model = shared.model.lock().unwrap();
    model.settle(now);
    let found = match endpoint {
        Endpoint::ProfileBulkImportJob => model.job(id, now),
        _ => model.job_errors(id),
    };
    found.map(|document| (200, Some(document))).ok_or_else(|| {
        ApiError::new(
            404,
            "not_found",
            "Not found.",
            format!("There is no profile bulk import job {id:?}."),
        )
    })
}

async fn fault(shared: &Shared, drop: bool) -> Answer {
    if drop {
        count_fault(shared, "dropped_connection");
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "sandbox fault: connection dropped",
        ));
    }
    let status = [500u16, 502, 503, 504][shared.rng.lock().unwrap().random_range(0..4)];
    count_fault(shared, &format!("server_error_{status}"));
    if shared.faults.lock().unwrap().html_errors {
        let page = format!(
            "<html><head><title>{status}</title></head><body><h1>{status} Server Error</h1><p>cloudflare</p></body></html>"
        );
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "text/html")
            .body(Full::new(Bytes::from(page)))
            .unwrap());
    }
    let error = ApiError::new(
        status,
        "server_error",
        "A server error occurred.",
        "A server error occurred.",
    );
    Ok(json_response(status, &error.body(&error_id(shared))))
}

fn count_fault(shared: &Shared, kind: &str) {
    *shared
        .model
        .lock()
        .unwrap()
        .stats
        .faults
        .entry(kind.to_string())
        .or_default() += 1;
}

fn throttled(shared: &Shared, endpoint: Endpoint, wait_seconds: u64) -> Response<Full<Bytes>> {
    let mut error = ApiError::new(
        429,
        "throttled",
        "Request was throttled.",
        format!(
            "Request was throttled. Expected available in {wait_seconds} second{}.",
            if wait_seconds == 1 { "" } else { "s" }
        ),
    );
    error.pointer = Some("/data".to_string());
    let mut model = shared.model.lock().unwrap();
    *model.stats.rejected.entry("429 throttled".into()).or_default() += 1;
    *model.stats.throttled.entry(endpoint.name().into()).or_default() += 1;
    drop(model);
    let mut response = json_response(429, &error.body(&error_id(shared)));
    response.headers_mut().insert("retry-after", wait_seconds.into());
    response
}

fn reject(shared: &Shared, error: ApiError) -> Answer {
    *shared
        .model
        .lock()
        .unwrap()
        .stats
        .rejected
        .entry(format!("{} {}", error.status, error.code))
        .or_default() += 1;
    Ok(json_response(error.status, &error.body(&error_id(shared))))
}

fn error_id(shared: &Shared) -> String {
    let n: u128 = shared.rng.lock().unwrap().random();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        n as u32,
        (n >> 32) as u16,
        (n >> 48) as u16 & 0xfff,
        (n >> 60) as u16 & 0xfff,
        (n >> 72) as u64 & 0xffff_ffff_ffff
    )
}

/// `/sandbox/events`, `/sandbox/profiles`, `/sandbox/stats`.
fn inspect(shared: &Shared, path: &str) -> Response<Full<Bytes>> {
    let mut model = shared.model.lock().unwrap();
    model.settle(Utc::now());
    let value = match path.trim_end_matches('/') {
        "/sandbox/events" => json!(model.events()),
        "/sandbox/profiles" => json!(model.profiles()),
        "/sandbox/stats" => json!(model.stats),
        _ => {
            return json_response(
                404,
                &json!({"error": "try /sandbox/events, /sandbox/profiles or /sandbox/stats"}),
            );
        }
    };
    json_response(200, &value)
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/vnd.api+json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn empty_response(status: u16) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .body(Full::new(Bytes::new()))
        .unwrap()
}
