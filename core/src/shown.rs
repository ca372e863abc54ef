//! A request as it may be shown to a person (the dry run, a dead letter):
//! lower-case header names, secrets as `***`, the body as JSON when it is
//! JSON. A body is bytes to the host: it is checked to be JSON and copied
//! out as it is, never parsed into a tree and printed again.

use std::io::Write;

use serde::{Serialize, Serializer};
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
#[derive(Clone, Debug)]
pub enum ShownBody {
    /// Text that `json_scan` found to be one JSON value.
    Json(String),
    Text(String),
}

impl ShownBody {
    /// `checked`: an object's text known to be JSON that the body may copy
    /// (the event's `properties`, checked when the host read the event);
    /// that part is compared rather than scanned again.
    fn new(body: String, checked: Option<&str>) -> ShownBody {
        if body.is_empty() {
            return ShownBody::Text(body);
        }
        // Validating without building a tree; the text is kept as it is.
        let verdict = match checked {
            Some(checked) => json_scan::validate_around(&body, checked),
            None => json_scan::validate(&body),
        };
        match verdict {
            Ok(()) => ShownBody::Json(body),
            // What the scanner refuses and serde_json accepts (nesting past
            // 128) is still JSON.
            Err(_) if serde_json::from_str::<&RawValue>(&body).is_ok() => ShownBody::Json(body),
            Err(_) => ShownBody::Text(body),
        }
    }

    /// The body as a JSON value, written out as it is.
    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self {
            ShownBody::Json(text) => out.write_all(text.trim_matches([' ', '\n', '\t', '\r']).as_bytes()),
            ShownBody::Text(text) => Ok(serde_json::to_writer(out, text)?),
        }
    }
}

impl Serialize for ShownBody {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            // serde_json embeds JSON text only as a `RawValue`, which checks
            // it again; `write_json` is the fast way, for `map`.
            ShownBody::Json(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) => raw.serialize(serializer),
                Err(_) => serializer.serialize_str(text),
            },
            ShownBody::Text(text) => serializer.serialize_str(text),
        }
    }
}

impl ShownRequest {
    /// The request as `serde_json` writes it, with the body copied out as
    /// it is instead of checked again.
    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(br#"{"method":"#)?;
        serde_json::to_writer(&mut *out, &self.method)?;
        out.write_all(br#","url":"#)?;
        serde_json::to_writer(&mut *out, &self.url)?;
        out.write_all(br#","headers":"#)?;
        serde_json::to_writer(&mut *out, &self.headers)?;
        out.write_all(br#","body":"#)?;
        self.body.write_json(out)?;
        out.write_all(b"}")
    }

    pub fn new(request: &HttpRequest, settings: &DestinationSettings) -> ShownRequest {
        ShownRequest::from_owned(request.clone(), settings)
    }

    /// A request shown with its secrets masked, which needs no settings
    /// (see `settings::redacted_headers`).
    pub fn redacted(request: &HttpRequest) -> ShownRequest {
        let headers = crate::settings::redacted_headers(request)
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, Value::String(h.value)))
            .collect();
        ShownRequest {
            method: request.method.clone(),
            url: request.url.clone(),
            headers,
            body: ShownBody::new(request.body.clone(), None),
        }
    }

    /// The same, taking the request's strings rather than copying them.
    pub fn from_owned(request: HttpRequest, settings: &DestinationSettings) -> ShownRequest {
        ShownRequest::from_owned_around(request, settings, None)
    }

    /// The same, for a request mapped from an event of which `checked` (an
    /// object's text, `MappedEvent::checked`) is known to be JSON.
    pub fn from_owned_around(
        request: HttpRequest,
        settings: &DestinationSettings,
        checked: Option<&str>,
    ) -> ShownRequest {
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
            body: ShownBody::new(request.body, checked),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ShownBody;

    fn is_json(body: &ShownBody) -> bool {
        matches!(body, ShownBody::Json(_))
    }

    /// A body that copies the event's checked `properties` is JSON; the
    /// plugin's own text around the copy is still checked, and a copy that
    /// differs is checked whole.
    #[test]
    fn a_body_copying_checked_properties_is_checked_around_them() {
        let products: Vec<String> = (0..20).map(|i| format!(r#"{{"sku":"X-{i}","price":9.5}}"#)).collect();
        let properties = format!(r#"{{"products":[{}],"email":"a@example.org"}}"#, products.join(","));
        let body = format!(r#"{{"data":{{"type":"event","attributes":{{"properties":{properties}}}}}}}"#);
        assert!(is_json(&ShownBody::new(body.clone(), Some(&properties))));
        let broken = body.replacen(r#""type":"event""#, r#""type":event"#, 1);
        assert!(!is_json(&ShownBody::new(broken, Some(&properties))));
        let altered = body.replacen("9.5}", "9.5.}", 1);
        assert!(!is_json(&ShownBody::new(altered, Some(&properties))));
        let unclosed = body.strip_suffix('}').unwrap().to_string();
        assert!(!is_json(&ShownBody::new(unclosed, Some(&properties))));
    }
}
