//! The 18-byte `ip:port` form that DERP's `PeerPresent` and disco's pong and CallMeMaybe share:
//! 16 address bytes (IPv4 as v4-mapped IPv6) and a big-endian port.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Bytes of one encoded endpoint.
pub(crate) const ENDPOINT_LEN: usize = 16 + 2;

/// Appends `addr` in the 18-byte form.
pub(crate) fn put_endpoint(addr: SocketAddr, out: &mut Vec<u8>) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Reads what [`put_endpoint`] wrote; v4-mapped addresses come back as IPv4.
pub(crate) fn get_endpoint(b: &[u8; ENDPOINT_LEN]) -> SocketAddr {
    let (ip, port) = b.split_at(16);
    let mut octets = [0u8; 16];
    octets.copy_from_slice(ip);
    let ip = Ipv6Addr::from(octets);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip() {
        for addr in ["203.0.113.7:41641", "[2001:db8::1]:3478"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let mut out = Vec::new();
            put_endpoint(addr, &mut out);
            let bytes: &[u8; ENDPOINT_LEN] = out.as_slice().try_into().expect("18 bytes");
            assert_eq!(get_endpoint(bytes), addr);
        }
    }
}
