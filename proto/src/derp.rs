//! DERP v2 relay framing, wire-compatible with Tailscale's `derp` package: every frame is
//! `type[1] | length[4, big-endian] | payload`. This module only turns bytes into [`Frame`]s and
//! back; the handshake boxes ([`ClientInfo`], [`ServerInfo`]) are sealed and opened here too,
//! but nonces come from the caller, so nothing here touches a socket, a clock or a generator.
//!
//! Decoding is lenient where Tailscale is lenient (unknown frame types, extra trailing bytes
//! after a fixed-size payload, the shorter `PeerGone`/`PeerPresent` of older servers) and strict
//! where a frame could not be understood at all (payload shorter than its fixed part, a length
//! above the type's limit, a bad server magic).

use crate::endpoint::{ENDPOINT_LEN, get_endpoint, put_endpoint};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use zeroize::{Zeroize, Zeroizing};

use crate::keys::{DerpPublicKey, DerpSecretKey, NodePublicKey, NodeSecretKey};
use crate::proof::{open_box, seal_box};

/// The magic that opens a `ServerKey` frame: "DERP🔑".
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
/// The DERP protocol version warren speaks (v2: `RecvPacket` carries the source key).
pub const PROTOCOL_VERSION: u32 = 2;
/// The largest relayed packet, not counting framing and keys.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// The largest JSON document in a `ClientInfo`/`ServerInfo` box, and the largest payload of any
/// frame that is neither a packet nor an info frame.
pub const MAX_INFO_LEN: usize = 1 << 20;
/// The frame header: type byte and big-endian length.
pub const HEADER_LEN: usize = 5;
/// The length of a key on the wire.
pub const KEY_LEN: usize = 32;
/// The length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// The bytes a NaCl box adds to its plaintext (the Poly1305 tag).
pub const BOX_OVERHEAD: usize = 16;

const PING_LEN: usize = 8;
/// `ServerKey` frames may carry bytes for future use; Tailscale's client reads at most 1 KiB.
const MAX_SERVER_KEY_LEN: usize = 1 << 10;

/// A frame's one-byte type. Unknown values are kept, not refused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Server to client: magic + the server's public key.
    pub const SERVER_KEY: Self = Self(0x01);
    /// Client to server: client key + nonce + sealed JSON.
    pub const CLIENT_INFO: Self = Self(0x02);
    /// Server to client: nonce + sealed JSON.
    pub const SERVER_INFO: Self = Self(0x03);
    /// Client to server: destination key + packet.
    pub const SEND_PACKET: Self = Self(0x04);
    /// Server to client: source key + packet.
    pub const RECV_PACKET: Self = Self(0x05);
    /// Server to client: no payload, keeps the connection alive.
    pub const KEEP_ALIVE: Self = Self(0x06);
    /// Client to server: whether this server is the client's home.
    pub const NOTE_PREFERRED: Self = Self(0x07);
    /// Server to client: a peer is gone, with a reason.
    pub const PEER_GONE: Self = Self(0x08);
    /// Server to mesh watcher: a peer is connected.
    pub const PEER_PRESENT: Self = Self(0x09);
    /// Mesh server to server: source + destination + packet.
    pub const FORWARD_PACKET: Self = Self(0x0a);
    /// Mesh peer to server: subscribe to connection changes.
    pub const WATCH_CONNS: Self = Self(0x10);
    /// Privileged: close a peer's connection.
    pub const CLOSE_PEER: Self = Self(0x11);
    /// Either direction: 8 bytes to echo.
    pub const PING: Self = Self(0x12);
    /// Either direction: the 8 bytes of the ping being answered.
    pub const PONG: Self = Self(0x13);
    /// Server to client: problem text, empty when healthy again.
    pub const HEALTH: Self = Self(0x14);
    /// Server to client: the server is restarting.
    pub const RESTARTING: Self = Self(0x15);

    /// The name of a known type, for logs.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "ServerKey",
            0x02 => "ClientInfo",
            0x03 => "ServerInfo",
            0x04 => "SendPacket",
            0x05 => "RecvPacket",
            0x06 => "KeepAlive",
            0x07 => "NotePreferred",
            0x08 => "PeerGone",
            0x09 => "PeerPresent",
            0x0a => "ForwardPacket",
            0x10 => "WatchConns",
            0x11 => "ClosePeer",
            0x12 => "Ping",
            0x13 => "Pong",
            0x14 => "Health",
            0x15 => "Restarting",
            _ => return None,
        })
    }

    /// The largest payload accepted for this type; a longer header is refused before its
    /// payload is buffered.
    pub const fn max_payload_len(self) -> usize {
        match self.0 {
            0x01 => MAX_SERVER_KEY_LEN,
            0x02 => KEY_LEN + NONCE_LEN + BOX_OVERHEAD + MAX_INFO_LEN,
            0x03 => NONCE_LEN + BOX_OVERHEAD + MAX_INFO_LEN,
            0x04 | 0x05 => KEY_LEN + MAX_PACKET_SIZE,
            0x0a => 2 * KEY_LEN + MAX_PACKET_SIZE,
            _ => MAX_INFO_LEN,
        }
    }
}

impl fmt::Debug for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}(0x{:02x})", self.0),
            None => write!(f, "Unknown(0x{:02x})", self.0),
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a `PeerGone` frame was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerGoneReason {
    /// The peer disconnected from this server (also implied by old 32-byte frames).
    Disconnected,
    /// The server does not know the peer (a send to it failed).
    NotHere,
    /// A reason this version does not know.
    Other(u8),
}

impl PeerGoneReason {
    /// The wire byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Disconnected => 0x00,
            Self::NotHere => 0x01,
            Self::Other(b) => b,
        }
    }

    /// Reads the wire byte.
    pub const fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Disconnected,
            0x01 => Self::NotHere,
            other => Self::Other(other),
        }
    }
}

/// The optional flags byte at the end of a `PeerPresent` frame. Zero means the server did not
/// send flags (older servers), so a modern server always sets at least one bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PeerPresentFlags(pub u8);

impl PeerPresentFlags {
    /// An ordinary client.
    pub const REGULAR: Self = Self(1 << 0);
    /// Another DERP server of the region mesh.
    pub const MESH_PEER: Self = Self(1 << 1);
    /// A prober.
    pub const PROBER: Self = Self(1 << 2);
    /// The client said this server is not its region's first (ideal) node.
    pub const NOT_IDEAL: Self = Self(1 << 3);

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One DERP frame with its payload parsed into typed fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The server's greeting. Bytes after the key ("future use") are ignored when decoding.
    ServerKey {
        /// The server's public key.
        key: DerpPublicKey,
    },
    /// The client's answer: its node key and a box holding [`ClientInfo`] JSON.
    ClientInfo {
        /// The client's node key; the box only opens if the client holds its secret.
        key: NodePublicKey,
        /// The box nonce.
        nonce: [u8; NONCE_LEN],
        /// The sealed JSON, tag included.
        sealed: Vec<u8>,
    },
    /// The server's answer: a box holding [`ServerInfo`] JSON.
    ServerInfo {
        /// The box nonce.
        nonce: [u8; NONCE_LEN],
        /// The sealed JSON, tag included.
        sealed: Vec<u8>,
    },
    /// A packet for the server to relay to `dst`.
    SendPacket {
        /// The destination node.
        dst: NodePublicKey,
        /// The packet, at most [`MAX_PACKET_SIZE`] bytes.
        packet: Vec<u8>,
    },
    /// A relayed packet from `src`.
    RecvPacket {
        /// The sending node.
        src: NodePublicKey,
        /// The packet, at most [`MAX_PACKET_SIZE`] bytes.
        packet: Vec<u8>,
    },
    /// Keeps the connection alive; any payload is ignored when decoding.
    KeepAlive,
    /// Whether this server is the client's home region.
    NotePreferred {
        /// True when preferred. Decoding reads the first byte and ignores the rest.
        preferred: bool,
    },
    /// A peer that sent to us, or that we asked for, is not reachable here.
    PeerGone {
        /// The peer.
        peer: NodePublicKey,
        /// Why; old servers send no reason, read as [`PeerGoneReason::Disconnected`].
        reason: PeerGoneReason,
    },
    /// A peer connected to a meshed server.
    PeerPresent {
        /// The peer.
        peer: NodePublicKey,
        /// The peer's address as the server saw it; old servers send only the key.
        endpoint: Option<SocketAddr>,
        /// Flags, sent only with an endpoint (ignored when encoding without one); zero when the
        /// server sent none.
        flags: PeerPresentFlags,
    },
    /// A packet forwarded between meshed servers.
    ForwardPacket {
        /// The original sender.
        src: NodePublicKey,
        /// The destination node.
        dst: NodePublicKey,
        /// The packet, at most [`MAX_PACKET_SIZE`] bytes.
        packet: Vec<u8>,
    },
    /// A mesh peer subscribes to connection changes; any payload is ignored when decoding.
    WatchConns,
    /// Closes a peer's connection (privileged).
    ClosePeer {
        /// The peer to close.
        peer: NodePublicKey,
    },
    /// Asks for a `Pong` with the same data; bytes past the first 8 are ignored when decoding.
    Ping {
        /// The data to echo.
        data: [u8; PING_LEN],
    },
    /// Answers a `Ping`; bytes past the first 8 are ignored when decoding.
    Pong {
        /// The ping's data.
        data: [u8; PING_LEN],
    },
    /// The server's view of the connection's health.
    Health {
        /// The problem; empty means healthy again. Invalid UTF-8 is replaced when decoding.
        problem: String,
    },
    /// The server is restarting.
    Restarting {
        /// How long to wait before reconnecting, in milliseconds.
        reconnect_in_ms: u32,
        /// How long to keep trying, in milliseconds.
        try_for_ms: u32,
    },
    /// A frame type this version does not know; Tailscale ignores these, and so should callers.
    Unknown {
        /// The type byte.
        frame_type: FrameType,
        /// The raw payload.
        payload: Vec<u8>,
    },
}

/// Why bytes were not a DERP frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announced a payload above the type's limit.
    #[error("{frame_type} frame of {len} bytes is larger than allowed")]
    FrameTooLarge {
        /// The frame's type.
        frame_type: FrameType,
        /// The announced payload length.
        len: usize,
    },
    /// The payload was shorter than the type's fixed part.
    #[error("{frame_type} frame of {len} bytes is shorter than its fixed part")]
    Truncated {
        /// The frame's type.
        frame_type: FrameType,
        /// The payload length.
        len: usize,
    },
    /// A `ServerKey` frame did not start with [`MAGIC`].
    #[error("server greeting does not start with the DERP magic")]
    BadMagic,
}

impl Frame {
    /// This frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::ServerKey { .. } => FrameType::SERVER_KEY,
            Self::ClientInfo { .. } => FrameType::CLIENT_INFO,
            Self::ServerInfo { .. } => FrameType::SERVER_INFO,
            Self::SendPacket { .. } => FrameType::SEND_PACKET,
            Self::RecvPacket { .. } => FrameType::RECV_PACKET,
            Self::KeepAlive => FrameType::KEEP_ALIVE,
            Self::NotePreferred { .. } => FrameType::NOTE_PREFERRED,
            Self::PeerGone { .. } => FrameType::PEER_GONE,
            Self::PeerPresent { .. } => FrameType::PEER_PRESENT,
            Self::ForwardPacket { .. } => FrameType::FORWARD_PACKET,
            Self::WatchConns => FrameType::WATCH_CONNS,
            Self::ClosePeer { .. } => FrameType::CLOSE_PEER,
            Self::Ping { .. } => FrameType::PING,
            Self::Pong { .. } => FrameType::PONG,
            Self::Health { .. } => FrameType::HEALTH,
            Self::Restarting { .. } => FrameType::RESTARTING,
            Self::Unknown { frame_type, .. } => *frame_type,
        }
    }

    /// The payload length (without the 5-byte header).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::ServerKey { .. } => MAGIC.len() + KEY_LEN,
            Self::ClientInfo { sealed, .. } => KEY_LEN + NONCE_LEN + sealed.len(),
            Self::ServerInfo { sealed, .. } => NONCE_LEN + sealed.len(),
            Self::SendPacket { packet, .. } | Self::RecvPacket { packet, .. } => {
                KEY_LEN + packet.len()
            }
            Self::KeepAlive | Self::WatchConns => 0,
            Self::NotePreferred { .. } => 1,
            Self::PeerGone { .. } => KEY_LEN + 1,
            Self::PeerPresent { endpoint, .. } => match endpoint {
                Some(_) => KEY_LEN + ENDPOINT_LEN + 1,
                None => KEY_LEN,
            },
            Self::ForwardPacket { packet, .. } => 2 * KEY_LEN + packet.len(),
            Self::ClosePeer { .. } => KEY_LEN,
            Self::Ping { .. } | Self::Pong { .. } => PING_LEN,
            Self::Health { problem } => problem.len(),
            Self::Restarting { .. } => 8,
            Self::Unknown { payload, .. } => payload.len(),
        }
    }

    /// The encoded length, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Checks that the payload fits the type's limit, so a peer will accept the frame. Callers
    /// relaying packets of unknown size call this before [`Self::encode`].
    pub fn validate(&self) -> Result<(), FrameError> {
        let frame_type = self.frame_type();
        let len = self.payload_len();
        if len > frame_type.max_payload_len() {
            return Err(FrameError::FrameTooLarge { frame_type, len });
        }
        Ok(())
    }

    /// Appends the frame to `out`. It does not check limits (see [`Self::validate`]); a payload
    /// above 4 GiB gets a saturated length field.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(self.frame_type().0);
        let len = u32::try_from(self.payload_len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        match self {
            Self::ServerKey { key } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(key.as_bytes());
            }
            Self::ClientInfo { key, nonce, sealed } => {
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(nonce);
                out.extend_from_slice(sealed);
            }
            Self::ServerInfo { nonce, sealed } => {
                out.extend_from_slice(nonce);
                out.extend_from_slice(sealed);
            }
            Self::SendPacket { dst: key, packet } | Self::RecvPacket { src: key, packet } => {
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(packet);
            }
            Self::KeepAlive | Self::WatchConns => {}
            Self::NotePreferred { preferred } => out.push(u8::from(*preferred)),
            Self::PeerGone { peer, reason } => {
                out.extend_from_slice(peer.as_bytes());
                out.push(reason.to_byte());
            }
            Self::PeerPresent {
                peer,
                endpoint,
                flags,
            } => {
                out.extend_from_slice(peer.as_bytes());
                if let Some(endpoint) = endpoint {
                    put_endpoint(*endpoint, out);
                    out.push(flags.0);
                }
            }
            Self::ForwardPacket { src, dst, packet } => {
                out.extend_from_slice(src.as_bytes());
                out.extend_from_slice(dst.as_bytes());
                out.extend_from_slice(packet);
            }
            Self::ClosePeer { peer } => out.extend_from_slice(peer.as_bytes()),
            Self::Ping { data } | Self::Pong { data } => out.extend_from_slice(data),
            Self::Health { problem } => out.extend_from_slice(problem.as_bytes()),
            Self::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                out.extend_from_slice(&reconnect_in_ms.to_be_bytes());
                out.extend_from_slice(&try_for_ms.to_be_bytes());
            }
            Self::Unknown { payload, .. } => out.extend_from_slice(payload),
        }
    }

    /// Reads a frame header from the start of `buf`: its type and payload length, or `None`
    /// when fewer than [`HEADER_LEN`] bytes are there. A length above the type's limit is an
    /// error at once, so a stream reader never buffers it.
    pub fn decode_header(buf: &[u8]) -> Result<Option<(FrameType, usize)>, FrameError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let [ty, l0, l1, l2, l3] = *header;
        let frame_type = FrameType(ty);
        // u32 always fits in usize on the platforms warren builds for; saturate otherwise.
        let len = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).unwrap_or(usize::MAX);
        if len > frame_type.max_payload_len() {
            return Err(FrameError::FrameTooLarge { frame_type, len });
        }
        Ok(Some((frame_type, len)))
    }

    /// Decodes one frame from the start of `buf`. Returns the frame and the bytes it used, or
    /// `None` when `buf` does not yet hold the whole frame; call again with more bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some((frame_type, len)) = Self::decode_header(buf)? else {
            return Ok(None);
        };
        let end = HEADER_LEN.saturating_add(len);
        let Some(payload) = buf.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        Ok(Some((Self::decode_payload(frame_type, payload)?, end)))
    }

    /// Decodes a payload whose header was already read (see [`Self::decode_header`]).
    pub fn decode_payload(frame_type: FrameType, payload: &[u8]) -> Result<Frame, FrameError> {
        let truncated = FrameError::Truncated {
            frame_type,
            len: payload.len(),
        };
        if payload.len() > frame_type.max_payload_len() {
            return Err(FrameError::FrameTooLarge {
                frame_type,
                len: payload.len(),
            });
        }
        let frame = match frame_type {
            FrameType::SERVER_KEY => {
                let (magic, rest) = payload
                    .split_first_chunk::<8>()
                    .ok_or_else(|| truncated.clone())?;
                let key = rest.first_chunk::<KEY_LEN>().ok_or(truncated)?;
                if *magic != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                Frame::ServerKey {
                    key: DerpPublicKey::from_bytes(*key),
                }
            }
            FrameType::CLIENT_INFO => {
                let (key, rest) = split_key(payload).ok_or_else(|| truncated.clone())?;
                let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>().ok_or(truncated)?;
                Frame::ClientInfo {
                    key,
                    nonce: *nonce,
                    sealed: sealed.to_vec(),
                }
            }
            FrameType::SERVER_INFO => {
                let (nonce, sealed) = payload.split_first_chunk::<NONCE_LEN>().ok_or(truncated)?;
                Frame::ServerInfo {
                    nonce: *nonce,
                    sealed: sealed.to_vec(),
                }
            }
            FrameType::SEND_PACKET | FrameType::RECV_PACKET => {
                let (key, packet) = split_key(payload).ok_or(truncated)?;
                let packet = packet.to_vec();
                if frame_type == FrameType::SEND_PACKET {
                    Frame::SendPacket { dst: key, packet }
                } else {
                    Frame::RecvPacket { src: key, packet }
                }
            }
            FrameType::KEEP_ALIVE => Frame::KeepAlive,
            FrameType::NOTE_PREFERRED => {
                let first = payload.first().ok_or(truncated)?;
                Frame::NotePreferred {
                    preferred: *first != 0,
                }
            }
            FrameType::PEER_GONE => {
                let (peer, rest) = split_key(payload).ok_or(truncated)?;
                let reason = rest.first().map_or(PeerGoneReason::Disconnected, |b| {
                    PeerGoneReason::from_byte(*b)
                });
                Frame::PeerGone { peer, reason }
            }
            FrameType::PEER_PRESENT => {
                let (peer, rest) = split_key(payload).ok_or(truncated)?;
                match rest.split_first_chunk::<ENDPOINT_LEN>() {
                    None => Frame::PeerPresent {
                        peer,
                        endpoint: None,
                        flags: PeerPresentFlags::default(),
                    },
                    Some((endpoint, rest)) => Frame::PeerPresent {
                        peer,
                        endpoint: Some(get_endpoint(endpoint)),
                        flags: PeerPresentFlags(rest.first().copied().unwrap_or(0)),
                    },
                }
            }
            FrameType::FORWARD_PACKET => {
                let (src, rest) = split_key(payload).ok_or_else(|| truncated.clone())?;
                let (dst, packet) = split_key(rest).ok_or(truncated)?;
                Frame::ForwardPacket {
                    src,
                    dst,
                    packet: packet.to_vec(),
                }
            }
            FrameType::WATCH_CONNS => Frame::WatchConns,
            FrameType::CLOSE_PEER => {
                let (peer, _) = split_key(payload).ok_or(truncated)?;
                Frame::ClosePeer { peer }
            }
            FrameType::PING | FrameType::PONG => {
                let data = *payload.first_chunk::<PING_LEN>().ok_or(truncated)?;
                if frame_type == FrameType::PING {
                    Frame::Ping { data }
                } else {
                    Frame::Pong { data }
                }
            }
            FrameType::HEALTH => Frame::Health {
                problem: String::from_utf8_lossy(payload).into_owned(),
            },
            FrameType::RESTARTING => {
                let (reconnect, rest) = payload
                    .split_first_chunk::<4>()
                    .ok_or_else(|| truncated.clone())?;
                let try_for = rest.first_chunk::<4>().ok_or(truncated)?;
                Frame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes(*reconnect),
                    try_for_ms: u32::from_be_bytes(*try_for),
                }
            }
            _ => Frame::Unknown {
                frame_type,
                payload: payload.to_vec(),
            },
        };
        Ok(frame)
    }
}

fn split_key(b: &[u8]) -> Option<(NodePublicKey, &[u8])> {
    let (key, rest) = b.split_first_chunk::<KEY_LEN>()?;
    Some((NodePublicKey::from_bytes(*key), rest))
}

/// A region's shared mesh key: 32 bytes, written as 64 hex digits in JSON and in files.
/// It zeroizes on drop, compares in constant time and never prints.
#[derive(Clone)]
pub struct MeshKey([u8; 32]);

impl MeshKey {
    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-hex-digit form, wiped when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }
}

impl FromStr for MeshKey {
    type Err = InfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| InfoError::BadMeshKey)?;
        Ok(Self(out))
    }
}

impl PartialEq for MeshKey {
    fn eq(&self, other: &Self) -> bool {
        // Constant time: fold every byte difference before deciding.
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for MeshKey {}

impl Drop for MeshKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(..)")
    }
}

/// What a client says about itself in its `ClientInfo` box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's DERP protocol version (0 if it sent none).
    pub version: u32,
    /// The region's mesh key, sent only by meshed servers and privileged clients.
    pub mesh_key: Option<MeshKey>,
    /// Whether the client answers `Ping` frames.
    pub can_ack_pings: bool,
    /// Whether the client is a prober.
    pub is_prober: bool,
    /// An optional application name, for statistics.
    pub app_name: Option<String>,
}

impl Default for ClientInfo {
    fn default() -> Self {
        Self {
            version: PROTOCOL_VERSION,
            mesh_key: None,
            can_ack_pings: true,
            is_prober: false,
            app_name: None,
        }
    }
}

/// What the server says in its `ServerInfo` box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerInfo {
    /// The server's DERP protocol version (0 if it sent none).
    pub version: u32,
    /// The send rate the server accepts, framing included; 0 means unspecified.
    pub token_bucket_bytes_per_second: u64,
    /// The burst the server accepts above the rate; 0 means unspecified.
    pub token_bucket_bytes_burst: u64,
}

impl Default for ServerInfo {
    fn default() -> Self {
        Self {
            version: PROTOCOL_VERSION,
            token_bucket_bytes_per_second: 0,
            token_bucket_bytes_burst: 0,
        }
    }
}

/// Why a `ClientInfo` or `ServerInfo` box was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// The frame was not of the expected type.
    #[error("expected a {expected} frame, got {got}")]
    WrongFrame {
        /// The type the helper opens.
        expected: FrameType,
        /// The type it was given.
        got: FrameType,
    },
    /// The box did not open: the sender does not hold the key it claims, or bytes changed.
    #[error("info box does not open")]
    Forged,
    /// The sealed JSON is longer than [`MAX_INFO_LEN`].
    #[error("info JSON of {len} bytes is longer than allowed")]
    TooLong {
        /// The plaintext length.
        len: usize,
    },
    /// The plaintext was not JSON.
    #[error("info is not valid JSON (line {line}, column {column})")]
    BadJson {
        /// Where the parser stopped.
        line: usize,
        /// Where the parser stopped.
        column: usize,
    },
    /// The JSON was not an object.
    #[error("info JSON is not an object")]
    NotAnObject,
    /// A known field had the wrong JSON type or range.
    #[error("info field {field:?} has the wrong type")]
    BadField {
        /// The field, as warren names it.
        field: &'static str,
    },
    /// A mesh key (in a file or given as text) is not 64 hex digits.
    #[error("mesh key is not 64 hex digits")]
    BadMeshKey,
}

#[derive(serde::Serialize)]
struct ClientInfoWire<'a> {
    version: u32,
    #[serde(rename = "meshKey", skip_serializing_if = "Option::is_none")]
    mesh_key: Option<&'a str>,
    #[serde(rename = "CanAckPings")]
    can_ack_pings: bool,
    #[serde(rename = "IsProber")]
    is_prober: bool,
    #[serde(rename = "AppName", skip_serializing_if = "Option::is_none")]
    app_name: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct ServerInfoWire {
    version: u32,
    #[serde(rename = "TokenBucketBytesPerSecond")]
    token_bucket_bytes_per_second: u64,
    #[serde(rename = "TokenBucketBytesBurst")]
    token_bucket_bytes_burst: u64,
}

impl ClientInfo {
    /// The JSON a Go `derper` reads: `{"version":2,"CanAckPings":true,"IsProber":false}`, with
    /// `meshKey` and `AppName` only when set. (An empty `"meshKey":""` is left out on purpose:
    /// current Go servers parse the mesh key as 64 hex digits and refuse an empty one.)
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let mesh_hex = self.mesh_key.as_ref().map(MeshKey::to_hex);
        let wire = ClientInfoWire {
            version: self.version,
            mesh_key: mesh_hex.as_ref().map(|s| s.as_str()),
            can_ack_pings: self.can_ack_pings,
            is_prober: self.is_prober,
            app_name: self.app_name.as_deref(),
        };
        // Serializing plain fields into a Vec cannot fail.
        Zeroizing::new(serde_json::to_vec(&wire).unwrap_or_default())
    }

    /// Reads `ClientInfo` JSON from any client: field names match case-insensitively and
    /// ignoring `_`/`-` (Go's `meshKey`/`CanAckPings`, snake_case from others), every field is
    /// optional, unknown fields are ignored, and a mesh key that is not 64 hex digits (absent,
    /// empty, `"none"`, anything else) means none: the client is an ordinary one.
    pub fn from_json(json: &[u8]) -> Result<Self, InfoError> {
        let mut info = ClientInfo {
            version: 0,
            mesh_key: None,
            can_ack_pings: false,
            is_prober: false,
            app_name: None,
        };
        for (name, value) in json_object(json)? {
            match normalize(&name).as_str() {
                "version" => info.version = json_u32(&value, "version")?,
                "meshkey" => {
                    // Anything but 64 hex digits is "no mesh key": Tailscale's Rust client
                    // sends "none", old Go clients "" (Go's server would not even read
                    // snake_case `mesh_key`). Only a matching key grants anything, so a
                    // malformed one refuses nothing.
                    info.mesh_key = match &value {
                        serde_json::Value::String(s) => s.parse().ok(),
                        _ => None,
                    }
                }
                "canackpings" => info.can_ack_pings = json_bool(&value, "can_ack_pings")?,
                "isprober" => info.is_prober = json_bool(&value, "is_prober")?,
                "appname" => {
                    info.app_name = match value {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s),
                        _ => return Err(InfoError::BadField { field: "app_name" }),
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

impl ServerInfo {
    /// The JSON warren's relay sends:
    /// `{"version":2,"TokenBucketBytesPerSecond":0,"TokenBucketBytesBurst":0}`.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = ServerInfoWire {
            version: self.version,
            token_bucket_bytes_per_second: self.token_bucket_bytes_per_second,
            token_bucket_bytes_burst: self.token_bucket_bytes_burst,
        };
        // Serializing plain integers into a Vec cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Reads `ServerInfo` JSON leniently, like [`ClientInfo::from_json`]; Go's `derper` sends
    /// only `{"version":2}`.
    pub fn from_json(json: &[u8]) -> Result<Self, InfoError> {
        let mut info = ServerInfo {
            version: 0,
            token_bucket_bytes_per_second: 0,
            token_bucket_bytes_burst: 0,
        };
        for (name, value) in json_object(json)? {
            match normalize(&name).as_str() {
                "version" => info.version = json_u32(&value, "version")?,
                "tokenbucketbytespersecond" => {
                    info.token_bucket_bytes_per_second =
                        json_u64(&value, "token_bucket_bytes_per_second")?;
                }
                "tokenbucketbytesburst" => {
                    info.token_bucket_bytes_burst = json_u64(&value, "token_bucket_bytes_burst")?;
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

fn json_object(json: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, InfoError> {
    if json.len() > MAX_INFO_LEN {
        return Err(InfoError::TooLong { len: json.len() });
    }
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| InfoError::BadJson {
            line: e.line(),
            column: e.column(),
        })?;
    match value {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(InfoError::NotAnObject),
    }
}

fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn json_bool(v: &serde_json::Value, field: &'static str) -> Result<bool, InfoError> {
    match v {
        serde_json::Value::Null => Ok(false),
        serde_json::Value::Bool(b) => Ok(*b),
        _ => Err(InfoError::BadField { field }),
    }
}

fn json_u64(v: &serde_json::Value, field: &'static str) -> Result<u64, InfoError> {
    match v {
        serde_json::Value::Null => Ok(0),
        // Go sends ints; a negative or fractional one is treated as malformed.
        v => v.as_u64().ok_or(InfoError::BadField { field }),
    }
}

fn json_u32(v: &serde_json::Value, field: &'static str) -> Result<u32, InfoError> {
    u32::try_from(json_u64(v, field)?).map_err(|_| InfoError::BadField { field })
}

/// Builds the client's `ClientInfo` frame: `info` as JSON, sealed from the client's node key to
/// the server's key under `nonce` (24 fresh random bytes from the caller).
pub fn seal_client_info(
    client: &NodeSecretKey,
    server: &DerpPublicKey,
    nonce: [u8; NONCE_LEN],
    info: &ClientInfo,
) -> Frame {
    let json = info.to_json();
    let secret = client.to_bytes();
    Frame::ClientInfo {
        key: client.public_key(),
        nonce,
        sealed: seal_box(&secret, server.as_bytes(), &nonce, &json),
    }
}

/// Opens a client's `ClientInfo` frame on the server. Success proves the client holds the
/// secret of the node key it claims; returns that key and what the client said.
pub fn open_client_info(
    server: &DerpSecretKey,
    frame: &Frame,
) -> Result<(NodePublicKey, ClientInfo), InfoError> {
    let Frame::ClientInfo { key, nonce, sealed } = frame else {
        return Err(InfoError::WrongFrame {
            expected: FrameType::CLIENT_INFO,
            got: frame.frame_type(),
        });
    };
    let secret = server.to_bytes();
    let json = open_box(&secret, key.as_bytes(), nonce, sealed).ok_or(InfoError::Forged)?;
    Ok((*key, ClientInfo::from_json(&json)?))
}

/// Builds the server's `ServerInfo` frame, sealed from the server's key to the client's node
/// key under `nonce` (24 fresh random bytes from the caller).
pub fn seal_server_info(
    server: &DerpSecretKey,
    client: &NodePublicKey,
    nonce: [u8; NONCE_LEN],
    info: &ServerInfo,
) -> Frame {
    let secret = server.to_bytes();
    Frame::ServerInfo {
        nonce,
        sealed: seal_box(&secret, client.as_bytes(), &nonce, &info.to_json()),
    }
}

/// Opens the server's `ServerInfo` frame on the client, proving the server holds the secret of
/// the key it announced in `ServerKey`.
pub fn open_server_info(
    client: &NodeSecretKey,
    server: &DerpPublicKey,
    frame: &Frame,
) -> Result<ServerInfo, InfoError> {
    let Frame::ServerInfo { nonce, sealed } = frame else {
        return Err(InfoError::WrongFrame {
            expected: FrameType::SERVER_INFO,
            got: frame.frame_type(),
        });
    };
    let secret = client.to_bytes();
    let json = open_box(&secret, server.as_bytes(), nonce, sealed).ok_or(InfoError::Forged)?;
    ServerInfo::from_json(&json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nk(b: u8) -> NodePublicKey {
        NodePublicKey::from_bytes([b; 32])
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::ServerKey {
                key: DerpPublicKey::from_bytes([9; 32]),
            },
            Frame::ClientInfo {
                key: nk(1),
                nonce: [2; 24],
                sealed: vec![3; 40],
            },
            Frame::ServerInfo {
                nonce: [4; 24],
                sealed: vec![],
            },
            Frame::SendPacket {
                dst: nk(5),
                packet: b"hello".to_vec(),
            },
            Frame::RecvPacket {
                src: nk(6),
                packet: vec![0; MAX_PACKET_SIZE],
            },
            Frame::KeepAlive,
            Frame::NotePreferred { preferred: true },
            Frame::NotePreferred { preferred: false },
            Frame::PeerGone {
                peer: nk(7),
                reason: PeerGoneReason::NotHere,
            },
            Frame::PeerGone {
                peer: nk(7),
                reason: PeerGoneReason::Other(0x42),
            },
            Frame::PeerPresent {
                peer: nk(8),
                endpoint: Some("192.0.2.7:41641".parse().expect("addr")),
                flags: PeerPresentFlags::REGULAR,
            },
            Frame::PeerPresent {
                peer: nk(8),
                endpoint: Some("[2001:db8::1]:3478".parse().expect("addr")),
                flags: PeerPresentFlags(0),
            },
            Frame::PeerPresent {
                peer: nk(8),
                endpoint: None,
                flags: PeerPresentFlags(0),
            },
            Frame::ForwardPacket {
                src: nk(10),
                dst: nk(11),
                packet: vec![1, 2, 3],
            },
            Frame::WatchConns,
            Frame::ClosePeer { peer: nk(12) },
            Frame::Ping { data: [1; 8] },
            Frame::Pong { data: [2; 8] },
            Frame::Health {
                problem: "duplicate client".into(),
            },
            Frame::Health {
                problem: String::new(),
            },
            Frame::Restarting {
                reconnect_in_ms: 1500,
                try_for_ms: 0xdead_beef,
            },
            Frame::Unknown {
                frame_type: FrameType(0x7f),
                payload: vec![1, 2, 3],
            },
        ]
    }

    fn encode(f: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        f.encode(&mut out);
        out
    }

    #[test]
    fn round_trip_and_encoded_len() {
        for f in samples() {
            let bytes = encode(&f);
            assert_eq!(bytes.len(), f.encoded_len(), "{f:?}");
            f.validate().expect("within limits");
            let (back, used) = Frame::decode(&bytes).expect("decodes").expect("complete");
            assert_eq!(used, bytes.len());
            assert_eq!(back, f);
        }
    }

    #[test]
    fn every_prefix_needs_more_bytes() {
        for f in samples() {
            let bytes = encode(&f);
            // Checking every prefix of the 64 KiB packet would be slow; its tail is uniform.
            let step = if bytes.len() > 4096 { 997 } else { 1 };
            for cut in (0..bytes.len()).step_by(step) {
                assert_eq!(Frame::decode(&bytes[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn stream_of_frames_decodes_in_order() {
        let frames = samples();
        let mut stream = Vec::new();
        for f in &frames {
            f.encode(&mut stream);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((f, used)) = Frame::decode(&stream[at..]).expect("decodes") {
            got.push(f);
            at += used;
        }
        assert_eq!(at, stream.len());
        assert_eq!(got, frames);
    }

    #[test]
    fn short_fixed_parts_are_truncated() {
        let fixed: [(FrameType, usize); 11] = [
            (FrameType::SERVER_KEY, 40),
            (FrameType::CLIENT_INFO, 56),
            (FrameType::SERVER_INFO, 24),
            (FrameType::SEND_PACKET, 32),
            (FrameType::RECV_PACKET, 32),
            (FrameType::NOTE_PREFERRED, 1),
            (FrameType::PEER_GONE, 32),
            (FrameType::PEER_PRESENT, 32),
            (FrameType::FORWARD_PACKET, 64),
            (FrameType::CLOSE_PEER, 32),
            (FrameType::RESTARTING, 8),
        ];
        let more: [(FrameType, usize); 2] = [(FrameType::PING, 8), (FrameType::PONG, 8)];
        for (frame_type, min) in fixed.into_iter().chain(more) {
            for len in 0..min {
                let mut bytes = vec![frame_type.0];
                bytes.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
                // A magic-looking start so ServerKey fails on length, not on magic.
                bytes.extend(MAGIC.iter().copied().chain(std::iter::repeat(0)).take(len));
                assert_eq!(
                    Frame::decode(&bytes),
                    Err(FrameError::Truncated { frame_type, len }),
                    "{frame_type} len {len}"
                );
            }
        }
    }

    #[test]
    fn oversized_headers_are_refused_before_the_payload() {
        let mut bytes = vec![0x04];
        let len = KEY_LEN + MAX_PACKET_SIZE + 1;
        bytes.extend_from_slice(&u32::try_from(len).expect("fits").to_be_bytes());
        assert_eq!(
            Frame::decode(&bytes),
            Err(FrameError::FrameTooLarge {
                frame_type: FrameType::SEND_PACKET,
                len
            })
        );
        let huge = [0x7f, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Frame::decode(&huge),
            Err(FrameError::FrameTooLarge { .. })
        ));
        let too_big = Frame::SendPacket {
            dst: nk(1),
            packet: vec![0; MAX_PACKET_SIZE + 1],
        };
        assert!(too_big.validate().is_err());
    }

    #[test]
    fn bad_magic_and_lenient_forms() {
        let mut bytes = encode(&Frame::ServerKey {
            key: DerpPublicKey::from_bytes([1; 32]),
        });
        bytes[5] = b'X';
        assert_eq!(Frame::decode(&bytes), Err(FrameError::BadMagic));

        // A ServerKey with extra "future use" bytes.
        let mut bytes = vec![0x01, 0, 0, 0, 44];
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&[3; 32]);
        bytes.extend_from_slice(&[0xee; 4]);
        let (f, used) = Frame::decode(&bytes).expect("ok").expect("complete");
        assert_eq!(used, 49);
        assert_eq!(
            f,
            Frame::ServerKey {
                key: DerpPublicKey::from_bytes([3; 32])
            }
        );

        // An old 32-byte PeerGone means Disconnected; an old 32-byte PeerPresent has no address.
        let mut gone = vec![0x08, 0, 0, 0, 32];
        gone.extend_from_slice(&[7; 32]);
        assert_eq!(
            Frame::decode(&gone).expect("ok").expect("complete").0,
            Frame::PeerGone {
                peer: nk(7),
                reason: PeerGoneReason::Disconnected
            }
        );
        // A 50-byte PeerPresent (address, no flags byte).
        let mut present = vec![0x09, 0, 0, 0, 50];
        present.extend_from_slice(&[8; 32]);
        present.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        present.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            Frame::decode(&present).expect("ok").expect("complete").0,
            Frame::PeerPresent {
                peer: nk(8),
                endpoint: Some("[::1]:443".parse().expect("addr")),
                flags: PeerPresentFlags(0),
            }
        );
        // Ping with extra bytes, as Go's server tolerates.
        let mut ping = vec![0x12, 0, 0, 0, 10];
        ping.extend_from_slice(&[5; 10]);
        assert_eq!(
            Frame::decode(&ping).expect("ok").expect("complete").0,
            Frame::Ping { data: [5; 8] }
        );
    }

    #[test]
    fn fixed_byte_vectors() {
        assert_eq!(MAGIC, "DERP🔑".as_bytes());
        assert_eq!(encode(&Frame::KeepAlive), [0x06, 0, 0, 0, 0]);
        assert_eq!(
            encode(&Frame::NotePreferred { preferred: true }),
            [0x07, 0, 0, 0, 1, 1]
        );
        assert_eq!(
            encode(&Frame::Restarting {
                reconnect_in_ms: 0x0102_0304,
                try_for_ms: 5
            }),
            [0x15, 0, 0, 0, 8, 1, 2, 3, 4, 0, 0, 0, 5]
        );
        let present = encode(&Frame::PeerPresent {
            peer: nk(0xaa),
            endpoint: Some("1.2.3.4:258".parse().expect("addr")),
            flags: PeerPresentFlags::REGULAR,
        });
        assert_eq!(&present[..5], &[0x09, 0, 0, 0, 51]);
        assert_eq!(
            &present[37..],
            &[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4, 1, 2, 1
            ]
        );
        let mut key = vec![
            0x01, 0, 0, 0, 40, 0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91,
        ];
        key.extend_from_slice(&[0x11; 32]);
        assert_eq!(
            encode(&Frame::ServerKey {
                key: DerpPublicKey::from_bytes([0x11; 32])
            }),
            key
        );
    }

    #[test]
    fn handshake_boxes_round_trip() {
        let client = NodeSecretKey::generate();
        let server = DerpSecretKey::generate();
        let info = ClientInfo {
            mesh_key: Some(MeshKey::from_bytes([0xab; 32])),
            app_name: Some("warren".into()),
            ..ClientInfo::default()
        };
        let frame = seal_client_info(&client, &server.public_key(), [1; 24], &info);
        let bytes = encode(&frame);
        let (frame, _) = Frame::decode(&bytes).expect("ok").expect("complete");
        let (key, got) = open_client_info(&server, &frame).expect("opens");
        assert_eq!(key, client.public_key());
        assert_eq!(got, info);

        let sinfo = ServerInfo {
            token_bucket_bytes_per_second: 1 << 20,
            ..ServerInfo::default()
        };
        let frame = seal_server_info(&server, &client.public_key(), [2; 24], &sinfo);
        assert_eq!(
            open_server_info(&client, &server.public_key(), &frame),
            Ok(sinfo)
        );
        // Another server cannot answer for this one.
        let other = DerpSecretKey::generate();
        assert_eq!(
            open_server_info(&client, &other.public_key(), &frame),
            Err(InfoError::Forged)
        );
        assert_eq!(
            open_client_info(&server, &Frame::KeepAlive),
            Err(InfoError::WrongFrame {
                expected: FrameType::CLIENT_INFO,
                got: FrameType::KEEP_ALIVE
            })
        );
    }

    #[test]
    fn client_claiming_another_key_is_forged() {
        let client = NodeSecretKey::generate();
        let server = DerpSecretKey::generate();
        let frame = seal_client_info(
            &client,
            &server.public_key(),
            [3; 24],
            &ClientInfo::default(),
        );
        let Frame::ClientInfo { nonce, sealed, .. } = frame else {
            panic!("client info frame");
        };
        let forged = Frame::ClientInfo {
            key: NodeSecretKey::generate().public_key(),
            nonce,
            sealed,
        };
        assert_eq!(open_client_info(&server, &forged), Err(InfoError::Forged));
    }

    #[test]
    fn info_json_forms() {
        assert_eq!(
            ClientInfo::default().to_json().as_slice(),
            br#"{"version":2,"CanAckPings":true,"IsProber":false}"#
        );
        assert_eq!(
            ServerInfo::default().to_json(),
            br#"{"version":2,"TokenBucketBytesPerSecond":0,"TokenBucketBytesBurst":0}"#
        );
        // Go's form, with an empty mesh key as old Go clients sent it, and unknown fields.
        let go = ClientInfo::from_json(
            br#"{"version":2,"meshKey":"","CanAckPings":true,"IsProber":false,"Future":[1]}"#,
        )
        .expect("parses");
        assert_eq!(go, ClientInfo::default());
        // snake_case, lower case, a mesh key.
        let hex = "ab".repeat(32);
        let snake = ClientInfo::from_json(
            format!(r#"{{"version":2,"mesh_key":"{hex}","can_ack_pings":true,"is_prober":true}}"#)
                .as_bytes(),
        )
        .expect("parses");
        assert_eq!(snake.mesh_key, Some(MeshKey::from_bytes([0xab; 32])));
        assert!(snake.is_prober && snake.can_ack_pings);
        assert_eq!(ClientInfo::from_json(b"{}").expect("parses").version, 0);
        assert_eq!(
            ServerInfo::from_json(br#"{"version":2}"#),
            Ok(ServerInfo::default())
        );
        assert_eq!(
            ServerInfo::from_json(br#"{"Version":2,"tokenbucketbytesburst":7}"#)
                .expect("parses")
                .token_bucket_bytes_burst,
            7
        );
        // Tailscale's Rust client (ts_derp 0.6): snake_case and "mesh_key":"none".
        let ts = ClientInfo::from_json(
            br#"{"can_ack_pings":false,"is_prober":false,"mesh_key":"none","version":2}"#,
        );
        assert_eq!(
            ts,
            Ok(ClientInfo {
                version: 2,
                mesh_key: None,
                can_ack_pings: false,
                is_prober: false,
                app_name: None,
            })
        );
        // Whatever else is not a key is no key either, never a refusal.
        for bad in [r#""zz""#, r#""none ""#, "42", "null", "[1]", r#""abab""#] {
            let json = format!(r#"{{"version":2,"meshKey":{bad}}}"#);
            assert_eq!(
                ClientInfo::from_json(json.as_bytes()).map(|i| i.mesh_key),
                Ok(None),
                "{json}"
            );
        }
        assert_eq!(
            ClientInfo::from_json(br#"{"version":"2"}"#),
            Err(InfoError::BadField { field: "version" })
        );
        assert_eq!(
            ClientInfo::from_json(br#"{"CanAckPings":1}"#),
            Err(InfoError::BadField {
                field: "can_ack_pings"
            })
        );
        assert_eq!(ClientInfo::from_json(b"[]"), Err(InfoError::NotAnObject));
        assert!(matches!(
            ServerInfo::from_json(b"{"),
            Err(InfoError::BadJson { .. })
        ));
    }

    #[test]
    fn mesh_key_never_prints() {
        let k = MeshKey::from_bytes([1; 32]);
        assert_eq!(format!("{k:?}"), "MeshKey(..)");
        assert_eq!(k.to_hex().as_str(), "01".repeat(32));
        assert_eq!("01".repeat(32).parse::<MeshKey>(), Ok(k));
    }
}
