//! `warren-control serve`: loads the key and the database, then serves `Control` and `Admin` on
//! TCP and `Admin` on the local unix socket until SIGINT or SIGTERM.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Mutex;
use tonic::transport::Server;
use warren_proto::ControlSecretKey;
use warren_proto::control::DnsConfig;
use warren_proto::control::admin_server::AdminServer;
use warren_proto::control::control_server::ControlServer;

use crate::config::Config;
use crate::core::{Core, Settings};
use crate::grpc::{AdminService, ControlService, MAX_REQUEST_BYTES, Shared, now_ms};
use crate::store::SqliteStore;

/// Reads the server key at `path`, creating it (mode 0600) on first start.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<ControlSecretKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => ControlSecretKey::from_text(&text)
            .with_context(|| format!("reading key {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                private_dir(dir)?;
            }
            let key = ControlSecretKey::generate();
            write_private(path, key.to_text().as_bytes())?;
            tracing::info!(path = %path.display(), public = %key.public_key(), "created server key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading key {}", path.display())),
    }
}

/// Creates a directory (and its parents) that only its owner can enter.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Builds the shared state from the configuration.
pub fn open(config: &Config) -> anyhow::Result<Arc<Shared>> {
    let key = load_or_create_key(&config.noise.private_key_path)?;
    if let Some(dir) = config
        .database
        .sqlite
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        private_dir(dir)?;
    }
    let store = SqliteStore::open(
        &config.database.sqlite.path,
        config.database.sqlite.write_ahead_log,
    )
    .with_context(|| format!("opening database {}", config.database.sqlite.path.display()))?;
    let settings = Settings {
        v4: config.prefixes.v4,
        v6: config.prefixes.v6,
        dns: DnsConfig {
            magic_dns: config.dns.magic_dns,
            base_domain: config.dns.base_domain.clone(),
        },
        derp_map: derp_map(config)?,
    };
    let core = Core::open(Box::new(store), &settings, now_ms())?;
    tracing::info!(nodes = core.netmap().len(), "state loaded");
    Ok(Arc::new(Shared {
        core: Mutex::new(core),
        key,
        keepalive: config.keepalive_interval,
        ephemeral_timeout: config.ephemeral_node_inactivity_timeout,
        replay: std::sync::Mutex::new(Default::default()),
        stopping: tokio::sync::watch::Sender::new(false),
    }))
}

/// The DERP map: the configured files, plus the embedded server's region when it runs.
fn derp_map(config: &Config) -> anyhow::Result<warren_proto::control::DerpMap> {
    let mut map = crate::derpmap::load(&config.derp.paths)?;
    let server = &config.derp.server;
    if config.derp.embedded() && server.automatically_add_embedded_derp_region {
        let host = if server.ipv4.is_empty() {
            url_host(&config.server_url)
        } else {
            server.ipv4.clone()
        };
        let node = warren_proto::control::DerpNode {
            name: format!("{}a", server.region_id),
            region_id: server.region_id,
            host_name: host.clone(),
            ipv4: if host.parse::<std::net::Ipv4Addr>().is_ok() {
                host
            } else {
                String::new()
            },
            ipv6: String::new(),
            stun_port: i32::from(server.stun_listen_addr.port()),
            derp_port: i32::from(server.listen_addr.port()),
            insecure_for_tests: false,
            plain_http: true,
        };
        map.regions.retain(|r| r.region_id != server.region_id);
        map.regions.push(warren_proto::control::DerpRegion {
            region_id: server.region_id,
            region_code: server.region_code.clone(),
            region_name: server.region_name.clone(),
            nodes: vec![node],
        });
        map.regions.sort_by_key(|r| r.region_id);
    }
    Ok(map)
}

/// The host part of a URL like `http://host:port/path`.
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6).to_string(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_string(),
    }
}

/// Lets the embedded DERP server admit only registered, unexpired nodes.
struct CoreVerifier(Arc<Shared>);

impl warren_derp::verify::Verifier for CoreVerifier {
    fn verify(&self, key: warren_proto::NodePublicKey) -> warren_derp::verify::VerifyFuture<'_> {
        Box::pin(async move {
            Ok(self
                .0
                .core
                .lock()
                .await
                .authenticate(&key, now_ms())
                .is_ok())
        })
    }
}

/// Starts the embedded DERP + STUN server.
async fn start_embedded_derp(
    config: &Config,
    shared: &Arc<Shared>,
) -> anyhow::Result<warren_derp::Running> {
    let server = &config.derp.server;
    let derp_config = warren_derp::config::Config {
        listen: server.listen_addr,
        stun: true,
        stun_listen: server.stun_listen_addr,
        key_path: server.private_key_path.clone().unwrap_or_else(|| {
            let dir = config
                .noise
                .private_key_path
                .parent()
                .unwrap_or(Path::new("."));
            dir.join("derp_server_private.key")
        }),
        ..warren_derp::config::Config::default()
    };
    let key = warren_derp::load_or_create_key(&derp_config.key_path)?;
    let verifier: Option<Arc<dyn warren_derp::verify::Verifier>> = server
        .verify_clients
        .then(|| Arc::new(CoreVerifier(Arc::clone(shared))) as _);
    let options = warren_derp::server::RelayOptions {
        verifier,
        ..Default::default()
    };
    let relay = warren_derp::server::Relay::new(key, options);
    let running = warren_derp::start_with(&derp_config, relay).await?;
    tracing::info!(derp = %running.http_addr, stun = ?running.stun_addr, region = server.region_id, "embedded DERP serving");
    Ok(running)
}

/// Deletes inactive ephemeral nodes now and then, also those left over from before a restart.
async fn sweep_ephemeral(shared: Arc<Shared>) {
    let timeout = shared.ephemeral_timeout;
    let every = (timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared
            .core
            .lock()
            .await
            .reap_ephemeral(now_ms(), timeout_ms)
        {
            tracing::warn!(error = %e, "ephemeral sweep failed");
        }
    }
}

/// Serves on `config.listen_addr` until `shutdown` completes.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("listening on {}", config.listen_addr))?;
    serve_on(config, tcp, shutdown).await
}

/// Serves on an already bound `tcp` listener until `shutdown` completes.
pub async fn serve_on(
    config: Config,
    tcp: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shared = open(&config)?;
    let control = ControlServer::new(ControlService::new(Arc::clone(&shared)))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let admin_tcp = AdminServer::new(AdminService::new(Arc::clone(&shared), true))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let admin_local = AdminServer::new(AdminService::new(Arc::clone(&shared), false))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    let socket = &config.unix_socket;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    let unix = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    let mode = u32::from_str_radix(&config.unix_socket_permission, 8).unwrap_or(0o770);
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))?;
    tracing::info!(listen = %tcp.local_addr()?, socket = %socket.display(), "warren-control serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(sweep_ephemeral(Arc::clone(&shared)));
    let embedded = match config.derp.embedded() {
        true => Some(start_embedded_derp(&config, &shared).await?),
        false => None,
    };
    let streams = Arc::clone(&shared);
    tokio::spawn(async move {
        shutdown.await;
        // Map streams never end by themselves: end them, so the servers can drain and stop.
        streams.stopping.send_replace(true);
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp_server = Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .add_service(control)
        .add_service(admin_tcp)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(tcp),
            stopped(stop_rx.clone()),
        );
    let unix_server = Server::builder()
        .add_service(admin_local)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(unix),
            stopped(stop_rx),
        );
    let result = tokio::try_join!(tcp_server, unix_server);
    sweeper.abort();
    if let Some(derp) = embedded {
        derp.shutdown().await;
    }
    let _ = std::fs::remove_file(socket);
    result?;
    tracing::info!("warren-control stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
