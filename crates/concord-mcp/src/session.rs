//! The MCP server every downstream client talks to. One `GatewaySession` value exists per
//! session (or per request, for sessionless clients); it holds nothing but the shared state, so
//! no gateway state is ever tied to a session id.

use std::sync::Arc;
use std::time::Instant;

use concord_telemetry::Outcome;
use rmcp::ErrorData as McpError;
use rmcp::ServerHandler;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult,
    CancelledNotificationParam, ClientRequest, ClientResult, CompleteRequest,
    CompleteRequestParams, CompleteResult, CustomRequest, CustomResult, ErrorCode,
    GetPromptRequest, GetPromptRequestParams, GetPromptResponse, Implementation, ListPromptsResult,
    ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ProgressToken, ReadResourceRequest, ReadResourceRequestParams,
    ReadResourceResponse, Reference, RequestMetaObject, ResultType, ServerCapabilities,
    ServerConfig, ServerRequest, ServerResult, SetLevelRequest, SetLevelRequestParams,
    SubscribeRequestParams, SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{
    NotificationContext, Peer, PeerRequestOptions, RequestContext, RoleClient, RoleServer,
    SubscriptionContext,
};
use tracing::Instrument;

use crate::access::{AccessRequest, CallOutcome, Identity, identity_of};
use crate::builtin::{BUILTIN_NAMESPACE, BuiltinTools, Caller};
use crate::catalog::Catalog;
use crate::error::{GatewayError, PeerError};
use crate::gateway::{
    CallEvent, CallGuard, NameKind, ReplicaTicket, Shared, server_request_method, severity,
};
use crate::methods::McpAccess;
use crate::subscriptions::{SessionId, Subscriber};
use crate::tap::GATEWAY_META_PREFIX;
use crate::upstream::hold_subscription;
use futures::StreamExt;
use rmcp::model::{
    InputRequest, InputRequests, InputRequiredResult, InputResponses, LoggingLevel,
    LoggingMessageNotificationParam, ProtocolVersion, RequestId,
};
use rmcp::service::ServiceError;
use std::collections::HashMap;
use tokio::sync::oneshot;

#[derive(Clone)]
pub(crate) struct GatewaySession {
    pub shared: Arc<Shared>,
    pub id: SessionId,
    /// The node's own client is on the other end (see [`crate::internal`]).
    pub internal: bool,
}

/// What the access hook asked of the upstream request of the call being served: extra `_meta`
/// (a child budget envelope) and a deadline that caps the upstream timeout; and where the
/// usage its server reports is kept, when that server is trusted to report it.
#[derive(Clone, Default)]
struct CallShaping {
    extra_meta: rmcp::model::JsonObject,
    time_left: Option<std::time::Duration>,
    reported_usage: Arc<parking_lot::Mutex<Option<serde_json::Value>>>,
}

tokio::task_local! {
    static CALL_SHAPING: CallShaping;
}

/// The `_meta` key of the budget envelope a call runs under.
const BUDGET_META: &str = "concord/budget";
/// The `_meta` key under which a server reports what a tool call spent (tokens, cost): taken
/// from the servers configured to report it (`report_usage`), dropped from every other.
const USAGE_META: &str = "concord/usage";

/// Takes the gateway's own `_meta` namespace (`concord/…`) out of an upstream's result, as it
/// is taken out of a client's request: what an upstream says there (cache hits, truncation,
/// usage, budgets) is never passed on as if the gateway had said it. Returns the usage the
/// result claims, for the caller to accept or not.
fn take_gateway_meta(result: &mut ServerResult) -> Option<serde_json::Value> {
    let meta = match result {
        ServerResult::CallToolResult(r) => &mut r.meta,
        ServerResult::GetPromptResult(r) => &mut r.meta,
        ServerResult::ReadResourceResult(r) => &mut r.meta,
        ServerResult::CompleteResult(r) => &mut r.meta,
        ServerResult::InputRequiredResult(r) => &mut r.meta,
        ServerResult::ListToolsResult(r) => &mut r.meta,
        ServerResult::ListPromptsResult(r) => &mut r.meta,
        ServerResult::ListResourcesResult(r) => &mut r.meta,
        ServerResult::ListResourceTemplatesResult(r) => &mut r.meta,
        _ => return None,
    };
    let map = meta.as_mut()?;
    let usage = map.0.remove(USAGE_META);
    crate::tap::strip_gateway_keys(&mut map.0);
    if map.0.is_empty() {
        *meta = None;
    }
    usage
}

/// Server-to-client requests (sampling, elicitation, roots) one call may put to its caller;
/// past it, the upstream's further requests are refused at once (never queued).
pub(crate) const MAX_CLIENT_REQUESTS_PER_CALL: usize = 64;

/// The upstream's answer to a server-to-client request past the per-call limit.
fn too_many_client_requests(request: &ServerRequest) -> McpError {
    McpError::invalid_request(
        format!(
            "{} refused: this call already put {MAX_CLIENT_REQUESTS_PER_CALL} requests to its client, the most one call may",
            server_request_method(request)
        ),
        Some(serde_json::json!({ "limit": MAX_CLIENT_REQUESTS_PER_CALL })),
    )
}

/// `_meta` keys that describe one hop of the protocol (the client's own lifecycle data in the
/// 2026-07-28 era, and the progress token rmcp re-issues per hop); every other key, such as
/// `traceparent` or application keys, travels upstream unchanged.
fn forwardable_meta(meta: &RequestMetaObject) -> RequestMetaObject {
    let mut forwarded = RequestMetaObject::new();
    for (key, value) in meta.0.0.iter() {
        // `concord/…` keys are the gateway's own (budget envelopes, the caller): what a client
        // sends under them is never passed on as if the gateway had said it.
        if key == "progressToken"
            || key.starts_with("io.modelcontextprotocol/")
            || key.starts_with(GATEWAY_META_PREFIX)
        {
            continue;
        }
        forwarded.0.0.insert(key.clone(), value.clone());
    }
    forwarded
}

/// One upstream request on its way: what [`GatewaySession::drive`] needs to finish it, and all
/// of it owned, so that a call can be parked between a 2026-07-28 client's rounds.
pub(crate) struct InFlight {
    /// The logical server (errors name it).
    server: Arc<str>,
    method: &'static str,
    /// Cancelled when the replica's connection is found dead.
    lost: tokio_util::sync::CancellationToken,
    ticket: ReplicaTicket,
    upstream: Peer<RoleClient>,
    upstream_id: RequestId,
    response: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ServerResult, ServiceError>> + Send>,
    >,
    events: tokio::sync::mpsc::UnboundedReceiver<CallEvent>,
    /// Server-to-client requests of this call put to its caller so far (bounded by
    /// [`MAX_CLIENT_REQUESTS_PER_CALL`]; a parked call keeps its count).
    client_requests: usize,
    _routes: CallGuard,
}

fn is_modern(context: &RequestContext<RoleServer>) -> bool {
    context
        .protocol_version()
        .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str())
}

/// The kind of answer an input request expects, to read the client's reply back.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InputKind {
    Sampling,
    Elicitation,
    Roots,
}

impl InputKind {
    fn parse(self, value: serde_json::Value) -> Result<ClientResult, McpError> {
        let invalid = |e: serde_json::Error| {
            McpError::invalid_params(format!("malformed input response: {e}"), None)
        };
        Ok(match self {
            InputKind::Sampling => ClientResult::CreateMessageResult(Box::new(
                serde_json::from_value(value).map_err(invalid)?,
            )),
            InputKind::Elicitation => {
                ClientResult::ElicitResult(serde_json::from_value(value).map_err(invalid)?)
            }
            InputKind::Roots => {
                ClientResult::ListRootsResult(serde_json::from_value(value).map_err(invalid)?)
            }
        })
    }
}

fn as_input_request(request: ServerRequest) -> Option<InputRequest> {
    match request {
        ServerRequest::CreateMessageRequest(r) => Some(InputRequest::CreateMessage(r)),
        ServerRequest::ElicitRequest(r) => Some(InputRequest::Elicitation(r)),
        ServerRequest::ListRootsRequest(r) => Some(InputRequest::ListRoots(r)),
        _ => None,
    }
}

fn input_kind(input: &InputRequest) -> InputKind {
    match input {
        InputRequest::CreateMessage(_) => InputKind::Sampling,
        InputRequest::Elicitation(_) => InputKind::Elicitation,
        _ => InputKind::Roots,
    }
}

/// An upstream call parked while a 2026-07-28 client answers its input requests.
pub(crate) struct SuspendedCall {
    call: InFlight,
    /// Input request key → what it asked and where the upstream waits for the answer.
    answers: HashMap<String, (InputKind, oneshot::Sender<Result<ClientResult, McpError>>)>,
}

/// Parked calls by their `requestState` token (see [`crate::parked`]).
pub(crate) type SuspendedCalls = crate::parked::Parked<SuspendedCall>;

/// Input-required rounds answered for a 2025-era caller before the gateway gives up.
const MAX_INPUT_ROUNDS: usize = 10;
/// Replicas one call may find unable to take it before it gives up (nothing was sent to them).
const MAX_UNSENT_ATTEMPTS: u32 = 8;

/// `base` scaled by a random factor in [0.5, 1.5), so that callers that failed together do
/// not retry together.
fn jittered(base: std::time::Duration) -> std::time::Duration {
    base.mul_f64(0.5 + fastrand::f64())
}

async fn relay_progress(
    peer: &Peer<RoleServer>,
    downstream_token: &Option<ProgressToken>,
    mut params: ProgressNotificationParam,
) {
    // A caller that sent no progress token asked for no progress.
    let Some(token) = downstream_token else {
        return;
    };
    params.progress_token = token.clone();
    if let Err(e) = peer.notify_progress(params).await {
        tracing::debug!(error = %e, "progress for a client that has gone");
    }
}

/// A 2026-07-28 caller asks for log messages per request (`_meta` log level) and hears them on
/// that request's stream; callers of the 2025 era set a session level and hear them from the
/// session broadcast instead.
async fn relay_log(
    peer: &Peer<RoleServer>,
    server: &str,
    floor: Option<LoggingLevel>,
    mut params: LoggingMessageNotificationParam,
) {
    let Some(floor) = floor else {
        return;
    };
    if severity(params.level) < severity(floor) {
        return;
    }
    if params.logger.is_none() {
        params.logger = Some(server.to_string());
    }
    if let Err(e) = peer.notify_logging_message(params).await {
        tracing::debug!(error = %e, "log message for a client that has gone");
    }
}

/// Puts an upstream's sampling or elicitation request to the calling client, if it declared
/// the capability; otherwise the upstream hears that this client cannot answer.
async fn ask_client(
    peer: &Peer<RoleServer>,
    request: ServerRequest,
) -> Result<ClientResult, McpError> {
    let capabilities = peer.peer_info().map(|info| info.capabilities.clone());
    let declared = match &request {
        ServerRequest::CreateMessageRequest(_) => {
            capabilities.as_ref().is_some_and(|c| c.sampling.is_some())
        }
        // URL mode must be declared explicitly; an elicitation capability without modes means
        // form mode (the 2025-06-18 shape).
        ServerRequest::ElicitRequest(r)
            if matches!(
                r.params,
                rmcp::model::ElicitRequestParams::UrlElicitationParams { .. }
            ) =>
        {
            capabilities
                .as_ref()
                .and_then(|c| c.elicitation.as_ref())
                .is_some_and(|e| e.url.is_some())
        }
        ServerRequest::ElicitRequest(_) => capabilities
            .as_ref()
            .is_some_and(|c| c.elicitation.is_some()),
        ServerRequest::ListRootsRequest(_) => {
            capabilities.as_ref().is_some_and(|c| c.roots.is_some())
        }
        _ => true,
    };
    if !declared {
        return Err(McpError::invalid_request(
            format!(
                "the calling client does not support {}",
                server_request_method(&request)
            ),
            None,
        ));
    }
    let method = server_request_method(&request).to_string();
    peer.send_request(request).await.map_err(|e| match e {
        rmcp::service::ServiceError::McpError(e) => e,
        other => McpError::internal_error(
            format!(
                "{method} to the client failed: {}",
                crate::error::describe_service_error(&other)
            ),
            None,
        ),
    })
}

/// 2026-07-28 requires `resultType` on every result, and 2025-era upstreams never send one. An
/// absent type means "complete" in both eras, so saying so explicitly is always correct; rmcp
/// removes it again for clients of older versions.
fn with_result_type(mut result: ServerResult) -> ServerResult {
    let slot = match &mut result {
        ServerResult::CallToolResult(r) => &mut r.result_type,
        ServerResult::GetPromptResult(r) => &mut r.result_type,
        ServerResult::ReadResourceResult(r) => &mut r.result_type,
        ServerResult::CompleteResult(r) => &mut r.result_type,
        _ => return result,
    };
    slot.get_or_insert(ResultType::COMPLETE);
    result
}

fn page<T: Clone>(
    items: &[T],
    cursor: Option<&str>,
    page_size: usize,
) -> Result<(Vec<T>, Option<String>), McpError> {
    let start = match cursor {
        None => 0,
        Some(c) => c
            .strip_prefix("o:")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n <= items.len())
            .ok_or_else(|| McpError::invalid_params(format!("invalid cursor {c:?}"), None))?,
    };
    let end = (start + page_size.max(1)).min(items.len());
    let next = (end < items.len()).then(|| format!("o:{end}"));
    Ok((items[start..end].to_vec(), next))
}

fn cursor(params: &Option<PaginatedRequestParams>) -> Option<&str> {
    params.as_ref().and_then(|p| p.cursor.as_deref())
}

impl GatewaySession {
    /// A connected peer of the logical server `server` (its first connected replica), for
    /// requests that belong to no call (subscriptions).
    fn upstream_peer(
        &self,
        server: &str,
    ) -> Result<(Peer<RoleClient>, std::time::Duration), GatewayError> {
        self.shared
            .any_peer(server)
            .map_err(|reason| GatewayError::Unavailable {
                server: server.to_string(),
                reason,
            })
    }

    /// Sends `request` to `server` and drives it to its end (see [`Self::drive`]). Methods
    /// that only read (`prompts/get`, `resources/read`, `completion/complete`) fail over to
    /// another replica like read-only tools do.
    async fn forward(
        &self,
        server: &Arc<str>,
        method: &'static str,
        request: ClientRequest,
        context: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, GatewayError> {
        let safe = matches!(
            method,
            "prompts/get" | "resources/read" | "completion/complete"
        );
        self.forward_with_failover(server, method, None, safe, &|| request.clone(), context)
            .await
    }

    /// Sends a request to a replica of `server` chosen by load, and on a replica failure
    /// (unreachable, hung up, timed out, internal error) tries another: always when nothing
    /// was sent, and after a sent request only when `safe` (the request may have been carried
    /// out; replaying it must not matter). Attempts are bounded by `[routing] retry_attempts`
    /// and spaced by exponential backoff with jitter, never past the caller's deadline.
    async fn forward_with_failover(
        &self,
        server: &Arc<str>,
        method: &'static str,
        tool: Option<&str>,
        safe: bool,
        request: &(dyn Fn() -> ClientRequest + Sync),
        context: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, GatewayError> {
        let routing = &self.shared.routing;
        let time_left = CALL_SHAPING
            .try_with(|shaping| shaping.time_left)
            .ok()
            .flatten();
        let budget = time_left.or_else(|| {
            self.shared
                .pool_member(server)
                .map(|u| u.spec.request_timeout)
        });
        let deadline = budget.map(|b| Instant::now() + b);
        let mut failed: Vec<Arc<str>> = Vec::new();
        let mut sent_attempts = 0u32;
        let mut unsent_attempts = 0u32;
        let mut backoff = routing.retry_backoff;
        let mut last_error: Option<GatewayError> = None;
        loop {
            let started = match self
                .start_call(server, method, request(), context, &failed)
                .await
            {
                Ok(call) => call,
                Err((error, replica)) => {
                    // Nothing reached an upstream: another replica may take it at once.
                    unsent_attempts += 1;
                    let again = replica.is_some() && unsent_attempts <= MAX_UNSENT_ATTEMPTS;
                    if let Some(replica) = replica {
                        failed.push(replica);
                    }
                    if again {
                        last_error = Some(error);
                        continue;
                    }
                    return Err(last_error.unwrap_or(error));
                }
            };
            let replica = started.ticket.replica.name.clone();
            match self.drive(started, context).await {
                Err(error) if error.is_replica_failure() => {
                    sent_attempts += 1;
                    let unknown_effect = matches!(
                        error,
                        GatewayError::Timeout { .. } | GatewayError::ConnectionLost { .. }
                    );
                    if !safe {
                        return Err(match tool {
                            Some(tool) if unknown_effect => GatewayError::MayHaveExecuted {
                                server: server.to_string(),
                                tool: tool.to_string(),
                                cause: Box::new(error),
                            },
                            _ => error,
                        });
                    }
                    if sent_attempts >= routing.retry_attempts {
                        return Err(error);
                    }
                    let pause = jittered(backoff);
                    backoff = backoff.saturating_mul(2);
                    if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                        return Err(error);
                    }
                    tracing::info!(server = %server, replica = %replica, error = %error, retry_in_ms = pause.as_millis() as u64, "retrying on another replica");
                    self.shared
                        .metrics
                        .count_retry(server, tool.unwrap_or(method));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = context.ct.cancelled() => return Err(GatewayError::Cancelled),
                    }
                    failed.push(replica);
                    last_error = Some(error);
                }
                other => return other,
            }
        }
    }

    /// Sends `request` to a replica of `server` not in `exclude`. On failure, also says which
    /// replica refused it (`None`: no replica could be chosen).
    async fn start_call(
        &self,
        server: &Arc<str>,
        method: &'static str,
        request: ClientRequest,
        context: &RequestContext<RoleServer>,
        exclude: &[Arc<str>],
    ) -> Result<InFlight, (GatewayError, Option<Arc<str>>)> {
        let picked = match self.shared.pick(server, exclude) {
            Ok(picked) => Ok(picked),
            // Every replica has failed this call once: any of them may have recovered.
            Err(_) if !exclude.is_empty() => self.shared.pick(server, &[]),
            Err(none) => Err(none),
        };
        let (replica, pass) = picked.map_err(|none| {
            (
                GatewayError::Unavailable {
                    server: server.to_string(),
                    reason: none.reason,
                },
                None,
            )
        })?;
        let mut ticket = ReplicaTicket::new(replica.clone(), pass);
        let (peer, lost) = match replica.connection() {
            Ok(connection) => connection,
            Err(reason) => {
                ticket.finish(&self.shared, true);
                let error = GatewayError::Unavailable {
                    server: server.to_string(),
                    reason,
                };
                return Err((error, Some(replica.name.clone())));
            }
        };
        let mut timeout = replica.spec.request_timeout;
        let mut meta = forwardable_meta(&context.meta);
        if let Ok(shaping) = CALL_SHAPING.try_with(CallShaping::clone) {
            for (key, value) in shaping.extra_meta {
                meta.0.0.insert(key, value);
            }
            if let Some(left) = shaping.time_left {
                timeout = timeout.min(left);
            }
        }
        let options = PeerRequestOptions::with_timeout(timeout).with_meta(meta);
        // Held until the routes below are registered: an upstream that asks its client
        // something (roots, sampling) before that waits for them instead of being refused.
        let sending = self.shared.router.sending(replica.name.clone());
        let handle = match peer.send_request_with_option(request, options).await {
            Ok(handle) => handle,
            Err(e) => {
                ticket.finish(&self.shared, true);
                let error = GatewayError::from_service(server, method, e);
                return Err((error, Some(replica.name.clone())));
            }
        };
        let upstream_id = handle.id.clone();
        let (routes, events) = self.shared.router.register(
            replica.name.clone(),
            upstream_id.clone(),
            handle.progress_token.clone(),
        );
        drop(sending);
        Ok(InFlight {
            server: server.clone(),
            method,
            upstream: peer,
            upstream_id,
            response: Box::pin(handle.await_response()),
            events,
            client_requests: 0,
            lost,
            ticket,
            _routes: routes,
        })
    }

    /// Waits for an upstream call's response, meanwhile relaying its progress to the caller,
    /// putting its sampling/elicitation requests to the caller, and forwarding the caller's
    /// cancellation to that upstream only. For a 2026-07-28 caller, whose protocol has no
    /// server-to-client requests, the call is suspended instead and the caller gets an
    /// `input_required` result; its retry with the answers resumes the same upstream call.
    async fn drive(
        &self,
        mut call: InFlight,
        context: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, GatewayError> {
        let downstream_token = context.meta.get_progress_token();
        let modern = is_modern(context);
        // A per-request log level is asking for log lines as much as `logging/setLevel` is.
        let log_floor = if modern {
            context
                .meta
                .log_level()
                .filter(|_| self.admit_method(context, "logging/setLevel").is_ok())
        } else {
            None
        };
        // Requests to the client run beside the wait for the upstream's response (the upstream
        // usually needs their answers to finish), inside this handler's task so that rmcp sends
        // them on this request's own response stream.
        let mut client_requests = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(event) = call.events.recv() => match event {
                    CallEvent::Progress(params) => {
                        relay_progress(&context.peer, &downstream_token, params).await;
                    }
                    CallEvent::Log(params) => {
                        relay_log(&context.peer, &call.server, log_floor, params).await;
                    }
                    CallEvent::Request { request, reply }
                        if call.client_requests >= MAX_CLIENT_REQUESTS_PER_CALL =>
                    {
                        let _ = reply.send(Err(too_many_client_requests(&request)));
                    }
                    CallEvent::Request { request, reply } if modern => {
                        call.client_requests += 1;
                        return self.suspend(call, request, reply, context);
                    }
                    CallEvent::Request { request, reply } => {
                        call.client_requests += 1;
                        let peer = context.peer.clone();
                        client_requests.push(async move {
                            let answer = ask_client(&peer, request).await;
                            let _ = reply.send(answer);
                        });
                    }
                },
                Some(()) = client_requests.next(), if !client_requests.is_empty() => {}
                result = &mut call.response => {
                    // Everything the upstream sent before its response is already queued.
                    while let Ok(event) = call.events.try_recv() {
                        match event {
                            CallEvent::Progress(params) => {
                                relay_progress(&context.peer, &downstream_token, params).await;
                            }
                            CallEvent::Log(params) => {
                                relay_log(&context.peer, &call.server, log_floor, params).await;
                            }
                            CallEvent::Request { .. } => {}
                        }
                    }
                    let outcome = result
                        .map(|mut answer| {
                            if let Some(usage) = take_gateway_meta(&mut answer) {
                                Self::claimed_usage(&call, usage);
                            }
                            with_result_type(answer)
                        })
                        .map_err(|e| GatewayError::from_service(&call.server, call.method, e));
                    call.ticket.finish(
                        &self.shared,
                        outcome.as_ref().is_err_and(GatewayError::is_replica_failure),
                    );
                    return outcome;
                }
                _ = call.lost.cancelled() => {
                    call.ticket.finish(&self.shared, true);
                    return Err(GatewayError::ConnectionLost {
                        server: call.server.to_string(),
                        method: call.method.to_string(),
                        reason: format!(
                            "replica {} stopped answering while serving the call",
                            call.ticket.replica.name
                        ),
                    });
                }
                _ = context.ct.cancelled() => {
                    let _ = call
                        .upstream
                        .notify_cancelled(CancelledNotificationParam::new(
                            Some(call.upstream_id.clone()),
                            Some("cancelled by the downstream client".to_string()),
                        ))
                        .await;
                    return Err(GatewayError::Cancelled);
                }
            }
        }
    }

    /// Keeps the usage `call`'s result claims for the call's settlement, if its server is
    /// configured to report usage (`report_usage`); a claim from any other server is dropped.
    fn claimed_usage(call: &InFlight, usage: serde_json::Value) {
        if !call.ticket.replica.spec.report_usage {
            tracing::debug!(server = %call.server, "usage reported by a server not trusted to report it; ignored");
            return;
        }
        let _ = CALL_SHAPING.try_with(|shaping| *shaping.reported_usage.lock() = Some(usage));
    }

    /// Parks `call` until the caller answers `first` (and any other request the upstream has
    /// already queued), and tells the caller what to answer.
    fn suspend(
        &self,
        mut call: InFlight,
        first: ServerRequest,
        reply: oneshot::Sender<Result<ClientResult, McpError>>,
        context: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, GatewayError> {
        let mut pending = vec![(first, reply)];
        let mut early_progress = Vec::new();
        while let Ok(event) = call.events.try_recv() {
            match event {
                CallEvent::Request { request, reply }
                    if call.client_requests >= MAX_CLIENT_REQUESTS_PER_CALL =>
                {
                    let _ = reply.send(Err(too_many_client_requests(&request)));
                }
                CallEvent::Request { request, reply } => {
                    call.client_requests += 1;
                    pending.push((request, reply));
                }
                CallEvent::Progress(params) => early_progress.push(params),
                // The caller's retry is a new request with a stream of its own; what was
                // logged before the suspension has no stream left to go to.
                CallEvent::Log(_) => {}
            }
        }
        let mut input_requests = InputRequests::new();
        let mut answers = HashMap::new();
        for (index, (request, reply)) in pending.into_iter().enumerate() {
            let key = format!("concord-{index}");
            let Some(input) = as_input_request(request) else {
                let _ = reply.send(Err(McpError::invalid_request(
                    "this request cannot be carried to a 2026-07-28 client",
                    None,
                )));
                continue;
            };
            answers.insert(key.clone(), (input_kind(&input), reply));
            input_requests.insert(key, input);
        }
        let owner = Self::result_owner(identity_of(context).as_ref());
        let token = self
            .shared
            .suspended
            .park(owner, SuspendedCall { call, answers })
            .map_err(|(_refused, error)| error)?;
        Ok(ServerResult::InputRequiredResult(InputRequiredResult::new(
            Some(input_requests),
            Some(token),
        )))
    }

    /// A 2026-07-28 upstream asked for input (`input_required`), but the caller speaks
    /// 2025-11-25: put each request to the caller as a server-to-client request, and retry the
    /// upstream call with the answers, for as many rounds as the upstream needs (bounded).
    async fn answer_input_rounds(
        &self,
        route: &crate::catalog::Route,
        arguments: Option<rmcp::model::JsonObject>,
        mut input: InputRequiredResult,
        context: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, GatewayError> {
        let mut asked = 0usize;
        for _ in 0..MAX_INPUT_ROUNDS {
            let mut responses = InputResponses::new();
            let requests = input.input_requests.take().unwrap_or_default();
            asked = asked.saturating_add(requests.len());
            if asked > MAX_CLIENT_REQUESTS_PER_CALL {
                return Err(GatewayError::Upstream(PeerError(McpError::internal_error(
                    format!(
                        "server '{}' asked for more than {MAX_CLIENT_REQUESTS_PER_CALL} inputs during one call",
                        route.server
                    ),
                    Some(serde_json::json!({ "limit": MAX_CLIENT_REQUESTS_PER_CALL })),
                ))));
            }
            for (key, request) in requests {
                let request = match request {
                    InputRequest::CreateMessage(r) => ServerRequest::CreateMessageRequest(r),
                    InputRequest::Elicitation(r) => ServerRequest::ElicitRequest(r),
                    InputRequest::ListRoots(r) => ServerRequest::ListRootsRequest(r),
                    _ => continue,
                };
                let answer = ask_client(&context.peer, request)
                    .await
                    .map_err(|e| GatewayError::Upstream(PeerError(e)))?;
                let value = match answer {
                    ClientResult::CreateMessageResult(r) => serde_json::to_value(r),
                    ClientResult::ElicitResult(r) => serde_json::to_value(r),
                    ClientResult::ListRootsResult(r) => serde_json::to_value(r),
                    other => serde_json::to_value(other),
                }
                .map_err(|e| {
                    GatewayError::Upstream(PeerError(McpError::internal_error(e.to_string(), None)))
                })?;
                responses.insert(key, value);
            }
            let mut retry = CallToolRequestParams::new(route.name.clone());
            retry.arguments = arguments.clone();
            retry.input_responses = Some(responses);
            retry.request_state = input.request_state.take();
            let request = ClientRequest::CallToolRequest(CallToolRequest::new(retry));
            match self
                .forward(&route.server, "tools/call", request, context)
                .await?
            {
                ServerResult::InputRequiredResult(next) => input = next,
                done => return Ok(done),
            }
        }
        Err(GatewayError::Upstream(PeerError(McpError::internal_error(
            format!(
                "server '{}' kept asking for input after {MAX_INPUT_ROUNDS} rounds",
                route.server
            ),
            None,
        ))))
    }

    /// Runs a tool the node serves itself. `budget_envelope`: what the gateway issued for the
    /// call (its sub-calls draw on it, and an agent charges its model turns to it).
    async fn call_builtin(
        &self,
        builtins: &dyn BuiltinTools,
        name: &str,
        arguments: rmcp::model::JsonObject,
        context: &RequestContext<RoleServer>,
        budget_envelope: Option<serde_json::Value>,
    ) -> CallToolResult {
        let internal = context
            .extensions
            .get::<crate::internal::InternalCaller>()
            .map(|registered| registered.caller.clone());
        // Progress the tool reports goes out in order, from one task, and all of it before the
        // result (the task is awaited once the tool is done and its sink dropped). The node's
        // own calls bring their sink along.
        let (progress, forwarder) = match context.meta.get_progress_token() {
            Some(_) if internal.is_some() => (None, None),
            Some(token) => {
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<(f64, Option<f64>, String)>();
                let peer = context.peer.clone();
                let forwarder = tokio::spawn(async move {
                    while let Some((progress, total, message)) = rx.recv().await {
                        let mut params = ProgressNotificationParam::new(token.clone(), progress);
                        params.total = total;
                        params.message = Some(message);
                        if peer.notify_progress(params).await.is_err() {
                            return;
                        }
                    }
                });
                let sink = crate::builtin::ProgressSink(Arc::new(move |p, t, m| {
                    let _ = tx.send((p, t, m));
                }));
                (Some(sink), Some(forwarder))
            }
            None => (None, None),
        };
        let caller = match internal {
            Some(registered) => Caller {
                // Cancelled when the node's client drops the request.
                cancel: context.ct.clone(),
                budget_envelope,
                ..registered
            },
            None => {
                let identity = identity_of(context);
                Caller {
                    principal: match &identity {
                        Some(identity) => identity.principal.clone(),
                        None => context
                            .peer
                            .peer_info()
                            .map(|info| info.client_info.name.clone())
                            .filter(|name| !name.is_empty())
                            .unwrap_or_else(|| "anonymous".to_string()),
                    },
                    identity,
                    trace_id: context.meta.get_traceparent().map(str::to_string),
                    cancel: context.ct.clone(),
                    progress,
                    budget_envelope,
                    ..Caller::default()
                }
            }
        };
        let outcome = builtins.call(name, arguments, caller).await;
        if let Some(forwarder) = forwarder {
            let _ = forwarder.await;
        }
        let text = serde_json::to_string(&outcome.structured).unwrap_or_default();
        let mut result = if outcome.is_error {
            CallToolResult::structured_error(outcome.structured)
        } else {
            CallToolResult::structured(outcome.structured)
        };
        result.content = vec![rmcp::model::ContentBlock::text(text)];
        result
    }

    /// Resumes a call parked by [`Self::suspend`] with the caller's answers.
    async fn resume(
        &self,
        request_state: &str,
        responses: Option<InputResponses>,
        context: &RequestContext<RoleServer>,
    ) -> Result<ServerResult, GatewayError> {
        let owner = Self::result_owner(identity_of(context).as_ref());
        let Some(parked) = self.shared.suspended.take(request_state, &owner) else {
            return Err(GatewayError::UnknownRequestState);
        };
        let mut responses = responses.unwrap_or_default();
        for (key, (kind, reply)) in parked.answers {
            let answer = match responses.remove(&key) {
                Some(value) => kind.parse(value),
                None => Err(McpError::invalid_params(
                    format!("the client sent no answer for input request {key}"),
                    None,
                )),
            };
            let _ = reply.send(answer);
        }
        self.drive(parked.call, context).await
    }

    fn observe(&self, method: &str, server: &str, ok: bool) {
        self.shared.metrics.observe_request(
            method,
            server,
            if ok { Outcome::Ok } else { Outcome::Error },
        );
    }

    /// The cache TTL for `tool` of `server`: the tool's own `cache_ttl` when configured (0
    /// turns caching off), else the server's `cache_ttl` if the tool says it is read-only.
    fn cacheable(&self, server: &str, tool: &str) -> Option<std::time::Duration> {
        let upstream = self.shared.pool_member(server)?;
        if let Some(ttl) = upstream.spec.tools.get(tool).and_then(|t| t.cache_ttl) {
            return (!ttl.is_zero()).then_some(ttl);
        }
        let ttl = upstream.spec.cache_ttl?;
        let state = upstream.state.read();
        let read_only = state
            .lists
            .tools
            .iter()
            .find(|t| &*t.name == tool)
            .and_then(|t| t.annotations.as_ref())
            .and_then(|a| a.read_only_hint)
            == Some(true);
        read_only.then_some(ttl)
    }

    /// Who owns what a truncation keeps back: the principal (auth on), else everyone on this
    /// node (handles are unguessable).
    fn result_owner(identity: Option<&crate::access::Identity>) -> String {
        identity.map_or_else(|| "-".to_string(), |i| i.principal.clone())
    }

    /// Cuts `result` to the caller's token limit (`_meta["concord/max_result_tokens"]`, else
    /// `[routing] max_result_tokens`), if it has one and the result is longer.
    fn fit_to_budget(
        &self,
        result: &mut CallToolResult,
        route: &crate::catalog::Route,
        context: &RequestContext<RoleServer>,
        identity: Option<&crate::access::Identity>,
    ) {
        let asked = context
            .meta
            .0
            .0
            .get("concord/max_result_tokens")
            .and_then(serde_json::Value::as_u64);
        let Some(limit) = asked.or(self.shared.routing.max_result_tokens) else {
            return;
        };
        let page_tool = self
            .shared
            .builtins
            .as_ref()
            .map(|_| format!("{BUILTIN_NAMESPACE}__{}", crate::result_budget::PAGE_TOOL));
        let schema_bound = self.shared.pool_member(&route.server).is_some_and(|u| {
            u.state
                .read()
                .lists
                .tools
                .iter()
                .any(|t| *t.name == route.name && t.output_schema.is_some())
        });
        if let Some(cut) = self.shared.remainders.limit(
            result,
            limit.max(1) as usize,
            &Self::result_owner(identity),
            page_tool.as_deref(),
            schema_bound,
        ) {
            tracing::info!(
                total_tokens = cut.total_tokens,
                kept_tokens = cut.kept_tokens,
                limit,
                "tool result truncated to the caller's token limit"
            );
        }
    }

    /// `concord__result_page`: the next part of a truncated result, for its owner only.
    fn read_result_page(
        &self,
        arguments: Option<&rmcp::model::JsonObject>,
        identity: Option<&crate::access::Identity>,
    ) -> CallToolResult {
        let handle = arguments
            .and_then(|a| a.get("handle"))
            .and_then(serde_json::Value::as_str);
        let max_tokens = arguments
            .and_then(|a| a.get("max_tokens"))
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize);
        let Some(handle) = handle else {
            return CallToolResult::error(vec![rmcp::model::ContentBlock::text(
                "missing argument: handle (the string named in the truncation marker)",
            )]);
        };
        let tool = format!("{BUILTIN_NAMESPACE}__{}", crate::result_budget::PAGE_TOOL);
        match self
            .shared
            .remainders
            .page(handle, &Self::result_owner(identity), max_tokens, &tool)
        {
            Ok(result) => result,
            Err(message) => CallToolResult::error(vec![rmcp::model::ContentBlock::text(message)]),
        }
    }

    /// Whether the caller of `context` may use `name` of `server` (always, with auth off).
    fn permits(
        &self,
        context: &RequestContext<RoleServer>,
        method: &str,
        server: &str,
        name: &str,
        arguments: Option<&rmcp::model::JsonObject>,
        listing: bool,
    ) -> bool {
        let Some(access) = &self.shared.options.access else {
            return true;
        };
        // Reading the rest of one's own truncated result needs no permission of its own: the
        // handle only ever opens what this caller was already given.
        if server == &*self.shared.builtin_name
            && name
                .strip_prefix(BUILTIN_NAMESPACE)
                .and_then(|n| n.strip_prefix("__"))
                == Some(crate::result_budget::PAGE_TOOL)
        {
            return true;
        }
        let identity = identity_of(context);
        access.allows(
            identity.as_ref(),
            &AccessRequest {
                method,
                server,
                name,
                arguments,
                listing,
            },
        )
    }

    /// Admits a method the front door decides once per request (`McpAccess::Method` rows of
    /// `methods::MCP_METHODS`): refused unless the policy allows it, with auth on.
    fn admit_method(
        &self,
        context: &RequestContext<RoleServer>,
        method: &'static str,
    ) -> Result<(), McpError> {
        let McpAccess::Method(policy_method) = crate::methods::access_of(method) else {
            return Ok(());
        };
        if self.permits(
            context,
            policy_method,
            &self.shared.builtin_name,
            method,
            None,
            false,
        ) {
            return Ok(());
        }
        self.observe(method, "", false);
        Err(McpError::new(
            ErrorCode(crate::codes::FORBIDDEN),
            format!("forbidden: the policy does not allow {policy_method}"),
            Some(serde_json::json!({ "method": policy_method })),
        ))
    }

    /// Whether this caller may use anything `server` offers: a tool, prompt or resource the
    /// policy allows it. Log lines of a server go only to sessions that may use it.
    pub(crate) fn may_use_server(
        shared: &Shared,
        identity: Option<&Identity>,
        server: &str,
    ) -> bool {
        let Some(access) = &shared.options.access else {
            return true;
        };
        let catalog = shared.catalog();
        let allows = |method: &str, name: &str| {
            access.allows(
                identity,
                &AccessRequest {
                    method,
                    server,
                    name,
                    arguments: None,
                    listing: true,
                },
            )
        };
        catalog
            .tool_routes
            .iter()
            .any(|(name, route)| &*route.server == server && allows("tools/call", name))
            || catalog
                .prompt_routes
                .iter()
                .any(|(name, route)| &*route.server == server && allows("prompts/get", name))
            || catalog.resources.iter().any(|resource| {
                catalog
                    .resource_owner(&resource.uri)
                    .is_some_and(|owner| &**owner == server)
                    && allows("resources/read", &resource.uri)
            })
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog()
    }
}

impl ServerHandler for GatewaySession {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_logging()
            .enable_completions()
            .enable_prompts()
            .enable_prompts_list_changed()
            .enable_resources()
            .enable_resources_list_changed()
            .enable_resources_subscribe()
            .enable_tools()
            .enable_tool_list_changed()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("concord", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Concord gateway: tools and prompts of every upstream server, named SERVER__NAME."
                    .to_string(),
            )
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        // One label for every unknown method: clients must not be able to mint metric series.
        self.observe("(unknown)", "", false);
        Err(McpError::new(
            ErrorCode::METHOD_NOT_FOUND,
            format!("Method not found: {}", request.method),
            Some(serde_json::json!({ "method": request.method })),
        ))
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.shared.downstream.register(self.id, context.peer);
    }

    async fn list_tools(
        &self,
        params: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let catalog = self.catalog();
        let visible: Vec<_> = catalog
            .tools
            .iter()
            .filter(|tool| {
                catalog.tool_routes.get(&*tool.name).is_some_and(|route| {
                    self.permits(
                        &context,
                        "tools/call",
                        &route.server,
                        &tool.name,
                        None,
                        true,
                    )
                })
            })
            .cloned()
            .collect();
        let (tools, next) = page(&visible, cursor(&params), self.shared.options.page_size)?;
        let mut result = ListToolsResult::with_all_items(tools);
        result.next_cursor = next;
        self.observe("tools/list", "", true);
        Ok(result)
    }

    async fn call_tool(
        &self,
        params: CallToolRequestParams,
        mut context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let started = Instant::now();
        if self.internal {
            // The node's own call: it acts as the caller it registered.
            let registered = context
                .meta
                .0
                .0
                .get(crate::internal::INTERNAL_CALL_META)
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| self.shared.internal_calls.caller(id));
            if let Some(registered) = registered {
                if let Some(identity) = registered.caller.identity.clone() {
                    context.extensions.insert(identity);
                }
                context.extensions.insert(registered);
            }
        }
        let catalog = self.catalog();
        let Some(route) = catalog.tool_routes.get(&*params.name).cloned() else {
            // A down server's tool is reported unavailable only to a caller who may use it:
            // to anyone else it is unknown, as it would be were the server up.
            let error = self
                .shared
                .unavailable_owner(&params.name, NameKind::Tool)
                .filter(|error| {
                    let GatewayError::Unavailable { server, .. } = error else {
                        return false;
                    };
                    self.permits(&context, "tools/call", server, &params.name, None, false)
                })
                .unwrap_or_else(|| GatewayError::UnknownTool(params.name.to_string()));
            self.observe("tools/call", "", false);
            return Err(error.into());
        };
        drop(catalog);
        if !self.permits(
            &context,
            "tools/call",
            &route.server,
            &params.name,
            params.arguments.as_ref(),
            false,
        ) {
            // Exactly what an unknown tool gets: a hidden tool's existence is not revealed.
            self.observe("tools/call", "", false);
            return Err(GatewayError::UnknownTool(params.name.to_string()).into());
        }
        let identity = identity_of(&context);
        let governed = self.shared.options.access.clone();
        let mut audited_arguments = None;
        let mut ticket = None;
        let mut shaping = CallShaping::default();
        if let Some(access) = &governed {
            let request = AccessRequest {
                method: "tools/call",
                server: &route.server,
                name: &params.name,
                arguments: params.arguments.as_ref(),
                listing: false,
            };
            match access.admit(identity.as_ref(), &request, &context.meta.0.0) {
                Ok(admission) => {
                    shaping = CallShaping {
                        extra_meta: admission.upstream_meta,
                        time_left: admission.time_left,
                        ..CallShaping::default()
                    };
                    ticket = admission.ticket;
                }
                Err(throttled) => {
                    self.observe("tools/call", &route.server, false);
                    return Err(McpError::new(
                        ErrorCode(throttled.code),
                        throttled.message,
                        throttled.data,
                    ));
                }
            }
            audited_arguments = params.arguments.clone();
        }
        let deadline = shaping.time_left;
        let reported_usage = shaping.reported_usage.clone();
        // Read-only tools of servers with a cache TTL may be answered from the result cache.
        let cache = self.cacheable(&route.server, &route.name).map(|ttl| {
            let partition = identity
                .as_ref()
                .map_or("-".to_string(), |i| i.principal.clone());
            (
                ttl,
                crate::result_cache::key(
                    &route.server,
                    &route.name,
                    &partition,
                    params.arguments.as_ref(),
                ),
            )
        });
        let bypass = context
            .meta
            .0
            .0
            .get("concord/cache")
            .and_then(serde_json::Value::as_str)
            == Some("bypass");
        if let Some((_, key)) = &cache
            && !bypass
            && params.request_state.is_none()
        {
            if let Some(mut hit) = self.shared.results.get(key) {
                self.shared.metrics.count_cache(&route.server, true);
                let meta = hit.meta.get_or_insert_with(Default::default);
                meta.0.insert("concord/cache".into(), "hit".into());
                self.fit_to_budget(&mut hit, &route, &context, identity.as_ref());
                self.observe("tools/call", &route.server, true);
                return Ok(CallToolResponse::Complete(hit));
            }
            self.shared.metrics.count_cache(&route.server, false);
        }
        let is_page = route.server == self.shared.builtin_name
            && route.name == crate::result_budget::PAGE_TOOL;
        // Tools the node serves itself: the built-ins and the local namespaces (agents).
        let served_here = if route.server == self.shared.builtin_name {
            self.shared.builtins.clone()
        } else {
            self.shared
                .locals
                .iter()
                .find(|(name, _, _)| *name == route.server)
                .map(|(_, provider, _)| provider.clone())
        };
        // The node's own calls nest under the span they were made in (an agent's run).
        let parent = context
            .extensions
            .get::<crate::internal::InternalCaller>()
            .map_or_else(tracing::Span::current, |registered| registered.span.clone());
        let span = tracing::info_span!(
            parent: &parent,
            "tools/call",
            server = %route.server,
            tool = %route.name,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let result = if is_page {
            Ok(ServerResult::CallToolResult(self.read_result_page(
                params.arguments.as_ref(),
                identity.as_ref(),
            )))
        } else if let Some(provider) = served_here {
            let envelope = shaping.extra_meta.get(BUDGET_META).cloned();
            let answer = self
                .call_builtin(
                    &*provider,
                    &route.name,
                    params.arguments.clone().unwrap_or_default(),
                    &context,
                    envelope,
                )
                .instrument(span.clone())
                .await;
            Ok(ServerResult::CallToolResult(answer))
        } else {
            // A retry carrying a `requestState` this gateway issued resumes the upstream call it
            // parked; any other state belongs to a 2026-07-28 upstream and goes back to it.
            let call = async {
                match params.request_state.as_deref() {
                    Some(state) if state.starts_with(crate::parked::PARKED_STATE_PREFIX) => {
                        self.resume(state, params.input_responses, &context)
                            .instrument(span.clone())
                            .await
                    }
                    _ => {
                        let mut upstream_params = CallToolRequestParams::new(route.name.clone());
                        upstream_params.arguments = params.arguments.clone();
                        upstream_params.request_state = params.request_state;
                        upstream_params.input_responses = params.input_responses;
                        let request =
                            ClientRequest::CallToolRequest(CallToolRequest::new(upstream_params));
                        let safe = self
                            .shared
                            .pool_member(&route.server)
                            .is_some_and(|u| u.is_retry_safe(&route.name));
                        let first = self
                            .forward_with_failover(
                                &route.server,
                                "tools/call",
                                Some(&route.name),
                                safe,
                                &|| request.clone(),
                                &context,
                            )
                            .instrument(span.clone())
                            .await;
                        match first {
                            Ok(ServerResult::InputRequiredResult(input))
                                if !is_modern(&context) =>
                            {
                                self.answer_input_rounds(&route, params.arguments, input, &context)
                                    .instrument(span.clone())
                                    .await
                            }
                            other => other,
                        }
                    }
                }
            };
            let mut result = CALL_SHAPING.scope(shaping, call).await;
            if let (Some(left), Err(GatewayError::Timeout { timeout, .. })) = (deadline, &result)
                && *timeout >= left
            {
                // The chain's deadline, not the server's own timeout, ended the call (and rmcp
                // cancelled it upstream).
                result = Err(GatewayError::DeadlinePassed {
                    server: route.server.to_string(),
                });
            }
            result
        };
        if let (Some((ttl, key)), Ok(ServerResult::CallToolResult(answer))) = (&cache, &result)
            && answer.is_error != Some(true)
        {
            self.shared.results.put(key.clone(), answer.clone(), *ttl);
        }
        let elapsed = started.elapsed();
        let (mut response, outcome) = match result {
            Ok(ServerResult::CallToolResult(r)) => {
                let outcome = if r.is_error == Some(true) {
                    Outcome::ToolError
                } else {
                    Outcome::Ok
                };
                (Ok(CallToolResponse::Complete(r)), outcome)
            }
            Ok(ServerResult::InputRequiredResult(r)) => {
                (Ok(CallToolResponse::InputRequired(r)), Outcome::Ok)
            }
            Ok(_) => (
                Err(GatewayError::UnexpectedResult {
                    server: route.server.to_string(),
                    method: "tools/call".into(),
                }),
                Outcome::Error,
            ),
            Err(e) => (Err(e), Outcome::Error),
        };
        if let Ok(CallToolResponse::Complete(result)) = &mut response
            && !is_page
        {
            self.fit_to_budget(result, &route, &context, identity.as_ref());
        }
        span.record("outcome", format!("{outcome:?}"));
        span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        if let Err(e) = &response {
            tracing::warn!(parent: &span, error = %e, "tool call failed");
        }
        if let Some(access) = &governed {
            let response_bytes = match &response {
                Ok(CallToolResponse::Complete(result)) => {
                    serde_json::to_vec(result).map_or(0, |b| b.len())
                }
                Ok(CallToolResponse::InputRequired(input)) => {
                    serde_json::to_vec(input).map_or(0, |b| b.len())
                }
                Ok(_) | Err(_) => 0,
            };
            let request_bytes = audited_arguments
                .as_ref()
                .and_then(|a| serde_json::to_vec(a).ok())
                .map_or(0, |b| b.len());
            let mut result_meta = match &response {
                Ok(CallToolResponse::Complete(result)) => result.meta.as_ref().map(|m| m.0.clone()),
                _ => None,
            };
            // What a trusted server reported spending (taken out of its result, which the
            // caller sees without it): the one usage report settlement reads.
            if let (Some(usage), Ok(CallToolResponse::Complete(_))) =
                (reported_usage.lock().take(), &response)
            {
                result_meta
                    .get_or_insert_with(Default::default)
                    .insert(USAGE_META.into(), usage);
            }
            let extra = access.record(
                identity.as_ref(),
                &CallOutcome {
                    server: &route.server,
                    tool: &route.name,
                    outcome: match outcome {
                        Outcome::Ok => "ok",
                        Outcome::ToolError => "tool_error",
                        Outcome::Error => "error",
                    },
                    duration_ms: elapsed.as_millis() as u64,
                    request_bytes,
                    response_bytes,
                    arguments: audited_arguments.as_ref(),
                },
                ticket,
                result_meta.as_ref(),
            );
            if !extra.is_empty()
                && let Ok(CallToolResponse::Complete(result)) = &mut response
            {
                let meta = result.meta.get_or_insert_with(Default::default);
                for (key, value) in extra {
                    meta.0.insert(key, value);
                }
            }
        }
        self.shared
            .metrics
            .observe_tool_call(&route.server, &route.name, outcome, elapsed);
        self.shared.metrics.observe_request(
            "tools/call",
            &route.server,
            if outcome == Outcome::Error {
                Outcome::Error
            } else {
                Outcome::Ok
            },
        );
        response.map_err(McpError::from)
    }

    async fn list_prompts(
        &self,
        params: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let catalog = self.catalog();
        let visible: Vec<_> = catalog
            .prompts
            .iter()
            .filter(|prompt| {
                catalog
                    .prompt_routes
                    .get(&prompt.name)
                    .is_some_and(|route| {
                        self.permits(
                            &context,
                            "prompts/get",
                            &route.server,
                            &prompt.name,
                            None,
                            true,
                        )
                    })
            })
            .cloned()
            .collect();
        let (prompts, next) = page(&visible, cursor(&params), self.shared.options.page_size)?;
        let mut result = ListPromptsResult::with_all_items(prompts);
        result.next_cursor = next;
        self.observe("prompts/list", "", true);
        Ok(result)
    }

    async fn get_prompt(
        &self,
        params: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        let Some(route) = self.catalog().prompt_routes.get(&params.name).cloned() else {
            let error = self
                .shared
                .unavailable_owner(&params.name, NameKind::Prompt)
                .filter(|error| {
                    let GatewayError::Unavailable { server, .. } = error else {
                        return false;
                    };
                    self.permits(&context, "prompts/get", server, &params.name, None, false)
                })
                .unwrap_or_else(|| GatewayError::UnknownPrompt(params.name.clone()));
            self.observe("prompts/get", "", false);
            return Err(error.into());
        };
        if !self.permits(
            &context,
            "prompts/get",
            &route.server,
            &params.name,
            None,
            false,
        ) {
            self.observe("prompts/get", "", false);
            return Err(GatewayError::UnknownPrompt(params.name.clone()).into());
        }
        let mut upstream_params = params;
        upstream_params.name = route.name.clone();
        upstream_params.meta = None;
        let span = tracing::info_span!("prompts/get", server = %route.server, prompt = %route.name);
        let result = self
            .forward(
                &route.server,
                "prompts/get",
                ClientRequest::GetPromptRequest(GetPromptRequest::new(upstream_params)),
                &context,
            )
            .instrument(span)
            .await;
        self.observe("prompts/get", &route.server, result.is_ok());
        match result? {
            ServerResult::GetPromptResult(r) => Ok(GetPromptResponse::Complete(r)),
            ServerResult::InputRequiredResult(r) => Ok(GetPromptResponse::InputRequired(r)),
            _ => Err(GatewayError::UnexpectedResult {
                server: route.server.to_string(),
                method: "prompts/get".into(),
            }
            .into()),
        }
    }

    async fn list_resources(
        &self,
        params: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let catalog = self.catalog();
        let visible: Vec<_> = catalog
            .resources
            .iter()
            .filter(|resource| {
                catalog.resource_owner(&resource.uri).is_some_and(|server| {
                    self.permits(
                        &context,
                        "resources/read",
                        server,
                        &resource.uri,
                        None,
                        true,
                    )
                })
            })
            .cloned()
            .collect();
        let (resources, next) = page(&visible, cursor(&params), self.shared.options.page_size)?;
        let mut result = ListResourcesResult::with_all_items(resources);
        result.next_cursor = next;
        self.observe("resources/list", "", true);
        Ok(result)
    }

    async fn list_resource_templates(
        &self,
        params: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        let catalog = self.catalog();
        let visible: Vec<_> = catalog
            .templates
            .iter()
            .filter(|template| {
                catalog
                    .template_owner(&template.uri_template)
                    .is_some_and(|server| {
                        self.permits(
                            &context,
                            "resources/read",
                            server,
                            &template.uri_template,
                            None,
                            true,
                        )
                    })
            })
            .cloned()
            .collect();
        let (templates, next) = page(&visible, cursor(&params), self.shared.options.page_size)?;
        let mut result = ListResourceTemplatesResult::with_all_items(templates);
        result.next_cursor = next;
        self.observe("resources/templates/list", "", true);
        Ok(result)
    }

    async fn read_resource(
        &self,
        params: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let Some(server) = self.catalog().resource_owner(&params.uri).cloned() else {
            self.observe("resources/read", "", false);
            return Err(GatewayError::UnknownResource(params.uri).into());
        };
        if !self.permits(
            &context,
            "resources/read",
            &server,
            &params.uri,
            None,
            false,
        ) {
            self.observe("resources/read", "", false);
            return Err(GatewayError::UnknownResource(params.uri).into());
        }
        if let Some(builtins) = self.shared.builtins.clone()
            && server == self.shared.builtin_name
        {
            if let Some((method, name)) = builtins.resource_policy(&params.uri)
                && !self.permits(&context, method, &server, &name, None, false)
            {
                self.observe("resources/read", "", false);
                return Err(GatewayError::UnknownResource(params.uri).into());
            }
            let text = builtins
                .read_resource(&params.uri)
                .await
                .map_err(|reason| McpError::resource_not_found(reason, None))?;
            self.observe("resources/read", BUILTIN_NAMESPACE, true);
            let contents = rmcp::model::ResourceContents::TextResourceContents {
                uri: params.uri.clone(),
                mime_type: Some("application/json".to_string()),
                text,
                meta: None,
            };
            return Ok(ReadResourceResponse::Complete(
                rmcp::model::ReadResourceResult::new(vec![contents]),
            ));
        }
        let mut upstream_params = params;
        upstream_params.meta = None;
        let span =
            tracing::info_span!("resources/read", server = %server, uri = %upstream_params.uri);
        let result = self
            .forward(
                &server,
                "resources/read",
                ClientRequest::ReadResourceRequest(ReadResourceRequest::new(upstream_params)),
                &context,
            )
            .instrument(span)
            .await;
        self.observe("resources/read", &server, result.is_ok());
        match result? {
            ServerResult::ReadResourceResult(r) => Ok(ReadResourceResponse::Complete(r)),
            ServerResult::InputRequiredResult(r) => Ok(ReadResourceResponse::InputRequired(r)),
            _ => Err(GatewayError::UnexpectedResult {
                server: server.to_string(),
                method: "resources/read".into(),
            }
            .into()),
        }
    }

    async fn subscribe(
        &self,
        params: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let Some(server) = self.catalog().resource_owner(&params.uri).cloned() else {
            self.observe("resources/subscribe", "", false);
            return Err(GatewayError::UnknownResource(params.uri).into());
        };
        if !self.permits(
            &context,
            "resources/read",
            &server,
            &params.uri,
            None,
            false,
        ) {
            self.observe("resources/subscribe", "", false);
            return Err(GatewayError::UnknownResource(params.uri).into());
        }
        if server == self.shared.builtin_name {
            self.shared
                .subscriptions
                .subscribe_local(
                    self.id,
                    Subscriber::Session(context.peer.clone()),
                    server,
                    &params.uri,
                )
                .await;
            self.observe("resources/subscribe", BUILTIN_NAMESPACE, true);
            return Ok(());
        }
        let (upstream, _) = self.upstream_peer(&server)?;
        let result = self
            .shared
            .subscriptions
            .subscribe(
                self.id,
                Subscriber::Session(context.peer.clone()),
                server.clone(),
                &params.uri,
                hold_subscription(
                    Arc::downgrade(&self.shared),
                    server.clone(),
                    &upstream,
                    params.uri.clone(),
                ),
            )
            .await
            .map_err(|e| GatewayError::from_service(&server, "resources/subscribe", e));
        self.observe("resources/subscribe", &server, result.is_ok());
        Ok(result?)
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        // Everything asked for; rmcp narrows it to what get_info advertises.
        Some(requested.clone())
    }

    /// A 2026-07-28 client's notification stream: list changes as the catalog changes, and
    /// updates of the resources it named, held upstream exactly like `resources/subscribe`.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        self.admit_method(context.request_context(), "subscriptions/listen")?;
        let sink = context.sink().clone();
        let listen_id = self.id;
        let uris = context
            .accepted()
            .resource_subscriptions
            .clone()
            .unwrap_or_default();
        let mut held = Vec::new();
        for uri in uris {
            let Some(server) = self.catalog().resource_owner(&uri).cloned() else {
                tracing::debug!(uri, "listen: no server owns this resource");
                continue;
            };
            // Updates of a resource go only to a listener that may read it.
            if !self.permits(
                context.request_context(),
                "resources/read",
                &server,
                &uri,
                None,
                false,
            ) {
                tracing::debug!(uri, "listen: not allowed to read this resource");
                continue;
            }
            if server == self.shared.builtin_name {
                self.shared
                    .subscriptions
                    .subscribe_local(listen_id, Subscriber::Listen(sink.clone()), server, &uri)
                    .await;
                held.push(uri);
                continue;
            }
            let Ok((upstream, _)) = self.upstream_peer(&server) else {
                continue;
            };
            match self
                .shared
                .subscriptions
                .subscribe(
                    listen_id,
                    Subscriber::Listen(sink.clone()),
                    server.clone(),
                    &uri,
                    hold_subscription(
                        Arc::downgrade(&self.shared),
                        server.clone(),
                        &upstream,
                        uri.clone(),
                    ),
                )
                .await
            {
                Ok(()) => held.push(uri),
                Err(e) => tracing::warn!(uri, error = %e, "listen: upstream subscription failed"),
            }
        }
        self.shared.downstream.add_listener(listen_id, sink);
        self.observe("subscriptions/listen", "", true);
        context.cancelled().await;
        self.shared.downstream.remove_listener(listen_id);
        for uri in held {
            if let Some(abandoned) = self.shared.subscriptions.unsubscribe(listen_id, &uri).await {
                let upstream = self.upstream_peer(&abandoned.server).ok().map(|(p, _)| p);
                abandoned.release(upstream.as_ref()).await;
            }
        }
        Ok(())
    }

    async fn unsubscribe(
        &self,
        params: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if let Some(abandoned) = self
            .shared
            .subscriptions
            .unsubscribe(self.id, &params.uri)
            .await
        {
            let upstream = self.upstream_peer(&abandoned.server).ok().map(|(p, _)| p);
            abandoned.release(upstream.as_ref()).await;
        }
        self.observe("resources/unsubscribe", "", true);
        Ok(())
    }

    async fn complete(
        &self,
        params: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        let catalog = self.catalog();
        let mut upstream_params = params;
        upstream_params.meta = None;
        // A completion names a prompt or a resource: it is decided for that item under
        // `completion/complete`, and what the caller may not complete answers like something
        // unknown (no existence oracle).
        let server = match &mut upstream_params.r#ref {
            Reference::Prompt(prompt) => {
                let route = catalog
                    .prompt_routes
                    .get(&prompt.name)
                    .cloned()
                    .filter(|route| {
                        self.permits(
                            &context,
                            "completion/complete",
                            &route.server,
                            &prompt.name,
                            None,
                            false,
                        )
                    })
                    .ok_or_else(|| GatewayError::UnknownPrompt(prompt.name.clone()))?;
                prompt.name = route.name;
                route.server
            }
            Reference::Resource(resource) => catalog
                .template_owner(&resource.uri)
                .or_else(|| catalog.resource_owner(&resource.uri))
                .cloned()
                .filter(|server| {
                    self.permits(
                        &context,
                        "completion/complete",
                        server,
                        &resource.uri,
                        None,
                        false,
                    )
                })
                .ok_or_else(|| GatewayError::UnknownResource(resource.uri.clone()))?,
            _ => {
                return Err(McpError::invalid_params(
                    "completion/complete: unsupported reference type",
                    None,
                ));
            }
        };
        drop(catalog);
        let result = self
            .forward(
                &server,
                "completion/complete",
                ClientRequest::CompleteRequest(CompleteRequest::new(upstream_params)),
                &context,
            )
            .await;
        self.observe("completion/complete", &server, result.is_ok());
        match result? {
            ServerResult::CompleteResult(r) => Ok(r),
            _ => Err(GatewayError::UnexpectedResult {
                server: server.to_string(),
                method: "completion/complete".into(),
            }
            .into()),
        }
    }

    async fn set_level(
        &self,
        params: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.admit_method(&context, "logging/setLevel")?;
        self.shared.downstream.set_log_level(
            self.id,
            &context.peer,
            params.level,
            identity_of(&context),
        );
        // Every healthy upstream that logs gets the new level; one that fails does not stop
        // the others.
        let servers: Vec<Arc<str>> = self
            .shared
            .upstreams()
            .iter()
            .filter(|u| {
                u.is_healthy()
                    && u.state
                        .read()
                        .capabilities
                        .as_ref()
                        .is_some_and(|c| c.logging.is_some())
            })
            .map(|u| u.name.clone())
            .collect();
        let level = self
            .shared
            .downstream
            .most_verbose_level()
            .unwrap_or(params.level);
        for server in servers {
            let request = ClientRequest::SetLevelRequest(SetLevelRequest::new(
                SetLevelRequestParams::new(level),
            ));
            if let Err(e) = self
                .forward(&server, "logging/setLevel", request, &context)
                .await
            {
                tracing::warn!(server = %server, error = %e, "logging/setLevel not accepted upstream");
            }
        }
        self.observe("logging/setLevel", "", true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_cursors() {
        let items: Vec<u32> = (0..5).collect();
        let (first, next) = page(&items, None, 2).unwrap();
        assert_eq!(first, [0, 1]);
        assert_eq!(next.as_deref(), Some("o:2"));
        let (last, next) = page(&items, Some("o:4"), 2).unwrap();
        assert_eq!(last, [4]);
        assert_eq!(next, None);
        assert!(page(&items, Some("bogus"), 2).is_err());
        assert!(page(&items, Some("o:99"), 2).is_err());
    }

    #[test]
    fn an_upstreams_gateway_keys_are_taken_out_and_its_usage_handed_back() {
        let mut result: ServerResult = serde_json::from_value(serde_json::json!({
            "content": [{"type": "text", "text": "x"}],
            "_meta": {"concord/cache": "hit", "concord/usage": {"tokens": 5},
                      "concord/budget": {"left": 1}, "app/keep": true}
        }))
        .unwrap();
        assert!(matches!(result, ServerResult::CallToolResult(_)));
        let usage = take_gateway_meta(&mut result);
        assert_eq!(usage, Some(serde_json::json!({"tokens": 5})));
        let wire = serde_json::to_value(&result).unwrap();
        assert_eq!(wire["_meta"], serde_json::json!({"app/keep": true}));

        // Nothing but gateway keys: no `_meta` at all.
        let mut result: ServerResult = serde_json::from_value(serde_json::json!({
            "messages": [], "_meta": {"concord/truncated": {"handle": "h"}}
        }))
        .unwrap();
        assert!(matches!(result, ServerResult::GetPromptResult(_)));
        assert_eq!(take_gateway_meta(&mut result), None);
        assert!(
            serde_json::to_value(&result)
                .unwrap()
                .get("_meta")
                .is_none()
        );
    }

    #[test]
    fn meta_forwarding_keeps_trace_and_app_keys_only() {
        let mut meta = RequestMetaObject::new();
        meta.0
            .0
            .insert("progressToken".into(), serde_json::json!(7));
        meta.0
            .0
            .insert("traceparent".into(), serde_json::json!("00-abc-def-01"));
        meta.0.0.insert(
            "io.modelcontextprotocol/protocolVersion".into(),
            serde_json::json!("2026-07-28"),
        );
        meta.0
            .0
            .insert("com.example/tenant".into(), serde_json::json!("acme"));
        let forwarded = forwardable_meta(&meta);
        let keys: Vec<_> = forwarded.0.0.keys().cloned().collect();
        assert_eq!(keys, ["traceparent", "com.example/tenant"]);
    }
}
