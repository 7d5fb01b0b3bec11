//! Concord as an MCP client of a node: the CLI's `tools` commands and the `connect` stdio
//! bridge. Results cross this boundary as JSON values so that callers never see rmcp types.

use std::collections::BTreeMap;
use std::time::Duration;

use concord_config::{Config, PrefixMode, ServerSpec, TransportSpec};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::{RoleClient, RunningService, ServiceError};
use serde_json::{Map, Value};

use crate::gateway::{Gateway, GatewayOptions};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The node answered with a JSON-RPC error.
    #[error("error {code}: {message}")]
    Rpc {
        code: i32,
        message: String,
        data: Option<Value>,
    },
    #[error("{0}")]
    Other(String),
}

impl From<ServiceError> for ClientError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::McpError(e) => ClientError::Rpc {
                code: e.code.0,
                message: e.message.to_string(),
                data: e.data,
            },
            other => ClientError::Other(other.to_string()),
        }
    }
}

/// A client session with a node's MCP endpoint.
pub struct NodeClient {
    service: RunningService<RoleClient, ClientConfig>,
}

impl NodeClient {
    pub async fn connect(url: &str) -> Result<NodeClient, ClientError> {
        Self::connect_as(url, None).await
    }

    /// Connects presenting `token` (a JWT or an API key) as a bearer token.
    pub async fn connect_as(url: &str, token: Option<&str>) -> Result<NodeClient, ClientError> {
        let transport =
            crate::http_client::streamable_http(url, &bearer_header(token)).map_err(|reason| {
                ClientError::Connect {
                    url: url.to_string(),
                    reason,
                }
            })?;
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("concord-cli", env!("CARGO_PKG_VERSION")),
        );
        let service = tokio::time::timeout(Duration::from_secs(30), info.serve(transport))
            .await
            .map_err(|_| ClientError::Connect {
                url: url.to_string(),
                reason: "no answer to initialize within 30 s".to_string(),
            })?
            .map_err(|e| ClientError::Connect {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        Ok(NodeClient { service })
    }

    /// Every tool the node exposes, as the JSON objects `tools/list` returned.
    pub async fn list_tools(&self) -> Result<Vec<Value>, ClientError> {
        let tools = self.service.peer().list_all_tools().await?;
        tools
            .into_iter()
            .map(|t| serde_json::to_value(t).map_err(|e| ClientError::Other(e.to_string())))
            .collect()
    }

    /// Calls a tool and returns the `tools/call` result object.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, ClientError> {
        let mut params = CallToolRequestParams::new(name.to_string());
        params.arguments = Some(arguments);
        let result = self.service.peer().call_tool(params).await?;
        serde_json::to_value(result).map_err(|e| ClientError::Other(e.to_string()))
    }

    pub async fn close(mut self) {
        let _ = self
            .service
            .close_with_timeout(Duration::from_secs(2))
            .await;
    }
}

/// Serves MCP on this process's stdin/stdout, forwarding everything to the node at `url`, so
/// that stdio-only clients (Claude Desktop and the like) can use a node.
fn bearer_header(token: Option<&str>) -> BTreeMap<String, String> {
    token
        .map(|t| BTreeMap::from([("Authorization".to_string(), format!("Bearer {t}"))]))
        .unwrap_or_default()
}

pub async fn run_stdio_bridge(url: &str, token: Option<&str>) -> Result<(), crate::GatewayError> {
    let config = Config {
        servers: vec![ServerSpec {
            prefix: PrefixMode::Never,
            ..ServerSpec::new(
                "node",
                TransportSpec::StreamableHttp {
                    url: url.to_string(),
                    headers: bearer_header(token),
                },
                Duration::from_secs(600),
            )
        }],
        ..Config::default()
    };
    let gateway = Gateway::new(&config, GatewayOptions::default(), Default::default());
    gateway.start();
    gateway.wait_first_attempts(Duration::from_secs(30)).await?;
    let session = gateway.shared.new_session();
    let result = match session.serve(rmcp::transport::stdio()).await {
        Ok(running) => {
            let _ = running.waiting().await;
            Ok(())
        }
        Err(e) => Err(crate::GatewayError::Startup(format!(
            "stdio session failed: {e}"
        ))),
    };
    gateway.shutdown().await;
    result
}
