//! What a plugin returns is untrusted input too: checked here before the
//! host acts on it. A request to a host the manifest does not declare is
//! refused, never sent.

use crate::egress::{EgressError, EgressPolicy};
use crate::{DestinationManifest, HttpRequest, Limits, Mapping, Outcome, template};

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
