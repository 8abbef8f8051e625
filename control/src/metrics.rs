//! Prometheus metrics for warren-control (`metrics_listen_addr`): what the operator of a
//! coordination server watches in Grafana. Nodes by state, map streams and what they carry,
//! registrations and why they were refused, and how long the database takes.
//!
//! Event counters are recorded as things happen into one recorder per server ([`Metrics`]),
//! not the process-wide one, so several servers in one process (tests) keep their own
//! numbers. Node states are counted from the core at each scrape. The names are listed in the
//! README's metrics table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};
use warren_proto::control::map_response::Kind;

use crate::error::ControlError;
use crate::store::{
    ApiKeyRecord, Change, ChangeKind, MapState, NodeRecord, PreAuthKeyRecord, Store, StoreError,
    StoredPolicy, UserRecord,
};

/// Nodes by state (label `state`: online, offline, expired).
pub const NODES: &str = "warren_control_nodes";
/// Map streams open now.
pub const MAP_STREAMS_OPEN: &str = "warren_control_map_streams_open";
/// Map responses sent, by kind (label `kind`).
pub const MAP_MESSAGES_SENT: &str = "warren_control_map_messages_sent_total";
/// Encoded bytes of the map responses sent, by kind (label `kind`).
pub const MAP_BYTES_SENT: &str = "warren_control_map_bytes_sent_total";
/// Nodes registered (new or re-registered).
pub const REGISTRATIONS: &str = "warren_control_registrations_total";
/// Registrations refused, by reason (label `reason`, see [`refusal_reason`]).
pub const REGISTRATION_REFUSALS: &str = "warren_control_registration_refusals_total";
/// Database call latency in seconds, by store operation (label `op`).
pub const STORE_SECONDS: &str = "warren_control_store_seconds";

/// Every `kind` label of the map counters, in the order of the proto's `oneof`.
pub const MAP_KINDS: [&str; 12] = [
    "full",
    "peer_added",
    "peer_changed",
    "peer_removed",
    "peer_endpoints",
    "peer_online",
    "keepalive",
    "self_changed",
    "filter_changed",
    "settings_changed",
    "full_page",
    "batch",
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so memory
/// stays bounded.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);

/// One server's metrics. Cheap to share (`Arc`); recording is a few atomic operations.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// How many nodes are in each state, counted at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStates {
    /// With a map stream open.
    pub online: u64,
    /// Registered and not expired, without a map stream.
    pub offline: u64,
    /// Whose key expired (they must register again).
    pub expired: u64,
}

impl Metrics {
    /// Metrics with every series that has a fixed label set present at zero, so dashboards
    /// show 0 rather than "no data" before the first event.
    pub fn new() -> Arc<Self> {
        let recorder = warren_derp::metrics::recorder();
        let handle = recorder.handle();
        let m = Self { recorder, handle };
        m.record(|| {
            describe_gauge!(NODES, "Nodes by state: online, offline, expired.");
            describe_gauge!(MAP_STREAMS_OPEN, "Map streams open now.");
            describe_counter!(MAP_MESSAGES_SENT, "Map responses sent, by kind.");
            describe_counter!(
                MAP_BYTES_SENT,
                "Encoded bytes of map responses sent, by kind."
            );
            describe_counter!(REGISTRATIONS, "Nodes registered.");
            describe_counter!(REGISTRATION_REFUSALS, "Registrations refused, by reason.");
            describe_histogram!(
                STORE_SECONDS,
                metrics::Unit::Seconds,
                "Database call latency, by store operation."
            );
            gauge!(MAP_STREAMS_OPEN).set(0.0);
            counter!(REGISTRATIONS).absolute(0);
            for kind in MAP_KINDS {
                counter!(MAP_MESSAGES_SENT, "kind" => kind).absolute(0);
                counter!(MAP_BYTES_SENT, "kind" => kind).absolute(0);
            }
        });
        Arc::new(m)
    }

    fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// A node registered.
    pub fn registered(&self) {
        self.record(|| counter!(REGISTRATIONS).increment(1));
    }

    /// A registration was refused with `error`.
    pub fn refused(&self, error: &ControlError) {
        let reason = refusal_reason(error);
        self.record(|| counter!(REGISTRATION_REFUSALS, "reason" => reason).increment(1));
    }

    /// A map stream opened (`+1`) or closed (`-1`).
    pub fn stream_open(&self, open: bool) {
        self.record(|| {
            let g = gauge!(MAP_STREAMS_OPEN);
            if open {
                g.increment(1.0)
            } else {
                g.decrement(1.0)
            }
        });
    }

    /// A map response of `kind` and `bytes` encoded bytes went to a stream.
    pub fn sent(&self, kind: &Kind, bytes: usize) {
        self.sent_label(kind_label(kind), bytes);
    }

    /// [`Self::sent`] with the kind's label (see [`kind_label`]).
    pub fn sent_label(&self, kind: &'static str, bytes: usize) {
        self.record(|| {
            counter!(MAP_MESSAGES_SENT, "kind" => kind).increment(1);
            counter!(MAP_BYTES_SENT, "kind" => kind).increment(bytes as u64);
        });
    }

    /// One store call `op` took `took`.
    pub fn store_call(&self, op: &'static str, took: Duration) {
        self.record(|| histogram!(STORE_SECONDS, "op" => op).record(took.as_secs_f64()));
    }

    /// The exposition text, with the node states counted just now.
    pub fn render(&self, states: NodeStates) -> String {
        self.record(|| {
            for (state, n) in [
                ("online", states.online),
                ("offline", states.offline),
                ("expired", states.expired),
            ] {
                gauge!(NODES, "state" => state).set(n as f64);
            }
        });
        self.handle.render()
    }

    /// Folds histogram samples into buckets every few seconds, forever (spawn it).
    pub async fn upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.handle.run_upkeep();
        }
    }
}

/// The `kind` label of a map response.
pub fn kind_label(kind: &Kind) -> &'static str {
    match kind {
        Kind::Full(_) => "full",
        Kind::PeerAdded(_) => "peer_added",
        Kind::PeerChanged(_) => "peer_changed",
        Kind::PeerRemoved(_) => "peer_removed",
        Kind::PeerEndpoints(_) => "peer_endpoints",
        Kind::PeerOnline(_) => "peer_online",
        Kind::Keepalive(_) => "keepalive",
        Kind::SelfChanged(_) => "self_changed",
        Kind::FilterChanged(_) => "filter_changed",
        Kind::SettingsChanged(_) => "settings_changed",
        Kind::FullPage(_) => "full_page",
        Kind::Batch(_) => "batch",
    }
}

/// The `reason` label of a refused registration: the error's variant in snake case. Exhaustive
/// on purpose, so a new error variant gets a name of its own here.
pub fn refusal_reason(e: &ControlError) -> &'static str {
    use ControlError as E;
    match e {
        E::Proof(_) => "proof",
        E::UnknownNode { .. } => "unknown_node",
        E::NodeExpired { .. } => "node_expired",
        E::Malformed(_) => "malformed",
        E::AuthKeyNotFound => "auth_key_not_found",
        E::AuthKeyExpired => "auth_key_expired",
        E::AuthKeyUsed => "auth_key_used",
        E::ApiKeyMissing => "api_key_missing",
        E::ApiKeyInvalid => "api_key_invalid",
        E::ApiKeyExpired => "api_key_expired",
        E::InvalidField { .. } => "invalid_field",
        E::InvalidRoute { .. } => "invalid_route",
        E::TooManyRoutes { .. } => "too_many_routes",
        E::UserNotFound { .. } => "user_not_found",
        E::UserExists { .. } => "user_exists",
        E::UserHasNodes { .. } => "user_has_nodes",
        E::NodeNotFound { .. } => "node_not_found",
        E::KeyPrefixNotFound { .. } => "key_prefix_not_found",
        E::NameTaken { .. } => "name_taken",
        E::Exhausted(_) => "addresses_exhausted",
        E::Policy(_) => "policy",
        E::PolicyModeIsFile { .. } => "policy_mode_is_file",
        E::PolicyTooLarge { .. } => "policy_too_large",
        E::NoSuchTarget { .. } => "no_such_target",
        E::Store(_) => "store",
    }
}

/// A [`Store`] that times every call into [`STORE_SECONDS`]: the database's latency as the
/// core sees it (SQLite's work and its lock, nothing of the core's own).
pub struct TimedStore {
    inner: Box<dyn Store>,
    metrics: Arc<Metrics>,
}

impl TimedStore {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn timed<T>(&self, op: &'static str, call: impl FnOnce(&dyn Store) -> T) -> T {
        let start = Instant::now();
        let out = call(&*self.inner);
        self.metrics.store_call(op, start.elapsed());
        out
    }
}

impl Store for TimedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    fn create_user(&self, name: &str, now_ms: i64) -> Result<UserRecord, StoreError> {
        self.timed("create_user", |s| s.create_user(name, now_ms))
    }
    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.timed("users", |s| s.users())
    }
    fn delete_user(&self, id: u64) -> Result<(), StoreError> {
        self.timed("delete_user", |s| s.delete_user(id))
    }
    fn insert_preauth_key(&self, key: &PreAuthKeyRecord) -> Result<u64, StoreError> {
        self.timed("insert_preauth_key", |s| s.insert_preauth_key(key))
    }
    fn preauth_key(&self, prefix: &str) -> Result<Option<PreAuthKeyRecord>, StoreError> {
        self.timed("preauth_key", |s| s.preauth_key(prefix))
    }
    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError> {
        self.timed("preauth_keys", |s| s.preauth_keys())
    }
    fn expire_preauth_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError> {
        self.timed("expire_preauth_key", |s| s.expire_preauth_key(id, at_ms))
    }
    fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<u64, StoreError> {
        self.timed("insert_api_key", |s| s.insert_api_key(key))
    }
    fn api_key(&self, prefix: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.timed("api_key", |s| s.api_key(prefix))
    }
    fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.timed("api_keys", |s| s.api_keys())
    }
    fn expire_api_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError> {
        self.timed("expire_api_key", |s| s.expire_api_key(id, at_ms))
    }
    fn touch_api_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError> {
        self.timed("touch_api_key", |s| s.touch_api_key(id, at_ms))
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.timed("nodes", |s| s.nodes())
    }
    fn register_node(&self, node: &NodeRecord) -> Result<(u64, u64), StoreError> {
        self.timed("register_node", |s| s.register_node(node))
    }
    fn update_node(
        &self,
        node: &NodeRecord,
        kind: ChangeKind,
        claim: bool,
    ) -> Result<u64, StoreError> {
        self.timed("update_node", |s| s.update_node(node, kind, claim))
    }
    fn delete_node(&self, id: u64) -> Result<u64, StoreError> {
        self.timed("delete_node", |s| s.delete_node(id))
    }
    fn changes_after(&self, version: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.timed("changes_after", |s| s.changes_after(version, limit))
    }
    fn map_state(&self) -> Result<MapState, StoreError> {
        self.timed("map_state", |s| s.map_state())
    }
    fn set_policy_fingerprint(&self, fingerprint: u64) -> Result<Option<u64>, StoreError> {
        self.timed("set_policy_fingerprint", |s| {
            s.set_policy_fingerprint(fingerprint)
        })
    }
    fn policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        self.timed("policy", |s| s.policy())
    }
    fn set_policy(
        &self,
        text: Option<&str>,
        fingerprint: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.timed("set_policy", |s| s.set_policy(text, fingerprint, now_ms))
    }
    fn join_instance(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.timed("join_instance", |s| s.join_instance(now_ms))
    }
    fn heartbeat(&self, instance: u64, now_ms: i64) -> Result<bool, StoreError> {
        self.timed("heartbeat", |s| s.heartbeat(instance, now_ms))
    }
    fn reap_instances(&self, dead_before_ms: i64, now_ms: i64) -> Result<usize, StoreError> {
        self.timed("reap_instances", |s| {
            s.reap_instances(dead_before_ms, now_ms)
        })
    }
    fn set_presence(
        &self,
        node: u64,
        instance: u64,
        online: bool,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        self.timed("set_presence", |s| {
            s.set_presence(node, instance, online, now_ms)
        })
    }
    fn online_nodes(&self) -> Result<Vec<u64>, StoreError> {
        self.timed("online_nodes", |s| s.online_nodes())
    }
    fn claim_nonce(
        &self,
        nonce: &[u8; 24],
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<bool, StoreError> {
        self.timed("claim_nonce", |s| {
            s.claim_nonce(nonce, now_ms, forget_before_ms)
        })
    }
}
