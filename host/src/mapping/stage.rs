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
    /// Mapping threads. More than the cores pays: a worker stuck on a
    /// plugin's loop mostly waits for its deadline's tick.
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
    /// Workers by default: four per core, at least eight.
    pub fn default_workers() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        (cores * 4).max(8)
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

/// The workers, the order they hand events on in, and where they go.
pub struct MappingStage {
    mapper: EventMapper,
    config: StageConfig,
    state: Mutex<State>,
    changed: Condvar,
}

/// An event read and not yet started.
struct Queued {
    seq: u64,
    key: Option<String>,
    id: EventId,
    text: String,
    envelope: Result<Envelope, String>,
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
            changed: Condvar::new(),
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
            for n in 0..self.config.workers.max(1) {
                let timed = &timed;
                std::thread::Builder::new()
                    .name(format!("mapping-{n}"))
                    .spawn_scoped(scope, move || self.work(timed))
                    .expect("spawning a mapping worker");
            }
            let sequencer = std::thread::Builder::new()
                .name("mapping-order".into())
                .spawn_scoped(scope, move || self.hand_on(emit))
                .expect("spawning the mapping sequencer");
            let read = self.read(events);
            let mut state = self.lock();
            state.input_done = true;
            if read.is_err() {
                state.stopped = true;
            }
            drop(state);
            self.changed.notify_all();
            sequencer.join().expect("the mapping sequencer panicked");
            read
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("a mapping thread panicked")
    }

    /// Reads the input into the queue, waiting while too much is unfinished.
    fn read(&self, events: impl Iterator<Item = anyhow::Result<(EventId, String)>>) -> anyhow::Result<()> {
        for event in events {
            let (id, text) = event?;
            let envelope = Envelope::read(id, &text);
            let key = envelope.as_ref().ok().and_then(Envelope::person_key);
            let mut state = self.lock();
            while state.unfinished() >= self.config.max_queued && !state.stopped {
                state = self.changed.wait(state).expect("a mapping thread panicked");
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
            self.changed.notify_all();
        }
        Ok(())
    }

    /// One worker: the first queued event whose person is not being mapped.
    fn work(&self, timed: &(impl Fn(Duration) + Sync)) {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return;
            }
            let free = state
                .queue
                .iter()
                .position(|q| q.key.as_ref().is_none_or(|key| !state.busy.contains(key)));
            let Some(index) = free else {
                if state.input_done && state.queue.is_empty() {
                    return;
                }
                state = self.changed.wait(state).expect("a mapping thread panicked");
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

            let started = Instant::now();
            let mapped = self.map(&job);
            timed(started.elapsed());

            state = self.lock();
            if let Some(key) = &job.key {
                state.busy.remove(key);
            }
            if state.overtaken.remove(&job.seq) {
                state.late.push_back((mapped, job.text));
            } else {
                state.slots.insert(job.seq, Slot::Done(Box::new((mapped, job.text))));
            }
            self.changed.notify_all();
        }
    }

    /// Maps one event, again with a fresh instance while the plugin fails.
    fn map(&self, job: &Queued) -> MappedEvent {
        let envelope = || match &job.envelope {
            Ok(envelope) => Ok(envelope.clone()),
            Err(reason) => Err(reason.clone()),
        };
        let attempts = self.config.poison_attempts.max(1);
        let mut mapped = self.mapper.map_read(job.id, &job.text, envelope());
        let mut tries = 1;
        while mapped.plugin_failed && tries < attempts {
            mapped = self.mapper.map_read(job.id, &job.text, envelope());
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
    fn hand_on(&self, mut emit: impl FnMut(MappedEvent, String) -> bool) {
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
                        entry.remove();
                        fields.overtaken.insert(seq);
                    }
                    Some(since) => {
                        wake_in = overtake_after.saturating_sub(since.elapsed());
                        break;
                    }
                }
            }
            if !out.is_empty() {
                drop(state);
                self.changed.notify_all();
                for (mapped, text) in out {
                    if !emit(mapped, text) {
                        self.lock().stopped = true;
                        self.changed.notify_all();
                        return;
                    }
                }
                state = self.lock();
                continue;
            }
            if state.stopped || (state.input_done && state.unfinished() == 0) {
                state.stopped = true;
                drop(state);
                self.changed.notify_all();
                return;
            }
            state = self
                .changed
                .wait_timeout(state, wake_in.max(Duration::from_millis(1)))
                .expect("a mapping thread panicked")
                .0;
        }
    }
}
