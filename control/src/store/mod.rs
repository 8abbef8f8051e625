//! Persistence behind a trait, so SQLite (the default) and Postgres (for several instances on
//! one database) can both serve. The store is the durable copy; the running server keeps the
//! live view in memory ([`crate::netmap`]) and writes through.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use warren_proto::{DiscoPublicKey, NodePublicKey};

mod postgres;
mod sql;
mod sqlite;

pub use postgres::{PgOptions, PgStore, listen_for_changes};
pub use sql::{Backend, DbError, Dialect, KEEP_CHANGES, MIGRATIONS, Row, SqlStore, Tx, Value};
pub use sqlite::SqliteStore;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error (the message names which database).
    #[error("{message}")]
    Backend {
        /// The database's message.
        message: String,
    },
    /// A uniqueness rule would be broken.
    #[error("{what} already exists")]
    Conflict {
        /// What collided: "user", "pre-auth key", "API key", "node key", "node name",
        /// "node address".
        what: &'static str,
    },
    /// A single-use pre-auth key was already used (claimed atomically).
    #[error("the pre-auth key was already used")]
    KeyUsed,
    /// A row is still referenced (a user with nodes).
    #[error("{what} is still in use")]
    InUse {
        /// What is referenced.
        what: &'static str,
    },
    /// A stored value could not be read back.
    #[error("corrupt {column} in the database: {value:?}")]
    Corrupt {
        /// The column.
        column: &'static str,
        /// The unreadable value.
        value: String,
    },
    /// The database was written by a newer warren.
    #[error("database schema version {found} is newer than this binary's {supported}")]
    TooNew {
        /// The version in the file.
        found: i64,
        /// The newest this binary knows.
        supported: i64,
    },
}

/// A user: the owner of nodes and pre-auth keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Database id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Creation time.
    pub created_ms: i64,
}

/// A pre-auth key as stored: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthKeyRecord {
    /// Database id.
    pub id: u64,
    /// Owner.
    pub user_id: u64,
    /// Public lookup prefix.
    pub prefix: String,
    /// SHA-256 of the secret part.
    pub hash: [u8; 32],
    /// Usable more than once.
    pub reusable: bool,
    /// Nodes it registers are deleted after they go away.
    pub ephemeral: bool,
    /// Whether a node has registered with it.
    pub used: bool,
    /// When it stops working; `None` for never.
    pub expiration_ms: Option<i64>,
    /// Creation time.
    pub created_ms: i64,
    /// Tags its nodes get.
    pub tags: Vec<String>,
}

/// An API key as stored: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Database id.
    pub id: u64,
    /// Public lookup prefix.
    pub prefix: String,
    /// SHA-256 of the secret part.
    pub hash: [u8; 32],
    /// When it stops working; `None` for never.
    pub expiration_ms: Option<i64>,
    /// Creation time.
    pub created_ms: i64,
    /// Last successful use.
    pub last_used_ms: Option<i64>,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Database id; 0 before insertion.
    pub id: u64,
    /// WireGuard key: the node's identity.
    pub node_key: NodePublicKey,
    /// Disco key.
    pub disco_key: DiscoPublicKey,
    /// The name the node reported.
    pub hostname: String,
    /// Unique DNS label.
    pub given_name: String,
    /// Owner.
    pub user_id: u64,
    /// Tags.
    pub tags: Vec<String>,
    /// Mesh IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Mesh IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Reported endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Last time the node was connected.
    pub last_seen_ms: Option<i64>,
    /// When the node key expires; `None` for never.
    pub expiry_ms: Option<i64>,
    /// Registration time.
    pub created_ms: i64,
    /// Deleted after it goes away.
    pub ephemeral: bool,
    /// The pre-auth key it registered with.
    pub auth_key_id: Option<u64>,
    /// Home DERP region; 0 for none.
    pub home_region: u32,
    /// The routes the node last advertised (subnet routes; `0.0.0.0/0` and `::/0` for an
    /// exit node), sorted.
    pub advertised_routes: Vec<ipnet::IpNet>,
    /// The routes approved for it (by an admin or autoApprovers), sorted. Only routes also
    /// advertised are served.
    pub approved_routes: Vec<ipnet::IpNet>,
    /// The map version of its last stored change (see [`crate::netmap`]): after a restart,
    /// resuming nodes older than it get its record.
    pub version: u64,
}

/// What the map's versions need at start: the map's identity, the head of the change log, and
/// what a resuming node is measured against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// Identifies the map; made at random with the database.
    pub map_id: u64,
    /// The newest version in the change log (every committed change has one).
    pub version: u64,
    /// Resuming from below it takes a full map: removals before it are forgotten.
    pub floor: u64,
    /// Fingerprint of the policy the versions were last counted under (0: none).
    pub policy_fingerprint: u64,
    /// The version at which that policy took effect.
    pub policy_version: u64,
    /// Nodes removed from the map, as (version, node id), oldest first.
    pub removed: Vec<(u64, u64)>,
}

/// What a change-log entry records about its node. Every committed change to what nodes see
/// has one, so every instance on the database applies the same changes in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The node was added or its record changed.
    Record,
    /// Only its endpoints changed (a smaller delta for its peers).
    Endpoints,
    /// It left the map: deleted (no record left) or expired (its record says when).
    Removed,
    /// It came online: its first stream on any instance.
    Online,
    /// It went offline: its last stream on every instance ended, or its instance died.
    Offline,
    /// The access policy changed (node id 0).
    Policy,
}

impl ChangeKind {
    /// The number stored for it.
    pub fn code(self) -> i64 {
        match self {
            Self::Record => 1,
            Self::Endpoints => 2,
            Self::Removed => 3,
            Self::Online => 4,
            Self::Offline => 5,
            Self::Policy => 6,
        }
    }

    /// The kind stored as `code`.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => Self::Record,
            2 => Self::Endpoints,
            3 => Self::Removed,
            4 => Self::Online,
            5 => Self::Offline,
            6 => Self::Policy,
            _ => return None,
        })
    }
}

/// One committed change, as the log has it, with the node's record as it is now (`None` when
/// it was deleted since, or for a policy change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its version: one more than the change before it.
    pub version: u64,
    /// The node it is about (0 for a policy change).
    pub node_id: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The node's current record.
    pub record: Option<NodeRecord>,
}

/// What a server needs from its database. Calls are short and synchronous and run on blocking
/// threads (never on the threads that serve map streams); every write that must be atomic is one
/// call, one transaction. Writes that change what nodes see allocate the next version of the
/// change log in the same transaction and return it; versions are gapless and commit in order.
pub trait Store: Send + Sync {
    /// Which database this is, for logs ("sqlite", "postgres").
    fn backend(&self) -> &'static str;
    /// Whether other processes may write to the same database (PostgreSQL): then this process
    /// follows the change log, and presence and replay protection are shared.
    fn shared(&self) -> bool;
    /// Adds a user.
    fn create_user(&self, name: &str, now_ms: i64) -> Result<UserRecord, StoreError>;
    /// Every user, by id.
    fn users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// Removes a user with no nodes ([`StoreError::InUse`] otherwise); its pre-auth keys go with it.
    fn delete_user(&self, id: u64) -> Result<(), StoreError>;
    /// Adds a pre-auth key (its `id` is ignored and assigned).
    fn insert_preauth_key(&self, key: &PreAuthKeyRecord) -> Result<u64, StoreError>;
    /// The pre-auth key with this prefix.
    fn preauth_key(&self, prefix: &str) -> Result<Option<PreAuthKeyRecord>, StoreError>;
    /// Every pre-auth key, by id.
    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError>;
    /// Sets a pre-auth key's expiration.
    fn expire_preauth_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Adds an API key (its `id` is ignored and assigned).
    fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<u64, StoreError>;
    /// The API key with this prefix.
    fn api_key(&self, prefix: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Every API key, by id.
    fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Sets an API key's expiration.
    fn expire_api_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Records a successful use of an API key.
    fn touch_api_key(&self, id: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Every node, by id.
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Inserts a node and, in the same transaction, claims the pre-auth key it used: a
    /// single-use key already used is [`StoreError::KeyUsed`]. Address, name and node key are
    /// unique ([`StoreError::Conflict`] names which). Returns the node's id and its version.
    fn register_node(&self, node: &NodeRecord) -> Result<(u64, u64), StoreError>;
    /// Rewrites a node's mutable fields and logs `kind` (`Record`, `Endpoints`, or `Removed` for
    /// an expiry). With `claim` the node's pre-auth key is claimed as in
    /// [`Store::register_node`]. Returns the version.
    fn update_node(
        &self,
        node: &NodeRecord,
        kind: ChangeKind,
        claim: bool,
    ) -> Result<u64, StoreError>;
    /// Removes a node; returns the version of its removal.
    fn delete_node(&self, id: u64) -> Result<u64, StoreError>;
    /// The change log after `version`, oldest first, at most `limit` entries. An answer that
    /// does not start at `version + 1` means the entries in between were trimmed.
    fn changes_after(&self, version: u64, limit: usize) -> Result<Vec<Change>, StoreError>;
    /// The map's state at start; makes the map id and the log's head on first use.
    fn map_state(&self) -> Result<MapState, StoreError>;
    /// Records the policy in force by its fingerprint: when it differs from the stored one the
    /// change is logged and its version returned.
    fn set_policy_fingerprint(&self, fingerprint: u64) -> Result<Option<u64>, StoreError>;
    /// The access policy stored for `policy.mode = "database"`, if one was set.
    fn policy(&self) -> Result<Option<StoredPolicy>, StoreError>;
    /// Stores the access policy text (replacing the previous one), or removes it (`None`), with
    /// the compiled policy's fingerprint; logs the change and returns its version.
    fn set_policy(
        &self,
        text: Option<&str>,
        fingerprint: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Announces a server process; returns its instance id. Earlier instances that died keep
    /// their presence until [`Store::reap_instances`] declares them dead, also on SQLite (a
    /// restarted server's nodes stay online if they come back within the expiry).
    fn join_instance(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Keeps `instance` alive; `false` when it had been declared dead (its presence is gone
    /// and must be claimed again).
    fn heartbeat(&self, instance: u64, now_ms: i64) -> Result<bool, StoreError>;
    /// Declares dead every instance whose heartbeat is older than `dead_before_ms`: its nodes
    /// that no other instance serves go offline (logged). Returns how many instances.
    fn reap_instances(&self, dead_before_ms: i64, now_ms: i64) -> Result<usize, StoreError>;
    /// Records that `instance` serves (or no longer serves) a stream of `node`. When that flips
    /// the node's presence across all instances, the change is logged (going offline also
    /// records when it was last seen) and its version returned.
    fn set_presence(
        &self,
        node: u64,
        instance: u64,
        online: bool,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError>;
    /// Nodes some instance serves a stream of.
    fn online_nodes(&self) -> Result<Vec<u64>, StoreError>;
    /// Claims a proof nonce, so the proof cannot be replayed to any instance: `false` when it was
    /// claimed before. Nonces older than `forget_before_ms` may be forgotten.
    fn claim_nonce(
        &self,
        nonce: &[u8; 24],
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<bool, StoreError>;
}

/// The access policy as stored in database mode: its text, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The HuJSON text.
    pub text: String,
    /// When it was stored.
    pub updated_ms: i64,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}
