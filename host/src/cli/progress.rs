//! What `send` shows while it runs: a live bar on a terminal, a plain line
//! every few seconds otherwise, and one line per event when asked.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cdp_host::delivery::{EventOutcome, EventRecord, Progress};

pub struct Shown {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Shown {
    pub fn finish(self) {
        let _ = self.stop.send(true);
    }
}

/// Starts showing progress on stderr until `finish`.
pub fn show(progress: Arc<Progress>) -> Shown {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let terminal = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let every = if terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let line = counts(&progress);
            match &bar {
                Some(bar) => bar.set_message(line),
                None => eprintln!("progress: {line}"),
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    });
    Shown { stop }
}

fn counts(p: &Progress) -> String {
    format!(
        "{} read, {} delivered, {} skipped, {} dead-lettered, {} retries",
        p.read.load(Ordering::Relaxed),
        p.delivered.load(Ordering::Relaxed),
        p.skipped.load(Ordering::Relaxed),
        p.dead_lettered.load(Ordering::Relaxed),
        p.retries.load(Ordering::Relaxed)
    )
}

/// "line 3  track     ex-0003  delivered (1 request)".
pub fn outcome_line(record: &EventRecord) -> String {
    let outcome = match &record.outcome {
        EventOutcome::Delivered { requests } => {
            format!(
                "delivered ({requests} request{})",
                if *requests == 1 { "" } else { "s" }
            )
        }
        EventOutcome::Skipped(reason) => format!("skipped: {reason}"),
        EventOutcome::DeadLettered(letter) => format!("dead-lettered: {}", letter.reason),
        EventOutcome::Abandoned(reason) => format!("abandoned: {reason}"),
    };
    let retries = if record.retries > 0 {
        format!(" after {} retries", record.retries)
    } else {
        String::new()
    };
    let mut line = format!(
        "  line {:<3} {:<9} {:<10} {outcome}{retries}",
        record.id.number(),
        record.kind.as_deref().unwrap_or("-"),
        record.message_id.as_deref().unwrap_or("-"),
    );
    for warning in &record.warnings {
        line.push_str(&format!("\n            warning: {warning}"));
    }
    line
}

/// The process's peak resident memory (Linux `VmHWM`), for the summary.
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
