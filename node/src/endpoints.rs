//! Where peers can reach this node: the addresses of its interfaces (LAN candidates) with the
//! UDP port it listens on. Loopback, link-local and mesh addresses are left out, and so are
//! interfaces too small for a full tunnel datagram (another VPN's tunnel, say): a disco ping
//! would confirm such a path, but every full-sized packet on it would be lost.

use std::net::{IpAddr, SocketAddr};

/// The mesh ranges; an address in them is never an endpoint.
fn is_mesh(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && (o[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => v6.segments()[..3] == [0xfd7a, 0x115c, 0xa1e0],
    }
}

/// Whether `ip` can serve as an endpoint for peers.
pub fn usable(ip: &IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast() && !link_local && !is_mesh(ip)
}

/// An interface's MTU, from sysfs; `None` when it cannot be read.
fn interface_mtu(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The local IPv4 endpoints for `port` on interfaces that carry datagrams of `min_mtu` bytes
/// (an unreadable MTU counts as enough), sorted so reports are stable.
pub fn local(port: u16, min_mtu: u32) -> Vec<SocketAddr> {
    let addrs = if_addrs::get_if_addrs().unwrap_or_default();
    select(
        addrs.iter().map(|i| (i.ip(), interface_mtu(&i.name))),
        port,
        min_mtu,
    )
}

/// [`local`]'s choice among (address, interface MTU) pairs.
fn select(
    addrs: impl Iterator<Item = (IpAddr, Option<u32>)>,
    port: u16,
    min_mtu: u32,
) -> Vec<SocketAddr> {
    let mut eps: Vec<SocketAddr> = addrs
        .filter(|(ip, mtu)| ip.is_ipv4() && usable(ip) && mtu.is_none_or(|m| m >= min_mtu))
        .map(|(ip, _)| SocketAddr::new(ip, port))
        .collect();
    eps.sort();
    eps.dedup();
    eps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(usable(&ip("10.77.0.11")));
        assert!(usable(&ip("192.0.2.1")));
        assert!(!usable(&ip("127.0.0.1")));
        assert!(!usable(&ip("100.64.0.1")));
        assert!(!usable(&ip("100.127.255.1")));
        assert!(usable(&ip("100.128.0.1")));
        assert!(!usable(&ip("169.254.1.1")));
        assert!(!usable(&ip("fe80::1")));
        assert!(!usable(&ip("fd7a:115c:a1e0::1")));
    }

    #[test]
    fn interfaces_too_small_for_a_tunnel_datagram_are_not_endpoints() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let addrs = [
            (ip("10.88.0.11"), Some(1500)),
            // Another WireGuard's tunnel at MTU 1280: a 1280-byte warren packet becomes a
            // 1360-byte datagram, which it cannot carry.
            (ip("10.77.2.1"), Some(1280)),
            (ip("192.0.2.7"), None),
            (ip("127.0.0.1"), Some(65_536)),
        ];
        let got = select(addrs.into_iter(), 41641, 1280 + 80);
        let want: Vec<SocketAddr> = ["10.88.0.11:41641", "192.0.2.7:41641"]
            .iter()
            .map(|s| s.parse().expect("addr"))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            select(addrs.into_iter(), 41641, 1280).len(),
            3,
            "a smaller tunnel fits the 1280-byte interface"
        );
    }
}
