//! Shared agent state with propose → validate → commit: every write names the version it was
//! based on and either commits atomically or is refused with what the writer needs to rebase —
//! no silent overwrite, ever. The compare-and-set happens inside the store's transaction at
//! commit time, so the guarantee holds however many nodes share the store.

mod ops;
mod request_hash;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use concord_store::{
    CommitMeta, Current, KeyRef, Store, StoreError, StoredProposal, Transacted, Write,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use ops::Op;

/// Largest serialized value a key may hold, unless configured otherwise.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// How long a proposal may wait for its commit.
pub const DEFAULT_PROPOSAL_TTL: Duration = Duration::from_secs(300);
/// Most keys one write (a put, a proposal, hence a commit) may change. It also bounds a page of
/// the change feed, which holds whole commits: a commit with more rows than the page asks for
/// comes whole on a page of its own.
pub const MAX_KEYS_PER_COMMIT: usize = 1000;

/// What to do when a write's base version is no longer current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictPolicy {
    /// Refuse, returning the current version, value and what changed since the base.
    #[default]
    Reject,
    /// Rebase patches that touch paths nobody changed since the base; refuse on overlap.
    Merge,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("invalid operation on {key}: {reason}")]
    InvalidOperation { key: String, reason: String },
    #[error("the new value of {key} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        key: String,
        size: usize,
        limit: usize,
    },
    #[error("conflict: {}", describe_conflicts(.0))]
    Conflict(Vec<Conflict>),
    #[error("unknown proposal {0}")]
    UnknownProposal(String),
    #[error("proposal {0} has expired; propose again against the current versions")]
    ExpiredProposal(String),
    #[error("proposal {id} is {status}, not waiting for a commit")]
    ProposalNotOpen { id: String, status: String },
    /// A second commit of a proposal (another principal's, or under another idempotency key).
    #[error(
        "proposal {0} was already committed: a proposal commits once (retrying that commit with \
         its idempotency key returns its result)"
    )]
    AlreadyCommitted(String),
    /// The principal's idempotency key was used before for a different request.
    #[error(
        "idempotency key {key:?} was already used by {principal} for a different request (other \
         keys, operations or base versions); a new request needs a new key"
    )]
    IdempotencyKeyReused { principal: String, key: String },
    #[error("a write of {count} keys is over the limit of {limit} keys per commit")]
    TooManyChanges { count: usize, limit: usize },
    #[error("{key} is leased by {holder} (fencing token {token}) until {expires_at_ms}; {}", match .presented {
        Some(t) => format!("fencing token {t} is stale"),
        None => "a write must carry the lease's fencing token".to_string(),
    })]
    Leased {
        key: String,
        holder: String,
        token: u64,
        expires_at_ms: u64,
        presented: Option<u64>,
    },
    #[error("fencing token {presented} for {key} is stale: the lease was released or expired")]
    LeaseLost { key: String, presented: u64 },
    #[error("the value of {key} does not satisfy the schema of its namespace: {}", .errors.join("; "))]
    SchemaViolation { key: String, errors: Vec<String> },
    #[error("the schema configured for namespace {namespace} is not a valid JSON Schema: {reason}")]
    InvalidSchema { namespace: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the write to {key} was rejected: {reason}")]
    Rejected { key: String, reason: String },
    /// Internal: a commit found a stale base and needs the base values to decide.
    #[doc(hidden)]
    #[error("internal: base values needed")]
    NeedBaseValues,
}

fn describe_conflicts(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(|c| {
            format!(
                "{} was based on version {} but is now at version {}",
                c.key, c.base_version, c.current_version
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one key of a write was refused: enough to rebase and try again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub key: String,
    pub base_version: u64,
    pub current_version: u64,
    pub current_value: Option<Value>,
    /// RFC 6902 patch from the base value to the current value.
    pub changed_since_base: Value,
}

/// A key's value and version (version 0: absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub version: u64,
    pub value: Option<Value>,
}

/// One key of a write: the version it was based on and what to do to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: String,
    pub base_version: u64,
    pub ops: Vec<Op>,
    /// The fencing token of the caller's lease on the key, when it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: String,
    pub status: String,
    pub changes: Vec<Change>,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitResult {
    pub seq: u64,
    pub proposal_id: String,
    /// The new version of every written key.
    pub versions: HashMap<String, u64>,
    /// True when this answers a retry of a commit that had already happened.
    pub replayed: bool,
}

/// One kept version, for `history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub value: Value,
    pub seq: u64,
    pub author: String,
    pub proposal_id: Option<String>,
    pub trace_id: Option<String>,
    pub committed_at_ms: u64,
}

/// What a guard is asked to judge: one key's proposed new value.
#[derive(Debug, Clone, Serialize)]
pub struct WriteReview {
    pub key: String,
    pub namespace: String,
    pub author: String,
    pub current_version: u64,
    pub current_value: Option<Value>,
    pub proposed_value: Value,
}

/// A validation step every write passes before it may commit, besides the namespace schema:
/// the policy hook (who may write what) and reviewers such as a validator tool.
pub trait WriteGuard: Send + Sync + 'static {
    /// `Ok` lets the write through; `Err(reason)` refuses it with that reason.
    fn review<'a>(
        &'a self,
        review: &'a WriteReview,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
}

/// The answer to a claim: the lease, or who holds the key instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseOutcome {
    pub granted: bool,
    /// The fencing token to carry in writes (only when granted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    pub holder: String,
    pub expires_at_ms: u64,
}

impl LeaseOutcome {
    fn granted(lease: concord_store::Lease) -> Self {
        Self {
            granted: true,
            token: Some(lease.token),
            holder: lease.holder,
            expires_at_ms: lease.expires_at_ms,
        }
    }
}

/// One committed version in the change feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub seq: u64,
    pub key: String,
    pub version: u64,
    pub value: Value,
    pub author: String,
    pub proposal_id: Option<String>,
    pub committed_at_ms: u64,
}

/// Who is writing, for the history.
#[derive(Debug, Clone, Default)]
pub struct Author {
    pub principal: String,
    pub trace_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StateOptions {
    pub max_value_bytes: usize,
    pub proposal_ttl: Duration,
    pub default_policy: ConflictPolicy,
    pub policies: HashMap<String, ConflictPolicy>,
    /// namespace → JSON Schema every value there must satisfy.
    pub schemas: HashMap<String, Value>,
    /// Versions of each key kept in the history (None: all). Older versions leave the
    /// history, the diff and the change feed.
    pub keep_versions: Option<u64>,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            proposal_ttl: DEFAULT_PROPOSAL_TTL,
            default_policy: ConflictPolicy::Reject,
            policies: HashMap::new(),
            schemas: HashMap::new(),
            keep_versions: None,
        }
    }
}

#[derive(Clone)]
pub struct StateService {
    store: Store,
    options: StateOptions,
    validators: Arc<HashMap<String, jsonschema::Validator>>,
    guards: Vec<std::sync::Arc<dyn WriteGuard>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Splits and checks `namespace/path`.
pub fn parse_key(key: &str) -> Result<KeyRef, StateError> {
    let invalid = |reason: &str| StateError::InvalidKey {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let (namespace, path) = key
        .split_once('/')
        .ok_or_else(|| invalid("expected namespace/path, e.g. \"project/plan\""))?;
    if namespace.is_empty()
        || namespace.len() > 64
        || !namespace
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(invalid(
            "the namespace must be 1-64 characters of a-z, 0-9, '-' and '_'",
        ));
    }
    if path.is_empty() || path.len() > 512 {
        return Err(invalid("the path must be 1-512 characters"));
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(invalid(
            "path segments must be non-empty and not '.' or '..'",
        ));
    }
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '@'))
    {
        return Err(invalid(
            "the path may contain only letters, digits and - _ . / : @",
        ));
    }
    Ok(KeyRef {
        namespace: namespace.to_string(),
        key: path.to_string(),
    })
}

fn key_name(key: &KeyRef) -> String {
    format!("{}/{}", key.namespace, key.key)
}

impl StateService {
    /// A service over `store`. Fails when a configured schema is not a valid JSON Schema.
    pub fn new(store: Store, options: StateOptions) -> Result<Self, StateError> {
        let mut validators = HashMap::new();
        for (namespace, schema) in &options.schemas {
            let validator =
                jsonschema::validator_for(schema).map_err(|e| StateError::InvalidSchema {
                    namespace: namespace.clone(),
                    reason: e.to_string(),
                })?;
            validators.insert(namespace.clone(), validator);
        }
        Ok(Self {
            store,
            options,
            validators: Arc::new(validators),
            guards: Vec::new(),
        })
    }

    /// Adds a validation step every write must pass.
    pub fn with_guard(mut self, guard: std::sync::Arc<dyn WriteGuard>) -> Self {
        self.guards.push(guard);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn policy(&self, namespace: &str) -> ConflictPolicy {
        self.options
            .policies
            .get(namespace)
            .copied()
            .unwrap_or(self.options.default_policy)
    }

    pub async fn get(&self, key: &str) -> Result<Entry, StateError> {
        let key_ref = parse_key(key)?;
        let current = self.store.get(&key_ref).await?;
        Ok(Entry {
            key: key.to_string(),
            version: current.version,
            value: current.value,
        })
    }

    /// Keys under `prefix` (`namespace/` or `namespace/partial-path`).
    pub async fn list(&self, prefix: &str, limit: u32) -> Result<Vec<Entry>, StateError> {
        let (namespace, path_prefix) = prefix.split_once('/').unwrap_or((prefix, ""));
        parse_key(&format!("{namespace}/x"))?;
        Ok(self
            .store
            .list(namespace, path_prefix, limit)
            .await?
            .into_iter()
            .map(|c| Entry {
                key: key_name(&c.key),
                version: c.version,
                value: c.value,
            })
            .collect())
    }

    pub async fn history(&self, key: &str, limit: u32) -> Result<Vec<HistoryEntry>, StateError> {
        let key_ref = parse_key(key)?;
        Ok(self
            .store
            .history(&key_ref, limit)
            .await?
            .into_iter()
            .map(|v| HistoryEntry {
                version: v.version,
                value: v.value,
                seq: v.seq,
                author: v.author,
                proposal_id: v.proposal_id,
                trace_id: v.trace_id,
                committed_at_ms: v.committed_at_ms,
            })
            .collect())
    }

    /// The change feed: committed versions under `prefix` with a sequence number above
    /// `after_seq`, oldest first. Resume with the last `seq` seen: no gaps, no duplicates.
    pub async fn changes(
        &self,
        prefix: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<FeedEntry>, StateError> {
        let (namespace, path_prefix) = prefix.split_once('/').unwrap_or((prefix, ""));
        parse_key(&format!("{namespace}/x"))?;
        // The store pages whole commits (a page never ends inside a multi-key commit), so
        // resuming after the last sequence number loses none of a commit's keys. A page is at
        // most `limit` rows, or one commit of up to MAX_KEYS_PER_COMMIT.
        let rows = self
            .store
            .changes_since(namespace, path_prefix, after_seq, limit)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(key, v)| FeedEntry {
                seq: v.seq,
                key: key_name(&key),
                version: v.version,
                value: v.value,
                author: v.author,
                proposal_id: v.proposal_id,
                committed_at_ms: v.committed_at_ms,
            })
            .collect())
    }

    /// Keys (`namespace/path`) changed after commit `after_seq`, with each change's sequence
    /// number, oldest first; whole commits, as in [`Self::changes`].
    pub async fn changed_keys(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, StateError> {
        Ok(self
            .store
            .changed_keys_since(after_seq, limit)
            .await?
            .into_iter()
            .map(|(key, seq)| (key_name(&key), seq))
            .collect())
    }

    pub async fn last_seq(&self) -> Result<u64, StateError> {
        Ok(self.store.last_seq().await?)
    }

    /// RFC 6902 patch from version `from` of `key` to version `to` (0: absent).
    pub async fn diff(&self, key: &str, from: u64, to: u64) -> Result<Value, StateError> {
        let key_ref = parse_key(key)?;
        let mut values = Vec::new();
        for version in [from, to] {
            let value = self.store.value_at(&key_ref, version).await?;
            if version != 0 && value.is_none() {
                return Err(StateError::InvalidOperation {
                    key: key.to_string(),
                    reason: format!("version {version} does not exist (or is no longer kept)"),
                });
            }
            values.push(value);
        }
        Ok(ops::diff(values[0].as_ref(), values[1].as_ref()))
    }

    /// Checks a write and records it as a proposal to commit later. The operations are tried
    /// against the current values now, so a malformed patch is refused here, not at commit.
    pub async fn propose(&self, changes: Vec<Change>) -> Result<Proposal, StateError> {
        self.propose_as(changes, &Author::default()).await
    }

    /// [`Self::propose`] on behalf of `author`, whom the guards see.
    pub async fn propose_as(
        &self,
        changes: Vec<Change>,
        author: &Author,
    ) -> Result<Proposal, StateError> {
        self.check_changes(&changes, author, false).await?;
        let id = format!("p-{}", uuid::Uuid::new_v4().simple());
        let ttl_ms = u64::try_from(self.options.proposal_ttl.as_millis()).unwrap_or(u64::MAX);
        // Capped at the largest time the store holds: a huge configured TTL means "never".
        let expires_at_ms = now_ms().saturating_add(ttl_ms).min(i64::MAX.unsigned_abs());
        self.store
            .put_proposal(&StoredProposal {
                id: id.clone(),
                body: serde_json::to_value(&changes).unwrap_or(Value::Null),
                status: "validated".into(),
                expires_at_ms,
            })
            .await?;
        Ok(Proposal {
            id,
            status: "validated".into(),
            changes,
            expires_at_ms,
        })
    }

    /// Keys, operations and sizes, tried against the current values, and every guard (the
    /// policy hook, reviewers) asked about the value each key would get. `at_commit`: these
    /// are the stored changes of a proposal being committed, checked again for the committer;
    /// a change whose base is stale and whose operations no longer apply is left to the
    /// commit, which refuses it as a conflict (nothing of it is written).
    async fn check_changes(
        &self,
        changes: &[Change],
        author: &Author,
        at_commit: bool,
    ) -> Result<(), StateError> {
        if changes.is_empty() {
            return Err(StateError::InvalidOperation {
                key: String::new(),
                reason: "a proposal needs at least one change".into(),
            });
        }
        let keys = check_keys(changes)?;
        for (change, key) in changes.iter().zip(keys) {
            if change.ops.is_empty() {
                return Err(StateError::InvalidOperation {
                    key: change.key.clone(),
                    reason: "no operations".into(),
                });
            }
            let current = self.store.get(&key).await?;
            let value = match ops::apply_all(&change.ops, current.value.clone()) {
                Ok(value) => value,
                Err(_) if at_commit && current.version != change.base_version => continue,
                Err(reason) => {
                    return Err(StateError::InvalidOperation {
                        key: change.key.clone(),
                        reason,
                    });
                }
            };
            self.check_size(&change.key, &value)?;
            check_schema(&self.validators, &key.namespace, &change.key, &value)?;
            if !self.guards.is_empty() {
                let review = WriteReview {
                    key: change.key.clone(),
                    namespace: key.namespace.clone(),
                    author: author.principal.clone(),
                    current_version: current.version,
                    current_value: current.value.clone(),
                    proposed_value: value,
                };
                for guard in &self.guards {
                    guard
                        .review(&review)
                        .await
                        .map_err(|reason| StateError::Rejected {
                            key: change.key.clone(),
                            reason,
                        })?;
                }
            }
        }
        Ok(())
    }

    fn check_size(&self, key: &str, value: &Value) -> Result<(), StateError> {
        let size = value.to_string().len();
        if size > self.options.max_value_bytes {
            return Err(StateError::TooLarge {
                key: key.to_string(),
                size,
                limit: self.options.max_value_bytes,
            });
        }
        Ok(())
    }

    /// A stored proposal and its changes.
    pub async fn proposal(&self, proposal_id: &str) -> Result<Proposal, StateError> {
        let stored = self
            .store
            .get_proposal(proposal_id)
            .await?
            .ok_or_else(|| StateError::UnknownProposal(proposal_id.to_string()))?;
        let changes: Vec<Change> = serde_json::from_value(stored.body)
            .map_err(|e| StoreError::Corrupt(format!("proposal {proposal_id} unreadable: {e}")))?;
        Ok(Proposal {
            id: stored.id,
            status: stored.status,
            changes,
            expires_at_ms: stored.expires_at_ms,
        })
    }

    /// Commits a proposal: one transaction that re-checks every base version, after the
    /// proposal's changes passed every check of the propose path again for the committer
    /// (operations, size, schema, guards). A proposal commits once: the transaction that
    /// writes it also marks it committed, so of several commits of one proposal exactly one
    /// applies and the others fail with [`StateError::AlreadyCommitted`]. Retrying the commit
    /// with the same idempotency key (by default `proposal:ID`, which is the committer's own)
    /// returns its result instead.
    pub async fn commit(
        &self,
        proposal_id: &str,
        idempotency_key: Option<String>,
        author: &Author,
    ) -> Result<CommitResult, StateError> {
        let proposal = self.proposal(proposal_id).await?;
        let idempotency_key = idempotency_key.unwrap_or_else(|| format!("proposal:{proposal_id}"));
        match proposal.status.as_str() {
            "validated" if proposal.expires_at_ms < now_ms() => {
                self.store
                    .set_proposal_status(proposal_id, "validated", "expired")
                    .await?;
                return Err(StateError::ExpiredProposal(proposal_id.to_string()));
            }
            "validated" => self.check_changes(&proposal.changes, author, true).await?,
            // Only a retry of the commit that applied it gets past the store: it replays.
            "committed" => {}
            _ => {
                return Err(StateError::ProposalNotOpen {
                    id: proposal_id.to_string(),
                    status: proposal.status,
                });
            }
        }
        let request = json!({"commit": proposal_id, "changes": hashed_changes(&proposal.changes)});
        let result = self
            .apply(
                &proposal.changes,
                CommitRequest {
                    proposal_id,
                    idempotency_key: Some(&idempotency_key),
                    request_hash: Some(request_hash::request_hash(&request)),
                    closes_proposal: true,
                },
                author,
            )
            .await;
        if let Err(StateError::Conflict(_)) = &result {
            self.store
                .set_proposal_status(proposal_id, "validated", "conflicted")
                .await?;
        }
        result
    }

    /// Claims `key` for `holder`. With the `token` of a live lease the holder already has, the
    /// lease is renewed instead.
    pub async fn claim(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
        token: Option<u64>,
    ) -> Result<LeaseOutcome, StateError> {
        let key_ref = parse_key(key)?;
        let out_of_range = |reason: String| StateError::InvalidOperation {
            key: key.to_string(),
            reason,
        };
        let ttl_ms = u64::try_from(ttl.as_millis())
            .map_err(|_| {
                out_of_range(format!(
                    "a lease of {ttl:?} is longer than the store can hold"
                ))
            })?
            .max(1);
        let leased = |error: StoreError| match error {
            StoreError::OutOfRange(reason) => out_of_range(reason),
            other => StateError::Store(other),
        };
        if let Some(token) = token {
            return Ok(
                match self
                    .store
                    .renew(&key_ref, token, ttl_ms)
                    .await
                    .map_err(leased)?
                {
                    Some(lease) => LeaseOutcome::granted(lease),
                    None => {
                        return Err(StateError::LeaseLost {
                            key: key.to_string(),
                            presented: token,
                        });
                    }
                },
            );
        }
        Ok(
            match self
                .store
                .claim(&key_ref, holder, ttl_ms)
                .await
                .map_err(leased)?
            {
                concord_store::Claim::Granted(lease) => LeaseOutcome::granted(lease),
                concord_store::Claim::Held(lease) => LeaseOutcome {
                    granted: false,
                    token: None,
                    holder: lease.holder,
                    expires_at_ms: lease.expires_at_ms,
                },
            },
        )
    }

    /// Releases the live lease held under `token`.
    pub async fn release(&self, key: &str, token: u64) -> Result<(), StateError> {
        let key_ref = parse_key(key)?;
        if self.store.release(&key_ref, token).await? {
            Ok(())
        } else {
            Err(StateError::LeaseLost {
                key: key.to_string(),
                presented: token,
            })
        }
    }

    /// Propose and commit in one call, for simple writers. Nothing waits between the two, so
    /// the proposal is not stored; its id still names the commit in the history.
    pub async fn put(
        &self,
        changes: Vec<Change>,
        idempotency_key: Option<String>,
        author: &Author,
    ) -> Result<CommitResult, StateError> {
        // The commit applies the operations and checks size and schema inside its transaction,
        // with the same errors; a separate pass runs only when guards must see the new values.
        if changes.is_empty() {
            return Err(StateError::InvalidOperation {
                key: String::new(),
                reason: "a write needs at least one change".into(),
            });
        }
        if !self.guards.is_empty() {
            self.check_changes(&changes, author, false).await?;
        }
        let proposal_id = format!("put-{}", uuid::Uuid::new_v4().simple());
        // A fresh put has nothing to be a retry of; only a caller's own key can repeat, and
        // only for this same request.
        let request_hash = idempotency_key
            .as_ref()
            .map(|_| request_hash::request_hash(&json!({"put": hashed_changes(&changes)})));
        self.apply(
            &changes,
            CommitRequest {
                proposal_id: &proposal_id,
                idempotency_key: idempotency_key.as_deref(),
                request_hash,
                closes_proposal: false,
            },
            author,
        )
        .await
    }

    async fn apply(
        &self,
        changes: &[Change],
        request: CommitRequest<'_>,
        author: &Author,
    ) -> Result<CommitResult, StateError> {
        let keys = check_keys(changes)?;
        let policies: Vec<ConflictPolicy> =
            keys.iter().map(|k| self.policy(&k.namespace)).collect();
        let proposal_id = request.proposal_id;
        let meta = CommitMeta {
            author: author.principal.clone(),
            proposal_id: Some(proposal_id.to_string()),
            trace_id: author.trace_id.clone(),
            // Keys are the committing principal's own, bound to this request.
            idempotency_key: request.idempotency_key.map(str::to_string),
            request_hash: request.request_hash,
            closes_proposal: request.closes_proposal,
            keep_versions: self.options.keep_versions,
        };
        let limit = self.options.max_value_bytes;
        // The decision runs in the store's committer, so it owns what it reads.
        let shared_changes: Arc<[Change]> = changes.into();
        let policies: Arc<[ConflictPolicy]> = policies.into();
        // The values at the base versions matter only when a base is stale (to merge, or to
        // report what changed). The first attempt goes without them; a stale key sends the
        // commit back once to fetch them (history never changes, so they can be read outside
        // the transaction) and try again.
        let mut base_values: Option<Arc<[Option<Value>]>> = None;
        let outcome = loop {
            let attempt = shared_changes.clone();
            let policies = policies.clone();
            let validators = self.validators.clone();
            let bases = base_values.clone();
            let outcome = self
                .store
                .transact(&keys, &meta, move |currents| {
                    decide(
                        &attempt,
                        currents,
                        bases.as_deref(),
                        &policies,
                        limit,
                        &validators,
                    )
                })
                .await
                .map_err(refusal_of)?;
            match outcome {
                Transacted::Refused(StateError::NeedBaseValues) if base_values.is_none() => {
                    let mut values = Vec::with_capacity(changes.len());
                    for (change, key) in changes.iter().zip(&keys) {
                        values.push(self.store.value_at(key, change.base_version).await?);
                    }
                    base_values = Some(values.into());
                }
                other => break other,
            }
        };
        match outcome {
            Transacted::Refused(StateError::Conflict(mut conflicts)) => {
                if base_values.is_none() {
                    self.complete_conflicts(&mut conflicts).await?;
                }
                Err(StateError::Conflict(conflicts))
            }
            Transacted::Committed(committed) => Ok(CommitResult {
                seq: committed.seq,
                proposal_id: proposal_id.to_string(),
                versions: committed
                    .versions
                    .into_iter()
                    .map(|(ns, key, version)| (format!("{ns}/{key}"), version))
                    .collect(),
                replayed: committed.replayed,
            }),
            Transacted::Refused(error) => Err(error),
        }
    }
}

/// What a commit is, besides its changes.
struct CommitRequest<'a> {
    proposal_id: &'a str,
    idempotency_key: Option<&'a str>,
    /// The hash the idempotency key is bound to (see `request_hash`).
    request_hash: Option<String>,
    /// The commit of a stored proposal, which it closes.
    closes_proposal: bool,
}

/// What an idempotency key is bound to: the keys, operations and base versions of a write (the
/// lease token is not part of it: a retry may carry a renewed one).
fn hashed_changes(changes: &[Change]) -> Value {
    Value::Array(
        changes
            .iter()
            .map(|c| json!({"key": c.key, "base_version": c.base_version, "ops": c.ops}))
            .collect(),
    )
}

/// The keys of a write, checked: at least one, at most [`MAX_KEYS_PER_COMMIT`], each valid and
/// named once.
fn check_keys(changes: &[Change]) -> Result<Vec<KeyRef>, StateError> {
    if changes.len() > MAX_KEYS_PER_COMMIT {
        return Err(StateError::TooManyChanges {
            count: changes.len(),
            limit: MAX_KEYS_PER_COMMIT,
        });
    }
    let keys: Vec<KeyRef> = changes
        .iter()
        .map(|c| parse_key(&c.key))
        .collect::<Result<_, _>>()?;
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    for (key, change) in keys.iter().zip(changes) {
        if !seen.insert(key) {
            return Err(StateError::InvalidOperation {
                key: change.key.clone(),
                reason: "the key is named twice in one write; put all its operations in one change"
                    .into(),
            });
        }
    }
    Ok(keys)
}

/// A store error as the state service reports it: the refusals the store decides itself
/// (idempotency key reused, proposal already committed) get their own errors.
fn refusal_of(error: StoreError) -> StateError {
    match error {
        StoreError::IdempotencyKeyReused { principal, key } => {
            StateError::IdempotencyKeyReused { principal, key }
        }
        StoreError::ProposalClosed { id, status } if status == "committed" => {
            StateError::AlreadyCommitted(id)
        }
        StoreError::ProposalClosed { id, status } => StateError::ProposalNotOpen { id, status },
        other => StateError::Store(other),
    }
}

impl StateService {
    /// A conflict decided without the base values says what changed since the base once the
    /// commit is over: history never changes, so the base value can be read afterwards, without
    /// holding up the commits queued behind this one.
    async fn complete_conflicts(&self, conflicts: &mut [Conflict]) -> Result<(), StateError> {
        for conflict in conflicts {
            let key = parse_key(&conflict.key)?;
            let base = self.store.value_at(&key, conflict.base_version).await?;
            conflict.changed_since_base = ops::diff(base.as_ref(), conflict.current_value.as_ref());
        }
        Ok(())
    }
}

/// The commit-time decision, inside the store's transaction: every base version re-checked.
fn decide(
    changes: &[Change],
    currents: &[Current],
    base_values: Option<&[Option<Value>]>,
    policies: &[ConflictPolicy],
    limit: usize,
    validators: &HashMap<String, jsonschema::Validator>,
) -> Result<Vec<Write>, StateError> {
    let mut writes = Vec::with_capacity(changes.len());
    let mut conflicts = Vec::new();
    for (index, ((change, current), policy)) in
        changes.iter().zip(currents).zip(policies).enumerate()
    {
        match (&current.lease, change.lease_token) {
            (Some(lease), presented) if presented != Some(lease.token) => {
                return Err(StateError::Leased {
                    key: change.key.clone(),
                    holder: lease.holder.clone(),
                    token: lease.token,
                    expires_at_ms: lease.expires_at_ms,
                    presented,
                });
            }
            (None, Some(presented)) => {
                return Err(StateError::LeaseLost {
                    key: change.key.clone(),
                    presented,
                });
            }
            _ => {}
        }
        let stale = current.version != change.base_version;
        // Only a merge needs the base value inside the commit; a plain conflict's report of
        // what changed since the base is completed after the commit (see `complete_conflicts`).
        let needs_base =
            stale && !ops::all_commutative(&change.ops) && *policy == ConflictPolicy::Merge;
        let base_value = match base_values {
            Some(values) => values[index].as_ref(),
            None if needs_base => return Err(StateError::NeedBaseValues),
            None => None,
        };
        let rebase_allowed = !stale
            || ops::all_commutative(&change.ops)
            || (*policy == ConflictPolicy::Merge
                && ops::disjoint_from_changes(&change.ops, base_value, current.value.as_ref()));
        if !rebase_allowed {
            conflicts.push(Conflict {
                key: change.key.clone(),
                base_version: change.base_version,
                current_version: current.version,
                current_value: current.value.clone(),
                changed_since_base: ops::diff(base_value, current.value.as_ref()),
            });
            continue;
        }
        let value = ops::apply_all(&change.ops, current.value.clone()).map_err(|reason| {
            StateError::InvalidOperation {
                key: change.key.clone(),
                reason,
            }
        })?;
        let size = value.to_string().len();
        if size > limit {
            return Err(StateError::TooLarge {
                key: change.key.clone(),
                size,
                limit,
            });
        }
        // A rebased value is a new value: it must satisfy the schema too.
        check_schema(validators, &current.key.namespace, &change.key, &value)?;
        writes.push(Write {
            key: current.key.clone(),
            value,
        });
    }
    if conflicts.is_empty() {
        Ok(writes)
    } else {
        Err(StateError::Conflict(conflicts))
    }
}

fn check_schema(
    validators: &HashMap<String, jsonschema::Validator>,
    namespace: &str,
    key: &str,
    value: &Value,
) -> Result<(), StateError> {
    let Some(validator) = validators.get(namespace) else {
        return Ok(());
    };
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .take(10)
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(StateError::SchemaViolation {
            key: key.to_string(),
            errors,
        })
    }
}

/// The structured form of a refusal, for tool results and API bodies.
pub fn error_details(error: &StateError) -> Value {
    match error {
        StateError::Conflict(conflicts) => {
            let first = conflicts.first();
            json!({
                "conflict": true,
                "key": first.map(|c| c.key.clone()),
                "current_version": first.map(|c| c.current_version),
                "current_value": first.and_then(|c| c.current_value.clone()),
                "conflicts": conflicts,
            })
        }
        StateError::Leased {
            key,
            holder,
            token,
            expires_at_ms,
            ..
        } => json!({
            "conflict": false,
            "error": error.to_string(),
            "key": key,
            "lease": {"holder": holder, "token": token, "expires_at_ms": expires_at_ms},
        }),
        StateError::IdempotencyKeyReused { key, .. } => json!({
            "conflict": false,
            "error": error.to_string(),
            "idempotency_key_reused": true,
            "idempotency_key": key,
        }),
        StateError::AlreadyCommitted(id) => json!({
            "conflict": false,
            "error": error.to_string(),
            "already_committed": true,
            "proposal_id": id,
        }),
        other => json!({"conflict": false, "error": other.to_string()}),
    }
}

#[cfg(test)]
mod tests;
