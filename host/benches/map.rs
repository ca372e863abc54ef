//! `cargo bench -p cdp-host --bench map`: `cdp-host map` end to end, the
//! way a user runs it, on what Chord sends.
//!
//! 1. Chord's 24 sample events (`../shared/chord/sample-events.ndjson`, or
//!    `$CHORD_SAMPLES`) repeated 400 times, as one file: the mean per event.
//! 2. Each sample alone, repeated 400 times: the cost per event type.
//! 3. The generated mix (`chord-corpus`, 20,000 events, seed 1), by type.
//!
//! Each figure is the child process's CPU time (user + system, from
//! `getrusage`), the fastest of `RUNS` runs (noise on a shared machine only
//! adds time). Two ways of taking out what a run pays once:
//! - "start-up subtracted": less a run over an empty file (loading the
//!   cached component), so the plugin's lazy setup on the first events
//!   (libphonenumber's metadata, 11 ms) is still counted;
//! - "steady": the run over N + 1 copies less the run over 1 copy, so every
//!   one-time cost is out, as it is for a long-running `serve`.
//!
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{children_cpu, name};

const REPEAT: usize = 400;
const RUNS: usize = 5;
const MIX_EVENTS: usize = 20_000;

fn main() {
    let dir = std::env::temp_dir().join(format!("cdp-host-map-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = write(&dir.join("empty.ndjson"), &[]);
    // The first run compiles the component into the cache.
    map_cpu(&empty);
    let startup = fastest(|| map_cpu(&empty));
    println!("start-up (an empty input): {:.1} ms of CPU", ms(startup));

    let samples = common::samples().expect("Chord's samples beside the checkout, or $CHORD_SAMPLES");
    let all: Vec<String> = (0..REPEAT).flat_map(|_| samples.iter().cloned()).collect();
    println!(
        "\nChord's 24 samples x {REPEAT} ({} events), µs per event: start-up subtracted {:.1}, steady {:.1}",
        all.len(),
        micros(per_event(&dir, &all, startup)),
        micros(steady(&dir, &samples, REPEAT))
    );

    println!("\nEach sample alone, x {REPEAT}: µs per event, steady");
    for (index, sample) in samples.iter().enumerate() {
        println!(
            "  {:>2} {:<32} {:>8} B {:>9.1}",
            index + 1,
            name(sample),
            sample.len(),
            micros(steady(&dir, std::slice::from_ref(sample), REPEAT))
        );
    }

    let mix: Vec<String> = chord_corpus::generate(1, MIX_EVENTS).collect();
    println!(
        "\nThe generated mix ({MIX_EVENTS} events, seed 1), µs per event: start-up subtracted {:.1}",
        micros(per_event(&dir, &mix, startup))
    );
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in mix {
        by_type.entry(name(&event)).or_default().push(event);
    }
    println!("  by type (each type's events as one input, start-up subtracted): µs per event, events, mean bytes");
    for (kind, events) in by_type {
        let bytes = events.iter().map(String::len).sum::<usize>() / events.len();
        println!(
            "  {:<32} {:>9.1} {:>7} {:>9}",
            kind,
            micros(per_event(&dir, &events, startup)),
            events.len(),
            bytes
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU per event of one run over `events`, less `startup`.
fn per_event(dir: &Path, events: &[String], startup: Duration) -> Duration {
    let file = write(&dir.join("events.ndjson"), events);
    fastest(|| map_cpu(&file)).saturating_sub(startup) / events.len() as u32
}

/// CPU per event of `events` repeated: (`times` + 1 copies) less 1 copy.
fn steady(dir: &Path, events: &[String], times: usize) -> Duration {
    let once = write(&dir.join("once.ndjson"), events);
    let many: Vec<String> = (0..=times).flat_map(|_| events.iter().cloned()).collect();
    let many = write(&dir.join("many.ndjson"), &many);
    let (once, many) = (fastest(|| map_cpu(&once)), fastest(|| map_cpu(&many)));
    many.saturating_sub(once) / (times * events.len()) as u32
}

fn fastest(mut run: impl FnMut() -> Duration) -> Duration {
    (0..RUNS).map(|_| run()).min().unwrap()
}

/// CPU time of one `cdp-host map` over `file`, output discarded.
fn map_cpu(file: &Path) -> Duration {
    let before = children_cpu();
    let status = Command::new(env!("CARGO_BIN_EXE_cdp-host"))
        .env("CDP_HOST_CACHE_DIR", std::env::temp_dir().join("cdp-host-bench-cache"))
        .arg("map")
        .arg(file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    children_cpu() - before
}

fn write(path: &Path, lines: &[String]) -> PathBuf {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for line in lines {
        writeln!(out, "{line}").unwrap();
    }
    out.flush().unwrap();
    path.to_path_buf()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
