//! Upstream transports on the wire, through the gateway. Most of it is the legacy HTTP+SSE
//! transport (MCP 2024-11-05) against a small in-test server speaking that format: a GET opens
//! a `text/event-stream` whose `endpoint` event names the URL to POST to; every POST is answered
//! `202 Accepted` and its JSON-RPC answer arrives as a `message` event on the stream. The
//! server misbehaves on request (a refused GET, a late, missing or foreign `endpoint`, a POST
//! answered 500, the stream ended under a call, a restart on the same port) and records every
//! request with its headers, so the tests also check that configured `headers` reach the wire
//! (for streamable HTTP too).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use concord_config::{Config, ServerSpec, TransportSpec};
use concord_mcp::{EdgeOptions, Gateway, GatewayError, GatewayOptions, UpstreamStatus, codes};
use futures::StreamExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleClient, RoleServer, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, ServerHandler, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that must happen before it calls it a hang. Generous:
/// it only decides failure, never success.
const DEADLINE: Duration = Duration::from_secs(60);
/// The upstreams' request timeout: far beyond `DEADLINE`, so a call that fails within the
/// deadline failed for its own reason, not because it timed out.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// One request the fake server received.
#[derive(Clone, Debug)]
struct Seen {
    /// Which start of the server received it (1, then 2 after a restart).
    generation: u64,
    method: Method,
    /// For a POST, the JSON-RPC method (`tools/call:NAME` for a tool call); `None` for a GET
    /// and for a client's responses.
    rpc: Option<String>,
    headers: HeaderMap,
}

/// When (and whether) the stream names the endpoint to POST to.
#[derive(Clone)]
enum EndpointEvent {
    /// As its first event.
    AtOnce,
    /// After a comment and an unrelated event, once the test notifies.
    After(Arc<Notify>),
    /// Never: the stream stays open with a comment only.
    Never,
    /// Never: the stream ends after a comment.
    StreamEnds,
    /// At once, with exactly this `data`.
    Given(String),
}

struct Behaviour {
    get_status: StatusCode,
    /// Sent with `get_status` (a redirect).
    location: Option<String>,
    endpoint: EndpointEvent,
}

/// What the fake legacy server knows; it outlives a restart (the generation counts starts).
struct Legacy {
    behaviour: Mutex<Behaviour>,
    generation: AtomicU64,
    next_session: AtomicU64,
    seen: watch::Sender<Vec<Seen>>,
    /// The open event streams by session id; dropping a sender ends its stream.
    streams: Mutex<HashMap<String, mpsc::UnboundedSender<Bytes>>>,
}

impl Legacy {
    fn new(endpoint: EndpointEvent) -> Arc<Self> {
        Arc::new(Self {
            behaviour: Mutex::new(Behaviour {
                get_status: StatusCode::OK,
                location: None,
                endpoint,
            }),
            generation: AtomicU64::new(0),
            next_session: AtomicU64::new(1),
            seen: watch::Sender::new(Vec::new()),
            streams: Mutex::new(HashMap::new()),
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.borrow().clone()
    }

    /// Waits until what the server received satisfies `done`.
    async fn wait_seen(&self, what: &str, done: impl FnMut(&Vec<Seen>) -> bool) {
        let mut seen = self.seen.subscribe();
        tokio::time::timeout(DEADLINE, seen.wait_for(done))
            .await
            .unwrap_or_else(|_| panic!("the fake server never saw {what}: {:?}", self.seen()))
            .unwrap();
    }

    /// Ends every open event stream, as a server that hangs up does.
    fn end_streams(&self) {
        self.streams.lock().unwrap().clear();
    }

    fn refuse_gets(&self, status: StatusCode) {
        self.behaviour.lock().unwrap().get_status = status;
    }

    fn redirect_gets(&self, to: String) {
        let mut behaviour = self.behaviour.lock().unwrap();
        behaviour.get_status = StatusCode::TEMPORARY_REDIRECT;
        behaviour.location = Some(to);
    }
}

#[derive(Clone)]
struct App {
    legacy: Arc<Legacy>,
    generation: u64,
    stop: CancellationToken,
}

impl App {
    fn record(&self, method: Method, rpc: Option<String>, headers: HeaderMap) {
        let seen = Seen {
            generation: self.generation,
            method,
            rpc,
            headers,
        };
        self.legacy.seen.send_modify(|all| all.push(seen));
    }
}

fn endpoint_event(data: &str) -> Bytes {
    Bytes::from(format!("event: endpoint\ndata: {data}\n\n"))
}

async fn open_stream(State(app): State<App>, headers: HeaderMap) -> Response {
    app.record(Method::GET, None, headers);
    let (status, location, endpoint) = {
        let behaviour = app.legacy.behaviour.lock().unwrap();
        let location = behaviour.location.clone();
        (behaviour.get_status, location, behaviour.endpoint.clone())
    };
    if let Some(location) = location.filter(|_| status.is_redirection()) {
        return (status, [(header::LOCATION, location)]).into_response();
    }
    if !status.is_success() {
        return (status, "refused by the test").into_response();
    }
    let session = app
        .legacy
        .next_session
        .fetch_add(1, Ordering::Relaxed)
        .to_string();
    let path = format!("/messages?sessionId={session}");
    let (tx, rx) = mpsc::unbounded_channel();
    let keep = match endpoint {
        EndpointEvent::AtOnce => {
            let _ = tx.send(endpoint_event(&path));
            true
        }
        EndpointEvent::Given(data) => {
            let _ = tx.send(endpoint_event(&data));
            true
        }
        EndpointEvent::After(release) => {
            let _ = tx.send(Bytes::from_static(b": the endpoint comes later\n\n"));
            let _ = tx.send(Bytes::from_static(b"event: hello\ndata: not yet\n\n"));
            let late = tx.clone();
            tokio::spawn(async move {
                release.notified().await;
                let _ = late.send(endpoint_event(&path));
            });
            true
        }
        EndpointEvent::Never => {
            let _ = tx.send(Bytes::from_static(b": no endpoint will be named\n\n"));
            true
        }
        EndpointEvent::StreamEnds => {
            let _ = tx.send(Bytes::from_static(b": goodbye\n\n"));
            false
        }
    };
    if keep {
        app.legacy.streams.lock().unwrap().insert(session, tx);
    }
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    })
    .take_until(app.stop.clone().cancelled_owned());
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap()
}

fn tools() -> Value {
    let schema = json!({"type": "object"});
    json!({"tools": [
        {"name": "echo", "description": "Echoes `message`, naming the server's start", "inputSchema": schema},
        {"name": "hang", "description": "Never answers", "inputSchema": schema},
        {"name": "reject_post", "description": "Its POST is answered 500", "inputSchema": schema},
    ]})
}

async fn post_message(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let method = message["method"].as_str().map(str::to_string);
    let tool = message["params"]["name"].as_str().unwrap_or_default();
    let rpc = method.as_deref().map(|m| match m {
        "tools/call" => format!("tools/call:{tool}"),
        other => other.to_string(),
    });
    app.record(Method::POST, rpc, headers);
    let stream = query
        .get("sessionId")
        .and_then(|id| app.legacy.streams.lock().unwrap().get(id).cloned());
    let Some(stream) = stream else {
        return (StatusCode::NOT_FOUND, "no such session").into_response();
    };
    // Notifications and the client's own responses need no answer.
    let (Some(method), Some(id)) = (method, message.get("id").cloned()) else {
        return StatusCode::ACCEPTED.into_response();
    };
    let outcome = match method.as_str() {
        "initialize" => Ok(json!({
            "protocolVersion": "2024-11-05",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "legacy-sse", "version": "1.0.0"},
        })),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(tools()),
        "tools/call" => match tool {
            "echo" => {
                let said = message["params"]["arguments"]["message"]
                    .as_str()
                    .unwrap_or_default();
                let text = format!("start {}: {said}", app.generation);
                Ok(json!({"content": [{"type": "text", "text": text}]}))
            }
            "hang" => return StatusCode::ACCEPTED.into_response(),
            "reject_post" => {
                return (StatusCode::INTERNAL_SERVER_ERROR, "refused by the test").into_response();
            }
            other => Err(json!({"code": -32602, "message": format!("no tool {other}")})),
        },
        other => Err(json!({"code": -32601, "message": format!("no method {other}")})),
    };
    let answer = match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
    };
    let _ = stream.send(Bytes::from(format!("event: message\ndata: {answer}\n\n")));
    StatusCode::ACCEPTED.into_response()
}

/// One start of the fake legacy server.
struct LegacyServer {
    legacy: Arc<Legacy>,
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LegacyServer {
    /// Serves `legacy` on `addr` (port 0: any free port).
    async fn start(legacy: Arc<Legacy>, addr: SocketAddr) -> Self {
        let stop = CancellationToken::new();
        let app = App {
            generation: legacy.generation.fetch_add(1, Ordering::Relaxed) + 1,
            legacy: legacy.clone(),
            stop: stop.clone(),
        };
        let router = axum::Router::new()
            .route("/sse", get(open_stream))
            .route(
                "/old-sse",
                get(|| async { (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/sse")]) }),
            )
            .route("/messages", post(post_message))
            .with_state(app);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        Self {
            legacy,
            addr,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/sse", self.addr)
    }

    /// Stops the server and waits until its every connection is closed (the event streams
    /// end), so that the port is free and nothing of this start answers any more.
    async fn stop(self) -> SocketAddr {
        self.stop.cancel();
        self.legacy.end_streams();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the fake server stops")
            .unwrap();
        self.addr
    }
}

async fn serve_legacy(endpoint: EndpointEvent) -> LegacyServer {
    LegacyServer::start(Legacy::new(endpoint), "127.0.0.1:0".parse().unwrap()).await
}

fn sse_upstream(url: String, headers: BTreeMap<String, String>) -> ServerSpec {
    sse_upstream_named("legacy", url, headers)
}

fn sse_upstream_named(name: &str, url: String, headers: BTreeMap<String, String>) -> ServerSpec {
    ServerSpec::new(name, TransportSpec::Sse { url, headers }, REQUEST_TIMEOUT)
}

/// A gateway over `servers`, after every upstream's first connection attempt.
async fn gateway_over(servers: Vec<ServerSpec>, options: GatewayOptions) -> Gateway {
    let gateway = start_gateway(servers, options);
    gateway.wait_first_attempts(DEADLINE).await.unwrap();
    gateway
}

fn start_gateway(servers: Vec<ServerSpec>, options: GatewayOptions) -> Gateway {
    let config = Config {
        servers,
        ..Config::default()
    };
    let gateway = Gateway::new(&config, options, Default::default());
    gateway.start();
    gateway
}

fn status_of(gateway: &Gateway, name: &str) -> UpstreamStatus {
    gateway
        .status()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

/// Polls the upstream's status until `done` holds; fails the test after `DEADLINE`.
async fn wait_status(
    gateway: &Gateway,
    name: &str,
    what: &str,
    done: impl Fn(&UpstreamStatus) -> bool,
) -> UpstreamStatus {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = status_of(gateway, name);
        if done(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never became {what}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn message(text: &str) -> serde_json::Map<String, Value> {
    json!({"message": text}).as_object().unwrap().clone()
}

/// The text of a `tools/call` result as `Gateway::call_tool` returns it.
fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["text"].as_str())
        .collect()
}

/// Calls a tool through the gateway's own API; failing the test on a hang.
async fn call(gateway: &Gateway, name: &str) -> Result<Value, GatewayError> {
    tokio::time::timeout(DEADLINE, gateway.call_tool(name, message("hi")))
        .await
        .unwrap_or_else(|_| panic!("{name} hung"))
}

/// Serves the gateway on loopback, as a node does, and connects an MCP client to it.
async fn client_of(gateway: &Gateway, stop: &CancellationToken) -> RunningService<RoleClient, ()> {
    let edge = EdgeOptions {
        allowed_hosts: vec![],
        allowed_origins: vec![],
        max_body_bytes: 1 << 20,
    };
    let app = gateway.http_router("/mcp", &edge, stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    ().serve(StreamableHttpClientTransport::from_uri(url))
        .await
        .expect("an MCP client connects to the gateway")
}

/// Calls a tool as an MCP client of the gateway; failing the test on a hang.
async fn client_call(
    client: &RunningService<RoleClient, ()>,
    name: &'static str,
) -> Result<CallToolResult, ServiceError> {
    let mut params = CallToolRequestParams::new(name);
    params.arguments = Some(message("hi"));
    tokio::time::timeout(DEADLINE, client.call_tool(params))
        .await
        .unwrap_or_else(|_| panic!("{name} hung"))
}

fn posts<'a>(seen: &'a [Seen], rpc: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.method == Method::POST && s.rpc.as_deref() == Some(rpc))
        .collect()
}

#[tokio::test]
async fn legacy_sse_refused_get_is_a_clear_error() {
    let server = serve_legacy(EndpointEvent::AtOnce).await;
    server.legacy.refuse_gets(StatusCode::SERVICE_UNAVAILABLE);
    let gateway = gateway_over(
        vec![sse_upstream(server.url(), BTreeMap::new())],
        GatewayOptions::default(),
    )
    .await;

    let status = status_of(&gateway, "legacy");
    assert_eq!(status.state, "unhealthy", "{status:?}");
    let reason = status.reason.unwrap();
    assert!(
        reason.contains(&format!("GET {} answered HTTP 503", server.url())),
        "{reason}"
    );
    assert!(
        server.legacy.seen().iter().all(|s| s.method == Method::GET),
        "nothing is POSTed without an endpoint: {:?}",
        server.legacy.seen()
    );
    gateway.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn legacy_sse_late_endpoint_event_still_connects() {
    let release = Arc::new(Notify::new());
    let server = serve_legacy(EndpointEvent::After(release.clone())).await;
    let gateway = start_gateway(
        vec![sse_upstream(server.url(), BTreeMap::new())],
        GatewayOptions::default(),
    );

    // The stream is open but names no endpoint yet: the client can only wait.
    server
        .legacy
        .wait_seen("the GET", |seen| {
            seen.iter().any(|s| s.method == Method::GET)
        })
        .await;
    assert_eq!(status_of(&gateway, "legacy").state, "starting");
    assert!(!gateway.is_ready());

    release.notify_one();
    gateway.wait_first_attempts(DEADLINE).await.unwrap();
    let status = status_of(&gateway, "legacy");
    assert_eq!(status.state, "healthy", "{status:?}");
    assert_eq!(status.tools, 3);
    let answer = call(&gateway, "legacy__echo").await.unwrap();
    assert_eq!(text(&answer), "start 1: hi");
    gateway.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn legacy_sse_missing_endpoint_event_fails_within_the_handshake_timeout() {
    let server = serve_legacy(EndpointEvent::Never).await;
    // A short request timeout: the handshake then gets its floor, 10 s, which bounds the wait
    // for the endpoint event.
    let mut spec = sse_upstream(server.url(), BTreeMap::new());
    spec.request_timeout = Duration::from_secs(1);
    let gateway = gateway_over(vec![spec], GatewayOptions::default()).await;

    let status = status_of(&gateway, "legacy");
    assert_eq!(status.state, "unhealthy", "{status:?}");
    let reason = status.reason.unwrap();
    assert!(
        reason.contains(&format!(
            "{} sent no endpoint event within 10s",
            server.url()
        )),
        "{reason}"
    );
    assert!(posts(&server.legacy.seen(), "initialize").is_empty());
    gateway.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn legacy_sse_stream_ending_before_the_endpoint_is_a_clear_error() {
    let server = serve_legacy(EndpointEvent::StreamEnds).await;
    let gateway = gateway_over(
        vec![sse_upstream(server.url(), BTreeMap::new())],
        GatewayOptions::default(),
    )
    .await;

    let status = status_of(&gateway, "legacy");
    assert_eq!(status.state, "unhealthy", "{status:?}");
    let reason = status.reason.unwrap();
    assert!(
        reason.contains("the event stream ended before naming its endpoint"),
        "{reason}"
    );
    gateway.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn legacy_sse_endpoint_on_another_origin_is_refused() {
    // The configured headers carry a secret; an endpoint elsewhere must not receive them.
    let elsewhere = serve_legacy(EndpointEvent::AtOnce).await;
    let foreign = format!("http://{}/messages?sessionId=1", elsewhere.addr);
    let server = serve_legacy(EndpointEvent::Given(foreign.clone())).await;
    let headers = BTreeMap::from([("Authorization".to_string(), "Bearer s3cret".to_string())]);
    let gateway = gateway_over(
        vec![sse_upstream(server.url(), headers)],
        GatewayOptions::default(),
    )
    .await;

    let status = status_of(&gateway, "legacy");
    assert_eq!(status.state, "unhealthy", "{status:?}");
    let reason = status.reason.unwrap();
    assert!(reason.contains(&foreign), "{reason}");
    assert!(reason.contains("origin"), "{reason}");
    assert!(
        elsewhere.legacy.seen().is_empty(),
        "{:?}",
        elsewhere.legacy.seen()
    );
    gateway.shutdown().await;
    server.stop().await;
    elsewhere.stop().await;
}

#[tokio::test]
async fn legacy_sse_redirects_are_followed_within_the_origin_only() {
    let near = serve_legacy(EndpointEvent::AtOnce).await;
    let elsewhere = serve_legacy(EndpointEvent::AtOnce).await;
    let far = serve_legacy(EndpointEvent::AtOnce).await;
    far.legacy.redirect_gets(elsewhere.url());
    let headers = BTreeMap::from([("Authorization".to_string(), "Bearer s3cret".to_string())]);
    let gateway = gateway_over(
        vec![
            sse_upstream_named(
                "near",
                format!("http://{}/old-sse", near.addr),
                headers.clone(),
            ),
            sse_upstream_named("far", far.url(), headers),
        ],
        GatewayOptions::default(),
    )
    .await;

    // `/old-sse` redirects to `/sse` on the same server: followed.
    let status = status_of(&gateway, "near");
    assert_eq!(status.state, "healthy", "{status:?}");
    let answer = call(&gateway, "near__echo").await.unwrap();
    assert_eq!(text(&answer), "start 1: hi");
    assert!(
        near.legacy
            .seen()
            .iter()
            .all(|s| has_header(&s.headers, "Bearer s3cret")),
        "{:?}",
        near.legacy.seen()
    );

    // A redirect to another origin: not followed, and the headers never get there.
    let status = status_of(&gateway, "far");
    assert_eq!(status.state, "unhealthy", "{status:?}");
    let reason = status.reason.unwrap();
    assert!(reason.contains("answered HTTP 307"), "{reason}");
    assert!(reason.contains(&elsewhere.url()), "{reason}");
    assert!(
        elsewhere.legacy.seen().is_empty(),
        "{:?}",
        elsewhere.legacy.seen()
    );
    gateway.shutdown().await;
    near.stop().await;
    far.stop().await;
    elsewhere.stop().await;
}

#[tokio::test]
async fn legacy_sse_stream_end_fails_calls_in_flight_and_is_reported() {
    let server = serve_legacy(EndpointEvent::AtOnce).await;
    let gateway = gateway_over(
        vec![sse_upstream(server.url(), BTreeMap::new())],
        GatewayOptions::default(),
    )
    .await;
    assert_eq!(status_of(&gateway, "legacy").state, "healthy");
    let stop = CancellationToken::new();
    let client = client_of(&gateway, &stop).await;

    // Two calls the server never answers: one from an MCP client, one through the API.
    let (from_client, from_api) = tokio::join!(client_call(&client, "legacy__hang"), async {
        server
            .legacy
            .wait_seen("the client's call", |seen| {
                posts(seen, "tools/call:hang").len() == 1
            })
            .await;
        let api_call = call(&gateway, "legacy__hang");
        let hang_up = async {
            server
                .legacy
                .wait_seen("both calls", |seen| {
                    posts(seen, "tools/call:hang").len() == 2
                })
                .await;
            // The server hangs up and refuses to be reconnected.
            server.legacy.refuse_gets(StatusCode::SERVICE_UNAVAILABLE);
            server.legacy.end_streams();
        };
        tokio::join!(api_call, hang_up).0
    });

    let error = from_client.expect_err("the call in flight fails");
    let ServiceError::McpError(error) = error else {
        panic!("{error:?}")
    };
    assert_eq!(error.code.0, codes::UPSTREAM_CONNECTION_LOST, "{error:?}");
    assert!(
        error
            .message
            .contains("the connection to server 'legacy' was lost during tools/call"),
        "{error:?}"
    );
    let error = from_api.expect_err("the call in flight fails");
    assert!(
        matches!(error, GatewayError::ConnectionLost { .. }),
        "{error:?}"
    );

    // The connection is reported lost, and stays down while the server refuses it.
    let status = wait_status(&gateway, "legacy", "unhealthy after a restart", |s| {
        s.state == "unhealthy" && s.restarts == 1
    })
    .await;
    assert!(status.reason.is_some(), "{status:?}");

    let _ = client.cancel().await;
    stop.cancel();
    gateway.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn legacy_sse_refused_post_fails_the_call() {
    let server = serve_legacy(EndpointEvent::AtOnce).await;
    let gateway = gateway_over(
        vec![sse_upstream(server.url(), BTreeMap::new())],
        GatewayOptions::default(),
    )
    .await;
    let stop = CancellationToken::new();
    let client = client_of(&gateway, &stop).await;

    let error = call(&gateway, "legacy__reject_post")
        .await
        .expect_err("a POST answered 500 fails the call");
    assert!(error.to_string().contains("HTTP 500"), "{error}");

    let error = client_call(&client, "legacy__reject_post")
        .await
        .expect_err("a POST answered 500 fails the call");
    let ServiceError::McpError(error) = error else {
        panic!("{error:?}")
    };
    assert!(error.message.contains("HTTP 500"), "{error:?}");
    assert!(
        error
            .message
            .contains(&format!("POST to http://{}/messages", server.addr)),
        "{error:?}"
    );

    // One refused message does not break the connection.
    let answer = call(&gateway, "legacy__echo").await.unwrap();
    assert_eq!(text(&answer), "start 1: hi");
    let answer = client_call(&client, "legacy__echo").await.unwrap();
    assert_eq!(
        answer.content[0].as_text().map(|t| t.text.as_str()),
        Some("start 1: hi")
    );
    assert_eq!(
        posts(&server.legacy.seen(), "tools/call:reject_post").len(),
        2
    );

    let _ = client.cancel().await;
    stop.cancel();
    gateway.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn gateway_reconnects_to_a_restarted_legacy_sse_upstream() {
    let server = serve_legacy(EndpointEvent::AtOnce).await;
    let legacy = server.legacy.clone();
    // With no call in flight, the lost stream is noticed by the next health check: make them
    // frequent so the test does not wait out the default interval.
    let options = GatewayOptions {
        health_interval: Duration::from_millis(500),
        ..GatewayOptions::default()
    };
    let gateway = gateway_over(vec![sse_upstream(server.url(), BTreeMap::new())], options).await;
    let answer = call(&gateway, "legacy__echo").await.unwrap();
    assert_eq!(text(&answer), "start 1: hi");

    // The server restarts on the same port.
    let addr = server.stop().await;
    let server = LegacyServer::start(legacy.clone(), addr).await;

    let status = wait_status(&gateway, "legacy", "reconnected", |s| {
        s.state == "healthy" && s.restarts >= 1
    })
    .await;
    assert_eq!(status.tools, 3);
    assert!(
        legacy
            .seen()
            .iter()
            .any(|s| s.generation == 2 && s.method == Method::GET),
        "the gateway opened a new stream: {:?}",
        legacy.seen()
    );
    let answer = call(&gateway, "legacy__echo").await.unwrap();
    assert_eq!(text(&answer), "start 2: hi");
    gateway.shutdown().await;
    server.stop().await;
}

fn has_header(headers: &HeaderMap, authorization: &str) -> bool {
    headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) == Some(authorization.as_bytes())
}

fn has_configured_headers(headers: &HeaderMap) -> bool {
    headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) == Some(b"Bearer t0ken")
        && headers.get("x-tenant").map(|v| v.as_bytes()) == Some(b"blue")
}

fn configured_headers() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("Authorization".to_string(), "Bearer t0ken".to_string()),
        ("X-Tenant".to_string(), "blue".to_string()),
    ])
}

#[tokio::test]
async fn configured_headers_reach_a_legacy_sse_upstream_on_every_request() {
    let server = serve_legacy(EndpointEvent::AtOnce).await;
    let gateway = gateway_over(
        vec![sse_upstream(server.url(), configured_headers())],
        GatewayOptions::default(),
    )
    .await;
    assert_eq!(status_of(&gateway, "legacy").state, "healthy");
    let answer = call(&gateway, "legacy__echo").await.unwrap();
    assert_eq!(text(&answer), "start 1: hi");

    let seen = server.legacy.seen();
    assert!(seen.iter().any(|s| s.method == Method::GET), "{seen:?}");
    for rpc in [
        "initialize",
        "notifications/initialized",
        "tools/list",
        "tools/call:echo",
    ] {
        assert_eq!(posts(&seen, rpc).len(), 1, "{rpc}: {seen:?}");
    }
    for request in &seen {
        assert!(has_configured_headers(&request.headers), "{request:?}");
    }
    gateway.shutdown().await;
    server.stop().await;
}

/// A 2025-era streamable HTTP server with one tool.
#[derive(Clone)]
struct EchoServer;

impl ServerHandler for EchoServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("streamable-echo", "1.0.0"))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "echo",
            "Echoes",
            Arc::new(JsonObject::new()),
        )]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        Ok(CallToolResult::success(vec![ContentBlock::text("echoed")]).into())
    }
}

#[tokio::test]
async fn configured_headers_reach_a_streamable_http_upstream_on_every_request() {
    let stop = CancellationToken::new();
    let service = StreamableHttpService::new(
        || Ok(EchoServer),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_cancellation_token(stop.clone()),
    );
    let (log, _) = watch::channel(Vec::<(Method, HeaderMap)>::new());
    let log = Arc::new(log);
    let recorder = {
        let log = log.clone();
        move |request: Request, next: Next| {
            let log = log.clone();
            async move {
                let entry = (request.method().clone(), request.headers().clone());
                log.send_modify(|all| all.push(entry));
                next.run(request).await
            }
        }
    };
    let app = axum::Router::new()
        .route_service("/mcp", service)
        .layer(axum::middleware::from_fn(recorder));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let shutdown = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });

    let spec = ServerSpec::new(
        "modern",
        TransportSpec::StreamableHttp {
            url,
            headers: configured_headers(),
        },
        REQUEST_TIMEOUT,
    );
    let gateway = gateway_over(vec![spec], GatewayOptions::default()).await;
    assert_eq!(status_of(&gateway, "modern").state, "healthy");
    let answer = call(&gateway, "modern__echo").await.unwrap();
    assert_eq!(text(&answer), "echoed");

    // The client also opens the session's GET stream for what the server sends unasked.
    tokio::time::timeout(
        DEADLINE,
        log.subscribe()
            .wait_for(|seen| seen.iter().any(|(m, _)| *m == Method::GET)),
    )
    .await
    .expect("the GET stream is opened")
    .unwrap();
    // Shutting down ends the session too (a DELETE), which must carry them as well.
    gateway.shutdown().await;
    let seen = log.borrow().clone();
    let posts = seen.iter().filter(|(m, _)| *m == Method::POST).count();
    // initialize, notifications/initialized, tools/list, tools/call.
    assert!(posts >= 4, "{seen:?}");
    for (method, headers) in &seen {
        assert!(has_configured_headers(headers), "{method} {headers:?}");
    }
    stop.cancel();
}
