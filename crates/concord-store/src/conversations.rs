//! Agents' conversations, kept in the store so that a conversation continues after a restart
//! and on any node sharing a PostgreSQL. Each turn appends the messages it added; concurrent
//! turns of one conversation interleave rather than overwrite each other.

use crate::{Backend, Store, StoreError};

/// One turn of a conversation: the messages it added (a JSON array, opaque to the store).
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub conversation_id: String,
    /// The principal whose conversation it is, and the agent it is with.
    pub owner: String,
    pub agent: String,
    pub at_ms: u64,
    pub messages: String,
}

type Raw = (String, String, String, i64, String);

impl Store {
    pub async fn append_turn(&self, turn: &Turn) -> Result<(), StoreError> {
        macro_rules! insert {
            ($pool:expr, $sql:expr) => {
                sqlx::query($sql)
                    .bind(&turn.conversation_id)
                    .bind(&turn.owner)
                    .bind(&turn.agent)
                    .bind(turn.at_ms as i64)
                    .bind(&turn.messages)
                    .execute($pool)
                    .await?
                    .rows_affected()
            };
        }
        match &self.backend {
            Backend::Sqlite(pool) => insert!(
                pool,
                "INSERT INTO agent_turns (conversation_id, owner, agent, at_ms, messages) VALUES (?, ?, ?, ?, ?)"
            ),
            Backend::Postgres(pool) => insert!(
                pool,
                "INSERT INTO agent_turns (conversation_id, owner, agent, at_ms, messages) VALUES ($1, $2, $3, $4, $5)"
            ),
        };
        Ok(())
    }

    /// The turns of a conversation, oldest first (none: an unknown conversation).
    pub async fn conversation(&self, id: &str) -> Result<Vec<Turn>, StoreError> {
        let raw: Vec<Raw> = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT conversation_id, owner, agent, at_ms, messages FROM agent_turns \
                     WHERE conversation_id = ? ORDER BY seq",
                )
                .bind(id)
                .fetch_all(pool)
                .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT conversation_id, owner, agent, at_ms, messages FROM agent_turns \
                     WHERE conversation_id = $1 ORDER BY seq",
                )
                .bind(id)
                .fetch_all(pool)
                .await?
            }
        };
        Ok(raw
            .into_iter()
            .map(|(conversation_id, owner, agent, at_ms, messages)| Turn {
                conversation_id,
                owner,
                agent,
                at_ms: at_ms as u64,
                messages,
            })
            .collect())
    }

    /// Deletes every conversation whose last turn is older than `before_ms`; returns how many
    /// turns went.
    pub async fn forget_conversations(&self, before_ms: u64) -> Result<u64, StoreError> {
        let cutoff = before_ms as i64;
        let deleted = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(
                "DELETE FROM agent_turns WHERE conversation_id IN (SELECT conversation_id \
                     FROM agent_turns GROUP BY conversation_id HAVING MAX(at_ms) < ?)",
            )
            .bind(cutoff)
            .execute(pool)
            .await?
            .rows_affected(),
            Backend::Postgres(pool) => sqlx::query(
                "DELETE FROM agent_turns WHERE conversation_id IN (SELECT conversation_id \
                     FROM agent_turns GROUP BY conversation_id HAVING MAX(at_ms) < $1)",
            )
            .bind(cutoff)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(deleted)
    }
}
