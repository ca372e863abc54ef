//! `cargo bench -p cdp-host --bench plugin`: what a plugin call costs.
//!
//! 1. Mapping cost per event, the same Klaviyo mapping code compiled
//!    natively and run as the component through the host, side by side,
//!    on Chord's 24 samples (`../shared/chord/sample-events.ndjson`, or
//!    `$CHORD_SAMPLES`), on the generated mix by event type (`chord-corpus`,
//!    seed 1), and on four synthetic events kept as extra rows:
//!    short batches alternate between the two so machine noise hits both
//!    alike. Noise on a shared VM only ever adds time, so the fastest batch
//!    is the steadiest estimate of the cost itself; the median is shown
//!    beside it. Ratios are taken in the same run.
//! 2. Host call overhead: a near-empty call on a reused instance, and on a
//!    fresh instance per call (store + instantiate + call + drop).
//!
//! Speed is reported, never asserted. Results: BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cdp_host::bundled;
use plugin_runtime::{Instance, Plugin, Runtime, RuntimeConfig};
use serde_json::{Value, json};

mod common;

use common::{name, samples};

const NOW: i64 = 1_795_824_000_000;
const BATCHES: usize = 15;
/// Mapping batches: many short ones, so some run undisturbed.
const MAPPING_BATCHES: usize = 61;
/// Batches per sample and per type of the mix: fewer, as there are many.
const SAMPLE_BATCHES: usize = 21;

fn main() {
    let runtime = Runtime::new(RuntimeConfig {
        concurrency: 4,
        cache_dir: std::env::temp_dir().join("cdp-host-bench-cache").into(),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let plugin = runtime.load(bundled::KLAVIYO, "bundled klaviyo").expect("plugin");
    let mut instance = plugin.instance().expect("instance");
    let settings = r#"{"default_country":"US"}"#;

    println!("Mapping cost per event, µs (interleaved batches: fastest / median)");
    println!("{:<44} {:>15} {:>15} {:>12}", "event", "native", "component", "ratio");
    if let Some(samples) = samples() {
        println!("Chord's samples ({SAMPLE_BATCHES} batches each)");
        let (mut native_sum, mut component_sum) = (0.0, 0.0);
        for (index, sample) in samples.iter().enumerate() {
            let label = format!("{:>2} {} ({} B)", index + 1, name(sample), sample.len());
            let (n, c) = compare(
                &mut instance,
                settings,
                &label,
                std::slice::from_ref(sample),
                SAMPLE_BATCHES,
            );
            native_sum += n;
            component_sum += c;
        }
        println!(
            "{:<44} {:>15.2} {:>15.2} {:>12.2}",
            "mean of the 24 (fastest)",
            native_sum / samples.len() as f64,
            component_sum / samples.len() as f64,
            component_sum / native_sum
        );
    }
    println!("The generated mix by type ({SAMPLE_BATCHES} batches each; per event over all of a type)");
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for event in chord_corpus::generate(1, 5_000) {
        by_type.entry(name(&event)).or_default().push(event);
    }
    for (kind, events) in &by_type {
        let label = format!("{kind} ({} events)", events.len());
        compare(&mut instance, settings, &label, events, SAMPLE_BATCHES);
    }
    println!("Synthetic events ({MAPPING_BATCHES} batches each)");
    for (name, event) in corpus() {
        let text = event.to_string();
        compare(&mut instance, settings, name, &[text], MAPPING_BATCHES);
    }

    println!("\nHost call overhead (validate-settings of \"{{}}\": a near-empty call)");
    let reused = median((0..BATCHES).map(|_| per_call(20_000, || call(&mut instance))).collect());
    let fresh = median(
        (0..BATCHES)
            .map(|_| {
                per_call(2_000, || {
                    let mut instance = plugin.instance().expect("instance");
                    call(&mut instance);
                })
            })
            .collect(),
    );
    println!("{:<46} {:>8.2} µs", "reused instance", micros(reused));
    println!("{:<46} {:>8.2} µs", "fresh instance per call", micros(fresh));

    println!("\nInstance strategy: mapping a small track (phone normalisation included)");
    let track = corpus().remove(1).1.to_string();
    let reused_map = median(
        (0..BATCHES)
            .map(|_| per_call(2_000, || map(&mut instance, &track)))
            .collect(),
    );
    let fresh_map = median(
        (0..BATCHES)
            .map(|_| per_call(50, || map(&mut fresh_instance(&plugin), &track)))
            .collect(),
    );
    println!("{:<46} {:>8.2} µs", "reused instance", micros(reused_map));
    println!("{:<46} {:>8.2} µs", "fresh instance per event", micros(fresh_map));
    // A fresh instance pays libphonenumber's lazy setup (its metadata and
    // regex cache) on the first phone number it reads; a reused one once.
    let identify = corpus().remove(0).1.to_string();
    let reused_identify = median(
        (0..BATCHES)
            .map(|_| per_call(500, || map(&mut instance, &identify)))
            .collect(),
    );
    let fresh_identify = median(
        (0..5)
            .map(|_| per_call(3, || map(&mut fresh_instance(&plugin), &identify)))
            .collect(),
    );
    println!(
        "{:<46} {:>8.2} µs",
        "identify with a phone, reused instance",
        micros(reused_identify)
    );
    println!(
        "{:<46} {:>8.2} µs",
        "identify with a phone, fresh instance",
        micros(fresh_identify)
    );
    println!("pooling allocator: {}", runtime.pooling());
    let mut warmed = plugin.instance().expect("instance");
    let fresh = warmed.memory_bytes();
    map(&mut warmed, &identify);
    println!(
        "instance memory: fresh {} KiB, after an identify with a phone {} KiB, after the corpus {} KiB",
        fresh >> 10,
        warmed.memory_bytes() >> 10,
        instance.memory_bytes() >> 10
    );
}

/// Maps `events` natively and in the component in alternating batches of
/// about 2 ms, prints the row, and returns the fastest per-event µs of each.
fn compare(instance: &mut Instance, settings: &str, label: &str, events: &[String], batches: usize) -> (f64, f64) {
    let bytes: usize = events.iter().map(String::len).sum();
    let rounds = (2_000_000 / bytes.max(1)).clamp(1, 300);
    let mut native = Vec::new();
    let mut component = Vec::new();
    for _ in 0..batches {
        native.push(per_call(rounds, || {
            for event in events {
                black_box(klaviyo_destination::map(settings, black_box(event), NOW));
            }
        }));
        component.push(per_call(rounds, || {
            for event in events {
                black_box(instance.map_event(settings, black_box(event), NOW).expect("map"));
            }
        }));
    }
    let per_event = |d: Duration| micros(d) / events.len() as f64;
    let (n_min, c_min) = (per_event(fastest(&native)), per_event(fastest(&component)));
    let (n_med, c_med) = (per_event(median(native)), per_event(median(component)));
    println!(
        "{:<44} {:>15} {:>15} {:>12}",
        label,
        format!("{n_min:.2} / {n_med:.2}"),
        format!("{c_min:.2} / {c_med:.2}"),
        format!("{:.2} / {:.2}", c_min / n_min, c_med / n_med),
    );
    (n_min, c_min)
}

fn call(instance: &mut Instance) {
    black_box(instance.validate_settings("{}").expect("call").is_ok());
}

fn map(instance: &mut Instance, event: &str) {
    black_box(instance.map_event("{}", event, NOW).expect("map"));
}

fn fresh_instance(plugin: &Plugin) -> Instance {
    plugin.instance().expect("instance")
}

fn per_call(iterations: usize, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    started.elapsed() / iterations as u32
}

fn fastest(samples: &[Duration]) -> Duration {
    samples.iter().copied().min().expect("samples")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The realistic corpus: an identify with full traits, a small track, an
/// order with 10 products, and a 200 KB event.
fn corpus() -> Vec<(&'static str, Value)> {
    let traits = json!({
        "email": "ada.lovelace@example.com", "firstName": "Ada", "lastName": "Lovelace", "phone": "(617) 555-0123",
        "title": "Analyst", "company": {"name": "Analytical Engines"}, "avatar": "https://example.com/ada.png",
        "address": {"street": "12 Engine Way", "city": "Fall River", "state": "MA", "postalCode": "02720", "country": "US"},
        "birthday": "1815-12-10", "plan": "gold", "createdAt": "2024-03-02T14:11:09.000Z", "loyalty_points": 1200
    });
    let context = json!({
        "library": {"name": "@jitsu/js", "version": "1.11.0"}, "locale": "en-US", "ip": "73.61.21.118",
        "traits": {"email": "ada.lovelace@example.com", "firstName": "Ada", "lastName": "Lovelace"},
        "geo": {"country": {"code": "US"}, "location": {"latitude": 41.7, "longitude": -71.15}}
    });
    let product = |i: usize| {
        json!({"product_id": format!("p-{i}"), "sku": format!("SKU-{i:05}"), "name": format!("Plant #{i}"),
               "price": 10.0 + i as f64, "quantity": 1 + i % 3, "category": "Houseplants",
               "url": format!("https://shop.example/p/{i}"), "image_url": format!("https://cdn.example/{i}.jpg")})
    };
    let big_description = "Easy-care foliage plant. ".repeat(40);
    vec![
        (
            "identify, full traits",
            json!({"type": "identify", "messageId": "b-1", "userId": "u-1", "anonymousId": "a-1",
            "traits": traits, "context": context, "timestamp": "2026-11-27T10:00:00.000Z"}),
        ),
        (
            "track, small",
            json!({"type": "track", "event": "Product Viewed", "messageId": "b-2", "userId": "u-1",
            "properties": {"product_id": "p-1", "price": 24.0, "currency": "USD"}, "context": context,
            "timestamp": "2026-11-27T10:00:00.000Z"}),
        ),
        (
            "Order Completed, 10 products",
            json!({"type": "track", "event": "Order Completed", "messageId": "b-3",
            "userId": "u-1", "properties": {"order_id": "o-1", "email": "ada.lovelace@example.com", "revenue": 155.0,
            "currency": "USD", "products": (0..10).map(product).collect::<Vec<_>>()}, "context": {},
            "timestamp": "2026-11-27T10:00:00.000Z"}),
        ),
        (
            "track, 200 KB",
            json!({"type": "track", "event": "Product List Viewed", "messageId": "b-4", "userId": "u-1",
            "properties": {"list_id": "all", "products": (0..200).map(|i| {
                let mut p = product(i);
                p["description"] = json!(big_description);
                p
            }).collect::<Vec<_>>()}, "context": context, "timestamp": "2026-11-27T10:00:00.000Z"}),
        ),
    ]
}
