//! The legacy HTTP+SSE client transport (MCP 2024-11-05), which rmcp no longer ships: a GET
//! opens an event stream whose first `endpoint` event names the URL to POST messages to, and
//! every server message arrives as a `message` event on that stream.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use rmcp::RoleClient;
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use sse_stream::SseStream;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SseError {
    #[error("POST to {url} failed: {reason}")]
    Post { url: String, reason: String },
}

pub(crate) struct SseClientTransport {
    client: reqwest::Client,
    endpoint: url::Url,
    headers: http::HeaderMap,
    incoming: mpsc::Receiver<RxJsonRpcMessage<RoleClient>>,
    reader: tokio::task::JoinHandle<()>,
}

pub(crate) async fn connect(
    url: &str,
    headers: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<SseClientTransport, String> {
    let base = url::Url::parse(url).map_err(|e| format!("invalid URL {url}: {e}"))?;
    let header_map: http::HeaderMap = crate::http_client::header_map(headers)?
        .into_iter()
        .collect();
    let client = reqwest::Client::builder()
        .redirect(same_origin_redirects())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let response = tokio::time::timeout(
        timeout,
        client
            .get(base.clone())
            .headers(header_map.clone())
            .header(http::header::ACCEPT, "text/event-stream")
            .send(),
    )
    .await
    .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
    .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    if let Some(location) = response
        .headers()
        .get(http::header::LOCATION)
        .filter(|_| response.status().is_redirection())
    {
        return Err(format!(
            "GET {url} answered HTTP {} (a redirect to {location:?}, which is followed only \
             within the configured origin)",
            response.status()
        ));
    }
    if !response.status().is_success() {
        return Err(format!("GET {url} answered HTTP {}", response.status()));
    }
    // Where the stream came from after any redirect (within the origin): the endpoint is
    // relative to it.
    let stream_url = response.url().clone();
    let mut events = SseStream::from_bytes_stream(response.bytes_stream());

    let endpoint = tokio::time::timeout(timeout, async {
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| format!("broken event stream: {e}"))?;
            if event.event.as_deref() == Some("endpoint") {
                let data = event.data.unwrap_or_default();
                return stream_url
                    .join(data.trim())
                    .map_err(|e| format!("invalid endpoint {data:?}: {e}"));
            }
        }
        Err("the event stream ended before naming its endpoint".to_string())
    })
    .await
    .map_err(|_| format!("{url} sent no endpoint event within {timeout:?}"))??;
    // Every POST carries the configured headers (often a credential): only to the origin the
    // operator configured, whatever the stream says.
    if endpoint.origin() != base.origin() {
        return Err(format!(
            "{url} named the endpoint {endpoint}, which is not on its origin: refusing to send it messages"
        ));
    }

    let (tx, incoming) = mpsc::channel(256);
    let reader = tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            if !matches!(event.event.as_deref(), None | Some("message")) {
                continue;
            }
            let Some(data) = event.data else { continue };
            match serde_json::from_str::<RxJsonRpcMessage<RoleClient>>(&data) {
                Ok(message) => {
                    if tx.send(message).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring an unparsable SSE message"),
            }
        }
        // Dropping `tx` ends `receive`, which tells rmcp the connection is gone.
    });

    Ok(SseClientTransport {
        client,
        endpoint,
        headers: header_map,
        incoming,
        reader,
    })
}

/// Redirects are followed within the configured origin only: a redirected request replays the
/// configured headers, and another origin must not receive them.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if !same_origin {
            attempt.stop()
        } else if attempt.previous().len() > 10 {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

impl Transport<RoleClient> for SseClientTransport {
    type Error = SseError;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let request = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .json(&item);
        let url = self.endpoint.to_string();
        async move {
            let response = request.send().await.map_err(|e| SseError::Post {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(SseError::Post {
                    url,
                    reason: format!("HTTP {}", response.status()),
                })
            }
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleClient>>> + Send {
        self.incoming.recv()
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.reader.abort();
        Ok(())
    }
}

impl Drop for SseClientTransport {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
