//! What the service's own tests share: the plugin runtime, a directory of
//! their own, a shop's stand-in, and events with a person and a number.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use klaviyo_mock::{Faults, KlaviyoMock, MockConfig};
use plugin_runtime::{Runtime, RuntimeConfig};
use serde_json::json;

pub(crate) fn runtime() -> &'static Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::new(RuntimeConfig {
            concurrency: 8,
            cache_dir: Some(std::env::temp_dir().join("cdp-host-engine-tests")),
            ..RuntimeConfig::default()
        })
        .unwrap()
    })
}

/// A directory of its own, removed with it.
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cdp-host-engine-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A shop's Klaviyo stand-in on loopback, with these faults.
pub(crate) async fn sandbox(faults: Faults) -> KlaviyoMock {
    KlaviyoMock::start(
        MockConfig {
            rate_limits: false,
            faults,
            ..MockConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// An identify of person `person` setting their first name to `v<seq>`.
pub(crate) fn identify(person: usize, seq: usize) -> String {
    json!({"type": "identify", "messageId": format!("p{person}-{seq}"), "userId": format!("p{person}"),
           "traits": {"email": format!("p{person}@example.org"), "firstName": format!("v{seq}")}})
    .to_string()
}

/// A track of person `person` with `seq` among its properties.
pub(crate) fn track(person: usize, seq: usize) -> String {
    json!({"type": "track", "event": "Step", "messageId": format!("p{person}-{seq}"), "userId": format!("p{person}"),
           "properties": {"email": format!("p{person}@example.org"), "seq": seq}})
    .to_string()
}
