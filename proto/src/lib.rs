//! warren's shared vocabulary: typed keys, the control protocol (gRPC), and proofs of key
//! possession. Pure: no sockets, files, clock or async runtime, so every binary and every
//! sans-IO core can depend on it.

pub mod keys;
pub mod proof;

/// The generated gRPC types and services of `warren.control.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod control {
    tonic::include_proto!("warren.control.v1");
}

pub use keys::{
    ControlPublicKey, ControlSecretKey, DiscoPublicKey, DiscoSecretKey, KeyParseError,
    NodePublicKey, NodeSecretKey,
};
