//! The table-driven cases of `tests/cases`, run natively against the
//! mapping code (the same files also run through the real component, in
//! `tests/all/cases.rs`).

#[path = "../../tests/support/cases.rs"]
mod cases;

use cases::{Judged, Mapped, MappedRequest};
use klaviyo_destination::contract::{Header, Outcome, Request, Response, Verdict};

#[test]
fn every_mapping_case_holds_natively() {
    let mut failures = Vec::new();
    for case in cases::mapping_cases() {
        let mapping = klaviyo_destination::map(&case.settings, &case.event, case.now_unix_ms);
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
fn every_interpret_case_holds_natively() {
    let mut failures = Vec::new();
    for case in cases::interpret_cases() {
        let request = Request {
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
        let response = Response {
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
        let judged = match klaviyo_destination::interpret("{}", &request, &response) {
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
