//! Klaviyo's answers to our requests, judged: delivered, retry (and when),
//! rejected with a sentence an operator can act on, or a replacement for a
//! profile whose identifiers clash. Branches on status and error `code`,
//! never on `detail`, which Klaviyo may reword at any time.

use serde_json::Value;

use crate::contract::{Request, Response, Verdict};
use crate::klaviyo;
use crate::request::path;

/// Statuses that are worth another try: throttling, and the server-side
/// failures Klaviyo (and Cloudflare in front of it) answer when busy.
const TRANSIENT: &[u16] = &[408, 429, 500, 502, 503, 504, 524];

pub fn interpret(request: &Request, response: &Response) -> Verdict {
    let status = response.status;
    if (200..300).contains(&status) {
        return Verdict::Delivered;
    }
    if TRANSIENT.contains(&status) {
        return Verdict::Retry(retry_after_ms(response));
    }
    let error = KlaviyoError::parse(response);
    let endpoint = path(&request.url);
    let is_profile_import = endpoint == klaviyo::PROFILE_IMPORT_PATH;
    match status {
        409 if is_profile_import && error.code == "duplicate_profile" => without_phone(request, &error),
        401 => Verdict::Rejected(format!(
            "Klaviyo did not accept the API key ({}): check the api_key setting; it must be a private key (pk_...) of this Klaviyo account",
            error.summary(status)
        )),
        403 if error.is_html => Verdict::Retry(None),
        403 => {
            let scope = if endpoint == klaviyo::BULK_PROFILES_PATH {
                "the lists:write and profiles:write scopes that bulk profile import needs (the bulk_profiles setting); grant them in Klaviyo, Settings > API keys, or set bulk_profiles to false"
            } else if endpoint.starts_with(klaviyo::BULK_PROFILES_PATH) {
                "the lists:read and profiles:read scopes needed to read a bulk import job (the bulk_profiles setting); grant them in Klaviyo, Settings > API keys, or set bulk_profiles to false"
            } else if is_profile_import {
                "the profiles:write scope that identify needs (Chord's setup guide grants only Events); give the key Profiles: Full Access in Klaviyo, Settings > API keys"
            } else {
                "the events:write scope that track needs; give the key Events: Full Access in Klaviyo, Settings > API keys"
            };
            Verdict::Rejected(format!(
                "Klaviyo refused the API key ({}): it lacks {scope}",
                error.summary(status)
            ))
        }
        400 => Verdict::Rejected(format!(
            "Klaviyo rejected the request as invalid ({}){}",
            error.summary(status),
            error.field(request)
        )),
        410 => Verdict::Rejected(format!(
            "Klaviyo no longer serves API revision {} ({}): set the revision setting to a current revision, or update the plugin",
            request.header("revision").unwrap_or("(none)"),
            error.summary(status)
        )),
        413 => Verdict::Rejected(format!(
            "Klaviyo refused the body as too large ({}, {} bytes sent)",
            error.summary(status),
            request.body.len()
        )),
        _ => Verdict::Rejected(format!("Klaviyo answered {}", error.summary(status))),
    }
}

/// `Retry-After` (whole seconds, as Klaviyo sends it) in milliseconds.
fn retry_after_ms(response: &Response) -> Option<u64> {
    let seconds = response.header("retry-after")?.trim().parse::<f64>().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| (seconds * 1000.0).ceil() as u64)
}

/// Profile-import answers 409 `duplicate_profile` when the email and the
/// phone number belong to two different Klaviyo profiles. Sending the
/// profile again without the phone (kept as `phone_raw`) updates the email's
/// profile and loses nothing; with no phone to drop, it is a rejection.
fn without_phone(request: &Request, error: &KlaviyoError) -> Verdict {
    let conflict = match &error.duplicate_profile_id {
        Some(id) => format!("the email and phone number belong to different Klaviyo profiles (the other is {id})"),
        None => "the email and phone number belong to different Klaviyo profiles".to_string(),
    };
    let Ok(mut body) = serde_json::from_str::<Value>(&request.body) else {
        return Verdict::Rejected(format!("{conflict}, and the request body is not JSON"));
    };
    let Some(attributes) = body.pointer_mut("/data/attributes").and_then(Value::as_object_mut) else {
        return Verdict::Rejected(format!("{conflict}, and the request has no profile attributes"));
    };
    let Some(phone) = attributes.remove("phone_number").filter(|p| !p.is_null()) else {
        return Verdict::Rejected(format!(
            "{conflict}; there is no phone number left to drop (409 duplicate_profile)"
        ));
    };
    let properties = attributes
        .entry("properties")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(properties) = properties.as_object_mut() {
        properties.insert("phone_raw".into(), phone);
    }
    let mut replacement = request.clone();
    replacement.body = body.to_string();
    replacement.idempotency_key = request.idempotency_key.as_ref().map(|k| format!("{k}:without-phone"));
    Verdict::Replace(vec![replacement])
}

/// The first JSON:API error of a response, or what can be said of a body
/// that is not one (Klaviyo's edge sometimes answers in HTML).
struct KlaviyoError {
    code: String,
    detail: String,
    pointer: Option<String>,
    duplicate_profile_id: Option<String>,
    is_html: bool,
}

impl KlaviyoError {
    fn parse(response: &Response) -> KlaviyoError {
        let content_type = response.header("content-type").unwrap_or("");
        let first = serde_json::from_str::<Value>(&response.body)
            .ok()
            .and_then(|v| v.get("errors")?.get(0).cloned());
        match first {
            Some(error) => {
                let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_string();
                KlaviyoError {
                    code: text("code"),
                    detail: if text("detail").is_empty() {
                        text("title")
                    } else {
                        text("detail")
                    },
                    pointer: error
                        .pointer("/source/pointer")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    duplicate_profile_id: error
                        .pointer("/meta/duplicate_profile_id")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    is_html: false,
                }
            }
            None => {
                let snippet: String = response.body.split_whitespace().collect::<Vec<_>>().join(" ");
                let snippet: String = snippet.chars().take(120).collect();
                let kind = if content_type.is_empty() {
                    "no content type"
                } else {
                    content_type
                };
                KlaviyoError {
                    code: String::new(),
                    detail: format!("a body that is not a Klaviyo error ({kind}): {snippet:?}"),
                    pointer: None,
                    duplicate_profile_id: None,
                    is_html: content_type.contains("html") || response.body.trim_start().starts_with('<'),
                }
            }
        }
    }

    /// "400 invalid: Invalid phone number format".
    fn summary(&self, status: u16) -> String {
        match (self.code.is_empty(), self.detail.is_empty()) {
            (true, true) => format!("HTTP {status}"),
            (true, false) => format!("HTTP {status} with {}", self.detail),
            (false, true) => format!("{status} {}", self.code),
            (false, false) => format!("{status} {}: {}", self.code, self.detail),
        }
    }

    /// Which field of the event the error points at, and the value sent.
    fn field(&self, request: &Request) -> String {
        let Some(pointer) = self.pointer.as_deref() else {
            return String::new();
        };
        let sent = serde_json::from_str::<Value>(&request.body)
            .ok()
            .and_then(|body| body.pointer(pointer).cloned())
            .map(|value| {
                let text = value.to_string();
                let short: String = text.chars().take(80).collect();
                if short.len() < text.len() {
                    format!(" (sent {short}...)")
                } else {
                    format!(" (sent {short})")
                }
            })
            .unwrap_or_default();
        format!("; the field is {}{sent}", source_field(pointer, path(&request.url)))
    }
}

/// The event field a Klaviyo JSON pointer comes from, in Chord's terms.
fn source_field(pointer: &str, endpoint: &str) -> String {
    let last = pointer.rsplit('/').next().unwrap_or("");
    let traits = if endpoint == klaviyo::PROFILE_IMPORT_PATH {
        "traits"
    } else {
        "context.traits"
    };
    if let Some((_, key)) = pointer.split_once("/properties/") {
        let source = if pointer.contains("/profile/") || endpoint == klaviyo::PROFILE_IMPORT_PATH {
            "traits"
        } else {
            "properties"
        };
        return format!("{source}.{} (Klaviyo {pointer})", key.replace('/', "."));
    }
    let field = match last {
        "email" => format!("the email ({traits}.email or properties.email)"),
        "phone_number" => format!("the phone number ({traits}.phone or properties.phone)"),
        "external_id" => "userId".to_string(),
        "anonymous_id" => "anonymousId".to_string(),
        "name" if pointer.contains("/metric/") => "the event name (`event`)".to_string(),
        "time" => "timestamp".to_string(),
        "value" => "properties.revenue, total or value".to_string(),
        "value_currency" => "properties.currency".to_string(),
        "unique_id" => "messageId".to_string(),
        _ if pointer.contains("/location/") => format!("{traits}.address.{last}"),
        _ => format!("Klaviyo {pointer}"),
    };
    if field.starts_with("Klaviyo ") {
        field
    } else {
        format!("{field} (Klaviyo {pointer})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Header;

    fn request(path: &str, body: &str) -> Request {
        Request {
            method: "POST".into(),
            url: format!("https://a.klaviyo.com{path}"),
            headers: vec![Header {
                name: "revision".into(),
                value: "2026-07-15".into(),
            }],
            body: body.into(),
            idempotency_key: Some("k".into()),
            rate_class: "profiles".into(),
        }
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            body: body.into(),
        }
    }

    #[test]
    fn throttling_waits_for_retry_after() {
        let r = response(429, &[("Retry-After", "7")], r#"{"errors":[{"code":"throttled"}]}"#);
        assert_eq!(interpret(&request("/api/events", "{}"), &r), Verdict::Retry(Some(7000)));
    }

    #[test]
    fn a_duplicate_profile_is_sent_again_without_the_phone() {
        let req = request(
            "/api/profile-import",
            r#"{"data":{"type":"profile","attributes":{"email":"a@x.com","phone_number":"+16175550123"}}}"#,
        );
        let res = response(
            409,
            &[],
            r#"{"errors":[{"status":409,"code":"duplicate_profile","meta":{"duplicate_profile_id":"01J"}}]}"#,
        );
        let Verdict::Replace(replacement) = interpret(&req, &res) else {
            panic!()
        };
        let body: Value = serde_json::from_str(&replacement[0].body).unwrap();
        assert_eq!(body["data"]["attributes"]["phone_number"], Value::Null);
        assert_eq!(body["data"]["attributes"]["properties"]["phone_raw"], "+16175550123");
        let again = interpret(&replacement[0], &res);
        assert!(
            matches!(again, Verdict::Rejected(ref r) if r.contains("no phone number left")),
            "{again:?}"
        );
    }

    #[test]
    fn a_missing_scope_names_the_scope() {
        let res = response(
            403,
            &[],
            r#"{"errors":[{"code":"permission_denied","detail":"You do not have permission."}]}"#,
        );
        let Verdict::Rejected(reason) = interpret(&request("/api/profile-import", "{}"), &res) else {
            panic!()
        };
        assert!(reason.contains("profiles:write"), "{reason}");
    }

    #[test]
    fn a_bad_field_is_named_with_the_value_sent() {
        let req = request(
            "/api/events",
            r#"{"data":{"attributes":{"profile":{"data":{"attributes":{"phone_number":"+1555"}}}}}}"#,
        );
        let res = response(
            400,
            &[],
            r#"{"errors":[{"code":"invalid","detail":"Invalid phone number format","source":{"pointer":"/data/attributes/profile/data/attributes/phone_number"}}]}"#,
        );
        let Verdict::Rejected(reason) = interpret(&req, &res) else {
            panic!()
        };
        assert!(reason.contains("Invalid phone number format"), "{reason}");
        assert!(
            reason.contains("the phone number") && reason.contains("\"+1555\""),
            "{reason}"
        );
    }

    #[test]
    fn an_html_error_page_is_reported_not_parsed() {
        let res = response(
            400,
            &[("content-type", "text/html")],
            "<html><body>Bad Request</body></html>",
        );
        let Verdict::Rejected(reason) = interpret(&request("/api/events", "{}"), &res) else {
            panic!()
        };
        assert!(
            reason.contains("text/html") && reason.contains("Bad Request"),
            "{reason}"
        );
    }

    #[test]
    fn a_retired_revision_says_so() {
        let Verdict::Rejected(reason) = interpret(&request("/api/events", "{}"), &response(410, &[], "")) else {
            panic!()
        };
        assert!(
            reason.contains("2026-07-15") && reason.contains("revision setting"),
            "{reason}"
        );
    }
}
