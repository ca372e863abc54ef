//! A destination's settings as the host holds them: the plain settings the
//! plugin sees, and the secrets it never does. Secrets reach a request only
//! when it is sent, through `{{secret:NAME}}` placeholders in its headers;
//! everywhere a request is shown they render as `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

use plugin_runtime::{DestinationManifest, Header, HttpRequest, SettingSpec, template};

/// A secret value; printing it shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Settings split into what the plugin sees and what it must not.
#[derive(Clone, Debug)]
pub struct DestinationSettings {
    /// The settings JSON object without secrets, as passed to the plugin.
    public: String,
    secrets: BTreeMap<String, Secret>,
}

/// How a request's secrets are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Render {
    /// For sending: the real values.
    Send,
    /// For anything shown or logged: `***`.
    Redacted,
}

impl DestinationSettings {
    /// Reads settings from an optional JSON file, then fills absent secrets
    /// from the environment: secret `api_key` of destination `klaviyo` comes
    /// from `KLAVIYO_API_KEY`.
    pub fn load(path: Option<&Path>, manifest: &DestinationManifest) -> anyhow::Result<DestinationSettings> {
        let object = match path {
            None => Map::new(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading settings {}", path.display()))?;
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(object)) => object,
                    Ok(_) => bail!("settings {} must hold a JSON object", path.display()),
                    Err(e) => bail!("settings {} are not valid JSON: {e}", path.display()),
                }
            }
        };
        Self::from_object(object, manifest, |name| std::env::var(name).ok())
    }

    /// Splits a settings object; `env` looks up environment variables.
    pub fn from_object(
        mut object: Map<String, Value>,
        manifest: &DestinationManifest,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<DestinationSettings> {
        let mut secrets = BTreeMap::new();
        for spec in manifest.settings.iter().filter(|s| s.secret) {
            match object.remove(&spec.name) {
                Some(Value::String(value)) if !value.is_empty() => {
                    secrets.insert(spec.name.clone(), Secret(value));
                }
                Some(Value::Null) | None => {
                    if let Some(value) = env(&env_name(&manifest.name, spec)).filter(|v| !v.is_empty()) {
                        secrets.insert(spec.name.clone(), Secret(value));
                    }
                }
                Some(_) => bail!("setting {} must be a string", spec.name),
            }
        }
        Ok(DestinationSettings {
            public: Value::Object(object).to_string(),
            secrets,
        })
    }

    /// The settings JSON the plugin sees (no secrets).
    pub fn public_json(&self) -> &str {
        &self.public
    }

    /// The settings required to send that are missing, with where to set them.
    pub fn missing_for_send(&self, manifest: &DestinationManifest) -> Vec<String> {
        manifest
            .settings
            .iter()
            .filter(|s| s.required_to_send)
            .filter(|s| {
                if s.secret {
                    !self.secrets.contains_key(&s.name)
                } else {
                    serde_json::from_str::<Value>(&self.public)
                        .ok()
                        .and_then(|v| v.get(&s.name).cloned())
                        .is_none()
                }
            })
            .map(|s| {
                if s.secret {
                    format!("{} (in --settings, or ${})", s.name, env_name(&manifest.name, s))
                } else {
                    s.name.clone()
                }
            })
            .collect()
    }

    /// A request's headers with secrets filled in or masked.
    pub fn render_headers(&self, request: &HttpRequest, render: Render) -> anyhow::Result<Vec<Header>> {
        request
            .headers
            .iter()
            .map(|h| {
                Ok(Header {
                    name: h.name.to_ascii_lowercase(),
                    value: self.render(&h.value, render)?,
                })
            })
            .collect()
    }

    fn render(&self, value: &str, render: Render) -> anyhow::Result<String> {
        template::render(value, |name| match render {
            Render::Redacted => Ok("***"),
            Render::Send => match self.secrets.get(name) {
                Some(secret) => Ok(secret.expose()),
                None => bail!("setting {name} is required to send and is not set"),
            },
        })
    }

    /// Every secret value, for scrubbing text that is about to be shown.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in self.secrets.values().filter(|s| s.0.len() >= 4) {
            text = text.replace(secret.expose(), "***");
        }
        text
    }
}

/// `KLAVIYO_API_KEY` for setting `api_key` of destination `klaviyo`.
fn env_name(destination: &str, spec: &SettingSpec) -> String {
    format!("{destination}_{}", spec.name)
        .to_ascii_uppercase()
        .replace(['-', '.'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_runtime::SettingKind;

    fn manifest() -> DestinationManifest {
        DestinationManifest {
            name: "klaviyo".into(),
            version: "1.0.0".into(),
            api_revision: "2026-07-15".into(),
            allowed_hosts: vec!["a.klaviyo.com".into()],
            rate_classes: vec![],
            settings: vec![SettingSpec {
                name: "api_key".into(),
                kind: SettingKind::String,
                description: String::new(),
                required_to_send: true,
                secret: true,
                default_value: None,
            }],
        }
    }

    fn request() -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            url: "https://a.klaviyo.com/api/events".into(),
            headers: vec![Header {
                name: "Authorization".into(),
                value: "Klaviyo-API-Key {{secret:api_key}}".into(),
            }],
            body: String::new(),
            idempotency_key: None,
            rate_class: "events".into(),
        }
    }

    #[test]
    fn the_plugin_never_sees_a_secret() {
        let object = serde_json::json!({"api_key": "pk_live_123", "revision": "2026-07-15"});
        let settings =
            DestinationSettings::from_object(object.as_object().unwrap().clone(), &manifest(), |_| None).unwrap();
        assert!(!settings.public_json().contains("pk_live"));
        assert!(!format!("{settings:?}").contains("pk_live"));
    }

    #[test]
    fn headers_render_the_secret_only_for_sending() {
        let settings = DestinationSettings::from_object(Map::new(), &manifest(), |name| {
            (name == "KLAVIYO_API_KEY").then(|| "pk_env_456".to_string())
        })
        .unwrap();
        let sent = settings.render_headers(&request(), Render::Send).unwrap();
        assert_eq!(sent[0].name, "authorization");
        assert_eq!(sent[0].value, "Klaviyo-API-Key pk_env_456");
        let shown = settings.render_headers(&request(), Render::Redacted).unwrap();
        assert_eq!(shown[0].value, "Klaviyo-API-Key ***");
        assert_eq!(settings.scrub("key pk_env_456 leaked"), "key *** leaked");
    }

    #[test]
    fn a_missing_secret_is_named_with_its_environment_variable() {
        let settings = DestinationSettings::from_object(Map::new(), &manifest(), |_| None).unwrap();
        assert_eq!(
            settings.missing_for_send(&manifest()),
            ["api_key (in --settings, or $KLAVIYO_API_KEY)"]
        );
        let err = settings.render_headers(&request(), Render::Send).unwrap_err();
        assert!(err.to_string().contains("api_key"));
    }
}
