//! SQLite's side of group commit: one dedicated write connection, the batch's rows passed as one
//! JSON array per statement (`json_each`), and the value cache kept current. This task is the
//! only writer of commits and current values in the file, which is what makes the cache and the
//! remembered last sequence number true.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use crate::group_commit::{
    BatchWriter, IdempotencyKey, Job, Outcome, Plan, StoredResult, closed_proposals,
    idempotency_keys, plan_batch, wanted_keys,
};
use crate::value_cache::ValueCache;
use crate::{Current, KeyRef, StoreError, keyed_current, replayed};

pub(crate) struct SqliteWriter {
    connection: SqliteConnection,
    cache: Arc<ValueCache>,
    /// The last commit sequence number (forgotten after any failure, and read again).
    last_seq: Option<u64>,
}

impl SqliteWriter {
    pub async fn open(
        options: &SqliteConnectOptions,
        cache: Arc<ValueCache>,
    ) -> Result<Self, sqlx::Error> {
        Ok(Self {
            connection: SqliteConnection::connect_with(options).await?,
            cache,
            last_seq: None,
        })
    }
}

impl BatchWriter for SqliteWriter {
    async fn write(&mut self, jobs: &mut [Job]) -> Result<Vec<Outcome>, StoreError> {
        match write_batch(&mut self.connection, self.last_seq, jobs).await {
            Ok((plan, first_seq)) => {
                if !plan.commits.is_empty() {
                    self.last_seq = Some(first_seq + plan.commits.len() as u64 - 1);
                }
                self.cache.record(
                    plan.latest
                        .iter()
                        .map(|(key, latest)| (key, latest.version, &latest.value)),
                );
                Ok(plan.into_outcomes(first_seq))
            }
            Err(error) => {
                // Whatever the failure left behind is read afresh.
                self.last_seq = None;
                self.cache.clear();
                Err(error)
            }
        }
    }

    async fn close(self) {
        let _ = self.connection.close().await;
    }
}

/// Runs `jobs` in order in one transaction; nothing is written unless all of it is. Returns the
/// plan and the first sequence number it was given.
async fn write_batch(
    connection: &mut SqliteConnection,
    last_seq: Option<u64>,
    jobs: &mut [Job],
) -> Result<(Plan, u64), StoreError> {
    // IMMEDIATE takes the write lock at once (other writers: leases, proposals, migrations).
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;

    let mut stored: HashMap<IdempotencyKey, StoredResult> = HashMap::new();
    for key in idempotency_keys(jobs) {
        let found: Option<(String, Option<String>)> = match &key {
            IdempotencyKey::Global(name) => {
                sqlx::query_as("SELECT result, NULL FROM state_commits WHERE idempotency_key = ?")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            IdempotencyKey::Scoped { principal, key } => {
                sqlx::query_as(
                    "SELECT c.result, i.request_hash FROM state_idempotency i \
                     JOIN state_commits c ON c.seq = i.seq WHERE i.principal = ? AND i.key = ?",
                )
                .bind(principal)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?
            }
        };
        if let Some((result, request_hash)) = found {
            let committed = replayed(&result)?;
            stored.insert(
                key,
                StoredResult {
                    committed,
                    request_hash,
                },
            );
        }
    }
    // Under the write lock BEGIN IMMEDIATE took: nobody moves these proposals until we commit.
    let closing = closed_proposals(jobs);
    let mut proposals: HashMap<String, String> = HashMap::new();
    if !closing.is_empty() {
        let ids = Value::Array(closing.into_iter().map(Value::String).collect()).to_string();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, status FROM state_proposals WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        proposals.extend(rows);
    }
    let overlay = read_currents(&mut tx, &wanted_keys(jobs)).await?;
    let last_seq = match last_seq {
        Some(seq) => seq,
        None => {
            let seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM state_commits")
                .fetch_one(&mut *tx)
                .await?;
            seq as u64
        }
    };
    let first_seq = last_seq + 1;
    let plan = plan_batch(jobs, stored, proposals, overlay);

    if !plan.commits.is_empty() {
        let commit_rows: Vec<Value> = plan
            .commits
            .iter()
            .enumerate()
            .map(|(index, commit)| {
                let meta = &commit.meta;
                json!([
                    first_seq + index as u64,
                    meta.author,
                    meta.proposal_id,
                    meta.trace_id,
                    commit.committed_at_ms,
                    commit.global_key(),
                    serde_json::to_string(&plan.committed(index, first_seq)).unwrap_or_default(),
                ])
            })
            .collect();
        sqlx::query(
            "INSERT INTO state_commits (seq, author, proposal_id, trace_id, committed_at_ms, idempotency_key, result) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6 \
             FROM json_each(?)",
        )
        .bind(Value::Array(commit_rows).to_string())
        .execute(&mut *tx)
        .await?;
        let key_rows: Vec<Value> = plan
            .latest
            .iter()
            .map(|(key, l)| {
                json!([
                    key.namespace,
                    key.key,
                    l.version,
                    l.text,
                    first_seq + l.commit as u64
                ])
            })
            .collect();
        // `WHERE true` tells SQLite's parser the ON CONFLICT belongs to the INSERT.
        sqlx::query(
            "INSERT INTO state_keys (ns, key, version, value, seq) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each(?) WHERE true \
             ON CONFLICT (ns, key) DO UPDATE SET version = excluded.version, value = excluded.value, seq = excluded.seq",
        )
        .bind(Value::Array(key_rows).to_string())
        .execute(&mut *tx)
        .await?;
        let history_rows: Vec<Value> = plan
            .history
            .iter()
            .map(|h| {
                json!([
                    h.key.namespace,
                    h.key.key,
                    h.version,
                    h.text,
                    first_seq + h.commit as u64
                ])
            })
            .collect();
        sqlx::query(
            "INSERT INTO state_history (ns, key, version, value, seq) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each(?)",
        )
        .bind(Value::Array(history_rows).to_string())
        .execute(&mut *tx)
        .await?;
        let scoped: Vec<Value> = plan
            .commits
            .iter()
            .enumerate()
            .filter_map(|(index, commit)| {
                let (principal, key, hash) = commit.scoped_key()?;
                Some(json!([principal, key, hash, first_seq + index as u64]))
            })
            .collect();
        if !scoped.is_empty() {
            sqlx::query(
                "INSERT INTO state_idempotency (principal, key, request_hash, seq) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?)",
            )
            .bind(Value::Array(scoped).to_string())
            .execute(&mut *tx)
            .await?;
        }
        if !plan.closed_proposals.is_empty() {
            let ids: Vec<Value> = plan
                .closed_proposals
                .iter()
                .cloned()
                .map(Value::String)
                .collect();
            sqlx::query(
                "UPDATE state_proposals SET status = 'committed' \
                 WHERE status = 'validated' AND id IN (SELECT value FROM json_each(?))",
            )
            .bind(Value::Array(ids).to_string())
            .execute(&mut *tx)
            .await?;
        }
        if !plan.prune.is_empty() {
            let floors: Vec<Value> = plan
                .prune
                .iter()
                .map(|(key, floor)| json!([key.namespace, key.key, floor]))
                .collect();
            // Driven from the (few) pruned keys through the history's primary key.
            sqlx::query(
                "DELETE FROM state_history WHERE rowid IN ( \
                   SELECT h.rowid FROM json_each(?) j JOIN state_history h \
                   ON h.ns = j.value ->> 0 AND h.key = j.value ->> 1 AND h.version <= j.value ->> 2)",
            )
            .bind(Value::Array(floors).to_string())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok((plan, first_seq))
}

/// The current version, value and lease of every key the batch names, in one query.
async fn read_currents(
    tx: &mut SqliteConnection,
    wanted: &[KeyRef],
) -> Result<HashMap<KeyRef, Current>, StoreError> {
    let names: Vec<Value> = wanted
        .iter()
        .map(|key| json!([key.namespace, key.key]))
        .collect();
    let rows = sqlx::query(
        "SELECT q.value ->> 0, q.value ->> 1, k.version, k.value, l.token, l.holder, l.expires_at_ms \
         FROM json_each(?) q \
         LEFT JOIN state_keys k ON k.ns = q.value ->> 0 AND k.key = q.value ->> 1 \
         LEFT JOIN state_leases l ON l.ns = q.value ->> 0 AND l.key = q.value ->> 1",
    )
    .bind(Value::Array(names).to_string())
    .fetch_all(&mut *tx)
    .await?;
    let mut currents = HashMap::with_capacity(rows.len());
    for row in &rows {
        let (key, current) = keyed_current(row)?;
        currents.insert(key, current);
    }
    Ok(currents)
}
