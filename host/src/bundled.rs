//! What ships inside the `cdp-host` binary: the Klaviyo destination built
//! with it (by `build.rs`), used when no `--plugin` is given, and the
//! example Chord events and settings the demo sends.

use cdp_core::settings::SecretDefaults;

/// The example events and the canary they make live with the service,
/// which checks every version with them.
pub use cdp_service::canary::{EXAMPLE_EVENTS, canary};

/// The Klaviyo destination plugin, a WebAssembly component.
pub const KLAVIYO: &[u8] = include_bytes!(env!("KLAVIYO_COMPONENT"));

/// The bundled plugin's one secret default: its `api_key` may come from
/// `$KLAVIYO_API_KEY` when the settings name no source. Any other plugin's
/// secrets come only from sources the operator names in its settings.
pub const SECRET_DEFAULTS: SecretDefaults<'static> = &[("api_key", "KLAVIYO_API_KEY")];

/// The settings the example events are sent with.
pub const EXAMPLE_SETTINGS: &str = include_str!("../../examples/settings.json");
