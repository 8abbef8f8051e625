//! `warren up --metrics-listen`: the real binaries in network namespaces, scraped from inside
//! the node's namespace while traffic flows. Run as root after `cargo build --bins`; without
//! root the test prints why it is skipped and passes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use warren_netns_tests::services::{HttpOutcome, dns_query, http_get};
use warren_netns_tests::tcp::{self, TcpOutcome};
use warren_netns_tests::{
    Binaries, ControlConfig, Lab, Mesh, Node, NodeOptions, PolicySource, TransferReport, wait_until,
};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

/// Generous deadline for anything the mesh should do "soon".
const SOON: Duration = Duration::from_secs(20);

/// Where every node serves metrics (inside its own namespace).
const METRICS_URL: &str = "http://127.0.0.1:9100/metrics";

/// Scrapes `node` from inside its namespace and parses the exposition text into
/// `series -> value`, labels sorted by name (`name{a="x",b="y"}`).
fn scrape(lab: &Lab, node: &Node) -> Result<BTreeMap<String, f64>> {
    let outcome = http_get(
        lab,
        Path::new(LABTOOL),
        &node.ns,
        METRICS_URL,
        Duration::from_secs(5),
    )?;
    let HttpOutcome::Reply(200, body) = outcome else {
        bail!("scraping {}: {outcome:?}", node.hostname);
    };
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("bad sample line {line:?}"))?;
        let series = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort_unstable();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_owned(),
        };
        out.insert(
            series,
            value.parse::<f64>().with_context(|| line.to_owned())?,
        );
    }
    Ok(out)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    m.get(series)
        .copied()
        .with_context(|| format!("no series {series} in {m:#?}"))
}

/// Scrapes `node` until `cond` holds on what it serves; returns that scrape.
fn scrape_until(
    lab: &Lab,
    node: &Node,
    what: &str,
    cond: impl Fn(&BTreeMap<String, f64>) -> Result<bool>,
) -> Result<BTreeMap<String, f64>> {
    let mut last = BTreeMap::new();
    wait_until(SOON, &format!("{}: {what}", node.hostname), || {
        node.check_running()?;
        last = scrape(lab, node)?;
        cond(&last)
    })
    .with_context(|| format!("last scrape of {}: {last:#?}", node.hostname))?;
    Ok(last)
}

/// Control with `settings` and two nodes serving metrics, each listing the other.
fn two_metrics_nodes(lab: &mut Lab, bins: &Binaries, settings: &ControlConfig) -> Result<Mesh> {
    let mut mesh = Mesh::start_with(lab, bins, 0, settings)?;
    let opts = NodeOptions::with_args(&["--metrics-listen", "127.0.0.1:9100"]);
    for _ in 0..2 {
        let (ns, addr) = mesh.add_host(lab)?;
        let secret = mesh.key.secret.clone();
        let node = mesh.spawn_node_on(lab, &ns, addr, &secret, &opts)?;
        mesh.nodes.push(node);
    }
    mesh.wait_full_mesh(lab, SOON)?;
    Ok(mesh)
}

#[test]
fn node_metrics_follow_traffic_path_and_handshakes() {
    warren_netns_tests::lab_test("metrics", LABTOOL, |lab, bins| {
        let mut mesh = two_metrics_nodes(lab, bins, &ControlConfig::default())?;
        let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
        let (p1, p2) = (
            format!("peer=\"{}\"", n1.hostname),
            format!("peer=\"{}\"", n2.hostname),
        );
        let a2 = n2.ipv4(lab)?;
        wait_until(SOON, "node1 pings node2", || {
            lab.ping(&n1.ns, IpAddr::V4(a2))
        })?;

        // One peer each; the ping completed a handshake and moved bytes both ways; on one
        // LAN the path becomes direct, and exactly one path series is set.
        let m1 = scrape_until(lab, n1, "direct to node2 after a handshake", |m| {
            Ok(
                get(m, &format!("warren_node_peer_path{{path=\"direct\",{p2}}}"))? == 1.0
                    && get(m, &format!("warren_node_peer_handshakes_total{{{p2}}}"))? >= 1.0,
            )
        })?;
        ensure!(get(&m1, "warren_node_peers")? == 1.0, "{m1:#?}");
        let paths: f64 = ["direct", "relay", "trying", "unreachable"]
            .iter()
            .map(|p| get(&m1, &format!("warren_node_peer_path{{path=\"{p}\",{p2}}}")))
            .sum::<Result<f64>>()?;
        ensure!(paths == 1.0, "path series of node2 sum to {paths}: {m1:#?}");
        ensure!(
            m1.contains_key(&format!("warren_node_peer_latency_seconds{{{p2}}}")),
            "no latency for a direct peer: {m1:#?}"
        );
        for series in ["rx_bytes", "tx_bytes"] {
            let v = get(&m1, &format!("warren_node_peer_{series}_total{{{p2}}}"))?;
            ensure!(v > 0.0, "{series} of node2 is {v} after a ping");
        }
        ensure!(
            get(&m1, &format!("warren_node_peer_filter_drops_total{{{p2}}}"))? == 0.0,
            "{m1:#?}"
        );
        for result in ["answered_locally", "forwarded", "servfail"] {
            let series = format!("warren_node_dns_queries_total{{result=\"{result}\"}}");
            ensure!(get(&m1, &series)? == 0.0, "{series}: {m1:#?}");
        }
        ensure!(
            get(&m1, "warren_node_derp_reconnects_total")? == 0.0,
            "{m1:#?}"
        );

        // 1 MB over TCP from node1 to node2: node1's tx towards node2 and node2's rx from
        // node1 count the tunnelled IP packets, so each grows by the payload plus the TCP/IP
        // headers (a few percent for ~1400-byte segments; a quarter is the bound).
        let rx_series = format!("warren_node_peer_rx_bytes_total{{{p1}}}");
        let m2 = scrape_until(lab, n2, "node1 sampled", |m| Ok(m.contains_key(&rx_series)))?;
        let tx_before = get(&m1, &format!("warren_node_peer_tx_bytes_total{{{p2}}}"))?;
        let rx_before = get(&m2, &format!("warren_node_peer_rx_bytes_total{{{p1}}}"))?;
        let bytes = 1_000_000u64;
        let (sent, received) = mesh.tcp_transfer(lab, 0, 1, bytes, Duration::from_secs(60))?;
        ensure!(
            sent == TransferReport::expected(bytes) && received == sent,
            "transfer: sent {sent:?}, received {received:?}"
        );
        let payload = bytes as f64;
        let in_range = |d: f64| d >= payload && d <= payload * 1.25;
        let m1 = scrape_until(lab, n1, "tx grew by the transfer", |m| {
            let d = get(m, &format!("warren_node_peer_tx_bytes_total{{{p2}}}"))? - tx_before;
            Ok(in_range(d))
        })?;
        let m2 = scrape_until(lab, n2, "rx grew by the transfer", |m| {
            let d = get(m, &format!("warren_node_peer_rx_bytes_total{{{p1}}}"))? - rx_before;
            Ok(in_range(d))
        })?;
        // Both ends counted the same packets (no loss on the LAN), once the sampler caught up
        // on both sides.
        let tx1 = get(&m1, &format!("warren_node_peer_tx_bytes_total{{{p2}}}"))?;
        let rx2 = get(&m2, &format!("warren_node_peer_rx_bytes_total{{{p1}}}"))?;
        println!(
            "1 MB transfer: node1 tx {tx1} B, node2 rx {rx2} B (before: {tx_before}, {rx_before})"
        );
        wait_until(
            SOON,
            "node1's tx to node2 equals node2's rx from node1",
            || {
                let tx = get(
                    &scrape(lab, n1)?,
                    &format!("warren_node_peer_tx_bytes_total{{{p2}}}"),
                )?;
                let rx = get(
                    &scrape(lab, n2)?,
                    &format!("warren_node_peer_rx_bytes_total{{{p1}}}"),
                )?;
                Ok(tx == rx)
            },
        )?;

        // MagicDNS: three questions answered from the netmap, and one for a name outside the
        // mesh that fails: forwarded to the host's resolver and timed out (SERVFAIL), or
        // refused at once when the node has no upstream; the lab reaches no DNS server.
        let quad100 = IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 100));
        let name = format!("{}.warren.internal", n2.hostname);
        for _ in 0..3 {
            let a = dns_query(lab, Path::new(LABTOOL), &n1.ns, quad100, &name, "A", SOON)?;
            ensure!(a.is_a(&[a2]), "{name}: {a:?}");
        }
        let www = "www.example.net";
        let a = dns_query(lab, Path::new(LABTOOL), &n1.ns, quad100, www, "A", SOON)?;
        ensure!(a.rcode == "SERVFAIL", "{www}: {a:?}");
        let dns = |result: &str| format!("warren_node_dns_queries_total{{result=\"{result}\"}}");
        let m1 = scrape_until(lab, n1, "the DNS queries counted", |m| {
            Ok(get(m, &dns("answered_locally"))? == 3.0
                && get(m, &dns("servfail"))? + get(m, &dns("no_upstream"))? == 1.0)
        })?;
        ensure!(
            get(&m1, &dns("forwarded"))? == get(&m1, &dns("servfail"))?,
            "only the failed query may have been forwarded: {m1:#?}"
        );
        for result in ["formerr", "dropped"] {
            ensure!(get(&m1, &dns(result))? == 0.0, "{result}: {m1:#?}");
        }

        // DERP: the home region's link is up; control (and its embedded relay) restarting
        // makes each node connect again, once.
        let links = |m: &BTreeMap<String, f64>| -> Vec<(String, f64)> {
            m.iter()
                .filter(|(k, _)| k.starts_with("warren_node_derp_connected{"))
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        let m1 = scrape_until(lab, n1, "a DERP link up", |m| {
            Ok(links(m).iter().any(|(_, v)| *v == 1.0))
        })?;
        let before = links(&m1);
        mesh.control.shutdown(SOON)?;
        mesh.control.restart(lab)?;
        let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
        for node in [n1, n2] {
            let m = scrape_until(lab, node, "DERP reconnected", |m| {
                Ok(get(m, "warren_node_derp_reconnects_total")? >= 1.0
                    && links(m).iter().all(|(_, v)| *v == 1.0))
            })?;
            ensure!(
                get(&m, "warren_node_derp_reconnects_total")? == 1.0,
                "{}: {m:#?}",
                node.hostname
            );
        }
        ensure!(
            links(&scrape(lab, n1)?) == before,
            "links changed: {before:?}"
        );

        // The listener answers only /metrics.
        let other = http_get(
            lab,
            Path::new(LABTOOL),
            &n1.ns,
            "http://127.0.0.1:9100/",
            Duration::from_secs(5),
        )?;
        ensure!(
            matches!(other, HttpOutcome::Reply(404, _)),
            "GET / answered {other:?}"
        );
        // It listens on loopback only: not reachable from the LAN.
        let lan = format!("http://{}:9100/metrics", n1.lan_addr);
        let from_lan = http_get(
            lab,
            Path::new(LABTOOL),
            &n2.ns,
            &lan,
            Duration::from_secs(2),
        )?;
        ensure!(
            !matches!(from_lan, HttpOutcome::Reply(..)),
            "reachable from the LAN: {from_lan:?}"
        );
        Ok(())
    });
}

/// Only node2 (the second node registered: 100.64.0.2) may open TCP port 22 on node1
/// (100.64.0.1); node1 may send node2 nothing.
const ONE_WAY: &str = r#"{
  "acls": [
    {"action": "accept", "src": ["100.64.0.2"], "proto": "tcp", "dst": ["100.64.0.1:22"]},
  ],
}
"#;

#[test]
fn filter_drops_count_each_denied_packet_against_its_sender() {
    warren_netns_tests::lab_test("metrics-filter", LABTOOL, |lab, bins| {
        let settings = ControlConfig {
            policy: PolicySource::File(ONE_WAY.to_owned()),
            ..ControlConfig::default()
        };
        let mesh = two_metrics_nodes(lab, bins, &settings)?;
        let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
        let (a1, a2) = (n1.ipv4(lab)?, n2.ipv4(lab)?);
        ensure!(
            (a1.octets()[3], a2.octets()[3]) == (1, 2),
            "the policy expects node1 at .1 and node2 at .2: {a1}, {a2}"
        );
        let p1 = format!(
            "warren_node_peer_filter_drops_total{{peer=\"{}\"}}",
            n1.hostname
        );
        // node2's SYN to node1's port 22 is allowed (nothing listens: a reset comes back); it
        // also brings up the WireGuard session, so the pings below wait for no handshake.
        let to22 = std::net::SocketAddr::from((a1, 22));
        wait_until(SOON, "node2 reaches node1's port 22", || {
            Ok(tcp::connect(
                lab,
                &mesh.bins().labtool,
                &n2.ns,
                to22,
                Duration::from_secs(2),
            )? == TcpOutcome::Refused)
        })?;
        let sampled = scrape_until(lab, n2, "node1 sampled", |m| Ok(m.contains_key(&p1)))?;
        ensure!(
            get(&sampled, &p1)? == 0.0,
            "drops before any denied packet: {sampled:#?}"
        );
        // Three echo requests from node1, each dropped by node2's filter.
        for i in 0..3 {
            ensure!(
                !lab.ping(&n1.ns, IpAddr::V4(a2))?,
                "ping {i} was answered though the policy allows node1 nothing"
            );
        }
        scrape_until(lab, n2, "three drops counted against node1", |m| {
            Ok(get(m, &p1)? == 3.0)
        })?;
        // None against node2 on node1's side: its one SYN was allowed. (node2 took the reset
        // as a reply, or the count above would be 4.)
        let p2 = format!(
            "warren_node_peer_filter_drops_total{{peer=\"{}\"}}",
            n2.hostname
        );
        let m1 = scrape_until(lab, n1, "node2 sampled", |m| Ok(m.contains_key(&p2)))?;
        ensure!(get(&m1, &p2)? == 0.0, "{m1:#?}");
        Ok(())
    });
}

/// Control and two nodes serving metrics, node `i` started with `args[i]` as well.
fn two_nodes_with(lab: &mut Lab, bins: &Binaries, args: [&[&str]; 2]) -> Result<Mesh> {
    let mut mesh = Mesh::start_with(lab, bins, 0, &ControlConfig::default())?;
    for extra in args {
        let mut all = vec!["--metrics-listen", "127.0.0.1:9100"];
        all.extend_from_slice(extra);
        let (ns, addr) = mesh.add_host(lab)?;
        let secret = mesh.key.secret.clone();
        let node = mesh.spawn_node_on(lab, &ns, addr, &secret, &NodeOptions::with_args(&all))?;
        mesh.nodes.push(node);
    }
    mesh.wait_full_mesh(lab, SOON)?;
    Ok(mesh)
}

/// Moves `bytes` from node `from` to node `to` and checks that every byte arrived as sent.
fn transfer_intact(mesh: &Mesh, lab: &mut Lab, from: usize, to: usize, bytes: u64) -> Result<()> {
    let (sent, received) = mesh.tcp_transfer(lab, from, to, bytes, Duration::from_secs(120))?;
    ensure!(
        sent == TransferReport::expected(bytes),
        "{from} -> {to}: sender report {sent:?}"
    );
    ensure!(
        received == sent,
        "{from} -> {to}: sent {sent:?} but the sink received {received:?}"
    );
    Ok(())
}

/// The tunnel MTU nodes run at by default.
const MTU: f64 = 1280.0;

#[test]
fn tun_offload_moves_64k_tcp_segments_intact_both_ways() {
    warren_netns_tests::lab_test("tun-offload", LABTOOL, |lab, bins| {
        let mesh = two_nodes_with(lab, bins, [&[], &[]])?;
        // Each node sends, so each reads whole TSO segments from its TUN device and each
        // writes coalesced ones; the bytes are checked end to end both ways.
        transfer_intact(&mesh, lab, 0, 1, 32_000_000)?;
        transfer_intact(&mesh, lab, 1, 0, 32_000_000)?;
        for node in &mesh.nodes {
            let m = scrape_until(lab, node, "TUN figures sampled", |m| {
                Ok(get(m, "warren_node_tun_largest_write_bytes")? > 0.0)
            })?;
            ensure!(
                get(&m, "warren_node_tun_offload")? == 1.0,
                "{}: no offload",
                node.hostname
            );
            let read = get(&m, "warren_node_tun_largest_read_bytes")?;
            let write = get(&m, "warren_node_tun_largest_write_bytes")?;
            // A 64 KB segment is 65,535 bytes of IP packet at most, split into MTU-sized
            // packets (their headers repeated) on the way in.
            ensure!(
                read >= 60_000.0,
                "{}: largest TUN read {read} bytes, want a whole 64 KB TSO segment",
                node.hostname
            );
            ensure!(
                (60_000.0..=65_535.0).contains(&write),
                "{}: largest TUN write {write} bytes, want a coalesced 64 KB segment",
                node.hostname
            );
        }
        Ok(())
    });
}

#[test]
fn without_tun_offload_or_threads_a_node_moves_single_packets_and_interoperates() {
    warren_netns_tests::lab_test("tun-no-offload", LABTOOL, |lab, bins| {
        // The first node runs as on a kernel without TUN offload (the same fallback a refused
        // TUNSETOFFLOAD takes), with its whole data path on one thread; the second has both.
        let mesh = two_nodes_with(
            lab,
            bins,
            [&["--tun-offload=false", "--data-threads=false"], &[]],
        )?;
        transfer_intact(&mesh, lab, 0, 1, 8_000_000)?;
        transfer_intact(&mesh, lab, 1, 0, 8_000_000)?;
        let plain = scrape_until(lab, &mesh.nodes[0], "TUN figures sampled", |m| {
            Ok(get(m, "warren_node_tun_largest_write_bytes")? > 0.0)
        })?;
        ensure!(get(&plain, "warren_node_tun_offload")? == 0.0, "{plain:#?}");
        for series in [
            "warren_node_tun_largest_read_bytes",
            "warren_node_tun_largest_write_bytes",
        ] {
            let v = get(&plain, series)?;
            ensure!(v > 0.0 && v <= MTU, "{series} {v}: want single packets");
        }
        let offload = scrape_until(lab, &mesh.nodes[1], "TUN figures sampled", |m| {
            Ok(get(m, "warren_node_tun_largest_read_bytes")? > MTU)
        })?;
        ensure!(
            get(&offload, "warren_node_tun_offload")? == 1.0,
            "{offload:#?}"
        );
        Ok(())
    });
}
