//! warren-control's `/metrics` (`metrics_listen_addr`) over real loopback sockets: nodes
//! register and stream through gRPC, and the scraped numbers follow exactly.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Server, new_auth_key, register_req, server_key, sign, stream_req, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_derp::metrics::parse_exposition;
use warren_proto::NodeSecretKey;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;

const STEP: Duration = Duration::from_secs(10);

async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8(out).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse_exposition(body)
}

/// Scrapes until `cond` holds (the server's state has nothing to wait on).
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

fn nodes(m: &BTreeMap<String, f64>) -> [f64; 3] {
    ["online", "offline", "expired"]
        .map(|s| value(m, &format!("warren_control_nodes{{state=\"{s}\"}}")))
}

#[tokio::test]
async fn scrapes_follow_registrations_streams_and_refusals() {
    let server = Server::start_with(|c| {
        c.metrics_listen_addr = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    wait_until("metrics listening", || {
        server.stats.metrics_addr.get().is_some()
    })
    .await;
    let metrics = *server.stats.metrics_addr.get().expect("bound");

    let m = scrape(metrics).await;
    assert_eq!(nodes(&m), [0.0, 0.0, 0.0]);
    assert_eq!(value(&m, "warren_control_registrations_total"), 0.0);
    assert_eq!(value(&m, "warren_control_map_streams_open"), 0.0);
    assert_eq!(
        value(&m, "warren_control_map_messages_sent_total{kind=\"full\"}"),
        0.0
    );

    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;
    let (a, b) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    c.register_node(register_req(&a, &sk, &auth, "a"))
        .await
        .expect("register a");
    let b_id = c
        .register_node(register_req(&b, &sk, &auth, "b"))
        .await
        .expect("register b")
        .into_inner()
        .node
        .expect("node")
        .id;
    let m = scrape(metrics).await;
    assert_eq!(value(&m, "warren_control_registrations_total"), 2.0);
    assert_eq!(nodes(&m), [0.0, 2.0, 0.0]);
    // Each registration wrote its node in one store call, timed.
    assert_eq!(
        value(
            &m,
            "warren_control_store_seconds_count{op=\"register_node\"}"
        ),
        2.0
    );
    assert!(
        m.contains_key("warren_control_store_seconds_bucket{le=\"+Inf\",op=\"register_node\"}")
    );

    // a's map stream: online, one stream, and exactly the full map's bytes counted.
    let mut stream = c
        .stream_map_response(stream_req(&a, &sk))
        .await
        .expect("stream")
        .into_inner();
    let first = tokio::time::timeout(STEP, stream.message())
        .await
        .expect("full map in time")
        .expect("ok")
        .expect("message");
    assert!(matches!(first.kind, Some(Kind::Full(_))), "{first:?}");
    let full_len = prost::Message::encoded_len(&first) as f64;
    let m = scrape_until(metrics, "a online", |m| nodes(m) == [1.0, 1.0, 0.0]).await;
    assert_eq!(value(&m, "warren_control_map_streams_open"), 1.0);
    assert_eq!(
        value(&m, "warren_control_map_messages_sent_total{kind=\"full\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "warren_control_map_bytes_sent_total{kind=\"full\"}"),
        full_len
    );

    // Expiring b moves it to expired, and a hears a delta about it.
    admin
        .expire_node(ExpireNodeRequest { id: b_id })
        .await
        .expect("expire b");
    let deltas = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("warren_control_map_messages_sent_total{")
                    && !k.contains("\"full\"")
                    && !k.contains("\"keepalive\"")
            })
            .map(|(_, v)| v)
            .sum()
    };
    // The delta leaves at the stream's next tick.
    let m = scrape_until(metrics, "b expired and a told", |m| {
        nodes(m) == [1.0, 0.0, 1.0] && deltas(m) >= 1.0
    })
    .await;
    let deltas = deltas(&m);
    assert!(deltas >= 1.0, "no delta counted: {m:#?}");

    // Refusals carry the typed reason: a used single-use key, a forged proof.
    let single = admin
        .create_pre_auth_key(CreatePreAuthKeyRequest {
            user: "alice".into(),
            reusable: false,
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner()
        .secret;
    c.register_node(register_req(&NodeSecretKey::generate(), &sk, &single, "c"))
        .await
        .expect("first use");
    c.register_node(register_req(&NodeSecretKey::generate(), &sk, &single, "d"))
        .await
        .expect_err("used");
    let mut forged = register_req(&NodeSecretKey::generate(), &sk, &auth, "e");
    forged.proof = Some(sign(
        &NodeSecretKey::generate(),
        &sk,
        "RegisterNode",
        &RegisterNodeRequest::default(),
    ));
    c.register_node(forged).await.expect_err("forged");
    let m = scrape(metrics).await;
    assert_eq!(value(&m, "warren_control_registrations_total"), 3.0);
    assert_eq!(
        value(
            &m,
            "warren_control_registration_refusals_total{reason=\"auth_key_used\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "warren_control_registration_refusals_total{reason=\"proof\"}"
        ),
        1.0
    );
    assert_eq!(nodes(&m), [1.0, 1.0, 1.0]);

    // The stream closing takes a offline and the gauge back down.
    drop(stream);
    scrape_until(metrics, "a offline", |m| {
        nodes(m) == [0.0, 2.0, 1.0] && m.get("warren_control_map_streams_open") == Some(&0.0)
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn the_embedded_relays_traffic_is_in_controls_scrape() {
    // A TCP port free on loopback a moment ago, for the embedded relay (the DERP map carries
    // its port, so it cannot be 0).
    let derp_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let server = Server::start_with(|c| {
        c.metrics_listen_addr = Some("127.0.0.1:0".parse().expect("addr"));
        let d = &mut c.derp.server;
        d.enabled = Some(true);
        d.listen_addr = SocketAddr::from(([127, 0, 0, 1], derp_port));
        d.stun_listen_addr = "127.0.0.1:0".parse().expect("addr");
        d.stun_alt_listen_addr = warren_control::config::AltStun::Off;
    })
    .await;
    wait_until("metrics listening", || {
        server.stats.metrics_addr.get().is_some()
    })
    .await;
    let metrics = *server.stats.metrics_addr.get().expect("bound");
    let m = scrape(metrics).await;
    assert_eq!(value(&m, "warren_derp_clients"), 0.0);
    assert_eq!(value(&m, "warren_derp_packets_relayed_total"), 0.0);

    // Two registered nodes (the embedded relay admits only those) relay three packets.
    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;
    let (a, b) = (NodeSecretKey::generate(), NodeSecretKey::generate());
    for (key, name) in [(&a, "a"), (&b, "b")] {
        c.register_node(register_req(key, &sk, &auth, name))
            .await
            .expect("register");
    }
    let url = format!("http://127.0.0.1:{derp_port}/derp");
    let options = warren_derp::client::ConnectOptions::default();
    let da = warren_derp::Client::connect(&url, &a, &options)
        .await
        .expect("a connects");
    let mut db = warren_derp::Client::connect(&url, &b, &options)
        .await
        .expect("b connects");
    for len in [10usize, 20, 30] {
        da.send(b.public_key(), &vec![4u8; len])
            .await
            .expect("send");
    }
    for len in [10usize, 20, 30] {
        match tokio::time::timeout(STEP, db.recv())
            .await
            .expect("packet in time")
            .expect("event")
        {
            warren_derp::ClientEvent::RecvPacket { packet, .. } => assert_eq!(packet.len(), len),
            other => panic!("expected a packet, got {other:?}"),
        }
    }
    let m = scrape(metrics).await;
    assert_eq!(value(&m, "warren_derp_clients"), 2.0);
    assert_eq!(value(&m, "warren_derp_packets_relayed_total"), 3.0);
    assert_eq!(value(&m, "warren_derp_bytes_relayed_total"), 60.0);
    assert_eq!(value(&m, "warren_control_registrations_total"), 2.0);
    drop((da, db));
    server.stop().await;
}

#[test]
fn metrics_listen_addr_is_off_unless_set() {
    use warren_control::config::Config;
    assert_eq!(Config::default().metrics_listen_addr, None);
    let c = Config::parse(
        "metrics_listen_addr = \"127.0.0.1:9090\"",
        std::path::Path::new("control.toml"),
    )
    .expect("parses");
    assert_eq!(
        c.metrics_listen_addr,
        Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
    );
    let err = Config::parse(
        "metrics_listen_addr = \"9090\"",
        std::path::Path::new("control.toml"),
    )
    .expect_err("not an address");
    assert!(err.to_string().contains("metrics_listen_addr"), "{err}");
}
