//! The table-driven cases of `tests/cases`, one named trial per case file
//! and way of running it: natively against the mapping code, and through
//! the real component in the host's plugin runtime. `cargo test --test
//! cases <case name>` runs one case both ways.

#[path = "support/cases.rs"]
mod table;

use std::sync::{Arc, OnceLock};

use libtest_mimic::{Arguments, Failed, Trial};
use plugin_runtime::{Plugin, Runtime, RuntimeConfig, Use};

use table::{InterpretCase, Judged, Mapped, MappedRequest, MappingCase};

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    for case in table::mapping_cases().into_iter().map(Arc::new) {
        let name = format!("mapping::{}", case.name);
        let native = case.clone();
        trials.push(Trial::test(format!("{name}::native"), move || {
            verdict(native.check(&map_natively(&native)))
        }));
        trials.push(Trial::test(format!("{name}::component"), move || {
            verdict(case.check(&map_in_component(&case)?))
        }));
    }
    for case in table::interpret_cases().into_iter().map(Arc::new) {
        let name = format!("interpret::{}", case.name);
        let native = case.clone();
        trials.push(Trial::test(format!("{name}::native"), move || {
            verdict(native.check(&interpret_natively(&native)))
        }));
        trials.push(Trial::test(format!("{name}::component"), move || {
            verdict(case.check(&interpret_in_component(&case)?))
        }));
    }
    libtest_mimic::run(&args, trials).exit();
}

fn verdict(problems: Vec<String>) -> Result<(), Failed> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// The bundled Klaviyo component, loaded once for every trial.
fn klaviyo() -> &'static Arc<Plugin> {
    static PLUGIN: OnceLock<Arc<Plugin>> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let runtime = Runtime::new(RuntimeConfig {
            concurrency: 4,
            cache_dir: Some(std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")),
            ..RuntimeConfig::default()
        })
        .expect("the plugin runtime");
        Arc::new(
            runtime
                .load(cdp_host::bundled::KLAVIYO, "bundled klaviyo")
                .expect("the bundled plugin"),
        )
    })
}

// The plugin's contract types and the host's are the same WIT records,
// generated twice (by wit-bindgen for the plugin, by wasmtime for the
// host), so these macros build and read them for either side.

/// A mapping's outcome, in the runner's plain terms.
macro_rules! mapped {
    ($mapping:expr, $Outcome:path) => {{
        use $Outcome as Outcome;
        let mapping = $mapping;
        let (outcome, reason, requests) = match mapping.outcome {
            Outcome::Send(requests) => ("send", None, requests),
            Outcome::Skip(reason) => ("skip", Some(reason), Vec::new()),
            Outcome::Error(reason) => ("error", Some(reason), Vec::new()),
        };
        Mapped {
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
        }
    }};
}

/// The case's request and response.
macro_rules! exchange {
    ($case:expr, $Header:ident, $Request:ident, $Response:ident) => {{
        let case: &InterpretCase = $case;
        let request = $Request {
            method: "POST".into(),
            url: case.url.clone(),
            headers: vec![$Header {
                name: "revision".into(),
                value: "2026-07-15".into(),
            }],
            body: case.request_body.clone(),
            idempotency_key: Some("key".into()),
            rate_class: "events".into(),
        };
        let response = $Response {
            status: case.status,
            headers: case
                .headers
                .iter()
                .map(|(n, v)| $Header {
                    name: n.to_ascii_lowercase(),
                    value: v.clone(),
                })
                .collect(),
            body: case.response_body.clone(),
        };
        (request, response)
    }};
}

/// A verdict, in the runner's plain terms.
macro_rules! judged {
    ($verdict:expr, $Verdict:path) => {{
        use $Verdict as Verdict;
        let judged = |verdict: &str, retry_after_ms, reason, replacements| Judged {
            verdict: verdict.to_string(),
            retry_after_ms,
            reason,
            replacements,
        };
        match $verdict {
            Verdict::Delivered => judged("delivered", None, None, vec![]),
            Verdict::Retry(after) => judged("retry", after, None, vec![]),
            Verdict::Rejected(reason) => judged("rejected", None, Some(reason), vec![]),
            Verdict::Replace(requests) => judged("replace", None, None, requests.into_iter().map(|r| r.body).collect()),
        }
    }};
}

fn map_natively(case: &MappingCase) -> Mapped {
    let mapping = klaviyo_destination::map(&case.settings, &case.event, case.now_unix_ms);
    mapped!(mapping, klaviyo_destination::contract::Outcome)
}

fn map_in_component(case: &MappingCase) -> Result<Mapped, Failed> {
    let plugin = klaviyo();
    let mut instance = plugin
        .pool()
        .checkout(plugin, Use::Mapping)
        .map_err(|e| e.to_string())?;
    let mapping = instance
        .map_event(&case.settings, &case.event, case.now_unix_ms)
        .map_err(|e| e.to_string())?;
    plugin.check_mapping(&mapping).map_err(|e| e.to_string())?;
    Ok(mapped!(mapping, plugin_runtime::Outcome))
}

fn interpret_natively(case: &InterpretCase) -> Judged {
    use klaviyo_destination::contract::{Header, Request, Response};
    let (request, response) = exchange!(case, Header, Request, Response);
    judged!(
        klaviyo_destination::interpret("{}", &request, &response),
        klaviyo_destination::contract::Verdict
    )
}

fn interpret_in_component(case: &InterpretCase) -> Result<Judged, Failed> {
    use plugin_runtime::{Header, HttpRequest, HttpResponse};
    let (request, response) = exchange!(case, Header, HttpRequest, HttpResponse);
    let plugin = klaviyo();
    let mut instance = plugin
        .pool()
        .checkout(plugin, Use::Interpreting)
        .map_err(|e| e.to_string())?;
    let verdict = instance
        .interpret("{}", &request, &response)
        .map_err(|e| e.to_string())?;
    drop(instance);
    Ok(judged!(verdict, plugin_runtime::Verdict))
}
