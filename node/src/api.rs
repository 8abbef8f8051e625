//! The local API: `warren status`, `warren ip` and `warren down` talk to the running daemon over
//! a unix socket in its state directory, one JSON request and one JSON answer per connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ApiRequest {
    /// The node's state and its peers.
    Status,
    /// Stop the daemon.
    Down,
    /// Ping a peer over disco once; answered with the path and round trip.
    Ping {
        /// The peer's name, mesh address or node key.
        peer: String,
    },
    /// Run a netcheck now and report it.
    Netcheck,
    /// Change preferences of the running node (`warren set`); absent fields stay as they are.
    Set(Prefs),
}

/// Preferences `warren set` changes while the node runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefs {
    /// The exit node, by name or mesh address; `""` stops using one.
    #[serde(default)]
    pub exit_node: Option<String>,
    /// Whether the host's LAN stays reachable directly while an exit node is in use.
    #[serde(default)]
    pub exit_node_allow_lan_access: Option<bool>,
    /// Whether peers' subnet routes are used.
    #[serde(default)]
    pub accept_routes: Option<bool>,
}

/// This node in a status answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SelfStatus {
    /// MagicDNS name.
    pub name: String,
    /// Mesh addresses, IPv4 first.
    pub addresses: Vec<String>,
    /// Node key, text form.
    pub node_key: String,
    /// The UDP endpoints reported to control.
    pub endpoints: Vec<String>,
    /// Home DERP region; 0 for none yet.
    pub home_region: u32,
    /// Routes this node offers (subnet routes; 0.0.0.0/0 and ::/0 for an exit node).
    #[serde(default)]
    pub advertised_routes: Vec<String>,
    /// Those control approved.
    #[serde(default)]
    pub approved_routes: Vec<String>,
    /// Control made this node an exit node (it forwards peers' internet traffic).
    #[serde(default)]
    pub exit_node: bool,
}

/// A peer in a status answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// MagicDNS name.
    pub name: String,
    /// Mesh addresses.
    pub addresses: Vec<String>,
    /// Node key, text form.
    pub node_key: String,
    /// The direct endpoint in use, when the path is direct (confirmed by a disco pong).
    pub endpoint: Option<String>,
    /// How traffic travels: `direct <ip:port>` (confirmed), `trying <ip:port>, …` (unconfirmed
    /// addresses, no relay), `trying <ip:port>, … + relay <region>`, `relay <region>` or
    /// `unreachable`; a relay whose DERP connection is not up is followed by `(DERP down)`.
    pub path: Option<String>,
    /// Whether the DERP connection of the path's relay is up, when the path uses a relay.
    #[serde(default)]
    pub relay_up: Option<bool>,
    /// Round trip of the direct path, in microseconds.
    pub latency_us: Option<u64>,
    /// Unix ms of the last WireGuard handshake.
    pub last_handshake_unix_ms: Option<i64>,
    /// Packets from the peer that the packet filter dropped.
    #[serde(default)]
    pub filter_drops: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Whether control sees the peer connected.
    pub online: bool,
    /// Subnet routes the peer serves for this node.
    #[serde(default)]
    pub primary_routes: Vec<String>,
    /// The peer is an exit node this node may use.
    #[serde(default)]
    pub exit_node: bool,
}

/// The answer to [`ApiRequest::Status`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    #[serde(rename = "self")]
    pub me: SelfStatus,
    /// Whether the map stream to control is up.
    pub control_connected: bool,
    /// Why it is not, when it is not.
    pub control_error: Option<String>,
    /// The peers, by name.
    pub peers: Vec<PeerStatus>,
    /// The exit node in use (its name), if any. Set but not offered (policy, or it went
    /// away): internet traffic is dropped until it is offered again.
    #[serde(default)]
    pub exit_node: Option<String>,
    /// Whether the selected exit node is offered to this node now.
    #[serde(default)]
    pub exit_node_offered: bool,
    /// Names of the exit nodes this node may use.
    #[serde(default)]
    pub exit_nodes: Vec<String>,
    /// Whether peers' subnet routes are used.
    #[serde(default)]
    pub accept_routes: bool,
    /// The MagicDNS resolver is answering (100.100.100.100).
    #[serde(default)]
    pub magic_dns: bool,
}

/// A netcheck report, for `warren netcheck`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// Some STUN server answered over UDP.
    pub udp: bool,
    /// The address STUN servers saw.
    pub global: Option<String>,
    /// The NAT maps each destination to another port (hard NAT).
    pub mapping_varies: bool,
    /// Latency to each region (keyed by the region id in decimal), microseconds. String keys:
    /// the answer travels inside the internally tagged [`ApiResponse`], whose buffered
    /// deserialisation cannot turn a JSON key into an integer.
    pub latency_us: std::collections::BTreeMap<String, u64>,
    /// The home region chosen.
    pub home_region: u32,
}

impl NetcheckReport {
    /// From the core's report and home region.
    pub fn from_core(r: &warren_node_core::netcheck::Report, home: Option<u32>) -> Self {
        Self {
            udp: r.udp,
            global: r.global.map(|g| g.to_string()),
            mapping_varies: r.mapping_varies,
            latency_us: r
                .latency
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_micros() as u64))
                .collect(),
            home_region: home.unwrap_or(0),
        }
    }
}

/// Any answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApiResponse {
    /// Answer to status.
    Status(Box<Status>),
    /// Answer to down.
    Stopping,
    /// Answer to set: the preferences now in force.
    Prefs(Prefs),
    /// Answer to ping.
    Pong {
        /// The path the pong came by.
        path: String,
        /// Whether that path is direct (not relayed).
        direct: bool,
        /// Round trip in microseconds.
        rtt_us: u64,
    },
    /// Answer to ping when no pong came in time.
    PingTimeout,
    /// Answer to netcheck.
    Netcheck(Box<NetcheckReport>),
    /// The request was not understood.
    Error {
        /// Why.
        message: String,
    },
}

/// The local API socket file; removed when this is dropped (also when `warren up` fails before
/// it runs), so a dead daemon leaves no socket behind.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the local API socket at `path` with mode 0600, whatever the umask: only the daemon's
/// own user (and root) may talk to it. A stale socket file from a dead daemon is replaced.
pub fn bind(path: &Path) -> anyhow::Result<(tokio::net::UnixListener, SocketFile)> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok((listener, file))
}

/// Why a local API connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiRefused {
    /// The peer runs as another user (the socket's mode should have kept it out already).
    #[error(
        "permission denied: uid {peer} may not use this node's API (only root and uid {owner})"
    )]
    OtherUser {
        /// The caller's uid.
        peer: u32,
        /// The daemon's uid.
        owner: u32,
    },
    /// The kernel did not say who the peer is.
    #[error("permission denied: the caller's credentials are unknown")]
    NoCredentials,
}

/// Checks the caller's credentials (SO_PEERCRED): root and the daemon's own user (`owner`) may
/// use the API, nobody else.
pub fn authorize(stream: &tokio::net::UnixStream, owner: u32) -> Result<(), ApiRefused> {
    let cred = stream.peer_cred().map_err(|_| ApiRefused::NoCredentials)?;
    authorize_uid(cred.uid(), owner)
}

/// [`authorize`] for a known caller uid.
pub fn authorize_uid(peer: u32, owner: u32) -> Result<(), ApiRefused> {
    if peer == 0 || peer == owner {
        Ok(())
    } else {
        Err(ApiRefused::OtherUser { peer, owner })
    }
}

/// Reads one request line from a connection.
pub async fn read_request(stream: &mut tokio::net::UnixStream) -> anyhow::Result<ApiRequest> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(64 * 1024);
    reader.read_line(&mut line).await?;
    serde_json::from_str(&line).context("malformed request")
}

/// Writes one answer line.
pub async fn write_response(
    stream: &mut tokio::net::UnixStream,
    resp: &ApiResponse,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(resp)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Sends a request to the daemon behind `socket` and returns its answer.
pub async fn call(socket: &Path, req: &ApiRequest) -> anyhow::Result<ApiResponse> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to {} (is `warren up` running with this --state-dir?)",
                socket.display()
            )
        })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await?;
    serde_json::from_str(&answer).context("malformed answer from the daemon")
}

#[cfg(test)]
mod netcheck_answer_tests {
    use super::*;

    #[test]
    fn netcheck_answer_with_region_latency_round_trips() {
        let report = NetcheckReport {
            udp: true,
            global: Some("203.0.113.21:20000".into()),
            mapping_varies: true,
            latency_us: [("999".to_string(), 1234)].into_iter().collect(),
            home_region: 999,
        };
        let json = serde_json::to_string(&ApiResponse::Netcheck(Box::new(report))).expect("json");
        match serde_json::from_str::<ApiResponse>(&json).expect("parses back") {
            ApiResponse::Netcheck(r) => assert_eq!(r.latency_us.get("999"), Some(&1234)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn socket_is_private_whatever_the_umask_and_removed_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("warren.sock");
        // A stale file where the socket goes is replaced.
        std::fs::write(&path, b"stale").expect("write");
        let (listener, file) = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The caller's credentials are read from the kernel: here, our own uid.
        let client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(authorize(&server, me), Ok(()));
        let peer = client.peer_cred().expect("cred").uid();
        assert_eq!(peer, me);
        // Another owner: only root passes.
        let other = me.wrapping_add(4242);
        assert_eq!(
            authorize(&server, other),
            if me == 0 {
                Ok(())
            } else {
                Err(ApiRefused::OtherUser {
                    peer: me,
                    owner: other,
                })
            }
        );
        drop(file);
        assert!(!path.exists(), "socket file left behind");
    }

    #[test]
    fn only_root_and_the_owner_may_call() {
        assert_eq!(authorize_uid(0, 1000), Ok(()));
        assert_eq!(authorize_uid(1000, 1000), Ok(()));
        assert_eq!(
            authorize_uid(65534, 1000),
            Err(ApiRefused::OtherUser {
                peer: 65534,
                owner: 1000
            })
        );
        assert_eq!(
            authorize_uid(65534, 0),
            Err(ApiRefused::OtherUser {
                peer: 65534,
                owner: 0
            })
        );
    }
}
