//! Node integration tests: a node started in-process in front of real stdio upstreams (the
//! testkit's fixture server), driven over raw HTTP so that exactly what goes on the wire is
//! asserted — bad input in every shape, and the node still serving afterwards.

use std::path::Path;
use std::time::Duration;

use concord_config::Config;
use concord_node::{NodeOptions, RunningNode};
use serde_json::{Value, json};

struct TestNode {
    node: RunningNode,
    _dir: tempfile::TempDir,
}

impl TestNode {
    async fn start(extra: &str) -> Result<TestNode, concord_node::NodeError> {
        let fixture = concord_testkit::workspace_bin("concord-fixture");
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[servers.alpha]\ncommand = {fixture:?}\nargs = [\"--name\", \"alpha\"]\n{extra}",
        );
        let config = Config::from_str_at(&text, &dir.path().join("concord.toml"), &|_| None)
            .expect("test config is valid");
        let node = concord_node::start(
            &config,
            NodeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                data_dir: dir.path().join("data"),
                store: None,
            },
        )
        .await?;
        node.wait_ready().await?;
        Ok(TestNode { node, _dir: dir })
    }

    fn url(&self) -> String {
        self.node.mcp_url()
    }

    /// A node whose store already holds an API key for each of `principals` (tokens by name).
    async fn start_with_keys(
        extra: &str,
        principals: &[String],
    ) -> (TestNode, std::collections::HashMap<String, String>) {
        let fixture = concord_testkit::workspace_bin("concord-fixture");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let location = concord_node::store_location(None, None, &data);
        let store = concord_store::Store::open(&location).await.unwrap();
        let mut tokens = std::collections::HashMap::new();
        for principal in principals {
            let key = concord_governance::api_keys::create(&store, principal, &[], 0)
                .await
                .unwrap();
            tokens.insert(principal.clone(), key.token);
        }
        drop(store);
        let text = format!(
            "[servers.alpha]\ncommand = {fixture:?}\nargs = [\"--name\", \"alpha\"]\n{extra}",
        );
        let config = Config::from_str_at(&text, &dir.path().join("concord.toml"), &|_| None)
            .expect("test config is valid");
        let node = concord_node::start(
            &config,
            NodeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                data_dir: data,
                store: None,
            },
        )
        .await
        .unwrap();
        node.wait_ready().await.unwrap();
        (TestNode { node, _dir: dir }, tokens)
    }
}

#[path = "integration/matrix.rs"]
mod matrix;

/// Parses a streamable HTTP answer: plain JSON, or the first SSE `data:` line holding a message.
fn parse_body(text: &str) -> Value {
    if let Ok(value) = serde_json::from_str(text) {
        return value;
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC message in {text:?}"))
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_raw(
    url: &str,
    body: impl Into<reqwest::Body>,
    session: Option<&str>,
) -> (u16, String) {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body);
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25");
    }
    let response = request.send().await.expect("node answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// An initialized 2025-11-25 session over raw HTTP.
async fn open_session(url: &str) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
    let response = client()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(init.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let session = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = response.text().await;
    let (status, _) = post_raw(
        url,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
        Some(&session),
    )
    .await;
    assert_eq!(status, 202);
    session
}

async fn call_echo(url: &str, session: &str, message: &str) -> Value {
    let request = json!({"jsonrpc": "2.0", "id": 99, "method": "tools/call",
        "params": {"name": "alpha__echo", "arguments": {"message": message}}});
    let (status, body) = post_raw(url, request.to_string(), Some(session)).await;
    assert_eq!(status, 200, "{body}");
    parse_body(&body)
}

/// After any rejected input the node must still serve a normal call on a fresh session.
async fn assert_still_serving(url: &str) {
    let session = open_session(url).await;
    let answer = call_echo(url, &session, "still here").await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "Echo: still here",
        "{answer}"
    );
}

#[tokio::test]
async fn malformed_json_is_a_parse_error() {
    let node = TestNode::start("").await.unwrap();
    let (status, body) = post_raw(
        &node.url(),
        "{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ",
        None,
    )
    .await;
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    assert_eq!(answer["id"], Value::Null);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Parse error")
    );
    assert_still_serving(&node.url()).await;
}

#[tokio::test]
async fn wrong_jsonrpc_version_is_an_invalid_request() {
    let node = TestNode::start("").await.unwrap();
    let body = json!({"jsonrpc": "1.0", "id": 5, "method": "ping"}).to_string();
    let (status, text) = post_raw(&node.url(), body, None).await;
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    assert_eq!(answer["id"], 5, "the id is echoed when it can be read");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"2.0\"")
    );

    let (status, text) = post_raw(
        &node.url(),
        "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}]",
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        -32600
    );
    assert_still_serving(&node.url()).await;
}

#[tokio::test]
async fn unknown_method_is_method_not_found() {
    let node = TestNode::start("").await.unwrap();
    let session = open_session(&node.url()).await;
    let (status, body) = post_raw(
        &node.url(),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/teleport", "params": {}}).to_string(),
        Some(&session),
    )
    .await;
    assert_eq!(status, 200);
    let answer = parse_body(&body);
    assert_eq!(answer["id"], 3);
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
    assert_eq!(
        answer["error"]["message"],
        "Method not found: tools/teleport"
    );
    // The same session goes on working.
    assert_eq!(
        call_echo(&node.url(), &session, "x").await["result"]["content"][0]["text"],
        "Echo: x"
    );
}

#[tokio::test]
async fn unknown_tool_is_invalid_params_naming_it() {
    let node = TestNode::start("").await.unwrap();
    let session = open_session(&node.url()).await;
    let request = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "alpha__nope", "arguments": {}}});
    let (_, body) = post_raw(&node.url(), request.to_string(), Some(&session)).await;
    let answer = parse_body(&body);
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    assert_eq!(answer["error"]["message"], "unknown tool: alpha__nope");
    assert_eq!(
        call_echo(&node.url(), &session, "y").await["result"]["content"][0]["text"],
        "Echo: y"
    );
}

#[tokio::test]
async fn oversized_body_is_refused_before_parsing() {
    let node = TestNode::start("[node]\nmax_body_bytes = 65536\n")
        .await
        .unwrap();
    let filler = "x".repeat(70_000);
    let body =
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": filler}}).to_string();
    let (status, text) = post_raw(&node.url(), body, None).await;
    assert_eq!(status, 413);
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["error"]["code"], -32600);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536 bytes"),
        "{answer}"
    );
    assert_still_serving(&node.url()).await;
}

#[tokio::test]
async fn foreign_host_and_origin_are_forbidden() {
    let node = TestNode::start("").await.unwrap();
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string();
    let response = client()
        .post(node.url())
        .header("host", "attacker.example")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(ping.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.text().await.unwrap().contains("Host"));

    let response = client()
        .post(node.url())
        .header("origin", "http://attacker.example")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(ping)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_still_serving(&node.url()).await;
}

#[tokio::test]
async fn configured_host_is_accepted() {
    let node = TestNode::start("[node]\nallowed_hosts = [\"gateway.internal\"]\n")
        .await
        .unwrap();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
    let response = client()
        .post(node.url())
        .header("host", "gateway.internal")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(init.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn never_prefix_collision_refuses_to_start_naming_both() {
    let fixture = concord_testkit::workspace_bin("concord-fixture");
    let extra = format!(
        "prefix = \"never\"\n[servers.beta]\ncommand = {fixture:?}\nargs = [\"--name\", \"beta\"]\nprefix = \"never\"\n"
    );
    let error = match TestNode::start(&extra).await {
        Ok(_) => panic!("two `never` servers with the same tool names must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("\"alpha\"") && error.contains("\"beta\""),
        "{error}"
    );
    assert!(error.contains("\"echo\""), "{error}");
}

#[tokio::test]
async fn conditional_prefix_only_on_collision_and_routes_each() {
    let fixture = concord_testkit::workspace_bin("concord-fixture");
    let extra = format!(
        "prefix = \"conditional\"\n[servers.beta]\ncommand = {fixture:?}\nargs = [\"--name\", \"beta\"]\nprefix = \"never\"\n"
    );
    // alpha is conditional and collides with beta on every name, so alpha's names get the
    // prefix while beta (never) keeps the bare ones.
    let node = TestNode::start(&extra).await.unwrap();
    let session = open_session(&node.url()).await;
    let (_, body) = post_raw(
        &node.url(),
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string(),
        Some(&session),
    )
    .await;
    let names: Vec<String> = parse_body(&body)["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"alpha__echo".to_string()), "{names:?}");
    assert!(names.contains(&"echo".to_string()), "{names:?}");
    assert!(!names.contains(&"beta__echo".to_string()), "{names:?}");
    // Resource reads go to the server that listed the URI or owns the template.
    let read = |id: u32, uri: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "resources/read", "params": {"uri": uri}})
            .to_string()
    };
    let (_, body) = post_raw(&node.url(), read(2, "fixture://beta/info"), Some(&session)).await;
    assert_eq!(
        parse_body(&body)["result"]["contents"][0]["text"],
        "beta served fixture://beta/info"
    );
    let (_, body) = post_raw(
        &node.url(),
        read(3, "fixture://alpha/items/9"),
        Some(&session),
    )
    .await;
    assert_eq!(
        parse_body(&body)["result"]["contents"][0]["text"],
        "alpha served fixture://alpha/items/9"
    );
    let (_, body) = post_raw(&node.url(), read(4, "fixture://nobody/x"), Some(&session)).await;
    let answer = parse_body(&body);
    assert_eq!(answer["error"]["code"], -32002, "{answer}");
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let node = TestNode::start("").await.unwrap();
    let base = format!("http://{}", node.node.local_addr());
    let health = client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = client()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["servers"][0]["name"], "alpha");
    assert_eq!(ready["servers"][0]["state"], "healthy");

    let session = open_session(&node.url()).await;
    call_echo(&node.url(), &session, "count me").await;
    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains("concord_tool_calls_total{server=\"alpha\",tool=\"echo\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("concord_tool_call_duration_seconds_count{server=\"alpha\",tool=\"echo\"} 1")
    );
    assert!(metrics.contains("concord_upstream_up{server=\"alpha\"} 1"));
    // Nothing was written to the shared state in this test.
    assert!(
        metrics.contains("concord_state_commit_requests_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("concord_state_commit_transactions_total 0"));
}

#[tokio::test]
async fn upstream_timeout_names_server_and_leaves_others_alone() {
    let fixture = concord_testkit::workspace_bin("concord-fixture");
    let extra = format!(
        "timeout = \"500ms\"\n[servers.beta]\ncommand = {fixture:?}\nargs = [\"--name\", \"beta\"]\n"
    );
    let node = TestNode::start(&extra).await.unwrap();
    let session = open_session(&node.url()).await;
    let hang = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "alpha__hang", "arguments": {}}});
    let url = node.url();
    let hung = tokio::spawn({
        let (url, session) = (url.clone(), session.clone());
        async move { post_raw(&url, hang.to_string(), Some(&session)).await }
    });
    // While alpha hangs, beta answers.
    let echo = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "beta__echo", "arguments": {"message": "free"}}});
    let (_, body) = post_raw(&url, echo.to_string(), Some(&session)).await;
    assert_eq!(
        parse_body(&body)["result"]["content"][0]["text"],
        "Echo: free"
    );
    let (_, body) = tokio::time::timeout(Duration::from_secs(10), hung)
        .await
        .unwrap()
        .unwrap();
    let answer = parse_body(&body);
    assert_eq!(
        answer["error"]["code"],
        concord_mcp::codes::UPSTREAM_TIMEOUT,
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("server 'alpha'") && message.contains("500 ms"),
        "{message}"
    );
    assert_eq!(
        call_echo(&url, &session, "after").await["result"]["content"][0]["text"],
        "Echo: after"
    );
}

#[tokio::test]
async fn config_data_dir_is_created() {
    let node = TestNode::start("").await.unwrap();
    assert!(Path::new(&node._dir.path().join("data")).is_dir());
}

#[tokio::test]
async fn lists_are_paginated_with_cursors_that_cover_everything_once() {
    let node = TestNode::start("[node]\npage_size = 4\n").await.unwrap();
    let session = open_session(&node.url()).await;
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let params = match &cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        let (_, body) = post_raw(
            &node.url(),
            json!({"jsonrpc": "2.0", "id": 10 + pages, "method": "tools/list", "params": params})
                .to_string(),
            Some(&session),
        )
        .await;
        let result = parse_body(&body)["result"].clone();
        let page = result["tools"].as_array().unwrap();
        assert!(page.len() <= 4, "{result}");
        names.extend(page.iter().map(|t| t["name"].as_str().unwrap().to_string()));
        pages += 1;
        match result["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        names.len(),
        "no tool twice across pages: {names:?}"
    );
    assert_eq!(
        pages,
        names.len().div_ceil(4),
        "full pages of 4 until the last"
    );
    let fixture_tools = names.iter().filter(|n| n.starts_with("alpha__")).count();
    let ready: Value = client()
        .get(format!("http://{}/readyz", node.node.local_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        fixture_tools as u64,
        ready["servers"][0]["tools"].as_u64().unwrap(),
        "every fixture tool is on some page: {names:?}"
    );
    assert!(names.iter().any(|n| n == "concord__state_get"), "{names:?}");
    let (_, body) = post_raw(
        &node.url(),
        json!({"jsonrpc": "2.0", "id": 99, "method": "tools/list", "params": {"cursor": "bogus"}})
            .to_string(),
        Some(&session),
    )
    .await;
    assert_eq!(parse_body(&body)["error"]["code"], -32602);
}

#[tokio::test]
async fn state_over_rest_refuses_stale_and_malformed_writes() {
    let node = TestNode::start("").await.unwrap();
    let base = format!("http://{}/api/v1/state", node.node.local_addr());
    let put = |body: String| {
        client()
            .put(format!("{base}/team/notes"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let created = put(json!({"base_version": 0, "value": ["a"]}).to_string())
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let stale = put(json!({"base_version": 0, "value": ["b"]}).to_string())
        .await
        .unwrap();
    assert_eq!(stale.status(), 409);
    let conflict: Value = stale.json().await.unwrap();
    assert_eq!(conflict["conflict"], true);
    assert_eq!(conflict["current_version"], 1);
    assert_eq!(conflict["current_value"], json!(["a"]));
    let malformed = put("{not json".to_string()).await.unwrap();
    assert_eq!(malformed.status(), 400);
    let unknown_field = put(json!({"base_version": 1, "valeu": 1}).to_string())
        .await
        .unwrap();
    assert_eq!(unknown_field.status(), 400);
    let bad_key = client().get(format!("{base}/Team")).send().await.unwrap();
    assert_eq!(bad_key.status(), 400);
    let now: Value = client()
        .get(format!("{base}/team/notes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        now,
        json!({"key": "team/notes", "version": 1, "value": ["a"]})
    );
}

#[path = "integration/governance_abuse.rs"]
mod governance_abuse;

#[path = "integration/registry_abuse.rs"]
mod registry_abuse;

#[path = "integration/hostile_clients.rs"]
mod hostile_clients;
