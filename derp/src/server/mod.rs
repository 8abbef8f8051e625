//! The DERP relay: the handshake, one reader and one writer per connection, and the
//! [`registry`] core that routes between them.
//!
//! Per connection: the server sends `ServerKey` at once, reads `ClientInfo` (10 s deadline, as
//! Tailscale), optionally verifies the key, registers it (the newest connection for a key wins;
//! the older one gets a `Health` frame and is closed), answers `ServerInfo`, then relays.
//! A client whose frames are malformed or over the limits loses only its own connection.
//!
//! Region mesh (several servers sharing one mesh key act as one region): each server links to
//! the others as a mesh client ([`Relay::mesh_with`]), sends `WatchConns`, and learns their
//! clients from `PeerPresent`/`PeerGone`; a packet for a key connected elsewhere goes there as
//! `ForwardPacket`, which the other server delivers to its own client and never forwards again.

pub(crate) mod queue;
pub mod registry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, trace, warn};
use warren_proto::derp::{
    self, Frame, MeshKey, PeerGoneReason, PeerPresentFlags, ServerInfo, open_client_info,
    seal_server_info,
};
use warren_proto::disco::looks_like_disco;
use warren_proto::{DerpPublicKey, DerpSecretKey, NodePublicKey, NodeSecretKey};

use crate::client::{Client, ClientEvent, ClientSender, ConnectOptions};
use crate::frame::{FrameReader, ReadError, write_frame};
use crate::log_limit::LogLimiter;
use crate::verify::Verifier;
use queue::{ClientQueue, Next, Pushed};
use registry::{ConnId, MeshLinkId, Registry, Route};

/// Packets queued per client. Deeper than Tailscale's 32, so a WireGuard sender's bursts are
/// absorbed instead of dropped (in the throughput bench, 32 cost 3x in retransmits and rate);
/// memory stays bounded by the queue's byte cap (1 MiB per client for data, and 1 MiB for
/// disco), about Tailscale's worst case of 32 packets of 64 KiB per queue.
pub const DEFAULT_QUEUE_DEPTH: usize = 512;
/// The server sends a `KeepAlive` this often, plus up to [`KEEPALIVE_JITTER`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// The random part added once per connection to [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_JITTER: Duration = Duration::from_secs(5);
/// How long a client has to send `ClientInfo` (and be verified).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tailscale's default TCP write timeout towards a client.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames are batched into one write up to about this many bytes: about 22 full-size
/// WireGuard packets a syscall. Disco packets still overtake queued data (the queue drains
/// disco first); one queued behind a write in progress waits for at most this batch.
const WRITE_BATCH: usize = 32 << 10;
/// The largest `ClientInfo` payload accepted (Tailscale: 256 KiB).
const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// The largest `Ping` payload accepted (Tailscale: 1000 bytes).
const MAX_PING_LEN: usize = 1000;
/// The health text sent to a connection replaced by a newer one for the same key.
pub const REPLACED_HEALTH: &str = "another connection for this node key replaced this one";
/// Longest wait between attempts to link to a mesh peer; a link that stayed up this long
/// starts the next attempts from the shortest wait again.
const MESH_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A mesh link pings its peer this often...
const MESH_PING_EVERY: Duration = Duration::from_secs(15);
/// ...and is dropped (with what it learned) when nothing arrived for this long, so a peer that
/// vanished without closing the connection is not trusted with packets.
const MESH_SILENCE_LIMIT: Duration = Duration::from_secs(45);

/// The relay's settings.
pub struct RelayOptions {
    /// Packets queued per client (data and disco each).
    pub queue_depth: usize,
    /// How long a write to a client may block before the connection is closed; `None` waits
    /// forever (the queue still bounds memory).
    pub write_timeout: Option<Duration>,
    /// The region's mesh key: a client presenting it is a mesh peer.
    pub mesh_key: Option<MeshKey>,
    /// Who may connect; `None` admits every key that completes the handshake.
    pub verifier: Option<Arc<dyn Verifier>>,
    /// Admit clients when the verifier fails (cannot reach control).
    pub verify_fail_open: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            write_timeout: Some(DEFAULT_WRITE_TIMEOUT),
            mesh_key: None,
            verifier: None,
            verify_fail_open: false,
        }
    }
}

impl std::fmt::Debug for RelayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayOptions")
            .field("queue_depth", &self.queue_depth)
            .field("write_timeout", &self.write_timeout)
            .field("mesh_key", &self.mesh_key.is_some())
            .field("verifier", &self.verifier.is_some())
            .field("verify_fail_open", &self.verify_fail_open)
            .finish()
    }
}

/// Counters, all since start.
#[derive(Debug, Default)]
struct Counters {
    accepts: AtomicU64,
    packets_relayed: AtomicU64,
    bytes_relayed: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_unknown_dest: AtomicU64,
    dropped_gone: AtomicU64,
    peer_gone_disconnected: AtomicU64,
    peer_gone_not_here: AtomicU64,
    pongs: AtomicU64,
    replaced: AtomicU64,
    refused: AtomicU64,
    bad_frames: AtomicU64,
    packets_forwarded: AtomicU64,
    dropped_mesh: AtomicU64,
}

/// A snapshot of the relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted (before the handshake).
    pub accepts: u64,
    /// Clients connected now.
    pub clients: u64,
    /// Clients that say this server is their home.
    pub home_clients: u64,
    /// Packets queued to a destination.
    pub packets_relayed: u64,
    /// Payload bytes of the packets in [`Self::packets_relayed`] (the WireGuard or disco
    /// datagram, without DERP framing).
    pub bytes_relayed: u64,
    /// Packets dropped because the destination's queue was full (the oldest one goes).
    pub dropped_queue_full: u64,
    /// Packets dropped because the destination is not connected.
    pub dropped_unknown_dest: u64,
    /// Packets dropped because the destination was closing.
    pub dropped_gone: u64,
    /// `PeerGone(disconnected)` frames queued.
    pub peer_gone_disconnected: u64,
    /// `PeerGone(not here)` frames queued.
    pub peer_gone_not_here: u64,
    /// `Pong` frames queued.
    pub pongs: u64,
    /// Connections closed because a newer one for the same key arrived.
    pub replaced: u64,
    /// Connections refused by verification or a failed handshake.
    pub refused: u64,
    /// Connections closed for a malformed or oversized frame.
    pub bad_frames: u64,
    /// Keys known to be connected to other servers of the region.
    pub remote_clients: u64,
    /// Packets sent on to another server of the region as `ForwardPacket`.
    pub packets_forwarded: u64,
    /// Packets for another server of the region dropped (its link was down or behind).
    pub dropped_mesh: u64,
}

/// The view of one connected client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Data packets waiting in its queue.
    pub queued_data: usize,
    /// Disco packets waiting in its priority queue.
    pub queued_disco: usize,
    /// Packets it lost to a full queue.
    pub dropped: u64,
    /// Whether it said this server is its home.
    pub preferred: bool,
}

/// The packets waiting in the relay's per-client send queues (see [`Relay::queue_depths`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// Packets queued over all clients.
    pub total: u64,
    /// Packets queued for the client with the longest queue.
    pub max: u64,
}

struct Inner {
    key: DerpSecretKey,
    public: DerpPublicKey,
    options: RelayOptions,
    registry: Mutex<Registry<Arc<ClientQueue>>>,
    counters: Counters,
    shutdown: watch::Sender<bool>,
    /// Links to the other servers of the region, for `ForwardPacket`.
    mesh_links: Mutex<BTreeMap<MeshLinkId, ClientSender>>,
    next_link: AtomicU64,
    /// Shared by every info/warn line a connection can cause before or without proving
    /// anything (refusals, bad frames, connects on an open relay), so a flood of clients
    /// writes a bounded number of lines.
    peer_log: LogLimiter,
}

/// A DERP relay. Cheap to clone; feed it connections with [`Relay::accept`].
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("public_key", &self.inner.public)
            .finish_non_exhaustive()
    }
}

/// Why a connection ended, for logs.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("expected ClientInfo, got {0}")]
    NotClientInfo(derp::FrameType),
    #[error("bad ClientInfo: {0}")]
    BadClientInfo(#[from] derp::InfoError),
    #[error("key refused by verification")]
    Refused,
    #[error("verification failed: {0}")]
    VerifyFailed(#[from] crate::verify::VerifyError),
    #[error("{0} frame needs the mesh key")]
    NotPermitted(derp::FrameType),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("write failed: {0}")]
    Write(#[from] std::io::Error),
    #[error("write timed out")]
    WriteTimeout,
}

impl Relay {
    /// A relay with the server key `key`.
    pub fn new(key: DerpSecretKey, options: RelayOptions) -> Self {
        let public = key.public_key();
        let (shutdown, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                key,
                public,
                options,
                registry: Mutex::new(Registry::new()),
                counters: Counters::default(),
                shutdown,
                mesh_links: Mutex::new(BTreeMap::new()),
                next_link: AtomicU64::new(1),
                peer_log: LogLimiter::default(),
            }),
        }
    }

    /// The server's public key (sent in `ServerKey` and `Derp-Public-Key`).
    pub fn public_key(&self) -> DerpPublicKey {
        self.inner.public
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry<Arc<ClientQueue>>> {
        // Registry operations leave it consistent even if a caller panicked mid-way.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The limiter for log lines that peers can cause (shared with the HTTP front).
    pub(crate) fn peer_log(&self) -> &LogLimiter {
        &self.inner.peer_log
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let (clients, home, remote) = {
            let r = self.registry();
            (
                r.len() as u64,
                r.preferred_count() as u64,
                r.remote_len() as u64,
            )
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepts: l(&c.accepts),
            clients,
            home_clients: home,
            packets_relayed: l(&c.packets_relayed),
            bytes_relayed: l(&c.bytes_relayed),
            dropped_queue_full: l(&c.dropped_queue_full),
            dropped_unknown_dest: l(&c.dropped_unknown_dest),
            dropped_gone: l(&c.dropped_gone),
            peer_gone_disconnected: l(&c.peer_gone_disconnected),
            peer_gone_not_here: l(&c.peer_gone_not_here),
            pongs: l(&c.pongs),
            replaced: l(&c.replaced),
            refused: l(&c.refused),
            bad_frames: l(&c.bad_frames),
            remote_clients: remote,
            packets_forwarded: l(&c.packets_forwarded),
            dropped_mesh: l(&c.dropped_mesh),
        }
    }

    /// The state of `key`'s active connection, if it is connected.
    pub fn client_stats(&self, key: &NodePublicKey) -> Option<ClientStats> {
        let r = self.registry();
        let (_, q) = r.get(key)?;
        let (queued_data, queued_disco) = q.lens();
        Some(ClientStats {
            queued_data,
            queued_disco,
            dropped: q.dropped(),
            preferred: r.is_preferred(key),
        })
    }

    /// The send queues of every connected client: how many packets wait in all of them, and in
    /// the longest one (data and disco counted together).
    pub fn queue_depths(&self) -> QueueDepths {
        let r = self.registry();
        let mut depths = QueueDepths::default();
        for q in r.handles() {
            let (data, disco) = q.lens();
            depths.total += (data + disco) as u64;
            depths.max = depths.max.max((data + disco) as u64);
        }
        depths
    }

    /// Closes every connection and refuses new ones.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Keeps a link to the region's server at `url` (a mesh peer: same mesh key) until
    /// [`Self::shutdown`]: reconnects with backoff, watches its connections, and forwards
    /// packets for its clients. A URL that turns out to be this server is left alone, so every
    /// server of a region can be given the same list. Needs [`RelayOptions::mesh_key`].
    ///
    /// Each link presents a node key of its own: two URLs of one server make two redundant
    /// links, not two connections of one key that replace each other on the peer.
    pub async fn mesh_with(&self, url: String) {
        let Some(mesh_key) = self.inner.options.mesh_key.clone() else {
            warn!(%url, "no mesh key: not linking to the mesh peer");
            return;
        };
        let node_key = NodeSecretKey::generate();
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            let options = ConnectOptions {
                mesh_key: Some(mesh_key.clone()),
                ..ConnectOptions::default()
            };
            let connect = Client::connect(&url, &node_key, &options);
            let client = tokio::select! {
                c = connect => c,
                _ = stopped(&mut shutdown) => return,
            };
            match client {
                Ok(c) if c.server_key() == self.inner.public => {
                    debug!(%url, "mesh URL is this server");
                    return;
                }
                Ok(c) => {
                    info!(%url, peer = %c.server_key(), "linked to mesh peer");
                    let linked = tokio::time::Instant::now();
                    let why = self.run_mesh_link(c, &mut shutdown).await;
                    info!(%url, reason = %why, "mesh link down");
                    if linked.elapsed() >= MESH_MAX_BACKOFF {
                        backoff = Duration::from_millis(100);
                    }
                }
                Err(e) => warn!(%url, error = %e, "mesh peer unreachable"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(&mut shutdown) => return,
            }
            backoff = (backoff * 2).min(MESH_MAX_BACKOFF);
        }
    }

    /// Follows one mesh peer's connections until the link fails or the relay stops; returns why.
    async fn run_mesh_link(&self, client: Client, shutdown: &mut watch::Receiver<bool>) -> String {
        let link = MeshLinkId(self.inner.next_link.fetch_add(1, Ordering::Relaxed));
        let (tx, mut rx) = client.split();
        let links = || {
            self.inner
                .mesh_links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        links().insert(link, tx.clone());
        let why = if let Err(e) = tx.frame(Frame::WatchConns).await {
            e.to_string()
        } else {
            let mut ping = tokio::time::interval(MESH_PING_EVERY);
            let mut heard = tokio::time::Instant::now();
            loop {
                let event = tokio::select! {
                    ev = rx.recv() => ev,
                    _ = ping.tick() => {
                        if heard.elapsed() >= MESH_SILENCE_LIMIT {
                            break "peer silent".to_owned();
                        }
                        // A full writer loses the ping; silence then ends the link.
                        let _ = tx.try_frame(Frame::Ping { data: *b"meshlink" });
                        continue;
                    }
                    _ = stopped(shutdown) => break "relay stopping".to_owned(),
                };
                heard = tokio::time::Instant::now();
                match event {
                    Ok(ClientEvent::PeerPresent { peer, .. }) => {
                        self.registry().add_remote(peer, link);
                    }
                    Ok(ClientEvent::PeerGone { peer, .. }) => {
                        self.registry().remove_remote(&peer, link);
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                }
            }
        };
        links().remove(&link);
        self.registry().drop_link(link);
        why
    }

    /// Serves one client connection (after the HTTP upgrade) until it ends. `remote` is for
    /// logs only.
    pub async fn accept<IO>(&self, io: IO, remote: Option<SocketAddr>)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin,
    {
        self.accept_with_leftover(io, Vec::new(), remote).await;
    }

    /// Like [`Self::accept`], for a stream that already delivered `leftover` bytes.
    pub(crate) async fn accept_with_leftover<IO>(
        &self,
        io: IO,
        leftover: Vec<u8>,
        remote: Option<SocketAddr>,
    ) where
        IO: AsyncRead + AsyncWrite + Send + Unpin,
    {
        self.inner.counters.accepts.fetch_add(1, Ordering::Relaxed);
        let mut shutdown = self.inner.shutdown.subscribe();
        if *shutdown.borrow_and_update() {
            return;
        }
        let span =
            tracing::debug_span!("derp_conn", remote = ?remote, peer = tracing::field::Empty);
        let result = async {
            tokio::select! {
                r = self.serve(io, leftover) => r,
                _ = stopped(&mut shutdown) => Ok(()),
            }
        }
        .instrument(span.clone())
        .await;
        let _enter = span.enter();
        let log = &self.inner.peer_log;
        match result {
            Ok(()) => debug!("connection closed"),
            Err(ConnError::Read(ReadError::Closed)) => debug!("client hung up"),
            Err(e @ ConnError::Read(ReadError::Frame(_))) => {
                self.inner
                    .counters
                    .bad_frames
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(held_back) = log.allow() {
                    warn!(error = %e, held_back, "closing connection: bad frame");
                }
            }
            Err(e @ ConnError::NotPermitted(_)) => {
                if let Some(held_back) = log.allow() {
                    warn!(error = %e, held_back, "closing connection: frame not permitted");
                }
            }
            Err(
                e @ (ConnError::Refused
                | ConnError::VerifyFailed(_)
                | ConnError::HandshakeTimeout
                | ConnError::NotClientInfo(_)
                | ConnError::BadClientInfo(_)),
            ) => {
                if let Some(held_back) = log.allow() {
                    info!(error = %e, held_back, "client refused");
                }
            }
            Err(e) => debug!(error = %e, "connection ended"),
        }
    }

    async fn serve<IO>(&self, io: IO, leftover: Vec<u8>) -> Result<(), ConnError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (rd, mut wr) = tokio::io::split(io);
        let mut reader = FrameReader::with_leftover(rd, leftover).with_limit(client_frame_limit);
        write_frame(
            &mut wr,
            &Frame::ServerKey {
                key: self.inner.public,
            },
        )
        .await?;
        wr.flush().await?;

        let handshake = async {
            let frame = reader.read_frame().await?;
            if !matches!(frame, Frame::ClientInfo { .. }) {
                return Err(ConnError::NotClientInfo(frame.frame_type()));
            }
            let (key, info) = open_client_info(&self.inner.key, &frame)?;
            let mesh_peer = match (&self.inner.options.mesh_key, &info.mesh_key) {
                (Some(ours), Some(theirs)) => ours == theirs,
                _ => false,
            };
            // Mesh peers are trusted without asking control (as Tailscale does).
            if !mesh_peer && let Some(verifier) = &self.inner.options.verifier {
                match verifier.verify(key).await {
                    Ok(true) => {}
                    Ok(false) => return Err(ConnError::Refused),
                    Err(e) if self.inner.options.verify_fail_open => {
                        if let Some(held_back) = self.inner.peer_log.allow() {
                            warn!(
                                error = %e,
                                %key,
                                held_back,
                                "verification failed; admitting (fail open)"
                            );
                        }
                    }
                    Err(e) => return Err(ConnError::VerifyFailed(e)),
                }
            }
            Ok((key, info, mesh_peer))
        };
        let (key, info, mesh_peer) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                if !matches!(e, ConnError::Read(ReadError::Closed)) {
                    self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
            Err(_) => {
                self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                return Err(ConnError::HandshakeTimeout);
            }
        };
        tracing::Span::current().record("peer", tracing::field::display(key.short()));

        let registration = self.register(key, mesh_peer);
        // On an open relay anyone can connect: limited like the refusals.
        if let Some(held_back) = self.inner.peer_log.allow() {
            info!(
                conn = registration.conn.0,
                mesh_peer,
                version = info.version,
                held_back,
                "client connected"
            );
        }
        self.relay(&mut reader, &mut wr, &registration).await
    }

    /// Registers a client that finished its handshake: the newest connection for a key wins
    /// (the older one is told and closed) and watching mesh peers hear `PeerPresent`.
    fn register(&self, key: NodePublicKey, mesh_peer: bool) -> Registration<'_> {
        let depth = self.inner.options.queue_depth;
        let queue = Arc::new(if mesh_peer {
            ClientQueue::for_mesh_peer(depth)
        } else {
            ClientQueue::new(depth)
        });
        let registered = {
            let mut registry = self.registry();
            let registered = registry.register(key, queue.clone(), mesh_peer);
            // Queued under the registry lock, so presence frames keep the registry's order.
            for watcher in &registered.present_to {
                watcher.push_control(present_frame(key));
            }
            registered
        };
        if let Some((old, old_queue)) = registered.replaced {
            self.inner.counters.replaced.fetch_add(1, Ordering::Relaxed);
            if let Some(held_back) = self.inner.peer_log.allow() {
                info!(
                    old = old.0,
                    new = registered.conn.0,
                    held_back,
                    "newer connection replaces older one"
                );
            }
            old_queue.close(Some(REPLACED_HEALTH.to_owned()));
        }
        Registration {
            relay: self,
            key,
            conn: registered.conn,
            mesh_peer,
            queue,
        }
    }

    async fn relay<R, W>(
        &self,
        reader: &mut FrameReader<R>,
        wr: &mut W,
        client: &Registration<'_>,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Past the handshake, what the relay does not act on is read past, not buffered.
        reader.set_skip(client_frame_skip);
        let info = ServerInfo::default();
        let frame = seal_server_info(&self.inner.key, &client.key, random_nonce(), &info);
        write_frame(wr, &frame).await?;
        wr.flush().await?;

        let writer = self.write_loop(wr, &client.queue);
        let reader = self.read_loop(
            reader,
            client.key,
            client.conn,
            client.mesh_peer,
            &client.queue,
        );
        tokio::select! {
            r = writer => r,
            r = reader => r,
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        key: NodePublicKey,
        conn: ConnId,
        mesh_peer: bool,
        queue: &Arc<ClientQueue>,
    ) -> Result<(), ConnError> {
        let counters = &self.inner.counters;
        loop {
            let frame = reader.read_frame().await?;
            match frame {
                Frame::SendPacket { dst, packet } => self.forward(key, dst, packet, false),
                Frame::ForwardPacket { src, dst, packet } => {
                    if !mesh_peer {
                        return Err(ConnError::NotPermitted(derp::FrameType::FORWARD_PACKET));
                    }
                    self.forward(src, dst, packet, true);
                }
                Frame::NotePreferred { preferred } => {
                    debug!(preferred, "note preferred");
                    self.registry().note_preferred(&key, conn, preferred);
                }
                Frame::Ping { data } => {
                    // At most one pong per ping; extra pongs beyond the control queue are
                    // dropped (Tailscale drops pings that come too fast).
                    if queue.push_control(Frame::Pong { data }) {
                        counters.pongs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Frame::ClosePeer { peer } => {
                    if !mesh_peer {
                        return Err(ConnError::NotPermitted(derp::FrameType::CLOSE_PEER));
                    }
                    if let Some((_, q)) = self.registry().get(&peer) {
                        info!(%peer, "closing peer on a mesh peer's request");
                        q.close(None);
                    }
                }
                Frame::WatchConns => {
                    if !mesh_peer {
                        return Err(ConnError::NotPermitted(derp::FrameType::WATCH_CONNS));
                    }
                    // Queued under the registry lock, so no later PeerGone can overtake them.
                    let mut registry = self.registry();
                    let present = registry.watch(&key).unwrap_or_default();
                    info!(clients = present.len(), "mesh peer watches connections");
                    for peer in present {
                        queue.push_control(present_frame(peer));
                    }
                }
                Frame::KeepAlive | Frame::Pong { .. } => {}
                other => trace!(frame_type = %other.frame_type(), "ignoring frame"),
            }
        }
    }

    /// Routes a packet; `via_mesh` when another server of the region forwarded it.
    fn forward(&self, src: NodePublicKey, dst: NodePublicKey, packet: Vec<u8>, via_mesh: bool) {
        let counters = &self.inner.counters;
        let disco = looks_like_disco(&packet);
        let len = packet.len() as u64;
        let now = tokio::time::Instant::now().into_std();
        let route = self.registry().route(&src, &dst, disco, via_mesh, now);
        match route {
            Route::Deliver(q) => match q.push_packet(src, packet, disco) {
                Pushed::Queued => {
                    counters.packets_relayed.fetch_add(1, Ordering::Relaxed);
                    counters.bytes_relayed.fetch_add(len, Ordering::Relaxed);
                }
                Pushed::DroppedOldest => {
                    counters.packets_relayed.fetch_add(1, Ordering::Relaxed);
                    counters.bytes_relayed.fetch_add(len, Ordering::Relaxed);
                    counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                    trace!(%dst, "queue full; dropped the oldest packet");
                }
                Pushed::Closed => {
                    counters.dropped_gone.fetch_add(1, Ordering::Relaxed);
                }
            },
            Route::Forward(link) => {
                let link = self
                    .inner
                    .mesh_links
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&link)
                    .cloned();
                let sent = link.is_some_and(|l| {
                    l.try_frame(Frame::ForwardPacket { src, dst, packet })
                        .is_ok()
                });
                let counter = if sent {
                    &counters.packets_forwarded
                } else {
                    &counters.dropped_mesh
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Route::NotHere { answer } => {
                counters
                    .dropped_unknown_dest
                    .fetch_add(1, Ordering::Relaxed);
                trace!(%dst, disco, "destination not here");
                if let Some(q) = answer
                    && q.push_control(Frame::PeerGone {
                        peer: dst,
                        reason: PeerGoneReason::NotHere,
                    })
                {
                    counters.peer_gone_not_here.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        queue: &ClientQueue,
    ) -> Result<(), ConnError> {
        let period = KEEPALIVE_INTERVAL + jitter(KEEPALIVE_JITTER);
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = self.inner.options.write_timeout;
        let mut buf = Vec::with_capacity(64 << 10);
        loop {
            let first = tokio::select! {
                next = queue.next() => next,
                _ = keepalive.tick() => Next::Frame(Frame::KeepAlive),
            };
            // Batch what is ready into one write.
            let mut next = Some(first);
            let mut close = None;
            while let Some(item) = next.take() {
                match item {
                    Next::Frame(frame) => frame.encode(&mut buf),
                    Next::Close(health) => {
                        close = Some(health);
                        break;
                    }
                }
                if buf.len() >= WRITE_BATCH {
                    break;
                }
                next = queue.try_next();
            }
            if let Some(Some(problem)) = &close {
                Frame::Health {
                    problem: problem.clone(),
                }
                .encode(&mut buf);
            }
            let write = async {
                wr.write_all(&buf).await?;
                wr.flush().await?;
                if close.is_some() {
                    wr.shutdown().await?;
                }
                Ok::<_, std::io::Error>(())
            };
            match timeout {
                Some(t) => tokio::time::timeout(t, write)
                    .await
                    .map_err(|_| ConnError::WriteTimeout)??,
                None => write.await?,
            }
            buf.clear();
            if close.is_some() {
                return Ok(());
            }
        }
    }
}

/// A client's place in the registry. Dropping it, when the connection ends or its task is
/// cancelled (shutdown), closes the client's queue, removes it from the registry and tells
/// `PeerGone(disconnected)` to the peers it sent to and to watching mesh peers.
struct Registration<'a> {
    relay: &'a Relay,
    key: NodePublicKey,
    conn: ConnId,
    mesh_peer: bool,
    queue: Arc<ClientQueue>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.queue.close(None);
        let counters = &self.relay.inner.counters;
        // Queued under the registry lock, so presence frames keep the registry's order.
        let mut registry = self.relay.registry();
        for peer in registry.unregister(&self.key, self.conn) {
            if peer.push_control(Frame::PeerGone {
                peer: self.key,
                reason: PeerGoneReason::Disconnected,
            }) {
                counters
                    .peer_gone_disconnected
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The `PeerPresent` frame announcing `peer` to a watching mesh peer.
fn present_frame(peer: NodePublicKey) -> Frame {
    Frame::PeerPresent {
        peer,
        endpoint: None,
        flags: PeerPresentFlags::REGULAR,
    }
}

/// 24 random bytes for a box nonce.
pub(crate) fn random_nonce() -> [u8; derp::NONCE_LEN] {
    let mut n = [0u8; derp::NONCE_LEN];
    fill_random(&mut n);
    n
}

fn fill_random(buf: &mut [u8]) {
    if let Err(e) = getrandom::getrandom(buf) {
        // The OS generator failing is unrecoverable for key material; nonces must not repeat.
        panic!("operating system random generator failed: {e}");
    }
}

/// A random duration in `[0, max)`.
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(u64::from_le_bytes(b) % nanos)
}

/// The server's limits on what a client sends, tighter than the codec's for some types (as
/// Tailscale's): `ClientInfo` up to 256 KiB, small control frames up to 1000 bytes.
fn client_frame_limit(frame_type: derp::FrameType) -> usize {
    match frame_type {
        derp::FrameType::CLIENT_INFO => derp::KEY_LEN + derp::NONCE_LEN + MAX_CLIENT_INFO_LEN,
        derp::FrameType::PING
        | derp::FrameType::PONG
        | derp::FrameType::NOTE_PREFERRED
        | derp::FrameType::KEEP_ALIVE
        | derp::FrameType::WATCH_CONNS
        | derp::FrameType::CLOSE_PEER => MAX_PING_LEN,
        other => other.max_payload_len(),
    }
}

/// Frames a connected client may send that the relay does not act on: unknown types and the
/// ones only servers send. They are discarded without buffering (as Tailscale's server
/// discards unknown frames), within the type's limit.
fn client_frame_skip(frame_type: derp::FrameType) -> bool {
    use derp::FrameType as T;
    !matches!(
        frame_type,
        T::SEND_PACKET
            | T::FORWARD_PACKET
            | T::NOTE_PREFERRED
            | T::PING
            | T::PONG
            | T::KEEP_ALIVE
            | T::CLOSE_PEER
            | T::WATCH_CONNS
    )
}

/// Resolves when `rx` says stop (or its sender is gone, which never happens while the relay
/// lives).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
