//! `track` -> Klaviyo Create Event (`POST /api/events`), under the event's
//! own name, and optionally one `Ordered Product` per item of an order.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::contract::{Outcome, Request};
use crate::event::ChordEvent;
use crate::identity::Identity;
use crate::klaviyo::{self, limits};
use crate::limits::{Changes, fit_event_properties, fit_object, json_size, members_fit};
use crate::profile::{self, Scope};
use crate::request::{self, Resource};
use crate::settings::Settings;
use crate::time;

/// The event Chord's SDK and OMS send when an order is placed.
const ORDER_COMPLETED: &str = "Order Completed";

pub fn map(
    event: &ChordEvent,
    settings: &Settings,
    now_unix_ms: i64,
    warnings: &mut Vec<String>,
) -> (Outcome, Option<String>) {
    let name = match metric_name(event) {
        Ok(name) => name,
        Err(reason) => return (Outcome::Error(reason), None),
    };
    if settings.skip_events.iter().any(|skip| skip == name) {
        return (Outcome::Skip(format!("{}: {name:?}", crate::SKIP_EVENTS_SETTING)), None);
    }
    let identity = Identity::resolve(event, settings, warnings);
    let ordering_key = identity.ordering_key();
    if ordering_key.is_none() {
        return (
            Outcome::Skip(format!(
                "{}: Chord sends Klaviyo only events that carry one",
                crate::NO_EMAIL_OR_PHONE
            )),
            None,
        );
    }

    let base_id = unique_id(event, warnings);
    let time = event.timestamp().and_then(|t| match time::event_time(t, now_unix_ms) {
        Ok(time) => Some(time),
        Err(warning) => {
            warnings.push(warning);
            None
        }
    });
    let profile = match event_profile(event, &identity, warnings) {
        Ok(profile) => profile,
        Err(reason) => return (Outcome::Error(reason), ordering_key),
    };

    let mut changes = Changes::default();
    // Nearly every event's properties fit as sent, and then are passed on
    // as the very text they came in, never built into a tree.
    let members = event.members();
    if let Some(why) = &members.unreadable {
        return (
            Outcome::Error(format!("the event's properties are not valid JSON: {why}")),
            ordering_key,
        );
    }
    let properties = match event.properties_text() {
        Some(text) if members_fit(&members.members) => Properties::AsSent(text),
        None => Properties::Fitted(Map::new()),
        Some(_) => {
            let original = event.properties().cloned().unwrap_or_default();
            Properties::Fitted(fit_event_properties(original, &mut changes))
        }
    };
    let currency = currency(event.property("currency"), warnings);
    let attributes = EventAttributes {
        properties: &properties,
        time: time.as_deref(),
        value: ["revenue", "total", "value"]
            .iter()
            .find_map(|key| number(&event.property(key)?)),
        value_currency: currency.as_deref(),
        unique_id: &base_id,
        metric: Resource::document("metric", Metric { name }),
        profile: Resource::document("profile", &profile),
    };
    let mut requests = vec![event_request(&attributes, settings)];
    if settings.ordered_product_events
        && name == ORDER_COMPLETED
        && let Some(order) = event.properties()
    {
        requests.extend(ordered_products(
            order,
            &base_id,
            time.as_deref(),
            &profile,
            settings,
            &mut changes,
            warnings,
        ));
    }
    changes.into_warnings(warnings);

    if let Some(too_big) = requests.iter().find(|r| r.body.len() > limits::BODY_BYTES) {
        return (
            Outcome::Error(format!(
                "the Klaviyo request would be {} bytes, over Klaviyo's {} byte limit even after fitting the properties",
                too_big.body.len(),
                limits::BODY_BYTES
            )),
            ordering_key,
        );
    }
    (Outcome::Send(requests), ordering_key)
}

/// The metric name: `event` exactly as sent, non-empty, under 128 characters.
fn metric_name<'e>(event: &'e ChordEvent<'_>) -> Result<&'e str, String> {
    match event.name() {
        None | Some(Value::Null) => Err("a track event needs an `event` name; it has none".to_string()),
        Some(Value::String(name)) if name.trim().is_empty() => {
            Err("the `event` name is empty; Klaviyo needs a metric name".to_string())
        }
        Some(Value::String(name)) if name.chars().count() > limits::METRIC_NAME_CHARS => Err(format!(
            "the `event` name is {} characters long; Klaviyo metric names must be under {}",
            name.chars().count(),
            limits::METRIC_NAME_CHARS + 1
        )),
        Some(Value::String(name)) => Ok(name),
        Some(other) => Err(format!(
            "the `event` name is a JSON {}, not a string",
            crate::event::json_kind(other)
        )),
    }
}

/// `messageId`, Chord's idempotency key; without one (or one too long for
/// Klaviyo), a hash of the event, so a replayed event keeps the same id.
fn unique_id(event: &ChordEvent, warnings: &mut Vec<String>) -> String {
    match event.message_id() {
        Some(id) if id.chars().count() <= limits::ID_CHARS => id,
        Some(_) => {
            warnings.push(format!(
                "messageId is longer than {} characters; unique_id is a hash of it instead",
                limits::ID_CHARS
            ));
            event_hash(event)
        }
        None => event_hash(event),
    }
}

/// SHA-256 of the event's content, without the fields that change when the
/// same event is sent again (`sentAt`, `receivedAt`). serde_json keeps
/// object keys sorted, so the text hashed is canonical. An event whose
/// tree cannot be built (it is refused as invalid later) hashes its text.
pub fn event_hash(event: &ChordEvent) -> String {
    let Some(mut content) = event.to_value() else {
        return hex(&Sha256::digest(event.text().as_bytes()));
    };
    if let Some(content) = content.as_object_mut() {
        content.remove("sentAt");
        content.remove("receivedAt");
    }
    hex(&Sha256::digest(content.to_string().as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `profile` relationship's attributes: identifiers, `anonymous_id`,
/// and what `context.traits` says of names and address, within Klaviyo's
/// 95 KB.
fn event_profile(
    event: &ChordEvent,
    identity: &Identity,
    warnings: &mut Vec<String>,
) -> Result<Map<String, Value>, String> {
    let mut attributes = profile::attributes(event, identity, Scope::EventProfile, warnings);
    if let Some(anonymous_id) = event.anonymous_id() {
        attributes.insert("anonymous_id".into(), Value::String(anonymous_id));
    }
    let mut changes = Changes::default();
    let mut attributes = fit_object(attributes, "profile", 1, &mut changes);
    changes.into_warnings(warnings);
    let size = |attributes: &Map<String, Value>| json_size(&Resource::document("profile", attributes));
    if size(&attributes) > limits::EVENT_PROFILE_BYTES {
        attributes.retain(|key, _| matches!(key.as_str(), "email" | "phone_number" | "external_id" | "anonymous_id"));
        warnings.push(format!(
            "the event's profile is over Klaviyo's {} byte limit; only its identifiers are sent",
            limits::EVENT_PROFILE_BYTES
        ));
        if size(&attributes) > limits::EVENT_PROFILE_BYTES {
            return Err("the event's profile identifiers alone are over Klaviyo's profile size limit".to_string());
        }
    }
    Ok(attributes)
}

/// The `attributes` of a Create Event body but its `properties`
/// (`event_body` writes those). It is serialised straight from borrowed
/// parts: building it as a JSON tree first, then dropping it, cost as much
/// as all the rest of a small event's mapping.
#[derive(Serialize)]
struct EventAttributes<'a> {
    #[serde(skip)]
    properties: &'a Properties<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_currency: Option<&'a str>,
    unique_id: &'a str,
    metric: Resource<Metric<'a>>,
    profile: Resource<&'a Map<String, Value>>,
}

/// Event properties: as sent, or fitted into Klaviyo's limits.
enum Properties<'a> {
    /// The text of a JSON object, exactly as the event carried it.
    AsSent(&'a str),
    Fitted(Map<String, Value>),
}

#[derive(Serialize)]
struct Metric<'a> {
    name: &'a str,
}

fn event_request(attributes: &EventAttributes<'_>, settings: &Settings) -> Request {
    request::post_text(
        klaviyo::EVENTS_PATH,
        event_body(attributes),
        attributes.unique_id.to_string(),
        &klaviyo::EVENTS_RATE,
        settings,
    )
}

/// The Create Event body, `{"data":{"type":"event","attributes":{...}}}`,
/// with `properties` first. serde_json writes all of it but the
/// properties; properties as sent go in as their text, which the scan that
/// read the event has already checked, so a 200 KB product list is copied
/// once, not parsed again.
fn event_body(attributes: &EventAttributes<'_>) -> String {
    const OPEN: &str = r#"{"data":{"type":"event","attributes":{"#;
    let rest = serde_json::to_string(&Resource::document("event", attributes)).expect("event attributes serialize");
    // The attributes always hold `unique_id`, so a comma follows properties.
    let rest = rest
        .strip_prefix(OPEN)
        .expect("a resource document opens with its type");
    let fitted;
    let properties = match attributes.properties {
        Properties::AsSent(text) => *text,
        Properties::Fitted(map) => {
            fitted = serde_json::to_string(map).expect("a JSON map serializes");
            &fitted
        }
    };
    let mut body = String::with_capacity(OPEN.len() + 16 + properties.len() + rest.len());
    body.push_str(OPEN);
    body.push_str(r#""properties":"#);
    body.push_str(properties);
    body.push(',');
    body.push_str(rest);
    body
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

/// `currency` as an ISO 4217 code in upper case.
fn currency(currency: Option<Value>, warnings: &mut Vec<String>) -> Option<String> {
    let currency = currency?;
    let raw = currency.as_str()?.trim();
    if raw.len() == 3 && raw.chars().all(|c| c.is_ascii_alphabetic()) {
        Some(raw.to_ascii_uppercase())
    } else {
        warnings.push(format!(
            "currency {raw:?} is not an ISO 4217 code; value_currency is left out"
        ));
        None
    }
}

/// One `Ordered Product` per item of `products`: the item's own fields plus
/// `order_id`, `value` = price x quantity, and a `unique_id` made of the
/// order's id and the item's position and product id, so a replayed order
/// never counts an item twice.
fn ordered_products(
    order: &Map<String, Value>,
    order_id: &str,
    time: Option<&str>,
    profile: &Map<String, Value>,
    settings: &Settings,
    changes: &mut Changes,
    warnings: &mut Vec<String>,
) -> Vec<Request> {
    let Some(items) = order.get("products").and_then(Value::as_array) else {
        return Vec::new();
    };
    let currency = currency(order.get("currency").cloned(), &mut Vec::new());
    let mut requests = Vec::new();
    for (position, item) in items.iter().enumerate() {
        let Some(item) = item.as_object() else {
            warnings.push(format!(
                "properties.products[{position}] is not an object; no Ordered Product for it"
            ));
            continue;
        };
        let item_id = ["product_id", "sku", "id"]
            .iter()
            .find_map(|k| crate::event::id_text(item.get(*k)))
            .unwrap_or_default();
        let mut unique_id = format!("{order_id}:{position}:{item_id}");
        if unique_id.chars().count() > limits::ID_CHARS {
            unique_id = hex(&Sha256::digest(unique_id.as_bytes()));
        }
        let mut properties = item.clone();
        if let Some(id) = order.get("order_id") {
            properties.insert("order_id".into(), id.clone());
        }
        let properties = Properties::Fitted(fit_event_properties(properties, changes));
        let value = item.get("price").and_then(number).map(|price| {
            let quantity = item.get("quantity").and_then(number).unwrap_or(1.0);
            round(price * quantity)
        });
        requests.push(event_request(
            &EventAttributes {
                properties: &properties,
                time,
                value,
                value_currency: value.and(currency.as_deref()),
                unique_id: &unique_id,
                metric: Resource::document(
                    "metric",
                    Metric {
                        name: klaviyo::ORDERED_PRODUCT_METRIC,
                    },
                ),
                profile: Resource::document("profile", profile),
            },
            settings,
        ));
    }
    requests
}

/// Removes binary floating-point noise (89.1 * 3 = 267.29999999999995).
fn round(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}
