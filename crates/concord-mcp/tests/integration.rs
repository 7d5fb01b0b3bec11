//! Both protocol eras through the gateway, with rmcp on both ends: a 2026-07-28-only upstream
//! (no `initialize`, no sessions; sampling through `input_required`) beside a 2025-11-25
//! stdio upstream (the testkit fixture), used at the same time by rmcp's discover-mode client
//! and by a 2025-11-25 client.

// Sampling and logging are deprecated for 2026-07-28 servers (SEP-2577) but are what this test
// relays between the eras.
#![allow(deprecated)]

/// Stdio upstreams that misbehave: stderr abuse and crash loops.
mod abuse;
/// Hostile HTTP upstreams: forged `concord/` metadata, sampling floods, unusable answers.
mod forged;
/// Hostile peers: a client that never reads its event stream, an upstream flooding list changes.
mod hostile;
/// The legacy HTTP+SSE upstream transport, and configured headers on the wire.
mod legacy_sse;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_config::{Config, ServerSpec, TransportSpec};
use concord_mcp::{EdgeOptions, Gateway, GatewayOptions};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ContentBlock, CreateMessageRequest, CreateMessageRequestParams, CreateMessageResult,
    Implementation, InputRequest, InputRequiredResult, JsonObject, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, Resource, ResourceContents,
    ResourceUpdatedNotificationParam, SamplingMessage, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, SubscriptionFilter, Tool, UnsubscribeRequestParams,
};
use rmcp::service::{
    ClientLifecycleMode, ClientServiceExt, RequestContext, RoleClient, RoleServer,
    SubscriptionContext, SubscriptionSink,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ClientHandler, ErrorData as McpError, ServerHandler, ServiceExt};
use tokio_util::sync::CancellationToken;

const CLOCK: &str = "modern://clock";

/// The open `subscriptions/listen` streams that name resources, by stream.
#[derive(Default)]
struct ModernState {
    next_listener: AtomicU64,
    listeners: Mutex<HashMap<u64, (SubscriptionSink, Vec<String>)>>,
}

/// A server of the 2026-07-28 era only. Its `ask` tool needs a sampled answer and gets it the
/// new way: it returns `input_required` and finishes when the retry brings the answer. Its
/// resource `modern://clock` can only be watched through `subscriptions/listen`; `tick`
/// announces an update to every stream that names it, `listeners` counts those streams.
#[derive(Clone, Default)]
struct ModernServer(Arc<ModernState>);

impl ServerHandler for ModernServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new("modern-upstream", "1.0.0"))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(vec![Resource::new(
            CLOCK, "clock",
        )]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        Ok(ReadResourceResult::new(vec![ResourceContents::text("tick", request.uri)]).into())
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.clone())
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let uris = context
            .accepted()
            .resource_subscriptions
            .clone()
            .unwrap_or_default();
        if uris.is_empty() {
            context.cancelled().await;
            return Ok(());
        }
        let id = self.0.next_listener.fetch_add(1, Ordering::Relaxed);
        self.0
            .listeners
            .lock()
            .unwrap()
            .insert(id, (context.sink().clone(), uris));
        context.cancelled().await;
        self.0.listeners.lock().unwrap().remove(&id);
        Ok(())
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Owned(vec![ProtocolVersion::V_2026_07_28])
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let schema = Arc::new(JsonObject::new());
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new("hello", "Greets", schema.clone()),
            Tool::new("ask", "Asks the client's model a question", schema.clone()),
            Tool::new(
                "tick",
                "Announces an update of modern://clock",
                schema.clone(),
            ),
            Tool::new(
                "listeners",
                "Counts the listen streams naming resources",
                schema,
            ),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        match &*request.name {
            "tick" => {
                let sinks: Vec<SubscriptionSink> = self
                    .0
                    .listeners
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|(_, uris)| uris.iter().any(|u| u == CLOCK))
                    .map(|(sink, _)| sink.clone())
                    .collect();
                for sink in &sinks {
                    let _ = sink.notify_resource_updated(CLOCK).await;
                }
                Ok(
                    CallToolResult::success(vec![ContentBlock::text(sinks.len().to_string())])
                        .into(),
                )
            }
            "listeners" => {
                let count = self.0.listeners.lock().unwrap().len();
                Ok(CallToolResult::success(vec![ContentBlock::text(count.to_string())]).into())
            }
            "hello" => {
                Ok(CallToolResult::success(vec![ContentBlock::text("hello from 2026")]).into())
            }
            "ask" => match request
                .input_responses
                .as_ref()
                .and_then(|r| r.get("question"))
            {
                Some(answer) => {
                    let answer: CreateMessageResult = serde_json::from_value(answer.clone())
                        .map_err(|e| McpError::invalid_params(e.to_string(), None))?;
                    let text = serde_json::to_value(&answer.message.content)
                        .ok()
                        .and_then(|v| v["text"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    assert_eq!(request.request_state.as_deref(), Some("upstream-state-1"));
                    Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                        "the model said: {text}"
                    ))])
                    .into())
                }
                None => {
                    let question = CreateMessageRequestParams::new(
                        vec![SamplingMessage::user_text("what is 6 x 7?")],
                        20,
                    );
                    let requests = BTreeMap::from([(
                        "question".to_string(),
                        InputRequest::CreateMessage(CreateMessageRequest::new(question)),
                    )]);
                    Ok(InputRequiredResult::new(
                        Some(requests),
                        Some("upstream-state-1".to_string()),
                    )
                    .into())
                }
            },
            other => Err(McpError::invalid_params(format!("no tool {other}"), None)),
        }
    }
}

async fn serve_modern_upstream(stop: CancellationToken) -> String {
    let server = ModernServer::default();
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_cancellation_token(stop.clone()),
    );
    let app = axum::Router::new().route_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    url
}

/// A node-like front: the gateway over both upstreams, served on loopback.
async fn start_gateway(modern_url: &str, stop: CancellationToken) -> (Gateway, String) {
    let fixture = concord_testkit::workspace_bin("concord-fixture");
    let config = Config {
        servers: vec![
            ServerSpec::new(
                "legacy",
                TransportSpec::Stdio {
                    command: fixture.to_string_lossy().into_owned(),
                    args: vec!["--name".into(), "legacy".into()],
                    env: BTreeMap::new(),
                    cwd: None,
                },
                Duration::from_secs(20),
            ),
            ServerSpec::new(
                "modern",
                TransportSpec::StreamableHttp {
                    url: modern_url.to_string(),
                    headers: BTreeMap::new(),
                },
                Duration::from_secs(20),
            ),
        ],
        ..Config::default()
    };
    let gateway = Gateway::new(&config, GatewayOptions::default(), Default::default());
    gateway.start();
    gateway
        .wait_first_attempts(Duration::from_secs(30))
        .await
        .unwrap();
    for server in gateway.status() {
        assert_eq!(server.state, "healthy", "{server:?}");
    }
    let edge = EdgeOptions {
        allowed_hosts: vec![],
        allowed_origins: vec![],
        max_body_bytes: 1 << 20,
    };
    let app = gateway.http_router("/mcp", &edge, stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    (gateway, url)
}

/// A client that answers sampling with a fixed text, naming itself, and records the resource
/// updates it hears.
#[derive(Clone)]
struct Sampler(&'static str, Arc<Mutex<Vec<String>>>);

impl Sampler {
    fn new(name: &'static str) -> Self {
        Self(name, Arc::default())
    }

    fn updates(&self) -> Vec<String> {
        self.1.lock().unwrap().clone()
    }
}

impl ClientHandler for Sampler {
    fn get_info(&self) -> ClientConfig {
        let mut info = ClientConfig::new(
            ClientCapabilities::builder().enable_sampling().build(),
            Implementation::new(self.0, "1.0.0"),
        );
        info.protocol_version = ProtocolVersion::V_2025_11_25;
        info
    }

    async fn create_message(
        &self,
        _params: CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, McpError> {
        Ok(CreateMessageResult::new(
            SamplingMessage::assistant_text(format!("42, says {}", self.0)),
            "test-model".to_string(),
        ))
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.1.lock().unwrap().push(params.uri);
    }
}

fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("")
}

async fn call(
    client: &rmcp::service::RunningService<RoleClient, Sampler>,
    name: &'static str,
) -> CallToolResult {
    let mut params = CallToolRequestParams::new(name);
    params.arguments = Some(
        serde_json::json!({"message": "hi"})
            .as_object()
            .unwrap()
            .clone(),
    );
    client.call_tool(params).await.unwrap()
}

#[tokio::test]
async fn both_eras_of_client_against_both_eras_of_upstream_at_once() {
    let stop = CancellationToken::new();
    let modern_url = serve_modern_upstream(stop.clone()).await;
    let (gateway, url) = start_gateway(&modern_url, stop.clone()).await;

    let modern_client = Sampler::new("discover-client")
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_uri(url.clone()),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("discover through the gateway");
    let legacy_client = Sampler::new("legacy-client")
        .serve(StreamableHttpClientTransport::from_uri(url.clone()))
        .await
        .expect("initialize through the gateway");

    for client in [&modern_client, &legacy_client] {
        let names: Vec<String> = client
            .peer()
            .list_all_tools()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        assert!(names.contains(&"modern__hello".to_string()), "{names:?}");
        assert!(names.contains(&"legacy__echo".to_string()), "{names:?}");
    }

    let (a, b, c, d) = tokio::join!(
        call(&modern_client, "modern__hello"),
        call(&modern_client, "legacy__echo"),
        call(&legacy_client, "modern__hello"),
        call(&legacy_client, "legacy__echo"),
    );
    assert_eq!(text_of(&a), "hello from 2026");
    assert_eq!(text_of(&b), "Echo: hi");
    assert_eq!(text_of(&c), "hello from 2026");
    assert_eq!(text_of(&d), "Echo: hi");

    // The 2026 upstream needs input. The 2026 client gets `input_required` through the
    // gateway and answers it itself (rmcp's call_tool drives the rounds); the 2025 client gets
    // a sampling request from the gateway, which retries the upstream with the answer.
    let (modern_asks, legacy_asks) = tokio::join!(
        call(&modern_client, "modern__ask"),
        call(&legacy_client, "modern__ask"),
    );
    assert_eq!(
        text_of(&modern_asks),
        "the model said: 42, says discover-client"
    );
    assert_eq!(
        text_of(&legacy_asks),
        "the model said: 42, says legacy-client"
    );

    let status = gateway.status();
    let modern = status.iter().find(|s| s.name == "modern").unwrap();
    assert_eq!(modern.state, "healthy");

    // The 2026 upstream has no resources/subscribe: the gateway watches the URI with one
    // listen stream however many clients subscribe (one per era here), and closes it when the
    // last one leaves.
    legacy_client
        .peer()
        .subscribe(SubscribeRequestParams::new(CLOCK))
        .await
        .expect("subscribe through the gateway");
    let mut listen = modern_client
        .peer()
        .listen(
            SubscriptionFilter::builder()
                .resource_subscription(CLOCK)
                .build(),
        )
        .await
        .expect("listen through the gateway");
    assert_eq!(
        text_of(&call(&legacy_client, "modern__listeners").await),
        "1"
    );
    assert_eq!(text_of(&call(&legacy_client, "modern__tick").await), "1");
    let heard = tokio::time::timeout(Duration::from_secs(10), listen.next())
        .await
        .expect("the update reaches the listening client")
        .unwrap();
    assert!(
        matches!(&heard, Some(rmcp::model::ServerNotification::ResourceUpdatedNotification(n)) if n.params.uri == CLOCK),
        "{heard:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while legacy_client.service().updates().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the update reaches the subscribed client");
    assert_eq!(legacy_client.service().updates(), vec![CLOCK.to_string()]);
    assert!(modern_client.service().updates().is_empty());

    drop(listen);
    legacy_client
        .peer()
        .unsubscribe(UnsubscribeRequestParams::new(CLOCK))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while text_of(&call(&legacy_client, "modern__listeners").await) != "0" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the last subscriber leaving closes the upstream listen stream");

    stop.cancel();
    gateway.shutdown().await;
}
