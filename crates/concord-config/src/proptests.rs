//! Property tests of the configuration parser: any text, and any table built from the keys the
//! parser knows with values of any type, gives a `Config` or a `ConfigError` whose message
//! starts with the file's path, never a panic. Also the duration parser every `timeout`-like
//! key goes through.

use std::path::Path;

use proptest::prelude::*;

use super::*;

/// `cases` cases a property (`PROPTEST_CASES` overrides, for a longer local run), and no
/// regression files written into the source tree: a failure prints its minimal input.
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

/// A directory that does not exist, so a file the config names (policy file, public key file)
/// is never read.
const TOML_PATH: &str = "/nonexistent-concord-proptest/concord.toml";
const JSON_PATH: &str = "/nonexistent-concord-proptest/.mcp.json";

fn lookup(name: &str) -> Option<String> {
    match name {
        "TOKEN" => Some("t0ken".into()),
        "SECRET" => Some("a-secret-of-at-least-32-bytes-for-hs256".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

/// Parses `text` as read from `path`; an error must name the file first, and an error about
/// content must name a key and say something.
fn check(text: &str, path: &str) -> Result<(), TestCaseError> {
    match Config::from_str_at(text, Path::new(path), &lookup) {
        Ok(config) => {
            prop_assert_eq!(config.source.as_deref(), Some(Path::new(path)));
        }
        Err(error) => {
            let message = error.to_string();
            prop_assert!(
                message.starts_with(&format!("{path}: ")),
                "does not start with the file: {message}"
            );
            if let ConfigError::Invalid { key, message, .. } = &error {
                prop_assert!(!key.is_empty(), "names no key: {error}");
                prop_assert!(!message.is_empty(), "says nothing: {error}");
            }
        }
    }
    Ok(())
}

/// Durations as people write them, and as they should not.
fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,4}(ms|s|m|h)?",
        "[0-9]{0,3}\\.[0-9]{0,3}(ms|s|m|h)?",
        " ?[0-9]{15,400}(ms|s|m|h)? ?",
        "[0-9]{1,3}(\\.[0-9]{1,3})? ?(d|w|sec|MS|e9|e400|µs)",
        "-?[0-9]{1,3}(s|m)?",
        prop::sample::select(vec![
            "",
            ".",
            "0",
            "0s",
            "0.0000000001ms",
            "inf",
            "NaN",
            "1e3"
        ])
        .prop_map(str::to_string),
        ".{0,12}",
    ]
}

/// Strings with `${VAR}` expansions, finished or not.
fn string_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.-]{0,12}",
        prop::sample::select(vec![
            "${TOKEN}",
            "${MISSING}",
            "${",
            "${}",
            "$${TOKEN}",
            "${EMPTY}x",
            "${SECRET}",
            "$",
            "a${TOKEN",
            "${TO KEN}",
        ])
        .prop_map(str::to_string),
        ".{0,16}",
    ]
}

fn url_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "https?://[a-z0-9.]{1,10}(:[0-9]{1,6})?(/[a-z]{0,6})?",
        "https?://\\[[0-9a-f:]{2,10}\\](:[0-9]{1,5})?",
        "[a-z]{0,5}:/?/?.{0,12}",
    ]
}

/// What a key holds, for choosing values that get past the type check most of the time.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Duration,
    Text,
    Url,
    Listen,
    Int,
    Float,
    Bool,
    Texts,
    /// A path the parser might read: only values that cannot exist.
    File,
    /// One of a few words.
    Word(&'static [&'static str]),
}

fn any_toml() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        ".{0,10}".prop_map(toml::Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A value of `shape` that is valid for most keys of that shape.
fn valid(shape: Shape) -> BoxedStrategy<toml::Value> {
    use toml::Value as V;
    match shape {
        Shape::Duration => "[1-9][0-9]{0,3}(ms|s|m|h)".prop_map(V::String).boxed(),
        Shape::Text => prop_oneof![
            4 => "[a-z][a-z0-9_.-]{0,11}",
            1 => Just("${TOKEN}".to_string()),
            1 => Just("${SECRET}".to_string()),
        ]
        .prop_map(V::String)
        .boxed(),
        Shape::Url => "https?://[a-z]{1,10}(:[1-9][0-9]{0,3})?(/[a-z]{0,6})?"
            .prop_map(V::String)
            .boxed(),
        Shape::Listen => "127\\.0\\.0\\.1:[1-9][0-9]{0,3}"
            .prop_map(V::String)
            .boxed(),
        Shape::Int => (1i64..100).prop_map(V::Integer).boxed(),
        Shape::Float => (0.01f64..1.0).prop_map(V::Float).boxed(),
        Shape::Bool => any::<bool>().prop_map(V::Boolean).boxed(),
        Shape::Texts => prop::collection::vec("[a-z][a-z0-9]{0,7}".prop_map(V::String), 0..3)
            .prop_map(V::Array)
            .boxed(),
        Shape::File => shaped(Shape::File),
        Shape::Word(words) => prop::sample::select(words.to_vec())
            .prop_map(|s| V::String(s.to_string()))
            .boxed(),
    }
}

/// A value of `shape` meant to probe its edges (huge, negative, NaN, odd text).
fn shaped(shape: Shape) -> BoxedStrategy<toml::Value> {
    use toml::Value as V;
    match shape {
        Shape::Duration => duration_text().prop_map(V::String).boxed(),
        Shape::Text => string_text().prop_map(V::String).boxed(),
        Shape::Url => url_text().prop_map(V::String).boxed(),
        Shape::Listen => prop_oneof![
            "(127\\.0\\.0\\.1|0\\.0\\.0\\.0|\\[::1\\]|localhost):[0-9]{1,6}",
            ".{0,12}",
        ]
        .prop_map(V::String)
        .boxed(),
        Shape::Int => prop_oneof![
            (0i64..100).prop_map(V::Integer),
            any::<i64>().prop_map(V::Integer),
            Just(V::Integer(i64::MAX)),
        ]
        .boxed(),
        Shape::Float => prop_oneof![
            (0.0f64..10.0).prop_map(V::Float),
            any::<f64>().prop_map(V::Float),
            prop::sample::select(vec![f64::NAN, f64::INFINITY, -1.0, 0.0, f64::MAX, 1e-300])
                .prop_map(V::Float),
        ]
        .boxed(),
        Shape::Bool => any::<bool>().prop_map(V::Boolean).boxed(),
        Shape::Texts => prop::collection::vec(string_text().prop_map(V::String), 0..4)
            .prop_map(V::Array)
            .boxed(),
        Shape::File => prop::sample::select(vec!["missing.pem", "", "sub/missing.toml", "."])
            .prop_map(|s| V::String(s.to_string()))
            .boxed(),
        Shape::Word(words) => prop_oneof![
            4 => prop::sample::select(words.to_vec()).prop_map(|s| V::String(s.to_string())),
            1 => ".{0,8}".prop_map(V::String),
        ]
        .boxed(),
    }
}

/// A table of `keys`, each present or not, with a value of its shape or (less often) any
/// TOML value; `extra` adds a key no table knows.
fn table_of(keys: &'static [(&'static str, Shape)]) -> BoxedStrategy<toml::Table> {
    let fields: Vec<BoxedStrategy<Option<toml::Value>>> = keys
        .iter()
        .map(|&(_, shape)| {
            prop_oneof![
                12 => Just(None),
                12 => valid(shape).prop_map(Some),
                2 => shaped(shape).prop_map(Some),
                1 => any_toml().prop_map(Some),
            ]
            .boxed()
        })
        .collect();
    (fields, prop::option::weighted(0.02, any_toml()))
        .prop_map(move |(values, extra)| {
            let mut table = toml::Table::new();
            for ((key, _), value) in keys.iter().zip(values) {
                if let Some(value) = value {
                    table.insert((*key).to_string(), value);
                }
            }
            if let Some(extra) = extra {
                table.insert("no_such_key".into(), extra);
            }
            table
        })
        .boxed()
}

/// `[section.NAME]` tables: a few names, valid and not, each a table of `keys`.
fn named(keys: &'static [(&'static str, Shape)]) -> BoxedStrategy<toml::Value> {
    prop::collection::btree_map(
        prop_oneof![
            12 => "[a-z][a-z0-9]{0,6}",
            1 => prop::sample::select(vec!["concord", "a__b", "_x", "", "Big Name", "a-"]).prop_map(str::to_string),
        ],
        table_of(keys).prop_map(toml::Value::Table),
        0..3,
    )
    .prop_map(|m| toml::Value::Table(m.into_iter().collect()))
    .boxed()
}

use Shape::*;

const NODE: &[(&str, Shape)] = &[
    ("listen", Listen),
    ("data_dir", File),
    ("allowed_hosts", Texts),
    ("allowed_origins", Texts),
    ("max_body_bytes", Int),
    ("request_timeout", Duration),
    ("health_interval", Duration),
    ("page_size", Int),
    ("registry_private_networks", Texts),
    ("registry_max_per_principal", Int),
    ("max_sessions", Int),
    ("session_idle_timeout", Duration),
    ("max_connections", Int),
    ("header_read_timeout", Duration),
];
const STATE: &[(&str, Shape)] = &[
    ("store", Text),
    ("max_value_bytes", Int),
    ("proposal_ttl", Duration),
    ("keep_versions", Int),
];
const NAMESPACE: &[(&str, Shape)] = &[
    (
        "policy",
        Word(&["last_write_wins", "merge", "reject", "propose"]),
    ),
    ("schema", Text),
    ("validator", Text),
];
const AUTH: &[(&str, Shape)] = &[
    ("enabled", Bool),
    ("issuer", Text),
    ("audience", Text),
    ("jwks_url", Url),
    ("leeway", Duration),
    ("principal_claim", Text),
    ("roles_claim", Text),
    ("authorization_servers", Texts),
    ("resource", Url),
];
const KEY: &[(&str, Shape)] = &[
    ("kid", Text),
    (
        "algorithm",
        Word(&["HS256", "RS256", "ES256", "EdDSA", "none"]),
    ),
    ("secret", Text),
    ("public_key", Text),
    ("public_key_file", File),
];
const RULE: &[(&str, Shape)] = &[
    ("name", Text),
    ("effect", Word(&["allow", "deny"])),
    ("when", Text),
];
const RATE: &[(&str, Shape)] = &[("per_second", Float), ("burst", Int)];
const AUDIT: &[(&str, Shape)] = &[("record_arguments", Bool), ("redact", Texts)];
const BUDGET: &[(&str, Shape)] = &[
    ("tool_calls", Int),
    ("tokens", Int),
    ("cost_usd", Float),
    ("window", Duration),
    ("deadline", Duration),
];
const BUDGETS: &[(&str, Shape)] = &[("warn_at", Float), ("max_depth", Int)];
const ROUTING: &[(&str, Shape)] = &[
    ("breaker_failures", Int),
    ("breaker_failure_ratio", Float),
    ("breaker_window", Int),
    ("breaker_cooldown", Duration),
    ("retry_attempts", Int),
    ("retry_backoff", Duration),
    ("cache_entries", Int),
    ("max_result_tokens", Int),
];
const PROVIDER: &[(&str, Shape)] = &[
    ("api", Word(&["openai", "anthropic", "gemini"])),
    ("base_url", Url),
    ("model", Text),
    ("api_key_env", Text),
    ("tags", Texts),
    ("version", Word(&["1.0.0", "0.1.2-beta", "1.0"])),
    ("price_input", Float),
    ("price_output", Float),
    ("timeout", Duration),
    ("stream", Bool),
    ("max_tokens", Int),
    ("temperature", Float),
];
const AGENT: &[(&str, Shape)] = &[
    ("description", Text),
    ("instructions", Text),
    ("tools", Texts),
    ("max_iterations", Int),
    ("max_tool_calls_per_turn", Int),
    ("max_parallel_tool_calls", Int),
    ("output_schema", Word(&["{\"type\":\"object\"}", "{", "[]"])),
    ("cost_aware", Bool),
];
const AGENT_BUDGET: &[(&str, Shape)] = &[
    ("tokens", Int),
    ("cost_usd", Float),
    ("tool_calls", Int),
    ("deadline", Duration),
];
const WORKFLOW: &[(&str, Shape)] = &[
    (
        "kind",
        Word(&["router", "parallel", "orchestrator", "evaluator"]),
    ),
    ("description", Text),
    ("agents", Texts),
    ("router_agent", Text),
    ("fallback", Text),
    ("combine", Text),
    ("generator", Text),
    ("evaluator", Text),
    ("max_rounds", Int),
];
const REGISTRATION: &[(&str, Shape)] = &[
    ("version", Word(&["1.0.0", "0.2.0-rc.1", "one", "01.0.0"])),
    ("kind", Word(&["server", "agent", "llm"])),
    ("capabilities", Texts),
    ("tags", Texts),
    ("namespace", Text),
    ("ttl_seconds", Int),
];
const SERVER: &[(&str, Shape)] = &[
    ("command", Text),
    ("args", Texts),
    ("cwd", File),
    ("url", Url),
    (
        "transport",
        Word(&["stdio", "streamable-http", "sse", "http"]),
    ),
    ("prefix", Word(&["always", "conditional", "never"])),
    ("timeout", Duration),
    ("enabled", Bool),
    ("forward_roots", Bool),
    ("cache_ttl", Duration),
    ("capabilities", Texts),
    ("tags", Texts),
];
const TOOL: &[(&str, Shape)] = &[("cache_ttl", Duration), ("retryable", Bool)];

/// Adds `value` under `key` when there is one.
fn with(mut table: toml::Table, key: &str, value: Option<toml::Value>) -> toml::Table {
    if let Some(value) = value {
        table.insert(key.to_string(), value);
    }
    table
}

fn some<T: Strategy<Value = toml::Value> + 'static>(s: T) -> BoxedStrategy<Option<toml::Value>> {
    prop::option::weighted(0.3, s).boxed()
}

/// A whole `concord.toml` as a table: every section, each present or not.
fn config_table() -> impl Strategy<Value = toml::Table> {
    let node = table_of(NODE).prop_map(toml::Value::Table);
    let state = (table_of(STATE), some(named(NAMESPACE)))
        .prop_map(|(t, namespaces)| toml::Value::Table(with(t, "namespaces", namespaces)));
    let auth = (
        table_of(AUTH),
        some(
            prop::collection::vec(table_of(KEY).prop_map(toml::Value::Table), 0..3)
                .prop_map(toml::Value::Array),
        ),
    )
        .prop_map(|(t, keys)| toml::Value::Table(with(t, "keys", keys)));
    let policy = (
        some(shaped(File)),
        some(
            prop::collection::vec(table_of(RULE).prop_map(toml::Value::Table), 0..3)
                .prop_map(toml::Value::Array),
        ),
    )
        .prop_map(|(file, rules)| {
            toml::Value::Table(with(with(toml::Table::new(), "file", file), "rules", rules))
        });
    let limits = (
        some(table_of(RATE).prop_map(toml::Value::Table)),
        some(named(RATE)),
    )
        .prop_map(|(per_principal, tools)| {
            toml::Value::Table(with(
                with(toml::Table::new(), "per_principal", per_principal),
                "tools",
                tools,
            ))
        });
    let audit = table_of(AUDIT).prop_map(toml::Value::Table);
    let budgets = (
        table_of(BUDGETS),
        some(table_of(BUDGET).prop_map(toml::Value::Table)),
        some(named(BUDGET)),
    )
        .prop_map(|(t, default, roles)| {
            toml::Value::Table(with(with(t, "default", default), "roles", roles))
        });
    let routing = table_of(ROUTING).prop_map(toml::Value::Table);
    let providers = named(PROVIDER);
    let agents = (named(AGENT), table_of(AGENT_BUDGET)).prop_map(|(agents, budget)| {
        let toml::Value::Table(mut agents) = agents else {
            unreachable!()
        };
        for (_, agent) in agents.iter_mut() {
            if let toml::Value::Table(agent) = agent
                && !budget.is_empty()
            {
                agent.insert("budget".into(), toml::Value::Table(budget.clone()));
            }
        }
        toml::Value::Table(agents)
    });
    let workflows = named(WORKFLOW);
    let registry = (named(REGISTRATION), url_text()).prop_map(|(registry, url)| {
        let toml::Value::Table(mut registry) = registry else {
            unreachable!()
        };
        for (_, entry) in registry.iter_mut() {
            if let toml::Value::Table(entry) = entry {
                let mut endpoint = toml::Table::new();
                endpoint.insert("url".into(), toml::Value::String(url.clone()));
                entry.insert("endpoint".into(), toml::Value::Table(endpoint));
            }
        }
        toml::Value::Table(registry)
    });
    let servers =
        (named(SERVER), some(named(TOOL)), some(any_toml())).prop_map(|(servers, tools, env)| {
            let toml::Value::Table(mut servers) = servers else {
                unreachable!()
            };
            for (_, server) in servers.iter_mut() {
                if let toml::Value::Table(server) = server {
                    if let Some(tools) = &tools {
                        server.insert("tools".into(), tools.clone());
                    }
                    if let Some(env) = &env {
                        server.insert("env".into(), env.clone());
                    }
                }
            }
            toml::Value::Table(servers)
        });
    let sections: Vec<(&'static str, BoxedStrategy<Option<toml::Value>>)> = vec![
        ("node", some(node)),
        ("state", some(state)),
        ("auth", some(auth)),
        ("policy", some(policy)),
        ("limits", some(limits)),
        ("audit", some(audit)),
        ("budgets", some(budgets)),
        ("routing", some(routing)),
        ("providers", some(providers)),
        ("agents", some(agents)),
        ("workflows", some(workflows)),
        ("registry", some(registry)),
        ("servers", some(servers)),
    ];
    let (names, strategies): (Vec<_>, Vec<_>) = sections.into_iter().unzip();
    strategies.prop_map(move |values| {
        let mut table = toml::Table::new();
        for (name, value) in names.iter().zip(values) {
            if let Some(value) = value {
                table.insert((*name).to_string(), value);
            }
        }
        table
    })
}

/// Text that is TOML-ish: fragments of the real syntax, in any order.
fn tomlish_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "[node]", "[servers.a]", "[[auth.keys]]", "[registry.s]", "[agents.x]", "[state.namespaces.n]",
            "[[policy.rules]]", "[limits.per_principal]", "[budgets.default]", "[workflows.w]",
            "listen = ", "timeout = ", "command = ", "url = ", "version = ", "kind = ", "per_second = ",
            "\"", "'", "\"\"\"", "=", "\n", "\n", "[", "]", "{", "}", ",", ".", "#",
            "\"30s\"", "\"99999999999999999999999s\"", "\"${TOKEN}\"", "\"${\"", "1e999", "-0", "nan",
            "inf", "true", "0x7fffffffffffffff", "9223372036854775808", "1979-05-27T07:32:00Z",
        ])
        .prop_map(str::to_string),
        2 => "[a-z_]{1,8}",
        1 => ".{0,6}",
    ];
    prop::collection::vec(piece, 0..30).prop_map(|pieces| pieces.concat())
}

/// Text that is JSON-ish, for the `mcpServers` format.
fn jsonish_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "{", "}", "[", "]", ":", ",", "\"mcpServers\"", "\"servers\"", "\"a\"", "\"command\"",
            "\"args\"", "\"url\"", "\"type\"", "\"env\"", "\"timeout\"", "\"disabled\"", "\"x\"",
            "1e999", "-1", "18446744073709551616", "true", "null", "\"${TOKEN}\"", "\"\\ud800\"",
        ])
        .prop_map(str::to_string),
        1 => ".{0,6}",
    ];
    prop::collection::vec(piece, 0..30).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(config(256))]

    /// Any text at all, read as TOML and as JSON.
    #[test]
    fn arbitrary_text_gives_config_or_error(text in ".{0,64}") {
        check(&text, TOML_PATH)?;
        check(&text, JSON_PATH)?;
    }

    /// Text made of TOML's syntax and the config's own keys.
    #[test]
    fn tomlish_text_gives_config_or_error(text in tomlish_text()) {
        check(&text, TOML_PATH)?;
    }

    /// Text made of JSON's syntax and the `mcpServers` keys.
    #[test]
    fn jsonish_text_gives_config_or_error(text in jsonish_text()) {
        check(&text, JSON_PATH)?;
    }

    /// `mcpServers` entries with keys from the known set and values of any type.
    #[test]
    fn mcp_servers_json_gives_config_or_error(
        servers in prop::collection::btree_map(
            prop_oneof!["[a-z][a-z0-9-]{0,6}", ".{0,6}"],
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "command", "args", "env", "cwd", "url", "headers", "type", "transport",
                    "transportType", "disabled", "timeout", "autoApprove", "description", "other",
                ]),
                prop_oneof![
                    "[a-z:/.]{0,12}".prop_map(serde_json::Value::from),
                    prop::sample::select(vec!["stdio", "http", "sse", "streamable-http", "streamableHttp"]).prop_map(serde_json::Value::from),
                    any::<u64>().prop_map(serde_json::Value::from),
                    any::<i64>().prop_map(serde_json::Value::from),
                    any::<bool>().prop_map(serde_json::Value::from),
                    prop::collection::vec("[a-z${}]{0,6}", 0..3).prop_map(serde_json::Value::from),
                    prop::collection::btree_map("[A-Z_]{1,4}", "[a-z${}A-Z]{0,8}", 0..3).prop_map(|m| serde_json::json!(m)),
                ],
                0..5,
            ),
            0..4,
        ),
        key in prop::sample::select(vec!["mcpServers", "servers", "other"]),
    ) {
        let text = serde_json::json!({ key: servers }).to_string();
        check(&text, JSON_PATH)?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// A `concord.toml` built from the known sections and keys with values of any type.
    #[test]
    fn structured_tables_give_config_or_error(table in config_table()) {
        let text = toml::to_string(&table).unwrap();
        check(&text, TOML_PATH)?;
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Durations: a positive `Duration` or an error, never a panic, however large the number.
    #[test]
    fn durations_parse_or_refuse(text in duration_text()) {
        match parse_duration(&text) {
            Ok(duration) => prop_assert!(!duration.is_zero() || text.contains('.') || text.contains("ms")),
            Err(message) => prop_assert!(!message.is_empty()),
        }
    }
}

/// Found by `durations_parse_or_refuse`: a number of seconds past what a `Duration` holds
/// (`"310000000000000000m"`, any `timeout = "…"` in a config) panicked in
/// `Duration::from_secs_f64`; it is an error now.
#[test]
fn huge_durations_are_refused() {
    for text in [
        "310000000000000000m",
        "18446744073709551616",
        "1e400",
        &"9".repeat(400),
    ] {
        assert!(parse_duration(text).is_err(), "{text}");
    }
    let error = Config::from_str_at(
        "[node]\nrequest_timeout = \"310000000000000000m\"\n",
        Path::new(TOML_PATH),
        &lookup,
    )
    .unwrap_err();
    assert_eq!(error.key(), Some("node.request_timeout"), "{error}");
}
