//! What `serve` promises whichever log keeps its events: each test body
//! here runs twice, on the SQLite spool and on a NATS JetStream stream (a
//! single real `nats-server`; replication has its own tests in `stream`).
//! Real processes throughout: `cdp-host serve`, the sandbox over loopback
//! HTTP, real clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use klaviyo_mock::{DEMO_KEY, Faults, KlaviyoMock, MockConfig};
use serde_json::{Value, json};

use crate::cli_map::tempdir;
use crate::nats::Cluster;
use crate::support::{ConsoleSession, cdp_host};

const ADMIN: &str = "admin-token-for-the-backend-tests";

/// Where `serve` keeps its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Spool,
    Stream,
}

/// Each named test body, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn spool() {
                    super::$name(super::Backend::Spool).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn stream() {
                    super::$name(super::Backend::Stream).await;
                }
            }
        )*
    };
}

on_both_backends!(
    a_failing_shop_does_not_hold_up_another,
    a_paused_shop_holds_its_events_in_order_and_no_one_elses,
    idle_connections_hold_no_engines,
    deleting_a_shop_delivers_its_backlog_first,
    a_backlog_of_large_events_holds_memory_bounded_in_bytes,
    dead_letters_read_the_same_and_are_replayed_and_purged,
    a_swap_under_traffic_reaches_its_shop_alone_and_loses_nothing,
    the_console_shows_each_event_and_replays_its_dead_letters,
);

/// `serve` on a backend, with the connections of `config` (TOML).
struct Host {
    child: Child,
    url: String,
    dir: PathBuf,
    _nats: Option<Cluster>,
}

impl Host {
    fn start(backend: Backend, dir: &Path, config: &str) -> Host {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config_file = dir.join("serve.toml");
        std::fs::write(&config_file, config).unwrap();
        let mut command = cdp_host();
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&config_file)
            .arg("--spool")
            .arg(dir.join("spool.sqlite"))
            .args(["--max-attempts", "50", "--no-pacing", "--admin-token", ADMIN])
            .env("SHOP_KEY", DEMO_KEY)
            .env("RUST_LOG", "info")
            .env_remove("KLAVIYO_API_KEY");
        let nats = match backend {
            Backend::Spool => None,
            Backend::Stream => {
                let nats = Cluster::single(dir.join("nats"));
                command.args(["--stream", &nats.urls(), "--stream-replicas", "1"]);
                Some(nats)
            }
        };
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let host = Host {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            _nats: nats,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not start: {}", host.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sends events to `/v1/batch` with a write key, 500 at a time; each
    /// batch must be acknowledged.
    async fn send(&self, write_key: &str, events: &[Value]) {
        let client = reqwest::Client::new();
        for chunk in events.chunks(500) {
            let answer = client
                .post(format!("{}/v1/batch", self.url))
                .basic_auth(write_key, Some(""))
                .header("content-type", "application/json")
                .body(json!({ "batch": chunk }).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
        }
    }

    async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        self.admin_with(method, path, Vec::new()).await
    }

    async fn admin_with(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, String) {
        let answer = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    /// Each connection's plugin version, from the admin API.
    async fn versions(&self) -> std::collections::BTreeMap<String, String> {
        let (status, listed) = self.admin(reqwest::Method::GET, "/admin/connections").await;
        assert_eq!(status, 200, "{listed}");
        let listed: Value = serde_json::from_str(&listed).unwrap();
        listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let version = c["plugin"]["version"].as_str().unwrap().to_string();
                (c["id"].as_str().unwrap().to_string(), version)
            })
            .collect()
    }

    /// `cdp-host dlq ARGS` on this host's log; its output, which must be
    /// a success.
    fn dlq(&self, args: &[&str]) -> String {
        let mut command = cdp_host();
        command.arg("dlq").args(args);
        match &self._nats {
            None => command.arg("--spool").arg(self.dir.join("spool.sqlite")),
            Some(nats) => command.args(["--stream", &nats.urls()]),
        };
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// The dead letters `dlq list` prints.
    fn letters(&self) -> Vec<Value> {
        self.dlq(&["list"])
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// A metric's value, summed over its series.
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Its threads now, and those of them that map events (the mapping
    /// pool's, named `mapping-*`), by their names (Linux).
    fn threads(&self) -> (usize, usize) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return (0, 0);
        };
        let names: Vec<String> = tasks
            .flatten()
            .map(|task| std::fs::read_to_string(task.path().join("comm")).unwrap_or_default())
            .collect();
        let mapping = names.iter().filter(|name| name.starts_with("mapping")).count();
        (names.len(), mapping)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[[connections]]` entry: the shop's write key is `wk_<id>`.
fn shop(id: &str, sandbox: &KlaviyoMock) -> String {
    format!(
        "[[connections]]\nid = \"{id}\"\nwrite_keys = [\"wk_{id}\"]\nbase_url = \"{}\"\nsettings = {{ api_key = {{ env = \"SHOP_KEY\" }} }}\n\n",
        sandbox.url()
    )
}

/// A track event of person `person`, numbered `seq` in their sequence.
fn track(shop: &str, person: usize, seq: usize) -> Value {
    json!({"type": "track", "event": "Order Completed", "messageId": format!("{shop}-{person}-{seq}"),
           "userId": format!("{shop}-p{person}"), "properties": {"email": format!("{shop}-p{person}@example.org"), "seq": seq}})
}

async fn wait_for(what: &str, within: Duration, host: &Host, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// A Klaviyo that answers every request with a 5xx.
fn failing_every_request() -> MockConfig {
    MockConfig {
        faults: Faults {
            server_errors: 1.0,
            ..Faults::default()
        },
        ..unlimited()
    }
}

/// A sandbox that refuses (a 400) any event carrying "refused-here",
/// until its faults are cleared.
async fn refusing_sandbox() -> KlaviyoMock {
    crate::support::sandbox(MockConfig {
        faults: Faults {
            invalid_marker: Some("refused-here".into()),
            ..Faults::default()
        },
        ..unlimited()
    })
    .await
}

fn unlimited() -> MockConfig {
    MockConfig {
        rate_limits: false,
        ..MockConfig::default()
    }
}

/// Shop X's Klaviyo answers every request with a 5xx, and X has more
/// events than its engine may hold (so some wait outside it); shop Y's
/// events are delivered all the same, at once.
async fn a_failing_shop_does_not_hold_up_another(backend: Backend) {
    let dir = tempdir();
    let failing = crate::support::sandbox(failing_every_request()).await;
    let healthy = crate::support::sandbox(unlimited()).await;
    let host = Host::start(
        backend,
        &dir,
        &format!("{}{}", shop("x", &failing), shop("y", &healthy)),
    );
    let x_events: Vec<Value> = (0..3_000).map(|i| track("x", i % 300, i / 300)).collect();
    host.send("wk_x", &x_events).await;
    // X's engine is full and retrying.
    wait_for("X's requests failing", Duration::from_secs(60), &host, async || {
        failing.stats().requests >= 100
    })
    .await;
    let y_events: Vec<Value> = (0..16).map(|i| track("y", i, 0)).collect();
    host.send("wk_y", &y_events).await;
    let took = wait_for("Y's 16 events delivered", Duration::from_secs(10), &host, async || {
        healthy.events().len() == 16
    })
    .await;
    eprintln!("{backend:?}: shop Y's 16 events delivered {took:?} after they were sent, while shop X failed");
}

/// Shop A is paused with 600 events of one person, then resumed: they
/// are delivered in order, before the person's later events; while A is
/// paused, shop B's events go on.
async fn a_paused_shop_holds_its_events_in_order_and_no_one_elses(backend: Backend) {
    let dir = tempdir();
    let a = crate::support::sandbox(unlimited()).await;
    let b = crate::support::sandbox(unlimited()).await;
    let host = Host::start(backend, &dir, &format!("{}{}", shop("a", &a), shop("b", &b)));
    let (status, body) = host.admin(reqwest::Method::POST, "/admin/connections/a/pause").await;
    assert_eq!(status, 200, "{body}");
    let held: Vec<Value> = (0..600).map(|seq| track("a", 0, seq)).collect();
    host.send("wk_a", &held).await;
    let b_events: Vec<Value> = (0..16).map(|i| track("b", i, 0)).collect();
    host.send("wk_b", &b_events).await;
    wait_for(
        "B's 16 events delivered while A is paused",
        Duration::from_secs(10),
        &host,
        async || b.events().len() == 16,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.events().is_empty(), "a paused shop's events were delivered");
    let (status, body) = host.admin(reqwest::Method::POST, "/admin/connections/a/resume").await;
    assert_eq!(status, 200, "{body}");
    let later: Vec<Value> = (600..610).map(|seq| track("a", 0, seq)).collect();
    host.send("wk_a", &later).await;
    wait_for(
        "A's 610 events delivered after resume",
        Duration::from_secs(60),
        &host,
        async || a.events().len() >= 610,
    )
    .await;
    let order: Vec<i64> = a
        .events()
        .iter()
        .map(|e| e.properties["seq"].as_i64().unwrap())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 610, "each event once");
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "one person's events out of order: {:?}",
        order.windows(2).find(|w| w[0] >= w[1])
    );
}

/// Twenty shops with one event each: their events are mapped on the
/// host's one mapping pool (a worker per core, however many shops are
/// busy), and once delivered and idle for the engine's idle time, no
/// engine runs and no thread was added for them. (Counted by name: the
/// runtime's own pool of blocking threads comes and goes on a timer of its
/// own.)
async fn idle_connections_hold_no_engines(backend: Backend) {
    let dir = tempdir();
    let sandbox = crate::support::sandbox(unlimited()).await;
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let config: String = ids.iter().map(|id| shop(id, &sandbox)).collect();
    let host = Host::start(backend, &dir, &config);
    let (before, pool) = host.threads();
    let cores = std::thread::available_parallelism().map_or(2, usize::from).max(2);
    assert_eq!(pool, cores, "the mapping pool: a worker per core, from the start");
    for id in &ids {
        host.send(&format!("wk_{id}"), &[track(id, 0, 0)]).await;
    }
    wait_for("20 events delivered", Duration::from_secs(30), &host, async || {
        sandbox.events().len() == 20
    })
    .await;
    let (busy, busy_mapping) = host.threads();
    assert_eq!(busy_mapping, cores, "twenty busy shops share the pool's workers");
    let took = wait_for("every engine stopped", Duration::from_secs(30), &host, async || {
        host.metric("cdp_engines_running").await == 0.0
    })
    .await;
    assert_eq!(host.threads().1, cores, "no mapping thread added or left for the shops");
    eprintln!(
        "{backend:?}: threads before events {before}, while delivering {busy} ({busy_mapping} mapping), {} once idle ({took:?} after delivery)",
        host.threads().0
    );
}

/// A shop paused with a backlog, then deleted: it takes no more events,
/// delivers the ones it has, and only then is gone.
async fn deleting_a_shop_delivers_its_backlog_first(backend: Backend) {
    let dir = tempdir();
    let a = crate::support::sandbox(unlimited()).await;
    let host = Host::start(backend, &dir, &shop("a", &a));
    let (status, body) = host.admin(reqwest::Method::POST, "/admin/connections/a/pause").await;
    assert_eq!(status, 200, "{body}");
    let backlog: Vec<Value> = (0..200).map(|i| track("a", i % 20, i / 20)).collect();
    host.send("wk_a", &backlog).await;
    let (status, body) = host.admin(reqwest::Method::DELETE, "/admin/connections/a").await;
    assert_eq!(status, 202, "{body}");
    wait_for("the deleted shop gone", Duration::from_secs(60), &host, async || {
        host.admin(reqwest::Method::GET, "/admin/connections/a").await.0 == 404
    })
    .await;
    let delivered: std::collections::BTreeSet<String> = a.events().iter().map(|e| e.unique_id.clone()).collect();
    assert_eq!(
        delivered.len(),
        200,
        "a deleted shop's backlog was not delivered before it was removed"
    );
}

/// #25 item 6: a backlog of events of about 1 MB each (10 strings of
/// 99 KB, under Klaviyo's per-string limit, so each is mapped and sent
/// whole) against a Klaviyo that fails every request. Each arrives as a
/// ~1 KB gzip. The engine holds them in flight, retrying; the host's
/// memory must stay bounded by bytes, not by the count of events (which
/// let 1,000 such events take 1.65 GB). 200 here (686 MiB on the spool,
/// 464 MiB on the stream before the bound; 147 and 142 after); with 1,000,
/// 145 and 140 MiB.
async fn a_backlog_of_large_events_holds_memory_bounded_in_bytes(backend: Backend) {
    const EVENTS: usize = 200;
    let dir = tempdir();
    let failing = crate::support::sandbox(failing_every_request()).await;
    let host = Host::start(backend, &dir, &shop("big", &failing));
    let client = reqwest::Client::new();
    let blob = "x".repeat(99_000);
    for i in 0..EVENTS {
        let mut properties = serde_json::Map::new();
        properties.insert("email".into(), json!(format!("big-p{}@example.org", i % 50)));
        for k in 0..10 {
            properties.insert(format!("blob{k}"), json!(format!("{i}-{blob}")));
        }
        let event = json!({"type": "track", "event": "Big", "messageId": format!("big-{i}"),
                           "userId": format!("big-p{}", i % 50), "properties": properties});
        let body = crate::serve::gzip(event.to_string().as_bytes());
        let answer = client
            .post(format!("{}/api/s/s2s/track", host.url))
            .header("x-write-key", "wk_big")
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    }
    // The engine full and retrying, the rest of the backlog behind.
    wait_for("requests failing", Duration::from_secs(60), &host, async || {
        failing.stats().requests >= 100
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", host.child.id())).unwrap();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let (peak, now) = (kib("VmHWM:") / 1024, kib("VmRSS:") / 1024);
    eprintln!(
        "{backend:?}: {EVENTS} events of 1 MB in flight against a failing Klaviyo: RSS {now} MiB, peak {peak} MiB"
    );
    assert!(
        peak < 300,
        "{backend:?}: peak RSS {peak} MiB with {EVENTS} events of 1 MB"
    );
}

/// Events Klaviyo refuses (a 400 no retry can mend) become dead letters,
/// which read the same from either log: connection, message id, version,
/// reason, the request with its key masked, Klaviyo's answer, the event.
/// One replayed once Klaviyo takes it is delivered; the rest are purged.
async fn dead_letters_read_the_same_and_are_replayed_and_purged(backend: Backend) {
    let dir = tempdir();
    let sandbox = refusing_sandbox().await;
    let host = Host::start(backend, &dir, &shop("a", &sandbox));
    let refused = |person| {
        let mut event = track("a", person, 0);
        event["properties"]["note"] = json!("refused-here");
        event
    };
    host.send("wk_a", &[refused(0), refused(1), track("a", 2, 0)]).await;
    wait_for("two dead letters", Duration::from_secs(60), &host, async || {
        host.letters().len() == 2
    })
    .await;
    let letters = host.letters();
    for letter in &letters {
        assert_eq!(letter["connection"], "a", "{letter}");
        assert!(letter["message_id"].as_str().unwrap().starts_with("a-"), "{letter}");
        assert_eq!(letter["event"]["messageId"], letter["message_id"], "{letter}");
        assert!(
            letter["plugin_version"].as_str().unwrap().starts_with("klaviyo@"),
            "{letter}"
        );
        assert!(!letter["reason"].as_str().unwrap().is_empty(), "{letter}");
        assert_eq!(letter["response"]["status"], 400, "{letter}");
        assert!(
            letter["request"]["url"].as_str().unwrap().ends_with("/api/events"),
            "{letter}"
        );
        assert!(!letter.to_string().contains(DEMO_KEY), "the key in {letter}");
    }
    assert_eq!(sandbox.events().len(), 1, "the one Klaviyo took");

    // Klaviyo takes it now: one letter replayed is delivered, and leaves
    // the list; the other is purged.
    sandbox.set_faults(Faults::default());
    let first = letters[0]["id"].to_string();
    assert!(host.dlq(&["replay", "--id", &first]).starts_with("1 dead letters"));
    wait_for(
        "the replayed letter delivered",
        Duration::from_secs(60),
        &host,
        async || sandbox.events().len() == 2,
    )
    .await;
    assert!(
        sandbox
            .events()
            .iter()
            .any(|e| Some(e.unique_id.as_str()) == letters[0]["message_id"].as_str()),
        "{:?}",
        sandbox.events()
    );
    let left = host.letters();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["message_id"], letters[1]["message_id"]);
    assert!(host.dlq(&["purge"]).starts_with("1 dead letters"));
    assert!(host.letters().is_empty());
}

/// A new plugin version put on one shop while both shops' events flow:
/// every event of both is delivered once, each person's in order; only
/// that shop runs the new version, and a rollback brings the old one back.
async fn a_swap_under_traffic_reaches_its_shop_alone_and_loses_nothing(backend: Backend) {
    let dir = tempdir();
    let sandbox = crate::support::sandbox(unlimited()).await;
    let host = Host::start(
        backend,
        &dir,
        &format!("{}{}", shop("a", &sandbox), shop("b", &sandbox)),
    );
    let (status, stored) = host
        .admin_with(
            reqwest::Method::PUT,
            "/admin/plugins",
            std::fs::read(plugin_fixtures::KLAVIYO_V2).unwrap(),
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    let stored: Value = serde_json::from_str(&stored).unwrap();
    let sha = stored["stored"]["sha256"].as_str().unwrap().to_string();
    for round in 0..10 {
        if round == 5 {
            let swap = json!({ "sha256": sha }).to_string().into_bytes();
            let (status, body) = host
                .admin_with(reqwest::Method::POST, "/admin/connections/a/plugin", swap)
                .await;
            assert_eq!(status, 200, "{body}");
        }
        for id in ["a", "b"] {
            let events: Vec<Value> = (0..20)
                .map(|person| track(id, person % 4, round * 5 + person / 4))
                .collect();
            host.send(&format!("wk_{id}"), &events).await;
        }
    }
    wait_for("400 events delivered", Duration::from_secs(60), &host, async || {
        sandbox.events().len() >= 400
    })
    .await;
    let mut seen = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for event in sandbox.events() {
        let person = event.unique_id.rsplit_once('-').unwrap().0.to_string();
        seen.entry(person)
            .or_default()
            .push(event.properties["seq"].as_i64().unwrap());
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
    for (person, order) in &seen {
        assert_eq!(order, &(0..50).collect::<Vec<_>>(), "{person}: once each, in order");
    }
    let versions = host.versions().await;
    assert_eq!((versions["a"].as_str(), versions["b"].as_str()), ("1.0.0+v2", "1.0.0"));
    let (status, body) = host.admin(reqwest::Method::POST, "/admin/connections/a/rollback").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(host.versions().await["a"], "1.0.0");
}

/// The console (over plain HTTP here; its browser test is `console`):
/// counts, one event's masked request and Klaviyo's answer, a dead letter
/// listed and replayed through it, the same on either backend.
async fn the_console_shows_each_event_and_replays_its_dead_letters(backend: Backend) {
    let dir = tempdir();
    let sandbox = refusing_sandbox().await;
    let host = Host::start(backend, &dir, &shop("a", &sandbox));
    let mut refused = track("a", 9, 0);
    refused["properties"]["note"] = json!("refused-here");
    host.send("wk_a", &[track("a", 1, 0), track("a", 2, 0), track("a", 3, 0), refused])
        .await;
    let console = ConsoleSession::sign_in(&host.url, ADMIN).await;
    wait_for("the counts", Duration::from_secs(60), &host, async || {
        let (_, live) = console.get("/console/live.json").await;
        let live: Value = serde_json::from_str(&live).unwrap();
        live["connections"]["a"]["delivered"] == 3 && live["connections"]["a"]["dead_lettered"] == 1
    })
    .await;

    let (status, page) = console.get("/console/connections/a?q=a-2-0").await;
    assert_eq!(status, 200);
    assert!(page.contains("data-message-id=\"a-2-0\""), "{page}");
    assert!(
        !page.contains("data-message-id=\"a-1-0\""),
        "the search shows only that event"
    );
    assert!(
        page.contains("Klaviyo-API-Key ***") && page.contains("Answer: HTTP 202"),
        "{page}"
    );
    let (_, by_person) = console.get("/console/connections/a?q=a-p3@example.org").await;
    assert!(by_person.contains("data-message-id=\"a-3-0\""), "by email");
    let (_, dead) = console.get("/console/connections/a?outcome=dead-lettered").await;
    assert!(dead.contains("data-message-id=\"a-9-0\"") && !dead.contains("a-2-0"));

    let (status, letters) = console.get("/console/dead-letters?connection=a").await;
    assert_eq!(status, 200);
    assert!(letters.contains("a-9-0") && letters.contains("HTTP 400"), "{letters}");
    for page in [&page, &letters] {
        assert!(!page.contains(DEMO_KEY), "the key reached the console");
    }
    let id = host.letters()[0]["id"].to_string();
    let token = crate::support::csrf(&letters);
    // Without the session's token, or unconfirmed, nothing happens.
    let form = |csrf: &'static str| [("csrf", csrf), ("confirm", "yes")];
    assert_eq!(console.post("/console/dead-letters/replay", &form("forged")).await, 403);
    let unconfirmed = [("csrf", token.as_str()), ("id", id.as_str())];
    assert_eq!(console.post("/console/dead-letters/replay", &unconfirmed).await, 400);
    assert_eq!(host.letters().len(), 1);

    sandbox.set_faults(Faults::default());
    let replay = [("csrf", token.as_str()), ("id", id.as_str()), ("confirm", "yes")];
    assert_eq!(console.post("/console/dead-letters/replay", &replay).await, 303);
    wait_for(
        "the replayed letter delivered",
        Duration::from_secs(60),
        &host,
        async || sandbox.events().iter().any(|e| e.unique_id == "a-9-0"),
    )
    .await;
    assert!(host.letters().is_empty());
    wait_for(
        "the replay in the console",
        Duration::from_secs(30),
        &host,
        async || {
            let (_, page) = console.get("/console/connections/a?q=a-9-0&outcome=delivered").await;
            page.contains("data-message-id=\"a-9-0\"")
        },
    )
    .await;
}
