//! The SQLite store: one file, WAL journal, versioned migrations applied at open.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ApiKeyRecord, MapKey, MapState, NodeRecord, PreAuthKeyRecord, Store, StoreError, StoredPolicy,
    UserRecord,
};

/// Schema migrations; entry `i` moves the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE preauth_keys (
    id INTEGER PRIMARY KEY,
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
    id INTEGER PRIMARY KEY,
    prefix TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    expiration_ms INTEGER,
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER
);
CREATE TABLE nodes (
    id INTEGER PRIMARY KEY,
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
];

/// A SQLite database file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

fn conflict(e: rusqlite::Error, what: &'static str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict { what }
        }
        e => StoreError::Sqlite(e),
    }
}

fn json_list<T: serde::de::DeserializeOwned>(
    column: &'static str,
    text: String,
) -> Result<Vec<T>, StoreError> {
    serde_json::from_str(&text).map_err(|_| StoreError::Corrupt {
        column,
        value: text,
    })
}

fn to_json<T: serde::Serialize>(v: &[T]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn parse<T: std::str::FromStr>(column: &'static str, text: String) -> Result<T, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt {
        column,
        value: text,
    })
}

fn hash32(column: &'static str, blob: Vec<u8>) -> Result<[u8; 32], StoreError> {
    blob.as_slice().try_into().map_err(|_| StoreError::Corrupt {
        column,
        value: hex::encode(&blob),
    })
}

fn id(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

fn sql_id(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path, wal: bool) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory shows up as SQLite's own "unable to open" error below.
            let _ = std::fs::create_dir_all(dir);
        }
        Self::init(Connection::open(path)?, wal)
    }

    /// A private in-memory database, for tests and benchmarks.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?, false)
    }

    fn init(conn: Connection, wal: bool) -> Result<Self, StoreError> {
        if wal {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Self { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
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
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "database migrated");
        }
        Ok(())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

const PAK_COLUMNS: &str =
    "id, user_id, prefix, hash, reusable, ephemeral, used, expiration_ms, created_ms, tags";

fn pak_row(r: &Row<'_>) -> rusqlite::Result<PakRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

type PakRow = (
    i64,
    i64,
    String,
    Vec<u8>,
    bool,
    bool,
    bool,
    Option<i64>,
    i64,
    String,
);

fn pak(row: PakRow) -> Result<PreAuthKeyRecord, StoreError> {
    let (id_, user_id, prefix, hash, reusable, ephemeral, used, expiration_ms, created_ms, tags) =
        row;
    Ok(PreAuthKeyRecord {
        id: id(id_),
        user_id: id(user_id),
        prefix,
        hash: hash32("preauth_keys.hash", hash)?,
        reusable,
        ephemeral,
        used,
        expiration_ms,
        created_ms,
        tags: json_list("preauth_keys.tags", tags)?,
    })
}

const API_COLUMNS: &str = "id, prefix, hash, expiration_ms, created_ms, last_used_ms";

type ApiRow = (i64, String, Vec<u8>, Option<i64>, i64, Option<i64>);

fn api_row(r: &Row<'_>) -> rusqlite::Result<ApiRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn api(row: ApiRow) -> Result<ApiKeyRecord, StoreError> {
    let (id_, prefix, hash, expiration_ms, created_ms, last_used_ms) = row;
    Ok(ApiKeyRecord {
        id: id(id_),
        prefix,
        hash: hash32("api_keys.hash", hash)?,
        expiration_ms,
        created_ms,
        last_used_ms,
    })
}

const NODE_COLUMNS: &str = "id, node_key, disco_key, hostname, given_name, user_id, tags, ipv4, ipv6, \
     endpoints, last_seen_ms, expiry_ms, created_ms, ephemeral, auth_key_id, home_region, \
     advertised_routes, approved_routes, map_version";

struct NodeRow {
    id: i64,
    node_key: String,
    disco_key: String,
    hostname: String,
    given_name: String,
    user_id: i64,
    tags: String,
    ipv4: String,
    ipv6: String,
    endpoints: String,
    last_seen_ms: Option<i64>,
    expiry_ms: Option<i64>,
    created_ms: i64,
    ephemeral: bool,
    auth_key_id: Option<i64>,
    home_region: i64,
    advertised_routes: String,
    approved_routes: String,
    map_version: i64,
}

fn node_row(r: &Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        id: r.get(0)?,
        node_key: r.get(1)?,
        disco_key: r.get(2)?,
        hostname: r.get(3)?,
        given_name: r.get(4)?,
        user_id: r.get(5)?,
        tags: r.get(6)?,
        ipv4: r.get(7)?,
        ipv6: r.get(8)?,
        endpoints: r.get(9)?,
        last_seen_ms: r.get(10)?,
        expiry_ms: r.get(11)?,
        created_ms: r.get(12)?,
        ephemeral: r.get(13)?,
        auth_key_id: r.get(14)?,
        home_region: r.get(15)?,
        advertised_routes: r.get(16)?,
        approved_routes: r.get(17)?,
        map_version: r.get(18)?,
    })
}

fn node(r: NodeRow) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: id(r.id),
        node_key: parse("nodes.node_key", r.node_key)?,
        disco_key: parse("nodes.disco_key", r.disco_key)?,
        hostname: r.hostname,
        given_name: r.given_name,
        user_id: id(r.user_id),
        tags: json_list("nodes.tags", r.tags)?,
        ipv4: parse("nodes.ipv4", r.ipv4)?,
        ipv6: parse("nodes.ipv6", r.ipv6)?,
        endpoints: json_list("nodes.endpoints", r.endpoints)?,
        last_seen_ms: r.last_seen_ms,
        expiry_ms: r.expiry_ms,
        created_ms: r.created_ms,
        ephemeral: r.ephemeral,
        auth_key_id: r.auth_key_id.map(id),
        home_region: u32::try_from(r.home_region).unwrap_or(0),
        advertised_routes: json_list("nodes.advertised_routes", r.advertised_routes)?,
        approved_routes: json_list("nodes.approved_routes", r.approved_routes)?,
        version: u64::try_from(r.map_version).unwrap_or(0),
    })
}

impl Store for SqliteStore {
    fn create_user(&mut self, name: &str, now_ms: i64) -> Result<UserRecord, StoreError> {
        self.conn
            .execute(
                "INSERT INTO users (name, created_ms) VALUES (?1, ?2)",
                params![name, now_ms],
            )
            .map_err(|e| conflict(e, "user"))?;
        Ok(UserRecord {
            id: id(self.conn.last_insert_rowid()),
            name: name.into(),
            created_ms: now_ms,
        })
    }

    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, created_ms FROM users ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(UserRecord {
                id: id(r.get(0)?),
                name: r.get(1)?,
                created_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_user(&mut self, user: u64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM users WHERE id = ?1", params![sql_id(user)])?;
        Ok(())
    }

    fn insert_preauth_key(&mut self, k: &PreAuthKeyRecord) -> Result<u64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO preauth_keys (user_id, prefix, hash, reusable, ephemeral, used, expiration_ms, created_ms, tags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    sql_id(k.user_id),
                    k.prefix,
                    &k.hash[..],
                    k.reusable,
                    k.ephemeral,
                    k.used,
                    k.expiration_ms,
                    k.created_ms,
                    to_json(&k.tags)
                ],
            )
            .map_err(|e| conflict(e, "pre-auth key"))?;
        Ok(id(self.conn.last_insert_rowid()))
    }

    fn preauth_key(&self, prefix: &str) -> Result<Option<PreAuthKeyRecord>, StoreError> {
        let sql = format!("SELECT {PAK_COLUMNS} FROM preauth_keys WHERE prefix = ?1");
        self.conn
            .query_row(&sql, params![prefix], pak_row)
            .optional()?
            .map(pak)
            .transpose()
    }

    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError> {
        let sql = format!("SELECT {PAK_COLUMNS} FROM preauth_keys ORDER BY id");
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map([], pak_row)?;
        rows.map(|r| pak(r?)).collect()
    }

    fn expire_preauth_key(&mut self, key: u64, at_ms: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE preauth_keys SET expiration_ms = ?2 WHERE id = ?1",
            params![sql_id(key), at_ms],
        )?;
        Ok(())
    }

    fn insert_api_key(&mut self, k: &ApiKeyRecord) -> Result<u64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO api_keys (prefix, hash, expiration_ms, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![k.prefix, &k.hash[..], k.expiration_ms, k.created_ms],
            )
            .map_err(|e| conflict(e, "API key"))?;
        Ok(id(self.conn.last_insert_rowid()))
    }

    fn api_key(&self, prefix: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {API_COLUMNS} FROM api_keys WHERE prefix = ?1");
        self.conn
            .query_row(&sql, params![prefix], api_row)
            .optional()?
            .map(api)
            .transpose()
    }

    fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {API_COLUMNS} FROM api_keys ORDER BY id");
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map([], api_row)?;
        rows.map(|r| api(r?)).collect()
    }

    fn expire_api_key(&mut self, key: u64, at_ms: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE api_keys SET expiration_ms = ?2 WHERE id = ?1",
            params![sql_id(key), at_ms],
        )?;
        Ok(())
    }

    fn touch_api_key(&mut self, key: u64, at_ms: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE api_keys SET last_used_ms = ?2 WHERE id = ?1",
            params![sql_id(key), at_ms],
        )?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id");
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map([], node_row)?;
        rows.map(|r| node(r?)).collect()
    }

    fn register_node(&mut self, n: &NodeRecord) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO nodes (node_key, disco_key, hostname, given_name, user_id, tags, ipv4, ipv6,
                                endpoints, last_seen_ms, expiry_ms, created_ms, ephemeral, auth_key_id,
                                home_region, advertised_routes, approved_routes, map_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            params![
                n.node_key.to_string(),
                n.disco_key.to_string(),
                n.hostname,
                n.given_name,
                sql_id(n.user_id),
                to_json(&n.tags),
                n.ipv4.to_string(),
                n.ipv6.to_string(),
                to_json(&n.endpoints),
                n.last_seen_ms,
                n.expiry_ms,
                n.created_ms,
                n.ephemeral,
                n.auth_key_id.map(sql_id),
                n.home_region,
                to_json(&n.advertised_routes),
                to_json(&n.approved_routes),
                sql_id(n.version),
            ],
        )
        .map_err(|e| conflict(e, "node"))?;
        let node_id = id(tx.last_insert_rowid());
        if let Some(key) = n.auth_key_id {
            tx.execute(
                "UPDATE preauth_keys SET used = 1 WHERE id = ?1",
                params![sql_id(key)],
            )?;
        }
        tx.commit()?;
        Ok(node_id)
    }

    fn update_node(&mut self, n: &NodeRecord) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE nodes SET disco_key = ?2, hostname = ?3, given_name = ?4, tags = ?5,
                    endpoints = ?6, last_seen_ms = ?7, expiry_ms = ?8, auth_key_id = ?9,
                    user_id = ?10, ephemeral = ?11, home_region = ?12,
                    advertised_routes = ?13, approved_routes = ?14, map_version = ?15
             WHERE id = ?1",
            params![
                sql_id(n.id),
                n.disco_key.to_string(),
                n.hostname,
                n.given_name,
                to_json(&n.tags),
                to_json(&n.endpoints),
                n.last_seen_ms,
                n.expiry_ms,
                n.auth_key_id.map(sql_id),
                sql_id(n.user_id),
                n.ephemeral,
                n.home_region,
                to_json(&n.advertised_routes),
                to_json(&n.approved_routes),
                sql_id(n.version),
            ],
        )
        .map_err(|e| conflict(e, "node name"))?;
        if let Some(key) = n.auth_key_id {
            // The key a node (re-)registered with counts as used, in the same transaction.
            tx.execute(
                "UPDATE preauth_keys SET used = 1 WHERE id = ?1",
                params![sql_id(key)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_node(&mut self, node_id: u64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM nodes WHERE id = ?1", params![sql_id(node_id)])?;
        Ok(())
    }

    fn map_state(&mut self) -> Result<MapState, StoreError> {
        let tx = self.conn.transaction()?;
        let get = |key: &str| -> rusqlite::Result<Option<i64>> {
            tx.query_row(
                "SELECT value FROM map_meta WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
        };
        let map_id = match get("map_id")? {
            Some(v) => v,
            None => {
                let mut b = [0u8; 8];
                getrandom::getrandom(&mut b).map_err(|e| StoreError::Corrupt {
                    column: "map_meta.map_id",
                    value: e.to_string(),
                })?;
                // Positive, and never 0 (which a node sends for "no map").
                let v = (i64::from_le_bytes(b) & i64::MAX).max(1);
                tx.execute(
                    "INSERT INTO map_meta (key, value) VALUES ('map_id', ?1)",
                    params![v],
                )?;
                v
            }
        };
        let u = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        // Versions handed out before the lease table existed are the nodes' own.
        let newest: Option<i64> =
            tx.query_row("SELECT MAX(map_version) FROM nodes", [], |r| r.get(0))?;
        let mut state = MapState {
            map_id: u(Some(map_id)),
            lease: u(get("lease")?).max(u(newest) + 1),
            floor: u(get("floor")?),
            policy_fingerprint: u(get("policy_fingerprint")?),
            policy_version: u(get("policy_version")?),
            removed: Vec::new(),
        };
        {
            let mut st = tx.prepare("SELECT version, node_id FROM map_removed ORDER BY version")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (v, n) = row?;
                state.removed.push((u(Some(v)), id(n)));
            }
        }
        tx.commit()?;
        Ok(state)
    }

    fn set_map_value(&mut self, key: MapKey, value: u64) -> Result<(), StoreError> {
        let key = match key {
            MapKey::Lease => "lease",
            MapKey::PolicyFingerprint => "policy_fingerprint",
            MapKey::PolicyVersion => "policy_version",
        };
        self.conn.execute(
            "INSERT INTO map_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, sql_id(value)],
        )?;
        Ok(())
    }

    fn add_removed(&mut self, node_id: u64, version: u64, keep: usize) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO map_removed (version, node_id) VALUES (?1, ?2)",
            params![sql_id(version), sql_id(node_id)],
        )?;
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let forgotten: Option<i64> = tx
            .query_row(
                "SELECT version FROM map_removed ORDER BY version DESC LIMIT 1 OFFSET ?1",
                params![keep],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(floor) = forgotten {
            tx.execute(
                "DELETE FROM map_removed WHERE version <= ?1",
                params![floor],
            )?;
            tx.execute(
                "INSERT INTO map_meta (key, value) VALUES ('floor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
                params![floor],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT data, updated_ms FROM policy WHERE id = 1",
                [],
                |r| {
                    Ok(StoredPolicy {
                        text: r.get(0)?,
                        updated_ms: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    fn set_policy(&mut self, text: Option<&str>, now_ms: i64) -> Result<(), StoreError> {
        match text {
            Some(text) => self.conn.execute(
                "INSERT INTO policy (id, data, updated_ms) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data, updated_ms = excluded.updated_ms",
                params![text, now_ms],
            )?,
            None => self.conn.execute("DELETE FROM policy WHERE id = 1", [])?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::{DiscoSecretKey, NodeSecretKey};

    fn sample_node(user_id: u64, n: u8, auth_key_id: Option<u64>) -> NodeRecord {
        NodeRecord {
            id: 0,
            node_key: NodeSecretKey::generate().public_key(),
            disco_key: DiscoSecretKey::generate().public_key(),
            hostname: format!("host{n}"),
            given_name: format!("host{n}"),
            user_id,
            tags: vec!["tag:a".into()],
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, n),
            ipv6: format!("fd7a:115c:a1e0::{n}").parse().expect("v6"),
            endpoints: vec!["10.0.0.1:41641".parse().expect("ep")],
            last_seen_ms: None,
            expiry_ms: None,
            created_ms: 5,
            ephemeral: false,
            auth_key_id,
            home_region: 0,
            advertised_routes: vec!["10.20.0.0/24".parse().expect("prefix")],
            approved_routes: Vec::new(),
            version: 7,
        }
    }

    #[test]
    fn survives_reopen_and_migrates_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        let node = {
            let mut s = SqliteStore::open(&path, true).expect("open");
            let u = s.create_user("alice", 1).expect("user");
            let key = PreAuthKeyRecord {
                id: 0,
                user_id: u.id,
                prefix: "abc".into(),
                hash: [3; 32],
                reusable: false,
                ephemeral: false,
                used: false,
                expiration_ms: None,
                created_ms: 1,
                tags: vec![],
            };
            let kid = s.insert_preauth_key(&key).expect("key");
            let mut n = sample_node(u.id, 1, Some(kid));
            n.id = s.register_node(&n).expect("node");
            n
        };
        let s = SqliteStore::open(&path, true).expect("reopen");
        assert_eq!(
            s.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        assert_eq!(s.nodes().expect("nodes"), vec![node]);
        assert!(s.preauth_key("abc").expect("get").expect("exists").used);
    }

    #[test]
    fn the_policy_is_stored_replaced_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            let mut s = SqliteStore::open(&path, true).expect("open");
            assert_eq!(s.policy().expect("read"), None, "a new database has none");
            s.set_policy(Some("{ // first\n}"), 10).expect("store");
            s.set_policy(Some("{\"acls\": []}"), 20).expect("replace");
        }
        let mut s = SqliteStore::open(&path, true).expect("reopen");
        assert_eq!(
            s.policy().expect("read"),
            Some(StoredPolicy {
                text: "{\"acls\": []}".into(),
                updated_ms: 20
            })
        );
        s.set_policy(None, 30).expect("remove");
        assert_eq!(s.policy().expect("read"), None);
    }

    #[test]
    fn a_version_3_node_gains_empty_routes_and_routes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            let mut conn = Connection::open(&path).expect("open");
            for (i, sql) in MIGRATIONS[..3].iter().enumerate() {
                let tx = conn.transaction().expect("tx");
                tx.execute_batch(sql).expect("migrate");
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .expect("version");
                tx.commit().expect("commit");
            }
            conn.execute_batch(
                "INSERT INTO users (name, created_ms) VALUES ('alice', 1);
                 INSERT INTO nodes (node_key, disco_key, hostname, given_name, user_id, ipv4,
                                    ipv6, created_ms, ephemeral)
                 VALUES ('nodekey:0000000000000000000000000000000000000000000000000000000000000001',
                         'discokey:0000000000000000000000000000000000000000000000000000000000000001',
                         'r', 'r', 1, '100.64.0.1', 'fd7a:115c:a1e0::1', 1, 0);",
            )
            .expect("node");
        }
        let mut s = SqliteStore::open(&path, true).expect("migrates");
        let mut n = s.nodes().expect("nodes").remove(0);
        assert!(n.advertised_routes.is_empty() && n.approved_routes.is_empty());
        n.advertised_routes = vec![
            "10.20.0.0/24".parse().expect("p"),
            "0.0.0.0/0".parse().expect("p"),
        ];
        n.approved_routes = vec!["10.20.0.0/24".parse().expect("p")];
        s.update_node(&n).expect("update");
        drop(s);
        let s = SqliteStore::open(&path, true).expect("reopen");
        assert_eq!(s.nodes().expect("nodes"), vec![n]);
    }

    #[test]
    fn a_version_2_database_gains_the_policy_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            // A database as the previous release left it: the first two migrations only.
            let mut conn = Connection::open(&path).expect("open");
            for (i, sql) in MIGRATIONS[..2].iter().enumerate() {
                let tx = conn.transaction().expect("tx");
                tx.execute_batch(sql).expect("migrate");
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .expect("version");
                tx.commit().expect("commit");
            }
            conn.execute(
                "INSERT INTO users (name, created_ms) VALUES ('alice', 1)",
                [],
            )
            .expect("user");
        }
        let mut s = SqliteStore::open(&path, true).expect("migrates");
        assert_eq!(
            s.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        assert_eq!(s.users().expect("users").len(), 1, "data kept");
        assert_eq!(s.policy().expect("read"), None);
        s.set_policy(Some("{}"), 5).expect("store");
    }

    #[test]
    fn conflicts_are_typed_and_atomic() {
        let mut s = SqliteStore::in_memory().expect("open");
        let u = s.create_user("bob", 1).expect("user");
        assert!(matches!(
            s.create_user("bob", 2),
            Err(StoreError::Conflict { what: "user" })
        ));
        let n = sample_node(u.id, 2, None);
        s.register_node(&n).expect("first");
        let mut dup = sample_node(u.id, 2, None);
        dup.given_name = "other".into();
        dup.ipv6 = "fd7a:115c:a1e0::99".parse().expect("v6");
        assert!(matches!(
            s.register_node(&dup),
            Err(StoreError::Conflict { what: "node" })
        ));
        assert_eq!(s.nodes().expect("nodes").len(), 1);
    }
}
