//! The relay end to end: real loopback TCP through the HTTP upgrade (and TLS), or in-memory
//! pipes where time or back-pressure must be controlled exactly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_derp::client::{ClientError, ConnectOptions};
use warren_derp::config::Config;
use warren_derp::server::{REPLACED_HEALTH, RelayOptions};
use warren_derp::verify::StaticVerifier;
use warren_derp::{Client, ClientEvent, Relay, Running};
use warren_proto::derp::{self, ClientInfo, Frame, PeerGoneReason};
use warren_proto::{DerpSecretKey, NodePublicKey, NodeSecretKey};

mod common;

use common::{self_signed, tls_relay_config};

const STEP: Duration = Duration::from_secs(10);

async fn start(options: RelayOptions) -> (Running, String) {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun: false,
        ..Config::default()
    };
    let relay = Relay::new(DerpSecretKey::generate(), options);
    let running = warren_derp::start_with(&config, relay)
        .await
        .expect("start");
    let url = format!("http://{}/derp", running.http_addr);
    (running, url)
}

async fn connect(url: &str, secret: &NodeSecretKey) -> Client {
    Client::connect(url, secret, &ConnectOptions::default())
        .await
        .expect("connect")
}

async fn recv(c: &mut Client) -> ClientEvent {
    tokio::time::timeout(STEP, c.recv())
        .await
        .expect("event in time")
        .expect("event")
}

async fn recv_packet(c: &mut Client) -> (NodePublicKey, Vec<u8>) {
    match recv(c).await {
        ClientEvent::RecvPacket { src, packet } => (src, packet),
        other => panic!("expected a packet, got {other:?}"),
    }
}

/// Polls `cond` until it holds (state owned by the server, no event to wait on).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn disco_packet(tag: u8) -> Vec<u8> {
    let mut p = warren_proto::disco::MAGIC.to_vec();
    p.resize(warren_proto::disco::HEADER_LEN + 20, tag);
    p
}

/// Sends `bytes` as a raw HTTP request and reads the whole response (the request says
/// `Connection: close`).
async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, text)
}

/// A hand-driven DERP connection for sending what a good client would not.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn upgrade(addr: SocketAddr) -> (Raw, String) {
        let mut s = TcpStream::connect(addr).await.expect("tcp");
        s.write_all(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = tokio::time::timeout(STEP, s.read_buf(&mut buf))
                .await
                .expect("upgrade answered in time")
                .expect("read");
            assert!(n > 0, "closed during upgrade");
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let rest = buf.split_off(end);
        (Raw { s, buf: rest }, head)
    }

    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((f, used)) = Frame::decode(&self.buf).expect("valid frame") {
                self.buf.drain(..used);
                return Some(f);
            }
            let n = tokio::time::timeout(STEP, self.s.read_buf(&mut self.buf))
                .await
                .expect("read in time")
                .expect("read");
            if n == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, f: &Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.s.write_all(&b).await.expect("write");
    }

    /// Reads until the server closes; panics if it does not within the step.
    async fn expect_closed(&mut self) {
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(STEP, self.s.read(&mut chunk))
                .await
                .expect("server closes in time")
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    async fn handshake(addr: SocketAddr, secret: &NodeSecretKey) -> Raw {
        let (mut raw, _) = Raw::upgrade(addr).await;
        let Some(Frame::ServerKey { key }) = raw.frame().await else {
            panic!("no server key");
        };
        raw.send(&derp::seal_client_info(
            secret,
            &key,
            [9; 24],
            &ClientInfo::default(),
        ))
        .await;
        let info = raw.frame().await.expect("server info");
        derp::open_server_info(secret, &key, &info).expect("opens");
        raw
    }
}

#[tokio::test]
async fn relays_between_two_clients_through_the_http_upgrade() {
    let (running, url) = start(RelayOptions::default()).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let mut a = connect(&url, &ka).await;
    let mut b = connect(&url, &kb).await;
    assert_eq!(a.server_key(), running.relay.public_key());
    a.send(kb.public_key(), b"hello b").await.expect("send");
    assert_eq!(
        recv_packet(&mut b).await,
        (ka.public_key(), b"hello b".to_vec())
    );
    // The halves work from different tasks.
    let (b_tx, b_rx) = b.split();
    let task = tokio::spawn(async move {
        b_tx.send(ka.public_key(), b"hello a").await.expect("send");
        b_tx
    });
    assert_eq!(recv_packet(&mut a).await.1, b"hello a".to_vec());
    let b_tx = task.await.expect("join");
    b_tx.note_preferred(true).await.expect("preferred");
    wait_until("preferred recorded", || {
        running
            .relay
            .client_stats(&kb.public_key())
            .is_some_and(|s| s.preferred)
    })
    .await;
    assert_eq!(running.relay.stats().home_clients, 1);
    // Ping is answered with the same bytes.
    a.sender()
        .ping([1, 2, 3, 4, 5, 6, 7, 8])
        .await
        .expect("ping");
    assert_eq!(
        recv(&mut a).await,
        ClientEvent::Pong {
            data: [1, 2, 3, 4, 5, 6, 7, 8]
        }
    );
    drop(b_rx);
    running.shutdown().await;
}

#[tokio::test]
async fn upgrade_response_has_tailscale_headers_and_fast_start_works() {
    let (running, url) = start(RelayOptions::default()).await;
    let (mut raw, head) = Raw::upgrade(running.http_addr).await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(lower.contains("upgrade: derp"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(lower.contains("derp-version: 2"), "{head}");
    let hex_key = hex::encode(running.relay.public_key().as_bytes());
    assert!(
        lower.contains(&format!("derp-public-key: {hex_key}")),
        "{head}"
    );
    assert!(
        matches!(raw.frame().await, Some(Frame::ServerKey { key }) if key == running.relay.public_key())
    );

    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let fast = ConnectOptions {
        fast_start: true,
        server_key: Some(running.relay.public_key()),
        ..ConnectOptions::default()
    };
    let a = Client::connect(&url, &ka, &fast).await.expect("fast start");
    let mut b = connect(&url, &kb).await;
    a.send(kb.public_key(), b"fast").await.expect("send");
    assert_eq!(recv_packet(&mut b).await.1, b"fast".to_vec());

    // A pinned key that is not the server's is refused.
    let wrong = ConnectOptions {
        server_key: Some(DerpSecretKey::generate().public_key()),
        ..ConnectOptions::default()
    };
    let err = Client::connect(&url, &ka, &wrong)
        .await
        .expect_err("wrong key");
    assert!(matches!(err, ClientError::WrongServerKey { .. }), "{err}");
    running.shutdown().await;
}

#[tokio::test]
async fn wrong_upgrade_gets_426_and_probes_answer() {
    let (running, _) = start(RelayOptions::default()).await;
    let addr = running.http_addr;
    let (status, _) = http(
        addr,
        "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426);
    let (status, _) = http(
        addr,
        "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426);
    // Upgrade is case-insensitive, and POST works too.
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    s.write_all(b"POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: derp\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    let mut head = vec![0u8; 12];
    s.read_exact(&mut head).await.expect("read");
    assert_eq!(&head, b"HTTP/1.1 101");

    for path in ["/derp/probe", "/derp/latency-check"] {
        for method in ["GET", "HEAD"] {
            let (status, text) = http(
                addr,
                &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert_eq!(status, 200, "{method} {path}");
            assert!(
                text.to_ascii_lowercase()
                    .contains("access-control-allow-origin: *")
            );
        }
        let (status, _) = http(
            addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 405);
    }
    let (status, text) = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(text.contains("DERP"));
    let (status, text) = http(
        addr,
        "GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc.123\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        text.to_ascii_lowercase()
            .contains("x-tailscale-response: response abc.123"),
        "{text}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_closes_only_that_connection() {
    let (running, url) = start(RelayOptions::default()).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let a = connect(&url, &ka).await;
    let mut b = connect(&url, &kb).await;
    let bad = NodeSecretKey::generate();
    let mut raw = Raw::handshake(running.http_addr, &bad).await;
    // A SendPacket header announcing more than 64 KiB + key.
    let len = u32::try_from(derp::KEY_LEN + derp::MAX_PACKET_SIZE + 1).expect("fits");
    let mut header = vec![0x04];
    header.extend_from_slice(&len.to_be_bytes());
    raw.s.write_all(&header).await.expect("write");
    raw.expect_closed().await;
    // A ping larger than Tailscale's 1000-byte limit also closes its connection.
    let mut raw2 = Raw::handshake(running.http_addr, &NodeSecretKey::generate()).await;
    raw2.send(&Frame::Unknown {
        frame_type: derp::FrameType::PING,
        payload: vec![0; 1001],
    })
    .await;
    raw2.expect_closed().await;
    assert_eq!(running.relay.stats().bad_frames, 2);
    a.send(kb.public_key(), b"still fine").await.expect("send");
    assert_eq!(recv_packet(&mut b).await.1, b"still fine".to_vec());
    running.shutdown().await;
}

#[tokio::test]
async fn malformed_client_info_closes_that_connection() {
    let (running, url) = start(RelayOptions::default()).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let a = connect(&url, &ka).await;
    let mut b = connect(&url, &kb).await;
    // A box that does not open.
    let (mut raw, _) = Raw::upgrade(running.http_addr).await;
    assert!(matches!(raw.frame().await, Some(Frame::ServerKey { .. })));
    raw.send(&Frame::ClientInfo {
        key: NodeSecretKey::generate().public_key(),
        nonce: [0; 24],
        sealed: vec![0xee; 64],
    })
    .await;
    raw.expect_closed().await;
    // A frame other than ClientInfo first.
    let (mut raw, _) = Raw::upgrade(running.http_addr).await;
    assert!(matches!(raw.frame().await, Some(Frame::ServerKey { .. })));
    raw.send(&Frame::SendPacket {
        dst: kb.public_key(),
        packet: b"sneaky".to_vec(),
    })
    .await;
    raw.expect_closed().await;
    // A ClientInfo box holding something that is not a JSON object.
    let secret = NodeSecretKey::generate();
    let (mut raw, _) = Raw::upgrade(running.http_addr).await;
    let Some(Frame::ServerKey { key }) = raw.frame().await else {
        panic!("server key");
    };
    let good = derp::seal_client_info(&secret, &key, [1; 24], &ClientInfo::default());
    let Frame::ClientInfo { nonce, .. } = good else {
        panic!("client info");
    };
    let sealed =
        warren_proto::proof::seal_box(&secret.to_bytes(), key.as_bytes(), &nonce, b"[1,2]");
    raw.send(&Frame::ClientInfo {
        key: secret.public_key(),
        nonce,
        sealed,
    })
    .await;
    raw.expect_closed().await;
    assert_eq!(running.relay.stats().refused, 3);
    assert_eq!(running.relay.stats().clients, 2);
    a.send(kb.public_key(), b"unaffected").await.expect("send");
    assert_eq!(recv_packet(&mut b).await.1, b"unaffected".to_vec());
    running.shutdown().await;
}

#[tokio::test]
async fn slow_reader_loses_its_own_packets_and_the_queue_stays_bounded() {
    let (running, url) = start(RelayOptions {
        // Keep the stalled client connected, to watch its queue.
        write_timeout: None,
        queue_depth: 32,
        ..RelayOptions::default()
    })
    .await;
    let (ka, kb, ks) = (
        NodeSecretKey::generate(),
        NodeSecretKey::generate(),
        NodeSecretKey::generate(),
    );
    let a = connect(&url, &ka).await;
    let mut b = connect(&url, &kb).await;
    let _slow = connect(&url, &ks).await; // never reads
    let relay = running.relay.clone();
    let big = vec![0x55; 60_000];
    // Push until the kernel buffers are full and the server drops for the slow client.
    let mut sent = 0u64;
    while relay
        .client_stats(&ks.public_key())
        .map_or(0, |s| s.dropped)
        < 50
    {
        a.send(ks.public_key(), &big).await.expect("send");
        sent += 1;
        assert!(sent < 20_000, "the slow client's queue never filled");
        if sent.is_multiple_of(32) {
            tokio::task::yield_now().await;
        }
    }
    let stats = relay
        .client_stats(&ks.public_key())
        .expect("still connected");
    assert!(stats.queued_data <= 32, "{stats:?}");
    assert!(relay.stats().dropped_queue_full >= 50);
    // Others are unaffected, in both directions.
    a.send(kb.public_key(), b"to b").await.expect("send");
    assert_eq!(recv_packet(&mut b).await.1, b"to b".to_vec());
    let b_stats = relay.client_stats(&kb.public_key()).expect("b");
    assert_eq!(b_stats.dropped, 0);
    running.shutdown().await;
}

/// A relay client over an in-memory pipe (the relay side runs in a task).
async fn pipe_client(relay: &Relay, secret: &NodeSecretKey, buffer: usize) -> Client {
    let (ours, theirs) = tokio::io::duplex(buffer);
    let r = relay.clone();
    tokio::spawn(async move { r.accept(theirs, None).await });
    Client::handshake(
        ours,
        secret,
        &ConnectOptions {
            server_key: Some(relay.public_key()),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("handshake")
}

#[tokio::test]
async fn disco_packets_overtake_a_full_data_queue() {
    const DEPTH: usize = 16;
    let relay = Relay::new(
        DerpSecretKey::generate(),
        RelayOptions {
            write_timeout: None,
            queue_depth: DEPTH,
            ..RelayOptions::default()
        },
    );
    let (ka, ks) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let a = pipe_client(&relay, &ka, 1 << 17).await;
    // A tiny pipe: the relay's writer blocks on the first packet.
    let mut s = pipe_client(&relay, &ks, 64).await;
    // Packets larger than the relay's write batch (so one write holds one packet), and few
    // enough that the byte cap does not bind: one is in flight, the rest queue up.
    let total = DEPTH as u8 + 8;
    for i in 0..total {
        a.send(ks.public_key(), &[i; 40_000]).await.expect("send");
    }
    wait_until("data queue full", || {
        relay
            .client_stats(&ks.public_key())
            .is_some_and(|c| c.queued_data == DEPTH && c.dropped >= 7)
    })
    .await;
    a.send(ks.public_key(), &disco_packet(0xd1))
        .await
        .expect("send");
    wait_until("disco queued", || {
        relay
            .client_stats(&ks.public_key())
            .is_some_and(|c| c.queued_disco == 1)
    })
    .await;
    // At most the packet already being written comes before the disco packet.
    let mut before = 0;
    loop {
        let (_, p) = recv_packet(&mut s).await;
        if warren_proto::disco::looks_like_disco(&p) {
            break;
        }
        before += 1;
    }
    assert_eq!(
        before, 1,
        "only the packet in flight may precede the disco packet"
    );
    // Then the newest data packets follow; 1..=7 were dropped for them.
    let mut rest = Vec::new();
    while rest.len() < DEPTH {
        rest.push(recv_packet(&mut s).await.1[0]);
    }
    assert_eq!(rest, (8..total).collect::<Vec<u8>>());
}

#[tokio::test]
async fn newest_connection_for_a_key_wins() {
    let (running, url) = start(RelayOptions::default()).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let mut a1 = connect(&url, &ka).await;
    let mut a2 = connect(&url, &ka).await;
    let b = connect(&url, &kb).await;
    // The first connection is told why, then closed.
    assert_eq!(
        recv(&mut a1).await,
        ClientEvent::Health {
            problem: REPLACED_HEALTH.into()
        }
    );
    let end = tokio::time::timeout(STEP, a1.recv())
        .await
        .expect("in time");
    assert!(
        matches!(end, Err(ClientError::Read(warren_derp::ReadError::Closed))),
        "{end:?}"
    );
    b.send(ka.public_key(), b"to the newest")
        .await
        .expect("send");
    assert_eq!(recv_packet(&mut a2).await.1, b"to the newest".to_vec());
    assert_eq!(running.relay.stats().replaced, 1);
    assert_eq!(running.relay.stats().clients, 2);
    // The replaced connection leaving did not announce the key as gone.
    assert_eq!(running.relay.stats().peer_gone_disconnected, 0);
    running.shutdown().await;
}

#[tokio::test]
async fn peer_gone_for_departed_senders_and_unknown_disco_destinations() {
    let (running, url) = start(RelayOptions::default()).await;
    let (ka, kb, kc) = (
        NodeSecretKey::generate(),
        NodeSecretKey::generate(),
        NodeSecretKey::generate(),
    );
    let mut a = connect(&url, &ka).await;
    let b = connect(&url, &kb).await;
    let mut c = connect(&url, &kc).await;
    b.send(ka.public_key(), b"from b").await.expect("send");
    assert_eq!(recv_packet(&mut a).await.1, b"from b".to_vec());
    drop(b);
    assert_eq!(
        recv(&mut a).await,
        ClientEvent::PeerGone {
            peer: kb.public_key(),
            reason: PeerGoneReason::Disconnected
        }
    );
    // c never heard from b, so it was not told.
    let nobody = NodeSecretKey::generate().public_key();
    c.send(nobody, b"not disco").await.expect("send");
    c.send(nobody, &disco_packet(1)).await.expect("send");
    assert_eq!(
        recv(&mut c).await,
        ClientEvent::PeerGone {
            peer: nobody,
            reason: PeerGoneReason::NotHere
        }
    );
    let stats = running.relay.stats();
    assert_eq!(stats.peer_gone_disconnected, 1);
    assert_eq!(stats.peer_gone_not_here, 1);
    assert_eq!(stats.dropped_unknown_dest, 2);
    running.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_clients_get_keepalives_every_60_to_65_seconds() {
    let relay = Relay::new(DerpSecretKey::generate(), RelayOptions::default());
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let r = relay.clone();
    tokio::spawn(async move { r.accept(theirs, None).await });
    let secret = NodeSecretKey::generate();
    let mut io = ours;
    let mut buf = Vec::new();
    async fn next(io: &mut tokio::io::DuplexStream, buf: &mut Vec<u8>) -> Frame {
        loop {
            if let Some((f, used)) = Frame::decode(buf).expect("valid") {
                buf.drain(..used);
                return f;
            }
            assert!(io.read_buf(buf).await.expect("read") > 0, "closed");
        }
    }
    let Frame::ServerKey { key } = next(&mut io, &mut buf).await else {
        panic!("server key");
    };
    let mut out = Vec::new();
    derp::seal_client_info(&secret, &key, [3; 24], &ClientInfo::default()).encode(&mut out);
    io.write_all(&out).await.expect("write");
    assert!(matches!(
        next(&mut io, &mut buf).await,
        Frame::ServerInfo { .. }
    ));
    let t0 = tokio::time::Instant::now();
    assert_eq!(next(&mut io, &mut buf).await, Frame::KeepAlive);
    let first = t0.elapsed();
    assert!(
        first >= Duration::from_secs(60) && first < Duration::from_secs(65),
        "{first:?}"
    );
    assert_eq!(next(&mut io, &mut buf).await, Frame::KeepAlive);
    let second = t0.elapsed() - first;
    // The period is fixed per connection (timer granularity is 1 ms).
    assert!(
        second.abs_diff(first) <= Duration::from_millis(2),
        "{first:?} then {second:?}"
    );
}

/// A relay with STUN on `stun_listen`, and its STUN port.
async fn start_stun(stun_listen: &str) -> (Running, u16) {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun_listen: stun_listen.parse().expect("addr"),
        ..Config::default()
    };
    let running = warren_derp::start_with(
        &config,
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start");
    let port = running.stun_addr.expect("stun runs").port();
    (running, port)
}

/// Sends a Binding request to `server`; returns where the answer came from, its transaction
/// id and the mapped address it reports.
async fn stun_ask(
    sock: &tokio::net::UdpSocket,
    server: SocketAddr,
    txid: [u8; 12],
) -> (SocketAddr, [u8; 12], SocketAddr) {
    let mut req = Vec::new();
    warren_proto::stun::build_request(txid, Some(b"warren-test"), &mut req);
    sock.send_to(&req, server).await.expect("send");
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    let (got_txid, mapped) = warren_proto::stun::parse_response(&buf[..n]).expect("response");
    (from, got_txid, mapped)
}

#[tokio::test]
async fn stun_answers_binding_requests_on_loopback() {
    let (running, port) = start_stun("127.0.0.1:0").await;
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // Garbage first: ignored, and the server keeps serving.
    sock.send_to(b"not stun at all", server)
        .await
        .expect("send");
    sock.send_to(&[0u8; 20], server).await.expect("send");
    let txid = [7u8; 12];
    let (from, got_txid, mapped) = stun_ask(&sock, server, txid).await;
    assert_eq!(from, server);
    assert_eq!(got_txid, txid);
    assert_eq!(mapped, sock.local_addr().expect("addr"));
    running.shutdown().await;
}

#[tokio::test]
async fn stun_on_a_wildcard_address_answers_from_the_address_asked() {
    // Bound to every address; asked at 127.0.0.2. Without per-packet source addresses the
    // kernel would answer from 127.0.0.1, and a NAT would not match the answer to its mapping.
    let (running, port) = start_stun("0.0.0.0:0").await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    for asked in [[127, 0, 0, 2], [127, 0, 0, 1]] {
        let server = SocketAddr::from((asked, port));
        let (from, _, mapped) = stun_ask(&sock, server, [9u8; 12]).await;
        assert_eq!(from, server, "answer's source");
        assert_eq!(mapped, sock.local_addr().expect("addr"));
    }
    running.shutdown().await;
}

#[tokio::test]
async fn verification_refuses_unknown_keys_and_admits_known_ones() {
    let known = NodeSecretKey::generate();
    let verifier = Arc::new(StaticVerifier::new([known.public_key()]));
    let (running, url) = start(RelayOptions {
        verifier: Some(verifier.clone()),
        ..RelayOptions::default()
    })
    .await;
    let mut ok = connect(&url, &known).await;
    let stranger = NodeSecretKey::generate();
    let err = Client::connect(&url, &stranger, &ConnectOptions::default())
        .await
        .expect_err("refused");
    assert!(matches!(err, ClientError::Read(_)), "{err}");
    assert_eq!(running.relay.stats().clients, 1);
    assert_eq!(running.relay.stats().refused, 1);
    verifier.insert(stranger.public_key());
    let now_known = connect(&url, &stranger).await;
    now_known
        .send(known.public_key(), b"admitted")
        .await
        .expect("send");
    assert_eq!(recv_packet(&mut ok).await.1, b"admitted".to_vec());
    running.shutdown().await;
}

#[tokio::test]
async fn tls_front_with_pem_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, tls) = self_signed(dir.path(), "relay", "localhost");
    let running = warren_derp::start_with(
        &tls_relay_config(tls),
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start");
    let url = format!("https://localhost:{}/derp", running.http_addr.port());
    let trusted = ConnectOptions {
        tls_roots: vec![cert],
        ..ConnectOptions::default()
    };
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let a = Client::connect(&url, &ka, &trusted)
        .await
        .expect("tls connect");
    let insecure = ConnectOptions {
        insecure_skip_verify: true,
        ..ConnectOptions::default()
    };
    let mut b = Client::connect(&url, &kb, &insecure)
        .await
        .expect("insecure");
    a.send(kb.public_key(), b"over tls").await.expect("send");
    assert_eq!(recv_packet(&mut b).await.1, b"over tls".to_vec());
    // Without trust anchors the certificate is refused.
    let (other, _) = self_signed(dir.path(), "other", "localhost");
    let untrusted = ConnectOptions {
        tls_roots: vec![other],
        ..ConnectOptions::default()
    };
    let err = Client::connect(&url, &ka, &untrusted)
        .await
        .expect_err("untrusted certificate");
    // tokio-rustls reports a refused certificate as invalid data.
    assert!(
        matches!(&err, ClientError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData),
        "{err:?}"
    );
    running.shutdown().await;
}

#[test]
fn key_file_is_created_once_with_mode_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub").join("derp.key");
    let k1 = warren_derp::load_or_create_key(&path).expect("create");
    let k2 = warren_derp::load_or_create_key(&path).expect("load");
    assert_eq!(k1.public_key(), k2.public_key());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

fn mesh_options(key: &str) -> RelayOptions {
    RelayOptions {
        mesh_key: Some(key.parse().expect("mesh key")),
        ..RelayOptions::default()
    }
}

/// Receives until a packet arrives, skipping presence and health frames.
async fn next_packet(c: &mut Client) -> (NodePublicKey, Vec<u8>) {
    loop {
        if let ClientEvent::RecvPacket { src, packet } = recv(c).await {
            return (src, packet);
        }
    }
}

#[tokio::test]
async fn meshed_servers_carry_packets_between_their_clients() {
    let mesh_key = "ab".repeat(32);
    let (r1, url1) = start(mesh_options(&mesh_key)).await;
    let (r2, url2) = start(mesh_options(&mesh_key)).await;
    let (ka, kb, kc) = (
        NodeSecretKey::generate(),
        NodeSecretKey::generate(),
        NodeSecretKey::generate(),
    );
    // b is there before the servers link (it arrives in the initial PeerPresent burst); c
    // arrives afterwards (a PeerPresent of its own).
    let mut a = connect(&url1, &ka).await;
    let mut b = connect(&url2, &kb).await;
    // Both servers get the whole region's list, themselves included, and r1 lists r2 twice.
    let links: Vec<_> = [
        (&r1, &url1),
        (&r1, &url2),
        (&r1, &url2),
        (&r2, &url1),
        (&r2, &url2),
    ]
    .into_iter()
    .map(|(r, url)| {
        let relay = r.relay.clone();
        let url = url.clone();
        tokio::spawn(async move { relay.mesh_with(url).await })
    })
    .collect();
    wait_until("each server knows the other's client", || {
        r1.relay.stats().remote_clients == 1 && r2.relay.stats().remote_clients == 1
    })
    .await;
    // r1's two links to r2 are two mesh clients there (b, and r1 twice), not one key whose
    // connections keep replacing each other.
    wait_until("r2 serves b and both links", || {
        r2.relay.stats().clients == 3
    })
    .await;
    assert_eq!(r2.relay.stats().replaced, 0);
    a.send(kb.public_key(), b"a to b").await.expect("send");
    assert_eq!(
        next_packet(&mut b).await,
        (ka.public_key(), b"a to b".to_vec())
    );
    b.send(ka.public_key(), b"b to a").await.expect("send");
    assert_eq!(
        next_packet(&mut a).await,
        (kb.public_key(), b"b to a".to_vec())
    );
    let mut c = connect(&url2, &kc).await;
    wait_until("r1 hears of c", || r1.relay.stats().remote_clients == 2).await;
    a.send(kc.public_key(), b"a to c").await.expect("send");
    assert_eq!(
        next_packet(&mut c).await,
        (ka.public_key(), b"a to c".to_vec())
    );
    assert_eq!(r1.relay.stats().packets_forwarded, 2);

    // b leaves: r1 forgets it, and packets for it are no longer forwarded.
    drop(b);
    wait_until("r1 hears b left", || r1.relay.stats().remote_clients == 1).await;
    let unknown_before = r1.relay.stats().dropped_unknown_dest;
    a.send(kb.public_key(), b"to nobody").await.expect("send");
    wait_until("dropped at r1", || {
        r1.relay.stats().dropped_unknown_dest == unknown_before + 1
    })
    .await;
    assert_eq!(r1.relay.stats().packets_forwarded, 2);

    // r2 goes away: r1 drops its link and everything it learned through it.
    r2.shutdown().await;
    wait_until("r1 forgets r2's clients", || {
        r1.relay.stats().remote_clients == 0
    })
    .await;
    r1.shutdown().await;
    for l in links {
        tokio::time::timeout(STEP, l)
            .await
            .expect("mesh links end with their relay")
            .expect("link task");
    }
}

#[tokio::test]
async fn mesh_frames_from_ordinary_clients_close_only_their_connection() {
    let (running, url) = start(mesh_options(&"cd".repeat(32))).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let mut b = connect(&url, &kb).await;
    for frame in [
        Frame::WatchConns,
        Frame::ForwardPacket {
            src: ka.public_key(),
            dst: kb.public_key(),
            packet: b"forged".to_vec(),
        },
    ] {
        let mut intruder = connect(&url, &ka).await;
        intruder.sender().frame(frame).await.expect("send");
        loop {
            match tokio::time::timeout(STEP, intruder.recv()).await {
                Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => panic!("connection not closed"),
            }
        }
    }
    // Nothing was forwarded to b, and b is still served.
    let kc = NodeSecretKey::generate();
    let c = connect(&url, &kc).await;
    c.send(kb.public_key(), b"still here").await.expect("send");
    assert_eq!(
        next_packet(&mut b).await,
        (kc.public_key(), b"still here".to_vec())
    );
    running.shutdown().await;
}

#[tokio::test]
async fn shutdown_unregisters_every_client() {
    let (running, url) = start(RelayOptions::default()).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let _a = connect(&url, &ka).await;
    let _b = connect(&url, &kb).await;
    wait_until("both connected", || running.relay.stats().clients == 2).await;
    let relay = running.relay.clone();
    running.shutdown().await;
    // The connection tasks were cancelled, and their registrations went with them.
    assert_eq!(relay.stats().clients, 0);
}

#[tokio::test]
async fn dial_address_connects_while_tls_checks_the_name() {
    // A DERP map node with HostName and IPv4: the certificate names the host, the IP is
    // where to connect (and the name need not resolve at all).
    let dir = tempfile::tempdir().expect("tempdir");
    let name = "derp.invalid";
    let (cert, tls) = self_signed(dir.path(), "relay", name);
    let running = warren_derp::start_with(
        &tls_relay_config(tls),
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start");
    let url = format!("https://{name}:{}/derp", running.http_addr.port());
    let options = ConnectOptions {
        tls_roots: vec![cert],
        dial: Some(running.http_addr.ip()),
        ..ConnectOptions::default()
    };
    Client::connect(&url, &NodeSecretKey::generate(), &options)
        .await
        .expect("dialled by address, verified by name");
    running.shutdown().await;
}

/// A client sending frames the relay does not act on (an unknown type and a server-only
/// type, each as large as allowed) keeps its connection, and its traffic still flows.
#[tokio::test]
async fn large_ignored_frames_are_skipped_and_traffic_goes_on() {
    let (running, url) = start(RelayOptions::default()).await;
    let kb = NodeSecretKey::generate();
    let mut b = connect(&url, &kb).await;
    let ka = NodeSecretKey::generate();
    let mut raw = Raw::handshake(running.http_addr, &ka).await;
    raw.send(&Frame::Unknown {
        frame_type: derp::FrameType(0x7f),
        payload: vec![0x11; derp::MAX_INFO_LEN],
    })
    .await;
    raw.send(&Frame::SendPacket {
        dst: kb.public_key(),
        packet: b"after unknown".to_vec(),
    })
    .await;
    assert_eq!(recv_packet(&mut b).await.1, b"after unknown".to_vec());
    raw.send(&Frame::Health {
        problem: "h".repeat(derp::MAX_INFO_LEN),
    })
    .await;
    raw.send(&Frame::SendPacket {
        dst: kb.public_key(),
        packet: vec![0x22; derp::MAX_PACKET_SIZE],
    })
    .await;
    assert_eq!(
        recv_packet(&mut b).await,
        (ka.public_key(), vec![0x22; derp::MAX_PACKET_SIZE])
    );
    let stats = running.relay.stats();
    assert_eq!((stats.bad_frames, stats.clients), (0, 2));
    running.shutdown().await;
}

/// A `tracing` writer into a shared buffer, to read what the relay logged.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A refused client's reason is logged at info, and a flood of them writes a bounded number
/// of lines (one limiter shared by every such site).
#[tokio::test]
async fn refused_clients_are_logged_at_info_a_bounded_number_of_times() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    // The relay's tasks run on this test's (current-thread) runtime, so on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let (running, _) = start(RelayOptions::default()).await;
    const FLOOD: usize = 3 * warren_derp::log_limit::PEER_LOG_BURST as usize;
    for _ in 0..FLOOD {
        let (mut raw, _) = Raw::upgrade(running.http_addr).await;
        assert!(matches!(raw.frame().await, Some(Frame::ServerKey { .. })));
        raw.send(&Frame::ClientInfo {
            key: NodeSecretKey::generate().public_key(),
            nonce: [0; 24],
            sealed: vec![0xee; 64],
        })
        .await;
        raw.expect_closed().await;
    }
    assert_eq!(running.relay.stats().refused, FLOOD as u64);
    let text = String::from_utf8(logs.0.lock().expect("log").clone()).expect("utf-8");
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("client refused"))
        .collect();
    assert_eq!(
        refused.len(),
        warren_derp::log_limit::PEER_LOG_BURST as usize,
        "{text}"
    );
    assert!(
        refused
            .iter()
            .all(|l| l.contains(" INFO ") && l.contains("info box does not open")),
        "{text}"
    );
    running.shutdown().await;
}
