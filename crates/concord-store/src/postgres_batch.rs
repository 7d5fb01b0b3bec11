//! PostgreSQL's side of group commit. Several nodes may write the same database, so a batch
//! takes transaction-scoped advisory locks on every idempotency key and then every key it names
//! (each class sorted, so batches on different nodes cannot deadlock; a key that does not exist
//! yet has no row to lock), reads them, decides, takes a block of sequence numbers from the one
//! sequence row (locked until commit, so sequence numbers become visible in order and a change
//! feed resuming from one never misses an earlier commit), and writes the rows as arrays
//! (`unnest`). No cache: another node may write any key at any time.

use std::collections::HashMap;

use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use crate::group_commit::{
    BatchWriter, Job, Plan, Refusal, idempotency_keys, plan_batch, wanted_keys,
};
use crate::{Committed, Current, KeyRef, StoreError, Transacted, keyed_current, replayed};

pub(crate) struct PostgresWriter {
    pool: PgPool,
}

impl PostgresWriter {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl BatchWriter for PostgresWriter {
    async fn write(&mut self, jobs: &mut [Job]) -> Result<Vec<Transacted<Refusal>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (plan, first_seq) = write_batch(&mut tx, jobs).await?;
        tx.commit().await?;
        Ok(plan.into_outcomes(first_seq))
    }

    async fn close(self) {}
}

async fn write_batch(tx: &mut PgConnection, jobs: &mut [Job]) -> Result<(Plan, u64), StoreError> {
    let idempotency = idempotency_keys(jobs);
    let mut stored: HashMap<String, Committed> = HashMap::new();
    if !idempotency.is_empty() {
        // Serialises commits that share an idempotency key, so a retry racing the original
        // waits for it and then sees its result.
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(h)) FROM ( \
               SELECT DISTINCT hashtextextended('idem:' || k, 7) AS h FROM unnest($1::text[]) k ORDER BY h) s",
        )
        .bind(&idempotency)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT idempotency_key, result FROM state_commits WHERE idempotency_key = ANY($1)",
        )
        .bind(&idempotency)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let (key, result): (String, String) = (row.get(0), row.get(1));
            stored.insert(key, replayed(&result)?);
        }
    }
    let wanted = wanted_keys(jobs);
    let namespaces: Vec<&str> = wanted.iter().map(|k| k.namespace.as_str()).collect();
    let names: Vec<&str> = wanted.iter().map(|k| k.key.as_str()).collect();
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(h)) FROM ( \
           SELECT DISTINCT hashtextextended(ns || '/' || key, 0) AS h \
           FROM unnest($1::text[], $2::text[]) AS q(ns, key) ORDER BY h) s",
    )
    .bind(&namespaces)
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    let rows = sqlx::query(
        "SELECT q.ns, q.key, k.version, k.value, l.token, l.holder, l.expires_at_ms \
         FROM unnest($1::text[], $2::text[]) AS q(ns, key) \
         LEFT JOIN state_keys k ON k.ns = q.ns AND k.key = q.key \
         LEFT JOIN state_leases l ON l.ns = q.ns AND l.key = q.key",
    )
    .bind(&namespaces)
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    let mut overlay: HashMap<KeyRef, Current> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let (key, current) = keyed_current(row)?;
        overlay.insert(key, current);
    }

    let plan = plan_batch(jobs, stored, overlay);
    if plan.commits.is_empty() {
        return Ok((plan, 1));
    }
    let count = plan.commits.len() as i64;
    let last: i64 = sqlx::query_scalar("UPDATE state_sequence SET seq = seq + $1 RETURNING seq")
        .bind(count)
        .fetch_one(&mut *tx)
        .await?;
    let first_seq = (last - count + 1) as u64;

    let mut seqs = Vec::with_capacity(plan.commits.len());
    let mut authors = Vec::with_capacity(plan.commits.len());
    let mut proposals = Vec::with_capacity(plan.commits.len());
    let mut traces = Vec::with_capacity(plan.commits.len());
    let mut times = Vec::with_capacity(plan.commits.len());
    let mut idempotency_keys = Vec::with_capacity(plan.commits.len());
    let mut results = Vec::with_capacity(plan.commits.len());
    for (index, commit) in plan.commits.iter().enumerate() {
        seqs.push((first_seq + index as u64) as i64);
        authors.push(commit.meta.author.as_str());
        proposals.push(commit.meta.proposal_id.as_deref());
        traces.push(commit.meta.trace_id.as_deref());
        times.push(commit.committed_at_ms as i64);
        idempotency_keys.push(commit.meta.idempotency_key.as_deref());
        results.push(serde_json::to_string(&plan.committed(index, first_seq)).unwrap_or_default());
    }
    let rows = plan.latest.len();
    let (mut key_namespaces, mut key_names, mut key_versions, mut key_values, mut key_seqs) = (
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
    );
    for (key, latest) in &plan.latest {
        key_namespaces.push(key.namespace.as_str());
        key_names.push(key.key.as_str());
        key_versions.push(latest.version as i64);
        key_values.push(latest.text.as_str());
        key_seqs.push((first_seq + latest.commit as u64) as i64);
    }
    let rows = plan.history.len();
    let (mut namespaces, mut names, mut versions, mut values, mut row_seqs) = (
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
    );
    for row in &plan.history {
        namespaces.push(row.key.namespace.as_str());
        names.push(row.key.key.as_str());
        versions.push(row.version as i64);
        values.push(row.text.as_str());
        row_seqs.push((first_seq + row.commit as u64) as i64);
    }
    // One round trip for the three tables (foreign keys are checked at the end of the
    // statement, when the commit rows exist).
    sqlx::query(
        "WITH commits AS ( \
           INSERT INTO state_commits (seq, author, proposal_id, trace_id, committed_at_ms, idempotency_key, result) \
           SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[])), \
         current AS ( \
           INSERT INTO state_keys (ns, key, version, value, seq) \
           SELECT * FROM unnest($8::text[], $9::text[], $10::bigint[], $11::text[], $12::bigint[]) \
           ON CONFLICT (ns, key) DO UPDATE SET version = excluded.version, value = excluded.value, seq = excluded.seq) \
         INSERT INTO state_history (ns, key, version, value, seq) \
         SELECT * FROM unnest($13::text[], $14::text[], $15::bigint[], $16::text[], $17::bigint[])",
    )
    .bind(&seqs)
    .bind(&authors)
    .bind(&proposals)
    .bind(&traces)
    .bind(&times)
    .bind(&idempotency_keys)
    .bind(&results)
    .bind(&key_namespaces)
    .bind(&key_names)
    .bind(&key_versions)
    .bind(&key_values)
    .bind(&key_seqs)
    .bind(&namespaces)
    .bind(&names)
    .bind(&versions)
    .bind(&values)
    .bind(&row_seqs)
    .execute(&mut *tx)
    .await?;

    if !plan.prune.is_empty() {
        let namespaces: Vec<&str> = plan.prune.keys().map(|k| k.namespace.as_str()).collect();
        let names: Vec<&str> = plan.prune.keys().map(|k| k.key.as_str()).collect();
        let floors: Vec<i64> = plan.prune.values().map(|&f| f as i64).collect();
        sqlx::query(
            "DELETE FROM state_history h USING unnest($1::text[], $2::text[], $3::bigint[]) AS p(ns, key, floor) \
             WHERE h.ns = p.ns AND h.key = p.key AND h.version <= p.floor",
        )
        .bind(&namespaces)
        .bind(&names)
        .bind(&floors)
        .execute(&mut *tx)
        .await?;
    }
    Ok((plan, first_seq))
}
