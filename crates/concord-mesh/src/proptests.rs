//! Property tests of what the mesh parses from outside: registrations (as JSON, as the registry
//! API and the config receive them), selectors and their version requirements, endpoint URLs
//! and networks. Whatever comes in: a value or an error naming the field, never a panic.

use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;
use crate::net::{HttpUrl, Network, public_url};

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Words that are often valid (and sometimes repeat, or are empty or odd).
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["search", "kv", "mcp", "gpu", "prod", "eu", "a.b", "x:y/z"])
            .prop_map(str::to_string),
        2 => "[a-z0-9_.:/-]{0,12}",
        1 => ".{0,8}",
        1 => "[+-][a-z]{1,4}",
        1 => Just("w".repeat(129)),
    ]
}

fn version_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}-[a-z0-9.]{1,6}(\\+[a-z0-9]{1,4})?",
        "[0-9]{20,40}\\.[0-9]{1,40}\\.[0-9]{1,3}",
        ".{0,16}",
    ]
}

fn requirement_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\\^~=<>]{0,2}[0-9]{1,3}(\\.[0-9]{1,3}){0,2}",
        "[<>]=?[0-9]{1,2}, ?[<>]=?[0-9]{1,2}",
        "[0-9]{20,40}\\.\\*",
        "[*x.0-9,<>=^~ -]{0,16}",
        ".{0,16}",
    ]
}

fn url_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "https?://[a-z0-9.-]{1,12}(:[0-9]{1,6})?(/[a-z0-9/]{0,8})?(\\?[a-z=&]{0,8})?(#[a-z]{0,4})?",
        "https?://([a-z]{1,4}(:[a-z]{1,4})?@)?\\[[0-9a-f:]{2,12}\\](:[0-9]{1,5})?/?",
        "https?://[0-9.]{1,15}(:[0-9]{0,5})?",
        "[a-z]{0,6}://.{0,20}",
        ".{0,24}",
    ]
}

/// A selector as JSON: mostly plausible, sometimes not.
fn selector_json() -> impl Strategy<Value = Value> {
    (
        word(),
        prop::collection::vec(word(), 0..4),
        prop::option::of(requirement_text()),
        prop::option::of(word()),
    )
        .prop_map(|(capability, tags, version, namespace)| {
            let mut selector = json!({"capability": capability, "tags": tags});
            if let Some(version) = version {
                selector["version"] = json!(version);
            }
            if let Some(namespace) = namespace {
                selector["namespace"] = json!(namespace);
            }
            selector
        })
}

/// A valid value for a registration field.
fn valid_value(key: &'static str) -> BoxedStrategy<Value> {
    match key {
        "name" => "[a-z][a-z0-9-]{0,10}".prop_map(Value::from).boxed(),
        "version" => {
            "(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})(-[a-z][a-z0-9]{0,3})?"
                .prop_map(Value::from)
                .boxed()
        }
        "kind" => prop::sample::select(vec!["server", "agent", "llm"])
            .prop_map(Value::from)
            .boxed(),
        // Small sets of common words, so the same one often comes twice.
        "capabilities" => prop::collection::vec(
            prop::sample::select(vec!["search", "kv", "mcp", "a.b"]),
            1..4,
        )
        .prop_map(|words| json!(words))
        .boxed(),
        "tags" => prop::collection::vec(prop::sample::select(vec!["gpu", "prod", "eu"]), 0..4)
            .prop_map(|words| json!(words))
            .boxed(),
        "endpoint" => prop_oneof![
            "https?://[a-z]{1,8}(\\.[a-z]{2,3})?(:[1-9][0-9]{0,3})?(/[a-z]{0,6})?"
                .prop_map(|url| json!({"url": url})),
            prop::collection::vec("[a-z/]{1,10}", 1..4)
                .prop_map(|command| json!({"command": command})),
        ]
        .boxed(),
        "namespace" => prop::sample::select(vec!["default", "team-a", "x.y"])
            .prop_map(Value::from)
            .boxed(),
        "ttl_seconds" => (1u64..=86_400).prop_map(Value::from).boxed(),
        "metadata" => prop::collection::btree_map("[a-z]{1,6}", arb_json(), 0..4)
            .prop_map(|m| json!(m))
            .boxed(),
        "dependencies" => prop::collection::btree_map(
            "[a-z]{1,6}",
            ("[a-z]{1,6}", prop::option::of(requirement_text())).prop_map(
                |(capability, version)| json!({"capability": capability, "version": version}),
            ),
            0..3,
        )
        .prop_map(|m| json!(m))
        .boxed(),
        _ => arb_json().boxed(),
    }
}

/// A value of about the right shape for a registration field that is often invalid.
fn odd_value(key: &'static str) -> BoxedStrategy<Value> {
    match key {
        "name" => prop_oneof![
            Just(json!("concord")),
            Just(json!("a__b")),
            Just(json!("_a")),
            ".{0,70}".prop_map(Value::from),
        ]
        .boxed(),
        "version" => version_text().prop_map(Value::from).boxed(),
        "kind" => prop::sample::select(vec!["tool", "", "Server"])
            .prop_map(Value::from)
            .boxed(),
        "capabilities" | "tags" => prop::collection::vec(word(), 0..70)
            .prop_map(|words| json!(words))
            .boxed(),
        "endpoint" => prop_oneof![
            url_text().prop_map(|url| json!({"url": url})),
            prop::collection::vec(".{0,10}", 0..4).prop_map(|command| json!({"command": command})),
            (url_text(), prop::collection::vec(".{0,10}", 1..3))
                .prop_map(|(url, command)| json!({"url": url, "command": command})),
            Just(json!({"command": vec!["c"; 65]})),
            Just(json!({"command": ["c".repeat(4097)]})),
            Just(json!({})),
        ]
        .boxed(),
        "namespace" => word().prop_map(Value::from).boxed(),
        "ttl_seconds" => prop_oneof![
            Just(json!(0)),
            Just(json!(86_401)),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
        ]
        .boxed(),
        "metadata" => Just(json!({"big": "m".repeat(MAX_METADATA_BYTES)})).boxed(),
        "dependencies" => prop::collection::btree_map(word(), selector_json(), 0..3)
            .prop_map(|m| json!(m))
            .boxed(),
        _ => arb_json().boxed(),
    }
}

/// A value for a registration field: mostly valid, sometimes odd, now and then any JSON.
fn field_value(key: &'static str) -> BoxedStrategy<Value> {
    prop_oneof![
        30 => valid_value(key),
        2 => odd_value(key),
        1 => arb_json(),
    ]
    .boxed()
}

const KEYS: [&str; 11] = [
    "name",
    "version",
    "kind",
    "capabilities",
    "tags",
    "endpoint",
    "namespace",
    "ttl_seconds",
    "metadata",
    "dependencies",
    "unknown_key",
];

/// A registration as JSON: the required keys mostly there, the others sometimes, each with a
/// value that is usually of the right shape.
fn registration_json() -> impl Strategy<Value = Value> {
    let fields: Vec<BoxedStrategy<Option<Value>>> = KEYS
        .iter()
        .map(|&key| {
            let weight_present = if matches!(key, "unknown_key") { 1 } else { 30 };
            prop_oneof![
                weight_present => field_value(key).prop_map(Some),
                1 => Just(None),
            ]
            .boxed()
        })
        .collect();
    fields.prop_map(|values| {
        let mut object = Map::new();
        for (key, value) in KEYS.iter().zip(values) {
            if let Some(value) = value {
                object.insert((*key).to_string(), value);
            }
        }
        Value::Object(object)
    })
}

/// The fields a validation error may name.
fn known_field(field: &str) -> bool {
    matches!(
        field,
        "name"
            | "version"
            | "capabilities"
            | "tags"
            | "namespace"
            | "endpoint"
            | "endpoint.url"
            | "endpoint.command"
            | "ttl_seconds"
            | "metadata"
    ) || field.starts_with("dependencies")
}

/// Parses and validates like the registry does; panics (fails the property) only when an
/// error names no known field.
fn check_registration(value: Value) -> Result<Option<(Registration, Version)>, TestCaseError> {
    let Ok(registration) = serde_json::from_value::<Registration>(value) else {
        return Ok(None);
    };
    match registration.validate() {
        Ok(version) => Ok(Some((registration, version))),
        Err(error) => {
            prop_assert!(known_field(error.field()), "unknown field in {error:?}");
            prop_assert!(error.to_string().starts_with(error.field()), "{error}");
            Ok(None)
        }
    }
}

fn entity_of(registration: Registration, id: &str, now: u64) -> Entity {
    Entity {
        id: id.into(),
        registration,
        health: Health::Healthy,
        registered_at_ms: now,
        last_heartbeat_ms: now,
    }
}

/// 256 cases a property (`PROPTEST_CASES` overrides, for a longer local run), and no
/// regression files written into the source tree: a failure prints its minimal input.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any JSON: refused by serde or by validation (naming a field), or accepted.
    #[test]
    fn arbitrary_json_never_panics(value in arb_json()) {
        check_registration(value)?;
    }

    /// Registration-shaped JSON: same, and what validates resolves without panicking and is
    /// found by each of its capabilities.
    #[test]
    fn registrations_validate_or_name_the_field(value in registration_json(), now in 0u64..(1 << 53)) {
        if let Some((registration, version)) = check_registration(value)? {
            prop_assert_eq!(version.to_string().is_empty(), false);
            // What the registry stores reads back the same.
            let stored = serde_json::to_value(&registration).unwrap();
            let read: Registration = serde_json::from_value(stored).unwrap();
            prop_assert_eq!(&read, &registration);
            let namespace = registration.namespace.clone();
            let capabilities = registration.capabilities.clone();
            let catalog = Catalog::new(vec![entity_of(registration, "e@1", now)]);
            for capability in capabilities {
                let selector = Selector {
                    capability: capability.clone(),
                    namespace: Some(namespace.clone()),
                    ..Selector::default()
                };
                let resolution = catalog.resolve(&selector, now).unwrap();
                prop_assert_eq!(resolution.candidates.len(), 1, "{:?}", resolution);
            }
        }
    }

    /// Selectors (the resolve query's `capability`, `tags`, `version`, `namespace`): a
    /// resolution or an error about `version`.
    #[test]
    fn selectors_resolve_or_refuse_the_version(
        selector in selector_json(),
        registrations in prop::collection::vec(registration_json(), 0..4),
        now in 0u64..(1 << 53),
    ) {
        let selector: Selector = serde_json::from_value(selector).unwrap();
        let entities: Vec<Entity> = registrations
            .into_iter()
            .enumerate()
            .filter_map(|(i, value)| {
                let registration: Registration = serde_json::from_value(value).ok()?;
                registration.validate().ok()?;
                Some(entity_of(registration, &format!("e@{i}"), now.saturating_sub(i as u64 * 20_000)))
            })
            .collect();
        match resolve(&selector, &entities, now) {
            Ok(resolution) => {
                prop_assert!(resolution.candidates.len() + resolution.rejected.len() <= entities.len());
            }
            Err(error) => {
                prop_assert_eq!(error.field(), "version");
                prop_assert!(selector.version.is_some());
            }
        }
    }

    /// Version requirements alone: parsed or refused, never a panic.
    #[test]
    fn version_requirements_never_panic(text in requirement_text()) {
        let selector = Selector { capability: "x".into(), version: Some(text), ..Selector::default() };
        if let Err(error) = selector.parse() {
            prop_assert_eq!(error.field(), "version");
        }
    }

    /// Endpoint URLs: refused with a reason, or parsed into a URL that prints and reparses to
    /// itself, whose public form has no user information or query.
    #[test]
    fn urls_parse_or_refuse(text in url_text()) {
        if let Ok(url) = HttpUrl::parse(&text) {
            let printed = url.to_string();
            prop_assert_eq!(HttpUrl::parse(&printed), Ok(url.clone()), "{}", printed);
            let public = HttpUrl::parse(&url.public()).unwrap();
            prop_assert_eq!(public.userinfo, None);
            prop_assert_eq!(public.query, None);
        }
        let public = public_url(&text);
        prop_assert!(!public.contains(['?', '#']), "{public}");
    }

    /// Networks (`[node] registry_private_networks`): refused, or a network that contains its
    /// own address and prints and reparses to itself.
    #[test]
    fn networks_parse_or_refuse(
        text in prop_oneof![
            "[0-9.]{1,15}(/[0-9]{1,3})?",
            "[0-9a-f:]{2,20}(/[0-9]{1,3})?",
            ".{0,20}",
        ],
        ip in any::<IpAddr>(),
    ) {
        if let Ok(network) = text.parse::<Network>() {
            let printed = network.to_string();
            prop_assert_eq!(printed.parse::<Network>(), Ok(network));
            let address: IpAddr = printed.split('/').next().unwrap().parse().unwrap();
            prop_assert!(network.contains(address));
            let _ = network.contains(ip);
        }
    }
}

/// Found by `registrations_validate_or_name_the_field`: a registration listing a capability
/// twice passed validation, and the catalog then indexed the entity twice under it, so
/// resolving that capability counted more offers than entities (`in_namespace -
/// offering.len()` overflowed: a panic in debug builds, a count near 2^64 in release) and
/// listed the entity twice. Validation now refuses the duplicate.
#[test]
fn a_capability_listed_twice_resolves_once() {
    let registration: Registration = serde_json::from_value(json!({
        "name": "a", "version": "0.0.0", "kind": "server",
        "capabilities": ["search", "search"], "endpoint": {"url": "http://a"},
    }))
    .unwrap();
    if let Err(error) = registration.validate() {
        assert_eq!(error.field(), "capabilities", "{error}");
        return;
    }
    let catalog = Catalog::new(vec![entity_of(registration, "a@1", 0)]);
    let selector = Selector {
        capability: "search".into(),
        ..Selector::default()
    };
    let resolution = catalog.resolve(&selector, 0).unwrap();
    assert_eq!(resolution.candidates.len(), 1);
    assert!(resolution.not_considered.is_empty(), "{resolution:?}");
}
