//! The gateway's shared state: the upstreams, the current catalog, the connected downstream
//! clients, and the progress relay between them. Per-session handlers are thin views over it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use concord_config::{Config, PrefixMode};
use concord_telemetry::Metrics;
use parking_lot::{Mutex, RwLock};
use rmcp::ErrorData as McpError;
use rmcp::model::{
    ClientResult, LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam,
    ProgressToken, RequestId, ServerRequest,
};
use rmcp::service::{Peer, RoleClient, RoleServer, RunningService, SubscriptionSink};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::access::AccessControl;
use crate::breaker::BreakerPolicy;
use crate::builtin::{BUILTIN_NAMESPACE, BuiltinTool, BuiltinTools, SharedBuiltins};
use crate::catalog::{Catalog, CatalogInput, Collision, UpstreamLists};
use crate::error::GatewayError;
use crate::session::{GatewaySession, SuspendedCalls};
use crate::subscriptions::Subscriptions;
use crate::upstream::{Health, Upstream, supervise};

/// Tunables of the gateway that do not belong to any one upstream.
#[derive(Clone)]
pub struct GatewayOptions {
    pub health_interval: Duration,
    /// Items per page in list results.
    pub page_size: usize,
    /// Who may use what (auth on); `None` allows everything.
    pub access: Option<Arc<dyn AccessControl>>,
    /// More tool families the node serves itself, each under its own namespace (the agents,
    /// as `agents__NAME`); listed after the built-in `concord__*` tools.
    pub local_namespaces: Vec<(String, Arc<dyn BuiltinTools>)>,
}

impl std::fmt::Debug for GatewayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayOptions")
            .field("health_interval", &self.health_interval)
            .field("page_size", &self.page_size)
            .field("access", &self.access.is_some())
            .field(
                "local_namespaces",
                &self
                    .local_namespaces
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            health_interval: concord_config::DEFAULT_HEALTH_INTERVAL,
            page_size: concord_config::DEFAULT_PAGE_SIZE,
            access: None,
            local_namespaces: Vec::new(),
        }
    }
}

/// One tool the gateway exposes.
#[derive(Debug, Clone)]
pub struct ExposedTool {
    /// The exposed (namespaced) name.
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: serde_json::Value,
    /// The logical server it belongs to (the built-in and local namespaces included).
    pub server: String,
}

/// A snapshot of one upstream's state, for status endpoints and the CLI.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    /// The logical server this upstream is a replica of (its own name when it is alone).
    pub server: String,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    pub in_flight: usize,
    pub transport: &'static str,
    /// `starting`, `healthy` or `unhealthy`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub tools: usize,
    pub prompts: usize,
    pub resources: usize,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// While the upstream waits to be reconnected: the length of that wait (the backoff, which
    /// grows while connections keep failing soon after they were made)…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
    /// …and how much of it is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_in_ms: Option<u64>,
}

/// The upstreams, in the order they were added (configuration first, then registrations).
#[derive(Default)]
pub(crate) struct UpstreamSet {
    list: Vec<Arc<Upstream>>,
    by_name: HashMap<Arc<str>, Arc<Upstream>>,
    /// Logical server → its replicas, in the order they were added.
    pools: HashMap<Arc<str>, Vec<Arc<Upstream>>>,
}

impl UpstreamSet {
    fn insert(&mut self, upstream: Arc<Upstream>) {
        self.by_name.insert(upstream.name.clone(), upstream.clone());
        self.pools
            .entry(upstream.pool.clone())
            .or_default()
            .push(upstream.clone());
        self.list.push(upstream);
    }

    fn remove(&mut self, name: &str) -> Option<Arc<Upstream>> {
        let removed = self.by_name.remove(name)?;
        self.list.retain(|u| &*u.name != name);
        if let Some(members) = self.pools.get_mut(&removed.pool) {
            members.retain(|u| &*u.name != name);
            if members.is_empty() {
                self.pools.remove(&removed.pool);
            }
        }
        Some(removed)
    }
}

/// One call's claim on a replica: counts in its load while alive, and carries the breaker
/// pass whose outcome [`Self::finish`] records. Dropped unfinished (a cancelled call), it
/// frees a probe slot without judging the replica.
pub(crate) struct ReplicaTicket {
    pub replica: Arc<Upstream>,
    pass: Option<crate::breaker::Pass>,
}

impl ReplicaTicket {
    pub fn new(replica: Arc<Upstream>, pass: crate::breaker::Pass) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            replica,
            pass: Some(pass),
        }
    }

    pub fn finish(&mut self, shared: &Shared, failed: bool) {
        if let Some(pass) = self.pass.take() {
            shared.record_outcome(&self.replica, pass, failed);
        }
    }
}

impl Drop for ReplicaTicket {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(pass) = self.pass.take() {
            self.replica.breaker.abandon(pass);
        }
    }
}

/// Why no replica of a server could take a call.
pub(crate) struct NoReplica {
    pub reason: String,
}

pub(crate) struct Shared {
    upstreams: RwLock<UpstreamSet>,
    pub results: crate::result_cache::ResultCache,
    pub remainders: crate::result_budget::Remainders,
    pub routing: concord_config::RoutingSettings,
    breaker: BreakerPolicy,
    catalog: RwLock<Arc<Catalog>>,
    /// Serialises catalog rebuilds so an older build never replaces a newer one.
    rebuild_lock: Mutex<()>,
    pub downstream: Downstream,
    pub router: Arc<CallRouter>,
    pub subscriptions: Subscriptions,
    pub suspended: SuspendedCalls,
    next_session: AtomicU64,
    pub metrics: Arc<Metrics>,
    pub options: GatewayOptions,
    pub shutdown: CancellationToken,
    settled: Notify,
    pub builtins: Option<SharedBuiltins>,
    builtin_lists: Arc<UpstreamLists>,
    pub builtin_name: Arc<str>,
    /// Namespaces of tools served in process besides the built-ins (name, provider, lists).
    pub locals: Vec<(Arc<str>, SharedBuiltins, Arc<UpstreamLists>)>,
    /// Callers of the calls the node makes itself, while they run.
    pub internal_calls: crate::internal::InternalCalls,
}

impl Shared {
    /// A handler for one new downstream session.
    pub fn new_session(self: &Arc<Self>) -> GatewaySession {
        GatewaySession {
            shared: self.clone(),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            internal: false,
        }
    }

    /// The session of the node's own in-process client (see [`crate::internal`]).
    pub fn new_internal_session(self: &Arc<Self>) -> GatewaySession {
        GatewaySession {
            internal: true,
            ..self.new_session()
        }
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().clone()
    }

    /// One upstream (one replica) by its unique name.
    pub fn replica(&self, name: &str) -> Option<Arc<Upstream>> {
        self.upstreams.read().by_name.get(name).cloned()
    }

    /// The replicas of the logical server `pool`, or the one upstream whose unique name it is
    /// (a request meant for one replica, such as `logging/setLevel`, names it that way).
    fn members(&self, pool: &str) -> Option<Vec<Arc<Upstream>>> {
        let set = self.upstreams.read();
        set.pools
            .get(pool)
            .cloned()
            .or_else(|| set.by_name.get(pool).map(|u| vec![u.clone()]))
    }

    /// Some replica of the logical server `pool` (its settings are the pool's).
    pub fn pool_member(&self, pool: &str) -> Option<Arc<Upstream>> {
        self.members(pool).and_then(|m| m.into_iter().next())
    }

    /// A connected peer of `pool` (its first connected replica) and its request timeout.
    pub fn any_peer(
        &self,
        pool: &str,
    ) -> Result<(rmcp::service::Peer<rmcp::service::RoleClient>, Duration), String> {
        let members = self
            .members(pool)
            .ok_or_else(|| "not configured".to_string())?;
        let mut first_reason = None;
        for member in &members {
            match member.peer() {
                Ok(peer) => return Ok((peer, member.spec.request_timeout)),
                Err(reason) => {
                    first_reason.get_or_insert(reason);
                }
            }
        }
        Err(first_reason.unwrap_or_else(|| "not configured".to_string()))
    }

    /// Chooses the replica of `pool` for one call, skipping those in `exclude`: of the
    /// connected replicas whose breaker admits calls, two picked at random, the one with fewer
    /// calls in flight (power of two choices). Returns the replica with its breaker pass.
    pub fn pick(
        &self,
        pool: &str,
        exclude: &[Arc<str>],
    ) -> Result<(Arc<Upstream>, crate::breaker::Pass), NoReplica> {
        let members = self.members(pool).ok_or_else(|| NoReplica {
            reason: "not configured".to_string(),
        })?;
        let mut candidates: Vec<&Arc<Upstream>> = members
            .iter()
            .filter(|u| !exclude.contains(&u.name) && u.is_healthy() && u.breaker.admits())
            .collect();
        while !candidates.is_empty() {
            let index = match candidates.len() {
                1 => 0,
                n => {
                    let first = fastrand::usize(..n);
                    let mut second = fastrand::usize(..n - 1);
                    if second >= first {
                        second += 1;
                    }
                    let load = |i: usize| candidates[i].in_flight.load(Ordering::Relaxed);
                    if load(second) < load(first) {
                        second
                    } else {
                        first
                    }
                }
            };
            let chosen = candidates.swap_remove(index);
            if let Some((pass, change)) = chosen.breaker.acquire() {
                if let Some(state) = change {
                    self.breaker_changed(chosen, state);
                }
                return Ok((chosen.clone(), pass));
            }
        }
        // Nothing can take it: say why, replica by replica.
        let reason = if members.len() == 1 {
            let only = &members[0];
            match only.peer() {
                Err(reason) => reason,
                Ok(_) if exclude.contains(&only.name) => "it already failed this call".to_string(),
                Ok(_) => "its circuit breaker is open after repeated failures".to_string(),
            }
        } else {
            let each: Vec<String> = members
                .iter()
                .map(|u| {
                    let why = match u.peer() {
                        Err(reason) => reason,
                        Ok(_) if exclude.contains(&u.name) => "already failed this call".into(),
                        Ok(_) => "circuit breaker open".into(),
                    };
                    format!("{}: {why}", u.name)
                })
                .collect();
            format!("no replica can take the call ({})", each.join("; "))
        };
        Err(NoReplica { reason })
    }

    /// Records the outcome of a call on `replica` made with `pass`.
    pub fn record_outcome(&self, replica: &Upstream, pass: crate::breaker::Pass, failed: bool) {
        if let Some(state) = replica.breaker.record(pass, failed) {
            self.breaker_changed(replica, state);
        }
        if failed {
            replica.recheck.notify_one();
        }
    }

    fn breaker_changed(&self, replica: &Upstream, state: crate::breaker::BreakerState) {
        tracing::warn!(server = %replica.pool, replica = %replica.name, state = state.label(), "circuit breaker changed");
        self.metrics
            .count_breaker_transition(&replica.pool, &replica.name, state.label());
    }

    /// A snapshot of every upstream, in order.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.upstreams.read().list.clone()
    }

    pub fn upstream_settled(&self) {
        self.settled.notify_waiters();
    }

    fn all_settled(&self) -> bool {
        self.upstreams()
            .iter()
            .all(|u| u.state.read().first_attempt_done)
    }

    /// Rebuilds the catalog from the healthy upstreams and tells connected clients which lists
    /// changed.
    pub fn rebuild_catalog(&self) {
        let _guard = self.rebuild_lock.lock();
        let upstreams = self.upstreams();
        // A logical server appears once, with the lists of its first connected replica.
        let mut seen: std::collections::HashSet<&Arc<str>> = Default::default();
        let snapshots: Vec<_> = upstreams
            .iter()
            .filter_map(|u| {
                if seen.contains(&u.pool) {
                    return None;
                }
                let state = u.state.read();
                (state.health == Health::Healthy).then(|| {
                    seen.insert(&u.pool);
                    (u, state.lists.clone())
                })
            })
            .collect();
        // Built-in tools come first: their names are reserved, so no upstream can shadow them.
        let builtins = self.builtins.as_ref().map(|_| CatalogInput {
            server: &self.builtin_name,
            prefix: PrefixMode::Always,
            lists: &self.builtin_lists,
        });
        let locals = self.locals.iter().map(|(name, _, lists)| CatalogInput {
            server: name,
            prefix: PrefixMode::Always,
            lists,
        });
        let inputs: Vec<CatalogInput<'_>> = builtins
            .into_iter()
            .chain(locals)
            .chain(snapshots.iter().map(|(u, lists)| CatalogInput {
                server: &u.pool,
                prefix: u.spec.prefix,
                lists,
            }))
            .collect();
        let next = Catalog::build(&inputs);
        for collision in &next.collisions {
            tracing::error!(%collision, "name collision: the second server's entry is hidden");
        }
        let previous = std::mem::replace(&mut *self.catalog.write(), Arc::new(next));
        let current = self.catalog();
        let changes = ListChanges {
            tools: previous.tools != current.tools,
            prompts: previous.prompts != current.prompts,
            resources: previous.resources != current.resources
                || previous.templates != current.templates,
        };
        if changes.any() {
            tracing::info!(
                tools = current.tools.len(),
                prompts = current.prompts.len(),
                resources = current.resources.len(),
                "catalog changed"
            );
            self.downstream.announce(changes);
        }
    }

    /// Explains why `name` (a tool or prompt) is not in the catalog when it belongs to an
    /// upstream that is down, so callers fail fast with a reason rather than "unknown".
    pub fn unavailable_owner(&self, exposed: &str, kind: NameKind) -> Option<GatewayError> {
        let upstreams = self.upstreams();
        for upstream in &upstreams {
            let pool_is_up = upstreams
                .iter()
                .any(|u| u.pool == upstream.pool && u.is_healthy());
            if pool_is_up {
                continue;
            }
            let state = upstream.state.read();
            let reason = match &state.health {
                Health::Healthy => continue,
                Health::Starting => "still connecting".to_string(),
                Health::Unhealthy { reason } => reason.clone(),
            };
            let prefixed_bare = exposed
                .strip_prefix(&*upstream.pool)
                .and_then(|rest| rest.strip_prefix(concord_config::NAMESPACE_SEPARATOR));
            let owns = match kind {
                NameKind::Tool => state.lists.tools.iter().any(|t| {
                    Some(&*t.name) == prefixed_bare
                        || (upstream.spec.prefix != PrefixMode::Always && *t.name == *exposed)
                }),
                NameKind::Prompt => state.lists.prompts.iter().any(|p| {
                    Some(p.name.as_str()) == prefixed_bare
                        || (upstream.spec.prefix != PrefixMode::Always && p.name == exposed)
                }),
            };
            // A prefixed name of a server that never listed anything still belongs to it.
            let never_listed = state.lists.tools.is_empty() && state.lists.prompts.is_empty();
            if owns || (prefixed_bare.is_some() && never_listed) {
                return Some(GatewayError::Unavailable {
                    server: upstream.pool.to_string(),
                    reason,
                });
            }
        }
        None
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum NameKind {
    Tool,
    Prompt,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ListChanges {
    pub tools: bool,
    pub prompts: bool,
    pub resources: bool,
}

impl ListChanges {
    fn any(&self) -> bool {
        self.tools || self.prompts || self.resources
    }

    fn merge(&mut self, other: ListChanges) {
        self.tools |= other.tools;
        self.prompts |= other.prompts;
        self.resources |= other.resources;
    }
}

/// Log messages one session may have waiting to be sent to it at most; past it (or past
/// [`OUTBOX_MAX_LOG_BYTES`]), new ones are dropped, counted, and the client is told how many
/// were lost where they were lost.
pub(crate) const OUTBOX_MAX_LOGS: usize = 256;
/// Bytes of log messages one session may have waiting at most.
pub(crate) const OUTBOX_MAX_LOG_BYTES: usize = 1024 * 1024;
/// Bytes of log messages waiting in every session's outbox together at most (a message queued
/// for several sessions counts once per session).
pub(crate) const OUTBOX_TOTAL_LOG_BYTES: usize = 64 * 1024 * 1024;
/// A forwarded log message's `data` is cut to about this many bytes (serialized).
pub(crate) const MAX_FORWARDED_LOG_BYTES: usize = 64 * 1024;

/// What the downstream sessions have waiting to be sent to them, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownstreamBacklog {
    /// Sessions registered for unsolicited notifications (closed ones left out).
    pub sessions: usize,
    /// Open 2026-07-28 `subscriptions/listen` streams.
    pub listeners: usize,
    /// Log messages waiting in outboxes, and their bytes.
    pub queued_logs: usize,
    pub queued_bytes: usize,
    /// Tasks delivering outboxes right now (at most one per session or stream).
    pub delivery_tasks: usize,
    /// Log messages dropped because a session's outbox was full, since start.
    pub dropped_logs: u64,
}

/// A 2025-era session that can receive unsolicited notifications.
struct DownstreamSession {
    id: u64,
    peer: Peer<RoleServer>,
    /// The level the client asked for with `logging/setLevel`; a session that never asked
    /// receives no upstream log messages.
    log_level: Option<LoggingLevel>,
    /// Who asked for the logs: a server's log lines reach only sessions whose principal may
    /// use that server.
    identity: Option<crate::access::Identity>,
    outbox: OutboxHandle,
}

/// An open 2026-07-28 `subscriptions/listen` stream.
struct DownstreamListener {
    sink: SubscriptionSink,
    outbox: OutboxHandle,
}

/// The downstream clients that hold a session (or a listen stream) and can receive unsolicited
/// notifications. Nothing is sent to a client from the caller's task: each gets a bounded
/// outbox, and one task per client delivers it while it holds something, so a client that does
/// not read holds at most its outbox, never a task per message.
pub(crate) struct Downstream {
    peers: Mutex<Vec<DownstreamSession>>,
    /// Open 2026-07-28 `subscriptions/listen` streams, by listen id.
    listeners: Mutex<HashMap<u64, DownstreamListener>>,
    counters: Arc<OutboxCounters>,
    /// How many sessions an MCP endpoint of this gateway holds, and when idle ones close.
    pub session_limits: crate::http_server::SessionLimits,
}

impl Downstream {
    pub fn new(node: &concord_config::NodeSettings) -> Self {
        Self {
            peers: Mutex::default(),
            listeners: Mutex::default(),
            counters: Arc::default(),
            session_limits: crate::http_server::SessionLimits::from_node(node),
        }
    }
}

/// Shared by every outbox: bytes waiting in all of them, tasks delivering, messages dropped.
#[derive(Default)]
struct OutboxCounters {
    queued_bytes: AtomicUsize,
    queued_logs: AtomicUsize,
    delivery_tasks: AtomicUsize,
    dropped_logs: AtomicU64,
}

/// A log message on its way to sessions: shared by every outbox it waits in.
#[derive(Clone)]
struct QueuedLog {
    params: Arc<LoggingMessageNotificationParam>,
    /// Its size as sent (about), counted against the bounds.
    bytes: usize,
}

enum OutboxEntry {
    Log(QueuedLog),
    /// Messages dropped at this point of the stream, and the most severe level among them.
    Gap {
        count: u64,
        level: LoggingLevel,
    },
}

/// What one client has waiting: list changes (idempotent, so coalesced into flags) and log
/// messages in order, with gaps where messages were dropped.
#[derive(Default)]
struct OutboxState {
    changes: ListChanges,
    entries: std::collections::VecDeque<OutboxEntry>,
    logs: usize,
    bytes: usize,
    /// A task is delivering this outbox.
    delivering: bool,
    /// The client left: nothing more is queued, and the delivering task stops.
    closed: bool,
}

struct Outbox {
    state: Mutex<OutboxState>,
    /// Cancelled when the client leaves the registry: interrupts a send the client never takes.
    stop: CancellationToken,
    counters: Arc<OutboxCounters>,
}

/// What the delivering task sends next.
enum Delivery {
    Changes(ListChanges),
    Log(Arc<LoggingMessageNotificationParam>),
    Gap { count: u64, level: LoggingLevel },
}

/// Where an outbox is delivered.
#[derive(Clone)]
enum Target {
    Session(Peer<RoleServer>),
    Listener(SubscriptionSink),
}

impl Outbox {
    fn new(counters: Arc<OutboxCounters>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            stop: CancellationToken::new(),
            counters,
        })
    }

    /// Queues list changes (merged into what is already waiting).
    fn push_changes(self: &Arc<Self>, changes: ListChanges, target: &Target) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        state.changes.merge(changes);
        self.start_delivery(state, target);
    }

    /// Queues a log message, or drops it (counted) when this outbox or all of them are full.
    fn push_log(self: &Arc<Self>, log: &QueuedLog, target: &Target) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        let total = self.counters.queued_bytes.load(Ordering::Relaxed);
        let full = state.logs >= OUTBOX_MAX_LOGS
            || state.bytes + log.bytes > OUTBOX_MAX_LOG_BYTES
            || total + log.bytes > OUTBOX_TOTAL_LOG_BYTES;
        if full {
            let level = log.params.level;
            match state.entries.back_mut() {
                Some(OutboxEntry::Gap {
                    count,
                    level: worst,
                }) => {
                    *count += 1;
                    if severity(level) > severity(*worst) {
                        *worst = level;
                    }
                }
                _ => state
                    .entries
                    .push_back(OutboxEntry::Gap { count: 1, level }),
            }
            let dropped = self.counters.dropped_logs.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8…: a flood shows without flooding the log itself.
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "log messages for clients that do not read them fast enough dropped: over {OUTBOX_MAX_LOGS} messages or {OUTBOX_MAX_LOG_BYTES} bytes waiting for one session"
                );
            }
        } else {
            state.logs += 1;
            state.bytes += log.bytes;
            self.counters.queued_logs.fetch_add(1, Ordering::Relaxed);
            self.counters
                .queued_bytes
                .fetch_add(log.bytes, Ordering::Relaxed);
            state.entries.push_back(OutboxEntry::Log(log.clone()));
        }
        self.start_delivery(state, target);
    }

    /// Starts the delivering task unless one is running (it runs while there is something to
    /// send and ends when the outbox is empty).
    fn start_delivery(
        self: &Arc<Self>,
        mut state: parking_lot::MutexGuard<'_, OutboxState>,
        target: &Target,
    ) {
        if state.delivering {
            return;
        }
        state.delivering = true;
        drop(state);
        self.counters.delivery_tasks.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(deliver(self.clone(), target.clone()));
    }

    /// The next thing to send, or `None` (and the task ends) when nothing is left.
    fn next(&self) -> Option<Delivery> {
        let mut state = self.state.lock();
        if state.closed {
            state.delivering = false;
            return None;
        }
        if state.changes.any() {
            return Some(Delivery::Changes(std::mem::take(&mut state.changes)));
        }
        match state.entries.pop_front() {
            Some(OutboxEntry::Log(log)) => {
                state.logs -= 1;
                state.bytes -= log.bytes;
                self.counters.queued_logs.fetch_sub(1, Ordering::Relaxed);
                self.counters
                    .queued_bytes
                    .fetch_sub(log.bytes, Ordering::Relaxed);
                Some(Delivery::Log(log.params))
            }
            Some(OutboxEntry::Gap { count, level }) => Some(Delivery::Gap { count, level }),
            None => {
                state.delivering = false;
                None
            }
        }
    }

    /// The client left: frees what waits and stops the delivering task.
    fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.entries.clear();
        state.changes = ListChanges::default();
        self.counters
            .queued_logs
            .fetch_sub(state.logs, Ordering::Relaxed);
        self.counters
            .queued_bytes
            .fetch_sub(state.bytes, Ordering::Relaxed);
        state.logs = 0;
        state.bytes = 0;
        drop(state);
        self.stop.cancel();
    }
}

/// The registry's hold on an outbox: when the client leaves the registry, the outbox is closed.
struct OutboxHandle(Arc<Outbox>);

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Delivers one client's outbox, one notification at a time, until it is empty or the client
/// is gone.
async fn deliver(outbox: Arc<Outbox>, target: Target) {
    struct Running(Arc<OutboxCounters>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.delivery_tasks.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _running = Running(outbox.counters.clone());
    while let Some(delivery) = outbox.next() {
        let sent = tokio::select! {
            sent = target.send(delivery) => sent,
            _ = outbox.stop.cancelled() => return,
        };
        if sent.is_err() && target.is_closed() {
            outbox.close();
            return;
        }
    }
}

impl Target {
    async fn send(&self, delivery: Delivery) -> Result<(), ()> {
        match (self, delivery) {
            (Target::Session(peer), Delivery::Changes(changes)) => {
                if changes.tools {
                    peer.notify_tool_list_changed().await.map_err(drop)?;
                }
                if changes.prompts {
                    peer.notify_prompt_list_changed().await.map_err(drop)?;
                }
                if changes.resources {
                    peer.notify_resource_list_changed().await.map_err(drop)?;
                }
                Ok(())
            }
            (Target::Session(peer), Delivery::Log(params)) => peer
                .notify_logging_message((*params).clone())
                .await
                .map_err(drop),
            (Target::Session(peer), Delivery::Gap { count, level }) => {
                let mut params = LoggingMessageNotificationParam::new(
                    level,
                    serde_json::Value::String(format!(
                        "{count} log message{} dropped: this client did not read them as fast as they came (at most {OUTBOX_MAX_LOGS} messages or {OUTBOX_MAX_LOG_BYTES} bytes wait for one session)",
                        if count == 1 { " was" } else { "s were" }
                    )),
                );
                params.logger = Some("concord".to_string());
                peer.notify_logging_message(params).await.map_err(drop)
            }
            // Each stream receives only what its filter accepted (the sink enforces it too).
            (Target::Listener(sink), Delivery::Changes(changes)) => {
                let accepted = sink.accepted();
                if changes.tools && accepted.tools_list_changed == Some(true) {
                    sink.notify_tool_list_changed().await.map_err(drop)?;
                }
                if changes.prompts && accepted.prompts_list_changed == Some(true) {
                    sink.notify_prompt_list_changed().await.map_err(drop)?;
                }
                if changes.resources && accepted.resources_list_changed == Some(true) {
                    sink.notify_resource_list_changed().await.map_err(drop)?;
                }
                Ok(())
            }
            // Listen streams carry no log messages (none are queued for them).
            (Target::Listener(_), _) => Ok(()),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Target::Session(peer) => peer.is_transport_closed(),
            // A listen stream that refuses a notification has ended (or its transport has).
            Target::Listener(_) => true,
        }
    }
}

/// A log message as it is forwarded: named after the server when it names no logger, and its
/// `data` cut when it is larger than [`MAX_FORWARDED_LOG_BYTES`].
fn queued_log(server: &str, mut params: LoggingMessageNotificationParam) -> QueuedLog {
    if params.logger.is_none() {
        params.logger = Some(server.to_string());
    }
    let serialized = serde_json::to_string(&params.data).unwrap_or_default();
    let mut bytes = serialized.len();
    if bytes > MAX_FORWARDED_LOG_BYTES {
        let mut end = MAX_FORWARDED_LOG_BYTES;
        while !serialized.is_char_boundary(end) {
            end -= 1;
        }
        let cut = format!(
            "{}… [cut by concord: this log message had {bytes} bytes; at most {MAX_FORWARDED_LOG_BYTES} are forwarded]",
            &serialized[..end]
        );
        bytes = cut.len() + 2;
        params.data = serde_json::Value::String(cut);
    }
    // The envelope (method, level, logger) besides the data.
    bytes += 96 + params.logger.as_ref().map_or(0, String::len);
    QueuedLog {
        params: Arc::new(params),
        bytes,
    }
}

impl Downstream {
    fn new_session(&self, id: u64, peer: Peer<RoleServer>) -> DownstreamSession {
        DownstreamSession {
            id,
            peer,
            log_level: None,
            identity: None,
            outbox: OutboxHandle(Outbox::new(self.counters.clone())),
        }
    }

    pub fn register(&self, id: u64, peer: Peer<RoleServer>) {
        let mut peers = self.peers.lock();
        peers.retain(|p| !p.peer.is_transport_closed());
        if peers.iter().any(|p| p.id == id) {
            return;
        }
        let session = self.new_session(id, peer);
        peers.push(session);
    }

    /// Records the log level a session asked for (`logging/setLevel`).
    pub fn set_log_level(
        &self,
        id: u64,
        peer: &Peer<RoleServer>,
        level: LoggingLevel,
        identity: Option<crate::access::Identity>,
    ) {
        let mut peers = self.peers.lock();
        let index = match peers.iter().position(|p| p.id == id) {
            Some(index) => index,
            None => {
                let session = self.new_session(id, peer.clone());
                peers.push(session);
                peers.len() - 1
            }
        };
        peers[index].log_level = Some(level);
        peers[index].identity = identity;
    }

    /// The most verbose level any session asked for: what the upstreams are set to, since
    /// the gateway filters per session.
    pub fn most_verbose_level(&self) -> Option<LoggingLevel> {
        self.peers
            .lock()
            .iter()
            .filter_map(|p| p.log_level)
            .min_by_key(|level| severity(*level))
    }

    pub fn add_listener(&self, id: u64, sink: SubscriptionSink) {
        let outbox = OutboxHandle(Outbox::new(self.counters.clone()));
        self.listeners
            .lock()
            .insert(id, DownstreamListener { sink, outbox });
    }

    pub fn remove_listener(&self, id: u64) {
        // Dropping the entry closes its outbox (and stops its delivery).
        let removed = self.listeners.lock().remove(&id);
        drop(removed);
    }

    /// Queues list changes for every session and listen stream; each is told once however
    /// many changes pile up before it reads.
    fn announce(&self, changes: ListChanges) {
        let mut peers = self.peers.lock();
        peers.retain(|p| !p.peer.is_transport_closed());
        for session in peers.iter() {
            let target = Target::Session(session.peer.clone());
            session.outbox.0.push_changes(changes, &target);
        }
        drop(peers);
        for listener in self.listeners.lock().values() {
            let target = Target::Listener(listener.sink.clone());
            listener.outbox.0.push_changes(changes, &target);
        }
    }

    /// Passes an upstream's log message on to the connected clients that asked for its level
    /// (and whose principal may use the server), naming the server as the logger when the
    /// upstream gave none.
    pub fn forward_log(
        &self,
        server: &str,
        params: LoggingMessageNotificationParam,
        may_use: impl Fn(Option<&crate::access::Identity>) -> bool,
    ) {
        let level = params.level;
        // Chosen under the lock, judged by policy outside it.
        let candidates: Vec<(
            Arc<Outbox>,
            Peer<RoleServer>,
            Option<crate::access::Identity>,
        )> = {
            let mut peers = self.peers.lock();
            peers.retain(|p| !p.peer.is_transport_closed());
            peers
                .iter()
                .filter(|p| {
                    p.log_level
                        .is_some_and(|wanted| severity(level) >= severity(wanted))
                })
                .map(|p| (p.outbox.0.clone(), p.peer.clone(), p.identity.clone()))
                .collect()
        };
        let mut log = None;
        for (outbox, peer, identity) in candidates {
            if !may_use(identity.as_ref()) {
                continue;
            }
            let log = log.get_or_insert_with(|| queued_log(server, params.clone()));
            outbox.push_log(log, &Target::Session(peer));
        }
    }

    /// What waits to be sent to downstream clients (closed sessions are let go first).
    pub fn backlog(&self) -> DownstreamBacklog {
        let sessions = {
            let mut peers = self.peers.lock();
            peers.retain(|p| !p.peer.is_transport_closed());
            peers.len()
        };
        DownstreamBacklog {
            sessions,
            listeners: self.listeners.lock().len(),
            queued_logs: self.counters.queued_logs.load(Ordering::Relaxed),
            queued_bytes: self.counters.queued_bytes.load(Ordering::Relaxed),
            delivery_tasks: self.counters.delivery_tasks.load(Ordering::Relaxed),
            dropped_logs: self.counters.dropped_logs.load(Ordering::Relaxed),
        }
    }
}

pub(crate) fn severity(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

type ProgressKey = (Arc<str>, ProgressToken);
type RequestKey = (Arc<str>, RequestId);
type CallSender = mpsc::UnboundedSender<CallEvent>;

/// Upstream traffic that belongs to one in-flight downstream call.
pub(crate) enum CallEvent {
    Progress(ProgressNotificationParam),
    /// A log message the call's server sent while the call was in flight. Only a 2026-07-28
    /// caller that asked for logs on the request (`_meta` log level) receives it this way.
    Log(LoggingMessageNotificationParam),
    /// A request the upstream sent to its client while serving the call (sampling,
    /// elicitation); the call forwards it to its own client and replies through `reply`.
    Request {
        request: ServerRequest,
        reply: oneshot::Sender<Result<ClientResult, McpError>>,
    },
}

/// Routes what an upstream sends while serving a call to the call that caused it. Progress is
/// keyed by the upstream progress token (rmcp assigns one per upstream request); server-to-client
/// requests by the upstream request whose response stream carried them. Progress pushed by the
/// transport tap arrives here in wire order, and the call sends it on from its own task, so it
/// keeps that order and all of it precedes the response. Progress that comes before the call
/// has registered (the upstream can report before the request future yields its token) is
/// held briefly (within bounds) and handed over on registration.
#[derive(Default)]
pub(crate) struct CallRouter {
    by_token: Mutex<HashMap<ProgressKey, CallSender>>,
    by_request: Mutex<HashMap<RequestKey, CallSender>>,
    /// Calls sent (or being sent) upstream whose routes are not registered yet, per server:
    /// an upstream may ask its client something before `register` ran, and such a request
    /// waits for the registration instead of being refused.
    sending: Mutex<HashMap<Arc<str>, usize>>,
    /// Woken whenever a route is registered or a send ends.
    routes_changed: tokio::sync::Notify,
    early: Mutex<EarlyProgress>,
}

/// Early progress notifications held per upstream at most; past it, that upstream's oldest go.
const MAX_EARLY_PROGRESS_PER_UPSTREAM: usize = 256;
/// Early progress notifications held in all; past it, the oldest go, whoever sent them.
const MAX_EARLY_PROGRESS: usize = 1024;

/// Progress that arrived before its call registered (bounded per upstream and in total: an
/// upstream can send progress for tokens no call will ever register), oldest first.
#[derive(Default)]
struct EarlyProgress {
    queue: std::collections::VecDeque<(ProgressKey, ProgressNotificationParam)>,
    /// How many of `queue` each upstream sent.
    per_upstream: HashMap<Arc<str>, usize>,
    /// Notifications dropped to keep the bounds, since start.
    dropped: u64,
}

impl EarlyProgress {
    fn push(&mut self, key: ProgressKey, params: ProgressNotificationParam) {
        let held = self.per_upstream.get(&key.0).copied().unwrap_or(0);
        if held >= MAX_EARLY_PROGRESS_PER_UPSTREAM {
            if let Some(oldest) = self.queue.iter().position(|(k, _)| k.0 == key.0) {
                self.queue.remove(oldest);
                self.forget_one(&key.0);
                self.count_drop(&key.0);
            }
        } else if self.queue.len() >= MAX_EARLY_PROGRESS
            && let Some(((server, _), _)) = self.queue.pop_front()
        {
            self.forget_one(&server);
            self.count_drop(&server);
        }
        *self.per_upstream.entry(key.0.clone()).or_default() += 1;
        self.queue.push_back((key, params));
    }

    /// Takes what is held for `key`, in arrival order.
    fn take(&mut self, key: &ProgressKey) -> Vec<ProgressNotificationParam> {
        if !self.per_upstream.contains_key(&key.0) {
            return Vec::new();
        }
        let mut taken = Vec::new();
        let mut kept = std::collections::VecDeque::with_capacity(self.queue.len());
        for (k, params) in self.queue.drain(..) {
            if k == *key {
                taken.push(params);
            } else {
                kept.push_back((k, params));
            }
        }
        self.queue = kept;
        for _ in 0..taken.len() {
            self.forget_one(&key.0);
        }
        taken
    }

    fn forget_one(&mut self, server: &Arc<str>) {
        if let Some(held) = self.per_upstream.get_mut(server) {
            *held -= 1;
            if *held == 0 {
                self.per_upstream.remove(server);
            }
        }
    }

    fn count_drop(&mut self, server: &str) {
        self.dropped += 1;
        // Logged at 1, 2, 4, 8…: a flood shows without flooding the log itself.
        if self.dropped.is_power_of_two() {
            tracing::warn!(
                server,
                dropped = self.dropped,
                "progress for calls not (yet) registered dropped: over {MAX_EARLY_PROGRESS_PER_UPSTREAM} per upstream or {MAX_EARLY_PROGRESS} in all"
            );
        }
    }
}

/// Marks one call as being sent to `server` until its routes are registered (or it failed).
pub(crate) struct Sending {
    router: Arc<CallRouter>,
    server: Arc<str>,
}

impl Drop for Sending {
    fn drop(&mut self) {
        let mut sending = self.router.sending.lock();
        if let Some(count) = sending.get_mut(&self.server) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                sending.remove(&self.server);
            }
        }
        drop(sending);
        self.router.routes_changed.notify_waiters();
    }
}

impl CallRouter {
    /// Call before sending a request upstream; drop after `register` (or when the send failed).
    pub fn sending(self: &Arc<Self>, server: Arc<str>) -> Sending {
        *self.sending.lock().entry(server.clone()).or_insert(0) += 1;
        Sending {
            router: self.clone(),
            server,
        }
    }

    /// Opens the routes for one upstream call until the guard drops.
    pub fn register(
        self: &Arc<Self>,
        server: Arc<str>,
        upstream_request: RequestId,
        upstream_token: ProgressToken,
    ) -> (CallGuard, mpsc::UnboundedReceiver<CallEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let token_key = (server.clone(), upstream_token);
        let request_key = (server, upstream_request);
        // The early buffer is drained under the token lock so a concurrent push cannot slip
        // between draining it and installing the route.
        let mut by_token = self.by_token.lock();
        for params in self.early.lock().take(&token_key) {
            let _ = tx.send(CallEvent::Progress(params));
        }
        by_token.insert(token_key.clone(), tx.clone());
        drop(by_token);
        self.by_request.lock().insert(request_key.clone(), tx);
        self.routes_changed.notify_waiters();
        (
            CallGuard {
                router: self.clone(),
                token_key: Some(token_key),
                request_key: Some(request_key),
            },
            rx,
        )
    }

    /// Called by the transport tap, in wire order.
    pub fn push_progress(&self, server: &Arc<str>, params: ProgressNotificationParam) {
        let key = (server.clone(), params.progress_token.clone());
        let by_token = self.by_token.lock();
        match by_token.get(&key) {
            Some(sender) => {
                let _ = sender.send(CallEvent::Progress(params));
            }
            None => self.early.lock().push(key, params),
        }
    }

    /// Early progress notifications dropped to keep the buffer's bounds, since start (they
    /// are logged at powers of two).
    #[cfg(test)]
    pub fn early_progress_dropped(&self) -> u64 {
        self.early.lock().dropped
    }

    /// Called by the transport tap, in wire order: offers a log message to every call in
    /// flight to `server`. A notification carries no request id, so the calls to that server
    /// are the narrowest audience that can be named; each call filters by its caller's level.
    pub fn push_log(&self, server: &Arc<str>, params: &LoggingMessageNotificationParam) {
        let by_request = self.by_request.lock();
        for ((call_server, _), sender) in by_request.iter() {
            if call_server == server {
                let _ = sender.send(CallEvent::Log(params.clone()));
            }
        }
    }

    /// Forwards a server-to-client request to the caller whose call it belongs to. `origin` is
    /// the upstream request whose response stream carried it (streamable HTTP); without one
    /// (stdio, or a standalone stream), it goes to the server's only call in flight. It is never
    /// guessed: with several calls in flight and no origin, the upstream gets an error.
    pub async fn route_request(
        &self,
        server: &Arc<str>,
        origin: Option<RequestId>,
        request: ServerRequest,
    ) -> Result<ClientResult, McpError> {
        // While a call to this server is still being sent, its route may not exist yet: wait
        // until every such send registered its route (or failed), then look.
        loop {
            let changed = self.routes_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let known = origin.as_ref().is_some_and(|id| {
                self.by_request
                    .lock()
                    .contains_key(&(server.clone(), id.clone()))
            });
            if known || !self.sending.lock().contains_key(server) {
                break;
            }
            changed.await;
        }
        let sender = {
            let by_request = self.by_request.lock();
            match origin {
                Some(id) => by_request.get(&(server.clone(), id)).cloned(),
                None => {
                    let mut calls = by_request.iter().filter(|((s, _), _)| s == server);
                    match (calls.next(), calls.next()) {
                        (Some((_, sender)), None) => Some(sender.clone()),
                        (None, _) => None,
                        (Some(_), Some(_)) => {
                            return Err(McpError::invalid_request(
                                format!(
                                    "{} cannot be relayed: several calls to server '{server}' are in flight and the request does not say which one it belongs to",
                                    server_request_method(&request)
                                ),
                                None,
                            ));
                        }
                    }
                }
            }
        };
        let Some(sender) = sender else {
            return Err(McpError::invalid_request(
                format!(
                    "{} cannot be relayed: no call to server '{server}' is in flight, so there is no client to ask",
                    server_request_method(&request)
                ),
                None,
            ));
        };
        let (reply, answer) = oneshot::channel();
        sender
            .send(CallEvent::Request { request, reply })
            .map_err(|_| {
                McpError::internal_error("the call this request belongs to has ended", None)
            })?;
        answer.await.map_err(|_| {
            McpError::internal_error("the call this request belongs to has ended", None)
        })?
    }
}

/// The gateway's own built-in tool: reads on where a truncated result stopped.
fn result_page_tool() -> BuiltinTool {
    BuiltinTool {
        name: crate::result_budget::PAGE_TOOL.to_string(),
        description: "Reads the rest of a tool result that was truncated to fit your token limit. \
            Pass the handle from the truncation marker; call again with the same handle while \
            the answer says more remains."
            .to_string(),
        input_schema: serde_json::json!({
            "type": "object",
            "properties": {
                "handle": {"type": "string", "description": "The handle named in the truncation marker"},
                "max_tokens": {"type": "integer", "minimum": 1, "description": "Tokens to return at most (default: the limit that cut the result)"}
            },
            "required": ["handle"],
            "additionalProperties": false
        }),
        output_schema: None,
        read_only: true,
        idempotent: false,
    }
}

fn builtin_to_tool(tool: &BuiltinTool) -> rmcp::model::Tool {
    let schema = tool.input_schema.as_object().cloned().unwrap_or_default();
    let mut out = rmcp::model::Tool::new(
        tool.name.clone(),
        tool.description.clone(),
        Arc::new(schema),
    );
    out.output_schema = tool
        .output_schema
        .as_ref()
        .and_then(|s| s.as_object().cloned())
        .map(Arc::new);
    out.annotations = Some(
        rmcp::model::ToolAnnotations::new()
            .read_only(tool.read_only)
            .idempotent(tool.idempotent)
            .destructive(!tool.read_only && !tool.idempotent),
    );
    out
}

/// The JSON-RPC method of a server-to-client request, for messages.
pub(crate) fn server_request_method(request: &ServerRequest) -> &'static str {
    match request {
        ServerRequest::PingRequest(_) => "ping",
        ServerRequest::CreateMessageRequest(_) => "sampling/createMessage",
        ServerRequest::ListRootsRequest(_) => "roots/list",
        ServerRequest::ElicitRequest(_) => "elicitation/create",
        _ => "a server-to-client request",
    }
}

/// Removes a call's routes when the call ends, however it ends.
pub(crate) struct CallGuard {
    router: Arc<CallRouter>,
    token_key: Option<ProgressKey>,
    request_key: Option<RequestKey>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(key) = self.token_key.take() {
            self.router.by_token.lock().remove(&key);
            self.router.early.lock().take(&key);
        }
        if let Some(key) = self.request_key.take() {
            self.router.by_request.lock().remove(&key);
        }
    }
}

/// A running gateway: upstream supervisors plus the shared state sessions read.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) shared: Arc<Shared>,
    started: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// The node's own MCP client, connected on first use (see [`crate::internal`]).
    internal_client: Arc<tokio::sync::OnceCell<RunningService<RoleClient, ()>>>,
}

impl Gateway {
    pub fn new(config: &Config, options: GatewayOptions, metrics: Arc<Metrics>) -> Gateway {
        Self::with_builtins(config, options, metrics, None)
    }

    /// A gateway that also serves `builtins` as `concord__NAME` tools.
    pub fn with_builtins(
        config: &Config,
        options: GatewayOptions,
        metrics: Arc<Metrics>,
        builtins: Option<Arc<dyn BuiltinTools>>,
    ) -> Gateway {
        let builtin_lists = Arc::new(UpstreamLists {
            tools: builtins
                .as_ref()
                .map(|b| {
                    b.tools()
                        .iter()
                        .chain(std::iter::once(&result_page_tool()))
                        .map(builtin_to_tool)
                        .collect()
                })
                .unwrap_or_default(),
            templates: builtins
                .as_ref()
                .map(|b| {
                    b.resource_templates()
                        .into_iter()
                        .map(|t| {
                            let mut template =
                                rmcp::model::ResourceTemplate::new(t.uri_template, t.name);
                            template.description = Some(t.description);
                            template.mime_type = Some(t.mime_type);
                            template
                        })
                        .collect()
                })
                .unwrap_or_default(),
            ..UpstreamLists::default()
        });
        let locals = options
            .local_namespaces
            .iter()
            .map(|(name, provider)| {
                let lists = Arc::new(UpstreamLists {
                    tools: provider.tools().iter().map(builtin_to_tool).collect(),
                    ..UpstreamLists::default()
                });
                (Arc::<str>::from(name.as_str()), provider.clone(), lists)
            })
            .collect();
        let shutdown = CancellationToken::new();
        let breaker = BreakerPolicy::from(&config.routing);
        let mut upstreams = UpstreamSet::default();
        for spec in &config.servers {
            upstreams.insert(Arc::new(Upstream::new(
                spec.clone(),
                None,
                breaker,
                shutdown.child_token(),
            )));
        }
        Gateway {
            shared: Arc::new(Shared {
                upstreams: RwLock::new(upstreams),
                results: crate::result_cache::ResultCache::new(config.routing.cache_entries),
                remainders: Default::default(),
                routing: config.routing.clone(),
                breaker,
                catalog: RwLock::default(),
                rebuild_lock: Mutex::new(()),
                downstream: Downstream::new(&config.node),
                router: Arc::default(),
                subscriptions: Subscriptions::default(),
                suspended: SuspendedCalls::default(),
                next_session: AtomicU64::new(1),
                metrics,
                options,
                shutdown,
                settled: Notify::new(),
                builtins,
                builtin_lists,
                builtin_name: BUILTIN_NAMESPACE.into(),
                locals,
                internal_calls: Default::default(),
            }),
            started: Arc::new(AtomicBool::new(false)),
            tasks: Arc::default(),
            internal_client: Arc::default(),
        }
    }

    /// Starts one supervisor per upstream. Idempotent.
    pub fn start(&self) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        // Built-in tools are there before any upstream connects (and with no upstreams at all).
        self.shared.rebuild_catalog();
        if self.shared.routing.max_result_tokens.is_some() {
            // Loading the tokenizer takes a moment: not on the first long result's time.
            tokio::task::spawn_blocking(|| crate::result_budget::count_tokens("warm up"));
        }
        let mut tasks = self.tasks.lock();
        for upstream in self.shared.upstreams() {
            tasks.push(tokio::spawn(supervise(self.shared.clone(), upstream)));
        }
    }

    /// Adds an upstream while the gateway runs (a server registered in the mesh); its tools
    /// join the catalog once it connects. Refused if the name is taken.
    pub fn add_upstream(&self, spec: concord_config::ServerSpec) -> Result<(), GatewayError> {
        self.add_replica(spec, None)
    }

    /// Adds one replica of the logical server `pool` (`spec.name` must be unique among
    /// upstreams, e.g. `POOL@REPLICA`): calls to the pool's tools are spread over its replicas.
    /// With `pool` `None` the upstream is its own pool.
    pub fn add_replica(
        &self,
        spec: concord_config::ServerSpec,
        pool: Option<&str>,
    ) -> Result<(), GatewayError> {
        let upstream = {
            let mut set = self.shared.upstreams.write();
            if set.by_name.contains_key(spec.name.as_str()) {
                return Err(GatewayError::Startup(format!(
                    "an upstream named {} already exists",
                    spec.name
                )));
            }
            let upstream = Arc::new(Upstream::new(
                spec,
                pool.map(Arc::from),
                self.shared.breaker,
                self.shared.shutdown.child_token(),
            ));
            set.insert(upstream.clone());
            upstream
        };
        tracing::info!(server = %upstream.name, "upstream added");
        self.tasks
            .lock()
            .push(tokio::spawn(supervise(self.shared.clone(), upstream)));
        Ok(())
    }

    /// Removes an upstream added at run time (or from config): its supervisor stops, its child
    /// process (if any) is stopped, and its tools leave the catalog at once.
    pub fn remove_upstream(&self, name: &str) -> bool {
        let removed = self.shared.upstreams.write().remove(name);
        let Some(upstream) = removed else {
            return false;
        };
        upstream.stop.cancel();
        tracing::info!(server = %upstream.name, "upstream removed");
        self.shared.rebuild_catalog();
        true
    }

    /// Names of every upstream, in order.
    pub fn upstream_names(&self) -> Vec<String> {
        self.shared
            .upstreams()
            .iter()
            .map(|u| u.name.to_string())
            .collect()
    }

    /// Waits until every upstream has finished its first connection attempt (or `limit`
    /// passes), then refuses to go on if two `never`-prefixed servers expose the same name.
    pub async fn wait_first_attempts(&self, limit: Duration) -> Result<(), GatewayError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.settled.notified();
            if self.shared.all_settled() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let collisions: Vec<Collision> = self.shared.catalog().collisions.clone();
        if let Some(first) = collisions.first() {
            return Err(GatewayError::Startup(first.to_string()));
        }
        Ok(())
    }

    /// True once every upstream has had its first connection attempt.
    pub fn is_ready(&self) -> bool {
        self.shared.all_settled()
    }

    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.shared
            .upstreams()
            .iter()
            .map(|u| {
                let state = u.state.read();
                let (label, reason) = match &state.health {
                    Health::Starting => ("starting", None),
                    Health::Healthy => ("healthy", None),
                    Health::Unhealthy { reason } => ("unhealthy", Some(reason.clone())),
                };
                UpstreamStatus {
                    name: u.name.to_string(),
                    server: u.pool.to_string(),
                    breaker: u.breaker.state().label(),
                    in_flight: u.in_flight.load(Ordering::Relaxed),
                    transport: u.spec.transport.kind(),
                    state: label,
                    reason,
                    tools: state.lists.tools.len(),
                    prompts: state.lists.prompts.len(),
                    resources: state.lists.resources.len(),
                    restarts: state.restarts,
                    uptime_seconds: state.connected_since.map(|t| t.elapsed().as_secs()),
                    retry_backoff_ms: state.retry_backoff.map(|d| d.as_millis() as u64),
                    next_retry_in_ms: state.next_retry_at.map(|at| {
                        at.saturating_duration_since(std::time::Instant::now())
                            .as_millis() as u64
                    }),
                }
            })
            .collect()
    }

    /// Every tool currently exposed, with the (logical) server that serves it.
    pub fn tool_catalog(&self) -> Vec<ExposedTool> {
        let catalog = self.shared.catalog();
        catalog
            .tools
            .iter()
            .map(|t| ExposedTool {
                name: t.name.to_string(),
                description: t.description.as_deref().unwrap_or_default().to_string(),
                input_schema: serde_json::Value::Object((*t.input_schema).clone()),
                server: catalog
                    .tool_routes
                    .get(&*t.name)
                    .map(|route| route.server.to_string())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Number of tools currently exposed.
    pub fn tool_count(&self) -> usize {
        self.shared.catalog().tools.len()
    }

    /// What waits to be sent to the downstream clients (log messages, list changes), and what
    /// was dropped because a client did not read it.
    pub fn downstream_backlog(&self) -> DownstreamBacklog {
        self.shared.downstream.backlog()
    }

    /// Calls a tool by its exposed name on the node's own behalf, as its configuration says
    /// (a state validator): no client and no caller, so no policy or budgets apply; no
    /// progress, and sampling or elicitation requests are refused. Returns the `tools/call`
    /// result as JSON.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, GatewayError> {
        let caller = crate::builtin::Caller::default();
        let route = self
            .shared
            .catalog()
            .tool_routes
            .get(name)
            .cloned()
            .ok_or_else(|| GatewayError::UnknownTool(name.to_string()))?;
        let local = self
            .shared
            .locals
            .iter()
            .find(|(n, _, _)| *n == route.server)
            .map(|(_, provider, _)| provider.clone())
            .or_else(|| {
                self.shared
                    .builtins
                    .clone()
                    .filter(|_| route.server == self.shared.builtin_name)
            });
        if let Some(provider) = local {
            let outcome = provider.call(&route.name, arguments, caller).await;
            let text = serde_json::to_string(&outcome.structured).unwrap_or_default();
            return Ok(serde_json::json!({
                "content": [{"type": "text", "text": text}],
                "structuredContent": outcome.structured,
                "isError": outcome.is_error,
            }));
        }
        let (upstream, pass) =
            self.shared
                .pick(&route.server, &[])
                .map_err(|none| GatewayError::Unavailable {
                    server: route.server.to_string(),
                    reason: none.reason,
                })?;
        let peer = upstream
            .peer()
            .map_err(|reason| GatewayError::Unavailable {
                server: route.server.to_string(),
                reason,
            })?;
        let mut params = rmcp::model::CallToolRequestParams::new(route.name.clone());
        params.arguments = Some(arguments);
        let timeout = upstream.spec.request_timeout;
        let mut ticket = ReplicaTicket::new(upstream.clone(), pass);
        let result = tokio::time::timeout(timeout, peer.call_tool(params))
            .await
            .map_err(|_| GatewayError::Timeout {
                server: route.server.to_string(),
                method: "tools/call".into(),
                timeout,
            })
            .and_then(|r| {
                r.map_err(|e| GatewayError::from_service(&route.server, "tools/call", e))
            });
        ticket.finish(
            &self.shared,
            result.as_ref().is_err_and(GatewayError::is_replica_failure),
        );
        serde_json::to_value(result?).map_err(|e| GatewayError::Startup(e.to_string()))
    }

    /// Calls a tool on behalf of `caller`: through the whole pipeline a client's call
    /// takes (policy and budgets for `caller.identity`, drawing on `caller.budget_envelope`;
    /// cache, failover, audit), made by the node's own MCP client. Tools served in process
    /// (built-ins, agents) see `caller` itself: an agent calling another agent passes its
    /// delegation chain and budget. Cancelling `caller.cancel` cancels the call upstream.
    pub async fn call_tool_as(
        &self,
        name: &str,
        arguments: serde_json::Map<String, serde_json::Value>,
        caller: crate::builtin::Caller,
    ) -> Result<serde_json::Value, GatewayError> {
        let client = self
            .internal_client
            .get_or_try_init(|| crate::internal::connect(&self.shared))
            .await?;
        let mut meta = rmcp::model::RequestMetaObject::new();
        if let Some(parent) = caller
            .budget_envelope
            .as_ref()
            .and_then(|envelope| envelope.get("id"))
        {
            meta.0.0.insert(
                "concord/budget".into(),
                serde_json::json!({"parent": parent}),
            );
        }
        if let Some(traceparent) = &caller.trace_id {
            meta.0
                .0
                .insert("traceparent".into(), traceparent.clone().into());
        }
        let cancel = caller.cancel.clone();
        let registration = self
            .shared
            .internal_calls
            .register(caller, tracing::Span::current());
        meta.0.0.insert(
            crate::internal::INTERNAL_CALL_META.into(),
            registration.id.into(),
        );
        let mut params = rmcp::model::CallToolRequestParams::new(name.to_string());
        params.arguments = Some(arguments);
        params.meta = Some(meta);
        // Dropping the request (cancellation) sends notifications/cancelled for it.
        let response = tokio::select! {
            response = client.call_tool_once(params) => response,
            _ = cancel.cancelled() => return Err(GatewayError::Cancelled),
        };
        drop(registration);
        match response {
            Ok(rmcp::model::CallToolResponse::Complete(result)) => {
                serde_json::to_value(result).map_err(|e| GatewayError::Startup(e.to_string()))
            }
            Ok(_) => Err(GatewayError::UnexpectedResult {
                server: "concord".into(),
                method: "tools/call".into(),
            }),
            Err(e) => Err(GatewayError::from_service("concord", "tools/call", e)),
        }
    }

    /// Tells the clients subscribed to `uri` (a built-in resource) that it changed.
    pub async fn notify_resource_updated(&self, uri: &str) {
        let params = rmcp::model::ResourceUpdatedNotificationParam::new(uri.to_string());
        let _ = self
            .shared
            .subscriptions
            .updated(&self.shared.builtin_name, params)
            .await;
    }

    /// True when some client is subscribed to a built-in resource (so changes are worth
    /// looking for).
    pub async fn has_builtin_subscribers(&self) -> bool {
        !self
            .shared
            .subscriptions
            .uris_of(&self.shared.builtin_name)
            .await
            .is_empty()
    }

    /// Stops every supervisor and waits for stdio children to exit.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod call_router_tests {
    use super::*;

    fn token(name: &str) -> ProgressToken {
        ProgressToken(rmcp::model::NumberOrString::String(name.into()))
    }

    fn progress(name: &str, n: usize) -> ProgressNotificationParam {
        ProgressNotificationParam::new(token(name), n as f64)
    }

    fn progress_of(events: &mut mpsc::UnboundedReceiver<CallEvent>) -> Vec<f64> {
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let CallEvent::Progress(params) = event {
                seen.push(params.progress);
            }
        }
        seen
    }

    fn held(router: &CallRouter) -> usize {
        router.early.lock().queue.len()
    }

    #[test]
    fn early_progress_is_bounded_per_upstream_keeping_the_newest() {
        let router = Arc::new(CallRouter::default());
        let flooder: Arc<str> = "flooder".into();
        let quiet: Arc<str> = "quiet".into();
        router.push_progress(&quiet, progress("q", 0));
        let sent = 10 * MAX_EARLY_PROGRESS_PER_UPSTREAM;
        for n in 0..sent {
            router.push_progress(&flooder, progress("t", n));
            assert!(held(&router) <= MAX_EARLY_PROGRESS_PER_UPSTREAM + 1);
        }
        assert_eq!(
            router.early_progress_dropped(),
            (sent - MAX_EARLY_PROGRESS_PER_UPSTREAM) as u64
        );
        // The call registers: it gets the newest, in order.
        let (_flooded, mut events) =
            router.register(flooder.clone(), RequestId::Number(1), token("t"));
        let expected: Vec<f64> = (sent - MAX_EARLY_PROGRESS_PER_UPSTREAM..sent)
            .map(|n| n as f64)
            .collect();
        assert_eq!(progress_of(&mut events), expected);
        // The flood did not push out another upstream's early progress.
        let (_quiet, mut events) = router.register(quiet, RequestId::Number(1), token("q"));
        assert_eq!(progress_of(&mut events), vec![0.0]);
        assert_eq!(held(&router), 0);
    }

    #[test]
    fn early_progress_is_bounded_in_total() {
        let router = CallRouter::default();
        let upstreams = 2 * MAX_EARLY_PROGRESS / MAX_EARLY_PROGRESS_PER_UPSTREAM;
        for u in 0..upstreams {
            let server: Arc<str> = format!("u{u}").into();
            for n in 0..MAX_EARLY_PROGRESS_PER_UPSTREAM {
                // Tokens no call will ever register.
                router.push_progress(&server, progress(&format!("never-{n}"), n));
                assert!(held(&router) <= MAX_EARLY_PROGRESS);
            }
        }
        assert_eq!(held(&router), MAX_EARLY_PROGRESS);
        assert_eq!(
            router.early_progress_dropped(),
            (upstreams * MAX_EARLY_PROGRESS_PER_UPSTREAM - MAX_EARLY_PROGRESS) as u64
        );
        // The oldest went: the first upstream's progress is gone, the last one's is whole.
        let early = router.early.lock();
        assert!(!early.per_upstream.contains_key("u0"));
        assert_eq!(
            early
                .per_upstream
                .get(format!("u{}", upstreams - 1).as_str()),
            Some(&MAX_EARLY_PROGRESS_PER_UPSTREAM)
        );
        assert_eq!(
            early.per_upstream.values().sum::<usize>(),
            early.queue.len()
        );
    }

    #[test]
    fn an_ended_call_takes_its_late_progress_away() {
        let router = Arc::new(CallRouter::default());
        let server: Arc<str> = "s".into();
        router.push_progress(&server, progress("late", 1));
        router.push_progress(&server, progress("other", 2));
        assert_eq!(held(&router), 2);
        let (guard, _events) = router.register(server.clone(), RequestId::Number(8), token("late"));
        drop(guard);
        // Progress for the ended call's token that arrives after it is held, then released
        // when a call with that token ends; nothing else of the server's is disturbed.
        router.push_progress(&server, progress("late", 3));
        let (guard, _events) = router.register(server.clone(), RequestId::Number(9), token("late"));
        drop(guard);
        assert_eq!(held(&router), 1);
        assert_eq!(router.early.lock().per_upstream.get("s"), Some(&1));
    }
}
