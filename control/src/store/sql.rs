//! The store written once for both databases: schema migrations, queries, the change log and
//! presence, over a small [`Backend`] that runs one transaction of SQL with dynamic values.
//! SQLite and PostgreSQL differ only in their backend and a few words of the schema.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    ApiKeyRecord, Change, ChangeKind, MapState, NodeRecord, PreAuthKeyRecord, Store, StoreError,
    StoredPolicy, UserRecord,
};

/// Schema migrations, for both databases; entry `i` moves the database from version `i` to
/// `i + 1`. `{serial}` is an id the database assigns; for PostgreSQL `INTEGER` becomes `BIGINT`
/// and `BLOB` `BYTEA` (see [`Dialect::schema`]).
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    id {serial},
    name TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE preauth_keys (
    id {serial},
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    prefix TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    reusable INTEGER NOT NULL,
    ephemeral INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    expiration_ms INTEGER,
    created_ms INTEGER NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE api_keys (
    id {serial},
    prefix TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    expiration_ms INTEGER,
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER
);
CREATE TABLE nodes (
    id {serial},
    node_key TEXT NOT NULL UNIQUE,
    disco_key TEXT NOT NULL,
    hostname TEXT NOT NULL,
    given_name TEXT NOT NULL UNIQUE,
    user_id INTEGER NOT NULL REFERENCES users(id),
    tags TEXT NOT NULL DEFAULT '[]',
    ipv4 TEXT NOT NULL UNIQUE,
    ipv6 TEXT NOT NULL UNIQUE,
    endpoints TEXT NOT NULL DEFAULT '[]',
    last_seen_ms INTEGER,
    expiry_ms INTEGER,
    created_ms INTEGER NOT NULL,
    ephemeral INTEGER NOT NULL,
    auth_key_id INTEGER REFERENCES preauth_keys(id) ON DELETE SET NULL
);
"#,
    r#"
ALTER TABLE nodes ADD COLUMN home_region INTEGER NOT NULL DEFAULT 0;
"#,
    // The access policy of `policy.mode = "database"`: at most one row.
    r#"
CREATE TABLE policy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    data TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
"#,
    // Routes a node advertises and the ones approved for it (JSON lists of prefixes).
    r#"
ALTER TABLE nodes ADD COLUMN advertised_routes TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN approved_routes TEXT NOT NULL DEFAULT '[]';
"#,
    // Map versions, so nodes resume their map streams across restarts: each node's last
    // stored change, the map's values (id, version lease, floor, policy), and removals.
    r#"
ALTER TABLE nodes ADD COLUMN map_version INTEGER NOT NULL DEFAULT 0;
CREATE TABLE map_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE map_removed (
    version INTEGER PRIMARY KEY,
    node_id INTEGER NOT NULL
);
"#,
    // Several instances on one database: the change log they all follow, the instances and
    // which nodes each serves (presence), and proof nonces claimed by any of them. The log's
    // head starts above every version handed out before it existed (the lease of schema 5,
    // which no version reached).
    r#"
CREATE TABLE changes (
    version INTEGER PRIMARY KEY,
    node_id INTEGER NOT NULL,
    kind INTEGER NOT NULL
);
CREATE TABLE instances (
    id INTEGER PRIMARY KEY,
    started_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
CREATE TABLE presence (
    node_id INTEGER NOT NULL,
    instance_id INTEGER NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, instance_id)
);
CREATE INDEX presence_instance ON presence (instance_id);
CREATE TABLE proof_nonces (
    nonce BLOB PRIMARY KEY,
    at_ms INTEGER NOT NULL
);
CREATE INDEX proof_nonces_at ON proof_nonces (at_ms);
INSERT INTO map_meta (key, value)
SELECT 'version', COALESCE((SELECT value FROM map_meta WHERE key = 'lease'),
                           (SELECT MAX(map_version) FROM nodes), 0);
"#,
];

/// Change-log entries kept: a follower further behind reloads every node instead.
pub const KEEP_CHANGES: u64 = 100_000;
/// Removals remembered for resuming nodes (see [`crate::netmap::MAX_REMOVED`]).
const KEEP_REMOVED: i64 = crate::netmap::MAX_REMOVED as i64;

/// How the two databases spell the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Dialect {
    /// A migration in this dialect.
    pub fn schema(self, sql: &str) -> String {
        match self {
            Self::Sqlite => sql.replace("{serial}", "INTEGER PRIMARY KEY"),
            Self::Postgres => sql
                .replace("{serial}", "BIGSERIAL PRIMARY KEY")
                .replace("INTEGER", "BIGINT")
                .replace("BLOB", "BYTEA"),
        }
    }
}

/// A value going into or coming out of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer (booleans are 0 and 1).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Self::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// A result row.
pub type Row = Vec<Value>;

/// Why a statement failed, as the store needs to tell.
#[derive(Debug)]
pub enum DbError {
    /// A UNIQUE or PRIMARY KEY constraint, on `table.column` when the database says which.
    Unique(String),
    /// A foreign key still references the row.
    ForeignKey,
    /// Anything else, with the database's message.
    Other(String),
}

/// One open transaction. SQL uses `$1`, `$2`... for parameters, each first used in order.
pub trait Tx {
    /// Runs a statement; the rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError>;
    /// Runs a query; its rows.
    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError>;
    /// Runs several statements without parameters (migrations).
    fn batch(&mut self, sql: &str) -> Result<(), DbError>;
}

/// A database the store runs on.
pub trait Backend: Send + Sync + 'static {
    /// Its name, for errors and logs.
    const NAME: &'static str;
    /// How it spells the schema.
    const DIALECT: Dialect;
    /// Whether other processes share it.
    fn shared(&self) -> bool;
    /// Runs `work` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    fn transaction(
        &self,
        work: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// The schema version (0 for an empty database), read inside the migration's transaction
    /// (which the backend makes exclusive between processes).
    fn schema_version(&self, tx: &mut dyn Tx) -> Result<i64, DbError>;
    /// Sets the schema version.
    fn set_schema_version(&self, tx: &mut dyn Tx, version: i64) -> Result<(), DbError>;
    /// Tells the other instances that `version` committed (PostgreSQL's NOTIFY; delivered at
    /// commit).
    fn notify(&self, tx: &mut dyn Tx, version: u64) -> Result<(), DbError>;
}

/// The store over a backend.
pub struct SqlStore<B: Backend> {
    backend: B,
    nonces: AtomicU64,
}

impl<B: Backend> std::fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &B::NAME)
            .finish()
    }
}

fn db(e: DbError) -> StoreError {
    db_error(e, "row")
}

/// A statement's error as the store reports it; a unique violation is a conflict on `what`
/// unless the column says more precisely.
fn db_error(e: DbError, what: &'static str) -> StoreError {
    match e {
        DbError::Unique(column) => StoreError::Conflict {
            what: match column.as_str() {
                "nodes.node_key" => "node key",
                "nodes.given_name" => "node name",
                "nodes.ipv4" | "nodes.ipv6" => "node address",
                "users.name" => "user",
                _ => what,
            },
        },
        DbError::ForeignKey => StoreError::InUse { what },
        DbError::Other(message) => StoreError::Backend { message },
    }
}

fn corrupt(column: &'static str, value: &Value) -> StoreError {
    StoreError::Corrupt {
        column,
        value: format!("{value:?}"),
    }
}

fn int(column: &'static str, v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(corrupt(column, other)),
    }
}

fn opt_int(column: &'static str, v: &Value) -> Result<Option<i64>, StoreError> {
    match v {
        Value::Null => Ok(None),
        other => int(column, other).map(Some),
    }
}

fn uint(column: &'static str, v: &Value) -> Result<u64, StoreError> {
    let i = int(column, v)?;
    u64::try_from(i).map_err(|_| corrupt(column, v))
}

fn text(column: &'static str, v: &Value) -> Result<String, StoreError> {
    match v {
        Value::Text(t) => Ok(t.clone()),
        other => Err(corrupt(column, other)),
    }
}

fn parse<T: std::str::FromStr>(column: &'static str, v: &Value) -> Result<T, StoreError> {
    text(column, v)?.parse().map_err(|_| corrupt(column, v))
}

fn json_list<T: serde::de::DeserializeOwned>(
    column: &'static str,
    v: &Value,
) -> Result<Vec<T>, StoreError> {
    serde_json::from_str(&text(column, v)?).map_err(|_| corrupt(column, v))
}

fn to_json<T: serde::Serialize>(v: &[T]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn hash32(column: &'static str, v: &Value) -> Result<[u8; 32], StoreError> {
    match v {
        Value::Blob(b) => b.as_slice().try_into().map_err(|_| corrupt(column, v)),
        other => Err(corrupt(column, other)),
    }
}

const PAK_COLUMNS: &str =
    "id, user_id, prefix, hash, reusable, ephemeral, used, expiration_ms, created_ms, tags";

fn pak(r: &[Value]) -> Result<PreAuthKeyRecord, StoreError> {
    Ok(PreAuthKeyRecord {
        id: uint("preauth_keys.id", &r[0])?,
        user_id: uint("preauth_keys.user_id", &r[1])?,
        prefix: text("preauth_keys.prefix", &r[2])?,
        hash: hash32("preauth_keys.hash", &r[3])?,
        reusable: int("preauth_keys.reusable", &r[4])? != 0,
        ephemeral: int("preauth_keys.ephemeral", &r[5])? != 0,
        used: int("preauth_keys.used", &r[6])? != 0,
        expiration_ms: opt_int("preauth_keys.expiration_ms", &r[7])?,
        created_ms: int("preauth_keys.created_ms", &r[8])?,
        tags: json_list("preauth_keys.tags", &r[9])?,
    })
}

const API_COLUMNS: &str = "id, prefix, hash, expiration_ms, created_ms, last_used_ms";

fn api(r: &[Value]) -> Result<ApiKeyRecord, StoreError> {
    Ok(ApiKeyRecord {
        id: uint("api_keys.id", &r[0])?,
        prefix: text("api_keys.prefix", &r[1])?,
        hash: hash32("api_keys.hash", &r[2])?,
        expiration_ms: opt_int("api_keys.expiration_ms", &r[3])?,
        created_ms: int("api_keys.created_ms", &r[4])?,
        last_used_ms: opt_int("api_keys.last_used_ms", &r[5])?,
    })
}

/// The node columns, in [`node`]'s order.
const NODE_COLUMNS: &str = "n.id, n.node_key, n.disco_key, n.hostname, n.given_name, n.user_id, \
     n.tags, n.ipv4, n.ipv6, n.endpoints, n.last_seen_ms, n.expiry_ms, n.created_ms, n.ephemeral, \
     n.auth_key_id, n.home_region, n.advertised_routes, n.approved_routes, n.map_version";

fn node(r: &[Value]) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: uint("nodes.id", &r[0])?,
        node_key: parse("nodes.node_key", &r[1])?,
        disco_key: parse("nodes.disco_key", &r[2])?,
        hostname: text("nodes.hostname", &r[3])?,
        given_name: text("nodes.given_name", &r[4])?,
        user_id: uint("nodes.user_id", &r[5])?,
        tags: json_list("nodes.tags", &r[6])?,
        ipv4: parse("nodes.ipv4", &r[7])?,
        ipv6: parse("nodes.ipv6", &r[8])?,
        endpoints: json_list::<SocketAddr>("nodes.endpoints", &r[9])?,
        last_seen_ms: opt_int("nodes.last_seen_ms", &r[10])?,
        expiry_ms: opt_int("nodes.expiry_ms", &r[11])?,
        created_ms: int("nodes.created_ms", &r[12])?,
        ephemeral: int("nodes.ephemeral", &r[13])? != 0,
        auth_key_id: opt_int("nodes.auth_key_id", &r[14])?
            .map(|v| u64::try_from(v).unwrap_or_default()),
        home_region: u32::try_from(int("nodes.home_region", &r[15])?).unwrap_or(0),
        advertised_routes: json_list("nodes.advertised_routes", &r[16])?,
        approved_routes: json_list("nodes.approved_routes", &r[17])?,
        version: uint("nodes.map_version", &r[18])?,
    })
}

/// The single row of the first column of a query's answer, if any.
fn scalar(rows: &[Row]) -> Option<&Value> {
    rows.first().and_then(|r| r.first())
}

/// Takes the next version of the change log. The row stays locked until the transaction ends,
/// so versions commit in the order they were taken, with no gaps.
fn next_version(tx: &mut dyn Tx) -> Result<u64, StoreError> {
    let rows = tx
        .query(
            "UPDATE map_meta SET value = value + 1 WHERE key = 'version' RETURNING value",
            &[],
        )
        .map_err(db)?;
    let v = scalar(&rows).ok_or(StoreError::Corrupt {
        column: "map_meta.version",
        value: "missing".into(),
    })?;
    uint("map_meta.version", v)
}

/// Gives back a version taken by [`next_version`] when nothing was logged after all (the row
/// lock stays held, so nobody took the next one meanwhile).
fn unused_version(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE map_meta SET value = value - 1 WHERE key = 'version'",
        &[],
    )
    .map_err(db)?;
    Ok(())
}

fn set_meta(tx: &mut dyn Tx, key: &str, value: u64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO map_meta (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[key.into(), value.into()],
    )
    .map_err(db)?;
    Ok(())
}

fn claim_key(tx: &mut dyn Tx, key: u64) -> Result<(), StoreError> {
    let claimed = tx
        .execute(
            "UPDATE preauth_keys SET used = 1 WHERE id = $1 AND (reusable = 1 OR used = 0)",
            &[key.into()],
        )
        .map_err(db)?;
    if claimed == 0 {
        return Err(StoreError::KeyUsed);
    }
    Ok(())
}

impl<B: Backend> SqlStore<B> {
    /// The store over `backend`, migrated to this binary's schema. A database whose schema is
    /// newer than this binary is refused ([`StoreError::TooNew`]).
    pub fn new(backend: B) -> Result<Self, StoreError> {
        let store = Self {
            backend,
            nonces: AtomicU64::new(0),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The backend, for its own settings.
    pub fn backend_ref(&self) -> &B {
        &self.backend
    }

    /// Runs `work` in one transaction.
    fn tx<T>(
        &self,
        mut work: impl FnMut(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut out = None;
        self.backend.transaction(&mut |tx| {
            out = Some(work(tx)?);
            Ok(())
        })?;
        out.ok_or(StoreError::Backend {
            message: "transaction produced nothing".into(),
        })
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.tx(|tx| {
            let version = self.backend.schema_version(tx).map_err(db)?;
            let supported = MIGRATIONS.len() as i64;
            if version > supported {
                return Err(StoreError::TooNew {
                    found: version,
                    supported,
                });
            }
            for (i, sql) in MIGRATIONS
                .iter()
                .enumerate()
                .skip(usize::try_from(version).unwrap_or(0))
            {
                tx.batch(&B::DIALECT.schema(sql)).map_err(db)?;
                self.backend
                    .set_schema_version(tx, (i + 1) as i64)
                    .map_err(db)?;
                tracing::info!(version = i + 1, backend = B::NAME, "database migrated");
            }
            Ok(())
        })
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.tx(|tx| self.backend.schema_version(tx).map_err(db))
    }

    /// Logs `kind` about `node` at `version` and tells the other instances.
    fn log(
        &self,
        tx: &mut dyn Tx,
        version: u64,
        node: u64,
        kind: ChangeKind,
    ) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO changes (version, node_id, kind) VALUES ($1, $2, $3)",
            &[version.into(), node.into(), kind.code().into()],
        )
        .map_err(db)?;
        if kind == ChangeKind::Removed {
            self.tombstone(tx, version, node)?;
        }
        if version.is_multiple_of(1024) && version > KEEP_CHANGES {
            tx.execute(
                "DELETE FROM changes WHERE version <= $1",
                &[(version - KEEP_CHANGES).into()],
            )
            .map_err(db)?;
        }
        self.backend.notify(tx, version).map_err(db)?;
        Ok(())
    }

    /// Remembers a removal for resuming nodes; past [`KEEP_REMOVED`] the oldest are forgotten
    /// and the floor rises to the newest forgotten one.
    fn tombstone(&self, tx: &mut dyn Tx, version: u64, node: u64) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO map_removed (version, node_id) VALUES ($1, $2)",
            &[version.into(), node.into()],
        )
        .map_err(db)?;
        let rows = tx
            .query(
                "SELECT version FROM map_removed ORDER BY version DESC LIMIT 1 OFFSET $1",
                &[KEEP_REMOVED.into()],
            )
            .map_err(db)?;
        if let Some(floor) = scalar(&rows) {
            let floor = uint("map_removed.version", floor)?;
            tx.execute(
                "DELETE FROM map_removed WHERE version <= $1",
                &[floor.into()],
            )
            .map_err(db)?;
            tx.execute(
                "INSERT INTO map_meta (key, value) VALUES ('floor', $1)
                 ON CONFLICT (key) DO UPDATE SET value = CASE
                     WHEN excluded.value > map_meta.value THEN excluded.value
                     ELSE map_meta.value END",
                &[floor.into()],
            )
            .map_err(db)?;
        }
        Ok(())
    }

    /// Logs an offline flip of `node` at a fresh version when no instance serves it any more.
    fn offline_if_unserved(
        &self,
        tx: &mut dyn Tx,
        node: u64,
        now_ms: i64,
        version: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let rows = tx
            .query(
                "SELECT COUNT(*) FROM presence WHERE node_id = $1",
                &[node.into()],
            )
            .map_err(db)?;
        if scalar(&rows).map(|v| int("presence", v)).transpose()? != Some(0) {
            return Ok(None);
        }
        let seen = tx
            .execute(
                "UPDATE nodes SET last_seen_ms = $1 WHERE id = $2",
                &[now_ms.into(), node.into()],
            )
            .map_err(db)?;
        if seen == 0 {
            // Deleted meanwhile: its removal was logged.
            return Ok(None);
        }
        let v = match version {
            Some(v) => v,
            None => next_version(tx)?,
        };
        self.log(tx, v, node, ChangeKind::Offline)?;
        Ok(Some(v))
    }
}

fn node_args(n: &NodeRecord, version: u64) -> Vec<Value> {
    vec![
        n.disco_key.to_string().into(),
        n.hostname.as_str().into(),
        n.given_name.as_str().into(),
        n.user_id.into(),
        to_json(&n.tags).into(),
        to_json(&n.endpoints).into(),
        n.last_seen_ms.into(),
        n.expiry_ms.into(),
        n.ephemeral.into(),
        n.auth_key_id.into(),
        n.home_region.into(),
        to_json(&n.advertised_routes).into(),
        to_json(&n.approved_routes).into(),
        version.into(),
    ]
}

impl<B: Backend> Store for SqlStore<B> {
    fn backend(&self) -> &'static str {
        B::NAME
    }

    fn shared(&self) -> bool {
        self.backend.shared()
    }

    fn create_user(&self, name: &str, now_ms: i64) -> Result<UserRecord, StoreError> {
        let id = self.tx(|tx| {
            let rows = tx
                .query(
                    "INSERT INTO users (name, created_ms) VALUES ($1, $2) RETURNING id",
                    &[name.into(), now_ms.into()],
                )
                .map_err(|e| db_error(e, "user"))?;
            uint("users.id", scalar(&rows).unwrap_or(&Value::Null))
        })?;
        Ok(UserRecord {
            id,
            name: name.into(),
            created_ms: now_ms,
        })
    }

    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.tx(|tx| {
            let rows = tx
                .query("SELECT id, name, created_ms FROM users ORDER BY id", &[])
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    Ok(UserRecord {
                        id: uint("users.id", &r[0])?,
                        name: text("users.name", &r[1])?,
                        created_ms: int("users.created_ms", &r[2])?,
                    })
                })
                .collect()
        })
    }

    fn delete_user(&self, user: u64) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.execute("DELETE FROM users WHERE id = $1", &[user.into()])
                .map_err(|e| db_error(e, "user"))?;
            Ok(())
        })
    }

    fn insert_preauth_key(&self, k: &PreAuthKeyRecord) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let rows = tx
                .query(
                    "INSERT INTO preauth_keys (user_id, prefix, hash, reusable, ephemeral, used,
                                               expiration_ms, created_ms, tags)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[
                        k.user_id.into(),
                        k.prefix.as_str().into(),
                        k.hash.as_slice().into(),
                        k.reusable.into(),
                        k.ephemeral.into(),
                        k.used.into(),
                        k.expiration_ms.into(),
                        k.created_ms.into(),
                        to_json(&k.tags).into(),
                    ],
                )
                .map_err(|e| db_error(e, "pre-auth key"))?;
            uint("preauth_keys.id", scalar(&rows).unwrap_or(&Value::Null))
        })
    }

    fn preauth_key(&self, prefix: &str) -> Result<Option<PreAuthKeyRecord>, StoreError> {
        let sql = format!("SELECT {PAK_COLUMNS} FROM preauth_keys WHERE prefix = $1");
        self.tx(|tx| {
            let rows = tx.query(&sql, &[prefix.into()]).map_err(db)?;
            rows.first().map(|r| pak(r)).transpose()
        })
    }

    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError> {
        let sql = format!("SELECT {PAK_COLUMNS} FROM preauth_keys ORDER BY id");
        self.tx(|tx| {
            let rows = tx.query(&sql, &[]).map_err(db)?;
            rows.iter().map(|r| pak(r)).collect()
        })
    }

    fn expire_preauth_key(&self, key: u64, at_ms: i64) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.execute(
                "UPDATE preauth_keys SET expiration_ms = $1 WHERE id = $2",
                &[at_ms.into(), key.into()],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let rows = tx
                .query(
                    "INSERT INTO api_keys (prefix, hash, expiration_ms, created_ms)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                    &[
                        k.prefix.as_str().into(),
                        k.hash.as_slice().into(),
                        k.expiration_ms.into(),
                        k.created_ms.into(),
                    ],
                )
                .map_err(|e| db_error(e, "API key"))?;
            uint("api_keys.id", scalar(&rows).unwrap_or(&Value::Null))
        })
    }

    fn api_key(&self, prefix: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {API_COLUMNS} FROM api_keys WHERE prefix = $1");
        self.tx(|tx| {
            let rows = tx.query(&sql, &[prefix.into()]).map_err(db)?;
            rows.first().map(|r| api(r)).transpose()
        })
    }

    fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {API_COLUMNS} FROM api_keys ORDER BY id");
        self.tx(|tx| {
            let rows = tx.query(&sql, &[]).map_err(db)?;
            rows.iter().map(|r| api(r)).collect()
        })
    }

    fn expire_api_key(&self, key: u64, at_ms: i64) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.execute(
                "UPDATE api_keys SET expiration_ms = $1 WHERE id = $2",
                &[at_ms.into(), key.into()],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn touch_api_key(&self, key: u64, at_ms: i64) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.execute(
                "UPDATE api_keys SET last_used_ms = $1 WHERE id = $2",
                &[at_ms.into(), key.into()],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes n ORDER BY n.id");
        self.tx(|tx| {
            let rows = tx.query(&sql, &[]).map_err(db)?;
            rows.iter().map(|r| node(r)).collect()
        })
    }

    fn register_node(&self, n: &NodeRecord) -> Result<(u64, u64), StoreError> {
        self.tx(|tx| {
            let v = next_version(tx)?;
            if let Some(key) = n.auth_key_id {
                claim_key(tx, key)?;
            }
            let mut args = node_args(n, v);
            args.extend([
                n.node_key.to_string().into(),
                n.ipv4.to_string().into(),
                n.ipv6.to_string().into(),
                n.created_ms.into(),
            ]);
            let rows = tx
                .query(
                    "INSERT INTO nodes (disco_key, hostname, given_name, user_id, tags, endpoints,
                                        last_seen_ms, expiry_ms, ephemeral, auth_key_id,
                                        home_region, advertised_routes, approved_routes,
                                        map_version, node_key, ipv4, ipv6, created_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                             $16, $17, $18)
                     RETURNING id",
                    &args,
                )
                .map_err(|e| db_error(e, "node"))?;
            let id = uint("nodes.id", scalar(&rows).unwrap_or(&Value::Null))?;
            self.log(tx, v, id, ChangeKind::Record)?;
            Ok((id, v))
        })
    }

    fn update_node(
        &self,
        n: &NodeRecord,
        kind: ChangeKind,
        claim: bool,
    ) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let v = next_version(tx)?;
            if claim && let Some(key) = n.auth_key_id {
                claim_key(tx, key)?;
            }
            let mut args = node_args(n, v);
            args.push(n.id.into());
            let changed = tx
                .execute(
                    "UPDATE nodes SET disco_key = $1, hostname = $2, given_name = $3,
                            user_id = $4, tags = $5, endpoints = $6, last_seen_ms = $7,
                            expiry_ms = $8, ephemeral = $9, auth_key_id = $10,
                            home_region = $11, advertised_routes = $12, approved_routes = $13,
                            map_version = $14
                     WHERE id = $15",
                    &args,
                )
                .map_err(|e| db_error(e, "node name"))?;
            if changed == 0 {
                return Err(StoreError::Conflict {
                    what: "deleted node",
                });
            }
            self.log(tx, v, n.id, kind)?;
            Ok(v)
        })
    }

    fn delete_node(&self, id: u64) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let v = next_version(tx)?;
            let gone = tx
                .execute("DELETE FROM nodes WHERE id = $1", &[id.into()])
                .map_err(db)?;
            if gone == 0 {
                return Err(StoreError::Conflict {
                    what: "deleted node",
                });
            }
            tx.execute("DELETE FROM presence WHERE node_id = $1", &[id.into()])
                .map_err(db)?;
            self.log(tx, v, id, ChangeKind::Removed)?;
            Ok(v)
        })
    }

    fn changes_after(&self, version: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let sql = format!(
            "SELECT c.version, c.node_id, c.kind, {NODE_COLUMNS}
             FROM changes c LEFT JOIN nodes n ON n.id = c.node_id
             WHERE c.version > $1 ORDER BY c.version LIMIT $2"
        );
        self.tx(|tx| {
            let rows = tx
                .query(&sql, &[version.into(), (limit as u64).into()])
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let code = int("changes.kind", &r[2])?;
                    Ok(Change {
                        version: uint("changes.version", &r[0])?,
                        node_id: uint("changes.node_id", &r[1])?,
                        kind: ChangeKind::from_code(code)
                            .ok_or_else(|| corrupt("changes.kind", &r[2]))?,
                        record: match r[3] {
                            Value::Null => None,
                            _ => Some(node(&r[3..])?),
                        },
                    })
                })
                .collect()
        })
    }

    fn map_state(&self) -> Result<MapState, StoreError> {
        self.tx(|tx| {
            let mut random = [0u8; 8];
            getrandom::getrandom(&mut random).map_err(|e| StoreError::Backend {
                message: format!("no randomness for the map id: {e}"),
            })?;
            // Positive, and never 0 (which a node sends for "no map"). Whoever comes first
            // (another instance, or an earlier run) made it already.
            let fresh = (i64::from_le_bytes(random) & i64::MAX).max(1);
            tx.execute(
                "INSERT INTO map_meta (key, value) VALUES ('map_id', $1) ON CONFLICT (key) DO NOTHING",
                &[fresh.into()],
            )
            .map_err(db)?;
            let rows = tx
                .query("SELECT key, value FROM map_meta", &[])
                .map_err(db)?;
            let mut state = MapState::default();
            for r in &rows {
                let value = uint("map_meta.value", &r[1])?;
                match text("map_meta.key", &r[0])?.as_str() {
                    "map_id" => state.map_id = value,
                    "version" => state.version = value,
                    "floor" => state.floor = value,
                    "policy_fingerprint" => state.policy_fingerprint = value,
                    "policy_version" => state.policy_version = value,
                    _ => {}
                }
            }
            let rows = tx
                .query(
                    "SELECT version, node_id FROM map_removed ORDER BY version",
                    &[],
                )
                .map_err(db)?;
            for r in &rows {
                state.removed.push((
                    uint("map_removed.version", &r[0])?,
                    uint("map_removed.node_id", &r[1])?,
                ));
            }
            Ok(state)
        })
    }

    fn set_policy_fingerprint(&self, fingerprint: u64) -> Result<Option<u64>, StoreError> {
        self.tx(|tx| {
            let v = next_version(tx)?;
            let rows = tx
                .query(
                    "SELECT value FROM map_meta WHERE key = 'policy_fingerprint'",
                    &[],
                )
                .map_err(db)?;
            let stored = scalar(&rows)
                .map(|v| uint("map_meta.value", v))
                .transpose()?;
            if stored == Some(fingerprint) {
                unused_version(tx)?;
                return Ok(None);
            }
            set_meta(tx, "policy_fingerprint", fingerprint)?;
            set_meta(tx, "policy_version", v)?;
            self.log(tx, v, 0, ChangeKind::Policy)?;
            Ok(Some(v))
        })
    }

    fn policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        self.tx(|tx| {
            let rows = tx
                .query("SELECT data, updated_ms FROM policy WHERE id = 1", &[])
                .map_err(db)?;
            rows.first()
                .map(|r| {
                    Ok(StoredPolicy {
                        text: text("policy.data", &r[0])?,
                        updated_ms: int("policy.updated_ms", &r[1])?,
                    })
                })
                .transpose()
        })
    }

    fn set_policy(
        &self,
        text: Option<&str>,
        fingerprint: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let v = next_version(tx)?;
            match text {
                Some(text) => tx.execute(
                    "INSERT INTO policy (id, data, updated_ms) VALUES (1, $1, $2)
                     ON CONFLICT (id) DO UPDATE SET data = excluded.data,
                                                    updated_ms = excluded.updated_ms",
                    &[text.into(), now_ms.into()],
                ),
                None => tx.execute("DELETE FROM policy WHERE id = 1", &[]),
            }
            .map_err(db)?;
            set_meta(tx, "policy_fingerprint", fingerprint)?;
            set_meta(tx, "policy_version", v)?;
            self.log(tx, v, 0, ChangeKind::Policy)?;
            Ok(v)
        })
    }

    fn join_instance(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).map_err(|e| StoreError::Backend {
            message: format!("no randomness for the instance id: {e}"),
        })?;
        let id = (u64::from_le_bytes(random) >> 1).max(1);
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO instances (id, started_ms, heartbeat_ms) VALUES ($1, $2, $2)",
                &[id.into(), now_ms.into()],
            )
            .map_err(db)?;
            Ok(id)
        })
    }

    fn heartbeat(&self, instance: u64, now_ms: i64) -> Result<bool, StoreError> {
        self.tx(|tx| {
            let alive = tx
                .execute(
                    "UPDATE instances SET heartbeat_ms = $1 WHERE id = $2",
                    &[now_ms.into(), instance.into()],
                )
                .map_err(db)?;
            if alive == 0 {
                tx.execute(
                    "INSERT INTO instances (id, started_ms, heartbeat_ms) VALUES ($1, $2, $2)",
                    &[instance.into(), now_ms.into()],
                )
                .map_err(db)?;
            }
            Ok(alive > 0)
        })
    }

    fn reap_instances(&self, dead_before_ms: i64, now_ms: i64) -> Result<usize, StoreError> {
        self.tx(|tx| {
            let first = next_version(tx)?;
            let rows = tx
                .query(
                    "SELECT id FROM instances WHERE heartbeat_ms < $1",
                    &[dead_before_ms.into()],
                )
                .map_err(db)?;
            let dead: Vec<u64> = rows
                .iter()
                .map(|r| uint("instances.id", &r[0]))
                .collect::<Result<_, _>>()?;
            let mut version = Some(first);
            for instance in &dead {
                let served = tx
                    .query(
                        "DELETE FROM presence WHERE instance_id = $1 RETURNING node_id",
                        &[(*instance).into()],
                    )
                    .map_err(db)?;
                tx.execute("DELETE FROM instances WHERE id = $1", &[(*instance).into()])
                    .map_err(db)?;
                for r in &served {
                    let node = uint("presence.node_id", &r[0])?;
                    if self
                        .offline_if_unserved(tx, node, now_ms, version)?
                        .is_some()
                    {
                        version = None;
                    }
                }
            }
            if version.is_some() {
                unused_version(tx)?;
            }
            Ok(dead.len())
        })
    }

    fn set_presence(
        &self,
        node: u64,
        instance: u64,
        online: bool,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        self.tx(|tx| {
            // The log's row is locked first, so two instances flipping one node's presence
            // take turns and each sees the other's row.
            let v = next_version(tx)?;
            let flipped = if online {
                let added = tx
                    .execute(
                        "INSERT INTO presence (node_id, instance_id, since_ms) VALUES ($1, $2, $3)
                         ON CONFLICT (node_id, instance_id) DO NOTHING",
                        &[node.into(), instance.into(), now_ms.into()],
                    )
                    .map_err(db)?;
                let rows = tx
                    .query(
                        "SELECT COUNT(*) FROM presence WHERE node_id = $1",
                        &[node.into()],
                    )
                    .map_err(db)?;
                let count = scalar(&rows).map(|v| int("presence", v)).transpose()?;
                if added == 1 && count == Some(1) {
                    self.log(tx, v, node, ChangeKind::Online)?;
                    Some(v)
                } else {
                    None
                }
            } else {
                let removed = tx
                    .execute(
                        "DELETE FROM presence WHERE node_id = $1 AND instance_id = $2",
                        &[node.into(), instance.into()],
                    )
                    .map_err(db)?;
                if removed == 1 {
                    self.offline_if_unserved(tx, node, now_ms, Some(v))?
                } else {
                    None
                }
            };
            if flipped.is_none() {
                unused_version(tx)?;
            }
            Ok(flipped)
        })
    }

    fn online_nodes(&self) -> Result<Vec<u64>, StoreError> {
        self.tx(|tx| {
            let rows = tx
                .query(
                    "SELECT DISTINCT node_id FROM presence ORDER BY node_id",
                    &[],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| uint("presence.node_id", &r[0]))
                .collect()
        })
    }

    fn claim_nonce(
        &self,
        nonce: &[u8; 24],
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<bool, StoreError> {
        let prune = self
            .nonces
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(1024);
        self.tx(|tx| {
            if prune {
                tx.execute(
                    "DELETE FROM proof_nonces WHERE at_ms < $1",
                    &[forget_before_ms.into()],
                )
                .map_err(db)?;
            }
            let fresh = tx
                .execute(
                    "INSERT INTO proof_nonces (nonce, at_ms) VALUES ($1, $2)
                     ON CONFLICT (nonce) DO NOTHING",
                    &[nonce.as_slice().into(), now_ms.into()],
                )
                .map_err(db)?;
            Ok(fresh == 1)
        })
    }
}
