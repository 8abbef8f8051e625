//! Tailscale's Rust DERP client (crate `ts_derp`, from tailscale-rs) against the DERP relay
//! warren-control embeds: it verifies clients by default, so the ts_derp keys are registered
//! as nodes first and a stranger's key is refused; registered ones complete the handshake
//! (snake_case ClientInfo with `"mesh_key":"none"`), exchange packets both ways up to the
//! largest ts_derp can frame, and hear `PeerGone` when a peer leaves.

mod common;
#[path = "../../derp/tests/support/ts.rs"]
mod ts;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{Server, new_auth_key, register_req, server_key};
use ts::{Node, TS_MAX_PACKET, frames, ts_over_tcp, ts_recv};
use warren_proto::derp::{Frame, PeerGoneReason};

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
        frames(&seen_b.lock().expect("tap")).contains(&gone)
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
