//! The plugin-output checker on any mapping a plugin could return: it never
//! panics, and whatever it passes is safe to act on. Every request goes to
//! a declared host over https (or is refused before any connection), in a
//! declared rate class, its headers name only declared secrets, and every
//! text and count is within its limit.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use plugin_runtime::output::check;
use plugin_runtime::template::references;
use plugin_runtime::{
    DestinationManifest, EgressPolicy, Header, HttpRequest, Limits, Mapping, Outcome, RateClass, SettingKind,
    SettingSpec,
};

const HOSTS: [&str; 2] = ["a.klaviyo.com", "api.example.org"];
const PIECES: [&str; 12] = [
    "https://",
    "http://",
    "a.klaviyo.com",
    "evil.example",
    "@",
    ":443",
    "/api/events",
    "{{secret:",
    "}}",
    "api_key",
    "host_token",
    "%2e",
];

/// Text built from pieces that matter to the checks, and arbitrary text.
fn text(u: &mut Unstructured) -> arbitrary::Result<String> {
    let mut out = String::new();
    for _ in 0..u.int_in_range(0..=6)? {
        if u.arbitrary()? {
            out.push_str(u.choose(&PIECES)?);
        } else {
            out.push_str(&String::arbitrary(u)?);
        }
    }
    Ok(out)
}

fn request(u: &mut Unstructured) -> arbitrary::Result<HttpRequest> {
    Ok(HttpRequest {
        method: u.choose(&["GET", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "post"])?.to_string(),
        url: text(u)?,
        headers: (0..u.int_in_range(0..=3)?)
            .map(|_| Ok(Header { name: text(u)?, value: text(u)? }))
            .collect::<arbitrary::Result<_>>()?,
        body: text(u)?,
        idempotency_key: if u.arbitrary()? { Some(text(u)?) } else { None },
        rate_class: u.choose(&["events", "profiles", "other"])?.to_string(),
    })
}

fn mapping(u: &mut Unstructured) -> arbitrary::Result<Mapping> {
    let outcome = match u.int_in_range(0..=2)? {
        0 => Outcome::Send((0..u.int_in_range(0..=4)?).map(|_| request(u)).collect::<arbitrary::Result<_>>()?),
        1 => Outcome::Skip(text(u)?),
        _ => Outcome::Error(text(u)?),
    };
    Ok(Mapping {
        outcome,
        warnings: (0..u.int_in_range(0..=3)?).map(|_| text(u)).collect::<arbitrary::Result<_>>()?,
        ordering_key: if u.arbitrary()? { Some(text(u)?) } else { None },
    })
}

fn manifest() -> DestinationManifest {
    DestinationManifest {
        name: "fuzzed".into(),
        version: "1.0.0".into(),
        api_revision: "2026-07-15".into(),
        allowed_hosts: HOSTS.iter().map(|h| h.to_string()).collect(),
        rate_classes: ["events", "profiles"]
            .iter()
            .map(|name| RateClass {
                name: name.to_string(),
                burst_per_second: 10,
                steady_per_minute: 600,
            })
            .collect(),
        settings: vec![
            SettingSpec {
                name: "api_key".into(),
                kind: SettingKind::String,
                description: "the key".into(),
                required_to_send: true,
                secret: true,
                default_value: None,
            },
            SettingSpec {
                name: "host_token".into(),
                kind: SettingKind::String,
                description: "not a secret".into(),
                required_to_send: false,
                secret: false,
                default_value: None,
            },
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mapping) = mapping(&mut u) else { return };
    let limits = Limits {
        max_text_bytes: 64,
        max_items: 3,
        max_requests: 3,
        max_output_bytes: 1024,
        ..Limits::default()
    };
    let manifest = manifest();
    let egress = EgressPolicy::new(&manifest.allowed_hosts);
    if check(&mapping, &manifest, &egress, &limits).is_err() {
        return;
    }
    assert!(mapping.warnings.len() <= limits.max_items);
    for text in mapping.warnings.iter().chain(&mapping.ordering_key) {
        assert!(text.len() <= limits.max_text_bytes);
    }
    match &mapping.outcome {
        Outcome::Skip(reason) | Outcome::Error(reason) => assert!(reason.len() <= limits.max_text_bytes),
        Outcome::Send(requests) => {
            assert!(requests.len() <= limits.max_requests);
            for request in requests {
                let url = url::Url::parse(&request.url).expect("a passed URL parses");
                assert_eq!(url.scheme(), "https", "{}", request.url);
                assert!(url.username().is_empty() && url.password().is_none(), "{}", request.url);
                let host = url.host_str().unwrap_or_default();
                assert!(HOSTS.contains(&host), "a passed request to {host}");
                assert!(["events", "profiles"].contains(&request.rate_class.as_str()));
                for header in &request.headers {
                    for name in references(&header.value) {
                        assert_eq!(name, "api_key", "a header naming {name:?}");
                    }
                }
            }
        }
    }
});
