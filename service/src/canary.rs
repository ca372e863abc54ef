//! The canary every plugin version must pass before it serves a
//! connection: Chord's example events, mapped without a plugin failure.

use cdp_core::settings::DestinationSettings;
use plugin_runtime::Canary;

/// Example Chord events: the demo sends them, and every plugin version
/// must map them all without a plugin failure (its canary).
pub const EXAMPLE_EVENTS: &str = include_str!("../../examples/events.ndjson");

/// The canary a version must pass to serve with `settings`: the example
/// events, mapped without a plugin failure.
pub fn canary(settings: &DestinationSettings) -> Canary {
    Canary {
        settings_json: settings.public_json().to_string(),
        golden_events: std::borrow::Cow::Borrowed(EXAMPLE_EVENTS),
    }
}
