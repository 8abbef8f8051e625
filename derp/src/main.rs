//! `warren-derp`: a DERP relay and STUN server. Runs with no configuration at all (plain HTTP
//! on 0.0.0.0:3340, STUN on 0.0.0.0:3478, key created once at
//! /var/lib/warren-derp/derp.key), or from a TOML file; flags override the file.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use warren_derp::config::{Config, TlsConfig};

/// warren's DERP relay and STUN server (wire-compatible with Tailscale's derper).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// HTTP(S) listen address (default 0.0.0.0:3340).
    #[arg(long, visible_alias = "http-listen")]
    listen: Option<SocketAddr>,
    /// STUN listen address (default 0.0.0.0:3478).
    #[arg(long)]
    stun_listen: Option<SocketAddr>,
    /// A second STUN listen address (another port), so one server lets nodes detect hard NAT
    /// and answers RFC 5780 change-port requests.
    #[arg(long)]
    stun_alt_listen: Option<SocketAddr>,
    /// Do not run the STUN server.
    #[arg(long, conflicts_with_all = ["stun_listen", "stun_alt_listen"])]
    no_stun: bool,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The server key file, created (mode 0600) when missing.
    #[arg(long)]
    key_path: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; e.g. 127.0.0.1:9091).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colour only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(stun) = args.stun_listen {
        config.stun_listen = stun;
        config.stun = true;
    }
    if let Some(alt) = args.stun_alt_listen {
        config.stun_alt_listen = Some(alt);
        config.stun = true;
    }
    if args.no_stun {
        config.stun = false;
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(TlsConfig { cert, key });
    }
    if let Some(addr) = args.metrics_listen {
        config.metrics_listen = Some(addr);
    }
    if let Some(key_path) = args.key_path {
        config.key_path = key_path;
    }
    warren_derp::run(&config, signal())
        .await
        .context("warren-derp")?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
