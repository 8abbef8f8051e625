//! `warren-bench-report RUNS.tsv --csv OUT.csv --svg OUT.svg`: the table, CSV and chart of a
//! `scripts/bench-throughput` run (see [`warren_benches::throughput`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use warren_benches::throughput;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "warren-bench-report",
    about = "medians, CSV and SVG chart of scripts/bench-throughput's runs"
)]
struct Args {
    /// The runs the script recorded (tab-separated).
    runs: PathBuf,
    /// Write every run and the medians here as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw the rounds here as an SVG chart.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.runs)
        .with_context(|| format!("reading {}", args.runs.display()))?;
    let runs = throughput::parse(&text)?;
    let summaries = throughput::summarize(&runs);
    print!("{}", throughput::table(&summaries));
    if let Some(path) = &args.csv {
        std::fs::write(path, throughput::csv(&runs, &summaries))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("CSV: {}", path.display());
    }
    if let Some(path) = &args.svg {
        throughput::chart(&runs, path)?;
        println!("chart: {}", path.display());
    }
    Ok(())
}
