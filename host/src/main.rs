//! `cdp-host`: the command line of the reference host.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

mod progress;

use cdp_host::EXAMPLE_EVENTS;
use cdp_host::delivery::{DeadLetters, Delivery, DeliveryConfig};
use cdp_host::dry_run;
use cdp_host::mapper::EventMapper;
use cdp_host::plugin::{BUNDLED_KLAVIYO, Plugin, Runtime, RuntimeConfig};
use cdp_host::sandbox::{DEMO_KEY, EVENTS_ONLY_KEY, Faults, Sandbox, SandboxConfig};
use cdp_host::serve::ServeConfig;
use cdp_host::settings::{DestinationSettings, Secret};
use cdp_host::spool::{Durability, Spool};

#[derive(Parser)]
#[command(
    name = "cdp-host",
    version,
    about = "Runs Chord CDP destination plugins (WebAssembly components) in a sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Dry run: map NDJSON events to the requests the plugin would send, one output line per input line.
    Map(MapArgs),
    /// Map NDJSON events and deliver the requests to Klaviyo (or the sandbox), retrying what is transient.
    Send(SendArgs),
    /// Run the local Klaviyo sandbox: the endpoints this destination uses, with Klaviyo's checks, state and limits.
    Sandbox(SandboxArgs),
    /// Start a sandbox, send the bundled example events through the bundled plugin, and show the result.
    Demo,
    /// Run as a service: Chord/Segment-compatible ingest, a durable spool, delivery through the plugin.
    Serve(ServeArgs),
    /// Inspect, re-drive or delete the dead letters in a serve spool.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// Send to this base URL instead of the plugin's declared host, e.g. the sandbox's http://127.0.0.1:4010
    #[arg(long, value_name = "URL")]
    klaviyo_url: Option<url::Url>,
    /// Where undeliverable events are appended, as NDJSON.
    #[arg(long, default_value = "dead-letters.ndjson", value_name = "FILE")]
    dead_letters: PathBuf,
    /// Events in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Attempts per request, the first included.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// Seconds a request may spend being retried.
    #[arg(long, default_value_t = 300)]
    max_retry_seconds: u64,
    /// Timeout of one HTTP attempt, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print one line per event as it completes.
    #[arg(long)]
    print_outcomes: bool,
    /// Do not pace requests to the plugin's declared rate budgets (only for a destination without limits, such as `sandbox --no-rate-limits`).
    #[arg(long)]
    no_pacing: bool,
    /// NDJSON events, one JSON object per line; `-` for standard input.
    #[arg(value_name = "INPUT")]
    input: PathBuf,
}

#[derive(Args)]
struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:4010", value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// Do not enforce Klaviyo's rate limits.
    #[arg(long)]
    no_rate_limits: bool,
    /// Share of requests answered 500/502/503/504 (0 to 1).
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    fault_5xx: f64,
    /// Share of requests whose connection is dropped without an answer.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    fault_drop: f64,
    /// Share of requests answered 429 with Retry-After: 1.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    fault_429: f64,
    /// Injected 5xx answers carry an HTML page instead of JSON.
    #[arg(long)]
    fault_html: bool,
    /// Delay added to answers, in milliseconds (after the request is stored).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    fault_latency_ms: u64,
    /// Share of answers that get the added delay.
    #[arg(long, default_value_t = 1.0, value_name = "SHARE")]
    fault_slow: f64,
    /// Seed for fault injection.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct RuntimeArgs {
    /// Where compiled plugins are cached [default: $CDP_HOST_CACHE_DIR, else ~/.cache/cdp-host]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile the plugin every time instead of using the cache.
    #[arg(long, global = true)]
    no_cache: bool,
    /// Wall-clock limit for one plugin call, in milliseconds.
    #[arg(long, global = true, default_value_t = 1000, value_name = "MS")]
    plugin_deadline_ms: u64,
    /// Linear memory limit of one plugin instance, in MiB.
    #[arg(long, global = true, default_value_t = 128, value_name = "MIB")]
    plugin_memory_mib: usize,
}

#[derive(Args)]
struct PluginArgs {
    /// The destination plugin (a WebAssembly component) [default: the bundled Klaviyo plugin]
    #[arg(long, value_name = "FILE.wasm")]
    plugin: Option<PathBuf>,
    /// Destination settings, a JSON object (secrets may come from the environment, e.g. KLAVIYO_API_KEY)
    #[arg(long, value_name = "FILE.json")]
    settings: Option<PathBuf>,
}

#[derive(Args)]
struct MapArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// NDJSON events, one JSON object per line; `-` or nothing for standard input.
    #[arg(value_name = "INPUT")]
    input: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML); flags override what it says.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// The spool database [default: cdp-spool.sqlite]
    #[arg(long, value_name = "FILE")]
    spool: Option<PathBuf>,
    /// A write key senders must present (repeatable); also $CDP_HOST_WRITE_KEYS, comma-separated.
    #[arg(long = "write-key", value_name = "KEY")]
    write_keys: Vec<String>,
    /// The destination plugin [default: the bundled Klaviyo plugin]
    #[arg(long, value_name = "FILE.wasm")]
    plugin: Option<PathBuf>,
    /// Destination settings, a JSON object (or [settings] in the config file).
    #[arg(long, value_name = "FILE.json")]
    settings: Option<PathBuf>,
    /// Send to this base URL instead of the plugin's declared host (e.g. the sandbox).
    #[arg(long, value_name = "URL")]
    klaviyo_url: Option<url::Url>,
    /// Events in flight at once [default: 64]
    #[arg(long)]
    concurrency: Option<usize>,
    /// Attempts per request [default: 10]
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Seconds a request may spend being retried [default: 300]
    #[arg(long)]
    max_retry_seconds: Option<u64>,
    /// Timeout of one HTTP attempt, in milliseconds [default: 10000]
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Hours delivered and skipped events stay in the spool [default: 24]
    #[arg(long)]
    retention_hours: Option<u64>,
    /// Seconds SIGTERM waits for deliveries in flight [default: 20]
    #[arg(long)]
    shutdown_grace_seconds: Option<u64>,
    /// process-crash (WAL, synchronous=NORMAL) or power-loss (fsync per commit) [default: process-crash]
    #[arg(long, value_name = "LEVEL")]
    durability: Option<String>,
    /// Do not pace to the plugin's rate budgets (only for a destination without limits).
    #[arg(long)]
    no_pacing: bool,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    /// Token that enables the admin API (hot swap, rollback); also $CDP_HOST_ADMIN_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    admin_token: Option<String>,
    /// Watch this directory for new versions of the plugin (*.wasm), checked and swapped in like uploads.
    #[arg(long, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,
}

/// The `serve` configuration file; every field optional.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<std::net::SocketAddr>,
    spool: Option<PathBuf>,
    #[serde(default)]
    write_keys: Vec<String>,
    plugin: Option<PathBuf>,
    klaviyo_url: Option<url::Url>,
    concurrency: Option<usize>,
    retention_hours: Option<u64>,
    shutdown_grace_seconds: Option<u64>,
    durability: Option<String>,
    settings: Option<toml::Table>,
    retry: Option<RetryFile>,
    admin_token: Option<String>,
    plugin_dir: Option<PathBuf>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    max_attempts: Option<u32>,
    max_retry_seconds: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print the dead letters as NDJSON (event, reason, request, Klaviyo's answer).
    List {
        #[arg(long, default_value = "cdp-spool.sqlite", value_name = "FILE")]
        spool: PathBuf,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Put dead letters back to be delivered again by a running (or the next) serve.
    Replay {
        #[arg(long, default_value = "cdp-spool.sqlite", value_name = "FILE")]
        spool: PathBuf,
        /// Only these (repeatable); all when none is given.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
    /// Delete dead letters.
    Purge {
        #[arg(long, default_value = "cdp-spool.sqlite", value_name = "FILE")]
        spool: PathBuf,
        /// Only these (repeatable); all when none is given.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Print a plugin's manifest, interface version, SHA-256 and size.
    Inspect {
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`| head`)
    // panics; a command-line tool should end quietly instead, as `cat` does.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let (level, json) = match &cli.command {
        Command::Serve(args) => ("info", args.log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDP_HOST_LOG").unwrap_or_else(|_| level.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("cdp-host: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Map(args) => map(&cli.runtime, args),
        Command::Send(args) => send(&cli.runtime, args),
        Command::Sandbox(args) => sandbox(args),
        Command::Demo => demo(&cli.runtime),
        Command::Serve(args) => serve(&cli.runtime, args),
        Command::Dlq(command) => dlq(command),
        Command::Plugin(PluginCommand::Inspect { file }) => inspect(&cli.runtime, &file),
    }
}

fn runtime(args: &RuntimeArgs, concurrency: u32) -> anyhow::Result<Arc<Runtime>> {
    let mut config = RuntimeConfig {
        concurrency,
        cache_dir: if args.no_cache {
            None
        } else {
            args.cache_dir.clone().or_else(default_cache_dir)
        },
        ..RuntimeConfig::default()
    };
    config.limits.deadline = std::time::Duration::from_millis(args.plugin_deadline_ms.max(1));
    config.limits.memory_bytes = args.plugin_memory_mib.max(1) << 20;
    Runtime::new(config)
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CDP_HOST_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("cdp-host"))
}

fn load_plugin(runtime: &Arc<Runtime>, path: Option<&Path>) -> anyhow::Result<Plugin> {
    let plugin = match path {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
            runtime.load(&bytes, &path.display().to_string())?
        }
        None => runtime.load(BUNDLED_KLAVIYO, "the bundled Klaviyo plugin")?,
    };
    Ok(plugin)
}

/// Loads the plugin and settings, refusing settings the plugin rejects.
fn load_destination(runtime: &Arc<Runtime>, args: &PluginArgs) -> anyhow::Result<(Arc<Plugin>, DestinationSettings)> {
    let plugin = load_plugin(runtime, args.plugin.as_deref())?;
    let settings = DestinationSettings::load(args.settings.as_deref(), plugin.manifest())?;
    validate_settings(&plugin, &settings)?;
    Ok((Arc::new(plugin), settings))
}

fn map(runtime_args: &RuntimeArgs, args: MapArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime(runtime_args, 1)?;
    let (plugin, settings) = load_destination(&runtime, &args.plugin)?;
    let mut mapper = EventMapper::new(plugin, settings.clone());
    let stdout = io::stdout().lock();
    match args.input.as_deref() {
        None => dry_run::run(&mut mapper, &settings, io::stdin().lock(), stdout)?,
        Some(path) if path == Path::new("-") => dry_run::run(&mut mapper, &settings, io::stdin().lock(), stdout)?,
        Some(path) => {
            let file = File::open(path).with_context(|| format!("reading events {}", path.display()))?;
            dry_run::run(&mut mapper, &settings, BufReader::new(file), stdout)?
        }
    };
    Ok(ExitCode::SUCCESS)
}

fn inspect(runtime_args: &RuntimeArgs, file: &Path) -> anyhow::Result<ExitCode> {
    let runtime = runtime(runtime_args, 1)?;
    let plugin = load_plugin(&runtime, Some(file))?;
    let manifest = plugin.manifest();
    let report = serde_json::json!({
        "file": file.display().to_string(),
        "interface": plugin.interface(),
        "sha256": plugin.sha256_hex(),
        "size_bytes": plugin.size(),
        "manifest": {
            "name": manifest.name,
            "version": manifest.version,
            "api_revision": manifest.api_revision,
            "allowed_hosts": manifest.allowed_hosts,
            "rate_classes": manifest.rate_classes.iter().map(|r| serde_json::json!({
                "name": r.name,
                "burst_per_second": r.burst_per_second,
                "steady_per_minute": r.steady_per_minute,
            })).collect::<Vec<_>>(),
            "settings": manifest.settings.iter().map(|s| serde_json::json!({
                "name": s.name,
                "kind": format!("{:?}", s.kind).to_lowercase(),
                "description": s.description,
                "required_to_send": s.required_to_send,
                "secret": s.secret,
                "default": s.default_value.as_deref().and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok()),
            })).collect::<Vec<_>>(),
        }
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn send(runtime_args: &RuntimeArgs, args: SendArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime(runtime_args, args.concurrency as u32)?;
    let (plugin, settings) = load_destination(&runtime, &args.plugin)?;
    let config = DeliveryConfig {
        base_url: args.klaviyo_url.clone(),
        concurrency: args.concurrency.max(1),
        pacing: !args.no_pacing,
        max_attempts: args.max_attempts.max(1),
        max_retry_time: std::time::Duration::from_secs(args.max_retry_seconds),
        request_timeout: std::time::Duration::from_millis(args.timeout_ms.max(1)),
        ..DeliveryConfig::default()
    };
    let input: Box<dyn io::BufRead + Send> = if args.input == Path::new("-") {
        Box::new(BufReader::new(io::stdin()))
    } else {
        let file = File::open(&args.input).with_context(|| format!("reading events {}", args.input.display()))?;
        Box::new(BufReader::new(file))
    };
    let dead_letters = DeadLetters::to_file(&args.dead_letters)?;
    let delivery = Delivery::new(plugin, settings, config, dead_letters)?;
    let print = args.print_outcomes;
    let report = tokio_runtime()?.block_on(async {
        let progress = progress::show(delivery.progress.clone());
        let report = delivery.run(input, move |record| {
            if print {
                println!("{}", progress::outcome_line(record));
            }
        });
        let report = report.await;
        progress.finish();
        report
    })?;
    println!("{}", report.summary());
    if let Some(peak) = progress::peak_memory_bytes() {
        println!("peak memory {:.1} MiB", peak as f64 / (1 << 20) as f64);
    }
    if report.dead_lettered > 0 {
        println!("dead letters: {}", args.dead_letters.display());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn sandbox(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let config = SandboxConfig {
        rate_limits: !args.no_rate_limits,
        faults: Faults {
            server_errors: args.fault_5xx,
            drop_connections: args.fault_drop,
            throttle_storm: args.fault_429,
            html_errors: args.fault_html,
            latency: std::time::Duration::from_millis(args.fault_latency_ms),
            slow: args.fault_slow,
        },
        seed: args.seed,
        ..SandboxConfig::default()
    };
    tokio_runtime()?.block_on(async {
        let sandbox = Sandbox::start(config, args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        println!("Klaviyo sandbox listening on {}", sandbox.url());
        println!("  keys: {DEMO_KEY} (all scopes), {EVENTS_ONLY_KEY} (events:write only)");
        println!(
            "  state: {0}/sandbox/events, {0}/sandbox/profiles, {0}/sandbox/stats",
            sandbox.url()
        );
        tokio::select! {
            _ = sandbox.wait() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

/// The bundled example settings (the events are `cdp_host::EXAMPLE_EVENTS`),
/// so `demo` needs no files.
const EXAMPLE_SETTINGS: &str = include_str!("../../examples/settings.json");

fn demo(runtime_args: &RuntimeArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime(runtime_args, 8)?;
    let plugin = Arc::new(load_plugin(&runtime, None)?);
    tokio_runtime()?.block_on(async {
        let sandbox = Sandbox::start(SandboxConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
        println!("Started the local Klaviyo sandbox on {}", sandbox.url());
        println!(
            "Sending {} example Chord events through {plugin}:\n",
            EXAMPLE_EVENTS.lines().count()
        );
        let mut settings: serde_json::Map<String, serde_json::Value> = serde_json::from_str(EXAMPLE_SETTINGS)?;
        settings.insert("api_key".into(), DEMO_KEY.into());
        let settings = DestinationSettings::from_object(settings, plugin.manifest(), |_| None)?;
        let config = DeliveryConfig {
            base_url: Some(sandbox.url().parse()?),
            concurrency: 8,
            ..DeliveryConfig::default()
        };
        let delivery = Delivery::new(plugin, settings, config, DeadLetters::in_memory())?;
        let records = std::sync::Mutex::new(Vec::new());
        let report = delivery
            .run(io::Cursor::new(EXAMPLE_EVENTS.as_bytes().to_vec()), |record| {
                records.lock().unwrap().push(record.clone());
            })
            .await?;
        let mut records = records.into_inner().unwrap();
        records.sort_by_key(|r| r.line);
        for record in &records {
            println!("{}", progress::outcome_line(record));
        }
        println!("\n{}", report.summary());
        println!("\nThe sandbox now holds:");
        for event in sandbox.events() {
            let who = sandbox
                .profiles()
                .into_iter()
                .find(|p| p.id == event.profile_id)
                .and_then(|p| p.email.or(p.phone_number))
                .unwrap_or_default();
            let value = event.value.map(|v| format!(" value {v}")).unwrap_or_default();
            println!(
                "  event   {:<22} {who:<32} unique_id {}{value}",
                event.metric, event.unique_id
            );
        }
        for profile in sandbox.profiles() {
            let name = [
                profile.attributes.get("first_name"),
                profile.attributes.get("last_name"),
            ]
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" ");
            println!(
                "  profile {} email {} phone {} {name}",
                profile.id,
                profile.email.as_deref().unwrap_or("-"),
                profile.phone_number.as_deref().unwrap_or("-")
            );
        }
        let stats = sandbox.stats();
        println!(
            "  requests {}, accepted {}, deduplicated {}, rejected {:?}",
            stats.requests, stats.accepted, stats.deduplicated, stats.rejected
        );
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

fn serve(runtime_args: &RuntimeArgs, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let file: ServeFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => ServeFile::default(),
    };
    let retry = file.retry.unwrap_or_default();
    let concurrency = args.concurrency.or(file.concurrency).unwrap_or(64).max(1);
    let runtime = runtime(runtime_args, concurrency as u32)?;
    let plugin = load_plugin(&runtime, args.plugin.as_deref().or(file.plugin.as_deref()))?;
    let settings = match (&args.settings, file.settings) {
        (Some(path), _) => DestinationSettings::load(Some(path), plugin.manifest())?,
        (None, Some(table)) => {
            let object = serde_json::to_value(table)?.as_object().cloned().unwrap_or_default();
            DestinationSettings::from_object(object, plugin.manifest(), |name| std::env::var(name).ok())?
        }
        (None, None) => DestinationSettings::load(None, plugin.manifest())?,
    };
    validate_settings(&plugin, &settings)?;
    let mut write_keys: Vec<String> = args.write_keys.clone();
    write_keys.extend(file.write_keys);
    if let Ok(keys) = std::env::var("CDP_HOST_WRITE_KEYS") {
        write_keys.extend(
            keys.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
    }
    if write_keys.is_empty() {
        bail!("serve needs at least one write key (--write-key, write_keys in the config, or $CDP_HOST_WRITE_KEYS)");
    }
    let durability = match args.durability.or(file.durability).as_deref() {
        None | Some("process-crash") => Durability::ProcessCrash,
        Some("power-loss") => Durability::PowerLoss,
        Some(other) => bail!("durability {other:?} is not process-crash or power-loss"),
    };
    let spool_path = args
        .spool
        .or(file.spool)
        .unwrap_or_else(|| PathBuf::from("cdp-spool.sqlite"));
    let spool = Arc::new(Spool::open(&spool_path, durability)?);
    let config = ServeConfig {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".parse().unwrap()),
        spool,
        write_keys: write_keys.into_iter().map(Secret::new).collect(),
        settings,
        delivery: DeliveryConfig {
            base_url: args.klaviyo_url.or(file.klaviyo_url),
            concurrency,
            pacing: !args.no_pacing,
            max_attempts: args.max_attempts.or(retry.max_attempts).unwrap_or(10).max(1),
            max_retry_time: std::time::Duration::from_secs(
                args.max_retry_seconds.or(retry.max_retry_seconds).unwrap_or(300),
            ),
            request_timeout: std::time::Duration::from_millis(
                args.timeout_ms.or(retry.timeout_ms).unwrap_or(10_000).max(1),
            ),
            ..DeliveryConfig::default()
        },
        retention: std::time::Duration::from_secs(3600 * args.retention_hours.or(file.retention_hours).unwrap_or(24)),
        shutdown_grace: std::time::Duration::from_secs(
            args.shutdown_grace_seconds
                .or(file.shutdown_grace_seconds)
                .unwrap_or(20),
        ),
        admin_token: args
            .admin_token
            .or(file.admin_token)
            .or_else(|| std::env::var("CDP_HOST_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        plugin_dir: args.plugin_dir.or(file.plugin_dir),
    };
    tokio_runtime()?.block_on(cdp_host::serve::serve(config, Arc::new(plugin)))?;
    Ok(ExitCode::SUCCESS)
}

fn validate_settings(plugin: &Plugin, settings: &DestinationSettings) -> anyhow::Result<()> {
    let mut instance = plugin
        .instance()
        .map_err(|e| anyhow::anyhow!("{plugin} {e} while starting"))?;
    let verdict = instance
        .validate_settings(settings.public_json())
        .map_err(|e| anyhow::anyhow!("{plugin} {e} while validating settings"))?;
    if let Err(errors) = verdict {
        let problems: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.name, e.reason)).collect();
        bail!("invalid settings for {plugin}: {}", problems.join("; "));
    }
    Ok(())
}

fn dlq(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List { spool, limit } => {
            let spool = Spool::open(&spool, Durability::ProcessCrash)?;
            let stdout = io::stdout();
            let mut out = stdout.lock();
            for row in spool.dead(limit)? {
                serde_json::to_writer(&mut out, &row)?;
                io::Write::write_all(&mut out, b"\n")?;
            }
        }
        DlqCommand::Replay { spool, ids } => {
            let n = Spool::open(&spool, Durability::ProcessCrash)?.replay(&ids)?;
            println!("{n} dead letters put back to be delivered");
        }
        DlqCommand::Purge { spool, ids } => {
            let n = Spool::open(&spool, Durability::ProcessCrash)?.purge(&ids)?;
            println!("{n} dead letters deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}
