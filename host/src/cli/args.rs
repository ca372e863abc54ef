//! The command line and the `serve` configuration file. Every option that
//! both can set is layered once, here: a flag wins over the file, the file
//! over the default, and each default is defined once, beside the type it
//! configures (`DeliveryConfig::default`, `Limits::default`,
//! `serve::Defaults`), never repeated in help texts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cdp_host::delivery::DeliveryConfig;
use cdp_host::serve::Defaults;
use clap::{Args, Parser, Subcommand};
use plugin_runtime::Limits;

#[derive(Parser)]
#[command(
    name = "cdp-host",
    version,
    about = "Runs Chord CDP destination plugins (WebAssembly components) in a sandbox"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Subcommand)]
pub enum Command {
    /// Dry run: map NDJSON events to the requests the plugin would send, one output line per input line.
    Map(MapArgs),
    /// Map NDJSON events and deliver the requests to Klaviyo (or the sandbox), retrying what is transient.
    Send(SendArgs),
    /// Run the local Klaviyo sandbox: the endpoints this destination uses, with Klaviyo's checks, state and limits.
    #[cfg(feature = "sandbox")]
    Sandbox(SandboxArgs),
    /// Start a sandbox, send the bundled example events through the bundled plugin, and show the result.
    #[cfg(feature = "sandbox")]
    Demo,
    /// Run as a service: Chord/Segment-compatible ingest, a durable spool, delivery through the plugin.
    Serve(Box<ServeArgs>),
    /// Inspect, re-drive or delete the dead letters in a serve spool.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

/// "{what} [default: {value}]", so a help text names the one default.
fn with_default(what: &str, value: impl std::fmt::Display) -> String {
    format!("{what} [default: {value}]")
}

#[derive(Args)]
pub struct RuntimeArgs {
    /// Where compiled plugins are cached [default: $CDP_HOST_CACHE_DIR, else ~/.cache/cdp-host]
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile the plugin every time instead of using the cache.
    #[arg(long, global = true)]
    pub no_cache: bool,
    #[arg(long, global = true, value_name = "MS",
          help = with_default("Wall-clock limit for one plugin call, in milliseconds", Limits::default().deadline.as_millis()))]
    pub plugin_deadline_ms: Option<u64>,
    #[arg(long, global = true, value_name = "MIB",
          help = with_default("Linear memory limit of one plugin instance, in MiB", Limits::default().memory_bytes >> 20))]
    pub plugin_memory_mib: Option<usize>,
}

impl RuntimeArgs {
    pub fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        if let Some(ms) = self.plugin_deadline_ms {
            limits.deadline = Duration::from_millis(ms.max(1));
        }
        if let Some(mib) = self.plugin_memory_mib {
            limits.memory_bytes = mib.max(1) << 20;
        }
        limits
    }
}

#[derive(Args)]
pub struct PluginArgs {
    /// The destination plugin (a WebAssembly component) [default: the bundled Klaviyo plugin]
    #[arg(long, value_name = "FILE.wasm")]
    pub plugin: Option<PathBuf>,
    /// Destination settings, a JSON object (secrets may come from the environment, e.g. KLAVIYO_API_KEY)
    #[arg(long, value_name = "FILE.json")]
    pub settings: Option<PathBuf>,
}

#[derive(Args)]
pub struct MapArgs {
    #[command(flatten)]
    pub plugin: PluginArgs,
    /// NDJSON events, one JSON object per line; `-` or nothing for standard input.
    #[arg(value_name = "INPUT")]
    pub input: Option<PathBuf>,
    /// Show batchable requests as the batches they would go in under a backlog (one line per batch, after the events' lines).
    #[arg(long)]
    pub batch: bool,
}

/// How delivery runs, for `send` and `serve` alike; in the config file,
/// `base_url` and `concurrency` at the top and the rest under `[retry]`.
#[derive(Args, Clone, Default)]
pub struct DeliveryArgs {
    /// Send to this base URL instead of the plugin's declared host, e.g. the sandbox's http://127.0.0.1:4010
    #[arg(long, alias = "klaviyo-url", value_name = "URL")]
    pub base_url: Option<url::Url>,
    #[arg(long, value_name = "N", help = with_default("Events in flight at once", DeliveryConfig::default().concurrency))]
    pub concurrency: Option<usize>,
    #[arg(long, value_name = "N",
          help = with_default("Attempts per request, the first included", DeliveryConfig::default().max_attempts))]
    pub max_attempts: Option<u32>,
    #[arg(long, value_name = "SECONDS",
          help = with_default("Seconds a request may spend being retried", DeliveryConfig::default().max_retry_time.as_secs()))]
    pub max_retry_seconds: Option<u64>,
    #[arg(long, value_name = "MS",
          help = with_default("Timeout of one HTTP attempt, in milliseconds", DeliveryConfig::default().request_timeout.as_millis()))]
    pub timeout_ms: Option<u64>,
    /// Do not pace requests to the plugin's declared rate budgets (only for a destination without limits, such as `sandbox --no-rate-limits`).
    #[arg(long)]
    pub no_pacing: bool,
    /// Send every request the plugin can batch in a batch, even at a trickle (for a backfill); by default batches form only under a backlog.
    #[arg(long)]
    pub batch_always: bool,
}

impl DeliveryArgs {
    /// These flags over `file`'s values.
    pub fn or(self, file: DeliveryArgs) -> DeliveryArgs {
        DeliveryArgs {
            base_url: self.base_url.or(file.base_url),
            concurrency: self.concurrency.or(file.concurrency),
            max_attempts: self.max_attempts.or(file.max_attempts),
            max_retry_seconds: self.max_retry_seconds.or(file.max_retry_seconds),
            timeout_ms: self.timeout_ms.or(file.timeout_ms),
            no_pacing: self.no_pacing || file.no_pacing,
            batch_always: self.batch_always || file.batch_always,
        }
    }

    /// The configuration, with the defaults where nothing was set.
    pub fn config(self) -> DeliveryConfig {
        let default = DeliveryConfig::default();
        DeliveryConfig {
            base_url: self.base_url,
            concurrency: self.concurrency.unwrap_or(default.concurrency).max(1),
            pacing: !self.no_pacing,
            batch_always: self.batch_always,
            max_attempts: self.max_attempts.unwrap_or(default.max_attempts).max(1),
            max_retry_time: self
                .max_retry_seconds
                .map_or(default.max_retry_time, Duration::from_secs),
            request_timeout: self
                .timeout_ms
                .map_or(default.request_timeout, |ms| Duration::from_millis(ms.max(1))),
            ..default
        }
    }
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub plugin: PluginArgs,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// Where undeliverable events are appended, as NDJSON (created at the first one).
    #[arg(long, default_value = "dead-letters.ndjson", value_name = "FILE")]
    pub dead_letters: PathBuf,
    /// Print one line per event as it completes.
    #[arg(long)]
    pub print_outcomes: bool,
    /// NDJSON events, one JSON object per line; `-` for standard input.
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,
}

#[cfg(feature = "sandbox")]
#[derive(Args)]
pub struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:4010", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Do not enforce Klaviyo's rate limits.
    #[arg(long)]
    pub no_rate_limits: bool,
    /// Share of requests answered 500/502/503/504 (0 to 1).
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub fault_5xx: f64,
    /// Share of requests whose connection is dropped without an answer.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub fault_drop: f64,
    /// Share of requests answered 429, with Retry-After of --fault-429-retry-after seconds.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub fault_429: f64,
    /// The Retry-After of injected 429s, in seconds.
    #[arg(long, default_value_t = 1, value_name = "SECONDS")]
    pub fault_429_retry_after: u64,
    /// Injected 5xx answers carry an HTML page instead of JSON.
    #[arg(long)]
    pub fault_html: bool,
    /// Delay added to answers, in milliseconds (after the request is stored).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub fault_latency_ms: u64,
    /// Share of answers that get the added delay.
    #[arg(long, default_value_t = 1.0, value_name = "SHARE")]
    pub fault_slow: f64,
    /// Refuse as invalid (400, or a bulk import error) any event or profile containing this text.
    #[arg(long, value_name = "TEXT")]
    pub fault_invalid_marker: Option<String>,
    /// Seed for fault injection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); flags override what it says.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR", help = with_default("Address to listen on", Defaults::LISTEN))]
    pub listen: Option<SocketAddr>,
    #[arg(long, value_name = "FILE", help = with_default("The spool database", Defaults::SPOOL))]
    pub spool: Option<PathBuf>,
    /// A write key senders must present (repeatable); also $CDP_HOST_WRITE_KEYS, comma-separated.
    #[arg(long = "write-key", value_name = "KEY")]
    pub write_keys: Vec<String>,
    /// The destination plugin [default: the bundled Klaviyo plugin]
    #[arg(long, value_name = "FILE.wasm")]
    pub plugin: Option<PathBuf>,
    /// Destination settings, a JSON object (or [settings] in the config file).
    #[arg(long, value_name = "FILE.json")]
    pub settings: Option<PathBuf>,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    #[arg(long, value_name = "HOURS",
          help = with_default("Hours delivered and skipped events stay in the spool", Defaults::RETENTION_HOURS))]
    pub retention_hours: Option<u64>,
    #[arg(long, value_name = "SECONDS",
          help = with_default("Seconds SIGTERM waits for deliveries in flight", Defaults::SHUTDOWN_GRACE_SECONDS))]
    pub shutdown_grace_seconds: Option<u64>,
    /// process-crash (WAL, synchronous=NORMAL) or power-loss (fsync per commit) [default: process-crash]
    #[arg(long, value_name = "LEVEL", value_enum)]
    pub durability: Option<cdp_host::spool::Durability>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    pub log_json: bool,
    /// Token that enables the admin API (connections, hot swap, rollback); also $CDP_HOST_ADMIN_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,
    /// Watch this directory for new versions of the plugin (*.wasm), checked and swapped in like uploads.
    #[arg(long, value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Keep events in a NATS JetStream stream shared by several hosts, instead of the spool:
    /// nats://HOST:PORT, comma-separated (also $CDP_HOST_STREAM).
    #[arg(long, value_name = "URLS", env = "CDP_HOST_STREAM")]
    pub stream: Option<String>,
    /// With --stream: ingest (take events, publish them), deliver (consume and deliver), or both [default: both]
    #[arg(long, value_name = "ROLE", value_enum)]
    pub role: Option<cdp_host::serve::stream::Role>,
    /// With --stream: copies JetStream keeps of each event, when this host creates the stream
    /// [default: 3 when three or more servers are named, else 1]
    #[arg(long, value_name = "N")]
    pub stream_replicas: Option<usize>,
    /// With --stream: partitions of the stream; every host must use the same [default: 16]
    #[arg(long, value_name = "N")]
    pub partitions: Option<u32>,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// A base URL a connection made through the admin API may send to instead of its plugin's
    /// host (repeatable; serve's own --base-url is always approved)
    #[arg(long = "approve-base-url", value_name = "URL")]
    pub approved_base_urls: Vec<url::Url>,
    /// An environment variable prefix a connection made through the admin API may name as a
    /// secret's source (repeatable; none by default)
    #[arg(long = "admin-secret-env-prefix", value_name = "PREFIX")]
    pub admin_secret_env_prefixes: Vec<String>,
    /// A directory whose files a connection made through the admin API may name as a secret's
    /// source (repeatable; none by default)
    #[arg(long = "admin-secret-dir", value_name = "DIR")]
    pub admin_secret_dirs: Vec<PathBuf>,
    /// Events a second each write key may send, sustained (twice that at once, and at least one
    /// whole batch); over it ingest answers 429 with Retry-After. 0 turns the limit off [default: 5000]
    #[arg(long, value_name = "EVENTS")]
    pub ingest_rate: Option<u32>,
    /// Serve no operator console (it is at /console/ when an admin token is set)
    #[arg(long)]
    pub no_console: bool,
    /// Recent events the console keeps for each connection, in memory [default: 32]
    #[arg(long, value_name = "EVENTS")]
    pub console_ring: Option<usize>,
    /// Whether the console keeps event bodies (the event, the requests with keys masked, the
    /// answers) or only what became of each event, for privacy [default: on]
    #[arg(long, value_name = "on|off")]
    pub console_bodies: Option<OnOff>,
}

/// The `serve` configuration file; every key optional, each named like
/// its flag.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub listen: Option<SocketAddr>,
    pub spool: Option<PathBuf>,
    #[serde(default)]
    pub write_keys: Vec<String>,
    pub plugin: Option<PathBuf>,
    pub base_url: Option<url::Url>,
    /// The old name of `base_url`, still read.
    pub klaviyo_url: Option<url::Url>,
    pub concurrency: Option<usize>,
    pub retention_hours: Option<u64>,
    pub shutdown_grace_seconds: Option<u64>,
    pub durability: Option<cdp_host::spool::Durability>,
    pub settings: Option<toml::Table>,
    pub retry: Option<RetryFile>,
    pub admin_token: Option<String>,
    pub plugin_dir: Option<PathBuf>,
    pub stream: Option<String>,
    pub role: Option<cdp_host::serve::stream::Role>,
    pub stream_replicas: Option<usize>,
    pub partitions: Option<u32>,
    /// How to reach NATS (`[nats]`: user, password_file, token_file,
    /// nkey, creds, tls, tls_ca, tls_cert, tls_key).
    #[serde(default)]
    pub nats: NatsArgs,
    #[serde(default)]
    pub approved_base_urls: Vec<url::Url>,
    #[serde(default)]
    pub admin_secret_env_prefixes: Vec<String>,
    #[serde(default)]
    pub admin_secret_dirs: Vec<PathBuf>,
    pub ingest_rate: Option<u32>,
    #[serde(default)]
    pub no_console: bool,
    pub console_ring: Option<usize>,
    pub console_bodies: Option<OnOff>,
    /// Shops, each with its own write keys, plugin, settings and secrets
    /// (`[[connections]]`).
    #[serde(default)]
    pub connections: Vec<ConnectionFile>,
}

/// One `[[connections]]` entry: created at start if the spool has no
/// connection with this id.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionFile {
    pub id: String,
    pub write_keys: Vec<String>,
    /// The plugin file [default: the one serve starts with].
    pub plugin: Option<PathBuf>,
    /// Settings; each secret names its source: `{ env = "VAR" }` or `{ file = "PATH" }`.
    pub settings: Option<toml::Table>,
    pub base_url: Option<url::Url>,
    /// active (the default) or paused.
    pub state: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    pub max_attempts: Option<u32>,
    pub max_retry_seconds: Option<u64>,
    pub timeout_ms: Option<u64>,
}

impl ServeFile {
    /// What the file says about delivery.
    pub fn delivery(&self) -> DeliveryArgs {
        let retry = self.retry.as_ref();
        DeliveryArgs {
            base_url: self.base_url.clone().or_else(|| self.klaviyo_url.clone()),
            concurrency: self.concurrency,
            max_attempts: retry.and_then(|r| r.max_attempts),
            max_retry_seconds: retry.and_then(|r| r.max_retry_seconds),
            timeout_ms: retry.and_then(|r| r.timeout_ms),
            no_pacing: false,
            batch_always: false,
        }
    }
}

/// How to reach NATS with --stream: credentials and TLS. Secrets are read
/// from files or the environment, never taken on the command line (where
/// any user of the machine can read them). In the config file, the same
/// keys without `nats-` under `[nats]`.
#[derive(clap::Args, serde::Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct NatsArgs {
    /// With --stream: the NATS user; its password from --nats-password-file or $CDP_HOST_NATS_PASSWORD
    #[arg(long = "nats-user", value_name = "NAME")]
    pub user: Option<String>,
    /// With --stream: a file holding the NATS user's password
    #[arg(long = "nats-password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// With --stream: a file holding a NATS token (or $CDP_HOST_NATS_TOKEN)
    #[arg(long = "nats-token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// With --stream: a file holding an NKey seed (SU…); the servers list its public key
    #[arg(long = "nats-nkey", value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// With --stream: a NATS credentials file (a user JWT and its seed, as nsc makes them)
    #[arg(long = "nats-creds", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// With --stream: refuse servers that do not speak TLS (implied by the other --nats-tls flags)
    #[arg(long = "nats-tls")]
    #[serde(default)]
    pub tls: bool,
    /// With --stream: the CA (PEM) that signed the servers' certificates [default: the system's roots]
    #[arg(long = "nats-tls-ca", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// With --stream: this host's certificate (PEM), for servers that verify clients; with --nats-tls-key
    #[arg(long = "nats-tls-cert", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// With --stream: the key (PEM) of --nats-tls-cert
    #[arg(long = "nats-tls-key", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl NatsArgs {
    /// The flags where given, else the config file's.
    pub fn or(self, file: NatsArgs) -> NatsArgs {
        NatsArgs {
            user: self.user.or(file.user),
            password_file: self.password_file.or(file.password_file),
            token_file: self.token_file.or(file.token_file),
            nkey: self.nkey.or(file.nkey),
            creds: self.creds.or(file.creds),
            tls: self.tls || file.tls,
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
        }
    }
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Print the dead letters as NDJSON (event, reason, request, Klaviyo's answer).
    List {
        #[arg(long, default_value = Defaults::SPOOL, value_name = "FILE")]
        spool: PathBuf,
        /// The dead letters of `serve --stream` instead: nats://HOST:PORT, comma-separated.
        #[arg(long, value_name = "URLS", env = "CDP_HOST_STREAM")]
        stream: Option<String>,
        #[command(flatten)]
        nats: NatsArgs,
        /// Only this connection's [default: every connection's]
        #[arg(long, value_name = "ID")]
        connection: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Put dead letters back to be delivered again by a running (or the next) serve.
    Replay {
        /// With --stream: the stream's partitions, as serve has them; needed only for letters stored
        /// by a version before letters kept their partition [default: 16]
        #[arg(long, value_name = "N")]
        partitions: Option<u32>,
        #[arg(long, default_value = Defaults::SPOOL, value_name = "FILE")]
        spool: PathBuf,
        /// The dead letters of `serve --stream` instead: nats://HOST:PORT, comma-separated.
        #[arg(long, value_name = "URLS", env = "CDP_HOST_STREAM")]
        stream: Option<String>,
        #[command(flatten)]
        nats: NatsArgs,
        /// Only this connection's [default: every connection's]
        #[arg(long, value_name = "ID")]
        connection: Option<String>,
        /// Only these (repeatable); all when none is given.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
    /// Delete dead letters.
    Purge {
        #[arg(long, default_value = Defaults::SPOOL, value_name = "FILE")]
        spool: PathBuf,
        /// The dead letters of `serve --stream` instead: nats://HOST:PORT, comma-separated.
        #[arg(long, value_name = "URLS", env = "CDP_HOST_STREAM")]
        stream: Option<String>,
        #[command(flatten)]
        nats: NatsArgs,
        /// Only this connection's [default: every connection's]
        #[arg(long, value_name = "ID")]
        connection: Option<String>,
        /// Only these (repeatable); all when none is given.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Print a plugin's manifest, interface version, SHA-256 and size.
    Inspect {
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
    },
}

/// A switch given as `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}
