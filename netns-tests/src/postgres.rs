//! A throwaway PostgreSQL server for tests and the load generator: Debian's `postgresql`
//! package, `initdb` and `pg_ctl` in a temporary directory (under `/var/tmp`, which the
//! server's `postgres` account can reach when `/tmp` is private), listening only on a unix socket in
//! that directory (no TCP port, so nothing outside can reach it and nothing collides). Stopped
//! and removed when dropped, also when a test panics.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The port number that names the socket (`.s.PGSQL.5432`); no TCP port is opened.
pub const PORT: u16 = 5432;
/// The database user the server is initialised with (trust authentication on the socket).
pub const USER: &str = "warren";
/// The database created for warren.
pub const DATABASE: &str = "warren";

/// Where Debian installs the server's programs: the newest `/usr/lib/postgresql/N/bin`, or
/// `initdb` on `PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    if let Some((_, bin)) = dirs.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    owner: Option<(u32, u32)>,
    _dir: tempfile::TempDir,
}

/// The `postgres` account's uid and gid: the server refuses to run as root.
fn postgres_account() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres") && f.len() > 3)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .context("no postgres account (install Debian's postgresql package)")
}

/// This process's effective uid.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

impl PgServer {
    /// Initialises and starts a server; `fsync = false` makes it fast and unsafe on power loss
    /// (right for tests).
    pub fn start(fsync: bool) -> Result<Self> {
        let bin = bin_dir().context(
            "PostgreSQL's initdb not found: install Debian's postgresql package (scripts/test does)",
        )?;
        // The server runs as `postgres`, which must reach its directory: /tmp may be private.
        let base = ["/var/tmp", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| {
                std::fs::metadata(d)
                    .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o001 != 0)
            })
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("warren-pg-")
            .tempdir_in(&base)
            .context("temp dir")?;
        let root = effective_uid() == Some(0);
        let owner = if root {
            Some(postgres_account()?)
        } else {
            None
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).context("chown")?;
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let server = Self {
            data: dir.path().join("data"),
            socket_dir: dir.path().to_path_buf(),
            bin,
            owner,
            _dir: dir,
        };
        server
            .run(
                "initdb",
                &[
                    "-D",
                    &server.data.to_string_lossy(),
                    "-U",
                    USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            )
            .context("initdb")?;
        let options = format!(
            "-k {} -p {PORT} -c listen_addresses='' -c max_connections=300 \
             -c synchronous_commit=off -c fsync={}",
            server.socket_dir.display(),
            if fsync { "on" } else { "off" }
        );
        server
            .run(
                "pg_ctl",
                &[
                    "-D",
                    &server.data.to_string_lossy(),
                    "-o",
                    &options,
                    "-l",
                    &server.socket_dir.join("server.log").to_string_lossy(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )
            .with_context(|| format!("pg_ctl start; log:\n{}", server.log()))?;
        server
            .run(
                "createdb",
                &[
                    "-h",
                    &server.socket_dir.to_string_lossy(),
                    "-p",
                    &PORT.to_string(),
                    "-U",
                    USER,
                    DATABASE,
                ],
            )
            .context("createdb")?;
        Ok(server)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().with_context(|| format!("run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Creates another empty database on this server (tests that each want their own).
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.run(
            "createdb",
            &[
                "-h",
                &self.socket_dir.to_string_lossy(),
                "-p",
                &PORT.to_string(),
                "-U",
                USER,
                name,
            ],
        )
    }

    /// Runs one SQL statement with `psql` in `database` (to arrange what a test needs).
    pub fn psql(&self, database: &str, sql: &str) -> Result<()> {
        self.run(
            "psql",
            &[
                "-h",
                &self.socket_dir.to_string_lossy(),
                "-p",
                &PORT.to_string(),
                "-U",
                USER,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )
    }

    /// The directory of the server's unix socket: `database.postgres.host`.
    pub fn host(&self) -> &Path {
        &self.socket_dir
    }

    /// The `[database]` section of a `warren-control` configuration using this server.
    pub fn config_toml(&self) -> String {
        format!(
            "[database]\ntype = \"postgres\"\n[database.postgres]\nhost = \"{}\"\nport = {PORT}\n\
             name = \"{DATABASE}\"\nuser = \"{USER}\"\nmax_open_conns = 8\n",
            self.socket_dir.display()
        )
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.socket_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        if let Err(e) = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]) {
            eprintln!("stopping the test PostgreSQL server: {e:#}");
        }
    }
}
