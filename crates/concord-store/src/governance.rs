//! Storage for governance: API keys (only a hash of each secret) and the audit log, an
//! append-only sequence whose rows each carry the hash of the row before (the hashing is the
//! governance crate's; the store keeps the order and appends atomically, so two nodes writing
//! one PostgreSQL still build one chain).

use sqlx::{Connection, Row};

use crate::{Backend, Store, StoreError};

/// One API key as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub principal: String,
    pub roles: Vec<String>,
    /// Hex SHA-256 of the secret part.
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

/// An audit entry before it has its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditDraft {
    pub at_ms: u64,
    pub kind: String,
    pub principal: String,
    /// JSON text.
    pub data: String,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    pub principal: String,
    pub data: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash every chain starts from.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn roles_text(roles: &[String]) -> String {
    serde_json::to_string(roles).unwrap_or_else(|_| "[]".into())
}

fn key_of(row: (String, String, String, String, i64, Option<i64>)) -> ApiKeyRecord {
    ApiKeyRecord {
        id: row.0,
        principal: row.1,
        roles: serde_json::from_str(&row.2).unwrap_or_default(),
        secret_sha256: row.3,
        created_at_ms: row.4 as u64,
        revoked_at_ms: row.5.map(|v| v as u64),
    }
}

impl Store {
    pub async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        macro_rules! insert {
            ($sql:expr, $pool:expr) => {
                sqlx::query($sql)
                    .bind(&key.id)
                    .bind(&key.principal)
                    .bind(roles_text(&key.roles))
                    .bind(&key.secret_sha256)
                    .bind(key.created_at_ms as i64)
                    .execute($pool)
                    .await?
                    .rows_affected()
            };
        }
        match &self.backend {
            Backend::Sqlite(pool) => insert!(
                "INSERT INTO api_keys (id, principal, roles, secret_sha256, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                pool
            ),
            Backend::Postgres(pool) => insert!(
                "INSERT INTO api_keys (id, principal, roles, secret_sha256, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
                pool
            ),
        };
        Ok(())
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        const COLUMNS: &str = "SELECT id, principal, roles, secret_sha256, created_at_ms, revoked_at_ms FROM api_keys";
        let row: Option<(String, String, String, String, i64, Option<i64>)> = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query_as(&format!("{COLUMNS} WHERE id = ?"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_as(&format!("{COLUMNS} WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
            }
        };
        Ok(row.map(key_of))
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        const SQL: &str = "SELECT id, principal, roles, secret_sha256, created_at_ms, revoked_at_ms FROM api_keys ORDER BY created_at_ms, id";
        let rows: Vec<(String, String, String, String, i64, Option<i64>)> = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query_as(SQL).fetch_all(pool).await?,
            Backend::Postgres(pool) => sqlx::query_as(SQL).fetch_all(pool).await?,
        };
        Ok(rows.into_iter().map(key_of).collect())
    }

    /// Marks a key revoked; false when no unrevoked key has that id.
    pub async fn revoke_api_key(&self, id: &str, at_ms: u64) -> Result<bool, StoreError> {
        let done = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(
                "UPDATE api_keys SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL",
            )
            .bind(at_ms as i64)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
            Backend::Postgres(pool) => sqlx::query(
                "UPDATE api_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
            )
            .bind(at_ms as i64)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(done == 1)
    }

    /// Appends `drafts` in order, each linked to the one before by `link(prev_hash, seq,
    /// draft) -> hash`, in one transaction that also reads the chain's current end.
    pub async fn append_audit(
        &self,
        drafts: &[AuditDraft],
        link: impl Fn(&str, u64, &AuditDraft) -> String,
    ) -> Result<Vec<AuditRow>, StoreError> {
        if drafts.is_empty() {
            return Ok(Vec::new());
        }
        match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
                let last: Option<(i64, String)> =
                    sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                        .fetch_optional(&mut *tx)
                        .await?;
                let rows = chain(drafts, last, &link);
                // One statement for the whole batch (its rows as a JSON array).
                let batch: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!([
                            r.seq,
                            r.at_ms,
                            r.kind,
                            r.principal,
                            r.data,
                            r.prev_hash,
                            r.hash
                        ])
                    })
                    .collect();
                sqlx::query(
                    "INSERT INTO audit_log (seq, at_ms, kind, principal, data, prev_hash, hash) \
                     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6 \
                     FROM json_each(?)",
                )
                .bind(serde_json::Value::Array(batch).to_string())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(rows)
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // One chain across every node: appends take turns.
                sqlx::query("SELECT pg_advisory_xact_lock(7412)")
                    .execute(&mut *tx)
                    .await?;
                let last: Option<(i64, String)> =
                    sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                        .fetch_optional(&mut *tx)
                        .await?;
                let rows = chain(drafts, last, &link);
                sqlx::query(
                    "INSERT INTO audit_log (seq, at_ms, kind, principal, data, prev_hash, hash) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])",
                )
                .bind(rows.iter().map(|r| r.seq as i64).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.at_ms as i64).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.principal.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.data.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.prev_hash.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.hash.as_str()).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(rows)
            }
        }
    }

    /// Audit rows with `seq > after`, oldest first, at most `limit`.
    pub async fn audit_rows(&self, after: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let rows = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query(
                    "SELECT seq, at_ms, kind, principal, data, prev_hash, hash FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
                )
                .bind(after as i64)
                .bind(limit as i64)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| audit_row(&r))
                .collect::<Result<Vec<_>, _>>()?
            }
            Backend::Postgres(pool) => {
                sqlx::query(
                    "SELECT seq, at_ms, kind, principal, data, prev_hash, hash FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after as i64)
                .bind(limit as i64)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| audit_row(&r))
                .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(rows)
    }
}

fn audit_row<R>(row: &R) -> Result<AuditRow, StoreError>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AuditRow {
        seq: row.try_get::<i64, _>(0)? as u64,
        at_ms: row.try_get::<i64, _>(1)? as u64,
        kind: row.try_get(2)?,
        principal: row.try_get(3)?,
        data: row.try_get(4)?,
        prev_hash: row.try_get(5)?,
        hash: row.try_get(6)?,
    })
}

fn chain(
    drafts: &[AuditDraft],
    last: Option<(i64, String)>,
    link: &impl Fn(&str, u64, &AuditDraft) -> String,
) -> Vec<AuditRow> {
    let (mut seq, mut prev) = match last {
        Some((seq, hash)) => (seq as u64, hash),
        None => (0, GENESIS_HASH.to_string()),
    };
    let mut rows = Vec::with_capacity(drafts.len());
    for draft in drafts {
        seq += 1;
        let hash = link(&prev, seq, draft);
        rows.push(AuditRow {
            seq,
            at_ms: draft.at_ms,
            kind: draft.kind.clone(),
            principal: draft.principal.clone(),
            data: draft.data.clone(),
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
        });
    }
    rows
}
