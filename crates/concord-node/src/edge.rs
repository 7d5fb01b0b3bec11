//! The edge of `/mcp`: every POST body is bounded and checked to be one well-formed JSON-RPC
//! 2.0 message before the MCP layer sees it, so that bad input gets the JSON-RPC error code the
//! specification names (-32700 parse error, -32600 invalid request) instead of a transport
//! error, and never reaches a session.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;

/// What the edge of an MCP endpoint needs: the body limit, and (auth on) the governance that
/// decides the MCP methods the front door admits once per request.
#[derive(Clone)]
pub struct McpEdge {
    pub max_body_bytes: usize,
    pub governance: Option<std::sync::Arc<crate::governance::Governance>>,
}

fn jsonrpc_error(status: StatusCode, id: Value, code: i64, message: String) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Why a body is not one JSON-RPC 2.0 message, with the id to answer when it could be read;
/// for a well-formed request, its method and id.
fn check_message(bytes: &Bytes) -> Result<Option<(String, Value)>, (i64, Value, String)> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| (PARSE_ERROR, Value::Null, format!("Parse error: {e}")))?;
    let object = match value {
        Value::Object(object) => object,
        Value::Array(_) => {
            return Err((
                INVALID_REQUEST,
                Value::Null,
                "Invalid Request: JSON-RPC batches are not supported (MCP 2025-06-18 and later send one message per request)".into(),
            ));
        }
        _ => {
            return Err((
                INVALID_REQUEST,
                Value::Null,
                "Invalid Request: expected a JSON-RPC message object".into(),
            ));
        }
    };
    let id = object.get("id").cloned().unwrap_or(Value::Null);
    let answer_id = if matches!(id, Value::String(_) | Value::Number(_)) {
        id.clone()
    } else {
        Value::Null
    };
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((
            INVALID_REQUEST,
            answer_id,
            format!(
                "Invalid Request: \"jsonrpc\" must be \"2.0\", got {}",
                object
                    .get("jsonrpc")
                    .map_or("nothing".to_string(), Value::to_string)
            ),
        ));
    }
    if object.contains_key("id") && !matches!(id, Value::String(_) | Value::Number(_)) {
        return Err((
            INVALID_REQUEST,
            Value::Null,
            format!("Invalid Request: \"id\" must be a string or a number, got {id}"),
        ));
    }
    let method = match object.get("method") {
        Some(Value::String(method)) => Some(method.clone()),
        Some(other) => {
            return Err((
                INVALID_REQUEST,
                answer_id,
                format!("Invalid Request: \"method\" must be a string, got {other}"),
            ));
        }
        None => {
            let is_response = object.contains_key("id")
                && (object.contains_key("result") || object.contains_key("error"));
            if !is_response {
                return Err((
                    INVALID_REQUEST,
                    answer_id,
                    "Invalid Request: a message needs \"method\" (request or notification) or \"result\"/\"error\" (response)".into(),
                ));
            }
            None
        }
    };
    if let Some(params) = object.get("params")
        && !matches!(params, Value::Object(_) | Value::Array(_))
    {
        return Err((
            INVALID_REQUEST,
            answer_id,
            "Invalid Request: \"params\" must be an object".into(),
        ));
    }
    Ok(method.map(|m| (m, answer_id)))
}

pub async fn jsonrpc_edge(State(edge): State<McpEdge>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, edge.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return jsonrpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                Value::Null,
                INVALID_REQUEST,
                format!(
                    "Invalid Request: the body exceeds the limit of {} bytes",
                    edge.max_body_bytes
                ),
            );
        }
    };
    let request_method = match check_message(&bytes) {
        Ok(method) => method,
        Err((code, id, message)) => {
            tracing::debug!(code, %message, "rejected a malformed JSON-RPC body");
            return jsonrpc_error(StatusCode::BAD_REQUEST, id, code, message);
        }
    };
    // MCP methods decided once per request (`McpAccess::Method` rows) are decided here, before
    // rmcp sees the request: rmcp acknowledges a `subscriptions/listen` stream before the
    // handler runs, so a refusal there would come after the acknowledgement.
    // Opening a session costs the node memory for minutes: it counts against the principal's
    // rate limit like any request the door limits.
    if let (Some(governance), Some((method, _))) = (&edge.governance, &request_method)
        && method == "initialize"
        && let Some(principal) = parts.extensions.get::<concord_governance::Principal>()
        && let Err(limited) = governance.limits.admit(&principal.id, "initialize")
    {
        return crate::front_door::rate_limited(governance, &principal.id, "initialize", &limited);
    }
    if let (Some(governance), Some((method, id))) = (&edge.governance, &request_method)
        && let concord_mcp::McpAccess::Method(policy_method) =
            concord_mcp::methods::access_of(method)
    {
        let Some(principal) = parts.extensions.get::<concord_governance::Principal>() else {
            return jsonrpc_error(
                StatusCode::UNAUTHORIZED,
                id.clone(),
                -32001,
                "unauthorized".into(),
            );
        };
        if !governance.decide_route(principal, policy_method, method, None) {
            return jsonrpc_error(
                StatusCode::OK,
                id.clone(),
                concord_mcp::codes::FORBIDDEN.into(),
                format!("forbidden: the policy does not allow {policy_method}"),
            );
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
#[path = "edge_proptests.rs"]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Option<(String, Value)>, (i64, Value, String)> {
        check_message(&Bytes::from(text.to_string()))
    }

    #[test]
    fn accepts_requests_notifications_and_responses() {
        assert_eq!(
            check(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            Ok(Some(("ping".to_string(), json!(1))))
        );
        assert!(check(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).is_ok());
        assert!(check(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#).is_ok());
    }

    #[test]
    fn classifies_bad_messages() {
        assert_eq!(check("{oops").unwrap_err().0, PARSE_ERROR);
        assert_eq!(check("[]").unwrap_err().0, INVALID_REQUEST);
        assert_eq!(check("42").unwrap_err().0, INVALID_REQUEST);
        let (code, id, message) = check(r#"{"jsonrpc":"1.0","id":7,"method":"ping"}"#).unwrap_err();
        assert_eq!((code, id), (INVALID_REQUEST, json!(7)));
        assert!(message.contains("\"2.0\""));
        assert_eq!(
            check(r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#)
                .unwrap_err()
                .0,
            INVALID_REQUEST
        );
        assert_eq!(
            check(r#"{"jsonrpc":"2.0","id":1,"method":5}"#)
                .unwrap_err()
                .0,
            INVALID_REQUEST
        );
        assert_eq!(
            check(r#"{"jsonrpc":"2.0","id":1}"#).unwrap_err().0,
            INVALID_REQUEST
        );
        assert_eq!(
            check(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":3}"#)
                .unwrap_err()
                .0,
            INVALID_REQUEST
        );
    }
}
