//! Hostile plugins, as real components, through the real host: a plugin
//! that loops, hoards memory, panics, floods output, sends elsewhere, or
//! probes its environment cannot hang, crash, starve or exfiltrate; the
//! events around it are delivered, and the operator reads one clear reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_host::delivery::{DeadLetter, Delivery, DeliveryConfig, Report};
use cdp_host::mapping::{EventId, EventMapper, MappedOutcome};
use cdp_host::settings::DestinationSettings;
use klaviyo_mock::{DEMO_KEY, KlaviyoMock, MockConfig};
use plugin_runtime::{CallError, LoadError, Mapping, Plugin, Runtime, RuntimeConfig};
use serde_json::{Value, json};

use crate::support::cache_dir;

const DEADLINE: Duration = Duration::from_millis(200);
const MEMORY_MIB: usize = 32;

fn runtime() -> Arc<Runtime> {
    let mut config = RuntimeConfig {
        concurrency: 8,
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    };
    config.limits.deadline = DEADLINE;
    config.limits.memory_bytes = MEMORY_MIB << 20;
    Runtime::new(config).unwrap()
}

fn hostile() -> Arc<Plugin> {
    let bytes = std::fs::read(plugin_fixtures::HOSTILE).unwrap();
    Arc::new(runtime().load(&bytes, "hostile.wasm").unwrap())
}

fn settings(plugin: &Plugin) -> DestinationSettings {
    let mut object = serde_json::Map::new();
    object.insert("api_key".into(), DEMO_KEY.into());
    DestinationSettings::from_object(object, plugin.manifest(), &[], |_| None).unwrap()
}

/// A misbehaving event between two ordinary ones, delivered to a sandbox.
async fn deliver_between_neighbours(misbehaving: Value) -> (Report, KlaviyoMock, Vec<DeadLetter>) {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let plugin = hostile();
    let input = [
        json!({"messageId": "before"}),
        misbehaving,
        json!({"messageId": "after"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let config = DeliveryConfig {
        base_url: Some(sandbox.url().parse().unwrap()),
        ..DeliveryConfig::default()
    };
    let settings = settings(&plugin);
    let delivery = Delivery::new(crate::support::slot(plugin, &settings), settings, config).unwrap();
    let (report, letters) = crate::support::deliver(&delivery, input).await;
    (report, sandbox, letters)
}

/// The neighbours arrived, the misbehaving event was dead-lettered with a
/// reason containing `expected`, and nothing else happened.
fn assert_contained(report: &Report, sandbox: &KlaviyoMock, letters: &[DeadLetter], expected: &str) {
    assert_eq!(
        (report.read, report.delivered, report.dead_lettered),
        (3, 2, 1),
        "{}",
        report.summary()
    );
    let stored: Vec<String> = sandbox.events().into_iter().map(|e| e.unique_id).collect();
    assert_eq!(stored.len(), 2);
    assert!(stored.contains(&"before".to_string()) && stored.contains(&"after".to_string()));
    let reason = &letters[0].reason;
    assert!(
        reason.contains(expected),
        "reason {reason:?} should contain {expected:?}"
    );
    assert!(
        reason.starts_with("plugin hostile@0.1.0 "),
        "the reason names the plugin: {reason}"
    );
}

fn map_once(plugin: &Plugin, event: Value) -> (Duration, Result<Mapping, CallError>) {
    let mut instance = plugin.instance().unwrap();
    let started = Instant::now();
    let result = instance.map_event("{}", &event.to_string(), 0);
    (started.elapsed(), result)
}

// Plugin calls block (WASI's sync bindings drive tokio themselves), so,
// as in the host, they are made from plain threads, not async tasks.
#[test]
fn an_infinite_loop_is_stopped_at_its_deadline() {
    let (elapsed, result) = map_once(&hostile(), json!({"misbehave": "loop"}));
    assert_eq!(
        result.unwrap_err().to_string(),
        format!("exceeded its {DEADLINE:?} deadline")
    );
    // Never before the deadline (it once fired a tick early, at 199 ms);
    // the upper bound is loose so that a loaded CI machine cannot make it
    // flaky, and still far from "never stopped".
    assert!(
        elapsed >= DEADLINE && elapsed < DEADLINE * 10,
        "stopped after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_dead_lettered_as_poison_and_its_neighbours_are_delivered() {
    let (report, sandbox, letters) =
        deliver_between_neighbours(json!({"messageId": "loop", "misbehave": "loop"})).await;
    assert_contained(
        &report,
        &sandbox,
        &letters,
        "exceeded its 200ms deadline while mapping event loop (line 2)",
    );
    let reason = &letters[0].reason;
    assert!(reason.contains("poison: failed 3 times"), "{reason}");
}

/// Mapping runs on several workers, and an event the plugin is stuck on is
/// overtaken: the events of other people behind a poison event are
/// delivered while it runs into its deadline three times, and only the same
/// person's later event waits for it (their order is kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_holds_up_only_the_same_persons_later_events() {
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let plugin = hostile();
    let mut input = vec![json!({"messageId": "poison", "userId": "stuck", "misbehave": "loop"})];
    input.extend((0..40).map(|n| json!({"messageId": format!("other-{n}"), "userId": format!("person-{n}")})));
    input.push(json!({"messageId": "same-person-later", "userId": "stuck"}));
    let input = input.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
    let config = DeliveryConfig {
        base_url: Some(sandbox.url().parse().unwrap()),
        ..DeliveryConfig::default()
    };
    let settings = settings(&plugin);
    let delivery = Delivery::new(crate::support::slot(plugin, &settings), settings, config).unwrap();
    let finished = std::sync::Mutex::new(Vec::new());
    let report = delivery
        .run(std::io::Cursor::new(input.into_bytes()), |record| {
            finished
                .lock()
                .unwrap()
                .push(record.message_id.clone().unwrap_or_default());
        })
        .await
        .unwrap();
    assert_eq!(
        (report.read, report.delivered, report.dead_lettered),
        (42, 41, 1),
        "{}",
        report.summary()
    );
    let finished = finished.into_inner().unwrap();
    let position = |id: &str| finished.iter().position(|m| m == id).unwrap();
    // Three 200 ms deadlines against microseconds per ordinary event: every
    // other person's event is through before the poison is given up on.
    for n in 0..40 {
        assert!(position(&format!("other-{n}")) < position("poison"), "{finished:?}");
    }
    assert_eq!(position("same-person-later"), 41, "{finished:?}");
}

#[test]
fn unbounded_allocation_stops_at_the_memory_cap() {
    let (_, result) = map_once(&hostile(), json!({"misbehave": "alloc"}));
    // The memory cap, not the deadline, stopped it.
    assert_eq!(
        result.unwrap_err().to_string(),
        format!("reached its memory limit of {MEMORY_MIB} MiB")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_is_dead_lettered_and_its_neighbours_are_delivered() {
    let (report, sandbox, letters) =
        deliver_between_neighbours(json!({"messageId": "hoard", "misbehave": "alloc"})).await;
    assert_contained(&report, &sandbox, &letters, "reached its memory limit of 32 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_reaches_the_operator_with_its_message() {
    let (report, sandbox, letters) =
        deliver_between_neighbours(json!({"messageId": "boom", "misbehave": "panic"})).await;
    assert_contained(
        &report,
        &sandbox,
        &letters,
        "panicked: hostile plugin panicked on purpose (at ",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_output_is_refused() {
    let (report, sandbox, letters) =
        deliver_between_neighbours(json!({"messageId": "flood", "misbehave": "huge"})).await;
    assert_contained(
        &report,
        &sandbox,
        &letters,
        "returned unusable output: 1500 requests for one event, over the limit of 1000",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_foreign_host_is_refused_and_never_sent() {
    // A listener standing in for the attacker's server: nothing may reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("https://{}/collect", listener.local_addr().unwrap());
    let (report, sandbox, letters) =
        deliver_between_neighbours(json!({"messageId": "exfil", "misbehave": "foreign", "url": url})).await;
    assert_contained(
        &report,
        &sandbox,
        &letters,
        "a request to 127.0.0.1, which the plugin's manifest does not declare",
    );
    assert!(listener.accept().is_err(), "the foreign host was contacted");
}

#[test]
fn a_plugin_gets_no_environment_arguments_files_or_network() {
    let plugin = hostile();
    let settings = settings(&plugin);
    let mapper = EventMapper::new(crate::support::slot(plugin, &settings), settings);
    let mapped = mapper.map(
        EventId::Line(1),
        &json!({"messageId": "probe", "misbehave": "probe"}).to_string(),
    );
    let MappedOutcome::Send(requests) = mapped.outcome else {
        panic!("{:?}", mapped.outcome)
    };
    let body: Value = serde_json::from_str(&requests[0].body).unwrap();
    let found = &body["data"]["attributes"]["properties"];
    assert_eq!(found["env"], json!([]), "the host's environment leaked: {found}");
    assert_eq!(found["args"], json!([]));
    for probe in ["file", "dir", "net"] {
        assert!(
            found[probe].as_str().unwrap().starts_with("Err("),
            "{probe}: {}",
            found[probe]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_placeholder_in_a_body_is_never_filled_in() {
    let (report, sandbox, _) = deliver_between_neighbours(json!({"messageId": "leak", "misbehave": "secret"})).await;
    assert_eq!(report.delivered, 3);
    let leak = sandbox.events().into_iter().find(|e| e.unique_id == "leak").unwrap();
    assert_eq!(
        leak.properties["leak"], "{{secret:api_key}}",
        "secrets go into headers only"
    );
}

#[test]
fn a_plugin_of_another_major_version_is_refused_naming_both() {
    let bytes = std::fs::read(plugin_fixtures::WRONG_VERSION).unwrap();
    let error = runtime().load(&bytes, "future.wasm").expect_err("must be refused");
    assert!(matches!(error, LoadError::Incompatible { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "future.wasm is not a compatible destination plugin: expected it to export chord:destination/plugin@1.x, found chord:destination/plugin@2.0.0"
    );
}

#[test]
fn bytes_that_are_not_a_component_are_refused_in_one_sentence() {
    let runtime = runtime();
    let random: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let error = runtime.load(&random, "random.bin").err().unwrap();
    assert_eq!(
        error.to_string(),
        "random.bin is not a WebAssembly file (it does not start with the \\0asm magic number)"
    );
    let mut garbage = b"\0asm\x0d\x00\x01\x00".to_vec();
    garbage.extend_from_slice(&random);
    let error = runtime.load(&garbage, "garbage.wasm").err().unwrap();
    assert!(
        error
            .to_string()
            .starts_with("garbage.wasm is not a valid WebAssembly component: "),
        "{error}"
    );
    assert_eq!(error.to_string().lines().count(), 1, "{error}");
}

/// Regression: a full instance pool on the mapping side was taken for a
/// plugin failure, mapped three times and dead-lettered as poison. A busy
/// pool is the host's own limit, so the event waits for a slot instead.
#[test]
fn a_busy_instance_pool_makes_mapping_wait_not_dead_letter() {
    let runtime = Runtime::new(RuntimeConfig {
        concurrency: 1,
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(plugin_fixtures::HOSTILE).unwrap();
    let plugin = Arc::new(runtime.load(&bytes, "hostile").unwrap());
    if !runtime.pooling() {
        return; // On-demand allocation has no slots to run out of.
    }
    // The idle instance the load left in the pool, then every free slot.
    let mut held = vec![
        plugin
            .pool()
            .checkout(&plugin, plugin_runtime::Use::Mapping)
            .unwrap()
            .detach(),
    ];
    loop {
        match plugin.instance() {
            Ok(instance) => held.push(instance),
            Err(CallError::Busy(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let settings = settings(&plugin);
    let mapper = EventMapper::new(crate::support::slot(plugin, &settings), settings);
    let mapping = std::thread::spawn(move || mapper.map(EventId::Line(1), &json!({"messageId": "waits"}).to_string()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!mapping.is_finished(), "mapping went ahead with no free slot");
    drop(held.pop());
    let mapped = mapping.join().unwrap();
    assert!(!mapped.plugin_failed, "{:?}", mapped.outcome);
    assert!(matches!(mapped.outcome, MappedOutcome::Send(_)), "{:?}", mapped.outcome);
}

/// Regression: the WIT promises a plugin no clock, yet it read the host's
/// wall clock, its monotonic clock and real random bytes. The wall clock
/// now reads the `now` the host passed to the call, the monotonic clock
/// starts at zero per call and tells nothing of elapsed time, and what is
/// seeded from randomness is the same for the same call on a fresh instance.
#[test]
fn a_plugin_reads_no_real_clock_and_no_real_randomness() {
    let plugin = hostile();
    let probe = json!({"messageId": "clock", "misbehave": "probe"}).to_string();
    let now = 1_234_567_890_123; // 2009: far from the real time
    let read = || {
        let mut instance = plugin.instance().unwrap();
        let mapping = instance.map_event("{}", &probe, now).unwrap();
        let plugin_runtime::Outcome::Send(requests) = mapping.outcome else {
            panic!("{:?}", mapping.outcome)
        };
        let body: Value = serde_json::from_str(&requests[0].body).unwrap();
        body["data"]["attributes"]["properties"].clone()
    };
    let (first, second) = (read(), read());
    assert_eq!(first["wall_ms"], now, "the wall clock is the call's now: {first}");
    assert!(
        first["monotonic_ns"].as_u64().unwrap() < 10_000,
        "the monotonic clock measured real time: {first}"
    );
    assert_eq!(
        first["hash_seeded"], second["hash_seeded"],
        "the seed differs between identical calls"
    );
}

/// Regression: only requests were bounded; a 100 MB skip reason and 70
/// warnings of 1 MB came through whole, into `map`'s output, `send`'s
/// summary and the spool. Every text a plugin returns is bounded now.
#[test]
fn a_huge_reason_or_a_flood_of_warnings_is_refused() {
    let (_, result) = map_once(&hostile(), json!({"misbehave": "long-reason"}));
    assert_eq!(
        result.unwrap_err().to_string(),
        "returned unusable output: a skip reason of 8388608 bytes, over the limit of 16384"
    );
    let (_, result) = map_once(&hostile(), json!({"misbehave": "many-warnings"}));
    assert_eq!(
        result.unwrap_err().to_string(),
        "returned unusable output: 5000 warnings, over the limit of 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_reason_is_dead_lettered_naming_plugin_event_and_limit() {
    let (report, sandbox, letters) =
        deliver_between_neighbours(json!({"messageId": "wordy", "misbehave": "long-reason"})).await;
    assert_contained(
        &report,
        &sandbox,
        &letters,
        "returned unusable output: a skip reason of 8388608 bytes, over the limit of 16384 while mapping event wordy (line 2)",
    );
    assert!(letters[0].reason.len() < 1_000, "{} bytes", letters[0].reason.len());
}
