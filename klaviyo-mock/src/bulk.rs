//! Klaviyo's bulk endpoints, checked the way the sandbox assumes Klaviyo
//! checks them (`shared/klaviyo/API-NOTES.md` §4 and §11):
//!
//! - `POST /api/event-bulk-create-jobs`: every event is validated as Create
//!   Event validates it, and any bad item rejects the whole request with a
//!   JSON:API 400, one error per bad item, each with a `source.pointer` into
//!   the bulk body (Segment's handler reads them so; Klaviyo does not say
//!   whether one bad item fails the request, and the strict reading is the
//!   one a client must survive). A (profile, metric, `unique_id`) repeated
//!   inside one request is such an error (the spec says the request fails).
//!   At most 1,000 events.
//! - `POST /api/profile-bulk-import-jobs`: the document's shape is checked
//!   at once (a 400), at most 10,000 profiles; each profile's own errors
//!   (a bad email, a too-large profile) are the job's import errors, read
//!   later, as Klaviyo reports them. The job is asynchronous: `queued` when
//!   created, applied and `complete` once its processing time has passed.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::validate::{self, ApiError, EventInput, ProfileInput};

pub const MAX_BULK_EVENTS: usize = 1000;
pub const MAX_BULK_PROFILES: usize = 10_000;
/// Errors listed in one 400; the rest are counted in the last one's detail.
const MAX_ERRORS_LISTED: usize = 100;

const ENTRIES: &str = "/data/attributes/events-bulk-create/data";

/// Every event of a bulk create request, or the request's 400.
pub fn events(body: &Value, now: DateTime<Utc>, marker: Option<&str>) -> Result<Vec<EventInput>, ApiError> {
    expect(body, "/data", "event-bulk-create-job")?;
    let entries = body
        .pointer(ENTRIES)
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("'events-bulk-create' must hold a data array.", ENTRIES))?;
    let total: usize = entries
        .iter()
        .map(|entry| {
            entry
                .pointer("/attributes/events/data")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        })
        .sum();
    if total > MAX_BULK_EVENTS {
        return Err(ApiError::invalid(
            format!("A bulk request may hold at most {MAX_BULK_EVENTS} events; this one holds {total}."),
            ENTRIES,
        ));
    }
    let mut accepted = Vec::with_capacity(total);
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("{ENTRIES}/{i}");
        if let Err(error) = expect(entry, "", "event-bulk-create") {
            errors.push(rebase(error, "", &at));
            continue;
        }
        let profile = entry.pointer("/attributes/profile").cloned().unwrap_or(Value::Null);
        let Some(items) = entry.pointer("/attributes/events/data").and_then(Value::as_array) else {
            errors.push(ApiError::invalid(
                "'events' must hold a data array.",
                &format!("{at}/attributes/events"),
            ));
            continue;
        };
        for (j, item) in items.iter().enumerate() {
            let event_at = format!("{at}/attributes/events/data/{j}");
            let mut attributes = item.get("attributes").cloned().unwrap_or(Value::Null);
            if let Value::Object(map) = &mut attributes {
                map.insert("profile".into(), profile.clone());
            }
            let single =
                json!({"data": {"type": item.get("type").cloned().unwrap_or(Value::Null), "attributes": attributes}});
            match refuse_marked(&single, marker, "/data/attributes/properties")
                .and_then(|()| validate::event(&single, now))
            {
                Ok(event) => {
                    if let Some(unique_id) = &event.unique_id {
                        let key = (identity(&event.profile), event.metric.clone(), unique_id.clone());
                        if !seen.insert(key) {
                            errors.push(ApiError::invalid(
                                format!(
                                    "Duplicate unique_id {unique_id:?} for this profile and metric within the request."
                                ),
                                &format!("{event_at}/attributes/unique_id"),
                            ));
                            continue;
                        }
                    }
                    accepted.push(event);
                }
                Err(error) => {
                    let error = if error
                        .pointer
                        .as_deref()
                        .is_some_and(|p| p.starts_with("/data/attributes/profile"))
                    {
                        rebase(error, "/data/attributes/profile", &format!("{at}/attributes/profile"))
                    } else {
                        rebase(error, "/data", &event_at)
                    };
                    errors.push(error);
                }
            }
        }
    }
    match gather(errors) {
        Some(error) => Err(error),
        None => Ok(accepted),
    }
}

/// A bulk import request's profiles, each valid or with its import error
/// (pointing into the request), or the request's 400.
pub fn profiles(body: &Value, marker: Option<&str>) -> Result<Vec<Result<ProfileInput, ApiError>>, ApiError> {
    expect(body, "/data", "profile-bulk-import-job")?;
    let at = "/data/attributes/profiles/data";
    let items = body
        .pointer(at)
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("'profiles' must hold a data array.", "/data/attributes/profiles"))?;
    if items.len() > MAX_BULK_PROFILES {
        return Err(ApiError::invalid(
            format!(
                "A bulk import may hold at most {MAX_BULK_PROFILES} profiles; this one holds {}.",
                items.len()
            ),
            at,
        ));
    }
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let size = serde_json::to_vec(item).map_or(0, |v| v.len());
            let single = json!({ "data": item });
            refuse_marked(&single, marker, "/data/attributes")
                .and_then(|()| validate::profile_import(&single, size))
                .map_err(|error| rebase(error, "/data", &format!("{at}/{i}")))
        })
        .collect())
}

/// The injected fault `invalid_marker`: a document containing the marker
/// is refused, pointing at `at`.
pub fn refuse_marked(document: &Value, marker: Option<&str>, at: &str) -> Result<(), ApiError> {
    match marker {
        Some(marker) if document.to_string().contains(marker) => Err(ApiError::invalid(
            format!("This value was refused by the sandbox's injected fault (it contains {marker:?})."),
            at,
        )),
        _ => Ok(()),
    }
}

/// Who a profile is, for telling duplicates apart within one request.
fn identity(profile: &ProfileInput) -> String {
    let email = profile.email.as_deref().map(str::to_lowercase).unwrap_or_default();
    let phone = profile.phone_number.as_deref().unwrap_or_default();
    let external = profile.external_id.as_deref().unwrap_or_default();
    format!("{email}\u{0}{phone}\u{0}{external}")
}

fn expect(value: &Value, at: &str, kind: &str) -> Result<(), ApiError> {
    match value.pointer(&format!("{at}/type")).and_then(Value::as_str) {
        Some(found) if found == kind => Ok(()),
        Some(found) => Err(ApiError::invalid(
            format!("Expected type {kind:?}, found {found:?}."),
            &format!("{at}/type"),
        )),
        None => Err(ApiError::invalid(
            format!("'type' is required and must be {kind:?}."),
            &format!("{at}/type"),
        )),
    }
}

/// The error, its pointer moved from under `from` to under `to`.
fn rebase(mut error: ApiError, from: &str, to: &str) -> ApiError {
    error.pointer = Some(match error.pointer.as_deref() {
        Some(pointer) => format!("{to}{}", pointer.strip_prefix(from).unwrap_or(pointer)),
        None => to.to_string(),
    });
    error
}

/// One 400 listing every error (up to a bound), or none.
fn gather(mut errors: Vec<ApiError>) -> Option<ApiError> {
    if errors.is_empty() {
        return None;
    }
    let unlisted = errors.len().saturating_sub(MAX_ERRORS_LISTED);
    errors.truncate(MAX_ERRORS_LISTED);
    if unlisted > 0
        && let Some(last) = errors.last_mut()
    {
        last.detail
            .push_str(&format!(" ({unlisted} more errors are not listed.)"));
    }
    let mut first = errors.remove(0);
    first.more = errors.into_boxed_slice();
    Some(first)
}
