//! `cdp-host map`: the dry run, through the real binary.

use crate::support::{cdp_host, rows, run_with_input};

const IDENTIFY: &str = r#"{"type":"identify","messageId":"m1","userId":"u1","traits":{"email":"ada@example.org"}}"#;
const TRACK: &str = r#"{"type":"track","event":"Order Completed","messageId":"m2","properties":{"email":"ada@example.org","revenue":10}}"#;
const PAGE: &str = r#"{"type":"page","messageId":"m3","properties":{"path":"/"}}"#;

#[test]
fn every_input_line_gets_exactly_one_output_line_in_order() {
    let input = format!("{IDENTIFY}\n{PAGE}\nnot json at all\n\n[1,2]\n{TRACK}\n");
    let output = run_with_input(
        {
            let mut c = cdp_host();
            c.arg("map");
            c
        },
        &input,
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows = rows(&output);
    let summary: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "send"),
            (2, "skip"),
            (3, "error"),
            (4, "error"),
            (5, "error"),
            (6, "send")
        ]
    );
    assert!(
        rows[2]["reason"].as_str().unwrap().contains("line 3 is not JSON"),
        "{}",
        rows[2]
    );
    assert!(
        rows[4]["reason"].as_str().unwrap().contains("not an event object"),
        "{}",
        rows[4]
    );
    assert_eq!(rows[0]["message_id"], "m1");
    assert_eq!(rows[0]["type"], "identify");
    assert_eq!(rows[1]["reason"], "page views are not passed through");
}

#[test]
fn a_request_is_shown_in_the_documented_format() {
    let mut command = cdp_host();
    command.arg("map").arg("-");
    let rows = rows(&run_with_input(command, TRACK));
    let request = &rows[0]["requests"][0];
    assert_eq!(request["method"], "POST");
    assert_eq!(request["url"], "https://a.klaviyo.com/api/events");
    assert_eq!(
        request["headers"],
        serde_json::json!({
            "authorization": "Klaviyo-API-Key ***",
            "revision": "2026-07-15",
            "content-type": "application/vnd.api+json",
            "accept": "application/vnd.api+json",
        })
    );
    assert_eq!(
        request["body"]["data"]["attributes"]["metric"]["data"]["attributes"]["name"],
        "Order Completed"
    );
    assert!(rows[0].get("reason").is_none(), "send lines carry no reason");
}

#[test]
fn the_api_key_never_appears_in_the_output() {
    let dir = tempdir();
    let settings = dir.join("settings.json");
    std::fs::write(
        &settings,
        r#"{"api_key":"pk_test_0123456789abcdefghijklmnopqrstu","default_country":"US"}"#,
    )
    .unwrap();
    let mut command = cdp_host();
    command
        .arg("map")
        .arg("--settings")
        .arg(&settings)
        .env("KLAVIYO_API_KEY", "pk_env_also_secret_value");
    let output = run_with_input(command, &format!("{IDENTIFY}\n{TRACK}\n"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains("pk_test_0123"), "key leaked: {all}");
    assert!(!all.contains("pk_env_also"), "key leaked: {all}");
    assert!(all.contains("Klaviyo-API-Key ***"));
}

#[test]
fn invalid_settings_stop_the_run_naming_the_setting() {
    let dir = tempdir();
    let settings = dir.join("settings.json");
    std::fs::write(&settings, r#"{"revision":"latest","ordered_product_events":"yes"}"#).unwrap();
    let mut command = cdp_host();
    command.arg("map").arg("--settings").arg(&settings);
    let output = run_with_input(command, TRACK);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("revision: \"latest\" is not a Klaviyo revision"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ordered_product_events: must be true or false"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn a_plugin_that_cannot_be_read_stops_the_run_with_a_clear_message() {
    let mut command = cdp_host();
    command.args(["map", "--plugin", "no/such/plugin.wasm"]);
    let output = run_with_input(command, TRACK);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reading plugin no/such/plugin.wasm"), "{stderr}");
}

#[test]
fn the_bundled_examples_map_with_the_expected_outcomes() {
    let output = cdp_host()
        .args(["map", "--settings", "examples/settings.json", "examples/events.ndjson"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows = rows(&output);
    let input_lines = std::fs::read_to_string(crate::support::repo_root().join("examples/events.ndjson"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows.len(), input_lines);
    let outcomes: Vec<&str> = rows.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert!(outcomes.contains(&"send") && outcomes.contains(&"skip") && outcomes.contains(&"error"));
}

pub fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Where the system refuses the pooling allocator's address-space
/// reservation (here: an address-space limit far below the hundreds of GiB
/// it reserves, far above what instances allocated on demand need), the
/// host says so once and maps on demand, with the same results.
#[test]
fn without_room_for_the_instance_pool_instances_are_allocated_on_demand() {
    let limited = |kib: u64| {
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(format!("ulimit -v {kib} && exec \"$0\" map"))
            .arg(cdp_host().get_program())
            .env("CDP_HOST_CACHE_DIR", crate::support::cache_dir())
            .current_dir(cdp_host().get_current_dir().unwrap());
        c
    };
    let input = format!("{IDENTIFY}\n{PAGE}\n{TRACK}\n");
    let output = run_with_input(limited(40 * 1024 * 1024), &input);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("pooling allocator unavailable") && stderr.contains("allocating instances on demand"),
        "{stderr}"
    );
    let outcomes: Vec<String> = rows(&output)
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["send", "skip", "send"]);

    // Without the limit, the pool is used and nothing is said of it.
    let output = run_with_input(
        {
            let mut c = cdp_host();
            c.arg("map");
            c
        },
        &input,
    );
    assert!(output.status.success());
    assert!(!String::from_utf8_lossy(&output.stderr).contains("pooling allocator unavailable"));
}

#[test]
fn batch_shows_each_batch_after_the_events_grouped_per_profile() {
    let other = TRACK.replace("m2", "m4").replace("ada@", "bob@");
    let again = TRACK.replace("m2", "m5");
    let input = format!("{IDENTIFY}\n{TRACK}\n{PAGE}\n{other}\n{again}\n");
    let output = run_with_input(
        {
            let mut c = cdp_host();
            c.args(["map", "--batch"]);
            c
        },
        &input,
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows = rows(&output);
    assert_eq!(rows.len(), 6, "five event lines and one batch");
    // The identify is not batched (bulk_profiles is off); the tracks are.
    assert_eq!(rows[0]["requests"].as_array().unwrap().len(), 1);
    assert!(rows[1]["requests"].as_array().unwrap().is_empty());
    let batch = &rows[5];
    assert_eq!(
        (batch["batch"].as_u64(), batch["class"].as_str()),
        (Some(1), Some("events"))
    );
    assert_eq!(batch["lines"], serde_json::json!([2, 4, 5]));
    let request = &batch["requests"][0];
    assert_eq!(request["url"], "https://a.klaviyo.com/api/event-bulk-create-jobs");
    assert_eq!(request["headers"]["authorization"], "Klaviyo-API-Key ***");
    let entries = request["body"]["data"]["attributes"]["events-bulk-create"]["data"]
        .as_array()
        .unwrap();
    assert_eq!(entries.len(), 2, "one entry per profile: ada's two events together");
    assert_eq!(entries[0]["attributes"]["events"]["data"].as_array().unwrap().len(), 2);
}
