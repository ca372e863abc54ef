//! `cargo bench -p cdp-host --bench console`: what the operator console
//! costs `serve`, per event and in memory, on what users send: Chord's 24
//! samples (`../shared/chord/sample-events.ndjson`, or `$CHORD_SAMPLES`)
//! and the generated mix (`chord-corpus`, seed 1), each mapped by the
//! bundled plugin into the requests delivery would send.
//!
//! 1. Per event: what delivery does for the console (the trace made: the
//!    requests it sends shared, not copied, and masked only when a page
//!    shows them) and what the engine does (the recorder's `record`, over
//!    1,000 connections in turn), in batches; the fastest batch and the
//!    median, as noise on a shared VM only adds.
//! 2. Memory: the bytes the recorder holds (a counting allocator) once
//!    1,000 connections each have a full ring at the default size, every
//!    trace its own, as in `serve`.
//!
//! Reported, never asserted. Results: BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use cdp_host::bundled;
use cdp_host::delivery::{EventOutcome, EventRecord, Trace, TracedRequest};
use cdp_host::mapping::EventId;
use cdp_host::serve::console::{ConsoleOptions, Recorder};
use plugin_runtime::{HttpRequest, HttpResponse, Outcome};

mod common;

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator as it came.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NOW: i64 = 1_795_824_000_000;
const CONNECTIONS: usize = 1_000;
const BATCHES: usize = 21;

/// An event as delivery holds it: its text, its requests, its outcome.
struct Mapped {
    text: String,
    message_id: Option<String>,
    kind: Option<String>,
    requests: Vec<HttpRequest>,
    skipped: Option<String>,
}

fn main() {
    let runtime = common::runtime(2);
    let plugin = runtime.load(bundled::KLAVIYO, "bundled klaviyo").expect("plugin");
    let mut instance = plugin.instance().expect("instance");
    let mut map = |text: String| {
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mapping = instance.map_event("{}", &text, NOW).expect("map");
        let (requests, skipped) = match mapping.outcome {
            Outcome::Send(requests) => (requests, None),
            Outcome::Skip(reason) => (Vec::new(), Some(reason)),
            _ => (Vec::new(), Some("error".to_string())),
        };
        Mapped {
            message_id: value["messageId"].as_str().map(str::to_string),
            kind: value["type"].as_str().map(str::to_string),
            text,
            requests,
            skipped,
        }
    };
    let samples: Vec<Mapped> = common::samples()
        .unwrap_or_default()
        .into_iter()
        .map(&mut map)
        .collect();
    let mix: Vec<Mapped> = chord_corpus::generate(1, 20_000).map(&mut map).collect();

    println!("The console's cost per event, µs (fastest / median of {BATCHES} batches)");
    println!("{:<40} {:>16} {:>16} {:>16}", "events", "trace", "record", "both");
    if !samples.is_empty() {
        per_event("Chord's 24 samples", &samples);
        let small: Vec<&Mapped> = samples.iter().filter(|m| m.text.len() < 100_000).collect();
        let small: Vec<Mapped> = small.iter().map(|m| copy(m)).collect();
        per_event("the 23 without the 225 KB one", &small);
    }
    per_event("the generated mix (20,000, seed 1)", &mix);

    println!();
    println!(
        "Memory of {CONNECTIONS} connections with full rings (default: {} events, traces within {} MiB)",
        ConsoleOptions::RING,
        ConsoleOptions::BODY_BUDGET >> 20
    );
    for (label, options) in [
        ("default", ConsoleOptions::default()),
        (
            "--console-bodies off",
            ConsoleOptions {
                bodies: false,
                ..ConsoleOptions::default()
            },
        ),
    ] {
        let before = LIVE.load(Ordering::Relaxed);
        let recorder = Recorder::new(options);
        let activities: Vec<_> = (0..CONNECTIONS)
            .map(|c| recorder.activity(&format!("shop-{c:04}")))
            .collect();
        let mut n = 0;
        for round in 0..ConsoleOptions::RING {
            for (c, activity) in activities.iter().enumerate() {
                let event = &mix[(round * CONNECTIONS + c) % mix.len()];
                recorder.record(activity, &record(n, event), 0);
                n += 1;
            }
        }
        let held = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "{label:<24} {:>8.1} MiB held ({:.1} KiB a connection; traces {:.1} MiB)",
            held as f64 / (1 << 20) as f64,
            held as f64 / 1024.0 / CONNECTIONS as f64,
            recorder.body_bytes() as f64 / (1 << 20) as f64
        );
        drop(activities);
        drop(recorder);
    }
}

fn copy(m: &Mapped) -> Mapped {
    Mapped {
        text: m.text.clone(),
        message_id: m.message_id.clone(),
        kind: m.kind.clone(),
        requests: m.requests.clone(),
        skipped: m.skipped.clone(),
    }
}

/// The trace delivery makes of an event (its text moved in, as delivery
/// moves it), and its record.
fn record(n: usize, event: &Mapped) -> EventRecord {
    let requests = event
        .requests
        .iter()
        .map(|request| TracedRequest {
            request: Arc::new(request.clone()),
            response: Some(HttpResponse {
                status: 202,
                headers: Vec::new(),
                body: String::new(),
            }),
            batched: false,
        })
        .collect();
    let trace = Trace {
        event: event.text.clone(),
        person: Some("e\"buyer@example.org\"".into()),
        requests,
        sending: Duration::from_millis(2),
    };
    EventRecord {
        id: EventId::SpoolRow(n as i64),
        message_id: event.message_id.clone(),
        kind: event.kind.clone(),
        outcome: match &event.skipped {
            None => EventOutcome::Delivered {
                requests: event.requests.len(),
            },
            Some(reason) => EventOutcome::Skipped(reason.clone()),
        },
        warnings: Vec::new(),
        retries: 0,
        plugin_version: "klaviyo@1.0.0".into(),
        trace: Some(Arc::new(trace)),
    }
}

/// Times making the traces (the text copy excluded: delivery moves it)
/// and recording them, over 1,000 connections in turn.
fn per_event(label: &str, events: &[Mapped]) {
    let recorder = Recorder::new(ConsoleOptions::default());
    let activities: Vec<_> = (0..CONNECTIONS)
        .map(|c| recorder.activity(&format!("shop-{c:04}")))
        .collect();
    let rounds = (2_000 / events.len()).max(1);
    let (mut traces, mut records) = (Vec::new(), Vec::new());
    let mut n = 0;
    for _ in 0..BATCHES {
        // Making the traces: what delivery adds per event with the console
        // on. It holds each request in an Arc to send it in any case, and
        // moves the event's text and the answers into the trace.
        let mut made = Vec::with_capacity(events.len() * rounds);
        let inputs: Vec<(String, Vec<Arc<HttpRequest>>)> = (0..rounds)
            .flat_map(|_| {
                events
                    .iter()
                    .map(|e| (e.text.clone(), e.requests.iter().cloned().map(Arc::new).collect()))
            })
            .collect();
        let started = Instant::now();
        for (i, (text, sent)) in inputs.into_iter().enumerate() {
            let event = &events[i % events.len()];
            let requests = sent
                .iter()
                .map(|request| TracedRequest {
                    request: request.clone(),
                    response: None,
                    batched: false,
                })
                .collect();
            black_box(&sent);
            made.push(Arc::new(Trace {
                event: text,
                person: event.message_id.clone(),
                requests,
                sending: Duration::ZERO,
            }));
        }
        traces.push(started.elapsed().as_secs_f64() * 1e6 / made.len() as f64);
        // Recording them.
        let batch: Vec<EventRecord> = made
            .into_iter()
            .enumerate()
            .map(|(i, trace)| {
                let mut r = record(n + i, &events[i % events.len()]);
                r.trace = Some(trace);
                r
            })
            .collect();
        let count = batch.len();
        let started = Instant::now();
        for (i, r) in batch.iter().enumerate() {
            recorder.record(&activities[(n + i) % CONNECTIONS], black_box(r), 0);
        }
        records.push(started.elapsed().as_secs_f64() * 1e6 / count as f64);
        n += count;
    }
    let stat = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let ((tf, tm), (rf, rm)) = (stat(&mut traces), stat(&mut records));
    println!(
        "{label:<40} {:>7.2} / {:<7.2} {:>7.2} / {:<7.2} {:>7.2} / {:<7.2}",
        tf,
        tm,
        rf,
        rm,
        tf + rf,
        tm + rm
    );
}
