//! The node's state directory: its node and disco keys, created once with mode 0600 and kept
//! across restarts, so the node keeps its identity (and control gives it the same addresses).
//!
//! The directory is the node's trust boundary: the keys and the local API socket live in it,
//! so it must belong to this user and be closed to everyone else. A directory others can
//! read is closed (0700) with a warning; one others can write to, or that belongs to someone
//! else, is refused, because files planted there (a key, a link) cannot be trusted.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
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

/// Why a state directory or a key file in it is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The path exists and is not a directory.
    #[error("state dir {} is not a directory", path.display())]
    NotADirectory {
        /// The state directory.
        path: PathBuf,
    },
    /// The directory (or a key file) belongs to another user.
    #[error(
        "{} belongs to uid {owner}, not to this user (uid {me}): refusing to keep keys there",
        path.display()
    )]
    NotOwned {
        /// The directory or file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Others may write to the directory, so its files cannot be trusted.
    #[error(
        "state dir {} is writable by others (mode {mode:04o}): refusing to keep keys there; \
         use a private directory (0700)",
        path.display()
    )]
    WritableByOthers {
        /// The state directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file is a symbolic link or not a regular file.
    #[error("key file {} is not a regular file", path.display())]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
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

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The local API socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("warren.sock")
    }

    /// Creates the directory (0700) or checks an existing one (see the module doc), then loads
    /// the keys, creating any missing key (0600, written atomically).
    pub fn load_or_create_keys(&self) -> anyhow::Result<Keys> {
        self.prepare()?;
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

    /// Makes sure the directory exists, belongs to this user and is closed to others.
    pub fn prepare(&self) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating state dir {}", self.root.display()))?;
        let meta = std::fs::metadata(&self.root)
            .with_context(|| format!("reading state dir {}", self.root.display()))?;
        if !meta.is_dir() {
            return Err(StateError::NotADirectory {
                path: self.root.clone(),
            }
            .into());
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(StateError::NotOwned {
                path: self.root.clone(),
                owner: meta.uid(),
                me,
            }
            .into());
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(StateError::WritableByOthers {
                path: self.root.clone(),
                mode,
            }
            .into());
        }
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("closing state dir {}", self.root.display()))?;
            tracing::warn!(
                dir = %self.root.display(),
                was = format_args!("{mode:04o}"),
                "state dir was open to other users; closed it (0700)"
            );
        }
        Ok(())
    }
}

fn load_or_create<K, E: std::error::Error + Send + Sync + 'static>(
    path: &Path,
    generate: impl Fn() -> K,
    to_text: impl Fn(&K) -> zeroize::Zeroizing<String>,
    from_text: impl Fn(&str) -> Result<K, E>,
) -> anyhow::Result<K> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            check_key_file(path, &meta)?;
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
            from_text(&text).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate();
            write_new_private(path, to_text(&key).as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A key file must be a regular file of ours; one others can read is closed with a warning
/// (the key may have leaked already: say so).
fn check_key_file(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    if !meta.file_type().is_file() {
        return Err(StateError::NotAFile {
            path: path.to_owned(),
        }
        .into());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateError::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        }
        .into());
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("closing {}", path.display()))?;
        tracing::warn!(
            file = %path.display(),
            was = format_args!("{mode:04o}"),
            "key file was readable by other users (consider the key leaked); closed it (0600)"
        );
    }
    Ok(())
}

/// Writes `bytes` to a new file at `path` (mode 0600) atomically: a temporary file in the same
/// directory, synced, then linked into place only if `path` still does not exist, so a crash
/// never leaves a half-written key and an existing key is never replaced.
fn write_new_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    // tempfile creates the file with mode 0600 and O_EXCL.
    let mut tmp = tempfile::Builder::new()
        .prefix(".key-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary key file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path)
        .map_err(|e| e.error)
        .with_context(|| format!("creating {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("meta").permissions().mode() & 0o7777
    }

    fn state_error(e: &anyhow::Error) -> &StateError {
        e.downcast_ref::<StateError>()
            .unwrap_or_else(|| panic!("not a StateError: {e:#}"))
    }

    #[test]
    fn keys_are_created_once_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("s"));
        let a = state.load_or_create_keys().expect("create");
        let b = state.load_or_create_keys().expect("load");
        assert_eq!(a.node.public_key(), b.node.public_key());
        assert_eq!(a.disco.public_key(), b.disco.public_key());
        assert_eq!(mode(&dir.path().join("s/node.key")), 0o600);
        assert_eq!(mode(&dir.path().join("s/disco.key")), 0o600);
        assert_eq!(mode(&dir.path().join("s")), 0o700);
        // Nothing but the two keys: no temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("s"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["disco.key", "node.key"]);
    }

    #[test]
    fn a_readable_existing_dir_is_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("s");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        StateDir::new(&root).load_or_create_keys().expect("keys");
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn a_dir_others_can_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("s");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = StateDir::new(&root)
            .load_or_create_keys()
            .expect_err("refused");
        assert_eq!(
            state_error(&err),
            &StateError::WritableByOthers {
                path: root.clone(),
                mode: 0o777
            }
        );
        // Refused before anything was written into it.
        assert_eq!(std::fs::read_dir(&root).expect("list").count(), 0);
    }

    #[test]
    fn a_key_file_others_can_read_is_closed_and_a_link_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("s");
        let state = StateDir::new(&root);
        let first = state.load_or_create_keys().expect("create");
        let key = root.join("node.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let again = state.load_or_create_keys().expect("load");
        assert_eq!(first.node.public_key(), again.node.public_key());
        assert_eq!(mode(&key), 0o600);

        // A link planted where a key belongs is not followed.
        std::fs::remove_file(root.join("disco.key")).expect("rm");
        std::os::unix::fs::symlink(&key, root.join("disco.key")).expect("symlink");
        let err = state.load_or_create_keys().expect_err("refused");
        assert_eq!(
            state_error(&err),
            &StateError::NotAFile {
                path: root.join("disco.key")
            }
        );
    }

    #[test]
    fn a_new_key_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        write_new_private(&path, b"first").expect("write");
        let err = write_new_private(&path, b"second").expect_err("exists");
        assert_eq!(
            err.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::AlreadyExists),
            "{err:#}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
        assert_eq!(mode(&path), 0o600);
    }
}
