//! Pre-auth keys and API keys: random secrets shown once, stored only as a SHA-256 hash under a
//! public prefix used to find them. The text form is `warren-<kind>-<prefix>-<secret>`.

use sha2::{Digest, Sha256};

/// What kind of secret a text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A pre-auth key, for registering nodes.
    Auth,
    /// An API key, for the admin API.
    Api,
}

impl SecretKind {
    fn label(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Api => "api",
        }
    }
}

/// A secret's text did not have the expected form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed key: expected warren-{expected}-<12 hex>-<48 hex>")]
pub struct MalformedSecret {
    /// The kind's label.
    pub expected: &'static str,
}

/// A freshly made secret.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The full text, shown to the operator once.
    pub text: String,
    /// The public lookup prefix.
    pub prefix: String,
    /// What the store keeps.
    pub hash: [u8; 32],
}

/// A secret's text, split into what the store looks up and compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The public lookup prefix.
    pub prefix: String,
    /// SHA-256 of the secret part.
    pub hash: [u8; 32],
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Makes a secret of `kind` from 30 random bytes.
pub fn issue(kind: SecretKind, random: [u8; 30]) -> Issued {
    let prefix = hex::encode(&random[..6]);
    let secret = hex::encode(&random[6..]);
    Issued {
        text: format!("warren-{}-{prefix}-{secret}", kind.label()),
        hash: hash(&secret),
        prefix,
    }
}

/// Reads a presented secret of `kind`.
pub fn parse(kind: SecretKind, text: &str) -> Result<Presented, MalformedSecret> {
    let err = MalformedSecret {
        expected: kind.label(),
    };
    let rest = text.trim().strip_prefix("warren-").ok_or(err)?;
    let rest = rest
        .strip_prefix(kind.label())
        .and_then(|r| r.strip_prefix('-'))
        .ok_or(err)?;
    let (prefix, secret) = rest.split_once('-').ok_or(err)?;
    let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex(prefix, 12) || !is_hex(secret, 48) {
        return Err(err);
    }
    Ok(Presented {
        prefix: prefix.to_ascii_lowercase(),
        hash: hash(&secret.to_ascii_lowercase()),
    })
}

/// Compares two hashes in constant time.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_then_parse_matches() {
        let i = issue(SecretKind::Auth, [0xab; 30]);
        assert!(i.text.starts_with("warren-auth-abababababab-"));
        let p = parse(SecretKind::Auth, &i.text).expect("parses");
        assert_eq!(p.prefix, i.prefix);
        assert!(same_hash(&p.hash, &i.hash));
    }

    #[test]
    fn wrong_kind_or_shape_is_malformed() {
        let i = issue(SecretKind::Api, [1; 30]);
        assert!(parse(SecretKind::Auth, &i.text).is_err());
        assert!(parse(SecretKind::Api, "warren-api-zz-zz").is_err());
        assert!(parse(SecretKind::Api, "").is_err());
        assert!(parse(SecretKind::Api, &i.text[..i.text.len() - 1]).is_err());
    }
}
