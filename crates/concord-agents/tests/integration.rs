//! The agentic loop against a scripted OpenAI-compatible server that speaks the real wire
//! format (JSON completions and streamed chunks with tool calls and usage, errors), through the
//! real provider adapter: multi-step tool use, an unknown tool, malformed arguments, the
//! iteration limit, budgets running out mid-loop, cancellation mid-loop (signalled by the fake
//! model and tool themselves, never by a timer), an answer cut at the output limit, and
//! structured output asked again once.

/// A model that asks for 1,000 tool calls in one turn: the per-turn and parallel limits.
mod tool_flood;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use concord_agents::{
    AgentSpec, Ending, Limits, LoopContext, LoopEvent, ProviderChain, ToolBox, ToolOutcome,
    ToolReply, run,
};
use concord_llm::{Api, Provider, ProviderConfig, ToolSpec};
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One scripted answer of the fake model.
#[derive(Clone)]
enum Turn {
    /// A non-streamed completion that calls one tool.
    Call(&'static str, &'static str),
    /// The same, streamed in chunks (arguments split across chunks).
    StreamedCall(&'static str, &'static str),
    /// A final text answer.
    Say(&'static str),
    /// A text answer cut at the output limit (`finish_reason: "length"`).
    Cut(&'static str),
    /// The same, streamed.
    StreamedCut(&'static str),
    /// Never answers (until the client gives up).
    Hang,
}

#[derive(Clone, Default)]
struct Script {
    turns: Arc<Mutex<VecDeque<Turn>>>,
    /// Every request body the server received.
    requests: Arc<Mutex<Vec<Value>>>,
    repeat_last: bool,
    /// Signalled when a request has arrived (and been recorded).
    arrived: Arc<Notify>,
    /// Signalled when a `Hang` answer was abandoned: the client went away before it was sent.
    abandoned: Arc<Notify>,
}

fn completion(message: Value, finish: &str) -> Value {
    json!({"id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "scripted",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})
}

fn sse(chunks: &[Value]) -> String {
    let mut out = String::new();
    for chunk in chunks {
        out.push_str(&format!("data: {chunk}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

/// Notifies when dropped: a handler future dropped before it finished was abandoned.
struct OnDrop(Arc<Notify>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// The chunks of a streamed text answer, ending with `finish`.
fn streamed_text(text: &str, finish: &str) -> String {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "model": "scripted",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let (head, tail) = text.split_at(text.len() / 2);
    sse(&[
        chunk(json!({"role": "assistant", "content": head}), Value::Null),
        chunk(json!({"content": tail}), Value::Null),
        chunk(json!({}), json!(finish)),
        json!({"id": "c", "object": "chat.completion.chunk", "model": "scripted", "choices": [],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}),
    ])
}

async fn answer(script: Script, body: Value) -> Response {
    script.requests.lock().unwrap().push(body);
    script.arrived.notify_one();
    let turn = {
        let mut turns = script.turns.lock().unwrap();
        if script.repeat_last && turns.len() == 1 {
            turns.front().cloned()
        } else {
            turns.pop_front()
        }
    };
    match turn {
        None => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response(),
        Some(Turn::Say(text)) => axum::Json(completion(json!({"role": "assistant", "content": text}), "stop")).into_response(),
        Some(Turn::Cut(text)) => axum::Json(completion(json!({"role": "assistant", "content": text}), "length")).into_response(),
        Some(Turn::StreamedCut(text)) => {
            ([("content-type", "text/event-stream")], streamed_text(text, "length")).into_response()
        }
        Some(Turn::Call(name, arguments)) => axum::Json(completion(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": format!("call_{name}"), "type": "function", "function": {"name": name, "arguments": arguments}}]}),
            "tool_calls",
        ))
        .into_response(),
        Some(Turn::StreamedCall(name, arguments)) => {
            let (head, tail) = arguments.split_at(arguments.len() / 2);
            let chunk = |delta: Value, finish: Value| json!({"id": "c", "object": "chat.completion.chunk", "model": "scripted",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            let body = sse(&[
                chunk(json!({"role": "assistant", "tool_calls": [{"index": 0, "id": format!("call_{name}"), "type": "function", "function": {"name": name, "arguments": head}}]}), Value::Null),
                chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": tail}}]}), Value::Null),
                chunk(json!({}), json!("tool_calls")),
                json!({"id": "c", "object": "chat.completion.chunk", "model": "scripted", "choices": [],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}),
            ]);
            ([("content-type", "text/event-stream")], body).into_response()
        }
        Some(Turn::Hang) => {
            // Never finishes: it can only be dropped, when the client abandons the request.
            let _abandoned = OnDrop(script.abandoned.clone());
            std::future::pending::<Response>().await
        }
    }
}

async fn scripted(turns: Vec<Turn>, stream: bool, repeat_last: bool) -> (ProviderChain, Script) {
    let script = Script {
        turns: Arc::new(Mutex::new(turns.into())),
        repeat_last,
        ..Script::default()
    };
    let handler_script = script.clone();
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move |axum::Json(body): axum::Json<Value>| answer(handler_script.clone(), body)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let provider = Provider::new(ProviderConfig {
        name: "scripted".into(),
        api: Api::OpenAi,
        base_url: format!("http://{address}/v1"),
        model: "scripted".into(),
        api_key: None,
        timeout: Duration::from_secs(30),
        stream,
        price_input: 1.0,
        price_output: 2.0,
        default_max_tokens: 512,
        temperature: None,
    })
    .unwrap();
    (ProviderChain(vec![Arc::new(provider)]), script)
}

/// Files in memory; `read_file` reads one. `wait` never answers until cancelled.
#[derive(Default)]
struct Files {
    calls: Mutex<Vec<(String, Value)>>,
    cancelled: Mutex<bool>,
    /// Signalled when a `wait` call has started.
    waiting: Notify,
    /// Set when a `wait` call stopped, by finishing or by being dropped mid-call.
    wait_stopped: AtomicBool,
}

/// Marks a `wait` call stopped, however it stops.
struct WaitGuard<'a>(&'a Files);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.wait_stopped.store(true, Ordering::SeqCst);
    }
}

impl ToolBox for Files {
    fn tools(&self) -> Vec<ToolSpec> {
        vec![
            ToolSpec {
                name: "read_file".into(),
                description: "Reads a file".into(),
                parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
            },
            ToolSpec {
                name: "delegate".into(),
                description: "Asks a sub-agent".into(),
                parameters: json!({"type": "object"}),
            },
            ToolSpec {
                name: "wait".into(),
                description: "Waits".into(),
                parameters: json!({"type": "object"}),
            },
        ]
    }

    fn call<'a>(
        &'a self,
        name: &'a str,
        arguments: Map<String, Value>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, ToolReply> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push((name.to_string(), Value::Object(arguments.clone())));
            if name == "delegate" {
                // A delegated agent that spent 1000 tokens and $0.01 on its own model calls.
                return ToolReply {
                    outcome: ToolOutcome::Ok("the sub-agent's answer".into()),
                    usage: concord_llm::Usage {
                        input_tokens: 900,
                        output_tokens: 100,
                    },
                    cost_usd: 0.01,
                };
            }
            let outcome = match name {
                "read_file" => match arguments.get("path").and_then(Value::as_str) {
                    Some("a.txt") => ToolOutcome::Ok("alpha".into()),
                    Some("b.txt") => ToolOutcome::Ok("beta".into()),
                    other => ToolOutcome::Error(format!("no such file {other:?}")),
                },
                _ => {
                    let _stopped = WaitGuard(self);
                    self.waiting.notify_one();
                    cancel.cancelled().await;
                    *self.cancelled.lock().unwrap() = true;
                    ToolOutcome::Error("cancelled".into())
                }
            };
            outcome.into()
        })
    }
}

fn agent(max_iterations: u32, output_schema: Option<Value>) -> AgentSpec {
    AgentSpec {
        output_schema,
        ..AgentSpec::new(
            "reader",
            "Read files with read_file, then answer in one sentence.",
            max_iterations,
        )
    }
}

fn quiet(_: LoopEvent) {}

/// One run with no earlier conversation and no progress listener.
async fn run_quietly(
    spec: &AgentSpec,
    task: &str,
    model: &ProviderChain,
    tools: &dyn ToolBox,
    limits: Limits,
    cancel: &CancellationToken,
) -> concord_agents::Report {
    let context = LoopContext {
        model,
        tools,
        cancel,
        progress: &quiet,
        shared: None,
    };
    run(spec, task, Vec::new(), limits, context).await
}

/// What each request asked as `max_tokens`, in order.
fn asked_max_tokens(script: &Script) -> Vec<Value> {
    script
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["max_tokens"].clone())
        .collect()
}

/// A model that asks to read a.txt every turn, for as long as it is asked.
async fn endless_reader() -> (ProviderChain, Script) {
    scripted(
        vec![Turn::Call("read_file", r#"{"path": "a.txt"}"#)],
        false,
        true,
    )
    .await
}

fn tool_messages(request: &Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn multi_step_tool_use_with_streamed_and_plain_turns() {
    let (model, script) = scripted(
        vec![
            Turn::Call("read_file", r#"{"path": "a.txt"}"#),
            Turn::StreamedCall("read_file", r#"{"path": "b.txt"}"#),
            Turn::Say("The files say alpha and beta."),
        ],
        false,
        false,
    )
    .await;
    let files = Files::default();
    let events = Mutex::new(Vec::new());
    let record = |e| events.lock().unwrap().push(e);
    let report = run(
        &agent(5, None),
        "What do a.txt and b.txt say?",
        Vec::new(),
        Limits::default(),
        LoopContext {
            model: &model,
            tools: &files,
            cancel: &CancellationToken::new(),
            progress: &record,
            shared: None,
        },
    )
    .await;
    assert_eq!(report.ending, Ending::Answer, "{report:?}");
    assert_eq!(report.answer, "The files say alpha and beta.");
    assert_eq!((report.iterations, report.tool_calls), (3, 2));
    assert_eq!(report.usage.input_tokens, 300);
    assert!((report.cost_usd - (300.0 * 1.0 + 60.0 * 2.0) / 1e6).abs() < 1e-12);
    let requests = script.requests.lock().unwrap();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0]["tools"][0]["function"]["name"], "read_file");
    assert_eq!(requests[0]["messages"][0]["role"], "system");
    assert_eq!(tool_messages(&requests[2]), vec!["alpha", "beta"]);
    assert_eq!(
        files
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.1["path"].clone())
            .collect::<Vec<_>>(),
        vec![json!("a.txt"), json!("b.txt")]
    );
    let events = events.lock().unwrap();
    assert_eq!(
        events[0],
        LoopEvent::Iteration {
            number: 1,
            limit: 5
        }
    );
    assert!(events.contains(&LoopEvent::ToolCall {
        name: "read_file".into()
    }));
}

#[tokio::test]
async fn unknown_tools_and_malformed_arguments_go_back_to_the_model() {
    let (model, script) = scripted(
        vec![
            Turn::Call("delete_everything", "{}"),
            Turn::Call("read_file", r#"{"path": "a.t"#),
            Turn::Call("read_file", r#"["a.txt"]"#),
            Turn::Say("I could not do it."),
        ],
        true,
        false,
    )
    .await;
    let files = Files::default();
    let report = run_quietly(
        &agent(6, None),
        "go",
        &model,
        &files,
        Limits::default(),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.ending, Ending::Answer);
    assert_eq!(report.tool_calls, 0, "nothing ran");
    assert!(files.calls.lock().unwrap().is_empty());
    let requests = script.requests.lock().unwrap();
    let told = tool_messages(&requests[3]);
    assert!(
        told[0].contains("there is no tool named \"delete_everything\"")
            && told[0].contains("read_file, delegate, wait"),
        "{told:?}"
    );
    assert!(told[1].contains("are not valid JSON"), "{told:?}");
    assert!(told[2].contains("must be a JSON object"), "{told:?}");
}

#[tokio::test]
async fn the_iteration_limit_ends_the_loop() {
    let (model, script) = endless_reader().await;
    let report = run_quietly(
        &agent(3, None),
        "loop",
        &model,
        &Files::default(),
        Limits::default(),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.ending, Ending::MaxIterations { limit: 3 });
    assert_eq!(script.requests.lock().unwrap().len(), 3);
    assert_eq!(report.tool_calls, 3);
}

#[tokio::test]
async fn budgets_running_out_mid_loop_stop_it() {
    // Each turn uses 120 tokens: the third would start past 250.
    let (model, script) = endless_reader().await;
    let limits = Limits {
        tokens: Some(250),
        ..Limits::default()
    };
    let report = run_quietly(
        &agent(10, None),
        "spend",
        &model,
        &Files::default(),
        limits,
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&report.ending, Ending::BudgetExhausted { budget } if budget.starts_with("tokens (360 of 250")),
        "{:?}",
        report.ending
    );
    // Each turn may write at most what is left of the budget (capped by the provider's own
    // max_tokens, 512 here).
    let asked = asked_max_tokens(&script);
    assert_eq!(asked, vec![json!(250), json!(130), json!(10)]);

    let (model, script) = endless_reader().await;
    let limits = Limits {
        tool_calls: Some(2),
        ..Limits::default()
    };
    let files = Files::default();
    let report = run_quietly(
        &agent(10, None),
        "spend",
        &model,
        &files,
        limits,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(
        report.ending,
        Ending::BudgetExhausted {
            budget: "tool calls (2)".into()
        }
    );
    assert_eq!(
        files.calls.lock().unwrap().len(),
        2,
        "the third call was refused before it ran"
    );
    assert!(
        script.requests.lock().unwrap()[0]
            .get("max_tokens")
            .is_none(),
        "no token budget: the model's own limit applies"
    );
}

#[tokio::test]
async fn cancellation_during_a_tool_call_stops_the_run_and_the_call() {
    let (model, script) = scripted(
        vec![Turn::Call("wait", "{}"), Turn::Say("never")],
        false,
        false,
    )
    .await;
    let files = Arc::new(Files::default());
    let cancel = CancellationToken::new();
    // Cancel once the tool call is in flight, as the tool itself reports.
    let (trigger, started) = (cancel.clone(), files.clone());
    let canceller = tokio::spawn(async move {
        started.waiting.notified().await;
        trigger.cancel();
    });
    let report = run_quietly(
        &agent(5, None),
        "wait",
        &model,
        &*files,
        Limits::default(),
        &cancel,
    )
    .await;
    canceller.await.unwrap();
    assert_eq!(report.ending, Ending::Cancelled, "{report:?}");
    assert_eq!(
        files.calls.lock().unwrap().clone(),
        vec![("wait".to_string(), json!({}))],
        "it was cancelled mid-call"
    );
    assert!(
        files.wait_stopped.load(Ordering::SeqCst),
        "the call in flight was stopped, not left running"
    );
    assert_eq!(report.tool_calls, 0, "the cancelled call did not complete");
    assert_eq!(report.iterations, 1);
    assert_eq!(
        script.requests.lock().unwrap().len(),
        1,
        "the model was not asked again after the cancellation"
    );
    assert!(report.answer.is_empty());
}

#[tokio::test]
async fn cancellation_during_a_model_turn_abandons_the_request() {
    // The model never answers; the provider would give up only after 30 s (a `ModelFailed`
    // ending), so a `Cancelled` ending shows the cancellation itself ended the run.
    let (model, script) = scripted(vec![Turn::Hang, Turn::Say("never")], false, false).await;
    let cancel = CancellationToken::new();
    // Cancel once the fake model has the request in hand.
    let (trigger, arrived) = (cancel.clone(), script.arrived.clone());
    let canceller = tokio::spawn(async move {
        arrived.notified().await;
        trigger.cancel();
    });
    let report = run_quietly(
        &agent(5, None),
        "hang",
        &model,
        &Files::default(),
        Limits::default(),
        &cancel,
    )
    .await;
    canceller.await.unwrap();
    assert_eq!(report.ending, Ending::Cancelled, "{report:?}");
    assert_eq!(report.iterations, 1);
    assert!(
        report.attempts.is_empty(),
        "the turn was abandoned, not finished: {:?}",
        report.attempts
    );
    // The HTTP request itself was dropped: the fake model sees its client go away (a guard
    // against a hang, far above any real delay).
    tokio::time::timeout(Duration::from_secs(60), script.abandoned.notified())
        .await
        .expect("the model request in flight was never abandoned");
    assert_eq!(
        script.requests.lock().unwrap().len(),
        1,
        "the model was not asked again after the cancellation"
    );
}

#[tokio::test]
async fn an_answer_cut_at_the_output_limit_does_not_pass_as_an_answer() {
    // The provider says the answer hit the token limit (`finish_reason: "length"`), in a whole
    // body and in a stream; an empty cut answer is not nudged either (it would be cut again).
    for (turn, partial) in [
        (
            Turn::Cut("The files say alpha and"),
            "The files say alpha and",
        ),
        (
            Turn::StreamedCut("The files say alpha and"),
            "The files say alpha and",
        ),
        (Turn::Cut(""), ""),
    ] {
        let (model, script) = scripted(vec![turn, Turn::Say("never")], false, false).await;
        let schema = json!({"type": "string"});
        let report = run_quietly(
            &agent(5, Some(schema)),
            "What do the files say?",
            &model,
            &Files::default(),
            Limits::default(),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(
            report.ending,
            Ending::BudgetExhausted {
                budget: "output tokens (the answer was cut at the output limit)".into()
            },
            "{report:?}"
        );
        assert_eq!(report.answer, partial, "the partial answer is kept");
        assert_eq!(report.structured, None);
        assert_eq!(report.usage.total(), 120, "the cut turn is still counted");
        assert_eq!(script.requests.lock().unwrap().len(), 1, "not asked again");
    }
}

#[tokio::test]
async fn structured_output_is_validated_and_asked_again_once() {
    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]});
    let (model, script) = scripted(
        vec![
            Turn::Say("forty-two"),
            Turn::Say("```json\n{\"answer\": 42}\n```"),
        ],
        false,
        false,
    )
    .await;
    let report = run_quietly(
        &agent(5, Some(schema.clone())),
        "6*7?",
        &model,
        &Files::default(),
        Limits::default(),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.ending, Ending::Answer);
    assert_eq!(report.structured, Some(json!({"answer": 42})));
    let second = script.requests.lock().unwrap()[1].clone();
    let reask = second["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reask.contains("not valid") && reask.contains("JSON Schema"),
        "{reask}"
    );

    let (model, _) = scripted(
        vec![Turn::Say("no"), Turn::Say("{\"answer\": \"x\"}")],
        false,
        false,
    )
    .await;
    let report = run_quietly(
        &agent(5, Some(schema)),
        "6*7?",
        &model,
        &Files::default(),
        Limits::default(),
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&report.ending, Ending::InvalidOutput { error } if error.contains("/answer")),
        "{:?}",
        report.ending
    );
}

#[tokio::test]
async fn a_provider_that_fails_ends_the_run_with_its_error() {
    let (model, _) = scripted(vec![], false, false).await;
    let report = run_quietly(
        &agent(5, None),
        "hi",
        &model,
        &Files::default(),
        Limits::default(),
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&report.ending, Ending::ModelFailed { error } if error.contains("HTTP 500")),
        "{:?}",
        report.ending
    );
    assert_eq!(report.attempts.len(), 1);
}

#[tokio::test]
async fn what_a_delegated_call_spent_counts_against_the_budget() {
    let (model, script) = scripted(vec![Turn::Call("delegate", "{}")], false, true).await;
    let limits = Limits {
        tokens: Some(800),
        ..Limits::default()
    };
    let report = run_quietly(
        &agent(10, None),
        "delegate",
        &model,
        &Files::default(),
        limits,
        &CancellationToken::new(),
    )
    .await;
    // 120 tokens of its own turn + 1000 spent by the delegate: over 800 before the next turn.
    assert!(
        matches!(&report.ending, Ending::BudgetExhausted { budget } if budget.starts_with("tokens (1120 of 800")),
        "{:?}",
        report.ending
    );
    assert_eq!(script.requests.lock().unwrap().len(), 1);
    assert!((report.cost_usd - (0.01 + (100.0 + 40.0) / 1e6)).abs() < 1e-12);
}

#[tokio::test]
async fn an_empty_final_reply_is_asked_for_once_more() {
    let (model, script) = scripted(vec![Turn::Say(""), Turn::Say("finally")], false, false).await;
    let report = run_quietly(
        &agent(5, None),
        "answer",
        &model,
        &Files::default(),
        Limits::default(),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.ending, Ending::Answer);
    assert_eq!((report.answer.as_str(), report.iterations), ("finally", 2));
    let second = script.requests.lock().unwrap()[1].clone();
    let nudge = second["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(nudge.contains("Your last reply was empty"), "{nudge}");
}

/// A caller's budget shared with another run of the same caller, which spends from it too.
struct CallersBudget {
    tokens_left: Mutex<u64>,
    charges: Mutex<Vec<u64>>,
}

impl concord_agents::SharedBudget for CallersBudget {
    fn charge(&self, tokens: u64, _cost_usd: f64) -> concord_agents::Left {
        self.charges.lock().unwrap().push(tokens);
        let mut left = self.tokens_left.lock().unwrap();
        *left = left.saturating_sub(tokens);
        concord_agents::Left {
            tokens: Some(*left),
            cost_usd: None,
        }
    }
}

#[tokio::test]
async fn a_shared_budget_is_charged_every_turn_and_ends_the_run_when_others_spent_it() {
    // Each turn spends 120 tokens. The caller has 400; while this run's tool calls run another
    // run of the same caller spends 200, so only 80 are left for the second turn, and none
    // after it.
    let (model, script) = endless_reader().await;
    let budget = CallersBudget {
        tokens_left: Mutex::new(400),
        charges: Mutex::new(Vec::new()),
    };
    let files = Files::default();
    let other_run_spends = |event: LoopEvent| {
        if matches!(event, LoopEvent::ToolCall { .. }) {
            let mut left = budget.tokens_left.lock().unwrap();
            *left = left.saturating_sub(200);
        }
    };
    let report = run(
        &agent(10, None),
        "spend",
        Vec::new(),
        Limits::default(),
        LoopContext {
            model: &model,
            tools: &files,
            cancel: &CancellationToken::new(),
            progress: &other_run_spends,
            shared: Some(&budget),
        },
    )
    .await;
    assert_eq!(
        report.ending,
        Ending::BudgetExhausted {
            budget: "tokens (the caller's budget has none left)".into()
        }
    );
    // Asked before each turn (and once more, finding nothing left), charged after each.
    assert_eq!(*budget.charges.lock().unwrap(), vec![0, 120, 0, 120, 0]);
    let asked = asked_max_tokens(&script);
    // The second turn may write at most the 80 the caller had left (the provider caps at 512).
    assert_eq!(asked, vec![json!(400), json!(80)]);
}
