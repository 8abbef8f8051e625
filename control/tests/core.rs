//! The control core's rules, driven directly with a real SQLite file: registration with every
//! kind of bad pre-auth key stores nothing, addresses are stable across re-registration and
//! restarts, and admin changes reach connected peers as deltas.

use std::path::Path;
use std::time::Duration;

use warren_control::core::{Core, NewAuthKey, Settings};
use warren_control::error::ControlError;
use warren_control::store::SqliteStore;
use warren_proto::control::DnsConfig;
use warren_proto::control::map_response::Kind;
use warren_proto::{DiscoPublicKey, DiscoSecretKey, NodePublicKey, NodeSecretKey};

const T0: i64 = 1_700_000_000_000;

fn settings() -> Settings {
    Settings {
        v4: "100.64.0.0/10".parse().expect("v4"),
        v6: "fd7a:115c:a1e0::/48".parse().expect("v6"),
        dns: DnsConfig {
            magic_dns: true,
            base_domain: "test.internal".into(),
            ..DnsConfig::default()
        },
        derp_map: Default::default(),
        policy: None,
    }
}

fn open(path: &Path, now: i64) -> Core {
    open_with(path, &settings(), now)
}

fn open_with(path: &Path, settings: &Settings, now: i64) -> Core {
    Core::open(
        std::sync::Arc::new(SqliteStore::open(path, true).expect("store")),
        settings,
        now,
    )
    .expect("core")
}

fn keys() -> (NodePublicKey, DiscoPublicKey) {
    (
        NodeSecretKey::generate().public_key(),
        DiscoSecretKey::generate().public_key(),
    )
}

fn auth_key(core: &mut Core, reusable: bool, seed: u8) -> String {
    let new = NewAuthKey {
        user: "alice".into(),
        reusable,
        ..NewAuthKey::default()
    };
    core.create_auth_key(&new, [seed; 30], T0).expect("key").1
}

fn node_count(core: &Core) -> usize {
    core.admin_nodes(None).expect("nodes").len()
}

#[test]
fn bad_pre_auth_keys_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db.sqlite");
    let mut core = open(&db, T0);
    core.create_user("alice", T0).expect("user");
    let single = auth_key(&mut core, false, 1);
    let expiring = {
        let new = NewAuthKey {
            user: "alice".into(),
            expiration: Some(Duration::from_secs(1)),
            ..NewAuthKey::default()
        };
        core.create_auth_key(&new, [2; 30], T0).expect("key").1
    };
    let revoked = auth_key(&mut core, true, 3);
    let revoked_prefix = revoked.split('-').nth(2).expect("prefix").to_string();
    core.expire_auth_key(&revoked_prefix, T0).expect("expire");

    let (k, d) = keys();
    core.register(k, d, "first", &single, T0)
        .expect("first use");

    let mut wrong_secret = single.clone();
    let last = wrong_secret.pop().expect("char");
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    type Case = (&'static str, String, fn(&ControlError) -> bool);
    let cases: Vec<Case> = vec![
        ("garbage", "hello".into(), |e| {
            matches!(e, ControlError::Malformed(_))
        }),
        (
            "unknown",
            format!("warren-auth-{}-{}", "0".repeat(12), "0".repeat(48)),
            |e| matches!(e, ControlError::AuthKeyNotFound),
        ),
        ("wrong secret", wrong_secret, |e| {
            matches!(e, ControlError::AuthKeyNotFound)
        }),
        ("used", single.clone(), |e| {
            matches!(e, ControlError::AuthKeyUsed)
        }),
        ("expired", expiring, |e| {
            matches!(e, ControlError::AuthKeyExpired)
        }),
        ("revoked", revoked, |e| {
            matches!(e, ControlError::AuthKeyExpired)
        }),
    ];
    for (what, key, expected) in cases {
        let (k, d) = keys();
        let err = core
            .register(k, d, "intruder", &key, T0 + 2_000)
            .expect_err(what);
        assert!(expected(&err), "{what}: got {err:?}");
        let status = tonic::Status::from(err);
        assert_ne!(status.code(), tonic::Code::Internal, "{what}");
    }
    assert_eq!(node_count(&core), 1);
    drop(core);
    assert_eq!(
        node_count(&open(&db, T0)),
        1,
        "nothing was stored for the refused keys"
    );
}

#[test]
fn addresses_are_stable_across_reregistration_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db.sqlite");
    let mut core = open(&db, T0);
    core.create_user("alice", T0).expect("user");
    let key = auth_key(&mut core, true, 4);
    let (k1, d1) = keys();
    let (k2, d2) = keys();
    let a = core.register(k1, d1, "laptop", &key, T0).expect("a");
    let b = core.register(k2, d2, "laptop", &key, T0).expect("b");
    assert_eq!(a.addresses, vec!["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]);
    assert_eq!(b.addresses, vec!["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]);
    assert_eq!(
        (a.given_name.as_str(), b.given_name.as_str()),
        ("laptop", "laptop-2")
    );
    // A known key needs no pre-auth key at all.
    let again = core
        .register(k1, d1, "laptop", "", T0)
        .expect("re-register");
    assert_eq!(again.addresses, a.addresses);
    drop(core);

    let mut core = open(&db, T0 + 10);
    assert_eq!(
        core.register(k2, d2, "laptop", "", T0)
            .expect("after restart")
            .addresses,
        b.addresses
    );
    let (k3, d3) = keys();
    let c = core.register(k3, d3, "desk", &key, T0).expect("c");
    assert_eq!(
        c.addresses[0], "100.64.0.3/32",
        "no address is handed out twice"
    );
}

#[test]
fn admin_changes_reach_connected_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut core = open(&dir.path().join("db.sqlite"), T0);
    core.create_user("alice", T0).expect("user");
    let key = auth_key(&mut core, true, 5);
    let (k1, d1) = keys();
    let (k2, d2) = keys();
    let a = core.register(k1, d1, "a", &key, T0).expect("a");
    let b = core.register(k2, d2, "b", &key, T0).expect("b");
    let sub = core.subscribe(a.id, T0, None).expect("subscribe");
    assert_eq!(sub.full_map().expect("full map").peers.len(), 1);

    core.rename_node(b.id, "bee").expect("rename");
    assert!(
        matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerChanged(n) if n.given_name == "bee")
    );
    assert!(matches!(
        core.rename_node(b.id, "a"),
        Err(ControlError::NameTaken { .. })
    ));

    core.expire_node(b.id, T0 + 1).expect("expire");
    assert!(
        matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerRemoved(r) if r.id == b.id)
    );
    assert!(matches!(
        core.authenticate(&k2, T0 + 2),
        Err(ControlError::NodeExpired { .. })
    ));
    // An expired node comes back only with a valid pre-auth key.
    assert!(matches!(
        core.register(k2, d2, "b", "", T0 + 3),
        Err(ControlError::NodeExpired { .. })
    ));
    assert!(matches!(
        core.register(k2, d2, "b", "not a key", T0 + 3),
        Err(ControlError::Malformed(_))
    ));
    core.create_user("bob", T0).expect("bob");
    let bobs = NewAuthKey {
        user: "bob".into(),
        tags: vec!["tag:srv".into()],
        ..NewAuthKey::default()
    };
    let (bob_key, bob_text) = core.create_auth_key(&bobs, [8; 30], T0).expect("bob's key");
    let back = core
        .register(k2, d2, "b", &bob_text, T0 + 3)
        .expect("re-auth");
    assert_eq!(back.addresses, b.addresses);
    // The key that revives a node owns it: bob's key is tagged, so the node is now owned by
    // its tags (shown as Tailscale's "tagged-devices"), no longer by alice.
    assert_eq!(back.tags, vec!["tag:srv".to_string()]);
    assert_eq!(back.user, "tagged-devices");
    let bob_keys = core.auth_keys(Some("bob")).expect("keys");
    assert!(
        bob_keys.iter().any(|k| k.id == bob_key.id && k.used),
        "single-use key is used"
    );
    let (k9, d9) = keys();
    assert!(matches!(
        core.register(k9, d9, "c", &bob_text, T0 + 4),
        Err(ControlError::AuthKeyUsed)
    ));
    assert!(matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerAdded(n) if n.id == b.id));

    assert!(matches!(
        core.delete_user("alice"),
        Err(ControlError::UserHasNodes { count: 1, .. })
    ));
    core.delete_node(b.id).expect("delete");
    assert!(
        matches!(&*sub.outbox.try_recv().expect("delta"), Kind::PeerRemoved(r) if r.id == b.id)
    );
    assert!(matches!(
        core.authenticate(&k2, T0),
        Err(ControlError::UnknownNode { .. })
    ));
}

#[test]
fn ephemeral_nodes_are_reaped_only_while_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut core = open(&dir.path().join("db.sqlite"), T0);
    core.create_user("alice", T0).expect("user");
    let new = NewAuthKey {
        user: "alice".into(),
        reusable: true,
        ephemeral: true,
        ..NewAuthKey::default()
    };
    let key = core.create_auth_key(&new, [6; 30], T0).expect("key").1;
    let (k, d) = keys();
    let n = core
        .register(k, d, "ci-runner", &key, T0)
        .expect("register");
    let (k2, d2) = keys();
    let plain = auth_key(&mut core, true, 7);
    let keep = core.register(k2, d2, "server", &plain, T0).expect("plain");
    let sub = core.subscribe(n.id, T0, None).expect("subscribe");
    let timeout = 60_000;
    // Online nodes are never reaped, however old.
    assert!(
        core.reap_ephemeral(T0 + 10 * timeout, timeout)
            .expect("sweep")
            .is_empty()
    );
    assert_eq!(
        core.unsubscribe(n.id, sub.stream, T0 + 5),
        Some(true),
        "ephemeral"
    );
    assert!(
        core.reap_ephemeral(T0 + 5 + timeout, timeout)
            .expect("sweep")
            .is_empty(),
        "not yet"
    );
    // Back before the timeout, then gone again: the clock restarts from the last disconnect.
    let sub2 = core.subscribe(n.id, T0 + 6, None).expect("subscribe again");
    assert_eq!(core.unsubscribe(n.id, sub2.stream, T0 + 9), Some(true));
    assert!(
        core.reap_ephemeral(T0 + 9 + timeout, timeout)
            .expect("sweep")
            .is_empty()
    );
    assert_eq!(
        core.reap_ephemeral(T0 + 10 + timeout, timeout)
            .expect("sweep"),
        vec![n.id]
    );
    let left: Vec<u64> = core
        .admin_nodes(None)
        .expect("nodes")
        .iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(left, vec![keep.id], "only the ephemeral node went");
    // One that registered but never connected is reaped too (also after a restart).
    let (k3, d3) = keys();
    let never = core
        .register(k3, d3, "ghost", &key, T0 + 20)
        .expect("ghost");
    assert_eq!(
        core.reap_ephemeral(T0 + 21 + timeout, timeout)
            .expect("sweep"),
        vec![never.id]
    );
    core.delete_node(keep.id).expect("cleanup");
    assert_eq!(node_count(&core), 0);
}

#[test]
fn api_keys_check_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut core = open(&dir.path().join("db.sqlite"), T0);
    let (rec, text) = core
        .create_api_key(Some(Duration::from_secs(60)), [9; 30], T0)
        .expect("key");
    core.check_api_key(&text, T0 + 1).expect("valid");
    assert!(matches!(
        core.check_api_key("warren-api-nope", T0),
        Err(ControlError::ApiKeyInvalid)
    ));
    assert!(matches!(
        core.check_api_key(&text, T0 + 61_000),
        Err(ControlError::ApiKeyExpired)
    ));
    core.expire_api_key(&rec.prefix, T0 + 2).expect("expire");
    assert!(matches!(
        core.check_api_key(&text, T0 + 3),
        Err(ControlError::ApiKeyExpired)
    ));
    assert!(core.api_keys().expect("list")[0].last_used_ms.is_some());
}

#[test]
fn key_tags_must_be_owned_once_any_policy_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut core = open(&dir.path().join("db"), T0);
    core.create_user("alice", T0).expect("user");
    let tagged = NewAuthKey {
        user: "alice".into(),
        tags: vec!["tag:web".into()],
        ..NewAuthKey::default()
    };
    // No policy: nothing owns tags yet, any well-formed tag goes.
    core.create_auth_key(&tagged, [1; 30], T0)
        .expect("no policy");
    // A policy with no rules and no tagOwners compiles to allow-all, but it is configured: an
    // unowned tag is refused.
    let empty = warren_control::policy::CompiledPolicy::from_text("{}").expect("compiles");
    core.set_policy(Some(std::sync::Arc::new(empty)))
        .expect("applies");
    match core.create_auth_key(&tagged, [2; 30], T0) {
        Err(ControlError::Policy(warren_control::policy::PolicyError::TagWithoutOwner {
            ..
        })) => {}
        other => panic!("expected TagWithoutOwner, got {other:?}"),
    }
}

/// The changes a resumed subscription starts with (panics on a full map).
fn resumed(sub: &warren_control::netmap::Subscription) -> Vec<Kind> {
    match &sub.start {
        warren_control::netmap::Start::Resume(changes) => {
            changes.iter().map(|d| Kind::clone(d)).collect()
        }
        warren_control::netmap::Start::Full(_) => panic!("a full map, not a resume"),
    }
}

#[test]
fn map_versions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db.sqlite");
    let mut core = open(&db, T0);
    core.create_user("alice", T0).expect("user");
    let key = auth_key(&mut core, true, 1);
    let mut ids = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let (k, d) = keys();
        ids.push(core.register(k, d, name, &key, T0).expect("register").id);
    }
    let [a, b, c, d] = ids[..] else {
        unreachable!()
    };
    let sub = core.subscribe(a, T0, None).expect("subscribe");
    let (map_id, seen) = (core.netmap().map_id(), sub.version);
    core.unsubscribe(a, sub.stream, T0 + 1);
    // While a is away: b moves, d is deleted; then control restarts.
    let moved: std::net::SocketAddr = "192.0.2.5:41641".parse().expect("addr");
    core.update_node(b, Some(vec![moved]), None, None)
        .expect("update");
    core.delete_node(d).expect("delete");
    drop(core);

    let mut core = open(&db, T0 + 10);
    assert_eq!(
        core.netmap().map_id(),
        map_id,
        "the map id is the database's"
    );
    assert!(
        core.netmap().version() > seen,
        "versions go on from the lease"
    );
    // c comes back before a does.
    let c_sub = core.subscribe(c, T0 + 11, None).expect("subscribe c");
    let sub = core
        .subscribe(a, T0 + 12, Some((map_id, seen)))
        .expect("resume");
    let changes = resumed(&sub);
    // b's new record, d's removal; c unchanged, so only its online state (it is back), and b's
    // (offline: online states did not survive the restart).
    assert!(
        changes.iter().any(
            |k| matches!(k, Kind::PeerChanged(n) if n.id == b && n.endpoints == ["192.0.2.5:41641"])
        ),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == d))
    );
    assert!(
        !changes
            .iter()
            .any(|k| matches!(k, Kind::PeerChanged(n) if n.id == c))
    );
    assert!(
        changes
            .iter()
            .any(|k| matches!(k, Kind::PeerOnline(o) if o.id == c && o.online))
    );
    assert!(
        !changes
            .iter()
            .any(|k| matches!(k, Kind::PeerOnline(o) if o.id == c && !o.online))
    );
    assert!(matches!(changes.first(), Some(Kind::SettingsChanged(_))));
    assert!(
        changes
            .iter()
            .any(|k| matches!(k, Kind::SelfChanged(n) if n.id == a))
    );
    assert!(changes.iter().any(|k| matches!(k, Kind::FilterChanged(_))));
    drop(c_sub);

    // A version from the future, another map's id: full maps.
    let future = core.netmap().version() + 1;
    for resume in [(map_id, future), (map_id ^ 1, seen)] {
        let sub = core.subscribe(a, T0 + 13, Some(resume)).expect("subscribe");
        assert!(
            matches!(sub.start, warren_control::netmap::Start::Full(_)),
            "{resume:?}"
        );
    }
    let now = core.netmap().version();
    drop(core);

    // Under another policy nobody resumes across the change: a full map.
    let mut s = settings();
    s.policy = Some(std::sync::Arc::new(
        warren_control::grpc::compile_policy(
            r#"{"acls":[{"action":"accept","src":["*"],"dst":["*:22"]}]}"#,
        )
        .expect("policy"),
    ));
    let mut core = open_with(&db, &s, T0 + 20);
    let sub = core
        .subscribe(a, T0 + 21, Some((map_id, now)))
        .expect("subscribe");
    assert!(matches!(sub.start, warren_control::netmap::Start::Full(_)));
    // And the same policy again is no change: resuming works.
    let v = sub.version;
    core.unsubscribe(a, sub.stream, T0 + 22);
    drop(core);
    let mut core = open_with(&db, &s, T0 + 30);
    let sub = core
        .subscribe(a, T0 + 31, Some((map_id, v)))
        .expect("subscribe");
    assert!(matches!(
        sub.start,
        warren_control::netmap::Start::Resume(_)
    ));
}
