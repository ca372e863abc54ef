//! `cdp-host plugin inspect`, and what it says of files that are not plugins.

use crate::cli_map::tempdir;
use crate::support::cdp_host;

#[test]
fn inspect_shows_the_manifest_interface_and_digest() {
    let wasm = std::path::PathBuf::from(env!("KLAVIYO_COMPONENT_FOR_TESTS"));
    let output = cdp_host().args(["plugin", "inspect"]).arg(&wasm).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["interface"], "chord:destination/plugin@1.2.0");
    assert_eq!(report["batching"], true);
    let codes: Vec<&str> = report["skip_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        [
            "no_email_or_phone",
            "page_view",
            "group_call",
            "alias_call",
            "skip_events_setting"
        ]
    );
    assert_eq!(report["manifest"]["name"], "klaviyo");
    assert_eq!(report["manifest"]["api_revision"], "2026-07-15");
    assert_eq!(
        report["manifest"]["allowed_hosts"],
        serde_json::json!(["a.klaviyo.com"])
    );
    assert_eq!(report["sha256"].as_str().unwrap().len(), 64);
    let size = std::fs::metadata(&wasm).unwrap().len();
    assert_eq!(report["size_bytes"].as_u64(), Some(size));
    let api_key = report["manifest"]["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api_key")
        .unwrap();
    assert_eq!(api_key["secret"], true);
}

#[test]
fn random_bytes_are_refused_in_one_sentence() {
    let file = tempdir().join("random.wasm");
    std::fs::write(
        &file,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let output = cdp_host().args(["plugin", "inspect"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a WebAssembly file"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn a_core_module_is_refused_as_not_a_component() {
    let file = tempdir().join("core.wasm");
    // The smallest valid core module: magic number, version 1.
    std::fs::write(&file, b"\0asm\x01\0\0\0").unwrap();
    let output = cdp_host().args(["plugin", "inspect"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is a core WebAssembly module, not a component"),
        "{stderr}"
    );
}

#[test]
fn inspect_tells_a_1_0_plugin_by_its_interface_and_no_batching() {
    let output = cdp_host()
        .args(["plugin", "inspect", plugin_fixtures::KLAVIYO_1_0])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["interface"], "chord:destination/plugin@1.0.0");
    assert_eq!(report["batching"], false);
    assert_eq!(report["skip_codes"], serde_json::json!([]));
}
