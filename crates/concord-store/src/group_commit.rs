//! Group commit. Every durable commit costs a flush of the log (SQLite's fsync, PostgreSQL's WAL
//! flush), so committing each write in its own transaction caps throughput at the disk's flush
//! rate however many writers there are. Instead, one task per store commits whatever has queued
//! up since its last commit as one transaction: many commits, one flush. Each queued commit is
//! still decided on its own, in queue order, against the state left by the ones before it (an
//! in-memory overlay of the keys the batch touches), so a batch is equivalent to running its
//! commits one after another; nobody is acknowledged before the batch is durable.
//!
//! The deciding is the same for both databases ([`plan_batch`]); reading and writing a batch is
//! each backend's own (`sqlite_batch`, `postgres_batch`), a fixed handful of statements however
//! large the batch. If a batch's transaction fails, its commits are retried one per
//! transaction, so one commit's failure is reported to that commit alone.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::value_cache::ValueCache;
use crate::{CommitMeta, Committed, Current, KeyRef, StoreError, Transacted, Write, now_ms, plan};

/// One commit's outcome: committed (or replayed), refused by its decision, or failed on its own
/// (an idempotency key reused for another request, a proposal no longer open).
pub(crate) type Outcome = Result<Transacted<Refusal>, StoreError>;

/// A decision's refusal, type-erased on its way through the queue.
pub(crate) type Refusal = Box<dyn Any + Send>;
/// Called once per attempt (a failed batch retries its commits one by one).
pub(crate) type Decide = Box<dyn FnMut(&[Current]) -> Result<Vec<Write>, Refusal> + Send>;

/// Commits queued while the previous batch was being written join the next one, up to this many.
const MAX_BATCH: usize = 512;

pub(crate) struct Job {
    pub keys: Vec<KeyRef>,
    pub meta: CommitMeta,
    decide: Decide,
    done: oneshot::Sender<Outcome>,
}

impl Job {
    /// Under which name this commit's idempotency key is looked up and recorded.
    pub fn idempotency(&self) -> Option<IdempotencyKey> {
        IdempotencyKey::of(&self.meta)
    }
}

/// How a commit's idempotency key is found again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum IdempotencyKey {
    /// Shared by everyone and bound to nothing (`state_commits.idempotency_key`): commits from
    /// before schema version 8, and the store's own callers that give no request hash.
    Global(String),
    /// One principal's key, bound to the request it was first used for (`state_idempotency`).
    Scoped { principal: String, key: String },
}

impl IdempotencyKey {
    pub fn of(meta: &CommitMeta) -> Option<IdempotencyKey> {
        let key = meta.idempotency_key.clone()?;
        Some(match meta.request_hash {
            Some(_) => IdempotencyKey::Scoped {
                principal: meta.author.clone(),
                key,
            },
            None => IdempotencyKey::Global(key),
        })
    }
}

/// An earlier commit's result under an idempotency key, and the request it answered.
pub(crate) struct StoredResult {
    pub committed: Committed,
    /// None for global keys, which are bound to no request.
    pub request_hash: Option<String>,
}

/// Reads and writes batches for one database.
pub(crate) trait BatchWriter: Send + 'static {
    /// Decides `jobs` in order (with [`plan_batch`]) and writes them in one transaction.
    fn write(
        &mut self,
        jobs: &mut [Job],
    ) -> impl Future<Output = Result<Vec<Outcome>, StoreError>> + Send;

    fn close(self) -> impl Future<Output = ()> + Send;
}

enum Message {
    Commit(Job),
    Close(oneshot::Sender<()>),
}

/// The handle to the committing task; cheap to clone.
#[derive(Clone)]
pub(crate) struct GroupCommitter {
    queue: mpsc::UnboundedSender<Message>,
    stats: Arc<Stats>,
    cache: Option<Arc<ValueCache>>,
}

/// How the commits were grouped, for metrics and tests.
#[derive(Debug, Default)]
struct Stats {
    batches: AtomicU64,
    commits: AtomicU64,
}

impl GroupCommitter {
    /// `cache`: the writer records its commits there (only where it is the only writer).
    pub fn start<W: BatchWriter>(writer: W, cache: Option<Arc<ValueCache>>) -> Self {
        let (queue, messages) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(writer, messages, stats.clone()));
        Self {
            queue,
            stats,
            cache,
        }
    }

    /// Current values as of the latest durable commit, for reads that can skip the database.
    pub fn cache(&self) -> Option<&ValueCache> {
        self.cache.as_deref()
    }

    /// (transactions written, commits they carried) since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.batches.load(Ordering::Relaxed),
            self.stats.commits.load(Ordering::Relaxed),
        )
    }

    /// Queues one commit and waits until its batch is durable (or refused, or failed). A caller
    /// that stops waiting does not withdraw the commit: like a database commit in flight, it
    /// either happens or not, and an idempotency key makes the retry safe.
    pub async fn commit(&self, keys: Vec<KeyRef>, meta: CommitMeta, decide: Decide) -> Outcome {
        let (done, outcome) = oneshot::channel();
        let job = Job {
            keys,
            meta,
            decide,
            done,
        };
        self.queue
            .send(Message::Commit(job))
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes the queued commits and closes the writer.
    pub async fn close(&self) {
        let (ack, closed) = oneshot::channel();
        if self.queue.send(Message::Close(ack)).is_ok() {
            let _ = closed.await;
        }
    }
}

async fn run<W: BatchWriter>(
    mut writer: W,
    mut messages: mpsc::UnboundedReceiver<Message>,
    stats: Arc<Stats>,
) {
    while let Some(first) = messages.recv().await {
        let mut jobs = Vec::new();
        let mut close = None;
        match first {
            Message::Commit(job) => jobs.push(job),
            Message::Close(ack) => close = Some(ack),
        }
        while close.is_none() && jobs.len() < MAX_BATCH {
            match messages.try_recv() {
                Ok(Message::Commit(job)) => jobs.push(job),
                Ok(Message::Close(ack)) => close = Some(ack),
                Err(_) => break,
            }
        }
        if !jobs.is_empty() {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .commits
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            commit_jobs(&mut writer, jobs).await;
        }
        if let Some(ack) = close {
            writer.close().await;
            let _ = ack.send(());
            return;
        }
    }
}

async fn commit_jobs<W: BatchWriter>(writer: &mut W, mut jobs: Vec<Job>) {
    let span = tracing::debug_span!("group_commit", commits = jobs.len());
    let _entered = span.enter();
    match writer.write(&mut jobs).await {
        Ok(outcomes) => {
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                let _ = job.done.send(outcome);
            }
        }
        Err(error) if jobs.len() == 1 => {
            if let Some(job) = jobs.pop() {
                let _ = job.done.send(Err(error));
            }
        }
        Err(error) => {
            tracing::warn!(%error, commits = jobs.len(), "a group commit failed; committing its commits one by one");
            for job in jobs {
                let mut alone = vec![job];
                let outcome = match writer.write(&mut alone).await {
                    Ok(mut outcomes) if !outcomes.is_empty() => outcomes.remove(0),
                    Ok(_) => Err(StoreError::Corrupt("a commit got no outcome".into())),
                    Err(error) => Err(error),
                };
                if let Some(job) = alone.pop() {
                    let _ = job.done.send(outcome);
                }
            }
        }
    }
}

/// Every key the batch names, sorted, once.
pub(crate) fn wanted_keys(jobs: &[Job]) -> Vec<KeyRef> {
    let mut keys: Vec<KeyRef> = jobs.iter().flat_map(|job| job.keys.clone()).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Every idempotency key the batch carries, sorted, once.
pub(crate) fn idempotency_keys(jobs: &[Job]) -> Vec<IdempotencyKey> {
    let mut keys: Vec<IdempotencyKey> = jobs.iter().filter_map(Job::idempotency).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Every proposal a commit of the batch closes, sorted, once.
pub(crate) fn closed_proposals(jobs: &[Job]) -> Vec<String> {
    let mut ids: Vec<String> = jobs
        .iter()
        .filter(|job| job.meta.closes_proposal)
        .filter_map(|job| job.meta.proposal_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A key's newest value in the batch (the only one the current-value table needs).
pub(crate) struct Latest {
    pub version: u64,
    pub value: Value,
    pub text: String,
    /// Index of the batch commit that wrote it.
    pub commit: usize,
}

/// One version the batch adds to the history.
pub(crate) struct HistoryRow {
    pub key: KeyRef,
    pub version: u64,
    pub text: String,
    pub commit: usize,
}

/// A commit the batch writes; its sequence number is the batch's first plus its index.
pub(crate) struct PlannedCommit {
    pub meta: CommitMeta,
    pub committed_at_ms: u64,
    versions: Vec<(String, String, u64)>,
}

impl PlannedCommit {
    /// The key `state_commits.idempotency_key` keeps (global keys only).
    pub fn global_key(&self) -> Option<&str> {
        match IdempotencyKey::of(&self.meta) {
            Some(IdempotencyKey::Global(_)) => self.meta.idempotency_key.as_deref(),
            _ => None,
        }
    }

    /// (principal, key, request hash) of a scoped idempotency key, for `state_idempotency`.
    pub fn scoped_key(&self) -> Option<(&str, &str, &str)> {
        let key = self.meta.idempotency_key.as_deref()?;
        let hash = self.meta.request_hash.as_deref()?;
        Some((self.meta.author.as_str(), key, hash))
    }
}

enum Planned {
    Fresh(usize),
    /// The same idempotency key as an earlier commit of this batch.
    RepeatOf(usize),
    /// The same idempotency key as a commit already stored.
    Stored(Committed),
    Refused(Refusal),
    /// Not decided: the commit is not allowed to happen at all.
    Failed(StoreError),
}

/// What a batch decided, before sequence numbers are assigned.
pub(crate) struct Plan {
    outcomes: Vec<Planned>,
    pub commits: Vec<PlannedCommit>,
    pub history: Vec<HistoryRow>,
    pub latest: HashMap<KeyRef, Latest>,
    /// Per key, the newest version the history no longer keeps.
    pub prune: HashMap<KeyRef, u64>,
    /// Proposals the batch commits (each moves from `validated` to `committed`).
    pub closed_proposals: Vec<String>,
}

impl Plan {
    pub fn committed(&self, index: usize, first_seq: u64) -> Committed {
        Committed {
            seq: first_seq + index as u64,
            versions: self.commits[index].versions.clone(),
            replayed: false,
        }
    }

    pub fn into_outcomes(self, first_seq: u64) -> Vec<Outcome> {
        let committed = |index: usize, replayed: bool| Committed {
            seq: first_seq + index as u64,
            versions: self.commits[index].versions.clone(),
            replayed,
        };
        let mut outcomes = Vec::with_capacity(self.outcomes.len());
        for planned in self.outcomes {
            outcomes.push(match planned {
                Planned::Fresh(index) => Ok(Transacted::Committed(committed(index, false))),
                Planned::RepeatOf(index) => Ok(Transacted::Committed(committed(index, true))),
                Planned::Stored(earlier) => Ok(Transacted::Committed(earlier)),
                Planned::Refused(refusal) => Ok(Transacted::Refused(refusal)),
                Planned::Failed(error) => Err(error),
            });
        }
        outcomes
    }
}

/// Decides `jobs` in order against `overlay` (the current state of every key they name), which
/// each commit updates for the ones after it. `stored`: earlier results of the batch's
/// idempotency keys; `proposals`: the status of every proposal a commit of the batch closes.
///
/// A repeated idempotency key answers with the first commit's result when the request is the
/// same one (same hash) and fails otherwise; that is settled before the proposal's status is
/// looked at, so a retry of a proposal's commit gets its result back, while any other second
/// commit of a proposal fails.
pub(crate) fn plan_batch(
    jobs: &mut [Job],
    stored: HashMap<IdempotencyKey, StoredResult>,
    mut proposals: HashMap<String, String>,
    mut overlay: HashMap<KeyRef, Current>,
) -> Plan {
    let mut out = Plan {
        outcomes: Vec::with_capacity(jobs.len()),
        commits: Vec::new(),
        history: Vec::new(),
        latest: HashMap::new(),
        prune: HashMap::new(),
        closed_proposals: Vec::new(),
    };
    let mut in_batch: HashMap<IdempotencyKey, usize> = HashMap::new();
    for job in jobs.iter_mut() {
        let idempotency = job.idempotency();
        if let Some(key) = &idempotency {
            let earlier = match stored.get(key) {
                Some(earlier) => Some((
                    earlier.request_hash.as_deref(),
                    Planned::Stored(earlier.committed.clone()),
                )),
                None => in_batch.get(key).map(|&index| {
                    (
                        out.commits[index].meta.request_hash.as_deref(),
                        Planned::RepeatOf(index),
                    )
                }),
            };
            if let Some((first_hash, replay)) = earlier {
                out.outcomes
                    .push(match (first_hash, job.meta.request_hash.as_deref()) {
                        (Some(first), Some(this)) if first != this => {
                            Planned::Failed(StoreError::IdempotencyKeyReused {
                                principal: job.meta.author.clone(),
                                key: job.meta.idempotency_key.clone().unwrap_or_default(),
                            })
                        }
                        _ => replay,
                    });
                continue;
            }
        }
        let closes = job
            .meta
            .proposal_id
            .clone()
            .filter(|_| job.meta.closes_proposal);
        if let Some(id) = &closes {
            let status = proposals.get(id).map_or("unknown", String::as_str);
            if status != "validated" {
                out.outcomes
                    .push(Planned::Failed(StoreError::ProposalClosed {
                        id: id.clone(),
                        status: status.to_string(),
                    }));
                continue;
            }
        }
        let currents: Vec<Current> = job
            .keys
            .iter()
            .map(|key| overlay.get(key).cloned().unwrap_or_else(|| absent(key)))
            .collect();
        let writes = match (job.decide)(&currents) {
            Ok(writes) => writes,
            Err(refusal) => {
                out.outcomes.push(Planned::Refused(refusal));
                continue;
            }
        };
        let index = out.commits.len();
        let versions = match plan(0, &currents, &writes) {
            Ok(planned) => planned.versions,
            Err(error) => {
                out.outcomes.push(Planned::Failed(error));
                continue;
            }
        };
        for (write, (_, _, version)) in writes.into_iter().zip(&versions) {
            let text = write.value.to_string();
            if let Some(keep) = job.meta.keep_versions.filter(|&keep| *version > keep) {
                let floor = out.prune.entry(write.key.clone()).or_default();
                *floor = (*floor).max(*version - keep);
            }
            out.history.push(HistoryRow {
                key: write.key.clone(),
                version: *version,
                text: text.clone(),
                commit: index,
            });
            let current = overlay
                .entry(write.key.clone())
                .or_insert_with(|| absent(&write.key));
            current.version = *version;
            current.value = Some(write.value.clone());
            out.latest.insert(
                write.key,
                Latest {
                    version: *version,
                    value: write.value,
                    text,
                    commit: index,
                },
            );
        }
        if let Some(key) = idempotency {
            in_batch.insert(key, index);
        }
        if let Some(id) = closes {
            proposals.insert(id.clone(), "committed".to_string());
            out.closed_proposals.push(id);
        }
        out.commits.push(PlannedCommit {
            meta: job.meta.clone(),
            committed_at_ms: now_ms(),
            versions,
        });
        out.outcomes.push(Planned::Fresh(index));
    }
    out
}

fn absent(key: &KeyRef) -> Current {
    Current {
        key: key.clone(),
        version: 0,
        value: None,
        lease: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use concord_testkit::PgTestDatabase;
    use serde_json::json;

    fn key(name: &str) -> KeyRef {
        KeyRef {
            namespace: "t".into(),
            key: name.into(),
        }
    }

    fn meta(idempotency_key: Option<&str>) -> CommitMeta {
        CommitMeta {
            author: "tester".into(),
            idempotency_key: idempotency_key.map(str::to_string),
            ..CommitMeta::default()
        }
    }

    /// A fresh store on each backend: SQLite in a temporary directory, and a new database on
    /// the PostgreSQL server named by CONCORD_TEST_POSTGRES (the local one by default), dropped
    /// with the fixture even when the test fails.
    struct Backends {
        _dir: tempfile::TempDir,
        stores: Vec<Store>,
        _database: PgTestDatabase,
    }

    impl Backends {
        async fn open() -> Backends {
            let dir = tempfile::tempdir().unwrap();
            let sqlite = Store::open_sqlite(&dir.path().join("state.db"))
                .await
                .unwrap();
            let database = PgTestDatabase::create("concord_gc").await;
            let postgres = Store::open_postgres(database.url()).await.unwrap();
            Backends {
                _dir: dir,
                stores: vec![sqlite, postgres],
                _database: database,
            }
        }

        async fn finish(self) {
            for store in &self.stores {
                store.close().await;
            }
        }
    }

    fn keys_of(key: &KeyRef) -> Vec<KeyRef> {
        vec![key.clone()]
    }

    /// Adds one to the key's number (0 when absent).
    fn increment(target: KeyRef) -> impl FnMut(&[Current]) -> Result<Vec<Write>, u64> + Send {
        move |currents| {
            let now = currents[0]
                .value
                .as_ref()
                .and_then(Value::as_i64)
                .unwrap_or(0);
            Ok(vec![Write {
                key: target.clone(),
                value: json!(now + 1),
            }])
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_behaves_like_its_commits_one_after_another() {
        let backends = Backends::open().await;
        for store in &backends.stores {
            let counter = key("counter");
            let mut tasks = Vec::new();
            for _ in 0..200 {
                let (store, counter) = (store.clone(), counter.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .transact(&keys_of(&counter), &meta(None), increment(counter))
                        .await
                }));
            }
            let mut seqs = Vec::new();
            for task in tasks {
                match task.await.unwrap().unwrap() {
                    Transacted::Committed(committed) => seqs.push(committed.seq),
                    Transacted::Refused(_) => panic!("an increment was refused"),
                }
            }
            seqs.sort();
            seqs.dedup();
            assert_eq!(seqs.len(), 200, "every commit has its own sequence number");
            let current = store.get(&counter).await.unwrap();
            assert_eq!(current.version, 200);
            assert_eq!(
                current.value,
                Some(json!(200)),
                "no increment lost inside a group"
            );
            let history = store.history(&counter, 1000).await.unwrap();
            assert_eq!(history.len(), 200);
            let (batches, commits) = store.commit_groups();
            assert_eq!(commits, 200);
            assert!(
                batches < commits,
                "200 concurrent commits were grouped ({batches} transactions)"
            );
        }
        backends.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn within_a_group_a_stale_base_is_still_refused() {
        let backends = Backends::open().await;
        for store in &backends.stores {
            let slot = key("slot");
            let mut tasks = Vec::new();
            for writer in 0..20 {
                let (store, slot) = (store.clone(), slot.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .transact(
                            &keys_of(&slot),
                            &meta(None),
                            move |currents: &[Current]| {
                                // Every writer read version 0; only one may build on it.
                                if currents[0].version != 0 {
                                    return Err(currents[0].version);
                                }
                                Ok(vec![Write {
                                    key: slot.clone(),
                                    value: json!(writer),
                                }])
                            },
                        )
                        .await
                }));
            }
            let mut winners = Vec::new();
            for task in tasks {
                match task.await.unwrap().unwrap() {
                    Transacted::Committed(committed) => winners.push(committed),
                    Transacted::Refused(seen) => assert_eq!(seen, 1, "refused against the winner"),
                }
            }
            assert_eq!(winners.len(), 1);
            let current = store.get(&slot).await.unwrap();
            assert_eq!(current.version, 1);
            assert_eq!(store.history(&slot, 100).await.unwrap().len(), 1);
        }
        backends.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idempotency_key_repeated_within_a_group_applies_once() {
        let backends = Backends::open().await;
        for store in &backends.stores {
            let target = key("once");
            let mut tasks = Vec::new();
            for _ in 0..50 {
                let (store, target) = (store.clone(), target.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .transact(&keys_of(&target), &meta(Some("retry-1")), increment(target))
                        .await
                }));
            }
            let mut fresh = 0;
            let mut seqs = Vec::new();
            for task in tasks {
                match task.await.unwrap().unwrap() {
                    Transacted::Committed(committed) => {
                        fresh += usize::from(!committed.replayed);
                        seqs.push(committed.seq);
                    }
                    Transacted::Refused(_) => panic!("refused"),
                }
            }
            assert_eq!(fresh, 1, "applied once, replayed for the other 49");
            assert!(seqs.iter().all(|&s| s == seqs[0]), "{seqs:?}");
            assert_eq!(store.get(&target).await.unwrap().value, Some(json!(1)));
        }
        backends.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multi_key_commit_in_a_group_is_all_or_nothing() {
        let backends = Backends::open().await;
        for store in &backends.stores {
            let (a, b) = (key("a"), key("b"));
            let mut tasks = Vec::new();
            for round in 0..40u64 {
                let (store, a, b) = (store.clone(), a.clone(), b.clone());
                tasks.push(tokio::spawn(async move {
                    let keys = [a.clone(), b.clone()];
                    store
                        .transact(&keys, &meta(None), move |currents: &[Current]| {
                            // Odd rounds refuse after looking at both keys; even rounds move one unit.
                            if round % 2 == 1 {
                                return Err(round);
                            }
                            let value =
                                |c: &Current| c.value.as_ref().and_then(Value::as_i64).unwrap_or(0);
                            Ok(vec![
                                Write {
                                    key: a.clone(),
                                    value: json!(value(&currents[0]) - 1),
                                },
                                Write {
                                    key: b.clone(),
                                    value: json!(value(&currents[1]) + 1),
                                },
                            ])
                        })
                        .await
                }));
            }
            for task in tasks {
                task.await.unwrap().unwrap();
            }
            let (a, b) = (store.get(&a).await.unwrap(), store.get(&b).await.unwrap());
            assert_eq!((a.version, b.version), (20, 20));
            assert_eq!((a.value, b.value), (Some(json!(-20)), Some(json!(20))));
        }
        backends.finish().await;
    }
}
