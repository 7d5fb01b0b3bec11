//! Durable storage for Concord's shared state: the only crate with SQL. Two implementations
//! behind one type — SQLite (the embedded default, WAL, `synchronous=FULL`) and PostgreSQL (for
//! several nodes) — with the same semantics, proven by one test suite run against both.
//!
//! The central operation is [`Store::transact`]: in one database transaction it locks the
//! named keys (in a fixed order, so concurrent transactions cannot deadlock), reads their
//! current versions and values, asks a pure decision function for the new values (or a
//! refusal), and writes them with a new global commit sequence number. What the values mean
//! (patches, merge policies) is the state crate's business, not the store's.

mod conversations;
mod governance;
mod group_commit;
mod migrate;
mod postgres_batch;
mod registry;
mod sqlite_batch;
mod usage;
mod value_cache;

use std::any::Any;
use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row};

pub use conversations::Turn;
pub use governance::{ApiKeyRecord, AuditDraft, AuditRow, GENESIS_HASH};
use group_commit::{Decide, GroupCommitter};
pub use migrate::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, migrate};
use postgres_batch::PostgresWriter;
pub use registry::{LEGACY_OWNER, Owned, Registered, RegistryHead, RegistryRow};
use sqlite_batch::SqliteWriter;
use std::sync::Arc;
pub use usage::{UsageFilter, UsageRow};
use value_cache::ValueCache;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("schema migration {version} failed: {source}")]
    Migrate {
        version: u32,
        #[source]
        source: sqlx::Error,
    },
    /// The database was migrated by a newer binary: using it could corrupt what that binary
    /// wrote, so the store refuses to open.
    #[error(
        "the database's schema is at version {found}, newer than this binary knows (it has \
         migrations up to version {known}): run a Concord as new as the one that migrated it"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    /// A commit repeated an idempotency key of its principal with a different request.
    #[error(
        "idempotency key {key:?} of {principal} was already used for a different request (other \
         keys, operations or base versions); a new request needs a new key"
    )]
    IdempotencyKeyReused { principal: String, key: String },
    /// A commit of a proposal found it no longer waiting for its commit (committed already,
    /// conflicted, expired or unknown).
    #[error("proposal {id} is {status}, not waiting for a commit")]
    ProposalClosed { id: String, status: String },
    /// A number outside what the store can hold (a lease ending past the largest time, a
    /// counter at its maximum).
    #[error("{0}")]
    OutOfRange(String),
}

/// A key as stored: `namespace` and `key` (the state crate validates both).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRef {
    pub namespace: String,
    pub key: String,
}

/// A key's current state. Version 0 means the key does not exist.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub key: KeyRef,
    pub version: u64,
    pub value: Option<Value>,
    /// The key's lease, when one is held and unexpired.
    pub lease: Option<Lease>,
}

/// An exclusive claim on a key. The fencing token grows with every new claim of the key, so
/// a holder that lost its lease (expired, taken over) is recognised by its older token.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub token: u64,
    pub holder: String,
    pub expires_at_ms: u64,
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    Granted(Lease),
    /// Someone else holds it.
    Held(Lease),
}

/// A new value for a key, written by a commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub key: KeyRef,
    pub value: Value,
}

/// Who and what a commit belongs to, kept with every version.
#[derive(Debug, Clone, Default)]
pub struct CommitMeta {
    pub author: String,
    pub proposal_id: Option<String>,
    pub trace_id: Option<String>,
    /// A retried commit with the same key returns the first commit's result instead of
    /// applying again.
    pub idempotency_key: Option<String>,
    /// With an `idempotency_key`: the key is the `author`'s alone (another principal's commit
    /// with the same key is a different commit) and is bound to this hash of the request; the
    /// same author repeating the key with another hash fails with
    /// [`StoreError::IdempotencyKeyReused`]. Without one the key is global and unbound, as keys
    /// were before schema version 8 (kept for the store's own callers; the state service always
    /// gives a hash).
    pub request_hash: Option<String>,
    /// This commit is the one commit of proposal `proposal_id`: in the same transaction the
    /// proposal moves from `validated` to `committed`, and a commit that finds it in any other
    /// status fails with [`StoreError::ProposalClosed`]. So a proposal commits once, however many
    /// commits of it race (a repeat with the first commit's idempotency key still replays).
    pub closes_proposal: bool,
    /// Keep only this many newest versions of each written key in the history (None: all).
    /// Commit rows are never pruned, so sequence numbers are never reused.
    pub keep_versions: Option<u64>,
}

/// What one commit wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    pub seq: u64,
    /// (namespace, key, new version), in the order of the writes.
    pub versions: Vec<(String, String, u64)>,
    /// True when this is the stored result of an earlier commit with the same idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

/// The outcome of [`Store::transact`].
#[derive(Debug)]
pub enum Transacted<R> {
    Committed(Committed),
    /// The decision function refused; nothing was written.
    Refused(R),
}

/// One stored version of a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub version: u64,
    pub value: Value,
    pub seq: u64,
    pub author: String,
    pub proposal_id: Option<String>,
    pub trace_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub committed_at_ms: u64,
}

enum LeaseChange<T> {
    Keep(T),
    Set(Lease, T),
}

/// A stored proposal (its body is the state crate's JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProposal {
    pub id: String,
    pub body: Value,
    pub status: String,
    pub expires_at_ms: u64,
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The state store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Every commit goes through this store's one group-committing writer.
    committer: GroupCommitter,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn parse_json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("stored JSON unreadable: {e}")))
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let (pool, options) = connect_sqlite(path).await?;
        migrate::migrate_sqlite(&pool, SQLITE_MIGRATIONS).await?;
        let cache = Arc::new(ValueCache::default());
        let writer = SqliteWriter::open(&options, cache.clone())
            .await
            .map_err(|source| StoreError::Open {
                location: path.display().to_string(),
                source,
            })?;
        Ok(Store {
            backend: Backend::Sqlite(pool),
            committer: GroupCommitter::start(writer, Some(cache)),
        })
    }

    /// Connects to PostgreSQL at `url` and migrates the schema.
    pub async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let pool = connect_postgres(url).await?;
        migrate::migrate_postgres(&pool, POSTGRES_MIGRATIONS).await?;
        Ok(Store {
            committer: GroupCommitter::start(PostgresWriter::new(pool.clone()), None),
            backend: Backend::Postgres(pool),
        })
    }

    /// `postgres://…` or a SQLite file path.
    pub async fn open(location: &str) -> Result<Store, StoreError> {
        match Location::parse(location) {
            Location::Postgres(url) => Self::open_postgres(url).await,
            Location::Sqlite(path) => Self::open_sqlite(path).await,
        }
    }

    /// (transactions written, commits they carried) since the store opened: their ratio is
    /// the average group size.
    pub fn commit_groups(&self) -> (u64, u64) {
        self.committer.stats()
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    pub async fn get(&self, key: &KeyRef) -> Result<Current, StoreError> {
        let row = match &self.backend {
            Backend::Sqlite(pool) => {
                let cache = self.committer.cache();
                if let Some((version, value)) = cache.and_then(|c| c.get(key)) {
                    return Ok(Current {
                        key: key.clone(),
                        version,
                        value: Some(value),
                        lease: None,
                    });
                }
                let epoch = cache.map(|c| c.epoch());
                let row =
                    sqlx::query("SELECT version, value FROM state_keys WHERE ns = ? AND key = ?")
                        .bind(&key.namespace)
                        .bind(&key.key)
                        .fetch_optional(pool)
                        .await?
                        .map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1)));
                if let (Some(cache), Some(epoch), Some((version, value))) = (cache, epoch, &row) {
                    let current = current_of(key, Some((*version, value.clone())))?;
                    cache.fill(epoch, key, current.version, current.value.as_ref());
                    return Ok(current);
                }
                row
            }
            Backend::Postgres(pool) => {
                sqlx::query("SELECT version, value FROM state_keys WHERE ns = $1 AND key = $2")
                    .bind(&key.namespace)
                    .bind(&key.key)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1)))
            }
        };
        Ok(match row {
            Some((version, value)) => Current {
                key: key.clone(),
                version: version as u64,
                value: Some(parse_json(&value)?),
                lease: None,
            },
            None => Current {
                key: key.clone(),
                version: 0,
                value: None,
                lease: None,
            },
        })
    }

    /// Keys of `namespace` starting with `prefix`, in key order.
    pub async fn list(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<Current>, StoreError> {
        // LIKE would treat `%` and `_` in keys as wildcards; a range on the key is exact.
        let upper = format!("{prefix}\u{10FFFF}");
        let rows: Vec<(String, i64, String)> = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(
                "SELECT key, version, value FROM state_keys WHERE ns = ? AND key >= ? AND key < ? ORDER BY key LIMIT ?",
            )
            .bind(namespace)
            .bind(prefix)
            .bind(&upper)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
            Backend::Postgres(pool) => sqlx::query(
                "SELECT key, version, value FROM state_keys WHERE ns = $1 AND key >= $2 AND key < $3 ORDER BY key COLLATE \"C\" LIMIT $4",
            )
            .bind(namespace)
            .bind(prefix)
            .bind(&upper)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        };
        rows.into_iter()
            .map(|(key, version, value)| {
                Ok(Current {
                    key: KeyRef {
                        namespace: namespace.to_string(),
                        key,
                    },
                    version: version as u64,
                    value: Some(parse_json(&value)?),
                    lease: None,
                })
            })
            .collect()
    }

    /// Every kept version of `key`, newest first.
    pub async fn history(&self, key: &KeyRef, limit: u32) -> Result<Vec<Version>, StoreError> {
        const COLUMNS: &str =
            "h.version, h.value, h.seq, c.author, c.proposal_id, c.trace_id, c.committed_at_ms";
        let rows = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(&format!(
                "SELECT {COLUMNS} FROM state_history h JOIN state_commits c ON c.seq = h.seq \
                     WHERE h.ns = ? AND h.key = ? ORDER BY h.version DESC LIMIT ?"
            ))
            .bind(&key.namespace)
            .bind(&key.key)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(version_from_sqlite)
            .collect::<Vec<_>>(),
            Backend::Postgres(pool) => sqlx::query(&format!(
                "SELECT {COLUMNS} FROM state_history h JOIN state_commits c ON c.seq = h.seq \
                     WHERE h.ns = $1 AND h.key = $2 ORDER BY h.version DESC LIMIT $3"
            ))
            .bind(&key.namespace)
            .bind(&key.key)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(version_from_postgres)
            .collect::<Vec<_>>(),
        };
        rows.into_iter().collect()
    }

    /// Committed versions of keys in `namespace` starting with `prefix`, with a commit
    /// sequence number above `after_seq`, in sequence order: the change feed. Sequence numbers
    /// become visible in order (see `transact`), so resuming from the last one seen never
    /// skips a commit and never repeats one.
    ///
    /// A page holds whole commits only (every row of the page's commits under the prefix), so
    /// resuming after its last sequence number loses nothing: at most `limit` rows, except that
    /// a first commit with more rows than that comes whole on a page of its own (the state
    /// service bounds how many keys a commit may write).
    pub async fn changes_since(
        &self,
        namespace: &str,
        prefix: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<(KeyRef, Version)>, StoreError> {
        const COLUMNS: &str = "h.key, h.version, h.value, h.seq, c.author, c.proposal_id, c.trace_id, c.committed_at_ms";
        // Nothing can come after a sequence number the store cannot hold.
        let Ok(after) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        let limit = i64::from(limit.max(1));
        let upper = format!("{prefix}\u{10FFFF}");
        // The commits that the first `limit` rows belong to, and then every row of them.
        let rows: Vec<(String, Version)> = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(&format!(
                "SELECT {COLUMNS} FROM state_history h JOIN state_commits c ON c.seq = h.seq \
                 WHERE h.ns = ?1 AND h.key >= ?2 AND h.key < ?3 AND h.seq > ?4 AND h.seq <= ( \
                   SELECT MAX(seq) FROM (SELECT seq FROM state_history \
                     WHERE ns = ?1 AND key >= ?2 AND key < ?3 AND seq > ?4 ORDER BY seq LIMIT ?5)) \
                 ORDER BY h.seq, h.key"
            ))
            .bind(namespace)
            .bind(prefix)
            .bind(&upper)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|row| {
                let key: String = row.get(0);
                Ok((key, version_from_row(
                    row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6), row.get(7),
                )?))
            })
            .collect::<Result<_, StoreError>>()?,
            Backend::Postgres(pool) => sqlx::query(&format!(
                "SELECT {COLUMNS} FROM state_history h JOIN state_commits c ON c.seq = h.seq \
                 WHERE h.ns = $1 AND h.key >= $2 AND h.key < $3 AND h.seq > $4 AND h.seq <= ( \
                   SELECT MAX(seq) FROM (SELECT seq FROM state_history \
                     WHERE ns = $1 AND key >= $2 AND key < $3 AND seq > $4 ORDER BY seq LIMIT $5) AS page) \
                 ORDER BY h.seq, h.key COLLATE \"C\""
            ))
            .bind(namespace)
            .bind(prefix)
            .bind(&upper)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|row| {
                let key: String = row.get(0);
                Ok((key, version_from_row(
                    row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6), row.get(7),
                )?))
            })
            .collect::<Result<_, StoreError>>()?,
        };
        let rows = whole_commits(rows, limit, |(_, version)| version.seq);
        Ok(rows
            .into_iter()
            .map(|(key, version)| {
                (
                    KeyRef {
                        namespace: namespace.to_string(),
                        key,
                    },
                    version,
                )
            })
            .collect())
    }

    /// Keys changed by commits after `after_seq` in any namespace, oldest first, with the
    /// sequence number of each change (for watchers of individual keys). Whole commits, as in
    /// [`Store::changes_since`].
    pub async fn changed_keys_since(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<(KeyRef, u64)>, StoreError> {
        let Ok(after) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        let limit = i64::from(limit.max(1));
        let rows: Vec<(String, String, i64)> = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(
                "SELECT ns, key, seq FROM state_history WHERE seq > ?1 AND seq <= ( \
                   SELECT MAX(seq) FROM (SELECT seq FROM state_history WHERE seq > ?1 ORDER BY seq LIMIT ?2)) \
                 ORDER BY seq, ns, key",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
            Backend::Postgres(pool) => sqlx::query(
                "SELECT ns, key, seq FROM state_history WHERE seq > $1 AND seq <= ( \
                   SELECT MAX(seq) FROM (SELECT seq FROM state_history WHERE seq > $1 ORDER BY seq LIMIT $2) AS page) \
                 ORDER BY seq, ns COLLATE \"C\", key COLLATE \"C\"",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        };
        Ok(whole_commits(rows, limit, |(_, _, seq)| *seq as u64)
            .into_iter()
            .map(|(namespace, key, seq)| (KeyRef { namespace, key }, seq as u64))
            .collect())
    }

    /// The highest commit sequence number so far (0 before the first commit).
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        let seq: i64 = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM state_commits")
                    .fetch_one(pool)
                    .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM state_commits")
                    .fetch_one(pool)
                    .await?
            }
        };
        Ok(seq as u64)
    }

    /// The value `key` had at `version`, if that version is still kept.
    pub async fn value_at(&self, key: &KeyRef, version: u64) -> Result<Option<Value>, StoreError> {
        // Version 0 is absence; a version the store cannot hold was never written.
        let Ok(stored_version) = i64::try_from(version) else {
            return Ok(None);
        };
        if version == 0 {
            return Ok(None);
        }
        if let Some(value) = self
            .committer
            .cache()
            .and_then(|c| c.value_at(key, version))
        {
            return Ok(Some(value));
        }
        let text: Option<String> =
            match &self.backend {
                Backend::Sqlite(pool) => {
                    sqlx::query_scalar(
                        "SELECT value FROM state_history WHERE ns = ? AND key = ? AND version = ?",
                    )
                    .bind(&key.namespace)
                    .bind(&key.key)
                    .bind(stored_version)
                    .fetch_optional(pool)
                    .await?
                }
                Backend::Postgres(pool) => sqlx::query_scalar(
                    "SELECT value FROM state_history WHERE ns = $1 AND key = $2 AND version = $3",
                )
                .bind(&key.namespace)
                .bind(&key.key)
                .bind(stored_version)
                .fetch_optional(pool)
                .await?,
            };
        text.map(|t| parse_json(&t)).transpose()
    }

    /// Runs one commit: locks `keys`, reads them, lets `decide` compute the writes (or refuse),
    /// and writes them atomically with a new commit sequence number. A repeated idempotency
    /// key returns the first commit's result without calling `decide` (or fails, when
    /// [`CommitMeta::request_hash`] says it was another request); a commit that closes a
    /// proposal fails unless the proposal is still open (see [`CommitMeta::closes_proposal`]). The commit joins a group
    /// commit (see `group_commit`), where `decide` may be called again if the group's
    /// transaction fails and the commit is retried alone.
    pub async fn transact<R, F>(
        &self,
        keys: &[KeyRef],
        meta: &CommitMeta,
        mut decide: F,
    ) -> Result<Transacted<R>, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&[Current]) -> Result<Vec<Write>, R> + Send + 'static,
    {
        let erased: Decide = Box::new(move |currents: &[Current]| {
            decide(currents).map_err(|refusal| Box::new(refusal) as Box<dyn Any + Send>)
        });
        match self
            .committer
            .commit(keys.to_vec(), meta.clone(), erased)
            .await?
        {
            Transacted::Committed(committed) => Ok(Transacted::Committed(committed)),
            Transacted::Refused(refusal) => match refusal.downcast::<R>() {
                Ok(refusal) => Ok(Transacted::Refused(*refusal)),
                Err(_) => Err(StoreError::Corrupt(
                    "a refusal came back as another type".into(),
                )),
            },
        }
    }

    pub async fn put_proposal(&self, proposal: &StoredProposal) -> Result<(), StoreError> {
        let body = proposal.body.to_string();
        let expires_at_ms = stored_i64(proposal.expires_at_ms, "a proposal's expiry")?;
        match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query("INSERT INTO state_proposals (id, body, status, expires_at_ms) VALUES (?, ?, ?, ?)")
                    .bind(&proposal.id)
                    .bind(&body)
                    .bind(&proposal.status)
                    .bind(expires_at_ms)
                    .execute(pool)
                    .await?;
            }
            Backend::Postgres(pool) => {
                sqlx::query("INSERT INTO state_proposals (id, body, status, expires_at_ms) VALUES ($1, $2, $3, $4)")
                    .bind(&proposal.id)
                    .bind(&body)
                    .bind(&proposal.status)
                    .bind(expires_at_ms)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn get_proposal(&self, id: &str) -> Result<Option<StoredProposal>, StoreError> {
        let row: Option<(String, String, i64)> = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query("SELECT body, status, expires_at_ms FROM state_proposals WHERE id = ?")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
            }
            Backend::Postgres(pool) => {
                sqlx::query("SELECT body, status, expires_at_ms FROM state_proposals WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
            }
        };
        row.map(|(body, status, expires)| {
            Ok(StoredProposal {
                id: id.to_string(),
                body: parse_json(&body)?,
                status,
                expires_at_ms: expires as u64,
            })
        })
        .transpose()
    }

    /// Moves a proposal from `from` to `to`; false when it was not in `from` (already
    /// committed, rejected, or unknown).
    pub async fn set_proposal_status(
        &self,
        id: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, StoreError> {
        let done = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query("UPDATE state_proposals SET status = ? WHERE id = ? AND status = ?")
                    .bind(to)
                    .bind(id)
                    .bind(from)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Backend::Postgres(pool) => {
                sqlx::query("UPDATE state_proposals SET status = $1 WHERE id = $2 AND status = $3")
                    .bind(to)
                    .bind(id)
                    .bind(from)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(done == 1)
    }

    /// Claims `key` for `holder` for `ttl_ms`: granted with a new, larger fencing token when
    /// the key is free (never claimed, released or expired); otherwise the current lease.
    pub async fn claim(
        &self,
        key: &KeyRef,
        holder: &str,
        ttl_ms: u64,
    ) -> Result<Claim, StoreError> {
        self.lease_op(key, |now, current| match current {
            Some(lease) if lease.expires_at_ms > now => Ok(LeaseChange::Keep(Claim::Held(lease))),
            previous => {
                let token = match previous {
                    None => 1,
                    Some(previous) => next_token(previous.token)?,
                };
                let lease = Lease {
                    token,
                    holder: holder.to_string(),
                    expires_at_ms: lease_end(now, ttl_ms)?,
                };
                Ok(LeaseChange::Set(lease.clone(), Claim::Granted(lease)))
            }
        })
        .await
    }

    /// Extends a live lease held under `token`; None when the token is not the live lease's.
    pub async fn renew(
        &self,
        key: &KeyRef,
        token: u64,
        ttl_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        self.lease_op(key, |now, current| match current {
            Some(lease) if lease.token == token && lease.expires_at_ms > now => {
                let renewed = Lease {
                    expires_at_ms: lease_end(now, ttl_ms)?,
                    ..lease
                };
                Ok(LeaseChange::Set(renewed.clone(), Some(renewed)))
            }
            _ => Ok(LeaseChange::Keep(None)),
        })
        .await
    }

    /// Ends a live lease held under `token`; false when the token is not the live lease's.
    pub async fn release(&self, key: &KeyRef, token: u64) -> Result<bool, StoreError> {
        self.lease_op(key, |now, current| match current {
            Some(lease) if lease.token == token && lease.expires_at_ms > now => {
                // Expire it now; the row keeps the token so the next claim's is larger.
                Ok(LeaseChange::Set(
                    Lease {
                        expires_at_ms: now,
                        ..lease
                    },
                    true,
                ))
            }
            _ => Ok(LeaseChange::Keep(false)),
        })
        .await
    }

    /// Reads a key's lease row under the key's lock and lets `change` decide what to store.
    async fn lease_op<T>(
        &self,
        key: &KeyRef,
        change: impl FnOnce(u64, Option<Lease>) -> Result<LeaseChange<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let now = now_ms();
        match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
                let row: Option<(i64, String, i64)> =
                    sqlx::query("SELECT token, holder, expires_at_ms FROM state_leases WHERE ns = ? AND key = ?")
                        .bind(&key.namespace)
                        .bind(&key.key)
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|r| (r.get(0), r.get(1), r.get(2)));
                let current = row.map(|(token, holder, expires)| Lease {
                    token: token as u64,
                    holder,
                    expires_at_ms: expires as u64,
                });
                match change(now, current)? {
                    LeaseChange::Keep(out) => Ok(out),
                    LeaseChange::Set(lease, out) => {
                        sqlx::query(
                            "INSERT INTO state_leases (ns, key, token, holder, expires_at_ms) VALUES (?, ?, ?, ?, ?) \
                             ON CONFLICT (ns, key) DO UPDATE SET token = excluded.token, holder = excluded.holder, expires_at_ms = excluded.expires_at_ms",
                        )
                        .bind(&key.namespace)
                        .bind(&key.key)
                        .bind(stored_i64(lease.token, "a fencing token")?)
                        .bind(&lease.holder)
                        .bind(stored_i64(lease.expires_at_ms, "a lease's end")?)
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await?;
                        Ok(out)
                    }
                }
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(format!("{}/{}", key.namespace, key.key))
                    .execute(&mut *tx)
                    .await?;
                let row: Option<(i64, String, i64)> =
                    sqlx::query("SELECT token, holder, expires_at_ms FROM state_leases WHERE ns = $1 AND key = $2")
                        .bind(&key.namespace)
                        .bind(&key.key)
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|r| (r.get(0), r.get(1), r.get(2)));
                let current = row.map(|(token, holder, expires)| Lease {
                    token: token as u64,
                    holder,
                    expires_at_ms: expires as u64,
                });
                match change(now, current)? {
                    LeaseChange::Keep(out) => Ok(out),
                    LeaseChange::Set(lease, out) => {
                        sqlx::query(
                            "INSERT INTO state_leases (ns, key, token, holder, expires_at_ms) VALUES ($1, $2, $3, $4, $5) \
                             ON CONFLICT (ns, key) DO UPDATE SET token = excluded.token, holder = excluded.holder, expires_at_ms = excluded.expires_at_ms",
                        )
                        .bind(&key.namespace)
                        .bind(&key.key)
                        .bind(stored_i64(lease.token, "a fencing token")?)
                        .bind(&lease.holder)
                        .bind(stored_i64(lease.expires_at_ms, "a lease's end")?)
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await?;
                        Ok(out)
                    }
                }
            }
        }
    }

    /// Benchmark floor: a table for the cheapest durable compare-and-set this database can do
    /// (one row per key, `UPDATE … WHERE version = $base`), with none of Concord's history,
    /// sequence or idempotency work. Only benchmarks use it.
    pub async fn floor_setup(&self) -> Result<(), StoreError> {
        let sql = "CREATE TABLE IF NOT EXISTS bench_floor (k TEXT PRIMARY KEY, version BIGINT NOT NULL, value BIGINT NOT NULL)";
        match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query(sql).execute(pool).await?;
            }
            Backend::Postgres(pool) => {
                sqlx::query(sql).execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Benchmark floor: (version, value) of a floor key, (0, 0) when absent.
    pub async fn floor_read(&self, key: &str) -> Result<(i64, i64), StoreError> {
        let row: Option<(i64, i64)> = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query("SELECT version, value FROM bench_floor WHERE k = ?")
                    .bind(key)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| (r.get(0), r.get(1)))
            }
            Backend::Postgres(pool) => {
                sqlx::query("SELECT version, value FROM bench_floor WHERE k = $1")
                    .bind(key)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| (r.get(0), r.get(1)))
            }
        };
        Ok(row.unwrap_or((0, 0)))
    }

    /// Benchmark floor: sets `value` if the key is still at `version`; false on a lost race.
    pub async fn floor_cas(&self, key: &str, version: i64, value: i64) -> Result<bool, StoreError> {
        let done = match &self.backend {
            Backend::Sqlite(pool) => {
                if version == 0 {
                    sqlx::query("INSERT INTO bench_floor (k, version, value) VALUES (?, 1, ?) ON CONFLICT (k) DO NOTHING")
                        .bind(key)
                        .bind(value)
                        .execute(pool)
                        .await?
                        .rows_affected()
                } else {
                    sqlx::query("UPDATE bench_floor SET version = version + 1, value = ? WHERE k = ? AND version = ?")
                        .bind(value)
                        .bind(key)
                        .bind(version)
                        .execute(pool)
                        .await?
                        .rows_affected()
                }
            }
            Backend::Postgres(pool) => {
                if version == 0 {
                    sqlx::query("INSERT INTO bench_floor (k, version, value) VALUES ($1, 1, $2) ON CONFLICT (k) DO NOTHING")
                        .bind(key)
                        .bind(value)
                        .execute(pool)
                        .await?
                        .rows_affected()
                } else {
                    sqlx::query("UPDATE bench_floor SET version = version + 1, value = $1 WHERE k = $2 AND version = $3")
                        .bind(value)
                        .bind(key)
                        .bind(version)
                        .execute(pool)
                        .await?
                        .rows_affected()
                }
            }
        };
        Ok(done == 1)
    }

    /// Closes the connection pool.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(pool) => {
                self.committer.close().await;
                pool.close().await
            }
            Backend::Postgres(pool) => {
                self.committer.close().await;
                pool.close().await
            }
        }
    }
}

/// Where a store lives: `postgres://…` (or `postgresql://…`), else a SQLite file path
/// (`sqlite://` in front is allowed).
enum Location<'a> {
    Sqlite(&'a Path),
    Postgres(&'a str),
}

impl<'a> Location<'a> {
    fn parse(location: &'a str) -> Location<'a> {
        if location.starts_with("postgres://") || location.starts_with("postgresql://") {
            Location::Postgres(location)
        } else {
            Location::Sqlite(Path::new(
                location.strip_prefix("sqlite://").unwrap_or(location),
            ))
        }
    }
}

/// The SQLite pool (and the options its dedicated writer connects with).
async fn connect_sqlite(path: &Path) -> Result<(SqlitePool, SqliteConnectOptions), StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // An acknowledged commit must survive power loss, not only a process crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(30))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options.clone())
        .await
        .map_err(|source| StoreError::Open {
            location: path.display().to_string(),
            source,
        })?;
    Ok((pool, options))
}

async fn connect_postgres(url: &str) -> Result<PgPool, StoreError> {
    let options =
        sqlx::postgres::PgConnectOptions::from_str(url).map_err(|source| StoreError::Open {
            location: redact(url),
            source,
        })?;
    PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Open {
            location: redact(url),
            source,
        })
}

#[allow(clippy::too_many_arguments)]
fn version_from_row(
    version: i64,
    value: String,
    seq: i64,
    author: String,
    proposal_id: Option<String>,
    trace_id: Option<String>,
    committed_at_ms: i64,
) -> Result<Version, StoreError> {
    Ok(Version {
        version: version as u64,
        value: parse_json(&value)?,
        seq: seq as u64,
        author,
        proposal_id,
        trace_id,
        committed_at_ms: committed_at_ms as u64,
    })
}

fn version_from_sqlite(row: sqlx::sqlite::SqliteRow) -> Result<Version, StoreError> {
    version_from_row(
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    )
}

fn version_from_postgres(row: sqlx::postgres::PgRow) -> Result<Version, StoreError> {
    version_from_row(
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    )
}

/// Hides the password of a connection URL for error messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The result of a commit before it is written: each write's new version follows its key's
/// current version.
fn plan(seq: u64, currents: &[Current], writes: &[Write]) -> Result<Committed, StoreError> {
    Ok(Committed {
        seq,
        versions: writes
            .iter()
            .map(|write| {
                let base = currents
                    .iter()
                    .find(|c| c.key == write.key)
                    .map_or(0, |c| c.version);
                let version = base
                    .checked_add(1)
                    .filter(|&v| i64::try_from(v).is_ok())
                    .ok_or_else(|| {
                        StoreError::OutOfRange(format!(
                            "{}/{} is at version {base}, the last one the store can hold",
                            write.key.namespace, write.key.key
                        ))
                    })?;
                Ok((write.key.namespace.clone(), write.key.key.clone(), version))
            })
            .collect::<Result<_, StoreError>>()?,
        replayed: false,
    })
}

/// Keeps whole commits of `rows` (sorted by sequence number, every row of each commit present):
/// when there are more than `limit` rows, the last commit is dropped unless it is the only one,
/// so a page ends at a commit boundary and is over `limit` only when one commit is.
fn whole_commits<T>(mut rows: Vec<T>, limit: i64, seq: impl Fn(&T) -> u64) -> Vec<T> {
    let over = usize::try_from(limit).is_ok_and(|limit| rows.len() > limit);
    if over
        && let (Some(first), Some(last)) = (rows.first().map(&seq), rows.last().map(&seq))
        && first != last
    {
        rows.retain(|row| seq(row) != last);
    }
    rows
}

/// When a lease of `ttl_ms` from `now` ends; an error past the largest time the store holds.
fn lease_end(now: u64, ttl_ms: u64) -> Result<u64, StoreError> {
    now.checked_add(ttl_ms)
        .filter(|&end| i64::try_from(end).is_ok())
        .ok_or_else(|| {
            StoreError::OutOfRange(format!(
                "a lease of {ttl_ms} ms would end past the largest time the store can hold ({} ms \
                 since the epoch)",
                i64::MAX
            ))
        })
}

/// The fencing token after `token`.
fn next_token(token: u64) -> Result<u64, StoreError> {
    token
        .checked_add(1)
        .filter(|&next| i64::try_from(next).is_ok())
        .ok_or_else(|| StoreError::OutOfRange(format!("fencing token {token} is the last one")))
}

/// `value` as the BIGINT the store keeps it in.
fn stored_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| {
        StoreError::OutOfRange(format!("{what} of {value} is more than the store holds"))
    })
}

fn current_of(key: &KeyRef, row: Option<(i64, String)>) -> Result<Current, StoreError> {
    Ok(match row {
        Some((version, value)) => Current {
            key: key.clone(),
            version: version as u64,
            value: Some(parse_json(&value)?),
            lease: None,
        },
        None => Current {
            key: key.clone(),
            version: 0,
            value: None,
            lease: None,
        },
    })
}

fn current_with_lease(
    key: &KeyRef,
    version: Option<i64>,
    value: Option<String>,
    token: Option<i64>,
    holder: Option<String>,
    expires_at_ms: Option<i64>,
) -> Result<Current, StoreError> {
    let row = version.zip(value);
    let lease = match (token, holder, expires_at_ms) {
        (Some(token), Some(holder), Some(expires)) => Some((token, holder, expires)),
        _ => None,
    };
    let mut current = current_of(key, row)?;
    current.lease = live_lease(lease, now_ms());
    Ok(current)
}

/// A `(ns, key, version, value, lease token, lease holder, lease expiry)` row, the shape both
/// group-commit readers select.
fn keyed_current<'r, R>(row: &'r R) -> Result<(KeyRef, Current), StoreError>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let key = KeyRef {
        namespace: row.try_get(0)?,
        key: row.try_get(1)?,
    };
    let current = current_with_lease(
        &key,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
    )?;
    Ok((key, current))
}

fn live_lease(row: Option<(i64, String, i64)>, now: u64) -> Option<Lease> {
    row.filter(|(_, _, expires)| *expires as u64 > now)
        .map(|(token, holder, expires)| Lease {
            token: token as u64,
            holder,
            expires_at_ms: expires as u64,
        })
}

fn replayed(result: &str) -> Result<Committed, StoreError> {
    let mut committed: Committed = serde_json::from_str(result)
        .map_err(|e| StoreError::Corrupt(format!("stored commit result unreadable: {e}")))?;
    committed.replayed = true;
    Ok(committed)
}

/// A plain PostgreSQL connection for administration (creating and dropping the databases
/// that tests and tools run in).
pub struct AdminConnection {
    pool: PgPool,
}

impl AdminConnection {
    pub async fn connect(url: &str) -> Result<AdminConnection, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|source| StoreError::Open {
                location: redact(url),
                source,
            })?;
        Ok(AdminConnection { pool })
    }

    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(sql).execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
