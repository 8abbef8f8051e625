//! Subnet routes (issue 9): a router node with a LAN behind it, approval by the CLI and by
//! `autoApprovers`, failover between two routers, and what `warren down` and a crash leave
//! behind in the namespace.
//!
//! Topology: the mesh LAN 10.77.0.0/24 (control at 10.77.0.1, nodes at .11, .12, …); routers
//! also sit on the LAN `10.20.0.0/24` ([`Subnet`]) as 10.20.0.1, .2, whose host 10.20.0.10
//! has no route to the mesh, so it is reachable from a mesh node only through a router that
//! forwards and masquerades. Its UDP echo server tells which router a packet came through.
//! Run as root after `cargo build --bins`; without root every test prints why it is skipped.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use warren_netns_tests::services::{
    self, HttpOutcome, Internet, SOON, Subnet, WarrenOsState, peer_at, pings, route_dev, route_get,
    routes_entry, routes_field, spawn_node, wait_status,
};
use warren_netns_tests::{
    Binaries, ControlConfig, Lab, Mesh, Node, NodeOptions, PolicySource, wait_until,
    wait_until_every,
};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

fn lab_test(name: &str, body: impl FnOnce(&mut Lab, &Binaries) -> Result<()>) {
    warren_netns_tests::lab_test(name, LABTOOL, body);
}

fn labtool() -> &'static Path {
    Path::new(LABTOOL)
}

const PREFIX: &str = Subnet::PREFIX;
const HOST: Ipv4Addr = Subnet::HOST;

/// How long a ping that must not be answered waits.
const DENIED_WAIT: Duration = Duration::from_secs(1);

/// The mesh (no node yet) with `policy`.
fn start(lab: &mut Lab, bins: &Binaries, policy: PolicySource) -> Result<Mesh> {
    let settings = ControlConfig {
        policy,
        ..ControlConfig::default()
    };
    Mesh::start_with(lab, bins, 0, &settings)
}

/// A router: a node on a new host that is also on the subnet as 10.20.0.`n`, started with
/// `args` (e.g. `--advertise-routes 10.20.0.0/24`).
fn router(
    lab: &mut Lab,
    mesh: &mut Mesh,
    subnet: &Subnet,
    key: &str,
    n: u8,
    args: &[&str],
) -> Result<(Node, Ipv4Addr)> {
    spawn_node(lab, mesh, key, args, |lab, ns| {
        subnet.attach_router(lab, ns, n)?;
        Ok(())
    })
}

/// A plain node on a new host.
fn client(lab: &mut Lab, mesh: &mut Mesh, key: &str, args: &[&str]) -> Result<(Node, Ipv4Addr)> {
    spawn_node(lab, mesh, key, args, |_, _| Ok(()))
}

/// `count` pings from `node` to the LAN host, none of which may be answered.
fn ensure_lan_unreachable(lab: &Lab, node: &Node, why: &str) -> Result<()> {
    for i in 0..3 {
        let (ok, out) = services::ping_host(lab, &node.ns, &HOST.to_string(), DENIED_WAIT)?;
        ensure!(
            !ok,
            "ping {i} from {} to {HOST} was answered, but {why}:\n{out}",
            node.hostname
        );
    }
    Ok(())
}

/// Waits until `node` gets a ping reply from the LAN host, pinging back to back (each waits
/// 200 ms); returns how long it took.
fn wait_lan_reply(lab: &Lab, node: &Node, deadline: Duration) -> Result<Duration> {
    wait_until_every(
        deadline,
        Duration::ZERO,
        &format!("{} pings {HOST} behind the router", node.hostname),
        || {
            node.check_running()?;
            pings(lab, &node.ns, HOST, Duration::from_millis(200))
        },
    )
}

/// Which router address the LAN host sees `node`'s UDP probe come from (masquerade).
fn seen_router(lab: &Lab, subnet: &Subnet, node: &Node) -> Result<Option<IpAddr>> {
    Ok(subnet
        .seen_source(lab, labtool(), &node.ns, 40000, Duration::from_secs(1))?
        .map(|s| s.ip()))
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// The `nodes list-routes` entry of `node`'s id: (advertised, approved, serving).
fn listed_routes(
    lab: &Lab,
    mesh: &Mesh,
    id: u64,
) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let list = mesh.control.list_routes(lab)?;
    let e = routes_entry(&list, id)
        .with_context(|| format!("`nodes list-routes` does not list node {id}: {list}"))?;
    Ok((
        routes_field(e, "advertised"),
        routes_field(e, "approved"),
        routes_field(e, "serving"),
    ))
}

// ----- 1. Approval by the CLI, and its removal -----

#[test]
fn subnet_route_is_used_once_approved_and_not_after_approval_is_removed() {
    lab_test("routes-approve", |lab, bins| {
        let mut mesh = start(lab, bins, PolicySource::None)?;
        let subnet = Subnet::build(lab, labtool())?;
        let key = mesh.key.secret.clone();
        let (r, ra) = router(
            lab,
            &mut mesh,
            &subnet,
            &key,
            1,
            &["--advertise-routes", PREFIX],
        )?;
        let (c, _ca) = client(lab, &mut mesh, &key, &[])?;
        let (refuser, _) = client(lab, &mut mesh, &key, &["--accept-routes=false"])?;
        let rid = mesh.control.node_by_hostname(lab, &r.hostname)?.id;

        // Advertised, not approved: the router says so, control lists it, peers get no route.
        wait_status(lab, &r, "advertises the prefix, nothing approved", |s| {
            s.advertised_routes == [PREFIX] && s.approved_routes.is_empty()
        })?;
        wait_until(SOON, "control lists the advertised route", || {
            let (adv, appr, _) = listed_routes(lab, &mesh, rid)?;
            Ok(adv == [PREFIX] && appr.is_empty())
        })?;
        let s = wait_status(lab, &c, "lists the router", |s| {
            s.peer_with_addr(v4(ra)).is_some()
        })?;
        ensure!(
            peer_at(&s, ra)?.primary_routes.is_empty(),
            "an unapproved route reached a peer: {}",
            s.raw
        );
        ensure_lan_unreachable(lab, &c, "the route is not approved yet")?;
        let r_get = route_get(lab, &c.ns, v4(HOST), None);
        ensure!(
            r_get.as_deref().ok().and_then(route_dev) != Some("warren0"),
            "the client routes {HOST} into the mesh before approval: {r_get:?}"
        );

        // Approved: the client reaches the host, through the router's masquerade.
        mesh.control.approve_routes(lab, rid, &[PREFIX])?;
        let took = wait_lan_reply(lab, &c, SOON)?;
        eprintln!(
            "route approval -> first echo reply from {HOST}: {} ms (pings back to back, 200 ms \
             each)",
            took.as_millis()
        );
        wait_status(lab, &r, "its route is approved", |s| {
            s.approved_routes == [PREFIX]
        })?;
        wait_status(lab, &c, "the router serves the prefix", |s| {
            s.peer_with_addr(v4(ra))
                .is_some_and(|p| p.primary_routes == [PREFIX])
        })?;
        let (adv, appr, serving) = listed_routes(lab, &mesh, rid)?;
        ensure!(
            adv == [PREFIX] && appr == [PREFIX] && serving == [PREFIX],
            "list-routes after approval: advertised {adv:?} approved {appr:?} serving {serving:?}"
        );
        let line = route_get(lab, &c.ns, v4(HOST), None)?;
        ensure!(
            route_dev(&line) == Some("warren0"),
            "the client's route to {HOST}: {line}"
        );
        let src = seen_router(lab, &subnet, &c)?;
        ensure!(
            src == Some(v4(Ipv4Addr::new(10, 20, 0, 1))),
            "the LAN host saw the client's datagram from {src:?}, not the router's 10.20.0.1 \
             (masquerade)"
        );
        let got = services::http_get(lab, labtool(), &c.ns, &format!("http://{HOST}:80/"), SOON)?;
        ensure!(
            got.is_ok_with(Subnet::BODY),
            "HTTP to the LAN host: {got:?}"
        );

        // A node started with --accept-routes=false does not use it.
        wait_status(lab, &refuser, "lists the router", |s| {
            s.peer_with_addr(v4(ra)).is_some()
        })?;
        ensure_lan_unreachable(lab, &refuser, "it runs with --accept-routes=false")?;

        // Approval removed: the route goes, and with it reachability.
        let cleared = Instant::now();
        mesh.control.approve_routes(lab, rid, &[])?;
        wait_status(lab, &c, "the router serves nothing", |s| {
            s.peer_with_addr(v4(ra))
                .is_some_and(|p| p.primary_routes.is_empty())
        })?;
        wait_until(SOON, "the client loses the LAN host", || {
            Ok(!pings(lab, &c.ns, HOST, Duration::from_millis(300))?)
        })?;
        eprintln!(
            "approval removed -> route gone: {} ms",
            cleared.elapsed().as_millis()
        );
        ensure_lan_unreachable(lab, &c, "its approval was removed")?;
        wait_status(lab, &r, "nothing approved", |s| {
            s.approved_routes.is_empty()
        })?;
        let (adv, appr, serving) = listed_routes(lab, &mesh, rid)?;
        ensure!(
            adv == [PREFIX] && appr.is_empty() && serving.is_empty(),
            "list-routes after clearing: advertised {adv:?} approved {appr:?} serving {serving:?}"
        );
        Ok(())
    });
}

// ----- 2. autoApprovers -----

/// `tag:router` nodes may approve 10.20.0.0/24 (and anything inside it) themselves; everyone
/// may reach everything.
const AUTO_POLICY: &str = r#"{
  "tagOwners": {"tag:router": ["lab@"]},
  "autoApprovers": {"routes": {"10.20.0.0/24": ["tag:router"]}},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:*"]},
  ],
}
"#;

#[test]
fn auto_approvers_approve_routes_without_the_cli() {
    lab_test("routes-auto", |lab, bins| {
        let mut mesh = start(lab, bins, PolicySource::File(AUTO_POLICY.to_owned()))?;
        let subnet = Subnet::build(lab, labtool())?;
        let tagged = mesh.control.create_preauth_key(
            lab,
            &mesh.user,
            &["--reusable", "--tags", "tag:router"],
        )?;
        let key = mesh.key.secret.clone();
        let (c, _) = client(lab, &mut mesh, &key, &[])?;
        // It also advertises a prefix no auto-approver covers: that one stays unapproved.
        let started = Instant::now();
        let (r, ra) = router(
            lab,
            &mut mesh,
            &subnet,
            &tagged.secret,
            1,
            &["--advertise-routes", "10.20.0.0/24,10.21.0.0/24"],
        )?;
        wait_lan_reply(lab, &c, SOON)?;
        eprintln!(
            "router start -> first echo reply through it (auto-approved): {} ms",
            started.elapsed().as_millis()
        );
        wait_status(lab, &r, "only the covered prefix is approved", |s| {
            s.approved_routes == [PREFIX]
        })?;
        let rid = mesh.control.node_by_hostname(lab, &r.hostname)?.id;
        let (adv, appr, _) = listed_routes(lab, &mesh, rid)?;
        ensure!(
            adv.len() == 2 && adv.iter().any(|a| a == "10.21.0.0/24") && appr == [PREFIX],
            "list-routes: advertised {adv:?} approved {appr:?}"
        );
        let s = c.status(lab)?;
        ensure!(
            peer_at(&s, ra)?.primary_routes == [PREFIX],
            "the client's view of the router: {}",
            s.raw
        );
        Ok(())
    });
}

// ----- 3. Failover -----

/// How a router of `PREFIX` is started.
const ROUTER_ARGS: [&str; 2] = ["--advertise-routes", PREFIX];

/// Two routers for `PREFIX`, auto-approved by `tag:router`, and a client.
struct Ha {
    mesh: Mesh,
    subnet: Subnet,
    /// The reusable tagged pre-auth key the routers registered with.
    router_key: String,
    /// The primary (it came first) and its mesh address.
    r1: Node,
    r1a: Ipv4Addr,
    /// The standby, approved, and its mesh address.
    r2: Node,
    r2a: Ipv4Addr,
    /// A client that reached the LAN through r1 before r2 joined.
    c: Node,
}

/// Starts an [`Ha`] and waits until the client sees r1 as primary and r2 as the standby.
fn ha_routers(lab: &mut Lab, bins: &Binaries) -> Result<Ha> {
    let mut mesh = start(lab, bins, PolicySource::File(AUTO_POLICY.to_owned()))?;
    let subnet = Subnet::build(lab, labtool())?;
    let router_key = mesh
        .control
        .create_preauth_key(lab, &mesh.user, &["--reusable", "--tags", "tag:router"])?
        .secret;
    let key = mesh.key.secret.clone();
    let (r1, r1a) = router(lab, &mut mesh, &subnet, &router_key, 1, &ROUTER_ARGS)?;
    let (c, _) = client(lab, &mut mesh, &key, &[])?;
    wait_lan_reply(lab, &c, SOON)?;
    let (r2, r2a) = router(lab, &mut mesh, &subnet, &router_key, 2, &ROUTER_ARGS)?;
    wait_status(lab, &r2, "its route is approved", |s| {
        s.approved_routes == [PREFIX]
    })?;
    // r1 came first and stays primary; r2 is the standby.
    wait_status(lab, &c, "r1 primary, r2 standby", |s| {
        s.peer_with_addr(v4(r1a))
            .is_some_and(|p| p.primary_routes == [PREFIX])
            && s.peer_with_addr(v4(r2a))
                .is_some_and(|p| p.primary_routes.is_empty())
    })?;
    Ok(Ha {
        mesh,
        subnet,
        router_key,
        r1,
        r1a,
        r2,
        r2a,
        c,
    })
}

#[test]
fn router_failover_moves_traffic_and_stays_on_the_new_primary() {
    lab_test("routes-failover", |lab, bins| {
        let Ha {
            mesh,
            subnet,
            router_key,
            r1,
            r1a,
            r2,
            r2a,
            c,
        } = ha_routers(lab, bins)?;
        let r1_lan = v4(Ipv4Addr::new(10, 20, 0, 1));
        let r2_lan = v4(Ipv4Addr::new(10, 20, 0, 2));
        for _ in 0..3 {
            let src = seen_router(lab, &subnet, &c)?;
            ensure!(src == Some(r1_lan), "before the failover: via {src:?}");
        }

        // The primary dies without a word.
        r1.proc().force_kill()?;
        let took = wait_lan_reply(lab, &c, Duration::from_secs(30))?;
        eprintln!(
            "router failover: kill -9 of the primary -> first echo reply through the standby: \
             {} ms",
            took.as_millis()
        );
        ensure!(
            took <= Duration::from_secs(15),
            "failover took {took:?}; the issue asks for 10 s (15 s allows for a loaded machine)"
        );
        let src = seen_router(lab, &subnet, &c)?;
        ensure!(src == Some(r2_lan), "after the failover: via {src:?}");
        wait_status(lab, &c, "r2 is primary", |s| {
            s.peer_with_addr(v4(r2a))
                .is_some_and(|p| p.primary_routes == [PREFIX])
        })?;

        // r1 comes back (its next start also clears what the crash left): r2 keeps the prefix.
        let r1 = r1.respawn(
            lab,
            bins,
            &mesh.control.url,
            &router_key,
            &NodeOptions::with_args(&ROUTER_ARGS),
        )?;
        wait_status(lab, &c, "r1 is back online, r2 still primary", |s| {
            s.peer_with_addr(v4(r1a)).is_some_and(|p| p.online)
                && s.peer_with_addr(v4(r2a))
                    .is_some_and(|p| p.primary_routes == [PREFIX])
        })?;
        wait_status(lab, &r1, "approved again", |s| {
            s.approved_routes == [PREFIX]
        })?;
        for i in 0..5 {
            let src = seen_router(lab, &subnet, &c)?;
            ensure!(
                src == Some(r2_lan),
                "probe {i} after r1 returned went via {src:?}: the prefix moved back"
            );
            let s = c.status(lab)?;
            ensure!(
                peer_at(&s, r1a)?.primary_routes.is_empty(),
                "r1 took the prefix back: {}",
                s.raw
            );
        }

        // Only when the new primary goes does the prefix move back.
        let stopped = Instant::now();
        r2.down_and_wait(lab, SOON)?;
        wait_status(lab, &c, "r1 is primary again", |s| {
            s.peer_with_addr(v4(r1a))
                .is_some_and(|p| p.primary_routes == [PREFIX])
        })?;
        let in_status = stopped.elapsed();
        wait_until(SOON, "traffic goes through r1 again", || {
            Ok(seen_router(lab, &subnet, &c)? == Some(r1_lan))
        })?;
        eprintln!(
            "`warren down` on the new primary -> r1 primary in the client's status: {} ms, \
             traffic back through r1: {} ms (r1 was restarted after its crash)",
            in_status.as_millis(),
            stopped.elapsed().as_millis()
        );
        Ok(())
    });
}

/// A router that dies silently (frozen with SIGSTOP: its TCP connections stay open, nothing
/// tells control) must still lose the prefix within the issue's 10 s, found by control's
/// HTTP/2 pings or route probes; when it wakes up it does not take the prefix back.
#[test]
fn silently_dead_router_fails_over_and_does_not_take_the_prefix_back() {
    lab_test("routes-silent", |lab, bins| {
        let Ha {
            mesh: _mesh,
            subnet,
            router_key: _,
            r1,
            r1a,
            r2: _r2,
            r2a,
            c,
        } = ha_routers(lab, bins)?;
        let r2_lan = v4(Ipv4Addr::new(10, 20, 0, 2));

        r1.proc().signal("STOP")?;
        let took = wait_lan_reply(lab, &c, Duration::from_secs(40));
        // Wake it whatever happened, so the lab can stop it normally.
        r1.proc().signal("CONT")?;
        let took = took?;
        eprintln!(
            "router failover after a silent death (SIGSTOP): first echo reply through the \
             standby after {} ms",
            took.as_millis()
        );
        ensure!(
            took <= Duration::from_secs(15),
            "silent failover took {took:?}; the issue asks for 10 s (15 s allows for a loaded \
             machine)"
        );
        let src = seen_router(lab, &subnet, &c)?;
        ensure!(src == Some(r2_lan), "after the failover: via {src:?}");

        // Awake again: it reconnects, and r2 keeps the prefix.
        wait_status(lab, &c, "r1 is back online, r2 primary", |s| {
            s.peer_with_addr(v4(r1a)).is_some_and(|p| p.online)
                && s.peer_with_addr(v4(r2a))
                    .is_some_and(|p| p.primary_routes == [PREFIX])
        })?;
        for i in 0..3 {
            let src = seen_router(lab, &subnet, &c)?;
            ensure!(
                src == Some(r2_lan),
                "probe {i} after r1 woke up went via {src:?}: the prefix moved back"
            );
        }
        Ok(())
    });
}

// ----- 4. What `warren down` and a crash leave behind -----

/// Waits until `node` has installed what it needs: `client` (an exit node in use, routes
/// accepted) has its rules and table 52, a router its nftables table; both point the
/// namespace's resolv.conf at 100.100.100.100.
fn wait_installed(lab: &Lab, node: &Node, client: bool) -> Result<WarrenOsState> {
    let mut state = WarrenOsState::default();
    let mut conf = String::new();
    wait_until(
        SOON,
        &format!("{} installed its routes, rules and resolver", node.hostname),
        || {
            node.check_running()?;
            state = WarrenOsState::read(lab, &node.ns)?;
            conf = lab.resolv_conf(&node.ns)?;
            let os = if client {
                services::RULE_PREFS
                    .iter()
                    .all(|&p| state.rules_v4_at(p) >= 1)
                    && !state.table_v4.is_empty()
            } else {
                state.has_nft_table()
            };
            Ok(os && conf.contains("nameserver 100.100.100.100"))
        },
    )
    .with_context(|| format!("last state {state:?}, resolv.conf {conf:?}"))?;
    Ok(state)
}

/// Fails unless `ns` has nothing of warren's and its resolv.conf is `original`, byte for byte.
fn ensure_clean(lab: &Lab, ns: &str, original: &str, after: &str) -> Result<()> {
    let state = WarrenOsState::read(lab, ns)?;
    ensure!(state.is_clean(), "{after}, {ns} still has {state:?}");
    let conf = lab.resolv_conf(ns)?;
    ensure!(
        conf == original,
        "{after}, {ns}'s resolv.conf is\n{conf:?}\ninstead of the original\n{original:?}"
    );
    Ok(())
}

#[test]
fn down_and_crash_leave_no_routes_rules_tables_or_resolver_changes() {
    lab_test("routes-cleanup", |lab, bins| {
        let settings = ControlConfig {
            dns_toml: Some("magic_dns = true\nbase_domain = \"mesh.test\"".to_owned()),
            ..ControlConfig::default()
        };
        let mut mesh = Mesh::start_with(lab, bins, 0, &settings)?;
        let subnet = Subnet::build(lab, labtool())?;
        let internet = Internet::build(lab, labtool())?;
        let key = mesh.key.secret.clone();
        // One node that is both subnet router and exit node, one client using it.
        let rx_args = ["--advertise-routes", PREFIX, "--advertise-exit-node"];
        let (rx, _) = spawn_node(lab, &mut mesh, &key, &rx_args, |lab, ns| {
            subnet.attach_router(lab, ns, 1)?;
            internet.attach_exit(lab, ns, 1)?;
            Ok(())
        })?;
        let rid = mesh.control.node_by_hostname(lab, &rx.hostname)?.id;
        mesh.control
            .approve_routes(lab, rid, &[PREFIX, "0.0.0.0/0"])?;
        let c_args = ["--exit-node", rx.hostname.as_str()];
        let (c, _) = client(lab, &mut mesh, &key, &c_args)?;
        let originals: Vec<(String, String)> = [&rx, &c]
            .iter()
            .map(|n| {
                Ok((
                    n.ns.clone(),
                    warren_netns_tests::lab::default_resolv_conf(&n.ns),
                ))
            })
            .collect::<Result<_>>()?;

        // Round 1: everything installed, then `warren down`.
        wait_installed(lab, &rx, false)?;
        wait_installed(lab, &c, true)?;
        fetch(lab, &c)?;
        for (node, (ns, original)) in [&c, &rx].into_iter().zip(originals.iter().rev()) {
            node.down_and_wait(lab, SOON)?;
            ensure_clean(lab, ns, original, "after `warren down`")?;
        }

        // Round 2: started again, then killed (-9): nothing can clean up then.
        let rx = rx.respawn(
            lab,
            bins,
            &mesh.control.url,
            &key,
            &NodeOptions::with_args(&rx_args),
        )?;
        let c = c.respawn(
            lab,
            bins,
            &mesh.control.url,
            &key,
            &NodeOptions::with_args(&c_args),
        )?;
        wait_installed(lab, &rx, false)?;
        wait_installed(lab, &c, true)?;
        fetch(lab, &c)?;
        for node in [&c, &rx] {
            node.proc().force_kill()?;
            let left = WarrenOsState::read(lab, &node.ns)?;
            eprintln!(
                "{} killed -9 left: {left:?}; resolv.conf {:?}",
                node.hostname,
                lab.resolv_conf(&node.ns)?
            );
        }

        // The next start clears the crash's leftovers: the router, started as a plain node
        // this time, has no nftables table; the client, started as before, has each rule once.
        let plain = rx.respawn(lab, bins, &mesh.control.url, &key, &NodeOptions::default())?;
        wait_status(lab, &plain, "connected, advertising nothing", |s| {
            s.control_connected && s.advertised_routes.is_empty()
        })?;
        wait_until(
            SOON,
            "the restarted plain node has no nftables table",
            || {
                plain.check_running()?;
                Ok(!WarrenOsState::read(lab, &plain.ns)?.has_nft_table())
            },
        )?;
        let c = c.respawn(
            lab,
            bins,
            &mesh.control.url,
            &key,
            &NodeOptions::with_args(&c_args),
        )?;
        // The exit node is a plain node now: the client keeps its exit routes (no leak) but
        // nothing answers; its rules must not be doubled by the restart.
        let state = wait_until_ok(lab, &c)?;
        for p in services::RULE_PREFS {
            ensure!(
                state.rules_v4_at(p) == 1,
                "after a crash and a restart, {} has {} rule(s) at {p}: {state:?}",
                c.hostname,
                state.rules_v4_at(p)
            );
        }
        let got = services::http_get(
            lab,
            labtool(),
            &c.ns,
            &Internet::url(),
            Duration::from_secs(2),
        )?;
        ensure!(
            !matches!(got, HttpOutcome::Reply(..)),
            "the client reached the internet while its exit node offers no exit: {got:?}"
        );
        for (node, (ns, original)) in [&c, &plain].into_iter().zip(originals.iter().rev()) {
            node.down_and_wait(lab, SOON)?;
            ensure_clean(
                lab,
                ns,
                original,
                "after a crash, a restart and `warren down`",
            )?;
        }
        Ok(())
    });
}

/// Waits until `c` reaches the LAN host through the router (the subnet route works; the exit
/// node's data path is the exit-node tests' business).
fn fetch(lab: &Lab, c: &Node) -> Result<()> {
    wait_lan_reply(lab, c, SOON)?;
    Ok(())
}

/// Waits until the restarted client has its rules and resolver again (it has no usable exit
/// node, so table 52 may hold less).
fn wait_until_ok(lab: &Lab, c: &Node) -> Result<WarrenOsState> {
    let mut state = WarrenOsState::default();
    // The crashed run left the same rules and resolv.conf behind: only once the new process
    // answers on its API (its start-up cleanup and first install are done by then) does the
    // state say anything about the restart.
    wait_until(SOON, "the restarted client installed its rules", || {
        c.check_running()?;
        if !c.status(lab).is_ok_and(|s| s.control_connected) {
            return Ok(false);
        }
        state = WarrenOsState::read(lab, &c.ns)?;
        Ok(services::RULE_PREFS
            .iter()
            .all(|&p| state.rules_v4_at(p) >= 1)
            && lab
                .resolv_conf(&c.ns)?
                .contains("nameserver 100.100.100.100"))
    })
    .with_context(|| format!("last state {state:?}"))?;
    Ok(state)
}
