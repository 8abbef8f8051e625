//! Tailscale's Rust DERP client (crate `ts_derp`, from tailscale-rs) against the DERP relay
//! warren-control embeds: it verifies clients by default, so the ts_derp keys are registered
//! as nodes first and a stranger's key is refused; registered ones complete the handshake
//! (snake_case ClientInfo with `"mesh_key":"none"`), exchange packets both ways up to the
//! largest ts_derp can frame, and hear `PeerGone` when a peer leaves.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::{Server, new_auth_key, register_req, server_key};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use warren_proto::NodeSecretKey;
use warren_proto::derp::{Frame, PeerGoneReason};

const STEP: Duration = Duration::from_secs(10);
/// The largest packet `ts_derp` 0.6.1 can send or receive: it caps a whole frame payload
/// (the 32-byte key included) at 64 KiB.
const TS_MAX_PACKET: usize = (64 << 10) - 32;

/// One node key in both libraries' types.
struct Node {
    secret: NodeSecretKey,
    pair: ts_keys::NodeKeyPair,
}

impl Node {
    fn new() -> Self {
        let secret = NodeSecretKey::generate();
        let text = format!("privkey:{}", hex::encode(*secret.to_bytes()));
        let private: ts_keys::NodePrivateKey = text.parse().expect("ts private key");
        let pair = ts_keys::NodeKeyPair::from(private);
        let node = Self { secret, pair };
        assert_eq!(node.pair.public, node.ts_public(), "same X25519 key");
        node
    }

    fn ts_public(&self) -> ts_keys::NodePublicKey {
        ts_keys::NodePublicKey::from_bytes(*self.secret.public_key().as_bytes())
    }
}

/// A stream that keeps a copy of every byte read through it, to see the frames `ts_derp`
/// handles internally (it reports `PeerGone` only in a debug log).
struct Tap<T> {
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

type TapClient = ts_derp::Client<Tap<TcpStream>>;

/// Upgrades a TCP connection to `/derp` (POST, as ts_derp does) and runs ts_derp's handshake
/// over it; returns its outcome and the bytes the client read.
async fn ts_over_tcp(
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

async fn ts_recv(c: &TapClient) -> (ts_keys::NodePublicKey, Vec<u8>) {
    let (src, packet) = tokio::time::timeout(STEP, c.recv_one())
        .await
        .expect("packet in time")
        .expect("ts_derp recv");
    (src, packet.as_ref().to_vec())
}

/// A loopback port free right now.
fn free_port(udp: bool) -> u16 {
    if udp {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    } else {
        let s = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    }
}

#[tokio::test]
async fn ts_derp_talks_through_the_embedded_relay() {
    // Verification is on unless turned off: the test registers its nodes rather than
    // opening the relay.
    assert!(
        warren_control::config::Config::default()
            .derp
            .server
            .verify_clients
    );
    let derp = SocketAddr::from(([127, 0, 0, 1], free_port(false)));
    let stun = SocketAddr::from(([127, 0, 0, 1], free_port(true)));
    let server = Server::start_with(|config| {
        config.derp.server.enabled = Some(true);
        config.derp.server.listen_addr = derp;
        config.derp.server.stun_listen_addr = stun;
    })
    .await;
    let (a, b, c, stranger) = (Node::new(), Node::new(), Node::new(), Node::new());
    let mut control = server.control().await;
    let key = server_key(&mut control).await;
    let auth = new_auth_key(&mut server.local_admin().await).await;
    for (node, host) in [(&a, "ts-a"), (&b, "ts-b"), (&c, "ts-c")] {
        control
            .register_node(register_req(&node.secret, &key, &auth, host))
            .await
            .expect("register");
    }

    // Not a node: refused after ServerKey, like any unknown key.
    let (refused, _) = ts_over_tcp(derp, &stranger).await;
    match refused {
        Err(ts_derp::Error::IoFailure(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        }
        Err(e) => panic!("expected the relay to hang up, got {e}"),
        Ok(_) => panic!("an unregistered key was admitted"),
    }

    let (ca, _) = ts_over_tcp(derp, &a).await;
    let ca = ca.expect("registered ts_derp client a admitted");
    let (cb, seen_b) = ts_over_tcp(derp, &b).await;
    let cb = cb.expect("registered ts_derp client b admitted");
    let (cc, _) = ts_over_tcp(derp, &c).await;
    let cc = cc.expect("registered ts_derp client c admitted");

    ca.send_one(b.ts_public(), b"a to b").await.expect("send");
    assert_eq!(ts_recv(&cb).await, (a.ts_public(), b"a to b".to_vec()));
    let big: Vec<u8> = (0..TS_MAX_PACKET).map(|i| (i % 251) as u8).collect();
    cb.send_one(a.ts_public(), &big).await.expect("send");
    assert_eq!(ts_recv(&ca).await, (b.ts_public(), big.clone()));
    ca.send_one(b.ts_public(), &big).await.expect("send");
    assert_eq!(ts_recv(&cb).await, (a.ts_public(), big));

    // a leaves: b, which a sent to, hears PeerGone; ts_derp handles it and goes on.
    let cb = Arc::new(cb);
    let waiting = tokio::spawn({
        let cb = cb.clone();
        async move { ts_recv(&cb).await }
    });
    drop(ca);
    let gone = Frame::PeerGone {
        peer: a.secret.public_key(),
        reason: PeerGoneReason::Disconnected,
    };
    common::wait_until("b hears PeerGone for a", || {
        let seen = seen_b.lock().expect("tap");
        let mut at = 0;
        while let Ok(Some((f, used))) = Frame::decode(seen.get(at..).unwrap_or_default()) {
            if f == gone {
                return true;
            }
            at += used;
        }
        false
    })
    .await;
    cc.send_one(b.ts_public(), b"still there?")
        .await
        .expect("send");
    assert_eq!(
        waiting.await.expect("join"),
        (c.ts_public(), b"still there?".to_vec())
    );
    server.stop().await;
}
