//! The commands of `cdp-host`, one module each, over what they share:
//! the plugin runtime, loading the plugin and its settings.

pub mod args;
mod dead_letters;
#[cfg(feature = "sandbox")]
pub mod demo;
pub mod map;
mod progress;
pub mod send;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use cdp_host::bundled;
use cdp_host::settings::DestinationSettings;
use plugin_runtime::{Plugin, PluginSlot, Runtime, RuntimeConfig, Use};

use args::{PluginArgs, RuntimeArgs};

/// The plugin runtime, sized for `concurrency` calls at once.
pub fn runtime(args: &RuntimeArgs, concurrency: usize) -> anyhow::Result<Arc<Runtime>> {
    let config = RuntimeConfig {
        limits: args.limits(),
        concurrency: concurrency as u32,
        cache_dir: if args.no_cache {
            None
        } else {
            args.cache_dir.clone().or_else(default_cache_dir)
        },
        // For profiling a plugin with `perf`; see BENCHMARKS.md.
        perf_map: std::env::var_os("CDP_HOST_PERF_MAP").is_some(),
    };
    Ok(Runtime::new(config)?)
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

/// The plugin at `path`, or the bundled Klaviyo plugin.
pub fn load_plugin(runtime: &Arc<Runtime>, path: Option<&Path>) -> anyhow::Result<Arc<Plugin>> {
    let plugin = match path {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
            runtime.load(&bytes, &path.display().to_string())?
        }
        None => runtime.load(bundled::KLAVIYO, "the bundled Klaviyo plugin")?,
    };
    Ok(Arc::new(plugin))
}

/// Loads the plugin and settings, refusing settings the plugin rejects.
pub fn load_destination(
    runtime: &Arc<Runtime>,
    args: &PluginArgs,
) -> anyhow::Result<(Arc<PluginSlot>, DestinationSettings)> {
    let plugin = load_plugin(runtime, args.plugin.as_deref())?;
    let settings = DestinationSettings::load(
        args.settings.as_deref(),
        plugin.manifest(),
        secret_defaults(args.plugin.as_deref()),
    )?;
    Ok((slot(plugin, &settings)?, settings))
}

/// A slot serving `plugin` with `settings`, once the plugin accepts them.
pub fn slot(plugin: Arc<Plugin>, settings: &DestinationSettings) -> anyhow::Result<Arc<PluginSlot>> {
    let mut instance = plugin
        .pool()
        .checkout(&plugin, Use::Mapping)
        .map_err(|e| anyhow::anyhow!("{plugin} {e} while starting"))?;
    let verdict = instance
        .validate_settings(settings.public_json())
        .map_err(|e| anyhow::anyhow!("{plugin} {e} while validating settings"))?;
    if let Err(errors) = verdict {
        let problems: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.name, e.reason)).collect();
        bail!("invalid settings for {plugin}: {}", problems.join("; "));
    }
    drop(instance);
    Ok(PluginSlot::new(plugin, bundled::canary(settings)))
}

/// The secret defaults of the plugin at `path`: the bundled plugin's when
/// there is none, otherwise none at all.
pub fn secret_defaults(path: Option<&Path>) -> cdp_host::settings::SecretDefaults<'static> {
    match path {
        None => bundled::SECRET_DEFAULTS,
        Some(_) => &[],
    }
}

pub fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
