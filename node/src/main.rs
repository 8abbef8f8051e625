//! `warren`: the node. `warren up` runs it in the foreground; `status`, `ip` and `down` talk to
//! the running daemon through its local API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use warren_node::api::{self, ApiRequest, ApiResponse};
use warren_node::daemon;
use warren_node::state::{DEFAULT_STATE_DIR, StateDir};

/// Stdout was closed under us (`... | head -1`): the reader is done, which is no error.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
struct StdoutClosed;

/// `println!` that returns an error instead of panicking when stdout is gone (`| head`):
/// [`StdoutClosed`] for a closed pipe, the I/O error otherwise.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(|e| -> anyhow::Error {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                StdoutClosed.into()
            } else {
                e.into()
            }
        })?;
    }};
}

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
        /// Control server URL, like http://control.example:50443; several instances on one
        /// database as a comma-separated list (the node fails over between them).
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
        /// Offer to route these prefixes for the mesh (comma-separated, e.g. 10.20.0.0/24);
        /// control approves them before peers use them.
        #[arg(long, value_delimiter = ',')]
        advertise_routes: Vec<ipnet::IpNet>,
        /// Offer to be an exit node (advertises 0.0.0.0/0 and ::/0).
        #[arg(long)]
        advertise_exit_node: bool,
        /// Send internet traffic through this exit node (a peer's name or mesh address).
        #[arg(long)]
        exit_node: Option<String>,
        /// With --exit-node, keep reaching this host's LAN directly.
        #[arg(long)]
        exit_node_allow_lan_access: bool,
        /// Use the subnet routes peers serve (`--accept-routes=false` to ignore them).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        accept_routes: bool,
        /// As a subnet router or exit node, masquerade forwarded traffic behind this host's
        /// address so the LAN needs no route back (`=false`: LAN hosts see mesh addresses).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        snat_subnet_routes: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; e.g. 127.0.0.1:9100).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// The tunnel's MTU: the largest IP packet it carries. Each becomes a UDP datagram up
        /// to 80 bytes larger (IPv6, UDP and WireGuard headers), which the path must carry.
        #[arg(long, env = "WARREN_MTU", default_value_t = daemon::TUN_MTU,
              value_parser = clap::value_parser!(u16).range(i64::from(daemon::MIN_MTU)..=i64::from(daemon::MAX_MTU)))]
        mtu: u16,
        /// TUN offload: the kernel hands over 64 KB TCP segments and takes coalesced ones
        /// (`=false` for one packet per read and write; kernels without it fall back anyway).
        #[arg(long, env = "WARREN_TUN_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        tun_offload: bool,
        /// UDP sends and TUN writes on two threads beside the event loop, so a node uses a
        /// second core (`=false`: all on one thread, cheaper where the node gets one core).
        #[arg(long, env = "WARREN_DATA_THREADS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        data_threads: bool,
    },
    /// Change preferences of the running node.
    Set {
        /// Use this exit node (a name or mesh address); "" stops using one.
        #[arg(long)]
        exit_node: Option<String>,
        /// Keep reaching this host's LAN directly while using an exit node.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        exit_node_allow_lan_access: Option<bool>,
        /// Use the subnet routes peers serve.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        accept_routes: Option<bool>,
    },
    /// Show this node and its peers.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print this node's mesh addresses, IPv4 first.
    Ip,
    /// Ping a peer over disco and print the path and round trip of each reply.
    Ping {
        /// The peer's name, mesh address or node key.
        peer: String,
        /// How many pings.
        #[arg(short = 'c', long, default_value_t = 10)]
        count: u32,
        /// Stop at the first reply over a direct path (`--until-direct false` to keep going).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        until_direct: bool,
    },
    /// Run a netcheck now and print what it found.
    Netcheck {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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
        // Colour only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // One thread: the data path is one loop (TUN, UDP, crypto) and the DERP connections' tasks
    // hand packets to it; on one thread those hand-offs are not cross-CPU wakeups (in the
    // throughput bench: DERP path +19%, direct +7% against a multi-thread runtime).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`warren ip | head -1`): not an error of ours.
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
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
            advertise_routes,
            advertise_exit_node,
            exit_node,
            exit_node_allow_lan_access,
            accept_routes,
            snat_subnet_routes,
            metrics_listen,
            mtu,
            tun_offload,
            data_threads,
        } => {
            let opts = daemon::UpOptions {
                control,
                auth_key,
                hostname: hostname.unwrap_or_else(machine_hostname),
                state,
                tun,
                port,
                advertise_routes,
                advertise_exit_node,
                prefs: api::Prefs {
                    exit_node,
                    exit_node_allow_lan_access: Some(exit_node_allow_lan_access),
                    accept_routes: Some(accept_routes),
                },
                snat: snat_subnet_routes,
                metrics_listen,
                mtu,
                tun_offload,
                data_threads,
            };
            daemon::up(opts).await
        }
        Command::Set {
            exit_node,
            exit_node_allow_lan_access,
            accept_routes,
        } => {
            let prefs = api::Prefs {
                exit_node,
                exit_node_allow_lan_access,
                accept_routes,
            };
            match api::call(&state.socket(), &ApiRequest::Set(prefs)).await? {
                ApiResponse::Prefs(p) => {
                    out!(
                        "exit node: {}",
                        p.exit_node
                            .as_deref()
                            .filter(|e| !e.is_empty())
                            .unwrap_or("(none)")
                    );
                    Ok(())
                }
                ApiResponse::Error { message } => anyhow::bail!("{message}"),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        Command::Status { json } => {
            let s = status(&state).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&s)?);
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
            out!(
                "{} {}  control: {control}",
                s.me.name,
                s.me.addresses.join(" ")
            );
            if !s.me.advertised_routes.is_empty() {
                out!(
                    "routes: advertised {}; approved {}{}",
                    s.me.advertised_routes.join(","),
                    if s.me.approved_routes.is_empty() {
                        "none".to_string()
                    } else {
                        s.me.approved_routes.join(",")
                    },
                    if s.me.exit_node { "; exit node" } else { "" }
                );
            }
            match (&s.exit_node, s.exit_node_offered) {
                (Some(e), true) => out!("exit node: {e}"),
                (Some(e), false) => {
                    out!("exit node: {e} (not offered: internet traffic is dropped)")
                }
                (None, _) => {}
            }
            if !s.exit_nodes.is_empty() {
                out!("offered exit nodes: {}", s.exit_nodes.join(", "));
            }
            out!(
                "{:<20} {:<16} {:<8} {:<38} {:>12} {:>12} {:>8}  HANDSHAKE",
                "PEER",
                "ADDRESS",
                "STATUS",
                "PATH",
                "RX",
                "TX",
                "DROPPED"
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
                out!(
                    "{:<20} {:<16} {:<8} {:<38} {:>12} {:>12} {:>8}  {hs}",
                    p.name,
                    p.addresses.first().map(String::as_str).unwrap_or("-"),
                    if p.online { "online" } else { "offline" },
                    match (&p.path, p.latency_us) {
                        (Some(path), Some(us)) => format!("{path} ({:.1}ms)", us as f64 / 1000.0),
                        (Some(path), None) => path.clone(),
                        (None, _) => "-".into(),
                    },
                    p.rx_bytes,
                    p.tx_bytes,
                    p.filter_drops,
                );
                if !p.primary_routes.is_empty() {
                    out!("{:<20} routes {}", "", p.primary_routes.join(","));
                }
            }
            Ok(())
        }
        Command::Ping {
            peer,
            count,
            until_direct,
        } => {
            let mut answered = 0;
            for _ in 0..count {
                let started = std::time::Instant::now();
                match api::call(&state.socket(), &ApiRequest::Ping { peer: peer.clone() }).await? {
                    ApiResponse::Pong {
                        path,
                        direct,
                        rtt_us,
                    } => {
                        answered += 1;
                        out!(
                            "pong from {peer} via {path} in {:.1}ms",
                            rtt_us as f64 / 1000.0
                        );
                        if until_direct && direct {
                            return Ok(());
                        }
                    }
                    ApiResponse::PingTimeout => out!("no pong from {peer} (timed out)"),
                    ApiResponse::Error { message } => anyhow::bail!("{message}"),
                    other => anyhow::bail!("unexpected answer {other:?}"),
                }
                // One ping a second, like tailscale ping.
                let rest = std::time::Duration::from_secs(1).saturating_sub(started.elapsed());
                tokio::time::sleep(rest).await;
            }
            if answered == 0 {
                anyhow::bail!("no reply from {peer}");
            }
            Ok(())
        }
        Command::Netcheck { json } => {
            match api::call(&state.socket(), &ApiRequest::Netcheck).await? {
                ApiResponse::Netcheck(r) => {
                    if json {
                        out!("{}", serde_json::to_string_pretty(&*r)?);
                        return Ok(());
                    }
                    out!("Report:");
                    out!("  UDP: {}", r.udp);
                    out!("  IPv4: {}", r.global.as_deref().unwrap_or("(none)"));
                    out!("  MappingVariesByDestIP: {}", r.mapping_varies);
                    out!(
                        "  Nearest DERP: {}",
                        if r.home_region == 0 {
                            "(none)".to_string()
                        } else {
                            r.home_region.to_string()
                        }
                    );
                    out!("  DERP latency:");
                    for (region, us) in &r.latency_us {
                        out!("    {region}: {:.1}ms", *us as f64 / 1000.0);
                    }
                    Ok(())
                }
                ApiResponse::Error { message } => anyhow::bail!("{message}"),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        Command::Ip => {
            for a in status(&state).await?.me.addresses {
                out!("{a}");
            }
            Ok(())
        }
        Command::Down => match api::call(&state.socket(), &ApiRequest::Down).await? {
            ApiResponse::Stopping => Ok(()),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
    }
}
