//! MagicDNS: the resolver behind 100.100.100.100 and fd7a:115c:a1e0::53, without I/O.
//!
//! It exists so that peers are reachable by name (`peer.base_domain`) and so that the host's
//! other DNS traffic, once the OS resolver points at the magic address, still reaches the
//! configured upstreams (split DNS first, then the global nameservers). The answers follow
//! Tailscale's `net/dns/resolver/tsdns.go`:
//!
//! - A/AAAA (and ANY, which answers both) for self, peers and extra records, TTL
//!   [`TTL`] seconds. A single-label query `peer.` is tried as `peer.<base_domain>`, then
//!   under each search domain.
//! - PTR for known addresses in 100.64.0.0/10 (`d.c.b.100.in-addr.arpa`) and
//!   fd7a:115c:a1e0::/48 (nibble names under `0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa`).
//! - A known name asked for another type: NOERROR with no records. NS, SOA, AXFR and HINFO
//!   inside our zones: NOTIMP. An unknown name inside `base_domain` or the reverse zones:
//!   authoritative NXDOMAIN. Negative answers in our zones carry the zone's SOA in the
//!   authority section (TTL and minimum [`NEGATIVE_TTL`]), so stub resolvers cache them.
//! - Everything else is forwarded to the upstreams of the longest matching split domain, else
//!   the global upstreams. With no upstream the client gets SERVFAIL (not REFUSED: glibc and
//!   systemd-resolved treat both as "try another server", and SERVFAIL says what happened: we
//!   cannot answer, not that we will not).
//!
//! The shell feeds queries the app sent to the magic address ([`Resolver::handle_query`]),
//! replies from upstreams ([`Resolver::handle_upstream`]) and timer expiries, and drains
//! [`Resolver::poll_answer`] (packets for the app) and [`Resolver::poll_forward`] (datagrams
//! for upstreams). DNS messages are parsed and built with `hickory-proto`; the IP/UDP packets
//! of the TUN path with `etherparse` ([`parse_dns_packet`], [`udp_packet`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable, BinEncoder};
use warren_proto::control::{DnsConfig, Node};

/// The MagicDNS resolver's IPv4 address (Tailscale's quad-100).
pub const MAGIC_DNS_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// The MagicDNS resolver's IPv6 address (Tailscale's `fd7a:115c:a1e0::53`).
pub const MAGIC_DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0x53);
/// The port the resolver answers on.
pub const DNS_PORT: u16 = 53;
/// TTL of local answers, in seconds (Tailscale uses 5 s so renames show quickly).
pub const TTL: u32 = 5;
/// TTL and SOA minimum of negative answers in our zones, in seconds.
pub const NEGATIVE_TTL: u32 = 10;
/// How long a forwarded query may wait for any upstream before the client gets SERVFAIL.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// After this long without a reply the query is also sent to the next upstream, if there is
/// one (still within [`FORWARD_TIMEOUT`] overall; a late reply from the first still counts).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// At most this many forwarded queries wait for replies; more are dropped (the app retries).
pub const MAX_PENDING: usize = 1024;
/// At most this many answers wait in [`Resolver::poll_answer`]'s queue; more are dropped.
pub const MAX_QUEUED_ANSWERS: usize = 1024;
/// At most this many datagrams wait in [`Resolver::poll_forward`]'s queue; more are dropped.
pub const MAX_QUEUED_FORWARDS: usize = 1024;
/// The largest UDP reply we send a client that did not announce a bigger one with EDNS.
const MIN_UDP_PAYLOAD: usize = 512;
/// The UDP payload size we announce in EDNS replies (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// What the resolver knows: names to answer and where to forward the rest. Built from the
/// control server's netmap with [`DnsSettings::from_netmap`]; plain data so tests and the shell
/// can also write one directly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsSettings {
    /// The MagicDNS suffix (`mesh.example`), lowercase, without a trailing dot; empty when
    /// MagicDNS is off (then no name is ours).
    pub base_domain: String,
    /// Search domains after `base_domain` (lowercase, no trailing dot): a single-label query
    /// is also tried under each of these.
    pub search_domains: Vec<String>,
    /// Lowercase fully qualified names without the trailing dot, with their addresses.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Global upstreams for names that are neither ours nor under a split domain.
    pub upstreams: Vec<SocketAddr>,
    /// Split DNS: a domain (lowercase, no trailing dot) and the upstreams for it and every
    /// name under it. A domain with no upstreams makes its names SERVFAIL, so they never leak
    /// to the global upstreams.
    pub split: Vec<(String, Vec<SocketAddr>)>,
}

impl DnsSettings {
    /// Builds the settings from the netmap's DNS section, the node itself and its peers.
    ///
    /// Names (`given_name.base_domain`, addresses from `Node.addresses`) and extra records
    /// (A/AAAA only) are filled in only when `dns.magic_dns` is set; upstreams and split DNS
    /// always are. Nameservers are `ip` or `ip:port` (port 53 by default); malformed ones (and
    /// DoH URLs, which warren does not speak) are skipped with a warning.
    pub fn from_netmap<'a>(
        dns: &DnsConfig,
        me: Option<&Node>,
        peers: impl IntoIterator<Item = &'a Node>,
    ) -> Self {
        let base_domain = normalize_domain(&dns.base_domain);
        let mut hosts: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        if dns.magic_dns && !base_domain.is_empty() {
            // `me` may borrow for less long than the peers: shorten theirs to match.
            let peers = peers.into_iter().map(|p| -> &Node { p });
            for node in me.into_iter().chain(peers) {
                let label = normalize_domain(&node.given_name);
                if label.is_empty() {
                    continue;
                }
                let addrs = node.addresses.iter().filter_map(|a| {
                    let ip = parse_node_address(a);
                    if ip.is_none() {
                        tracing::warn!(node = node.id, address = %a, "skipping malformed node address");
                    }
                    ip
                });
                add_host(&mut hosts, format!("{label}.{base_domain}"), addrs);
            }
            for r in &dns.extra_records {
                let name = normalize_domain(&r.name);
                let ip: Option<IpAddr> = match r.r#type.to_ascii_uppercase().as_str() {
                    "A" => r.value.trim().parse::<Ipv4Addr>().ok().map(IpAddr::V4),
                    "AAAA" => r.value.trim().parse::<Ipv6Addr>().ok().map(IpAddr::V6),
                    _ => None,
                };
                match ip {
                    Some(ip) if !name.is_empty() => add_host(&mut hosts, name, [ip]),
                    _ => tracing::warn!(
                        name = %r.name, r#type = %r.r#type, value = %r.value,
                        "skipping extra record (only A/AAAA with a matching address)"
                    ),
                }
            }
        }
        let mut search_domains: Vec<String> = Vec::new();
        for d in &dns.search_domains {
            let d = normalize_domain(d);
            if !d.is_empty() && d != base_domain && !search_domains.contains(&d) {
                search_domains.push(d);
            }
        }
        let split = dns
            .split
            .iter()
            .filter_map(|s| {
                let domain = normalize_domain(&s.domain);
                if domain.is_empty() {
                    tracing::warn!(domain = %s.domain, "skipping split DNS entry without a domain");
                    return None;
                }
                Some((domain, parse_nameservers(&s.nameservers)))
            })
            .collect();
        DnsSettings {
            base_domain: if dns.magic_dns {
                base_domain
            } else {
                String::new()
            },
            search_domains,
            hosts,
            upstreams: parse_nameservers(&dns.nameservers),
            split,
        }
    }
}

/// Adds addresses to a host, keeping the first occurrence of each.
fn add_host(
    hosts: &mut BTreeMap<String, Vec<IpAddr>>,
    name: String,
    addrs: impl IntoIterator<Item = IpAddr>,
) {
    let entry = hosts.entry(name).or_default();
    for ip in addrs {
        if !entry.contains(&ip) {
            entry.push(ip);
        }
    }
}

/// "100.64.0.1/32" or a bare address.
fn parse_node_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    match s.split_once('/') {
        Some((ip, len)) => {
            len.parse::<u8>().ok()?;
            ip.parse().ok()
        }
        None => s.parse().ok(),
    }
}

/// "ip" or "ip:port" ("[v6]:port" for IPv6 with a port); the malformed ones are skipped.
fn parse_nameservers(list: &[String]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for s in list {
        let t = s.trim();
        let addr = t
            .parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, DNS_PORT))
            .or_else(|_| t.parse::<SocketAddr>());
        match addr {
            Ok(a) => {
                let a = canonical(a);
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            Err(_) => tracing::warn!(nameserver = %s, "skipping malformed nameserver"),
        }
    }
    out
}

/// Lowercase, without surrounding whitespace and trailing dots.
fn normalize_domain(s: &str) -> String {
    s.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// An IPv4-mapped IPv6 address as the IPv4 address, so a reply seen on a dual-stack socket
/// matches the upstream it was sent to.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// `name` is `zone` or under it (label-wise; both lowercase without the trailing dot).
fn in_zone(name: &str, zone: &str) -> bool {
    !zone.is_empty()
        && (name == zone
            || (name.len() > zone.len()
                && name.ends_with(zone)
                && name.as_bytes()[name.len() - zone.len() - 1] == b'.'))
}

/// The reverse zone of fd7a:115c:a1e0::/48.
const REVERSE_V6_ZONE: &str = "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa";

/// 100.64.0.0/10 holds `ip`.
fn is_cgnat(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && (64..=127).contains(&o[1])
}

/// fd7a:115c:a1e0::/48 holds `ip`.
fn is_tailnet_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
}

/// The reverse zone (one of `64..=127.100.in-addr.arpa`, or the /48's nibble zone) that
/// holds `name`, if it is one of ours.
fn reverse_zone(name: &str) -> Option<String> {
    if in_zone(name, REVERSE_V6_ZONE) {
        return Some(REVERSE_V6_ZONE.to_owned());
    }
    let rest = name.strip_suffix(".100.in-addr.arpa")?;
    let second = rest.rsplit('.').next()?;
    let n: u8 = second.parse().ok()?;
    // "064" is not how the zone is spelled.
    ((64..=127).contains(&n) && n.to_string() == second).then(|| format!("{n}.100.in-addr.arpa"))
}

/// A DNS payload to send back to the app that asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// The app's address (the query's source): the reply's destination.
    pub client: SocketAddr,
    /// The magic address the app asked (the query's destination): the reply's source.
    pub server: SocketAddr,
    /// The DNS message.
    pub payload: Vec<u8>,
}

/// A query to send to an upstream resolver. The shell sends every one from the same UDP socket
/// and passes what comes back to [`Resolver::handle_upstream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsForward {
    /// The upstream resolver.
    pub upstream: SocketAddr,
    /// The DNS message (the app's query with a fresh ID).
    pub payload: Vec<u8>,
}

/// Counters for `warren status` and tests: what happened to the queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries answered from the netmap (records, NODATA, NXDOMAIN or NOTIMP).
    pub answered_locally: u64,
    /// Queries forwarded to an upstream (counted once per query).
    pub forwarded: u64,
    /// Extra sends of a forwarded query to the next upstream after [`RETRY_AFTER`].
    pub retried: u64,
    /// Upstream replies relayed to the app.
    pub upstream_answers: u64,
    /// SERVFAIL sent because no upstream answered within [`FORWARD_TIMEOUT`].
    pub servfail: u64,
    /// SERVFAIL sent because the name has no upstream at all.
    pub no_upstream: u64,
    /// FORMERR sent for a query that parsed badly, was not a standard query or did not ask
    /// exactly one question.
    pub formerr: u64,
    /// Queries, answers or forwards dropped because a cap ([`MAX_PENDING`],
    /// [`MAX_QUEUED_ANSWERS`], [`MAX_QUEUED_FORWARDS`]) was reached.
    pub dropped: u64,
    /// Payloads to the magic address dropped without an answer: no readable header, or a
    /// response rather than a query.
    pub malformed: u64,
    /// Upstream datagrams ignored: from an unexpected address, with an unknown ID, not a
    /// response, unparseable, or for another question.
    pub ignored_replies: u64,
}

/// splitmix64: fresh, unpredictable transaction IDs for forwarded queries (with a seed from the
/// OS), so an off-path attacker cannot easily forge upstream replies.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A forwarded query waiting for a reply.
#[derive(Debug)]
struct Pending {
    client: SocketAddr,
    server: SocketAddr,
    /// The app's header (its ID and flags), for the reply and for SERVFAIL.
    request: Metadata,
    /// The app's question, which an upstream's reply must repeat.
    question: Query,
    /// The app's EDNS, echoed in a SERVFAIL.
    edns: bool,
    /// The app's query as received.
    query: Vec<u8>,
    upstreams: Vec<SocketAddr>,
    /// Index in `upstreams` of the next one to try.
    next: usize,
    /// The (upstream, ID) pairs this query went out as; a reply to any of them answers it.
    sent: Vec<(SocketAddr, u16)>,
    /// When to try the next upstream, if there is one left.
    retry_at: Option<Instant>,
    /// When the app gets SERVFAIL.
    deadline: Instant,
    /// The key of this query in `Resolver::timers`.
    wake: Instant,
}

/// The MagicDNS resolver: answers names from the netmap, forwards the rest. Sans-IO: see the
/// module docs for the driving loop.
#[derive(Debug)]
pub struct Resolver {
    settings: DnsSettings,
    /// Known tailnet addresses (100.64.0.0/10, fd7a:115c:a1e0::/48) and the name PTR gives.
    reverse: BTreeMap<IpAddr, String>,
    rng: Rng,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    by_txid: BTreeMap<(SocketAddr, u16), u64>,
    timers: BTreeSet<(Instant, u64)>,
    answers: VecDeque<DnsAnswer>,
    forwards: VecDeque<DnsForward>,
    stats: DnsStats,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

/// How a local lookup turned out.
enum Local {
    /// Records of the asked type (possibly none: NODATA) for an existing name. `zone` is the
    /// authoritative zone for the SOA of a NODATA answer, when the name is in one of ours.
    Records {
        records: Vec<Record>,
        zone: Option<String>,
    },
    /// NXDOMAIN in one of our zones.
    NxDomain { zone: String },
    /// NOTIMP (NS, SOA, AXFR, HINFO for our names).
    NotImp,
    /// Not ours: forward.
    Forward,
}

impl Resolver {
    /// A resolver with no settings yet: it answers nothing locally and, having no upstream,
    /// SERVFAILs everything until [`Resolver::set_settings`]. Transaction IDs come from a
    /// fixed seed; the daemon should use [`Resolver::with_seed`] with OS randomness.
    pub fn new() -> Self {
        Self::with_seed(0x5761_7272_656e_444e)
    }

    /// As [`Resolver::new`], with the seed for the IDs of forwarded queries (from the OS's
    /// random generator, so upstream replies are hard to forge).
    pub fn with_seed(seed: u64) -> Self {
        Resolver {
            settings: DnsSettings::default(),
            reverse: BTreeMap::new(),
            rng: Rng(seed),
            next_seq: 0,
            pending: BTreeMap::new(),
            by_txid: BTreeMap::new(),
            timers: BTreeSet::new(),
            answers: VecDeque::new(),
            forwards: VecDeque::new(),
            stats: DnsStats::default(),
        }
    }

    /// Replaces the names and upstreams; call on every netmap change. Queries already
    /// forwarded keep their upstreams.
    pub fn set_settings(&mut self, s: DnsSettings) {
        let mut reverse: BTreeMap<IpAddr, String> = BTreeMap::new();
        // The PTR name of an address: a node's own name (one label under base_domain) before
        // extra records, then alphabetical, so the answer does not depend on map order.
        let node_name = |name: &str| {
            name.strip_suffix(s.base_domain.as_str())
                .and_then(|l| l.strip_suffix('.'))
                .is_some_and(|l| !l.is_empty() && !l.contains('.'))
        };
        for pass_nodes in [true, false] {
            for (name, addrs) in &s.hosts {
                if node_name(name) != pass_nodes {
                    continue;
                }
                for ip in addrs {
                    let ours = match ip {
                        IpAddr::V4(v4) => is_cgnat(*v4),
                        IpAddr::V6(v6) => is_tailnet_v6(*v6),
                    };
                    if ours {
                        reverse.entry(*ip).or_insert_with(|| name.clone());
                    }
                }
            }
        }
        self.reverse = reverse;
        self.settings = s;
    }

    /// The current settings.
    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    /// A DNS payload an app sent from `client` to `server` (the magic address, port 53): call
    /// for each one the TUN path picked out with [`parse_dns_packet`]. Afterwards drain
    /// [`Resolver::poll_answer`] and [`Resolver::poll_forward`] and re-arm the timer from
    /// [`Resolver::poll_timeout`].
    pub fn handle_query(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) {
        let Ok(header) = Header::from_bytes(payload) else {
            self.stats.malformed += 1;
            tracing::trace!(%client, len = payload.len(), "DNS query without a header");
            return;
        };
        if header.message_type != MessageType::Query {
            // Answering a response could start a loop between two resolvers.
            self.stats.malformed += 1;
            return;
        }
        let msg = match Message::from_vec(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%client, error = %e, "malformed DNS query");
                self.formerr(client, server, &header.metadata);
                return;
            }
        };
        if msg.metadata.op_code != OpCode::Query || msg.queries.len() != 1 {
            self.formerr(client, server, &msg.metadata);
            return;
        }
        let question = msg.queries[0].clone();
        match self.lookup(&question) {
            Local::Forward => self.forward(client, server, payload, &msg, question, now),
            local => {
                self.stats.answered_locally += 1;
                let reply = local_reply(&msg, &question, local);
                self.push_answer(client, server, reply);
            }
        }
    }

    /// A datagram that arrived on the forwarding socket from `from`. Replies that do not match
    /// a query in flight (address, ID and question) are ignored.
    pub fn handle_upstream(&mut self, from: SocketAddr, payload: &[u8], now: Instant) {
        let _ = now;
        let from = canonical(from);
        let Ok(header) = Header::from_bytes(payload) else {
            self.stats.ignored_replies += 1;
            return;
        };
        let Some(&seq) = self.by_txid.get(&(from, header.metadata.id)) else {
            self.stats.ignored_replies += 1;
            tracing::debug!(%from, id = header.metadata.id, "unexpected DNS reply");
            return;
        };
        if header.message_type != MessageType::Response {
            self.stats.ignored_replies += 1;
            return;
        }
        let Some(p) = self.pending.get(&seq) else {
            return;
        };
        let same_question = Message::from_vec(payload).is_ok_and(|m| {
            m.queries.len() == 1
                && m.queries[0].name() == p.question.name()
                && m.queries[0].query_type() == p.question.query_type()
                && m.queries[0].query_class() == p.question.query_class()
        });
        if !same_question {
            self.stats.ignored_replies += 1;
            tracing::debug!(%from, "DNS reply for another question, or unparseable");
            return;
        }
        let (client, server, id) = (p.client, p.server, p.request.id);
        self.finish(seq);
        let Some(reply) = with_id(payload, id) else {
            return;
        };
        self.stats.upstream_answers += 1;
        self.push_answer(client, server, reply);
    }

    /// Call when the instant from [`Resolver::poll_timeout`] has passed: sends queries on to
    /// the next upstream and SERVFAILs those past [`FORWARD_TIMEOUT`].
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, seq));
            let Some(p) = self.pending.get(&seq) else {
                continue;
            };
            if now >= p.deadline {
                let (client, server) = (p.client, p.server);
                let mut reply = Message::new(p.request.id, MessageType::Response, OpCode::Query);
                reply.metadata = Metadata::response_from_request(&p.request);
                reply.metadata.recursion_available = true;
                reply.metadata.response_code = ResponseCode::ServFail;
                reply.add_query(p.question.clone());
                if p.edns {
                    reply.set_edns(our_edns());
                }
                tracing::debug!(%client, name = %p.question.name(), "no upstream answered in time");
                self.finish(seq);
                self.stats.servfail += 1;
                self.push_answer(client, server, encode(&reply));
            } else {
                self.send_attempt(seq, now);
                self.stats.retried += 1;
            }
        }
    }

    /// When [`Resolver::handle_timeout`] should be called next, if anything waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// The next reply for an app; the shell wraps it with [`udp_packet`] (source `server`,
    /// destination `client`) and writes it to the TUN device.
    pub fn poll_answer(&mut self) -> Option<DnsAnswer> {
        self.answers.pop_front()
    }

    /// The next datagram for an upstream.
    pub fn poll_forward(&mut self) -> Option<DnsForward> {
        self.forwards.pop_front()
    }

    /// The counters so far.
    pub fn stats(&self) -> DnsStats {
        self.stats
    }

    /// How many forwarded queries wait for a reply.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn formerr(&mut self, client: SocketAddr, server: SocketAddr, request: &Metadata) {
        let mut reply = Message::new(request.id, MessageType::Response, request.op_code);
        reply.metadata = Metadata::response_from_request(request);
        reply.metadata.response_code = ResponseCode::FormErr;
        self.stats.formerr += 1;
        self.push_answer(client, server, encode(&reply));
    }

    fn push_answer(&mut self, client: SocketAddr, server: SocketAddr, payload: Vec<u8>) {
        if payload.is_empty() {
            return;
        }
        if self.answers.len() >= MAX_QUEUED_ANSWERS {
            self.stats.dropped += 1;
            return;
        }
        self.answers.push_back(DnsAnswer {
            client,
            server,
            payload,
        });
    }

    /// Answers `q` from the netmap, or says to forward it.
    fn lookup(&self, q: &Query) -> Local {
        let name = normalize_domain(&q.name().to_lowercase().to_ascii());
        let qtype = q.query_type();
        let s = &self.settings;
        let notimp = matches!(
            qtype,
            RecordType::NS | RecordType::SOA | RecordType::AXFR | RecordType::HINFO
        );
        let base_zone = in_zone(&name, &s.base_domain).then(|| s.base_domain.clone());
        // Exact names, then a single label under base_domain and the search domains.
        let known = s.hosts.get(&name).or_else(|| {
            if name.is_empty() || name.contains('.') {
                return None;
            }
            std::iter::once(&s.base_domain)
                .chain(&s.search_domains)
                .filter(|d| !d.is_empty())
                .find_map(|d| s.hosts.get(&format!("{name}.{d}")))
        });
        let in_class = q.query_class() == DNSClass::IN || q.query_class() == DNSClass::ANY;
        if let Some(addrs) = known {
            if notimp || !in_class {
                return Local::NotImp;
            }
            let records = addrs
                .iter()
                .filter_map(|ip| match (ip, qtype) {
                    (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                        Some(RData::AAAA(AAAA(*v6)))
                    }
                    _ => None,
                })
                .map(|rd| Record::from_rdata(q.name().clone(), TTL, rd))
                .collect();
            return Local::Records {
                records,
                zone: base_zone,
            };
        }
        if let Some(zone) = reverse_zone(&name) {
            if notimp || !in_class {
                return Local::NotImp;
            }
            let Ok(net) = q.name().parse_arpa_name() else {
                return Local::NxDomain { zone };
            };
            let full = match net.addr() {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            if net.prefix_len() < full {
                // The zone apex or a name between it and the addresses.
                return Local::Records {
                    records: Vec::new(),
                    zone: Some(zone),
                };
            }
            let Some(host) = self.reverse.get(&net.addr()) else {
                return Local::NxDomain { zone };
            };
            let mut records = Vec::new();
            if matches!(qtype, RecordType::PTR | RecordType::ANY)
                && let Ok(target) = Name::from_ascii(format!("{host}."))
            {
                records.push(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
            }
            return Local::Records {
                records,
                zone: Some(zone),
            };
        }
        if let Some(zone) = base_zone {
            if notimp || !in_class {
                return Local::NotImp;
            }
            // The apex, or a name with known names below it, exists (RFC 8020: NXDOMAIN there
            // would deny everything under it).
            let suffix = format!(".{name}");
            if name == zone || s.hosts.keys().any(|h| h.ends_with(&suffix)) {
                return Local::Records {
                    records: Vec::new(),
                    zone: Some(zone),
                };
            }
            return Local::NxDomain { zone };
        }
        Local::Forward
    }

    /// Sends `msg` (the raw `payload`) to the upstreams for its name, or SERVFAILs.
    fn forward(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        payload: &[u8],
        msg: &Message,
        question: Query,
        now: Instant,
    ) {
        let name = normalize_domain(&question.name().to_lowercase().to_ascii());
        let upstreams = self
            .settings
            .split
            .iter()
            .filter(|(d, _)| in_zone(&name, d))
            .max_by_key(|(d, _)| d.len())
            .map_or(&self.settings.upstreams, |(_, u)| u)
            .clone();
        if upstreams.is_empty() {
            let mut reply = Message::new(msg.metadata.id, MessageType::Response, OpCode::Query);
            reply.metadata = Metadata::response_from_request(&msg.metadata);
            reply.metadata.recursion_available = true;
            reply.metadata.response_code = ResponseCode::ServFail;
            reply.add_query(question);
            if msg.edns.is_some() {
                reply.set_edns(our_edns());
            }
            self.stats.no_upstream += 1;
            self.push_answer(client, server, encode(&reply));
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.stats.dropped += 1;
            tracing::debug!(%client, "too many DNS queries in flight, dropping one");
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = now + FORWARD_TIMEOUT;
        self.pending.insert(
            seq,
            Pending {
                client,
                server,
                request: msg.metadata,
                question,
                edns: msg.edns.is_some(),
                query: payload.to_vec(),
                upstreams,
                next: 0,
                sent: Vec::new(),
                retry_at: None,
                deadline,
                wake: deadline,
            },
        );
        self.stats.forwarded += 1;
        self.send_attempt(seq, now);
    }

    /// Sends pending query `seq` to its next upstream and re-arms its timer.
    fn send_attempt(&mut self, seq: u64, now: Instant) {
        let Some(p) = self.pending.get(&seq) else {
            return;
        };
        let Some(&upstream) = p.upstreams.get(p.next) else {
            return;
        };
        let upstream = canonical(upstream);
        let mut id = (self.rng.next_u64() & 0xffff) as u16;
        // At most MAX_PENDING * upstreams IDs are taken, far fewer than 65536.
        while self.by_txid.contains_key(&(upstream, id)) {
            id = (self.rng.next_u64() & 0xffff) as u16;
        }
        let Some(payload) = with_id(&p.query, id) else {
            return;
        };
        if self.forwards.len() >= MAX_QUEUED_FORWARDS {
            self.stats.dropped += 1;
        } else {
            self.forwards.push_back(DnsForward { upstream, payload });
        }
        self.by_txid.insert((upstream, id), seq);
        let Some(p) = self.pending.get_mut(&seq) else {
            return;
        };
        p.sent.push((upstream, id));
        p.next += 1;
        p.retry_at = (p.next < p.upstreams.len()).then(|| (now + RETRY_AFTER).min(p.deadline));
        self.timers.remove(&(p.wake, seq));
        p.wake = p.retry_at.unwrap_or(p.deadline);
        self.timers.insert((p.wake, seq));
    }

    /// Forgets pending query `seq`.
    fn finish(&mut self, seq: u64) {
        if let Some(p) = self.pending.remove(&seq) {
            self.timers.remove(&(p.wake, seq));
            for key in &p.sent {
                self.by_txid.remove(key);
            }
        }
    }
}

/// Builds the reply to `req` from a local lookup.
fn local_reply(req: &Message, q: &Query, local: Local) -> Vec<u8> {
    let mut reply = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata = Metadata::response_from_request(&req.metadata);
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    if req.edns.is_some() {
        reply.set_edns(our_edns());
    }
    let negative_zone = match local {
        Local::Records { records, zone } => {
            reply.metadata.authoritative = zone.is_some();
            let empty = records.is_empty();
            reply.answers = records;
            zone.filter(|_| empty)
        }
        Local::NxDomain { zone } => {
            reply.metadata.authoritative = true;
            reply.metadata.response_code = ResponseCode::NXDomain;
            Some(zone)
        }
        Local::NotImp => {
            reply.metadata.response_code = ResponseCode::NotImp;
            None
        }
        Local::Forward => None,
    };
    if let Some(zone) = negative_zone
        && let (Ok(apex), Ok(rname)) = (
            Name::from_ascii(format!("{zone}.")),
            Name::from_ascii(format!("hostmaster.{zone}.")),
        )
    {
        let soa = SOA::new(apex.clone(), rname, 1, 3600, 600, 86400, NEGATIVE_TTL);
        reply.add_authority(Record::from_rdata(apex, NEGATIVE_TTL, RData::SOA(soa)));
    }
    let limit = req.edns.as_ref().map_or(MIN_UDP_PAYLOAD, |e| {
        usize::from(e.max_payload()).max(MIN_UDP_PAYLOAD)
    });
    let bytes = encode(&reply);
    if bytes.len() <= limit {
        return bytes;
    }
    // Too big for the client's buffer: TC, so it retries over TCP (or makes do).
    reply.answers.clear();
    reply.authorities.clear();
    reply.metadata.truncation = true;
    encode(&reply)
}

/// The OPT record of our replies.
fn our_edns() -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    e
}

/// Encodes a message we built; an encoding failure is our bug, and the client then gets
/// nothing (an empty payload is never queued).
fn encode(msg: &Message) -> Vec<u8> {
    match msg.to_vec() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a DNS reply");
            Vec::new()
        }
    }
}

/// `payload` with the header's ID replaced. The rest of the message is kept byte for byte: an
/// upstream's records reach the app exactly as sent, including types hickory does not know.
fn with_id(payload: &[u8], id: u16) -> Option<Vec<u8>> {
    let mut header = Header::from_bytes(payload).ok()?;
    header.metadata.id = id;
    let mut out = Vec::with_capacity(payload.len());
    {
        let mut enc = BinEncoder::new(&mut out);
        header.emit(&mut enc).ok()?;
    }
    let header_len = out.len();
    out.extend_from_slice(payload.get(header_len..)?);
    Some(out)
}

/// Picks a DNS query for the magic resolver out of an IP packet from the TUN device: Some
/// only for an unfragmented UDP packet to [`MAGIC_DNS_V4`] or [`MAGIC_DNS_V6`] port 53 with a
/// valid checksum. Returns (source, destination, UDP payload).
pub fn parse_dns_packet(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (src, dst, checksum_ok) = match (&sliced.net, &sliced.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) => {
            if ip.is_payload_fragmented() || ip.header().destination_addr() != MAGIC_DNS_V4 {
                return None;
            }
            let h = ip.header().to_header();
            let ok = udp.checksum() == 0
                || udp
                    .to_header()
                    .calc_checksum_ipv4(&h, udp.payload())
                    .is_ok_and(|c| c == udp.checksum());
            (
                IpAddr::V4(h.source.into()),
                IpAddr::V4(h.destination.into()),
                ok,
            )
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Udp(udp))) => {
            if ip.is_payload_fragmented() || ip.header().destination_addr() != MAGIC_DNS_V6 {
                return None;
            }
            let h = ip.header().to_header();
            let ok = udp
                .to_header()
                .calc_checksum_ipv6(&h, udp.payload())
                .is_ok_and(|c| c == udp.checksum());
            (
                IpAddr::V6(h.source.into()),
                IpAddr::V6(h.destination.into()),
                ok,
            )
        }
        _ => return None,
    };
    let TransportSlice::Udp(udp) = sliced.transport? else {
        return None;
    };
    if !checksum_ok || udp.destination_port() != DNS_PORT {
        return None;
    }
    Some((
        SocketAddr::new(src, udp.source_port()),
        SocketAddr::new(dst, udp.destination_port()),
        udp.payload(),
    ))
}

/// A complete IPv4 or IPv6 UDP packet from `src` to `dst` with correct checksums, for writing
/// a [`DnsAnswer`] to the TUN device. Both addresses must be of the same family; otherwise (or
/// for a payload too large for one packet) the result is empty and nothing should be sent.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
        }
        _ => {
            tracing::error!(%src, %dst, "DNS reply between address families");
            return Vec::new();
        }
    }
    .udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    match builder.write(&mut out, payload) {
        Ok(()) => out,
        Err(e) => {
            tracing::error!(error = %e, len = payload.len(), "cannot build a DNS reply packet");
            Vec::new()
        }
    }
}

#[cfg(test)]
// Tests start from the real clock once; every later instant is derived from it.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use warren_proto::control::{DnsRecord, SplitDns};

    const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)), 40000);
    const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(MAGIC_DNS_V4), DNS_PORT);

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn node(name: &str, addrs: &[&str]) -> Node {
        Node {
            given_name: name.to_owned(),
            addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn config() -> DnsConfig {
        DnsConfig {
            magic_dns: true,
            base_domain: "Mesh.Example.".to_owned(),
            nameservers: vec![
                "9.9.9.9".to_owned(),
                "1.1.1.1:5353".to_owned(),
                "bogus".to_owned(),
                "https://dns.example/dns-query".to_owned(),
            ],
            split: vec![
                SplitDns {
                    domain: "internal.example".to_owned(),
                    nameservers: vec!["10.0.0.53".to_owned()],
                },
                SplitDns {
                    domain: "a.internal.example".to_owned(),
                    nameservers: vec!["10.0.0.54:5300".to_owned()],
                },
                SplitDns {
                    domain: "dead.example".to_owned(),
                    nameservers: vec!["nonsense".to_owned()],
                },
            ],
            search_domains: vec!["corp.example".to_owned(), "mesh.example".to_owned()],
            extra_records: vec![
                DnsRecord {
                    name: "grafana.mesh.example".to_owned(),
                    r#type: "A".to_owned(),
                    value: "100.64.0.9".to_owned(),
                },
                DnsRecord {
                    name: "db.corp.example.".to_owned(),
                    r#type: "a".to_owned(),
                    value: "10.1.2.3".to_owned(),
                },
                DnsRecord {
                    name: "db.corp.example".to_owned(),
                    r#type: "AAAA".to_owned(),
                    value: "2001:db8::3".to_owned(),
                },
                DnsRecord {
                    name: "bad.mesh.example".to_owned(),
                    r#type: "A".to_owned(),
                    value: "2001:db8::1".to_owned(),
                },
                DnsRecord {
                    name: "txt.mesh.example".to_owned(),
                    r#type: "TXT".to_owned(),
                    value: "hello".to_owned(),
                },
            ],
        }
    }

    fn settings() -> DnsSettings {
        let me = node("me", &["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]);
        let peers = [
            node("peer", &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
            node("V4Only", &["100.64.0.3/32", "garbage"]),
        ];
        DnsSettings::from_netmap(&config(), Some(&me), peers.iter())
    }

    fn resolver() -> Resolver {
        let mut r = Resolver::with_seed(7);
        r.set_settings(settings());
        r
    }

    fn query_msg(id: u16, name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        m
    }

    fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        query_msg(id, name, qtype).to_vec().expect("encode")
    }

    /// Sends one query and returns the single answer it produced.
    fn ask_at(r: &mut Resolver, name: &str, qtype: RecordType, now: Instant) -> Message {
        r.handle_query(CLIENT, SERVER, &query(0x4242, name, qtype), now);
        let a = r.poll_answer().expect("an answer");
        assert_eq!(r.poll_answer(), None);
        assert_eq!((a.client, a.server), (CLIENT, SERVER));
        Message::from_vec(&a.payload).expect("answer parses")
    }

    fn ask(r: &mut Resolver, name: &str, qtype: RecordType) -> Message {
        ask_at(r, name, qtype, Instant::now())
    }

    fn rdata(m: &Message) -> Vec<RData> {
        m.answers.iter().map(|r| r.data.clone()).collect()
    }

    fn a(s: &str) -> RData {
        RData::A(A(s.parse().expect("v4")))
    }

    fn aaaa(s: &str) -> RData {
        RData::AAAA(AAAA(s.parse().expect("v6")))
    }

    /// The SOA owner and minimum in the authority section of a negative answer.
    fn soa_of(m: &Message) -> Option<(String, u32, u32)> {
        match m.authorities.as_slice() {
            [r] => match &r.data {
                RData::SOA(soa) => Some((r.name.to_ascii(), r.ttl, soa.minimum)),
                _ => None,
            },
            _ => None,
        }
    }

    #[test]
    fn settings_from_netmap() {
        let s = settings();
        assert_eq!(s.base_domain, "mesh.example");
        assert_eq!(s.search_domains, vec!["corp.example".to_owned()]);
        let hosts: Vec<(&str, Vec<IpAddr>)> = s
            .hosts
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        assert_eq!(
            hosts,
            vec![
                ("db.corp.example", vec![ip("10.1.2.3"), ip("2001:db8::3")]),
                ("grafana.mesh.example", vec![ip("100.64.0.9")]),
                (
                    "me.mesh.example",
                    vec![ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")]
                ),
                (
                    "peer.mesh.example",
                    vec![ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")]
                ),
                ("v4only.mesh.example", vec![ip("100.64.0.3")]),
            ]
        );
        assert_eq!(s.upstreams, vec![sa("9.9.9.9:53"), sa("1.1.1.1:5353")]);
        assert_eq!(
            s.split,
            vec![
                ("internal.example".to_owned(), vec![sa("10.0.0.53:53")]),
                ("a.internal.example".to_owned(), vec![sa("10.0.0.54:5300")]),
                ("dead.example".to_owned(), vec![]),
            ]
        );
    }

    #[test]
    fn settings_without_magic_dns_have_no_names() {
        let mut c = config();
        c.magic_dns = false;
        let s = DnsSettings::from_netmap(&c, Some(&node("me", &["100.64.0.1/32"])), []);
        assert!(s.hosts.is_empty());
        assert_eq!(s.base_domain, "");
        assert_eq!(s.upstreams, vec![sa("9.9.9.9:53"), sa("1.1.1.1:5353")]);
    }

    #[test]
    fn a_and_aaaa_for_peers_and_self() {
        let mut r = resolver();
        let m = ask(&mut r, "peer.mesh.example.", RecordType::A);
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_desired);
        assert!(m.metadata.recursion_available);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name().to_ascii(), "peer.mesh.example.");
        assert_eq!(rdata(&m), vec![a("100.64.0.2")]);
        assert_eq!(m.answers[0].ttl, TTL);
        assert_eq!(m.answers[0].name.to_ascii(), "peer.mesh.example.");
        assert!(m.authorities.is_empty());

        let m = ask(&mut r, "peer.mesh.example.", RecordType::AAAA);
        assert_eq!(rdata(&m), vec![aaaa("fd7a:115c:a1e0::2")]);
        let m = ask(&mut r, "me.mesh.example.", RecordType::A);
        assert_eq!(rdata(&m), vec![a("100.64.0.1")]);
        let m = ask(&mut r, "grafana.mesh.example.", RecordType::A);
        assert_eq!(rdata(&m), vec![a("100.64.0.9")]);
        // An extra record outside base_domain is answered too.
        let m = ask(&mut r, "db.corp.example.", RecordType::AAAA);
        assert_eq!(rdata(&m), vec![aaaa("2001:db8::3")]);
        assert!(!m.metadata.authoritative);
        let m = ask(&mut r, "peer.mesh.example.", RecordType::ANY);
        assert_eq!(rdata(&m), vec![a("100.64.0.2"), aaaa("fd7a:115c:a1e0::2")]);
        assert_eq!(r.stats().answered_locally, 6);
        assert_eq!(r.stats().forwarded, 0);
        assert_eq!(r.poll_forward(), None);
    }

    #[test]
    fn names_are_case_insensitive_and_answered_as_asked() {
        let mut r = resolver();
        let m = ask(&mut r, "PEER.Mesh.EXAMPLE.", RecordType::A);
        assert_eq!(rdata(&m), vec![a("100.64.0.2")]);
        assert_eq!(m.answers[0].name.to_ascii(), "PEER.Mesh.EXAMPLE.");
    }

    #[test]
    fn single_label_names_use_base_domain_then_search_domains() {
        let mut r = resolver();
        let m = ask(&mut r, "peer.", RecordType::A);
        assert_eq!(rdata(&m), vec![a("100.64.0.2")]);
        assert_eq!(m.answers[0].name.to_ascii(), "peer.");
        let m = ask(&mut r, "db.", RecordType::A);
        assert_eq!(rdata(&m), vec![a("10.1.2.3")]);
        // An unknown single label is not ours: it goes to the global upstream.
        r.handle_query(
            CLIENT,
            SERVER,
            &query(1, "nosuch.", RecordType::A),
            Instant::now(),
        );
        assert_eq!(r.poll_answer(), None);
        assert_eq!(r.poll_forward().map(|f| f.upstream), Some(sa("9.9.9.9:53")));
    }

    #[test]
    fn known_name_without_that_type_is_nodata() {
        let mut r = resolver();
        let m = ask(&mut r, "v4only.mesh.example.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert!(m.metadata.authoritative);
        assert_eq!(
            soa_of(&m),
            Some(("mesh.example.".to_owned(), NEGATIVE_TTL, NEGATIVE_TTL))
        );
        let m = ask(&mut r, "peer.mesh.example.", RecordType::TXT);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // The apex exists: NODATA, never NXDOMAIN (RFC 8020).
        let m = ask(&mut r, "mesh.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn unknown_name_in_base_domain_is_nxdomain() {
        let mut r = resolver();
        let m = ask(&mut r, "nosuch.mesh.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
        assert_eq!(
            soa_of(&m),
            Some(("mesh.example.".to_owned(), NEGATIVE_TTL, NEGATIVE_TTL))
        );
        let m = ask(&mut r, "a.b.peer.mesh.example.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // A malformed extra record was skipped rather than half-added.
        let m = ask(&mut r, "bad.mesh.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(&mut r, "txt.mesh.example.", RecordType::TXT);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.poll_forward(), None);
    }

    #[test]
    fn only_peers_in_the_netmap_resolve() {
        // The netmap holds only the peers this node may see; a node missing from it is
        // NXDOMAIN, not forwarded, so the name leaks nowhere.
        let mut r = resolver();
        let m = ask(&mut r, "hidden.mesh.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let mut s = settings();
        s.hosts.remove("peer.mesh.example");
        r.set_settings(s);
        let m = ask(&mut r, "peer.mesh.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(&mut r, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.stats().forwarded, 0);
    }

    #[test]
    fn ns_soa_axfr_hinfo_in_our_zones_are_notimp() {
        let mut r = resolver();
        for (name, t) in [
            ("mesh.example.", RecordType::NS),
            ("mesh.example.", RecordType::SOA),
            ("peer.mesh.example.", RecordType::SOA),
            ("peer.mesh.example.", RecordType::AXFR),
            ("peer.mesh.example.", RecordType::HINFO),
            ("nosuch.mesh.example.", RecordType::NS),
            ("2.0.64.100.in-addr.arpa.", RecordType::NS),
        ] {
            let m = ask(&mut r, name, t);
            assert_eq!(m.metadata.response_code, ResponseCode::NotImp, "{name} {t}");
            assert!(m.answers.is_empty());
        }
        // Elsewhere they are forwarded.
        r.handle_query(
            CLIENT,
            SERVER,
            &query(1, "example.com.", RecordType::NS),
            Instant::now(),
        );
        assert_eq!(r.poll_answer(), None);
        assert!(r.poll_forward().is_some());
    }

    #[test]
    fn ptr_for_tailnet_addresses() {
        let mut r = resolver();
        let m = ask(&mut r, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(
            rdata(&m),
            vec![RData::PTR(PTR(
                Name::from_ascii("peer.mesh.example.").expect("name")
            ))]
        );
        assert_eq!(m.answers[0].ttl, TTL);
        let v6 = Name::from(ip("fd7a:115c:a1e0::2"));
        assert_eq!(
            v6.to_ascii(),
            format!("2.{}{REVERSE_V6_ZONE}.", "0.".repeat(19))
        );
        let m = ask(&mut r, &v6.to_ascii(), RecordType::PTR);
        assert_eq!(
            rdata(&m),
            vec![RData::PTR(PTR(
                Name::from_ascii("peer.mesh.example.").expect("name")
            ))]
        );
        // Extra records in the range get PTRs too.
        let m = ask(&mut r, "9.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(
            rdata(&m),
            vec![RData::PTR(PTR(
                Name::from_ascii("grafana.mesh.example.").expect("name")
            ))]
        );
        // Unknown address in the range: NXDOMAIN with the /16 zone's SOA.
        let m = ask(&mut r, "77.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            soa_of(&m),
            Some((
                "64.100.in-addr.arpa.".to_owned(),
                NEGATIVE_TTL,
                NEGATIVE_TTL
            ))
        );
        let m = ask(
            &mut r,
            &Name::from(ip("fd7a:115c:a1e0::99")).to_ascii(),
            RecordType::PTR,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(soa_of(&m).map(|s| s.0), Some(format!("{REVERSE_V6_ZONE}.")));
        // A known address asked for another type: NODATA.
        let m = ask(&mut r, "2.0.64.100.in-addr.arpa.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(r.stats().forwarded, 0);
        // Outside 100.64.0.0/10 (here 100.128.0.0) and for other addresses: forwarded.
        for name in ["2.0.128.100.in-addr.arpa.", "3.2.1.10.in-addr.arpa."] {
            r.handle_query(
                CLIENT,
                SERVER,
                &query(1, name, RecordType::PTR),
                Instant::now(),
            );
            assert_eq!(r.poll_answer(), None, "{name}");
            assert!(r.poll_forward().is_some(), "{name}");
        }
    }

    #[test]
    fn ptr_prefers_node_names_over_deeper_extra_records() {
        let mut s = settings();
        s.hosts
            .insert("a.b.mesh.example".to_owned(), vec![ip("100.64.0.2")]);
        let mut r = Resolver::new();
        r.set_settings(s);
        let m = ask(&mut r, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(
            rdata(&m),
            vec![RData::PTR(PTR(
                Name::from_ascii("peer.mesh.example.").expect("name")
            ))]
        );
        // "b.mesh.example" has a name under it: it exists, without records.
        let m = ask(&mut r, "b.mesh.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn forward_rewrites_the_id_and_restores_it() {
        let mut r = resolver();
        let now = Instant::now();
        let mut q = query_msg(0x1234, "www.example.com.", RecordType::A);
        q.set_edns(Edns::new());
        let bytes = q.to_vec().expect("encode");
        r.handle_query(CLIENT, SERVER, &bytes, now);
        assert_eq!(r.poll_answer(), None);
        let f = r.poll_forward().expect("forwarded");
        assert_eq!(r.poll_forward(), None);
        assert_eq!(f.upstream, sa("9.9.9.9:53"));
        let sent = Message::from_vec(&f.payload).expect("forward parses");
        assert_ne!(sent.metadata.id, 0x1234);
        // Everything after the ID is the app's query, byte for byte.
        assert_eq!(f.payload[2..], bytes[2..]);
        assert_eq!(r.stats().forwarded, 1);
        assert_eq!(r.pending(), 1);

        let mut reply = Message::new(sent.metadata.id, MessageType::Response, OpCode::Query);
        reply.metadata.recursion_available = true;
        reply.add_query(sent.queries[0].clone());
        reply.add_answer(Record::from_rdata(
            Name::from_ascii("www.example.com.").expect("name"),
            300,
            a("93.184.216.34"),
        ));
        let reply_bytes = reply.to_vec().expect("encode");
        r.handle_upstream(sa("9.9.9.9:53"), &reply_bytes, now);
        let ans = r.poll_answer().expect("relayed");
        assert_eq!((ans.client, ans.server), (CLIENT, SERVER));
        let got = Message::from_vec(&ans.payload).expect("parses");
        assert_eq!(got.metadata.id, 0x1234);
        assert_eq!(rdata(&got), vec![a("93.184.216.34")]);
        assert_eq!(got.answers[0].ttl, 300);
        assert_eq!(ans.payload[2..], reply_bytes[2..]);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.stats().upstream_answers, 1);
        // The same reply again is no longer expected.
        r.handle_upstream(sa("9.9.9.9:53"), &reply_bytes, now);
        assert_eq!(r.poll_answer(), None);
        assert_eq!(r.stats().ignored_replies, 1);
    }

    /// An upstream's reply to forward `f` with one A record.
    fn reply_to(f: &DnsForward) -> Vec<u8> {
        let sent = Message::from_vec(&f.payload).expect("forward parses");
        let mut reply = Message::new(sent.metadata.id, MessageType::Response, OpCode::Query);
        reply.add_query(sent.queries[0].clone());
        reply.add_answer(Record::from_rdata(
            sent.queries[0].name().clone(),
            60,
            a("192.0.2.1"),
        ));
        reply.to_vec().expect("encode")
    }

    #[test]
    fn unexpected_replies_are_ignored() {
        let mut r = resolver();
        let now = Instant::now();
        r.handle_query(
            CLIENT,
            SERVER,
            &query(9, "www.example.com.", RecordType::A),
            now,
        );
        let f = r.poll_forward().expect("forwarded");
        let good = reply_to(&f);
        // Wrong source address, wrong port.
        r.handle_upstream(sa("8.8.8.8:53"), &good, now);
        r.handle_upstream(sa("9.9.9.9:5353"), &good, now);
        // Wrong ID.
        let mut bad_id = Message::from_vec(&good).expect("parses");
        bad_id.metadata.id = bad_id.metadata.id.wrapping_add(1);
        r.handle_upstream(f.upstream, &bad_id.to_vec().expect("encode"), now);
        // Another question under the right ID.
        let mut other = Message::from_vec(&good).expect("parses");
        other.queries[0].set_name(Name::from_ascii("evil.example.").expect("name"));
        r.handle_upstream(f.upstream, &other.to_vec().expect("encode"), now);
        // A query, not a response, under the right ID.
        let mut not_resp = Message::from_vec(&good).expect("parses");
        not_resp.metadata.message_type = MessageType::Query;
        r.handle_upstream(f.upstream, &not_resp.to_vec().expect("encode"), now);
        // Garbage.
        r.handle_upstream(f.upstream, &[1, 2, 3], now);
        assert_eq!(r.poll_answer(), None);
        assert_eq!(r.stats().ignored_replies, 6);
        assert_eq!(r.pending(), 1);
        // The real one, from an IPv4-mapped address (a dual-stack socket), still answers.
        r.handle_upstream(sa("[::ffff:9.9.9.9]:53"), &good, now);
        let got = Message::from_vec(&r.poll_answer().expect("answer").payload).expect("parses");
        assert_eq!(got.metadata.id, 9);
        assert_eq!(rdata(&got), vec![a("192.0.2.1")]);
    }

    #[test]
    fn split_dns_picks_the_longest_matching_domain() {
        let mut r = resolver();
        let now = Instant::now();
        for (name, upstream) in [
            ("x.a.internal.example.", Some(sa("10.0.0.54:5300"))),
            ("a.internal.example.", Some(sa("10.0.0.54:5300"))),
            ("y.internal.example.", Some(sa("10.0.0.53:53"))),
            ("INTERNAL.example.", Some(sa("10.0.0.53:53"))),
            ("notinternal.example.", Some(sa("9.9.9.9:53"))),
            ("db2.corp.example.", Some(sa("9.9.9.9:53"))),
        ] {
            r.handle_query(CLIENT, SERVER, &query(1, name, RecordType::A), now);
            assert_eq!(r.poll_forward().map(|f| f.upstream), upstream, "{name}");
        }
        // A split domain whose upstreams are all malformed: SERVFAIL, never the global ones.
        let m = ask_at(&mut r, "x.dead.example.", RecordType::A, now);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(r.poll_forward(), None);
        assert_eq!(r.stats().no_upstream, 1);
    }

    #[test]
    fn timeout_tries_the_next_upstream_then_servfails_at_the_deadline() {
        let mut r = resolver();
        let t0 = Instant::now();
        r.handle_query(
            CLIENT,
            SERVER,
            &query(77, "slow.example.", RecordType::AAAA),
            t0,
        );
        let first = r.poll_forward().expect("first");
        assert_eq!(first.upstream, sa("9.9.9.9:53"));
        assert_eq!(r.poll_timeout(), Some(t0 + RETRY_AFTER));
        r.handle_timeout(t0 + RETRY_AFTER - Duration::from_nanos(1));
        assert_eq!(r.poll_forward(), None);
        r.handle_timeout(t0 + RETRY_AFTER);
        let second = r.poll_forward().expect("second");
        assert_eq!(second.upstream, sa("1.1.1.1:5353"));
        assert_eq!(second.payload[2..], first.payload[2..]);
        assert_eq!(r.stats().retried, 1);
        assert_eq!(r.poll_timeout(), Some(t0 + FORWARD_TIMEOUT));
        r.handle_timeout(t0 + FORWARD_TIMEOUT - Duration::from_nanos(1));
        assert_eq!(r.poll_answer(), None);
        r.handle_timeout(t0 + FORWARD_TIMEOUT);
        let ans = r.poll_answer().expect("servfail");
        let m = Message::from_vec(&ans.payload).expect("parses");
        assert_eq!(m.metadata.id, 77);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries[0].name().to_ascii(), "slow.example.");
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
        assert_eq!(r.stats().servfail, 1);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.poll_timeout(), None);
        // A reply after the SERVFAIL is dropped.
        r.handle_upstream(first.upstream, &reply_to(&first), t0 + FORWARD_TIMEOUT);
        assert_eq!(r.poll_answer(), None);
    }

    #[test]
    fn late_reply_from_the_first_upstream_still_answers() {
        let mut r = resolver();
        let t0 = Instant::now();
        r.handle_query(
            CLIENT,
            SERVER,
            &query(5, "slow.example.", RecordType::A),
            t0,
        );
        let first = r.poll_forward().expect("first");
        r.handle_timeout(t0 + RETRY_AFTER);
        let second = r.poll_forward().expect("second");
        r.handle_upstream(
            first.upstream,
            &reply_to(&first),
            t0 + Duration::from_millis(1500),
        );
        let m = Message::from_vec(&r.poll_answer().expect("answer").payload).expect("parses");
        assert_eq!(m.metadata.id, 5);
        assert_eq!(rdata(&m), vec![a("192.0.2.1")]);
        assert_eq!(r.poll_timeout(), None);
        // The second upstream's answer is now unexpected.
        r.handle_upstream(
            second.upstream,
            &reply_to(&second),
            t0 + Duration::from_millis(1600),
        );
        assert_eq!(r.poll_answer(), None);
    }

    #[test]
    fn a_single_upstream_gets_the_whole_timeout() {
        let mut r = resolver();
        let t0 = Instant::now();
        r.handle_query(
            CLIENT,
            SERVER,
            &query(5, "y.internal.example.", RecordType::A),
            t0,
        );
        assert!(r.poll_forward().is_some());
        assert_eq!(r.poll_timeout(), Some(t0 + FORWARD_TIMEOUT));
        r.handle_timeout(t0 + FORWARD_TIMEOUT);
        assert_eq!(r.poll_forward(), None);
        let m = Message::from_vec(&r.poll_answer().expect("answer").payload).expect("parses");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn without_settings_everything_servfails() {
        let mut r = Resolver::new();
        for name in ["example.com.", "peer.mesh.example."] {
            let m = ask(&mut r, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "{name}");
            assert_eq!(m.metadata.id, 0x4242);
        }
        assert_eq!(r.poll_forward(), None);
        assert_eq!(r.stats().no_upstream, 2);
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn malformed_queries() {
        let mut r = resolver();
        let now = Instant::now();
        // No header: dropped.
        r.handle_query(CLIENT, SERVER, &[0x12, 0x34, 0x01], now);
        assert_eq!(r.poll_answer(), None);
        assert_eq!(r.stats().malformed, 1);
        // A response sent to the resolver: dropped.
        let mut resp = query_msg(3, "peer.mesh.example.", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        r.handle_query(CLIENT, SERVER, &resp.to_vec().expect("encode"), now);
        assert_eq!(r.poll_answer(), None);
        assert_eq!(r.stats().malformed, 2);

        let formerr = |r: &mut Resolver, payload: &[u8], id: u16| {
            r.handle_query(CLIENT, SERVER, payload, now);
            let m = Message::from_vec(&r.poll_answer().expect("answer").payload).expect("parses");
            assert_eq!(m.metadata.id, id);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
            assert!(m.answers.is_empty());
        };
        // A header announcing a question that is not there.
        let mut truncated = query(0xbeef, "peer.mesh.example.", RecordType::A);
        truncated.truncate(14);
        formerr(&mut r, &truncated, 0xbeef);
        // No question.
        let none = Message::new(0x0101, MessageType::Query, OpCode::Query);
        formerr(&mut r, &none.to_vec().expect("encode"), 0x0101);
        // Two questions.
        let mut two = query_msg(0x0202, "peer.mesh.example.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("me.mesh.example.").expect("name"),
            RecordType::A,
        ));
        formerr(&mut r, &two.to_vec().expect("encode"), 0x0202);
        // Not a standard query.
        let mut status = query_msg(0x0303, "peer.mesh.example.", RecordType::A);
        status.metadata.op_code = OpCode::Status;
        formerr(&mut r, &status.to_vec().expect("encode"), 0x0303);
        assert_eq!(r.stats().formerr, 4);
        assert_eq!(r.stats().answered_locally, 0);
        assert_eq!(r.poll_forward(), None);
    }

    #[test]
    fn pending_forwards_are_capped() {
        let mut r = resolver();
        let now = Instant::now();
        for i in 0..MAX_PENDING + 10 {
            let id = u16::try_from(i).expect("small");
            r.handle_query(
                CLIENT,
                SERVER,
                &query(id, "flood.example.", RecordType::A),
                now,
            );
        }
        assert_eq!(r.pending(), MAX_PENDING);
        assert_eq!(r.stats().forwarded, MAX_PENDING as u64);
        assert_eq!(r.stats().dropped, 10);
        assert_eq!(r.poll_answer(), None);
        let mut forwards = Vec::new();
        while let Some(f) = r.poll_forward() {
            forwards.push(f);
        }
        assert_eq!(forwards.len(), MAX_PENDING);
        // Every query went out under a distinct ID.
        let ids: BTreeSet<u16> = forwards
            .iter()
            .map(|f| Message::from_vec(&f.payload).expect("parses").metadata.id)
            .collect();
        assert_eq!(ids.len(), MAX_PENDING);
        // All time out together and are forgotten; answers are capped as well.
        r.handle_timeout(now + FORWARD_TIMEOUT);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.stats().servfail, MAX_PENDING as u64);
        let mut answers = 0;
        while r.poll_answer().is_some() {
            answers += 1;
        }
        assert_eq!(answers, MAX_QUEUED_ANSWERS.min(MAX_PENDING));
    }

    #[test]
    fn queued_answers_are_capped() {
        let mut r = resolver();
        let now = Instant::now();
        for _ in 0..MAX_QUEUED_ANSWERS + 5 {
            r.handle_query(
                CLIENT,
                SERVER,
                &query(1, "peer.mesh.example.", RecordType::A),
                now,
            );
        }
        assert_eq!(r.stats().dropped, 5);
        let mut n = 0;
        while r.poll_answer().is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_QUEUED_ANSWERS);
    }

    #[test]
    fn edns_is_echoed_and_big_answers_truncate() {
        let mut s = settings();
        let many: Vec<IpAddr> = (0..60u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 9, 0, i)))
            .collect();
        s.hosts.insert("big.mesh.example".to_owned(), many);
        let mut r = Resolver::new();
        r.set_settings(s);
        // 60 A records take about 960 bytes: too many for 512.
        let m = ask(&mut r, "big.mesh.example.", RecordType::A);
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert!(m.edns.is_none());
        let mut q = query_msg(2, "big.mesh.example.", RecordType::A);
        let mut e = Edns::new();
        e.set_max_payload(4096);
        q.set_edns(e);
        r.handle_query(CLIENT, SERVER, &q.to_vec().expect("encode"), Instant::now());
        let ans = r.poll_answer().expect("answer");
        assert!(ans.payload.len() > 512);
        let m = Message::from_vec(&ans.payload).expect("parses");
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 60);
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
    }

    #[test]
    fn udp_packet_round_trips_v4_with_valid_checksums() {
        let src = SocketAddr::new(IpAddr::V4(MAGIC_DNS_V4), DNS_PORT);
        let dst = sa("100.64.0.1:40000");
        let payload = query(1, "peer.mesh.example.", RecordType::A);
        // A query: app -> magic address.
        let pkt = udp_packet(dst, src, &payload);
        let (s, d, p) = parse_dns_packet(&pkt).expect("a DNS query");
        assert_eq!((s, d, p), (dst, src, payload.as_slice()));
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&pkt)
            .expect("ipv4")
            .to_header();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let (udp, rest) = etherparse::UdpHeader::from_slice(&pkt[ip.header_len()..]).expect("udp");
        assert_ne!(udp.checksum, 0);
        assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv4(&ip, rest).expect("checksum")
        );
        assert_eq!(usize::from(udp.length), 8 + payload.len());
        // A reply (from the magic address) is not a query for us.
        assert_eq!(parse_dns_packet(&udp_packet(src, dst, &payload)), None);
        // A corrupted UDP checksum is refused.
        let mut bad = pkt.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(parse_dns_packet(&bad), None);
        // Another port, another address.
        assert_eq!(
            parse_dns_packet(&udp_packet(dst, sa("100.100.100.100:54"), &payload)),
            None
        );
        assert_eq!(
            parse_dns_packet(&udp_packet(dst, sa("100.100.100.101:53"), &payload)),
            None
        );
        // A fragment.
        let mut h = ip.clone();
        h.more_fragments = true;
        h.header_checksum = h.calc_header_checksum();
        let mut frag = h.to_bytes().to_vec();
        frag.extend_from_slice(&pkt[ip.header_len()..]);
        assert_eq!(parse_dns_packet(&frag), None);
        // Mixed families give nothing to send.
        assert!(udp_packet(dst, sa("[fd7a:115c:a1e0::53]:53"), &payload).is_empty());
        // TCP is not ours either.
        let tcp = etherparse::PacketBuilder::ipv4([100, 64, 0, 1], MAGIC_DNS_V4.octets(), 64)
            .tcp(40000, 53, 1, 1000);
        let mut t = Vec::new();
        tcp.write(&mut t, &payload).expect("tcp");
        assert_eq!(parse_dns_packet(&t), None);
    }

    #[test]
    fn udp_packet_round_trips_v6_with_valid_checksums() {
        let server = SocketAddr::new(IpAddr::V6(MAGIC_DNS_V6), DNS_PORT);
        let client = sa("[fd7a:115c:a1e0::1]:40001");
        assert_eq!(server.to_string(), "[fd7a:115c:a1e0::53]:53");
        let payload = query(1, "peer.mesh.example.", RecordType::AAAA);
        let pkt = udp_packet(client, server, &payload);
        assert_eq!(
            parse_dns_packet(&pkt),
            Some((client, server, payload.as_slice()))
        );
        let ip = etherparse::Ipv6HeaderSlice::from_slice(&pkt)
            .expect("ipv6")
            .to_header();
        let (udp, rest) = etherparse::UdpHeader::from_slice(&pkt[40..]).expect("udp");
        assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv6(&ip, rest).expect("checksum")
        );
        let mut bad = pkt.clone();
        bad[60] ^= 0x01; // a payload byte: the checksum no longer holds
        assert_eq!(parse_dns_packet(&bad), None);
        // The resolver's answer, wrapped and parsed back as etherparse sees it.
        let mut r = resolver();
        let (s, d, p) = parse_dns_packet(&pkt).expect("query");
        r.handle_query(s, d, p, Instant::now());
        let ans = r.poll_answer().expect("answer");
        let back = udp_packet(ans.server, ans.client, &ans.payload);
        let sliced = etherparse::SlicedPacket::from_ip(&back).expect("parses");
        let Some(etherparse::TransportSlice::Udp(u)) = sliced.transport else {
            panic!("not udp");
        };
        assert_eq!((u.source_port(), u.destination_port()), (53, 40001));
        let m = Message::from_vec(u.payload()).expect("dns");
        assert_eq!(rdata(&m), vec![aaaa("fd7a:115c:a1e0::2")]);
    }

    #[test]
    fn untrusted_bytes_never_panic_and_never_grow_state() {
        use proptest::prelude::*;
        let valid = query(7, "peer.mesh.example.", RecordType::A);
        let strategy = (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec((0..valid.len(), any::<u8>()), 0..8),
        );
        let now = Instant::now();
        proptest!(|((random, flips) in strategy)| {
            let mut r = resolver();
            r.handle_query(CLIENT, SERVER, &random, now);
            r.handle_upstream(sa("9.9.9.9:53"), &random, now);
            let _ = parse_dns_packet(&random);
            let mut mutated = valid.clone();
            for (i, b) in flips {
                mutated[i] ^= b;
            }
            r.handle_query(CLIENT, SERVER, &mutated, now);
            let _ = parse_dns_packet(&udp_packet(CLIENT, SERVER, &mutated));
            // At most one answer or one forward per query.
            let mut out = 0;
            while r.poll_answer().is_some() {
                out += 1;
            }
            while r.poll_forward().is_some() {
                out += 1;
            }
            prop_assert!(out <= 2);
            prop_assert!(r.pending() <= 2);
            r.handle_timeout(now + FORWARD_TIMEOUT);
            prop_assert_eq!(r.pending(), 0);
        });
    }
}
