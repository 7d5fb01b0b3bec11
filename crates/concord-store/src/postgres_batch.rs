//! PostgreSQL's side of group commit. Several nodes may write the same database, so a batch
//! takes transaction-scoped advisory locks on every idempotency key, then row locks on every
//! proposal it commits, then advisory locks on every key it names (each class sorted, so batches
//! on different nodes cannot deadlock; a key that does not exist yet has no row to lock), reads
//! them, decides, takes a block of sequence numbers from the one
//! sequence row (locked until commit, so sequence numbers become visible in order and a change
//! feed resuming from one never misses an earlier commit), and writes the rows as arrays
//! (`unnest`). No cache: another node may write any key at any time.

use std::collections::HashMap;

use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use crate::group_commit::{
    BatchWriter, IdempotencyKey, Job, Outcome, Plan, StoredResult, closed_proposals,
    idempotency_keys, plan_batch, wanted_keys,
};
use crate::{Current, KeyRef, StoreError, keyed_current, replayed};

pub(crate) struct PostgresWriter {
    pool: PgPool,
}

impl PostgresWriter {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl BatchWriter for PostgresWriter {
    async fn write(&mut self, jobs: &mut [Job]) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (plan, first_seq) = write_batch(&mut tx, jobs).await?;
        tx.commit().await?;
        Ok(plan.into_outcomes(first_seq))
    }

    async fn close(self) {}
}

async fn write_batch(tx: &mut PgConnection, jobs: &mut [Job]) -> Result<(Plan, u64), StoreError> {
    let idempotency = idempotency_keys(jobs);
    let mut stored: HashMap<IdempotencyKey, StoredResult> = HashMap::new();
    if !idempotency.is_empty() {
        let mut global = Vec::new();
        let (mut principals, mut scoped) = (Vec::new(), Vec::new());
        let mut lock_names = Vec::with_capacity(idempotency.len());
        for key in &idempotency {
            match key {
                IdempotencyKey::Global(name) => {
                    lock_names.push(format!("idem:{name}"));
                    global.push(name.as_str());
                }
                IdempotencyKey::Scoped { principal, key } => {
                    lock_names.push(format!("idem:{principal}/{key}"));
                    principals.push(principal.as_str());
                    scoped.push(key.as_str());
                }
            }
        }
        // Serialises commits that share an idempotency key, so a retry racing the original
        // waits for it and then sees its result. (Names that hash alike only share a lock.)
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(h)) FROM ( \
               SELECT DISTINCT hashtextextended(k, 7) AS h FROM unnest($1::text[]) k ORDER BY h) s",
        )
        .bind(&lock_names)
        .execute(&mut *tx)
        .await?;
        if !global.is_empty() {
            let rows = sqlx::query(
                "SELECT idempotency_key, result FROM state_commits WHERE idempotency_key = ANY($1)",
            )
            .bind(&global)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let (key, result): (String, String) = (row.get(0), row.get(1));
                let committed = replayed(&result)?;
                stored.insert(
                    IdempotencyKey::Global(key),
                    StoredResult {
                        committed,
                        request_hash: None,
                    },
                );
            }
        }
        if !scoped.is_empty() {
            let rows = sqlx::query(
                "SELECT i.principal, i.key, i.request_hash, c.result \
                 FROM unnest($1::text[], $2::text[]) AS q(principal, key) \
                 JOIN state_idempotency i ON i.principal = q.principal AND i.key = q.key \
                 JOIN state_commits c ON c.seq = i.seq",
            )
            .bind(&principals)
            .bind(&scoped)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let (principal, key, request_hash, result): (String, String, String, String) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let committed = replayed(&result)?;
                stored.insert(
                    IdempotencyKey::Scoped { principal, key },
                    StoredResult {
                        committed,
                        request_hash: Some(request_hash),
                    },
                );
            }
        }
    }
    // The proposals this batch commits, locked (in id order) until it commits: a commit of the
    // same proposal on another node waits, then finds it committed.
    let closing = closed_proposals(jobs);
    let mut proposals: HashMap<String, String> = HashMap::new();
    if !closing.is_empty() {
        let rows = sqlx::query(
            "SELECT id, status FROM state_proposals WHERE id = ANY($1) ORDER BY id COLLATE \"C\" FOR UPDATE",
        )
        .bind(&closing)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            proposals.insert(row.get(0), row.get(1));
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

    let plan = plan_batch(jobs, stored, proposals, overlay);
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
        idempotency_keys.push(commit.global_key());
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

    let (mut scoped_principals, mut scoped_keys, mut scoped_hashes, mut scoped_seqs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (index, commit) in plan.commits.iter().enumerate() {
        if let Some((principal, key, hash)) = commit.scoped_key() {
            scoped_principals.push(principal);
            scoped_keys.push(key);
            scoped_hashes.push(hash);
            scoped_seqs.push((first_seq + index as u64) as i64);
        }
    }
    if !scoped_keys.is_empty() {
        sqlx::query(
            "INSERT INTO state_idempotency (principal, key, request_hash, seq) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])",
        )
        .bind(&scoped_principals)
        .bind(&scoped_keys)
        .bind(&scoped_hashes)
        .bind(&scoped_seqs)
        .execute(&mut *tx)
        .await?;
    }
    if !plan.closed_proposals.is_empty() {
        sqlx::query(
            "UPDATE state_proposals SET status = 'committed' WHERE status = 'validated' AND id = ANY($1)",
        )
        .bind(&plan.closed_proposals)
        .execute(&mut *tx)
        .await?;
    }

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
