//! Hostile peers of the issue "Hostile peers", each reproduced against a gateway served over
//! loopback HTTP while a legitimate client keeps calling: a client that asks for every log
//! message and never reads its event stream (spoken in raw HTTP bytes over a socket with a tiny
//! receive buffer), and an upstream that floods `notifications/tools/list_changed`. Each test
//! asserts the bound that now holds and that the legitimate client never failed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_config::{Config, ServerSpec, TransportSpec};
use concord_mcp::{EdgeOptions, Gateway, GatewayOptions};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ContentBlock, Implementation, JsonObject, ListPromptsResult, ListToolsResult, LoggingLevel,
    LoggingMessageNotificationParam, PaginatedRequestParams, PingRequest, Prompt, ProtocolVersion,
    ServerCapabilities, ServerConfig, ServerRequest, SetLevelRequestParams, Tool,
};
use rmcp::service::{NotificationContext, Peer, RequestContext, RoleClient, RoleServer};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ClientHandler, ErrorData as McpError, ServerHandler, ServiceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that must happen before it calls it a hang. Generous:
/// it only decides failure, never success.
const DEADLINE: Duration = Duration::from_secs(60);

/// The hostile upstream's state: the session the gateway opened (so the test can make it
/// send), how many `tools/list` it answered and how many ran at once, and a gate that holds
/// `tools/list` answers while it is closed.
#[derive(Default)]
struct UpstreamState {
    peer: Mutex<Option<Peer<RoleServer>>>,
    lists: AtomicU64,
    listing: AtomicUsize,
    most_listing_at_once: AtomicUsize,
    /// The version its tool list is at: it lists `echo` and `vN`.
    version: AtomicU64,
    /// The version its prompt list is at: it lists one prompt, `pN`.
    prompt_version: AtomicU64,
    hold_lists: AtomicBool,
    gate: tokio::sync::Notify,
}

/// An upstream server (rmcp over streamable HTTP) that logs and announces list changes on
/// demand: the test drives it through [`UpstreamState::peer`].
#[derive(Clone, Default)]
struct HostileUpstream(Arc<UpstreamState>);

impl HostileUpstream {
    fn peer(&self) -> Peer<RoleServer> {
        self.0
            .peer
            .lock()
            .unwrap()
            .clone()
            .expect("the gateway initialized its session")
    }
}

impl ServerHandler for HostileUpstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_prompts()
                .enable_prompts_list_changed()
                .enable_logging()
                .build(),
        )
        .with_server_info(Implementation::new("hostile-upstream", "1.0.0"))
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        *self.0.peer.lock().unwrap() = Some(context.peer);
    }

    async fn set_level(
        &self,
        _request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        Ok(())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let state = &self.0;
        let version = state.version.load(Ordering::SeqCst);
        state.lists.fetch_add(1, Ordering::SeqCst);
        let listing = state.listing.fetch_add(1, Ordering::SeqCst) + 1;
        state
            .most_listing_at_once
            .fetch_max(listing, Ordering::SeqCst);
        loop {
            let opened = state.gate.notified();
            if !state.hold_lists.load(Ordering::SeqCst) {
                break;
            }
            opened.await;
        }
        state.listing.fetch_sub(1, Ordering::SeqCst);
        let schema = Arc::new(JsonObject::new());
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new("echo", "Echoes `message`", schema.clone()),
            Tool::new(format!("v{version}"), "Names the list's version", schema),
        ]))
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let version = self.0.prompt_version.load(Ordering::SeqCst);
        Ok(ListPromptsResult::with_all_items(vec![Prompt::new(
            format!("p{version}"),
            Some("Names the list's version"),
            None,
        )]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let message = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("message"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        Ok(CallToolResult::success(vec![ContentBlock::text(format!("Echo: {message}"))]).into())
    }
}

/// Serves the hostile upstream on loopback; returns it with its URL.
async fn serve_upstream(stop: CancellationToken) -> (HostileUpstream, String) {
    let upstream = HostileUpstream::default();
    upstream.0.version.store(1, Ordering::SeqCst);
    upstream.0.prompt_version.store(1, Ordering::SeqCst);
    let server = upstream.clone();
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_cancellation_token(stop.clone()),
    );
    let app = axum::Router::new().route_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    (upstream, url)
}

/// The gateway over the hostile upstream (named `hostile`), served on loopback.
async fn start_gateway(upstream_url: &str, stop: CancellationToken) -> (Gateway, String) {
    let config = Config {
        servers: vec![ServerSpec::new(
            "hostile",
            TransportSpec::StreamableHttp {
                url: upstream_url.to_string(),
                headers: BTreeMap::new(),
            },
            DEADLINE,
        )],
        ..Config::default()
    };
    let gateway = Gateway::new(&config, GatewayOptions::default(), Default::default());
    gateway.start();
    gateway.wait_first_attempts(DEADLINE).await.unwrap();
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

/// A well-behaved 2025-11-25 client that counts the `tools/list_changed` it hears.
#[derive(Clone)]
struct Legitimate(Arc<watch::Sender<u64>>);

impl Legitimate {
    fn new() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl ClientHandler for Legitimate {
    fn get_info(&self) -> ClientConfig {
        let mut info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("legitimate", "1.0.0"),
        );
        info.protocol_version = ProtocolVersion::V_2025_11_25;
        info
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.0.send_modify(|n| *n += 1);
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.0.send_modify(|n| *n += 1);
    }
}

type Client = rmcp::service::RunningService<RoleClient, Legitimate>;

async fn connect(url: &str) -> (Client, watch::Receiver<u64>) {
    let handler = Legitimate::new();
    let changes = handler.0.subscribe();
    let client = handler
        .serve(StreamableHttpClientTransport::from_uri(url.to_string()))
        .await
        .expect("initialize through the gateway");
    (client, changes)
}

/// One call of the legitimate client; it must succeed.
async fn echo(client: &Client, message: &str) {
    let mut params = CallToolRequestParams::new("hostile__echo");
    params.arguments = json!({"message": message}).as_object().cloned();
    let result = tokio::time::timeout(DEADLINE, client.call_tool(params))
        .await
        .expect("the legitimate call hung")
        .expect("the legitimate call failed");
    let text: String = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect();
    assert_eq!(text, format!("Echo: {message}"));
}

/// The raw HTTP exchange of one request on its own connection (`Connection: close`): status,
/// headers (lower-case names) and body.
async fn raw_exchange(
    addr: &str,
    method: &str,
    session: Option<&str>,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(request_bytes(addr, method, session, body).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway never finished answering")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn request_bytes(addr: &str, method: &str, session: Option<&str>, body: &str) -> String {
    let mut request = format!(
        "{method} /mcp HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json, text/event-stream\r\nConnection: close\r\n"
    );
    if let Some(session) = session {
        request.push_str(&format!(
            "Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-11-25\r\n"
        ));
    }
    if method == "POST" {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request
}

/// Opens a 2025-11-25 session in raw HTTP and asks for every log message (`debug`).
async fn raw_session_with_debug_logs(addr: &str) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "hostile", "version": "1"}}});
    let (status, headers, body) = raw_exchange(addr, "POST", None, &init.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let session = headers
        .iter()
        .find(|(k, _)| k == "mcp-session-id")
        .map(|(_, v)| v.clone())
        .expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, body) =
        raw_exchange(addr, "POST", Some(&session), &initialized.to_string()).await;
    assert_eq!(status, 202, "{body}");
    let level = json!({"jsonrpc": "2.0", "id": 1, "method": "logging/setLevel",
        "params": {"level": "debug"}});
    let (status, _, body) = raw_exchange(addr, "POST", Some(&session), &level.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"result\""), "{body}");
    session
}

/// Opens the session's event stream (GET) on a socket with a tiny receive buffer, reads the
/// response head and nothing more: the client that never reads.
async fn unread_event_stream(addr: &str, session: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let request = format!(
        "GET /mcp HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nMcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-11-25\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .expect("no answer to the GET")
            .unwrap();
        assert_eq!(n, 1, "the stream closed before its head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

/// Resident memory of this process, from /proc (for the record; other tests share it).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until `done` holds of the gateway (its downstream backlog); it only decides failure
/// after [`DEADLINE`].
async fn until(gateway: &Gateway, what: &str, done: impl Fn(&Gateway) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done(gateway) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened: {:?}",
            gateway.downstream_backlog()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bounds of one session's outbox (the README's limits): 256 log messages or 1 MiB.
const OUTBOX_MAX_LOGS: usize = 256;
const OUTBOX_MAX_LOG_BYTES: usize = 1024 * 1024;

/// Reads the stream until `needle` shows (or [`DEADLINE`] passes); returns what was read, up to
/// the end of the line that holds it.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let needle = needle.as_bytes();
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{:?} never came", String::from_utf8_lossy(needle)))
            .unwrap();
        assert!(n > 0, "the stream ended first");
        let from = seen.len().saturating_sub(needle.len());
        seen.extend_from_slice(&chunk[..n]);
        if let Some(at) = seen[from..].windows(needle.len()).position(|w| w == needle) {
            let at = from + at;
            // Up to the end of that line (read on if it is not all there yet).
            while !seen[at..].contains(&b'\n') {
                let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                    .await
                    .expect("the line never ended")
                    .unwrap();
                assert!(n > 0, "the stream ended mid-line");
                seen.extend_from_slice(&chunk[..n]);
            }
            let end = at + seen[at..].iter().position(|b| *b == b'\n').unwrap();
            return String::from_utf8_lossy(&seen[..end]).into_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_event_stream_holds_a_bounded_outbox() {
    let stop = CancellationToken::new();
    let (upstream, upstream_url) = serve_upstream(stop.clone()).await;
    let (gateway, url) = start_gateway(&upstream_url, stop.clone()).await;
    let addr = url["http://".len()..url.len() - "/mcp".len()].to_string();
    let (legitimate, _) = connect(&url).await;
    echo(&legitimate, "before").await;
    // The hostile client: every log message, asked for in raw HTTP, on a stream it never reads.
    let session = raw_session_with_debug_logs(&addr).await;
    let mut hostile = unread_event_stream(&addr, &session).await;
    let rss_before = rss_kib();

    // 500 log messages of 100 KB from the upstream (the issue used 1,000; 500 are already 30
    // times what the socket's buffers and the outbox can hold), the legitimate client calling
    // meanwhile.
    const MESSAGES: usize = 500;
    let data = json!("x".repeat(100_000));
    let peer = upstream.peer();
    let mut most = (0, 0, 0);
    for i in 0..MESSAGES {
        peer.notify_logging_message(LoggingMessageNotificationParam::new(
            LoggingLevel::Debug,
            data.clone(),
        ))
        .await
        .expect("the gateway takes the upstream's log messages");
        if i % 50 == 0 {
            echo(&legitimate, &format!("call {i}")).await;
        }
        let backlog = gateway.downstream_backlog();
        // One session asked for logs: one outbox, one task at most delivering it (the
        // legitimate session's list changes aside).
        assert!(
            backlog.queued_logs <= OUTBOX_MAX_LOGS
                && backlog.queued_bytes <= OUTBOX_MAX_LOG_BYTES
                && backlog.delivery_tasks <= 2,
            "{backlog:?}"
        );
        most = (
            backlog.queued_logs.max(most.0),
            backlog.queued_bytes.max(most.1),
            backlog.delivery_tasks.max(most.2),
        );
    }
    // An answered ping: the gateway has read every message sent before it.
    peer.send_request(ServerRequest::PingRequest(PingRequest::default()))
        .await
        .expect("the gateway answers the upstream's ping");
    until(&gateway, "dropping what the client did not read", |g| {
        g.downstream_backlog().dropped_logs > 0
    })
    .await;
    let rss_during = rss_kib();
    echo(&legitimate, "during").await;

    // The client reads at last: where messages were lost it is told how many, once.
    let read = read_until(&mut hostile, "were dropped: this client did not read").await;
    let notice = read
        .lines()
        .rev()
        .find(|l| l.contains("were dropped"))
        .unwrap()
        .to_string();
    let dropped: u64 = notice
        .split("\"data\":\"")
        .nth(1)
        .and_then(|d| d.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {notice}"));
    assert!(dropped >= 1, "{notice}");
    assert!(notice.contains("\"logger\":\"concord\""), "{notice}");
    // Every message that did arrive was cut to the forwarded size.
    assert!(
        read.contains("[cut by concord: this log message had 100002 bytes"),
        "{}",
        &read[..read.len().min(400)]
    );

    // The socket closes: what waited for it is let go, and no task is left for it.
    drop(hostile);
    until(
        &gateway,
        "the outbox emptied after the socket closed",
        |g| {
            let backlog = g.downstream_backlog();
            backlog.queued_logs == 0 && backlog.queued_bytes == 0 && backlog.delivery_tasks == 0
        },
    )
    .await;
    // The session ends (DELETE): it leaves the registry.
    let (status, _, body) = raw_exchange(&addr, "DELETE", Some(&session), "").await;
    assert!(status == 202 || status == 200, "{status} {body}");
    until(&gateway, "the closed session left", |g| {
        g.downstream_backlog().sessions == 1
    })
    .await;
    echo(&legitimate, "after").await;
    eprintln!(
        "outbox at most {} messages / {} bytes / {} tasks; RSS {} KiB before, {} KiB after {MESSAGES} x 100 KB, {} KiB at the end; {:?}",
        most.0,
        most.1,
        most.2,
        rss_before,
        rss_during,
        rss_kib(),
        gateway.downstream_backlog()
    );
    let _ = legitimate.cancel().await;
    stop.cancel();
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_changed_flood_costs_a_couple_of_relists_not_one_each() {
    let stop = CancellationToken::new();
    let (upstream, upstream_url) = serve_upstream(stop.clone()).await;
    let (gateway, url) = start_gateway(&upstream_url, stop.clone()).await;
    let (legitimate, mut changes) = connect(&url).await;
    echo(&legitimate, "before").await;
    let state = upstream.0.clone();
    let before = state.lists.load(Ordering::SeqCst);

    // The tool list changes, and the upstream says so 33,000 times; then its prompt list
    // changes, said once. Its `tools/list` answers wait until all of that has been read by the
    // gateway, so every notification arrives while a refresh is in flight.
    const FLOOD: usize = 33_000;
    state.version.store(2, Ordering::SeqCst);
    state.hold_lists.store(true, Ordering::SeqCst);
    let peer = upstream.peer();
    let flood = tokio::spawn(async move {
        for _ in 0..FLOOD {
            peer.notify_tool_list_changed()
                .await
                .expect("the gateway takes the notifications");
        }
        peer.notify_prompt_list_changed()
            .await
            .expect("the gateway takes the notification");
        // An answered ping: the gateway has read every notification sent before it.
        peer.send_request(ServerRequest::PingRequest(PingRequest::default()))
            .await
            .expect("the gateway answers the upstream's ping");
    });
    state.prompt_version.store(2, Ordering::SeqCst);
    let mut calls = 0;
    while !flood.is_finished() {
        echo(&legitimate, &format!("call {calls}")).await;
        calls += 1;
    }
    flood.await.unwrap();
    state.hold_lists.store(false, Ordering::SeqCst);
    state.gate.notify_waiters();

    // The prompt change came after the whole flood: a gateway that re-listed once per
    // notification, in order, would get to it only after 33,000 re-lists of the tools.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        changes.borrow_and_update();
        let prompts = legitimate.peer().list_all_prompts().await.unwrap();
        if prompts.iter().any(|p| p.name == "hostile__p2") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never listed the new prompt ({} re-lists of the tools so far)",
            state.lists.load(Ordering::SeqCst) - before
        );
        // Woken by the gateway's announcement to the legitimate client (or a poll).
        let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
    }
    let relists = state.lists.load(Ordering::SeqCst) - before;
    // The refresh in flight during the flood and the one pending after it (which took the
    // prompt change too); one more only if the prompt's notification was handled late.
    assert!(
        (1..=3).contains(&relists),
        "{relists} re-lists of the tools for {FLOOD} notifications"
    );
    assert_eq!(
        state.most_listing_at_once.load(Ordering::SeqCst),
        1,
        "never two re-lists of one upstream at once"
    );
    assert!(
        gateway
            .tool_catalog()
            .iter()
            .any(|t| t.name == "hostile__v2")
    );
    echo(&legitimate, "after").await;
    eprintln!(
        "{FLOOD} list_changed notifications: {relists} re-lists; {calls} legitimate calls during the flood"
    );
    let _ = legitimate.cancel().await;
    stop.cancel();
    gateway.shutdown().await;
}
