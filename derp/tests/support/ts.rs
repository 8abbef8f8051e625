//! Test support for running Tailscale's Rust DERP client (`ts_derp`) against warren's relays,
//! shared by warren-derp's and warren-control's tests (each includes this file with `#[path]`).

// Each including test uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use warren_proto::derp::Frame;
use warren_proto::{NodePublicKey, NodeSecretKey};

/// How long any one step may take.
pub(crate) const STEP: Duration = Duration::from_secs(10);

/// The largest packet `ts_derp` 0.6.1 can send or receive: it caps a whole frame payload
/// (the 32-byte key included) at 64 KiB, where Go's client and warren allow 64 KiB of packet.
pub(crate) const TS_MAX_PACKET: usize = (64 << 10) - 32;

/// One node key in both libraries' types.
pub(crate) struct Node {
    /// warren's key.
    pub(crate) secret: NodeSecretKey,
    /// The same key as ts_derp takes it.
    pub(crate) pair: ts_keys::NodeKeyPair,
}

impl Node {
    /// A fresh key.
    pub(crate) fn new() -> Self {
        let secret = NodeSecretKey::generate();
        let text = format!("privkey:{}", hex::encode(*secret.to_bytes()));
        let private: ts_keys::NodePrivateKey = text.parse().expect("ts private key");
        let pair = ts_keys::NodeKeyPair::from(private);
        let node = Self { secret, pair };
        assert_eq!(node.pair.public, node.ts_public(), "same X25519 key");
        node
    }

    /// The public key, warren's type.
    pub(crate) fn public(&self) -> NodePublicKey {
        self.secret.public_key()
    }

    /// The public key, ts_derp's type.
    pub(crate) fn ts_public(&self) -> ts_keys::NodePublicKey {
        ts_keys::NodePublicKey::from_bytes(*self.secret.public_key().as_bytes())
    }
}

/// A stream that keeps a copy of every byte read through it, to see the frames `ts_derp`
/// handles internally (it reports `PeerGone` only in a debug log).
pub(crate) struct Tap<T> {
    inner: T,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = buf.filled().get(before..).unwrap_or_default();
            self.seen.lock().expect("tap").extend_from_slice(new);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A ts_derp client over a tapped TCP connection.
pub(crate) type TapClient = ts_derp::Client<Tap<TcpStream>>;

/// Upgrades a plain TCP connection to `/derp` (as ts_derp does: POST) and runs ts_derp's
/// handshake over it; returns the handshake's outcome and the bytes the client has read.
pub(crate) async fn ts_over_tcp(
    addr: SocketAddr,
    node: &Node,
) -> (Result<TapClient, ts_derp::Error>, Arc<Mutex<Vec<u8>>>) {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    s.write_all(
        b"POST /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .expect("write");
    // Byte by byte, so nothing after the head is taken from ts_derp.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(STEP, s.read_u8())
            .await
            .expect("upgrade answered in time")
            .expect("read");
        head.push(b);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tap = Tap {
        inner: s,
        seen: seen.clone(),
    };
    let client = tokio::time::timeout(STEP, ts_derp::Client::handshake(tap, &node.pair))
        .await
        .expect("handshake ends in time");
    (client, seen)
}

/// The frames in `bytes` (what a tapped client read).
pub(crate) fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some((f, used))) = Frame::decode(bytes.get(at..).unwrap_or_default()) {
        out.push(f);
        at += used;
    }
    out
}

/// The next packet a ts_derp client receives, within [`STEP`].
pub(crate) async fn ts_recv<Io: AsyncRead + AsyncWrite>(
    c: &ts_derp::Client<Io>,
) -> (ts_keys::NodePublicKey, Vec<u8>) {
    let (src, packet) = tokio::time::timeout(STEP, c.recv_one())
        .await
        .expect("packet in time")
        .expect("ts_derp recv");
    (src, packet.as_ref().to_vec())
}
