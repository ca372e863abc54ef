//! `cargo bench -p cdp-host --bench serve`: ingest-to-delivery latency of
//! `cdp-host serve`, with the sandbox (limits off) and serve as separate
//! processes. Events are posted at a steady rate; each event's latency is
//! from `receivedAt` (set at ingest) to the moment its outcome was written
//! to the spool, read back from the spool itself.
//!
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../../tests/support/spool.rs"]
mod spool_file;

const WRITE_KEY: &str = "wk_bench";
const EVENTS: usize = 5_000;
const RATE_PER_SECOND: u64 = 500;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "a process did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-serve-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spool = dir.join("spool.sqlite");
    let (sandbox_port, serve_port) = (free_port(), free_port());
    let _sandbox = Killed(
        Command::new(env!("CARGO_BIN_EXE_cdp-host"))
            .args([
                "sandbox",
                "--no-rate-limits",
                "--listen",
                &format!("127.0.0.1:{sandbox_port}"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(sandbox_port);
    let _serve = Killed(
        Command::new(env!("CARGO_BIN_EXE_cdp-host"))
            .args([
                "serve",
                "--no-pacing",
                "--write-key",
                WRITE_KEY,
                "--listen",
                &format!("127.0.0.1:{serve_port}"),
            ])
            .args(["--klaviyo-url", &format!("http://127.0.0.1:{sandbox_port}")])
            .arg("--spool")
            .arg(&spool)
            .env("KLAVIYO_API_KEY", "pk_sandbox_demo")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(serve_port);

    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{serve_port}/api/s/s2s/track");
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SECOND));
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..EVENTS {
        tick.tick().await;
        let body = json!({"event": "Product Viewed", "messageId": format!("s{i}"),
                          "properties": {"email": format!("shopper{}@example.org", i % 500), "price": 24.0}});
        let (client, url) = (client.clone(), url.clone());
        posts.spawn(async move {
            client
                .post(url)
                .header("x-write-key", WRITE_KEY)
                .body(body.to_string())
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
    }
    let mut ok = 0;
    while let Some(result) = posts.join_next().await {
        if matches!(result, Ok(Ok(200))) {
            ok += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while spool_file::pending(&spool) > 0 {
        assert!(Instant::now() < deadline, "events did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = spool_file::latencies_ms(&spool);
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "serve: {ok} of {EVENTS} events acknowledged at {RATE_PER_SECOND}/s over {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "ingest-to-delivery latency (ms): p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1} ({} events)",
        at(0.5),
        at(0.9),
        at(0.99),
        latencies.last().copied().unwrap_or(0.0),
        latencies.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
