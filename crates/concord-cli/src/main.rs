//! `concord`: run a node, bridge stdio clients to it, and use it from the shell.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use concord_config::Config;
use concord_mcp::{ClientError, NodeClient};
use serde_json::{Map, Value, json};

const DEFAULT_URL: &str = "http://127.0.0.1:8811/mcp";

#[derive(Parser)]
#[command(
    name = "concord",
    version,
    about = "One MCP endpoint over many MCP servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node fronting the servers in a config file.
    Up(UpArgs),
    /// Bridge this process's stdin/stdout to a node, for stdio-only MCP clients.
    Connect {
        /// The node's MCP endpoint.
        #[arg(env = "CONCORD_URL", default_value = DEFAULT_URL)]
        url: String,
        /// A JWT or API key for a node with authentication on.
        #[arg(long, env = "CONCORD_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// List or call the tools a running node exposes.
    #[command(subcommand)]
    Tools(ToolsCommand),
    /// Read and write the node's shared state.
    #[command(subcommand)]
    State(StateCommand),
    /// Check a config file without starting anything.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create, revoke and list API keys (in the node's store).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Read and verify the audit trail (in the node's store).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The mesh registry of a running node.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// What a registered entity's declared dependencies resolve to now.
    #[command(subcommand)]
    Deps(DepsCommand),
    /// LLM usage and cost from the node's ledger, by agent and model.
    Costs {
        #[arg(long)]
        agent: Option<String>,
        /// A model or provider name.
        #[arg(long)]
        model: Option<String>,
        /// How far back, like 24h or 30m.
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Run one client scenario of the official MCP conformance suite (its client mode runs
    /// this with the test server's URL; the scenario comes from MCP_CONFORMANCE_SCENARIO).
    #[command(hide = true)]
    ConformanceClient {
        url: String,
        #[arg(long, env = "MCP_CONFORMANCE_SCENARIO")]
        scenario: String,
    },
}

#[derive(Args)]
struct UpArgs {
    /// concord.toml, or an `mcpServers` JSON file (Claude Desktop, Cursor, .mcp.json).
    #[arg(long, short, default_value = "concord.toml")]
    config: PathBuf,
    /// Address to listen on (default: node.listen from the config, else 127.0.0.1:8811).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the node keeps its data (default: node.data_dir, else ./.concord).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The shared-state store: `postgres://…` (several nodes) or a SQLite file (default:
    /// state.store, else DATA_DIR/state.db).
    #[arg(long, env = "CONCORD_STORE")]
    store: Option<String>,
}

/// Where a node keeps its store: the same resolution as `concord up`.
#[derive(Args)]
struct StoreTarget {
    /// The node's config file (for node.data_dir and state.store).
    #[arg(long, short, default_value = "concord.toml")]
    config: PathBuf,
    /// The node's data directory (default: node.data_dir, else ./.concord).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The store itself: `postgres://…` or a SQLite file.
    #[arg(long, env = "CONCORD_STORE")]
    store: Option<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a key; it is printed once and only a hash of it is kept.
    Create {
        #[arg(long)]
        principal: String,
        /// A role of the key's principal (repeat for several).
        #[arg(long = "role")]
        roles: Vec<String>,
        #[command(flatten)]
        store: StoreTarget,
    },
    /// Revoke a key by its id (the part after `ck_`, before the second `_`).
    Revoke {
        id: String,
        #[command(flatten)]
        store: StoreTarget,
    },
    /// List keys (ids, principals, roles, state; never secrets).
    List {
        #[command(flatten)]
        store: StoreTarget,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the whole hash chain; exit 1 naming the first bad entry.
    Verify {
        #[command(flatten)]
        store: StoreTarget,
    },
    /// Print the newest entries.
    Tail {
        #[arg(long, short, default_value_t = 20)]
        n: u32,
        #[command(flatten)]
        store: StoreTarget,
    },
    /// Every entry as JSON lines, oldest first (for export to other systems).
    Export {
        #[command(flatten)]
        store: StoreTarget,
    },
    /// Entries matching every filter given, as JSON lines.
    Query {
        /// Entry kind: auth_failure, policy_decision, tool_call, state_commit, state_conflict,
        /// rate_limited, budget_exhausted, budget_warning, policy_reload, policy_reload_failed.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        /// Only entries at most this old (`90s`, `15m`, `24h`).
        #[arg(long)]
        since: Option<String>,
        /// Only entries whose data contains this text.
        #[arg(long)]
        contains: Option<String>,
        #[command(flatten)]
        store: StoreTarget,
    },
}

#[derive(Subcommand)]
enum DepsCommand {
    /// Each dependency NAME declared, and its best candidate now (or why there is none).
    Show {
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Every registered entity: name, status, uptime, version, endpoint, tags, dependencies.
    List {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum ToolsCommand {
    /// Rank the registered entities for a selector, with the reasons for each (and for every
    /// rejected one): `--capability search --tags prod,+gpu,-staging --version '^1.4'`.
    Resolve {
        #[arg(long)]
        capability: String,
        /// Comma-separated: `t` required, `+t` preferred, `-t` excluded.
        #[arg(long, allow_hyphen_values = true, default_value = "")]
        tags: String,
        /// A semver requirement: `^1.4`, `>=2,<3`.
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List every tool, namespaced as the node exposes it.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Call a tool: `concord tools call everything__echo --arg message=hi`.
    Call {
        name: String,
        /// `key=value`; the value is read as JSON where the tool's schema does not say
        /// it is a string (`--arg n=3`, `--arg 'tags=["a","b"]'`).
        #[arg(long = "arg", short = 'a', value_name = "KEY=VALUE")]
        args: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
struct Target {
    /// The node's MCP endpoint.
    #[arg(long, env = "CONCORD_URL", default_value = DEFAULT_URL)]
    url: String,
    /// A JWT or API key for a node with authentication on.
    #[arg(long, env = "CONCORD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print a key's value and version.
    Get {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Write a key (VALUE is JSON, or a plain string). Without --base, the current version is
    /// read first; with it, the write is refused if the key moved since that version.
    Put {
        key: String,
        value: String,
        #[arg(long)]
        base: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Propose setting a key; prints the proposal id to commit.
    Propose {
        key: String,
        value: String,
        #[arg(long)]
        base: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Commit a proposal.
    Commit {
        proposal_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// A key's versions, newest first.
    Log {
        key: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Follow the change feed under a prefix (`namespace/`), from --since.
    Watch {
        prefix: String,
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the servers it defines.
    Check { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    concord_telemetry::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Connect { url, token } => {
            concord_mcp::run_stdio_bridge(&url, token.as_deref()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Tools(ToolsCommand::List { target }) => tools_list(target).await,
        Command::Tools(ToolsCommand::Call { name, args, target }) => {
            tools_call(&name, &args, target).await
        }
        Command::State(command) => state_command(command).await,
        Command::Keys(command) => keys_command(command).await,
        Command::Audit(command) => audit_command(command).await,
        Command::Agents(AgentsCommand::List { target }) => agents_list(target).await,
        Command::Deps(DepsCommand::Show { name, target }) => deps_show(&name, target).await,
        Command::Costs {
            agent,
            model,
            since,
            target,
        } => costs(agent, model, since, target).await,
        Command::Tools(ToolsCommand::Resolve {
            capability,
            tags,
            version,
            namespace,
            target,
        }) => tools_resolve(&capability, &tags, version, namespace, target).await,
        Command::ConformanceClient { url, scenario } => {
            concord_mcp::conformance::run_client(&scenario, &url).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(&file)?;
            // The policy's CEL rules (inline and the policy file) compile as `up` would compile
            // them, so a rule that would stop the node is found here.
            let policy = concord_governance::policy::PolicyEngine::new(
                config.policy.rules.clone(),
                config.policy.file.clone(),
            )
            .map_err(|error| anyhow::anyhow!("{}: [policy]: {error}", file.display()))?;
            for server in &config.servers {
                println!("{:<24} {}", server.name, server.transport.kind());
            }
            println!(
                "{}: {} servers, {} policy rules, OK",
                file.display(),
                config.servers.len(),
                policy.rules().len()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

async fn open_store(target: &StoreTarget) -> Result<concord_store::Store> {
    let config = if target.config.exists() {
        Some(Config::load(&target.config)?)
    } else {
        None
    };
    let data_dir = target
        .data_dir
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.node.data_dir.clone()))
        .unwrap_or_else(|| PathBuf::from(".concord"));
    let location = concord_node::store_location(
        target.store.clone(),
        config.as_ref().and_then(|c| c.state.store.clone()),
        &data_dir,
    );
    concord_store::Store::open(&location)
        .await
        .with_context(|| format!("opening the store at {location}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

async fn keys_command(command: KeysCommand) -> Result<std::process::ExitCode> {
    match command {
        KeysCommand::Create {
            principal,
            roles,
            store,
        } => {
            let store = open_store(&store).await?;
            let created =
                concord_governance::api_keys::create(&store, &principal, &roles, now_ms()).await?;
            println!("{}", created.token);
            eprintln!(
                "API key {} for {principal} (roles: {}). Shown once: store it now.",
                created.id,
                if roles.is_empty() {
                    "none".to_string()
                } else {
                    roles.join(", ")
                }
            );
            store.close().await;
        }
        KeysCommand::Revoke { id, store } => {
            let store = open_store(&store).await?;
            let revoked = store.revoke_api_key(&id, now_ms()).await?;
            store.close().await;
            if !revoked {
                bail!("no active API key with id {id}");
            }
            println!("revoked {id} (nodes stop accepting it within 2 s)");
        }
        KeysCommand::List { store } => {
            let store = open_store(&store).await?;
            for key in store.api_keys().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    key.id,
                    key.principal,
                    key.roles.join(","),
                    if key.revoked_at_ms.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
            store.close().await;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn audit_command(command: AuditCommand) -> Result<std::process::ExitCode> {
    match command {
        AuditCommand::Verify { store } => {
            let store = open_store(&store).await?;
            let outcome = concord_governance::audit::verify(&store).await?;
            store.close().await;
            match outcome {
                Ok(count) => {
                    println!("audit trail intact: {count} entries verify");
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Err(broken) => {
                    println!(
                        "audit trail BROKEN at entry {}: {}",
                        broken.seq, broken.reason
                    );
                    Ok(std::process::ExitCode::from(1))
                }
            }
        }
        AuditCommand::Tail { n, store } => {
            let store = open_store(&store).await?;
            let mut rows = Vec::new();
            let mut after = 0;
            loop {
                let page = store.audit_rows(after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                rows.extend(page);
                if rows.len() > n as usize {
                    rows.drain(..rows.len() - n as usize);
                }
            }
            for row in rows {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    row.seq, row.at_ms, row.kind, row.principal, row.data
                );
            }
            store.close().await;
            Ok(std::process::ExitCode::SUCCESS)
        }
        AuditCommand::Export { store } => {
            print_audit(&store, |_| true).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        AuditCommand::Query {
            kind,
            principal,
            since,
            contains,
            store,
        } => {
            let oldest = match since {
                Some(text) => now_ms().saturating_sub(
                    concord_config::parse_duration(&text)
                        .map_err(|m| anyhow::anyhow!("--since: {m}"))?
                        .as_millis() as u64,
                ),
                None => 0,
            };
            print_audit(&store, |row| {
                kind.as_ref().is_none_or(|k| &row.kind == k)
                    && principal.as_ref().is_none_or(|p| &row.principal == p)
                    && row.at_ms >= oldest
                    && contains
                        .as_ref()
                        .is_none_or(|c| row.data.contains(c.as_str()))
            })
            .await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// Prints the audit entries `keep` selects as JSON lines, oldest first.
async fn print_audit(
    target: &StoreTarget,
    keep: impl Fn(&concord_store::AuditRow) -> bool,
) -> Result<()> {
    let store = open_store(target).await?;
    let mut after = 0;
    loop {
        let page = store.audit_rows(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in page.iter().filter(|row| keep(row)) {
            let data: serde_json::Value =
                serde_json::from_str(&row.data).unwrap_or(serde_json::Value::Null);
            println!(
                "{}",
                serde_json::json!({
                    "seq": row.seq, "at_ms": row.at_ms, "kind": row.kind,
                    "principal": row.principal, "data": data,
                    "prev_hash": row.prev_hash, "hash": row.hash,
                })
            );
        }
    }
    store.close().await;
    Ok(())
}

async fn up(args: UpArgs) -> Result<std::process::ExitCode> {
    let config = Config::load(&args.config)?;
    let listen = args.listen.or(config.node.listen).unwrap_or_else(|| {
        concord_config::DEFAULT_LISTEN
            .parse()
            .expect("valid default")
    });
    let data_dir = args
        .data_dir
        .or_else(|| config.node.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(".concord"));
    let node = concord_node::start(
        &config,
        concord_node::NodeOptions {
            listen,
            data_dir,
            store: args.store,
        },
    )
    .await?;
    println!("Concord node listening; MCP endpoint: {}", node.mcp_url());

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let ready = tokio::select! {
        ready = node.wait_ready() => Some(ready),
        _ = tokio::signal::ctrl_c() => None,
        _ = sigterm.recv() => None,
    };
    match ready {
        Some(Err(error)) => {
            node.shutdown().await;
            bail!(error);
        }
        Some(Ok(())) => {
            for server in node.gateway().status() {
                let detail = server
                    .reason
                    .clone()
                    .unwrap_or_else(|| format!("{} tools", server.tools));
                println!(
                    "  {:<20} {:<16} {:<10} {detail}",
                    server.name, server.transport, server.state
                );
            }
            println!(
                "Ready: {} tools. Press Ctrl-C to stop.",
                node.gateway().tool_count()
            );
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm.recv() => {}
            }
        }
        None => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn tools_list(target: Target) -> Result<std::process::ExitCode> {
    let client = NodeClient::connect_as(&target.url, target.token.as_deref()).await?;
    let tools = client.list_tools().await;
    client.close().await;
    let tools = tools?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&tools)?);
    } else {
        let width = tools
            .iter()
            .filter_map(|t| t["name"].as_str())
            .map(str::len)
            .max()
            .unwrap_or(4)
            .max(4);
        println!("{:<width$}  DESCRIPTION", "NAME");
        for tool in &tools {
            let name = tool["name"].as_str().unwrap_or_default();
            let description = tool["description"].as_str().unwrap_or_default();
            let first_line = description.lines().next().unwrap_or_default();
            println!("{name:<width$}  {}", truncate(first_line, 100));
        }
        println!("{} tools", tools.len());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

/// Parses `--arg key=value` pairs, reading values as JSON unless the tool's schema declares
/// the property a string.
fn parse_args(pairs: &[String], schema: Option<&Value>) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for pair in pairs {
        let Some((key, raw)) = pair.split_once('=') else {
            bail!("--arg {pair:?}: expected KEY=VALUE");
        };
        let declared_string = schema
            .and_then(|s| s["properties"][key]["type"].as_str())
            .is_some_and(|t| t == "string");
        let value = if declared_string {
            Value::String(raw.to_string())
        } else {
            serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
        };
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

async fn tools_call(name: &str, args: &[String], target: Target) -> Result<std::process::ExitCode> {
    let client = NodeClient::connect_as(&target.url, target.token.as_deref()).await?;
    let outcome = async {
        let tools = client.list_tools().await?;
        let schema = tools
            .iter()
            .find(|t| t["name"].as_str() == Some(name))
            .map(|t| t["inputSchema"].clone());
        let arguments =
            parse_args(args, schema.as_ref()).map_err(|e| ClientError::Other(e.to_string()))?;
        client.call_tool(name, arguments).await
    }
    .await;
    client.close().await;
    let result = match outcome {
        Ok(result) => result,
        Err(ClientError::Rpc { code, message, .. }) => {
            eprintln!("error {code}: {message}");
            return Ok(std::process::ExitCode::from(1));
        }
        Err(other) => return Err(other.into()),
    };
    let is_error = result["isError"].as_bool() == Some(true);
    if target.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        for item in result["content"].as_array().into_iter().flatten() {
            match item["type"].as_str() {
                Some("text") => println!("{}", item["text"].as_str().unwrap_or_default()),
                Some(kind @ ("image" | "audio")) => println!(
                    "[{kind}: {}, {} base64 bytes]",
                    item["mimeType"].as_str().unwrap_or("?"),
                    item["data"].as_str().map_or(0, str::len)
                ),
                _ => println!("{}", serde_json::to_string_pretty(item)?),
            }
        }
        if let Some(structured) = result.get("structuredContent") {
            println!("{}", serde_json::to_string_pretty(structured)?);
        }
    }
    Ok(if is_error {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn json_or_string(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

/// Calls a `concord__state_*` tool; a refusal (conflict, bad input) is printed and exits 1.
async fn state_tool(target: &Target, tool: &str, arguments: Value) -> Result<Result<Value, Value>> {
    let client = NodeClient::connect_as(&target.url, target.token.as_deref()).await?;
    let result = client
        .call_tool(
            &format!("concord__{tool}"),
            arguments.as_object().cloned().unwrap_or_default(),
        )
        .await;
    client.close().await;
    let result = result?;
    let structured = result["structuredContent"].clone();
    Ok(if result["isError"].as_bool() == Some(true) {
        Err(structured)
    } else {
        Ok(structured)
    })
}

fn print_outcome(outcome: Result<Value, Value>) -> Result<std::process::ExitCode> {
    match outcome {
        Ok(value) => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(refusal) => {
            eprintln!(
                "refused: {}",
                refusal["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| refusal.to_string())
            );
            if refusal["conflict"] == true {
                eprintln!(
                    "conflict: current version {}, current value {}",
                    refusal["current_version"], refusal["current_value"]
                );
            }
            Ok(std::process::ExitCode::from(1))
        }
    }
}

async fn state_command(command: StateCommand) -> Result<std::process::ExitCode> {
    match command {
        StateCommand::Get { key, target } => {
            print_outcome(state_tool(&target, "state_get", json!({"key": key})).await?)
        }
        StateCommand::Put {
            key,
            value,
            base,
            target,
        } => {
            let base = match base {
                Some(base) => base,
                None => match state_tool(&target, "state_get", json!({"key": key})).await? {
                    Ok(entry) => entry["version"].as_u64().unwrap_or(0),
                    Err(refusal) => return print_outcome(Err(refusal)),
                },
            };
            let arguments =
                json!({"key": key, "base_version": base, "value": json_or_string(&value)});
            print_outcome(state_tool(&target, "state_put", arguments).await?)
        }
        StateCommand::Propose {
            key,
            value,
            base,
            target,
        } => {
            let changes = json!([{"key": key, "base_version": base, "ops": [{"op": "set", "value": json_or_string(&value)}]}]);
            print_outcome(state_tool(&target, "state_propose", json!({"changes": changes})).await?)
        }
        StateCommand::Commit {
            proposal_id,
            target,
        } => print_outcome(
            state_tool(&target, "state_commit", json!({"proposal_id": proposal_id})).await?,
        ),
        StateCommand::Log { key, limit, target } => print_outcome(
            state_tool(
                &target,
                "state_history",
                json!({"key": key, "limit": limit}),
            )
            .await?,
        ),
        StateCommand::Watch {
            prefix,
            since,
            target,
        } => watch(&target.url, &prefix, since).await,
    }
}

/// Percent-encodes a query value (keys are ASCII; this covers the characters they allow).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// GET a node's REST API (`/api/v1/…`, beside its `/mcp`), with the token if one is given.
async fn rest_get(target: &Target, path_and_query: &str) -> Result<serde_json::Value> {
    let base = target.url.strip_suffix("/mcp").unwrap_or(&target.url);
    let mut request = reqwest::Client::new().get(format!("{base}{path_and_query}"));
    if let Some(token) = &target.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or(&body.to_string())
        );
    }
    Ok(body)
}

async fn tools_resolve(
    capability: &str,
    tags: &str,
    version: Option<String>,
    namespace: Option<String>,
    target: Target,
) -> Result<std::process::ExitCode> {
    let mut query = format!(
        "/api/v1/registry/resolve?capability={}&tags={}",
        encode(capability),
        encode(tags)
    );
    if let Some(version) = version {
        query.push_str(&format!("&version={}", encode(&version)));
    }
    if let Some(namespace) = namespace {
        query.push_str(&format!("&namespace={}", encode(&namespace)));
    }
    let resolution = rest_get(&target, &query).await?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&resolution)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    let candidates = resolution["candidates"].as_array().unwrap_or(&empty);
    for (rank, c) in candidates.iter().enumerate() {
        println!(
            "{}. {} {} (score {}, {}) — {}",
            rank + 1,
            c["name"].as_str().unwrap_or_default(),
            c["version"].as_str().unwrap_or_default(),
            c["score"],
            c["status"].as_str().unwrap_or_default(),
            join_reasons(&c["reasons"]),
        );
    }
    for r in resolution["rejected"].as_array().unwrap_or(&empty) {
        println!(
            "   rejected {} {} — {}",
            r["name"].as_str().unwrap_or_default(),
            r["version"].as_str().unwrap_or_default(),
            join_reasons(&r["reasons"]),
        );
    }
    for line in resolution["not_considered"].as_array().unwrap_or(&empty) {
        println!("   not considered: {}", line.as_str().unwrap_or_default());
    }
    Ok(if candidates.is_empty() {
        eprintln!("nothing satisfies the selector");
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn join_reasons(reasons: &serde_json::Value) -> String {
    reasons
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

async fn deps_show(name: &str, target: Target) -> Result<std::process::ExitCode> {
    let listed = rest_get(&target, "/api/v1/registry").await?;
    let entity = listed["entities"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no registered entity named {name}"))?;
    let dependencies = entity["dependencies"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if dependencies.is_empty() {
        println!("{name} declares no dependencies");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut unresolved = false;
    for (dependency, selector) in dependencies {
        let tags: Vec<String> = selector["tags"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut query = format!(
            "/api/v1/registry/resolve?capability={}&tags={}",
            encode(selector["capability"].as_str().unwrap_or_default()),
            encode(&tags.join(","))
        );
        if let Some(version) = selector["version"].as_str() {
            query.push_str(&format!("&version={}", encode(version)));
        }
        if let Some(namespace) = selector["namespace"].as_str() {
            query.push_str(&format!("&namespace={}", encode(namespace)));
        }
        let resolution = rest_get(&target, &query).await?;
        match resolution["candidates"].as_array().and_then(|c| c.first()) {
            Some(best) => println!(
                "{dependency}: {} {} (score {}, {}) — {}",
                best["name"].as_str().unwrap_or_default(),
                best["version"].as_str().unwrap_or_default(),
                best["score"],
                best["status"].as_str().unwrap_or_default(),
                join_reasons(&best["reasons"]),
            ),
            None => {
                unresolved = true;
                let mut why: Vec<String> = resolution["rejected"]
                    .as_array()
                    .map(|r| {
                        r.iter()
                            .map(|x| {
                                format!(
                                    "{} {}: {}",
                                    x["name"].as_str().unwrap_or_default(),
                                    x["version"].as_str().unwrap_or_default(),
                                    join_reasons(&x["reasons"])
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                why.extend(
                    resolution["not_considered"]
                        .as_array()
                        .map(|n| {
                            n.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default(),
                );
                println!("{dependency}: nothing resolves — {}", why.join("; "));
            }
        }
    }
    Ok(if unresolved {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

async fn costs(
    agent: Option<String>,
    model: Option<String>,
    since: Option<String>,
    target: Target,
) -> Result<std::process::ExitCode> {
    let mut query = Vec::new();
    for (key, value) in [("agent", agent), ("model", model), ("since", since)] {
        if let Some(value) = value {
            query.push(format!("{key}={}", encode(&value)));
        }
    }
    let usage = rest_get(&target, &format!("/api/v1/usage?{}", query.join("&"))).await?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&usage)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    // Totals by agent and model, then the grand total.
    #[derive(Default)]
    struct Spent {
        calls: u64,
        failed: u64,
        input: u64,
        output: u64,
        cost: f64,
    }
    let mut groups: std::collections::BTreeMap<(String, String), Spent> = Default::default();
    for record in usage["records"].as_array().cloned().unwrap_or_default() {
        let key = (
            record["agent"].as_str().unwrap_or_default().to_string(),
            format!(
                "{}/{}",
                record["provider"].as_str().unwrap_or_default(),
                record["model"].as_str().unwrap_or_default()
            ),
        );
        let spent = groups.entry(key).or_default();
        // The node's numbers, summed without overflow: a count past u64 stays at its maximum,
        // a cost that is not a finite amount is not added.
        spent.calls = spent.calls.saturating_add(1);
        spent.failed = spent
            .failed
            .saturating_add(u64::from(record.get("error").is_some_and(|e| !e.is_null())));
        spent.input = spent
            .input
            .saturating_add(record["input_tokens"].as_u64().unwrap_or(0));
        spent.output = spent
            .output
            .saturating_add(record["output_tokens"].as_u64().unwrap_or(0));
        let cost = record["cost_usd"].as_f64().unwrap_or(0.0);
        if cost.is_finite() && cost >= 0.0 {
            spent.cost += cost;
        }
    }
    println!("AGENT\tPROVIDER/MODEL\tCALLS\tFAILED\tINPUT\tOUTPUT\tCOST_USD");
    for ((agent, model), s) in &groups {
        println!(
            "{agent}\t{model}\t{}\t{}\t{}\t{}\t{:.6}",
            s.calls, s.failed, s.input, s.output, s.cost
        );
    }
    let totals = &usage["totals"];
    println!(
        "total\t\t{}\t{}\t{}\t{}\t{:.6}",
        totals["calls"],
        totals["failed"],
        totals["input_tokens"],
        totals["output_tokens"],
        totals["cost_usd"].as_f64().unwrap_or(0.0)
    );
    Ok(std::process::ExitCode::SUCCESS)
}

async fn agents_list(target: Target) -> Result<std::process::ExitCode> {
    let listed = rest_get(&target, "/api/v1/registry").await?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    println!("NAME\tVERSION\tKIND\tSTATUS\tUPTIME\tENDPOINT\tTAGS\tDEPENDENCIES");
    for e in listed["entities"].as_array().cloned().unwrap_or_default() {
        let endpoint = e["endpoint"]["url"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| e["endpoint"]["command"].to_string());
        let dependencies: Vec<String> = e["dependencies"]
            .as_object()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default();
        println!(
            "{}\t{}\t{}\t{}\t{}s\t{}\t{}\t{}",
            e["name"].as_str().unwrap_or_default(),
            e["version"].as_str().unwrap_or_default(),
            e["kind"].as_str().unwrap_or_default(),
            e["status"].as_str().unwrap_or_default(),
            e["uptime_seconds"],
            endpoint,
            e["tags"]
                .as_array()
                .map(|t| t
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            dependencies.join(","),
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Follows `/api/v1/state/changes` (Server-Sent Events, one per commit), printing one JSON line
/// per changed key.
async fn watch(mcp_url: &str, prefix: &str, since: u64) -> Result<std::process::ExitCode> {
    use futures::StreamExt;
    let base = mcp_url.strip_suffix("/mcp").unwrap_or(mcp_url);
    let response = reqwest::Client::new()
        .get(format!(
            "{base}/api/v1/state/changes?prefix={}&since={since}",
            encode(prefix)
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    if !response.status().is_success() {
        bail!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        buffer.push_str(&String::from_utf8_lossy(chunk.as_ref()));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                // One event per commit; one printed line per changed key.
                let commit: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                for change in commit["changes"].as_array().into_iter().flatten() {
                    println!("{change}");
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_follow_schema_then_json() {
        let schema =
            json!({"properties": {"message": {"type": "string"}, "n": {"type": "number"}}});
        let args = parse_args(
            &[
                "message=42".into(),
                "n=3".into(),
                "tags=[\"a\"]".into(),
                "free=hello".into(),
            ],
            Some(&schema),
        )
        .unwrap();
        assert_eq!(args["message"], json!("42"));
        assert_eq!(args["n"], json!(3));
        assert_eq!(args["tags"], json!(["a"]));
        assert_eq!(args["free"], json!("hello"));
        assert!(parse_args(&["novalue".into()], None).is_err());
    }
}
