//! Tailscale-format access policy ("network topology as policy"): the HuJSON file Tailscale
//! and Headscale use, parsed unchanged ([`Policy`]), compiled into rules over selectors
//! ([`CompiledPolicy`]), and applied to the live node set incrementally ([`PolicyState`]):
//! per node, the packet filter for traffic addressed to it and the peers it may see, with
//! per-node differences for every node or policy change.
//!
//! Semantics follow Tailscale's control server where its captured output says so
//! (`../shared/policy-captures`), Headscale where the captures are silent.

mod alias;
mod bitset;
mod compile;
mod error;
mod filter;
mod hujson;
mod node;
mod parse;
mod ports;
mod state;
mod tests_block;

pub(crate) use alias::valid_tag;
pub use alias::{AdminRole, Alias, AutoGroup};
pub use compile::{
    Access, CompiledPolicy, DstSpec, Rule, RuleBody, RuleOrigin, Section, Selector, SshAccess,
    Target,
};
pub use error::{
    AliasPosition, CapabilityProblem, Place, PolicyError, PortProblem, Pos, SshProblem, TestBlock,
    TestFailure, TestProblem,
};
pub use filter::{DstNet, DstPorts, FilterRule, PacketFilter};
pub use node::{NodeId, NodeOwner, PolicyNode, PolicyUser};
pub use parse::{
    AclDst, AclRule, AutoApprovers, GrantRule, GroupDef, HostDef, IpSpec, NodeAttr, Policy,
    PolicyTest, Spanned, SshRule, SshTest, TagOwnerDef,
};
pub use ports::{PortRange, parse_ports, parse_proto, proto};
pub use state::{Explanation, NodeDelta, PolicyState};
