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
            assert!(text.contains("rebind.attacker.example"), "{text}");
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
