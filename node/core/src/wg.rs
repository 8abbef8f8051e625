//! The one place that sees boringtun. It wraps `noise::Tunn` into a [`Session`] per peer, drains
//! `WriteToNetwork` until `Done`, and maps boringtun's errors into [`WgError`]. boringtun reads
//! the clock inside its timers and handshakes; that stays contained here, so replacing it later
//! touches only this module.

use std::net::IpAddr;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use warren_proto::{NodePublicKey, NodeSecretKey};

/// Bytes WireGuard adds to an IP packet (header, counter, tag).
pub const OVERHEAD: usize = 32;
/// The smallest scratch buffer every operation accepts (a handshake message is 148 bytes).
pub const MIN_SCRATCH: usize = 148;
/// Largest session index: boringtun keeps 24 bits and uses the low 8 for its own rotation.
pub const MAX_INDEX: u32 = (1 << 24) - 1;

/// Why a WireGuard operation failed. Only the packet that caused it is affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WgError {
    /// The datagram is not a well-formed WireGuard message.
    #[error("malformed WireGuard message")]
    Malformed,
    /// The message names a session index we do not have.
    #[error("unknown session index")]
    UnknownIndex,
    /// Authentication failed: wrong key, MAC or AEAD tag.
    #[error("WireGuard authentication failed ({reason})")]
    Auth {
        /// Which check failed.
        reason: &'static str,
    },
    /// A replayed or too old message.
    #[error("replayed WireGuard message")]
    Replay,
    /// There is no session yet to decrypt with.
    #[error("no WireGuard session")]
    NoSession,
    /// The session timed out; a new handshake is needed.
    #[error("WireGuard session expired")]
    Expired,
    /// The handshake rate limiter is refusing work.
    #[error("under load; handshake refused")]
    UnderLoad,
    /// The scratch buffer was too small for the output.
    #[error("scratch buffer too small")]
    BufferTooSmall,
}

impl From<WireGuardError> for WgError {
    fn from(e: WireGuardError) -> Self {
        use WireGuardError as E;
        match e {
            E::DestinationBufferTooSmall => Self::BufferTooSmall,
            E::IncorrectPacketLength
            | E::UnexpectedPacket
            | E::WrongPacketType
            | E::InvalidPacket => Self::Malformed,
            E::WrongIndex => Self::UnknownIndex,
            E::WrongKey => Self::Auth { reason: "key" },
            E::InvalidMac => Self::Auth { reason: "mac" },
            E::InvalidAeadTag => Self::Auth { reason: "aead" },
            E::InvalidTai64nTimestamp
            | E::WrongTai64nTimestamp
            | E::InvalidCounter
            | E::DuplicateCounter => Self::Replay,
            E::NoCurrentSession => Self::NoSession,
            E::ConnectionExpired => Self::Expired,
            E::UnderLoad | E::LockFailed => Self::UnderLoad,
        }
    }
}

/// What a session operation produced. Both kinds are written at the start of the scratch
/// buffer the operation was given (`scratch[..len]`), which lets callers encrypt and decrypt
/// straight into their own batch buffers; the tests below hold boringtun to it.
#[derive(Debug)]
pub enum WgOutput<'a> {
    /// A datagram to send to the peer.
    Network(&'a [u8]),
    /// A decrypted IP packet from the peer, with its inner source address.
    Tunnel(&'a [u8], IpAddr),
}

/// Which session an incoming datagram belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// A handshake initiation from this node key.
    Initiator(NodePublicKey),
    /// A message for our session with this index.
    Index(u32),
}

/// Finds the session an incoming datagram is for, without touching any session.
pub fn receiver(local: &NodeSecretKey, datagram: &[u8]) -> Result<Receiver, WgError> {
    match Tunn::parse_incoming_packet(datagram)? {
        Packet::HandshakeInit(init) => {
            let secret = local.as_x25519();
            let public = x25519::PublicKey::from(secret);
            let half = parse_handshake_anon(secret, &public, &init)?;
            Ok(Receiver::Initiator(NodePublicKey::from_bytes(
                half.peer_static_public,
            )))
        }
        Packet::HandshakeResponse(r) => Ok(Receiver::Index(r.receiver_idx >> 8)),
        Packet::PacketCookieReply(c) => Ok(Receiver::Index(c.receiver_idx >> 8)),
        Packet::PacketData(d) => Ok(Receiver::Index(d.receiver_idx >> 8)),
    }
}

/// Counters of one session, for `warren status`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SessionStats {
    /// Time since the last completed handshake, if any.
    pub since_handshake: Option<Duration>,
    /// Bytes of IP packets sent through the session (what boringtun counts: the plaintext,
    /// without WireGuard's own overhead).
    pub tx_bytes: u64,
    /// Bytes of IP packets received through the session (the plaintext, as for `tx_bytes`).
    pub rx_bytes: u64,
}

/// A WireGuard session with one peer.
pub struct Session {
    tunn: Tunn,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// A session between `local` and `peer`, known to incoming messages by `index` (24 bits).
    pub fn new(local: &NodeSecretKey, peer: &NodePublicKey, index: u32) -> Self {
        let secret = local.as_x25519().clone();
        let peer = x25519::PublicKey::from(*peer.as_bytes());
        Self {
            tunn: Tunn::new(secret, peer, None, None, index & MAX_INDEX, None),
        }
    }

    /// Encrypts an IP packet, or starts a handshake and queues it.
    pub fn encapsulate(
        &mut self,
        packet: &[u8],
        scratch: &mut [u8],
        out: &mut dyn FnMut(WgOutput<'_>),
    ) -> Result<(), WgError> {
        match self.tunn.encapsulate(packet, scratch) {
            TunnResult::Done => Ok(()),
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToNetwork(d) => {
                out(WgOutput::Network(d));
                Ok(())
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Ok(()),
        }
    }

    /// Handles a datagram from the peer, then flushes what the session queued.
    pub fn decapsulate(
        &mut self,
        src: Option<IpAddr>,
        datagram: &[u8],
        scratch: &mut [u8],
        out: &mut dyn FnMut(WgOutput<'_>),
    ) -> Result<(), WgError> {
        match self.tunn.decapsulate(src, datagram, scratch) {
            TunnResult::Done => Ok(()),
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToNetwork(d) => {
                out(WgOutput::Network(d));
                self.flush(scratch, out);
                Ok(())
            }
            TunnResult::WriteToTunnelV4(p, a) => {
                out(WgOutput::Tunnel(p, a.into()));
                Ok(())
            }
            TunnResult::WriteToTunnelV6(p, a) => {
                out(WgOutput::Tunnel(p, a.into()));
                Ok(())
            }
        }
    }

    fn flush(&mut self, scratch: &mut [u8], out: &mut dyn FnMut(WgOutput<'_>)) {
        while let TunnResult::WriteToNetwork(d) = self.tunn.decapsulate(None, &[], scratch) {
            out(WgOutput::Network(d));
        }
    }

    /// Starts a handshake now unless one is already under way (so at most one initiation per
    /// rekey timeout leaves, however often this is called).
    pub fn initiate(
        &mut self,
        scratch: &mut [u8],
        out: &mut dyn FnMut(WgOutput<'_>),
    ) -> Result<(), WgError> {
        match self.tunn.format_handshake_initiation(scratch, false) {
            TunnResult::WriteToNetwork(d) => {
                out(WgOutput::Network(d));
                Ok(())
            }
            TunnResult::Err(e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Runs the session's timers: retransmits, keepalives, rekeying. Call every 250 ms or so.
    pub fn update_timers(
        &mut self,
        scratch: &mut [u8],
        out: &mut dyn FnMut(WgOutput<'_>),
    ) -> Result<(), WgError> {
        match self.tunn.update_timers(scratch) {
            TunnResult::WriteToNetwork(d) => {
                out(WgOutput::Network(d));
                Ok(())
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => Ok(()),
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Ok(()),
        }
    }

    /// The session's counters.
    pub fn stats(&self) -> SessionStats {
        let (since_handshake, tx, rx, _loss, _rtt) = self.tunn.stats();
        SessionStats {
            since_handshake,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sessions_handshake_and_carry_a_packet() {
        let a = NodeSecretKey::generate();
        let b = NodeSecretKey::generate();
        let mut sa = Session::new(&a, &b.public_key(), 1);
        let mut sb = Session::new(&b, &a.public_key(), 2);
        let mut scratch = vec![0u8; 2048];
        let mut packet = vec![0u8; 40];
        packet[0] = 0x45;
        packet[3] = 40;

        // A queues the packet and sends a handshake initiation.
        let mut to_b = Vec::new();
        sa.encapsulate(&packet, &mut scratch, &mut |o| {
            if let WgOutput::Network(d) = o {
                to_b.push(d.to_vec());
            }
        })
        .expect("encapsulate");
        assert_eq!(to_b.len(), 1);
        assert_eq!(
            receiver(&b, &to_b[0]),
            Ok(Receiver::Initiator(a.public_key()))
        );

        // B answers; A then flushes the queued packet; B decrypts it.
        let mut to_a = Vec::new();
        sb.decapsulate(None, &to_b[0], &mut scratch, &mut |o| {
            if let WgOutput::Network(d) = o {
                to_a.push(d.to_vec());
            }
        })
        .expect("handshake response");
        assert_eq!(receiver(&a, &to_a[0]), Ok(Receiver::Index(1)));
        let mut data = Vec::new();
        sa.decapsulate(None, &to_a[0], &mut scratch, &mut |o| {
            if let WgOutput::Network(d) = o {
                data.push(d.to_vec());
            }
        })
        .expect("response");
        let data = data.last().expect("queued packet flushed").clone();
        assert_eq!(receiver(&b, &data), Ok(Receiver::Index(2)));
        let mut got = Vec::new();
        let start = scratch.as_ptr();
        sb.decapsulate(None, &data, &mut scratch, &mut |o| {
            if let WgOutput::Tunnel(p, _) = o {
                assert_eq!(p.as_ptr(), start, "plaintext at the start of scratch");
                got.push(p.to_vec());
            }
        })
        .expect("data");
        assert_eq!(got, vec![packet.clone()]);
        // With the session up, a datagram is written at the start of scratch too.
        let mut sent = 0;
        sa.encapsulate(&packet, &mut scratch, &mut |o| {
            if let WgOutput::Network(d) = o {
                assert_eq!(d.as_ptr(), start, "datagram at the start of scratch");
                sent = d.len();
            }
        })
        .expect("encapsulate");
        assert_eq!(sent, packet.len() + OVERHEAD);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let a = NodeSecretKey::generate();
        assert_eq!(receiver(&a, &[9, 9, 9]), Err(WgError::Malformed));
        assert_eq!(receiver(&a, &[]), Err(WgError::Malformed));
        let mut bad_init = vec![0u8; 148];
        bad_init[0] = 1;
        assert!(matches!(receiver(&a, &bad_init), Err(WgError::Auth { .. })));
    }
}
