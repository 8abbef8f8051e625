//! `warren`: the node. `warren up` runs it in the foreground; `status`, `ip` and `down` talk to
//! the running daemon through its local API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use warren_node::api::{self, ApiRequest, ApiResponse};
use warren_node::daemon;
use warren_node::state::{DEFAULT_STATE_DIR, StateDir};

#[derive(Debug, Parser)]
#[command(name = "warren", version, about = "a warren mesh node")]
struct Cli {
    /// Where the node keeps its keys and its local API socket.
    #[arg(long, global = true, env = "WARREN_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the mesh and run in the foreground.
    Up {
        /// Control server URL, like http://control.example:50443.
        #[arg(long, env = "WARREN_CONTROL_URL")]
        control: String,
        /// Pre-auth key from `warren-control preauthkeys create`.
        #[arg(
            long,
            env = "WARREN_AUTH_KEY",
            hide_env_values = true,
            default_value = ""
        )]
        auth_key: String,
        /// Name to register [default: the machine's hostname].
        #[arg(long)]
        hostname: Option<String>,
        /// TUN device name.
        #[arg(long, default_value = "warren0")]
        tun: String,
        /// UDP port for WireGuard; 0 picks a free one.
        #[arg(long, default_value_t = 41641)]
        port: u16,
    },
    /// Show this node and its peers.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print this node's mesh addresses, IPv4 first.
    Ip,
    /// Stop the running node.
    Down,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

async fn status(state: &StateDir) -> anyhow::Result<api::Status> {
    match api::call(&state.socket(), &ApiRequest::Status).await? {
        ApiResponse::Status(s) => Ok(*s),
        ApiResponse::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let state = StateDir::new(&cli.state_dir);
    match cli.command {
        Command::Up {
            control,
            auth_key,
            hostname,
            tun,
            port,
        } => {
            let opts = daemon::UpOptions {
                control,
                auth_key,
                hostname: hostname.unwrap_or_else(machine_hostname),
                state,
                tun,
                port,
            };
            daemon::up(opts).await
        }
        Command::Status { json } => {
            let s = status(&state).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let control = if s.control_connected {
                "connected".to_string()
            } else {
                format!(
                    "disconnected ({})",
                    s.control_error.as_deref().unwrap_or("connecting")
                )
            };
            println!(
                "{} {}  control: {control}",
                s.me.name,
                s.me.addresses.join(" ")
            );
            println!(
                "{:<20} {:<16} {:<8} {:<22} {:>12} {:>12}  HANDSHAKE",
                "PEER", "ADDRESS", "STATUS", "ENDPOINT", "RX", "TX"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            for p in &s.peers {
                let hs = p
                    .last_handshake_unix_ms
                    .map(|t| format!("{}s ago", (now - t).max(0) / 1000))
                    .unwrap_or_else(|| "never".into());
                println!(
                    "{:<20} {:<16} {:<8} {:<22} {:>12} {:>12}  {hs}",
                    p.name,
                    p.addresses.first().map(String::as_str).unwrap_or("-"),
                    if p.online { "online" } else { "offline" },
                    p.endpoint.as_deref().unwrap_or("-"),
                    p.rx_bytes,
                    p.tx_bytes,
                );
            }
            Ok(())
        }
        Command::Ip => {
            for a in status(&state).await?.me.addresses {
                println!("{a}");
            }
            Ok(())
        }
        Command::Down => match api::call(&state.socket(), &ApiRequest::Down).await? {
            ApiResponse::Stopping => Ok(()),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
    }
}
