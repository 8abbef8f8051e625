//! Just enough IP header parsing to route a packet: its version, source and destination.
//! The bytes come from the TUN device or out of a WireGuard session; anything malformed is a
//! typed error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a packet's header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    /// The packet is shorter than its header.
    #[error("packet of {len} bytes is too short for an IP header")]
    TooShort {
        /// The packet's length.
        len: usize,
    },
    /// The version nibble is neither 4 nor 6.
    #[error("not an IPv4 or IPv6 packet (version {version})")]
    BadVersion {
        /// The version nibble found.
        version: u8,
    },
}

/// The addresses of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// Where the packet comes from.
    pub src: IpAddr,
    /// Where the packet goes.
    pub dst: IpAddr,
}

/// Reads the source and destination of an IPv4 or IPv6 packet.
pub fn addresses(packet: &[u8]) -> Result<Addresses, IpError> {
    let first = *packet.first().ok_or(IpError::TooShort { len: 0 })?;
    match first >> 4 {
        4 => {
            let h: &[u8; 20] = packet
                .get(..20)
                .and_then(|s| s.try_into().ok())
                .ok_or(IpError::TooShort { len: packet.len() })?;
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            Ok(Addresses {
                src: src.into(),
                dst: dst.into(),
            })
        }
        6 => {
            let h = packet
                .get(..40)
                .ok_or(IpError::TooShort { len: packet.len() })?;
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&h[8..24]);
            d.copy_from_slice(&h[24..40]);
            Ok(Addresses {
                src: Ipv6Addr::from(s).into(),
                dst: Ipv6Addr::from(d).into(),
            })
        }
        version => Err(IpError::BadVersion { version }),
    }
}

/// Private, shared or link-local address space (RFC 1918, RFC 6598's 100.64.0.0/10, RFC 4193,
/// link-local): what `autogroup:internet` leaves out, and what an exit node treats as its LAN.
pub fn is_private_space(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private() || a.is_link_local() || (o[0] == 100 && (64..=127).contains(&o[1]))
        }
        IpAddr::V6(a) => {
            let s = a.segments()[0];
            s & 0xfe00 == 0xfc00 || s & 0xffc0 == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v4_and_v6() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[100, 64, 0, 1]);
        v4[16..20].copy_from_slice(&[100, 64, 0, 2]);
        let a = addresses(&v4).expect("v4");
        assert_eq!(a.src, IpAddr::from([100, 64, 0, 1]));
        assert_eq!(a.dst, IpAddr::from([100, 64, 0, 2]));

        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[39] = 2;
        v6[23] = 1;
        let a = addresses(&v6).expect("v6");
        assert_eq!(a.src, "::1".parse::<IpAddr>().expect("addr"));
        assert_eq!(a.dst, "::2".parse::<IpAddr>().expect("addr"));
    }

    #[test]
    fn malformed_is_an_error() {
        assert_eq!(addresses(&[]), Err(IpError::TooShort { len: 0 }));
        assert_eq!(addresses(&[0x45, 0, 0]), Err(IpError::TooShort { len: 3 }));
        assert_eq!(
            addresses(&[0x10; 40]),
            Err(IpError::BadVersion { version: 1 })
        );
    }

    #[test]
    fn private_space_is_what_autogroup_internet_leaves_out() {
        for (ip, private) in [
            ("10.20.0.1", true),
            ("172.16.5.1", true),
            ("192.168.1.1", true),
            ("100.64.0.1", true),
            ("100.127.255.1", true),
            ("100.128.0.1", false),
            ("169.254.1.1", true),
            ("fd00:77::1", true),
            ("fe80::1", true),
            ("198.51.100.1", false),
            ("203.0.113.1", false),
            ("2001:db8::1", false),
        ] {
            let a: IpAddr = ip.parse().expect("ip");
            assert_eq!(is_private_space(a), private, "{ip}");
        }
    }
}
