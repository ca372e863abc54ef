//! Where a plugin's requests may go, decided once. The policy is parsed
//! from the manifest's declared hosts when the plugin loads, and is the
//! only check of a request's URL: the output check refuses a mapping with a
//! URL it refuses, and delivery asks it for the address to connect to,
//! rebased onto the operator's one override (a base URL such as the local
//! Klaviyo stand-in) when there is one.

use url::Url;

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("a request to {url:?}, which is not an https URL without user info")]
    NotHttps { url: String },
    #[error("a request to {host}, which the plugin's manifest does not declare (it declares {declared})")]
    ForeignHost { host: String, declared: String },
}

/// The hosts a plugin may reach.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// Lower-case host names from the manifest.
    allowed_hosts: Vec<String>,
}

impl EgressPolicy {
    pub fn new(allowed_hosts: &[String]) -> EgressPolicy {
        EgressPolicy {
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// Checks a plugin's URL: https, no user info, a declared host.
    pub fn check(&self, url: &str) -> Result<Url, EgressError> {
        let not_https = || EgressError::NotHttps { url: url.to_string() };
        let parsed = Url::parse(url).map_err(|_| not_https())?;
        if parsed.scheme() != "https" || !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(not_https());
        }
        let host = parsed.host_str().unwrap_or("");
        if !self
            .allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
        {
            return Err(EgressError::ForeignHost {
                host: host.to_string(),
                declared: self.allowed_hosts.join(", "),
            });
        }
        Ok(parsed)
    }

    /// The address to send a checked URL to: itself, or, when the operator
    /// names a base URL (scheme, host and port), that with the URL's path
    /// and query.
    pub fn target(&self, url: &str, base_url: Option<&Url>) -> Result<Url, EgressError> {
        let checked = self.check(url)?;
        let Some(base) = base_url else {
            return Ok(checked);
        };
        let mut target = base.clone();
        target.set_path(checked.path());
        target.set_query(checked.query());
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EgressPolicy {
        EgressPolicy::new(&["a.klaviyo.com".to_string()])
    }

    #[test]
    fn only_https_to_a_declared_host_passes() {
        assert!(policy().check("https://A.klaviyo.com/api/events").is_ok());
        assert!(matches!(
            policy().check("https://evil.example/api"),
            Err(EgressError::ForeignHost { .. })
        ));
        assert!(matches!(
            policy().check("http://a.klaviyo.com/api"),
            Err(EgressError::NotHttps { .. })
        ));
        assert!(matches!(policy().check("not a url"), Err(EgressError::NotHttps { .. })));
    }

    #[test]
    fn user_info_is_refused_by_every_check() {
        for url in ["https://user@a.klaviyo.com/api", "https://u:p@a.klaviyo.com/api"] {
            assert!(
                matches!(policy().check(url), Err(EgressError::NotHttps { .. })),
                "{url}"
            );
            assert!(
                matches!(policy().target(url, None), Err(EgressError::NotHttps { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn the_override_keeps_path_and_query() {
        let base: Url = "http://127.0.0.1:4010".parse().unwrap();
        let target = policy()
            .target("https://a.klaviyo.com/api/events?x=1", Some(&base))
            .unwrap();
        assert_eq!(target.as_str(), "http://127.0.0.1:4010/api/events?x=1");
        assert!(policy().target("https://evil.example/api/events", Some(&base)).is_err());
    }
}
