//! The security holes of issue "One front door" that live in the state service and its store,
//! each reproduced as an attack that must now fail, on SQLite and on PostgreSQL:
//!
//! - 9: a committed proposal committed again (a `+100` applied three times), concurrent commits
//!   of one proposal, and a commit that skipped the checks its proposal passed;
//! - 10: idempotency keys shared by every principal and bound to nothing (mallory's key turning
//!   alice's write into a "replay" of mallory's result; one key reused for another request);
//! - 11: the change feed cutting a commit with as many rows as its page (or more), so that
//!   resuming after the page's last sequence number never delivered the rest;
//! - and arithmetic on numbers clients send (a lease's `now + ttl`, sequence numbers and
//!   versions past what the store holds).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

use concord_state::{FeedEntry, MAX_KEYS_PER_COMMIT, WriteGuard, WriteReview, error_details};
use concord_store::CommitMeta;

use super::*;

fn increment(key: &str, base: u64, by: i64) -> Change {
    Change {
        key: key.into(),
        base_version: base,
        ops: vec![Op::Increment {
            path: String::new(),
            by: by.into(),
        }],
        lease_token: None,
    }
}

/// A second state service over the same database (another node sharing PostgreSQL), or the
/// fixture's own service for SQLite, whose committer is the only writer of its file.
async fn second_node(f: &Fixture) -> StateService {
    match &f._database {
        Some(database) => {
            let store = Store::open_postgres(database.url()).await.unwrap();
            StateService::new(store, StateOptions::default()).unwrap()
        }
        None => f.state.clone(),
    }
}

// --- 9: a proposal commits once, and commit re-checks what propose checked ------------------

both_backends!(
    a_committed_proposal_is_never_applied_again,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        let proposal = s
            .propose_as(vec![increment("ledger/balance", 0, 100)], &author("alice"))
            .await
            .unwrap();
        let first = s
            .commit(&proposal.id, None, &author("alice"))
            .await
            .unwrap();
        assert!(!first.replayed);
        // The attack: commit the same proposal again under fresh idempotency keys, or as
        // someone else. Each is refused, clearly, and applies nothing.
        let attempts = [
            (Some("again-1".to_string()), "alice"),
            (Some("again-2".to_string()), "alice"),
            (None, "mallory"),
            (Some("proposal-retry".to_string()), "mallory"),
        ];
        for (key, who) in attempts {
            let refused = s
                .commit(&proposal.id, key.clone(), &author(who))
                .await
                .unwrap_err();
            assert!(
                matches!(&refused, StateError::AlreadyCommitted(id) if *id == proposal.id),
                "{who} {key:?}: {refused}"
            );
            assert!(
                refused.to_string().contains("already committed"),
                "{refused}"
            );
            assert_eq!(error_details(&refused)["already_committed"], json!(true));
        }
        // The committer's own retry (same default key, same request) still answers with the
        // first result: applied once, not refused.
        let retry = s
            .commit(&proposal.id, None, &author("alice"))
            .await
            .unwrap();
        assert!(retry.replayed && retry.seq == first.seq, "{retry:?}");
        let balance = s.get("ledger/balance").await.unwrap();
        assert_eq!((balance.version, balance.value), (1, Some(json!(100))));
        assert_eq!(s.history("ledger/balance", 10).await.unwrap().len(), 1);
        assert_eq!(s.proposal(&proposal.id).await.unwrap().status, "committed");
        f.finish().await;
    }
);

both_backends!(
    concurrent_commits_of_one_proposal_exactly_one_wins,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        // On PostgreSQL, half of the commits go through a second node sharing the database.
        let other = second_node(&f).await;
        for round in 0..3 {
            let key = format!("ledger/race-{round}");
            let proposal = f
                .state
                .propose(vec![increment(&key, 0, 100)])
                .await
                .unwrap();
            let mut commits = Vec::new();
            for attempt in 0..16 {
                let service = if attempt % 2 == 0 {
                    f.state.clone()
                } else {
                    other.clone()
                };
                let id = proposal.id.clone();
                // Every attempt is a different principal, so none of them is a retry of another.
                commits.push(tokio::spawn(async move {
                    service
                        .commit(&id, None, &author(&format!("agent-{attempt}")))
                        .await
                }));
            }
            let mut won = 0;
            for commit in commits {
                match commit.await.unwrap() {
                    Ok(result) => {
                        assert!(!result.replayed, "{result:?}");
                        won += 1;
                    }
                    Err(StateError::AlreadyCommitted(id)) => assert_eq!(id, proposal.id),
                    Err(other) => panic!("unexpected refusal: {other}"),
                }
            }
            assert_eq!(won, 1, "exactly one commit of the proposal applies");
            let now = f.state.get(&key).await.unwrap();
            assert_eq!((now.version, now.value), (1, Some(json!(100))));
        }
        if f._database.is_some() {
            other.store().close().await;
        }
        f.finish().await;
    }
);

/// A guard that approves only writes by `allowed`, or nothing once `closed` is set: the policy
/// hook and reviewers, as the state service sees them.
struct Gate {
    allowed: &'static str,
    closed: AtomicBool,
}

impl WriteGuard for Gate {
    fn review<'a>(
        &'a self,
        review: &'a WriteReview,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return Err("the gate is closed".into());
            }
            if review.author != self.allowed {
                return Err(format!("{} may not write {}", review.author, review.key));
            }
            Ok(())
        })
    }
}

both_backends!(
    commit_rechecks_the_guards_for_the_committer,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let gate = Arc::new(Gate {
            allowed: "alice",
            closed: AtomicBool::new(false),
        });
        let s = f.state.clone().with_guard(gate.clone());
        // Alice may write and proposes; mallory commits her proposal: refused as mallory.
        let proposal = s
            .propose_as(
                vec![set("orders/7", 0, json!({"total": 5}))],
                &author("alice"),
            )
            .await
            .unwrap();
        let refused = s
            .commit(&proposal.id, None, &author("mallory"))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, StateError::Rejected { reason, .. } if reason.contains("mallory may not write")),
            "{refused}"
        );
        assert_eq!(s.get("orders/7").await.unwrap().version, 0);
        // A guard that changed its mind since the proposal (a reviewer, a new policy) is asked
        // again at commit.
        gate.closed.store(true, Ordering::SeqCst);
        let refused = s
            .commit(&proposal.id, None, &author("alice"))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, StateError::Rejected { reason, .. } if reason.contains("closed")),
            "{refused}"
        );
        assert_eq!(s.get("orders/7").await.unwrap().version, 0);
        // Nothing was used up: once the guard approves again, the proposal commits (once).
        gate.closed.store(false, Ordering::SeqCst);
        let committed = s
            .commit(&proposal.id, None, &author("alice"))
            .await
            .unwrap();
        assert_eq!(committed.versions["orders/7"], 1);
        f.finish().await;
    }
);

both_backends!(
    a_stale_proposal_is_still_a_conflict_at_commit,
    |backend| async move {
        // The re-check at commit must not turn a stale base into another error: the commit
        // refuses it as a conflict with what is needed to rebase.
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = f.state.clone().with_guard(Arc::new(Gate {
            allowed: "alice",
            closed: AtomicBool::new(false),
        }));
        s.put(
            vec![set("docs/list", 0, json!(["a"]))],
            None,
            &author("alice"),
        )
        .await
        .unwrap();
        let remove = Change {
            key: "docs/list".into(),
            base_version: 1,
            ops: vec![Op::JsonPatch {
                patch: json!([{"op": "remove", "path": "/0"}]),
            }],
            lease_token: None,
        };
        let proposal = s.propose_as(vec![remove], &author("alice")).await.unwrap();
        s.put(vec![set("docs/list", 1, json!([]))], None, &author("alice"))
            .await
            .unwrap();
        let refused = s
            .commit(&proposal.id, None, &author("alice"))
            .await
            .unwrap_err();
        assert!(matches!(refused, StateError::Conflict(_)), "{refused}");
        f.finish().await;
    }
);

// --- 10: idempotency keys are the principal's own and bound to the request ------------------

both_backends!(
    another_principals_idempotency_key_is_not_a_replay,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        // Mallory plants the key alice will use for her order.
        let planted = s
            .put(
                vec![set("scratch/mallory", 0, json!("anything"))],
                Some("order-42".into()),
                &author("mallory"),
            )
            .await
            .unwrap();
        // Alice's write is hers: applied, not a "replay" of mallory's result.
        let order = s
            .put(
                vec![set("orders/42", 0, json!({"item": "book"}))],
                Some("order-42".into()),
                &author("alice"),
            )
            .await
            .unwrap();
        assert!(!order.replayed, "{order:?}");
        assert_ne!(order.seq, planted.seq);
        assert_eq!(order.versions, [("orders/42".to_string(), 1)].into());
        let stored = s.get("orders/42").await.unwrap();
        assert_eq!(stored.value, Some(json!({"item": "book"})));
        // Her own retry replays her own result.
        let retry = s
            .put(
                vec![set("orders/42", 0, json!({"item": "book"}))],
                Some("order-42".into()),
                &author("alice"),
            )
            .await
            .unwrap();
        assert!(retry.replayed && retry.seq == order.seq, "{retry:?}");
        // A key in the global (pre-upgrade) form, written straight into the store, answers no
        // principal's write either.
        s.store()
            .transact::<(), _>(
                &[concord_store::KeyRef {
                    namespace: "scratch".into(),
                    key: "legacy".into(),
                }],
                &CommitMeta {
                    author: "mallory".into(),
                    idempotency_key: Some("order-43".into()),
                    ..CommitMeta::default()
                },
                |currents| {
                    Ok(vec![concord_store::Write {
                        key: currents[0].key.clone(),
                        value: json!("legacy"),
                    }])
                },
            )
            .await
            .unwrap();
        let next = s
            .put(
                vec![set("orders/43", 0, json!({"item": "pen"}))],
                Some("order-43".into()),
                &author("alice"),
            )
            .await
            .unwrap();
        assert!(!next.replayed);
        assert_eq!(s.get("orders/43").await.unwrap().version, 1);
        f.finish().await;
    }
);

both_backends!(
    an_idempotency_key_reused_for_another_request_is_refused,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        let first = s
            .put(
                vec![set("orders/1", 0, json!({"qty": 1, "item": "cup"}))],
                Some("req-1".into()),
                &author("alice"),
            )
            .await
            .unwrap();
        let reused = |changes: Vec<Change>| {
            let s = s.clone();
            async move {
                s.put(changes, Some("req-1".into()), &author("alice"))
                    .await
                    .unwrap_err()
            }
        };
        // Another key, other operations, another base version: each is another request.
        for refused in [
            reused(vec![set("orders/2", 0, json!({"qty": 1, "item": "cup"}))]).await,
            reused(vec![set("orders/1", 0, json!({"qty": 9, "item": "cup"}))]).await,
            reused(vec![set("orders/1", 1, json!({"qty": 1, "item": "cup"}))]).await,
            reused(vec![increment("orders/1", 0, 1)]).await,
        ] {
            assert!(
                matches!(&refused, StateError::IdempotencyKeyReused { key, principal } if key == "req-1" && principal == "alice"),
                "{refused}"
            );
            assert!(
                refused.to_string().contains("different request"),
                "{refused}"
            );
            assert_eq!(
                error_details(&refused)["idempotency_key_reused"],
                json!(true)
            );
        }
        assert_eq!(s.get("orders/2").await.unwrap().version, 0);
        assert_eq!(s.get("orders/1").await.unwrap().version, 1);
        // The same request, its fields in another order, is a retry.
        let retry = s
            .put(
                vec![set("orders/1", 0, json!({"item": "cup", "qty": 1}))],
                Some("req-1".into()),
                &author("alice"),
            )
            .await
            .unwrap();
        assert!(retry.replayed && retry.seq == first.seq);
        // Commits too: the key that committed one proposal does not commit another.
        let p1 = s.propose(vec![increment("ledger/a", 0, 1)]).await.unwrap();
        let p2 = s.propose(vec![increment("ledger/b", 0, 1)]).await.unwrap();
        s.commit(&p1.id, Some("commit-1".into()), &author("alice"))
            .await
            .unwrap();
        let refused = s
            .commit(&p2.id, Some("commit-1".into()), &author("alice"))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StateError::IdempotencyKeyReused { .. }),
            "{refused}"
        );
        assert_eq!(s.get("ledger/b").await.unwrap().version, 0);
        // Not used up: p2 commits under a key of its own.
        s.commit(&p2.id, Some("commit-2".into()), &author("alice"))
            .await
            .unwrap();
        // And a put does not replay a commit that used the same key.
        let refused = s
            .put(
                vec![increment("ledger/a", 0, 1)],
                Some("commit-1".into()),
                &author("alice"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StateError::IdempotencyKeyReused { .. }),
            "{refused}"
        );
        f.finish().await;
    }
);

both_backends!(
    concurrent_retries_with_one_key_apply_once,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let other = second_node(&f).await;
        let mut tasks = Vec::new();
        for attempt in 0..20 {
            let service = if attempt % 2 == 0 {
                f.state.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                let same = service
                    .put(
                        vec![increment("ledger/once", 0, 100)],
                        Some("pay-1".into()),
                        &author("alice"),
                    )
                    .await;
                // Bob's identical write with the same key is his own: it applies too.
                let bob = service
                    .put(
                        vec![increment("ledger/bob", 0, 1)],
                        Some("pay-1".into()),
                        &author("bob"),
                    )
                    .await;
                (same, bob)
            }));
        }
        let mut fresh = (0, 0);
        let mut seqs = BTreeSet::new();
        for task in tasks {
            let (alice, bob) = task.await.unwrap();
            let (alice, bob) = (alice.unwrap(), bob.unwrap());
            fresh.0 += usize::from(!alice.replayed);
            fresh.1 += usize::from(!bob.replayed);
            seqs.insert(alice.seq);
        }
        assert_eq!(fresh, (1, 1), "each principal's request applied once");
        assert_eq!(seqs.len(), 1, "every retry answered with the one commit");
        assert_eq!(
            f.state.get("ledger/once").await.unwrap().value,
            Some(json!(100))
        );
        assert_eq!(
            f.state.get("ledger/bob").await.unwrap().value,
            Some(json!(1))
        );
        if f._database.is_some() {
            other.store().close().await;
        }
        f.finish().await;
    }
);

both_backends!(
    racing_requests_under_one_key_only_one_applies,
    |backend| async move {
        // Different requests under one key of one principal, at once (so most of them meet in
        // one group commit): the first applies, every other is refused as a reused key.
        let f = Fixture::new(backend, StateOptions::default()).await;
        let other = second_node(&f).await;
        let mut tasks = Vec::new();
        for attempt in 0..20u64 {
            let service = if attempt % 2 == 0 {
                f.state.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                service
                    .put(
                        vec![set(&format!("race/k{attempt}"), 0, json!(attempt))],
                        Some("one-key".into()),
                        &author("alice"),
                    )
                    .await
            }));
        }
        let (mut applied, mut refused) = (Vec::new(), 0);
        for (attempt, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(result) => {
                    assert!(!result.replayed);
                    applied.push(attempt);
                }
                Err(StateError::IdempotencyKeyReused { .. }) => refused += 1,
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!((applied.len(), refused), (1, 19), "{applied:?}");
        let written = f.state.list("race/", 100).await.unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].key, format!("race/k{}", applied[0]));
        if f._database.is_some() {
            other.store().close().await;
        }
        f.finish().await;
    }
);

// --- 11: the change feed hands out whole commits ---------------------------------------------

/// Commits `count` new keys `feed/{name}-{i}` in one write; returns its sequence number.
async fn commit_keys(s: &StateService, name: &str, count: usize) -> u64 {
    let changes = (0..count)
        .map(|i| set(&format!("feed/{name}-{i:04}"), 0, json!(i)))
        .collect();
    s.put(changes, None, &author("w")).await.unwrap().seq
}

/// Every page of the feed under `prefix` from the start, `limit` rows at a time.
async fn read_feed(s: &StateService, prefix: &str, limit: u32) -> Vec<Vec<FeedEntry>> {
    let mut pages = Vec::new();
    let mut since = 0;
    loop {
        let page = s.changes(prefix, since, limit).await.unwrap();
        let Some(last) = page.last() else {
            return pages;
        };
        assert!(last.seq > since, "the feed moves forward");
        since = last.seq;
        pages.push(page);
        assert!(pages.len() < 100, "the feed never ended");
    }
}

both_backends!(
    a_feed_page_ends_at_a_commit_boundary,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        const PAGE: usize = 4;
        // Commits of 1, exactly PAGE, PAGE + 1, 1 and 2 keys (with another namespace between).
        let mut commits = BTreeMap::new();
        for (name, count) in [
            ("z", 1),
            ("exact", PAGE),
            ("over", PAGE + 1),
            ("c", 1),
            ("d", 2),
        ] {
            commits.insert(commit_keys(s, name, count).await, count);
            s.put(
                vec![set(&format!("other/{name}"), 0, json!(1))],
                None,
                &author("w"),
            )
            .await
            .unwrap();
        }
        let pages = read_feed(s, "feed/", PAGE as u32).await;
        // Every row of every commit arrives, once, in order.
        let all: Vec<&FeedEntry> = pages.iter().flatten().collect();
        assert_eq!(all.len(), 1 + PAGE + PAGE + 1 + 1 + 2, "{pages:#?}");
        let keys: BTreeSet<&str> = all.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), all.len(), "no row twice");
        assert!(all.windows(2).all(|w| w[0].seq <= w[1].seq));
        // Each page holds whole commits only, and is over the page size only when it is one
        // commit that is.
        for page in &pages {
            let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
            for entry in page {
                *rows.entry(entry.seq).or_default() += 1;
            }
            for (seq, count) in &rows {
                assert_eq!(commits[seq], *count, "commit {seq} cut: {page:#?}");
            }
            assert!(page.len() <= PAGE || rows.len() == 1, "{page:#?}");
        }
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        // [z] (z + three rows of `exact` would cut it), [exact], [over] whole, [c, d].
        assert_eq!(sizes, [1, PAGE, PAGE + 1, 3]);
        // The key watcher's feed (every namespace) pages whole commits the same way.
        let mut since = 0;
        let mut watched = Vec::new();
        loop {
            let page = s.changed_keys(since, PAGE as u32).await.unwrap();
            let Some((_, last)) = page.last() else { break };
            since = *last;
            watched.extend(page);
        }
        let watched: BTreeSet<String> = watched.into_iter().map(|(key, _)| key).collect();
        assert_eq!(watched.len(), all.len() + 5, "{watched:?}");
        f.finish().await;
    }
);

both_backends!(
    a_commit_bigger_than_any_page_is_bounded_and_comes_whole,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        // The bound on keys per commit, at write time, for puts and proposals.
        let too_many: Vec<Change> = (0..=MAX_KEYS_PER_COMMIT)
            .map(|i| set(&format!("big/k{i}"), 0, json!(i)))
            .collect();
        let refused = s
            .put(too_many.clone(), None, &author("w"))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StateError::TooManyChanges { count, limit } if count == MAX_KEYS_PER_COMMIT + 1 && limit == MAX_KEYS_PER_COMMIT),
            "{refused}"
        );
        let refused = s.propose(too_many).await.unwrap_err();
        assert!(
            matches!(refused, StateError::TooManyChanges { .. }),
            "{refused}"
        );
        assert!(s.list("big/", 10).await.unwrap().is_empty());
        // A key named twice in one write is refused too (it would be two versions at once).
        let twice = s
            .put(
                vec![set("big/dup", 0, json!(1)), set("big/dup", 0, json!(2))],
                None,
                &author("w"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&twice, StateError::InvalidOperation { key, .. } if key == "big/dup"),
            "{twice}"
        );
        // The largest commit allowed comes whole, however small the page.
        let keys: Vec<Change> = (0..MAX_KEYS_PER_COMMIT)
            .map(|i| set(&format!("big/k{i:04}"), 0, json!(i)))
            .collect();
        let seq = s.put(keys, None, &author("w")).await.unwrap().seq;
        s.put(vec![set("big/after", 0, json!(1))], None, &author("w"))
            .await
            .unwrap();
        let pages = read_feed(s, "big/", 10).await;
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0].len(), MAX_KEYS_PER_COMMIT);
        assert!(pages[0].iter().all(|e| e.seq == seq));
        assert_eq!(pages[1].len(), 1);
        f.finish().await;
    }
);

// --- arithmetic on numbers clients send ------------------------------------------------------

both_backends!(
    a_lease_past_the_end_of_time_is_a_clear_error,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        for ttl in [
            Duration::from_millis(u64::MAX),
            Duration::from_millis(i64::MAX as u64),
            Duration::MAX,
        ] {
            let refused = s.claim("jobs/x", "mallory", ttl, None).await.unwrap_err();
            assert!(
                matches!(&refused, StateError::InvalidOperation { key, reason } if key == "jobs/x" && reason.contains("lease")),
                "{ttl:?}: {refused}"
            );
        }
        // Nothing was claimed: the key is free for an ordinary lease.
        let lease = s
            .claim("jobs/x", "worker", Duration::from_secs(30), None)
            .await
            .unwrap();
        assert!(lease.granted && lease.token == Some(1), "{lease:?}");
        // Renewing with an overflowing ttl is refused and leaves the lease as it was.
        let refused = s
            .claim(
                "jobs/x",
                "worker",
                Duration::from_millis(u64::MAX),
                lease.token,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StateError::InvalidOperation { .. }),
            "{refused}"
        );
        let held = s
            .claim("jobs/x", "other", Duration::from_secs(1), None)
            .await
            .unwrap();
        assert!(
            !held.granted && held.expires_at_ms == lease.expires_at_ms,
            "{held:?}"
        );
        // A long but representable lease is fine.
        let year = s
            .claim(
                "jobs/y",
                "worker",
                Duration::from_secs(365 * 24 * 3600),
                None,
            )
            .await
            .unwrap();
        assert!(year.granted);
        f.finish().await;
    }
);

both_backends!(
    sequence_numbers_and_versions_past_the_store_range_find_nothing,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        s.put(vec![set("feed/a", 0, json!(1))], None, &author("w"))
            .await
            .unwrap();
        // `since` past i64::MAX once wrapped to a negative number and replayed everything.
        for since in [u64::MAX, i64::MAX as u64 + 1] {
            assert!(s.changes("feed/", since, 10).await.unwrap().is_empty());
            assert!(s.changed_keys(since, 10).await.unwrap().is_empty());
        }
        assert!(
            s.changes("feed/", i64::MAX as u64, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.changes("feed/", 0, 10).await.unwrap().len(), 1);
        let refused = s.diff("feed/a", 1, u64::MAX).await.unwrap_err();
        assert!(
            matches!(refused, StateError::InvalidOperation { .. }),
            "{refused}"
        );
        // A base version past the store's range is just stale.
        let refused = s
            .put(vec![set("feed/a", u64::MAX, json!(2))], None, &author("w"))
            .await
            .unwrap_err();
        assert!(matches!(refused, StateError::Conflict(_)), "{refused}");
        f.finish().await;
    }
);
