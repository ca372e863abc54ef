//! Table-driven cases, read by the one runner (`tests/cases.rs`), which
//! checks each both natively and through the real component. A case is a
//! JSON file: an event (or a request and response) in, the expected
//! outcome out. A new case is a new file, not new code.
//!
//! Mapping case (`tests/cases/mapping/*.json`):
//! `{"rule": "...", "settings": {...}?, "now": "ISO"?, "event": {...} | "event_text": "...",
//!   "expect": {"outcome": "send"|"skip"|"error", "reason_contains": "..."?,
//!              "requests": [{"method"?, "url"?, "body"? (exact) | "body_includes"? (subset),
//!                            "headers_include"?: {...}, "absent"?: ["/json/pointer", ...]}]?,
//!              "warnings_contain": ["..."]? (when absent: no warnings),
//!              "ordering_key": "..."?}}`
//!
//! Interpret case (`tests/cases/interpret/*.json`):
//! `{"rule": "...", "request": {"url", "body"}, "response": {"status", "headers"?, "body"?},
//!   "expect": {"verdict": "delivered"|"retry"|"rejected"|"replace", "retry_after_ms"?,
//!              "reason_contains": ["..."]?, "replacement_includes": {...}?, "replacement_absent": [...]?}}`

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// 2026-11-28T00:00:00Z, the default "now" of a case.
pub const DEFAULT_NOW_MS: i64 = 1_795_824_000_000;

pub struct MappingCase {
    pub name: String,
    pub settings: String,
    pub now_unix_ms: i64,
    pub event: String,
    expect: Value,
}

/// What a runner observed, in plain terms.
pub struct Mapped {
    pub outcome: String,
    pub reason: Option<String>,
    pub requests: Vec<MappedRequest>,
    pub warnings: Vec<String>,
    pub ordering_key: Option<String>,
}

pub struct MappedRequest {
    pub method: String,
    pub url: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

pub struct InterpretCase {
    pub name: String,
    pub url: String,
    pub request_body: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub response_body: String,
    expect: Value,
}

/// What a runner observed: verdict name, retry delay, reason, replacement bodies.
pub struct Judged {
    pub verdict: String,
    pub retry_after_ms: Option<u64>,
    pub reason: Option<String>,
    pub replacements: Vec<String>,
}

pub fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/cases")
}

fn files(kind: &str) -> Vec<(String, Value)> {
    let dir = cases_dir().join(kind);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no cases in {}", dir.display());
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), value)
        })
        .collect()
}

pub fn mapping_cases() -> Vec<MappingCase> {
    files("mapping")
        .into_iter()
        .map(|(name, case)| {
            let event = match (case.get("event"), case.get("event_text")) {
                (Some(event), None) => event.to_string(),
                (None, Some(Value::String(text))) => text.clone(),
                _ => panic!("{name}: needs exactly one of event, event_text"),
            };
            let now_unix_ms = case
                .get("now")
                .and_then(Value::as_str)
                .map(|t| parse_rfc3339_ms(t).unwrap_or_else(|| panic!("{name}: bad now {t}")))
                .unwrap_or(DEFAULT_NOW_MS);
            MappingCase {
                settings: case
                    .get("settings")
                    .cloned()
                    .unwrap_or(Value::Object(Map::new()))
                    .to_string(),
                now_unix_ms,
                event,
                expect: case
                    .get("expect")
                    .cloned()
                    .unwrap_or_else(|| panic!("{name}: no expect")),
                name,
            }
        })
        .collect()
}

pub fn interpret_cases() -> Vec<InterpretCase> {
    files("interpret")
        .into_iter()
        .map(|(name, case)| {
            let request = &case["request"];
            let response = &case["response"];
            let text = |v: &Value| match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            InterpretCase {
                url: request["url"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: request.url"))
                    .to_string(),
                request_body: text(&request["body"]),
                status: response["status"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name}: response.status")) as u16,
                headers: response
                    .get("headers")
                    .and_then(Value::as_object)
                    .map(|h| h.iter().map(|(k, v)| (k.clone(), text(v))).collect())
                    .unwrap_or_default(),
                response_body: text(&response["body"]),
                expect: case["expect"].clone(),
                name,
            }
        })
        .collect()
}

impl MappingCase {
    /// Every difference between what was expected and what was mapped.
    pub fn check(&self, actual: &Mapped) -> Vec<String> {
        let mut problems = Vec::new();
        let e = &self.expect;
        let outcome = e["outcome"].as_str().expect("expect.outcome");
        if actual.outcome != outcome {
            problems.push(format!(
                "outcome {} (reason {:?}), expected {outcome}",
                actual.outcome, actual.reason
            ));
        }
        if let Some(want) = e.get("reason_contains").and_then(Value::as_str) {
            match &actual.reason {
                Some(reason) if reason.contains(want) => {}
                other => problems.push(format!("reason {other:?} does not contain {want:?}")),
            }
        }
        if let Some(want) = e.get("ordering_key")
            && want.as_str() != actual.ordering_key.as_deref()
        {
            problems.push(format!("ordering key {:?}, expected {want}", actual.ordering_key));
        }
        match e.get("warnings_contain").and_then(Value::as_array) {
            None if !actual.warnings.is_empty() => problems.push(format!("unexpected warnings {:?}", actual.warnings)),
            None => {}
            Some(wants) => {
                for want in wants.iter().filter_map(Value::as_str) {
                    if !actual.warnings.iter().any(|w| w.contains(want)) {
                        problems.push(format!("no warning contains {want:?}; warnings: {:?}", actual.warnings));
                    }
                }
            }
        }
        let wanted = e.get("requests").and_then(Value::as_array).cloned().unwrap_or_default();
        if outcome == "send" && wanted.len() != actual.requests.len() {
            problems.push(format!("{} requests, expected {}", actual.requests.len(), wanted.len()));
        }
        for (i, (want, request)) in wanted.iter().zip(&actual.requests).enumerate() {
            let MappedRequest {
                method,
                url,
                headers,
                body,
            } = request;
            for (name, value) in want
                .get("headers_include")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let found = headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
                if found != value.as_str() {
                    problems.push(format!("request {i}: header {name} is {found:?}, expected {value}"));
                }
            }
            if let Some(m) = want.get("method").and_then(Value::as_str)
                && m != method
            {
                problems.push(format!("request {i}: method {method}, expected {m}"));
            }
            if let Some(u) = want.get("url").and_then(Value::as_str)
                && u != url
            {
                problems.push(format!("request {i}: url {url}, expected {u}"));
            }
            let body: Value = match serde_json::from_str(body) {
                Ok(body) => body,
                Err(err) => {
                    problems.push(format!("request {i}: body is not JSON: {err}"));
                    continue;
                }
            };
            if let Some(exact) = want.get("body")
                && exact != &body
            {
                problems.push(format!("request {i}: body\n  {body}\nexpected\n  {exact}"));
            }
            if let Some(subset) = want.get("body_includes")
                && let Err(at) = includes(&body, subset, "")
            {
                problems.push(format!(
                    "request {i}: body does not include the expected {at}\n  body: {body}"
                ));
            }
            for pointer in want.get("absent").and_then(Value::as_array).into_iter().flatten() {
                let pointer = pointer.as_str().expect("absent: JSON pointers");
                if let Some(found) = body.pointer(pointer) {
                    problems.push(format!("request {i}: {pointer} should be absent, is {found}"));
                }
            }
        }
        problems
    }
}

impl InterpretCase {
    pub fn check(&self, actual: &Judged) -> Vec<String> {
        let mut problems = Vec::new();
        let e = &self.expect;
        let verdict = e["verdict"].as_str().expect("expect.verdict");
        if actual.verdict != verdict {
            problems.push(format!(
                "verdict {} ({:?}), expected {verdict}",
                actual.verdict, actual.reason
            ));
        }
        if let Some(ms) = e.get("retry_after_ms")
            && ms.as_u64() != actual.retry_after_ms
        {
            problems.push(format!("retry after {:?} ms, expected {ms}", actual.retry_after_ms));
        }
        for want in e.get("reason_contains").and_then(Value::as_array).into_iter().flatten() {
            let want = want.as_str().unwrap();
            if !actual.reason.as_deref().unwrap_or("").contains(want) {
                problems.push(format!("reason {:?} does not contain {want:?}", actual.reason));
            }
        }
        if let Some(subset) = e.get("replacement_includes") {
            match actual.replacements.first().map(|b| serde_json::from_str::<Value>(b)) {
                Some(Ok(body)) => {
                    if let Err(at) = includes(&body, subset, "") {
                        problems.push(format!("replacement does not include the expected {at}: {body}"));
                    }
                    for pointer in e
                        .get("replacement_absent")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if body.pointer(pointer.as_str().unwrap()).is_some() {
                            problems.push(format!("replacement still has {pointer}"));
                        }
                    }
                }
                _ => problems.push("no JSON replacement request".to_string()),
            }
        }
        problems
    }
}

/// Whether `actual` has everything in `expected`: objects by their keys
/// (recursively), anything else by equality.
fn includes(actual: &Value, expected: &Value, at: &str) -> Result<(), String> {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (key, want) in e {
                let here = format!("{at}/{key}");
                match a.get(key) {
                    Some(got) => includes(got, want, &here)?,
                    None => return Err(format!("{here} (missing)")),
                }
            }
            Ok(())
        }
        (a, e) if a == e => Ok(()),
        (a, e) => Err(format!("{at} = {e} (found {a})")),
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let d: Vec<i64> = date.split('-').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let h: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000)
}
