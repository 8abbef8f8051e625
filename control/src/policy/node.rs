//! The policy's view of a node: identity, owner (a user or tags), addresses and approved
//! routes. Control builds these from its store; the policy never sees keys or endpoints.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// A node's id (control's database id).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A user as the policy matches it: `alice@` matches the name `alice`, `alice@example.com`
/// the email (or a name written that way).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyUser {
    /// The user's id.
    pub id: u64,
    /// The user name.
    pub name: String,
    /// The email, if known.
    pub email: Option<String>,
}

impl PolicyUser {
    /// Whether a policy user token names this user: equal to the email (case-insensitive),
    /// or, without a trailing `@`, equal to the name.
    pub fn matches(&self, token: &str) -> bool {
        if self
            .email
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(token))
        {
            return true;
        }
        let bare = token.strip_suffix('@').unwrap_or(token);
        self.name == bare || self.name == token
    }
}

/// Who owns a node: a user, or (Headscale 0.28+ "tags as identity") its tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeOwner {
    /// A user's own device.
    User(PolicyUser),
    /// A tagged node: owned by its tags (sorted, at least one), never matched by user aliases,
    /// `autogroup:member` or `autogroup:self`.
    Tags(Vec<String>),
}

/// A node as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyNode {
    /// Its id.
    pub id: NodeId,
    /// Its name (hostname or given name), for `explain` and logs.
    pub name: String,
    /// Its owner.
    pub owner: NodeOwner,
    /// Mesh IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Mesh IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// Routes approved for it (subnet routes; `0.0.0.0/0` / `::/0` make it an exit node).
    /// Empty until route approval lands.
    pub approved_routes: Vec<IpNet>,
}

impl PolicyNode {
    /// A user-owned node with no routes.
    pub fn user(id: u64, name: &str, user: PolicyUser, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Self {
        Self {
            id: NodeId(id),
            name: name.to_string(),
            owner: NodeOwner::User(user),
            ipv4: Some(ipv4),
            ipv6: Some(ipv6),
            approved_routes: Vec::new(),
        }
    }

    /// A tagged node with no routes.
    pub fn tagged<S: AsRef<str>>(
        id: u64,
        name: &str,
        tags: &[S],
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Self {
        let mut tags: Vec<String> = tags.iter().map(|t| t.as_ref().to_string()).collect();
        tags.sort();
        tags.dedup();
        Self {
            id: NodeId(id),
            name: name.to_string(),
            owner: NodeOwner::Tags(tags),
            ipv4: Some(ipv4),
            ipv6: Some(ipv6),
            approved_routes: Vec::new(),
        }
    }

    /// Its addresses (IPv4 first).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }

    /// Its addresses as host prefixes.
    pub fn address_prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.addresses().map(IpNet::from)
    }

    /// Whether it has tags.
    pub fn is_tagged(&self) -> bool {
        matches!(self.owner, NodeOwner::Tags(_))
    }

    /// Its tags (none for a user-owned node).
    pub fn tags(&self) -> &[String] {
        match &self.owner {
            NodeOwner::Tags(t) => t,
            NodeOwner::User(_) => &[],
        }
    }

    /// Its user, if user-owned.
    pub fn user_id(&self) -> Option<u64> {
        match &self.owner {
            NodeOwner::User(u) => Some(u.id),
            NodeOwner::Tags(_) => None,
        }
    }

    /// Whether an approved exit route (`0.0.0.0/0` or `::/0`) makes it an exit node.
    pub fn is_exit_node(&self) -> bool {
        self.approved_routes.iter().any(|r| r.prefix_len() == 0)
    }

    /// Approved routes other than exit routes.
    pub fn subnet_routes(&self) -> impl Iterator<Item = &IpNet> + '_ {
        self.approved_routes.iter().filter(|r| r.prefix_len() != 0)
    }
}
