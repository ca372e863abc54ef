//! The table-driven cases of `tests/cases`, run through the real component
//! in the host's sandbox (the same files also run natively).

#[path = "../support/cases.rs"]
mod table;

use table::{Judged, Mapped, MappedRequest};

use cdp_host::plugin::{Header, HttpRequest, HttpResponse, Outcome, Verdict};

use crate::support::klaviyo;

#[test]
fn every_mapping_case_holds_through_the_component() {
    let plugin = klaviyo();
    let mut instance = plugin.instance().unwrap();
    let mut failures = Vec::new();
    for case in table::mapping_cases() {
        let mapping = instance
            .map_event(&case.settings, &case.event, case.now_unix_ms)
            .unwrap();
        plugin.check_mapping(&mapping).unwrap();
        let (outcome, reason, requests) = match mapping.outcome {
            Outcome::Send(requests) => ("send", None, requests),
            Outcome::Skip(reason) => ("skip", Some(reason), Vec::new()),
            Outcome::Error(reason) => ("error", Some(reason), Vec::new()),
        };
        let mapped = Mapped {
            outcome: outcome.to_string(),
            reason,
            requests: requests
                .into_iter()
                .map(|r| MappedRequest {
                    method: r.method,
                    url: r.url,
                    headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
                    body: r.body,
                })
                .collect(),
            warnings: mapping.warnings,
            ordering_key: mapping.ordering_key,
        };
        for problem in case.check(&mapped) {
            failures.push(format!("{}: {problem}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_interpret_case_holds_through_the_component() {
    let plugin = klaviyo();
    let mut instance = plugin.instance().unwrap();
    let mut failures = Vec::new();
    for case in table::interpret_cases() {
        let request = HttpRequest {
            method: "POST".into(),
            url: case.url.clone(),
            headers: vec![Header {
                name: "revision".into(),
                value: "2026-07-15".into(),
            }],
            body: case.request_body.clone(),
            idempotency_key: Some("key".into()),
            rate_class: "events".into(),
        };
        let response = HttpResponse {
            status: case.status,
            headers: case
                .headers
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_ascii_lowercase(),
                    value: v.clone(),
                })
                .collect(),
            body: case.response_body.clone(),
        };
        let judged = match instance.interpret("{}", &request, &response).unwrap() {
            Verdict::Delivered => judged("delivered", None, None, vec![]),
            Verdict::Retry(after) => judged("retry", after, None, vec![]),
            Verdict::Rejected(reason) => judged("rejected", None, Some(reason), vec![]),
            Verdict::Replace(requests) => judged("replace", None, None, requests.into_iter().map(|r| r.body).collect()),
        };
        for problem in case.check(&judged) {
            failures.push(format!("{}: {problem}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn judged(verdict: &str, retry_after_ms: Option<u64>, reason: Option<String>, replacements: Vec<String>) -> Judged {
    Judged {
        verdict: verdict.to_string(),
        retry_after_ms,
        reason,
        replacements,
    }
}
