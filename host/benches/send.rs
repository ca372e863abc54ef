//! `cargo bench -p cdp-host --bench send`: `cdp-host send` end to end, into
//! `cdp-host sandbox` running as a separate process on loopback.
//!
//! 1. Throughput with the sandbox's rate limits off, on what Chord sends:
//!    the generated mix (`chord-corpus`, 50,000 events, seed 1) and Chord's
//!    24 samples x 250 with unique message ids (`../shared/chord/`, or
//!    `$CHORD_SAMPLES`). Reported: events per second, the sender's peak
//!    resident memory and CPU time, and the sandbox's CPU time apart (on
//!    this 2-core machine the two processes share the cores).
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

mod common;

use common::{children_cpu, samples};

const KEY: &str = "pk_sandbox_demo";

fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let mix = dir.join("mix.ndjson");
    write_lines(&mix, chord_corpus::generate(1, 50_000));
    throughput("the generated mix (50,000 events, seed 1)", &mix, &dir);
    if let Some(samples) = samples() {
        let file = dir.join("samples.ndjson");
        write_lines(&file, unique_copies(&samples, 250));
        throughput("Chord's 24 samples x 250, unique message ids", &file, &dir);
    }

    let minutes: u64 = std::env::var("BENCH_LIMITED_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3);
    if minutes >= 2 {
        limited(&dir, minutes);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn throughput(what: &str, corpus: &Path, dir: &Path) {
    let sandbox = KlaviyoMock::start(&["--no-rate-limits"]);
    let sandbox_before = sandbox.cpu();
    let sender_before = children_cpu();
    let output = send(&sandbox.url, corpus, dir);
    let sender_cpu = children_cpu() - sender_before;
    let sandbox_cpu = sandbox.cpu() - sandbox_before;
    let summary = String::from_utf8_lossy(&output.stdout);
    println!("Throughput into the sandbox, rate limits off, concurrency 64: {what}");
    for line in summary
        .lines()
        .filter(|l| l.contains("events read") || l.starts_with("peak memory"))
    {
        println!("  {line}");
    }
    println!(
        "  CPU: sender {:.2}s, sandbox {:.2}s",
        sender_cpu.as_secs_f64(),
        sandbox_cpu.as_secs_f64()
    );
    println!("  sandbox: {}", sandbox.stats_line());
}

/// `times` copies of `events`, each with its own message id, so that the
/// sandbox stores every copy rather than deduplicating it.
fn unique_copies(events: &[String], times: usize) -> impl Iterator<Item = String> {
    (0..times).flat_map(move |copy| {
        events.iter().map(move |event| {
            let mut event: Value = serde_json::from_str(event).unwrap();
            let id = event["messageId"].as_str().unwrap_or("m").to_string();
            event["messageId"] = json!(format!("{id}-{copy}"));
            event.to_string()
        })
    })
}

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for line in lines {
        writeln!(out, "{line}").unwrap();
    }
    out.flush().unwrap();
}

/// Klaviyo's limits on: more events than the budget allows in the run, so
/// the sender is always limited; the rate is read from the sandbox.
fn limited(dir: &Path, minutes: u64) {
    let corpus = dir.join("limited.ndjson");
    let events = 3_500 * (minutes as usize + 1);
    write_tracks(&corpus, events);
    let sandbox = KlaviyoMock::start(&[]);
    let mut sender = Command::new(env!("CARGO_BIN_EXE_cdp-host"))
        .args(["send", "--base-url", &sandbox.url, "--dead-letters"])
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
            "--base-url",
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

    /// The sandbox process's CPU time so far (Linux `/proc`).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or(vec![], |(_, rest)| rest.split(' ').collect());
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ticks_of = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15, the 12th and 13th here.
        Duration::from_secs_f64((ticks_of(11) + ticks_of(12)) / ticks)
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
