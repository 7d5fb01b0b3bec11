//! Concord's configuration: the user-facing file formats (`concord.toml` and the standard
//! `mcpServers` JSON used by Claude Desktop, Cursor and `.mcp.json`) turned into one validated
//! [`Config`]. This is the only crate that parses configuration; everything downstream receives
//! already-checked values and never re-validates them.

mod duration;
mod env;
mod error;
mod raw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use duration::parse_duration;
pub use env::expand_vars;
pub use error::ConfigError;

/// Default loopback address a node listens on when neither the file nor the CLI names one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8811";
/// Default request body limit for `/mcp` (bytes).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Default per-upstream request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default interval between MCP `ping` health checks of each upstream.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Default number of items per page in aggregated list results.
pub const DEFAULT_PAGE_SIZE: usize = 200;
/// Registrations one principal may hold at once over the registry API, unless configured.
pub const DEFAULT_REGISTRY_MAX_PER_PRINCIPAL: usize = 100;
/// MCP sessions (2025-era `Mcp-Session-Id` sessions) one endpoint holds at once, unless configured.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// How long a session may go without a request from its client, and without an open stream,
/// before it is closed, unless configured.
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// TCP connections the node serves at once, unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// How long a client may take to send a request's headers (and how long a kept-alive connection
/// may wait idle for its next request), unless configured.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most `[node] max_sessions` and `max_connections` may be set to.
pub const MAX_SESSIONS_OR_CONNECTIONS: usize = 1_000_000;
/// Tool calls of one model turn an agent runs at most, unless configured
/// (`[agents.NAME] max_tool_calls_per_turn`).
pub const DEFAULT_MAX_TOOL_CALLS_PER_TURN: u32 = 16;
/// Tool calls of one turn an agent runs at the same time at most, unless configured
/// (`[agents.NAME] max_parallel_tool_calls`).
pub const DEFAULT_MAX_PARALLEL_TOOL_CALLS: u32 = 4;
/// The largest value either of those two settings takes.
pub const MAX_TOOL_CALLS_LIMIT: u32 = 1024;
/// Names that Concord keeps for its own built-in tools.
pub const RESERVED_SERVER_NAMES: &[&str] = &["concord", "agents", "workflows"];
/// Separator between a server name and a tool or prompt name in the gateway's namespace.
pub const NAMESPACE_SEPARATOR: &str = "__";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// The file it was read from, if any (errors and relative paths refer to it).
    pub source: Option<PathBuf>,
    pub node: NodeSettings,
    pub state: StateSettings,
    pub auth: AuthSettings,
    pub policy: PolicySettings,
    pub limits: LimitSettings,
    pub audit: AuditSettings,
    pub budgets: BudgetSettings,
    pub routing: RoutingSettings,
    /// LLM providers (`[providers.NAME]`), sorted by name.
    pub providers: Vec<ProviderSpec>,
    /// Agents (`[agents.NAME]`), sorted by name.
    pub agents: Vec<AgentSettings>,
    /// Workflows over agents (`[workflows.NAME]`), sorted by name.
    pub workflows: Vec<WorkflowSettings>,
    /// Entities declared in the config (`[registry.NAME]`): registered at start and kept alive
    /// by the node itself, beside those that register over HTTP.
    pub registry: Vec<concord_mesh::Registration>,
    /// Upstream servers, sorted by name.
    pub servers: Vec<ServerSpec>,
}

/// Authentication (the `[auth]` table). Off by default, which is allowed only on loopback.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    pub enabled: bool,
    /// Required `iss` of JWTs.
    pub issuer: Option<String>,
    /// Required `aud` of JWTs.
    pub audience: Option<String>,
    /// Where the signing keys are published (fetched at start, refreshed every 5 minutes or per
    /// Cache-Control, and on an unknown `kid`).
    pub jwks_url: Option<String>,
    /// Keys given in the config instead of (or beside) a JWKS.
    pub keys: Vec<StaticKey>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim naming the principal.
    pub principal_claim: String,
    /// The claim listing the principal's roles (an array, or a space-separated string).
    pub roles_claim: String,
    /// Announced in the protected-resource metadata (RFC 9728) so clients find where to log in.
    pub authorization_servers: Vec<String>,
    /// This server's resource identifier (default: the URL of `/mcp` as requested).
    pub resource: Option<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            issuer: None,
            audience: None,
            jwks_url: None,
            keys: Vec::new(),
            leeway: Duration::from_secs(60),
            principal_claim: "sub".into(),
            roles_claim: "roles".into(),
            authorization_servers: Vec::new(),
            resource: None,
        }
    }
}

/// A JWT verification key from the config. Each key verifies one algorithm only, so a token
/// cannot pick a weaker reading of the key (algorithm confusion).
#[derive(Debug, Clone, PartialEq)]
pub struct StaticKey {
    pub kid: Option<String>,
    /// `HS256`, `RS256`, `ES256` or `EdDSA`.
    pub algorithm: String,
    /// The shared secret (HS256).
    pub secret: Option<String>,
    /// PEM public key (RS256, ES256, EdDSA).
    pub public_key_pem: Option<String>,
}

/// How calls are spread over the replicas of one server, and when they are retried (the
/// `[routing]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    /// Consecutive failures of one replica that open its circuit breaker.
    pub breaker_failures: u32,
    /// Share of failed calls among the last `breaker_window` that opens the breaker too.
    pub breaker_failure_ratio: f64,
    pub breaker_window: u32,
    /// How long an open breaker waits before letting one probe call through.
    pub breaker_cooldown: Duration,
    /// Attempts of one call in all (the first included), for calls that are safe to retry.
    pub retry_attempts: u32,
    /// The first backoff between attempts; it doubles each time, with jitter.
    pub retry_backoff: Duration,
    /// Entries the result cache holds at most (least recently used go first).
    pub cache_entries: usize,
    /// Tokens a tool result may have before it is truncated (a caller may ask for fewer with
    /// `_meta["concord/max_result_tokens"]`); `None`: no limit unless the caller sets one.
    pub max_result_tokens: Option<u64>,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            breaker_failures: 5,
            breaker_failure_ratio: 0.5,
            breaker_window: 20,
            breaker_cooldown: Duration::from_secs(5),
            retry_attempts: 3,
            retry_backoff: Duration::from_millis(50),
            cache_entries: 1024,
            max_result_tokens: None,
        }
    }
}

/// Which wire API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderApi {
    /// The OpenAI chat completions API (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM).
    Openai,
    Anthropic,
    Gemini,
}

/// One LLM provider (`[providers.NAME]`). It is registered in the mesh as an `llm` entity
/// under its name, so agents find it by tags like any other dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    pub name: String,
    pub api: ProviderApi,
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key (its value is read at start, never logged).
    pub api_key_env: Option<String>,
    pub tags: Vec<String>,
    pub version: String,
    /// US dollars per million input / output tokens.
    pub price_input: f64,
    pub price_output: f64,
    pub timeout: Duration,
    pub stream: bool,
    pub max_tokens: u32,
    /// Sampling temperature unless a request says otherwise.
    pub temperature: Option<f32>,
}

/// One agent (`[agents.NAME]`), exposed as the tool `agents__NAME`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    pub name: String,
    pub description: String,
    pub instructions: String,
    /// Which providers may answer, resolved through the mesh (capability `llm`).
    pub provider: concord_mesh::Selector,
    /// Tools it may call, by exposed name (`SERVER__TOOL`) or whole servers (`SERVER__*`).
    pub tools: Vec<String>,
    /// Every tool of the servers these selectors resolve to (through the mesh: registered
    /// servers and configured ones, by their `capabilities` and `tags`).
    pub tool_servers: Vec<concord_mesh::Selector>,
    pub max_iterations: u32,
    /// Tool calls run per model turn at most; the model is told about the rest (default 16).
    pub max_tool_calls_per_turn: usize,
    /// Tool calls of one turn run at the same time at most (default 4).
    pub max_parallel_tool_calls: usize,
    pub output_schema: Option<serde_json::Value>,
    pub budget: AgentBudget,
    /// Ask the cheapest provider that satisfies the selector first (by price per token).
    pub cost_aware: bool,
}

/// A workflow over agents (`[workflows.NAME]`), exposed as the tool `workflows__NAME`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkflowKind {
    /// One agent picked by the first rule whose words all appear in the task, else by
    /// `router_agent` among `agents`, else `fallback`.
    Router {
        #[serde(default)]
        routes: Vec<WorkflowRoute>,
        router_agent: Option<String>,
        #[serde(default)]
        agents: Vec<String>,
        fallback: Option<String>,
    },
    /// Every agent at once; `combine` merges the answers.
    Parallel {
        agents: Vec<String>,
        combine: Option<String>,
    },
    /// A task DAG over workers, each task to the least-loaded worker with its capability.
    Orchestrator {
        workers: Vec<WorkflowWorker>,
        tasks: Vec<WorkflowTask>,
    },
    /// Generator and evaluator until the evaluator says PASS (at most `max_rounds`).
    Evaluator {
        generator: String,
        evaluator: String,
        #[serde(default = "three")]
        max_rounds: u32,
    },
}

fn three() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRoute {
    pub contains: Vec<String>,
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowWorker {
    pub agent: String,
    pub capabilities: Vec<String>,
    #[serde(default = "one")]
    pub max_concurrency: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowTask {
    pub id: String,
    pub capability: String,
    pub task: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowSettings {
    pub name: String,
    pub description: String,
    pub kind: WorkflowKind,
}

impl WorkflowKind {
    /// Every agent the workflow names.
    pub fn agents(&self) -> Vec<&str> {
        match self {
            WorkflowKind::Router {
                routes,
                router_agent,
                agents,
                fallback,
            } => routes
                .iter()
                .map(|r| r.agent.as_str())
                .chain(router_agent.as_deref())
                .chain(agents.iter().map(String::as_str))
                .chain(fallback.as_deref())
                .collect(),
            WorkflowKind::Parallel { agents, combine } => agents
                .iter()
                .map(String::as_str)
                .chain(combine.as_deref())
                .collect(),
            WorkflowKind::Orchestrator { workers, .. } => {
                workers.iter().map(|w| w.agent.as_str()).collect()
            }
            WorkflowKind::Evaluator {
                generator,
                evaluator,
                ..
            } => vec![generator.as_str(), evaluator.as_str()],
        }
    }
}

/// What one run of an agent may spend.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AgentBudget {
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub tool_calls: Option<u64>,
    pub deadline: Option<Duration>,
}

/// Settings of one tool of a server (`[servers.NAME.tools.TOOL]`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolSettings {
    /// Cache this tool's results for this long, even without `readOnlyHint` (the operator
    /// vouches that it has no side effects); `Some(0)` turns caching off for it.
    pub cache_ttl: Option<Duration>,
    /// Retry or replay this tool on another replica after a failure, even without
    /// `readOnlyHint`/`idempotentHint`.
    pub retryable: bool,
}

/// Rate limits (the `[limits]` table), enforced per principal with auth on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LimitSettings {
    /// Every principal's tool calls.
    pub per_principal: Option<Rate>,
    /// One tool's calls, per principal (keys: tool names as exposed).
    pub per_tool: BTreeMap<String, Rate>,
}

/// A token bucket: `per_second` refill, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// Budgets (the `[budgets]` table), enforced with auth on.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSettings {
    /// Share of a budget after which results carry a warning in `_meta`.
    pub warn_at: f64,
    /// How deep a delegation chain may go.
    pub max_depth: u32,
    /// Every principal's standing budget, unless a principal or role has its own.
    pub default: Option<BudgetLimits>,
    pub roles: BTreeMap<String, BudgetLimits>,
    pub principals: BTreeMap<String, BudgetLimits>,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            warn_at: 0.8,
            max_depth: 8,
            default: None,
            roles: BTreeMap::new(),
            principals: BTreeMap::new(),
        }
    }
}

/// One standing budget: limits per `window` (none: forever), and a deadline for each call chain.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BudgetLimits {
    pub tool_calls: Option<u64>,
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub window: Option<Duration>,
    pub deadline: Option<Duration>,
}

/// What the audit trail records (the `[audit]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    /// Record tool-call arguments (after redaction). Off by default.
    pub record_arguments: bool,
    /// Argument keys whose values are replaced by `"***"` (case-insensitive substring match).
    pub redact: Vec<String>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            record_arguments: false,
            redact: [
                "password",
                "secret",
                "token",
                "key",
                "authorization",
                "cookie",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Authorization rules (the `[policy]` table and the file it names).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicySettings {
    pub rules: Vec<PolicyRule>,
    /// A file of `[[rules]]`, watched and reloaded without a restart.
    pub file: Option<PathBuf>,
}

/// One rule: when `when` (a CEL expression over the request) is true, `effect` applies. Any
/// matching `deny` wins over every `allow`; with auth on, no matching rule means deny.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRule {
    pub name: String,
    pub effect: Effect,
    pub when: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// Settings of the node itself (the `[node]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// Extra `Host` header values accepted on `/mcp` besides loopback names.
    pub allowed_hosts: Vec<String>,
    /// Browser origins accepted on `/mcp`; empty means requests carrying an `Origin` are
    /// accepted only from loopback origins.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub health_interval: Duration,
    /// Items per page of the aggregated `*/list` results.
    pub page_size: usize,
    /// Private networks (`10.0.0.0/8`, …) endpoints registered over the API may be in; other
    /// private addresses are refused, link-local and metadata addresses always are.
    pub registry_private_networks: Vec<concord_mesh::net::Network>,
    /// Registrations one principal may hold at once over the API.
    pub registry_max_per_principal: usize,
    /// MCP sessions one endpoint holds at once; past it `initialize` is refused (HTTP 503).
    pub max_sessions: usize,
    /// A session without a request from its client and without an open stream for this long
    /// is closed.
    pub session_idle_timeout: Duration,
    /// TCP connections served at once; past it a new connection is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers; also how long an idle kept-alive
    /// connection is kept.
    pub header_read_timeout: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            listen: None,
            data_dir: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            page_size: DEFAULT_PAGE_SIZE,
            registry_private_networks: Vec::new(),
            registry_max_per_principal: DEFAULT_REGISTRY_MAX_PER_PRINCIPAL,
            max_sessions: DEFAULT_MAX_SESSIONS,
            session_idle_timeout: DEFAULT_SESSION_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// Shared-state settings (the `[state]` table).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateSettings {
    /// `postgres://…` or a SQLite file; default `DATA_DIR/state.db`. May hold a password.
    pub store: Option<String>,
    pub max_value_bytes: Option<usize>,
    pub proposal_ttl: Option<Duration>,
    /// Versions of each key kept in the history (None: all).
    pub keep_versions: Option<u64>,
    /// namespace → `reject` or `merge`.
    pub policies: BTreeMap<String, String>,
    /// namespace → JSON Schema every value there must satisfy.
    pub schemas: BTreeMap<String, serde_json::Value>,
    /// namespace → the MCP tool that reviews each write there.
    pub validators: BTreeMap<String, String>,
}

/// One upstream MCP server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    pub name: String,
    pub transport: TransportSpec,
    pub prefix: PrefixMode,
    pub request_timeout: Duration,
    /// Declare the `roots` capability to this upstream and answer its `roots/list` requests with
    /// the roots of the client whose call it is serving. Off by default: one upstream connection
    /// serves every client, and a request made outside any call has no client to answer it.
    pub forward_roots: bool,
    /// Trust the usage this server reports in a tool result's `_meta["concord/usage"]` (tokens,
    /// cost) and charge it to the caller's budgets. Off by default: what an upstream reports is
    /// a claim, and an untrusted one is dropped like every other `concord/` key it sends.
    pub report_usage: bool,
    /// Cache the results of this server's read-only tools (`readOnlyHint`) for this long, per
    /// caller; `None`: no caching.
    pub cache_ttl: Option<Duration>,
    /// Per-tool settings, by the tool's own (unprefixed) name.
    pub tools: BTreeMap<String, ToolSettings>,
    /// What the server offers and how it is labelled, as the mesh lists it: agents pick tools
    /// by selectors over them (every server also offers `mcp`).
    pub capabilities: Vec<String>,
    pub tags: Vec<String>,
}

impl ServerSpec {
    /// A server with the defaults a `[servers.NAME]` table that names only its transport gets
    /// (prefix `always`, no roots, no cache, no per-tool settings, no tags).
    pub fn new(
        name: impl Into<String>,
        transport: TransportSpec,
        request_timeout: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            transport,
            prefix: PrefixMode::default(),
            request_timeout,
            forward_roots: false,
            report_usage: false,
            cache_ttl: None,
            tools: BTreeMap::new(),
            capabilities: Vec::new(),
            tags: Vec::new(),
        }
    }
}

/// How to reach an upstream server.
#[derive(Debug, Clone, PartialEq)]
pub enum TransportSpec {
    /// A child process speaking MCP over stdin/stdout.
    Stdio {
        command: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    },
    /// Streamable HTTP (MCP 2025-03-26 and later).
    StreamableHttp {
        url: String,
        headers: BTreeMap<String, String>,
    },
    /// The legacy HTTP+SSE transport (MCP 2024-11-05).
    Sse {
        url: String,
        headers: BTreeMap<String, String>,
    },
}

impl TransportSpec {
    /// A short name for logs and status output.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportSpec::Stdio { .. } => "stdio",
            TransportSpec::StreamableHttp { .. } => "streamable-http",
            TransportSpec::Sse { .. } => "sse",
        }
    }
}

/// When a server's tool and prompt names get the `SERVER__` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixMode {
    /// Always `SERVER__NAME` (the default).
    #[default]
    Always,
    /// Bare names, prefixed only when another server exposes the same name.
    Conditional,
    /// Bare names; two servers exposing the same name is an error.
    Never,
}

impl Config {
    /// Reads and validates a configuration file. The format follows the extension (`.json`
    /// means the `mcpServers` format); anything else is read as TOML.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: path.to_path_buf(),
            source: e,
        })?;
        Self::from_str_at(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses configuration text as if it had been read from `path`, expanding `${VAR}` with
    /// `lookup`. Tests pass their own lookup so they never touch the process environment.
    pub fn from_str_at(
        text: &str,
        path: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let is_json = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = if is_json {
            raw::parse_json(text, path)?.into_config(path, &base_dir, lookup)?
        } else {
            raw::parse_toml(text, path)?.into_config(path, &base_dir, lookup)?
        };
        config.source = Some(path.to_path_buf());
        Ok(config)
    }
}

/// Reads a policy file (`[[rules]]` tables) — at start and again on every reload.
pub fn load_policy_file(path: &Path) -> Result<Vec<PolicyRule>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
        file: path.to_path_buf(),
        source: e,
    })?;
    let deserializer = toml::Deserializer::parse(&text).map_err(|e| ConfigError::Syntax {
        file: path.to_path_buf(),
        location: String::new(),
        message: e.message().to_string(),
    })?;
    let parsed: raw::PolicyFile =
        serde_path_to_error::deserialize(deserializer).map_err(|e| ConfigError::Invalid {
            file: path.to_path_buf(),
            key: e.path().to_string(),
            message: e.into_inner().message().to_string(),
        })?;
    parsed.into_rules(path)
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
