//! `cargo run --release -p chord-corpus -- [EVENTS] [SEED]`: writes the
//! realistic Chord mix as NDJSON to standard output (defaults: 10,000
//! events, seed 1).

use std::io::{BufWriter, Write};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let count = args
        .next()
        .map_or(10_000, |n| n.parse().expect("EVENTS is a whole number"));
    let seed = args.next().map_or(1, |n| n.parse().expect("SEED is a whole number"));
    let mut out = BufWriter::new(std::io::stdout().lock());
    for event in chord_corpus::generate(seed, count) {
        out.write_all(event.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
