//! What the node's packet filter costs per inbound packet: a SYN a rule allows (the rule
//! last of 32, so every rule is scanned), a UDP packet no rule allows, a UDP reply found in
//! a flow table of 1,000 flows, a TCP segment of an open connection, the allow-all filter,
//! and recording an outbound UDP packet's flow.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use ipnet::IpNet;
use warren_node_core::filter::{
    AcceptReason, DropReason, DstPorts, Filter, FlowTable, IpProto, PortRange, Rule, Verdict,
};

const ME: [u8; 4] = [100, 64, 0, 1];
const PEER: [u8; 4] = [100, 64, 0, 2];
const RULES: u8 = 32;
const FLOWS: u16 = 1_000;

fn host(a: [u8; 4]) -> IpNet {
    IpNet::from(IpAddr::V4(Ipv4Addr::from(a)))
}

/// 31 rules for other peers, then PEER -> ME on TCP 22.
fn filter() -> Filter {
    let mut rules: Vec<Rule> = (0..RULES - 1)
        .map(|i| Rule {
            srcs: vec![host([100, 64, 1, i])],
            dsts: vec![DstPorts {
                net: host(ME),
                ports: PortRange::single(443),
            }],
            protos: Vec::new(),
        })
        .collect();
    rules.push(Rule {
        srcs: vec![host(PEER)],
        dsts: vec![DstPorts {
            net: host(ME),
            ports: PortRange::single(22),
        }],
        protos: vec![IpProto::TCP],
    });
    Filter::new(vec![host(ME)], rules)
}

fn tcp(src: [u8; 4], dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).tcp(40000, dport, 1, 1024);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &[0; 1200]).expect("build");
    v
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, &[0; 1200])
        .expect("build");
    v
}

fn per_packet(c: &mut Criterion) {
    let f = filter();
    let now = Instant::now();
    let mut flows = FlowTable::new();
    for port in 0..FLOWS {
        flows.note_outbound(&udp(ME, PEER, 10_000 + port, 53), now);
    }
    let cases = [
        (
            "allowed_syn",
            tcp(PEER, ME, 22, true),
            Verdict::Accept(AcceptReason::Rule),
        ),
        (
            "denied_udp",
            udp(PEER, ME, 5000, 80),
            Verdict::Drop(DropReason::NoRule),
        ),
        (
            "reply_udp",
            udp(PEER, ME, 53, 10_000 + FLOWS / 2),
            Verdict::Accept(AcceptReason::ReplyFlow),
        ),
        (
            "tcp_established",
            tcp(PEER, ME, 22, false),
            Verdict::Accept(AcceptReason::TcpNotSyn),
        ),
    ];
    let mut group = c.benchmark_group("filter");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(3));
    for (name, packet, expect) in &cases {
        assert_eq!(f.check(packet, &mut flows, now), *expect, "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| f.check(black_box(packet), &mut flows, now))
        });
    }
    let all = Filter::allow_all();
    let packet = udp(PEER, ME, 5000, 80);
    group.bench_function("allow_all", |b| {
        b.iter(|| all.check(black_box(&packet), &mut flows, now))
    });
    let out = udp(ME, PEER, 10_000, 53);
    group.bench_function("note_outbound_udp", |b| {
        b.iter(|| flows.note_outbound(black_box(&out), now))
    });
    group.finish();
}

criterion_group!(benches, per_packet);
criterion_main!(benches);
