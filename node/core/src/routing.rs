//! Cryptokey routing: the peer whose allowed IPs contain a destination gets its packets, and a
//! packet out of a peer's session is accepted only from an address that peer is allowed to use.
//! Longest prefix wins, so a subnet route never shadows a peer's own address, and an exit
//! node's 0.0.0.0/0 catches only what nothing more specific claims.
//!
//! Lookups go through one hash map per prefix length in use (at most 33 for IPv4, 129 for
//! IPv6, in practice three or four: /32, /128, a few subnet routes, /0), longest first, so a
//! lookup costs a handful of hash probes whatever the number of peers, and changing one peer
//! touches only that peer's prefixes. The source check is WireGuard's: the longest prefix that
//! holds the source must be the sender's, so a peer's subnet route never lets it pose as a
//! peer whose address lies inside it; when several peers claim that same longest prefix (two
//! routers for one route, during a failover), each of them passes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use warren_proto::NodePublicKey;

/// Allowed IPs of every peer, searchable by address.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    by_peer: BTreeMap<NodePublicKey, Vec<IpNet>>,
    v4: Lpm<u32>,
    v6: Lpm<u128>,
}

impl RouteTable {
    /// Replaces the allowed IPs of `peer`.
    pub fn set(&mut self, peer: NodePublicKey, allowed: &[IpNet]) {
        self.remove(&peer);
        let mut nets: Vec<IpNet> = allowed.iter().map(IpNet::trunc).collect();
        nets.sort();
        nets.dedup();
        for n in &nets {
            match n {
                IpNet::V4(n) => self.v4.insert(u32::from(n.network()), n.prefix_len(), peer),
                IpNet::V6(n) => self
                    .v6
                    .insert(u128::from(n.network()), n.prefix_len(), peer),
            }
        }
        if !nets.is_empty() {
            self.by_peer.insert(peer, nets);
        }
    }

    /// Forgets every allowed IP of `peer`.
    pub fn remove(&mut self, peer: &NodePublicKey) {
        for n in self.by_peer.remove(peer).unwrap_or_default() {
            match n {
                IpNet::V4(n) => self.v4.remove(u32::from(n.network()), n.prefix_len(), peer),
                IpNet::V6(n) => self
                    .v6
                    .remove(u128::from(n.network()), n.prefix_len(), peer),
            }
        }
    }

    /// The peer that should receive a packet for `dst`. When two peers claim the same prefix
    /// (control sends each route to one primary, so only briefly), the lower key wins.
    pub fn lookup(&self, dst: IpAddr) -> Option<NodePublicKey> {
        match dst {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a), 32),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a), 128),
        }
    }

    /// Whether `peer` may send packets from `src`.
    pub fn allows(&self, peer: &NodePublicKey, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(a) => self.v4.claimants(u32::from(a), 32),
            IpAddr::V6(a) => self.v6.claimants(u128::from(a), 128),
        }
        .is_some_and(|set| set.contains(peer))
    }

    /// The allowed IPs of `peer`, sorted.
    pub fn allowed(&self, peer: &NodePublicKey) -> &[IpNet] {
        self.by_peer.get(peer).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Longest-prefix match over one address family, `A` holding an address as an integer.
#[derive(Debug, Clone)]
struct Lpm<A> {
    /// Prefix length to (network, claimants); lengths iterate longest first.
    by_len: BTreeMap<std::cmp::Reverse<u8>, HashMap<A, BTreeSet<NodePublicKey>>>,
}

impl<A> Default for Lpm<A> {
    fn default() -> Self {
        Self {
            by_len: BTreeMap::new(),
        }
    }
}

impl<A> Lpm<A>
where
    A: Copy + Eq + std::hash::Hash + Mask,
{
    fn insert(&mut self, net: A, len: u8, peer: NodePublicKey) {
        self.by_len
            .entry(std::cmp::Reverse(len))
            .or_default()
            .entry(net)
            .or_default()
            .insert(peer);
    }

    fn remove(&mut self, net: A, len: u8, peer: &NodePublicKey) {
        let key = std::cmp::Reverse(len);
        let Some(map) = self.by_len.get_mut(&key) else {
            return;
        };
        if let Some(set) = map.get_mut(&net) {
            set.remove(peer);
            if set.is_empty() {
                map.remove(&net);
            }
        }
        if map.is_empty() {
            self.by_len.remove(&key);
        }
    }

    fn lookup(&self, addr: A, bits: u8) -> Option<NodePublicKey> {
        self.claimants(addr, bits).and_then(|s| s.first().copied())
    }

    /// The peers holding the longest prefix that contains `addr`.
    fn claimants(&self, addr: A, bits: u8) -> Option<&BTreeSet<NodePublicKey>> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&addr.mask(len.0, bits)))
    }
}

/// Keeping the first `len` of `bits` bits of an address.
trait Mask {
    fn mask(self, len: u8, bits: u8) -> Self;
}

impl Mask for u32 {
    fn mask(self, len: u8, bits: u8) -> Self {
        match len {
            0 => 0,
            l => self & (u32::MAX << (bits - l.min(bits))),
        }
    }
}

impl Mask for u128 {
    fn mask(self, len: u8, bits: u8) -> Self {
        match len {
            0 => 0,
            l => self & (u128::MAX << (bits - l.min(bits))),
        }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn longest_prefix_wins_and_removal_works() {
        let mut t = RouteTable::default();
        t.set(key(1), &[net("100.64.0.1/32")]);
        t.set(key(2), &[net("100.64.0.0/24"), net("fd7a::2/128")]);
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(key(1)));
        assert_eq!(t.lookup(ip("100.64.0.7")), Some(key(2)));
        assert_eq!(t.lookup(ip("fd7a::2")), Some(key(2)));
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        assert!(t.allows(&key(1), ip("100.64.0.1")));
        // key 2's /24 holds that address, but key 1's /32 is longer: no posing as key 1.
        assert!(!t.allows(&key(2), ip("100.64.0.1")));
        t.remove(&key(1));
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(key(2)));
        t.set(key(2), &[]);
        assert_eq!(t.lookup(ip("100.64.0.7")), None);
        assert!(t.allowed(&key(2)).is_empty());
    }

    #[test]
    fn exit_default_route_catches_only_what_nothing_else_claims() {
        let mut t = RouteTable::default();
        t.set(key(1), &[net("100.64.0.1/32"), net("10.20.0.0/24")]);
        t.set(
            key(9),
            &[net("100.64.0.9/32"), net("0.0.0.0/0"), net("::/0")],
        );
        assert_eq!(t.lookup(ip("10.20.0.10")), Some(key(1)));
        assert_eq!(t.lookup(ip("198.51.100.80")), Some(key(9)));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(key(9)));
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(key(1)));
        // The exit node answers from anywhere nobody else claims; the router only from its
        // route and address; nobody poses as a peer's own address.
        assert!(t.allows(&key(9), ip("198.51.100.80")));
        assert!(!t.allows(&key(9), ip("10.20.0.10")));
        assert!(!t.allows(&key(9), ip("100.64.0.1")));
        assert!(t.allows(&key(1), ip("10.20.0.10")));
        assert!(!t.allows(&key(1), ip("198.51.100.80")));
        t.set(key(9), &[net("100.64.0.9/32")]);
        assert_eq!(t.lookup(ip("198.51.100.80")), None);
    }

    #[test]
    fn a_peer_answers_from_its_own_prefixes_even_when_another_is_routed_to() {
        // Two routers briefly claim one prefix (a failover in flight): packets go to one,
        // and the source check accepts each router's own prefixes.
        let mut t = RouteTable::default();
        t.set(key(3), &[net("10.20.0.0/24")]);
        t.set(key(2), &[net("10.20.0.0/24")]);
        assert_eq!(t.lookup(ip("10.20.0.5")), Some(key(2)));
        assert!(t.allows(&key(3), ip("10.20.0.5")));
        assert!(t.allows(&key(2), ip("10.20.0.5")));
        t.remove(&key(2));
        assert_eq!(t.lookup(ip("10.20.0.5")), Some(key(3)));
        // Host bits are ignored, as WireGuard does.
        t.set(key(4), &[net("10.30.0.7/16")]);
        assert_eq!(t.lookup(ip("10.30.200.1")), Some(key(4)));
        assert_eq!(t.allowed(&key(4)), &[net("10.30.0.0/16")]);
    }

    #[test]
    fn lookup_agrees_with_a_linear_scan() {
        use proptest::prelude::*;
        let strategy = (
            proptest::collection::vec((0u8..6, any::<u32>(), 0u8..=32), 0..40),
            proptest::collection::vec(any::<u32>(), 1..40),
        );
        proptest!(|((entries, probes) in strategy)| {
            let mut t = RouteTable::default();
            let mut per: BTreeMap<u8, Vec<IpNet>> = BTreeMap::new();
            for (peer, a, len) in entries {
                let n = IpNet::new(IpAddr::from(a.to_be_bytes()), len).expect("len").trunc();
                per.entry(peer).or_default().push(n);
            }
            for (peer, nets) in &per {
                t.set(key(*peer), nets);
            }
            for p in probes {
                let a = IpAddr::from(p.to_be_bytes());
                // Longest prefix, then the lowest key among equals.
                let want = per
                    .iter()
                    .flat_map(|(peer, nets)| nets.iter().map(move |n| (n, key(*peer))))
                    .filter(|(n, _)| n.contains(&a))
                    .min_by(|x, y| y.0.prefix_len().cmp(&x.0.prefix_len()).then(x.1.cmp(&y.1)))
                    .map(|(_, k)| k);
                prop_assert_eq!(t.lookup(a), want);
            }
        });
    }
}
