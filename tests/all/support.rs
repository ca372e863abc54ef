//! Running `cdp-host` the way a user does, with a shared compile cache so
//! each test does not pay Cranelift again.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use cdp_host::bundled;
use cdp_host::delivery::{DeadLetter, Delivery, EventOutcome, Report};
use cdp_host::settings::DestinationSettings;
use klaviyo_mock::{KlaviyoMock, MockConfig};
use plugin_runtime::{Plugin, PluginSlot, Runtime, RuntimeConfig};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")
}

/// `cdp-host` with a clean environment: no API key unless a test sets one.
pub fn cdp_host() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cdp-host"));
    command
        .env("CDP_HOST_CACHE_DIR", cache_dir())
        .env_remove("KLAVIYO_API_KEY")
        .current_dir(repo_root());
    command
}

/// Runs a command with `stdin` as its input.
pub fn run_with_input(mut command: Command, stdin: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cdp-host");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Parses NDJSON output.
pub fn rows(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("output line {l:?} is not JSON: {e}")))
        .collect()
}

/// The bundled Klaviyo plugin, loaded once per test binary.
pub fn klaviyo() -> Arc<Plugin> {
    static PLUGIN: std::sync::OnceLock<Arc<Plugin>> = std::sync::OnceLock::new();
    PLUGIN
        .get_or_init(|| {
            let runtime = Runtime::new(RuntimeConfig {
                // Several tests share this plugin at once, each with its
                // own interpreting instances.
                concurrency: 32,
                cache_dir: Some(cache_dir()),
                ..RuntimeConfig::default()
            })
            .unwrap();
            Arc::new(runtime.load(bundled::KLAVIYO, "bundled klaviyo").unwrap())
        })
        .clone()
}

/// The local Klaviyo sandbox on a free loopback port.
pub async fn sandbox(config: MockConfig) -> KlaviyoMock {
    KlaviyoMock::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A slot serving `plugin` with `settings`, as the binary makes one.
pub fn slot(plugin: Arc<Plugin>, settings: &DestinationSettings) -> Arc<PluginSlot> {
    PluginSlot::new(plugin, bundled::canary(settings))
}

/// Delivers `input` (NDJSON), returning the report and the dead letters
/// the records carried, in input order.
pub async fn deliver(delivery: &Arc<Delivery>, input: String) -> (Report, Vec<DeadLetter>) {
    let letters = std::sync::Mutex::new(Vec::new());
    let report = delivery
        .run(std::io::Cursor::new(input.into_bytes()), |record| {
            if let EventOutcome::DeadLettered(letter) = &record.outcome {
                letters.lock().unwrap().push((record.id, letter.clone()));
            }
        })
        .await
        .unwrap();
    let mut letters = letters.into_inner().unwrap();
    letters.sort_by_key(|(id, _)| *id);
    (report, letters.into_iter().map(|(_, letter)| letter).collect())
}

/// Checks that every event the sandbox stored arrived after its profile's
/// import, and returns how many profiles were imported.
pub fn assert_each_profile_arrived_before_its_events(sandbox: &KlaviyoMock) -> usize {
    let mut imported = std::collections::BTreeSet::new();
    for arrival in sandbox.arrivals() {
        if arrival.what == "profile-import" {
            imported.insert(arrival.profile_id);
        } else {
            assert!(
                imported.contains(&arrival.profile_id),
                "{} arrived before its profile-import",
                arrival.what
            );
        }
    }
    imported.len()
}

/// A signed-in session of `serve`'s operator console, over plain HTTP.
pub struct ConsoleSession {
    client: reqwest::Client,
    url: String,
    cookie: String,
}

impl ConsoleSession {
    pub async fn sign_in(url: &str, token: &str) -> ConsoleSession {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let answer = client
            .post(format!("{url}/console/login"))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 303);
        let set = answer.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
        let cookie = set.split(';').next().unwrap().to_string();
        ConsoleSession {
            client,
            url: url.to_string(),
            cookie,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let answer = self
            .client
            .get(format!("{}{path}", self.url))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> u16 {
        let answer = self
            .client
            .post(format!("{}{path}", self.url))
            .header("cookie", &self.cookie)
            .form(form)
            .send()
            .await
            .unwrap();
        answer.status().as_u16()
    }
}

/// The CSRF token a console page carries in its forms.
pub fn csrf(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let at = page.find(marker).expect("a form with a CSRF token") + marker.len();
    page[at..at + 64].to_string()
}
