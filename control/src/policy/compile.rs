//! Compilation: a parsed [`Policy`] becomes a list of rules over *selectors* (which nodes or
//! addresses a rule names), with groups and hosts resolved and every reference and position
//! checked. Nothing here looks at nodes; [`super::state::PolicyState`] matches selectors to
//! nodes and keeps that index up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;

use super::alias::{Alias, AutoGroup};
use super::error::{AliasPosition, Place, PolicyError, Pos};
use super::parse::{AutoApprovers, Policy, PolicyTest, Spanned, SshTest};
use super::ports::PortRange;

/// What a rule names: a set of nodes, or of addresses, resolved against nodes at run time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// `*`: every node; as a source the tailnet ranges plus approved subnet routes, as a
    /// destination any address.
    All,
    /// `autogroup:danger-all`: every address (source only).
    Everything,
    /// A user token (`alice@`, `alice@example.com`): that user's untagged nodes.
    User(String),
    /// `user:*@domain`: untagged nodes of users whose email is in the domain.
    UserDomain(String),
    /// `tag:x`: nodes carrying the tag.
    Tag(String),
    /// `autogroup:member`: untagged nodes.
    Member,
    /// `autogroup:tagged`: tagged nodes.
    Tagged,
    /// A host, IP or CIDR: that prefix; nodes whose address lies in it or whose approved
    /// routes overlap it.
    Prefix(IpNet),
    /// `autogroup:internet`: the public internet, reached through exit nodes.
    Internet,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("*"),
            Selector::Everything => f.write_str("autogroup:danger-all"),
            Selector::User(u) | Selector::Tag(u) => f.write_str(u),
            Selector::UserDomain(d) => write!(f, "user:*@{d}"),
            Selector::Member => f.write_str("autogroup:member"),
            Selector::Tagged => f.write_str("autogroup:tagged"),
            Selector::Prefix(p) => write!(f, "{p}"),
            Selector::Internet => f.write_str("autogroup:internet"),
        }
    }
}

/// A destination of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Nodes or addresses named by a selector.
    Sel(Selector),
    /// `autogroup:self`: the source's own user's untagged nodes.
    SelfDevices,
}

/// One destination and its ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DstSpec {
    /// What is reached.
    pub target: Target,
    /// On which ports.
    pub ports: Vec<PortRange>,
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// Network access (acls, grants with `ip`): goes into packet filters and visibility.
    Ip,
    /// Application capabilities only (grants with `app` alone): makes the nodes visible to
    /// each other, adds nothing to packet filters.
    AppOnly,
}

/// The section a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    /// `acls[index]`.
    Acl,
    /// `grants[index]`.
    Grant,
    /// No `acls` and no `grants`: the implicit allow-all rule.
    AllowAll,
}

/// Where a rule came from, for `explain` and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleOrigin {
    /// Section.
    pub section: Section,
    /// Index in the section.
    pub index: usize,
    /// Where the entry starts in the text.
    pub at: Pos,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.section {
            Section::Acl => write!(f, "acls[{}] (line {})", self.index, self.at.line),
            Section::Grant => write!(f, "grants[{}] (line {})", self.index, self.at.line),
            Section::AllowAll => f.write_str("no acls or grants: allow all"),
        }
    }
}

/// The meaning of a rule, without where it came from: two rules with equal bodies grant the
/// same thing (used to find what a policy change touched).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleBody {
    /// Sources (sorted, no duplicates).
    pub src: Vec<Selector>,
    /// Destinations with their ports.
    pub dst: Vec<DstSpec>,
    /// IP protocols; empty means Tailscale's default (TCP, UDP, ICMP, ICMPv6).
    pub protos: Vec<u8>,
    /// Network access or capabilities only.
    pub access: Access,
    /// Via tags: when non-empty, the rule applies only on nodes carrying one of them.
    pub via: Vec<String>,
}

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Where it came from.
    pub origin: RuleOrigin,
    /// What it grants.
    pub body: RuleBody,
}

/// An `ssh` rule with its aliases resolved, for running `sshTests` (warren runs no SSH).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAccess {
    /// Who may log in.
    pub src: Vec<Selector>,
    /// Where.
    pub dst: Vec<Target>,
    /// As which users (`root`, `autogroup:nonroot`, `localpart:*@domain`, names).
    pub users: Vec<String>,
}

/// A policy compiled into rules over selectors, with everything that needs nodes left to
/// [`super::state::PolicyState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    rules: Vec<Rule>,
    tag_owners: BTreeMap<String, Vec<Alias>>,
    groups: BTreeMap<String, Vec<String>>,
    hosts: BTreeMap<String, IpNet>,
    auto_approvers: AutoApprovers,
    tests: Vec<PolicyTest>,
    ssh: Vec<SshAccess>,
    ssh_tests: Vec<SshTest>,
}

impl Default for CompiledPolicy {
    /// No policy configured: allow all, as Tailscale and Headscale do.
    fn default() -> Self {
        Self {
            rules: vec![allow_all_rule()],
            tag_owners: BTreeMap::new(),
            groups: BTreeMap::new(),
            hosts: BTreeMap::new(),
            auto_approvers: AutoApprovers::default(),
            tests: Vec::new(),
            ssh: Vec::new(),
            ssh_tests: Vec::new(),
        }
    }
}

fn allow_all_rule() -> Rule {
    Rule {
        origin: RuleOrigin {
            section: Section::AllowAll,
            index: 0,
            at: Pos::default(),
        },
        body: RuleBody {
            src: vec![Selector::All],
            dst: vec![DstSpec {
                target: Target::Sel(Selector::All),
                ports: vec![PortRange::ALL],
            }],
            protos: Vec::new(),
            access: Access::Ip,
            via: Vec::new(),
        },
    }
}

impl CompiledPolicy {
    /// The policy Tailscale applies when none is configured (allow all).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Parse and compile policy text.
    pub fn from_text(text: &str) -> Result<Self, PolicyError> {
        Self::compile(&Policy::parse(text)?)
    }

    /// Compile a parsed policy: resolve groups and hosts, check every reference and where each
    /// alias stands.
    pub fn compile(p: &Policy) -> Result<Self, PolicyError> {
        let c = Ctx::new(p);
        for t in &p.tag_owners {
            let place = Place::TagOwner { tag: t.tag.clone() };
            for o in &t.owners {
                c.owner(o, &place)?;
            }
        }
        for (prefix, owners) in &p.auto_approvers.routes {
            let place = Place::AutoApprover {
                key: format!("routes.{prefix}"),
            };
            for o in owners {
                c.owner(o, &place)?;
            }
        }
        let place = Place::AutoApprover {
            key: "exitNode".into(),
        };
        for o in &p.auto_approvers.exit_node {
            c.owner(o, &place)?;
        }
        for (index, a) in p.node_attrs.iter().enumerate() {
            let place = Place::NodeAttr {
                index,
                field: "target",
            };
            for t in &a.target {
                match &t.value {
                    Alias::AutoGroup(
                        AutoGroup::SelfDevices | AutoGroup::Internet | AutoGroup::NonRoot,
                    ) => {
                        return Err(not_allowed(t, &place, AliasPosition::Target));
                    }
                    _ => {
                        c.resolve(t, &place)?;
                    }
                }
            }
        }
        let mut ssh = Vec::with_capacity(p.ssh.len());
        for (index, s) in p.ssh.iter().enumerate() {
            let place = Place::Ssh {
                index,
                field: "src",
            };
            let mut src = Vec::new();
            for a in &s.src {
                src.extend(c.resolve(a, &place)?);
            }
            let place = Place::Ssh {
                index,
                field: "dst",
            };
            let mut dst = Vec::new();
            for a in &s.dst {
                if matches!(a.value, Alias::AutoGroup(AutoGroup::SelfDevices)) {
                    dst.push(Target::SelfDevices);
                } else {
                    dst.extend(c.resolve(a, &place)?.into_iter().map(Target::Sel));
                }
            }
            ssh.push(SshAccess {
                src,
                dst,
                users: s.users.clone(),
            });
        }

        let mut rules = Vec::new();
        match (&p.acls, &p.grants) {
            (None, None) => rules.push(allow_all_rule()),
            (acls, grants) => {
                for (index, acl) in acls.iter().flatten().enumerate() {
                    let origin = RuleOrigin {
                        section: Section::Acl,
                        index,
                        at: acl.at,
                    };
                    let splace = Place::Acl {
                        index,
                        field: "src",
                    };
                    let dplace = Place::Acl {
                        index,
                        field: "dst",
                    };
                    let src = c.sources(&acl.src, &splace)?;
                    let mut dst = Vec::with_capacity(acl.dst.len());
                    for d in &acl.dst {
                        let targets = c.destinations(&d.alias, &dplace)?;
                        if targets.contains(&Target::SelfDevices) {
                            check_self_sources(&acl.src, &splace, true)?;
                        }
                        dst.extend(targets.into_iter().map(|target| DstSpec {
                            target,
                            ports: d.ports.clone(),
                        }));
                    }
                    rules.push(Rule {
                        origin,
                        body: RuleBody {
                            src: sorted(src),
                            dst,
                            protos: acl
                                .proto
                                .as_ref()
                                .map(|p| vec![p.value])
                                .unwrap_or_default(),
                            access: Access::Ip,
                            via: Vec::new(),
                        },
                    });
                }
                for (index, g) in grants.iter().flatten().enumerate() {
                    let origin = RuleOrigin {
                        section: Section::Grant,
                        index,
                        at: g.at,
                    };
                    let splace = Place::Grant {
                        index,
                        field: "src",
                    };
                    let dplace = Place::Grant {
                        index,
                        field: "dst",
                    };
                    let vplace = Place::Grant {
                        index,
                        field: "via",
                    };
                    let src = sorted(c.sources(&g.src, &splace)?);
                    let app_only = g.ip.as_ref().is_none_or(Vec::is_empty);
                    let mut targets = Vec::with_capacity(g.dst.len());
                    for d in &g.dst {
                        if let Alias::Prefix(pfx) = &d.value
                            && pfx.prefix_len() == 0
                        {
                            return Err(PolicyError::AllAddressesDst {
                                at: d.at,
                                place: dplace,
                                value: pfx.to_string(),
                            });
                        }
                        if !g.app.is_empty()
                            && matches!(d.value, Alias::AutoGroup(AutoGroup::Internet))
                        {
                            return Err(not_allowed(d, &dplace, AliasPosition::Dst));
                        }
                        let t = c.destinations(d, &dplace)?;
                        if t.contains(&Target::SelfDevices) {
                            check_self_sources(&g.src, &splace, false)?;
                        }
                        targets.extend(t);
                    }
                    let mut via = Vec::with_capacity(g.via.len());
                    for v in &g.via {
                        match &v.value {
                            Alias::Tag(t) => {
                                c.tag_defined(t, v.at, &vplace)?;
                                via.push(t.clone());
                            }
                            _ => return Err(not_allowed(v, &vplace, AliasPosition::Via)),
                        }
                    }
                    via.sort();
                    via.dedup();
                    if app_only {
                        rules.push(Rule {
                            origin,
                            body: RuleBody {
                                src: src.clone(),
                                dst: targets
                                    .iter()
                                    .map(|t| DstSpec {
                                        target: t.clone(),
                                        ports: vec![PortRange::ALL],
                                    })
                                    .collect(),
                                protos: Vec::new(),
                                access: Access::AppOnly,
                                via: via.clone(),
                            },
                        });
                        continue;
                    }
                    // One rule per protocol, ports of that protocol on every destination.
                    let mut by_proto: Vec<(Option<u8>, Vec<PortRange>)> = Vec::new();
                    for spec in g.ip.iter().flatten() {
                        match by_proto.iter_mut().find(|(p, _)| *p == spec.proto) {
                            Some((_, ports)) => ports.extend(spec.ports.iter().copied()),
                            None => by_proto.push((spec.proto, spec.ports.clone())),
                        }
                    }
                    for (proto, ports) in by_proto {
                        rules.push(Rule {
                            origin,
                            body: RuleBody {
                                src: src.clone(),
                                dst: targets
                                    .iter()
                                    .map(|t| DstSpec {
                                        target: t.clone(),
                                        ports: ports.clone(),
                                    })
                                    .collect(),
                                protos: proto.map(|p| vec![p]).unwrap_or_default(),
                                access: Access::Ip,
                                via: via.clone(),
                            },
                        });
                    }
                }
            }
        }
        Ok(Self {
            rules,
            tag_owners: p
                .tag_owners
                .iter()
                .map(|t| {
                    (
                        t.tag.clone(),
                        t.owners.iter().map(|o| o.value.clone()).collect(),
                    )
                })
                .collect(),
            groups: c.groups.clone(),
            hosts: c.hosts.clone(),
            auto_approvers: p.auto_approvers.clone(),
            tests: p.tests.clone(),
            ssh,
            ssh_tests: p.ssh_tests.clone(),
        })
    }

    /// The rules, in policy order (acls first, then grants).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// `autoApprovers`, for route approval.
    pub fn auto_approvers(&self) -> &AutoApprovers {
        &self.auto_approvers
    }

    /// The `tests` entries.
    pub fn tests(&self) -> &[PolicyTest] {
        &self.tests
    }

    /// The `ssh` rules, resolved.
    pub fn ssh_rules(&self) -> &[SshAccess] {
        &self.ssh
    }

    /// The `sshTests` entries.
    pub fn ssh_tests(&self) -> &[SshTest] {
        &self.ssh_tests
    }

    /// Whether a tag has an entry in `tagOwners`.
    pub fn tag_defined(&self, tag: &str) -> bool {
        self.tag_owners.contains_key(tag)
    }

    /// The owners listed for a tag.
    pub fn tag_owners(&self, tag: &str) -> Option<&[Alias]> {
        self.tag_owners.get(tag).map(Vec::as_slice)
    }

    /// Check tags a pre-auth key or an admin wants to give a node: each must be in
    /// `tagOwners`. (With no policy configured there is nothing to check against: the caller
    /// knows whether one is, see `Core::check_node_tags`.)
    pub fn check_tags<S: AsRef<str>>(&self, tags: &[S]) -> Result<(), PolicyError> {
        for t in tags {
            if !self.tag_owners.contains_key(t.as_ref()) {
                return Err(PolicyError::TagWithoutOwner {
                    tag: t.as_ref().to_string(),
                });
            }
        }
        Ok(())
    }

    /// A host's prefix.
    pub fn host(&self, name: &str) -> Option<IpNet> {
        self.hosts.get(name).copied()
    }

    /// A group's member user tokens.
    pub fn group(&self, name: &str) -> Option<&[String]> {
        self.groups.get(name).map(Vec::as_slice)
    }
}

fn sorted(mut v: Vec<Selector>) -> Vec<Selector> {
    v.sort();
    v.dedup();
    v
}

fn not_allowed(a: &Spanned<Alias>, place: &Place, position: AliasPosition) -> PolicyError {
    PolicyError::AliasNotAllowed {
        at: a.at,
        place: place.clone(),
        alias: a.value.to_string(),
        position,
    }
}

/// `autogroup:self` destinations take users, groups and `autogroup:member` as sources (and `*`
/// in acls).
fn check_self_sources(
    src: &[Spanned<Alias>],
    place: &Place,
    wildcard_ok: bool,
) -> Result<(), PolicyError> {
    for a in src {
        let ok = match &a.value {
            Alias::User(_)
            | Alias::UserDomain(_)
            | Alias::Group(_)
            | Alias::AutoGroup(AutoGroup::Member) => true,
            Alias::Wildcard => wildcard_ok,
            _ => false,
        };
        if !ok {
            return Err(PolicyError::SelfWithSource {
                at: a.at,
                place: place.clone(),
                alias: a.value.to_string(),
            });
        }
    }
    Ok(())
}

/// Definitions needed to resolve aliases.
struct Ctx {
    groups: BTreeMap<String, Vec<String>>,
    hosts: BTreeMap<String, IpNet>,
    tags: BTreeSet<String>,
}

impl Ctx {
    fn new(p: &Policy) -> Self {
        Self {
            groups: p
                .groups
                .iter()
                .map(|g| {
                    (
                        g.name.clone(),
                        g.members.iter().map(|m| m.value.clone()).collect(),
                    )
                })
                .collect(),
            hosts: p.hosts.iter().map(|h| (h.name.clone(), h.prefix)).collect(),
            tags: p.tag_owners.iter().map(|t| t.tag.clone()).collect(),
        }
    }

    fn tag_defined(&self, tag: &str, at: Pos, place: &Place) -> Result<(), PolicyError> {
        if self.tags.contains(tag) {
            Ok(())
        } else {
            Err(PolicyError::UndefinedTag {
                at,
                place: place.clone(),
                tag: tag.to_string(),
            })
        }
    }

    /// Resolve an alias in a source-like position to selectors (any autogroup passes; the
    /// caller checks positions).
    fn resolve(&self, a: &Spanned<Alias>, place: &Place) -> Result<Vec<Selector>, PolicyError> {
        Ok(match &a.value {
            Alias::Wildcard => vec![Selector::All],
            Alias::User(u) => vec![Selector::User(u.clone())],
            Alias::UserDomain(d) => vec![Selector::UserDomain(d.clone())],
            Alias::Group(g) => self
                .groups
                .get(g)
                .ok_or_else(|| PolicyError::UndefinedGroup {
                    at: a.at,
                    place: place.clone(),
                    group: g.clone(),
                })?
                .iter()
                .map(|u| Selector::User(u.clone()))
                .collect(),
            Alias::Tag(t) => {
                self.tag_defined(t, a.at, place)?;
                vec![Selector::Tag(t.clone())]
            }
            Alias::Host(h) => vec![Selector::Prefix(*self.hosts.get(h).ok_or_else(|| {
                PolicyError::UndefinedHost {
                    at: a.at,
                    place: place.clone(),
                    host: h.clone(),
                }
            })?)],
            Alias::Prefix(p) => vec![Selector::Prefix(*p)],
            Alias::AutoGroup(AutoGroup::Member) => vec![Selector::Member],
            Alias::AutoGroup(AutoGroup::Tagged) => vec![Selector::Tagged],
            Alias::AutoGroup(AutoGroup::DangerAll) => vec![Selector::Everything],
            Alias::AutoGroup(AutoGroup::Internet) => vec![Selector::Internet],
            Alias::AutoGroup(AutoGroup::SelfDevices | AutoGroup::NonRoot | AutoGroup::Role(_)) => {
                Vec::new()
            }
        })
    }

    /// Owners (tagOwners, autoApprovers): users, groups, tags.
    fn owner(&self, a: &Spanned<Alias>, place: &Place) -> Result<(), PolicyError> {
        match &a.value {
            Alias::User(_) | Alias::UserDomain(_) | Alias::Group(_) | Alias::Tag(_) => {
                self.resolve(a, place).map(|_| ())
            }
            // Role autogroups own tags in Tailscale (autogroup:admin); nobody holds them here.
            Alias::AutoGroup(AutoGroup::Role(_)) => Ok(()),
            _ => Err(not_allowed(a, place, AliasPosition::Owner)),
        }
    }

    fn sources(&self, src: &[Spanned<Alias>], place: &Place) -> Result<Vec<Selector>, PolicyError> {
        let mut out = Vec::new();
        for a in src {
            match &a.value {
                Alias::AutoGroup(
                    AutoGroup::SelfDevices | AutoGroup::Internet | AutoGroup::NonRoot,
                ) => {
                    return Err(not_allowed(a, place, AliasPosition::Src));
                }
                _ => out.extend(self.resolve(a, place)?),
            }
        }
        Ok(out)
    }

    /// A destination's targets: one per selector (a group gives one per member), none for an
    /// alias that matches nobody (a role autogroup, an empty group).
    fn destinations(&self, a: &Spanned<Alias>, place: &Place) -> Result<Vec<Target>, PolicyError> {
        match &a.value {
            Alias::AutoGroup(AutoGroup::SelfDevices) => Ok(vec![Target::SelfDevices]),
            Alias::AutoGroup(AutoGroup::DangerAll | AutoGroup::NonRoot) => {
                Err(not_allowed(a, place, AliasPosition::Dst))
            }
            _ => Ok(self
                .resolve(a, place)?
                .into_iter()
                .map(Target::Sel)
                .collect()),
        }
    }
}
