//! Gateway errors and their one mapping onto JSON-RPC error objects.

use std::time::Duration;

use rmcp::ErrorData as McpError;
use rmcp::model::ErrorCode;
use rmcp::service::ServiceError;
use serde_json::json;

/// JSON-RPC error codes Concord adds in the implementation-defined server range.
pub mod codes {
    /// The upstream that owns the name is not connected or not healthy.
    pub const UPSTREAM_UNAVAILABLE: i32 = -32010;
    /// The upstream did not answer within its request timeout.
    pub const UPSTREAM_TIMEOUT: i32 = -32011;
    /// The connection to the upstream broke while it was serving the request.
    pub const UPSTREAM_CONNECTION_LOST: i32 = -32012;
    /// A rate limit refused the call for now; `data.retry_after_ms` says when to try again.
    pub const RATE_LIMITED: i32 = -32029;
    /// A budget of the call chain (tool calls, tokens, cost, deadline, depth) is used up.
    pub const BUDGET_EXHAUSTED: i32 = -32030;
    /// The policy does not allow this method (or route) to the caller.
    pub const FORBIDDEN: i32 = -32003;
}

/// A JSON-RPC error as a peer sent it: its message, then its code.
#[derive(Debug)]
pub struct PeerError(pub(crate) McpError);

impl PeerError {
    pub fn code(&self) -> i32 {
        self.0.code.0
    }

    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (JSON-RPC error {})", self.0.message, self.0.code.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("unknown tool: {0}")]
    UnknownTool(String),
    #[error(
        "budget exhausted: the call chain's deadline passed while server '{server}' was working; the upstream call was cancelled"
    )]
    DeadlinePassed { server: String },
    #[error("unknown prompt: {0}")]
    UnknownPrompt(String),
    #[error("unknown resource: {0}")]
    UnknownResource(String),
    #[error("server '{server}' is unavailable: {reason}")]
    Unavailable { server: String, reason: String },
    #[error("server '{server}' did not answer {method} within {}", humanize(*timeout))]
    Timeout {
        server: String,
        method: String,
        timeout: Duration,
    },
    #[error("the connection to server '{server}' was lost during {method}: {reason}")]
    ConnectionLost {
        server: String,
        method: String,
        reason: String,
    },
    #[error("server '{server}' answered {method} with an unexpected result")]
    UnexpectedResult { server: String, method: String },
    /// A peer's own JSON-RPC error (an upstream's, or the gateway's answer to the node's own
    /// client), passed through unchanged.
    #[error("{0}")]
    Upstream(PeerError),
    #[error("request cancelled by the client")]
    Cancelled,
    #[error(
        "unknown or expired requestState: the call it belonged to is no longer waiting for input"
    )]
    UnknownRequestState,
    /// The gateway already holds as many calls waiting for a 2026-07-28 client's input as it
    /// keeps; this one was not parked (and its upstream's question was answered with an error).
    #[error(
        "the gateway already holds {limit} calls waiting for input; answer or abandon some first"
    )]
    TooManyParked { limit: usize },
    #[error("{0}")]
    Startup(String),
    /// A call that had been sent failed in a way that leaves its effect unknown, and the tool
    /// is not safe to send again.
    #[error(
        "{cause}; the call may have executed on server '{server}' and was not retried: tool '{tool}' is not marked readOnlyHint or idempotentHint (nor configured retryable)"
    )]
    MayHaveExecuted {
        server: String,
        tool: String,
        cause: Box<GatewayError>,
    },
}

fn humanize(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl GatewayError {
    /// The failure says something is wrong with the replica that served the call (it is
    /// unreachable, hung up, did not answer in time, or failed internally), not with the call:
    /// it counts against the replica's circuit breaker and may send the call to another one.
    pub(crate) fn is_replica_failure(&self) -> bool {
        match self {
            GatewayError::Unavailable { .. }
            | GatewayError::Timeout { .. }
            | GatewayError::ConnectionLost { .. } => true,
            GatewayError::Upstream(e) => e.0.code == rmcp::model::ErrorCode::INTERNAL_ERROR,
            _ => false,
        }
    }

    /// Converts an rmcp client error from a request to `server` into a gateway error.
    pub(crate) fn from_service(server: &str, method: &str, error: ServiceError) -> Self {
        match error {
            ServiceError::McpError(e) => GatewayError::Upstream(PeerError(e)),
            ServiceError::Timeout { timeout } => GatewayError::Timeout {
                server: server.to_string(),
                method: method.to_string(),
                timeout,
            },
            ServiceError::TransportClosed => GatewayError::ConnectionLost {
                server: server.to_string(),
                method: method.to_string(),
                reason:
                    "the connection closed (the server exited or hung up); it is being restarted"
                        .to_string(),
            },
            ServiceError::TransportSend(e) => GatewayError::ConnectionLost {
                server: server.to_string(),
                method: method.to_string(),
                reason: e.to_string(),
            },
            ServiceError::Cancelled { .. } => GatewayError::Cancelled,
            _ => GatewayError::UnexpectedResult {
                server: server.to_string(),
                method: method.to_string(),
            },
        }
    }
}

impl From<GatewayError> for McpError {
    fn from(error: GatewayError) -> Self {
        let message = error.to_string();
        match error {
            GatewayError::UnknownTool(name) | GatewayError::UnknownPrompt(name) => {
                McpError::invalid_params(message, Some(json!({ "name": name })))
            }
            GatewayError::UnknownResource(uri) => {
                McpError::resource_not_found(message, Some(json!({ "uri": uri })))
            }
            GatewayError::Unavailable { server, reason } => McpError::new(
                ErrorCode(codes::UPSTREAM_UNAVAILABLE),
                message,
                Some(json!({ "server": server, "reason": reason })),
            ),
            GatewayError::Timeout {
                server, timeout, ..
            } => McpError::new(
                ErrorCode(codes::UPSTREAM_TIMEOUT),
                message,
                Some(json!({ "server": server, "timeoutMs": timeout.as_millis() as u64 })),
            ),
            GatewayError::DeadlinePassed { server } => McpError::new(
                ErrorCode(codes::BUDGET_EXHAUSTED),
                message,
                Some(json!({ "server": server, "budget": "deadline" })),
            ),
            GatewayError::ConnectionLost { server, .. } => McpError::new(
                ErrorCode(codes::UPSTREAM_CONNECTION_LOST),
                message,
                Some(json!({ "server": server })),
            ),
            GatewayError::UnexpectedResult { server, .. } => {
                McpError::internal_error(message, Some(json!({ "server": server })))
            }
            GatewayError::Upstream(e) => e.0,
            GatewayError::Cancelled => McpError::new(ErrorCode(-32800), message, None),
            GatewayError::UnknownRequestState => McpError::invalid_params(message, None),
            GatewayError::TooManyParked { limit } => McpError::new(
                ErrorCode(codes::RATE_LIMITED),
                message,
                Some(serde_json::json!({ "limit": limit })),
            ),
            GatewayError::Startup(_) => McpError::internal_error(message, None),
            GatewayError::MayHaveExecuted { tool, cause, .. } => {
                let mut inner = McpError::from(*cause);
                let mut data = match inner.data.take() {
                    Some(serde_json::Value::Object(map)) => map,
                    _ => serde_json::Map::new(),
                };
                data.insert("tool".into(), json!(tool));
                data.insert("mayHaveExecuted".into(), json!(true));
                data.insert("retried".into(), json!(false));
                McpError::new(inner.code, message, Some(serde_json::Value::Object(data)))
            }
        }
    }
}
