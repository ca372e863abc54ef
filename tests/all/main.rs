//! End-to-end tests through the host: the real Klaviyo component, loaded
//! by the real host (library or `cdp-host` binary).

mod cases;
mod cli_inspect;
mod cli_map;
mod cli_send;
mod delivery;
mod hostile;
mod hot_swap;
mod serve;
mod support;
