//! Calls the node makes itself (an agent's tool calls) take the same pipeline as a client's —
//! policy, rate limits, budgets, result cache, replica choice and failover, deadline,
//! cancellation forwarding, result size, audit — because an MCP client makes them: one
//! in-process client connected over an in-memory pipe to a session marked internal. Who a call
//! is for (a [`Caller`], with its cancellation and progress sink, which do not serialise) waits
//! in a table under a number the request carries in `_meta`; only internal sessions read that
//! key, so no network client can claim to be somebody else with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rmcp::ServiceExt;
use rmcp::service::{RoleClient, RunningService};
use tracing::Instrument;

use crate::builtin::Caller;
use crate::error::GatewayError;
use crate::gateway::Shared;

/// The `_meta` key an internal call is registered under.
pub(crate) const INTERNAL_CALL_META: &str = "concord/internal_call";

/// Callers of internal calls in flight, by the number their request carries.
#[derive(Default)]
pub(crate) struct InternalCalls {
    next: AtomicU64,
    callers: Mutex<HashMap<u64, InternalCaller>>,
}

impl InternalCalls {
    /// Keeps `caller` (and the span the call was made in) until the returned registration is
    /// dropped (the call is over).
    pub fn register(&self, caller: Caller, span: tracing::Span) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.callers
            .lock()
            .insert(id, InternalCaller { caller, span });
        Registration { calls: self, id }
    }

    pub fn caller(&self, id: u64) -> Option<InternalCaller> {
        self.callers.lock().get(&id).cloned()
    }
}

pub(crate) struct Registration<'a> {
    calls: &'a InternalCalls,
    pub id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.calls.callers.lock().remove(&self.id);
    }
}

/// The caller of an internal call, put into its request context by the internal session, and
/// the span it was made in (the call's own span nests under it: an agent's tool calls and
/// delegations show inside the agent's span).
#[derive(Clone)]
pub(crate) struct InternalCaller {
    pub caller: Caller,
    pub span: tracing::Span,
}

/// Connects the in-process client to a new internal session of `shared`. The connection's
/// tasks live as long as the node, so they belong to a root span of their own, not to the span
/// of whichever call happened to connect first.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
) -> Result<RunningService<RoleClient, ()>, GatewayError> {
    connect_unscoped(shared)
        .instrument(tracing::info_span!(parent: None, "internal_client"))
        .await
}

async fn connect_unscoped(
    shared: &Arc<Shared>,
) -> Result<RunningService<RoleClient, ()>, GatewayError> {
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let session = shared.new_internal_session();
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        match session.serve(server_end).await {
            Ok(running) => {
                tokio::select! {
                    _ = running.waiting() => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => tracing::error!(error = %e, "the internal session did not start"),
        }
    });
    ().serve(client_end)
        .await
        .map_err(|e| GatewayError::Startup(format!("the internal client did not connect: {e}")))
}
