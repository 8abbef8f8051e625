//! Disco, the path-discovery messages peers exchange over UDP and over DERP, wire-compatible
//! with Tailscale's `disco` package:
//!
//! ```text
//! packet  = magic[6] | sender disco public key[32] | nonce[24] | box(payload)
//! payload = type[1] | version[1] (0) | body
//! ```
//!
//! The box is a NaCl box from the sender's disco secret key to the receiver's disco public key.
//! Nonces come from the caller; nothing here touches a socket, a clock or a generator.

use crate::endpoint::{ENDPOINT_LEN, get_endpoint, put_endpoint};
use std::net::SocketAddr;

use crate::keys::{DiscoPublicKey, DiscoSecretKey, NodePublicKey};
use crate::proof::{open_box, seal_box};

/// The 6 bytes that open every disco packet: "TS💬".
pub const MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
/// The length of the box nonce.
pub const NONCE_LEN: usize = 24;
/// The bytes before the box: magic, sender key, nonce.
pub const HEADER_LEN: usize = MAGIC.len() + 32 + NONCE_LEN;
/// The bytes a NaCl box adds to its plaintext.
pub const BOX_OVERHEAD: usize = 16;
/// A ping's or pong's transaction id.
pub type TxId = [u8; 12];

/// Message type of [`Message::Ping`].
pub const TYPE_PING: u8 = 0x01;
/// Message type of [`Message::Pong`].
pub const TYPE_PONG: u8 = 0x02;
/// Message type of [`Message::CallMeMaybe`].
pub const TYPE_CALL_ME_MAYBE: u8 = 0x03;

const VERSION: u8 = 0;
const TX_ID_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// A disco message, the plaintext inside the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Asks for a pong on the path it came by.
    Ping {
        /// The transaction id the pong echoes.
        tx_id: TxId,
        /// The sender's node key as it claims it (not proof by itself). Tailscale before 1.16
        /// sent 12-byte pings without it; an all-zero key also reads as `None`, as in Go.
        node_key: Option<NodePublicKey>,
        /// Zero bytes appended to probe the path MTU. Because old pings carry no key, `None`
        /// with 32 or more bytes of padding reads back as `None` with 32 fewer bytes of padding.
        padding: usize,
    },
    /// Answers a ping; doubles as a STUN answer.
    Pong {
        /// The ping's transaction id.
        tx_id: TxId,
        /// The ping's source address as the responder saw it.
        src: SocketAddr,
    },
    /// Asks the receiver to ping all these endpoints of ours now (sent only over DERP).
    CallMeMaybe {
        /// The sender's candidate endpoints.
        endpoints: Vec<SocketAddr>,
    },
}

/// Why a disco packet or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    /// The packet does not start with the disco magic or is shorter than its header.
    #[error("not a disco packet")]
    NotDisco,
    /// The box did not open: not for us, not from the key it names, or changed on the way.
    #[error("disco box from {sender:?} does not open")]
    Forged {
        /// The sender the packet names.
        sender: DiscoPublicKey,
    },
    /// The plaintext is shorter than the type and version bytes.
    #[error("disco message of {len} bytes has no header")]
    TooShort {
        /// The plaintext length.
        len: usize,
    },
    /// A message type this version does not know.
    #[error("unknown disco message type {message_type:#04x}")]
    UnknownType {
        /// The type byte.
        message_type: u8,
    },
    /// The body is shorter than the message's fixed part.
    #[error("disco message type {message_type:#04x} body of {len} bytes is truncated")]
    Truncated {
        /// The type byte.
        message_type: u8,
        /// The body length.
        len: usize,
    },
    /// A CallMeMaybe body that is not a whole number of 18-byte endpoints.
    #[error("disco message type {message_type:#04x} body of {len} bytes has a bad length")]
    BadLength {
        /// The type byte.
        message_type: u8,
        /// The body length.
        len: usize,
    },
}

impl Message {
    /// The message type byte.
    pub fn message_type(&self) -> u8 {
        match self {
            Self::Ping { .. } => TYPE_PING,
            Self::Pong { .. } => TYPE_PONG,
            Self::CallMeMaybe { .. } => TYPE_CALL_ME_MAYBE,
        }
    }

    /// The plaintext length: type, version and body.
    pub fn encoded_len(&self) -> usize {
        2 + match self {
            Self::Ping {
                node_key, padding, ..
            } => TX_ID_LEN + node_key.map_or(0, |_| KEY_LEN) + padding,
            Self::Pong { .. } => TX_ID_LEN + ENDPOINT_LEN,
            Self::CallMeMaybe { endpoints } => ENDPOINT_LEN * endpoints.len(),
        }
    }

    /// Appends the plaintext (type, version 0, body) to `out`. The caller bounds `padding`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(self.message_type());
        out.push(VERSION);
        match self {
            Self::Ping {
                tx_id,
                node_key,
                padding,
            } => {
                out.extend_from_slice(tx_id);
                if let Some(key) = node_key {
                    out.extend_from_slice(key.as_bytes());
                }
                out.resize(out.len() + padding, 0);
            }
            Self::Pong { tx_id, src } => {
                out.extend_from_slice(tx_id);
                put_endpoint(*src, out);
            }
            Self::CallMeMaybe { endpoints } => {
                for endpoint in endpoints {
                    put_endpoint(*endpoint, out);
                }
            }
        }
    }

    /// Decodes a plaintext. Like Tailscale, bytes past a ping's or pong's fixed part are
    /// tolerated, and a CallMeMaybe of a version other than 0 reads as having no endpoints.
    pub fn decode(plaintext: &[u8]) -> Result<Message, DiscoError> {
        let Some((&[message_type, version], body)) = plaintext.split_first_chunk::<2>() else {
            return Err(DiscoError::TooShort {
                len: plaintext.len(),
            });
        };
        let truncated = DiscoError::Truncated {
            message_type,
            len: body.len(),
        };
        match message_type {
            TYPE_PING => {
                let (tx_id, rest) = body.split_first_chunk::<TX_ID_LEN>().ok_or(truncated)?;
                let (node_key, padding) = match rest.split_first_chunk::<KEY_LEN>() {
                    Some((key, padding)) => (
                        (*key != [0; KEY_LEN]).then(|| NodePublicKey::from_bytes(*key)),
                        padding.len(),
                    ),
                    None => (None, rest.len()),
                };
                Ok(Message::Ping {
                    tx_id: *tx_id,
                    node_key,
                    padding,
                })
            }
            TYPE_PONG => {
                let (tx_id, rest) = body
                    .split_first_chunk::<TX_ID_LEN>()
                    .ok_or_else(|| truncated.clone())?;
                let src = rest.first_chunk::<ENDPOINT_LEN>().ok_or(truncated)?;
                Ok(Message::Pong {
                    tx_id: *tx_id,
                    src: get_endpoint(src),
                })
            }
            TYPE_CALL_ME_MAYBE => {
                if version != VERSION {
                    return Ok(Message::CallMeMaybe {
                        endpoints: Vec::new(),
                    });
                }
                let (chunks, rest) = body.as_chunks::<ENDPOINT_LEN>();
                if !rest.is_empty() {
                    return Err(DiscoError::BadLength {
                        message_type,
                        len: body.len(),
                    });
                }
                Ok(Message::CallMeMaybe {
                    endpoints: chunks.iter().map(get_endpoint).collect(),
                })
            }
            message_type => Err(DiscoError::UnknownType { message_type }),
        }
    }
}

/// Whether a datagram is a disco packet: the magic and at least a full header. Used to
/// demultiplex the shared UDP socket.
pub fn looks_like_disco(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN && packet.starts_with(&MAGIC)
}

/// The sender's disco key named in a packet's header, before opening it (to find the peer).
pub fn sender_key(packet: &[u8]) -> Option<DiscoPublicKey> {
    if !looks_like_disco(packet) {
        return None;
    }
    let key = packet.get(MAGIC.len()..)?.first_chunk::<32>()?;
    Some(DiscoPublicKey::from_bytes(*key))
}

/// The length of the packet [`seal`] makes for `message`.
pub fn sealed_len(message: &Message) -> usize {
    HEADER_LEN + BOX_OVERHEAD + message.encoded_len()
}

/// Seals `message` from `sender` to `receiver` under `nonce` (24 fresh random bytes from the
/// caller) into a complete disco packet.
pub fn seal(
    sender: &DiscoSecretKey,
    receiver: &DiscoPublicKey,
    nonce: [u8; NONCE_LEN],
    message: &Message,
) -> Vec<u8> {
    let mut plaintext = Vec::with_capacity(message.encoded_len());
    message.encode(&mut plaintext);
    let secret = sender.to_bytes();
    let sealed = seal_box(&secret, receiver.as_bytes(), &nonce, &plaintext);
    let mut packet = Vec::with_capacity(HEADER_LEN + sealed.len());
    packet.extend_from_slice(&MAGIC);
    packet.extend_from_slice(sender.public_key().as_bytes());
    packet.extend_from_slice(&nonce);
    packet.extend_from_slice(&sealed);
    packet
}

/// Opens a disco packet addressed to `receiver`; returns the sender's disco key (proven by the
/// box opening) and the message.
pub fn open(
    receiver: &DiscoSecretKey,
    packet: &[u8],
) -> Result<(DiscoPublicKey, Message), DiscoError> {
    let rest = packet
        .strip_prefix(&MAGIC[..])
        .ok_or(DiscoError::NotDisco)?;
    let (key, rest) = rest.split_first_chunk::<32>().ok_or(DiscoError::NotDisco)?;
    let (nonce, sealed) = rest
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(DiscoError::NotDisco)?;
    let sender = DiscoPublicKey::from_bytes(*key);
    let secret = receiver.to_bytes();
    let plaintext = open_box(&secret, key, nonce, sealed).ok_or(DiscoError::Forged { sender })?;
    Ok((sender, Message::decode(&plaintext)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Ping {
                tx_id: [1; 12],
                node_key: Some(NodePublicKey::from_bytes([2; 32])),
                padding: 0,
            },
            Message::Ping {
                tx_id: [1; 12],
                node_key: Some(NodePublicKey::from_bytes([2; 32])),
                padding: 1200,
            },
            Message::Ping {
                tx_id: [3; 12],
                node_key: None,
                padding: 0,
            },
            Message::Ping {
                tx_id: [3; 12],
                node_key: None,
                padding: 31,
            },
            Message::Pong {
                tx_id: [4; 12],
                src: "203.0.113.9:41641".parse().expect("addr"),
            },
            Message::Pong {
                tx_id: [5; 12],
                src: "[2001:db8::7]:1".parse().expect("addr"),
            },
            Message::CallMeMaybe { endpoints: vec![] },
            Message::CallMeMaybe {
                endpoints: vec![
                    "192.168.1.2:41641".parse().expect("addr"),
                    "[2001:db8::1]:41641".parse().expect("addr"),
                ],
            },
        ]
    }

    #[test]
    fn plaintext_round_trip_and_len() {
        for m in samples() {
            let mut out = Vec::new();
            m.encode(&mut out);
            assert_eq!(out.len(), m.encoded_len(), "{m:?}");
            assert_eq!(Message::decode(&out), Ok(m));
        }
    }

    #[test]
    fn sealed_round_trip() {
        let a = DiscoSecretKey::generate();
        let b = DiscoSecretKey::generate();
        for m in samples() {
            let packet = seal(&a, &b.public_key(), [9; 24], &m);
            assert_eq!(packet.len(), sealed_len(&m));
            assert!(looks_like_disco(&packet));
            assert_eq!(sender_key(&packet), Some(a.public_key()));
            assert_eq!(open(&b, &packet), Ok((a.public_key(), m)));
        }
    }

    #[test]
    fn wrong_receiver_or_tampering_is_forged() {
        let a = DiscoSecretKey::generate();
        let b = DiscoSecretKey::generate();
        let m = Message::CallMeMaybe { endpoints: vec![] };
        let packet = seal(&a, &b.public_key(), [1; 24], &m);
        let c = DiscoSecretKey::generate();
        assert_eq!(
            open(&c, &packet),
            Err(DiscoError::Forged {
                sender: a.public_key()
            })
        );
        let mut bad = packet.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(open(&b, &bad), Err(DiscoError::Forged { .. })));
        // Every prefix is refused without panicking.
        for cut in 0..packet.len() {
            let err = open(&b, &packet[..cut]).expect_err("truncated");
            if cut < HEADER_LEN {
                assert_eq!(err, DiscoError::NotDisco);
            }
        }
    }

    #[test]
    fn every_plaintext_prefix_is_a_typed_error_or_shorter_message() {
        for m in samples() {
            let mut out = Vec::new();
            m.encode(&mut out);
            for cut in 0..out.len() {
                // Pings shrink into valid shorter pings; everything else must fail cleanly.
                match Message::decode(&out[..cut]) {
                    Ok(Message::Ping { .. }) => assert_eq!(m.message_type(), TYPE_PING),
                    Ok(Message::CallMeMaybe { endpoints }) => {
                        assert_eq!(cut % ENDPOINT_LEN, 2);
                        assert!(endpoints.len() < 2);
                    }
                    Ok(other) => panic!("prefix {cut} of {m:?} decoded as {other:?}"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn malformed_messages() {
        assert_eq!(Message::decode(&[]), Err(DiscoError::TooShort { len: 0 }));
        assert_eq!(Message::decode(&[1]), Err(DiscoError::TooShort { len: 1 }));
        assert_eq!(
            Message::decode(&[0x04, 0]),
            Err(DiscoError::UnknownType { message_type: 0x04 })
        );
        assert_eq!(
            Message::decode(&[TYPE_PING, 0, 1, 2, 3]),
            Err(DiscoError::Truncated {
                message_type: TYPE_PING,
                len: 3
            })
        );
        assert_eq!(
            Message::decode(&[TYPE_PONG, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DiscoError::Truncated {
                message_type: TYPE_PONG,
                len: 13
            })
        );
        assert_eq!(
            Message::decode(&[TYPE_CALL_ME_MAYBE, 0, 1]),
            Err(DiscoError::BadLength {
                message_type: TYPE_CALL_ME_MAYBE,
                len: 1
            })
        );
        // A future CallMeMaybe version is ignored, as Tailscale does.
        assert_eq!(
            Message::decode(&[TYPE_CALL_ME_MAYBE, 1, 1, 2, 3]),
            Ok(Message::CallMeMaybe { endpoints: vec![] })
        );
    }

    #[test]
    fn fixed_byte_vectors() {
        assert_eq!(MAGIC, "TS💬".as_bytes());
        // An old 12-byte ping (Tailscale <= 1.16).
        let mut old = vec![TYPE_PING, 0];
        old.extend_from_slice(&[7; 12]);
        assert_eq!(
            Message::decode(&old),
            Ok(Message::Ping {
                tx_id: [7; 12],
                node_key: None,
                padding: 0
            })
        );
        let mut out = Vec::new();
        Message::Pong {
            tx_id: [0xaa; 12],
            src: "1.2.3.4:258".parse().expect("addr"),
        }
        .encode(&mut out);
        let mut want = vec![0x02, 0x00];
        want.extend_from_slice(&[0xaa; 12]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4, 1, 2]);
        assert_eq!(out, want);
        let mut ping = Vec::new();
        Message::Ping {
            tx_id: [1; 12],
            node_key: Some(NodePublicKey::from_bytes([2; 32])),
            padding: 3,
        }
        .encode(&mut ping);
        assert_eq!(ping.len(), 2 + 12 + 32 + 3);
        assert_eq!(&ping[..3], &[0x01, 0x00, 0x01]);
        assert_eq!(&ping[14..16], &[2, 2]);
        assert_eq!(&ping[46..], &[0, 0, 0]);
    }

    #[test]
    fn demux() {
        assert!(!looks_like_disco(&MAGIC));
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&[0; 56]);
        assert!(looks_like_disco(&p));
        assert!(!looks_like_disco(&p[..61]));
        assert_eq!(sender_key(&p[..61]), None);
        assert_eq!(
            open(&DiscoSecretKey::generate(), b"\x01\0\0\0"),
            Err(DiscoError::NotDisco)
        );
    }
}
