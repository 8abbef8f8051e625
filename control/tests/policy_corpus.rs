//! The policy corpus (`tests/policy/*.hujson`): valid files carry an allow/deny matrix and peer
//! lists as comments and are checked against a fixed lab of nodes, through `explain`, the
//! destination's packet filter (both must agree) and `peers_of`; `err_*` files must be refused
//! with exactly the error below. Every file in the directory is checked, and every file must
//! be expected (no file passes by having no expectations).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use warren_control::policy::{
    AliasPosition, CapabilityProblem, CompiledPolicy, NodeId, Place, PolicyError, PolicyNode,
    PolicyState, PolicyUser, PortProblem, Pos, Section, TestBlock, TestFailure, TestProblem, proto,
};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(corpus_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The lab: (id, name, owner: user name or tags, routes).
const LAB: &[(u8, &str, &str, &[&str])] = &[
    (1, "alice-laptop", "alice", &[]),
    (2, "alice-phone", "alice", &[]),
    (3, "bob-laptop", "bob", &[]),
    (4, "carol-desktop", "carol", &[]),
    (10, "web", "tag:web", &[]),
    (11, "db", "tag:db", &[]),
    (20, "homelab1", "tag:homelab", &[]),
    (21, "homelab2", "tag:homelab", &[]),
    (30, "mobile1", "tag:mobile", &[]),
    (31, "mobile2", "tag:mobile", &[]),
    (40, "router", "tag:router", &["192.168.1.0/24"]),
    (50, "exit", "tag:exit", &["0.0.0.0/0", "::/0"]),
];

fn user(name: &str) -> PolicyUser {
    let (id, email) = match name {
        "alice" => (1, "alice@example.com"),
        "bob" => (2, "bob@example.com"),
        _ => (3, "carol@example.org"),
    };
    PolicyUser {
        id,
        name: name.to_string(),
        email: Some(email.to_string()),
    }
}

fn lab_node(id: u8, name: &str, owner: &str, routes: &[&str]) -> PolicyNode {
    let v4 = Ipv4Addr::new(100, 64, 0, id);
    // fd7a:115c:a1e0::N with N written in decimal digits, as the corpus files write it.
    let v6: Ipv6Addr = format!("fd7a:115c:a1e0::{id}").parse().expect("v6");
    let mut n = if owner.starts_with("tag:") {
        PolicyNode::tagged(u64::from(id), name, &[owner], v4, v6)
    } else {
        PolicyNode::user(u64::from(id), name, user(owner), v4, v6)
    };
    n.approved_routes = routes
        .iter()
        .map(|r| r.parse::<IpNet>().expect("route"))
        .collect();
    n
}

fn lab() -> (PolicyState, BTreeMap<String, NodeId>) {
    let mut state = PolicyState::default();
    let mut names = BTreeMap::new();
    for &(id, name, owner, routes) in LAB {
        state.upsert_node(lab_node(id, name, owner, routes));
        names.insert(name.to_string(), NodeId(u64::from(id)));
    }
    (state, names)
}

/// A node name (`NAME` for its IPv4 address, `NAME/6` for its IPv6) or an address.
fn addr(names: &BTreeMap<String, NodeId>, state: &PolicyState, text: &str) -> IpAddr {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return ip;
    }
    let (name, v6) = match text.strip_suffix("/6") {
        Some(n) => (n, true),
        None => (text, false),
    };
    let id = names
        .get(name)
        .unwrap_or_else(|| panic!("unknown node {name}"));
    let n = state.node(*id).expect("lab node");
    if v6 {
        IpAddr::V6(n.ipv6.expect("v6"))
    } else {
        IpAddr::V4(n.ipv4.expect("v4"))
    }
}

fn parse_proto(text: &str) -> u8 {
    match text {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "icmp" => proto::ICMP,
        n => n.parse().expect("protocol number"),
    }
}

/// Checks the `// allow`, `// deny` and `// peers` lines of a valid file; returns how many.
fn check_expectations(file: &str, text: &str) -> usize {
    let policy = CompiledPolicy::from_text(text).unwrap_or_else(|e| panic!("{file}: {e}"));
    let (mut state, names) = lab();
    state
        .set_policy(Arc::new(policy))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut checked = 0;
    for (lineno, line) in text.lines().enumerate() {
        let Some(body) = line.trim().strip_prefix("//") else {
            continue;
        };
        let body = body.trim();
        let ctx = format!("{file}:{}: {body}", lineno + 1);
        if let Some(rest) = body.strip_prefix("peers ") {
            let (node, list) = rest.split_once(':').expect("peers NODE: ...");
            let id = names[node.trim()];
            let mut want: Vec<NodeId> = list.split_whitespace().map(|n| names[n]).collect();
            want.sort();
            assert_eq!(state.peers_of(id), Some(want), "{ctx}");
            checked += 1;
            continue;
        }
        let (want, rest) = if let Some(r) = body.strip_prefix("allow ") {
            (true, r)
        } else if let Some(r) = body.strip_prefix("deny ") {
            (false, r)
        } else {
            continue;
        };
        let (rest, via) = match rest.split_once(" via ") {
            Some((r, v)) => (r, Some(names[v.trim()])),
            None => (rest, None),
        };
        let (src, dst) = rest.split_once("->").expect("SRC -> DST:PORT");
        let (dst_host, port_proto) = dst.trim().rsplit_once(':').expect("DST:PORT");
        let (port, proto) = match port_proto.split_once('/') {
            Some((port, p)) => (port, parse_proto(p)),
            None => (port_proto, proto::TCP),
        };
        let (s, d) = (
            addr(&names, &state, src.trim()),
            addr(&names, &state, dst_host),
        );
        let port: u16 = port.parse().expect("port");
        let ex = state.explain(s, d, port, proto);
        assert_eq!(ex.allowed, want, "{ctx}: explain says {ex:?}");
        assert_eq!(ex.rule.is_some(), want, "{ctx}: a rule decides an allow");
        let holder = via.or(ex.dst_node).expect("destination node or via");
        let filter = state.filter_for(holder).expect("node");
        assert_eq!(
            filter.allows(s, d, port, proto),
            want,
            "{ctx}: the filter of node {holder} disagrees"
        );
        checked += 1;
    }
    checked
}

#[test]
fn valid_files_meet_their_matrices() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("corpus dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "hujson"))
        .collect();
    files.sort();
    let mut valid = 0;
    for p in &files {
        let name = p.file_name().expect("name").to_string_lossy().to_string();
        if name.starts_with("err_") {
            assert!(
                expected_error(&name).is_some(),
                "{name}: no expected error listed in this test"
            );
            continue;
        }
        let n = check_expectations(&name, &read(&name));
        assert!(n >= 3, "{name}: only {n} expectations");
        valid += 1;
    }
    assert!(valid >= 10, "{valid} valid corpus files");
}

type Check = fn(&PolicyError) -> bool;

fn at(line: u32, col: u32) -> Pos {
    Pos { line, col }
}

/// The exact error each `err_*` file must produce.
fn expected_error(name: &str) -> Option<Check> {
    let check: Check = match name {
        "err_syntax.hujson" => |e| {
            matches!(
                e,
                PolicyError::Syntax {
                    at: Pos { line: 3, col: 24 },
                    ..
                }
            )
        },
        "err_unknown_field.hujson" => |e| {
            *e == PolicyError::UnknownField {
                at: at(3, 3),
                place: Place::Root,
                field: "ipsets".into(),
            }
        },
        "err_unknown_rule_field.hujson" => |e| {
            *e == PolicyError::UnknownField {
                at: at(4, 40),
                place: Place::Acl {
                    index: 1,
                    field: "",
                },
                field: "ports".into(),
            }
        },
        "err_undefined_group.hujson" => |e| {
            *e == PolicyError::UndefinedGroup {
                at: at(4, 47),
                place: Place::Acl {
                    index: 0,
                    field: "src",
                },
                group: "group:opps".into(),
            }
        },
        "err_undefined_tag.hujson" => |e| {
            *e == PolicyError::UndefinedTag {
                at: at(5, 48),
                place: Place::Acl {
                    index: 1,
                    field: "dst",
                },
                tag: "tag:wbe".into(),
            }
        },
        "err_undefined_host.hujson" => |e| {
            *e == PolicyError::UndefinedHost {
                at: at(4, 28),
                place: Place::Grant {
                    index: 0,
                    field: "dst",
                },
                host: "webservr".into(),
            }
        },
        "err_bad_port.hujson" => |e| {
            *e == PolicyError::BadPort {
                at: at(4, 48),
                place: Place::Acl {
                    index: 0,
                    field: "dst",
                },
                value: "http".into(),
                problem: PortProblem::NotANumber,
            }
        },
        "err_port_zero.hujson" => |e| {
            *e == PolicyError::BadPort {
                at: at(4, 47),
                place: Place::Grant {
                    index: 0,
                    field: "ip",
                },
                value: "0".into(),
                problem: PortProblem::Zero,
            }
        },
        "err_port_range_reversed.hujson" => {
            |e| matches!(e, PolicyError::BadPort { value, problem: PortProblem::Reversed, .. } if value == "9000-8000")
        }
        "err_missing_port.hujson" => {
            |e| matches!(e, PolicyError::BadPort { value, problem: PortProblem::NotANumber, place: Place::Acl { index: 0, field: "dst" }, .. } if value == "self")
        }
        "err_bad_cidr.hujson" => |e| {
            *e == PolicyError::BadCidr {
                at: at(4, 12),
                place: Place::Host { name: "wan".into() },
                value: "10.0.0.0/33".into(),
            }
        },
        "err_bad_cidr_in_rule.hujson" => {
            |e| matches!(e, PolicyError::BadCidr { place: Place::Acl { index: 0, field: "src" }, value, .. } if value == "300.1.2.3")
        }
        "err_bad_proto.hujson" => {
            |e| matches!(e, PolicyError::BadProto { place: Place::Acl { index: 0, field: "proto" }, value, .. } if value == "tcpp")
        }
        "err_ports_on_icmp.hujson" => |e| {
            matches!(
                e,
                PolicyError::PortsWithoutPortProto {
                    place: Place::Acl {
                        index: 0,
                        field: "dst"
                    },
                    proto: 1,
                    ..
                }
            )
        },
        "err_self_in_src.hujson" => {
            |e| matches!(e, PolicyError::AliasNotAllowed { place: Place::Acl { index: 0, field: "src" }, alias, position: AliasPosition::Src, .. } if alias == "autogroup:self")
        }
        "err_internet_in_src.hujson" => {
            |e| matches!(e, PolicyError::AliasNotAllowed { alias, position: AliasPosition::Src, .. } if alias == "autogroup:internet")
        }
        "err_self_with_tag_src.hujson" => {
            |e| matches!(e, PolicyError::SelfWithSource { at: Pos { line: 5, .. }, place: Place::Acl { index: 1, field: "src" }, alias } if alias == "tag:web")
        }
        "err_self_wildcard_grant.hujson" => {
            |e| matches!(e, PolicyError::SelfWithSource { place: Place::Grant { index: 0, field: "src" }, alias, .. } if alias == "*")
        }
        "err_danger_all_dst.hujson" => {
            |e| matches!(e, PolicyError::AliasNotAllowed { place: Place::Grant { index: 0, field: "dst" }, alias, position: AliasPosition::Dst, .. } if alias == "autogroup:danger-all")
        }
        "err_all_addresses_dst.hujson" => {
            |e| matches!(e, PolicyError::AllAddressesDst { place: Place::Grant { index: 0, field: "dst" }, value, .. } if value == "0.0.0.0/0")
        }
        "err_deny_action.hujson" => |e| {
            *e == PolicyError::UnsupportedAction {
                at: at(3, 16),
                index: 0,
                action: "deny".into(),
            }
        },
        "err_missing_dst.hujson" => |e| {
            *e == PolicyError::MissingField {
                at: at(3, 5),
                place: Place::Acl {
                    index: 0,
                    field: "",
                },
                field: "dst",
            }
        },
        "err_wrong_type.hujson" => |e| {
            *e == PolicyError::WrongType {
                at: at(2, 11),
                place: Place::Section { name: "acls" },
                expected: "a list",
            }
        },
        "err_tag_name.hujson" => {
            |e| matches!(e, PolicyError::BadTagName { place: Place::TagOwner { tag }, .. } if tag == "tag:1web")
        }
        "err_group_member.hujson" => {
            |e| matches!(e, PolicyError::BadGroupMember { at: Pos { line: 4, .. }, place: Place::Group { name }, member } if name == "group:outer" && member == "group:inner")
        }
        "err_owner_kind.hujson" => {
            |e| matches!(e, PolicyError::AliasNotAllowed { place: Place::TagOwner { tag }, position: AliasPosition::Owner, .. } if tag == "tag:web")
        }
        "err_via_not_tag.hujson" => |e| {
            matches!(
                e,
                PolicyError::AliasNotAllowed {
                    place: Place::Grant {
                        index: 0,
                        field: "via"
                    },
                    position: AliasPosition::Via,
                    ..
                }
            )
        },
        "err_empty_grant.hujson" => |e| matches!(e, PolicyError::EmptyGrant { index: 0, .. }),
        "err_capability.hujson" => {
            |e| matches!(e, PolicyError::BadCapability { name, problem: CapabilityProblem::Reserved, .. } if name == "tailscale.com/cap/funnel")
        }
        "err_unknown_autogroup.hujson" => {
            |e| matches!(e, PolicyError::BadAlias { alias, .. } if alias == "autogroup:everyone")
        }
        "err_tests_fail.hujson" => |e| {
            *e == PolicyError::TestsFailed {
                failures: vec![
                    TestFailure {
                        block: TestBlock::Tests,
                        index: 1,
                        at: at(8, 5),
                        src: "carol@example.org".into(),
                        problem: TestProblem::NotAllowed {
                            dst: "webserver:80".into(),
                        },
                    },
                    TestFailure {
                        block: TestBlock::Tests,
                        index: 2,
                        at: at(9, 5),
                        src: "bob@example.com".into(),
                        problem: TestProblem::NotDenied {
                            dst: "webserver:80".into(),
                        },
                    },
                ],
            }
        },
        "err_tests_malformed.hujson" => |e| {
            let PolicyError::TestsFailed { failures } = e else {
                return false;
            };
            let got: Vec<(usize, &TestProblem)> =
                failures.iter().map(|f| (f.index, &f.problem)).collect();
            got == vec![
                (0, &TestProblem::MissingSrc),
                (1, &TestProblem::MissingExpectations),
                (
                    2,
                    &TestProblem::BadDestination {
                        dst: "webserver:80-90".into(),
                    },
                ),
                (
                    3,
                    &TestProblem::UnknownAlias {
                        alias: "lan".into(),
                    },
                ),
                (
                    4,
                    &TestProblem::BadProto {
                        proto: "icmp".into(),
                    },
                ),
                (
                    5,
                    &TestProblem::UnknownAlias {
                        alias: "group:ghosts".into(),
                    },
                ),
            ]
        },
        "err_ssh_tests_fail.hujson" => |e| {
            let PolicyError::TestsFailed { failures } = e else {
                return false;
            };
            let got: Vec<(TestBlock, usize, &TestProblem)> = failures
                .iter()
                .map(|f| (f.block, f.index, &f.problem))
                .collect();
            got == vec![
                (
                    TestBlock::SshTests,
                    0,
                    &TestProblem::SshNotAllowed {
                        dst: "tag:web".into(),
                        user: "ubuntu".into(),
                    },
                ),
                (
                    TestBlock::SshTests,
                    1,
                    &TestProblem::SshNotDenied {
                        dst: "tag:web".into(),
                        user: "root".into(),
                    },
                ),
                (TestBlock::SshTests, 2, &TestProblem::MissingExpectations),
            ]
        },
        _ => return None,
    };
    Some(check)
}

/// Parse, compile and apply to the lab: the first error.
fn refuse(name: &str) -> PolicyError {
    let text = read(name);
    let policy = match CompiledPolicy::from_text(&text) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (mut state, _) = lab();
    match state.set_policy(Arc::new(policy)) {
        Err(e) => e,
        Ok(_) => panic!("{name}: accepted"),
    }
}

#[test]
fn error_files_fail_with_their_exact_error() {
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir())
        .expect("corpus dir")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("err_") {
            continue;
        }
        let check = expected_error(&name).unwrap_or_else(|| panic!("{name}: no expectation"));
        let err = refuse(&name);
        assert!(check(&err), "{name}: got {err:?} ({err})");
        n += 1;
    }
    assert!(n >= 30, "{n} error files");
}

#[test]
fn errors_print_the_place() {
    let e = refuse("err_undefined_tag.hujson");
    assert_eq!(
        e.to_string(),
        "5:48: acls[1].dst: tag \"tag:wbe\" is not defined in tagOwners"
    );
    let e = refuse("err_tests_fail.hujson");
    assert!(
        e.to_string()
            .contains("tests[1] (src \"carol@example.org\")"),
        "{e}"
    );
}

#[test]
fn a_refused_policy_changes_nothing() {
    let (mut state, names) = lab();
    let good = CompiledPolicy::from_text(&read("field.hujson")).expect("valid");
    state.set_policy(Arc::new(good)).expect("applies");
    let before: Vec<_> = names
        .values()
        .map(|&id| (state.peers_of(id), state.filter_for(id)))
        .collect();
    let bad = CompiledPolicy::from_text(&read("err_tests_fail.hujson")).expect("compiles");
    assert!(matches!(
        state.set_policy(Arc::new(bad)),
        Err(PolicyError::TestsFailed { .. })
    ));
    let after: Vec<_> = names
        .values()
        .map(|&id| (state.peers_of(id), state.filter_for(id)))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn tags_need_an_owner() {
    let p = CompiledPolicy::from_text(&read("field.hujson")).expect("valid");
    assert_eq!(p.check_tags(&["tag:homelab", "tag:mobile"]), Ok(()));
    assert_eq!(
        p.check_tags(&["tag:homelab", "tag:nas"]),
        Err(PolicyError::TagWithoutOwner {
            tag: "tag:nas".into()
        })
    );
}

#[test]
fn explain_names_the_deciding_rule() {
    let (mut state, names) = lab();
    let p = CompiledPolicy::from_text(&read("field.hujson")).expect("valid");
    state.set_policy(Arc::new(p)).expect("applies");
    let s = addr(&names, &state, "mobile1");
    let d = addr(&names, &state, "homelab1");
    let ex = state.explain(s, d, 22, proto::TCP);
    assert!(ex.allowed);
    let rule = ex.rule.expect("a rule");
    assert_eq!(
        (rule.section, rule.index, rule.at.line),
        (Section::Acl, 1, 10)
    );
    assert_eq!(ex.visible, Some(true));
    let m2 = addr(&names, &state, "mobile2");
    let ex = state.explain(s, m2, 22, proto::TCP);
    assert!(!ex.allowed && ex.rule.is_none());
    assert_eq!(
        ex.visible,
        Some(false),
        "mobile2 is not in mobile1's netmap"
    );
    assert_eq!(
        state.find_nodes("tag:mobile"),
        vec![names["mobile1"], names["mobile2"]]
    );
    assert_eq!(
        state.find_nodes("alice@"),
        vec![names["alice-laptop"], names["alice-phone"]]
    );
    assert_eq!(state.find_nodes("100.64.0.10"), vec![names["web"]]);
}

#[test]
fn retagging_a_node_moves_it_live() {
    let (mut state, names) = lab();
    let p = CompiledPolicy::from_text(&read("field.hujson")).expect("valid");
    state.set_policy(Arc::new(p)).expect("applies");
    // mobile2 becomes a homelab node: mobile1 now sees it; homelab nodes keep seeing it.
    let m2 = names["mobile2"];
    let mut node = state.node(m2).expect("node").clone();
    node.owner = warren_control::policy::NodeOwner::Tags(vec!["tag:homelab".into()]);
    let deltas = state.upsert_node(node);
    let by_node: BTreeMap<NodeId, _> = deltas.iter().map(|d| (d.node, d)).collect();
    assert_eq!(by_node[&names["mobile1"]].peers_added, vec![m2]);
    assert!(by_node[&m2].peers_added.contains(&names["mobile1"]));
    assert!(by_node[&m2].filter.is_some(), "mobile2 now accepts traffic");
    assert!(
        !by_node.contains_key(&names["alice-laptop"]),
        "an unrelated node hears nothing"
    );
    assert_eq!(
        state.peers_of(names["mobile1"]),
        Some(vec![names["homelab1"], names["homelab2"], m2])
    );
}
