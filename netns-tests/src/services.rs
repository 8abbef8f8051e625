//! What subnet routes, exit nodes and MagicDNS need around a mesh, and the labtool commands
//! that observe them.
//!
//! * [`Subnet`]: a LAN `10.20.0.0/24` in its own bridge namespace with one host at
//!   `10.20.0.10` that has no route anywhere else (not to the mesh LAN, not to
//!   `100.64.0.0/10`); routers join it with [`Subnet::attach_router`] as `10.20.0.N`.
//!   The host runs a UDP echo server (it answers with the source address it saw, so a probe
//!   tells which router masqueraded the packet) and an HTTP server.
//! * [`Internet`]: a web server at `198.51.100.80` on a bridge only exit nodes join
//!   ([`Internet::attach_exit`], as `198.51.100.N`); nothing else has a route to it.
//! * [`DnsServers`]: an upstream DNS server at `10.53.0.53` and a split-DNS server (for
//!   `corp.example`) at `10.54.0.53`, each in its own namespace on the mesh LAN (at
//!   [`DnsServers::UPSTREAM_GW`] and [`DnsServers::SPLIT_GW`], the service addresses on
//!   `lo`); hosts reach them through [`DnsServers::routes`] (see
//!   [`crate::Mesh::route_all_hosts`]).
//!
//! Every namespace gets its own `/etc/resolv.conf` from [`Lab::add_ns`]
//! ([`crate::lab::default_resolv_conf`]: `nameserver 10.53.0.53`). Everything here lives in
//! the lab's namespaces and goes with them.
//!
//! The observers: [`http_get`], [`dns_query`] (the labtool's `dns-query`), [`dig`], [`dns_load`],
//! [`route_get`], [`ping_host`] and [`WarrenOsState`] (what a node installs in its namespace:
//! policy-routing rules, table 52, the `inet warren` nftables table).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::lab::{Lab, Lan};
use crate::process::ProcHandle;
use crate::udp;

/// The UDP echo port of the hosts behind routers and on the internet.
pub const ECHO_PORT: u16 = 7007;

/// A LAN behind subnet routers.
#[derive(Debug, Clone)]
pub struct Subnet {
    /// The bridge.
    pub lan: Lan,
    /// The host's namespace.
    pub host_ns: String,
}

impl Subnet {
    /// The prefix routers advertise.
    pub const PREFIX: &'static str = "10.20.0.0/24";
    /// The host on it.
    pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 10);
    /// What its HTTP server answers.
    pub const BODY: &'static str = "hello from the LAN behind the router";

    /// Builds the bridge and the host, and starts the host's UDP echo (port [`ECHO_PORT`])
    /// and HTTP (port 80) servers.
    pub fn build(lab: &mut Lab, labtool: &Path) -> Result<Self> {
        let lan = lab.add_lan("sub")?;
        let host_ns = lab.add_ns("lanhost")?;
        lab.attach(&lan, &host_ns, "eth0", &format!("{}/24", Self::HOST))?;
        udp::start_echo(
            lab,
            labtool,
            &host_ns,
            &[SocketAddr::from((Self::HOST, ECHO_PORT))],
        )?;
        http_serve(
            lab,
            labtool,
            &host_ns,
            SocketAddr::from((Self::HOST, 80)),
            Self::BODY,
        )?;
        Ok(Self { lan, host_ns })
    }

    /// Connects router namespace `ns` to the LAN as `10.20.0.n/24` on interface `sub0`.
    pub fn attach_router(&self, lab: &mut Lab, ns: &str, n: u8) -> Result<Ipv4Addr> {
        ensure!(
            n != 0 && n != 10 && n != 255,
            "10.20.0.{n} is not a router address"
        );
        let addr = Ipv4Addr::new(10, 20, 0, n);
        lab.attach(&self.lan, ns, "sub0", &format!("{addr}/24"))?;
        Ok(addr)
    }

    /// Asks the host's echo server, from `ns`, which source address it sees (for a mesh
    /// client: the router that masqueraded the packet). `None`: no answer within `timeout`.
    pub fn seen_source(
        &self,
        lab: &Lab,
        labtool: &Path,
        ns: &str,
        from_port: u16,
        timeout: Duration,
    ) -> Result<Option<SocketAddr>> {
        let target = SocketAddr::from((Self::HOST, ECHO_PORT));
        let got = udp::probe(lab, labtool, ns, from_port, &[target], timeout)?;
        Ok(got.into_iter().next().flatten())
    }
}

/// The "internet" behind exit nodes.
#[derive(Debug, Clone)]
pub struct Internet {
    /// The bridge.
    pub lan: Lan,
    /// The web server's namespace.
    pub web_ns: String,
}

impl Internet {
    /// The web server.
    pub const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 80);
    /// What it answers.
    pub const BODY: &'static str = "hello from the internet";

    /// Builds the bridge and the web server (HTTP on port 80, UDP echo on [`ECHO_PORT`]).
    pub fn build(lab: &mut Lab, labtool: &Path) -> Result<Self> {
        let lan = lab.add_lan("inet")?;
        let web_ns = lab.add_ns("web")?;
        lab.attach(&lan, &web_ns, "eth0", &format!("{}/24", Self::WEB))?;
        http_serve(
            lab,
            labtool,
            &web_ns,
            SocketAddr::from((Self::WEB, 80)),
            Self::BODY,
        )?;
        udp::start_echo(
            lab,
            labtool,
            &web_ns,
            &[SocketAddr::from((Self::WEB, ECHO_PORT))],
        )?;
        Ok(Self { lan, web_ns })
    }

    /// Connects exit node namespace `ns` to the internet as `198.51.100.n/24` on `wan0`.
    pub fn attach_exit(&self, lab: &mut Lab, ns: &str, n: u8) -> Result<Ipv4Addr> {
        ensure!(
            n != 0 && n != 80 && n != 255,
            "198.51.100.{n} is not an exit address"
        );
        let addr = Ipv4Addr::new(198, 51, 100, n);
        lab.attach(&self.lan, ns, "wan0", &format!("{addr}/24"))?;
        Ok(addr)
    }

    /// The web server's URL.
    pub fn url() -> String {
        format!("http://{}:80/", Self::WEB)
    }
}

/// The lab's DNS servers.
#[derive(Debug, Clone)]
pub struct DnsServers {
    /// The upstream server's namespace.
    pub upstream_ns: String,
    /// The split-DNS server's namespace.
    pub split_ns: String,
}

impl DnsServers {
    /// The upstream (`dns.nameservers.global`).
    pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(10, 53, 0, 53);
    /// The split-DNS server for [`DnsServers::SPLIT_DOMAIN`].
    pub const SPLIT: Ipv4Addr = Ipv4Addr::new(10, 54, 0, 53);
    /// The domain the split server answers for.
    pub const SPLIT_DOMAIN: &'static str = "corp.example";
    /// The upstream's namespace's address on the mesh LAN (the gateway to it).
    pub const UPSTREAM_GW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 251);
    /// The split server's namespace's address on the mesh LAN.
    pub const SPLIT_GW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 252);

    /// Starts both servers on `lan` (the mesh LAN, `10.77.0.0/24`) with their records
    /// (`NAME=IP` pairs; each answers NXDOMAIN for every other name).
    pub fn build(
        lab: &mut Lab,
        labtool: &Path,
        lan: &Lan,
        upstream_records: &[(&str, IpAddr)],
        split_records: &[(&str, IpAddr)],
    ) -> Result<Self> {
        let mut start =
            |short: &str, gw: Ipv4Addr, service: Ipv4Addr, records: &[(&str, IpAddr)]| {
                let ns = lab.add_ns(short)?;
                lab.attach(lan, &ns, "eth0", &format!("{gw}/24"))?;
                lab.add_addr(&ns, "lo", &format!("{service}/32"))?;
                dns_serve(lab, labtool, &ns, SocketAddr::from((service, 53)), records)?;
                anyhow::Ok(ns)
            };
        let upstream_ns = start("dns", Self::UPSTREAM_GW, Self::UPSTREAM, upstream_records)?;
        let split_ns = start("dnssplit", Self::SPLIT_GW, Self::SPLIT, split_records)?;
        Ok(Self {
            upstream_ns,
            split_ns,
        })
    }

    /// The routes a host on the mesh LAN needs to reach both servers.
    pub fn routes() -> [(&'static str, Ipv4Addr); 2] {
        [
            ("10.53.0.0/24", Self::UPSTREAM_GW),
            ("10.54.0.0/24", Self::SPLIT_GW),
        ]
    }

    /// Adds [`DnsServers::routes`] to `ns`.
    pub fn route_from(lab: &Lab, ns: &str) -> Result<()> {
        for (dest, via) in Self::routes() {
            lab.add_route(ns, dest, via)?;
        }
        Ok(())
    }
}

// ----- labtool drivers -----

/// Starts `http-serve` in `ns` and waits until it listens.
pub fn http_serve(
    lab: &mut Lab,
    labtool: &Path,
    ns: &str,
    listen: SocketAddr,
    body: &str,
) -> Result<ProcHandle> {
    let proc = lab.spawn(
        ns,
        &format!("http-serve {listen}"),
        labtool,
        [
            "http-serve",
            "--listen",
            &listen.to_string(),
            "--body",
            body,
        ],
    )?;
    udp::wait_ready(&proc)?;
    Ok(proc)
}

/// What one `http-get` saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpOutcome {
    /// A reply: status code and body.
    Reply(u16, String),
    /// Connection refused.
    Refused,
    /// ICMP unreachable or no route.
    Unreachable,
    /// Nothing within the timeout.
    Timeout,
}

impl HttpOutcome {
    /// True for a 200 with exactly `body`.
    pub fn is_ok_with(&self, body: &str) -> bool {
        matches!(self, HttpOutcome::Reply(200, b) if b == body)
    }
}

/// Parses `http-get`'s output.
pub fn parse_http_get(stdout: &str) -> Result<HttpOutcome> {
    let (first, rest) = stdout.split_once('\n').unwrap_or((stdout, ""));
    Ok(match first.trim() {
        "refused" => HttpOutcome::Refused,
        "unreachable" => HttpOutcome::Unreachable,
        "timeout" => HttpOutcome::Timeout,
        code => HttpOutcome::Reply(
            code.parse()
                .with_context(|| format!("bad http-get output {stdout:?}"))?,
            rest.strip_suffix('\n').unwrap_or(rest).to_owned(),
        ),
    })
}

/// One `http-get` of `url` from `ns`.
pub fn http_get(
    lab: &Lab,
    labtool: &Path,
    ns: &str,
    url: &str,
    timeout: Duration,
) -> Result<HttpOutcome> {
    let out = lab.run_ok_timeout(
        ns,
        labtool,
        [
            "http-get",
            "--url",
            url,
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ],
        timeout + Duration::from_secs(10),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_http_get(&stdout)
}

/// Starts `dns-serve` in `ns` with `records` and waits until it is bound.
pub fn dns_serve(
    lab: &mut Lab,
    labtool: &Path,
    ns: &str,
    listen: SocketAddr,
    records: &[(&str, IpAddr)],
) -> Result<ProcHandle> {
    let mut args = vec![
        "dns-serve".to_owned(),
        "--listen".to_owned(),
        listen.to_string(),
    ];
    for (name, ip) in records {
        args.push("--record".to_owned());
        args.push(format!("{name}={ip}"));
    }
    let proc = lab.spawn(ns, &format!("dns-serve {listen}"), labtool, &args)?;
    udp::wait_ready(&proc)?;
    Ok(proc)
}

/// One answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// Owner name, with its trailing dot.
    pub name: String,
    /// `A`, `AAAA`, `PTR`, …
    pub rtype: String,
    /// Its TTL.
    pub ttl: u32,
    /// The data as text (`100.64.0.2`, `node2.mesh.test.`).
    pub data: String,
}

/// The outcome of one DNS query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, …; `timeout` or `unreachable` when none came.
    pub rcode: String,
    /// The answer section.
    pub answers: Vec<DnsRecord>,
}

impl DnsAnswer {
    /// The data of the answers of type `rtype`.
    pub fn data_of(&self, rtype: &str) -> Vec<String> {
        self.answers
            .iter()
            .filter(|r| r.rtype.eq_ignore_ascii_case(rtype))
            .map(|r| r.data.clone())
            .collect()
    }

    /// The IPv4 addresses among the answers.
    pub fn ipv4s(&self) -> Vec<Ipv4Addr> {
        self.data_of("A")
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect()
    }

    /// True for NOERROR with exactly the A records `want`.
    pub fn is_a(&self, want: &[Ipv4Addr]) -> bool {
        let mut got = self.ipv4s();
        got.sort();
        let mut want = want.to_vec();
        want.sort();
        self.rcode == "NOERROR" && got == want
    }
}

/// Parses `dns-query`'s JSON.
pub fn parse_dns_query(stdout: &str) -> Result<DnsAnswer> {
    let v: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("dns-query printed non-JSON: {stdout:?}"))?;
    let rcode = v["rcode"]
        .as_str()
        .with_context(|| format!("no rcode in {v}"))?
        .to_owned();
    let answers = v["answers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| DnsRecord {
                    name: r["name"].as_str().unwrap_or_default().to_owned(),
                    rtype: r["type"].as_str().unwrap_or_default().to_owned(),
                    ttl: r["ttl"]
                        .as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .unwrap_or(0),
                    data: r["data"].as_str().unwrap_or_default().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(DnsAnswer { rcode, answers })
}

/// One `dns-query` from `ns` to `server` (port 53) for `name` of `qtype` (`A`, `AAAA`, `PTR`
/// with an IP address as name, …).
pub fn dns_query(
    lab: &Lab,
    labtool: &Path,
    ns: &str,
    server: IpAddr,
    name: &str,
    qtype: &str,
    timeout: Duration,
) -> Result<DnsAnswer> {
    let out = lab.run_ok_timeout(
        ns,
        labtool,
        [
            "dns-query",
            "--server",
            &server.to_string(),
            "--name",
            name,
            "--type",
            qtype,
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ],
        timeout + Duration::from_secs(10),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_dns_query(&stdout)
}

/// Parses `dig +noall +comments +answer` output: the status from the `->>HEADER<<-` line
/// (`timeout` when dig reports no servers could be reached) and the answer records.
pub fn parse_dig(stdout: &str) -> Result<DnsAnswer> {
    let mut rcode = None;
    let mut answers = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("status: ").nth(1)
            && line.contains("->>HEADER<<-")
        {
            rcode = rest.split(',').next().map(|s| s.trim().to_owned());
            continue;
        }
        if line.contains("connection timed out") || line.contains("no servers could be reached") {
            rcode.get_or_insert_with(|| "timeout".to_owned());
            continue;
        }
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        // NAME TTL CLASS TYPE DATA...
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 5 {
            answers.push(DnsRecord {
                name: words[0].to_owned(),
                ttl: words[1].parse().unwrap_or(0),
                rtype: words[3].to_owned(),
                data: words[4..].join(" "),
            });
        }
    }
    let rcode = rcode.with_context(|| format!("no status in dig's output: {stdout:?}"))?;
    Ok(DnsAnswer { rcode, answers })
}

/// `dig @SERVER NAME QTYPE` in `ns` (`qtype` `PTR` with an IP address runs `dig -x`), one try
/// of two seconds.
pub fn dig(lab: &Lab, ns: &str, server: IpAddr, name: &str, qtype: &str) -> Result<DnsAnswer> {
    let at = format!("@{server}");
    let mut args = vec![
        at.as_str(),
        "+noall",
        "+comments",
        "+answer",
        "+time=2",
        "+tries=1",
    ];
    if qtype.eq_ignore_ascii_case("PTR") && name.parse::<IpAddr>().is_ok() {
        args.extend(["-x", name]);
    } else {
        args.extend([name, qtype]);
    }
    let out = lab.run_timeout(ns, "dig", &args, Duration::from_secs(15))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // dig exits 9 when no reply came: that is an outcome, not a failure.
    match out.status.code() {
        Some(0) => parse_dig(&stdout),
        Some(9) => Ok(DnsAnswer {
            rcode: "timeout".to_owned(),
            answers: Vec::new(),
        }),
        _ => bail!(
            "`dig {}` in {ns} failed ({}): {stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Runs `dns-load` from `ns` against `server` for `name` and returns its JSON summary
/// (`sent`, `answered`, `lost`, `errors`, `p50_ms`, `p99_ms`, `max_ms`).
pub fn dns_load(
    lab: &Lab,
    labtool: &Path,
    ns: &str,
    server: IpAddr,
    name: &str,
    rate: u32,
    seconds: u32,
) -> Result<Value> {
    let out = lab.run_ok_timeout(
        ns,
        labtool,
        [
            "dns-load",
            "--server",
            &server.to_string(),
            "--name",
            name,
            "--rate",
            &rate.to_string(),
            "--seconds",
            &seconds.to_string(),
        ],
        Duration::from_secs(u64::from(seconds) + 20),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("dns-load printed non-JSON: {stdout:?}"))
}

// ----- the OS state a node installs -----

/// `ip route get DST [mark MARK]` in `ns`: the route line, or `Err` with ip's message when
/// there is none (`Network is unreachable`, a `prohibit`/`unreachable` rule, …).
pub fn route_get(lab: &Lab, ns: &str, dst: IpAddr, mark: Option<u32>) -> Result<String> {
    let mut args = vec!["route".to_owned(), "get".to_owned(), dst.to_string()];
    if let Some(m) = mark {
        args.extend(["mark".to_owned(), format!("{m:#x}")]);
    }
    let out = lab.run(ns, "ip", &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success(),
        "`ip {}` in {ns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(stdout)
}

/// The device of a `route get` line (`… dev eth0 …`).
pub fn route_dev(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words.next();
        }
    }
    None
}

/// One ping (`ping -c 1 -W SECS HOST`; a name is resolved through the namespace's
/// `/etc/resolv.conf`): true iff a reply came. Unlike [`Lab::ping`] an unreachable network
/// or a name that does not resolve is just `false`; the output is returned for messages.
pub fn ping_host(lab: &Lab, ns: &str, host: &str, wait: Duration) -> Result<(bool, String)> {
    let secs = format!("{:.3}", wait.as_secs_f64());
    let mut args = vec!["-c", "1", "-W", &secs];
    // An address is not looked up backwards (no DNS wait); a name is resolved and so is the
    // reply's address.
    if host.parse::<IpAddr>().is_ok() {
        args.push("-n");
    }
    args.push(host);
    let out = lab.run_timeout(ns, "ping", &args, wait + Duration::from_secs(15))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The fwmark a node's own sockets carry (Tailscale's bypass mark): its traffic skips table 52.
pub const BYPASS_MARK: u32 = 0x80000;
/// The routing table a node puts mesh, subnet and exit routes in.
pub const TABLE: u32 = 52;
/// The `ip rule` preferences a node installs.
pub const RULE_PREFS: [u32; 4] = [5210, 5230, 5250, 5270];
/// The nftables table a router or exit node installs.
pub const NFT_TABLE: &str = "inet warren";

/// What a node may have installed in its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarrenOsState {
    /// `ip -4 rule` lines at [`RULE_PREFS`].
    pub rules_v4: Vec<String>,
    /// `ip -6 rule` lines at [`RULE_PREFS`].
    pub rules_v6: Vec<String>,
    /// `ip -4 route show table 52`.
    pub table_v4: Vec<String>,
    /// `ip -6 route show table 52`.
    pub table_v6: Vec<String>,
    /// `nft list tables` lines naming a `warren` table.
    pub nft_tables: Vec<String>,
}

impl WarrenOsState {
    /// Reads it from `ns`.
    pub fn read(lab: &Lab, ns: &str) -> Result<Self> {
        let lines = |args: &[&str]| -> Result<Vec<String>> {
            let out = lab.run(ns, args[0], &args[1..])?;
            // `ip -6 route show table 52` on a kernel without IPv6 fails: nothing there.
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    args[0] == "ip" && !err.contains("Usage"),
                    "`{}` in {ns} failed: {err}",
                    args.join(" ")
                );
                return Ok(Vec::new());
            }
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect())
        };
        let at_prefs = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .filter(|l| {
                    l.split(':')
                        .next()
                        .and_then(|p| p.trim().parse::<u32>().ok())
                        .is_some_and(|p| RULE_PREFS.contains(&p))
                })
                .collect()
        };
        Ok(Self {
            rules_v4: at_prefs(lines(&["ip", "-4", "rule", "show"])?),
            rules_v6: at_prefs(lines(&["ip", "-6", "rule", "show"])?),
            table_v4: lines(&["ip", "-4", "route", "show", "table", "52"])?,
            table_v6: lines(&["ip", "-6", "route", "show", "table", "52"])?,
            nft_tables: lines(&["nft", "list", "tables"])?
                .into_iter()
                .filter(|l| l.contains("warren"))
                .collect(),
        })
    }

    /// True when nothing is left.
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }

    /// How many `ip -4 rule` lines sit at `pref`.
    pub fn rules_v4_at(&self, pref: u32) -> usize {
        self.rules_v4
            .iter()
            .filter(|l| l.starts_with(&format!("{pref}:")))
            .count()
    }

    /// True when the `inet warren` table exists.
    pub fn has_nft_table(&self) -> bool {
        self.nft_tables
            .iter()
            .any(|l| l.trim() == "table inet warren")
    }
}

// ----- nodes for these tests -----

/// How long the helpers below wait for something the mesh should do "soon".
pub const SOON: Duration = Duration::from_secs(20);

/// Starts a node on a new mesh host with `key` and `extra_args` for `warren up`, after
/// `prepare` ran on the fresh namespace (e.g. [`Subnet::attach_router`]), and waits until it
/// has its mesh IPv4 address.
pub fn spawn_node(
    lab: &mut Lab,
    mesh: &mut crate::Mesh,
    key: &str,
    extra_args: &[&str],
    prepare: impl FnOnce(&mut Lab, &str) -> Result<()>,
) -> Result<(crate::Node, Ipv4Addr)> {
    let (ns, addr) = mesh.add_host(lab)?;
    prepare(lab, &ns)?;
    let opts = crate::NodeOptions::with_args(extra_args);
    let node = mesh.spawn_node_on(lab, &ns, addr, key, &opts)?;
    let ip = wait_mesh_ip(lab, &node)?;
    Ok((node, ip))
}

/// Waits until `node` reports its mesh IPv4 address.
pub fn wait_mesh_ip(lab: &Lab, node: &crate::Node) -> Result<Ipv4Addr> {
    let mut addr = None;
    crate::wait_until(
        SOON,
        &format!("{} has a mesh address", node.hostname),
        || {
            node.check_running()?;
            addr = Some(node.ipv4(lab)?);
            Ok(true)
        },
    )?;
    addr.context("no address")
}

/// Waits until `pred` holds for `node`'s status; returns that status. The last status seen is
/// in the error.
pub fn wait_status(
    lab: &Lab,
    node: &crate::Node,
    what: &str,
    mut pred: impl FnMut(&crate::NodeStatus) -> bool,
) -> Result<crate::NodeStatus> {
    let mut last = None;
    let mut hit = None;
    crate::wait_until(SOON, &format!("{}: {what}", node.hostname), || {
        node.check_running()?;
        let s = node.status(lab)?;
        let ok = pred(&s);
        if ok {
            hit = Some(s);
        } else {
            last = Some(s.raw);
        }
        Ok(ok)
    })
    .with_context(|| {
        format!(
            "{}'s last status: {}",
            node.hostname,
            last.map(|v| v.to_string()).unwrap_or_default()
        )
    })?;
    hit.context("no status")
}

/// The peer of `s` with mesh address `addr`, or an error showing the status.
pub fn peer_at(s: &crate::NodeStatus, addr: Ipv4Addr) -> Result<&crate::PeerStatus> {
    s.peer_with_addr(IpAddr::V4(addr))
        .with_context(|| format!("{} does not list {addr}: {}", s.name, s.raw))
}

/// The entry of node `id` in `nodes list-routes` JSON (an array of `{id, name, advertised,
/// approved, serving}`), if listed.
pub fn routes_entry(list: &Value, id: u64) -> Option<&Value> {
    list.as_array()?
        .iter()
        .find(|e| e["id"].as_u64() == Some(id))
}

/// The strings of `entry[key]` (also accepting `KEY_routes`, e.g. `advertised_routes`).
pub fn routes_field(entry: &Value, key: &str) -> Vec<String> {
    let v = match &entry[key] {
        Value::Null => &entry[format!("{key}_routes").as_str()],
        v => v,
    };
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `ns` gets an ICMP echo reply from `addr` within `wait` (see [`ping_host`]).
pub fn pings(lab: &Lab, ns: &str, addr: Ipv4Addr, wait: Duration) -> Result<bool> {
    Ok(ping_host(lab, ns, &addr.to_string(), wait)?.0)
}

/// A namespace's routing and firewall state as text, for failure messages: addresses, routes
/// (main and table 52), rules, forwarding, the nftables ruleset and conntrack entries.
pub fn diagnose(lab: &Lab, ns: &str) -> String {
    let mut out = format!("----- state of {ns} -----\n");
    for cmd in [
        &["ip", "-br", "addr"][..],
        &["ip", "route"],
        &["ip", "route", "show", "table", "52"],
        &["ip", "-6", "route", "show", "table", "52"],
        &["ip", "rule"],
        &[
            "sysctl",
            "net.ipv4.ip_forward",
            "net.ipv6.conf.all.forwarding",
        ],
        &["nft", "list", "ruleset"],
        &["conntrack", "-L"],
        &["cat", "/etc/resolv.conf"],
    ] {
        out.push_str(&format!("$ {}\n", cmd.join(" ")));
        match lab.run(ns, cmd[0], &cmd[1..]) {
            Ok(o) => {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                out.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            Err(e) => out.push_str(&format!("({e:#})\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_get_output_parses() {
        assert_eq!(
            parse_http_get("200\nhello\n").expect("parse"),
            HttpOutcome::Reply(200, "hello".to_owned())
        );
        assert_eq!(
            parse_http_get("timeout\n").expect("parse"),
            HttpOutcome::Timeout
        );
        assert_eq!(
            parse_http_get("unreachable\n").expect("parse"),
            HttpOutcome::Unreachable
        );
        assert!(parse_http_get("what\n").is_err());
    }

    #[test]
    fn dig_output_parses() {
        let out = ";; Got answer:\n\
                   ;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 4242\n\
                   ;; flags: qr aa rd ra; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 0\n\
                   \n\
                   www.example.net.\t30\tIN\tA\t192.0.2.44\n";
        let a = parse_dig(out).expect("parse");
        assert_eq!(a.rcode, "NOERROR");
        assert!(a.is_a(&[Ipv4Addr::new(192, 0, 2, 44)]));
        let nx =
            parse_dig(";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 1\n").expect("parse");
        assert_eq!(nx.rcode, "NXDOMAIN");
        assert!(nx.answers.is_empty());
    }

    #[test]
    fn route_dev_is_found() {
        assert_eq!(
            route_dev("10.20.0.10 dev warren0 table 52 src 100.64.0.1 uid 0"),
            Some("warren0")
        );
        assert_eq!(route_dev("unreachable"), None);
    }
}
