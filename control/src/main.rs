//! `warren-control`: runs the coordination server (`serve`) or an admin command against it.

use clap::Parser;
use warren_control::cli::{Cli, Command};
use warren_control::config::Config;

/// Threads for blocking work (the database, under the core's lock).
const MAX_BLOCKING_THREADS: usize = 8;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // RUST_LOG, else "info" until `serve` puts the config's `log.level` in force; a reload
    // changes it again through the handle.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                // Colour only on a terminal: a log file or a pipe gets plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    warren_control::reload::install_log_filter(Box::new(move |f| handle.reload(f)));
    // Blocking threads run the core's database work, one at a time under the core's lock:
    // a few are enough, and each thread more is memory (and a malloc arena) for nothing.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`... | head -1`): not an error of ours.
        Err(e)
            if e.downcast_ref::<warren_control::cli::StdoutClosed>()
                .is_some() =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    match cli.command {
        Command::Serve => {
            warren_control::serve::serve(config, warren_control::serve::signal()).await
        }
        _ => warren_control::cli::run(&cli, config.unix_socket.clone()).await,
    }
}
