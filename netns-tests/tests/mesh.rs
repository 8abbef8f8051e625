//! Mesh tests: the real `warren-control` and `warren` binaries in network namespaces.
//!
//! One LAN 10.77.0.0/24, control at 10.77.0.1, nodes at 10.77.0.11, .12, … Run as root after
//! `cargo build --bins`; without root every test prints why it is skipped and passes. Tests
//! run one at a time (each takes the lab's serial lock) and wait on conditions, never sleeps.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use warren_netns_tests::mesh::Control;
use warren_netns_tests::{
    Binaries, ControlConfig, Lab, Mesh, Node, NodeInfo, NodeOptions, TransferReport, wait_until,
};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

/// Generous deadline for anything the mesh should do "soon".
const SOON: Duration = Duration::from_secs(20);

/// How long `warren-control` may take to exit by itself after SIGTERM.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `body` in a fresh lab, serially, if root. An error fails the test while the lab is
/// still alive, so its drop prints every process's log.
fn lab_test(name: &str, body: impl FnOnce(&mut Lab, &Binaries) -> Result<()>) {
    warren_netns_tests::lab_test(name, LABTOOL, body);
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// Waits until `from` gets a reply from `to`.
fn wait_ping(lab: &Lab, from: &Node, to: Ipv4Addr) -> Result<Duration> {
    wait_until(SOON, &format!("{} pings {to}", from.hostname), || {
        lab.ping(&from.ns, v4(to))
    })
}

/// Waits until `node` has its mesh IPv4 address, and returns it.
fn wait_ipv4(lab: &Lab, node: &Node) -> Result<Ipv4Addr> {
    let mut addr = None;
    wait_until(
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

#[test]
fn two_nodes_ping_and_move_10mb() {
    lab_test("two-nodes", |lab, bins| {
        let mesh = Mesh::start(lab, bins, 2)?;
        let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
        let a1 = n1.ipv4(lab)?;
        let a2 = n2.ipv4(lab)?;
        ensure!(a1 != a2, "both nodes got {a1}");

        // `warren ip` and `warren status` agree, and each node sees the other.
        let s1 = n1.status(lab)?;
        let s2 = n2.status(lab)?;
        ensure!(s1.ipv4() == Some(a1), "status of node 1: {s1:?}");
        ensure!(s2.ipv4() == Some(a2), "status of node 2: {s2:?}");
        ensure!(s1.peer_with_addr(v4(a2)).is_some(), "node 1 peers: {s1:?}");
        ensure!(s2.peer_with_addr(v4(a1)).is_some(), "node 2 peers: {s2:?}");

        wait_ping(lab, n1, a2)?;
        wait_ping(lab, n2, a1)?;

        let bytes = 10_000_000;
        let (sent, received) = mesh.tcp_transfer(lab, 0, 1, bytes, Duration::from_secs(120))?;
        ensure!(
            sent == TransferReport::expected(bytes),
            "sender report {sent:?}"
        );
        ensure!(
            received == sent,
            "sent {sent:?} but the sink received {received:?}"
        );
        Ok(())
    });
}

#[test]
fn third_node_joins_live() {
    lab_test("third-node", |lab, bins| {
        let mut mesh = Mesh::start(lab, bins, 2)?;
        wait_ping(lab, &mesh.nodes[0], mesh.nodes[1].ipv4(lab)?)?;

        let start = Instant::now();
        let i = mesh.spawn_node(lab)?;
        let n3 = mesh.nodes[i].clone();
        let a3 = wait_ipv4(lab, &n3)?;
        let n1 = &mesh.nodes[0];
        wait_until(SOON, "node 1 pings node 3", || {
            n3.check_running()?;
            lab.ping_wait(&n1.ns, v4(a3), Duration::from_millis(200))
        })?;
        let ms = start.elapsed().as_millis();
        eprintln!("third node: first reply after {ms} ms");

        wait_ping(lab, &mesh.nodes[1], a3)?;
        wait_ping(lab, &n3, mesh.nodes[0].ipv4(lab)?)?;
        mesh.wait_full_mesh(lab, SOON)?;
        Ok(())
    });
}

#[test]
fn deleted_node_is_cut_off() {
    lab_test("delete-node", |lab, bins| {
        let mesh = Mesh::start(lab, bins, 3)?;
        let addrs = mesh
            .nodes
            .iter()
            .map(|n| n.ipv4(lab))
            .collect::<Result<Vec<_>>>()?;
        let victim = &mesh.nodes[2];
        let a3 = addrs[2];
        for (n, &a) in mesh.nodes[..2].iter().zip(&addrs) {
            wait_ping(lab, n, a3)?;
            wait_ping(lab, victim, a)?;
        }

        let info = mesh.control.node_by_hostname(lab, &victim.hostname)?;
        mesh.control.delete_node(lab, info.id)?;
        ensure!(
            !mesh.control.nodes(lab)?.iter().any(|n| n.id == info.id),
            "control still lists node {}",
            info.id
        );
        wait_until(SOON, "nodes 1 and 2 no longer list node 3", || {
            for n in &mesh.nodes[..2] {
                if n.status(lab)?.peer_with_addr(v4(a3)).is_some() {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        // The deleted node itself: control told it so, and it dropped every peer.
        wait_until(
            SOON,
            "the deleted node lists 0 peers and is not connected to control",
            || {
                victim.check_running()?;
                let s = victim.status(lab)?;
                Ok(s.peers.is_empty() && !s.control_connected)
            },
        )?;

        for (n, &a) in mesh.nodes[..2].iter().zip(&addrs) {
            for _ in 0..3 {
                ensure!(
                    !lab.ping(&victim.ns, v4(a))?,
                    "the deleted node still reaches {}",
                    n.hostname
                );
                ensure!(
                    !lab.ping(&n.ns, v4(a3))?,
                    "{} still reaches the deleted node",
                    n.hostname
                );
            }
        }
        // The two remaining nodes still reach each other.
        ensure!(
            lab.ping(&mesh.nodes[0].ns, v4(addrs[1]))?,
            "node 1 lost node 2"
        );
        Ok(())
    });
}

#[test]
fn control_restart_keeps_addresses_and_traffic() {
    lab_test("control-restart", |lab, bins| {
        let mut mesh = Mesh::start(lab, bins, 2)?;
        // Control's own view, per node id (the daemons' view may lag behind it).
        let before = nodes_by_id(&mesh.control.nodes(lab)?);
        ensure!(before.len() == 2, "control lists {before:?}");
        for n in &mesh.nodes {
            let info = mesh.control.node_by_hostname(lab, &n.hostname)?;
            let local = n.addresses(lab)?;
            ensure!(
                sorted(&local) == sorted(&info.addresses),
                "{} has {local:?} but control assigned it {:?}",
                n.hostname,
                info.addresses
            );
        }
        let a1 = mesh.nodes[0].ipv4(lab)?;
        let a2 = mesh.nodes[1].ipv4(lab)?;
        wait_ping(lab, &mesh.nodes[0], a2)?;
        wait_ping(lab, &mesh.nodes[1], a1)?;
        wait_until(SOON, "both nodes report a control connection", || {
            all_connected(lab, &mesh.nodes, true)
        })?;

        mesh.control.shutdown(SHUTDOWN_DEADLINE)?;
        wait_until(SOON, "both nodes notice control is gone", || {
            all_connected(lab, &mesh.nodes, false)
        })?;
        for i in 0..10 {
            ensure!(
                lab.ping(&mesh.nodes[0].ns, v4(a2))?,
                "ping {i} node 1 -> node 2 failed with control down"
            );
            ensure!(
                lab.ping(&mesh.nodes[1].ns, v4(a1))?,
                "ping {i} node 2 -> node 1 failed with control down"
            );
        }

        mesh.control.restart(lab)?;
        let took = wait_until(SOON, "both nodes reconnect to control", || {
            all_connected(lab, &mesh.nodes, true)
        })?;
        eprintln!(
            "nodes reconnected {} ms after control was ready",
            took.as_millis()
        );
        // Control, restarted on the same database, still has the same nodes with the same
        // addresses...
        let after = nodes_by_id(&mesh.control.nodes(lab)?);
        ensure!(
            after.keys().eq(before.keys()),
            "node ids before the restart {:?}, after {:?}",
            before.keys(),
            after.keys()
        );
        for (id, (name, old)) in &before {
            let (now_name, now) = &after[id];
            ensure!(
                now_name == name && now == old,
                "control changed node {id}: {name} {old:?} -> {now_name} {now:?}"
            );
        }
        // ...and each reconnected node (eventually) has exactly those addresses.
        for n in &mesh.nodes {
            let info = mesh.control.node_by_hostname(lab, &n.hostname)?;
            let want = &after[&info.id].1;
            wait_until(
                SOON,
                &format!("{} has its addresses {want:?} from control", n.hostname),
                || Ok(&sorted(&n.addresses(lab)?) == want),
            )?;
        }
        wait_until(SOON, "control lists both nodes online", || {
            Ok(mesh.control.nodes(lab)?.iter().all(|n| n.online))
        })?;
        ensure!(
            lab.ping(&mesh.nodes[0].ns, v4(a2))?,
            "node 1 -> node 2 after restart"
        );
        ensure!(
            lab.ping(&mesh.nodes[1].ns, v4(a1))?,
            "node 2 -> node 1 after restart"
        );
        Ok(())
    });
}

#[test]
fn control_killed_under_50_nodes_is_resumed_by_every_stream() {
    lab_test("control-kill-50", |lab, bins| {
        const NODES: usize = 50;
        let mut mesh = Mesh::start(lab, bins, NODES)?;
        let addrs = mesh
            .nodes
            .iter()
            .map(|n| n.ipv4(lab))
            .collect::<Result<Vec<_>>>()?;
        // A ring of paths: node i reaches node i + 1.
        let next = |i: usize| addrs[(i + 1) % NODES];
        for (i, n) in mesh.nodes.iter().enumerate() {
            wait_ping(lab, n, next(i))?;
        }
        wait_until(SOON, "every node reports a control connection", || {
            all_connected(lab, &mesh.nodes, true)
        })?;

        // kill -9: no goodbye to any stream.
        let killed = mesh.control.proc().context("control runs")?.force_kill()?;
        ensure!(!killed.success(), "control was killed: {killed}");
        for (i, n) in mesh.nodes.iter().enumerate() {
            ensure!(
                lab.ping(&n.ns, v4(next(i)))?,
                "{} -> {} with control dead",
                n.hostname,
                next(i)
            );
        }
        mesh.control.restart(lab)?;
        let took = wait_until(Duration::from_secs(60), "every node reconnects", || {
            all_connected(lab, &mesh.nodes, true)
        })?;
        // Consistent again: every node lists the 49 others, online (each came back after the
        // restart, and each was told).
        let consistent = wait_until(SOON, "every node sees every peer online", || {
            for n in &mesh.nodes {
                let s = n.status(lab)?;
                if s.peers.len() != NODES - 1 || !s.peers.iter().all(|p| p.online) {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        eprintln!(
            "{NODES} nodes reconnected {} ms after control was ready, consistent {} ms later",
            took.as_millis(),
            consistent.as_millis()
        );
        // Every stream resumed from the version its node had: no full map after the restart.
        let log = mesh.control.log();
        let resumed = log.matches("resumed=true").count();
        let full = log.matches("resumed=false").count();
        ensure!(
            resumed >= NODES && full == 0,
            "{resumed} streams resumed, {full} took a full map:\n{log}"
        );
        // And the tunnels were kept: the ring still answers.
        for (i, n) in mesh.nodes.iter().enumerate() {
            ensure!(
                lab.ping(&n.ns, v4(next(i)))?,
                "{} -> {} after the restart",
                n.hostname,
                next(i)
            );
        }
        Ok(())
    });
}

fn sorted(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = addrs.to_vec();
    v.sort();
    v
}

/// Node id -> (hostname, sorted addresses), as control lists them.
fn nodes_by_id(list: &[NodeInfo]) -> BTreeMap<u64, (String, Vec<IpAddr>)> {
    list.iter()
        .map(|n| (n.id, (n.hostname.clone(), sorted(&n.addresses))))
        .collect()
}

fn all_connected(lab: &Lab, nodes: &[Node], want: bool) -> Result<bool> {
    for n in nodes {
        n.check_running()?;
        if n.status(lab)?.control_connected != want {
            return Ok(false);
        }
    }
    Ok(true)
}

#[test]
fn bad_auth_keys_are_refused() {
    lab_test("bad-keys", |lab, bins| {
        let mut mesh = Mesh::start(lab, bins, 0)?;
        let user = mesh.user.clone();

        // (b) needs a key that is well formed but unknown here: one minted by another server.
        let other_ns = lab.add_ns("ctl2")?;
        let other_addr = Ipv4Addr::new(10, 77, 0, 2);
        lab.attach(&mesh.lan, &other_ns, "eth0", &format!("{other_addr}/24"))?;
        let other = Control::start_named(lab, bins, &other_ns, other_addr, "control-2")?;
        other.create_user(lab, &user)?;
        let foreign = other.create_preauth_key(lab, &user, &[])?;
        ensure!(
            foreign.secret != mesh.key.secret,
            "two servers minted the same key"
        );

        let expired = mesh.control.create_preauth_key(lab, &user, &[])?;
        mesh.control.expire_preauth_key(lab, &expired.prefix)?;

        // (d) a single-use key, used once successfully.
        let single = mesh.control.create_preauth_key(lab, &user, &[])?;
        let first = mesh.spawn_node_with_key(lab, &single.secret)?;
        wait_ipv4(lab, &first)?;
        let count = mesh.control.nodes(lab)?.len();
        ensure!(count == 1, "control lists {count} nodes, expected 1");

        let cases: [(&str, &str, &str); 4] = [
            (
                "garbage",
                "this is not a key!",
                "malformed key: expected warren-auth-<12 hex>-<48 hex>",
            ),
            ("unknown", &foreign.secret, "pre-auth key not found"),
            ("expired", &expired.secret, "pre-auth key expired"),
            ("used", &single.secret, "pre-auth key already used"),
        ];
        for (what, key, reason) in cases {
            let node = mesh.spawn_node_with_key(lab, key)?;
            let Some(status) = node.proc().wait_exit(SOON) else {
                bail!("`warren up` with a {what} key is still running after {SOON:?}");
            };
            ensure!(
                !status.success(),
                "`warren up` with a {what} key exited with {status}"
            );
            // The reason must be on the final error line, not just somewhere in the log.
            let stderr = node.proc().stderr();
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .trim();
            let want = format!("error: registration refused: {reason}");
            ensure!(
                last == want,
                "`warren up` with a {what} key: final stderr line is {last:?}, \
                 expected {want:?}; whole stderr:\n{stderr}"
            );
            let now = mesh.control.nodes(lab)?.len();
            ensure!(
                now == count,
                "control lists {now} nodes after the {what} key, expected {count}"
            );
        }
        first.check_running()?;

        // A second daemon on the state directory of a running one is refused before it
        // touches anything, and the first one keeps its socket.
        let state = first.state_dir.to_string_lossy().into_owned();
        let out = lab.run(
            &first.ns,
            &bins.warren,
            [
                "up",
                "--control",
                mesh.control.url.as_str(),
                "--state-dir",
                &state,
                "--tun",
                "warren1",
            ],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("another `warren up` is running"),
            "second `warren up` on one state directory: {}\n{stderr}",
            out.status
        );
        first.status(lab)?;
        first.check_running()?;
        Ok(())
    });
}

#[test]
fn ephemeral_node_is_removed_after_it_leaves() {
    lab_test("ephemeral", |lab, bins| {
        let settings = ControlConfig {
            ephemeral_node_inactivity_timeout: "2s".to_owned(),
            ..ControlConfig::default()
        };
        // One ordinary node (the mesh's reusable key) beside the ephemeral one.
        let mut mesh = Mesh::start_with(lab, bins, 1, &settings)?;
        let regular = mesh.nodes[0].clone();
        let key = mesh
            .control
            .create_preauth_key(lab, &mesh.user.clone(), &["--ephemeral"])?;
        let eph = mesh.spawn_node_with_key(lab, &key.secret)?;
        wait_ipv4(lab, &eph)?;
        let id = wait_until(SOON, "control lists the ephemeral node online", || {
            eph.check_running()?;
            Ok(mesh.control.node_by_hostname(lab, &eph.hostname)?.online)
        })
        .and_then(|_| mesh.control.node_by_hostname(lab, &eph.hostname))?
        .id;
        regular.wait_peers(lab, 1, SOON)?;

        eph.down(lab)?;
        let Some(status) = eph.proc().wait_exit(SOON) else {
            bail!("`warren up` of the ephemeral node still runs {SOON:?} after `warren down`");
        };
        ensure!(
            status.success(),
            "`warren up` exited with {status} after `warren down`"
        );

        let took = wait_until(
            Duration::from_secs(30),
            "control no longer lists the ephemeral node",
            || Ok(!mesh.control.nodes(lab)?.iter().any(|n| n.id == id)),
        )?;
        eprintln!(
            "ephemeral node removed {} ms after it exited",
            took.as_millis()
        );
        let listed = mesh.control.nodes(lab)?;
        ensure!(
            listed.iter().any(|n| n.hostname == regular.hostname),
            "the non-ephemeral node was removed too: control lists {listed:?}"
        );
        regular.check_running()?;
        regular.wait_peers(lab, 0, SOON)?;
        Ok(())
    });
}

/// Local resources come before registration: a TUN device that cannot be created fails
/// `warren up` before it spends a single-use key or leaves a node on control.
#[test]
fn bad_tun_name_spends_no_key() {
    lab_test("bad-tun", |lab, bins| {
        let mut mesh = Mesh::start(lab, bins, 0)?;
        let user = mesh.user.clone();
        let single = mesh.control.create_preauth_key(lab, &user, &[])?;
        let (ns, addr) = mesh.add_host(lab)?;
        let opts = NodeOptions {
            tun: "bad/name".to_owned(),
            ..NodeOptions::default()
        };
        let bad = mesh.spawn_node_on(lab, &ns, addr, &single.secret, &opts)?;
        let Some(status) = bad.proc().wait_exit(SOON) else {
            bail!("`warren up --tun bad/name` is still running after {SOON:?}");
        };
        let stderr = bad.proc().stderr();
        ensure!(
            !status.success() && stderr.contains("creating TUN device bad/name"),
            "`warren up --tun bad/name` exited with {status}:\n{stderr}"
        );
        let nodes = mesh.control.nodes(lab)?;
        ensure!(nodes.is_empty(), "control lists a ghost node: {nodes:?}");
        ensure!(
            !bad.state_dir.join("warren.sock").exists(),
            "the failed daemon left its socket behind"
        );
        // The key is still good for a node that can come up.
        let good = mesh.spawn_node_on(lab, &ns, addr, &single.secret, &NodeOptions::default())?;
        wait_ipv4(lab, &good)?;
        Ok(())
    });
}

/// A host with IPv6 disabled runs the node IPv4-only, with a warning, instead of failing on
/// the fd7a: address.
#[test]
fn node_without_ipv6_runs_ipv4_only() {
    lab_test("no-ipv6", |lab, bins| {
        let mut mesh = Mesh::start(lab, bins, 1)?;
        let (ns, addr) = mesh.add_host(lab)?;
        for key in ["all", "default"] {
            lab.run_ok(
                &ns,
                "sysctl",
                ["-q", "-w", &format!("net.ipv6.conf.{key}.disable_ipv6=1")],
            )?;
        }
        let key = mesh.key.secret.clone();
        let v4only = mesh.spawn_node_on(lab, &ns, addr, &key, &NodeOptions::default())?;
        let a = wait_ipv4(lab, &v4only)?;
        let other = mesh.nodes[0].clone();
        let b = other.ipv4(lab)?;
        wait_ping(lab, &v4only, b)?;
        wait_ping(lab, &other, a)?;
        let stderr = v4only.proc().stderr();
        ensure!(
            stderr.contains("running IPv4-only"),
            "no IPv4-only warning in:\n{stderr}"
        );
        Ok(())
    });
}

/// The local API is the daemon's user's (and root's) alone, whatever the umask it started with
/// and whatever mode its state directory had: another user cannot stop the node.
#[test]
fn local_api_is_private() {
    use std::os::unix::fs::PermissionsExt;
    lab_test("private-api", |lab, bins| {
        let mut mesh = Mesh::start(lab, bins, 0)?;
        // Let other users walk to the state directory, so only its own mode and the socket's
        // keep them out (the lab's directory is private otherwise).
        let nodes_dir = lab.dir().join("nodes");
        std::fs::create_dir_all(&nodes_dir)?;
        for dir in [lab.dir().to_path_buf(), nodes_dir] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        }
        let (ns, addr) = mesh.add_host(lab)?;
        let opts = NodeOptions {
            umask: Some(0),
            ..NodeOptions::default()
        };
        let key = mesh.key.secret.clone();
        // The state directory exists beforehand, open to everyone for reading.
        let state = lab.dir().join("nodes").join(format!("node{}", 1));
        std::fs::create_dir_all(&state)?;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755))?;
        let node = mesh.spawn_node_on(lab, &ns, addr, &key, &opts)?;
        ensure!(node.state_dir == state, "state dir {:?}", node.state_dir);
        wait_ipv4(lab, &node)?;

        let mode = |p: &std::path::Path| -> Result<u32> {
            Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
        };
        let socket = state.join("warren.sock");
        ensure!(mode(&state)? == 0o700, "state dir mode {:o}", mode(&state)?);
        ensure!(mode(&socket)? == 0o600, "socket mode {:o}", mode(&socket)?);
        for key in ["node.key", "disco.key"] {
            let m = mode(&state.join(key))?;
            ensure!(m == 0o600, "{key} mode {m:o}");
        }

        // `nobody` cannot stop it.
        let state_arg = state.to_string_lossy().into_owned();
        let warren = bins.warren.to_string_lossy().into_owned();
        let out = lab.run(
            &ns,
            "setpriv",
            [
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                warren.as_str(),
                "down",
                "--state-dir",
                state_arg.as_str(),
            ],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("Permission denied"),
            "`warren down` as nobody: {}\n{stderr}",
            out.status
        );
        node.check_running()?;
        node.status(lab)?;
        Ok(())
    });
}

/// Logs that go to a file or a pipe are plain text: no terminal colour codes from any of the
/// three programs.
#[test]
fn logs_in_files_have_no_colour_codes() {
    lab_test("plain-logs", |lab, bins| {
        let mesh = Mesh::start(lab, bins, 1)?;
        let ns = mesh.control.proc().map(|p| p.ns().to_owned());
        let ns = ns.context("control has no process")?;
        let key = lab.dir().join("derp.key").to_string_lossy().into_owned();
        let derp = lab.spawn(
            &ns,
            "warren-derp",
            &bins.derp,
            [
                "--listen",
                "127.0.0.1:3341",
                "--stun-listen",
                "127.0.0.1:3480",
                "--key-path",
                key.as_str(),
            ],
        )?;
        wait_until(SOON, "warren-derp logs that it serves", || {
            Ok(derp.stderr().contains("INFO"))
        })?;
        let node = &mesh.nodes[0];
        let control = mesh.control.proc().context("control has no process")?;
        for (what, log) in [
            ("warren-derp", derp.stderr()),
            ("warren-control", control.stderr()),
            ("warren", node.proc().stderr()),
        ] {
            ensure!(log.contains("INFO"), "{what} logged nothing:\n{log}");
            ensure!(
                !log.contains('\u{1b}'),
                "{what} wrote colour codes to its log file:\n{log:?}"
            );
        }
        Ok(())
    });
}

/// With the DERP map pointing at loopback (no `server_url`/`derp.server.ipv4` for a reachable
/// host), control warns at start, and a node whose peer is reachable only by relay says the
/// relay is down instead of calling it a path.
#[test]
fn unreachable_relay_shows_as_down() {
    lab_test("relay-down", |lab, bins| {
        let settings = ControlConfig {
            extra_toml: "\n[derp.server]\nipv4 = \"127.0.0.1\"\n".to_owned(),
            ..ControlConfig::default()
        };
        let mut mesh = Mesh::start_with(lab, bins, 0, &settings)?;
        let control_log = mesh.control.proc().context("no control")?.stderr();
        ensure!(
            control_log.contains("loopback"),
            "control did not warn about the loopback DERP host:\n{control_log}"
        );
        let a = mesh.spawn_node(lab)?;
        let b = mesh.spawn_node(lab)?;
        let (a, b) = (mesh.nodes[a].clone(), mesh.nodes[b].clone());
        // No direct path either: b drops every UDP datagram from a.
        let rules = format!(
            "table inet nodirect {{\n chain input {{\n type filter hook input priority 0;\n \
             ip saddr {} meta l4proto udp drop\n }}\n}}\n",
            a.lan_addr
        );
        let path = lab.dir().join("nodirect.nft");
        std::fs::write(&path, rules)?;
        lab.run_ok(&b.ns, "nft", ["-f", &path.to_string_lossy()])?;
        mesh.wait_full_mesh(lab, SOON)?;
        let bv4 = wait_ipv4(lab, &b)?;
        // Traffic makes a try a path.
        let _ = lab.ping_wait(&a.ns, v4(bv4), Duration::from_millis(200))?;
        let mut last = None;
        wait_until(SOON, "a shows its relay to b as down", || {
            let s = a.status(lab)?;
            let p = s.peer_with_addr(v4(bv4)).context("b is not a peer of a")?;
            last = p.path.clone();
            Ok(p.is_relay_down() && !p.is_direct() && !p.is_relay())
        })
        .with_context(|| format!("last path {last:?}"))?;
        Ok(())
    });
}
