//! The relay's `/metrics` endpoint over real loopback TCP: its counters move by exactly the
//! traffic sent, and the listener's connection cap holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_derp::client::ConnectOptions;
use warren_derp::config::Config;
use warren_derp::metrics::{MAX_CONNECTIONS, parse_exposition};
use warren_derp::server::RelayOptions;
use warren_derp::{Client, ClientEvent, Relay, Running};
use warren_proto::{DerpSecretKey, NodeSecretKey};

const STEP: Duration = Duration::from_secs(10);

async fn start(options: RelayOptions) -> (Running, String, SocketAddr) {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun: false,
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..Config::default()
    };
    let relay = Relay::new(DerpSecretKey::generate(), options);
    let running = warren_derp::start_with(&config, relay)
        .await
        .expect("start");
    let url = format!("http://{}/derp", running.http_addr);
    let metrics = running.metrics_addr.expect("metrics listener");
    (running, url, metrics)
}

/// One HTTP GET; returns the status and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
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
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

/// Scrapes until `cond` holds on the samples (state owned by the server, nothing to wait on).
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let m = scrape(addr).await;
        if cond(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {what}: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {m:#?}"))
}

async fn connect(url: &str, secret: &NodeSecretKey) -> Client {
    Client::connect(url, secret, &ConnectOptions::default())
        .await
        .expect("connect")
}

#[tokio::test]
async fn packets_and_bytes_relayed_move_by_exactly_what_was_sent() {
    let (running, url, metrics) = start(RelayOptions::default()).await;
    let (ka, kb) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    let a = connect(&url, &ka).await;
    let mut b = connect(&url, &kb).await;
    let m = scrape_until(metrics, "two clients", |m| {
        m.get("warren_derp_clients") == Some(&2.0)
    })
    .await;
    assert_eq!(value(&m, "warren_derp_packets_relayed_total"), 0.0);
    assert_eq!(value(&m, "warren_derp_bytes_relayed_total"), 0.0);
    for reason in ["queue_full", "unknown_dest", "gone", "mesh"] {
        let series = format!("warren_derp_dropped_packets_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&m, &series), 0.0, "{series}");
    }

    // Five data packets (not disco: the first byte is a WireGuard message type) of 100..=500
    // bytes, all delivered.
    let sizes = [100usize, 200, 300, 400, 500];
    for (i, len) in sizes.iter().enumerate() {
        let mut p = vec![4u8; *len];
        p[1] = i as u8;
        a.send(kb.public_key(), &p).await.expect("send");
    }
    for len in sizes {
        let ev = tokio::time::timeout(STEP, b.recv())
            .await
            .expect("packet in time")
            .expect("event");
        match ev {
            ClientEvent::RecvPacket { src, packet } => {
                assert_eq!(src, ka.public_key());
                assert_eq!(packet.len(), len);
            }
            other => panic!("expected a packet, got {other:?}"),
        }
    }
    let m = scrape(metrics).await;
    assert_eq!(value(&m, "warren_derp_packets_relayed_total"), 5.0);
    assert_eq!(value(&m, "warren_derp_bytes_relayed_total"), 1500.0);
    assert_eq!(value(&m, "warren_derp_queued_packets"), 0.0);

    // A packet for a key that is not connected is dropped with its reason.
    let nobody = NodeSecretKey::generate().public_key();
    a.send(nobody, &[4u8; 64]).await.expect("send");
    let m = scrape_until(metrics, "unknown destination counted", |m| {
        m.get("warren_derp_dropped_packets_total{reason=\"unknown_dest\"}") == Some(&1.0)
    })
    .await;
    assert_eq!(value(&m, "warren_derp_packets_relayed_total"), 5.0);
    assert_eq!(value(&m, "warren_derp_bytes_relayed_total"), 1500.0);
    assert_eq!(value(&m, "warren_derp_accepts_total"), 2.0);

    // The client count follows a disconnect.
    drop(a);
    scrape_until(metrics, "one client left", |m| {
        m.get("warren_derp_clients") == Some(&1.0)
    })
    .await;
    running.shutdown().await;
}

#[tokio::test]
async fn queue_depth_shows_a_stalled_clients_full_queue() {
    const DEPTH: usize = 32;
    let (running, url, metrics) = start(RelayOptions {
        // Keep the stalled client connected, to watch its queue.
        write_timeout: None,
        queue_depth: DEPTH,
        ..RelayOptions::default()
    })
    .await;
    let ka = NodeSecretKey::generate();
    let a = connect(&url, &ka).await;
    // A client over a 1 KiB pipe that never reads: its queue fills and stays full.
    let ks = NodeSecretKey::generate();
    let (ours, theirs) = tokio::io::duplex(1024);
    let relay = running.relay.clone();
    tokio::spawn(async move { relay.accept(theirs, None).await });
    let _stalled = Client::handshake(
        ours,
        &ks,
        &ConnectOptions {
            server_key: Some(running.relay.public_key()),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("handshake");
    let depth = DEPTH as f64;
    // First DEPTH packets: the writer takes some into a write that the full pipe blocks for
    // good (the client never reads), the rest wait in the queue.
    for _ in 0..DEPTH {
        a.send(ks.public_key(), &[4u8; 1000]).await.expect("send");
    }
    let m = scrape_until(metrics, "the writer is blocked", |m| {
        m.get("warren_derp_packets_relayed_total") == Some(&depth)
            && m.get("warren_derp_queued_packets")
                .is_some_and(|q| *q < depth)
    })
    .await;
    let queued = value(&m, "warren_derp_queued_packets");
    assert_eq!(
        value(
            &m,
            "warren_derp_dropped_packets_total{reason=\"queue_full\"}"
        ),
        0.0
    );
    // Then twice the depth more: the queue fills and each push past it drops the oldest.
    for _ in 0..2 * DEPTH {
        a.send(ks.public_key(), &[4u8; 1000]).await.expect("send");
    }
    let m = scrape_until(metrics, "every packet routed", |m| {
        m.get("warren_derp_packets_relayed_total") == Some(&(3.0 * depth))
    })
    .await;
    assert_eq!(value(&m, "warren_derp_queued_packets"), depth);
    assert_eq!(value(&m, "warren_derp_queue_depth_max"), depth);
    assert_eq!(
        value(
            &m,
            "warren_derp_dropped_packets_total{reason=\"queue_full\"}"
        ),
        queued + depth
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_listener_caps_connections_and_answers_only_metrics() {
    let (running, _url, metrics) = start(RelayOptions::default()).await;
    assert_eq!(get(metrics, "/").await.0, 404);
    assert_eq!(get(metrics, "/metricsx").await.0, 404);
    // Hold every slot with a connection that never sends a request...
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(TcpStream::connect(metrics).await.expect("tcp"));
    }
    // ...then one more is closed without an answer.
    let mut extra = TcpStream::connect(metrics).await.expect("tcp");
    let _ = extra
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(STEP, extra.read_to_end(&mut out))
        .await
        .expect("closed in time");
    assert!(read.is_err() || out.is_empty(), "answered past the cap");
    // Closing the held connections frees their slots.
    drop(held);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut s = TcpStream::connect(metrics).await.expect("tcp");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await;
        if out.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await;
}
