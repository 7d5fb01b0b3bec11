//! Governance on the node's request paths: authentication of `/mcp` and `/api/v1` (401 with a
//! `WWW-Authenticate` header naming the protected-resource metadata, RFC 9728), the policy
//! engine behind the gateway's access hook and the state writes, the audit trail of every
//! decision, and policy reloads.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use concord_config::Config;
use concord_governance::budgets::{Caller, Ledger, Limits, Ticket};
use concord_governance::limits::RateLimiter;
use concord_governance::{
    Action, AuditLog, AuthError, Authenticator, PolicyEngine, Principal, Reload,
};
use concord_mcp::{AccessControl, AccessRequest, Admission, CallOutcome, Identity, Throttled};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub(crate) const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";
/// The `_meta` key of budget envelopes and reports.
const BUDGET_META: &str = "concord/budget";

/// A principal's standing budget: (key, limits, window, chain deadline).
type StandingBudget = (String, Limits, Option<Duration>, Option<Duration>);

/// Everything governance needs at run time; present only when auth is on.
pub(crate) struct Governance {
    pub authenticator: Authenticator,
    pub policy: Arc<PolicyEngine>,
    pub audit: AuditLog,
    pub settings: concord_config::AuthSettings,
    pub limits: RateLimiter,
    pub audit_settings: concord_config::AuditSettings,
    pub budgets: concord_config::BudgetSettings,
    pub ledger: Ledger,
}

impl Governance {
    pub async fn start(config: &Config, store: concord_store::Store) -> Result<Self, String> {
        let authenticator =
            Authenticator::new(&config.auth, store.clone()).map_err(|e| format!("[auth]: {e}"))?;
        authenticator.prepare().await;
        let policy = PolicyEngine::new(config.policy.rules.clone(), config.policy.file.clone())
            .map_err(|e| format!("[policy]: {e}"))?;
        let audit = AuditLog::start(store);
        tracing::info!(
            rules = policy.rules().len(),
            "authentication on: every request needs a bearer token or API key; policy denies what no rule allows"
        );
        Ok(Self {
            authenticator,
            policy: Arc::new(policy),
            audit,
            settings: config.auth.clone(),
            limits: RateLimiter::new(config.limits.clone()),
            audit_settings: config.audit.clone(),
            budgets: config.budgets.clone(),
            ledger: Ledger::new(config.budgets.warn_at, config.budgets.max_depth),
        })
    }

    /// The standing budget that applies to `identity`: its own, else its first role's that has
    /// one, else the default. Keyed by principal, so each principal spends its own.
    fn standing_budget(&self, identity: &Identity) -> Option<StandingBudget> {
        let configured = self
            .budgets
            .principals
            .get(&identity.principal)
            .or_else(|| {
                identity
                    .roles
                    .iter()
                    .find_map(|role| self.budgets.roles.get(role))
            })
            .or(self.budgets.default.as_ref())?;
        Some((
            identity.principal.clone(),
            Limits {
                tool_calls: configured.tool_calls,
                tokens: configured.tokens,
                cost_usd: configured.cost_usd,
            },
            configured.window,
            configured.deadline,
        ))
    }

    /// Decides (and audits) whether `principal` may write `key` with `operations`.
    pub fn allows_state_write(
        &self,
        principal: &Principal,
        key: &str,
        operations: &[String],
    ) -> bool {
        let namespace = key.split('/').next().unwrap_or_default();
        let action = Action {
            method: "state/write",
            server: "concord",
            name: key,
            arguments: None,
            namespace: Some(namespace),
            operations,
        };
        let decision = self.policy.decide(principal, &action);
        self.audit.record(
            "policy_decision",
            &principal.id,
            with_rule_error(
                json!({
                    "method": "state/write",
                    "key": key,
                    "operations": operations,
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

/// A decision's audit data, plus why its rule failed to evaluate when a deny rule denied on
/// an error (fail closed).
pub(crate) fn with_rule_error(
    mut data: serde_json::Value,
    decision: &concord_governance::Decision,
) -> serde_json::Value {
    if let Some(error) = decision.error() {
        data["rule_error"] = json!(error);
    }
    data
}

pub(crate) fn principal_of(identity: &Identity) -> Principal {
    Principal {
        id: identity.principal.clone(),
        kind: identity.kind.clone(),
        roles: identity.roles.clone(),
        chain: identity.chain.clone(),
        method: identity.method.clone(),
    }
}

fn identity_of(principal: &Principal) -> Identity {
    Identity {
        principal: principal.id.clone(),
        kind: principal.kind.clone(),
        roles: principal.roles.clone(),
        chain: principal.chain.clone(),
        method: principal.method.clone(),
    }
}

/// The gateway's access hook, answered by the policy engine.
pub(crate) struct PolicyAccess(pub Arc<Governance>);

impl AccessControl for PolicyAccess {
    fn spend(
        &self,
        envelope: &serde_json::Value,
        tokens: u64,
        cost_usd: f64,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        let id = envelope.get("id")?.as_str()?;
        self.0.ledger.charge(id, tokens, cost_usd)
    }

    fn allows(&self, identity: Option<&Identity>, request: &AccessRequest<'_>) -> bool {
        // Auth is on whenever this hook is installed: a request without an identity did not
        // come through authentication and gets nothing.
        let Some(identity) = identity else {
            return false;
        };
        let principal = principal_of(identity);
        let action = Action {
            method: request.method,
            server: request.server,
            name: request.name,
            arguments: request.arguments,
            // A state decision sees the key's namespace, as on the REST routes.
            namespace: request
                .method
                .starts_with("state/")
                .then(|| request.name.split('/').next().unwrap_or_default()),
            operations: &[],
        };
        let decision = if request.listing {
            self.0.policy.decide_listing(&principal, &action)
        } else {
            self.0.policy.decide(&principal, &action)
        };
        if !request.listing {
            self.0.audit.record(
                "policy_decision",
                &principal.id,
                with_rule_error(
                    json!({
                        "method": request.method,
                        "server": request.server,
                        "name": request.name,
                        "allowed": decision.allowed(),
                        "rule": decision.rule(),
                        "chain": principal.chain,
                    }),
                    &decision,
                ),
            );
        }
        decision.allowed()
    }

    fn admit(
        &self,
        identity: Option<&Identity>,
        request: &AccessRequest<'_>,
        meta: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Admission, Throttled> {
        let principal = identity.map_or("-", |i| i.principal.as_str());
        if let Err(limited) = self.0.limits.admit(principal, request.name) {
            self.0.audit.record(
                "rate_limited",
                principal,
                json!({"tool": request.name, "scope": limited.scope, "retry_after_ms": limited.retry_after_ms}),
            );
            return Err(Throttled {
                code: concord_mcp::codes::RATE_LIMITED,
                message: format!(
                    "rate limit exceeded ({}); retry after {} ms",
                    limited.scope, limited.retry_after_ms
                ),
                data: Some(json!({"retry_after_ms": limited.retry_after_ms})),
            });
        }
        // The upstream learns who the call is for (for its own decisions and for calls it
        // makes back on the caller's behalf); clients cannot set this key themselves.
        let mut upstream_meta = serde_json::Map::new();
        if let Some(identity) = identity {
            upstream_meta.insert(
                "concord/caller".into(),
                json!({"principal": identity.principal, "kind": identity.kind, "chain": identity.chain}),
            );
        }
        let envelope = meta.get(BUDGET_META);
        let standing = identity.and_then(|i| self.0.standing_budget(i));
        if envelope.is_none() && standing.is_none() {
            return Ok(Admission {
                upstream_meta,
                ..Admission::default()
            });
        }
        let standing_ref = standing
            .as_ref()
            .map(|(key, limits, window, deadline)| (key.as_str(), *limits, *window, *deadline));
        // An envelope named as `parent` must have been issued to this caller (or to one it acts
        // for): the ledger checks the principal and the delegation chain.
        let no_chain = Vec::new();
        let caller = Caller {
            principal,
            chain: identity.map_or(&no_chain, |i| &i.chain),
        };
        match self.0.ledger.begin(caller, standing_ref, envelope) {
            Ok(ticket) => {
                upstream_meta.insert(BUDGET_META.into(), ticket.upstream_envelope.clone());
                Ok(Admission {
                    upstream_meta,
                    time_left: ticket.time_left,
                    ticket: Some(Box::new(ticket)),
                })
            }
            Err(exhausted) => {
                self.0.audit.record(
                    "budget_exhausted",
                    principal,
                    json!({"tool": request.name, "reason": exhausted.message}),
                );
                Err(Throttled {
                    code: concord_mcp::codes::BUDGET_EXHAUSTED,
                    message: format!("budget exhausted: {}", exhausted.message),
                    data: Some(json!({"reason": exhausted.message})),
                })
            }
        }
    }

    fn record(
        &self,
        identity: Option<&Identity>,
        outcome: &CallOutcome<'_>,
        ticket: Option<Box<dyn std::any::Any + Send + Sync>>,
        result_meta: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut data = json!({
            "server": outcome.server,
            "tool": outcome.tool,
            "outcome": outcome.outcome,
            "duration_ms": outcome.duration_ms,
            "request_bytes": outcome.request_bytes,
            "response_bytes": outcome.response_bytes,
        });
        if self.0.audit_settings.record_arguments
            && let Some(arguments) = outcome.arguments
        {
            data["arguments"] = redact(
                &serde_json::Value::Object(arguments.clone()),
                &self.0.audit_settings.redact,
            );
        }
        if let Some(identity) = identity {
            data["chain"] = json!(identity.chain);
        }
        let principal = identity.map_or("-", |i| i.principal.as_str());
        self.0.audit.record("tool_call", principal, data);
        let mut extra = serde_json::Map::new();
        if let Some(ticket) = ticket.and_then(|t| t.downcast::<Ticket>().ok()) {
            let usage = result_meta.and_then(|m| m.get("concord/usage"));
            let settled = self.0.ledger.finish(&ticket, usage);
            if !settled.usage_problems.is_empty() {
                // What the upstream reported was not charged as is (negative, malformed or
                // beyond the per-call maximum): on the record, with what was charged instead.
                tracing::warn!(server = outcome.server, tool = outcome.tool, problems = ?settled.usage_problems, "invalid usage report");
                self.0.audit.record(
                    "budget_usage_invalid",
                    principal,
                    json!({
                        "server": outcome.server,
                        "tool": outcome.tool,
                        "problems": settled.usage_problems,
                    }),
                );
            }
            let report = settled.report;
            if let Some(warning) = report.get("warning") {
                self.0.audit.record(
                    "budget_warning",
                    principal,
                    json!({"tool": outcome.tool, "warning": warning}),
                );
            }
            extra.insert(BUDGET_META.into(), report);
        }
        extra
    }
}

/// Replaces the values of keys that look secret, at any depth.
pub(crate) fn redact(value: &serde_json::Value, secret_words: &[String]) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .map(|(key, v)| {
                    let lower = key.to_ascii_lowercase();
                    if secret_words
                        .iter()
                        .any(|w| lower.contains(&w.to_ascii_lowercase()))
                    {
                        (key.clone(), json!("***"))
                    } else {
                        (key.clone(), redact(v, secret_words))
                    }
                })
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(|v| redact(v, secret_words)).collect())
        }
        other => other.clone(),
    }
}

/// How long an authenticated request waits for room in the audit queue before it is turned
/// away (503): a request whose decisions cannot be recorded does not run.
const AUDIT_ROOM_WAIT: Duration = Duration::from_secs(10);

/// At most `max` bytes of `text`.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Authenticates `request`: the principal goes into its extensions (as `Identity` for the
/// gateway, as `Principal` for the REST API); a refusal is the 401 to answer with.
///
/// Failures are audited as noise: one `auth_failure` entry per (source, route, reason) when
/// first seen in a window, then one with the `count` of the rest at the window's end, so a
/// flood of unauthenticated requests costs a few rows, not one each. An authenticated request
/// waits for room in the audit queue first (backpressure), so the decisions it leads to are
/// recorded rather than dropped.
pub(crate) async fn authenticate_request(
    governance: &Governance,
    request: &mut Request,
) -> Result<Principal, Response> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match governance.authenticator.authenticate(authorization).await {
        Ok(principal) => {
            if !governance.audit.room(AUDIT_ROOM_WAIT).await {
                tracing::warn!(path = %request.uri().path(), "request turned away: the audit trail is behind");
                return Err(audit_behind());
            }
            request.extensions_mut().insert(identity_of(&principal));
            request.extensions_mut().insert(principal.clone());
            Ok(principal)
        }
        Err(error) => {
            let reason = clip(&error.to_string(), 200);
            // The route pattern, not the raw path: a flood over random paths is one event.
            let path = request
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map_or_else(
                    || clip(request.uri().path(), 100),
                    |m| m.as_str().to_string(),
                );
            let source = request
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip().to_string());
            let mut fields = json!({"path": path, "reason": reason});
            if let Some(source) = &source {
                fields["source"] = json!(source);
            }
            let first = governance.audit.record_noise("auth_failure", "-", fields);
            if first {
                tracing::info!(%path, %reason, source = source.as_deref().unwrap_or("-"), "request refused: not authenticated (further refusals alike are counted in the audit trail)");
            } else {
                tracing::debug!(%path, %reason, "request refused: not authenticated");
            }
            Err(unauthorized(request, governance, &error))
        }
    }
}

fn audit_behind() -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {"code": -32000, "message": "the audit trail is behind; retry shortly"},
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn unauthorized(request: &Request, governance: &Governance, error: &AuthError) -> Response {
    let metadata = format!("{}{METADATA_PATH}", base_url(request, governance));
    let mut challenge = format!("Bearer resource_metadata=\"{metadata}\"");
    if !matches!(error, AuthError::Missing) {
        let description = error.to_string().replace(['"', '\\'], "'");
        challenge.push_str(&format!(
            ", error=\"invalid_token\", error_description=\"{description}\""
        ));
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {"code": -32001, "message": format!("unauthorized: {error}")},
        })),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// `http://host:port` as the client addressed this node.
fn base_url(request: &Request, governance: &Governance) -> String {
    if let Some(resource) = &governance.settings.resource
        && let Some((scheme, rest)) = resource.split_once("://")
    {
        let authority = rest.split('/').next().unwrap_or(rest);
        return format!("{scheme}://{authority}");
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// RFC 9728 protected-resource metadata: where a client goes to get a token for this node.
pub(crate) async fn resource_metadata(
    State(governance): State<Arc<Governance>>,
    request: Request,
) -> Response {
    let resource = governance
        .settings
        .resource
        .clone()
        .unwrap_or_else(|| format!("{}/mcp", base_url(&request, &governance)));
    axum::Json(json!({
        "resource": resource,
        "authorization_servers": governance.settings.authorization_servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "Concord",
    }))
    .into_response()
}

/// Reloads the policy file when it changes; a file that does not load leaves the old rules
/// in force and says why (in the log and the audit trail).
pub(crate) async fn watch_policy(governance: Arc<Governance>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match governance.policy.reload_if_changed() {
            Reload::Unchanged => {}
            Reload::Loaded { rules } => {
                tracing::info!(rules, "policy reloaded");
                governance
                    .audit
                    .record("policy_reload", "-", json!({"rules": rules}));
            }
            Reload::Refused { error } => {
                tracing::error!(%error, "policy file refused; the previous policy stays in force");
                governance
                    .audit
                    .record("policy_reload_failed", "-", json!({"error": error}));
            }
        }
    }
}
