//! Points the host's resolver at MagicDNS (100.100.100.100) while the node runs and puts it
//! back afterwards, so apps resolve peer names without configuration. Modelled on tailscaled's
//! `net/dns/manager_linux.go`, with its two common modes:
//!
//! - **systemd-resolved** (`/etc/resolv.conf` links to `/run/systemd/resolve/stub-resolv.conf`
//!   or `resolv.conf`, or names the stub `127.0.0.53`): per-link settings on the TUN device
//!   with `resolvectl`. With global nameservers the link takes every name (`~.`); without,
//!   only the tailnet's names, split DNS domains and the reverse zones of the tailnet ranges,
//!   and the host's own DNS keeps everything else. `resolvectl revert` undoes it (and
//!   systemd-resolved forgets the link by itself when the device goes away after a crash).
//! - **direct**: `/etc/resolv.conf` is copied to a backup in the node's state directory, then
//!   rewritten to name only the magic address. The backup makes a crash recoverable:
//!   [`OsResolver::recover`] at the next start puts the original back.
//!
//! `/etc/resolv.conf` is always rewritten in place (open, truncate, write, fsync), never
//! replaced by rename and never created or removed: inside `ip netns exec` it is a bind mount
//! of `/etc/netns/NAME/resolv.conf`, and a rename over a mount point fails with EBUSY.
//!
//! In direct mode the host's original nameservers are no longer asked directly: when the
//! netmap names no global nameservers, the node should forward to
//! [`OsResolver::base_nameservers`] instead, as tailscaled does with the "OS base config".

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use warren_node_core::dns::{DNS_PORT, DnsSettings, MAGIC_DNS_V4, MAGIC_DNS_V6};

/// Where the host's resolver configuration lives.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Name of the backup of the original resolv.conf in the state directory.
pub const BACKUP_FILE_NAME: &str = "resolv.conf.pre-warren";
/// The first line of a resolv.conf we wrote starts with this, so a later run recognises it.
pub const MARKER: &str = "# written by warren";

/// The files the direct mode touches; tests point them at temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverPaths {
    /// The host's resolver configuration (default [`DEFAULT_RESOLV_CONF`]).
    pub resolv_conf: PathBuf,
    /// The backup of the original, in the node's state directory so a crash can be undone.
    pub backup: PathBuf,
}

impl ResolverPaths {
    /// `/etc/resolv.conf`, backed up to [`BACKUP_FILE_NAME`] in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        ResolverPaths {
            resolv_conf: PathBuf::from(DEFAULT_RESOLV_CONF),
            backup: state_dir.join(BACKUP_FILE_NAME),
        }
    }
}

/// What the OS resolver is told: the names the node resolves and whether it takes all DNS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolverSettings {
    /// The MagicDNS suffix (`mesh.example`), also the first search domain.
    pub base_domain: String,
    /// More search domains, after `base_domain`.
    pub search_domains: Vec<String>,
    /// Split DNS domains: routed to the node in systemd-resolved mode, since it forwards them.
    pub split_domains: Vec<String>,
    /// The netmap has global nameservers, so the node takes every name (resolved's `~.`).
    /// Direct mode always sends every name to the node.
    pub route_all: bool,
}

impl ResolverSettings {
    /// The OS view of the resolver's settings: every name goes to the node when it has global
    /// upstreams.
    pub fn from_dns(s: &DnsSettings) -> Self {
        ResolverSettings {
            base_domain: s.base_domain.clone(),
            search_domains: s.search_domains.clone(),
            split_domains: s.split.iter().map(|(d, _)| d.clone()).collect(),
            route_all: !s.upstreams.is_empty(),
        }
    }
}

/// How the host's resolver is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// resolv.conf is ours to rewrite (after a backup).
    Direct,
    /// systemd-resolved owns resolv.conf; the node configures its link with `resolvectl`.
    SystemdResolved,
}

/// Why the OS resolver could not be configured or put back. Every variant names the file or
/// the command.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The backup could not be removed after the original was restored.
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// `resolvectl` could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// What the OS said.
        source: io::Error,
    },
    /// `resolvectl` failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Resolvectl {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The host resolver, pointed at the node. Undo it with [`OsResolver::restore`]; if the value
/// is dropped instead (an early return, a panic that unwinds), `Drop` restores as a best
/// effort and logs failures. A crash or `mem::forget` skips both, which
/// [`OsResolver::recover`] repairs at the next start.
#[derive(Debug)]
#[must_use = "dropping an OsResolver restores the host's resolver at once"]
pub struct OsResolver {
    paths: ResolverPaths,
    tun: String,
    mode: Mode,
    base_nameservers: Vec<SocketAddr>,
    /// Not yet restored.
    active: bool,
}

impl OsResolver {
    /// Points the host's resolver at the magic address for the TUN device `tun`. Call
    /// [`OsResolver::recover`] first at startup. Blocking (file writes, `resolvectl`).
    pub fn apply(
        path_config: &ResolverPaths,
        tun: &str,
        settings: &ResolverSettings,
    ) -> Result<OsResolver, ResolverError> {
        let mode = detect_mode(&path_config.resolv_conf)?;
        let mut me = OsResolver {
            paths: path_config.clone(),
            tun: tun.to_owned(),
            mode,
            base_nameservers: Vec::new(),
            active: false,
        };
        match mode {
            Mode::Direct => {
                let current = read(&path_config.resolv_conf)?;
                let original = if is_ours(&current) {
                    // Ours from a run that crashed: the real original is in the backup, which
                    // must not be overwritten with our own file.
                    match fs::read(&path_config.backup) {
                        Ok(b) => b,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            tracing::warn!(
                                path = %path_config.resolv_conf.display(),
                                "resolv.conf was written by warren but has no backup; it cannot be restored"
                            );
                            Vec::new()
                        }
                        Err(source) => {
                            return Err(ResolverError::Read {
                                path: path_config.backup.clone(),
                                source,
                            });
                        }
                    }
                } else {
                    write_backup(&path_config.backup, &current)?;
                    current
                };
                me.base_nameservers = nameservers(&String::from_utf8_lossy(&original));
                me.active = true;
                write_in_place(
                    &path_config.resolv_conf,
                    direct_contents(&path_config.backup, settings).as_bytes(),
                )?;
            }
            Mode::SystemdResolved => {
                me.active = true;
                run_resolvectl(tun, settings)?;
            }
        }
        tracing::info!(?mode, tun, "host resolver points at MagicDNS");
        Ok(me)
    }

    /// Rewrites the configuration for new settings (a netmap changed the domains). The backup
    /// is left alone.
    pub fn update(&mut self, settings: &ResolverSettings) -> Result<(), ResolverError> {
        match self.mode {
            Mode::Direct => write_in_place(
                &self.paths.resolv_conf,
                direct_contents(&self.paths.backup, settings).as_bytes(),
            ),
            Mode::SystemdResolved => run_resolvectl(&self.tun, settings),
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The nameservers of the original resolv.conf (direct mode; empty with
    /// systemd-resolved, which keeps answering other names itself), without the magic
    /// addresses. The node's upstreams when the netmap has no global nameservers.
    pub fn base_nameservers(&self) -> &[SocketAddr] {
        &self.base_nameservers
    }

    /// Puts the host's resolver back: the backup is written over resolv.conf (only if
    /// resolv.conf is still ours: a file someone rewrote meanwhile is left alone) and
    /// removed, or `resolvectl revert` runs.
    pub fn restore(mut self) -> Result<(), ResolverError> {
        self.restore_inner()
    }

    /// At startup: puts back a backup a crashed run left. Returns whether resolv.conf was
    /// restored. A backup next to a resolv.conf that is not ours (someone rewrote it since)
    /// is stale and only removed.
    pub fn recover(paths: &ResolverPaths) -> Result<bool, ResolverError> {
        let backup = match fs::read(&paths.backup) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ResolverError::Read {
                    path: paths.backup.clone(),
                    source,
                });
            }
        };
        let current = read(&paths.resolv_conf)?;
        // Empty: the crash came between truncating and writing.
        let restored = is_ours(&current) || current.is_empty();
        if restored {
            write_in_place(&paths.resolv_conf, &backup)?;
            tracing::info!(path = %paths.resolv_conf.display(), "restored resolv.conf left by a crashed run");
        } else {
            tracing::info!(path = %paths.backup.display(), "removing a stale resolv.conf backup");
        }
        remove(&paths.backup)?;
        Ok(restored)
    }

    fn restore_inner(&mut self) -> Result<(), ResolverError> {
        if !self.active {
            return Ok(());
        }
        self.active = false;
        match self.mode {
            Mode::Direct => {
                let backup = match fs::read(&self.paths.backup) {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        tracing::warn!(path = %self.paths.backup.display(), "no resolv.conf backup to restore");
                        return Ok(());
                    }
                    Err(source) => {
                        return Err(ResolverError::Read {
                            path: self.paths.backup.clone(),
                            source,
                        });
                    }
                };
                let current = read(&self.paths.resolv_conf)?;
                if is_ours(&current) || current.is_empty() {
                    write_in_place(&self.paths.resolv_conf, &backup)?;
                } else {
                    tracing::warn!(
                        path = %self.paths.resolv_conf.display(),
                        "resolv.conf was rewritten by someone else while the node ran; leaving it"
                    );
                }
                remove(&self.paths.backup)
            }
            Mode::SystemdResolved => run(&["revert", &self.tun]),
        }
    }
}

impl Drop for OsResolver {
    fn drop(&mut self) {
        if let Err(e) = self.restore_inner() {
            tracing::warn!(error = %e, "could not restore the host resolver");
        }
    }
}

/// Which mode `resolv_conf` calls for: systemd-resolved when it links into
/// `/run/systemd/resolve/` or names the stub 127.0.0.53, else direct.
pub fn detect_mode(resolv_conf: &Path) -> Result<Mode, ResolverError> {
    if let Ok(target) = fs::read_link(resolv_conf) {
        let target = target.to_string_lossy().into_owned();
        if target.ends_with("run/systemd/resolve/stub-resolv.conf")
            || target.ends_with("run/systemd/resolve/resolv.conf")
        {
            return Ok(Mode::SystemdResolved);
        }
    }
    let contents = read(resolv_conf)?;
    if is_ours(&contents) {
        return Ok(Mode::Direct);
    }
    let stub: SocketAddr = SocketAddr::new(IpAddr::from([127, 0, 0, 53]), DNS_PORT);
    if nameservers(&String::from_utf8_lossy(&contents)).contains(&stub) {
        return Ok(Mode::SystemdResolved);
    }
    Ok(Mode::Direct)
}

/// The resolv.conf direct mode writes.
pub fn direct_contents(backup: &Path, settings: &ResolverSettings) -> String {
    let mut out = format!(
        "{MARKER}; original at {}\nnameserver {MAGIC_DNS_V4}\n",
        backup.display()
    );
    let search = search_list(settings);
    if !search.is_empty() {
        out.push_str("search ");
        out.push_str(&search.join(" "));
        out.push('\n');
    }
    out
}

/// The `resolvectl` argument lists (without the program name) that configure link `tun`.
pub fn resolvectl_commands(tun: &str, settings: &ResolverSettings) -> Vec<Vec<String>> {
    let mut domain = vec!["domain".to_owned(), tun.to_owned()];
    if settings.route_all {
        domain.push("~.".to_owned());
        domain.extend(search_list(settings));
    } else {
        // Without global nameservers the node cannot answer other names, so only search
        // domains it can resolve are searched here (they also route to this link).
        let base = normalize(&settings.base_domain);
        let servable = |d: &str| {
            in_domain(d, &base)
                || settings
                    .split_domains
                    .iter()
                    .any(|s| in_domain(d, &normalize(s)))
        };
        domain.extend(search_list(settings).into_iter().filter(|d| servable(d)));
        let mut routes: Vec<String> = settings
            .split_domains
            .iter()
            .map(|d| normalize(d))
            .filter(|d| !d.is_empty())
            .collect();
        routes.extend((64..=127).map(|n| format!("{n}.100.in-addr.arpa")));
        routes.push("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa".to_owned());
        for r in routes {
            let r = format!("~{r}");
            if !domain.contains(&r) {
                domain.push(r);
            }
        }
    }
    vec![
        vec!["dns".to_owned(), tun.to_owned(), MAGIC_DNS_V4.to_string()],
        domain,
        vec![
            "default-route".to_owned(),
            tun.to_owned(),
            if settings.route_all { "true" } else { "false" }.to_owned(),
        ],
    ]
}

/// base_domain, then the search domains, normalised and without repeats.
fn search_list(settings: &ResolverSettings) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in std::iter::once(&settings.base_domain).chain(&settings.search_domains) {
        let d = normalize(d);
        if !d.is_empty() && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

fn normalize(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// `name` is `domain` or under it.
fn in_domain(name: &str, domain: &str) -> bool {
    !domain.is_empty()
        && (name == domain || name.strip_suffix(domain).is_some_and(|p| p.ends_with('.')))
}

/// The `nameserver` addresses of a resolv.conf, without the magic ones (port 53; scoped IPv6
/// addresses, which a UDP socket address cannot name here, are skipped).
pub fn nameservers(contents: &str) -> Vec<SocketAddr> {
    contents
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|w| w.parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(MAGIC_DNS_V4) && *ip != IpAddr::V6(MAGIC_DNS_V6))
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .collect()
}

fn is_ours(contents: &[u8]) -> bool {
    contents.starts_with(MARKER.as_bytes())
}

fn read(path: &Path) -> Result<Vec<u8>, ResolverError> {
    fs::read(path).map_err(|source| ResolverError::Read {
        path: path.to_owned(),
        source,
    })
}

fn remove(path: &Path) -> Result<(), ResolverError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ResolverError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Overwrites an existing file in place (it may be a bind mount: no rename) and syncs it. The
/// file is never created.
fn write_in_place(path: &Path, contents: &[u8]) -> Result<(), ResolverError> {
    let err = |source| ResolverError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Writes the backup atomically (a temporary file renamed over it, then the directory
/// synced), so a crash leaves either no backup or a whole one.
fn write_backup(path: &Path, contents: &[u8]) -> Result<(), ResolverError> {
    let err = |source| ResolverError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(contents).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// Configures link `tun` with `resolvectl`. `default-route` is best effort: systemd before
/// 240 lacks it, and the domains already do the routing there.
fn run_resolvectl(tun: &str, settings: &ResolverSettings) -> Result<(), ResolverError> {
    for args in resolvectl_commands(tun, settings) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match run(&args) {
            Ok(()) => {}
            Err(e) if args.first() == Some(&"default-route") => {
                tracing::warn!(error = %e, "resolvectl default-route failed");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn run(args: &[&str]) -> Result<(), ResolverError> {
    let command = format!("resolvectl {}", args.join(" "));
    let out = Command::new("resolvectl")
        .args(args)
        .output()
        .map_err(|source| ResolverError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ResolverError::Resolvectl {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
