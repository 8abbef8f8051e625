//! Tailscale-format access policy ("network topology as policy"): the HuJSON file Tailscale
//! and Headscale use, parsed unchanged ([`Policy`]) with typed errors naming the place.
//!
//! Semantics follow Tailscale's control server where its captured output says so
//! (`../shared/policy-captures`), Headscale where the captures are silent.

mod alias;
mod error;
mod hujson;
mod parse;
mod ports;

pub use alias::{AdminRole, Alias, AutoGroup};
pub use error::{
    AliasPosition, CapabilityProblem, Place, PolicyError, PortProblem, Pos, SshProblem,
    TestFailure, TestProblem,
};
pub use parse::{
    AclDst, AclRule, AutoApprovers, GrantRule, GroupDef, HostDef, IpSpec, NodeAttr, Policy,
    PolicyTest, Spanned, SshRule, TagOwnerDef,
};
pub use ports::{PortRange, parse_ports, parse_proto, proto};
