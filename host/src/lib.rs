//! The reference host for Chord CDP destination plugins: the `cdp-host`
//! binary (its command line in `cli/`) and what ships in it (`bundled`).
//! The work is done by three crates, each using only the ones before it,
//! as the compiler holds:
//!
//! 1. `plugin-runtime`: loading, sandboxing, pooling and swapping plugins.
//! 2. `cdp-core`: the library that maps and delivers (`settings`,
//!    `mapping`, `shown`, `dry_run`, `delivery`).
//! 3. `cdp-service`: the service (`spool`, `serve`, `canary`).
//!
//! Their modules are re-exported here under the names they always had.

pub mod bundled;

pub use cdp_core::{delivery, dry_run, mapping, settings, shown};
pub use cdp_service::{serve, spool};
