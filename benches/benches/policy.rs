//! The policy compiler at tailnet scale: a policy of 1,000 rules (groups, users, tags, hosts,
//! autogroups) over 10,000 nodes (2,000 users with 3-4 devices each, 3,000 tagged nodes).
//!
//! - `compile_and_index`: parse and compile the policy, then index it over all nodes (what
//!   control does at start-up); the memory the index holds is printed.
//! - `node_join`: one node joining (and the per-node deltas for every affected peer), with the
//!   number of affected nodes and the delta bytes per affected peer printed.
//! - `one_rule_change`: a policy differing from the one in force in one rule: time to compute
//!   every node's difference.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use ipnet::IpNet;
use warren_control::policy::{CompiledPolicy, NodeDelta, PolicyNode, PolicyState, PolicyUser};

const NODES: usize = 10_000;
const USERS: usize = 2_000;
const TAGS: usize = 100;
const GROUPS: usize = 200;

fn addr(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    let i = u32::try_from(i + 1).expect("small index");
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
    let v6 = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0)) + u128::from(i),
    );
    (v4, v6)
}

fn user(u: usize) -> PolicyUser {
    PolicyUser {
        id: u as u64 + 1,
        name: format!("u{u}"),
        email: Some(format!("u{u}@example.com")),
    }
}

/// Node `i`: the first 7,000 belong to users (3-4 each), the rest carry one or two tags;
/// every 100th tagged node routes a /24.
fn node(i: usize) -> PolicyNode {
    let (v4, v6) = addr(i);
    let user_nodes = NODES * 7 / 10;
    let mut n = if i < user_nodes {
        PolicyNode::user(i as u64 + 1, &format!("n{i}"), user(i % USERS), v4, v6)
    } else {
        let t = i % TAGS;
        let tags = if i.is_multiple_of(3) {
            vec![format!("tag:t{t}"), format!("tag:t{}", (t + 1) % TAGS)]
        } else {
            vec![format!("tag:t{t}")]
        };
        PolicyNode::tagged(i as u64 + 1, &format!("n{i}"), &tags, v4, v6)
    };
    if i >= user_nodes && i.is_multiple_of(100) {
        let net: IpNet = format!("10.{}.{}.0/24", i / 256 % 256, i % 256)
            .parse()
            .expect("route");
        n.approved_routes.push(net);
    }
    n
}

/// A policy of exactly 1,000 rules; `variant` changes rule 10's destination tag.
fn policy_text(variant: usize) -> String {
    let mut p = String::from("{\n\"groups\": {\n");
    for g in 0..GROUPS {
        let members: Vec<String> = (0..10)
            .map(|k| format!("\"u{}@example.com\"", (g * 10 + k) % USERS))
            .collect();
        let comma = if g + 1 < GROUPS { "," } else { "" };
        let _ = writeln!(p, "  \"group:g{g}\": [{}]{comma}", members.join(", "));
    }
    p.push_str("},\n\"hosts\": {\n");
    for h in 0..49 {
        let comma = if h + 1 < 49 { "," } else { "" };
        let _ = writeln!(p, "  \"h{h}\": \"10.{h}.0.0/16\"{comma}");
    }
    p.push_str("},\n\"tagOwners\": {\n");
    for t in 0..TAGS {
        let comma = if t + 1 < TAGS { "," } else { "" };
        let _ = writeln!(p, "  \"tag:t{t}\": [\"group:g{}\"]{comma}", t % GROUPS);
    }
    p.push_str("},\n\"acls\": [\n");
    let mut rules = Vec::new();
    // 400: a group reaches a tag on one port.
    for k in 0..400 {
        let tag = if k == 10 {
            (k * 7 + variant) % TAGS
        } else {
            k * 7 % TAGS
        };
        rules.push(format!(
            "{{\"action\": \"accept\", \"src\": [\"group:g{}\"], \"dst\": [\"tag:t{tag}:{}\"]}}",
            k % GROUPS,
            1000 + k
        ));
    }
    // 300: tag to tag, a port list.
    for k in 0..300 {
        rules.push(format!(
            "{{\"action\": \"accept\", \"src\": [\"tag:t{}\"], \"dst\": [\"tag:t{}:22,80,8000-8100\"]}}",
            k % TAGS,
            (k * 13 + 5) % TAGS
        ));
    }
    // 100: one user to a tag over SSH.
    for k in 0..100 {
        rules.push(format!(
            "{{\"action\": \"accept\", \"src\": [\"u{}@example.com\"], \"dst\": [\"tag:t{}:22\"]}}",
            k * 17 % USERS,
            k % TAGS
        ));
    }
    // 50: every member reaches a tag on 443.
    for k in 0..50 {
        rules.push(format!(
            "{{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"tag:t{}:443\"]}}",
            k * 2 % TAGS
        ));
    }
    // 49: a group reaches a routed subnet through its host name.
    for k in 0..49 {
        rules.push(format!(
            "{{\"action\": \"accept\", \"src\": [\"group:g{}\"], \"dst\": [\"h{k}:*\"]}}",
            k * 3 % GROUPS
        ));
    }
    // 1: every user's devices reach each other.
    rules.push(
        "{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self:*\"]}"
            .to_string(),
    );
    assert_eq!(rules.len(), 900);
    p.push_str(&rules.join(",\n"));
    p.push_str("\n],\n\"grants\": [\n");
    // 100 grants: a group reaches a tag on tcp:443 and udp:53.
    let grants: Vec<String> = (0..100)
        .map(|k| {
            format!(
                "{{\"src\": [\"group:g{}\"], \"dst\": [\"tag:t{}\"], \"ip\": [\"tcp:443\", \"udp:53\"]}}",
                (k * 11) % GROUPS,
                (k * 3 + 1) % TAGS
            )
        })
        .collect();
    p.push_str(&grants.join(",\n"));
    p.push_str("\n]\n}\n");
    p
}

fn compile(text: &str) -> Arc<CompiledPolicy> {
    Arc::new(CompiledPolicy::from_text(text).expect("bench policy compiles"))
}

/// Bytes a delta would take on the wire, roughly: 8 per peer id, and per filter rule its
/// prefixes (17 bytes each) and destination entries (21 bytes each).
fn delta_bytes(d: &NodeDelta) -> usize {
    8 * (d.peers_added.len() + d.peers_removed.len())
        + d.filter.as_ref().map_or(0, |f| {
            f.rules
                .iter()
                .map(|r| 17 * r.src.len() + 21 * r.dst.len() + r.protos.len())
                .sum()
        })
}

fn bench(c: &mut Criterion) {
    let text = policy_text(0);
    let policy = compile(&text);
    // 900 acls and 100 grants; a grant naming two protocols compiles to two rules.
    assert_eq!(
        policy.rules().len(),
        1_100,
        "1,000 policy rules, 1,100 compiled"
    );
    let nodes: Vec<PolicyNode> = (0..NODES).map(node).collect();

    let mut group = c.benchmark_group("policy");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    group.bench_function("compile_and_index_1000_rules_10000_nodes", |b| {
        b.iter(|| {
            let p = compile(black_box(&text));
            black_box(PolicyState::build(p, nodes.iter().cloned()).expect("no tests"))
        })
    });

    let start = Instant::now();
    let mut state = PolicyState::build(policy.clone(), nodes.iter().cloned()).expect("no tests");
    eprintln!(
        "policy: indexing 1,000 rules over {NODES} nodes took {:?} once; the index holds about {} KiB",
        start.elapsed(),
        state.index_heap_bytes() / 1024
    );

    // A user node joining: member of groups, source of the broad member rules.
    let joiner = {
        let (v4, v6) = addr(NODES + 1);
        PolicyNode::user(NODES as u64 + 10, "joiner", user(5), v4, v6)
    };
    let start = Instant::now();
    let deltas = state.upsert_node(joiner.clone());
    let took = start.elapsed();
    let bytes: usize = deltas.iter().map(delta_bytes).sum();
    eprintln!(
        "policy: a user node joining at {NODES} nodes took {took:?} once and affects {} nodes ({} peers of it), {} delta bytes in all, {} per affected node",
        deltas.len(),
        state.peers_of(joiner.id).map_or(0, |p| p.len()),
        bytes,
        bytes / deltas.len().max(1)
    );
    state.remove_node(joiner.id);
    group.bench_function("node_join_at_10000_nodes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                black_box(state.upsert_node(joiner.clone()));
                total += start.elapsed();
                state.remove_node(joiner.id);
            }
            total
        })
    });

    // One rule differs: rule 10's destination tag.
    let other = compile(&policy_text(1));
    let start = Instant::now();
    let d = state.set_policy(other.clone()).expect("no tests");
    eprintln!(
        "policy: a one-rule change at {NODES} nodes took {:?} once and gives {} nodes a difference",
        start.elapsed(),
        d.len()
    );
    state.set_policy(policy.clone()).expect("no tests");
    let mut flip = false;
    group.bench_function("one_rule_change_at_10000_nodes", |b| {
        b.iter(|| {
            flip = !flip;
            let next = if flip { other.clone() } else { policy.clone() };
            black_box(state.set_policy(next).expect("no tests"))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
