//! Tailscale's Rust DERP client (crate `ts_derp`, from tailscale-rs) against warren-derp: its
//! handshake (snake_case ClientInfo with `"mesh_key":"none"`), packets both ways up to the
//! largest it can frame, and `PeerGone` when a peer leaves. It dials with its own TLS and HTTP
//! upgrade, or runs over a TCP stream we upgraded (whose bytes we can watch).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ts_derp::{IpUsage, ServerConnInfo, TlsValidationConfig};
use warren_derp::client::ConnectOptions;
use warren_derp::config::Config;
use warren_derp::{Client, ClientEvent, Relay, RelayOptions, Running};
use warren_proto::DerpSecretKey;
use warren_proto::derp::{Frame, PeerGoneReason};

mod common;
#[path = "support/ts.rs"]
mod ts;

use common::{self_signed, tls_relay_config};
use ts::{Node, STEP, TS_MAX_PACKET, frames, ts_over_tcp, ts_recv};

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

async fn plain_relay() -> Running {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun: false,
        ..Config::default()
    };
    warren_derp::start_with(
        &config,
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start")
}

/// ts_derp dials the TLS relay itself (its dialer, its HTTP upgrade), completes the handshake
/// and exchanges packets, the largest it can frame included, with another ts_derp client.
#[tokio::test]
async fn ts_derp_dials_the_tls_relay_and_exchanges_packets() {
    // ts_derp's TLS stack brings rustls' aws-lc-rs provider next to our ring one, so rustls
    // cannot pick a process default by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, tls) = self_signed(dir.path(), "relay", "localhost");
    let running = warren_derp::start_with(
        &tls_relay_config(tls),
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start");
    let server = ServerConnInfo {
        hostname: "localhost".into(),
        ipv4: IpUsage::FixedAddr(Ipv4Addr::LOCALHOST),
        ipv6: IpUsage::Disable,
        tls_validation_config: TlsValidationConfig::InsecureForTests,
        https_port: running.http_addr.port(),
        stun_port: None,
        stun_only: false,
        supports_port_80: false,
    };
    let (a, b) = (Node::new(), Node::new());
    let connect = |node: &Node| {
        let server = server.clone();
        let pair = node.pair.clone();
        async move {
            tokio::time::timeout(STEP, ts_derp::Client::connect([&server], &pair))
                .await
                .expect("connect in time")
                .expect("ts_derp connects to warren-derp")
        }
    };
    let ca = connect(&a).await;
    let cb = connect(&b).await;
    assert_eq!(running.relay.stats().clients, 2);
    ca.send_one(b.ts_public(), b"hello from a")
        .await
        .expect("send");
    assert_eq!(
        ts_recv(&cb).await,
        (a.ts_public(), b"hello from a".to_vec())
    );
    let big = payload(TS_MAX_PACKET, 7);
    cb.send_one(a.ts_public(), &big).await.expect("send");
    assert_eq!(ts_recv(&ca).await, (b.ts_public(), big.clone()));
    ca.send_one(b.ts_public(), &big).await.expect("send");
    assert_eq!(ts_recv(&cb).await, (a.ts_public(), big));
    running.shutdown().await;
}

/// Over plain HTTP: ts_derp and warren's own client exchange packets both ways (the largest
/// ts_derp can frame too), and a ts_derp client hears `PeerGone(disconnected)` when a peer that
/// sent to it leaves, and keeps working.
#[tokio::test]
async fn ts_derp_exchanges_packets_and_hears_peer_gone() {
    let running = plain_relay().await;
    let (a, b, w) = (Node::new(), Node::new(), Node::new());
    let ca = ts_over_tcp(running.http_addr, &a)
        .await
        .0
        .expect("ts_derp handshake");
    let (cb, seen_b) = ts_over_tcp(running.http_addr, &b).await;
    let cb = cb.expect("ts_derp handshake");
    let url = format!("http://{}/derp", running.http_addr);
    let mut cw = Client::connect(&url, &w.secret, &ConnectOptions::default())
        .await
        .expect("warren client");

    ca.send_one(b.ts_public(), b"a to b").await.expect("send");
    assert_eq!(ts_recv(&cb).await, (a.ts_public(), b"a to b".to_vec()));
    let big = payload(TS_MAX_PACKET, 1);
    cb.send_one(a.ts_public(), &big).await.expect("send");
    assert_eq!(ts_recv(&ca).await, (b.ts_public(), big.clone()));
    // ts_derp <-> warren's client, both ways.
    ca.send_one(w.ts_public(), &big).await.expect("send");
    match tokio::time::timeout(STEP, cw.recv())
        .await
        .expect("in time")
    {
        Ok(ClientEvent::RecvPacket { src, packet }) => assert_eq!((src, packet), (a.public(), big)),
        other => panic!("expected a's packet, got {other:?}"),
    }
    cw.send(a.public(), b"w to a").await.expect("send");
    assert_eq!(ts_recv(&ca).await, (w.ts_public(), b"w to a".to_vec()));

    // a leaves: b, which a sent to, is told; ts_derp handles that frame itself and goes on.
    let cb = Arc::new(cb);
    let waiting = tokio::spawn({
        let cb = cb.clone();
        async move { ts_recv(&cb).await }
    });
    drop(ca);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let gone = frames(&seen_b.lock().expect("tap")).into_iter().any(|f| {
            f == Frame::PeerGone {
                peer: a.public(),
                reason: PeerGoneReason::Disconnected,
            }
        });
        if gone {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no PeerGone for a reached b"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cw.send(b.public(), b"still there?").await.expect("send");
    let got = waiting.await.expect("join");
    assert_eq!(got, (w.ts_public(), b"still there?".to_vec()));
    running.shutdown().await;
}
