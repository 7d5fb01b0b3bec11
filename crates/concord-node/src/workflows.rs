//! Workflows from `[workflows.NAME]` (router, parallel, orchestrator-workers, evaluator-
//! optimizer over the configured agents), served as the tools `workflows__NAME`. Each agent step
//! runs like a direct call of that agent, on behalf of the workflow's caller.

use std::sync::Arc;

use concord_mcp::builtin::{BuiltinFuture, BuiltinOutcome, BuiltinTool, BuiltinTools, Caller};
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};

use crate::agents::{Agents, failure, task_tool};

/// The namespace workflows are exposed under (`workflows__NAME`).
pub const WORKFLOWS_NAMESPACE: &str = "workflows";

fn workflow_of(kind: &concord_config::WorkflowKind) -> concord_agents::workflow::Workflow {
    use concord_agents::workflow::{DagTask, Route, Worker, Workflow};
    use concord_config::WorkflowKind;
    match kind.clone() {
        WorkflowKind::Router {
            routes,
            router_agent,
            agents,
            fallback,
        } => Workflow::Router {
            routes: routes
                .into_iter()
                .map(|r| Route {
                    contains: r.contains,
                    agent: r.agent,
                })
                .collect(),
            router_agent,
            agents,
            fallback,
        },
        WorkflowKind::Parallel { agents, combine } => Workflow::Parallel { agents, combine },
        WorkflowKind::Orchestrator { workers, tasks } => Workflow::Orchestrator {
            workers: workers
                .into_iter()
                .map(|w| Worker {
                    agent: w.agent,
                    capabilities: w.capabilities,
                    max_concurrency: w.max_concurrency,
                })
                .collect(),
            tasks: tasks
                .into_iter()
                .map(|t| DagTask {
                    id: t.id,
                    capability: t.capability,
                    task: t.task,
                    depends_on: t.depends_on,
                })
                .collect(),
        },
        WorkflowKind::Evaluator {
            generator,
            evaluator,
            max_rounds,
        } => Workflow::Evaluator {
            generator,
            evaluator,
            max_rounds,
        },
    }
}

/// Runs the workflow's agents for one caller.
struct CallerRunner {
    agents: Arc<Agents>,
    caller: Caller,
}

impl concord_agents::workflow::AgentRunner for CallerRunner {
    fn run<'a>(&'a self, agent: &'a str, task: String) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let Some(settings) = self.agents.agents.iter().find(|a| a.name == agent).cloned()
            else {
                return Err(format!("unknown agent {agent}"));
            };
            let mut arguments = Map::new();
            arguments.insert("task".into(), Value::String(task));
            let outcome = self
                .agents
                .run_agent(&settings, arguments, self.caller.clone())
                .await;
            if outcome.is_error {
                Err(outcome.structured["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("ended with {}", outcome.structured["ending"])))
            } else {
                Ok(outcome.structured["answer"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string())
            }
        })
    }
}

/// The workflows as the gateway's `workflows__*` tools.
pub struct WorkflowTools {
    pub agents: Arc<Agents>,
    pub workflows: Vec<concord_config::WorkflowSettings>,
}

impl BuiltinTools for WorkflowTools {
    fn tools(&self) -> Vec<BuiltinTool> {
        self.workflows
            .iter()
            .map(|w| task_tool(&w.name, &w.description, "workflow", json!({})))
            .collect()
    }

    fn call(&self, name: &str, arguments: Map<String, Value>, caller: Caller) -> BuiltinFuture {
        let Some(settings) = self.workflows.iter().find(|w| w.name == name).cloned() else {
            let name = name.to_string();
            return Box::pin(async move { failure(format!("unknown workflow {name}")) });
        };
        let runner = CallerRunner {
            agents: self.agents.clone(),
            caller,
        };
        Box::pin(async move {
            let Some(task) = arguments.get("task").and_then(Value::as_str) else {
                return failure("missing argument: task (what the workflow should do)");
            };
            let workflow = workflow_of(&settings.kind);
            match workflow.run(task, &runner).await {
                Ok(report) => BuiltinOutcome {
                    structured: json!({"answer": report.answer, "steps": report.steps}),
                    is_error: false,
                },
                Err(e) => failure(e.to_string()),
            }
        })
    }
}
