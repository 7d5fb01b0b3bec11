//! The LLM usage ledger: every provider attempt of every agent run, kept in the store so that
//! `concord costs` sees them after a restart and across nodes sharing a PostgreSQL.

use crate::{Backend, Store, StoreError};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageRow {
    pub at_ms: u64,
    /// The agent run this attempt belongs to, and the run that delegated it (if any).
    pub run_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<String>,
    pub agent: String,
    pub principal: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which rows to read; `None` fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub agent: Option<String>,
    /// A model or a provider name.
    pub model: Option<String>,
    pub since_ms: Option<u64>,
}

type Raw = (
    i64,
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    i64,
    i64,
    f64,
    i64,
    Option<String>,
);

const COLUMNS: &str = "at_ms, run_id, parent_run, agent, principal, provider, model, \
    input_tokens, output_tokens, cost_usd, latency_ms, error";

impl Store {
    /// Appends rows, all in one transaction.
    pub async fn record_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        macro_rules! insert_all {
            ($pool:expr, $sql:expr) => {{
                let mut tx = $pool.begin().await?;
                for row in rows {
                    sqlx::query($sql)
                        .bind(row.at_ms as i64)
                        .bind(&row.run_id)
                        .bind(&row.parent_run)
                        .bind(&row.agent)
                        .bind(&row.principal)
                        .bind(&row.provider)
                        .bind(&row.model)
                        .bind(row.input_tokens as i64)
                        .bind(row.output_tokens as i64)
                        .bind(row.cost_usd)
                        .bind(row.latency_ms as i64)
                        .bind(&row.error)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }};
        }
        match &self.backend {
            Backend::Sqlite(pool) => insert_all!(
                pool,
                "INSERT INTO llm_usage (at_ms, run_id, parent_run, agent, principal, provider, model, \
                 input_tokens, output_tokens, cost_usd, latency_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            Backend::Postgres(pool) => insert_all!(
                pool,
                "INSERT INTO llm_usage (at_ms, run_id, parent_run, agent, principal, provider, model, \
                 input_tokens, output_tokens, cost_usd, latency_ms, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
        }
        Ok(())
    }

    /// The rows matching `filter`, oldest first.
    pub async fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        let since = filter.since_ms.unwrap_or(0) as i64;
        let raw: Vec<Raw> = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM llm_usage WHERE at_ms >= ? \
                     AND (? IS NULL OR agent = ?) AND (? IS NULL OR model = ? OR provider = ?) ORDER BY seq"
                ))
                .bind(since)
                .bind(&filter.agent)
                .bind(&filter.agent)
                .bind(&filter.model)
                .bind(&filter.model)
                .bind(&filter.model)
                .fetch_all(pool)
                .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM llm_usage WHERE at_ms >= $1 \
                     AND ($2::TEXT IS NULL OR agent = $2) AND ($3::TEXT IS NULL OR model = $3 OR provider = $3) ORDER BY seq"
                ))
                .bind(since)
                .bind(&filter.agent)
                .bind(&filter.model)
                .fetch_all(pool)
                .await?
            }
        };
        Ok(raw
            .into_iter()
            .map(|r| UsageRow {
                at_ms: r.0 as u64,
                run_id: r.1,
                parent_run: r.2,
                agent: r.3,
                principal: r.4,
                provider: r.5,
                model: r.6,
                input_tokens: r.7 as u64,
                output_tokens: r.8 as u64,
                cost_usd: r.9,
                latency_ms: r.10 as u64,
                error: r.11,
            })
            .collect())
    }
}
