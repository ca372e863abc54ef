//! The sandbox's bulk endpoints, over real HTTP: a bad item rejects the
//! whole request with a pointer at that item, duplicates and caps are
//! refused, and a profile import is an asynchronous job whose import errors
//! can be read.

use std::time::Duration;

use klaviyo_mock::{DEMO_KEY, EVENTS_ONLY_KEY, KlaviyoMock, MockConfig};
use serde_json::{Value, json};

const REVISION: &str = "2026-07-15";

async fn sandbox() -> KlaviyoMock {
    let config = MockConfig {
        rate_limits: false,
        ..MockConfig::default()
    };
    KlaviyoMock::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn call(sandbox: &KlaviyoMock, key: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", sandbox.url());
    let mut request = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    }
    .header("authorization", format!("Klaviyo-API-Key {key}"))
    .header("revision", REVISION)
    .header("content-type", "application/vnd.api+json");
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn event(n: usize) -> Value {
    json!({"type": "event", "attributes": {
        "properties": {"n": n},
        "unique_id": format!("u{n}"),
        "metric": {"data": {"type": "metric", "attributes": {"name": "Order Completed"}}},
    }})
}

/// One entry per person, as the API requires, each with their events.
fn bulk(people: &[(String, Vec<Value>)]) -> Value {
    let entries: Vec<Value> = people
        .iter()
        .map(|(email, events)| {
            json!({"type": "event-bulk-create", "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
                "events": {"data": events},
            }})
        })
        .collect();
    json!({"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {"data": entries}}}})
}

fn thousand_events() -> Vec<(String, Vec<Value>)> {
    (0..100)
        .map(|p| {
            let email = format!("person{p}@example.org");
            (email.clone(), (0..10).map(|e| event(p * 10 + e)).collect())
        })
        .collect()
}

#[tokio::test]
async fn a_bulk_request_with_one_bad_event_is_rejected_whole_with_a_pointer_at_it() {
    let sandbox = sandbox().await;
    let mut people = thousand_events();
    people[53].1[7]["attributes"]["time"] = json!("not a time");
    let (status, answer) = call(
        &sandbox,
        DEMO_KEY,
        "POST",
        "/api/event-bulk-create-jobs",
        Some(&bulk(&people)),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let errors = answer["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{answer}");
    assert_eq!(
        errors[0]["source"]["pointer"],
        "/data/attributes/events-bulk-create/data/53/attributes/events/data/7/attributes/time"
    );
    assert!(sandbox.events().is_empty(), "nothing of a rejected request is stored");

    people[53].1.remove(7);
    let (status, answer) = call(
        &sandbox,
        DEMO_KEY,
        "POST",
        "/api/event-bulk-create-jobs",
        Some(&bulk(&people)),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(sandbox.events().len(), 999);
}

#[tokio::test]
async fn every_bad_item_and_a_bad_profile_are_named() {
    let sandbox = sandbox().await;
    let mut people = thousand_events();
    people[2].0 = "not an email".into();
    people[9].1[0]["attributes"].as_object_mut().unwrap().remove("metric");
    let (status, answer) = call(
        &sandbox,
        DEMO_KEY,
        "POST",
        "/api/event-bulk-create-jobs",
        Some(&bulk(&people)),
    )
    .await;
    assert_eq!(status, 400);
    let pointers: Vec<&str> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"]["pointer"].as_str().unwrap())
        .collect();
    assert!(
        pointers
            .iter()
            .any(|p| p.starts_with("/data/attributes/events-bulk-create/data/2/attributes/profile")),
        "{pointers:?}"
    );
    assert!(
        pointers
            .iter()
            .any(|p| p
                .starts_with("/data/attributes/events-bulk-create/data/9/attributes/events/data/0/attributes/metric")),
        "{pointers:?}"
    );
}

#[tokio::test]
async fn a_repeated_unique_id_within_one_request_is_rejected() {
    let sandbox = sandbox().await;
    let email = "twice@example.org".to_string();
    let people = vec![(email.clone(), vec![event(1), event(1)])];
    let (status, answer) = call(
        &sandbox,
        DEMO_KEY,
        "POST",
        "/api/event-bulk-create-jobs",
        Some(&bulk(&people)),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["errors"][0]["source"]["pointer"],
        "/data/attributes/events-bulk-create/data/0/attributes/events/data/1/attributes/unique_id"
    );
    // The same unique_id in two requests is accepted, and stored once.
    let once = vec![(email.clone(), vec![event(1)])];
    for _ in 0..2 {
        let (status, _) = call(
            &sandbox,
            DEMO_KEY,
            "POST",
            "/api/event-bulk-create-jobs",
            Some(&bulk(&once)),
        )
        .await;
        assert_eq!(status, 202);
    }
    assert_eq!(sandbox.events().len(), 1);
}

#[tokio::test]
async fn more_than_a_thousand_events_is_refused() {
    let sandbox = sandbox().await;
    let mut people = thousand_events();
    let extra = "extra@example.org".to_string();
    people.push((extra.clone(), vec![event(5000)]));
    let (status, answer) = call(
        &sandbox,
        DEMO_KEY,
        "POST",
        "/api/event-bulk-create-jobs",
        Some(&bulk(&people)),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("at most 1000 events"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_profile_import_is_a_job_that_reports_its_import_errors() {
    let sandbox = sandbox().await;
    let profiles: Vec<Value> = ["a@example.org", "not an email", "c@example.org"]
        .iter()
        .map(|email| json!({"type": "profile", "attributes": {"email": email}}))
        .collect();
    let body = json!({"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": profiles}}}});
    let (status, job) = call(&sandbox, DEMO_KEY, "POST", "/api/profile-bulk-import-jobs", Some(&body)).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["data"]["attributes"]["status"], "queued");
    let id = job["data"]["id"].as_str().unwrap().to_string();

    let mut polls = 0;
    let done = loop {
        let (status, job) = call(
            &sandbox,
            DEMO_KEY,
            "GET",
            &format!("/api/profile-bulk-import-jobs/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{job}");
        if job["data"]["attributes"]["status"] == "complete" {
            break job;
        }
        polls += 1;
        assert!(polls < 100, "the job never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let attributes = &done["data"]["attributes"];
    assert_eq!(
        (
            attributes["total_count"].as_u64(),
            attributes["completed_count"].as_u64(),
            attributes["failed_count"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    let (status, errors) = call(
        &sandbox,
        DEMO_KEY,
        "GET",
        &format!("/api/profile-bulk-import-jobs/{id}/import-errors"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let errors = errors["data"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]["attributes"]["source"]["pointer"]
            .as_str()
            .unwrap()
            .starts_with("/data/attributes/profiles/data/1"),
        "{errors:?}"
    );
    assert_eq!(sandbox.profiles().len(), 2);
}

#[tokio::test]
async fn a_profile_import_without_lists_write_is_refused_naming_the_scope() {
    let sandbox = sandbox().await;
    let body = json!({"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [
        {"type": "profile", "attributes": {"email": "a@example.org"}}
    ]}}}});
    let (status, answer) = call(
        &sandbox,
        EVENTS_ONLY_KEY,
        "POST",
        "/api/profile-bulk-import-jobs",
        Some(&body),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        answer["errors"][0]["detail"].as_str().unwrap().contains("lists:write"),
        "{answer}"
    );
}
