//! `cargo bench -p cdp-host --bench connections`: `cdp-host serve` with
//! many connections, the sandbox and serve as separate processes. Three
//! runs, chosen by `BENCH_CONNECTIONS_MODE`:
//!
//! - `scale` (the default): `BENCH_CONNECTIONS` connections (1,000) of the
//!   bundled Klaviyo plugin, each with its own write key, from the config
//!   file. Reports the time from spawning `serve` to `/healthz` answering,
//!   on a new spool (connections created from the file) and on restart
//!   (loaded from the spool), then sends one event to every connection and
//!   reports the peak RSS (`VmHWM`) once all are delivered.
//! - `throughput`: `BENCH_EVENTS` events (50,000) of the generated Chord mix
//!   (`chord-corpus`, seed 1), split by person over `BENCH_ACTIVE`
//!   connections (100; run it with 1 too), stored in their order while the
//!   connections are paused (batches of 20 per connection, interleaved, as
//!   live traffic lands), then all resumed at once: the events a second
//!   from the resume to the last outcome. Sandbox limits off, no pacing.
//! - `isolation`: three healthy connections and a victim, all served by the
//!   test-only hostile plugin (which maps an ordinary event to one request),
//!   each fed `BENCH_RATE` events a second (200) of the mix for
//!   `BENCH_SECONDS` (20). Run once as it is, then with the victim's
//!   sandbox answering half its requests with 5xx and the victim fed
//!   `BENCH_POISON_PER_SECOND` (2) events on which the plugin loops until
//!   its deadline: the healthy connections' ingest-to-outcome p50/p99 in
//!   both runs, and the ratio.
//!
//! `BENCH_CONNECTIONS_BIN=PATH` runs that build of `cdp-host` as `serve`.
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{Killed, free_port, setting, wait_listening};

#[path = "../../tests/support/spool.rs"]
mod spool_file;

const ADMIN: &str = "bench_admin";
const KEY: &str = "pk_sandbox_demo";

fn sandbox(faults: &[&str]) -> (Killed, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cdp-host"))
        .args(["sandbox", "--listen", &format!("127.0.0.1:{port}"), "--no-rate-limits"])
        .args(faults)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    (Killed(child), format!("http://127.0.0.1:{port}"))
}

/// `[[connections]]` entries: (id, write key, base URL, state).
fn config(dir: &Path, entries: &[(String, String, String, &str)], plugin: Option<&str>) -> PathBuf {
    let mut text = String::new();
    for (id, key, url, state) in entries {
        text += &format!(
            "[[connections]]\nid = \"{id}\"\nwrite_keys = [\"{key}\"]\nbase_url = \"{url}\"\nstate = \"{state}\"\nsettings = {{ api_key = {{ env = \"BENCH_KLAVIYO_KEY\" }} }}\n"
        );
        if let Some(plugin) = plugin {
            text += &format!("plugin = \"{plugin}\"\n");
        }
        text += "\n";
    }
    let path = dir.join("serve.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts serve; the process, its URL, and how long until it answered.
fn serve(config: &Path, spool: &Path, extra: &[&str]) -> (Killed, String, Duration) {
    let port = free_port();
    let started = Instant::now();
    // `BENCH_CONNECTIONS_BIN=path` runs another build of cdp-host as
    // `serve` (a before to pair with an after); the sandbox stays this one.
    let binary = std::env::var("BENCH_CONNECTIONS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cdp-host").to_string());
    let child = Command::new(binary)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(config)
        .arg("--spool")
        .arg(spool)
        .args(["--no-pacing", "--ingest-rate", "0", "--admin-token", ADMIN])
        .args(extra)
        .env("BENCH_KLAVIYO_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut stream| {
            use std::io::{Read, Write};
            let _ = stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
        });
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "serve did not become ready");
        std::thread::sleep(Duration::from_millis(2));
    }
    (Killed(child), url, started.elapsed())
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The person an event is about, as the host keys it.
fn person(event: &Value) -> String {
    for key in [&event["userId"], &event["anonymousId"]] {
        if let Some(id) = key.as_str() {
            return id.to_string();
        }
    }
    event["properties"]["email"]
        .as_str()
        .or(event["traits"]["email"].as_str())
        .unwrap_or("")
        .to_string()
}

fn bucket(person: &str, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    person.hash(&mut hasher);
    (hasher.finish() % n as u64) as usize
}

async fn post_batch(client: &reqwest::Client, url: &str, key: &str, events: &[Value]) {
    let response = client
        .post(format!("{url}/v1/batch"))
        .basic_auth(key, Some(""))
        .header("content-type", "application/json")
        .body(json!({ "batch": events }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap());
}

async fn wait_drained(spool: &Path, connection: Option<&str>, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let pending = match connection {
            Some(id) => spool_file::pending_of(spool, id),
            None => spool_file::pending(spool),
        };
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{pending} events did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_julian_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2_440_587.5 * 86_400.0
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-connections-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    match std::env::var("BENCH_CONNECTIONS_MODE").as_deref() {
        Ok("throughput") => throughput(&dir).await,
        Ok("isolation") => isolation(&dir).await,
        _ => scale(&dir).await,
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn scale(dir: &Path) {
    let n = setting("BENCH_CONNECTIONS", 1000) as usize;
    let (_sandbox, url) = sandbox(&[]);
    let entries: Vec<_> = (0..n)
        .map(|i| (format!("shop-{i}"), format!("wk_{i}"), url.clone(), "active"))
        .collect();
    let config = config(dir, &entries, None);
    let spool = dir.join("spool.sqlite");

    let (first, _, created_in) = serve(&config, &spool, &[]);
    drop(first);
    let (serve, serve_url, loaded_in) = serve(&config, &spool, &[]);
    let pid = serve.0.id();
    let rss_ready = status_kib(pid, "VmRSS:");
    println!(
        "{n} connections: ready in {:.0} ms created from the config, {:.0} ms loaded from the spool; RSS when ready {:.1} MiB",
        created_in.as_secs_f64() * 1e3,
        loaded_in.as_secs_f64() * 1e3,
        rss_ready as f64 / 1024.0
    );

    // One event to every connection, 32 at a time.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..n {
        while posts.len() >= 32 {
            posts.join_next().await;
        }
        let (client, url) = (client.clone(), serve_url.clone());
        posts.spawn(async move {
            let event = json!({"type": "track", "event": "Order Completed", "messageId": format!("scale-{i}"),
                               "properties": {"email": format!("shopper{i}@example.org"), "value": 12.5}});
            post_batch(&client, &url, &format!("wk_{i}"), &[event]).await;
        });
    }
    while posts.join_next().await.is_some() {}
    wait_drained(&spool, None, Duration::from_secs(300)).await;
    let delivered = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "one event to each: all delivered in {:.1} s; peak RSS (VmHWM) {:.1} MiB, RSS now {:.1} MiB, threads now {}",
        delivered.as_secs_f64(),
        status_kib(pid, "VmHWM:") as f64 / 1024.0,
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "Threads:")
    );
}

async fn throughput(dir: &Path) {
    let active = setting("BENCH_ACTIVE", 100) as usize;
    let total = setting("BENCH_EVENTS", 50_000) as usize;
    let (sandbox_process, url) = sandbox(&[]);
    let entries: Vec<_> = (0..active)
        .map(|i| (format!("shop-{i}"), format!("wk_{i}"), url.clone(), "paused"))
        .collect();
    let config = config(dir, &entries, None);
    let spool = dir.join("spool.sqlite");
    let (serve, serve_url, _) = serve(&config, &spool, &[]);

    // The mix, split by person, stored while every connection is paused,
    // in the order it came (small batches per connection, interleaved), as
    // live traffic lands in the spool.
    let client = reqwest::Client::new();
    let mut pending: Vec<Vec<Value>> = vec![Vec::new(); active];
    for event in chord_corpus::generate(1, total) {
        let event: Value = serde_json::from_str(&event).unwrap();
        let shop = bucket(&person(&event), active);
        pending[shop].push(event);
        if pending[shop].len() == 20 {
            post_batch(
                &client,
                &serve_url,
                &format!("wk_{shop}"),
                &std::mem::take(&mut pending[shop]),
            )
            .await;
        }
    }
    for (shop, events) in pending.iter().enumerate().filter(|(_, e)| !e.is_empty()) {
        post_batch(&client, &serve_url, &format!("wk_{shop}"), events).await;
    }
    eprintln!("stored; resuming the {active} connections");
    let resumed = now_julian_seconds();
    let started = Instant::now();
    let cpu_before = [serve.0.id(), sandbox_process.0.id()].map(common::process_cpu);
    for i in 0..active {
        let response = client
            .post(format!("{serve_url}/admin/connections/shop-{i}/resume"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    wait_drained(&spool, None, Duration::from_secs(600)).await;
    // The drain's CPU, an event: serve's own, and the stand-in's (which
    // shares the machine here, as Klaviyo would not).
    let [serve_cpu, sandbox_cpu] = [serve.0.id(), sandbox_process.0.id()]
        .map(common::process_cpu)
        .into_iter()
        .zip(cpu_before)
        .map(|(after, before)| (after - before).as_secs_f64() * 1e6 / total as f64)
        .collect::<Vec<_>>()[..]
    else {
        unreachable!()
    };
    let (_, last, finished) = spool_file::finished_span_seconds(&spool);
    let elapsed = last - resumed;
    println!(
        "{active} active connections, {total} events: {finished} finished in {elapsed:.1} s after the resume, {:.0} events/s (waited {:.1} s); CPU an event: serve {serve_cpu:.0} µs, stand-in {sandbox_cpu:.0} µs; peak RSS {:.1} MiB",
        finished as f64 / elapsed,
        started.elapsed().as_secs_f64(),
        status_kib(serve.0.id(), "VmHWM:") as f64 / 1024.0
    );
}

async fn isolation(dir: &Path) {
    let rate = setting("BENCH_RATE", 200);
    let seconds = setting("BENCH_SECONDS", 20);
    let poison_rate = setting("BENCH_POISON_PER_SECOND", 2);
    let mut results = BTreeMap::new();
    for storm in [false, true] {
        let run = dir.join(if storm { "storm" } else { "calm" });
        std::fs::create_dir_all(&run).unwrap();
        let (_healthy, healthy_url) = sandbox(&[]);
        let faults: &[&str] = if storm { &["--fault-5xx", "0.5"] } else { &[] };
        let (_victim, victim_url) = sandbox(faults);
        let mut entries = vec![("victim".to_string(), "wk_victim".to_string(), victim_url, "active")];
        for i in 1..=3 {
            entries.push((format!("shop-{i}"), format!("wk_{i}"), healthy_url.clone(), "active"));
        }
        let config = config(&run, &entries, Some(plugin_fixtures::HOSTILE));
        let spool = run.join("spool.sqlite");
        let (_serve, serve_url, _) = serve(&config, &spool, &[]);

        let per_shop = (rate * seconds) as usize;
        let mix: Vec<(String, String)> = chord_corpus::generate(1, per_shop)
            .map(|event| {
                let kind = serde_json::from_str::<Value>(&event).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string();
                (kind, event)
            })
            .collect();
        let client = reqwest::Client::new();
        let keys = ["wk_victim", "wk_1", "wk_2", "wk_3"];
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut posts = tokio::task::JoinSet::new();
        let poison_every = if storm && poison_rate > 0 {
            (rate / poison_rate).max(1) as usize
        } else {
            usize::MAX
        };
        for (n, (kind, body)) in mix.iter().enumerate() {
            tick.tick().await;
            for key in keys {
                // Each shop its own people: the message ids and user ids
                // are made distinct per shop.
                let mut event: Value = serde_json::from_str(body).unwrap();
                event["messageId"] = json!(format!("{key}-{n}"));
                if key == "wk_victim" && n % poison_every == 0 {
                    event = json!({"type": "track", "messageId": format!("poison-{n}"), "userId": format!("poison-{n}"), "misbehave": "loop"});
                }
                let (client, url) = (client.clone(), format!("{serve_url}/api/s/s2s/{kind}"));
                posts.spawn(async move {
                    let _ = client
                        .post(url)
                        .header("x-write-key", key)
                        .body(event.to_string())
                        .send()
                        .await;
                });
            }
            while posts.try_join_next().is_some() {}
        }
        while posts.join_next().await.is_some() {}
        let mut latencies = Vec::new();
        for shop in ["shop-1", "shop-2", "shop-3"] {
            wait_drained(&spool, Some(shop), Duration::from_secs(120)).await;
            latencies.extend(spool_file::latencies_ms_of(&spool, shop, "poison-"));
        }
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        let (p50, p99) = (at(0.5), at(0.99));
        println!(
            "{}: the healthy connections' ingest-to-outcome p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms ({} events; {rate}/s per connection for {seconds} s)",
            if storm {
                format!("victim storming 5xx (half) and {poison_rate} poison/s")
            } else {
                "no storm".to_string()
            },
            latencies.last().copied().unwrap_or(0.0),
            latencies.len()
        );
        results.insert(storm, p99);
    }
    println!("p99 with the storm / without: {:.2}", results[&true] / results[&false]);
}
