//! Proof that a caller holds a node private key, as DERP's ClientInfo proves it: a NaCl box
//! (X25519 + XSalsa20-Poly1305) sealed with the node's private key to the control server's
//! public key. Only the holder of the node key (or the server) can make a box that opens, so a
//! public key, which every peer knows, is never enough. The sealed text names the method and
//! the time, so a proof cannot be replayed on another method or long after.

use crypto_box::aead::Aead;
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
    /// The box opened but was made for another method.
    #[error("proof was made for another method")]
    WrongMethod,
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

fn plaintext(method: &str, unix_ms: i64) -> Vec<u8> {
    let mut p = Vec::with_capacity(DOMAIN.len() + method.len() + 9);
    p.extend_from_slice(DOMAIN);
    p.push(b'|');
    p.extend_from_slice(method.as_bytes());
    p.extend_from_slice(&unix_ms.to_be_bytes());
    p
}

/// Makes a proof for `method` at `unix_ms`; `nonce` must be fresh random bytes.
pub fn make_proof(
    node: &NodeSecretKey,
    server: &ControlPublicKey,
    method: &str,
    unix_ms: i64,
    nonce: [u8; 24],
) -> NodeProof {
    let secret = node.to_bytes();
    NodeProof {
        node_key: node.public_key().to_vec(),
        nonce: nonce.to_vec(),
        sealed: seal_box(
            &secret,
            server.as_bytes(),
            &nonce,
            &plaintext(method, unix_ms),
        ),
    }
}

/// Checks a proof for `method` against the server's clock `now_ms`; returns the proven key.
pub fn verify_proof(
    server: &ControlSecretKey,
    proof: Option<&NodeProof>,
    method: &str,
    now_ms: i64,
) -> Result<NodePublicKey, ProofError> {
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
    let prefix_len = DOMAIN.len() + 1 + method.len();
    if opened.len() != prefix_len + 8 || opened[..prefix_len] != plaintext(method, 0)[..prefix_len]
    {
        return Err(ProofError::WrongMethod);
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&opened[prefix_len..]);
    let skew_ms = i64::from_be_bytes(ts).saturating_sub(now_ms);
    if skew_ms.abs() > MAX_SKEW_MS {
        return Err(ProofError::Stale { skew_ms });
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (NodeSecretKey, ControlSecretKey) {
        (NodeSecretKey::generate(), ControlSecretKey::generate())
    }

    #[test]
    fn valid_proof_verifies() {
        let (node, server) = setup();
        let p = make_proof(&node, &server.public_key(), "RegisterNode", 1_000, [7; 24]);
        assert_eq!(
            verify_proof(&server, Some(&p), "RegisterNode", 2_000),
            Ok(node.public_key())
        );
    }

    #[test]
    fn knowing_the_public_key_is_not_enough() {
        let (node, server) = setup();
        let attacker = NodeSecretKey::generate();
        let mut p = make_proof(&attacker, &server.public_key(), "GetNode", 1_000, [1; 24]);
        p.node_key = node.public_key().to_vec();
        assert_eq!(
            verify_proof(&server, Some(&p), "GetNode", 1_000),
            Err(ProofError::Forged)
        );
    }

    #[test]
    fn wrong_method_stale_and_malformed_are_refused() {
        let (node, server) = setup();
        let p = make_proof(&node, &server.public_key(), "GetNode", 0, [2; 24]);
        assert_eq!(
            verify_proof(&server, Some(&p), "ListNodes", 0),
            Err(ProofError::WrongMethod)
        );
        assert_eq!(
            verify_proof(&server, Some(&p), "GetNode", MAX_SKEW_MS + 1),
            Err(ProofError::Stale {
                skew_ms: -(MAX_SKEW_MS + 1)
            })
        );
        assert_eq!(
            verify_proof(&server, None, "GetNode", 0),
            Err(ProofError::Missing)
        );
        let mut bad = p.clone();
        bad.nonce.pop();
        assert_eq!(
            verify_proof(&server, Some(&bad), "GetNode", 0),
            Err(ProofError::BadNonce { len: 23 })
        );
        let mut bad = p;
        bad.sealed[0] ^= 1;
        assert_eq!(
            verify_proof(&server, Some(&bad), "GetNode", 0),
            Err(ProofError::Forged)
        );
    }
}
