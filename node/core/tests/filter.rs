//! The packet filter's properties over random packets (it never panics; allow-all lets all
//! through; a filter that allows nothing still lets replies and continuations in; replies
//! to noted UDP flows pass until they expire in virtual time; the flow table stays bounded),
//! and the filter inside simulated nodes: a TCP-22-only policy drops and counts UDP.

// Tests need one real instant as the origin of their virtual time.
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use ipnet::IpNet;
use proptest::prelude::*;
use warren_node_core::filter::{
    AcceptReason, DropReason, DstPorts, FLOW_TIMEOUT, Filter, FlowTable, IpProto, PortRange, Rule,
    Verdict,
};
use warren_node_core::sim::{NatKind, World};

/// Whether a peer may send to `a`: not multicast, not link-local, not unspecified.
fn unicast(a: &IpAddr) -> bool {
    !a.is_multicast()
        && !a.is_unspecified()
        && match a {
            IpAddr::V4(v) => !v.is_link_local(),
            IpAddr::V6(v) => !v.is_unicast_link_local(),
        }
}

/// Two distinct unicast addresses of one family.
fn pair_of_addresses() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![
        any::<([u8; 4], [u8; 4])>()
            .prop_map(|(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b)))),
        any::<([u8; 16], [u8; 16])>()
            .prop_map(|(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b)))),
    ]
    .prop_filter("distinct unicast addresses", |(a, b)| {
        a != b && unicast(a) && unicast(b)
    })
}

fn host(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

fn builder(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family"),
    }
}

fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    builder(src, dst)
        .udp(sport, dport)
        .write(&mut v, b"payload")
        .expect("build");
    v
}

/// A packet the generator builds: any of the protocols the filter looks into.
#[derive(Debug, Clone)]
enum Kind {
    Tcp { syn: bool, ack: bool, dport: u16 },
    Udp { sport: u16, dport: u16 },
    Icmp { ty: u8, code: u8 },
    Raw { proto: u8, body: Vec<u8> },
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (any::<bool>(), any::<bool>(), any::<u16>()).prop_map(|(syn, ack, dport)| Kind::Tcp {
            syn,
            ack,
            dport
        }),
        (any::<u16>(), any::<u16>()).prop_map(|(sport, dport)| Kind::Udp { sport, dport }),
        (any::<u8>(), any::<u8>()).prop_map(|(ty, code)| Kind::Icmp { ty, code }),
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(proto, body)| Kind::Raw { proto, body }),
    ]
}

fn build(src: IpAddr, dst: IpAddr, kind: &Kind) -> Vec<u8> {
    let b = builder(src, dst);
    let mut v = Vec::new();
    match kind {
        Kind::Tcp { syn, ack, dport } => {
            let mut t = b.tcp(40000, *dport, 1, 1024);
            if *syn {
                t = t.syn();
            }
            if *ack {
                t = t.ack(1);
            }
            t.write(&mut v, b"x").expect("build");
        }
        Kind::Udp { sport, dport } => b.udp(*sport, *dport).write(&mut v, b"x").expect("build"),
        Kind::Icmp { ty, code } => {
            if src.is_ipv4() {
                b.icmpv4_raw(*ty, *code, [0; 4])
                    .write(&mut v, &[0; 8])
                    .expect("build")
            } else {
                b.icmpv6_raw(*ty, *code, [0; 4])
                    .write(&mut v, &[0; 8])
                    .expect("build")
            }
        }
        Kind::Raw { proto, body } => {
            // The IP header alone, then the body, with the lengths set to agree.
            let mut h = Vec::new();
            b.udp(0, 0).write(&mut h, body).expect("build");
            let ip_len = if src.is_ipv4() { 20 } else { 40 };
            v.extend_from_slice(&h[..ip_len]);
            v.extend_from_slice(body);
            if src.is_ipv4() {
                v[9] = *proto;
                let total = u16::try_from(v.len()).expect("small").to_be_bytes();
                v[2..4].copy_from_slice(&total);
            } else {
                v[6] = *proto;
                let payload = u16::try_from(body.len()).expect("small").to_be_bytes();
                v[4..6].copy_from_slice(&payload);
            }
        }
    }
    v
}

/// A filter with a mix of rules over the whole address space, so every branch is reached.
fn busy_filter() -> Filter {
    let all4: IpNet = "0.0.0.0/0".parse().expect("net");
    let all6: IpNet = "::/0".parse().expect("net");
    let dst = |net, ports| DstPorts { net, ports };
    Filter::new(
        vec![all4, all6],
        vec![
            Rule {
                srcs: vec!["10.0.0.0/8".parse().expect("net"), all6],
                dsts: vec![dst(all4, PortRange::single(22)), dst(all6, PortRange::ALL)],
                protos: Vec::new(),
            },
            Rule {
                srcs: vec![all4],
                dsts: vec![dst(all4, PortRange::ALL)],
                protos: vec![IpProto(47), IpProto::SCTP],
            },
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(
        prefix in prop_oneof![Just(vec![]), Just(vec![0x45u8]), Just(vec![0x46u8]), Just(vec![0x60u8])],
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut p = prefix;
        p.extend(body);
        let t0 = Instant::now();
        let mut flows = FlowTable::new();
        flows.note_outbound(&p, t0);
        let _ = busy_filter().check(&p, &mut flows, t0);
        let _ = Filter::new(Vec::new(), Vec::new()).check(&p, &mut flows, t0);
    }

    #[test]
    fn damaged_packets_never_panic(
        (src, dst) in pair_of_addresses(),
        kind in kind(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut p = build(src, dst, &kind);
        for (i, b) in flips {
            let i = i.index(p.len());
            p[i] = b;
        }
        p.truncate(cut.index(p.len() + 1));
        let t0 = Instant::now();
        let mut flows = FlowTable::new();
        flows.note_outbound(&p, t0);
        let _ = busy_filter().check(&p, &mut flows, t0);
    }

    #[test]
    fn allow_all_accepts_every_packet(
        (src, dst) in pair_of_addresses(),
        kind in kind(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let t0 = Instant::now();
        let f = Filter::allow_all();
        let mut flows = FlowTable::new();
        let accept = Verdict::Accept(AcceptReason::AllowAll);
        prop_assert_eq!(f.check(&build(src, dst, &kind), &mut flows, t0), accept);
        prop_assert_eq!(f.check(&junk, &mut flows, t0), accept);
    }

    #[test]
    fn a_filter_without_rules_lets_in_only_replies_and_continuations(
        (src, dst) in pair_of_addresses(),
        kind in kind(),
    ) {
        let t0 = Instant::now();
        let f = Filter::new(vec![host(dst)], Vec::new());
        let v = f.check(&build(src, dst, &kind), &mut FlowTable::new(), t0);
        match v {
            Verdict::Drop(_) => {}
            Verdict::Accept(r) => {
                match (&kind, r) {
                    (Kind::Tcp { syn, ack, .. }, AcceptReason::TcpNotSyn) => {
                        prop_assert!(!syn || *ack)
                    }
                    // Raw bytes under protocol 6 that happen to read as a TCP segment
                    // without SYN (or with ACK): a continuation, as Tailscale judges it.
                    (Kind::Raw { proto: 6, body }, AcceptReason::TcpNotSyn) => {
                        let flags = body.get(13).copied().unwrap_or(0);
                        prop_assert!(body.len() >= 20 && (flags & 0x02 == 0 || flags & 0x10 != 0))
                    }
                    (Kind::Icmp { .. }, AcceptReason::IcmpResponse) => {}
                    // Raw bytes under an ICMP protocol that read as a reply or an error.
                    (Kind::Raw { proto, body }, AcceptReason::IcmpResponse) => {
                        let (ty, code) = (body.first().copied(), body.get(1).copied());
                        let v4 = src.is_ipv4();
                        let response = match (v4, *proto, ty) {
                            (true, 1, Some(0)) | (false, 58, Some(129)) => code == Some(0),
                            (true, 1, Some(3 | 11 | 12)) | (false, 58, Some(1..=4)) => true,
                            _ => false,
                        };
                        prop_assert!(response, "{:?} taken for an ICMP response", kind);
                    }
                    // A raw IPv4 header with a fragment offset, or an IPv6 fragment header.
                    (Kind::Raw { .. }, AcceptReason::Fragment) => {}
                    _ => prop_assert!(false, "{:?} accepted for {:?}", kind, r),
                }
            }
        }
    }

    #[test]
    fn a_reply_to_a_noted_udp_flow_passes(
        (me, peer) in pair_of_addresses(),
        sport in any::<u16>(),
        dport in any::<u16>(),
        other in any::<u16>(),
    ) {
        let t0 = Instant::now();
        let f = Filter::new(vec![host(me)], Vec::new());
        let mut flows = FlowTable::new();
        prop_assert!(flows.note_outbound(&udp(me, peer, sport, dport), t0));
        prop_assert_eq!(
            f.check(&udp(peer, me, dport, sport), &mut flows, t0),
            Verdict::Accept(AcceptReason::ReplyFlow)
        );
        if other != dport {
            prop_assert_eq!(
                f.check(&udp(peer, me, other, sport), &mut flows, t0),
                Verdict::Drop(DropReason::NoRule)
            );
        }
    }

    #[test]
    fn noted_flows_expire_in_virtual_time(
        (me, peer) in pair_of_addresses(),
        elapsed_ms in 0u64..(2 * 120_000),
    ) {
        let t0 = Instant::now();
        let f = Filter::new(vec![host(me)], Vec::new());
        let mut flows = FlowTable::new();
        flows.note_outbound(&udp(me, peer, 5000, 53), t0);
        let elapsed = Duration::from_millis(elapsed_ms);
        let v = f.check(&udp(peer, me, 53, 5000), &mut flows, t0 + elapsed);
        prop_assert_eq!(v.is_accept(), elapsed < FLOW_TIMEOUT, "after {:?}: {:?}", elapsed, v);
    }

    #[test]
    fn the_flow_table_stays_bounded_and_keeps_the_newest(
        (me, peer) in pair_of_addresses(),
        notes in proptest::collection::vec((any::<u16>(), 0u64..5_000), 1..300),
    ) {
        let cap = 16;
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        let f = Filter::new(vec![host(me)], Vec::new());
        let mut flows = FlowTable::with_limits(cap, timeout);
        let mut now = t0;
        for (port, step_ms) in notes {
            now += Duration::from_millis(step_ms);
            flows.note_outbound(&udp(me, peer, port, 53), now);
            prop_assert!(flows.len() <= cap);
            prop_assert_eq!(
                f.check(&udp(peer, me, 53, port), &mut flows, now),
                Verdict::Accept(AcceptReason::ReplyFlow)
            );
        }
    }
}

/// A TCP SYN from host `from` to host `to`'s mesh address.
fn syn(w: &World, from: usize, to: usize, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(
        w.hosts[from].mesh_ip.octets(),
        w.hosts[to].mesh_ip.octets(),
        64,
    )
    .tcp(40000, dport, 1, 1024)
    .syn()
    .write(&mut v, &[])
    .expect("build");
    v
}

#[test]
fn simulated_node_with_a_tcp_22_policy_drops_and_counts_udp() {
    let mut w = World::new(Instant::now());
    let (sa, sb) = (w.add_site(NatKind::Public), w.add_site(NatKind::Public));
    let (a, b) = (w.add_host(sa), w.add_host(sb));
    let (a_ip, b_ip) = (w.hosts[a].mesh_ip, w.hosts[b].mesh_ip);
    // B accepts only TCP 22 from A.
    w.hosts[b].node.set_filter(Filter::new(
        vec![IpNet::from(IpAddr::V4(b_ip))],
        vec![Rule {
            srcs: vec![IpNet::from(IpAddr::V4(a_ip))],
            dsts: vec![DstPorts {
                net: IpNet::from(IpAddr::V4(b_ip)),
                ports: PortRange::single(22),
            }],
            protos: vec![IpProto::TCP],
        }],
    ));
    // Simulated hosts echo what they receive; A, with a filter that allows nothing, drops
    // B's echoes (SYNs from B), which also ends each echo there.
    w.hosts[a]
        .node
        .set_filter(Filter::new(vec![IpNet::from(IpAddr::V4(a_ip))], Vec::new()));
    let ssh = syn(&w, a, b, 22);
    let web = syn(&w, a, b, 80);
    let dns = udp(a_ip.into(), b_ip.into(), 5000, 53);
    let t0 = w.now;
    let mut sent = 0u64;
    w.run(
        t0 + Duration::from_secs(3),
        Duration::from_millis(100),
        |w| {
            let now = w.now;
            for p in [&ssh, &web, &dns] {
                let _ = w.hosts[a].node.handle_tun_packet(p, now);
            }
            sent += 1;
        },
    );
    let drops = |w: &World, at: usize, from: usize| {
        w.hosts[at]
            .node
            .peer_stats(w.now)
            .iter()
            .find(|s| s.key == w.hosts[from].key)
            .expect("a peer")
            .filter_drops
    };
    let received = w.hosts[b].received;
    assert!(received > sent / 2, "SSH SYNs arrive: {received} of {sent}");
    assert_eq!(
        drops(&w, b, a),
        2 * received,
        "every UDP packet and SYN to 80 is dropped and counted"
    );
    assert_eq!(w.hosts[a].received, 0);
    assert_eq!(drops(&w, a, b), received, "A drops B's echoes");
}
