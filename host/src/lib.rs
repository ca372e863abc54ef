//! The reference host for Chord CDP destination plugins: loads a
//! `chord:destination` WebAssembly component in a sandbox, maps events
//! through it, and (in later modules) delivers the requests it describes.

pub mod delivery;
pub mod dry_run;
pub mod mapper;
pub mod plugin;
pub mod sandbox;
pub mod serve;
pub mod settings;
pub mod spool;

/// Chord example events, bundled: the demo sends them, and a hot-swap
/// candidate must map them all without a plugin failure (its canary).
pub const EXAMPLE_EVENTS: &str = include_str!("../../examples/events.ndjson");
