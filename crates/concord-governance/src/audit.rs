//! The audit trail: authentication failures, policy decisions (with the rule that decided), tool
//! call outcomes, state writes and conflicts, and policy reloads, appended to a hash chain in the
//! store. Each entry's hash covers its sequence number, time, kind, principal, data and the
//! previous entry's hash, so `verify` finds any modified, deleted, inserted or reordered entry
//! and names the first bad one.
//!
//! Entries are queued and appended in batches by one task, off the request path; `flush`
//! waits until everything queued so far is stored. Nothing secret is recorded: callers pass
//! what to record, and tokens and API keys are never among it.
//!
//! Under abuse the trail stays bounded and honest: the queue has a capacity (requests wait
//! for room before they make decisions worth recording, see [`AuditLog::room`]); floods of
//! noise such as authentication failures are aggregated (one entry per distinct event and
//! window, with a `count`); and entries that could not be stored — the store failed, or the
//! queue overflowed — are counted and written into the chain as an `audit_gap` entry as soon
//! as the store takes an append again. A gap is never silent.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_store::{AuditDraft, AuditRow, GENESIS_HASH, Store};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

/// The hash linking `draft` at `seq` to the entry before it.
pub fn link(prev_hash: &str, seq: u64, draft: &AuditDraft) -> String {
    let mut hasher = Sha256::new();
    for part in [
        prev_hash.as_bytes(),
        seq.to_string().as_bytes(),
        draft.at_ms.to_string().as_bytes(),
        draft.kind.as_bytes(),
        draft.principal.as_bytes(),
        draft.data.as_bytes(),
    ] {
        // Length-prefixed, so moving bytes between fields changes the hash.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Where verification found the chain broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The first entry that does not verify (by its stored sequence number, or the number it
    /// should have had).
    pub seq: u64,
    pub reason: String,
}

/// Checks the whole chain; `Ok(count)` when every entry verifies.
pub async fn verify(store: &Store) -> Result<Result<u64, Broken>, concord_store::StoreError> {
    let mut expected_seq = 1;
    let mut prev = GENESIS_HASH.to_string();
    let mut after = 0;
    loop {
        let rows = store.audit_rows(after, 1000).await?;
        if rows.is_empty() {
            return Ok(Ok(expected_seq - 1));
        }
        for row in rows {
            if let Err(broken) = check(&row, expected_seq, &prev) {
                return Ok(Err(broken));
            }
            prev = row.hash.clone();
            after = row.seq;
            expected_seq += 1;
        }
    }
}

fn check(row: &AuditRow, expected_seq: u64, prev: &str) -> Result<(), Broken> {
    if row.seq != expected_seq {
        return Err(Broken {
            seq: expected_seq,
            reason: format!(
                "entry {expected_seq} is missing (the next stored entry is {})",
                row.seq
            ),
        });
    }
    if row.prev_hash != prev {
        return Err(Broken {
            seq: row.seq,
            reason: "it does not follow the entry before it (deleted, inserted or reordered)"
                .into(),
        });
    }
    let draft = AuditDraft {
        at_ms: row.at_ms,
        kind: row.kind.clone(),
        principal: row.principal.clone(),
        data: row.data.clone(),
    };
    if link(prev, row.seq, &draft) != row.hash {
        return Err(Broken {
            seq: row.seq,
            reason: "its content does not match its hash (modified)".into(),
        });
    }
    Ok(())
}

/// How the audit queue behaves under load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditOptions {
    /// Entries waiting to be stored past which requests wait for room ([`AuditLog::room`]) and
    /// aggregated noise is no longer queued. Entries recorded without waiting are still queued
    /// up to twice this; past that they are lost, counted, and the loss is written into the
    /// chain as an `audit_gap` entry.
    pub capacity: usize,
    /// Noise ([`AuditLog::record_noise`], such as authentication failures) is recorded once per
    /// distinct event and window when first seen, then once more at the end of the window with
    /// the count of the rest.
    pub window: Duration,
    /// Distinct noise events per window; more are dropped and counted.
    pub max_noise_keys: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            window: Duration::from_secs(10),
            max_noise_keys: 1_000,
        }
    }
}

/// Entries that did not make it into the chain (yet): written as one `audit_gap` entry in
/// front of the next batch that is stored.
#[derive(Debug, Default)]
struct Loss {
    lost: u64,
    lost_by_kind: BTreeMap<String, u64>,
    dropped_noise: u64,
    dropped_noise_by_kind: BTreeMap<String, u64>,
    from_ms: Option<u64>,
    to_ms: u64,
    causes: BTreeSet<String>,
}

impl Loss {
    fn is_empty(&self) -> bool {
        self.lost == 0 && self.dropped_noise == 0
    }

    fn span(&mut self, at_ms: u64, cause: &str) {
        self.from_ms = Some(self.from_ms.map_or(at_ms, |f| f.min(at_ms)));
        self.to_ms = self.to_ms.max(at_ms);
        if self.causes.len() < 8 {
            self.causes.insert(clip(cause, 200));
        }
    }

    fn entry(&mut self, draft: &AuditDraft, cause: &str) {
        self.lost = self.lost.saturating_add(1);
        *self.lost_by_kind.entry(draft.kind.clone()).or_default() += 1;
        self.span(draft.at_ms, cause);
    }

    fn noise(&mut self, kind: &str, count: u64, at_ms: u64, cause: &str) {
        self.dropped_noise = self.dropped_noise.saturating_add(count);
        let by_kind = self
            .dropped_noise_by_kind
            .entry(kind.to_string())
            .or_default();
        *by_kind = by_kind.saturating_add(count);
        self.span(at_ms, cause);
    }

    fn absorb(&mut self, other: Loss) {
        self.lost = self.lost.saturating_add(other.lost);
        for (kind, n) in other.lost_by_kind {
            *self.lost_by_kind.entry(kind).or_default() += n;
        }
        self.dropped_noise = self.dropped_noise.saturating_add(other.dropped_noise);
        for (kind, n) in other.dropped_noise_by_kind {
            *self.dropped_noise_by_kind.entry(kind).or_default() += n;
        }
        if let Some(from) = other.from_ms {
            self.from_ms = Some(self.from_ms.map_or(from, |f| f.min(from)));
        }
        self.to_ms = self.to_ms.max(other.to_ms);
        for cause in other.causes {
            if self.causes.len() < 8 {
                self.causes.insert(cause);
            }
        }
    }

    /// The chain entry that records this loss.
    fn marker(&self) -> AuditDraft {
        AuditDraft {
            at_ms: crate::now_ms(),
            kind: GAP_KIND.into(),
            principal: "-".into(),
            data: json!({
                "lost": self.lost,
                "lost_by_kind": self.lost_by_kind,
                "dropped_noise": self.dropped_noise,
                "dropped_noise_by_kind": self.dropped_noise_by_kind,
                "from_ms": self.from_ms,
                "to_ms": self.to_ms,
                "causes": self.causes,
            })
            .to_string(),
        }
    }
}

/// The kind of the entry that records entries lost before it.
pub const GAP_KIND: &str = "audit_gap";

/// One distinct noise event in the current window.
struct Noise {
    kind: String,
    principal: String,
    fields: Map<String, Value>,
    /// Occurrences not yet written.
    pending: u64,
    first_pending_ms: u64,
    last_ms: u64,
}

#[derive(Default)]
struct State {
    queue: VecDeque<AuditDraft>,
    /// Entries ever put in the queue (what `flush` waits for).
    queued_total: u64,
    noise: HashMap<String, Noise>,
    window_started: Option<Instant>,
    loss: Loss,
    /// No gap marker is tried before this (after a failed append).
    retry_at: Option<Instant>,
    closed: bool,
}

impl State {
    fn push(&mut self, draft: AuditDraft) {
        self.queue.push_back(draft);
        self.queued_total += 1;
    }

    /// Writes the window's pending noise counts into the queue and starts a new window.
    fn close_window(&mut self, options: &AuditOptions, force: bool) {
        let window_ms = u64::try_from(options.window.as_millis()).unwrap_or(u64::MAX);
        for (_, noise) in std::mem::take(&mut self.noise) {
            if noise.pending == 0 {
                continue;
            }
            if self.queue.len() >= options.capacity && !force {
                self.loss.noise(
                    &noise.kind,
                    noise.pending,
                    noise.last_ms,
                    "audit queue full",
                );
                continue;
            }
            let mut data = noise.fields;
            data.insert("count".into(), json!(noise.pending));
            data.insert("first_ms".into(), json!(noise.first_pending_ms));
            data.insert("last_ms".into(), json!(noise.last_ms));
            data.insert("window_ms".into(), json!(window_ms));
            self.push(AuditDraft {
                at_ms: noise.last_ms,
                kind: noise.kind,
                principal: noise.principal,
                data: Value::Object(data).to_string(),
            });
        }
        self.window_started = None;
    }

    fn window_due(&self, options: &AuditOptions) -> Option<Instant> {
        self.window_started.map(|started| started + options.window)
    }
}

struct Shared {
    options: AuditOptions,
    state: Mutex<State>,
    /// Wakes the writer.
    wake: Notify,
    /// Wakes requests waiting for room in the queue.
    room: Notify,
    /// Entries taken from the queue so far, stored or counted as lost.
    done: watch::Sender<u64>,
}

/// Closes the log when the last handle is dropped: the writer stores what is queued and ends.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.closed = true;
        state.close_window(&self.0.options, true);
        drop(state);
        self.0.wake.notify_one();
    }
}

/// The handle through which the node records events; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    _open: Arc<Open>,
}

/// At most `max` bytes of `text`.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl AuditLog {
    pub fn start(store: Store) -> Self {
        Self::start_with(store, AuditOptions::default())
    }

    pub fn start_with(store: Store, options: AuditOptions) -> Self {
        let options = AuditOptions {
            capacity: options.capacity.max(1),
            max_noise_keys: options.max_noise_keys.max(1),
            ..options
        };
        let shared = Arc::new(Shared {
            options,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            room: Notify::new(),
            done: watch::Sender::new(0),
        });
        tokio::spawn(write_loop(store, shared.clone()));
        Self {
            _open: Arc::new(Open(shared.clone())),
            shared,
        }
    }

    fn draft(kind: &str, principal: &str, data: &Value) -> AuditDraft {
        AuditDraft {
            at_ms: crate::now_ms(),
            kind: kind.to_string(),
            principal: principal.to_string(),
            data: data.to_string(),
        }
    }

    /// Queues one entry (`data` is a JSON object of the event's details) without waiting. Past
    /// twice the queue's capacity the entry is lost, and the loss is counted into the chain's
    /// next `audit_gap` entry; requests wait for room before that ([`AuditLog::room`]).
    pub fn record(&self, kind: &str, principal: &str, data: Value) {
        let draft = Self::draft(kind, principal, &data);
        let mut state = self.shared.state.lock();
        if state.queue.len() >= self.shared.options.capacity.saturating_mul(2) {
            state.loss.entry(&draft, "audit queue full");
        } else {
            state.push(draft);
        }
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Records an event that may come in floods (an authentication failure): the first of
    /// each distinct (`kind`, `principal`, `fields`) per window is queued at once with
    /// `count: 1`, the rest are counted and written as one entry with their `count` when the
    /// window ends. Past the queue's capacity or the window's distinct-event limit, events are
    /// dropped and counted into the next `audit_gap` entry. Returns whether this was the first
    /// of its kind in the window (worth a log line).
    pub fn record_noise(&self, kind: &str, principal: &str, fields: Value) -> bool {
        let options = &self.shared.options;
        let fields = match fields {
            Value::Object(map) => map,
            other => Map::from_iter([("value".to_string(), other)]),
        };
        let key = format!(
            "{kind}\u{0}{principal}\u{0}{}",
            Value::Object(fields.clone())
        );
        let at_ms = crate::now_ms();
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        if state.window_due(options).is_some_and(|due| due <= now) {
            state.close_window(options, false);
        }
        state.window_started.get_or_insert(now);
        if let Some(noise) = state.noise.get_mut(&key) {
            if noise.pending == 0 {
                noise.first_pending_ms = at_ms;
            }
            noise.pending = noise.pending.saturating_add(1);
            noise.last_ms = at_ms;
            return false;
        }
        if state.noise.len() >= options.max_noise_keys {
            state
                .loss
                .noise(kind, 1, at_ms, "too many distinct events in one window");
            return false;
        }
        let room = state.queue.len() < options.capacity;
        if room {
            let window_ms = u64::try_from(options.window.as_millis()).unwrap_or(u64::MAX);
            let mut data = fields.clone();
            data.insert("count".into(), json!(1));
            data.insert("first_ms".into(), json!(at_ms));
            data.insert("last_ms".into(), json!(at_ms));
            data.insert("window_ms".into(), json!(window_ms));
            state.push(AuditDraft {
                at_ms,
                kind: kind.to_string(),
                principal: principal.to_string(),
                data: Value::Object(data).to_string(),
            });
        }
        state.noise.insert(
            key,
            Noise {
                kind: kind.to_string(),
                principal: principal.to_string(),
                fields,
                pending: u64::from(!room),
                first_pending_ms: at_ms,
                last_ms: at_ms,
            },
        );
        drop(state);
        self.shared.wake.notify_one();
        true
    }

    /// Entries waiting to be stored.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().queue.len()
    }

    /// Waits (at most `limit`) until the queue is below its capacity: requests whose decisions
    /// must be recorded wait here, so the request path slows to the pace of the store instead
    /// of the queue growing without bound. `false` if there was no room in time.
    pub async fn room(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.state.lock().queue.len() < self.shared.options.capacity {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.shared.state.lock().queue.len() < self.shared.options.capacity;
            }
        }
    }

    /// Waits until every entry recorded before this call is stored (or counted as lost), the
    /// noise counted so far included.
    pub async fn flush(&self) {
        let target = {
            let mut state = self.shared.state.lock();
            state.close_window(&self.shared.options, true);
            state.queued_total
        };
        self.shared.wake.notify_one();
        let mut done = self.shared.done.subscribe();
        let _ = done.wait_for(|d| *d >= target).await;
    }
}

/// How long the writer lets entries gather after the first one: one transaction (one flush) for
/// all of them, instead of one per request under load. Requests never wait for it.
const LINGER: Duration = Duration::from_millis(20);
/// The most entries in one append.
const BATCH: usize = 1000;
/// Waits between attempts to record a loss while the store fails.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

async fn write_loop(store: Store, shared: Arc<Shared>) {
    let options = shared.options;
    let mut backoff = RETRY_MIN;
    loop {
        // Wait for entries, a noise window to close, or a loss to record.
        loop {
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let wake_at = {
                let mut state = shared.state.lock();
                if state.window_due(&options).is_some_and(|due| due <= now) {
                    state.close_window(&options, false);
                }
                let gap_due = !state.loss.is_empty() && state.retry_at.is_none_or(|at| at <= now);
                if !state.queue.is_empty() || gap_due {
                    break;
                }
                if state.closed {
                    if !state.loss.is_empty() {
                        tracing::error!(
                            lost = state.loss.lost,
                            dropped_noise = state.loss.dropped_noise,
                            "audit log closed with a loss it could not record in the chain"
                        );
                    }
                    return;
                }
                let retry = state.retry_at.filter(|_| !state.loss.is_empty());
                [state.window_due(&options), retry]
                    .into_iter()
                    .flatten()
                    .min()
            };
            match wake_at {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), notified).await;
                }
                None => notified.await,
            }
        }
        if !shared.state.lock().closed {
            tokio::time::sleep(LINGER).await;
        }
        let (mut drafts, gap) = {
            let mut state = shared.state.lock();
            let take = state.queue.len().min(BATCH);
            let drafts: Vec<AuditDraft> = state.queue.drain(..take).collect();
            let gap = (!state.loss.is_empty()).then(|| std::mem::take(&mut state.loss));
            (drafts, gap)
        };
        shared.room.notify_waiters();
        let taken = drafts.len() as u64;
        let had_gap = gap.is_some();
        if let Some(loss) = &gap {
            drafts.insert(0, loss.marker());
        }
        match store.append_audit(&drafts, link).await {
            Ok(_) => {
                backoff = RETRY_MIN;
                let mut state = shared.state.lock();
                state.retry_at = None;
                if let Some(loss) = &gap {
                    tracing::warn!(
                        lost = loss.lost,
                        dropped_noise = loss.dropped_noise,
                        "audit entries were lost; the gap is recorded in the chain"
                    );
                }
            }
            Err(e) => {
                // Never a silent gap: the entries are counted, and the count goes into the
                // chain as soon as the store takes an append again.
                tracing::error!(error = %e, entries = taken, "audit entries could not be stored; the loss will be recorded in the chain");
                let cause = format!("store: {e}");
                let mut state = shared.state.lock();
                if let Some(loss) = gap {
                    state.loss.absorb(loss);
                }
                for draft in &drafts[usize::from(had_gap)..] {
                    state.loss.entry(draft, &cause);
                }
                state.retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
        shared.done.send_modify(|d| *d += taken);
    }
}
