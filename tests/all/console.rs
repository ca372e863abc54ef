//! The operator console in a real browser (Debian's Chromium, driven by
//! Selenium: `tests/browser/console.py`) against the real `serve` with two
//! shops, delivering to the Klaviyo sandbox: sign in, live counts, one
//! event found with its masked request and Klaviyo's answer, a dead letter
//! replayed and delivered, a plugin put on one shop and rolled back, and
//! events carrying markup that must not run. Screenshots go to
//! `target/console-screenshots/`.
//!
//! `.ci/run` installs Chromium, chromedriver and Selenium and sets
//! `CDP_BROWSER_TESTS=required`, so that there the test cannot pass
//! without a browser. Elsewhere, without them, it says so and passes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use klaviyo_mock::Faults;
use serde_json::Value;

use crate::cli_map::tempdir;
use crate::connections::{ADMIN, Service, shop_sandbox, write};
use crate::support::repo_root;

/// Whether this machine can run the browser test; why not, if not.
fn browser_missing() -> Option<String> {
    for path in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !std::path::Path::new(path).exists() {
            return Some(format!("{path} is missing (apt-get install chromium chromium-driver)"));
        }
    }
    let selenium = Command::new("python3").args(["-c", "import selenium"]).status();
    if !selenium.is_ok_and(|s| s.success()) {
        return Some("Selenium is missing (python3 -m pip install selenium)".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser() {
    if let Some(missing) = browser_missing() {
        assert!(
            std::env::var("CDP_BROWSER_TESTS").as_deref() != Ok("required"),
            "the browser test is required here, and {missing}"
        );
        eprintln!("SKIPPED the console's browser test: {missing}");
        return;
    }
    // Both shops' Klaviyo refuses anything carrying "poison-me" until told
    // otherwise: that event is dead-lettered, then healed and replayed.
    let poisoned = |config: &mut klaviyo_mock::MockConfig| {
        config.faults = Faults {
            invalid_marker: Some("poison-me".into()),
            ..Faults::default()
        }
    };
    let a = shop_sandbox(&["pk_shop_a"], poisoned).await;
    let b = shop_sandbox(&["pk_shop_b"], poisoned).await;
    let dir = tempdir();
    let config = write(
        &dir,
        "serve.toml",
        &format!(
            "approved_base_urls = [\"{}\", \"{}\"]\nadmin_secret_env_prefixes = [\"SHOP_\"]\n\n\
             [[connections]]\nid = \"shop-a\"\nwrite_keys = [\"wk_a\"]\nbase_url = \"{}\"\nsettings = {{ api_key = {{ env = \"SHOP_A_KEY\" }} }}\n\n\
             [[connections]]\nid = \"shop-b\"\nwrite_keys = [\"wk_b\"]\nbase_url = \"{}\"\nsettings = {{ api_key = {{ env = \"SHOP_B_KEY\" }} }}\n",
            a.url(),
            b.url(),
            a.url(),
            b.url()
        ),
    );
    let service = Service::start(
        &config,
        &dir.join("spool.sqlite"),
        &[("SHOP_A_KEY", "pk_shop_a"), ("SHOP_B_KEY", "pk_shop_b")],
    );

    // A second version stored beside the first, for the canary and the
    // rollback; and an impostor that traps on any identify, whose canary
    // must refuse it.
    let client = reqwest::Client::new();
    let mut stored = Vec::new();
    for component in [plugin_fixtures::KLAVIYO_V2, plugin_fixtures::TRAPPING_IMPOSTOR] {
        let answer = client
            .put(format!("{}/admin/plugins", service.url))
            .bearer_auth(ADMIN)
            .body(std::fs::read(component).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let answer: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
        stored.push(answer["stored"].clone());
    }
    let text = |v: &Value| v.as_str().unwrap().to_string();
    let (v2, v2_sha) = (text(&stored[0]["version"]), text(&stored[0]["sha256"]));
    let impostor_sha = text(&stored[1]["sha256"]);

    let shots = repo_root().join("target/console-screenshots");
    let mut browser = Command::new("python3")
        .arg(repo_root().join("tests/browser/console.py"))
        .args([
            &service.url,
            ADMIN,
            shots.to_str().unwrap(),
            &v2,
            &v2_sha,
            &impostor_sha,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut told = browser.stdin.take().unwrap();
    let said = BufReader::new(browser.stdout.take().unwrap());
    // Its one request: let Klaviyo take the poisoned event from now on.
    let (lines, _a, b) = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in said.lines() {
            let line = line.unwrap();
            if line == "heal" {
                a.set_faults(Faults::default());
                b.set_faults(Faults::default());
                writeln!(told, "healed").unwrap();
            }
            lines.push(line);
        }
        (lines, a, b)
    })
    .await
    .unwrap();
    let status = browser.wait().unwrap();
    assert!(
        status.success() && lines.last().map(String::as_str) == Some("ok"),
        "the browser test failed: {lines:?}"
    );
    assert!(
        b.events().iter().any(|e| e.unique_id.starts_with("dead-")),
        "the replayed event reached shop B's Klaviyo"
    );
}
