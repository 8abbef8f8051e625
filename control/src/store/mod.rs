//! Persistence behind a trait, so SQLite (the default) and Postgres (for several instances on
//! one database) can both serve. The store is the durable copy; the running server keeps the
//! live view in memory ([`crate::netmap`]) and writes through.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use warren_proto::{DiscoPublicKey, NodePublicKey};

mod sqlite;

pub use sqlite::SqliteStore;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A uniqueness rule would be broken.
    #[error("{what} already exists")]
    Conflict {
        /// What collided.
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

/// What the map's versions need to survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// Identifies the map; made at random with the database.
    pub map_id: u64,
    /// Every version handed out so far is below it; a new process starts counting here and
    /// leases a new range ([`Store::set_map_value`] with [`MapKey::Lease`]).
    pub lease: u64,
    /// Resuming from below it takes a full map: removals before it are forgotten.
    pub floor: u64,
    /// Fingerprint of the policy the versions were last counted under (0: none).
    pub policy_fingerprint: u64,
    /// The version at which that policy took effect.
    pub policy_version: u64,
    /// Nodes removed from the map, as (version, node id), oldest first.
    pub removed: Vec<(u64, u64)>,
}

/// The map values kept between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKey {
    /// [`MapState::lease`].
    Lease,
    /// [`MapState::policy_fingerprint`].
    PolicyFingerprint,
    /// [`MapState::policy_version`].
    PolicyVersion,
}

/// What a server needs from its database. Calls are short and synchronous; every write that
/// must be atomic is one call.
pub trait Store: Send {
    /// Adds a user.
    fn create_user(&mut self, name: &str, now_ms: i64) -> Result<UserRecord, StoreError>;
    /// Every user, by id.
    fn users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// Removes a user with no nodes; its pre-auth keys go with it.
    fn delete_user(&mut self, id: u64) -> Result<(), StoreError>;
    /// Adds a pre-auth key (its `id` is ignored and assigned).
    fn insert_preauth_key(&mut self, key: &PreAuthKeyRecord) -> Result<u64, StoreError>;
    /// The pre-auth key with this prefix.
    fn preauth_key(&self, prefix: &str) -> Result<Option<PreAuthKeyRecord>, StoreError>;
    /// Every pre-auth key, by id.
    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError>;
    /// Sets a pre-auth key's expiration.
    fn expire_preauth_key(&mut self, id: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Adds an API key (its `id` is ignored and assigned).
    fn insert_api_key(&mut self, key: &ApiKeyRecord) -> Result<u64, StoreError>;
    /// The API key with this prefix.
    fn api_key(&self, prefix: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Every API key, by id.
    fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Sets an API key's expiration.
    fn expire_api_key(&mut self, id: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Records a successful use of an API key.
    fn touch_api_key(&mut self, id: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Every node, by id.
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Inserts a node and, in the same transaction, marks the pre-auth key it used as used.
    fn register_node(&mut self, node: &NodeRecord) -> Result<u64, StoreError>;
    /// Rewrites a node's mutable fields.
    fn update_node(&mut self, node: &NodeRecord) -> Result<(), StoreError>;
    /// Removes a node.
    fn delete_node(&mut self, id: u64) -> Result<(), StoreError>;
    /// The map's versions as kept between runs; makes the map id on first use.
    fn map_state(&mut self) -> Result<MapState, StoreError>;
    /// Stores one of the map's values.
    fn set_map_value(&mut self, key: MapKey, value: u64) -> Result<(), StoreError>;
    /// Records that node `id` left the map at `version`; past `keep` removals the oldest are
    /// forgotten and the floor rises to the newest forgotten one.
    fn add_removed(&mut self, id: u64, version: u64, keep: usize) -> Result<(), StoreError>;
    /// The access policy stored for `policy.mode = "database"`, if one was set.
    fn policy(&self) -> Result<Option<StoredPolicy>, StoreError>;
    /// Stores the access policy text (replacing the previous one), or removes it (`None`).
    fn set_policy(&mut self, text: Option<&str>, now_ms: i64) -> Result<(), StoreError>;
}

/// The access policy as stored in database mode: its text, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The HuJSON text.
    pub text: String,
    /// When it was stored.
    pub updated_ms: i64,
}
