//! `warren up`: registers, brings up the TUN device and the UDP socket, and runs the I/O loop
//! around the sans-IO [`warren_node_core::Node`]: handle what is ready, drain what the core
//! wants sent or written, re-arm one timer. The map follower runs beside it, so the data plane
//! keeps forwarding while control is away.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::{UdpSocket, UnixListener};
use tokio::sync::{mpsc, oneshot};
use warren_node_core::Node;
use warren_node_core::netmap::{MapChange, Netmap};
use warren_proto::NodePublicKey;
use warren_proto::control::map_response::Kind;

use crate::api::{self, ApiRequest, ApiResponse, PeerStatus, SelfStatus, Status};
use crate::control::{self, Client, MapEvent};
use crate::endpoints;
use crate::state::StateDir;

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
}

/// The MTU of the TUN device (Tailscale's), leaving room for WireGuard over IPv6 paths.
pub const TUN_MTU: u16 = 1280;

/// Why `warren up` stopped before running.
#[derive(Debug, thiserror::Error)]
#[error("registration refused: {message}")]
pub struct Refused {
    /// Control's reason.
    pub message: String,
}

/// Runs the node until SIGINT, SIGTERM or `warren down`.
pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    let keys = opts.state.load_or_create_keys()?;
    tracing::info!(node_key = %keys.node.public_key(), "starting");
    let mut client = Client::connect(&opts.control, keys.node.clone()).await?;
    let me = client
        .register(&opts.auth_key, keys.disco.public_key(), &opts.hostname)
        .await
        .map_err(|s| Refused {
            message: s.message().to_string(),
        })?;
    let (v4, v6) = addresses(&me.addresses)?;
    tracing::info!(name = %me.given_name, %v4, %v6, "registered");

    let tun = tun_rs::DeviceBuilder::new()
        .name(&opts.tun)
        .ipv4(v4, 10, None)
        .ipv6(v6, 48)
        .mtu(TUN_MTU)
        .build_async()
        .with_context(|| format!("creating TUN device {}", opts.tun))?;
    let udp = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, opts.port)))
        .await
        .with_context(|| format!("binding UDP port {}", opts.port))?;
    let port = udp.local_addr()?.port();
    tracing::info!(tun = %opts.tun, port, "data plane up");

    let socket_path = opts.state.socket();
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("binding {}", socket_path.display()))?;

    let (map_tx, map_rx) = mpsc::channel(1024);
    let follower = tokio::spawn(control::follow(
        opts.control.clone(),
        keys.node.clone(),
        move || endpoints::local(port),
        map_tx,
    ));
    let (api_tx, api_rx) = mpsc::channel(16);
    let api_task = tokio::spawn(serve_api(listener, api_tx));

    let mut daemon = Daemon {
        node: Node::new(keys.node.clone(), Instant::now()),
        netmap: Netmap::default(),
        control_connected: false,
        control_error: None,
        port,
        me_key: keys.node.public_key(),
    };
    let result = daemon.run(tun, Arc::new(udp), map_rx, api_rx).await;
    follower.abort();
    api_task.abort();
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped");
    result
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

async fn serve_api(listener: UnixListener, tx: mpsc::Sender<ApiCall>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
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
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

impl Daemon {
    async fn run(
        &mut self,
        tun: tun_rs::AsyncDevice,
        udp: Arc<UdpSocket>,
        mut map_rx: mpsc::Receiver<MapEvent>,
        mut api_rx: mpsc::Receiver<ApiCall>,
    ) -> anyhow::Result<()> {
        let mut tun_buf = vec![0u8; 65_535];
        let mut udp_buf = vec![0u8; 65_535];
        let term = terminated();
        tokio::pin!(term);
        // Created once, so a SIGINT that arrives while a handler runs is not lost.
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        loop {
            self.flush(&tun, &udp).await;
            let deadline = self
                .node
                .poll_timeout()
                .map(|(t, _)| t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = tun.recv(&mut tun_buf) => {
                    let n = r.context("reading the TUN device")?;
                    if let Err(e) = self.node.handle_tun_packet(&tun_buf[..n], Instant::now()) {
                        tracing::trace!(error = %e, "dropped outbound packet");
                    }
                }
                r = udp.recv_from(&mut udp_buf) => match r {
                    Ok((n, from)) => {
                        if let Err(e) = self.node.handle_udp(from, &udp_buf[..n], Instant::now()) {
                            tracing::debug!(error = %e, %from, "dropped datagram");
                        }
                    }
                    // ICMP errors from earlier sends surface here on Linux; they concern one peer.
                    Err(e) => tracing::debug!(error = %e, "UDP receive"),
                },
                _ = tokio::time::sleep_until(deadline.into()) => self.node.handle_timeout(Instant::now()),
                Some(ev) = map_rx.recv() => self.on_map_event(ev),
                Some((req, reply)) = api_rx.recv() => {
                    let stop = matches!(req, ApiRequest::Down);
                    let _ = reply.send(self.answer(req));
                    if stop {
                        tracing::info!("down requested");
                        return Ok(());
                    }
                }
                _ = &mut interrupt => return Ok(()),
                _ = &mut term => return Ok(()),
            }
        }
    }

    async fn flush(&mut self, tun: &tun_rs::AsyncDevice, udp: &UdpSocket) {
        while let Some(t) = self.node.poll_transmit() {
            if let Err(e) = udp.send_to(&t.payload, t.dst).await {
                tracing::debug!(error = %e, dst = %t.dst, "UDP send");
            }
        }
        while let Some(p) = self.node.poll_tun() {
            if let Err(e) = tun.send(&p).await {
                tracing::debug!(error = %e, "TUN write");
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
        match self.netmap.apply(kind) {
            Ok(MapChange::Reset(peers)) => {
                tracing::debug!(peers = peers.len(), "full netmap");
                self.node.set_peers(peers);
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
            Ok(MapChange::None) => {}
            Err(e) => tracing::warn!(error = %e, "ignoring netmap message"),
        }
    }

    fn answer(&self, req: ApiRequest) -> ApiResponse {
        match req {
            ApiRequest::Down => ApiResponse::Stopping,
            ApiRequest::Status => ApiResponse::Status(Box::new(self.status())),
        }
    }

    fn status(&self) -> Status {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let me = self.netmap.self_node();
        let peers = self
            .node
            .peer_stats()
            .into_iter()
            .map(|p| {
                let online = self.netmap.peer_by_key(&p.key).is_some_and(|n| n.online);
                PeerStatus {
                    name: p.name,
                    addresses: p.allowed_ips.iter().map(|a| a.addr().to_string()).collect(),
                    node_key: p.key.to_string(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    last_handshake_unix_ms: p
                        .session
                        .since_handshake
                        .map(|d| now_ms - i64::try_from(d.as_millis()).unwrap_or(0)),
                    rx_bytes: p.session.rx_bytes,
                    tx_bytes: p.session.tx_bytes,
                    online,
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
                endpoints: endpoints::local(self.port)
                    .iter()
                    .map(|e| e.to_string())
                    .collect(),
            },
            control_connected: self.control_connected,
            control_error: self.control_error.clone(),
            peers,
        }
    }
}
