//! Storage for the mesh registry: registrations survive a restart, and nodes sharing a
//! PostgreSQL see one catalog. The registration itself is opaque JSON here.
//!
//! Names have owners. A row records the principal that registered it; `registry_names` holds
//! the claim of each (namespace, name): the principal that first registered it. Another
//! principal's registration of a claimed name is refused, and so are its heartbeats and
//! deregistrations of the owner's rows. A claim outlives the name's last row by a grace period
//! (see [`Store::prune_registry`]), so a redeploy or a crash does not hand the name to whoever
//! registers next. Rows written before names had owners carry [`LEGACY_OWNER`]: the first
//! principal to register or heartbeat such a name adopts it. Registrations and ownership
//! changes run one at a time (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped
//! advisory lock), so two principals racing for a name cannot both win, and a principal's
//! count of registrations cannot overshoot its cap.

use crate::{Backend, Store, StoreError};

/// The owner of rows written before names had owners: adopted by the first principal to
/// register or heartbeat the name.
pub const LEGACY_OWNER: &str = "";

/// The advisory lock PostgreSQL nodes take for registrations and ownership changes.
const POSTGRES_REGISTRY_LOCK: i64 = 7413;

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
    /// The principal that registered it.
    pub owner: String,
    /// Without a heartbeat for this long the entity is expired.
    pub ttl_ms: u64,
}

/// What changes often about a row, without its body: read every sync tick.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryHead {
    pub id: String,
    pub owner: String,
    /// Changes whenever the body does (a hash of it).
    pub etag: i64,
    pub health: String,
    pub last_heartbeat_ms: u64,
}

/// The outcome of [`Store::register_owned`].
#[derive(Debug, Clone, PartialEq)]
pub enum Registered {
    Done,
    /// The name (in its namespace) belongs to another principal.
    Owned {
        owner: String,
    },
    /// The principal already holds `limit` registrations (or name claims).
    Full {
        limit: usize,
    },
}

/// The outcome of a heartbeat or deregistration that names its principal.
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    Done,
    Missing,
    /// The row belongs to another principal.
    Other {
        owner: String,
    },
}

type Raw = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    i64,
);

fn row_of(raw: Raw) -> RegistryRow {
    RegistryRow {
        id: raw.0,
        namespace: raw.1,
        name: raw.2,
        body: raw.3,
        health: raw.4,
        registered_at_ms: raw.5 as u64,
        last_heartbeat_ms: raw.6 as u64,
        owner: raw.7,
        ttl_ms: raw.8 as u64,
    }
}

const COLUMNS: &str =
    "id, namespace, name, body, health, registered_at_ms, last_heartbeat_ms, owner, ttl_ms";

/// FNV-1a of the body: changes when the body does (not a security boundary).
fn etag(body: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// SQLite's `?` placeholders as PostgreSQL's `$1, $2, …` (the statements here hold no `?`
/// elsewhere).
fn pg(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite(sql: &str) -> String {
    sql.to_string()
}

const UPSERT: &str = "INSERT INTO registry (id, namespace, name, body, health, registered_at_ms, last_heartbeat_ms, owner, ttl_ms, etag) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET namespace = excluded.namespace, \
     name = excluded.name, body = excluded.body, health = excluded.health, \
     last_heartbeat_ms = excluded.last_heartbeat_ms, owner = excluded.owner, ttl_ms = excluded.ttl_ms, \
     etag = excluded.etag";

const CLAIM: &str = "INSERT INTO registry_names (namespace, name, owner, claimed_at_ms, touched_ms) \
     VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, name) DO UPDATE SET touched_ms = excluded.touched_ms";

/// Binds a row to [`UPSERT`]'s placeholders.
macro_rules! upsert {
    ($q:expr, $row:expr) => {
        sqlx::query($q)
            .bind(&$row.id)
            .bind(&$row.namespace)
            .bind(&$row.name)
            .bind(&$row.body)
            .bind(&$row.health)
            .bind($row.registered_at_ms as i64)
            .bind($row.last_heartbeat_ms as i64)
            .bind(&$row.owner)
            .bind($row.ttl_ms as i64)
            .bind(etag(&$row.body))
    };
}

/// The decision and writes of [`Store::register_owned`], inside the transaction `$tx`, with
/// `$q` turning a statement into the backend's dialect. Evaluates to `Registered`.
macro_rules! register_owned_in {
    ($tx:ident, $q:expr, $row:expr, $max:expr, $now:expr) => {{
        let q = $q;
        let row: &RegistryRow = $row;
        let max = $max as i64;
        let now = $now as i64;
        let claim: Option<String> = sqlx::query_scalar(&q(
            "SELECT owner FROM registry_names WHERE namespace = ? AND name = ?",
        ))
        .bind(&row.namespace)
        .bind(&row.name)
        .fetch_optional(&mut *$tx)
        .await?;
        let holder = match &claim {
            Some(owner) => Some(owner.clone()),
            // Unclaimed: rows of the name (declared in a config, say) still hold it.
            None => {
                sqlx::query_scalar(&q(
                    "SELECT owner FROM registry WHERE namespace = ? AND name = ? AND owner <> ? AND owner <> ? LIMIT 1",
                ))
                .bind(&row.namespace)
                .bind(&row.name)
                .bind(LEGACY_OWNER)
                .bind(&row.owner)
                .fetch_optional(&mut *$tx)
                .await?
            }
        };
        let existing: Option<String> =
            sqlx::query_scalar(&q("SELECT owner FROM registry WHERE id = ?"))
                .bind(&row.id)
                .fetch_optional(&mut *$tx)
                .await?;
        let mut full = false;
        if let Some(holder) = holder.filter(|h| *h != row.owner) {
            $tx.rollback().await?;
            return Ok(Registered::Owned { owner: holder });
        }
        if existing.as_deref() != Some(row.owner.as_str()) {
            let count = q("SELECT COUNT(*) FROM registry WHERE owner = ?");
            let mut held: i64 = sqlx::query_scalar(&count)
                .bind(&row.owner)
                .fetch_one(&mut *$tx)
                .await?;
            if held >= max {
                // The principal's own expired rows make room first.
                sqlx::query(&q(
                    "DELETE FROM registry WHERE owner = ? AND last_heartbeat_ms + ttl_ms < ?",
                ))
                .bind(&row.owner)
                .bind(now)
                .execute(&mut *$tx)
                .await?;
                held = sqlx::query_scalar(&count)
                    .bind(&row.owner)
                    .fetch_one(&mut *$tx)
                    .await?;
            }
            if held >= max {
                full = true;
            } else if claim.is_none() {
                let count = q("SELECT COUNT(*) FROM registry_names WHERE owner = ?");
                let mut names: i64 = sqlx::query_scalar(&count)
                    .bind(&row.owner)
                    .fetch_one(&mut *$tx)
                    .await?;
                if names >= max {
                    // A new name: the principal's claims without rows (names it left) go first.
                    sqlx::query(&q(
                        "DELETE FROM registry_names WHERE owner = ? AND NOT EXISTS (SELECT 1 FROM registry r \
                         WHERE r.namespace = registry_names.namespace AND r.name = registry_names.name)",
                    ))
                    .bind(&row.owner)
                    .execute(&mut *$tx)
                    .await?;
                    names = sqlx::query_scalar(&count)
                        .bind(&row.owner)
                        .fetch_one(&mut *$tx)
                        .await?;
                }
                full = names >= max;
            }
        }
        if !full {
            sqlx::query(&q(CLAIM))
                .bind(&row.namespace)
                .bind(&row.name)
                .bind(&row.owner)
                .bind(now)
                .bind(now)
                .execute(&mut *$tx)
                .await?;
            sqlx::query(&q(
                "UPDATE registry SET owner = ? WHERE namespace = ? AND name = ? AND owner = ?",
            ))
            .bind(&row.owner)
            .bind(&row.namespace)
            .bind(&row.name)
            .bind(LEGACY_OWNER)
            .execute(&mut *$tx)
            .await?;
            upsert!(&q(UPSERT), row).execute(&mut *$tx).await?;
        }
        $tx.commit().await?;
        if full {
            Registered::Full {
                limit: max as usize,
            }
        } else {
            Registered::Done
        }
    }};
}

/// A heartbeat by `$owner`, adopting a legacy row's name, inside `$tx`. Evaluates to `Owned`.
macro_rules! heartbeat_owned_in {
    ($tx:ident, $q:expr, $id:expr, $owner:expr, $health:expr, $at:expr) => {{
        let q = $q;
        let found: Option<(String, String, String)> = sqlx::query_as(&q(
            "SELECT owner, namespace, name FROM registry WHERE id = ?",
        ))
        .bind($id)
        .fetch_optional(&mut *$tx)
        .await?;
        let outcome = match found {
            None => Owned::Missing,
            Some((owner, _, _)) if owner == $owner => Owned::Done,
            Some((owner, namespace, name)) if owner == LEGACY_OWNER => {
                let claim: Option<String> = sqlx::query_scalar(&q(
                    "SELECT owner FROM registry_names WHERE namespace = ? AND name = ?",
                ))
                .bind(&namespace)
                .bind(&name)
                .fetch_optional(&mut *$tx)
                .await?;
                match claim {
                    Some(claimed) if claimed != $owner => Owned::Other { owner: claimed },
                    _ => {
                        sqlx::query(&q(CLAIM))
                            .bind(&namespace)
                            .bind(&name)
                            .bind($owner)
                            .bind($at as i64)
                            .bind($at as i64)
                            .execute(&mut *$tx)
                            .await?;
                        sqlx::query(&q(
                            "UPDATE registry SET owner = ? WHERE namespace = ? AND name = ? AND owner = ?",
                        ))
                        .bind($owner)
                        .bind(&namespace)
                        .bind(&name)
                        .bind(LEGACY_OWNER)
                        .execute(&mut *$tx)
                        .await?;
                        Owned::Done
                    }
                }
            }
            Some((owner, _, _)) => Owned::Other { owner },
        };
        if outcome == Owned::Done {
            sqlx::query(&q(
                "UPDATE registry SET health = ?, last_heartbeat_ms = ? WHERE id = ?",
            ))
            .bind($health)
            .bind($at as i64)
            .bind($id)
            .execute(&mut *$tx)
            .await?;
        }
        $tx.commit().await?;
        outcome
    }};
}

/// A deregistration by `$owner` inside `$tx`; the name's claim is touched, so it outlives the
/// row by the prune's grace period. Evaluates to `Owned`.
macro_rules! deregister_owned_in {
    ($tx:ident, $q:expr, $id:expr, $owner:expr, $now:expr) => {{
        let q = $q;
        let found: Option<(String, String, String)> = sqlx::query_as(&q(
            "SELECT owner, namespace, name FROM registry WHERE id = ?",
        ))
        .bind($id)
        .fetch_optional(&mut *$tx)
        .await?;
        let outcome = match found {
            None => Owned::Missing,
            Some((owner, namespace, name)) if owner == $owner || owner == LEGACY_OWNER => {
                sqlx::query(&q("DELETE FROM registry WHERE id = ?"))
                    .bind($id)
                    .execute(&mut *$tx)
                    .await?;
                sqlx::query(&q(
                    "UPDATE registry_names SET touched_ms = ? WHERE namespace = ? AND name = ?",
                ))
                .bind($now as i64)
                .bind(&namespace)
                .bind(&name)
                .execute(&mut *$tx)
                .await?;
                Owned::Done
            }
            Some((owner, _, _)) => Owned::Other { owner },
        };
        $tx.commit().await?;
        outcome
    }};
}

impl Store {
    /// Registers (or re-registers, keeping the first registration time) an entity without
    /// asking who owns its name: for entities the node declares itself.
    pub async fn register(&self, row: &RegistryRow) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => {
                upsert!(UPSERT, row).execute(pool).await?;
            }
            Backend::Postgres(pool) => {
                upsert!(&pg(UPSERT), row).execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Registers an entity for `row.owner`, if the name (in its namespace) is unclaimed or
    /// theirs, and a new row keeps them within `max_per_owner` rows and name claims (their own
    /// expired rows are deleted to make room). The first registration of a name claims it.
    pub async fn register_owned(
        &self,
        row: &RegistryRow,
        max_per_owner: usize,
        now_ms: u64,
    ) -> Result<Registered, StoreError> {
        use sqlx::Connection;
        Ok(match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
                register_owned_in!(tx, sqlite, row, max_per_owner, now_ms)
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(POSTGRES_REGISTRY_LOCK)
                    .execute(&mut *tx)
                    .await?;
                register_owned_in!(tx, pg, row, max_per_owner, now_ms)
            }
        })
    }

    /// Who holds the name (in its namespace), if anyone: its claim, else a row's owner other
    /// than the legacy one.
    pub async fn registry_name_owner(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT COALESCE(\
             (SELECT owner FROM registry_names WHERE namespace = ? AND name = ?), \
             (SELECT owner FROM registry WHERE namespace = ? AND name = ? AND owner <> ? LIMIT 1))";
        macro_rules! fetch {
            ($sql:expr, $pool:expr) => {
                sqlx::query_scalar::<_, Option<String>>($sql)
                    .bind(namespace)
                    .bind(name)
                    .bind(namespace)
                    .bind(name)
                    .bind(LEGACY_OWNER)
                    .fetch_one($pool)
                    .await?
            };
        }
        Ok(match &self.backend {
            Backend::Sqlite(pool) => fetch!(SQL, pool),
            Backend::Postgres(pool) => fetch!(&pg(SQL), pool),
        })
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

    /// Records a heartbeat of `owner`'s row: refused for another principal's row; a legacy
    /// row's name is adopted (unless another principal claimed it meanwhile).
    pub async fn heartbeat_owned(
        &self,
        id: &str,
        owner: &str,
        health: &str,
        at_ms: u64,
    ) -> Result<Owned, StoreError> {
        use sqlx::Connection;
        Ok(match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
                heartbeat_owned_in!(tx, sqlite, id, owner, health, at_ms)
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(POSTGRES_REGISTRY_LOCK)
                    .execute(&mut *tx)
                    .await?;
                heartbeat_owned_in!(tx, pg, id, owner, health, at_ms)
            }
        })
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

    /// Removes `owner`'s entity: refused for another principal's row. The name's claim stays
    /// (see [`Store::prune_registry`]).
    pub async fn deregister_owned(
        &self,
        id: &str,
        owner: &str,
        now_ms: u64,
    ) -> Result<Owned, StoreError> {
        use sqlx::Connection;
        Ok(match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
                deregister_owned_in!(tx, sqlite, id, owner, now_ms)
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(POSTGRES_REGISTRY_LOCK)
                    .execute(&mut *tx)
                    .await?;
                deregister_owned_in!(tx, pg, id, owner, now_ms)
            }
        })
    }

    /// Deletes the rows expired for longer than `grace_ms` (no heartbeat for their TTL plus
    /// the grace), then the name claims without rows untouched for as long. Returns how many
    /// rows and claims went.
    pub async fn prune_registry(
        &self,
        now_ms: u64,
        grace_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        const ROWS: &str = "DELETE FROM registry WHERE last_heartbeat_ms + ttl_ms + ? < ?";
        const NAMES: &str = "DELETE FROM registry_names WHERE touched_ms + ? < ? AND NOT EXISTS \
             (SELECT 1 FROM registry r WHERE r.namespace = registry_names.namespace AND r.name = registry_names.name)";
        macro_rules! prune {
            ($rows:expr, $names:expr, $pool:expr) => {{
                let rows = sqlx::query($rows)
                    .bind(grace_ms as i64)
                    .bind(now_ms as i64)
                    .execute($pool)
                    .await?
                    .rows_affected();
                let names = sqlx::query($names)
                    .bind(grace_ms as i64)
                    .bind(now_ms as i64)
                    .execute($pool)
                    .await?
                    .rows_affected();
                (rows, names)
            }};
        }
        Ok(match &self.backend {
            Backend::Sqlite(pool) => prune!(ROWS, NAMES, pool),
            Backend::Postgres(pool) => prune!(&pg(ROWS), &pg(NAMES), pool),
        })
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

    /// The entities with these ids (those that exist).
    pub async fn registry_rows(&self, ids: &[String]) -> Result<Vec<RegistryRow>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Raw> =
            match &self.backend {
                Backend::Sqlite(pool) => sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM registry WHERE id IN (SELECT value FROM json_each(?))"
                ))
                .bind(serde_json::to_string(ids).unwrap_or_default())
                .fetch_all(pool)
                .await?,
                Backend::Postgres(pool) => {
                    sqlx::query_as(&format!(
                        "SELECT {COLUMNS} FROM registry WHERE id = ANY($1)"
                    ))
                    .bind(ids)
                    .fetch_all(pool)
                    .await?
                }
            };
        Ok(rows.into_iter().map(row_of).collect())
    }

    /// Every entity's id, owner, body hash, health and last heartbeat: what a reader polls to
    /// learn what changed without reading the bodies.
    pub async fn registry_heads(&self) -> Result<Vec<RegistryHead>, StoreError> {
        const SQL: &str = "SELECT id, owner, etag, health, last_heartbeat_ms FROM registry";
        let rows: Vec<(String, String, i64, String, i64)> = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query_as(SQL).fetch_all(pool).await?,
            Backend::Postgres(pool) => sqlx::query_as(SQL).fetch_all(pool).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(id, owner, etag, health, last)| RegistryHead {
                id,
                owner,
                etag,
                health,
                last_heartbeat_ms: last as u64,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn row(id: &str, name: &str, owner: &str) -> RegistryRow {
        RegistryRow {
            id: id.into(),
            namespace: "default".into(),
            name: name.into(),
            body: format!("{{\"name\":\"{name}\",\"id\":\"{id}\"}}"),
            health: "healthy".into(),
            registered_at_ms: NOW,
            last_heartbeat_ms: NOW,
            owner: owner.into(),
            ttl_ms: 10_000,
        }
    }

    async fn each_backend(check: impl AsyncFn(&Store)) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db").display().to_string())
            .await
            .unwrap();
        check(&store).await;
        store.close().await;
        let database = concord_testkit::PgTestDatabase::create("concord_registry").await;
        let store = Store::open(database.url()).await.unwrap();
        check(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn a_name_belongs_to_its_first_registrant() {
        each_backend(async |store| {
            let alice = row("default.search.1.0.0.a", "search", "alice");
            assert_eq!(
                store.register_owned(&alice, 10, NOW).await.unwrap(),
                Registered::Done
            );
            // Mallory's newer version of the same name, and her own endpoint: refused.
            let mallory = row("default.search.9.0.0.m", "search", "mallory");
            assert_eq!(
                store.register_owned(&mallory, 10, NOW).await.unwrap(),
                Registered::Owned {
                    owner: "alice".into()
                }
            );
            // The same name in another namespace is another name.
            let mut elsewhere = mallory.clone();
            elsewhere.namespace = "mallory".into();
            elsewhere.id = "mallory.search.9.0.0.m".into();
            assert_eq!(
                store.register_owned(&elsewhere, 10, NOW).await.unwrap(),
                Registered::Done
            );
            assert_eq!(
                store
                    .heartbeat_owned(&alice.id, "mallory", "healthy", NOW + 1)
                    .await
                    .unwrap(),
                Owned::Other {
                    owner: "alice".into()
                }
            );
            assert_eq!(
                store
                    .deregister_owned(&alice.id, "mallory", NOW + 1)
                    .await
                    .unwrap(),
                Owned::Other {
                    owner: "alice".into()
                }
            );
            assert_eq!(
                store
                    .heartbeat_owned(&alice.id, "alice", "degraded", NOW + 2)
                    .await
                    .unwrap(),
                Owned::Done
            );
            assert_eq!(
                store
                    .heartbeat_owned("nothing", "alice", "healthy", NOW)
                    .await
                    .unwrap(),
                Owned::Missing
            );
            // Alice's last replica leaves; the claim stays through the grace period…
            assert_eq!(
                store
                    .deregister_owned(&alice.id, "alice", NOW + 3)
                    .await
                    .unwrap(),
                Owned::Done
            );
            assert_eq!(
                store
                    .registry_name_owner("default", "search")
                    .await
                    .unwrap(),
                Some("alice".into())
            );
            assert!(matches!(
                store.register_owned(&mallory, 10, NOW + 4).await.unwrap(),
                Registered::Owned { .. }
            ));
            // … and is pruned after it.
            let grace = 60_000;
            assert_eq!(store.prune_registry(NOW + 4, grace).await.unwrap(), (0, 0));
            let (_, names) = store.prune_registry(NOW + 4 + grace, grace).await.unwrap();
            assert_eq!(names, 1);
            assert_eq!(
                store.register_owned(&mallory, 10, NOW + 5).await.unwrap(),
                Registered::Done
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_principal_holds_at_most_its_cap_and_expired_rows_are_pruned() {
        each_backend(async |store| {
            for i in 0..3 {
                let r = row(&format!("default.n{i}.1.0.0.x"), &format!("n{i}"), "bob");
                assert_eq!(
                    store.register_owned(&r, 3, NOW).await.unwrap(),
                    Registered::Done
                );
            }
            let fourth = row("default.n3.1.0.0.x", "n3", "bob");
            assert_eq!(
                store.register_owned(&fourth, 3, NOW).await.unwrap(),
                Registered::Full { limit: 3 }
            );
            // Registering one of its own again is no new row.
            let again = row("default.n0.1.0.0.x", "n0", "bob");
            assert_eq!(
                store.register_owned(&again, 3, NOW + 1).await.unwrap(),
                Registered::Done
            );
            // Someone else is not counted against bob.
            let carol = row("default.c.1.0.0.x", "c", "carol");
            assert_eq!(
                store.register_owned(&carol, 3, NOW).await.unwrap(),
                Registered::Done
            );
            // Once bob's rows expired (TTL 10 s), they make room for new ones.
            let later = NOW + 20_000;
            let mut fourth = fourth;
            fourth.last_heartbeat_ms = later;
            assert_eq!(
                store.register_owned(&fourth, 3, later).await.unwrap(),
                Registered::Done
            );
            assert_eq!(
                store
                    .registry()
                    .await
                    .unwrap()
                    .iter()
                    .filter(|r| r.owner == "bob")
                    .count(),
                1
            );
            // Expired rows are deleted once their grace has passed, and never before.
            let grace = 3_600_000;
            let (rows, _) = store.prune_registry(later, grace).await.unwrap();
            assert_eq!(rows, 0);
            let (rows, _) = store
                .prune_registry(later + 10_000 + grace + 1, grace)
                .await
                .unwrap();
            assert_eq!(rows, 2);
            assert!(store.registry().await.unwrap().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn heads_show_what_changed_and_legacy_rows_are_adopted() {
        each_backend(async |store| {
            let mut legacy = row("default.old.1.0.0.x", "old", LEGACY_OWNER);
            store.register(&legacy).await.unwrap();
            let heads = store.registry_heads().await.unwrap();
            assert_eq!(heads.len(), 1);
            let first_etag = heads[0].etag;
            legacy.body = "{\"name\":\"old\",\"v\":2}".into();
            store.register(&legacy).await.unwrap();
            let heads = store.registry_heads().await.unwrap();
            assert_ne!(heads[0].etag, first_etag);
            assert_eq!(
                store
                    .registry_rows(&[legacy.id.clone(), "gone".into()])
                    .await
                    .unwrap(),
                vec![legacy.clone()]
            );
            // The first principal to heartbeat a legacy row adopts its name.
            assert_eq!(
                store
                    .heartbeat_owned(&legacy.id, "dave", "healthy", NOW + 1)
                    .await
                    .unwrap(),
                Owned::Done
            );
            assert_eq!(
                store.registry_name_owner("default", "old").await.unwrap(),
                Some("dave".into())
            );
            assert_eq!(
                store
                    .heartbeat_owned(&legacy.id, "erin", "healthy", NOW + 2)
                    .await
                    .unwrap(),
                Owned::Other {
                    owner: "dave".into()
                }
            );
        })
        .await;
    }
}
