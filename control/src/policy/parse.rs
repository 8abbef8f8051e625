//! The policy file as typed data: every section read from the HuJSON tree with positions kept,
//! syntax of aliases, ports and protocols checked. References (groups, tags, hosts) and where
//! each alias may stand are checked by [`super::compile`].

use ipnet::IpNet;
use jsonc_parser::ast::Value;

use super::alias::{Alias, AliasProblem, AutoGroup, looks_like_address, parse_alias, valid_tag};
use super::error::{CapabilityProblem, Place, PolicyError, PortProblem, Pos, SshProblem};
use super::hujson::{self, Doc, Field};
use super::ports::{PortRange, has_ports, parse_ports, parse_proto};

/// A value with the position it was written at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it starts in the text.
    pub at: Pos,
}

/// A parsed policy file. [`Policy::parse`] accepts Tailscale's and Headscale's format as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `groups`: name (with `group:`) to member users.
    pub groups: Vec<GroupDef>,
    /// `hosts`: name to prefix.
    pub hosts: Vec<HostDef>,
    /// `tagOwners`: tag to owners.
    pub tag_owners: Vec<TagOwnerDef>,
    /// `acls`; `None` when absent (with `grants` also absent: allow all).
    pub acls: Option<Vec<AclRule>>,
    /// `grants`; `None` when absent. `Some(vec![])` denies all.
    pub grants: Option<Vec<GrantRule>>,
    /// `autoApprovers`, kept for route approval.
    pub auto_approvers: AutoApprovers,
    /// `nodeAttrs`, validated and kept.
    pub node_attrs: Vec<NodeAttr>,
    /// `ssh`, validated and kept (warren does not run SSH).
    pub ssh: Vec<SshRule>,
    /// `tests`, run against the compiled policy before it is applied.
    pub tests: Vec<PolicyTest>,
    /// `sshTests`, run against the `ssh` rules before the policy is applied.
    pub ssh_tests: Vec<SshTest>,
    /// `randomizeClientPort`.
    pub randomize_client_port: bool,
}

/// One `groups` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDef {
    /// `group:name`.
    pub name: String,
    /// Where the key is.
    pub at: Pos,
    /// Member user tokens (`alice@example.com`).
    pub members: Vec<Spanned<String>>,
}

/// One `hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDef {
    /// The name.
    pub name: String,
    /// Where the key is.
    pub at: Pos,
    /// The address or prefix.
    pub prefix: IpNet,
}

/// One `tagOwners` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagOwnerDef {
    /// `tag:name`.
    pub tag: String,
    /// Where the key is.
    pub at: Pos,
    /// Owners: users, groups, tags.
    pub owners: Vec<Spanned<Alias>>,
}

/// One `acls` entry (`action: accept`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// Where the entry starts.
    pub at: Pos,
    /// `proto`, if given.
    pub proto: Option<Spanned<u8>>,
    /// `src`.
    pub src: Vec<Spanned<Alias>>,
    /// `dst`: alias and ports.
    pub dst: Vec<AclDst>,
}

/// One `alias:ports` of an acl's `dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclDst {
    /// The alias.
    pub alias: Spanned<Alias>,
    /// The ports.
    pub ports: Vec<PortRange>,
}

/// One `grants` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRule {
    /// Where the entry starts.
    pub at: Pos,
    /// `src`.
    pub src: Vec<Spanned<Alias>>,
    /// `dst`.
    pub dst: Vec<Spanned<Alias>>,
    /// `ip`: network access, `None` when absent.
    pub ip: Option<Vec<IpSpec>>,
    /// `app`: capability names (values are not interpreted).
    pub app: Vec<String>,
    /// `via`: tags of the routers the grant applies through.
    pub via: Vec<Spanned<Alias>>,
}

/// One entry of a grant's `ip`: `*`, `443`, `tcp:443`, `udp:*`, `58:*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpSpec {
    /// The protocol, `None` for the default set (TCP, UDP, ICMP, ICMPv6).
    pub proto: Option<u8>,
    /// The ports.
    pub ports: Vec<PortRange>,
}

/// `autoApprovers`: who may have routes approved automatically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoApprovers {
    /// Route prefix to approvers.
    pub routes: Vec<(IpNet, Vec<Spanned<Alias>>)>,
    /// Exit-node approvers.
    pub exit_node: Vec<Spanned<Alias>>,
}

/// One `nodeAttrs` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttr {
    /// Where it starts.
    pub at: Pos,
    /// Targets.
    pub target: Vec<Spanned<Alias>>,
    /// Attribute names.
    pub attr: Vec<String>,
    /// `ipPool` prefixes.
    pub ip_pool: Vec<IpNet>,
}

/// One `ssh` entry (validated only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshRule {
    /// Where it starts.
    pub at: Pos,
    /// `accept` or `check`.
    pub action: String,
    /// Sources.
    pub src: Vec<Spanned<Alias>>,
    /// Destinations.
    pub dst: Vec<Spanned<Alias>>,
    /// Login users.
    pub users: Vec<String>,
}

/// One `sshTests` entry: may `src` log in to each of `dst` as the listed users? Checked when
/// it runs, like `tests`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTest {
    /// Where it starts.
    pub at: Pos,
    /// `src` as written (`None` when missing).
    pub src: Option<String>,
    /// Destination hosts (no ports).
    pub dst: Vec<String>,
    /// Login users that must be allowed.
    pub accept: Vec<String>,
    /// Login users that must be allowed with a check (treated as allowed).
    pub check: Vec<String>,
    /// Login users that must be refused.
    pub deny: Vec<String>,
}

/// One `tests` entry. Its parts are checked when it runs: a malformed entry is a failing test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    /// Where it starts.
    pub at: Pos,
    /// `src` as written (`None` when missing).
    pub src: Option<String>,
    /// `proto` as written.
    pub proto: Option<String>,
    /// `accept` destinations (`host:port`).
    pub accept: Vec<String>,
    /// `deny` destinations.
    pub deny: Vec<String>,
}

const TOP: &[&str] = &[
    "groups",
    "hosts",
    "tagOwners",
    "acls",
    "grants",
    "nodeAttrs",
    "autoApprovers",
    "ssh",
    "tests",
    "sshTests",
    "randomizeClientPort",
];

impl Policy {
    /// Parse a policy file: HuJSON, keys case-insensitive, unknown keys refused.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let doc = Doc::new(text);
        let root = hujson::parse(text, &doc)?;
        let Value::Object(obj) = &root else {
            return Err(PolicyError::NotAnObject { at: doc.at(&root) });
        };
        let mut p = Policy::default();
        for f in hujson::fields(&doc, obj, &Place::Root, TOP, false)? {
            let place = Place::Section { name: f.name };
            match f.name {
                "groups" => p.groups = parse_groups(&doc, &f, &place)?,
                "hosts" => p.hosts = parse_hosts(&doc, &f, &place)?,
                "tagOwners" => p.tag_owners = parse_tag_owners(&doc, &f, &place)?,
                "acls" => {
                    let arr = hujson::array(&doc, f.value, &place)?;
                    let mut rules = Vec::with_capacity(arr.elements.len());
                    for (i, v) in arr.elements.iter().enumerate() {
                        rules.push(parse_acl(&doc, i, v)?);
                    }
                    p.acls = Some(rules);
                }
                "grants" => {
                    let arr = hujson::array(&doc, f.value, &place)?;
                    let mut rules = Vec::with_capacity(arr.elements.len());
                    for (i, v) in arr.elements.iter().enumerate() {
                        rules.push(parse_grant(&doc, i, v)?);
                    }
                    p.grants = Some(rules);
                }
                "nodeAttrs" => {
                    let arr = hujson::array(&doc, f.value, &place)?;
                    for (i, v) in arr.elements.iter().enumerate() {
                        p.node_attrs.push(parse_node_attr(&doc, i, v)?);
                    }
                }
                "autoApprovers" => p.auto_approvers = parse_auto_approvers(&doc, &f, &place)?,
                "ssh" => {
                    let arr = hujson::array(&doc, f.value, &place)?;
                    for (i, v) in arr.elements.iter().enumerate() {
                        p.ssh.push(parse_ssh(&doc, i, v)?);
                    }
                }
                "tests" => {
                    let arr = hujson::array(&doc, f.value, &place)?;
                    for (i, v) in arr.elements.iter().enumerate() {
                        p.tests.push(parse_test(&doc, i, v)?);
                    }
                }
                "sshTests" => {
                    let arr = hujson::array(&doc, f.value, &place)?;
                    for (i, v) in arr.elements.iter().enumerate() {
                        p.ssh_tests.push(parse_ssh_test(&doc, i, v)?);
                    }
                }
                "randomizeClientPort" => match f.value {
                    Value::BooleanLit(b) => p.randomize_client_port = b.value,
                    other => return Err(hujson::wrong(&doc, other, &place, "true or false")),
                },
                _ => {}
            }
        }
        Ok(p)
    }
}

fn alias_at(text: &str, at: Pos, place: &Place) -> Result<Spanned<Alias>, PolicyError> {
    parse_alias(text)
        .map(|value| Spanned { value, at })
        .map_err(|problem| alias_error(text, at, place, problem))
}

fn alias_error(text: &str, at: Pos, place: &Place, problem: AliasProblem) -> PolicyError {
    match problem {
        AliasProblem::BadCidr => PolicyError::BadCidr {
            at,
            place: place.clone(),
            value: text.to_string(),
        },
        AliasProblem::BadTag => PolicyError::BadTagName {
            at,
            place: place.clone(),
            tag: text.to_string(),
        },
        AliasProblem::Unknown => PolicyError::BadAlias {
            at,
            place: place.clone(),
            alias: text.to_string(),
        },
    }
}

fn aliases(
    doc: &Doc<'_>,
    v: &Value<'_>,
    place: &Place,
) -> Result<Vec<Spanned<Alias>>, PolicyError> {
    hujson::strings(doc, v, place)?
        .into_iter()
        .map(|(s, at)| alias_at(&s, at, place))
        .collect()
}

fn parse_groups(
    doc: &Doc<'_>,
    f: &Field<'_, '_>,
    place: &Place,
) -> Result<Vec<GroupDef>, PolicyError> {
    let obj = hujson::object(doc, f.value, place)?;
    let mut out: Vec<GroupDef> = Vec::with_capacity(obj.properties.len());
    for prop in &obj.properties {
        let name = prop.name.as_str().to_string();
        let at = doc.at(&prop.name);
        if !name.starts_with("group:") || name.len() == "group:".len() {
            return Err(PolicyError::BadName {
                at,
                place: place.clone(),
                name,
            });
        }
        if out.iter().any(|g| g.name == name) {
            return Err(PolicyError::DuplicateField {
                at,
                place: place.clone(),
                field: name,
            });
        }
        let gplace = Place::Group { name: name.clone() };
        let mut members = Vec::new();
        if !matches!(prop.value, Value::NullKeyword(_)) {
            for (m, mat) in hujson::strings(doc, &prop.value, &gplace)? {
                match parse_alias(&m) {
                    Ok(Alias::User(_)) => members.push(Spanned { value: m, at: mat }),
                    _ => {
                        return Err(PolicyError::BadGroupMember {
                            at: mat,
                            place: gplace,
                            member: m,
                        });
                    }
                }
            }
        }
        out.push(GroupDef { name, at, members });
    }
    Ok(out)
}

fn parse_hosts(
    doc: &Doc<'_>,
    f: &Field<'_, '_>,
    place: &Place,
) -> Result<Vec<HostDef>, PolicyError> {
    let obj = hujson::object(doc, f.value, place)?;
    let mut out: Vec<HostDef> = Vec::with_capacity(obj.properties.len());
    for prop in &obj.properties {
        let name = prop.name.as_str().to_string();
        let at = doc.at(&prop.name);
        if name.is_empty()
            || name.contains('@')
            || name.contains(':')
            || name == "*"
            || looks_like_address(&name)
        {
            return Err(PolicyError::BadName {
                at,
                place: place.clone(),
                name,
            });
        }
        if out.iter().any(|h| h.name == name) {
            return Err(PolicyError::DuplicateField {
                at,
                place: place.clone(),
                field: name,
            });
        }
        let hplace = Place::Host { name: name.clone() };
        let (value, vat) = hujson::string(doc, &prop.value, &hplace)?;
        let prefix = super::alias::parse_prefix(&value).ok_or(PolicyError::BadCidr {
            at: vat,
            place: hplace,
            value: value.clone(),
        })?;
        out.push(HostDef { name, at, prefix });
    }
    Ok(out)
}

fn parse_tag_owners(
    doc: &Doc<'_>,
    f: &Field<'_, '_>,
    place: &Place,
) -> Result<Vec<TagOwnerDef>, PolicyError> {
    let obj = hujson::object(doc, f.value, place)?;
    let mut out: Vec<TagOwnerDef> = Vec::with_capacity(obj.properties.len());
    for prop in &obj.properties {
        let tag = prop.name.as_str().to_string();
        let at = doc.at(&prop.name);
        let tplace = Place::TagOwner { tag: tag.clone() };
        if !valid_tag(&tag) {
            return Err(PolicyError::BadTagName {
                at,
                place: tplace,
                tag,
            });
        }
        if out.iter().any(|t| t.tag == tag) {
            return Err(PolicyError::DuplicateField {
                at,
                place: place.clone(),
                field: tag,
            });
        }
        let owners = if matches!(prop.value, Value::NullKeyword(_)) {
            Vec::new()
        } else {
            aliases(doc, &prop.value, &tplace)?
        };
        out.push(TagOwnerDef { tag, at, owners });
    }
    Ok(out)
}

/// Split `alias:ports` at the last colon (`[v6]:ports` for bracketed IPv6).
fn split_dst(text: &str) -> Option<(&str, &str)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        return Some((addr, tail.strip_prefix(':')?));
    }
    text.rsplit_once(':')
}

fn parse_acl(doc: &Doc<'_>, index: usize, v: &Value<'_>) -> Result<AclRule, PolicyError> {
    let place = Place::Acl { index, field: "" };
    let obj = hujson::object(doc, v, &place)?;
    let at = doc.at(v);
    let fields = hujson::fields(doc, obj, &place, &["action", "src", "proto", "dst"], true)?;
    let mut action = None;
    let mut src = None;
    let mut dst_raw = None;
    let mut proto = None;
    for f in &fields {
        let fplace = Place::Acl {
            index,
            field: f.name,
        };
        match f.name {
            "action" => action = Some(hujson::string(doc, f.value, &fplace)?),
            "src" => src = Some(aliases(doc, f.value, &fplace)?),
            "dst" => dst_raw = Some(hujson::strings(doc, f.value, &fplace)?),
            "proto" => {
                let (text, pat) = match f.value {
                    Value::NumberLit(n) => (n.value.to_string(), doc.at(n)),
                    other => hujson::string(doc, other, &fplace)?,
                };
                if !text.is_empty() {
                    let p = parse_proto(&text).ok_or(PolicyError::BadProto {
                        at: pat,
                        place: fplace,
                        value: text.clone(),
                    })?;
                    proto = Some(Spanned { value: p, at: pat });
                }
            }
            _ => {}
        }
    }
    let Some((action, aat)) = action else {
        return Err(PolicyError::MissingField {
            at,
            place,
            field: "action",
        });
    };
    if action != "accept" {
        return Err(PolicyError::UnsupportedAction {
            at: aat,
            index,
            action,
        });
    }
    let src = src.ok_or(PolicyError::MissingField {
        at,
        place: place.clone(),
        field: "src",
    })?;
    let dst_raw = dst_raw.ok_or(PolicyError::MissingField {
        at,
        place: place.clone(),
        field: "dst",
    })?;
    let dplace = Place::Acl {
        index,
        field: "dst",
    };
    let mut dst = Vec::with_capacity(dst_raw.len());
    for (text, dat) in dst_raw {
        let (alias_text, ports_text) = split_dst(&text).unwrap_or((text.as_str(), ""));
        let ports = parse_ports(ports_text).map_err(|problem| PolicyError::BadPort {
            at: dat,
            place: dplace.clone(),
            value: ports_text.to_string(),
            problem,
        })?;
        if let Some(p) = &proto
            && !has_ports(p.value)
            && ports != [PortRange::ALL]
        {
            return Err(PolicyError::PortsWithoutPortProto {
                at: dat,
                place: dplace,
                proto: p.value,
            });
        }
        let alias = alias_at(alias_text, dat, &dplace)?;
        dst.push(AclDst { alias, ports });
    }
    Ok(AclRule {
        at,
        proto,
        src,
        dst,
    })
}

/// Parse one grant `ip` entry.
fn parse_ip_spec(text: &str) -> Result<IpSpec, IpSpecError> {
    if text == "*" {
        return Ok(IpSpec {
            proto: None,
            ports: vec![PortRange::ALL],
        });
    }
    match text.split_once(':') {
        Some((p, ports)) => {
            let proto = parse_proto(p).ok_or(IpSpecError::Proto)?;
            let ports = parse_ports(ports).map_err(IpSpecError::Port)?;
            if !has_ports(proto) && ports != [PortRange::ALL] {
                return Err(IpSpecError::PortsWithoutPortProto(proto));
            }
            Ok(IpSpec {
                proto: Some(proto),
                ports,
            })
        }
        None => Ok(IpSpec {
            proto: None,
            ports: parse_ports(text).map_err(IpSpecError::Port)?,
        }),
    }
}

enum IpSpecError {
    Proto,
    Port(PortProblem),
    PortsWithoutPortProto(u8),
}

/// Capabilities in the `tailscale.com` domain that a policy may grant.
const GRANTABLE_TAILSCALE_CAPS: &[&str] = &[
    "tailscale.com/cap/drive",
    "tailscale.com/cap/drive-sharer",
    "tailscale.com/cap/kubernetes",
    "tailscale.com/cap/relay",
    "tailscale.com/cap/tailsql",
    "tailscale.com/cap/tsidp",
    "tailscale.com/cap/webui",
];

fn check_capability(name: &str) -> Result<(), CapabilityProblem> {
    let Some((domain, path)) = name.split_once('/') else {
        return Err(CapabilityProblem::Form);
    };
    if domain.is_empty()
        || path.is_empty()
        || name.contains("://")
        || !domain.contains('.')
        || domain.contains(':')
    {
        return Err(CapabilityProblem::Form);
    }
    let lower = domain.to_ascii_lowercase();
    if (lower == "tailscale.com" || lower.ends_with(".tailscale.com"))
        && !GRANTABLE_TAILSCALE_CAPS.contains(&name)
    {
        return Err(CapabilityProblem::Reserved);
    }
    Ok(())
}

fn parse_grant(doc: &Doc<'_>, index: usize, v: &Value<'_>) -> Result<GrantRule, PolicyError> {
    let place = Place::Grant { index, field: "" };
    let obj = hujson::object(doc, v, &place)?;
    let at = doc.at(v);
    let fields = hujson::fields(doc, obj, &place, &["src", "dst", "ip", "app", "via"], true)?;
    let mut src = None;
    let mut dst = None;
    let mut ip = None;
    let mut app = Vec::new();
    let mut via = Vec::new();
    for f in &fields {
        let fplace = Place::Grant {
            index,
            field: f.name,
        };
        match f.name {
            "src" => src = Some(aliases(doc, f.value, &fplace)?),
            "dst" => dst = Some(aliases(doc, f.value, &fplace)?),
            "via" => via = aliases(doc, f.value, &fplace)?,
            "ip" => {
                let mut specs = Vec::new();
                for (text, iat) in hujson::strings(doc, f.value, &fplace)? {
                    let spec = parse_ip_spec(&text).map_err(|e| match e {
                        IpSpecError::Proto => PolicyError::BadProto {
                            at: iat,
                            place: fplace.clone(),
                            value: text.split_once(':').map_or("", |(p, _)| p).to_string(),
                        },
                        IpSpecError::Port(problem) => PolicyError::BadPort {
                            at: iat,
                            place: fplace.clone(),
                            value: text
                                .split_once(':')
                                .map_or(text.as_str(), |(_, p)| p)
                                .to_string(),
                            problem,
                        },
                        IpSpecError::PortsWithoutPortProto(proto) => {
                            PolicyError::PortsWithoutPortProto {
                                at: iat,
                                place: fplace.clone(),
                                proto,
                            }
                        }
                    })?;
                    specs.push(spec);
                }
                ip = Some(specs);
            }
            "app" => {
                let o = hujson::object(doc, f.value, &fplace)?;
                for prop in &o.properties {
                    let name = prop.name.as_str();
                    check_capability(name).map_err(|problem| PolicyError::BadCapability {
                        at: doc.at(&prop.name),
                        place: fplace.clone(),
                        name: name.to_string(),
                        problem,
                    })?;
                    app.push(name.to_string());
                }
            }
            _ => {}
        }
    }
    let src = src.ok_or(PolicyError::MissingField {
        at,
        place: place.clone(),
        field: "src",
    })?;
    let dst = dst.ok_or(PolicyError::MissingField {
        at,
        place: place.clone(),
        field: "dst",
    })?;
    if ip.as_ref().is_none_or(Vec::is_empty) && app.is_empty() {
        return Err(PolicyError::EmptyGrant { at, index });
    }
    Ok(GrantRule {
        at,
        src,
        dst,
        ip,
        app,
        via,
    })
}

fn parse_auto_approvers(
    doc: &Doc<'_>,
    f: &Field<'_, '_>,
    place: &Place,
) -> Result<AutoApprovers, PolicyError> {
    let obj = hujson::object(doc, f.value, place)?;
    let mut out = AutoApprovers::default();
    for sf in hujson::fields(doc, obj, place, &["routes", "exitNode", "services"], false)? {
        match sf.name {
            "routes" => {
                let rplace = Place::AutoApprover {
                    key: "routes".into(),
                };
                let o = hujson::object(doc, sf.value, &rplace)?;
                for prop in &o.properties {
                    let key = prop.name.as_str();
                    let kplace = Place::AutoApprover {
                        key: format!("routes.{key}"),
                    };
                    let prefix = key.parse::<IpNet>().map_err(|_| PolicyError::BadCidr {
                        at: doc.at(&prop.name),
                        place: kplace.clone(),
                        value: key.to_string(),
                    })?;
                    let owners = if matches!(prop.value, Value::NullKeyword(_)) {
                        Vec::new()
                    } else {
                        aliases(doc, &prop.value, &kplace)?
                    };
                    out.routes.push((prefix.trunc(), owners));
                }
            }
            "exitNode" => {
                let eplace = Place::AutoApprover {
                    key: "exitNode".into(),
                };
                out.exit_node = aliases(doc, sf.value, &eplace)?;
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Ranges Tailscale keeps for itself: an `ipPool` may not overlap them.
fn reserved_pool(p: &IpNet) -> bool {
    let quad100: IpNet = IpNet::from(std::net::IpAddr::from([100, 100, 100, 100]));
    let v4_service: Option<IpNet> = "100.100.0.0/16".parse().ok();
    p.contains(&quad100.addr())
        || v4_service.is_some_and(|s| s.contains(p) || p.contains(&s))
        || matches!(p, IpNet::V4(v4) if super::alias::tailnet_v4_excluded().contains(&v4.addr()))
}

fn parse_node_attr(doc: &Doc<'_>, index: usize, v: &Value<'_>) -> Result<NodeAttr, PolicyError> {
    let place = Place::NodeAttr { index, field: "" };
    let obj = hujson::object(doc, v, &place)?;
    let at = doc.at(v);
    let mut out = NodeAttr {
        at,
        target: Vec::new(),
        attr: Vec::new(),
        ip_pool: Vec::new(),
    };
    for f in hujson::fields(doc, obj, &place, &["target", "attr", "ipPool", "app"], true)? {
        let fplace = Place::NodeAttr {
            index,
            field: f.name,
        };
        match f.name {
            "target" => out.target = aliases(doc, f.value, &fplace)?,
            "attr" => {
                out.attr = hujson::strings(doc, f.value, &fplace)?
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
            }
            "ipPool" => {
                for (s, pat) in hujson::strings(doc, f.value, &fplace)? {
                    let pool = s.parse::<IpNet>().map_err(|_| PolicyError::BadCidr {
                        at: pat,
                        place: fplace.clone(),
                        value: s.clone(),
                    })?;
                    if reserved_pool(&pool) {
                        return Err(PolicyError::ReservedIpPool {
                            at: pat,
                            place: fplace,
                            pool,
                        });
                    }
                    out.ip_pool.push(pool);
                }
            }
            "app" => {
                hujson::object(doc, f.value, &fplace)?;
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Go's `time.ParseDuration` for the units a checkPeriod uses; `None` if it does not parse.
fn parse_duration_secs(text: &str) -> Option<f64> {
    if text == "0" {
        return Some(0.0);
    }
    let (neg, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * mult;
    }
    Some(if neg { -total } else { total })
}

fn parse_ssh(doc: &Doc<'_>, index: usize, v: &Value<'_>) -> Result<SshRule, PolicyError> {
    let place = Place::Ssh { index, field: "" };
    let obj = hujson::object(doc, v, &place)?;
    let at = doc.at(v);
    let known = [
        "action",
        "src",
        "dst",
        "users",
        "checkPeriod",
        "acceptEnv",
        "recorder",
        "enforceRecorder",
    ];
    let mut action = None;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    let mut users = None;
    for f in hujson::fields(doc, obj, &place, &known, true)? {
        let fplace = Place::Ssh {
            index,
            field: f.name,
        };
        let err = |problem| PolicyError::Ssh {
            at: f.key_at,
            place: fplace.clone(),
            problem,
        };
        match f.name {
            "action" => action = Some(hujson::string(doc, f.value, &fplace)?.0.trim().to_string()),
            "src" => {
                for (s, sat) in hujson::strings(doc, f.value, &fplace)? {
                    src.push(alias_at(s.trim(), sat, &fplace)?);
                }
            }
            "dst" => {
                for (s, sat) in hujson::strings(doc, f.value, &fplace)? {
                    let a = alias_at(s.trim(), sat, &fplace)?;
                    match &a.value {
                        Alias::Host(_) | Alias::Prefix(_) => {
                            return Err(PolicyError::Ssh {
                                at: sat,
                                place: fplace,
                                problem: SshProblem::BadDst,
                            });
                        }
                        _ => dst.push(a),
                    }
                }
            }
            "users" => {
                let list = hujson::strings(doc, f.value, &fplace)?;
                for (u, _) in &list {
                    if u.is_empty() || u == "*" {
                        return Err(err(SshProblem::BadUser));
                    }
                    if u.strip_prefix("localpart:*@")
                        .is_some_and(|d| d.contains('*'))
                    {
                        return Err(err(SshProblem::UnknownDomain));
                    }
                }
                users = Some(list.into_iter().map(|(u, _)| u).collect::<Vec<_>>());
            }
            "checkPeriod" => {
                let (s, _) = hujson::string(doc, f.value, &fplace)?;
                if s != "always" {
                    let secs = parse_duration_secs(&s).ok_or(err(SshProblem::BadCheckPeriod))?;
                    if !(0.0..=168.0 * 3600.0).contains(&secs) {
                        return Err(err(SshProblem::BadCheckPeriod));
                    }
                }
            }
            "acceptEnv" => {
                for (e, _) in hujson::strings(doc, f.value, &fplace)? {
                    if e.is_empty() {
                        return Err(err(SshProblem::EmptyAcceptEnv));
                    }
                }
            }
            _ => {}
        }
    }
    let action = match action {
        Some(a) if !a.is_empty() => a,
        _ => {
            return Err(PolicyError::Ssh {
                at,
                place: Place::Ssh {
                    index,
                    field: "action",
                },
                problem: SshProblem::MissingAction,
            });
        }
    };
    if action != "accept" && action != "check" {
        return Err(PolicyError::Ssh {
            at,
            place: Place::Ssh {
                index,
                field: "action",
            },
            problem: SshProblem::BadAction,
        });
    }
    let users = match users {
        Some(u) if !u.is_empty() => u,
        _ => {
            return Err(PolicyError::Ssh {
                at,
                place: Place::Ssh {
                    index,
                    field: "users",
                },
                problem: SshProblem::MissingUsers,
            });
        }
    };
    Ok(SshRule {
        at,
        action,
        src,
        dst,
        users,
    })
}

fn parse_ssh_test(doc: &Doc<'_>, index: usize, v: &Value<'_>) -> Result<SshTest, PolicyError> {
    let place = Place::SshTest { index, field: "" };
    let obj = hujson::object(doc, v, &place)?;
    let mut t = SshTest {
        at: doc.at(v),
        src: None,
        dst: Vec::new(),
        accept: Vec::new(),
        check: Vec::new(),
        deny: Vec::new(),
    };
    let known = ["src", "dst", "accept", "check", "deny"];
    for f in hujson::fields(doc, obj, &place, &known, true)? {
        let fplace = Place::SshTest {
            index,
            field: f.name,
        };
        match f.name {
            "src" => t.src = Some(hujson::string(doc, f.value, &fplace)?.0),
            "dst" => {
                for (s, sat) in hujson::strings(doc, f.value, &fplace)? {
                    match parse_alias(&s) {
                        Ok(Alias::Prefix(p)) if p.prefix_len() != p.max_prefix_len() => {
                            return Err(PolicyError::AliasNotAllowed {
                                at: sat,
                                place: fplace,
                                alias: s,
                                position: super::error::AliasPosition::Test,
                            });
                        }
                        Ok(Alias::AutoGroup(AutoGroup::Internet)) => {
                            return Err(PolicyError::AliasNotAllowed {
                                at: sat,
                                place: fplace,
                                alias: s,
                                position: super::error::AliasPosition::Test,
                            });
                        }
                        Ok(_) => t.dst.push(s),
                        Err(problem) => return Err(alias_error(&s, sat, &fplace, problem)),
                    }
                }
            }
            "accept" | "check" | "deny" => {
                let users = hujson::strings(doc, f.value, &fplace)?
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
                match f.name {
                    "accept" => t.accept = users,
                    "check" => t.check = users,
                    _ => t.deny = users,
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

fn parse_test(doc: &Doc<'_>, index: usize, v: &Value<'_>) -> Result<PolicyTest, PolicyError> {
    let place = Place::Test { index, field: "" };
    let obj = hujson::object(doc, v, &place)?;
    let at = doc.at(v);
    let mut t = PolicyTest {
        at,
        src: None,
        proto: None,
        accept: Vec::new(),
        deny: Vec::new(),
    };
    for f in hujson::fields(doc, obj, &place, &["src", "proto", "accept", "deny"], true)? {
        let fplace = Place::Test {
            index,
            field: f.name,
        };
        match f.name {
            "src" => t.src = Some(hujson::string(doc, f.value, &fplace)?.0),
            "proto" => {
                t.proto = Some(match f.value {
                    Value::NumberLit(n) => n.value.to_string(),
                    other => hujson::string(doc, other, &fplace)?.0,
                });
            }
            "accept" => {
                t.accept = hujson::strings(doc, f.value, &fplace)?
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
            }
            "deny" => {
                t.deny = hujson::strings(doc, f.value, &fplace)?
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
            }
            _ => {}
        }
    }
    Ok(t)
}

/// Split a test destination `host:port` / `[v6]:port` (shared with the tests block).
pub(crate) fn split_test_dst(text: &str) -> Option<(&str, &str)> {
    split_dst(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        assert_eq!(check_capability("example.com/cap/x"), Ok(()));
        assert_eq!(check_capability("tailscale.com/cap/drive"), Ok(()));
        assert_eq!(
            check_capability("tailscale.com/cap/funnel"),
            Err(CapabilityProblem::Reserved)
        );
        assert_eq!(
            check_capability("https://tailscale.com/cap/ingress"),
            Err(CapabilityProblem::Form)
        );
        assert_eq!(check_capability("nodomain"), Err(CapabilityProblem::Form));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("12h"), Some(43200.0));
        assert_eq!(parse_duration_secs("1h30m"), Some(5400.0));
        assert_eq!(parse_duration_secs("-1m"), Some(-60.0));
        assert_eq!(parse_duration_secs("abc"), None);
    }

    #[test]
    fn dst_split() {
        assert_eq!(split_dst("tag:a:22"), Some(("tag:a", "22")));
        assert_eq!(split_dst("[fd7a::1]:443"), Some(("fd7a::1", "443")));
        assert_eq!(
            split_dst("2001:db8::1/128:443"),
            Some(("2001:db8::1/128", "443"))
        );
        assert_eq!(split_dst("autogroup:self"), Some(("autogroup", "self")));
    }
}
