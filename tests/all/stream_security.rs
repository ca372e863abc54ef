//! `serve --stream` against a NATS server that asks every client for
//! credentials and speaks only TLS, with a certificate authority made
//! here: a host with the right credentials and CA delivers; one without
//! them is refused at start with an error that says why, and no secret
//! appears in anything it prints.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use klaviyo_mock::{DEMO_KEY, KlaviyoMock, MockConfig};

use crate::cli_map::tempdir;
use crate::nats::{Cluster, free_port};
use crate::serve::{WRITE_KEY, post_track};
use crate::support::cdp_host;

const PASSWORD: &str = "pw-7f3a91c2e4b8d6";

/// A CA, and a certificate it signed for 127.0.0.1 with its key; the
/// paths of the CA's, the server's and the key's PEM files.
fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-server.pem")),
        dir.join(format!("{name}-server-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// `serve --stream` with `extra` flags, its stderr in `log`.
fn serve(dir: &Path, nats: &str, sandbox: &str, port: u16, extra: &[&str], log: &Path) -> std::process::Child {
    std::fs::create_dir_all(dir).unwrap();
    cdp_host()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--write-key",
            WRITE_KEY,
            "--base-url",
            sandbox,
            "--stream",
            nats,
            "--stream-replicas",
            "1",
            "--spool",
            &dir.join("spool.sqlite").display().to_string(),
        ])
        .args(extra)
        .env("KLAVIYO_API_KEY", DEMO_KEY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Runs a `serve` that must not start: its exit within `within`, and
/// everything it printed.
fn refused(mut child: std::process::Child, log: &Path, within: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, std::fs::read_to_string(log).unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve still running after {within:?}: {}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dlq_list(nats: &str, extra: &[&str]) -> Output {
    cdp_host()
        .args(["dlq", "list", "--stream", nats])
        .args(extra)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_requires_credentials_and_tls_is_reached_only_with_both() {
    let dir = tempdir();
    let (ca, cert, key) = certificates(&dir, "nats");
    let (other_ca, _, _) = certificates(&dir, "other");
    let seed = nkeys::KeyPair::new_user();
    let cluster = Cluster::single_with(
        dir.join("nats"),
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n\
             authorization {{ users: [ {{ user: chord, password: \"{PASSWORD}\" }}, {{ nkey: \"{}\" }} ] }}",
            cert.display(),
            key.display(),
            seed.public_key(),
        ),
    );
    let nats = cluster.urls();
    let password_file = dir.join("nats-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let seed_file = dir.join("nats-seed");
    std::fs::write(&seed_file, seed.seed().unwrap()).unwrap();
    let sandbox = KlaviyoMock::start(MockConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ca_arg = ca.display().to_string();
    let password_arg = password_file.display().to_string();
    let with_password = [
        "--nats-user",
        "chord",
        "--nats-password-file",
        &password_arg,
        "--nats-tls-ca",
        &ca_arg,
    ];

    // No credentials: refused at start, saying so.
    let log = dir.join("no-credentials.log");
    let child = serve(
        &dir.join("a"),
        &nats,
        &sandbox.url(),
        free_port(),
        &["--nats-tls-ca", &ca_arg],
        &log,
    );
    let (status, printed) = refused(child, &log, Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        printed.contains("refused this host (nats: authorization violation)"),
        "{printed}"
    );
    assert!(
        printed.contains("--nats-user"),
        "the error says where to look: {printed}"
    );

    // The right password, but a CA that did not sign the server's
    // certificate: refused, naming TLS.
    let log = dir.join("wrong-ca.log");
    let other_ca_arg = other_ca.display().to_string();
    let wrong_ca = [
        "--nats-user",
        "chord",
        "--nats-password-file",
        &password_arg,
        "--nats-tls-ca",
        &other_ca_arg,
    ];
    let child = serve(&dir.join("b"), &nats, &sandbox.url(), free_port(), &wrong_ca, &log);
    let (status, printed) = refused(child, &log, Duration::from_secs(30));
    assert!(!status.success());
    assert!(printed.contains("TLS error"), "{printed}");
    assert!(printed.contains("--nats-tls-ca"), "{printed}");
    assert!(!printed.contains(PASSWORD), "the password was printed: {printed}");

    // A password file that is not there: named, before anything connects.
    let out = dlq_list(
        &nats,
        &["--nats-user", "chord", "--nats-password-file", "/nonexistent/pw"],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("--nats-password-file /nonexistent/pw"),
        "{text}"
    );

    // Both: it delivers, and `dlq` reaches the stream with the same flags.
    let port = free_port();
    let log = dir.join("serving.log");
    let mut child = serve(&dir.join("c"), &nats, &sandbox.url(), port, &with_password, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not start: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "serve exited: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(post_track(&client, &url, "secure-1").await, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandbox.events().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not delivered: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = dlq_list(&nats, &with_password);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // An NKey is another way in.
    let seed_arg = seed_file.display().to_string();
    let out = dlq_list(&nats, &["--nats-nkey", &seed_arg, "--nats-tls-ca", &ca_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = child.kill();
    let _ = child.wait();
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(!printed.contains(PASSWORD), "the password was printed: {printed}");
    assert!(printed.contains("as user \"chord\", over TLS"), "{printed}");
}
