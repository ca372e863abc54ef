//! The one narrow wrapper around wasmtime that a CDP host needs to run
//! `chord:destination` plugins it did not write, in the spirit of Spin's
//! `crates/core`: it fixes the few choices that must be right and exposes
//! nothing else of wasmtime.
//!
//! - `runtime`: one `Engine` per process, with epoch interruption driven by
//!   a ticker thread, so every call has a deadline a loop cannot escape
//!   (epochs, not fuel: the check is cheaper, and a wall-clock deadline is
//!   what an operator sets); loading, with the interface-version check and
//!   a compile `cache`.
//! - `plugin`: a loaded version and its instances, each with a memory cap,
//!   WASI linked with nothing granted, and failures named in one sentence;
//!   `call_env`: the clocks and randomness a plugin sees, none of them real.
//! - `pool`: one pool of idle instances per version, for every caller.
//! - `slot`: the active version, swapped at runtime behind a canary.
//! - `output`, `egress`, `template`: what a plugin returns is checked
//!   before the host acts on it: request count and size, https URLs to
//!   declared hosts only (one egress policy), declared rate classes, and
//!   secrets named only through the one placeholder grammar.
//!
//! Errors are typed enums with one-sentence messages. The crate knows no
//! destination: Klaviyo appears nowhere in it.

mod bindings {
    wasmtime::component::bindgen!({
        world: "destination",
        path: "../wit",
    });
}

/// The optional `batching` interface (since 1.1), loaded from the same
/// instance as `destination` when a plugin exports it; the shared types are
/// the ones above.
mod batching_bindings {
    wasmtime::component::bindgen!({
        world: "batching-destination",
        path: "../wit",
        with: {
            "chord:destination/types": crate::bindings::chord::destination::types,
        },
    });
}

/// The optional `skip-codes` interface (since 1.2), the same way.
mod skip_codes_bindings {
    wasmtime::component::bindgen!({
        world: "skip-coding-destination",
        path: "../wit",
        with: {
            "chord:destination/types": crate::bindings::chord::destination::types,
        },
    });
}

pub mod batching;
mod cache;
mod call_env;
pub mod egress;
pub mod output;
mod plugin;
mod pool;
mod runtime;
mod slot;
pub mod template;

pub use batching_bindings::chord::destination::batch_types::{
    BatchClass, BatchItem, BatchVerdict, FollowUp, ItemDecision, ItemVerdict,
};
pub use bindings::chord::destination::types::{
    DestinationManifest, Header, HttpRequest, HttpResponse, Mapping, Outcome, RateClass, SettingError, SettingKind,
    SettingSpec, Verdict,
};
pub use egress::{EgressError, EgressPolicy};
pub use output::OutputError;
pub use plugin::{CallError, Instance, Plugin};
pub use pool::{Checkout, InstancePool, Use, Warmer, retire};
pub use runtime::{Limits, LoadError, Runtime, RuntimeConfig, RuntimeError, sha256_hex};
pub use slot::{Canary, Loaded, PluginSlot, SwapError, now_unix_ms};

/// The interface a plugin must export, and the major version this host speaks.
pub const INTERFACE: &str = "chord:destination/plugin";
/// The optional interface a batching plugin exports (since 1.1).
pub const BATCHING_INTERFACE: &str = "chord:destination/batching";
/// The optional interface naming a plugin's skip rules (since 1.2).
pub const SKIP_CODES_INTERFACE: &str = "chord:destination/skip-codes";
pub use skip_codes_bindings::exports::chord::destination::skip_codes::SkipCode;
pub const INTERFACE_MAJOR: u64 = 1;
