//! Failover across NATs with the real binaries (see [`NatMesh`] for the layout):
//! a direct path that loses UDP moves to DERP without breaking a TCP connection and comes back
//! when UDP does; relay-only nodes survive a restart of control (and of its embedded DERP); a
//! NAT that turns symmetric mid-session moves the pair to what PROTOCOLS.md's table predicts.
//! Every measured figure is printed with `eprintln!`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use warren_netns_tests::natmesh::{NatMesh, PingStream, path_to, unix_now, wait_up};
use warren_netns_tests::{Binaries, Lab, NatKind, Node, TransferReport, wait_until};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

/// Anything the mesh should do "soon".
const SOON: Duration = Duration::from_secs(30);
/// The most traffic may stop when the direct path loses UDP (PROTOCOLS.md: heartbeat 3 s, a
/// missed heartbeat ends trust after 2 s).
const FAILOVER_LIMIT: Duration = Duration::from_secs(5);
/// How long a pair is watched to stay on the relay.
const RELAY_HOLD: Duration = Duration::from_secs(8);
const PING_WAIT: Duration = Duration::from_millis(500);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn nat_test(name: &str, body: impl FnOnce(&mut Lab, &Binaries) -> Result<()>) {
    warren_netns_tests::lab_test(name, LABTOOL, body);
}

fn is(path: &Option<String>, kind: &str) -> bool {
    path.as_deref().is_some_and(|p| p.starts_with(kind))
}

/// Waits until both nodes report a path of `kind` ("direct" or "relay") to each other while
/// a ping a -> b gets through; returns how long it took.
fn wait_path(
    lab: &Lab,
    a: &Node,
    aa: Ipv4Addr,
    b: &Node,
    ba: Ipv4Addr,
    kind: &str,
    deadline: Duration,
) -> Result<Duration> {
    let mut last = (None, None);
    wait_until(
        deadline,
        &format!("both nodes report a {kind} path"),
        || {
            let ok = lab.ping_wait(&a.ns, v4(ba), PING_WAIT)?;
            last = (path_to(lab, a, ba)?, path_to(lab, b, aa)?);
            Ok(ok && is(&last.0, kind) && is(&last.1, kind))
        },
    )
    .with_context(|| format!("last paths {last:?}"))
}

/// Watches the pair for [`RELAY_HOLD`]: pings both ways must succeed and both sides must keep
/// reporting the relay.
fn hold_relay(lab: &Lab, a: &Node, aa: Ipv4Addr, b: &Node, ba: Ipv4Addr) -> Result<()> {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < RELAY_HOLD {
        let (from, to) = if n.is_multiple_of(2) {
            (a, ba)
        } else {
            (b, aa)
        };
        ensure!(
            lab.ping_wait(&from.ns, v4(to), Duration::from_secs(2))?,
            "{} -> {to} failed {:.1} s into the relay hold",
            from.hostname,
            start.elapsed().as_secs_f64()
        );
        n += 1;
        let paths = (path_to(lab, a, ba)?, path_to(lab, b, aa)?);
        ensure!(
            is(&paths.0, "relay") && is(&paths.1, "relay"),
            "left the relay {:.1} s after reaching it: {paths:?}",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Two nodes on new sites of kinds `ka` and `kb`, up and seeing each other.
fn pair(
    lab: &mut Lab,
    mesh: &mut NatMesh,
    ka: NatKind,
    kb: NatKind,
) -> Result<(
    warren_netns_tests::Site,
    Node,
    Ipv4Addr,
    warren_netns_tests::Site,
    Node,
    Ipv4Addr,
)> {
    let sa = mesh.net.add_site(lab, ka, false, 1)?;
    let sb = mesh.net.add_site(lab, kb, false, 1)?;
    let a = mesh.spawn_node(lab, &sa, 0, "a")?;
    let b = mesh.spawn_node(lab, &sb, 0, "b")?;
    let aa = wait_up(lab, &a, 1, SOON)?;
    let ba = wait_up(lab, &b, 1, SOON)?;
    Ok((sa, a, aa, sb, b, ba))
}

#[test]
fn direct_path_fails_over_to_derp_and_back_under_tcp() {
    nat_test("failover-block-udp", |lab, bins| {
        let mut mesh = NatMesh::start(lab, bins)?;
        let (sa, a, aa, sb, b, ba) =
            pair(lab, &mut mesh, NatKind::PortRestricted, NatKind::FullCone)?;
        let took = wait_path(lab, &a, aa, &b, ba, "direct", SOON)?;
        eprintln!("direct path after {:.2} s of pinging", took.as_secs_f64());

        // A long TCP transfer a -> b and a stream of pings b -> a, both over the mesh.
        let bytes: u64 = 400_000_000;
        let target = SocketAddr::from((ba, 5201)).to_string();
        // tcp-send retries its connect until the sink listens.
        let sink = lab.spawn(
            &b.ns,
            "tcp-sink",
            &bins.labtool,
            ["tcp-sink", "--listen", &target, "--timeout-secs", "120"],
        )?;
        let stream = PingStream::start(lab, &b.ns, aa, Duration::from_millis(200))?;
        let sender = lab.spawn(
            &a.ns,
            "tcp-send",
            &bins.labtool,
            [
                "tcp-send",
                "--to",
                &target,
                "--bytes",
                &bytes.to_string(),
                "--timeout-secs",
                "240",
            ],
        )?;
        let t0 = unix_now();
        wait_until(SOON, "the ping stream gets 10 replies", || {
            Ok(stream.replies_after(t0) >= 10)
        })?;
        ensure!(
            sender.is_running(),
            "the transfer finished before UDP was blocked ({}): use more bytes",
            sender.stdout()
        );

        // UDP between the two sites stops.
        let blocked_at = unix_now();
        let block = Instant::now();
        mesh.net.block_udp_between(lab, &sa, &sb)?;
        let to_relay = wait_path(lab, &a, aa, &b, ba, "relay", SOON)?;
        wait_until(
            SOON,
            "the ping stream gets 10 replies after the block",
            || Ok(stream.replies_after(blocked_at) >= 10),
        )?;
        let gap = stream
            .longest_gap(blocked_at, unix_now())
            .context("no ping reply before the block")?;
        eprintln!(
            "FAILOVER: UDP blocked -> both sides report relay after {:.2} s; longest gap in \
             200 ms pings {:.2} s (limit {:?})",
            to_relay.as_secs_f64(),
            gap.as_secs_f64(),
            FAILOVER_LIMIT
        );
        ensure!(
            gap < FAILOVER_LIMIT,
            "traffic stopped for {gap:?} when UDP was blocked"
        );
        ensure!(
            sender.is_running() || sender.try_status().is_some_and(|s| s.success()),
            "the TCP transfer failed during failover: {}",
            sender.stderr()
        );
        let relay_rx = sink_progress(&sink);

        // UDP comes back: the pair returns to direct.
        let unblocked_at = unix_now();
        let unblock = Instant::now();
        mesh.net.unblock_udp_between(lab, &sa, &sb)?;
        let back = wait_path(lab, &a, aa, &b, ba, "direct", Duration::from_secs(90))?;
        let gap_back = stream.longest_gap(unblocked_at, unix_now());
        eprintln!(
            "RECOVERY: UDP unblocked -> direct again after {:.2} s (longest ping gap meanwhile \
             {:?}); blocked for {:.1} s in all{relay_rx}",
            back.as_secs_f64(),
            gap_back,
            (unblock - block).as_secs_f64()
        );

        // The TCP connection survived both switches and delivered every byte intact.
        let status = sender
            .wait_exit(Duration::from_secs(240))
            .context("tcp-send did not finish")?;
        ensure!(
            status.success(),
            "tcp-send failed ({status}): {}",
            sender.stderr()
        );
        let sent = TransferReport::parse(&sender.stdout())?;
        let status = sink
            .wait_exit(Duration::from_secs(20))
            .context("tcp-sink did not finish")?;
        ensure!(
            status.success(),
            "tcp-sink failed ({status}): {}",
            sink.stderr()
        );
        let got = TransferReport::parse(&sink.stdout())?;
        ensure!(
            sent == TransferReport::expected(bytes),
            "sender report {sent:?}"
        );
        ensure!(got == sent, "sent {sent:?}, the sink received {got:?}");
        eprintln!(
            "TCP: {bytes} bytes arrived intact in {:.1} s across direct -> relay -> direct",
            unix_now() - t0
        );
        stream.stop();
        Ok(())
    });
}

fn sink_progress(sink: &warren_netns_tests::ProcHandle) -> String {
    if sink.is_running() {
        String::new()
    } else {
        format!(" (the sink had already finished: {})", sink.stdout().trim())
    }
}

#[test]
fn relay_only_nodes_recover_from_control_restart() {
    nat_test("failover-control-restart", |lab, bins| {
        let mut mesh = NatMesh::start(lab, bins)?;
        let (_sa, a, aa, _sb, b, ba) =
            pair(lab, &mut mesh, NatKind::UdpBlocked, NatKind::Symmetric)?;
        let took = wait_path(lab, &a, aa, &b, ba, "relay", SOON)?;
        eprintln!("relay path after {:.2} s", took.as_secs_f64());
        hold_relay(lab, &a, aa, &b, ba)?;

        let down = Instant::now();
        mesh.control.shutdown(Duration::from_secs(10))?;
        // With its DERP gone, a relay-only pair has no path at all.
        wait_until(
            SOON,
            "pings stop while control and its DERP are down",
            || Ok(!lab.ping_wait(&a.ns, v4(ba), PING_WAIT)?),
        )?;
        wait_until(SOON, "both nodes notice control is gone", || {
            Ok(!a.status(lab)?.control_connected && !b.status(lab)?.control_connected)
        })?;
        mesh.control.restart(lab)?;
        let ready = Instant::now();
        let recovered = wait_until(Duration::from_secs(60), "a pings b again", || {
            lab.ping_wait(&a.ns, v4(ba), PING_WAIT)
        })?;
        wait_until(SOON, "b pings a again", || {
            lab.ping_wait(&b.ns, v4(aa), PING_WAIT)
        })?;
        eprintln!(
            "CONTROL RESTART: control (and DERP) down {:.1} s; pings resume {:.2} s after it \
             was ready again",
            (ready - down).as_secs_f64(),
            recovered.as_secs_f64()
        );
        wait_path(lab, &a, aa, &b, ba, "relay", SOON)?;
        hold_relay(lab, &a, aa, &b, ba)?;
        Ok(())
    });
}

/// `a` starts port-restricted; it turns symmetric mid-session. Against a port-restricted `b`
/// the pair must end up relayed; against a full cone `b`, direct again.
fn nat_turns_symmetric(name: &str, other: NatKind) {
    nat_test(name, |lab, bins| {
        let mut mesh = NatMesh::start(lab, bins)?;
        let (mut sa, a, aa, _sb, b, ba) = pair(lab, &mut mesh, NatKind::PortRestricted, other)?;
        let took = wait_path(lab, &a, aa, &b, ba, "direct", SOON)?;
        eprintln!(
            "PortRestricted x {other}: direct after {:.2} s",
            took.as_secs_f64()
        );

        let before = path_to(lab, &b, aa)?;
        mesh.net.set_kind(lab, &mut sa, NatKind::Symmetric)?;
        if NatKind::direct_expected(NatKind::Symmetric, other) {
            // The old mapping is gone: traffic must find the new one.
            let took = wait_path(lab, &a, aa, &b, ba, "direct", Duration::from_secs(60))?;
            let ep = path_to(lab, &b, aa)?;
            ensure!(
                ep != before,
                "{} still uses {before:?}, a mapping the NAT forgot",
                b.hostname
            );
            eprintln!(
                "SET_KIND: Symmetric x {other}: direct again after {:.2} s via {ep:?}",
                took.as_secs_f64()
            );
        } else {
            let took = wait_path(lab, &a, aa, &b, ba, "relay", SOON)?;
            eprintln!(
                "SET_KIND: Symmetric x {other}: relay after {:.2} s",
                took.as_secs_f64()
            );
            hold_relay(lab, &a, aa, &b, ba)?;
        }
        Ok(())
    });
}

#[test]
fn port_restricted_turning_symmetric_goes_to_relay() {
    nat_turns_symmetric("set-kind-portr", NatKind::PortRestricted);
}

#[test]
fn port_restricted_turning_symmetric_stays_direct_with_full_cone() {
    nat_turns_symmetric("set-kind-cone", NatKind::FullCone);
}
