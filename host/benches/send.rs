//! `cargo bench -p cdp-host --bench send`: `cdp-host send` end to end, into
//! `cdp-host sandbox` running as a separate process on loopback.
//!
//! 1. Throughput with the sandbox's rate limits off: events per second and
//!    the sender's peak resident memory.
//! 2. With Klaviyo's limits on: the delivered rate as a share of the events
//!    endpoint's steady budget (3500/min), and the 429s seen, both counted
//!    after a one-minute warm-up. `BENCH_LIMITED_MINUTES` (default 3) sets
//!    the run's length; 0 skips it.
//!
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY: &str = "pk_sandbox_demo";

fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let events = 50_000;
    let corpus = dir.join("throughput.ndjson");
    write_corpus(&corpus, events, 5_000);
    let sandbox = KlaviyoMock::start(&["--no-rate-limits"]);
    let started = Instant::now();
    let output = send(&sandbox.url, &corpus, &dir);
    let elapsed = started.elapsed();
    let summary = String::from_utf8_lossy(&output.stdout);
    println!("Throughput, sandbox rate limits off ({events} events, 5000 people, concurrency 64)");
    for line in summary
        .lines()
        .filter(|l| l.contains("events read") || l.starts_with("peak memory"))
    {
        println!("  {line}");
    }
    println!("  wall clock including start-up: {:.2}s", elapsed.as_secs_f64());
    println!("  sandbox: {}", sandbox.stats_line());
    drop(sandbox);

    let minutes: u64 = std::env::var("BENCH_LIMITED_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3);
    if minutes >= 2 {
        limited(&dir, minutes);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Klaviyo's limits on: more events than the budget allows in the run, so
/// the sender is always limited; the rate is read from the sandbox.
fn limited(dir: &Path, minutes: u64) {
    let corpus = dir.join("limited.ndjson");
    let events = 3_500 * (minutes as usize + 1);
    write_tracks(&corpus, events);
    let sandbox = KlaviyoMock::start(&[]);
    let mut sender = Command::new(env!("CARGO_BIN_EXE_cdp-host"))
        .args(["send", "--klaviyo-url", &sandbox.url, "--dead-letters"])
        .arg(dir.join("limited-dead.ndjson"))
        .arg(&corpus)
        .env("KLAVIYO_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(60));
    let warm = sandbox.stats();
    let window = Duration::from_secs(60 * (minutes - 1));
    std::thread::sleep(window);
    let end = sandbox.stats();
    let _ = sender.kill();
    let _ = sender.wait();
    let accepted = end.0 - warm.0;
    let throttled = end.1 - warm.1;
    let budget = 3_500.0 * window.as_secs_f64() / 60.0;
    println!("\nKlaviyo's limits on: events endpoint, steady budget 3500/min, measured over minutes 2 to {minutes}");
    println!(
        "  accepted {accepted} of a budget of {budget:.0}: {:.1}% of the steady budget",
        100.0 * accepted as f64 / budget
    );
    println!("  429s after warm-up: {throttled} (before it: {})", warm.1);
}

fn send(url: &str, corpus: &Path, dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cdp-host"))
        .args([
            "send",
            "--klaviyo-url",
            url,
            "--concurrency",
            "64",
            "--no-pacing",
            "--dead-letters",
        ])
        .arg(dir.join("dead.ndjson"))
        .arg(corpus)
        .env("KLAVIYO_API_KEY", KEY)
        .stderr(Stdio::null())
        .output()
        .unwrap()
}

/// `people` shoppers, each an identify then browsing and ordering.
fn write_corpus(path: &Path, events: usize, people: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let names = [
        "Product Viewed",
        "Product Added",
        "Cart Viewed",
        "Checkout Started",
        "Order Completed",
    ];
    for i in 0..events {
        let p = i % people;
        let email = format!("shopper{p}@example.org");
        let event = if i < people {
            json!({"type": "identify", "messageId": format!("m{i}"), "userId": format!("u{p}"),
                   "traits": {"email": email, "firstName": "Shopper", "lastName": format!("{p}"), "plan": "gold"}})
        } else {
            track(i, names[i % names.len()], &email)
        };
        writeln!(out, "{event}").unwrap();
    }
}

fn write_tracks(path: &Path, events: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..events {
        writeln!(
            out,
            "{}",
            track(i, "Product Viewed", &format!("shopper{}@example.org", i % 1000))
        )
        .unwrap();
    }
}

fn track(i: usize, name: &str, email: &str) -> Value {
    json!({"type": "track", "event": name, "messageId": format!("m{i}"), "userId": format!("u{i}"),
           "properties": {"product_id": format!("p{}", i % 97), "price": 24.0, "currency": "USD", "revenue": 24.0},
           "context": {"locale": "en-US", "traits": {"email": email}}, "timestamp": "2026-11-27T10:00:00.000Z"})
}

/// `cdp-host sandbox` as its own process.
struct KlaviyoMock {
    child: Child,
    url: String,
}

impl KlaviyoMock {
    fn start(flags: &[&str]) -> KlaviyoMock {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_cdp-host"))
            .args(["sandbox", "--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the sandbox did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        KlaviyoMock { child, url }
    }

    fn get_stats(&self) -> Value {
        let addr = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /sandbox/stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    /// (accepted, 429s)
    fn stats(&self) -> (u64, u64) {
        let stats = self.get_stats();
        let accepted = stats["accepted"].as_u64().unwrap_or(0);
        let throttled = stats["rejected"]["429 throttled"].as_u64().unwrap_or(0);
        (accepted, throttled)
    }

    fn stats_line(&self) -> String {
        let s = self.get_stats();
        format!(
            "requests {}, accepted {}, deduplicated {}, rejected {}",
            s["requests"], s["accepted"], s["deduplicated"], s["rejected"]
        )
    }
}

impl Drop for KlaviyoMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
