//! Running `cdp-host` the way a user does, with a shared compile cache so
//! each test does not pay Cranelift again.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use cdp_host::plugin::{BUNDLED_KLAVIYO, Plugin, Runtime, RuntimeConfig};
use cdp_host::sandbox::{Sandbox, SandboxConfig};

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
            Arc::new(runtime.load(BUNDLED_KLAVIYO, "bundled klaviyo").unwrap())
        })
        .clone()
}

/// The local Klaviyo sandbox on a free loopback port.
pub async fn sandbox(config: SandboxConfig) -> Sandbox {
    Sandbox::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}
