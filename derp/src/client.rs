//! An async DERP client: connects over `http://` or `https://`, upgrades, proves its node key,
//! checks the server's key, then relays.
//!
//! [`Client::split`] gives a cloneable [`ClientSender`] (backed by a writer task) and a
//! [`ClientReceiver`], so sending and receiving can live in different tasks. The receiver
//! answers `Ping` with `Pong` itself and skips `KeepAlive`. The connection closes when the
//! receiver and every sender are dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;
use warren_proto::derp::{
    self, ClientInfo, Frame, MeshKey, PeerGoneReason, PeerPresentFlags, open_server_info,
    seal_client_info,
};
use warren_proto::{DerpPublicKey, NodePublicKey, NodeSecretKey};

use crate::frame::{FrameReader, ReadError, write_frame};

/// Any byte stream the client can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

type BoxStream = Box<dyn Stream>;

/// Frames waiting for the writer task: deep enough for a burst of WireGuard packets (the
/// writer drains it into writes of up to 32 KiB).
const SEND_QUEUE: usize = 512;
/// The longest HTTP response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The server key to expect; the connection fails when the server has another one.
    pub server_key: Option<DerpPublicKey>,
    /// The region's mesh key, for mesh peers.
    pub mesh_key: Option<MeshKey>,
    /// Trust anchors for `https://`. Empty means the system's store (`SSL_CERT_FILE` and
    /// `SSL_CERT_DIR` are honoured), loaded once per process.
    pub tls_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Accept any TLS certificate (labs and tests). The DERP handshake still proves the
    /// server's key, and [`Self::server_key`] pins it.
    pub insecure_skip_verify: bool,
    /// Limit for TCP, TLS, upgrade and handshake together.
    pub timeout: Duration,
    /// Send `Derp-Fast-Start: 1` and skip waiting for the `101` response.
    pub fast_start: bool,
    /// Connect to this address instead of resolving the URL's host, which still names the
    /// server for TLS and the `Host` header (a DERP map's `IPv4` beside its `HostName`).
    pub dial: Option<std::net::IpAddr>,
    /// `SO_MARK` for the TCP connection (Linux; needs `CAP_NET_ADMIN`), set before it
    /// connects. A node passes its bypass mark so that DERP traffic leaves by the host's
    /// routes, not by its own tunnel routes; the relay's mesh links leave it unset. A mark
    /// that cannot be set fails the connection ([`ClientError::Mark`]).
    pub mark: Option<u32>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            server_key: None,
            mesh_key: None,
            tls_roots: Vec::new(),
            insecure_skip_verify: false,
            timeout: Duration::from_secs(10),
            fast_start: false,
            dial: None,
            mark: None,
        }
    }
}

/// Why the client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://` or `https://` with a host.
    #[error("bad DERP URL {url:?}")]
    BadUrl {
        /// The URL.
        url: String,
    },
    /// TCP or TLS failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// TLS could not be set up (no trust anchors, bad name).
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The server did not switch protocols.
    #[error("DERP upgrade refused: HTTP {status}")]
    Upgrade {
        /// The HTTP status.
        status: u16,
    },
    /// The HTTP response was not understood.
    #[error("bad HTTP response")]
    BadResponse,
    /// The server's key is not the expected one (or `ServerKey` and `Derp-Public-Key` differ).
    #[error("server key {got} is not the expected {expected}")]
    WrongServerKey {
        /// The expected key.
        expected: DerpPublicKey,
        /// The key the server announced.
        got: DerpPublicKey,
    },
    /// The handshake failed (the server could not open or seal its box).
    #[error("handshake: {0}")]
    Handshake(#[from] derp::InfoError),
    /// An unexpected frame arrived during the handshake.
    #[error("expected {expected}, got {got}")]
    UnexpectedFrame {
        /// The frame expected.
        expected: derp::FrameType,
        /// The frame received.
        got: derp::FrameType,
    },
    /// Reading a frame failed (including the server closing the connection).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The packet is larger than DERP allows.
    #[error("packet of {len} bytes is larger than DERP allows")]
    PacketTooLarge {
        /// Its length.
        len: usize,
    },
    /// The connection's writer has stopped.
    #[error("connection closed")]
    Closed,
    /// The writer's queue is full (the connection is slower than the sender); nothing was sent.
    #[error("send queue full")]
    QueueFull,
    /// [`ConnectOptions::mark`] could not be set on the socket.
    #[error("setting socket mark {mark:#x}: {source}")]
    Mark {
        /// The mark.
        mark: u32,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting took longer than [`ConnectOptions::timeout`].
    #[error("connect timed out")]
    Timeout,
}

/// Something the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A relayed packet.
    RecvPacket {
        /// Its sender.
        src: NodePublicKey,
        /// The packet.
        packet: Vec<u8>,
    },
    /// A peer is gone.
    PeerGone {
        /// The peer.
        peer: NodePublicKey,
        /// Why.
        reason: PeerGoneReason,
    },
    /// A peer is present (mesh watchers).
    PeerPresent {
        /// The peer.
        peer: NodePublicKey,
        /// Its address, when sent.
        endpoint: Option<std::net::SocketAddr>,
        /// Its flags.
        flags: PeerPresentFlags,
    },
    /// The server's health text; empty means healthy.
    Health {
        /// The problem.
        problem: String,
    },
    /// The server is restarting.
    Restarting {
        /// Wait this long before reconnecting (ms).
        reconnect_in_ms: u32,
        /// Keep trying this long (ms).
        try_for_ms: u32,
    },
    /// The answer to [`ClientSender::ping`].
    Pong {
        /// The ping's data.
        data: [u8; 8],
    },
}

/// The sending half: cheap to clone, usable from any task.
#[derive(Debug, Clone)]
pub struct ClientSender {
    tx: mpsc::Sender<Frame>,
}

impl ClientSender {
    /// Relays `packet` to `dst`. Waits when the writer is behind.
    pub async fn send(&self, dst: NodePublicKey, packet: &[u8]) -> Result<(), ClientError> {
        if packet.len() > derp::MAX_PACKET_SIZE {
            return Err(ClientError::PacketTooLarge { len: packet.len() });
        }
        self.frame(Frame::SendPacket {
            dst,
            packet: packet.to_vec(),
        })
        .await
    }

    /// Relays `packet` to `dst` without waiting: when the writer is behind, the packet is
    /// dropped with [`ClientError::QueueFull`], as a congested link would drop it. This is the
    /// data path's call: the packet is moved, not copied.
    pub fn try_send(&self, dst: NodePublicKey, packet: Vec<u8>) -> Result<(), ClientError> {
        if packet.len() > derp::MAX_PACKET_SIZE {
            return Err(ClientError::PacketTooLarge { len: packet.len() });
        }
        self.try_frame(Frame::SendPacket { dst, packet })
    }

    /// Sends any frame without waiting; [`ClientError::QueueFull`] when the writer is behind.
    pub fn try_frame(&self, frame: Frame) -> Result<(), ClientError> {
        self.tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClientError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
        })
    }

    /// Tells the server whether it is this node's home.
    pub async fn note_preferred(&self, preferred: bool) -> Result<(), ClientError> {
        self.frame(Frame::NotePreferred { preferred }).await
    }

    /// Sends a `Ping`; the answer arrives as [`ClientEvent::Pong`].
    pub async fn ping(&self, data: [u8; 8]) -> Result<(), ClientError> {
        self.frame(Frame::Ping { data }).await
    }

    /// Sends any frame (tests, mesh peers).
    pub async fn frame(&self, frame: Frame) -> Result<(), ClientError> {
        self.tx.send(frame).await.map_err(|_| ClientError::Closed)
    }
}

/// The receiving half.
#[derive(Debug)]
pub struct ClientReceiver {
    reader: FrameReader<ReadHalf<BoxStream>>,
    pong: ClientSender,
}

impl std::fmt::Debug for dyn Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stream")
    }
}

impl ClientReceiver {
    /// The next event. Cancel-safe. `Ping` is answered here and `KeepAlive` skipped; unknown
    /// frames are ignored.
    pub async fn recv(&mut self) -> Result<ClientEvent, ClientError> {
        loop {
            let event = match self.reader.read_frame().await? {
                Frame::RecvPacket { src, packet } => ClientEvent::RecvPacket { src, packet },
                Frame::PeerGone { peer, reason } => ClientEvent::PeerGone { peer, reason },
                Frame::PeerPresent {
                    peer,
                    endpoint,
                    flags,
                } => ClientEvent::PeerPresent {
                    peer,
                    endpoint,
                    flags,
                },
                Frame::Health { problem } => ClientEvent::Health { problem },
                Frame::Restarting {
                    reconnect_in_ms,
                    try_for_ms,
                } => ClientEvent::Restarting {
                    reconnect_in_ms,
                    try_for_ms,
                },
                Frame::Pong { data } => ClientEvent::Pong { data },
                Frame::Ping { data } => {
                    // Never block the reader on a full writer: a lost pong is harmless.
                    let _ = self.pong.tx.try_send(Frame::Pong { data });
                    continue;
                }
                other => {
                    debug!(frame_type = %other.frame_type(), "ignoring frame");
                    continue;
                }
            };
            return Ok(event);
        }
    }
}

/// A connected DERP client.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    receiver: ClientReceiver,
    server_key: DerpPublicKey,
    public_key: NodePublicKey,
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, ClientError> {
    let bad = || ClientError::BadUrl {
        url: url.to_owned(),
    };
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad());
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = match uri.path() {
        "" | "/" => "/derp".to_owned(),
        p => p.to_owned(),
    };
    Ok(Target {
        tls,
        host,
        port,
        authority: authority.as_str().to_owned(),
        path,
    })
}

/// Connects to the first of `addrs` that answers, from a socket carrying `mark`.
async fn dial_marked(addrs: &[std::net::SocketAddr], mark: u32) -> Result<TcpStream, ClientError> {
    let mut last = None;
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        set_mark(&socket, mark).map_err(|source| ClientError::Mark { mark, source })?;
        match socket.connect(*addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(ClientError::Io(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")
    })))
}

#[cfg(target_os = "linux")]
fn set_mark(socket: &tokio::net::TcpSocket, mark: u32) -> std::io::Result<()> {
    socket2::SockRef::from(socket).set_mark(mark)
}

#[cfg(not(target_os = "linux"))]
fn set_mark(_: &tokio::net::TcpSocket, _: u32) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

impl Client {
    /// Connects to `url` (`http://host:port/derp` or `https://…`; the path defaults to
    /// `/derp`) as the node `secret`.
    pub async fn connect(
        url: &str,
        secret: &NodeSecretKey,
        options: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let target = parse_url(url)?;
        tokio::time::timeout(
            options.timeout,
            Self::connect_inner(target, secret, options),
        )
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    async fn connect_inner(
        target: Target,
        secret: &NodeSecretKey,
        options: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let tcp = match (options.dial, options.mark) {
            (Some(ip), None) => TcpStream::connect((ip, target.port)).await?,
            (None, None) => TcpStream::connect((target.host.as_str(), target.port)).await?,
            (Some(ip), Some(mark)) => dial_marked(&[(ip, target.port).into()], mark).await?,
            (None, Some(mark)) => {
                let addrs: Vec<std::net::SocketAddr> =
                    tokio::net::lookup_host((target.host.as_str(), target.port))
                        .await?
                        .collect();
                dial_marked(&addrs, mark).await?
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut stream: BoxStream = if target.tls {
            let connector = tls_connector(options)?;
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            Box::new(connector.connect(name, tcp).await?)
        } else {
            Box::new(tcp)
        };
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nUser-Agent: warren-derp\r\n",
            target.path, target.authority
        );
        if options.fast_start {
            request.push_str("Derp-Fast-Start: 1\r\n");
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        let (leftover, header_key) = if options.fast_start {
            (Vec::new(), None)
        } else {
            read_upgrade_response(&mut stream).await?
        };
        if let (Some(expected), Some(got)) = (options.server_key, header_key)
            && expected != got
        {
            return Err(ClientError::WrongServerKey { expected, got });
        }
        let expected = options.server_key.or(header_key);
        Self::handshake_inner(stream, leftover, secret, expected, options.mesh_key.clone()).await
    }

    /// Runs the DERP handshake over a stream that already speaks DERP (after an upgrade, or an
    /// in-memory pipe in tests).
    pub async fn handshake<S: Stream>(
        stream: S,
        secret: &NodeSecretKey,
        options: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        tokio::time::timeout(
            options.timeout,
            Self::handshake_inner(
                Box::new(stream),
                Vec::new(),
                secret,
                options.server_key,
                options.mesh_key.clone(),
            ),
        )
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    async fn handshake_inner(
        stream: BoxStream,
        leftover: Vec<u8>,
        secret: &NodeSecretKey,
        expected: Option<DerpPublicKey>,
        mesh_key: Option<MeshKey>,
    ) -> Result<Client, ClientError> {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = FrameReader::with_leftover(rd, leftover);
        let server_key = match reader.read_frame().await? {
            Frame::ServerKey { key } => key,
            other => {
                return Err(ClientError::UnexpectedFrame {
                    expected: derp::FrameType::SERVER_KEY,
                    got: other.frame_type(),
                });
            }
        };
        if let Some(expected) = expected
            && expected != server_key
        {
            return Err(ClientError::WrongServerKey {
                expected,
                got: server_key,
            });
        }
        let info = ClientInfo {
            mesh_key,
            ..ClientInfo::default()
        };
        let frame = seal_client_info(secret, &server_key, crate::server::random_nonce(), &info);
        write_frame(&mut wr, &frame).await?;
        wr.flush().await?;
        let frame = reader.read_frame().await?;
        open_server_info(secret, &server_key, &frame)?;

        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        tokio::spawn(write_loop(wr, rx));
        let sender = ClientSender { tx };
        Ok(Client {
            receiver: ClientReceiver {
                reader,
                pong: sender.clone(),
            },
            sender,
            server_key,
            public_key: secret.public_key(),
        })
    }

    /// The server's key, proven by the handshake.
    pub fn server_key(&self) -> DerpPublicKey {
        self.server_key
    }

    /// This client's node key.
    pub fn public_key(&self) -> NodePublicKey {
        self.public_key
    }

    /// A sender handle.
    pub fn sender(&self) -> ClientSender {
        self.sender.clone()
    }

    /// Relays `packet` to `dst`.
    pub async fn send(&self, dst: NodePublicKey, packet: &[u8]) -> Result<(), ClientError> {
        self.sender.send(dst, packet).await
    }

    /// Tells the server whether it is this node's home.
    pub async fn note_preferred(&self, preferred: bool) -> Result<(), ClientError> {
        self.sender.note_preferred(preferred).await
    }

    /// The next event (see [`ClientReceiver::recv`]).
    pub async fn recv(&mut self) -> Result<ClientEvent, ClientError> {
        self.receiver.recv().await
    }

    /// Splits into a sender and a receiver for different tasks.
    pub fn split(self) -> (ClientSender, ClientReceiver) {
        (self.sender, self.receiver)
    }
}

async fn write_loop(mut wr: WriteHalf<BoxStream>, mut rx: mpsc::Receiver<Frame>) {
    let mut buf = Vec::with_capacity(64 << 10);
    while let Some(frame) = rx.recv().await {
        frame.encode(&mut buf);
        while buf.len() < 32 << 10 {
            match rx.try_recv() {
                Ok(f) => f.encode(&mut buf),
                Err(_) => break,
            }
        }
        if let Err(e) = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        }
        .await
        {
            debug!(error = %e, "DERP client write failed");
            return;
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}

/// Reads the `101` response head; returns the bytes read past it and `Derp-Public-Key`.
async fn read_upgrade_response(
    stream: &mut BoxStream,
) -> Result<(Vec<u8>, Option<DerpPublicKey>), ClientError> {
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(end) = crate::http::head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::BadResponse);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ClientError::Read(ReadError::Closed));
        }
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| ClientError::BadResponse)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(ClientError::BadResponse)?;
    if status != 101 {
        return Err(ClientError::Upgrade { status });
    }
    let mut key = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name
                .trim()
                .eq_ignore_ascii_case(crate::http::PUBLIC_KEY_HEADER)
        {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(value.trim(), &mut bytes).map_err(|_| ClientError::BadResponse)?;
            key = Some(DerpPublicKey::from_bytes(bytes));
        }
    }
    Ok((buf.split_off(end), key))
}

fn tls_connector(options: &ConnectOptions) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = if options.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::SkipVerify(provider)))
            .with_no_client_auth()
    } else if options.tls_roots.is_empty() {
        builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &options.tls_roots {
            roots
                .add(cert.clone())
                .map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The system's trust anchors, read once: a relay on the internet has a certificate from a
/// public CA (Let's Encrypt, usually), and nodes reconnect often.
/// A failed load is not kept: installing the certificates later works without a restart.
fn system_roots() -> Result<Arc<rustls::RootCertStore>, ClientError> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(ClientError::Tls(format!(
            "no trust anchors in the system store{why}: install ca-certificates or set SSL_CERT_FILE"
        )));
    }
    debug!(anchors = added, "loaded the system's TLS trust anchors");
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

mod insecure {
    //! A certificate verifier that accepts any certificate but still checks handshake
    //! signatures, for labs where the DERP key itself is pinned.

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    pub(super) struct SkipVerify(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for SkipVerify {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marked_dial_sets_the_mark_or_says_why_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        match dial_marked(&[addr], 0x80000).await {
            Ok(tcp) => {
                let mark = socket2::SockRef::from(&tcp).mark().expect("mark");
                assert_eq!(mark, 0x80000);
            }
            // Without CAP_NET_ADMIN.
            Err(e) => assert_eq!(
                e.to_string(),
                "setting socket mark 0x80000: Operation not permitted (os error 1)"
            ),
        }
        let err = dial_marked(&[], 0x80000).await.expect_err("no address");
        assert_eq!(
            err.to_string(),
            "connection failed: the host has no address"
        );
    }

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:3340").expect("ok");
        assert!(!t.tls);
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 3340, "/derp")
        );
        let t = parse_url("https://derp.example/derp").expect("ok");
        assert!(t.tls);
        assert_eq!((t.port, t.authority.as_str()), (443, "derp.example"));
        let t = parse_url("http://[::1]:80/derp").expect("ok");
        assert_eq!(t.host, "::1");
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("derp.example").is_err());
    }
}
