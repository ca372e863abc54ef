//! What a plugin returns is untrusted input too: checked here before the
//! host acts on it. A request to a host the manifest does not declare is
//! refused, never sent.

use crate::egress::{EgressError, EgressPolicy};
use crate::{
    BatchClass, BatchItem, DestinationManifest, HttpRequest, Limits, Mapping, Outcome, SettingError, Verdict, template,
};

/// Why a plugin's output was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("{count} requests for one event, over the limit of {limit}")]
    TooManyRequests { count: usize, limit: usize },
    #[error("{bytes} bytes of requests for one event, over the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("{0}")]
    Egress(#[from] EgressError),
    #[error("a request in rate class {0:?}, which the manifest does not declare")]
    UnknownRateClass(String),
    #[error("a header using secret {0:?}, which the manifest does not declare as a secret setting")]
    UndeclaredSecret(String),
    #[error("a request with method {0:?}")]
    BadMethod(String),
    #[error("{what} of {bytes} bytes, over the limit of {limit}")]
    TextTooLong {
        what: &'static str,
        bytes: usize,
        limit: usize,
    },
    #[error("{verdicts} item verdicts for a batch of {items} items")]
    VerdictCount { verdicts: usize, items: usize },
    #[error("batch class {class:?} of up to {bytes} bytes, over the per-request limit of {limit}")]
    BatchTooLarge { class: String, bytes: u64, limit: usize },
    #[error("{count} {what}, over the limit of {limit}")]
    TooManyItems {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("skip code {code:?}: {why}")]
    BadSkipCode { code: String, why: &'static str },
}

/// Skip codes a plugin may declare, at most; each code's and prefix's
/// length at most. They become metric labels, so the set is small and
/// each label plain.
pub const SKIP_CODES: usize = 32;
const SKIP_CODE_CHARS: usize = 32;
const SKIP_PREFIX_BYTES: usize = 200;

/// A plugin's skip codes: few, each a plain label (`a`-`z`, `0`-`9`, `_`)
/// that is not `other` (the host's own), none twice, each with a prefix of
/// 1 to 200 bytes.
pub(crate) fn check_skip_codes(codes: &[crate::SkipCode]) -> Result<(), OutputError> {
    if codes.len() > SKIP_CODES {
        return Err(OutputError::TooManyItems {
            what: "skip codes",
            count: codes.len(),
            limit: SKIP_CODES,
        });
    }
    for (i, code) in codes.iter().enumerate() {
        let bad = |why| {
            Err(OutputError::BadSkipCode {
                code: code.code.chars().take(SKIP_CODE_CHARS).collect(),
                why,
            })
        };
        if code.code.is_empty()
            || code.code.len() > SKIP_CODE_CHARS
            || !code
                .code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return bad("a code is 1 to 32 characters of a-z, 0-9 and _");
        }
        if code.code == "other" {
            return bad("`other` is the host's label for reasons no code names");
        }
        if codes[..i].iter().any(|c| c.code == code.code) {
            return bad("declared twice");
        }
        if code.reason_prefix.is_empty() || code.reason_prefix.len() > SKIP_PREFIX_BYTES {
            return bad("its reason prefix must be 1 to 200 bytes");
        }
    }
    Ok(())
}

/// Every text of a mapping within its bound: a plugin's words reach logs,
/// dead letters, the spool and summaries, so none may be unbounded.
pub(crate) fn check_mapping_texts(mapping: &Mapping, limits: &Limits) -> Result<(), OutputError> {
    match &mapping.outcome {
        Outcome::Skip(reason) => text("a skip reason", reason, limits)?,
        Outcome::Error(reason) => text("an error reason", reason, limits)?,
        Outcome::Send(_) => {}
    }
    items("warnings", mapping.warnings.len(), limits)?;
    for warning in &mapping.warnings {
        text("a warning", warning, limits)?;
    }
    if let Some(key) = &mapping.ordering_key {
        text("an ordering key", key, limits)?;
    }
    Ok(())
}

/// Batch classes: bounded names, and no class whose requests could exceed
/// the per-request output limit.
pub(crate) fn check_batch_classes(classes: &[BatchClass], limits: &Limits) -> Result<(), OutputError> {
    items("batch classes", classes.len(), limits)?;
    for class in classes {
        text("a batch class name", &class.name, limits)?;
        text("a batch class's rate class", &class.rate_class, limits)?;
        if class.max_bytes as usize > limits.max_output_bytes {
            return Err(OutputError::BatchTooLarge {
                class: class.name.clone(),
                bytes: class.max_bytes.into(),
                limit: limits.max_output_bytes,
            });
        }
    }
    Ok(())
}

/// A batch item: its class name and dedupe key are bounded texts, and the
/// item itself is within the per-event output limit.
pub(crate) fn check_batch_item(item: &BatchItem, limits: &Limits) -> Result<(), OutputError> {
    text("a batch item's class", &item.class, limits)?;
    if let Some(key) = &item.dedupe_key {
        text("a batch item's dedupe key", key, limits)?;
    }
    if item.item.len() > limits.max_output_bytes {
        return Err(OutputError::TooLarge {
            bytes: item.item.len(),
            limit: limits.max_output_bytes,
        });
    }
    Ok(())
}

pub(crate) fn check_verdict_texts(verdict: &Verdict, limits: &Limits) -> Result<(), OutputError> {
    match verdict {
        Verdict::Rejected(reason) => text("a verdict's reason", reason, limits),
        Verdict::Replace(requests) => items("replacement requests", requests.len(), limits),
        Verdict::Delivered | Verdict::Retry(_) => Ok(()),
    }
}

pub(crate) fn check_setting_errors(errors: &[SettingError], limits: &Limits) -> Result<(), OutputError> {
    items("setting errors", errors.len(), limits)?;
    for error in errors {
        text("a setting error's name", &error.name, limits)?;
        text("a setting error", &error.reason, limits)?;
    }
    Ok(())
}

pub(crate) fn check_manifest(manifest: &DestinationManifest, limits: &Limits) -> Result<(), OutputError> {
    for (what, value) in [
        ("the manifest's name", &manifest.name),
        ("the manifest's version", &manifest.version),
        ("the manifest's API revision", &manifest.api_revision),
    ] {
        text(what, value, limits)?;
    }
    items("allowed hosts", manifest.allowed_hosts.len(), limits)?;
    items("rate classes", manifest.rate_classes.len(), limits)?;
    items("settings", manifest.settings.len(), limits)?;
    for host in &manifest.allowed_hosts {
        text("an allowed host", host, limits)?;
    }
    for class in &manifest.rate_classes {
        text("a rate class's name", &class.name, limits)?;
    }
    for setting in &manifest.settings {
        text("a setting's name", &setting.name, limits)?;
        text("a setting's description", &setting.description, limits)?;
        if let Some(default) = &setting.default_value {
            text("a setting's default", default, limits)?;
        }
    }
    Ok(())
}

pub(crate) fn text(what: &'static str, value: &str, limits: &Limits) -> Result<(), OutputError> {
    if value.len() > limits.max_text_bytes {
        return Err(OutputError::TextTooLong {
            what,
            bytes: value.len(),
            limit: limits.max_text_bytes,
        });
    }
    Ok(())
}

fn items(what: &'static str, count: usize, limits: &Limits) -> Result<(), OutputError> {
    if count > limits.max_items {
        return Err(OutputError::TooManyItems {
            what,
            count,
            limit: limits.max_items,
        });
    }
    Ok(())
}

/// Everything a mapping is checked for before the host acts on it: its
/// texts within their bounds, and each request to a declared host, in a
/// declared rate class, naming only declared secrets, within the per-event
/// caps. (Public so that the fuzz target can call it on any mapping.)
pub fn check(
    mapping: &Mapping,
    manifest: &DestinationManifest,
    egress: &EgressPolicy,
    limits: &Limits,
) -> Result<(), OutputError> {
    check_mapping_texts(mapping, limits)?;
    check_mapping(mapping, manifest, egress, limits)
}

pub(crate) fn check_mapping(
    mapping: &Mapping,
    manifest: &DestinationManifest,
    egress: &EgressPolicy,
    limits: &Limits,
) -> Result<(), OutputError> {
    match &mapping.outcome {
        Outcome::Send(requests) => check_requests(requests, manifest, egress, limits),
        Outcome::Skip(_) | Outcome::Error(_) => Ok(()),
    }
}

pub(crate) fn check_requests(
    requests: &[HttpRequest],
    manifest: &DestinationManifest,
    egress: &EgressPolicy,
    limits: &Limits,
) -> Result<(), OutputError> {
    if requests.len() > limits.max_requests {
        return Err(OutputError::TooManyRequests {
            count: requests.len(),
            limit: limits.max_requests,
        });
    }
    let bytes: usize = requests
        .iter()
        .map(|r| r.body.len() + r.url.len() + r.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>())
        .sum();
    if bytes > limits.max_output_bytes {
        return Err(OutputError::TooLarge {
            bytes,
            limit: limits.max_output_bytes,
        });
    }
    for request in requests {
        check_request(request, manifest, egress)?;
    }
    Ok(())
}

fn check_request(
    request: &HttpRequest,
    manifest: &DestinationManifest,
    egress: &EgressPolicy,
) -> Result<(), OutputError> {
    if !matches!(request.method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
        return Err(OutputError::BadMethod(request.method.clone()));
    }
    egress.check(&request.url)?;
    if !manifest.rate_classes.iter().any(|r| r.name == request.rate_class) {
        return Err(OutputError::UnknownRateClass(request.rate_class.clone()));
    }
    for header in &request.headers {
        for name in template::references(&header.value) {
            let declared = manifest.settings.iter().any(|s| s.secret && s.name == name);
            if !declared {
                return Err(OutputError::UndeclaredSecret(name.to_string()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod skip_code_tests {
    use super::*;
    use crate::SkipCode;

    fn code(code: &str, prefix: &str) -> SkipCode {
        SkipCode {
            code: code.to_string(),
            reason_prefix: prefix.to_string(),
        }
    }

    #[test]
    fn skip_codes_are_few_plain_labels_each_once() {
        assert!(check_skip_codes(&[code("page_view", "page views"), code("no_email_2", "no email")]).is_ok());
        let refused = |codes: &[SkipCode]| check_skip_codes(codes).unwrap_err().to_string();
        assert!(refused(&[code("Page View", "p")]).contains("a-z, 0-9 and _"));
        assert!(refused(&[code("", "p")]).contains("a-z, 0-9 and _"));
        assert!(refused(&[code(&"a".repeat(33), "p")]).contains("a-z, 0-9 and _"));
        assert!(refused(&[code("other", "p")]).contains("host's label"));
        assert!(refused(&[code("a", "p"), code("a", "q")]).contains("declared twice"));
        assert!(refused(&[code("a", "")]).contains("prefix"));
        assert!(refused(&[code("a", &"x".repeat(201))]).contains("prefix"));
        let many: Vec<SkipCode> = (0..33).map(|i| code(&format!("c{i}"), "p")).collect();
        assert!(refused(&many).contains("33 skip codes"));
    }
}
