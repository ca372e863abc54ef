//! `serve` for many shops: connections routed by write key, each with its
//! own key, settings, plugin version, dead letters and budget, changed
//! through the admin API under traffic, and kept across `kill -9`. Each
//! shop's Klaviyo is its own sandbox, which accepts only that shop's key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klaviyo_mock::{ApiKey, KlaviyoMock, MockConfig};
use serde_json::{Value, json};

use crate::cli_map::tempdir;
use crate::serve::{post, track, wait_for};
use crate::support::cdp_host;

pub(crate) const ADMIN: &str = "admin_connections_token";
const SCOPES: &[&str] = &[
    "events:write",
    "profiles:write",
    "profiles:read",
    "lists:write",
    "lists:read",
];

/// A sandbox that knows only `keys`.
pub(crate) async fn shop_sandbox(keys: &[&str], configure: impl FnOnce(&mut MockConfig)) -> KlaviyoMock {
    let mut config = MockConfig {
        keys: keys.iter().map(|k| ApiKey::new(k, SCOPES)).collect(),
        rate_limits: false,
        ..MockConfig::default()
    };
    configure(&mut config);
    crate::support::sandbox(config).await
}

pub(crate) struct Service {
    child: Child,
    pub(crate) url: String,
}

impl Service {
    pub(crate) fn start(config: &Path, spool: &Path, env: &[(&str, &str)]) -> Service {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = cdp_host();
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(config)
            .arg("--spool")
            .arg(spool)
            .args(["--max-attempts", "50", "--admin-token", ADMIN])
            .env_remove("KLAVIYO_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Service { child, url }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn admin(client: &reqwest::Client, method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = client.request(method, url).bearer_auth(ADMIN);
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

/// Stores a plugin version through the admin API; its SHA-256.
async fn store_plugin(client: &reqwest::Client, url: &str, file: &str) -> String {
    let stored = client
        .put(format!("{url}/admin/plugins"))
        .bearer_auth(ADMIN)
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status().as_u16(), 200);
    let stored: Value = serde_json::from_str(&stored.text().await.unwrap()).unwrap();
    stored["stored"]["sha256"].as_str().unwrap().to_string()
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// How many times each unique_id arrived at a sandbox.
fn arrived(sandbox: &KlaviyoMock) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for event in sandbox.events() {
        *counts.entry(event.unique_id).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shops_are_routed_by_write_key_each_with_its_key_settings_and_dead_letters() {
    let a = shop_sandbox(&["pk_shop_a"], |_| {}).await;
    let b = shop_sandbox(&["pk_shop_b"], |_| {}).await;
    let c = shop_sandbox(&["pk_shop_c"], |c| c.faults.invalid_marker = Some("REFUSE-ME".into())).await;
    let dir = tempdir();
    let key_file = write(&dir, "shop-c.key", "pk_shop_c\n");
    let config = write(
        &dir,
        "serve.toml",
        &format!(
            r#"
[[connections]]
id = "shop-a"
write_keys = ["wk_a"]
base_url = "{a}"
settings = {{ api_key = {{ env = "SHOP_A_KEY" }}, batching = "off" }}

[[connections]]
id = "shop-b"
write_keys = ["wk_b", "wk_shared"]
base_url = "{b}"
settings = {{ api_key = {{ env = "SHOP_B_KEY" }}, skip_events = ["Cart Viewed"] }}

[[connections]]
id = "shop-c"
write_keys = ["wk_c", "wk_shared"]
base_url = "{c}"
settings = {{ api_key = {{ file = "{key}" }} }}
"#,
            a = a.url(),
            b = b.url(),
            c = c.url(),
            key = key_file.display()
        ),
    );
    let spool = dir.join("spool.sqlite");
    let service = Service::start(
        &config,
        &spool,
        &[("SHOP_A_KEY", "pk_shop_a"), ("SHOP_B_KEY", "pk_shop_b")],
    );
    let client = reqwest::Client::new();
    let send = |key: &'static str, body: String| {
        let (client, url) = (client.clone(), service.url.clone());
        async move { post(&client, &url, "/api/s/s2s/track", Some(key), body).await.0 }
    };
    assert_eq!(send("wk_a", track("a1")).await, 200);
    assert_eq!(send("wk_b", track("b1")).await, 200);
    let skipped = json!({"event": "Cart Viewed", "messageId": "b-skip", "properties": {"email": "s@example.org"}});
    assert_eq!(send("wk_b", skipped.to_string()).await, 200);
    assert_eq!(send("wk_c", track("c1")).await, 200);
    let refused = json!({"event": "Order Completed", "messageId": "c-bad", "properties": {"email": "x@example.org", "note": "REFUSE-ME"}});
    assert_eq!(send("wk_c", refused.to_string()).await, 200);
    assert_eq!(send("wk_shared", track("both1")).await, 200);
    assert_eq!(send("wk_unknown", track("nobody")).await, 401);

    wait_for("each shop's events at its own Klaviyo", || {
        a.events().len() == 1 && b.events().len() == 2 && c.events().len() == 2
    })
    .await;
    let ids = |s: &KlaviyoMock| arrived(s).into_keys().collect::<Vec<_>>();
    assert_eq!(ids(&a), ["a1"]);
    assert_eq!(
        ids(&b),
        ["b1", "both1"],
        "shop-b skips Cart Viewed, and gets the shared source"
    );
    assert_eq!(ids(&c), ["both1", "c1"]);

    // shop-c's refused event is its dead letter, and only its.
    let dead_of = |connection: &str| {
        let output = cdp_host()
            .args(["dlq", "list", "--connection", connection, "--spool"])
            .arg(&spool)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_of("shop-c").is_empty() {
        assert!(Instant::now() < deadline, "shop-c's dead letter did not appear");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = dead_of("shop-c");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["message_id"], "c-bad");
    assert_eq!(dead[0]["connection"], "shop-c");
    assert!(dead_of("shop-a").is_empty() && dead_of("shop-b").is_empty());

    // The metrics are per connection, with bounded labels and no key.
    let metrics = crate::serve::metrics(&client, &service.url).await;
    assert!(
        metrics.contains("cdp_connection_events_total{connection=\"shop-b\",outcome=\"skipped\",type=\"track\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("cdp_connection_events_total{connection=\"shop-c\",outcome=\"dead_lettered\"} 1"));
    for secret in ["pk_shop_a", "pk_shop_b", "pk_shop_c", "wk_a", "wk_shared"] {
        assert!(!metrics.contains(secret), "{secret} in the metrics");
    }
    // The admin list names the secrets' sources, never their values.
    let (status, listed) = admin(
        &client,
        reqwest::Method::GET,
        format!("{}/admin/connections", service.url),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let text = listed.to_string();
    assert!(text.contains("SHOP_A_KEY") && !text.contains("pk_shop_a") && !text.contains("wk_a\""));
    assert_eq!(listed["connections"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_change_through_the_admin_api_under_traffic_and_survive_kill_9() {
    // Shop A's Klaviyo knows its old and its new key; shop B's only its own.
    let a = shop_sandbox(&["pk_a_old", "pk_a_new"], |_| {}).await;
    let b = shop_sandbox(&["pk_b"], |_| {}).await;
    let dir = tempdir();
    let a_key = write(&dir, "a.key", "pk_a_old");
    let config = write(
        &dir,
        "serve.toml",
        &format!(
            "approved_base_urls = [\"{}\"]\nadmin_secret_env_prefixes = [\"SHOP_\"]\nadmin_secret_dirs = [\"{}\"]\n\n[[connections]]\nid = \"shop-a\"\nwrite_keys = [\"wk_a\"]\nbase_url = \"{}\"\nsettings = {{ api_key = {{ file = \"{}\" }} }}\n",
            b.url(),
            dir.display(),
            a.url(),
            a_key.display()
        ),
    );
    let spool = dir.join("spool.sqlite");
    let env = [("SHOP_B_KEY", "pk_b")];
    let service = Service::start(&config, &spool, &env);
    let client = reqwest::Client::new();
    let url = service.url.clone();

    // Steady traffic to both shops' keys; (key, message id) of every 200.
    let acked: Arc<Mutex<Vec<(&'static str, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let base = Arc::new(Mutex::new(url.clone()));
    let sender = {
        let (client, acked, stop, base) = (client.clone(), acked.clone(), stop.clone(), base.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                for key in ["wk_a", "wk_b"] {
                    let id = format!("{key}-{n}");
                    let url = base.lock().unwrap().clone();
                    if post(&client, &url, "/api/s/s2s/track", Some(key), track(&id)).await.0 == 200 {
                        acked.lock().unwrap().push((key, id));
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Create shop B: its key is refused until then, routed after.
    let (status, created) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections"),
        Some(json!({"id": "shop-b", "write_keys": ["wk_b"], "base_url": b.url(),
                    "settings": {"api_key": {"env": "SHOP_B_KEY"}}})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    // A key given as a value is refused: secrets are bound to sources.
    let (status, refused) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections"),
        Some(json!({"id": "shop-x", "write_keys": ["wk_x"], "settings": {"api_key": "pk_literal"}})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        refused["error"].as_str().unwrap().contains("name its source"),
        "{refused}"
    );
    assert!(!refused.to_string().contains("pk_literal"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rotate shop A's key: a new file, named through the admin API.
    let new_key = write(&dir, "a-new.key", "pk_a_new");
    let (status, updated) = admin(
        &client,
        reqwest::Method::PATCH,
        format!("{url}/admin/connections/shop-a"),
        Some(json!({"settings": {"api_key": {"file": new_key.display().to_string()}}})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert!(!updated.to_string().contains("pk_a_"), "{updated}");
    // The old key is revoked at Klaviyo once the requests that had it are
    // answered: every request from the rotation on carries the new one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.revoke_key("pk_a_old");
    std::fs::write(&a_key, "pk_a_old, revoked").unwrap();

    // Pause shop B: its events are stored, not delivered, until resumed.
    let (status, _) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections/shop-b/pause"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during_pause = b.events().len();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(b.events().len(), during_pause, "a paused connection kept delivering");

    // kill -9 under traffic, and restart: the connection made through the
    // admin API, its pause and shop A's new key are kept.
    service.kill9();
    let service = Service::start(&config, &spool, &env);
    let url = service.url.clone();
    *base.lock().unwrap() = url.clone();
    let (_, listed) = admin(&client, reqwest::Method::GET, format!("{url}/admin/connections"), None).await;
    let states: BTreeMap<String, String> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c.id(), c["state"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([("shop-a".into(), "active".into()), ("shop-b".into(), "paused".into())])
    );
    let (status, _) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections/shop-b/resume"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Delete shop A under traffic: it drains, then is gone, and its key
    // is refused from then on.
    let (status, _) = admin(
        &client,
        reqwest::Method::DELETE,
        format!("{url}/admin/connections/shop-a"),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = admin(
            &client,
            reqwest::Method::GET,
            format!("{url}/admin/connections/shop-a"),
            None,
        )
        .await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "shop-a was not deleted after draining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    assert_eq!(
        post(&client, &url, "/api/s/s2s/track", Some("wk_a"), track("late"))
            .await
            .0,
        401
    );

    // Every acknowledged event arrived at its own shop's Klaviyo, once.
    let acked = acked.lock().unwrap().clone();
    let of = |key: &str| -> Vec<String> {
        acked
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, id)| id.clone())
            .collect()
    };
    let (to_a, to_b) = (of("wk_a"), of("wk_b"));
    assert!(
        to_a.len() > 50 && to_b.len() > 20,
        "{} to a, {} to b",
        to_a.len(),
        to_b.len()
    );
    wait_for("every acknowledged event at its shop", || {
        let (got_a, got_b) = (arrived(&a), arrived(&b));
        to_a.iter().all(|id| got_a.contains_key(id)) && to_b.iter().all(|id| got_b.contains_key(id))
    })
    .await;
    let (got_a, got_b) = (arrived(&a), arrived(&b));
    assert!(got_a.keys().all(|id| id.starts_with("wk_a")) && got_b.keys().all(|id| id.starts_with("wk_b")));
    assert_eq!(
        a.stats().rejected.get("401 authentication_failed"),
        None,
        "{:?}",
        a.stats()
    );
    assert!(b.stats().rejected.is_empty(), "{:?}", b.stats());
    drop(service);
}

/// `[[connections]]` for shops named `wk_{shop}`, all at `sandbox`, the
/// key from `$key_variable`, with `more` settings.
fn shops(names: &[&str], sandbox: &KlaviyoMock, key_variable: &str, more: &str) -> String {
    names
        .iter()
        .map(|shop| {
            format!(
                "[[connections]]\nid = \"{shop}\"\nwrite_keys = [\"wk_{shop}\"]\nbase_url = \"{}\"\nsettings = {{ api_key = {{ env = \"{key_variable}\" }}{more} }}\n\n",
                sandbox.url()
            )
        })
        .collect()
}

/// Each listed connection's plugin version.
fn versions_of(listed: &Value) -> BTreeMap<String, String> {
    listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c.id(), c["plugin"]["version"].as_str().unwrap().to_string()))
        .collect()
}

trait Id {
    fn id(&self) -> String;
}

impl Id for Value {
    fn id(&self) -> String {
        self["id"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_swap_reaches_one_connection_and_rolls_back_alone() {
    let sandbox = shop_sandbox(&["pk_canary"], |_| {}).await;
    let dir = tempdir();
    let config = write(
        &dir,
        "serve.toml",
        &shops(&["one", "two", "three"], &sandbox, "SHOP_KEY", ""),
    );
    let spool = dir.join("spool.sqlite");
    let service = Service::start(&config, &spool, &[("SHOP_KEY", "pk_canary")]);
    let client = reqwest::Client::new();
    let url = service.url.clone();

    let sha = store_plugin(&client, &url, plugin_fixtures::KLAVIYO_V2).await;
    let (status, swapped) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections/two/plugin"),
        Some(json!({"sha256": sha})),
    )
    .await;
    assert_eq!(status, 200, "{swapped}");

    for shop in ["one", "two", "three"] {
        let key = format!("wk_{shop}");
        assert_eq!(
            post(
                &client,
                &url,
                "/api/s/s2s/track",
                Some(&key),
                track(&format!("{shop}-1"))
            )
            .await
            .0,
            200
        );
    }
    wait_for("the three events", || sandbox.events().len() == 3).await;
    let (_, listed) = admin(&client, reqwest::Method::GET, format!("{url}/admin/connections"), None).await;
    let versions = versions_of(&listed);
    assert_eq!(versions["one"], "1.0.0");
    assert_eq!(versions["two"], "1.0.0+v2");
    assert_eq!(versions["three"], "1.0.0");
    let mapped_by = |id: &str| {
        listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c.id() == id)
            .unwrap()["plugin"]["events_mapped"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((mapped_by("one"), mapped_by("two"), mapped_by("three")), (1, 1, 1));

    // Each row records the version that mapped it.
    let spool_db = cdp_host::spool::Spool::open(&spool, cdp_host::spool::Durability::ProcessCrash).unwrap();
    let counts = spool_db.counts().unwrap();
    assert_eq!(counts["two"].delivered, 1);

    // A restart (kill -9) keeps each connection's version, the canary's
    // from the plugin store in the spool, and the one to roll back to.
    drop(spool_db);
    service.kill9();
    let service = Service::start(&config, &spool, &[("SHOP_KEY", "pk_canary")]);
    let url = service.url.clone();
    let (_, listed) = admin(&client, reqwest::Method::GET, format!("{url}/admin/connections"), None).await;
    let versions = versions_of(&listed);
    assert_eq!(versions["two"], "1.0.0+v2", "{listed}");
    assert_eq!(versions["one"], "1.0.0");
    assert_eq!(
        post(&client, &url, "/api/s/s2s/track", Some("wk_two"), track("two-2"))
            .await
            .0,
        200
    );
    wait_for("the event after the restart", || sandbox.events().len() == 4).await;

    let (status, back) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections/two/rollback"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["active"]["version"], "1.0.0");
    // A connection with no earlier version has nothing to roll back to.
    let (status, _) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections/one/rollback"),
        None,
    )
    .await;
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_with_one_key_stay_inside_its_one_budget() {
    // Klaviyo's limits on: 350 events a second per account.
    let sandbox = shop_sandbox(&["pk_shared_account"], |c| c.rate_limits = true).await;
    let dir = tempdir();
    let config = write(
        &dir,
        "serve.toml",
        &shops(&["north", "south"], &sandbox, "ACCOUNT_KEY", ", batching = \"off\""),
    );
    let spool = dir.join("spool.sqlite");
    let service = Service::start(&config, &spool, &[("ACCOUNT_KEY", "pk_shared_account")]);
    let client = reqwest::Client::new();
    // 500 events for each shop, at once: either alone stays under 350/s
    // only by its pacing, and together they would send twice that.
    for shop in ["north", "south"] {
        let batch: Vec<Value> = (0..500)
            .map(|i| {
                json!({"type": "track", "event": "Order Completed", "messageId": format!("{shop}-{i}"),
                            "properties": {"email": format!("{shop}{i}@example.org")}})
            })
            .collect();
        let response = client
            .post(format!("{}/v1/batch", service.url))
            .basic_auth(format!("wk_{shop}"), Some(""))
            .header("content-type", "application/json")
            .body(json!({"batch": batch}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    wait_for("the thousand events", || sandbox.events().len() == 1000).await;
    assert_eq!(
        sandbox.stats().throttled.values().sum::<u64>(),
        0,
        "one budget for one key: {:?}",
        sandbox.stats()
    );
}

/// A version keeps its idle instances while any connection serves it: a
/// store that closed the pool of the version its connections were created
/// on made every event start a fresh instance (13,000 events/s became 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_connections_serve_keeps_its_instances() {
    use cdp_host::serve::connections::{Connections, NewConnection};
    use cdp_host::serve::store::PluginStore;
    let dir = tempdir();
    let spool = Arc::new(
        cdp_host::spool::Spool::open(&dir.join("spool.sqlite"), cdp_host::spool::Durability::ProcessCrash).unwrap(),
    );
    // Its own runtime and plugin: closing a pool must not touch the
    // plugin other tests share.
    let runtime = plugin_runtime::Runtime::new(plugin_runtime::RuntimeConfig {
        cache_dir: Some(crate::support::cache_dir()),
        ..Default::default()
    })
    .unwrap();
    let plugin = Arc::new(runtime.load(cdp_host::bundled::KLAVIYO, "bundled klaviyo").unwrap());
    let store = PluginStore::new(plugin.runtime().clone(), spool.clone());
    store.keep(&plugin, cdp_host::bundled::KLAVIYO).unwrap();
    let connections = Connections::new(
        store,
        plugin.clone(),
        cdp_host::delivery::DeliveryConfig::default(),
        spool,
    )
    .unwrap();
    // Nothing serves the version yet: its idle instances are let go.
    connections.load_stored().unwrap();
    assert!(!plugin.pool().is_open());
    let mut settings = serde_json::Map::new();
    settings.insert("api_key".into(), json!({"env": "PATH"}));
    let new = NewConnection {
        id: "shop".into(),
        write_keys: vec!["wk".into()],
        plugin: None,
        settings,
        base_url: None,
        state: None,
    };
    connections.create(new, None).await.unwrap();
    assert!(
        plugin.pool().is_open(),
        "the version a connection serves must keep its instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_started_with_no_shop_takes_its_first_through_the_admin_api() {
    let sandbox = shop_sandbox(&["pk_first"], |_| {}).await;
    let dir = tempdir();
    let config = write(
        &dir,
        "serve.toml",
        &format!(
            "approved_base_urls = [\"{}\"]\nadmin_secret_env_prefixes = [\"FIRST_\"]\n",
            sandbox.url()
        ),
    );
    let service = Service::start(&config, &dir.join("spool.sqlite"), &[("FIRST_KEY", "pk_first")]);
    let client = reqwest::Client::new();
    let url = service.url.clone();
    assert_eq!(
        post(&client, &url, "/api/s/s2s/track", Some("wk_first"), track("f1"))
            .await
            .0,
        401
    );
    let (status, created) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections"),
        Some(
            json!({"id": "first", "write_keys": ["wk_first"], "base_url": sandbox.url(),
                    "settings": {"api_key": {"env": "FIRST_KEY"}}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        post(&client, &url, "/api/s/s2s/track", Some("wk_first"), track("f2"))
            .await
            .0,
        200
    );
    wait_for("the first shop's event", || sandbox.events().len() == 1).await;
}

/// Found by reading the admin API as an attacker holding the admin token
/// would: a connection made with a base_url of the caller's choosing, or on
/// a stored plugin that declares the caller's host, sent its secret (the
/// value of the named environment variable) there in the Authorization
/// header. Both are refused, and the listener at the attacker's address
/// never hears from the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_cannot_send_a_connections_secret_to_a_host_the_operator_did_not_approve() {
    let sandbox = shop_sandbox(&["pk_first"], |_| {}).await;
    let attacker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    attacker.set_nonblocking(true).unwrap();
    let attacker_url = format!("http://{}", attacker.local_addr().unwrap());
    let dir = tempdir();
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let config = write(
        &dir,
        "serve.toml",
        &format!(
            "approved_base_urls = [\"{}\"]\nadmin_secret_env_prefixes = [\"SHOP_\"]\nadmin_secret_dirs = [\"{}\"]\n",
            sandbox.url(),
            secrets.display()
        ),
    );
    let service = Service::start(
        &config,
        &dir.join("spool.sqlite"),
        &[
            ("OTHER_SHOPS_KEY", "pk_other_shops_secret"),
            ("SHOP_FIRST_KEY", "pk_first"),
        ],
    );
    let client = reqwest::Client::new();
    let url = service.url.clone();

    // A base URL of the caller's choosing.
    let (status, refused) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections"),
        Some(
            json!({"id": "exfil", "write_keys": ["wk_exfil"], "base_url": attacker_url,
                    "settings": {"api_key": {"env": "OTHER_SHOPS_KEY"}}}),
        ),
    )
    .await;
    assert_eq!(status, 403, "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains("not one the operator approved") && message.contains("--approve-base-url"),
        "{message}"
    );
    assert!(!message.contains("pk_other_shops_secret"), "{message}");

    // A stored plugin that declares the caller's host, on an approved URL.
    let sha = store_plugin(&client, &url, plugin_fixtures::FOREIGN_IMPOSTOR).await;
    let (status, refused) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections"),
        Some(json!({"id": "exfil2", "write_keys": ["wk_exfil2"], "plugin": sha,
                    "settings": {"api_key": {"env": "OTHER_SHOPS_KEY"}}})),
    )
    .await;
    assert_eq!(status, 403, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("declares host collector.evil.example"),
        "{refused}"
    );

    // A source the operator did not allow: another variable of the host,
    // a file outside the secrets directory (existing or not: one answer),
    // or a link out of it.
    std::os::unix::fs::symlink("/etc/hostname", secrets.join("link")).unwrap();
    let mut answers = Vec::new();
    for (n, source) in [
        json!({"env": "OTHER_SHOPS_KEY"}),
        json!({"file": "/etc/hostname"}),
        json!({"file": "/no/such/file"}),
        json!({"file": secrets.join("link").display().to_string()}),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, refused) = admin(
            &client,
            reqwest::Method::POST,
            format!("{url}/admin/connections"),
            Some(
                json!({"id": format!("exfil-source-{n}"), "write_keys": [format!("wk_source_{n}")],
                        "settings": {"api_key": source.clone()}}),
            ),
        )
        .await;
        assert_eq!(status, 403, "{source}: {refused}");
        answers.push(refused["error"].as_str().unwrap().to_string());
    }
    assert!(answers[0].contains("--admin-secret-env-prefix"), "{}", answers[0]);
    for answer in &answers[1..] {
        assert!(
            answer.contains("not inside a directory the operator allowed"),
            "{answer}"
        );
    }
    // An allowed source is taken.
    let (status, created) = admin(
        &client,
        reqwest::Method::POST,
        format!("{url}/admin/connections"),
        Some(json!({"id": "allowed", "write_keys": ["wk_allowed"],
                    "settings": {"api_key": {"env": "SHOP_FIRST_KEY"}}})),
    )
    .await;
    assert_eq!(status, 201, "{created}");

    // Nothing else was made, no other key routes, and the attacker heard nothing.
    for key in ["wk_exfil", "wk_exfil2", "wk_source_0", "wk_source_1"] {
        assert_eq!(
            post(&client, &url, "/api/s/s2s/track", Some(key), track("x")).await.0,
            401
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        attacker.accept().is_err(),
        "the host connected to the attacker's address"
    );
    service.kill9();
}
