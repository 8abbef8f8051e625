//! The admin CLI: `warren-control users|preauthkeys|nodes|apikeys|policy|health ...`. It talks to
//! the Admin API over the server's local unix socket (root on the same host) or over TCP with an
//! API key, and prints tables for people or JSON for scripts. `configtest` checks the
//! configuration offline, without a server.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use warren_proto::NodePublicKey;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::*;

use crate::config::parse_duration;

/// Stdout was closed under us (`... | head -1`): the reader is done, which is no error.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
pub struct StdoutClosed;

/// `println!` that returns an error instead of panicking when stdout is gone (`| head`):
/// [`StdoutClosed`] for a closed pipe, the I/O error otherwise.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(|e| -> anyhow::Error {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                StdoutClosed.into()
            } else {
                e.into()
            }
        })?;
    }};
}

/// Command line of `warren-control`.
#[derive(Debug, Parser)]
#[command(
    name = "warren-control",
    version,
    about = "warren's coordination server and its admin CLI"
)]
pub struct Cli {
    /// Configuration file (TOML). `serve` runs with defaults without one.
    #[arg(long, short, global = true, env = "WARREN_CONTROL_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's admin unix socket [default: the config's unix_socket].
    #[arg(long, global = true, env = "WARREN_CONTROL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// A remote server's URL; needs --api-key.
    #[arg(long, global = true, env = "WARREN_CONTROL_URL")]
    pub server: Option<String>,
    /// API key for --server.
    #[arg(long, global = true, env = "WARREN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server in the foreground.
    Serve,
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage pre-auth keys.
    #[command(subcommand, alias = "preauthkey")]
    Preauthkeys(PreauthkeysCmd),
    /// Manage nodes.
    #[command(subcommand, alias = "node")]
    Nodes(NodesCmd),
    /// Manage API keys.
    #[command(subcommand, alias = "apikey")]
    Apikeys(ApikeysCmd),
    /// The access policy: show, replace, check, explain.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Check the configuration file and what it names (policy file, DERP map files) without
    /// starting the server: "config ok", or the error naming the key (the policy's file, line
    /// and column) and a non-zero exit.
    Configtest,
    /// Ask the running server whether it is healthy (its database answers, its policy is in
    /// force); exits non-zero when it is not, or cannot be reached.
    Health,
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Print the policy in force.
    Get,
    /// Replace the policy (policy.mode = "database"): it is compiled and its tests run
    /// against the current nodes; a refused policy changes nothing.
    Set {
        /// The HuJSON policy file; "-" reads standard input.
        file: PathBuf,
    },
    /// Compile a policy and run its tests against the current nodes, changing nothing.
    Check {
        /// The HuJSON policy file; "-" reads standard input.
        file: PathBuf,
    },
    /// Whether SRC may reach DST under the policy in force, the rule that decides, and
    /// whether DST is in SRC's netmap.
    Explain {
        /// A node name, a mesh IP, a user (alice@), a group or a tag.
        src: String,
        /// The same, optionally with a port: server:22, tag:web:443, [fd7a:115c:a1e0::1]:22.
        /// Without a port: any port.
        dst: String,
        /// IP protocol, by name or number.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Ask whether SRC may use this exit node (a node name or mesh IP) to reach DST, an
        /// internet address.
        #[arg(long)]
        exit_node: Option<String>,
    },
}

/// `users` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// Create a user.
    Create {
        /// Lowercase name.
        name: String,
    },
    /// List users.
    List,
    /// Delete a user that has no nodes.
    Delete {
        /// The user's name.
        name: String,
    },
}

/// `preauthkeys` subcommands.
#[derive(Debug, Subcommand)]
pub enum PreauthkeysCmd {
    /// Create a pre-auth key; the key is printed once.
    Create {
        /// Owner.
        #[arg(long, short)]
        user: String,
        /// Usable for more than one node.
        #[arg(long)]
        reusable: bool,
        /// Nodes are deleted after they go away.
        #[arg(long)]
        ephemeral: bool,
        /// Lifetime, like 1h or 90m.
        #[arg(long, short, default_value = "1h")]
        expiration: String,
        /// Comma-separated tags, each tag:<name>.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// List pre-auth keys.
    List {
        /// Only this user's.
        #[arg(long, short)]
        user: Option<String>,
    },
    /// Expire a pre-auth key now.
    Expire {
        /// The key's prefix (from `list`).
        prefix: String,
    },
}

/// `nodes` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List nodes.
    List {
        /// Only this user's.
        #[arg(long, short)]
        user: Option<String>,
    },
    /// Delete a node; its peers drop it at once.
    Delete {
        /// Node id.
        id: u64,
    },
    /// Expire a node's key now; it must register again.
    Expire {
        /// Node id.
        id: u64,
    },
    /// Give a node a new name.
    Rename {
        /// Node id.
        id: u64,
        /// New DNS label.
        name: String,
    },
    /// Replace a node's tags; it is then owned by its tags, not by a user.
    Tag {
        /// Node id.
        id: u64,
        /// Comma-separated tags, each tag:<name> and owned in the policy's tagOwners.
        #[arg(long, short, value_delimiter = ',', required = true)]
        tags: Vec<String>,
    },
    /// Set the routes a node is approved to serve (the whole list; "" clears it). Only routes
    /// the node also advertises are served; 0.0.0.0/0 or ::/0 approves it as an exit node.
    ApproveRoutes {
        /// Node id.
        id: u64,
        /// Comma-separated prefixes: 10.20.0.0/24,0.0.0.0/0; "" clears every approval.
        #[arg(long, short, required = true)]
        routes: String,
    },
    /// List the nodes with routes: advertised, approved, and the ones they serve as primary.
    ListRoutes {
        /// Only this node.
        #[arg(long, short)]
        id: Option<u64>,
    },
}

/// A node's routes, as `nodes list-routes` prints them (Headscale's shape).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RoutesView {
    /// Node id.
    pub id: u64,
    /// Node name.
    pub name: String,
    /// What the node advertises.
    pub advertised: Vec<String>,
    /// What is approved for it.
    pub approved: Vec<String>,
    /// The subnet routes it is primary for, plus the exit routes when it is an approved
    /// exit node that advertises them: what it actually serves now.
    pub serving: Vec<String>,
}

impl RoutesView {
    /// The view of `n`; `None` when it neither advertises nor has approved routes.
    pub fn of(n: &Node) -> Option<Self> {
        if n.advertised_routes.is_empty() && n.approved_routes.is_empty() {
            return None;
        }
        let mut serving = n.primary_routes.clone();
        if n.exit_node {
            serving.extend(
                n.advertised_routes
                    .iter()
                    .filter(|r| r.ends_with("/0") && n.approved_routes.contains(r))
                    .cloned(),
            );
        }
        Some(Self {
            id: n.id,
            name: n.given_name.clone(),
            advertised: n.advertised_routes.clone(),
            approved: n.approved_routes.clone(),
            serving,
        })
    }
}

/// Splits `--routes` text: comma-separated, blanks dropped, so "" is the empty list.
pub fn route_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `apikeys` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApikeysCmd {
    /// Create an API key; the key is printed once.
    Create {
        /// Lifetime, like 90d; 0 for none.
        #[arg(long, short, default_value = "90d")]
        expiration: String,
    },
    /// List API keys.
    List,
    /// Expire an API key now.
    Expire {
        /// The key's prefix.
        prefix: String,
    },
}

/// A gRPC channel to control's local admin socket at `path`.
pub async fn connect_unix(path: &std::path::Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// Connects to the Admin API as the flags say.
pub async fn connect(cli: &Cli, default_socket: PathBuf) -> anyhow::Result<AdminClient<Channel>> {
    let channel = if let Some(url) = &cli.server {
        Endpoint::from_shared(url.clone())
            .context("bad --server URL")?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?
    } else {
        let path = cli.socket.clone().unwrap_or(default_socket);
        connect_unix(&path).await.with_context(|| {
            format!(
                "connecting to {} (is warren-control serve running? are you root?)",
                path.display()
            )
        })?
    };
    Ok(AdminClient::new(channel))
}

fn with_key<T>(cli: &Cli, msg: T) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    if cli.server.is_some() {
        let key = cli
            .api_key
            .as_deref()
            .context("--server needs --api-key (or WARREN_API_KEY)")?;
        let value = format!("Bearer {key}")
            .parse()
            .context("API key has characters a header cannot carry")?;
        req.metadata_mut().insert("authorization", value);
    }
    Ok(req)
}

/// Formats Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC; 0 as "-".
pub fn fmt_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> anyhow::Result<()> {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out!("{}", s.join("  ").trim_end());
        Ok(())
    };
    line(headers.iter().map(|h| h.to_string()).collect())?;
    for r in rows {
        line(r)?;
    }
    Ok(())
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A node, as the CLI prints it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// Node id.
    pub id: u64,
    /// Unique name.
    pub given_name: String,
    /// Reported hostname.
    pub hostname: String,
    /// Owner.
    pub user: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Mesh addresses.
    pub addresses: Vec<String>,
    /// Reported endpoints.
    pub endpoints: Vec<String>,
    /// Connected now.
    pub online: bool,
    /// Node key, text form.
    pub node_key: String,
    /// Unix ms; 0 for never.
    pub last_seen_unix_ms: i64,
    /// Unix ms; 0 for none.
    pub expiry_unix_ms: i64,
    /// Unix ms.
    pub created_unix_ms: i64,
    /// Ephemeral.
    pub ephemeral: bool,
}

impl From<&Node> for NodeView {
    fn from(n: &Node) -> Self {
        Self {
            id: n.id,
            given_name: n.given_name.clone(),
            hostname: n.hostname.clone(),
            user: n.user.clone(),
            tags: n.tags.clone(),
            addresses: n.addresses.clone(),
            endpoints: n.endpoints.clone(),
            online: n.online,
            node_key: NodePublicKey::from_slice(&n.node_key)
                .map(|k| k.to_string())
                .unwrap_or_default(),
            last_seen_unix_ms: n.last_seen_unix_ms,
            expiry_unix_ms: n.expiry_unix_ms,
            created_unix_ms: n.created_unix_ms,
            ephemeral: n.ephemeral,
        }
    }
}

#[derive(Serialize)]
struct UserView {
    id: u64,
    name: String,
    created_unix_ms: i64,
}

#[derive(Serialize)]
struct AuthKeyView {
    id: u64,
    user: String,
    prefix: String,
    reusable: bool,
    ephemeral: bool,
    used: bool,
    expiration_unix_ms: i64,
    created_unix_ms: i64,
    tags: Vec<String>,
}

impl From<&PreAuthKey> for AuthKeyView {
    fn from(k: &PreAuthKey) -> Self {
        Self {
            id: k.id,
            user: k.user.clone(),
            prefix: k.prefix.clone(),
            reusable: k.reusable,
            ephemeral: k.ephemeral,
            used: k.used,
            expiration_unix_ms: k.expiration_unix_ms,
            created_unix_ms: k.created_unix_ms,
            tags: k.tags.clone(),
        }
    }
}

#[derive(Serialize)]
struct ApiKeyView {
    id: u64,
    prefix: String,
    expiration_unix_ms: i64,
    created_unix_ms: i64,
    last_used_unix_ms: i64,
}

impl From<&ApiKey> for ApiKeyView {
    fn from(k: &ApiKey) -> Self {
        Self {
            id: k.id,
            prefix: k.prefix.clone(),
            expiration_unix_ms: k.expiration_unix_ms,
            created_unix_ms: k.created_unix_ms,
            last_used_unix_ms: k.last_used_unix_ms,
        }
    }
}

#[derive(Serialize)]
struct Created<T> {
    key: T,
    secret: String,
}

fn lifetime(text: &str) -> anyhow::Result<u64> {
    let d = parse_duration(text).map_err(|e| anyhow::anyhow!("--expiration: {e}"))?;
    Ok(d.as_secs().max(u64::from(!d.is_zero())))
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

fn user_row(u: &User) -> Vec<String> {
    vec![
        u.id.to_string(),
        u.name.clone(),
        fmt_time(u.created_unix_ms),
    ]
}

fn node_rows(nodes: &[Node]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.given_name.clone(),
                n.user.clone(),
                n.addresses.join(", "),
                if n.online {
                    "online".into()
                } else {
                    "offline".into()
                },
                fmt_time(n.last_seen_unix_ms),
                fmt_time(n.expiry_unix_ms),
                n.tags.join(","),
            ]
        })
        .collect()
}

const NODE_HEADERS: &[&str] = &[
    "ID",
    "NAME",
    "USER",
    "ADDRESSES",
    "STATUS",
    "LAST SEEN",
    "EXPIRES",
    "TAGS",
];

/// What `configtest` found in a configuration that loads.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConfigReport {
    /// The configuration file.
    pub config: PathBuf,
    /// The policy file that compiled (file mode with `policy.path`).
    pub policy_file: Option<PathBuf>,
    /// `policy.mode`: "file" or "database".
    pub policy_mode: &'static str,
    /// DERP map files that loaded (`derp.paths`).
    pub derp_maps: Vec<PathBuf>,
}

/// `configtest`: loads the configuration at `path` and checks the files it names: the policy
/// file (file mode) must compile, the DERP map files must load. The policy's `tests` are not
/// run (they depend on the nodes registered; the server runs them at start), nor is a policy
/// stored in the database read (database mode). The error names the key, or the file, line and
/// column.
pub fn configtest(path: Option<&Path>) -> anyhow::Result<ConfigReport> {
    use crate::serve::{PolicyLoadError, PolicyOrigin, read_policy_file};
    let path = path.context(
        "configtest needs a configuration file: --config PATH (or WARREN_CONTROL_CONFIG)",
    )?;
    let config = crate::config::Config::load(path)?;
    let policy_file = config.policy.file().map(Path::to_path_buf);
    if let Some(file) = &policy_file {
        // The message alone: its source is part of it already (no "a: b: b" chain).
        let text = read_policy_file(file).map_err(|e| anyhow::anyhow!("{e}"))?;
        match crate::grpc::compile_policy(&text) {
            Ok(_) => {}
            Err(crate::error::ControlError::Policy(source)) => {
                let e = PolicyLoadError::Invalid {
                    origin: PolicyOrigin::File(file.clone()),
                    source,
                };
                anyhow::bail!("{e}");
            }
            Err(e) => anyhow::bail!("policy file {}: {e}", file.display()),
        }
    }
    if !config.derp.paths.is_empty() {
        crate::derpmap::load(&config.derp.paths)?;
    }
    Ok(ConfigReport {
        config: path.to_path_buf(),
        policy_file,
        policy_mode: config.policy.mode.as_str(),
        derp_maps: config.derp.paths.clone(),
    })
}

fn print_configtest(cli: &Cli) -> anyhow::Result<()> {
    let report = configtest(cli.config.as_deref())?;
    if cli.output == Output::Json {
        return print_json(&report);
    }
    match (&report.policy_file, report.policy_mode) {
        (Some(file), _) => out!("policy ok: {}", file.display()),
        (None, "database") => out!(
            "policy: database mode (the stored policy is checked when the server starts; \
             `warren-control policy get` shows it)"
        ),
        (None, _) => out!("policy: none configured (every node may reach every other)"),
    }
    for map in &report.derp_maps {
        out!("DERP map ok: {}", map.display());
    }
    out!("config ok: {}", report.config.display());
    Ok(())
}

/// The health of a running server, as `health` prints it.
#[derive(Debug, Serialize)]
struct HealthView {
    healthy: bool,
    database: String,
    policy_configured: bool,
    policy_mode: String,
    policy_path: String,
    nodes: u64,
    nodes_online: u64,
}

/// The innermost I/O error in `e`'s chain, for a message that says why a connection failed.
fn io_cause(e: &anyhow::Error) -> Option<&std::io::Error> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .last()
}

async fn health(cli: &Cli, default_socket: PathBuf) -> anyhow::Result<()> {
    let target = match &cli.server {
        Some(url) => url.clone(),
        None => cli
            .socket
            .clone()
            .unwrap_or_else(|| default_socket.clone())
            .display()
            .to_string(),
    };
    let mut c = match connect(cli, default_socket).await {
        Ok(c) => c,
        Err(e) => match io_cause(&e) {
            Some(io) => anyhow::bail!("not healthy: cannot reach the server at {target}: {io}"),
            None => return Err(e.context("not healthy")),
        },
    };
    let h = c
        .health(with_key(cli, HealthRequest {})?)
        .await
        .map_err(|e| status_error(e).context("not healthy"))?
        .into_inner();
    let view = HealthView {
        healthy: h.healthy,
        database: if h.database_error.is_empty() {
            "ok".into()
        } else {
            h.database_error.clone()
        },
        policy_configured: h.policy_configured,
        policy_mode: h.policy_mode.clone(),
        policy_path: h.policy_path.clone(),
        nodes: h.nodes,
        nodes_online: h.nodes_online,
    };
    if cli.output == Output::Json {
        print_json(&view)?;
    } else {
        out!("{}", if h.healthy { "healthy" } else { "not healthy" });
        out!("database: {}", view.database);
        let policy = match (h.policy_configured, h.policy_path.is_empty()) {
            (true, false) => format!("in force, from {}", h.policy_path),
            (true, true) => "in force, stored in the database".to_string(),
            (false, false) => format!("none in force, but {} is configured", h.policy_path),
            (false, true) => "none configured (every node may reach every other)".to_string(),
        };
        out!("policy: {policy}");
        out!("nodes: {} ({} online)", h.nodes, h.nodes_online);
    }
    if !h.healthy {
        anyhow::bail!("not healthy");
    }
    Ok(())
}

/// Runs one admin command against the server (`configtest` needs none).
pub async fn run(cli: &Cli, default_socket: PathBuf) -> anyhow::Result<()> {
    match &cli.command {
        Command::Configtest => return print_configtest(cli),
        Command::Health => return health(cli, default_socket).await,
        _ => {}
    }
    let mut c = connect(cli, default_socket).await?;
    let json = cli.output == Output::Json;
    match &cli.command {
        Command::Serve => handled_before_connecting(),
        Command::Users(cmd) => match cmd {
            UsersCmd::Create { name } => {
                let r = c
                    .create_user(with_key(cli, CreateUserRequest { name: name.clone() })?)
                    .await
                    .map_err(status_error)?;
                let u = r.into_inner().user.unwrap_or_default();
                if json {
                    print_json(&UserView {
                        id: u.id,
                        name: u.name,
                        created_unix_ms: u.created_unix_ms,
                    })?;
                } else {
                    out!("user {} created (id {})", u.name, u.id);
                }
            }
            UsersCmd::List => {
                let users = c
                    .list_users(with_key(cli, ListUsersRequest {})?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .users;
                if json {
                    let v: Vec<_> = users
                        .iter()
                        .map(|u| UserView {
                            id: u.id,
                            name: u.name.clone(),
                            created_unix_ms: u.created_unix_ms,
                        })
                        .collect();
                    print_json(&v)?;
                } else {
                    print_table(
                        &["ID", "NAME", "CREATED"],
                        users.iter().map(user_row).collect(),
                    )?;
                }
            }
            UsersCmd::Delete { name } => {
                c.delete_user(with_key(cli, DeleteUserRequest { name: name.clone() })?)
                    .await
                    .map_err(status_error)?;
                if !json {
                    out!("user {name} deleted");
                }
            }
        },
        Command::Preauthkeys(cmd) => match cmd {
            PreauthkeysCmd::Create {
                user,
                reusable,
                ephemeral,
                expiration,
                tags,
            } => {
                let req = CreatePreAuthKeyRequest {
                    user: user.clone(),
                    reusable: *reusable,
                    ephemeral: *ephemeral,
                    expiration_secs: lifetime(expiration)?,
                    tags: tags.clone(),
                };
                let r = c
                    .create_pre_auth_key(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let key = r.key.unwrap_or_default();
                if json {
                    print_json(&Created {
                        key: AuthKeyView::from(&key),
                        secret: r.secret,
                    })?;
                } else {
                    out!("{}", r.secret);
                }
            }
            PreauthkeysCmd::List { user } => {
                let req = ListPreAuthKeysRequest {
                    user: user.clone().unwrap_or_default(),
                };
                let keys = c
                    .list_pre_auth_keys(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .keys;
                if json {
                    print_json(&keys.iter().map(AuthKeyView::from).collect::<Vec<_>>())?;
                } else {
                    let rows = keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.to_string(),
                                k.prefix.clone(),
                                k.user.clone(),
                                k.reusable.to_string(),
                                k.ephemeral.to_string(),
                                k.used.to_string(),
                                fmt_time(k.expiration_unix_ms),
                                k.tags.join(","),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID",
                            "PREFIX",
                            "USER",
                            "REUSABLE",
                            "EPHEMERAL",
                            "USED",
                            "EXPIRES",
                            "TAGS",
                        ],
                        rows,
                    )?;
                }
            }
            PreauthkeysCmd::Expire { prefix } => {
                let req = ExpirePreAuthKeyRequest {
                    prefix: prefix.clone(),
                };
                c.expire_pre_auth_key(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?;
                if !json {
                    out!("pre-auth key {prefix} expired");
                }
            }
        },
        Command::Nodes(cmd) => match cmd {
            NodesCmd::List { user } => {
                let req = AdminListNodesRequest {
                    user: user.clone().unwrap_or_default(),
                };
                let nodes = c
                    .list_nodes(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .nodes;
                if json {
                    print_json(&nodes.iter().map(NodeView::from).collect::<Vec<_>>())?;
                } else {
                    print_table(NODE_HEADERS, node_rows(&nodes))?;
                }
            }
            NodesCmd::Delete { id } => {
                c.delete_node(with_key(cli, DeleteNodeRequest { id: *id })?)
                    .await
                    .map_err(status_error)?;
                if !json {
                    out!("node {id} deleted");
                }
            }
            NodesCmd::Expire { id } => {
                let r = c
                    .expire_node(with_key(cli, ExpireNodeRequest { id: *id })?)
                    .await
                    .map_err(status_error)?;
                let n = r.into_inner().node.unwrap_or_default();
                if json {
                    print_json(&NodeView::from(&n))?;
                } else {
                    out!("node {} ({}) expired", n.id, n.given_name);
                }
            }
            NodesCmd::Rename { id, name } => {
                let req = RenameNodeRequest {
                    id: *id,
                    new_name: name.clone(),
                };
                let n = c
                    .rename_node(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .node
                    .unwrap_or_default();
                if json {
                    print_json(&NodeView::from(&n))?;
                } else {
                    out!("node {} renamed to {}", n.id, n.given_name);
                }
            }
            NodesCmd::Tag { id, tags } => {
                let req = TagNodeRequest {
                    id: *id,
                    tags: tags.clone(),
                };
                let n = c
                    .tag_node(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .node
                    .unwrap_or_default();
                if json {
                    print_json(&NodeView::from(&n))?;
                } else {
                    out!(
                        "node {} ({}) tagged {}",
                        n.id,
                        n.given_name,
                        n.tags.join(",")
                    );
                }
            }
            NodesCmd::ApproveRoutes { id, routes } => {
                let req = ApproveRoutesRequest {
                    id: *id,
                    routes: route_list(routes),
                };
                let n = c
                    .approve_routes(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .node
                    .unwrap_or_default();
                if json {
                    print_json(&RoutesView::of(&n))?;
                } else if n.approved_routes.is_empty() {
                    out!("node {} ({}): no routes approved", n.id, n.given_name);
                } else {
                    out!(
                        "node {} ({}) approved routes: {}",
                        n.id,
                        n.given_name,
                        n.approved_routes.join(", ")
                    );
                }
            }
            NodesCmd::ListRoutes { id } => {
                let nodes = c
                    .list_nodes(with_key(cli, AdminListNodesRequest::default())?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .nodes;
                let views: Vec<RoutesView> = nodes
                    .iter()
                    .filter(|n| id.is_none_or(|id| n.id == id))
                    .filter_map(RoutesView::of)
                    .collect();
                if json {
                    print_json(&views)?;
                } else {
                    let rows = views
                        .iter()
                        .map(|v| {
                            vec![
                                v.id.to_string(),
                                v.name.clone(),
                                v.approved.join(", "),
                                v.advertised.join(", "),
                                v.serving.join(", "),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID",
                            "HOSTNAME",
                            "APPROVED",
                            "AVAILABLE",
                            "SERVING (PRIMARY)",
                        ],
                        rows,
                    )?;
                }
            }
        },
        Command::Policy(cmd) => policy(cli, &mut c, cmd).await?,
        Command::Configtest | Command::Health => handled_before_connecting(),
        Command::Apikeys(cmd) => match cmd {
            ApikeysCmd::Create { expiration } => {
                let req = CreateApiKeyRequest {
                    expiration_secs: lifetime(expiration)?,
                };
                let r = c
                    .create_api_key(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let key = r.key.unwrap_or_default();
                if json {
                    print_json(&Created {
                        key: ApiKeyView::from(&key),
                        secret: r.secret,
                    })?;
                } else {
                    out!("{}", r.secret);
                }
            }
            ApikeysCmd::List => {
                let keys = c
                    .list_api_keys(with_key(cli, ListApiKeysRequest {})?)
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .keys;
                if json {
                    print_json(&keys.iter().map(ApiKeyView::from).collect::<Vec<_>>())?;
                } else {
                    let rows = keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.to_string(),
                                k.prefix.clone(),
                                fmt_time(k.expiration_unix_ms),
                                fmt_time(k.created_unix_ms),
                                fmt_time(k.last_used_unix_ms),
                            ]
                        })
                        .collect();
                    print_table(&["ID", "PREFIX", "EXPIRES", "CREATED", "LAST USED"], rows)?;
                }
            }
            ApikeysCmd::Expire { prefix } => {
                let req = ExpireApiKeyRequest {
                    prefix: prefix.clone(),
                };
                c.expire_api_key(with_key(cli, req)?)
                    .await
                    .map_err(status_error)?;
                if !json {
                    out!("API key {prefix} expired");
                }
            }
        },
    }
    Ok(())
}

/// Reads a policy file ("-": standard input), refusing one the server would refuse for size.
fn read_policy(file: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let limit = crate::grpc::MAX_POLICY_BYTES;
    let mut text = String::new();
    let taken = if file == std::path::Path::new("-") {
        std::io::stdin()
            .take(limit as u64 + 1)
            .read_to_string(&mut text)
            .context("reading the policy from standard input")?
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("opening {}", file.display()))?
            .take(limit as u64 + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", file.display()))?
    };
    anyhow::ensure!(
        taken <= limit,
        "{}: larger than {limit} bytes, the most a policy may have",
        file.display()
    );
    Ok(text)
}

/// `DST[:PORT]`: a trailing `:digits` (or `:*`) is the port unless the whole text is an IP
/// address; `[v6]:port` for an IPv6 address with a port.
pub fn split_port(dst: &str) -> anyhow::Result<(String, Option<u16>)> {
    if dst.parse::<std::net::IpAddr>().is_ok() {
        return Ok((dst.to_owned(), None));
    }
    if let Some(rest) = dst.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .context("[v6]:port: missing ']:' after the address")?;
        ip.parse::<std::net::Ipv6Addr>()
            .with_context(|| format!("{ip:?} is not an IPv6 address"))?;
        return Ok((ip.to_owned(), parse_port(port)?));
    }
    match dst.rsplit_once(':') {
        Some((what, port))
            if !what.is_empty() && (port == "*" || port.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Ok((what.to_owned(), parse_port(port)?))
        }
        _ => Ok((dst.to_owned(), None)),
    }
}

fn parse_port(port: &str) -> anyhow::Result<Option<u16>> {
    if port == "*" {
        return Ok(None);
    }
    port.parse::<u16>()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("port {port:?}: not a number 0-65535"))
}

/// The rule that decided, as people read it: `acls[0] (line 5, column 3)`.
fn rule_text(r: &PolicyRuleRef) -> String {
    if r.section == "default" {
        return "the default (no acls or grants: allow all)".into();
    }
    format!(
        "{}[{}] (line {}, column {})",
        r.section, r.index, r.line, r.column
    )
}

#[derive(Serialize)]
struct RuleView {
    section: String,
    index: u32,
    line: u32,
    column: u32,
}

#[derive(Serialize)]
struct DecisionView {
    src: String,
    src_node_id: Option<u64>,
    src_ip: String,
    dst: String,
    dst_node_id: Option<u64>,
    dst_ip: String,
    allowed: bool,
    rule: Option<RuleView>,
    port: Option<u32>,
    in_netmap: bool,
    /// With `--exit-node`: whether the exit node is offered to SRC.
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_node_offered: Option<bool>,
}

#[derive(Serialize)]
struct ExplainView {
    policy_configured: bool,
    proto: u32,
    /// "any" or the port asked about.
    port: String,
    decisions: Vec<DecisionView>,
    omitted: u64,
}

/// Whether a protocol has ports (TCP, UDP, SCTP).
fn has_ports(proto: u32) -> bool {
    matches!(proto, 6 | 17 | 132)
}

fn side(name: &str, ip: &str) -> String {
    if name.is_empty() {
        ip.to_owned()
    } else {
        format!("{name} ({ip})")
    }
}

/// `warren-control policy ...`.
async fn policy(cli: &Cli, c: &mut AdminClient<Channel>, cmd: &PolicyCmd) -> anyhow::Result<()> {
    let json = cli.output == Output::Json;
    match cmd {
        PolicyCmd::Get => {
            let r = c
                .get_policy(with_key(cli, GetPolicyRequest {})?)
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "configured": r.configured,
                    "mode": r.mode,
                    "path": r.path,
                    "policy": r.policy,
                }))?;
            } else if !r.configured {
                out!("no policy: every node may reach every other");
            } else {
                out!("{}", r.policy.trim_end());
            }
        }
        PolicyCmd::Set { file } => {
            let text = read_policy(file)?;
            let r = c
                .set_policy(with_key(cli, SetPolicyRequest { policy: text })?)
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({ "updates_sent": r.updates_sent }))?;
            } else {
                out!("policy set ({} map updates sent)", r.updates_sent);
            }
        }
        PolicyCmd::Check { file } => {
            let text = read_policy(file)?;
            c.check_policy(with_key(cli, CheckPolicyRequest { policy: text })?)
                .await
                .map_err(status_error)?;
            if json {
                print_json(&serde_json::json!({ "ok": true }))?;
            } else {
                out!("policy ok");
            }
        }
        PolicyCmd::Explain {
            src,
            dst,
            proto,
            exit_node,
        } => {
            let (dst, port) = split_port(dst)?;
            let req = ExplainPolicyRequest {
                src: src.clone(),
                dst,
                port: port.map(u32::from),
                proto: proto.clone(),
                exit_node: exit_node.clone().unwrap_or_default(),
            };
            let r = c
                .explain_policy(with_key(cli, req)?)
                .await
                .map_err(status_error)?
                .into_inner();
            let ports = has_ports(r.proto);
            if json {
                let view = ExplainView {
                    policy_configured: r.configured,
                    proto: r.proto,
                    port: match port {
                        Some(p) => p.to_string(),
                        None => "any".into(),
                    },
                    decisions: r
                        .decisions
                        .iter()
                        .map(|d| DecisionView {
                            src: d.src_node.clone(),
                            src_node_id: (d.src_node_id != 0).then_some(d.src_node_id),
                            src_ip: d.src_ip.clone(),
                            dst: d.dst_node.clone(),
                            dst_node_id: (d.dst_node_id != 0).then_some(d.dst_node_id),
                            dst_ip: d.dst_ip.clone(),
                            allowed: d.allowed,
                            rule: d.rule.as_ref().map(|r| RuleView {
                                section: r.section.clone(),
                                index: r.index,
                                line: r.line,
                                column: r.column,
                            }),
                            port: (ports && d.allowed).then_some(d.port),
                            in_netmap: d.visible,
                            exit_node_offered: exit_node.is_some().then_some(d.exit_node_offered),
                        })
                        .collect(),
                    omitted: r.omitted,
                };
                print_json(&view)?;
                return Ok(());
            }
            let port_text = match (ports, port) {
                (false, _) => "no ports".to_owned(),
                (true, Some(p)) => format!("port {p}"),
                (true, None) => "any port (an allowed pair names one allowed port)".to_owned(),
            };
            if !r.configured {
                out!("no policy: every node may reach every other");
            }
            out!("proto {proto}, {port_text}");
            for d in r.decisions.iter().filter(|_| exit_node.is_some()) {
                let on = if d.allowed && ports && port.is_none() {
                    format!(" on port {}", d.port)
                } else {
                    String::new()
                };
                let verdict = match &d.rule {
                    _ if !d.exit_node_offered => format!(
                        "denied ({} is not an approved exit node offered to {})",
                        d.dst_node,
                        side(&d.src_node, &d.src_ip)
                    ),
                    Some(rule) if d.allowed => format!("allowed{on} by {}", rule_text(rule)),
                    _ => "denied (no rule allows it)".to_owned(),
                };
                out!(
                    "{} -> {} via exit node {}: {verdict}",
                    side(&d.src_node, &d.src_ip),
                    d.dst_ip,
                    d.dst_node,
                );
            }
            for d in r.decisions.iter().filter(|_| exit_node.is_none()) {
                let on = if d.allowed && ports && port.is_none() {
                    format!(" on port {}", d.port)
                } else {
                    String::new()
                };
                let netmap = match (d.src_node.is_empty(), d.dst_node.is_empty(), d.visible) {
                    (false, false, true) => {
                        format!("; {} is in {}'s netmap", d.dst_node, d.src_node)
                    }
                    (false, false, false) => {
                        format!("; {} is not in {}'s netmap", d.dst_node, d.src_node)
                    }
                    _ => String::new(),
                };
                let verdict = match &d.rule {
                    Some(rule) if d.allowed => format!("allowed{on} by {}", rule_text(rule)),
                    _ => "denied (no rule allows it)".to_owned(),
                };
                out!(
                    "{} -> {}: {verdict}{netmap}",
                    side(&d.src_node, &d.src_ip),
                    side(&d.dst_node, &d.dst_ip),
                );
            }
            if r.decisions.is_empty() {
                out!("no pairs of distinct nodes to explain");
            }
            if r.omitted > 0 {
                out!("... {} more pairs left out", r.omitted);
            }
        }
    }
    Ok(())
}

fn handled_before_connecting() {
    tracing::error!("serve, configtest and health are handled before connecting");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_time(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn destination_ports_are_split_off() {
        let split = |s: &str| split_port(s).expect(s);
        let o = |s: &str, p: Option<u16>| (s.to_owned(), p);
        assert_eq!(split("server:22"), o("server", Some(22)));
        assert_eq!(split("server"), o("server", None));
        assert_eq!(split("tag:web"), o("tag:web", None));
        assert_eq!(split("tag:web:443"), o("tag:web", Some(443)));
        assert_eq!(split("tag:web:*"), o("tag:web", None));
        assert_eq!(split("alice@:80"), o("alice@", Some(80)));
        assert_eq!(split("100.64.0.1:22"), o("100.64.0.1", Some(22)));
        assert_eq!(split("100.64.0.1"), o("100.64.0.1", None));
        assert_eq!(split("fd7a:115c:a1e0::1"), o("fd7a:115c:a1e0::1", None));
        assert_eq!(
            split("[fd7a:115c:a1e0::1]:22"),
            o("fd7a:115c:a1e0::1", Some(22))
        );
        assert!(split_port("server:70000").is_err());
        assert!(split_port("[nope]:22").is_err());
    }

    #[test]
    fn lifetimes() {
        assert_eq!(lifetime("1h").expect("ok"), 3600);
        assert_eq!(lifetime("0").expect("ok"), 0);
        assert!(lifetime("soon").is_err());
    }
}
