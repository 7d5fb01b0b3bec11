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
