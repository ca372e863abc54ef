//! What a plugin returns is untrusted input too: checked here before the
//! host sends anything. A request to a host the manifest does not declare
//! is refused, never sent.

use super::{DestinationManifest, HttpRequest, Limits, Mapping, Outcome};

/// Why a plugin's output was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("{count} requests for one event, over the limit of {limit}")]
    TooManyRequests { count: usize, limit: usize },
    #[error("{bytes} bytes of requests for one event, over the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("a request to {url:?}, which is not an https URL")]
    NotHttps { url: String },
    #[error("a request to {host}, which the plugin's manifest does not declare (it declares {declared})")]
    ForeignHost { host: String, declared: String },
    #[error("a request in rate class {0:?}, which the manifest does not declare")]
    UnknownRateClass(String),
    #[error("a header using secret {0:?}, which the manifest does not declare as a secret setting")]
    UndeclaredSecret(String),
    #[error("a request with method {0:?}")]
    BadMethod(String),
}

pub fn check_mapping(mapping: &Mapping, manifest: &DestinationManifest, limits: &Limits) -> Result<(), OutputError> {
    match &mapping.outcome {
        Outcome::Send(requests) => check_requests(requests, manifest, limits),
        Outcome::Skip(_) | Outcome::Error(_) => Ok(()),
    }
}

pub fn check_requests(
    requests: &[HttpRequest],
    manifest: &DestinationManifest,
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
        check_request(request, manifest)?;
    }
    Ok(())
}

fn check_request(request: &HttpRequest, manifest: &DestinationManifest) -> Result<(), OutputError> {
    if !matches!(request.method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
        return Err(OutputError::BadMethod(request.method.clone()));
    }
    let url = url::Url::parse(&request.url).map_err(|_| OutputError::NotHttps {
        url: request.url.clone(),
    })?;
    if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
        return Err(OutputError::NotHttps {
            url: request.url.clone(),
        });
    }
    let host = url.host_str().unwrap_or("");
    if !manifest
        .allowed_hosts
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(host))
    {
        return Err(OutputError::ForeignHost {
            host: host.to_string(),
            declared: manifest.allowed_hosts.join(", "),
        });
    }
    if !manifest.rate_classes.iter().any(|r| r.name == request.rate_class) {
        return Err(OutputError::UnknownRateClass(request.rate_class.clone()));
    }
    for header in &request.headers {
        for name in crate::settings::secret_references(&header.value) {
            let declared = manifest.settings.iter().any(|s| s.secret && s.name == name);
            if !declared {
                return Err(OutputError::UndeclaredSecret(name.to_string()));
            }
        }
    }
    Ok(())
}
