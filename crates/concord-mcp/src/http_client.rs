//! Streamable HTTP upstream connections.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::stream::BoxStream;
use http::{HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, JsonRpcMessage};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpClientTransportConfig, StreamableHttpError,
    StreamableHttpPostResponse,
};
use sse_stream::Sse;

/// POSTs one connection may have in flight; above rmcp's default of 16 so that a busy gateway
/// multiplexes many callers onto one upstream session instead of queueing them.
const MAX_CONCURRENT_POSTS: usize = 256;

pub(crate) fn header_map(
    headers: &BTreeMap<String, String>,
) -> Result<HashMap<HeaderName, HeaderValue>, String> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|_| format!("invalid value for header {name}"))?;
            Ok((name, value))
        })
        .collect()
}

pub(crate) fn streamable_http(
    url: &str,
    headers: &BTreeMap<String, String>,
) -> Result<StreamableHttpClientTransport<UpstreamHttpClient>, String> {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string())
        .max_concurrent_requests(MAX_CONCURRENT_POSTS)
        .reinit_on_expired_session(true)
        .custom_headers(header_map(headers)?);
    Ok(StreamableHttpClientTransport::with_client(
        UpstreamHttpClient(pooled_client()?),
        config,
    ))
}

/// rmcp's default client keeps no idle connections, so every request to an upstream would pay
/// a TCP (and TLS) handshake. This one keeps them, briefly, and follows no redirects: a
/// redirected POST would replay the session id and custom headers (secrets) to another place.
fn pooled_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The pooled reqwest client, plus one correction of how an upstream's rejected session is
/// read. The specification has a server answer an unknown session id with 404, which rmcp
/// recovers from by initializing a new session and retrying; widely deployed servers (the
/// TypeScript SDK's examples, server-everything) answer 400 with a JSON-RPC error instead,
/// which rmcp hands on as an error without an id that no request ever receives, so the call
/// hangs until its timeout. An id-less error in answer to a request sent within a session can
/// only be about the envelope (the session), never the request, so it is reported as an
/// expired session and takes the same recovery path.
#[derive(Clone)]
pub(crate) struct UpstreamHttpClient(reqwest::Client);

fn rejects_the_session(
    message: &ClientJsonRpcMessage,
    session_id: &Option<Arc<str>>,
    response: &StreamableHttpPostResponse,
) -> bool {
    session_id.is_some()
        && matches!(message, JsonRpcMessage::Request(_))
        && matches!(response, StreamableHttpPostResponse::Json(JsonRpcMessage::Error(error), _) if error.id.is_none())
}

impl StreamableHttpClient for UpstreamHttpClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        let response = self
            .0
            .post_message(
                uri,
                message.clone(),
                session_id.clone(),
                auth_header,
                custom_headers,
            )
            .await?;
        if rejects_the_session(&message, &session_id, &response) {
            return Err(StreamableHttpError::SessionExpired);
        }
        Ok(response)
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        let response = self
            .0
            .post_message_with_max_sse_event_size(
                uri,
                message.clone(),
                session_id.clone(),
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await?;
        if rejects_the_session(&message, &session_id, &response) {
            return Err(StreamableHttpError::SessionExpired);
        }
        Ok(response)
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), StreamableHttpError<Self::Error>> {
        self.0
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        self.0
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        self.0
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::ServerJsonRpcMessage;
    use serde_json::json;

    fn request() -> ClientJsonRpcMessage {
        serde_json::from_value(json!({"jsonrpc": "2.0", "id": 7, "method": "ping"})).unwrap()
    }

    fn error(id: serde_json::Value) -> StreamableHttpPostResponse {
        let message: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "id": id,
            "error": {"code": -32000, "message": "Bad Request: No valid session ID provided"}
        }))
        .unwrap();
        StreamableHttpPostResponse::Json(message, None)
    }

    #[test]
    fn idless_error_to_a_request_in_a_session_means_the_session_is_gone() {
        let session = Some(Arc::<str>::from("s-1"));
        assert!(rejects_the_session(
            &request(),
            &session,
            &error(json!(null))
        ));
        // An error about the request itself carries its id: that is the request's answer.
        assert!(!rejects_the_session(&request(), &session, &error(json!(7))));
        // Without a session there is nothing to expire.
        assert!(!rejects_the_session(&request(), &None, &error(json!(null))));
    }
}
