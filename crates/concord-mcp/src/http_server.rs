//! The downstream streamable HTTP endpoint (`/mcp`), with the edge checks rmcp provides
//! (Host and Origin validation against DNS rebinding, the body limit) configured from the node,
//! and a bounded session table: at most `[node] max_sessions` sessions, each closed once its
//! client has been away for `[node] session_idle_timeout`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::response::IntoResponse as _;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::ServerSseMessage;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::{
    SessionId, SessionManager, StreamableHttpServerConfig, StreamableHttpService,
};
use tokio_util::sync::CancellationToken;

use crate::Gateway;
use crate::codes::AT_CAPACITY;

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

/// How many 2025-era sessions one endpoint holds, and when an idle one is closed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub max_sessions: usize,
    /// A session with no request from its client and no open stream for this long is closed.
    pub idle_timeout: Duration,
}

impl SessionLimits {
    pub fn from_node(node: &concord_config::NodeSettings) -> Self {
        Self {
            max_sessions: node.max_sessions.max(1),
            idle_timeout: node.session_idle_timeout,
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self::from_node(&concord_config::NodeSettings::default())
    }
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
            .with_cancellation_token(shutdown.clone());
        let limits = self.shared.downstream.session_limits;
        let sessions = Arc::new(BoundedSessions::new(limits));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(expire_idle_sessions(Arc::downgrade(&sessions), shutdown));
        }
        let shared = self.shared.clone();
        let service =
            StreamableHttpService::new(move || Ok(shared.new_session()), sessions.clone(), config);
        axum::Router::new()
            .route_service(path, service)
            .layer(axum::middleware::from_fn(move |request, next| {
                refuse_past_the_session_cap(limits.max_sessions, request, next)
            }))
    }
}

tokio::task_local! {
    /// Set by the session manager when it refuses a session for the request being served.
    static SESSION_REFUSED: Arc<AtomicBool>;
}

/// rmcp answers a session it could not create with a 500 and a text body; a refusal at the
/// session cap becomes a 503 with a JSON-RPC error saying what happened.
async fn refuse_past_the_session_cap(
    max_sessions: usize,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let refused = Arc::new(AtomicBool::new(false));
    let response = SESSION_REFUSED
        .scope(refused.clone(), next.run(request))
        .await;
    if !refused.load(Ordering::Relaxed) {
        return response;
    }
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {
            "code": AT_CAPACITY,
            "message": format!(
                "the node already holds its maximum of {max_sessions} MCP sessions ([node] max_sessions); end one with DELETE, or retry once idle sessions have expired"
            ),
            "data": {"max_sessions": max_sessions},
        }
    });
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Why the session manager refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionsError {
    #[error("the node already holds its maximum of {0} MCP sessions")]
    Full(usize),
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
}

/// What the node knows of a session's client: when it was last heard from, and how many of
/// its streams (a GET stream, the answer streams of requests in flight) are open.
struct Activity {
    last: Instant,
    open_streams: usize,
}

/// rmcp's in-memory session manager with a cap on the number of sessions and an idle expiry
/// that counts only the client's doing (its requests and open streams), so a session whose
/// client went away expires even while upstream log messages keep being sent to it.
pub(crate) struct BoundedSessions {
    inner: LocalSessionManager,
    limits: SessionLimits,
    /// Sessions created and not closed (and creations under way).
    count: AtomicUsize,
    activity: Arc<Mutex<HashMap<SessionId, Activity>>>,
}

impl BoundedSessions {
    fn new(limits: SessionLimits) -> Self {
        let mut inner = LocalSessionManager::default();
        // rmcp's own keep-alive counts the node's messages to the client as activity (a
        // session fed log messages would never expire) and ends a session whose client is
        // listening on an open stream; expiry is decided here instead.
        inner.session_config.keep_alive = None;
        Self {
            inner,
            limits,
            count: AtomicUsize::new(0),
            activity: Arc::default(),
        }
    }

    fn touch(&self, id: &SessionId) {
        if let Some(activity) = self.activity.lock().get_mut(id) {
            activity.last = Instant::now();
        }
    }

    /// Counts a stream as open until it is dropped (the client went away, or it ended).
    fn track<S>(
        &self,
        id: &SessionId,
        stream: S,
    ) -> impl Stream<Item = S::Item> + Send + Sync + use<S>
    where
        S: Stream + Send + Sync + 'static,
        S::Item: 'static,
    {
        if let Some(activity) = self.activity.lock().get_mut(id) {
            activity.open_streams += 1;
            activity.last = Instant::now();
        }
        let open = OpenStream {
            activity: Arc::downgrade(&self.activity),
            id: id.clone(),
        };
        stream.map(move |item| {
            let _open = &open;
            item
        })
    }

    /// Sessions whose client has not been heard from for the idle timeout and holds no stream.
    fn idle(&self) -> Vec<SessionId> {
        let idle = self.limits.idle_timeout;
        self.activity
            .lock()
            .iter()
            .filter(|(_, a)| a.open_streams == 0 && a.last.elapsed() >= idle)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// An open stream of a session (see [`BoundedSessions::track`]).
struct OpenStream {
    activity: Weak<Mutex<HashMap<SessionId, Activity>>>,
    id: SessionId,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(activity) = self.activity.upgrade()
            && let Some(activity) = activity.lock().get_mut(&self.id)
        {
            activity.open_streams = activity.open_streams.saturating_sub(1);
            activity.last = Instant::now();
        }
    }
}

/// Closes idle sessions, checking a few times per idle timeout, until the endpoint is gone or
/// the node shuts down.
async fn expire_idle_sessions(sessions: Weak<BoundedSessions>, shutdown: CancellationToken) {
    /// How long closing one session may take before its slot is given back anyway.
    const CLOSE_LIMIT: Duration = Duration::from_secs(5);
    let Some(period) = sessions.upgrade().map(|s| {
        (s.limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(30))
    }) else {
        return;
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        for id in sessions.idle() {
            tracing::debug!(session = %id, "closing an idle MCP session");
            let closed = tokio::time::timeout(CLOSE_LIMIT, sessions.inner.close_session(&id)).await;
            if !matches!(closed, Ok(Ok(()))) {
                tracing::debug!(session = %id, "an idle session did not close cleanly");
            }
            sessions.forget(&id);
        }
    }
}

impl BoundedSessions {
    /// Gives a closed session's slot back (once).
    fn forget(&self, id: &SessionId) {
        if self.activity.lock().remove(id).is_some() {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl SessionManager for BoundedSessions {
    type Error = SessionsError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let max = self.limits.max_sessions;
        let reserved = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if reserved.is_err() {
            let _ = SESSION_REFUSED.try_with(|refused| refused.store(true, Ordering::Relaxed));
            tracing::warn!(
                max_sessions = max,
                "MCP session refused: the node holds its maximum of sessions"
            );
            return Err(SessionsError::Full(max));
        }
        match self.inner.create_session().await {
            Ok((id, transport)) => {
                self.activity.lock().insert(
                    id.clone(),
                    Activity {
                        last: Instant::now(),
                        open_streams: 0,
                    },
                );
                Ok((id, transport))
            }
            Err(e) => {
                self.count.fetch_sub(1, Ordering::AcqRel);
                Err(e.into())
            }
        }
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.touch(id);
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        // Every request naming a session asks this first: the client is there.
        self.touch(id);
        Ok(self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let closed = self.inner.close_session(id).await;
        self.forget(id);
        Ok(closed?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let stream = self.inner.create_stream(id, message).await?;
        Ok(self.track(id, stream))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.touch(id);
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let stream = self.inner.create_standalone_stream(id).await?;
        Ok(self.track(id, stream))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let stream = self.inner.resume(id, last_event_id).await?;
        Ok(self.track(id, stream))
    }
}
