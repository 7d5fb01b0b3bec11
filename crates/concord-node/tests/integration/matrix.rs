//! The authorization matrix of every HTTP route, read from the front door's own table
//! (`concord_node::front_door::SURFACES`), so a route added with a row is checked here and a
//! route added without one is refused by the door: every row × {no credentials, a principal no
//! rule allows, a principal allowed exactly that row's policy method}. Plus the edge: a foreign
//! `Host` or `Origin` is refused on every route, auth on or off.

use std::collections::BTreeSet;

use concord_node::front_door::{AGENT_MCP, Access, SURFACES, Surface};
use reqwest::Method;

use super::{TestNode, client};

const AGENT: &str = "helper";

/// A concrete path for a route pattern.
fn concrete(surface: &Surface) -> String {
    if surface.path == AGENT_MCP {
        return format!("/agents/{AGENT}/mcp");
    }
    let path = surface
        .path
        .replace("{*key}", "notes/matrix")
        .replace("{id}", "nothing-here");
    if surface.path == "/api/v1/state/changes" {
        // A feed would stream forever; a bad `since` is answered at once, after the door.
        return format!("{path}?prefix=notes/&since=not-a-number");
    }
    path
}

fn body_for(surface: &Surface) -> Option<String> {
    match (surface.method, surface.access) {
        (_, Access::Mcp) if surface.method == "POST" => Some(
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "matrix", "version": "1"}}})
            .to_string(),
        ),
        ("PUT", _) => Some(r#"{"base_version": 0, "value": 1}"#.into()),
        ("POST", _) => Some("{}".into()),
        _ => None,
    }
}

async fn status_of(node: &TestNode, surface: &Surface, token: Option<&str>) -> u16 {
    let url = format!("http://{}{}", node.node.local_addr(), concrete(surface));
    let method = Method::from_bytes(surface.method.as_bytes()).unwrap();
    let mut request = client()
        .request(method, &url)
        .header("accept", "application/json, text/event-stream");
    if let Some(body) = body_for(surface) {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("node answers");
    response.status().as_u16()
}

fn policy_methods() -> BTreeSet<&'static str> {
    SURFACES
        .iter()
        .filter_map(|s| match s.access {
            Access::Policy(m) | Access::PolicyInHandler(m) => Some(m),
            Access::Public | Access::Mcp => None,
        })
        .collect()
}

/// One rule per policy method, each for its own principal `may-METHOD`.
fn rules() -> String {
    policy_methods()
        .iter()
        .map(|m| {
            let who = m.replace('/', "-");
            format!(
                "[[policy.rules]]\nname = \"{who}\"\neffect = \"allow\"\nwhen = 'principal.id == \"may-{who}\" && method == \"{m}\"'\n"
            )
        })
        .collect()
}

#[tokio::test]
async fn every_route_refuses_strangers_and_unruled_principals_and_admits_its_rule() {
    let extra = format!(
        "[auth]\nenabled = true\n\
         [providers.m]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\
         [agents.{AGENT}]\ninstructions = \"x\"\n{}",
        rules()
    );
    let mut principals = vec!["nobody".to_string()];
    principals.extend(
        policy_methods()
            .iter()
            .map(|m| format!("may-{}", m.replace('/', "-"))),
    );
    let (node, tokens) = TestNode::start_with_keys(&extra, &principals).await;
    let nobody = tokens["nobody"].as_str();
    let mut checked = 0;
    for surface in SURFACES {
        let row = format!("{} {}", surface.method, surface.path);
        let anonymous = status_of(&node, surface, None).await;
        let unruled = status_of(&node, surface, Some(nobody)).await;
        match surface.access {
            Access::Public => {
                assert!(
                    anonymous < 400,
                    "{row}: public, got {anonymous} without credentials"
                );
                assert!(unruled < 400, "{row}: public, got {unruled}");
            }
            Access::Mcp => {
                assert_eq!(anonymous, 401, "{row} without credentials");
                // The HTTP door only authenticates; each MCP method is then decided by the
                // gateway (see the MCP method matrix). Opening a session is plumbing.
                assert!(![401, 403].contains(&unruled), "{row}: {unruled}");
            }
            Access::Policy(method) | Access::PolicyInHandler(method) => {
                assert_eq!(anonymous, 401, "{row} without credentials");
                assert_eq!(unruled, 403, "{row} for a principal no rule allows");
                let allowed = &tokens[&format!("may-{}", method.replace('/', "-"))];
                let admitted = status_of(&node, surface, Some(allowed)).await;
                assert!(
                    ![401, 403].contains(&admitted),
                    "{row} for a principal allowed {method}: {admitted}"
                );
                // Another method's rule does not open this row.
                for other in policy_methods().iter().filter(|m| **m != method) {
                    let token = &tokens[&format!("may-{}", other.replace('/', "-"))];
                    assert_eq!(
                        status_of(&node, surface, Some(token)).await,
                        403,
                        "{row} for a principal allowed only {other}"
                    );
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, SURFACES.len());
}

#[tokio::test]
async fn a_foreign_host_or_origin_is_refused_on_every_route() {
    for auth in [false, true] {
        let extra = if auth { "[auth]\nenabled = true\n" } else { "" };
        let (node, _) = TestNode::start_with_keys(extra, &[]).await;
        for surface in SURFACES.iter().filter(|s| s.path != AGENT_MCP) {
            let url = format!("http://{}{}", node.node.local_addr(), concrete(surface));
            let method = Method::from_bytes(surface.method.as_bytes()).unwrap();
            let mut rebound = client()
                .request(method.clone(), &url)
                .header("host", "rebind.attacker.example");
            let mut cross = client()
                .request(method, &url)
                .header("origin", "http://rebind.attacker.example");
            if let Some(body) = body_for(surface) {
                rebound = rebound
                    .header("content-type", "application/json")
                    .body(body.clone());
                cross = cross.header("content-type", "application/json").body(body);
            }
            let rebound = rebound.send().await.unwrap();
            assert_eq!(
                rebound.status(),
                403,
                "auth {auth}: {} {}",
                surface.method,
                surface.path
            );
            let text = rebound.text().await.unwrap();
            // (A HEAD answer has no body to name it in.)
            assert!(
                surface.method == "HEAD" || text.contains("rebind.attacker.example"),
                "{text}"
            );
            let cross = cross.send().await.unwrap();
            assert_eq!(
                cross.status(),
                403,
                "auth {auth}: {} {} with a foreign origin",
                surface.method,
                surface.path
            );
        }
        // Nothing was written by the refused requests.
        let read = client()
            .get(format!(
                "http://{}/api/v1/state/notes/matrix",
                node.node.local_addr()
            ))
            .send()
            .await
            .unwrap();
        if !auth {
            let entry: serde_json::Value = read.json().await.unwrap();
            assert_eq!(entry["version"], 0, "a refused PUT wrote nothing: {entry}");
        }
    }
}

#[tokio::test]
async fn with_auth_on_readiness_is_bare_and_detail_needs_admin_read() {
    let extra = "[auth]\nenabled = true\n[[policy.rules]]\nname = \"ops\"\neffect = \"allow\"\nwhen = 'principal.id == \"ops\" && method == \"admin/read\"'\n";
    let (node, tokens) = TestNode::start_with_keys(extra, &["ops".into(), "nobody".into()]).await;
    let base = format!("http://{}", node.node.local_addr());
    let ready: serde_json::Value = client()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready, serde_json::json!({"ready": true}));
    for path in ["/metrics", "/api/v1/admin/status"] {
        let url = format!("{base}{path}");
        assert_eq!(
            client().get(&url).send().await.unwrap().status(),
            401,
            "{path}"
        );
        let refused = client()
            .get(&url)
            .bearer_auth(&tokens["nobody"])
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{path}");
        let admitted = client()
            .get(&url)
            .bearer_auth(&tokens["ops"])
            .send()
            .await
            .unwrap();
        assert_eq!(admitted.status(), 200, "{path}");
        assert!(
            admitted.text().await.unwrap().contains("alpha"),
            "{path} names the servers"
        );
    }
}

/// A raw MCP session over HTTP as one principal.
struct Mcp {
    url: String,
    token: String,
    session: String,
    next_id: u64,
}

impl Mcp {
    async fn open(url: &str, token: &str) -> Mcp {
        let init = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "matrix", "version": "1"}}});
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
        let mut mcp = Mcp {
            url: url.to_string(),
            token: token.to_string(),
            session,
            next_id: 1,
        };
        mcp.notify("notifications/initialized").await;
        mcp
    }

    async fn notify(&mut self, method: &str) {
        let body = serde_json::json!({"jsonrpc": "2.0", "method": method});
        let response = self.post(body).await;
        assert_eq!(response.status(), 202);
    }

    async fn post(&self, body: serde_json::Value) -> reqwest::Response {
        client()
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", "2025-11-25")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// The JSON-RPC answer (result or error) to one request.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let body = serde_json::json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params});
        let response = self.post(body).await;
        assert_eq!(response.status(), 200, "{method}");
        super::parse_body(&response.text().await.unwrap())
    }
}

/// A request that exercises each MCP method on the conformance fixture (server `conf`).
fn mcp_request(method: &str) -> serde_json::Value {
    use serde_json::json;
    match method {
        "tools/call" => json!({"name": "conf__test_simple_text", "arguments": {}}),
        "prompts/get" => json!({"name": "conf__test_simple_prompt"}),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            json!({"uri": "test://static-text"})
        }
        "completion/complete" => {
            json!({"ref": {"type": "ref/prompt", "name": "conf__test_prompt_with_arguments"},
            "argument": {"name": "arg1", "value": "a"}})
        }
        "logging/setLevel" => json!({"level": "info"}),
        "tasks/get" | "tasks/cancel" => json!({"taskId": "t"}),
        "tasks/update" => json!({"taskId": "t", "inputResponses": {}}),
        "skills/get" => json!({"uri": "skill://x"}),
        "resources/directory/read" => json!({"uri": "test://"}),
        "initialize" => json!({"protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "matrix", "version": "1"}}),
        _ => json!({}),
    }
}

/// How many of the upstream's items a list answer holds, for list methods. (The gateway's
/// `concord__result_page` is everyone's: it only ever opens the caller's own results.)
fn listed(answer: &serde_json::Value) -> Option<usize> {
    let result = answer.get("result")?;
    ["tools", "prompts", "resources", "resourceTemplates"]
        .iter()
        .find_map(|key| result.get(*key).and_then(|v| v.as_array()))
        .map(|items| {
            items
                .iter()
                .filter(|item| {
                    let name = item["name"].as_str().unwrap_or_default();
                    let uri = item["uri"]
                        .as_str()
                        .or(item["uriTemplate"].as_str())
                        .unwrap_or_default();
                    name.starts_with("conf__") || uri.starts_with("test://")
                })
                .count()
        })
}

#[tokio::test]
async fn every_mcp_method_refuses_unruled_principals_and_admits_its_rule() {
    use concord_mcp::{MCP_METHODS, McpAccess};
    let fixture = concord_testkit::workspace_bin("concord-conformance-fixture");
    let policy_methods: BTreeSet<&str> = MCP_METHODS
        .iter()
        .filter_map(|m| match m.access {
            McpAccess::PerItem(p) | McpAccess::Method(p) => Some(p),
            McpAccess::Session | McpAccess::NotServed => None,
        })
        .collect();
    let mut extra = format!("[servers.conf]\ncommand = {fixture:?}\n[auth]\nenabled = true\n");
    for method in &policy_methods {
        let who = method.replace('/', "-");
        extra.push_str(&format!(
            "[[policy.rules]]\nname = \"{who}\"\neffect = \"allow\"\nwhen = 'principal.id == \"may-{who}\" && method == \"{method}\"'\n"
        ));
    }
    let mut principals = vec!["nobody".to_string()];
    principals.extend(
        policy_methods
            .iter()
            .map(|m| format!("may-{}", m.replace('/', "-"))),
    );
    let (node, tokens) = TestNode::start_with_keys(&extra, &principals).await;
    let url = node.url();
    // Without credentials no MCP method is reached at all.
    let anonymous = client()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let mut nobody = Mcp::open(&url, &tokens["nobody"]).await;
    for row in MCP_METHODS {
        if row.name == "subscriptions/listen" || row.name == "server/discover" {
            // 2026-07-28 methods, checked with that era's client in
            // tests/e2e/test_method_access.py.
            continue;
        }
        let request = mcp_request(row.name);
        let refused = nobody.call(row.name, request.clone()).await;
        match row.access {
            McpAccess::Session => {
                assert!(refused.get("result").is_some(), "{}: {refused}", row.name);
            }
            McpAccess::NotServed => {
                assert_eq!(refused["error"]["code"], -32601, "{}: {refused}", row.name);
            }
            McpAccess::Method(policy) | McpAccess::PerItem(policy) => {
                let who = format!("may-{}", policy.replace('/', "-"));
                let mut allowed = Mcp::open(&url, &tokens[&who]).await;
                let admitted = allowed.call(row.name, request.clone()).await;
                match listed(&refused) {
                    Some(count) => {
                        assert_eq!(
                            count, 0,
                            "{}: a principal no rule allows sees {refused}",
                            row.name
                        );
                        assert!(
                            listed(&admitted).unwrap_or(0) > 0,
                            "{}: {admitted}",
                            row.name
                        );
                    }
                    None => {
                        assert!(
                            refused.get("error").is_some(),
                            "{}: refused gets {refused}",
                            row.name
                        );
                        assert!(
                            admitted.get("result").is_some(),
                            "{} for {who}: {admitted}",
                            row.name
                        );
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_session_answers_only_the_principal_that_opened_it() {
    let extra = "[auth]\nenabled = true\n[[policy.rules]]\nname = \"all\"\neffect = \"allow\"\nwhen = 'method == \"tools/call\"'\n";
    let (node, tokens) =
        TestNode::start_with_keys(extra, &["alice".into(), "mallory".into()]).await;
    let url = node.url();
    let mut alice = Mcp::open(&url, &tokens["alice"]).await;
    let stolen = Mcp {
        url: url.clone(),
        token: tokens["mallory"].clone(),
        session: alice.session.clone(),
        next_id: 100,
    };
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "alpha__echo", "arguments": {"message": "x"}}});
    assert_eq!(
        stolen.post(call.clone()).await.status(),
        404,
        "mallory on alice's session"
    );
    let ending = client()
        .delete(&url)
        .bearer_auth(&tokens["mallory"])
        .header("mcp-session-id", &alice.session)
        .send()
        .await
        .unwrap();
    assert_eq!(ending.status(), 404, "mallory cannot end alice's session");
    let answer = alice
        .call(
            "tools/call",
            serde_json::json!({"name": "alpha__echo", "arguments": {"message": "mine"}}),
        )
        .await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "Echo: mine",
        "{answer}"
    );
}

#[tokio::test]
async fn reading_state_through_mcp_tools_needs_state_read_too() {
    let extra = "[auth]\nenabled = true\n\
        [[policy.rules]]\nname = \"tools\"\neffect = \"allow\"\nwhen = 'method == \"tools/call\"'\n\
        [[policy.rules]]\nname = \"writes\"\neffect = \"allow\"\nwhen = 'method == \"state/write\"'\n\
        [[policy.rules]]\nname = \"reads-but-secret\"\neffect = \"allow\"\nwhen = 'method == \"state/read\" && namespace != \"secret\"'\n";
    let (node, tokens) = TestNode::start_with_keys(extra, &["bob".into()]).await;
    let mut bob = Mcp::open(&node.url(), &tokens["bob"]).await;
    for key in ["secret/plan", "open/plan"] {
        let put = bob
            .call(
                "tools/call",
                serde_json::json!({"name": "concord__state_put",
                "arguments": {"key": key, "base_version": 0, "value": "TOPSECRET"}}),
            )
            .await;
        assert_eq!(put["result"]["isError"], false, "{put}");
    }
    for (tool, field, subject) in [
        ("concord__state_get", "key", "secret/plan"),
        ("concord__state_history", "key", "secret/plan"),
        ("concord__state_list", "prefix", "secret/"),
        ("concord__state_changes", "prefix", "secret/"),
    ] {
        let answer = bob
            .call(
                "tools/call",
                serde_json::json!({"name": tool, "arguments": {field: subject}}),
            )
            .await;
        assert_eq!(answer["result"]["isError"], true, "{tool}: {answer}");
        assert!(
            !answer.to_string().contains("TOPSECRET"),
            "{tool}: {answer}"
        );
        assert!(
            answer.to_string().contains("may not read"),
            "{tool}: {answer}"
        );
    }
    let open = bob
        .call(
            "tools/call",
            serde_json::json!({"name": "concord__state_get", "arguments": {"key": "open/plan"}}),
        )
        .await;
    assert!(open.to_string().contains("TOPSECRET"), "{open}");
}

#[tokio::test]
async fn the_rate_limit_comes_before_the_decision_and_covers_opening_sessions() {
    let extra =
        "[auth]\nenabled = true\n[limits]\nper_principal = { per_second = 0.01, burst = 3 }\n";
    let (node, tokens) =
        TestNode::start_with_keys(extra, &["mallory".into(), "other".into()]).await;
    let usage = format!("http://{}/api/v1/usage", node.node.local_addr());
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = client()
            .get(&usage)
            .bearer_auth(&tokens["mallory"])
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        [403, 403, 403, 429, 429, 429],
        "refusals are rate-limited too"
    );
    // Opening sessions counts against the same limit.
    let url = node.url();
    let mut opened = Vec::new();
    for _ in 0..5 {
        let init = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "flood", "version": "1"}}});
        let response = client()
            .post(&url)
            .bearer_auth(&tokens["other"])
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(init.to_string())
            .send()
            .await
            .unwrap();
        opened.push(response.status().as_u16());
    }
    assert_eq!(opened, [200, 200, 200, 429, 429]);
}

#[tokio::test]
async fn reading_a_state_key_as_a_resource_needs_state_read_too() {
    let extra = "[auth]\nenabled = true\n\
        [[policy.rules]]\nname = \"tools\"\neffect = \"allow\"\nwhen = 'method == \"tools/call\" || method == \"resources/read\" || method == \"state/write\"'\n\
        [[policy.rules]]\nname = \"reads-but-secret\"\neffect = \"allow\"\nwhen = 'method == \"state/read\" && namespace != \"secret\"'\n";
    let (node, tokens) = TestNode::start_with_keys(extra, &["bob".into()]).await;
    let mut bob = Mcp::open(&node.url(), &tokens["bob"]).await;
    for key in ["secret/plan", "open/plan"] {
        let put = bob
            .call(
                "tools/call",
                serde_json::json!({"name": "concord__state_put",
                "arguments": {"key": key, "base_version": 0, "value": "TOPSECRET"}}),
            )
            .await;
        assert_eq!(put["result"]["isError"], false, "{put}");
    }
    let hidden = bob
        .call(
            "resources/read",
            serde_json::json!({"uri": "concord://state/secret/plan"}),
        )
        .await;
    let unknown = bob
        .call(
            "resources/read",
            serde_json::json!({"uri": "file:///no/such/resource"}),
        )
        .await;
    assert!(!hidden.to_string().contains("TOPSECRET"), "{hidden}");
    assert_eq!(
        hidden["error"]["code"], unknown["error"]["code"],
        "{hidden} vs {unknown}"
    );
    let open = bob
        .call(
            "resources/read",
            serde_json::json!({"uri": "concord://state/open/plan"}),
        )
        .await;
    assert!(open.to_string().contains("TOPSECRET"), "{open}");
}
