//! The front door: the one admission path of every HTTP route of the node. Each request passes,
//! in this order, before any handler work:
//!
//! 1. the edge: `Host` and `Origin` against the allow-list (DNS rebinding), on every route;
//! 2. the route's row in [`SURFACES`]: a route without a row is refused (fail closed), so a
//!    route added without an authorization decision cannot be reached and fails its tests;
//! 3. authentication (when auth is on), except for the few `Public` rows;
//! 4. authorization by the policy engine under the row's method name (`state/read`,
//!    `registry/register`, `admin/read`, …), or for `/mcp` per MCP method by the gateway;
//! 5. the principal's rate limit;
//! 6. audit of every refusal and of every policy decision.
//!
//! The middleware runs as a layer of the whole router, so it sees the route that matched
//! (`MatchedPath`), not just the raw path.

mod hosts;
mod sessions;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use concord_governance::{Action, Principal};
use serde_json::json;

use crate::governance::Governance;
pub(crate) use hosts::HostPolicy;

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who passes the edge: liveness, bare readiness, and the RFC 9728 metadata a
    /// client reads before it has a token.
    Public,
    /// Authenticated here; then every MCP method is authorized by the gateway's own door
    /// (`concord_mcp::method_policy`), which hides what the principal may not use.
    Mcp,
    /// Authenticated and allowed by the policy under this method before the handler runs.
    Policy(&'static str),
    /// Authenticated here; the handler asks the policy under this method, because the
    /// decision needs the body (a state write names its operations).
    PolicyInHandler(&'static str),
}

/// What the policy sees as `name` (and `namespace`) for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// The route's path.
    Path,
    /// What follows the route's fixed prefix (a state key); the namespace is its first segment.
    Tail,
    /// A query parameter (the change feed's `prefix`); the namespace is its first segment.
    Query(&'static str),
    /// The path segment after the route's fixed prefix (a registry id, an agent name).
    Segment,
}

/// One row of the authorization matrix: an HTTP method on a route pattern.
#[derive(Debug, Clone, Copy)]
pub struct Surface {
    pub method: &'static str,
    /// The route as registered with axum (`/api/v1/state/{*key}`).
    pub path: &'static str,
    pub access: Access,
    pub subject: Subject,
}

const fn row(
    method: &'static str,
    path: &'static str,
    access: Access,
    subject: Subject,
) -> Surface {
    Surface {
        method,
        path,
        access,
        subject,
    }
}

/// Every route of the node. `AGENT_MCP` stands for each agent's `/agents/NAME/mcp`.
pub const SURFACES: &[Surface] = &[
    row("GET", "/healthz", Access::Public, Subject::Path),
    row("HEAD", "/healthz", Access::Public, Subject::Path),
    row("GET", "/readyz", Access::Public, Subject::Path),
    row("HEAD", "/readyz", Access::Public, Subject::Path),
    row(
        "GET",
        "/metrics",
        Access::Policy("admin/read"),
        Subject::Path,
    ),
    row(
        "GET",
        "/api/v1/admin/status",
        Access::Policy("admin/read"),
        Subject::Path,
    ),
    row(
        "GET",
        crate::governance::METADATA_PATH,
        Access::Public,
        Subject::Path,
    ),
    row("GET", METADATA_MCP_PATH, Access::Public, Subject::Path),
    row("GET", "/mcp", Access::Mcp, Subject::Path),
    row("POST", "/mcp", Access::Mcp, Subject::Path),
    row("DELETE", "/mcp", Access::Mcp, Subject::Path),
    row("GET", AGENT_MCP, Access::Mcp, Subject::Segment),
    row("POST", AGENT_MCP, Access::Mcp, Subject::Segment),
    row("DELETE", AGENT_MCP, Access::Mcp, Subject::Segment),
    row(
        "GET",
        "/api/v1/state/changes",
        Access::Policy("state/read"),
        Subject::Query("prefix"),
    ),
    row(
        "GET",
        "/api/v1/state/{*key}",
        Access::Policy("state/read"),
        Subject::Tail,
    ),
    row(
        "PUT",
        "/api/v1/state/{*key}",
        Access::PolicyInHandler("state/write"),
        Subject::Tail,
    ),
    row(
        "GET",
        "/api/v1/registry",
        Access::Policy("registry/read"),
        Subject::Path,
    ),
    row(
        "POST",
        "/api/v1/registry",
        Access::Policy("registry/register"),
        Subject::Path,
    ),
    row(
        "GET",
        "/api/v1/registry/resolve",
        Access::Policy("registry/read"),
        Subject::Path,
    ),
    row(
        "POST",
        "/api/v1/registry/{id}/heartbeat",
        Access::Policy("registry/register"),
        Subject::Segment,
    ),
    row(
        "DELETE",
        "/api/v1/registry/{id}",
        Access::Policy("registry/deregister"),
        Subject::Segment,
    ),
    row(
        "GET",
        "/api/v1/usage",
        Access::Policy("usage/read"),
        Subject::Path,
    ),
];

/// The route pattern standing for every agent's own MCP endpoint.
pub const AGENT_MCP: &str = "/agents/{name}/mcp";
const METADATA_MCP_PATH: &str = "/.well-known/oauth-protected-resource/mcp";

/// The row for a matched route and HTTP method. Agents' endpoints are registered one path per
/// agent; they all answer to the `AGENT_MCP` row.
pub fn surface_of(matched: &str, method: &Method) -> Option<&'static Surface> {
    let pattern = if matched.starts_with("/agents/") && matched.ends_with("/mcp") {
        AGENT_MCP
    } else {
        matched
    };
    SURFACES
        .iter()
        .find(|s| s.path == pattern && s.method == method.as_str())
}

/// What the door needs at run time.
#[derive(Clone)]
pub(crate) struct FrontDoor {
    pub hosts: Arc<HostPolicy>,
    pub governance: Option<Arc<Governance>>,
    pub sessions: Arc<sessions::SessionOwners>,
}

fn refusal(status: StatusCode, code: i64, message: String) -> Response {
    (
        status,
        axum::Json(json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {"code": code, "message": message},
        })),
    )
        .into_response()
}

/// The JSON-RPC code of a policy refusal, the same on routes and MCP methods.
const FORBIDDEN: i64 = concord_mcp::codes::FORBIDDEN as i64;

/// The admission path; see the module documentation.
pub(crate) async fn admit(
    State(door): State<FrontDoor>,
    mut request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if let Err(refused) = door.hosts.check(host.as_deref(), origin) {
        tracing::info!(path = %request.uri().path(), %refused, "request refused at the edge");
        return refusal(
            StatusCode::FORBIDDEN,
            FORBIDDEN,
            format!("forbidden: {refused}"),
        );
    }
    let Some(matched) = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
    else {
        // No route matched. Answered here rather than passed on, so that a service mounted
        // without a route pattern (a nested service) can never be reached past the door.
        return refusal(
            StatusCode::NOT_FOUND,
            -32601,
            format!("no such route: {}", request.uri().path()),
        );
    };
    let Some(surface) = surface_of(&matched, request.method()) else {
        tracing::error!(route = %matched, method = %request.method(), "route without a row in the front door's table; refused");
        return refusal(
            StatusCode::FORBIDDEN,
            FORBIDDEN,
            format!(
                "forbidden: {} {matched} has no authorization decision",
                request.method()
            ),
        );
    };
    let Some(governance) = &door.governance else {
        // Auth off: loopback only (the node refuses to listen elsewhere); every surface is
        // open to whoever passed the edge.
        return next.run(request).await;
    };
    if surface.access == Access::Public {
        return next.run(request).await;
    }
    let principal = match crate::governance::authenticate_request(governance, &mut request).await {
        Ok(principal) => principal,
        Err(response) => return response,
    };
    // The rate limit comes before the decision: a principal hammering a route it may not use
    // is slowed down like any other, and does not write an audit row per refusal. (MCP tool
    // calls are limited per tool by the gateway; opening sessions by the edge.)
    if surface.access != Access::Mcp
        && let Err(limited) = governance.limits.admit(&principal.id, surface.path)
    {
        return rate_limited(governance, &principal.id, surface.path, &limited);
    }
    if let Access::Policy(method) = surface.access {
        let (name, namespace) = subject_of(surface, &request);
        if !governance.decide_route(&principal, method, &name, namespace.as_deref()) {
            return refusal(
                StatusCode::FORBIDDEN,
                FORBIDDEN,
                format!(
                    "forbidden: the policy does not allow {method} on {name:?} for {}",
                    principal.id
                ),
            );
        }
    }
    if surface.access == Access::Mcp {
        return mcp_session(&door.sessions, &principal.id, request, next).await;
    }
    next.run(request).await
}

/// The 429 of a principal over its rate limit, audited.
pub(crate) fn rate_limited(
    governance: &Governance,
    principal: &str,
    what: &str,
    limited: &concord_governance::limits::Limited,
) -> Response {
    governance.audit.record(
        "rate_limited",
        principal,
        json!({"route": what, "scope": limited.scope, "retry_after_ms": limited.retry_after_ms}),
    );
    let mut response = refusal(
        StatusCode::TOO_MANY_REQUESTS,
        concord_mcp::codes::RATE_LIMITED.into(),
        format!(
            "rate limit exceeded ({}); retry after {} ms",
            limited.scope, limited.retry_after_ms
        ),
    );
    let seconds = limited.retry_after_ms.div_ceil(1000).max(1);
    if let Ok(value) = seconds.to_string().parse() {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// An MCP request of an authenticated principal: a session it names must be its own, and a
/// session the answer opens becomes its own.
async fn mcp_session(
    owners: &sessions::SessionOwners,
    principal: &str,
    request: Request,
    next: Next,
) -> Response {
    let named = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ending = request.method() == Method::DELETE;
    if let Some(session) = &named
        && owners.check(session, principal) == sessions::SessionCheck::NotYours
    {
        // What rmcp answers for a session it does not know: the client opens a new one.
        return refusal(
            StatusCode::NOT_FOUND,
            -32600,
            "Session not found".to_string(),
        );
    }
    let response = next.run(request).await;
    match named {
        Some(session) if ending && response.status().is_success() => owners.forget(&session),
        Some(_) => {}
        None => {
            if let Some(opened) = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                owners.bind(opened, principal);
            }
        }
    }
    response
}

const SESSION_HEADER: &str = "mcp-session-id";

/// The policy's `name` and `namespace` for a request on `surface`.
fn subject_of(surface: &Surface, request: &Request) -> (String, Option<String>) {
    let path = request.uri().path();
    let fixed = surface.path.split('{').next().unwrap_or_default();
    let decode = |text: &str| percent_decode(text);
    match surface.subject {
        Subject::Path => (path.to_string(), None),
        Subject::Tail => {
            let key = decode(path.strip_prefix(fixed).unwrap_or_default());
            let namespace = key.split('/').next().map(str::to_owned);
            (key, namespace)
        }
        Subject::Segment => {
            let rest = path.strip_prefix(fixed).unwrap_or_default();
            (decode(rest.split('/').next().unwrap_or_default()), None)
        }
        Subject::Query(parameter) => {
            let value = request
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                // Names are decoded as the handler's own query parser decodes them, so
                // `pre%66ix=` is the same parameter here as there.
                .find(|(k, _)| decode(&k.replace('+', " ")) == parameter)
                .map(|(_, v)| decode(&v.replace('+', " ")))
                .unwrap_or_default();
            let namespace = value.split('/').next().map(str::to_owned);
            (value, namespace)
        }
    }
}

/// `%XX` decoding of a path or query component; invalid escapes are kept as written (the
/// handler's own extractor refuses them).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(high * 16 + low);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

impl Governance {
    /// Decides (and audits) a route's method for `principal`.
    pub(crate) fn decide_route(
        &self,
        principal: &Principal,
        method: &str,
        name: &str,
        namespace: Option<&str>,
    ) -> bool {
        let action = Action {
            method,
            server: "concord",
            name,
            arguments: None,
            namespace,
            operations: &[],
        };
        let decision = self.policy.decide(principal, &action);
        self.audit.record(
            "policy_decision",
            &principal.id,
            crate::governance::with_rule_error(
                json!({
                    "method": method,
                    "name": name,
                    "allowed": decision.allowed(),
                    "rule": decision.rule(),
                    "chain": principal.chain,
                }),
                &decision,
            ),
        );
        decision.allowed()
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_unique_and_every_protected_row_names_a_method() {
        for (i, a) in SURFACES.iter().enumerate() {
            for b in &SURFACES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
            if let Access::Policy(m) | Access::PolicyInHandler(m) = a.access {
                assert!(m.contains('/'), "{m}");
            }
        }
    }

    #[test]
    fn agents_endpoints_share_one_row_and_unknown_routes_have_none() {
        let row = surface_of("/agents/reader/mcp", &Method::POST).unwrap();
        assert_eq!(row.path, AGENT_MCP);
        assert!(surface_of("/api/v1/secret", &Method::GET).is_none());
        assert!(surface_of("/api/v1/usage", &Method::DELETE).is_none());
    }

    #[test]
    fn subjects_name_the_key_prefix_or_id() {
        let state = surface_of("/api/v1/state/{*key}", &Method::GET).unwrap();
        let request = Request::builder()
            .uri("/api/v1/state/notes/a%20b")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(
            subject_of(state, &request),
            ("notes/a b".to_string(), Some("notes".to_string()))
        );
        let feed = surface_of("/api/v1/state/changes", &Method::GET).unwrap();
        let request = Request::builder()
            .uri("/api/v1/state/changes?since=3&prefix=tasks%2F")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(
            subject_of(feed, &request),
            ("tasks/".to_string(), Some("tasks".to_string()))
        );
        let encoded_name = Request::builder()
            .uri("/api/v1/state/changes?pre%66ix=secret/")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(
            subject_of(feed, &encoded_name),
            ("secret/".to_string(), Some("secret".to_string()))
        );
        let heartbeat = surface_of("/api/v1/registry/{id}/heartbeat", &Method::POST).unwrap();
        let request = Request::builder()
            .uri("/api/v1/registry/search@1a2b/heartbeat")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(subject_of(heartbeat, &request).0, "search@1a2b");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
