//! The node's state directory: its node and disco keys, created once with mode 0600 and kept
//! across restarts, so the node keeps its identity (and control gives it the same addresses).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use warren_proto::{DiscoSecretKey, NodeSecretKey};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/warren";

/// The keys a node keeps.
#[derive(Debug)]
pub struct Keys {
    /// WireGuard identity.
    pub node: NodeSecretKey,
    /// Disco identity.
    pub disco: DiscoSecretKey,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The local API socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("warren.sock")
    }

    /// Loads the keys, creating the directory (0700) and any missing key (0600).
    pub fn load_or_create_keys(&self) -> anyhow::Result<Keys> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating state dir {}", self.root.display()))?;
        let node = load_or_create(
            &self.root.join("node.key"),
            NodeSecretKey::generate,
            |k| k.to_text(),
            NodeSecretKey::from_text,
        )?;
        let disco = load_or_create(
            &self.root.join("disco.key"),
            DiscoSecretKey::generate,
            |k| k.to_text(),
            DiscoSecretKey::from_text,
        )?;
        Ok(Keys { node, disco })
    }
}

fn load_or_create<K, E: std::error::Error + Send + Sync + 'static>(
    path: &Path,
    generate: impl Fn() -> K,
    to_text: impl Fn(&K) -> zeroize::Zeroizing<String>,
    from_text: impl Fn(&str) -> Result<K, E>,
) -> anyhow::Result<K> {
    match std::fs::read_to_string(path) {
        Ok(text) => from_text(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(to_text(&key).as_bytes())?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_created_once_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("s"));
        let a = state.load_or_create_keys().expect("create");
        let b = state.load_or_create_keys().expect("load");
        assert_eq!(a.node.public_key(), b.node.public_key());
        assert_eq!(a.disco.public_key(), b.disco.public_key());
        let mode = std::fs::metadata(dir.path().join("s/node.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
