//! The user-facing shapes of the two file formats, kept apart from the validated [`Config`] so
//! that the formats can evolve without the rest of Concord noticing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::{
    AgentBudget, AgentSettings, AuditSettings, AuthSettings, BudgetLimits, BudgetSettings, Config,
    ConfigError, Effect, LimitSettings, NAMESPACE_SEPARATOR, NodeSettings, PolicyRule,
    PolicySettings, PrefixMode, ProviderApi, ProviderSpec, RESERVED_SERVER_NAMES, Rate,
    RoutingSettings, ServerSpec, StateSettings, StaticKey, ToolSettings, TransportSpec,
    WorkflowKind, WorkflowSettings, expand_vars, parse_duration,
};

type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TomlFile {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    budgets: RawBudgets,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
    #[serde(default)]
    workflows: BTreeMap<String, toml::Table>,
    /// `[registry.NAME]`: a registration without its name (the key is the name).
    #[serde(default)]
    registry: BTreeMap<String, toml::Table>,
    #[serde(default)]
    servers: BTreeMap<String, TomlServer>,
}

fn registrations(
    raw: BTreeMap<String, toml::Table>,
    file: &Path,
) -> Result<Vec<concord_mesh::Registration>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (name, mut table) in raw {
        let key = format!("registry.{name}");
        table.insert("name".into(), toml::Value::String(name.clone()));
        let value = serde_json::to_value(&table)
            .map_err(|e| ConfigError::invalid(file, key.clone(), e.to_string()))?;
        let registration: concord_mesh::Registration = serde_path_to_error::deserialize(value)
            .map_err(|e| {
                let at = e.path().to_string();
                ConfigError::invalid(
                    file,
                    if at == "." {
                        key.clone()
                    } else {
                        format!("{key}.{at}")
                    },
                    e.into_inner().to_string(),
                )
            })?;
        registration.validate().map_err(|e| match e {
            concord_mesh::MeshError::Invalid { field, message } => {
                ConfigError::invalid(file, format!("{key}.{field}"), message)
            }
            concord_mesh::MeshError::TooLarge { field, size, limit } => ConfigError::invalid(
                file,
                format!("{key}.{field}"),
                format!("{size} bytes serialized, at most {limit}"),
            ),
        })?;
        out.push(registration);
    }
    Ok(out)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudgets {
    warn_at: Option<f64>,
    max_depth: Option<u32>,
    default: Option<RawBudget>,
    #[serde(default)]
    roles: BTreeMap<String, RawBudget>,
    #[serde(default)]
    principals: BTreeMap<String, RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    tool_calls: Option<u64>,
    tokens: Option<u64>,
    cost_usd: Option<f64>,
    window: Option<String>,
    deadline: Option<String>,
}

impl RawBudget {
    fn into_limits(self, file: &Path, key: &str) -> Result<BudgetLimits, ConfigError> {
        let duration = |field: &str, text: Option<String>| {
            text.map(|t| {
                parse_duration(&t)
                    .map_err(|m| ConfigError::invalid(file, format!("{key}.{field}"), m))
            })
            .transpose()
        };
        if self.cost_usd.is_some_and(|c| !(c >= 0.0 && c.is_finite())) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.cost_usd"),
                "expected a non-negative number",
            ));
        }
        Ok(BudgetLimits {
            tool_calls: self.tool_calls,
            tokens: self.tokens,
            cost_usd: self.cost_usd,
            window: duration("window", self.window)?,
            deadline: duration("deadline", self.deadline)?,
        })
    }
}

impl RawBudgets {
    fn into_settings(self, file: &Path) -> Result<BudgetSettings, ConfigError> {
        let defaults = BudgetSettings::default();
        let warn_at = self.warn_at.unwrap_or(defaults.warn_at);
        if !(warn_at > 0.0 && warn_at <= 1.0) {
            return Err(ConfigError::invalid(
                file,
                "budgets.warn_at",
                format!("expected a share between 0 and 1, got {warn_at}"),
            ));
        }
        let mut roles = BTreeMap::new();
        for (role, raw) in self.roles {
            let key = format!("budgets.roles.{role}");
            roles.insert(role, raw.into_limits(file, &key)?);
        }
        let mut principals = BTreeMap::new();
        for (principal, raw) in self.principals {
            let key = format!("budgets.principals.{principal}");
            principals.insert(principal, raw.into_limits(file, &key)?);
        }
        Ok(BudgetSettings {
            warn_at,
            max_depth: self.max_depth.unwrap_or(defaults.max_depth),
            default: self
                .default
                .map(|d| d.into_limits(file, "budgets.default"))
                .transpose()?,
            roles,
            principals,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    per_principal: Option<RawRate>,
    #[serde(default)]
    tools: BTreeMap<String, RawRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    breaker_failures: Option<u32>,
    breaker_failure_ratio: Option<f64>,
    breaker_window: Option<u32>,
    breaker_cooldown: Option<String>,
    retry_attempts: Option<u32>,
    retry_backoff: Option<String>,
    cache_entries: Option<usize>,
    max_result_tokens: Option<u64>,
}

/// `n` if it is not zero; else an error naming `key` ("must be at least 1" and `why`).
fn at_least_one<T: Copy + PartialEq + From<u8>>(
    file: &Path,
    key: &str,
    n: T,
    why: &str,
) -> Result<T, ConfigError> {
    if n == T::from(0) {
        return Err(ConfigError::invalid(
            file,
            key,
            format!("must be at least 1{why}"),
        ));
    }
    Ok(n)
}

impl RawRouting {
    fn into_settings(self, file: &Path) -> Result<RoutingSettings, ConfigError> {
        let mut settings = RoutingSettings::default();
        if let Some(n) = self.breaker_failures {
            settings.breaker_failures = at_least_one(file, "routing.breaker_failures", n, "")?;
        }
        if let Some(ratio) = self.breaker_failure_ratio {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return Err(ConfigError::invalid(
                    file,
                    "routing.breaker_failure_ratio",
                    "must be above 0 and at most 1",
                ));
            }
            settings.breaker_failure_ratio = ratio;
        }
        if let Some(window) = self.breaker_window {
            settings.breaker_window = at_least_one(file, "routing.breaker_window", window, "")?;
        }
        if let Some(text) = self.breaker_cooldown {
            settings.breaker_cooldown = parse_duration(&text)
                .map_err(|m| ConfigError::invalid(file, "routing.breaker_cooldown", m))?;
        }
        if let Some(n) = self.retry_attempts {
            settings.retry_attempts = at_least_one(
                file,
                "routing.retry_attempts",
                n,
                " (the first attempt counts)",
            )?;
        }
        if let Some(text) = self.retry_backoff {
            settings.retry_backoff = parse_duration(&text)
                .map_err(|m| ConfigError::invalid(file, "routing.retry_backoff", m))?;
        }
        if let Some(n) = self.cache_entries {
            settings.cache_entries = n;
        }
        if let Some(n) = self.max_result_tokens {
            settings.max_result_tokens =
                Some(at_least_one(file, "routing.max_result_tokens", n, "")?);
        }
        Ok(settings)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    api: ProviderApi,
    base_url: String,
    model: String,
    api_key_env: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    version: Option<String>,
    #[serde(default)]
    price_input: f64,
    #[serde(default)]
    price_output: f64,
    timeout: Option<String>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default)]
    description: String,
    instructions: String,
    provider: Option<RawSelector>,
    #[serde(default)]
    tools: Vec<RawToolChoice>,
    max_iterations: Option<u32>,
    max_tool_calls_per_turn: Option<u32>,
    max_parallel_tool_calls: Option<u32>,
    output_schema: Option<toml::Value>,
    #[serde(default)]
    budget: RawAgentBudget,
    #[serde(default)]
    cost_aware: bool,
}

/// One entry of an agent's `tools`: a name (`SERVER__TOOL`, `SERVER__*`) or a selector of
/// servers resolved through the mesh.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawToolChoice {
    Name(String),
    Servers(RawSelector),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    capability: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    version: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentBudget {
    tokens: Option<u64>,
    cost_usd: Option<f64>,
    tool_calls: Option<u64>,
    deadline: Option<String>,
}

fn providers(
    raw: BTreeMap<String, RawProvider>,
    file: &Path,
    lookup: Lookup<'_>,
) -> Result<Vec<ProviderSpec>, ConfigError> {
    let mut out = Vec::new();
    for (name, mut p) in raw {
        let key = |field: &str| format!("providers.{name}.{field}");
        // URLs and models often come from the environment (`${OPENAI_BASE_URL:-…}`).
        p.base_url = expand_vars(&p.base_url, lookup)
            .map_err(|m| ConfigError::invalid(file, key("base_url"), m))?;
        p.model = expand_vars(&p.model, lookup)
            .map_err(|m| ConfigError::invalid(file, key("model"), m))?;
        validate_server_name(&name)
            .map_err(|m| ConfigError::invalid(file, format!("providers.{name}"), m))?;
        if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                file,
                key("base_url"),
                format!("expected an http:// or https:// URL, got {:?}", p.base_url),
            ));
        }
        let version = p.version.unwrap_or_else(|| "1.0.0".to_string());
        if semver::Version::parse(&version).is_err() {
            return Err(ConfigError::invalid(
                file,
                key("version"),
                format!("expected a semantic version like 1.2.0, got {version:?}"),
            ));
        }
        for (field, price) in [
            ("price_input", p.price_input),
            ("price_output", p.price_output),
        ] {
            // `nan` and `inf` are valid TOML floats; a price must be a real, finite amount.
            if !(price >= 0.0 && price.is_finite()) {
                return Err(ConfigError::invalid(
                    file,
                    key(field),
                    format!(
                        "expected a finite price of 0 or more (USD per million tokens), got {price}"
                    ),
                ));
            }
        }
        let timeout = match p.timeout {
            Some(text) => {
                parse_duration(&text).map_err(|m| ConfigError::invalid(file, key("timeout"), m))?
            }
            None => std::time::Duration::from_secs(120),
        };
        out.push(ProviderSpec {
            name,
            api: p.api,
            base_url: p.base_url,
            model: p.model,
            api_key_env: p.api_key_env,
            tags: p.tags,
            version,
            price_input: p.price_input,
            price_output: p.price_output,
            timeout,
            stream: p.stream,
            max_tokens: p.max_tokens.unwrap_or(1024),
            temperature: p.temperature,
        });
    }
    Ok(out)
}

fn workflows(
    raw: BTreeMap<String, toml::Table>,
    agents: &[AgentSettings],
    file: &Path,
) -> Result<Vec<WorkflowSettings>, ConfigError> {
    let mut out = Vec::new();
    for (name, mut table) in raw {
        let key = format!("workflows.{name}");
        validate_server_name(&name).map_err(|m| ConfigError::invalid(file, key.clone(), m))?;
        let description = match table.remove("description") {
            Some(toml::Value::String(text)) => text,
            Some(_) => {
                return Err(ConfigError::invalid(
                    file,
                    format!("{key}.description"),
                    "expected a string",
                ));
            }
            None => String::new(),
        };
        let kind: WorkflowKind = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let at = e.path().to_string();
                ConfigError::invalid(
                    file,
                    if at == "." {
                        key.clone()
                    } else {
                        format!("{key}.{at}")
                    },
                    e.into_inner().to_string(),
                )
            })?;
        for agent in kind.agents() {
            if !agents.iter().any(|a| a.name == agent) {
                return Err(ConfigError::invalid(
                    file,
                    key.clone(),
                    format!("names agent {agent:?}, which no [agents.{agent}] table defines"),
                ));
            }
        }
        out.push(WorkflowSettings {
            name,
            description,
            kind,
        });
    }
    Ok(out)
}

fn agents(raw: BTreeMap<String, RawAgent>, file: &Path) -> Result<Vec<AgentSettings>, ConfigError> {
    let mut out = Vec::new();
    for (name, a) in raw {
        let key = |field: &str| format!("agents.{name}.{field}");
        validate_server_name(&name)
            .map_err(|m| ConfigError::invalid(file, format!("agents.{name}"), m))?;
        let selector = a.provider.unwrap_or_default();
        let max_iterations = a.max_iterations.unwrap_or(8);
        if max_iterations == 0 {
            return Err(ConfigError::invalid(
                file,
                key("max_iterations"),
                "must be at least 1",
            ));
        }
        let per_turn = a
            .max_tool_calls_per_turn
            .unwrap_or(crate::DEFAULT_MAX_TOOL_CALLS_PER_TURN);
        let parallel = a
            .max_parallel_tool_calls
            .unwrap_or(crate::DEFAULT_MAX_PARALLEL_TOOL_CALLS);
        for (field, value) in [
            ("max_tool_calls_per_turn", per_turn),
            ("max_parallel_tool_calls", parallel),
        ] {
            if !(1..=crate::MAX_TOOL_CALLS_LIMIT).contains(&value) {
                return Err(ConfigError::invalid(
                    file,
                    key(field),
                    format!("expected 1 to {}, got {value}", crate::MAX_TOOL_CALLS_LIMIT),
                ));
            }
        }
        let output_schema = match a.output_schema {
            None => None,
            Some(toml::Value::String(text)) => Some(serde_json::from_str(&text).map_err(|e| {
                ConfigError::invalid(file, key("output_schema"), format!("not JSON: {e}"))
            })?),
            Some(value) => Some(
                serde_json::to_value(value)
                    .map_err(|e| ConfigError::invalid(file, key("output_schema"), e.to_string()))?,
            ),
        };
        let deadline = match a.budget.deadline {
            Some(text) => Some(
                parse_duration(&text)
                    .map_err(|m| ConfigError::invalid(file, key("budget.deadline"), m))?,
            ),
            None => None,
        };
        if a.budget
            .cost_usd
            .is_some_and(|c| !(c >= 0.0 && c.is_finite()))
        {
            return Err(ConfigError::invalid(
                file,
                key("budget.cost_usd"),
                format!(
                    "expected a finite amount of 0 or more, got {}",
                    a.budget.cost_usd.unwrap_or_default()
                ),
            ));
        }
        let mut tools = Vec::new();
        let mut tool_servers = Vec::new();
        for choice in a.tools {
            match choice {
                RawToolChoice::Name(name) => tools.push(name),
                RawToolChoice::Servers(selector) => {
                    let selector = concord_mesh::Selector {
                        capability: selector
                            .capability
                            .unwrap_or_else(|| concord_mesh::ANY_SERVER_CAPABILITY.to_string()),
                        tags: selector.tags,
                        version: selector.version,
                        namespace: selector.namespace,
                    };
                    // Resolving against nothing checks the selector itself (its version).
                    concord_mesh::resolve(&selector, &[], 0)
                        .map_err(|e| ConfigError::invalid(file, key("tools"), e.to_string()))?;
                    tool_servers.push(selector);
                }
            }
        }
        out.push(AgentSettings {
            name,
            description: a.description,
            instructions: a.instructions,
            provider: concord_mesh::Selector {
                capability: selector.capability.unwrap_or_else(|| "llm".to_string()),
                tags: selector.tags,
                version: selector.version,
                namespace: selector.namespace,
            },
            tools,
            tool_servers,
            max_iterations,
            max_tool_calls_per_turn: per_turn as usize,
            max_parallel_tool_calls: parallel as usize,
            output_schema,
            budget: AgentBudget {
                tokens: a.budget.tokens,
                cost_usd: a.budget.cost_usd,
                tool_calls: a.budget.tool_calls,
                deadline,
            },
            cost_aware: a.cost_aware,
        });
    }
    Ok(out)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    cache_ttl: Option<String>,
    #[serde(default)]
    retryable: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default)]
    record_arguments: bool,
    redact: Option<Vec<String>>,
}

impl RawRate {
    fn into_rate(self, file: &Path, key: &str) -> Result<Rate, ConfigError> {
        if !(self.per_second > 0.0 && self.per_second.is_finite()) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.per_second"),
                format!("expected a positive number, got {}", self.per_second),
            ));
        }
        let burst = self.burst.unwrap_or(self.per_second.ceil().max(1.0) as u32);
        if burst == 0 {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.burst"),
                "expected at least 1",
            ));
        }
        Ok(Rate {
            per_second: self.per_second,
            burst,
        })
    }
}

impl RawLimits {
    fn into_settings(self, file: &Path) -> Result<LimitSettings, ConfigError> {
        let per_principal = self
            .per_principal
            .map(|r| r.into_rate(file, "limits.per_principal"))
            .transpose()?;
        let mut per_tool = BTreeMap::new();
        for (tool, rate) in self.tools {
            let key = format!("limits.tools.{tool}");
            per_tool.insert(tool, rate.into_rate(file, &key)?);
        }
        Ok(LimitSettings {
            per_principal,
            per_tool,
        })
    }
}

impl RawAudit {
    fn into_settings(self) -> AuditSettings {
        let defaults = AuditSettings::default();
        AuditSettings {
            record_arguments: self.record_arguments,
            redact: self.redact.unwrap_or(defaults.redact),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    enabled: bool,
    issuer: Option<String>,
    audience: Option<String>,
    jwks_url: Option<String>,
    #[serde(default)]
    keys: Vec<RawKey>,
    leeway: Option<String>,
    principal_claim: Option<String>,
    roles_claim: Option<String>,
    #[serde(default)]
    authorization_servers: Vec<String>,
    resource: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: Option<String>,
    algorithm: String,
    secret: Option<String>,
    public_key: Option<String>,
    public_key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    name: String,
    effect: String,
    when: Option<String>,
}

/// A policy file: `[[rules]]` only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    #[serde(default)]
    rules: Vec<RawRule>,
}

impl PolicyFile {
    pub(crate) fn into_rules(self, file: &Path) -> Result<Vec<PolicyRule>, ConfigError> {
        rules_of(self.rules, file, "rules")
    }
}

fn rules_of(raw: Vec<RawRule>, file: &Path, table: &str) -> Result<Vec<PolicyRule>, ConfigError> {
    let mut rules = Vec::with_capacity(raw.len());
    let mut names = std::collections::BTreeSet::new();
    for (index, rule) in raw.into_iter().enumerate() {
        let key = format!("{table}[{index}]");
        let effect = match rule.effect.as_str() {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            other => {
                return Err(ConfigError::invalid(
                    file,
                    format!("{key}.effect"),
                    format!("expected \"allow\" or \"deny\", got {other:?}"),
                ));
            }
        };
        if rule.name.trim().is_empty() || !names.insert(rule.name.clone()) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.name"),
                format!(
                    "every rule needs a name of its own (audit records which rule decided); {:?} is empty or repeated",
                    rule.name
                ),
            ));
        }
        rules.push(PolicyRule {
            name: rule.name,
            effect,
            when: rule.when.unwrap_or_else(|| "true".into()),
        });
    }
    Ok(rules)
}

/// The shortest HS256 secret accepted: 256 bits, the size of the HMAC's output (RFC 7518
/// section 3.2).
const MIN_HS256_SECRET_BYTES: usize = 32;

impl RawAuth {
    fn into_settings(
        self,
        file: &Path,
        base_dir: &Path,
        lookup: Lookup<'_>,
    ) -> Result<AuthSettings, ConfigError> {
        let defaults = AuthSettings::default();
        let expand = |key: &str, text: &str| {
            expand_vars(text, lookup).map_err(|m| ConfigError::invalid(file, key, m))
        };
        let leeway = match self.leeway {
            Some(text) => {
                parse_duration(&text).map_err(|m| ConfigError::invalid(file, "auth.leeway", m))?
            }
            None => defaults.leeway,
        };
        let mut keys = Vec::with_capacity(self.keys.len());
        for (index, key) in self.keys.into_iter().enumerate() {
            let at = |field: &str| format!("auth.keys[{index}].{field}");
            let secret = key.secret.map(|s| expand(&at("secret"), &s)).transpose()?;
            let public_key_pem = match (key.public_key, key.public_key_file) {
                (Some(pem), None) => Some(expand(&at("public_key"), &pem)?),
                (None, Some(path)) => {
                    let path = base_dir.join(expand(&at("public_key_file"), &path)?);
                    Some(std::fs::read_to_string(&path).map_err(|e| {
                        ConfigError::invalid(
                            file,
                            at("public_key_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?)
                }
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        file,
                        at("public_key"),
                        "give `public_key` or `public_key_file`, not both",
                    ));
                }
            };
            let symmetric = key.algorithm == "HS256";
            match (symmetric, &secret, &public_key_pem) {
                (true, Some(secret), None) => {
                    if secret.len() < MIN_HS256_SECRET_BYTES {
                        return Err(ConfigError::invalid(
                            file,
                            at("secret"),
                            format!(
                                "HS256 secrets need at least {MIN_HS256_SECRET_BYTES} bytes (a shorter one can be guessed offline from any token); this one has {}",
                                secret.len()
                            ),
                        ));
                    }
                }
                (false, None, Some(_)) => {}
                (true, _, _) => {
                    return Err(ConfigError::invalid(
                        file,
                        at("secret"),
                        "HS256 keys need `secret` (and no public key)",
                    ));
                }
                (false, _, _) => {
                    if !["RS256", "ES256", "EdDSA"].contains(&key.algorithm.as_str()) {
                        return Err(ConfigError::invalid(
                            file,
                            at("algorithm"),
                            format!(
                                "expected \"HS256\", \"RS256\", \"ES256\" or \"EdDSA\", got {:?}",
                                key.algorithm
                            ),
                        ));
                    }
                    return Err(ConfigError::invalid(
                        file,
                        at("public_key"),
                        format!(
                            "{} keys need a PEM `public_key` or `public_key_file` (and no secret)",
                            key.algorithm
                        ),
                    ));
                }
            }
            keys.push(StaticKey {
                kid: key.kid,
                algorithm: key.algorithm,
                secret,
                public_key_pem,
            });
        }
        let jwks_url = self
            .jwks_url
            .map(|u| expand("auth.jwks_url", &u))
            .transpose()?;
        let issuer = self.issuer.map(|v| expand("auth.issuer", &v)).transpose()?;
        let audience = self
            .audience
            .map(|v| expand("auth.audience", &v))
            .transpose()?;
        // A token is only as specific as what it is checked against: without `iss` and `aud`,
        // any token the keys verify — minted by the identity provider for another service —
        // would be accepted here.
        if self.enabled && (!keys.is_empty() || jwks_url.is_some()) {
            let verifier = if jwks_url.is_some() {
                "auth.jwks_url"
            } else {
                "auth.keys"
            };
            for (key, value) in [("auth.issuer", &issuer), ("auth.audience", &audience)] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        file,
                        key,
                        format!(
                            "required when JWTs are accepted ({verifier} is set): without it a token issued for another service would be accepted"
                        ),
                    ));
                }
            }
        }
        Ok(AuthSettings {
            enabled: self.enabled,
            issuer,
            audience,
            jwks_url,
            keys,
            leeway,
            principal_claim: self.principal_claim.unwrap_or(defaults.principal_claim),
            roles_claim: self.roles_claim.unwrap_or(defaults.roles_claim),
            authorization_servers: self.authorization_servers,
            resource: self.resource,
        })
    }
}

impl RawPolicy {
    fn into_settings(self, file: &Path, base_dir: &Path) -> Result<PolicySettings, ConfigError> {
        Ok(PolicySettings {
            rules: rules_of(self.rules, file, "policy.rules")?,
            file: self.file.map(|f| base_dir.join(f)),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    store: Option<String>,
    max_value_bytes: Option<usize>,
    proposal_ttl: Option<String>,
    keep_versions: Option<u64>,
    #[serde(default)]
    namespaces: BTreeMap<String, RawNamespace>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    policy: Option<String>,
    /// A JSON Schema every value in the namespace must satisfy, written as a TOML table.
    schema: Option<toml::Value>,
    /// An MCP tool (its name through the gateway) that approves or rejects each write.
    validator: Option<String>,
}

impl RawState {
    fn into_settings(self, file: &Path, lookup: Lookup<'_>) -> Result<StateSettings, ConfigError> {
        let store = match self.store {
            Some(text) => Some(
                expand_vars(&text, lookup)
                    .map_err(|m| ConfigError::invalid(file, "state.store", m))?,
            ),
            None => None,
        };
        let proposal_ttl = match self.proposal_ttl {
            Some(text) => Some(
                parse_duration(&text)
                    .map_err(|m| ConfigError::invalid(file, "state.proposal_ttl", m))?,
            ),
            None => None,
        };
        let mut policies = BTreeMap::new();
        let mut schemas = BTreeMap::new();
        let mut validators = BTreeMap::new();
        for (namespace, raw) in self.namespaces {
            if let Some(policy) = raw.policy {
                if policy != "reject" && policy != "merge" {
                    return Err(ConfigError::invalid(
                        file,
                        format!("state.namespaces.{namespace}.policy"),
                        format!("expected \"reject\" or \"merge\", got {policy:?}"),
                    ));
                }
                policies.insert(namespace.clone(), policy);
            }
            if let Some(tool) = raw.validator {
                if tool.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        file,
                        format!("state.namespaces.{namespace}.validator"),
                        "expected a tool name as the gateway exposes it, e.g. \"qa__review\"",
                    ));
                }
                validators.insert(namespace.clone(), tool);
            }
            if let Some(schema) = raw.schema {
                let schema = serde_json::to_value(schema).map_err(|e| {
                    ConfigError::invalid(
                        file,
                        format!("state.namespaces.{namespace}.schema"),
                        e.to_string(),
                    )
                })?;
                schemas.insert(namespace, schema);
            }
        }
        if self.keep_versions == Some(0) {
            return Err(ConfigError::invalid(
                file,
                "state.keep_versions",
                "expected at least 1 (the current version is always kept)",
            ));
        }
        Ok(StateSettings {
            store,
            max_value_bytes: self.max_value_bytes,
            proposal_ttl,
            keep_versions: self.keep_versions,
            policies,
            schemas,
            validators,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    listen: Option<String>,
    data_dir: Option<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    max_body_bytes: Option<usize>,
    request_timeout: Option<String>,
    health_interval: Option<String>,
    page_size: Option<usize>,
    /// Private networks registered endpoints may be in (CIDR).
    #[serde(default)]
    registry_private_networks: Vec<String>,
    registry_max_per_principal: Option<usize>,
    max_sessions: Option<usize>,
    session_idle_timeout: Option<String>,
    max_connections: Option<usize>,
    header_read_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlServer {
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    transport: Option<TransportKind>,
    prefix: Option<PrefixMode>,
    timeout: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    forward_roots: bool,
    /// Trust the usage this server reports in a tool result's `_meta["concord/usage"]`.
    #[serde(default)]
    report_usage: bool,
    cache_ttl: Option<String>,
    #[serde(default)]
    tools: BTreeMap<String, RawTool>,
    /// What the server offers and how it is labelled, for agents that pick tools by selector.
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum TransportKind {
    #[serde(rename = "stdio")]
    Stdio,
    #[serde(
        rename = "streamable-http",
        alias = "streamable_http",
        alias = "streamableHttp",
        alias = "http"
    )]
    StreamableHttp,
    #[serde(rename = "sse")]
    Sse,
}

/// The `mcpServers` JSON of Claude Desktop, Cursor, Windsurf and `.mcp.json` files. Keys outside
/// `mcpServers` belong to the host application and are ignored; inside an entry, the extra keys
/// those applications define are tolerated and anything else is an error.
#[derive(Debug, Deserialize)]
pub(crate) struct JsonFile {
    #[serde(rename = "mcpServers", alias = "servers")]
    mcp_servers: Option<BTreeMap<String, JsonServer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JsonServer {
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(rename = "type", alias = "transport", alias = "transportType")]
    kind: Option<TransportKind>,
    #[serde(default)]
    disabled: bool,
    /// Milliseconds, as Cline and others write it.
    timeout: Option<u64>,
    // Host-application settings that mean nothing to a gateway.
    #[serde(default, rename = "autoApprove", alias = "alwaysAllow")]
    _auto_approve: serde_json::Value,
    #[serde(default, rename = "description")]
    _description: serde_json::Value,
}

pub(crate) fn parse_toml(text: &str, file: &Path) -> Result<TomlFile, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
        file: file.to_path_buf(),
        location: toml_location(text, e.span()),
        message: e.message().to_string(),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: format!("{}{}", toml_location(text, inner.span()), inner.message()),
        }
    })
}

fn toml_location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: ")
}

pub(crate) fn parse_json(text: &str, file: &Path) -> Result<JsonFile, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ConfigError::Syntax {
                file: file.to_path_buf(),
                location: format!("line {}, column {}: ", inner.line(), inner.column()),
                message: inner.to_string(),
            }
        } else {
            ConfigError::Invalid {
                file: file.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: inner.to_string(),
            }
        }
    })
}

/// The fields both formats share, after format-specific renaming.
struct CommonServer {
    command: Option<String>,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    url: Option<String>,
    headers: BTreeMap<String, String>,
    kind: Option<TransportKind>,
    prefix: Option<PrefixMode>,
    timeout: Option<std::time::Duration>,
    forward_roots: bool,
    report_usage: bool,
    cache_ttl: Option<std::time::Duration>,
    tools: BTreeMap<String, ToolSettings>,
    capabilities: Vec<String>,
    tags: Vec<String>,
}

impl TomlFile {
    pub(crate) fn into_config(
        self,
        file: &Path,
        base_dir: &Path,
        lookup: Lookup<'_>,
    ) -> Result<Config, ConfigError> {
        let node = self.node.into_settings(file, base_dir)?;
        let state = self.state.into_settings(file, lookup)?;
        let auth = self.auth.into_settings(file, base_dir, lookup)?;
        let policy = self.policy.into_settings(file, base_dir)?;
        let limits = self.limits.into_settings(file)?;
        let audit = self.audit.into_settings();
        let budgets = self.budgets.into_settings(file)?;
        let routing = self.routing.into_settings(file)?;
        let providers = providers(self.providers, file, lookup)?;
        let agents = agents(self.agents, file)?;
        let workflows = workflows(self.workflows, &agents, file)?;
        let registry = registrations(self.registry, file)?;
        let mut servers = Vec::new();
        for (name, raw) in self.servers {
            if !raw.enabled {
                continue;
            }
            let timeout = match &raw.timeout {
                Some(text) => Some(parse_duration(text).map_err(|m| {
                    ConfigError::invalid(file, format!("servers.{name}.timeout"), m)
                })?),
                None => None,
            };
            let mut tools = BTreeMap::new();
            for (tool, settings) in raw.tools {
                let cache_ttl = match &settings.cache_ttl {
                    // "0s" (or "off") turns caching off for this tool.
                    Some(text) if matches!(text.trim(), "0" | "0s" | "0ms" | "off") => {
                        Some(std::time::Duration::ZERO)
                    }
                    Some(text) => Some(parse_duration(text).map_err(|m| {
                        ConfigError::invalid(
                            file,
                            format!("servers.{name}.tools.{tool}.cache_ttl"),
                            m,
                        )
                    })?),
                    None => None,
                };
                tools.insert(
                    tool,
                    ToolSettings {
                        cache_ttl,
                        retryable: settings.retryable,
                    },
                );
            }
            let common = CommonServer {
                command: raw.command,
                args: raw.args,
                env: raw.env,
                cwd: raw.cwd,
                url: raw.url,
                headers: raw.headers,
                kind: raw.transport,
                prefix: raw.prefix,
                timeout,
                forward_roots: raw.forward_roots,
                report_usage: raw.report_usage,
                cache_ttl: match &raw.cache_ttl {
                    Some(text) => Some(parse_duration(text).map_err(|m| {
                        ConfigError::invalid(file, format!("servers.{name}.cache_ttl"), m)
                    })?),
                    None => None,
                },
                tools,
                capabilities: raw.capabilities,
                tags: raw.tags,
            };
            servers.push(common.into_spec(&name, "servers", file, base_dir, &node, lookup)?);
        }
        Ok(Config {
            source: None,
            node,
            state,
            auth,
            policy,
            limits,
            audit,
            budgets,
            routing,
            providers,
            agents,
            workflows,
            registry,
            servers,
        })
    }
}

impl JsonFile {
    pub(crate) fn into_config(
        self,
        file: &Path,
        base_dir: &Path,
        lookup: Lookup<'_>,
    ) -> Result<Config, ConfigError> {
        let Some(entries) = self.mcp_servers else {
            return Err(ConfigError::invalid(
                file,
                "mcpServers",
                "missing: expected an object mapping server names to {\"command\": ...} or {\"url\": ...}",
            ));
        };
        let node = NodeSettings::default();
        let mut servers = Vec::new();
        for (name, raw) in entries {
            if raw.disabled {
                continue;
            }
            let common = CommonServer {
                command: raw.command,
                args: raw.args,
                env: raw.env,
                cwd: raw.cwd,
                url: raw.url,
                headers: raw.headers,
                kind: raw.kind,
                prefix: None,
                timeout: raw.timeout.map(std::time::Duration::from_millis),
                forward_roots: false,
                report_usage: false,
                cache_ttl: None,
                tools: BTreeMap::new(),
                capabilities: Vec::new(),
                tags: Vec::new(),
            };
            servers.push(common.into_spec(&name, "mcpServers", file, base_dir, &node, lookup)?);
        }
        // The mcpServers format has servers only; everything else keeps its defaults.
        Ok(Config {
            node,
            servers,
            ..Config::default()
        })
    }
}

impl RawNode {
    fn into_settings(self, file: &Path, base_dir: &Path) -> Result<NodeSettings, ConfigError> {
        let mut settings = NodeSettings::default();
        if let Some(listen) = self.listen {
            settings.listen = Some(listen.parse::<SocketAddr>().map_err(|_| {
                ConfigError::invalid(
                    file,
                    "node.listen",
                    format!("expected an address like \"127.0.0.1:8811\", got {listen:?}"),
                )
            })?);
        }
        settings.data_dir = self.data_dir.map(|d| base_dir.join(d));
        settings.allowed_hosts = self.allowed_hosts;
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if !(origin == "null"
                || origin.starts_with("http://")
                || origin.starts_with("https://"))
            {
                return Err(ConfigError::invalid(
                    file,
                    format!("node.allowed_origins[{i}]"),
                    format!(
                        "expected an origin with a scheme like \"https://app.example.com\", got {origin:?}"
                    ),
                ));
            }
        }
        settings.allowed_origins = self.allowed_origins;
        if let Some(bytes) = self.max_body_bytes {
            if bytes < 1024 {
                return Err(ConfigError::invalid(
                    file,
                    "node.max_body_bytes",
                    format!("expected at least 1024 bytes, got {bytes}"),
                ));
            }
            settings.max_body_bytes = bytes;
        }
        if let Some(text) = self.request_timeout {
            settings.request_timeout = parse_duration(&text)
                .map_err(|m| ConfigError::invalid(file, "node.request_timeout", m))?;
        }
        if let Some(text) = self.health_interval {
            settings.health_interval = parse_duration(&text)
                .map_err(|m| ConfigError::invalid(file, "node.health_interval", m))?;
        }
        if let Some(size) = self.page_size {
            if size == 0 {
                return Err(ConfigError::invalid(
                    file,
                    "node.page_size",
                    "expected at least 1 item per page, got 0",
                ));
            }
            settings.page_size = size;
        }
        for (i, text) in self.registry_private_networks.iter().enumerate() {
            let network = text.parse::<concord_mesh::net::Network>().map_err(|m| {
                ConfigError::invalid(file, format!("node.registry_private_networks[{i}]"), m)
            })?;
            settings.registry_private_networks.push(network);
        }
        if let Some(max) = self.registry_max_per_principal {
            if max == 0 {
                return Err(ConfigError::invalid(
                    file,
                    "node.registry_max_per_principal",
                    "expected at least 1 registration per principal, got 0",
                ));
            }
            settings.registry_max_per_principal = max;
        }
        for (key, value, target) in [
            (
                "node.max_sessions",
                self.max_sessions,
                &mut settings.max_sessions,
            ),
            (
                "node.max_connections",
                self.max_connections,
                &mut settings.max_connections,
            ),
        ] {
            if let Some(max) = value {
                if !(1..=crate::MAX_SESSIONS_OR_CONNECTIONS).contains(&max) {
                    return Err(ConfigError::invalid(
                        file,
                        key,
                        format!(
                            "expected 1 to {}, got {max}",
                            crate::MAX_SESSIONS_OR_CONNECTIONS
                        ),
                    ));
                }
                *target = max;
            }
        }
        for (key, value, target) in [
            (
                "node.session_idle_timeout",
                self.session_idle_timeout,
                &mut settings.session_idle_timeout,
            ),
            (
                "node.header_read_timeout",
                self.header_read_timeout,
                &mut settings.header_read_timeout,
            ),
        ] {
            if let Some(text) = value {
                *target = parse_duration(&text).map_err(|m| ConfigError::invalid(file, key, m))?;
            }
        }
        Ok(settings)
    }
}

impl CommonServer {
    fn into_spec(
        self,
        name: &str,
        table: &str,
        file: &Path,
        base_dir: &Path,
        node: &NodeSettings,
        lookup: Lookup<'_>,
    ) -> Result<ServerSpec, ConfigError> {
        let key = |field: &str| format!("{table}.{name}{field}");
        validate_server_name(name).map_err(|m| ConfigError::invalid(file, key(""), m))?;
        let expand = |field: String, value: &str| {
            expand_vars(value, lookup).map_err(|m| ConfigError::invalid(file, field, m))
        };

        let transport = match (self.command, self.url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    file,
                    key(""),
                    "has both `command` and `url`: expected `command` (stdio) or `url` (HTTP), not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    file,
                    key(""),
                    "needs `command` (a stdio server) or `url` (a streamable HTTP or SSE server)",
                ));
            }
            (Some(command), None) => {
                if matches!(self.kind, Some(k) if k != TransportKind::Stdio) {
                    return Err(ConfigError::invalid(
                        file,
                        key(".transport"),
                        "a server with `command` uses the stdio transport; remove `transport` or use `url`",
                    ));
                }
                if !self.headers.is_empty() {
                    return Err(ConfigError::invalid(
                        file,
                        key(".headers"),
                        "headers apply to HTTP servers only; pass secrets to a stdio server through `env`",
                    ));
                }
                let command = expand(key(".command"), &command)?;
                if command.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        file,
                        key(".command"),
                        "expected a program name or path, got an empty string",
                    ));
                }
                let args = self
                    .args
                    .iter()
                    .enumerate()
                    .map(|(i, a)| expand(key(&format!(".args[{i}]")), a))
                    .collect::<Result<Vec<_>, _>>()?;
                let env = self
                    .env
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), expand(key(&format!(".env.{k}")), v)?)))
                    .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
                let cwd = match self.cwd {
                    Some(cwd) => Some(base_dir.join(expand(key(".cwd"), &cwd)?)),
                    None => None,
                };
                TransportSpec::Stdio {
                    command,
                    args,
                    env,
                    cwd,
                }
            }
            (None, Some(url)) => {
                if !self.args.is_empty() || !self.env.is_empty() || self.cwd.is_some() {
                    return Err(ConfigError::invalid(
                        file,
                        key(""),
                        "`args`, `env` and `cwd` apply to stdio servers only (this one has `url`)",
                    ));
                }
                let url = expand(key(".url"), &url)?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ConfigError::invalid(
                        file,
                        key(".url"),
                        format!("expected an http:// or https:// URL, got {url:?}"),
                    ));
                }
                let headers = self
                    .headers
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), expand(key(&format!(".headers.{k}")), v)?)))
                    .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
                let path_says_sse = url
                    .split(['?', '#'])
                    .next()
                    .is_some_and(|p| p.trim_end_matches('/').ends_with("/sse"));
                match self.kind {
                    Some(TransportKind::Stdio) => {
                        return Err(ConfigError::invalid(
                            file,
                            key(".transport"),
                            "\"stdio\" needs `command`; a server with `url` is \"streamable-http\" or \"sse\"",
                        ));
                    }
                    Some(TransportKind::Sse) => TransportSpec::Sse { url, headers },
                    None if path_says_sse => TransportSpec::Sse { url, headers },
                    _ => TransportSpec::StreamableHttp { url, headers },
                }
            }
        };
        Ok(ServerSpec {
            name: name.to_string(),
            transport,
            prefix: self.prefix.unwrap_or_default(),
            request_timeout: self.timeout.unwrap_or(node.request_timeout),
            forward_roots: self.forward_roots,
            report_usage: self.report_usage,
            cache_ttl: self.cache_ttl,
            tools: self.tools,
            capabilities: checked_words(self.capabilities, file, &key(".capabilities"))?,
            tags: checked_words(self.tags, file, &key(".tags"))?,
        })
    }
}

/// Capabilities or tags: words of letters, digits and `-_.:/`, none starting with `+` or `-`
/// (those mark preferred and excluded tags in selectors).
fn checked_words(words: Vec<String>, file: &Path, key: &str) -> Result<Vec<String>, ConfigError> {
    for word in &words {
        let ok = !word.is_empty()
            && word.len() <= 128
            && !word.starts_with(['+', '-'])
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
        if !ok {
            return Err(ConfigError::invalid(
                file,
                key,
                format!(
                    "{word:?} is not a valid word (letters, digits, '-', '_', '.', ':', '/'; not starting with '+' or '-')"
                ),
            ));
        }
    }
    Ok(words)
}

fn validate_server_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("server names must be 1 to 64 characters long".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "server name {name:?} may contain only letters, digits, '-' and '_'"
        ));
    }
    if name.contains(NAMESPACE_SEPARATOR) || name.starts_with('_') || name.ends_with('_') {
        return Err(format!(
            "server name {name:?} must not contain \"{NAMESPACE_SEPARATOR}\" or start or end with '_' (it separates server and tool names)"
        ));
    }
    if RESERVED_SERVER_NAMES.contains(&name) {
        return Err(format!(
            "server name {name:?} is reserved for Concord's built-in tools"
        ));
    }
    Ok(())
}
