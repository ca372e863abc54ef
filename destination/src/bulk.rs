//! Klaviyo's bulk endpoints, as the `batching` interface (contract 1.1):
//!
//! - `events`: a Create Event request becomes an item of a bulk create job.
//!   The item is the request's own body; `assemble` groups the items into
//!   one entry per profile, as the API requires, and `judge` reads a 400's
//!   `source.pointer`s back to the items they name: those are rejected,
//!   each with its reason, and the others are sent again.
//! - `profiles` (setting `bulk_profiles`): a profile import becomes an item
//!   of a bulk import job, which is asynchronous: `judge` follows the job up
//!   until it is complete, then reads its import errors.
//!
//! A bulk request never repeats a (profile, metric, `unique_id`): each
//! item's dedupe key says so, and the host keeps such items apart.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::contract::{BatchClass, BatchItem, BatchVerdict, FollowUp, Header, ItemVerdict, Request, Response, Verdict};
use crate::klaviyo::{self, limits};
use crate::request::path;
use crate::settings::Settings;

const EVENTS: &str = "events";
const PROFILES: &str = "profiles";
/// How long an item may wait for company under a backlog: at the bulk
/// budget's 2,500 events a second a batch fills in 0.4 s, and a person's
/// next event waits for their previous one's batch.
const MAX_WAIT_MS: u32 = 500;
/// How often a bulk import job is asked about.
const POLL_MS: u64 = 1_000;
/// Import errors read per page.
const ERRORS_PAGE: usize = 100;

/// Room a body keeps below Klaviyo's 5 MB for the wrapping the host's
/// per-item estimate does not see.
const BODY_MARGIN: usize = 16 * 1024;

/// The classes these settings allow.
pub fn classes(settings: &Settings) -> Vec<BatchClass> {
    if !settings.batching {
        return Vec::new();
    }
    let max_bytes = (limits::BODY_BYTES - BODY_MARGIN) as u32;
    let mut classes = vec![BatchClass {
        name: EVENTS,
        max_items: limits::BULK_EVENTS as u32,
        max_bytes,
        // An entry's wrapping, and the profile repeated once per entry.
        item_overhead_bytes: 160,
        max_wait_ms: MAX_WAIT_MS,
        rate_class: klaviyo::BULK_EVENTS_RATE.name,
    }];
    if settings.bulk_profiles {
        classes.push(BatchClass {
            name: PROFILES,
            max_items: limits::BULK_PROFILES as u32,
            max_bytes,
            item_overhead_bytes: 16,
            // Each job also costs follow-ups from a budget of 150 a
            // minute: fewer, fuller jobs.
            max_wait_ms: 4 * MAX_WAIT_MS,
            rate_class: klaviyo::BULK_PROFILES_RATE.name,
        });
    }
    classes
}

/// A Create Event or profile import request as a bulk item, when the
/// settings batch it.
pub fn batchable(settings: &Settings, request: &Request) -> Option<BatchItem> {
    if !settings.batching || request.method != "POST" {
        return None;
    }
    let body: Value = serde_json::from_str(&request.body).ok()?;
    match path(&request.url) {
        klaviyo::EVENTS_PATH => {
            let attributes = body.pointer("/data/attributes")?;
            let metric = attributes.pointer("/metric/data/attributes/name")?.as_str()?;
            let profile = attributes.pointer("/profile/data/attributes")?;
            let dedupe_key = attributes
                .get("unique_id")
                .and_then(Value::as_str)
                .map(|unique_id| format!("{}\u{0}{metric}\u{0}{unique_id}", identity(profile)));
            Some(BatchItem {
                class: EVENTS.to_string(),
                item: request.body.clone(),
                dedupe_key,
            })
        }
        klaviyo::PROFILE_IMPORT_PATH if settings.bulk_profiles => {
            let attributes = body.pointer("/data/attributes")?;
            Some(BatchItem {
                class: PROFILES.to_string(),
                item: request.body.clone(),
                // One person once per job: two imports of the same profile
                // in one job would land in no defined order.
                dedupe_key: Some(identity(attributes)),
            })
        }
        _ => None,
    }
}

/// Who a profile is: its identifiers, as Klaviyo matches them.
fn identity(attributes: &Value) -> String {
    let field = |name: &str| attributes.get(name).and_then(Value::as_str).unwrap_or_default();
    format!(
        "{}\u{0}{}\u{0}{}",
        field("email").to_lowercase(),
        field("phone_number"),
        field("external_id")
    )
}

/// One bulk request carrying `items`.
pub fn assemble(settings: &Settings, class: &str, items: &[String]) -> Result<Request, String> {
    match class {
        EVENTS => {
            let entries = event_entries(items)?;
            let data: Vec<Value> = entries
                .into_iter()
                .map(|entry| {
                    json!({"type": "event-bulk-create", "attributes": {
                        "profile": {"data": entry.profile},
                        "events": {"data": entry.events},
                    }})
                })
                .collect();
            let body = json!({"data": {"type": "event-bulk-create-job", "attributes": {
                "events-bulk-create": {"data": data},
            }}});
            Ok(post(
                klaviyo::BULK_EVENTS_PATH,
                &body,
                &klaviyo::BULK_EVENTS_RATE,
                settings,
            ))
        }
        PROFILES => {
            let mut profiles = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let mut body: Value =
                    serde_json::from_str(item).map_err(|e| format!("item {index} is not JSON: {e}"))?;
                profiles.push(body.get_mut("data").map(Value::take).unwrap_or(Value::Null));
            }
            let body = json!({"data": {"type": "profile-bulk-import-job", "attributes": {
                "profiles": {"data": profiles},
            }}});
            Ok(post(
                klaviyo::BULK_PROFILES_PATH,
                &body,
                &klaviyo::BULK_PROFILES_RATE,
                settings,
            ))
        }
        other => Err(format!("no batch class {other:?}")),
    }
}

/// One entry of a bulk create job: a profile and its events, with the
/// index of each event's item.
struct Entry {
    profile: Value,
    events: Vec<Value>,
    items: Vec<usize>,
}

/// Items grouped per profile, in order of first appearance (the same
/// grouping in `assemble` and `judge`, so a pointer names an item).
fn event_entries(items: &[String]) -> Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut by_profile: HashMap<String, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let mut body: Value = serde_json::from_str(item).map_err(|e| format!("item {index} is not JSON: {e}"))?;
        let Some(attributes) = body.pointer_mut("/data/attributes").and_then(Value::as_object_mut) else {
            return Err(format!("item {index} has no event attributes"));
        };
        let mut profile = attributes
            .remove("profile")
            .and_then(|mut p| p.get_mut("data").map(Value::take))
            .unwrap_or(Value::Null);
        if let Some(profile) = profile.as_object_mut() {
            profile.insert("type".into(), json!("profile"));
        }
        let event = json!({"type": "event", "attributes": Value::Object(std::mem::take(attributes))});
        let key = profile.to_string();
        let at = *by_profile.entry(key).or_insert_with(|| {
            entries.push(Entry {
                profile,
                events: Vec::new(),
                items: Vec::new(),
            });
            entries.len() - 1
        });
        entries[at].events.push(event);
        entries[at].items.push(index);
    }
    Ok(entries)
}

/// Judges a bulk request's response, or a follow-up's.
pub fn judge(class: &str, items: &[String], request: &Request, response: &Response) -> BatchVerdict {
    let all = |verdict: ItemVerdict| BatchVerdict::Items(vec![verdict; items.len()]);
    let endpoint = path(&request.url);
    if request.method == "GET" {
        return judge_job(items, request, response);
    }
    if (200..300).contains(&response.status) {
        if class == PROFILES {
            return match job_id(response) {
                Some(id) => follow(job_url(&id), POLL_MS, Vec::new(), request),
                None => all(ItemVerdict::Rejected(format!(
                    "Klaviyo accepted the bulk import ({}) without naming its job, so its outcome cannot be known",
                    response.status
                ))),
            };
        }
        return all(ItemVerdict::Delivered);
    }
    // The single endpoint's judgement covers what applies to a whole request.
    let verdict = crate::interpret::interpret(request, response);
    match verdict {
        Verdict::Retry(after) => BatchVerdict::Retry(after),
        Verdict::Rejected(_) if response.status == 400 && endpoint == klaviyo::BULK_EVENTS_PATH => {
            rejected_items(items, response).unwrap_or_else(|| all(ItemVerdict::Rejected(bulk_reason(response))))
        }
        Verdict::Rejected(reason) => all(ItemVerdict::Rejected(reason)),
        Verdict::Delivered => all(ItemVerdict::Delivered),
        Verdict::Replace(_) => all(ItemVerdict::Rejected(format!(
            "Klaviyo answered {} to a bulk request",
            response.status
        ))),
    }
}

/// The items a bulk 400's pointers name, each rejected with its error; the
/// others are sent again. None when no error names an item.
fn rejected_items(items: &[String], response: &Response) -> Option<BatchVerdict> {
    let entries = event_entries(items).ok()?;
    let body: Value = serde_json::from_str(&response.body).ok()?;
    let mut verdicts = vec![ItemVerdict::Retry(None); items.len()];
    let mut named = false;
    for error in body.get("errors")?.as_array()? {
        let Some(pointer) = error.pointer("/source/pointer").and_then(Value::as_str) else {
            continue;
        };
        let Some(rest) = pointer.strip_prefix("/data/attributes/events-bulk-create/data/") else {
            continue;
        };
        let mut parts = rest.split('/');
        let Some(entry) = parts
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| entries.get(i))
        else {
            continue;
        };
        let within = parts.collect::<Vec<_>>();
        let reason = |field: &str| {
            format!(
                "Klaviyo rejected this event in a bulk request ({}){field}",
                summary(error, 400)
            )
        };
        match within.as_slice() {
            ["attributes", "events", "data", j, field @ ..] => {
                if let Some(&item) = j.parse::<usize>().ok().and_then(|j| entry.items.get(j)) {
                    verdicts[item] = ItemVerdict::Rejected(reason(&field_name(field)));
                    named = true;
                }
            }
            // The entry's profile (or the entry itself): all its events.
            _ => {
                for &item in &entry.items {
                    verdicts[item] = ItemVerdict::Rejected(reason(&field_name(&within)));
                    named = true;
                }
            }
        }
    }
    named.then_some(BatchVerdict::Items(verdicts))
}

/// "; the field is attributes/time", from the pointer's tail.
fn field_name(parts: &[&str]) -> String {
    if parts.is_empty() {
        String::new()
    } else {
        format!("; the field is {}", parts.join("/"))
    }
}

fn summary(error: &Value, status: u16) -> String {
    let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("");
    let detail = if text("detail").is_empty() {
        text("title")
    } else {
        text("detail")
    };
    format!("{status} {}: {detail}", text("code"))
}

fn bulk_reason(response: &Response) -> String {
    let first = serde_json::from_str::<Value>(&response.body)
        .ok()
        .and_then(|v| v.get("errors")?.get(0).cloned())
        .unwrap_or(Value::Null);
    format!(
        "Klaviyo rejected the whole bulk request ({}), naming no event",
        summary(&first, response.status)
    )
}

/// A bulk import job's status, or a page of its errors.
fn judge_job(items: &[String], request: &Request, response: &Response) -> BatchVerdict {
    let all = |verdict: ItemVerdict| BatchVerdict::Items(vec![verdict; items.len()]);
    if !(200..300).contains(&response.status) {
        return match crate::interpret::interpret(request, response) {
            // The job was accepted; asking about it again is always safe.
            Verdict::Retry(after) => follow(request.url.clone(), after.unwrap_or(POLL_MS), Vec::new(), request),
            Verdict::Rejected(reason) => all(ItemVerdict::Rejected(format!(
                "the bulk import was accepted, but its outcome could not be read: {reason}"
            ))),
            _ => follow(request.url.clone(), POLL_MS, Vec::new(), request),
        };
    }
    let Ok(body) = serde_json::from_str::<Value>(&response.body) else {
        return follow(request.url.clone(), POLL_MS, Vec::new(), request);
    };
    if request.url.contains("/import-errors") {
        return import_errors(items, &body, request);
    }
    let attributes = body.pointer("/data/attributes").cloned().unwrap_or(Value::Null);
    let id = body.pointer("/data/id").and_then(Value::as_str).unwrap_or_default();
    match attributes.get("status").and_then(Value::as_str) {
        Some("complete") => {
            let failed = attributes.get("failed_count").and_then(Value::as_u64).unwrap_or(0);
            if failed == 0 {
                all(ItemVerdict::Delivered)
            } else {
                follow(
                    format!("{}/import-errors?page[size]={ERRORS_PAGE}", job_url(id)),
                    0,
                    Vec::new(),
                    request,
                )
            }
        }
        Some("cancelled") => all(ItemVerdict::Retry(None)),
        _ => follow(request.url.clone(), POLL_MS, Vec::new(), request),
    }
}

/// A page of import errors: the profiles it names are rejected; the next
/// page is read, and once none is left every other profile is delivered.
/// An error that names no profile of the batch leaves every profile not
/// named sent again (an import is an upsert, so that is safe): which one
/// failed cannot be known.
fn import_errors(items: &[String], body: &Value, request: &Request) -> BatchVerdict {
    let mut decided = Vec::new();
    let mut unattributed = false;
    for error in body.get("data").and_then(Value::as_array).into_iter().flatten() {
        let attributes = error.get("attributes").unwrap_or(error);
        let pointer = attributes
            .pointer("/source/pointer")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let index = pointer
            .strip_prefix("/data/attributes/profiles/data/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|&i| (i as usize) < items.len());
        let code = attributes.get("code").and_then(Value::as_str).unwrap_or_default();
        if let Some(index) = index
            && code == "duplicate_profile"
        {
            // Its email and phone belong to two profiles: profile-import
            // answers 409 for that, and `interpret` resends it without the
            // phone; bulk import offers no such remedy.
            decided.push((index, ItemVerdict::Alone));
        } else if let Some(index) = index {
            let reason = format!(
                "Klaviyo's bulk import rejected this profile ({})",
                summary(attributes, 400).trim_start_matches("400 ")
            );
            decided.push((index, ItemVerdict::Rejected(reason)));
        } else {
            unattributed = true;
        }
    }
    let next = body
        .pointer("/links/next")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    match next {
        Some(next) if !unattributed => follow(next.to_string(), 0, decided, request),
        _ => {
            let rest = if unattributed {
                ItemVerdict::Retry(None)
            } else {
                ItemVerdict::Delivered
            };
            let mut verdicts = vec![rest; items.len()];
            for (index, verdict) in decided {
                verdicts[index as usize] = verdict;
            }
            BatchVerdict::Items(verdicts)
        }
    }
}

fn job_id(response: &Response) -> Option<String> {
    let body: Value = serde_json::from_str(&response.body).ok()?;
    Some(body.pointer("/data/id")?.as_str()?.to_string())
}

fn job_url(id: &str) -> String {
    format!("https://{}{}/{id}", klaviyo::HOST, klaviyo::BULK_PROFILES_PATH)
}

/// A follow-up GET with the headers of the request it follows.
fn follow(url: String, after_ms: u64, decided: Vec<(u32, ItemVerdict)>, previous: &Request) -> BatchVerdict {
    let url = if url.starts_with("https://") {
        url
    } else {
        format!("https://{}{url}", klaviyo::HOST)
    };
    let headers: Vec<Header> = previous
        .headers
        .iter()
        .filter(|h| h.name != "content-type")
        .cloned()
        .collect();
    BatchVerdict::FollowUp(FollowUp {
        request: Request {
            method: "GET".to_string(),
            url,
            headers,
            body: String::new(),
            idempotency_key: None,
            rate_class: klaviyo::BULK_JOBS_RATE.name.to_string(),
        },
        after_ms,
        decided,
    })
}

fn post(path: &str, body: &Value, rate: &crate::contract::RateClass, settings: &Settings) -> Request {
    let mut request = crate::request::post(path, body, String::new(), rate, settings);
    request.idempotency_key = None;
    request
}
