//! The service (`cdp-host serve`): events durable before they are
//! acknowledged, and delivered from where they are kept. It uses the
//! library that maps and delivers (`cdp-core`) and is used by the
//! `cdp-host` binary; neither direction can be turned round, as the
//! compiler holds it.
//!
//! - `spool`: the SQLite spool, the single-host event log.
//! - `serve`: HTTP ingest and the admin API, the connections, one delivery
//!   engine per connection, and the event-log interface with its two
//!   backends (the spool, and NATS JetStream in `serve::stream`).
//! - `canary`: the events every plugin version must map before it serves.

pub mod canary;
pub mod serve;
pub mod spool;
