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
