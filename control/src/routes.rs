//! Subnet routes and exit nodes on the server side (Headscale's double opt-in): parsing what
//! nodes advertise and admins approve, `autoApprovers`, and the election of one primary router
//! per prefix. A route is served only when it is both advertised and approved; `0.0.0.0/0` and
//! `::/0` (exit routes) are approved together and never elected (every approved exit node is
//! offered).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::error::ControlError;
use crate::policy::{Alias, CompiledPolicy, NodeOwner, PolicyNode};

/// Most routes one node may advertise or have approved (Headscale has no limit; a node that
/// sends thousands of prefixes is broken or hostile, and every peer would carry them).
pub const MAX_ROUTES: usize = 256;

/// `0.0.0.0/0`.
pub fn exit_v4() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::default())
}

/// `::/0`.
pub fn exit_v6() -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::default())
}

/// Whether a prefix is an exit route (`0.0.0.0/0` or `::/0`).
pub fn is_exit(r: &IpNet) -> bool {
    r.prefix_len() == 0
}

/// The mesh's own ranges: a route inside or around them would capture node addresses.
fn mesh_ranges() -> [IpNet; 2] {
    [
        IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default(),
        ),
        IpNet::V6(
            ipnet::Ipv6Net::new(
                std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0),
                48,
            )
            .unwrap_or_default(),
        ),
    ]
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Parses a route list from a request field: each `address/length` with no host bits set (a
/// prefix with host bits is refused, not truncated: `10.20.0.1/24` is more likely a typo than a
/// wish for `10.20.0.0/24`), none overlapping the mesh's own ranges (exit routes aside), at most
/// [`MAX_ROUTES`]. Returns them sorted without duplicates.
pub fn parse_routes(field: &'static str, list: &[String]) -> Result<Vec<IpNet>, ControlError> {
    if list.len() > MAX_ROUTES {
        return Err(ControlError::TooManyRoutes {
            field,
            count: list.len(),
            max: MAX_ROUTES,
        });
    }
    let mut out = Vec::with_capacity(list.len());
    for text in list {
        let bad = |reason: String| ControlError::InvalidRoute {
            field,
            route: text.clone(),
            reason,
        };
        let net: IpNet = text.trim().parse().map_err(|_| {
            bad("is not a prefix (address/length, like 10.20.0.0/24 or 0.0.0.0/0)".into())
        })?;
        if net.trunc() != net {
            return Err(bad(format!("has host bits set; write {}", net.trunc())));
        }
        if !is_exit(&net)
            && let Some(mesh) = mesh_ranges().iter().find(|m| overlaps(m, &net))
        {
            return Err(bad(format!("overlaps the mesh's own range {mesh}")));
        }
        out.push(net);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// An approved list as stored: approving either exit route approves both.
pub fn with_exit_pair(mut routes: Vec<IpNet>) -> Vec<IpNet> {
    if routes.iter().any(is_exit) {
        routes.push(exit_v4());
        routes.push(exit_v6());
    }
    routes.sort();
    routes.dedup();
    routes
}

/// The routes a node serves: advertised and approved.
pub fn serving(advertised: &[IpNet], approved: &[IpNet]) -> Vec<IpNet> {
    advertised
        .iter()
        .filter(|r| approved.contains(r))
        .copied()
        .collect()
}

/// Whether `node` is among `approvers` (users, groups and tags, as in `tagOwners`): a user or
/// group names the user's untagged nodes, a tag the nodes carrying it.
fn approves<'a>(
    policy: &CompiledPolicy,
    mut approvers: impl Iterator<Item = &'a Alias>,
    node: &PolicyNode,
) -> bool {
    approvers.any(|a| match (a, &node.owner) {
        (Alias::User(token), NodeOwner::User(u)) => u.matches(token),
        (Alias::Group(g), NodeOwner::User(u)) => policy
            .group(g)
            .is_some_and(|members| members.iter().any(|m| u.matches(m))),
        (Alias::Tag(t), NodeOwner::Tags(tags)) => tags.contains(t),
        _ => false,
    })
}

/// The advertised routes `autoApprovers` approves for `node` (Headscale's
/// `NodeCanApproveRoute`): a subnet route equal to or inside a `routes` prefix whose approvers
/// hold the node (a `/0` entry approves every subnet route of its family, never an exit route);
/// both exit routes when the node advertises one and `exitNode` holds it.
pub fn auto_approved(
    policy: &CompiledPolicy,
    node: &PolicyNode,
    advertised: &[IpNet],
) -> Vec<IpNet> {
    let aa = policy.auto_approvers();
    let mut out: Vec<IpNet> = Vec::new();
    for r in advertised {
        if is_exit(r) {
            if approves(policy, aa.exit_node.iter().map(|a| &a.value), node) {
                out.push(exit_v4());
                out.push(exit_v6());
            }
            continue;
        }
        let ok = aa.routes.iter().any(|(prefix, owners)| {
            prefix.contains(r) && approves(policy, owners.iter().map(|a| &a.value), node)
        });
        if ok {
            out.push(*r);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The primary router of every subnet prefix served by an online node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Primaries {
    by_prefix: BTreeMap<IpNet, u64>,
}

impl Primaries {
    /// The primary router of `prefix`.
    pub fn get(&self, prefix: &IpNet) -> Option<u64> {
        self.by_prefix.get(prefix).copied()
    }

    /// The prefixes `node` is primary for, sorted.
    pub fn of(&self, node: u64) -> Vec<IpNet> {
        self.by_prefix
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Re-elects from `candidates` (per exact prefix, the online nodes serving it; exit
    /// routes must not be among them) as Headscale does: the current primary stays while it is
    /// a candidate, else the lowest node id takes over, and a node that comes back does not
    /// take a prefix back. Returns the nodes whose set of primary prefixes changed.
    pub fn elect(&mut self, candidates: &BTreeMap<IpNet, BTreeSet<u64>>) -> BTreeSet<u64> {
        let mut next = BTreeMap::new();
        for (prefix, nodes) in candidates {
            let keep = self.get(prefix).filter(|cur| nodes.contains(cur));
            if let Some(n) = keep.or_else(|| nodes.first().copied()) {
                next.insert(*prefix, n);
            }
        }
        let mut changed = BTreeSet::new();
        for (p, n) in &self.by_prefix {
            if next.get(p) != Some(n) {
                changed.insert(*n);
            }
        }
        for (p, n) in &next {
            if self.by_prefix.get(p) != Some(n) {
                changed.insert(*n);
            }
        }
        self.by_prefix = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("prefix")).collect()
    }

    #[test]
    fn route_lists_are_checked_and_errors_name_the_field() {
        let ok = parse_routes(
            "advertised_routes",
            &["10.20.0.0/24".into(), "::/0".into(), "10.20.0.0/24".into()],
        )
        .expect("valid");
        assert_eq!(ok, nets(&["10.20.0.0/24", "::/0"]));
        let err = parse_routes("advertised_routes", &["10.20.0.1/24".into()]).expect_err("host");
        assert_eq!(
            err.to_string(),
            "advertised_routes: \"10.20.0.1/24\" has host bits set; write 10.20.0.0/24"
        );
        let err = parse_routes("routes", &["banana".into()]).expect_err("junk");
        assert_eq!(
            err.to_string(),
            "routes: \"banana\" is not a prefix (address/length, like 10.20.0.0/24 or 0.0.0.0/0)"
        );
        let err = parse_routes("routes", &["100.64.0.0/24".into()]).expect_err("mesh");
        assert_eq!(
            err.to_string(),
            "routes: \"100.64.0.0/24\" overlaps the mesh's own range 100.64.0.0/10"
        );
        let many: Vec<String> = (0..=MAX_ROUTES)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let err = parse_routes("advertised_routes", &many).expect_err("too many");
        assert_eq!(
            err.to_string(),
            "advertised_routes: 257 routes; at most 256"
        );
    }

    #[test]
    fn auto_approvers_follow_headscale() {
        use crate::policy::PolicyUser;
        let policy = CompiledPolicy::from_text(
            r#"{
              "groups": {"group:ops": ["alice@"]},
              "tagOwners": {"tag:r": ["alice@"]},
              "autoApprovers": {
                "routes": {"10.0.0.0/8": ["group:ops"], "0.0.0.0/0": ["tag:r"]},
                "exitNode": ["tag:r"],
              },
            }"#,
        )
        .expect("policy");
        let v4 = std::net::Ipv4Addr::new(100, 64, 0, 1);
        let v6 = std::net::Ipv6Addr::LOCALHOST;
        let alice = PolicyUser {
            id: 1,
            name: "alice".into(),
            email: None,
        };
        let user_node = PolicyNode::user(1, "a", alice, v4, v6);
        let tagged = PolicyNode::tagged(2, "t", &["tag:r"], v4, v6);
        let adv = nets(&["10.1.0.0/16", "10.0.0.0/8", "192.168.1.0/24", "0.0.0.0/0"]);
        // alice's own node: inside (or equal to) the group's prefix; no exit (not in exitNode).
        assert_eq!(
            auto_approved(&policy, &user_node, &adv),
            nets(&["10.0.0.0/8", "10.1.0.0/16"])
        );
        // The tagged node: everything under the /0 entry, and both exit routes via exitNode
        // (never via the /0 routes entry); a group does not match a tagged node.
        assert_eq!(
            auto_approved(&policy, &tagged, &adv),
            nets(&[
                "0.0.0.0/0",
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.168.1.0/24",
                "::/0"
            ])
        );
        let no_exit = CompiledPolicy::from_text(
            r#"{"tagOwners": {"tag:r": []}, "autoApprovers": {"routes": {"0.0.0.0/0": ["tag:r"]}}}"#,
        )
        .expect("policy");
        assert_eq!(
            auto_approved(&no_exit, &tagged, &nets(&["0.0.0.0/0", "::/0"])),
            Vec::<IpNet>::new()
        );
    }

    #[test]
    fn election_keeps_the_primary_and_a_recovered_node_does_not_take_over() {
        let p: IpNet = "10.0.0.0/24".parse().expect("prefix");
        let mut prim = Primaries::default();
        let cands = |ids: &[u64]| BTreeMap::from([(p, ids.iter().copied().collect())]);
        assert_eq!(prim.elect(&cands(&[3, 2])), BTreeSet::from([2]));
        assert_eq!(prim.get(&p), Some(2));
        assert_eq!(prim.elect(&cands(&[3])), BTreeSet::from([2, 3]));
        assert_eq!(prim.get(&p), Some(3));
        assert!(
            prim.elect(&cands(&[2, 3])).is_empty(),
            "2 does not take it back"
        );
        assert_eq!(prim.get(&p), Some(3));
        assert_eq!(prim.elect(&BTreeMap::new()), BTreeSet::from([3]));
        assert_eq!(prim.of(3), Vec::<IpNet>::new());
    }
}
