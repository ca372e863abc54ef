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
