//! Agents from `[agents.NAME]`, served as the tools `agents__NAME`, and the LLM providers from
//! `[providers.NAME]` they use. Each run resolves the agent's provider selector through the mesh
//! registry (providers are registered there as `llm` entities), so the order is the resolution's
//! and unhealthy or expired providers are skipped; tool calls go through the gateway. Every
//! provider attempt is kept in the usage ledger, with the agent, the caller and the outcome.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use concord_agents::{
    AgentSpec, LoopContext, LoopEvent, ProviderChain, ToolBox, ToolOutcome, ToolReply,
};
use concord_config::{AgentSettings, ProviderApi, ProviderSpec};
use concord_llm::{Api, Message, Provider, ProviderConfig, ToolSpec};
use concord_mcp::builtin::{
    BuiltinFuture, BuiltinOutcome, BuiltinTool, BuiltinTools, Caller, DelegatedBudget,
};
use concord_mesh::{Entity, Registration, resolve};
use concord_store::Store;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

/// The namespace agents are exposed under (`agents__NAME`).
pub const AGENTS_NAMESPACE: &str = "agents";
/// How long a conversation is kept after its last turn, and how often the expired ones are
/// deleted from the store.
const CONVERSATION_TTL: Duration = Duration::from_secs(3600);
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// The providers as registry entities (capability `llm`), so agents resolve them by tags.
pub fn provider_registrations(providers: &[ProviderSpec]) -> Vec<Registration> {
    providers
        .iter()
        .filter_map(|p| {
            serde_json::from_value(json!({
                "name": p.name,
                "version": p.version,
                "kind": "llm",
                "capabilities": ["llm"],
                "tags": p.tags,
                "endpoint": {"url": p.base_url},
                "metadata": {"model": p.model, "api": format!("{:?}", p.api).to_lowercase(),
                    "price_input_per_mtok": p.price_input, "price_output_per_mtok": p.price_output},
            }))
            .ok()
        })
        .collect()
}

/// The agents as registry entities (kind `agent`), with their provider selector as a
/// dependency, so `concord agents list` and `concord deps show` cover them.
pub fn agent_registrations(agents: &[AgentSettings]) -> Vec<Registration> {
    agents
        .iter()
        .filter_map(|a| {
            serde_json::from_value(json!({
                "name": a.name,
                "version": "1.0.0",
                "kind": "agent",
                "capabilities": ["agent"],
                "endpoint": {},
                "metadata": {"description": a.description, "tool": format!("{AGENTS_NAMESPACE}__{}", a.name)},
                "dependencies": dependencies_of(a),
            }))
            .ok()
        })
        .collect()
}

/// What an agent needs from the mesh: its provider (`llm`) and the servers its tool selectors
/// pick (`tools`, `tools_2`, ...).
fn dependencies_of(agent: &AgentSettings) -> Map<String, Value> {
    let mut needs = Map::new();
    needs.insert("llm".into(), json!(agent.provider));
    for (index, selector) in agent.tool_servers.iter().enumerate() {
        let key = match index {
            0 => "tools".to_string(),
            n => format!("tools_{}", n + 1),
        };
        needs.insert(key, json!(selector));
    }
    needs
}

fn build_provider(spec: &ProviderSpec) -> Result<Provider, String> {
    let api_key = match &spec.api_key_env {
        Some(var) => match std::env::var(var) {
            Ok(value) if !value.is_empty() => Some(value),
            _ => {
                tracing::warn!(provider = %spec.name, variable = %var, "the API key variable is not set; calls go without a key");
                None
            }
        },
        None => None,
    };
    Provider::new(ProviderConfig {
        name: spec.name.clone(),
        api: match spec.api {
            ProviderApi::Openai => Api::OpenAi,
            ProviderApi::Anthropic => Api::Anthropic,
            ProviderApi::Gemini => Api::Gemini,
        },
        base_url: spec.base_url.clone(),
        model: spec.model.clone(),
        api_key,
        timeout: spec.timeout,
        stream: spec.stream,
        price_input: spec.price_input,
        price_output: spec.price_output,
        default_max_tokens: spec.max_tokens,
        temperature: spec.temperature,
    })
    .map_err(|e| e.to_string())
}

pub struct Agents {
    pub(crate) agents: Vec<AgentSettings>,
    /// How many agents deep a delegation chain may go.
    max_depth: usize,
    providers: HashMap<String, Arc<Provider>>,
    store: Store,
    gateway: Arc<OnceLock<concord_mcp::Gateway>>,
    /// The policy engine (auth on): an agent may use only the tools the policy lets it use,
    /// as itself (`agent:NAME`, kind `agent`) on behalf of its caller.
    access: Option<Arc<dyn concord_mcp::AccessControl>>,
    /// When expired conversations were last deleted.
    last_forget: Mutex<Instant>,
}

impl Agents {
    pub fn new(
        agents: Vec<AgentSettings>,
        max_depth: u32,
        providers: &[ProviderSpec],
        store: Store,
        gateway: Arc<OnceLock<concord_mcp::Gateway>>,
        access: Option<Arc<dyn concord_mcp::AccessControl>>,
    ) -> Result<Self, String> {
        let mut built = HashMap::new();
        for spec in providers {
            built.insert(spec.name.clone(), Arc::new(build_provider(spec)?));
        }
        Ok(Self {
            agents,
            max_depth: max_depth as usize,
            providers: built,
            store,
            gateway,
            access,
            last_forget: Mutex::new(Instant::now()),
        })
    }

    /// The configured agents' names.
    pub fn names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }

    /// The ledger (in the store), oldest first, filtered.
    pub async fn usage(
        &self,
        filter: &concord_store::UsageFilter,
    ) -> Result<Vec<concord_store::UsageRow>, concord_store::StoreError> {
        self.store.usage(filter).await
    }

    /// Whether the policy lets the agent use `tool` (always, with auth off).
    fn permits(
        &self,
        identity: Option<&concord_mcp::Identity>,
        tool: &str,
        arguments: Option<&Map<String, Value>>,
        listing: bool,
    ) -> bool {
        permits(self.access.as_deref(), identity, tool, arguments, listing)
    }

    /// The servers whose every tool the agent's `tool_servers` selectors give it: registered
    /// and configured servers (the node lists those in the registry too), resolved like any
    /// dependency.
    fn selected_servers(
        &self,
        agent: &AgentSettings,
        entities: &[Entity],
    ) -> Result<HashSet<String>, String> {
        if agent.tool_servers.is_empty() {
            return Ok(HashSet::new());
        }
        let now = now_ms();
        let catalog = concord_mesh::Catalog::new(entities.to_vec());
        let mut names = HashSet::new();
        for selector in &agent.tool_servers {
            // Only the default namespace is routed into the gateway's catalog: a server of the
            // same name in another namespace must not stand for the routed one's tools.
            if selector
                .namespace
                .as_deref()
                .is_some_and(|n| n != "default")
            {
                continue;
            }
            let resolution = catalog.resolve(selector, now).map_err(|e| e.to_string())?;
            names.extend(resolution.candidates.into_iter().map(|c| c.name));
        }
        Ok(names)
    }

    /// Whether the provider `name` is being asked first (not resting after failures), for the
    /// health the node reports of it in the registry.
    pub fn provider_available(&self, name: &str) -> Option<bool> {
        self.providers.get(name).map(|p| p.is_available())
    }

    fn resolve_providers(
        &self,
        agent: &AgentSettings,
        entities: &[Entity],
    ) -> Result<Vec<Arc<Provider>>, String> {
        let resolution = resolve(&agent.provider, entities, now_ms()).map_err(|e| e.to_string())?;
        let mut chosen: Vec<Arc<Provider>> = resolution
            .candidates
            .iter()
            .filter_map(|c| self.providers.get(&c.name).cloned())
            .collect();
        if agent.cost_aware {
            // Cheapest first; equal prices keep the resolution's order (the sort is stable).
            chosen.sort_by(|a, b| {
                let price = |p: &Provider| p.config.price_input + p.config.price_output;
                price(a).total_cmp(&price(b))
            });
        }
        if chosen.is_empty() {
            let mut why: Vec<String> = resolution
                .rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reasons.join(", ")))
                .collect();
            why.extend(resolution.not_considered);
            return Err(format!(
                "no configured provider satisfies the selector ({})",
                if why.is_empty() {
                    "no llm entities".to_string()
                } else {
                    why.join("; ")
                }
            ));
        }
        Ok(chosen)
    }

    fn toolbox(
        &self,
        agent: &AgentSettings,
        servers: &HashSet<String>,
        caller: &Caller,
        limits: concord_agents::Limits,
        spent: Arc<Mutex<(u64, f64)>>,
        run_id: &str,
    ) -> Result<GatewayTools, String> {
        let gateway = self
            .gateway
            .get()
            .cloned()
            .ok_or("the gateway is not running yet")?;
        let own_tool = format!("{AGENTS_NAMESPACE}__{}", agent.name);
        // With auth on the agent acts as itself, on behalf of its caller's chain.
        let acting_as = self.access.as_ref().map(|_| agent_identity(agent, caller));
        let tools: Vec<ToolSpec> = gateway
            .tool_catalog()
            .into_iter()
            .filter(|t| {
                t.name != own_tool
                    && (allowed(&agent.tools, &t.name) || servers.contains(&t.server))
            })
            .filter(|t| self.permits(acting_as.as_ref(), &t.name, None, true))
            .map(|t| ToolSpec {
                name: t.name,
                description: t.description,
                parameters: t.input_schema,
            })
            .collect();
        let mut chain = caller.delegation.clone();
        chain.push(agent.name.clone());
        Ok(GatewayTools {
            gateway,
            tools,
            principal: caller.principal.clone(),
            acting_as,
            trace_id: caller.trace_id.clone(),
            budget_envelope: caller.budget_envelope.clone(),
            chain,
            limits,
            spent,
            run_id: run_id.to_string(),
        })
    }

    pub(crate) async fn run_agent(
        &self,
        agent: &AgentSettings,
        arguments: Map<String, Value>,
        caller: Caller,
    ) -> BuiltinOutcome {
        // Models calling agents sometimes name the one argument differently ("query",
        // "description"): a lone string argument is taken as the task.
        let lone_string = || {
            let mut strings = arguments.values().filter_map(Value::as_str);
            match (strings.next(), strings.next()) {
                (Some(only), None) if arguments.len() == 1 => Some(only),
                _ => None,
            }
        };
        let Some(task) = arguments
            .get("task")
            .and_then(Value::as_str)
            .or_else(lone_string)
        else {
            let given = serde_json::Value::Object(arguments.clone()).to_string();
            tracing::info!(agent = %agent.name, arguments = %given, "agent called without a task");
            return failure("missing argument: task (what the agent should do)");
        };
        if caller.delegation.contains(&agent.name) {
            let mut chain = caller.delegation.clone();
            chain.push(agent.name.clone());
            return failure(format!("delegation cycle refused: {}", chain.join(" → ")));
        }
        if caller.delegation.len() >= self.max_depth {
            return failure(format!(
                "delegation too deep: {} → {} would be {} levels (max_depth {})",
                caller.delegation.join(" → "),
                agent.name,
                caller.delegation.len() + 1,
                self.max_depth
            ));
        }
        let mut conversation_id = arguments
            .get("conversation_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let history = match &conversation_id {
            Some(id) => match self.conversation(id, &caller.principal, &agent.name).await {
                Ok(Some(history)) => history,
                // A delegating model sometimes invents an id: it starts a new conversation.
                Ok(None) if !caller.delegation.is_empty() => {
                    tracing::info!(agent = %agent.name, conversation_id = %id, "unknown conversation id from a delegating agent; starting a new one");
                    conversation_id = None;
                    Vec::new()
                }
                Ok(None) => {
                    return failure(format!(
                        "unknown or expired conversation_id {id:?} (start without one)"
                    ));
                }
                Err(e) => return failure(format!("reading the conversation: {e}")),
            },
            None => Vec::new(),
        };
        let earlier_messages = history.len();
        let entities = match crate::registry::entities(&self.store).await {
            Ok(entities) => entities,
            Err(e) => return failure(format!("reading the registry: {e}")),
        };
        let providers = match self.resolve_providers(agent, &entities) {
            Ok(providers) => providers,
            Err(e) => return failure(e),
        };
        let servers = match self.selected_servers(agent, &entities) {
            Ok(servers) => servers,
            Err(e) => return failure(e),
        };
        // The agent's own budget, within what a delegating agent left for this call; the
        // caller's budgets (auth on) are charged turn by turn through the call's envelope, and
        // its deadline applies.
        let delegated = caller.budget.unwrap_or_default();
        let limits = concord_agents::Limits {
            tokens: tighter(agent.budget.tokens, delegated.tokens),
            cost_usd: tighter(agent.budget.cost_usd, delegated.cost_usd),
            tool_calls: agent.budget.tool_calls,
            deadline: tighter(
                tighter(
                    agent.budget.deadline.map(|d| Instant::now() + d),
                    delegated.deadline,
                ),
                envelope_deadline(caller.budget_envelope.as_ref()),
            ),
        };
        let callers_budget = match (&self.access, &caller.budget_envelope) {
            (Some(access), Some(envelope)) => Some(EnvelopeBudget {
                access: access.clone(),
                envelope: envelope.clone(),
            }),
            _ => None,
        };
        let spent = Arc::new(Mutex::new((0u64, 0f64)));
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let tools = match self.toolbox(agent, &servers, &caller, limits, spent.clone(), &run_id) {
            Ok(tools) => tools,
            Err(e) => return failure(e),
        };
        let spec = AgentSpec {
            name: agent.name.clone(),
            instructions: agent.instructions.clone(),
            max_iterations: agent.max_iterations,
            max_tool_calls_per_turn: agent.max_tool_calls_per_turn,
            max_parallel_tool_calls: agent.max_parallel_tool_calls,
            output_schema: agent.output_schema.clone(),
        };
        let model = ProviderChain(providers);
        let cancel = caller.cancel.clone();
        // Each iteration and tool call is a progress step for a caller who asked for progress.
        let steps = std::sync::atomic::AtomicU64::new(0);
        let sink = caller.progress.clone();
        let progress = |event: LoopEvent| {
            tracing::debug!(agent = %agent.name, ?event, "agent progress");
            let message = match event {
                LoopEvent::Spent { tokens, cost_usd } => {
                    *spent.lock() = (tokens, cost_usd);
                    return;
                }
                LoopEvent::Iteration { number, limit } => format!("iteration {number} of {limit}"),
                LoopEvent::ToolCall { name } => format!("calling {name}"),
            };
            if let Some(sink) = &sink {
                let step = steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                sink.report(step as f64, None, message);
            }
        };
        let span = tracing::info_span!("agent", agent = %agent.name, principal = %caller.principal);
        let report = tracing::Instrument::instrument(
            concord_agents::run(
                &spec,
                task,
                history,
                limits,
                LoopContext {
                    model: &model,
                    tools: &tools,
                    cancel: &cancel,
                    progress: &progress,
                    shared: callers_budget
                        .as_ref()
                        .map(|b| b as &dyn concord_agents::SharedBudget),
                },
            ),
            span,
        )
        .await;
        let at_ms = now_ms();
        let rows: Vec<concord_store::UsageRow> = report
            .attempts
            .iter()
            .map(|attempt| concord_store::UsageRow {
                at_ms,
                run_id: run_id.clone(),
                parent_run: caller.parent_run.clone(),
                agent: agent.name.clone(),
                principal: caller.principal.clone(),
                provider: attempt.provider.clone(),
                model: attempt.model.clone(),
                input_tokens: attempt.usage.input_tokens,
                output_tokens: attempt.usage.output_tokens,
                cost_usd: attempt.cost_usd,
                latency_ms: attempt.latency.as_millis() as u64,
                error: attempt.error.clone(),
            })
            .collect();
        if let Err(e) = self.store.record_usage(&rows).await {
            tracing::error!(agent = %agent.name, error = %e, "the usage ledger could not be written");
        }
        let id = conversation_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        // The transcript starts with the history it was given: only this turn's messages are new.
        let new_messages = report
            .transcript
            .get(earlier_messages..)
            .unwrap_or_default();
        if let Err(e) = self
            .remember(&id, &caller.principal, &agent.name, new_messages)
            .await
        {
            tracing::error!(agent = %agent.name, error = %e, "the conversation could not be kept");
        }
        let answered = report.ending == concord_agents::Ending::Answer;
        BuiltinOutcome {
            structured: json!({
                "answer": report.answer,
                "structured": report.structured,
                "ending": report.ending,
                "conversation_id": id,
                "run_id": run_id,
                "iterations": report.iterations,
                "tool_calls": report.tool_calls,
                "usage": {"input_tokens": report.usage.input_tokens, "output_tokens": report.usage.output_tokens,
                          "cost_usd": report.cost_usd},
                "providers": report.attempts.iter().map(|a| json!({
                    "provider": a.provider, "model": a.model, "error": a.error})).collect::<Vec<_>>(),
            }),
            is_error: !answered,
        }
    }

    /// The messages of `owner`'s conversation `id` with `agent`, if it exists and has not
    /// expired.
    async fn conversation(
        &self,
        id: &str,
        owner: &str,
        agent: &str,
    ) -> Result<Option<Vec<Message>>, String> {
        let turns = self
            .store
            .conversation(id)
            .await
            .map_err(|e| e.to_string())?;
        let expired_before = now_ms().saturating_sub(CONVERSATION_TTL.as_millis() as u64);
        let Some(last) = turns.last() else {
            return Ok(None);
        };
        if turns[0].owner != owner || turns[0].agent != agent || last.at_ms < expired_before {
            return Ok(None);
        }
        let mut messages = Vec::new();
        for turn in &turns {
            let added: Vec<Message> =
                serde_json::from_str(&turn.messages).map_err(|e| e.to_string())?;
            messages.extend(added);
        }
        Ok(Some(messages))
    }

    /// Appends this turn's messages to the conversation (and, once a minute, deletes the
    /// conversations whose last turn has expired).
    async fn remember(
        &self,
        id: &str,
        owner: &str,
        agent: &str,
        messages: &[Message],
    ) -> Result<(), concord_store::StoreError> {
        let now = now_ms();
        self.store
            .append_turn(&concord_store::Turn {
                conversation_id: id.to_string(),
                owner: owner.to_string(),
                agent: agent.to_string(),
                at_ms: now,
                messages: serde_json::to_string(messages).unwrap_or_else(|_| "[]".into()),
            })
            .await?;
        let forget = {
            let mut last = self.last_forget.lock();
            let due = last.elapsed() >= FORGET_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if forget {
            let cutoff = now.saturating_sub(CONVERSATION_TTL.as_millis() as u64);
            self.store.forget_conversations(cutoff).await?;
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
pub struct UsageQuery {
    agent: Option<String>,
    model: Option<String>,
    /// A duration back from now, like `24h` or `30m`.
    since: Option<String>,
}

/// `GET /api/v1/usage?agent=&model=&since=24h`: the ledger's records and their totals.
pub async fn usage_api(
    axum::extract::State(agents): axum::extract::State<Arc<Agents>>,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let bad = |message: String| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": message})),
        )
            .into_response()
    };
    let query = match query {
        Ok(axum::extract::Query(query)) => query,
        Err(rejection) => return bad(rejection.body_text()),
    };
    let since_ms = match &query.since {
        Some(text) => match since_duration(text) {
            Ok(back) => {
                Some(now_ms().saturating_sub(u64::try_from(back.as_millis()).unwrap_or(u64::MAX)))
            }
            Err(e) => return bad(format!("since: {e}")),
        },
        None => None,
    };
    let filter = concord_store::UsageFilter {
        agent: query.agent,
        model: query.model,
        since_ms,
    };
    let records = match agents.usage(&filter).await {
        Ok(records) => records,
        Err(e) => {
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"error": format!("usage ledger: {e}")})),
            )
                .into_response();
        }
    };
    // Exact, saturating sums (a float sum loses tokens past 2^53 and cannot say it did).
    let tokens = |f: fn(&concord_store::UsageRow) -> u64| {
        records
            .iter()
            .map(f)
            .fold(0u64, |sum, n| sum.saturating_add(n))
    };
    let cost_usd = records
        .iter()
        .map(|r| r.cost_usd)
        .filter(|c| c.is_finite())
        .fold(0.0f64, |sum, c| {
            let next = sum + c;
            if next.is_finite() { next } else { f64::MAX }
        });
    axum::Json(json!({
        "totals": {
            "calls": records.len(),
            "failed": records.iter().filter(|r| r.error.is_some()).count(),
            "input_tokens": tokens(|r| r.input_tokens),
            "output_tokens": tokens(|r| r.output_tokens),
            "cost_usd": cost_usd,
        },
        "records": records,
    }))
    .into_response()
}

/// The longest `since` the usage API takes (about 100 years): anything longer is a mistake,
/// and a duration past what `Duration` holds must be a 400, not a dropped connection.
const MAX_SINCE_SECS: f64 = 100.0 * 365.0 * 24.0 * 3600.0;

/// `since` as a duration back from now: what `parse_duration` accepts, at most
/// [`MAX_SINCE_SECS`].
fn since_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let factor = match unit.trim() {
        "" | "s" => Some(1.0),
        "ms" => Some(0.001),
        "m" => Some(60.0),
        "h" => Some(3600.0),
        _ => None,
    };
    if let (Ok(value), Some(factor)) = (number.parse::<f64>(), factor)
        && value * factor > MAX_SINCE_SECS
    {
        return Err(format!(
            "{text:?} is too long ago: at most {} days back",
            (MAX_SINCE_SECS / 86_400.0) as u64
        ));
    }
    concord_config::parse_duration(text)
}

pub(crate) fn failure(message: impl Into<String>) -> BuiltinOutcome {
    BuiltinOutcome {
        structured: json!({"error": message.into()}),
        is_error: true,
    }
}

/// The call chain's deadline, from the envelope the gateway issued for the call.
fn envelope_deadline(envelope: Option<&Value>) -> Option<Instant> {
    envelope?["deadline_in_ms"]
        .as_u64()
        .map(|ms| Instant::now() + Duration::from_millis(ms))
}

/// The caller's budgets (auth on), through the envelope the gateway issued for the run's call:
/// each model turn is charged at once, so concurrent runs of one principal see each other's
/// spending.
struct EnvelopeBudget {
    access: Arc<dyn concord_mcp::AccessControl>,
    envelope: Value,
}

impl concord_agents::SharedBudget for EnvelopeBudget {
    fn charge(&self, tokens: u64, cost_usd: f64) -> concord_agents::Left {
        let left = self
            .access
            .spend(&self.envelope, tokens, cost_usd)
            .unwrap_or_default();
        concord_agents::Left {
            tokens: left.get("tokens").and_then(Value::as_u64),
            cost_usd: left.get("cost_usd").and_then(Value::as_f64),
        }
    }
}

/// Who an agent is to the policy: `agent:NAME` of kind `agent`, at the end of the chain that
/// reached it (its caller's chain, which ends with the caller: a user, or a delegating agent).
fn agent_identity(agent: &AgentSettings, caller: &Caller) -> concord_mcp::Identity {
    let principal = format!("agent:{}", agent.name);
    let mut chain = caller
        .identity
        .as_ref()
        .map(|i| i.chain.clone())
        .filter(|chain| !chain.is_empty())
        .unwrap_or_else(|| vec![caller.principal.clone()]);
    chain.push(principal.clone());
    concord_mcp::Identity {
        principal,
        kind: "agent".into(),
        roles: vec!["agent".into()],
        chain,
        method: "delegation".into(),
    }
}

fn permits(
    access: Option<&dyn concord_mcp::AccessControl>,
    identity: Option<&concord_mcp::Identity>,
    tool: &str,
    arguments: Option<&Map<String, Value>>,
    listing: bool,
) -> bool {
    let Some(access) = access else {
        return true;
    };
    let server = tool.split_once("__").map_or("", |(server, _)| server);
    access.allows(
        identity,
        &concord_mcp::AccessRequest {
            method: "tools/call",
            server,
            name: tool,
            arguments,
            listing,
        },
    )
}

/// The smaller of two optional limits (a missing one does not limit).
fn tighter<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b < a { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Whether `tool` (an exposed name) is in the agent's list: exact names, or `SERVER__*`.
fn allowed(patterns: &[String], tool: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => tool.starts_with(prefix),
        None => p == tool,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A tool that takes a `task` (and `extra` properties), runs for a while and may act: how
/// agents and workflows appear in the gateway. `what` is "agent" or "workflow".
pub(crate) fn task_tool(name: &str, description: &str, what: &str, extra: Value) -> BuiltinTool {
    let mut properties = Map::new();
    properties.insert(
        "task".into(),
        json!({"type": "string", "description": format!("What the {what} should do")}),
    );
    if let Value::Object(extra) = extra {
        properties.extend(extra);
    }
    BuiltinTool {
        name: name.to_string(),
        description: if description.is_empty() {
            format!("The {name} {what}")
        } else {
            description.to_string()
        },
        input_schema: json!({"type": "object", "properties": properties, "required": ["task"]}),
        output_schema: None,
        read_only: false,
        idempotent: false,
    }
}

/// The agents as the gateway's `agents__*` tools (or, with `only`, one agent's own endpoint).
pub struct AgentTools {
    pub agents: Arc<Agents>,
    pub only: Option<String>,
}

impl AgentTools {
    pub fn all(agents: Arc<Agents>) -> Self {
        Self { agents, only: None }
    }
}

impl BuiltinTools for AgentTools {
    fn tools(&self) -> Vec<BuiltinTool> {
        self.agents
            .agents
            .iter()
            .filter(|agent| self.only.as_ref().is_none_or(|only| *only == agent.name))
            .map(|agent| {
                task_tool(
                    &agent.name,
                    &agent.description,
                    "agent",
                    json!({"conversation_id": {"type": "string", "description": "Continue an earlier conversation (the id a previous answer gave)"}}),
                )
            })
            .collect()
    }

    fn call(&self, name: &str, arguments: Map<String, Value>, caller: Caller) -> BuiltinFuture {
        let listed = self.only.as_ref().is_none_or(|only| only == name);
        let Some(agent) = self
            .agents
            .agents
            .iter()
            .find(|a| a.name == name && listed)
            .cloned()
        else {
            let name = name.to_string();
            return Box::pin(async move { failure(format!("unknown agent {name}")) });
        };
        let agents = self.agents.clone();
        Box::pin(async move { agents.run_agent(&agent, arguments, caller).await })
    }
}

/// The tools an agent may call, through the gateway's pipeline, on behalf of its caller.
/// Another agent gets the delegation chain and what is left of this run's budget.
struct GatewayTools {
    gateway: concord_mcp::Gateway,
    tools: Vec<ToolSpec>,
    /// Whom the run is for (conversations and the ledger are theirs).
    principal: String,
    /// Who the policy and budgets see making the calls (auth on): the agent itself.
    acting_as: Option<concord_mcp::Identity>,
    trace_id: Option<String>,
    /// The envelope the gateway issued for this run (auth on, with budgets): every call the
    /// run makes draws on it.
    budget_envelope: Option<Value>,
    /// The delegation chain including this agent.
    chain: Vec<String>,
    limits: concord_agents::Limits,
    /// Tokens and cost this run has spent so far.
    spent: Arc<Mutex<(u64, f64)>>,
    run_id: String,
}

impl GatewayTools {
    fn remaining(&self) -> DelegatedBudget {
        let (tokens, cost) = *self.spent.lock();
        DelegatedBudget {
            tokens: self.limits.tokens.map(|t| t.saturating_sub(tokens)),
            cost_usd: self.limits.cost_usd.map(|c| (c - cost).max(0.0)),
            deadline: self.limits.deadline,
        }
    }
}

impl ToolBox for GatewayTools {
    fn tools(&self) -> Vec<ToolSpec> {
        self.tools.clone()
    }

    fn call<'a>(
        &'a self,
        name: &'a str,
        arguments: Map<String, Value>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, ToolReply> {
        Box::pin(async move {
            let delegating = name.starts_with(&format!("{AGENTS_NAMESPACE}__"));
            let caller = Caller {
                principal: self.principal.clone(),
                identity: self.acting_as.clone(),
                trace_id: self.trace_id.clone(),
                delegation: self.chain.clone(),
                budget: delegating.then(|| self.remaining()),
                parent_run: Some(self.run_id.clone()),
                cancel: cancel.child_token(),
                budget_envelope: self.budget_envelope.clone(),
                ..Caller::default()
            };
            let call = self.gateway.call_tool_as(name, arguments, caller);
            let result = tokio::select! {
                result = call => result,
                _ = cancel.cancelled() => return ToolOutcome::Error("cancelled".into()).into(),
            };
            let value = match result {
                Ok(value) => value,
                Err(e) => return ToolOutcome::Error(e.to_string()).into(),
            };
            let failed = value["isError"] == true;
            if delegating {
                return delegated_reply(&value["structuredContent"], failed);
            }
            let text = value["content"]
                .as_array()
                .map(|blocks| {
                    blocks
                        .iter()
                        .filter_map(|b| b["text"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .filter(|text| !text.is_empty())
                .unwrap_or_else(|| {
                    value
                        .get("structuredContent")
                        .map(Value::to_string)
                        .unwrap_or_default()
                });
            if failed {
                ToolOutcome::Error(text).into()
            } else {
                ToolOutcome::Ok(text).into()
            }
        })
    }
}

/// What a delegated agent answered, as the delegating model reads it, and what it spent.
fn delegated_reply(answer: &Value, failed: bool) -> ToolReply {
    let usage = concord_llm::Usage {
        input_tokens: answer["usage"]["input_tokens"].as_u64().unwrap_or(0),
        output_tokens: answer["usage"]["output_tokens"].as_u64().unwrap_or(0),
    };
    let cost_usd = answer["usage"]["cost_usd"].as_f64().unwrap_or(0.0);
    let outcome = if failed {
        let why = answer["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the agent ended with {}", answer["ending"]));
        ToolOutcome::Error(why)
    } else {
        ToolOutcome::Ok(answer["answer"].as_str().unwrap_or_default().to_string())
    };
    ToolReply {
        outcome,
        usage,
        cost_usd,
    }
}

#[cfg(test)]
#[path = "agents_proptests.rs"]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_patterns() {
        let patterns = vec!["fs__read_file".to_string(), "exec__*".to_string()];
        assert!(allowed(&patterns, "fs__read_file"));
        assert!(!allowed(&patterns, "fs__write_file"));
        assert!(allowed(&patterns, "exec__run"));
        assert!(!allowed(&[], "fs__read_file"));
    }
}
