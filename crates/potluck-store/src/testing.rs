//! Test support: a fresh, empty database per test on either engine, so that one
//! conformance suite runs every store test on SQLite and on PostgreSQL (and the hub's
//! tests on PostgreSQL when asked).
//!
//! PostgreSQL comes from [`TEST_DATABASE_URL`]: a URL to a server where the user may
//! `CREATE DATABASE` (`scripts/pg-test-cluster start` prints one for a throwaway local
//! cluster; `scripts/test` starts it and exports the URL). Each test gets its own
//! database, created from the server's default template and dropped when the test's
//! [`TestDb`] is dropped. Without the URL the PostgreSQL half fails when `CI` is `true`
//! (it must not pass by skipping), and elsewhere skips with a message.

use std::path::PathBuf;

use rand::RngCore;
use sqlx::{Connection, Executor};

use crate::engine::Engine;
use crate::store::Store;

/// The environment variable naming the PostgreSQL server for tests.
pub const TEST_DATABASE_URL: &str = "POTLUCK_TEST_DATABASE_URL";

/// A fresh database for one test; removed on drop.
#[derive(Debug)]
pub struct TestDb {
    engine: Engine,
    url: String,
    /// SQLite: the directory holding the file. PostgreSQL: the server URL and the name of
    /// the database to drop.
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    Dir(PathBuf),
    Database { server: String, name: String },
}

fn random_hex() -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// `url` with its database name replaced by `db` (query parameters kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    match query {
        Some(q) => format!("{}/{db}?{q}", &base[..path]),
        None => format!("{}/{db}", &base[..path]),
    }
}

/// The PostgreSQL server for tests, if configured. Panics in CI when it is not.
pub fn postgres_server() -> Option<String> {
    match std::env::var(TEST_DATABASE_URL) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{TEST_DATABASE_URL} is not set: the PostgreSQL half of the conformance suite \
                 cannot run (scripts/test starts a cluster; or run scripts/pg-test-cluster start)"
            );
            eprintln!(
                "skipping the PostgreSQL half: {TEST_DATABASE_URL} is not set \
                 (export {TEST_DATABASE_URL}=$(scripts/pg-test-cluster start))"
            );
            None
        }
    }
}

impl TestDb {
    /// A fresh SQLite file in a new temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = std::env::temp_dir().join(format!("potluck-test-{}", random_hex()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        let url = match crate::engine::sqlite_url(&dir.join("hub.db")) {
            Ok(u) => u,
            Err(e) => panic!("{e:?}"),
        };
        TestDb {
            engine: Engine::Sqlite,
            url,
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A fresh PostgreSQL database, or `None` (skip) when no server is configured.
    pub async fn postgres() -> Option<TestDb> {
        let server = postgres_server()?;
        let name = format!("potluck_t_{}", random_hex());
        let mut conn = match sqlx::PgConnection::connect(&server).await {
            Ok(c) => c,
            Err(e) => panic!("cannot reach the test PostgreSQL server ({TEST_DATABASE_URL}): {e}"),
        };
        if let Err(e) = conn.execute(&*format!("CREATE DATABASE {name}")).await {
            panic!("cannot create a test database: {e}");
        }
        let _ = conn.close().await;
        Some(TestDb {
            engine: Engine::Postgres,
            url: with_database(&server, &name),
            cleanup: Cleanup::Database { server, name },
        })
    }

    /// A fresh database on `engine` (`None`: PostgreSQL is not configured; see
    /// [`postgres_server`]).
    pub async fn new(engine: Engine) -> Option<TestDb> {
        match engine {
            Engine::Sqlite => Some(TestDb::sqlite()),
            Engine::Postgres => TestDb::postgres().await,
        }
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The database's URL (another store, or another hub, may open it too).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The SQLite directory (its files are the whole database), if SQLite.
    pub fn dir(&self) -> Option<&std::path::Path> {
        match &self.cleanup {
            Cleanup::Dir(d) => Some(d),
            Cleanup::Database { .. } => None,
        }
    }

    /// Everything the database holds, as bytes to search: SQLite's files (close the
    /// stores first, so the log is checkpointed), or on PostgreSQL every row of every
    /// table as text (a privacy test looks for what must never be stored).
    pub async fn contents(&self) -> Vec<u8> {
        match &self.cleanup {
            Cleanup::Dir(d) => {
                let mut all = Vec::new();
                for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                    if let Ok(b) = std::fs::read(e.path()) {
                        all.extend(b);
                    }
                }
                all
            }
            Cleanup::Database { .. } => postgres_rows(&self.url).await,
        }
    }

    /// Open (and migrate) a store on this database. Panics on failure: tests only.
    pub async fn open(&self) -> Store {
        match Store::open_url(&self.url).await {
            Ok(s) => s,
            Err(e) => panic!("cannot open the test database {}: {e:?}", self.url),
        }
    }
}

/// Every row of every table of the database at `url`, as text.
async fn postgres_rows(url: &str) -> Vec<u8> {
    let mut conn = match sqlx::PgConnection::connect(url).await {
        Ok(c) => c,
        Err(e) => panic!("cannot reach the test database: {e}"),
    };
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    assert!(!tables.is_empty(), "the test database has no tables");
    let mut all = Vec::new();
    for t in tables {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT CAST(t AS TEXT) FROM \"{t}\" t"))
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("reading {t}: {e}"));
        for r in rows {
            all.extend(r.into_bytes());
            all.push(b'\n');
        }
    }
    let _ = conn.close().await;
    all
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Dir(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            Cleanup::Database { server, name } => {
                // On a thread of its own: the test's runtime may be the one running this.
                let (server, sql) = (
                    server.clone(),
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                );
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    if let Ok(rt) = rt {
                        rt.block_on(async {
                            if let Ok(mut c) = sqlx::PgConnection::connect(&server).await {
                                let _ = c.execute(&*sql).await;
                                let _ = c.close().await;
                            }
                        });
                    }
                })
                .join();
            }
        }
    }
}

/// Run the test body once per engine: `conformance!(name, |db| { ... })` makes the
/// tests `name::sqlite` and `name::postgres`, each with `db` a fresh [`TestDb`].
#[macro_export]
macro_rules! conformance {
    ($name:ident, |$db:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test]
            async fn sqlite() {
                let $db = $crate::testing::TestDb::sqlite();
                $body
            }
            #[tokio::test]
            async fn postgres() {
                let Some($db) = $crate::testing::TestDb::postgres().await else {
                    return;
                };
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(
            with_database("postgres://u@localhost:5/postgres?host=/tmp/s", "x"),
            "postgres://u@localhost:5/x?host=/tmp/s"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
        assert_eq!(
            with_database("postgres://u:p@h:1/db", "x"),
            "postgres://u:p@h:1/x"
        );
    }
}
