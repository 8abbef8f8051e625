//! The policy applied to a live set of nodes, kept up to date incrementally.
//!
//! Each (selector, role) of the compiled policy has a bit set of the node slots it matches;
//! each rule keeps the union of its source and destination sets and its source prefixes.
//! A node's peers are then a few word-wise ORs, its filter the rules whose destinations hold
//! it. A node joining, leaving or changing touches only the selectors it matches, the rules
//! that name them and the nodes those rules reach; a policy change touches only the nodes of
//! the rules that differ between the old and the new policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::alias::{in_set, internet_prefixes, tailnet_prefixes};
use super::bitset::BitSet;
use super::compile::{Access, CompiledPolicy, RuleOrigin, Selector, Target};
use super::error::PolicyError;
use super::filter::{DstNet, DstPorts, FilterRule, PacketFilter};
use super::node::{NodeId, NodeOwner, PolicyNode};
use super::ports::PortRange;

/// Whether a selector is matched as a source or as a destination (they differ for prefixes
/// and `autogroup:internet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Role {
    Src,
    Dst,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `n` is in the set a selector names, in a role.
pub(crate) fn node_matches(sel: &Selector, role: Role, n: &PolicyNode) -> bool {
    match sel {
        Selector::All | Selector::Everything => true,
        Selector::User(t) => matches!(&n.owner, NodeOwner::User(u) if u.matches(t)),
        Selector::UserDomain(d) => matches!(&n.owner, NodeOwner::User(u)
            if u.email.as_deref().and_then(|e| e.rsplit_once('@')).is_some_and(|(_, ed)| ed == d)),
        Selector::Tag(t) => n.tags().iter().any(|x| x == t),
        Selector::Member => !n.is_tagged(),
        Selector::Tagged => n.is_tagged(),
        Selector::Prefix(p) => {
            n.addresses().any(|a| p.contains(&a))
                || n.subnet_routes().any(|r| overlaps(r, p))
                || (role == Role::Dst
                    && n.is_exit_node()
                    && internet_prefixes().iter().any(|i| overlaps(i, p)))
        }
        Selector::Internet => role == Role::Dst && n.is_exit_node(),
    }
}

/// What a node's change did to one other node (or to the node itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeDelta {
    /// The node that must be told.
    pub node: NodeId,
    /// Peers it now sees and did not before.
    pub peers_added: Vec<NodeId>,
    /// Peers it no longer sees.
    pub peers_removed: Vec<NodeId>,
    /// Its new packet filter, when it changed.
    pub filter: Option<Arc<PacketFilter>>,
}

impl NodeDelta {
    fn is_empty(&self) -> bool {
        self.peers_added.is_empty() && self.peers_removed.is_empty() && self.filter.is_none()
    }
}

/// The answer to "may SRC reach DST on PORT/PROTO?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Whether the packet is allowed.
    pub allowed: bool,
    /// The first rule that allows it.
    pub rule: Option<RuleOrigin>,
    /// The node that has the source address, if any.
    pub src_node: Option<NodeId>,
    /// The node that has the destination address, or routes it.
    pub dst_node: Option<NodeId>,
    /// Whether the destination node is in the source node's netmap (both are nodes).
    pub visible: Option<bool>,
}

/// The node store of a [`PolicyState`]: dense slots, lookups by id and address.
#[derive(Debug, Clone, Default)]
pub(crate) struct Nodes {
    slots: Vec<Option<PolicyNode>>,
    free: Vec<usize>,
    by_id: HashMap<NodeId, usize>,
    by_addr: HashMap<IpAddr, usize>,
    /// Untagged nodes per user id.
    by_user: HashMap<u64, BitSet>,
    /// Approved non-exit routes of all nodes, with how many nodes have each.
    subnet_routes: BTreeMap<IpNet, usize>,
}

impl Nodes {
    pub(crate) fn get(&self, slot: usize) -> Option<&PolicyNode> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &PolicyNode)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    pub(crate) fn owner_of(&self, ip: IpAddr) -> Option<&PolicyNode> {
        self.by_addr.get(&ip).and_then(|&s| self.get(s))
    }

    pub(crate) fn user_nodes(&self, user: u64) -> Option<&BitSet> {
        self.by_user.get(&user)
    }

    /// Whether an address is in what `*` stands for as a source.
    pub(crate) fn in_star(&self, ip: IpAddr) -> bool {
        in_set(tailnet_prefixes(), ip) || self.subnet_routes.keys().any(|r| r.contains(&ip))
    }

    fn insert(&mut self, node: PolicyNode) -> usize {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.by_id.insert(node.id, slot);
        for a in node.addresses() {
            self.by_addr.insert(a, slot);
        }
        if let Some(u) = node.user_id() {
            self.by_user.entry(u).or_default().insert(slot);
        }
        for r in node.subnet_routes() {
            *self.subnet_routes.entry(*r).or_default() += 1;
        }
        self.slots[slot] = Some(node);
        slot
    }

    fn remove(&mut self, slot: usize) -> Option<PolicyNode> {
        let node = self.slots.get_mut(slot)?.take()?;
        self.by_id.remove(&node.id);
        for a in node.addresses() {
            if self.by_addr.get(&a) == Some(&slot) {
                self.by_addr.remove(&a);
            }
        }
        if let Some(u) = node.user_id()
            && let Some(set) = self.by_user.get_mut(&u)
        {
            set.remove(slot);
            if set.is_empty() {
                self.by_user.remove(&u);
            }
        }
        for r in node.subnet_routes() {
            if let Some(c) = self.subnet_routes.get_mut(r) {
                *c -= 1;
                if *c == 0 {
                    self.subnet_routes.remove(r);
                }
            }
        }
        self.free.push(slot);
        Some(node)
    }
}

/// One (selector, role) and the slots it matches.
#[derive(Debug, Clone)]
struct SelEntry {
    sel: Selector,
    role: Role,
    members: BitSet,
    /// Rules naming it in this role (sources for `Src`, destinations for `Dst`).
    rules: Vec<u32>,
}

/// A compiled rule with its selectors as ids and its cached sets.
#[derive(Debug, Clone)]
struct RuleIx {
    src: Vec<u32>,
    /// Destinations: `None` is `autogroup:self`.
    dst: Vec<(Option<u32>, Vec<PortRange>)>,
    via: Vec<u32>,
    has_self: bool,
    src_has_all: bool,
    /// Slots matching any source.
    src_members: BitSet,
    /// Slots matching any destination selector (and a via tag, when there are via tags).
    dst_members: BitSet,
    /// Source prefixes.
    src_ips: Arc<[IpNet]>,
}

/// The policy matched against the nodes.
#[derive(Debug, Clone, Default)]
struct Index {
    sels: Vec<SelEntry>,
    sel_ids: HashMap<(Selector, Role), u32>,
    tag_sels: HashMap<String, Vec<u32>>,
    user_sels: HashMap<String, Vec<u32>>,
    generic_sels: Vec<u32>,
    rules: Vec<RuleIx>,
    self_rules: Vec<u32>,
    /// Per slot: the selectors it matches.
    node_sels: Vec<Vec<u32>>,
}

impl Index {
    /// Index `policy` over `nodes`, reusing what `prev` (the index of the policy before)
    /// already knows: member sets of selectors both policies use, source prefixes of rules
    /// with the same sources.
    fn build(
        policy: &CompiledPolicy,
        nodes: &Nodes,
        prev: Option<(&Index, &CompiledPolicy)>,
    ) -> Index {
        let mut ix = Index::default();
        let mut fresh: Vec<u32> = Vec::new();
        let mut intern = |ix: &mut Index, sel: &Selector, role: Role| -> u32 {
            if let Some(&id) = ix.sel_ids.get(&(sel.clone(), role)) {
                return id;
            }
            let id = u32::try_from(ix.sels.len()).unwrap_or(u32::MAX);
            let members = match prev.and_then(|(p, _)| p.sel_ids.get(&(sel.clone(), role))) {
                Some(&old) => prev
                    .map(|(p, _)| p.sels[old as usize].members.clone())
                    .unwrap_or_default(),
                None => {
                    fresh.push(id);
                    BitSet::new()
                }
            };
            ix.sels.push(SelEntry {
                sel: sel.clone(),
                role,
                members,
                rules: Vec::new(),
            });
            ix.sel_ids.insert((sel.clone(), role), id);
            match sel {
                Selector::Tag(t) => ix.tag_sels.entry(t.clone()).or_default().push(id),
                Selector::User(u) => ix
                    .user_sels
                    .entry(u.to_ascii_lowercase())
                    .or_default()
                    .push(id),
                _ => ix.generic_sels.push(id),
            }
            id
        };
        for (ri, rule) in policy.rules().iter().enumerate() {
            let ri = u32::try_from(ri).unwrap_or(u32::MAX);
            let b = &rule.body;
            let mut rix = RuleIx {
                src: Vec::new(),
                dst: Vec::new(),
                via: Vec::new(),
                has_self: false,
                src_has_all: b.src.contains(&Selector::All),
                src_members: BitSet::new(),
                dst_members: BitSet::new(),
                src_ips: Arc::from(Vec::new()),
            };
            for s in &b.src {
                let id = intern(&mut ix, s, Role::Src);
                if !ix.sels[id as usize].rules.contains(&ri) {
                    ix.sels[id as usize].rules.push(ri);
                }
                rix.src.push(id);
            }
            for d in &b.dst {
                match &d.target {
                    Target::SelfDevices => {
                        rix.has_self = true;
                        rix.dst.push((None, d.ports.clone()));
                    }
                    Target::Sel(s) => {
                        let id = intern(&mut ix, s, Role::Dst);
                        if !ix.sels[id as usize].rules.contains(&ri) {
                            ix.sels[id as usize].rules.push(ri);
                        }
                        rix.dst.push((Some(id), d.ports.clone()));
                    }
                }
            }
            for t in &b.via {
                rix.via
                    .push(intern(&mut ix, &Selector::Tag(t.clone()), Role::Dst));
            }
            if rix.has_self {
                ix.self_rules.push(ri);
            }
            ix.rules.push(rix);
        }
        // Members of selectors the previous policy did not have: a scan per selector when
        // they are few (a policy edit), else one pass over the nodes through the lookups.
        if fresh.len() <= 8 {
            for &id in &fresh {
                let (sel, role) = (ix.sels[id as usize].sel.clone(), ix.sels[id as usize].role);
                for (slot, n) in nodes.iter() {
                    if node_matches(&sel, role, n) {
                        ix.sels[id as usize].members.insert(slot);
                    }
                }
            }
        } else {
            let mut is_fresh = vec![false; ix.sels.len()];
            for &id in &fresh {
                is_fresh[id as usize] = true;
            }
            for (slot, n) in nodes.iter() {
                for id in ix.matching_sels(n) {
                    if is_fresh[id as usize] {
                        ix.sels[id as usize].members.insert(slot);
                    }
                }
            }
        }
        ix.node_sels = vec![Vec::new(); nodes.slots.len()];
        for (id, s) in ix.sels.iter().enumerate() {
            for slot in s.members.iter() {
                if let Some(v) = ix.node_sels.get_mut(slot) {
                    v.push(u32::try_from(id).unwrap_or(u32::MAX));
                }
            }
        }
        // Source prefixes: computed once per distinct source list, reused from the previous
        // policy where the list is the same.
        let mut known: HashMap<&[Selector], Arc<[IpNet]>> = HashMap::new();
        if let Some((p_ix, p_policy)) = prev {
            for (r, rix) in p_policy.rules().iter().zip(&p_ix.rules) {
                known.insert(&r.body.src, rix.src_ips.clone());
            }
        }
        for (ri, rule) in policy.rules().iter().enumerate() {
            ix.refresh_rule_members(ri);
            let ips = match known.get(rule.body.src.as_slice()) {
                Some(ips) => ips.clone(),
                None => {
                    let ips = ix.compute_src_ips(ri, nodes);
                    known.insert(&rule.body.src, ips.clone());
                    ips
                }
            };
            ix.rules[ri].src_ips = ips;
        }
        ix
    }

    fn refresh_rule_members(&mut self, ri: usize) {
        let mut src = BitSet::new();
        for &s in &self.rules[ri].src {
            src.union_with(&self.sels[s as usize].members);
        }
        let mut dst = BitSet::new();
        for (s, _) in &self.rules[ri].dst {
            if let Some(s) = s {
                dst.union_with(&self.sels[*s as usize].members);
            }
        }
        if !self.rules[ri].via.is_empty() {
            let mut via = BitSet::new();
            for &v in &self.rules[ri].via {
                via.union_with(&self.sels[v as usize].members);
            }
            dst.intersect_with(&via);
        }
        self.rules[ri].src_members = src;
        self.rules[ri].dst_members = dst;
    }

    fn compute_src_ips(&self, ri: usize, nodes: &Nodes) -> Arc<[IpNet]> {
        let mut v: Vec<IpNet> = Vec::new();
        let mut node_sel = false;
        for &s in &self.rules[ri].src {
            match &self.sels[s as usize].sel {
                Selector::All => {
                    v.extend_from_slice(tailnet_prefixes());
                    v.extend(nodes.subnet_routes.keys().copied());
                }
                Selector::Everything => {
                    v.push(IpNet::V4(ipnet::Ipv4Net::default()));
                    v.push(IpNet::V6(ipnet::Ipv6Net::default()));
                }
                Selector::Prefix(p) => v.push(*p),
                Selector::Internet => {}
                Selector::User(_)
                | Selector::UserDomain(_)
                | Selector::Tag(_)
                | Selector::Member
                | Selector::Tagged => {
                    node_sel = true;
                }
            }
        }
        if node_sel {
            let mut members = BitSet::new();
            for &s in &self.rules[ri].src {
                if matches!(
                    self.sels[s as usize].sel,
                    Selector::User(_)
                        | Selector::UserDomain(_)
                        | Selector::Tag(_)
                        | Selector::Member
                        | Selector::Tagged
                ) {
                    members.union_with(&self.sels[s as usize].members);
                }
            }
            for slot in members.iter() {
                if let Some(n) = nodes.get(slot) {
                    v.extend(n.address_prefixes());
                }
            }
        }
        Arc::from(IpNet::aggregate(&v))
    }

    /// The selectors a node matches, found through the tag and user lookups plus the generic
    /// selectors.
    fn matching_sels(&self, n: &PolicyNode) -> Vec<u32> {
        let mut out = Vec::new();
        for t in n.tags() {
            if let Some(ids) = self.tag_sels.get(t) {
                out.extend(ids.iter().copied().filter(|&i| {
                    let e = &self.sels[i as usize];
                    node_matches(&e.sel, e.role, n)
                }));
            }
        }
        if let NodeOwner::User(u) = &n.owner {
            let mut keys = vec![
                u.name.to_ascii_lowercase(),
                format!("{}@", u.name).to_ascii_lowercase(),
            ];
            if let Some(e) = &u.email {
                keys.push(e.to_ascii_lowercase());
            }
            for k in keys {
                if let Some(ids) = self.user_sels.get(&k) {
                    for &i in ids {
                        let e = &self.sels[i as usize];
                        if node_matches(&e.sel, e.role, n) {
                            out.push(i);
                        }
                    }
                }
            }
        }
        for &i in &self.generic_sels {
            let e = &self.sels[i as usize];
            if node_matches(&e.sel, e.role, n) {
                out.push(i);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Rules a slot is a source of.
    fn src_rules(&self, slot: usize) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for &s in self.node_sels.get(slot).into_iter().flatten() {
            let e = &self.sels[s as usize];
            if e.role == Role::Src {
                out.extend(e.rules.iter().copied());
            }
        }
        out
    }

    /// Rules whose destinations may hold a slot (before via and self checks).
    fn dst_rules(&self, slot: usize, tagged: bool) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for &s in self.node_sels.get(slot).into_iter().flatten() {
            let e = &self.sels[s as usize];
            if e.role == Role::Dst {
                out.extend(e.rules.iter().copied());
            }
        }
        if !tagged {
            out.extend(self.self_rules.iter().copied());
        }
        out
    }

    fn add_node(&mut self, slot: usize, n: &PolicyNode) {
        let sels = self.matching_sels(n);
        if self.node_sels.len() <= slot {
            self.node_sels.resize(slot + 1, Vec::new());
        }
        let mut touched = BTreeSet::new();
        for &s in &sels {
            self.sels[s as usize].members.insert(slot);
            touched.extend(self.sels[s as usize].rules.iter().copied());
        }
        // Via tags are not in `rules`; a rule with via tags is refreshed from its selectors.
        for (ri, r) in self.rules.iter().enumerate() {
            if r.via.iter().any(|v| sels.contains(v)) {
                touched.insert(u32::try_from(ri).unwrap_or(u32::MAX));
            }
        }
        self.node_sels[slot] = sels;
        for ri in touched {
            self.refresh_rule_members(ri as usize);
        }
    }

    fn remove_node(&mut self, slot: usize) {
        let sels = std::mem::take(&mut self.node_sels[slot]);
        let mut touched = BTreeSet::new();
        for &s in &sels {
            self.sels[s as usize].members.remove(slot);
            touched.extend(self.sels[s as usize].rules.iter().copied());
        }
        for (ri, r) in self.rules.iter().enumerate() {
            if r.via.iter().any(|v| sels.contains(v)) {
                touched.insert(u32::try_from(ri).unwrap_or(u32::MAX));
            }
        }
        for ri in touched {
            self.refresh_rule_members(ri as usize);
        }
    }

    /// A slot's peers: nodes it may reach or that may reach it, ports ignored.
    fn peers(&self, nodes: &Nodes, slot: usize) -> BitSet {
        let mut acc = BitSet::new();
        let Some(n) = nodes.get(slot) else {
            return acc;
        };
        let user_set = n.user_id().and_then(|u| nodes.user_nodes(u));
        for ri in self.src_rules(slot) {
            let r = &self.rules[ri as usize];
            acc.union_with(&r.dst_members);
            if r.has_self
                && let Some(us) = user_set
            {
                acc.union_with(us);
            }
        }
        for ri in self.dst_rules(slot, n.is_tagged()) {
            let r = &self.rules[ri as usize];
            if r.dst_members.contains(slot) {
                acc.union_with(&r.src_members);
            }
        }
        if let Some(us) = user_set {
            for &ri in &self.self_rules {
                let mut s = self.rules[ri as usize].src_members.clone();
                s.intersect_with(us);
                acc.union_with(&s);
            }
        }
        acc.remove(slot);
        acc
    }

    /// A slot's packet filter.
    fn filter(&self, policy: &CompiledPolicy, nodes: &Nodes, slot: usize) -> PacketFilter {
        let mut out = PacketFilter::default();
        let Some(n) = nodes.get(slot) else {
            return out;
        };
        let own: Vec<IpNet> = n.address_prefixes().collect();
        for ri in self.dst_rules(slot, n.is_tagged()) {
            let rule = &policy.rules()[ri as usize];
            if rule.body.access != Access::Ip {
                continue;
            }
            let r = &self.rules[ri as usize];
            let mut dst = Vec::new();
            let mut self_dst = Vec::new();
            for (sel, ports) in &r.dst {
                match sel {
                    Some(s) if r.dst_members.contains(slot) => {
                        let e = &self.sels[*s as usize];
                        if !e.members.contains(slot) {
                            continue;
                        }
                        let nets: Vec<DstNet> = match &e.sel {
                            Selector::All => vec![DstNet::Any],
                            Selector::Prefix(p) => vec![DstNet::Net(*p)],
                            Selector::Internet => internet_prefixes()
                                .iter()
                                .map(|p| DstNet::Net(*p))
                                .collect(),
                            _ => own.iter().map(|p| DstNet::Net(*p)).collect(),
                        };
                        for net in nets {
                            for &p in ports {
                                dst.push(DstPorts { net, ports: p });
                            }
                        }
                    }
                    None if !n.is_tagged() => {
                        for net in &own {
                            for &p in ports {
                                self_dst.push(DstPorts {
                                    net: DstNet::Net(*net),
                                    ports: p,
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            let protos = rule.body.protos.clone();
            if !dst.is_empty() {
                out.rules.push(FilterRule {
                    src: r.src_ips.clone(),
                    dst,
                    protos: protos.clone(),
                });
            }
            if !self_dst.is_empty() {
                let src = self.self_sources(nodes, ri as usize, n);
                if !src.is_empty() {
                    out.rules.push(FilterRule {
                        src: Arc::from(src),
                        dst: self_dst,
                        protos,
                    });
                }
            }
        }
        out
    }

    /// Sources of an `autogroup:self` rule for a node: its user's untagged nodes that the
    /// rule's sources name.
    fn self_sources(&self, nodes: &Nodes, ri: usize, n: &PolicyNode) -> Vec<IpNet> {
        let Some(us) = n.user_id().and_then(|u| nodes.user_nodes(u)) else {
            return Vec::new();
        };
        let mut s = self.rules[ri].src_members.clone();
        s.intersect_with(us);
        let v: Vec<IpNet> = s
            .iter()
            .filter_map(|slot| nodes.get(slot))
            .flat_map(|m| m.address_prefixes().collect::<Vec<_>>())
            .collect();
        IpNet::aggregate(&v)
    }

    /// Nodes whose filter holds one of `rules` (through a selector destination).
    fn reached_by(&self, rules: &BTreeSet<u32>, acc: &mut BitSet) {
        for &ri in rules {
            acc.union_with(&self.rules[ri as usize].dst_members);
        }
    }

    /// Nodes whose `autogroup:self` sources change when `slot` (of user `user`) joins or
    /// leaves: its user's untagged nodes, if a self rule names it as a source.
    fn self_reach(&self, nodes: &Nodes, slot: usize, user: Option<u64>, acc: &mut BitSet) {
        let Some(us) = user.and_then(|u| nodes.user_nodes(u)) else {
            return;
        };
        if self
            .self_rules
            .iter()
            .any(|&ri| self.rules[ri as usize].src_members.contains(slot))
        {
            acc.union_with(us);
        }
    }

    /// Nodes an `autogroup:self` rule reaches: the untagged nodes of its sources' users.
    fn self_rule_reach(&self, nodes: &Nodes, rules: &BTreeSet<u32>, acc: &mut BitSet) {
        for &ri in rules {
            let r = &self.rules[ri as usize];
            if !r.has_self {
                continue;
            }
            let mut users = BTreeSet::new();
            for slot in r.src_members.iter() {
                users.extend(nodes.get(slot).and_then(PolicyNode::user_id));
            }
            for u in users {
                if let Some(us) = nodes.user_nodes(u) {
                    acc.union_with(us);
                }
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        let sels: usize = self
            .sels
            .iter()
            .map(|s| s.members.heap_bytes() + s.rules.capacity() * 4 + 64)
            .sum();
        let rules: usize = self
            .rules
            .iter()
            .map(|r| {
                r.src_members.heap_bytes()
                    + r.dst_members.heap_bytes()
                    + r.src_ips.len() * std::mem::size_of::<IpNet>()
                    + (r.src.len() + r.via.len()) * 4
                    + r.dst.len() * 40
                    + 160
            })
            .sum();
        let node_sels: usize = self.node_sels.iter().map(|v| v.capacity() * 4 + 24).sum();
        sels + rules + node_sels
    }
}

/// The policy in force over the current nodes. Every change returns, per affected node, what
/// it must be told.
#[derive(Debug, Clone)]
pub struct PolicyState {
    policy: Arc<CompiledPolicy>,
    nodes: Nodes,
    index: Index,
}

impl Default for PolicyState {
    fn default() -> Self {
        Self::new(Arc::new(CompiledPolicy::allow_all()))
    }
}

impl PolicyState {
    /// A state with no nodes under `policy` (its `tests` are not run: there are no nodes).
    pub fn new(policy: Arc<CompiledPolicy>) -> Self {
        let nodes = Nodes::default();
        let index = Index::build(&policy, &nodes, None);
        Self {
            policy,
            nodes,
            index,
        }
    }

    /// A state holding `nodes` under `policy`, indexed in one pass (start-up). The policy's
    /// `tests` run against these nodes first.
    pub fn build(
        policy: Arc<CompiledPolicy>,
        nodes: impl IntoIterator<Item = PolicyNode>,
    ) -> Result<Self, PolicyError> {
        let mut store = Nodes::default();
        for n in nodes {
            if let Some(&old) = store.by_id.get(&n.id) {
                store.remove(old);
            }
            store.insert(n);
        }
        super::tests_block::run(&policy, &store)?;
        let index = Index::build(&policy, &store, None);
        Ok(Self {
            policy,
            nodes: store,
            index,
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<CompiledPolicy> {
        &self.policy
    }

    /// A node by id.
    pub fn node(&self, id: NodeId) -> Option<&PolicyNode> {
        self.nodes.by_id.get(&id).and_then(|&s| self.nodes.get(s))
    }

    /// All nodes, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &PolicyNode> + '_ {
        self.nodes.iter().map(|(_, n)| n)
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.by_id.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.by_id.is_empty()
    }

    /// Approximate heap bytes the index holds (selector sets, rule caches), nodes excluded.
    pub fn index_heap_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// The node's packet filter (for traffic addressed to it); `None` for an unknown node.
    pub fn filter_for(&self, id: NodeId) -> Option<PacketFilter> {
        let slot = *self.nodes.by_id.get(&id)?;
        Some(self.index.filter(&self.policy, &self.nodes, slot))
    }

    /// The node's visible peers, sorted; `None` for an unknown node.
    pub fn peers_of(&self, id: NodeId) -> Option<Vec<NodeId>> {
        let slot = *self.nodes.by_id.get(&id)?;
        Some(self.ids(&self.index.peers(&self.nodes, slot)))
    }

    /// Whether `a` and `b` see each other.
    pub fn are_peers(&self, a: NodeId, b: NodeId) -> bool {
        match (self.nodes.by_id.get(&a), self.nodes.by_id.get(&b)) {
            (Some(&sa), Some(&sb)) => sa != sb && self.index.peers(&self.nodes, sa).contains(sb),
            _ => false,
        }
    }

    fn ids(&self, set: &BitSet) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = set
            .iter()
            .filter_map(|s| self.nodes.get(s).map(|n| n.id))
            .collect();
        v.sort_unstable();
        v
    }

    /// Add a node or replace it (tags, user, addresses or routes changed). Returns what every
    /// affected node (including this one) must be told, sorted by node id.
    pub fn upsert_node(&mut self, node: PolicyNode) -> Vec<NodeDelta> {
        let id = node.id;
        let mut deltas: BTreeMap<NodeId, NodeDelta> = BTreeMap::new();
        let mut old_peers = BitSet::new();
        let mut old_filter = None;
        let mut src_rules = BTreeSet::new();
        let mut routes_changed = node.subnet_routes().next().is_some();
        let mut reach = BitSet::new();
        if let Some(&slot) = self.nodes.by_id.get(&id) {
            let Some(old) = self.nodes.get(slot).cloned() else {
                return Vec::new();
            };
            if old == node {
                return Vec::new();
            }
            old_peers = self.index.peers(&self.nodes, slot);
            old_filter = Some(self.index.filter(&self.policy, &self.nodes, slot));
            src_rules = self.index.src_rules(slot);
            routes_changed =
                old.subnet_routes().collect::<Vec<_>>() != node.subnet_routes().collect::<Vec<_>>();
            self.index
                .self_reach(&self.nodes, slot, old.user_id(), &mut reach);
            self.index.remove_node(slot);
            self.nodes.remove(slot);
        }
        let user = node.user_id();
        let slot = self.nodes.insert(node);
        if let Some(n) = self.nodes.get(slot).cloned() {
            self.index.add_node(slot, &n);
        }
        self.index.self_reach(&self.nodes, slot, user, &mut reach);
        src_rules.extend(self.index.src_rules(slot));
        if routes_changed {
            src_rules.extend(self.all_source_rules());
        }
        let changed = self.refresh_src_ips(&src_rules);
        self.index.reached_by(&changed, &mut reach);
        let new_peers = self.index.peers(&self.nodes, slot);
        let new_filter = self.index.filter(&self.policy, &self.nodes, slot);

        let me = NodeDelta {
            node: id,
            peers_added: self.ids_of(new_peers.difference(&old_peers)),
            peers_removed: self.ids_of(old_peers.difference(&new_peers)),
            filter: (old_filter.as_ref() != Some(&new_filter)).then(|| Arc::new(new_filter)),
        };
        for &p in &me.peers_added {
            deltas
                .entry(p)
                .or_insert_with(|| empty(p))
                .peers_added
                .push(id);
        }
        for &p in &me.peers_removed {
            deltas
                .entry(p)
                .or_insert_with(|| empty(p))
                .peers_removed
                .push(id);
        }
        deltas.insert(id, me);
        reach.remove(slot);
        self.add_filters(&mut deltas, &reach);
        deltas.into_values().filter(|d| !d.is_empty()).collect()
    }

    /// Rules with `*` among their sources (whose prefixes include every subnet route).
    fn all_source_rules(&self) -> Vec<u32> {
        self.index
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.src_has_all)
            .map(|(ri, _)| u32::try_from(ri).unwrap_or(u32::MAX))
            .collect()
    }

    /// Remove a node. Returns what every affected node must be told (the removed node is not
    /// among them).
    pub fn remove_node(&mut self, id: NodeId) -> Vec<NodeDelta> {
        let Some(&slot) = self.nodes.by_id.get(&id) else {
            return Vec::new();
        };
        let Some(old) = self.nodes.get(slot).cloned() else {
            return Vec::new();
        };
        let old_peers = self.index.peers(&self.nodes, slot);
        let mut src_rules = self.index.src_rules(slot);
        let mut reach = BitSet::new();
        self.index
            .self_reach(&self.nodes, slot, old.user_id(), &mut reach);
        self.index.remove_node(slot);
        self.nodes.remove(slot);
        if old.subnet_routes().next().is_some() {
            src_rules.extend(self.all_source_rules());
        }
        let changed = self.refresh_src_ips(&src_rules);
        self.index.reached_by(&changed, &mut reach);
        reach.remove(slot);
        let mut deltas: BTreeMap<NodeId, NodeDelta> = BTreeMap::new();
        for p in self.ids_of(old_peers.iter()) {
            deltas
                .entry(p)
                .or_insert_with(|| empty(p))
                .peers_removed
                .push(id);
        }
        self.add_filters(&mut deltas, &reach);
        deltas.into_values().filter(|d| !d.is_empty()).collect()
    }

    /// Run the new policy's `tests` against the current nodes without applying it.
    pub fn check(&self, policy: &CompiledPolicy) -> Result<(), PolicyError> {
        super::tests_block::run(policy, &self.nodes)
    }

    /// Replace the policy. Its `tests` run first against the current nodes; if any fails,
    /// nothing changes. Returns, per node whose peers or filter differ, its difference.
    pub fn set_policy(
        &mut self,
        policy: Arc<CompiledPolicy>,
    ) -> Result<Vec<NodeDelta>, PolicyError> {
        self.check(&policy)?;
        let new_index = Index::build(&policy, &self.nodes, Some((&self.index, &self.policy)));
        // Rules whose meaning differs between the two policies (a multiset difference).
        let mut counts: HashMap<&super::compile::RuleBody, i64> = HashMap::new();
        for r in self.policy.rules() {
            *counts.entry(&r.body).or_default() += 1;
        }
        for r in policy.rules() {
            *counts.entry(&r.body).or_default() -= 1;
        }
        let mut affected = BitSet::new();
        let mut touch =
            |ix: &Index, rules: &[super::compile::Rule], nodes: &Nodes, positive: bool| {
                let mut picked = BTreeSet::new();
                for (ri, r) in rules.iter().enumerate() {
                    let c = counts.get(&r.body).copied().unwrap_or(0);
                    if (positive && c > 0) || (!positive && c < 0) {
                        picked.insert(u32::try_from(ri).unwrap_or(u32::MAX));
                    }
                }
                for &ri in &picked {
                    let r = &ix.rules[ri as usize];
                    affected.union_with(&r.src_members);
                    affected.union_with(&r.dst_members);
                }
                ix.self_rule_reach(nodes, &picked, &mut affected);
            };
        touch(&self.index, self.policy.rules(), &self.nodes, true);
        touch(&new_index, policy.rules(), &self.nodes, false);

        let mut deltas = Vec::new();
        for slot in affected.iter() {
            let Some(n) = self.nodes.get(slot) else {
                continue;
            };
            let old_peers = self.index.peers(&self.nodes, slot);
            let new_peers = new_index.peers(&self.nodes, slot);
            let old_filter = self.index.filter(&self.policy, &self.nodes, slot);
            let new_filter = new_index.filter(&policy, &self.nodes, slot);
            let d = NodeDelta {
                node: n.id,
                peers_added: self.ids_of(new_peers.difference(&old_peers)),
                peers_removed: self.ids_of(old_peers.difference(&new_peers)),
                filter: (old_filter != new_filter).then(|| Arc::new(new_filter)),
            };
            if !d.is_empty() {
                deltas.push(d);
            }
        }
        deltas.sort_by_key(|d| d.node);
        self.index = new_index;
        self.policy = policy;
        Ok(deltas)
    }

    /// Whether `viewer` may use `router`'s subnet route `route` (Headscale's `CanAccessRoute`):
    /// a network rule lets the viewer reach a destination overlapping the route (`*`, a prefix
    /// or host; a rule with `via` tags only through a router carrying one), or lets a source
    /// covering the route (`*`, a prefix) reach the viewer. Naming the router itself (its tag or
    /// user) gives its own addresses, not the networks behind it.
    pub fn route_visible(&self, viewer: NodeId, router: NodeId, route: IpNet) -> bool {
        let (Some(v), Some(r)) = (self.node(viewer), self.node(router)) else {
            return false;
        };
        self.policy.rules().iter().any(|rule| {
            let b = &rule.body;
            if b.access != Access::Ip {
                return false;
            }
            let via_ok = b.via.is_empty() || r.tags().iter().any(|t| b.via.contains(t));
            let forward = via_ok
                && b.src.iter().any(|s| node_matches(s, Role::Src, v))
                && b.dst.iter().any(|d| match &d.target {
                    Target::Sel(Selector::All) => true,
                    Target::Sel(Selector::Prefix(p)) => overlaps(p, &route),
                    _ => false,
                });
            let backward = b.src.iter().any(|s| match s {
                Selector::All | Selector::Everything => true,
                Selector::Prefix(p) => overlaps(p, &route),
                _ => false,
            }) && b.dst.iter().any(|d| match &d.target {
                Target::Sel(s) => node_matches(s, Role::Dst, v),
                Target::SelfDevices => false,
            });
            forward || backward
        })
    }

    /// Whether `exit` is an exit node `viewer` may use: it has an approved exit route and a
    /// network rule lets the viewer reach the internet through it (`autogroup:internet`, `*`,
    /// or a public prefix; a rule with `via` tags only through an exit node carrying one).
    /// Reaching the exit node's own address is not enough.
    pub fn exit_offered(&self, viewer: NodeId, exit: NodeId) -> bool {
        let (Some(v), Some(e)) = (self.node(viewer), self.node(exit)) else {
            return false;
        };
        if viewer == exit || !e.is_exit_node() {
            return false;
        }
        self.policy.rules().iter().any(|rule| {
            let b = &rule.body;
            b.access == Access::Ip
                && (b.via.is_empty() || e.tags().iter().any(|t| b.via.contains(t)))
                && b.src.iter().any(|s| node_matches(s, Role::Src, v))
                && b.dst.iter().any(|d| match &d.target {
                    Target::Sel(Selector::All | Selector::Internet) => true,
                    Target::Sel(Selector::Prefix(p)) => {
                        internet_prefixes().iter().any(|i| overlaps(i, p))
                    }
                    _ => false,
                })
        })
    }

    /// Whether `src` may send to `dst` on `port` with IP protocol `proto`, and which rule
    /// decides. `visible` says whether the two nodes see each other.
    pub fn explain(&self, src: IpAddr, dst: IpAddr, port: u16, proto: u8) -> Explanation {
        let rule = super::tests_block::decide(&self.policy, &self.nodes, src, dst, port, proto);
        let src_node = self.nodes.owner_of(src).map(|n| n.id);
        let dst_node = self.nodes.owner_of(dst).map(|n| n.id).or_else(|| {
            self.nodes
                .iter()
                .find(|(_, n)| n.subnet_routes().any(|r| r.contains(&dst)))
                .map(|(_, n)| n.id)
        });
        let visible = match (src_node, dst_node) {
            (Some(a), Some(b)) => Some(self.are_peers(a, b)),
            _ => None,
        };
        Explanation {
            allowed: rule.is_some(),
            rule: rule.map(|i| self.policy.rules()[i].origin),
            src_node,
            dst_node,
            visible,
        }
    }

    /// Nodes named by `what`: a node name, an address, a tag, a group or a user token.
    pub fn find_nodes(&self, what: &str) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = if let Ok(ip) = what.parse::<IpAddr>() {
            self.nodes.owner_of(ip).map(|n| n.id).into_iter().collect()
        } else if what.starts_with("tag:") {
            self.nodes()
                .filter(|n| n.tags().iter().any(|t| t == what))
                .map(|n| n.id)
                .collect()
        } else if what.starts_with("group:") {
            let members = self.policy.group(what).unwrap_or(&[]);
            self.nodes()
                .filter(|n| matches!(&n.owner, NodeOwner::User(u) if members.iter().any(|m| u.matches(m))))
                .map(|n| n.id)
                .collect()
        } else {
            let by_name: Vec<NodeId> = self
                .nodes()
                .filter(|n| n.name == what)
                .map(|n| n.id)
                .collect();
            if by_name.is_empty() {
                self.nodes()
                    .filter(|n| matches!(&n.owner, NodeOwner::User(u) if u.matches(what)))
                    .map(|n| n.id)
                    .collect()
            } else {
                by_name
            }
        };
        out.sort_unstable();
        out
    }

    fn ids_of(&self, slots: impl Iterator<Item = usize>) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = slots
            .filter_map(|s| self.nodes.get(s).map(|n| n.id))
            .collect();
        v.sort_unstable();
        v
    }

    /// Recompute the source prefixes of `rules` (once per distinct source list); returns
    /// those that changed (network rules).
    fn refresh_src_ips(&mut self, rules: &BTreeSet<u32>) -> BTreeSet<u32> {
        let mut changed = BTreeSet::new();
        let mut done: HashMap<Vec<u32>, Arc<[IpNet]>> = HashMap::new();
        for &ri in rules {
            let key = self.index.rules[ri as usize].src.clone();
            let new = match done.get(&key) {
                Some(ips) => ips.clone(),
                None => {
                    let ips = self.index.compute_src_ips(ri as usize, &self.nodes);
                    done.insert(key, ips.clone());
                    ips
                }
            };
            let r = &mut self.index.rules[ri as usize];
            if r.src_ips != new {
                r.src_ips = new;
                if self.policy.rules()[ri as usize].body.access == Access::Ip {
                    changed.insert(ri);
                }
            }
        }
        changed
    }

    fn add_filters(&self, deltas: &mut BTreeMap<NodeId, NodeDelta>, reach: &BitSet) {
        for s in reach.iter() {
            let Some(n) = self.nodes.get(s) else {
                continue;
            };
            let d = deltas.entry(n.id).or_insert_with(|| NodeDelta {
                node: n.id,
                ..NodeDelta::default()
            });
            if d.filter.is_none() {
                d.filter = Some(Arc::new(self.index.filter(&self.policy, &self.nodes, s)));
            }
        }
    }
}

fn empty(node: NodeId) -> NodeDelta {
    NodeDelta {
        node,
        ..NodeDelta::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::compile::Target;
    use super::super::node::PolicyUser;
    use super::super::tests_block::decide;
    use super::*;

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len())]
        }
    }

    const HEADER: &str = r#"
        "groups": {"group:g1": ["u1@x.com", "u2@"], "group:g2": ["u3@x.com"], "group:empty": []},
        "hosts": {"h1": "10.1.0.0/16", "h2": "100.64.0.5"},
        "tagOwners": {"tag:a": ["u1@x.com"], "tag:b": ["group:g1"], "tag:c": ["tag:a"]},
    "#;

    fn random_policy(rng: &mut Rng) -> String {
        let srcs = [
            "*",
            "tag:a",
            "tag:b",
            "u1@x.com",
            "u2@",
            "group:g1",
            "group:empty",
            "autogroup:member",
            "autogroup:tagged",
            "h1",
            "h2",
            "100.64.0.0/28",
            "user:*@x.com",
        ];
        let self_srcs = ["*", "u1@x.com", "group:g1", "autogroup:member"];
        let dsts = [
            "*:*",
            "tag:a:22",
            "tag:c:80-90",
            "u2@:*",
            "group:g2:443",
            "autogroup:internet:*",
            "h1:*",
            "h2:22,80",
            "autogroup:member:22",
            "autogroup:tagged:*",
            "10.1.2.0/24:53",
            "[fd7a:115c:a1e0::3]:22",
        ];
        let mode = rng.below(8);
        if mode == 0 {
            return format!("{{{HEADER}}}");
        }
        let mut acls = Vec::new();
        for _ in 0..rng.below(5) {
            let self_rule = rng.below(5) == 0;
            let src: Vec<String> = (0..1 + rng.below(2))
                .map(|_| {
                    format!(
                        "{:?}",
                        if self_rule {
                            *rng.pick(&self_srcs)
                        } else {
                            *rng.pick(&srcs)
                        }
                    )
                })
                .collect();
            let mut dst: Vec<String> = (0..1 + rng.below(2))
                .map(|_| format!("{:?}", rng.pick(&dsts)))
                .collect();
            if self_rule {
                dst.push("\"autogroup:self:*\"".into());
            }
            let proto = match rng.below(4) {
                0 => r#""proto": "tcp","#,
                1 => r#""proto": "udp","#,
                _ => "",
            };
            acls.push(format!(
                r#"{{"action": "accept", {proto} "src": [{}], "dst": [{}]}}"#,
                src.join(","),
                dst.join(",")
            ));
        }
        let mut grants = Vec::new();
        for _ in 0..rng.below(3) {
            let src = format!("{:?}", rng.pick(&srcs));
            let (dst, via) = match rng.below(4) {
                0 => ("\"h1\"".to_string(), r#", "via": ["tag:c"]"#),
                _ => (
                    format!(
                        "{:?}",
                        rng.pick(&["tag:a", "tag:b", "*", "autogroup:member", "h2"])
                    ),
                    "",
                ),
            };
            let ip = match rng.below(4) {
                0 => r#""app": {"example.com/cap/x": [{}]}"#,
                1 => r#""ip": ["tcp:22", "udp:53"]"#,
                2 => r#""ip": ["*"]"#,
                _ => r#""ip": ["80-90", "icmp:*"]"#,
            };
            grants.push(format!(r#"{{"src": [{src}], "dst": [{dst}], {ip}{via}}}"#));
        }
        match mode {
            1 => format!("{{{HEADER} \"grants\": []}}"),
            2 => format!("{{{HEADER} \"acls\": [{}]}}", acls.join(",")),
            3 => format!("{{{HEADER} \"grants\": [{}]}}", grants.join(",")),
            _ => format!(
                "{{{HEADER} \"acls\": [{}], \"grants\": [{}]}}",
                acls.join(","),
                grants.join(",")
            ),
        }
    }

    fn random_node(rng: &mut Rng, id: u64) -> PolicyNode {
        let users = [(1u64, "u1"), (2, "u2"), (3, "u3")];
        let owner = if rng.below(2) == 0 {
            let (uid, name) = *rng.pick(&users);
            NodeOwner::User(PolicyUser {
                id: uid,
                name: name.into(),
                email: Some(format!("{name}@x.com")),
            })
        } else {
            let mut tags: Vec<String> = ["tag:a", "tag:b", "tag:c"]
                .iter()
                .filter(|_| rng.below(2) == 0)
                .map(|t| t.to_string())
                .collect();
            if tags.is_empty() {
                tags.push("tag:c".into());
            }
            NodeOwner::Tags(tags)
        };
        let approved_routes = match rng.below(5) {
            0 => vec!["10.1.0.0/16".parse().expect("prefix")],
            1 => vec![
                "0.0.0.0/0".parse().expect("prefix"),
                "::/0".parse().expect("prefix"),
            ],
            _ => Vec::new(),
        };
        let octet = u8::try_from(id).expect("small id");
        PolicyNode {
            id: NodeId(id),
            name: format!("n{id}"),
            owner,
            ipv4: Some(Ipv4Addr::new(100, 64, 0, octet)),
            ipv6: Some(Ipv6Addr::new(
                0xfd7a,
                0x115c,
                0xa1e0,
                0,
                0,
                0,
                0,
                u16::from(octet),
            )),
            approved_routes,
        }
    }

    /// Peers straight from the definition: some rule lets one reach the other, ports ignored.
    fn oracle_peers(policy: &CompiledPolicy, nodes: &[PolicyNode], a: &PolicyNode) -> Vec<NodeId> {
        let reaches = |x: &PolicyNode, y: &PolicyNode| {
            policy.rules().iter().any(|r| {
                let b = &r.body;
                let src_ok = b.src.iter().any(|s| node_matches(s, Role::Src, x));
                let via_ok = b.via.is_empty() || y.tags().iter().any(|t| b.via.contains(t));
                src_ok
                    && b.dst.iter().any(|d| match &d.target {
                        Target::Sel(s) => via_ok && node_matches(s, Role::Dst, y),
                        Target::SelfDevices => x.user_id().is_some() && x.user_id() == y.user_id(),
                    })
            })
        };
        let mut v: Vec<NodeId> = nodes
            .iter()
            .filter(|b| b.id != a.id && (reaches(a, b) || reaches(b, a)))
            .map(|b| b.id)
            .collect();
        v.sort();
        v
    }

    /// What each node has been told so far.
    #[derive(Default)]
    struct View {
        peers: BTreeMap<NodeId, BTreeSet<NodeId>>,
        filters: BTreeMap<NodeId, PacketFilter>,
    }

    impl View {
        fn apply(&mut self, deltas: &[NodeDelta]) {
            for d in deltas {
                let p = self.peers.entry(d.node).or_default();
                for a in &d.peers_added {
                    assert!(p.insert(*a), "{:?} told twice about peer {:?}", d.node, a);
                }
                for r in &d.peers_removed {
                    assert!(
                        p.remove(r),
                        "{:?} told to drop unknown peer {:?}",
                        d.node,
                        r
                    );
                }
                if let Some(f) = &d.filter {
                    self.filters.insert(d.node, (**f).clone());
                }
            }
        }
    }

    fn check(state: &PolicyState, view: &View, step: usize) {
        let nodes: Vec<PolicyNode> = {
            let mut v: Vec<PolicyNode> = state.nodes().cloned().collect();
            v.sort_by_key(|n| n.id);
            v
        };
        // A state built from scratch with the same nodes and policy.
        let mut fresh = PolicyState::new(state.policy().clone());
        for n in &nodes {
            fresh.upsert_node(n.clone());
        }
        let bulk = PolicyState::build(state.policy().clone(), nodes.iter().cloned())
            .expect("no tests block");
        for n in &nodes {
            let peers = state.peers_of(n.id).expect("known node");
            let filter = state.filter_for(n.id).expect("known node");
            assert_eq!(
                peers,
                fresh.peers_of(n.id).expect("known"),
                "step {step}: peers of {}",
                n.id
            );
            assert_eq!(
                peers,
                bulk.peers_of(n.id).expect("known"),
                "step {step}: bulk peers"
            );
            assert_eq!(
                filter,
                bulk.filter_for(n.id).expect("known"),
                "step {step}: bulk filter"
            );
            assert_eq!(
                filter,
                fresh.filter_for(n.id).expect("known"),
                "step {step}: filter of {}",
                n.id
            );
            assert_eq!(
                peers,
                oracle_peers(state.policy(), &nodes, n),
                "step {step}: oracle peers of {}",
                n.id
            );
            let told: Vec<NodeId> = view
                .peers
                .get(&n.id)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            assert_eq!(told, peers, "step {step}: peers told to {}", n.id);
            assert_eq!(
                view.filters.get(&n.id).cloned().unwrap_or_default(),
                filter,
                "step {step}: filter told to {}",
                n.id
            );
            // Point decisions agree with the filter, for every source node address.
            for src in &nodes {
                for (s, d) in [
                    (src.ipv4.map(IpAddr::V4), n.ipv4.map(IpAddr::V4)),
                    (src.ipv6.map(IpAddr::V6), n.ipv6.map(IpAddr::V6)),
                ] {
                    let (Some(s), Some(d)) = (s, d) else { continue };
                    for (port, proto) in [(22, 6), (53, 17), (85, 6), (443, 6), (0, 1), (7, 58)] {
                        assert_eq!(
                            decide(state.policy(), &state.nodes, s, d, port, proto).is_some(),
                            filter.allows(s, d, port, proto),
                            "step {step}: {s} -> {d} port {port} proto {proto}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn incremental_matches_fresh_and_oracles() {
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut state = PolicyState::default();
            let mut view = View::default();
            for step in 0..60 {
                let deltas = match rng.below(10) {
                    0..=4 => {
                        let id = 1 + rng.below(10) as u64;
                        state.upsert_node(random_node(&mut rng, id))
                    }
                    5 | 6 => {
                        let id = NodeId(1 + rng.below(10) as u64);
                        let d = state.remove_node(id);
                        view.peers.remove(&id);
                        view.filters.remove(&id);
                        d
                    }
                    _ => {
                        let text = random_policy(&mut rng);
                        let p = CompiledPolicy::from_text(&text)
                            .unwrap_or_else(|e| panic!("{e}\n{text}"));
                        state.set_policy(Arc::new(p)).expect("no tests block")
                    }
                };
                for d in &deltas {
                    assert!(
                        state.node(d.node).is_some(),
                        "delta for a node that is gone"
                    );
                }
                view.apply(&deltas);
                check(&state, &view, step);
            }
        }
    }

    #[test]
    fn no_policy_allows_all_and_empty_grants_deny_all() {
        let u = PolicyUser {
            id: 1,
            name: "alice".into(),
            email: None,
        };
        let a = PolicyNode::user(
            1,
            "a",
            u.clone(),
            Ipv4Addr::new(100, 64, 0, 1),
            Ipv6Addr::LOCALHOST,
        );
        let b = PolicyNode::user(
            2,
            "b",
            u,
            Ipv4Addr::new(100, 64, 0, 2),
            Ipv6Addr::UNSPECIFIED,
        );
        let mut s = PolicyState::default();
        s.upsert_node(a);
        s.upsert_node(b);
        assert_eq!(s.peers_of(NodeId(1)), Some(vec![NodeId(2)]));
        let src: IpAddr = "100.64.0.2".parse().expect("ip");
        let dst: IpAddr = "100.64.0.1".parse().expect("ip");
        assert!(
            s.filter_for(NodeId(1))
                .expect("node")
                .allows(src, dst, 5555, 17)
        );
        let deny = CompiledPolicy::from_text(r#"{"grants": []}"#).expect("valid");
        let d = s.set_policy(Arc::new(deny)).expect("no tests");
        assert_eq!(d.len(), 2, "both nodes lose their peer and their filter");
        assert!(
            d.iter().all(|d| d.peers_removed.len() == 1
                && d.filter.as_deref() == Some(&PacketFilter::default()))
        );
        assert_eq!(s.peers_of(NodeId(1)), Some(vec![]));
        let _ = HashMap::<u8, u8>::new();
    }
}
