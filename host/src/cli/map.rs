//! `cdp-host map` (the dry run) and `cdp-host plugin inspect`.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cdp_host::dry_run;
use cdp_host::mapping::EventMapper;
use plugin_runtime::SettingKind;

use super::args::{MapArgs, RuntimeArgs};

pub fn map(runtime_args: &RuntimeArgs, args: MapArgs) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime(runtime_args, 1)?;
    let (slot, settings) = super::load_destination(&runtime, &args.plugin)?;
    let mut mapper = EventMapper::new(slot.clone(), settings.clone());
    if args.batch {
        mapper = mapper.with_batch_items();
    }
    // Block-buffered: stdout is line-buffered, and a flush per output line
    // cost a tenth of `map`'s time.
    let stdout = io::BufWriter::with_capacity(1 << 16, plain_stdout()?);
    let input: Box<dyn io::BufRead> = match args.input.as_deref() {
        None => Box::new(io::stdin().lock()),
        Some(path) if path == Path::new("-") => Box::new(io::stdin().lock()),
        Some(path) => {
            let file = File::open(path).with_context(|| format!("reading events {}", path.display()))?;
            // Large reads: a 225 KB event is one read, not 28.
            Box::new(BufReader::with_capacity(1 << 20, file))
        }
    };
    if args.batch {
        dry_run::run_batched(&mapper, &settings, &slot, input, stdout)?;
    } else {
        dry_run::run(&mapper, &settings, input, stdout)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Standard output without its line buffering. Even behind a `BufWriter`,
/// `Stdout` searches every block written through it for its last newline:
/// 3% of `map`'s time on a 225 KB event. On Unix the descriptor is
/// duplicated into a plain file; elsewhere `Stdout` is used as it is.
fn plain_stdout() -> anyhow::Result<Box<dyn io::Write>> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let fd = io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating standard output")?;
        Ok(Box::new(File::from(fd)))
    }
    #[cfg(not(unix))]
    Ok(Box::new(io::stdout().lock()))
}

pub fn inspect(runtime_args: &RuntimeArgs, file: &Path) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime(runtime_args, 1)?;
    let plugin = super::load_plugin(&runtime, Some(file))?;
    let manifest = plugin.manifest();
    let report = serde_json::json!({
        "file": file.display().to_string(),
        "interface": plugin.interface(),
        "batching": plugin.batches(),
        "skip_codes": plugin.skip_codes().iter().map(|c| serde_json::json!({
            "code": c.code,
            "reason_prefix": c.reason_prefix,
        })).collect::<Vec<_>>(),
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
                "kind": kind_name(s.kind),
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

/// The WIT name of a setting's kind.
fn kind_name(kind: SettingKind) -> &'static str {
    match kind {
        SettingKind::String => "string",
        SettingKind::Boolean => "boolean",
        SettingKind::StringList => "string-list",
    }
}
