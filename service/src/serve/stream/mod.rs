//! `serve --stream`: the events kept in a replicated NATS JetStream stream
//! instead of the local spool, so that several hosts share one log. Ingest
//! hosts publish each event and answer 200 only once JetStream has stored
//! it (on the stream's replicas); delivery workers take partitions of the
//! stream, one worker per partition at a time, and ack each event only once
//! its outcome is final (`worker`). Dead letters go to a stream of their
//! own (`dead`).
//!
//! Layout in JetStream:
//! - `CHORD_EVENTS`, a work queue on `chord.events.<partition>.<connection>`
//!   (the connection id with `.` written `~`): an event stays until a
//!   worker acks it. The partition is a hash of the person key computed at
//!   ingest (userId, else anonymousId, else email), so one person's events
//!   share a partition and keep their order; the connection in the subject
//!   lets a host count a connection's unfinished events (a deletion waits
//!   for them). Streams made before carry `chord.events.<partition>` too,
//!   and workers read both. Each event
//!   carries `Nats-Msg-Id` = `<connection>:<messageId>`, so a sender's retry
//!   of what was stored already is dropped by the stream's dedupe window,
//!   and `Chord-Person`, a hash of its person key (see `worker`'s
//!   `Resending`).
//! - `CHORD_DLQ`, on `chord.dlq`: dead letters, kept until replayed or purged.
//! - `CHORD_OUTCOMES`, on `chord.outcomes.<partition>`: each event's
//!   outcome with the plugin version that mapped it and when it was received
//!   and finished, kept for a day. A worker publishes it *before* it acks
//!   the event, so that an event whose ack is lost and which comes back to
//!   another worker is found settled there and acked, not sent again (hosts
//!   before this published on `chord.outcomes`, which the stream still takes).
//! - KV buckets `chord_leases` (who holds each partition) and
//!   `chord_workers` (who is alive), both expiring what is not renewed.
//! - KV bucket `chord_active` (each connection's plugin version) and the
//!   object store `chord_plugins` (the versions' bytes): `plugins`.
//! - KV bucket `chord_connections`: each connection as the spool keeps it
//!   (write keys as hashes, secrets as their sources): `connections`.

pub mod access;
pub mod connections;
pub mod dead;
pub(crate) mod outcomes;
pub mod plugins;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use access::Trouble;
pub use access::{NatsAccess, NatsAuth, NatsTls};
use anyhow::Context;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderValue};

pub const EVENTS_STREAM: &str = "CHORD_EVENTS";
/// Every event subject: `chord.events.<partition>.<connection>` (and the
/// older `chord.events.<partition>`).
const EVENTS_SUBJECTS: &str = "chord.events.>";
pub const DLQ_STREAM: &str = "CHORD_DLQ";
pub const DLQ_SUBJECT: &str = "chord.dlq";
pub const OUTCOMES_STREAM: &str = "CHORD_OUTCOMES";
/// Where hosts before the records named their partition published them.
pub const OUTCOMES_SUBJECT: &str = "chord.outcomes";
/// Every partition's records.
pub(crate) const OUTCOMES_SUBJECTS: &str = "chord.outcomes.>";
/// How long outcome records are kept (as the spool keeps finished rows).
const OUTCOMES_KEPT: Duration = Duration::from_secs(24 * 3600);
const LEASES_BUCKET: &str = "chord_leases";
const WORKERS_BUCKET: &str = "chord_workers";
/// Headers each event carries besides `Nats-Msg-Id`.
pub const CONNECTION_HEADER: &str = "Chord-Connection";
pub const RECEIVED_AT_HEADER: &str = "Chord-Received-At";
/// A hash of the event's person key (hex), when it has one: a worker
/// tells one person's events from another's by it without reading bodies.
pub const PERSON_HEADER: &str = "Chord-Person";

/// What each host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes events over HTTP and publishes them; delivers nothing.
    Ingest,
    /// Delivers from the stream; its ingest endpoints refuse events.
    Deliver,
    Both,
}

impl Role {
    pub fn ingests(self) -> bool {
        self != Role::Deliver
    }

    pub fn delivers(self) -> bool {
        self != Role::Ingest
    }
}

/// How to reach the stream and how it is laid out.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The servers, and how this host proves who it is to them.
    pub access: NatsAccess,
    pub role: Role,
    /// Copies JetStream keeps of each event (and of the KV buckets): 3 in
    /// a cluster of three, so that one node may die.
    pub replicas: usize,
    /// Fixed for the life of the stream: every host must use the same.
    pub partitions: u32,
}

impl StreamOptions {
    pub const DEFAULT_PARTITIONS: u32 = 16;
}

/// The stream, its dead letters and the shared buckets, as one host uses them.
pub struct Log {
    pub(crate) js: jetstream::Context,
    pub(crate) options: StreamOptions,
    events: jetstream::stream::Stream,
}

/// One event to publish.
pub struct Outgoing {
    pub connection: String,
    pub message_id: String,
    pub received_at: String,
    pub body: String,
    /// Its person key (`mapping::person_key`), which picks its partition.
    pub person: Option<String>,
}

impl Log {
    /// Connects (to any of the servers; the client follows the cluster) and
    /// makes the streams and buckets if they are not there.
    pub async fn connect(options: StreamOptions) -> anyhow::Result<Log> {
        let (js, trouble) = context(&options.access).await?;
        let events = stream::Config {
            name: EVENTS_STREAM.to_string(),
            subjects: vec![EVENTS_SUBJECTS.to_string()],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: options.replicas,
            duplicate_window: Duration::from_secs(120),
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let dlq = stream::Config {
            name: DLQ_STREAM.to_string(),
            subjects: vec![DLQ_SUBJECT.to_string()],
            num_replicas: options.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // A cluster just started elects its leaders first: wait for it.
        let deadline = tokio::time::Instant::now() + SETUP_WAIT;
        loop {
            let outcomes = stream::Config {
                name: OUTCOMES_STREAM.to_string(),
                subjects: vec![OUTCOMES_SUBJECT.to_string(), OUTCOMES_SUBJECTS.to_string()],
                num_replicas: options.replicas,
                max_age: OUTCOMES_KEPT,
                storage: stream::StorageType::File,
                ..Default::default()
            };
            match setup(&js, &[events.clone(), dlq.clone(), outcomes], options.replicas).await {
                Ok(()) => break,
                Err(_) if let Some(refused) = trouble.refused() => anyhow::bail!(refusal(&options.access, &refused)),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!("JetStream is not ready yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    let last = trouble.last().map(|t| format!(" (NATS: {t})")).unwrap_or_default();
                    return Err(e.context(format!(
                        "JetStream at {} was not ready within {SETUP_WAIT:?}{last}",
                        options.access.describe()
                    )));
                }
            }
        }
        agree_on_partitions(&js, &options).await?;
        widen_subjects(&js, EVENTS_STREAM, &[EVENTS_SUBJECTS]).await?;
        widen_subjects(&js, OUTCOMES_STREAM, &[OUTCOMES_SUBJECT, OUTCOMES_SUBJECTS]).await?;
        let events = js.get_stream(EVENTS_STREAM).await.context("opening the event stream")?;
        Ok(Log { js, options, events })
    }

    /// Publishes every event and waits for JetStream to store each one:
    /// an error if any was not stored (some may have been; sending them
    /// again is safe, as the stream drops a `Nats-Msg-Id` it has seen).
    pub async fn publish(&self, events: Vec<Outgoing>) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let partition = partition_of_person(event.person.as_deref(), self.options.partitions);
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                HeaderValue::from(format!("{}:{}", event.connection, event.message_id).as_str()),
            );
            headers.insert(CONNECTION_HEADER, HeaderValue::from(event.connection.as_str()));
            headers.insert(RECEIVED_AT_HEADER, HeaderValue::from(event.received_at.as_str()));
            if let Some(person) = &event.person {
                headers.insert(PERSON_HEADER, HeaderValue::from(person_hash(person).as_str()));
            }
            let ack = self
                .js
                .publish_with_headers(event_subject(partition, &event.connection), headers, event.body.into())
                .await
                .context("publishing to the stream")?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.context("the stream did not confirm storing an event")?;
        }
        Ok(())
    }
}

/// The subject of a connection's events in a partition.
pub fn event_subject(partition: u32, connection: &str) -> String {
    format!("chord.events.{partition}.{}", subject_token(connection))
}

/// A connection id as one subject token: ids are letters, digits, `-`,
/// `_` and `.`; a `.` would split the token, so it is written `~`.
fn subject_token(connection: &str) -> String {
    connection.replace('.', "~")
}

/// The filter subjects of a partition's consumer: its events of every
/// connection, and those of streams made before subjects named them.
pub(crate) fn partition_filters(partition: u32) -> Vec<String> {
    vec![
        format!("chord.events.{partition}"),
        format!("chord.events.{partition}.>"),
    ]
}

/// The subject of a partition's outcome records.
pub(crate) fn outcome_subject(partition: u32) -> String {
    format!("chord.outcomes.{partition}")
}

/// A stream made before some of its subjects existed takes this host's
/// subjects instead (which cover the old ones): the event stream made when
/// events were on `chord.events.<partition>` only (now they name their
/// connection), the outcome stream made when records were on
/// `chord.outcomes` only (now they name their partition).
async fn widen_subjects(js: &jetstream::Context, name: &str, wanted: &[&str]) -> anyhow::Result<()> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("opening the stream {name}"))?;
    let config = stream
        .info()
        .await
        .with_context(|| format!("reading the layout of the stream {name}"))?
        .config
        .clone();
    if wanted.iter().all(|w| config.subjects.iter().any(|s| s == w)) {
        return Ok(());
    }
    let widened = stream::Config {
        subjects: wanted.iter().map(|w| w.to_string()).collect(),
        ..config
    };
    js.update_stream(widened)
        .await
        .with_context(|| format!("widening the subjects of the stream {name} to {wanted:?}"))?;
    tracing::info!(stream = name, "the stream now takes {wanted:?}");
    Ok(())
}

impl super::log::EventLog for Log {
    fn append(&self, events: Vec<crate::spool::NewEvent>) -> futures_util::future::BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let count = events.len();
            let outgoing = events
                .into_iter()
                .map(|e| Outgoing {
                    connection: e.connection,
                    message_id: e.message_id.unwrap_or_default(),
                    received_at: e.received_at,
                    body: e.body,
                    person: e.person,
                })
                .collect();
            self.publish(outgoing).await.map_err(|e| {
                tracing::error!("the stream could not store {count} events: {e:#}");
                anyhow::anyhow!(
                    "the stream cannot store events right now ({e:#}); send them again later (what was stored already is not stored twice)"
                )
            })
        })
    }

    /// Follows the plugin versions, connections and outcomes the other
    /// hosts announce, and runs this host's delivery worker (with
    /// `--role` that delivers), which settles the outcomes by acking.
    fn start(
        self: Arc<Self>,
        shared: &Arc<super::Shared>,
        outcomes: super::engine::Outcomes,
        grace: Duration,
    ) -> futures_util::future::BoxFuture<'static, anyhow::Result<super::log::Started>> {
        let shared = shared.clone();
        Box::pin(async move {
            // Every host on the stream runs the versions the stream names,
            // and follows the swaps made through any of them.
            if let Err(e) = plugins::catch_up(&self, &shared).await {
                tracing::warn!("reading the active plugin versions: {e:#}");
            }
            let followers = [
                tokio::spawn(plugins::follow(self.clone(), shared.clone())),
                tokio::spawn(connections::follow(self.clone(), shared.clone())),
                tokio::spawn(outcomes::follow(self.clone(), shared.clone())),
            ];
            let (stop_worker, worker_stop) = tokio::sync::watch::channel(false);
            let worker = self
                .options
                .role
                .delivers()
                .then(|| tokio::spawn(worker::run(self.clone(), shared, worker_stop, grace, outcomes)));
            Ok(super::log::Started {
                stop: Box::pin(async move {
                    let _ = stop_worker.send(true);
                    if let Some(worker) = worker {
                        match worker.await {
                            Ok(Err(e)) => tracing::error!("the delivery worker: {e:#}"),
                            Err(e) => tracing::error!("the delivery worker: {e}"),
                            Ok(Ok(())) => {}
                        }
                    }
                    for follower in followers {
                        follower.abort();
                    }
                }),
                finish: Box::pin(async {}),
            })
        })
    }

    fn dead_letters(&self) -> Box<dyn super::dead_letters::DeadLetters> {
        Box::new(super::dead_letters::StreamDeadLetters {
            access: self.options.access.clone(),
            partitions: self.options.partitions,
        })
    }

    /// Counted by subject: the stream is a work queue, so what is in it is
    /// unfinished, whichever host holds it.
    fn has_pending<'a>(&'a self, connection: &'a str) -> futures_util::future::BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            use futures_util::StreamExt;
            let filter = format!("chord.events.*.{}", subject_token(connection));
            let mut subjects = self
                .events
                .info_with_subjects(filter)
                .await
                .context("counting a connection's events in the stream")?;
            while let Some(subject) = subjects.next().await {
                if subject.context("counting a connection's events in the stream")?.1 > 0 {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn shared_by_hosts(&self) -> bool {
        true
    }

    fn refuses_ingest(&self) -> Option<&'static str> {
        (!self.options.role.ingests())
            .then_some("this host only delivers (--role deliver); send events to an ingest host")
    }

    fn announce_connection<'a>(
        &'a self,
        stored: &'a crate::spool::StoredConnection,
    ) -> futures_util::future::BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(connections::announce(self, stored))
    }

    fn announce_deleted<'a>(&'a self, id: &'a str) -> futures_util::future::BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(connections::announce_deleted(self, id))
    }

    fn announce_plugin<'a>(
        &'a self,
        connection: &'a str,
        sha256: &'a str,
        bytes: futures_util::future::BoxFuture<'a, anyhow::Result<Option<Vec<u8>>>>,
    ) -> futures_util::future::BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let bytes = bytes.await?.context("its bytes are not stored here")?;
            plugins::announce(self, connection, sha256, &bytes).await
        })
    }
}

/// Where the stream's layout is recorded, for every host to agree on.
const LAYOUT_BUCKET: &str = "chord_layout";

/// Records the partition count the first host used, and refuses to start
/// a host with another: a person would hash to a different partition on
/// each, and their events could be delivered out of order.
async fn agree_on_partitions(js: &jetstream::Context, options: &StreamOptions) -> anyhow::Result<()> {
    let layout = match js.get_key_value(LAYOUT_BUCKET).await {
        Ok(layout) => layout,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: LAYOUT_BUCKET.to_string(),
                history: 1,
                num_replicas: options.replicas,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the JetStream key-value bucket {LAYOUT_BUCKET}"))?,
    };
    let ours = options.partitions.to_string();
    // Created only if absent: the first host's count stands.
    let _ = layout.create("partitions", ours.clone().into()).await;
    let recorded = layout
        .get("partitions")
        .await
        .context("reading the stream's partition count")?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    match recorded {
        Some(theirs) if theirs != ours => anyhow::bail!(
            "the stream was laid out with --partitions {theirs}, and this host was given --partitions {ours}: every host of a stream must use the same count"
        ),
        Some(_) => Ok(()),
        None => anyhow::bail!("the stream's partition count could not be recorded"),
    }
}

/// How long `serve` waits for JetStream to be ready at start.
const SETUP_WAIT: Duration = Duration::from_secs(60);

/// Makes the streams and buckets that are not there yet.
async fn setup(js: &jetstream::Context, streams: &[stream::Config], replicas: usize) -> anyhow::Result<()> {
    for config in streams {
        js.get_or_create_stream(config.clone())
            .await
            .with_context(|| format!("creating or opening the JetStream stream {}", config.name))?;
    }
    for bucket in [LEASES_BUCKET, WORKERS_BUCKET] {
        if js.get_key_value(bucket).await.is_err() {
            js.create_key_value(jetstream::kv::Config {
                bucket: bucket.to_string(),
                history: 1,
                max_age: worker::LEASE_TTL,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the JetStream key-value bucket {bucket}"))?;
        }
    }
    plugins::setup(js, replicas).await?;
    connections::setup(js, replicas).await
}

/// A JetStream context on the servers, with a bounded wait for each
/// answer, and what went wrong last while connecting.
pub async fn context(access: &NatsAccess) -> anyhow::Result<(jetstream::Context, Trouble)> {
    let (client, trouble) = access.connect().await?;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(5));
    Ok((js, trouble))
}

/// The same for a command that runs once (`dlq`): connected, or an error
/// that says why not within `CONNECT_NOW`.
pub async fn context_now(access: &NatsAccess) -> anyhow::Result<jetstream::Context> {
    let (js, trouble) = context(access).await?;
    let deadline = tokio::time::Instant::now() + CONNECT_NOW;
    loop {
        if js.client().connection_state() == async_nats::connection::State::Connected {
            return Ok(js);
        }
        if let Some(refused) = trouble.refused() {
            anyhow::bail!(refusal(access, &refused));
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "NATS at {} did not answer within {CONNECT_NOW:?} ({})",
                access.describe(),
                trouble.last().unwrap_or_else(|| "no error reported".to_string())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CONNECT_NOW: Duration = Duration::from_secs(10);

/// The error for servers that refused this host, with where to look.
fn refusal(access: &NatsAccess, trouble: &str) -> String {
    let hint = if trouble.contains("TLS") {
        "check --nats-tls-ca (the CA that signed the servers' certificates), the client certificate if the servers ask for one, and that the servers speak TLS"
    } else {
        "check the credentials: --nats-user with --nats-password-file (or CDP_HOST_NATS_PASSWORD), --nats-token-file (or CDP_HOST_NATS_TOKEN), --nats-nkey or --nats-creds"
    };
    format!("NATS at {} refused this host ({trouble}): {hint}", access.describe())
}

/// The partition of an event: a hash of its person key, the same key
/// that keeps one person's events in order while mapping
/// (`mapping::person_key`). Events with none share partition 0.
pub fn partition_of(body: &str, partitions: u32) -> u32 {
    partition_of_person(cdp_core::mapping::person_key(body).as_deref(), partitions)
}

/// The partition of a person key.
pub fn partition_of_person(person: Option<&str>, partitions: u32) -> u32 {
    match person {
        Some(key) => (fnv1a(key.as_bytes()) % u64::from(partitions.max(1))) as u32,
        None => 0,
    }
}

/// What `PERSON_HEADER` carries for a person key.
pub(crate) fn person_hash(person: &str) -> String {
    format!("{:016x}", fnv1a(person.as_bytes()))
}

/// FNV-1a, 64 bits: stable across hosts and versions (std's hasher is not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_person_keeps_one_partition_whatever_else_the_event_says() {
        let identify = r#"{"type":"identify","userId":"42","traits":{"email":"a@b.c"}}"#;
        let track = r#"{"type":"track","event":"Order Completed","userId":"42","properties":{"total":3}}"#;
        assert_eq!(partition_of(identify, 16), partition_of(track, 16));
        assert!(
            (0..200)
                .map(|i| partition_of(&format!(r#"{{"userId":"{i}"}}"#), 16))
                .all(|p| p < 16)
        );
        // Spread: 200 people land on most of 16 partitions.
        let used: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_of(&format!(r#"{{"userId":"{i}"}}"#), 16))
            .collect();
        assert!(used.len() >= 14, "{used:?}");
    }

    #[test]
    fn a_user_id_sent_as_a_number_shares_the_partition_of_the_same_id_as_a_string() {
        for id in 0..50 {
            assert_eq!(
                partition_of(&format!(r#"{{"userId":{id}}}"#), 16),
                partition_of(&format!(r#"{{"userId":"{id}"}}"#), 16)
            );
        }
    }
}
