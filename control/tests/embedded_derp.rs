//! Control's embedded DERP server as nodes see it: the region in the map has a second,
//! STUN-only node on a second STUN port, and that port answers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Server, new_auth_key, register_req, server_key, stream_req};
use warren_proto::NodeSecretKey;
use warren_proto::control::map_response::Kind;

/// Two different UDP ports free on loopback a moment ago (both held while the second is
/// chosen, so they cannot be the same).
fn two_free_udp_ports() -> (u16, u16) {
    let bind = || std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (a, b) = (bind(), bind());
    let port = |s: &std::net::UdpSocket| s.local_addr().expect("addr").port();
    (port(&a), port(&b))
}

#[tokio::test]
async fn the_map_gives_nodes_a_second_stun_address_that_answers() {
    let (stun, alt) = two_free_udp_ports();
    let server = Server::start_with(|c| {
        c.server_url = "http://127.0.0.1:50443".into();
        let d = &mut c.derp.server;
        d.enabled = Some(true);
        d.listen_addr = "127.0.0.1:0".parse().expect("addr");
        d.stun_listen_addr = SocketAddr::from(([127, 0, 0, 1], stun));
        d.stun_alt_listen_addr =
            warren_control::config::AltStun::At(SocketAddr::from(([127, 0, 0, 1], alt)));
    })
    .await;
    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;
    let node = NodeSecretKey::generate();
    c.register_node(register_req(&node, &sk, &auth, "n"))
        .await
        .expect("register");
    let mut stream = c
        .stream_map_response(stream_req(&node, &sk))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("ok").expect("message");
    let Some(Kind::Full(full)) = first.kind else {
        panic!("a full map first: {first:?}")
    };
    let region = &full.derp_map.expect("DERP map").regions[0];
    let stun_only: Vec<(i32, bool)> = region
        .nodes
        .iter()
        .map(|n| (n.stun_port, n.stun_only))
        .collect();
    assert_eq!(
        stun_only,
        [(i32::from(stun), false), (i32::from(alt), true)]
    );

    // Both ports answer a Binding request with the client's address.
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    for (i, port) in [stun, alt].into_iter().enumerate() {
        let txid = [u8::try_from(i).expect("small"); 12];
        let mut request = Vec::new();
        warren_proto::stun::build_request(txid, None, &mut request);
        client
            .send_to(&request, ("127.0.0.1", port))
            .await
            .expect("send");
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .expect("recv");
        let (got, mapped) = warren_proto::stun::parse_response(&buf[..n]).expect("response");
        assert_eq!(got, txid);
        assert_eq!(mapped, client.local_addr().expect("addr"));
    }
    drop(stream);
    server.stop().await;
}
