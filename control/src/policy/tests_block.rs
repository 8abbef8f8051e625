//! Point decisions ("may this address reach that one on this port?") evaluated straight from
//! the compiled rules, and the `tests` block run with them. Being independent of the
//! incremental index, it also serves as the reference the index is checked against.

use std::net::IpAddr;

use super::alias::{Alias, AutoGroup, in_set, internet_prefixes, parse_alias};
use super::compile::{Access, CompiledPolicy, Selector, Target};
use super::error::{PolicyError, TestFailure, TestProblem};
use super::node::{NodeOwner, PolicyNode};
use super::parse::{PolicyTest, split_test_dst};
use super::ports::proto;
use super::state::{Nodes, Role, node_matches};

fn src_has(nodes: &Nodes, sel: &Selector, ip: IpAddr) -> bool {
    match sel {
        Selector::All => nodes.in_star(ip),
        Selector::Everything => true,
        Selector::Prefix(p) => p.contains(&ip),
        Selector::Internet => false,
        _ => nodes
            .owner_of(ip)
            .is_some_and(|n| node_matches(sel, Role::Src, n)),
    }
}

fn dst_has(nodes: &Nodes, sel: &Selector, ip: IpAddr) -> bool {
    match sel {
        Selector::All | Selector::Everything => true,
        Selector::Prefix(p) => p.contains(&ip),
        Selector::Internet => in_set(internet_prefixes(), ip),
        _ => nodes
            .owner_of(ip)
            .is_some_and(|n| node_matches(sel, Role::Dst, n)),
    }
}

/// Whether a via-tagged node carries traffic to `ip` (routes it, or is an exit node for it).
fn via_reaches(nodes: &Nodes, via: &[String], ip: IpAddr) -> bool {
    nodes.iter().any(|(_, n)| {
        n.tags().iter().any(|t| via.contains(t))
            && (n.subnet_routes().any(|r| r.contains(&ip))
                || (n.is_exit_node() && in_set(internet_prefixes(), ip))
                || n.addresses().any(|a| a == ip))
    })
}

fn same_user(a: Option<&PolicyNode>, b: Option<&PolicyNode>) -> bool {
    match (a.map(|n| &n.owner), b.map(|n| &n.owner)) {
        (Some(NodeOwner::User(x)), Some(NodeOwner::User(y))) => x.id == y.id,
        _ => false,
    }
}

/// The index of the first rule that lets `src` send to `dst` on `port` with `ip_proto`.
pub(crate) fn decide(
    policy: &CompiledPolicy,
    nodes: &Nodes,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    ip_proto: u8,
) -> Option<usize> {
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    policy.rules().iter().position(|rule| {
        let b = &rule.body;
        if b.access != Access::Ip {
            return false;
        }
        let protos: &[u8] = if b.protos.is_empty() {
            &proto::DEFAULT
        } else {
            &b.protos
        };
        if !protos.contains(&ip_proto) {
            return false;
        }
        if !b.src.iter().any(|s| src_has(nodes, s, src)) {
            return false;
        }
        if !b.via.is_empty() && !via_reaches(nodes, &b.via, dst) {
            return false;
        }
        b.dst.iter().any(|d| {
            d.ports.iter().any(|p| p.contains(port))
                && match &d.target {
                    Target::Sel(s) => dst_has(nodes, s, dst),
                    Target::SelfDevices => {
                        let (a, z) = (nodes.owner_of(src), nodes.owner_of(dst));
                        same_user(a, z)
                    }
                }
        })
    })
}

/// The addresses an alias in a test stands for, or why it cannot be used.
fn test_addresses(
    policy: &CompiledPolicy,
    nodes: &Nodes,
    text: &str,
    dst: bool,
) -> Option<Vec<IpAddr>> {
    let alias = parse_alias(text).ok()?;
    let sels: Vec<Selector> = match &alias {
        Alias::Prefix(p) => {
            // A plain address only: `10.0.0.0/8` and `100.64.0.16/32` are refused.
            return text.parse::<IpAddr>().ok().map(|_| vec![p.addr()]);
        }
        Alias::Host(h) => {
            let p = policy.host(h)?;
            return (p.prefix_len() == p.max_prefix_len()).then(|| vec![p.addr()]);
        }
        Alias::User(u) => vec![Selector::User(u.clone())],
        Alias::UserDomain(d) => vec![Selector::UserDomain(d.clone())],
        Alias::Group(g) => policy
            .group(g)?
            .iter()
            .map(|u| Selector::User(u.clone()))
            .collect(),
        Alias::Tag(t) => {
            if !policy.tag_defined(t) {
                return None;
            }
            vec![Selector::Tag(t.clone())]
        }
        Alias::AutoGroup(AutoGroup::Member) if !dst => vec![Selector::Member],
        Alias::AutoGroup(AutoGroup::Tagged) if !dst => vec![Selector::Tagged],
        _ => return None,
    };
    let role = if dst { Role::Dst } else { Role::Src };
    let mut out: Vec<IpAddr> = nodes
        .iter()
        .filter(|(_, n)| sels.iter().any(|s| node_matches(s, role, n)))
        .flat_map(|(_, n)| n.addresses().collect::<Vec<_>>())
        .collect();
    out.sort_unstable();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

/// Whether every source address may reach every destination address of its family (and at
/// least one pair exists).
fn all_allowed(
    policy: &CompiledPolicy,
    nodes: &Nodes,
    srcs: &[IpAddr],
    dsts: &[IpAddr],
    port: u16,
    ip_proto: u8,
) -> bool {
    let mut pairs = 0;
    for &s in srcs {
        for &d in dsts {
            if s.is_ipv4() != d.is_ipv4() {
                continue;
            }
            pairs += 1;
            if decide(policy, nodes, s, d, port, ip_proto).is_none() {
                return false;
            }
        }
    }
    pairs > 0
}

fn run_one(policy: &CompiledPolicy, nodes: &Nodes, t: &PolicyTest) -> Vec<TestProblem> {
    let Some(src) = t.src.as_deref().filter(|s| !s.is_empty()) else {
        return vec![TestProblem::MissingSrc];
    };
    if t.accept.is_empty() && t.deny.is_empty() {
        return vec![TestProblem::MissingExpectations];
    }
    let ip_proto = match t.proto.as_deref() {
        None | Some("") => proto::TCP,
        Some(p) => match super::ports::parse_proto(p) {
            Some(n @ (proto::TCP | proto::UDP | proto::SCTP)) => n,
            _ => {
                return vec![TestProblem::BadProto {
                    proto: p.to_string(),
                }];
            }
        },
    };
    let Some(srcs) = test_addresses(policy, nodes, src, false) else {
        return vec![TestProblem::UnknownAlias {
            alias: src.to_string(),
        }];
    };
    let mut problems = Vec::new();
    for (dst, want) in t
        .accept
        .iter()
        .map(|d| (d, true))
        .chain(t.deny.iter().map(|d| (d, false)))
    {
        let parsed = split_test_dst(dst).and_then(|(host, port)| {
            let port = (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
                .then(|| port.parse::<u16>().ok())
                .flatten()
                .filter(|&p| p > 0)?;
            Some((host, port))
        });
        let Some((host, port)) = parsed else {
            problems.push(TestProblem::BadDestination { dst: dst.clone() });
            continue;
        };
        let Some(dsts) = test_addresses(policy, nodes, host, true) else {
            problems.push(TestProblem::UnknownAlias {
                alias: host.to_string(),
            });
            continue;
        };
        let allowed = all_allowed(policy, nodes, &srcs, &dsts, port, ip_proto);
        if allowed != want {
            problems.push(if want {
                TestProblem::NotAllowed { dst: dst.clone() }
            } else {
                TestProblem::NotDenied { dst: dst.clone() }
            });
        }
    }
    problems
}

/// Run a policy's `tests` against `nodes`.
pub(crate) fn run(policy: &CompiledPolicy, nodes: &Nodes) -> Result<(), PolicyError> {
    let mut failures = Vec::new();
    for (index, t) in policy.tests().iter().enumerate() {
        for problem in run_one(policy, nodes, t) {
            failures.push(TestFailure {
                index,
                at: t.at,
                src: t.src.clone().unwrap_or_default(),
                problem,
            });
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(PolicyError::TestsFailed { failures })
    }
}
