//! Fixtures shared by warren's benchmarks: a control core populated with many registered,
//! connected nodes, so a benchmark measures one change against a realistic mesh; and the load
//! generator ([`loadgen`]) behind `warren-loadgen`, which measures a real control process.

pub mod loadgen;
pub mod throughput;

use warren_control::core::{Core, NewAuthKey, Settings};
use warren_control::netmap::Subscription;
use warren_control::store::SqliteStore;
use warren_proto::control::DnsConfig;
use warren_proto::{DiscoSecretKey, NodeSecretKey};

/// A core with `n` registered nodes, each with an open map stream.
pub struct Mesh {
    /// The control server's state.
    pub core: Core,
    /// One open stream per node; drain them to keep them from counting as lagging.
    pub streams: Vec<Subscription>,
    /// A reusable pre-auth key for further joins.
    pub auth_key: String,
    /// A fixed clock.
    pub now_ms: i64,
}

impl Mesh {
    /// Builds the mesh (in-memory SQLite, so the disk does not dominate).
    pub fn new(n: usize) -> Self {
        let settings = Settings {
            v4: "100.64.0.0/10".parse().expect("range"),
            v6: "fd7a:115c:a1e0::/48".parse().expect("range"),
            dns: DnsConfig {
                magic_dns: true,
                base_domain: "bench.internal".into(),
                ..DnsConfig::default()
            },
            derp_map: Default::default(),
            policy: None,
        };
        let now_ms = 1_700_000_000_000;
        let store = SqliteStore::in_memory().expect("sqlite");
        let mut core = Core::open(std::sync::Arc::new(store), &settings, now_ms).expect("core");
        core.create_user("bench", now_ms).expect("user");
        let new = NewAuthKey {
            user: "bench".into(),
            reusable: true,
            ..NewAuthKey::default()
        };
        let (_, auth_key) = core.create_auth_key(&new, [7; 30], now_ms).expect("key");
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let node = core
                .register(
                    NodeSecretKey::generate().public_key(),
                    DiscoSecretKey::generate().public_key(),
                    &format!("node{i}"),
                    &auth_key,
                    now_ms,
                )
                .expect("register");
            ids.push(node.id);
        }
        let mut mesh = Self {
            core,
            streams: Vec::with_capacity(n),
            auth_key,
            now_ms,
        };
        for (i, id) in ids.iter().enumerate() {
            // Each node coming online is a delta to every connected one: drain now and then,
            // as the streams' tasks would, so no queue overflows.
            if i % 128 == 0 {
                mesh.drain();
            }
            // The full map is read page by page from shared records by the stream's task;
            // nothing of it is held here.
            let sub = mesh.core.subscribe(*id, now_ms, None).expect("subscribe");
            mesh.streams.push(sub);
        }
        mesh.drain();
        assert_eq!(mesh.core.netmap().lagged(), 0);
        mesh
    }

    /// Empties every stream's queue; returns how many deltas were waiting.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        for s in &mut self.streams {
            while s.outbox.try_recv().is_some() {
                n += 1;
            }
        }
        n
    }
}

/// A node's identity for the policy, owned by user `bench`, with addresses derived from `id`
/// (for benchmarks that drive the netmap directly).
pub fn identity(id: u64) -> warren_control::policy::PolicyNode {
    let low = u32::try_from(id & 0x003f_ffff).unwrap_or(0);
    let user = warren_control::policy::PolicyUser {
        id: 1,
        name: "bench".into(),
        email: None,
    };
    warren_control::policy::PolicyNode::user(
        id,
        &format!("n{id}"),
        user,
        std::net::Ipv4Addr::from(0x6440_0000 | low),
        std::net::Ipv6Addr::from((0xfd7a_115c_a1e0_u128 << 80) | u128::from(low)),
    )
}
