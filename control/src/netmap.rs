//! The live netmap: every node as its peers see it, the open map streams, and the policy that
//! decides who sees whom ([`PolicyState`]). A change is turned into deltas for exactly the
//! subscribers it concerns: a node's record goes, built once and shared by reference, to the
//! nodes that may see it; the policy's per-node differences (peers gained or lost, a new packet
//! filter) go to the nodes they name. So a join, move, leave or policy edit costs work in
//! proportion to the nodes and edges it affects, never a rebuild of every node's map. A
//! subscriber that cannot keep up is marked lagging and gets no more deltas; its stream then
//! replaces the backlog with a fresh full map ([`Netmap::resync`]), so its memory stays
//! bounded, nobody else waits for it, and it does not have to reconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;
use warren_proto::control::{
    DerpMap, DnsConfig, FullMap, Node, PeerEndpoints, PeerOnline, PeerRemoved, SettingsChanged,
    map_response::Kind,
};

use ipnet::IpNet;

use crate::policy::{
    CompiledPolicy, DstNet, NodeDelta, NodeId, PacketFilter, PolicyError, PolicyNode, PolicyState,
};

/// One change, shared by every stream that receives it.
pub type Delta = Arc<Kind>;

/// How many deltas a stream may have queued before it counts as lagging.
pub const STREAM_QUEUE: usize = 256;

#[derive(Debug)]
struct Subscriber {
    stream: u64,
    tx: mpsc::Sender<Delta>,
    lagging: Arc<AtomicBool>,
}

/// What a new subscription gets.
#[derive(Debug)]
pub struct Subscription {
    /// Identifies this stream among the node's successive ones.
    pub stream: u64,
    /// The map at the moment of subscribing; deltas follow from exactly there.
    pub full: FullMap,
    /// The deltas.
    pub deltas: mpsc::Receiver<Delta>,
    /// Set when deltas were skipped because the queue was full: call [`Netmap::resync`].
    pub lagging: Arc<AtomicBool>,
}

/// Every node, every open stream, and the policy in force.
#[derive(Debug)]
pub struct Netmap {
    nodes: BTreeMap<u64, Arc<Node>>,
    subscribers: BTreeMap<u64, Subscriber>,
    next_stream: u64,
    dns: DnsConfig,
    derp_map: DerpMap,
    lagged: u64,
    /// Who sees whom and each node's filter. With no policy configured it is not kept up to
    /// date on every change (everyone sees everyone, so a join is one shared delta to every
    /// stream, as cheap as before policy existed): `stale` marks it for a rebuild from
    /// `identities` when it is next asked for.
    policy: PolicyState,
    /// Whether a policy is configured; without one every node gets an allow-all filter.
    policy_on: bool,
    /// `policy` lags behind the nodes (only while no policy is configured).
    stale: bool,
    /// Every node as the policy sees it.
    identities: BTreeMap<u64, PolicyNode>,
    /// Nodes whose peer record depends on the viewer: primary for a subnet route, or an
    /// exit node. Every other record is built once and shared.
    routers: BTreeSet<u64>,
    /// The subnet prefixes each router is primary for.
    primary: BTreeMap<u64, Vec<IpNet>>,
}

/// A router's routes as one viewer sees them: its primary routes the viewer may use, and
/// whether it is an exit node the viewer may use.
type RouteView = (Vec<String>, bool);

/// A node's record as its peers see it: without the advertised and approved lists, which are
/// for the node itself and admins.
fn public(n: &Node) -> Node {
    let mut p = Node::clone(n);
    p.advertised_routes.clear();
    p.approved_routes.clear();
    p
}

impl Default for Netmap {
    fn default() -> Self {
        Self::new(DnsConfig::default(), DerpMap::default(), None)
    }
}

/// What one change sends, shared between the nodes it concerns.
#[derive(Default)]
struct Batch {
    /// Subscribers told about the changed node by a peer-added or peer-removed delta.
    told: BTreeSet<u64>,
    /// One PeerAdded per node, shared by every subscriber that now sees it.
    added: BTreeMap<u64, Delta>,
    /// One PeerRemoved per node.
    removed: BTreeMap<u64, Delta>,
}

/// A node's filter as it goes on the wire.
fn wire_filter(
    policy_on: bool,
    filter: Option<&PacketFilter>,
) -> warren_proto::control::PacketFilter {
    use warren_proto::control::{DstPorts, FilterRule, PacketFilter as Wire};
    if !policy_on {
        return Wire {
            allow_all: true,
            rules: Vec::new(),
        };
    }
    let rules = filter
        .map(|f| {
            f.rules
                .iter()
                .map(|r| FilterRule {
                    src: r.src.iter().map(ToString::to_string).collect(),
                    dst: r
                        .dst
                        .iter()
                        .map(|d| DstPorts {
                            net: match d.net {
                                DstNet::Any => "*".to_owned(),
                                DstNet::Net(n) => n.to_string(),
                            },
                            first: u32::from(d.ports.first),
                            last: u32::from(d.ports.last),
                        })
                        .collect(),
                    protos: r.protos.iter().map(|p| u32::from(*p)).collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    Wire {
        allow_all: false,
        rules,
    }
}

impl Netmap {
    /// An empty netmap with these DNS and DERP settings and this policy (`None`: none
    /// configured, every node sees every other and accepts every packet).
    pub fn new(dns: DnsConfig, derp_map: DerpMap, policy: Option<Arc<CompiledPolicy>>) -> Self {
        let policy_on = policy.is_some();
        let policy = policy.unwrap_or_else(|| Arc::new(CompiledPolicy::allow_all()));
        Self {
            nodes: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            next_stream: 0,
            dns,
            derp_map,
            lagged: 0,
            policy: PolicyState::new(policy),
            policy_on,
            stale: false,
            identities: BTreeMap::new(),
            routers: BTreeSet::new(),
            primary: BTreeMap::new(),
        }
    }

    /// Whether a node's peer record differs between viewers.
    fn per_viewer(&self, id: u64) -> bool {
        self.policy_on && self.routers.contains(&id)
    }

    /// What `viewer` sees of `id`'s routes (Headscale's `RoutesForPeer`): the primary routes
    /// it may reach or be reached from, and the exit node flag if it may use the exit node.
    fn route_view(&self, viewer: u64, id: u64) -> RouteView {
        let Some(n) = self.nodes.get(&id) else {
            return RouteView::default();
        };
        if !self.policy_on {
            return (n.primary_routes.clone(), n.exit_node);
        }
        let routes = self
            .primary
            .get(&id)
            .map(|v| {
                v.iter()
                    .filter(|r| self.policy.route_visible(NodeId(viewer), NodeId(id), **r))
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let exit = n.exit_node && self.policy.exit_offered(NodeId(viewer), NodeId(id));
        (routes, exit)
    }

    /// `n` as `viewer` sees it among its peers.
    fn peer_record(&self, viewer: u64, n: &Node) -> Node {
        let mut p = public(n);
        if self.per_viewer(n.id) {
            (p.primary_routes, p.exit_node) = self.route_view(viewer, n.id);
        }
        p
    }

    /// A delta carrying `id`'s record for `viewer`: one shared delta (kept in `cache`) unless
    /// the record is filtered per viewer.
    fn peer_delta(
        &self,
        viewer: u64,
        id: u64,
        make: fn(Node) -> Kind,
        cache: &mut Option<Delta>,
    ) -> Option<Delta> {
        let n = self.nodes.get(&id)?;
        if self.per_viewer(id) {
            return Some(Arc::new(make(self.peer_record(viewer, n))));
        }
        Some(Arc::clone(
            cache.get_or_insert_with(|| Arc::new(make(public(n)))),
        ))
    }

    /// Route views of every router for each of `viewers` (subscribed ones only).
    fn route_views(&self, viewers: &[u64]) -> BTreeMap<(u64, u64), RouteView> {
        let mut out = BTreeMap::new();
        for &v in viewers {
            if !self.subscribers.contains_key(&v) {
                continue;
            }
            for &r in &self.routers {
                if r != v {
                    out.insert((v, r), self.route_view(v, r));
                }
            }
        }
        out
    }

    /// Sends `PeerChanged` for every (viewer, router) whose route view moved from `before` and
    /// that still see each other, unless the viewer was just sent the router's whole record
    /// (`told`).
    fn send_route_changes(
        &mut self,
        before: &BTreeMap<(u64, u64), RouteView>,
        viewers: &[u64],
        told: &BTreeSet<(u64, u64)>,
    ) -> usize {
        let after = self.route_views(viewers);
        let mut sent = 0;
        for (&(v, r), view) in &after {
            if before.get(&(v, r)).is_some_and(|b| b == view) || told.contains(&(v, r)) {
                continue;
            }
            let visible = !self.policy_on || self.policy.are_peers(NodeId(v), NodeId(r));
            if !visible {
                continue;
            }
            if let Some(n) = self.nodes.get(&r) {
                let rec = self.peer_record(v, n);
                if self.send(v, Arc::new(Kind::PeerChanged(rec))) {
                    sent += 1;
                }
            }
        }
        sent
    }

    /// Number of nodes in the map.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the map has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of streams dropped because they could not keep up.
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    /// The node with this id, as peers see it.
    pub fn node(&self, id: u64) -> Option<&Arc<Node>> {
        self.nodes.get(&id)
    }

    /// The policy state: who sees whom, filters, `explain` (brought up to date first).
    pub fn policy(&mut self) -> &PolicyState {
        self.refresh();
        &self.policy
    }

    /// The compiled policy in force (allow-all when none is configured).
    pub fn compiled_policy(&self) -> &Arc<CompiledPolicy> {
        self.policy.policy()
    }

    /// Rebuilds the allow-all state from the nodes after changes it skipped.
    fn refresh(&mut self) {
        if self.stale {
            let mut state = PolicyState::new(Arc::new(CompiledPolicy::allow_all()));
            for n in self.identities.values() {
                state.upsert_node(n.clone());
            }
            self.policy = state;
            self.stale = false;
        }
    }

    /// Whether a policy is configured.
    pub fn policy_configured(&self) -> bool {
        self.policy_on
    }

    /// Replaces the policy (`None`: none). Atomic: a policy that does not compile against the
    /// nodes or whose `tests` fail changes nothing. Returns the deltas sent.
    pub fn set_policy(
        &mut self,
        policy: Option<Arc<CompiledPolicy>>,
    ) -> Result<usize, PolicyError> {
        let on = policy.is_some();
        if !on && !self.policy_on {
            return Ok(0);
        }
        self.refresh();
        let policy = policy.unwrap_or_else(|| Arc::new(CompiledPolicy::allow_all()));
        let viewers: Vec<u64> = self.subscribers.keys().copied().collect();
        let before = self.route_views(&viewers);
        let deltas = self.policy.set_policy(policy)?;
        let switched = on != self.policy_on;
        self.policy_on = on;
        let mut sent = 0;
        let mut batch = Batch::default();
        let mut told = BTreeSet::new();
        for d in &deltas {
            told.extend(d.peers_added.iter().map(|p| (d.node.0, p.0)));
            sent += self.apply_delta(d, None, &mut batch);
        }
        // Peers kept whose usable routes or exit node changed with the policy.
        sent += self.send_route_changes(&before, &viewers, &told);
        if switched {
            // Every node's filter changes form (allow-all on the wire, or rules): those the
            // deltas did not already give a new filter get one now.
            let told: BTreeSet<u64> = deltas
                .iter()
                .filter(|d| d.filter.is_some())
                .map(|d| d.node.0)
                .collect();
            let ids: Vec<u64> = self
                .subscribers
                .keys()
                .copied()
                .filter(|id| !told.contains(id))
                .collect();
            for id in ids {
                let filter = self.policy.filter_for(NodeId(id));
                let f = wire_filter(self.policy_on, filter.as_ref());
                if self.send(id, Arc::new(Kind::FilterChanged(f))) {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    }

    /// The DNS settings and DERP map every full map carries.
    pub fn settings(&self) -> (&DnsConfig, &DerpMap) {
        (&self.dns, &self.derp_map)
    }

    /// Replaces the DNS settings and the DERP map (a live config reload). When either differs,
    /// every open stream gets one shared `SettingsChanged` delta with both, and keeps going;
    /// full maps carry the new values from now on. Returns the deltas sent.
    pub fn set_settings(&mut self, dns: DnsConfig, derp_map: DerpMap) -> usize {
        if dns == self.dns && derp_map == self.derp_map {
            return 0;
        }
        self.dns = dns;
        self.derp_map = derp_map;
        let delta = Arc::new(Kind::SettingsChanged(SettingsChanged {
            dns: Some(self.dns.clone()),
            derp_map: Some(self.derp_map.clone()),
        }));
        let ids: Vec<u64> = self.subscribers.keys().copied().collect();
        ids.into_iter()
            .filter(|id| self.send(*id, Arc::clone(&delta)))
            .count()
    }

    /// The nodes that see `id` (every other node when no policy is configured).
    fn viewers(&self, id: u64) -> Vec<u64> {
        if !self.policy_on {
            return self.nodes.keys().copied().filter(|n| *n != id).collect();
        }
        self.policy
            .peers_of(NodeId(id))
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.0)
            .collect()
    }

    /// The full map for `id`: itself, every peer it can see, and its packet filter.
    pub fn full_map(&self, id: u64) -> Option<FullMap> {
        let me = self.nodes.get(&id)?;
        let peers = self
            .viewers(id)
            .into_iter()
            .filter_map(|p| self.nodes.get(&p))
            .map(|n| self.peer_record(id, n))
            .collect();
        let filter = self
            .policy_on
            .then(|| self.policy.filter_for(NodeId(id)))
            .flatten();
        Some(FullMap {
            self_node: Some(Node::clone(me)),
            peers,
            dns: Some(self.dns.clone()),
            derp_map: Some(self.derp_map.clone()),
            filter: Some(wire_filter(self.policy_on, filter.as_ref())),
        })
    }

    /// Opens a stream for `id`, replacing (and so closing) any earlier one of that node.
    pub fn subscribe(&mut self, id: u64) -> Option<Subscription> {
        let full = self.full_map(id)?;
        let (tx, deltas) = mpsc::channel(STREAM_QUEUE);
        self.next_stream += 1;
        let stream = self.next_stream;
        let lagging = Arc::new(AtomicBool::new(false));
        let sub = Subscriber {
            stream,
            tx,
            lagging: Arc::clone(&lagging),
        };
        self.subscribers.insert(id, sub);
        Some(Subscription {
            stream,
            full,
            deltas,
            lagging,
        })
    }

    /// Replaces a lagging stream's backlog with a fresh full map and a new, empty queue.
    /// `None` when `stream` is no longer the node's stream.
    pub fn resync(&mut self, id: u64, stream: u64) -> Option<(FullMap, mpsc::Receiver<Delta>)> {
        if self.subscribers.get(&id).is_none_or(|s| s.stream != stream) {
            return None;
        }
        let full = self.full_map(id)?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let sub = self.subscribers.get_mut(&id)?;
        sub.tx = tx;
        sub.lagging.store(false, Ordering::Release);
        Some((full, rx))
    }

    /// Closes stream `stream` of `id`; false when a newer stream had already replaced it.
    pub fn unsubscribe(&mut self, id: u64, stream: u64) -> bool {
        if self
            .subscribers
            .get(&id)
            .is_some_and(|s| s.stream == stream)
        {
            self.subscribers.remove(&id);
            return true;
        }
        false
    }

    /// Whether `id` has an open stream.
    pub fn is_subscribed(&self, id: u64) -> bool {
        self.subscribers.contains_key(&id)
    }

    /// Adds or replaces a node, with its identity for the policy (owner, addresses); tells every
    /// subscriber that can see it, and applies what the change means for the policy (peers
    /// gained or lost, filters). Returns deltas sent.
    pub fn upsert(&mut self, node: Node, identity: PolicyNode) -> usize {
        let id = node.id;
        let primary: Vec<IpNet> = node
            .primary_routes
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect();
        if primary.is_empty() && !node.exit_node {
            self.routers.remove(&id);
            self.primary.remove(&id);
        } else {
            self.routers.insert(id);
            self.primary.insert(id, primary);
        }
        let node = Arc::new(node);
        let existed = self.nodes.insert(id, Arc::clone(&node)).is_some();
        self.identities.insert(id, identity.clone());
        let mut batch = Batch::default();
        let mut sent = 0;
        if self.policy_on {
            // The node as a viewer: what it may use of each router can change with it.
            let before = self.route_views(&[id]);
            let deltas = self.policy.upsert_node(identity);
            let mut told = BTreeSet::new();
            for d in &deltas {
                if d.node.0 == id {
                    told.extend(d.peers_added.iter().map(|p| (id, p.0)));
                }
                sent += self.apply_delta(d, Some(id), &mut batch);
            }
            sent += self.send_route_changes(&before, &[id], &told);
        } else {
            self.stale = true;
            if !existed {
                let delta = Arc::new(Kind::PeerAdded(public(&node)));
                return self.fanout(id, &delta);
            }
        }
        if existed {
            let mut cache = None;
            for viewer in self.viewers(id) {
                if batch.told.contains(&viewer) || !self.subscribers.contains_key(&viewer) {
                    continue;
                }
                if let Some(delta) = self.peer_delta(viewer, id, Kind::PeerChanged, &mut cache)
                    && self.send(viewer, delta)
                {
                    sent += 1;
                }
            }
            if self.send(id, Arc::new(Kind::SelfChanged(Node::clone(&node)))) {
                sent += 1;
            }
        }
        sent
    }

    /// Sends one node's policy difference: records of peers it now sees, removals, its new
    /// filter. `about` is the node whose change caused it; viewers told about it go in
    /// `batch.told`. A record or removal goes out as one shared delta however many nodes get it.
    fn apply_delta(&mut self, d: &NodeDelta, about: Option<u64>, batch: &mut Batch) -> usize {
        let viewer = d.node.0;
        if !self.subscribers.contains_key(&viewer) {
            return 0;
        }
        let mut sent = 0;
        for p in &d.peers_added {
            if Some(p.0) == about {
                batch.told.insert(viewer);
            }
            let mut cache = batch.added.remove(&p.0);
            let delta = self.peer_delta(viewer, p.0, Kind::PeerAdded, &mut cache);
            if let Some(c) = cache {
                batch.added.insert(p.0, c);
            }
            if let Some(delta) = delta
                && self.send(viewer, delta)
            {
                sent += 1;
            }
        }
        for p in &d.peers_removed {
            if Some(p.0) == about {
                batch.told.insert(viewer);
            }
            let delta = Arc::clone(
                batch
                    .removed
                    .entry(p.0)
                    .or_insert_with(|| Arc::new(Kind::PeerRemoved(PeerRemoved { id: p.0 }))),
            );
            if self.send(viewer, delta) {
                sent += 1;
            }
        }
        if let Some(f) = &d.filter {
            let wire = wire_filter(self.policy_on, Some(f));
            if self.send(viewer, Arc::new(Kind::FilterChanged(wire))) {
                sent += 1;
            }
        }
        sent
    }

    /// Removes a node and closes its stream; tells every subscriber that could see it.
    pub fn remove(&mut self, id: u64) -> usize {
        if self.nodes.remove(&id).is_none() {
            return 0;
        }
        self.subscribers.remove(&id);
        self.identities.remove(&id);
        self.routers.remove(&id);
        self.primary.remove(&id);
        if !self.policy_on {
            self.stale = true;
            let delta = Arc::new(Kind::PeerRemoved(PeerRemoved { id }));
            return self.fanout(id, &delta);
        }
        let deltas = self.policy.remove_node(NodeId(id));
        let mut batch = Batch::default();
        deltas
            .iter()
            .map(|d| self.apply_delta(d, Some(id), &mut batch))
            .sum()
    }

    /// Replaces a node's endpoints; tells every subscriber that can see it.
    pub fn set_endpoints(&mut self, id: u64, endpoints: Vec<String>) -> usize {
        let Some(node) = self.nodes.get_mut(&id) else {
            return 0;
        };
        Arc::make_mut(node).endpoints = endpoints.clone();
        let delta = Arc::new(Kind::PeerEndpoints(PeerEndpoints { id, endpoints }));
        self.fanout(id, &delta)
    }

    /// Marks a node online or offline; tells every subscriber that can see it.
    pub fn set_online(&mut self, id: u64, online: bool, last_seen_unix_ms: i64) -> usize {
        let Some(node) = self.nodes.get_mut(&id) else {
            return 0;
        };
        let n = Arc::make_mut(node);
        if n.online == online {
            return 0;
        }
        n.online = online;
        n.last_seen_unix_ms = last_seen_unix_ms;
        let delta = Arc::new(Kind::PeerOnline(PeerOnline {
            id,
            online,
            last_seen_unix_ms,
        }));
        self.fanout(id, &delta)
    }

    fn fanout(&mut self, about: u64, delta: &Delta) -> usize {
        let targets: Vec<u64> = if self.policy_on {
            self.viewers(about)
                .into_iter()
                .filter(|viewer| self.subscribers.contains_key(viewer))
                .collect()
        } else {
            // Everyone sees everyone: every stream but the node's own.
            self.subscribers
                .keys()
                .copied()
                .filter(|viewer| *viewer != about)
                .collect()
        };
        targets
            .into_iter()
            .filter(|t| self.send(*t, Arc::clone(delta)))
            .count()
    }

    fn send(&mut self, to: u64, delta: Delta) -> bool {
        let Some(sub) = self.subscribers.get(&to) else {
            return false;
        };
        if sub.lagging.load(Ordering::Acquire) {
            return false;
        }
        match sub.tx.try_send(delta) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(node = to, "map stream lagging; it gets a fresh full map");
                self.lagged += 1;
                sub.lagging.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.subscribers.remove(&to);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyUser;

    fn node(id: u64) -> Node {
        Node {
            id,
            given_name: format!("n{id}"),
            ..Node::default()
        }
    }

    fn ident(id: u64) -> PolicyNode {
        let user = PolicyUser {
            id: 1,
            name: "u".into(),
            email: None,
        };
        let n = u32::try_from(id).expect("small id");
        PolicyNode::user(
            id,
            &format!("n{id}"),
            user,
            std::net::Ipv4Addr::from(0x6440_0000 + n),
            std::net::Ipv6Addr::from(0xfd7a_115c_a1e0_u128 << 80 | u128::from(n)),
        )
    }

    /// Adds or replaces node `id` (owned by user `u`).
    fn put(m: &mut Netmap, id: u64) -> usize {
        m.upsert(node(id), ident(id))
    }

    #[test]
    fn subscriber_gets_full_map_then_only_deltas_about_others() {
        let mut m = Netmap::default();
        put(&mut m, 1);
        put(&mut m, 2);
        let mut sub = m.subscribe(1).expect("known");
        assert_eq!(sub.full.peers.len(), 1);
        assert_eq!(sub.full.self_node.as_ref().map(|n| n.id), Some(1));
        assert_eq!(put(&mut m, 3), 1);
        assert!(matches!(&*sub.deltas.try_recv().expect("delta"), Kind::PeerAdded(n) if n.id == 3));
        assert_eq!(m.set_endpoints(3, vec!["10.0.0.3:1".into()]), 1);
        assert!(
            matches!(&*sub.deltas.try_recv().expect("delta"), Kind::PeerEndpoints(e) if e.id == 3)
        );
        assert_eq!(m.set_online(2, true, 7), 1);
        assert_eq!(m.set_online(2, true, 8), 0, "no change, no delta");
        assert_eq!(m.remove(3), 1);
        let _ = sub.deltas.try_recv();
        assert!(
            matches!(&*sub.deltas.try_recv().expect("delta"), Kind::PeerRemoved(r) if r.id == 3)
        );
        // A change to the subscriber itself arrives as SelfChanged, not as a peer.
        assert_eq!(put(&mut m, 1), 1);
        assert!(
            matches!(&*sub.deltas.try_recv().expect("delta"), Kind::SelfChanged(n) if n.id == 1)
        );
    }

    #[test]
    fn join_costs_one_delta_per_subscriber() {
        let mut m = Netmap::default();
        let mut subs = Vec::new();
        for id in 1..=50 {
            put(&mut m, id);
        }
        for id in 1..=50 {
            subs.push(m.subscribe(id).expect("known"));
        }
        assert_eq!(put(&mut m, 51), 50);
    }

    #[test]
    fn a_lagging_stream_is_resynced_and_others_keep_their_deltas() {
        let mut m = Netmap::default();
        put(&mut m, 1);
        put(&mut m, 2);
        let mut slow = m.subscribe(1).expect("known");
        let mut fast = m.subscribe(2).expect("known");
        let joins = STREAM_QUEUE as u64 + 5;
        let mut fast_got = 0;
        for i in 0..joins {
            put(&mut m, 100 + i);
            while fast.deltas.try_recv().is_ok() {
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, joins, "the fast stream missed nothing");
        assert!(slow.lagging.load(Ordering::Acquire));
        assert_eq!(m.lagged(), 1);
        // The slow stream's memory stayed bounded: only the queue's worth was kept.
        let mut queued = 0;
        while slow.deltas.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, STREAM_QUEUE);
        let (full, mut rx) = m.resync(1, slow.stream).expect("still subscribed");
        assert_eq!(
            full.peers.len() as u64,
            1 + joins,
            "the full map has all it missed"
        );
        assert!(!slow.lagging.load(Ordering::Acquire));
        put(&mut m, 9999);
        let d = rx.try_recv().expect("delta after resync");
        assert!(matches!(&*d, Kind::PeerAdded(n) if n.id == 9999));
        assert!(m.resync(1, slow.stream + 100).is_none());
    }

    #[test]
    fn replaced_stream_does_not_unsubscribe_the_new_one() {
        let mut m = Netmap::default();
        put(&mut m, 1);
        let old = m.subscribe(1).expect("known");
        let new = m.subscribe(1).expect("known");
        assert!(!m.unsubscribe(1, old.stream));
        assert!(m.is_subscribed(1));
        assert!(m.unsubscribe(1, new.stream));
    }

    fn owned_by(id: u64, user: u64, name: &str) -> PolicyNode {
        let mut n = ident(id);
        n.owner = crate::policy::NodeOwner::User(PolicyUser {
            id: user,
            name: name.into(),
            email: None,
        });
        n
    }

    fn drain(sub: &mut Subscription) -> Vec<Kind> {
        let mut out = Vec::new();
        while let Ok(d) = sub.deltas.try_recv() {
            out.push(Kind::clone(&d));
        }
        out
    }

    fn peer_ids(full: &FullMap) -> Vec<u64> {
        full.peers.iter().map(|n| n.id).collect()
    }

    #[test]
    fn each_node_sees_only_what_policy_allows_and_hears_only_its_differences() {
        let policy = |text: &str| Some(Arc::new(CompiledPolicy::from_text(text).expect("policy")));
        // alice may reach bob on TCP 22; carol nobody.
        let only_ssh = r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:22"], "proto": "tcp"}]}"#;
        let mut m = Netmap::new(DnsConfig::default(), DerpMap::default(), policy(only_ssh));
        for (id, user, name) in [(1, 1, "alice"), (2, 2, "bob"), (3, 3, "carol")] {
            m.upsert(node(id), owned_by(id, user, name));
        }
        let mut alice = m.subscribe(1).expect("known");
        let mut bob = m.subscribe(2).expect("known");
        let mut carol = m.subscribe(3).expect("known");
        assert_eq!(peer_ids(&alice.full), [2]);
        assert_eq!(
            peer_ids(&bob.full),
            [1],
            "a peer when either may reach the other"
        );
        assert_eq!(peer_ids(&carol.full), Vec::<u64>::new());
        let bob_filter = bob.full.filter.clone().expect("filter");
        assert!(!bob_filter.allow_all);
        assert_eq!(bob_filter.rules.len(), 1);
        assert_eq!(
            bob_filter.rules[0].src,
            ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
        );
        assert_eq!(bob_filter.rules[0].protos, [6]);
        let dst = &bob_filter.rules[0].dst;
        assert!(dst.iter().all(|d| d.first == 22 && d.last == 22), "{dst:?}");
        let alice_filter = alice.full.filter.clone().expect("filter");
        assert!(
            !alice_filter.allow_all && alice_filter.rules.is_empty(),
            "nothing may reach alice"
        );

        // carol's endpoints move: nobody sees carol, nobody hears of it.
        assert_eq!(m.set_endpoints(3, vec!["10.0.0.3:1".into()]), 0);
        assert!(drain(&mut alice).is_empty() && drain(&mut bob).is_empty());

        // A policy edit that lets carol reach bob too: carol and bob learn of each other and
        // bob's filter changes; alice hears nothing.
        let edited = r#"{"acls": [{"action": "accept", "src": ["alice@", "carol@"], "dst": ["bob@:22"], "proto": "tcp"}]}"#;
        let sent = m.set_policy(policy(edited)).expect("applies");
        assert!(drain(&mut alice).is_empty());
        let to_bob = drain(&mut bob);
        assert!(
            to_bob
                .iter()
                .any(|k| matches!(k, Kind::PeerAdded(n) if n.id == 3)),
            "{to_bob:?}"
        );
        assert!(
            to_bob
                .iter()
                .any(|k| matches!(k, Kind::FilterChanged(f) if f.rules[0].src.len() == 4)),
            "{to_bob:?}"
        );
        let to_carol = drain(&mut carol);
        assert_eq!(to_carol.len(), 1, "{to_carol:?}");
        assert!(matches!(&to_carol[0], Kind::PeerAdded(n) if n.id == 2));
        assert_eq!(sent, to_bob.len() + to_carol.len());

        // A policy whose tests fail changes nothing and tells nobody.
        let failing = r#"{"acls": [], "tests": [{"src": "carol@", "accept": ["100.64.0.2:22"]}]}"#;
        let err = m.set_policy(policy(failing)).expect_err("tests fail");
        assert!(matches!(err, PolicyError::TestsFailed { .. }), "{err}");
        assert!(drain(&mut bob).is_empty() && drain(&mut carol).is_empty());
        assert_eq!(m.full_map(3).map(|f| peer_ids(&f)), Some(vec![2]));

        // carol's node becomes a tagged node: no longer carol's, it loses bob.
        let mut tagged = owned_by(3, 3, "carol");
        tagged.owner = crate::policy::NodeOwner::Tags(vec!["tag:x".into()]);
        let tagged_policy = r#"{"tagOwners": {"tag:x": ["carol@"]}, "acls": [{"action": "accept", "src": ["alice@", "carol@"], "dst": ["bob@:22"], "proto": "tcp"}]}"#;
        m.set_policy(policy(tagged_policy)).expect("applies");
        drain(&mut bob);
        drain(&mut carol);
        m.upsert(node(3), tagged);
        let to_bob = drain(&mut bob);
        assert!(
            to_bob
                .iter()
                .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == 3)),
            "{to_bob:?}"
        );
        assert!(
            !to_bob.iter().any(|k| matches!(k, Kind::PeerChanged(_))),
            "{to_bob:?}"
        );
        let to_carol = drain(&mut carol);
        assert!(
            to_carol
                .iter()
                .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == 2)),
            "{to_carol:?}"
        );

        // No policy again: everyone sees everyone, and filters say allow-all.
        m.set_policy(None).expect("applies");
        let to_alice = drain(&mut alice);
        assert!(
            to_alice
                .iter()
                .any(|k| matches!(k, Kind::PeerAdded(n) if n.id == 3)),
            "{to_alice:?}"
        );
        assert!(
            to_alice
                .iter()
                .any(|k| matches!(k, Kind::FilterChanged(f) if f.allow_all)),
            "{to_alice:?}"
        );
    }

    #[test]
    fn routes_are_shared_without_a_policy_and_filtered_per_viewer_with_one() {
        let mut m = Netmap::default();
        let mut router = node(1);
        router.advertised_routes = vec!["10.0.0.0/24".into(), "0.0.0.0/0".into(), "::/0".into()];
        router.approved_routes = router.advertised_routes.clone();
        router.primary_routes = vec!["10.0.0.0/24".into()];
        router.exit_node = true;
        let mut router_id = owned_by(1, 1, "ops");
        router_id.approved_routes = ["10.0.0.0/24", "0.0.0.0/0", "::/0"]
            .iter()
            .map(|r| r.parse().expect("prefix"))
            .collect();
        m.upsert(router.clone(), router_id.clone());
        for (id, user, name) in [(2, 2, "alice"), (3, 3, "bob")] {
            m.upsert(node(id), owned_by(id, user, name));
        }
        let mut alice = m.subscribe(2).expect("known");
        let mut bob = m.subscribe(3).expect("known");
        let seen = |full: &FullMap| {
            let r = full.peers.iter().find(|n| n.id == 1).expect("router");
            assert!(r.advertised_routes.is_empty() && r.approved_routes.is_empty());
            (r.primary_routes.clone(), r.exit_node)
        };
        assert_eq!(seen(&alice.full), (vec!["10.0.0.0/24".to_owned()], true));
        assert_eq!(seen(&bob.full), (vec!["10.0.0.0/24".to_owned()], true));
        // No policy: a router's change is one delta shared by every viewer.
        assert_eq!(m.upsert(router.clone(), router_id.clone()), 2);
        let (a, b) = (
            alice.deltas.try_recv().expect("delta"),
            bob.deltas.try_recv().expect("delta"),
        );
        assert!(Arc::ptr_eq(&a, &b), "one delta, shared");

        // alice may reach 10.0.0.0/8 (not the internet); bob nothing.
        let text =
            r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["10.0.0.0/8:*"]}]}"#;
        let compiled = Arc::new(CompiledPolicy::from_text(text).expect("policy"));
        m.set_policy(Some(compiled)).expect("applies");
        let to_alice = drain(&mut alice);
        let changed: Vec<(Vec<String>, bool)> = to_alice
            .iter()
            .filter_map(|k| match k {
                Kind::PeerChanged(n) if n.id == 1 => Some((n.primary_routes.clone(), n.exit_node)),
                _ => None,
            })
            .collect();
        assert_eq!(
            changed,
            [(vec!["10.0.0.0/24".to_owned()], false)],
            "{to_alice:?}"
        );
        assert!(
            drain(&mut bob)
                .iter()
                .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == 1))
        );
        // With a policy, each viewer gets its own record.
        assert_eq!(m.upsert(router, router_id), 1);
        assert!(matches!(&*alice.deltas.try_recv().expect("delta"),
            Kind::PeerChanged(n) if n.primary_routes == ["10.0.0.0/24"] && !n.exit_node));
    }

    #[test]
    fn without_a_policy_joins_are_one_shared_delta_and_a_later_policy_sees_every_node() {
        let mut m = Netmap::default();
        for (id, user, name) in [(1, 1, "alice"), (2, 2, "bob")] {
            m.upsert(node(id), owned_by(id, user, name));
        }
        let mut alice = m.subscribe(1).expect("known");
        let mut bob = m.subscribe(2).expect("known");
        assert!(alice.full.filter.as_ref().is_some_and(|f| f.allow_all));
        // carol joins while no policy is configured: both hear the same shared delta.
        assert_eq!(m.upsert(node(3), owned_by(3, 3, "carol")), 2);
        let (a, b) = (
            alice.deltas.try_recv().expect("delta"),
            bob.deltas.try_recv().expect("delta"),
        );
        assert!(Arc::ptr_eq(&a, &b), "one delta, shared");
        let mut carol = m.subscribe(3).expect("known");
        assert_eq!(peer_ids(&carol.full), [1, 2]);
        // The policy state caught up with the joins it skipped.
        assert_eq!(m.policy().len(), 3);

        // A policy arrives: carol loses both, alice and bob keep each other.
        let only_ssh = r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:22"], "proto": "tcp"}]}"#;
        let compiled = Arc::new(CompiledPolicy::from_text(only_ssh).expect("policy"));
        m.set_policy(Some(compiled)).expect("applies");
        let to_carol = drain(&mut carol);
        let removed: Vec<u64> = to_carol
            .iter()
            .filter_map(|k| match k {
                Kind::PeerRemoved(r) => Some(r.id),
                _ => None,
            })
            .collect();
        assert_eq!(removed, [1, 2], "{to_carol:?}");
        let filters: Vec<&Kind> = to_carol
            .iter()
            .filter(|k| matches!(k, Kind::FilterChanged(_)))
            .collect();
        assert!(
            matches!(filters[..], [Kind::FilterChanged(f)] if !f.allow_all && f.rules.is_empty()),
            "one new filter, not one per mechanism: {to_carol:?}"
        );
        let to_alice = drain(&mut alice);
        assert!(
            to_alice
                .iter()
                .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == 3))
        );
        assert!(
            !to_alice
                .iter()
                .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == 2))
        );
        drain(&mut bob);

        // And goes away again: everyone sees everyone, every filter is allow-all.
        m.set_policy(None).expect("applies");
        let to_carol = drain(&mut carol);
        let added: Vec<u64> = to_carol
            .iter()
            .filter_map(|k| match k {
                Kind::PeerAdded(n) => Some(n.id),
                _ => None,
            })
            .collect();
        assert_eq!(added, [1, 2], "{to_carol:?}");
        assert!(
            to_carol
                .iter()
                .any(|k| matches!(k, Kind::FilterChanged(f) if f.allow_all))
        );
        assert_eq!(
            m.set_policy(None),
            Ok(0),
            "no policy to no policy changes nothing"
        );
    }

    #[test]
    fn new_settings_are_one_shared_delta_to_every_stream_and_in_later_full_maps() {
        let mut m = Netmap::default();
        put(&mut m, 1);
        put(&mut m, 2);
        let mut a = m.subscribe(1).expect("known");
        let mut b = m.subscribe(2).expect("known");
        let dns = DnsConfig {
            nameservers: vec!["9.9.9.9".into()],
            ..DnsConfig::default()
        };
        assert_eq!(m.set_settings(dns.clone(), DerpMap::default()), 2);
        let (da, db) = (
            a.deltas.try_recv().expect("delta"),
            b.deltas.try_recv().expect("delta"),
        );
        assert!(Arc::ptr_eq(&da, &db), "one delta, shared");
        assert!(
            matches!(&*da, Kind::SettingsChanged(s) if s.dns.as_ref() == Some(&dns)
                && s.derp_map == Some(DerpMap::default()))
        );
        assert_eq!(
            m.set_settings(dns.clone(), DerpMap::default()),
            0,
            "no change, no delta"
        );
        assert!(a.deltas.try_recv().is_err());
        assert_eq!(m.full_map(1).and_then(|f| f.dns), Some(dns));
    }
}
