//! What the benches share: Chord's sample events, how to name an event,
//! the CPU time of the child processes a bench ran; and for the benches
//! that run processes, their settings from the environment, free loopback
//! ports, and children killed when dropped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// Chord's sample events (`../shared/chord/sample-events.ndjson` beside
/// the checkout, or `$CHORD_SAMPLES`), if they are there.
pub fn samples() -> Option<Vec<String>> {
    let path = std::env::var_os("CHORD_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/chord/sample-events.ndjson"));
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// `track` events by name, others by type.
pub fn name(event: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(event).unwrap();
    match value["event"].as_str() {
        Some(name) => name.to_string(),
        None => value["type"].as_str().unwrap_or("?").to_string(),
    }
}

/// User and system time of the waited-for children so far.
pub fn children_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// User and system time a running process has used so far, from
/// `/proc/PID/stat` (what `getrusage` reports for it once it has ended).
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("a running process on Linux");
    // The fields after the command name, which is in parentheses and may
    // hold spaces: utime and stime are the 14th and 15th of the line.
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// A number from the environment, or `default`.
pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits (up to 90 s: a NATS cluster elects its leaders first) until
/// something listens on `port`.
pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "a process did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A child process, killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The generated mix (seed 1), each event with its type.
pub fn typed_mix(events: usize) -> Vec<(String, String)> {
    chord_corpus::generate(1, events)
        .map(|event| {
            let kind = serde_json::from_str::<serde_json::Value>(&event).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string();
            (kind, event)
        })
        .collect()
}

/// Posts each (type, event) to the s2s API at `rate` a second, to the
/// `ports` in turn, with `write_key`; how many were acknowledged.
pub async fn post_at_rate(ports: &[u16], mix: Vec<(String, String)>, rate: u64, write_key: &'static str) -> usize {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut posts = tokio::task::JoinSet::new();
    for (n, (kind, body)) in mix.into_iter().enumerate() {
        tick.tick().await;
        let url = format!("http://127.0.0.1:{}/api/s/s2s/{kind}", ports[n % ports.len()]);
        let client = client.clone();
        posts.spawn(async move {
            client
                .post(url)
                .header("x-write-key", write_key)
                .body(body)
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
    ok
}

/// A plugin runtime for a bench: `concurrency` instances, the compile
/// cache the benches share.
pub fn runtime(concurrency: u32) -> std::sync::Arc<plugin_runtime::Runtime> {
    plugin_runtime::Runtime::new(plugin_runtime::RuntimeConfig {
        concurrency,
        cache_dir: std::env::temp_dir().join("cdp-host-bench-cache").into(),
        ..plugin_runtime::RuntimeConfig::default()
    })
    .expect("runtime")
}
