//! The store against real databases: SQLite in a temporary directory and PostgreSQL in a fresh
//! database on the server named by CONCORD_TEST_POSTGRES (default the local test server; the
//! tests fail, never skip, when it is unreachable). Every test runs on both.
//!
//! Schema migrations: an upgrade from the previous schema version keeps the data; nodes opening
//! a fresh database at once migrate it exactly once; a failing migration leaves the database at
//! the version it had; a database newer than this binary is refused. And the test databases
//! themselves: dropped even when a test panics.

use std::sync::Arc;

use concord_store::{
    Claim, CommitMeta, KeyRef, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, Store, StoreError,
    Transacted, Turn, UsageFilter, Write, migrate,
};
use concord_testkit::PgTestDatabase;
use serde_json::json;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty database of one backend, removed when dropped (a failing test included).
struct Db {
    kind: Kind,
    /// What `Store::open` and `migrate` take.
    location: String,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<PgTestDatabase>,
}

impl Db {
    async fn new(kind: Kind) -> Db {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Db {
                    kind,
                    location: dir.path().join("store.db").display().to_string(),
                    _dir: Some(dir),
                    _postgres: None,
                }
            }
            Kind::Postgres => {
                let database = PgTestDatabase::create("concord_store").await;
                Db {
                    kind,
                    location: database.url().to_string(),
                    _dir: None,
                    _postgres: Some(database),
                }
            }
        }
    }

    /// The migrations this binary embeds for the backend.
    fn migrations(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Sqlite => SQLITE_MIGRATIONS,
            Kind::Postgres => POSTGRES_MIGRATIONS,
        }
    }

    /// Runs `sql` (any number of statements) on a connection of its own.
    async fn exec(&self, sql: &str) {
        let result = match self.kind {
            Kind::Sqlite => {
                let mut conn = self.sqlite().await;
                let result = sqlx::raw_sql(sql).execute(&mut conn).await.map(drop);
                conn.close().await.unwrap();
                result
            }
            Kind::Postgres => {
                let mut conn = self.postgres().await;
                let result = sqlx::raw_sql(sql).execute(&mut conn).await.map(drop);
                conn.close().await.unwrap();
                result
            }
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of every row of `sql`, a BIGINT.
    async fn column(&self, sql: &str) -> Vec<i64> {
        let result = match self.kind {
            Kind::Sqlite => {
                let mut conn = self.sqlite().await;
                let rows = sqlx::query_scalar(sql).fetch_all(&mut conn).await;
                conn.close().await.unwrap();
                rows
            }
            Kind::Postgres => {
                let mut conn = self.postgres().await;
                let rows = sqlx::query_scalar(sql).fetch_all(&mut conn).await;
                conn.close().await.unwrap();
                rows
            }
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn count(&self, sql: &str) -> i64 {
        self.column(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM ({sql}) AS counted"
        ))
        .await[0]
    }

    /// Every row of `concord_schema`, in order: one per applied migration.
    async fn schema_rows(&self) -> Vec<i64> {
        self.column("SELECT CAST(version AS BIGINT) FROM concord_schema ORDER BY version")
            .await
    }

    /// The names of the schema's tables, sorted.
    async fn tables(&self) -> Vec<String> {
        let sql = match self.kind {
            Kind::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Kind::Postgres => {
                "SELECT CAST(table_name AS TEXT) FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
            }
        };
        let result = match self.kind {
            Kind::Sqlite => {
                let mut conn = self.sqlite().await;
                sqlx::query_scalar(sql).fetch_all(&mut conn).await
            }
            Kind::Postgres => {
                let mut conn = self.postgres().await;
                sqlx::query_scalar(sql).fetch_all(&mut conn).await
            }
        };
        result.unwrap()
    }

    async fn sqlite(&self) -> SqliteConnection {
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&self.location))
            .await
            .unwrap()
    }

    async fn postgres(&self) -> PgConnection {
        PgConnection::connect(&self.location).await.unwrap()
    }
}

/// `1..=n`, the schema rows of a database at version `n`.
fn versions(n: usize) -> Vec<i64> {
    (1..=n as i64).collect()
}

fn key(ns: &str, name: &str) -> KeyRef {
    KeyRef {
        namespace: ns.into(),
        key: name.into(),
    }
}

/// Far in the future (2100-01-01), so a lease written now is live when it is read.
const FAR: u64 = 4_102_444_800_000;

/// Rows of every kind the previous schema version holds, written as that version's SQL (the
/// same text on both backends): two commits of two keys, a proposal, a live lease, an API key,
/// an audit chain of two rows, a registration and a usage row. A migration that reshapes one
/// of these tables must keep this test passing (or change the rows and what is checked).
fn previous_version_rows() -> String {
    let hash_a = "a".repeat(64);
    let hash_b = "b".repeat(64);
    let genesis = concord_store::GENESIS_HASH;
    format!(
        r#"
INSERT INTO state_commits (seq, author, proposal_id, trace_id, committed_at_ms, idempotency_key, result) VALUES
    (1, 'alice', NULL, 'trace-1', 1700000000000, 'idem-1', '{{"seq":1,"versions":[["t","a",1]]}}'),
    (2, 'bob', 'p-1', NULL, 1700000001000, NULL, '{{"seq":2,"versions":[["t","a",2],["t","b",1]]}}');
INSERT INTO state_history (ns, key, version, value, seq) VALUES
    ('t', 'a', 1, '{{"n":1}}', 1),
    ('t', 'a', 2, '{{"n":2}}', 2),
    ('t', 'b', 1, '"text"', 2);
INSERT INTO state_keys (ns, key, version, value, seq) VALUES
    ('t', 'a', 2, '{{"n":2}}', 2),
    ('t', 'b', 1, '"text"', 2);
INSERT INTO state_proposals (id, body, status, expires_at_ms) VALUES
    ('p-1', '{{"changes":[]}}', 'applied', {FAR});
INSERT INTO state_leases (ns, key, token, holder, expires_at_ms) VALUES
    ('t', 'a', 7, 'worker-1', {FAR});
INSERT INTO api_keys (id, principal, roles, secret_sha256, created_at_ms, revoked_at_ms) VALUES
    ('k1', 'ci-bot', '["admin"]', '{hash_a}', 1700000000000, NULL),
    ('k2', 'old-bot', '[]', '{hash_b}', 1700000000000, 1700000005000);
INSERT INTO audit_log (seq, at_ms, kind, principal, data, prev_hash, hash) VALUES
    (1, 1700000000000, 'tool_call', 'alice', '{{"tool":"x"}}', '{genesis}', '{hash_a}'),
    (2, 1700000002000, 'tool_call', 'bob', '{{"tool":"y"}}', '{hash_a}', '{hash_b}');
INSERT INTO registry (id, namespace, name, body, health, registered_at_ms, last_heartbeat_ms) VALUES
    ('default/svc', 'default', 'svc', '{{"name":"svc"}}', 'healthy', 1700000000000, 1700000000500);
INSERT INTO llm_usage (at_ms, run_id, parent_run, agent, principal, provider, model, input_tokens, output_tokens, cost_usd, latency_ms, error) VALUES
    (1700000000000, 'run-1', NULL, 'helper', 'alice', 'openai', 'gpt-x', 120, 30, 0.5, 850, NULL);
"#
    )
}

// --- (a) upgrading a database of the previous schema version --------------------------------

async fn upgrade_keeps_the_previous_versions_data(kind: Kind) {
    let db = Db::new(kind).await;
    let all = db.migrations();
    let previous = all.len() - 1;
    assert_eq!(
        migrate(&db.location, &all[..previous]).await.unwrap(),
        previous as u32
    );
    assert_eq!(db.schema_rows().await, versions(previous));
    db.exec(&previous_version_rows()).await;
    if kind == Kind::Postgres {
        // PostgreSQL hands out sequence numbers from this row.
        db.exec("UPDATE state_sequence SET seq = 2").await;
    }
    let tables_before = db.tables().await;

    // The current binary opens it: the new migration is applied once, on top.
    let store = Store::open(&db.location).await.unwrap();
    assert_eq!(db.schema_rows().await, versions(all.len()));
    let tables_after = db.tables().await;
    assert!(
        tables_before.iter().all(|t| tables_after.contains(t)),
        "{tables_before:?} -> {tables_after:?}"
    );
    assert!(tables_after.len() > tables_before.len(), "{tables_after:?}");

    // State: current values, history with its commit metadata, the sequence.
    let a = store.get(&key("t", "a")).await.unwrap();
    assert_eq!((a.version, a.value), (2, Some(json!({"n": 2}))));
    let b = store.get(&key("t", "b")).await.unwrap();
    assert_eq!((b.version, b.value), (1, Some(json!("text"))));
    let history = store.history(&key("t", "a"), 10).await.unwrap();
    let summary: Vec<_> = history
        .iter()
        .map(|v| {
            (
                v.version,
                v.value.clone(),
                v.seq,
                v.author.as_str(),
                v.proposal_id.as_deref(),
                v.trace_id.as_deref(),
                v.committed_at_ms,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                2,
                json!({"n": 2}),
                2,
                "bob",
                Some("p-1"),
                None,
                1_700_000_001_000
            ),
            (
                1,
                json!({"n": 1}),
                1,
                "alice",
                None,
                Some("trace-1"),
                1_700_000_000_000
            ),
        ]
    );
    assert_eq!(store.last_seq().await.unwrap(), 2);
    let changes = store.changes_since("t", "", 0, 10).await.unwrap();
    assert_eq!(changes.len(), 3);

    // A retried commit of before the upgrade still replays its stored result.
    let meta = |idempotency: Option<&str>| CommitMeta {
        author: "carol".into(),
        idempotency_key: idempotency.map(str::to_string),
        ..CommitMeta::default()
    };
    let replay = store
        .transact::<(), _>(&[key("t", "a")], &meta(Some("idem-1")), |_| {
            panic!("a replayed commit is not decided again")
        })
        .await
        .unwrap();
    match replay {
        Transacted::Committed(c) => {
            assert!(c.replayed);
            assert_eq!(c.seq, 1);
            assert_eq!(c.versions, vec![("t".into(), "a".into(), 1)]);
        }
        Transacted::Refused(()) => panic!("refused"),
    }
    // A new commit continues the sequence and the key's versions.
    let next = store
        .transact::<(), _>(&[key("t", "a")], &meta(None), |currents| {
            assert_eq!(currents[0].version, 2);
            Ok(vec![Write {
                key: key("t", "a"),
                value: json!({"n": 3}),
            }])
        })
        .await
        .unwrap();
    match next {
        Transacted::Committed(c) => {
            assert_eq!(c.seq, 3);
            assert_eq!(c.versions, vec![("t".into(), "a".into(), 3)]);
        }
        Transacted::Refused(()) => panic!("refused"),
    }

    // Proposals and leases.
    let proposal = store.get_proposal("p-1").await.unwrap().unwrap();
    assert_eq!(
        (proposal.status.as_str(), proposal.expires_at_ms),
        ("applied", FAR)
    );
    match store.claim(&key("t", "a"), "worker-2", 1000).await.unwrap() {
        Claim::Held(lease) => {
            assert_eq!((lease.token, lease.holder.as_str()), (7, "worker-1"));
        }
        Claim::Granted(lease) => panic!("the stored lease was lost: granted {lease:?}"),
    }

    // Governance: API keys (revocation included) and the audit chain.
    let k1 = store.api_key("k1").await.unwrap().unwrap();
    assert_eq!(
        (k1.principal.as_str(), k1.roles.clone(), k1.revoked_at_ms),
        ("ci-bot", vec!["admin".to_string()], None)
    );
    let k2 = store.api_key("k2").await.unwrap().unwrap();
    assert_eq!(k2.revoked_at_ms, Some(1_700_000_005_000));
    let audit = store.audit_rows(0, 10).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .map(|r| (r.seq, r.principal.as_str(), r.hash.clone()))
            .collect::<Vec<_>>(),
        vec![(1, "alice", "a".repeat(64)), (2, "bob", "b".repeat(64))]
    );
    assert_eq!(audit[1].prev_hash, audit[0].hash);

    // The registry and the usage ledger.
    let registry = store.registry().await.unwrap();
    assert_eq!(registry.len(), 1);
    assert_eq!(
        (registry[0].id.as_str(), registry[0].last_heartbeat_ms),
        ("default/svc", 1_700_000_000_500)
    );
    let usage = store.usage(&UsageFilter::default()).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (
            usage[0].run_id.as_str(),
            usage[0].input_tokens,
            usage[0].cost_usd
        ),
        ("run-1", 120, 0.5)
    );

    // What the new schema added works (the conversations of agents at the time of writing).
    let turn = Turn {
        conversation_id: "c-1".into(),
        owner: "alice".into(),
        agent: "helper".into(),
        at_ms: 1_700_000_003_000,
        messages: "[]".into(),
    };
    store.append_turn(&turn).await.unwrap();
    assert_eq!(store.conversation("c-1").await.unwrap(), vec![turn]);
    store.close().await;

    // Opening again applies nothing more.
    let store = Store::open(&db.location).await.unwrap();
    assert_eq!(db.schema_rows().await, versions(all.len()));
    assert_eq!(store.last_seq().await.unwrap(), 3);
    store.close().await;
}

#[tokio::test]
async fn upgrade_keeps_the_previous_versions_data_sqlite() {
    upgrade_keeps_the_previous_versions_data(Kind::Sqlite).await;
}

#[tokio::test]
async fn upgrade_keeps_the_previous_versions_data_postgres() {
    upgrade_keeps_the_previous_versions_data(Kind::Postgres).await;
}

// --- (b) several nodes opening one database at once -----------------------------------

/// How many databases each backend is raced on (fresh ones, and ones of the previous schema
/// version, alternately), and how many nodes open each at once.
const RACES: usize = 4;
const NODES: usize = 4;

async fn nodes_opening_together_migrate_once(kind: Kind) {
    for race in 0..RACES {
        let db = Db::new(kind).await;
        let all = db.migrations();
        let from = if race % 2 == 0 { 0 } else { all.len() - 1 };
        if from > 0 {
            migrate(&db.location, &all[..from]).await.unwrap();
        }
        // Each node is a thread with a runtime of its own, as separate processes would be;
        // they open the store the moment all of them are ready.
        let start = Arc::new(std::sync::Barrier::new(NODES));
        let nodes: Vec<_> = (0..NODES)
            .map(|_| {
                let (location, start) = (db.location.clone(), start.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    start.wait();
                    runtime.block_on(async {
                        let store = Store::open(&location).await?;
                        store.close().await;
                        Ok::<_, StoreError>(())
                    })
                })
            })
            .collect();
        for (node, opened) in nodes.into_iter().enumerate() {
            if let Err(e) = opened.join().unwrap() {
                panic!("race {race} (from version {from}): node {node} failed to open: {e}");
            }
        }
        // Each migration recorded once, and (had one run twice) its rows are not doubled.
        assert_eq!(
            db.schema_rows().await,
            versions(all.len()),
            "race {race} (from version {from})"
        );
        if kind == Kind::Postgres {
            assert_eq!(db.count("SELECT * FROM state_sequence").await, 1);
        }
    }

    // The nodes work on the schema they share (only PostgreSQL's nodes are meant to share a
    // database: SQLite's committer is the only writer of its file).
    if kind == Kind::Postgres {
        let db = Db::new(kind).await;
        let (first, second) = (
            Store::open(&db.location).await.unwrap(),
            Store::open(&db.location).await.unwrap(),
        );
        let written = first
            .transact::<(), _>(
                &[key("t", "k")],
                &CommitMeta {
                    author: "node-1".into(),
                    ..CommitMeta::default()
                },
                |_| {
                    Ok(vec![Write {
                        key: key("t", "k"),
                        value: json!("shared"),
                    }])
                },
            )
            .await
            .unwrap();
        assert!(matches!(written, Transacted::Committed(c) if c.seq == 1));
        let seen = second.get(&key("t", "k")).await.unwrap();
        assert_eq!(seen.value, Some(json!("shared")));
        first.close().await;
        second.close().await;
    }
}

#[tokio::test]
async fn nodes_opening_one_database_together_migrate_it_once_sqlite() {
    nodes_opening_together_migrate_once(Kind::Sqlite).await;
}

#[tokio::test]
async fn nodes_opening_one_database_together_migrate_it_once_postgres() {
    nodes_opening_together_migrate_once(Kind::Postgres).await;
}

// --- (c) a migration that fails ---------------------------------------------------------------

/// Fails halfway: its first statements succeed, the last does not.
const BROKEN_MIGRATION: &str = "CREATE TABLE half_done (x INTEGER NOT NULL);
INSERT INTO half_done (x) VALUES (1);
INSERT INTO no_such_table (x) VALUES (1);";

async fn a_failing_migration_changes_nothing(kind: Kind) {
    let db = Db::new(kind).await;
    let all = db.migrations();
    let previous = all.len() - 1;
    migrate(&db.location, &all[..previous]).await.unwrap();
    db.exec(&previous_version_rows()).await;
    let tables_before = db.tables().await;

    // One run with two pending migrations, the real newest one and then one that fails.
    let mut list = all.to_vec();
    list.push(BROKEN_MIGRATION);
    let error = migrate(&db.location, &list).await.unwrap_err();
    match &error {
        StoreError::Migrate { version, .. } => assert_eq!(*version as usize, all.len() + 1),
        other => panic!("expected the migration's failure, got {other}"),
    }
    assert!(error.to_string().contains("no_such_table"), "{error}");

    // The database is at the version it had: no row for either migration of the run, none of
    // the failed one's tables, none of the one before it (same transaction), its data intact.
    assert_eq!(db.schema_rows().await, versions(previous));
    assert_eq!(db.tables().await, tables_before);
    assert_eq!(db.count("SELECT * FROM api_keys").await, 2);
    assert_eq!(db.count("SELECT * FROM state_history").await, 3);

    // The binary's own migrations still apply to it afterwards.
    let store = Store::open(&db.location).await.unwrap();
    assert_eq!(db.schema_rows().await, versions(all.len()));
    assert_eq!(store.get(&key("t", "a")).await.unwrap().version, 2);
    store.close().await;

    // And a failure on a database already at the newest version leaves it there.
    let error = migrate(&db.location, &list).await.unwrap_err();
    assert!(matches!(error, StoreError::Migrate { .. }), "{error}");
    assert_eq!(db.schema_rows().await, versions(all.len()));
    assert!(!db.tables().await.contains(&"half_done".to_string()));
}

#[tokio::test]
async fn a_failing_migration_leaves_the_previous_version_sqlite() {
    a_failing_migration_changes_nothing(Kind::Sqlite).await;
}

#[tokio::test]
async fn a_failing_migration_leaves_the_previous_version_postgres() {
    a_failing_migration_changes_nothing(Kind::Postgres).await;
}

// --- (d) a database newer than this binary ----------------------------------------------------

async fn a_newer_database_is_refused(kind: Kind) {
    let db = Db::new(kind).await;
    let known = db.migrations().len();
    Store::open(&db.location).await.unwrap().close().await;
    // A newer binary migrated it further.
    let newer = known + 1;
    db.exec(&format!(
        "CREATE TABLE from_the_future (x INTEGER); INSERT INTO concord_schema (version) VALUES ({newer})"
    ))
    .await;

    let error = Store::open(&db.location)
        .await
        .err()
        .expect("a database newer than the binary must be refused");
    match &error {
        StoreError::SchemaTooNew { found, known: k } => {
            assert_eq!((*found as usize, *k as usize), (newer, known));
        }
        other => panic!("expected SchemaTooNew, got {other}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&format!("version {newer}"))
            && message.contains(&format!("version {known}")),
        "the message names both versions: {message}"
    );
    // Refusing touched nothing.
    assert_eq!(db.schema_rows().await, versions(newer));
    assert!(db.tables().await.contains(&"from_the_future".to_string()));

    // The same for a binary two versions behind (fewer migrations than the database has).
    let error = migrate(&db.location, &db.migrations()[..known - 1])
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::SchemaTooNew { found, known: k } if found as usize == newer && k as usize == known - 1),
        "{error}"
    );
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused_sqlite() {
    a_newer_database_is_refused(Kind::Sqlite).await;
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused_postgres() {
    a_newer_database_is_refused(Kind::Postgres).await;
}

// --- test databases ---------------------------------------------------------------------------

async fn database_exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(&PgTestDatabase::admin_url())
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    count == 1
}

#[tokio::test]
async fn a_test_database_is_dropped_when_its_test_ends_even_by_panicking() {
    // Ending normally.
    let database = PgTestDatabase::create("concord_store").await;
    let name = database.name().to_string();
    assert!(database_exists(&name).await);
    drop(database);
    assert!(!database_exists(&name).await, "{name} was left behind");

    // Panicking, with a store still connected to it, on a runtime of its own as a test's.
    let (sender, names) = std::sync::mpsc::channel();
    let test = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let database = PgTestDatabase::create("concord_store").await;
            let _store = Store::open(database.url()).await.unwrap();
            sender.send(database.name().to_string()).unwrap();
            panic!("this test fails on purpose, with its database in use");
        })
    });
    assert!(test.join().is_err(), "the inner test panicked");
    let name = names.recv().unwrap();
    assert!(
        !database_exists(&name).await,
        "{name} was left behind by a panicking test"
    );
}
