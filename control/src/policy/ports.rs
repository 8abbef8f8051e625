//! Ports and IP protocols as the policy language writes them: `*`, `22`, `80-90`,
//! `22,80,8000-8090`; protocols by IANA name or number.

use std::fmt;

use super::error::PortProblem;

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port, `*`.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// One port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::ALL {
            f.write_str("*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Parse a port list: `*`, or comma-separated ports and `first-last` ranges.
pub fn parse_ports(text: &str) -> Result<Vec<PortRange>, PortProblem> {
    if text == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    if text.is_empty() {
        return Err(PortProblem::Empty);
    }
    text.split(',').map(parse_range).collect()
}

fn parse_range(part: &str) -> Result<PortRange, PortProblem> {
    let (first, last) = match part.split_once('-') {
        Some((a, b)) => (parse_port(a)?, parse_port(b)?),
        None => {
            let p = parse_port(part)?;
            (p, p)
        }
    };
    if first == 0 {
        return Err(PortProblem::Zero);
    }
    if first > last {
        return Err(PortProblem::Reversed);
    }
    Ok(PortRange { first, last })
}

fn parse_port(s: &str) -> Result<u16, PortProblem> {
    if s.is_empty() {
        return Err(PortProblem::Empty);
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortProblem::NotANumber);
    }
    s.parse::<u16>().map_err(|_| PortProblem::OutOfRange)
}

/// IANA protocol numbers the language names.
pub mod proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// IGMP.
    pub const IGMP: u8 = 2;
    /// IPv4 in IP.
    pub const IPV4: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// EGP.
    pub const EGP: u8 = 8;
    /// IGP.
    pub const IGP: u8 = 9;
    /// UDP.
    pub const UDP: u8 = 17;
    /// GRE.
    pub const GRE: u8 = 47;
    /// ESP.
    pub const ESP: u8 = 50;
    /// AH.
    pub const AH: u8 = 51;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// Fibre Channel.
    pub const FC: u8 = 133;
    /// What an empty protocol list means on the wire: TCP, UDP, ICMPv4, ICMPv6.
    pub const DEFAULT: [u8; 4] = [TCP, UDP, ICMP, ICMPV6];
}

/// Parse a protocol: a name (case-insensitive) or a number 1-255 without a leading zero.
pub fn parse_proto(text: &str) -> Option<u8> {
    let named = match text.to_ascii_lowercase().as_str() {
        "icmp" => Some(proto::ICMP),
        "igmp" => Some(proto::IGMP),
        "ipv4" | "ip-in-ip" => Some(proto::IPV4),
        "tcp" => Some(proto::TCP),
        "egp" => Some(proto::EGP),
        "igp" => Some(proto::IGP),
        "udp" => Some(proto::UDP),
        "gre" => Some(proto::GRE),
        "esp" => Some(proto::ESP),
        "ah" => Some(proto::AH),
        "ipv6-icmp" => Some(proto::ICMPV6),
        "sctp" => Some(proto::SCTP),
        "fc" => Some(proto::FC),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    if text.is_empty() || text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|&n| n > 0)
}

/// Whether the protocol has ports (TCP, UDP, SCTP); others only take `*`.
pub(crate) fn has_ports(p: u8) -> bool {
    matches!(p, proto::TCP | proto::UDP | proto::SCTP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forms() {
        assert_eq!(parse_ports("*"), Ok(vec![PortRange::ALL]));
        assert_eq!(parse_ports("22"), Ok(vec![PortRange::single(22)]));
        assert_eq!(
            parse_ports("22,80-90"),
            Ok(vec![
                PortRange::single(22),
                PortRange {
                    first: 80,
                    last: 90
                }
            ])
        );
        assert_eq!(parse_ports("0"), Err(PortProblem::Zero));
        assert_eq!(parse_ports("90-80"), Err(PortProblem::Reversed));
        assert_eq!(parse_ports("ssh"), Err(PortProblem::NotANumber));
        assert_eq!(parse_ports("-1"), Err(PortProblem::Empty));
        assert_eq!(parse_ports("99999"), Err(PortProblem::OutOfRange));
        assert_eq!(parse_ports(""), Err(PortProblem::Empty));
        assert_eq!(parse_ports("22,"), Err(PortProblem::Empty));
    }

    #[test]
    fn protocol_names_and_numbers() {
        assert_eq!(parse_proto("TCP"), Some(6));
        assert_eq!(parse_proto("ipv6-icmp"), Some(58));
        assert_eq!(parse_proto("47"), Some(47));
        assert_eq!(parse_proto("047"), None);
        assert_eq!(parse_proto("0"), None);
        assert_eq!(parse_proto("256"), None);
        assert_eq!(parse_proto("*"), None);
    }
}
