//! `serve --stream`: several hosts on one replicated NATS JetStream stream,
//! through real processes: a three-node NATS cluster, three `serve`
//! workers, and the sandbox. Killed workers and killed NATS nodes lose no
//! acknowledged event and deliver none twice, and a person's identify
//! still arrives before their later events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klaviyo_mock::{DEMO_KEY, KlaviyoMock, MockConfig};
use serde_json::json;

use crate::cli_map::tempdir;
use crate::nats::Cluster;
use crate::serve::WRITE_KEY;
use crate::support::{assert_each_profile_arrived_before_its_events, cdp_host};

const API_KEY: &str = DEMO_KEY;

/// A `serve --stream` process, its log kept in its directory.
struct Worker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

impl Worker {
    fn start(dir: PathBuf, nats: &str, sandbox: &str, api_key: &str) -> Worker {
        Worker::start_with(dir, nats, sandbox, api_key, &["--no-pacing"])
    }

    fn start_with(dir: PathBuf, nats: &str, sandbox: &str, api_key: &str, extra: &[&str]) -> Worker {
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args: Vec<String> = [
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--write-key",
            WRITE_KEY,
            "--base-url",
            sandbox,
            "--max-attempts",
            "50",
            "--shutdown-grace-seconds",
            "10",
            "--stream",
            nats,
            "--stream-replicas",
            "3",
            "--spool",
            &dir.join("spool.sqlite").display().to_string(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        let mut worker = Worker {
            child: None,
            port,
            dir,
            args,
        };
        worker.restart(api_key);
        worker
    }

    fn restart(&mut self, api_key: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let child = cdp_host()
            .args(&self.args)
            .env("KLAVIYO_API_KEY", api_key)
            // The secret source of connections made through the admin API.
            .env("SHOP_KEY", api_key)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "serve --stream did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`STOP`, `CONT`) to the process.
    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the senders had acknowledged, in order per person.
#[derive(Default)]
struct Acked {
    tracks: BTreeSet<String>,
    identifies: usize,
}

/// Sends `people` people's identify and then `tracks` track events each,
/// a person's next event only after the last one was acknowledged, to the
/// workers in turn (the next one when one does not answer 200).
async fn send_people(urls: Vec<String>, people: std::ops::Range<usize>, tracks: usize, acked: Arc<Mutex<Acked>>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut turn = people.start;
    for person in people {
        let email = format!("person{person}@example.org");
        let mut events = vec![(
            "identify",
            format!("i-{person}"),
            json!({"type": "identify", "messageId": format!("i-{person}"), "userId": format!("user-{person}"),
                   "traits": {"email": email, "first_name": "P"}}),
        )];
        for t in 0..tracks {
            let id = format!("t-{person}-{t}");
            events.push((
                "track",
                id.clone(),
                json!({"type": "track", "event": "Order Completed", "messageId": id, "userId": format!("user-{person}"),
                       "properties": {"email": email, "revenue": t, "order_id": format!("o-{person}-{t}")}}),
            ));
        }
        for (kind, id, event) in events {
            // Until acknowledged, for up to a minute (a sender retries).
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut ok = false;
            while !ok && Instant::now() < deadline {
                turn += 1;
                let url = &urls[turn % urls.len()];
                let answer = client
                    .post(format!("{url}/api/s/s2s/{kind}"))
                    .header("X-Write-Key", WRITE_KEY)
                    .body(event.to_string())
                    .send()
                    .await;
                ok = answer.is_ok_and(|a| a.status() == 200);
                if !ok {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if !ok {
                // Never acknowledged: the person's later events would be
                // out of order, so stop this person here.
                break;
            }
            let mut acked = acked.lock().unwrap();
            match kind {
                "identify" => acked.identifies += 1,
                _ => {
                    acked.tracks.insert(id);
                }
            }
        }
    }
}

/// Waits until every acknowledged track is in the sandbox, then checks
/// that none is there twice and that profiles came before their events.
async fn assert_all_delivered_once(sandbox: &KlaviyoMock, acked: &Acked, workers: &[Worker]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored: BTreeSet<String> = sandbox.events().into_iter().map(|e| e.unique_id).collect();
        let missing: Vec<&String> = acked.tracks.difference(&stored).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = workers.iter().map(Worker::log).collect();
            panic!(
                "{} of {} acknowledged events never arrived, e.g. {:?}\n{}",
                missing.len(),
                acked.tracks.len(),
                &missing[..missing.len().min(5)],
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for event in sandbox.events() {
        *counts.entry(event.unique_id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    let profiles = assert_each_profile_arrived_before_its_events(sandbox);
    assert!(
        profiles >= acked.identifies,
        "{profiles} profiles for {} identifies",
        acked.identifies
    );
    println!(
        "{} tracks and {} identifies acknowledged; {} events accepted, {} resent and dropped by unique_id",
        acked.tracks.len(),
        acked.identifies,
        counts.len(),
        sandbox.stats().deduplicated
    );
}

/// Waits until every worker holds some of the 16 partitions and none is
/// held twice (`cdp_stream_partitions_held` in each one's metrics).
async fn wait_until_settled(workers: &[Worker]) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut counts = Vec::new();
        for worker in workers {
            let text = client
                .get(format!("{}/metrics", worker.url()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let held = text
                .lines()
                .find_map(|l| l.strip_prefix("cdp_stream_partitions_held "))
                .map_or(0, |n| n.parse::<u64>().unwrap());
            counts.push(held);
        }
        if counts.iter().all(|&n| n > 0) && counts.iter().sum::<u64>() == 16 {
            return;
        }
        assert!(Instant::now() < deadline, "partitions held: {counts:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn start_workers(dir: &Path, cluster: &Cluster, sandbox: &KlaviyoMock) -> Vec<Worker> {
    (0..3)
        .map(|i| Worker::start(dir.join(format!("w{i}")), &cluster.urls(), &sandbox.url(), API_KEY))
        .collect()
}

const ADMIN: &str = "admin-token-for-the-stream-test";

/// Three workers with the admin API on (`ADMIN`).
fn start_admin_workers(dir: &Path, cluster: &Cluster, sandbox: &KlaviyoMock) -> Vec<Worker> {
    (0..3)
        .map(|i| {
            Worker::start_with(
                dir.join(format!("w{i}")),
                &cluster.urls(),
                &sandbox.url(),
                API_KEY,
                &[
                    "--no-pacing",
                    "--admin-token",
                    ADMIN,
                    "--admin-secret-env-prefix",
                    "SHOP_",
                ],
            )
        })
        .collect()
}

fn unlimited() -> MockConfig {
    MockConfig {
        rate_limits: false,
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_and_restarted_loses_nothing_and_delivers_nothing_twice() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let mut workers = start_workers(&dir, &cluster, &sandbox);
    let urls: Vec<String> = workers.iter().map(Worker::url).collect();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let senders: Vec<_> = (0..4)
        .map(|s| tokio::spawn(send_people(urls.clone(), s * 60..(s + 1) * 60, 4, acked.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    workers[1].kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| workers[1].restart(API_KEY));
    for sender in senders {
        sender.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.tracks.len() > 500, "too little load: {}", acked.tracks.len());
    assert_all_delivered_once(&sandbox, &acked, &workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_and_restarted_loses_nothing() {
    let dir = tempdir();
    let mut cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let workers = start_workers(&dir, &cluster, &sandbox);
    let urls: Vec<String> = workers.iter().map(Worker::url).collect();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let senders: Vec<_> = (0..4)
        .map(|s| tokio::spawn(send_people(urls.clone(), s * 60..(s + 1) * 60, 4, acked.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill9(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| cluster.start_node(0));
    for sender in senders {
        sender.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.tracks.len() > 500, "too little load: {}", acked.tracks.len());
    assert_all_delivered_once(&sandbox, &acked, &workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_and_purged_on_the_stream() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    // A key the sandbox does not know: Klaviyo's 401 is final.
    let worker = Worker::start(
        dir.join("w"),
        &cluster.urls(),
        &sandbox.url(),
        "pk_not_a_known_key_0000000000000",
    );
    let acked = Arc::new(Mutex::new(Acked::default()));
    send_people(vec![worker.url()], 0..1, 1, acked.clone()).await;
    assert_eq!(acked.lock().unwrap().tracks.len(), 1);
    let dlq = |args: &[&str]| {
        let out = cdp_host()
            .arg("dlq")
            .args(args)
            .args(["--stream", &cluster.urls()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = |dlq: &dyn Fn(&[&str]) -> String| -> Vec<serde_json::Value> {
        dlq(&["list"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut letters = listed(&dlq);
    while letters.len() < 2 {
        assert!(Instant::now() < deadline, "dead letters: {letters:?}\n{}", worker.log());
        std::thread::sleep(Duration::from_millis(200));
        letters = listed(&dlq);
    }
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["connection"], "default");
        assert!(letter["reason"].as_str().unwrap().contains("401"), "{letter}");
        assert!(
            letter["plugin_version"].as_str().unwrap().starts_with("klaviyo"),
            "{letter}"
        );
        assert!(
            !letter.to_string().contains("pk_not_a_known_key"),
            "a secret in {letter}"
        );
    }
    // Each letter keeps the subject (partition) its event came from.
    let subject = letters[0]["subject"].as_str().unwrap().to_string();
    assert!(subject.starts_with("chord.events."), "{}", letters[0]);
    assert_ne!(
        subject.split('.').nth(2),
        Some("0"),
        "pick a person whose partition a wrong count would change"
    );
    // Replayed: delivered again (and dead again, under a new id), back on
    // its own partition whatever --partitions the command was given.
    let first = letters[0]["id"].as_u64().unwrap().to_string();
    assert!(dlq(&["replay", "--id", &first, "--partitions", "1"]).starts_with("1 dead letters"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = listed(&dlq);
        let ids: Vec<u64> = now.iter().map(|l| l["id"].as_u64().unwrap()).collect();
        if ids.len() == 2 && !ids.contains(&first.parse().unwrap()) {
            let again = now
                .iter()
                .find(|l| l["message_id"] == letters[0]["message_id"])
                .unwrap();
            assert_eq!(again["subject"], subject.as_str(), "{again}");
            break;
        }
        assert!(Instant::now() < deadline, "after replay: {ids:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(dlq(&["purge"]).starts_with("2 dead letters"));
    assert!(listed(&dlq).is_empty());

    // A host given another partition count than the stream was laid out
    // with would put a person's events on another partition: it refuses
    // to start, naming both counts.
    let other = cdp_host()
        .args(["serve", "--listen", "127.0.0.1:0", "--write-key", WRITE_KEY])
        .args(["--stream", &cluster.urls(), "--partitions", "8", "--spool"])
        .arg(dir.join("other.sqlite"))
        .env("KLAVIYO_API_KEY", API_KEY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("laid out with --partitions 16, and this host was given --partitions 8"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_budget_per_account() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    // Klaviyo's limits on: profile-import takes 75 a second, 750 a minute.
    let sandbox = crate::support::sandbox(MockConfig::default()).await;
    let workers: Vec<Worker> = (0..3)
        // Paced, as in production.
        .map(|i| Worker::start_with(dir.join(format!("w{i}")), &cluster.urls(), &sandbox.url(), API_KEY, &[]))
        .collect();
    // The partitions settle among the three before the backlog comes.
    wait_until_settled(&workers).await;
    let client = reqwest::Client::new();
    let people = 1500;
    for chunk in (0..people).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| {
                json!({"type": "identify", "messageId": format!("b-{i}"), "userId": format!("buyer-{i}"),
                             "traits": {"email": format!("buyer{i}@example.org")}})
            })
            .collect();
        let answer = client
            .post(format!("{}/v1/batch", workers[0].url()))
            .basic_auth(WRITE_KEY, Some(""))
            .body(json!({"batch": batch}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let imported = || sandbox.arrivals().iter().filter(|a| a.what == "profile-import").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while imported() == 0 {
        assert!(Instant::now() < deadline, "nothing arrived: {}", workers[0].log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A minute from the first: the whole budget, and not one over.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let in_a_minute = imported();
    let stats = sandbox.stats();
    println!(
        "{in_a_minute} profile imports in the first minute of 750 allowed; 429s: {:?}",
        stats.throttled
    );
    assert!(stats.throttled.is_empty(), "429s: {:?}", stats.throttled);
    assert!(
        in_a_minute >= 675,
        "{in_a_minute} profile imports in a minute: under 90% of 750"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_through_any_worker_reaches_every_worker() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let workers = start_admin_workers(&dir, &cluster, &sandbox);
    let client = reqwest::Client::new();
    // Through the third worker: store version 2, then swap the connection.
    let stored = client
        .put(format!("{}/admin/plugins", workers[2].url()))
        .bearer_auth(ADMIN)
        .body(std::fs::read(plugin_fixtures::KLAVIYO_V2).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    let stored: serde_json::Value = serde_json::from_str(&stored.text().await.unwrap()).unwrap();
    let sha = stored["stored"]["sha256"].as_str().unwrap().to_string();
    let swapped = client
        .post(format!("{}/admin/connections/default/plugin", workers[2].url()))
        .bearer_auth(ADMIN)
        .body(json!({"sha256": sha}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(swapped.status(), 200, "{}", swapped.text().await.unwrap());
    let active = |worker: &Worker| {
        let (client, url) = (client.clone(), worker.url());
        async move {
            let answer = client
                .get(format!("{url}/admin/connections/default"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            let answer: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
            answer["plugin"].clone()
        }
    };
    // The others follow, having fetched the bytes from the object store.
    let deadline = Instant::now() + Duration::from_secs(20);
    for worker in &workers {
        while active(worker).await["sha256"] != sha.as_str() {
            assert!(Instant::now() < deadline, "not swapped: {}", worker.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Before sending: the partitions settle among the three.
    wait_until_settled(&workers).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    send_people(workers.iter().map(Worker::url).collect(), 0..60, 1, acked.clone()).await;
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert_all_delivered_once(&sandbox, &acked, &workers).await;
    // Every event mapped by version 2, on every worker.
    let mut mapped = Vec::new();
    for worker in &workers {
        let plugin = active(worker).await;
        assert_eq!(plugin["version"], "1.0.0+v2");
        mapped.push(plugin["events_mapped"].as_u64().unwrap());
    }
    assert_eq!(
        mapped.iter().sum::<u64>(),
        120,
        "events mapped by version 2 per worker: {mapped:?}"
    );
    assert!(mapped.iter().all(|&n| n > 0), "a worker mapped nothing: {mapped:?}");
}

/// A shop's events are delivered by whichever host holds their partition:
/// each host's console counts them all, from the outcome records the
/// others publish, and lists the others' without their requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hosts_console_counts_what_every_host_delivered() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let workers = start_admin_workers(&dir, &cluster, &sandbox);
    wait_until_settled(&workers).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    send_people(workers.iter().map(Worker::url).collect(), 0..40, 1, acked.clone()).await;
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let total = (acked.tracks.len() + acked.identifies) as u64;
    assert_all_delivered_once(&sandbox, &acked, &workers).await;
    for worker in &workers {
        let console = crate::support::ConsoleSession::sign_in(&worker.url(), ADMIN).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, live) = console.get("/console/live.json").await;
            let live: serde_json::Value = serde_json::from_str(&live).unwrap();
            let shop = &live["connections"]["default"];
            let finished = ["delivered", "skipped", "dead_lettered"]
                .iter()
                .map(|k| shop[k].as_u64().unwrap())
                .sum::<u64>();
            if finished == total {
                let elsewhere = shop["by_other_hosts"].as_u64().unwrap();
                assert!(elsewhere > 0 && elsewhere < total, "{shop}: every host delivers some");
                break;
            }
            assert!(Instant::now() < deadline, "{shop}: {finished} of {total} counted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (_, page) = console.get("/console/connections/default").await;
        assert!(
            page.contains("finished by another host"),
            "the others' events are listed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_ingest_answers_503_and_acknowledges_nothing() {
    let dir = tempdir();
    let mut cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let worker = Worker::start(dir.join("w"), &cluster.urls(), &sandbox.url(), API_KEY);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let send = |id: &str| {
        let (client, url, id) = (client.clone(), worker.url(), id.to_string());
        async move {
            let event = json!({"type": "track", "event": "Order Completed", "messageId": id, "userId": id,
                               "properties": {"email": format!("{id}@example.org")}});
            let answer = client
                .post(format!("{url}/api/s/s2s/track"))
                .header("X-Write-Key", WRITE_KEY)
                .body(event.to_string())
                .send()
                .await
                .unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    assert_eq!(send("q-before").await.0, 200);
    // Two of three replicas gone: the stream cannot store anything.
    cluster.kill9(1);
    cluster.kill9(2);
    let (status, body) = send("q-during").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("send them again"), "{body}");
    // Back: the same event, sent again, is stored and delivered once.
    tokio::task::block_in_place(|| {
        cluster.start_node(1);
        cluster.start_node(2);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = send("q-during").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: Vec<String> = sandbox.events().into_iter().map(|e| e.unique_id).collect();
        if ids.contains(&"q-during".to_string()) && ids.contains(&"q-before".to_string()) {
            assert_eq!(ids.len(), 2, "{ids:?}");
            break;
        }
        assert!(Instant::now() < deadline, "delivered: {ids:?}\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A connection made, paused and deleted through different workers is
/// made, paused and deleted on all; its backlog from the pause, spread over
/// every partition, is delivered before it is gone anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_through_one_worker_is_served_and_deleted_by_every_worker() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let workers = start_admin_workers(&dir, &cluster, &sandbox);
    let client = reqwest::Client::new();
    let admin = |method: reqwest::Method, url: String, body: Option<serde_json::Value>| {
        let client = client.clone();
        async move {
            let mut request = client.request(method, url).bearer_auth(ADMIN);
            if let Some(body) = body {
                request = request.body(body.to_string());
            }
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            let text = answer.text().await.unwrap();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or(json!(text)),
            )
        }
    };
    let (status, made) = admin(
        reqwest::Method::POST,
        format!("{}/admin/connections", workers[0].url()),
        Some(
            json!({"id": "shop2", "write_keys": ["wk_shop2"], "base_url": sandbox.url(),
                    "settings": {"api_key": {"env": "SHOP_KEY"}}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    // Every worker has it, and takes its write key.
    let state_on = |worker: &Worker| {
        let url = format!("{}/admin/connections/shop2", worker.url());
        let admin = &admin;
        async move {
            let (status, body) = admin(reqwest::Method::GET, url, None).await;
            (status == 200).then(|| body["state"].as_str().unwrap_or_default().to_string())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for worker in &workers {
        while state_on(worker).await.as_deref() != Some("active") {
            assert!(Instant::now() < deadline, "not made here: {}", worker.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    wait_until_settled(&workers).await;
    let send_through_each = |round: &'static str| {
        let (client, workers) = (&client, &workers);
        async move {
            for (n, worker) in workers.iter().enumerate() {
                for i in 0..20 {
                    let id = format!("shop2-{round}-{n}-{i}");
                    let event = json!({"type": "track", "event": "Order Completed", "messageId": id, "userId": id,
                                       "properties": {"email": format!("{id}@example.org")}});
                    let answer = client
                        .post(format!("{}/api/s/s2s/track", worker.url()))
                        .header("X-Write-Key", "wk_shop2")
                        .body(event.to_string())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(answer.status(), 200);
                }
            }
        }
    };
    send_through_each("a").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sandbox.events().len() < 60 {
        assert!(Instant::now() < deadline, "{} of 60 delivered", sandbox.events().len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paused through the second: paused on all; deleted through the third: gone from all.
    let (status, body) = admin(
        reqwest::Method::POST,
        format!("{}/admin/connections/shop2/pause", workers[1].url()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    for worker in &workers {
        while state_on(worker).await.as_deref() != Some("paused") {
            assert!(Instant::now() < deadline, "not paused here: {}", worker.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A backlog while paused, on every partition, whichever worker holds
    // it: the deletion delivers all of it before the shop is gone anywhere.
    send_through_each("b").await;
    let (status, body) = admin(
        reqwest::Method::DELETE,
        format!("{}/admin/connections/shop2", workers[2].url()),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    for worker in &workers {
        while state_on(worker).await.is_some() {
            assert!(Instant::now() < deadline, "not deleted here: {}", worker.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let delivered: std::collections::BTreeSet<String> = sandbox.events().iter().map(|e| e.unique_id.clone()).collect();
    assert_eq!(
        delivered.len(),
        120,
        "the paused shop's backlog was not all delivered before the deletion finished"
    );
}

/// The partitions `worker` holds now, by its metrics.
async fn partitions_held(worker: &Worker) -> u64 {
    let text = reqwest::get(format!("{}/metrics", worker.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("cdp_stream_partitions_held "))
        .map_or(0, |n| n.parse::<u64>().unwrap())
}

/// The profile with this email's first name, as the sandbox has it now.
fn first_name(sandbox: &KlaviyoMock, email: &str) -> Option<String> {
    sandbox
        .profiles()
        .into_iter()
        .find(|p| p.email.as_deref() == Some(email))
        .and_then(|p| {
            p.attributes
                .get("first_name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
}

/// Worker 1 holds the only partition and is retrying a person's identify
/// v1 (Klaviyo said 429, Retry-After 12 s) when it is stopped (SIGSTOP)
/// for longer than its lease. Worker 2 takes the partition, delivers v1,
/// then the person's v2. Worker 1 is resumed with its retry due: it must
/// not send v1 again over v2 (the lease fence drops it unsent), so the
/// profile ends at v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_sends_nothing_stale() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(MockConfig {
        faults: klaviyo_mock::Faults {
            throttle_storm: 1.0,
            storm_retry_after: 12,
            ..Default::default()
        },
        ..unlimited()
    })
    .await;
    let extra = ["--no-pacing", "--partitions", "1"];
    let first = Worker::start_with(dir.join("w1"), &cluster.urls(), &sandbox.url(), API_KEY, &extra);
    let deadline = Instant::now() + Duration::from_secs(60);
    while partitions_held(&first).await != 1 {
        assert!(Instant::now() < deadline, "worker 1 took no partition: {}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = Worker::start_with(dir.join("w2"), &cluster.urls(), &sandbox.url(), API_KEY, &extra);
    let client = reqwest::Client::new();
    let identify = |version: &str| {
        json!({"type": "identify", "messageId": format!("fence-{version}"), "userId": "fence-person",
               "traits": {"email": "fence@example.org", "firstName": version}})
    };
    let send = |event: serde_json::Value| {
        let client = client.clone();
        let url = format!("{}/api/s/s2s/identify", second.url());
        async move {
            let answer = client
                .post(url)
                .header("X-Write-Key", WRITE_KEY)
                .body(event.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
    };
    send(identify("v1")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandbox.stats().faults.get("throttle_storm").copied().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "worker 1 did not try v1: {}", first.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.signal("STOP");
    sandbox.set_faults(klaviyo_mock::Faults::default());
    let deadline = Instant::now() + Duration::from_secs(40);
    while first_name(&sandbox, "fence@example.org").as_deref() != Some("v1") {
        assert!(
            Instant::now() < deadline,
            "worker 2 did not deliver v1: {}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send(identify("v2")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while first_name(&sandbox, "fence@example.org").as_deref() != Some("v2") {
        assert!(
            Instant::now() < deadline,
            "worker 2 did not deliver v2: {}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Worker 1's retry of v1 is long due: resumed, it must drop it.
    first.signal("CONT");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        first_name(&sandbox, "fence@example.org").as_deref(),
        Some("v2"),
        "a stale v1 overwrote v2 after worker 1 resumed: {}",
        first.log()
    );
    assert!(
        first.log().contains("lost the lease"),
        "worker 1 did not notice: {}",
        first.log()
    );
}

/// A worker that delivered an event and recorded its outcome but whose ack
/// was lost (it died, or gave the partition up, before JetStream confirmed
/// it) leaves the event in the stream. The worker that reads the partition
/// next must find the record and ack the event without sending it again:
/// sent again, an identify would write its older values over the person's
/// newer ones until those came again too. Here the record is written as a
/// worker writes it, for an event no worker has read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_recorded_as_settled_is_acked_not_sent_again() {
    let sandbox = recorded_then_delivered(&["v1"]).await;
    let v1_sent: Vec<_> = sandbox
        .arrivals()
        .into_iter()
        .filter(|a| a.what == "profile-import" && a.detail.to_string().contains("\"v1\""))
        .collect();
    assert!(
        v1_sent.is_empty(),
        "an event recorded as settled was sent again: {v1_sent:?}"
    );
}

/// The other way round: the newer identify recorded, the older not (a
/// worker that died between two records, or stored them out of order).
/// The next worker sends the older one; it must then send the newer one
/// again too, or the profile would stay at the older values until the
/// person's next identify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_event_after_its_persons_unrecorded_one_is_sent_again() {
    let sandbox = recorded_then_delivered(&["v2"]).await;
    let sent: Vec<String> = sandbox
        .arrivals()
        .into_iter()
        .filter(|a| a.what == "profile-import")
        .filter_map(|a| a.detail["first_name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(sent, ["v1", "v2"]);
}

/// An ingest-only host on one partition: it stores events and delivers none.
fn ingest_only(dir: &Path, cluster: &Cluster, sandbox: &KlaviyoMock) -> Worker {
    Worker::start_with(
        dir.join("ingest"),
        &cluster.urls(),
        &sandbox.url(),
        API_KEY,
        &["--no-pacing", "--partitions", "1", "--role", "ingest"],
    )
}

/// A JetStream client on the cluster's first node, as the test's own.
async fn jetstream(cluster: &Cluster) -> async_nats::jetstream::Context {
    let nats = async_nats::connect(cluster.urls().split(',').next().unwrap())
        .await
        .unwrap();
    async_nats::jetstream::new(nats)
}

/// An ingest-only host stores one person's identifies v1 and v2; the test
/// records the given versions as settled, as a worker records them; then a
/// delivery worker starts, and the test waits until the profile is at v2
/// and the stream is empty.
async fn recorded_then_delivered(recorded: &[&str]) -> KlaviyoMock {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let ingest = ingest_only(&dir, &cluster, &sandbox);
    let client = reqwest::Client::new();
    for version in ["v1", "v2"] {
        let event = json!({"type": "identify", "messageId": format!("recorded-{version}"), "userId": "recorded-person",
                           "traits": {"email": "recorded@example.org", "firstName": version}});
        let answer = client
            .post(format!("{}/api/s/s2s/identify", ingest.url()))
            .header("X-Write-Key", WRITE_KEY)
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let js = jetstream(&cluster).await;
    let mut events = js.get_stream("CHORD_EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 2);
    for (sequence, version) in [(1u64, "v1"), (2, "v2")] {
        if !recorded.contains(&version) {
            continue;
        }
        let stored = events.get_raw_message(sequence).await.unwrap();
        let event = stored.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
        assert!(event.ends_with(&format!(":recorded-{version}")), "{event}");
        let record = json!({"sequence": sequence, "connection": event.split(':').next().unwrap(),
                            "message_id": format!("recorded-{version}"), "state": "delivered", "reason": null,
                            "plugin_version": "klaviyo@1.0.0", "received_at": null,
                            "finished_at": chrono::Utc::now().to_rfc3339(), "worker": "a-worker-gone",
                            "subject": "chord.events.0", "event": event});
        js.publish("chord.outcomes.0", record.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let deliver = Worker::start_with(
        dir.join("deliver"),
        &cluster.urls(),
        &sandbox.url(),
        API_KEY,
        &["--no-pacing", "--partitions", "1", "--role", "deliver"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while events.info().await.unwrap().state.messages > 0 {
        assert!(
            Instant::now() < deadline,
            "the events were not all acked: {}",
            deliver.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        first_name(&sandbox, "recorded@example.org").as_deref(),
        Some("v2"),
        "{}",
        deliver.log()
    );
    sandbox
}

/// The consumers on the events stream now, with when each was made.
async fn consumers_made(js: &async_nats::jetstream::Context) -> BTreeMap<String, String> {
    use futures_util::StreamExt;
    let events = js.get_stream("CHORD_EVENTS").await.unwrap();
    let mut names: Vec<String> = Vec::new();
    let mut listed = events.consumer_names();
    while let Some(name) = listed.next().await {
        names.push(name.unwrap());
    }
    let mut made = BTreeMap::new();
    for name in names {
        let info = events.consumer_info(&name).await.unwrap();
        made.insert(name, info.created.to_string());
    }
    made
}

/// Worker 1 takes the only partition and is stopped (SIGSTOP) before it
/// reads it (a worker waits `FENCE_MARGIN` between taking a partition and
/// making its consumer), for longer than its lease. Worker 2 takes the
/// partition and reads it. Resumed, worker 1's reader wakes where it
/// slept, about to make the partition's consumer; its lease is gone, and it
/// must leave worker 2's consumer alone. (It used to delete it and make
/// its own under the same name; had its delete failed, as it can while a
/// NATS node is down, it would have shared worker 2's consumer and taken
/// a batch of events only to drop them at its fence, and they came back
/// after the ack wait, behind the person's newer events.) Every event
/// arrives once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_while_taking_a_partition_leaves_the_next_holders_reader_alone() {
    let dir = tempdir();
    let cluster = Cluster::start(dir.join("nats"));
    let sandbox = crate::support::sandbox(unlimited()).await;
    let extra = ["--no-pacing", "--partitions", "1"];
    let ingest = ingest_only(&dir, &cluster, &sandbox);
    let first = Worker::start_with(dir.join("w1"), &cluster.urls(), &sandbox.url(), API_KEY, &extra);
    let took = |worker: &Worker| {
        std::fs::read_to_string(worker.dir.join("serve.log"))
            .unwrap_or_default()
            .contains("took the partition")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !took(&first) {
        assert!(Instant::now() < deadline, "worker 1 took no partition: {}", first.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    first.signal("STOP");
    let js = jetstream(&cluster).await;
    assert!(
        consumers_made(&js).await.is_empty(),
        "worker 1 was stopped too late: it had made its consumer already"
    );

    // One person's tracks, each sent once the last was acknowledged, from
    // now until told to stop: a backlog builds while no one reads.
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = tokio::spawn({
        let url = format!("{}/api/s/s2s/track", ingest.url());
        let sending = sending.clone();
        async move {
            let client = reqwest::Client::new();
            let mut acked = Vec::new();
            while sending.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("step-{}", acked.len());
                let event = json!({"type": "track", "event": "Step", "messageId": id, "userId": "stepper",
                                   "properties": {"email": "stepper@example.org", "step": acked.len()}});
                let answer = client
                    .post(&url)
                    .header("X-Write-Key", WRITE_KEY)
                    .body(event.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200, "ingest refused {id}");
                acked.push(id);
            }
            acked
        }
    });
    let second = Worker::start_with(dir.join("w2"), &cluster.urls(), &sandbox.url(), API_KEY, &extra);
    let deadline = Instant::now() + Duration::from_secs(40);
    while sandbox.events().is_empty() {
        assert!(
            Instant::now() < deadline,
            "worker 2 delivered nothing: {}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = consumers_made(&js).await;
    assert_eq!(before.len(), 1, "{before:?}");
    first.signal("CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = consumers_made(&js).await;
    assert_eq!(
        after,
        before,
        "worker 1, resumed without its lease, changed the partition's consumer\n{}\n----\n{}",
        first.log(),
        second.log()
    );
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let acked = sender.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let arrived: BTreeSet<String> = sandbox.events().into_iter().map(|e| e.unique_id).collect();
        if acked.iter().all(|id| arrived.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged events arrived\n{}",
            arrived.len(),
            acked.len(),
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let arrived: Vec<String> = sandbox.events().into_iter().map(|e| e.unique_id).collect();
    assert_eq!(arrived, acked, "not each event once, in the order sent");
}
