//! What one node joining costs the control server, with 1,000 and 10,000 nodes registered and
//! connected: registration (store write, address allocation) plus one delta to every affected
//! peer. The netmap fan-out alone is measured too, so the store's share is visible.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use prost::Message;
use warren_benches::Mesh;
use warren_proto::control::map_response::Kind;
use warren_proto::control::{MapResponse, Node};
use warren_proto::{DiscoSecretKey, NodeSecretKey};

fn join(c: &mut Criterion) {
    let mut group = c.benchmark_group("join");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for n in [1_000usize, 10_000] {
        let mut mesh = Mesh::new(n);
        group.bench_with_input(BenchmarkId::new("register_and_fan_out", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let key = NodeSecretKey::generate().public_key();
                    let disco = DiscoSecretKey::generate().public_key();
                    let start = Instant::now();
                    let node = mesh
                        .core
                        .register(key, disco, "joiner", &mesh.auth_key, mesh.now_ms)
                        .expect("join");
                    total += start.elapsed();
                    assert_eq!(mesh.drain(), n, "every connected peer gets one delta");
                    mesh.core.delete_node(node.id).expect("leave");
                    mesh.drain();
                }
                total
            })
        });
        let joiner = mesh.core.register(
            NodeSecretKey::generate().public_key(),
            DiscoSecretKey::generate().public_key(),
            "sized",
            &mesh.auth_key,
            mesh.now_ms,
        );
        if let Ok(node) = joiner {
            let size = MapResponse {
                seq: 1,
                version: 1,
                kind: Some(Kind::PeerAdded(node.clone())),
            }
            .encoded_len();
            eprintln!(
                "join delta: {size} bytes per peer, {} bytes to all {n} peers",
                size * n
            );
            mesh.core.delete_node(node.id).expect("leave");
            mesh.drain();
        }
        group.bench_with_input(BenchmarkId::new("netmap_fan_out_only", n), &n, |b, _| {
            let mut netmap = warren_control::netmap::Netmap::default();
            let mut subs = Vec::with_capacity(n);
            for id in 1..=n as u64 {
                netmap.upsert(
                    Node {
                        id,
                        ..Node::default()
                    },
                    warren_benches::identity(id),
                );
            }
            for id in 1..=n as u64 {
                if let Some(sub) = netmap.subscribe(id, None) {
                    subs.push(sub);
                }
            }
            let joiner = Node {
                id: u64::MAX,
                given_name: "joiner".into(),
                ..Node::default()
            };
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let sent = netmap.upsert(joiner.clone(), warren_benches::identity(u64::MAX));
                    total += start.elapsed();
                    assert_eq!(sent, n);
                    netmap.remove(u64::MAX);
                    for s in &mut subs {
                        while s.outbox.try_recv().is_some() {}
                    }
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, join);
criterion_main!(benches);
