//! `cdp-host`: the command line of the reference host.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use cdp_host::dry_run;
use cdp_host::mapper::EventMapper;
use cdp_host::plugin::{BUNDLED_KLAVIYO, Plugin, Runtime, RuntimeConfig};
use cdp_host::settings::DestinationSettings;

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
    /// Inspect plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
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

#[derive(Subcommand)]
enum PluginCommand {
    /// Print a plugin's manifest, interface version, SHA-256 and size.
    Inspect {
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CDP_HOST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(io::stderr)
        .init();
    let cli = Cli::parse();
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
