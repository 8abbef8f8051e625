//! A control server on loopback for the integration tests, and the helpers to talk to it as a
//! node (proofs) and as an operator (the local admin socket).

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use prost::bytes::{Buf, BufMut};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use warren_control::config::Config;
use warren_control::serve::ServeStats;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::*;
use warren_proto::proof::{make_proof, request_digest};
use warren_proto::{ControlPublicKey, DiscoSecretKey, NodeSecretKey};

/// A running server in its own temporary directory.
pub struct Server {
    _dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub url: String,
    pub socket: std::path::PathBuf,
    pub stats: ServeStats,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// A server with the test defaults.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with the test defaults changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            unix_socket: dir.path().join("control.sock"),
            keepalive_interval: Duration::from_millis(300),
            ..Config::default()
        };
        config.noise.private_key_path = dir.path().join("control.key");
        config.database.sqlite.path = dir.path().join("db.sqlite");
        // No embedded DERP on the host's fixed ports while tests run in parallel.
        config.derp.server.enabled = Some(false);
        configure(&mut config);
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let url = format!("http://{addr}");
        let socket = config.unix_socket.clone();
        let stats = ServeStats::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(warren_control::serve::serve_with(
            config,
            tcp,
            async move {
                let _ = stopped.await;
            },
            stats.clone(),
        ));
        let server = Self {
            _dir: dir,
            addr,
            url,
            socket,
            stats,
            stop: Some(stop),
            task,
        };
        // Wait until the unix socket accepts a connection (the server is then listening on
        // both; the file alone appears at bind, a moment before listen).
        wait_until("the server starts", || {
            std::os::unix::net::UnixStream::connect(&server.socket).is_ok()
        })
        .await;
        server
    }

    /// The server's private key file (another instance on the same database shares it).
    pub fn key_path(&self) -> std::path::PathBuf {
        self._dir.path().join("control.key")
    }

    pub async fn control(&self) -> ControlClient<Channel> {
        ControlClient::connect(self.url.clone())
            .await
            .expect("connect")
    }

    pub async fn local_admin(&self) -> AdminClient<Channel> {
        let channel = warren_control::cli::connect_unix(&self.socket)
            .await
            .expect("unix connect");
        AdminClient::new(channel)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.expect("join").expect("server ran cleanly");
    }
}

/// Waits (up to 20 s) until `done` holds.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn server_key(c: &mut ControlClient<Channel>) -> ControlPublicKey {
    let r = c
        .get_server_key(GetServerKeyRequest {})
        .await
        .expect("key")
        .into_inner();
    ControlPublicKey::from_slice(&r.server_key).expect("32 bytes")
}

pub async fn new_auth_key(admin: &mut AdminClient<Channel>) -> String {
    let _ = admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
        })
        .await;
    let r = admin
        .create_pre_auth_key(CreatePreAuthKeyRequest {
            user: "alice".into(),
            reusable: true,
            ..Default::default()
        })
        .await
        .expect("key");
    r.into_inner().secret
}

/// A fresh nonce for every proof (the server refuses a nonce it has seen).
pub fn nonce() -> [u8; 24] {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b
}

/// A proof for `method` over `req` (which must not carry a proof yet).
pub fn sign(
    node: &NodeSecretKey,
    server: &ControlPublicKey,
    method: &str,
    req: &impl prost::Message,
) -> NodeProof {
    make_proof(
        node,
        server,
        method,
        warren_proto::proof::unix_ms(),
        nonce(),
        &request_digest(req),
    )
}

pub fn register_req(
    node: &NodeSecretKey,
    server: &ControlPublicKey,
    auth_key: &str,
    host: &str,
) -> RegisterNodeRequest {
    let mut req = RegisterNodeRequest {
        proof: None,
        auth_key: auth_key.into(),
        disco_key: DiscoSecretKey::generate().public_key().to_vec(),
        hostname: host.into(),
    };
    req.proof = Some(sign(node, server, "RegisterNode", &req));
    req
}

/// A signed GetNode request.
pub fn get_node_req(node: &NodeSecretKey, server: &ControlPublicKey) -> GetNodeRequest {
    let mut req = GetNodeRequest { proof: None };
    req.proof = Some(sign(node, server, "GetNode", &req));
    req
}

/// A signed StreamMapResponse request, as a node that knows neither pages nor resuming
/// sends it.
pub fn stream_req(node: &NodeSecretKey, server: &ControlPublicKey) -> StreamMapRequest {
    stream_req_with(node, server, None, false)
}

/// A signed StreamMapResponse request: resuming from (map id, version) when given, taking
/// paged full maps and batches when `pages`.
pub fn stream_req_with(
    node: &NodeSecretKey,
    server: &ControlPublicKey,
    resume: Option<(u64, u64)>,
    pages: bool,
) -> StreamMapRequest {
    let mut req = StreamMapRequest {
        pages,
        ..StreamMapRequest::paged(resume)
    };
    req.proof = Some(sign(node, server, "StreamMapResponse", &req));
    req
}

/// Sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

/// Calls `method` with `message` as the request's protobuf bytes.
pub async fn call_raw(channel: &Channel, method: &'static str, message: &[u8]) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(message.to_vec()),
        PathAndQuery::from_static(method),
        Raw,
    )
    .await
    .expect_err("a malformed request is refused")
}

/// Not protobuf: a truncated varint, a length past the end, a reserved wire type, field 0.
pub const MALFORMED: [&[u8]; 4] = [&[0x0a, 0xff], &[0x0a, 0x05, 0x01], &[0x0f], &[0x00, 0x01]];

/// GetServerKey with its empty (valid) request.
pub async fn call_raw_ok(channel: &Channel) -> Vec<u8> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(Vec::new()),
        PathAndQuery::from_static("/warren.control.v1.Control/GetServerKey"),
        Raw,
    )
    .await
    .expect("served")
    .into_inner()
}
