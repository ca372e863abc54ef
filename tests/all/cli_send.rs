//! `cdp-host send` and `cdp-host demo`, through the real binary, against a
//! sandbox on loopback.

use klaviyo_mock::{DEMO_KEY, MockConfig};

use crate::cli_map::tempdir;
use crate::support::cdp_host;

const EVENTS: &str = concat!(
    r#"{"type":"identify","messageId":"s1","traits":{"email":"ada@example.org"}}"#,
    "\n",
    r#"{"type":"track","event":"Order Completed","messageId":"s2","properties":{"email":"ada@example.org","revenue":12}}"#,
    "\n",
    r#"{"type":"page","messageId":"s3"}"#,
    "\n",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_to_the_sandbox_and_exits_zero() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let dir = tempdir();
    std::fs::write(dir.join("events.ndjson"), EVENTS).unwrap();
    let mut command = cdp_host();
    command
        .args(["send", "--base-url", &sandbox.url(), "--dead-letters"])
        .arg(dir.join("dead.ndjson"))
        .arg(dir.join("events.ndjson"))
        .env("KLAVIYO_API_KEY", DEMO_KEY);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("3 events read: 2 delivered, 1 skipped, 0 dead-lettered"),
        "{stdout}"
    );
    assert_eq!(sandbox.events().len(), 1);
    assert_eq!(sandbox.profiles().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_exits_one_and_the_dead_letters_hold_no_key() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let dir = tempdir();
    std::fs::write(dir.join("events.ndjson"), EVENTS).unwrap();
    let dead = dir.join("dead.ndjson");
    let mut command = cdp_host();
    command
        .args(["send", "--base-url", &sandbox.url(), "--dead-letters"])
        .arg(&dead)
        .arg(dir.join("events.ndjson"))
        .env("KLAVIYO_API_KEY", "pk_wrong_key_12345");
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let letters = std::fs::read_to_string(&dead).unwrap();
    assert_eq!(letters.lines().count(), 2);
    assert!(letters.contains("check the api_key setting"));
    assert!(!letters.contains("pk_wrong_key_12345"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains("pk_wrong_key_12345"), "{all}");
}

#[test]
fn send_without_a_key_refuses_to_start_and_says_where_to_set_it() {
    let dir = tempdir();
    std::fs::write(dir.join("events.ndjson"), EVENTS).unwrap();
    let output = cdp_host().arg("send").arg(dir.join("events.ndjson")).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot send without: api_key (in --settings, or $KLAVIYO_API_KEY)"),
        "{stderr}"
    );
}

#[test]
fn the_demo_runs_with_no_account_and_shows_what_klaviyo_holds() {
    let output = cdp_host().arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("13 events read: 7 delivered, 4 skipped, 2 dead-lettered"),
        "{stdout}"
    );
    assert!(stdout.contains("event   Ordered Product"), "{stdout}");
    assert!(stdout.contains("profile 01SANDBOX"), "{stdout}");
}

/// Regression: a plugin's secrets were read from a variable named after
/// its own manifest name and setting, so a plugin could pick which host
/// variable it received. A plugin that is not the bundled one gets a secret
/// only from a source the operator names in its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_gets_no_secret_from_a_variable_it_chose() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let dir = tempdir();
    std::fs::write(dir.join("events.ndjson"), EVENTS).unwrap();
    let send = |settings: Option<&str>| {
        let mut command = cdp_host();
        command
            .args([
                "send",
                "--plugin",
                plugin_fixtures::HOSTILE,
                "--base-url",
                &sandbox.url(),
            ])
            .arg("--dead-letters")
            .arg(dir.join("dead.ndjson"))
            .env("HOSTILE_API_KEY", DEMO_KEY)
            .env("KLAVIYO_API_KEY", DEMO_KEY)
            .env("OPERATOR_NAMED_KEY", DEMO_KEY);
        if let Some(settings) = settings {
            let path = dir.join("settings.json");
            std::fs::write(&path, settings).unwrap();
            command.arg("--settings").arg(path);
        }
        command.arg(dir.join("events.ndjson"));
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };
    let output = send(None).await.unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot send without: api_key (in --settings"),
        "{stderr}"
    );
    assert!(sandbox.events().is_empty());

    // Bound by the operator, the same key is used: the events arrive.
    let output = send(Some(r#"{"api_key": {"env": "OPERATOR_NAMED_KEY"}}"#))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!sandbox.events().is_empty());
}
