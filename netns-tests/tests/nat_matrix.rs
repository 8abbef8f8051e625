//! NAT traversal matrix: for every unordered pair of [`NatKind`]s (28 pairs, same-kind pairs at
//! two different sites), two real `warren` nodes ping each other over their mesh addresses and
//! the path each reports in `warren status --json` must match `shared/PROTOCOLS.md` section 6:
//! relay for any pair with UDP blocked, public+firewall x symmetric, port-restricted x symmetric
//! and symmetric x symmetric; direct otherwise. Plus "same NAT": two hosts behind one router
//! without hairpinning connect directly over their LAN addresses.
//!
//! One control server (with its embedded DERP and STUN, see [`NatMesh`]) serves the whole
//! test; pairs run in concurrent batches on sites reused between batches (nodes of a finished
//! batch are stopped and deleted from control). The measured matrix is printed at the end;
//! mismatches fail the test after the table is printed.
//!
//! `WARREN_MATRIX_PARALLEL` (default 4) sets the batch size; `WARREN_MATRIX_ONLY` (e.g.
//! `FullCone-Symmetric,UdpBlocked-UdpBlocked`) runs only the listed pairs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use warren_netns_tests::natmesh::{NatMesh, direct_endpoint, path_to, wait_up};
use warren_netns_tests::{
    Binaries, Lab, NatKind, Node, Site, binaries_with_labtool, require_root, serial, wait_until,
};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

/// How long a pair may take to get its first ping through (any path).
const FIRST_REPLY_DEADLINE: Duration = Duration::from_secs(30);
/// How long, from the first ping, a pair that should go direct may take to report it.
const DIRECT_DEADLINE: Duration = Duration::from_secs(20);
/// How long a relay pair is watched to stay on the relay (with pings succeeding) after it got
/// there: more than two heartbeats and more than the direct-path trust time.
const RELAY_HOLD: Duration = Duration::from_secs(8);
/// How long a node gets to register and see all the others.
const UP_DEADLINE: Duration = Duration::from_secs(30);
/// Per-ping reply wait while polling.
const PING_WAIT: Duration = Duration::from_millis(500);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spec {
    a: NatKind,
    b: NatKind,
    /// Both nodes behind one router (no hairpinning): direct over the LAN.
    same_site: bool,
}

impl Spec {
    fn expect_direct(self) -> bool {
        self.same_site || NatKind::direct_expected(self.a, self.b)
    }

    fn label(self) -> String {
        if self.same_site {
            format!("same {} NAT", self.a)
        } else {
            format!("{} x {}", self.a, self.b)
        }
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    spec: Spec,
    /// The first mesh ping reply a -> b, from the start of pinging.
    first_reply: Option<Duration>,
    /// When both sides first reported a direct path (and a ping got through), from the first
    /// ping.
    first_direct: Option<Duration>,
    /// The same, from the start of the nodes.
    direct_since_spawn: Option<Duration>,
    /// The paths both sides reported last.
    paths: (Option<String>, Option<String>),
    /// Why the pair does not match the table (None: it does).
    error: Option<String>,
}

impl Outcome {
    fn observed_direct(&self) -> bool {
        let d = |p: &Option<String>| p.as_deref().is_some_and(|p| p.starts_with("direct"));
        d(&self.paths.0) && d(&self.paths.1)
    }

    fn cell(&self) -> String {
        match (&self.error, self.observed_direct(), self.first_direct) {
            (None, true, Some(t)) => format!("direct {:.2}s", t.as_secs_f64()),
            (None, true, None) => "direct".to_owned(),
            (None, false, _) => "relay".to_owned(),
            (Some(_), true, _) => "FAIL got direct".to_owned(),
            (Some(_), false, _) => "FAIL got relay".to_owned(),
        }
    }
}

/// The pairs to run, relay and direct pairs interleaved so batches take similar time.
fn specs() -> Vec<Spec> {
    let mut direct = Vec::new();
    let mut relay = Vec::new();
    for (i, &a) in NatKind::ALL.iter().enumerate() {
        for &b in &NatKind::ALL[i..] {
            let s = Spec {
                a,
                b,
                same_site: false,
            };
            if s.expect_direct() {
                direct.push(s);
            } else {
                relay.push(s);
            }
        }
    }
    for kind in [
        NatKind::PortRestricted,
        NatKind::Symmetric,
        NatKind::UdpBlocked,
    ] {
        direct.push(Spec {
            a: kind,
            b: kind,
            same_site: true,
        });
    }
    let mut out = Vec::new();
    let (mut d, mut r) = (direct.into_iter(), relay.into_iter());
    loop {
        // About two direct pairs per relay pair (18 + 3 direct, 10 relay).
        let next: Vec<Spec> = [d.next(), d.next(), r.next()]
            .into_iter()
            .flatten()
            .collect();
        if next.is_empty() {
            break;
        }
        out.extend(next);
    }
    if let Ok(only) = std::env::var("WARREN_MATRIX_ONLY") {
        let wanted: Vec<String> = only.split(',').map(|s| s.trim().to_lowercase()).collect();
        out.retain(|s| {
            let name = format!("{:?}-{:?}", s.a, s.b).to_lowercase();
            let same = format!("same-{:?}", s.a).to_lowercase();
            wanted.iter().any(|w| {
                if s.same_site {
                    *w == same
                } else {
                    *w == name || *w == format!("{:?}-{:?}", s.b, s.a).to_lowercase()
                }
            })
        });
    }
    out
}

/// Sites reused between batches: a site is busy while a pair of the current batch uses it.
struct Pool {
    sites: Vec<(Site, bool)>,
}

impl Pool {
    /// A free site of `kind` with at least `hosts` hosts (created when there is none); marks
    /// it busy and returns its index.
    fn take(
        &mut self,
        lab: &mut Lab,
        mesh: &mut NatMesh,
        kind: NatKind,
        hosts: usize,
    ) -> Result<usize> {
        if let Some(i) = self
            .sites
            .iter()
            .position(|(s, busy)| !busy && s.kind == kind && s.hosts.len() >= hosts)
        {
            self.sites[i].1 = true;
            // Nothing of the last pair may linger in the router's state.
            mesh.net.flush_conntrack(lab, &self.sites[i].0)?;
            return Ok(i);
        }
        let site = mesh.net.add_site(lab, kind, false, hosts)?;
        self.sites.push((site, true));
        Ok(self.sites.len() - 1)
    }

    fn release_all(&mut self) {
        for s in &mut self.sites {
            s.1 = false;
        }
    }
}

struct Pair {
    spec: Spec,
    /// When the nodes were started.
    spawned: Instant,
    a: Node,
    b: Node,
    /// Where each node's peer may be reached directly (public addresses of its site, or its
    /// LAN address behind the same router).
    a_reachable_at: Vec<Ipv4Addr>,
    b_reachable_at: Vec<Ipv4Addr>,
}

#[test]
fn nat_matrix() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let bins = binaries_with_labtool(LABTOOL).unwrap_or_else(|e| panic!("{e:#}"));
    let mut lab = Lab::new("nat-matrix").unwrap_or_else(|e| panic!("cannot create the lab: {e:#}"));
    let started = Instant::now();
    match run_matrix(&mut lab, &bins) {
        Ok(outcomes) => {
            eprintln!("{}", table(&outcomes));
            eprintln!("matrix took {:.0} s", started.elapsed().as_secs_f64());
            let failed: Vec<String> = outcomes
                .iter()
                .filter_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.spec.label())))
                .collect();
            if !failed.is_empty() {
                panic!(
                    "{} of {} pairs do not match PROTOCOLS.md:\n{}",
                    failed.len(),
                    outcomes.len(),
                    failed.join("\n")
                );
            }
        }
        Err(e) => panic!("nat matrix failed: {e:?}"),
    }
}

fn run_matrix(lab: &mut Lab, bins: &Binaries) -> Result<Vec<Outcome>> {
    let mut mesh = NatMesh::start(lab, bins)?;
    let parallel: usize = std::env::var("WARREN_MATRIX_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let specs = specs();
    ensure!(!specs.is_empty(), "WARREN_MATRIX_ONLY selects no pair");
    let mut pool = Pool { sites: Vec::new() };
    let mut outcomes = Vec::new();
    for (batch_no, batch) in specs.chunks(parallel).enumerate() {
        let mut pairs = Vec::new();
        for (k, &spec) in batch.iter().enumerate() {
            let tag = format!("m{batch_no}p{k}");
            let spawned = Instant::now();
            let pair = if spec.same_site {
                let i = pool.take(lab, &mut mesh, spec.a, 2)?;
                let site = pool.sites[i].0.clone();
                let a = mesh.spawn_node(lab, &site, 0, &format!("{tag}a"))?;
                let b = mesh.spawn_node(lab, &site, 1, &format!("{tag}b"))?;
                Pair {
                    spec,
                    spawned,
                    a,
                    b,
                    a_reachable_at: vec![site.hosts[0].addr],
                    b_reachable_at: vec![site.hosts[1].addr],
                }
            } else {
                let i = pool.take(lab, &mut mesh, spec.a, 1)?;
                let j = pool.take(lab, &mut mesh, spec.b, 1)?;
                let (sa, sb) = (pool.sites[i].0.clone(), pool.sites[j].0.clone());
                let a = mesh.spawn_node(lab, &sa, 0, &format!("{tag}a"))?;
                let b = mesh.spawn_node(lab, &sb, 0, &format!("{tag}b"))?;
                Pair {
                    spec,
                    spawned,
                    a,
                    b,
                    a_reachable_at: sa.public_addrs(),
                    b_reachable_at: sb.public_addrs(),
                }
            };
            pairs.push(pair);
        }
        let peers = pairs.len() * 2 - 1;
        for p in &pairs {
            wait_up(lab, &p.a, peers, UP_DEADLINE)?;
            wait_up(lab, &p.b, peers, UP_DEADLINE)?;
        }
        eprintln!(
            "batch {batch_no}: {}",
            pairs
                .iter()
                .map(|p| p.spec.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let lab_ref: &Lab = lab;
        let results: Vec<Outcome> = std::thread::scope(|scope| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|p| scope.spawn(move || check_pair(lab_ref, p)))
                .collect();
            handles
                .into_iter()
                .zip(&pairs)
                .map(|(h, p)| match h.join() {
                    Ok(o) => o,
                    Err(_) => Outcome {
                        spec: p.spec,
                        first_reply: None,
                        first_direct: None,
                        direct_since_spawn: None,
                        paths: (None, None),
                        error: Some("checker thread panicked".to_owned()),
                    },
                })
                .collect()
        });
        for o in &results {
            eprintln!(
                "  {:<34} {:<24} first reply {:?}, direct {:?} after start, paths {:?}{}",
                o.spec.label(),
                o.cell(),
                o.first_reply,
                o.direct_since_spawn,
                o.paths,
                o.error
                    .as_ref()
                    .map(|e| format!("\n    ERROR: {e}"))
                    .unwrap_or_default()
            );
        }
        if results.iter().any(|o| o.error.is_some()) {
            // Keep the failing pair's daemons' logs in the lab's failure report.
            for p in &pairs {
                if results
                    .iter()
                    .any(|o| o.spec == p.spec && o.error.is_some())
                {
                    for n in [&p.a, &p.b] {
                        eprintln!("{}", n.proc().log_tail(60));
                    }
                }
            }
        }
        outcomes.extend(results);
        for p in &pairs {
            mesh.remove_node(lab, &p.a)?;
            mesh.remove_node(lab, &p.b)?;
        }
        pool.release_all();
    }
    Ok(outcomes)
}

fn check_pair(lab: &Lab, p: &Pair) -> Outcome {
    let mut out = Outcome {
        spec: p.spec,
        first_reply: None,
        first_direct: None,
        direct_since_spawn: None,
        paths: (None, None),
        error: None,
    };
    if let Err(e) = check_pair_inner(lab, p, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out
}

fn check_pair_inner(lab: &Lab, p: &Pair, out: &mut Outcome) -> Result<()> {
    let aa = p.a.ipv4(lab)?;
    let ba = p.b.ipv4(lab)?;
    let start = Instant::now();
    out.first_reply = Some(wait_until(
        FIRST_REPLY_DEADLINE,
        &format!(
            "{} gets a mesh ping reply from {}",
            p.a.hostname, p.b.hostname
        ),
        || lab.ping_wait(&p.a.ns, v4(ba), PING_WAIT),
    )?);
    wait_until(
        FIRST_REPLY_DEADLINE,
        &format!(
            "{} gets a mesh ping reply from {}",
            p.b.hostname, p.a.hostname
        ),
        || lab.ping_wait(&p.b.ns, v4(aa), PING_WAIT),
    )?;
    let refresh = |out: &mut Outcome| -> Result<()> {
        out.paths = (path_to(lab, &p.a, ba)?, path_to(lab, &p.b, aa)?);
        Ok(())
    };
    let is =
        |path: &Option<String>, kind: &str| path.as_deref().is_some_and(|s| s.starts_with(kind));
    if p.spec.expect_direct() {
        let waited = wait_until(
            DIRECT_DEADLINE.saturating_sub(start.elapsed()),
            "both nodes report a direct path",
            || {
                // Traffic keeps the session active, as an application would.
                let ok = lab.ping_wait(&p.a.ns, v4(ba), PING_WAIT)?;
                refresh(out)?;
                Ok(ok && is(&out.paths.0, "direct") && is(&out.paths.1, "direct"))
            },
        );
        if let Err(e) = waited {
            refresh(out)?;
            bail!("{e:#}; paths {:?}", out.paths);
        }
        out.first_direct = Some(start.elapsed());
        out.direct_since_spawn = Some(p.spawned.elapsed());
        // Each side must be talking to the other's real address.
        for (path, reachable, who) in [
            (&out.paths.0, &p.b_reachable_at, &p.b.hostname),
            (&out.paths.1, &p.a_reachable_at, &p.a.hostname),
        ] {
            let ep = direct_endpoint(path.as_deref().unwrap_or_default())?
                .context("direct path without an endpoint")?;
            ensure!(
                matches!(ep.ip(), IpAddr::V4(ip) if reachable.contains(&ip)),
                "the direct path to {who} goes to {ep}, not to one of {reachable:?}"
            );
        }
        ensure!(
            lab.ping_wait(&p.b.ns, v4(aa), Duration::from_secs(2))?,
            "{} -> {} failed on the direct path",
            p.b.hostname,
            p.a.hostname
        );
    } else {
        wait_until(
            DIRECT_DEADLINE.saturating_sub(start.elapsed()),
            "both nodes report the relay path",
            || {
                let ok = lab.ping_wait(&p.a.ns, v4(ba), PING_WAIT)?;
                refresh(out)?;
                Ok(ok && is(&out.paths.0, "relay") && is(&out.paths.1, "relay"))
            },
        )
        .with_context(|| format!("paths {:?}", out.paths))?;
        let hold = Instant::now();
        let mut pings = 0u32;
        while hold.elapsed() < RELAY_HOLD {
            let (from, to) = if pings.is_multiple_of(2) {
                (&p.a, ba)
            } else {
                (&p.b, aa)
            };
            ensure!(
                lab.ping_wait(&from.ns, v4(to), Duration::from_secs(2))?,
                "{} -> {to} failed {:.1} s into the relay hold",
                from.hostname,
                hold.elapsed().as_secs_f64()
            );
            pings += 1;
            refresh(out)?;
            ensure!(
                is(&out.paths.0, "relay") && is(&out.paths.1, "relay"),
                "left the relay {:.1} s after reaching it: paths {:?}",
                hold.elapsed().as_secs_f64(),
                out.paths
            );
        }
    }
    Ok(())
}

/// The kind x kind table (upper triangle) and the same-NAT rows.
fn table(outcomes: &[Outcome]) -> String {
    let mut cells = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.spec.same_site) {
        let (i, j) = (index(o.spec.a), index(o.spec.b));
        cells.insert((i.min(j), i.max(j)), o.cell());
    }
    let short = [
        "public",
        "public+fw",
        "full cone",
        "restricted",
        "port-restr",
        "symmetric",
        "UDP blocked",
    ];
    let w = 14;
    let mut s = String::from(
        "\n===== NAT matrix: path each pair settled on (time from first ping to direct) =====\n",
    );
    let _ = write!(s, "{:<w$}", "A \\ B");
    for h in short {
        let _ = write!(s, "{h:<w$}");
    }
    s.push('\n');
    for (i, row) in short.iter().enumerate() {
        let _ = write!(s, "{row:<w$}");
        for j in 0..short.len() {
            let cell = if j < i {
                String::new()
            } else {
                cells
                    .get(&(i, j))
                    .cloned()
                    .unwrap_or_else(|| "-".to_owned())
            };
            let _ = write!(s, "{cell:<w$}");
        }
        s.push('\n');
    }
    for o in outcomes.iter().filter(|o| o.spec.same_site) {
        let _ = writeln!(
            s,
            "{}, two hosts, no hairpin: {} via {:?}",
            o.spec.label(),
            o.cell(),
            o.paths.0
        );
    }
    let direct: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.first_direct.map(|d| d.as_secs_f64()))
        .collect();
    let since: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.direct_since_spawn.map(|d| d.as_secs_f64()))
        .collect();
    if !since.is_empty() {
        let max = since.iter().cloned().fold(0.0, f64::max);
        let mean = since.iter().sum::<f64>() / since.len() as f64;
        let _ = writeln!(
            s,
            "time from `warren up` to a direct path: mean {mean:.1} s, max {max:.1} s"
        );
    }
    if !direct.is_empty() {
        let max = direct.iter().cloned().fold(0.0, f64::max);
        let mean = direct.iter().sum::<f64>() / direct.len() as f64;
        let _ = writeln!(
            s,
            "time to first direct: mean {mean:.1} s, max {max:.1} s over {} pairs",
            direct.len()
        );
    }
    s
}

fn index(k: NatKind) -> usize {
    NatKind::ALL.iter().position(|&x| x == k).unwrap_or(0)
}

#[test]
fn expectations_follow_protocols_table() {
    use NatKind::*;
    let relay: Vec<(NatKind, NatKind)> = specs()
        .into_iter()
        .filter(|s| !s.same_site && !s.expect_direct())
        .map(|s| (s.a, s.b))
        .collect();
    assert_eq!(
        relay.len(),
        10,
        "7 pairs with UDP blocked, pubfw x sym, portr x sym, sym x sym: {relay:?}"
    );
    assert!(NatKind::direct_expected(Public, Symmetric));
    assert!(NatKind::direct_expected(FullCone, Symmetric));
    assert!(NatKind::direct_expected(Restricted, Symmetric));
    assert!(!NatKind::direct_expected(Symmetric, PortRestricted));
    assert!(!NatKind::direct_expected(Symmetric, PublicFirewall));
    assert!(!NatKind::direct_expected(Symmetric, Symmetric));
    assert!(!NatKind::direct_expected(UdpBlocked, Public));
    if std::env::var_os("WARREN_MATRIX_ONLY").is_none() {
        assert_eq!(specs().len(), 28 + 3);
    }
}
