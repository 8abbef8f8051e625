//! Every way a policy can be refused, each naming the place in the file (section, rule index,
//! key) and, where the parser knows it, the line and column.

use std::fmt;

/// A position in the policy text: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, counted in characters.
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// Where in the policy something is: the section, the entry (index or key) and the field.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Place {
    /// The top-level object.
    Root,
    /// A member list in `groups`.
    Group {
        /// The group name (`group:x`).
        name: String,
    },
    /// An entry of `hosts`.
    Host {
        /// The host name.
        name: String,
    },
    /// An entry of `tagOwners`.
    TagOwner {
        /// The tag.
        tag: String,
    },
    /// A field of `acls[index]`.
    Acl {
        /// Index in `acls`, from 0.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A field of `grants[index]`.
    Grant {
        /// Index in `grants`, from 0.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// An entry of `autoApprovers` (`routes.<prefix>` or `exitNode`).
    AutoApprover {
        /// The key (`routes.10.0.0.0/8`, `exitNode`).
        key: String,
    },
    /// A field of `nodeAttrs[index]`.
    NodeAttr {
        /// Index in `nodeAttrs`.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A field of `ssh[index]`.
    Ssh {
        /// Index in `ssh`.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A field of `tests[index]`.
    Test {
        /// Index in `tests`.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A field of `sshTests[index]`.
    SshTest {
        /// Index in `sshTests`.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A whole top-level section (`groups`, `acls`, ...).
    Section {
        /// Its name.
        name: &'static str,
    },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Root => write!(f, "policy"),
            Place::Group { name } => write!(f, "groups[{name:?}]"),
            Place::Host { name } => write!(f, "hosts[{name:?}]"),
            Place::TagOwner { tag } => write!(f, "tagOwners[{tag:?}]"),
            Place::Acl { index, field } => entry(f, "acls", *index, field),
            Place::Grant { index, field } => entry(f, "grants", *index, field),
            Place::AutoApprover { key } => write!(f, "autoApprovers.{key}"),
            Place::NodeAttr { index, field } => entry(f, "nodeAttrs", *index, field),
            Place::Ssh { index, field } => entry(f, "ssh", *index, field),
            Place::Test { index, field } => entry(f, "tests", *index, field),
            Place::SshTest { index, field } => entry(f, "sshTests", *index, field),
            Place::Section { name } => write!(f, "{name}"),
        }
    }
}

/// `section[index]` or `section[index].field` (an empty field names the whole entry).
fn entry(f: &mut fmt::Formatter<'_>, section: &str, index: usize, field: &str) -> fmt::Result {
    if field.is_empty() {
        write!(f, "{section}[{index}]")
    } else {
        write!(f, "{section}[{index}].{field}")
    }
}

/// Why a port list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortProblem {
    /// Empty text or an empty list element.
    Empty,
    /// Not a decimal number (`ssh`, `self`, `-1`).
    NotANumber,
    /// Above 65535.
    OutOfRange,
    /// A port or range starting at 0 (use `*`).
    Zero,
    /// `first-last` with first > last.
    Reversed,
}

impl fmt::Display for PortProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProblem::Empty => "empty",
            PortProblem::NotANumber => "not a port number",
            PortProblem::OutOfRange => "above 65535",
            PortProblem::Zero => "first port must be > 0, or use '*' for all ports",
            PortProblem::Reversed => "first port above last port",
        })
    }
}

/// Where an alias appeared, for [`PolicyError::AliasNotAllowed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AliasPosition {
    /// A rule's `src`.
    Src,
    /// A rule's `dst`.
    Dst,
    /// An owner list (`tagOwners`, `autoApprovers`) or a group's members.
    Owner,
    /// A grant's `via`.
    Via,
    /// A `nodeAttrs` target.
    Target,
    /// A `tests` entry.
    Test,
}

impl fmt::Display for AliasPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AliasPosition::Src => "src",
            AliasPosition::Dst => "dst",
            AliasPosition::Owner => "an owner list",
            AliasPosition::Via => "via",
            AliasPosition::Target => "a nodeAttrs target",
            AliasPosition::Test => "a test",
        })
    }
}

/// Why an SSH rule was refused (the block is validated, not enforced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SshProblem {
    /// `action` missing or empty.
    MissingAction,
    /// `action` other than `accept` or `check` (case-sensitive).
    BadAction,
    /// `users` missing, null or empty.
    MissingUsers,
    /// A user entry empty or `*`.
    BadUser,
    /// `checkPeriod` not a duration, not positive, or above 168h.
    BadCheckPeriod,
    /// An empty `acceptEnv` entry.
    EmptyAcceptEnv,
    /// A `dst` that is not a tag, user, group, `autogroup:self`/`member`/`tagged` or `*`.
    BadDst,
    /// A `user:*@domain` form naming a domain the tailnet does not have.
    UnknownDomain,
}

impl fmt::Display for SshProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SshProblem::MissingAction => "action must be specified",
            SshProblem::BadAction => "action must be \"accept\" or \"check\"",
            SshProblem::MissingUsers => "users must be specified",
            SshProblem::BadUser => "user is not valid",
            SshProblem::BadCheckPeriod => "checkPeriod must be a positive duration up to 168h",
            SshProblem::EmptyAcceptEnv => "acceptEnv values cannot be empty",
            SshProblem::BadDst => "dst must be a tag, user, group, or autogroup",
            SshProblem::UnknownDomain => {
                "domain is not associated with this tailnet (user:*@<domain>)"
            }
        })
    }
}

/// Why a grant's `app` capability name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapabilityProblem {
    /// Not `{domain}/{path}`.
    Form,
    /// In the `tailscale.com` domain but not a capability that may be granted.
    Reserved,
}

impl fmt::Display for CapabilityProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapabilityProblem::Form => "capability name must have the form {domain}/{path}",
            CapabilityProblem::Reserved => {
                "capability name must not be in the tailscale.com domain"
            }
        })
    }
}

/// What a failing `tests` entry got wrong.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TestProblem {
    /// The entry has no `src` (or an empty one).
    MissingSrc,
    /// The entry has neither `accept` nor `deny`.
    MissingExpectations,
    /// `src` or a destination host names no known alias (undefined group, tag, host, user, or
    /// an autogroup tests cannot use).
    UnknownAlias {
        /// The alias as written.
        alias: String,
    },
    /// A destination is not `host:port` with one host and one port (a CIDR, a range, a list,
    /// `*`, a bad number).
    BadDestination {
        /// The destination as written.
        dst: String,
    },
    /// `proto` is not `tcp`, `udp`, `sctp` (or a number of those).
    BadProto {
        /// The protocol as written.
        proto: String,
    },
    /// An `accept` destination the policy does not allow (from every address of `src`).
    NotAllowed {
        /// The destination as written.
        dst: String,
    },
    /// A `deny` destination the policy allows.
    NotDenied {
        /// The destination as written.
        dst: String,
    },
    /// An `sshTests` login user that is empty.
    BadLoginUser,
    /// An `sshTests` `accept`/`check` login the `ssh` rules do not allow.
    SshNotAllowed {
        /// The destination host as written.
        dst: String,
        /// The login user.
        user: String,
    },
    /// An `sshTests` `deny` login the `ssh` rules allow.
    SshNotDenied {
        /// The destination host as written.
        dst: String,
        /// The login user.
        user: String,
    },
}

impl fmt::Display for TestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestProblem::MissingSrc => write!(f, "src must be specified"),
            TestProblem::MissingExpectations => {
                write!(f, "accept, check or deny must be specified")
            }
            TestProblem::UnknownAlias { alias } => write!(f, "unknown alias {alias:?}"),
            TestProblem::BadDestination { dst } => {
                write!(f, "{dst:?} is not host:port with one host and one port")
            }
            TestProblem::BadProto { proto } => {
                write!(f, "proto {proto:?}: tests take tcp, udp or sctp")
            }
            TestProblem::NotAllowed { dst } => write!(f, "accept {dst:?}: denied"),
            TestProblem::NotDenied { dst } => write!(f, "deny {dst:?}: allowed"),
            TestProblem::BadLoginUser => write!(f, "login users cannot be empty"),
            TestProblem::SshNotAllowed { dst, user } => {
                write!(f, "ssh {user}@{dst}: denied")
            }
            TestProblem::SshNotDenied { dst, user } => {
                write!(f, "ssh {user}@{dst}: allowed")
            }
        }
    }
}

/// Which block a failing test is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestBlock {
    /// `tests`: network access.
    Tests,
    /// `sshTests`: SSH logins.
    SshTests,
}

/// One failing entry of the `tests` (or `sshTests`) block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TestFailure {
    /// The block.
    pub block: TestBlock,
    /// Index in the block, from 0.
    pub index: usize,
    /// Where the entry starts.
    pub at: Pos,
    /// Its `src` as written (empty when missing).
    pub src: String,
    /// What failed.
    pub problem: TestProblem,
}

impl fmt::Display for TestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let block = match self.block {
            TestBlock::Tests => "tests",
            TestBlock::SshTests => "sshTests",
        };
        write!(
            f,
            "{}: {block}[{}] (src {:?}): {}",
            self.at, self.index, self.src, self.problem
        )
    }
}

/// Why a policy was refused. Every variant names where; none is a bare string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not valid HuJSON.
    #[error("{at}: syntax error: {message}")]
    Syntax {
        /// Where the parser stopped.
        at: Pos,
        /// The parser's description.
        message: String,
    },
    /// The text holds no value, or the top level is not an object.
    #[error("{at}: the policy must be one JSON object")]
    NotAnObject {
        /// Where the value starts.
        at: Pos,
    },
    /// A value has the wrong JSON type.
    #[error("{at}: {place}: expected {expected}")]
    WrongType {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// What was expected ("a string", "a list of strings", ...).
        expected: &'static str,
    },
    /// A key not in the policy language (`ipsets`, `postures`, a typo).
    #[error("{at}: {place}: unknown field {field:?}")]
    UnknownField {
        /// Where the key is.
        at: Pos,
        /// The object it is in.
        place: Place,
        /// The key.
        field: String,
    },
    /// A key given twice (names compare case-insensitively).
    #[error("{at}: {place}: field {field:?} given twice")]
    DuplicateField {
        /// Where the second one is.
        at: Pos,
        /// The object it is in.
        place: Place,
        /// The key.
        field: String,
    },
    /// A required key is missing.
    #[error("{at}: {place}: {field:?} must be specified")]
    MissingField {
        /// Where the object starts.
        at: Pos,
        /// The object.
        place: Place,
        /// The missing key.
        field: &'static str,
    },
    /// An acl `action` other than `accept`.
    #[error("{at}: acls[{index}].action: {action:?} is not supported (only \"accept\")")]
    UnsupportedAction {
        /// Where.
        at: Pos,
        /// Index in `acls`.
        index: usize,
        /// The action given.
        action: String,
    },
    /// Text that is no alias at all (an unknown `autogroup:`, `user:`, an empty string).
    #[error("{at}: {place}: {alias:?} is not a valid alias")]
    BadAlias {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The text.
        alias: String,
    },
    /// An alias used where the language does not allow it (`autogroup:self` in `src`,
    /// `autogroup:internet` as an owner, a tag as the source of an `autogroup:self` rule...).
    #[error("{at}: {place}: {alias:?} cannot be used in {position}")]
    AliasNotAllowed {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The alias.
        alias: String,
        /// The position it may not take.
        position: AliasPosition,
    },
    /// A `group:` alias with no entry in `groups`.
    #[error("{at}: {place}: group {group:?} is not defined")]
    UndefinedGroup {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The group.
        group: String,
    },
    /// A `tag:` alias with no entry in `tagOwners`.
    #[error("{at}: {place}: tag {tag:?} is not defined in tagOwners")]
    UndefinedTag {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The tag.
        tag: String,
    },
    /// A host name with no entry in `hosts`.
    #[error("{at}: {place}: host {host:?} is not defined")]
    UndefinedHost {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The host name.
        host: String,
    },
    /// A tag that must be owned (a pre-auth key's, a node's) has no `tagOwners` entry.
    #[error("tag {tag:?} has no owner in tagOwners")]
    TagWithoutOwner {
        /// The tag.
        tag: String,
    },
    /// A tag name that does not start with an ASCII letter after `tag:`, or has characters
    /// other than letters, digits, `-` and `_`.
    #[error("{at}: {place}: {tag:?}: tag names must start with a letter after 'tag:'")]
    BadTagName {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The tag.
        tag: String,
    },
    /// A group name without the `group:` prefix, or a group member that is not a user.
    #[error(
        "{at}: {place}: {member:?}: group members must be users (no groups, tags or autogroups)"
    )]
    BadGroupMember {
        /// Where.
        at: Pos,
        /// The group.
        place: Place,
        /// The member.
        member: String,
    },
    /// A `groups` key without the `group:` prefix or a `hosts` key with `@` or `:`.
    #[error("{at}: {place}: {name:?} is not a valid name here")]
    BadName {
        /// Where.
        at: Pos,
        /// The section.
        place: Place,
        /// The key.
        name: String,
    },
    /// An `autogroup:self` destination with a source that is not a user, a group,
    /// `autogroup:member` (or `*`, in `acls` only).
    #[error(
        "{at}: {place}: {alias:?}: autogroup:self can only be used with users, groups, or supported autogroups"
    )]
    SelfWithSource {
        /// Where the source is.
        at: Pos,
        /// Which field.
        place: Place,
        /// The source alias.
        alias: String,
    },
    /// A port list that does not parse.
    #[error("{at}: {place}: port range {value:?}: {problem}")]
    BadPort {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The ports as written.
        value: String,
        /// What is wrong.
        problem: PortProblem,
    },
    /// An IP address or CIDR that does not parse.
    #[error("{at}: {place}: {value:?} is not a valid IP address or CIDR")]
    BadCidr {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The text.
        value: String,
    },
    /// A protocol that is neither a known name nor a number 1-255.
    #[error("{at}: {place}: {value:?} is not a protocol name or number")]
    BadProto {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The text.
        value: String,
    },
    /// Ports named for a protocol without ports (only TCP, UDP and SCTP have them).
    #[error("{at}: {place}: protocol {proto} has no ports; use '*'")]
    PortsWithoutPortProto {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The protocol number.
        proto: u8,
    },
    /// `0.0.0.0/0` or `::/0` as a destination.
    #[error(
        "{at}: {place}: {value:?}: to allow all IP addresses, use \"*\" or \"autogroup:internet\""
    )]
    AllAddressesDst {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The prefix as written.
        value: String,
    },
    /// A grant with neither `ip` nor `app` (or both empty).
    #[error("{at}: grants[{index}]: ip and app can not both be empty")]
    EmptyGrant {
        /// Where the grant starts.
        at: Pos,
        /// Index in `grants`.
        index: usize,
    },
    /// An `app` capability name that may not be granted.
    #[error("{at}: {place}: {name:?}: {problem}")]
    BadCapability {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The capability name.
        name: String,
        /// What is wrong.
        problem: CapabilityProblem,
    },
    /// A `nodeAttrs` `ipPool` inside a range Tailscale reserves.
    #[error("{at}: {place}: IP pool {pool} is within a reserved range")]
    ReservedIpPool {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// The pool.
        pool: ipnet::IpNet,
    },
    /// An `ssh` rule that Tailscale would refuse.
    #[error("{at}: {place}: {problem}")]
    Ssh {
        /// Where.
        at: Pos,
        /// Which field.
        place: Place,
        /// What is wrong.
        problem: SshProblem,
    },
    /// One or more `tests` entries failed against the compiled policy.
    #[error("test(s) failed: {}", failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
    TestsFailed {
        /// Each failing entry.
        failures: Vec<TestFailure>,
    },
}
