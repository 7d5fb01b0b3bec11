//! Tools the node serves itself (shared state today; more later), exposed in the gateway's
//! namespace beside the upstreams' tools as `concord__NAME`. The provider is given by the
//! composition root, so this crate knows nothing of what the tools do; and it speaks plain JSON,
//! so providers never see rmcp types.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The namespace built-in tools appear under (a reserved server name).
pub const BUILTIN_NAMESPACE: &str = "concord";

/// One built-in tool's definition.
#[derive(Debug, Clone)]
pub struct BuiltinTool {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: Value,
    /// JSON Schema of `structuredContent`.
    pub output_schema: Option<Value>,
    pub read_only: bool,
    pub idempotent: bool,
}

/// Who is calling, as far as the gateway knows.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The authenticated principal; with auth off, the client's name.
    pub principal: String,
    /// Who authenticated (absent with auth off).
    pub identity: Option<crate::access::Identity>,
    /// The W3C `traceparent` of the call, when the client sent one.
    pub trace_id: Option<String>,
    /// Agents that delegated this call, outermost first (empty for a call from a client).
    pub delegation: Vec<String>,
    /// What the delegating agent left for this call to spend.
    pub budget: Option<DelegatedBudget>,
    /// The delegating agent's run (for the usage ledger).
    pub parent_run: Option<String>,
    /// Cancelled when the caller cancels the call.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Where progress goes, when the caller asked for it (a progress token).
    pub progress: Option<ProgressSink>,
    /// The budget envelope the gateway issued for this call (auth on, with budgets): what it
    /// may still spend (`remaining`, `deadline_in_ms`), and the `id` that calls made on its
    /// behalf name as their `parent`, so they draw on the same budgets.
    pub budget_envelope: Option<Value>,
}

/// Reports progress of a running tool to its caller: how far (increasing), out of how much if
/// known, and a message. Sent in order, all before the result.
#[derive(Clone)]
pub struct ProgressSink(pub Arc<dyn Fn(f64, Option<f64>, String) + Send + Sync>);

impl ProgressSink {
    pub fn report(&self, progress: f64, total: Option<f64>, message: impl Into<String>) {
        (self.0)(progress, total, message.into());
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// A budget carved from a delegating agent's own.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DelegatedBudget {
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub deadline: Option<std::time::Instant>,
}

/// A built-in tool's answer: structured content, and whether it is a tool error the model
/// should read (a conflict, bad arguments) rather than a success.
#[derive(Debug, Clone)]
pub struct BuiltinOutcome {
    pub structured: Value,
    pub is_error: bool,
}

pub type BuiltinFuture = Pin<Box<dyn Future<Output = BuiltinOutcome> + Send>>;

/// A family of resources the node serves itself, by URI template.
#[derive(Debug, Clone)]
pub struct BuiltinTemplate {
    pub uri_template: String,
    pub name: String,
    pub description: String,
    pub mime_type: String,
}

/// The text of a built-in resource, or why there is none.
pub type ResourceFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

pub trait BuiltinTools: Send + Sync + 'static {
    fn tools(&self) -> Vec<BuiltinTool>;
    /// Runs `name` (unprefixed) with `arguments`.
    fn call(&self, name: &str, arguments: Map<String, Value>, caller: Caller) -> BuiltinFuture;
    /// Resource templates served by [`Self::read_resource`].
    fn resource_templates(&self) -> Vec<BuiltinTemplate> {
        Vec::new()
    }
    /// Reads one resource under a template from [`Self::resource_templates`].
    fn read_resource(&self, uri: &str) -> ResourceFuture {
        let uri = uri.to_string();
        Box::pin(async move { Err(format!("no built-in resource {uri}")) })
    }
    /// The decision a read of `uri` needs besides `resources/read`, as a policy method and the
    /// name it decides on: a resource that is another surface's data (a state key) is read under
    /// that surface's rules too.
    fn resource_policy(&self, _uri: &str) -> Option<(&'static str, String)> {
        None
    }
}

pub(crate) type SharedBuiltins = Arc<dyn BuiltinTools>;
