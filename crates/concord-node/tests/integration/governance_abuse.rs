//! Governance under abuse, through a real node with auth on: a client that forges a budget
//! envelope's `parent` (another principal's envelope, or a standing budget by its old guessable
//! id), an upstream that reports absurd usage (a negative cost, token counts that would wrap), a
//! flood of unauthenticated requests against the audit trail, a deny rule that fails to
//! evaluate, and a usage query whose duration overflows.

use std::collections::HashMap;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use concord_store::{AuditRow, Store, UsageRow};
use serde_json::{Value, json};

use super::{TestNode, client, parse_body};

/// One MCP exchange over HTTP as `token`; `session` once initialized. Returns the status and
/// the JSON-RPC message (if any).
async fn rpc(url: &str, token: &str, session: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = client()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_string());
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25");
    }
    let response = request.send().await.expect("node answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        parse_body(&text)
    };
    (status, value)
}

/// An initialized session for `token`.
async fn session_for(url: &str, token: &str) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "abuse", "version": "1"}}});
    let response = client()
        .post(url)
        .bearer_auth(token)
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
    let (status, _) = rpc(
        url,
        token,
        Some(&session),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(status, 202);
    session
}

/// A `tools/call` with `meta` as its `_meta`: the JSON-RPC answer.
async fn call(
    url: &str,
    token: &str,
    session: &str,
    tool: &str,
    arguments: Value,
    meta: Value,
) -> Value {
    let (status, answer) = rpc(
        url,
        token,
        Some(session),
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": meta}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Stops the node (its audit trail flushed) and reads the whole chain from its store.
async fn stop_and_read_audit(node: TestNode) -> (Store, Vec<AuditRow>, tempfile::TempDir) {
    let TestNode { node, _dir } = node;
    node.shutdown().await;
    let store = Store::open(&concord_node::store_location(
        None,
        None,
        &_dir.path().join("data"),
    ))
    .await
    .unwrap();
    let rows = store.audit_rows(0, 100_000).await.unwrap();
    (store, rows, _dir)
}

fn data(row: &AuditRow) -> Value {
    serde_json::from_str(&row.data).unwrap()
}

const EVERYONE: &str = "[[policy.rules]]\nname = \"everyone\"\neffect = \"allow\"\nwhen = 'true'\n";

fn principals(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn mallory_cannot_spend_alices_budget_by_naming_it_as_parent() {
    let extra =
        format!("[auth]\nenabled = true\n{EVERYONE}[budgets.principals.alice]\ntool_calls = 3\n");
    let (node, tokens) =
        TestNode::start_with_keys(&extra, &principals(&["alice", "mallory"])).await;
    let url = node.url();
    let (alice, mallory) = (tokens["alice"].as_str(), tokens["mallory"].as_str());
    let (alice_session, mallory_session) = (
        session_for(&url, alice).await,
        session_for(&url, mallory).await,
    );
    // Alice's call asks for an envelope of 2 calls; the upstream sees the envelope's id.
    let first = call(
        &url,
        alice,
        &alice_session,
        "alpha__echo",
        json!({"message": "mine"}),
        json!({"concord/budget": {"tool_calls": 2}}),
    )
    .await;
    let envelope = first["result"]["_meta"]["received"]["concord/budget"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    // The upstream's envelope: 2 calls (what it asked, within the 2 left of alice's 3).
    assert_eq!(
        first["result"]["_meta"]["received"]["concord/budget"]["remaining"]["tool_calls"],
        2
    );
    // Mallory names alice's envelope, and alice's standing budget by its old id.
    for (parent, expected) in [
        (envelope.as_str(), "was not issued to mallory"),
        ("principal:alice", "is unknown or has expired"),
    ] {
        let refused = call(
            &url,
            mallory,
            &mallory_session,
            "alpha__echo",
            json!({"message": "yours"}),
            json!({"concord/budget": {"parent": parent}}),
        )
        .await;
        assert_eq!(refused["error"]["code"], -32030, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{parent}: {message}");
    }
    // Alice's budget is untouched: she has 2 of her 3 calls left, and may use her envelope.
    let second = call(
        &url,
        alice,
        &alice_session,
        "alpha__echo",
        json!({"message": "mine again"}),
        json!({"concord/budget": {"parent": envelope}}),
    )
    .await;
    assert!(second.get("result").is_some(), "{second}");
    let third = call(
        &url,
        alice,
        &alice_session,
        "alpha__echo",
        json!({"message": "last"}),
        json!({}),
    )
    .await;
    assert_eq!(
        third["result"]["_meta"]["concord/budget"]["remaining"]["tool_calls"], 0,
        "{third}"
    );
    // Both refusals are on the record.
    let (_store, rows, _dir) = stop_and_read_audit(node).await;
    let refusals: Vec<Value> = rows
        .iter()
        .filter(|r| r.kind == "budget_exhausted" && r.principal == "mallory")
        .map(data)
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
}

/// An upstream whose one tool, `report`, returns `arguments.usage` as its
/// `_meta["concord/usage"]`: whatever usage a test wants reported.
async fn usage_upstream() -> String {
    async fn answer(body: axum::body::Bytes) -> axum::response::Response {
        let message: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let Some(id) = message.get("id").cloned() else {
            return StatusCode::ACCEPTED.into_response();
        };
        let params = &message["params"];
        let result = match message["method"].as_str().unwrap_or_default() {
            "initialize" => json!({
                "protocolVersion": params["protocolVersion"].as_str().unwrap_or("2025-11-25"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "usage", "version": "1.0.0"},
            }),
            "tools/list" => json!({"tools": [{
                "name": "report",
                "description": "Reports the usage it is given",
                "inputSchema": {"type": "object", "properties": {"usage": {}}},
            }]}),
            "tools/call" => json!({
                "content": [{"type": "text", "text": "reported"}],
                "_meta": {"concord/usage": params["arguments"]["usage"]},
            }),
            _ => json!({}),
        };
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
        )
            .into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/mcp",
        post(answer)
            .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
            .delete(|| async { StatusCode::OK }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/mcp")
}

#[tokio::test]
async fn absurd_usage_reports_never_refund_or_wrap_and_are_audited() {
    let upstream = usage_upstream().await;
    let extra = format!(
        "[servers.usage]\nurl = \"{upstream}\"\nreport_usage = true\n[auth]\nenabled = true\n{EVERYONE}\
         [budgets.principals.alice]\ntool_calls = 100\ntokens = 1000000\ncost_usd = 1.0\n"
    );
    let (node, tokens) = TestNode::start_with_keys(&extra, &principals(&["alice"])).await;
    let url = node.url();
    let alice = tokens["alice"].as_str();
    let session = session_for(&url, alice).await;
    let report = |usage: Value| {
        let (url, session) = (url.clone(), session.clone());
        async move {
            call(
                &url,
                alice,
                &session,
                "usage__report",
                json!({"usage": usage}),
                json!({}),
            )
            .await
        }
    };
    let remaining =
        |answer: &Value| answer["result"]["_meta"]["concord/budget"]["remaining"].clone();
    let spent = report(json!({"cost_usd": 0.5, "input_tokens": 10})).await;
    assert_eq!(remaining(&spent)["cost_usd"], 0.5, "{spent}");
    // A negative cost used to be added as is: $10 back on alice's budget.
    let refund = report(json!({"cost_usd": -10.0})).await;
    assert_eq!(remaining(&refund)["cost_usd"], 0.5, "{refund}");
    // Token counts whose sum wraps u64 (before: a panic in debug builds, a wrap in release).
    let huge = report(json!({"input_tokens": u64::MAX, "output_tokens": u64::MAX})).await;
    assert_eq!(remaining(&huge)["tokens"], 0, "{huge}");
    // Spent is spent: the next call is refused.
    let refused = report(json!({})).await;
    assert_eq!(refused["error"]["code"], -32030, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens budget exhausted"),
        "{refused}"
    );
    let (_store, rows, _dir) = stop_and_read_audit(node).await;
    let invalid: Vec<Value> = rows
        .iter()
        .filter(|r| r.kind == "budget_usage_invalid")
        .map(data)
        .collect();
    assert_eq!(invalid.len(), 2, "{invalid:?}");
    assert!(
        invalid[0]["problems"][0]
            .as_str()
            .unwrap()
            .contains("negative"),
        "{invalid:?}"
    );
    assert!(
        invalid[1]["problems"][0]
            .as_str()
            .unwrap()
            .contains("exceeds the maximum"),
        "{invalid:?}"
    );
    assert_eq!(invalid[1]["tool"], "report");
}

#[tokio::test]
async fn a_flood_of_unauthenticated_requests_costs_a_few_counted_audit_rows() {
    let (node, _) = TestNode::start_with_keys("[auth]\nenabled = true\n", &[]).await;
    let url = node.url();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "flood", "version": "1"}}})
    .to_string();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let started = std::time::Instant::now();
    // 1,000 without credentials and 200 with a bad one, 50 at a time.
    for round in 0..24 {
        let requests = (0..50).map(|_| {
            let mut request = client()
                .post(&url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .body(body.clone());
            if round >= 20 {
                request = request.bearer_auth("not-a-credential");
            }
            async move { request.send().await.unwrap().status().as_u16() }
        });
        for status in futures_join_all(requests).await {
            *statuses.entry(status).or_default() += 1;
        }
    }
    assert_eq!(statuses, HashMap::from([(401, 1200)]));
    // Each distinct failure costs at most two rows per 10 s window it spans (the first at
    // once, the count of the rest at the window's end): a handful, however slow the machine.
    let windows = started.elapsed().as_secs() / 10 + 2;
    let (store, rows, _dir) = stop_and_read_audit(node).await;
    // Before: one row per request (1,013 rows for 1,000 requests).
    let failures: Vec<Value> = rows
        .iter()
        .filter(|r| r.kind == "auth_failure")
        .map(data)
        .collect();
    let bound = 2 * 2 * windows as usize;
    assert!(
        failures.len() <= bound,
        "{} auth_failure rows (at most {bound}): {failures:#?}",
        failures.len()
    );
    assert_eq!(rows.len(), failures.len(), "nothing else was recorded");
    let count = |reason: &str| -> u64 {
        failures
            .iter()
            .filter(|d| d["reason"].as_str().unwrap().contains(reason))
            .map(|d| d["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("authentication required"), 1000, "{failures:#?}");
    assert_eq!(count("API keys only"), 200, "{failures:#?}");
    assert!(
        failures.iter().all(|d| d["path"] == "/mcp"),
        "{failures:#?}"
    );
    let bytes: usize = rows.iter().map(|r| r.data.len()).sum();
    assert!(bytes < 200 * bound, "{bytes} bytes of audit data");
    assert_eq!(
        concord_governance::audit::verify(&store).await.unwrap(),
        Ok(rows.len() as u64)
    );
}

/// `futures::future::join_all` without the dependency: runs `requests` concurrently.
async fn futures_join_all<F>(requests: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = requests.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_deny_rule_that_errors_denies_the_call_and_the_audit_names_it() {
    let extra = format!(
        "[auth]\nenabled = true\n{EVERYONE}\
         [[policy.rules]]\nname = \"no-secret-messages\"\neffect = \"deny\"\nwhen = 'arguments.message.startsWith(\"secret\")'\n"
    );
    let (node, tokens) = TestNode::start_with_keys(&extra, &principals(&["alice"])).await;
    let url = node.url();
    let alice = tokens["alice"].as_str();
    let session = session_for(&url, alice).await;
    // The list still shows the tool (a list has no arguments; every call is decided again).
    let (_, listed) = rpc(
        &url,
        alice,
        Some(&session),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains(&"alpha__echo"), "{names:?}");
    let fine = call(
        &url,
        alice,
        &session,
        "alpha__echo",
        json!({"message": "hello"}),
        json!({}),
    )
    .await;
    assert_eq!(
        fine["result"]["content"][0]["text"], "Echo: hello",
        "{fine}"
    );
    let secret = call(
        &url,
        alice,
        &session,
        "alpha__echo",
        json!({"message": "secret plans"}),
        json!({}),
    )
    .await;
    assert!(secret.get("error").is_some(), "{secret}");
    // Before: the rule errored on a call without `message`, matched nothing, and "everyone"
    // let the call through.
    let no_message = call(&url, alice, &session, "alpha__echo", json!({}), json!({})).await;
    assert!(no_message.get("error").is_some(), "{no_message}");
    let (_store, rows, _dir) = stop_and_read_audit(node).await;
    let denied: Vec<Value> = rows
        .iter()
        .filter(|r| r.kind == "policy_decision")
        .map(data)
        .filter(|d| d["allowed"] == false)
        .collect();
    assert_eq!(denied.len(), 2, "{denied:#?}");
    assert!(denied.iter().all(|d| d["rule"] == "no-secret-messages"));
    assert!(denied[0].get("rule_error").is_none(), "{denied:#?}");
    assert!(denied[1]["rule_error"].is_string(), "{denied:#?}");
}

#[tokio::test]
async fn usage_since_that_overflows_is_a_400_and_totals_saturate() {
    let node = TestNode::start("").await.unwrap();
    let base = format!("http://{}", node.node.local_addr());
    // Rows whose token sum wraps u64, and whose float sum loses tokens past 2^53.
    let store = Store::open(&concord_node::store_location(
        None,
        None,
        &node._dir.path().join("data"),
    ))
    .await
    .unwrap();
    let row = |input_tokens: u64, output_tokens: u64| UsageRow {
        at_ms: 1,
        run_id: "r".into(),
        parent_run: None,
        agent: "a".into(),
        principal: "p".into(),
        provider: "x".into(),
        model: "m".into(),
        input_tokens,
        output_tokens,
        cost_usd: 0.0,
        latency_ms: 1,
        error: None,
    };
    let big = i64::MAX as u64;
    store
        .record_usage(&[row(big, (1 << 53) + 1), row(big, 1), row(big, 0)])
        .await
        .unwrap();
    for since in [
        "100000000000000000000000h",
        "99999999999999999999999999999999999999999",
        "1e400",
        "3153600001",
    ] {
        let response = client()
            .get(format!("{base}/api/v1/usage?since={since}"))
            .send()
            .await
            .expect("the node answers instead of dropping the connection");
        assert_eq!(response.status(), 400, "{since}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().starts_with("since: "),
            "{since}: {body}"
        );
    }
    let response = client()
        .get(format!("{base}/api/v1/usage?since=24000h"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    // No rows at 1 ms after the epoch are within 24,000 hours.
    assert_eq!(body["totals"]["calls"], 0, "{body}");
    let all: Value = client()
        .get(format!("{base}/api/v1/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["totals"]["calls"], 3, "{all}");
    assert_eq!(all["totals"]["input_tokens"], u64::MAX, "saturated: {all}");
    assert_eq!(
        all["totals"]["output_tokens"],
        (1u64 << 53) + 2,
        "exact: {all}"
    );
    store.close().await;
}
