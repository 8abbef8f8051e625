//! `warren-control serve`: loads the key, the database and the access policy, then serves
//! `Control` and `Admin` on TCP and `Admin` on the local unix socket until SIGINT or SIGTERM,
//! reloading the policy when its file changes, the config file (its live parts, see
//! [`crate::reload`]) when it changes, and both on SIGHUP.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Mutex, mpsc};
use tonic::transport::Server;
use warren_proto::ControlSecretKey;
use warren_proto::control::admin_server::AdminServer;
use warren_proto::control::control_server::ControlServer;

use crate::config::{Config, ConfigError, PolicyMode};
use crate::core::{Core, Settings};
use crate::error::ControlError;
use crate::grpc::{
    AdminService, ControlService, MAX_ADMIN_REQUEST_BYTES, MAX_POLICY_BYTES, MAX_REQUEST_BYTES,
    MalformedRequestLayer, PolicySource, Shared, compile_policy,
};
use crate::listen::{
    AcceptStats, Acceptor, Limits, MAX_ADMIN_CONNECTIONS, TrackLayer, cap_for_fd_limit,
};
use crate::policy::{CompiledPolicy, PolicyError};
use crate::store::{PgStore, SqliteStore, Store};
use warren_derp::log_limit::LogLimiter;
use warren_proto::proof::unix_ms;

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

/// Opens the configured database: SQLite (created with its directory) or PostgreSQL.
fn open_store(config: &Config) -> anyhow::Result<Box<dyn Store>> {
    if config.database.is_postgres() {
        let pg = &config.database.postgres;
        let store = PgStore::connect(pg.options()).with_context(|| {
            format!(
                "opening PostgreSQL database {:?} at {}:{}",
                pg.name, pg.host, pg.port
            )
        })?;
        tracing::info!(host = %pg.host, port = pg.port, name = %pg.name, "database: PostgreSQL");
        return Ok(Box::new(store));
    }
    let sqlite = &config.database.sqlite;
    if let Some(dir) = sqlite.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    let store = SqliteStore::open(&sqlite.path, sqlite.write_ahead_log)
        .with_context(|| format!("opening database {}", sqlite.path.display()))?;
    Ok(Box::new(store))
}

/// Follows the change log on a shared database: every notification (and, as a safety net, every
/// second) applies what other instances committed, and fans it out to this process's streams.
async fn follow_changes(shared: Arc<Shared>, options: crate::store::PgOptions) {
    let wake = Arc::new(tokio::sync::Notify::new());
    let listener = {
        let wake = Arc::clone(&wake);
        tokio::spawn(async move {
            loop {
                if let Err(e) = crate::store::listen_for_changes(&options, &wake).await {
                    tracing::warn!(error = %e, "not listening for changes; trying again");
                }
                wake.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _listener = AbortOnDrop(listener);
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let (caught_up, reloaded) = shared
            .with_core(|core| (core.catch_up(), core.take_policy_reloaded()))
            .await;
        if let Err(e) = caught_up {
            tracing::warn!(error = %e, "cannot follow the change log");
        }
        if reloaded {
            // Another instance's `policy set`: `policy get` here shows the text now enforced.
            let stored = shared.with_core(|core| core.stored_policy()).await;
            match stored {
                Ok(p) => shared.policy.set_text(p.map(|p| p.text.into())),
                Err(e) => tracing::warn!(error = %e, "cannot read the stored policy"),
            }
        }
    }
}

/// Keeps this instance's presence alive and declares dead the instances that stopped renewing
/// theirs (their nodes go offline unless another instance serves them, or, on SQLite, unless
/// they came back to this restarted server in time).
async fn keep_presence(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::core::HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared.with_core(|core| core.keep_presence(unix_ms())).await {
            tracing::warn!(error = %e, "cannot renew this instance's presence");
        }
    }
}

/// Builds the shared state from the configuration.
pub fn open(config: &Config) -> anyhow::Result<Arc<Shared>> {
    let key = load_or_create_key(&config.noise.private_key_path)?;
    let store = open_store(config)?;
    // A policy that does not compile refuses the start (naming file, line and column).
    let policy = initial_policy(config, &*store)?;
    let settings = Settings {
        v4: config.prefixes.v4,
        v6: config.prefixes.v6,
        dns: config.dns.wire(),
        derp_map: derp_map(config)?,
        policy: policy.as_ref().map(|(_, compiled)| Arc::clone(compiled)),
    };
    let metrics = crate::metrics::Metrics::new();
    let store: Arc<dyn Store> =
        Arc::new(crate::metrics::TimedStore::new(store, Arc::clone(&metrics)));
    let mut core = Core::open(Arc::clone(&store), &settings, unix_ms())?;
    core.set_policy_from_store(config.policy.mode == PolicyMode::Database);
    let origin = match config.policy.mode {
        PolicyMode::File => config.policy.file().map(|p| PolicyOrigin::File(p.into())),
        PolicyMode::Database => Some(PolicyOrigin::Database),
    };
    match (&policy, &origin) {
        (Some(_), Some(origin)) => tracing::info!(policy = %origin, "access policy loaded"),
        _ => tracing::info!("no access policy: every node may reach every other"),
    }
    warn_failing_tests(&mut core, origin.as_ref());
    tracing::info!(nodes = core.netmap().len(), "state loaded");
    Ok(Arc::new(Shared {
        core: Mutex::new(core),
        key,
        keepalive: config.keepalive_interval,
        ephemeral_timeout: config.ephemeral_node_inactivity_timeout,
        replay: std::sync::Mutex::new(Default::default()),
        store,
        stopping: tokio::sync::watch::Sender::new(false),
        policy: PolicySource::new(
            config.policy.mode,
            config.policy.file().map(Path::to_path_buf),
            policy.map(|(text, _)| text),
        ),
        metrics,
    }))
}

/// The DERP map: the configured files, plus the embedded server's region when it runs.
pub(crate) fn derp_map(
    config: &Config,
) -> Result<warren_proto::control::DerpMap, crate::reload::SettingsError> {
    let mut map = crate::derpmap::load(&config.derp.paths)?;
    let server = &config.derp.server;
    if config.derp.embedded() && server.automatically_add_embedded_derp_region {
        let (host, _) = embedded_derp_host(config)?;
        let ip = host.parse::<std::net::IpAddr>().ok();
        let node = warren_proto::control::DerpNode {
            name: format!("{}a", server.region_id),
            region_id: server.region_id,
            ipv4: ip
                .filter(|a| a.is_ipv4())
                .map(|a| a.to_string())
                .unwrap_or_default(),
            ipv6: ip
                .filter(|a| a.is_ipv6())
                .map(|a| a.to_string())
                .unwrap_or_default(),
            host_name: host,
            stun_port: i32::from(server.stun_listen_addr.port()),
            derp_port: i32::from(server.listen_addr.port()),
            insecure_for_tests: false,
            plain_http: true,
            stun_only: false,
        };
        let mut nodes = vec![node.clone()];
        if let Some(alt) = server.stun_alt_listen() {
            // A second address of the same server unless it listens on an IP of its own.
            let own_ip = !alt.ip().is_unspecified() && alt.ip() != server.stun_listen_addr.ip();
            let (host_name, ipv4, ipv6) = match (own_ip, alt.ip()) {
                (false, _) => (node.host_name, node.ipv4, node.ipv6),
                (true, ip @ std::net::IpAddr::V4(_)) => (ip.to_string(), ip.to_string(), "".into()),
                (true, ip @ std::net::IpAddr::V6(_)) => (ip.to_string(), "".into(), ip.to_string()),
            };
            nodes.push(warren_proto::control::DerpNode {
                name: format!("{}b", server.region_id),
                host_name,
                ipv4,
                ipv6,
                stun_port: i32::from(alt.port()),
                stun_only: true,
                ..node
            });
        }
        map.regions.retain(|r| r.region_id != server.region_id);
        map.regions.push(warren_proto::control::DerpRegion {
            region_id: server.region_id,
            region_code: server.region_code.clone(),
            region_name: server.region_name.clone(),
            nodes,
        });
        map.regions.sort_by_key(|r| r.region_id);
    }
    Ok(map)
}

/// The host nodes are told to reach the embedded DERP server at, and the key it came from.
fn embedded_derp_host(config: &Config) -> Result<(String, &'static str), ConfigError> {
    let ipv4 = &config.derp.server.ipv4;
    Ok(match ipv4.is_empty() {
        true => (url_host(&config.server_url)?, "server_url"),
        false => (ipv4.clone(), "derp.server.ipv4"),
    })
}

/// A configuration that works on this host but likely not as meant; logged once at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupWarning {
    /// The DERP map sends nodes to the embedded DERP server at a loopback host, so every node on
    /// another host has its DERP connections refused.
    #[error(
        "the DERP map sends nodes to the embedded DERP server at {host}, a loopback address: \
         nodes on other hosts cannot reach it; set `{key}` to an address they can reach"
    )]
    LoopbackDerpHost {
        /// The host in the map.
        host: String,
        /// The configuration key to set.
        key: &'static str,
    },
}

/// What to warn about at start-up (see [`StartupWarning`]).
pub fn startup_warnings(config: &Config) -> Vec<StartupWarning> {
    let mut warnings = Vec::new();
    if config.derp.embedded()
        && config.derp.server.automatically_add_embedded_derp_region
        && let Ok((host, key)) = embedded_derp_host(config)
        && is_loopback_host(&host)
    {
        warnings.push(StartupWarning::LoopbackDerpHost { host, key });
    }
    warnings
}

/// Whether `host` (an address or a name) only reaches this machine.
fn is_loopback_host(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

/// The host of a URL like `http://host:port/path` (an IPv6 literal without its brackets).
fn url_host(url: &str) -> Result<String, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        key: "server_url",
        reason: format!("{url:?} {reason}"),
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| invalid("is not a URL"))?;
    let host = uri.host().ok_or_else(|| invalid("has no host"))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned())
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
                .authenticate(&key, unix_ms())
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
        stun_alt_listen: server.stun_alt_listen(),
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
    tracing::info!(derp = %running.http_addr, stun = ?running.stun_addr,
        stun_alt = ?running.stun_alt_addr, region = server.region_id, "embedded DERP serving");
    Ok(running)
}

/// Serves `/metrics` on `listener` (bounded as [`warren_derp::metrics::serve`] is), counting
/// node states under the core's lock at each scrape; the embedded DERP server's metrics
/// (`warren_derp_*`) follow control's when it runs.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    relay: Option<warren_derp::Relay>,
) {
    let render: warren_derp::metrics::Render = Arc::new(move || {
        let shared = Arc::clone(&shared);
        let relay = relay.clone();
        Box::pin(async move {
            let states = shared.core.lock().await.node_states(unix_ms());
            let mut text = shared.metrics.render(states);
            if let Some(relay) = &relay {
                text.push_str(&warren_derp::metrics::render_relay(relay));
            }
            text
        })
    });
    warren_derp::metrics::serve(listener, render, std::future::pending()).await;
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
        // Deleting writes to the database: off the async threads.
        if let Err(e) = shared
            .with_core(move |core| core.reap_ephemeral(unix_ms(), timeout_ms))
            .await
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
    match crate::listen::raise_nofile_limit() {
        Ok(nofile) => tracing::info!(?nofile, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let tcp = crate::listen::bind_tcp(config.listen_addr, config.connections.listen_backlog)
        .with_context(|| format!("listening on {}", config.listen_addr))?;
    serve_on(config, tcp, shutdown).await
}

/// What the server's listeners have seen, for tests and diagnostics.
#[derive(Debug, Clone, Default)]
pub struct ServeStats {
    /// The gRPC listener (TCP).
    pub tcp: Arc<AcceptStats>,
    /// The local admin socket.
    pub admin: Arc<AcceptStats>,
    /// Policy reloads.
    pub policy: Arc<ReloadStats>,
    /// Config file reloads.
    pub config: Arc<ReloadStats>,
    /// Where metrics are served, once bound (`metrics_listen_addr`).
    pub metrics_addr: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
}

/// Serves on an already bound `tcp` listener until `shutdown` completes.
pub async fn serve_on(
    config: Config,
    tcp: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(config, tcp, shutdown, ServeStats::default()).await
}

/// [`serve_on`], counting what the listeners see into `stats`.
pub async fn serve_with(
    config: Config,
    tcp: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stats: ServeStats,
) -> anyhow::Result<()> {
    match crate::reload::apply_log_level(&config.log.level) {
        crate::reload::LogLevelApplied::RustLogSet => {
            tracing::info!(log.level = %config.log.level, "RUST_LOG is set: log.level is not used")
        }
        crate::reload::LogLevelApplied::Applied | crate::reload::LogLevelApplied::NotReloadable => {
        }
    }
    // Opening reads (and may migrate) the database: off the async threads.
    let shared = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open(&config))
            .await
            .context("opening the server's state")??
    };
    for warning in startup_warnings(&config) {
        tracing::warn!("{warning}");
    }
    // Bound first: nothing else has started yet, so a refused address needs no cleanup.
    let web = crate::web::bind(&config.web).await?;
    let control = ControlServer::new(ControlService::new(Arc::clone(&shared)))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    // Admin requests may carry a policy file.
    let admin_tcp = AdminServer::new(AdminService::new(Arc::clone(&shared), true))
        .max_decoding_message_size(MAX_ADMIN_REQUEST_BYTES);
    let admin_local = AdminServer::new(AdminService::new(Arc::clone(&shared), false))
        .max_decoding_message_size(MAX_ADMIN_REQUEST_BYTES);

    // What can fail comes first, before the servers and the sweeper: the policy file's
    // watch, the embedded relay's ports, then the admin socket. The watch is in place before
    // the socket exists, so no edit made after the server answers is missed.
    let reloader = spawn_reloader(
        Arc::clone(&shared),
        crate::reload::LiveConfig::new(config.clone()),
        ReloaderStats {
            policy: Arc::clone(&stats.policy),
            config: Arc::clone(&stats.config),
        },
    )?;
    let embedded = match config.derp.embedded() {
        true => match start_embedded_derp(&config, &shared).await {
            Ok(derp) => Some(derp),
            Err(e) => {
                reloader.abort();
                return Err(e);
            }
        },
        false => None,
    };
    let metrics_listener = match config.metrics_listen_addr {
        Some(addr) => match warren_derp::metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                reloader.abort();
                if let Some(derp) = embedded {
                    derp.shutdown().await;
                }
                return Err(e).with_context(|| format!("metrics_listen_addr {addr}"));
            }
        },
        None => None,
    };
    let socket = &config.unix_socket;
    let unix = match bind_socket(&config) {
        Ok(u) => u,
        Err(e) => {
            reloader.abort();
            if let Some(derp) = embedded {
                derp.shutdown().await;
            }
            return Err(e);
        }
    };
    let connections = &config.connections;
    // TCP connections never take the descriptors the database and the admin socket need.
    let mut limits = connections.limits();
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    limits.max_connections = cap_for_fd_limit(limits.max_connections, nofile);
    if limits.max_connections < connections.max_connections {
        tracing::warn!(
            max_connections = limits.max_connections,
            nofile,
            "connections.max_connections lowered to fit the open files limit"
        );
    }
    tracing::info!(
        listen = %tcp.local_addr()?,
        socket = %socket.display(),
        max_connections = limits.max_connections,
        "warren-control serving"
    );

    let metrics = match metrics_listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                let _ = stats.metrics_addr.set(addr);
            }
            let relay = embedded.as_ref().map(|d| d.relay.clone());
            Some(tokio::spawn(serve_metrics(
                listener,
                Arc::clone(&shared),
                relay,
            )))
        }
        None => None,
    };
    let web = web.map(|listener| tokio::spawn(crate::web::serve(listener, Arc::clone(&shared))));
    let upkeep = tokio::spawn(Arc::clone(&shared.metrics).upkeep());
    let sweeper = tokio::spawn(sweep_ephemeral(Arc::clone(&shared)));
    // Presence expires without heartbeats (also across a restart on SQLite); several instances
    // on one database also follow each other's changes.
    let mut followers = vec![tokio::spawn(keep_presence(Arc::clone(&shared)))];
    if config.database.is_postgres() {
        followers.push(tokio::spawn(follow_changes(
            Arc::clone(&shared),
            config.database.postgres.options(),
        )));
    }
    let streams = Arc::clone(&shared);
    tokio::spawn(async move {
        shutdown.await;
        // Nodes going offline as their streams end tell nobody: everyone is leaving.
        streams.with_core(Core::stop_sending).await;
        // Map streams never end by themselves: end them, so the servers can drain and stop.
        streams.stopping.send_replace(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // One limiter for every warning a peer can cause, so none of them can fill the log.
    let logs = Arc::new(LogLimiter::default());
    let admin_limits = Limits {
        max_connections: MAX_ADMIN_CONNECTIONS,
        ..limits
    };
    // The server pings every connection; one that stops answering is closed.
    let builder = || {
        Server::builder()
            .http2_keepalive_interval(Some(connections.http2_ping_interval))
            .http2_keepalive_timeout(Some(connections.http2_ping_timeout))
            .layer(TrackLayer)
            .layer(MalformedRequestLayer::new(Arc::clone(&logs)))
    };
    let tcp_server = builder()
        .add_service(control)
        .add_service(admin_tcp)
        .serve_with_incoming_shutdown(
            Acceptor::new(tcp, limits, stats.tcp, Arc::clone(&logs)),
            stopped(shared.stopping.subscribe()),
        );
    let unix_server = builder()
        .add_service(admin_local)
        .serve_with_incoming_shutdown(
            Acceptor::new(unix, admin_limits, stats.admin, Arc::clone(&logs)).with_spare_fd(),
            stopped(shared.stopping.subscribe()),
        );
    let result = tokio::try_join!(tcp_server, unix_server);
    sweeper.abort();
    upkeep.abort();
    for task in followers {
        task.abort();
    }
    if let Some(web) = web {
        web.abort();
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    reloader.abort();
    if let Some(derp) = embedded {
        derp.shutdown().await;
    }
    let _ = std::fs::remove_file(socket);
    result?;
    tracing::info!("warren-control stopped");
    Ok(())
}

/// Binds the local admin socket (replacing a stale one) with the configured mode; the file is
/// removed again when the mode cannot be set.
fn bind_socket(config: &Config) -> anyhow::Result<tokio::net::UnixListener> {
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
    if let Err(e) = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(socket);
        return Err(e).with_context(|| format!("setting the mode of {}", socket.display()));
    }
    Ok(unix)
}

// --- the access policy: loading at start-up, live reload ---

/// Where a policy came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// The file at `policy.path`.
    File(PathBuf),
    /// The policy stored in the database (`policy.mode = "database"`).
    Database,
}

impl std::fmt::Display for PolicyOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyOrigin::File(path) => write!(f, "policy file {}", path.display()),
            PolicyOrigin::Database => f.write_str("the policy stored in the database"),
        }
    }
}

/// Why a policy could not be loaded or applied (at start-up or on a reload). On a reload the
/// policy in force stays.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// The policy file could not be read.
    // The cause is in the message, not also a `source` (`{:#}` would print it twice).
    #[error("cannot read policy file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The policy file is gone. At start-up that is an error; on a reload the policy in force
    /// stays (a missing file never means "allow all").
    #[error("policy file {path} does not exist")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The policy is larger than [`MAX_POLICY_BYTES`].
    #[error("{origin} is larger than {max} bytes")]
    TooLarge {
        /// Where it came from.
        origin: PolicyOrigin,
        /// The limit.
        max: usize,
    },
    /// The policy does not compile (the error names line:col), or its `tests` fail against the
    /// current nodes (the error names each failing test).
    #[error("{origin}: {source}")]
    Invalid {
        /// Where it came from.
        origin: PolicyOrigin,
        /// Why it was refused.
        source: PolicyError,
    },
    /// Database mode, on a reload: the stored policy was removed. The policy in force stays.
    #[error("no policy is stored in the database any more")]
    StoredPolicyGone,
    /// The database failed.
    #[error("reading the stored policy: {0}")]
    Store(#[from] ControlError),
}

/// Reads a policy file, refusing one larger than [`MAX_POLICY_BYTES`].
pub fn read_policy_file(path: &Path) -> Result<String, PolicyLoadError> {
    use std::io::Read;
    let read_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => PolicyLoadError::Missing { path: path.into() },
        _ => PolicyLoadError::Read {
            path: path.into(),
            error: source,
        },
    };
    let mut text = String::new();
    let taken = std::fs::File::open(path)
        .map_err(read_error)?
        .take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if taken > MAX_POLICY_BYTES {
        return Err(PolicyLoadError::TooLarge {
            origin: PolicyOrigin::File(path.into()),
            max: MAX_POLICY_BYTES,
        });
    }
    Ok(text)
}

/// Compiles `text` from `origin`.
fn compile_from(origin: &PolicyOrigin, text: &str) -> Result<CompiledPolicy, PolicyLoadError> {
    compile_policy(text).map_err(|e| match e {
        ControlError::Policy(source) => PolicyLoadError::Invalid {
            origin: origin.clone(),
            source,
        },
        _ => PolicyLoadError::TooLarge {
            origin: origin.clone(),
            max: MAX_POLICY_BYTES,
        },
    })
}

/// A policy text and its compiled form.
pub type LoadedPolicy = (Arc<str>, Arc<CompiledPolicy>);

/// The policy to start with: the file (file mode with a path), the stored one (database mode),
/// or none. A policy that does not compile refuses the start, naming file, line and column.
pub fn initial_policy(
    config: &Config,
    store: &dyn Store,
) -> Result<Option<LoadedPolicy>, PolicyLoadError> {
    let (origin, text) = match config.policy.mode {
        PolicyMode::File => match config.policy.file() {
            None => return Ok(None),
            Some(path) => (PolicyOrigin::File(path.into()), read_policy_file(path)?),
        },
        PolicyMode::Database => match store.policy().map_err(ControlError::from)? {
            None => return Ok(None),
            Some(stored) => (PolicyOrigin::Database, stored.text),
        },
    };
    let compiled = compile_from(&origin, &text)?;
    Ok(Some((text.into(), Arc::new(compiled))))
}

/// What a policy reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new policy is in force; this many map updates went to nodes.
    Applied {
        /// Deltas sent.
        updates: usize,
    },
    /// The source holds the policy already in force.
    Unchanged,
    /// File mode without `policy.path`: there is nothing to reload.
    NoSource,
}

/// Reads the policy's source again (the file, or the database) and applies it when it changed.
/// Atomic: a policy that does not compile, whose tests fail, or that is gone leaves the one in
/// force, and the error says why.
pub async fn reload_policy(shared: &Arc<Shared>) -> Result<Reloaded, PolicyLoadError> {
    let source = &shared.policy;
    match source.mode {
        PolicyMode::File => {
            let Some(path) = &source.path else {
                return Ok(Reloaded::NoSource);
            };
            let text = read_policy_file(path)?;
            let origin = PolicyOrigin::File(path.clone());
            // Compiling needs no lock. Reloads run one at a time (one task), and in file mode
            // nothing else changes the policy, so the text compared here stays current.
            if source.text().as_deref() == Some(text.as_str()) {
                return Ok(Reloaded::Unchanged);
            }
            let compiled = Arc::new(compile_from(&origin, &text)?);
            // Applying it logs the change in the database: off the async threads.
            let updates = shared
                .with_core(move |core| core.set_policy(Some(compiled)))
                .await
                .map_err(|source| PolicyLoadError::Invalid { origin, source })?;
            source.set_text(Some(text.into()));
            Ok(Reloaded::Applied { updates })
        }
        PolicyMode::Database => {
            // All under the lock, on a blocking thread (database calls): `policy set` stores
            // and applies under it too, so the two never interleave.
            let shared = Arc::clone(shared);
            let inner = Arc::clone(&shared);
            shared
                .with_core(move |core| {
                    let source = &inner.policy;
                    let Some(stored) = core.stored_policy()? else {
                        // Nothing stored and nothing in force is no change; losing one that
                        // was in force is an error.
                        return match source.text() {
                            None => Ok(Reloaded::Unchanged),
                            Some(_) => Err(PolicyLoadError::StoredPolicyGone),
                        };
                    };
                    if source.text().as_deref() == Some(stored.text.as_str()) {
                        return Ok(Reloaded::Unchanged);
                    }
                    let origin = PolicyOrigin::Database;
                    let compiled = Arc::new(compile_from(&origin, &stored.text)?);
                    let updates = core
                        .set_policy(Some(compiled))
                        .map_err(|source| PolicyLoadError::Invalid { origin, source })?;
                    source.set_text(Some(stored.text.into()));
                    Ok(Reloaded::Applied { updates })
                })
                .await
        }
    }
}

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP: the config file and the policy are read again.
    Signal,
    /// The policy file (or its directory entry) changed.
    PolicyFile,
    /// The config file (or its directory entry) changed.
    ConfigFile,
}

/// How long the file must stay quiet before it is read: editors write, rename and chmod in
/// bursts.
const RELOAD_QUIET: Duration = Duration::from_millis(100);
/// The longest a burst of file events can put a reload off.
const RELOAD_MAX_DELAY: Duration = Duration::from_secs(1);

/// Whether a file-system event in a watched file's directory may have changed the file:
/// its own entry, or a Kubernetes-style `..data` symlink swap; opens and reads are not.
fn touches_file(event: &notify::Event, file_name: &std::ffi::OsStr) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    let relevant = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    relevant
        && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|name| name == file_name || name.as_encoded_bytes().starts_with(b".."))
        })
}

/// Watches a file's directory (so a file replaced by rename is seen, as editors and
/// configuration tools do); each relevant event sends a wake-up on `tx`.
fn watch_file(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let file_name = path.file_name().unwrap_or_default().to_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let shown = path.display().to_string();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if touches_file(&event, &file_name) => {
                // A full queue already holds a wake-up: this event is coalesced into it.
                let _ = tx.try_send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(file = %shown, error = %e, "file watch"),
        })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// What a reloader (policy or config) has done, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads that put something new in force.
    pub applied: AtomicU64,
    /// Reloads refused (what was in force stayed).
    pub refused: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

/// The policy reloader's [`ReloadStats`].
pub type PolicyReloadStats = ReloadStats;

impl ReloadStats {
    /// Why the last refused reload was refused.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn refused(&self, error: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error.to_owned());
        self.refused.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where the reloader reports.
#[derive(Debug, Clone, Default)]
pub struct ReloaderStats {
    /// Policy reloads.
    pub policy: Arc<ReloadStats>,
    /// Config file reloads.
    pub config: Arc<ReloadStats>,
}

/// Reloads on SIGHUP (the config file, then the policy in both modes), when the policy file
/// changes (file mode) and when the config file changes (when the server started from one),
/// one reload at a time. Ends when the server stops.
pub fn spawn_reloader(
    shared: Arc<Shared>,
    mut live: crate::reload::LiveConfig,
    stats: ReloaderStats,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (policy_tx, mut policy_rx) = mpsc::channel::<()>(1);
    let (config_tx, mut config_rx) = mpsc::channel::<()>(1);
    let policy_watch = match &shared.policy.path {
        Some(path) if shared.policy.mode == PolicyMode::File => Some(
            watch_file(path, policy_tx.clone())
                .with_context(|| format!("watching policy file {}", path.display()))?,
        ),
        _ => None,
    };
    let config_watch = match live.path() {
        Some(path) => Some(
            watch_file(path, config_tx.clone())
                .with_context(|| format!("watching config file {}", path.display()))?,
        ),
        None => None,
    };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let mut stopping = shared.stopping.subscribe();
    Ok(tokio::spawn(async move {
        // Kept alive as long as the task: dropping them ends the watches.
        let _watches = (policy_watch, config_watch);
        // The queues stay open (their senders alive) with no watcher too.
        let _senders = (policy_tx, config_tx);
        let mut policy_error: Option<String> = None;
        let mut config_error: Option<String> = None;
        loop {
            let trigger = tokio::select! {
                _ = stopping.wait_for(|s| *s) => return,
                Some(()) = hangup.recv() => Trigger::Signal,
                Some(()) = policy_rx.recv() => Trigger::PolicyFile,
                Some(()) = config_rx.recv() => Trigger::ConfigFile,
            };
            let (mut policy, mut config) = match trigger {
                Trigger::Signal => (true, true),
                Trigger::PolicyFile => (true, false),
                Trigger::ConfigFile => (false, true),
            };
            if trigger != Trigger::Signal {
                // Wait until the files have been quiet a moment, so a half-written file is not
                // read (but no longer than RELOAD_MAX_DELAY).
                let deadline = tokio::time::Instant::now() + RELOAD_MAX_DELAY;
                loop {
                    let quiet = deadline.min(tokio::time::Instant::now() + RELOAD_QUIET);
                    tokio::select! {
                        _ = tokio::time::sleep_until(quiet) => break,
                        Some(()) = policy_rx.recv() => policy = true,
                        Some(()) = config_rx.recv() => config = true,
                    }
                }
            }
            if config {
                let reason = match trigger {
                    Trigger::Signal => "SIGHUP",
                    _ => "config file changed",
                };
                reload_config(
                    &shared,
                    &mut live,
                    trigger == Trigger::Signal,
                    reason,
                    &stats.config,
                    &mut config_error,
                )
                .await;
            }
            if policy {
                let reason = match trigger {
                    Trigger::Signal => "SIGHUP",
                    _ => "file changed",
                };
                reload_policy_logged(
                    &shared,
                    trigger == Trigger::Signal,
                    reason,
                    &stats.policy,
                    &mut policy_error,
                )
                .await;
            }
        }
    }))
}

/// Reloads the policy and logs what became of it.
async fn reload_policy_logged(
    shared: &Arc<Shared>,
    signal: bool,
    reason: &str,
    stats: &ReloadStats,
    last_error: &mut Option<String>,
) {
    match reload_policy(shared).await {
        Ok(Reloaded::Applied { updates }) => {
            *last_error = None;
            stats.applied.fetch_add(1, Ordering::SeqCst);
            tracing::info!(reason, updates, "policy reloaded and applied");
        }
        Ok(Reloaded::Unchanged) => {
            if last_error.take().is_some() {
                tracing::info!(
                    reason,
                    "the policy source matches the policy in force again"
                );
            } else {
                tracing::debug!(reason, "policy unchanged");
            }
        }
        Ok(Reloaded::NoSource) => {
            tracing::info!(reason, "no policy.path is configured: nothing to reload");
        }
        Err(e) => {
            let text = e.to_string();
            stats.refused(&text);
            // The same broken file seen again (a burst, a SIGHUP aside) is logged once.
            if signal || last_error.as_deref() != Some(text.as_str()) {
                tracing::error!(reason, error = %text,
                    "policy reload refused; the policy in force stays");
            }
            *last_error = Some(text);
        }
    }
}

/// Reads the config file again, applies what can change live and logs what it did: one WARN
/// line naming the keys that need a restart, one INFO line with what was applied.
async fn reload_config(
    shared: &Shared,
    live: &mut crate::reload::LiveConfig,
    signal: bool,
    reason: &str,
    stats: &ReloadStats,
    last_error: &mut Option<String>,
) {
    use crate::reload::LogLevelApplied;
    match live.reload(shared, signal).await {
        Ok(None) => {
            if live.path().is_none() {
                tracing::debug!(reason, "no config file: nothing to reload");
            } else if last_error.take().is_some() {
                tracing::info!(reason, "the config file matches the config in force again");
            } else {
                tracing::debug!(reason, "config unchanged");
            }
        }
        Ok(Some(done)) => {
            *last_error = None;
            stats.applied.fetch_add(1, Ordering::SeqCst);
            if !done.restart.is_empty() {
                let keys = done.restart.join(", ");
                tracing::warn!(reason, keys = %keys,
                    "config changed, not applied, needs a restart: {keys}");
            }
            let applied = match done.applied.is_empty() {
                true => "nothing".to_owned(),
                false => done.applied.join(", "),
            };
            tracing::info!(reason, applied = %applied, updates = done.updates, "config reloaded");
            for warning in &done.warnings {
                tracing::warn!(reason, "{warning}");
            }
            if let Some(level) = &done.log_level {
                match crate::reload::apply_log_level(level) {
                    LogLevelApplied::Applied => tracing::info!(level = %level, "log level set"),
                    LogLevelApplied::RustLogSet => tracing::warn!(level = %level,
                        "log.level not applied: RUST_LOG is set and takes precedence"),
                    LogLevelApplied::NotReloadable => {
                        tracing::debug!(level = %level, "log.level: no reloadable log filter")
                    }
                }
            }
        }
        Err(e) => {
            let text = e.to_string();
            stats.refused(&text);
            if signal || last_error.as_deref() != Some(text.as_str()) {
                tracing::error!(reason, error = %text,
                    "config reload refused; the config in force stays");
            }
            *last_error = Some(text);
        }
    }
}

/// Logs, loudly, the tests of the policy in force that fail against the nodes at start-up.
/// The server still starts (see the README: refusing would let one node joining stop the whole
/// mesh); `policy set`, reloads and `policy check` refuse such a policy.
fn warn_failing_tests(core: &mut Core, origin: Option<&PolicyOrigin>) {
    let Some(error) = core.policy_failures() else {
        return;
    };
    let origin = origin.map(|o| o.to_string()).unwrap_or_default();
    match &error {
        PolicyError::TestsFailed { failures } => {
            tracing::error!(policy = %origin, failing = failures.len(),
                "the policy in force FAILS its own tests against the current nodes; it is enforced \
                 as written, but fix it: `policy set`, reloads and `policy check` refuse it");
            for failure in failures {
                tracing::error!(policy = %origin, test = %failure, "policy test fails");
            }
        }
        other => {
            tracing::error!(policy = %origin, error = %other, "the policy in force fails its tests")
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_derp_node_takes_its_address_from_server_url() {
        let node_for = |server_url: &str| {
            let config = Config {
                server_url: server_url.to_owned(),
                ..Config::default()
            };
            let map = derp_map(&config).expect("map");
            let node = map.regions[0].nodes[0].clone();
            (node.host_name, node.ipv4, node.ipv6)
        };
        let s = String::from;
        assert_eq!(
            node_for("http://[2001:db8::1]:50443"),
            (s("2001:db8::1"), s(""), s("2001:db8::1"))
        );
        assert_eq!(
            node_for("http://192.0.2.1:50443"),
            (s("192.0.2.1"), s("192.0.2.1"), s(""))
        );
        assert_eq!(
            node_for("https://control.example.net"),
            (s("control.example.net"), s(""), s(""))
        );
    }

    #[test]
    fn the_embedded_region_has_a_stun_only_second_node() {
        let nodes = |alt: crate::config::AltStun| {
            let mut config = Config {
                server_url: "http://192.0.2.1:50443".into(),
                ..Config::default()
            };
            config.derp.server.stun_alt_listen_addr = alt;
            let map = derp_map(&config).expect("map");
            assert_eq!(map.regions.len(), 1);
            map.regions[0]
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.ipv4.clone(), n.stun_port, n.stun_only))
                .collect::<Vec<_>>()
        };
        let s = String::from;
        use crate::config::AltStun;
        assert_eq!(
            nodes(AltStun::NextPort),
            [
                (s("999a"), s("192.0.2.1"), 3478, false),
                (s("999b"), s("192.0.2.1"), 3479, true)
            ]
        );
        assert_eq!(
            nodes(AltStun::Off),
            [(s("999a"), s("192.0.2.1"), 3478, false)]
        );
        // Listening on an address of its own: nodes are sent there.
        assert_eq!(
            nodes(AltStun::At("192.0.2.2:3478".parse().expect("addr"))),
            [
                (s("999a"), s("192.0.2.1"), 3478, false),
                (s("999b"), s("192.0.2.2"), 3478, true)
            ]
        );
    }

    #[test]
    fn a_loopback_embedded_derp_host_is_warned_about_naming_the_key() {
        let warnings = |server_url: &str, ipv4: &str, enabled: Option<bool>| {
            let mut config = Config {
                server_url: server_url.to_owned(),
                ..Config::default()
            };
            config.derp.server.ipv4 = ipv4.to_owned();
            config.derp.server.enabled = enabled;
            startup_warnings(&config)
        };
        let loopback = |host: &str, key| StartupWarning::LoopbackDerpHost {
            host: host.into(),
            key,
        };
        // The default server_url is loopback.
        let default = startup_warnings(&Config::default());
        assert_eq!(default, [loopback("127.0.0.1", "server_url")]);
        assert!(default[0].to_string().contains("set `server_url`"));
        assert_eq!(
            warnings("http://localhost:50443", "", None),
            [loopback("localhost", "server_url")]
        );
        assert_eq!(
            warnings("http://[::1]:50443", "", None),
            [loopback("::1", "server_url")]
        );
        assert_eq!(
            warnings("http://192.0.2.1:50443", "127.0.0.2", None),
            [loopback("127.0.0.2", "derp.server.ipv4")]
        );
        assert_eq!(warnings("http://192.0.2.1:50443", "", None), []);
        assert_eq!(warnings("https://control.example.net", "", None), []);
        // No embedded DERP server, nothing in the map points at this host.
        assert_eq!(warnings("http://127.0.0.1:50443", "", Some(false)), []);
    }
}
