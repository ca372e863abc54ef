//! The reference host for Chord CDP destination plugins, as a library under
//! the `cdp-host` binary. The plugin runtime (loading, sandboxing, pooling,
//! swapping) is the `plugin-runtime` crate; this crate is what a host does
//! with it. An event flows down this list, and no module imports one above
//! it:
//!
//! 1. `settings`: the operator's settings for a destination, secrets apart.
//! 2. `mapping`: an event through the plugin's `map-event` into requests.
//! 3. `shown`: a request as a person may see it, secrets masked.
//! 4. `dry_run`: `cdp-host map`, the mapped requests printed.
//! 5. `delivery`: requests sent, answers judged by the plugin's `interpret`,
//!    verdicts carried out; every event ends delivered, skipped or with a
//!    dead letter (a value, handed back in its record).
//! 6. `spool` and `serve`: the service; events durable before they are
//!    acknowledged, and delivered from the spool.
//!
//! `bundled` holds what ships inside the binary: the Klaviyo plugin and the
//! example events and settings.

pub mod bundled;
pub mod delivery;
pub mod dry_run;
pub mod mapping;
pub mod serve;
pub mod settings;
pub mod shown;
pub mod spool;
