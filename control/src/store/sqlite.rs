//! The SQLite backend: one file (WAL journal) and one connection, for a single server. The
//! queries, migrations and change log are the shared ones in [`super::sql`].

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode};

use super::StoreError;
use super::sql::{Backend, DbError, Dialect, Row, SqlStore, Tx, Value};

/// SQLite: one connection, used by one process.
#[derive(Debug)]
pub struct SqliteBackend {
    conn: Mutex<Connection>,
}

/// The store on SQLite.
pub type SqliteStore = SqlStore<SqliteBackend>;

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Text(f.to_string()),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn db_error(e: rusqlite::Error) -> DbError {
    if let rusqlite::Error::SqliteFailure(f, message) = &e
        && f.code == ErrorCode::ConstraintViolation
    {
        let message = message.clone().unwrap_or_default();
        // SQLITE_CONSTRAINT_FOREIGNKEY
        if f.extended_code == 787 {
            return DbError::ForeignKey;
        }
        // "UNIQUE constraint failed: nodes.ipv4"
        if let Some(column) = message.strip_prefix("UNIQUE constraint failed: ") {
            return DbError::Unique(column.split(',').next().unwrap_or("").trim().to_owned());
        }
        return DbError::Unique(String::new());
    }
    DbError::Other(format!("sqlite: {e}"))
}

/// SQLite spells parameters `?1`; the shared queries write `$1`.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let mut st = self.0.prepare_cached(&sqlite_sql(sql)).map_err(db_error)?;
        let n = st
            .execute(rusqlite::params_from_iter(args))
            .map_err(db_error)?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut st = self.0.prepare_cached(&sqlite_sql(sql)).map_err(db_error)?;
        let columns = st.column_count();
        let mut rows = st
            .query(rusqlite::params_from_iter(args))
            .map_err(db_error)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(db_error)? {
            let mut row = Vec::with_capacity(columns);
            for i in 0..columns {
                row.push(value(r.get_ref(i).map_err(db_error)?));
            }
            out.push(row);
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        self.0.execute_batch(sql).map_err(db_error)
    }
}

impl Backend for SqliteBackend {
    const NAME: &'static str = "sqlite";
    const DIALECT: Dialect = Dialect::Sqlite;

    fn shared(&self) -> bool {
        false
    }

    fn transaction(
        &self,
        work: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let other = |e: rusqlite::Error| StoreError::Backend {
            message: format!("sqlite: {e}"),
        };
        let tx = conn.transaction().map_err(other)?;
        work(&mut SqliteTx(&tx))?;
        tx.commit().map_err(other)
    }

    fn schema_version(&self, tx: &mut dyn Tx) -> Result<i64, DbError> {
        let rows = tx.query("PRAGMA user_version", &[])?;
        match rows.first().and_then(|r| r.first()) {
            Some(Value::Int(v)) => Ok(*v),
            _ => Ok(0),
        }
    }

    fn set_schema_version(&self, tx: &mut dyn Tx, version: i64) -> Result<(), DbError> {
        tx.batch(&format!("PRAGMA user_version = {version}"))
    }

    fn notify(&self, _: &mut dyn Tx, _: u64) -> Result<(), DbError> {
        // Nobody else reads this database: the writer applies its own commits.
        Ok(())
    }
}

impl SqlStore<SqliteBackend> {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path, wal: bool) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory shows up as SQLite's own "unable to open" error below.
            let _ = std::fs::create_dir_all(dir);
        }
        Self::sqlite(Connection::open(path), wal)
    }

    /// A private in-memory database, for tests and benchmarks.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::sqlite(Connection::open_in_memory(), false)
    }

    fn sqlite(conn: rusqlite::Result<Connection>, wal: bool) -> Result<Self, StoreError> {
        let other = |e: rusqlite::Error| StoreError::Backend {
            message: format!("sqlite: {e}"),
        };
        let conn = conn.map_err(other)?;
        if wal {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(other)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(other)?;
        }
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(other)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(other)?;
        conn.set_prepared_statement_cache_capacity(64);
        Self::new(SqliteBackend {
            conn: Mutex::new(conn),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::MIGRATIONS;
    use crate::store::{ChangeKind, NodeRecord, PreAuthKeyRecord, Store, StoredPolicy};
    use warren_proto::{DiscoSecretKey, NodeSecretKey};

    /// The first `n` migrations, as an older release left the database.
    fn older(path: &Path, n: usize) -> Connection {
        let mut conn = Connection::open(path).expect("open");
        for (i, sql) in MIGRATIONS[..n].iter().enumerate() {
            let tx = conn.transaction().expect("tx");
            tx.execute_batch(&Dialect::Sqlite.schema(sql))
                .expect("migrate");
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .expect("version");
            tx.commit().expect("commit");
        }
        conn
    }

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
            let s = SqliteStore::open(&path, true).expect("open");
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
            (n.id, n.version) = s.register_node(&n).expect("node");
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
            let s = SqliteStore::open(&path, true).expect("open");
            assert_eq!(s.policy().expect("read"), None, "a new database has none");
            s.set_policy(Some("{ // first\n}"), 1, 10).expect("store");
            s.set_policy(Some("{\"acls\": []}"), 2, 20)
                .expect("replace");
        }
        let s = SqliteStore::open(&path, true).expect("reopen");
        assert_eq!(
            s.policy().expect("read"),
            Some(StoredPolicy {
                text: "{\"acls\": []}".into(),
                updated_ms: 20
            })
        );
        s.set_policy(None, 0, 30).expect("remove");
        assert_eq!(s.policy().expect("read"), None);
    }

    #[test]
    fn a_version_3_node_gains_empty_routes_and_routes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            let conn = older(&path, 3);
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
        let s = SqliteStore::open(&path, true).expect("migrates");
        let mut n = s.nodes().expect("nodes").remove(0);
        assert!(n.advertised_routes.is_empty() && n.approved_routes.is_empty());
        n.advertised_routes = vec![
            "10.20.0.0/24".parse().expect("p"),
            "0.0.0.0/0".parse().expect("p"),
        ];
        n.approved_routes = vec!["10.20.0.0/24".parse().expect("p")];
        n.version = s
            .update_node(&n, ChangeKind::Record, false)
            .expect("update");
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
            let conn = older(&path, 2);
            conn.execute(
                "INSERT INTO users (name, created_ms) VALUES ('alice', 1)",
                [],
            )
            .expect("user");
        }
        let s = SqliteStore::open(&path, true).expect("migrates");
        assert_eq!(
            s.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        assert_eq!(s.users().expect("users").len(), 1, "data kept");
        assert_eq!(s.policy().expect("read"), None);
        s.set_policy(Some("{}"), 1, 5).expect("store");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        drop(SqliteStore::open(&path, true).expect("create"));
        let conn = Connection::open(&path).expect("open");
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .expect("from the future");
        drop(conn);
        let err = SqliteStore::open(&path, true).expect_err("too new");
        assert_eq!(
            err.to_string(),
            format!(
                "database schema version {} is newer than this binary's {}",
                MIGRATIONS.len() + 1,
                MIGRATIONS.len()
            )
        );
    }

    #[test]
    fn a_version_5_database_keeps_counting_above_its_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            let conn = older(&path, 5);
            conn.execute_batch(
                "INSERT INTO map_meta (key, value) VALUES ('map_id', 77), ('lease', 16777316);",
            )
            .expect("meta");
        }
        let s = SqliteStore::open(&path, true).expect("migrates");
        let state = s.map_state().expect("state");
        assert_eq!((state.map_id, state.version), (77, 16_777_316));
    }
}
