//! The node's packet filter: which packets decrypted from a peer may reach the TUN device.
//! Control compiles the policy into [`Rule`]s for traffic addressed to this node;
//! [`Filter::check`] applies them to every inbound packet the way Tailscale's client does
//! (`wgengine/filter/filter.go`, POLICY.md section 6a), and a [`FlowTable`] that outbound
//! packets fill lets replies to UDP and SCTP flows this node started back in. Headers are read
//! with `etherparse`'s zero-copy slices, so checking a packet allocates nothing.
//!
//! [`Filter::check`] decides by the first of these that applies:
//! 1. [`Filter::allow_all`] ("no policy") accepts everything, unparsed.
//! 2. An empty packet (a WireGuard keepalive) is accepted; one under 20 bytes or whose IP
//!    header does not parse is dropped.
//! 3. A multicast or link-local destination (169.254.169.254 excepted) is dropped.
//! 4. A fragment after the first is accepted (it has no transport header to judge; the
//!    first fragment was judged).
//! 5. A destination outside this node's local prefixes is dropped.
//! 6. TCP: anything but a SYN without ACK is accepted (no connection tracking: a new
//!    connection cannot start without a SYN); a SYN needs a rule for its protocol, source,
//!    destination and port. TCP flows this node starts are therefore not tracked, as in
//!    Tailscale: their replies are never SYNs.
//! 7. UDP and SCTP: the reverse of a flow this node sent within [`FLOW_TIMEOUT`] is
//!    accepted; anything else needs a rule.
//! 8. ICMP (v4 in IPv4, v6 in IPv6): echo replies and errors (unreachable, time exceeded,
//!    parameter problem, v6 packet too big) are accepted; any other ICMP message passes when
//!    some rule lets its source reach its destination, whatever that rule's protocols and
//!    ports (Tailscale's `matchIPsOnly`: ping works wherever any port is open).
//! 9. Any other protocol needs a rule that names it with all ports (0-65535).
//! 10. Everything else is dropped ([`DropReason::NoRule`]).
//!
//! Differences from Tailscale, all deliberate: the flow table's entries expire after
//! [`FLOW_TIMEOUT`] without traffic (Tailscale's 512-entry LRU keeps them until evicted), it
//! holds [`FLOW_CAPACITY`] flows, and IPv6 fragments are judged like IPv4 ones (Tailscale
//! drops IPv6 packets with extension headers it does not know). warren has no TSMP.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use etherparse::{
    Icmpv4Slice, Icmpv6Slice, IpSlice, Ipv6ExtensionSlice, TcpHeaderSlice, UdpHeaderSlice, icmpv4,
    icmpv6,
};
use ipnet::IpNet;

/// How many flows the [`FlowTable`] holds; past that the least recently used one goes.
pub const FLOW_CAPACITY: usize = 4096;
/// How long a flow lives without a packet either way (Linux conntrack's UDP stream timeout).
pub const FLOW_TIMEOUT: Duration = Duration::from_secs(120);

/// Shortest packet that can carry an IP header.
const MIN_IP_LEN: usize = 20;
/// The cloud metadata address, the one link-local destination Tailscale lets through.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// An IP protocol number (IANA), as policy rules name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpProto(pub u8);

impl IpProto {
    /// ICMP for IPv4.
    pub const ICMP: Self = Self(1);
    /// TCP.
    pub const TCP: Self = Self(6);
    /// UDP.
    pub const UDP: Self = Self(17);
    /// ICMP for IPv6.
    pub const ICMPV6: Self = Self(58);
    /// SCTP.
    pub const SCTP: Self = Self(132);
}

/// What a rule with no protocols allows (Tailscale's default: TCP, UDP, ICMPv4, ICMPv6).
pub const DEFAULT_PROTOS: [IpProto; 4] =
    [IpProto::TCP, IpProto::UDP, IpProto::ICMP, IpProto::ICMPV6];

/// An inclusive range of ports; one with `first > last` contains none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// The first port in the range.
    pub first: u16,
    /// The last port in the range.
    pub last: u16,
}

impl PortRange {
    /// Every port, 0 to 65535.
    pub const ALL: Self = Self {
        first: 0,
        last: u16::MAX,
    };

    /// One port.
    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is in the range.
    pub const fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// A destination a rule allows: addresses and the ports on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DstPorts {
    /// The destination addresses.
    pub net: IpNet,
    /// The destination ports (ignored for ICMP; all of them for protocols without ports).
    pub ports: PortRange,
}

/// One rule of a packet filter, as control sends it (Tailscale's `FilterRule`): packets of
/// `protos` from any of `srcs` to any of `dsts` are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Allowed source prefixes.
    pub srcs: Vec<IpNet>,
    /// Allowed destinations and ports.
    pub dsts: Vec<DstPorts>,
    /// Allowed protocols; empty means [`DEFAULT_PROTOS`].
    pub protos: Vec<IpProto>,
}

/// A set of protocol numbers, one bit each, so a rule's protocol check is one load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProtoSet([u64; 4]);

impl ProtoSet {
    fn of(protos: &[IpProto]) -> Self {
        let list = if protos.is_empty() {
            &DEFAULT_PROTOS[..]
        } else {
            protos
        };
        let mut bits = [0u64; 4];
        for p in list {
            bits[usize::from(p.0 >> 6)] |= 1 << (p.0 & 63);
        }
        Self(bits)
    }

    fn contains(self, proto: u8) -> bool {
        self.0[usize::from(proto >> 6)] & (1 << (proto & 63)) != 0
    }
}

/// Why [`Filter::check`] let a packet in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AcceptReason {
    /// The filter is [`Filter::allow_all`].
    AllowAll,
    /// An empty packet (a WireGuard keepalive).
    Keepalive,
    /// A fragment after the first.
    Fragment,
    /// A TCP segment other than a connection request (SYN without ACK).
    TcpNotSyn,
    /// A UDP or SCTP reply to a flow this node started.
    ReplyFlow,
    /// An ICMP echo reply or error message.
    IcmpResponse,
    /// Other ICMP to a destination some rule lets the source reach.
    IcmpToAllowedIp,
    /// A rule allows it.
    Rule,
}

/// Why [`Filter::check`] dropped a packet; counted per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Shorter than an IP header.
    TooShort,
    /// An IP or transport header that does not parse (bad version, lengths, truncated).
    Malformed,
    /// A multicast destination.
    Multicast,
    /// A link-local destination (other than 169.254.169.254).
    LinkLocal,
    /// A destination that is not this node's (its addresses and the routes it serves).
    NotLocal,
    /// No rule allows it.
    NoRule,
}

impl DropReason {
    /// A short name for logs and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooShort => "too short",
            Self::Malformed => "malformed",
            Self::Multicast => "multicast",
            Self::LinkLocal => "link-local",
            Self::NotLocal => "not local",
            Self::NoRule => "no rule",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the TUN device.
    Accept(AcceptReason),
    /// Drop it.
    Drop(DropReason),
}

impl Verdict {
    /// Whether the packet may pass.
    pub fn is_accept(self) -> bool {
        matches!(self, Self::Accept(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    AllowAll,
    Rules {
        local: Vec<IpNet>,
        rules: Vec<Rule>,
        /// `rules[i].protos` as a set.
        protos: Vec<ProtoSet>,
    },
}

/// The rules for traffic addressed to this node. A value: replacing it keeps the
/// [`FlowTable`], which lives beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    mode: Mode,
}

impl Default for Filter {
    /// [`Filter::allow_all`].
    fn default() -> Self {
        Self::allow_all()
    }
}

impl Filter {
    /// No policy: every packet passes unexamined (what a node does before control sends a
    /// filter, and with no policy configured).
    pub fn allow_all() -> Self {
        Self {
            mode: Mode::AllowAll,
        }
    }

    /// A filter that accepts only what `rules` allow (besides replies, see the module docs),
    /// and only for destinations in `local`: this node's addresses and the routes it serves.
    /// No rules means only replies pass.
    pub fn new(local: Vec<IpNet>, rules: Vec<Rule>) -> Self {
        let protos = rules.iter().map(|r| ProtoSet::of(&r.protos)).collect();
        Self {
            mode: Mode::Rules {
                local,
                rules,
                protos,
            },
        }
    }

    /// Whether this is [`Filter::allow_all`].
    pub fn is_allow_all(&self) -> bool {
        matches!(self.mode, Mode::AllowAll)
    }

    /// The rules (none for [`Filter::allow_all`]).
    pub fn rules(&self) -> &[Rule] {
        match &self.mode {
            Mode::AllowAll => &[],
            Mode::Rules { rules, .. } => rules,
        }
    }

    /// The destinations counted as this node's (none for [`Filter::allow_all`]).
    pub fn local(&self) -> &[IpNet] {
        match &self.mode {
            Mode::AllowAll => &[],
            Mode::Rules { local, .. } => local,
        }
    }

    /// Judges a packet decrypted from a peer. `flows` holds the flows this node started
    /// (a reply refreshes its flow); `now` is the current time.
    pub fn check(&self, packet: &[u8], flows: &mut FlowTable, now: Instant) -> Verdict {
        let Mode::Rules {
            local,
            rules,
            protos,
        } = &self.mode
        else {
            return Verdict::Accept(AcceptReason::AllowAll);
        };
        match judge(packet, local, rules, protos, flows, now) {
            Ok(reason) => Verdict::Accept(reason),
            Err(reason) => Verdict::Drop(reason),
        }
    }
}

fn judge(
    packet: &[u8],
    local: &[IpNet],
    rules: &[Rule],
    protos: &[ProtoSet],
    flows: &mut FlowTable,
    now: Instant,
) -> Result<AcceptReason, DropReason> {
    if packet.is_empty() {
        return Ok(AcceptReason::Keepalive);
    }
    if packet.len() < MIN_IP_LEN {
        return Err(DropReason::TooShort);
    }
    let ip = IpHeader::parse(packet)?;
    check_destination(ip.dst)?;
    if ip.later_fragment {
        return Ok(AcceptReason::Fragment);
    }
    if !local.iter().any(|n| n.contains(&ip.dst)) {
        return Err(DropReason::NotLocal);
    }
    let rules = Rules { rules, protos };
    match ip.transport()? {
        Transport::Tcp { dst_port, syn, .. } => {
            if !syn {
                Ok(AcceptReason::TcpNotSyn)
            } else if rules.allow(ip.proto, ip.src, ip.dst, dst_port) {
                Ok(AcceptReason::Rule)
            } else {
                Err(DropReason::NoRule)
            }
        }
        Transport::Ports { src_port, dst_port } => {
            let key = FlowKey {
                proto: ip.proto,
                src: ip.src,
                src_port,
                dst: ip.dst,
                dst_port,
            };
            if flows.hit(&key, now) {
                Ok(AcceptReason::ReplyFlow)
            } else if rules.allow(ip.proto, ip.src, ip.dst, dst_port) {
                Ok(AcceptReason::Rule)
            } else {
                Err(DropReason::NoRule)
            }
        }
        Transport::Icmp { response: true } => Ok(AcceptReason::IcmpResponse),
        Transport::Icmp { response: false } => {
            if rules.allow_ips(ip.src, ip.dst) {
                Ok(AcceptReason::IcmpToAllowedIp)
            } else {
                Err(DropReason::NoRule)
            }
        }
        Transport::Other => {
            if rules.allow_all_ports(ip.proto, ip.src, ip.dst) {
                Ok(AcceptReason::Rule)
            } else {
                Err(DropReason::NoRule)
            }
        }
    }
}

/// Multicast and link-local destinations are never for a peer to send to.
fn check_destination(dst: IpAddr) -> Result<(), DropReason> {
    if dst.is_multicast() {
        return Err(DropReason::Multicast);
    }
    let link_local = match dst {
        IpAddr::V4(a) => a.is_link_local() && a != METADATA,
        IpAddr::V6(a) => a.is_unicast_link_local(),
    };
    if link_local {
        Err(DropReason::LinkLocal)
    } else {
        Ok(())
    }
}

/// A rule list with its protocol sets.
struct Rules<'a> {
    rules: &'a [Rule],
    protos: &'a [ProtoSet],
}

impl Rules<'_> {
    fn each(&self) -> impl Iterator<Item = (&Rule, ProtoSet)> {
        self.rules.iter().zip(self.protos.iter().copied())
    }

    /// Some rule allows `proto` from `src` to `dst:port`.
    fn allow(&self, proto: u8, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        self.each().any(|(r, p)| {
            p.contains(proto)
                && r.srcs.iter().any(|s| s.contains(&src))
                && r.dsts
                    .iter()
                    .any(|d| d.net.contains(&dst) && d.ports.contains(port))
        })
    }

    /// Some rule lets `src` reach `dst`, whatever its protocols and ports.
    fn allow_ips(&self, src: IpAddr, dst: IpAddr) -> bool {
        self.each().any(|(r, _)| {
            r.srcs.iter().any(|s| s.contains(&src)) && r.dsts.iter().any(|d| d.net.contains(&dst))
        })
    }

    /// Some rule names `proto` and allows `src` to reach every port of `dst`.
    fn allow_all_ports(&self, proto: u8, src: IpAddr, dst: IpAddr) -> bool {
        self.each().any(|(r, p)| {
            p.contains(proto)
                && r.srcs.iter().any(|s| s.contains(&src))
                && r.dsts
                    .iter()
                    .any(|d| d.ports == PortRange::ALL && d.net.contains(&dst))
        })
    }
}

/// What the filter needs of an IP header.
struct IpHeader<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    v6: bool,
    /// A fragment other than the first: the payload has no transport header.
    later_fragment: bool,
    /// What follows the IP header and its extensions.
    payload: &'a [u8],
}

/// What the filter needs of a transport header.
enum Transport {
    /// TCP; `syn` is a SYN without ACK (a connection request).
    Tcp { dst_port: u16, syn: bool },
    /// UDP or SCTP.
    Ports { src_port: u16, dst_port: u16 },
    /// ICMP of the packet's own family; `response` for echo replies and errors.
    Icmp { response: bool },
    /// Any other protocol.
    Other,
}

impl<'a> IpHeader<'a> {
    fn parse(packet: &'a [u8]) -> Result<Self, DropReason> {
        let ip = IpSlice::from_slice(packet).map_err(|_| DropReason::Malformed)?;
        let (v6, later_fragment) = match &ip {
            IpSlice::Ipv4(v4) => (false, v4.header().fragments_offset().value() != 0),
            IpSlice::Ipv6(v6) => (
                true,
                v6.extensions().clone().into_iter().any(|e| {
                    matches!(e, Ipv6ExtensionSlice::Fragment(f) if f.fragment_offset().value() != 0)
                }),
            ),
        };
        let payload = ip.payload();
        Ok(Self {
            src: ip.source_addr(),
            dst: ip.destination_addr(),
            proto: payload.ip_number.0,
            v6,
            later_fragment,
            payload: payload.payload,
        })
    }

    fn transport(&self) -> Result<Transport, DropReason> {
        let p = self.payload;
        Ok(match IpProto(self.proto) {
            IpProto::TCP => {
                let tcp = TcpHeaderSlice::from_slice(p).map_err(|_| DropReason::Malformed)?;
                Transport::Tcp {
                    dst_port: tcp.destination_port(),
                    syn: tcp.syn() && !tcp.ack(),
                }
            }
            IpProto::UDP => {
                let udp = UdpHeaderSlice::from_slice(p).map_err(|_| DropReason::Malformed)?;
                Transport::Ports {
                    src_port: udp.source_port(),
                    dst_port: udp.destination_port(),
                }
            }
            IpProto::SCTP => {
                // etherparse has no SCTP parser; the common header starts with the two ports.
                let (src_port, dst_port) = sctp_ports(p).ok_or(DropReason::Malformed)?;
                Transport::Ports { src_port, dst_port }
            }
            IpProto::ICMP if !self.v6 => {
                let icmp = Icmpv4Slice::from_slice(p).map_err(|_| DropReason::Malformed)?;
                let response = match icmp.type_u8() {
                    icmpv4::TYPE_ECHO_REPLY => icmp.code_u8() == 0,
                    icmpv4::TYPE_DEST_UNREACH
                    | icmpv4::TYPE_TIME_EXCEEDED
                    | icmpv4::TYPE_PARAMETER_PROBLEM => true,
                    _ => false,
                };
                Transport::Icmp { response }
            }
            IpProto::ICMPV6 if self.v6 => {
                let icmp = Icmpv6Slice::from_slice(p).map_err(|_| DropReason::Malformed)?;
                let response = match icmp.type_u8() {
                    icmpv6::TYPE_ECHO_REPLY => icmp.code_u8() == 0,
                    icmpv6::TYPE_DST_UNREACH
                    | icmpv6::TYPE_PACKET_TOO_BIG
                    | icmpv6::TYPE_TIME_EXCEEDED
                    | icmpv6::TYPE_PARAMETER_PROBLEM => true,
                    _ => false,
                };
                Transport::Icmp { response }
            }
            _ => Transport::Other,
        })
    }
}

/// The source and destination ports of an SCTP common header (RFC 9260 section 3.1: 12
/// bytes, ports first).
fn sctp_ports(p: &[u8]) -> Option<(u16, u16)> {
    match p {
        [a, b, c, d, _, _, _, _, _, _, _, _, ..] => {
            Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])))
        }
        _ => None,
    }
}

/// A flow as its inbound packets look: from the remote end to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
}

/// End of the recency list.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Slot {
    key: FlowKey,
    last: Instant,
    /// Towards the most recently used.
    prev: u32,
    /// Towards the least recently used.
    next: u32,
}

/// The UDP and SCTP flows this node started, so their replies pass the filter. Bounded
/// ([`FLOW_CAPACITY`] by default; the least recently used flow makes room), and a flow
/// without a packet either way for [`FLOW_TIMEOUT`] is gone. Time comes in as `now`.
///
/// Deterministic: the hash index is only looked up, never iterated (its hasher has fixed
/// keys), and which flow goes first is decided by a recency list over a slot array. Once
/// the table is full, recording a flow reuses a slot and allocates nothing.
#[derive(Debug, Clone)]
pub struct FlowTable {
    index: HashMap<FlowKey, u32, BuildHasherDefault<DefaultHasher>>,
    slots: Vec<Slot>,
    /// Slots freed by expiry, to reuse before growing.
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    capacity: usize,
    timeout: Duration,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowTable {
    /// A table of [`FLOW_CAPACITY`] flows that expire after [`FLOW_TIMEOUT`].
    pub fn new() -> Self {
        Self::with_limits(FLOW_CAPACITY, FLOW_TIMEOUT)
    }

    /// A table of `capacity` flows (at most `u32::MAX - 1`) that expire after `timeout`.
    pub fn with_limits(capacity: usize, timeout: Duration) -> Self {
        Self {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.min(NIL as usize - 1),
            timeout,
        }
    }

    /// Flows held, including expired ones not yet cleared.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no flow is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Records a packet this node sends to a peer: a UDP or SCTP packet starts (or refreshes)
    /// a flow whose replies [`Filter::check`] accepts. Returns whether it did; other
    /// packets, multicast, link-local, later fragments and unparsable ones record nothing.
    pub fn note_outbound(&mut self, packet: &[u8], now: Instant) -> bool {
        self.expire(now);
        let Ok(ip) = IpHeader::parse(packet) else {
            return false;
        };
        if ip.later_fragment || check_destination(ip.dst).is_err() {
            return false;
        }
        let Ok(Transport::Ports { src_port, dst_port }) = ip.transport() else {
            return false;
        };
        self.insert(
            FlowKey {
                proto: ip.proto,
                src: ip.dst,
                src_port: dst_port,
                dst: ip.src,
                dst_port: src_port,
            },
            now,
        )
    }

    fn expired(&self, i: u32, now: Instant) -> bool {
        now.saturating_duration_since(self.slots[i as usize].last) >= self.timeout
    }

    /// Whether `key` is a live flow; a hit refreshes it.
    fn hit(&mut self, key: &FlowKey, now: Instant) -> bool {
        let Some(&i) = self.index.get(key) else {
            return false;
        };
        if self.expired(i, now) {
            self.remove(i);
            return false;
        }
        self.touch(i, now);
        true
    }

    fn insert(&mut self, key: FlowKey, now: Instant) -> bool {
        if let Some(&i) = self.index.get(&key) {
            self.touch(i, now);
            return true;
        }
        if self.capacity == 0 {
            return false;
        }
        let slot = Slot {
            key,
            last: now,
            prev: NIL,
            next: NIL,
        };
        let i = if let Some(i) = self.free.pop() {
            self.slots[i as usize] = slot;
            i
        } else if self.slots.len() < self.capacity {
            self.slots.push(slot);
            // capacity < NIL, so the index fits.
            (self.slots.len() - 1) as u32
        } else {
            let i = self.tail;
            self.unlink(i);
            let old = self.slots[i as usize].key;
            self.index.remove(&old);
            self.slots[i as usize] = slot;
            i
        };
        self.index.insert(key, i);
        self.push_front(i);
        true
    }

    /// Clears expired flows from the least recently used end.
    fn expire(&mut self, now: Instant) {
        while self.tail != NIL && self.expired(self.tail, now) {
            self.remove(self.tail);
        }
    }

    fn remove(&mut self, i: u32) {
        self.unlink(i);
        let key = self.slots[i as usize].key;
        self.index.remove(&key);
        self.free.push(i);
    }

    fn touch(&mut self, i: u32, now: Instant) {
        self.slots[i as usize].last = now;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn unlink(&mut self, i: u32) {
        let Slot { prev, next, .. } = self.slots[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        let s = &mut self.slots[i as usize];
        s.prev = NIL;
        s.next = NIL;
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
// A test needs one real instant as the origin of its virtual time.
#[allow(clippy::disallowed_methods)]
mod tests {
    use etherparse::{
        IpFragOffset, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header,
        PacketBuilder,
    };

    use super::*;

    const ME: [u8; 4] = [100, 64, 0, 1];
    const PEER: [u8; 4] = [100, 64, 0, 2];
    const STRANGER: [u8; 4] = [100, 64, 0, 3];
    const ME6: [u8; 16] = [
        0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];
    const PEER6: [u8; 16] = [
        0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
    ];

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn local() -> Vec<IpNet> {
        vec![net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128")]
    }

    /// PEER may reach ME (both families) on `ports` with `protos`.
    fn rule(protos: &[IpProto], ports: PortRange) -> Rule {
        Rule {
            srcs: vec![net("100.64.0.2/32"), net("fd7a:115c:a1e0::2/128")],
            dsts: vec![
                DstPorts {
                    net: net("100.64.0.1/32"),
                    ports,
                },
                DstPorts {
                    net: net("fd7a:115c:a1e0::1/128"),
                    ports,
                },
            ],
            protos: protos.to_vec(),
        }
    }

    /// PEER may reach ME on TCP port 22 only.
    fn ssh_only() -> Filter {
        Filter::new(local(), vec![rule(&[IpProto::TCP], PortRange::single(22))])
    }

    /// PEER may reach ME on every port of the default protocols.
    fn default_protos() -> Filter {
        Filter::new(local(), vec![rule(&[], PortRange::ALL)])
    }

    fn deny_all() -> Filter {
        Filter::new(local(), Vec::new())
    }

    #[derive(Clone, Copy)]
    enum Flags {
        Syn,
        SynAck,
        Ack,
        Rst,
        Fin,
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: Flags) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1024);
        let b = match flags {
            Flags::Syn => b.syn(),
            Flags::SynAck => b.syn().ack(1),
            Flags::Ack => b.ack(1),
            Flags::Rst => b.rst(),
            Flags::Fin => b.fin().ack(1),
        };
        let mut v = Vec::new();
        b.write(&mut v, b"data").expect("build");
        v
    }

    fn tcp6(src: [u8; 16], dst: [u8; 16], dport: u16, flags: Flags) -> Vec<u8> {
        let b = PacketBuilder::ipv6(src, dst, 64).tcp(40000, dport, 1, 1024);
        let b = match flags {
            Flags::Syn => b.syn(),
            _ => b.ack(1),
        };
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        v
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut v, b"hello")
            .expect("build");
        v
    }

    fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .udp(sport, dport)
            .write(&mut v, b"hello")
            .expect("build");
        v
    }

    fn icmp4(src: [u8; 4], dst: [u8; 4], ty: u8, code: u8) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .icmpv4_raw(ty, code, [0; 4])
            .write(&mut v, &[0; 28])
            .expect("build");
        v
    }

    fn icmp6(src: [u8; 16], dst: [u8; 16], ty: u8, code: u8) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .icmpv6_raw(ty, code, [0; 4])
            .write(&mut v, &[0; 48])
            .expect("build");
        v
    }

    /// An IPv4 packet of protocol `proto` around `payload`; `frag` is (offset in 8-byte
    /// units, more fragments).
    fn raw4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: (u16, bool), payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(payload.len()).expect("small");
        let mut h = Ipv4Header::new(len, 64, IpNumber(proto), src, dst).expect("header");
        h.dont_fragment = false;
        h.more_fragments = frag.1;
        h.fragment_offset = IpFragOffset::try_new(frag.0).expect("offset");
        h.header_checksum = h.calc_header_checksum();
        let mut v = Vec::new();
        h.write(&mut v).expect("build");
        v.extend_from_slice(payload);
        v
    }

    /// An IPv6 packet of protocol `proto` around `payload`, with a fragment header when
    /// `frag` is given (offset in 8-byte units, more fragments).
    fn raw6(
        src: [u8; 16],
        dst: [u8; 16],
        proto: u8,
        frag: Option<(u16, bool)>,
        payload: &[u8],
    ) -> Vec<u8> {
        let frag_len = if frag.is_some() {
            Ipv6FragmentHeader::LEN
        } else {
            0
        };
        let h = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: u16::try_from(payload.len() + frag_len).expect("small"),
            next_header: if frag.is_some() {
                IpNumber::IPV6_FRAGMENTATION_HEADER
            } else {
                IpNumber(proto)
            },
            hop_limit: 64,
            source: src,
            destination: dst,
        };
        let mut v = Vec::new();
        h.write(&mut v).expect("build");
        if let Some((offset, more)) = frag {
            let offset = IpFragOffset::try_new(offset).expect("offset");
            Ipv6FragmentHeader::new(IpNumber(proto), offset, more, 7)
                .write(&mut v)
                .expect("build");
        }
        v.extend_from_slice(payload);
        v
    }

    fn check(f: &Filter, packet: &[u8]) -> Verdict {
        f.check(packet, &mut FlowTable::new(), Instant::now())
    }

    const fn drop(r: DropReason) -> Verdict {
        Verdict::Drop(r)
    }

    const fn accept(r: AcceptReason) -> Verdict {
        Verdict::Accept(r)
    }

    #[test]
    fn allow_all_accepts_everything_unexamined() {
        let f = Filter::allow_all();
        assert!(f.is_allow_all());
        assert_eq!(Filter::default(), f);
        for p in [
            Vec::new(),
            vec![0x45],
            udp(PEER, STRANGER, 1, 2),
            tcp(STRANGER, [224, 0, 0, 1], 1, 80, Flags::Syn),
        ] {
            assert_eq!(check(&f, &p), accept(AcceptReason::AllowAll));
        }
    }

    #[test]
    fn empty_packet_is_a_keepalive() {
        assert_eq!(check(&deny_all(), &[]), accept(AcceptReason::Keepalive));
    }

    #[test]
    fn packet_shorter_than_an_ip_header_is_dropped() {
        for len in 1..20 {
            let mut p = udp(PEER, ME, 1, 22);
            p.truncate(len);
            assert_eq!(check(&default_protos(), &p), drop(DropReason::TooShort));
        }
    }

    #[test]
    fn unparsable_headers_are_dropped() {
        let f = default_protos();
        // Not IPv4 or IPv6.
        let mut p = udp(PEER, ME, 1, 22);
        p[0] = 0x55;
        assert_eq!(check(&f, &p), drop(DropReason::Malformed));
        // IHL below 5.
        let mut p = udp(PEER, ME, 1, 22);
        p[0] = 0x44;
        assert_eq!(check(&f, &p), drop(DropReason::Malformed));
        // Total length past the end of the packet.
        let mut p = udp(PEER, ME, 1, 22);
        p.truncate(p.len() - 1);
        assert_eq!(check(&f, &p), drop(DropReason::Malformed));
        // Transport headers cut short (the IP lengths agree).
        for (proto, len) in [(6u8, 19usize), (17, 7), (1, 7), (132, 11)] {
            let p = raw4(PEER, ME, proto, (0, false), &vec![0; len]);
            assert_eq!(check(&f, &p), drop(DropReason::Malformed), "proto {proto}");
        }
        let p = raw6(PEER6, ME6, 58, None, &[129, 0, 0]);
        assert_eq!(check(&f, &p), drop(DropReason::Malformed));
        // A TCP data offset past the segment.
        let mut seg = tcp(PEER, ME, 1, 22, Flags::Syn)[20..].to_vec();
        seg[12] = 0xf0;
        let p = raw4(PEER, ME, 6, (0, false), &seg);
        assert_eq!(check(&f, &p), drop(DropReason::Malformed));
    }

    #[test]
    fn multicast_and_link_local_destinations_are_dropped() {
        let f = Filter::new(
            vec![net("0.0.0.0/0"), net("::/0")],
            vec![Rule {
                srcs: vec![net("0.0.0.0/0"), net("::/0")],
                dsts: vec![
                    DstPorts {
                        net: net("0.0.0.0/0"),
                        ports: PortRange::ALL,
                    },
                    DstPorts {
                        net: net("::/0"),
                        ports: PortRange::ALL,
                    },
                ],
                protos: Vec::new(),
            }],
        );
        let ff02 = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb];
        let fe80 = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            check(&f, &udp(PEER, [224, 0, 0, 251], 5353, 5353)),
            drop(DropReason::Multicast)
        );
        assert_eq!(
            check(&f, &udp6(PEER6, ff02, 5353, 5353)),
            drop(DropReason::Multicast)
        );
        assert_eq!(
            check(&f, &udp(PEER, [169, 254, 1, 1], 1, 2)),
            drop(DropReason::LinkLocal)
        );
        assert_eq!(
            check(&f, &udp6(PEER6, fe80, 1, 2)),
            drop(DropReason::LinkLocal)
        );
        // The cloud metadata address is the exception.
        assert_eq!(
            check(&f, &udp(PEER, [169, 254, 169, 254], 1, 80)),
            accept(AcceptReason::Rule)
        );
        // Checked before the fragment rule: a later fragment to a multicast group is dropped.
        assert_eq!(
            check(&f, &raw4(PEER, [224, 0, 0, 1], 17, (8, false), &[0; 16])),
            drop(DropReason::Multicast)
        );
    }

    #[test]
    fn later_fragments_pass_and_first_fragments_are_judged() {
        let f = ssh_only();
        // No rule allows UDP, but a later fragment has no header to judge.
        assert_eq!(
            check(&f, &raw4(PEER, ME, 17, (185, false), &[0; 16])),
            accept(AcceptReason::Fragment)
        );
        assert_eq!(
            check(&f, &raw6(PEER6, ME6, 17, Some((185, true)), &[0; 16])),
            accept(AcceptReason::Fragment)
        );
        // A first fragment carries the header and is judged by it.
        let seg = udp(PEER, ME, 1, 53)[20..].to_vec();
        assert_eq!(
            check(&f, &raw4(PEER, ME, 17, (0, true), &seg)),
            drop(DropReason::NoRule)
        );
        let seg = tcp(PEER, ME, 1, 22, Flags::Syn)[20..].to_vec();
        assert_eq!(
            check(&f, &raw4(PEER, ME, 6, (0, true), &seg)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &raw6(PEER6, ME6, 6, Some((0, true)), &seg)),
            accept(AcceptReason::Rule)
        );
        // A later fragment still has to be for a real, non-multicast address; but the local
        // check does not apply to it (Tailscale's order).
        assert_eq!(
            check(&f, &raw4(PEER, STRANGER, 17, (1, false), &[0; 8])),
            accept(AcceptReason::Fragment)
        );
    }

    #[test]
    fn destination_must_be_local() {
        let f = default_protos();
        assert_eq!(
            check(&f, &tcp(PEER, STRANGER, 1, 22, Flags::Syn)),
            drop(DropReason::NotLocal)
        );
        // Even established-looking TCP and ICMP replies.
        assert_eq!(
            check(&f, &tcp(PEER, STRANGER, 1, 22, Flags::Ack)),
            drop(DropReason::NotLocal)
        );
        assert_eq!(
            check(&f, &icmp4(PEER, STRANGER, icmpv4::TYPE_ECHO_REPLY, 0)),
            drop(DropReason::NotLocal)
        );
        // A served route counts as local.
        let f = Filter::new(
            vec![net("100.64.0.1/32"), net("192.168.7.0/24")],
            vec![Rule {
                srcs: vec![net("100.64.0.2/32")],
                dsts: vec![DstPorts {
                    net: net("192.168.7.0/24"),
                    ports: PortRange::single(80),
                }],
                protos: Vec::new(),
            }],
        );
        assert_eq!(
            check(&f, &tcp(PEER, [192, 168, 7, 9], 1, 80, Flags::Syn)),
            accept(AcceptReason::Rule)
        );
    }

    #[test]
    fn tcp_only_syns_are_matched() {
        let f = ssh_only();
        assert_eq!(
            check(&f, &tcp(PEER, ME, 40000, 22, Flags::Syn)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &tcp(PEER, ME, 40000, 80, Flags::Syn)),
            drop(DropReason::NoRule)
        );
        assert_eq!(
            check(&f, &tcp(STRANGER, ME, 40000, 22, Flags::Syn)),
            drop(DropReason::NoRule)
        );
        for flags in [Flags::SynAck, Flags::Ack, Flags::Rst, Flags::Fin] {
            assert_eq!(
                check(&f, &tcp(STRANGER, ME, 40000, 80, flags)),
                accept(AcceptReason::TcpNotSyn)
            );
        }
        // IPv6 the same.
        assert_eq!(
            check(&f, &tcp6(PEER6, ME6, 22, Flags::Syn)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &tcp6(PEER6, ME6, 23, Flags::Syn)),
            drop(DropReason::NoRule)
        );
        assert_eq!(
            check(&f, &tcp6(PEER6, ME6, 23, Flags::Ack)),
            accept(AcceptReason::TcpNotSyn)
        );
        // A rule for UDP on 22 does not open TCP 22.
        let f = Filter::new(local(), vec![rule(&[IpProto::UDP], PortRange::single(22))]);
        assert_eq!(
            check(&f, &tcp(PEER, ME, 40000, 22, Flags::Syn)),
            drop(DropReason::NoRule)
        );
    }

    #[test]
    fn port_ranges_are_inclusive() {
        let f = Filter::new(
            local(),
            vec![rule(
                &[IpProto::TCP],
                PortRange {
                    first: 8000,
                    last: 8090,
                },
            )],
        );
        for (port, ok) in [(7999, false), (8000, true), (8090, true), (8091, false)] {
            assert_eq!(
                check(&f, &tcp(PEER, ME, 1, port, Flags::Syn)).is_accept(),
                ok,
                "port {port}"
            );
        }
        let inverted = PortRange { first: 10, last: 9 };
        assert!(!inverted.contains(9) && !inverted.contains(10));
    }

    #[test]
    fn udp_is_matched_on_its_destination_port() {
        let f = Filter::new(local(), vec![rule(&[IpProto::UDP], PortRange::single(53))]);
        assert_eq!(
            check(&f, &udp(PEER, ME, 5000, 53)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &udp(PEER, ME, 53, 5000)),
            drop(DropReason::NoRule)
        );
        assert_eq!(
            check(&f, &udp6(PEER6, ME6, 5000, 53)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&ssh_only(), &udp(PEER, ME, 5000, 22)),
            drop(DropReason::NoRule)
        );
    }

    #[test]
    fn udp_reply_to_a_flow_this_node_started_passes() {
        let f = ssh_only();
        let mut flows = FlowTable::new();
        let t0 = Instant::now();
        assert!(flows.note_outbound(&udp(ME, PEER, 5000, 53), t0));
        assert_eq!(flows.len(), 1);
        assert_eq!(
            f.check(&udp(PEER, ME, 53, 5000), &mut flows, t0),
            accept(AcceptReason::ReplyFlow)
        );
        // Only the exact reverse tuple.
        for p in [
            udp(PEER, ME, 54, 5000),
            udp(PEER, ME, 53, 5001),
            udp(STRANGER, ME, 53, 5000),
            udp(PEER, ME, 5000, 53),
        ] {
            assert_eq!(f.check(&p, &mut flows, t0), drop(DropReason::NoRule));
        }
        // IPv6 the same.
        assert!(flows.note_outbound(&udp6(ME6, PEER6, 5000, 53), t0));
        assert_eq!(
            f.check(&udp6(PEER6, ME6, 53, 5000), &mut flows, t0),
            accept(AcceptReason::ReplyFlow)
        );
        // The flow table outlives a filter: a new filter still lets the reply in.
        let g = deny_all();
        assert_eq!(
            g.check(&udp(PEER, ME, 53, 5000), &mut flows, t0),
            accept(AcceptReason::ReplyFlow)
        );
    }

    #[test]
    fn only_udp_and_sctp_start_flows() {
        let mut flows = FlowTable::new();
        let t0 = Instant::now();
        assert!(!flows.note_outbound(&tcp(ME, PEER, 5000, 22, Flags::Syn), t0));
        assert!(!flows.note_outbound(&icmp4(ME, PEER, icmpv4::TYPE_ECHO_REQUEST, 0), t0));
        assert!(!flows.note_outbound(&raw4(ME, PEER, 47, (0, false), &[0; 8]), t0));
        assert!(!flows.note_outbound(&udp(ME, [224, 0, 0, 251], 5353, 5353), t0));
        assert!(!flows.note_outbound(&udp(ME, [169, 254, 3, 3], 5353, 5353), t0));
        assert!(!flows.note_outbound(&raw4(ME, PEER, 17, (3, false), &[0; 8]), t0));
        assert!(!flows.note_outbound(&[0x45, 0, 0], t0));
        assert!(!flows.note_outbound(&[], t0));
        assert!(flows.is_empty());
    }

    #[test]
    fn sctp_is_matched_on_ports_and_tracked_like_udp() {
        // Common header: ports 5000 -> 9899, verification tag, checksum.
        let header = |s: u16, d: u16| {
            let mut h = Vec::new();
            h.extend_from_slice(&s.to_be_bytes());
            h.extend_from_slice(&d.to_be_bytes());
            h.extend_from_slice(&[0; 8]);
            h
        };
        let f = Filter::new(
            local(),
            vec![rule(&[IpProto::SCTP], PortRange::single(9899))],
        );
        assert_eq!(
            check(&f, &raw4(PEER, ME, 132, (0, false), &header(5000, 9899))),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &raw4(PEER, ME, 132, (0, false), &header(5000, 9898))),
            drop(DropReason::NoRule)
        );
        // Not among the default protocols.
        assert_eq!(
            check(
                &default_protos(),
                &raw4(PEER, ME, 132, (0, false), &header(5000, 9899))
            ),
            drop(DropReason::NoRule)
        );
        let mut flows = FlowTable::new();
        let t0 = Instant::now();
        assert!(flows.note_outbound(&raw4(ME, PEER, 132, (0, false), &header(7000, 80)), t0));
        assert_eq!(
            deny_all().check(
                &raw4(PEER, ME, 132, (0, false), &header(80, 7000)),
                &mut flows,
                t0
            ),
            accept(AcceptReason::ReplyFlow)
        );
        // A UDP packet with the same ports is another flow.
        assert_eq!(
            deny_all().check(&udp(PEER, ME, 80, 7000), &mut flows, t0),
            drop(DropReason::NoRule)
        );
    }

    #[test]
    fn icmp_echo_replies_and_errors_pass() {
        let f = deny_all();
        for ty in [
            icmpv4::TYPE_ECHO_REPLY,
            icmpv4::TYPE_DEST_UNREACH,
            icmpv4::TYPE_TIME_EXCEEDED,
            icmpv4::TYPE_PARAMETER_PROBLEM,
        ] {
            assert_eq!(
                check(&f, &icmp4(PEER, ME, ty, 0)),
                accept(AcceptReason::IcmpResponse),
                "v4 type {ty}"
            );
        }
        for ty in [
            icmpv6::TYPE_ECHO_REPLY,
            icmpv6::TYPE_DST_UNREACH,
            icmpv6::TYPE_PACKET_TOO_BIG,
            icmpv6::TYPE_TIME_EXCEEDED,
            icmpv6::TYPE_PARAMETER_PROBLEM,
        ] {
            assert_eq!(
                check(&f, &icmp6(PEER6, ME6, ty, 0)),
                accept(AcceptReason::IcmpResponse),
                "v6 type {ty}"
            );
        }
        // An echo reply with a nonzero code is not one; neither are redirects and requests.
        for (ty, code) in [
            (icmpv4::TYPE_ECHO_REPLY, 1),
            (icmpv4::TYPE_ECHO_REQUEST, 0),
            (icmpv4::TYPE_REDIRECT, 0),
            (icmpv4::TYPE_ROUTER_ADVERTISEMENT, 0),
        ] {
            assert_eq!(
                check(&f, &icmp4(PEER, ME, ty, code)),
                drop(DropReason::NoRule),
                "v4 type {ty} code {code}"
            );
        }
        for ty in [icmpv6::TYPE_ECHO_REQUEST, icmpv6::TYPE_ROUTER_SOLICITATION] {
            assert_eq!(
                check(&f, &icmp6(PEER6, ME6, ty, 0)),
                drop(DropReason::NoRule),
                "v6 type {ty}"
            );
        }
    }

    #[test]
    fn ping_passes_where_any_rule_lets_the_source_reach_the_destination() {
        // A rule for TCP 22 only still lets PEER ping ME (Tailscale's matchIPsOnly).
        let f = ssh_only();
        let ping4 = icmp4(PEER, ME, icmpv4::TYPE_ECHO_REQUEST, 0);
        let ping6 = icmp6(PEER6, ME6, icmpv6::TYPE_ECHO_REQUEST, 0);
        assert_eq!(check(&f, &ping4), accept(AcceptReason::IcmpToAllowedIp));
        assert_eq!(check(&f, &ping6), accept(AcceptReason::IcmpToAllowedIp));
        // Not a stranger, and not with no rule.
        assert_eq!(
            check(&f, &icmp4(STRANGER, ME, icmpv4::TYPE_ECHO_REQUEST, 0)),
            drop(DropReason::NoRule)
        );
        assert_eq!(check(&deny_all(), &ping4), drop(DropReason::NoRule));
        // ICMPv4 inside IPv6 (or v6 inside v4) is just another protocol.
        let p = raw6(PEER6, ME6, 1, None, &[8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(check(&f, &p), drop(DropReason::NoRule));
        let p = raw4(PEER, ME, 58, (0, false), &[129, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(check(&f, &p), drop(DropReason::NoRule));
        // As another protocol, it passes where a rule names it with all ports (the default
        // protocols include 58).
        assert_eq!(check(&default_protos(), &p), accept(AcceptReason::Rule));
    }

    #[test]
    fn other_protocols_need_a_rule_naming_them_with_all_ports() {
        let gre = raw4(PEER, ME, 47, (0, false), &[0; 8]);
        let gre6 = raw6(PEER6, ME6, 47, None, &[0; 8]);
        assert_eq!(check(&default_protos(), &gre), drop(DropReason::NoRule));
        let f = Filter::new(local(), vec![rule(&[IpProto(47)], PortRange::ALL)]);
        assert_eq!(check(&f, &gre), accept(AcceptReason::Rule));
        assert_eq!(check(&f, &gre6), accept(AcceptReason::Rule));
        let f = Filter::new(local(), vec![rule(&[IpProto(47)], PortRange::single(0))]);
        assert_eq!(check(&f, &gre), drop(DropReason::NoRule));
        let f = Filter::new(local(), vec![rule(&[IpProto(50)], PortRange::ALL)]);
        assert_eq!(check(&f, &gre), drop(DropReason::NoRule));
    }

    #[test]
    fn no_protocols_means_tcp_udp_and_icmp() {
        let f = default_protos();
        assert_eq!(
            check(&f, &tcp(PEER, ME, 1, 443, Flags::Syn)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &udp(PEER, ME, 1, 443)),
            accept(AcceptReason::Rule)
        );
        assert_eq!(
            check(&f, &icmp4(PEER, ME, icmpv4::TYPE_ECHO_REQUEST, 0)),
            accept(AcceptReason::IcmpToAllowedIp)
        );
        let set = ProtoSet::of(&[]);
        assert!([1u8, 6, 17, 58].iter().all(|p| set.contains(*p)));
        assert!(!set.contains(132) && !set.contains(47) && !set.contains(0));
        let set = ProtoSet::of(&[IpProto(255), IpProto(0), IpProto(64)]);
        assert!(set.contains(255) && set.contains(0) && set.contains(64));
        assert!(!set.contains(63) && !set.contains(6));
    }

    #[test]
    fn flows_expire_without_traffic_and_replies_refresh_them() {
        let f = deny_all();
        let mut flows = FlowTable::new();
        let t0 = Instant::now();
        let out = udp(ME, PEER, 5000, 53);
        let reply = udp(PEER, ME, 53, 5000);
        flows.note_outbound(&out, t0);
        // A reply just before the timeout refreshes the flow.
        let t1 = t0 + FLOW_TIMEOUT - Duration::from_millis(1);
        assert_eq!(
            f.check(&reply, &mut flows, t1),
            accept(AcceptReason::ReplyFlow)
        );
        let t2 = t1 + FLOW_TIMEOUT - Duration::from_millis(1);
        assert_eq!(
            f.check(&reply, &mut flows, t2),
            accept(AcceptReason::ReplyFlow)
        );
        // Silent for the whole timeout: gone.
        let t3 = t2 + FLOW_TIMEOUT;
        assert_eq!(f.check(&reply, &mut flows, t3), drop(DropReason::NoRule));
        assert!(flows.is_empty());
        // Sending again starts it anew.
        flows.note_outbound(&out, t3);
        assert_eq!(
            f.check(&reply, &mut flows, t3),
            accept(AcceptReason::ReplyFlow)
        );
    }

    #[test]
    fn recording_clears_expired_flows() {
        let mut flows = FlowTable::with_limits(16, Duration::from_secs(10));
        let t0 = Instant::now();
        for port in 0..10 {
            flows.note_outbound(&udp(ME, PEER, 5000 + port, 53), t0);
        }
        flows.note_outbound(&udp(ME, PEER, 6000, 53), t0 + Duration::from_secs(5));
        assert_eq!(flows.len(), 11);
        flows.note_outbound(&udp(ME, PEER, 6001, 53), t0 + Duration::from_secs(10));
        assert_eq!(flows.len(), 2, "the ten from t0 are cleared");
        assert_eq!(flows.slots.len(), 11, "the new flow took a freed slot");
        assert_eq!(flows.free.len(), 9, "the other freed slots wait for reuse");
        flows.note_outbound(&udp(ME, PEER, 6002, 53), t0 + Duration::from_secs(10));
        assert_eq!((flows.slots.len(), flows.free.len()), (11, 8));
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_used_flow() {
        let f = deny_all();
        let mut flows = FlowTable::with_limits(3, FLOW_TIMEOUT);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        for (i, port) in [1u16, 2, 3].into_iter().enumerate() {
            flows.note_outbound(&udp(ME, PEER, port, 53), t0 + s * i as u32);
        }
        // A reply to flow 1 makes it recent; flow 2 is now the oldest.
        assert!(
            f.check(&udp(PEER, ME, 53, 1), &mut flows, t0 + s * 3)
                .is_accept()
        );
        flows.note_outbound(&udp(ME, PEER, 4, 53), t0 + s * 4);
        assert_eq!(flows.len(), 3);
        let t = t0 + s * 5;
        for (port, live) in [(1u16, true), (2, false), (3, true), (4, true)] {
            assert_eq!(
                f.check(&udp(PEER, ME, 53, port), &mut flows, t).is_accept(),
                live,
                "flow {port}"
            );
        }
        // Capacity zero records nothing.
        let mut none = FlowTable::with_limits(0, FLOW_TIMEOUT);
        assert!(!none.note_outbound(&udp(ME, PEER, 1, 53), t0));
        assert!(none.is_empty());
    }

    #[test]
    fn drop_reasons_have_names() {
        assert_eq!(DropReason::NoRule.to_string(), "no rule");
        assert_eq!(DropReason::NotLocal.as_str(), "not local");
    }
}
