//! How a host reaches NATS: which servers, as whom, and over what.
//!
//! Without credentials and TLS, anyone who reaches a NATS port can write
//! the connections bucket (and so make every host send a shop's events,
//! with its secrets' sources, where they like) or publish events under any
//! connection. A production cluster asks every client for credentials and
//! speaks TLS; this is the client's half of that.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::rustls;

use cdp_core::settings::Secret;

/// The servers, and how this host proves who it is to them.
#[derive(Clone, Debug, Default)]
pub struct NatsAccess {
    /// `nats://host:port` or `tls://host:port`, comma-separated.
    pub servers: String,
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

/// Who this host is to NATS.
#[derive(Clone, Debug, Default)]
pub enum NatsAuth {
    /// No credentials: only for a server that asks none (tests, a laptop).
    #[default]
    None,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    /// An NKey seed: the server lists the public key, and the seed signs
    /// the server's nonce (it never crosses the wire).
    NKey(Secret),
    /// A `.creds` file (a user JWT and its NKey seed), as NATS's
    /// decentralised auth (operator, accounts, `nsc`) issues them.
    Creds(PathBuf),
}

/// TLS to the servers.
#[derive(Clone, Debug, Default)]
pub struct NatsTls {
    /// Refuse a server that does not speak TLS.
    pub required: bool,
    /// The CA (PEM) the servers' certificates are checked against, instead
    /// of the system's roots.
    pub ca: Option<PathBuf>,
    /// A certificate and its key (PEM), for servers that verify clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// A secret read from a file is at most this long.
const SECRET_FILE_MAX: u64 = 64 * 1024;

/// Reads a secret (a password, a token, an NKey seed) from a regular
/// file, trimmed of surrounding white space. The error names the file, not
/// what it holds.
pub fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<Secret> {
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{what} {} is not a regular file", path.display());
    }
    if meta.len() > SECRET_FILE_MAX {
        anyhow::bail!(
            "{what} {} is {} bytes; a secret file holds at most {SECRET_FILE_MAX}",
            path.display(),
            meta.len()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))?;
    let text = text.trim();
    if text.is_empty() {
        anyhow::bail!("{what} {} is empty", path.display());
    }
    Ok(Secret::new(text.to_string()))
}

impl NatsAccess {
    /// The servers, with no credentials and no TLS.
    pub fn plain(servers: impl Into<String>) -> NatsAccess {
        NatsAccess {
            servers: servers.into(),
            ..NatsAccess::default()
        }
    }

    /// What the logs may say of it: the servers, the user or the kind of
    /// credential, and whether TLS is required; never a secret.
    pub fn describe(&self) -> String {
        let who = match &self.auth {
            NatsAuth::None => "without credentials".to_string(),
            NatsAuth::UserPassword { user, .. } => format!("as user {user:?}"),
            NatsAuth::Token(_) => "with a token".to_string(),
            NatsAuth::NKey(_) => "with an NKey".to_string(),
            NatsAuth::Creds(path) => format!("with the credentials in {}", path.display()),
        };
        let tls = if self.tls.required || self.tls.ca.is_some() || self.tls.client.is_some() {
            ", over TLS"
        } else {
            ""
        };
        format!("{} {who}{tls}", self.servers)
    }

    /// A client, connected or still trying (a cluster may start after this
    /// host); what went wrong last while connecting is kept in the
    /// returned `Trouble`.
    pub async fn connect(&self) -> anyhow::Result<(async_nats::Client, Trouble)> {
        let addresses: Vec<async_nats::ServerAddr> = self
            .servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().with_context(|| format!("{s:?} is not a NATS server address")))
            .collect::<anyhow::Result<_>>()?;
        if addresses.is_empty() {
            anyhow::bail!("--stream names no NATS server");
        }
        let trouble = Trouble::default();
        let mut options = async_nats::ConnectOptions::new()
            .name(concat!("cdp-host/", env!("CARGO_PKG_VERSION")))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .event_callback({
                let trouble = trouble.clone();
                move |event| {
                    let trouble = trouble.clone();
                    async move { trouble.saw(event) }
                }
            });
        options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_string())
            }
            NatsAuth::Token(token) => options.token(token.expose().to_string()),
            NatsAuth::NKey(seed) => options.nkey(seed.expose().to_string()),
            NatsAuth::Creds(path) => options
                .credentials_file(path)
                .await
                .with_context(|| format!("reading the NATS credentials file {}", path.display()))?,
        };
        if let Some(ca) = &self.tls.ca {
            options = options
                .tls_client_config(self.tls_config(ca, &trouble)?)
                .require_tls(true);
        } else if let Some((cert, key)) = &self.tls.client {
            // The system's roots, as the client loads them.
            check_readable(cert, "--nats-tls-cert")?;
            check_readable(key, "--nats-tls-key")?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        } else if self.tls.required {
            options = options.require_tls(true);
        }
        let client = options
            .connect(addresses)
            .await
            .with_context(|| format!("connecting to NATS at {}", self.describe()))?;
        Ok((client, trouble))
    }
}

impl NatsAccess {
    /// TLS trusting `ca` alone, with this host's certificate if it has
    /// one; a server certificate refused is told to `trouble` with the
    /// reason (the client itself reports only "IO error").
    fn tls_config(&self, ca: &Path, trouble: &Trouble) -> anyhow::Result<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("--nats-tls-ca {}", ca.display()))? {
            let cert = cert.with_context(|| format!("--nats-tls-ca {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("--nats-tls-ca {}: a certificate that cannot be a root", ca.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("--nats-tls-ca {} holds no certificate", ca.display());
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("checking the servers' certificates")?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Recording {
                inner: verifier,
                trouble: trouble.clone(),
            }));
        Ok(match &self.tls.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .with_context(|| format!("--nats-tls-cert {}", cert.display()))?;
                let key =
                    PrivateKeyDer::from_pem_file(key).with_context(|| format!("--nats-tls-key {}", key.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .context("--nats-tls-cert and --nats-tls-key do not make a client certificate")?
            }
        })
    }
}

/// The usual check of a server's certificate, which tells `Trouble` why
/// it refused one.
#[derive(Debug)]
struct Recording {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    trouble: Trouble,
}

impl rustls::client::danger::ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                self.trouble
                    .tls_refused(format!("TLS error: the server's certificate was refused: {e}"))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn check_readable(path: &Path, what: &str) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .with_context(|| format!("{what} {}", path.display()))
}

/// The last thing that went wrong while connecting, as the client reported
/// it (`authorization violation`, `TLS error`, `IO error`…), for the error
/// a host gives when it cannot reach the stream at start.
#[derive(Clone, Default, Debug)]
pub struct Trouble(Arc<Mutex<Troubles>>);

#[derive(Default, Debug)]
struct Troubles {
    /// The client's last error event.
    last: Option<String>,
    /// Why a server's certificate was refused, which the client's event
    /// says only as "IO error".
    tls: Option<String>,
}

impl Trouble {
    fn saw(&self, event: async_nats::Event) {
        let text = match event {
            async_nats::Event::ClientError(e) => e.to_string(),
            async_nats::Event::ServerError(e) => format!("server error: {e}"),
            async_nats::Event::Connected => {
                *self.0.lock().unwrap() = Troubles::default();
                return;
            }
            _ => return,
        };
        let mut troubles = self.0.lock().unwrap();
        if troubles.last.as_deref() != Some(text.as_str()) {
            tracing::warn!("NATS: {text}");
        }
        troubles.last = Some(text);
    }

    fn tls_refused(&self, why: String) {
        let mut troubles = self.0.lock().unwrap();
        if troubles.tls.as_deref() != Some(why.as_str()) {
            tracing::warn!("NATS: {why}");
        }
        troubles.tls = Some(why);
    }

    /// What went wrong last, if the client is not connected since.
    pub fn last(&self) -> Option<String> {
        let troubles = self.0.lock().unwrap();
        troubles.tls.clone().or_else(|| troubles.last.clone())
    }

    /// Whether the last trouble is one that waiting will not fix: the
    /// servers refused the credentials, or TLS could not be agreed.
    pub fn refused(&self) -> Option<String> {
        self.last().filter(|t| {
            t.contains("authorization violation") || t.contains("TLS error") || t.contains("failed signing nonce")
        })
    }
}
