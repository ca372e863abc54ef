//! What ships inside the `cdp-host` binary: the Klaviyo destination built
//! with it (by `build.rs`), used when no `--plugin` is given, and the
//! example Chord events and settings the demo sends.

use plugin_runtime::Canary;

use crate::settings::{DestinationSettings, SecretDefaults};

/// The Klaviyo destination plugin, a WebAssembly component.
pub const KLAVIYO: &[u8] = include_bytes!(env!("KLAVIYO_COMPONENT"));

/// Example Chord events: the demo sends them, and every plugin version
/// must map them all without a plugin failure (its canary).
pub const EXAMPLE_EVENTS: &str = include_str!("../../examples/events.ndjson");

/// The bundled plugin's one secret default: its `api_key` may come from
/// `$KLAVIYO_API_KEY` when the settings name no source. Any other plugin's
/// secrets come only from sources the operator names in its settings.
pub const SECRET_DEFAULTS: SecretDefaults<'static> = &[("api_key", "KLAVIYO_API_KEY")];

/// The settings the example events are sent with.
pub const EXAMPLE_SETTINGS: &str = include_str!("../../examples/settings.json");

/// The canary a version must pass to serve with `settings`: the example
/// events, mapped without a plugin failure.
pub fn canary(settings: &DestinationSettings) -> Canary {
    Canary {
        settings_json: settings.public_json().to_string(),
        golden_events: std::borrow::Cow::Borrowed(EXAMPLE_EVENTS),
    }
}
