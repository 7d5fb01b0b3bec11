//! Workflows over agents: a router (one agent picked by a rule, or by a router agent), parallel
//! fan-out/fan-in, orchestrator-workers over a task DAG, and an evaluator-optimizer loop. They
//! only need a way to run an agent on a task ([`AgentRunner`]); each is one call from outside.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

/// Runs one agent on one task; the answer, or why there is none.
pub trait AgentRunner: Send + Sync {
    fn run<'a>(&'a self, agent: &'a str, task: String) -> BoxFuture<'a, Result<String, String>>;
}

/// A worker agent of an orchestrator: what it can do and how many tasks it takes at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub agent: String,
    pub capabilities: Vec<String>,
    pub max_concurrency: usize,
}

/// One node of a task DAG.
#[derive(Debug, Clone, PartialEq)]
pub struct DagTask {
    pub id: String,
    /// Which workers may take it.
    pub capability: String,
    /// What to do; the results of its dependencies are appended as context.
    pub task: String,
    pub depends_on: Vec<String>,
}

/// A rule of a router: the first whose words all appear in the task picks its agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub contains: Vec<String>,
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Workflow {
    /// Rules first; if none matches, `router_agent` (if any) is asked to name one of
    /// `agents`; else `fallback`.
    Router {
        routes: Vec<Route>,
        router_agent: Option<String>,
        agents: Vec<String>,
        fallback: Option<String>,
    },
    /// Every agent gets the task at once; `combine` (if any) merges their answers.
    Parallel {
        agents: Vec<String>,
        combine: Option<String>,
    },
    /// The DAG runs in dependency order, each task on the least-loaded worker with its
    /// capability and a free slot.
    Orchestrator {
        workers: Vec<Worker>,
        tasks: Vec<DagTask>,
    },
    /// The generator answers, the evaluator judges (an answer starting with PASS accepts it);
    /// otherwise the feedback goes back to the generator, up to `max_rounds`.
    Evaluator {
        generator: String,
        evaluator: String,
        max_rounds: u32,
    },
}

/// What a workflow did: the final answer and each step (agent, task id or role, answer).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkflowReport {
    pub answer: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Step {
    pub agent: String,
    pub label: String,
    pub answer: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkflowError {
    #[error("{0}")]
    Invalid(String),
    #[error("agent {agent} failed at {label}: {error}")]
    Agent {
        agent: String,
        label: String,
        error: String,
    },
}

impl Workflow {
    /// Checks the shape before anything runs: known dependencies, no cycles, a worker for every
    /// capability.
    pub fn validate(&self) -> Result<(), WorkflowError> {
        let Workflow::Orchestrator { workers, tasks } = self else {
            return Ok(());
        };
        let ids: HashMap<&str, &DagTask> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
        if ids.len() != tasks.len() {
            return Err(WorkflowError::Invalid("two tasks share an id".into()));
        }
        for task in tasks {
            for dep in &task.depends_on {
                if !ids.contains_key(dep.as_str()) {
                    return Err(WorkflowError::Invalid(format!(
                        "task {} depends on unknown task {dep}",
                        task.id
                    )));
                }
            }
            if !workers
                .iter()
                .any(|w| w.capabilities.contains(&task.capability) && w.max_concurrency > 0)
            {
                return Err(WorkflowError::Invalid(format!(
                    "no worker has capability {} (task {})",
                    task.capability, task.id
                )));
            }
        }
        // Kahn's algorithm: every task must become ready.
        let mut waiting: HashMap<&str, usize> = tasks
            .iter()
            .map(|t| (t.id.as_str(), t.depends_on.len()))
            .collect();
        let mut ready: Vec<&str> = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        let mut done = 0;
        while let Some(id) = ready.pop() {
            done += 1;
            for task in tasks
                .iter()
                .filter(|t| t.depends_on.iter().any(|d| d == id))
            {
                let n = waiting.get_mut(task.id.as_str()).expect("known");
                *n -= 1;
                if *n == 0 {
                    ready.push(&task.id);
                }
            }
        }
        if done != tasks.len() {
            return Err(WorkflowError::Invalid(
                "the task dependencies form a cycle".into(),
            ));
        }
        Ok(())
    }

    pub async fn run(
        &self,
        task: &str,
        runner: &dyn AgentRunner,
    ) -> Result<WorkflowReport, WorkflowError> {
        self.validate()?;
        match self {
            Workflow::Router {
                routes,
                router_agent,
                agents,
                fallback,
            } => {
                route(
                    task,
                    routes,
                    router_agent.as_deref(),
                    agents,
                    fallback.as_deref(),
                    runner,
                )
                .await
            }
            Workflow::Parallel { agents, combine } => {
                parallel(task, agents, combine.as_deref(), runner).await
            }
            Workflow::Orchestrator { workers, tasks } => {
                orchestrate(task, workers, tasks, runner).await
            }
            Workflow::Evaluator {
                generator,
                evaluator,
                max_rounds,
            } => evaluate(task, generator, evaluator, *max_rounds, runner).await,
        }
    }
}

async fn ask(
    runner: &dyn AgentRunner,
    agent: &str,
    label: &str,
    task: String,
    steps: &mut Vec<Step>,
) -> Result<String, WorkflowError> {
    let answer = runner
        .run(agent, task)
        .await
        .map_err(|error| WorkflowError::Agent {
            agent: agent.to_string(),
            label: label.to_string(),
            error,
        })?;
    steps.push(Step {
        agent: agent.to_string(),
        label: label.to_string(),
        answer: answer.clone(),
    });
    Ok(answer)
}

async fn route(
    task: &str,
    routes: &[Route],
    router_agent: Option<&str>,
    agents: &[String],
    fallback: Option<&str>,
    runner: &dyn AgentRunner,
) -> Result<WorkflowReport, WorkflowError> {
    let mut steps = Vec::new();
    let lower = task.to_lowercase();
    let mut chosen = routes
        .iter()
        .find(|r| r.contains.iter().all(|w| lower.contains(&w.to_lowercase())))
        .map(|r| r.agent.clone());
    if chosen.is_none()
        && let Some(router) = router_agent
    {
        let question = format!(
            "Which one of these agents should handle the task below? Answer with only its name: {}.\n\nTask: {task}",
            agents.join(", ")
        );
        let pick = ask(runner, router, "route", question, &mut steps).await?;
        chosen = agents
            .iter()
            .find(|a| pick.to_lowercase().contains(&a.to_lowercase()))
            .cloned();
    }
    let agent = chosen
        .or_else(|| fallback.map(str::to_string))
        .ok_or_else(|| WorkflowError::Invalid("no route matches the task".into()))?;
    let answer = ask(runner, &agent, "answer", task.to_string(), &mut steps).await?;
    Ok(WorkflowReport { answer, steps })
}

async fn parallel(
    task: &str,
    agents: &[String],
    combine: Option<&str>,
    runner: &dyn AgentRunner,
) -> Result<WorkflowReport, WorkflowError> {
    let answers = futures::future::join_all(
        agents
            .iter()
            .map(|agent| async move { (agent, runner.run(agent, task.to_string()).await) }),
    )
    .await;
    let mut steps = Vec::new();
    for (agent, answer) in answers {
        let answer = answer.map_err(|error| WorkflowError::Agent {
            agent: agent.clone(),
            label: "fan-out".into(),
            error,
        })?;
        steps.push(Step {
            agent: agent.clone(),
            label: "fan-out".into(),
            answer,
        });
    }
    let joined = steps
        .iter()
        .map(|s| format!("[{}]\n{}", s.agent, s.answer))
        .collect::<Vec<_>>()
        .join("\n\n");
    let answer = match combine {
        Some(combiner) => {
            let question =
                format!("Combine these answers to the task into one.\n\nTask: {task}\n\n{joined}");
            ask(runner, combiner, "fan-in", question, &mut steps).await?
        }
        None => joined,
    };
    Ok(WorkflowReport { answer, steps })
}

async fn orchestrate(
    goal: &str,
    workers: &[Worker],
    tasks: &[DagTask],
    runner: &dyn AgentRunner,
) -> Result<WorkflowReport, WorkflowError> {
    let mut results: BTreeMap<String, String> = BTreeMap::new();
    let mut load: HashMap<&str, usize> = workers.iter().map(|w| (w.agent.as_str(), 0)).collect();
    let mut started: Vec<&str> = Vec::new();
    let mut steps = Vec::new();
    let mut running = FuturesUnordered::new();
    loop {
        // Start every ready task that has a worker with a free slot (least loaded first).
        for task in tasks {
            if started.contains(&task.id.as_str())
                || !task.depends_on.iter().all(|d| results.contains_key(d))
            {
                continue;
            }
            let worker = workers
                .iter()
                .filter(|w| w.capabilities.contains(&task.capability))
                .filter(|w| load[w.agent.as_str()] < w.max_concurrency)
                .min_by_key(|w| load[w.agent.as_str()]);
            let Some(worker) = worker else {
                continue;
            };
            *load.get_mut(worker.agent.as_str()).expect("known") += 1;
            started.push(&task.id);
            let mut prompt = format!("{}\n\nOverall goal: {goal}", task.task);
            for dep in &task.depends_on {
                prompt.push_str(&format!("\n\nResult of {dep}:\n{}", results[dep]));
            }
            let agent = worker.agent.as_str();
            running.push(async move { (task, agent, runner.run(agent, prompt).await) });
        }
        let Some((task, agent, answer)) = running.next().await else {
            break;
        };
        *load.get_mut(agent).expect("known") -= 1;
        let answer = answer.map_err(|error| WorkflowError::Agent {
            agent: agent.to_string(),
            label: task.id.clone(),
            error,
        })?;
        steps.push(Step {
            agent: agent.to_string(),
            label: task.id.clone(),
            answer: answer.clone(),
        });
        results.insert(task.id.clone(), answer);
    }
    // The answer is the result of the tasks nothing depends on, in DAG order.
    let finals: Vec<String> = tasks
        .iter()
        .filter(|t| !tasks.iter().any(|o| o.depends_on.contains(&t.id)))
        .map(|t| results.get(&t.id).cloned().unwrap_or_default())
        .collect();
    Ok(WorkflowReport {
        answer: finals.join("\n\n"),
        steps,
    })
}

async fn evaluate(
    task: &str,
    generator: &str,
    evaluator: &str,
    max_rounds: u32,
    runner: &dyn AgentRunner,
) -> Result<WorkflowReport, WorkflowError> {
    let mut steps = Vec::new();
    let mut prompt = task.to_string();
    let mut last = String::new();
    for round in 1..=max_rounds.max(1) {
        last = ask(
            runner,
            generator,
            &format!("draft {round}"),
            prompt.clone(),
            &mut steps,
        )
        .await?;
        let verdict = ask(
            runner,
            evaluator,
            &format!("review {round}"),
            format!("Evaluate this answer to the task. Start your reply with PASS or FAIL, then give feedback.\n\nTask: {task}\n\nAnswer:\n{last}"),
            &mut steps,
        )
        .await?;
        if verdict.trim_start().to_uppercase().starts_with("PASS") {
            return Ok(WorkflowReport {
                answer: last,
                steps,
            });
        }
        prompt = format!(
            "{task}\n\nYour previous answer:\n{last}\n\nReviewer feedback:\n{verdict}\n\nImprove the answer."
        );
    }
    Ok(WorkflowReport {
        answer: last,
        steps,
    })
}
