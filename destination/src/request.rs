//! Building a Klaviyo request descriptor: the headers every call carries
//! and a JSON:API body.

use serde_json::Value;

use crate::contract::{Header, RateClass, Request};
use crate::klaviyo;
use crate::settings::Settings;

/// A `POST` to `path` on Klaviyo with the standard headers.
pub fn post(path: &str, body: &Value, idempotency_key: String, rate: &RateClass, settings: &Settings) -> Request {
    Request {
        method: "POST".to_string(),
        url: format!("https://{}{}", klaviyo::HOST, path),
        headers: vec![
            header("authorization", klaviyo::AUTHORIZATION),
            header("revision", &settings.revision),
            header("content-type", klaviyo::MEDIA_TYPE),
            header("accept", klaviyo::MEDIA_TYPE),
        ],
        body: body.to_string(),
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

/// The path of a request URL (`/api/events`), for telling endpoints apart.
pub fn path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    path.split(['?', '#']).next().unwrap_or(path)
}
