//! What a host does with a destination plugin, up to the requests sent:
//! the library that maps and delivers, under the service (`cdp-service`)
//! and the `cdp-host` binary. The plugin runtime (loading, sandboxing,
//! pooling, swapping) is the `plugin-runtime` crate. An event flows down
//! this list, and no module imports one below it:
//!
//! 1. `settings`: the operator's settings for a destination, secrets apart.
//! 2. `mapping`: an event through the plugin's `map-event` into requests,
//!    on one pool of workers.
//! 3. `shown`: a request as a person may see it, secrets masked.
//! 4. `dry_run`: `cdp-host map`, the mapped requests printed.
//! 5. `delivery`: requests sent, answers judged by the plugin's `interpret`,
//!    verdicts carried out; every event ends delivered, skipped or with a
//!    dead letter (a value, handed back in its record).
//!
//! Nothing here knows of a service: the compiler holds the direction, since
//! this crate depends on no crate of the service or the binary.

pub mod delivery;
pub mod dry_run;
pub mod mapping;
pub mod settings;
pub mod shown;
