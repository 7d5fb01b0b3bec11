//! The audit trail: authentication failures, policy decisions (with the rule that decided), tool
//! call outcomes, state writes and conflicts, and policy reloads, appended to a hash chain in the
//! store. Each entry's hash covers its sequence number, time, kind, principal, data and the
//! previous entry's hash, so `verify` finds any modified, deleted, inserted or reordered entry
//! and names the first bad one.
//!
//! Entries are queued and appended in batches by one task, off the request path; `flush`
//! waits until everything queued so far is stored. Nothing secret is recorded: callers pass
//! what to record, and tokens and API keys are never among it.

use concord_store::{AuditDraft, AuditRow, GENESIS_HASH, Store};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

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

enum Message {
    Record(AuditDraft),
    Flush(oneshot::Sender<()>),
}

/// The handle through which the node records events; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::UnboundedSender<Message>,
}

impl AuditLog {
    pub fn start(store: Store) -> Self {
        let (queue, messages) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, messages));
        Self { queue }
    }

    /// Queues one entry (`data` is a JSON object of the event's details).
    pub fn record(&self, kind: &str, principal: &str, data: Value) {
        let draft = AuditDraft {
            at_ms: crate::now_ms(),
            kind: kind.to_string(),
            principal: principal.to_string(),
            data: data.to_string(),
        };
        let _ = self.queue.send(Message::Record(draft));
    }

    /// Waits until every entry recorded before this call is stored.
    pub async fn flush(&self) {
        let (done, stored) = oneshot::channel();
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = stored.await;
        }
    }
}

/// How long the writer lets entries gather after the first one: one transaction (one flush) for
/// all of them, instead of one per request under load. Requests never wait for it.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

async fn write_loop(store: Store, mut messages: mpsc::UnboundedReceiver<Message>) {
    while let Some(first) = messages.recv().await {
        if matches!(first, Message::Record(_)) {
            tokio::time::sleep(LINGER).await;
        }
        let mut drafts = Vec::new();
        let mut waiting = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Record(draft) => drafts.push(draft),
                Message::Flush(done) => waiting.push(done),
            }
            next = if drafts.len() < 1000 {
                messages.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = store.append_audit(&drafts, link).await {
            // The audit trail must not silently lose entries: say so loudly.
            tracing::error!(error = %e, entries = drafts.len(), "audit entries could not be stored");
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}
