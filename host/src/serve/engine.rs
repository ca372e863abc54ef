//! One delivery engine per connection, whichever log keeps the events.
//!
//! A backend (the spool's feeder, a stream worker's partition readers)
//! *admits* an event, which takes room in its connection's bound and the
//! host's, and *hands* it in. The connection's engine, started at its
//! first event and stopped once it has been idle for `IDLE`, maps and
//! delivers it (in order per person, retrying while other people's events
//! go on) and sends each outcome, counted, to the backend's receiver. The
//! backend makes the outcome durable (a row written; a dead letter stored
//! and the message acked) and then *releases* the event, which frees its
//! room. Until then the event stays admitted, so a backend that reads it
//! again does not hand it out twice.
//!
//! Nothing here knows which backend it serves: the backends differ in how
//! they find events and how they settle them, not in how events are
//! delivered, counted or bounded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::connections::{self, Connection};
use super::metrics::Metrics;
use crate::delivery::{EventOutcome, EventRecord};
use crate::mapping::EventId;

/// A connection's engine stops after this long with nothing handed in
/// and nothing in flight (and starts again at its next event): idle
/// connections hold no threads.
pub(crate) const IDLE: Duration = Duration::from_secs(10);

/// How often an engine waiting for events looks whether it is idle.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// An event's room while it is admitted: its connection's and the host's.
pub(crate) type Held = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// An outcome, with the connection it belongs to.
type Outcome = (Arc<Connection>, EventRecord);

/// Outcomes on their way to the backend that settles them.
pub(crate) type Outcomes = tokio::sync::mpsc::UnboundedReceiver<Outcome>;

/// Whether an event was let in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Admitted,
    /// It is in already (handed out and not yet released).
    AlreadyIn,
    /// Its connection or the host has no room now; `Engines::room` is
    /// told when some is freed.
    Full,
}

struct Running {
    connection: Arc<Connection>,
    events: Sender<(EventId, String)>,
    task: tokio::task::JoinHandle<()>,
    /// Tells this engine from a later one of the same connection.
    serial: u64,
}

/// The engines of every connection on this host.
pub(crate) struct Engines {
    running: Mutex<HashMap<String, Running>>,
    serial: std::sync::atomic::AtomicU64,
    /// Events admitted across connections (`connections::HOST_EVENTS`).
    host: Arc<Semaphore>,
    outcomes: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Outcome>>>,
    metrics: Arc<Metrics>,
    closed: std::sync::atomic::AtomicBool,
    /// Told whenever an event is released (room freed).
    pub(crate) room: Notify,
}

impl Engines {
    /// The engines, and where their outcomes come out (for the backend
    /// that settles them).
    pub(crate) fn new(metrics: Arc<Metrics>) -> (Arc<Engines>, Outcomes) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let engines = Arc::new(Engines {
            running: Mutex::default(),
            serial: Default::default(),
            host: Arc::new(Semaphore::new(connections::HOST_EVENTS)),
            outcomes: Mutex::new(Some(tx)),
            metrics,
            closed: Default::default(),
            room: Notify::new(),
        });
        (engines, rx)
    }

    /// Lets an event in if its connection and the host have room for it.
    pub(crate) fn try_admit(&self, connection: &Connection, id: EventId) -> Admit {
        let mut in_flight = connection.in_flight.lock().unwrap();
        if in_flight.contains_key(&id) {
            return Admit::AlreadyIn;
        }
        let Ok(own) = connection.held.clone().try_acquire_owned() else {
            return Admit::Full;
        };
        let Ok(host) = self.host.clone().try_acquire_owned() else {
            return Admit::Full;
        };
        in_flight.insert(id, (own, host));
        Admit::Admitted
    }

    /// Lets an event in once its connection and the host have room for
    /// it; false if it is in already.
    pub(crate) async fn admit(&self, connection: &Connection, id: EventId) -> bool {
        if connection.in_flight.lock().unwrap().contains_key(&id) {
            return false;
        }
        let own = connection.held.clone().acquire_owned().await.expect("never closed");
        let host = self.host.clone().acquire_owned().await.expect("never closed");
        connection.in_flight.lock().unwrap().insert(id, (own, host));
        true
    }

    /// Frees an admitted event's room, once its outcome is final (or it
    /// was never handed in), and counts it finished if it was.
    pub(crate) fn release(&self, connection: &Connection, id: EventId, finished: bool) {
        connection.in_flight.lock().unwrap().remove(&id);
        if finished {
            self.metrics.finished.fetch_add(1, Ordering::Relaxed);
            connection.metrics.finished.fetch_add(1, Ordering::Relaxed);
        }
        self.room.notify_waiters();
    }

    /// Hands an admitted event to its connection's engine, starting one if
    /// none runs. False once the engines are closed (the service stops):
    /// the event is then released, unsent.
    pub(crate) fn hand(self: &Arc<Self>, connection: &Arc<Connection>, id: EventId, body: String) -> bool {
        let mut running = self.running.lock().unwrap();
        if self.closed.load(Ordering::Acquire) {
            drop(running);
            self.release(connection, id, false);
            return false;
        }
        let mut event = (id, body);
        if let Some(engine) = running.get(&connection.id)
            && Arc::ptr_eq(&engine.connection, connection)
        {
            match engine.events.send(event) {
                Ok(()) => return true,
                // Its engine stopped (idle) an instant ago.
                Err(std::sync::mpsc::SendError(back)) => event = back,
            }
        }
        // A new engine: after the last one of this id (deleted and made
        // anew, or stopped when idle) has finished what it had.
        let last = running.remove(&connection.id).map(|r| r.task);
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(event).expect("the receiver is here");
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(self.clone().run(connection.clone(), rx, serial, last));
        running.insert(
            connection.id.clone(),
            Running {
                connection: connection.clone(),
                events: tx,
                task,
                serial,
            },
        );
        true
    }

    /// How many engines run now.
    pub(crate) fn running(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    /// Takes no more events: each engine finishes what it has and stops.
    /// What to wait for.
    pub(crate) fn close(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut running = self.running.lock().unwrap();
        self.closed.store(true, Ordering::Release);
        let tasks = running.drain().map(|(_, r)| r.task).collect();
        self.outcomes.lock().unwrap().take();
        tasks
    }

    /// A connection's engine: delivers what is handed in until it is idle
    /// or closed.
    async fn run(
        self: Arc<Self>,
        connection: Arc<Connection>,
        events: Receiver<(EventId, String)>,
        serial: u64,
        last: Option<tokio::task::JoinHandle<()>>,
    ) {
        if let Some(last) = last {
            let _ = last.await;
        }
        let Some(outcomes) = self.outcomes.lock().unwrap().clone() else {
            return;
        };
        let input = {
            let (engines, connection) = (self.clone(), connection.clone());
            let mut last_event = Instant::now();
            std::iter::from_fn(move || {
                loop {
                    match events.recv_timeout(IDLE_CHECK) {
                        Ok(event) => {
                            last_event = Instant::now();
                            return Some(Ok(event));
                        }
                        Err(RecvTimeoutError::Disconnected) => return None,
                        Err(RecvTimeoutError::Timeout) => {
                            if last_event.elapsed() < IDLE || !connection.in_flight.lock().unwrap().is_empty() {
                                continue;
                            }
                            // Idle: stop, unless an event was handed in
                            // meanwhile (handing in takes this lock too).
                            let mut running = engines.running.lock().unwrap();
                            if let Ok(event) = events.try_recv() {
                                last_event = Instant::now();
                                return Some(Ok(event));
                            }
                            if running.get(&connection.id).is_some_and(|r| r.serial == serial) {
                                running.remove(&connection.id);
                            }
                            return None;
                        }
                    }
                }
            })
        };
        let observer = {
            let (engines, connection) = (self.clone(), connection.clone());
            move |record: &EventRecord| {
                engines.count(&connection, record);
                // The receiver goes with the service: a send fails only if
                // it is gone, and then the event stays unfinished.
                let _ = outcomes.send((connection.clone(), record.clone()));
            }
        };
        if let Err(e) = connection.delivery.run_events(input, observer).await {
            tracing::error!(connection = %connection.id, "delivery ended with an error: {e:#}");
        }
    }

    /// Counts an outcome, and logs a dead letter.
    fn count(&self, connection: &Connection, record: &EventRecord) {
        match &record.outcome {
            EventOutcome::Delivered { .. } => {}
            EventOutcome::Skipped(reason) => {
                self.metrics.skipped(reason);
                connection
                    .metrics
                    .skipped(connections::kind_label(record.kind.as_deref()));
            }
            EventOutcome::DeadLettered(letter) => {
                tracing::warn!(connection = %connection.id, event = %record.id, message_id = ?record.message_id, reason = %letter.reason, "dead-lettered");
            }
            EventOutcome::Abandoned(reason) => {
                tracing::debug!(connection = %connection.id, event = %record.id, "{reason}");
            }
        }
    }
}
