//! Aliases: the names a policy uses for sets of nodes and addresses (`*`, users, `group:`,
//! `tag:`, hosts, IPs and CIDRs, `autogroup:`), parsed in Headscale's order, and the fixed
//! address sets some of them stand for.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An autogroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AutoGroup {
    /// `autogroup:member`: every user-owned (untagged) node.
    Member,
    /// `autogroup:tagged`: every node with at least one tag.
    Tagged,
    /// `autogroup:self`: the source's own user's untagged nodes (dst only).
    SelfDevices,
    /// `autogroup:internet`: the public internet through exit nodes (dst only).
    Internet,
    /// `autogroup:danger-all`: every address, inside the tailnet or not (src only).
    DangerAll,
    /// `autogroup:nonroot`: SSH login users other than root (ssh `users` only).
    NonRoot,
    /// A role autogroup (`admin`, `owner`, `it-admin`, `network-admin`, `billing-admin`,
    /// `auditor`, `shared`): warren has no roles, so it matches nobody.
    Role(AdminRole),
}

/// A Tailscale admin-console role; no warren user holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdminRole {
    /// `autogroup:admin`.
    Admin,
    /// `autogroup:owner`.
    Owner,
    /// `autogroup:it-admin`.
    ItAdmin,
    /// `autogroup:network-admin`.
    NetworkAdmin,
    /// `autogroup:billing-admin`.
    BillingAdmin,
    /// `autogroup:auditor`.
    Auditor,
    /// `autogroup:shared`.
    Shared,
}

impl AutoGroup {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "member" => AutoGroup::Member,
            "tagged" => AutoGroup::Tagged,
            "self" => AutoGroup::SelfDevices,
            "internet" => AutoGroup::Internet,
            "danger-all" => AutoGroup::DangerAll,
            "nonroot" => AutoGroup::NonRoot,
            "admin" => AutoGroup::Role(AdminRole::Admin),
            "owner" => AutoGroup::Role(AdminRole::Owner),
            "it-admin" => AutoGroup::Role(AdminRole::ItAdmin),
            "network-admin" => AutoGroup::Role(AdminRole::NetworkAdmin),
            "billing-admin" => AutoGroup::Role(AdminRole::BillingAdmin),
            "auditor" => AutoGroup::Role(AdminRole::Auditor),
            "shared" => AutoGroup::Role(AdminRole::Shared),
            _ => return None,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            AutoGroup::Member => "member",
            AutoGroup::Tagged => "tagged",
            AutoGroup::SelfDevices => "self",
            AutoGroup::Internet => "internet",
            AutoGroup::DangerAll => "danger-all",
            AutoGroup::NonRoot => "nonroot",
            AutoGroup::Role(AdminRole::Admin) => "admin",
            AutoGroup::Role(AdminRole::Owner) => "owner",
            AutoGroup::Role(AdminRole::ItAdmin) => "it-admin",
            AutoGroup::Role(AdminRole::NetworkAdmin) => "network-admin",
            AutoGroup::Role(AdminRole::BillingAdmin) => "billing-admin",
            AutoGroup::Role(AdminRole::Auditor) => "auditor",
            AutoGroup::Role(AdminRole::Shared) => "shared",
        }
    }
}

/// One alias, as parsed (references are checked when the policy is compiled).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alias {
    /// `*`.
    Wildcard,
    /// A user: `alice@`, `alice@example.com` (the token as written).
    User(String),
    /// `user:*@example.com`: every user whose email is in the domain (the domain as written).
    UserDomain(String),
    /// `group:name` (with the prefix).
    Group(String),
    /// `tag:name` (with the prefix).
    Tag(String),
    /// A name defined in `hosts`.
    Host(String),
    /// An IP address (as /32 or /128) or a CIDR, host bits cleared.
    Prefix(IpNet),
    /// `autogroup:...`.
    AutoGroup(AutoGroup),
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alias::Wildcard => f.write_str("*"),
            Alias::User(s) | Alias::Group(s) | Alias::Tag(s) | Alias::Host(s) => f.write_str(s),
            Alias::UserDomain(d) => write!(f, "user:*@{d}"),
            Alias::Prefix(p) => write!(f, "{p}"),
            Alias::AutoGroup(g) => write!(f, "autogroup:{}", g.name()),
        }
    }
}

/// Why alias text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AliasProblem {
    /// Looks like an address or CIDR but does not parse.
    BadCidr,
    /// A tag name not starting with a letter, or with odd characters.
    BadTag,
    /// Nothing the language knows (empty, unknown autogroup, `user:` forms, a host name with
    /// `:` or `@`).
    Unknown,
}

/// Parse alias text in Headscale's order: IP/CIDR, `*`, user (has `@`), `group:`, `tag:`,
/// `autogroup:`, else host name.
pub(crate) fn parse_alias(text: &str) -> Result<Alias, AliasProblem> {
    if let Some(prefix) = parse_prefix(text) {
        return Ok(Alias::Prefix(prefix));
    }
    if text == "*" {
        return Ok(Alias::Wildcard);
    }
    if text.is_empty() {
        return Err(AliasProblem::Unknown);
    }
    if let Some(domain) = text.strip_prefix("user:*@") {
        if domain.is_empty() || domain.contains(['*', '@', ':']) {
            return Err(AliasProblem::Unknown);
        }
        return Ok(Alias::UserDomain(domain.to_string()));
    }
    if text.contains('@') {
        if text.starts_with("user:") || text.starts_with("localpart:") || text.contains(':') {
            return Err(AliasProblem::Unknown);
        }
        return Ok(Alias::User(text.to_string()));
    }
    if let Some(name) = text.strip_prefix("group:") {
        if name.is_empty() {
            return Err(AliasProblem::Unknown);
        }
        return Ok(Alias::Group(text.to_string()));
    }
    if text.starts_with("tag:") {
        return valid_tag(text)
            .then(|| Alias::Tag(text.to_string()))
            .ok_or(AliasProblem::BadTag);
    }
    if let Some(name) = text.strip_prefix("autogroup:") {
        return AutoGroup::parse(name)
            .map(Alias::AutoGroup)
            .ok_or(AliasProblem::Unknown);
    }
    if looks_like_address(text) {
        return Err(AliasProblem::BadCidr);
    }
    if text.contains(':') {
        return Err(AliasProblem::Unknown);
    }
    Ok(Alias::Host(text.to_string()))
}

/// An IP (as a host prefix) or CIDR (host bits cleared).
pub(crate) fn parse_prefix(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Text that can only have been meant as an address or CIDR: has a `/`, only digits and dots,
/// or hex digits and colons.
pub(crate) fn looks_like_address(text: &str) -> bool {
    text.contains('/')
        || (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        || (text.contains("::") && text.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'))
}

/// Whether `tag:name` is a valid tag: an ASCII letter first, then letters, digits, `-`, `_`.
pub(crate) fn valid_tag(text: &str) -> bool {
    let Some(name) = text.strip_prefix("tag:") else {
        return false;
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Tailscale's IPv4 range (CGNAT), minus the block it reserves.
pub(crate) fn tailnet_v4() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).expect("valid prefix length")
}

/// The /23 inside 100.64.0.0/10 that Tailscale never assigns (ChromeOS's VM range).
pub(crate) fn tailnet_v4_excluded() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(100, 115, 92, 0), 23).expect("valid prefix length")
}

/// Tailscale's IPv6 ULA /48.
pub(crate) fn tailnet_v6() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48)
        .expect("valid prefix length")
}

/// What `*` stands for as a source before subnet routes are added: 100.64.0.0/10 minus
/// 100.115.92.0/23, and fd7a:115c:a1e0::/48.
pub(crate) fn tailnet_prefixes() -> &'static [IpNet] {
    static SET: OnceLock<Vec<IpNet>> = OnceLock::new();
    SET.get_or_init(|| {
        let mut out: Vec<IpNet> = subtract_v4(tailnet_v4(), &[tailnet_v4_excluded()])
            .into_iter()
            .map(IpNet::V4)
            .collect();
        out.push(IpNet::V6(tailnet_v6()));
        out
    })
}

/// `autogroup:internet`: all of IPv4 and 2000::/3 minus private, CGNAT, link-local and
/// Tailscale ranges (Tailscale's `util/net.go`).
pub(crate) fn internet_prefixes() -> &'static [IpNet] {
    static SET: OnceLock<Vec<IpNet>> = OnceLock::new();
    SET.get_or_init(|| {
        let v4_private: Vec<Ipv4Net> = [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "169.254.0.0/16",
        ]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
        let mut out: Vec<IpNet> = subtract_v4(
            Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid prefix length"),
            &v4_private,
        )
        .into_iter()
        .map(IpNet::V4)
        .collect();
        let v6_private: Vec<Ipv6Net> = ["fc00::/7", "fe80::/10", "fd7a:115c:a1e0::/48"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let global: Ipv6Net = Ipv6Net::new(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3)
            .expect("valid prefix length");
        out.extend(subtract_v6(global, &v6_private).into_iter().map(IpNet::V6));
        out
    })
}

fn subtract_v4(from: Ipv4Net, holes: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut pieces = vec![from];
    for hole in holes {
        let mut next = Vec::new();
        for p in pieces {
            if !p.contains(hole) && !hole.contains(&p) {
                next.push(p);
            } else if hole.contains(&p) {
                // Removed entirely.
            } else {
                next.extend(split_v4(p, hole));
            }
        }
        pieces = next;
    }
    pieces.sort();
    pieces
}

/// `p` minus `hole` (which lies strictly inside `p`), as CIDRs.
fn split_v4(p: Ipv4Net, hole: &Ipv4Net) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    let mut cur = p;
    while cur.prefix_len() < hole.prefix_len() {
        let Ok(mut halves) = cur.subnets(cur.prefix_len() + 1) else {
            break;
        };
        let (Some(a), Some(b)) = (halves.next(), halves.next()) else {
            break;
        };
        if a.contains(hole) {
            out.push(b);
            cur = a;
        } else {
            out.push(a);
            cur = b;
        }
    }
    out
}

fn subtract_v6(from: Ipv6Net, holes: &[Ipv6Net]) -> Vec<Ipv6Net> {
    let mut pieces = vec![from];
    for hole in holes {
        let mut next = Vec::new();
        for p in pieces {
            if !p.contains(hole) && !hole.contains(&p) {
                next.push(p);
            } else if hole.contains(&p) {
                // Removed entirely.
            } else {
                let mut cur = p;
                while cur.prefix_len() < hole.prefix_len() {
                    let Ok(mut halves) = cur.subnets(cur.prefix_len() + 1) else {
                        break;
                    };
                    let (Some(a), Some(b)) = (halves.next(), halves.next()) else {
                        break;
                    };
                    if a.contains(hole) {
                        next.push(b);
                        cur = a;
                    } else {
                        next.push(a);
                        cur = b;
                    }
                }
            }
        }
        pieces = next;
    }
    pieces.sort();
    pieces
}

/// Whether an address is in one of `set`.
pub(crate) fn in_set(set: &[IpNet], ip: IpAddr) -> bool {
    set.iter().any(|p| p.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_order_and_kinds() {
        assert_eq!(parse_alias("*"), Ok(Alias::Wildcard));
        assert_eq!(
            parse_alias("100.64.0.1"),
            Ok(Alias::Prefix("100.64.0.1/32".parse().expect("prefix")))
        );
        assert_eq!(
            parse_alias("10.1.2.3/8"),
            Ok(Alias::Prefix("10.0.0.0/8".parse().expect("prefix")))
        );
        assert_eq!(parse_alias("alice@"), Ok(Alias::User("alice@".into())));
        assert_eq!(
            parse_alias("user:*@example.com"),
            Ok(Alias::UserDomain("example.com".into()))
        );
        assert_eq!(parse_alias("user:*@*"), Err(AliasProblem::Unknown));
        assert_eq!(parse_alias("group:a"), Ok(Alias::Group("group:a".into())));
        assert_eq!(parse_alias("tag:a-1"), Ok(Alias::Tag("tag:a-1".into())));
        assert_eq!(parse_alias("tag:1a"), Err(AliasProblem::BadTag));
        assert_eq!(parse_alias("tag:сервер"), Err(AliasProblem::BadTag));
        assert_eq!(
            parse_alias("autogroup:self"),
            Ok(Alias::AutoGroup(AutoGroup::SelfDevices))
        );
        assert_eq!(parse_alias("autogroup:bogus"), Err(AliasProblem::Unknown));
        assert_eq!(parse_alias("10.0.0.0/33"), Err(AliasProblem::BadCidr));
        assert_eq!(parse_alias("300.1.1.1"), Err(AliasProblem::BadCidr));
        assert_eq!(
            parse_alias("webserver"),
            Ok(Alias::Host("webserver".into()))
        );
        assert_eq!(parse_alias(""), Err(AliasProblem::Unknown));
        assert_eq!(parse_alias("%bogus%:x"), Err(AliasProblem::Unknown));
    }

    #[test]
    fn fixed_sets() {
        let star = tailnet_prefixes();
        assert!(in_set(star, "100.64.0.1".parse().expect("ip")));
        assert!(!in_set(star, "100.115.92.7".parse().expect("ip")));
        assert!(in_set(star, "100.115.94.0".parse().expect("ip")));
        assert!(in_set(star, "fd7a:115c:a1e0::1".parse().expect("ip")));
        let inet = internet_prefixes();
        assert!(in_set(inet, "8.8.8.8".parse().expect("ip")));
        assert!(!in_set(inet, "10.1.1.1".parse().expect("ip")));
        assert!(!in_set(inet, "100.100.1.1".parse().expect("ip")));
        assert!(in_set(inet, "2001:db8::1".parse().expect("ip")));
        assert!(!in_set(inet, "fd00::1".parse().expect("ip")));
    }
}
