//! Exit nodes (issue 9): a client sends its internet traffic through an exit node the policy
//! lets it use, while its own control, DERP, STUN and WireGuard traffic goes direct; a client
//! the policy does not allow neither sees the exit node offered nor gets through it, until a
//! live policy change grants it.
//!
//! Topology: the mesh LAN 10.77.0.0/24 (control, with its embedded DERP, at 10.77.0.1, nodes at
//! .11, .12, …); the exit node also sits on the "internet" ([`Internet`]) as 198.51.100.1,
//! where a web server answers at 198.51.100.80. No other namespace has a route to it. Run as
//! root after `cargo build --bins`; without root every test prints why it is skipped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use warren_netns_tests::services::{
    self, BYPASS_MARK, ECHO_PORT, HttpOutcome, Internet, SOON, peer_at, route_dev, route_get,
    spawn_node, wait_status,
};
use warren_netns_tests::{
    Binaries, ControlConfig, Lab, Mesh, Node, PolicyEdit, PolicySource, udp, wait_until,
    wait_until_every,
};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

fn lab_test(name: &str, body: impl FnOnce(&mut Lab, &Binaries) -> Result<()>) {
    warren_netns_tests::lab_test(name, LABTOOL, body);
}

fn labtool() -> &'static Path {
    Path::new(LABTOOL)
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// What a node logs each time its map stream comes up, and when it goes down (as in the
/// policy tests).
const STREAM_UP: &str = "control connected";
const STREAM_DOWN: &str = "control stream down";
/// What a node logs when its DERP connection breaks.
const DERP_LOST: &str = "DERP connection lost";

/// One GET of the web server from `node`.
fn fetch(lab: &Lab, node: &Node, timeout: Duration) -> Result<HttpOutcome> {
    services::http_get(lab, labtool(), &node.ns, &Internet::url(), timeout)
}

/// Waits until `node` fetches the web server's page; returns how long it took (GETs back to
/// back, each waiting up to 1 s). On failure the message holds the routing and firewall state
/// of the client and of every namespace in `also` (the exit node).
fn wait_fetch(lab: &Lab, node: &Node, also: &[&Node]) -> Result<Duration> {
    let mut last = None;
    wait_until_every(
        SOON,
        Duration::ZERO,
        &format!(
            "{} fetches {} through the exit node",
            node.hostname,
            Internet::url()
        ),
        || {
            node.check_running()?;
            let got = fetch(lab, node, Duration::from_secs(1))?;
            let ok = got.is_ok_with(Internet::BODY);
            last = Some(got);
            Ok(ok)
        },
    )
    .with_context(|| {
        let mut text = format!("last outcome {last:?}\n");
        for n in std::iter::once(node).chain(also.iter().copied()) {
            text.push_str(&format!("{} ({}):\n", n.hostname, n.ns));
            text.push_str(&services::diagnose(lab, &n.ns));
        }
        text
    })
}

/// Three GETs from `node`, none of which may get a reply.
fn ensure_no_fetch(lab: &Lab, node: &Node, why: &str) -> Result<()> {
    for i in 0..3 {
        let got = fetch(lab, node, Duration::from_secs(1))?;
        ensure!(
            !matches!(got, HttpOutcome::Reply(..)),
            "GET {i} from {} reached the web server ({got:?}), but {why}",
            node.hostname
        );
    }
    Ok(())
}

/// The exit node: a node also on the internet as 198.51.100.`n`, advertising itself as exit
/// node.
fn exit_node(
    lab: &mut Lab,
    mesh: &mut Mesh,
    internet: &Internet,
    key: &str,
    n: u8,
) -> Result<(Node, Ipv4Addr)> {
    spawn_node(lab, mesh, key, &["--advertise-exit-node"], |lab, ns| {
        internet.attach_exit(lab, ns, n)?;
        Ok(())
    })
}

/// `warren-control policy explain SRC DST --exit-node EXIT` (JSON): the first decision.
fn explain_exit(lab: &Lab, mesh: &Mesh, src: Ipv4Addr, dst: &str, exit: &str) -> Result<Value> {
    let out = mesh.control.admin_ok(
        lab,
        [
            "policy",
            "explain",
            &src.to_string(),
            dst,
            "--exit-node",
            exit,
        ],
    )?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("`policy explain` printed non-JSON: {out}"))?;
    v["decisions"]
        .as_array()
        .and_then(|d| d.first())
        .cloned()
        .with_context(|| format!("no decisions in {v}"))
}

/// Own traffic stays direct: control's address, looked up with the bypass mark the node's own
/// sockets carry, goes out of `eth0`, not into the tunnel, while unmarked internet traffic goes
/// into the tunnel.
fn ensure_own_traffic_direct(lab: &Lab, node: &Node) -> Result<()> {
    let control = v4(Mesh::CONTROL_ADDR);
    let marked = route_get(lab, &node.ns, control, Some(BYPASS_MARK))?;
    ensure!(
        route_dev(&marked) == Some("eth0"),
        "{}'s own traffic to control (mark {BYPASS_MARK:#x}) is routed {marked:?}",
        node.hostname
    );
    let web = route_get(lab, &node.ns, v4(Internet::WEB), None)?;
    ensure!(
        route_dev(&web) == Some("warren0"),
        "{}'s internet traffic is routed {web:?}, not into the tunnel",
        node.hostname
    );
    Ok(())
}

// ----- 1. Policy decides who may use the exit node -----

/// alice may use exit nodes (autogroup:internet); alice and bob may reach the exit node
/// itself, so both see it as a peer, but only alice may route through it. `tag:exit` nodes
/// are approved as exit nodes automatically.
const EXIT_POLICY: &str = r#"{
  "tagOwners": {"tag:exit": ["lab@"]},
  "autoApprovers": {"exitNode": ["tag:exit"]},
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["autogroup:internet:*"]},
    {"action": "accept", "src": ["alice@", "bob@"], "dst": ["tag:exit:*"]},
  ],
}
"#;

/// [`EXIT_POLICY`] with bob allowed the internet too.
const EXIT_POLICY_BOB: &str = r#"{
  "tagOwners": {"tag:exit": ["lab@"]},
  "autoApprovers": {"exitNode": ["tag:exit"]},
  "acls": [
    {"action": "accept", "src": ["alice@", "bob@"], "dst": ["autogroup:internet:*"]},
    {"action": "accept", "src": ["alice@", "bob@"], "dst": ["tag:exit:*"]},
  ],
}
"#;

#[test]
fn exit_node_follows_policy_and_own_traffic_stays_direct() {
    lab_test("exit-policy", |lab, bins| {
        let settings = ControlConfig {
            policy: PolicySource::File(EXIT_POLICY.to_owned()),
            ..ControlConfig::default()
        };
        let mut mesh = Mesh::start_with(lab, bins, 0, &settings)?;
        let internet = Internet::build(lab, labtool())?;
        let exit_key = mesh.control.create_preauth_key(
            lab,
            &mesh.user,
            &["--reusable", "--tags", "tag:exit"],
        )?;
        let mut keys = Vec::new();
        for user in ["alice", "bob"] {
            mesh.control.create_user(lab, user)?;
            keys.push(
                mesh.control
                    .create_preauth_key(lab, user, &["--reusable"])?,
            );
        }
        let (exit, exit_ip) = exit_node(lab, &mut mesh, &internet, &exit_key.secret, 1)?;
        let (alice, alice_ip) = spawn_node(lab, &mut mesh, &keys[0].secret, &[], |_, _| Ok(()))?;
        let (bob, bob_ip) = spawn_node(lab, &mut mesh, &keys[1].secret, &[], |_, _| Ok(()))?;
        let exit_name = exit.status(lab)?.name;

        // Approved automatically, both families.
        wait_status(
            lab,
            &exit,
            "approved as exit node (0.0.0.0/0 and ::/0)",
            |s| {
                ["0.0.0.0/0", "::/0"]
                    .iter()
                    .all(|r| s.approved_routes.iter().any(|a| a == r))
            },
        )?;
        // Without an exit node in use, the internet is unreachable from the clients.
        ensure!(
            fetch(lab, &alice, Duration::from_secs(1))? == HttpOutcome::Unreachable,
            "alice reaches the internet without an exit node"
        );

        // alice is offered it; bob sees the node but not as an exit node.
        wait_status(lab, &alice, "offered the exit node", |s| {
            s.exit_nodes == [exit_name.as_str()]
                && s.peer_with_addr(v4(exit_ip)).is_some_and(|p| p.exit_node)
        })?;
        let s = wait_status(lab, &bob, "lists the exit node as a peer", |s| {
            s.peer_with_addr(v4(exit_ip)).is_some()
        })?;
        ensure!(
            s.exit_nodes.is_empty() && !peer_at(&s, exit_ip)?.exit_node,
            "bob, whose policy lacks autogroup:internet, is offered the exit node: {}",
            s.raw
        );

        // `policy explain` agrees.
        let web = format!("{}:80", Internet::WEB);
        let d = explain_exit(lab, &mesh, alice_ip, &web, &exit_name)?;
        ensure!(
            d["allowed"] == true,
            "explain: alice may not use the exit node? {d}"
        );
        let d = explain_exit(lab, &mesh, bob_ip, &web, &exit_name)?;
        ensure!(
            d["allowed"] == false,
            "explain: bob may use the exit node? {d}"
        );

        // alice uses it, live, without her control connection going down.
        let connects = alice.proc().stderr().matches(STREAM_UP).count();
        let derp_losses = alice.proc().stderr().matches(DERP_LOST).count();
        let set_at = Instant::now();
        alice.set_exit_node(lab, &exit_name)?;
        wait_status(lab, &alice, "uses the exit node", |s| {
            s.exit_node.as_deref() == Some(exit_name.as_str())
        })?;
        let took = wait_fetch(lab, &alice, &[&exit])?;
        eprintln!(
            "`warren set --exit-node` -> first page through it: {} ms (set took {} ms)",
            took.as_millis(),
            set_at.elapsed().saturating_sub(took).as_millis()
        );
        // The web server sees the exit node's address (masquerade).
        let seen = udp::probe(
            lab,
            labtool(),
            &alice.ns,
            40001,
            &[SocketAddr::from((Internet::WEB, ECHO_PORT))],
            Duration::from_secs(2),
        )?;
        ensure!(
            seen.first().copied().flatten().map(|s| s.ip())
                == Some(v4(Ipv4Addr::new(198, 51, 100, 1))),
            "the web server saw alice's datagram from {seen:?}, not the exit node's address"
        );
        // Her own traffic stays out of the tunnel: the marked route to control, the direct
        // WireGuard path to the exit node, and an unbroken control stream.
        ensure_own_traffic_direct(lab, &alice)?;
        wait_status(lab, &alice, "direct path to the exit node", |s| {
            s.peer_with_addr(v4(exit_ip)).is_some_and(|p| p.is_direct())
        })?;
        let log = alice.proc().stderr();
        ensure!(
            log.matches(STREAM_UP).count() == connects && !log.contains(STREAM_DOWN),
            "alice's control stream went down or reconnected after she chose the exit node"
        );
        ensure!(
            log.matches(DERP_LOST).count() == derp_losses,
            "alice's DERP connection broke after she chose the exit node"
        );
        let s = alice.status(lab)?;
        ensure!(
            s.control_connected && s.home_region != 0,
            "alice lost control or DERP: {}",
            s.raw
        );

        // bob may not use it: the CLI refuses, or his packets die at the exit node.
        let out = bob.cli_output(lab, &["set", "--exit-node", &exit_name])?;
        eprintln!(
            "bob's `warren set --exit-node {exit_name}`: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        ensure_no_fetch(lab, &bob, "bob's policy does not allow autogroup:internet")?;
        let drops = exit
            .status(lab)?
            .peer_with_addr(v4(bob_ip))
            .map(|p| p.filter_drops);
        eprintln!("the exit node's filter drops from bob: {drops:?}");

        // A live policy change grants it.
        let changed = Instant::now();
        mesh.control
            .write_policy(EXIT_POLICY_BOB, PolicyEdit::Rename)?;
        wait_status(lab, &bob, "offered the exit node after the change", |s| {
            s.exit_nodes == [exit_name.as_str()]
        })?;
        if !out.status.success() {
            bob.set_exit_node(lab, &exit_name)?;
        }
        wait_fetch(lab, &bob, &[&exit])?;
        eprintln!(
            "policy change -> bob's first page through the exit node: {} ms",
            changed.elapsed().as_millis()
        );
        let d = explain_exit(lab, &mesh, bob_ip, &web, &exit_name)?;
        ensure!(
            d["allowed"] == true,
            "explain after the change: bob may not use the exit node? {d}"
        );

        // The exit node dies: alice's control connection is untouched (it never went through
        // the tunnel), so she hears of it; her internet traffic does not leak around it.
        exit.proc().force_kill()?;
        wait_status(lab, &alice, "hears that the exit node is offline", |s| {
            s.peer_with_addr(v4(exit_ip)).is_some_and(|p| !p.online)
        })?;
        let s = alice.status(lab)?;
        let log = alice.proc().stderr();
        ensure!(
            s.control_connected && !log.contains(STREAM_DOWN),
            "alice's control connection suffered from her exit node's death: {}",
            s.raw
        );
        ensure_no_fetch(lab, &alice, "her exit node is dead")?;
        ensure_own_traffic_direct(lab, &alice)?;
        Ok(())
    });
}

// ----- 2. Choosing and clearing the exit node, LAN access, CLI approval -----

#[test]
fn exit_node_approved_by_cli_set_live_and_cleared_without_leaks() {
    lab_test("exit-set", |lab, bins| {
        let mut mesh = Mesh::start_with(lab, bins, 0, &ControlConfig::default())?;
        let internet = Internet::build(lab, labtool())?;
        let key = mesh.key.secret.clone();
        let (exit, exit_ip) = exit_node(lab, &mut mesh, &internet, &key, 1)?;
        let exit_name = exit.status(lab)?.name;
        // One client chooses it at start, before it is approved; one also keeps its LAN.
        let (c, _) = spawn_node(
            lab,
            &mut mesh,
            &key,
            &["--exit-node", &exit_name],
            |_, _| Ok(()),
        )?;
        let (lan_c, _) = spawn_node(
            lab,
            &mut mesh,
            &key,
            &["--exit-node", &exit_name, "--exit-node-allow-lan-access"],
            |_, _| Ok(()),
        )?;

        // Not approved: not offered, and the chosen exit node carries nothing (no leak either:
        // nothing else routes to the internet).
        wait_status(lab, &exit, "advertises 0.0.0.0/0 and ::/0", |s| {
            ["0.0.0.0/0", "::/0"]
                .iter()
                .all(|r| s.advertised_routes.iter().any(|a| a == r))
                && s.approved_routes.is_empty()
        })?;
        let s = wait_status(lab, &c, "lists the exit node", |s| {
            s.peer_with_addr(v4(exit_ip)).is_some()
        })?;
        ensure!(
            s.exit_nodes.is_empty() && !peer_at(&s, exit_ip)?.exit_node,
            "an unapproved exit node is offered: {}",
            s.raw
        );
        ensure_no_fetch(lab, &c, "the exit node is not approved")?;

        // Approving 0.0.0.0/0 approves ::/0 with it.
        let id = mesh.control.node_by_hostname(lab, &exit.hostname)?.id;
        let approved = Instant::now();
        mesh.control.approve_routes(lab, id, &["0.0.0.0/0"])?;
        wait_status(lab, &exit, "approved for both families", |s| {
            ["0.0.0.0/0", "::/0"]
                .iter()
                .all(|r| s.approved_routes.iter().any(|a| a == r))
        })?;
        wait_status(lab, &c, "offered and using the exit node", |s| {
            s.exit_nodes == [exit_name.as_str()]
                && s.exit_node.as_deref() == Some(exit_name.as_str())
        })?;
        wait_fetch(lab, &c, &[&exit])?;
        eprintln!(
            "exit node approval -> first page through it: {} ms",
            approved.elapsed().as_millis()
        );
        wait_fetch(lab, &lan_c, &[&exit])?;
        ensure_own_traffic_direct(lab, &c)?;
        ensure_own_traffic_direct(lab, &lan_c)?;

        // LAN access: only with --exit-node-allow-lan-access does the LAN stay out of the
        // tunnel for ordinary traffic.
        let control = v4(Mesh::CONTROL_ADDR);
        let line = route_get(lab, &c.ns, control, None)?;
        ensure!(
            route_dev(&line) == Some("warren0"),
            "without LAN access, the client's LAN traffic is routed {line:?}"
        );
        let line = route_get(lab, &lan_c.ns, control, None)?;
        ensure!(
            route_dev(&line) == Some("eth0"),
            "with LAN access, the client's LAN traffic is routed {line:?}"
        );

        // Cleared live: back to no internet, and no route into the tunnel for it.
        c.set_exit_node(lab, "")?;
        wait_status(lab, &c, "uses no exit node", |s| s.exit_node.is_none())?;
        wait_until(SOON, "the client's internet route is gone", || {
            Ok(fetch(lab, &c, Duration::from_secs(1))? == HttpOutcome::Unreachable)
        })?;
        let web = route_get(lab, &c.ns, v4(Internet::WEB), None);
        ensure!(
            web.as_deref().ok().and_then(route_dev) != Some("warren0"),
            "without an exit node, internet traffic is still routed {web:?}"
        );

        // Chosen again, by mesh address this time.
        c.set_exit_node(lab, &exit_ip.to_string())?;
        wait_status(lab, &c, "uses the exit node chosen by address", |s| {
            s.exit_node.as_deref() == Some(exit_name.as_str())
        })?;
        wait_fetch(lab, &c, &[&exit])?;

        // The exit node dies: the routes stay (a blackhole, not a leak) and control still
        // reaches the client.
        exit.proc().force_kill()?;
        wait_status(lab, &c, "hears the exit node is offline", |s| {
            s.control_connected && s.peer_with_addr(v4(exit_ip)).is_some_and(|p| !p.online)
        })?;
        ensure_no_fetch(lab, &c, "its exit node is dead")?;
        let web = route_get(lab, &c.ns, v4(Internet::WEB), None)?;
        ensure!(
            route_dev(&web) == Some("warren0"),
            "with its exit node gone, the client routes internet traffic {web:?} (a leak)"
        );
        ensure_own_traffic_direct(lab, &c)?;
        Ok(())
    });
}
