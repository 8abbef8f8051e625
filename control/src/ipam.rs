//! Address allocation: each node gets one IPv4 from the configured 100.64.0.0/10 range and the
//! IPv6 at the same offset in fd7a:115c:a1e0::/48, once, for as long as it is registered.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Tailscale's MagicDNS resolver address, never given to a node.
const RESERVED: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// Every address in the range is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no free address left in {range}")]
pub struct Exhausted {
    /// The IPv4 range.
    pub range: Ipv4Net,
}

/// The allocator.
#[derive(Debug, Clone)]
pub struct Ipam {
    v4: Ipv4Net,
    v6: Ipv6Net,
    used: BTreeSet<u32>,
    hint: u32,
}

impl Ipam {
    /// An allocator with nothing used.
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> Self {
        Self {
            v4: v4.trunc(),
            v6: v6.trunc(),
            used: BTreeSet::new(),
            hint: 1,
        }
    }

    fn size(&self) -> u32 {
        1u32.checked_shl(32 - u32::from(self.v4.prefix_len()))
            .unwrap_or(u32::MAX)
    }

    fn offset(&self, a: Ipv4Addr) -> u32 {
        u32::from(a).wrapping_sub(u32::from(self.v4.network()))
    }

    /// The pair of addresses at `offset`.
    fn pair(&self, offset: u32) -> (Ipv4Addr, Ipv6Addr) {
        let v4 = Ipv4Addr::from(u32::from(self.v4.network()) + offset);
        let v6 = Ipv6Addr::from(u128::from(self.v6.network()) + u128::from(offset));
        (v4, v6)
    }

    /// Marks an address as taken (when loading the database).
    pub fn reserve(&mut self, a: Ipv4Addr) {
        let off = self.offset(a);
        self.used.insert(off);
    }

    /// Gives an address back.
    pub fn release(&mut self, a: Ipv4Addr) {
        let off = self.offset(a);
        self.used.remove(&off);
        self.hint = self.hint.min(off.max(1));
    }

    /// The lowest free pair of addresses.
    pub fn allocate(&mut self) -> Result<(Ipv4Addr, Ipv6Addr), Exhausted> {
        self.allocate_from(self.hint)
    }

    /// A free pair at or after a random offset up to `spread` past the lowest free one: after
    /// losing an address to another instance, which hands out the lowest ones too, a retry
    /// that searched from the bottom again would keep racing it.
    pub fn allocate_spread(
        &mut self,
        spread: u32,
        random: u32,
    ) -> Result<(Ipv4Addr, Ipv6Addr), Exhausted> {
        let start = self.hint.saturating_add(random % spread.max(1));
        self.allocate_from(start)
    }

    /// The first free pair at or after offset `start`, wrapping around to the lowest.
    fn allocate_from(&mut self, start: u32) -> Result<(Ipv4Addr, Ipv6Addr), Exhausted> {
        let last = self.size().saturating_sub(1);
        let start = start.max(1).min(last.max(1));
        for off in (start..last).chain(self.hint.max(1)..start) {
            let (v4, v6) = self.pair(off);
            if !self.used.contains(&off) && v4 != RESERVED {
                self.used.insert(off);
                if off == self.hint.max(1) {
                    self.hint = off + 1;
                }
                return Ok((v4, v6));
            }
        }
        Err(Exhausted { range: self.v4 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(v4: &str) -> Ipam {
        Ipam::new(
            v4.parse().expect("v4"),
            "fd7a:115c:a1e0::/48".parse().expect("v6"),
        )
    }

    #[test]
    fn sequential_stable_and_reused() {
        let mut a = ipam("100.64.0.0/10");
        assert_eq!(
            a.allocate(),
            Ok((
                "100.64.0.1".parse().expect("ip"),
                "fd7a:115c:a1e0::1".parse().expect("ip")
            ))
        );
        a.reserve("100.64.0.2".parse().expect("ip"));
        assert_eq!(
            a.allocate().map(|p| p.0),
            Ok("100.64.0.3".parse().expect("ip"))
        );
        a.release("100.64.0.1".parse().expect("ip"));
        assert_eq!(
            a.allocate().map(|p| p.0),
            Ok("100.64.0.1".parse().expect("ip"))
        );
    }

    #[test]
    fn a_spread_allocation_skips_ahead_and_wraps() {
        let mut a = ipam("100.64.0.0/29");
        assert_eq!(
            a.allocate_spread(4, 2).map(|p| p.0),
            Ok("100.64.0.3".parse().expect("ip"))
        );
        assert_eq!(
            a.allocate().map(|p| p.0),
            Ok("100.64.0.1".parse().expect("ip")),
            "the lowest stays first"
        );
        for _ in 0..4 {
            assert!(a.allocate_spread(4, 3).is_ok(), "wraps to what is left");
        }
        assert!(a.allocate_spread(4, 1).is_err());
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = ipam("100.64.0.0/30");
        assert!(a.allocate().is_ok());
        assert!(a.allocate().is_ok());
        assert!(a.allocate().is_err());
    }

    #[test]
    fn magic_dns_address_is_skipped() {
        let mut a = ipam("100.100.100.96/29");
        let got: Vec<_> = (0..6)
            .filter_map(|_| a.allocate().ok())
            .map(|p| p.0.to_string())
            .collect();
        assert!(!got.contains(&"100.100.100.100".to_string()));
        assert_eq!(got.len(), 5);
    }
}
