//! MagicDNS (issue 9): each node answers DNS at 100.100.100.100 (and fd7a:115c:a1e0::53) from
//! its netmap, forwards other names to the lab's upstream or, for `corp.example`, to the
//! split-DNS server, points its namespace's resolv.conf at itself while it runs and restores
//! it byte for byte afterwards.
//!
//! Topology: the mesh LAN 10.77.0.0/24 (control at 10.77.0.1, nodes at .11, .12, …), the
//! upstream DNS server 10.53.0.53 and the split server 10.54.0.53 in their own namespaces on
//! that LAN ([`DnsServers`]; every node's namespace routes to them). Each namespace has its own
//! `/etc/resolv.conf` (`/etc/netns/NS/resolv.conf`, written by the lab before any node starts:
//! `nameserver 10.53.0.53`), so the host's resolver is never touched. Each server also holds a
//! decoy for the other's name, so an answer shows which server it came from. Run as root after
//! `cargo build --bins`; without root every test prints why it is skipped.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use warren_netns_tests::lab::default_resolv_conf;
use warren_netns_tests::services::{
    self, DnsAnswer, DnsServers, SOON, ping_host, spawn_node, wait_status,
};
use warren_netns_tests::{Binaries, ControlConfig, Lab, Mesh, Node, PolicySource, wait_until};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

fn lab_test(name: &str, body: impl FnOnce(&mut Lab, &Binaries) -> Result<()>) {
    warren_netns_tests::lab_test(name, LABTOOL, body);
}

fn labtool() -> &'static Path {
    Path::new(LABTOOL)
}

/// The node's resolver.
const QUAD100: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 100, 100, 100));
/// Its IPv6 address.
const QUAD100_V6: &str = "fd7a:115c:a1e0::53";

const BASE_DOMAIN: &str = "mesh.test";

/// The `[dns]` section: MagicDNS under mesh.test, the lab's upstream for everything else,
/// corp.example to the split server, one extra record.
const DNS_TOML: &str = r#"magic_dns = true
base_domain = "mesh.test"
nameservers.global = ["10.53.0.53"]
nameservers.split = { "corp.example" = ["10.54.0.53"] }
extra_records = [{ name = "grafana.mesh.test", type = "A", value = "100.64.9.9" }]"#;

const WWW: &str = "www.example.net";
const WWW_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 44);
const WWW_DECOY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 98);
const CORP: &str = "x.corp.example";
const CORP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 54, 1, 7);
const CORP_DECOY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

/// Clients may reach servers; clients are not told about each other.
const DNS_POLICY: &str = r#"{
  "tagOwners": {"tag:client": ["lab@"], "tag:server": ["lab@"]},
  "acls": [
    {"action": "accept", "src": ["tag:client"], "dst": ["tag:server:*"]},
  ],
}
"#;

/// The mesh with [`DNS_TOML`] and `policy`, and both DNS servers (each with a decoy for the
/// other's name) routed from every host.
fn start(lab: &mut Lab, bins: &Binaries, policy: PolicySource) -> Result<Mesh> {
    let settings = ControlConfig {
        policy,
        dns_toml: Some(DNS_TOML.to_owned()),
        ..ControlConfig::default()
    };
    let mut mesh = Mesh::start_with(lab, bins, 0, &settings)?;
    let lan = mesh.lan.clone();
    DnsServers::build(
        lab,
        labtool(),
        &lan,
        &[(WWW, IpAddr::V4(WWW_ADDR)), (CORP, IpAddr::V4(CORP_DECOY))],
        &[(CORP, IpAddr::V4(CORP_ADDR)), (WWW, IpAddr::V4(WWW_DECOY))],
    )?;
    for (dest, via) in DnsServers::routes() {
        mesh.route_all_hosts(lab, dest, via)?;
    }
    Ok(mesh)
}

/// `dig @100.100.100.100 NAME QTYPE` from `node`, retried until `want` holds (the resolver
/// comes up with the netmap); returns the answer.
fn wait_dig(
    lab: &Lab,
    node: &Node,
    name: &str,
    qtype: &str,
    want: impl Fn(&DnsAnswer) -> bool,
) -> Result<DnsAnswer> {
    let mut last = None;
    wait_until(
        SOON,
        &format!(
            "{}: dig @{QUAD100} {name} {qtype} gives what is expected",
            node.hostname
        ),
        || {
            node.check_running()?;
            let a = services::dig(lab, &node.ns, QUAD100, name, qtype)?;
            let ok = want(&a);
            last = Some(a);
            Ok(ok)
        },
    )
    .with_context(|| format!("last answer {last:?}"))?;
    last.context("no answer")
}

fn fqdn(lab: &Lab, mesh: &Mesh, node: &Node) -> Result<(String, String)> {
    let given = mesh
        .control
        .node_by_hostname(lab, &node.hostname)?
        .given_name;
    Ok((given.clone(), format!("{given}.{BASE_DOMAIN}")))
}

#[test]
fn magic_dns_answers_peers_forwards_splits_and_restores_resolv_conf() {
    lab_test("magic-dns", |lab, bins| {
        let mut mesh = start(lab, bins, PolicySource::File(DNS_POLICY.to_owned()))?;
        let tag = |t: &str| {
            mesh.control
                .create_preauth_key(lab, &mesh.user, &["--reusable", "--tags", t])
        };
        let server_key = tag("tag:server")?;
        let client_key = tag("tag:client")?;
        let (server, server_ip) =
            spawn_node(lab, &mut mesh, &server_key.secret, &[], |_, _| Ok(()))?;
        let (c1, _c1_ip) = spawn_node(lab, &mut mesh, &client_key.secret, &[], |_, _| Ok(()))?;
        let (c2, c2_ip) = spawn_node(lab, &mut mesh, &client_key.secret, &[], |_, _| Ok(()))?;
        let original = default_resolv_conf(&c1.ns);
        wait_status(lab, &c1, "lists only the server", |s| {
            s.peers.len() == 1 && s.peer_with_addr(IpAddr::V4(server_ip)).is_some()
        })?;
        wait_status(lab, &server, "lists both clients", |s| s.peers.len() == 2)?;
        let (server_short, server_fqdn) = fqdn(lab, &mesh, &server)?;
        let (_, c2_fqdn) = fqdn(lab, &mesh, &c2)?;

        // The namespace's resolver points at the node while it runs.
        wait_until(SOON, "c1's resolv.conf points at 100.100.100.100", || {
            Ok(lab.resolv_conf(&c1.ns)?.lines().any(|l| {
                l.split_whitespace().collect::<Vec<_>>() == ["nameserver", "100.100.100.100"]
            }))
        })?;

        // A peer's name, over IPv4 and IPv6.
        let took = Instant::now();
        wait_dig(lab, &c1, &server_fqdn, "A", |a| a.is_a(&[server_ip]))?;
        eprintln!(
            "first MagicDNS answer for a peer, after resolv.conf changed: {} ms",
            took.elapsed().as_millis()
        );
        let v6 = services::dig(lab, &c1.ns, QUAD100_V6.parse()?, &server_fqdn, "A")?;
        ensure!(
            v6.is_a(&[server_ip]),
            "dig @{QUAD100_V6} {server_fqdn}: {v6:?}"
        );
        // Its AAAA: empty or its own IPv6 address, never anything else.
        let aaaa = services::dig(lab, &c1.ns, QUAD100, &server_fqdn, "AAAA")?;
        let server_v6: Vec<String> = server
            .addresses(lab)?
            .iter()
            .filter(|a| a.is_ipv6())
            .map(ToString::to_string)
            .collect();
        ensure!(
            aaaa.rcode == "NOERROR" && aaaa.data_of("AAAA").iter().all(|d| server_v6.contains(d)),
            "AAAA {server_fqdn}: {aaaa:?} (its addresses {server_v6:?})"
        );
        // The address's name.
        let ptr = services::dig(lab, &c1.ns, QUAD100, &server_ip.to_string(), "PTR")?;
        ensure!(
            ptr.rcode == "NOERROR" && ptr.data_of("PTR") == [format!("{server_fqdn}.")],
            "dig -x {server_ip}: {ptr:?}"
        );
        // The same through the labtool's own client.
        let a = services::dns_query(lab, labtool(), &c1.ns, QUAD100, &server_fqdn, "A", SOON)?;
        ensure!(a.is_a(&[server_ip]), "dns-query {server_fqdn}: {a:?}");

        // A peer c1 may not see does not resolve for it, but does for the server.
        let nx = services::dig(lab, &c1.ns, QUAD100, &c2_fqdn, "A")?;
        ensure!(
            nx.rcode == "NXDOMAIN" && nx.answers.is_empty(),
            "c1 resolves {c2_fqdn}, a peer it may not see: {nx:?}"
        );
        wait_dig(lab, &server, &c2_fqdn, "A", |a| a.is_a(&[c2_ip]))?;
        let nx = services::dig(lab, &c1.ns, QUAD100, &format!("nobody.{BASE_DOMAIN}"), "A")?;
        ensure!(nx.rcode == "NXDOMAIN", "an unknown mesh name: {nx:?}");

        // extra_records from the control config.
        let extra = services::dig(lab, &c1.ns, QUAD100, &format!("grafana.{BASE_DOMAIN}"), "A")?;
        ensure!(
            extra.is_a(&[Ipv4Addr::new(100, 64, 9, 9)]),
            "extra record: {extra:?}"
        );

        // Everything else goes upstream; corp.example to its own server.
        let www = wait_dig(lab, &c1, WWW, "A", |a| a.rcode == "NOERROR")?;
        ensure!(
            www.is_a(&[WWW_ADDR]),
            "{WWW} should come from the upstream ({WWW_ADDR}), not the split server ({WWW_DECOY}): {www:?}"
        );
        let nx = services::dig(lab, &c1.ns, QUAD100, "nothing.example.net", "A")?;
        ensure!(nx.rcode == "NXDOMAIN", "the upstream's NXDOMAIN: {nx:?}");
        let corp = wait_dig(lab, &c1, CORP, "A", |a| a.rcode == "NOERROR")?;
        ensure!(
            corp.is_a(&[CORP_ADDR]),
            "{CORP} should come from the split server ({CORP_ADDR}), not the upstream \
             ({CORP_DECOY}): {corp:?}"
        );

        // The system resolver uses it: ping by short name and by full name.
        // (ping may pick the AAAA answer: any of the server's mesh addresses will do.)
        let server_addrs: Vec<String> = server
            .addresses(lab)?
            .iter()
            .map(ToString::to_string)
            .collect();
        for name in [server_short.as_str(), server_fqdn.as_str()] {
            let (ok, out) = ping_host(lab, &c1.ns, name, std::time::Duration::from_secs(2))?;
            ensure!(ok, "ping {name} from c1:\n{out}");
            ensure!(
                server_addrs.iter().any(|a| out.contains(&format!("({a})"))
                    || out.contains(&format!(" {a} "))
                    || out.contains(&format!(" {a}:"))),
                "ping {name} went elsewhere than {server_addrs:?}:\n{out}"
            );
        }
        let (ok, out) = ping_host(lab, &c1.ns, &c2_fqdn, std::time::Duration::from_secs(1))?;
        ensure!(!ok, "ping {c2_fqdn} (not visible to c1) worked:\n{out}");
        let resolved = lab.run(&c1.ns, "getent", ["ahostsv4", WWW])?;
        ensure!(
            String::from_utf8_lossy(&resolved.stdout).contains(&WWW_ADDR.to_string()),
            "getent {WWW} through the node: {}",
            String::from_utf8_lossy(&resolved.stdout)
        );

        // `warren down`: the resolver file is the lab's again, byte for byte.
        c1.down_and_wait(lab, SOON)?;
        let now = lab.resolv_conf(&c1.ns)?;
        ensure!(
            now == original,
            "after `warren down` c1's resolv.conf is\n{now:?}\ninstead of\n{original:?}"
        );
        Ok(())
    });
}

#[test]
fn magic_dns_latency_at_1000_queries_per_second() {
    lab_test("magic-dns-load", |lab, bins| {
        let mut mesh = start(lab, bins, PolicySource::None)?;
        let key = mesh.key.secret.clone();
        let (a, _) = spawn_node(lab, &mut mesh, &key, &[], |_, _| Ok(()))?;
        let (b, b_ip) = spawn_node(lab, &mut mesh, &key, &[], |_, _| Ok(()))?;
        let (_, b_fqdn) = fqdn(lab, &mesh, &b)?;
        wait_dig(lab, &a, &b_fqdn, "A", |ans| ans.is_a(&[b_ip]))?;
        wait_dig(lab, &a, WWW, "A", |ans| ans.is_a(&[WWW_ADDR]))?;
        for (what, name) in [
            ("a peer's name (local answer)", b_fqdn.as_str()),
            ("an upstream name (forwarded)", WWW),
        ] {
            let r = services::dns_load(lab, labtool(), &a.ns, QUAD100, name, 1000, 5)?;
            eprintln!(
                "MagicDNS at 1,000 queries/s for 5 s, {what}: p50 {} ms, p99 {} ms, max {} ms, \
                 lost {} of {}, errors {}",
                r["p50_ms"], r["p99_ms"], r["max_ms"], r["lost"], r["sent"], r["errors"]
            );
            ensure!(
                r["answered"].as_u64().unwrap_or(0) > 0,
                "no answer at all under load: {r}"
            );
        }
        a.check_running()?;
        Ok(())
    });
}
