//! A model that asks for 1,000 tool calls in one turn (a scripted fake model: the provider
//! adapters already refuse more than 128 calls in one answer, a `ChatModel` need not). At most
//! the agent's per-turn limit run, never more than its parallel limit at once (counted in flight
//! by the tool itself, which holds its first calls until that many are running together, so the
//! overlap is proven rather than hoped for), every other call is answered with a tool error
//! naming the limit, and the run goes on to end normally.

use std::sync::Mutex;
use std::time::Duration;

use concord_agents::{
    AgentSpec, ChatModel, Ending, Limits, LoopContext, ModelTurn, ToolBox, ToolOutcome, ToolReply,
    run,
};
use concord_llm::{ChatRequest, ChatResponse, FinishReason, Message, ToolCall, ToolSpec, Usage};
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

/// How long a test waits before calling a run hung. It only decides failure, never success.
const DEADLINE: Duration = Duration::from_secs(60);
/// Tool calls the model asks for in its first turn.
const ASKED: usize = 1_000;

/// Asks for `ASKED` calls of `probe` in its first turn, then answers "done".
#[derive(Default)]
struct Flood {
    requests: Mutex<Vec<ChatRequest>>,
}

impl ChatModel for Flood {
    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        _deadline: Option<std::time::Instant>,
    ) -> BoxFuture<'a, ModelTurn> {
        Box::pin(async move {
            let turn = {
                let mut requests = self.requests.lock().unwrap();
                requests.push(request.clone());
                requests.len()
            };
            let message = if turn == 1 {
                let calls = (0..ASKED)
                    .map(|n| ToolCall {
                        id: format!("call_{n}"),
                        name: "probe".into(),
                        arguments: json!({"n": n}).to_string(),
                    })
                    .collect();
                Message::assistant_with_calls("", calls)
            } else {
                Message::assistant("done")
            };
            let finish = if turn == 1 {
                FinishReason::ToolCalls
            } else {
                FinishReason::Stop
            };
            ModelTurn {
                result: Ok(ChatResponse {
                    message,
                    finish,
                    usage: Usage::default(),
                    model: "flood".into(),
                }),
                attempts: Vec::new(),
            }
        })
    }
}

/// Counts its calls in flight; no call finishes before `wave` were in flight at once (after
/// that, calls finish freely).
struct Probe {
    ran: Mutex<Vec<u64>>,
    in_flight: Mutex<usize>,
    peak: Mutex<usize>,
    wave: usize,
    gate: tokio::sync::watch::Sender<bool>,
}

impl Probe {
    fn holding_until(wave: usize) -> Self {
        Self {
            ran: Mutex::default(),
            in_flight: Mutex::new(0),
            peak: Mutex::new(0),
            wave,
            gate: tokio::sync::watch::Sender::new(false),
        }
    }

    fn peak(&self) -> usize {
        *self.peak.lock().unwrap()
    }
}

impl ToolBox for Probe {
    fn tools(&self) -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "probe".into(),
            description: "Counts".into(),
            parameters: json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
        }]
    }

    fn call<'a>(
        &'a self,
        _name: &'a str,
        arguments: Map<String, Value>,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, ToolReply> {
        Box::pin(async move {
            let n = arguments["n"].as_u64().unwrap();
            self.ran.lock().unwrap().push(n);
            {
                let mut in_flight = self.in_flight.lock().unwrap();
                *in_flight += 1;
                let mut peak = self.peak.lock().unwrap();
                *peak = (*peak).max(*in_flight);
                if *in_flight >= self.wave {
                    self.gate.send_replace(true);
                }
            }
            let mut open = self.gate.subscribe();
            let _ = open.wait_for(|open| *open).await;
            *self.in_flight.lock().unwrap() -= 1;
            ToolOutcome::Ok(format!("probe {n}")).into()
        })
    }
}

fn quiet(_: concord_agents::LoopEvent) {}

async fn flood(spec: &AgentSpec, probe: &Probe, limits: Limits) -> (concord_agents::Report, Flood) {
    let model = Flood::default();
    let report = tokio::time::timeout(
        DEADLINE,
        run(
            spec,
            "probe everything",
            Vec::new(),
            limits,
            LoopContext {
                model: &model,
                tools: probe,
                cancel: &CancellationToken::new(),
                progress: &quiet,
                shared: None,
            },
        ),
    )
    .await
    .expect("the run hung");
    (report, model)
}

/// What the model was told about each of its calls, in the order it asked for them.
fn tool_answers(request: &ChatRequest) -> Vec<(String, String)> {
    request
        .messages
        .iter()
        .filter(|m| m.role == concord_llm::Role::Tool)
        .map(|m| {
            (
                m.tool_call_id.clone().unwrap_or_default(),
                m.content.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_thousand_tool_calls_in_one_turn_run_sixteen_four_at_a_time() {
    let spec = AgentSpec::new("flood", "Probe.", 3);
    assert_eq!(
        (spec.max_tool_calls_per_turn, spec.max_parallel_tool_calls),
        (16, 4),
        "the defaults"
    );
    let probe = Probe::holding_until(4);
    let (report, model) = flood(&spec, &probe, Limits::default()).await;
    assert_eq!(report.ending, Ending::Answer, "{report:?}");
    assert_eq!(report.answer, "done");
    assert_eq!((report.iterations, report.tool_calls), (2, 16));
    let mut ran = probe.ran.lock().unwrap().clone();
    ran.sort_unstable();
    assert_eq!(
        ran,
        (0..16).collect::<Vec<u64>>(),
        "the first 16 asked for ran"
    );
    assert_eq!(probe.peak(), 4, "four at a time, never more");

    // Every call was answered, in the order asked: the first 16 with their results, the rest
    // with the limit.
    let requests = model.requests.lock().unwrap();
    let answers = tool_answers(&requests[1]);
    assert_eq!(answers.len(), ASKED);
    for (n, (id, text)) in answers.iter().enumerate() {
        assert_eq!(id, &format!("call_{n}"));
        if n < 16 {
            assert_eq!(text, &format!("probe {n}"));
        } else {
            assert!(
                text.starts_with("Error: not run: at most 16 tool calls run per turn")
                    && text.contains("asked for 1000"),
                "{n}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn configured_limits_apply_and_the_tool_call_budget_still_ends_the_run() {
    // One at a time, up to 100 per turn: no overlap at all.
    let spec = AgentSpec {
        max_tool_calls_per_turn: 100,
        max_parallel_tool_calls: 1,
        ..AgentSpec::new("flood", "Probe.", 3)
    };
    let probe = Probe::holding_until(1);
    let (report, _) = flood(&spec, &probe, Limits::default()).await;
    assert_eq!(report.ending, Ending::Answer, "{report:?}");
    assert_eq!(report.tool_calls, 100);
    assert_eq!(probe.peak(), 1);
    assert_eq!(
        *probe.ran.lock().unwrap(),
        (0..100).collect::<Vec<u64>>(),
        "one at a time, in order"
    );

    // A budget of 6 tool calls ends the run after 6, however many the turn allows.
    let probe = Probe::holding_until(4);
    let limits = Limits {
        tool_calls: Some(6),
        ..Limits::default()
    };
    let (report, _) = flood(&AgentSpec::new("flood", "Probe.", 3), &probe, limits).await;
    assert_eq!(
        report.ending,
        Ending::BudgetExhausted {
            budget: "tool calls (6)".into()
        }
    );
    assert_eq!(report.tool_calls, 6);
    assert_eq!(probe.ran.lock().unwrap().len(), 6);
    assert!(probe.peak() <= 4);
}
