//! Proof that a caller holds a node private key, as DERP's ClientInfo proves it: a NaCl box
//! (X25519 + XSalsa20-Poly1305) sealed with the node's private key to the control server's
//! public key. Only the holder of the node key (or the server) can make a box that opens, so a
//! public key, which every peer knows, is never enough. The sealed text names the method, the
//! time and a digest of the request it came with, so a proof cannot be moved to another method,
//! another request body, or used long after; the server also remembers nonces it has seen
//! within the time window ([`ReplayGuard`]), so a captured request cannot be sent again.

use std::collections::HashMap;

use crypto_box::aead::Aead;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::control::NodeProof;
use crate::keys::{ControlPublicKey, ControlSecretKey, NodePublicKey, NodeSecretKey};

const DOMAIN: &[u8] = b"warren-proof-v1";

/// How far a proof's time may be from the server's clock, in milliseconds.
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The request carried no proof.
    #[error("missing node proof")]
    Missing,
    /// The node key in the proof was malformed.
    #[error("malformed node key in proof: {0}")]
    BadKey(#[from] crate::keys::KeyParseError),
    /// The nonce was not 24 bytes.
    #[error("proof nonce must be 24 bytes, got {len}")]
    BadNonce {
        /// The length given.
        len: usize,
    },
    /// The box did not open: the caller does not hold the node's private key.
    #[error("proof does not open with this node key")]
    Forged,
    /// The box opened but was made for another method or another request.
    #[error("proof was made for another method or request")]
    WrongMethod,
    /// The same proof was presented before.
    #[error("proof was already used")]
    Replayed,
    /// The box opened but its time is too far from the server's clock.
    #[error("proof time is {skew_ms} ms away from the server's clock")]
    Stale {
        /// The distance from the server's clock.
        skew_ms: i64,
    },
}

fn salsa_box(secret: &[u8; 32], public: &[u8; 32]) -> crypto_box::SalsaBox {
    let secret = crypto_box::SecretKey::from(*secret);
    let public = crypto_box::PublicKey::from(*public);
    crypto_box::SalsaBox::new(&public, &secret)
}

/// Seals `plaintext` in a NaCl box from `secret` to `public` under `nonce`.
pub fn seal_box(
    secret: &[u8; 32],
    public: &[u8; 32],
    nonce: &[u8; 24],
    plaintext: &[u8],
) -> Vec<u8> {
    salsa_box(secret, public)
        .encrypt(nonce.into(), plaintext)
        // Encryption into a Vec only fails on allocation limits far above any message here.
        .unwrap_or_default()
}

/// Opens a NaCl box sealed by the holder of `public`'s secret to `secret`'s owner.
pub fn open_box(
    secret: &[u8; 32],
    public: &[u8; 32],
    nonce: &[u8; 24],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    salsa_box(secret, public)
        .decrypt(nonce.into(), sealed)
        .ok()
        .map(Zeroizing::new)
}

/// The digest a proof binds to: SHA-256 of the request encoded without its proof.
pub fn request_digest(request_without_proof: &impl prost::Message) -> [u8; 32] {
    Sha256::digest(request_without_proof.encode_to_vec()).into()
}

/// Wall-clock milliseconds since the Unix epoch, the time proofs carry and are checked
/// against. The functions here take the time as a parameter; the shells that stamp and check
/// proofs read the clock with this (0 before 1970, saturated far in the future).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn plaintext(method: &str, unix_ms: i64, digest: &[u8; 32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(DOMAIN.len() + 2 + method.len() + 8 + 32);
    p.extend_from_slice(DOMAIN);
    p.push(b'|');
    p.extend_from_slice(method.as_bytes());
    p.push(b'|');
    p.extend_from_slice(&unix_ms.to_be_bytes());
    p.extend_from_slice(digest);
    p
}

/// Makes a proof for `method` at `unix_ms` over a request whose [`request_digest`] is `digest`;
/// `nonce` must be fresh random bytes.
pub fn make_proof(
    node: &NodeSecretKey,
    server: &ControlPublicKey,
    method: &str,
    unix_ms: i64,
    nonce: [u8; 24],
    digest: &[u8; 32],
) -> NodeProof {
    let secret = node.to_bytes();
    let sealed = seal_box(
        &secret,
        server.as_bytes(),
        &nonce,
        &plaintext(method, unix_ms, digest),
    );
    NodeProof {
        node_key: node.public_key().to_vec(),
        nonce: nonce.to_vec(),
        sealed,
    }
}

/// A checked proof: who made it, and its nonce for [`ReplayGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proven {
    /// The node that holds the key.
    pub node: NodePublicKey,
    /// The proof's nonce.
    pub nonce: [u8; 24],
}

/// Checks a proof for `method` over a request with `digest` against the server's clock.
pub fn verify_proof(
    server: &ControlSecretKey,
    proof: Option<&NodeProof>,
    method: &str,
    now_ms: i64,
    digest: &[u8; 32],
) -> Result<Proven, ProofError> {
    let proof = proof.ok_or(ProofError::Missing)?;
    let node = NodePublicKey::from_slice(&proof.node_key)?;
    let nonce: [u8; 24] = proof
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| ProofError::BadNonce {
            len: proof.nonce.len(),
        })?;
    let secret = server.to_bytes();
    let opened =
        open_box(&secret, node.as_bytes(), &nonce, &proof.sealed).ok_or(ProofError::Forged)?;
    let head = DOMAIN.len() + 2 + method.len();
    if opened.len() != head + 8 + 32
        || opened[..head] != plaintext(method, 0, digest)[..head]
        || opened[head + 8..] != digest[..]
    {
        return Err(ProofError::WrongMethod);
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&opened[head..head + 8]);
    let sealed_at = i64::from_be_bytes(ts);
    if sealed_at.abs_diff(now_ms) > MAX_SKEW_MS.unsigned_abs() {
        return Err(ProofError::Stale {
            skew_ms: sealed_at.saturating_sub(now_ms),
        });
    }
    Ok(Proven { node, nonce })
}

/// Remembers the nonces of proofs accepted within the time window, so each proof works once.
/// Memory is bounded by the proofs valid nodes made in the last two windows.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashMap<[u8; 24], i64>,
    last_prune_ms: i64,
}

impl ReplayGuard {
    /// Records `nonce` at `now_ms`; an error when it was seen within the window.
    pub fn check(&mut self, nonce: [u8; 24], now_ms: i64) -> Result<(), ProofError> {
        if now_ms.saturating_sub(self.last_prune_ms) > MAX_SKEW_MS {
            let horizon = now_ms.saturating_sub(2 * MAX_SKEW_MS);
            self.seen.retain(|_, at| *at >= horizon);
            self.last_prune_ms = now_ms;
        }
        if self.seen.insert(nonce, now_ms).is_some() {
            return Err(ProofError::Replayed);
        }
        Ok(())
    }

    /// How many nonces are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::GetNodeRequest;

    const D: [u8; 32] = [9; 32];

    fn setup() -> (NodeSecretKey, ControlSecretKey) {
        (NodeSecretKey::generate(), ControlSecretKey::generate())
    }

    #[test]
    fn valid_proof_verifies() {
        let (node, server) = setup();
        let p = make_proof(
            &node,
            &server.public_key(),
            "RegisterNode",
            1_000,
            [7; 24],
            &D,
        );
        let proven = verify_proof(&server, Some(&p), "RegisterNode", 2_000, &D).expect("valid");
        assert_eq!(
            proven,
            Proven {
                node: node.public_key(),
                nonce: [7; 24]
            }
        );
    }

    #[test]
    fn knowing_the_public_key_is_not_enough() {
        let (node, server) = setup();
        let attacker = NodeSecretKey::generate();
        let mut p = make_proof(
            &attacker,
            &server.public_key(),
            "GetNode",
            1_000,
            [1; 24],
            &D,
        );
        p.node_key = node.public_key().to_vec();
        let got = verify_proof(&server, Some(&p), "GetNode", 1_000, &D);
        assert_eq!(got, Err(ProofError::Forged));
    }

    #[test]
    fn proof_is_bound_to_method_request_and_time() {
        let (node, server) = setup();
        let p = make_proof(&node, &server.public_key(), "GetNode", 0, [2; 24], &D);
        let verify = |method, now, digest| verify_proof(&server, Some(&p), method, now, digest);
        assert_eq!(verify("ListNodes", 0, &D), Err(ProofError::WrongMethod));
        assert_eq!(verify("GetNod", 0, &D), Err(ProofError::WrongMethod));
        assert_eq!(verify("GetNode", 0, &[8; 32]), Err(ProofError::WrongMethod));
        assert_eq!(
            verify("GetNode", MAX_SKEW_MS + 1, &D),
            Err(ProofError::Stale {
                skew_ms: -(MAX_SKEW_MS + 1)
            })
        );
        let extreme = make_proof(
            &node,
            &server.public_key(),
            "GetNode",
            i64::MIN,
            [3; 24],
            &D,
        );
        assert!(matches!(
            verify_proof(&server, Some(&extreme), "GetNode", i64::MAX, &D),
            Err(ProofError::Stale { .. })
        ));
    }

    #[test]
    fn malformed_proofs_are_typed_errors() {
        let (node, server) = setup();
        let p = make_proof(&node, &server.public_key(), "GetNode", 0, [2; 24], &D);
        assert_eq!(
            verify_proof(&server, None, "GetNode", 0, &D),
            Err(ProofError::Missing)
        );
        let mut bad = p.clone();
        bad.nonce.pop();
        assert_eq!(
            verify_proof(&server, Some(&bad), "GetNode", 0, &D),
            Err(ProofError::BadNonce { len: 23 })
        );
        let mut bad = p;
        bad.sealed[0] ^= 1;
        assert_eq!(
            verify_proof(&server, Some(&bad), "GetNode", 0, &D),
            Err(ProofError::Forged)
        );
    }

    #[test]
    fn digest_ignores_nothing_but_the_proof_field() {
        let a = request_digest(&GetNodeRequest { proof: None });
        assert_eq!(a, request_digest(&GetNodeRequest::default()));
        let with = GetNodeRequest {
            proof: Some(NodeProof::default()),
        };
        assert_ne!(a, request_digest(&with));
    }

    #[test]
    fn replay_guard_accepts_each_nonce_once_and_forgets_old_ones() {
        let mut g = ReplayGuard::default();
        assert_eq!(g.check([1; 24], 0), Ok(()));
        assert_eq!(g.check([1; 24], 10), Err(ProofError::Replayed));
        assert_eq!(g.check([2; 24], 10), Ok(()));
        // Far past the window the old nonces are pruned (their proofs are stale anyway).
        assert_eq!(g.check([3; 24], 3 * MAX_SKEW_MS), Ok(()));
        assert_eq!(g.len(), 1);
    }
}
