//! Storage for the mesh registry: registrations survive a restart, and nodes sharing a
//! PostgreSQL see one catalog. The registration itself is opaque JSON here.

use crate::{Backend, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct RegistryRow {
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// The registration, as JSON text.
    pub body: String,
    pub health: String,
    pub registered_at_ms: u64,
    pub last_heartbeat_ms: u64,
}

type Raw = (String, String, String, String, String, i64, i64);

fn row_of(raw: Raw) -> RegistryRow {
    RegistryRow {
        id: raw.0,
        namespace: raw.1,
        name: raw.2,
        body: raw.3,
        health: raw.4,
        registered_at_ms: raw.5 as u64,
        last_heartbeat_ms: raw.6 as u64,
    }
}

const COLUMNS: &str = "id, namespace, name, body, health, registered_at_ms, last_heartbeat_ms";

impl Store {
    /// Registers (or re-registers, keeping the first registration time) an entity.
    pub async fn register(&self, row: &RegistryRow) -> Result<(), StoreError> {
        macro_rules! upsert {
            ($sql:expr, $pool:expr) => {
                sqlx::query($sql)
                    .bind(&row.id)
                    .bind(&row.namespace)
                    .bind(&row.name)
                    .bind(&row.body)
                    .bind(&row.health)
                    .bind(row.registered_at_ms as i64)
                    .bind(row.last_heartbeat_ms as i64)
                    .execute($pool)
                    .await?
                    .rows_affected()
            };
        }
        match &self.backend {
            Backend::Sqlite(pool) => upsert!(
                "INSERT INTO registry (id, namespace, name, body, health, registered_at_ms, last_heartbeat_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET namespace = excluded.namespace, \
                 name = excluded.name, body = excluded.body, health = excluded.health, last_heartbeat_ms = excluded.last_heartbeat_ms",
                pool
            ),
            Backend::Postgres(pool) => upsert!(
                "INSERT INTO registry (id, namespace, name, body, health, registered_at_ms, last_heartbeat_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET namespace = excluded.namespace, \
                 name = excluded.name, body = excluded.body, health = excluded.health, last_heartbeat_ms = excluded.last_heartbeat_ms",
                pool
            ),
        };
        Ok(())
    }

    /// Records a heartbeat; false when no entity has that id.
    pub async fn heartbeat(&self, id: &str, health: &str, at_ms: u64) -> Result<bool, StoreError> {
        let done = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query("UPDATE registry SET health = ?, last_heartbeat_ms = ? WHERE id = ?")
                    .bind(health)
                    .bind(at_ms as i64)
                    .bind(id)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Backend::Postgres(pool) => {
                sqlx::query("UPDATE registry SET health = $1, last_heartbeat_ms = $2 WHERE id = $3")
                    .bind(health)
                    .bind(at_ms as i64)
                    .bind(id)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(done == 1)
    }

    /// Records many heartbeats in one transaction: `(id, health, at_ms)`. Ids that no longer
    /// exist are skipped.
    pub async fn heartbeats(&self, beats: &[(String, String, u64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Sqlite(pool) => {
                let rows: Vec<serde_json::Value> = beats
                    .iter()
                    .map(|(id, health, at)| serde_json::json!([id, health, at]))
                    .collect();
                sqlx::query(
                    "UPDATE registry SET health = b.value ->> 1, last_heartbeat_ms = b.value ->> 2 \
                     FROM json_each(?) b WHERE registry.id = b.value ->> 0 \
                     AND registry.last_heartbeat_ms < b.value ->> 2",
                )
                .bind(serde_json::Value::Array(rows).to_string())
                .execute(pool)
                .await?;
            }
            Backend::Postgres(pool) => {
                sqlx::query(
                    "UPDATE registry r SET health = b.health, last_heartbeat_ms = b.at \
                     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS b(id, health, at) \
                     WHERE r.id = b.id AND r.last_heartbeat_ms < b.at",
                )
                .bind(beats.iter().map(|b| b.0.as_str()).collect::<Vec<_>>())
                .bind(beats.iter().map(|b| b.1.as_str()).collect::<Vec<_>>())
                .bind(beats.iter().map(|b| b.2 as i64).collect::<Vec<_>>())
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Removes an entity; false when there was none.
    pub async fn deregister(&self, id: &str) -> Result<bool, StoreError> {
        let done = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query("DELETE FROM registry WHERE id = ?")
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected(),
            Backend::Postgres(pool) => sqlx::query("DELETE FROM registry WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected(),
        };
        Ok(done == 1)
    }

    /// Every registered entity, by namespace and name.
    pub async fn registry(&self) -> Result<Vec<RegistryRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM registry ORDER BY namespace, name, id");
        let rows: Vec<Raw> = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query_as(&sql).fetch_all(pool).await?,
            Backend::Postgres(pool) => sqlx::query_as(&sql).fetch_all(pool).await?,
        };
        Ok(rows.into_iter().map(row_of).collect())
    }
}
