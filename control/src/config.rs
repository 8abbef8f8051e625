//! `warren-control`'s configuration: a TOML file whose keys follow Headscale's where the concept
//! is the same, turned into a typed [`Config`]. Every key has a default, so the server also runs
//! with no file at all. An unknown key is an error that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    // The cause is in the message, so it is not also a `source` (which `{:#}` would print a
    // second time).
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys included).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The server's whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The URL nodes use to reach this server.
    pub server_url: String,
    /// Where the gRPC API listens.
    pub listen_addr: SocketAddr,
    /// Where Prometheus metrics are served (`/metrics`), Headscale's key. Off unless set
    /// (Headscale listens on 127.0.0.1:9090 by default; warren opens no port it was not asked
    /// for, so two servers on one host never collide).
    pub metrics_listen_addr: Option<SocketAddr>,
    /// The local admin socket (root on the same host needs no API key).
    pub unix_socket: PathBuf,
    /// Permissions of the admin socket, octal.
    pub unix_socket_permission: String,
    /// How long an ephemeral node may stay disconnected before it is deleted ("30m").
    #[serde(with = "duration_text")]
    pub ephemeral_node_inactivity_timeout: Duration,
    /// How often an idle map stream gets a keepalive ("60s").
    #[serde(with = "duration_text")]
    pub keepalive_interval: Duration,
    /// The server's key.
    pub noise: Noise,
    /// Where nodes, users and keys are stored.
    pub database: Database,
    /// The address ranges nodes get addresses from.
    pub prefixes: Prefixes,
    /// MagicDNS.
    pub dns: Dns,
    /// DERP relays.
    pub derp: Derp,
    /// Limits on the connections the gRPC listener takes (warren's own section).
    pub connections: Connections,
    /// The web admin page (warren's own `web` section).
    pub web: WebConfig,
    /// The access policy (Headscale's `policy` section).
    pub policy: PolicyConfig,
    /// Logging (Headscale's `log` section).
    pub log: LogConfig,
    /// The file this configuration was read from ([`Config::load`]); `None` when built in
    /// code. `serve` watches it and reads it again on SIGHUP.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Logging (Headscale's `log` section).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The level: `"info"` (the default), `"debug"`, `"warn"`..., or a `tracing` filter such as
    /// `"info,warren_control=debug"`. `RUST_LOG`, when set, takes precedence. Changes apply on
    /// a reload.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// The web admin page (`[web]`): on by default, on loopback only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Whether `serve` starts it; `false` turns it off.
    pub enabled: bool,
    /// Where it listens. Unset: [`WebConfig::DEFAULT_LISTEN_ADDR`], skipped with a warning when
    /// that port is taken; an address set here that cannot be bound refuses the start.
    pub listen_addr: Option<SocketAddr>,
}

impl WebConfig {
    /// Where the page listens unless `web.listen_addr` says otherwise: loopback only.
    pub const DEFAULT_LISTEN_ADDR: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8081);

    /// The address to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr.unwrap_or(Self::DEFAULT_LISTEN_ADDR)
    }
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen_addr: None,
        }
    }
}

/// Where the access policy comes from (Headscale's `policy` section: `mode`, `path`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `"file"` (the default): the HuJSON file at `path`, watched and reloaded when it
    /// changes; `"database"`: the policy stored with `warren-control policy set`.
    pub mode: PolicyMode,
    /// The policy file in file mode; empty (the default) means no policy: every node may reach
    /// every other.
    pub path: PathBuf,
}

/// `policy.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// The policy is the file at `policy.path`.
    #[default]
    File,
    /// The policy is stored in the database and changed through the Admin API.
    Database,
}

impl PolicyMode {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::File => "file",
            PolicyMode::Database => "database",
        }
    }
}

impl PolicyConfig {
    /// The policy file, in file mode with a path configured.
    pub fn file(&self) -> Option<&Path> {
        (self.mode == PolicyMode::File && !self.path.as_os_str().is_empty())
            .then_some(self.path.as_path())
    }
}

/// Limits on accepted connections (warren's own `connections` section; Headscale has none).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Connections {
    /// The TCP listen backlog (the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// TCP connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// How long a new connection may take to start its first request ("10s").
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    /// How long a connection may go without a request in flight ("5m"); a node's map stream
    /// is always in flight.
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    /// How often the server pings each HTTP/2 connection ("4s"). With the timeout this bounds
    /// how long a silently dead node (power cut, cable pulled) still counts as online: its
    /// subnet routes fail over to another router once its map stream's connection is closed,
    /// at most interval + timeout (8 s by default) after it last spoke. A killed process is
    /// seen at once (its TCP connection closes).
    #[serde(with = "duration_text")]
    pub http2_ping_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed ("4s").
    #[serde(with = "duration_text")]
    pub http2_ping_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            listen_backlog: crate::listen::DEFAULT_BACKLOG,
            max_connections: crate::listen::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: crate::listen::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: crate::listen::DEFAULT_IDLE_TIMEOUT,
            http2_ping_interval: Duration::from_secs(4),
            http2_ping_timeout: Duration::from_secs(4),
        }
    }
}

impl Connections {
    /// The limits of the TCP listener.
    pub fn limits(&self) -> crate::listen::Limits {
        crate::listen::Limits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

/// DERP settings (Headscale's `derp` section).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Derp {
    /// DERP map files in Tailscale's JSON shape, merged in order.
    pub paths: Vec<PathBuf>,
    /// The DERP + STUN server control can run in-process.
    pub server: DerpServer,
}

/// The embedded DERP + STUN server (Headscale's `derp.server`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DerpServer {
    /// Run it; by default it runs when no `derp.paths` are configured, so a small mesh is one
    /// process.
    pub enabled: Option<bool>,
    /// Its region id in the DERP map.
    pub region_id: u32,
    /// Its region code.
    pub region_code: String,
    /// Its region name.
    pub region_name: String,
    /// Where DERP (plain HTTP) listens.
    pub listen_addr: SocketAddr,
    /// Where STUN listens.
    pub stun_listen_addr: SocketAddr,
    /// A second STUN address, given to nodes as a STUN-only node of the region so netcheck
    /// can compare two mappings and tell a NAT that maps per destination (hard NAT): by
    /// default the next port of `stun_listen_addr`; "off", or an address.
    pub stun_alt_listen_addr: AltStun,
    /// The address nodes use to reach it; empty means the host of `server_url`.
    pub ipv4: String,
    /// Its key file, created on first start [default: `derp_server_private.key` beside
    /// `noise.private_key_path`].
    pub private_key_path: Option<PathBuf>,
    /// Add its region to the DERP map (turn off when a `derp.paths` file describes it).
    pub automatically_add_embedded_derp_region: bool,
    /// Admit only nodes this control server knows.
    pub verify_clients: bool,
}

impl Default for DerpServer {
    fn default() -> Self {
        Self {
            enabled: None,
            region_id: 999,
            region_code: "warren".into(),
            region_name: "warren embedded DERP".into(),
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 3340)),
            stun_listen_addr: SocketAddr::from(([0, 0, 0, 0], 3478)),
            stun_alt_listen_addr: AltStun::default(),
            ipv4: String::new(),
            private_key_path: None,
            automatically_add_embedded_derp_region: true,
            verify_clients: true,
        }
    }
}

impl Derp {
    /// Whether the embedded server runs.
    pub fn embedded(&self) -> bool {
        self.server.enabled.unwrap_or(self.paths.is_empty())
    }
}

/// Where the embedded server's second STUN address is (`derp.server.stun_alt_listen_addr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AltStun {
    /// The port after `stun_listen_addr`'s, on the same address (an ephemeral port when that
    /// one is ephemeral).
    #[default]
    NextPort,
    /// No second address ("off").
    Off,
    /// This address.
    At(SocketAddr),
}

impl<'de> Deserialize<'de> for AltStun {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "off" => Ok(AltStun::Off),
            "next-port" => Ok(AltStun::NextPort),
            addr => addr.parse().map(AltStun::At).map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not \"off\", \"next-port\" or an address like \"0.0.0.0:3479\""
                ))
            }),
        }
    }
}

impl DerpServer {
    /// The second STUN address, if any; `None` also when `stun_listen_addr` has no next port
    /// (the configuration check refuses that).
    pub fn stun_alt_listen(&self) -> Option<SocketAddr> {
        let main = self.stun_listen_addr;
        match self.stun_alt_listen_addr {
            AltStun::Off => None,
            AltStun::At(addr) => Some(addr),
            AltStun::NextPort if main.port() == 0 => Some(main),
            AltStun::NextPort => main
                .port()
                .checked_add(1)
                .map(|p| SocketAddr::new(main.ip(), p)),
        }
    }
}

/// The server's private key file (Headscale's `noise.private_key_path`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Noise {
    /// Created with mode 0600 on first start.
    pub private_key_path: PathBuf,
}

/// The database section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    /// `"sqlite"` (the default: one server) or `"postgres"` (several servers on one database).
    #[serde(rename = "type")]
    pub kind: String,
    /// SQLite settings.
    pub sqlite: Sqlite,
    /// PostgreSQL settings (Headscale's `database.postgres` keys).
    pub postgres: Postgres,
}

impl Database {
    /// Whether the PostgreSQL backend is configured.
    pub fn is_postgres(&self) -> bool {
        self.kind == "postgres"
    }
}

/// PostgreSQL settings, with Headscale's key names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Postgres {
    /// Host name or address, or the directory of the server's unix socket (`/run/postgresql`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database name.
    pub name: String,
    /// User.
    pub user: String,
    /// Password (empty: none, as with peer authentication on a unix socket).
    pub pass: String,
    /// Most connections one server opens for its store (one more listens for changes).
    pub max_open_conns: usize,
    /// Accepted for Headscale compatibility; idle connections stay open up to
    /// `max_open_conns`.
    pub max_idle_conns: usize,
    /// Accepted for Headscale compatibility; idle connections are not closed.
    pub conn_max_idle_time_secs: u64,
    /// TLS to the database: only `false` is supported (use a unix socket or a private network).
    pub ssl: bool,
}

impl Default for Postgres {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 5432,
            name: "warren".into(),
            user: "warren".into(),
            pass: String::new(),
            max_open_conns: 10,
            max_idle_conns: 10,
            conn_max_idle_time_secs: 3600,
            ssl: false,
        }
    }
}

impl Postgres {
    /// The store's connection options.
    pub fn options(&self) -> crate::store::PgOptions {
        crate::store::PgOptions {
            host: self.host.clone(),
            port: self.port,
            name: self.name.clone(),
            user: self.user.clone(),
            pass: self.pass.clone(),
            max_open_conns: self.max_open_conns,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// SQLite settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sqlite {
    /// The database file.
    pub path: PathBuf,
    /// WAL journal mode (default true).
    pub write_ahead_log: bool,
}

/// Address ranges.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prefixes {
    /// IPv4 range, within 100.64.0.0/10.
    pub v4: Ipv4Net,
    /// IPv6 range, within fd7a:115c:a1e0::/48.
    pub v6: Ipv6Net,
    /// Only "sequential" for now.
    pub allocation: String,
}

/// MagicDNS settings (Headscale's `dns` section), sent to every node in its full map.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dns {
    /// Whether nodes resolve each other's names.
    pub magic_dns: bool,
    /// The domain under which nodes' names live.
    pub base_domain: String,
    /// Upstream resolvers.
    pub nameservers: Nameservers,
    /// Search domains after `base_domain`, so short names resolve.
    pub search_domains: Vec<String>,
    /// Extra records the nodes' resolvers answer (A and AAAA only; Tailscale's client ignores
    /// other types, so they are refused here rather than silently dropped).
    pub extra_records: Vec<ExtraRecord>,
}

/// `dns.nameservers`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nameservers {
    /// Resolvers for every name outside the mesh: `"1.1.1.1"`, `"[2606:4700::1111]:53"`.
    pub global: Vec<String>,
    /// Split DNS: a domain and its own resolvers (`"corp.example" = ["10.0.0.53"]`).
    pub split: std::collections::BTreeMap<String, Vec<String>>,
}

/// One `dns.extra_records` entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExtraRecord {
    /// The name, fully qualified: `"grafana.warren.internal"`.
    pub name: String,
    /// `"A"` or `"AAAA"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The address.
    pub value: String,
}

/// A nameserver as configured: an IP, or `ip:port` (`[v6]:port`).
fn valid_nameserver(ns: &str) -> bool {
    ns.parse::<std::net::IpAddr>().is_ok() || ns.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0)
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_`, at most 253 bytes.
fn valid_domain(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Dns {
    /// Checks the section; errors name the key.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        for ns in &self.nameservers.global {
            if !valid_nameserver(ns) {
                return invalid(
                    "dns.nameservers.global",
                    format!("{ns:?} is not an IP address or ip:port"),
                );
            }
        }
        for (domain, list) in &self.nameservers.split {
            if !valid_domain(domain) {
                return invalid(
                    "dns.nameservers.split",
                    format!("{domain:?} is not a domain name"),
                );
            }
            if list.is_empty() {
                return invalid(
                    "dns.nameservers.split",
                    format!("{domain:?} has no nameservers"),
                );
            }
            if let Some(ns) = list.iter().find(|ns| !valid_nameserver(ns)) {
                return invalid(
                    "dns.nameservers.split",
                    format!("{domain:?}: {ns:?} is not an IP address or ip:port"),
                );
            }
        }
        if let Some(d) = self.search_domains.iter().find(|d| !valid_domain(d)) {
            return invalid("dns.search_domains", format!("{d:?} is not a domain name"));
        }
        for r in &self.extra_records {
            if !valid_domain(&r.name) {
                return invalid(
                    "dns.extra_records",
                    format!("{:?} is not a domain name", r.name),
                );
            }
            let ok = match r.kind.as_str() {
                "A" => r.value.parse::<std::net::Ipv4Addr>().is_ok(),
                "AAAA" => r.value.parse::<std::net::Ipv6Addr>().is_ok(),
                other => {
                    return invalid(
                        "dns.extra_records",
                        format!(
                            "{}: type {other:?} is not supported; only \"A\" and \"AAAA\"",
                            r.name
                        ),
                    );
                }
            };
            if !ok {
                return invalid(
                    "dns.extra_records",
                    format!("{}: {:?} is not an {} address", r.name, r.value, r.kind),
                );
            }
        }
        Ok(())
    }

    /// The DNS settings as every full map carries them.
    pub fn wire(&self) -> warren_proto::control::DnsConfig {
        use warren_proto::control::{DnsConfig, DnsRecord, SplitDns};
        DnsConfig {
            magic_dns: self.magic_dns,
            base_domain: self.base_domain.clone(),
            nameservers: self.nameservers.global.clone(),
            split: self
                .nameservers
                .split
                .iter()
                .map(|(domain, ns)| SplitDns {
                    domain: domain.trim_end_matches('.').to_owned(),
                    nameservers: ns.clone(),
                })
                .collect(),
            search_domains: self.search_domains.clone(),
            extra_records: self
                .extra_records
                .iter()
                .map(|r| DnsRecord {
                    name: r.name.trim_end_matches('.').to_owned(),
                    r#type: r.kind.clone(),
                    value: r.value.clone(),
                })
                .collect(),
        }
    }
}

const STATE_DIR: &str = "/var/lib/warren-control";

impl Default for Config {
    fn default() -> Self {
        Self {
            server_url: "http://127.0.0.1:50443".into(),
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 50443)),
            metrics_listen_addr: None,
            unix_socket: PathBuf::from("/var/run/warren/control.sock"),
            unix_socket_permission: "0770".into(),
            ephemeral_node_inactivity_timeout: Duration::from_secs(30 * 60),
            keepalive_interval: Duration::from_secs(60),
            noise: Noise::default(),
            database: Database::default(),
            prefixes: Prefixes::default(),
            dns: Dns::default(),
            derp: Derp::default(),
            connections: Connections::default(),
            policy: PolicyConfig::default(),
            web: WebConfig::default(),
            log: LogConfig::default(),
            source: None,
        }
    }
}

impl Default for Noise {
    fn default() -> Self {
        Self {
            private_key_path: Path::new(STATE_DIR).join("control_private.key"),
        }
    }
}

impl Default for Database {
    fn default() -> Self {
        Self {
            kind: "sqlite".into(),
            sqlite: Sqlite::default(),
            postgres: Postgres::default(),
        }
    }
}

impl Default for Sqlite {
    fn default() -> Self {
        Self {
            path: Path::new(STATE_DIR).join("db.sqlite"),
            write_ahead_log: true,
        }
    }
}

impl Default for Prefixes {
    fn default() -> Self {
        Self {
            v4: Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default(),
            v6: Ipv6Net::new(
                std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0),
                48,
            )
            .unwrap_or_default(),
            allocation: "sequential".into(),
        }
    }
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            magic_dns: true,
            base_domain: "warren.internal".into(),
            nameservers: Nameservers::default(),
            search_domains: Vec::new(),
            extra_records: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and checks a configuration file, remembering it as [`Config::source`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.into(),
            error,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.source = Some(path.into());
        Ok(config)
    }

    /// Parses and checks configuration text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !matches!(self.database.kind.as_str(), "sqlite" | "postgres") {
            return Err(ConfigError::Invalid {
                key: "database.type",
                reason: format!(
                    "{:?} is not supported; use \"sqlite\" or \"postgres\"",
                    self.database.kind
                ),
            });
        }
        if self.database.is_postgres() {
            let pg = &self.database.postgres;
            if pg.ssl {
                return Err(ConfigError::Invalid {
                    key: "database.postgres.ssl",
                    reason: "TLS to PostgreSQL is not supported; connect over a unix socket or \
                             a private network and set ssl = false"
                        .into(),
                });
            }
            if pg.max_open_conns == 0 {
                return Err(ConfigError::Invalid {
                    key: "database.postgres.max_open_conns",
                    reason: "must be at least 1".into(),
                });
            }
            if pg.host.is_empty() || pg.name.is_empty() || pg.user.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "database.postgres",
                    reason: "host, name and user must be set".into(),
                });
            }
        }
        if self.prefixes.allocation != "sequential" {
            return Err(ConfigError::Invalid {
                key: "prefixes.allocation",
                reason: "only \"sequential\" is supported".into(),
            });
        }
        let cgnat = Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default();
        if !cgnat.contains(&self.prefixes.v4) || self.prefixes.v4.prefix_len() > 30 {
            return Err(ConfigError::Invalid {
                key: "prefixes.v4",
                reason: "must be a range of at least 4 addresses within 100.64.0.0/10".into(),
            });
        }
        let ula = Ipv6Net::new(
            std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0),
            48,
        )
        .unwrap_or_default();
        if !ula.contains(&self.prefixes.v6) {
            return Err(ConfigError::Invalid {
                key: "prefixes.v6",
                reason: "must be a range within fd7a:115c:a1e0::/48".into(),
            });
        }
        // Node n gets the n-th address of both ranges: v6 must hold as many as v4.
        let v4_bits = 32 - u32::from(self.prefixes.v4.prefix_len());
        if 128 - u32::from(self.prefixes.v6.prefix_len()) < v4_bits.max(8) {
            return Err(ConfigError::Invalid {
                key: "prefixes.v6",
                reason: format!(
                    "must hold at least as many addresses as prefixes.v4 (/{} or larger)",
                    128 - v4_bits.max(8)
                ),
            });
        }
        if u32::from_str_radix(&self.unix_socket_permission, 8).is_err() {
            return Err(ConfigError::Invalid {
                key: "unix_socket_permission",
                reason: "must be octal, like \"0770\"".into(),
            });
        }
        let server = &self.derp.server;
        if server.stun_alt_listen_addr == AltStun::NextPort && server.stun_alt_listen().is_none() {
            return Err(ConfigError::Invalid {
                key: "derp.server.stun_alt_listen_addr",
                reason: "derp.server.stun_listen_addr has no next port; name an address or \"off\""
                    .into(),
            });
        }
        if let AltStun::At(alt) = server.stun_alt_listen_addr
            && alt == server.stun_listen_addr
            && alt.port() != 0
        {
            return Err(ConfigError::Invalid {
                key: "derp.server.stun_alt_listen_addr",
                reason: "must differ from derp.server.stun_listen_addr".into(),
            });
        }
        let c = &self.connections;
        for (key, zero) in [
            ("connections.listen_backlog", c.listen_backlog == 0),
            ("connections.max_connections", c.max_connections == 0),
            (
                "connections.handshake_timeout",
                c.handshake_timeout.is_zero(),
            ),
            ("connections.idle_timeout", c.idle_timeout.is_zero()),
            (
                "connections.http2_ping_interval",
                c.http2_ping_interval.is_zero(),
            ),
            (
                "connections.http2_ping_timeout",
                c.http2_ping_timeout.is_zero(),
            ),
        ] {
            if zero {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be above zero".into(),
                });
            }
        }
        self.dns.check()?;
        if !valid_log_level(&self.log.level) {
            return Err(ConfigError::Invalid {
                key: "log.level",
                reason: format!(
                    "{:?} is not a level (trace, debug, info, warn, error, off) nor a list of \
                     them with targets (\"info,warren_control=debug\")",
                    self.log.level
                ),
            });
        }
        if self.keepalive_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "keepalive_interval",
                reason: "must be above zero".into(),
            });
        }
        if self.policy.mode == PolicyMode::Database && !self.policy.path.as_os_str().is_empty() {
            // Silently ignoring the file would leave its author wondering why edits do nothing.
            return Err(ConfigError::Invalid {
                key: "policy.path",
                reason: "is only read in file mode; with policy.mode = \"database\" the policy \
                         is stored with `warren-control policy set` (remove policy.path)"
                    .into(),
            });
        }
        Ok(())
    }
}

impl Config {
    /// The keys whose values differ between `self` (the configuration the server started with)
    /// and `new` that a running server cannot take up: listeners, database, key files, address
    /// ranges, limits, the policy source. What does apply live (`dns.*`, `log.level`, the DERP
    /// map's content: `derp.paths`, `server_url` and the embedded region's name, id and
    /// address) is not listed. `derp.server.enabled` is listed when whether the embedded
    /// server runs would change (it also follows `derp.paths` when unset).
    pub fn restart_keys(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (self, new);
        let (sa, sb) = (&a.derp.server, &b.derp.server);
        let (ca, cb) = (&a.connections, &b.connections);
        [
            ("listen_addr", a.listen_addr != b.listen_addr),
            (
                "metrics_listen_addr",
                a.metrics_listen_addr != b.metrics_listen_addr,
            ),
            ("unix_socket", a.unix_socket != b.unix_socket),
            (
                "unix_socket_permission",
                a.unix_socket_permission != b.unix_socket_permission,
            ),
            (
                "ephemeral_node_inactivity_timeout",
                a.ephemeral_node_inactivity_timeout != b.ephemeral_node_inactivity_timeout,
            ),
            (
                "keepalive_interval",
                a.keepalive_interval != b.keepalive_interval,
            ),
            (
                "noise.private_key_path",
                a.noise.private_key_path != b.noise.private_key_path,
            ),
            ("database.type", a.database.kind != b.database.kind),
            (
                "database.sqlite.path",
                a.database.sqlite.path != b.database.sqlite.path,
            ),
            (
                "database.sqlite.write_ahead_log",
                a.database.sqlite.write_ahead_log != b.database.sqlite.write_ahead_log,
            ),
            (
                "database.postgres",
                a.database.postgres != b.database.postgres,
            ),
            ("prefixes.v4", a.prefixes.v4 != b.prefixes.v4),
            ("prefixes.v6", a.prefixes.v6 != b.prefixes.v6),
            (
                "prefixes.allocation",
                a.prefixes.allocation != b.prefixes.allocation,
            ),
            (
                "derp.server.enabled",
                a.derp.embedded() != b.derp.embedded(),
            ),
            ("derp.server.listen_addr", sa.listen_addr != sb.listen_addr),
            (
                "derp.server.stun_listen_addr",
                sa.stun_listen_addr != sb.stun_listen_addr,
            ),
            (
                "derp.server.stun_alt_listen_addr",
                sa.stun_alt_listen_addr != sb.stun_alt_listen_addr,
            ),
            (
                "derp.server.private_key_path",
                sa.private_key_path != sb.private_key_path,
            ),
            (
                "derp.server.verify_clients",
                sa.verify_clients != sb.verify_clients,
            ),
            (
                "connections.listen_backlog",
                ca.listen_backlog != cb.listen_backlog,
            ),
            (
                "connections.max_connections",
                ca.max_connections != cb.max_connections,
            ),
            (
                "connections.handshake_timeout",
                ca.handshake_timeout != cb.handshake_timeout,
            ),
            (
                "connections.idle_timeout",
                ca.idle_timeout != cb.idle_timeout,
            ),
            (
                "connections.http2_ping_interval",
                ca.http2_ping_interval != cb.http2_ping_interval,
            ),
            (
                "connections.http2_ping_timeout",
                ca.http2_ping_timeout != cb.http2_ping_timeout,
            ),
            ("web.enabled", a.web.enabled != b.web.enabled),
            ("web.listen_addr", a.web.listen_addr != b.web.listen_addr),
            ("policy.mode", a.policy.mode != b.policy.mode),
            ("policy.path", a.policy.path != b.policy.path),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

/// A level, or comma-separated `level` and `target=level` directives that `tracing` accepts.
/// A bare word that is not a level is refused (`tracing` would read it as a target).
fn valid_log_level(text: &str) -> bool {
    let level = |l: &str| {
        ["trace", "debug", "info", "warn", "error", "off"]
            .iter()
            .any(|n| l.trim().eq_ignore_ascii_case(n))
    };
    !text.trim().is_empty()
        && text.split(',').all(|d| match d.rsplit_once('=') {
            Some((target, l)) => !target.trim().is_empty() && level(l),
            None => level(d),
        })
        && tracing_subscriber::EnvFilter::builder().parse(text).is_ok()
}

/// Parses Go-style durations as Headscale writes them: "90s", "30m", "1h30m", "2d".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut digits = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            unit = "ms".into();
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?}: a number must precede {unit:?}"))?;
        digits.clear();
        let d = match unit.as_str() {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use ms, s, m, h, d)"
                ));
            }
        };
        total = total.saturating_add(d);
    }
    if !digits.is_empty() {
        return Err(format!("{text:?}: missing unit after {digits}"));
    }
    Ok(total)
}

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).expect("defaults");
        assert_eq!(c.listen_addr.port(), 50443);
        assert_eq!(c.prefixes.v4.to_string(), "100.64.0.0/10");
        assert_eq!(
            c.ephemeral_node_inactivity_timeout,
            Duration::from_secs(1800)
        );
    }

    #[test]
    fn headscale_keys_are_read() {
        let c = Config::parse(
            r#"
server_url = "http://10.0.0.1:50443"
listen_addr = "10.0.0.1:50443"
ephemeral_node_inactivity_timeout = "2m"
[database]
type = "sqlite"
[database.sqlite]
path = "/tmp/x.sqlite"
[prefixes]
v4 = "100.64.0.0/24"
[dns]
base_domain = "example.test"
"#,
            Path::new("x.toml"),
        )
        .expect("parses");
        assert_eq!(c.prefixes.v4.to_string(), "100.64.0.0/24");
        assert_eq!(
            c.ephemeral_node_inactivity_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(c.database.sqlite.path, Path::new("/tmp/x.sqlite"));
    }

    #[test]
    fn dns_nameservers_search_domains_and_extra_records() {
        let c = Config::parse(
            r#"
[dns]
base_domain = "mesh.example"
search_domains = ["corp.example"]
extra_records = [{ name = "grafana.mesh.example", type = "A", value = "100.64.0.9" },
                 { name = "v6.mesh.example", type = "AAAA", value = "fd7a:115c:a1e0::9" }]
[dns.nameservers]
global = ["1.1.1.1", "[2606:4700:4700::1111]:53"]
split = { "corp.example" = ["10.0.0.53:5353"] }
"#,
            Path::new("x.toml"),
        )
        .expect("parses");
        let w = c.dns.wire();
        assert_eq!(w.nameservers, ["1.1.1.1", "[2606:4700:4700::1111]:53"]);
        assert_eq!(w.split.len(), 1);
        assert_eq!(
            (w.split[0].domain.as_str(), w.split[0].nameservers.clone()),
            ("corp.example", vec!["10.0.0.53:5353".to_owned()])
        );
        assert_eq!(w.search_domains, ["corp.example"]);
        assert_eq!(w.extra_records[1].r#type, "AAAA");

        let bad = |text: &str| {
            Config::parse(text, Path::new("x.toml"))
                .expect_err("refused")
                .to_string()
        };
        assert_eq!(
            bad(
                "[dns]\nextra_records = [{ name = \"x.example\", type = \"CNAME\", value = \"y\" }]\n"
            ),
            "dns.extra_records: x.example: type \"CNAME\" is not supported; only \"A\" and \"AAAA\""
        );
        assert_eq!(
            bad(
                "[dns]\nextra_records = [{ name = \"x.example\", type = \"A\", value = \"::1\" }]\n"
            ),
            "dns.extra_records: x.example: \"::1\" is not an A address"
        );
        assert_eq!(
            bad("[dns.nameservers]\nglobal = [\"https://dns.example/dns-query\"]\n"),
            "dns.nameservers.global: \"https://dns.example/dns-query\" is not an IP address or ip:port"
        );
        assert_eq!(
            bad("[dns.nameservers]\nsplit = { \"corp.example\" = [] }\n"),
            "dns.nameservers.split: \"corp.example\" has no nameservers"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[database]\nflavour = \"x\"\n", Path::new("c.toml"))
            .expect_err("unknown");
        assert!(err.to_string().contains("flavour"), "{err}");
        let err = Config::parse("listen_adr = \"1.2.3.4:5\"\n", Path::new("c.toml"))
            .expect_err("unknown");
        assert!(err.to_string().contains("listen_adr"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let err = Config::parse("[prefixes]\nv4 = \"10.0.0.0/8\"\n", Path::new("c.toml"))
            .expect_err("range");
        assert!(err.to_string().contains("prefixes.v4"));
        let err =
            Config::parse("[database]\ntype = \"mysql\"\n", Path::new("c.toml")).expect_err("db");
        assert!(err.to_string().contains("database.type"));
        // The default v4 range (/10) needs a v6 range of /106 or larger.
        let err = Config::parse(
            "[prefixes]\nv6 = \"fd7a:115c:a1e0::/120\"\n",
            Path::new("c.toml"),
        )
        .expect_err("v6 too small");
        assert!(err.to_string().contains("prefixes.v6"), "{err}");
        Config::parse(
            "[prefixes]\nv6 = \"fd7a:115c:a1e0::/106\"\n",
            Path::new("c.toml"),
        )
        .expect("v6 as large as v4");
    }

    #[test]
    fn v6_prefix_outside_the_tailscale_range_is_refused() {
        for outside in [
            "2001:db8::/48",
            "fd7a:115c:a1e1::/64",
            "fd7a:115c::/32",
            "::/0",
        ] {
            let err = Config::parse(
                &format!("[prefixes]\nv6 = \"{outside}\"\n"),
                Path::new("c.toml"),
            )
            .expect_err(outside);
            assert!(
                matches!(err, ConfigError::Invalid { key: "prefixes.v6", ref reason } if reason.contains("fd7a:115c:a1e0::/48")),
                "{outside}: {err}"
            );
        }
        Config::parse(
            "[prefixes]\nv6 = \"fd7a:115c:a1e0:ab12::/64\"\n",
            Path::new("c.toml"),
        )
        .expect("a /64 inside the range");
    }

    #[test]
    fn second_stun_address_defaults_to_the_next_port() {
        let server = |text: &str| {
            Config::parse(text, Path::new("c.toml")).map(|c| {
                (
                    c.derp.server.stun_alt_listen_addr,
                    c.derp.server.stun_alt_listen(),
                )
            })
        };
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            server("").expect("default"),
            (AltStun::NextPort, Some(addr("0.0.0.0:3479")))
        );
        assert_eq!(
            server("[derp.server]\nstun_listen_addr = \"127.0.0.1:0\"\n").expect("ephemeral"),
            (AltStun::NextPort, Some(addr("127.0.0.1:0")))
        );
        assert_eq!(
            server("[derp.server]\nstun_alt_listen_addr = \"off\"\n").expect("off"),
            (AltStun::Off, None)
        );
        assert_eq!(
            server("[derp.server]\nstun_alt_listen_addr = \"192.0.2.9:3478\"\n").expect("at"),
            (
                AltStun::At(addr("192.0.2.9:3478")),
                Some(addr("192.0.2.9:3478"))
            )
        );
        let err = server("[derp.server]\nstun_listen_addr = \"0.0.0.0:65535\"\n")
            .expect_err("no next port");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "derp.server.stun_alt_listen_addr",
                    ..
                }
            ),
            "{err}"
        );
        let err = server("[derp.server]\nstun_alt_listen_addr = \"0.0.0.0:3478\"\n")
            .expect_err("the same address");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "derp.server.stun_alt_listen_addr",
                    ..
                }
            ),
            "{err}"
        );
        let err = server("[derp.server]\nstun_alt_listen_addr = \"of\"\n").expect_err("typo");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn policy_section_takes_headscale_keys() {
        let c = Config::parse("", Path::new("c.toml")).expect("defaults");
        assert_eq!(c.policy.mode, PolicyMode::File);
        assert_eq!(c.policy.file(), None, "no path: no policy");
        let c = Config::parse(
            "[policy]\nmode = \"file\"\npath = \"/etc/warren/policy.hujson\"\n",
            Path::new("c.toml"),
        )
        .expect("file mode");
        assert_eq!(
            c.policy.file(),
            Some(Path::new("/etc/warren/policy.hujson"))
        );
        let c = Config::parse("[policy]\nmode = \"database\"\n", Path::new("c.toml"))
            .expect("database mode");
        assert_eq!(c.policy.mode, PolicyMode::Database);
        assert_eq!(c.policy.file(), None);
        let err = Config::parse("[policy]\nmode = \"db\"\n", Path::new("c.toml"))
            .expect_err("unknown mode");
        assert!(
            matches!(&err, ConfigError::Parse { message, .. } if message.contains("database")),
            "{err}"
        );
        let err = Config::parse(
            "[policy]\nmode = \"database\"\npath = \"/etc/p.hujson\"\n",
            Path::new("c.toml"),
        )
        .expect_err("a path in database mode");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "policy.path",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn log_level_defaults_to_info_and_a_bad_one_is_named() {
        let c = Config::parse("", Path::new("c.toml")).expect("defaults");
        assert_eq!(c.log.level, "info");
        let c = Config::parse("[log]\nlevel = \"debug\"\n", Path::new("c.toml")).expect("debug");
        assert_eq!(c.log.level, "debug");
        for bad in ["verbose", "loud=", "", "info,x=loud"] {
            let err = Config::parse(&format!("[log]\nlevel = {bad:?}\n"), Path::new("c.toml"))
                .expect_err(bad);
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        key: "log.level",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
        let c = Config::parse(
            "[log]\nlevel = \"WARN,warren_control=debug\"\n",
            Path::new("c.toml"),
        )
        .expect("directives");
        assert_eq!(c.log.level, "WARN,warren_control=debug");
    }

    #[test]
    fn restart_keys_name_what_cannot_change_live() {
        let parse = |text: &str| Config::parse(text, Path::new("c.toml")).expect("parses");
        let old = parse("");
        let new = parse(
            "listen_addr = \"127.0.0.1:1\"\nserver_url = \"http://192.0.2.1:50443\"\n\
             [dns]\nbase_domain = \"x.example\"\n[log]\nlevel = \"debug\"\n\
             [database.sqlite]\npath = \"/tmp/other.sqlite\"\n\
             [web]\nlisten_addr = \"127.0.0.1:9\"\n",
        );
        assert_eq!(
            old.restart_keys(&new),
            ["listen_addr", "database.sqlite.path", "web.listen_addr"]
        );
        assert_eq!(old.restart_keys(&old), Vec::<&str>::new());
        // Unset `enabled` follows derp.paths: a map file turns the embedded server off.
        let with_paths = parse("[derp]\npaths = [\"/etc/warren/derp.json\"]\n");
        assert_eq!(old.restart_keys(&with_paths), ["derp.server.enabled"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("3w").is_err());
    }
}
