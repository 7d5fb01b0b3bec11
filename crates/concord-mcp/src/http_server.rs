//! The downstream streamable HTTP endpoint (`/mcp`), with the edge checks rmcp provides
//! (Host and Origin validation against DNS rebinding, the body limit) configured from the node.

use std::sync::Arc;

use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::Gateway;

/// Host names that always reach a loopback listener.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Browser origins served from this machine; anything else must be allowed explicitly.
const LOOPBACK_ORIGINS: [&str; 6] = [
    "http://localhost:*",
    "http://127.0.0.1:*",
    "http://[::1]:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
    "https://[::1]:*",
];

/// The edge settings of the MCP endpoint.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Extra `Host` values (with or without port) accepted besides loopback names.
    pub allowed_hosts: Vec<String>,
    /// Extra browser origins accepted besides loopback origins.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
}

impl Gateway {
    /// An axum router serving MCP streamable HTTP at `path`.
    pub fn http_router(
        &self,
        path: &str,
        edge: &EdgeOptions,
        shutdown: CancellationToken,
    ) -> axum::Router {
        let hosts: Vec<String> = LOOPBACK_HOSTS
            .iter()
            .map(|h| h.to_string())
            .chain(edge.allowed_hosts.iter().cloned())
            .collect();
        let origins: Vec<String> = LOOPBACK_ORIGINS
            .iter()
            .map(|o| o.to_string())
            .chain(edge.allowed_origins.iter().cloned())
            .collect();
        let config = StreamableHttpServerConfig::default()
            .with_allowed_hosts(hosts)
            .with_allowed_origins(origins)
            .with_max_request_body_bytes(edge.max_body_bytes)
            .with_cancellation_token(shutdown);
        let shared = self.shared.clone();
        let service = StreamableHttpService::new(
            move || Ok(shared.new_session()),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        axum::Router::new().route_service(path, service)
    }
}
