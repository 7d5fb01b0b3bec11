use std::time::Instant;

use concord_llm::{
    Attempt, ChatRequest, ChatResponse, FinishReason, Message, ToolCall, ToolSpec, Usage,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// What the loop needs of a model: one turn, with every provider attempt it took.
pub trait ChatModel: Send + Sync {
    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, ModelTurn>;
}

pub struct ModelTurn {
    pub result: Result<ChatResponse, String>,
    pub attempts: Vec<Attempt>,
}

/// How a tool call went, as the model will be told.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolOutcome {
    Ok(String),
    /// The tool ran and reported an error (or the call was refused): the model reads it.
    Error(String),
}

/// A tool's answer and what it spent on models (a delegated agent's run), which counts
/// against the caller's budget.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolReply {
    pub outcome: ToolOutcome,
    pub usage: Usage,
    pub cost_usd: f64,
}

impl From<ToolOutcome> for ToolReply {
    fn from(outcome: ToolOutcome) -> Self {
        Self {
            outcome,
            usage: Usage::default(),
            cost_usd: 0.0,
        }
    }
}

/// The tools an agent may use.
pub trait ToolBox: Send + Sync {
    fn tools(&self) -> Vec<ToolSpec>;
    fn call<'a>(
        &'a self,
        name: &'a str,
        arguments: serde_json::Map<String, Value>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, ToolReply>;
}

/// Budgets a run shares with other calls (its caller's, kept by whoever admitted the run):
/// each model turn's spend is charged at once, and what is left bounds the next turn, so
/// concurrent runs of one caller cannot together overspend by more than their turns in flight.
pub trait SharedBudget: Send + Sync {
    /// Charges this run's own spend (zero to only ask) and says what is left.
    fn charge(&self, tokens: u64, cost_usd: f64) -> Left;
}

/// What a shared budget has left; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Left {
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
}

impl Left {
    fn exhausted(&self) -> Option<String> {
        if self.tokens == Some(0) {
            return Some("tokens (the caller's budget has none left)".into());
        }
        if self.cost_usd.is_some_and(|c| c <= 0.0) {
            return Some("cost (the caller's budget has none left)".into());
        }
        None
    }
}

/// Tool calls of one model turn that run at most, unless the agent says otherwise.
pub const DEFAULT_MAX_TOOL_CALLS_PER_TURN: usize = 16;
/// Tool calls of one turn that run at the same time at most, unless the agent says otherwise.
pub const DEFAULT_MAX_PARALLEL_TOOL_CALLS: usize = 4;

#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub instructions: String,
    pub max_iterations: u32,
    /// Tool calls of one model turn that run at most (0 counts as 1): a model may ask for any
    /// number, and each call past this one gets a tool error naming the limit instead.
    pub max_tool_calls_per_turn: usize,
    /// Tool calls of one turn that run at the same time at most (0 counts as 1).
    pub max_parallel_tool_calls: usize,
    pub output_schema: Option<Value>,
}

impl AgentSpec {
    /// An agent with the default tool-call limits and no output schema.
    pub fn new(
        name: impl Into<String>,
        instructions: impl Into<String>,
        max_iterations: u32,
    ) -> Self {
        Self {
            name: name.into(),
            instructions: instructions.into(),
            max_iterations,
            max_tool_calls_per_turn: DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            max_parallel_tool_calls: DEFAULT_MAX_PARALLEL_TOOL_CALLS,
            output_schema: None,
        }
    }
}

/// What one run may spend. Tokens and cost count every model attempt, failed ones included.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub tool_calls: Option<u64>,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ending {
    /// The model gave its final answer (valid against the output schema, if any).
    Answer,
    MaxIterations {
        limit: u32,
    },
    /// A budget ran out, or the model's answer was cut at its output token limit (then
    /// `budget` starts with "output tokens" and the report keeps the partial answer).
    BudgetExhausted {
        budget: String,
    },
    Cancelled,
    /// No provider could answer.
    ModelFailed {
        error: String,
    },
    /// The answer did not match the output schema, also after one more request.
    InvalidOutput {
        error: String,
    },
}

/// What happened, for the caller and the ledger.
#[derive(Debug, Clone)]
pub struct Report {
    pub ending: Ending,
    pub answer: String,
    pub structured: Option<Value>,
    pub iterations: u32,
    pub usage: Usage,
    pub cost_usd: f64,
    pub tool_calls: u64,
    pub attempts: Vec<Attempt>,
    /// The conversation including this run (to continue it later).
    pub transcript: Vec<Message>,
}

/// Progress the loop reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum LoopEvent {
    Iteration {
        number: u32,
        limit: u32,
    },
    ToolCall {
        name: String,
    },
    /// What the run has spent so far (after each model turn and each tool reply).
    Spent {
        tokens: u64,
        cost_usd: f64,
    },
}

struct Run {
    limits: Limits,
    usage: Usage,
    cost_usd: f64,
    tool_calls: u64,
    attempts: Vec<Attempt>,
    messages: Vec<Message>,
    iterations: u32,
}

impl Run {
    fn report(self, ending: Ending, answer: String, structured: Option<Value>) -> Report {
        Report {
            ending,
            answer,
            structured,
            iterations: self.iterations,
            usage: self.usage,
            cost_usd: self.cost_usd,
            tool_calls: self.tool_calls,
            attempts: self.attempts,
            transcript: self.messages,
        }
    }

    fn exhausted(&self) -> Option<String> {
        if let Some(max) = self.limits.tokens
            && self.usage.total() >= max
        {
            return Some(format!("tokens ({} of {max} used)", self.usage.total()));
        }
        if let Some(max) = self.limits.cost_usd
            && self.cost_usd >= max
        {
            return Some(format!("cost (${:.4} of ${max:.4} spent)", self.cost_usd));
        }
        if let Some(deadline) = self.limits.deadline
            && Instant::now() >= deadline
        {
            return Some("deadline".to_string());
        }
        None
    }
}

/// What a run works with: the model, the tools, the cancellation of the whole run, and where
/// progress goes.
pub struct LoopContext<'a> {
    pub model: &'a dyn ChatModel,
    pub tools: &'a dyn ToolBox,
    pub cancel: &'a CancellationToken,
    pub progress: &'a (dyn Fn(LoopEvent) + Send + Sync),
    /// The caller's budgets, charged as the run goes (none: only `limits` apply).
    pub shared: Option<&'a dyn SharedBudget>,
}

/// Runs the loop for `task`, after `history` (earlier turns of the same conversation).
pub async fn run(
    spec: &AgentSpec,
    task: &str,
    history: Vec<Message>,
    limits: Limits,
    context: LoopContext<'_>,
) -> Report {
    let LoopContext {
        model,
        tools,
        cancel,
        progress,
        shared,
    } = context;
    let tool_specs = tools.tools();
    let mut messages = Vec::with_capacity(history.len() + 2);
    if history.first().map(|m| m.role) != Some(concord_llm::Role::System) {
        messages.push(Message::system(system_prompt(spec)));
    }
    messages.extend(history);
    messages.push(Message::user(task));
    let mut run = Run {
        limits,
        usage: Usage::default(),
        cost_usd: 0.0,
        tool_calls: 0,
        attempts: Vec::new(),
        messages,
        iterations: 0,
    };
    let mut reasked = false;
    let mut nudged = false;
    loop {
        // What the caller's budget has left now, other calls' spending included.
        let left = shared.map(|s| s.charge(0, 0.0)).unwrap_or_default();
        if let Some(budget) = run.exhausted().or_else(|| left.exhausted()) {
            return run.report(Ending::BudgetExhausted { budget }, String::new(), None);
        }
        if run.iterations >= spec.max_iterations {
            let limit = spec.max_iterations;
            return run.report(Ending::MaxIterations { limit }, String::new(), None);
        }
        run.iterations += 1;
        progress(LoopEvent::Iteration {
            number: run.iterations,
            limit: spec.max_iterations,
        });
        // With a token budget the model may write at most what is left of it: a turn can still
        // overshoot, but only by its prompt.
        let own_left = run
            .limits
            .tokens
            .map(|max| max.saturating_sub(run.usage.total()));
        let max_tokens = [own_left, left.tokens]
            .into_iter()
            .flatten()
            .min()
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let request = ChatRequest {
            messages: run.messages.clone(),
            tools: tool_specs.clone(),
            max_tokens,
            temperature: None,
        };
        // Cancellation wins over an answer that arrives at the same moment.
        let turn = tokio::select! {
            biased;
            _ = cancel.cancelled() => return run.report(Ending::Cancelled, String::new(), None),
            turn = model.chat(&request, run.limits.deadline) => turn,
        };
        let mut turn_usage = Usage::default();
        let mut turn_cost = 0.0;
        for attempt in &turn.attempts {
            turn_usage.add(attempt.usage);
            turn_cost += attempt.cost_usd;
        }
        run.usage.add(turn_usage);
        run.cost_usd += turn_cost;
        if let Some(shared) = shared {
            shared.charge(turn_usage.total(), turn_cost);
        }
        run.attempts.extend(turn.attempts);
        progress(LoopEvent::Spent {
            tokens: run.usage.total(),
            cost_usd: run.cost_usd,
        });
        let response = match turn.result {
            Ok(response) => response,
            Err(error) => return run.report(Ending::ModelFailed { error }, String::new(), None),
        };
        let calls = response.message.tool_calls.clone();
        run.messages.push(response.message.clone());
        if calls.is_empty() && response.finish == FinishReason::Length {
            // The answer was cut at the output token limit (what the budget had left, or the
            // provider's own): what came is kept, but it is not a complete answer.
            return run.report(
                Ending::BudgetExhausted {
                    budget: "output tokens (the answer was cut at the output limit)".into(),
                },
                response.message.content,
                None,
            );
        }
        if calls.is_empty() && response.message.content.trim().is_empty() && !nudged {
            // Small models sometimes stop with nothing to say after a tool result: ask once.
            nudged = true;
            run.messages.push(Message::user(
                "Your last reply was empty. Answer the original request now, in one short sentence.",
            ));
            continue;
        }
        if calls.is_empty() {
            let answer = response.message.content;
            let Some(schema) = &spec.output_schema else {
                return run.report(Ending::Answer, answer, None);
            };
            match check_output(schema, &answer) {
                Ok(value) => return run.report(Ending::Answer, answer, Some(value)),
                Err(error) if !reasked => {
                    reasked = true;
                    run.messages.push(Message::user(format!(
                        "Your answer is not valid: {error}. Reply again with only a JSON value that matches this JSON Schema: {schema}"
                    )));
                    continue;
                }
                Err(error) => {
                    return run.report(Ending::InvalidOutput { error }, answer, None);
                }
            }
        }
        // At most `per_turn` of the calls run, at most `parallel` at a time; every call gets an
        // answer, in the order they were asked for.
        let per_turn = spec.max_tool_calls_per_turn.max(1);
        let parallel = spec.max_parallel_tool_calls.max(1);
        let mut answers: Vec<Option<String>> = vec![None; calls.len()];
        let mut jobs = Vec::new();
        // The tool-call budget ran out before this call: the ones before it run, then the run ends.
        let mut out_of_calls = None;
        for (index, call) in calls.iter().enumerate() {
            if index >= per_turn {
                answers[index] = Some(format!(
                    "Error: not run: at most {per_turn} tool calls run per turn and this turn asked for {}; ask for this call again in a later turn if you still need it",
                    calls.len()
                ));
                continue;
            }
            match prepare_call(&tool_specs, call) {
                Err(error) => answers[index] = Some(format!("Error: {error}")),
                Ok(arguments) => {
                    if let Some(max) = run.limits.tool_calls
                        && run.tool_calls.saturating_add(jobs.len() as u64) >= max
                    {
                        out_of_calls = Some((index, max));
                        break;
                    }
                    jobs.push((index, arguments));
                }
            }
        }
        let running = futures::stream::iter(jobs.into_iter().map(|(index, arguments)| {
            let call = &calls[index];
            async move {
                progress(LoopEvent::ToolCall {
                    name: call.name.clone(),
                });
                (index, tools.call(&call.name, arguments, cancel).await)
            }
        }))
        .buffer_unordered(parallel);
        let mut running = std::pin::pin!(running);
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => return run.report(Ending::Cancelled, String::new(), None),
                next = running.next() => next,
            };
            let Some((index, reply)) = next else {
                break;
            };
            run.tool_calls += 1;
            if reply.usage.total() > 0 || reply.cost_usd > 0.0 {
                run.usage.add(reply.usage);
                run.cost_usd += reply.cost_usd;
                progress(LoopEvent::Spent {
                    tokens: run.usage.total(),
                    cost_usd: run.cost_usd,
                });
            }
            answers[index] = Some(match reply.outcome {
                ToolOutcome::Ok(text) => text,
                ToolOutcome::Error(text) => format!("Error: {text}"),
            });
        }
        let answered = out_of_calls.map_or(calls.len(), |(index, _)| index);
        for (call, answer) in calls.iter().zip(answers).take(answered) {
            if let Some(text) = answer {
                run.messages.push(Message::tool_result(call, text));
            }
        }
        if let Some((_, max)) = out_of_calls {
            return run.report(
                Ending::BudgetExhausted {
                    budget: format!("tool calls ({max})"),
                },
                String::new(),
                None,
            );
        }
    }
}

fn system_prompt(spec: &AgentSpec) -> String {
    let mut prompt = spec.instructions.clone();
    if spec.output_schema.is_some() {
        prompt.push_str(
            "\n\nWhen you give your final answer, reply with only a JSON value matching the required schema.",
        );
    }
    prompt
}

/// The arguments of one call the model asked for, or why it cannot run (an unknown tool,
/// arguments that are not a JSON object), as the model will be told.
fn prepare_call(
    specs: &[ToolSpec],
    call: &ToolCall,
) -> Result<serde_json::Map<String, Value>, String> {
    if !specs.iter().any(|s| s.name == call.name) {
        let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(format!(
            "there is no tool named {:?}; the tools are: {}",
            call.name,
            known.join(", ")
        ));
    }
    if call.arguments.trim().is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "the arguments of {} must be a JSON object, not {other}",
            call.name
        )),
        Err(e) => Err(format!(
            "the arguments of {} are not valid JSON ({e}): {}",
            call.name, call.arguments
        )),
    }
}

/// The answer as JSON valid against `schema` (a ```json fence around it is tolerated).
fn check_output(schema: &Value, answer: &str) -> Result<Value, String> {
    let trimmed = answer.trim();
    let body = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed)
        .trim();
    let value: Value = serde_json::from_str(body).map_err(|e| format!("it is not JSON ({e})"))?;
    let validator = jsonschema::validator_for(schema)
        .map_err(|e| format!("the output schema itself is invalid: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_is_checked_against_the_schema() {
        let schema =
            json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
        assert_eq!(
            check_output(&schema, "{\"n\": 3}").unwrap(),
            json!({"n": 3})
        );
        assert_eq!(
            check_output(&schema, "```json\n{\"n\": 4}\n```").unwrap(),
            json!({"n": 4})
        );
        assert!(
            check_output(&schema, "three")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(
            check_output(&schema, "{\"n\": \"x\"}")
                .unwrap_err()
                .contains("/n")
        );
    }
}
