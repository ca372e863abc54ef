//! Building a Klaviyo request descriptor: the headers every call carries
//! and a JSON:API body.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::contract::{Header, RateClass, Request};
use crate::klaviyo;
use crate::settings::Settings;

/// A `POST` to `path` on Klaviyo with the standard headers.
pub fn post(
    path: &str,
    body: &impl Serialize,
    idempotency_key: String,
    rate: &RateClass,
    settings: &Settings,
) -> Request {
    // `to_string` via `Display` goes through `fmt::Write` piece by piece;
    // serializing straight to bytes is about twice as fast.
    let body = serde_json::to_string(body).expect("a JSON value serializes");
    post_text(path, body, idempotency_key, rate, settings)
}

/// The same, with the body already written as JSON text.
pub fn post_text(path: &str, body: String, idempotency_key: String, rate: &RateClass, settings: &Settings) -> Request {
    Request {
        method: "POST".to_string(),
        url: format!("https://{}{}", klaviyo::HOST, path),
        headers: vec![
            header("authorization", klaviyo::AUTHORIZATION),
            header("revision", &settings.revision),
            header("content-type", klaviyo::MEDIA_TYPE),
            header("accept", klaviyo::MEDIA_TYPE),
        ],
        body,
        idempotency_key: Some(idempotency_key),
        rate_class: rate.name.to_string(),
    }
}

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.to_string(),
        value: value.to_string(),
    }
}

/// `{"data": {"type": kind, "attributes": attributes}}`, a JSON:API
/// resource, built by moving `attributes` in (`json!` would copy it through
/// serde, which costs as much as the rest of a small event's mapping).
pub fn resource(kind: &str, attributes: Map<String, Value>) -> Value {
    let mut data = Map::new();
    data.insert("type".into(), Value::String(kind.to_string()));
    data.insert("attributes".into(), Value::Object(attributes));
    let mut document = Map::new();
    document.insert("data".into(), Value::Object(data));
    Value::Object(document)
}

/// A JSON:API resource document, `{"data": {"type": kind, "attributes":
/// ...}}`, serialised from typed, borrowed attributes.
#[derive(Serialize)]
pub struct Resource<T> {
    data: Data<T>,
}

#[derive(Serialize)]
struct Data<T> {
    #[serde(rename = "type")]
    kind: &'static str,
    attributes: T,
}

impl<T> Resource<T> {
    pub fn document(kind: &'static str, attributes: T) -> Resource<T> {
        Resource {
            data: Data { kind, attributes },
        }
    }
}

/// The path of a request URL (`/api/events`), for telling endpoints apart.
pub fn path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    path.split(['?', '#']).next().unwrap_or(path)
}
