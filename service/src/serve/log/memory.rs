//! Rows kept in memory: the log of rows (`rows`) with its feeder, engines
//! and outcome writer exactly as the spool has them, and no file. The
//! tests below run the whole service on it (HTTP ingest, the admin API,
//! delivery to the Klaviyo stand-in on loopback), fast and with no server
//! to start. A switch makes writes fail as a full disk does.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;

use super::rows::Rows;
use crate::spool::{Counts, DeadRow, Finished, NewEvent, SpooledEvent, State};

#[derive(Default)]
pub(crate) struct MemoryRows {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    last: i64,
    rows: BTreeMap<i64, Row>,
    /// Why appends fail, while they do.
    appends_fail: Option<String>,
    /// Why outcome writes fail, while they do.
    outcomes_fail: Option<String>,
    /// How long a read of pending rows takes after it has read them (a
    /// slow disk, a busy host): its rows may be finished meanwhile.
    read_delay: Option<std::time::Duration>,
}

struct Row {
    connection: String,
    message_id: Option<String>,
    received_at: String,
    body: String,
    not_before: Option<SystemTime>,
    state: State,
    outcome: Option<Value>,
    plugin_version: Option<String>,
}

impl MemoryRows {
    /// Makes appends fail with `why`, or work again with none.
    #[cfg(test)]
    pub(crate) fn fail_appends(&self, why: Option<&str>) {
        self.inner.lock().unwrap().appends_fail = why.map(str::to_string);
    }

    /// Makes outcome writes fail with `why`, or work again with none.
    #[cfg(test)]
    pub(crate) fn fail_outcomes(&self, why: Option<&str>) {
        self.inner.lock().unwrap().outcomes_fail = why.map(str::to_string);
    }

    /// Makes each read of pending rows return this long after it read
    /// them.
    #[cfg(test)]
    pub(crate) fn slow_reads(&self, delay: Option<std::time::Duration>) {
        self.inner.lock().unwrap().read_delay = delay;
    }

    fn of<'a>(rows: &'a BTreeMap<i64, Row>, connection: Option<&'a str>) -> impl Iterator<Item = (&'a i64, &'a Row)> {
        rows.iter()
            .filter(move |(_, row)| connection.is_none_or(|c| row.connection == c))
    }

    /// The ids of dead rows (`ids`, or all) of one connection or of all.
    fn dead_ids(inner: &Inner, connection: Option<&str>, ids: &[i64]) -> Vec<i64> {
        Self::of(&inner.rows, connection)
            .filter(|(id, row)| row.state == State::Dead && (ids.is_empty() || ids.contains(id)))
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Rows for MemoryRows {
    fn append_groups<'e>(&self, groups: impl IntoIterator<Item = &'e [NewEvent]>) -> anyhow::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(why) = &inner.appends_fail {
            anyhow::bail!("{why}");
        }
        for event in groups.into_iter().flatten() {
            inner.last += 1;
            let id = inner.last;
            inner.rows.insert(
                id,
                Row {
                    connection: event.connection.clone(),
                    message_id: event.message_id.clone(),
                    received_at: event.received_at.clone(),
                    body: event.body.clone(),
                    not_before: None,
                    state: State::Pending,
                    outcome: None,
                    plugin_version: None,
                },
            );
        }
        Ok(())
    }

    fn pending_after(
        &self,
        connection: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<SpooledEvent>> {
        let inner = self.inner.lock().unwrap();
        let (mut read, mut bytes) = (Vec::new(), 0);
        let pending = inner
            .rows
            .range(after + 1..)
            .filter(|(_, row)| row.connection == connection && row.state == State::Pending);
        for (id, row) in pending.take(limit) {
            bytes += row.body.len();
            read.push(SpooledEvent {
                id: *id,
                body: row.body.clone(),
                not_before: row.not_before,
                received_at: row.received_at.clone(),
            });
            if bytes >= max_bytes {
                break;
            }
        }
        let delay = inner.read_delay;
        drop(inner);
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        Ok(read)
    }

    fn finish_all<'a>(&self, finished: impl IntoIterator<Item = &'a Finished>) -> anyhow::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(why) = &inner.outcomes_fail {
            anyhow::bail!("{why}");
        }
        for f in finished {
            if let Some(row) = inner.rows.get_mut(&f.id) {
                row.state = f.state;
                row.outcome = Some(f.outcome.clone());
                row.plugin_version = Some(f.plugin_version.clone());
            }
        }
        Ok(())
    }

    fn defer(&self, id: i64, until: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()> {
        if let Some(row) = self.inner.lock().unwrap().rows.get_mut(&id) {
            row.not_before = Some(until.into());
        }
        Ok(())
    }

    fn has_pending(&self, connection: &str) -> anyhow::Result<bool> {
        let inner = self.inner.lock().unwrap();
        Ok(Self::of(&inner.rows, Some(connection)).any(|(_, row)| row.state == State::Pending))
    }

    fn pending_connections(&self) -> anyhow::Result<Vec<String>> {
        let now = SystemTime::now();
        let inner = self.inner.lock().unwrap();
        let ready = inner
            .rows
            .values()
            .filter(|row| row.state == State::Pending && row.not_before.is_none_or(|t| t <= now));
        let mut connections: Vec<String> = ready.map(|row| row.connection.clone()).collect();
        connections.sort();
        connections.dedup();
        Ok(connections)
    }

    fn pending_by_connection(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(self
            .counts()?
            .into_iter()
            .filter(|(_, counts)| counts.pending > 0)
            .map(|(connection, counts)| (connection, counts.pending))
            .collect())
    }

    fn counts(&self) -> anyhow::Result<BTreeMap<String, Counts>> {
        let inner = self.inner.lock().unwrap();
        let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
        for row in inner.rows.values() {
            let of = counts.entry(row.connection.clone()).or_default();
            *match row.state {
                State::Pending => &mut of.pending,
                State::Delivered => &mut of.delivered,
                State::Skipped => &mut of.skipped,
                State::Dead => &mut of.dead,
            } += 1;
        }
        Ok(counts)
    }

    fn dead(&self, connection: Option<&str>, limit: usize) -> anyhow::Result<Vec<DeadRow>> {
        let inner = self.inner.lock().unwrap();
        let dead = Self::of(&inner.rows, connection).filter(|(_, row)| row.state == State::Dead);
        Ok(dead
            .take(limit)
            .map(|(id, row)| DeadRow {
                id: *id,
                connection: row.connection.clone(),
                message_id: row.message_id.clone(),
                received_at: row.received_at.clone(),
                plugin_version: row.plugin_version.clone(),
                outcome: row.outcome.clone().unwrap_or(Value::Null),
                event: serde_json::from_str(&row.body).unwrap_or_else(|_| Value::String(row.body.clone())),
            })
            .collect())
    }

    fn replay(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        let mut inner = self.inner.lock().unwrap();
        let replayed = Self::dead_ids(&inner, connection, ids);
        for id in &replayed {
            let row = inner.rows.get_mut(id).expect("listed");
            (row.state, row.outcome, row.not_before) = (State::Pending, None, None);
        }
        Ok(replayed.len())
    }

    fn purge(&self, connection: Option<&str>, ids: &[i64]) -> anyhow::Result<usize> {
        let mut inner = self.inner.lock().unwrap();
        let purged = Self::dead_ids(&inner, connection, ids);
        for id in &purged {
            inner.rows.remove(id);
        }
        Ok(purged.len())
    }
}

/// The whole service on memory rows: events in over HTTP, out to each
/// shop's Klaviyo stand-in, outcomes on the rows.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use klaviyo_mock::{DEMO_KEY, Faults, KlaviyoMock};
    use serde_json::{Value, json};

    use super::MemoryRows;
    use crate::serve::connections::NewConnection;
    use crate::serve::log::EventLog;
    use crate::serve::log::rows::{RowLog, Rows};
    use crate::serve::testing::{TempDir, identify, runtime, sandbox, track};
    use crate::serve::{FileConnection, ServeConfig};
    use crate::spool::{Durability, Spool};
    use cdp_core::delivery::DeliveryConfig;
    use cdp_core::settings::Secret;

    const ADMIN: &str = "admin-token-of-the-memory-tests";

    struct Service {
        url: String,
        rows: Arc<MemoryRows>,
        log: Arc<RowLog<MemoryRows>>,
        client: reqwest::Client,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
        _dir: TempDir,
    }

    impl Service {
        /// Serves these shops, each with the write key `wk_<id>`,
        /// delivering to its own stand-in.
        async fn start(shops: &[(&str, &KlaviyoMock)]) -> Service {
            let dir = TempDir::new();
            let key = dir.0.join("klaviyo-key");
            std::fs::write(&key, DEMO_KEY).unwrap();
            // The spool keeps the connections only; the events are in memory.
            let spool = Arc::new(Spool::open(&dir.0.join("connections.sqlite"), Durability::ProcessCrash).unwrap());
            let bytes = std::fs::read(plugin_fixtures::KLAVIYO).unwrap();
            let plugin = Arc::new(runtime().load(&bytes, "bundled").unwrap());
            let file_connections = shops
                .iter()
                .map(|(id, sandbox)| FileConnection {
                    new: NewConnection {
                        id: id.to_string(),
                        write_keys: vec![format!("wk_{id}")],
                        plugin: None,
                        settings: json!({"api_key": {"file": key}}).as_object().unwrap().clone(),
                        base_url: Some(sandbox.url().parse().unwrap()),
                        state: None,
                    },
                    plugin: None,
                })
                .collect();
            let config = ServeConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                spool,
                plugin,
                plugin_bytes: bytes,
                flags_connection: None,
                file_connections,
                delivery: DeliveryConfig {
                    pacing: false,
                    max_attempts: 1000,
                    backoff_base: Duration::from_millis(20),
                    backoff_cap: Duration::from_millis(500),
                    ..DeliveryConfig::default()
                },
                retention: Duration::from_secs(3600),
                shutdown_grace: Duration::from_secs(5),
                admin_token: Some(Secret::new(ADMIN.to_string())),
                plugin_dir: None,
                stream: None,
                approved_base_urls: Vec::new(),
                admin_secret_sources: Default::default(),
                ingest_rate: 0,
                console: None,
            };
            let rows = Arc::new(MemoryRows::default());
            let log = Arc::new(RowLog::new(rows.clone()).unwrap());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (bound, address) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(crate::serve::run(
                config,
                Some(log.clone() as Arc<dyn EventLog>),
                async {
                    let _ = stopped.await;
                },
                move |address| {
                    let _ = bound.send(address);
                },
            ));
            let address = address.await.expect("the service did not start");
            Service {
                url: format!("http://{address}"),
                rows,
                log,
                client: reqwest::Client::new(),
                stop,
                task,
                _dir: dir,
            }
        }

        /// Sends events to `/v1/batch` with the shop's write key; the status.
        async fn send(&self, shop: &str, events: &[String]) -> u16 {
            let batch: Vec<Value> = events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
            let mut status = 0;
            for chunk in batch.chunks(500) {
                let response = self
                    .client
                    .post(format!("{}/v1/batch", self.url))
                    .basic_auth(format!("wk_{shop}"), Some(""))
                    .header("content-type", "application/json")
                    .body(json!({"batch": chunk}).to_string())
                    .send()
                    .await
                    .unwrap();
                status = response.status().as_u16();
                if status != 200 {
                    break;
                }
            }
            status
        }

        async fn admin(&self, method: reqwest::Method, path: &str) -> u16 {
            let response = self
                .client
                .request(method, format!("{}{path}", self.url))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }

        async fn get(&self, path: &str) -> (u16, String) {
            let response = self.client.get(format!("{}{path}", self.url)).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }

        /// A shop's rows by state: pending, delivered, skipped, dead.
        fn rows_of(&self, shop: &str) -> [u64; 4] {
            let counts = self.rows.counts().unwrap().remove(shop).unwrap_or_default();
            [counts.pending, counts.delivered, counts.skipped, counts.dead]
        }

        async fn stop(self) {
            let _ = self.stop.send(());
            let stopped = tokio::time::timeout(Duration::from_secs(20), self.task).await;
            stopped.expect("the service did not stop").unwrap().unwrap();
        }
    }

    /// Waits until `done` holds, or fails naming `what`.
    async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !done().await {
            assert!(Instant::now() < deadline, "{what} within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Each person's tracks arrived in sequence, and each profile's first
    /// name is `last` (none: the events had no identify).
    fn assert_in_order(sandbox: &KlaviyoMock, last: Option<&str>) {
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for event in sandbox.events() {
            let seq = event.properties["seq"].as_u64().unwrap();
            let before = seen.insert(event.profile_id.clone(), seq);
            assert!(before.is_none_or(|b| b < seq), "{seq} after {before:?}");
        }
        for profile in sandbox.profiles() {
            assert_eq!(
                profile.attributes.get("first_name"),
                last.map(|l| json!(l)).as_ref(),
                "{profile:?}"
            );
        }
    }

    /// `people` people's events `0..count` each, interleaved; every fourth
    /// an identify.
    fn events(people: usize, count: usize) -> Vec<String> {
        (0..count)
            .flat_map(|seq| {
                (0..people).map(move |person| {
                    if seq % 4 == 0 {
                        identify(person, seq)
                    } else {
                        track(person, seq)
                    }
                })
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_persons_events_arrive_in_order_through_429s_with_retry_after() {
        let a = sandbox(Faults {
            throttle_storm: 0.4,
            storm_retry_after: 1,
            ..Faults::default()
        })
        .await;
        let service = Service::start(&[("a", &a)]).await;
        assert_eq!(service.send("a", &events(6, 9)).await, 200);
        wait_until("54 rows delivered", Duration::from_secs(60), async || {
            service.rows_of("a") == [0, 54, 0, 0]
        })
        .await;
        assert!(
            a.stats().throttled.values().sum::<u64>() > 0,
            "the stand-in throttled nothing"
        );
        assert_eq!(a.events().len(), 6 * 6);
        assert_in_order(&a, Some("v8"));
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_shop_does_not_hold_up_another() {
        let (x, y) = (
            sandbox(Faults {
                server_errors: 1.0,
                ..Faults::default()
            })
            .await,
            sandbox(Faults::default()).await,
        );
        let service = Service::start(&[("x", &x), ("y", &y)]).await;
        let backlog: Vec<String> = (0..1_500).map(|i| track(i % 50, i)).collect();
        assert_eq!(service.send("x", &backlog).await, 200);
        let started = Instant::now();
        assert_eq!(
            service
                .send("y", &(0..16).map(|i| track(i, 0)).collect::<Vec<_>>())
                .await,
            200
        );
        wait_until("shop y's 16 events delivered", Duration::from_secs(5), async || {
            y.events().len() == 16
        })
        .await;
        eprintln!("16 events of a healthy shop delivered in {:?}", started.elapsed());
        wait_until("their outcomes recorded", Duration::from_secs(5), async || {
            service.rows_of("y") == [0, 16, 0, 0]
        })
        .await;
        // The failing shop's events are still pending, being retried.
        assert_eq!(service.rows_of("x")[0], 1_500);
        assert!(x.stats().requests > 0);
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_shop_keeps_its_events_and_delivers_them_in_order_on_resume() {
        let (a, b) = (sandbox(Faults::default()).await, sandbox(Faults::default()).await);
        let service = Service::start(&[("a", &a), ("b", &b)]).await;
        assert_eq!(
            service.admin(reqwest::Method::POST, "/admin/connections/a/pause").await,
            200
        );
        assert_eq!(service.send("a", &events(3, 8)).await, 200);
        assert_eq!(service.send("b", &events(3, 8)).await, 200);
        wait_until("shop b's events delivered", Duration::from_secs(20), async || {
            service.rows_of("b") == [0, 24, 0, 0]
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(a.stats().requests, 0, "a paused shop sent");
        assert_eq!(service.rows_of("a"), [24, 0, 0, 0]);
        assert_eq!(
            service
                .admin(reqwest::Method::POST, "/admin/connections/a/resume")
                .await,
            200
        );
        wait_until("shop a's events delivered", Duration::from_secs(20), async || {
            service.rows_of("a") == [0, 24, 0, 0]
        })
        .await;
        assert_in_order(&a, Some("v4"));
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_a_shop_delivers_its_backlog_first() {
        let a = sandbox(Faults {
            latency: Duration::from_millis(20),
            slow: 1.0,
            ..Faults::default()
        })
        .await;
        let service = Service::start(&[("a", &a)]).await;
        assert_eq!(service.send("a", &events(10, 30)).await, 200);
        assert_eq!(
            service.admin(reqwest::Method::DELETE, "/admin/connections/a").await,
            202
        );
        assert!(
            service.rows_of("a")[0] > 0,
            "the backlog was delivered before the deletion"
        );
        // Still there (draining) until its events are finished.
        assert_eq!(service.admin(reqwest::Method::GET, "/admin/connections/a").await, 200);
        wait_until("the deleted shop removed", Duration::from_secs(60), async || {
            service.admin(reqwest::Method::GET, "/admin/connections/a").await == 404
        })
        .await;
        assert_eq!(service.rows_of("a"), [0, 300, 0, 0]);
        assert_in_order(&a, Some("v28"));
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_that_cannot_be_recorded_keeps_its_event_claimed_and_nothing_is_sent_twice() {
        let a = sandbox(Faults::default()).await;
        let service = Service::start(&[("a", &a)]).await;
        service.rows.fail_outcomes(Some("the disk is full"));
        let tracks: Vec<String> = (0..40).map(|i| track(i % 4, i)).collect();
        assert_eq!(service.send("a", &tracks).await, 200);
        wait_until("/healthz saying why", Duration::from_secs(10), async || {
            let (status, text) = service.get("/healthz").await;
            status == 503 && text.contains("the disk is full")
        })
        .await;
        // Held: what was sent is not sent again, and nothing more leaves,
        // not even events that came since.
        let sent = a.stats().requests;
        let more: Vec<String> = (40..80).map(|i| track(i % 4, i)).collect();
        assert_eq!(service.send("a", &more).await, 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            a.stats().requests,
            sent,
            "requests left while outcomes could not be recorded"
        );
        assert_eq!(service.rows_of("a")[0], 80);
        service.rows.fail_outcomes(None);
        wait_until("every row delivered", Duration::from_secs(20), async || {
            service.rows_of("a") == [0, 80, 0, 0]
        })
        .await;
        assert_eq!(service.get("/healthz").await.0, 200);
        assert_eq!(a.events().len(), 80);
        assert_eq!(a.stats().deduplicated, 0, "an event was sent twice");
        assert_in_order(&a, None);
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_finished_while_a_read_held_it_is_not_sent_again() {
        // Every answer takes 300 ms and every read of pending rows 400 ms
        // to come back: a feeder's sweep (every 5 s, from the first row)
        // reads rows in flight, which are finished before it looks at them.
        let a = sandbox(Faults {
            latency: Duration::from_millis(300),
            slow: 1.0,
            ..Faults::default()
        })
        .await;
        let service = Service::start(&[("a", &a)]).await;
        service.rows.slow_reads(Some(Duration::from_millis(400)));
        for i in 0..70 {
            assert_eq!(service.send("a", &[track(i % 7, i)]).await, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_until("every row delivered", Duration::from_secs(30), async || {
            service.rows_of("a") == [0, 70, 0, 0]
        })
        .await;
        assert_eq!(a.events().len(), 70);
        assert_eq!(a.stats().deduplicated, 0, "events delivered already were sent again");
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_that_fails_is_answered_503_and_keeps_nothing() {
        let a = sandbox(Faults::default()).await;
        let service = Service::start(&[("a", &a)]).await;
        service.rows.fail_appends(Some("the disk is full"));
        assert_eq!(service.send("a", &[track(1, 1)]).await, 503);
        assert!(service.rows.counts().unwrap().is_empty());
        service.rows.fail_appends(None);
        assert_eq!(service.send("a", &[track(1, 1)]).await, 200);
        wait_until("the event delivered", Duration::from_secs(10), async || {
            a.events().len() == 1
        })
        .await;
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_letter_is_kept_replayed_and_purged() {
        let poisoned = |marker: Option<&str>| Faults {
            invalid_marker: marker.map(str::to_string),
            ..Faults::default()
        };
        let a = sandbox(poisoned(Some("POISON"))).await;
        let service = Service::start(&[("a", &a)]).await;
        let mut poison: Value = serde_json::from_str(&track(1, 1)).unwrap();
        poison["properties"]["note"] = json!("POISON");
        assert_eq!(service.send("a", &[track(0, 0), poison.to_string()]).await, 200);
        wait_until("one delivered, one dead", Duration::from_secs(10), async || {
            service.rows_of("a") == [0, 1, 0, 1]
        })
        .await;
        let letters = service.log.dead_letters();
        let listed = letters.list(Some("a"), 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["message_id"], "p1-1");
        assert!(listed[0]["reason"].as_str().unwrap().contains("400"), "{}", listed[0]);
        assert!(!listed[0].to_string().contains(DEMO_KEY), "the key is in a letter");
        // Klaviyo takes it now: replayed, it is delivered.
        a.set_faults(poisoned(None));
        assert_eq!(letters.replay(Some("a"), &[]).await.unwrap(), 1);
        wait_until("the replayed letter delivered", Duration::from_secs(15), async || {
            service.rows_of("a") == [0, 2, 0, 0]
        })
        .await;
        // And one purged is gone.
        a.set_faults(poisoned(Some("POISON")));
        poison["messageId"] = json!("p1-2");
        assert_eq!(service.send("a", &[poison.to_string()]).await, 200);
        wait_until("dead again", Duration::from_secs(10), async || {
            service.rows_of("a")[3] == 1
        })
        .await;
        assert_eq!(letters.purge(Some("a"), &[]).await.unwrap(), 1);
        assert_eq!(service.rows_of("a"), [0, 2, 0, 0]);
        service.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_engines_stop_and_the_next_event_starts_one() {
        let a = sandbox(Faults::default()).await;
        let service = Service::start(&[("a", &a)]).await;
        let running = async || {
            let (_, text) = service.get("/metrics").await;
            let line = text
                .lines()
                .find(|l| l.starts_with("cdp_engines_running "))
                .unwrap()
                .to_string();
            line["cdp_engines_running ".len()..].trim().parse::<u64>().unwrap()
        };
        assert_eq!(service.send("a", &[track(1, 1)]).await, 200);
        wait_until("delivered", Duration::from_secs(10), async || a.events().len() == 1).await;
        assert_eq!(running().await, 1);
        let idle = crate::serve::engine::IDLE + Duration::from_secs(5);
        wait_until("the idle engine stopped", idle, async || running().await == 0).await;
        assert_eq!(service.send("a", &[track(1, 2)]).await, 200);
        wait_until("delivered again", Duration::from_secs(10), async || {
            a.events().len() == 2
        })
        .await;
        service.stop().await;
    }
}
