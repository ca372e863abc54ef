//! `cdp-host serve` (its configuration layered from flags, the config file
//! and the defaults) and `cdp-host dlq`, which works on its dead letters.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cdp_host::serve::connections::NewConnection;
use cdp_host::serve::dead_letters::{DeadLetters, RowDeadLetters, StreamDeadLetters};
use cdp_host::serve::stream::access::read_secret_file;
use cdp_host::serve::stream::{NatsAccess, NatsAuth, NatsTls, Role, StreamOptions};
use cdp_host::serve::{Defaults, FileConnection, FlagsConnection, ServeConfig};
use cdp_host::settings::{DestinationSettings, Secret};
use cdp_host::spool::{Durability, Spool};

use super::args::{DlqCommand, NatsArgs, OnOff, RuntimeArgs, ServeArgs, ServeFile};
use cdp_host::serve::console::ConsoleOptions;

pub fn serve(runtime_args: &RuntimeArgs, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let file: ServeFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => ServeFile::default(),
    };
    let delivery = args.delivery.or(file.delivery()).config();
    let runtime = super::runtime(runtime_args, delivery.concurrency)?;
    let plugin_path = args.plugin.as_deref().or(file.plugin.as_deref());
    let plugin_bytes = match plugin_path {
        Some(path) => std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?,
        None => cdp_host::bundled::KLAVIYO.to_vec(),
    };
    let plugin = super::load_plugin(&runtime, plugin_path)?;
    let mut write_keys: Vec<String> = args.write_keys;
    write_keys.extend(file.write_keys);
    if let Ok(keys) = std::env::var("CDP_HOST_WRITE_KEYS") {
        write_keys.extend(
            keys.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
    }
    // The connection of the flags, as serve had before connections: when
    // write keys are given.
    let flags_connection = if write_keys.is_empty() {
        None
    } else {
        let defaults = super::secret_defaults(plugin_path);
        let settings = match (&args.settings, file.settings) {
            (Some(path), _) => DestinationSettings::load(Some(path), plugin.manifest(), defaults)?,
            (None, Some(table)) => {
                let object = serde_json::to_value(table)?.as_object().cloned().unwrap_or_default();
                DestinationSettings::from_object(object, plugin.manifest(), defaults, |name| std::env::var(name).ok())?
            }
            (None, None) => DestinationSettings::load(None, plugin.manifest(), defaults)?,
        };
        let slot = super::slot(plugin.clone(), &settings)?;
        Some(FlagsConnection {
            write_keys: write_keys.into_iter().map(Secret::new).collect(),
            slot,
            settings,
        })
    };
    let mut file_connections = Vec::new();
    for entry in file.connections {
        let context = format!("[[connections]] {}", entry.id);
        let plugin = match &entry.plugin {
            Some(path) => Some((
                std::fs::read(path).with_context(|| format!("{context}: reading plugin {}", path.display()))?,
                path.display().to_string(),
            )),
            None => None,
        };
        let settings = match entry.settings {
            Some(table) => serde_json::to_value(table)?.as_object().cloned().unwrap_or_default(),
            None => Default::default(),
        };
        file_connections.push(FileConnection {
            new: NewConnection {
                id: entry.id,
                write_keys: entry.write_keys,
                plugin: None,
                settings,
                base_url: entry.base_url,
                state: entry.state,
            },
            plugin,
        });
    }
    let durability = args.durability.or(file.durability).unwrap_or(Durability::ProcessCrash);
    let spool_path = args
        .spool
        .or(file.spool)
        .unwrap_or_else(|| PathBuf::from(Defaults::SPOOL));
    let spool = Arc::new(Spool::open(&spool_path, durability)?);
    let hours = args
        .retention_hours
        .or(file.retention_hours)
        .unwrap_or(Defaults::RETENTION_HOURS);
    let grace = args
        .shutdown_grace_seconds
        .or(file.shutdown_grace_seconds)
        .unwrap_or(Defaults::SHUTDOWN_GRACE_SECONDS);
    let config = ServeConfig {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| Defaults::LISTEN.parse().expect("the default address parses")),
        spool,
        plugin,
        plugin_bytes,
        flags_connection,
        file_connections,
        delivery,
        retention: Duration::from_secs(3600 * hours),
        shutdown_grace: Duration::from_secs(grace),
        admin_token: args
            .admin_token
            .or(file.admin_token)
            .or_else(|| std::env::var("CDP_HOST_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        plugin_dir: args.plugin_dir.or(file.plugin_dir),
        ingest_rate: args.ingest_rate.or(file.ingest_rate).unwrap_or(Defaults::INGEST_RATE),
        console: (!(args.no_console || file.no_console)).then(|| ConsoleOptions {
            ring: args.console_ring.or(file.console_ring).unwrap_or(ConsoleOptions::RING),
            bodies: args.console_bodies.or(file.console_bodies) != Some(OnOff::Off),
            body_budget: ConsoleOptions::BODY_BUDGET,
        }),
        approved_base_urls: args
            .approved_base_urls
            .into_iter()
            .chain(file.approved_base_urls)
            .collect(),
        admin_secret_sources: admin_secret_sources(
            args.admin_secret_env_prefixes
                .into_iter()
                .chain(file.admin_secret_env_prefixes)
                .collect(),
            args.admin_secret_dirs
                .into_iter()
                .chain(file.admin_secret_dirs)
                .collect(),
        )?,
        stream: match args.stream.or(file.stream).filter(|s| !s.trim().is_empty()) {
            Some(servers) => {
                let partitions = args
                    .partitions
                    .or(file.partitions)
                    .unwrap_or(StreamOptions::DEFAULT_PARTITIONS);
                if partitions == 0 {
                    bail!("--partitions must be at least 1 (every host of the stream must use the same number)");
                }
                let replicas = stream_replicas(&servers, args.stream_replicas.or(file.stream_replicas))?;
                Some(StreamOptions {
                    access: nats_access(servers, args.nats.or(file.nats))?,
                    role: args.role.or(file.role).unwrap_or(Role::Both),
                    replicas,
                    partitions,
                })
            }
            None if args.role.is_some() || file.role.is_some() => bail!("--role needs --stream"),
            None => None,
        },
    };
    super::tokio_runtime()?.block_on(cdp_host::serve::serve(config))?;
    Ok(ExitCode::SUCCESS)
}

/// The secret sources the operator lets an admin name; each directory by
/// its real path, so that a link cannot lead out of it.
fn admin_secret_sources(
    env_prefixes: Vec<String>,
    dirs: Vec<PathBuf>,
) -> anyhow::Result<cdp_host::serve::connections::SecretSources> {
    if env_prefixes.iter().any(String::is_empty) {
        bail!("--admin-secret-env-prefix must not be empty: that would allow every variable of the host");
    }
    let dirs = dirs
        .iter()
        .map(|dir| std::fs::canonicalize(dir).with_context(|| format!("--admin-secret-dir {}", dir.display())))
        .collect::<anyhow::Result<_>>()?;
    Ok(cdp_host::serve::connections::SecretSources { env_prefixes, dirs })
}

/// How to reach NATS, from the flags (or the config file's `[nats]`) and
/// the environment; at most one kind of credential.
fn nats_access(servers: String, nats: NatsArgs) -> anyhow::Result<NatsAccess> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let password = match (&nats.password_file, env("CDP_HOST_NATS_PASSWORD")) {
        (Some(file), _) => Some(read_secret_file(file, "--nats-password-file")?),
        (None, from_env) => from_env.map(Secret::new),
    };
    let token = match (&nats.token_file, env("CDP_HOST_NATS_TOKEN")) {
        (Some(file), _) => Some(read_secret_file(file, "--nats-token-file")?),
        (None, from_env) => from_env.map(Secret::new),
    };
    let mut kinds = Vec::new();
    if nats.user.is_some() {
        kinds.push("--nats-user");
    }
    if token.is_some() {
        kinds.push("--nats-token-file");
    }
    if nats.nkey.is_some() {
        kinds.push("--nats-nkey");
    }
    if nats.creds.is_some() {
        kinds.push("--nats-creds");
    }
    if kinds.len() > 1 {
        bail!("NATS takes one kind of credential; given {}", kinds.join(" and "));
    }
    if password.is_some() && nats.user.is_none() {
        bail!("a NATS password (--nats-password-file or CDP_HOST_NATS_PASSWORD) needs --nats-user");
    }
    let auth = if let Some(user) = nats.user {
        let Some(password) = password else {
            bail!("--nats-user {user:?} needs its password: --nats-password-file or CDP_HOST_NATS_PASSWORD");
        };
        NatsAuth::UserPassword { user, password }
    } else if let Some(token) = token {
        NatsAuth::Token(token)
    } else if let Some(file) = &nats.nkey {
        NatsAuth::NKey(read_secret_file(file, "--nats-nkey")?)
    } else if let Some(file) = nats.creds {
        NatsAuth::Creds(file)
    } else {
        NatsAuth::None
    };
    let client = match (nats.tls_cert, nats.tls_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => bail!("--nats-tls-cert and --nats-tls-key go together"),
    };
    Ok(NatsAccess {
        servers,
        auth,
        tls: NatsTls {
            required: nats.tls,
            ca: nats.tls_ca,
            client,
        },
    })
}

/// The copies JetStream keeps of each event: as asked, else three when
/// three or more servers are named (a 200 then survives the loss of any
/// one node), else one. Keeping fewer than three copies on a cluster of
/// three or more is allowed, with a warning that says what it risks.
fn stream_replicas(servers: &str, asked: Option<usize>) -> anyhow::Result<usize> {
    let named = servers.split(',').filter(|s| !s.trim().is_empty()).count();
    let replicas = asked.unwrap_or(if named >= 3 { 3 } else { 1 });
    if replicas == 0 {
        bail!("--stream-replicas must be at least 1");
    }
    if replicas < 3 {
        tracing::warn!(
            replicas,
            servers = named,
            "JetStream keeps {replicas} cop{} of each event: an acknowledged event is lost if {} lost; --stream-replicas 3 on a cluster of three survives the loss of one node",
            if replicas == 1 { "y" } else { "ies" },
            if replicas == 1 {
                "that node's disk is"
            } else {
                "both nodes' disks are"
            }
        );
    }
    Ok(replicas)
}

/// `cdp-host dlq`: one command over the dead letters of the spool, or of
/// the stream with `--stream`.
pub fn dlq(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let (spool, stream, nats, partitions) = match &command {
        DlqCommand::List {
            spool, stream, nats, ..
        }
        | DlqCommand::Purge {
            spool, stream, nats, ..
        } => (spool, stream, nats, None),
        DlqCommand::Replay {
            spool,
            stream,
            nats,
            partitions,
            ..
        } => (spool, stream, nats, *partitions),
    };
    let letters: Box<dyn DeadLetters> = match stream.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(servers) => Box::new(StreamDeadLetters {
            access: nats_access(servers.to_string(), nats.clone())?,
            partitions: partitions.unwrap_or(StreamOptions::DEFAULT_PARTITIONS),
        }),
        None => Box::new(RowDeadLetters(Arc::new(Spool::open(spool, Durability::ProcessCrash)?))),
    };
    super::tokio_runtime()?.block_on(async {
        match command {
            DlqCommand::List { connection, limit, .. } => {
                let stdout = io::stdout();
                let mut out = stdout.lock();
                for letter in letters.list(connection.as_deref(), limit).await? {
                    serde_json::to_writer(&mut out, &letter)?;
                    io::Write::write_all(&mut out, b"\n")?;
                }
            }
            DlqCommand::Replay { connection, ids, .. } => {
                let n = letters.replay(connection.as_deref(), &ids).await?;
                println!("{n} dead letters put back to be delivered");
            }
            DlqCommand::Purge { connection, ids, .. } => {
                let n = letters.purge(connection.as_deref(), &ids).await?;
                println!("{n} dead letters deleted");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
