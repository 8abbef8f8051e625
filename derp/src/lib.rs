//! warren's DERP relay and STUN server, wire-compatible with Tailscale's `derper`, and an async
//! DERP client.
//!
//! - [`server`]: the relay ([`server::Relay`]) and its sans-IO core ([`server::registry`]).
//! - [`http`]: the HTTP(S) front: `/derp` upgrade, probes, `/generate_204`.
//! - [`stun`]: the STUN Binding server.
//! - [`verify`]: optional client verification against warren-control.
//! - [`log_limit`]: the bound on log lines that peers can cause.
//! - [`metrics`]: Prometheus metrics and the bounded `/metrics` listener.
//! - [`client`]: the DERP client nodes and tests use.
//! - [`config`]: the TOML configuration.
//!
//! [`start`] binds everything from a [`config::Config`]; [`run`] also waits for a shutdown
//! signal, so warren-control can embed a relay in-process.

pub mod client;
pub mod config;
pub(crate) mod frame;
pub mod http;
pub mod log_limit;
pub mod metrics;
pub mod server;
pub mod stun;
pub mod verify;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;
use warren_proto::DerpSecretKey;
use warren_proto::derp::MeshKey;

pub use client::{Client, ClientEvent, ClientReceiver, ClientSender};
pub use config::Config;
pub use frame::ReadError;
pub use server::{Relay, RelayOptions};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be read or parsed.
    #[error("config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The file, when there was one.
        path: Option<PathBuf>,
        /// The parser's message (it names unknown keys).
        reason: String,
    },
    /// The server key file could not be read or created.
    #[error("server key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The mesh key file could not be read.
    #[error("mesh key {path}: {reason}")]
    MeshKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS {path}: {reason}")]
    Tls {
        /// The PEM file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Client verification could not be set up.
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
}

/// Reads the server key from `path`, or creates it there (mode 0600, directory 0700) when the
/// file does not exist.
pub fn load_or_create_key(path: &Path) -> Result<DerpSecretKey, Error> {
    let err = |reason: String| Error::Key {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => DerpSecretKey::from_text(&text).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = DerpSecretKey::generate();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    // Tighten only directories we just made private to us; best effort.
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                }
            }
            write_private(path, key.to_text().as_bytes()).map_err(|e| err(e.to_string()))?;
            info!(path = %path.display(), public = %key.public_key(), "created server key");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// A running relay (HTTP front, optional STUN).
#[derive(Debug)]
pub struct Running {
    /// The bound HTTP(S) address.
    pub http_addr: SocketAddr,
    /// The bound metrics address, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The bound STUN address, when STUN runs.
    pub stun_addr: Option<SocketAddr>,
    /// The bound second STUN address, when one is configured.
    pub stun_alt_addr: Option<SocketAddr>,
    /// The relay, for stats.
    pub relay: Relay,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops serving, closes every connection, and waits for the tasks to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// Builds the relay from `config` with an explicit key (the key file is not touched).
pub fn relay_from_config(config: &Config, key: DerpSecretKey) -> Result<Relay, Error> {
    let mesh_key = match &config.mesh_key_path {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::MeshKey {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Some(text.parse::<MeshKey>().map_err(|e| Error::MeshKey {
                path: path.clone(),
                reason: e.to_string(),
            })?)
        }
    };
    let mut options = RelayOptions {
        queue_depth: config.queue_depth,
        write_timeout: (config.write_timeout_secs > 0)
            .then(|| Duration::from_secs(config.write_timeout_secs)),
        mesh_key,
        ..RelayOptions::default()
    };
    if let Some(v) = &config.verify_clients {
        let control = verify::ControlVerifier::new(&v.url, v.api_key_path.as_deref())?;
        options.verifier = Some(Arc::new(verify::CachedVerifier::new(control)));
        options.verify_fail_open = v.fail_open;
    }
    Ok(Relay::new(key, options))
}

/// Binds and starts a relay as configured, loading or creating its key at `config.key_path`.
pub async fn start(config: &Config) -> Result<Running, Error> {
    let key = load_or_create_key(&config.key_path)?;
    let relay = relay_from_config(config, key)?;
    start_with(config, relay).await
}

/// Binds and starts `relay` on the addresses of `config` (TLS and STUN as configured).
pub async fn start_with(config: &Config, relay: Relay) -> Result<Running, Error> {
    let tls = match &config.tls {
        Some(t) => Some(http::tls_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let bind_udp = |addr: SocketAddr| async move {
        UdpSocket::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    };
    let (udp, udp_alt) = match (config.stun, config.stun_alt_listen) {
        (false, _) => (None, None),
        (true, None) => (Some(bind_udp(config.stun_listen).await?), None),
        (true, Some(alt)) => (
            Some(bind_udp(config.stun_listen).await?),
            Some(bind_udp(alt).await?),
        ),
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let stun_addr = udp.as_ref().and_then(|s| s.local_addr().ok());
    let stun_alt_addr = udp_alt.as_ref().and_then(|s| s.local_addr().ok());
    let (stop, stopped) = oneshot::channel::<()>();
    let (stun_stop, stun_stopped) = oneshot::channel::<()>();
    let (metrics_stop, metrics_stopped) = oneshot::channel::<()>();
    let mut tasks = Vec::new();
    if let Some(listener) = metrics_listener {
        let render = metrics::relay_render(relay.clone());
        tasks.push(tokio::spawn(metrics::serve(listener, render, async move {
            let _ = metrics_stopped.await;
        })));
    }
    info!(
        %http_addr,
        tls = tls.is_some(),
        stun = ?stun_addr,
        stun_alt = ?stun_alt_addr,
        key = %relay.public_key(),
        "DERP relay listening"
    );
    let http_relay = relay.clone();
    tasks.push(tokio::spawn(async move {
        http::serve(listener, http_relay, tls, async move {
            let _ = stopped.await;
        })
        .await;
        let _ = stun_stop.send(());
        let _ = metrics_stop.send(());
    }));
    if let Some(socket) = udp {
        tasks.push(tokio::spawn(stun::serve(socket, udp_alt, async move {
            let _ = stun_stopped.await;
        })));
    }
    // The links end when the relay shuts down (when the HTTP server stops).
    for url in &config.mesh_with {
        let relay = relay.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { relay.mesh_with(url).await }));
    }
    Ok(Running {
        http_addr,
        metrics_addr,
        stun_addr,
        stun_alt_addr,
        relay,
        stop: Some(stop),
        tasks,
    })
}

/// Runs a relay as configured until `shutdown` resolves, then closes everything.
pub async fn run(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let running = start(config).await?;
    shutdown.await;
    info!("shutting down");
    running.shutdown().await;
    Ok(())
}
