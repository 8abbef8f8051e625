//! [`Node`]: the sans-IO heart of a warren node. It holds the peers from the netmap, routes
//! packets from the TUN device to the right peer's WireGuard session, picks each peer's path
//! (direct UDP once disco has confirmed one, DERP otherwise), answers and sends disco pings,
//! and runs netcheck. The shell calls `handle_*` with input and the current time, then drains
//! `poll_transmit` (to the UDP socket or a DERP connection), `poll_tun` (to the device) and
//! `poll_event`, and re-arms one timer from `poll_timeout`. Every packet decrypted from a
//! peer passes the packet [`Filter`] (allow-all until [`Node::set_filter`]) before it reaches
//! `poll_tun`; packets from the TUN device record their flows so replies pass.
//!
//! The data path has a second, allocation-free form for the shell's batches:
//! [`Node::encapsulate`] encrypts into a buffer the caller owns (the tail of a UDP GSO batch)
//! and says where the datagram goes, and [`Node::decapsulate_udp`] /
//! [`Node::decapsulate_derp`] decrypt into the caller's buffer (a slot of a TUN GRO batch).
//! Only what is not plain data on a settled path (handshakes, disco, a datagram sent two ways
//! while a path is being tried) goes through the queues.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use warren_proto::disco::{self, DiscoError, Message};
use warren_proto::{DiscoPublicKey, DiscoSecretKey, NodePublicKey, NodeSecretKey, stun};

use crate::dns::{self, DnsForward, DnsSettings, DnsStats, Resolver};
use crate::filter::{DropReason, Filter, FlowTable, Verdict};
use crate::ip::{self, IpError};
use crate::netcheck::{self, Netcheck, RegionId, Report, StunServer};
use crate::path::{Paths, PingOut, Route, TxId};
use crate::routing::RouteTable;
use crate::wg::{self, Receiver, Session, SessionStats, WgError, WgOutput};

/// How often WireGuard's timers (retransmits, keepalives, rekeys) run.
pub const TIMER_INTERVAL: Duration = Duration::from_millis(250);
/// How often netcheck runs (below the ~30 s NAT mapping lifetime, like Tailscale's 27 s).
pub const NETCHECK_INTERVAL: Duration = Duration::from_secs(20);
/// A `warren ping` without a pong after this long is forgotten.
pub const USER_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest datagram or packet the node handles.
const MAX_PACKET: usize = 65_535;

/// A peer as the netmap describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node key; the identity of the WireGuard session.
    pub key: NodePublicKey,
    /// Its MagicDNS name, for status output.
    pub name: String,
    /// Its own mesh addresses (a /32 and a /128).
    pub allowed_ips: Vec<IpNet>,
    /// Subnet routes it is the primary router for (and this node may use): they join its
    /// allowed IPs when this node accepts routes ([`Node::set_accept_routes`]).
    pub routes: Vec<IpNet>,
    /// It is an exit node this node may use: 0.0.0.0/0 and ::/0 join its allowed IPs when
    /// this node selects it ([`Node::set_exit_node`]).
    pub exit_node: bool,
    /// Where it can be reached, as it reported.
    pub endpoints: Vec<SocketAddr>,
    /// Its disco key; without one, no path discovery (direct UDP to its endpoints only).
    pub disco: Option<DiscoPublicKey>,
    /// The DERP region it can be reached through; 0 for none.
    pub home_region: RegionId,
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dest {
    /// Directly, over the node's UDP socket.
    Udp(SocketAddr),
    /// Through a DERP region's relay, to a peer.
    Derp {
        /// The region.
        region: RegionId,
        /// The receiving peer.
        peer: NodePublicKey,
    },
}

/// A datagram for the UDP socket or a DERP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dst: Dest,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// A WireGuard datagram [`Node::encapsulate`] wrote at the start of the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Where to send it.
    pub dst: Dest,
    /// Its length: the datagram is `out[..len]`.
    pub len: usize,
}

/// The room [`Node::encapsulate`] needs in its output buffer for an IP packet of `len` bytes.
pub fn encapsulated_len(len: usize) -> usize {
    (len + wg::OVERHEAD).max(wg::MIN_SCRATCH)
}

/// The room [`Node::decapsulate_udp`] and [`Node::decapsulate_derp`] need in their output
/// buffer for a datagram of `len` bytes (a handshake answer is written there too).
pub fn decapsulated_len(len: usize) -> usize {
    len.max(wg::MIN_SCRATCH)
}

/// The path a peer's traffic takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A direct UDP path confirmed by disco.
    Direct(SocketAddr),
    /// The peer's DERP region.
    Relay(RegionId),
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(a) => write!(f, "direct {a}"),
            Self::Relay(r) => write!(f, "relay {r}"),
        }
    }
}

/// How a peer's traffic travels now, for `warren status`. Unlike [`PathKind`] it tells a
/// confirmed direct path from an address that is only being tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStatus {
    /// Packets go only to `addr`, which answered a disco ping within the trust window
    /// ([`crate::path::TRUST`]).
    Direct {
        /// The peer's address.
        addr: SocketAddr,
        /// The round trip of the last disco ping answered there.
        latency: Duration,
    },
    /// Nothing is confirmed: packets go directly to `candidates` on the chance that they
    /// arrive (data to the first, WireGuard handshakes to all), and through DERP region
    /// `relay` as well when the peer has one.
    Trying {
        /// The unconfirmed addresses packets are sent to, the one data goes to first.
        candidates: Vec<SocketAddr>,
        /// The DERP region that carries the traffic meanwhile, if any.
        relay: Option<RegionId>,
    },
    /// Packets go only through DERP region `region` (discovery pings still look for a
    /// direct path).
    Relay {
        /// The peer's home region.
        region: RegionId,
    },
    /// The peer has neither an address nor a DERP region: its packets are dropped.
    Unreachable,
}

impl PathStatus {
    /// Whether traffic goes over a confirmed direct path.
    pub fn is_direct(&self) -> bool {
        matches!(self, Self::Direct { .. })
    }

    /// The confirmed direct path's round trip.
    pub fn latency(&self) -> Option<Duration> {
        match self {
            Self::Direct { latency, .. } => Some(*latency),
            _ => None,
        }
    }

    /// The DERP region traffic goes through, alone or beside unconfirmed addresses.
    pub fn relay(&self) -> Option<RegionId> {
        match self {
            Self::Relay { region }
            | Self::Trying {
                relay: Some(region),
                ..
            } => Some(*region),
            _ => None,
        }
    }

    /// The relay (and only that) or confirmed direct path in use, as a [`PathKind`]; `None`
    /// while only unconfirmed addresses are tried without a relay, or nothing is.
    pub fn kind(&self) -> Option<PathKind> {
        match self {
            Self::Direct { addr, .. } => Some(PathKind::Direct(*addr)),
            Self::Trying {
                relay: Some(region),
                ..
            }
            | Self::Relay { region } => Some(PathKind::Relay(*region)),
            Self::Trying { relay: None, .. } | Self::Unreachable => None,
        }
    }
}

/// `direct 192.0.2.1:41641`, `trying 192.0.2.1:41641 + relay 900`,
/// `trying 10.0.0.2:41641, 192.0.2.1:41641`, `relay 900`, `unreachable`.
impl fmt::Display for PathStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct { addr, .. } => write!(f, "direct {addr}"),
            Self::Trying { candidates, relay } => {
                f.write_str("trying ")?;
                for (i, a) in candidates.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                match relay {
                    Some(r) => write!(f, " + relay {r}"),
                    None => Ok(()),
                }
            }
            Self::Relay { region } => write!(f, "relay {region}"),
            Self::Unreachable => f.write_str("unreachable"),
        }
    }
}

/// Something the shell should know about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The first answer to [`Node::ping`] `id` (later ones, from other paths, are dropped).
    Pong {
        /// The ping it answers.
        id: PingId,
        /// The peer that answered.
        peer: NodePublicKey,
        /// The path the answer came by.
        path: PathKind,
        /// Round trip.
        rtt: Duration,
    },
    /// [`Node::ping`] `id` got no answer within [`USER_PING_TIMEOUT`].
    PingTimeout {
        /// The ping.
        id: PingId,
    },
    /// A netcheck finished.
    Netcheck(Report),
    /// This node's endpoints changed: report them to control.
    Endpoints(Vec<SocketAddr>),
    /// This node's home DERP region changed: report it and mark that connection preferred.
    HomeRegion(RegionId),
}

/// What the deadline from [`Node::poll_timeout`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutReason {
    /// WireGuard's session timers.
    WireGuardTimers,
    /// Disco heartbeats and ping expiry.
    Disco,
    /// Netcheck retransmits or the next check.
    Netcheck,
    /// A forwarded DNS query's retry or deadline.
    Dns,
}

/// Why an input was dropped. Only that input is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The packet from the TUN device had no readable IP header.
    #[error("bad packet from the TUN device: {0}")]
    Ip(#[from] IpError),
    /// No peer's allowed IPs contain the destination.
    #[error("no peer for {dst}")]
    NoRoute {
        /// The destination address.
        dst: IpAddr,
    },
    /// The peer has no endpoint and no DERP region to send to.
    #[error("peer {peer} has no path")]
    NoPath {
        /// The peer.
        peer: NodePublicKey,
    },
    /// A WireGuard datagram for a session or from a key we do not know.
    #[error("datagram from {from} for no known peer")]
    UnknownPeer {
        /// Where it came from.
        from: SocketAddr,
    },
    /// WireGuard refused the input.
    #[error("WireGuard: {error} (peer {peer:?})")]
    Wg {
        /// The peer concerned, when known.
        peer: Option<NodePublicKey>,
        /// What WireGuard said.
        error: WgError,
    },
    /// The packet filter dropped a packet from a peer (counted in
    /// [`PeerStats::filter_drops`]).
    #[error("packet from {peer} dropped by the filter: {reason}")]
    Filtered {
        /// The peer.
        peer: NodePublicKey,
        /// Why.
        reason: DropReason,
    },
    /// A peer sent a packet from an address it may not use.
    #[error("peer {peer} may not send from {src}")]
    SourceNotAllowed {
        /// The peer.
        peer: NodePublicKey,
        /// The inner source address.
        src: IpAddr,
    },
    /// A disco packet that did not open or parse.
    #[error("disco: {0}")]
    Disco(#[from] DiscoError),
    /// A disco packet from a disco key no peer has.
    #[error("disco packet from unknown key {key}")]
    UnknownDiscoKey {
        /// The sender's claimed disco key.
        key: DiscoPublicKey,
    },
    /// A netcheck was asked for, but the DERP map names no STUN server with an address.
    #[error("no STUN servers to check against (none in the DERP map, or none resolved)")]
    NoStunServers,
    /// A packet relayed by DERP from one node that belongs to another.
    #[error("DERP packet from {relayed_by} claims to be from {claimed}")]
    DerpSenderMismatch {
        /// The node DERP says sent it.
        relayed_by: NodePublicKey,
        /// The node the packet itself belongs to.
        claimed: NodePublicKey,
    },
    /// A STUN packet that no netcheck asked for.
    #[error("unexpected STUN packet from {from}")]
    StrayStun {
        /// Where it came from.
        from: SocketAddr,
    },
    /// [`Node::ping`] of a peer that is unknown or has no disco key.
    #[error("peer {peer} cannot be pinged")]
    NotPingable {
        /// The peer.
        peer: NodePublicKey,
    },
}

/// Per-peer figures for `warren status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    /// The peer's key.
    pub key: NodePublicKey,
    /// The peer's name.
    pub name: String,
    /// The peer's addresses.
    pub allowed_ips: Vec<IpNet>,
    /// The subnet routes it serves for this node (see [`PeerConfig::routes`]).
    pub routes: Vec<IpNet>,
    /// It is an exit node this node may use.
    pub exit_node: bool,
    /// How its traffic travels now (what status should show).
    pub status: PathStatus,
    /// Session counters.
    pub session: SessionStats,
    /// Packets from this peer the packet filter dropped.
    pub filter_drops: u64,
}

#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    index: u32,
    session: Session,
    paths: Paths,
    filter_drops: u64,
}

/// Where an incoming packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Udp(SocketAddr),
    Derp {
        region: RegionId,
        from: NodePublicKey,
    },
}

impl Source {
    fn reply_to(self) -> Dest {
        match self {
            Self::Udp(a) => Dest::Udp(a),
            Self::Derp { region, from } => Dest::Derp { region, peer: from },
        }
    }
}

/// Tailscale's stand-in address for "via DERP region N" in pongs.
fn derp_magic_addr(region: RegionId) -> SocketAddr {
    SocketAddr::new(
        Ipv4Addr::new(127, 3, 3, 40).into(),
        u16::try_from(region).unwrap_or(0),
    )
}

/// splitmix64: a small seeded generator for transaction ids and nonces. Nonces only need to be
/// unique, and a seed from the OS makes them unpredictable as well.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn tx_id(&mut self) -> TxId {
        let mut t = [0u8; 12];
        self.fill(&mut t);
        t
    }

    fn nonce(&mut self) -> [u8; 24] {
        let mut n = [0u8; 24];
        self.fill(&mut n);
        n
    }
}

/// Names one [`Node::ping`] call (it may send several disco pings, one per candidate path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PingId(pub u64);

#[derive(Debug, Clone, Copy)]
struct UserPing {
    id: PingId,
    peer: NodePublicKey,
    sent: Instant,
}

/// Whether a WireGuard datagram is a handshake message (initiation, response or cookie
/// reply: types 1 to 3, then three zero bytes) rather than data.
fn is_wg_handshake(datagram: &[u8]) -> bool {
    matches!(datagram, [1..=3, 0, 0, 0, ..])
}

/// Queues a WireGuard datagram for `peer` on its current route.
fn route_datagram(
    peer: &Peer,
    datagram: &[u8],
    now: Instant,
    out: &mut VecDeque<Transmit>,
) -> bool {
    let relay = peer.config.home_region;
    let push = |out: &mut VecDeque<Transmit>, dst| {
        out.push_back(Transmit {
            dst,
            payload: datagram.to_vec(),
        })
    };
    match peer.paths.route(now, relay != 0) {
        Route::Direct(a) => push(out, Dest::Udp(a)),
        Route::Relay { also_direct } => {
            push(
                out,
                Dest::Derp {
                    region: relay,
                    peer: peer.config.key,
                },
            );
            if let Some(a) = also_direct {
                push(out, Dest::Udp(a));
            }
        }
        Route::Spray(addrs) => {
            // Nothing confirmed and no relay: WireGuard handshake messages (initiation,
            // response, cookie) try every address, as a lost one costs boringtun's 5 s
            // REKEY_TIMEOUT; data goes to the first (where the peer was last heard from).
            let take = if is_wg_handshake(datagram) {
                addrs.len()
            } else {
                1
            };
            if addrs.is_empty() {
                return false;
            }
            for a in addrs.into_iter().take(take) {
                push(out, Dest::Udp(a));
            }
        }
    }
    true
}

/// Where a data datagram for `peer` goes when it takes one way only; `None` while it must go
/// two ways or to several addresses (a path being tried), which the queue handles.
fn single_route(peer: &Peer, now: Instant) -> Option<Dest> {
    let relay = peer.config.home_region;
    match peer.paths.route(now, relay != 0) {
        Route::Direct(a) => Some(Dest::Udp(a)),
        Route::Relay { also_direct: None } => Some(Dest::Derp {
            region: relay,
            peer: peer.config.key,
        }),
        Route::Relay { .. } | Route::Spray(_) => None,
    }
}

/// What this node accepts packets for from its peers: its own addresses, the subnet routes it
/// serves, and, as an exit node, every address but those of its own LAN (Tailscale: to expose
/// the LAN through an exit node, advertise it as a route). The kernel forwards what is not the
/// node's own; this is what keeps a peer from using the node as a router it was not made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNets {
    /// The node's mesh addresses.
    pub addresses: Vec<IpNet>,
    /// Subnet routes it serves (advertised and approved).
    pub routes: Vec<IpNet>,
    /// It is an approved exit node.
    pub exit: bool,
    /// Its LAN prefixes, which exit traffic may not reach (unless a served route holds them).
    pub lan: Vec<IpNet>,
}

impl LocalNets {
    /// Whether a packet for `dst` is this node's to take.
    pub fn contains(&self, dst: IpAddr) -> bool {
        self.addresses.iter().any(|n| n.contains(&dst))
            || self.routes.iter().any(|n| n.contains(&dst))
            || (self.exit && !self.lan.iter().any(|n| n.contains(&dst)))
    }
}

/// A node's peers, sessions, paths and routes.
#[derive(Debug)]
pub struct Node {
    secret: NodeSecretKey,
    disco: DiscoSecretKey,
    rng: Rng,
    peers: BTreeMap<NodePublicKey, Peer>,
    by_index: BTreeMap<u32, NodePublicKey>,
    by_disco: BTreeMap<DiscoPublicKey, NodePublicKey>,
    routes: RouteTable,
    next_index: u32,
    transmits: VecDeque<Transmit>,
    to_tun: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
    /// The output buffer of the queueing forms (`handle_tun_packet`, `handle_udp`,
    /// `handle_derp`), apart from `scratch`, which what they call may use.
    io_buf: Vec<u8>,
    next_timers: Instant,
    now: Instant,
    stun_servers: Vec<StunServer>,
    netcheck: Option<Netcheck>,
    next_netcheck: Option<Instant>,
    last_report: Option<Report>,
    home: Option<RegionId>,
    lan_endpoints: Vec<SocketAddr>,
    endpoints: Vec<SocketAddr>,
    user_pings: BTreeMap<TxId, UserPing>,
    next_ping_id: u64,
    filter: Filter,
    flows: FlowTable,
    /// Empty until the shell knows the node's addresses: then everything is accepted.
    local: LocalNets,
    accept_routes: bool,
    exit_node: Option<NodePublicKey>,
    dns: Resolver,
}

impl Node {
    /// A node with no peers yet. `seed` should come from the OS's random generator.
    pub fn new(secret: NodeSecretKey, disco: DiscoSecretKey, seed: u64, now: Instant) -> Self {
        Self {
            secret,
            disco,
            rng: Rng(seed),
            peers: BTreeMap::new(),
            by_index: BTreeMap::new(),
            by_disco: BTreeMap::new(),
            routes: RouteTable::default(),
            next_index: 1,
            transmits: VecDeque::new(),
            to_tun: VecDeque::new(),
            events: VecDeque::new(),
            scratch: vec![0; MAX_PACKET + wg::OVERHEAD + wg::MIN_SCRATCH],
            io_buf: vec![0; MAX_PACKET + wg::OVERHEAD + wg::MIN_SCRATCH],
            next_timers: now + TIMER_INTERVAL,
            now,
            stun_servers: Vec::new(),
            netcheck: None,
            next_netcheck: None,
            last_report: None,
            home: None,
            lan_endpoints: Vec::new(),
            endpoints: Vec::new(),
            user_pings: BTreeMap::new(),
            next_ping_id: 1,
            filter: Filter::allow_all(),
            flows: FlowTable::new(),
            local: LocalNets::default(),
            accept_routes: true,
            exit_node: None,
            dns: Resolver::with_seed(seed.rotate_left(32) ^ 0x444e_535f_7365_6564),
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> NodePublicKey {
        self.secret.public_key()
    }

    /// This node's disco public key.
    pub fn disco_public_key(&self) -> DiscoPublicKey {
        self.disco.public_key()
    }

    /// This node's home DERP region, once netcheck chose one.
    pub fn home_region(&self) -> Option<RegionId> {
        self.home
    }

    /// The endpoints this node advertises (LAN plus what netcheck found).
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    /// The last finished netcheck.
    pub fn last_report(&self) -> Option<&Report> {
        self.last_report.as_ref()
    }

    /// Replaces the packet filter for traffic from peers; true when it differs from the one in
    /// force. The flows this node started are kept, so their replies still pass the new filter.
    pub fn set_filter(&mut self, filter: Filter) -> bool {
        let changed = filter != self.filter;
        self.filter = filter;
        changed
    }

    /// The packet filter in force.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The names and upstreams the resolver at 100.100.100.100 answers from.
    pub fn set_dns(&mut self, settings: DnsSettings) {
        if *self.dns.settings() != settings {
            self.dns.set_settings(settings);
        }
    }

    /// What the resolver has done so far.
    pub fn dns_stats(&self) -> DnsStats {
        self.dns.stats()
    }

    /// The next DNS query to send to an upstream resolver (from a socket that bypasses the
    /// tunnel's routes); its answer goes to [`Self::handle_dns_upstream`].
    pub fn poll_dns_forward(&mut self) -> Option<DnsForward> {
        self.dns.poll_forward()
    }

    /// A datagram from an upstream resolver.
    pub fn handle_dns_upstream(&mut self, from: SocketAddr, payload: &[u8], now: Instant) {
        self.now = now;
        self.dns.handle_upstream(from, payload, now);
        self.drain_dns();
    }

    /// Answers for apps go out of the TUN device as UDP from the magic address.
    fn drain_dns(&mut self) {
        while let Some(a) = self.dns.poll_answer() {
            let packet = dns::udp_packet(a.server, a.client, &a.payload);
            // Empty: the addresses' families differ or the answer is too big for one packet.
            if !packet.is_empty() {
                self.to_tun.push_back(packet);
            }
        }
    }

    /// What this node accepts packets for ([`LocalNets`]); checked before the filter, also
    /// when there is no policy.
    pub fn set_local(&mut self, local: LocalNets) {
        self.local = local;
    }

    /// Whether peers' subnet routes join their allowed IPs (Tailscale's `--accept-routes`).
    pub fn set_accept_routes(&mut self, accept: bool) {
        if self.accept_routes != accept {
            self.accept_routes = accept;
            let keys: Vec<_> = self.peers.keys().copied().collect();
            for k in keys {
                self.reroute(&k);
            }
        }
    }

    /// The exit node that gets traffic for addresses no peer claims; `None` for none. A
    /// selected node that is not (or no longer) an exit node this node may use gets nothing:
    /// the OS still sends internet traffic into the tunnel ([`Self::os_routes`]), where it is
    /// dropped rather than leaked around the tunnel.
    pub fn set_exit_node(&mut self, exit: Option<NodePublicKey>) {
        let old = std::mem::replace(&mut self.exit_node, exit);
        if old != exit {
            for k in [old, exit].into_iter().flatten() {
                self.reroute(&k);
            }
        }
    }

    /// The exit node selected with [`Self::set_exit_node`].
    pub fn exit_node(&self) -> Option<NodePublicKey> {
        self.exit_node
    }

    /// The prefixes the OS should route into the tunnel besides the mesh's own: peers' subnet
    /// routes (when accepted), and 0.0.0.0/0 and ::/0 while an exit node is selected. Sorted.
    pub fn os_routes(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = if self.accept_routes {
            self.peers
                .values()
                .flat_map(|p| p.config.routes.iter().map(IpNet::trunc))
                .filter(|n| n.prefix_len() > 0)
                .collect()
        } else {
            Vec::new()
        };
        if self.exit_node.is_some() {
            out.extend(default_routes());
        }
        out.sort();
        out.dedup();
        out
    }

    /// The allowed IPs `config`'s peer gets: its addresses, its routes when accepted, and
    /// the default routes when it is the selected exit node and may be used as one.
    fn allowed_ips(&self, config: &PeerConfig) -> Vec<IpNet> {
        let mut out = config.allowed_ips.clone();
        if self.accept_routes {
            out.extend(config.routes.iter().filter(|n| n.prefix_len() > 0));
        }
        if config.exit_node && self.exit_node == Some(config.key) {
            out.extend(default_routes());
        }
        out
    }

    fn reroute(&mut self, key: &NodePublicKey) {
        if let Some(p) = self.peers.get(key) {
            let allowed = self.allowed_ips(&p.config);
            self.routes.set(*key, &allowed);
        }
    }

    /// Replaces the whole peer set with a full netmap's; known peers keep their sessions.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>) {
        let keep: BTreeSet<_> = peers.iter().map(|p| p.key).collect();
        let gone: Vec<_> = self
            .peers
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_peer(&key);
        }
        for p in peers {
            self.upsert_peer(p);
        }
    }

    /// Adds a peer, or updates it keeping its session and learned paths.
    pub fn upsert_peer(&mut self, config: PeerConfig) {
        if config.key == self.public_key() {
            return;
        }
        let allowed = self.allowed_ips(&config);
        self.routes.set(config.key, &allowed);
        let disco = config.disco;
        let key = config.key;
        if let Some(peer) = self.peers.get_mut(&config.key) {
            if let Some(old) = peer.config.disco {
                self.by_disco.remove(&old);
            }
            peer.paths.set_reported(&config.endpoints, self.now);
            if peer.config.home_region != config.home_region {
                // A relay path appeared or moved: CallMeMaybe can go out now.
                peer.paths.rediscover();
            }
            peer.config = config;
        } else {
            let index = self.allocate_index();
            let session = Session::new(&self.secret, &config.key, index);
            self.by_index.insert(index, config.key);
            tracing::debug!(peer = %config.key.short(), name = %config.name, "peer added");
            let mut paths = Paths::default();
            paths.set_reported(&config.endpoints, self.now);
            self.peers.insert(
                config.key,
                Peer {
                    config,
                    index,
                    session,
                    paths,
                    filter_drops: 0,
                },
            );
        }
        if let Some(d) = disco {
            self.by_disco.insert(d, key);
        }
    }

    /// Forgets a peer: its session, routes, paths and queued traffic.
    pub fn remove_peer(&mut self, key: &NodePublicKey) {
        if let Some(peer) = self.peers.remove(key) {
            self.by_index.remove(&peer.index);
            if let Some(d) = peer.config.disco {
                self.by_disco.remove(&d);
            }
            self.routes.remove(key);
            tracing::debug!(peer = %key.short(), "peer removed");
        }
    }

    /// Replaces a peer's reported endpoints.
    pub fn set_endpoints(&mut self, key: &NodePublicKey, endpoints: Vec<SocketAddr>) {
        if let Some(peer) = self.peers.get_mut(key) {
            peer.paths.set_reported(&endpoints, self.now);
            peer.config.endpoints = endpoints;
        }
    }

    /// The addresses of this node's own interfaces with its UDP port (LAN candidates).
    pub fn set_lan_endpoints(&mut self, lan: Vec<SocketAddr>) {
        self.lan_endpoints = lan;
        self.refresh_endpoints();
    }

    /// The DERP regions' STUN servers; netcheck runs against them now and every 20 s.
    pub fn set_stun_servers(&mut self, servers: Vec<StunServer>, now: Instant) {
        self.now = now;
        self.next_netcheck = (!servers.is_empty()).then_some(now);
        // Until netcheck has measured, the first region is home, so peers can relay to this
        // node (and it can send CallMeMaybe) from the first packet, not seconds later.
        let known = |r: RegionId| servers.iter().any(|s| s.region == r);
        if self.home.is_none_or(|h| !known(h))
            && let Some(first) = servers.iter().map(|s| s.region).min()
        {
            self.home = Some(first);
            self.events.push_back(Event::HomeRegion(first));
        }
        self.stun_servers = servers;
    }

    fn refresh_endpoints(&mut self) {
        let mut eps = self.lan_endpoints.clone();
        if let Some(g) = self.last_report.as_ref().and_then(|r| r.global)
            && !eps.contains(&g)
        {
            eps.push(g);
        }
        if eps != self.endpoints {
            self.endpoints = eps.clone();
            self.events.push_back(Event::Endpoints(eps));
        }
    }

    fn allocate_index(&mut self) -> u32 {
        loop {
            let i = self.next_index;
            self.next_index = if i >= wg::MAX_INDEX { 1 } else { i + 1 };
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// An IP packet read from the TUN device: encrypt it for the peer that owns its destination
    /// and queue the datagram for [`Self::poll_transmit`]. The shell's batched path uses
    /// [`Self::encapsulate`] instead; this form serves tests and the simulator.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) -> Result<(), NodeError> {
        let mut scratch = std::mem::take(&mut self.io_buf);
        let r = self.encapsulate(packet, now, &mut scratch);
        if let Ok(Some(d)) = &r {
            self.transmits.push_back(Transmit {
                dst: d.dst,
                payload: scratch[..d.len].to_vec(),
            });
        }
        self.io_buf = scratch;
        r.map(|_| ())
    }

    /// Encrypts an IP packet read from the TUN device for the peer that owns its destination,
    /// into `out` (at least [`encapsulated_len`] of the packet). `Some` is a data datagram in
    /// `out[..len]` for one destination: the caller sends it. `None`: nothing for the caller,
    /// as the packet was answered here (MagicDNS) or what it caused (a handshake initiation, a
    /// datagram sent two ways while a path is tried) was queued for [`Self::poll_transmit`].
    /// Allocates nothing once the peer's path is settled.
    pub fn encapsulate(
        &mut self,
        packet: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<Datagram>, NodeError> {
        self.now = now;
        // MagicDNS: queries to 100.100.100.100:53 are answered here, never sent to a peer.
        if let Some((client, server, query)) = dns::parse_dns_packet(packet) {
            self.dns.handle_query(client, server, query, now);
            self.drain_dns();
            return Ok(None);
        }
        if out.len() < encapsulated_len(packet.len()) {
            return Err(NodeError::Wg {
                peer: None,
                error: WgError::BufferTooSmall,
            });
        }
        let dst = ip::addresses(packet)?.dst;
        let key = self.routes.lookup(dst).ok_or(NodeError::NoRoute { dst })?;
        let Self {
            peers,
            transmits,
            flows,
            ..
        } = self;
        let peer = peers.get_mut(&key).ok_or(NodeError::NoRoute { dst })?;
        flows.note_outbound(packet, now);
        peer.paths.note_sent(now);
        // At most one datagram per packet, at the start of `out` (see `WgOutput`): the data,
        // or an initiation when the packet waits for a session.
        let mut written = None;
        peer.session
            .encapsulate(packet, out, &mut |o| {
                if let WgOutput::Network(d) = o {
                    written = Some(d.len());
                }
            })
            .map_err(|error| NodeError::Wg {
                peer: Some(key),
                error,
            })?;
        let mut result = Ok(None);
        if let Some(len) = written {
            let datagram = &out[..len];
            match single_route(peer, now).filter(|_| !is_wg_handshake(datagram)) {
                Some(dst) => result = Ok(Some(Datagram { dst, len })),
                None => {
                    if !route_datagram(peer, datagram, now, transmits) {
                        result = Err(NodeError::NoPath { peer: key });
                    }
                }
            }
        }
        self.maybe_discover(&key, now);
        result
    }

    /// A datagram read from the UDP socket: disco, a STUN answer, or WireGuard. A decrypted
    /// packet goes to [`Self::poll_tun`]; the shell's batched path uses
    /// [`Self::decapsulate_udp`] instead.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<(), NodeError> {
        self.queue_for_tun(|node, buf| node.decapsulate_udp(from, datagram, now, buf))
    }

    /// A datagram read from the UDP socket: disco, a STUN answer, or WireGuard. `Some(n)`: a
    /// decrypted packet that passed the filter is in `out[..n]`, for the TUN device. `out`
    /// needs [`decapsulated_len`] of the datagram. Allocates nothing for data on an
    /// established session.
    pub fn decapsulate_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, NodeError> {
        self.now = now;
        if disco::looks_like_disco(datagram) {
            return self
                .handle_disco(Source::Udp(from), datagram, now)
                .map(|()| None);
        }
        if stun::is_stun(datagram) {
            let ours = self
                .netcheck
                .as_mut()
                .is_some_and(|nc| nc.handle_response(from, datagram, now));
            return if ours {
                Ok(None)
            } else {
                Err(NodeError::StrayStun { from })
            };
        }
        let Some(key) = self.wg_receiver(datagram)? else {
            let sender = self
                .peers
                .values()
                .find(|p| p.paths.candidates().any(|a| a == from))
                .map(|p| p.config.key);
            if let Some(k) = sender {
                self.rehandshake_on_stale_data(k, datagram, now);
            }
            return Err(NodeError::UnknownPeer { from });
        };
        let r = self.decapsulate(key, Some(from), datagram, now, out);
        self.mend_lost_session(key, datagram, &r, now);
        r
    }

    /// A packet relayed by DERP region `region` from peer `from`: disco or WireGuard. A
    /// decrypted packet goes to [`Self::poll_tun`]; see [`Self::decapsulate_derp`].
    pub fn handle_derp(
        &mut self,
        region: RegionId,
        from: NodePublicKey,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), NodeError> {
        self.queue_for_tun(|node, buf| node.decapsulate_derp(region, from, packet, now, buf))
    }

    /// A packet relayed by DERP region `region` from peer `from`: disco or WireGuard, as
    /// [`Self::decapsulate_udp`].
    pub fn decapsulate_derp(
        &mut self,
        region: RegionId,
        from: NodePublicKey,
        packet: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, NodeError> {
        self.now = now;
        if disco::looks_like_disco(packet) {
            return self
                .handle_disco(Source::Derp { region, from }, packet, now)
                .map(|()| None);
        }
        let Some(key) = self.wg_receiver(packet)? else {
            if self.peers.contains_key(&from) {
                self.rehandshake_on_stale_data(from, packet, now);
            }
            return Err(NodeError::UnknownPeer {
                from: derp_magic_addr(region),
            });
        };
        if key != from {
            return Err(NodeError::DerpSenderMismatch {
                relayed_by: from,
                claimed: key,
            });
        }
        let r = self.decapsulate(key, None, packet, now, out);
        self.mend_lost_session(key, packet, &r, now);
        r
    }

    /// Runs a decapsulation into the queueing forms' buffer and queues its packet for
    /// [`Self::poll_tun`].
    fn queue_for_tun(
        &mut self,
        decapsulate: impl FnOnce(&mut Self, &mut [u8]) -> Result<Option<usize>, NodeError>,
    ) -> Result<(), NodeError> {
        let mut buf = std::mem::take(&mut self.io_buf);
        let r = decapsulate(self, &mut buf);
        if let Ok(Some(n)) = &r {
            self.to_tun.push_back(buf[..*n].to_vec());
        }
        self.io_buf = buf;
        r.map(|_| ())
    }

    /// Data for an index this node reuses since a restart, but for which it has no keys.
    fn mend_lost_session(
        &mut self,
        key: NodePublicKey,
        datagram: &[u8],
        r: &Result<Option<usize>, NodeError>,
        now: Instant,
    ) {
        let lost = matches!(
            r,
            Err(NodeError::Wg {
                error: WgError::NoSession | WgError::UnknownIndex | WgError::Expired,
                ..
            })
        );
        if lost {
            self.rehandshake_on_stale_data(key, datagram, now);
        }
    }

    /// WireGuard data for a session this node does not have, from `key`: this node restarted
    /// since their last handshake (its sessions died with the old process) and the peer still
    /// sends on the old one. Its own rekey would take 15 s (keepalive + rekey timeout); a
    /// handshake from here mends the path in one round trip. At most one initiation per rekey
    /// timeout goes out, so a flood of such packets costs nothing.
    fn rehandshake_on_stale_data(&mut self, key: NodePublicKey, datagram: &[u8], now: Instant) {
        if datagram.first() != Some(&4) {
            return;
        }
        let Self {
            peers,
            scratch,
            transmits,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&key) else {
            return;
        };
        let mut out = Vec::new();
        let started = peer.session.initiate(scratch, &mut |o| {
            if let WgOutput::Network(d) = o {
                out.push(d.to_vec());
            }
        });
        if started.is_ok() && !out.is_empty() {
            tracing::debug!(peer = %key.short(), "data for a session we lost: new handshake");
        }
        for d in &out {
            route_datagram(peer, d, now, transmits);
        }
    }

    fn wg_receiver(&self, datagram: &[u8]) -> Result<Option<NodePublicKey>, NodeError> {
        Ok(
            match wg::receiver(&self.secret, datagram)
                .map_err(|error| NodeError::Wg { peer: None, error })?
            {
                Receiver::Initiator(key) => self.peers.contains_key(&key).then_some(key),
                Receiver::Index(i) => self.by_index.get(&i).copied(),
            },
        )
    }

    /// Hands a datagram to `key`'s session; `from` is its UDP source (`None`: via DERP).
    /// A packet for the TUN device is left in `out[..n]`.
    fn decapsulate(
        &mut self,
        key: NodePublicKey,
        from: Option<SocketAddr>,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, NodeError> {
        let Self {
            peers,
            transmits,
            routes,
            filter,
            flows,
            local,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&key) else {
            return Ok(None);
        };
        let mut refused = None;
        let mut filtered = None;
        let mut drops = 0;
        let mut replies = Vec::new();
        let mut accepted = None;
        peer.session
            .decapsulate(from.map(|a| a.ip()), datagram, out, &mut |o| match o {
                WgOutput::Network(d) => replies.push(d.to_vec()),
                WgOutput::Tunnel(p, src) => {
                    if !routes.allows(&key, src) {
                        refused = Some(src);
                        return;
                    }
                    let not_local = !local.addresses.is_empty()
                        && ip::addresses(p).is_ok_and(|a| !local.contains(a.dst));
                    if not_local {
                        filtered = Some(DropReason::NotLocal);
                        drops += 1;
                        return;
                    }
                    match filter.check(p, flows, now) {
                        Verdict::Accept(_) => accepted = Some(p.len()),
                        Verdict::Drop(reason) => {
                            tracing::trace!(peer = %key.short(), %reason, "filter: dropped");
                            filtered = Some(reason);
                            drops += 1;
                        }
                    }
                }
            })
            .map_err(|error| NodeError::Wg {
                peer: Some(key),
                error,
            })?;
        // Only what proves the peer's key moves where answers go: data that decrypted, a
        // handshake response, or an initiation we answered with a response. A cookie reply
        // (boringtun under load) answers anyone who knows our public key.
        let authenticated = match datagram.first() {
            Some(2 | 4) => true,
            Some(1) => replies.iter().any(|r| r.first() == Some(&2)),
            _ => false,
        };
        if let Some(a) = from.filter(|_| authenticated) {
            peer.paths.note_wg_from(a, now);
        }
        peer.filter_drops += drops;
        for d in &replies {
            route_datagram(peer, d, now, transmits);
        }
        match (refused, filtered) {
            (Some(src), _) => Err(NodeError::SourceNotAllowed { peer: key, src }),
            (None, Some(reason)) => Err(NodeError::Filtered { peer: key, reason }),
            // The packet is at the start of `out` (see `WgOutput`).
            (None, None) => Ok(accepted),
        }
    }

    fn send_disco(&mut self, to: Dest, peer_disco: DiscoPublicKey, msg: &Message) {
        let nonce = self.rng.nonce();
        let payload = disco::seal(&self.disco, &peer_disco, nonce, msg);
        self.transmits.push_back(Transmit { dst: to, payload });
    }

    fn send_pings(&mut self, peer_disco: DiscoPublicKey, pings: Vec<PingOut>) {
        let me = self.public_key();
        for p in pings {
            let msg = Message::Ping {
                tx_id: p.tx_id,
                node_key: Some(me),
                padding: 0,
            };
            self.send_disco(Dest::Udp(p.to), peer_disco, &msg);
        }
    }

    /// Runs a discovery round for `key` when its direct path is not trusted: pings to every
    /// candidate, and a CallMeMaybe over DERP so the peer pings ours at the same time.
    fn maybe_discover(&mut self, key: &NodePublicKey, now: Instant) {
        let Self { peers, rng, .. } = self;
        let Some(peer) = peers.get_mut(key) else {
            return;
        };
        let Some(peer_disco) = peer.config.disco else {
            return;
        };
        if !peer.paths.wants_discovery(now) {
            return;
        }
        let pings = peer.paths.discover(now, || rng.tx_id());
        let region = peer.config.home_region;
        tracing::debug!(peer = %key.short(), candidates = pings.len(), "disco: discovery round");
        self.send_pings(peer_disco, pings);
        if region != 0 && !self.endpoints.is_empty() {
            let msg = Message::CallMeMaybe {
                endpoints: self.endpoints.clone(),
            };
            self.send_disco(Dest::Derp { region, peer: *key }, peer_disco, &msg);
        }
    }

    fn handle_disco(
        &mut self,
        source: Source,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), NodeError> {
        let claimed = disco::sender_key(packet).ok_or(DiscoError::NotDisco)?;
        let key = *self
            .by_disco
            .get(&claimed)
            .ok_or(NodeError::UnknownDiscoKey { key: claimed })?;
        let (sender, msg) = disco::open(&self.disco, packet)?;
        if let Source::Derp { from, .. } = source
            && from != key
        {
            return Err(NodeError::DerpSenderMismatch {
                relayed_by: from,
                claimed: key,
            });
        }
        match msg {
            Message::Ping {
                tx_id, node_key, ..
            } => {
                if node_key.is_some_and(|k| k != key) {
                    return Err(NodeError::DerpSenderMismatch {
                        relayed_by: key,
                        claimed: node_key.unwrap_or(key),
                    });
                }
                let src = match source {
                    Source::Udp(a) => a,
                    Source::Derp { region, .. } => derp_magic_addr(region),
                };
                self.send_disco(source.reply_to(), sender, &Message::Pong { tx_id, src });
                if let Source::Udp(a) = source {
                    let Self { peers, rng, .. } = self;
                    let back = peers
                        .get_mut(&key)
                        .and_then(|p| p.paths.handle_ping_from(a, now, || rng.tx_id()));
                    if let Some(p) = back {
                        self.send_pings(sender, vec![p]);
                    }
                }
            }
            Message::Pong { tx_id, .. } => {
                if let Some(up) = self.user_pings.remove(&tx_id) {
                    // The first pong answers the call; the same call's pings on other paths
                    // are done with.
                    self.user_pings.retain(|_, p| p.id != up.id);
                    let path = match source {
                        Source::Udp(a) => PathKind::Direct(a),
                        Source::Derp { region, .. } => PathKind::Relay(region),
                    };
                    let rtt = now.saturating_duration_since(up.sent);
                    self.events.push_back(Event::Pong {
                        id: up.id,
                        peer: up.peer,
                        path,
                        rtt,
                    });
                }
                if let (Source::Udp(a), Some(peer)) = (source, self.peers.get_mut(&key))
                    && let Some(r) = peer.paths.handle_pong(tx_id, a, now)
                    && r.new_best
                {
                    tracing::info!(peer = %peer.config.name, path = %a, rtt = ?r.rtt, "direct path");
                }
            }
            Message::CallMeMaybe { endpoints } => {
                // Only meaningful over DERP; a direct one would come from a path we already have.
                if matches!(source, Source::Derp { .. }) {
                    let Self { peers, rng, .. } = self;
                    let pings = match peers.get_mut(&key) {
                        Some(p) => p
                            .paths
                            .handle_call_me_maybe(&endpoints, now, || rng.tx_id()),
                        None => Vec::new(),
                    };
                    self.send_pings(sender, pings);
                }
            }
        }
        Ok(())
    }

    /// Pings `key` over disco on its current path (and starts discovery if that is DERP); the
    /// answer comes as [`Event::Pong`] with the returned id, or [`Event::PingTimeout`].
    pub fn ping(&mut self, key: &NodePublicKey, now: Instant) -> Result<PingId, NodeError> {
        self.now = now;
        let peer = self
            .peers
            .get(key)
            .ok_or(NodeError::NotPingable { peer: *key })?;
        let peer_disco = peer
            .config
            .disco
            .ok_or(NodeError::NotPingable { peer: *key })?;
        let region = peer.config.home_region;
        let me = self.public_key();
        let route = peer.paths.route(now, region != 0);
        let targets: Vec<Dest> = match route {
            Route::Direct(a) => vec![Dest::Udp(a)],
            Route::Relay { .. } => vec![Dest::Derp { region, peer: *key }],
            Route::Spray(addrs) => addrs.into_iter().map(Dest::Udp).collect(),
        };
        if targets.is_empty() {
            return Err(NodeError::NoPath { peer: *key });
        }
        let id = PingId(self.next_ping_id);
        self.next_ping_id += 1;
        for dst in targets {
            let tx_id = self.rng.tx_id();
            self.user_pings.insert(
                tx_id,
                UserPing {
                    id,
                    peer: *key,
                    sent: now,
                },
            );
            if let (Dest::Udp(a), Some(p)) = (dst, self.peers.get_mut(key)) {
                p.paths.track_ping(a, now, tx_id);
            }
            self.send_disco(
                dst,
                peer_disco,
                &Message::Ping {
                    tx_id,
                    node_key: Some(me),
                    padding: 0,
                },
            );
        }
        self.maybe_discover(key, now);
        Ok(id)
    }

    /// Runs what is due at `now`. Call when the deadline of [`Self::poll_timeout`] passes.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if now >= self.next_timers {
            self.next_timers = now + TIMER_INTERVAL;
            self.run_wireguard_timers(now);
        }
        self.run_disco_timers(now);
        self.run_netcheck(now);
        self.dns.handle_timeout(now);
        self.drain_dns();
        let mut expired = BTreeSet::new();
        self.user_pings.retain(|_, p| {
            let live = now < p.sent + USER_PING_TIMEOUT;
            if !live {
                expired.insert(p.id);
            }
            live
        });
        self.events
            .extend(expired.into_iter().map(|id| Event::PingTimeout { id }));
    }

    fn run_wireguard_timers(&mut self, now: Instant) {
        let Self {
            peers,
            scratch,
            transmits,
            ..
        } = self;
        for (key, peer) in peers.iter_mut() {
            let mut datagrams = Vec::new();
            let result = peer.session.update_timers(scratch, &mut |out| {
                if let WgOutput::Network(d) = out {
                    datagrams.push(d.to_vec());
                }
            });
            if let Err(error) = result {
                tracing::debug!(peer = %key.short(), %error, "WireGuard timer");
            }
            for d in &datagrams {
                route_datagram(peer, d, now, transmits);
            }
        }
    }

    fn run_disco_timers(&mut self, now: Instant) {
        let Self { peers, rng, .. } = self;
        let mut all = Vec::new();
        for peer in peers.values_mut() {
            let Some(d) = peer.config.disco else { continue };
            let pings = peer.paths.due_pings(now, || rng.tx_id());
            if !pings.is_empty() {
                all.push((d, pings));
            }
        }
        for (d, pings) in all {
            self.send_pings(d, pings);
        }
    }

    fn run_netcheck(&mut self, now: Instant) {
        if let Some(nc) = self.netcheck.as_mut() {
            let again = nc.due(now);
            self.transmits
                .extend(again.into_iter().map(|(a, p)| Transmit {
                    dst: Dest::Udp(a),
                    payload: p,
                }));
            if nc.is_done(now) {
                let report = nc.report();
                self.netcheck = None;
                self.finish_netcheck(report);
            }
            return;
        }
        if self.next_netcheck.is_some_and(|t| now >= t) && !self.stun_servers.is_empty() {
            self.next_netcheck = Some(now + NETCHECK_INTERVAL);
            let rng = &mut self.rng;
            let (nc, out) = Netcheck::start(&self.stun_servers, now, || rng.tx_id());
            self.transmits
                .extend(out.into_iter().map(|(a, p)| Transmit {
                    dst: Dest::Udp(a),
                    payload: p,
                }));
            self.netcheck = Some(nc);
        }
    }

    fn finish_netcheck(&mut self, report: Report) {
        tracing::debug!(udp = report.udp, global = ?report.global, hard_nat = report.mapping_varies, "netcheck");
        let home = netcheck::choose_home(self.home, &report.latency).or(self.home);
        // Without UDP, latency is unknown: keep the first region as home so DERP still works.
        let home = home.or_else(|| self.stun_servers.iter().map(|s| s.region).min());
        if home != self.home {
            self.home = home;
            if let Some(h) = home {
                self.events.push_back(Event::HomeRegion(h));
            }
        }
        self.last_report = Some(report.clone());
        self.refresh_endpoints();
        self.events.push_back(Event::Netcheck(report));
    }

    /// Starts a netcheck now (as `warren netcheck` asks); the report comes as
    /// [`Event::Netcheck`]. Without STUN servers no report would ever come: that is an error.
    pub fn start_netcheck(&mut self, now: Instant) -> Result<(), NodeError> {
        if self.stun_servers.is_empty() {
            return Err(NodeError::NoStunServers);
        }
        if self.netcheck.is_none() {
            self.next_netcheck = Some(now);
            self.run_netcheck(now);
        }
        Ok(())
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next IP packet to write to the TUN device.
    pub fn poll_tun(&mut self) -> Option<Vec<u8>> {
        self.to_tun.pop_front()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, TimeoutReason)> {
        let wg =
            (!self.peers.is_empty()).then_some((self.next_timers, TimeoutReason::WireGuardTimers));
        let disco = self
            .peers
            .values()
            .filter_map(|p| p.paths.next_timeout(self.now))
            .min()
            .map(|t| (t, TimeoutReason::Disco));
        let netcheck = match &self.netcheck {
            Some(nc) => Some(nc.next_timeout()),
            None => self.next_netcheck,
        }
        .map(|t| (t, TimeoutReason::Netcheck));
        let pings = self
            .user_pings
            .values()
            .map(|p| p.sent + USER_PING_TIMEOUT)
            .min()
            .map(|t| (t, TimeoutReason::Disco));
        let dns = self.dns.poll_timeout().map(|t| (t, TimeoutReason::Dns));
        [wg, disco, netcheck, pings, dns]
            .into_iter()
            .flatten()
            .min_by_key(|(t, _)| *t)
    }

    /// The confirmed direct path or the relay `key`'s traffic takes now; `None` when only
    /// unconfirmed addresses are tried (no relay) or there is no path. See
    /// [`Self::path_status`] for the whole picture.
    pub fn path(&self, key: &NodePublicKey, now: Instant) -> Option<PathKind> {
        self.path_status(key, now)?.kind()
    }

    /// How `key`'s traffic travels now; `None` for an unknown peer.
    pub fn path_status(&self, key: &NodePublicKey, now: Instant) -> Option<PathStatus> {
        let p = self.peers.get(key)?;
        let region = p.config.home_region;
        Some(match p.paths.route(now, region != 0) {
            Route::Direct(addr) => PathStatus::Direct {
                addr,
                latency: p.paths.best().map(|b| b.1).unwrap_or_default(),
            },
            Route::Relay {
                also_direct: Some(a),
            } => PathStatus::Trying {
                candidates: vec![a],
                relay: Some(region),
            },
            Route::Relay { also_direct: None } => PathStatus::Relay { region },
            Route::Spray(a) if a.is_empty() => PathStatus::Unreachable,
            Route::Spray(candidates) => PathStatus::Trying {
                candidates,
                relay: None,
            },
        })
    }

    /// Per-peer figures, in key order.
    pub fn peer_stats(&self, now: Instant) -> Vec<PeerStats> {
        self.peers
            .values()
            .map(|p| {
                let status = self
                    .path_status(&p.config.key, now)
                    .unwrap_or(PathStatus::Unreachable);
                PeerStats {
                    key: p.config.key,
                    name: p.config.name.clone(),
                    allowed_ips: p.config.allowed_ips.clone(),
                    routes: p.config.routes.clone(),
                    exit_node: p.config.exit_node,
                    status,
                    session: p.session.stats(),
                    filter_drops: p.filter_drops,
                }
            })
            .collect()
    }
}

/// 0.0.0.0/0 and ::/0: what an exit node carries.
fn default_routes() -> [IpNet; 2] {
    [
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

#[cfg(test)]
// A test needs one real instant as the origin of its virtual time.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    struct Pair {
        a: Node,
        b: Node,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
    }

    fn ip_packet(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn pair(now: Instant) -> Pair {
        let ka = NodeSecretKey::generate();
        let kb = NodeSecretKey::generate();
        let a_addr: SocketAddr = "10.0.0.1:41641".parse().expect("addr");
        let b_addr: SocketAddr = "10.0.0.2:41641".parse().expect("addr");
        let pa = ka.public_key();
        let pb = kb.public_key();
        let mut a = Node::new(ka, DiscoSecretKey::generate(), 1, now);
        let mut b = Node::new(kb, DiscoSecretKey::generate(), 2, now);
        a.set_peers(vec![PeerConfig {
            key: pb,
            name: "b".into(),
            allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
            routes: Vec::new(),
            exit_node: false,
            endpoints: vec![b_addr],
            disco: None,
            home_region: 0,
        }]);
        b.set_peers(vec![PeerConfig {
            key: pa,
            name: "a".into(),
            allowed_ips: vec!["100.64.0.1/32".parse().expect("net")],
            routes: Vec::new(),
            exit_node: false,
            endpoints: vec![a_addr],
            disco: None,
            home_region: 0,
        }]);
        Pair {
            a,
            b,
            a_addr,
            b_addr,
        }
    }

    /// Delivers every queued datagram between the two nodes until both are quiet.
    fn exchange(p: &mut Pair, now: Instant) {
        loop {
            let mut moved = false;
            while let Some(t) = p.a.poll_transmit() {
                assert_eq!(t.dst, Dest::Udp(p.b_addr));
                let _ = p.b.handle_udp(p.a_addr, &t.payload, now);
                moved = true;
            }
            while let Some(t) = p.b.poll_transmit() {
                assert_eq!(t.dst, Dest::Udp(p.a_addr));
                let _ = p.a.handle_udp(p.b_addr, &t.payload, now);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    /// `pair`, with b offered to a as an exit node and as the router of 10.20.0.0/24.
    fn router_pair(now: Instant) -> Pair {
        let mut p = pair(now);
        let mut cfg = p.a.peers.values().next().expect("b").config.clone();
        cfg.routes = vec!["10.20.0.0/24".parse().expect("net")];
        cfg.exit_node = true;
        p.a.upsert_peer(cfg);
        p.b.set_local(LocalNets {
            addresses: vec!["100.64.0.2/32".parse().expect("net")],
            routes: vec!["10.20.0.0/24".parse().expect("net")],
            exit: true,
            lan: vec!["192.168.1.0/24".parse().expect("net")],
        });
        p
    }

    #[test]
    fn subnet_routes_are_used_only_when_accepted() {
        let now = Instant::now();
        let mut p = router_pair(now);
        let to_lan = ip_packet([100, 64, 0, 1], [10, 20, 0, 10], 60);
        p.a.handle_tun_packet(&to_lan, now)
            .expect("routed to the router");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(to_lan.clone()));
        assert_eq!(
            p.a.os_routes(),
            vec!["10.20.0.0/24".parse::<IpNet>().expect("net")]
        );
        p.a.set_accept_routes(false);
        assert_eq!(
            p.a.handle_tun_packet(&to_lan, now),
            Err(NodeError::NoRoute {
                dst: "10.20.0.10".parse().expect("ip")
            })
        );
        assert!(p.a.os_routes().is_empty());
        // Replies from the LAN pass the router's source check at a.
        p.a.set_accept_routes(true);
        let reply = ip_packet([10, 20, 0, 10], [100, 64, 0, 1], 60);
        p.b.handle_tun_packet(&reply, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.a.poll_tun(), Some(reply));
    }

    #[test]
    fn exit_node_carries_internet_traffic_only_when_selected_and_not_to_its_lan() {
        let now = Instant::now();
        let mut p = router_pair(now);
        let b = p.b.public_key();
        let web = ip_packet([100, 64, 0, 1], [198, 51, 100, 80], 60);
        let no_route = Err(NodeError::NoRoute {
            dst: "198.51.100.80".parse().expect("ip"),
        });
        assert_eq!(p.a.handle_tun_packet(&web, now), no_route);
        p.a.set_exit_node(Some(b));
        assert!(p.a.os_routes().contains(&"0.0.0.0/0".parse().expect("net")));
        assert!(p.a.os_routes().contains(&"::/0".parse().expect("net")));
        p.a.handle_tun_packet(&web, now).expect("to the exit node");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(web.clone()));
        // The answer from the internet passes a's source check (b holds 0.0.0.0/0 at a).
        let answer = ip_packet([198, 51, 100, 80], [100, 64, 0, 1], 60);
        p.b.handle_tun_packet(&answer, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.a.poll_tun(), Some(answer));
        // The exit node's own LAN is not for its peers.
        let lan = ip_packet([100, 64, 0, 1], [192, 168, 1, 5], 60);
        p.a.handle_tun_packet(&lan, now).expect("to the exit node");
        let before = p.b.peer_stats(now)[0].filter_drops;
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), None);
        assert_eq!(p.b.peer_stats(now)[0].filter_drops, before + 1);
        // No longer offered: the selection stays (the OS keeps sending into the tunnel) but
        // nothing goes to b.
        let mut cfg = p.a.peers.values().next().expect("b").config.clone();
        cfg.exit_node = false;
        p.a.upsert_peer(cfg);
        assert_eq!(p.a.handle_tun_packet(&web, now), no_route);
        assert!(p.a.os_routes().contains(&"0.0.0.0/0".parse().expect("net")));
        p.a.set_exit_node(None);
        assert_eq!(
            p.a.os_routes(),
            vec!["10.20.0.0/24".parse::<IpNet>().expect("net")]
        );
    }

    /// A DNS query for `name` from 100.64.0.1:5353 to the magic address, as an IP packet.
    fn dns_query(name: &str, id: u16) -> Vec<u8> {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        dns::udp_packet(
            "100.64.0.1:5353".parse().expect("addr"),
            SocketAddr::new(dns::MAGIC_DNS_V4.into(), 53),
            &m.to_vec().expect("encode"),
        )
    }

    /// The rcode and A records of a DNS answer packet for 100.64.0.1:5353.
    fn dns_answer(packet: &[u8]) -> (u16, Vec<IpAddr>) {
        use hickory_proto::op::Message;
        use hickory_proto::rr::RData;
        let sliced = etherparse::SlicedPacket::from_ip(packet).expect("ip");
        let Some(etherparse::TransportSlice::Udp(udp)) = sliced.transport else {
            panic!("not udp")
        };
        assert_eq!(udp.source_port(), 53);
        assert_eq!(udp.destination_port(), 5353);
        let m = Message::from_vec(udp.payload()).expect("dns");
        let ips = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        (u16::from(m.metadata.response_code), ips)
    }

    #[test]
    fn magic_dns_is_answered_inside_the_node_and_the_rest_forwarded() {
        let now = Instant::now();
        let mut p = pair(now);
        let upstream: SocketAddr = "10.53.0.53:53".parse().expect("addr");
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "b.mesh.test".to_string(),
            vec!["100.64.0.2".parse().expect("ip")],
        );
        p.a.set_dns(DnsSettings {
            base_domain: "mesh.test".into(),
            hosts,
            upstreams: vec![upstream],
            ..DnsSettings::default()
        });
        p.a.handle_tun_packet(&dns_query("b.mesh.test.", 7), now)
            .expect("answered");
        let answer = p.a.poll_tun().expect("an answer on the TUN device");
        assert_eq!(
            dns_answer(&answer),
            (0, vec!["100.64.0.2".parse().expect("ip")])
        );
        assert_eq!(p.a.poll_transmit(), None, "nothing went to a peer");
        // An outside name goes to the upstream, and its answer back to the app.
        p.a.handle_tun_packet(&dns_query("example.org.", 8), now)
            .expect("forwarded");
        let f = p.a.poll_dns_forward().expect("a forward");
        assert_eq!(f.upstream, upstream);
        let mut reply = hickory_proto::op::Message::from_vec(&f.payload).expect("dns");
        reply.metadata.message_type = hickory_proto::op::MessageType::Response;
        let web = hickory_proto::rr::Record::from_rdata(
            hickory_proto::rr::Name::from_ascii("example.org.").expect("name"),
            60,
            hickory_proto::rr::RData::A("203.0.113.9".parse().expect("ip")),
        );
        reply.answers.push(web);
        p.a.handle_dns_upstream(upstream, &reply.to_vec().expect("encode"), now);
        let answer = p.a.poll_tun().expect("the forwarded answer");
        assert_eq!(
            dns_answer(&answer),
            (0, vec!["203.0.113.9".parse().expect("ip")])
        );
        // An upstream that never answers: SERVFAIL (2) within the resolver's bound.
        p.a.handle_tun_packet(&dns_query("slow.example.", 9), now)
            .expect("forwarded");
        assert!(p.a.poll_dns_forward().is_some());
        let (deadline, _) = p.a.poll_timeout().expect("a deadline");
        assert!(deadline <= now + dns::FORWARD_TIMEOUT);
        let mut t = now;
        while p.a.poll_tun().is_none() && t < now + dns::FORWARD_TIMEOUT * 2 {
            t = p.a.poll_timeout().map(|(d, _)| d).expect("deadline").max(t);
            p.a.handle_timeout(t);
            let _ = p.a.poll_dns_forward();
            if let Some(a) = p.a.poll_tun() {
                assert_eq!(dns_answer(&a).0, 2);
                assert!(t <= now + dns::FORWARD_TIMEOUT);
                return;
            }
        }
        panic!("no SERVFAIL by the deadline");
    }

    #[test]
    fn a_restarted_peer_mends_the_session_the_other_side_still_uses() {
        let now = Instant::now();
        let mut p = pair(now);
        let packet = ip_packet([100, 64, 0, 1], [100, 64, 0, 2], 100);
        p.a.handle_tun_packet(&packet, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(packet.clone()));
        // b restarts: same keys, no sessions. a still sends on the old session.
        let b_key = p.b.secret.clone();
        let a_cfg = p.b.peers.values().next().expect("a").config.clone();
        p.b = Node::new(b_key, DiscoSecretKey::generate(), 3, now);
        p.b.set_peers(vec![a_cfg]);
        p.a.handle_tun_packet(&packet, now).expect("routed");
        let stale = p.a.poll_transmit().expect("data on the old session");
        assert_eq!(stale.payload.first(), Some(&4));
        // The restarted b may have handed the same index to a's new session (no keys yet) or
        // to nobody; either way the data cannot be read.
        let err =
            p.b.handle_udp(p.a_addr, &stale.payload, now)
                .expect_err("stale");
        assert!(
            matches!(
                err,
                NodeError::UnknownPeer { .. }
                    | NodeError::Wg {
                        error: WgError::NoSession | WgError::UnknownIndex,
                        ..
                    }
            ),
            "{err}"
        );
        let init = p.b.poll_transmit().expect("b starts a handshake");
        assert_eq!(init.payload.first(), Some(&1));
        assert_eq!(init.dst, Dest::Udp(p.a_addr));
        // A second stale packet does not start another one.
        assert!(p.b.handle_udp(p.a_addr, &stale.payload, now).is_err());
        assert_eq!(p.b.poll_transmit(), None);
        let _ = p.a.handle_udp(p.b_addr, &init.payload, now);
        exchange(&mut p, now);
        p.a.handle_tun_packet(&packet, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(packet), "traffic flows again at once");
    }

    #[test]
    fn packet_crosses_after_handshake() {
        let now = Instant::now();
        let mut p = pair(now);
        let packet = ip_packet([100, 64, 0, 1], [100, 64, 0, 2], 100);
        p.a.handle_tun_packet(&packet, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(packet.clone()));
        let back = ip_packet([100, 64, 0, 2], [100, 64, 0, 1], 60);
        p.b.handle_tun_packet(&back, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.a.poll_tun(), Some(back));
        let stats = p.a.peer_stats(now);
        // Without disco nothing confirms the address: it is tried, not a direct path.
        assert_eq!(
            stats[0].status,
            PathStatus::Trying {
                candidates: vec![p.b_addr],
                relay: None
            }
        );
        assert_eq!(stats[0].status.kind(), None);
        assert_eq!(stats[0].status.latency(), None);
        assert!(stats[0].session.since_handshake.is_some());
    }

    /// Two nodes with disco keys and a relay region; `b_endpoints` is what A's netmap says
    /// about B.
    fn disco_pair(now: Instant, b_endpoints: Vec<SocketAddr>, b_region: RegionId) -> Pair {
        let ka = NodeSecretKey::from_bytes([1; 32]);
        let kb = NodeSecretKey::from_bytes([2; 32]);
        let (da, db) = (
            DiscoSecretKey::from_bytes([3; 32]),
            DiscoSecretKey::from_bytes([4; 32]),
        );
        let a_addr: SocketAddr = "198.51.100.1:41641".parse().expect("addr");
        let b_addr: SocketAddr = "198.51.100.2:41641".parse().expect("addr");
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let (dpa, dpb) = (da.public_key(), db.public_key());
        let mut a = Node::new(ka, da, 1, now);
        let mut b = Node::new(kb, db, 2, now);
        a.set_peers(vec![PeerConfig {
            key: pb,
            name: "b".into(),
            allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
            routes: Vec::new(),
            exit_node: false,
            endpoints: b_endpoints,
            disco: Some(dpb),
            home_region: b_region,
        }]);
        b.set_peers(vec![PeerConfig {
            key: pa,
            name: "a".into(),
            allowed_ips: vec!["100.64.0.1/32".parse().expect("net")],
            routes: Vec::new(),
            exit_node: false,
            endpoints: vec![a_addr],
            disco: Some(dpa),
            home_region: 900,
        }]);
        Pair {
            a,
            b,
            a_addr,
            b_addr,
        }
    }

    /// Delivers UDP between the nodes (to the right address only) until both are quiet;
    /// DERP traffic is dropped.
    fn exchange_udp(p: &mut Pair, now: Instant) {
        loop {
            let mut moved = false;
            while let Some(t) = p.a.poll_transmit() {
                if t.dst == Dest::Udp(p.b_addr) {
                    let _ = p.b.handle_udp(p.a_addr, &t.payload, now);
                    moved = true;
                }
            }
            while let Some(t) = p.b.poll_transmit() {
                if t.dst == Dest::Udp(p.a_addr) {
                    let _ = p.a.handle_udp(p.b_addr, &t.payload, now);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    #[test]
    fn path_status_tells_confirmed_from_tried_and_relayed() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = disco_pair(t0, vec!["198.51.100.2:41641".parse().expect("addr")], 900);
        let kb = p.b.public_key();
        assert_eq!(
            p.a.path_status(&kb, t0),
            Some(PathStatus::Relay { region: 900 })
        );
        assert_eq!(
            p.a.path_status(&NodePublicKey::from_bytes([9; 32]), t0),
            None
        );
        // A packet starts discovery; B's pong confirms the address.
        let packet = ip_packet([100, 64, 0, 1], [100, 64, 0, 2], 100);
        p.a.handle_tun_packet(&packet, t0).expect("routed");
        exchange_udp(&mut p, t0 + ms(1));
        let direct = PathStatus::Direct {
            addr: p.b_addr,
            latency: ms(1),
        };
        assert_eq!(p.a.path_status(&kb, t0 + ms(1)), Some(direct.clone()));
        assert_eq!(direct.to_string(), "direct 198.51.100.2:41641");
        let stats = &p.a.peer_stats(t0 + ms(1))[0];
        assert_eq!(stats.status, direct);
        assert_eq!(stats.status.kind(), Some(PathKind::Direct(p.b_addr)));
        assert_eq!(stats.status.latency(), Some(ms(1)));
        // No pong for the trust window: still sent there, but no longer confirmed.
        let stale = t0 + ms(1) + crate::path::TRUST;
        let trying = PathStatus::Trying {
            candidates: vec![p.b_addr],
            relay: Some(900),
        };
        assert_eq!(p.a.path_status(&kb, stale), Some(trying.clone()));
        assert_eq!(trying.to_string(), "trying 198.51.100.2:41641 + relay 900");
        assert_eq!(trying.kind(), Some(PathKind::Relay(900)));
        assert_eq!(trying.latency(), None);
        let stats = &p.a.peer_stats(stale)[0];
        assert_eq!(stats.status.kind(), Some(PathKind::Relay(900)));
        assert_eq!(stats.status.latency(), None);
        // Silent for longer: DERP only.
        let dead = t0 + ms(1) + crate::path::DIRECT_GRACE;
        assert_eq!(
            p.a.path_status(&kb, dead),
            Some(PathStatus::Relay { region: 900 })
        );
        assert_eq!(PathStatus::Relay { region: 900 }.to_string(), "relay 900");
    }

    #[test]
    fn path_status_without_relay_is_trying_or_unreachable() {
        let t0 = Instant::now();
        let lan: SocketAddr = "10.1.0.3:41641".parse().expect("addr");
        let public: SocketAddr = "198.51.100.2:41641".parse().expect("addr");
        let p = disco_pair(t0, vec![public, lan], 0);
        let kb = p.b.public_key();
        let status = p.a.path_status(&kb, t0).expect("known");
        assert_eq!(
            status,
            PathStatus::Trying {
                candidates: vec![lan, public],
                relay: None
            }
        );
        assert_eq!(
            status.to_string(),
            "trying 10.1.0.3:41641, 198.51.100.2:41641"
        );
        assert_eq!(
            p.a.path(&kb, t0),
            None,
            "an unconfirmed address is not direct"
        );
        let p = disco_pair(t0, Vec::new(), 0);
        assert_eq!(p.a.path_status(&kb, t0), Some(PathStatus::Unreachable));
        assert_eq!(PathStatus::Unreachable.to_string(), "unreachable");
        assert_eq!(p.a.peer_stats(t0)[0].status.kind(), None);
    }

    #[test]
    fn unconfirmed_handshake_response_reaches_every_candidate_and_data_follows_the_peer() {
        // A knows B by an unreachable LAN address (sorting first) and its real one, with no
        // relay and nothing confirmed; B initiates.
        let now = Instant::now();
        let mut p = pair(now);
        let kb = p.b.public_key();
        let lan: SocketAddr = "10.0.0.0:41641".parse().expect("addr");
        p.a.set_endpoints(&kb, vec![lan, p.b_addr]);
        let packet = ip_packet([100, 64, 0, 2], [100, 64, 0, 1], 100);
        p.b.handle_tun_packet(&packet, now).expect("routed");
        let init = p.b.poll_transmit().expect("initiation");
        assert_eq!(init.dst, Dest::Udp(p.a_addr));
        p.a.handle_udp(p.b_addr, &init.payload, now)
            .expect("initiation");
        let sent: Vec<Transmit> = std::iter::from_fn(|| p.a.poll_transmit()).collect();
        let to_b = sent
            .iter()
            .find(|t| t.dst == Dest::Udp(p.b_addr))
            .expect("the handshake response goes to B's reachable address too");
        assert!(is_wg_handshake(&to_b.payload) && to_b.payload[0] == 2);
        // B completes the handshake and sends its packet; A's answer (data) goes to where
        // B was heard from, not to the first candidate.
        p.b.handle_udp(p.a_addr, &to_b.payload, now)
            .expect("response");
        while let Some(t) = p.b.poll_transmit() {
            assert_eq!(t.dst, Dest::Udp(p.a_addr));
            p.a.handle_udp(p.b_addr, &t.payload, now).expect("data");
        }
        assert_eq!(p.a.poll_tun(), Some(packet));
        let back = ip_packet([100, 64, 0, 1], [100, 64, 0, 2], 60);
        p.a.handle_tun_packet(&back, now).expect("routed");
        let reply: Vec<Dest> = std::iter::from_fn(|| p.a.poll_transmit())
            .map(|t| t.dst)
            .collect();
        assert_eq!(reply, vec![Dest::Udp(p.b_addr)]);
    }

    fn udp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut v, b"query")
            .expect("build");
        v
    }

    fn tcp_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1024)
            .syn()
            .write(&mut v, &[])
            .expect("build");
        v
    }

    #[test]
    fn filter_drops_what_no_rule_allows_counts_it_per_peer_and_lets_replies_in() {
        use crate::filter::{DstPorts, IpProto, PortRange, Rule};
        let now = Instant::now();
        let mut p = pair(now);
        let ka = p.a.public_key();
        let (a_ip, b_ip) = ([100, 64, 0, 1], [100, 64, 0, 2]);
        assert!(
            p.b.filter().is_allow_all(),
            "no filter until control sends one"
        );
        // While B has no filter it queries A: a flow B started.
        let query = udp_packet(b_ip, a_ip, 5000, 53);
        p.b.handle_tun_packet(&query, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.a.poll_tun(), Some(query));
        // Now B lets A reach TCP 22 only.
        let ssh_only = Filter::new(
            vec!["100.64.0.2/32".parse().expect("net")],
            vec![Rule {
                srcs: vec!["100.64.0.1/32".parse().expect("net")],
                dsts: vec![DstPorts {
                    net: "100.64.0.2/32".parse().expect("net"),
                    ports: PortRange::single(22),
                }],
                protos: vec![IpProto::TCP],
            }],
        );
        p.b.set_filter(ssh_only.clone());
        assert_eq!(p.b.filter(), &ssh_only);
        let ssh = tcp_syn(a_ip, b_ip, 40000, 22);
        p.a.handle_tun_packet(&ssh, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(ssh));
        // UDP to B is decrypted, then dropped and counted against A.
        let dns = udp_packet(a_ip, b_ip, 6000, 53);
        p.a.handle_tun_packet(&dns, now).expect("routed");
        let t = p.a.poll_transmit().expect("data");
        assert_eq!(
            p.b.handle_udp(p.a_addr, &t.payload, now),
            Err(NodeError::Filtered {
                peer: ka,
                reason: DropReason::NoRule
            })
        );
        assert_eq!(p.b.poll_tun(), None);
        assert_eq!(p.b.peer_stats(now)[0].filter_drops, 1);
        assert_eq!(p.a.peer_stats(now)[0].filter_drops, 0);
        // A's answer to B's query passes the new filter: the flow outlived the old one.
        let answer = udp_packet(a_ip, b_ip, 53, 5000);
        p.a.handle_tun_packet(&answer, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(answer));
        assert_eq!(p.b.peer_stats(now)[0].filter_drops, 1);
        // Back to no policy: everything passes again.
        p.b.set_filter(Filter::allow_all());
        p.a.handle_tun_packet(&dns, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), Some(dns));
    }

    #[test]
    fn spoofed_inner_source_is_dropped() {
        let now = Instant::now();
        let mut p = pair(now);
        // A claims a source that belongs to nobody it may use.
        let packet = ip_packet([100, 64, 0, 9], [100, 64, 0, 2], 80);
        p.a.handle_tun_packet(&packet, now).expect("routed");
        exchange(&mut p, now);
        assert_eq!(p.b.poll_tun(), None);
    }

    #[test]
    fn unrouted_and_malformed_inputs_are_errors() {
        let now = Instant::now();
        let mut p = pair(now);
        let packet = ip_packet([100, 64, 0, 1], [100, 64, 0, 77], 40);
        assert_eq!(
            p.a.handle_tun_packet(&packet, now),
            Err(NodeError::NoRoute {
                dst: IpAddr::from([100, 64, 0, 77])
            })
        );
        assert_eq!(
            p.a.handle_tun_packet(&[1, 2], now),
            Err(NodeError::Ip(IpError::BadVersion { version: 0 }))
        );
        assert!(matches!(
            p.a.handle_udp(p.b_addr, &[4, 0, 0, 0, 1], now),
            Err(NodeError::Wg { .. })
        ));
        let mut data = vec![0u8; 64];
        data[0] = 4;
        data[4] = 0x77;
        assert!(p.a.handle_udp(p.b_addr, &data, now).is_err());
        assert_eq!(p.a.poll_tun(), None);
    }

    #[test]
    fn removed_peer_is_unreachable() {
        let now = Instant::now();
        let mut p = pair(now);
        let kb = p.a.peer_stats(now)[0].key;
        p.a.remove_peer(&kb);
        let packet = ip_packet([100, 64, 0, 1], [100, 64, 0, 2], 40);
        assert!(matches!(
            p.a.handle_tun_packet(&packet, now),
            Err(NodeError::NoRoute { .. })
        ));
        assert_eq!(p.a.poll_timeout(), None);
    }
}
