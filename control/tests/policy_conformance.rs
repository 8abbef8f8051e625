//! Conformance with Tailscale itself: drives the policy compiler over the captures in
//! `../shared/policy-captures` (what Tailscale's control server sent every node for a given
//! policy and set of nodes) and compares, per node, the packet filter (normalised as the
//! captures' `expand.py` does: expanded to boxes, clipped to what can reach the node,
//! re-cut canonically) and the peer list. Policies Tailscale rejected must be rejected.
//!
//! The captures are read in place (never copied into the project); without them the test says
//! it skipped and passes. `WARREN_CONFORMANCE_VERBOSE=1` prints every mismatch,
//! `WARREN_CONFORMANCE_ONLY=<substring>` limits the run to matching capture names.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use warren_control::policy::{
    CompiledPolicy, DstNet, NodeId, NodeOwner, PacketFilter, PolicyNode, PolicyState, PolicyUser,
};

/// Pass counts this implementation reached; a drop below any of them fails the test.
/// (category, ok captures passing, rejected captures refused)
const FLOORS: &[(&str, usize, usize)] = &[
    ("acl", 198, 16),
    ("grant", 232, 34),
    ("issue_3212", 2, 0),
    ("nodeattrs", 51, 4),
    ("policytest", 10, 45),
    ("routes", 125, 0),
    ("ssh", 80, 24),
    ("sshtest", 22, 15),
];

// ---------------------------------------------------------------------------------------
// Capture format (only the fields the check needs).
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Capture {
    test_id: String,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    capture_error: Option<Value>,
    input: Input,
    topology: Topology,
    #[serde(default)]
    captures: Option<BTreeMap<String, NodeCapture>>,
}

#[derive(Deserialize)]
struct Input {
    #[serde(default)]
    full_policy: Option<Value>,
    #[serde(default)]
    api_response_code: Option<i64>,
}

#[derive(Deserialize)]
struct Topology {
    #[serde(default)]
    users: Vec<TopoUser>,
    nodes: BTreeMap<String, TopoNode>,
}

#[derive(Deserialize)]
struct TopoUser {
    id: u64,
    name: String,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Deserialize)]
struct TopoNode {
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    ipv4: Option<String>,
    #[serde(default)]
    ipv6: Option<String>,
    #[serde(default)]
    approved_routes: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct NodeCapture {
    #[serde(default)]
    packet_filter_rules: Option<Vec<WireRule>>,
    #[serde(default)]
    netmap: Option<Netmap>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct WireRule {
    #[serde(default)]
    SrcIPs: Option<Vec<String>>,
    #[serde(default)]
    DstPorts: Option<Vec<WireDst>>,
    #[serde(default)]
    IPProto: Option<Vec<u8>>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct WireDst {
    IP: String,
    Ports: WirePorts,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct WirePorts {
    First: u16,
    Last: u16,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Netmap {
    #[serde(default)]
    SelfNode: Option<SelfNode>,
    #[serde(default)]
    Peers: Option<Vec<Peer>>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct SelfNode {
    #[serde(default)]
    Addresses: Option<Vec<String>>,
    #[serde(default)]
    AllowedIPs: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Peer {
    Name: String,
}

// ---------------------------------------------------------------------------------------
// Normalisation: the equivalent of expand.py's boxes, clip and canonical form.
// ---------------------------------------------------------------------------------------

const DEFAULT_PROTOS: [u8; 4] = [6, 17, 1, 58];

/// (family, lo, hi) with addresses as integers.
type Iv = (u8, u128, u128);

/// (proto, family, src lo, src hi, dst lo, dst hi, port lo, port hi)
type Box8 = (u8, u8, u128, u128, u128, u128, u16, u16);

/// (proto, family, dst lo, dst hi, port lo, port hi, merged source intervals)
type Canon = (u8, u8, u128, u128, u16, u16, Vec<(u128, u128)>);

/// Per port range of one destination segment: (port lo, port hi, merged sources).
type Profile = Vec<(u16, u16, Vec<(u128, u128)>)>;

fn fam_max(fam: u8) -> u128 {
    if fam == 4 {
        u32::MAX as u128
    } else {
        u128::MAX
    }
}

fn ip_iv(ip: IpAddr) -> Iv {
    match ip {
        IpAddr::V4(a) => (4, u32::from(a) as u128, u32::from(a) as u128),
        IpAddr::V6(a) => (6, u128::from(a), u128::from(a)),
    }
}

fn net_iv(n: &IpNet) -> Iv {
    match n {
        IpNet::V4(n) => (
            4,
            u32::from(n.network()) as u128,
            u32::from(n.broadcast()) as u128,
        ),
        IpNet::V6(n) => (6, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn parse_ipset(s: &str) -> Option<Vec<Iv>> {
    let s = s.trim();
    if s == "*" {
        return Some(vec![(4, 0, fam_max(4)), (6, 0, fam_max(6))]);
    }
    if !s.contains('/') {
        if let Some((a, b)) = s.split_once('-') {
            let (a, b) = (ip_iv(a.parse().ok()?), ip_iv(b.parse().ok()?));
            return (a.0 == b.0 && a.1 <= b.1).then(|| vec![(a.0, a.1, b.1)]);
        }
        return Some(vec![ip_iv(s.parse().ok()?)]);
    }
    let n: IpNet = s.parse().ok()?;
    Some(vec![net_iv(&n.trunc())])
}

fn boxes_from_wire(rules: &[WireRule]) -> Vec<Box8> {
    let mut out = Vec::new();
    for r in rules {
        let srcs: Vec<Iv> = r
            .SrcIPs
            .iter()
            .flatten()
            .filter_map(|s| parse_ipset(s))
            .flatten()
            .collect();
        let protos: Vec<u8> = match &r.IPProto {
            Some(p) if !p.is_empty() => p.clone(),
            _ => DEFAULT_PROTOS.to_vec(),
        };
        for dp in r.DstPorts.iter().flatten() {
            let Some(dsts) = parse_ipset(&dp.IP) else {
                continue;
            };
            for &proto in &protos {
                for &(sf, slo, shi) in &srcs {
                    for &(df, dlo, dhi) in &dsts {
                        if sf == df {
                            out.push((
                                proto,
                                sf,
                                slo,
                                shi,
                                dlo,
                                dhi,
                                dp.Ports.First,
                                dp.Ports.Last,
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

fn boxes_from_filter(f: &PacketFilter) -> Vec<Box8> {
    let mut out = Vec::new();
    for r in &f.rules {
        let srcs: Vec<Iv> = r.src.iter().map(net_iv).collect();
        for d in &r.dst {
            let dsts: Vec<Iv> = match d.net {
                DstNet::Any => vec![(4, 0, fam_max(4)), (6, 0, fam_max(6))],
                DstNet::Net(n) => vec![net_iv(&n)],
            };
            for &proto in r.effective_protos() {
                for &(sf, slo, shi) in &srcs {
                    for &(df, dlo, dhi) in &dsts {
                        if sf == df {
                            out.push((proto, sf, slo, shi, dlo, dhi, d.ports.first, d.ports.last));
                        }
                    }
                }
            }
        }
    }
    out
}

fn clip(boxes: &[Box8], local: &[Iv]) -> Vec<Box8> {
    let mut out = Vec::new();
    for b in boxes {
        for &(fam, lo, hi) in local {
            if fam != b.1 {
                continue;
            }
            let (l, h) = (b.4.max(lo), b.5.min(hi));
            if l <= h {
                out.push((b.0, b.1, b.2, b.3, l, h, b.6, b.7));
            }
        }
    }
    out
}

fn merge(mut ivs: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ivs.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in ivs {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Elementary segments between boundaries: every lo and every hi+1 (hi at the family's top
/// closes the last segment instead).
fn segments(bounds: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut starts = BTreeSet::new();
    let mut top = None;
    for &(lo, hi) in bounds {
        starts.insert(lo);
        match hi.checked_add(1) {
            Some(h) => {
                starts.insert(h);
            }
            None => top = Some(hi),
        }
    }
    let starts: Vec<u128> = starts.into_iter().collect();
    let mut out = Vec::new();
    for w in starts.windows(2) {
        out.push((w[0], w[1] - 1));
    }
    if let (Some(top), Some(&last)) = (top, starts.last()) {
        out.push((last, top));
    }
    out
}

fn canonical(boxes: &[Box8]) -> Vec<Canon> {
    let mut groups: BTreeMap<(u8, u8), Vec<&Box8>> = BTreeMap::new();
    for b in boxes {
        if (b.0 == 1 && b.1 == 6) || (b.0 == 58 && b.1 == 4) {
            continue;
        }
        groups.entry((b.0, b.1)).or_default().push(b);
    }
    let mut out = Vec::new();
    for ((proto, fam), bs) in groups {
        let dsegs = segments(&bs.iter().map(|b| (b.4, b.5)).collect::<Vec<_>>());
        // (dlo, dhi, profile)
        let mut runs: Vec<(u128, u128, Profile)> = Vec::new();
        for (dlo, dhi) in dsegs {
            let cover: Vec<&&Box8> = bs.iter().filter(|b| b.4 <= dlo && b.5 >= dhi).collect();
            if cover.is_empty() {
                continue;
            }
            let psegs = segments(
                &cover
                    .iter()
                    .map(|b| (b.6 as u128, b.7 as u128))
                    .collect::<Vec<_>>(),
            );
            let mut prof: Profile = Vec::new();
            for (plo, phi) in psegs {
                let (plo, phi) = (plo as u16, phi as u16);
                let srcset = merge(
                    cover
                        .iter()
                        .filter(|b| b.6 <= plo && b.7 >= phi)
                        .map(|b| (b.2, b.3))
                        .collect(),
                );
                if srcset.is_empty() {
                    continue;
                }
                match prof.last_mut() {
                    Some(last) if last.1 as u32 + 1 == plo as u32 && last.2 == srcset => {
                        last.1 = phi;
                    }
                    _ => prof.push((plo, phi, srcset)),
                }
            }
            if prof.is_empty() {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.1.checked_add(1) == Some(dlo) && last.2 == prof => last.1 = dhi,
                _ => runs.push((dlo, dhi, prof)),
            }
        }
        for (dlo, dhi, prof) in runs {
            for (plo, phi, srcset) in prof {
                out.push((proto, fam, dlo, dhi, plo, phi, srcset));
            }
        }
    }
    out
}

/// How many CIDRs cover [lo, hi] (Python's summarize_address_range).
fn cidr_count(fam: u8, lo: u128, hi: u128) -> usize {
    let bits = if fam == 4 { 32 } else { 128 };
    let mut n = 0;
    let mut cur = lo;
    loop {
        let mut size_bits = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while size_bits > 0 {
            let span = if size_bits >= 128 {
                u128::MAX
            } else {
                (1u128 << size_bits) - 1
            };
            if cur.checked_add(span).is_some_and(|end| end <= hi) {
                break;
            }
            size_bits -= 1;
        }
        n += 1;
        let span = if size_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << size_bits) - 1
        };
        match cur.checked_add(span).and_then(|e| e.checked_add(1)) {
            Some(next) if next <= hi => cur = next,
            _ => break,
        }
    }
    n
}

/// The number of (src CIDR, dst CIDR, ports, proto) tuples expand.py prints for this form.
fn tuple_count(c: &[Canon]) -> usize {
    c.iter()
        .map(|(_, fam, dlo, dhi, _, _, srcs)| {
            cidr_count(*fam, *dlo, *dhi)
                * srcs
                    .iter()
                    .map(|&(l, h)| cidr_count(*fam, l, h))
                    .sum::<usize>()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// Driving the compiler.
// ---------------------------------------------------------------------------------------

fn captures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/policy-captures")
}

fn find(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            find(&p, out);
        } else if p.to_string_lossy().ends_with(".hujson.xz") {
            out.push(p);
        }
    }
}

fn read_xz(path: &Path) -> Result<String, String> {
    let out = Command::new("xz")
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("running xz: {e}"))?;
    if !out.status.success() {
        return Err(format!("xz failed on {}", path.display()));
    }
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

fn load(path: &Path) -> Result<Capture, String> {
    let text = read_xz(path)?;
    let body: String = text
        .lines()
        .skip_while(|l| l.trim_start().starts_with("//") || l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    match serde_json::from_str(&body) {
        Ok(c) => Ok(c),
        Err(_) => jsonc_parser::parse_to_serde_value(&text, &Default::default())
            .map_err(|e| format!("{}: {e}", path.display())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Rejected,
    CaptureError,
}

fn status(c: &Capture) -> Status {
    if c.capture_error.as_ref().is_some_and(|v| !v.is_null()) {
        return Status::CaptureError;
    }
    let err = c
        .error
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != &Value::Bool(false));
    if err || c.input.api_response_code.is_some_and(|code| code != 200) {
        return Status::Rejected;
    }
    Status::Ok
}

fn policy_text(c: &Capture) -> String {
    match &c.input.full_policy {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        _ => String::new(),
    }
}

/// Addresses and approved routes: from the node's own netmap, else the topology.
fn addressing(t: &TopoNode, cap: Option<&NodeCapture>) -> (Vec<IpNet>, Vec<IpNet>) {
    if let Some(sn) = cap
        .and_then(|c| c.netmap.as_ref())
        .and_then(|n| n.SelfNode.as_ref())
        .filter(|s| s.Addresses.as_ref().is_some_and(|a| !a.is_empty()))
    {
        let addrs: Vec<String> = sn.Addresses.clone().unwrap_or_default();
        let routes = sn
            .AllowedIPs
            .iter()
            .flatten()
            .filter(|p| !addrs.contains(p))
            .filter_map(|p| p.parse::<IpNet>().ok())
            .collect();
        let addrs = addrs
            .iter()
            .filter_map(|a| a.parse::<IpNet>().ok())
            .collect();
        return (addrs, routes);
    }
    let addrs = [&t.ipv4, &t.ipv6]
        .into_iter()
        .flatten()
        .filter_map(|a| a.parse::<IpAddr>().ok().map(IpNet::from))
        .collect();
    let routes = t
        .approved_routes
        .iter()
        .flatten()
        .filter_map(|p| p.parse::<IpNet>().ok())
        .collect();
    (addrs, routes)
}

struct Tailnet {
    state: PolicyState,
    ids: BTreeMap<String, NodeId>,
    local: BTreeMap<String, Vec<Iv>>,
}

fn tailnet(c: &Capture) -> Tailnet {
    let mut state = PolicyState::default();
    let mut ids = BTreeMap::new();
    let mut local = BTreeMap::new();
    let captures = c.captures.as_ref();
    for (i, (name, t)) in c.topology.nodes.iter().enumerate() {
        let cap = captures.and_then(|m| m.get(name));
        let (addrs, routes) = addressing(t, cap);
        let ipv4 = addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        });
        let ipv6 = addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V6(v) => Some(v),
            IpAddr::V4(_) => None,
        });
        let tags = t.tags.clone().unwrap_or_default();
        let owner = if tags.is_empty() {
            let uname = t.user.clone().unwrap_or_default();
            let u = c.topology.users.iter().find(|u| u.name == uname);
            NodeOwner::User(PolicyUser {
                id: u.map_or(0, |u| u.id),
                name: uname,
                email: u.and_then(|u| u.email.clone()),
            })
        } else {
            let mut tags = tags;
            tags.sort();
            NodeOwner::Tags(tags)
        };
        let id = NodeId(i as u64 + 1);
        let node = PolicyNode {
            id,
            name: name.clone(),
            owner,
            ipv4: ipv4
                .or(Some(Ipv4Addr::UNSPECIFIED))
                .filter(|a| !a.is_unspecified()),
            ipv6: ipv6
                .or(Some(Ipv6Addr::UNSPECIFIED))
                .filter(|a| !a.is_unspecified()),
            approved_routes: routes.clone(),
        };
        state.upsert_node(node);
        ids.insert(name.clone(), id);
        local.insert(
            name.clone(),
            addrs.iter().chain(routes.iter()).map(net_iv).collect(),
        );
    }
    Tailnet { state, ids, local }
}

#[derive(Default, Clone, Copy)]
struct Count {
    ok_pass: usize,
    ok_total: usize,
    plain_pass: usize,
    plain_total: usize,
    rej_pass: usize,
    rej_total: usize,
}

/// Reads `INDEX.tsv`: test id -> (beyond_plain is "-", effective tuple count).
fn index(dir: &Path) -> BTreeMap<String, (bool, usize)> {
    let Ok(text) = std::fs::read_to_string(dir.join("INDEX.tsv")) else {
        return BTreeMap::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            Some((
                cols.get(1)?.to_string(),
                (*cols.get(8)? == "-", cols.get(6)?.parse().ok()?),
            ))
        })
        .collect()
}

fn fmt_canon(c: &Canon) -> String {
    let (proto, fam, dlo, dhi, plo, phi, srcs) = c;
    let ip = |v: u128| -> String {
        if *fam == 4 {
            Ipv4Addr::from(v as u32).to_string()
        } else {
            Ipv6Addr::from(v).to_string()
        }
    };
    let s: Vec<String> = srcs
        .iter()
        .map(|&(l, h)| format!("{}-{}", ip(l), ip(h)))
        .collect();
    format!(
        "p{proto} dst {}-{} ports {plo}-{phi} src [{}]",
        ip(*dlo),
        ip(*dhi),
        s.join(", ")
    )
}

/// Compare one usable capture; returns the mismatches.
fn check_ok(c: &Capture, expected_tuples: Option<usize>, problems: &mut Vec<String>) -> bool {
    let text = policy_text(c);
    let policy = match CompiledPolicy::from_text(&text) {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("refused: {e}"));
            return false;
        }
    };
    let mut net = tailnet(c);
    if let Err(e) = net.state.set_policy(Arc::new(policy)) {
        problems.push(format!("refused: {e}"));
        return false;
    }
    let mut ok = true;
    let mut tuples = 0;
    let by_id: BTreeMap<NodeId, String> = net.ids.iter().map(|(n, i)| (*i, n.clone())).collect();
    for (name, cap) in c.captures.iter().flatten() {
        let Some(&id) = net.ids.get(name) else {
            continue;
        };
        let local = &net.local[name];
        let want = canonical(&clip(
            &boxes_from_wire(cap.packet_filter_rules.as_deref().unwrap_or(&[])),
            local,
        ));
        tuples += tuple_count(&want);
        let filter = net.state.filter_for(id).unwrap_or_default();
        let got = canonical(&clip(&boxes_from_filter(&filter), local));
        if got != want {
            ok = false;
            let missing: Vec<String> = want
                .iter()
                .filter(|w| !got.contains(w))
                .map(fmt_canon)
                .collect();
            let extra: Vec<String> = got
                .iter()
                .filter(|g| !want.contains(g))
                .map(fmt_canon)
                .collect();
            problems.push(format!(
                "{name}: filter differs\n      missing: {}\n      extra:   {}",
                missing.join("\n               "),
                extra.join("\n               ")
            ));
        }
        if let Some(peers) = cap.netmap.as_ref().and_then(|n| n.Peers.as_ref()) {
            let want: BTreeSet<String> = peers
                .iter()
                .map(|p| p.Name.split('.').next().unwrap_or_default().to_string())
                .collect();
            let got: BTreeSet<String> = net
                .state
                .peers_of(id)
                .unwrap_or_default()
                .iter()
                .filter_map(|i| by_id.get(i).cloned())
                .collect();
            if got != want {
                ok = false;
                problems.push(format!(
                    "{name}: peers differ: missing {:?}, extra {:?}",
                    want.difference(&got).collect::<Vec<_>>(),
                    got.difference(&want).collect::<Vec<_>>()
                ));
            }
        }
    }
    if let Some(t) = expected_tuples {
        assert_eq!(
            tuples, t,
            "{}: the normaliser disagrees with expand.py's effective tuple count",
            c.test_id
        );
    }
    ok
}

fn check_rejected(c: &Capture, problems: &mut Vec<String>) -> bool {
    let text = policy_text(c);
    let policy = match CompiledPolicy::from_text(&text) {
        Ok(p) => p,
        Err(_) => return true,
    };
    let mut net = tailnet(c);
    match net.state.set_policy(Arc::new(policy)) {
        Err(_) => true,
        Ok(_) => {
            problems.push("accepted a policy Tailscale rejected".to_string());
            false
        }
    }
}

#[test]
fn tailscale_captures() {
    let dir = captures_dir();
    let mut files = Vec::new();
    find(&dir.join("captures"), &mut files);
    // CI sets WARREN_CONFORMANCE_REQUIRED: there a skip is a failure.
    let required = std::env::var_os("WARREN_CONFORMANCE_REQUIRED").is_some_and(|v| v != "0");
    let skip = |why: String| {
        assert!(!required, "policy conformance cannot run: {why}");
        println!("policy conformance: skipped, {why}");
    };
    if files.is_empty() {
        skip(format!("no captures at {}", dir.display()));
        return;
    }
    if Command::new("xz").arg("--version").output().is_err() {
        skip("the xz program (xz-utils) is not installed".to_owned());
        return;
    }
    files.sort();
    let only = std::env::var("WARREN_CONFORMANCE_ONLY").ok();
    let verbose = std::env::var_os("WARREN_CONFORMANCE_VERBOSE").is_some();
    let idx = index(&dir);
    let mut counts: BTreeMap<String, Count> = BTreeMap::new();
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let category = path
            .parent()
            .and_then(Path::file_name)
            .map(|d| d.to_string_lossy().trim_end_matches("_results").to_string())
            .unwrap_or_default();
        let c = load(path).unwrap_or_else(|e| panic!("{e}"));
        let (plain, tuples) = idx
            .get(&c.test_id)
            .copied()
            .map_or((false, None), |(p, t)| (p, Some(t)));
        let count = counts.entry(category.clone()).or_default();
        let mut problems = Vec::new();
        match status(&c) {
            Status::CaptureError => continue,
            Status::Rejected => {
                count.rej_total += 1;
                if check_rejected(&c, &mut problems) {
                    count.rej_pass += 1;
                }
            }
            Status::Ok => {
                count.ok_total += 1;
                if plain {
                    count.plain_total += 1;
                }
                if check_ok(&c, tuples, &mut problems) {
                    count.ok_pass += 1;
                    if plain {
                        count.plain_pass += 1;
                    }
                }
            }
        }
        if verbose && !problems.is_empty() {
            println!(
                "FAIL {} ({category}{})",
                c.test_id,
                if plain { ", plain" } else { "" }
            );
            for p in &problems {
                println!("    {p}");
            }
        }
    }
    println!();
    println!(
        "{:<12} {:>16} {:>16} {:>16}",
        "category", "usable passed", "plain passed", "rejected refused"
    );
    let mut total = Count::default();
    for (cat, c) in &counts {
        println!(
            "{:<12} {:>16} {:>16} {:>16}",
            cat,
            format!("{}/{}", c.ok_pass, c.ok_total),
            format!("{}/{}", c.plain_pass, c.plain_total),
            format!("{}/{}", c.rej_pass, c.rej_total)
        );
        total.ok_pass += c.ok_pass;
        total.ok_total += c.ok_total;
        total.plain_pass += c.plain_pass;
        total.plain_total += c.plain_total;
        total.rej_pass += c.rej_pass;
        total.rej_total += c.rej_total;
    }
    println!(
        "{:<12} {:>16} {:>16} {:>16}",
        "total",
        format!("{}/{}", total.ok_pass, total.ok_total),
        format!("{}/{}", total.plain_pass, total.plain_total),
        format!("{}/{}", total.rej_pass, total.rej_total)
    );
    if only.is_none() {
        for &(cat, ok_floor, rej_floor) in FLOORS {
            let c = counts.get(cat).copied().unwrap_or_default();
            assert!(
                c.ok_pass >= ok_floor,
                "{cat}: {} usable captures pass, floor is {ok_floor}",
                c.ok_pass
            );
            assert!(
                c.rej_pass >= rej_floor,
                "{cat}: {} rejected captures refused, floor is {rej_floor}",
                c.rej_pass
            );
        }
    }
}
