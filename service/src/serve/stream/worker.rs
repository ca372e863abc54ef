//! A delivery worker on the stream. It holds leases on some partitions
//! (a key per partition in `chord_leases`, created only if absent, renewed
//! by compare-and-swap, expiring when not renewed), and for each one it
//! holds consumes the partition's events in stream order into the
//! delivery engine of their connection. The engine keeps one person's
//! events in order, retries transient failures with backoff while other
//! people's events go on, and reports each event's final outcome; only
//! then is the event acked (a dead letter is first stored in `CHORD_DLQ`).
//!
//! Why not NAK with a delay for a transient failure: the person's next
//! event may already be in the engine, and a redelivered earlier event
//! would then overtake nothing but arrive after it. Holding the event in
//! the engine, where its person's later events wait behind it, keeps order
//! and blocks no one else.
//!
//! Failure: a worker killed holds its leases until they expire
//! (`LEASE_TTL`). The worker that takes a partition next makes its
//! consumer anew, from the oldest event not acked (the stream is a work
//! queue, so every event still in it is unfinished), so the events the
//! dead worker had in flight come first, in their order. An event the
//! dead worker delivered but had not acked is not sent again if its
//! outcome record was stored: every outcome is recorded on
//! `chord.outcomes.<partition>` before the ack, and a worker reads its
//! partition's recent records before it hands any of its events out. One
//! delivered and killed before its record was stored is sent again (a
//! track is then dropped by the destination by its `unique_id`).
//!
//! Budget: each worker paces every account to the part of its budgets
//! that its partitions are of all partitions (`Budgets::set_share`), so
//! the workers together keep inside one budget per account.
//!
//! Balance: each worker heartbeats in `chord_workers`, and holds at most
//! its share (partitions / live workers, rounded up). A worker over its
//! share stops taking events of the extra partitions, lets those in flight
//! finish, and only then gives the lease up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::super::Shared;
use super::super::connections::Connection;
use super::super::engine::{Admit, Outcomes};
use super::{
    CONNECTION_HEADER, EVENTS_STREAM, LEASES_BUCKET, Log, OUTCOMES_STREAM, PERSON_HEADER, RECEIVED_AT_HEADER,
    WORKERS_BUCKET, outcome_subject,
};
use cdp_core::delivery::{EventOutcome, EventRecord};
use cdp_core::mapping::EventId;

/// A lease or heartbeat not renewed for this long is gone.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(8);
/// The lease fence's margin. A worker sends an event only while its last
/// successful renewal of the event's partition was sent less than
/// `LEASE_TTL - FENCE_MARGIN` ago (the lease cannot have expired before
/// `LEASE_TTL` after that), and a worker that takes a partition waits
/// `FENCE_MARGIN` before it reads it: the old holder stops sending at
/// least twice the margin before the new one starts.
const FENCE_MARGIN: Duration = Duration::from_secs(2);
/// How often leases are renewed and the share looked at again.
const TICK: Duration = Duration::from_secs(2);
/// How long JetStream waits for an ack before it sends an event again to
/// the same consumer. Short, because an event can be lost on its way to
/// the worker (a node killed between the consumer's leader and the
/// worker's connection): JetStream then counts it as handed out, and only
/// this timer brings it back. An event still in an engine after
/// `PROGRESS_AFTER` is kept from coming back by a progress signal, and one
/// that comes back anyway is found in `pending` and not handed out twice.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// An event held this long in an engine (retries, Retry-After) gets a
/// progress signal, so JetStream keeps waiting for it.
const PROGRESS_AFTER: Duration = Duration::from_secs(3);
/// How long one ack waits for JetStream to confirm it, and how many times
/// an unconfirmed ack is sent again before the event is left to come back.
const ACK_CONFIRM: Duration = Duration::from_secs(2);
const ACK_TRIES: u32 = 10;
/// An ack not confirmed this soon closes its partition's fence: the
/// partition is given up and read again from its oldest unacked event, so
/// that few of its events are sent while their acks may be lost (an event
/// whose ack is lost comes back, and another worker would send it again,
/// behind its person's newer events).
const ACK_SLOW: Duration = Duration::from_secs(1);
/// Events of one partition handed out and not yet acked, at most. A
/// connection that cannot take its events now (paused, failing, over its
/// bound) has them parked in this room, without their bodies, so that the
/// partition's other connections go on: only a connection with this many
/// events parked in one partition holds that partition up.
const MAX_ACK_PENDING: i64 = 4_096;
/// Bytes of events one pull asks for, at most. JetStream ends a pull whose
/// next event is larger, so this must exceed the largest event ingest
/// takes (1 MiB, with its headers).
const PULL_BYTES: usize = 4 << 20;
/// How often parked events are offered again besides when room is freed
/// (a connection resumed, one made on another host).
const UNPARK_EVERY: Duration = Duration::from_millis(250);

/// An event read from the stream and not yet acked (or acked and not yet
/// confirmed): in an engine, or parked.
struct Pending {
    /// Where acks and progress signals for its newest delivery go.
    reply: Option<async_nats::Subject>,
    /// Its partition's subject, its `Nats-Msg-Id`, and when ingest received it.
    subject: String,
    event: String,
    received_at: Option<String>,
    in_flight: Arc<AtomicUsize>,
    /// The partition it was read from (the fence asks about its lease).
    partition: u32,
    /// When JetStream last heard of it from us (handed out, or progress).
    signalled: tokio::time::Instant,
}

/// A partition this worker holds.
struct Held {
    /// The lease's revision now (each renewal moves it).
    revision: u64,
    /// Its revision when this worker took it: names the consumer this
    /// holding reads through.
    taken: u64,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Its events handed out and not yet acked.
    in_flight: Arc<AtomicUsize>,
    /// Giving it up: no new events; the lease goes once none is in flight.
    releasing: bool,
}

struct Worker {
    id: String,
    log: Arc<Log>,
    shared: Arc<Shared>,
    leases: kv::Store,
    workers: kv::Store,
    events: jetstream::stream::Stream,
    pending: std::sync::Mutex<HashMap<u64, Pending>>,
    /// For each partition held, when its last successful renewal (or its
    /// taking) was sent: what the fence reads.
    renewed: std::sync::Mutex<HashMap<u32, tokio::time::Instant>>,
    /// Events settled lately, by this worker or (read from their records
    /// when it starts reading a partition) by another: one that comes back
    /// (an ack JetStream never confirmed, lost when its consumer's leader
    /// changed, or sent by a worker that died or lost the partition before
    /// it was confirmed) is acked again, not delivered again behind its
    /// person's newer events.
    settled: std::sync::Mutex<Settled>,
}

/// The sequences of events settled lately, oldest first, bounded in count
/// and age; each with a hash of its `Nats-Msg-Id`, so that a sequence of a
/// stream made anew (numbered from 1 again) is not taken for another's.
#[derive(Default)]
struct Settled {
    order: std::collections::VecDeque<(u64, tokio::time::Instant)>,
    known: HashMap<u64, u64>,
}

/// How many settled events, and for how long, a worker remembers: long
/// past `ACK_WAIT` and a consumer's rebuild, in about 10 MiB at most.
/// Records are read back from at most `SETTLED_FOR` ago.
const SETTLED_KEPT: usize = 200_000;
const SETTLED_FOR: Duration = Duration::from_secs(600);
/// Records are read from this long before the oldest unfinished event of
/// a partition was received: ingest hosts' clocks and the servers' differ.
const CLOCK_SLACK: Duration = Duration::from_secs(60);
/// How long reading a partition's records may hold its first event.
const RECORDS_WAIT: Duration = Duration::from_secs(30);

/// The key a settled event is known by besides its sequence.
fn event_key(nats_msg_id: &str) -> u64 {
    super::fnv1a(nats_msg_id.as_bytes())
}

impl Settled {
    fn newest(&self) -> u64 {
        self.known.keys().copied().max().unwrap_or(0)
    }

    fn insert(&mut self, sequence: u64, key: u64) {
        let now = tokio::time::Instant::now();
        while let Some(&(oldest, at)) = self.order.front() {
            if self.order.len() < SETTLED_KEPT && now.duration_since(at) < SETTLED_FOR {
                break;
            }
            self.order.pop_front();
            self.known.remove(&oldest);
        }
        if self.known.insert(sequence, key).is_none() {
            self.order.push_back((sequence, now));
        }
    }

    fn contains(&self, sequence: u64, key: u64) -> bool {
        self.known.get(&sequence) == Some(&key)
    }
}

/// The people of one read of a partition that it handed out an event of
/// that no record had settled. A settled event of such a person, read
/// for the first time in this read, is sent again rather than acked: its
/// person's older event, which was not settled, has just been sent, and
/// skipping the newer one would leave Klaviyo with the older values. (A
/// worker that records events out of order, or dies between two records,
/// leaves such a gap.) Only events up to the newest settled when the read
/// began can be settled on their first delivery to it, so people are kept
/// only until the read passes that sequence, and for at most
/// `RESENDING_KEPT` people; past that, settled events are acked as before.
#[derive(Default)]
struct Resending {
    /// Hashes of person keys (`PERSON_HEADER`).
    people: HashSet<u64>,
    /// The newest sequence settled when the read began.
    until: u64,
}

const RESENDING_KEPT: usize = 100_000;

/// A partition's events whose connection cannot take them now, by
/// connection, in stream order: a connection's later events queue behind
/// its parked ones, so each person's order holds. Dropped with the
/// partition's reader: its events are then read again in order.
struct Parked {
    worker: Arc<Worker>,
    /// Each connection's parked events: sequence and body size.
    queues: HashMap<String, VecDeque<(u64, usize)>>,
    /// Connections this host does not have, told of once.
    unknown: HashSet<String>,
}

impl Parked {
    fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    fn holds(&self, connection: &str) -> bool {
        self.queues.contains_key(connection)
    }

    fn push(&mut self, connection: String, sequence: u64, size: usize) {
        self.queues.entry(connection).or_default().push_back((sequence, size));
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        for (sequence, _) in self.queues.values().flatten() {
            self.worker.forget(*sequence);
        }
    }
}

/// Runs a delivery worker until `stop` turns true; then stops taking
/// events, lets those in flight finish (for at most `grace`), and gives
/// its leases up so that other workers take the partitions at once.
pub(crate) async fn run(
    log: Arc<Log>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    mut outcomes: Outcomes,
) -> anyhow::Result<()> {
    let js = &log.js;
    // A cluster just started may not answer yet: a worker that gave up
    // here would deliver nothing for the life of the process, so it waits
    // (until told to stop).
    let (leases, workers, events) = loop {
        let opened = async {
            anyhow::Ok((
                js.get_key_value(LEASES_BUCKET).await?,
                js.get_key_value(WORKERS_BUCKET).await?,
                js.get_stream(EVENTS_STREAM).await?,
            ))
        };
        match opened.await {
            Ok(opened) => break opened,
            Err(e) => {
                tracing::warn!("the delivery worker cannot open the stream's buckets yet: {e:#}; trying again");
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let worker = Arc::new(Worker {
        id: shared.host_id.clone(),
        leases,
        workers,
        events,
        log: log.clone(),
        shared,
        pending: Default::default(),
        renewed: Default::default(),
        settled: Default::default(),
    });
    // No event leaves this host for a partition whose lease it cannot
    // prove it still holds.
    let fenced = Arc::downgrade(&worker);
    let fence: Box<dyn Fn(EventId) -> bool + Send + Sync> = Box::new(move |id| match id {
        EventId::Stream(sequence) => fenced.upgrade().is_some_and(|w| w.may_send(sequence)),
        _ => true,
    });
    if worker.shared.connections.fence.set(fence).is_err() {
        anyhow::bail!("a second delivery worker on one host");
    }
    tracing::info!(worker = %worker.id, partitions = log.options.partitions, "delivery worker started");
    let acker = tokio::spawn({
        let worker = worker.clone();
        async move {
            while let Some((connection, record)) = outcomes.recv().await {
                worker.settle(&connection, record).await;
            }
        }
    });
    let mut held: HashMap<u32, Held> = HashMap::new();
    loop {
        worker.signal_progress().await;
        if let Err(e) = worker.tick(&mut held).await {
            tracing::warn!(worker = %worker.id, "keeping the partitions: {e:#}");
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    // Stop taking events; let those in flight finish and be acked.
    for h in held.values() {
        let _ = h.stop.send(true);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !worker.pending.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more is sent from here, then the leases go.
    worker.renewed.lock().unwrap().clear();
    for (partition, h) in held {
        h.task.abort();
        let _ = worker.leases.delete(lease_key(partition)).await;
    }
    let _ = worker.workers.delete(&worker.id).await;
    acker.abort();
    tracing::info!(worker = %worker.id, "delivery worker stopped");
    Ok(())
}

fn lease_key(partition: u32) -> String {
    format!("p{partition}")
}

/// The consumer through which the holding of `partition` that took its
/// lease at `revision` reads it. Lease revisions only grow, so names tell
/// a later holding's reader from an earlier one's.
fn reader_name(partition: u32, revision: u64) -> String {
    format!("partition-{partition}-{revision}")
}

/// The lease revision a consumer of `partition` was named by
/// (`reader_name`); 0 for `partition-N`, the name every holding used
/// before; `None` for any other consumer.
fn reader_revision(name: &str, partition: u32) -> Option<u64> {
    let rest = name.strip_prefix("partition-")?;
    let (number, revision) = match rest.split_once('-') {
        Some((number, revision)) => (number, revision.parse().ok()?),
        None => (rest, 0),
    };
    (number.bytes().all(|b| b.is_ascii_digit()) && number.parse::<u32>().ok()? == partition).then_some(revision)
}

impl Worker {
    /// Heartbeat, renew, give up what is over the share, take what is under.
    async fn tick(self: &Arc<Self>, held: &mut HashMap<u32, Held>) -> anyhow::Result<()> {
        // Renew first, whatever else fails; a lease not renewed (lost,
        // taken, or NATS not answering) is dropped at once, and the fence
        // stops its events from leaving.
        let mut lost = Vec::new();
        for (partition, h) in held.iter_mut() {
            let sent = tokio::time::Instant::now();
            match self
                .leases
                .update(lease_key(*partition), self.id.clone().into(), h.revision)
                .await
            {
                Ok(revision) => {
                    h.revision = revision;
                    // Renewed, but too late if the fence closed meanwhile:
                    // events it dropped would come back behind newer ones
                    // this worker went on to send. The partition is given
                    // up, to be read again from its oldest unacked event.
                    let mut renewed = self.renewed.lock().unwrap();
                    let fenced = renewed
                        .get(partition)
                        .is_none_or(|last| last.elapsed() >= LEASE_TTL - FENCE_MARGIN);
                    if fenced {
                        renewed.remove(partition);
                        tracing::warn!(worker = %self.id, partition, "renewed the lease only after its fence had closed; giving the partition up");
                        lost.push(*partition);
                    } else {
                        renewed.insert(*partition, sent);
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = %self.id, partition, "lost the lease: {e}");
                    lost.push(*partition);
                }
            }
        }
        for partition in lost {
            self.renewed.lock().unwrap().remove(&partition);
            if let Some(h) = held.remove(&partition) {
                let _ = h.stop.send(true);
                // Ours still if the renewal was late: let it go at once.
                let _ = self
                    .leases
                    .delete_expect_revision(lease_key(partition), Some(h.revision))
                    .await;
            }
        }
        self.workers.put(&self.id, self.id.clone().into()).await?;
        let mut live = 0u32;
        let mut keys = self.workers.keys().await?;
        while let Some(key) = keys.next().await {
            live += u32::from(key.is_ok());
        }
        let partitions = self.log.options.partitions;
        let share = partitions.div_ceil(live.max(1)) as usize;

        // A consumer that ended (an error) starts again.
        for (partition, h) in held.iter_mut() {
            if h.task.is_finished() && !h.releasing {
                let (stop, stopped) = watch::channel(false);
                h.stop = stop;
                h.task = tokio::spawn(
                    self.clone()
                        .consume(*partition, h.taken, h.in_flight.clone(), stopped, false),
                );
            }
        }
        // Over the share: give up the extra ones once their events are done.
        let keeping = held.values().filter(|h| !h.releasing).count();
        if keeping > share {
            for (_, h) in held.iter_mut().filter(|(_, h)| !h.releasing).take(keeping - share) {
                h.releasing = true;
                let _ = h.stop.send(true);
            }
        }
        let done: Vec<u32> = held
            .iter()
            .filter(|(_, h)| h.releasing && h.in_flight.load(Ordering::Acquire) == 0)
            .map(|(p, _)| *p)
            .collect();
        for partition in done {
            let h = held.remove(&partition).expect("listed above");
            self.renewed.lock().unwrap().remove(&partition);
            h.task.abort();
            let _ = self
                .leases
                .delete_expect_revision(lease_key(partition), Some(h.revision))
                .await;
            tracing::info!(worker = %self.id, partition, "gave the partition up");
        }
        // Under the share: take free partitions, starting at a place of our own.
        let start = (super::fnv1a(self.id.as_bytes()) % u64::from(partitions)) as u32;
        for step in 0..partitions {
            if held.len() >= share {
                break;
            }
            let partition = (start + step) % partitions;
            if held.contains_key(&partition) {
                continue;
            }
            // Not while events this worker read from it under an earlier
            // lease are still here (the fence drops them unsent): they
            // would otherwise come back behind newer ones.
            if self.pending.lock().unwrap().values().any(|p| p.partition == partition) {
                continue;
            }
            let sent = tokio::time::Instant::now();
            if let Ok(revision) = self.leases.create(lease_key(partition), self.id.clone().into()).await {
                self.renewed.lock().unwrap().insert(partition, sent);
                tracing::info!(worker = %self.id, partition, "took the partition");
                let in_flight = Arc::new(AtomicUsize::new(0));
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(
                    self.clone()
                        .consume(partition, revision, in_flight.clone(), stopped, true),
                );
                held.insert(
                    partition,
                    Held {
                        revision,
                        taken: revision,
                        stop,
                        task,
                        in_flight,
                        releasing: false,
                    },
                );
            }
        }
        // The budget follows the partitions: people hash evenly over them,
        // so each worker's part of the traffic, and of every account's
        // budget, is the part of the partitions it holds. Together the
        // workers stay inside each budget.
        let keeping = held.values().filter(|h| !h.releasing).count() as u32;
        self.shared.connections.budgets().set_share(keeping, partitions);
        *self.shared.metrics.partitions_held.lock().unwrap() = Some(u64::from(keeping));
        Ok(())
    }

    /// Reads a partition from its oldest unfinished event, handing each to
    /// its connection's engine, until told to stop.
    /// `taken`: the lease's revision when this worker took it.
    /// `fresh`: the lease was just taken (not a restart of the reader).
    async fn consume(
        self: Arc<Self>,
        partition: u32,
        taken: u64,
        in_flight: Arc<AtomicUsize>,
        mut stop: watch::Receiver<bool>,
        fresh: bool,
    ) {
        // The last holder's fence closed at least FENCE_MARGIN before
        // its lease expired; this wait doubles that gap.
        if fresh {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(FENCE_MARGIN) => {}
            }
        }
        // A worker stopped (SIGSTOP, a long pause) past its lease wakes
        // here with the lease gone: it leaves the partition alone.
        if *stop.borrow() || !self.fence_open(partition) {
            return;
        }
        // Anew, from the oldest unacked event: a consumer left by an
        // earlier holder may have events out. It is this holding's own,
        // so that a holder whose lease lapsed while it was stopped, and
        // which wakes past the check above, reaches nothing of the next
        // holder's: its pulls name its own consumer, and it deletes only
        // consumers of holdings older than its own.
        if !self.clear_older_readers(partition, taken).await {
            tokio::time::sleep(TICK).await;
            return;
        }
        let name = reader_name(partition, taken);
        let made = self
            .events
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subjects: super::partition_filters(partition),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await;
        let mut consumer = match made {
            Ok(consumer) => consumer,
            Err(e) => {
                tracing::warn!(worker = %self.id, partition, "making the consumer: {e}");
                tokio::time::sleep(TICK).await;
                return;
            }
        };
        // Its replicas elect a leader first; a pull before that is lost.
        for _ in 0..50 {
            match consumer.info().await {
                Ok(info) if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        // Short pulls with heartbeats: a pull lost while a new consumer's
        // replicas settle was seen to stall a partition for the default
        // 30 s expiry.
        let pulled = consumer
            .stream()
            .max_messages_per_batch(256)
            // Large events are pulled a few at a time: what the client
            // holds for a partition stays small.
            .max_bytes_per_batch(PULL_BYTES)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(1))
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(worker = %self.id, partition, "reading the partition: {e}");
                tokio::time::sleep(TICK).await;
                return;
            }
        };
        let mut errors = 0;
        // The consumer numbers its deliveries 1, 2, 3…: a number skipped is
        // a delivery lost on its way here (a node killed in between), or
        // taken by another reader. Its event would come back only after the
        // ack wait, behind the person's later events; so the partition is
        // read again at once, from its oldest unfinished event, before
        // anything after the gap is handed out. The consumer was just made,
        // so its first delivery must be number 1.
        let mut next_delivery: Option<u64> = Some(1);
        let mut parked = Parked {
            worker: self.clone(),
            queues: HashMap::new(),
            unknown: HashSet::new(),
        };
        let mut unpark = tokio::time::interval(UNPARK_EVERY);
        let mut records_read = false;
        let mut resending = Resending::default();
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                _ = unpark.tick(), if !parked.is_empty() => {
                    self.unpark(&mut parked).await;
                    continue;
                }
                _ = self.shared.engines.room.notified(), if !parked.is_empty() => {
                    self.unpark(&mut parked).await;
                    continue;
                }
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => {
                    errors = 0;
                    message
                }
                Some(Err(e)) => {
                    // A few in a row (the consumer gone with its node):
                    // the next tick makes it anew.
                    errors += 1;
                    tracing::debug!(worker = %self.id, partition, "reading the partition: {e}");
                    if errors > 3 {
                        tracing::warn!(worker = %self.id, partition, "reading the partition: {e}; starting it again");
                        return;
                    }
                    continue;
                }
                None => return,
            };
            if *stop.borrow() {
                return;
            }
            let delivery = message.info().map(|i| i.consumer_sequence).ok();
            if let (Some(expected), Some(delivery)) = (next_delivery, delivery)
                && delivery > expected
            {
                tracing::warn!(worker = %self.id, partition, expected, delivery, "a delivery was lost on its way here; reading the partition again from its oldest unfinished event");
                return;
            }
            next_delivery = delivery.map(|d| d + 1);
            if !records_read {
                // What other workers settled of this partition's events
                // and could not ack is known before any is handed out.
                records_read = true;
                let received_at = header_of(&message, RECEIVED_AT_HEADER);
                let read = tokio::select! {
                    _ = stop.changed() => return,
                    read = self.read_records(partition, received_at.as_deref()) => read,
                };
                if !read {
                    // Read again, records first, at the next tick.
                    return;
                }
                resending.until = self.settled.lock().unwrap().newest();
            }
            self.dispatch(message, partition, &in_flight, &mut parked, &mut resending);
        }
    }

    /// Hands one event to its connection's engine, or parks it when the
    /// connection cannot take it now.
    fn dispatch(
        self: &Arc<Self>,
        message: jetstream::Message,
        partition: u32,
        in_flight: &Arc<AtomicUsize>,
        parked: &mut Parked,
        resending: &mut Resending,
    ) {
        // Its sequence, and whether this is its first delivery to this read
        // (a later one is an ack of this read's own that was lost).
        let Ok((sequence, first)) = message.info().map(|i| (i.stream_sequence, i.delivered <= 1)) else {
            return;
        };
        let header = |name: &str| header_of(&message, name);
        let connection_id = header(CONNECTION_HEADER).unwrap_or_default();
        let event = header("Nats-Msg-Id").unwrap_or_default();
        let person = header(PERSON_HEADER)
            .filter(|_| sequence <= resending.until)
            .and_then(|p| u64::from_str_radix(&p, 16).ok());
        if sequence > resending.until && !resending.people.is_empty() {
            resending.people = HashSet::new();
        }
        let settled = self.settled.lock().unwrap().contains(sequence, event_key(&event));
        let resend = settled && first && person.is_some_and(|p| resending.people.contains(&p));
        if settled && !resend {
            // Settled already (here, or by a worker whose record says so),
            // its ack lost: acked again, not sent again.
            tokio::spawn(async move {
                if let Err(e) = message.double_ack().await {
                    tracing::debug!(sequence, "acking a settled event again: {e}");
                }
            });
            return;
        }
        let received_at = header(RECEIVED_AT_HEADER);
        {
            let mut pending = self.pending.lock().unwrap();
            if let Some(already) = pending.get_mut(&sequence) {
                // Read again (a new consumer, or the ack wait passed) while
                // still in an engine or parked: the ack goes through the
                // newest delivery.
                already.reply = message.reply.clone();
                already.signalled = tokio::time::Instant::now();
                return;
            }
            // Handed out afresh, and not settled before: its person's
            // settled events later in this read are sent again.
            if !settled
                && first
                && let Some(person) = person
                && resending.people.len() < RESENDING_KEPT
            {
                resending.people.insert(person);
            }
            in_flight.fetch_add(1, Ordering::AcqRel);
            pending.insert(
                sequence,
                Pending {
                    reply: message.reply.clone(),
                    subject: message.subject.to_string(),
                    event,
                    received_at: received_at.clone(),
                    in_flight: in_flight.clone(),
                    partition,
                    signalled: tokio::time::Instant::now(),
                },
            );
        }
        let connection = self.shared.connections.get(&connection_id);
        if let Some(connection) = &connection
            && !parked.holds(&connection_id)
            && connection.state().delivers()
        {
            let id = EventId::Stream(sequence);
            match self.shared.engines.try_admit(connection, id, message.payload.len()) {
                Admit::Admitted => {
                    let body = String::from_utf8_lossy(&message.payload).into_owned();
                    if !self
                        .shared
                        .engines
                        .hand(connection, id, body, None, received_at.as_deref())
                    {
                        // Shutting down: it stays unacked, for later.
                        self.forget(sequence);
                    }
                    return;
                }
                // Still in the engine under a delivery this worker let go
                // of (left unsent: the fence, or shutting down) and about
                // to be released: parked, so that it is handed in once
                // it is out and its connection's later events wait
                // behind it (handed none, it would stay pending here
                // with nothing to send it, and come to another worker
                // only after its person's newer events).
                Admit::AlreadyIn | Admit::Full => {}
            }
        }
        if connection.is_none() && parked.unknown.insert(connection_id.clone()) {
            tracing::warn!(worker = %self.id, connection = %connection_id, "events for a connection this host does not have wait, parked, until it does");
        }
        parked.push(connection_id, sequence, message.payload.len());
    }

    /// Hands parked events on, in order, to the connections that can take
    /// them now. Their bodies are read from the stream again.
    async fn unpark(self: &Arc<Self>, parked: &mut Parked) {
        let ids: Vec<String> = parked.queues.keys().cloned().collect();
        for connection_id in ids {
            let Some(connection) = self
                .shared
                .connections
                .get(&connection_id)
                .filter(|c| c.state().delivers())
            else {
                continue;
            };
            let queue = parked.queues.get_mut(&connection_id).expect("listed above");
            while let Some(&(sequence, size)) = queue.front() {
                let id = EventId::Stream(sequence);
                match self.shared.engines.try_admit(&connection, id, size) {
                    // In the engine still (see `dispatch`): waits until
                    // it is released.
                    Admit::Full | Admit::AlreadyIn => break,
                    Admit::Admitted => {}
                }
                match self.events.get_raw_message(sequence).await {
                    Ok(stored) => {
                        queue.pop_front();
                        let body = String::from_utf8_lossy(&stored.payload).into_owned();
                        let received_at = self
                            .pending
                            .lock()
                            .unwrap()
                            .get(&sequence)
                            .and_then(|p| p.received_at.clone());
                        if !self
                            .shared
                            .engines
                            .hand(&connection, id, body, None, received_at.as_deref())
                        {
                            self.forget(sequence);
                        }
                    }
                    Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                        // Gone from the stream (acked through another
                        // delivery): nothing to send.
                        queue.pop_front();
                        self.shared.engines.release(&connection, id, false);
                        self.forget(sequence);
                    }
                    Err(e) => {
                        // Tried again at the next turn.
                        self.shared.engines.release(&connection, id, false);
                        tracing::debug!(worker = %self.id, sequence, "reading a parked event: {e}");
                        return;
                    }
                }
            }
        }
        parked.queues.retain(|_, queue| !queue.is_empty());
    }

    /// The fence: whether this worker may send the event now, that is,
    /// whether it renewed the lease of the event's partition recently
    /// enough that no other worker can hold it.
    fn may_send(&self, sequence: u64) -> bool {
        let Some(partition) = self.pending.lock().unwrap().get(&sequence).map(|p| p.partition) else {
            return false;
        };
        self.fence_open(partition)
    }

    /// Whether this worker renewed (or took) `partition`'s lease recently
    /// enough that no other worker can hold it.
    fn fence_open(&self, partition: u32) -> bool {
        self.renewed
            .lock()
            .unwrap()
            .get(&partition)
            .is_some_and(|sent| sent.elapsed() < LEASE_TTL - FENCE_MARGIN)
    }

    /// Deletes the consumers of `partition` made by holdings up to
    /// `taken` (this one's own, when its reader starts again), so that
    /// this holding reads from the oldest unacked event. False, to try
    /// again later, when they cannot all be listed and deleted, or when a
    /// later holding's consumer is there: the lease has passed on.
    async fn clear_older_readers(&self, partition: u32, taken: u64) -> bool {
        let mut older = Vec::new();
        let mut names = self.events.consumer_names();
        while let Some(name) = names.next().await {
            let name = match name {
                Ok(name) => name,
                Err(e) => {
                    tracing::warn!(worker = %self.id, partition, "listing the partition's readers: {e}");
                    return false;
                }
            };
            match reader_revision(&name, partition) {
                Some(revision) if revision > taken => {
                    tracing::warn!(worker = %self.id, partition, reader = %name, "a later holder reads the partition; leaving it");
                    return false;
                }
                Some(_) => older.push(name),
                None => {}
            }
        }
        for name in older {
            if let Err(e) = self.events.delete_consumer(&name).await {
                tracing::warn!(worker = %self.id, partition, reader = %name, "deleting an earlier reader: {e}");
                return false;
            }
        }
        true
    }

    /// Stops the partition of an event whose record or ack went
    /// unconfirmed from sending more: its fence closes, and the next
    /// renewal gives it up.
    fn close_fence(&self, sequence: u64, why: &str) {
        let Some(partition) = self.pending.lock().unwrap().get(&sequence).map(|p| p.partition) else {
            return;
        };
        if self.renewed.lock().unwrap().remove(&partition).is_some() {
            tracing::warn!(worker = %self.id, partition, "{why}; the partition stops sending and is given up, to be read again from its oldest unfinished event");
        }
    }

    /// Lets go of an event read and not finished: it stays in the stream,
    /// and a new delivery of it is handed out afresh.
    fn forget(&self, sequence: u64) {
        if let Some(p) = self.pending.lock().unwrap().remove(&sequence) {
            p.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Makes an outcome final in the stream: a dead letter stored, then
    /// the event acked; then its room in the engine is freed.
    async fn settle(self: &Arc<Self>, connection: &Arc<Connection>, record: EventRecord) {
        let EventId::Stream(sequence) = record.id else {
            return;
        };
        let known = self
            .pending
            .lock()
            .unwrap()
            .get(&sequence)
            .map(|p| (p.subject.clone(), p.event.clone(), p.received_at.clone(), p.partition));
        let Some((subject, event, received_at, partition)) = known else {
            self.shared.engines.release(connection, record.id, false);
            return;
        };
        if let EventOutcome::Abandoned(_) = &record.outcome {
            // Not acked: the partition's holder delivers it.
            self.forget(sequence);
            self.shared.engines.release(connection, record.id, false);
            return;
        }
        let state = match &record.outcome {
            EventOutcome::Delivered { .. } => "delivered",
            EventOutcome::Skipped(_) => "skipped",
            EventOutcome::DeadLettered(_) => "dead",
            EventOutcome::Abandoned(_) => unreachable!("returned above"),
        };
        if let EventOutcome::DeadLettered(letter) = &record.outcome {
            let stored = super::dead::store(&self.log, &connection.id, sequence, &subject, &record, letter).await;
            if let Err(e) = stored {
                // Not acked: the event is delivered again later.
                tracing::error!(connection = %connection.id, "storing a dead letter: {e:#}");
                self.forget(sequence);
                self.shared.engines.release(connection, record.id, false);
                return;
            }
        }
        // The record of the outcome, with the version that mapped the
        // event.
        let outcome = serde_json::json!({
            "sequence": sequence,
            "connection": connection.id,
            "message_id": record.message_id,
            "state": state,
            "reason": match &record.outcome {
                EventOutcome::Skipped(reason) => Some(reason.as_str()),
                EventOutcome::DeadLettered(letter) => Some(letter.reason.as_str()),
                EventOutcome::Delivered { .. } | EventOutcome::Abandoned(_) => None,
            },
            "plugin_version": record.plugin_version,
            "received_at": received_at,
            "finished_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "worker": self.id,
            "subject": subject,
            "event": event,
        });
        // The record is stored, then the ack sent and confirmed, off this
        // loop (a round trip to the replicas each; waiting here bounded a
        // worker to about 900 events a second). Until the ack is confirmed
        // the event stays pending, so a delivery of it that comes back
        // meanwhile is not handed to the engine again; and if the ack is
        // lost, whichever worker reads the partition next finds the record
        // and acks the event without sending it.
        let (worker, connection) = (self.clone(), connection.clone());
        tokio::spawn(async move {
            worker.record(sequence, partition, outcome.to_string()).await;
            worker.ack_confirmed(sequence, &connection).await;
            worker.settled.lock().unwrap().insert(sequence, event_key(&event));
            worker.forget(sequence);
            worker
                .shared
                .engines
                .release(&connection, EventId::Stream(sequence), true);
        });
    }

    /// Stores an event's outcome record on its partition's subject and
    /// waits for JetStream to confirm it (see `confirmed`).
    async fn record(&self, sequence: u64, partition: u32, record: String) {
        let stored = self
            .confirmed(sequence, "its outcome record was not stored", || {
                let record = record.clone();
                Some(async move {
                    let stored = self.log.js.publish(outcome_subject(partition), record.into()).await?;
                    stored.await?;
                    anyhow::Ok(())
                })
            })
            .await;
        if let Err(e) = stored {
            tracing::warn!(
                partition,
                sequence,
                "JetStream did not store the outcome record after {ACK_TRIES} tries ({e}); if the ack is lost too, the event will be sent again"
            );
        }
    }

    /// Acks an event and waits for JetStream to confirm it (see
    /// `confirmed`), through the newest delivery of the event. An ack that
    /// is never confirmed leaves the event to come back after `ACK_WAIT`,
    /// to be acked without sending if its record was stored; that is
    /// logged.
    async fn ack_confirmed(&self, sequence: u64, connection: &Connection) {
        let client = self.log.js.client();
        let acked = self
            .confirmed(sequence, "an ack was not confirmed", || {
                let reply = self.pending.lock().unwrap().get(&sequence)?.reply.clone()?;
                let client = client.clone();
                Some(async move {
                    client.request(reply, bytes::Bytes::from_static(b"+ACK")).await?;
                    anyhow::Ok(())
                })
            })
            .await;
        if let Err(e) = acked {
            tracing::warn!(connection = %connection.id, sequence, "JetStream did not confirm the ack after {ACK_TRIES} tries ({e}); the event will come again");
        }
    }

    /// Tries a request to JetStream until it is confirmed or `ACK_TRIES`
    /// have failed (backing off), waiting `ACK_SLOW` for the first answer
    /// and `ACK_CONFIRM` for each later one. A first try that fails closes
    /// the event's partition's fence: what the partition sent from then on
    /// could come back to another worker with no record or ack to stop
    /// it. `attempt` gives none when there is nothing to try any more
    /// (the event is no longer pending): that counts as done.
    async fn confirmed<F, A>(&self, sequence: u64, why: &str, mut attempt: A) -> Result<(), String>
    where
        A: FnMut() -> Option<F>,
        F: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut last_error = String::new();
        for tried in 0..ACK_TRIES {
            let Some(request) = attempt() else {
                return Ok(());
            };
            let wait = if tried == 0 { ACK_SLOW } else { ACK_CONFIRM };
            match tokio::time::timeout(wait, request).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_error = format!("{e:#}"),
                Err(_) => last_error = "no confirmation in time".to_string(),
            }
            if tried == 0 {
                self.close_fence(sequence, &format!("{why}: {last_error}"));
            }
            tokio::time::sleep(Duration::from_millis(100 << tried.min(4))).await;
        }
        Err(last_error)
    }

    /// Reads the outcome records of a partition's events from when its
    /// oldest unfinished event was received (`received_at`; at most
    /// `SETTLED_FOR` back) into `settled`: an event another worker settled
    /// and could not ack is then acked here, not sent again. Tried again
    /// for up to `RECORDS_WAIT`; false if they could not be read, and then
    /// none of the partition's events is handed out.
    async fn read_records(&self, partition: u32, received_at: Option<&str>) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        let earliest = now - SETTLED_FOR.as_nanos() as i128;
        let received = received_at
            .and_then(|r| chrono::DateTime::parse_from_rfc3339(r).ok())
            .and_then(|r| r.timestamp_nanos_opt())
            .map(|r| i128::from(r) - CLOCK_SLACK.as_nanos() as i128);
        let from = received.map_or(earliest, |r| r.max(earliest));
        let deadline = tokio::time::Instant::now() + RECORDS_WAIT;
        let mut last_error = String::new();
        while tokio::time::Instant::now() < deadline {
            let left = deadline - tokio::time::Instant::now();
            match tokio::time::timeout(left, self.read_records_from(partition, from)).await {
                Ok(Ok(learned)) => {
                    tracing::debug!(worker = %self.id, partition, learned, "read the partition's outcome records");
                    return true;
                }
                Ok(Err(e)) => last_error = format!("{e:#}"),
                Err(_) => last_error = "no answer in time".to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::warn!(worker = %self.id, partition, "cannot read the partition's outcome records ({last_error}); its events wait until they can be read");
        false
    }

    /// One try of `read_records`, from `from` (nanoseconds since the epoch).
    async fn read_records_from(&self, partition: u32, from: i128) -> anyhow::Result<usize> {
        #[derive(serde::Deserialize)]
        struct Record {
            sequence: u64,
            event: Option<String>,
        }
        let start_time = async_nats::datetime::from_nanos(from).map_err(|e| anyhow::anyhow!("{e}"))?;
        let records = self.log.js.get_stream(OUTCOMES_STREAM).await?;
        let mut consumer = records
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: outcome_subject(partition),
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
                ..Default::default()
            })
            .await?;
        if consumer.info().await?.num_pending == 0 {
            return Ok(0);
        }
        let mut messages = consumer.messages().await?;
        let mut learned = 0;
        while let Some(message) = messages.next().await {
            let message = message?;
            // Records of hosts before this one name no event: left.
            if let Ok(Record {
                sequence,
                event: Some(event),
            }) = serde_json::from_slice(&message.payload)
            {
                self.settled.lock().unwrap().insert(sequence, event_key(&event));
                learned += 1;
            }
            if message.info().map_or(true, |i| i.pending == 0) {
                return Ok(learned);
            }
        }
        anyhow::bail!("the records ended before the last one was read")
    }

    /// Tells JetStream that events held long in an engine are still being
    /// worked on, so that it does not hand them out again.
    async fn signal_progress(&self) {
        let now = tokio::time::Instant::now();
        let held: Vec<async_nats::Subject> = {
            let mut pending = self.pending.lock().unwrap();
            pending
                .values_mut()
                .filter(|p| now.duration_since(p.signalled) >= PROGRESS_AFTER)
                .filter_map(|p| {
                    p.signalled = now;
                    p.reply.clone()
                })
                .collect()
        };
        let client = self.log.js.client();
        for reply in held {
            if let Err(e) = client.publish(reply, bytes::Bytes::from_static(b"+WPI")).await {
                tracing::debug!("signalling progress: {e}");
            }
        }
    }
}

/// One header of an event, if it has it.
fn header_of(message: &jetstream::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::{reader_name, reader_revision};

    #[test]
    fn a_readers_name_gives_its_holdings_revision_for_its_partition_only() {
        assert_eq!(reader_revision(&reader_name(3, 1234), 3), Some(1234));
        assert_eq!(reader_revision(&reader_name(13, 7), 13), Some(7));
        // The name of a holding before readers were named by revision.
        assert_eq!(reader_revision("partition-3", 3), Some(0));
        for (name, partition) in [
            (reader_name(13, 7).as_str(), 3),
            ("partition-3-1234", 13),
            ("partition-31", 3),
            ("partition-+3-1", 3),
            ("partition-3-x", 3),
            ("partition-3-", 3),
            ("dead-letters", 3),
        ] {
            assert_eq!(reader_revision(name, partition), None, "{name}");
        }
    }
}
