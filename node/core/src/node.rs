//! [`Node`]: the sans-IO heart of a warren node. It holds the peers from the netmap, routes
//! packets from the TUN device to the right peer's WireGuard session and the datagrams from the
//! UDP socket back to the TUN device, and says when its timers are due. The shell calls
//! `handle_*` with input and the current time, then drains `poll_transmit` (to the socket),
//! `poll_tun` (to the device) and re-arms one timer from `poll_timeout`.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use warren_proto::{NodePublicKey, NodeSecretKey};

use crate::ip::{self, IpError};
use crate::routing::RouteTable;
use crate::wg::{self, Receiver, Session, SessionStats, WgError, WgOutput};

/// How often WireGuard's timers (retransmits, keepalives, rekeys) run.
pub const TIMER_INTERVAL: Duration = Duration::from_millis(250);

/// Largest datagram or packet the node handles.
const MAX_PACKET: usize = 65_535;

/// A peer as the netmap describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node key; the identity of the WireGuard session.
    pub key: NodePublicKey,
    /// Its MagicDNS name, for status output.
    pub name: String,
    /// The addresses and routes it may use as source and receives traffic for.
    pub allowed_ips: Vec<IpNet>,
    /// Where it can be reached, as it reported.
    pub endpoints: Vec<SocketAddr>,
}

/// A datagram for the UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dst: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// What the deadline from [`Node::poll_timeout`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutReason {
    /// WireGuard's session timers.
    WireGuardTimers,
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
    /// The peer has no endpoint to send to.
    #[error("peer {peer} has no endpoint")]
    NoEndpoint {
        /// The peer.
        peer: NodePublicKey,
    },
    /// A datagram for a session or from a key we do not know.
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
    /// A peer sent a packet from an address it may not use.
    #[error("peer {peer} may not send from {src}")]
    SourceNotAllowed {
        /// The peer.
        peer: NodePublicKey,
        /// The inner source address.
        src: IpAddr,
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
    /// The endpoint in use: the last one an authenticated message came from.
    pub endpoint: Option<SocketAddr>,
    /// Session counters.
    pub session: SessionStats,
}

#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    index: u32,
    session: Session,
    /// The address of the last authenticated message from the peer (WireGuard roaming).
    confirmed: Option<SocketAddr>,
}

/// Where a message for a peer goes: handshake initiations try every known address of the
/// peer, so a stale endpoint heals; everything else goes to the best one.
fn destinations(
    config: &PeerConfig,
    confirmed: Option<SocketAddr>,
    datagram: &[u8],
) -> Vec<SocketAddr> {
    let is_initiation = datagram.first() == Some(&1);
    let mut out: Vec<SocketAddr> = confirmed.into_iter().collect();
    if is_initiation || out.is_empty() {
        for ep in &config.endpoints {
            if !out.contains(ep) {
                out.push(*ep);
            }
            if !is_initiation {
                break;
            }
        }
    }
    out
}

/// A node's peers, sessions and routes.
#[derive(Debug)]
pub struct Node {
    secret: NodeSecretKey,
    peers: BTreeMap<NodePublicKey, Peer>,
    by_index: BTreeMap<u32, NodePublicKey>,
    routes: RouteTable,
    next_index: u32,
    transmits: VecDeque<Transmit>,
    to_tun: VecDeque<Vec<u8>>,
    scratch: Vec<u8>,
    next_timers: Instant,
}

impl Node {
    /// A node with no peers yet.
    pub fn new(secret: NodeSecretKey, now: Instant) -> Self {
        Self {
            secret,
            peers: BTreeMap::new(),
            by_index: BTreeMap::new(),
            routes: RouteTable::default(),
            next_index: 1,
            transmits: VecDeque::new(),
            to_tun: VecDeque::new(),
            scratch: vec![0; MAX_PACKET + wg::OVERHEAD + wg::MIN_SCRATCH],
            next_timers: now + TIMER_INTERVAL,
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> NodePublicKey {
        self.secret.public_key()
    }

    /// Replaces the whole peer set with a full netmap's; known peers keep their sessions.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>) {
        let keep: std::collections::BTreeSet<_> = peers.iter().map(|p| p.key).collect();
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

    /// Adds a peer, or updates its addresses and endpoints keeping its session.
    pub fn upsert_peer(&mut self, config: PeerConfig) {
        if config.key == self.public_key() {
            return;
        }
        self.routes.set(config.key, &config.allowed_ips);
        if let Some(peer) = self.peers.get_mut(&config.key) {
            peer.config = config;
            return;
        }
        let index = self.allocate_index();
        let session = Session::new(&self.secret, &config.key, index);
        self.by_index.insert(index, config.key);
        tracing::debug!(peer = %config.key.short(), name = %config.name, "peer added");
        self.peers.insert(
            config.key,
            Peer {
                config,
                index,
                session,
                confirmed: None,
            },
        );
    }

    /// Forgets a peer: its session, routes and queued traffic.
    pub fn remove_peer(&mut self, key: &NodePublicKey) {
        if let Some(peer) = self.peers.remove(key) {
            self.by_index.remove(&peer.index);
            self.routes.remove(key);
            tracing::debug!(peer = %key.short(), "peer removed");
        }
    }

    /// Replaces a peer's reported endpoints.
    pub fn set_endpoints(&mut self, key: &NodePublicKey, endpoints: Vec<SocketAddr>) {
        if let Some(peer) = self.peers.get_mut(key) {
            peer.config.endpoints = endpoints;
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

    /// An IP packet read from the TUN device: encrypt it for the peer that owns its destination.
    pub fn handle_tun_packet(&mut self, packet: &[u8], _now: Instant) -> Result<(), NodeError> {
        let dst = ip::addresses(packet)?.dst;
        let key = self.routes.lookup(dst).ok_or(NodeError::NoRoute { dst })?;
        let Self {
            peers,
            scratch,
            transmits,
            ..
        } = self;
        let peer = peers.get_mut(&key).ok_or(NodeError::NoRoute { dst })?;
        let Peer {
            config,
            session,
            confirmed,
            ..
        } = peer;
        let mut no_endpoint = false;
        session
            .encapsulate(packet, scratch, &mut |out| {
                if let WgOutput::Network(d) = out {
                    let dsts = destinations(config, *confirmed, d);
                    no_endpoint = dsts.is_empty();
                    transmits.extend(dsts.into_iter().map(|dst| Transmit {
                        dst,
                        payload: d.to_vec(),
                    }));
                }
            })
            .map_err(|error| NodeError::Wg {
                peer: Some(key),
                error,
            })?;
        if no_endpoint {
            return Err(NodeError::NoEndpoint { peer: key });
        }
        Ok(())
    }

    /// A datagram read from the UDP socket: WireGuard for one of the peers.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        _now: Instant,
    ) -> Result<(), NodeError> {
        let key = match wg::receiver(&self.secret, datagram)
            .map_err(|error| NodeError::Wg { peer: None, error })?
        {
            Receiver::Initiator(key) => key,
            Receiver::Index(i) => *self
                .by_index
                .get(&i)
                .ok_or(NodeError::UnknownPeer { from })?,
        };
        let Self {
            peers,
            scratch,
            transmits,
            to_tun,
            routes,
            ..
        } = self;
        let peer = peers.get_mut(&key).ok_or(NodeError::UnknownPeer { from })?;
        let mut refused = None;
        peer.session
            .decapsulate(Some(from.ip()), datagram, scratch, &mut |out| match out {
                WgOutput::Network(d) => transmits.push_back(Transmit {
                    dst: from,
                    payload: d.to_vec(),
                }),
                WgOutput::Tunnel(p, src) => {
                    if routes.allows(&key, src) {
                        to_tun.push_back(p.to_vec());
                    } else {
                        refused = Some(src);
                    }
                }
            })
            .map_err(|error| NodeError::Wg {
                peer: Some(key),
                error,
            })?;
        if peer.confirmed != Some(from) {
            tracing::debug!(peer = %key.short(), endpoint = %from, "endpoint confirmed");
            peer.confirmed = Some(from);
        }
        match refused {
            Some(src) => Err(NodeError::SourceNotAllowed { peer: key, src }),
            None => Ok(()),
        }
    }

    /// Runs what is due at `now`. Call when the deadline of [`Self::poll_timeout`] passes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_timers {
            return;
        }
        self.next_timers = now + TIMER_INTERVAL;
        let Self {
            peers,
            scratch,
            transmits,
            ..
        } = self;
        for (key, peer) in peers.iter_mut() {
            let Peer {
                config,
                session,
                confirmed,
                ..
            } = peer;
            let result = session.update_timers(scratch, &mut |out| {
                if let WgOutput::Network(d) = out {
                    let dsts = destinations(config, *confirmed, d);
                    transmits.extend(dsts.into_iter().map(|dst| Transmit {
                        dst,
                        payload: d.to_vec(),
                    }));
                }
            });
            if let Err(error) = result {
                tracing::debug!(peer = %key.short(), %error, "WireGuard timer");
            }
        }
    }

    /// The next datagram to send on the UDP socket.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next IP packet to write to the TUN device.
    pub fn poll_tun(&mut self) -> Option<Vec<u8>> {
        self.to_tun.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next, and why; `None` with no peers.
    pub fn poll_timeout(&self) -> Option<(Instant, TimeoutReason)> {
        (!self.peers.is_empty()).then_some((self.next_timers, TimeoutReason::WireGuardTimers))
    }

    /// Per-peer figures, in key order.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.peers
            .values()
            .map(|p| PeerStats {
                key: p.config.key,
                name: p.config.name.clone(),
                allowed_ips: p.config.allowed_ips.clone(),
                endpoint: p.confirmed.or_else(|| p.config.endpoints.first().copied()),
                session: p.session.stats(),
            })
            .collect()
    }
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
        let mut a = Node::new(ka, now);
        let mut b = Node::new(kb, now);
        a.set_peers(vec![PeerConfig {
            key: pb,
            name: "b".into(),
            allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
            endpoints: vec![b_addr],
        }]);
        b.set_peers(vec![PeerConfig {
            key: pa,
            name: "a".into(),
            allowed_ips: vec!["100.64.0.1/32".parse().expect("net")],
            endpoints: vec![a_addr],
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
                assert_eq!(t.dst, p.b_addr);
                let _ = p.b.handle_udp(p.a_addr, &t.payload, now);
                moved = true;
            }
            while let Some(t) = p.b.poll_transmit() {
                assert_eq!(t.dst, p.a_addr);
                let _ = p.a.handle_udp(p.b_addr, &t.payload, now);
                moved = true;
            }
            if !moved {
                break;
            }
        }
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
        let stats = p.a.peer_stats();
        assert_eq!(stats[0].endpoint, Some(p.b_addr));
        assert!(stats[0].session.since_handshake.is_some());
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
        let kb = p.a.peer_stats()[0].key;
        p.a.remove_peer(&kb);
        let packet = ip_packet([100, 64, 0, 1], [100, 64, 0, 2], 40);
        assert!(matches!(
            p.a.handle_tun_packet(&packet, now),
            Err(NodeError::NoRoute { .. })
        ));
        assert_eq!(p.a.poll_timeout(), None);
    }
}
