//! A request as it may be shown to a person (the dry run, a dead letter):
//! lower-case header names, secrets as `***`, the body as JSON when it is
//! JSON. A body is bytes to the host: it is checked to be JSON and copied
//! out as it is, never parsed into a tree and printed again.

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use plugin_runtime::HttpRequest;

use crate::settings::{DestinationSettings, Render};

#[derive(Clone, Debug, Serialize)]
pub struct ShownRequest {
    pub method: String,
    pub url: String,
    pub headers: serde_json::Map<String, Value>,
    pub body: ShownBody,
}

/// A body: JSON, embedded as it was sent, or else text.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum ShownBody {
    Json(Box<RawValue>),
    Text(String),
}

impl ShownBody {
    fn new(body: String) -> ShownBody {
        if body.is_empty() {
            return ShownBody::Text(body);
        }
        // Validating without building a tree; the text is kept as it is.
        match serde_json::from_str::<&RawValue>(&body) {
            Ok(_) => ShownBody::Json(RawValue::from_string(body).expect("just validated")),
            Err(_) => ShownBody::Text(body),
        }
    }
}

impl ShownRequest {
    pub fn new(request: &HttpRequest, settings: &DestinationSettings) -> ShownRequest {
        ShownRequest::from_owned(request.clone(), settings)
    }

    /// The same, taking the request's strings rather than copying them.
    pub fn from_owned(request: HttpRequest, settings: &DestinationSettings) -> ShownRequest {
        let headers = settings
            .render_headers(&request, Render::Redacted)
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, Value::String(h.value)))
            .collect();
        ShownRequest {
            method: request.method,
            url: request.url,
            headers,
            body: ShownBody::new(request.body),
        }
    }
}
