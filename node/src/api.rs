//! The local API: `warren status`, `warren ip` and `warren down` talk to the running daemon over
//! a unix socket in its state directory, one JSON request and one JSON answer per connection.

use std::path::Path;

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
    /// The endpoint in use, when there is one.
    pub endpoint: Option<String>,
    /// Unix ms of the last WireGuard handshake.
    pub last_handshake_unix_ms: Option<i64>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Whether control sees the peer connected.
    pub online: bool,
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
}

/// Any answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApiResponse {
    /// Answer to status.
    Status(Box<Status>),
    /// Answer to down.
    Stopping,
    /// The request was not understood.
    Error {
        /// Why.
        message: String,
    },
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
