//! A fault run judged by a checker, in the manner of Jepsen. People send
//! identifies and tracks, each with a per-person sequence number, one at a
//! time (a person's next event only once the last is acknowledged), while
//! a nemesis kills (-9) and restarts `serve`, stops and resumes it
//! (SIGSTOP/SIGCONT, on the stream longer than a lease), kills NATS nodes
//! one at a time and two at once, fills the spool's disk (a small tmpfs,
//! when the run may mount one), and makes the Klaviyo stand-in fail (5xx, 429 with Retry-After, slow
//! answers). Then everything heals, and the checker reads every write the
//! stand-in accepted, in arrival order, and proves:
//! - lost: every acknowledged event was accepted;
//! - duplicated: no track accepted under two `unique_id`s (Klaviyo would
//!   count it twice);
//! - reordered: each person's writes arrived in sequence order (a write
//!   of an older event after a newer one is a stale write);
//! - stale: each person's profile ends at their last identify;
//! - healed: all of it within a bound after the last fault.
//!
//! The run is seeded: `CHORD_FAULT_SEED=N` replays one, and
//! `CHORD_FAULT_SECONDS=N` makes it longer (the short one runs in CI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klaviyo_mock::{DEMO_KEY, Faults, KlaviyoMock, MockConfig};
use serde_json::{Value, json};

use crate::cli_map::tempdir;
use crate::nats::Cluster;
use crate::serve::WRITE_KEY;
use crate::support::cdp_host;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_the_spool_lose_duplicate_reorder_and_stale_nothing() {
    run(Backend::Spool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_the_stream_lose_duplicate_reorder_and_stale_nothing() {
    run(Backend::Stream).await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Spool,
    Stream,
}

/// How many people send at once.
const PEOPLE: usize = 10;
/// Every fourth event of a person is an identify (the first one too).
const IDENTIFY_EVERY: usize = 4;
/// How long everything may take to arrive once the last fault healed.
const HEAL_BOUND: Duration = Duration::from_secs(120);

/// xorshift64*: a fixed seed gives the same faults in the same order.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        low + Duration::from_millis(self.below((high - low).as_millis() as u64 + 1))
    }
}

/// A `serve` process that can be killed, restarted, stopped and resumed.
struct Serve {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Where the spool lives: `dir` itself, or a small disk of its own.
    disk: PathBuf,
    args: Vec<String>,
}

impl Serve {
    fn start(dir: PathBuf, disk: Option<PathBuf>, args: Vec<String>) -> Serve {
        std::fs::create_dir_all(&dir).unwrap();
        let disk = disk.unwrap_or_else(|| dir.clone());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut serve = Serve {
            child: None,
            port,
            dir,
            disk,
            args,
        };
        serve.restart();
        serve
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let child = cdp_host()
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--spool", &self.disk.join("spool.sqlite").display().to_string()])
            .args(&self.args)
            .env("KLAVIYO_API_KEY", DEMO_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill9();
    }
}

/// What is under test: the hosts, and the NATS cluster under them.
struct System {
    hosts: Vec<Serve>,
    nats: Option<Cluster>,
    /// The spool's own small disk, when one could be mounted.
    disk: Option<SmallDisk>,
}

/// A 256 MiB tmpfs for the spool, so the nemesis can fill it (room enough
/// that in a 30-minute run only the nemesis fills it: at 32 MiB the spool
/// filled it itself, and delivery rightly stopped for good). Mounting
/// needs root; without it the run says so and leaves the fault out.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if mounted {
            Some(SmallDisk { path })
        } else {
            eprintln!("no full-disk faults in this run: mounting a tmpfs needs root");
            None
        }
    }

    /// Writes a filler file until the disk refuses more.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 1 << 16];
        while filler.write_all(&block).is_ok() {}
        let _ = filler.sync_all();
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.path.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

impl System {
    fn start(backend: Backend, dir: &Path, sandbox: &KlaviyoMock) -> System {
        let mut args: Vec<String> = [
            "--write-key",
            WRITE_KEY,
            "--base-url",
            &sandbox.url(),
            "--no-pacing",
            "--max-attempts",
            "1000",
            "--max-retry-seconds",
            "900",
            "--shutdown-grace-seconds",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match backend {
            Backend::Spool => {
                let disk = SmallDisk::mount(dir.join("disk"));
                let spool = disk.as_ref().map(|disk| disk.path.clone());
                System {
                    hosts: vec![Serve::start(dir.join("serve"), spool, args)],
                    nats: None,
                    disk,
                }
            }
            Backend::Stream => {
                let nats = Cluster::start(dir.join("nats"));
                args.extend(["--stream", &nats.urls(), "--stream-replicas", "3"].map(String::from));
                let hosts = (0..2)
                    .map(|i| Serve::start(dir.join(format!("w{i}")), None, args.clone()))
                    .collect();
                System {
                    hosts,
                    nats: Some(nats),
                    disk: None,
                }
            }
        }
    }
}

/// One event a person sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Op {
    person: usize,
    seq: usize,
}

impl Op {
    fn identify(self) -> bool {
        self.seq.is_multiple_of(IDENTIFY_EVERY)
    }

    fn email(self) -> String {
        format!("fault-{}@example.org", self.person)
    }

    fn body(self) -> Value {
        let (person, seq) = (self.person, self.seq);
        if self.identify() {
            json!({"type": "identify", "messageId": format!("f-{person}-{seq}"), "userId": format!("fault-{person}"),
                   "traits": {"email": self.email(), "firstName": format!("v{seq}"), "seq": seq}})
        } else {
            json!({"type": "track", "event": "Fault Step", "messageId": format!("f-{person}-{seq}"),
                   "userId": format!("fault-{person}"), "properties": {"email": self.email(), "seq": seq}})
        }
    }
}

/// What the senders saw: acknowledged events, and those sent but never
/// acknowledged (which may or may not arrive).
#[derive(Default)]
struct History {
    acked: Vec<Op>,
    unknown: Vec<Op>,
}

/// A person's events, one at a time, each sent until it is acknowledged,
/// to whichever host answers, until `stop`.
async fn person(
    person: usize,
    urls: Vec<String>,
    history: Arc<Mutex<History>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut turn = person;
    for seq in 0.. {
        let op = Op { person, seq };
        let kind = if op.identify() { "identify" } else { "track" };
        let body = op.body().to_string();
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                history.lock().unwrap().unknown.push(op);
                return;
            }
            turn += 1;
            let url = format!("{}/api/s/s2s/{kind}", urls[turn % urls.len()]);
            let sent = client
                .post(url)
                .header("X-Write-Key", WRITE_KEY)
                .body(body.clone())
                .send()
                .await;
            if sent.is_ok_and(|answer| answer.status() == 200) {
                history.lock().unwrap().acked.push(op);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fault the nemesis can inject, and heal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillServe,
    PauseServe,
    KillNatsNode,
    /// Two of three at once: no quorum until they are back.
    KillTwoNatsNodes,
    /// The spool's disk full: ingest refuses, outcomes cannot be written.
    FullDisk,
    Klaviyo5xx,
    Klaviyo429,
    KlaviyoSlow,
}

async fn run(backend: Backend) {
    let seed: u64 = std::env::var("CHORD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let seconds: u64 = std::env::var("CHORD_FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    eprintln!("{backend:?}: fault run, seed {seed} (CHORD_FAULT_SEED={seed} replays it), {seconds} s of faults");
    let mut rng = Rng(seed | 1);
    let dir = tempdir();
    let sandbox = crate::support::sandbox(MockConfig {
        rate_limits: false,
        seed,
        ..MockConfig::default()
    })
    .await;
    let mut system = System::start(backend, &dir, &sandbox);
    let urls: Vec<String> = system.hosts.iter().map(Serve::url).collect();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..PEOPLE)
        .map(|p| tokio::spawn(person(p, urls.clone(), history.clone(), stop.clone())))
        .collect();

    let faults: &[Fault] = match backend {
        Backend::Spool => &[
            Fault::KillServe,
            Fault::PauseServe,
            Fault::FullDisk,
            Fault::Klaviyo5xx,
            Fault::Klaviyo429,
            Fault::KlaviyoSlow,
        ],
        Backend::Stream => &[
            Fault::KillServe,
            Fault::PauseServe,
            Fault::KillNatsNode,
            Fault::KillTwoNatsNodes,
            Fault::Klaviyo5xx,
            Fault::Klaviyo429,
            Fault::KlaviyoSlow,
        ],
    };
    // `CHORD_FAULT_KINDS=KillServe,Klaviyo429` narrows a replay to some kinds.
    let only: Option<Vec<String>> = std::env::var("CHORD_FAULT_KINDS")
        .ok()
        .map(|kinds| kinds.split(',').map(str::to_string).collect());
    let faults: Vec<Fault> = faults
        .iter()
        .copied()
        .filter(|f| only.as_ref().is_none_or(|only| only.contains(&format!("{f:?}"))))
        .filter(|f| *f != Fault::FullDisk || system.disk.is_some())
        .collect();
    let mut injected: BTreeMap<Fault, usize> = BTreeMap::new();
    let started = Instant::now();
    // Every kind of fault in each round, in a seeded order: a short run
    // injects each one at least once.
    let mut round: Vec<Fault> = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) || injected.len() < faults.len() {
        tokio::time::sleep(rng.between(Duration::from_secs(2), Duration::from_secs(4))).await;
        if round.is_empty() {
            round = faults.to_vec();
            for i in (1..round.len()).rev() {
                round.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let fault = round.pop().expect("refilled above");
        eprintln!("{backend:?}: {:>5.1}s {fault:?}", started.elapsed().as_secs_f64());
        *injected.entry(fault).or_default() += 1;
        let host = rng.below(system.hosts.len() as u64) as usize;
        match fault {
            Fault::KillServe => {
                system.hosts[host].kill9();
                tokio::time::sleep(rng.between(Duration::from_millis(200), Duration::from_secs(3))).await;
                system.hosts[host].restart();
            }
            Fault::PauseServe => {
                // On the stream, past the lease (8 s): another worker takes
                // the partitions while this one is stopped mid-work.
                let (low, high) = match backend {
                    Backend::Spool => (Duration::from_secs(1), Duration::from_secs(5)),
                    Backend::Stream => (Duration::from_secs(9), Duration::from_secs(14)),
                };
                system.hosts[host].signal("STOP");
                tokio::time::sleep(rng.between(low, high)).await;
                system.hosts[host].signal("CONT");
            }
            Fault::KillNatsNode => {
                let nats = system.nats.as_mut().expect("a stream has NATS");
                let node = rng.below(3) as usize;
                nats.kill9(node);
                tokio::time::sleep(rng.between(Duration::from_secs(1), Duration::from_secs(5))).await;
                nats.start_node(node);
            }
            Fault::KillTwoNatsNodes => {
                let nats = system.nats.as_mut().expect("a stream has NATS");
                let spared = rng.below(3) as usize;
                let nodes: Vec<usize> = (0..3).filter(|n| *n != spared).collect();
                for node in &nodes {
                    nats.kill9(*node);
                }
                tokio::time::sleep(rng.between(Duration::from_secs(2), Duration::from_secs(6))).await;
                for node in nodes {
                    nats.start_node(node);
                }
            }
            Fault::FullDisk => {
                let disk = system.disk.as_ref().expect("only with a disk of its own");
                disk.fill();
                tokio::time::sleep(rng.between(Duration::from_secs(2), Duration::from_secs(6))).await;
                disk.free();
            }
            Fault::Klaviyo5xx | Fault::Klaviyo429 | Fault::KlaviyoSlow => {
                sandbox.set_faults(match fault {
                    Fault::Klaviyo5xx => Faults {
                        server_errors: 0.5,
                        ..Faults::default()
                    },
                    Fault::Klaviyo429 => Faults {
                        throttle_storm: 0.5,
                        storm_retry_after: 2,
                        ..Faults::default()
                    },
                    _ => Faults {
                        slow: 0.5,
                        latency: Duration::from_secs(2),
                        ..Faults::default()
                    },
                });
                tokio::time::sleep(rng.between(Duration::from_secs(2), Duration::from_secs(6))).await;
                sandbox.set_faults(Faults::default());
            }
        }
    }
    // Heal: no fault is left in place; the senders stop.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }
    for host in &mut system.hosts {
        if !host.running() {
            host.restart();
        }
    }
    let healed = Instant::now();
    let history = std::mem::take(&mut *history.lock().unwrap());
    let acked: BTreeSet<Op> = history.acked.iter().copied().collect();
    // Everything acknowledged arrives within the bound.
    let mut missing = acked.clone();
    while healed.elapsed() < HEAL_BOUND {
        let seen = arrived(&sandbox);
        missing.retain(|op| !seen.ops.contains(op));
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = healed.elapsed();
    let seen = arrived(&sandbox);
    // A moment more: late stale writes would come now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen_late = arrived(&sandbox);
    assert_eq!(
        seen.writes, seen_late.writes,
        "writes still arriving after everything had arrived"
    );
    let verdict = check(&history, &sandbox, &seen_late);
    eprintln!(
        "{backend:?}: seed {seed}; {} events acknowledged ({} unknown at the end), faults {injected:?}; \
         lost {}, duplicated {}, reordered {}, stale profiles {}; all arrived {:.1}s after healing",
        acked.len(),
        history.unknown.len(),
        verdict.lost.len(),
        verdict.duplicated.len(),
        verdict.reordered.len(),
        verdict.stale.len(),
        took.as_secs_f64()
    );
    if let Some((person, seq, _)) = verdict.reordered.first() {
        let seqs: Vec<usize> = seen_late
            .writes
            .iter()
            .filter(|w| w.0 == *person)
            .map(|w| w.1)
            .collect();
        let at = seqs.iter().position(|s| s == seq).unwrap_or(0);
        eprintln!(
            "person {person}'s writes around the first out of order: {:?}",
            &seqs[at.saturating_sub(12)..(at + 12).min(seqs.len())]
        );
    }
    let logs: Vec<String> = system.hosts.iter().map(Serve::log).collect();
    assert!(
        verdict.lost.is_empty()
            && verdict.duplicated.is_empty()
            && verdict.reordered.is_empty()
            && verdict.stale.is_empty(),
        "{backend:?}, seed {seed}: lost {:?}, duplicated {:?}, reordered {:?}, stale {:?}\n{}",
        first(&verdict.lost),
        first(&verdict.duplicated),
        first(&verdict.reordered),
        first(&verdict.stale),
        logs.join("\n----\n")
    );
}

fn first<T: std::fmt::Debug>(items: &[T]) -> Vec<&T> {
    items.iter().take(5).collect()
}

/// What the stand-in accepted, as the checker reads it.
struct Arrived {
    /// Each write as (person, seq, unique_id if an event), in arrival order.
    writes: Vec<(usize, usize, Option<String>)>,
    ops: BTreeSet<Op>,
}

fn arrived(sandbox: &KlaviyoMock) -> Arrived {
    // Profile ids to people, by email.
    let people: BTreeMap<String, usize> = sandbox
        .profiles()
        .into_iter()
        .filter_map(|p| {
            let person = p
                .email?
                .strip_prefix("fault-")?
                .strip_suffix("@example.org")?
                .parse()
                .ok()?;
            Some((p.id, person))
        })
        .collect();
    let mut writes = Vec::new();
    let mut ops = BTreeSet::new();
    for arrival in sandbox.arrivals() {
        let Some(&person) = people.get(&arrival.profile_id) else {
            continue;
        };
        let (seq, unique_id) = if arrival.what == "profile-import" {
            (arrival.detail["properties"]["seq"].as_u64(), None)
        } else {
            (
                arrival.detail["properties"]["seq"].as_u64(),
                arrival.detail["unique_id"].as_str().map(str::to_string),
            )
        };
        let Some(seq) = seq else { continue };
        writes.push((person, seq as usize, unique_id));
        ops.insert(Op {
            person,
            seq: seq as usize,
        });
    }
    Arrived { writes, ops }
}

#[derive(Default)]
struct Verdict {
    lost: Vec<Op>,
    /// (person, seq, its unique_ids)
    duplicated: Vec<(usize, usize, BTreeSet<String>)>,
    /// (person, seq arrived, after seq)
    reordered: Vec<(usize, usize, usize)>,
    /// (person, profile's first name, expected)
    stale: Vec<(usize, Option<String>, String)>,
}

fn check(history: &History, sandbox: &KlaviyoMock, seen: &Arrived) -> Verdict {
    let mut verdict = Verdict {
        lost: history
            .acked
            .iter()
            .filter(|op| !seen.ops.contains(op))
            .copied()
            .collect(),
        ..Verdict::default()
    };
    let mut ids: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();
    // Per person: the newest write arrived, the newest identify, and
    // every write arrived so far.
    let mut newest: BTreeMap<usize, usize> = BTreeMap::new();
    let mut newest_identify: BTreeMap<usize, usize> = BTreeMap::new();
    let mut arrived: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (person, seq, unique_id) in &seen.writes {
        let identify = unique_id.is_none();
        if let Some(id) = unique_id {
            ids.entry((*person, *seq)).or_default().insert(id.clone());
        }
        let latest = newest.get(person).copied().unwrap_or(0);
        let first_time = arrived.insert((*person, *seq));
        // Out of order: an event arriving for the first time after a
        // newer one of its person, or an identify arriving (again or not)
        // after a newer identify, which would leave the profile stale. An
        // identify sent again after a crash, with no newer identify in
        // between, only writes what the profile already says.
        let late_first = first_time && *seq < latest;
        let stale_identify = identify && newest_identify.get(person).is_some_and(|n| *seq < *n);
        if late_first || stale_identify {
            verdict.reordered.push((*person, *seq, latest));
        }
        newest.insert(*person, latest.max(*seq));
        if identify {
            let n = newest_identify.entry(*person).or_insert(*seq);
            *n = (*n).max(*seq);
        }
    }
    verdict.duplicated = ids
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|((person, seq), ids)| (person, seq, ids))
        .collect();
    let profiles: BTreeMap<String, Option<String>> = sandbox
        .profiles()
        .into_iter()
        .filter_map(|p| {
            let name = p
                .attributes
                .get("first_name")
                .and_then(Value::as_str)
                .map(str::to_string);
            Some((p.email?, name))
        })
        .collect();
    for person in 0..PEOPLE {
        let last_acked = history
            .acked
            .iter()
            .filter(|op| op.person == person && op.identify())
            .map(|op| op.seq)
            .max();
        let Some(last_acked) = last_acked else { continue };
        // An identify sent at the end and never acknowledged may have
        // arrived after it: either is a right ending.
        let allowed: BTreeSet<String> = history
            .unknown
            .iter()
            .filter(|op| op.person == person && op.identify() && op.seq > last_acked)
            .map(|op| format!("v{}", op.seq))
            .chain([format!("v{last_acked}")])
            .collect();
        let email = Op { person, seq: 0 }.email();
        let name = profiles.get(&email).cloned().flatten();
        if !name.as_ref().is_some_and(|n| allowed.contains(n)) {
            verdict.stale.push((person, name, format!("v{last_acked}")));
        }
    }
    verdict
}
