//! Streamable HTTP upstream connections.

use std::collections::{BTreeMap, HashMap};

use http::{HeaderName, HeaderValue};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

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
) -> Result<StreamableHttpClientTransport<reqwest::Client>, String> {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string())
        .max_concurrent_requests(MAX_CONCURRENT_POSTS)
        .reinit_on_expired_session(true)
        .custom_headers(header_map(headers)?);
    Ok(StreamableHttpClientTransport::with_client(
        pooled_client()?,
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
