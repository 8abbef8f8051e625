//! The node core fed random datagrams on every input (UDP, DERP, TUN): each must be a typed
//! error or a harmless no-op, never a panic, and must not disturb a working peer.

#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use warren_node_core::sim::{NatKind, World};

#[test]
fn random_input_never_panics_nor_disturbs_a_working_peer() {
    // Two hosts with a working tunnel (host 1 sends to host 0).
    let mut w = World::new(Instant::now());
    let (sa, sb) = (w.add_site(NatKind::Public), w.add_site(NatKind::Public));
    let (a, b) = (w.add_host(sa), w.add_host(sb));
    let every = Duration::from_millis(100);
    let t0 = w.now;
    w.run(t0 + Duration::from_secs(3), every, |w| w.send(b, a, 1));
    let before = w.hosts[a].received;
    assert!(before > 0, "the tunnel works before the garbage");

    // Garbage on every input of host 0, claiming to come from its real peer.
    let from = w.hosts[b].local;
    let peer = w.hosts[b].key;
    let now = w.now;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Prefixes that steer the bytes into each parser: WireGuard message types, a DERP-ish
    // frame, the disco magic, an IPv4 header byte.
    let prefixes: [&[u8]; 5] = [
        &[],
        &[1, 0, 0, 0],
        &[4, 0, 0, 0],
        &[0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC],
        &[0x45],
    ];
    let node = &mut w.hosts[a].node;
    for i in 0..20_000u64 {
        let len = (next() % 200) as usize;
        let mut d: Vec<u8> = prefixes[(i % 5) as usize].to_vec();
        d.extend((0..len).map(|_| next() as u8));
        let _ = node.handle_udp(from, &d, now);
        let _ = node.handle_derp(900, peer, &d, now);
        let _ = node.handle_tun_packet(&d, now);
        while node.poll_transmit().is_some() {}
        assert!(
            node.poll_tun().is_none(),
            "garbage never reaches the TUN device"
        );
    }

    // The peer's traffic still arrives.
    let t1 = w.now;
    w.run(t1 + Duration::from_secs(2), every, |w| w.send(b, a, 2));
    assert!(
        w.hosts[a].received > before,
        "the working peer's packets stopped arriving after the garbage"
    );
}
