//! Driving the real `warren-control` and `warren` binaries inside a [`Lab`].
//!
//! [`Mesh::start`] builds the usual topology: one LAN `10.77.0.0/24`, control at `10.77.0.1`,
//! nodes at `10.77.0.11`, `.12`, … each in its own namespace with TUN `warren0`.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::binaries::Binaries;
use crate::lab::{Lab, Lan};
use crate::process::ProcHandle;
use crate::traffic::TransferReport;
use crate::wait::wait_until;

/// How long a control server or node gets to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

/// A control server process and the files it owns.
#[derive(Debug)]
pub struct Control {
    /// Namespace it runs in.
    pub ns: String,
    /// Its LAN address; it listens on port [`Control::PORT`] there.
    pub addr: Ipv4Addr,
    /// The URL nodes are given: `http://ADDR:PORT`.
    pub url: String,
    /// Its config file.
    pub config: PathBuf,
    /// Its admin unix socket.
    pub socket: PathBuf,
    /// Its SQLite database.
    pub db: PathBuf,
    /// The policy file, in file mode ([`PolicySource::File`] or [`PolicySource::FileAt`]).
    pub policy_path: Option<PathBuf>,
    private_key: PathBuf,
    bins: Binaries,
    proc: Option<ProcHandle>,
}

/// Settings of the config [`Control::start_with`] writes; [`Default`] is what
/// [`Control::start`] uses.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// `ephemeral_node_inactivity_timeout`, e.g. `"30m"` or `"2s"`.
    pub ephemeral_node_inactivity_timeout: String,
    /// TOML appended to the config as is (further sections, e.g. `[derp]`).
    pub extra_toml: String,
    /// Where the access policy comes from (a `[policy]` section), if anywhere.
    pub policy: PolicySource,
    /// The body of the `[dns]` section (its lines, and any `[dns.*]` tables after them);
    /// `None` writes `magic_dns = true` and `base_domain = "warren.internal"`.
    pub dns_toml: Option<String>,
    /// The `[database]` section (and its sub-tables) instead of SQLite in the control's
    /// directory, e.g. [`crate::postgres::PgServer::config_toml`].
    pub database_toml: Option<String>,
    /// The server's private key file instead of one in the control's directory (instances on
    /// one database share it).
    pub private_key: Option<PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            ephemeral_node_inactivity_timeout: "30m".to_owned(),
            extra_toml: String::new(),
            policy: PolicySource::None,
            dns_toml: None,
            database_toml: None,
            private_key: None,
        }
    }
}

/// The `[policy]` section [`Control::start_with`] writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PolicySource {
    /// No `[policy]` section: no policy, everyone may reach everyone.
    #[default]
    None,
    /// `mode = "file"`: the policy file is `<control dir>/policy.hujson` ([`Control::policy_path`]),
    /// written with this text before the server starts.
    File(String),
    /// `mode = "file"` with a policy file the caller has prepared at this path (e.g. behind a
    /// symlink).
    FileAt(PathBuf),
    /// `mode = "database"`: the policy is set with `warren-control policy set`.
    Database,
}

/// How [`Control::write_policy`] changes the policy file, as different editors do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyEdit {
    /// Truncate and rewrite the file itself (same inode), like `echo > file` or vim's
    /// `backupcopy=yes`.
    InPlace,
    /// Write a temporary file next to it and rename it over the policy file (a new inode), like
    /// most editors and config-management tools.
    Rename,
}

/// A pre-auth key as `preauthkeys create` returned it.
#[derive(Debug, Clone)]
pub struct PreAuthKey {
    /// The full secret key, as given to `warren up --auth-key`.
    pub secret: String,
    /// Its public prefix, used by `preauthkeys expire`.
    pub prefix: String,
    /// The JSON object describing the key.
    pub info: Value,
}

/// One entry of `warren-control nodes list --output json`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node id, as `nodes delete` takes it.
    pub id: u64,
    /// Name given by control (unique in the tailnet).
    pub given_name: String,
    /// Hostname the node reported.
    pub hostname: String,
    /// Mesh addresses (prefix lengths dropped).
    pub addresses: Vec<IpAddr>,
    /// Whether control sees it connected.
    pub online: bool,
}

/// `warren status --json`.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// The node's own name.
    pub name: String,
    /// The node's own mesh addresses.
    pub addresses: Vec<IpAddr>,
    /// The node's public key.
    pub node_key: String,
    /// Whether the node currently has a connection to control.
    pub control_connected: bool,
    /// The peers in its netmap.
    pub peers: Vec<PeerStatus>,
    /// The UDP endpoints it reports to control (LAN and STUN-mapped), `ip:port`.
    pub endpoints: Vec<String>,
    /// Its home DERP region (0: none yet).
    pub home_region: u32,
    /// The routes it advertises (`self.advertised_routes`; empty when absent).
    pub advertised_routes: Vec<String>,
    /// Those of them control approved (`self.approved_routes`; empty when absent).
    pub approved_routes: Vec<String>,
    /// The name of the exit node in use (top-level `exit_node`; `None` when null or absent).
    pub exit_node: Option<String>,
    /// Names of the exit nodes offered to it (top-level `exit_nodes`; empty when absent).
    pub exit_nodes: Vec<String>,
    /// The whole JSON document, for fields this struct does not name and for messages.
    pub raw: Value,
}

/// One peer in [`NodeStatus`].
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Peer name.
    pub name: String,
    /// Peer mesh addresses.
    pub addresses: Vec<IpAddr>,
    /// Current endpoint (`ip:port`), if any.
    pub endpoint: Option<String>,
    /// Time of the last WireGuard handshake, Unix milliseconds.
    pub last_handshake_unix_ms: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Whether control reports it online.
    pub online: bool,
    /// The path in use: `direct IP:PORT` (confirmed), `trying IP:PORT, …[ + relay REGION]`,
    /// `relay REGION` or `unreachable`; a relay that is not connected ends in `(DERP down)`.
    pub path: Option<String>,
    /// Round trip of the direct path, microseconds.
    pub latency_us: Option<u64>,
    /// Packets from it that this node's packet filter dropped.
    pub filter_drops: u64,
    /// Its node key.
    pub node_key: String,
    /// The subnet routes it is the primary router for, as this node sees them
    /// (`primary_routes`; empty when absent).
    pub primary_routes: Vec<String>,
    /// Whether it is an exit node this node may use (`exit_node`; false when absent).
    pub exit_node: bool,
}

impl PeerStatus {
    /// True when the path is a direct UDP path.
    pub fn is_direct(&self) -> bool {
        self.path
            .as_deref()
            .is_some_and(|p| p.starts_with("direct"))
    }

    /// True when the path goes through a DERP relay whose connection is up (`relay R`, or
    /// `trying … + relay R` while unconfirmed addresses are tried beside it).
    pub fn is_relay(&self) -> bool {
        self.path
            .as_deref()
            .is_some_and(|p| relay_of(p).is_some() && !p.ends_with("(DERP down)"))
    }

    /// True when the path's relay is named but its DERP connection is down.
    pub fn is_relay_down(&self) -> bool {
        self.path
            .as_deref()
            .is_some_and(|p| relay_of(p).is_some() && p.ends_with("(DERP down)"))
    }
}

/// The relay region named in a status path (`relay 999`, `trying … + relay 999`, either
/// possibly followed by `(DERP down)`).
fn relay_of(path: &str) -> Option<u32> {
    let rest = path
        .strip_prefix("relay ")
        .or_else(|| path.split_once("+ relay ").map(|(_, r)| r))?;
    rest.split_whitespace().next()?.parse().ok()
}

impl NodeStatus {
    /// Parses the JSON `warren status --json` prints.
    pub fn parse(json: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(json)
            .with_context(|| format!("`warren status --json` printed non-JSON: {json:?}"))?;
        let me = &v["self"];
        let peers = match &v["peers"] {
            Value::Null => Vec::new(),
            Value::Array(a) => a.iter().map(PeerStatus::from_json).collect::<Result<_>>()?,
            other => bail!("`peers` is not an array: {other}"),
        };
        Ok(Self {
            name: str_field(me, "name")?,
            addresses: addrs_field(me, "addresses")?,
            node_key: me["node_key"].as_str().unwrap_or_default().to_owned(),
            control_connected: v["control_connected"]
                .as_bool()
                .context("no bool `control_connected` in status")?,
            peers,
            endpoints: me["endpoints"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            home_region: me["home_region"]
                .as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .unwrap_or(0),
            advertised_routes: strings_field(me, "advertised_routes")?,
            approved_routes: strings_field(me, "approved_routes")?,
            exit_node: match &v["exit_node"] {
                Value::Null => None,
                Value::String(s) if s.is_empty() => None,
                Value::String(s) => Some(s.clone()),
                other => bail!("`exit_node` is neither a string nor null: {other}"),
            },
            exit_nodes: strings_field(&v, "exit_nodes")?,
            raw: v.clone(),
        })
    }

    /// The peer named `name` (its status `name`, or that name's first DNS label), if any.
    pub fn peer_named(&self, name: &str) -> Option<&PeerStatus> {
        self.peers
            .iter()
            .find(|p| p.name == name || p.name.split('.').next() == Some(name))
    }

    /// The peer owning mesh address `addr`, if any.
    pub fn peer_with_addr(&self, addr: IpAddr) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.addresses.contains(&addr))
    }

    /// The first IPv4 mesh address.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        first_v4(&self.addresses)
    }
}

impl PeerStatus {
    fn from_json(v: &Value) -> Result<Self> {
        Ok(Self {
            name: str_field(v, "name")?,
            addresses: addrs_field(v, "addresses")?,
            endpoint: v["endpoint"].as_str().map(str::to_owned),
            last_handshake_unix_ms: v["last_handshake_unix_ms"].as_u64(),
            rx_bytes: v["rx_bytes"].as_u64().unwrap_or(0),
            tx_bytes: v["tx_bytes"].as_u64().unwrap_or(0),
            online: v["online"].as_bool().unwrap_or(false),
            path: v["path"].as_str().map(str::to_owned),
            latency_us: v["latency_us"].as_u64(),
            filter_drops: v["filter_drops"].as_u64().unwrap_or(0),
            node_key: v["node_key"].as_str().unwrap_or_default().to_owned(),
            primary_routes: strings_field(v, "primary_routes")?,
            exit_node: v["exit_node"].as_bool().unwrap_or(false),
        })
    }
}

impl NodeInfo {
    /// Parses `nodes list --output json` (an array of node objects).
    pub fn parse_list(json: &str) -> Result<Vec<Self>> {
        let v: Value = serde_json::from_str(json)
            .with_context(|| format!("`nodes list` printed non-JSON: {json:?}"))?;
        let list = match &v {
            Value::Array(a) => a,
            Value::Null => return Ok(Vec::new()),
            other => bail!("`nodes list` output is not an array: {other}"),
        };
        list.iter()
            .map(|n| {
                Ok(Self {
                    id: n["id"].as_u64().context("node without numeric `id`")?,
                    given_name: n["given_name"].as_str().unwrap_or_default().to_owned(),
                    hostname: n["hostname"].as_str().unwrap_or_default().to_owned(),
                    addresses: addrs_field(n, "addresses")?,
                    online: n["online"].as_bool().unwrap_or(false),
                })
            })
            .collect()
    }
}

fn str_field(v: &Value, key: &str) -> Result<String> {
    Ok(v[key]
        .as_str()
        .with_context(|| format!("no string `{key}` in {v}"))?
        .to_owned())
}

/// Parses an address that may carry a prefix length (`100.64.0.1/32`).
pub fn parse_addr(s: &str) -> Result<IpAddr> {
    let bare = s.trim().split('/').next().unwrap_or_default();
    bare.parse()
        .with_context(|| format!("{s:?} is not an IP address"))
}

/// An array of strings, `[]` when absent or null.
fn strings_field(v: &Value, key: &str) -> Result<Vec<String>> {
    match &v[key] {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("`{key}` holds a non-string: {s}"))
            })
            .collect(),
        other => bail!("`{key}` is not an array: {other}"),
    }
}

fn addrs_field(v: &Value, key: &str) -> Result<Vec<IpAddr>> {
    match &v[key] {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|s| parse_addr(s.as_str().context("address is not a string")?))
            .collect(),
        other => bail!("`{key}` is not an array: {other}"),
    }
}

fn first_v4(addrs: &[IpAddr]) -> Option<Ipv4Addr> {
    addrs.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

fn toml_str(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Control {
    /// The port control listens on.
    pub const PORT: u16 = 50443;

    /// Writes a config for a control server in namespace `ns` at `addr` (files under
    /// `<lab dir>/control`), starts it and waits until it is ready.
    pub fn start(lab: &mut Lab, bins: &Binaries, ns: &str, addr: Ipv4Addr) -> Result<Self> {
        Self::start_named(lab, bins, ns, addr, "control")
    }

    /// [`Control::start`] with its files under `<lab dir>/<name>`, for labs with more than one
    /// control server.
    pub fn start_named(
        lab: &mut Lab,
        bins: &Binaries,
        ns: &str,
        addr: Ipv4Addr,
        name: &str,
    ) -> Result<Self> {
        Self::start_with(lab, bins, ns, addr, name, &ControlConfig::default())
    }

    /// [`Control::start_named`] with explicit config settings.
    pub fn start_with(
        lab: &mut Lab,
        bins: &Binaries,
        ns: &str,
        addr: Ipv4Addr,
        name: &str,
        settings: &ControlConfig,
    ) -> Result<Self> {
        let dir = lab.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let url = format!("http://{addr}:{}", Self::PORT);
        let mut control = Self {
            ns: ns.to_owned(),
            addr,
            url: url.clone(),
            config: dir.join("control.toml"),
            socket: dir.join("control.sock"),
            db: dir.join("db.sqlite"),
            private_key: settings
                .private_key
                .clone()
                .unwrap_or_else(|| dir.join("control_private.key")),
            policy_path: None,
            bins: bins.clone(),
            proc: None,
        };
        let policy_toml = match &settings.policy {
            PolicySource::None => String::new(),
            PolicySource::Database => "\n[policy]\nmode = \"database\"\n".to_owned(),
            PolicySource::File(text) => {
                let path = dir.join("policy.hujson");
                std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
                let toml = format!("\n[policy]\nmode = \"file\"\npath = {}\n", toml_str(&path));
                control.policy_path = Some(path);
                toml
            }
            PolicySource::FileAt(path) => {
                let toml = format!("\n[policy]\nmode = \"file\"\npath = {}\n", toml_str(path));
                control.policy_path = Some(path.clone());
                toml
            }
        };
        let config = format!(
            "server_url = \"{url}\"\n\
             listen_addr = \"{addr}:{port}\"\n\
             unix_socket = {socket}\n\
             ephemeral_node_inactivity_timeout = \"{ephemeral}\"\n\
             \n[noise]\nprivate_key_path = {key}\n\
             \n{database}\n\
             \n[prefixes]\nv4 = \"100.64.0.0/10\"\nv6 = \"fd7a:115c:a1e0::/48\"\n\
             \n[dns]\n{dns}\n{policy_toml}{extra}",
            dns = settings
                .dns_toml
                .as_deref()
                .unwrap_or("magic_dns = true\nbase_domain = \"warren.internal\""),
            port = Self::PORT,
            extra = settings.extra_toml,
            ephemeral = settings.ephemeral_node_inactivity_timeout,
            socket = toml_str(&control.socket),
            key = toml_str(&control.private_key()),
            database = settings.database_toml.clone().unwrap_or_else(|| format!(
                "[database]\ntype = \"sqlite\"\n\n[database.sqlite]\npath = {}",
                toml_str(&control.db)
            )),
        );
        std::fs::write(&control.config, config)
            .with_context(|| format!("write {}", control.config.display()))?;
        control.restart(lab)?;
        Ok(control)
    }

    /// Starts the server (again) with the same config and database, and waits until it is
    /// ready. Fails if it is already running.
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        if let Some(p) = &self.proc {
            ensure!(!p.is_running(), "control is already running");
        }
        let config = self.config.clone();
        let proc = lab.spawn(
            &self.ns,
            &format!("warren-control {}", self.addr),
            &self.bins.control,
            [
                OsStr::new("serve"),
                OsStr::new("--config"),
                config.as_os_str(),
            ],
        )?;
        self.proc = Some(proc);
        self.wait_ready(lab, READY_DEADLINE)?;
        Ok(())
    }

    /// Waits until the admin socket answers `users list` and the gRPC port accepts TCP.
    pub fn wait_ready(&self, lab: &Lab, deadline: Duration) -> Result<Duration> {
        let target = SocketAddr::from((self.addr, Self::PORT)).to_string();
        let exited = || self.proc.as_ref().and_then(ProcHandle::try_status);
        let took = wait_until(deadline, "control answers on its socket and port", || {
            // A server that exited will not become ready: stop waiting (reported below).
            if exited().is_some() {
                return Ok(true);
            }
            self.admin_ok(lab, ["users", "list"])?;
            let probe = lab.run(&self.ns, &self.bins.labtool, ["tcp-probe", "--to", &target])?;
            Ok(probe.status.success())
        })?;
        if let (Some(status), Some(p)) = (exited(), &self.proc) {
            bail!("warren-control exited ({status}):\n{}", p.stderr());
        }
        Ok(took)
    }

    /// The server's private key file (made at first start).
    pub fn private_key(&self) -> PathBuf {
        self.private_key.clone()
    }

    /// The server process, once started.
    pub fn proc(&self) -> Option<&ProcHandle> {
        self.proc.as_ref()
    }

    /// Stops the server with SIGTERM and requires that it exits by itself within `deadline`
    /// with status 0. If it does not exit in time it is killed (SIGKILL) and this fails.
    pub fn shutdown(&mut self, deadline: Duration) -> Result<()> {
        let proc = self.proc.as_ref().context("control was never started")?;
        ensure!(proc.is_running(), "control is not running");
        proc.terminate();
        let Some(status) = proc.wait_exit(deadline) else {
            let killed = proc.force_kill();
            bail!(
                "warren-control did not exit within {deadline:?} of SIGTERM (then SIGKILLed: \
                 {killed:?})"
            );
        };
        ensure!(
            status.success(),
            "warren-control exited with {status} on SIGTERM, expected status 0"
        );
        Ok(())
    }

    /// Stops the server (SIGTERM, SIGKILL fallback).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc
            .as_ref()
            .context("control was never started")?
            .kill()
    }

    /// Runs the admin CLI (`warren-control --socket S --output json ARGS`) in control's
    /// namespace; the caller checks the exit status.
    pub fn admin<S: AsRef<OsStr>>(
        &self,
        lab: &Lab,
        args: impl IntoIterator<Item = S>,
    ) -> Result<Output> {
        let mut all = vec![
            OsStr::new("--socket").to_owned(),
            self.socket.as_os_str().to_owned(),
            OsStr::new("--output").to_owned(),
            OsStr::new("json").to_owned(),
        ];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        lab.run(&self.ns, &self.bins.control, &all)
    }

    /// [`Control::admin`], failing unless it exits 0; returns its stdout.
    pub fn admin_ok<S: AsRef<OsStr>>(
        &self,
        lab: &Lab,
        args: impl IntoIterator<Item = S>,
    ) -> Result<String> {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.admin(lab, &args)?;
        if !out.status.success() {
            bail!(
                "`warren-control {}` failed ({}):\n{}{}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                stdout_of(&out),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout_of(&out))
    }

    /// `users create NAME`.
    pub fn create_user(&self, lab: &Lab, name: &str) -> Result<()> {
        self.admin_ok(lab, ["users", "create", name])?;
        Ok(())
    }

    /// `preauthkeys create --user USER EXTRA…` (e.g. `["--reusable"]`,
    /// `["--expiration", "1h"]`).
    pub fn create_preauth_key(&self, lab: &Lab, user: &str, extra: &[&str]) -> Result<PreAuthKey> {
        let mut args = vec!["preauthkeys", "create", "--user", user];
        args.extend_from_slice(extra);
        let out = self.admin_ok(lab, &args)?;
        let v: Value = serde_json::from_str(&out)
            .with_context(|| format!("`preauthkeys create` printed non-JSON: {out:?}"))?;
        Ok(PreAuthKey {
            secret: str_field(&v, "secret")?,
            prefix: str_field(&v["key"], "prefix")?,
            info: v["key"].clone(),
        })
    }

    /// `preauthkeys expire PREFIX`.
    pub fn expire_preauth_key(&self, lab: &Lab, prefix: &str) -> Result<()> {
        self.admin_ok(lab, ["preauthkeys", "expire", prefix])?;
        Ok(())
    }

    /// `nodes list`.
    pub fn nodes(&self, lab: &Lab) -> Result<Vec<NodeInfo>> {
        NodeInfo::parse_list(&self.admin_ok(lab, ["nodes", "list"])?)
    }

    /// The node control knows under `hostname`.
    pub fn node_by_hostname(&self, lab: &Lab, hostname: &str) -> Result<NodeInfo> {
        self.nodes(lab)?
            .into_iter()
            .find(|n| n.hostname == hostname)
            .with_context(|| format!("control lists no node with hostname {hostname}"))
    }

    /// `nodes delete ID`.
    pub fn delete_node(&self, lab: &Lab, id: u64) -> Result<()> {
        self.admin_ok(lab, ["nodes", "delete", &id.to_string()])?;
        Ok(())
    }

    /// `nodes approve-routes ID --routes R1,R2` (the whole list; `&[]` clears it).
    pub fn approve_routes(&self, lab: &Lab, id: u64, routes: &[&str]) -> Result<String> {
        self.admin_ok(
            lab,
            [
                "nodes",
                "approve-routes",
                &id.to_string(),
                "--routes",
                &routes.join(","),
            ],
        )
    }

    /// `nodes list-routes` (JSON), as printed.
    pub fn list_routes(&self, lab: &Lab) -> Result<Value> {
        let out = self.admin_ok(lab, ["nodes", "list-routes"])?;
        serde_json::from_str(&out)
            .with_context(|| format!("`nodes list-routes` printed non-JSON: {out:?}"))
    }

    /// `nodes tag ID --tags T1,T2`: replaces the node's tags live.
    pub fn tag_node(&self, lab: &Lab, id: u64, tags: &[&str]) -> Result<()> {
        self.admin_ok(
            lab,
            ["nodes", "tag", &id.to_string(), "--tags", &tags.join(",")],
        )?;
        Ok(())
    }

    /// Everything the server logged so far (its stderr).
    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(ProcHandle::stderr)
            .unwrap_or_default()
    }

    /// Sends SIGHUP to the server: in file mode it reloads the policy file.
    pub fn sighup(&self) -> Result<()> {
        let proc = self.proc.as_ref().context("control was never started")?;
        ensure!(proc.is_running(), "control is not running");
        proc.signal("HUP")
    }

    /// The policy file of a control started in file mode.
    pub fn policy_file(&self) -> Result<&Path> {
        self.policy_path
            .as_deref()
            .context("control was not started with a policy file (PolicySource::File)")
    }

    /// Replaces the policy file's contents with `text` the way `how` says. Control is not told
    /// otherwise: it notices the change itself (inotify).
    pub fn write_policy(&self, text: &str, how: PolicyEdit) -> Result<()> {
        let path = self.policy_file()?;
        match how {
            PolicyEdit::InPlace => {
                std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
            }
            PolicyEdit::Rename => {
                let dir = path.parent().context("policy file has no directory")?;
                let mut tmp = tempfile::Builder::new()
                    .prefix(".policy-edit")
                    .tempfile_in(dir)
                    .with_context(|| format!("temporary file in {}", dir.display()))?;
                std::io::Write::write_all(&mut tmp, text.as_bytes())?;
                tmp.as_file().sync_all()?;
                tmp.persist(path)
                    .with_context(|| format!("rename over {}", path.display()))?;
                Ok(())
            }
        }
    }

    /// Writes `text` to a file of its own in control's directory and runs `warren-control
    /// policy VERB FILE` (`set` or `check`); the caller checks the exit status.
    pub fn policy_with_file(&self, lab: &Lab, verb: &str, text: &str) -> Result<Output> {
        let dir = self
            .config
            .parent()
            .context("control config has no directory")?;
        let mut file = tempfile::Builder::new()
            .prefix(&format!("policy-{verb}-"))
            .suffix(".hujson")
            .tempfile_in(dir)
            .with_context(|| format!("temporary file in {}", dir.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.as_file().sync_all()?;
        let path = file.path().as_os_str().to_owned();
        self.admin(lab, [OsStr::new("policy"), OsStr::new(verb), &path])
    }

    /// `policy set FILE` with `text`, failing unless it exits 0.
    pub fn policy_set(&self, lab: &Lab, text: &str) -> Result<String> {
        let out = self.policy_with_file(lab, "set", text)?;
        ensure!(
            out.status.success(),
            "`warren-control policy set` failed ({}):\n{}{}",
            out.status,
            stdout_of(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout_of(&out))
    }

    /// `policy get`: the policy in force, as the server prints it.
    pub fn policy_get(&self, lab: &Lab) -> Result<String> {
        self.admin_ok(lab, ["policy", "get"])
    }

    /// `policy explain SRC DST [--proto P]`: the decision as printed.
    pub fn policy_explain(
        &self,
        lab: &Lab,
        src: &str,
        dst: &str,
        proto: Option<&str>,
    ) -> Result<String> {
        let mut args = vec!["policy", "explain", src, dst];
        if let Some(p) = proto {
            args.extend(["--proto", p]);
        }
        self.admin_ok(lab, &args)
    }
}

/// How [`Node::spawn_with`] starts `warren up`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The TUN device name (`--tun`).
    pub tun: String,
    /// Start the daemon with this umask (via `sh`), to show its files do not depend on it.
    pub umask: Option<u32>,
    /// Further arguments of `warren up`, after the usual ones (e.g. `--advertise-routes`,
    /// `10.20.0.0/24`).
    pub extra_args: Vec<String>,
    /// `--control` instead of the mesh's control URL (e.g. several instances).
    pub control_url: Option<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            tun: "warren0".to_owned(),
            umask: None,
            extra_args: Vec::new(),
            control_url: None,
        }
    }
}

impl NodeOptions {
    /// The defaults plus `extra_args` for `warren up`.
    pub fn with_args(extra_args: &[&str]) -> Self {
        Self {
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            ..Self::default()
        }
    }
}

/// A `warren up` process in its own namespace.
#[derive(Debug, Clone)]
pub struct Node {
    /// The hostname it registered with.
    pub hostname: String,
    /// Namespace it runs in.
    pub ns: String,
    /// Its LAN address.
    pub lan_addr: Ipv4Addr,
    /// Its state directory (the local API socket is `warren.sock` in it).
    pub state_dir: PathBuf,
    warren: PathBuf,
    proc: ProcHandle,
}

impl Node {
    /// Starts `warren up --control URL --auth-key KEY --hostname H --state-dir
    /// <lab dir>/nodes/H --tun warren0` in `ns`, without waiting for anything.
    pub fn spawn(
        lab: &mut Lab,
        bins: &Binaries,
        ns: &str,
        lan_addr: Ipv4Addr,
        hostname: &str,
        control_url: &str,
        auth_key: &str,
    ) -> Result<Self> {
        let opts = NodeOptions::default();
        Self::spawn_with(
            lab,
            bins,
            ns,
            lan_addr,
            hostname,
            control_url,
            auth_key,
            &opts,
        )
    }

    /// [`Node::spawn`] with explicit [`NodeOptions`].
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with(
        lab: &mut Lab,
        bins: &Binaries,
        ns: &str,
        lan_addr: Ipv4Addr,
        hostname: &str,
        control_url: &str,
        auth_key: &str,
        opts: &NodeOptions,
    ) -> Result<Self> {
        let state_dir = lab.dir().join("nodes").join(hostname);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("create {}", state_dir.display()))?;
        let state = state_dir.to_string_lossy().into_owned();
        let warren = bins.warren.to_string_lossy().into_owned();
        let mut args: Vec<String> = Vec::new();
        if let Some(umask) = opts.umask {
            // `sh -c 'umask U; exec "$0" "$@"' warren up ...`: the daemon starts with that umask.
            args.extend([
                "-c".into(),
                format!("umask {umask:03o}; exec \"$0\" \"$@\""),
            ]);
            args.push(warren.clone());
        }
        args.extend(
            [
                "up",
                "--control",
                control_url,
                "--auth-key",
                auth_key,
                "--hostname",
                hostname,
                "--state-dir",
                &state,
                "--tun",
                &opts.tun,
            ]
            .map(str::to_owned),
        );
        args.extend(opts.extra_args.iter().cloned());
        let program = if opts.umask.is_some() {
            "sh".to_owned()
        } else {
            warren
        };
        let proc = lab.spawn(ns, &format!("warren {hostname}"), program, args)?;
        Ok(Self {
            hostname: hostname.to_owned(),
            ns: ns.to_owned(),
            lan_addr,
            state_dir,
            warren: bins.warren.clone(),
            proc,
        })
    }

    /// The `warren up` process.
    pub fn proc(&self) -> &ProcHandle {
        &self.proc
    }

    /// Runs `warren ARGS --state-dir S` in the node's namespace; the caller checks the exit
    /// status (for commands that are expected to fail).
    pub fn cli_output(&self, lab: &Lab, args: &[&str]) -> Result<Output> {
        let state = self.state_dir.to_string_lossy();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", &state]);
        lab.run(&self.ns, &self.warren, &all)
    }

    /// Runs `warren ARGS`, failing unless it exits 0; returns its stdout.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        let state = self.state_dir.to_string_lossy();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", &state]);
        let out = lab.run(&self.ns, &self.warren, &all)?;
        if !out.status.success() {
            bail!(
                "`warren {}` on {} failed ({}):\n{}{}",
                all.join(" "),
                self.hostname,
                out.status,
                stdout_of(&out),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout_of(&out))
    }

    /// `warren status --json`.
    pub fn status(&self, lab: &Lab) -> Result<NodeStatus> {
        NodeStatus::parse(&self.cli(lab, &["status", "--json"])?)
    }

    /// `warren ping PEER -c COUNT`: its output (one line per reply).
    pub fn disco_ping(&self, lab: &Lab, peer: &str, count: u32) -> Result<String> {
        self.cli(lab, &["ping", peer, "-c", &count.to_string()])
    }

    /// `warren netcheck --json`.
    pub fn netcheck(&self, lab: &Lab) -> Result<Value> {
        let out = self.cli(lab, &["netcheck", "--json"])?;
        serde_json::from_str(&out)
            .with_context(|| format!("`warren netcheck --json` printed non-JSON: {out:?}"))
    }

    /// `warren ip`: its mesh addresses, IPv4 first.
    pub fn addresses(&self, lab: &Lab) -> Result<Vec<IpAddr>> {
        self.cli(lab, &["ip"])?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(parse_addr)
            .collect()
    }

    /// Its mesh IPv4 address.
    pub fn ipv4(&self, lab: &Lab) -> Result<Ipv4Addr> {
        first_v4(&self.addresses(lab)?)
            .with_context(|| format!("{} has no IPv4 mesh address", self.hostname))
    }

    /// `warren down`.
    pub fn down(&self, lab: &Lab) -> Result<()> {
        self.cli(lab, &["down"])?;
        Ok(())
    }

    /// `warren down`, then waits until the `warren up` process has exited.
    pub fn down_and_wait(&self, lab: &Lab, deadline: Duration) -> Result<ExitStatus> {
        self.down(lab)?;
        self.proc.wait_exit(deadline).with_context(|| {
            format!(
                "`warren up` for {} still runs {deadline:?} after `warren down`",
                self.hostname
            )
        })
    }

    /// `warren set --exit-node NAME|IP` (`""` clears it), failing unless it exits 0.
    pub fn set_exit_node(&self, lab: &Lab, exit_node: &str) -> Result<()> {
        self.cli(lab, &["set", "--exit-node", exit_node])?;
        Ok(())
    }

    /// Starts `warren up` again for the same hostname, state directory and namespace (after
    /// it exited or was killed), with `opts`. The auth key must still be usable (reusable).
    pub fn respawn(
        &self,
        lab: &mut Lab,
        bins: &Binaries,
        control_url: &str,
        auth_key: &str,
        opts: &NodeOptions,
    ) -> Result<Self> {
        ensure!(
            !self.proc.is_running(),
            "`warren up` for {} is still running",
            self.hostname
        );
        Self::spawn_with(
            lab,
            bins,
            &self.ns,
            self.lan_addr,
            &self.hostname,
            control_url,
            auth_key,
            opts,
        )
    }

    /// Waits until `warren status` lists exactly `n` peers. Fails early if `warren up` exits.
    pub fn wait_peers(&self, lab: &Lab, n: usize, deadline: Duration) -> Result<Duration> {
        wait_until(
            deadline,
            &format!("{} lists {n} peers", self.hostname),
            || {
                self.check_running()?;
                Ok(self.status(lab)?.peers.len() == n)
            },
        )
    }

    /// Fails (with its stderr) if `warren up` has exited.
    pub fn check_running(&self) -> Result<()> {
        if let Some(status) = self.proc.try_status() {
            bail!(
                "`warren up` for {} exited ({status}):\n{}",
                self.hostname,
                self.proc.stderr()
            );
        }
        Ok(())
    }
}

/// The usual topology: a LAN, a control server, a user with a reusable key, and nodes.
#[derive(Debug)]
pub struct Mesh {
    /// The LAN everything is attached to (10.77.0.0/24).
    pub lan: Lan,
    /// The control server at 10.77.0.1.
    pub control: Control,
    /// The user nodes register as.
    pub user: String,
    /// A reusable pre-auth key of that user.
    pub key: PreAuthKey,
    /// The nodes started with [`Mesh::spawn_node`], in order.
    pub nodes: Vec<Node>,
    bins: Binaries,
    hosts: u8,
    host_namespaces: Vec<String>,
    host_routes: Vec<(String, Ipv4Addr)>,
}

impl Mesh {
    /// Control's LAN address.
    pub const CONTROL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    /// Builds the LAN and control, creates user `lab` and a reusable key, starts `nodes` nodes
    /// and waits until each lists all the others as peers.
    pub fn start(lab: &mut Lab, bins: &Binaries, nodes: usize) -> Result<Self> {
        Self::start_with(lab, bins, nodes, &ControlConfig::default())
    }

    /// [`Mesh::start`] with explicit control config settings.
    pub fn start_with(
        lab: &mut Lab,
        bins: &Binaries,
        nodes: usize,
        settings: &ControlConfig,
    ) -> Result<Self> {
        let lan = lab.add_lan("lan")?;
        let ctl = lab.add_ns("ctl")?;
        lab.attach(&lan, &ctl, "eth0", &format!("{}/24", Self::CONTROL_ADDR))?;
        let control =
            Control::start_with(lab, bins, &ctl, Self::CONTROL_ADDR, "control", settings)?;
        let user = "lab".to_owned();
        control.create_user(lab, &user)?;
        let key = control.create_preauth_key(lab, &user, &["--reusable"])?;
        let mut mesh = Self {
            lan,
            control,
            user,
            key,
            nodes: Vec::new(),
            bins: bins.clone(),
            hosts: 0,
            host_namespaces: Vec::new(),
            host_routes: Vec::new(),
        };
        for _ in 0..nodes {
            mesh.spawn_node(lab)?;
        }
        mesh.wait_full_mesh(lab, READY_DEADLINE)?;
        Ok(mesh)
    }

    /// Creates a namespace `h<N>` attached to the LAN at `10.77.0.<10+N>/24`, with no process in
    /// it yet. Returns the namespace and the address.
    pub fn add_host(&mut self, lab: &mut Lab) -> Result<(String, Ipv4Addr)> {
        ensure!(self.hosts < 200, "too many hosts");
        self.hosts += 1;
        let addr = Ipv4Addr::new(10, 77, 0, 10 + self.hosts);
        let ns = lab.add_ns(&format!("h{}", self.hosts))?;
        lab.attach(&self.lan, &ns, "eth0", &format!("{addr}/24"))?;
        for (dest, via) in &self.host_routes {
            lab.add_route(&ns, dest, *via)?;
        }
        self.host_namespaces.push(ns.clone());
        Ok((ns, addr))
    }

    /// Adds route `dest via` (a gateway on the LAN) to every host made so far with
    /// [`Mesh::add_host`] and to every later one, e.g. to reach a DNS server's address.
    pub fn route_all_hosts(&mut self, lab: &Lab, dest: &str, via: Ipv4Addr) -> Result<()> {
        for ns in &self.host_namespaces {
            lab.add_route(ns, dest, via)?;
        }
        self.host_routes.push((dest.to_owned(), via));
        Ok(())
    }

    /// The binaries the mesh runs.
    pub fn bins(&self) -> &Binaries {
        &self.bins
    }

    /// Starts a node `node<N>` on a new host with `auth_key`, without waiting; it is not added
    /// to [`Mesh::nodes`].
    pub fn spawn_node_with_key(&mut self, lab: &mut Lab, auth_key: &str) -> Result<Node> {
        let (ns, addr) = self.add_host(lab)?;
        self.spawn_node_on(lab, &ns, addr, auth_key, &NodeOptions::default())
    }

    /// Starts a node on a host made with [`Mesh::add_host`] (named after the newest host),
    /// without waiting; it is not added to [`Mesh::nodes`].
    pub fn spawn_node_on(
        &mut self,
        lab: &mut Lab,
        ns: &str,
        addr: Ipv4Addr,
        auth_key: &str,
        opts: &NodeOptions,
    ) -> Result<Node> {
        let hostname = format!("node{}", self.hosts);
        Node::spawn_with(
            lab,
            &self.bins,
            ns,
            addr,
            &hostname,
            opts.control_url.as_deref().unwrap_or(&self.control.url),
            auth_key,
            opts,
        )
    }

    /// Starts a node with the mesh's reusable key on a new host and adds it to
    /// [`Mesh::nodes`], without waiting. Returns its index.
    pub fn spawn_node(&mut self, lab: &mut Lab) -> Result<usize> {
        let secret = self.key.secret.clone();
        let node = self.spawn_node_with_key(lab, &secret)?;
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    /// Waits until every node in [`Mesh::nodes`] lists all the others as peers.
    pub fn wait_full_mesh(&self, lab: &Lab, deadline: Duration) -> Result<Duration> {
        let n = self.nodes.len();
        wait_until(
            deadline,
            &format!("all {n} nodes list {} peers", n.saturating_sub(1)),
            || {
                for node in &self.nodes {
                    node.check_running()?;
                    if node.status(lab)?.peers.len() != n - 1 {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
    }

    /// Sends `bytes` bytes over TCP from node `from` to node `to`'s mesh IPv4 address with
    /// `warren-labtool`, and returns (what the sender sent, what the sink received).
    pub fn tcp_transfer(
        &self,
        lab: &mut Lab,
        from: usize,
        to: usize,
        bytes: u64,
        deadline: Duration,
    ) -> Result<(TransferReport, TransferReport)> {
        let dst = self.nodes[to].ipv4(lab)?;
        crate::traffic::tcp_transfer(
            lab,
            &self.bins.labtool,
            &self.nodes[from].ns,
            &self.nodes[to].ns,
            SocketAddr::from((dst, 5201)),
            bytes,
            deadline,
        )
    }
}
