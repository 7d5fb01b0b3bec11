//! Property tests of the credentials a request presents and the rules that judge it: JWTs (any
//! text, any base64 segments, any header and claims signed with a test key), API keys, and
//! policy rules over any arguments. Whatever comes in: a principal only when everything holds,
//! otherwise an error, never a panic.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use concord_config::{AuthSettings, Effect, PolicyRule, StaticKey};
use jsonwebtoken::{Algorithm, EncodingKey};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::AuthError;
use crate::api_keys::{self, ApiKeyVerifier, looks_like_api_key};
use crate::clock::ManualClock;
use crate::jwt::{JwksOptions, JwtVerifier};
use crate::policy::{Action, RuleSet};

/// `PROPTEST_CASES` when set (for a longer local run), else `cases`; no regression files
/// written into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const SECRET_1: &str = "proptest-secret-one-of-at-least-32-bytes";
const SECRET_2: &str = "proptest-secret-two-of-at-least-32-bytes";
/// The verifier's clock: 2023-11-14.
const NOW: u64 = 1_700_000_000;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
});

/// Two HS256 keys (`k1`, `k2`), an issuer and an audience.
static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    let key = |kid: &str, secret: &str| StaticKey {
        kid: Some(kid.into()),
        algorithm: "HS256".into(),
        secret: Some(secret.into()),
        public_key_pem: None,
    };
    let settings = AuthSettings {
        enabled: true,
        issuer: Some("https://idp.test".into()),
        audience: Some("concord".into()),
        keys: vec![key("k1", SECRET_1), key("k2", SECRET_2)],
        ..AuthSettings::default()
    };
    let clock = ManualClock::at(UNIX_EPOCH + Duration::from_secs(NOW));
    JwtVerifier::with_options(&settings, JwksOptions::default(), Arc::new(clock)).unwrap()
});

fn verify(token: &str) -> Result<crate::identity::Principal, AuthError> {
    RUNTIME.block_on(VERIFIER.verify(token))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.claims.signature`, signed with `secret` as HS256 whatever the header says.
fn signed(header: &Value, claims: &Value, secret: &str) -> String {
    let message = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A time claim: around now, far away, or not a time at all.
fn time_claim() -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            6 => (-7_200i64..7_200).prop_map(|d| json!(NOW as i64 + d)),
            1 => (-7_200.0f64..7_200.0).prop_map(|d| json!(NOW as f64 + d)),
            1 => prop::sample::select(vec![
                json!(0), json!(-1), json!(u64::MAX), json!(i64::MIN), json!(1e300), json!(-1e300),
                json!(f64::MAX), json!("1700000000"), json!(null), json!(true), json!([NOW]),
            ]),
            1 => arb_json(),
        ],
    )
}

/// A header: the algorithm and key id usually right, sometimes anything.
fn header() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            6 => Just(json!("HS256")),
            1 => prop::sample::select(vec![
                json!("none"), json!("RS256"), json!("ES256"), json!("EdDSA"), json!("HS512"),
                json!("hs256"), json!(""), json!(null), json!(256),
            ]),
        ],
        prop::option::weighted(
            0.95,
            prop_oneof![
                8 => Just(json!("k1")),
                1 => Just(json!("k2")),
                1 => prop::sample::select(vec![json!("k3"), json!(""), json!(1), json!(null), json!("K1")]),
            ],
        ),
        prop::option::of(prop::sample::select(vec!["JWT", "at+jwt", ""])),
        prop::option::weighted(0.1, arb_json()),
    )
        .prop_map(|(alg, kid, typ, extra)| {
            let mut header = json!({"alg": alg});
            if let Some(kid) = kid {
                header["kid"] = kid;
            }
            if let Some(typ) = typ {
                header["typ"] = json!(typ);
            }
            if let Some(extra) = extra {
                header["crit"] = extra;
            }
            header
        })
}

/// Claims: each of the checked ones usually right, sometimes wrong or missing.
fn claims() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            12 => Just(Some(json!("https://idp.test"))),
            1 => Just(Some(json!(["https://other.test", "https://idp.test"]))),
            2 => prop::option::of(arb_json()),
        ],
        prop_oneof![
            5 => Just(Some(json!("concord"))),
            1 => Just(Some(json!(["other", "concord"]))),
            1 => prop::option::of(arb_json()),
        ],
        prop_oneof![
            3 => (-30i64..7_200).prop_map(|d| Some(json!(NOW as i64 + d))),
            2 => time_claim(),
        ],
        prop_oneof![
            2 => Just(None),
            1 => (-7_200i64..30).prop_map(|d| Some(json!(NOW as i64 + d))),
            2 => time_claim(),
        ],
        prop_oneof![
            6 => "[a-z]{1,8}".prop_map(|s| Some(json!(s))),
            1 => prop::option::of(arb_json()),
        ],
        prop::option::of(prop_oneof![
            prop::collection::vec("[a-z]{1,6}", 0..3).prop_map(|r| json!(r)),
            "[a-z ]{0,12}".prop_map(Value::from),
            arb_json(),
        ]),
        prop::option::weighted(0.2, arb_json()),
        prop::option::weighted(0.1, arb_json()),
    )
        .prop_map(|(iss, aud, exp, nbf, sub, roles, act, kind)| {
            let mut claims = Map::new();
            for (name, value) in [
                ("iss", iss),
                ("aud", aud),
                ("exp", exp),
                ("nbf", nbf),
                ("sub", sub),
                ("roles", roles),
                ("act", act),
                ("principal_kind", kind),
            ] {
                if let Some(value) = value {
                    claims.insert(name.into(), value);
                }
            }
            Value::Object(claims)
        })
}

/// `exp` as the JWT library reads it (it must be there): absent, a non-negative number (an
/// integer, or a finite float below 2^64), or unreadable.
fn time_of(claims: &Value, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) if value.is_u64() => Ok(value.as_f64()),
        Some(value) if value.is_f64() => {
            let f = value.as_f64().unwrap();
            if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 {
                Ok(Some(f))
            } else {
                Err(())
            }
        }
        Some(_) => Err(()),
    }
}

/// A string claim that must name `expected`: the string itself, or an array of strings that
/// holds it (`aud` may be an array; the JWT library reads `iss` the same way).
fn names(claims: &Value, claim: &str, expected: &str) -> bool {
    match claims.get(claim) {
        Some(Value::String(text)) => text == expected,
        Some(Value::Array(items)) => {
            items.iter().all(Value::is_string) && items.iter().any(|item| item == expected)
        }
        _ => false,
    }
}

/// Whether the verifier should accept `header` and `claims` signed with `k1`'s secret.
fn should_accept(header: &Value, claims: &Value) -> bool {
    let leeway = 60.0;
    let now = NOW as f64;
    // Two keys verify HS256, so the token must name its key: `k1`, whose secret signed it.
    header["alg"] == "HS256"
        && header.get("kid") == Some(&json!("k1"))
        && names(claims, "iss", "https://idp.test")
        && names(claims, "aud", "concord")
        && matches!(time_of(claims, "exp"), Ok(Some(exp)) if now < exp + leeway)
        // `nbf` is read by the verifier alone: null is absent, any other number a time.
        && match claims.get("nbf") {
            None | Some(Value::Null) => true,
            Some(nbf) => nbf
                .as_f64()
                .is_some_and(|nbf| nbf.is_finite() && nbf >= 0.0 && now + leeway >= nbf),
        }
        && claims
            .get("sub")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
}

/// Text a token might be: segments of base64url, dots, padding and noise.
fn token_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[A-Za-z0-9_-]{0,24}",
        2 => Just(".".to_string()),
        1 => Just("=".to_string()),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| b64(&b)),
        1 => arb_json().prop_map(|v| b64(v.to_string().as_bytes())),
        1 => ".{0,8}",
    ];
    prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config(256))]

    /// Any text as a bearer token: refused.
    #[test]
    fn arbitrary_tokens_are_refused(token in prop_oneof![".{0,64}", token_text()]) {
        prop_assert!(verify(&token).is_err());
    }

    /// Three base64url segments of anything (JSON or not): refused.
    #[test]
    fn arbitrary_segments_are_refused(
        header in prop_oneof![arb_json().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..32)],
        claims in prop_oneof![arb_json().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..32)],
        signature in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let token = format!("{}.{}.{}", b64(&header), b64(&claims), b64(&signature));
        prop_assert!(verify(&token).is_err());
    }

    /// Any header and claims, signed with `k1`'s secret: accepted exactly when algorithm,
    /// key, issuer, audience, times and subject all hold; and then the principal is the
    /// subject.
    #[test]
    fn signed_tokens_are_judged_by_their_claims(header in header(), claims in claims()) {
        let token = signed(&header, &claims, SECRET_1);
        let outcome = verify(&token);
        let expected = should_accept(&header, &claims);
        match &outcome {
            Ok(principal) => {
                prop_assert!(expected, "accepted {header} {claims}");
                prop_assert_eq!(Some(principal.id.as_str()), claims["sub"].as_str());
                prop_assert_eq!(principal.chain.first(), Some(&principal.id));
                prop_assert!(principal.chain.len() <= 18);
                prop_assert!(["user", "agent", "service"].contains(&principal.kind.as_str()));
            }
            Err(error) => {
                prop_assert!(!expected, "refused {header} {claims}: {error}");
                prop_assert!(!error.to_string().is_empty());
            }
        }
        // Signed with the other key's secret, or with its signature altered, it never passes
        // as `k1`.
        if header.get("kid") == Some(&json!("k1")) {
            prop_assert!(verify(&signed(&header, &claims, SECRET_2)).is_err());
        }
        let mut altered = token.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        if altered != token {
            prop_assert!(verify(&altered).is_err(), "{altered}");
        }
    }
}

/// One API key made in a fresh store, and its verifier.
struct KeyFixture {
    _dir: tempfile::TempDir,
    verifier: ApiKeyVerifier,
    token: String,
}

static KEYS: LazyLock<KeyFixture> = LazyLock::new(|| {
    RUNTIME.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = concord_store::Store::open_sqlite(&dir.path().join("state.db"))
            .await
            .unwrap();
        let created = api_keys::create(&store, "svc", &["reader".into()], 1)
            .await
            .unwrap();
        KeyFixture {
            _dir: dir,
            verifier: ApiKeyVerifier::new(store),
            token: created.token,
        }
    })
});

/// Text an API key might be: the prefix, hex, underscores and noise.
fn key_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[0-9a-f]{0,16}",
        2 => Just("_".to_string()),
        2 => Just("ck_".to_string()),
        1 => ".{0,6}",
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config(64))]

    /// Any text as an API key: `looks_like_api_key` is the prefix; verifying it refuses it
    /// (unless it is the key), with a message that never repeats the secret.
    #[test]
    fn api_keys_are_refused_unless_real(text in prop_oneof![key_text(), ".{0,40}"]) {
        let keys = &*KEYS;
        prop_assert_eq!(looks_like_api_key(&text), text.starts_with("ck_"));
        match RUNTIME.block_on(keys.verifier.verify(&text)) {
            Ok(principal) => {
                prop_assert_eq!(&text, &keys.token);
                prop_assert_eq!(principal.id, "svc");
            }
            Err(error) => {
                let message = error.to_string();
                prop_assert!(!message.is_empty());
                if let Some((_, secret)) = text.rsplit_once('_')
                    && secret.len() >= 8
                {
                    prop_assert!(!message.contains(secret), "{message}");
                }
            }
        }
    }

    /// The real key with one character changed, cut short or extended: refused.
    #[test]
    fn altered_api_keys_are_refused(at in any::<prop::sample::Index>(), with in any::<char>(), cut in any::<bool>()) {
        let keys = &*KEYS;
        prop_assert!(RUNTIME.block_on(keys.verifier.verify(&keys.token)).is_ok());
        let mut chars: Vec<char> = keys.token.chars().collect();
        let i = at.index(chars.len());
        if cut {
            chars.truncate(i);
        } else if chars[i] == with {
            chars.push(with);
        } else {
            chars[i] = with;
        }
        let altered: String = chars.into_iter().collect();
        prop_assert!(RUNTIME.block_on(keys.verifier.verify(&altered)).is_err());
    }
}

fn rule(name: &str, effect: Effect, when: &str) -> PolicyRule {
    PolicyRule {
        name: name.into(),
        effect,
        when: when.into(),
    }
}

/// Rules that read the arguments the way operators write them.
static RULES: LazyLock<RuleSet> = LazyLock::new(|| {
    RuleSet::compile(&[
        rule(
            "no-etc",
            Effect::Deny,
            "arguments.path.startsWith(\"/etc\")",
        ),
        rule(
            "small",
            Effect::Deny,
            "has(arguments.n) && arguments.n + 1 > 100",
        ),
        rule("sized", Effect::Deny, "size(arguments.items) > 3"),
        rule("readers", Effect::Allow, "\"reader\" in principal.roles"),
        rule(
            "own-namespace",
            Effect::Allow,
            "namespace == principal.id && name.endsWith(\"/x\")",
        ),
    ])
    .unwrap()
});

/// CEL-ish text: fragments of the language, in any order.
fn cel_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "arguments", "principal", ".", "roles", "id", "name", "has(", "size(", ")", "(", "[",
            "]", "{", "}", "\"", "'", " in ", " && ", " || ", "!", "==", "!=", " + ", " - ", " * ",
            " / ", " % ", "?", ":", "1", "9223372036854775807", "-9223372036854775808",
            "18446744073709551615u", "1.5e308", "true", "null", "b\"", "r'", "\\", ",",
            ".startsWith(", ".matches(", "int(", "uint(", "double(", "timestamp(", "duration(",
        ])
        .prop_map(str::to_string),
        1 => ".{0,4}",
    ];
    // Few pieces: the CEL parser recurses per nesting level and overflows a 2 MiB thread's
    // stack at about 20 nested parentheses in a debug build (a few hundred in release). A stack
    // overflow aborts the process (`catch_unwind` cannot stop it), so deeper text would abort
    // this test binary, as a policy rule that deep aborts the node today.
    prop::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config(256))]

    /// A rule's `when` of any text: compiled or refused with the rule's name, never a panic
    /// out of `compile`.
    #[test]
    fn rule_expressions_compile_or_are_refused(when in prop_oneof![cel_text(), ".{0,24}"]) {
        match RuleSet::compile(&[rule("r", Effect::Allow, &when)]) {
            Ok(set) => prop_assert_eq!(set.len(), 1),
            Err(error) => prop_assert!(error.to_string().contains("\"r\""), "{error}"),
        }
    }

    /// Any arguments (a caller's tool-call arguments) against rules that read them: a
    /// decision, never a panic; a deny rule that fails to evaluate denies.
    #[test]
    fn any_arguments_get_a_decision(
        arguments in prop::collection::btree_map(
            prop::sample::select(vec!["path", "n", "items", "other"]).prop_map(str::to_string),
            arb_json(),
            0..4,
        ),
        roles in prop::collection::vec(prop::sample::select(vec!["reader", "writer", ""]).prop_map(str::to_string), 0..3),
        name in ".{0,12}",
        namespace in prop::option::of(".{0,6}"),
    ) {
        let arguments: Map<String, Value> = arguments.into_iter().collect();
        let principal = crate::identity::Principal {
            id: "p".into(),
            kind: "user".into(),
            roles,
            chain: vec!["p".into()],
            method: "jwt".into(),
        };
        let action = Action {
            method: "tools/call",
            server: "s",
            name: &name,
            arguments: Some(&arguments),
            namespace: namespace.as_deref(),
            operations: &[],
        };
        let decision = RULES.decide(&principal, &action);
        if decision.allowed() {
            prop_assert!(matches!(decision.rule(), "readers" | "own-namespace"));
        }
    }
}
