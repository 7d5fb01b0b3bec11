//! The state service against both real stores: every test runs on SQLite (a temp file) and on
//! PostgreSQL (a fresh database on the server named by CONCORD_TEST_POSTGRES, default the local
//! test server; the test fails, never skips, when it is unreachable).

use std::sync::Arc;
use std::time::Duration;

use concord_state::{Author, Change, ConflictPolicy, Op, StateError, StateOptions, StateService};
use concord_store::Store;
use concord_testkit::PgTestDatabase;
use serde_json::{Value, json};

enum Backend {
    Sqlite,
    Postgres,
}

struct Fixture {
    state: StateService,
    _dir: Option<tempfile::TempDir>,
    /// Dropped (after the store) even when the test panics, so no database is left behind.
    _database: Option<PgTestDatabase>,
}

impl Fixture {
    async fn new(backend: Backend, options: StateOptions) -> Fixture {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open_sqlite(&dir.path().join("state.db"))
                    .await
                    .unwrap();
                Fixture {
                    state: StateService::new(store, options).unwrap(),
                    _dir: Some(dir),
                    _database: None,
                }
            }
            Backend::Postgres => {
                let database = PgTestDatabase::create("concord_test").await;
                let store = Store::open_postgres(database.url()).await.unwrap();
                Fixture {
                    state: StateService::new(store, options).unwrap(),
                    _dir: None,
                    _database: Some(database),
                }
            }
        }
    }

    async fn finish(self) {
        self.state.store().close().await;
    }
}

fn set(key: &str, base: u64, value: Value) -> Change {
    Change {
        key: key.into(),
        base_version: base,
        ops: vec![Op::Set { value }],
        lease_token: None,
    }
}

/// Milliseconds since the epoch on the wall clock, the clock leases and proposals expire by.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until the wall clock is past `at_ms` (the moment something expires). Polling is all
/// the waiting there is; the deadline only turns a clock that never gets there into a failure.
async fn until_past(at_ms: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while now_ms() <= at_ms {
        assert!(
            std::time::Instant::now() < deadline,
            "the wall clock never passed {at_ms} (now {})",
            now_ms()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn author(name: &str) -> Author {
    Author {
        principal: name.into(),
        trace_id: Some("00-trace-01".into()),
    }
}

macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                ($body)(Backend::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                ($body)(Backend::Postgres).await;
            }
        }
    };
}

both_backends!(
    lost_update_is_refused_with_what_is_needed_to_rebase,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        s.put(
            vec![set("team/context", 0, json!({"plan": "v1"}))],
            None,
            &author("setup"),
        )
        .await
        .unwrap();
        // A and B both read version 1.
        let read_a = s.get("team/context").await.unwrap();
        let read_b = s.get("team/context").await.unwrap();
        assert_eq!((read_a.version, read_b.version), (1, 1));
        // A writes version 2.
        s.put(
            vec![set("team/context", read_a.version, json!({"plan": "A"}))],
            None,
            &author("agent-a"),
        )
        .await
        .unwrap();
        // B writes based on version 1: refused, with the current version and value.
        let refused = s
            .put(
                vec![set("team/context", read_b.version, json!({"plan": "B"}))],
                None,
                &author("agent-b"),
            )
            .await
            .unwrap_err();
        let StateError::Conflict(conflicts) = refused else {
            panic!("expected a conflict, got {refused}")
        };
        assert_eq!(conflicts[0].current_version, 2);
        assert_eq!(conflicts[0].current_value, Some(json!({"plan": "A"})));
        assert_eq!(
            conflicts[0].changed_since_base,
            json!([{"op": "replace", "path": "/plan", "value": "A"}])
        );
        // A's work survives.
        let now = s.get("team/context").await.unwrap();
        assert_eq!((now.version, now.value), (2, Some(json!({"plan": "A"}))));
        let history = s.history("team/context", 10).await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].author, "agent-a");
        assert_eq!(history[0].trace_id.as_deref(), Some("00-trace-01"));
        f.finish().await;
    }
);

both_backends!(
    merge_policy_rebases_disjoint_fields_only,
    |backend| async move {
        let options = StateOptions {
            policies: [("docs".to_string(), ConflictPolicy::Merge)].into(),
            ..StateOptions::default()
        };
        let f = Fixture::new(backend, options).await;
        let s = &f.state;
        s.put(
            vec![set("docs/spec", 0, json!({"title": "t", "body": "b"}))],
            None,
            &author("x"),
        )
        .await
        .unwrap();
        let patch = |field: &str, value: &str| Change {
            key: "docs/spec".into(),
            base_version: 1,
            ops: vec![Op::MergePatch {
                patch: json!({ field: value }),
            }],
            lease_token: None,
        };
        s.put(vec![patch("title", "A's title")], None, &author("a"))
            .await
            .unwrap();
        // B's base is stale but touches another field: rebased.
        s.put(vec![patch("body", "B's body")], None, &author("b"))
            .await
            .unwrap();
        assert_eq!(
            s.get("docs/spec").await.unwrap().value,
            Some(json!({"title": "A's title", "body": "B's body"}))
        );
        // C touches the title A changed since C's base: refused.
        let refused = s
            .put(vec![patch("title", "C's title")], None, &author("c"))
            .await
            .unwrap_err();
        assert!(matches!(refused, StateError::Conflict(_)), "{refused}");
        assert_eq!(s.get("docs/spec").await.unwrap().version, 3);
        f.finish().await;
    }
);

both_backends!(multi_key_commits_are_all_or_nothing, |backend| async move {
    let f = Fixture::new(backend, StateOptions::default()).await;
    let s = &f.state;
    s.put(
        vec![set("shop/a", 0, json!(1)), set("shop/b", 0, json!(1))],
        None,
        &author("x"),
    )
    .await
    .unwrap();
    s.put(vec![set("shop/b", 1, json!(2))], None, &author("y"))
        .await
        .unwrap();
    let refused = s
        .put(
            vec![set("shop/a", 1, json!(10)), set("shop/b", 1, json!(10))],
            None,
            &author("z"),
        )
        .await
        .unwrap_err();
    assert!(matches!(refused, StateError::Conflict(_)));
    assert_eq!(
        s.get("shop/a").await.unwrap().value,
        Some(json!(1)),
        "a must not be half-applied"
    );
    assert_eq!(s.get("shop/b").await.unwrap().value, Some(json!(2)));
    f.finish().await;
});

both_backends!(retried_commit_is_applied_once, |backend| async move {
    let f = Fixture::new(backend, StateOptions::default()).await;
    let s = &f.state;
    let proposal = s
        .propose(vec![Change {
            key: "ledger/total".into(),
            base_version: 0,
            ops: vec![Op::Increment {
                path: String::new(),
                by: 5.into(),
            }],
            lease_token: None,
        }])
        .await
        .unwrap();
    let first = s.commit(&proposal.id, None, &author("a")).await.unwrap();
    let retry = s.commit(&proposal.id, None, &author("a")).await.unwrap();
    assert_eq!(first.seq, retry.seq);
    assert!(!first.replayed && retry.replayed);
    assert_eq!(s.get("ledger/total").await.unwrap().value, Some(json!(5)));
    assert_eq!(s.history("ledger/total", 10).await.unwrap().len(), 1);
    // Same idempotency key on two puts: the second returns the first's result.
    let one = s
        .put(
            vec![set("ledger/note", 0, json!("x"))],
            Some("req-42".into()),
            &author("a"),
        )
        .await
        .unwrap();
    let two = s
        .put(
            vec![set("ledger/note", 0, json!("x"))],
            Some("req-42".into()),
            &author("a"),
        )
        .await
        .unwrap();
    assert_eq!(one.seq, two.seq);
    assert!(two.replayed);
    f.finish().await;
});

both_backends!(
    bad_input_is_refused_and_changes_nothing,
    |backend| async move {
        let options = StateOptions {
            max_value_bytes: 64,
            proposal_ttl: Duration::from_millis(1),
            ..StateOptions::default()
        };
        let f = Fixture::new(backend, options).await;
        let s = &f.state;
        s.put(vec![set("cfg/x", 0, json!({"n": 1}))], None, &author("a"))
            .await
            .unwrap();
        let before = s.get("cfg/x").await.unwrap();

        let bad_patch = s
            .propose(vec![Change {
                key: "cfg/x".into(),
                base_version: 1,
                ops: vec![Op::JsonPatch {
                    patch: json!([{"op": "remove", "path": "/missing"}]),
                }],
                lease_token: None,
            }])
            .await
            .unwrap_err();
        assert!(
            matches!(bad_patch, StateError::InvalidOperation { .. }),
            "{bad_patch}"
        );

        let too_big = s
            .put(
                vec![set("cfg/x", 1, json!("x".repeat(100)))],
                None,
                &author("a"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(too_big, StateError::TooLarge { limit: 64, .. }),
            "{too_big}"
        );

        let bad_key = s
            .put(vec![set("cfg/../etc", 0, json!(1))], None, &author("a"))
            .await
            .unwrap_err();
        assert!(
            matches!(bad_key, StateError::InvalidKey { .. }),
            "{bad_key}"
        );

        let unknown = s.commit("p-nope", None, &author("a")).await.unwrap_err();
        assert!(
            matches!(unknown, StateError::UnknownProposal(_)),
            "{unknown}"
        );

        let proposal = s
            .propose(vec![set("cfg/x", 1, json!({"n": 2}))])
            .await
            .unwrap();
        until_past(proposal.expires_at_ms).await;
        let expired = s
            .commit(&proposal.id, None, &author("a"))
            .await
            .unwrap_err();
        assert!(
            matches!(expired, StateError::ExpiredProposal(_)),
            "{expired}"
        );

        assert_eq!(
            s.get("cfg/x").await.unwrap(),
            before,
            "every refusal left the value alone"
        );
        assert_eq!(s.history("cfg/x", 10).await.unwrap().len(), 1);
        f.finish().await;
    }
);

both_backends!(
    contended_read_modify_write_loses_nothing,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let state = Arc::new(f.state.clone());
        let mut workers = Vec::new();
        for worker in 0..16 {
            let state = state.clone();
            workers.push(tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..50 {
                    loop {
                        let read = state.get("race/counter").await.unwrap();
                        let n = read.value.as_ref().and_then(Value::as_i64).unwrap_or(0);
                        match state
                            .put(
                                vec![set("race/counter", read.version, json!(n + 1))],
                                None,
                                &author(&format!("w{worker}")),
                            )
                            .await
                        {
                            Ok(_) => break,
                            Err(StateError::Conflict(_)) => conflicts += 1,
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
                conflicts
            }));
        }
        let mut conflicts = 0;
        for worker in workers {
            conflicts += worker.await.unwrap();
        }
        let end = state.get("race/counter").await.unwrap();
        assert_eq!(
            end.value,
            Some(json!(800)),
            "{conflicts} conflicts were retried"
        );
        assert_eq!(end.version, 800);
        let history = state.history("race/counter", 1000).await.unwrap();
        assert_eq!(history.len(), 800);
        // Linearizable: version k holds the value k, and sequence numbers grow with versions.
        for (i, entry) in history.iter().rev().enumerate() {
            assert_eq!(entry.version, i as u64 + 1);
            assert_eq!(entry.value, json!(i as u64 + 1));
        }
        assert!(history.windows(2).all(|w| w[0].seq > w[1].seq));
        f.finish().await;
    }
);

both_backends!(leases_fence_out_stale_holders, |backend| async move {
    let f = Fixture::new(backend, StateOptions::default()).await;
    let s = &f.state;
    let ttl = Duration::from_secs(30);
    let first = s.claim("jobs/build", "worker-1", ttl, None).await.unwrap();
    assert!(first.granted);
    let token = first.token.unwrap();
    let other = s.claim("jobs/build", "worker-2", ttl, None).await.unwrap();
    assert!(!other.granted && other.holder == "worker-1", "{other:?}");

    let unfenced = s
        .put(
            vec![set("jobs/build", 0, json!("worker-2 was here"))],
            None,
            &author("worker-2"),
        )
        .await;
    assert!(
        matches!(
            unfenced,
            Err(StateError::Leased {
                presented: None,
                ..
            })
        ),
        "{unfenced:?}"
    );
    let mut fenced = set("jobs/build", 0, json!("built"));
    fenced.lease_token = Some(token);
    s.put(vec![fenced], None, &author("worker-1"))
        .await
        .unwrap();

    // Renewing keeps the token; releasing ends the lease; the next claim gets a larger token.
    let renewed = s
        .claim("jobs/build", "worker-1", ttl, Some(token))
        .await
        .unwrap();
    assert_eq!(renewed.token, Some(token));
    s.release("jobs/build", token).await.unwrap();
    let mut late = set("jobs/build", 1, json!("too late"));
    late.lease_token = Some(token);
    let lost = s.put(vec![late.clone()], None, &author("worker-1")).await;
    assert!(
        matches!(lost, Err(StateError::LeaseLost { .. })),
        "{lost:?}"
    );
    let second = s.claim("jobs/build", "worker-2", ttl, None).await.unwrap();
    assert_eq!(second.token, Some(token + 1));
    let stale = s.put(vec![late], None, &author("worker-1")).await;
    assert!(
        matches!(stale, Err(StateError::Leased { presented: Some(t), .. }) if t == token),
        "{stale:?}"
    );

    // Expiry frees the key: worker-2 renews for 50 ms only, and once the clock is past the
    // lease's end, the key is free for worker-3 and worker-2's token is stale.
    let short = s
        .claim(
            "jobs/build",
            "worker-2",
            Duration::from_millis(50),
            second.token,
        )
        .await
        .unwrap();
    assert!(short.granted && short.token == second.token, "{short:?}");
    until_past(short.expires_at_ms).await;
    let third = s.claim("jobs/build", "worker-3", ttl, None).await.unwrap();
    assert!(third.granted && third.token == Some(token + 2), "{third:?}");
    let expired = s.claim("jobs/build", "worker-2", ttl, second.token).await;
    assert!(
        matches!(expired, Err(StateError::LeaseLost { presented, .. }) if Some(presented) == second.token),
        "{expired:?}"
    );
    assert_eq!(
        s.get("jobs/build").await.unwrap().value,
        Some(json!("built"))
    );
    f.finish().await;
});

both_backends!(
    change_feed_resumes_without_gaps_or_duplicates,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let s = &f.state;
        for i in 0..5u64 {
            s.put(
                vec![
                    set(&format!("feed/a{i}"), 0, json!(i)),
                    set(&format!("feed/b{i}"), 0, json!(i)),
                ],
                None,
                &author("w"),
            )
            .await
            .unwrap();
            s.put(
                vec![set(&format!("other/x{i}"), 0, json!(i))],
                None,
                &author("w"),
            )
            .await
            .unwrap();
        }
        // Pages of 3 rows never split a two-key commit, and resuming continues exactly.
        let mut seen = Vec::new();
        let mut since = 0;
        loop {
            let page = s.changes("feed/", since, 3).await.unwrap();
            if page.is_empty() {
                break;
            }
            since = page.last().unwrap().seq;
            seen.extend(page);
        }
        assert_eq!(seen.len(), 10);
        let keys: Vec<&str> = seen.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys[..4], ["feed/a0", "feed/b0", "feed/a1", "feed/b1"]);
        assert!(seen.windows(2).all(|w| w[0].seq <= w[1].seq));
        assert!(seen.iter().all(|c| c.key.starts_with("feed/")));
        // Diff between versions.
        s.put(vec![set("feed/a0", 1, json!({"k": 1}))], None, &author("w"))
            .await
            .unwrap();
        assert_eq!(
            s.diff("feed/a0", 1, 2).await.unwrap(),
            json!([{"op": "replace", "path": "", "value": {"k": 1}}])
        );
        f.finish().await;
    }
);

both_backends!(namespace_schemas_are_enforced, |backend| async move {
    let options = StateOptions {
        schemas: [(
            "tasks".to_string(),
            json!({"type": "object", "required": ["title"], "properties": {"title": {"type": "string"}, "done": {"type": "boolean"}}}),
        )]
        .into(),
        ..StateOptions::default()
    };
    let f = Fixture::new(backend, options).await;
    let s = &f.state;
    s.put(
        vec![set("tasks/t1", 0, json!({"title": "write tests"}))],
        None,
        &author("a"),
    )
    .await
    .unwrap();
    let missing = s
        .put(
            vec![set("tasks/t2", 0, json!({"done": true}))],
            None,
            &author("a"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, StateError::SchemaViolation { errors, .. } if errors[0].contains("title")),
        "{missing}"
    );
    let patched = Change {
        key: "tasks/t1".into(),
        base_version: 1,
        ops: vec![Op::MergePatch {
            patch: json!({"done": "yes"}),
        }],
        lease_token: None,
    };
    let wrong_type = s.put(vec![patched], None, &author("a")).await.unwrap_err();
    assert!(
        matches!(&wrong_type, StateError::SchemaViolation { errors, .. } if errors[0].contains("/done")),
        "{wrong_type}"
    );
    assert_eq!(
        s.get("tasks/t1").await.unwrap().version,
        1,
        "refused writes change nothing"
    );
    assert_eq!(s.get("tasks/t2").await.unwrap().version, 0);
    // Other namespaces are free-form.
    s.put(vec![set("notes/n", 0, json!(42))], None, &author("a"))
        .await
        .unwrap();
    f.finish().await;
});

#[tokio::test]
async fn an_invalid_schema_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("s.db")).await.unwrap();
    let options = StateOptions {
        schemas: [("tasks".to_string(), json!({"type": "no-such-type"}))].into(),
        ..StateOptions::default()
    };
    let error = StateService::new(store, options)
        .err()
        .expect("must be refused");
    assert!(
        matches!(error, StateError::InvalidSchema { ref namespace, .. } if namespace == "tasks"),
        "{error}"
    );
}

both_backends!(
    history_retention_keeps_the_newest_versions,
    |backend| async move {
        let options = StateOptions {
            keep_versions: Some(3),
            ..StateOptions::default()
        };
        let f = Fixture::new(backend, options).await;
        let s = &f.state;
        for version in 0..5u64 {
            s.put(
                vec![set("log/entry", version, json!(version + 1))],
                None,
                &author("w"),
            )
            .await
            .unwrap();
        }
        let history = s.history("log/entry", 10).await.unwrap();
        assert_eq!(
            history.iter().map(|h| h.version).collect::<Vec<_>>(),
            [5, 4, 3]
        );
        assert_eq!(
            s.get("log/entry").await.unwrap().version,
            5,
            "the current version is untouched"
        );
        assert!(
            s.diff("log/entry", 1, 5).await.is_err(),
            "version 1 is no longer kept"
        );
        assert_eq!(
            s.diff("log/entry", 4, 5).await.unwrap(),
            json!([{"op": "replace", "path": "", "value": 5}])
        );
        // A stale writer whose base left the history is still refused, never merged blindly.
        let stale = s
            .put(
                vec![set("log/entry", 1, json!("late"))],
                None,
                &author("late"),
            )
            .await;
        assert!(matches!(stale, Err(StateError::Conflict(_))), "{stale:?}");
        // Sequence numbers keep growing after pruning.
        let next = s
            .put(vec![set("log/entry", 5, json!(6))], None, &author("w"))
            .await
            .unwrap();
        assert!(next.seq > history[0].seq);
        f.finish().await;
    }
);

// Agents' conversations live in the same store: turns append in order, concurrent turns of one
// conversation are all kept, and a conversation whose last turn is old is forgotten whole.
both_backends!(
    conversation_turns_append_and_expire_whole,
    |backend| async move {
        let f = Fixture::new(backend, StateOptions::default()).await;
        let store = f.state.store();
        let turn = |id: &str, at_ms: u64, text: &str| concord_store::Turn {
            conversation_id: id.into(),
            owner: "alice".into(),
            agent: "helper".into(),
            at_ms,
            messages: json!([{"role": "user", "content": text}]).to_string(),
        };
        assert!(store.conversation("c1").await.unwrap().is_empty());
        let turns: Vec<_> = (0..8)
            .map(|i| turn("c1", 1_000 + i, &format!("t{i}")))
            .collect();
        for result in futures::future::join_all(turns.iter().map(|t| store.append_turn(t))).await {
            result.unwrap();
        }
        store.append_turn(&turn("c2", 10, "old")).await.unwrap();
        store.append_turn(&turn("c3", 10, "old")).await.unwrap();
        store
            .append_turn(&turn("c3", 5_000, "recent"))
            .await
            .unwrap();
        let c1 = store.conversation("c1").await.unwrap();
        assert_eq!(c1.len(), 8, "no concurrent turn was lost");
        assert_eq!(c1[0].owner, "alice");
        // c2's last turn is older than the cutoff; c3 has a recent one, so all of it stays.
        assert_eq!(store.forget_conversations(500).await.unwrap(), 1);
        assert!(store.conversation("c2").await.unwrap().is_empty());
        assert_eq!(store.conversation("c3").await.unwrap().len(), 2);
        f.finish().await;
    }
);

#[path = "integration/holes.rs"]
mod holes;
