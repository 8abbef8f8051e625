//! The store's contract, one suite run against both backends: SQLite (a file) and PostgreSQL
//! (a throwaway server started here, one fresh database per test). Uniqueness and single-use
//! keys are decided by the database, the change log is gapless and ordered, presence flips
//! only on the first and last stream across instances (on SQLite: a server and its restarted
//! successor), and a dead instance's nodes go offline.

use std::sync::Arc;

use warren_control::store::{
    ChangeKind, NodeRecord, PgOptions, PgStore, PreAuthKeyRecord, SqliteStore, Store, StoreError,
};
use warren_netns_tests::postgres::{self, PgServer};
use warren_proto::{DiscoSecretKey, NodeSecretKey};

/// A server per test, stopped and removed when the test ends (a static would never be dropped,
/// and would outlive the test process).
fn server() -> PgServer {
    PgServer::start(false).expect("start PostgreSQL")
}

fn pg_options(server: &PgServer, name: &str) -> PgOptions {
    PgOptions {
        host: server.host().to_string_lossy().into_owned(),
        port: postgres::PORT,
        name: name.into(),
        user: postgres::USER.into(),
        pass: String::new(),
        max_open_conns: 4,
        connect_timeout: std::time::Duration::from_secs(10),
    }
}

/// A fresh PostgreSQL database named after the test, on `server`.
fn pg(server: &PgServer, test: &str) -> Arc<dyn Store> {
    server.create_database(test).expect("createdb");
    Arc::new(PgStore::connect(pg_options(server, test)).expect("connect"))
}

/// A fresh SQLite file (kept alive by the returned directory).
fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("db.sqlite"), true).expect("sqlite");
    (Arc::new(store), dir)
}

/// Runs `check` against SQLite, then against PostgreSQL.
fn both(test: &str, check: impl Fn(&dyn Store)) {
    let (store, _dir) = sqlite();
    check(&*store);
    let server = server();
    check(&*pg(&server, test));
}

fn key(store: &dyn Store, user: u64, prefix: &str, reusable: bool) -> u64 {
    store
        .insert_preauth_key(&PreAuthKeyRecord {
            id: 0,
            user_id: user,
            prefix: prefix.into(),
            hash: [7; 32],
            reusable,
            ephemeral: false,
            used: false,
            expiration_ms: None,
            created_ms: 1,
            tags: vec![],
        })
        .expect("key")
}

fn node(user: u64, n: u16, key: Option<u64>) -> NodeRecord {
    NodeRecord {
        id: 0,
        node_key: NodeSecretKey::generate().public_key(),
        disco_key: DiscoSecretKey::generate().public_key(),
        hostname: format!("host{n}"),
        given_name: format!("host{n}"),
        user_id: user,
        tags: vec!["tag:a".into()],
        ipv4: std::net::Ipv4Addr::new(100, 64, (n >> 8) as u8, n as u8),
        ipv6: format!("fd7a:115c:a1e0::{n:x}").parse().expect("v6"),
        endpoints: vec!["10.0.0.1:41641".parse().expect("ep")],
        last_seen_ms: None,
        expiry_ms: None,
        created_ms: 5,
        ephemeral: false,
        auth_key_id: key,
        home_region: 3,
        advertised_routes: vec!["10.20.0.0/24".parse().expect("prefix")],
        approved_routes: Vec::new(),
        version: 0,
    }
}

#[test]
fn records_round_trip_and_conflicts_are_typed() {
    both("round_trip", |s| {
        let alice = s.create_user("alice", 1).expect("user");
        assert_eq!(
            s.create_user("alice", 2).expect_err("twice").to_string(),
            "user already exists"
        );
        let k = key(s, alice.id, "p1", true);
        let mut a = node(alice.id, 1, Some(k));
        (a.id, a.version) = s.register_node(&a).expect("register");
        assert_eq!(s.nodes().expect("nodes"), vec![a.clone()]);
        assert!(s.preauth_key("p1").expect("read").expect("there").used);

        // Each unique column is named; nothing of a refused registration stays.
        let mut same_key = node(alice.id, 2, None);
        same_key.node_key = a.node_key;
        let mut same_name = node(alice.id, 3, None);
        same_name.given_name = a.given_name.clone();
        let mut same_addr = node(alice.id, 4, None);
        same_addr.ipv4 = a.ipv4;
        for (n, what) in [
            (same_key, "node key"),
            (same_name, "node name"),
            (same_addr, "node address"),
        ] {
            match s.register_node(&n) {
                Err(StoreError::Conflict { what: got }) => assert_eq!(got, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(s.nodes().expect("nodes").len(), 1);
        assert_eq!(
            s.changes_after(0, 100).expect("log").len(),
            1,
            "refused writes log nothing"
        );

        // A user with nodes stays.
        match s.delete_user(alice.id) {
            Err(StoreError::InUse { what: "user" }) => {}
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_single_use_key_registers_once() {
    both("single_use", |s| {
        let u = s.create_user("bob", 1).expect("user");
        let once = key(s, u.id, "once", false);
        s.register_node(&node(u.id, 1, Some(once))).expect("first");
        match s.register_node(&node(u.id, 2, Some(once))) {
            Err(StoreError::KeyUsed) => {}
            other => panic!("{other:?}"),
        }
        let many = key(s, u.id, "many", true);
        s.register_node(&node(u.id, 3, Some(many)))
            .expect("reusable");
        s.register_node(&node(u.id, 4, Some(many)))
            .expect("reusable again");
        assert_eq!(s.nodes().expect("nodes").len(), 3);
    });
}

#[test]
fn the_change_log_is_gapless_and_carries_current_records() {
    both("change_log", |s| {
        let head = s.map_state().expect("state").version;
        let u = s.create_user("carol", 1).expect("user");
        let mut a = node(u.id, 1, None);
        let (id, v1) = s.register_node(&a).expect("a");
        a.id = id;
        a.endpoints = vec!["10.0.0.2:1".parse().expect("ep")];
        let v2 = s
            .update_node(&a, ChangeKind::Endpoints, false)
            .expect("endpoints");
        let (b, v3) = s.register_node(&node(u.id, 2, None)).expect("b");
        let v4 = s.delete_node(b).expect("delete");
        let v5 = s.set_policy(Some("{}"), 42, 9).expect("policy");
        assert_eq!(
            s.set_policy_fingerprint(42).expect("same"),
            None,
            "the same policy is no change"
        );
        let v6 = s
            .set_policy_fingerprint(43)
            .expect("other")
            .expect("logged");
        assert_eq!(
            [v1, v2, v3, v4, v5, v6],
            [1, 2, 3, 4, 5, 6].map(|i| head + i)
        );
        let log = s.changes_after(head, 100).expect("log");
        let kinds: Vec<_> = log.iter().map(|c| (c.version, c.node_id, c.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (v1, id, ChangeKind::Record),
                (v2, id, ChangeKind::Endpoints),
                (v3, b, ChangeKind::Record),
                (v4, b, ChangeKind::Removed),
                (v5, 0, ChangeKind::Policy),
                (v6, 0, ChangeKind::Policy),
            ]
        );
        // Records as they are now: a's newest, none for b (deleted).
        a.version = v2;
        assert_eq!(log[0].record.as_ref(), Some(&a));
        assert_eq!(log[2].record, None);
        assert_eq!(s.changes_after(v4, 1).expect("tail")[0].version, v5);
        let state = s.map_state().expect("state");
        assert_eq!(state.version, v6);
        assert_eq!(state.removed.last(), Some(&(v4, b)));
        assert_eq!((state.policy_fingerprint, state.policy_version), (43, v6));
        assert_eq!(s.policy().expect("policy").expect("stored").text, "{}");
    });
}

#[test]
fn presence_flips_on_the_first_and_last_stream_and_dies_with_its_instance() {
    both("presence", |s| {
        let u = s.create_user("dave", 1).expect("user");
        let (n, _) = s.register_node(&node(u.id, 1, None)).expect("node");
        let one = s.join_instance(100).expect("one");
        let two = s.join_instance(100).expect("two");
        let on = s.set_presence(n, one, true, 110).expect("on");
        assert!(on.is_some(), "first stream: online");
        assert_eq!(s.set_presence(n, two, true, 120).expect("second"), None);
        assert_eq!(s.set_presence(n, one, false, 130).expect("one left"), None);
        assert_eq!(s.online_nodes().expect("online"), vec![n]);
        let off = s
            .set_presence(n, two, false, 140)
            .expect("last")
            .expect("offline");
        let last = s.changes_after(off - 1, 10).expect("log");
        assert_eq!(last[0].kind, ChangeKind::Offline);
        assert_eq!(
            last[0].record.as_ref().and_then(|r| r.last_seen_ms),
            Some(140)
        );

        // Instance one serves the node again, then falls silent: two declares it dead.
        s.set_presence(n, one, true, 150).expect("again");
        assert!(s.heartbeat(two, 10_000).expect("two lives"));
        assert_eq!(s.reap_instances(5_000, 10_000).expect("reap"), 1);
        assert_eq!(s.online_nodes().expect("online"), Vec::<u64>::new());
        let log = s.changes_after(off, 10).expect("log");
        assert_eq!(
            log.iter().map(|c| c.kind).collect::<Vec<_>>(),
            vec![ChangeKind::Online, ChangeKind::Offline]
        );
        assert!(
            !s.heartbeat(one, 11_000).expect("one returns"),
            "a reaped instance learns it was declared dead"
        );
        assert!(s.heartbeat(one, 12_000).expect("and is back"));
    });
}

#[test]
fn a_proof_nonce_is_claimed_once() {
    both("nonces", |s| {
        assert!(s.claim_nonce(&[1; 24], 1_000, 0).expect("fresh"));
        assert!(!s.claim_nonce(&[1; 24], 1_001, 0).expect("replayed"));
        assert!(s.claim_nonce(&[2; 24], 1_002, 0).expect("another"));
    });
}

#[test]
fn postgres_refuses_a_newer_schema_and_keeps_its_map_id() {
    let server = server();
    let s = pg(&server, "newer_schema");
    let map_id = s.map_state().expect("state").map_id;
    drop(s);
    let again = PgStore::connect(pg_options(&server, "newer_schema")).expect("reconnect");
    assert_eq!(again.map_state().expect("state").map_id, map_id);
    drop(again);
    let next = warren_control::store::MIGRATIONS.len() + 1;
    server
        .psql(
            "newer_schema",
            &format!("UPDATE warren_schema SET version = {next}"),
        )
        .expect("from the future");
    let err = PgStore::connect(pg_options(&server, "newer_schema")).expect_err("too new");
    assert_eq!(
        err.to_string(),
        format!(
            "database schema version {next} is newer than this binary's {}",
            next - 1
        )
    );
}

#[test]
fn concurrent_writers_on_postgres_get_distinct_gapless_versions() {
    let server = server();
    let s = pg(&server, "concurrent_versions");
    let u = s.create_user("erin", 1).expect("user");
    let head = s.map_state().expect("state").version;
    let handles: Vec<_> = (0..4u16)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                (0..25u16)
                    .map(|i| {
                        s.register_node(&node(u.id, t * 100 + i + 1, None))
                            .expect("register")
                            .1
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut versions: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (head + 1..=head + 100).collect::<Vec<_>>());
    let log = s.changes_after(head, 1000).expect("log");
    assert_eq!(log.len(), 100);
}
