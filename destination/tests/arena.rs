//! The per-call arena's one rule, checked on what users send: memory kept
//! between calls (parsed settings, the phone cache, libphonenumber's lazily
//! built state) is allocated outside the arena. This process installs the
//! arena, poisoned: at every call's start, everything the arena handed out
//! before is overwritten. Each event is mapped in a call; a cache that kept
//! arena memory would read poison on a later call and answer differently
//! (or crash) where the same events mapped without the arena do not.
//!
//! Chord's 24 samples (beside the checkout, or `$CHORD_SAMPLES`; skipped
//! with a message when absent) and 3,000 events of the generated mix, each
//! twice, so that the second time the caches answer.

use std::alloc::System;

use klaviyo_destination::arena::Arena;

#[global_allocator]
static ALLOCATOR: Arena<System> = Arena::poisoned(System);

/// The first round's settings name no country, so that the first phone
/// number, not the settings, is what wakes libphonenumber; the second's do.
const ROUNDS: [&str; 2] = [
    r#"{"api_key": "pk_test", "bulk_profiles": true}"#,
    r#"{"api_key": "pk_test", "default_country": "US", "bulk_profiles": true}"#,
];
const NOW: i64 = 1_764_000_000_000;

fn main() {
    let mut events: Vec<String> = chord_corpus::generate(1, 3_000).collect();
    match samples() {
        Some(samples) => events.extend(samples),
        None => eprintln!("arena: Chord's samples not found; the generated mix only"),
    }
    // In calls, through the arena, twice (the caches answer the second
    // time).
    let mut in_arena = Vec::new();
    for settings in ROUNDS {
        for event in &events {
            let shown = ALLOCATOR.call(|| shown(settings, event));
            // Kept past the call: copied out of the arena.
            in_arena.push(klaviyo_destination::arena::persistent(|| shown.clone()));
        }
    }
    // The same events without the arena (no call running).
    let plain: Vec<String> = ROUNDS
        .iter()
        .flat_map(|settings| events.iter().map(|event| shown(settings, event)))
        .collect();
    assert_eq!(in_arena.len(), plain.len());
    for (index, (a, b)) in in_arena.iter().zip(&plain).enumerate() {
        assert!(a == b, "event {index} maps differently in the arena:\n{a}\n{b}");
    }
    assert!(ALLOCATOR.blocks() > 0, "the calls allocated in the arena");
    println!("arena: {} blocks", ALLOCATOR.blocks());
    println!("arena: {} events mapped alike with and without the arena", plain.len());
}

/// Everything a mapping says, as text, with what the other calls a host
/// makes per request say of its requests: whether and how each is batched,
/// the bulk request one item would go in, and the verdict on a 202.
fn shown(settings: &str, event: &str) -> String {
    use klaviyo_destination::contract::{Outcome, Response};
    let mapping = klaviyo_destination::map(settings, event, NOW);
    let mut shown = format!("{mapping:?}");
    if let Outcome::Send(requests) = &mapping.outcome {
        for request in requests {
            let item = klaviyo_destination::batchable(settings, request);
            shown.push_str(&format!("\n{item:?}"));
            if let Some(item) = item {
                let bulk = klaviyo_destination::assemble(settings, &item.class, &[item.item]);
                shown.push_str(&format!("\n{bulk:?}"));
            }
            let accepted = Response {
                status: 202,
                headers: Vec::new(),
                body: String::new(),
            };
            let verdict = klaviyo_destination::interpret(settings, request, &accepted);
            shown.push_str(&format!("\n{verdict:?}"));
        }
    }
    shown
}

fn samples() -> Option<Vec<String>> {
    let path = std::env::var("CHORD_SAMPLES")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/chord/sample-events.ndjson").into());
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(String::from)
            .collect(),
    )
}
