//! The node core fed random datagrams on every input (UDP, DERP, TUN): each must be a typed
//! error or a harmless no-op, never a panic, and must not disturb a working peer.

#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::Instant;

use warren_node_core::{Node, PeerConfig};
use warren_proto::{DiscoSecretKey, NodeSecretKey};

#[test]
fn random_input_never_panics() {
    let now = Instant::now();
    let peer_secret = NodeSecretKey::generate();
    let peer_disco = DiscoSecretKey::generate();
    let mut node = Node::new(
        NodeSecretKey::generate(),
        DiscoSecretKey::generate(),
        7,
        now,
    );
    node.set_peers(vec![PeerConfig {
        key: peer_secret.public_key(),
        name: "p".into(),
        allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
        endpoints: vec!["192.0.2.2:41641".parse().expect("ep")],
        disco: Some(peer_disco.public_key()),
        home_region: 900,
    }]);
    let from: SocketAddr = "192.0.2.2:41641".parse().expect("addr");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let prefixes: [&[u8]; 5] = [
        &[],
        &[1, 0, 0, 0],
        &[4, 0, 0, 0],
        &[0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC],
        &[0x45],
    ];
    for i in 0..20_000u64 {
        let len = (next() % 200) as usize;
        let mut d: Vec<u8> = prefixes[(i % 5) as usize].to_vec();
        d.extend((0..len).map(|_| next() as u8));
        let _ = node.handle_udp(from, &d, now);
        let _ = node.handle_derp(900, peer_secret.public_key(), &d, now);
        let _ = node.handle_tun_packet(&d, now);
        while node.poll_transmit().is_some() {}
        assert!(
            node.poll_tun().is_none(),
            "garbage never reaches the TUN device"
        );
    }
    node.handle_timeout(now);
    assert_eq!(node.peer_stats(now).len(), 1, "the peer is still there");
}
