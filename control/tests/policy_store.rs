//! Database mode's `policy set` at the core: the stored and the enforced policy never disagree.
//! A policy whose tests fail is neither stored nor applied; a failed write applies nothing; a
//! good policy is both.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use warren_control::core::{Core, NewAuthKey, Settings};
use warren_control::error::ControlError;
use warren_control::policy::{CompiledPolicy, PolicyError};
use warren_control::store::{
    ApiKeyRecord, Change, ChangeKind, MapState, NodeRecord, PreAuthKeyRecord, SqliteStore, Store,
    StoreError, StoredPolicy, UserRecord,
};
use warren_proto::control::DnsConfig;
use warren_proto::{DiscoSecretKey, NodeSecretKey};

const T0: i64 = 1_700_000_000_000;

/// SQLite, with policy writes that fail while `fail` is set.
struct FlakyPolicyStore {
    inner: SqliteStore,
    fail: Arc<AtomicBool>,
}

impl Store for FlakyPolicyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    fn create_user(&self, name: &str, now_ms: i64) -> Result<UserRecord, StoreError> {
        self.inner.create_user(name, now_ms)
    }
    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.inner.users()
    }
    fn delete_user(&self, id: u64) -> Result<(), StoreError> {
        self.inner.delete_user(id)
    }
    fn insert_preauth_key(&self, key: &PreAuthKeyRecord) -> Result<u64, StoreError> {
        self.inner.insert_preauth_key(key)
    }
    fn preauth_key(&self, prefix: &str) -> Result<Option<PreAuthKeyRecord>, StoreError> {
        self.inner.preauth_key(prefix)
    }
    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError> {
        self.inner.preauth_keys()
    }
    fn expire_preauth_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError> {
        self.inner.expire_preauth_key(id, at_ms)
    }
    fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<u64, StoreError> {
        self.inner.insert_api_key(key)
    }
    fn api_key(&self, prefix: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.inner.api_key(prefix)
    }
    fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.inner.api_keys()
    }
    fn expire_api_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError> {
        self.inner.expire_api_key(id, at_ms)
    }
    fn touch_api_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError> {
        self.inner.touch_api_key(id, at_ms)
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.nodes()
    }
    fn register_node(&self, node: &NodeRecord) -> Result<(u64, u64), StoreError> {
        self.inner.register_node(node)
    }
    fn update_node(
        &self,
        node: &NodeRecord,
        kind: ChangeKind,
        claim: bool,
    ) -> Result<u64, StoreError> {
        self.inner.update_node(node, kind, claim)
    }
    fn delete_node(&self, id: u64) -> Result<u64, StoreError> {
        self.inner.delete_node(id)
    }
    fn changes_after(&self, version: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.inner.changes_after(version, limit)
    }
    fn map_state(&self) -> Result<MapState, StoreError> {
        self.inner.map_state()
    }
    fn set_policy_fingerprint(&self, fingerprint: u64) -> Result<Option<u64>, StoreError> {
        self.inner.set_policy_fingerprint(fingerprint)
    }
    fn policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        self.inner.policy()
    }
    fn set_policy(
        &self,
        text: Option<&str>,
        fingerprint: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Conflict { what: "policy" });
        }
        self.inner.set_policy(text, fingerprint, now_ms)
    }
    fn join_instance(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.inner.join_instance(now_ms)
    }
    fn heartbeat(&self, instance: u64, now_ms: i64) -> Result<bool, StoreError> {
        self.inner.heartbeat(instance, now_ms)
    }
    fn reap_instances(&self, dead_before_ms: i64, now_ms: i64) -> Result<usize, StoreError> {
        self.inner.reap_instances(dead_before_ms, now_ms)
    }
    fn set_presence(
        &self,
        node: u64,
        instance: u64,
        online: bool,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.set_presence(node, instance, online, now_ms)
    }
    fn online_nodes(&self) -> Result<Vec<u64>, StoreError> {
        self.inner.online_nodes()
    }
    fn claim_nonce(
        &self,
        nonce: &[u8; 24],
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<bool, StoreError> {
        self.inner.claim_nonce(nonce, now_ms, forget_before_ms)
    }
}

/// alice's laptop and bob's phone see each other (only) under this policy.
const ALICE_BOB: &str = r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:*"]}]}"#;
/// Nobody sees anybody.
const NOBODY: &str = r#"{"acls": [{"action": "accept", "src": ["carol@"], "dst": ["carol@:*"]}]}"#;
/// Its test wants alice to reach bob on 22, which its acls do not allow.
const FAILING: &str = r#"{
  "acls": [{"action": "accept", "src": ["carol@"], "dst": ["carol@:*"]}],
  "tests": [{"src": "alice@", "accept": ["100.64.0.2:22"]}],
}"#;

fn compiled(text: &str) -> Arc<CompiledPolicy> {
    Arc::new(CompiledPolicy::from_text(text).expect("compiles"))
}

/// A core with alice's laptop (100.64.0.1) and bob's phone (100.64.0.2) under `ALICE_BOB`.
fn core(fail: Arc<AtomicBool>) -> (Core, u64) {
    let store = FlakyPolicyStore {
        inner: SqliteStore::in_memory().expect("store"),
        fail,
    };
    let settings = Settings {
        v4: "100.64.0.0/10".parse().expect("v4"),
        v6: "fd7a:115c:a1e0::/48".parse().expect("v6"),
        dns: DnsConfig::default(),
        derp_map: Default::default(),
        policy: None,
    };
    let mut core = Core::open(Arc::new(store), &settings, T0).expect("core");
    let mut laptop = 0;
    for (user, host) in [("alice", "laptop"), ("bob", "phone")] {
        core.create_user(user, T0).expect("user");
        let new = NewAuthKey {
            user: user.into(),
            ..NewAuthKey::default()
        };
        let (_, secret) = core
            .create_auth_key(&new, [host.len() as u8; 30], T0)
            .expect("key");
        let node = core
            .register(
                NodeSecretKey::generate().public_key(),
                DiscoSecretKey::generate().public_key(),
                host,
                &secret,
                T0,
            )
            .expect("register");
        if host == "laptop" {
            laptop = node.id;
        }
    }
    core.store_policy(ALICE_BOB, compiled(ALICE_BOB), T0)
        .expect("first policy");
    (core, laptop)
}

fn peers(core: &Core, id: u64) -> Vec<String> {
    core.peers(id).into_iter().map(|n| n.given_name).collect()
}

#[test]
fn a_policy_whose_tests_fail_is_neither_stored_nor_applied() {
    let (mut core, laptop) = core(Arc::default());
    let err = core
        .store_policy(FAILING, compiled(FAILING), T0 + 1)
        .expect_err("tests fail");
    assert!(
        matches!(&err, ControlError::Policy(PolicyError::TestsFailed { failures }) if failures.len() == 1),
        "{err:?}"
    );
    let stored = core.stored_policy().expect("read").expect("stored");
    assert_eq!((stored.text.as_str(), stored.updated_ms), (ALICE_BOB, T0));
    assert_eq!(
        peers(&core, laptop),
        ["phone"],
        "the old policy is enforced"
    );
}

#[test]
fn a_failed_write_applies_nothing() {
    let fail = Arc::new(AtomicBool::new(false));
    let (mut core, laptop) = core(Arc::clone(&fail));
    fail.store(true, Ordering::SeqCst);
    let err = core
        .store_policy(NOBODY, compiled(NOBODY), T0 + 1)
        .expect_err("write fails");
    assert!(
        matches!(
            err,
            ControlError::Store(StoreError::Conflict { what: "policy" })
        ),
        "{err:?}"
    );
    assert_eq!(
        peers(&core, laptop),
        ["phone"],
        "not applied: it was not stored"
    );
    assert_eq!(
        core.stored_policy().expect("read").map(|p| p.text),
        Some(ALICE_BOB.into())
    );

    fail.store(false, Ordering::SeqCst);
    let sent = core
        .store_policy(NOBODY, compiled(NOBODY), T0 + 2)
        .expect("stored and applied");
    assert_eq!(sent, 0, "nobody is subscribed");
    assert_eq!(peers(&core, laptop), Vec::<String>::new());
    assert_eq!(
        core.stored_policy().expect("read").map(|p| p.text),
        Some(NOBODY.into())
    );
}
