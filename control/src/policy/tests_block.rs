//! Point decisions ("may this address reach that one on this port?") evaluated straight from
//! the compiled rules, and the `tests` block run with them. Being independent of the
//! incremental index, it also serves as the reference the index is checked against.

use std::net::IpAddr;

use super::alias::{Alias, AutoGroup, in_set, internet_prefixes, parse_alias};
use super::compile::{Access, CompiledPolicy, Selector, Target};
use super::error::{PolicyError, TestBlock, TestFailure, TestProblem};
use super::node::{NodeOwner, PolicyNode};
use super::parse::{PolicyTest, SshTest, split_test_dst};
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
    // A tag or group the policy defines but no node carries yet: nothing to check, which is
    // not an unknown alias. A user is known only through its nodes, so a user with none stays
    // unknown, as Tailscale rejects a test naming an unknown user.
    let defined_by_policy = matches!(alias, Alias::Tag(_) | Alias::Group(_));
    (defined_by_policy || !out.is_empty()).then_some(out)
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
    // A test about a tag or group no node carries yet holds vacuously: it cannot fail before
    // the nodes exist (so a new mesh can set its policy, tests included, before registering
    // them: tagged keys need the tag in tagOwners first), and it is checked again on every
    // later set, reload and check.
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
        if srcs.is_empty() || dsts.is_empty() {
            continue;
        }
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
                block: TestBlock::Tests,
                index,
                at: t.at,
                src: t.src.clone().unwrap_or_default(),
                problem,
            });
        }
    }
    for (index, t) in policy.ssh_tests().iter().enumerate() {
        for problem in run_ssh_one(policy, nodes, t) {
            failures.push(TestFailure {
                block: TestBlock::SshTests,
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

/// The nodes an alias in an `sshTests` entry names: a user, group, tag, host or IPv4 address
/// of a node (Tailscale refuses IPv6 literals there).
fn ssh_test_nodes<'n>(
    policy: &CompiledPolicy,
    nodes: &'n Nodes,
    text: &str,
    role: Role,
) -> Option<Vec<&'n PolicyNode>> {
    let alias = parse_alias(text).ok()?;
    let sels: Vec<Selector> = match &alias {
        Alias::Prefix(_) => {
            let ip = text.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4)?;
            return nodes.owner_of(ip).map(|n| vec![n]);
        }
        Alias::Host(h) => {
            let p = policy.host(h)?;
            return nodes.owner_of(p.addr()).map(|n| vec![n]);
        }
        Alias::User(u) => vec![Selector::User(u.clone())],
        Alias::UserDomain(d) => vec![Selector::UserDomain(d.clone())],
        Alias::Group(g) => policy
            .group(g)?
            .iter()
            .map(|u| Selector::User(u.clone()))
            .collect(),
        Alias::Tag(t) if policy.tag_defined(t) => vec![Selector::Tag(t.clone())],
        Alias::AutoGroup(AutoGroup::Member) => vec![Selector::Member],
        Alias::AutoGroup(AutoGroup::Tagged) => vec![Selector::Tagged],
        _ => return None,
    };
    let out: Vec<&PolicyNode> = nodes
        .iter()
        .filter(|(_, n)| sels.iter().any(|s| node_matches(s, role, n)))
        .map(|(_, n)| n)
        .collect();
    (!out.is_empty()).then_some(out)
}

/// Whether a rule's login users admit `user` for a connection from `src`.
fn login_allowed(users: &[String], user: &str, src: &PolicyNode) -> bool {
    users.iter().any(|u| {
        if u == user {
            return true;
        }
        if u == "autogroup:nonroot" {
            return user != "root";
        }
        if let Some(domain) = u.strip_prefix("localpart:*@") {
            let NodeOwner::User(owner) = &src.owner else {
                return false;
            };
            return owner
                .email
                .as_deref()
                .and_then(|e| e.split_once('@'))
                .is_some_and(|(local, d)| d == domain && local == user);
        }
        false
    })
}

/// Whether some `ssh` rule lets `src` log in to `dst` as `user`.
fn ssh_allowed(policy: &CompiledPolicy, src: &PolicyNode, dst: &PolicyNode, user: &str) -> bool {
    policy.ssh_rules().iter().any(|r| {
        r.src.iter().any(|s| node_matches(s, Role::Src, src))
            && r.dst.iter().any(|d| match d {
                Target::Sel(s) => node_matches(s, Role::Dst, dst),
                Target::SelfDevices => same_user(Some(src), Some(dst)),
            })
            && login_allowed(&r.users, user, src)
    })
}

fn run_ssh_one(policy: &CompiledPolicy, nodes: &Nodes, t: &SshTest) -> Vec<TestProblem> {
    let Some(src) = t.src.as_deref().filter(|s| !s.is_empty()) else {
        return vec![TestProblem::MissingSrc];
    };
    if t.accept.is_empty() && t.check.is_empty() && t.deny.is_empty() {
        return vec![TestProblem::MissingExpectations];
    }
    if t.accept
        .iter()
        .chain(&t.check)
        .chain(&t.deny)
        .any(String::is_empty)
    {
        return vec![TestProblem::BadLoginUser];
    }
    let Some(srcs) = ssh_test_nodes(policy, nodes, src, Role::Src) else {
        return vec![TestProblem::UnknownAlias {
            alias: src.to_string(),
        }];
    };
    let mut problems = Vec::new();
    for dst in &t.dst {
        let Some(dsts) = ssh_test_nodes(policy, nodes, dst, Role::Dst) else {
            problems.push(TestProblem::UnknownAlias { alias: dst.clone() });
            continue;
        };
        let all = |user: &str| {
            srcs.iter()
                .all(|s| dsts.iter().all(|d| ssh_allowed(policy, s, d, user)))
        };
        for user in t.accept.iter().chain(&t.check) {
            if !all(user) {
                problems.push(TestProblem::SshNotAllowed {
                    dst: dst.clone(),
                    user: user.clone(),
                });
            }
        }
        for user in &t.deny {
            if all(user) {
                problems.push(TestProblem::SshNotDenied {
                    dst: dst.clone(),
                    user: user.clone(),
                });
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    use crate::policy::{CompiledPolicy, PolicyError, PolicyNode, PolicyState, TestProblem};

    const TAGS: &str = r#"{
      "tagOwners": {"tag:a": ["alice@"], "tag:b": ["alice@"]},
      "acls": [],
      "tests": [{"src": "tag:a", "accept": ["tag:b:22"]}]
    }"#;

    fn tagged(id: u64, tag: &str) -> PolicyNode {
        let n = u8::try_from(id).expect("small");
        PolicyNode::tagged(
            id,
            &format!("n{id}"),
            &[tag],
            Ipv4Addr::new(100, 64, 0, n),
            Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, u16::from(n)),
        )
    }

    #[test]
    fn a_test_about_tags_no_node_carries_yet_holds_until_they_exist() {
        let policy = Arc::new(CompiledPolicy::from_text(TAGS).expect("compiles"));
        // A new mesh: the tags are defined (tagged keys need that) but no node has them.
        let empty = PolicyState::new(Arc::new(CompiledPolicy::allow_all()));
        assert_eq!(empty.check(&policy), Ok(()));
        // Once nodes carry them, the test is checked, and fails: no rule lets a reach b.
        let mut state = PolicyState::new(Arc::new(CompiledPolicy::allow_all()));
        state.upsert_node(tagged(1, "tag:a"));
        state.upsert_node(tagged(2, "tag:b"));
        match state.check(&policy) {
            Err(PolicyError::TestsFailed { failures }) => {
                assert_eq!(failures.len(), 1);
                assert_eq!(
                    failures[0].problem,
                    TestProblem::NotAllowed {
                        dst: "tag:b:22".into()
                    }
                );
            }
            other => panic!("expected the test to fail, got {other:?}"),
        }
        // An undefined tag is still an unknown alias, nodes or not.
        let undefined = CompiledPolicy::from_text(
            r#"{"tagOwners": {"tag:a": ["alice@"]}, "tests": [{"src": "tag:a", "accept": ["tag:zz:22"]}]}"#,
        );
        let undefined = undefined.expect("compiles");
        match empty.check(&undefined) {
            Err(PolicyError::TestsFailed { failures }) => assert_eq!(
                failures.iter().map(|f| &f.problem).collect::<Vec<_>>(),
                [&TestProblem::UnknownAlias {
                    alias: "tag:zz".into()
                }]
            ),
            other => panic!("expected an unknown alias, got {other:?}"),
        }
    }
}
