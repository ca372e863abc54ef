//! Properties that must hold for any input, checked on generated ones
//! (proptest, in the normal test run): the mapping never panics and every
//! request it makes passes the host's output checks; the secret template
//! reads every header value back exactly; delivery's counts add up, with
//! or without batches, whatever the sandbox answers.

use std::sync::Arc;

use plugin_runtime::{Header, HttpRequest, Plugin, template};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::support::klaviyo;

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Text that is sometimes an email or a phone number, often not.
fn identifier() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z]{1,8}@[a-z]{1,8}\\.(com|org|de)".prop_map(Value::String),
        "\\+?[0-9 ()\\-]{3,18}".prop_map(Value::String),
        ".{0,30}".prop_map(Value::String),
        json_value(),
    ]
}

/// Events shaped like Chord's, with anything in their fields.
fn chord_event() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("track"),
            Just("identify"),
            Just("page"),
            Just("group"),
            Just("alias"),
            Just("other")
        ],
        prop_oneof![".{0,140}".prop_map(Value::String), json_value()],
        prop::option::of(".{0,70}"),
        (identifier(), identifier(), identifier()),
        json_value(),
        json_value(),
        prop::option::of("[A-Za-z]{2}|.{0,10}"),
    )
        .prop_map(
            |(kind, name, message_id, (email, phone, traits_phone), properties, extra, country)| {
                let mut properties = match properties {
                    Value::Object(map) => map,
                    other => Map::from_iter([("value".to_string(), other)]),
                };
                properties.insert("email".into(), email.clone());
                properties.insert("extra".into(), extra);
                json!({
                    "type": kind,
                    "event": name,
                    "messageId": message_id,
                    "userId": "u-1",
                    "properties": properties,
                    "traits": {"email": email, "phone": phone, "address": {"country": country}},
                    "context": {"traits": {"phone": traits_phone}, "locale": "en-US"},
                    "timestamp": "2026-11-27T10:00:00.000Z",
                })
            },
        )
}

fn as_host_request(request: klaviyo_destination::contract::Request) -> HttpRequest {
    HttpRequest {
        method: request.method,
        url: request.url,
        headers: request
            .headers
            .into_iter()
            .map(|h| Header {
                name: h.name,
                value: h.value,
            })
            .collect(),
        body: request.body,
        idempotency_key: request.idempotency_key,
        rate_class: request.rate_class,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_event_maps_without_panicking_to_requests_that_pass_the_checks(event in chord_event()) {
        let plugin: Arc<Plugin> = klaviyo();
        for settings in [r#"{}"#, r#"{"default_country":"GB","ordered_product_events":true}"#] {
            let mapping = klaviyo_destination::map(settings, &event.to_string(), 1_795_824_000_000);
            if let klaviyo_destination::contract::Outcome::Send(requests) = mapping.outcome {
                let requests: Vec<HttpRequest> = requests.into_iter().map(as_host_request).collect();
                prop_assert!(plugin.check_requests(&requests).is_ok(), "{:?}", plugin.check_requests(&requests));
                for request in &requests {
                    prop_assert!(serde_json::from_str::<Value>(&request.body).is_ok(), "a body is not JSON");
                }
            }
        }
    }

    #[test]
    fn any_text_maps_without_panicking(text in ".{0,200}") {
        let _ = klaviyo_destination::map("{}", &text, 0);
    }

    #[test]
    fn the_secret_template_reads_every_header_value_back_exactly(value in "(.{0,12}(\\{\\{secret:[a-z_]{0,8}(\\}\\})?)?){0,4}") {
        let rebuilt: String = template::segments(&value)
            .map(|segment| match segment {
                template::Segment::Text(text) => text.to_string(),
                template::Segment::Secret(name) => format!("{{{{secret:{name}}}}}"),
            })
            .collect();
        prop_assert_eq!(&rebuilt, &value);
        // Filling in changes only the placeholders: with none, nothing.
        let filled = template::render(&value, |_| Ok::<_, ()>("S")).unwrap();
        if template::references(&value).count() == 0 {
            prop_assert_eq!(filled, value);
        }
    }
}

/// An input line: an event, or something that is not one.
fn input_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => chord_event().prop_map(|event| event.to_string()),
        1 => ".{0,40}".prop_map(|text: String| text.replace('\n', " ")),
        1 => json_value().prop_map(|value| value.to_string()),
    ]
}

proptest! {
    // Each case runs a sandbox and a delivery: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn deliverys_counts_always_add_up(
        lines in prop::collection::vec(input_line(), 0..30),
        server_errors in 0.0f64..0.5,
        batch_always in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (report, records) = runtime.block_on(async {
            let sandbox = crate::support::sandbox(klaviyo_mock::MockConfig {
                rate_limits: false,
                faults: klaviyo_mock::Faults { server_errors, ..Default::default() },
                ..Default::default()
            })
            .await;
            let plugin = klaviyo();
            let mut settings = Map::new();
            settings.insert("api_key".into(), klaviyo_mock::DEMO_KEY.into());
            let settings = cdp_host::settings::DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None).unwrap();
            let config = cdp_host::delivery::DeliveryConfig {
                base_url: Some(sandbox.url().parse().unwrap()),
                max_attempts: 3,
                backoff_base: std::time::Duration::from_millis(1),
                backoff_cap: std::time::Duration::from_millis(5),
                batch_always,
                ..Default::default()
            };
            let delivery = cdp_host::delivery::Delivery::new(crate::support::slot(plugin, &settings), settings, config).unwrap();
            let records = std::sync::Mutex::new(Vec::new());
            let report = delivery
                .run(std::io::Cursor::new(lines.join("\n").into_bytes()), |record| {
                    records.lock().unwrap().push(record.id);
                })
                .await
                .unwrap();
            (report, records.into_inner().unwrap())
        });
        // Lines as a reader sees them: an empty input has none, and a final
        // newline ends the last line rather than starting an empty one.
        let read = lines.join("\n").lines().count() as u64;
        prop_assert_eq!(report.read, read);
        let skipped: u64 = report.skipped.values().sum();
        prop_assert_eq!(report.delivered + skipped + report.dead_lettered, report.read, "{}", report.summary());
        let mut ids = records.clone();
        ids.sort();
        ids.dedup();
        prop_assert_eq!(ids.len(), records.len(), "an event was reported twice");
        prop_assert_eq!(records.len() as u64, report.read);
    }
}
