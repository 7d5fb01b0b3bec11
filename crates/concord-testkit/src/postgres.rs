//! Throwaway PostgreSQL databases for tests: each test gets a database of its own on the server
//! named by `CONCORD_TEST_POSTGRES`, dropped when the guard goes out of scope, on success and on
//! panic alike, so a failing test leaves nothing behind on the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

/// The server the tests use when `CONCORD_TEST_POSTGRES` is unset: the local one.
pub const DEFAULT_TEST_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long connecting to the server may take before the test fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A database created for one test and dropped (`WITH (FORCE)`, so connections still open are
/// ended) when this is dropped, which unwinding from a panic does too. A server that cannot be
/// reached fails the test: tests never skip for want of PostgreSQL.
#[derive(Debug)]
pub struct PgTestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PgTestDatabase {
    /// The administrative URL tests connect to: `CONCORD_TEST_POSTGRES`, or the local server.
    pub fn admin_url() -> String {
        std::env::var("CONCORD_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_TEST_POSTGRES.into())
    }

    /// Creates a new, empty database whose name starts with `prefix` (lowercase ASCII letters,
    /// digits and `_`), unique across processes and calls. Panics when the server cannot be
    /// reached or refuses.
    pub async fn create(prefix: &str) -> PgTestDatabase {
        assert!(
            !prefix.is_empty()
                && prefix.len() <= 24
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "a test database prefix is 1 to 24 of [a-z0-9_], not {prefix:?}"
        );
        let admin_url = Self::admin_url();
        let name = unique_name(prefix);
        // The guard exists before the database does: whatever happens from here on, dropping
        // it removes the database if it was created.
        let database = PgTestDatabase {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        };
        let sql = format!("CREATE DATABASE \"{}\"", database.name);
        if let Err(error) = admin_execute(&database.admin_url, &sql).await {
            panic!(
                "PostgreSQL at {} (CONCORD_TEST_POSTGRES) is required by this test: {sql}: {error}",
                redact(&database.admin_url)
            );
        }
        database
    }

    /// The URL of this database (the admin URL with its database replaced, query kept).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgTestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the one unwinding: the database is
        // dropped from a thread of its own, with a runtime of its own, and waited for.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let outcome = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("no runtime: {e}"))?;
            runtime.block_on(admin_execute(&admin_url, &sql))
        })
        .join();
        let error = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(_) => "the thread dropping it panicked".to_string(),
        };
        let message = format!(
            "cannot drop the test database {} on {}: {error}",
            self.name,
            redact(&self.admin_url)
        );
        if std::thread::panicking() {
            // A second panic would abort the process and hide the first.
            eprintln!("{message}");
        } else {
            panic!("{message}");
        }
    }
}

/// Runs one statement outside any transaction (CREATE/DROP DATABASE cannot run in one) on a
/// connection of its own.
async fn admin_execute(admin_url: &str, sql: &str) -> Result<(), String> {
    let mut connection = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(admin_url))
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let result = sqlx::raw_sql(sql).execute(&mut connection).await;
    let _ = connection.close().await;
    result.map(drop).map_err(|e| e.to_string())
}

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database (the path) replaced by `database`, its query kept.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let head = base[authority..]
        .find('/')
        .map_or(base, |slash| &base[..authority + slash]);
    match query {
        Some(query) => format!("{head}/{database}?{query}"),
        None => format!("{head}/{database}"),
    }
}

/// Hides the password of a connection URL.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            match url[scheme_end + 3..at].split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced_and_its_query_kept() {
        for (url, expected) in [
            ("postgres://u@h:5432/test", "postgres://u@h:5432/db"),
            (
                "postgres://u@h:5432/test?sslmode=disable",
                "postgres://u@h:5432/db?sslmode=disable",
            ),
            ("postgres://u@h:5432", "postgres://u@h:5432/db"),
            ("postgres://u@h:5432/", "postgres://u@h:5432/db"),
            (
                "postgresql://h?sslmode=disable",
                "postgresql://h/db?sslmode=disable",
            ),
        ] {
            assert_eq!(with_database(url, "db"), expected, "{url}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
