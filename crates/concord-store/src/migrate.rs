//! Schema migrations: SQL embedded in the binary, applied in order when a store opens, each
//! applied version recorded in `concord_schema`. Every pending migration of one open runs in one
//! transaction, under a lock (SQLite: `BEGIN IMMEDIATE`, the file's write lock; PostgreSQL: a
//! transaction-scoped advisory lock), so nodes opening one database at once migrate it exactly
//! once, a failing migration leaves the database at the version it had, with nothing of the
//! failed run, and a database migrated by a newer binary is refused rather than used.

use sqlx::Connection;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

use crate::{Location, StoreError};

/// The SQLite schema migrations this binary knows, in order: migration N is `[N - 1]`.
pub const SQLITE_MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_state.sql"),
    include_str!("../migrations/sqlite/0002_leases.sql"),
    include_str!("../migrations/sqlite/0003_governance.sql"),
    include_str!("../migrations/sqlite/0004_registry.sql"),
    include_str!("../migrations/sqlite/0005_usage.sql"),
    include_str!("../migrations/sqlite/0006_conversations.sql"),
    include_str!("../migrations/sqlite/0007_registry_owners.sql"),
    include_str!("../migrations/sqlite/0008_idempotency.sql"),
];

/// The PostgreSQL schema migrations this binary knows, in order: migration N is `[N - 1]`.
pub const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_state.sql"),
    include_str!("../migrations/postgres/0002_leases.sql"),
    include_str!("../migrations/postgres/0003_governance.sql"),
    include_str!("../migrations/postgres/0004_registry.sql"),
    include_str!("../migrations/postgres/0005_usage.sql"),
    include_str!("../migrations/postgres/0006_conversations.sql"),
    include_str!("../migrations/postgres/0007_registry_owners.sql"),
    include_str!("../migrations/postgres/0008_idempotency.sql"),
];

/// The advisory lock PostgreSQL nodes migrate under (one key for the whole server: migrations
/// are rare and short, so databases sharing it cost nothing).
const POSTGRES_MIGRATION_LOCK: i64 = 7411;

/// Migrates the database at `location` (what [`crate::Store::open`] takes) with `migrations`
/// instead of the embedded ones, without opening a store, and returns its schema version.
/// [`crate::Store::open`] runs the same code with [`SQLITE_MIGRATIONS`] or
/// [`POSTGRES_MIGRATIONS`]; this entry exists so the runner itself can be tested (a database
/// left at an older version, a migration that fails).
pub async fn migrate(location: &str, migrations: &[&str]) -> Result<u32, StoreError> {
    match Location::parse(location) {
        Location::Sqlite(path) => {
            let (pool, _) = crate::connect_sqlite(path).await?;
            let migrated = migrate_sqlite(&pool, migrations).await;
            pool.close().await;
            migrated
        }
        Location::Postgres(url) => {
            let pool = crate::connect_postgres(url).await?;
            let migrated = migrate_postgres(&pool, migrations).await;
            pool.close().await;
            migrated
        }
    }
}

pub(crate) async fn migrate_sqlite(
    pool: &SqlitePool,
    migrations: &[&str],
) -> Result<u32, StoreError> {
    let mut conn = pool.acquire().await?;
    // IMMEDIATE takes the file's write lock before anything is read: a second opener waits
    // (busy timeout) and then finds the schema applied.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS concord_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let applied: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM concord_schema")
        .fetch_one(&mut *tx)
        .await?;
    let applied = known_version(applied, migrations)?;
    for (index, migration) in migrations.iter().enumerate().skip(applied as usize) {
        let version = index as u32 + 1;
        let failed = |source| StoreError::Migrate { version, source };
        sqlx::raw_sql(migration)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query("INSERT INTO concord_schema (version) VALUES (?)")
            .bind(version as i64)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
    }
    tx.commit().await?;
    Ok(migrated(applied, migrations))
}

pub(crate) async fn migrate_postgres(
    pool: &PgPool,
    migrations: &[&str],
) -> Result<u32, StoreError> {
    let mut tx = pool.begin().await?;
    // Nodes starting together must not migrate twice: the second waits here, and its reads
    // below (each statement sees what committed before it) find the schema applied.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(POSTGRES_MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS concord_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let applied: i32 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM concord_schema")
        .fetch_one(&mut *tx)
        .await?;
    let applied = known_version(applied.into(), migrations)?;
    for (index, migration) in migrations.iter().enumerate().skip(applied as usize) {
        let version = index as u32 + 1;
        let failed = |source| StoreError::Migrate { version, source };
        sqlx::raw_sql(migration)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query("INSERT INTO concord_schema (version) VALUES ($1)")
            .bind(version as i32)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
    }
    tx.commit().await?;
    Ok(migrated(applied, migrations))
}

/// The database's schema version, refused when this binary does not know it.
fn known_version(applied: i64, migrations: &[&str]) -> Result<u32, StoreError> {
    let known = migrations.len() as u32;
    let found = u32::try_from(applied)
        .map_err(|_| StoreError::Corrupt(format!("schema version {applied} in concord_schema")))?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    Ok(found)
}

/// The version after a successful run that started at `applied`.
fn migrated(applied: u32, migrations: &[&str]) -> u32 {
    let version = migrations.len() as u32;
    if version > applied {
        tracing::info!(from = applied, to = version, "schema migrated");
    }
    version
}
