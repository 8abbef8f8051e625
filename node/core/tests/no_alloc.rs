//! The data path allocates nothing per packet once a peer's session and path are settled:
//! two real nodes (real WireGuard sessions, a disco-confirmed direct path) move packets both
//! ways through `Node::encapsulate` and `Node::decapsulate_udp` into reused buffers, under a
//! global allocator that counts this thread's allocations.
#![allow(unsafe_code)] // the counting allocator

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use warren_node_core::{Datagram, Dest, Node, PathKind, PeerConfig};
use warren_proto::{DiscoSecretKey, NodeSecretKey};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed to the system allocator unchanged; the counter is a
// const-initialised thread-local without a destructor, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

/// A UDP packet of `payload` bytes from 100.64.0.`src`:`sport` to 100.64.0.`dst`:`dport`.
fn udp_packet(src: u8, dst: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let builder =
        etherparse::PacketBuilder::ipv4([100, 64, 0, src], [100, 64, 0, dst], 64).udp(sport, dport);
    let body = vec![0x5a; payload];
    let mut out = Vec::with_capacity(builder.size(payload));
    builder.write(&mut out, &body).expect("packet");
    out
}

fn peer(key: &NodeSecretKey, disco: &DiscoSecretKey, host: u8, at: SocketAddr) -> PeerConfig {
    PeerConfig {
        key: key.public_key(),
        name: format!("n{host}"),
        allowed_ips: vec![format!("100.64.0.{host}/32").parse().expect("net")],
        routes: Vec::new(),
        exit_node: false,
        endpoints: vec![at],
        disco: Some(disco.public_key()),
        // No relay: handshakes go straight to the endpoint (the test delivers UDP only).
        home_region: 0,
    }
}

#[test]
fn settled_data_path_allocates_nothing_per_packet() {
    #[allow(clippy::disallowed_methods)] // the start of the test's own clock
    let t0 = Instant::now();
    let (ka, kb) = (
        NodeSecretKey::from_bytes([1; 32]),
        NodeSecretKey::from_bytes([2; 32]),
    );
    let (da, db) = (
        DiscoSecretKey::from_bytes([3; 32]),
        DiscoSecretKey::from_bytes([4; 32]),
    );
    let a_addr: SocketAddr = "198.51.100.1:41641".parse().expect("addr");
    let b_addr: SocketAddr = "198.51.100.2:41641".parse().expect("addr");
    let mut a = Node::new(ka.clone(), da.clone(), 1, t0);
    let mut b = Node::new(kb.clone(), db.clone(), 2, t0);
    a.set_peers(vec![peer(&kb, &db, 2, b_addr)]);
    b.set_peers(vec![peer(&ka, &da, 1, a_addr)]);

    // Handshake and disco through the queueing API, delivering UDP only, until both are quiet
    // and both paths are direct.
    let to_b = udp_packet(1, 2, 40_000, 5_201, 1_200);
    let to_a = udp_packet(2, 1, 5_201, 40_000, 1_200);
    let mut now = t0;
    for _ in 0..10 {
        now += Duration::from_millis(1);
        a.handle_tun_packet(&to_b, now).expect("a routes to b");
        b.handle_tun_packet(&to_a, now).expect("b routes to a");
        loop {
            let mut moved = false;
            while let Some(t) = a.poll_transmit() {
                if t.dst == Dest::Udp(b_addr) {
                    let _ = b.handle_udp(a_addr, &t.payload, now);
                    moved = true;
                }
            }
            while let Some(t) = b.poll_transmit() {
                if t.dst == Dest::Udp(a_addr) {
                    let _ = a.handle_udp(b_addr, &t.payload, now);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        while a.poll_tun().is_some() || b.poll_tun().is_some() {}
    }
    assert_eq!(
        a.path(&kb.public_key(), now),
        Some(PathKind::Direct(b_addr))
    );
    assert_eq!(
        b.path(&ka.public_key(), now),
        Some(PathKind::Direct(a_addr))
    );

    let mut wire = vec![0u8; 2_048];
    let mut plain = vec![0u8; 2_048];
    let mut one_way = |from: &mut Node,
                       to: &mut Node,
                       packet: &[u8],
                       dst: SocketAddr,
                       src: SocketAddr,
                       now: Instant| {
        let d = from
            .encapsulate(packet, now, &mut wire)
            .expect("encapsulate")
            .unwrap_or_else(|| {
                let q: Vec<_> = std::iter::from_fn(|| from.poll_transmit()).collect();
                panic!(
                    "queued instead: {q:?} path {:?}",
                    from.path_status(&to.public_key(), now)
                )
            });
        assert_eq!(
            d,
            Datagram {
                dst: Dest::Udp(dst),
                len: packet.len() + 32
            }
        );
        let n = to
            .decapsulate_udp(src, &wire[..d.len], now, &mut plain)
            .expect("decapsulate")
            .expect("a packet for the TUN device");
        assert_eq!(&plain[..n], packet);
    };
    // Warm up (flow table entries, counters), then count.
    for _ in 0..100 {
        now += Duration::from_micros(10);
        one_way(&mut a, &mut b, &to_b, b_addr, a_addr, now);
        one_way(&mut b, &mut a, &to_a, a_addr, b_addr, now);
    }
    let before = allocations();
    for _ in 0..10_000 {
        now += Duration::from_micros(10);
        one_way(&mut a, &mut b, &to_b, b_addr, a_addr, now);
        one_way(&mut b, &mut a, &to_a, a_addr, b_addr, now);
    }
    let during = allocations() - before;
    assert_eq!(during, 0, "{during} allocations for 20,000 packets");
    // The queues stayed empty: nothing went the slow way.
    assert!(a.poll_transmit().is_none() && b.poll_transmit().is_none());
    assert!(a.poll_tun().is_none() && b.poll_tun().is_none());
}
