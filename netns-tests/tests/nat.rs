//! Self-tests of the NAT lab: every [`NatKind`] must map and filter UDP as its name says
//! (RFC 4787), observed with the labtool's UDP commands against an echo server on the public
//! server's two addresses. Needs root, iproute2, nftables and conntrack; not warren.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use warren_netns_tests::nat::{Filtering, Mapping, SERVER_ADDRS, host_port_range};
use warren_netns_tests::{Lab, NatKind, NatLab, Site, require_root, serial, udp};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

/// How long one probe target or one inbound datagram is waited for. Everything here is local,
/// so "nothing within this" means filtered.
const WAIT: Duration = Duration::from_millis(1500);

/// The echo server's endpoints: IP1:port1, IP2:port2, IP1:port2 (IP2:port1 stays free, to
/// send from it).
const ECHO_PORT: u16 = 3478;
const ECHO_PORT2: u16 = 3479;

/// A server port nothing listens on, used as the source of unsolicited datagrams.
const OTHER_PORT: u16 = 7000;

fn labtool() -> &'static Path {
    Path::new(LABTOOL)
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn echo_targets() -> [SocketAddr; 3] {
    [
        sa(SERVER_ADDRS[0], ECHO_PORT),
        sa(SERVER_ADDRS[1], ECHO_PORT2),
        sa(SERVER_ADDRS[0], ECHO_PORT2),
    ]
}

/// Runs `body` in a fresh lab with a NAT internet and an echo server on [`echo_targets`],
/// serially, if root. An error fails the test while the lab is alive (its drop prints logs).
fn nat_test(name: &str, body: impl FnOnce(&mut Lab, &mut NatLab) -> Result<()>) {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut lab = match Lab::new(name) {
        Ok(lab) => lab,
        Err(e) => panic!("cannot create the lab: {e:#}"),
    };
    let result = NatLab::new(&mut lab).and_then(|mut net| {
        let server = net.server_ns().to_owned();
        udp::start_echo(&mut lab, labtool(), &server, &echo_targets())?;
        body(&mut lab, &mut net)
    });
    if let Err(e) = result {
        panic!("{name} failed: {e:?}");
    }
}

/// What a host of a site experiences.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// `None`: no UDP reached the echo server at all.
    mapping: Option<Mapping>,
    filtering: Option<Filtering>,
}

/// Measures host `host` of `site`: mapping from local port `port` toward the three echo
/// endpoints, then filtering on local port `port + 1` after it sent to IP1:port1: does a
/// datagram from IP1:other-port reach it? From IP2:port1? And (control) the reply from
/// IP1:port1 itself?
fn observe(lab: &mut Lab, net: &NatLab, site: &Site, host: usize, port: u16) -> Result<Observed> {
    let h = site.host(host)?.clone();
    let targets = echo_targets();
    let mapped = udp::probe(lab, labtool(), &h.ns, port, &targets, WAIT)?;
    eprintln!("{} host {host} port {port}: mapped {mapped:?}", site.kind);
    if mapped.iter().all(Option::is_none) {
        return Ok(Observed {
            mapping: None,
            filtering: None,
        });
    }
    let mapped: Vec<SocketAddr> = mapped
        .into_iter()
        .zip(targets)
        .map(|(m, t)| m.with_context(|| format!("{t} did not answer while others did")))
        .collect::<Result<_>>()?;
    for m in &mapped {
        let IpAddr::V4(ip) = m.ip() else {
            bail!("mapped address {m} is not IPv4");
        };
        ensure!(
            site.public_addrs().contains(&ip),
            "mapped address {m} is not one of the site's public addresses {:?}",
            site.public_addrs()
        );
        if site.kind.is_public() {
            ensure!(
                *m == sa(h.addr, port),
                "a public host's address was translated to {m}"
            );
        }
    }
    let mapping = if mapped.iter().all(|m| *m == mapped[0]) {
        Mapping::EndpointIndependent
    } else if mapped[0] != mapped[1] && mapped[1] != mapped[2] && mapped[0] != mapped[2] {
        Mapping::EndpointDependent
    } else {
        bail!("mappings {mapped:?} are neither all equal nor all different");
    };

    let fport = port + 1;
    let server = net.server_ns().to_owned();
    let m = udp::probe(lab, labtool(), &h.ns, fport, &targets[..1], WAIT)?[0]
        .context("the echo server did not answer the filtering probe")?;
    let mut reaches = |from: SocketAddr| -> Result<bool> {
        let seen = udp::deliver(lab, labtool(), &h.ns, fport, &server, from, m, WAIT)?;
        eprintln!("{} from {from} to {m}: {seen:?}", site.kind);
        match seen {
            None => Ok(false),
            Some(s) if s == from => Ok(true),
            Some(s) => bail!("a datagram from {from} arrived as from {s}"),
        }
    };
    let other_port = reaches(sa(SERVER_ADDRS[0], OTHER_PORT))?;
    let other_ip = reaches(sa(SERVER_ADDRS[1], ECHO_PORT))?;
    let filtering = match (other_port, other_ip) {
        (true, true) => Filtering::EndpointIndependent,
        (true, false) => Filtering::AddressDependent,
        (false, false) => Filtering::AddressAndPortDependent,
        (false, true) => bail!("admitted another address but not another port"),
    };
    // The control: the endpoint the host sent to always gets through.
    let control = udp::send_and_listen(lab, labtool(), &h.ns, fport, targets[0], WAIT)?;
    ensure!(
        control == Some(targets[0]),
        "the echo's reply to a listener on port {fport} arrived as {control:?}"
    );
    Ok(Observed {
        mapping: Some(mapping),
        filtering: Some(filtering),
    })
}

/// The behaviour `kind` promises.
fn promised(kind: NatKind) -> Observed {
    Observed {
        mapping: kind.mapping(),
        filtering: kind.filtering(),
    }
}

fn behaves_as_named(kind: NatKind) {
    nat_test(&format!("nat-{kind}"), |lab, net| {
        let site = net.add_site(lab, kind, false, 1)?;
        let seen = observe(lab, net, &site, 0, 40_000)?;
        ensure!(
            seen == promised(kind),
            "{kind} behaves as {seen:?}, promised {:?}",
            promised(kind)
        );
        Ok(())
    });
}

#[test]
fn public_is_eim_eif() {
    behaves_as_named(NatKind::Public);
}

#[test]
fn public_firewall_admits_replies_only() {
    behaves_as_named(NatKind::PublicFirewall);
}

#[test]
fn full_cone_is_eim_eif() {
    behaves_as_named(NatKind::FullCone);
}

#[test]
fn restricted_is_eim_adf() {
    behaves_as_named(NatKind::Restricted);
}

#[test]
fn port_restricted_is_eim_apdf() {
    behaves_as_named(NatKind::PortRestricted);
}

#[test]
fn symmetric_is_edm_apdf() {
    behaves_as_named(NatKind::Symmetric);
}

#[test]
fn udp_blocked_passes_tcp_only() {
    nat_test("nat-udp-blocked", |lab, net| {
        let site = net.add_site(lab, NatKind::UdpBlocked, false, 1)?;
        let seen = observe(lab, net, &site, 0, 40_000)?;
        ensure!(
            seen == promised(NatKind::UdpBlocked),
            "UDP passed: {seen:?}"
        );
        // TCP to the server still works, source-NATed to the WAN address.
        let to = sa(SERVER_ADDRS[0], 8443);
        let server = net.server_ns().to_owned();
        let sink = lab.spawn(
            &server,
            "tcp-sink",
            LABTOOL,
            ["tcp-sink", "--listen", &to.to_string()],
        )?;
        let host = site.host(0)?;
        lab.run_ok(
            &host.ns,
            LABTOOL,
            ["tcp-send", "--to", &to.to_string(), "--bytes", "1000"],
        )?;
        let status = sink
            .wait_exit(Duration::from_secs(10))
            .context("tcp-sink did not finish")?;
        ensure!(status.success(), "tcp-sink: {status}: {}", sink.stderr());
        ensure!(
            sink.stdout().contains("\"bytes\":1000"),
            "tcp-sink got {}",
            sink.stdout()
        );
        Ok(())
    });
}

/// Two hosts behind one router use the same local port; `host 1` then sends to `host 0`'s
/// public mapping. Returns what host 0 saw (`None`: nothing arrived) and host 1's mapping.
fn hairpin_case(
    lab: &mut Lab,
    net: &mut NatLab,
    kind: NatKind,
    hairpin: bool,
) -> Result<(Option<SocketAddr>, SocketAddr, Site)> {
    let site = net.add_site(lab, kind, hairpin, 2)?;
    let port = 41_641;
    let s1 = echo_targets()[0];
    let (h0, h1) = (site.host(0)?.clone(), site.host(1)?.clone());
    let m0 = udp::probe(lab, labtool(), &h0.ns, port, &[s1], WAIT)?[0].context("h0 probe")?;
    let m1 = udp::probe(lab, labtool(), &h1.ns, port, &[s1], WAIT)?[0].context("h1 probe")?;
    ensure!(
        m0 != m1,
        "two hosts sending from the same port share the mapping {m0}"
    );
    ensure!(
        m0.ip() == m1.ip(),
        "one router, two public addresses: {m0} {m1}"
    );
    for (i, m) in [m0, m1].iter().enumerate() {
        let (lo, hi) = host_port_range(i)?;
        ensure!(
            (lo..=hi).contains(&m.port()),
            "host {i} mapped to {m}, outside its range {lo}-{hi}"
        );
    }
    let from = sa(Ipv4Addr::UNSPECIFIED, port);
    let seen = udp::deliver(lab, labtool(), &h0.ns, port, &h1.ns, from, m0, WAIT)?;
    eprintln!("{kind} hairpin {hairpin}: h1 -> {m0} arrived as {seen:?} (h1 maps to {m1})");
    Ok((seen, m1, site))
}

fn hairpin_on(kind: NatKind) {
    nat_test(&format!("hairpin-on-{kind}"), |lab, net| {
        let (seen, m1, _) = hairpin_case(lab, net, kind, true)?;
        let seen = seen.context("no hairpinned datagram arrived")?;
        if kind.mapping() == Some(Mapping::EndpointIndependent) {
            // The receiver sees the sender's public mapping, as anyone outside would.
            ensure!(
                seen == m1,
                "hairpinned datagram arrived as {seen}, not {m1}"
            );
        } else {
            ensure!(
                seen.ip() == m1.ip(),
                "hairpinned datagram arrived as {seen}"
            );
        }
        Ok(())
    });
}

fn hairpin_off(kind: NatKind) {
    nat_test(&format!("hairpin-off-{kind}"), |lab, net| {
        let (seen, _, site) = hairpin_case(lab, net, kind, false)?;
        ensure!(
            seen.is_none(),
            "without hairpinning a datagram arrived from {seen:?}"
        );
        // Control: the same listener mechanism works for a reply from outside.
        let h0 = site.host(0)?;
        let s1 = echo_targets()[0];
        let control = udp::send_and_listen(lab, labtool(), &h0.ns, 41_641, s1, WAIT)?;
        ensure!(control == Some(s1), "control reply arrived as {control:?}");
        Ok(())
    });
}

#[test]
fn hairpin_on_full_cone() {
    hairpin_on(NatKind::FullCone);
}

#[test]
fn hairpin_on_port_restricted() {
    hairpin_on(NatKind::PortRestricted);
}

#[test]
fn hairpin_on_symmetric() {
    hairpin_on(NatKind::Symmetric);
}

#[test]
fn hairpin_off_full_cone() {
    hairpin_off(NatKind::FullCone);
}

#[test]
fn hairpin_off_port_restricted() {
    hairpin_off(NatKind::PortRestricted);
}

/// Two hosts of a full cone site on the same local port, talking to different servers (Linux
/// alone would give both the same external port then): each is reachable from anywhere at its
/// own mapping, and only there.
#[test]
fn full_cone_two_hosts_same_port_keep_their_own_mappings() {
    nat_test("cone-two-hosts", |lab, net| {
        let site = net.add_site(lab, NatKind::FullCone, false, 2)?;
        let port = 41_641;
        let server = net.server_ns().to_owned();
        let mut mapped = Vec::new();
        for (h, target) in site.hosts.iter().zip(echo_targets()) {
            mapped.push(
                udp::probe(lab, labtool(), &h.ns, port, &[target], WAIT)?[0].context("probe")?,
            );
        }
        ensure!(mapped[0] != mapped[1], "shared mapping {mapped:?}");
        for (i, h) in site.hosts.iter().enumerate() {
            let from = sa(SERVER_ADDRS[1], OTHER_PORT + u16::try_from(i)?);
            let seen = udp::deliver(lab, labtool(), &h.ns, port, &server, from, mapped[i], WAIT)?;
            ensure!(seen == Some(from), "host {i} at {}: {seen:?}", mapped[i]);
            // The other host's mapping does not lead here.
            let other = mapped[1 - i];
            let seen = udp::deliver(lab, labtool(), &h.ns, port, &server, from, other, WAIT)?;
            ensure!(seen.is_none(), "host {i} received what was sent to {other}");
        }
        Ok(())
    });
}

/// `set_kind` mid-session: port-restricted -> symmetric -> full cone, then public ->
/// public+firewall, each observed afresh (the conntrack flush forgets old mappings).
#[test]
fn set_kind_changes_behaviour_mid_session() {
    nat_test("set-kind", |lab, net| {
        let mut site = net.add_site(lab, NatKind::PortRestricted, false, 1)?;
        let mut port = 40_000;
        let steps = [
            NatKind::PortRestricted,
            NatKind::Symmetric,
            NatKind::FullCone,
        ];
        for kind in steps {
            if site.kind != kind {
                net.set_kind(lab, &mut site, kind)?;
            }
            // The same local port as before the change, then fresh ones.
            let seen = observe(lab, net, &site, 0, 40_000)?;
            ensure!(seen == promised(kind), "after set_kind({kind}): {seen:?}");
            port += 10;
            let seen = observe(lab, net, &site, 0, port)?;
            ensure!(seen == promised(kind), "after set_kind({kind}): {seen:?}");
        }
        ensure!(
            net.set_kind(lab, &mut site, NatKind::Public).is_err(),
            "a NAT site became public"
        );

        let mut public = net.add_site(lab, NatKind::Public, false, 1)?;
        let seen = observe(lab, net, &public, 0, 40_100)?;
        ensure!(seen == promised(NatKind::Public), "public: {seen:?}");
        net.set_kind(lab, &mut public, NatKind::PublicFirewall)?;
        let seen = observe(lab, net, &public, 0, 40_200)?;
        ensure!(
            seen == promised(NatKind::PublicFirewall),
            "public+firewall: {seen:?}"
        );
        Ok(())
    });
}

/// `block_udp_between` drops UDP between two sites only; TCP still passes; unblocking restores.
#[test]
fn block_udp_between_two_sites() {
    nat_test("block-udp", |lab, net| {
        let a = net.add_site(lab, NatKind::Public, false, 1)?;
        let b = net.add_site(lab, NatKind::PortRestricted, false, 1)?;
        let (ha, hb) = (a.host(0)?.clone(), b.host(0)?.clone());
        let echo_a = sa(ha.addr, 5000);
        udp::start_echo(lab, labtool(), &ha.ns, &[echo_a])?;
        let s1 = echo_targets()[0];
        let wan = b.wan_addr.context("wan")?;

        let before = udp::probe(lab, labtool(), &hb.ns, 40_000, &[echo_a, s1], WAIT)?;
        ensure!(
            before
                .iter()
                .all(|m| m.is_some_and(|m| m.ip() == IpAddr::V4(wan))),
            "before blocking: {before:?}"
        );
        net.block_udp_between(lab, &a, &b)?;
        let during = udp::probe(lab, labtool(), &hb.ns, 40_010, &[echo_a, s1], WAIT)?;
        ensure!(
            during[0].is_none() && during[1].is_some(),
            "while blocked: {during:?}"
        );
        // TCP between the two sites still passes.
        let tcp = sa(ha.addr, 8443);
        let sink = lab.spawn(
            &ha.ns,
            "tcp-sink",
            LABTOOL,
            ["tcp-sink", "--listen", &tcp.to_string()],
        )?;
        lab.run_ok(
            &hb.ns,
            LABTOOL,
            ["tcp-send", "--to", &tcp.to_string(), "--bytes", "1000"],
        )?;
        let status = sink
            .wait_exit(Duration::from_secs(10))
            .context("tcp-sink did not finish")?;
        ensure!(status.success(), "tcp-sink: {status}");
        net.unblock_udp_between(lab, &a, &b)?;
        let after = udp::probe(lab, labtool(), &hb.ns, 40_020, &[echo_a], WAIT)?;
        ensure!(after[0].is_some(), "after unblocking: {after:?}");
        Ok(())
    });
}
