//! The composition root of a Concord node: it wires configuration, telemetry and the MCP
//! gateway into one axum application (`/mcp`, `/healthz`, `/readyz`, `/metrics`) and owns the
//! node's lifecycle from bind to clean shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use concord_config::Config;
use concord_mcp::codes::AT_CAPACITY;
use concord_mcp::{EdgeOptions, Gateway, GatewayError, GatewayOptions};
use concord_telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod agents;
mod edge;
pub mod front_door;
mod governance;
mod registry;
mod rest;
mod state_tools;
mod validator;
mod workflows;

/// How long start-up waits for every upstream's first connection attempt before it reports
/// readiness anyway (slow `npx` downloads should not keep a node from serving the others).
const FIRST_ATTEMPT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("state store: {0}")]
    Store(#[from] concord_store::StoreError),
    #[error(transparent)]
    State(#[from] concord_state::StateError),
    #[error("{0}")]
    Governance(String),
    #[error("agents: {0}")]
    Agents(String),
    #[error(
        "refusing to listen on {addr} with authentication off: anyone who can reach it could use every tool. Enable [auth] or listen on a loopback address (127.0.0.1)"
    )]
    Unprotected { addr: SocketAddr },
}

/// Where and how to run, after the CLI has merged its flags over the config file.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Overrides `state.store`: `postgres://…` or a SQLite file.
    pub store: Option<String>,
}

#[derive(Clone)]
struct AppState {
    gateway: Gateway,
    metrics: Arc<Metrics>,
    store: concord_store::Store,
}

/// A node that is serving.
pub struct RunningNode {
    local_addr: SocketAddr,
    gateway: Gateway,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    audit: Option<concord_governance::AuditLog>,
}

impl RunningNode {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn mcp_url(&self) -> String {
        format!("http://{}/mcp", self.local_addr)
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Waits for every upstream's first attempt; fails on a `never`-prefix name collision.
    pub async fn wait_ready(&self) -> Result<(), NodeError> {
        Ok(self
            .gateway
            .wait_first_attempts(FIRST_ATTEMPT_LIMIT)
            .await?)
    }

    /// Stops accepting requests, ends sessions, stops every upstream (children reaped).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        self.gateway.shutdown().await;
        if let Some(audit) = self.audit {
            audit.flush().await;
        }
    }
}

/// Where the store is: the `--store` flag, else `state.store`, else `DATA_DIR/state.db`.
pub fn store_location(
    flag: Option<String>,
    configured: Option<String>,
    data_dir: &std::path::Path,
) -> String {
    flag.or(configured)
        .unwrap_or_else(|| data_dir.join("state.db").display().to_string())
}

/// Binds, starts the upstream supervisors and serves. Returns as soon as the listener is up.
pub async fn start(config: &Config, options: NodeOptions) -> Result<RunningNode, NodeError> {
    std::fs::create_dir_all(&options.data_dir).map_err(|source| NodeError::DataDir {
        path: options.data_dir.clone(),
        source,
    })?;
    if !config.auth.enabled {
        if !options.listen.ip().is_loopback() {
            return Err(NodeError::Unprotected {
                addr: options.listen,
            });
        }
        tracing::warn!(
            listen = %options.listen,
            "AUTHENTICATION IS OFF: every local process can use every tool and write all shared state. Enable [auth] before exposing this node"
        );
    }
    let store_location = store_location(
        options.store.clone(),
        config.state.store.clone(),
        &options.data_dir,
    );
    let store = concord_store::Store::open(&store_location).await?;
    tracing::info!(backend = store.backend_name(), "state store open");
    let governance = if config.auth.enabled {
        Some(Arc::new(
            governance::Governance::start(config, store.clone())
                .await
                .map_err(NodeError::Governance)?,
        ))
    } else {
        None
    };
    let late_gateway = Arc::new(std::sync::OnceLock::new());
    let mut state_service = concord_state::StateService::new(store, state_options(config))?;
    if !config.state.validators.is_empty() {
        state_service = state_service.with_guard(Arc::new(validator::ToolValidator::new(
            config.state.validators.clone(),
            late_gateway.clone(),
        )));
    }
    let state = Arc::new(state_service);
    let state_for_watch = state.clone();
    let registry_state = registry::RegistryState::new(state.store().clone(), config);
    let metrics = Arc::new(Metrics::new());
    let agents = Arc::new(
        agents::Agents::new(
            config.agents.clone(),
            config.budgets.max_depth,
            &config.providers,
            state.store().clone(),
            late_gateway.clone(),
            governance.clone().map(|g| {
                Arc::new(governance::PolicyAccess(g)) as Arc<dyn concord_mcp::AccessControl>
            }),
        )
        .map_err(NodeError::Agents)?,
    );
    let mut local_namespaces: Vec<(String, Arc<dyn concord_mcp::builtin::BuiltinTools>)> =
        Vec::new();
    if !config.agents.is_empty() {
        local_namespaces.push((
            agents::AGENTS_NAMESPACE.to_string(),
            Arc::new(agents::AgentTools::all(agents.clone())),
        ));
    }
    if !config.workflows.is_empty() {
        local_namespaces.push((
            workflows::WORKFLOWS_NAMESPACE.to_string(),
            Arc::new(workflows::WorkflowTools {
                agents: agents.clone(),
                workflows: config.workflows.clone(),
            }),
        ));
    }
    let gateway = Gateway::with_builtins(
        config,
        GatewayOptions {
            health_interval: config.node.health_interval,
            page_size: config.node.page_size,
            access: governance.clone().map(|g| {
                Arc::new(governance::PolicyAccess(g)) as Arc<dyn concord_mcp::AccessControl>
            }),
            local_namespaces,
        },
        metrics.clone(),
        Some(Arc::new(state_tools::StateTools::new(
            state.clone(),
            governance.clone(),
        ))),
    );
    let _ = late_gateway.set(gateway.clone());
    let shutdown = CancellationToken::new();
    let edge = EdgeOptions {
        allowed_hosts: config.node.allowed_hosts.clone(),
        allowed_origins: config.node.allowed_origins.clone(),
        max_body_bytes: config.node.max_body_bytes,
    };
    let app = router(
        AppState {
            gateway: gateway.clone(),
            metrics,
            store: state.store().clone(),
        },
        &edge,
        shutdown.clone(),
        state,
        governance.clone(),
        registry_state.clone(),
        agents.clone(),
    );
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: options.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: options.listen,
        source,
    })?;
    registry_state.set_local_addr(local_addr);
    gateway.start();
    if let Some(governance) = &governance {
        tokio::spawn(governance::watch_policy(
            governance.clone(),
            shutdown.clone(),
        ));
    }
    // Providers, agents and configured servers are registry entities too: agents resolve
    // providers and tool servers by tags, and `concord agents list` / `deps show` see them.
    let mut declared: Vec<(concord_mesh::Registration, registry::Liveness)> = config
        .registry
        .iter()
        .map(|r| (r.clone(), registry::Liveness::Declared))
        .collect();
    declared.extend(
        agents::provider_registrations(&config.providers)
            .into_iter()
            .map(|r| {
                let liveness = registry::Liveness::Provider(r.name.clone());
                (r, liveness)
            }),
    );
    declared.extend(
        agents::agent_registrations(&config.agents)
            .into_iter()
            .map(|r| (r, registry::Liveness::Declared)),
    );
    declared.extend(
        registry::server_registrations(&config.servers)
            .into_iter()
            .map(|r| {
                let liveness = registry::Liveness::Upstream(r.name.clone());
                (r, liveness)
            }),
    );
    let (registrations, liveness): (Vec<_>, Vec<_>) = declared.into_iter().unzip();
    let configured_entities =
        registry::register_configured(state_for_watch.store(), &registrations)
            .await
            .map_err(NodeError::Store)?;
    tokio::spawn(registry::sync_upstreams(
        registry_state,
        gateway.clone(),
        agents.clone(),
        configured_entities.into_iter().zip(liveness).collect(),
        config.servers.iter().map(|s| s.name.clone()).collect(),
        config.node.request_timeout,
        shutdown.clone(),
    ));
    tokio::spawn(watch_state(
        state_for_watch,
        gateway.clone(),
        shutdown.clone(),
    ));
    let server = tokio::spawn(serve(
        listener,
        app,
        ListenLimits {
            max_connections: config.node.max_connections,
            header_read_timeout: config.node.header_read_timeout,
        },
        shutdown.clone(),
    ));
    Ok(RunningNode {
        local_addr,
        gateway,
        shutdown,
        server,
        audit: governance.map(|g| g.audit.clone()),
    })
}

/// Bounds of the node's HTTP listener (`[node] max_connections`, `header_read_timeout`).
#[derive(Debug, Clone, Copy)]
struct ListenLimits {
    max_connections: usize,
    header_read_timeout: Duration,
}

/// Connections answered "503, at capacity" at once at most; past it a refused connection is
/// closed without an answer (a flood of connections must not become a flood of tasks).
const MAX_REFUSING: usize = 64;
/// How long a refused connection gets to send its request head (an HTTP client reads an answer
/// only once it has sent its request), and to take its 503 in all.
const REFUSAL_HEAD_WAIT: Duration = Duration::from_secs(1);
const REFUSAL_LIMIT: Duration = Duration::from_secs(3);
/// The most a connection's read buffer holds: a request head larger than this is refused (431).
/// hyper's default (about 400 KiB) would let every slow connection hold that much.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves `app` on `listener` until `stop`, then lets open connections finish (each is asked to
/// close after its request in flight). axum::serve is not used: it has no header read timeout
/// (hyper enforces one only with a timer, which axum::serve does not set) and no connection
/// cap, so slow or idle connections could be held without bound.
///
/// At most `max_connections` connections are served at once. Past that, a new connection is
/// accepted and answered at once with 503 and a JSON-RPC error, then closed: the client learns
/// why instead of waiting in the kernel's accept queue for a slot that slow clients may hold,
/// and the accept loop stays free to notice shutdown. Every served connection must send its
/// request headers within `header_read_timeout`, which also closes kept-alive connections idle
/// that long; a response being streamed (an SSE stream) is not subject to it. A request head
/// may be [`MAX_HEAD_BYTES`] at most, so a connection holds that much at most while it waits.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ListenLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    let open = Arc::new(tokio::sync::Semaphore::new(max));
    let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error, &stop).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused += 1;
            // Logged at 1, 2, 4, 8…: a flood shows without flooding the log itself.
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max_connections = max,
                    "connection refused: the node serves its maximum of connections ([node] max_connections)"
                );
            }
            refuse(stream, max, &refusing);
            continue;
        };
        // Small JSON-RPC answers must leave at once: without TCP_NODELAY, Nagle's algorithm and
        // the client's delayed ACK hold each response back by about 40 ms.
        let _ = stream.set_nodelay(true);
        // The peer's address travels with each request (audit aggregates auth failures by it),
        // as axum's `into_make_service_with_connect_info::<SocketAddr>` puts it there.
        let service = hyper_util::service::TowerToHyperService::new(tower::Layer::layer(
            &axum::Extension(axum::extract::ConnectInfo(peer)),
            app.clone(),
        ));
        let stop = stop.clone();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(MAX_HEAD_BYTES);
            let connection = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%peer, %error, "connection ended");
                    }
                    return;
                }
                _ = stop.cancelled() => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    // Each connection gives its permit back when it ends.
    let _ = open.acquire_many(max as u32).await;
    Ok(())
}

/// An accept that failed: a connection reset before it was taken is nothing; anything else
/// (out of file descriptors) is logged and waited out a second, as axum::serve does.
async fn accept_failed(error: std::io::Error, stop: &CancellationToken) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = stop.cancelled() => {}
    }
}

/// Answers a connection past the cap with 503 and closes it: the request head is read first
/// (briefly), then the answer written, then what else the client sent is read (a little) before
/// closing, so the close does not reset the connection under the answer. At most
/// [`MAX_REFUSING`] at once; the rest are just closed.
fn refuse(stream: tokio::net::TcpStream, max: usize, refusing: &Arc<tokio::sync::Semaphore>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(slot) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let mut stream = stream;
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {
                "code": AT_CAPACITY,
                "message": format!("the node already serves its maximum of {max} connections ([node] max_connections); retry shortly"),
                "data": {"max_connections": max},
            }
        })
        .to_string();
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(REFUSAL_LIMIT, async {
            let mut head = Vec::new();
            let mut scratch = [0u8; 4096];
            let _ = tokio::time::timeout(REFUSAL_HEAD_WAIT, async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match stream.read(&mut scratch).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&scratch[..n]),
                    }
                }
            })
            .await;
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let mut taken = 0;
            while taken < 64 * 1024 {
                match stream.read(&mut scratch).await? {
                    0 => break,
                    n => taken += n,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// Turns commits into `notifications/resources/updated` for clients subscribed to
/// `concord://state/…` resources. It reads the store's commit log rather than hooking this
/// node's writes, so commits made through another node sharing the store are announced too.
async fn watch_state(
    state: Arc<concord_state::StateService>,
    gateway: Gateway,
    stop: CancellationToken,
) {
    const POLL: Duration = Duration::from_millis(200);
    let mut last = state.last_seq().await.unwrap_or(0);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        if !gateway.has_builtin_subscribers().await {
            // Nobody listens: skip ahead, so a new subscriber hears only of later commits.
            if let Ok(seq) = state.last_seq().await {
                last = seq;
            }
            continue;
        }
        match state.changed_keys(last, 1000).await {
            Ok(changes) => {
                for (key, seq) in changes {
                    gateway
                        .notify_resource_updated(&format!("{}{key}", state_tools::STATE_URI_PREFIX))
                        .await;
                    last = seq;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the commit log for resource updates failed")
            }
        }
    }
}

fn state_options(config: &Config) -> concord_state::StateOptions {
    let defaults = concord_state::StateOptions::default();
    concord_state::StateOptions {
        max_value_bytes: config
            .state
            .max_value_bytes
            .unwrap_or(defaults.max_value_bytes),
        proposal_ttl: config.state.proposal_ttl.unwrap_or(defaults.proposal_ttl),
        default_policy: concord_state::ConflictPolicy::Reject,
        policies: config
            .state
            .policies
            .iter()
            .map(|(namespace, policy)| {
                let policy = if policy == "merge" {
                    concord_state::ConflictPolicy::Merge
                } else {
                    concord_state::ConflictPolicy::Reject
                };
                (namespace.clone(), policy)
            })
            .collect(),
        keep_versions: config.state.keep_versions,
        schemas: config
            .state
            .schemas
            .iter()
            .map(|(namespace, schema)| (namespace.clone(), schema.clone()))
            .collect(),
    }
}

fn router(
    state: AppState,
    edge: &EdgeOptions,
    shutdown: CancellationToken,
    shared_state: Arc<concord_state::StateService>,
    governance: Option<Arc<governance::Governance>>,
    registry_state: registry::RegistryState,
    agents: Arc<agents::Agents>,
) -> Router {
    let usage_api = Router::new()
        .route("/api/v1/usage", get(agents::usage_api))
        .with_state(agents.clone());
    let registry_api = Router::new()
        .route(
            "/api/v1/registry",
            get(registry::list).post(registry::register),
        )
        .route("/api/v1/registry/resolve", get(registry::resolve_selector))
        .route(
            "/api/v1/registry/{id}/heartbeat",
            axum::routing::post(registry::heartbeat),
        )
        .route(
            "/api/v1/registry/{id}",
            axum::routing::delete(registry::deregister),
        )
        .with_state(registry_state);
    let state_api = Router::new()
        .route("/api/v1/state/changes", get(rest::feed))
        .route(
            "/api/v1/state/{*key}",
            get(rest::get_key).put(rest::put_key),
        )
        .with_state(rest::RestState {
            state: shared_state,
            governance: governance.clone(),
        })
        .merge(registry_api)
        .merge(usage_api);
    let mut mcp = state.gateway.http_router("/mcp", edge, shutdown.clone());
    // Every agent also has an MCP endpoint of its own, serving just its tool.
    for name in agents.names() {
        let own = Gateway::with_builtins(
            &concord_config::Config::default(),
            GatewayOptions {
                access: governance.clone().map(|g| {
                    Arc::new(governance::PolicyAccess(g)) as Arc<dyn concord_mcp::AccessControl>
                }),
                local_namespaces: vec![(
                    agents::AGENTS_NAMESPACE.to_string(),
                    Arc::new(agents::AgentTools {
                        agents: agents.clone(),
                        only: Some(name.clone()),
                    }),
                )],
                ..GatewayOptions::default()
            },
            state.metrics.clone(),
            None,
        );
        own.start();
        mcp = mcp.merge(own.http_router(&format!("/agents/{name}/mcp"), edge, shutdown.clone()));
    }
    let mcp = mcp.layer(middleware::from_fn_with_state(
        edge::McpEdge {
            max_body_bytes: edge.max_body_bytes,
            governance: governance.clone(),
        },
        edge::jsonrpc_edge,
    ));
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/admin/status", get(admin_status))
        .with_state(ReadyState {
            app: state,
            detailed: governance.is_none(),
        });
    let door = front_door::FrontDoor {
        hosts: Arc::new(front_door::HostPolicy::new(
            &edge.allowed_hosts,
            &edge.allowed_origins,
        )),
        governance: governance.clone(),
        sessions: Arc::default(),
    };
    if let Some(governance) = governance {
        let metadata = Router::new()
            .route(
                governance::METADATA_PATH,
                get(governance::resource_metadata),
            )
            .route(
                &format!("{}/mcp", governance::METADATA_PATH),
                get(governance::resource_metadata),
            )
            .with_state(governance);
        app = app.merge(metadata);
    }
    // The front door is a layer of the whole router: it runs for every route, after routing
    // (it reads the matched route), before any handler.
    app.merge(mcp)
        .merge(state_api)
        .layer(middleware::from_fn_with_state(door, front_door::admit))
        .layer(middleware::from_fn(http_span))
}

/// One span per HTTP request; MCP method spans nest inside it.
async fn http_span(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// What the status routes read; `detailed` when auth is off (every surface is open then).
#[derive(Clone)]
struct ReadyState {
    app: AppState,
    detailed: bool,
}

/// Readiness for probes. With auth on it is bare (`ready` only): the servers, replicas,
/// failure reasons and tool counts are `admin/read` detail, at `/api/v1/admin/status`.
async fn readyz(State(state): State<ReadyState>) -> Response {
    let ready = state.app.gateway.is_ready();
    let body = if state.detailed {
        status_body(&state.app)
    } else {
        serde_json::json!({ "ready": ready })
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

fn status_body(state: &AppState) -> serde_json::Value {
    serde_json::json!({
        "ready": state.gateway.is_ready(),
        "tools": state.gateway.tool_count(),
        "servers": state.gateway.status(),
    })
}

/// The node's detailed status (servers, replicas, breakers, failure reasons): `admin/read`.
async fn admin_status(State(state): State<ReadyState>) -> Response {
    axum::Json(status_body(&state.app)).into_response()
}

async fn metrics(State(state): State<ReadyState>) -> Response {
    let state = state.app;
    let mut body = state.metrics.render();
    // Read at scrape time from the store's own counters.
    let (transactions, commits) = state.store.commit_groups();
    body.push_str(&format!(
        "# HELP concord_state_commit_transactions_total Store transactions written by the group committer.\n\
         # TYPE concord_state_commit_transactions_total counter\n\
         concord_state_commit_transactions_total {transactions}\n\
         # HELP concord_state_commit_requests_total Commit requests those transactions carried (committed, refused or replayed).\n\
         # TYPE concord_state_commit_requests_total counter\n\
         concord_state_commit_requests_total {commits}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
