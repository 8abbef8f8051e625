//! Finding the real built binaries, and deciding whether the lab can run at all.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Paths of the binaries a lab runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The node daemon and CLI, `warren`.
    pub warren: PathBuf,
    /// The control server and admin CLI, `warren-control`.
    pub control: PathBuf,
    /// The traffic tool, `warren-labtool`.
    pub labtool: PathBuf,
    /// The standalone relay, `warren-derp` (NAT labs run a second STUN server with it); not
    /// checked for existence until used.
    pub derp: PathBuf,
}

/// The directory holding the built binaries: `$WARREN_BIN_DIR` if set, else the cargo target
/// profile directory of the running test executable (`target/debug/deps/x` -> `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WARREN_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locate the current executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir
            .parent()
            .with_context(|| format!("{} has no parent directory", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "binary `{name}` not found at {}: run `cargo build --bins` (the whole workspace) \
             first, or point WARREN_BIN_DIR at the directory holding it",
            path.display()
        );
    }
    Ok(path)
}

/// Locates `warren`, `warren-control` and `warren-labtool` in [`bin_dir`].
pub fn binaries() -> Result<Binaries> {
    let dir = bin_dir()?;
    Ok(Binaries {
        warren: find(&dir, "warren")?,
        control: find(&dir, "warren-control")?,
        labtool: find(&dir, "warren-labtool")?,
        derp: dir.join("warren-derp"),
    })
}

/// Like [`binaries`], with the labtool given explicitly: integration tests of this crate pass
/// `env!("CARGO_BIN_EXE_warren-labtool")`, which cargo always builds for them.
pub fn binaries_with_labtool(labtool: impl Into<PathBuf>) -> Result<Binaries> {
    let dir = bin_dir()?;
    let labtool = labtool.into();
    if !labtool.is_file() {
        bail!("warren-labtool not found at {}", labtool.display());
    }
    Ok(Binaries {
        warren: find(&dir, "warren")?,
        control: find(&dir, "warren-control")?,
        labtool,
        derp: dir.join("warren-derp"),
    })
}

/// True when running as root (uid 0), which namespaces need. Otherwise prints a line saying the
/// netns tests are skipped and returns false; tests then return early. With
/// `WARREN_NETNS_REQUIRED=1` (scripts/test sets it) a missing root panics instead, so a run
/// that was meant to exercise the lab cannot pass without doing so.
pub fn require_root() -> bool {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(str::to_owned))
        });
    match uid.as_deref() {
        Some("0") => true,
        other => {
            let why = format!(
                "netns tests need root to create network namespaces (effective uid {}); \
                 run them as root, e.g. via scripts/test",
                other.unwrap_or("unknown")
            );
            assert!(
                std::env::var_os("WARREN_NETNS_REQUIRED").is_none_or(|v| v == "0"),
                "{why}"
            );
            eprintln!("skipping: {why}");
            false
        }
    }
}
