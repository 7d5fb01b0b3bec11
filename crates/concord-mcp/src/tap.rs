//! A transport wrapper that takes upstream progress notifications out of the message stream in
//! the order they arrive. rmcp hands each notification to its handler on a task of its own, so
//! two progress notifications (or the last progress and the response) can overtake each other;
//! reading them here, before rmcp dispatches, keeps them in wire order and guarantees that every
//! progress sent before a response is queued before that response is delivered. Log messages
//! are offered to the calls in flight the same way (for callers that ask for logs per request)
//! and then passed on.
//!
//! Everything an upstream sends passes here first, so this is also where the gateway's own
//! `_meta` namespace (`concord/…`) is taken out of the upstream's notifications and requests:
//! an upstream cannot speak as the gateway. (Results are cleaned where the call that receives
//! them is finished, which knows whether the server may report usage; see `session.rs`.)

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::OnceLock;

use rmcp::RoleClient;
use rmcp::model::{
    ErrorData, Extensions, GetExtensions, JsonObject, JsonRpcError, JsonRpcMessage,
    JsonRpcNotification, JsonRpcRequest, MetaObject, NotificationMetaObject, RequestMetaObject,
    ServerNotification, ServerRequest,
};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;

use crate::gateway::CallRouter;

/// The `_meta` namespace the gateway owns; what an upstream sends under it is dropped.
pub(crate) const GATEWAY_META_PREFIX: &str = "concord/";

/// Removes the gateway's own keys from a `_meta` map.
pub(crate) fn strip_gateway_keys(meta: &mut JsonObject) {
    meta.retain(|key, _| !key.starts_with(GATEWAY_META_PREFIX));
}

/// The `_meta` rmcp keeps beside a request's or notification's parameters.
fn strip_extensions(extensions: &mut Extensions) {
    if let Some(meta) = extensions.get_mut::<NotificationMetaObject>() {
        strip_gateway_keys(&mut meta.0.0);
    }
    if let Some(meta) = extensions.get_mut::<RequestMetaObject>() {
        strip_gateway_keys(&mut meta.0.0);
    }
    if let Some(meta) = extensions.get_mut::<MetaObject>() {
        strip_gateway_keys(&mut meta.0);
    }
}

fn strip_notification(notification: &mut ServerNotification) {
    strip_extensions(notification.extensions_mut());
    let params_meta = match notification {
        ServerNotification::ProgressNotification(n) => n.params.meta.as_mut(),
        ServerNotification::LoggingMessageNotification(n) => n.params.meta.as_mut(),
        ServerNotification::ResourceUpdatedNotification(n) => n.params.meta.as_mut(),
        _ => None,
    };
    if let Some(meta) = params_meta {
        strip_gateway_keys(&mut meta.0.0);
    }
}

fn strip_request(request: &mut ServerRequest) {
    strip_extensions(request.extensions_mut());
    if let ServerRequest::CreateMessageRequest(r) = request
        && let Some(meta) = r.params.meta.as_mut()
    {
        strip_gateway_keys(&mut meta.0.0);
    }
}

/// rmcp's mark on the error it makes up for a request whose streamable HTTP response stream
/// ended before the response (an event over its size limit ends a stream too). rmcp turns such
/// an error into a bare "transport closed", losing what happened.
const RMCP_STREAM_CLOSED: &str = "io.modelcontextprotocol/transportClosed";
/// The tap's mark on such an error instead, with a token only this process knows (an upstream
/// cannot forge it), so the gateway can say what happened.
const STREAM_ENDED: &str = "concord/streamEnded";

fn stream_ended_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| fastrand::u64(1..))
}

/// Whether `error` is the tap's note that the request's response stream ended before its
/// answer (see [`RMCP_STREAM_CLOSED`]).
pub(crate) fn is_stream_ended(error: &ErrorData) -> bool {
    error
        .data
        .as_ref()
        .and_then(|data| data.get(STREAM_ENDED))
        .and_then(serde_json::Value::as_u64)
        == Some(stream_ended_token())
}

pub(crate) struct ProgressTap<T> {
    inner: T,
    server: Arc<str>,
    router: Arc<CallRouter>,
}

impl<T> ProgressTap<T> {
    pub fn new(inner: T, server: Arc<str>, router: Arc<CallRouter>) -> Self {
        Self {
            inner,
            server,
            router,
        }
    }
}

impl<T: Transport<RoleClient>> Transport<RoleClient> for ProgressTap<T> {
    type Error = T::Error;

    /// What rmcp calls this transport in its errors (by default, the Rust type name).
    fn name() -> Cow<'static, str> {
        "upstream connection".into()
    }

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        loop {
            let message = self.inner.receive().await?;
            match message {
                JsonRpcMessage::Notification(JsonRpcNotification {
                    jsonrpc,
                    mut notification,
                }) => {
                    strip_notification(&mut notification);
                    match notification {
                        ServerNotification::ProgressNotification(progress) => {
                            self.router.push_progress(&self.server, progress.params)
                        }
                        ServerNotification::LoggingMessageNotification(log) => {
                            // Also passed on: clients of the 2025 era hear logs through
                            // `setLevel`.
                            self.router.push_log(&self.server, &log.params);
                            return Some(JsonRpcMessage::Notification(JsonRpcNotification {
                                jsonrpc,
                                notification: ServerNotification::LoggingMessageNotification(log),
                            }));
                        }
                        other => {
                            return Some(JsonRpcMessage::Notification(JsonRpcNotification {
                                jsonrpc,
                                notification: other,
                            }));
                        }
                    }
                }
                JsonRpcMessage::Request(JsonRpcRequest {
                    jsonrpc,
                    id,
                    mut request,
                }) => {
                    strip_request(&mut request);
                    return Some(JsonRpcMessage::Request(JsonRpcRequest {
                        jsonrpc,
                        id,
                        request,
                    }));
                }
                JsonRpcMessage::Error(JsonRpcError {
                    jsonrpc,
                    id: Some(id),
                    mut error,
                }) if error
                    .data
                    .as_ref()
                    .is_some_and(|data| data.get(RMCP_STREAM_CLOSED).is_some()) =>
                {
                    error.data = Some(serde_json::json!({ STREAM_ENDED: stream_ended_token() }));
                    return Some(JsonRpcMessage::Error(JsonRpcError {
                        jsonrpc,
                        id: Some(id),
                        error,
                    }));
                }
                other => return Some(other),
            }
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::ServerJsonRpcMessage;
    use serde_json::json;

    #[test]
    fn the_gateway_namespace_is_taken_out_of_notifications_and_requests() {
        let progress: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 1,
                "_meta": {"concord/cache": "hit", "concord/usage": {"tokens": 1}, "app/x": 1}}
        }))
        .unwrap();
        let JsonRpcMessage::Notification(mut n) = progress else {
            panic!("a notification")
        };
        strip_notification(&mut n.notification);
        let wire = serde_json::to_value(&n).unwrap();
        assert_eq!(wire["params"]["_meta"], json!({"app/x": 1}), "{wire}");

        let sampling: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "id": 3, "method": "sampling/createMessage",
            "params": {"messages": [], "maxTokens": 5,
                "_meta": {"concord/budget": {"id": "forged"}, "traceparent": "t"}}
        }))
        .unwrap();
        let JsonRpcMessage::Request(mut r) = sampling else {
            panic!("a request")
        };
        strip_request(&mut r.request);
        let wire = serde_json::to_value(&r).unwrap();
        assert_eq!(
            wire["params"]["_meta"],
            json!({"traceparent": "t"}),
            "{wire}"
        );
    }

    #[test]
    fn only_the_tap_can_mark_a_stream_as_ended() {
        let forged = ErrorData::internal_error("x", Some(json!({ STREAM_ENDED: 12345 })));
        assert!(!is_stream_ended(&forged) || stream_ended_token() == 12345);
        let marked =
            ErrorData::internal_error("x", Some(json!({ STREAM_ENDED: stream_ended_token() })));
        assert!(is_stream_ended(&marked));
    }
}
