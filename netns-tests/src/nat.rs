//! NAT topologies: an "internet" segment, a public server, and sites behind NAT routers of every
//! RFC 4787 kind (see `shared/PROTOCOLS.md` section 6), built from nftables rules.
//!
//! ```text
//!                    "internet": bridge br0 in namespace `inet`, 203.0.113.0/24 (TEST-NET-3)
//!   server (.10 and .11) ── inet ── router N (wan .20+N) ── LAN N bridge ── hosts 10.77.(100+N).11, .12, …
//!                            ├───── public host (.100+K), optionally behind its own stateful firewall
//! ```
//!
//! Every address exists only inside the lab's namespaces. Nothing is routed beyond the
//! internet segment: a NAT router's WAN, the server and public hosts are all on-link there
//! (their default route points at the internet namespace's `203.0.113.1`, which forwards
//! nothing), and a host behind a router has its default route via the router's `.1`.
//!
//! # The router's nftables table (`ip warren_nat`), per [`NatKind`]
//!
//! * Source NAT in `postrouting` to the WAN address. Each known LAN host gets its own 5000-port
//!   range (`snat ip to WAN:lo-hi`), so two hosts using the same local port (as two nodes on
//!   their default port do) never share an external port; Linux reuses an existing mapping of
//!   the same internal `ip:port` for a new destination (endpoint-independent mapping), unless the
//!   rule says `fully-random`, which picks a fresh random port per connection (symmetric).
//! * A filter chain after source NAT (`record`, priority srcnat + 10, where the packet already
//!   carries its translated source) records every outgoing UDP mapping in two dynamic sets:
//!   `ports`, external port -> internal `ip . port` (taken from conntrack's original tuple, or
//!   its reply tuple for connections that came in), and `peers`, `remote ip . external port`.
//! * Filtering: conntrack alone admits only replies from the exact remote `ip:port` (APDF).
//!   Full cone adds `iifname wan udp dport @ports dnat to udp dport map @ports` in
//!   `prerouting` (EIF); restricted adds the same DNAT only for `ip saddr . udp dport @peers`
//!   (ADF). The forward chain admits what conntrack knows plus DNATed connections.
//! * Hairpinning: `prerouting` DNATs LAN packets addressed to the WAN address through `ports`,
//!   and `postrouting` source-NATs them to the sender's own mapping, so the receiver sees the
//!   sender's public address. Without it they reach the router itself and are dropped.
//!   Hairpinned UDP is filtered endpoint-independently whatever the kind (anything in `ports`
//!   is reachable from the LAN); it is UDP only.
//! * UDP blocked: the forward chain drops all UDP; TCP is still source-NATed.
//! * The input chain drops UDP addressed to the router itself unless conntrack knows it: an
//!   unsolicited packet must not make conntrack confirm an entry that steals a mapped port.
//!
//! [`NatLab::set_kind`] replaces the table atomically and flushes the router's conntrack table
//! (`conntrack -F`, from the `conntrack` package), like a NAT that reboots into another type.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};

use crate::lab::{Lab, Lan};

pub use warren_node_core::sim::{Filtering, Mapping, NatKind};

/// The internet namespace's own address on the public segment (everyone's default gateway
/// there; it forwards nothing).
pub const INET_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// The public server's two addresses, so tests can observe endpoint-dependent behaviour from
/// two remote IPs (and, with two ports, two remote ports).
pub const SERVER_ADDRS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
];

/// Prefix length of the internet segment.
const INET_PREFIX: u8 = 24;

/// NAT sites are numbered 1..=MAX_SITES (WAN `203.0.113.(20+N)`, LAN `10.77.(100+N).0/24`).
const MAX_SITES: usize = 79;

/// Public hosts are numbered 1..=MAX_PUBLIC_HOSTS (`203.0.113.(100+K)`).
const MAX_PUBLIC_HOSTS: usize = 99;

/// Hosts per site (each NATed host gets its own port range, see [`host_port_range`]).
pub const MAX_HOSTS_PER_SITE: usize = 9;

/// First port of host 0's external port range; host `i` gets `BASE + i*SPAN ..= +SPAN-1`.
const PORT_RANGE_BASE: u16 = 20_000;
const PORT_RANGE_SPAN: u16 = 5_000;

/// How long the router remembers a mapping in its `ports`/`peers` sets after the last packet
/// that used it (longer than conntrack's 120 s for replied UDP, so a live mapping never loses
/// its entry first).
const MAPPING_TIMEOUT: &str = "180s";

const WAN_IF: &str = "wan";
const LAN_IF: &str = "lan0";
const HOST_IF: &str = "eth0";

/// A host of a site.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace; its interface is `eth0`.
    pub ns: String,
    /// Its address: on the LAN behind a router, or public for [`NatKind::is_public`] sites.
    pub addr: Ipv4Addr,
    /// Its default gateway (the router's LAN address, or [`INET_GATEWAY`]).
    pub gateway: Ipv4Addr,
}

/// A site: hosts behind one NAT router, or (for public kinds) hosts directly on the internet.
#[derive(Debug, Clone)]
pub struct Site {
    /// The site's number (NAT sites and public sites are numbered separately).
    pub index: usize,
    /// Its current kind ([`NatLab::set_kind`] changes it).
    pub kind: NatKind,
    /// Whether the router hairpins (always false for public sites).
    pub hairpin: bool,
    /// The router's namespace (`None` for public sites).
    pub router_ns: Option<String>,
    /// The router's public address (`None` for public sites).
    pub wan_addr: Option<Ipv4Addr>,
    /// The router's LAN address, the hosts' gateway (`None` for public sites).
    pub lan_gateway: Option<Ipv4Addr>,
    /// The LAN's switch (`None` for public sites).
    pub lan: Option<Lan>,
    /// Its hosts.
    pub hosts: Vec<Host>,
}

impl Site {
    /// The addresses the site shows on the internet: the WAN address, or every host's.
    pub fn public_addrs(&self) -> Vec<Ipv4Addr> {
        match self.wan_addr {
            Some(wan) => vec![wan],
            None => self.hosts.iter().map(|h| h.addr).collect(),
        }
    }

    /// Host `i`, or an error naming the site.
    pub fn host(&self, i: usize) -> Result<&Host> {
        self.hosts.get(i).with_context(|| {
            format!(
                "site {} ({}) has {} hosts, not {}",
                self.index,
                self.kind,
                self.hosts.len(),
                i + 1
            )
        })
    }
}

/// The internet segment, the public server, and the bookkeeping to add sites to a [`Lab`].
///
/// It owns no namespaces itself: the lab does, and deletes them on drop.
#[derive(Debug)]
pub struct NatLab {
    inet: Lan,
    server_ns: String,
    nat_sites: usize,
    public_hosts: usize,
    blocked: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl NatLab {
    /// Creates the internet namespace (bridge `br0` with [`INET_GATEWAY`]) and the server
    /// namespace `srv` attached to it with both [`SERVER_ADDRS`] on `eth0`.
    pub fn new(lab: &mut Lab) -> Result<Self> {
        let inet = lab.add_lan("inet")?;
        let inet_ns = inet.switch_ns().to_owned();
        bridge_nf_off(lab, &inet_ns);
        lab.run_ok(
            &inet_ns,
            "ip",
            [
                "addr",
                "add",
                &format!("{INET_GATEWAY}/{INET_PREFIX}"),
                "dev",
                "br0",
            ],
        )?;
        let server_ns = lab.add_ns("srv")?;
        lab.attach(
            &inet,
            &server_ns,
            HOST_IF,
            &format!("{}/{INET_PREFIX}", SERVER_ADDRS[0]),
        )?;
        for extra in &SERVER_ADDRS[1..] {
            lab.add_addr(&server_ns, HOST_IF, &format!("{extra}/{INET_PREFIX}"))?;
        }
        lab.add_route(&server_ns, "default", INET_GATEWAY)?;
        Ok(Self {
            inet,
            server_ns,
            nat_sites: 0,
            public_hosts: 0,
            blocked: Vec::new(),
        })
    }

    /// The internet namespace (holds the public segment's bridge).
    pub fn inet_ns(&self) -> &str {
        self.inet.switch_ns()
    }

    /// The internet segment, to attach further public namespaces with [`Lab::attach`].
    pub fn inet(&self) -> &Lan {
        &self.inet
    }

    /// The public server's namespace (addresses [`SERVER_ADDRS`]).
    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }

    /// Adds a site of `kind` with `hosts` hosts (1..=[`MAX_HOSTS_PER_SITE`]).
    ///
    /// NAT kinds: router namespace `rN` (WAN `203.0.113.(20+N)` on `wan`, `10.77.(100+N).1` on
    /// `lan0`), LAN switch `lanN`, hosts `sNhI` at `10.77.(100+N).(11+I)` with their default
    /// route via the router. `hairpin` turns hairpinning on.
    /// Public kinds: hosts `pubK` at `203.0.113.(100+K)` directly on the internet (each with
    /// its own firewall for [`NatKind::PublicFirewall`]); `hairpin` must be false.
    pub fn add_site(
        &mut self,
        lab: &mut Lab,
        kind: NatKind,
        hairpin: bool,
        hosts: usize,
    ) -> Result<Site> {
        ensure!(
            (1..=MAX_HOSTS_PER_SITE).contains(&hosts),
            "a site has 1..={MAX_HOSTS_PER_SITE} hosts, not {hosts}"
        );
        if kind.is_public() {
            ensure!(!hairpin, "a public site has no router to hairpin");
            self.add_public_site(lab, kind, hosts)
        } else {
            self.add_nat_site(lab, kind, hairpin, hosts)
        }
    }

    fn add_public_site(&mut self, lab: &mut Lab, kind: NatKind, hosts: usize) -> Result<Site> {
        ensure!(
            self.public_hosts + hosts <= MAX_PUBLIC_HOSTS,
            "at most {MAX_PUBLIC_HOSTS} public hosts"
        );
        let first = self.public_hosts + 1;
        let mut site = Site {
            index: first,
            kind,
            hairpin: false,
            router_ns: None,
            wan_addr: None,
            lan_gateway: None,
            lan: None,
            hosts: Vec::new(),
        };
        for _ in 0..hosts {
            self.public_hosts += 1;
            let k = self.public_hosts;
            let addr = Ipv4Addr::new(203, 0, 113, 100 + octet(k)?);
            let ns = lab.add_ns(&format!("pub{k}"))?;
            lab.attach(&self.inet, &ns, HOST_IF, &format!("{addr}/{INET_PREFIX}"))?;
            lab.add_route(&ns, "default", INET_GATEWAY)?;
            site.hosts.push(Host {
                ns,
                addr,
                gateway: INET_GATEWAY,
            });
        }
        self.load_public_rules(lab, &site, kind)?;
        Ok(site)
    }

    fn add_nat_site(
        &mut self,
        lab: &mut Lab,
        kind: NatKind,
        hairpin: bool,
        hosts: usize,
    ) -> Result<Site> {
        ensure!(self.nat_sites < MAX_SITES, "at most {MAX_SITES} NAT sites");
        self.nat_sites += 1;
        let n = self.nat_sites;
        let wan = Ipv4Addr::new(203, 0, 113, 20 + octet(n)?);
        let lan_net = 100 + octet(n)?;
        let gateway = Ipv4Addr::new(10, 77, lan_net, 1);

        let router = lab.add_ns(&format!("r{n}"))?;
        lab.attach(&self.inet, &router, WAN_IF, &format!("{wan}/{INET_PREFIX}"))?;
        let lan = lab.add_lan(&format!("lan{n}"))?;
        bridge_nf_off(lab, lan.switch_ns());
        lab.attach(&lan, &router, LAN_IF, &format!("{gateway}/24"))?;
        lab.add_route(&router, "default", INET_GATEWAY)?;

        let mut site = Site {
            index: n,
            kind,
            hairpin,
            router_ns: Some(router.clone()),
            wan_addr: Some(wan),
            lan_gateway: Some(gateway),
            lan: Some(lan.clone()),
            hosts: Vec::new(),
        };
        for i in 0..hosts {
            let addr = Ipv4Addr::new(10, 77, lan_net, 11 + octet(i)?);
            let ns = lab.add_ns(&format!("s{n}h{}", i + 1))?;
            lab.attach(&lan, &ns, HOST_IF, &format!("{addr}/24"))?;
            lab.add_route(&ns, "default", gateway)?;
            site.hosts.push(Host { ns, addr, gateway });
        }
        // The rules go in before forwarding is switched on: nothing ever leaves untranslated.
        self.load_router_rules(lab, &site, kind)?;
        lab.sysctl(&router, "net.ipv4.ip_forward", "1")?;
        // Hairpinned packets leave by the interface they came in on; no ICMP redirects for them.
        lab.sysctl(&router, "net.ipv4.conf.all.send_redirects", "0")?;
        lab.sysctl(
            &router,
            &format!("net.ipv4.conf.{LAN_IF}.send_redirects"),
            "0",
        )?;
        Ok(site)
    }

    /// Changes `site`'s kind mid-session: atomically replaces the router's (or, for public
    /// sites, every host's) nftables table, then flushes conntrack there, so every mapping and
    /// every remembered peer is forgotten (a NAT rebooting into another type). NAT kinds change
    /// only into NAT kinds, public ones only into public ones.
    pub fn set_kind(&self, lab: &Lab, site: &mut Site, kind: NatKind) -> Result<()> {
        ensure!(
            kind.is_public() == site.kind.is_public(),
            "site {} is {}; it cannot become {kind}",
            site.index,
            site.kind
        );
        if kind.is_public() {
            self.load_public_rules(lab, site, kind)?;
            for host in &site.hosts {
                flush_conntrack(lab, &host.ns)?;
            }
        } else {
            self.load_router_rules(lab, site, kind)?;
            flush_conntrack(lab, router_ns(site)?)?;
        }
        site.kind = kind;
        Ok(())
    }

    /// Flushes the conntrack table of `site`'s router (or of each of its public hosts): every
    /// NAT mapping and every firewall state is forgotten; the rules stay.
    pub fn flush_conntrack(&self, lab: &Lab, site: &Site) -> Result<()> {
        match &site.router_ns {
            Some(ns) => flush_conntrack(lab, ns),
            None => site
                .hosts
                .iter()
                .try_for_each(|h| flush_conntrack(lab, &h.ns)),
        }
    }

    /// Drops UDP between every public address of `a` and every one of `b`, both ways, on the
    /// internet segment (a bridge-family rule in the internet namespace). TCP still passes.
    pub fn block_udp_between(&mut self, lab: &Lab, a: &Site, b: &Site) -> Result<()> {
        for x in a.public_addrs() {
            for y in b.public_addrs() {
                let pair = (x.min(y), x.max(y));
                if !self.blocked.contains(&pair) {
                    self.blocked.push(pair);
                }
            }
        }
        self.load_inet_rules(lab)
    }

    /// Undoes [`NatLab::block_udp_between`].
    pub fn unblock_udp_between(&mut self, lab: &Lab, a: &Site, b: &Site) -> Result<()> {
        let (pa, pb) = (a.public_addrs(), b.public_addrs());
        self.blocked.retain(|&(x, y)| {
            !((pa.contains(&x) && pb.contains(&y)) || (pa.contains(&y) && pb.contains(&x)))
        });
        self.load_inet_rules(lab)
    }

    fn load_inet_rules(&self, lab: &Lab) -> Result<()> {
        load_table(
            lab,
            self.inet_ns(),
            "bridge warren_inet",
            &inet_ruleset(&self.blocked),
            "inet",
        )
    }

    fn load_router_rules(&self, lab: &Lab, site: &Site, kind: NatKind) -> Result<()> {
        let wan = site.wan_addr.context("not a NAT site")?;
        let hosts: Vec<Ipv4Addr> = site.hosts.iter().map(|h| h.addr).collect();
        let rules = router_ruleset(kind, site.hairpin, wan, &hosts)?;
        load_table(
            lab,
            router_ns(site)?,
            "ip warren_nat",
            &rules,
            &format!("r{}-{}", site.index, kind.short()),
        )
    }

    fn load_public_rules(&self, lab: &Lab, site: &Site, kind: NatKind) -> Result<()> {
        let rules = match kind {
            NatKind::Public => String::new(),
            NatKind::PublicFirewall => firewall_ruleset(),
            other => bail!("{other} is not a public kind"),
        };
        for host in &site.hosts {
            load_table(
                lab,
                &host.ns,
                "inet warren_fw",
                &rules,
                &format!("pub{}-{}", site.index, kind.short()),
            )?;
        }
        Ok(())
    }
}

fn router_ns(site: &Site) -> Result<&str> {
    site.router_ns
        .as_deref()
        .with_context(|| format!("site {} has no router", site.index))
}

fn octet(n: usize) -> Result<u8> {
    u8::try_from(n).with_context(|| format!("{n} does not fit an address octet"))
}

/// The external port range of host `i` of a NAT site.
pub fn host_port_range(i: usize) -> Result<(u16, u16)> {
    ensure!(i < MAX_HOSTS_PER_SITE, "host index {i} out of range");
    let lo = PORT_RANGE_BASE + u16::try_from(i)? * PORT_RANGE_SPAN;
    Ok((lo, lo + PORT_RANGE_SPAN - 1))
}

/// `net.bridge.bridge-nf-call-iptables` may be 1 in a new namespace (when `br_netfilter` is
/// loaded): bridged packets would then also traverse the IP hooks of the switch namespace.
/// Best effort: the key does not exist without `br_netfilter`.
fn bridge_nf_off(lab: &Lab, ns: &str) {
    for key in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ] {
        let _ = lab.run(ns, "sysctl", ["-q", "-w", &format!("{key}=0")]);
    }
}

fn flush_conntrack(lab: &Lab, ns: &str) -> Result<()> {
    lab.run_ok(ns, "conntrack", ["-F"]).with_context(|| {
        format!(
            "flush conntrack in {ns} (needs the `conntrack` tool: apt-get install conntrack, \
             as scripts/lib.sh does)"
        )
    })?;
    Ok(())
}

/// The nft file that replaces the router's table `ip warren_nat` by the rules of `kind` (see
/// [`router_ruleset`]), for `nft -f` outside the lab (scripts/demo, via `warren-labtool
/// nat-rules`).
pub fn router_nft_file(
    kind: NatKind,
    hairpin: bool,
    wan: Ipv4Addr,
    hosts: &[Ipv4Addr],
) -> Result<String> {
    Ok(table_file(
        "ip warren_nat",
        &router_ruleset(kind, hairpin, wan, hosts)?,
    ))
}

/// Parses a kind as `warren-labtool nat-rules` takes it (its short name or its Rust name).
pub fn parse_kind(s: &str) -> Result<NatKind> {
    NatKind::ALL
        .into_iter()
        .find(|k| k.short() == s || format!("{k:?}").eq_ignore_ascii_case(s))
        .with_context(|| {
            format!(
                "unknown NAT kind {s:?}; one of {}",
                NatKind::ALL.map(NatKind::short).join(", ")
            )
        })
}

fn table_file(family_name: &str, body: &str) -> String {
    // Declaring the table first makes the delete succeed whether or not it existed.
    let mut text = format!("table {family_name}\ndelete table {family_name}\n");
    if !body.is_empty() {
        text.push_str(&format!("table {family_name} {{\n{body}}}\n"));
    }
    text
}

/// Replaces table `family_name` (e.g. `"ip warren_nat"`) in `ns` by `body` (the table's
/// contents; empty: no table) in one nft transaction. `tag` names the rules file kept in the
/// lab's directory.
fn load_table(lab: &Lab, ns: &str, family_name: &str, body: &str, tag: &str) -> Result<()> {
    let text = table_file(family_name, body);
    let dir = lab.dir().join("nft");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{tag}.nft"));
    std::fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    lab.run_ok(ns, "nft", [std::ffi::OsStr::new("-f"), path.as_os_str()])
        .with_context(|| format!("load nftables rules into {ns}:\n{text}"))?;
    Ok(())
}

/// The body of table `bridge warren_inet`: UDP between each blocked pair dropped both ways.
pub fn inet_ruleset(blocked: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    if blocked.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
    );
    for (a, b) in blocked {
        s.push_str(&format!(
            "    ip saddr {a} ip daddr {b} meta l4proto udp drop\n    ip saddr {b} ip daddr {a} meta l4proto udp drop\n"
        ));
    }
    s.push_str("  }\n");
    s
}

/// The body of table `inet warren_fw` on a host behind its own stateful firewall.
pub fn firewall_ruleset() -> String {
    "  chain input {
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    meta l4proto udp drop
  }
"
    .to_owned()
}

/// The body of table `ip warren_nat` for a router of `kind` with public address `wan` and LAN
/// hosts `hosts` (host `i` gets external ports [`host_port_range`]`(i)`). See the module docs.
pub fn router_ruleset(
    kind: NatKind,
    hairpin: bool,
    wan: Ipv4Addr,
    hosts: &[Ipv4Addr],
) -> Result<String> {
    ensure!(!kind.is_public(), "{kind} has no router");
    let random = if kind == NatKind::Symmetric {
        " fully-random"
    } else {
        ""
    };
    let mut s = String::new();
    s.push_str(&format!(
        "  # external port -> internal ip . port, for inbound DNAT and hairpinning
  map ports {{
    typeof udp sport : ip saddr . udp sport
    flags dynamic,timeout
    timeout {MAPPING_TIMEOUT}
  }}
  # remote ip . external port, for address-dependent filtering
  set peers {{
    typeof ip daddr . udp sport
    flags dynamic,timeout
    timeout {MAPPING_TIMEOUT}
  }}
"
    ));

    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    match kind {
        NatKind::FullCone => s.push_str(&format!(
            "    iifname \"{WAN_IF}\" udp dport @ports dnat ip to udp dport map @ports\n"
        )),
        NatKind::Restricted => s.push_str(&format!(
            "    iifname \"{WAN_IF}\" ip saddr . udp dport @peers dnat ip to udp dport map @ports\n"
        )),
        _ => {}
    }
    if hairpin && kind != NatKind::UdpBlocked {
        s.push_str(&format!(
            "    iifname \"{LAN_IF}\" ip daddr {wan} udp dport @ports dnat ip to udp dport map @ports\n"
        ));
    }
    s.push_str("  }\n");

    s.push_str(
        "  chain input {
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    # unsolicited UDP to the router itself: dropped before conntrack confirms an entry
    meta l4proto udp drop
  }
",
    );

    s.push_str("  chain forward {\n    type filter hook forward priority filter; policy drop;\n");
    if kind == NatKind::UdpBlocked {
        s.push_str("    meta l4proto udp drop\n");
    }
    s.push_str("    ct state established,related accept\n");
    s.push_str(&format!(
        "    iifname \"{LAN_IF}\" oifname \"{WAN_IF}\" accept\n"
    ));
    if matches!(kind, NatKind::FullCone | NatKind::Restricted) {
        s.push_str(&format!(
            "    iifname \"{WAN_IF}\" oifname \"{LAN_IF}\" ct status dnat accept\n"
        ));
    }
    if hairpin {
        s.push_str(&format!(
            "    iifname \"{LAN_IF}\" oifname \"{LAN_IF}\" ct status dnat accept\n"
        ));
    }
    s.push_str("  }\n");

    s.push_str(&format!(
        "  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{WAN_IF}\" jump snat_wan
"
    ));
    if hairpin {
        s.push_str(&format!(
            "    iifname \"{LAN_IF}\" oifname \"{LAN_IF}\" ct status dnat jump snat_wan\n"
        ));
    }
    s.push_str("  }\n  chain snat_wan {\n");
    for (i, host) in hosts.iter().enumerate() {
        let (lo, hi) = host_port_range(i)?;
        s.push_str(&format!(
            "    ip saddr {host} meta l4proto {{ tcp, udp }} snat ip to {wan}:{lo}-{hi}{random}\n"
        ));
    }
    s.push_str(&format!("    snat ip to {wan}{random}\n  }}\n"));

    s.push_str(&format!(
        "  # after source NAT: the packet carries its external port, conntrack the internal one
  chain record {{
    type filter hook postrouting priority srcnat + 10; policy accept;
    oifname \"{WAN_IF}\" ct direction original update @ports {{ udp sport : ct original ip saddr . ct original proto-src }}
    oifname \"{WAN_IF}\" ct direction reply update @ports {{ udp sport : ct reply ip saddr . ct reply proto-src }}
    oifname \"{WAN_IF}\" update @peers {{ ip daddr . udp sport }}
  }}
"
    ));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
    const H: [Ipv4Addr; 2] = [
        Ipv4Addr::new(10, 77, 101, 11),
        Ipv4Addr::new(10, 77, 101, 12),
    ];

    #[test]
    fn filtering_rules_follow_the_kind() {
        let cone = router_ruleset(NatKind::FullCone, false, WAN, &H).expect("rules");
        assert!(
            cone.contains("iifname \"wan\" udp dport @ports dnat"),
            "{cone}"
        );
        let restr = router_ruleset(NatKind::Restricted, false, WAN, &H).expect("rules");
        assert!(
            restr.contains("ip saddr . udp dport @peers dnat"),
            "{restr}"
        );
        for kind in [
            NatKind::PortRestricted,
            NatKind::Symmetric,
            NatKind::UdpBlocked,
        ] {
            let r = router_ruleset(kind, false, WAN, &H).expect("rules");
            assert!(!r.contains("iifname \"wan\" udp dport"), "{kind}: {r}");
            assert!(!r.contains("@peers dnat"), "{kind}: {r}");
            assert!(!r.contains("ct status dnat accept"), "{kind}: {r}");
        }
        let blocked = router_ruleset(NatKind::UdpBlocked, false, WAN, &H).expect("rules");
        assert!(
            blocked.contains("policy drop;\n    meta l4proto udp drop"),
            "{blocked}"
        );
    }

    #[test]
    fn mapping_rules_follow_the_kind() {
        let sym = router_ruleset(NatKind::Symmetric, false, WAN, &H).expect("rules");
        assert_eq!(sym.matches("fully-random").count(), 3, "{sym}");
        let pr = router_ruleset(NatKind::PortRestricted, false, WAN, &H).expect("rules");
        assert!(!pr.contains("random"), "{pr}");
        assert!(
            pr.contains("ip saddr 10.77.101.12 meta l4proto { tcp, udp } snat ip to 203.0.113.21:25000-29999"),
            "{pr}"
        );
    }

    #[test]
    fn hairpin_rules_only_when_asked() {
        let on = router_ruleset(NatKind::PortRestricted, true, WAN, &H).expect("rules");
        assert!(on.contains("iifname \"lan0\" ip daddr 203.0.113.21 udp dport @ports dnat"));
        assert!(on.contains("iifname \"lan0\" oifname \"lan0\" ct status dnat jump snat_wan"));
        let off = router_ruleset(NatKind::PortRestricted, false, WAN, &H).expect("rules");
        assert!(!off.contains("iifname \"lan0\" ip daddr"), "{off}");
        assert!(!off.contains("oifname \"lan0\""), "{off}");
    }

    #[test]
    fn port_ranges_are_disjoint() {
        let mut prev_hi = 0;
        for i in 0..MAX_HOSTS_PER_SITE {
            let (lo, hi) = host_port_range(i).expect("range");
            assert!(lo > prev_hi && hi >= lo, "{i}: {lo}-{hi}");
            prev_hi = hi;
        }
        assert!(host_port_range(MAX_HOSTS_PER_SITE).is_err());
    }

    #[test]
    fn kinds_promise_rfc4787_behaviour() {
        assert_eq!(
            NatKind::Symmetric.mapping(),
            Some(Mapping::EndpointDependent)
        );
        assert_eq!(
            NatKind::Restricted.filtering(),
            Some(Filtering::AddressDependent)
        );
        assert_eq!(NatKind::UdpBlocked.filtering(), None);
        assert!(NatKind::ALL.iter().filter(|k| k.is_public()).count() == 2);
    }

    #[test]
    fn inet_rules_drop_both_directions() {
        assert_eq!(inet_ruleset(&[]), "");
        let r = inet_ruleset(&[(WAN, Ipv4Addr::new(203, 0, 113, 101))]);
        assert!(r.contains("ip saddr 203.0.113.21 ip daddr 203.0.113.101 meta l4proto udp drop"));
        assert!(r.contains("ip saddr 203.0.113.101 ip daddr 203.0.113.21 meta l4proto udp drop"));
    }
}
