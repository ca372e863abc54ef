//! A request as it may be shown to a person (the dry run, a dead letter):
//! lower-case header names, secrets as `***`, the body as JSON when it is
//! JSON.

use serde::Serialize;
use serde_json::Value;

use plugin_runtime::HttpRequest;

use crate::settings::{DestinationSettings, Render};

#[derive(Clone, Debug, Serialize)]
pub struct ShownRequest {
    pub method: String,
    pub url: String,
    pub headers: serde_json::Map<String, Value>,
    pub body: Value,
}

impl ShownRequest {
    pub fn new(request: &HttpRequest, settings: &DestinationSettings) -> ShownRequest {
        let headers = settings
            .render_headers(request, Render::Redacted)
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, Value::String(h.value)))
            .collect();
        let body = serde_json::from_str(&request.body).unwrap_or_else(|_| Value::String(request.body.clone()));
        ShownRequest {
            method: request.method.clone(),
            url: request.url.clone(),
            headers,
            body,
        }
    }
}
