//! warren's shared vocabulary: typed keys, the control protocol (gRPC), and proofs of key
//! possession. Pure: no sockets, files, clock or async runtime, so every binary and every
//! sans-IO core can depend on it.
//!
//! - [`backoff`]: reconnect schedules with jitter, so a fleet does not retry in lockstep.
//! - [`codec`]: the gRPC codec, with small per-stream buffers.
//! - [`keys`]: typed X25519 keys per role (node, disco, control, DERP server).
//! - [`proof`]: NaCl boxes and proofs of node-key possession for the control API.
//! - [`derp`]: DERP v2 relay frames and handshake boxes, wire-compatible with Tailscale.
//! - [`disco`]: disco path-discovery packets (ping, pong, call-me-maybe), sealed and opened.
//! - [`stun`]: STUN Binding requests and responses (RFC 5389) and the demultiplexing test.

pub mod backoff;
pub mod codec;
pub mod derp;
pub mod disco;
mod endpoint;
pub mod keys;
pub mod proof;
pub mod stun;

/// The generated gRPC types and services of `warren.control.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod control {
    tonic::include_proto!("warren.control.v1");
}

impl control::StreamMapRequest {
    /// A request (its proof still to be added) from a node that takes paged full maps and
    /// batches, resuming from (map id, version applied) when it has one.
    pub fn paged(resume: Option<(u64, u64)>) -> Self {
        let (map_id, version) = resume.unwrap_or_default();
        Self {
            proof: None,
            map_id,
            version,
            pages: true,
        }
    }
}

pub use keys::{
    ControlPublicKey, ControlSecretKey, DerpPublicKey, DerpSecretKey, DiscoPublicKey,
    DiscoSecretKey, KeyParseError, NodePublicKey, NodeSecretKey,
};
