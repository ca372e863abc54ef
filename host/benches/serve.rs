//! `cargo bench -p cdp-host --bench serve`: ingest-to-delivery latency of
//! `cdp-host serve`, with the sandbox (limits off) and serve as separate
//! processes. The generated mix (`chord-corpus`, seed 1) is posted to the
//! s2s API at a steady rate, `BENCH_SERVE_RATE` events a second (default
//! 5,000) for `BENCH_SERVE_SECONDS` (default 10); each event's latency is
//! from `receivedAt` (set at ingest) to the moment its outcome was written
//! to the spool, read back from the spool itself. On this 2-core machine
//! the poster, serve and the sandbox share the cores.
//!
//! Klaviyo's limits: `BENCH_SERVE_LIMITS=1` runs the sandbox with its rate
//! limits and `serve` with pacing and `bulk_profiles`, and also reports
//! the delivered events a second after the first 20 s (warm-up) and the
//! sandbox's 429s: with a rate above the budget, that is a backlog being
//! drained through the bulk endpoints; at `BENCH_SERVE_RATE=10`, a trickle.
//!
//! Poison: `BENCH_SERVE_POISON_PER_SECOND=1` runs the test-only hostile
//! plugin (which maps an ordinary event to one request) and adds that many
//! events a second on which it loops until its deadline
//! (`BENCH_SERVE_DEADLINE_MS`, default the host's); the latency reported is
//! then the other events'. `BENCH_SERVE_PLUGIN=hostile` with no poison is
//! the run to compare against.
//!
//! `BENCH_SERVE_ARGS="--admin-token T"` adds flags to `serve` (split at
//! spaces): with an admin token the operator console is on, and with
//! `--no-console` as well it is off, the pair that prices the console.
//!
//! `BENCH_SERVE_BIN=PATH` runs that build of `cdp-host` instead of this
//! one's, so that a before and an after can be paired on the same bench.
//!
//! Also reported: the CPU time the serve process used from the first post
//! until every outcome was written, per event (its own user + system time,
//! from `/proc`).
//!
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Killed, free_port, setting, wait_listening};

#[path = "../../tests/support/spool.rs"]
mod spool_file;

const WRITE_KEY: &str = "wk_bench";

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-serve-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spool = dir.join("spool.sqlite");
    let poison_rate = setting("BENCH_SERVE_POISON_PER_SECOND", 0);
    let hostile = poison_rate > 0 || std::env::var("BENCH_SERVE_PLUGIN").is_ok_and(|p| p == "hostile");
    let mut plugin_args: Vec<String> = Vec::new();
    if hostile {
        let settings = dir.join("settings.json");
        std::fs::write(&settings, r#"{"api_key": "pk_sandbox_demo"}"#).unwrap();
        plugin_args.extend(["--plugin".into(), plugin_fixtures::HOSTILE.into()]);
        plugin_args.extend(["--settings".into(), settings.display().to_string()]);
    }
    let limits = setting("BENCH_SERVE_LIMITS", 0) == 1;
    if limits && !hostile {
        let settings = dir.join("settings.json");
        std::fs::write(&settings, r#"{"bulk_profiles": true}"#).unwrap();
        plugin_args.extend(["--settings".into(), settings.display().to_string()]);
    }
    if let Ok(deadline) = std::env::var("BENCH_SERVE_DEADLINE_MS") {
        plugin_args.extend(["--plugin-deadline-ms".into(), deadline]);
    }
    // `BENCH_SERVE_BIN=path` runs another build of cdp-host (a before to
    // pair against an after).
    let binary = std::env::var("BENCH_SERVE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cdp-host").to_string());
    let (sandbox_port, serve_port) = (free_port(), free_port());
    let _sandbox = Killed(
        Command::new(&binary)
            .args(["sandbox", "--listen", &format!("127.0.0.1:{sandbox_port}")])
            .args((!limits).then_some("--no-rate-limits"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(sandbox_port);
    let _serve = Killed(
        Command::new(&binary)
            .args([
                "serve",
                "--write-key",
                WRITE_KEY,
                "--listen",
                &format!("127.0.0.1:{serve_port}"),
            ])
            .args(["--base-url", &format!("http://127.0.0.1:{sandbox_port}")])
            // What is measured is the service, not the write key's rate.
            .args(["--ingest-rate", "0"])
            .args((!limits).then_some("--no-pacing"))
            .args(&plugin_args)
            .args(std::env::var("BENCH_SERVE_ARGS").unwrap_or_default().split_whitespace())
            .arg("--spool")
            .arg(&spool)
            .env("KLAVIYO_API_KEY", "pk_sandbox_demo")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(serve_port);

    let rate = setting("BENCH_SERVE_RATE", 5_000);
    let events = (rate * setting("BENCH_SERVE_SECONDS", 10)) as usize;
    let mut mix = common::typed_mix(events);
    if let Some(every) = rate.checked_div(poison_rate) {
        let every = every.max(1) as usize;
        for n in (0..mix.len()).step_by(every).rev() {
            let poison = serde_json::json!({
                "type": "track", "messageId": format!("poison-{n}"), "userId": format!("poison-{n}"), "misbehave": "loop",
            });
            mix.insert(n, ("track".into(), poison.to_string()));
        }
    }
    let cpu_before = common::process_cpu(_serve.0.id());
    let started = Instant::now();
    let mix_len = mix.len();
    let ok = common::post_at_rate(&[serve_port], mix, rate, WRITE_KEY).await;
    // When ingest ended, on the spool's clock (Julian-day seconds).
    let ingest_ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2_440_587.5 * 86_400.0;
    let deadline = Instant::now() + Duration::from_secs(if limits { 900 } else { 120 });
    while spool_file::pending(&spool) > 0 {
        assert!(Instant::now() < deadline, "events did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let serve_cpu = common::process_cpu(_serve.0.id()) - cpu_before;
    let mut latencies = spool_file::latencies_ms_except(&spool, "poison-");
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "serve: {ok} of {} events acknowledged ({poison_rate} poison a second), posted at {rate}/s, all in {:.1}s",
        mix_len,
        started.elapsed().as_secs_f64()
    );
    println!(
        "ingest-to-outcome latency of the others (ms): p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1} ({} events)",
        at(0.5),
        at(0.9),
        at(0.99),
        latencies.last().copied().unwrap_or(0.0),
        latencies.len()
    );
    println!(
        "serve process CPU from the first post to the last outcome: {:.2} s, {:.1} µs per event",
        serve_cpu.as_secs_f64(),
        serve_cpu.as_secs_f64() * 1e6 / mix_len as f64
    );
    if limits {
        // The steady rate: from the end of the warm-up (20 s) until 95% of
        // the events were delivered, leaving out the tail of the last few
        // people's chains; and the same for the drain alone, once ingest
        // (which shares the two cores) has ended.
        let finished = spool_file::delivered_at_seconds(&spool);
        if let Some(&first) = finished.first() {
            let end = finished[(finished.len() * 95 / 100).min(finished.len() - 1)];
            for (what, start) in [("from 20 s", first + 20.0), ("after ingest ended", ingest_ended)] {
                let within = finished.iter().filter(|t| **t >= start && **t <= end).count();
                if end > start {
                    println!(
                        "delivered {what} until 95% were: {within} events in {:.1} s, {:.0} events/s",
                        end - start,
                        within as f64 / (end - start),
                    );
                }
            }
            println!(
                "all {} delivered within {:.1} s",
                finished.len(),
                finished.last().unwrap() - first
            );
        }
        let stats = reqwest::get(format!("http://127.0.0.1:{sandbox_port}/sandbox/stats"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        println!(
            "sandbox: 429s {}, requests by endpoint {}",
            stats["throttled"], stats["by_endpoint"]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
