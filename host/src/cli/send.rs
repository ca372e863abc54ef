//! `cdp-host send`: map NDJSON events and deliver them, with a progress
//! line, a summary, and the dead letters appended to a file.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cdp_host::delivery::Delivery;

use super::args::{RuntimeArgs, SendArgs};
use super::dead_letters::DeadLetterFile;
use super::progress;

pub fn send(runtime_args: &RuntimeArgs, args: SendArgs) -> anyhow::Result<ExitCode> {
    let config = args.delivery.config();
    let runtime = super::runtime(runtime_args, config.concurrency)?;
    let (slot, settings) = super::load_destination(&runtime, &args.plugin)?;
    let input: Box<dyn io::BufRead + Send> = if args.input == Path::new("-") {
        Box::new(BufReader::new(io::stdin()))
    } else {
        let file = File::open(&args.input).with_context(|| format!("reading events {}", args.input.display()))?;
        Box::new(BufReader::new(file))
    };
    let dead_letters = DeadLetterFile::new(&args.dead_letters);
    let delivery = Delivery::new(slot, settings, config)?;
    let print = args.print_outcomes;
    let report = super::tokio_runtime()?.block_on(async {
        let progress = progress::show(delivery.progress.clone());
        let report = delivery
            .run(input, |record| {
                dead_letters.write(record);
                if print {
                    println!("{}", progress::outcome_line(record));
                }
            })
            .await;
        progress.finish();
        report
    })?;
    dead_letters.finish()?;
    println!("{}", report.summary());
    if let Some(peak) = progress::peak_memory_bytes() {
        println!("peak memory {:.1} MiB", peak as f64 / (1 << 20) as f64);
    }
    if report.dead_lettered > 0 {
        println!("dead letters: {}", args.dead_letters.display());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
