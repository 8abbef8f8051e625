//! `warren-loadgen`: starts a real `warren-control serve`, plays N nodes against it over real
//! gRPC (one connection each: register, open the map stream, report endpoints, read the stream
//! continuously), and reports registration rate, time until every stream has its full map and
//! sees every peer online, full-map bytes, fan-out latencies, control's RSS and CPU time, and
//! the way back after control is killed and restarted.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use warren_benches::loadgen::{Options, run};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "warren-loadgen",
    about = "load generator for warren-control: N simulated nodes over real gRPC"
)]
struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// The warren-control binary [default: the one beside this binary, as
    /// target/release/warren-control or target/debug/warren-control].
    #[arg(long)]
    control_bin: Option<PathBuf>,
    /// Registrations (and stream openings) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Turn off control's embedded DERP server (on by default, as in control's default config).
    #[arg(long)]
    no_derp: bool,
    /// Turn off control's web admin page (on by default, as in control's default config).
    #[arg(long)]
    no_web: bool,
    /// Seconds each phase may take.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Nodes that join one at a time once the mesh is up, to time join and endpoint fan-out.
    #[arg(long, default_value_t = 10)]
    probes: usize,
    /// Skip the phase that kills control (SIGKILL), starts it again and times the way back.
    #[arg(long)]
    no_restart: bool,
    /// Run control on a throwaway PostgreSQL server (initdb in a temporary directory) instead
    /// of SQLite.
    #[arg(long)]
    postgres: bool,
    /// With --postgres: run a second control instance on the same database; the restart phase
    /// kills the first and every node moves to the second.
    #[arg(long, requires = "postgres")]
    failover: bool,
    /// After the kill, nodes ask for full maps instead of resuming.
    #[arg(long)]
    no_resume: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// With --json: include what each node saw.
    #[arg(long)]
    per_node: bool,
}

fn default_control_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("warren-control")))
        .unwrap_or_else(|| PathBuf::from("target/debug/warren-control"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Durable as a production server (fsync on; commits acknowledged before they are flushed,
    // as SQLite's WAL with synchronous = NORMAL does).
    let pg = if args.postgres {
        Some(warren_netns_tests::postgres::PgServer::start(true)?)
    } else {
        None
    };
    let opts = Options {
        database_toml: pg.as_ref().map(|p| p.config_toml()),
        failover: args.failover,
        resume: !args.no_resume,
        concurrency: args.concurrency,
        embedded_derp: !args.no_derp,
        web: !args.no_web,
        timeout: Duration::from_secs(args.timeout),
        probes: args.probes,
        restart: !args.no_restart,
        verbose: true,
        ..Options::new(
            args.nodes,
            args.control_bin.unwrap_or_else(default_control_bin),
        )
    };
    let report = run(&opts).await?;
    if args.json {
        println!("{}", report.to_json(args.per_node));
    } else {
        println!("{}", report.to_text());
    }
    anyhow::ensure!(
        report.all_full_maps.is_some() && report.all_online.is_some(),
        "not every stream got its full map and saw every peer online in time"
    );
    Ok(())
}
