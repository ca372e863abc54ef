//! Hot swap through `serve`'s admin API, while events flow: versions go
//! v1 -> v2 -> v1 -> v2 -> rollback, nothing is lost or fails, each event is
//! mapped by exactly one version, and every event accepted after a swap's
//! 200 is mapped by the new version. Broken candidates are refused and the
//! active version keeps serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_host::spool::{Durability, Spool};

use crate::spool_file;
use klaviyo_mock::{DEMO_KEY, MockConfig};
use serde_json::Value;

use crate::serve::{Serve, WRITE_KEY, post, post_track, spool_path, track, wait_for};

const ADMIN: &str = "admin_test_token";
const V1: &str = "klaviyo@1.0.0";
const V2: &str = "klaviyo@1.0.0+v2";

fn component(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

async fn admin(client: &reqwest::Client, method: reqwest::Method, url: String, body: Vec<u8>) -> (u16, Value) {
    let response = client
        .request(method, url)
        .bearer_auth(ADMIN)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_versions_under_continuous_ingest_loses_nothing() {
    let sandbox = crate::support::sandbox(MockConfig {
        rate_limits: false,
        ..MockConfig::default()
    })
    .await;
    let spool = spool_path();
    let serve = Serve::start_with(
        &spool,
        &sandbox.url(),
        DEMO_KEY,
        &["--no-pacing", "--admin-token", ADMIN],
    );
    let client = reqwest::Client::new();

    // Continuous ingest: (message id, sent at) for every 200, in the order
    // the acknowledgements were seen. The time is taken before sending: an
    // event sent after a swap answered is certainly mapped after it, while
    // the moment an acknowledgement is seen can lag the real one.
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (client, url, acked, stop) = (client.clone(), serve.url.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("h{n}");
                n += 1;
                let sent = Instant::now();
                if post(&client, &url, "/api/s/s2s/track", Some(WRITE_KEY), track(&id))
                    .await
                    .0
                    == 200
                {
                    acked.lock().unwrap().push((id, sent));
                }
            }
        })
    };

    // Before each next swap, wait until every event acknowledged so far is
    // delivered: those are provably mapped before the swap is asked for.
    // Events acknowledged after that cut may still be in the pipeline when
    // the next swap lands, and be mapped by that (newer) version instead.
    let drain = |acked: &Arc<Mutex<Vec<(String, Instant)>>>| {
        let cut = acked.lock().unwrap().len();
        let ids: Vec<String> = acked.lock().unwrap()[..cut].iter().map(|(id, _)| id.clone()).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let versions = spool_file::versions_by_message_id(&spool);
            if ids
                .iter()
                .all(|id| versions.get(id).is_some_and(|(state, _)| state == "delivered"))
            {
                return cut;
            }
            assert!(Instant::now() < deadline, "events did not drain");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut cuts = Vec::new();
    let v1 = component(env!("KLAVIYO_COMPONENT_FOR_TESTS"));
    let v2 = component(plugin_fixtures::KLAVIYO_V2);
    // (version now serving, when its swap was asked for, when it answered 200)
    let mut swaps: Vec<(&str, Instant, Instant)> = Vec::new();
    let mut swap_ms = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (bytes, version) in [(&v2, V2), (&v1, V1), (&v2, V2)] {
        let acked_now = acked.clone();
        cuts.push(tokio::task::block_in_place(|| drain(&acked_now)));
        let asked = Instant::now();
        let (status, answer) = admin(
            &client,
            reqwest::Method::PUT,
            format!("{}/admin/plugins/klaviyo", serve.url),
            bytes.clone(),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            format!("klaviyo@{}", answer["active"]["version"].as_str().unwrap()),
            version
        );
        swaps.push((version, asked, Instant::now()));
        swap_ms.push(answer["swap_ms"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let acked_now = acked.clone();
    cuts.push(tokio::task::block_in_place(|| drain(&acked_now)));
    let asked = Instant::now();
    let (status, answer) = admin(
        &client,
        reqwest::Method::POST,
        format!("{}/admin/plugins/klaviyo/rollback", serve.url),
        vec![],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    swaps.push((V1, asked, Instant::now()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "too little traffic: {}", acked.len());
    wait_for("every acknowledged event in the sandbox", || {
        sandbox.events().len() == acked.len()
    })
    .await;
    // The outcome is recorded after the answer (by the outcome writer, in
    // batches): wait for the spool to say so too.
    wait_for("every acknowledged event recorded as delivered", || {
        let versions = spool_file::versions_by_message_id(&spool);
        acked
            .iter()
            .all(|(id, _)| versions.get(id).is_some_and(|(state, _)| state == "delivered"))
    })
    .await;

    let versions = spool_file::versions_by_message_id(&spool);
    let mut mapped_by_each = std::collections::BTreeMap::<String, usize>::new();
    let mut settled_events = 0;
    for (index, (id, sent)) in acked.iter().enumerate() {
        let (state, version) = versions.get(id).unwrap_or_else(|| panic!("{id} is not in the spool"));
        assert_eq!(state, "delivered", "{id}");
        *mapped_by_each.entry(version.clone()).or_default() += 1;
        // Sent after a swap's 200, and drained (delivered) before the next
        // swap was asked for: mapped by that swap's version. `cuts[k]` counts
        // the events drained before swap k.
        let settled = swaps
            .iter()
            .enumerate()
            .find(|(i, (_, _, answered))| *sent > *answered && cuts.get(i + 1).is_none_or(|cut| index < *cut));
        if let Some((_, (version_then, _, _))) = settled {
            settled_events += 1;
            assert_eq!(
                version, version_then,
                "{id} was sent after the swap to {version_then} and delivered before the next"
            );
        }
    }
    assert!(
        settled_events > 0,
        "no event fell between two swaps: the check above checked nothing"
    );
    assert!(
        mapped_by_each.contains_key(V1) && mapped_by_each.contains_key(V2),
        "{mapped_by_each:?}"
    );
    let dead = Spool::open(&spool, Durability::ProcessCrash)
        .unwrap()
        .dead(None, 10)
        .unwrap();
    assert!(dead.is_empty(), "nothing failed");
    // The longest single mapping over the run, swaps included: the worst
    // stall a swap could have caused.
    let metrics = crate::serve::metrics(&client, &serve.url).await;
    let longest_map = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cdp_plugin_map_seconds_max "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the metric");
    println!(
        "hot swap: {} events, mapped by {mapped_by_each:?}; admin call to serving: {swap_ms:?} ms; longest single mapping: {:.2} ms",
        acked.len(),
        longest_map * 1e3
    );
    serve.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_candidates_are_refused_and_the_active_version_keeps_serving() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let serve = Serve::start_with(&spool_path(), &sandbox.url(), DEMO_KEY, &["--admin-token", ADMIN]);
    let client = reqwest::Client::new();
    let url = format!("{}/admin/plugins/klaviyo", serve.url);
    let candidates = [
        (
            plugin_fixtures::WRONG_VERSION,
            "expected it to export chord:destination/plugin@1.x, found chord:destination/plugin@2.0.0",
        ),
        (
            plugin_fixtures::TRAPPING_IMPOSTOR,
            "failed its canary: plugin klaviyo@0.1.0 panicked: impostor plugin trapped on an identify",
        ),
        (
            plugin_fixtures::FOREIGN_IMPOSTOR,
            "declares host collector.evil.example, which the operator has not approved",
        ),
        (
            plugin_fixtures::HOSTILE,
            "the candidate is destination \"hostile\", but this slot serves \"klaviyo\"",
        ),
    ];
    for (i, (path, reason)) in candidates.iter().enumerate() {
        let (status, answer) = admin(&client, reqwest::Method::PUT, url.clone(), component(path)).await;
        assert_eq!(status, 422, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains(reason), "{answer}");
        // Traffic still flows, through the original version.
        let id = format!("still-{i}");
        assert_eq!(post_track(&client, &serve.url, &id).await, 200);
    }
    wait_for("the events sent between refusals", || sandbox.events().len() == 4).await;
    let (_, listed) = admin(
        &client,
        reqwest::Method::GET,
        format!("{}/admin/plugins", serve.url),
        vec![],
    )
    .await;
    assert_eq!(listed["destinations"][0]["active"]["version"], "1.0.0");
    assert_eq!(listed["destinations"][0]["previous"], Value::Null);
    assert_eq!(listed["destinations"][0]["active"]["events_mapped"], 4);
    serve.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let with_token = Serve::start_with(&spool_path(), &sandbox.url(), DEMO_KEY, &["--admin-token", ADMIN]);
    let client = reqwest::Client::new();
    let wrong = client
        .get(format!("{}/admin/plugins", with_token.url))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    with_token.kill9();
    let without = Serve::start(&spool_path(), &sandbox.url(), DEMO_KEY);
    let off = client
        .get(format!("{}/admin/plugins", without.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(off.status().as_u16(), 404, "no token configured: the admin API is off");
    without.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_dropped_into_the_plugin_directory_is_checked_and_swapped_in() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let dir = crate::cli_map::tempdir().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let dir_arg = dir.display().to_string();
    let serve = Serve::start_with(
        &spool_path(),
        &sandbox.url(),
        DEMO_KEY,
        &["--admin-token", ADMIN, "--plugin-dir", &dir_arg],
    );
    let client = reqwest::Client::new();
    let active = || {
        let (client, url) = (client.clone(), format!("{}/admin/plugins", serve.url));
        async move {
            admin(&client, reqwest::Method::GET, url, vec![]).await.1["destinations"][0]["active"]["version"].clone()
        }
    };
    // A broken candidate is refused; the active version stays.
    std::fs::write(dir.join("impostor.wasm"), component(plugin_fixtures::TRAPPING_IMPOSTOR)).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(active().await, "1.0.0");
    // A good one is swapped in.
    std::fs::write(dir.join("klaviyo-v2.wasm"), component(plugin_fixtures::KLAVIYO_V2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while active().await != "1.0.0+v2" {
        assert!(Instant::now() < deadline, "the new version was not swapped in");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(post_track(&client, &serve.url, "after-drop").await, 200);
    wait_for("the event after the swap", || sandbox.events().len() == 1).await;
    serve.kill9();
}

/// Regression: idle interpreting instances were keyed by the address of
/// their plugin, which did not keep it alive; after swaps a new version
/// could be loaded at a freed address and have a response judged by the
/// old version's instance. Instances now live in their version's own pool.
#[test]
fn a_version_loaded_where_another_was_freed_gets_none_of_its_instances() {
    use plugin_runtime::{Runtime, RuntimeConfig, Use};
    let runtime = Runtime::new(RuntimeConfig {
        concurrency: 2,
        cache_dir: Some(crate::support::cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    for _ in 0..20 {
        let v1 = Arc::new(runtime.load(cdp_host::bundled::KLAVIYO, "v1").unwrap());
        drop(v1.pool().checkout(&v1, Use::Interpreting).unwrap());
        drop(v1);
        let v2 = Arc::new(runtime.load(&component(plugin_fixtures::KLAVIYO_V2), "v2").unwrap());
        let mut instance = v2.pool().checkout(&v2, Use::Interpreting).unwrap();
        assert_eq!(instance.manifest().unwrap().version, "1.0.0+v2");
    }
}
