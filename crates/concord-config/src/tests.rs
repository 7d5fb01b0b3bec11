use std::path::Path;
use std::time::Duration;

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "GH_TOKEN" => Some("ghp_test".into()),
        "HOME_DIR" => Some("/home/u".into()),
        "JWT_SECRET" => Some("a-secret-of-at-least-32-bytes-for-hs256".into()),
        "SHORT_SECRET" => Some("too-short".into()),
        _ => None,
    }
}

fn toml(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_at(text, Path::new("/etc/concord/concord.toml"), &env)
}

fn json(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_at(text, Path::new("/home/u/.mcp.json"), &env)
}

#[test]
fn toml_with_every_transport() {
    let config = toml(
        r#"
        [node]
        listen = "127.0.0.1:9000"
        request_timeout = "5s"

        [servers.fs]
        command = "npx"
        args = ["-y", "@modelcontextprotocol/server-filesystem", "${HOME_DIR}"]
        cwd = "work"
        forward_roots = true

        [servers.github]
        url = "https://api.example.com/mcp"
        headers = { Authorization = "Bearer ${GH_TOKEN}" }
        prefix = "conditional"
        timeout = "90s"

        [servers.legacy]
        url = "http://127.0.0.1:3001/sse"
        "#,
    )
    .unwrap();
    assert_eq!(config.node.listen, Some("127.0.0.1:9000".parse().unwrap()));
    let names: Vec<_> = config.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["fs", "github", "legacy"]);
    let fs = &config.servers[0];
    assert_eq!(fs.request_timeout, Duration::from_secs(5));
    assert!(fs.forward_roots);
    assert!(
        !config.servers[1].forward_roots,
        "roots stay undeclared unless asked for"
    );
    match &fs.transport {
        TransportSpec::Stdio { args, cwd, .. } => {
            assert_eq!(args[2], "/home/u");
            assert_eq!(cwd.as_deref(), Some(Path::new("/etc/concord/work")));
        }
        other => panic!("expected stdio, got {other:?}"),
    }
    let github = &config.servers[1];
    assert_eq!(github.prefix, PrefixMode::Conditional);
    assert_eq!(github.request_timeout, Duration::from_secs(90));
    assert!(
        matches!(&github.transport, TransportSpec::StreamableHttp { headers, .. }
        if headers["Authorization"] == "Bearer ghp_test")
    );
    assert!(matches!(
        config.servers[2].transport,
        TransportSpec::Sse { .. }
    ));
}

#[test]
fn claude_desktop_json_unchanged() {
    let config = json(
        r#"{
          "globalShortcut": "Ctrl+Space",
          "mcpServers": {
            "memory": { "command": "npx", "args": ["-y", "@modelcontextprotocol/server-memory"],
                        "env": { "MEMORY_FILE_PATH": "/tmp/m.jsonl" } },
            "remote": { "type": "http", "url": "http://localhost:3001/mcp",
                        "headers": { "X-Key": "${GH_TOKEN}" }, "autoApprove": [] },
            "old": { "url": "http://localhost:3002/sse" },
            "off": { "command": "nope", "disabled": true }
          }
        }"#,
    )
    .unwrap();
    let names: Vec<_> = config.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["memory", "old", "remote"]);
    assert!(matches!(
        config.servers[1].transport,
        TransportSpec::Sse { .. }
    ));
    assert!(
        matches!(&config.servers[2].transport, TransportSpec::StreamableHttp { headers, .. }
        if headers["X-Key"] == "ghp_test")
    );
}

#[test]
fn unknown_key_names_file_key_and_expectation() {
    let err = toml("[servers.fs]\ncomand = \"npx\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/etc/concord/concord.toml: key `servers.fs"),
        "{err}"
    );
    assert!(err.contains("unknown field `comand`"), "{err}");
    assert!(err.contains("expected one of"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn wrong_type_names_key() {
    let err = toml("[servers.fs]\ncommand = \"x\"\nargs = \"-y\"\n").unwrap_err();
    assert_eq!(err.key(), Some("servers.fs.args"), "{err}");
    assert!(err.to_string().contains("expected a sequence"), "{err}");
}

#[test]
fn bad_prefix_mode_lists_choices() {
    let err = toml("[servers.fs]\ncommand = \"x\"\nprefix = \"sometimes\"\n").unwrap_err();
    assert_eq!(err.key(), Some("servers.fs.prefix"));
    let text = err.to_string();
    assert!(
        text.contains("`always`") && text.contains("`never`"),
        "{text}"
    );
}

#[test]
fn missing_variable_names_key_and_variable() {
    let err =
        toml("[servers.gh]\nurl = \"http://x/mcp\"\nheaders = { A = \"${NOPE}\" }\n").unwrap_err();
    assert_eq!(err.key(), Some("servers.gh.headers.A"));
    assert!(err.to_string().contains("NOPE is not set"));
}

#[test]
fn command_and_url_conflict() {
    let err = toml("[servers.x]\ncommand = \"a\"\nurl = \"http://b\"\n").unwrap_err();
    assert!(
        err.to_string().contains("both `command` and `url`"),
        "{err}"
    );
    let err = toml("[servers.x]\nargs = [\"a\"]\n").unwrap_err();
    assert!(err.to_string().contains("needs `command`"), "{err}");
}

#[test]
fn bad_names_and_values() {
    assert!(
        toml("[servers.a__b]\ncommand = \"x\"\n")
            .unwrap_err()
            .to_string()
            .contains("\"__\"")
    );
    assert!(
        toml("[servers.concord]\ncommand = \"x\"\n")
            .unwrap_err()
            .to_string()
            .contains("reserved")
    );
    assert_eq!(
        toml("[servers.x]\nurl = \"ftp://x\"\n").unwrap_err().key(),
        Some("servers.x.url")
    );
    assert_eq!(
        toml("[node]\nlisten = \"everywhere\"\n").unwrap_err().key(),
        Some("node.listen")
    );
    assert_eq!(
        toml("[servers.x]\ncommand = \"a\"\ntimeout = \"soon\"\n")
            .unwrap_err()
            .key(),
        Some("servers.x.timeout")
    );
    assert_eq!(
        toml("[servers.x]\ncommand = \"a\"\nheaders = { A = \"b\" }\n")
            .unwrap_err()
            .key(),
        Some("servers.x.headers")
    );
}

#[test]
fn syntax_errors_give_a_location() {
    let err = toml("[servers.x\ncommand = 1\n").unwrap_err().to_string();
    assert!(
        err.contains("syntax error") && err.contains("line 1"),
        "{err}"
    );
    let err = json("{\"mcpServers\": {").unwrap_err().to_string();
    assert!(
        err.contains("/home/u/.mcp.json") && err.contains("syntax error"),
        "{err}"
    );
}

#[test]
fn json_without_servers_or_with_unknown_entry_key() {
    assert_eq!(json("{}").unwrap_err().key(), Some("mcpServers"));
    let err = json(r#"{"mcpServers": {"a": {"command": "x", "bogus": 1}}}"#).unwrap_err();
    assert_eq!(err.key(), Some("mcpServers.a.bogus"), "{err}");
    assert!(err.to_string().contains("unknown field `bogus`"));
}

#[test]
fn state_table_with_policies_and_schemas() {
    let config = toml(
        r#"
        [state]
        store = "postgres://u:${GH_TOKEN}@db/concord"
        proposal_ttl = "2m"
        keep_versions = 100
        [state.namespaces.docs]
        policy = "merge"
        [state.namespaces.tasks]
        schema = { type = "object", required = ["title"] }
        validator = "qa__review"
        "#,
    )
    .unwrap();
    assert_eq!(
        config.state.store.as_deref(),
        Some("postgres://u:ghp_test@db/concord")
    );
    assert_eq!(config.state.proposal_ttl, Some(Duration::from_secs(120)));
    assert_eq!(config.state.keep_versions, Some(100));
    assert_eq!(
        toml("[state]\nkeep_versions = 0\n").unwrap_err().key(),
        Some("state.keep_versions")
    );
    assert_eq!(config.state.policies["docs"], "merge");
    assert_eq!(
        config.state.schemas["tasks"],
        serde_json::json!({"type": "object", "required": ["title"]})
    );
    assert_eq!(config.state.validators["tasks"], "qa__review");
    let err = toml("[state.namespaces.docs]\nvalidator = \"  \"\n").unwrap_err();
    assert_eq!(err.key(), Some("state.namespaces.docs.validator"), "{err}");
    let err = toml("[state.namespaces.docs]\npolicy = \"sometimes\"\n").unwrap_err();
    assert_eq!(err.key(), Some("state.namespaces.docs.policy"), "{err}");
    let err = toml("[state]\nstor = \"x\"\n").unwrap_err();
    assert!(err.to_string().contains("unknown field `stor`"), "{err}");
}

#[test]
fn auth_policy_limits_and_audit_tables() {
    let config = toml(
        r#"
        [auth]
        enabled = true
        issuer = "https://idp"
        audience = "concord"
        leeway = "10s"
        [[auth.keys]]
        kid = "k"
        algorithm = "HS256"
        secret = "${JWT_SECRET}"

        [policy]
        file = "policy.toml"
        [[policy.rules]]
        name = "all"
        effect = "allow"

        [limits]
        per_principal = { per_second = 5, burst = 10 }
        [limits.tools]
        "fx__slow" = { per_second = 0.5 }

        [audit]
        record_arguments = true
        "#,
    )
    .unwrap();
    assert!(config.auth.enabled);
    assert_eq!(config.auth.leeway, Duration::from_secs(10));
    assert_eq!(
        config.auth.keys[0].secret.as_deref(),
        Some("a-secret-of-at-least-32-bytes-for-hs256")
    );
    assert_eq!(config.policy.rules[0].when, "true");
    assert_eq!(
        config.policy.file.as_deref(),
        Some(Path::new("/etc/concord/policy.toml"))
    );
    assert_eq!(config.limits.per_principal.unwrap().burst, 10);
    assert_eq!(config.limits.per_tool["fx__slow"].burst, 1);
    assert!(config.audit.record_arguments);
    assert!(config.audit.redact.iter().any(|w| w == "token"));

    let err = toml("[limits.per_principal]\nper_second = 0\n").unwrap_err();
    assert_eq!(err.key(), Some("limits.per_principal.per_second"), "{err}");
    let err = toml("[[policy.rules]]\nname = \"x\"\neffect = \"maybe\"\n").unwrap_err();
    assert_eq!(err.key(), Some("policy.rules[0].effect"), "{err}");
    let err = toml("[[auth.keys]]\nalgorithm = \"RS256\"\nsecret = \"s\"\n").unwrap_err();
    assert_eq!(err.key(), Some("auth.keys[0].public_key"), "{err}");
}

#[test]
fn registry_entities_in_the_config() {
    let config = toml(
        r#"
        [registry.search]
        version = "1.6.0"
        kind = "server"
        capabilities = ["search"]
        tags = ["prod"]
        endpoint = { url = "http://127.0.0.1:9000/mcp" }
        "#,
    )
    .unwrap();
    assert_eq!(config.registry.len(), 1);
    assert_eq!(config.registry[0].name, "search");
    assert_eq!(config.registry[0].namespace, "default");

    let err = toml(
        "[registry.search]\nversion = \"one\"\nkind = \"server\"\ncapabilities = [\"s\"]\nendpoint = { url = \"http://x\" }\n",
    )
    .unwrap_err();
    assert_eq!(err.key(), Some("registry.search.version"), "{err}");
    let err = toml(
        "[registry.search]\nversion = \"1.0.0\"\nkind = \"robot\"\ncapabilities = [\"s\"]\nendpoint = { url = \"http://x\" }\n",
    )
    .unwrap_err();
    assert_eq!(err.key(), Some("registry.search.kind"), "{err}");
}

#[test]
fn routing_table_and_per_tool_settings() {
    let config = toml(
        r#"
        [routing]
        breaker_failures = 3
        breaker_cooldown = "2s"
        retry_attempts = 2
        cache_entries = 10
        max_result_tokens = 4000

        [servers.fs]
        command = "fs"
        cache_ttl = "30s"
        [servers.fs.tools.write_file]
        retryable = true
        [servers.fs.tools.read_file]
        cache_ttl = "0s"
        [servers.fs.tools.list]
        cache_ttl = "5m"
        "#,
    )
    .unwrap();
    assert_eq!(config.routing.breaker_failures, 3);
    assert_eq!(config.routing.breaker_cooldown, Duration::from_secs(2));
    assert_eq!(config.routing.retry_attempts, 2);
    assert_eq!(config.routing.breaker_failure_ratio, 0.5, "default kept");
    assert_eq!(config.routing.cache_entries, 10);
    assert_eq!(config.routing.max_result_tokens, Some(4000));
    let tools = &config.servers[0].tools;
    assert!(tools["write_file"].retryable);
    assert_eq!(tools["read_file"].cache_ttl, Some(Duration::ZERO));
    assert_eq!(tools["list"].cache_ttl, Some(Duration::from_secs(300)));

    for (bad, key) in [
        (
            "[routing]\nbreaker_failure_ratio = 1.5",
            "routing.breaker_failure_ratio",
        ),
        ("[routing]\nretry_attempts = 0", "routing.retry_attempts"),
        (
            "[routing]\nbreaker_cooldown = \"soon\"",
            "routing.breaker_cooldown",
        ),
        ("[routing]\nretries = 3", "routing"),
        (
            "[servers.fs]\ncommand = \"fs\"\n[servers.fs.tools.x]\ncache_ttl = \"never\"",
            "servers.fs.tools.x.cache_ttl",
        ),
    ] {
        let error = toml(bad).unwrap_err().to_string();
        assert!(error.contains(key), "{bad}: {error}");
    }
}

#[test]
fn providers_and_agents() {
    let config = toml(
        r#"
        [providers.claude]
        api = "anthropic"
        base_url = "https://api.anthropic.com"
        model = "claude-sonnet-4-5"
        api_key_env = "ANTHROPIC_API_KEY"
        tags = ["remote"]
        price_input = 3.0
        price_output = 15.0

        [providers.local]
        api = "openai"
        base_url = "http://${HOST:-127.0.0.1}:8080/v1"
        model = "local"

        [agents.reader]
        instructions = "Read."
        provider = { tags = ["+remote"] }
        tools = ["fs__read_file", "exec__*", { tags = ["sandbox"] }, { capability = "search", tags = ["+prod"], version = "^2" }]
        output_schema = { type = "object", required = ["answer"] }
        budget = { tokens = 1000, deadline = "5m" }
        "#,
    )
    .unwrap();
    assert_eq!(config.providers.len(), 2);
    let claude = &config.providers[0];
    assert_eq!(claude.api, ProviderApi::Anthropic);
    assert_eq!(claude.api_key_env.as_deref(), Some("ANTHROPIC_API_KEY"));
    assert_eq!(claude.version, "1.0.0");
    assert_eq!(config.providers[1].base_url, "http://127.0.0.1:8080/v1");
    let reader = &config.agents[0];
    assert_eq!(reader.provider.capability, "llm");
    assert_eq!(reader.provider.tags, vec!["+remote"]);
    assert_eq!(reader.max_iterations, 8);
    assert_eq!(reader.tools, vec!["fs__read_file", "exec__*"]);
    assert_eq!(
        reader.tool_servers,
        vec![
            concord_mesh::Selector {
                capability: "mcp".into(),
                tags: vec!["sandbox".into()],
                ..Default::default()
            },
            concord_mesh::Selector {
                capability: "search".into(),
                tags: vec!["+prod".into()],
                version: Some("^2".into()),
                namespace: None,
            },
        ]
    );
    assert_eq!(
        reader.output_schema,
        Some(serde_json::json!({"type": "object", "required": ["answer"]}))
    );
    assert_eq!(reader.budget.tokens, Some(1000));
    assert_eq!(reader.budget.deadline, Some(Duration::from_secs(300)));

    for (bad, key) in [
        (
            "[providers.p]\napi = \"cohere\"\nbase_url = \"http://x\"\nmodel = \"m\"",
            "providers",
        ),
        (
            "[providers.p]\napi = \"openai\"\nbase_url = \"ftp://x\"\nmodel = \"m\"",
            "providers.p.base_url",
        ),
        (
            "[providers.p]\napi = \"openai\"\nbase_url = \"http://x\"\nmodel = \"m\"\nversion = \"one\"",
            "providers.p.version",
        ),
        (
            "[agents.a]\ninstructions = \"x\"\nmax_iterations = 0",
            "agents.a.max_iterations",
        ),
        (
            "[agents.a]\ninstructions = \"x\"\noutput_schema = \"{not json\"",
            "agents.a.output_schema",
        ),
        ("[agents.a]\ndescription = \"no instructions\"", "agents"),
        (
            "[agents.a]\ninstructions = \"x\"\ntools = [{ tags = [\"a\"], version = \"two\" }]",
            "agents.a.tools",
        ),
        (
            "[servers.s]\ncommand = \"x\"\ntags = [\"+prod\"]",
            "servers.s.tags",
        ),
        (
            "[servers.s]\ncommand = \"x\"\ncapabilities = [\"has space\"]",
            "servers.s.capabilities",
        ),
    ] {
        let error = toml(bad).unwrap_err().to_string();
        assert!(error.contains(key), "{bad}: {error}");
    }
}

#[test]
fn workflows_name_known_agents() {
    let config = toml(
        r#"
        [agents.dev]
        instructions = "x"
        [agents.qa]
        instructions = "y"
        [workflows.build]
        kind = "orchestrator"
        workers = [{ agent = "dev", capabilities = ["code"], max_concurrency = 2 }]
        tasks = [{ id = "a", capability = "code", task = "write" }, { id = "b", capability = "code", task = "test", depends_on = ["a"] }]
        [workflows.polish]
        kind = "evaluator"
        generator = "dev"
        evaluator = "qa"
        "#,
    )
    .unwrap();
    assert_eq!(config.workflows.len(), 2);
    assert!(matches!(
        &config.workflows[1].kind,
        WorkflowKind::Evaluator { max_rounds: 3, .. }
    ));
    let error = toml("[agents.dev]\ninstructions = \"x\"\n[workflows.w]\nkind = \"parallel\"\nagents = [\"dev\", \"ghost\"]")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("workflows.w") && error.contains("\"ghost\""),
        "{error}"
    );
    let error = toml("[workflows.w]\nkind = \"dance\"")
        .unwrap_err()
        .to_string();
    assert!(error.contains("workflows.w"), "{error}");
}

/// Each refused value: the error names the dotted key and says what was expected, and a config
/// that differs only in that value loads (so the test shows the value, not the shape, is refused).
fn refused(text: &str, key: &str, expected: &str) {
    let err = toml(text).unwrap_err();
    assert_eq!(err.key(), Some(key), "{err}");
    let message = err.to_string();
    assert!(message.contains(expected), "{message}");
    assert!(
        message.starts_with("/etc/concord/concord.toml"),
        "{message}"
    );
}

#[test]
fn node_limits_below_their_minimum() {
    refused(
        "[node]\nmax_body_bytes = 1023\n",
        "node.max_body_bytes",
        "at least 1024 bytes, got 1023",
    );
    toml("[node]\nmax_body_bytes = 1024\n").unwrap();
    refused(
        "[node]\npage_size = 0\n",
        "node.page_size",
        "at least 1 item per page",
    );
    assert_eq!(toml("[node]\npage_size = 1\n").unwrap().node.page_size, 1);
    refused(
        "[node]\nmax_body_bytes = -5\n",
        "node.max_body_bytes",
        "invalid value",
    );
}

#[test]
fn registry_private_networks_and_the_per_principal_cap() {
    let config = toml(
        "[node]\nregistry_private_networks = [\"10.0.0.0/8\", \"fd00::/8\"]\nregistry_max_per_principal = 5\n",
    )
    .unwrap();
    let networks: Vec<String> = config
        .node
        .registry_private_networks
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(networks, ["10.0.0.0/8", "fd00::/8"]);
    assert_eq!(config.node.registry_max_per_principal, 5);
    assert_eq!(
        toml("").unwrap().node.registry_max_per_principal,
        crate::DEFAULT_REGISTRY_MAX_PER_PRINCIPAL
    );
    refused(
        "[node]\nregistry_private_networks = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n",
        "node.registry_private_networks[1]",
        "host bits set (did you mean \"10.0.0.0/8\"?)",
    );
    refused(
        "[node]\nregistry_private_networks = [\"intranet\"]\n",
        "node.registry_private_networks[0]",
        "is not a network like",
    );
    refused(
        "[node]\nregistry_max_per_principal = 0\n",
        "node.registry_max_per_principal",
        "at least 1 registration",
    );
}

#[test]
fn session_and_connection_caps_and_timeouts() {
    let defaults = toml("").unwrap().node;
    assert_eq!(defaults.max_sessions, crate::DEFAULT_MAX_SESSIONS);
    assert_eq!(defaults.max_connections, crate::DEFAULT_MAX_CONNECTIONS);
    assert_eq!(
        defaults.session_idle_timeout,
        crate::DEFAULT_SESSION_IDLE_TIMEOUT
    );
    assert_eq!(
        defaults.header_read_timeout,
        crate::DEFAULT_HEADER_READ_TIMEOUT
    );
    let node = toml(
        "[node]\nmax_sessions = 3\nmax_connections = 40\nsession_idle_timeout = \"90s\"\nheader_read_timeout = \"250ms\"\n",
    )
    .unwrap()
    .node;
    assert_eq!(node.max_sessions, 3);
    assert_eq!(node.max_connections, 40);
    assert_eq!(node.session_idle_timeout, Duration::from_secs(90));
    assert_eq!(node.header_read_timeout, Duration::from_millis(250));
    refused(
        "[node]\nmax_sessions = 0\n",
        "node.max_sessions",
        "expected 1 to 1000000, got 0",
    );
    refused(
        "[node]\nmax_connections = 1000001\n",
        "node.max_connections",
        "expected 1 to 1000000, got 1000001",
    );
    refused(
        "[node]\nsession_idle_timeout = \"0s\"\n",
        "node.session_idle_timeout",
        "expected a positive duration",
    );
    refused(
        "[node]\nheader_read_timeout = \"soon\"\n",
        "node.header_read_timeout",
        "expected a duration like",
    );
}

#[test]
fn origins_need_a_scheme() {
    refused(
        "[node]\nallowed_origins = [\"https://ok.example\", \"app.example.com\"]\n",
        "node.allowed_origins[1]",
        "expected an origin with a scheme",
    );
    refused(
        "[node]\nallowed_origins = [\"ftp://files.example\"]\n",
        "node.allowed_origins[0]",
        "\"ftp://files.example\"",
    );
    let config =
        toml("[node]\nallowed_origins = [\"https://ok.example\", \"http://x:3000\", \"null\"]\n")
            .unwrap();
    assert_eq!(config.node.allowed_origins.len(), 3);
}

const PROVIDER: &str =
    "[providers.p]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n";

#[test]
fn prices_and_costs_are_finite_and_not_negative() {
    refused(
        &format!("{PROVIDER}price_input = -0.5\n"),
        "providers.p.price_input",
        "got -0.5",
    );
    refused(
        &format!("{PROVIDER}price_output = -1.0\n"),
        "providers.p.price_output",
        "got -1",
    );
    // TOML has nan and inf: neither is a price.
    refused(
        &format!("{PROVIDER}price_input = nan\n"),
        "providers.p.price_input",
        "got NaN",
    );
    refused(
        &format!("{PROVIDER}price_output = inf\n"),
        "providers.p.price_output",
        "got inf",
    );
    toml(&format!(
        "{PROVIDER}price_input = 0.0\nprice_output = 15.0\n"
    ))
    .unwrap();
    refused(
        &format!("{PROVIDER}[agents.a]\ninstructions = \"x\"\nbudget = {{ cost_usd = -1.0 }}\n"),
        "agents.a.budget.cost_usd",
        "finite amount of 0 or more",
    );
    refused(
        &format!("{PROVIDER}[agents.a]\ninstructions = \"x\"\nbudget = {{ cost_usd = nan }}\n"),
        "agents.a.budget.cost_usd",
        "finite amount",
    );
    refused(
        "[budgets.default]\ncost_usd = -3.0\n",
        "budgets.default.cost_usd",
        "non-negative",
    );
}

#[test]
fn warn_at_is_a_share_between_0_and_1() {
    for bad in ["0.0", "1.01", "-0.2", "nan"] {
        refused(
            &format!("[budgets]\nwarn_at = {bad}\n"),
            "budgets.warn_at",
            "expected a share between 0 and 1",
        );
    }
    for good in ["0.01", "1.0"] {
        toml(&format!("[budgets]\nwarn_at = {good}\n")).unwrap();
    }
}

#[test]
fn policy_rule_names_are_unique_and_present() {
    refused(
        "[[policy.rules]]\nname = \"a\"\neffect = \"allow\"\n[[policy.rules]]\nname = \"a\"\neffect = \"deny\"\n",
        "policy.rules[1].name",
        "\"a\" is empty or repeated",
    );
    refused(
        "[[policy.rules]]\nname = \"  \"\neffect = \"allow\"\n",
        "policy.rules[0].name",
        "empty or repeated",
    );
}

#[test]
fn unreadable_key_file_is_named() {
    refused(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"RS256\"\npublic_key_file = \"keys/missing.pem\"\n",
        "auth.keys[0].public_key_file",
        "cannot read /etc/concord/keys/missing.pem",
    );
    refused(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"RS256\"\npublic_key = \"x\"\npublic_key_file = \"k.pem\"\n",
        "auth.keys[0].public_key",
        "not both",
    );
}

#[test]
fn server_names_use_a_small_charset() {
    for (name, expected) in [
        ("\"a b\"", "may contain only letters, digits"),
        ("\"über\"", "may contain only letters, digits"),
        ("\"a.b\"", "may contain only letters, digits"),
        ("\"a/b\"", "may contain only letters, digits"),
        ("\"_a\"", "must not contain"),
        ("\"a_\"", "must not contain"),
        ("\"\"", "1 to 64 characters"),
    ] {
        let err = toml(&format!("[servers.{name}]\ncommand = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
    let long = "a".repeat(65);
    let err = toml(&format!("[servers.{long}]\ncommand = \"x\"\n")).unwrap_err();
    assert!(err.to_string().contains("1 to 64 characters"), "{err}");
    toml(&format!("[servers.{}]\ncommand = \"x\"\n", "a".repeat(64))).unwrap();
    toml("[servers.my-server_2]\ncommand = \"x\"\n").unwrap();
}

const LONG_SECRET: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn hs256_secrets_have_at_least_32_bytes() {
    // Checked after `${VAR}` expansion, where the real secret is.
    refused(
        "[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"${SHORT_SECRET}\"\n",
        "auth.keys[0].secret",
        "at least 32 bytes",
    );
    refused(
        &format!(
            "[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"{LONG_SECRET}\"\n[[auth.keys]]\nkid = \"b\"\nalgorithm = \"HS256\"\nsecret = \"{}\"\n",
            &LONG_SECRET[..31]
        ),
        "auth.keys[1].secret",
        "this one has 31",
    );
    let config = toml(&format!(
        "[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"{LONG_SECRET}\"\n"
    ))
    .unwrap();
    assert_eq!(config.auth.keys[0].secret.as_deref(), Some(LONG_SECRET));
    // The secret itself never appears in the error.
    let err =
        toml("[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"${SHORT_SECRET}\"\n").unwrap_err();
    assert!(!err.to_string().contains("too-short"), "{err}");
}

#[test]
fn with_auth_on_jwts_need_an_issuer_and_an_audience() {
    let key = format!("[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"{LONG_SECRET}\"\n");
    refused(
        &format!("[auth]\nenabled = true\naudience = \"concord\"\n{key}"),
        "auth.issuer",
        "required when JWTs are accepted (auth.keys is set)",
    );
    refused(
        &format!("[auth]\nenabled = true\nissuer = \"https://idp\"\n{key}"),
        "auth.audience",
        "required when JWTs are accepted (auth.keys is set)",
    );
    refused(
        "[auth]\nenabled = true\njwks_url = \"https://idp/.well-known/jwks.json\"\naudience = \"concord\"\n",
        "auth.issuer",
        "(auth.jwks_url is set)",
    );
    refused(
        "[auth]\nenabled = true\nissuer = \"https://idp\"\naudience = \"  \"\njwks_url = \"https://idp/jwks\"\n",
        "auth.audience",
        "required",
    );
    // Both given: accepted. API keys only (no JWT keys, no JWKS): neither is needed. Auth off:
    // the keys are not used, so neither is required.
    toml(&format!(
        "[auth]\nenabled = true\nissuer = \"https://idp\"\naudience = \"concord\"\n{key}"
    ))
    .unwrap();
    toml("[auth]\nenabled = true\n").unwrap();
    toml(&key).unwrap();
}

#[test]
fn usage_reports_are_trusted_only_where_configured() {
    let config = toml(
        "[servers.meter]\ncommand = \"meter\"\nreport_usage = true\n\n[servers.other]\ncommand = \"other\"\n",
    )
    .unwrap();
    assert!(config.servers[0].report_usage);
    assert!(
        !config.servers[1].report_usage,
        "an upstream's usage is a claim unless configured otherwise"
    );
    assert!(
        !json(r#"{"mcpServers": {"a": {"command": "a"}}}"#)
            .unwrap()
            .servers[0]
            .report_usage
    );
    let error = toml("[servers.s]\ncommand = \"s\"\nreport_usage = \"yes\"")
        .unwrap_err()
        .to_string();
    assert!(error.contains("servers.s.report_usage"), "{error}");
}

#[test]
fn agents_tool_calls_per_turn_and_in_parallel_are_bounded() {
    let config = toml(
        "[agents.a]\ninstructions = \"x\"\n\n[agents.b]\ninstructions = \"x\"\nmax_tool_calls_per_turn = 3\nmax_parallel_tool_calls = 1\n",
    )
    .unwrap();
    let (a, b) = (&config.agents[0], &config.agents[1]);
    assert_eq!(
        (a.max_tool_calls_per_turn, a.max_parallel_tool_calls),
        (16, 4)
    );
    assert_eq!(
        (b.max_tool_calls_per_turn, b.max_parallel_tool_calls),
        (3, 1)
    );
    for (bad, key, said) in [
        (
            "max_tool_calls_per_turn = 0",
            "agents.a.max_tool_calls_per_turn",
            "expected 1 to 1024, got 0",
        ),
        (
            "max_parallel_tool_calls = 0",
            "agents.a.max_parallel_tool_calls",
            "expected 1 to 1024, got 0",
        ),
        (
            "max_tool_calls_per_turn = 5000",
            "agents.a.max_tool_calls_per_turn",
            "got 5000",
        ),
        (
            "max_parallel_tool_calls = -1",
            "agents.a.max_parallel_tool_calls",
            "",
        ),
    ] {
        let error = toml(&format!("[agents.a]\ninstructions = \"x\"\n{bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(key) && error.contains(said),
            "{bad}: {error}"
        );
    }
}
