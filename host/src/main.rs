//! `cdp-host`: the command line of the reference host. Each command lives
//! in `cli/`; this file only sets up the process and dispatches.

mod cli;

use std::io;
use std::process::ExitCode;

use clap::Parser;

use cli::args::{Cli, Command, PluginCommand};

/// jemalloc, not the C library's allocator, for what Rust allocates: with
/// many busy connections, glibc's malloc and free took a third more time
/// an event than with one (threads freeing what others allocated), and
/// this is most of what 100 connections cost beyond one (BENCHMARKS §10).
/// SQLite and wasmtime's own C and mmap'd memory are not affected.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: a background thread returns
/// freed pages to the system after 100 ms unused (the default, 10 s,
/// kept a drain's peak far longer and higher than glibc did; `MALLOC_CONF`
/// in the environment, prefixed `_RJEM_`, still overrides this).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static, NUL-terminated string.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:100,muzzy_decay_ms:0".as_ptr() });

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so printing into a closed pipe (`| head`)
    // panics; a command that only reads files and prints should end
    // quietly instead, as `cat` does. Never for a command that talks over
    // the network: a vectored write to a peer that has gone (a NATS node
    // killed, a connection reset) would then kill the whole process
    // without a word, which is how `serve --stream` died when two NATS
    // nodes were killed under it.
    #[cfg(unix)]
    if matches!(cli.command, Command::Map(_) | Command::Plugin(_)) {
        // SAFETY: before any other thread exists (parsing starts none).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let (level, json) = match &cli.command {
        Command::Serve(args) => ("info", args.log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDP_HOST_LOG").unwrap_or_else(|_| level.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("cdp-host: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Map(args) => cli::map::map(&cli.runtime, args),
        Command::Send(args) => cli::send::send(&cli.runtime, args),
        #[cfg(feature = "sandbox")]
        Command::Sandbox(args) => cli::demo::sandbox(args),
        #[cfg(feature = "sandbox")]
        Command::Demo => cli::demo::demo(&cli.runtime),
        Command::Serve(args) => cli::serve::serve(&cli.runtime, *args),
        Command::Dlq(command) => cli::serve::dlq(command),
        Command::Plugin(PluginCommand::Inspect { file }) => cli::map::inspect(&cli.runtime, &file),
    }
}
