//! `cargo bench -p cdp-host --bench swap`: what a hot swap costs the events
//! being mapped while it happens.
//!
//! One thread maps the example events without pause through an
//! `EventMapper` on a `PluginSlot`, exactly as `serve`'s mapping does, and
//! times every event. The main thread swaps v1 -> v2 -> v1 ... through
//! `PluginSlot::swap_in` (compile or cache load, settings check, canary),
//! with a pause between swaps. Each event's latency is then placed against
//! the swaps:
//! - baseline: events far from any swap, after a warm-up second (the
//!   mapper's first instance pays the plugin's lazy setup on its first
//!   events, as any fresh instance does);
//! - preparing: events mapped while a candidate was compiled and canaried
//!   (it competes with the mapping thread for this machine's 2 cores);
//! - the switch: the first event each new version mapped, and every event
//!   that started within 10 ms after the pointer store.
//!
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cdp_host::bundled::{self, EXAMPLE_EVENTS};
use cdp_host::mapping::{EventId, EventMapper};
use cdp_host::settings::DestinationSettings;
use plugin_runtime::PluginSlot;

mod common;

const SWAPS: usize = 20;
const BETWEEN_SWAPS: Duration = Duration::from_millis(300);
const NEAR: Duration = Duration::from_millis(10);

/// One mapped event: when it started, how long it took, which version.
struct Sample {
    started: Instant,
    took: Duration,
    version: usize,
}

/// One swap: when `swap_in` was called and when the new version was live.
struct Swap {
    called: Instant,
    live: Instant,
}

fn main() {
    let runtime = common::runtime(2);
    let v1 = Arc::new(runtime.load(bundled::KLAVIYO, "klaviyo v1").expect("v1"));
    let v2_bytes = std::fs::read(plugin_fixtures::KLAVIYO_V2).expect("the v2 fixture component");
    let settings = serde_json::json!({"default_country": "US"});
    let settings =
        DestinationSettings::from_object(settings.as_object().unwrap().clone(), v1.manifest(), &[], |_| None)
            .expect("settings");
    let slot = PluginSlot::new(v1, bundled::canary(&settings));
    let events: Vec<&str> = EXAMPLE_EVENTS.lines().filter(|l| !l.trim().is_empty()).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let mapping = {
        let (slot, settings, stop) = (slot.clone(), settings.clone(), stop.clone());
        let events: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        std::thread::spawn(move || {
            let mapper = EventMapper::new(slot, settings);
            let mut samples = Vec::with_capacity(4_000_000);
            let mut failures = 0;
            for (line, event) in events.iter().cycle().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let started = Instant::now();
                let mapped = mapper.map(EventId::Line(line as u64 + 1), event);
                let took = started.elapsed();
                failures += usize::from(mapped.plugin_failed);
                samples.push(Sample {
                    started,
                    took,
                    version: Arc::as_ptr(&mapped.plugin) as usize,
                });
            }
            (samples, failures)
        })
    };

    std::thread::sleep(Duration::from_secs(1));
    let mut swaps = Vec::new();
    for i in 0..SWAPS {
        let (bytes, name) = if i % 2 == 0 {
            (v2_bytes.as_slice(), "klaviyo v2")
        } else {
            (bundled::KLAVIYO, "klaviyo v1")
        };
        let called = Instant::now();
        slot.swap_in(bytes, name).expect("the swap");
        swaps.push(Swap {
            called,
            live: Instant::now(),
        });
        std::thread::sleep(BETWEEN_SWAPS);
    }
    stop.store(true, Ordering::Relaxed);
    let (samples, failures) = mapping.join().expect("the mapping thread");
    report(&samples, &swaps, failures);
}

fn report(samples: &[Sample], swaps: &[Swap], failures: usize) {
    let warmed_up = samples[0].started + Duration::from_millis(500);
    let far = |s: &Sample| {
        s.started > warmed_up
            && swaps.iter().all(|w| {
                s.started + Duration::from_millis(100) < w.called || s.started > w.live + Duration::from_millis(100)
            })
    };
    let preparing = |s: &Sample| swaps.iter().any(|w| s.started >= w.called && s.started < w.live);
    let near_switch = |s: &Sample| swaps.iter().any(|w| s.started >= w.live && s.started < w.live + NEAR);
    let baseline: Vec<Duration> = samples.iter().filter(|s| far(s)).map(|s| s.took).collect();
    let during: Vec<Duration> = samples.iter().filter(|s| preparing(s)).map(|s| s.took).collect();
    let after: Vec<Duration> = samples.iter().filter(|s| near_switch(s)).map(|s| s.took).collect();
    // The first event each new version mapped.
    let firsts: Vec<Duration> = samples
        .windows(2)
        .filter(|pair| pair[0].version != pair[1].version)
        .map(|pair| pair[1].took)
        .collect();
    let prepare_ms: Vec<Duration> = swaps.iter().map(|w| w.live - w.called).collect();

    println!(
        "{} events mapped, {} plugin failures, {} swaps ({} version changes seen by the mapper)",
        samples.len(),
        failures,
        swaps.len(),
        firsts.len()
    );
    println!(
        "candidate prepared and swapped in: {} (min / median / max)",
        summary_ms(prepare_ms)
    );
    println!(
        "\n{:<52} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "mapping latency per event, µs", "events", "p50", "p99", "p99.9", "max"
    );
    row("baseline (after warm-up, >100 ms from any swap)", baseline);
    row("while a candidate is compiled and canaried", during);
    row("within 10 ms after the switch", after);
    row("first event on each new version", firsts);
}

fn row(name: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    let at = |q: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e6
    };
    println!(
        "{:<52} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        name,
        latencies.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

fn summary_ms(mut values: Vec<Duration>) -> String {
    values.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.0} / {:.0} / {:.0} ms",
        ms(values[0]),
        ms(values[values.len() / 2]),
        ms(values[values.len() - 1])
    )
}
