//! The destination's settings: what each one means (declared to the host in
//! the manifest) and how a settings JSON object is checked. Secrets such as
//! `api_key` never reach this module in a real host; they are accepted and
//! ignored here so that a settings file can be validated whole.

use serde_json::{Map, Value};

use crate::contract::{SettingError, SettingKind, SettingSpec};
use crate::klaviyo;

/// Validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub revision: String,
    /// ISO 3166 alpha-2, upper case.
    pub default_country: Option<String>,
    pub ordered_product_events: bool,
    pub skip_events: Vec<String>,
    /// Events go to bulk create jobs under a backlog (`auto`), or never.
    pub batching: bool,
    /// Profiles go to bulk import jobs too (needs lists:write).
    pub bulk_profiles: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            revision: klaviyo::REVISION.to_string(),
            default_country: None,
            ordered_product_events: false,
            skip_events: Vec::new(),
            batching: true,
            bulk_profiles: false,
        }
    }
}

/// The settings this plugin understands, as declared in its manifest.
pub fn specs() -> Vec<SettingSpec> {
    vec![
        SettingSpec {
            name: "api_key",
            kind: SettingKind::String,
            description: "Klaviyo private API key (pk_...). Needs events:write; identify also needs profiles:write.",
            required_to_send: true,
            secret: true,
            default_value: None,
        },
        SettingSpec {
            name: "revision",
            kind: SettingKind::String,
            description: "Klaviyo API revision sent in the `revision` header (YYYY-MM-DD, optionally .pre).",
            required_to_send: false,
            secret: false,
            default_value: Some("\"2026-07-15\""),
        },
        SettingSpec {
            name: "default_country",
            kind: SettingKind::String,
            description: "ISO 3166 alpha-2 country used to read phone numbers written without a +country prefix, when the event names no country.",
            required_to_send: false,
            secret: false,
            default_value: None,
        },
        SettingSpec {
            name: "ordered_product_events",
            kind: SettingKind::Boolean,
            description: "When true, each item of an Order Completed also becomes an `Ordered Product` event.",
            required_to_send: false,
            secret: false,
            default_value: Some("false"),
        },
        SettingSpec {
            name: "batching",
            kind: SettingKind::String,
            description: "\"auto\": under a backlog, events go to Klaviyo's bulk create jobs (up to 1,000 a request, about 40 times the single endpoint's rate); at a trickle each goes alone. \"off\": every event alone.",
            required_to_send: false,
            secret: false,
            default_value: Some("\"auto\""),
        },
        SettingSpec {
            name: "bulk_profiles",
            kind: SettingKind::Boolean,
            description: "When true (and batching is auto), identify's profiles go to bulk import jobs under a backlog. The key then also needs lists:write and profiles:read (and lists:read to read the job).",
            required_to_send: false,
            secret: false,
            default_value: Some("false"),
        },
        SettingSpec {
            name: "skip_events",
            kind: SettingKind::StringList,
            description: "Track event names never sent to Klaviyo (exact match).",
            required_to_send: false,
            secret: false,
            default_value: Some("[]"),
        },
    ]
}

/// Parses and checks settings, reporting every problem found.
pub fn parse(text: &str) -> Result<Settings, Vec<SettingError>> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    let object: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(vec![error("(settings)", "settings must be a JSON object")]),
        Err(e) => {
            return Err(vec![error("(settings)", &format!("settings are not valid JSON: {e}"))]);
        }
    };
    let mut settings = Settings::default();
    let mut errors = Vec::new();
    for (name, value) in &object {
        match name.as_str() {
            "api_key" => {
                if !value.is_string() && !value.is_null() {
                    errors.push(error(name, "must be a string"));
                }
            }
            "revision" => match value.as_str() {
                Some(revision) if is_revision(revision) => settings.revision = revision.to_string(),
                Some(revision) => errors.push(error(
                    name,
                    &format!(
                        "{revision:?} is not a Klaviyo revision; expected YYYY-MM-DD or YYYY-MM-DD.pre, e.g. \"{}\"",
                        klaviyo::REVISION
                    ),
                )),
                None => errors.push(error(name, "must be a string such as \"2026-07-15\"")),
            },
            "default_country" => match value {
                Value::Null => {}
                Value::String(code) => match crate::phone::region(code) {
                    Some(region) => settings.default_country = Some(region),
                    None => errors.push(error(
                        name,
                        &format!("{code:?} is not an ISO 3166 alpha-2 country code (e.g. \"US\", \"GB\")"),
                    )),
                },
                _ => errors.push(error(name, "must be a string such as \"US\"")),
            },
            "ordered_product_events" => match value.as_bool() {
                Some(flag) => settings.ordered_product_events = flag,
                None => errors.push(error(name, "must be true or false")),
            },
            "batching" => match value.as_str() {
                Some("auto") => settings.batching = true,
                Some("off") => settings.batching = false,
                _ => errors.push(error(name, "must be \"auto\" or \"off\"")),
            },
            "bulk_profiles" => match value.as_bool() {
                Some(flag) => settings.bulk_profiles = flag,
                None => errors.push(error(name, "must be true or false")),
            },
            "skip_events" => match value.as_array() {
                Some(items) if items.iter().all(Value::is_string) => {
                    settings.skip_events = items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
                }
                _ => errors.push(error(name, "must be a list of event names (strings)")),
            },
            _ => errors.push(error(
                name,
                &format!(
                    "unknown setting; known settings are {}",
                    specs().iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
    if errors.is_empty() { Ok(settings) } else { Err(errors) }
}

/// `YYYY-MM-DD` or `YYYY-MM-DD.pre`, with a real calendar date.
fn is_revision(text: &str) -> bool {
    let date = text.strip_suffix(".pre").unwrap_or(text);
    date.len() == 10 && chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok()
}

fn error(name: &str, reason: &str) -> SettingError {
    SettingError {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_settings_take_the_defaults() {
        assert_eq!(parse("").unwrap(), Settings::default());
        assert_eq!(parse("{}").unwrap().revision, klaviyo::REVISION);
    }

    #[test]
    fn every_bad_setting_is_named() {
        let errors = parse(r#"{"revision":"July","default_country":"Narnia","ordered_product_events":"yes","skip_events":[1],"colour":"red"}"#)
            .unwrap_err();
        let names: Vec<_> = errors.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "colour",
                "default_country",
                "ordered_product_events",
                "revision",
                "skip_events"
            ]
        );
    }

    #[test]
    fn a_country_is_read_case_insensitively() {
        let s = parse(r#"{"default_country":"gb","revision":"2026-01-15.pre"}"#).unwrap();
        assert_eq!(s.default_country.as_deref(), Some("GB"));
        assert_eq!(s.revision, "2026-01-15.pre");
    }
}
