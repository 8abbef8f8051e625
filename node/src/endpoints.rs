//! Where peers can reach this node: the addresses of its interfaces (LAN candidates) with the
//! UDP port it listens on. Loopback, link-local and mesh addresses are left out.

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

/// The local IPv4 endpoints for `port`, sorted so reports are stable.
pub fn local(port: u16) -> Vec<SocketAddr> {
    let mut eps: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| ip.is_ipv4() && usable(ip))
        .map(|ip| SocketAddr::new(ip, port))
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
}
