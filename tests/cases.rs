//! The table-driven cases of `tests/cases`, one named trial per case file
//! and way of running it: natively against the mapping code, and through
//! the real component in the host's plugin runtime. `cargo test --test
//! cases <case name>` runs one case both ways.

#[path = "support/cases.rs"]
mod table;

use std::sync::{Arc, OnceLock};

use libtest_mimic::{Arguments, Failed, Trial};
use plugin_runtime::{Plugin, Runtime, RuntimeConfig};

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

fn map_natively(case: &MappingCase) -> Mapped {
    use klaviyo_destination::contract::Outcome;
    let mapping = klaviyo_destination::map(&case.settings, &case.event, case.now_unix_ms);
    let (outcome, reason, requests) = match mapping.outcome {
        Outcome::Send(requests) => ("send", None, requests),
        Outcome::Skip(reason) => ("skip", Some(reason), Vec::new()),
        Outcome::Error(reason) => ("error", Some(reason), Vec::new()),
    };
    let requests = requests
        .into_iter()
        .map(|r| MappedRequest {
            method: r.method,
            url: r.url,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: r.body,
        })
        .collect();
    mapped(outcome, reason, requests, mapping.warnings, mapping.ordering_key)
}

fn map_in_component(case: &MappingCase) -> Result<Mapped, Failed> {
    use plugin_runtime::Outcome;
    let plugin = klaviyo();
    let mut instance = plugin.pool().take(plugin).map_err(|e| e.to_string())?;
    let mapping = instance
        .map_event(&case.settings, &case.event, case.now_unix_ms)
        .map_err(|e| e.to_string())?;
    plugin.pool().give_back(plugin, instance);
    plugin.check_mapping(&mapping).map_err(|e| e.to_string())?;
    let (outcome, reason, requests) = match mapping.outcome {
        Outcome::Send(requests) => ("send", None, requests),
        Outcome::Skip(reason) => ("skip", Some(reason), Vec::new()),
        Outcome::Error(reason) => ("error", Some(reason), Vec::new()),
    };
    let requests = requests
        .into_iter()
        .map(|r| MappedRequest {
            method: r.method,
            url: r.url,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: r.body,
        })
        .collect();
    Ok(mapped(
        outcome,
        reason,
        requests,
        mapping.warnings,
        mapping.ordering_key,
    ))
}

fn mapped(
    outcome: &str,
    reason: Option<String>,
    requests: Vec<MappedRequest>,
    warnings: Vec<String>,
    ordering_key: Option<String>,
) -> Mapped {
    Mapped {
        outcome: outcome.to_string(),
        reason,
        requests,
        warnings,
        ordering_key,
    }
}

fn interpret_natively(case: &InterpretCase) -> Judged {
    use klaviyo_destination::contract::{Header, Request, Response, Verdict};
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
    match klaviyo_destination::interpret("{}", &request, &response) {
        Verdict::Delivered => judged("delivered", None, None, vec![]),
        Verdict::Retry(after) => judged("retry", after, None, vec![]),
        Verdict::Rejected(reason) => judged("rejected", None, Some(reason), vec![]),
        Verdict::Replace(requests) => judged("replace", None, None, requests.into_iter().map(|r| r.body).collect()),
    }
}

fn interpret_in_component(case: &InterpretCase) -> Result<Judged, Failed> {
    use plugin_runtime::{Header, HttpRequest, HttpResponse, Verdict};
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
    let plugin = klaviyo();
    let mut instance = plugin.pool().take(plugin).map_err(|e| e.to_string())?;
    let verdict = instance
        .interpret("{}", &request, &response)
        .map_err(|e| e.to_string())?;
    plugin.pool().give_back(plugin, instance);
    Ok(match verdict {
        Verdict::Delivered => judged("delivered", None, None, vec![]),
        Verdict::Retry(after) => judged("retry", after, None, vec![]),
        Verdict::Rejected(reason) => judged("rejected", None, Some(reason), vec![]),
        Verdict::Replace(requests) => judged("replace", None, None, requests.into_iter().map(|r| r.body).collect()),
    })
}

fn judged(verdict: &str, retry_after_ms: Option<u64>, reason: Option<String>, replacements: Vec<String>) -> Judged {
    Judged {
        verdict: verdict.to_string(),
        retry_after_ms,
        reason,
        replacements,
    }
}
