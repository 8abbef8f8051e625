//! Two control instances on one PostgreSQL database (a throwaway server started here), over
//! loopback gRPC, with nodes spread across them: what one instance commits reaches the nodes
//! streaming from the other within a second (registrations, admin deletes, expiries, renames,
//! policy changes), and registrations racing through both never share an address or use a
//! single-use key twice.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, new_auth_key, register_req, server_key, stream_req_with};
use warren_control::config::Config;
use warren_netns_tests::postgres::{self, PgServer};
use warren_node_core::netmap::{MapReader, Netmap};
use warren_proto::control::*;
use warren_proto::{ControlPublicKey, NodeSecretKey};

/// The issue's bound on how fast a change crosses to the other instance's nodes.
const CROSS: Duration = Duration::from_secs(1);

/// One database, two instances sharing the server key.
struct Pair {
    a: Server,
    b: Server,
    _pg: PgServer,
}

fn on_postgres(pg: &PgServer, config: &mut Config) {
    config.database.kind = "postgres".into();
    config.database.postgres.host = pg.host().to_string_lossy().into_owned();
    config.database.postgres.port = postgres::PORT;
    config.database.postgres.name = postgres::DATABASE.into();
    config.database.postgres.user = postgres::USER.into();
    config.database.postgres.max_open_conns = 8;
}

async fn pair(policy_in_database: bool) -> Pair {
    let pg = tokio::task::spawn_blocking(|| PgServer::start(false).expect("PostgreSQL"))
        .await
        .expect("start");
    let mode = |c: &mut Config| {
        if policy_in_database {
            c.policy.mode = warren_control::config::PolicyMode::Database;
        }
    };
    let a = Server::start_with(|c| {
        on_postgres(&pg, c);
        mode(c);
    })
    .await;
    let key = a.key_path();
    let b = Server::start_with(|c| {
        on_postgres(&pg, c);
        mode(c);
        c.noise.private_key_path = key;
    })
    .await;
    Pair { a, b, _pg: pg }
}

/// A node following its map from one instance: what it holds, updated as messages arrive.
struct Follower {
    map: Arc<Mutex<Netmap>>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    async fn start(server: &Server, node: &NodeSecretKey, sk: &ControlPublicKey) -> Self {
        let mut c = server.control().await;
        let mut stream = c
            .stream_map_response(stream_req_with(node, sk, None, true))
            .await
            .expect("stream")
            .into_inner();
        let map = Arc::new(Mutex::new(Netmap::default()));
        let held = Arc::clone(&map);
        let task = tokio::spawn(async move {
            let mut reader = MapReader::default();
            while let Ok(Some(m)) = stream.message().await {
                for k in reader.read(m).expect("well-formed") {
                    held.lock().expect("map").apply(k).expect("applies");
                }
            }
        });
        Self { map, task }
    }

    /// Peers by name.
    fn peers(&self) -> BTreeMap<String, Node> {
        self.map
            .lock()
            .expect("map")
            .peers()
            .map(|p| (p.given_name.clone(), p.clone()))
            .collect()
    }

    /// Waits until `done` holds on the peers; returns how long it took.
    async fn wait(&self, what: &str, done: impl Fn(&BTreeMap<String, Node>) -> bool) -> Duration {
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(20);
        loop {
            if done(&self.peers()) {
                return start.elapsed();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {what}: {:?}",
                self.peers().keys()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register(
    server: &Server,
    node: &NodeSecretKey,
    sk: &ControlPublicKey,
    key: &str,
    host: &str,
) -> Node {
    server
        .control()
        .await
        .register_node(register_req(node, sk, key, host))
        .await
        .expect("register")
        .into_inner()
        .node
        .expect("node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_instance_reach_nodes_on_the_other_within_a_second() {
    let p = pair(false).await;
    let sk = server_key(&mut p.a.control().await).await;
    assert_eq!(sk, server_key(&mut p.b.control().await).await, "one key");
    let mut admin_a = p.a.local_admin().await;
    let mut admin_b = p.b.local_admin().await;
    let key = new_auth_key(&mut admin_a).await;

    // on-a streams from A, on-b from B.
    let on_a = NodeSecretKey::generate();
    let on_b = NodeSecretKey::generate();
    register(&p.a, &on_a, &sk, &key, "on-a").await;
    register(&p.b, &on_b, &sk, &key, "on-b").await;
    let follow_a = Follower::start(&p.a, &on_a, &sk).await;
    let follow_b = Follower::start(&p.b, &on_b, &sk).await;
    follow_a
        .wait("A's node sees B's, online", |p| {
            p.get("on-b").is_some_and(|n| n.online)
        })
        .await;
    follow_b
        .wait("B's node sees A's, online", |p| {
            p.get("on-a").is_some_and(|n| n.online)
        })
        .await;

    // Registered through A: on B's node within a second, with its address.
    let joiner = NodeSecretKey::generate();
    let joined = register(&p.a, &joiner, &sk, &key, "joiner").await;
    let took = follow_b
        .wait("the joiner on B", |p| {
            p.get("joiner")
                .is_some_and(|n| n.addresses == joined.addresses)
        })
        .await;
    assert!(took < CROSS, "registration crossed in {took:?}");

    // Renamed on B: A's node sees the new name.
    admin_b
        .rename_node(RenameNodeRequest {
            id: joined.id,
            new_name: "renamed".into(),
        })
        .await
        .expect("rename");
    let took = follow_a
        .wait("the rename on A", |p| {
            p.contains_key("renamed") && !p.contains_key("joiner")
        })
        .await;
    assert!(took < CROSS, "rename crossed in {took:?}");

    // Expired on B: gone from A's node.
    admin_b
        .expire_node(ExpireNodeRequest { id: joined.id })
        .await
        .expect("expire");
    let took = follow_a
        .wait("the expiry on A", |p| !p.contains_key("renamed"))
        .await;
    assert!(took < CROSS, "expiry crossed in {took:?}");

    // Deleted on B: a node streaming from A disappears from A's other node.
    let doomed = NodeSecretKey::generate();
    let node = register(&p.a, &doomed, &sk, &key, "doomed").await;
    let _doomed_stream = Follower::start(&p.a, &doomed, &sk).await;
    follow_b
        .wait("doomed on B", |p| p.get("doomed").is_some_and(|n| n.online))
        .await;
    admin_b
        .delete_node(DeleteNodeRequest { id: node.id })
        .await
        .expect("delete");
    let took = follow_a
        .wait("the delete on A", |p| !p.contains_key("doomed"))
        .await;
    assert!(took < CROSS, "delete crossed in {took:?}");

    // Online state is the instances' together: on-b's stream ending shows it offline on A.
    drop(follow_b);
    follow_a
        .wait("on-b offline on A", |p| {
            p.get("on-b").is_some_and(|n| !n.online)
        })
        .await;
    p.b.stop().await;
    p.a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_on_one_instance_reaches_nodes_on_the_other() {
    let p = pair(true).await;
    let sk = server_key(&mut p.a.control().await).await;
    let mut admin_a = p.a.local_admin().await;
    let mut admin_b = p.b.local_admin().await;
    let key = new_auth_key(&mut admin_a).await;
    let one = NodeSecretKey::generate();
    let two = NodeSecretKey::generate();
    register(&p.a, &one, &sk, &key, "one").await;
    register(&p.b, &two, &sk, &key, "two").await;
    let follow_one = Follower::start(&p.a, &one, &sk).await;
    follow_one
        .wait("one sees two", |p| p.contains_key("two"))
        .await;

    // Nobody may reach anybody: one's map on A loses two when B stores the policy.
    let nobody = r#"{"acls": [{"action": "accept", "src": ["carol@"], "dst": ["carol@:*"]}]}"#;
    admin_b
        .set_policy(SetPolicyRequest {
            policy: nobody.into(),
        })
        .await
        .expect("set on B");
    let took = follow_one.wait("the policy on A", |p| p.is_empty()).await;
    assert!(took < CROSS, "policy crossed in {took:?}");
    let text = admin_a
        .get_policy(GetPolicyRequest {})
        .await
        .expect("get on A")
        .into_inner()
        .policy;
    assert_eq!(text, nobody, "A shows the policy it now enforces");
    p.b.stop().await;
    p.a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_registrations_through_both_instances_stay_unique() {
    const NODES: usize = 300;
    let p = pair(false).await;
    let sk = server_key(&mut p.a.control().await).await;
    let mut admin = p.a.local_admin().await;
    new_auth_key(&mut admin).await;
    // One single-use key per node, and a few keys that two nodes race for.
    let mut keys = Vec::new();
    for _ in 0..NODES {
        let k = admin
            .create_pre_auth_key(CreatePreAuthKeyRequest {
                user: "alice".into(),
                reusable: false,
                ..Default::default()
            })
            .await
            .expect("key")
            .into_inner()
            .secret;
        keys.push(k);
    }
    let (ca, cb) = (p.a.control().await, p.b.control().await);
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        // Even nodes go through A, odd through B; every tenth key is raced by a second node
        // through the other instance.
        let racers = if i % 10 == 0 { 2 } else { 1 };
        for r in 0..racers {
            let mut c = if (i + r) % 2 == 0 {
                ca.clone()
            } else {
                cb.clone()
            };
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let node = NodeSecretKey::generate();
                let r = c
                    .register_node(register_req(&node, &sk, &key, "racer"))
                    .await;
                (key, r.map(|r| r.into_inner().node.expect("node")))
            }));
        }
    }
    let mut acknowledged = Vec::new();
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let (key, r) = t.await.expect("task");
        match r {
            Ok(node) => {
                *used.entry(key).or_default() += 1;
                acknowledged.push(node);
            }
            Err(status) => assert!(
                status.message().contains("already used"),
                "only the race for a key may lose: {status:?}"
            ),
        }
    }
    assert!(used.values().all(|n| *n == 1), "no key used twice");
    assert_eq!(
        acknowledged.len(),
        NODES,
        "every key registered exactly one node"
    );
    let addresses: BTreeSet<_> = acknowledged
        .iter()
        .map(|n| n.addresses[0].clone())
        .collect();
    let names: BTreeSet<_> = acknowledged.iter().map(|n| n.given_name.clone()).collect();
    assert_eq!(
        (addresses.len(), names.len()),
        (NODES, NODES),
        "unique addresses and names"
    );
    // Every acknowledged registration is there, on both instances.
    for server in [&p.a, &p.b] {
        let mut admin = server.local_admin().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listed: BTreeSet<u64> = admin
                .list_nodes(AdminListNodesRequest::default())
                .await
                .expect("list")
                .into_inner()
                .nodes
                .iter()
                .map(|n| n.id)
                .collect();
            if acknowledged.iter().all(|n| listed.contains(&n.id)) && listed.len() == NODES {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {NODES} listed",
                listed.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    p.b.stop().await;
    p.a.stop().await;
}
