//! Klaviyo's request rules, checked the way Klaviyo checks them, with
//! Klaviyo-shaped JSON:API errors. Written from Klaviyo's documentation
//! (`shared/klaviyo/API-NOTES.md`), independently of the plugin, so that a
//! plugin bug shows up as a 400 here rather than being shared by both.

use std::sync::LazyLock;

use chrono::{DateTime, Duration, Utc};
use regex::Regex;
use serde_json::{Map, Value, json};

/// A Klaviyo API error: status, code and detail, and what it points at.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub pointer: Option<String>,
    pub meta: Map<String, Value>,
    /// Further errors answered in the same response (a bulk request lists
    /// one per bad item).
    pub more: Box<[ApiError]>,
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>, pointer: &str) -> ApiError {
        ApiError {
            status: 400,
            code: "invalid",
            title: "Invalid input.",
            detail: detail.into(),
            pointer: Some(pointer.to_string()),
            meta: Map::new(),
            more: Box::default(),
        }
    }

    pub fn new(status: u16, code: &'static str, title: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            title,
            detail: detail.into(),
            pointer: None,
            meta: Map::new(),
            more: Box::default(),
        }
    }

    /// The JSON:API error document.
    pub fn body(&self, id: &str) -> Value {
        let errors: Vec<Value> = std::iter::once(self)
            .chain(self.more.iter())
            .enumerate()
            .map(|(n, error)| error.object(&if n == 0 { id.to_string() } else { format!("{id}-{n}") }))
            .collect();
        json!({ "errors": errors })
    }

    fn object(&self, id: &str) -> Value {
        let mut error = json!({
            "id": id,
            "status": self.status,
            "code": self.code,
            "title": self.title,
            "detail": self.detail,
            "links": {},
            "meta": self.meta,
        });
        if let Some(pointer) = &self.pointer {
            error["source"] = json!({ "pointer": pointer });
        }
        error
    }
}

pub const MAX_BODY_BYTES: usize = 5 * 1024 * 1024;
const MAX_PROFILE_IMPORT_BYTES: usize = 100 * 1024;
const MAX_EVENT_PROFILE_BYTES: usize = 95 * 1024;
const MAX_PROPERTIES: usize = 400;
const MAX_STRING_BYTES: usize = 100 * 1024;
const MAX_ARRAY_ITEMS: usize = 4000;
const MAX_DEPTH: usize = 10;
const MAX_METRIC_NAME: usize = 127;

static E164: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\+[1-9][0-9]{6,14}$").unwrap());
static EMAIL: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[^@\s]+@[^@\s]+\.[^@\s]+$").unwrap());

/// The profile identifiers and attributes of a request, once valid.
#[derive(Debug, Clone, Default)]
pub struct ProfileInput {
    pub email: Option<String>,
    pub phone_number: Option<String>,
    pub external_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub attributes: Map<String, Value>,
}

/// A valid Create Event request.
#[derive(Debug, Clone)]
pub struct EventInput {
    pub metric: String,
    pub unique_id: Option<String>,
    pub time: Option<String>,
    pub value: Option<f64>,
    pub properties: Map<String, Value>,
    pub profile: ProfileInput,
}

pub fn event(body: &Value, now: DateTime<Utc>) -> Result<EventInput, ApiError> {
    expect_type(body, "/data", "event")?;
    let attributes = object_at(body, "/data/attributes")?;
    let properties = attributes
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::invalid("'properties' is a required field.", "/data/attributes/properties"))?;
    if properties.len() > MAX_PROPERTIES {
        return Err(ApiError::invalid(
            format!("Event properties cannot exceed {MAX_PROPERTIES} keys."),
            "/data/attributes/properties",
        ));
    }
    check_values(&Value::Object(properties.clone()), "/data/attributes/properties", 1)?;
    expect_type(body, "/data/attributes/metric/data", "metric")?;
    let metric = body
        .pointer("/data/attributes/metric/data/attributes/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "A metric name is required.",
                "/data/attributes/metric/data/attributes/name",
            )
        })?;
    if metric.chars().count() > MAX_METRIC_NAME {
        return Err(ApiError::invalid(
            "Metric name must be less than 128 characters.",
            "/data/attributes/metric/data/attributes/name",
        ));
    }
    expect_type(body, "/data/attributes/profile/data", "profile")?;
    let profile_value = body.pointer("/data/attributes/profile").cloned().unwrap_or(Value::Null);
    if serde_json::to_vec(&profile_value).map(|v| v.len()).unwrap_or(0) > MAX_EVENT_PROFILE_BYTES {
        return Err(ApiError::invalid(
            "The profile object exceeds the maximum size of 95KB.",
            "/data/attributes/profile",
        ));
    }
    let profile = profile(body, "/data/attributes/profile/data/attributes", true)?;
    let unique_id = match attributes.get("unique_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if (1..=255).contains(&id.chars().count()) => Some(id.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "unique_id must be a string of 1 to 255 characters.",
                "/data/attributes/unique_id",
            ));
        }
    };
    let time = match attributes.get("time") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            let parsed = DateTime::parse_from_rfc3339(text).map_err(|_| {
                ApiError::invalid(format!("'{text}' is not a valid datetime."), "/data/attributes/time")
            })?;
            let parsed = parsed.with_timezone(&Utc);
            let earliest = DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc);
            if parsed < earliest || parsed > now + Duration::days(365) {
                return Err(ApiError::invalid(
                    "Event time must be after the year 2000 and no more than 1 year in the future.",
                    "/data/attributes/time",
                ));
            }
            Some(text.clone())
        }
        Some(_) => return Err(ApiError::invalid("time must be a string.", "/data/attributes/time")),
    };
    let value = match attributes.get("value") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(_) => return Err(ApiError::invalid("value must be a number.", "/data/attributes/value")),
    };
    if let Some(currency) = attributes.get("value_currency").filter(|v| !v.is_null()) {
        let ok = currency
            .as_str()
            .is_some_and(|c| c.len() == 3 && c.chars().all(|x| x.is_ascii_uppercase()));
        if !ok {
            return Err(ApiError::invalid(
                "value_currency must be an ISO 4217 currency code.",
                "/data/attributes/value_currency",
            ));
        }
    }
    Ok(EventInput {
        metric: metric.to_string(),
        unique_id,
        time,
        value,
        properties: properties.clone(),
        profile,
    })
}

pub fn profile_import(body: &Value, size: usize) -> Result<ProfileInput, ApiError> {
    if size > MAX_PROFILE_IMPORT_BYTES {
        return Err(ApiError::invalid(
            "The profile payload exceeds the maximum size of 100KB.",
            "/data",
        ));
    }
    expect_type(body, "/data", "profile")?;
    let profile = profile(body, "/data/attributes", false)?;
    if let Some(properties) = profile.attributes.get("properties") {
        check_values(properties, "/data/attributes/properties", 1)?;
    }
    Ok(profile)
}

/// A profile's identifiers and attributes at `at`; `anonymous_id` is only
/// accepted on event profiles (removed from profile endpoints in 2025).
fn profile(body: &Value, at: &str, event_profile: bool) -> Result<ProfileInput, ApiError> {
    let attributes = object_at(body, at)?;
    let text = |key: &str| -> Result<Option<String>, ApiError> {
        match attributes.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid(
                format!("{key} must be a string."),
                &format!("{at}/{key}"),
            )),
        }
    };
    let email = text("email")?;
    if let Some(email) = &email
        && (email.chars().count() > 100 || !EMAIL.is_match(email))
    {
        return Err(ApiError::invalid("Invalid email address", &format!("{at}/email")));
    }
    let phone_number = text("phone_number")?;
    if let Some(phone) = &phone_number
        && !E164.is_match(phone)
    {
        return Err(ApiError::invalid(
            "Invalid phone number format (Example of a valid format: +12345678901)",
            &format!("{at}/phone_number"),
        ));
    }
    let external_id = text("external_id")?;
    let anonymous_id = text("anonymous_id")?;
    if anonymous_id.is_some() && !event_profile {
        return Err(ApiError::invalid(
            "'anonymous_id' is not a valid field for the resource 'profile'.",
            &format!("{at}/anonymous_id"),
        ));
    }
    let has_id = body
        .pointer(&format!("{}/id", at.trim_end_matches("/attributes")))
        .is_some_and(Value::is_string);
    if email.is_none() && phone_number.is_none() && external_id.is_none() && anonymous_id.is_none() && !has_id {
        return Err(ApiError::invalid(
            "One of email, phone_number, external_id or id is required to identify a profile.",
            at,
        ));
    }
    Ok(ProfileInput {
        email,
        phone_number,
        external_id,
        anonymous_id,
        attributes: attributes.clone(),
    })
}

fn expect_type(body: &Value, at: &str, kind: &str) -> Result<(), ApiError> {
    match body.pointer(&format!("{at}/type")).and_then(Value::as_str) {
        Some(t) if t == kind => Ok(()),
        Some(t) => Err(ApiError::invalid(
            format!("'{t}' is not a valid type; expected '{kind}'."),
            &format!("{at}/type"),
        )),
        None => Err(ApiError::invalid(
            format!("'type' is a required field; expected '{kind}'."),
            &format!("{at}/type"),
        )),
    }
}

fn object_at<'a>(body: &'a Value, at: &str) -> Result<&'a Map<String, Value>, ApiError> {
    body.pointer(at).and_then(Value::as_object).ok_or_else(|| {
        ApiError::invalid(
            format!("'{}' is a required object.", at.rsplit('/').next().unwrap_or(at)),
            at,
        )
    })
}

/// String size, array length and object nesting limits, recursively.
fn check_values(value: &Value, at: &str, depth: usize) -> Result<(), ApiError> {
    match value {
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            Err(ApiError::invalid("String values cannot exceed 100KB.", at))
        }
        Value::Array(items) if items.len() > MAX_ARRAY_ITEMS => {
            Err(ApiError::invalid("Arrays cannot have more than 4000 items.", at))
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_values(v, &format!("{at}/{i}"), depth)),
        Value::Object(_) if depth > MAX_DEPTH => {
            Err(ApiError::invalid("Objects cannot be nested more than 10 levels.", at))
        }
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, v)| check_values(v, &format!("{at}/{k}"), depth + 1)),
        _ => Ok(()),
    }
}
