//! Governance against real keys, a real JWKS endpoint on loopback and a real store.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use concord_config::{AuthSettings, Effect, PolicyRule, StaticKey};
use concord_governance::policy::{Action, Decision, PolicyEngine, Reload};
use concord_governance::{AuditLog, AuthError, Authenticator, Principal, api_keys, audit};
use concord_store::Store;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{Value, json};

const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

fn testdata(name: &str) -> String {
    std::fs::read_to_string(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut base = json!({
        "sub": "alice",
        "iss": "https://idp.test",
        "aud": "concord",
        "exp": now() + 300,
        "roles": ["analyst"],
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(SECRET.as_bytes())
}

fn settings(keys: Vec<StaticKey>, jwks_url: Option<String>) -> AuthSettings {
    AuthSettings {
        enabled: true,
        issuer: Some("https://idp.test".into()),
        audience: Some("concord".into()),
        jwks_url,
        keys,
        leeway: Duration::from_secs(5),
        ..AuthSettings::default()
    }
}

fn static_keys() -> Vec<StaticKey> {
    let public = |kid: &str, alg: &str, file: &str| StaticKey {
        kid: Some(kid.into()),
        algorithm: alg.into(),
        secret: None,
        public_key_pem: Some(testdata(file)),
    };
    vec![
        StaticKey {
            kid: Some("hs".into()),
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key_pem: None,
        },
        public("rsa1", "RS256", "rsa1.pub.pem"),
        public("ec1", "ES256", "ec1.pub.pem"),
        public("ed1", "EdDSA", "ed1.pub.pem"),
    ]
}

async fn sqlite_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("state.db"))
        .await
        .unwrap();
    (dir, store)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn every_supported_algorithm_verifies_and_names_the_principal() {
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(static_keys(), None), store).unwrap();
    let tokens = [
        sign(Algorithm::HS256, Some("hs"), &hs_key(), &claims(json!({}))),
        sign(
            Algorithm::RS256,
            Some("rsa1"),
            &EncodingKey::from_rsa_pem(testdata("rsa1.key.pem").as_bytes()).unwrap(),
            &claims(json!({})),
        ),
        sign(
            Algorithm::ES256,
            Some("ec1"),
            &EncodingKey::from_ec_pem(testdata("ec1.key.pem").as_bytes()).unwrap(),
            &claims(json!({})),
        ),
        sign(
            Algorithm::EdDSA,
            Some("ed1"),
            &EncodingKey::from_ed_pem(testdata("ed1.key.pem").as_bytes()).unwrap(),
            &claims(json!({})),
        ),
    ];
    for token in tokens {
        let principal = auth.authenticate(Some(&bearer(&token))).await.unwrap();
        assert_eq!(principal.id, "alice");
        assert_eq!(principal.roles, vec!["analyst".to_string()]);
        assert_eq!(principal.method, "jwt");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_reason() {
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(static_keys(), None), store).unwrap();
    let refused = |token: String| {
        let auth = &auth;
        async move {
            match auth.authenticate(Some(&bearer(&token))).await {
                Err(AuthError::Invalid(reason)) => reason,
                Err(other) => other.to_string(),
                Ok(p) => panic!("accepted {p:?}"),
            }
        }
    };
    // Forged: signed with another secret.
    let forged = sign(
        Algorithm::HS256,
        Some("hs"),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-it"),
        &claims(json!({})),
    );
    assert!(refused(forged).await.contains("signature"));
    let expired = sign(
        Algorithm::HS256,
        Some("hs"),
        &hs_key(),
        &claims(json!({"exp": now() - 600})),
    );
    assert!(refused(expired).await.contains("expired"));
    let early = sign(
        Algorithm::HS256,
        Some("hs"),
        &hs_key(),
        &claims(json!({"nbf": now() + 600})),
    );
    assert!(refused(early).await.contains("not valid yet"));
    let issuer = sign(
        Algorithm::HS256,
        Some("hs"),
        &hs_key(),
        &claims(json!({"iss": "https://evil.test"})),
    );
    assert!(refused(issuer).await.contains("issuer"));
    let audience = sign(
        Algorithm::HS256,
        Some("hs"),
        &hs_key(),
        &claims(json!({"aud": "someone-else"})),
    );
    assert!(refused(audience).await.contains("audience"));
    let no_exp = sign(
        Algorithm::HS256,
        Some("hs"),
        &hs_key(),
        &claims(json!({"exp": null})),
    );
    assert!(refused(no_exp).await.contains("exp"));

    // alg: none, hand-made (no library will sign it).
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    assert!(refused(none).await.contains("not accepted"));

    // Algorithm confusion: HS256 with the RSA *public* key as the HMAC secret, naming the RSA key.
    let confused = sign(
        Algorithm::HS256,
        Some("rsa1"),
        &EncodingKey::from_secret(testdata("rsa1.pub.pem").as_bytes()),
        &claims(json!({})),
    );
    assert!(refused(confused).await.contains("does not match"));

    // A garbage header and a non-bearer scheme.
    assert!(refused("garbage".into()).await.contains("malformed"));
    assert!(matches!(
        auth.authenticate(Some("Basic YWxpY2U6cGFzcw==")).await,
        Err(AuthError::Invalid(_))
    ));
    assert!(matches!(
        auth.authenticate(None).await,
        Err(AuthError::Missing)
    ));
}

#[tokio::test]
async fn delegation_chain_comes_from_the_act_claim() {
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(static_keys(), None), store).unwrap();
    let token = sign(
        Algorithm::HS256,
        Some("hs"),
        &hs_key(),
        &claims(
            json!({"act": {"sub": "sub-agent", "act": {"sub": "planner"}}, "principal_kind": "agent"}),
        ),
    );
    let principal = auth.authenticate(Some(&bearer(&token))).await.unwrap();
    assert_eq!(principal.chain, vec!["alice", "planner", "sub-agent"]);
    assert_eq!(principal.kind, "agent");
}

/// A JWKS endpoint on loopback whose key set the test can replace.
async fn serve_jwks(keys: Arc<Mutex<Value>>) -> String {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let keys = keys.clone();
            async move { axum::Json(keys.lock().clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_jwks_key_rotation_needs_no_restart() {
    let jwk =
        |name: &str| serde_json::from_str::<Value>(&testdata(&format!("{name}.jwk.json"))).unwrap();
    let published = Arc::new(Mutex::new(json!({"keys": [jwk("rsa1")]})));
    let url = serve_jwks(published.clone()).await;
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(Vec::new(), Some(url)), store).unwrap();
    auth.prepare().await;
    let rsa = |name: &str| {
        EncodingKey::from_rsa_pem(testdata(&format!("{name}.key.pem")).as_bytes()).unwrap()
    };
    let old = sign(
        Algorithm::RS256,
        Some("rsa1"),
        &rsa("rsa1"),
        &claims(json!({})),
    );
    assert_eq!(
        auth.authenticate(Some(&bearer(&old))).await.unwrap().id,
        "alice"
    );

    // The provider rotates: rsa2 is published beside rsa1, then rsa1 is withdrawn.
    *published.lock() = json!({"keys": [jwk("rsa1"), jwk("rsa2")]});
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = sign(
        Algorithm::RS256,
        Some("rsa2"),
        &rsa("rsa2"),
        &claims(json!({"sub": "bob"})),
    );
    assert_eq!(
        auth.authenticate(Some(&bearer(&new))).await.unwrap().id,
        "bob"
    );
    assert_eq!(
        auth.authenticate(Some(&bearer(&old))).await.unwrap().id,
        "alice",
        "both valid mid-rotation"
    );
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_and_revocable() {
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(Vec::new(), None), store.clone()).unwrap();
    let created = api_keys::create(&store, "ci-bot", &["deployer".to_string()], 1)
        .await
        .unwrap();
    let stored = store.api_key(&created.id).await.unwrap().unwrap();
    assert!(!stored.secret_sha256.is_empty());
    assert!(
        !created.token.contains(&stored.secret_sha256),
        "only a hash is stored"
    );
    let secret = created.token.rsplit('_').next().unwrap();
    assert_ne!(secret, stored.secret_sha256);

    let principal = auth
        .authenticate(Some(&bearer(&created.token)))
        .await
        .unwrap();
    assert_eq!(
        (principal.id.as_str(), principal.method.as_str()),
        ("ci-bot", "api_key")
    );
    assert_eq!(principal.roles, vec!["deployer".to_string()]);

    let wrong = format!("ck_{}_{}", created.id, "0".repeat(64));
    assert!(matches!(
        auth.authenticate(Some(&bearer(&wrong))).await,
        Err(AuthError::Invalid(_))
    ));

    assert!(store.revoke_api_key(&created.id, 2).await.unwrap());
    assert!(
        !store.revoke_api_key(&created.id, 3).await.unwrap(),
        "already revoked"
    );
    // Lookups are cached for two seconds on each node.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    match auth.authenticate(Some(&bearer(&created.token))).await {
        Err(AuthError::Invalid(reason)) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("a revoked key was accepted: {other:?}"),
    }
}

fn rule(name: &str, effect: Effect, when: &str) -> PolicyRule {
    PolicyRule {
        name: name.into(),
        effect,
        when: when.into(),
    }
}

fn principal(id: &str, roles: &[&str]) -> Principal {
    Principal {
        id: id.into(),
        kind: "user".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        chain: vec![id.into()],
        method: "jwt".into(),
    }
}

fn call<'a>(tool: &'a str, arguments: Option<&'a serde_json::Map<String, Value>>) -> Action<'a> {
    Action {
        method: "tools/call",
        server: tool.split("__").next().unwrap_or_default(),
        name: tool,
        arguments,
        namespace: None,
        operations: &[],
    }
}

#[test]
fn deny_wins_nothing_matching_denies_and_the_deciding_rule_is_named() {
    let engine = PolicyEngine::new(
        vec![
            rule(
                "analysts-read",
                Effect::Allow,
                r#""analyst" in principal.roles && tool.startsWith("fs__read")"#,
            ),
            rule("admins", Effect::Allow, r#""admin" in principal.roles"#),
            rule(
                "no-secrets",
                Effect::Deny,
                r#"has(arguments.path) && arguments.path.startsWith("/secrets")"#,
            ),
        ],
        None,
    )
    .unwrap();
    let alice = principal("alice", &["analyst"]);
    let root = principal("root", &["admin"]);
    assert_eq!(
        engine.decide(&alice, &call("fs__read_file", None)),
        Decision::Allow {
            rule: "analysts-read".into()
        }
    );
    assert_eq!(
        engine.decide(&alice, &call("fs__write_file", None)),
        Decision::Deny { rule: None }
    );
    assert!(
        engine
            .decide(&root, &call("fs__write_file", None))
            .allowed()
    );
    let secret = json!({"path": "/secrets/key"});
    let decision = engine.decide(&root, &call("fs__read_file", secret.as_object()));
    assert_eq!(
        decision,
        Decision::Deny {
            rule: Some("no-secrets".into())
        }
    );
    assert_eq!(decision.rule(), "no-secrets");
}

#[test]
fn a_broken_policy_file_is_refused_and_the_old_rules_stay() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "[[rules]]\nname = \"everyone\"\neffect = \"allow\"\nwhen = \"true\"\n",
    )
    .unwrap();
    let engine = PolicyEngine::new(Vec::new(), Some(file.clone())).unwrap();
    let alice = principal("alice", &[]);
    assert!(
        engine
            .decide(&alice, &call("fs__read_file", None))
            .allowed()
    );

    // A rule that does not parse: refused, the old set stays.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        &file,
        "[[rules]]\nname = \"broken\"\neffect = \"allow\"\nwhen = \"principal.id ==\"\n",
    )
    .unwrap();
    bump_mtime(&file);
    match engine.reload_if_changed() {
        Reload::Refused { error } => assert!(error.contains("broken"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert!(
        engine
            .decide(&alice, &call("fs__read_file", None))
            .allowed()
    );

    // A file that is not even TOML: the same.
    std::fs::write(&file, "[[rules]\nname = ").unwrap();
    bump_mtime(&file);
    assert!(matches!(engine.reload_if_changed(), Reload::Refused { .. }));
    assert!(
        engine
            .decide(&alice, &call("fs__read_file", None))
            .allowed()
    );

    // A good file replaces the rules.
    std::fs::write(
        &file,
        "[[rules]]\nname = \"nobody\"\neffect = \"deny\"\nwhen = \"true\"\n",
    )
    .unwrap();
    bump_mtime(&file);
    assert_eq!(engine.reload_if_changed(), Reload::Loaded { rules: 1 });
    assert_eq!(
        engine.decide(&alice, &call("fs__read_file", None)),
        Decision::Deny {
            rule: Some("nobody".into())
        }
    );
    assert_eq!(engine.reload_if_changed(), Reload::Unchanged);
}

/// File systems with coarse timestamps could miss a quick rewrite; move the time on.
fn bump_mtime(path: &std::path::Path) {
    static STEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let step = STEP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(step))
        .unwrap();
}

#[tokio::test]
async fn the_audit_chain_verifies_and_names_the_first_tampered_entry() {
    let (dir, store) = sqlite_store().await;
    let log = AuditLog::start(store.clone());
    for i in 0..20 {
        log.record(
            "tool_call",
            &format!("user{}", i % 3),
            json!({"tool": "fs__read_file", "n": i}),
        );
    }
    log.flush().await;
    assert_eq!(audit::verify(&store).await.unwrap(), Ok(20));

    let db = dir.path().join("state.db");
    let tamper = |sql: &'static str| {
        let db = db.clone();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                .await
                .unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            conn.close().await.unwrap();
        }
    };
    // Modified content.
    tamper("UPDATE audit_log SET data = '{\"tool\":\"other\"}' WHERE seq = 7").await;
    let broken = audit::verify(&store).await.unwrap().unwrap_err();
    assert_eq!(broken.seq, 7, "{broken:?}");
    assert!(broken.reason.contains("modified"));
}

#[tokio::test]
async fn deleting_or_swapping_audit_entries_is_detected() {
    for case in ["delete", "swap"] {
        let (dir, store) = sqlite_store().await;
        let log = AuditLog::start(store.clone());
        for i in 0..10 {
            log.record("policy_decision", "alice", json!({"n": i}));
        }
        log.flush().await;
        assert_eq!(audit::verify(&store).await.unwrap(), Ok(10));
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            dir.path().join("state.db").display()
        ))
        .await
        .unwrap();
        let sql = if case == "delete" {
            "DELETE FROM audit_log WHERE seq = 4"
        } else {
            // Rows 4 and 5 trade places, each keeping its own hash.
            "UPDATE audit_log SET seq = -4 WHERE seq = 4; UPDATE audit_log SET seq = 4 WHERE seq = 5; UPDATE audit_log SET seq = 5 WHERE seq = -4;"
        };
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        let broken = audit::verify(&store).await.unwrap().unwrap_err();
        assert_eq!(broken.seq, 4, "{case}: {broken:?}");
    }
}

#[tokio::test]
async fn two_nodes_on_one_postgresql_build_one_verifiable_chain_and_share_api_keys() {
    let admin_url = std::env::var("CONCORD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = concord_store::AdminConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL (CONCORD_TEST_POSTGRES) must be reachable");
    let database = format!(
        "concord_gov_{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    admin
        .execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let base = admin_url.split('?').next().unwrap();
    let url = format!("{}/{database}", base.rsplit_once('/').unwrap().0);
    let (first, second) = (
        Store::open_postgres(&url).await.unwrap(),
        Store::open_postgres(&url).await.unwrap(),
    );
    let (log_a, log_b) = (
        AuditLog::start(first.clone()),
        AuditLog::start(second.clone()),
    );
    for i in 0..50 {
        log_a.record("tool_call", "a", json!({"n": i}));
        log_b.record("tool_call", "b", json!({"n": i}));
    }
    tokio::join!(log_a.flush(), log_b.flush());
    assert_eq!(audit::verify(&first).await.unwrap(), Ok(100));

    let created = api_keys::create(&first, "shared-bot", &[], 1)
        .await
        .unwrap();
    let auth = Authenticator::new(&settings(Vec::new(), None), second.clone()).unwrap();
    assert_eq!(
        auth.authenticate(Some(&bearer(&created.token)))
            .await
            .unwrap()
            .id,
        "shared-bot"
    );

    first.close().await;
    second.close().await;
    admin
        .execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .unwrap();
}
