//! `send`'s engine against the local Klaviyo sandbox, over real HTTP on
//! loopback, with the real component: every sendable event ends accepted
//! exactly once, whatever the network does, and the counts add up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cdp_host::delivery::{DeadLetter, Delivery, DeliveryConfig, EventOutcome, Report};
use cdp_host::settings::DestinationSettings;
use klaviyo_mock::{DEMO_KEY, EVENTS_ONLY_KEY, Faults, KlaviyoMock, MockConfig};
use serde_json::{Value, json};

use crate::support::klaviyo;

/// `people` shoppers, each with an identify, four tracks and a page view,
/// plus two anonymous shoppers whose events carry no email or phone.
fn corpus(people: usize) -> (String, BTreeSet<String>) {
    let mut lines = Vec::new();
    let mut sendable_tracks = BTreeSet::new();
    for p in 0..people {
        let email = format!("shopper{p}@example.org");
        lines.push(json!({"type": "identify", "messageId": format!("p{p}-id"), "userId": format!("u{p}"),
            "traits": {"email": email, "firstName": format!("Shopper{p}"), "phone": format!("+1617555{:04}", 1000 + p)}}));
        for (i, name) in ["Product Viewed", "Product Added", "Checkout Started", "Order Completed"]
            .iter()
            .enumerate()
        {
            let id = format!("p{p}-e{i}");
            lines.push(
                json!({"type": "track", "event": name, "messageId": id, "userId": format!("u{p}"),
                "properties": {"product_id": format!("sku-{i}"), "revenue": 10 * (i + 1), "currency": "USD"},
                "context": {"traits": {"email": email}}}),
            );
            sendable_tracks.insert(id);
        }
        lines.push(json!({"type": "page", "messageId": format!("p{p}-page"), "properties": {"path": "/"}}));
    }
    for a in 0..2 {
        lines.push(json!({"type": "track", "event": "Product Viewed", "messageId": format!("anon{a}"), "anonymousId": format!("anon-{a}"), "properties": {}}));
    }
    let text = lines.iter().map(Value::to_string).collect::<Vec<_>>().join("\n") + "\n";
    (text, sendable_tracks)
}

struct Run {
    report: Report,
    sandbox: KlaviyoMock,
    dead_letters: Vec<DeadLetter>,
}

async fn run(
    input: String,
    sandbox: MockConfig,
    api_key: &str,
    tweak: impl FnOnce(&mut DeliveryConfig),
    settings: Value,
) -> Run {
    let sandbox = crate::support::sandbox(sandbox).await;
    let plugin = klaviyo();
    let mut settings = settings.as_object().cloned().unwrap_or_default();
    settings.insert("api_key".into(), api_key.into());
    let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
    let mut config = DeliveryConfig {
        base_url: Some(sandbox.url().parse().unwrap()),
        concurrency: 32,
        max_attempts: 25,
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        ..DeliveryConfig::default()
    };
    tweak(&mut config);
    let delivery = Delivery::new(crate::support::slot(plugin, &settings), settings, config).unwrap();
    let (report, dead_letters) = crate::support::deliver(&delivery, input).await;
    Run {
        report,
        sandbox,
        dead_letters,
    }
}

/// Every sendable event is stored exactly once, every person's profile was
/// imported, and delivered + skipped + dead-lettered = read.
fn assert_exactly_once(run: &Run, people: usize, sendable_tracks: &BTreeSet<String>) {
    let r = &run.report;
    assert_eq!(
        r.delivered + r.skipped_total() + r.dead_lettered,
        r.read,
        "{}",
        r.summary()
    );
    assert_eq!(r.dead_lettered, 0, "dead letters: {:#?}", run.dead_letters);
    assert_eq!(r.read as usize, people * 6 + 2);
    assert_eq!(r.delivered as usize, people * 5);
    let stored: Vec<String> = run.sandbox.events().into_iter().map(|e| e.unique_id).collect();
    let unique: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), unique.len(), "an event was stored twice");
    assert_eq!(&unique, sendable_tracks);
    assert_eq!(run.sandbox.profiles().len(), people);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_faults_every_sendable_event_is_accepted_once() {
    let (input, tracks) = corpus(20);
    let run = run(input, MockConfig::default(), DEMO_KEY, |_| {}, json!({})).await;
    assert_exactly_once(&run, 20, &tracks);
    assert_eq!(run.report.retries, 0);
    assert_eq!(run.sandbox.stats().deduplicated, 0);
    let skipped: BTreeMap<&str, u64> = run.report.skipped.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(skipped["page views are not passed through"], 20);
    assert_eq!(
        skipped["no email or phone number: Chord sends Klaviyo only events that carry one"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_server_errors_lose_and_duplicate_nothing() {
    let (input, tracks) = corpus(20);
    let faults = Faults {
        server_errors: 0.3,
        html_errors: true,
        ..Faults::default()
    };
    let run = run(
        input,
        MockConfig {
            faults,
            seed: 7,
            ..MockConfig::default()
        },
        DEMO_KEY,
        |_| {},
        json!({}),
    )
    .await;
    assert_exactly_once(&run, 20, &tracks);
    assert!(run.report.retries > 0);
    // Half the injected errors come after the event was stored: the retry
    // arrives twice and Klaviyo's unique_id dedup drops it.
    assert!(run.sandbox.stats().deduplicated > 0, "{:?}", run.sandbox.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_429s_is_waited_out_honouring_retry_after() {
    let (input, tracks) = corpus(10);
    let faults = Faults {
        throttle_storm: 0.3,
        ..Faults::default()
    };
    let started = std::time::Instant::now();
    let run = run(
        input,
        MockConfig {
            faults,
            seed: 3,
            ..MockConfig::default()
        },
        DEMO_KEY,
        |_| {},
        json!({}),
    )
    .await;
    assert_exactly_once(&run, 10, &tracks);
    assert!(run.report.retries > 0);
    // Every throttled request waited at least the Retry-After second.
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_without_duplicates() {
    let (input, tracks) = corpus(20);
    let faults = Faults {
        drop_connections: 0.2,
        ..Faults::default()
    };
    let run = run(
        input,
        MockConfig {
            faults,
            seed: 11,
            ..MockConfig::default()
        },
        DEMO_KEY,
        |_| {},
        json!({}),
    )
    .await;
    assert_exactly_once(&run, 20, &tracks);
    assert!(
        run.sandbox
            .stats()
            .faults
            .get("dropped_connection")
            .copied()
            .unwrap_or(0)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_slower_than_the_client_timeout_are_retried_without_duplicates() {
    let (input, tracks) = corpus(10);
    let faults = Faults {
        latency: Duration::from_millis(600),
        slow: 0.2,
        ..Faults::default()
    };
    let run = run(
        input,
        MockConfig {
            faults,
            seed: 5,
            ..MockConfig::default()
        },
        DEMO_KEY,
        |c| c.request_timeout = Duration::from_millis(200),
        json!({}),
    )
    .await;
    assert_exactly_once(&run, 10, &tracks);
    assert!(run.report.retries > 0);
    assert!(
        run.sandbox.stats().deduplicated > 0,
        "timed-out requests had been stored: {:?}",
        run.sandbox.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_dead_lettered_once_per_event_without_retries() {
    let (input, _) = corpus(3);
    let run = run(input, MockConfig::default(), "pk_not_a_key", |_| {}, json!({})).await;
    let r = &run.report;
    assert_eq!(r.delivered, 0);
    assert_eq!(r.dead_lettered, 15);
    assert_eq!(r.retries, 0);
    assert_eq!(r.requests_sent, 15, "one request per event, no retry storm");
    let letter = &run.dead_letters[0];
    assert!(letter.reason.contains("check the api_key setting"), "{letter:?}");
    assert_eq!(letter.response.as_ref().unwrap().status, 401);
    assert_eq!(
        letter.request.as_ref().unwrap().headers["authorization"],
        "Klaviyo-API-Key ***"
    );
    assert!(
        !format!("{letter:?}").contains("pk_not_a_key"),
        "the key leaked into a dead letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_only_key_dead_letters_identify_naming_the_missing_scope() {
    let (input, tracks) = corpus(3);
    let run = run(input, MockConfig::default(), EVENTS_ONLY_KEY, |_| {}, json!({})).await;
    let r = &run.report;
    assert_eq!(r.dead_lettered, 3, "the three identifies");
    assert_eq!(r.delivered, 12, "the tracks still go through");
    for letter in &run.dead_letters {
        assert!(letter.reason.contains("profiles:write"), "{letter:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&letter.event).unwrap()["type"],
            "identify"
        );
    }
    let stored: BTreeSet<String> = run.sandbox.events().into_iter().map(|e| e.unique_id).collect();
    assert_eq!(stored, tracks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_klaviyo_finds_invalid_is_dead_lettered_with_klaviyos_message() {
    let (input, _) = corpus(2);
    let run = run(
        input,
        MockConfig::default(),
        DEMO_KEY,
        |_| {},
        json!({"revision": "2099-01-01"}),
    )
    .await;
    assert_eq!(run.report.dead_lettered, 10);
    assert_eq!(run.report.retries, 0);
    let reason = &run.dead_letters[0].reason;
    assert!(
        reason.contains("Klaviyo rejected the request as invalid (400 invalid"),
        "{reason}"
    );
    assert!(reason.contains("2099-01-01"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_persons_identify_lands_before_their_later_events() {
    let (input, _) = corpus(30);
    let faults = Faults {
        server_errors: 0.2,
        ..Faults::default()
    };
    let run = run(
        input,
        MockConfig {
            faults,
            seed: 9,
            ..MockConfig::default()
        },
        DEMO_KEY,
        |c| c.concurrency = 16,
        json!({}),
    )
    .await;
    assert_eq!(
        crate::support::assert_each_profile_arrived_before_its_events(&run.sandbox),
        30
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_profile_conflict_is_resolved_by_sending_without_the_phone() {
    let events = [
        json!({"type": "identify", "messageId": "a", "traits": {"email": "ada@example.org"}}),
        json!({"type": "identify", "messageId": "b", "traits": {"email": "other@example.org", "phone": "+16175550123"}}),
        json!({"type": "identify", "messageId": "c", "traits": {"email": "ada@example.org", "phone": "+16175550123", "plan": "gold"}}),
    ];
    let input = events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
    // b and c are different people sharing a phone: only one mapping worker
    // keeps their order under any load (see the mapping stage).
    let one_at_a_time = |c: &mut DeliveryConfig| {
        c.concurrency = 1;
        c.mapping_workers = 1;
    };
    let run = run(input, MockConfig::default(), DEMO_KEY, one_at_a_time, json!({})).await;
    assert_eq!(run.report.delivered, 3, "{:#?}", run.dead_letters);
    assert_eq!(
        run.sandbox.stats().rejected.get("409 duplicate_profile"),
        Some(&1),
        "{:?}",
        run.sandbox.stats()
    );
    let ada = run
        .sandbox
        .profiles()
        .into_iter()
        .find(|p| p.email.as_deref() == Some("ada@example.org"))
        .unwrap();
    assert_eq!(ada.phone_number, None);
    assert_eq!(ada.attributes["properties"]["phone_raw"], "+16175550123");
    assert_eq!(ada.attributes["properties"]["plan"], "gold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_reported_once_per_event() {
    let (input, _) = corpus(5);
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let plugin = klaviyo();
    let mut settings = serde_json::Map::new();
    settings.insert("api_key".into(), DEMO_KEY.into());
    let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
    let config = DeliveryConfig {
        base_url: Some(sandbox.url().parse().unwrap()),
        ..DeliveryConfig::default()
    };
    let delivery = Delivery::new(crate::support::slot(plugin, &settings), settings, config).unwrap();
    let lines = std::sync::Mutex::new(Vec::new());
    delivery
        .run(std::io::Cursor::new(input.into_bytes()), |record| {
            assert!(!matches!(record.outcome, EventOutcome::DeadLettered(_)));
            lines.lock().unwrap().push(record.id.number());
        })
        .await
        .unwrap();
    let mut lines = lines.into_inner().unwrap();
    lines.sort();
    assert_eq!(lines, (1..=32).collect::<Vec<i64>>());
}

/// With traces on (as the console asks), each record carries the event,
/// every request with its key masked, and the answer it settled on; a
/// refused request's answer too. Off, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_delivery_keeps_each_request_masked_with_its_answer() {
    let sandbox = crate::support::sandbox(MockConfig {
        rate_limits: false,
        faults: Faults {
            invalid_marker: Some("refuse-me".into()),
            ..Faults::default()
        },
        ..MockConfig::default()
    })
    .await;
    let plugin = klaviyo();
    let mut settings = serde_json::Map::new();
    settings.insert("api_key".into(), DEMO_KEY.into());
    let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
    let events = [
        json!({"type": "identify", "messageId": "t-id", "userId": "u1", "traits": {"email": "a@example.org"}}),
        json!({"type": "track", "event": "Order Completed", "messageId": "t-order", "userId": "u1",
               "properties": {"email": "a@example.org", "total": 42}}),
        json!({"type": "track", "event": "Order Completed", "messageId": "t-refused", "userId": "u1",
               "properties": {"email": "a@example.org", "note": "refuse-me"}}),
        json!({"type": "page", "messageId": "t-page", "userId": "u1"}),
    ];
    let input = events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n") + "\n";
    for trace in [true, false] {
        let config = DeliveryConfig {
            base_url: Some(sandbox.url().parse().unwrap()),
            max_attempts: 2,
            trace,
            ..DeliveryConfig::default()
        };
        let delivery = Delivery::new(
            crate::support::slot(plugin.clone(), &settings),
            settings.clone(),
            config,
        )
        .unwrap();
        let records = std::sync::Mutex::new(BTreeMap::new());
        delivery
            .run(std::io::Cursor::new(input.clone().into_bytes()), |record| {
                records
                    .lock()
                    .unwrap()
                    .insert(record.message_id.clone().unwrap(), record.clone());
            })
            .await
            .unwrap();
        let records = records.into_inner().unwrap();
        if !trace {
            assert!(records.values().all(|r| r.trace.is_none()));
            continue;
        }
        let order = records["t-order"].trace.as_ref().expect("a trace");
        assert!(order.event.contains("\"t-order\""));
        assert_eq!(order.person.as_deref(), Some("u\"u1\""));
        assert_eq!(order.requests.len(), 1);
        // As sent, the request names its key (a template), never holds it;
        // shown, it is masked.
        assert!(!format!("{:?}", order.requests[0].request).contains(DEMO_KEY));
        let shown = serde_json::to_string(&order.requests[0].shown()).unwrap();
        assert!(
            shown.contains("Klaviyo-API-Key ***") && !shown.contains(DEMO_KEY),
            "{shown}"
        );
        assert_eq!(order.requests[0].response.as_ref().map(|r| r.status), Some(202));
        let refused = records["t-refused"].trace.as_ref().expect("a trace");
        assert!(matches!(records["t-refused"].outcome, EventOutcome::DeadLettered(_)));
        assert_eq!(refused.requests[0].response.as_ref().map(|r| r.status), Some(400));
        let page = records["t-page"].trace.as_ref().expect("a skipped event's trace");
        assert!(page.requests.is_empty() && page.event.contains("t-page"));
    }
}
