//! Gateway errors and their one mapping onto JSON-RPC error objects.

use std::time::Duration;

use rmcp::ErrorData as McpError;
use rmcp::model::ErrorCode;
use rmcp::service::ServiceError;
use rmcp::transport::DynamicTransportError;
use rmcp::transport::streamable_http_client::StreamableHttpError;
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
    /// The node is at a configured capacity (`[node] max_sessions`, `max_connections`).
    pub const AT_CAPACITY: i32 = -32031;
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
    /// The server answered, but what it sent cannot be used (too large, not JSON, not a
    /// JSON-RPC message): the request did reach it.
    #[error("server '{server}' sent an unusable answer to {method}: {reason}")]
    BadAnswer {
        server: String,
        method: String,
        reason: String,
    },
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

    /// Converts an rmcp client error from a request to `server` into a gateway error. What it
    /// says is what happened, as far as the transport told: never a Rust type name.
    pub(crate) fn from_service(server: &str, method: &str, error: ServiceError) -> Self {
        let lost = |reason: String| GatewayError::ConnectionLost {
            server: server.to_string(),
            method: method.to_string(),
            reason,
        };
        match error {
            ServiceError::McpError(e) if crate::tap::is_stream_ended(&e) => lost(format!(
                "the server's response stream ended before its answer (it was cut off, or one of its events exceeded {})",
                in_mib(MAX_STREAM_EVENT_BYTES)
            )),
            ServiceError::McpError(e) => GatewayError::Upstream(PeerError(e)),
            ServiceError::Timeout { timeout } => GatewayError::Timeout {
                server: server.to_string(),
                method: method.to_string(),
                timeout,
            },
            ServiceError::TransportClosed => lost(
                "the connection closed before the server answered (the server exited or hung up)"
                    .to_string(),
            ),
            ServiceError::TransportSend(e) => match transport_failure(&e) {
                TransportFailure::BadAnswer(reason) => GatewayError::BadAnswer {
                    server: server.to_string(),
                    method: method.to_string(),
                    reason,
                },
                TransportFailure::Broken(reason) => lost(reason),
            },
            ServiceError::Cancelled { .. } => GatewayError::Cancelled,
            _ => GatewayError::UnexpectedResult {
                server: server.to_string(),
                method: method.to_string(),
            },
        }
    }
}

/// The largest event rmcp's streamable HTTP client reads from a response stream (a fixed
/// limit of the pinned rmcp); a larger one ends the stream.
const MAX_STREAM_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// A size in words: "16 MiB" when it is a whole number of MiB, else bytes.
fn in_mib(bytes: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// What a failure to send a request (or to read the answer of its HTTP POST) means.
enum TransportFailure {
    /// The request reached the server and it answered, unusably.
    BadAnswer(String),
    /// The connection could not carry the request (or its answer).
    Broken(String),
}

/// Reads an rmcp transport error: its own words for what happened, never the transport's Rust
/// type name (which rmcp puts in the error's `Display`).
fn transport_failure(error: &DynamicTransportError) -> TransportFailure {
    let inner: &(dyn std::error::Error + 'static) = error.error.as_ref();
    if let Some(http) = inner.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
        return match http {
            StreamableHttpError::ResponseBodyTooLarge { max_size } => {
                TransportFailure::BadAnswer(format!("the response exceeded {}", in_mib(*max_size)))
            }
            StreamableHttpError::UnexpectedServerResponse(text)
                if text.starts_with("could not parse JSON response") =>
            {
                // rmcp's words: "could not parse JSON response as <type>: <serde error>: <body>".
                let shape = [
                    "did not match",
                    "missing field",
                    "unknown variant",
                    "invalid type",
                ];
                TransportFailure::BadAnswer(if shape.iter().any(|s| text.contains(s)) {
                    "the server sent JSON that is not a JSON-RPC message".to_string()
                } else {
                    "the server sent invalid JSON".to_string()
                })
            }
            StreamableHttpError::Deserialize(_) => {
                TransportFailure::BadAnswer("the server sent invalid JSON".to_string())
            }
            StreamableHttpError::UnexpectedContentType(content_type) => {
                TransportFailure::BadAnswer(format!(
                    "the server answered with content type {}, neither JSON nor an event stream",
                    content_type.as_deref().unwrap_or("(none)")
                ))
            }
            StreamableHttpError::Client(e) => {
                TransportFailure::Broken(format!("the HTTP request failed: {}", chain(e)))
            }
            other => TransportFailure::Broken(chain(other)),
        };
    }
    if let Some(io) = inner.downcast_ref::<std::io::Error>() {
        return TransportFailure::Broken(format!("writing to the server failed: {io}"));
    }
    TransportFailure::Broken(chain(inner))
}

/// An error and its sources, in words (`a: b: c`), without Rust type paths.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        // Many errors repeat their source in their own message.
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    without_type_paths(&text)
}

/// What an rmcp service error says, in words: for messages that go to a peer or a log.
pub(crate) fn describe_service_error(error: &ServiceError) -> String {
    match error {
        ServiceError::McpError(e) => e.message.to_string(),
        ServiceError::TransportSend(e) => match transport_failure(e) {
            TransportFailure::BadAnswer(reason) | TransportFailure::Broken(reason) => reason,
        },
        ServiceError::TransportClosed => "the connection closed".to_string(),
        ServiceError::Timeout { timeout } => format!("no answer within {}", humanize(*timeout)),
        ServiceError::Cancelled { .. } => "cancelled".to_string(),
        other => without_type_paths(&other.to_string()),
    }
}

/// `text` with Rust type paths (`a::b::C<…>`) replaced by "(internal)": a last guard, should a
/// dependency print one in an error message. IPv6 addresses (`[fe80::1]`) are not paths.
pub(crate) fn without_type_paths(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(is_part(chars[i - 1]) || chars[i - 1] == ':');
        if boundary && is_start(chars[i]) {
            // A path: identifiers joined by `::`, each after the first starting like one.
            let mut end = i;
            while end < chars.len() && is_part(chars[end]) {
                end += 1;
            }
            let mut separators = 0;
            let mut looks_typed = chars[i..end]
                .iter()
                .any(|c| c.is_ascii_uppercase() || *c == '_');
            while end + 2 < chars.len()
                && chars[end] == ':'
                && chars[end + 1] == ':'
                && is_start(chars[end + 2])
            {
                separators += 1;
                end += 2;
                let segment = end;
                while end < chars.len() && is_part(chars[end]) {
                    end += 1;
                }
                looks_typed |= chars[segment..end]
                    .iter()
                    .any(|c| c.is_ascii_uppercase() || *c == '_');
            }
            if separators >= 2 || (separators == 1 && looks_typed) {
                // Its generic arguments go with it.
                if end < chars.len() && chars[end] == '<' {
                    let mut depth = 0usize;
                    let mut j = end;
                    while j < chars.len() {
                        match chars[j] {
                            '<' => depth += 1,
                            '>' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    end = (j + 1).min(chars.len());
                }
                out.push_str("(internal)");
            } else {
                out.extend(&chars[i..end]);
            }
            i = end;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
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
            GatewayError::BadAnswer { server, reason, .. } => McpError::internal_error(
                message,
                Some(json!({ "server": server, "reason": reason })),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_paths_are_never_printed() {
        assert_eq!(
            without_type_paths(
                "Transport [concord_mcp::tap::ProgressTap<rmcp::transport::X<a::B>>] error: boom"
            ),
            "Transport [(internal)] error: boom"
        );
        assert_eq!(
            without_type_paths("a std::io::Error and reqwest::Error"),
            "a (internal) and (internal)"
        );
        // Addresses, URLs and words with colons stay.
        for kept in [
            "http://[::1]:8080/mcp",
            "http://[fe80::1]/mcp",
            "http://[2001:db8::abcd]:80/",
            "error: a::b",
            "HTTP 500: Internal Server Error",
        ] {
            assert_eq!(without_type_paths(kept), kept);
        }
    }

    #[test]
    fn sizes_in_words() {
        assert_eq!(in_mib(16 * 1024 * 1024), "16 MiB");
        assert_eq!(in_mib(1000), "1000 bytes");
    }

    #[test]
    fn transport_errors_say_what_happened() {
        let failure = |error: StreamableHttpError<reqwest::Error>| {
            let error = DynamicTransportError::from_parts(
                "concord_mcp::tap::ProgressTap<rmcp::Whatever>",
                std::any::TypeId::of::<()>(),
                Box::new(error),
            );
            GatewayError::from_service("big", "tools/call", ServiceError::TransportSend(error))
                .to_string()
        };
        assert_eq!(
            failure(StreamableHttpError::ResponseBodyTooLarge {
                max_size: 16 * 1024 * 1024
            }),
            "server 'big' sent an unusable answer to tools/call: the response exceeded 16 MiB"
        );
        assert_eq!(
            failure(StreamableHttpError::UnexpectedServerResponse(
                "could not parse JSON response as ServerJsonRpcMessage: expected value at line 1 column 1: garbage".into()
            )),
            "server 'big' sent an unusable answer to tools/call: the server sent invalid JSON"
        );
        let io = DynamicTransportError::from_parts(
            "rmcp::transport::async_rw::AsyncRwTransport<X>",
            std::any::TypeId::of::<()>(),
            Box::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        );
        let said = GatewayError::from_service("s", "tools/call", ServiceError::TransportSend(io))
            .to_string();
        assert_eq!(
            said,
            "the connection to server 's' was lost during tools/call: writing to the server failed: broken pipe"
        );
    }
}
