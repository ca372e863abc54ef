//! Batching (contract 1.1) through the real Klaviyo component and host,
//! against the sandbox's bulk endpoints: a bad item is dead-lettered alone
//! and the rest delivered once; 429 and 5xx on bulk requests lose nothing;
//! a bulk profile job's import errors reach their own events; no batch
//! passes a cap; a person's identify still lands first; and a 1.0 plugin,
//! which cannot batch, delivers as before, also across swaps with 1.1.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cdp_host::delivery::{DeadLetter, Delivery, DeliveryConfig, Report};
use cdp_host::settings::DestinationSettings;
use klaviyo_mock::{DEMO_KEY, Faults, KlaviyoMock, MockConfig};
use plugin_runtime::{Plugin, Runtime, RuntimeConfig};
use serde_json::{Value, json};

use crate::support::{cache_dir, klaviyo};

struct Run {
    report: Report,
    sandbox: KlaviyoMock,
    dead_letters: Vec<DeadLetter>,
}

fn sandbox_config(faults: Faults) -> MockConfig {
    MockConfig {
        rate_limits: false,
        faults,
        import_job_time: Duration::from_millis(50),
        ..MockConfig::default()
    }
}

async fn run(plugin: Arc<Plugin>, events: &[Value], sandbox: MockConfig, settings: Value, batch_always: bool) -> Run {
    let sandbox = crate::support::sandbox(sandbox).await;
    let mut settings = settings.as_object().cloned().unwrap_or_default();
    settings.insert("api_key".into(), DEMO_KEY.into());
    let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
    let config = DeliveryConfig {
        base_url: Some(sandbox.url().parse().unwrap()),
        max_attempts: 30,
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(50),
        batch_always,
        ..DeliveryConfig::default()
    };
    let delivery = Delivery::new(crate::support::slot(plugin, &settings), settings, config).unwrap();
    let input = events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
    let (report, dead_letters) = crate::support::deliver(&delivery, input).await;
    Run {
        report,
        sandbox,
        dead_letters,
    }
}

fn track(n: usize, email: &str) -> Value {
    json!({"type": "track", "event": "Product Viewed", "messageId": format!("t{n}"),
        "properties": {"product_id": format!("sku-{n}"), "email": email}})
}

fn endpoint_count(sandbox: &KlaviyoMock, endpoint: &str) -> u64 {
    sandbox.stats().by_endpoint.get(endpoint).copied().unwrap_or(0)
}

fn unique_ids(sandbox: &KlaviyoMock) -> Vec<String> {
    sandbox.events().into_iter().map(|e| e.unique_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_a_thousand_with_one_bad_event_dead_letters_it_and_delivers_the_rest_once() {
    // A thousand people: one event each may share a batch (a person's next
    // event waits for their previous one).
    let mut events: Vec<Value> = (0..1000)
        .map(|n| track(n, &format!("shopper{n}@example.org")))
        .collect();
    events[537]["properties"]["note"] = json!("REFUSE-ME");
    let faults = Faults {
        invalid_marker: Some("REFUSE-ME".into()),
        ..Faults::default()
    };
    let run = run(klaviyo(), &events, sandbox_config(faults), json!({}), true).await;
    assert_eq!(
        (run.report.delivered, run.report.dead_lettered),
        (999, 1),
        "{}",
        run.report.summary()
    );
    let letter = &run.dead_letters[0];
    assert!(
        letter.reason.contains("rejected this event in a bulk request") && letter.reason.contains("injected fault"),
        "{}",
        letter.reason
    );
    assert!(letter.event.contains("t537"), "the letter holds its own event");
    let shown = letter.request_json().to_string();
    assert!(shown.contains("/api/events") && !shown.contains(DEMO_KEY), "{shown}");
    let ids = unique_ids(&run.sandbox);
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (999, 999), "each delivered once");
    assert!(!ids.contains(&"t537".to_string()));
    assert_eq!(endpoint_count(&run.sandbox, "POST /api/events"), 0);
    // The batch holding it was refused whole, once; its other items went
    // again in the next batch.
    assert_eq!(run.sandbox.stats().rejected.get("400 invalid"), Some(&1));
    let bulk = endpoint_count(&run.sandbox, "POST /api/event-bulk-create-jobs");
    assert!((2..=4).contains(&bulk), "{bulk} bulk requests for 1,000 events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_requests_answered_429_and_5xx_lose_nothing_and_repeat_nothing() {
    let events: Vec<Value> = (0..3000)
        .map(|n| track(n, &format!("shopper{}@example.org", n % 700)))
        .collect();
    let faults = Faults {
        server_errors: 0.25,
        throttle_storm: 0.15,
        storm_retry_after: 1,
        ..Faults::default()
    };
    let run = run(klaviyo(), &events, sandbox_config(faults), json!({}), true).await;
    assert_eq!(run.report.delivered, 3000, "{}", run.report.summary());
    let ids = unique_ids(&run.sandbox);
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3000);
    let stats = run.sandbox.stats();
    assert!(
        stats.faults.values().sum::<u64>() > 0,
        "faults were injected: {stats:?}"
    );
    assert!(endpoint_count(&run.sandbox, "POST /api/event-bulk-create-jobs") >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_profile_job_reporting_import_errors_dead_letters_those_identifies_only() {
    let mut events: Vec<Value> = (0..400)
        .map(|n| {
            json!({"type": "identify", "messageId": format!("id{n}"),
                "traits": {"email": format!("person{n}@example.org"), "firstName": format!("P{n}")}})
        })
        .collect();
    events[17]["traits"]["lastName"] = json!("REFUSE-ME");
    events[301]["traits"]["lastName"] = json!("REFUSE-ME");
    let faults = Faults {
        invalid_marker: Some("REFUSE-ME".into()),
        ..Faults::default()
    };
    let run = run(
        klaviyo(),
        &events,
        sandbox_config(faults),
        json!({"bulk_profiles": true}),
        true,
    )
    .await;
    assert_eq!(
        (run.report.delivered, run.report.dead_lettered),
        (398, 2),
        "{}",
        run.report.summary()
    );
    for letter in &run.dead_letters {
        assert!(
            letter.reason.contains("bulk import rejected this profile"),
            "{}",
            letter.reason
        );
    }
    assert!(run.dead_letters[0].event.contains("id17") && run.dead_letters[1].event.contains("id301"));
    assert_eq!(run.sandbox.profiles().len(), 398);
    assert!(endpoint_count(&run.sandbox, "POST /api/profile-bulk-import-jobs") >= 1);
    assert!(endpoint_count(&run.sandbox, "GET /api/profile-bulk-import-jobs/{id}/import-errors") >= 1);
    assert_eq!(endpoint_count(&run.sandbox, "POST /api/profile-import"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_large_events_never_make_a_batch_pass_a_cap() {
    // About 360 KB each once mapped: 5 MB holds 13 of them, not 1,000.
    let events: Vec<Value> = (0..120)
        .map(|n| {
            let mut event = track(n, &format!("big{n}@example.org"));
            for k in 0..4 {
                event["properties"][format!("blob{k}")] = json!("x".repeat(90_000));
            }
            event
        })
        .collect();
    let run = run(klaviyo(), &events, sandbox_config(Faults::default()), json!({}), true).await;
    assert_eq!(run.report.delivered, 120, "{}", run.report.summary());
    let stats = run.sandbox.stats();
    assert!(
        stats.rejected.is_empty(),
        "no request was refused: {:?}",
        stats.rejected
    );
    assert!(endpoint_count(&run.sandbox, "POST /api/event-bulk-create-jobs") >= 9);
    assert_eq!(unique_ids(&run.sandbox).len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_persons_identify_lands_before_their_later_events_through_bulk_jobs() {
    let mut events = Vec::new();
    for p in 0..150 {
        let email = format!("shopper{p}@example.org");
        events.push(json!({"type": "identify", "messageId": format!("p{p}"), "userId": format!("u{p}"), "traits": {"email": email}}));
        for e in 0..3 {
            events.push(
                json!({"type": "track", "event": "Checkout Started", "messageId": format!("p{p}-{e}"),
                "userId": format!("u{p}"), "context": {"traits": {"email": email}}, "properties": {"step": e}}),
            );
        }
    }
    let faults = Faults {
        server_errors: 0.1,
        ..Faults::default()
    };
    let run = run(
        klaviyo(),
        &events,
        sandbox_config(faults),
        json!({"bulk_profiles": true}),
        true,
    )
    .await;
    assert_eq!(run.report.delivered, 600, "{}", run.report.summary());
    assert_eq!(
        crate::support::assert_each_profile_arrived_before_its_events(&run.sandbox),
        150
    );
}

fn klaviyo_1_0() -> Arc<Plugin> {
    let runtime = Runtime::new(RuntimeConfig {
        concurrency: 16,
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(plugin_fixtures::KLAVIYO_1_0).unwrap();
    Arc::new(runtime.load(&bytes, "klaviyo-1.0.wasm").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_0_plugin_loads_and_delivers_unbatched() {
    let plugin = klaviyo_1_0();
    assert_eq!(plugin.interface(), "chord:destination/plugin@1.0.0");
    assert!(!plugin.batches());
    // No skip codes before 1.2: every skip is counted as `other`.
    assert!(plugin.skip_codes().is_empty());
    assert_eq!(plugin.skip_code("page views are not passed through"), "other");
    let events: Vec<Value> = (0..300)
        .map(|n| track(n, &format!("shopper{}@example.org", n % 50)))
        .collect();
    let run = run(plugin, &events, sandbox_config(Faults::default()), json!({}), true).await;
    assert_eq!(run.report.delivered, 300, "{}", run.report.summary());
    assert_eq!(endpoint_count(&run.sandbox, "POST /api/events"), 300);
    assert_eq!(endpoint_count(&run.sandbox, "POST /api/event-bulk-create-jobs"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_between_1_0_and_1_1_under_traffic_delivers_every_event_once() {
    let sandbox = crate::support::sandbox(sandbox_config(Faults::default())).await;
    let plugin = klaviyo();
    let mut settings = serde_json::Map::new();
    settings.insert("api_key".into(), DEMO_KEY.into());
    let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
    let config = DeliveryConfig {
        base_url: Some(sandbox.url().parse().unwrap()),
        backoff_base: Duration::from_millis(5),
        batch_always: true,
        ..DeliveryConfig::default()
    };
    let slot = crate::support::slot(plugin, &settings);
    let delivery = Delivery::new(slot.clone(), settings, config).unwrap();
    let events: Vec<Value> = (0..4000)
        .map(|n| track(n, &format!("shopper{}@example.org", n % 900)))
        .collect();
    let input = events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");

    let swapping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let swapper = std::thread::spawn({
        let (slot, swapping) = (slot.clone(), swapping.clone());
        move || {
            let old = std::fs::read(plugin_fixtures::KLAVIYO_1_0).unwrap();
            let new = cdp_host::bundled::KLAVIYO;
            let mut swaps = 0;
            while swapping.load(std::sync::atomic::Ordering::Relaxed) {
                let (bytes, name) = if swaps % 2 == 0 {
                    (&old[..], "1.0")
                } else {
                    (new, "1.1")
                };
                slot.swap_in(bytes, name).unwrap();
                swaps += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
            swaps
        }
    });
    let (report, letters) = crate::support::deliver(&delivery, input).await;
    swapping.store(false, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps >= 2, "only {swaps} swaps happened");
    assert_eq!(report.delivered, 4000, "{} {letters:?}", report.summary());
    let ids = unique_ids(&sandbox);
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (4000, 4000));
    assert!(
        endpoint_count(&sandbox, "POST /api/events") > 0,
        "the 1.0 version sent alone"
    );
    assert!(
        endpoint_count(&sandbox, "POST /api/event-bulk-create-jobs") > 0,
        "the 1.1 version batched"
    );
}
