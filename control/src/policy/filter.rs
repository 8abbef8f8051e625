//! The packet filter a node gets: rules for traffic addressed to it, in Tailscale's
//! `FilterRule` shape (source prefixes, destination prefixes with port ranges, protocols).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::ports::{PortRange, proto};

/// A destination of a filter rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DstNet {
    /// Any address (`*` on the wire).
    Any,
    /// A prefix.
    Net(IpNet),
}

impl DstNet {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            DstNet::Any => true,
            DstNet::Net(n) => n.contains(&ip),
        }
    }
}

/// A destination and its ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DstPorts {
    /// The destination.
    pub net: DstNet,
    /// The ports.
    pub ports: PortRange,
}

/// One filter rule: any source in `src` may reach any of `dst` with one of `protos`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FilterRule {
    /// Source prefixes (shared between the nodes that get the same rule).
    pub src: Arc<[IpNet]>,
    /// Destinations with ports.
    pub dst: Vec<DstPorts>,
    /// Protocols; empty means TCP, UDP, ICMP and ICMPv6 (Tailscale's default).
    pub protos: Vec<u8>,
}

impl FilterRule {
    /// The protocols this rule admits, the default set spelled out.
    pub fn effective_protos(&self) -> &[u8] {
        if self.protos.is_empty() {
            &proto::DEFAULT
        } else {
            &self.protos
        }
    }

    /// Whether one packet matches.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, port: u16, ip_proto: u8) -> bool {
        self.effective_protos().contains(&ip_proto)
            && self.src.iter().any(|p| p.contains(&src))
            && self
                .dst
                .iter()
                .any(|d| d.net.contains(dst) && d.ports.contains(port))
    }
}

/// A node's whole inbound filter. Empty: nothing may reach the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PacketFilter {
    /// The rules, in policy order.
    pub rules: Vec<FilterRule>,
}

impl PacketFilter {
    /// Whether one packet is admitted.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, port: u16, ip_proto: u8) -> bool {
        self.rules
            .iter()
            .any(|r| r.allows(src, dst, port, ip_proto))
    }
}
