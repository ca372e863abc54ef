//! Maps a stream of events on several workers, so that one event the plugin
//! is stuck on (a loop running into its deadline, and the re-maps after it)
//! holds up only the events of the same person, not the whole stream.
//!
//! - Events with the same person key (`Envelope::person_key`) are mapped one
//!   at a time, in the order they came; the others in parallel.
//! - Mapped events leave in input order, so that delivery sees them as they
//!   came, with one exception: an event still unmapped `overtake_after` after
//!   it started (or, waiting behind its own person's stuck event, after it
//!   arrived) is overtaken by the events behind it, and leaves when it is
//!   done. Order between two events can then change only if they have
//!   different person keys.
//! - An event whose mapping failed in the plugin itself is mapped again on
//!   the same worker, each time with a fresh instance, `poison_attempts`
//!   times in all; the other workers go on meanwhile.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Envelope, EventId, EventMapper, MappedEvent, MappedOutcome};

/// How the stage runs.
#[derive(Clone, Debug)]
pub struct StageConfig {
    /// Mapping threads.
    pub workers: usize,
    /// Attempts to map an event whose mapping failed in the plugin.
    pub poison_attempts: u32,
    /// How long an unfinished event may hold up the ones behind it.
    pub overtake_after: Duration,
    /// Events read but not yet handed on: bounds memory, and makes a slow
    /// consumer slow the input down.
    pub max_queued: usize,
}

impl StageConfig {
    /// Workers by default: one per core, at least two (so that one stuck
    /// on a poison event leaves another). More cost latency on a busy
    /// machine: on two cores, `serve`'s p99 at 3,000 events/s went from
    /// about 30 ms with one or two workers to over 200 ms with eight.
    pub fn default_workers() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        cores.max(2)
    }
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            workers: StageConfig::default_workers(),
            poison_attempts: 3,
            overtake_after: Duration::from_millis(100),
            max_queued: 1024,
        }
    }
}

/// Workers added at most, each for an event stuck in the plugin.
const MAX_EXTRA_WORKERS: usize = 16;

/// The workers, the order they hand events on in, and where they go.
pub struct MappingStage {
    mapper: EventMapper,
    config: StageConfig,
    state: Mutex<State>,
    /// Workers wait here for an event to map (one is woken per event: on
    /// two cores, waking every thread for every event cost more CPU than
    /// the mapping).
    work: Condvar,
    /// The sequencer waits here for a mapped event.
    progress: Condvar,
    /// The reader waits here for room.
    room: Condvar,
}

/// An event read and not yet started.
struct Queued {
    seq: u64,
    key: Option<String>,
    id: EventId,
    text: String,
    envelope: Result<Envelope, String>,
}

/// What a worker keeps of an event while it is mapped.
struct Taken {
    seq: u64,
    key: Option<String>,
    text: String,
}

/// An event read and not yet handed on, in input order.
enum Slot {
    Waiting { since: Instant, key: Option<String> },
    Mapping { since: Instant },
    Done(Box<(MappedEvent, String)>),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Person keys with an event being mapped.
    busy: HashSet<String>,
    /// By input order.
    slots: BTreeMap<u64, Slot>,
    /// Overtaken and still being mapped (or waiting).
    overtaken: HashSet<u64>,
    /// Overtaken and now done: handed on next.
    late: VecDeque<(MappedEvent, String)>,
    next_seq: u64,
    input_done: bool,
    /// The consumer has gone: stop.
    stopped: bool,
    /// Workers added for stuck events, still running.
    extra_workers: usize,
    /// Events overtaken while the plugin was still mapping them, not done:
    /// as many extra workers as these are kept.
    stuck: HashSet<u64>,
}

impl State {
    fn unfinished(&self) -> usize {
        self.slots.len() + self.overtaken.len() + self.late.len()
    }
}

impl MappingStage {
    pub fn new(mapper: EventMapper, config: StageConfig) -> MappingStage {
        MappingStage {
            mapper,
            config,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
            room: Condvar::new(),
        }
    }

    /// Maps every event of `events`, handing each to `emit` with its text;
    /// `timed` is told how long each mapping took. Returns at the end of the
    /// input, when `emit` says the consumer has gone (false), or at the
    /// first input error.
    pub fn run(
        &self,
        events: impl Iterator<Item = anyhow::Result<(EventId, String)>>,
        emit: impl FnMut(MappedEvent, String) -> bool + Send,
        timed: impl Fn(Duration) + Sync,
    ) -> anyhow::Result<()> {
        std::thread::scope(|scope| {
            let timed = &timed;
            for n in 0..self.config.workers.max(1) {
                std::thread::Builder::new()
                    .name(format!("mapping-{n}"))
                    .spawn_scoped(scope, move || self.work(timed, false))
                    .expect("spawning a mapping worker");
            }
            // A stuck event gets a worker added in its place, for as long as
            // there is work for it: few threads for ordinary traffic (each
            // one more costs latency on a busy machine), and no stall when
            // a plugin loops.
            // (Called with the state locked: a thread that cannot be made
            // is only logged, and its count stays taken.)
            let add_worker = move || {
                let added = std::thread::Builder::new()
                    .name("mapping-extra".into())
                    .spawn_scoped(scope, move || self.work(timed, true));
                if let Err(e) = added {
                    tracing::warn!("could not add a mapping worker for a stuck event: {e}");
                }
            };
            let sequencer = std::thread::Builder::new()
                .name("mapping-order".into())
                .spawn_scoped(scope, move || self.hand_on(emit, add_worker))
                .expect("spawning the mapping sequencer");
            let read = self.read(events);
            let mut state = self.lock();
            state.input_done = true;
            if read.is_err() {
                state.stopped = true;
            }
            drop(state);
            self.wake_all();
            sequencer.join().expect("the mapping sequencer panicked");
            read
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("a mapping thread panicked")
    }

    /// At the end of the input, or when the stage stops: everyone looks.
    fn wake_all(&self) {
        self.work.notify_all();
        self.progress.notify_all();
        self.room.notify_all();
    }

    /// Reads the input into the queue, waiting while too much is unfinished.
    fn read(&self, events: impl Iterator<Item = anyhow::Result<(EventId, String)>>) -> anyhow::Result<()> {
        for event in events {
            let (id, text) = event?;
            let envelope = Envelope::read(id, &text);
            let key = envelope.as_ref().ok().and_then(Envelope::person_key);
            let mut state = self.lock();
            while state.unfinished() >= self.config.max_queued && !state.stopped {
                state = self.room.wait(state).expect("a mapping thread panicked");
            }
            if state.stopped {
                return Ok(());
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.slots.insert(
                seq,
                Slot::Waiting {
                    since: Instant::now(),
                    key: key.clone(),
                },
            );
            state.queue.push_back(Queued {
                seq,
                key,
                id,
                text,
                envelope,
            });
            drop(state);
            self.work.notify_one();
        }
        Ok(())
    }

    /// One worker: the first queued event whose person is not being mapped.
    /// An `extra` one ends as soon as there is nothing for it.
    fn work(&self, timed: &(impl Fn(Duration) + Sync), extra: bool) {
        let mut state = self.lock();
        loop {
            if state.stopped || (extra && state.extra_workers > state.stuck.len()) {
                if extra {
                    state.extra_workers -= 1;
                }
                return;
            }
            let free = state
                .queue
                .iter()
                .position(|q| q.key.as_ref().is_none_or(|key| !state.busy.contains(key)));
            let Some(index) = free else {
                if state.input_done && state.queue.is_empty() {
                    if extra {
                        state.extra_workers -= 1;
                    }
                    return;
                }
                state = self.work.wait(state).expect("a mapping thread panicked");
                continue;
            };
            let job = state.queue.remove(index).expect("found above");
            if let Some(key) = &job.key {
                state.busy.insert(key.clone());
            }
            if let Some(slot) = state.slots.get_mut(&job.seq) {
                *slot = Slot::Mapping { since: Instant::now() };
            }
            drop(state);

            let Queued {
                seq,
                key,
                id,
                text,
                envelope,
            } = job;
            let started = Instant::now();
            let mapped = self.map(id, &text, envelope);
            timed(started.elapsed());
            let job = Taken { seq, key, text };

            state = self.lock();
            if let Some(key) = &job.key {
                state.busy.remove(key);
            }
            if state.stuck.remove(&job.seq) {
                // An extra worker may no longer be needed.
                self.work.notify_all();
            }
            if state.overtaken.remove(&job.seq) {
                state.late.push_back((mapped, job.text));
            } else {
                state.slots.insert(job.seq, Slot::Done(Box::new((mapped, job.text))));
            }
            self.progress.notify_one();
            // An event of this person may have been waiting for the key.
            if job.key.is_some() && !state.queue.is_empty() {
                self.work.notify_one();
            }
        }
    }

    /// Maps one event, again with a fresh instance while the plugin fails
    /// (reading the envelope again then: failures are rare, events many).
    fn map(&self, id: EventId, text: &str, envelope: Result<Envelope, String>) -> MappedEvent {
        let attempts = self.config.poison_attempts.max(1);
        let mut mapped = self.mapper.map_read(id, text, envelope);
        let mut tries = 1;
        while mapped.plugin_failed && tries < attempts {
            mapped = self.mapper.map(id, text);
            tries += 1;
        }
        if mapped.plugin_failed
            && let MappedOutcome::Error(reason) = &mut mapped.outcome
        {
            reason.push_str(&format!(" (poison: failed {tries} times with fresh instances)"));
        }
        mapped
    }

    /// Hands mapped events on in input order, letting the ones behind an
    /// event that takes too long overtake it.
    fn hand_on(&self, mut emit: impl FnMut(MappedEvent, String) -> bool, add_worker: impl Fn()) {
        let overtake_after = self.config.overtake_after;
        let mut state = self.lock();
        loop {
            let fields = &mut *state;
            let mut out: Vec<(MappedEvent, String)> = fields.late.drain(..).collect();
            let mut wake_in = overtake_after;
            while let Some(entry) = fields.slots.first_entry() {
                let held_since = match entry.get() {
                    Slot::Done(_) => None,
                    Slot::Mapping { since } => Some(*since),
                    // Waiting for a worker is not being stuck; waiting
                    // behind the same person's stuck event is.
                    Slot::Waiting { since, key } => match key {
                        Some(key) if fields.busy.contains(key) => Some(*since),
                        _ => break,
                    },
                };
                match held_since {
                    None => {
                        let Slot::Done(done) = entry.remove() else {
                            unreachable!()
                        };
                        out.push(*done);
                    }
                    Some(since) if since.elapsed() >= overtake_after => {
                        let seq = *entry.key();
                        let stuck = matches!(entry.remove(), Slot::Mapping { .. });
                        fields.overtaken.insert(seq);
                        if stuck {
                            fields.stuck.insert(seq);
                            if fields.extra_workers < MAX_EXTRA_WORKERS {
                                fields.extra_workers += 1;
                                add_worker();
                            }
                        }
                    }
                    Some(since) => {
                        wake_in = overtake_after.saturating_sub(since.elapsed());
                        break;
                    }
                }
            }
            if !out.is_empty() {
                drop(state);
                self.room.notify_one();
                for (mapped, text) in out {
                    if !emit(mapped, text) {
                        self.lock().stopped = true;
                        self.wake_all();
                        return;
                    }
                }
                state = self.lock();
                continue;
            }
            if state.stopped || (state.input_done && state.unfinished() == 0) {
                state.stopped = true;
                drop(state);
                self.wake_all();
                return;
            }
            state = self
                .progress
                .wait_timeout(state, wake_in.max(Duration::from_millis(1)))
                .expect("a mapping thread panicked")
                .0;
        }
    }
}
