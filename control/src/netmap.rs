//! The live netmap: every node as its peers see it, the open map streams, and the policy that
//! decides who sees whom ([`PolicyState`]). A change is turned into deltas for exactly the
//! subscribers it concerns: a node's record goes, built once and shared by reference, to the
//! nodes that may see it; the policy's per-node differences (peers gained or lost, a new packet
//! filter) go to the nodes they name. So a join, move, leave or policy edit costs work in
//! proportion to the nodes and edges it affects, never a rebuild of every node's map.
//!
//! Deltas go into each stream's [`Outbox`], which coalesces them per peer; the stream's task
//! sends what is pending once per tick, without the core lock. Every change counts one map
//! version; a stream reports the version each message brings the node to, and a node that
//! reconnects with a version the netmap still covers gets only what changed since
//! ([`Netmap::subscribe`]). Full maps are read page by page from a shared copy of the records
//! ([`FullMapSource`]), so no stream ever holds a whole map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use warren_proto::control::{
    DerpMap, DnsConfig, FullMap, Node, PeerEndpoints, PeerOnline, PeerRemoved, SettingsChanged,
    map_response::Kind,
};

use ipnet::IpNet;

pub use crate::outbox::Delta;
use crate::outbox::{Outbox, Pushed};
use crate::policy::{
    CompiledPolicy, DstNet, NodeDelta, NodeId, PacketFilter, PolicyError, PolicyNode, PolicyState,
};

/// Most removals remembered for resuming streams; a node whose version is older than the
/// oldest forgotten one gets a full map.
pub const MAX_REMOVED: usize = 65_536;

#[derive(Debug)]
struct Subscriber {
    stream: u64,
    outbox: Arc<Outbox>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // Replaced, deleted or expired: the stream's task ends it.
        self.outbox.close();
    }
}

/// Node records as streams read them for full maps, outside the core lock.
pub type SharedRecords = Arc<RwLock<BTreeMap<u64, Arc<Node>>>>;

/// How a new stream starts.
#[derive(Debug)]
pub enum Start {
    /// With a full map.
    Full(Box<FullMapSource>),
    /// With the changes since the version the node resumed from, in the order they apply.
    Resume(Vec<Delta>),
}

/// What a new subscription gets.
#[derive(Debug)]
pub struct Subscription {
    /// Identifies this stream among the node's successive ones.
    pub stream: u64,
    /// The first thing to send; pending changes follow from exactly there.
    pub start: Start,
    /// The map version the node holds once it has `start`.
    pub version: u64,
    /// The changes since `start`, coalesced.
    pub outbox: Arc<Outbox>,
    /// The map version every change up to which is already in the outbox (read it before
    /// taking the outbox).
    pub published: Arc<AtomicU64>,
}

impl Subscription {
    /// The whole full map the stream starts with, as it would read now (`None` when it
    /// resumes); for tests and benchmarks, which read a subscription without a stream.
    pub fn full_map(&self) -> Option<FullMap> {
        match &self.start {
            Start::Full(src) => Some(FullMapSource::clone(src).collect()),
            Start::Resume(_) => None,
        }
    }
}

/// A full map read page by page: the node's own record, settings and filter as they were when
/// the stream started, and the peers' records as they are when each page is made. A record
/// that changes while the pages go out is also pending in the stream's outbox, so the node
/// ends up with the newest one either way.
#[derive(Debug, Clone)]
pub struct FullMapSource {
    head: Option<FullMap>,
    records: SharedRecords,
    me: u64,
    /// With a policy: the peers the node may see, ascending. `None`: every other node.
    visible: Option<Vec<u64>>,
    /// Records that differ per viewer (routers under a policy), as this node sees them.
    own: BTreeMap<u64, Node>,
    /// The last peer id sent (or index into `visible`).
    cursor: usize,
    last: Option<u64>,
    done: bool,
    /// The map version the full map stands for.
    pub version: u64,
}

/// Wire size of a repeated message field holding `n` bytes (tag, length, body).
fn field_len(n: usize) -> usize {
    1 + prost::length_delimiter_len(n) + n
}

impl FullMapSource {
    /// The map's first message without peers: the node's record, settings, filter, map id.
    pub fn take_head(&mut self) -> FullMap {
        self.head.take().unwrap_or_default()
    }

    /// Whether every peer has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn record(&self, n: &Arc<Node>) -> Node {
        self.own.get(&n.id).cloned().unwrap_or_else(|| public(n))
    }

    /// The next peers, as many as fit in `budget` encoded bytes (at least one while any are
    /// left); empty once every peer has been read.
    pub fn next_page(&mut self, budget: usize) -> Vec<Node> {
        let mut page = Vec::new();
        if self.done {
            return page;
        }
        let mut used = 0;
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        // Measured before the copy (on the stored record, which is never smaller than what
        // peers get), so a record that does not fit is not copied.
        let fits = |used: usize, n: &Node, page: &Vec<Node>| {
            let len = field_len(prost::Message::encoded_len(n));
            (page.is_empty() || used + len <= budget).then_some(len)
        };
        match &self.visible {
            None => {
                let from = self.last.map_or(Bound::Unbounded, Bound::Excluded);
                let mut rest = records
                    .range((from, Bound::Unbounded))
                    .filter(|(id, _)| **id != self.me)
                    .peekable();
                while let Some((id, n)) = rest.peek() {
                    let Some(len) = fits(used, self.own.get(id).unwrap_or(n), &page) else {
                        break;
                    };
                    used += len;
                    self.last = Some(**id);
                    page.push(self.record(n));
                    rest.next();
                }
                self.done = rest.peek().is_none();
            }
            Some(visible) => {
                while let Some(id) = visible.get(self.cursor) {
                    let Some(n) = records.get(id) else {
                        // Removed since the stream started: its removal is pending.
                        self.cursor += 1;
                        continue;
                    };
                    let Some(len) = fits(used, self.own.get(id).unwrap_or(n), &page) else {
                        break;
                    };
                    used += len;
                    page.push(self.record(n));
                    self.cursor += 1;
                }
                self.done = self.cursor >= visible.len();
            }
        }
        page
    }

    /// The whole map in one message.
    pub fn collect(mut self) -> FullMap {
        let mut full = self.take_head();
        while !self.done {
            full.peers.extend(self.next_page(usize::MAX));
        }
        full
    }
}

/// Where a restarted netmap's versions continue from, and what it remembers of the versions
/// before (kept in the database: see [`crate::store::MapState`]).
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Identifies the map (random, made with the database).
    pub map_id: u64,
    /// Every version handed out before this start is below it.
    pub boot: u64,
    /// Nodes resuming from below it get a full map (removals before it are forgotten).
    pub floor: u64,
    /// Version of the last policy change.
    pub policy_version: u64,
    /// Removed nodes: (version, node id).
    pub removed: Vec<(u64, u64)>,
}

/// Map versions: every change counts one; what a resuming stream needs to catch up.
#[derive(Debug, Default)]
struct Versions {
    map_id: u64,
    current: u64,
    /// Versions below it were handed out by an earlier process, whose online states are gone.
    boot: u64,
    floor: u64,
    policy: u64,
    published: Arc<AtomicU64>,
    /// While set ([`Netmap::pin`]), every change gets this version: the change log's, for one
    /// committed change and whatever it causes (an election's republications).
    pinned: Option<u64>,
    /// Each node's last record change, and the same by version.
    record: HashMap<u64, u64>,
    records: BTreeMap<u64, u64>,
    /// Each node's last online change (in this process), and the same by version.
    online: HashMap<u64, u64>,
    onlines: BTreeMap<u64, u64>,
    /// Removals: version to node.
    removed: BTreeMap<u64, u64>,
    /// Each node's online state as one shared delta, made when a resuming stream first needs
    /// it (after a restart every resuming stream needs every peer's).
    online_deltas: std::sync::Mutex<HashMap<u64, Delta>>,
}

impl Versions {
    fn next(&mut self) -> u64 {
        match self.pinned {
            Some(v) => self.current = self.current.max(v),
            None => self.current += 1,
        }
        self.current
    }

    fn publish(&self) {
        self.published.store(self.current, Ordering::Release);
    }

    fn set_record(&mut self, id: u64, v: u64) {
        // The record carries the online state too (a node's record changes with it).
        self.forget_online_delta(id);
        if let Some(old) = self.record.insert(id, v) {
            self.records.remove(&old);
        }
        self.records.insert(v, id);
    }

    fn set_online(&mut self, id: u64) {
        self.forget_online_delta(id);
        let v = self.next();
        if let Some(old) = self.online.insert(id, v) {
            self.onlines.remove(&old);
        }
        self.onlines.insert(v, id);
    }

    fn forget_online_delta(&self, id: u64) {
        self.online_deltas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// `n`'s online state as a delta, shared between every stream that needs it.
    fn online_delta(&self, n: &Node) -> Delta {
        let mut cache = self.online_deltas.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(cache.entry(n.id).or_insert_with(|| {
            Arc::new(Kind::PeerOnline(PeerOnline {
                id: n.id,
                online: n.online,
                last_seen_unix_ms: n.last_seen_unix_ms,
            }))
        }))
    }

    fn remove(&mut self, id: u64) -> u64 {
        self.forget_online_delta(id);
        if let Some(old) = self.record.remove(&id) {
            self.records.remove(&old);
        }
        if let Some(old) = self.online.remove(&id) {
            self.onlines.remove(&old);
        }
        let v = self.next();
        self.removed.insert(v, id);
        while self.removed.len() > MAX_REMOVED {
            if let Some((forgotten, _)) = self.removed.pop_first() {
                self.floor = self.floor.max(forgotten);
            }
        }
        v
    }
}

/// Every node, every open stream, and the policy in force.
#[derive(Debug)]
pub struct Netmap {
    nodes: BTreeMap<u64, Arc<Node>>,
    /// The same records, for full maps read outside the core lock.
    records: SharedRecords,
    subscribers: BTreeMap<u64, Subscriber>,
    next_stream: u64,
    dns: DnsConfig,
    derp_map: DerpMap,
    lagged: u64,
    /// Shutting down: nothing is sent ([`Netmap::stop_sending`]).
    stopping: bool,
    versions: Versions,
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
            records: SharedRecords::default(),
            subscribers: BTreeMap::new(),
            next_stream: 0,
            dns,
            derp_map,
            lagged: 0,
            stopping: false,
            versions: Versions {
                map_id: 1,
                ..Versions::default()
            },
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
        let v = self.versions.next();
        self.versions.policy = v;
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
        self.versions.publish();
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
        self.full_map_source(id).map(FullMapSource::collect)
    }

    /// The map version: how many changes there have been.
    pub fn version(&self) -> u64 {
        self.versions.current
    }

    /// The map's id (the database's), which versions count in.
    pub fn map_id(&self) -> u64 {
        self.versions.map_id
    }

    /// The version of the last policy change.
    pub fn policy_version(&self) -> u64 {
        self.versions.policy
    }

    /// Gives every change until [`Netmap::unpin`] the version `version` (a change-log entry and
    /// what it causes), instead of counting one each.
    pub fn pin(&mut self, version: u64) {
        self.versions.pinned = Some(version);
    }

    /// Ends [`Netmap::pin`]: the map is at the pinned version even if nothing changed, and
    /// streams may say so.
    pub fn unpin(&mut self) {
        if let Some(v) = self.versions.pinned.take() {
            self.versions.current = self.versions.current.max(v);
        }
        self.versions.publish();
    }

    /// Counts a policy change that this netmap does not enforce (another instance's policy
    /// file): nodes resuming from before it get full maps.
    pub fn note_policy_change(&mut self) {
        self.versions.policy = self.versions.next();
    }

    /// Takes up the versions of an earlier run (call before adding nodes).
    pub fn restore(&mut self, r: &Restored) {
        let v = &mut self.versions;
        v.map_id = r.map_id;
        v.current = r.boot;
        v.boot = r.boot;
        v.floor = r.floor;
        v.policy = r.policy_version;
        v.removed = r.removed.iter().copied().collect();
        v.publish();
    }

    /// Opens a stream for `id`, replacing (and so closing) any earlier one of that node. With
    /// `resume` (map id, version the node applied) that this netmap still covers, the stream
    /// starts with the changes since then; otherwise with a full map.
    pub fn subscribe(&mut self, id: u64, resume: Option<(u64, u64)>) -> Option<Subscription> {
        if !self.nodes.contains_key(&id) {
            return None;
        }
        // Without a policy nothing here asks the policy state (and rebuilding it would cost
        // every node's identity).
        if self.policy_on {
            self.refresh();
        }
        let start = match resume.and_then(|(map, v)| self.changes_since(id, map, v)) {
            Some(changes) => Start::Resume(changes),
            None => Start::Full(Box::new(self.full_map_source(id)?)),
        };
        self.next_stream += 1;
        let stream = self.next_stream;
        let outbox = Arc::new(Outbox::default());
        self.subscribers.insert(
            id,
            Subscriber {
                stream,
                outbox: Arc::clone(&outbox),
            },
        );
        Some(Subscription {
            stream,
            start,
            version: self.versions.current,
            outbox,
            published: Arc::clone(&self.versions.published),
        })
    }

    /// A full map for a stream whose outbox overflowed; its backlog is dropped (the map covers
    /// it). `None` when `stream` is no longer the node's stream.
    pub fn resync(&mut self, id: u64, stream: u64) -> Option<FullMapSource> {
        let sub = self.subscribers.get(&id).filter(|s| s.stream == stream)?;
        sub.outbox.reset();
        if self.policy_on {
            self.refresh();
        }
        self.full_map_source(id)
    }

    /// A full map of `id`, read page by page.
    fn full_map_source(&self, id: u64) -> Option<FullMapSource> {
        let me = self.nodes.get(&id)?;
        let filter = self
            .policy_on
            .then(|| self.policy.filter_for(NodeId(id)))
            .flatten();
        let head = FullMap {
            self_node: Some(Node::clone(me)),
            peers: Vec::new(),
            dns: Some(self.dns.clone()),
            derp_map: Some(self.derp_map.clone()),
            filter: Some(wire_filter(self.policy_on, filter.as_ref())),
            more: false,
            map_id: self.versions.map_id,
        };
        let visible = self.policy_on.then(|| self.viewers(id));
        let own = self
            .routers
            .iter()
            .filter(|r| **r != id && self.per_viewer(**r))
            .filter_map(|r| self.nodes.get(r))
            .map(|n| (n.id, self.peer_record(id, n)))
            .collect();
        Some(FullMapSource {
            head: Some(head),
            records: Arc::clone(&self.records),
            me: id,
            visible,
            own,
            cursor: 0,
            last: None,
            done: false,
            version: self.versions.current,
        })
    }

    /// What `id` needs to go from map version `version` of map `map_id` to now, or `None` when
    /// only a full map will do: another map, a version this netmap never handed out or no
    /// longer covers, a policy change since, or a change to the node itself (its identity
    /// decides what it sees).
    fn changes_since(&self, id: u64, map_id: u64, version: u64) -> Option<Vec<Delta>> {
        let v = &self.versions;
        if map_id != v.map_id
            || version == 0
            || version > v.current
            || version < v.floor
            || v.policy > version
            || v.record.get(&id).is_none_or(|r| *r > version)
        {
            return None;
        }
        let me = self.nodes.get(&id)?;
        let visible = |p: u64| {
            p != id
                && self.nodes.contains_key(&p)
                && (!self.policy_on || self.policy.are_peers(NodeId(id), NodeId(p)))
        };
        let filter = self
            .policy_on
            .then(|| self.policy.filter_for(NodeId(id)))
            .flatten();
        let mut out: Vec<Delta> = vec![
            Arc::new(Kind::SettingsChanged(SettingsChanged {
                dns: Some(self.dns.clone()),
                derp_map: Some(self.derp_map.clone()),
            })),
            Arc::new(Kind::SelfChanged(Node::clone(me))),
            Arc::new(Kind::FilterChanged(wire_filter(
                self.policy_on,
                filter.as_ref(),
            ))),
        ];
        let after = (Bound::Excluded(version), Bound::Unbounded);
        for (_, &p) in v.removed.range(after) {
            if !self.nodes.contains_key(&p) {
                out.push(Arc::new(Kind::PeerRemoved(PeerRemoved { id: p })));
            }
        }
        let mut told = BTreeSet::new();
        for (_, &p) in v.records.range(after) {
            if p == id {
                continue;
            }
            told.insert(p);
            match self.nodes.get(&p) {
                Some(n) if visible(p) => {
                    out.push(Arc::new(Kind::PeerChanged(self.peer_record(id, n))));
                }
                _ => out.push(Arc::new(Kind::PeerRemoved(PeerRemoved { id: p }))),
            }
        }
        let online = |n: &Node| v.online_delta(n);
        if version < v.boot {
            // Online states from before this process are gone: every peer's, as it is now.
            for n in self.nodes.values() {
                if !told.contains(&n.id) && visible(n.id) {
                    out.push(online(n));
                }
            }
        } else {
            for (_, &p) in v.onlines.range(after) {
                if !told.contains(&p)
                    && visible(p)
                    && let Some(n) = self.nodes.get(&p)
                {
                    out.push(online(n));
                }
            }
        }
        Some(out)
    }

    /// The server is shutting down: every stream is ending, so changes (the nodes going offline
    /// one by one) are no longer sent to anyone. Without this, ten thousand streams ending
    /// would each tell all the others.
    pub fn stop_sending(&mut self) {
        self.stopping = true;
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

    /// Every node with an open stream here.
    pub fn subscribed(&self) -> Vec<u64> {
        self.subscribers.keys().copied().collect()
    }

    /// Whether `id` has an open stream.
    pub fn is_subscribed(&self, id: u64) -> bool {
        self.subscribers.contains_key(&id)
    }

    /// Adds or replaces a node, with its identity for the policy (owner, addresses); tells every
    /// subscriber that can see it, and applies what the change means for the policy (peers
    /// gained or lost, filters). Returns deltas sent. The change gets the next map version.
    pub fn upsert(&mut self, node: Node, identity: PolicyNode) -> usize {
        let v = self.versions.next();
        let sent = self.upsert_at(node, identity, v);
        self.versions.publish();
        sent
    }

    /// Adds a node as it was stored, with the map version of its last stored change (loading
    /// at start).
    pub fn load(&mut self, node: Node, identity: PolicyNode, version: u64) {
        self.upsert_at(node, identity, version.min(self.versions.current));
    }

    fn put_record(&mut self, node: Arc<Node>) -> bool {
        let id = node.id;
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&node));
        self.nodes.insert(id, node).is_some()
    }

    fn upsert_at(&mut self, node: Node, identity: PolicyNode, version: u64) -> usize {
        let id = node.id;
        self.versions.set_record(id, version);
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
        let existed = self.put_record(Arc::clone(&node));
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
        let sent = self.remove_inner(id);
        self.versions.publish();
        sent
    }

    /// The map version of `id`'s removal, when the netmap still remembers it.
    pub fn removed_at(&self, id: u64) -> Option<u64> {
        self.versions
            .removed
            .iter()
            .rev()
            .find(|(_, n)| **n == id)
            .map(|(v, _)| *v)
    }

    /// The oldest version a resuming node may hold (removals before it are forgotten).
    pub fn floor(&self) -> u64 {
        self.versions.floor
    }

    fn remove_inner(&mut self, id: u64) -> usize {
        if self.nodes.remove(&id).is_none() {
            return 0;
        }
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.versions.remove(id);
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
        let Some(node) = self.nodes.get(&id) else {
            return 0;
        };
        let mut n = Node::clone(node);
        n.endpoints = endpoints.clone();
        self.put_record(Arc::new(n));
        let v = self.versions.next();
        self.versions.set_record(id, v);
        let delta = Arc::new(Kind::PeerEndpoints(PeerEndpoints { id, endpoints }));
        let sent = self.fanout(id, &delta);
        self.versions.publish();
        sent
    }

    /// Marks a node online or offline; tells every subscriber that can see it.
    pub fn set_online(&mut self, id: u64, online: bool, last_seen_unix_ms: i64) -> usize {
        let Some(node) = self.nodes.get(&id) else {
            return 0;
        };
        if node.online == online {
            return 0;
        }
        let mut n = Node::clone(node);
        n.online = online;
        n.last_seen_unix_ms = last_seen_unix_ms;
        self.put_record(Arc::new(n));
        self.versions.set_online(id);
        let delta = Arc::new(Kind::PeerOnline(PeerOnline {
            id,
            online,
            last_seen_unix_ms,
        }));
        // Resuming streams share it too.
        self.versions
            .online_deltas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&delta));
        let sent = self.fanout(id, &delta);
        self.versions.publish();
        sent
    }

    fn fanout(&mut self, about: u64, delta: &Delta) -> usize {
        if self.stopping {
            return 0;
        }
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
        if self.stopping {
            return false;
        }
        let Some(sub) = self.subscribers.get(&to) else {
            return false;
        };
        match sub.outbox.push(delta) {
            Pushed::Queued => true,
            Pushed::Lagged => {
                tracing::warn!(node = to, "map stream lagging; it gets a fresh full map");
                self.lagged += 1;
                false
            }
            Pushed::Dropped => false,
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
        let sub = m.subscribe(1, None).expect("known");
        assert_eq!(sub.full_map().expect("full map").peers.len(), 1);
        assert_eq!(
            sub.full_map()
                .expect("full map")
                .self_node
                .as_ref()
                .map(|n| n.id),
            Some(1)
        );
        assert_eq!(put(&mut m, 3), 1);
        assert!(matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerAdded(n) if n.id == 3));
        assert_eq!(m.set_endpoints(3, vec!["10.0.0.3:1".into()]), 1);
        assert!(
            matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerEndpoints(e) if e.id == 3)
        );
        assert_eq!(m.set_online(2, true, 7), 1);
        assert_eq!(m.set_online(2, true, 8), 0, "no change, no delta");
        assert_eq!(m.remove(3), 1);
        let _ = sub.outbox.try_recv();
        assert!(
            matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerRemoved(r) if r.id == 3)
        );
        // A change to the subscriber itself arrives as SelfChanged, not as a peer.
        assert_eq!(put(&mut m, 1), 1);
        assert!(
            matches!(&*sub.outbox.try_recv().expect("delta"), Kind::SelfChanged(n) if n.id == 1)
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
            subs.push(m.subscribe(id, None).expect("known"));
        }
        assert_eq!(put(&mut m, 51), 50);
    }

    #[test]
    fn a_lagging_stream_is_resynced_and_others_keep_their_deltas() {
        use crate::outbox::{OUTBOX_CAP, Taken};
        let mut m = Netmap::default();
        put(&mut m, 1);
        put(&mut m, 2);
        let slow = m.subscribe(1, None).expect("known");
        let fast = m.subscribe(2, None).expect("known");
        // Changes about one peer coalesce: however many, the slow stream holds one entry.
        for i in 0..1000 {
            m.set_online(2, i % 2 == 0, i);
        }
        assert!(!slow.outbox.lagging());
        // More peers than the outbox holds: it drops the backlog and resyncs.
        let joins = OUTBOX_CAP as u64 + 5;
        let mut fast_got = 0;
        for i in 0..joins {
            put(&mut m, 100 + i);
            while fast.outbox.try_recv().is_some() {
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, joins, "the fast stream missed nothing");
        assert!(slow.outbox.lagging());
        assert_eq!(m.lagged(), 1);
        assert_eq!(slow.outbox.take(), Taken::Resync);
        let full = m
            .resync(1, slow.stream)
            .expect("still subscribed")
            .collect();
        assert_eq!(
            full.peers.len() as u64,
            1 + joins,
            "the full map has all it missed"
        );
        assert!(!slow.outbox.lagging());
        put(&mut m, 9999);
        let d = slow.outbox.try_recv().expect("delta after resync");
        assert!(matches!(&*d, Kind::PeerAdded(n) if n.id == 9999));
        assert!(m.resync(1, slow.stream + 100).is_none());
    }

    #[test]
    fn replaced_stream_does_not_unsubscribe_the_new_one() {
        let mut m = Netmap::default();
        put(&mut m, 1);
        let old = m.subscribe(1, None).expect("known");
        let new = m.subscribe(1, None).expect("known");
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
        while let Some(d) = sub.outbox.try_recv() {
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
        let mut alice = m.subscribe(1, None).expect("known");
        let mut bob = m.subscribe(2, None).expect("known");
        let mut carol = m.subscribe(3, None).expect("known");
        assert_eq!(peer_ids(&alice.full_map().expect("full map")), [2]);
        assert_eq!(
            peer_ids(&bob.full_map().expect("full map")),
            [1],
            "a peer when either may reach the other"
        );
        assert_eq!(
            peer_ids(&carol.full_map().expect("full map")),
            Vec::<u64>::new()
        );
        let bob_filter = bob
            .full_map()
            .expect("full map")
            .filter
            .clone()
            .expect("filter");
        assert!(!bob_filter.allow_all);
        assert_eq!(bob_filter.rules.len(), 1);
        assert_eq!(
            bob_filter.rules[0].src,
            ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
        );
        assert_eq!(bob_filter.rules[0].protos, [6]);
        let dst = &bob_filter.rules[0].dst;
        assert!(dst.iter().all(|d| d.first == 22 && d.last == 22), "{dst:?}");
        let alice_filter = alice
            .full_map()
            .expect("full map")
            .filter
            .clone()
            .expect("filter");
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
        let mut alice = m.subscribe(2, None).expect("known");
        let mut bob = m.subscribe(3, None).expect("known");
        let seen = |full: &FullMap| {
            let r = full.peers.iter().find(|n| n.id == 1).expect("router");
            assert!(r.advertised_routes.is_empty() && r.approved_routes.is_empty());
            (r.primary_routes.clone(), r.exit_node)
        };
        assert_eq!(
            seen(&alice.full_map().expect("full map")),
            (vec!["10.0.0.0/24".to_owned()], true)
        );
        assert_eq!(
            seen(&bob.full_map().expect("full map")),
            (vec!["10.0.0.0/24".to_owned()], true)
        );
        // No policy: a router's change is one delta shared by every viewer.
        assert_eq!(m.upsert(router.clone(), router_id.clone()), 2);
        let (a, b) = (
            alice.outbox.try_recv().expect("delta"),
            bob.outbox.try_recv().expect("delta"),
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
        assert!(matches!(&*alice.outbox.try_recv().expect("delta"),
            Kind::PeerChanged(n) if n.primary_routes == ["10.0.0.0/24"] && !n.exit_node));
    }

    #[test]
    fn without_a_policy_joins_are_one_shared_delta_and_a_later_policy_sees_every_node() {
        let mut m = Netmap::default();
        for (id, user, name) in [(1, 1, "alice"), (2, 2, "bob")] {
            m.upsert(node(id), owned_by(id, user, name));
        }
        let mut alice = m.subscribe(1, None).expect("known");
        let mut bob = m.subscribe(2, None).expect("known");
        assert!(
            alice
                .full_map()
                .expect("full map")
                .filter
                .as_ref()
                .is_some_and(|f| f.allow_all)
        );
        // carol joins while no policy is configured: both hear the same shared delta.
        assert_eq!(m.upsert(node(3), owned_by(3, 3, "carol")), 2);
        let (a, b) = (
            alice.outbox.try_recv().expect("delta"),
            bob.outbox.try_recv().expect("delta"),
        );
        assert!(Arc::ptr_eq(&a, &b), "one delta, shared");
        let mut carol = m.subscribe(3, None).expect("known");
        assert_eq!(peer_ids(&carol.full_map().expect("full map")), [1, 2]);
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
        let a = m.subscribe(1, None).expect("known");
        let b = m.subscribe(2, None).expect("known");
        let dns = DnsConfig {
            nameservers: vec!["9.9.9.9".into()],
            ..DnsConfig::default()
        };
        assert_eq!(m.set_settings(dns.clone(), DerpMap::default()), 2);
        let (da, db) = (
            a.outbox.try_recv().expect("delta"),
            b.outbox.try_recv().expect("delta"),
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
        assert!(a.outbox.try_recv().is_none());
        assert_eq!(m.full_map(1).and_then(|f| f.dns), Some(dns));
    }

    #[test]
    fn resuming_takes_a_version_the_netmap_still_covers() {
        let mut m = Netmap::default();
        put(&mut m, 1);
        put(&mut m, 2);
        let s = m.subscribe(1, None).expect("known");
        let (map, v) = (m.map_id(), s.version);
        assert!(m.unsubscribe(1, s.stream));
        put(&mut m, 3);
        m.set_online(2, true, 5);
        let s = m.subscribe(1, Some((map, v))).expect("known");
        let Start::Resume(changes) = &s.start else {
            panic!("a resume")
        };
        let kinds: Vec<&Kind> = changes.iter().map(|d| &**d).collect();
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, Kind::PeerChanged(n) if n.id == 3))
        );
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, Kind::PeerOnline(o) if o.id == 2 && o.online))
        );
        assert!(
            !kinds
                .iter()
                .any(|k| matches!(k, Kind::PeerChanged(n) if n.id == 2))
        );
        let v = s.version;
        assert!(m.unsubscribe(1, s.stream));
        // The node itself changed: what it sees may have too, so a full map.
        put(&mut m, 1);
        let s = m.subscribe(1, Some((map, v))).expect("known");
        assert!(matches!(s.start, Start::Full(_)));
        let v = s.version;
        assert!(m.unsubscribe(1, s.stream));
        // Past MAX_REMOVED removals the oldest are forgotten: too old to resume.
        for id in 100..100 + MAX_REMOVED as u64 + 1 {
            put(&mut m, id);
            m.remove(id);
        }
        assert!(m.floor() > v);
        let s = m.subscribe(1, Some((map, v))).expect("known");
        assert!(matches!(s.start, Start::Full(_)));
    }
}
