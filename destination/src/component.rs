//! The WebAssembly boundary: exports the `chord:destination/plugin`
//! interface by converting between the generated bindings and the plain
//! types the mapping is written in. No logic lives here.

// Built with `contract-1-0`, the same plugin speaks the frozen 1.0 contract
// (no batching): the fixture that proves 1.0 plugins keep working.
#[cfg(not(feature = "contract-1-0"))]
wit_bindgen::generate!({
    world: "complete-destination",
    path: "../wit",
});
#[cfg(feature = "contract-1-0")]
wit_bindgen::generate!({
    world: "destination",
    path: "../tests/fixtures/wit-1.0",
});

use chord::destination::types as wit;
use exports::chord::destination::plugin::Guest;

use crate::arena::Arena;
use crate::contract;

/// See BENCHMARKS.md: the mapping allocates a lot. A per-call arena takes
/// what a call builds and drops (`arena.rs`); Talc, behind it, what is kept
/// between calls and large buffers (dlmalloc, wasm32's default, made the
/// component about twice as slow as native code).
#[global_allocator]
static ALLOCATOR: Arena<talc::wasm::WasmDynamicTalc> = Arena::new(talc::wasm::new_wasm_dynamic_allocator());

struct KlaviyoPlugin;

impl Guest for KlaviyoPlugin {
    fn manifest() -> wit::DestinationManifest {
        let m = crate::manifest();
        wit::DestinationManifest {
            name: m.name.into(),
            version: m.version.into(),
            api_revision: m.api_revision.into(),
            allowed_hosts: m.allowed_hosts.into_iter().map(String::from).collect(),
            rate_classes: m
                .rate_classes
                .into_iter()
                .map(|r| wit::RateClass {
                    name: r.name.into(),
                    burst_per_second: r.burst_per_second,
                    steady_per_minute: r.steady_per_minute,
                })
                .collect(),
            settings: m
                .settings
                .into_iter()
                .map(|s| wit::SettingSpec {
                    name: s.name.into(),
                    kind: match s.kind {
                        contract::SettingKind::String => wit::SettingKind::String,
                        contract::SettingKind::Boolean => wit::SettingKind::Boolean,
                        contract::SettingKind::StringList => wit::SettingKind::StringList,
                    },
                    description: s.description.into(),
                    required_to_send: s.required_to_send,
                    secret: s.secret,
                    default_value: s.default_value.map(String::from),
                })
                .collect(),
        }
    }

    fn validate_settings(settings: String) -> Result<(), Vec<wit::SettingError>> {
        crate::validate_settings(&settings).map_err(|errors| {
            errors
                .into_iter()
                .map(|e| wit::SettingError {
                    name: e.name,
                    reason: e.reason,
                })
                .collect()
        })
    }

    fn map_event(settings: String, event: String, now_unix_ms: i64) -> wit::Mapping {
        ALLOCATOR.call(|| map_event(&settings, &event, now_unix_ms))
    }

    fn interpret(settings: String, request: wit::HttpRequest, response: wit::HttpResponse) -> wit::Verdict {
        ALLOCATOR.call(|| interpret(&settings, request, response))
    }
}

fn map_event(settings: &str, event: &str, now_unix_ms: i64) -> wit::Mapping {
    let mapping = crate::map(settings, event, now_unix_ms);
    wit::Mapping {
        outcome: match mapping.outcome {
            contract::Outcome::Send(requests) => wit::Outcome::Send(requests.into_iter().map(to_wit).collect()),
            contract::Outcome::Skip(reason) => wit::Outcome::Skip(reason),
            contract::Outcome::Error(reason) => wit::Outcome::Error(reason),
        },
        warnings: mapping.warnings,
        ordering_key: mapping.ordering_key,
    }
}

fn interpret(settings: &str, request: wit::HttpRequest, response: wit::HttpResponse) -> wit::Verdict {
    match crate::interpret(settings, &from_wit(request), &from_wit_response(response)) {
        contract::Verdict::Delivered => wit::Verdict::Delivered,
        contract::Verdict::Retry(after) => wit::Verdict::Retry(after),
        contract::Verdict::Rejected(reason) => wit::Verdict::Rejected(reason),
        contract::Verdict::Replace(requests) => wit::Verdict::Replace(requests.into_iter().map(to_wit).collect()),
    }
}

fn from_wit_response(response: wit::HttpResponse) -> contract::Response {
    contract::Response {
        status: response.status,
        headers: response.headers.into_iter().map(from_wit_header).collect(),
        body: response.body,
    }
}

/// Batching (contract 1.1): Klaviyo's bulk endpoints, see `bulk.rs`.
#[cfg(not(feature = "contract-1-0"))]
mod skip_codes {
    use crate::component::exports::chord::destination::skip_codes::{Guest, SkipCode};

    impl Guest for super::KlaviyoPlugin {
        fn codes() -> Vec<SkipCode> {
            crate::SKIP_RULES
                .iter()
                .map(|(code, prefix)| SkipCode {
                    code: code.to_string(),
                    reason_prefix: prefix.to_string(),
                })
                .collect()
        }
    }
}

#[cfg(not(feature = "contract-1-0"))]
mod batching {
    use super::{ALLOCATOR, from_wit, from_wit_response, to_wit};
    use crate::component::chord::destination::batch_types as bt;
    use crate::component::chord::destination::types as wit;
    use crate::component::exports::chord::destination::batching::Guest;
    use crate::contract;

    impl Guest for super::KlaviyoPlugin {
        fn batch_classes(settings: String) -> Vec<bt::BatchClass> {
            crate::batch_classes(&settings)
                .into_iter()
                .map(|c| bt::BatchClass {
                    name: c.name.into(),
                    max_items: c.max_items,
                    max_bytes: c.max_bytes,
                    item_overhead_bytes: c.item_overhead_bytes,
                    max_wait_ms: c.max_wait_ms,
                    rate_class: c.rate_class.into(),
                })
                .collect()
        }

        fn batchable(settings: String, request: wit::HttpRequest) -> Option<bt::BatchItem> {
            ALLOCATOR.call(|| {
                crate::batchable(&settings, &from_wit(request)).map(|item| bt::BatchItem {
                    class: item.class,
                    item: item.item,
                    dedupe_key: item.dedupe_key,
                })
            })
        }

        fn assemble(settings: String, class: String, items: Vec<String>) -> Result<wit::HttpRequest, String> {
            ALLOCATOR.call(|| crate::assemble(&settings, &class, &items).map(to_wit))
        }

        fn judge(
            settings: String,
            class: String,
            items: Vec<String>,
            request: wit::HttpRequest,
            response: wit::HttpResponse,
        ) -> bt::BatchVerdict {
            ALLOCATOR.call(|| judge(&settings, &class, &items, request, response))
        }
    }

    fn judge(
        settings: &str,
        class: &str,
        items: &[String],
        request: wit::HttpRequest,
        response: wit::HttpResponse,
    ) -> bt::BatchVerdict {
        let verdict = crate::judge(settings, class, items, &from_wit(request), &from_wit_response(response));
        match verdict {
            contract::BatchVerdict::Items(items) => bt::BatchVerdict::Items(items.into_iter().map(item).collect()),
            contract::BatchVerdict::Retry(after) => bt::BatchVerdict::Retry(after),
            contract::BatchVerdict::FollowUp(follow) => bt::BatchVerdict::FollowUp(bt::FollowUp {
                request: to_wit(follow.request),
                after_ms: follow.after_ms,
                decided: follow
                    .decided
                    .into_iter()
                    .map(|(index, verdict)| bt::ItemDecision {
                        index,
                        verdict: item(verdict),
                    })
                    .collect(),
            }),
        }
    }

    fn item(verdict: contract::ItemVerdict) -> bt::ItemVerdict {
        match verdict {
            contract::ItemVerdict::Delivered => bt::ItemVerdict::Delivered,
            contract::ItemVerdict::Retry(after) => bt::ItemVerdict::Retry(after),
            contract::ItemVerdict::Rejected(reason) => bt::ItemVerdict::Rejected(reason),
            contract::ItemVerdict::Alone => bt::ItemVerdict::Alone,
        }
    }
}

fn to_wit(r: contract::Request) -> wit::HttpRequest {
    wit::HttpRequest {
        method: r.method,
        url: r.url,
        headers: r
            .headers
            .into_iter()
            .map(|h| wit::Header {
                name: h.name,
                value: h.value,
            })
            .collect(),
        body: r.body,
        idempotency_key: r.idempotency_key,
        rate_class: r.rate_class,
    }
}

fn from_wit(r: wit::HttpRequest) -> contract::Request {
    contract::Request {
        method: r.method,
        url: r.url,
        headers: r.headers.into_iter().map(from_wit_header).collect(),
        body: r.body,
        idempotency_key: r.idempotency_key,
        rate_class: r.rate_class,
    }
}

fn from_wit_header(h: wit::Header) -> contract::Header {
    contract::Header {
        name: h.name,
        value: h.value,
    }
}

export!(KlaviyoPlugin);
