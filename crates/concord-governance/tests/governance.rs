//! Governance against real keys, a real JWKS endpoint on loopback and a real store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use concord_config::{AuthSettings, Effect, PolicyRule, StaticKey};
use concord_governance::clock::ManualClock;
use concord_governance::jwt::{JwksOptions, JwtVerifier};
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

/// What the loopback JWKS endpoint answers next; the test changes it between requests.
struct JwksReply {
    status: u16,
    body: String,
    cache_control: Option<String>,
}

/// A JWKS endpoint on loopback (a real HTTP server, so the fetch path is the real one) whose
/// answer the test controls, counting the requests it serves.
struct JwksEndpoint {
    url: String,
    reply: Arc<Mutex<JwksReply>>,
    hits: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl JwksEndpoint {
    async fn start(keys: Value) -> Self {
        let reply = Arc::new(Mutex::new(JwksReply {
            status: 200,
            body: keys.to_string(),
            cache_control: None,
        }));
        let hits = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get({
                let (reply, hits) = (reply.clone(), hits.clone());
                move || {
                    let (reply, hits) = (reply.clone(), hits.clone());
                    async move {
                        use axum::http::{HeaderValue, StatusCode, header};
                        use axum::response::IntoResponse;
                        hits.fetch_add(1, Ordering::SeqCst);
                        let reply = reply.lock();
                        let mut response = (
                            StatusCode::from_u16(reply.status).unwrap(),
                            [(header::CONTENT_TYPE, "application/json")],
                            reply.body.clone(),
                        )
                            .into_response();
                        if let Some(value) = &reply.cache_control {
                            response.headers_mut().insert(
                                header::CACHE_CONTROL,
                                HeaderValue::from_str(value).unwrap(),
                            );
                        }
                        response
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            reply,
            hits,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn publish(&self, keys: Value) {
        self.answer(200, keys.to_string());
    }

    fn answer(&self, status: u16, body: impl Into<String>) {
        let mut reply = self.reply.lock();
        reply.status = status;
        reply.body = body.into();
    }

    fn cache_control(&self, value: Option<&str>) {
        self.reply.lock().cache_control = value.map(str::to_string);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until it has closed every connection: from then on the
    /// address refuses connections.
    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

fn jwk(name: &str) -> Value {
    serde_json::from_str::<Value>(&testdata(&format!("{name}.jwk.json"))).unwrap()
}

fn rsa(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(testdata(&format!("{name}.key.pem")).as_bytes()).unwrap()
}

/// A token of `sub` signed by the RSA test key `name`, naming it as `kid`, valid for a week (the
/// tests move their clocks by hours).
fn rsa_token(name: &str, sub: &str) -> String {
    sign(
        Algorithm::RS256,
        Some(name),
        &rsa(name),
        &claims(json!({"sub": sub, "exp": now() + 7 * 86_400})),
    )
}

fn jwks_verifier(keys: Vec<StaticKey>, url: &str, clock: &ManualClock) -> JwtVerifier {
    JwtVerifier::with_options(
        &settings(keys, Some(url.into())),
        JwksOptions::default(),
        Arc::new(clock.clone()),
    )
    .unwrap()
}

async fn accepted(verifier: &JwtVerifier, token: &str) -> String {
    match verifier.verify(token).await {
        Ok(principal) => principal.id,
        Err(e) => panic!("refused: {e:?}"),
    }
}

async fn refusal(verifier: &JwtVerifier, token: &str) -> AuthError {
    match verifier.verify(token).await {
        Ok(principal) => panic!("accepted {principal:?}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_jwks_key_rotation_needs_no_restart() {
    let endpoint = JwksEndpoint::start(json!({"keys": [jwk("rsa1")]})).await;
    let clock = ManualClock::new();
    let verifier = jwks_verifier(Vec::new(), &endpoint.url, &clock);
    verifier.prefetch().await;
    assert_eq!(endpoint.hits(), 1);
    let old = rsa_token("rsa1", "alice");
    assert_eq!(accepted(&verifier, &old).await, "alice");

    // The provider publishes rsa2 beside rsa1. Within a second of the last fetch an unknown
    // `kid` does not refetch.
    endpoint.publish(json!({"keys": [jwk("rsa1"), jwk("rsa2")]}));
    let new = rsa_token("rsa2", "bob");
    assert!(matches!(
        refusal(&verifier, &new).await,
        AuthError::UnknownKey
    ));
    assert_eq!(
        endpoint.hits(),
        1,
        "an unknown kid refetches at most once a second"
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(accepted(&verifier, &new).await, "bob");
    assert_eq!(endpoint.hits(), 2);
    assert_eq!(
        accepted(&verifier, &old).await,
        "alice",
        "both valid mid-rotation"
    );
    assert_eq!(endpoint.hits(), 2, "known kids fetch nothing");
}

#[tokio::test]
async fn a_withdrawn_jwks_key_stops_being_accepted_at_the_next_refresh() {
    let endpoint = JwksEndpoint::start(json!({"keys": [jwk("rsa1"), jwk("rsa2")]})).await;
    let clock = ManualClock::new();
    let verifier = jwks_verifier(Vec::new(), &endpoint.url, &clock);
    verifier.prefetch().await;
    let (withdrawn, kept) = (rsa_token("rsa1", "alice"), rsa_token("rsa2", "bob"));
    assert_eq!(accepted(&verifier, &withdrawn).await, "alice");
    assert_eq!(accepted(&verifier, &kept).await, "bob");

    // The provider withdraws rsa1. Until the refresh is due (5 minutes) the set is not fetched.
    endpoint.publish(json!({"keys": [jwk("rsa2")]}));
    clock.advance(Duration::from_secs(299));
    assert_eq!(accepted(&verifier, &withdrawn).await, "alice");
    assert_eq!(endpoint.hits(), 1);

    // Due: the request that finds it so refreshes first, and rsa1 is gone.
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        refusal(&verifier, &withdrawn).await,
        AuthError::UnknownKey
    ));
    assert_eq!(
        endpoint.hits(),
        2,
        "one scheduled refresh, no unknown-kid refetch on top"
    );
    assert_eq!(accepted(&verifier, &kept).await, "bob");

    // A second later the unknown kid may refetch, and the key is still withdrawn.
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        refusal(&verifier, &withdrawn).await,
        AuthError::UnknownKey
    ));
    assert_eq!(endpoint.hits(), 3);
}

#[tokio::test]
async fn the_refresh_interval_follows_cache_control_within_a_floor_and_a_cap() {
    // (Cache-Control, seconds until the next scheduled refresh)
    let cases = [
        (None, 300),
        (Some("public, max-age=60"), 60),
        (Some("max-age=5"), 30),
        (Some("max-age=0"), 30),
        (Some("no-store"), 30),
        (Some("no-cache"), 30),
        (Some("max-age=86400"), 300),
        (Some("max-age=later"), 300),
    ];
    for (cache_control, interval) in cases {
        let endpoint = JwksEndpoint::start(json!({"keys": [jwk("rsa1")]})).await;
        endpoint.cache_control(cache_control);
        let clock = ManualClock::new();
        let verifier = jwks_verifier(Vec::new(), &endpoint.url, &clock);
        verifier.prefetch().await;
        let token = rsa_token("rsa1", "alice");
        for round in 1..=3 {
            clock.advance(Duration::from_secs(interval - 1));
            assert_eq!(accepted(&verifier, &token).await, "alice");
            assert_eq!(
                endpoint.hits(),
                round,
                "{cache_control:?}: no refresh before {interval} s (round {round})"
            );
            clock.advance(Duration::from_secs(1));
            assert_eq!(accepted(&verifier, &token).await, "alice");
            assert_eq!(
                endpoint.hits(),
                round + 1,
                "{cache_control:?}: a refresh at {interval} s (round {round})"
            );
        }
    }
}

/// How a test breaks its JWKS endpoint.
enum Breakage {
    /// It answers this status and body.
    Answers(u16, String),
    /// It is shut down: connections are refused.
    Down,
}

#[tokio::test]
async fn a_failing_jwks_keeps_the_last_good_keys_for_a_bounded_time() {
    let large = format!(r#"{{"keys": [], "padding": "{}"}}"#, "x".repeat(2 << 20));
    // (case, how the endpoint breaks, what the error says)
    let cases = [
        (
            "HTTP 503",
            Breakage::Answers(503, "busy".into()),
            "HTTP 503",
        ),
        ("HTTP 404", Breakage::Answers(404, "{}".into()), "HTTP 404"),
        (
            "not JSON",
            Breakage::Answers(200, "<html>sign in</html>".into()),
            "did not answer JSON",
        ),
        (
            "JSON, not a key set",
            Breakage::Answers(200, r#"{"keys": "none"}"#.into()),
            "not a key set",
        ),
        (
            "too large",
            Breakage::Answers(200, large),
            "larger than 1048576 bytes",
        ),
        ("unreachable", Breakage::Down, "unreachable"),
    ];
    for (case, breakage, expected) in cases {
        let mut endpoint = JwksEndpoint::start(json!({"keys": [jwk("rsa1")]})).await;
        let clock = ManualClock::new();
        let verifier = jwks_verifier(Vec::new(), &endpoint.url, &clock);
        verifier.prefetch().await;
        let token = rsa_token("rsa1", "alice");
        assert_eq!(accepted(&verifier, &token).await, "alice");
        let down = matches!(breakage, Breakage::Down);
        match breakage {
            Breakage::Answers(status, body) => endpoint.answer(status, body),
            Breakage::Down => endpoint.shut_down().await,
        }
        // The fetches the endpoint has seen (a shut-down one sees none).
        let fetches = |n: usize| if down { 1 } else { n };

        // The refresh at 5 minutes fails: the last good set stays, and the retry waits 30 s.
        clock.advance(Duration::from_secs(300));
        assert_eq!(accepted(&verifier, &token).await, "alice", "{case}");
        assert_eq!(endpoint.hits(), fetches(2), "{case}");
        clock.advance(Duration::from_secs(29));
        assert_eq!(accepted(&verifier, &token).await, "alice", "{case}");
        assert_eq!(endpoint.hits(), fetches(2), "{case}");
        clock.advance(Duration::from_secs(1));
        assert_eq!(accepted(&verifier, &token).await, "alice", "{case}");
        assert_eq!(endpoint.hits(), fetches(3), "{case}");

        // The set is kept until an hour past its refresh time, then refused with the reason.
        clock.advance(Duration::from_secs(300 + 3600 - 330 - 1));
        assert_eq!(accepted(&verifier, &token).await, "alice", "{case}");
        clock.advance(Duration::from_secs(1));
        match refusal(&verifier, &token).await {
            AuthError::KeysUnavailable(reason) => {
                assert!(reason.contains(expected), "{case}: {reason}");
                assert!(!reason.contains("127.0.0.1"), "{case}: {reason}");
            }
            other => panic!("{case}: {other:?}"),
        }
        // Later requests too, without a fetch each.
        let hits = endpoint.hits();
        assert!(matches!(
            refusal(&verifier, &token).await,
            AuthError::KeysUnavailable(_)
        ));
        assert_eq!(endpoint.hits(), hits, "{case}");

        // The endpoint recovers: the next retry installs the set again.
        if !down {
            endpoint.publish(json!({"keys": [jwk("rsa1")]}));
            clock.advance(Duration::from_secs(30));
            assert_eq!(accepted(&verifier, &token).await, "alice", "{case}");
        }
    }
}

#[tokio::test]
async fn an_unreachable_jwks_refuses_its_tokens_but_configured_keys_still_verify() {
    // A port nobody listens on any more.
    let url = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/jwks.json", listener.local_addr().unwrap())
    };
    let clock = ManualClock::new();
    let verifier = jwks_verifier(static_keys(), &url, &clock);
    verifier.prefetch().await;
    match refusal(&verifier, &rsa_token("rsa2", "bob")).await {
        AuthError::KeysUnavailable(reason) => assert!(reason.contains("unreachable"), "{reason}"),
        other => panic!("{other:?}"),
    }
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        refusal(&verifier, &rsa_token("rsa2", "bob")).await,
        AuthError::KeysUnavailable(_)
    ));
    let configured = sign(Algorithm::HS256, Some("hs"), &hs_key(), &claims(json!({})));
    assert_eq!(accepted(&verifier, &configured).await, "alice");
    assert_eq!(
        accepted(&verifier, &rsa_token("rsa1", "carol")).await,
        "carol"
    );
}

/// An HTTP/1.1 server answering every request with an endless chunked body (no length).
async fn serve_endless_body() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                // Until the client hangs up.
                while socket.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    url
}

#[tokio::test]
async fn a_jwks_body_without_a_length_is_cut_at_the_cap() {
    let url = serve_endless_body().await;
    let clock = ManualClock::new();
    let verifier = jwks_verifier(Vec::new(), &url, &clock);
    verifier.prefetch().await;
    match refusal(&verifier, &rsa_token("rsa1", "alice")).await {
        AuthError::KeysUnavailable(reason) => {
            assert!(reason.contains("larger than 1048576 bytes"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn tokens_without_kid_need_exactly_one_key_for_their_algorithm() {
    let clock = ManualClock::new();
    let verifier = |keys: Vec<StaticKey>| {
        JwtVerifier::with_options(
            &settings(keys, None),
            JwksOptions::default(),
            Arc::new(clock.clone()),
        )
        .unwrap()
    };
    let reason = |e: AuthError| match e {
        AuthError::Invalid(reason) => reason,
        other => panic!("{other:?}"),
    };

    // One HS256 key: a token without `kid` is verified with it (and must still be signed by it).
    let one_each = verifier(static_keys());
    let hs = sign(Algorithm::HS256, None, &hs_key(), &claims(json!({})));
    assert_eq!(accepted(&one_each, &hs).await, "alice");
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-it"),
        &claims(json!({})),
    );
    assert!(reason(refusal(&one_each, &forged).await).contains("signature"));
    let rs = sign(Algorithm::RS256, None, &rsa("rsa1"), &claims(json!({})));
    assert_eq!(accepted(&one_each, &rs).await, "alice");

    // Two RS256 keys: the token must say which.
    let mut keys = static_keys();
    keys.push(StaticKey {
        kid: Some("rsa2".into()),
        algorithm: "RS256".into(),
        secret: None,
        public_key_pem: Some(testdata("rsa2.pub.pem")),
    });
    let two_rsa = verifier(keys);
    let why = reason(refusal(&two_rsa, &rs).await);
    assert!(
        why.contains("names no key") && why.contains("2 keys"),
        "{why}"
    );
    assert_eq!(accepted(&two_rsa, &hs).await, "alice");

    // No key of the token's algorithm: refused, whatever it is signed with — an HS256 token
    // "signed" with an RSA public key finds no HS256 key to be checked against.
    let rsa_only = verifier(
        static_keys()
            .into_iter()
            .filter(|k| k.algorithm == "RS256")
            .collect(),
    );
    let confused = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(testdata("rsa1.pub.pem").as_bytes()),
        &claims(json!({})),
    );
    let why = reason(refusal(&rsa_only, &confused).await);
    assert!(why.contains("no key verifies HS256"), "{why}");
    let es = sign(
        Algorithm::ES256,
        None,
        &EncodingKey::from_ec_pem(testdata("ec1.key.pem").as_bytes()).unwrap(),
        &claims(json!({})),
    );
    assert!(reason(refusal(&rsa_only, &es).await).contains("no key verifies ES256"));
}

#[tokio::test]
async fn a_token_without_kid_uses_the_only_key_of_a_jwks() {
    let endpoint = JwksEndpoint::start(json!({"keys": [jwk("rsa1")]})).await;
    let clock = ManualClock::new();
    let verifier = jwks_verifier(Vec::new(), &endpoint.url, &clock);
    verifier.prefetch().await;
    let token = sign(
        Algorithm::RS256,
        None,
        &rsa("rsa1"),
        &claims(json!({"exp": now() + 86_400})),
    );
    assert_eq!(accepted(&verifier, &token).await, "alice");

    // With a second RSA key published, the token no longer says which key it means.
    endpoint.publish(json!({"keys": [jwk("rsa1"), jwk("rsa2")]}));
    clock.advance(Duration::from_secs(300));
    match refusal(&verifier, &token).await {
        AuthError::Invalid(reason) => assert!(reason.contains("2 keys"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn exp_and_nbf_are_checked_at_the_leeway_edges() {
    const T: u64 = 1_700_000_000;
    let clock = ManualClock::at(UNIX_EPOCH + Duration::from_secs(T));
    let verifier = |leeway: u64| {
        let mut settings = settings(static_keys(), None);
        settings.leeway = Duration::from_secs(leeway);
        JwtVerifier::with_options(&settings, JwksOptions::default(), Arc::new(clock.clone()))
            .unwrap()
    };
    let token = |extra: Value| {
        let mut claims = claims(json!({"exp": T + 300}));
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        sign(Algorithm::HS256, Some("hs"), &hs_key(), &claims)
    };
    let outcome =
        async |verifier: &JwtVerifier, extra: Value| match verifier.verify(&token(extra)).await {
            Ok(_) => "accepted".to_string(),
            Err(AuthError::Invalid(reason)) => reason,
            Err(other) => panic!("{other:?}"),
        };

    // Accepted until `exp + leeway` (exclusive), from `nbf - leeway` (inclusive).
    let five = verifier(5);
    assert_eq!(outcome(&five, json!({"exp": T - 4})).await, "accepted");
    assert_eq!(outcome(&five, json!({"exp": T - 5})).await, "token expired");
    assert_eq!(outcome(&five, json!({"exp": T - 6})).await, "token expired");
    assert_eq!(outcome(&five, json!({"nbf": T + 4})).await, "accepted");
    assert_eq!(outcome(&five, json!({"nbf": T + 5})).await, "accepted");
    assert_eq!(
        outcome(&five, json!({"nbf": T + 6})).await,
        "token not valid yet (nbf)"
    );
    // Fractional times (NumericDate allows them).
    assert_eq!(
        outcome(&five, json!({"exp": (T - 5) as f64 + 0.5})).await,
        "accepted"
    );

    let none = verifier(0);
    assert_eq!(outcome(&none, json!({"exp": T + 1})).await, "accepted");
    assert_eq!(outcome(&none, json!({"exp": T})).await, "token expired");
    assert_eq!(outcome(&none, json!({"nbf": T})).await, "accepted");
    assert_eq!(
        outcome(&none, json!({"nbf": T + 1})).await,
        "token not valid yet (nbf)"
    );

    // Malformed times are refused, not ignored.
    assert!(
        outcome(&five, json!({"exp": "tomorrow"}))
            .await
            .contains("exp")
    );
    assert_eq!(
        outcome(&five, json!({"nbf": "now"})).await,
        "the nbf claim is not a time"
    );

    // The same token crosses the edge as the clock moves.
    let expiring = token(json!({"exp": T + 10}));
    clock.advance(Duration::from_secs(14));
    assert_eq!(accepted(&five, &expiring).await, "alice");
    clock.advance(Duration::from_secs(1));
    match refusal(&five, &expiring).await {
        AuthError::Invalid(reason) => assert_eq!(reason, "token expired"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn roles_come_from_an_array_or_a_space_separated_string() {
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(static_keys(), None), store.clone()).unwrap();
    let roles = async |auth: &Authenticator, extra: Value| {
        let token = sign(Algorithm::HS256, Some("hs"), &hs_key(), &claims(extra));
        auth.authenticate(Some(&bearer(&token)))
            .await
            .unwrap()
            .roles
    };
    let cases = [
        (json!({"roles": "analyst"}), vec!["analyst"]),
        (
            json!({"roles": "analyst  admin\tops"}),
            vec!["analyst", "admin", "ops"],
        ),
        (json!({"roles": "  "}), vec![]),
        (
            json!({"roles": ["analyst", "admin"]}),
            vec!["analyst", "admin"],
        ),
        (
            json!({"roles": ["analyst", 7, null, "admin"]}),
            vec!["analyst", "admin"],
        ),
        (json!({"roles": []}), vec![]),
        (json!({"roles": 42}), vec![]),
        (json!({"roles": {"analyst": true}}), vec![]),
        (json!({"roles": null}), vec![]),
    ];
    for (extra, expected) in cases {
        assert_eq!(roles(&auth, extra.clone()).await, expected, "{extra}");
    }

    // Another claim, when configured; `roles` is then just a claim.
    let groups = Authenticator::new(
        &AuthSettings {
            roles_claim: "groups".into(),
            ..settings(static_keys(), None)
        },
        store,
    )
    .unwrap();
    assert_eq!(
        roles(&groups, json!({"groups": "ops dev", "roles": ["admin"]})).await,
        vec!["ops", "dev"]
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
    // Dropped at the end of the test, and when it panics.
    let database = concord_testkit::PgTestDatabase::create("concord_gov").await;
    let (first, second) = (
        Store::open_postgres(database.url()).await.unwrap(),
        Store::open_postgres(database.url()).await.unwrap(),
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
}

// ---- Budgets, audit and policy under abuse ("One front door": 4, 8 and the low items) ----

mod abuse {
    use super::*;
    use concord_governance::audit::{AuditOptions, GAP_KIND};
    use concord_governance::budgets::{Caller, Exhausted, Ledger, Limits, MAX_TOKENS, Ticket};
    use concord_governance::policy::PolicyError;
    use concord_store::AuditRow;

    fn chain(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn id_of(ticket: &Ticket) -> String {
        ticket.upstream_envelope["id"].as_str().unwrap().to_string()
    }

    fn as_parent(id: &str) -> Value {
        json!({ "parent": id })
    }

    fn standing(
        key: &str,
        limits: Limits,
    ) -> Option<(&str, Limits, Option<Duration>, Option<Duration>)> {
        Some((key, limits, None, None))
    }

    #[test]
    fn a_budget_envelope_is_usable_only_by_its_caller_and_those_acting_for_it() {
        let ledger = Ledger::new(0.8, 8);
        let (alice, mallory) = (chain(&["alice"]), chain(&["mallory"]));
        let alice_limits = Limits {
            tool_calls: Some(3),
            ..Limits::default()
        };
        // Alice's call gets an envelope of 2 tool calls for its sub-calls.
        let root = ledger
            .begin(
                Caller {
                    principal: "alice",
                    chain: &alice,
                },
                standing("alice", alice_limits),
                Some(&json!({"tool_calls": 2})),
            )
            .unwrap();
        let envelope = id_of(&root);
        // Mallory names it as her parent: refused, naming the envelope and the caller.
        let stolen = ledger
            .begin(
                Caller {
                    principal: "mallory",
                    chain: &mallory,
                },
                None,
                Some(&as_parent(&envelope)),
            )
            .unwrap_err();
        assert!(
            stolen.message.contains(&format!(
                "budget envelope {envelope} was not issued to mallory"
            )),
            "{stolen:?}"
        );
        // Nor can she splice alice into her chain after herself.
        let spliced = chain(&["mallory", "alice"]);
        assert!(
            ledger
                .begin(
                    Caller {
                        principal: "alice",
                        chain: &spliced
                    },
                    None,
                    Some(&as_parent(&envelope)),
                )
                .is_err()
        );
        // Alice herself, and an agent acting for her (her chain extended), may draw on it.
        ledger
            .begin(
                Caller {
                    principal: "alice",
                    chain: &alice,
                },
                None,
                Some(&as_parent(&envelope)),
            )
            .unwrap();
        let delegate = chain(&["alice", "agent:reader"]);
        let delegated = ledger
            .begin(
                Caller {
                    principal: "agent:reader",
                    chain: &delegate,
                },
                None,
                Some(&as_parent(&envelope)),
            )
            .unwrap();
        // The envelope issued to the delegate's call is the delegate's: alice's sibling agent
        // cannot use it, and the envelope (2 calls) is now spent, mallory or not.
        let sibling = chain(&["alice", "agent:other"]);
        assert!(
            ledger
                .begin(
                    Caller {
                        principal: "agent:other",
                        chain: &sibling
                    },
                    None,
                    Some(&as_parent(&id_of(&delegated))),
                )
                .unwrap_err()
                .message
                .contains("was not issued to agent:other")
        );
        let spent = ledger
            .begin(
                Caller {
                    principal: "alice",
                    chain: &alice,
                },
                None,
                Some(&as_parent(&envelope)),
            )
            .unwrap_err();
        assert!(
            spent.message.contains("tool_calls budget exhausted"),
            "{spent:?}"
        );
    }

    #[test]
    fn standing_budgets_cannot_be_named_as_a_parent() {
        let ledger = Ledger::new(0.8, 8);
        let (alice, mallory) = (chain(&["alice"]), chain(&["mallory"]));
        let limits = Limits {
            tool_calls: Some(2),
            ..Limits::default()
        };
        // Alice's standing budget exists (she has called once).
        let first = ledger
            .begin(
                Caller {
                    principal: "alice",
                    chain: &alice,
                },
                standing("alice", limits),
                None,
            )
            .unwrap();
        ledger.finish(&first, None);
        // The attack of the issue: mallory names alice's standing budget by its old id.
        for guess in ["principal:alice", "alice", "b1-0"] {
            let refused = ledger
                .begin(
                    Caller {
                        principal: "mallory",
                        chain: &mallory,
                    },
                    None,
                    Some(&as_parent(guess)),
                )
                .unwrap_err();
            assert!(
                refused.message.contains("is unknown or has expired"),
                "{guess}: {refused:?}"
            );
            // Not even alice may name it: a standing budget is no envelope.
            assert!(
                ledger
                    .begin(
                        Caller {
                            principal: "alice",
                            chain: &alice
                        },
                        None,
                        Some(&as_parent(guess)),
                    )
                    .is_err()
            );
        }
        // Alice's second call is still hers to make.
        let second = ledger
            .begin(
                Caller {
                    principal: "alice",
                    chain: &alice,
                },
                standing("alice", limits),
                None,
            )
            .unwrap();
        let report = ledger.finish(&second, None).report;
        assert_eq!(report["remaining"]["tool_calls"], 0, "{report}");
        // A malformed or oversized `parent` is refused before any lookup.
        for bad in [
            json!({"parent": 7}),
            json!({"parent": "x".repeat(10_000)}),
            json!({"parent": "a b"}),
        ] {
            let refused = ledger
                .begin(
                    Caller {
                        principal: "mallory",
                        chain: &mallory,
                    },
                    None,
                    Some(&bad),
                )
                .unwrap_err();
            assert!(
                refused.message.contains("invalid budget envelope"),
                "{refused:?}"
            );
            assert!(refused.message.len() < 300, "the id is not echoed whole");
        }
    }

    #[test]
    fn envelope_ids_are_random() {
        let ledger = Ledger::new(0.8, 8);
        let alice = chain(&["alice"]);
        let mut seen = std::collections::HashSet::new();
        let mut previous: Option<u128> = None;
        let mut successive_close = 0;
        for _ in 0..500 {
            let ticket = ledger
                .begin(
                    Caller {
                        principal: "alice",
                        chain: &alice,
                    },
                    None,
                    Some(&json!({})),
                )
                .unwrap();
            let id = id_of(&ticket);
            let hex = id.strip_prefix("env-").expect("env-<hex>");
            assert_eq!(hex.len(), 32, "{id}: 128 bits");
            let value = u128::from_str_radix(hex, 16).unwrap();
            // No counter: successive ids are not near each other.
            if previous.is_some_and(|p| p.abs_diff(value) < 1 << 64) {
                successive_close += 1;
            }
            previous = Some(value);
            assert!(seen.insert(id));
            ledger.finish(&ticket, None);
        }
        assert_eq!(successive_close, 0);
    }

    #[test]
    fn reservations_cannot_wrap_the_token_sum() {
        let ledger = Ledger::new(0.8, 8);
        let alice = chain(&["alice"]);
        let me = Caller {
            principal: "alice",
            chain: &alice,
        };
        let limits = Limits {
            tokens: Some(100),
            ..Limits::default()
        };
        let first = ledger
            .begin(
                me,
                standing("alice", limits),
                Some(&json!({"reserve_tokens": 50})),
            )
            .unwrap();
        // 50 + (2^64 - 10) used to wrap to 39, under the limit of 100.
        let wrapping = ledger
            .begin(
                me,
                standing("alice", limits),
                Some(&json!({"reserve_tokens": u64::MAX - 10})),
            )
            .unwrap_err();
        assert!(
            wrapping
                .message
                .contains("`reserve_tokens` must be a whole number from 0 to"),
            "{wrapping:?}"
        );
        // A negative or fractional reservation is refused too, not read as 0.
        for bad in [json!(-1), json!(1.5), json!("10")] {
            let refused: Exhausted = ledger
                .begin(
                    me,
                    standing("alice", limits),
                    Some(&json!({"reserve_tokens": bad})),
                )
                .unwrap_err();
            assert!(refused.message.contains("reserve_tokens"), "{refused:?}");
        }
        // The budget still holds exactly what it did: 50 more tokens fit, 51 do not.
        assert!(
            ledger
                .begin(
                    me,
                    standing("alice", limits),
                    Some(&json!({"reserve_tokens": 51}))
                )
                .unwrap_err()
                .message
                .contains("tokens budget exhausted")
        );
        ledger
            .begin(
                me,
                standing("alice", limits),
                Some(&json!({"reserve_tokens": 50})),
            )
            .unwrap();
        ledger.finish(&first, None);
        // Reservations of the largest size on an unlimited budget saturate instead of wrapping.
        let bob = chain(&["bob"]);
        let bob = Caller {
            principal: "bob",
            chain: &bob,
        };
        let unlimited = Limits::default();
        for _ in 0..3 {
            ledger
                .begin(
                    bob,
                    standing("bob", unlimited),
                    Some(&json!({"reserve_tokens": MAX_TOKENS, "deadline_ms": u64::MAX})),
                )
                .unwrap();
        }
    }

    #[test]
    fn reported_usage_is_validated_a_negative_cost_never_refunds_and_huge_counts_saturate() {
        let ledger = Ledger::new(0.99, 8);
        let alice = chain(&["alice"]);
        let me = Caller {
            principal: "alice",
            chain: &alice,
        };
        let limits = Limits {
            tokens: Some(1_000_000),
            cost_usd: Some(1.0),
            ..Limits::default()
        };
        let call = |usage: Value| {
            let ticket = ledger.begin(me, standing("alice", limits), None).unwrap();
            ledger.finish(&ticket, Some(&usage))
        };
        let settled = call(json!({"cost_usd": 0.9}));
        assert!(settled.usage_problems.is_empty());
        assert!((settled.report["remaining"]["cost_usd"].as_f64().unwrap() - 0.1).abs() < 1e-9);
        // A negative cost used to be added as is: a refund of $5.
        let settled = call(json!({"cost_usd": -5.0}));
        let left = settled.report["remaining"]["cost_usd"].as_f64().unwrap();
        assert!(
            (left - 0.1).abs() < 1e-9,
            "a negative cost refunded: {left}"
        );
        assert!(
            settled.usage_problems[0].contains("negative"),
            "{:?}",
            settled.usage_problems
        );
        // Token counts that would wrap (or panic) when summed: charged at the per-call maximum.
        let settled = call(json!({
            "input_tokens": u64::MAX,
            "output_tokens": u64::MAX,
            "tokens": "lots",
        }));
        assert_eq!(settled.report["remaining"]["tokens"], 0);
        let problems = settled.usage_problems.join("; ");
        assert!(
            problems.contains("input_tokens 18446744073709551615 exceeds the maximum"),
            "{problems}"
        );
        assert!(
            problems.contains("tokens \"lots\" is not a non-negative number"),
            "{problems}"
        );
        // The budget is spent: the next call is refused, not wrapped round to a fresh budget.
        let refused = ledger
            .begin(me, standing("alice", limits), None)
            .unwrap_err();
        assert!(
            refused.message.contains("tokens budget exhausted"),
            "{refused:?}"
        );
        // A charge made during a call (an agent's model turn) cannot refund either.
        let ledger = Ledger::new(0.99, 8);
        let ticket = ledger.begin(me, standing("alice", limits), None).unwrap();
        let left = ledger.charge(&id_of(&ticket), 10, 0.25).unwrap();
        assert_eq!(left["cost_usd"], json!(0.75));
        let left = ledger.charge(&id_of(&ticket), u64::MAX, -100.0).unwrap();
        assert_eq!(
            (left["cost_usd"].clone(), left["tokens"].clone()),
            (json!(0.75), json!(0))
        );
        // A standing budget is no envelope to charge.
        assert!(ledger.charge("principal:alice", 1, 0.0).is_none());
    }

    async fn rows(store: &Store) -> Vec<AuditRow> {
        store.audit_rows(0, 100_000).await.unwrap()
    }

    fn data(row: &AuditRow) -> Value {
        serde_json::from_str(&row.data).unwrap()
    }

    #[tokio::test]
    async fn a_flood_of_auth_failures_is_a_few_counted_rows() {
        let (_dir, store) = sqlite_store().await;
        let log = AuditLog::start(store.clone());
        for _ in 0..1000 {
            log.record_noise(
                "auth_failure",
                "-",
                json!({"path": "/mcp", "reason": "authentication required"}),
            );
        }
        for _ in 0..10 {
            log.record_noise(
                "auth_failure",
                "-",
                json!({"path": "/mcp", "reason": "malformed token"}),
            );
        }
        log.flush().await;
        let stored = rows(&store).await;
        // Per distinct failure: the first at once, the rest as one counted row.
        assert_eq!(stored.len(), 4, "{stored:#?}");
        let count = |reason: &str| {
            stored
                .iter()
                .map(data)
                .filter(|d| d["reason"] == reason)
                .map(|d| d["count"].as_u64().unwrap())
                .sum::<u64>()
        };
        assert_eq!(count("authentication required"), 1000);
        assert_eq!(count("malformed token"), 10);
        assert!(stored.iter().all(|r| r.kind == "auth_failure"));
        assert_eq!(audit::verify(&store).await.unwrap(), Ok(4));
    }

    #[tokio::test]
    async fn too_many_distinct_noise_events_are_dropped_and_counted_in_the_chain() {
        let (_dir, store) = sqlite_store().await;
        let log = AuditLog::start_with(
            store.clone(),
            AuditOptions {
                max_noise_keys: 5,
                ..AuditOptions::default()
            },
        );
        for i in 0..50 {
            log.record_noise("auth_failure", "-", json!({"path": format!("/p{i}")}));
        }
        log.flush().await;
        let stored = rows(&store).await;
        let gaps: Vec<Value> = stored
            .iter()
            .filter(|r| r.kind == GAP_KIND)
            .map(data)
            .collect();
        assert_eq!(gaps.len(), 1, "{stored:#?}");
        assert_eq!(gaps[0]["dropped_noise"], 45);
        assert_eq!(gaps[0]["dropped_noise_by_kind"]["auth_failure"], 45);
        assert_eq!(
            stored.iter().filter(|r| r.kind == "auth_failure").count(),
            5
        );
        assert_eq!(audit::verify(&store).await.unwrap(), Ok(6));
    }

    #[tokio::test]
    async fn the_audit_queue_is_bounded_requests_wait_for_room_and_overflow_is_on_the_record() {
        let (_dir, store) = sqlite_store().await;
        let log = AuditLog::start_with(
            store.clone(),
            AuditOptions {
                capacity: 10,
                ..AuditOptions::default()
            },
        );
        // Recorded without yielding (the writer cannot run in between): the queue takes twice
        // its capacity, the rest is counted, never held without bound.
        for i in 0..100 {
            log.record("policy_decision", "alice", json!({"n": i}));
        }
        assert_eq!(log.queued(), 20);
        // Past the capacity, noise is not queued either: it is counted and written later.
        log.record_noise("auth_failure", "-", json!({"path": "/mcp"}));
        assert_eq!(log.queued(), 20);
        // A request waits until the writer has made room.
        assert!(log.room(Duration::from_secs(10)).await);
        assert!(log.queued() < 10);
        log.flush().await;
        let stored = rows(&store).await;
        let gaps: Vec<Value> = stored
            .iter()
            .filter(|r| r.kind == GAP_KIND)
            .map(data)
            .collect();
        assert_eq!(gaps.len(), 1, "{stored:#?}");
        assert_eq!(gaps[0]["lost"], 80);
        assert_eq!(gaps[0]["lost_by_kind"]["policy_decision"], 80);
        assert!(
            gaps[0]["causes"][0]
                .as_str()
                .unwrap()
                .contains("queue full")
        );
        let decisions = stored
            .iter()
            .filter(|r| r.kind == "policy_decision")
            .count();
        let failures: u64 = stored
            .iter()
            .filter(|r| r.kind == "auth_failure")
            .map(|r| data(r)["count"].as_u64().unwrap())
            .sum();
        assert_eq!((decisions, failures), (20, 1));
        assert_eq!(
            audit::verify(&store).await.unwrap(),
            Ok(stored.len() as u64)
        );
    }

    #[tokio::test]
    async fn a_failed_append_is_a_gap_marker_in_the_chain_once_the_store_is_back() {
        let (dir, store) = sqlite_store().await;
        let log = AuditLog::start(store.clone());
        for i in 0..5 {
            log.record("tool_call", "alice", json!({"n": i}));
        }
        log.flush().await;
        let db = dir.path().join("state.db");
        let sql = |statement: &'static str| {
            let db = db.clone();
            async move {
                use sqlx::Connection;
                let mut conn =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                        .await
                        .unwrap();
                sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
        };
        // The store fails every append while the table is away.
        sql("ALTER TABLE audit_log RENAME TO audit_log_away").await;
        for i in 0..3 {
            log.record("policy_decision", "mallory", json!({"n": i}));
        }
        log.record("tool_call", "mallory", json!({"n": 3}));
        log.flush().await;
        sql("ALTER TABLE audit_log_away RENAME TO audit_log").await;
        assert_eq!(audit::verify(&store).await.unwrap(), Ok(5));
        // Back: the next append starts with the gap marker.
        log.record("tool_call", "alice", json!({"n": 5}));
        log.flush().await;
        let stored = rows(&store).await;
        assert_eq!(stored.len(), 7, "{stored:#?}");
        assert_eq!(stored[5].kind, GAP_KIND);
        let gap = data(&stored[5]);
        assert_eq!(gap["lost"], 4, "{gap}");
        assert_eq!(
            gap["lost_by_kind"],
            json!({"policy_decision": 3, "tool_call": 1})
        );
        assert!(
            gap["causes"][0].as_str().unwrap().starts_with("store:"),
            "{gap}"
        );
        assert!(gap["from_ms"].as_u64().unwrap() <= gap["to_ms"].as_u64().unwrap());
        assert_eq!(stored[6].kind, "tool_call");
        assert_eq!(audit::verify(&store).await.unwrap(), Ok(7));
    }

    #[test]
    fn a_deny_rule_that_fails_to_evaluate_denies_and_is_named() {
        let engine = PolicyEngine::new(
            vec![
                rule("everyone", Effect::Allow, "true"),
                // No `has(arguments.path)`: on a call without `path` this errors.
                rule(
                    "no-secrets",
                    Effect::Deny,
                    r#"arguments.path.startsWith("/secrets")"#,
                ),
            ],
            None,
        )
        .unwrap();
        let alice = principal("alice", &[]);
        // Before: the erroring deny rule did not match and "everyone" allowed the call.
        let decision = engine.decide(&alice, &call("fs__read_file", None));
        assert!(!decision.allowed(), "{decision:?}");
        assert_eq!(decision.rule(), "no-secrets");
        assert!(decision.error().is_some(), "{decision:?}");
        // A list (no arguments yet) still shows the tool: every call is decided again with its
        // arguments, where the rule fails closed.
        assert_eq!(
            engine.decide_listing(&alice, &call("fs__read_file", None)),
            Decision::Allow {
                rule: "everyone".into()
            }
        );
        // With the field present the rule evaluates as written.
        let fine = json!({"path": "/tmp/x"});
        assert_eq!(
            engine.decide(&alice, &call("fs__read_file", fine.as_object())),
            Decision::Allow {
                rule: "everyone".into()
            }
        );
        let numeric = json!({"path": 7});
        assert!(
            !engine
                .decide(&alice, &call("fs__read_file", numeric.as_object()))
                .allowed()
        );
        // A deny rule that yields no boolean fails closed too; an allow rule that errors
        // allows nothing.
        let engine = PolicyEngine::new(
            vec![
                rule("odd-deny", Effect::Deny, "arguments"),
                rule("broken-allow", Effect::Allow, "arguments.missing == 1"),
            ],
            None,
        )
        .unwrap();
        let decision = engine.decide(&alice, &call("fs__read_file", None));
        assert_eq!(decision.rule(), "odd-deny");
        assert!(
            decision.error().unwrap().contains("not a boolean"),
            "{decision:?}"
        );
        let engine = PolicyEngine::new(
            vec![rule(
                "broken-allow",
                Effect::Allow,
                "arguments.missing == 1",
            )],
            None,
        )
        .unwrap();
        assert_eq!(
            engine.decide(&alice, &call("fs__read_file", None)),
            Decision::Deny { rule: None }
        );
    }

    #[test]
    fn a_rule_that_does_not_parse_is_a_typed_error_naming_it() {
        let refused = PolicyEngine::new(
            vec![rule("bad", Effect::Allow, "principal.roles.exists(")],
            None,
        )
        .err()
        .expect("refused");
        assert!(
            matches!(&refused, PolicyError::Parse { rule, .. } if rule == "bad"),
            "{refused:?}"
        );
        assert!(
            refused
                .to_string()
                .starts_with("rule \"bad\": `when` does not parse"),
            "{refused}"
        );
        let missing = PolicyEngine::new(Vec::new(), Some("/nonexistent/policy.toml".into()))
            .err()
            .expect("refused");
        assert!(matches!(missing, PolicyError::File(_)), "{missing:?}");
    }
}

/// Only keys of the shape `concord keys create` makes reach the lookup cache and the store: a
/// stranger's 64 KiB "id" is refused as malformed (an unknown well-formed id is "unknown").
#[tokio::test]
async fn api_keys_of_another_shape_are_refused_before_any_lookup() {
    let (_dir, store) = sqlite_store().await;
    let auth = Authenticator::new(&settings(Vec::new(), None), store.clone()).unwrap();
    let secret = "0".repeat(64);
    for token in [
        format!("ck_{}_{secret}", "a".repeat(65_536)),
        format!("ck_ABCDEF012345_{secret}"),
        format!("ck_0123456789a_{secret}"),
        "ck_0123456789ab_short".to_string(),
        format!("ck_0123456789ab_{}", "g".repeat(64)),
    ] {
        match auth.authenticate(Some(&bearer(&token))).await {
            Err(AuthError::Invalid(reason)) => assert_eq!(reason, "malformed API key"),
            other => panic!("{:.40}: {other:?}", token),
        }
    }
    match auth
        .authenticate(Some(&bearer(&format!("ck_0123456789ab_{secret}"))))
        .await
    {
        Err(AuthError::Invalid(reason)) => assert_eq!(reason, "unknown API key"),
        other => panic!("{other:?}"),
    }
}
