//! Cryptokey routing: the peer whose allowed IPs contain a destination gets its packets, and a
//! packet out of a peer's session is accepted only from an address that peer is allowed to use.
//! Longest prefix wins, so a subnet route never shadows a peer's own address.

use std::net::IpAddr;

use ipnet::IpNet;
use warren_proto::NodePublicKey;

/// Allowed IPs of every peer, searchable by address.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    // Sorted by prefix length, longest first, then by network and key, so lookups and
    // iteration are deterministic.
    entries: Vec<(IpNet, NodePublicKey)>,
}

impl RouteTable {
    /// Replaces the allowed IPs of `peer`.
    pub fn set(&mut self, peer: NodePublicKey, allowed: &[IpNet]) {
        self.remove(&peer);
        self.entries
            .extend(allowed.iter().map(|n| (n.trunc(), peer)));
        self.entries.sort_by(|a, b| {
            b.0.prefix_len()
                .cmp(&a.0.prefix_len())
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| a.1.cmp(&b.1))
        });
    }

    /// Forgets every allowed IP of `peer`.
    pub fn remove(&mut self, peer: &NodePublicKey) {
        self.entries.retain(|(_, p)| p != peer);
    }

    /// The peer that should receive a packet for `dst`.
    pub fn lookup(&self, dst: IpAddr) -> Option<NodePublicKey> {
        self.entries
            .iter()
            .find(|(net, _)| net.contains(&dst))
            .map(|(_, peer)| *peer)
    }

    /// Whether `peer` may send packets from `src`.
    pub fn allows(&self, peer: &NodePublicKey, src: IpAddr) -> bool {
        self.lookup(src).as_ref() == Some(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> NodePublicKey {
        NodePublicKey::from_bytes([b; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn longest_prefix_wins_and_removal_works() {
        let mut t = RouteTable::default();
        t.set(key(1), &[net("100.64.0.1/32")]);
        t.set(key(2), &[net("100.64.0.0/24"), net("fd7a::2/128")]);
        assert_eq!(t.lookup("100.64.0.1".parse().expect("ip")), Some(key(1)));
        assert_eq!(t.lookup("100.64.0.7".parse().expect("ip")), Some(key(2)));
        assert_eq!(t.lookup("fd7a::2".parse().expect("ip")), Some(key(2)));
        assert_eq!(t.lookup("10.0.0.1".parse().expect("ip")), None);
        assert!(t.allows(&key(1), "100.64.0.1".parse().expect("ip")));
        assert!(!t.allows(&key(2), "100.64.0.1".parse().expect("ip")));
        t.remove(&key(1));
        assert_eq!(t.lookup("100.64.0.1".parse().expect("ip")), Some(key(2)));
        t.set(key(2), &[]);
        assert_eq!(t.lookup("100.64.0.7".parse().expect("ip")), None);
    }
}
