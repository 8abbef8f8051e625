//! The node's copy of its netmap: a full map from control, then deltas applied in order. Each
//! step says what changed for the data plane, as [`MapChange`], so the node updates only the
//! peers concerned. Peer records from control are untrusted input: a malformed one is a typed
//! error that skips that peer only.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use warren_proto::control::map_response::Kind;
use warren_proto::control::{DerpMap, DnsConfig, FullMap, MapResponse, Node, PacketFilter};
use warren_proto::{DiscoPublicKey, KeyParseError, NodePublicKey};

use crate::filter::{DstPorts, Filter, IpProto, PortRange, Rule};
use crate::netcheck::{RegionId, StunServer};
use crate::node::{LocalNets, PeerConfig};

/// Why a netmap message could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A key field was malformed.
    #[error("node {id}: bad key: {error}")]
    BadKey {
        /// The node concerned.
        id: u64,
        /// What was wrong.
        error: KeyParseError,
    },
    /// An address or endpoint did not parse.
    #[error("node {id}: bad address {text:?}")]
    BadAddress {
        /// The node concerned.
        id: u64,
        /// The text.
        text: String,
    },
    /// A delta arrived before the first full map.
    #[error("delta before the first full map")]
    NoFullMap,
    /// A full map's page arrived with no full map being assembled.
    #[error("full map page without a full map")]
    StrayPage,
    /// Something other than a page arrived while a full map was being assembled.
    #[error("{kind} in the middle of a paged full map")]
    InterruptedFullMap {
        /// What arrived.
        kind: &'static str,
    },
    /// A batch held a full map, a page or another batch.
    #[error("{kind} inside a batch")]
    NestedInBatch {
        /// What it held.
        kind: &'static str,
    },
    /// A page or a batch was applied without a [`MapReader`] assembling or unpacking it.
    #[error("{kind} given to the netmap unread; a MapReader takes it apart")]
    Unread {
        /// What it was.
        kind: &'static str,
    },
    /// A paged full map grew past [`MAX_PEERS`].
    #[error("full map with more than {MAX_PEERS} peers")]
    TooManyPeers,
}

/// Most peers a full map may have (a bound on what a control server can make a node hold).
pub const MAX_PEERS: usize = 1 << 20;

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Full(_) => "a full map",
        Kind::FullPage(_) => "a full map page",
        Kind::Batch(_) => "a batch",
        _ => "a change",
    }
}

/// Reads the map stream's messages into the changes they carry: assembles full maps sent in
/// pages, unpacks batches, and remembers the map version reached, which the node sends back
/// when it reconnects so control can send only what changed since.
#[derive(Debug, Default)]
pub struct MapReader {
    /// A full map whose pages are still arriving.
    partial: Option<FullMap>,
    map_id: u64,
    version: u64,
}

impl MapReader {
    /// The changes `m` carries, in order (none while a paged full map is incomplete).
    pub fn read(&mut self, m: MapResponse) -> Result<Vec<Kind>, MapError> {
        let Some(kind) = m.kind else {
            return Ok(Vec::new());
        };
        let out = match kind {
            Kind::Full(full) if full.more => {
                self.partial = Some(full);
                Vec::new()
            }
            Kind::Full(full) => {
                self.map_id = full.map_id;
                self.partial = None;
                vec![Kind::Full(full)]
            }
            Kind::FullPage(page) => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(MapError::StrayPage);
                };
                if partial.peers.len() + page.peers.len() > MAX_PEERS {
                    self.partial = None;
                    return Err(MapError::TooManyPeers);
                }
                partial.peers.extend(page.peers);
                if page.more {
                    Vec::new()
                } else {
                    let full = self.partial.take().unwrap_or_default();
                    self.map_id = full.map_id;
                    vec![Kind::Full(full)]
                }
            }
            Kind::Keepalive(_) => Vec::new(),
            other if self.partial.is_some() => {
                self.partial = None;
                return Err(MapError::InterruptedFullMap {
                    kind: kind_name(&other),
                });
            }
            Kind::Batch(batch) => {
                let mut out = Vec::with_capacity(batch.changes.len());
                for k in batch.changes.into_iter().filter_map(|c| c.kind) {
                    if matches!(k, Kind::Full(_) | Kind::FullPage(_) | Kind::Batch(_)) {
                        return Err(MapError::NestedInBatch {
                            kind: kind_name(&k),
                        });
                    }
                    out.push(k);
                }
                out
            }
            other => vec![other],
        };
        if m.version != 0 {
            self.version = m.version;
        }
        Ok(out)
    }

    /// Where to resume from: (map id, version), once a full map and a version arrived.
    pub fn resume_point(&self) -> Option<(u64, u64)> {
        (self.map_id != 0 && self.version != 0).then_some((self.map_id, self.version))
    }

    /// A new stream begins: a full map cut off by the old one's end is dropped.
    pub fn restart(&mut self) {
        self.partial = None;
    }

    /// Forgets the map (the node dropped it): the next stream starts with a full map.
    pub fn forget(&mut self) {
        *self = Self::default();
    }
}

/// What a netmap message changed for the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapChange {
    /// A new full peer set.
    Reset(Vec<PeerConfig>),
    /// A peer was added or changed.
    Upsert(PeerConfig),
    /// A peer is gone.
    Remove(NodePublicKey),
    /// A peer's endpoints changed.
    Endpoints(NodePublicKey, Vec<SocketAddr>),
    /// This node's packet filter changed (a new filter from control, or new own addresses).
    /// A full map ([`MapChange::Reset`]) carries one too: read it with [`Netmap::filter`].
    Filter(Filter),
    /// Control's DNS settings or DERP map changed (a live config reload on control): read
    /// them with [`Netmap::dns`] and [`Netmap::derp_map`]; the peers and sessions stay.
    Settings,
    /// Nothing for the data plane (keepalive, online state, this node's own record).
    None,
}

/// Reads a peer's data-plane configuration out of its control record.
pub fn peer_config(n: &Node) -> Result<PeerConfig, MapError> {
    let key = NodePublicKey::from_slice(&n.node_key)
        .map_err(|error| MapError::BadKey { id: n.id, error })?;
    let allowed_ips = n
        .addresses
        .iter()
        .map(|a| {
            a.parse::<IpNet>().map_err(|_| MapError::BadAddress {
                id: n.id,
                text: a.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(PeerConfig {
        key,
        name: n.given_name.clone(),
        allowed_ips,
        routes: n
            .primary_routes
            .iter()
            .map(|r| {
                r.parse::<IpNet>().map_err(|_| MapError::BadAddress {
                    id: n.id,
                    text: r.clone(),
                })
            })
            .collect::<Result<_, _>>()?,
        exit_node: n.exit_node,
        endpoints: endpoints(n.id, &n.endpoints)?,
        // A node without a disco key (or a malformed one) still works over direct UDP.
        disco: DiscoPublicKey::from_slice(&n.disco_key).ok(),
        home_region: n.home_region,
    })
}

fn endpoints(id: u64, list: &[String]) -> Result<Vec<SocketAddr>, MapError> {
    list.iter()
        .map(|e| {
            e.parse().map_err(|_| MapError::BadAddress {
                id,
                text: e.clone(),
            })
        })
        .collect()
}

/// The STUN servers of a DERP map, for netcheck. Nodes whose address is a name are skipped
/// (the shell resolves names into a map of literal addresses first).
pub fn stun_servers(map: &DerpMap) -> Vec<StunServer> {
    let mut out = Vec::new();
    for region in &map.regions {
        for n in &region.nodes {
            let port = match n.stun_port {
                0 => 3478,
                p => match u16::try_from(p) {
                    Ok(p) => p,
                    Err(_) => continue, // -1 disables STUN
                },
            };
            let ip = n
                .ipv4
                .parse::<IpAddr>()
                .or_else(|_| n.host_name.parse::<IpAddr>());
            if let Ok(ip) = ip {
                out.push(StunServer {
                    region: region.region_id,
                    addr: SocketAddr::new(ip, port),
                });
            }
        }
    }
    out
}

/// A DERP server to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerpUrl {
    /// `http(s)://host:port/derp`; the host is the server's name (what its certificate names).
    pub url: String,
    /// The address to dial instead of resolving the name, when the map gives one.
    pub dial: Option<IpAddr>,
    /// Skip TLS certificate checks (labs only).
    pub insecure: bool,
}

/// The DERP servers of each region, in the map's order (STUN-only nodes are not DERP servers).
pub fn derp_urls(map: &DerpMap) -> BTreeMap<RegionId, Vec<DerpUrl>> {
    let mut out: BTreeMap<RegionId, Vec<DerpUrl>> = BTreeMap::new();
    for region in &map.regions {
        for n in region.nodes.iter().filter(|n| !n.stun_only) {
            let (scheme, default_port) = if n.plain_http {
                ("http", 80)
            } else {
                ("https", 443)
            };
            let port = if n.derp_port > 0 {
                n.derp_port
            } else {
                default_port
            };
            let dial: Option<IpAddr> = n.ipv4.parse().ok().or_else(|| n.ipv6.parse().ok());
            // The name goes into the URL, so TLS checks the certificate against it; the map's
            // address, when there is one, is only where to connect.
            let host = match (n.host_name.as_str(), dial) {
                ("", Some(ip)) => ip.to_string(),
                ("", None) => continue,
                (name, _) => name.to_owned(),
            };
            let host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
                format!("[{host}]")
            } else {
                host
            };
            let url = format!("{scheme}://{host}:{port}/derp");
            let insecure = n.insecure_for_tests;
            out.entry(region.region_id).or_default().push(DerpUrl {
                url,
                dial,
                insecure,
            });
        }
    }
    out
}

/// What a node's own record says it takes packets for: its addresses, the subnet routes it
/// serves (advertised and approved, not /0), and whether it is an approved exit node. `lan`
/// is every prefix on the host's interfaces; an exit node keeps the private ones from its
/// peers (advertise one to share it). A publicly addressed network it sits on is internet
/// like any other, the line `autogroup:internet` draws.
pub fn local_nets(me: &Node, lan: Vec<IpNet>) -> LocalNets {
    let parse = |list: &[String]| -> Vec<IpNet> {
        list.iter()
            .filter_map(|a| a.parse::<IpNet>().ok())
            .map(|n| n.trunc())
            .collect()
    };
    let advertised = parse(&me.advertised_routes);
    let routes = parse(&me.approved_routes)
        .into_iter()
        .filter(|n| n.prefix_len() > 0 && advertised.contains(n))
        .collect();
    let lan = if me.exit_node {
        lan.into_iter()
            .filter(|n| crate::ip::is_private_space(n.addr()))
            .collect()
    } else {
        Vec::new()
    };
    LocalNets {
        addresses: parse(&me.addresses),
        routes,
        exit: me.exit_node,
        lan,
    }
}

/// The node's packet filter from control's `filter` (absent or `allow_all`: no policy, accept
/// everything) and its own record (its addresses, served routes and, as an exit node, every
/// address are the filter's local destinations; [`LocalNets`] keeps its LAN out). A rule with
/// a malformed prefix or port range is left out, which can only take access away.
pub fn packet_filter(filter: Option<&PacketFilter>, me: Option<&Node>) -> Filter {
    let Some(f) = filter.filter(|f| !f.allow_all) else {
        return Filter::allow_all();
    };
    let local = me
        .map(|n| {
            let l = local_nets(n, Vec::new());
            let mut out = l.addresses;
            out.extend(l.routes);
            if l.exit {
                out.push(IpNet::V4(ipnet::Ipv4Net::default()));
                out.push(IpNet::V6(ipnet::Ipv6Net::default()));
            }
            out
        })
        .unwrap_or_default();
    let rules = f
        .rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match filter_rule(r) {
            Some(rule) => Some(rule),
            None => {
                tracing::warn!(
                    rule = i,
                    "control sent a malformed filter rule; leaving it out"
                );
                None
            }
        })
        .collect();
    Filter::new(local, rules)
}

/// `*` is every address of both families; anything else a prefix or a bare address.
fn prefixes(text: &str) -> Option<Vec<IpNet>> {
    if text == "*" {
        return Some(vec![
            IpNet::new(IpAddr::from([0u8; 4]), 0).ok()?,
            IpNet::new(IpAddr::from([0u16; 8]), 0).ok()?,
        ]);
    }
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(|n| vec![n])
}

fn filter_rule(r: &warren_proto::control::FilterRule) -> Option<Rule> {
    let mut srcs = Vec::new();
    for s in &r.src {
        srcs.extend(prefixes(s)?);
    }
    let mut dsts = Vec::new();
    for d in &r.dst {
        let ports = PortRange {
            first: u16::try_from(d.first).ok()?,
            last: u16::try_from(d.last).ok()?,
        };
        for net in prefixes(&d.net)? {
            dsts.push(DstPorts { net, ports });
        }
    }
    let protos = r
        .protos
        .iter()
        .map(|p| u8::try_from(*p).ok().map(IpProto))
        .collect::<Option<_>>()?;
    Some(Rule { srcs, dsts, protos })
}

/// The netmap as this node knows it.
#[derive(Debug, Default, Clone)]
pub struct Netmap {
    me: Option<Node>,
    peers: BTreeMap<u64, Node>,
    dns: Option<DnsConfig>,
    derp_map: Option<DerpMap>,
    filter: Option<PacketFilter>,
}

impl Netmap {
    /// This node's own record, once a full map arrived.
    pub fn self_node(&self) -> Option<&Node> {
        self.me.as_ref()
    }

    /// The peers by id.
    pub fn peers(&self) -> impl Iterator<Item = &Node> {
        self.peers.values()
    }

    /// The peer with this node key.
    pub fn peer_by_key(&self, key: &NodePublicKey) -> Option<&Node> {
        self.peers.values().find(|n| n.node_key == key.as_bytes())
    }

    /// MagicDNS settings.
    pub fn dns(&self) -> Option<&DnsConfig> {
        self.dns.as_ref()
    }

    /// The DERP relays.
    pub fn derp_map(&self) -> Option<&DerpMap> {
        self.derp_map.as_ref()
    }

    /// The packet filter control gave this node ([`packet_filter`]).
    pub fn filter(&self) -> Filter {
        packet_filter(self.filter.as_ref(), self.me.as_ref())
    }

    fn key_of(&self, id: u64) -> Option<NodePublicKey> {
        self.peers
            .get(&id)
            .and_then(|n| NodePublicKey::from_slice(&n.node_key).ok())
    }

    /// Applies one message from the map stream.
    pub fn apply(&mut self, kind: Kind) -> Result<MapChange, MapError> {
        if self.me.is_none() && !matches!(kind, Kind::Full(_) | Kind::Keepalive(_)) {
            return Err(MapError::NoFullMap);
        }
        Ok(match kind {
            Kind::Full(full) => {
                let mut configs = Vec::with_capacity(full.peers.len());
                self.peers.clear();
                for p in full.peers {
                    match peer_config(&p) {
                        Ok(c) => {
                            configs.push(c);
                            self.peers.insert(p.id, p);
                        }
                        Err(e) => tracing::warn!(error = %e, "skipping malformed peer"),
                    }
                }
                self.me = full.self_node;
                self.dns = full.dns;
                self.derp_map = full.derp_map;
                self.filter = full.filter;
                MapChange::Reset(configs)
            }
            Kind::PeerAdded(p) | Kind::PeerChanged(p) => {
                let c = peer_config(&p)?;
                if let Some(old) = self.key_of(p.id).filter(|k| *k != c.key) {
                    // Same node, new key: the old session is gone with it.
                    self.peers.insert(p.id, p);
                    tracing::debug!(old = %old.short(), "peer changed key");
                    return Ok(MapChange::Reset(self.configs()));
                }
                self.peers.insert(p.id, p);
                MapChange::Upsert(c)
            }
            Kind::PeerRemoved(r) => match self.key_of(r.id) {
                Some(key) => {
                    self.peers.remove(&r.id);
                    MapChange::Remove(key)
                }
                None => MapChange::None,
            },
            Kind::PeerEndpoints(e) => {
                let eps = endpoints(e.id, &e.endpoints)?;
                let key = self.key_of(e.id);
                match (self.peers.get_mut(&e.id), key) {
                    (Some(p), Some(key)) => {
                        p.endpoints = e.endpoints;
                        MapChange::Endpoints(key, eps)
                    }
                    _ => MapChange::None,
                }
            }
            Kind::PeerOnline(o) => {
                if let Some(p) = self.peers.get_mut(&o.id) {
                    p.online = o.online;
                    p.last_seen_unix_ms = o.last_seen_unix_ms;
                }
                MapChange::None
            }
            Kind::SelfChanged(n) => {
                let local_changed = self.me.as_ref().is_none_or(|m| {
                    m.addresses != n.addresses
                        || m.advertised_routes != n.advertised_routes
                        || m.approved_routes != n.approved_routes
                        || m.exit_node != n.exit_node
                });
                self.me = Some(n);
                // Its addresses and served routes are the filter's local destinations.
                if local_changed && self.filter.as_ref().is_some_and(|f| !f.allow_all) {
                    MapChange::Filter(self.filter())
                } else {
                    MapChange::None
                }
            }
            Kind::FilterChanged(f) => {
                self.filter = Some(f);
                MapChange::Filter(self.filter())
            }
            Kind::SettingsChanged(s) => {
                self.dns = s.dns;
                self.derp_map = s.derp_map;
                MapChange::Settings
            }
            Kind::Keepalive(_) => MapChange::None,
            // A MapReader turns these into the changes they carry.
            k @ (Kind::FullPage(_) | Kind::Batch(_)) => {
                return Err(MapError::Unread {
                    kind: kind_name(&k),
                });
            }
        })
    }

    fn configs(&self) -> Vec<PeerConfig> {
        self.peers
            .values()
            .filter_map(|p| peer_config(p).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::control::{FullMap, PeerEndpoints, PeerRemoved};

    fn node(id: u64) -> Node {
        Node {
            id,
            node_key: vec![id as u8; 32],
            given_name: format!("n{id}"),
            addresses: vec![format!("100.64.0.{id}/32")],
            endpoints: vec![format!("10.0.0.{id}:41641")],
            ..Node::default()
        }
    }

    #[test]
    fn full_then_deltas() {
        let mut m = Netmap::default();
        assert_eq!(m.apply(Kind::PeerAdded(node(2))), Err(MapError::NoFullMap));
        let full = FullMap {
            self_node: Some(node(1)),
            peers: vec![node(2)],
            dns: None,
            derp_map: None,
            filter: None,
            ..FullMap::default()
        };
        let MapChange::Reset(c) = m.apply(Kind::Full(full)).expect("full") else {
            panic!("reset")
        };
        assert_eq!(c.len(), 1);
        assert!(
            matches!(m.apply(Kind::PeerAdded(node(3))), Ok(MapChange::Upsert(c)) if c.name == "n3")
        );
        let eps = PeerEndpoints {
            id: 3,
            endpoints: vec!["10.9.9.9:1".into()],
        };
        assert!(
            matches!(m.apply(Kind::PeerEndpoints(eps)), Ok(MapChange::Endpoints(_, e)) if e.len() == 1)
        );
        assert_eq!(
            m.apply(Kind::PeerRemoved(PeerRemoved { id: 3 })),
            Ok(MapChange::Remove(NodePublicKey::from_bytes([3; 32])))
        );
        assert_eq!(
            m.apply(Kind::PeerRemoved(PeerRemoved { id: 3 })),
            Ok(MapChange::None)
        );
        assert_eq!(m.peers().count(), 1);
    }

    #[test]
    fn malformed_peer_is_skipped_or_refused_alone() {
        let mut m = Netmap::default();
        let mut bad = node(9);
        bad.addresses = vec!["not-an-ip".into()];
        let full = FullMap {
            self_node: Some(node(1)),
            peers: vec![node(2), bad.clone()],
            dns: None,
            derp_map: None,
            filter: None,
            ..FullMap::default()
        };
        let MapChange::Reset(c) = m.apply(Kind::Full(full)).expect("full") else {
            panic!("reset")
        };
        assert_eq!(
            c.len(),
            1,
            "the malformed peer is skipped, the good one kept"
        );
        assert!(matches!(
            m.apply(Kind::PeerAdded(bad)),
            Err(MapError::BadAddress { id: 9, .. })
        ));
        let mut short_key = node(5);
        short_key.node_key.pop();
        assert!(matches!(
            m.apply(Kind::PeerChanged(short_key)),
            Err(MapError::BadKey { id: 5, .. })
        ));
    }

    #[test]
    fn derp_map_gives_stun_servers_and_urls() {
        use warren_proto::control::{DerpNode, DerpRegion};
        let map = DerpMap {
            regions: vec![DerpRegion {
                region_id: 900,
                nodes: vec![
                    DerpNode {
                        region_id: 900,
                        host_name: "203.0.113.10".into(),
                        derp_port: 3340,
                        plain_http: true,
                        ..DerpNode::default()
                    },
                    DerpNode {
                        region_id: 900,
                        host_name: "derp.example".into(),
                        ipv4: "203.0.113.11".into(),
                        stun_port: 3479,
                        ..DerpNode::default()
                    },
                    DerpNode {
                        region_id: 900,
                        host_name: "203.0.113.12".into(),
                        stun_port: -1,
                        ..DerpNode::default()
                    },
                    DerpNode {
                        region_id: 900,
                        host_name: "2001:db8::12".into(),
                        stun_port: -1,
                        ..DerpNode::default()
                    },
                ],
                ..DerpRegion::default()
            }],
        };
        let stun: Vec<String> = stun_servers(&map)
            .iter()
            .map(|s| s.addr.to_string())
            .collect();
        assert_eq!(stun, ["203.0.113.10:3478", "203.0.113.11:3479"]);
        let urls: Vec<(String, Option<IpAddr>)> = derp_urls(&map)[&900]
            .iter()
            .map(|u| (u.url.clone(), u.dial))
            .collect();
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        assert_eq!(
            urls,
            [
                ("http://203.0.113.10:3340/derp".to_owned(), None),
                // The certificate names the host: the URL keeps the name, the IP is dialled.
                (
                    "https://derp.example:443/derp".to_owned(),
                    ip("203.0.113.11")
                ),
                ("https://203.0.113.12:443/derp".to_owned(), None),
                ("https://[2001:db8::12]:443/derp".to_owned(), None),
            ]
        );
    }

    #[test]
    fn a_stun_only_node_is_probed_but_not_a_derp_server() {
        use warren_proto::control::{DerpNode, DerpRegion};
        let node = |name: &str, stun_port, stun_only| DerpNode {
            name: name.into(),
            region_id: 999,
            host_name: "203.0.113.10".into(),
            stun_port,
            derp_port: 3340,
            plain_http: true,
            stun_only,
            ..DerpNode::default()
        };
        let map = DerpMap {
            regions: vec![DerpRegion {
                region_id: 999,
                nodes: vec![node("999a", 3478, false), node("999b", 3479, true)],
                ..DerpRegion::default()
            }],
        };
        let stun: Vec<String> = stun_servers(&map)
            .iter()
            .map(|s| s.addr.to_string())
            .collect();
        assert_eq!(stun, ["203.0.113.10:3478", "203.0.113.10:3479"]);
        let urls: Vec<String> = derp_urls(&map)[&999]
            .iter()
            .map(|u| u.url.clone())
            .collect();
        assert_eq!(urls, ["http://203.0.113.10:3340/derp"]);
    }

    #[test]
    fn filters_from_control() {
        use warren_proto::control::{DstPorts as WireDst, FilterRule};
        let me = node(1);
        // No filter, or allow_all: no policy.
        assert!(packet_filter(None, Some(&me)).is_allow_all());
        let all = PacketFilter {
            allow_all: true,
            rules: vec![],
        };
        assert!(packet_filter(Some(&all), Some(&me)).is_allow_all());
        // Rules: `*` is both families, bare addresses are host prefixes, and a rule with a
        // malformed part is left out (only ever less access).
        let wire = PacketFilter {
            allow_all: false,
            rules: vec![
                FilterRule {
                    src: vec!["*".into()],
                    dst: vec![WireDst {
                        net: "100.64.0.1".into(),
                        first: 22,
                        last: 22,
                    }],
                    protos: vec![6],
                },
                FilterRule {
                    src: vec!["not an address".into()],
                    dst: vec![],
                    protos: vec![],
                },
                FilterRule {
                    src: vec!["100.64.0.2/32".into()],
                    dst: vec![WireDst {
                        net: "100.64.0.1/32".into(),
                        first: 0,
                        last: 70_000,
                    }],
                    protos: vec![],
                },
            ],
        };
        let f = packet_filter(Some(&wire), Some(&me));
        assert!(!f.is_allow_all());
        assert_eq!(f.local(), ["100.64.0.1/32".parse::<IpNet>().expect("net")]);
        assert_eq!(
            f.rules(),
            [Rule {
                srcs: vec![
                    "0.0.0.0/0".parse().expect("net"),
                    "::/0".parse().expect("net")
                ],
                dsts: vec![DstPorts {
                    net: "100.64.0.1/32".parse().expect("net"),
                    ports: PortRange::single(22),
                }],
                protos: vec![IpProto::TCP],
            }]
        );
        // Over the stream: a full map's filter, then a change, then new own addresses.
        let mut m = Netmap::default();
        let full = FullMap {
            self_node: Some(me.clone()),
            peers: vec![node(2)],
            dns: None,
            derp_map: None,
            filter: Some(wire.clone()),
            ..FullMap::default()
        };
        assert!(matches!(m.apply(Kind::Full(full)), Ok(MapChange::Reset(_))));
        assert_eq!(m.filter(), f);
        let none = PacketFilter {
            allow_all: false,
            rules: vec![],
        };
        let Ok(MapChange::Filter(deny)) = m.apply(Kind::FilterChanged(none)) else {
            panic!("filter change")
        };
        assert!(!deny.is_allow_all() && deny.rules().is_empty());
        let mut moved = me.clone();
        moved.addresses = vec!["100.64.0.9/32".into()];
        let Ok(MapChange::Filter(f)) = m.apply(Kind::SelfChanged(moved)) else {
            panic!("new local addresses")
        };
        assert_eq!(f.local(), ["100.64.0.9/32".parse::<IpNet>().expect("net")]);
    }

    #[test]
    fn a_router_takes_packets_for_approved_advertised_routes_and_an_exit_node_for_all_but_its_lan()
    {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        let mut me = node(1);
        me.addresses = vec!["100.64.0.1/32".into(), "fd7a:115c:a1e0::1/128".into()];
        me.advertised_routes = vec!["10.20.0.0/24".into(), "10.30.0.0/24".into()];
        // Approved but no longer advertised: not served. Malformed: ignored.
        me.approved_routes = vec!["10.20.0.0/24".into(), "10.40.0.0/24".into(), "bad".into()];
        let l = local_nets(&me, vec![net("192.168.1.0/24")]);
        assert_eq!(l.routes, vec![net("10.20.0.0/24")]);
        assert!(l.lan.is_empty(), "only an exit node keeps a LAN out");
        assert!(!l.exit);
        assert!(l.contains("10.20.0.9".parse().expect("ip")));
        assert!(!l.contains("10.30.0.9".parse().expect("ip")));
        assert!(!l.contains("198.51.100.80".parse().expect("ip")));
        me.exit_node = true;
        me.advertised_routes.push("0.0.0.0/0".into());
        me.approved_routes.push("0.0.0.0/0".into());
        let l = local_nets(&me, vec![net("192.168.1.0/24"), net("198.51.100.0/24")]);
        assert_eq!(
            l.routes,
            vec![net("10.20.0.0/24")],
            "/0 is not a subnet route"
        );
        // A public network the exit node sits on is internet, not its LAN.
        assert_eq!(l.lan, vec![net("192.168.1.0/24")]);
        assert!(l.contains("198.51.100.80".parse().expect("ip")));
        assert!(!l.contains("192.168.1.7".parse().expect("ip")));
        let rules = PacketFilter {
            allow_all: false,
            rules: Vec::new(),
        };
        let f = packet_filter(Some(&rules), Some(&me));
        assert_eq!(
            f.local(),
            [
                net("100.64.0.1/32"),
                net("fd7a:115c:a1e0::1/128"),
                net("10.20.0.0/24"),
                net("0.0.0.0/0"),
                net("::/0")
            ]
        );
    }

    #[test]
    fn settings_changed_replaces_dns_and_derp_map_and_keeps_the_peers() {
        use warren_proto::control::{DerpNode, DerpRegion, DnsRecord, SettingsChanged};
        let mut m = Netmap::default();
        let settings = SettingsChanged {
            dns: Some(DnsConfig::default()),
            derp_map: Some(DerpMap::default()),
        };
        assert_eq!(
            m.apply(Kind::SettingsChanged(settings.clone())),
            Err(MapError::NoFullMap)
        );
        let full = FullMap {
            self_node: Some(node(1)),
            peers: vec![node(2), node(3)],
            dns: Some(DnsConfig {
                nameservers: vec!["1.1.1.1".into()],
                ..DnsConfig::default()
            }),
            derp_map: None,
            filter: None,
            ..FullMap::default()
        };
        m.apply(Kind::Full(full)).expect("full");
        let dns = DnsConfig {
            magic_dns: true,
            base_domain: "mesh.example".into(),
            nameservers: vec!["9.9.9.9".into(), "[2620:fe::fe]:53".into()],
            extra_records: vec![DnsRecord {
                name: "grafana.mesh.example".into(),
                r#type: "A".into(),
                value: "100.64.0.9".into(),
            }],
            ..DnsConfig::default()
        };
        let derp_map = DerpMap {
            regions: vec![DerpRegion {
                region_id: 900,
                region_code: "r900".into(),
                region_name: "r900".into(),
                nodes: vec![DerpNode {
                    name: "900a".into(),
                    region_id: 900,
                    host_name: "192.0.2.9".into(),
                    ipv4: "192.0.2.9".into(),
                    stun_port: 3478,
                    derp_port: 3340,
                    ..DerpNode::default()
                }],
            }],
        };
        let change = m.apply(Kind::SettingsChanged(SettingsChanged {
            dns: Some(dns.clone()),
            derp_map: Some(derp_map.clone()),
        }));
        assert_eq!(change, Ok(MapChange::Settings));
        assert_eq!(m.dns(), Some(&dns));
        assert_eq!(m.derp_map(), Some(&derp_map));
        assert_eq!(
            stun_servers(&derp_map)
                .iter()
                .map(|s| s.addr)
                .collect::<Vec<_>>(),
            ["192.0.2.9:3478".parse::<SocketAddr>().expect("addr")]
        );
        // The peers are untouched: no reset, no session lost.
        assert_eq!(m.peers().map(|p| p.id).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(m.self_node().map(|n| n.id), Some(1));
    }

    #[test]
    fn the_reader_assembles_pages_unpacks_batches_and_refuses_what_does_not_fit() {
        use warren_proto::control::{FullMapPage, MapBatch};
        let msg = |kind: Kind, version: u64| MapResponse {
            seq: 0,
            version,
            kind: Some(kind),
        };
        let page = |ids: &[u64], more: bool| {
            Kind::FullPage(FullMapPage {
                peers: ids.iter().map(|i| node(*i)).collect(),
                more,
            })
        };
        let head = Kind::Full(FullMap {
            self_node: Some(node(1)),
            peers: vec![node(2)],
            more: true,
            map_id: 7,
            ..FullMap::default()
        });
        let mut r = MapReader::default();
        assert_eq!(r.read(msg(page(&[3], false), 0)), Err(MapError::StrayPage));
        assert_eq!(r.read(msg(head.clone(), 0)), Ok(vec![]));
        assert_eq!(r.read(msg(page(&[3], true), 0)), Ok(vec![]));
        assert_eq!(r.resume_point(), None, "no version before the map is whole");
        let Ok(done) = r.read(msg(page(&[4], false), 9)) else {
            panic!("the last page completes the map")
        };
        let [Kind::Full(full)] = &done[..] else {
            panic!("one full map: {done:?}")
        };
        let ids: Vec<u64> = full.peers.iter().map(|p| p.id).collect();
        assert_eq!(ids, [2, 3, 4]);
        assert_eq!(r.resume_point(), Some((7, 9)));
        // A batch is its changes, in order; the version moves on.
        let removed = |id| Kind::PeerRemoved(PeerRemoved { id });
        let batch = Kind::Batch(MapBatch {
            changes: vec![msg(removed(3), 0), msg(removed(4), 0)],
        });
        assert_eq!(r.read(msg(batch, 10)), Ok(vec![removed(3), removed(4)]));
        assert_eq!(r.resume_point(), Some((7, 10)));
        let nested = Kind::Batch(MapBatch {
            changes: vec![msg(page(&[5], false), 0)],
        });
        assert_eq!(
            r.read(msg(nested, 11)),
            Err(MapError::NestedInBatch {
                kind: "a full map page"
            })
        );
        // A change in the middle of a paged map ends that map.
        assert_eq!(r.read(msg(head, 0)), Ok(vec![]));
        assert_eq!(
            r.read(msg(removed(2), 12)),
            Err(MapError::InterruptedFullMap { kind: "a change" })
        );
        assert_eq!(r.read(msg(page(&[3], false), 0)), Err(MapError::StrayPage));
        // The netmap itself takes neither pages nor batches.
        let mut m = Netmap::default();
        m.apply(Kind::Full(full.clone())).expect("a full map");
        assert_eq!(
            m.apply(page(&[3], false)),
            Err(MapError::Unread {
                kind: "a full map page"
            })
        );
        r.forget();
        assert_eq!(r.resume_point(), None);
    }
}
