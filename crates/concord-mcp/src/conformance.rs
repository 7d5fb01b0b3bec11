//! Concord as the client under test of the official conformance suite's client mode. The
//! suite starts a test server and runs `concord conformance-client URL` with the scenario in
//! `MCP_CONFORMANCE_SCENARIO`. What is tested is the gateway's own upstream client: the test
//! server becomes the single upstream of an in-process gateway, and the scenario's calls go
//! through that gateway from a local client that accepts elicitation with the schema's
//! defaults (SEP-1034), so initialize, calls, elicitation relay and SSE reconnection are all
//! exercised on the path real traffic takes.

use std::collections::BTreeMap;
use std::time::Duration;

use concord_config::{Config, PrefixMode, ServerSpec, TransportSpec};
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, ElicitRequestParams, ElicitResult,
    ElicitationAction, Implementation,
};
use rmcp::service::{RequestContext, RoleClient};
use rmcp::{ClientHandler, ErrorData as McpError, ServiceExt};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::GatewayError;
use crate::gateway::{Gateway, GatewayOptions};
use crate::http_server::EdgeOptions;

/// The local client: it answers elicitation by accepting with every default the schema names.
#[derive(Clone)]
struct AcceptDefaults;

impl ClientHandler for AcceptDefaults {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::builder().enable_elicitation().build(),
            Implementation::new("concord-conformance-client", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let ElicitRequestParams::FormElicitationParams {
            requested_schema, ..
        } = request
        else {
            return Ok(ElicitResult::new(ElicitationAction::Decline));
        };
        let schema = serde_json::to_value(&requested_schema).unwrap_or(Value::Null);
        Ok(ElicitResult::new(ElicitationAction::Accept).with_content(schema_defaults(&schema)))
    }
}

/// `{property: default}` for every property of an object schema that declares a default.
pub(crate) fn schema_defaults(schema: &Value) -> Value {
    let defaults: Map<String, Value> = schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, property)| property.get("default").map(|d| (name.clone(), d.clone())))
        .collect();
    Value::Object(defaults)
}

/// Runs one client scenario against the test server at `url`.
pub async fn run_client(scenario: &str, url: &str) -> Result<(), GatewayError> {
    let config = Config {
        servers: vec![ServerSpec {
            prefix: PrefixMode::Never,
            ..ServerSpec::new(
                "server",
                TransportSpec::StreamableHttp {
                    url: url.to_string(),
                    headers: BTreeMap::new(),
                },
                Duration::from_secs(30),
            )
        }],
        ..Config::default()
    };
    let gateway = Gateway::new(&config, GatewayOptions::default(), Default::default());
    gateway.start();
    gateway.wait_first_attempts(Duration::from_secs(20)).await?;
    if let Some(down) = gateway.status().into_iter().find(|s| s.state != "healthy") {
        gateway.shutdown().await;
        return Err(GatewayError::Startup(format!(
            "the test server did not connect: {}",
            down.reason.unwrap_or_default()
        )));
    }

    let stop = CancellationToken::new();
    let edge = EdgeOptions {
        allowed_hosts: Vec::new(),
        allowed_origins: Vec::new(),
        max_body_bytes: concord_config::DEFAULT_MAX_BODY_BYTES,
    };
    let router = gateway.http_router("/mcp", &edge, stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| GatewayError::Startup(format!("cannot listen: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| GatewayError::Startup(e.to_string()))?;
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await;
    });

    let outcome = drive(scenario, &format!("http://{local}/mcp")).await;
    stop.cancel();
    let _ = server.await;
    gateway.shutdown().await;
    outcome
}

async fn drive(scenario: &str, gateway_url: &str) -> Result<(), GatewayError> {
    let transport = crate::http_client::streamable_http(gateway_url, &BTreeMap::new())
        .map_err(GatewayError::Startup)?;
    let client = AcceptDefaults
        .serve(transport)
        .await
        .map_err(|e| GatewayError::Startup(format!("cannot reach the in-process gateway: {e}")))?;
    let call = |name: &'static str, arguments: Value| {
        let peer = client.peer().clone();
        async move {
            let mut params = CallToolRequestParams::new(name);
            params.arguments = arguments.as_object().cloned();
            peer.call_tool(params)
                .await
                .map_err(|e| GatewayError::Startup(format!("{name} failed: {e}")))
        }
    };
    let result = match scenario {
        // The upstream handshake (initialize, initialized, tools/list) is the whole scenario.
        "initialize" => Ok(()),
        "tools_call" => call("add_numbers", json!({"a": 2, "b": 3})).await.map(drop),
        "elicitation-sep1034-client-defaults" => {
            call("test_client_elicitation_defaults", json!({}))
                .await
                .map(drop)
        }
        "sse-retry" => call("test_reconnection", json!({})).await.map(drop),
        other => Err(GatewayError::Startup(format!(
            "conformance scenario {other:?} is not supported by this client"
        ))),
    };
    let mut client = client;
    let _ = client.close_with_timeout(Duration::from_secs(2)).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_of_every_property_that_has_one() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string", "default": "John Doe"},
            "age": {"type": "integer", "default": 30},
            "free": {"type": "string"}
        }});
        assert_eq!(
            schema_defaults(&schema),
            json!({"name": "John Doe", "age": 30})
        );
        assert_eq!(schema_defaults(&json!({})), json!({}));
    }
}
