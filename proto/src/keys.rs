//! Typed X25519 keys. A key is never a `String` or `Vec<u8>` past a parser: each role (node,
//! disco, control server) has its own public and secret type, a text form with a role prefix
//! (`nodekey:<hex>`) used in the CLI, config, logs and database, and a short form for logs.
//! Secret keys zeroize on drop and never print.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

/// Why a key's text or bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text did not start with the role's prefix.
    #[error("expected a key starting with {expected:?}")]
    WrongPrefix {
        /// The prefix the role uses, such as `nodekey:`.
        expected: &'static str,
    },
    /// The hex part was not 64 hex digits.
    #[error("a key is 64 hex digits after its prefix")]
    BadHex,
    /// Raw bytes were not 32 long.
    #[error("a key is 32 bytes, got {len}")]
    BadLength {
        /// The length that was given.
        len: usize,
    },
}

fn parse_hex32(s: &str, prefix: &'static str) -> Result<[u8; 32], KeyParseError> {
    let hex_part = s
        .strip_prefix(prefix)
        .ok_or(KeyParseError::WrongPrefix { expected: prefix })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| KeyParseError::BadHex)?;
    Ok(out)
}

fn bytes32(b: &[u8]) -> Result<[u8; 32], KeyParseError> {
    b.try_into()
        .map_err(|_| KeyParseError::BadLength { len: b.len() })
}

macro_rules! key_pair {
    (
        $(#[$pub_doc:meta])* $public:ident, $pub_prefix:literal,
        $(#[$sec_doc:meta])* $secret:ident, $sec_prefix:literal
    ) => {
        $(#[$pub_doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $public([u8; 32]);

        impl $public {
            /// The text prefix of this key type.
            pub const PREFIX: &'static str = $pub_prefix;

            /// Wraps raw key bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Parses 32 raw bytes, as found in protobuf messages.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyParseError> {
                bytes32(bytes).map(Self)
            }

            /// The raw key bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The raw key bytes as a vector, for protobuf messages.
            pub fn to_vec(&self) -> Vec<u8> {
                self.0.to_vec()
            }

            /// A short form for logs: the prefix and the first 8 hex digits.
            pub fn short(&self) -> String {
                format!("{}{}", $pub_prefix, hex::encode(&self.0[..4]))
            }
        }

        impl fmt::Display for $public {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $pub_prefix, hex::encode(self.0))
            }
        }

        impl fmt::Debug for $public {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($public), self.short())
            }
        }

        impl FromStr for $public {
            type Err = KeyParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s.trim(), $pub_prefix).map(Self)
            }
        }

        impl serde::Serialize for $public {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $public {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        $(#[$sec_doc])*
        #[derive(Clone)]
        pub struct $secret(x25519_dalek::StaticSecret);

        impl $secret {
            /// The text prefix of this key type.
            pub const PREFIX: &'static str = $sec_prefix;

            /// A new random key from the operating system's generator.
            pub fn generate() -> Self {
                Self(x25519_dalek::StaticSecret::random())
            }

            /// Wraps raw secret bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(x25519_dalek::StaticSecret::from(bytes))
            }

            /// The matching public key.
            pub fn public_key(&self) -> $public {
                $public(x25519_dalek::PublicKey::from(&self.0).to_bytes())
            }

            /// The raw secret bytes, wiped when dropped.
            pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
                Zeroizing::new(self.0.to_bytes())
            }

            /// The text form for storage on disk, wiped when dropped.
            pub fn to_text(&self) -> Zeroizing<String> {
                let bytes = self.to_bytes();
                Zeroizing::new(format!("{}{}", $sec_prefix, hex::encode(&bytes[..])))
            }

            /// Parses the text form written by [`Self::to_text`].
            pub fn from_text(s: &str) -> Result<Self, KeyParseError> {
                let bytes = Zeroizing::new(parse_hex32(s.trim(), $sec_prefix)?);
                Ok(Self::from_bytes(*bytes))
            }

            /// The underlying X25519 secret, for the crypto that needs it.
            pub fn as_x25519(&self) -> &x25519_dalek::StaticSecret {
                &self.0
            }
        }

        impl fmt::Debug for $secret {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($secret), "(..)"))
            }
        }
    };
}

key_pair!(
    /// A node's WireGuard public key; it identifies the node everywhere.
    NodePublicKey, "nodekey:",
    /// A node's WireGuard private key.
    NodeSecretKey, "privkey:"
);

key_pair!(
    /// A node's disco public key, used to seal path-discovery messages.
    DiscoPublicKey, "discokey:",
    /// A node's disco private key.
    DiscoSecretKey, "discopriv:"
);

key_pair!(
    /// The control server's public key, to which nodes seal their proofs.
    ControlPublicKey, "controlkey:",
    /// The control server's private key.
    ControlSecretKey, "controlpriv:"
);

key_pair!(
    /// A DERP relay server's public key. On the wire it is a plain 32-byte X25519 key, exactly
    /// like Tailscale's `derper` key (which is a node key there); warren gives it its own type so
    /// a relay's key can never be confused with a node's.
    DerpPublicKey, "derpkey:",
    /// A DERP relay server's private key.
    DerpSecretKey, "derppriv:"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let sk = NodeSecretKey::generate();
        let pk = sk.public_key();
        let text = pk.to_string();
        assert!(text.starts_with("nodekey:"));
        assert_eq!(text.len(), 8 + 64);
        assert_eq!(text.parse::<NodePublicKey>(), Ok(pk));
        let again = NodeSecretKey::from_text(&sk.to_text()).expect("parses");
        assert_eq!(again.public_key(), pk);
    }

    #[test]
    fn wrong_role_prefix_is_refused() {
        let pk = DiscoSecretKey::generate().public_key();
        assert_eq!(
            pk.to_string().parse::<NodePublicKey>(),
            Err(KeyParseError::WrongPrefix {
                expected: "nodekey:"
            })
        );
        assert_eq!(
            "nodekey:zz".parse::<NodePublicKey>(),
            Err(KeyParseError::BadHex)
        );
        assert_eq!(
            NodePublicKey::from_slice(&[0; 31]),
            Err(KeyParseError::BadLength { len: 31 })
        );
    }

    #[test]
    fn secrets_never_print() {
        let sk = NodeSecretKey::generate();
        let printed = format!("{sk:?}");
        assert_eq!(printed, "NodeSecretKey(..)");
    }

    #[test]
    fn serde_uses_text_form() {
        let pk = NodeSecretKey::generate().public_key();
        let json = serde_json::to_string(&pk).expect("serializes");
        assert_eq!(json, format!("\"{pk}\""));
        let back: NodePublicKey = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, pk);
    }
}
