//! `warren up`: registers, brings up the TUN device and the UDP socket, and runs the I/O loop
//! around the sans-IO [`warren_node_core::Node`]: handle what is ready, drain what the core
//! wants sent or written, re-arm one timer. The map follower runs beside it, so the data plane
//! keeps forwarding while control is away. Packets move in batches through [`crate::datapath`]:
//! the loop reads and runs the core, two worker threads write.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use warren_node_core::netmap::{self as map, MapChange, Netmap};
use warren_node_core::node::{PathKind, PingId, decapsulated_len};
use warren_node_core::{Dest, Event, Node, NodeError, PathStatus};
use warren_proto::NodePublicKey;
use warren_proto::control::DerpMap;
use warren_proto::control::map_response::Kind;

use crate::api::{
    self, ApiRequest, ApiResponse, NetcheckReport, PeerStatus, Prefs, SelfStatus, Status,
};
use crate::control::{self, Advert, Client, MapEvent};
use crate::datapath::{Counters, Threads, TunRx, TunTx, UdpTx};
use crate::derp::{DerpLinks, DerpReceived};
use crate::endpoints;
use crate::os_net::{OsNet, RouterConfig};
use crate::resolver_os::{OsResolver, ResolverPaths, ResolverSettings};
use crate::state::StateDir;
use crate::udp::BatchSocket;
use warren_node_core::dns::DnsSettings;

/// Options of `warren up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Control's URL.
    pub control: String,
    /// Pre-auth key.
    pub auth_key: String,
    /// Name to register.
    pub hostname: String,
    /// State directory.
    pub state: StateDir,
    /// TUN device name.
    pub tun: String,
    /// UDP port; 0 picks one.
    pub port: u16,
    /// Subnet routes to offer.
    pub advertise_routes: Vec<ipnet::IpNet>,
    /// Offer to be an exit node.
    pub advertise_exit_node: bool,
    /// Exit node, LAN access and accept-routes at start (`warren set` changes them later).
    pub prefs: Prefs,
    /// Masquerade forwarded traffic as a router.
    pub snat: bool,
    /// Serve Prometheus metrics here (`--metrics-listen`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// The TUN device's MTU: the largest IP packet carried (default [`TUN_MTU`]).
    pub mtu: u16,
    /// Ask the kernel for TUN offload (64 KB TSO segments in, GRO batches out); without it, or
    /// where the kernel refuses, one packet per read and write.
    pub tun_offload: bool,
    /// UDP sends and TUN writes on their own threads beside the event loop.
    pub data_threads: bool,
}

/// 0.0.0.0/0 and ::/0.
fn default_routes() -> [ipnet::IpNet; 2] {
    [
        ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
        ipnet::IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

/// The interfaces whose IPv4 reverse-path filter is strict. The kernel applies the larger of
/// `all` and the interface's value; strict checks an arriving packet against the unmarked route
/// back, which with an exit node is the tunnel, so replies to the node's own (marked) traffic on
/// the real interface would be dropped.
fn strict_rp_filter(tun: &str) -> Vec<String> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
    };
    let all = read("all").unwrap_or(0);
    let mut out: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv4/conf")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !["all", "default", "lo", tun].contains(&n.as_str()))
        .filter(|n| all.max(read(n).unwrap_or(0)) == 1)
        .collect();
    out.sort();
    out
}

/// What the node has asked of the OS, to change only what differs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OsWanted {
    routes: Vec<ipnet::IpNet>,
    lan_bypass: Vec<ipnet::IpNet>,
    router: Option<RouterConfig>,
}

/// The MTU of the TUN device (Tailscale's), leaving room for WireGuard over IPv6 paths.
pub const TUN_MTU: u16 = 1280;
/// The smallest tunnel MTU: IPv6's minimum, below which the kernel drops the TUN's IPv6.
pub const MIN_MTU: u16 = 1280;
/// The largest tunnel MTU: a 9,000-byte jumbo frame less the outer headers (IPv6 40, UDP 8,
/// WireGuard 32).
pub const MAX_MTU: u16 = 9_000 - OUTER_OVERHEAD;
/// What the outer datagram adds to a tunnel packet at most (IPv6, UDP, WireGuard).
pub const OUTER_OVERHEAD: u16 = 40 + 8 + 32;

/// Why `warren up` stopped before running.
#[derive(Debug, thiserror::Error)]
#[error("registration refused: {message}")]
pub struct Refused {
    /// Control's reason.
    pub message: String,
}

/// Runs the node until SIGINT, SIGTERM or `warren down`.
pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    // One daemon per state directory: a second one would take over the first one's socket
    // (and remove it when it stops).
    if tokio::net::UnixStream::connect(opts.state.socket())
        .await
        .is_ok()
    {
        anyhow::bail!(
            "another `warren up` is running with this state directory (its socket {} answers)",
            opts.state.socket().display()
        );
    }
    let keys = opts.state.load_or_create_keys()?;
    tracing::info!(node_key = %keys.node.public_key(), "starting");
    // Whatever a run that crashed left in the OS (routes, rules, firewall table, forwarding,
    // resolver) goes first.
    let resolver_paths = ResolverPaths::new(opts.state.root());
    match OsResolver::recover(&resolver_paths) {
        Ok(true) => tracing::info!("restored the resolver configuration a crashed run left"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "restoring the resolver configuration"),
    }
    // Without the rights (not root, no CAP_NET_ADMIN) the mesh still works; only subnet
    // routes, exit nodes and router mode need this.
    let os = match OsNet::new(&opts.tun, opts.state.root()).await {
        Ok(os) => Some(os),
        Err(e) => {
            tracing::warn!(error = %e, "no OS routing (subnet routes and exit nodes are off)");
            None
        }
    };

    // Local resources first: a bad TUN name, a taken port or socket fails here, before a
    // single-use key is spent on a node that would never come up.
    if !(MIN_MTU..=MAX_MTU).contains(&opts.mtu) {
        anyhow::bail!(
            "--mtu {} is outside {MIN_MTU}..={MAX_MTU} (IPv6's minimum; a jumbo frame less \
             {OUTER_OVERHEAD} bytes of outer headers)",
            opts.mtu
        );
    }
    let tun = Arc::new(open_tun(&opts.tun, opts.mtu, opts.tun_offload)?);
    let udp = Arc::new(
        BatchSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, opts.port)))
            .with_context(|| format!("binding UDP port {}", opts.port))?,
    );
    let port = udp.local_addr()?.port();
    let threads = if opts.data_threads {
        Threads::On
    } else {
        Threads::Off
    };
    let data = DataPath::start(&tun, &udp, opts.mtu, threads)?;
    let socket_path = opts.state.socket();
    let (listener, socket_file) = api::bind(&socket_path)?;
    let metrics_listener = match opts.metrics_listen {
        Some(addr) => Some(
            warren_derp::metrics::bind(addr)
                .await
                .with_context(|| format!("metrics listen address {addr}"))?,
        ),
        None => None,
    };

    let urls = control::control_urls(&opts.control);
    let (mut client, first) = Client::connect_any(&urls, keys.node.clone()).await?;
    let me = client
        .register(&opts.auth_key, keys.disco.public_key(), &opts.hostname)
        .await
        .map_err(|s| Refused {
            message: s.message().to_string(),
        })?;
    let (v4, v6) = addresses(&me.addresses)?;
    tracing::info!(name = %me.given_name, %v4, %v6, "registered");
    configure_tun(&tun, v4, v6).with_context(|| format!("configuring TUN device {}", opts.tun))?;
    tracing::info!(tun = %opts.tun, port, "data plane up");

    let (map_tx, map_rx) = mpsc::channel(1024);
    // A LAN candidate must carry a full tunnel datagram (the TUN's MTU plus outer headers).
    let min_path_mtu = u32::from(opts.mtu) + u32::from(OUTER_OVERHEAD);
    let lan = endpoints::local(port, min_path_mtu);
    let mut routes = opts.advertise_routes.clone();
    if opts.advertise_exit_node {
        routes.extend(default_routes());
    }
    routes.iter_mut().for_each(|r| *r = r.trunc());
    routes.sort();
    routes.dedup();
    let (advert_tx, advert_rx) = watch::channel(Advert {
        endpoints: lan.clone(),
        home_region: 0,
        routes,
    });
    let follower = tokio::spawn(control::follow(
        urls,
        first,
        keys.node.clone(),
        advert_rx,
        map_tx,
    ));
    let (api_tx, api_rx) = mpsc::channel(16);
    // Every API connection holds a clone of `alive`: the channel closes when all are done.
    let (alive, mut alive_rx) = mpsc::channel::<()>(1);
    let api_task = tokio::spawn(serve_api(listener, api_tx, alive));
    let (metrics, metrics_task) = match metrics_listener {
        Some(listener) => {
            let (sampler, rx) = crate::metrics::Sampler::new();
            let render = crate::metrics::render_from(rx);
            let task = tokio::spawn(warren_derp::metrics::serve(
                listener,
                render,
                std::future::pending(),
            ));
            (Some(sampler), Some(task))
        }
        None => (None, None),
    };

    let mut seed = [0u8; 8];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow::anyhow!("no OS randomness for disco nonces: {e}"))?;
    let mut node = Node::new(
        keys.node.clone(),
        keys.disco.clone(),
        u64::from_le_bytes(seed),
        Instant::now(),
    );
    node.set_lan_endpoints(lan);
    let (derp, derp_rx) = DerpLinks::new(keys.node.clone());
    let mut daemon = Daemon {
        node,
        netmap: Netmap::default(),
        control_connected: false,
        control_error: None,
        port,
        me_key: keys.node.public_key(),
        advert: advert_tx,
        derp,
        derp_map: None,
        pending_pings: BTreeMap::new(),
        pending_netcheck: Vec::new(),
        tun_name: opts.tun.clone(),
        prefs: ResolvedPrefs::default(),
        snat: opts.snat,
        os,
        os_applied: OsWanted::default(),
        os_dirty: true,
        resolver_paths,
        resolver: None,
        resolver_applied: None,
        metrics,
        rp_filter_checked: false,
        min_path_mtu,
    };
    daemon.apply_prefs(opts.prefs.clone());
    // `run` owns the TUN device: it is gone when `run` returns.
    let result = daemon.run(tun, udp, data, map_rx, api_rx, derp_rx).await;
    daemon.derp.close();
    follower.abort();
    api_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(r) = daemon.resolver.take()
        && let Err(e) = r.restore()
    {
        tracing::warn!(error = %e, "restoring the resolver configuration");
    }
    if let Some(os) = daemon.os.as_mut()
        && let Err(e) = os.cleanup().await
    {
        tracing::warn!(error = %e, "removing routes and firewall rules");
    }
    drop(socket_file);
    drop(daemon);
    tracing::info!("stopped");
    // `warren down` hears back only now, when the node is down, and the answer is written
    // before the process ends (a client that never sends its request is not waited for long).
    let down = result?;
    if let Some(reply) = down {
        let _ = reply.send(ApiResponse::Stopping);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), alive_rx.recv()).await;
    Ok(())
}

/// Creates the TUN device, with offload when asked and the kernel has it; a kernel that
/// refuses it (no IFF_VNET_HDR or TSO on TUN) gets a device without, and a warning.
fn open_tun(name: &str, mtu: u16, offload: bool) -> anyhow::Result<tun_rs::AsyncDevice> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .enable(false)
            .offload(offload)
            .build_async()
    };
    let tun = if offload {
        match build(true) {
            Ok(tun) => tun,
            Err(e) => {
                tracing::warn!(error = %e, "TUN offload unavailable: one packet per read and write");
                build(false).with_context(|| format!("creating TUN device {name}"))?
            }
        }
    } else {
        build(false).with_context(|| format!("creating TUN device {name}"))?
    };
    tracing::info!(
        tun = name,
        mtu,
        tcp_offload = tun.tcp_gso(),
        udp_offload = tun.udp_gso(),
        "TUN device created"
    );
    Ok(tun)
}

/// The mesh prefix lengths on the TUN device: all of 100.64.0.0/10 and fd7a:115c:a1e0::/48
/// route into the mesh.
const MESH_PREFIX_V4: u8 = 10;
const MESH_PREFIX_V6: u8 = 48;

/// Gives the TUN device its mesh addresses and brings it up. Without IPv6 on the host (the
/// kernel refuses the address, e.g. `disable_ipv6`), the node runs IPv4-only with a warning.
fn configure_tun(
    tun: &tun_rs::AsyncDevice,
    v4: Ipv4Addr,
    v6: std::net::Ipv6Addr,
) -> anyhow::Result<()> {
    tun.set_network_address(v4, MESH_PREFIX_V4, None)
        .with_context(|| format!("setting {v4}/{MESH_PREFIX_V4}"))?;
    if let Err(e) = tun.add_address_v6(v6, MESH_PREFIX_V6) {
        tracing::warn!(
            error = %e,
            address = %v6,
            "cannot set the IPv6 mesh address (IPv6 disabled on this host?): running IPv4-only"
        );
    }
    tun.enabled(true).context("bringing the device up")?;
    Ok(())
}

/// A path as `warren status` shows it: the core's wording, and `(DERP down)` after a relay
/// whose connection is not up, since packets sent that way are lost until it is.
fn path_text(status: &PathStatus, link_up: impl Fn(u32) -> bool) -> String {
    match status.relay() {
        Some(region) if !link_up(region) => format!("{status} (DERP down)"),
        _ => status.to_string(),
    }
}

fn addresses(list: &[String]) -> anyhow::Result<(Ipv4Addr, std::net::Ipv6Addr)> {
    let mut v4 = None;
    let mut v6 = None;
    for a in list {
        let net: ipnet::IpNet = a
            .parse()
            .with_context(|| format!("control sent a bad address {a:?}"))?;
        match net.addr() {
            IpAddr::V4(a) => v4 = Some(a),
            IpAddr::V6(a) => v6 = Some(a),
        }
    }
    Ok((
        v4.context("control sent no IPv4 address")?,
        v6.context("control sent no IPv6 address")?,
    ))
}

type ApiCall = (ApiRequest, oneshot::Sender<ApiResponse>);

async fn serve_api(listener: UnixListener, tx: mpsc::Sender<ApiCall>, alive: mpsc::Sender<()>) {
    let me = rustix::process::geteuid().as_raw();
    while let Ok((mut stream, _)) = listener.accept().await {
        let tx = tx.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let _alive = alive;
            if let Err(refused) = api::authorize(&stream, me) {
                tracing::warn!(%refused, "local API call refused");
                let resp = ApiResponse::Error {
                    message: refused.to_string(),
                };
                let _ = api::write_response(&mut stream, &resp).await;
                return;
            }
            let resp = match api::read_request(&mut stream).await {
                Ok(req) => {
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send((req, rtx)).await.is_err() {
                        return;
                    }
                    match rrx.await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
                Err(e) => ApiResponse::Error {
                    message: format!("{e:#}"),
                },
            };
            let _ = api::write_response(&mut stream, &resp).await;
        });
    }
}

struct Daemon {
    node: Node,
    netmap: Netmap,
    control_connected: bool,
    control_error: Option<String>,
    port: u16,
    me_key: NodePublicKey,
    advert: watch::Sender<Advert>,
    derp: DerpLinks,
    derp_map: Option<DerpMap>,
    /// `warren ping` calls waiting for their pong (or its timeout).
    pending_pings: BTreeMap<PingId, oneshot::Sender<ApiResponse>>,
    pending_netcheck: Vec<oneshot::Sender<ApiResponse>>,
    tun_name: String,
    prefs: ResolvedPrefs,
    snat: bool,
    os: Option<OsNet>,
    os_applied: OsWanted,
    /// The netmap or the preferences changed: bring the OS in line before the next wait.
    os_dirty: bool,
    resolver_paths: ResolverPaths,
    /// The host resolver pointed at 100.100.100.100 (control's `dns.magic_dns`).
    resolver: Option<OsResolver>,
    /// What the host resolver was last told.
    resolver_applied: Option<ResolverSettings>,
    /// Samples the core's counters for `/metrics` (with `--metrics-listen`).
    metrics: Option<crate::metrics::Sampler>,
    /// rp_filter was looked at (once, when an exit node is first used).
    rp_filter_checked: bool,
    /// The smallest interface MTU a LAN endpoint may have (the tunnel's plus outer headers).
    min_path_mtu: u32,
}

/// The preferences in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ResolvedPrefs {
    /// As the user gave it (name or address); matched against the netmap on every change.
    exit_node: Option<String>,
    allow_lan: bool,
    accept_routes: bool,
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// The data path's batches and the threads that write them.
#[derive(Debug)]
struct DataPath {
    counters: Arc<Counters>,
    udp_tx: UdpTx,
    tun_tx: TunTx,
    tun_rx: TunRx,
}

impl DataPath {
    /// Batches and writer threads for `tun` and `udp`, reading packets of up to `mtu` bytes.
    fn start(
        tun: &Arc<tun_rs::AsyncDevice>,
        udp: &Arc<BatchSocket>,
        mtu: u16,
        threads: Threads,
    ) -> anyhow::Result<Self> {
        let counters = Counters::new(tun.tcp_gso());
        Ok(Self {
            udp_tx: UdpTx::start(udp.clone(), threads).context("starting the UDP sender thread")?,
            tun_tx: TunTx::start(tun.clone(), counters.clone(), threads)
                .context("starting the TUN writer thread")?,
            tun_rx: TunRx::new(mtu, counters.clone()),
            counters,
        })
    }

    /// Writes what is batched and stops the threads.
    fn stop(&mut self) {
        self.udp_tx.stop();
        self.tun_tx.stop();
    }
}

/// Most packets taken from one source per wakeup.
const BURST: usize = 64;

/// Most bytes taken from the TUN device per wakeup: with offload one read is up to a 64 KB
/// segment, and what one wakeup encrypts for DERP must fit the link's queue (512 packets)
/// before its writer task gets to run.
const TUN_BURST_BYTES: usize = 256 << 10;

/// How often the node looks at its interfaces for new LAN endpoints.
const LAN_RECHECK: Duration = Duration::from_secs(20);

impl Daemon {
    async fn run(
        &mut self,
        tun: Arc<tun_rs::AsyncDevice>,
        udp: Arc<BatchSocket>,
        mut data: DataPath,
        map_rx: mpsc::Receiver<MapEvent>,
        api_rx: mpsc::Receiver<ApiCall>,
        derp_rx: mpsc::Receiver<DerpReceived>,
    ) -> anyhow::Result<Option<oneshot::Sender<ApiResponse>>> {
        let result = self
            .serve(&tun, &udp, &mut data, map_rx, api_rx, derp_rx)
            .await;
        data.stop();
        result
    }

    async fn serve(
        &mut self,
        tun: &tun_rs::AsyncDevice,
        udp: &BatchSocket,
        data: &mut DataPath,
        mut map_rx: mpsc::Receiver<MapEvent>,
        mut api_rx: mpsc::Receiver<ApiCall>,
        mut derp_rx: mpsc::Receiver<DerpReceived>,
    ) -> anyhow::Result<Option<oneshot::Sender<ApiResponse>>> {
        // MagicDNS forwards to upstream resolvers from this socket; it carries the bypass mark
        // so an exit node's default route does not pull it into the tunnel.
        let dns_sock = tokio::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .await
            .context("binding the DNS forwarding socket")?;
        if let Err(e) = crate::os_net::mark_socket(std::os::fd::AsFd::as_fd(&dns_sock)) {
            tracing::warn!(error = %e, "cannot mark the DNS forwarding socket");
        }
        let mut dns_buf = vec![0u8; 65_535];
        let mut udp_bufs = vec![vec![0u8; crate::udp::RECV_BUF]; crate::udp::RECV_BATCH];
        let mut udp_meta = vec![quinn_udp::RecvMeta::default(); crate::udp::RECV_BATCH];
        let term = terminated();
        tokio::pin!(term);
        // Created once, so a SIGINT that arrives while a handler runs is not lost.
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        let sleep = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(sleep);
        let mut lan_check = tokio::time::interval(LAN_RECHECK);
        lan_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metrics_tick = tokio::time::interval(crate::metrics::SAMPLE_EVERY);
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.os_dirty {
                self.os_dirty = false;
                self.sync_os().await;
            }
            self.flush(data);
            while let Some(f) = self.node.poll_dns_forward() {
                if let Err(e) = dns_sock.try_send_to(&f.payload, f.upstream) {
                    tracing::debug!(error = %e, upstream = %f.upstream, "DNS forward");
                }
            }
            let deadline = self
                .node
                .poll_timeout()
                .map(|(t, _)| t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            // One timer, moved only when the deadline moves (not re-armed for every packet).
            if sleep.deadline() != deadline.into() {
                sleep.as_mut().reset(deadline.into());
            }
            tokio::select! {
                r = tun.readable() => {
                    r.context("reading the TUN device")?;
                    if self.on_tun_ready(tun, data)? {
                        // Let the DERP links' writers drain what this burst queued before
                        // the next burst (the runtime has one thread).
                        tokio::task::yield_now().await;
                    }
                }
                r = udp.readable() => match r {
                    Ok(()) => self.on_udp_ready(udp, data, &mut udp_bufs, &mut udp_meta),
                    Err(e) => tracing::debug!(error = %e, "UDP receive"),
                },
                Some(r) = derp_rx.recv() => {
                    let now = Instant::now();
                    self.on_derp(r, data, now);
                    for _ in 1..BURST {
                        match derp_rx.try_recv() {
                            Ok(r) => self.on_derp(r, data, now),
                            Err(_) => break,
                        }
                    }
                }
                r = dns_sock.recv_from(&mut dns_buf) => match r {
                    Ok((n, from)) => self.node.handle_dns_upstream(from, &dns_buf[..n], Instant::now()),
                    Err(e) => tracing::debug!(error = %e, "DNS upstream receive"),
                },
                _ = &mut sleep => self.node.handle_timeout(Instant::now()),
                _ = lan_check.tick() => {
                    self.node.set_lan_endpoints(endpoints::local(self.port, self.min_path_mtu));
                }
                _ = metrics_tick.tick(), if self.metrics.is_some() => self.sample_metrics(data),
                Some(ev) = map_rx.recv() => self.on_map_event(ev),
                Some((req, reply)) = api_rx.recv() => {
                    if let Some(down) = self.on_api(req, reply) {
                        tracing::info!("down requested");
                        return Ok(Some(down));
                    }
                }
                _ = &mut interrupt => return Ok(None),
                _ = &mut term => return Ok(None),
            }
        }
    }

    /// Publishes the core's counters for the next scrape.
    fn sample_metrics(&mut self, data: &DataPath) {
        if let Some(sampler) = self.metrics.as_mut() {
            let now = Instant::now();
            sampler.sample(
                self.node.peer_stats(now),
                self.node.dns_stats(),
                self.derp.reconnects(),
                self.derp.links_up(),
                data.counters.snapshot(),
                now,
            );
        }
    }

    /// Takes what the TUN device has ready (a burst of reads, each up to a 64 KB segment
    /// with offload) and encrypts it into the outbound batches. True when some of it went to
    /// a DERP link.
    fn on_tun_ready(
        &mut self,
        tun: &tun_rs::AsyncDevice,
        data: &mut DataPath,
    ) -> anyhow::Result<bool> {
        let now = Instant::now();
        let Self { node, derp, .. } = self;
        let mut bytes = 0;
        let mut relayed = false;
        for _ in 0..BURST {
            if bytes >= TUN_BURST_BYTES {
                break;
            }
            let packets = match data.tun_rx.try_read(tun) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // Not the kernel's error but tun-rs's: a frame its offload split refuses (a
                // bad virtio header, say) is that frame's loss.
                Err(e) if e.raw_os_error().is_none() => {
                    tracing::debug!(error = %e, "TUN read: frame dropped");
                    continue;
                }
                Err(e) => return Err(e).context("reading the TUN device"),
            };
            for packet in packets {
                bytes += packet.len();
                match data.udp_tx.encrypt(node, derp, packet, now) {
                    Ok(via_derp) => relayed |= via_derp,
                    Err(e) => tracing::trace!(error = %e, "dropped outbound packet"),
                }
            }
        }
        Ok(relayed)
    }

    /// Takes every datagram the socket has ready (a few batches at most), GRO runs split.
    fn on_udp_ready(
        &mut self,
        udp: &BatchSocket,
        data: &mut DataPath,
        bufs: &mut [Vec<u8>],
        meta: &mut [quinn_udp::RecvMeta],
    ) {
        let now = Instant::now();
        for _ in 0..BURST / crate::udp::RECV_BATCH {
            let mut slices: Vec<std::io::IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(b))
                .collect();
            let n = match udp.try_recv(&mut slices, meta) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // ICMP errors from earlier sends surface here on Linux; they concern one peer.
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive");
                    return;
                }
            };
            for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                    self.on_udp(m.addr, datagram, data, now);
                }
            }
        }
    }

    fn on_udp(&mut self, from: SocketAddr, datagram: &[u8], data: &mut DataPath, now: Instant) {
        let slot = data.tun_tx.slot(decapsulated_len(datagram.len()));
        match self.node.decapsulate_udp(from, datagram, now, slot) {
            Ok(Some(n)) => data.tun_tx.commit(n),
            Ok(None) => {}
            // Counted per peer (status shows it); one line per packet only at trace.
            Err(e @ NodeError::Filtered { .. }) => tracing::trace!(error = %e, %from, "filtered"),
            Err(e) => tracing::debug!(error = %e, %from, "dropped datagram"),
        }
    }

    fn on_derp(&mut self, r: DerpReceived, data: &mut DataPath, now: Instant) {
        let slot = data.tun_tx.slot(decapsulated_len(r.packet.len()));
        match self
            .node
            .decapsulate_derp(r.region, r.from, &r.packet, now, slot)
        {
            Ok(Some(n)) => data.tun_tx.commit(n),
            Ok(None) => {}
            Err(e @ NodeError::Filtered { .. }) => {
                tracing::trace!(error = %e, region = r.region, "filtered");
            }
            Err(e) => tracing::debug!(error = %e, region = r.region, "dropped DERP packet"),
        }
    }

    /// Hands what the core queued to the batches, and the batches to the writer threads.
    fn flush(&mut self, data: &mut DataPath) {
        while let Some(t) = self.node.poll_transmit() {
            match t.dst {
                Dest::Udp(dst) => data.udp_tx.push(dst, &t.payload),
                Dest::Derp { region, peer } => self.derp.send(region, peer, t.payload),
            }
        }
        data.udp_tx.flush();
        while let Some(p) = self.node.poll_tun() {
            data.tun_tx.push(&p);
        }
        data.tun_tx.flush();
        while let Some(ev) = self.node.poll_event() {
            self.on_node_event(ev);
        }
    }

    fn on_node_event(&mut self, ev: Event) {
        match ev {
            Event::Endpoints(endpoints) => {
                tracing::info!(?endpoints, "endpoints changed");
                self.advert.send_modify(|a| a.endpoints = endpoints);
            }
            Event::HomeRegion(region) => {
                tracing::info!(region, "home DERP region");
                self.advert.send_modify(|a| a.home_region = region);
                self.derp.set_home(region);
            }
            Event::Netcheck(report) => {
                for reply in self.pending_netcheck.drain(..) {
                    let _ = reply.send(ApiResponse::Netcheck(Box::new(NetcheckReport::from_core(
                        &report,
                        self.node.home_region(),
                    ))));
                }
            }
            Event::Pong { id, path, rtt, .. } => {
                if let Some(reply) = self.pending_pings.remove(&id) {
                    let _ = reply.send(ApiResponse::Pong {
                        path: path.to_string(),
                        direct: matches!(path, PathKind::Direct(_)),
                        rtt_us: rtt.as_micros() as u64,
                    });
                }
            }
            Event::PingTimeout { id } => {
                if let Some(reply) = self.pending_pings.remove(&id) {
                    let _ = reply.send(ApiResponse::PingTimeout);
                }
            }
        }
    }

    fn on_map_event(&mut self, ev: MapEvent) {
        match ev {
            MapEvent::Connected => {
                tracing::info!("control connected");
                self.control_connected = true;
                self.control_error = None;
            }
            MapEvent::Disconnected { reason, revoked } => {
                self.control_connected = false;
                if revoked {
                    tracing::error!(%reason, "control revoked this node; dropping every peer");
                    self.node.set_peers(Vec::new());
                    self.netmap = Netmap::default();
                }
                self.control_error = Some(reason);
            }
            MapEvent::Message(kind) => self.on_map_message(*kind),
        }
    }

    fn on_map_message(&mut self, kind: Kind) {
        let derived = !matches!(
            kind,
            Kind::Keepalive(_) | Kind::PeerOnline(_) | Kind::PeerEndpoints(_)
        );
        self.os_dirty |= derived;
        match self.netmap.apply(kind) {
            Ok(MapChange::Reset(peers)) => {
                tracing::debug!(peers = peers.len(), "full netmap");
                self.node.set_peers(peers);
                self.set_filter(self.netmap.filter());
                self.sync_derp_map();
            }
            // DNS follows in sync_os (os_dirty is set above); the peers and sessions stay.
            Ok(MapChange::Settings) => {
                tracing::info!("control's DNS settings or DERP map changed");
                self.sync_derp_map();
            }
            Ok(MapChange::Upsert(p)) => {
                tracing::info!(peer = %p.name, "peer added or changed");
                self.node.upsert_peer(p);
            }
            Ok(MapChange::Remove(key)) => {
                tracing::info!(peer = %key.short(), "peer removed");
                self.node.remove_peer(&key);
            }
            Ok(MapChange::Endpoints(key, eps)) => self.node.set_endpoints(&key, eps),
            Ok(MapChange::Filter(f)) => self.set_filter(f),
            Ok(MapChange::None) => {}
            Err(e) => tracing::warn!(error = %e, "ignoring netmap message"),
        }
    }

    /// Points the DERP links and netcheck at the netmap's DERP map when it changed.
    fn sync_derp_map(&mut self) {
        let derp_map = self.netmap.derp_map().cloned();
        if derp_map != self.derp_map {
            if let Some(m) = &derp_map {
                self.derp.set_urls(map::derp_urls(m));
                self.node
                    .set_stun_servers(map::stun_servers(m), Instant::now());
            }
            self.derp_map = derp_map;
        }
    }

    fn set_filter(&mut self, filter: warren_node_core::filter::Filter) {
        let (allow_all, rules) = (filter.is_allow_all(), filter.rules().len());
        if self.node.set_filter(filter) {
            tracing::info!(allow_all, rules, "packet filter");
        }
    }

    /// Answers a local API call; true when the daemon should stop.
    /// Answers `req`; for `down`, hands back the reply, to be sent once the daemon is down.
    fn on_api(
        &mut self,
        req: ApiRequest,
        reply: oneshot::Sender<ApiResponse>,
    ) -> Option<oneshot::Sender<ApiResponse>> {
        match req {
            ApiRequest::Down => return Some(reply),
            ApiRequest::Status => {
                let _ = reply.send(ApiResponse::Status(Box::new(self.status())));
            }
            ApiRequest::Ping { peer } => match self.find_peer(&peer) {
                Some(key) => match self.node.ping(&key, Instant::now()) {
                    Ok(id) => {
                        self.pending_pings.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(ApiResponse::Error {
                            message: e.to_string(),
                        });
                    }
                },
                None => {
                    let _ = reply.send(ApiResponse::Error {
                        message: format!("no peer named {peer:?}"),
                    });
                }
            },
            ApiRequest::Set(prefs) => {
                let answer = match self.check_prefs(&prefs) {
                    Ok(()) => {
                        self.apply_prefs(prefs);
                        ApiResponse::Prefs(self.prefs_view())
                    }
                    Err(message) => ApiResponse::Error { message },
                };
                let _ = reply.send(answer);
            }
            ApiRequest::Netcheck => match self.node.start_netcheck(Instant::now()) {
                Ok(()) => self.pending_netcheck.push(reply),
                Err(e) => {
                    let _ = reply.send(ApiResponse::Error {
                        message: e.to_string(),
                    });
                }
            },
        }
        None
    }

    /// A `warren set` is refused, changing nothing, when it names an exit node this node
    /// may not use now (unknown, or not offered to it by policy).
    fn check_prefs(&self, prefs: &Prefs) -> Result<(), String> {
        match prefs.exit_node.as_deref() {
            None | Some("") => Ok(()),
            Some(name) => match self.find_peer(name) {
                Some(key) if self.offered_exit(&key) => Ok(()),
                Some(_) => Err(format!(
                    "{name} is not an exit node this node may use (not approved, or the policy \
                     gives this node no autogroup:internet through it)"
                )),
                None => Err(format!("no peer named {name:?}")),
            },
        }
    }

    fn offered_exit(&self, key: &NodePublicKey) -> bool {
        self.netmap.peer_by_key(key).is_some_and(|n| n.exit_node)
    }

    fn apply_prefs(&mut self, prefs: Prefs) {
        if let Some(e) = prefs.exit_node {
            self.prefs.exit_node = Some(e).filter(|e| !e.is_empty());
        }
        if let Some(a) = prefs.exit_node_allow_lan_access {
            self.prefs.allow_lan = a;
        }
        if let Some(a) = prefs.accept_routes {
            self.prefs.accept_routes = a;
        }
        self.node.set_accept_routes(self.prefs.accept_routes);
        self.os_dirty = true;
    }

    fn prefs_view(&self) -> Prefs {
        Prefs {
            exit_node: Some(self.prefs.exit_node.clone().unwrap_or_default()),
            exit_node_allow_lan_access: Some(self.prefs.allow_lan),
            accept_routes: Some(self.prefs.accept_routes),
        }
    }

    /// Brings what the netmap and the preferences imply into the core (exit node, local
    /// destinations) and the OS (routes, LAN bypass, forwarding and masquerade). Each OS change
    /// is made only when it differs from the last one; a failure is logged and retried at the
    /// next change.
    async fn sync_os(&mut self) {
        let exit = self
            .prefs
            .exit_node
            .as_deref()
            .and_then(|name| self.find_peer(name));
        self.node.set_exit_node(exit);
        let me = self.netmap.self_node().cloned();
        let local = me.as_ref().map(|me| {
            // Which of them an exit node keeps from its peers is the core's decision.
            let lan = if me.exit_node {
                crate::os_net::lan_prefixes(&self.tun_name)
            } else {
                Vec::new()
            };
            map::local_nets(me, lan)
        });
        self.sync_dns(me.as_ref());
        let router = local
            .as_ref()
            .filter(|l| l.exit || !l.routes.is_empty())
            .map(|_| RouterConfig { snat: self.snat });
        if let Some(local) = local {
            self.node.set_local(local);
        }
        let mut routes = self.node.os_routes();
        // A prefix this node routes itself stays on its LAN (two routers for one prefix would
        // otherwise send their own LAN's traffic to each other).
        if let Some(me) = &me {
            let own: Vec<ipnet::IpNet> = me
                .advertised_routes
                .iter()
                .filter_map(|r| r.parse::<ipnet::IpNet>().ok())
                .filter(|n| n.prefix_len() > 0)
                .collect();
            routes.retain(|r| !own.contains(r));
        }
        // An exit node asked for but not (yet) in the netmap still takes the default routes,
        // so internet traffic waits in the tunnel instead of leaking around it.
        if self.prefs.exit_node.is_some() {
            routes.extend(default_routes());
            routes.sort();
            routes.dedup();
        }
        if self.prefs.exit_node.is_some() && !self.rp_filter_checked {
            self.rp_filter_checked = true;
            let strict = strict_rp_filter(&self.tun_name);
            if !strict.is_empty() {
                tracing::warn!(
                    interfaces = ?strict,
                    "strict reverse-path filtering (rp_filter=1) drops replies to this node's \
                     own traffic while an exit node is in use; set it to 2 (loose)"
                );
            }
        }
        let lan_bypass = if self.prefs.exit_node.is_some() && self.prefs.allow_lan {
            crate::os_net::lan_prefixes(&self.tun_name)
        } else {
            Vec::new()
        };
        let wanted = OsWanted {
            routes,
            lan_bypass,
            router,
        };
        let Some(os) = self.os.as_mut() else {
            return;
        };
        if wanted.router != self.os_applied.router {
            match os.set_router(wanted.router).await {
                Ok(()) => {
                    tracing::info!(router = ?wanted.router, "forwarding for peers");
                    self.os_applied.router = wanted.router;
                }
                Err(e) => tracing::warn!(error = %e, "router setup"),
            }
        }
        if wanted.routes != self.os_applied.routes {
            match os.set_routes(&wanted.routes).await {
                Ok(()) => {
                    tracing::info!(routes = ?wanted.routes, "routes into the mesh");
                    self.os_applied.routes = wanted.routes.clone();
                }
                Err(e) => tracing::warn!(error = %e, "installing routes"),
            }
        }
        if wanted.lan_bypass != self.os_applied.lan_bypass {
            match os.set_lan_bypass(&wanted.lan_bypass).await {
                Ok(()) => self.os_applied.lan_bypass = wanted.lan_bypass,
                Err(e) => tracing::warn!(error = %e, "LAN bypass routes"),
            }
        }
    }

    /// The resolver's names and upstreams from the netmap, and the host resolver pointed at
    /// it while control's `dns.magic_dns` is on. Without global nameservers from control,
    /// other names go to the servers the host used before (Tailscale's OS base config).
    fn sync_dns(&mut self, me: Option<&warren_proto::control::Node>) {
        let dns = self.netmap.dns().cloned().unwrap_or_default();
        let mut settings = DnsSettings::from_netmap(&dns, me, self.netmap.peers());
        let wanted = ResolverSettings::from_dns(&settings);
        match (dns.magic_dns, self.resolver.as_mut()) {
            (true, None) => {
                match OsResolver::apply(&self.resolver_paths, &self.tun_name, &wanted) {
                    Ok(r) => {
                        tracing::info!(mode = ?r.mode(), "host resolver points at 100.100.100.100");
                        self.resolver = Some(r);
                        self.resolver_applied = Some(wanted.clone());
                    }
                    Err(e) => tracing::warn!(error = %e, "pointing the host resolver at MagicDNS"),
                }
            }
            (true, Some(r)) => {
                if self.resolver_applied.as_ref() != Some(&wanted) {
                    match r.update(&wanted) {
                        Ok(()) => self.resolver_applied = Some(wanted.clone()),
                        Err(e) => tracing::warn!(error = %e, "updating the host resolver"),
                    }
                }
            }
            (false, Some(_)) => {
                if let Some(r) = self.resolver.take()
                    && let Err(e) = r.restore()
                {
                    tracing::warn!(error = %e, "restoring the host resolver");
                }
            }
            (false, None) => {}
        }
        if settings.upstreams.is_empty()
            && let Some(r) = &self.resolver
        {
            settings.upstreams = r
                .base_nameservers()
                .iter()
                .filter(|a| a.ip() != IpAddr::from(warren_node_core::dns::MAGIC_DNS_V4))
                .copied()
                .collect();
        }
        self.node.set_dns(settings);
    }

    /// A peer by name, mesh address or node key.
    fn find_peer(&self, what: &str) -> Option<NodePublicKey> {
        let what = what.trim_end_matches('.');
        self.netmap.peers().find_map(|n| {
            let key = NodePublicKey::from_slice(&n.node_key).ok()?;
            let by_name =
                n.given_name == what || what.split('.').next() == Some(n.given_name.as_str());
            let by_addr = n
                .addresses
                .iter()
                .any(|a| a.split('/').next() == Some(what));
            (by_name || by_addr || key.to_string() == what).then_some(key)
        })
    }

    fn status(&self) -> Status {
        let now_ms = warren_proto::proof::unix_ms();
        let now = Instant::now();
        let me = self.netmap.self_node();
        let peers = self
            .node
            .peer_stats(now)
            .into_iter()
            .map(|p| {
                let online = self.netmap.peer_by_key(&p.key).is_some_and(|n| n.online);
                PeerStatus {
                    name: p.name,
                    addresses: p.allowed_ips.iter().map(|a| a.addr().to_string()).collect(),
                    node_key: p.key.to_string(),
                    endpoint: match &p.status {
                        PathStatus::Direct { addr, .. } => Some(addr.to_string()),
                        _ => None,
                    },
                    path: Some(path_text(&p.status, |r| self.derp.is_up(r))),
                    relay_up: p.status.relay().map(|r| self.derp.is_up(r)),
                    latency_us: p.status.latency().map(|d| d.as_micros() as u64),
                    last_handshake_unix_ms: p
                        .session
                        .since_handshake
                        .map(|d| now_ms - i64::try_from(d.as_millis()).unwrap_or(0)),
                    filter_drops: p.filter_drops,
                    rx_bytes: p.session.rx_bytes,
                    tx_bytes: p.session.tx_bytes,
                    online,
                    primary_routes: p.routes.iter().map(|r| r.to_string()).collect(),
                    exit_node: p.exit_node,
                }
            })
            .collect();
        Status {
            me: SelfStatus {
                name: me.map(|n| n.given_name.clone()).unwrap_or_default(),
                addresses: me
                    .map(|n| {
                        n.addresses
                            .iter()
                            .map(|a| a.split('/').next().unwrap_or(a).to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
                node_key: self.me_key.to_string(),
                endpoints: self
                    .node
                    .endpoints()
                    .iter()
                    .map(|e| e.to_string())
                    .collect(),
                home_region: self.node.home_region().unwrap_or(0),
                advertised_routes: me.map(|n| n.advertised_routes.clone()).unwrap_or_default(),
                approved_routes: me.map(|n| n.approved_routes.clone()).unwrap_or_default(),
                exit_node: me.is_some_and(|n| n.exit_node),
            },
            control_connected: self.control_connected,
            control_error: self.control_error.clone(),
            peers,
            exit_node: self.prefs.exit_node.as_ref().map(|e| {
                self.node
                    .exit_node()
                    .and_then(|k| self.netmap.peer_by_key(&k))
                    .map(|n| n.given_name.clone())
                    .unwrap_or_else(|| e.clone())
            }),
            exit_node_offered: self.node.exit_node().is_some_and(|k| self.offered_exit(&k)),
            exit_nodes: self
                .netmap
                .peers()
                .filter(|n| n.exit_node)
                .map(|n| n.given_name.clone())
                .collect(),
            accept_routes: self.prefs.accept_routes,
            magic_dns: self.resolver.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_when_the_relay_is_down() {
        let a: SocketAddr = "192.0.2.1:41641".parse().expect("addr");
        let up = |_| true;
        let down = |_| false;
        let relay = PathStatus::Relay { region: 999 };
        assert_eq!(path_text(&relay, up), "relay 999");
        assert_eq!(path_text(&relay, down), "relay 999 (DERP down)");
        let trying = PathStatus::Trying {
            candidates: vec![a],
            relay: Some(999),
        };
        assert_eq!(path_text(&trying, up), "trying 192.0.2.1:41641 + relay 999");
        assert_eq!(
            path_text(&trying, down),
            "trying 192.0.2.1:41641 + relay 999 (DERP down)"
        );
        let direct = PathStatus::Direct {
            addr: a,
            latency: Duration::from_millis(1),
        };
        assert_eq!(path_text(&direct, down), "direct 192.0.2.1:41641");
        assert_eq!(direct.relay(), None);
    }
}
