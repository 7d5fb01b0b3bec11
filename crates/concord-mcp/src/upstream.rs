//! One upstream MCP server: how to connect to it, and the supervisor that keeps it connected,
//! health-checked and its lists fresh. The supervisor is the only writer of an upstream's state.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use concord_config::{ServerSpec, TransportSpec};
use parking_lot::RwLock;
use rmcp::ErrorData as McpError;
use rmcp::model::{
    ClientCapabilities, ClientConfig, ClientRequest, ClientResult, CreateMessageRequest,
    CreateMessageRequestParams, CreateMessageResult, ElicitRequest, ElicitRequestParams,
    ElicitResult, ElicitationCapability, FormElicitationCapability, Implementation,
    ListRootsRequest, ListRootsRequestMethod, ListRootsResult, LoggingMessageNotificationParam,
    PingRequest, ProtocolVersion, ResourceUpdatedNotificationParam, RootsCapabilities,
    ServerCapabilities, ServerNotification, ServerRequest, SubscriptionFilter,
    UrlElicitationCapability,
};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
use rmcp::service::{
    InboundStreamOrigin, NotificationContext, Peer, RequestContext, RoleClient, RunningService,
};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::{ClientHandler, ServiceExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{Breaker, BreakerPolicy};

use crate::catalog::UpstreamLists;
use crate::child::{self, ChildProcess};
use crate::gateway::{CallRouter, Shared};
use crate::subscriptions::{AbortOnDrop, UpstreamHold};
use crate::tap::ProgressTap;

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that stayed healthy this long before failing resets the backoff; one that
/// failed sooner (a server that crashes right after connecting) keeps it growing, so a crash
/// loop slows down instead of restarting the server as fast as it can die.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long an upstream has to complete the `initialize` handshake.
const CONNECT_TIMEOUT_FLOOR: Duration = Duration::from_secs(10);
/// How long the health check after a failed call waits: a live server answers a ping at once.
const RECHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Never connected yet: the first attempt is under way.
    Starting,
    Healthy,
    Unhealthy {
        reason: String,
    },
}

pub(crate) struct UpstreamState {
    pub health: Health,
    pub peer: Option<Peer<RoleClient>>,
    /// The last lists the server gave; kept while it is down so that calls to its names can
    /// fail with a reason instead of "unknown".
    pub lists: Arc<UpstreamLists>,
    pub capabilities: Option<ServerCapabilities>,
    pub first_attempt_done: bool,
    pub connected_since: Option<Instant>,
    pub restarts: u64,
    /// While the supervisor waits to reconnect: how long that wait is, and when it ends.
    pub retry_backoff: Option<Duration>,
    pub next_retry_at: Option<Instant>,
    /// Cancelled when the current connection is found dead, so calls still waiting on it fail
    /// at once instead of at their timeout.
    pub lost: CancellationToken,
}

/// One endpoint of a server. A configured server has one; a server registered in the mesh by
/// several replicas has one per replica, all in the same `pool` (the name its tools are
/// exposed under) and each with its own connection, load count and circuit breaker.
pub(crate) struct Upstream {
    /// Unique among upstreams: the server's name, or `NAME@REPLICA` for a replica. Progress,
    /// logs and server-to-client requests are routed by it.
    pub name: Arc<str>,
    /// The logical server: the namespace of its tools, and what routes name.
    pub pool: Arc<str>,
    pub spec: ServerSpec,
    pub state: RwLock<UpstreamState>,
    /// Cancelled when the gateway shuts down or this upstream is removed.
    pub stop: CancellationToken,
    /// Calls sent and not yet answered (the load that balancing compares).
    pub in_flight: AtomicUsize,
    pub breaker: Breaker,
    /// Asks the supervisor for a health check now (a call to this replica just failed).
    pub recheck: tokio::sync::Notify,
    /// Where a stdio server's stderr is logged, rate-limited across its restarts.
    pub stderr: Arc<child::StderrLog>,
}

impl Upstream {
    pub fn new(
        spec: ServerSpec,
        pool: Option<Arc<str>>,
        breaker: BreakerPolicy,
        stop: CancellationToken,
    ) -> Self {
        let name: Arc<str> = spec.name.as_str().into();
        Self {
            pool: pool.unwrap_or_else(|| name.clone()),
            name,
            stop,
            spec,
            state: RwLock::new(UpstreamState {
                health: Health::Starting,
                peer: None,
                lists: Arc::default(),
                capabilities: None,
                first_attempt_done: false,
                connected_since: None,
                restarts: 0,
                retry_backoff: None,
                next_retry_at: None,
                lost: CancellationToken::new(),
            }),
            in_flight: AtomicUsize::new(0),
            breaker: Breaker::new(breaker),
            recheck: tokio::sync::Notify::new(),
            stderr: Arc::default(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.state.read().health == Health::Healthy
    }

    /// The connected peer, or why there is none.
    pub fn peer(&self) -> Result<Peer<RoleClient>, String> {
        self.connection().map(|(peer, _)| peer)
    }

    /// The connected peer and the token cancelled when that connection is found dead.
    pub fn connection(&self) -> Result<(Peer<RoleClient>, CancellationToken), String> {
        let state = self.state.read();
        match (&state.health, &state.peer) {
            (Health::Healthy, Some(peer)) => Ok((peer.clone(), state.lost.clone())),
            (Health::Starting, _) => Err("still connecting".to_string()),
            (Health::Unhealthy { reason }, _) => Err(reason.clone()),
            (Health::Healthy, None) => Err("not connected".to_string()),
        }
    }

    /// The tool's annotations say it can be sent again without harm (`readOnlyHint` or
    /// `idempotentHint`), or the operator configured it retryable.
    pub fn is_retry_safe(&self, tool: &str) -> bool {
        if self.spec.tools.get(tool).is_some_and(|t| t.retryable) {
            return true;
        }
        let state = self.state.read();
        state
            .lists
            .tools
            .iter()
            .find(|t| &*t.name == tool)
            .and_then(|t| t.annotations.as_ref())
            .is_some_and(|a| a.read_only_hint == Some(true) || a.idempotent_hint == Some(true))
    }
}

/// Which list an upstream announced as changed.
#[derive(Debug, Clone, Copy)]
enum ListChanged {
    Tools,
    Prompts,
    Resources,
}

/// The lists an upstream announced as changed and the supervisor has not re-fetched yet. A
/// `list_changed` notification only sets its list's flag, so however many arrive, an upstream
/// has at most one refresh in flight (the supervisor runs them one at a time) and one pending
/// per list: a flood of notifications costs a couple of re-lists, not one each.
#[derive(Default)]
struct PendingLists {
    tools: AtomicBool,
    prompts: AtomicBool,
    resources: AtomicBool,
    /// Woken when a flag is set (a permit is kept when the supervisor is busy refreshing).
    wake: tokio::sync::Notify,
    /// Notifications received, and refreshes they caused.
    received: AtomicU64,
    refreshes: AtomicU64,
}

impl PendingLists {
    fn mark(&self, list: ListChanged) {
        let flag = match list {
            ListChanged::Tools => &self.tools,
            ListChanged::Prompts => &self.prompts,
            ListChanged::Resources => &self.resources,
        };
        self.received.fetch_add(1, Ordering::Relaxed);
        flag.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Takes the pending flags (clearing them): what to re-fetch now.
    fn take(&self) -> Option<StaleLists> {
        let stale = StaleLists {
            tools: self.tools.swap(false, Ordering::AcqRel),
            prompts: self.prompts.swap(false, Ordering::AcqRel),
            resources: self.resources.swap(false, Ordering::AcqRel),
        };
        (stale.tools || stale.prompts || stale.resources).then(|| {
            self.refreshes.fetch_add(1, Ordering::Relaxed);
            stale
        })
    }
}

/// The lists one refresh re-fetches.
#[derive(Debug, Clone, Copy)]
struct StaleLists {
    tools: bool,
    prompts: bool,
    resources: bool,
}

/// The client side of one upstream connection: relays the upstream's notifications.
#[derive(Clone)]
pub(crate) struct UpstreamClient {
    server: Arc<str>,
    /// The logical server (subscriptions and log messages are the pool's, not one replica's).
    pool: Arc<str>,
    shared: Weak<Shared>,
    pending: Arc<PendingLists>,
    forward_roots: bool,
}

impl ClientHandler for UpstreamClient {
    fn get_info(&self) -> ClientConfig {
        // Upstreams are reached through the `initialize` handshake of 2025-11-25; the
        // 2026-07-28 discover lifecycle for upstreams is not wired yet.
        // Sampling and elicitation are declared so upstreams may use them; each request is
        // relayed to the client of the call it belongs to, which may still decline it. Roots
        // are declared only where configured (`forward_roots`): an upstream often asks for
        // them outside any call (at start-up), when there is no client to ask, and some
        // servers replace their configured roots with the answer.
        let mut capabilities = ClientCapabilities::builder()
            .enable_sampling()
            .enable_elicitation_with(
                ElicitationCapability::new()
                    .with_form(FormElicitationCapability::default())
                    .with_url(UrlElicitationCapability::default()),
            )
            .build();
        if self.forward_roots {
            capabilities.roots = Some(RootsCapabilities::default());
        }
        let mut info = ClientConfig::new(
            capabilities,
            Implementation::new("concord", env!("CARGO_PKG_VERSION")),
        );
        info.protocol_version = ProtocolVersion::V_2025_11_25;
        info
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, McpError> {
        let request = ServerRequest::CreateMessageRequest(CreateMessageRequest::new(params));
        match self.relay_request(request, &context).await? {
            ClientResult::CreateMessageResult(result) => Ok(*result),
            _ => Err(McpError::internal_error(
                "the client answered sampling/createMessage with another result type",
                None,
            )),
        }
    }

    async fn create_elicitation(
        &self,
        params: ElicitRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let request = ServerRequest::ElicitRequest(ElicitRequest::new(params));
        match self.relay_request(request, &context).await? {
            ClientResult::ElicitResult(result) => Ok(result),
            _ => Err(McpError::internal_error(
                "the client answered elicitation/create with another result type",
                None,
            )),
        }
    }

    async fn list_roots(
        &self,
        context: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, McpError> {
        if !self.forward_roots {
            return Err(McpError::method_not_found::<ListRootsRequestMethod>());
        }
        let request = ServerRequest::ListRootsRequest(ListRootsRequest::default());
        match self.relay_request(request, &context).await? {
            ClientResult::ListRootsResult(result) => Ok(result),
            _ => Err(McpError::internal_error(
                "the client answered roots/list with another result type",
                None,
            )),
        }
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(shared) = self.shared.upgrade() {
            shared
                .downstream
                .forward_log(&self.pool, params, |identity| {
                    crate::session::GatewaySession::may_use_server(&shared, identity, &self.pool)
                });
        }
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if let Some(abandoned) = shared.subscriptions.updated(&self.pool, params).await {
            let peer = shared.replica(&self.server).and_then(|u| u.peer().ok());
            abandoned.release(peer.as_ref()).await;
        }
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.pending.mark(ListChanged::Tools);
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.pending.mark(ListChanged::Prompts);
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.pending.mark(ListChanged::Resources);
    }
}

impl UpstreamClient {
    /// Sends a request the upstream made to the client of the call it belongs to.
    async fn relay_request(
        &self,
        request: ServerRequest,
        context: &RequestContext<RoleClient>,
    ) -> Result<ClientResult, McpError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(McpError::internal_error(
                "the gateway is shutting down",
                None,
            ));
        };
        let origin = match context.extensions.get::<InboundStreamOrigin>() {
            Some(InboundStreamOrigin::OutboundRequest(id)) => Some(id.clone()),
            _ => None,
        };
        shared
            .router
            .route_request(&self.server, origin, request)
            .await
    }
}

/// A live connection plus, for stdio servers, the process behind it.
struct Connection {
    service: RunningService<RoleClient, UpstreamClient>,
    child: Option<ChildProcess>,
}

impl Connection {
    async fn close(mut self) {
        let _ = self
            .service
            .close_with_timeout(Duration::from_secs(2))
            .await;
        if let Some(child) = self.child.take() {
            child.terminate().await;
        }
    }
}

/// Connects with the 2025-11-25 `initialize` handshake, which nearly every server speaks; a
/// server that refuses it (a 2026-07-28-only server) is reached again through
/// `server/discover`, and then used in its own, sessionless era.
async fn connect(
    spec: &ServerSpec,
    handler: UpstreamClient,
    router: Arc<CallRouter>,
    stderr: &Arc<child::StderrLog>,
) -> Result<Connection, String> {
    match connect_with(
        spec,
        handler.clone(),
        router.clone(),
        stderr,
        ClientLifecycleMode::Initialize,
    )
    .await
    {
        Ok(connection) => Ok(connection),
        Err(Handshake::Refused(reason)) => {
            tracing::info!(%reason, "initialize refused; trying server/discover (2026-07-28)");
            let modern = ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            };
            connect_with(spec, handler, router, stderr, modern)
                .await
                .map_err(|e| format!("{reason}; server/discover failed too: {}", e.reason()))
        }
        Err(other) => Err(other.reason()),
    }
}

enum Handshake {
    /// The server answered, but not with a session: another lifecycle may work.
    Refused(String),
    /// Nothing usable answered (could not start, connect, or no answer in time).
    Failed(String),
}

impl Handshake {
    fn reason(self) -> String {
        match self {
            Handshake::Refused(reason) | Handshake::Failed(reason) => reason,
        }
    }
}

async fn connect_with(
    spec: &ServerSpec,
    handler: UpstreamClient,
    router: Arc<CallRouter>,
    stderr: &Arc<child::StderrLog>,
    lifecycle: ClientLifecycleMode,
) -> Result<Connection, Handshake> {
    let server: Arc<str> = spec.name.as_str().into();
    let handshake_timeout = spec.request_timeout.max(CONNECT_TIMEOUT_FLOOR);
    match &spec.transport {
        TransportSpec::Stdio {
            command,
            args,
            env,
            cwd,
        } => {
            let spawned = child::spawn(
                &spec.name,
                command,
                args,
                env,
                cwd.as_deref(),
                stderr.clone(),
            )
            .map_err(|e| Handshake::Failed(format!("cannot start `{command}`: {e}")))?;
            let process = spawned.process;
            let transport = ProgressTap::new(
                AsyncRwTransport::<RoleClient, _, _>::new_client(spawned.stdout, spawned.stdin),
                server,
                router.clone(),
            );
            let serve = handler.serve_with_lifecycle(transport, lifecycle);
            let service = tokio::select! {
                result = tokio::time::timeout(handshake_timeout, serve) => match result {
                    Ok(Ok(service)) => service,
                    Ok(Err(e)) => {
                        process.terminate().await;
                        return Err(Handshake::Refused(format!("handshake failed: {e}")));
                    }
                    Err(_) => {
                        process.terminate().await;
                        return Err(Handshake::Failed(format!(
                            "no answer to the handshake within {handshake_timeout:?}"
                        )));
                    }
                },
                exit = process.exited() => {
                    return Err(Handshake::Failed(format!("{exit} before completing the handshake")));
                }
            };
            Ok(Connection {
                service,
                child: Some(process),
            })
        }
        TransportSpec::StreamableHttp { url, headers } => {
            let transport = ProgressTap::new(
                crate::http_client::streamable_http(url, headers).map_err(Handshake::Failed)?,
                server,
                router.clone(),
            );
            let service = tokio::time::timeout(
                handshake_timeout,
                handler.serve_with_lifecycle(transport, lifecycle),
            )
            .await
            .map_err(|_| {
                Handshake::Failed(format!(
                    "no answer to the handshake within {handshake_timeout:?}"
                ))
            })?
            .map_err(|e| Handshake::Refused(format!("cannot connect to {url}: {e}")))?;
            Ok(Connection {
                service,
                child: None,
            })
        }
        TransportSpec::Sse { url, headers } => {
            let transport = ProgressTap::new(
                crate::sse_client::connect(url, headers, handshake_timeout)
                    .await
                    .map_err(Handshake::Failed)?,
                server,
                router.clone(),
            );
            // The legacy SSE transport predates 2026-07-28: initialize is its only lifecycle.
            let service = tokio::time::timeout(handshake_timeout, handler.serve(transport))
                .await
                .map_err(|_| {
                    Handshake::Failed(format!(
                        "no answer to initialize within {handshake_timeout:?}"
                    ))
                })?
                .map_err(|e| Handshake::Failed(format!("cannot connect to {url}: {e}")))?;
            Ok(Connection {
                service,
                child: None,
            })
        }
    }
}

/// Fetches every list the server's capabilities promise, following pagination.
async fn fetch_lists(
    peer: &Peer<RoleClient>,
    capabilities: &ServerCapabilities,
    timeout: Duration,
) -> Result<UpstreamLists, String> {
    let fetch = async {
        let mut lists = UpstreamLists::default();
        if capabilities.tools.is_some() {
            lists.tools = peer
                .list_all_tools()
                .await
                .map_err(|e| format!("tools/list failed: {e}"))?;
        }
        if capabilities.prompts.is_some() {
            lists.prompts = peer
                .list_all_prompts()
                .await
                .map_err(|e| format!("prompts/list failed: {e}"))?;
        }
        if capabilities.resources.is_some() {
            lists.resources = peer
                .list_all_resources()
                .await
                .map_err(|e| format!("resources/list failed: {e}"))?;
            lists.templates = peer
                .list_all_resource_templates()
                .await
                .map_err(|e| format!("resources/templates/list failed: {e}"))?;
        }
        Ok(lists)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("listing tools, prompts and resources took over {timeout:?}"))?
}

/// True when the upstream was reached in the 2026-07-28 era (through `server/discover`).
pub(crate) fn is_modern_peer(peer: &Peer<RoleClient>) -> bool {
    peer.peer_info().is_some_and(|info| {
        info.protocol_version.as_str() >= ProtocolVersion::V_2026_07_28.as_str()
    })
}

/// Health check: MCP `ping`, or for a 2026-07-28 upstream (whose era has no ping) a
/// `server/discover`.
async fn ping(peer: &Peer<RoleClient>, timeout: Duration) -> Result<(), String> {
    let answer = if is_modern_peer(peer) {
        tokio::time::timeout(timeout, async {
            peer.discover(rmcp::model::RequestMetaObject::new())
                .await
                .map(drop)
        })
        .await
    } else {
        let request = ClientRequest::PingRequest(PingRequest::default());
        tokio::time::timeout(timeout, async {
            peer.send_request(request).await.map(drop)
        })
        .await
    };
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("health check failed: {e}")),
        Err(_) => Err(format!("no answer to the health check within {timeout:?}")),
    }
}

/// A 2026-07-28 upstream announces list changes only on a `subscriptions/listen` stream: keep
/// one open and turn what it carries into the same events the legacy notifications produce.
fn listen_for_changes(
    peer: Peer<RoleClient>,
    server: Arc<str>,
    pending: Arc<PendingLists>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let filter = SubscriptionFilter::builder()
            .tools_list_changed()
            .prompts_list_changed()
            .resources_list_changed()
            .build();
        let mut subscription = match peer.listen(filter).await {
            Ok(subscription) => subscription,
            Err(e) => {
                tracing::warn!(server = %server, error = %e, "subscriptions/listen refused: list changes will not be seen");
                return;
            }
        };
        while let Ok(Some(notification)) = subscription.next().await {
            let event = match notification {
                ServerNotification::ToolListChangedNotification(_) => ListChanged::Tools,
                ServerNotification::PromptListChangedNotification(_) => ListChanged::Prompts,
                ServerNotification::ResourceListChangedNotification(_) => ListChanged::Resources,
                _ => continue,
            };
            pending.mark(event);
        }
    })
}

/// Takes the upstream side of a resource subscription: `resources/subscribe` in the 2025 era; in
/// the 2026-07-28 era, which has no such method, a `subscriptions/listen` stream naming the URI,
/// whose updates are delivered like the legacy notification's.
pub(crate) async fn hold_subscription(
    shared: Weak<Shared>,
    server: Arc<str>,
    peer: &Peer<RoleClient>,
    uri: String,
) -> Result<UpstreamHold, rmcp::service::ServiceError> {
    if !is_modern_peer(peer) {
        peer.subscribe(rmcp::model::SubscribeRequestParams::new(uri))
            .await?;
        return Ok(UpstreamHold::Subscribed);
    }
    let filter = SubscriptionFilter::builder()
        .resource_subscription(uri.clone())
        .build();
    let mut subscription = peer.listen(filter).await?;
    let relay = tokio::spawn(async move {
        while let Ok(Some(notification)) = subscription.next().await {
            let ServerNotification::ResourceUpdatedNotification(updated) = notification else {
                continue;
            };
            let Some(shared) = shared.upgrade() else {
                return;
            };
            // The last subscriber left: the abandoned hold is this task's own, and dropping it
            // ends the task (and the listen stream with it).
            if let Some(abandoned) = shared.subscriptions.updated(&server, updated.params).await {
                abandoned.release(None).await;
            }
        }
        tracing::debug!(server = %server, uri, "resource listen stream ended");
    });
    Ok(UpstreamHold::Listening {
        _relay: AbortOnDrop(relay),
    })
}

/// Keeps one upstream connected until the gateway shuts down.
pub(crate) async fn supervise(shared: Arc<Shared>, upstream: Arc<Upstream>) {
    let span = tracing::info_span!("upstream", server = %upstream.name, transport = upstream.spec.transport.kind());
    async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if upstream.stop.is_cancelled() {
                return;
            }
            // Fresh per connection: what the previous connection announced is re-fetched anyway.
            let pending = Arc::new(PendingLists::default());
            let handler = UpstreamClient {
                server: upstream.name.clone(),
                pool: upstream.pool.clone(),
                shared: Arc::downgrade(&shared),
                pending: pending.clone(),
                forward_roots: upstream.spec.forward_roots,
            };
            let connected = tokio::select! {
                result = connect(&upstream.spec, handler, shared.router.clone(), &upstream.stderr) => result,
                _ = upstream.stop.cancelled() => return,
            };
            let failure = match connected {
                Err(reason) => reason,
                Ok(connection) => {
                    let outcome = serve_connection(&shared, &upstream, connection, &pending).await;
                    match outcome {
                        ConnectionEnd::Shutdown => return,
                        ConnectionEnd::Failed { reason, healthy_for } => {
                            if healthy_for.is_some_and(|d| d >= STABLE_AFTER) {
                                backoff = FIRST_BACKOFF;
                            }
                            reason
                        }
                    }
                }
            };
            tracing::warn!(reason = %failure, retry_in_ms = backoff.as_millis() as u64, "upstream unhealthy");
            mark_unhealthy(&shared, &upstream, failure);
            {
                let mut state = upstream.state.write();
                state.retry_backoff = Some(backoff);
                state.next_retry_at = Some(Instant::now() + backoff);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = upstream.stop.cancelled() => return,
            }
            {
                let mut state = upstream.state.write();
                state.retry_backoff = None;
                state.next_retry_at = None;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    .instrument(span)
    .await
}

enum ConnectionEnd {
    Shutdown,
    /// `healthy_for`: how long the connection had been serving when it failed (`None` when it
    /// never was).
    Failed {
        reason: String,
        healthy_for: Option<Duration>,
    },
}

async fn serve_connection(
    shared: &Arc<Shared>,
    upstream: &Arc<Upstream>,
    connection: Connection,
    pending: &Arc<PendingLists>,
) -> ConnectionEnd {
    let peer = connection.service.peer().clone();
    let _listener = is_modern_peer(&peer).then(|| {
        AbortOnDrop(listen_for_changes(
            peer.clone(),
            upstream.name.clone(),
            pending.clone(),
        ))
    });
    peer.set_response_cache_config(rmcp::service::ClientCacheConfig::disabled())
        .await;
    let capabilities = peer
        .peer_info()
        .map(|info| info.capabilities.clone())
        .unwrap_or_default();
    let timeout = upstream.spec.request_timeout;
    let lists = match fetch_lists(&peer, &capabilities, timeout).await {
        Ok(lists) => lists,
        Err(reason) => {
            connection.close().await;
            return ConnectionEnd::Failed {
                reason,
                healthy_for: None,
            };
        }
    };
    tracing::info!(
        tools = lists.tools.len(),
        prompts = lists.prompts.len(),
        resources = lists.resources.len(),
        "upstream connected"
    );
    {
        let mut state = upstream.state.write();
        state.health = Health::Healthy;
        state.peer = Some(peer.clone());
        state.lists = Arc::new(lists);
        state.capabilities = Some(capabilities.clone());
        state.first_attempt_done = true;
        state.connected_since = Some(Instant::now());
        state.lost = CancellationToken::new();
    }
    let connected = Instant::now();
    // A restarted server has forgotten its subscriptions: take them again.
    shared
        .subscriptions
        .renew(&upstream.pool, |uri| {
            hold_subscription(Arc::downgrade(shared), upstream.pool.clone(), &peer, uri)
        })
        .await;
    shared.metrics.set_upstream_up(&upstream.name, true);
    shared.rebuild_catalog();
    shared.upstream_settled();

    let health_interval = shared.options.health_interval;
    let ping_timeout = timeout.min(health_interval.max(Duration::from_secs(5)));
    let mut next_ping = tokio::time::Instant::now() + health_interval;
    let end = loop {
        tokio::select! {
            _ = upstream.stop.cancelled() => break ConnectionEnd::Shutdown,
            exit = async {
                match &connection.child {
                    Some(child) => child.exited().await,
                    None => std::future::pending().await,
                }
            } => break ConnectionEnd::Failed { reason: exit, healthy_for: Some(connected.elapsed()) },
            _ = tokio::time::sleep_until(next_ping) => {
                if let Err(reason) = ping(&peer, ping_timeout).await {
                    break ConnectionEnd::Failed { reason, healthy_for: Some(connected.elapsed()) };
                }
                next_ping = tokio::time::Instant::now() + health_interval;
            }
            // A call just failed on this connection: find out now whether it is still alive,
            // rather than at the next scheduled check.
            _ = upstream.recheck.notified() => {
                if let Err(reason) = ping(&peer, RECHECK_TIMEOUT.min(ping_timeout)).await {
                    break ConnectionEnd::Failed { reason, healthy_for: Some(connected.elapsed()) };
                }
            }
            // Whatever was announced while the previous refresh ran is fetched once now.
            _ = pending.wake.notified() => {
                if let Some(stale) = pending.take() {
                    if let Err(reason) = refresh(upstream, &peer, &capabilities, stale, timeout).await {
                        break ConnectionEnd::Failed { reason, healthy_for: Some(connected.elapsed()) };
                    }
                    tracing::debug!(
                        notifications = pending.received.load(Ordering::Relaxed),
                        refreshes = pending.refreshes.load(Ordering::Relaxed),
                        "lists refreshed after list_changed"
                    );
                    shared.rebuild_catalog();
                }
            }
        }
        if connection.service.is_closed() {
            break ConnectionEnd::Failed {
                reason: "the connection closed".to_string(),
                healthy_for: Some(connected.elapsed()),
            };
        }
    };
    // Take the server out of the catalog before tearing the connection down, so no new call
    // is routed to it while it closes.
    if let ConnectionEnd::Failed { reason, .. } = &end {
        mark_unhealthy(shared, upstream, reason.clone());
    }
    connection.close().await;
    end
}

async fn refresh(
    upstream: &Upstream,
    peer: &Peer<RoleClient>,
    capabilities: &ServerCapabilities,
    stale: StaleLists,
    timeout: Duration,
) -> Result<(), String> {
    let mut lists = (*upstream.state.read().lists).clone();
    let work = async {
        if stale.tools && capabilities.tools.is_some() {
            lists.tools = peer.list_all_tools().await.map_err(|e| e.to_string())?;
        }
        if stale.prompts && capabilities.prompts.is_some() {
            lists.prompts = peer.list_all_prompts().await.map_err(|e| e.to_string())?;
        }
        if stale.resources && capabilities.resources.is_some() {
            lists.resources = peer.list_all_resources().await.map_err(|e| e.to_string())?;
            lists.templates = peer
                .list_all_resource_templates()
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("refreshing lists took over {timeout:?}"))?
        .map_err(|e| format!("refreshing lists failed: {e}"))?;
    upstream.state.write().lists = Arc::new(lists);
    Ok(())
}

fn mark_unhealthy(shared: &Shared, upstream: &Upstream, reason: String) {
    let lost_a_healthy_connection;
    let changed = {
        let mut state = upstream.state.write();
        let was_serving = state.health == Health::Healthy;
        lost_a_healthy_connection = was_serving;
        if matches!(&state.health, Health::Unhealthy { reason: r } if *r == reason) {
            false
        } else {
            state.health = Health::Unhealthy { reason };
            state.peer = None;
            state.lost.cancel();
            state.first_attempt_done = true;
            state.connected_since = None;
            if was_serving {
                state.restarts += 1;
            }
            true
        }
    };
    shared.metrics.set_upstream_up(&upstream.name, false);
    // One count per healthy connection lost, the same event `UpstreamStatus::restarts` counts.
    if lost_a_healthy_connection {
        shared.metrics.count_upstream_restart(&upstream.name);
    }
    if changed {
        shared.rebuild_catalog();
    }
    shared.upstream_settled();
}
