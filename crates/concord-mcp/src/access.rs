//! The gateway's side of authorization: who is calling (put on each HTTP request by the node's
//! authentication) and a decision hook the node fills with its policy engine. A tool, prompt or
//! resource the caller may not use is left out of its lists, and asking for it anyway gets the
//! same answer as asking for one that does not exist, so its existence is not revealed.

use rmcp::model::JsonObject;
use rmcp::service::{RequestContext, RoleServer};

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: String,
    /// `user`, `agent` or `service`.
    pub kind: String,
    pub roles: Vec<String>,
    /// On whose behalf, from the origin to the party acting now.
    pub chain: Vec<String>,
    /// How it was proven: `jwt` or `api_key`.
    pub method: String,
}

/// One thing a caller wants to use.
#[derive(Debug, Clone)]
pub struct AccessRequest<'a> {
    /// `tools/call`, `prompts/get` or `resources/read`.
    pub method: &'a str,
    pub server: &'a str,
    /// The tool or prompt name as exposed, or the resource URI.
    pub name: &'a str,
    /// The call's arguments; `None` when deciding what a list shows.
    pub arguments: Option<&'a JsonObject>,
    /// True while filtering a list (nothing is being used yet; not worth an audit entry).
    pub listing: bool,
}

/// A permitted request that may not run now: a rate limit (`code` -32029, with
/// `retry_after_ms` in `data`) or an exhausted budget (-32030).
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    pub code: i32,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

/// What an admitted call carries: `_meta` entries for the upstream request (a child budget
/// envelope), a deadline that caps the upstream timeout, and state the hook wants back in
/// [`AccessControl::record`].
#[derive(Default)]
pub struct Admission {
    pub upstream_meta: JsonObject,
    pub time_left: Option<std::time::Duration>,
    pub ticket: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// How a tool call went, for the audit trail.
#[derive(Debug, Clone)]
pub struct CallOutcome<'a> {
    pub server: &'a str,
    pub tool: &'a str,
    /// `ok`, `tool_error` or `error`.
    pub outcome: &'a str,
    pub duration_ms: u64,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub arguments: Option<&'a JsonObject>,
}

/// Decides whether `identity` may do `request`. Installed by the node when authentication is
/// on; without it everything is allowed (auth off, loopback only).
pub trait AccessControl: Send + Sync + 'static {
    fn allows(&self, identity: Option<&Identity>, request: &AccessRequest<'_>) -> bool;

    /// Called for a permitted tool call before it runs, with the request's `_meta`: `Err`
    /// refuses it for now.
    fn admit(
        &self,
        _identity: Option<&Identity>,
        _request: &AccessRequest<'_>,
        _meta: &JsonObject,
    ) -> Result<Admission, Throttled> {
        Ok(Admission::default())
    }

    /// Charges what a running call spends itself (an agent's model turns) to the budget
    /// envelope the gateway issued for it, at once rather than when it settles; returns what its
    /// budgets have left (`tokens`, `cost_usd`; an absent key is unlimited), or `None` if the
    /// envelope is unknown or closed.
    fn spend(
        &self,
        _envelope: &serde_json::Value,
        _tokens: u64,
        _cost_usd: f64,
    ) -> Option<JsonObject> {
        None
    }

    /// Called after every admitted tool call with its admission's ticket and the result's
    /// `_meta`; returns entries to add to the result's `_meta` (say, what is left of a budget).
    fn record(
        &self,
        _identity: Option<&Identity>,
        _outcome: &CallOutcome<'_>,
        _ticket: Option<Box<dyn std::any::Any + Send + Sync>>,
        _result_meta: Option<&JsonObject>,
    ) -> JsonObject {
        JsonObject::new()
    }
}

/// The identity the node attached to the HTTP request carrying this MCP request (or, for a
/// call the node makes itself, the identity it acts as).
pub(crate) fn identity_of(context: &RequestContext<RoleServer>) -> Option<Identity> {
    context.extensions.get::<Identity>().cloned().or_else(|| {
        context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Identity>())
            .cloned()
    })
}
