//! The PostgreSQL backend: several control instances on one database. A small pool of
//! connections serves the store (each call one transaction, on a blocking thread); one more
//! connection per instance LISTENs for the change log's NOTIFY ([`listen_for_changes`]).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};

use super::StoreError;
use super::sql::{Backend, DbError, Dialect, Row, SqlStore, Tx, Value};

/// The channel the change log's notifications go out on.
const CHANNEL: &str = "warren_changes";
/// How long a store call waits for a free connection.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// An advisory lock key: one migration at a time across instances.
const MIGRATION_LOCK: i64 = 0x7761_7272_656e_0001;

/// Where the database is and how many connections to open (Headscale's
/// `database.postgres.*` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// Host name, address, or a directory holding the server's unix socket.
    pub host: String,
    /// Port (also names the unix socket).
    pub port: u16,
    /// Database name.
    pub name: String,
    /// User.
    pub user: String,
    /// Password (empty: none).
    pub pass: String,
    /// Most connections the store opens.
    pub max_open_conns: usize,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl PgOptions {
    fn config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .dbname(&self.name)
            .user(&self.user)
            .application_name("warren-control")
            .connect_timeout(self.connect_timeout);
        if !self.pass.is_empty() {
            c.password(&self.pass);
        }
        c
    }
}

struct PgConn {
    client: Client,
    statements: HashMap<String, Statement>,
}

#[derive(Default)]
struct Pool {
    idle: Vec<PgConn>,
    open: usize,
}

/// PostgreSQL: a pool of connections shared with other processes' instances.
pub struct PgBackend {
    options: PgOptions,
    pool: Mutex<Pool>,
    freed: Condvar,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        // A client closes its connection in its own runtime, which must not run on an async
        // thread: the pool may be dropped on one when the server stops.
        let idle = std::mem::take(&mut self.pool.get_mut().unwrap_or_else(|e| e.into_inner()).idle);
        std::thread::scope(|s| {
            s.spawn(move || drop(idle));
        });
    }
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("host", &self.options.host)
            .field("name", &self.options.name)
            .finish()
    }
}

/// The store on PostgreSQL.
pub type PgStore = SqlStore<PgBackend>;

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Text(t) => t.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn db_error(e: postgres::Error) -> DbError {
    use postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            // "nodes_ipv4_key" on table "nodes": nodes.ipv4
            let table = db.table().unwrap_or("");
            let column = db
                .constraint()
                .and_then(|c| c.strip_prefix(table))
                .and_then(|c| c.strip_prefix('_'))
                .map(|c| c.strip_suffix("_key").unwrap_or(c))
                .unwrap_or("");
            return DbError::Unique(format!("{table}.{column}"));
        }
        if *db.code() == SqlState::FOREIGN_KEY_VIOLATION {
            return DbError::ForeignKey;
        }
        return DbError::Other(format!("postgres: {}", db.message()));
    }
    DbError::Other(format!("postgres: {e}"))
}

fn cell(row: &postgres::Row, i: usize) -> Result<Value, DbError> {
    let bad = |e: postgres::Error| DbError::Other(format!("postgres: column {i}: {e}"));
    let ty = row.columns()[i].type_();
    Ok(match *ty {
        Type::VOID => Value::Null,
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(bad)?.into(),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(bad)?
            .map(i64::from)
            .into(),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(bad)?
            .map(i64::from)
            .into(),
        Type::BOOL => row.try_get::<_, Option<bool>>(i).map_err(bad)?.into(),
        Type::BYTEA => match row.try_get::<_, Option<Vec<u8>>>(i).map_err(bad)? {
            Some(b) => Value::Blob(b),
            None => Value::Null,
        },
        _ => row.try_get::<_, Option<String>>(i).map_err(bad)?.into(),
    })
}

struct PgTx<'a, 'b> {
    tx: &'a mut postgres::Transaction<'b>,
    statements: &'a mut HashMap<String, Statement>,
}

impl PgTx<'_, '_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        let st = self.tx.prepare(sql).map_err(db_error)?;
        self.statements.insert(sql.to_owned(), st.clone());
        Ok(st)
    }
}

fn params(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_, '_> {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let st = self.statement(sql)?;
        self.tx.execute(&st, &params(args)).map_err(db_error)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        let st = self.statement(sql)?;
        let rows = self.tx.query(&st, &params(args)).map_err(db_error)?;
        rows.iter()
            .map(|r| (0..r.len()).map(|i| cell(r, i)).collect())
            .collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        self.tx.batch_execute(sql).map_err(db_error)
    }
}

impl PgBackend {
    fn connect(&self) -> Result<PgConn, StoreError> {
        let config: postgres::Config = self.options.config().into();
        let client = config.connect(NoTls).map_err(|e| StoreError::Backend {
            message: format!(
                "postgres: cannot connect to {}:{} as {}: {}",
                self.options.host,
                self.options.port,
                self.options.user,
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned())
            ),
        })?;
        Ok(PgConn {
            client,
            statements: HashMap::new(),
        })
    }

    fn take(&self) -> Result<PgConn, StoreError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(conn) = pool.idle.pop() {
                if !conn.client.is_closed() {
                    return Ok(conn);
                }
                pool.open -= 1;
                continue;
            }
            if pool.open < self.options.max_open_conns.max(1) {
                pool.open += 1;
                drop(pool);
                return self.connect().inspect_err(|_| {
                    self.pool.lock().unwrap_or_else(|e| e.into_inner()).open -= 1;
                });
            }
            let (p, waited) = self
                .freed
                .wait_timeout(pool, POOL_WAIT)
                .unwrap_or_else(|e| e.into_inner());
            pool = p;
            if waited.timed_out() && pool.idle.is_empty() {
                return Err(StoreError::Backend {
                    message: format!(
                        "postgres: no free connection within {POOL_WAIT:?} (max_open_conns = {})",
                        self.options.max_open_conns
                    ),
                });
            }
        }
    }

    fn give_back(&self, conn: PgConn) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if conn.client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(conn);
        }
        self.freed.notify_one();
    }
}

impl PgBackend {
    fn run(
        &self,
        work: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut conn = self.take()?;
        let PgConn { client, statements } = &mut conn;
        let other = |e: postgres::Error| StoreError::Backend {
            message: format!("postgres: {e}"),
        };
        let result = client.transaction().map_err(other).and_then(|mut tx| {
            work(&mut PgTx {
                tx: &mut tx,
                statements,
            })?;
            tx.commit().map_err(other)
        });
        self.give_back(conn);
        result
    }
}

impl Backend for PgBackend {
    const NAME: &'static str = "postgres";
    const DIALECT: Dialect = Dialect::Postgres;

    fn shared(&self) -> bool {
        true
    }

    fn transaction(
        &self,
        work: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // Store calls belong on blocking threads (`Shared::with_core`); one made on an async
        // worker by mistake blocks it instead of panicking in the client's own runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.run(work))
            }
            _ => self.run(work),
        }
    }

    fn schema_version(&self, tx: &mut dyn Tx) -> Result<i64, DbError> {
        // Two instances starting together migrate one after the other.
        tx.query(
            "SELECT pg_advisory_xact_lock($1)",
            &[Value::Int(MIGRATION_LOCK)],
        )?;
        tx.batch(
            "CREATE TABLE IF NOT EXISTS warren_schema (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 version BIGINT NOT NULL)",
        )?;
        let rows = tx.query("SELECT version FROM warren_schema WHERE id = 1", &[])?;
        match rows.first().and_then(|r| r.first()) {
            Some(Value::Int(v)) => Ok(*v),
            _ => Ok(0),
        }
    }

    fn set_schema_version(&self, tx: &mut dyn Tx, version: i64) -> Result<(), DbError> {
        tx.execute(
            "INSERT INTO warren_schema (id, version) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            &[Value::Int(version)],
        )?;
        Ok(())
    }

    fn notify(&self, tx: &mut dyn Tx, version: u64) -> Result<(), DbError> {
        tx.query(
            "SELECT pg_notify($1, $2)",
            &[CHANNEL.into(), version.to_string().into()],
        )?;
        Ok(())
    }
}

impl SqlStore<PgBackend> {
    /// Connects to the database and migrates it.
    pub fn connect(options: PgOptions) -> Result<Self, StoreError> {
        Self::new(PgBackend {
            options,
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
        })
    }

    /// Where it connects.
    pub fn options(&self) -> &PgOptions {
        &self.backend_ref().options
    }
}

/// LISTENs for the change log's notifications and wakes `wake` for each (and once when
/// listening starts, since changes may have been missed before). Returns when the connection
/// fails; the caller connects again.
pub async fn listen_for_changes(
    options: &PgOptions,
    wake: &tokio::sync::Notify,
) -> Result<(), StoreError> {
    use tokio_postgres::AsyncMessage;
    let failed = |e: tokio_postgres::Error| StoreError::Backend {
        message: format!("postgres (listening for changes): {e}"),
    };
    let (client, mut conn) = options
        .config()
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(failed)?;
    let listen = client.batch_execute("LISTEN warren_changes");
    let mut listen = std::pin::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => {
                done.map_err(failed)?;
                listening = true;
                wake.notify_one();
            }
            message = std::future::poll_fn(|cx| conn.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(failed(e)),
                None => {
                    return Err(StoreError::Backend {
                        message: "postgres (listening for changes): connection closed".into(),
                    });
                }
            },
        }
    }
}
