//! End-to-end tests through the host: the real Klaviyo component, loaded
//! by the real host (library or `cdp-host` binary).

mod backends;
mod batching;
mod cli_inspect;
mod cli_map;
mod cli_send;
mod connections;
mod console;
mod delivery;
mod faults;
mod hostile;
mod hot_swap;
#[path = "../support/nats.rs"]
mod nats;
mod properties;
mod serve;
#[path = "../support/spool.rs"]
mod spool_file;
mod stream;
mod stream_security;
mod support;
