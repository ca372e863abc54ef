//! A destination's settings as the host holds them: the plain settings the
//! plugin sees, and the secrets it never does. Secrets reach a request only
//! when it is sent, through `{{secret:NAME}}` placeholders in its headers;
//! everywhere a request is shown they render as `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

use plugin_runtime::{DestinationManifest, Header, HttpRequest, template};

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

/// A connection's settings, replaceable while events flow (an update or a
/// key rotation through the admin API): each call and each request reads
/// the settings current when it starts.
pub type SettingsCell = std::sync::Arc<arc_swap::ArcSwap<DestinationSettings>>;

/// A cell holding `settings`.
pub fn cell(settings: DestinationSettings) -> SettingsCell {
    std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(settings))
}

/// Settings split into what the plugin sees and what it must not.
#[derive(Clone, Debug)]
pub struct DestinationSettings {
    /// The settings JSON object without secrets, as passed to the plugin.
    public: String,
    secrets: BTreeMap<String, Secret>,
    /// The default variables the operator's binary allows, by setting.
    defaults: BTreeMap<String, String>,
}

/// Where a secret setting is read from when the settings do not say: only
/// what the host binary grants for a plugin it ships (`KLAVIYO_API_KEY`
/// for the bundled Klaviyo plugin's `api_key`), never a name a plugin could
/// choose.
pub type SecretDefaults<'a> = &'a [(&'a str, &'a str)];

/// How a request's secrets are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Render {
    /// For sending: the real values.
    Send,
    /// For anything shown or logged: `***`.
    Redacted,
}

impl DestinationSettings {
    /// Reads settings from an optional JSON file. A secret setting is its
    /// value, or the source the operator names for it: `{"env": "VAR"}` or
    /// `{"file": "PATH"}`. An absent secret comes from `defaults` only.
    pub fn load(
        path: Option<&Path>,
        manifest: &DestinationManifest,
        defaults: SecretDefaults<'_>,
    ) -> anyhow::Result<DestinationSettings> {
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
        Self::from_object(object, manifest, defaults, |name| std::env::var(name).ok())
    }

    /// Splits a settings object; `env` looks up environment variables.
    pub fn from_object(
        mut object: Map<String, Value>,
        manifest: &DestinationManifest,
        defaults: SecretDefaults<'_>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<DestinationSettings> {
        let mut secrets = BTreeMap::new();
        for spec in manifest.settings.iter().filter(|s| s.secret) {
            let name = &spec.name;
            let value = match object.remove(name) {
                Some(Value::String(value)) => Some(value),
                Some(Value::Object(source)) => Some(read_source(name, &source, &env)?),
                Some(Value::Null) | None => defaults
                    .iter()
                    .find(|(setting, _)| setting == name)
                    .and_then(|(_, variable)| env(variable)),
                Some(_) => bail!(
                    "setting {name} must be a string, or name its source as {{\"env\": \"VAR\"}} or {{\"file\": \"PATH\"}}"
                ),
            };
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                secrets.insert(name.clone(), Secret(value));
            }
        }
        Ok(DestinationSettings {
            public: Value::Object(object).to_string(),
            secrets,
            defaults: defaults.iter().map(|(s, v)| (s.to_string(), v.to_string())).collect(),
        })
    }

    /// Who is paying for the requests, as a hash: the destination and its
    /// secrets (the API key). Connections with the same key share one
    /// budget under it; the key itself is never kept as a name.
    pub fn account_hash(&self, destination: &str) -> String {
        let mut account = destination.as_bytes().to_vec();
        for (name, secret) in &self.secrets {
            for part in [name.as_str(), secret.expose()] {
                account.push(0);
                account.extend_from_slice(part.as_bytes());
            }
        }
        plugin_runtime::sha256_hex(&account)
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
            .map(|s| match (s.secret, self.defaults.get(&s.name)) {
                (true, Some(variable)) => format!("{} (in --settings, or ${variable})", s.name),
                (true, None) => format!(
                    "{} (in --settings: the value, or {{\"env\": \"VAR\"}} or {{\"file\": \"PATH\"}})",
                    s.name
                ),
                (false, _) => s.name.clone(),
            })
            .collect()
    }

    /// A request's headers with secrets filled in or masked.
    pub fn render_headers(&self, request: &HttpRequest, render: Render) -> anyhow::Result<Vec<Header>> {
        headers_with(request, |value| self.render(value, render))
    }

    fn render(&self, value: &str, render: Render) -> anyhow::Result<String> {
        if render == Render::Redacted {
            return redact(value);
        }
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

/// A request's headers with every secret masked. No settings are needed:
/// a plugin's headers only name secrets (as templates), never hold them.
pub fn redacted_headers(request: &HttpRequest) -> anyhow::Result<Vec<Header>> {
    headers_with(request, redact)
}

/// A request's headers, names in lower case, values as `render` makes them.
fn headers_with(request: &HttpRequest, render: impl Fn(&str) -> anyhow::Result<String>) -> anyhow::Result<Vec<Header>> {
    request
        .headers
        .iter()
        .map(|h| {
            Ok(Header {
                name: h.name.to_ascii_lowercase(),
                value: render(&h.value)?,
            })
        })
        .collect()
}

fn redact(value: &str) -> anyhow::Result<String> {
    template::render(value, |_| Ok("***"))
}

/// The largest secret file read: a key is tens of bytes.
const SECRET_FILE_MAX: u64 = 64 << 10;

/// A secret file's text. Only a regular file is read, and only up to
/// `SECRET_FILE_MAX`: `/dev/zero` would grow memory without end, and a FIFO
/// (opened without blocking, then refused) would hang the caller.
fn read_secret_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if metadata.len() > SECRET_FILE_MAX {
        return Err(std::io::Error::other(format!("{} bytes", metadata.len())));
    }
    let mut text = String::new();
    file.take(SECRET_FILE_MAX + 1).read_to_string(&mut text)?;
    if text.len() as u64 > SECRET_FILE_MAX {
        return Err(std::io::Error::other("grew past the limit while read"));
    }
    Ok(text)
}

/// A secret from the source the operator named for it.
fn read_source(
    name: &str,
    source: &Map<String, Value>,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    match (source.get("env"), source.get("file"), source.len()) {
        (Some(Value::String(variable)), None, 1) => {
            env(variable).with_context(|| format!("setting {name} names ${variable}, which is not set"))
        }
        (None, Some(Value::String(path)), 1) => read_secret_file(std::path::Path::new(path))
            .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|cause| {
                // The cause goes to the operator's log only: the answer
                // (which an admin API caller sees) must not tell whether an
                // arbitrary path exists, or what it is.
                tracing::warn!(setting = name, file = %path, "a secret file cannot be used: {cause}");
                anyhow::anyhow!(
                    "setting {name} names the file {path}, which cannot be used as a secret: it must be a regular file this host can read, of at most {SECRET_FILE_MAX} bytes"
                )
            }),
        _ => bail!("setting {name} must name one source: {{\"env\": \"VAR\"}} or {{\"file\": \"PATH\"}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_runtime::{SettingKind, SettingSpec};

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

    const KLAVIYO: SecretDefaults<'static> = &[("api_key", "KLAVIYO_API_KEY")];

    /// Regression: a secret was read from a variable named after the
    /// plugin's own name and setting, so a plugin named `cdp` with a secret
    /// `host_admin_token` received $CDP_HOST_ADMIN_TOKEN.
    #[test]
    fn a_plugin_cannot_choose_which_variable_becomes_its_secret() {
        let env = |name: &str| (name == "KLAVIYO_API_KEY").then(|| "pk_host_secret".to_string());
        let settings = DestinationSettings::from_object(Map::new(), &manifest(), &[], env).unwrap();
        assert!(settings.render_headers(&request(), Render::Send).is_err());
        assert!(settings.missing_for_send(&manifest())[0].contains("{\"env\": \"VAR\"}"));
    }

    #[test]
    fn the_operator_names_each_secret_source() {
        let file = std::env::temp_dir().join(format!("secret-{}", std::process::id()));
        std::fs::write(&file, "pk_from_file\n").unwrap();
        let env = |name: &str| (name == "MY_KEY").then(|| "pk_from_env".to_string());
        for (source, expected) in [
            (serde_json::json!({"env": "MY_KEY"}), "Klaviyo-API-Key pk_from_env"),
            (serde_json::json!({"file": file}), "Klaviyo-API-Key pk_from_file"),
        ] {
            let object = serde_json::json!({ "api_key": source });
            let settings =
                DestinationSettings::from_object(object.as_object().unwrap().clone(), &manifest(), &[], env).unwrap();
            assert_eq!(
                settings.render_headers(&request(), Render::Send).unwrap()[0].value,
                expected
            );
        }
        let unset = serde_json::json!({"api_key": {"env": "UNSET"}});
        let err =
            DestinationSettings::from_object(unset.as_object().unwrap().clone(), &manifest(), &[], env).unwrap_err();
        assert_eq!(err.to_string(), "setting api_key names $UNSET, which is not set");
        std::fs::remove_file(&file).ok();
    }

    #[test]
    fn the_plugin_never_sees_a_secret() {
        let object = serde_json::json!({"api_key": "pk_live_123", "revision": "2026-07-15"});
        let settings =
            DestinationSettings::from_object(object.as_object().unwrap().clone(), &manifest(), &[], |_| None).unwrap();
        assert!(!settings.public_json().contains("pk_live"));
        assert!(!format!("{settings:?}").contains("pk_live"));
    }

    #[test]
    fn headers_render_the_secret_only_for_sending() {
        let settings = DestinationSettings::from_object(Map::new(), &manifest(), KLAVIYO, |name| {
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
        let settings = DestinationSettings::from_object(Map::new(), &manifest(), KLAVIYO, |_| None).unwrap();
        assert_eq!(
            settings.missing_for_send(&manifest()),
            ["api_key (in --settings, or $KLAVIYO_API_KEY)"]
        );
        let err = settings.render_headers(&request(), Render::Send).unwrap_err();
        assert!(err.to_string().contains("api_key"));
    }

    /// Found by reading the admin API as an attacker would: a secret source
    /// naming /dev/zero grew memory at a gigabyte a second, a FIFO hung the
    /// caller, and the error told whether any path existed.
    #[test]
    fn a_secret_file_must_be_a_small_regular_file_and_errors_do_not_tell_what_a_path_is() {
        let dir = std::env::temp_dir().join(format!("cdp-host-secret-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("key");
        std::fs::write(&good, "pk_test_0123456789\n").unwrap();
        let big = dir.join("big");
        std::fs::write(&big, vec![b'k'; SECRET_FILE_MAX as usize + 1]).unwrap();
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let source = |path: &std::path::Path| {
            let mut map = Map::new();
            map.insert("file".into(), Value::String(path.display().to_string()));
            map
        };
        let none = |_: &str| None;
        assert_eq!(
            read_source("api_key", &source(&good), &none).unwrap(),
            "pk_test_0123456789"
        );
        let started = std::time::Instant::now();
        let mut messages = Vec::new();
        for path in [
            std::path::Path::new("/dev/zero"),
            &fifo,
            &big,
            &dir,
            std::path::Path::new("/no/such/file"),
        ] {
            let message = read_source("api_key", &source(path), &none).unwrap_err().to_string();
            messages.push(message.replace(&path.display().to_string(), "PATH"));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "a source hung");
        assert!(messages.iter().all(|m| m == &messages[0]), "{messages:#?}");
        assert!(messages[0].contains("must be a regular file"), "{}", messages[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
