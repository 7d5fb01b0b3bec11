//! The adapters against recorded wire traffic of the three APIs (request bodies compared with
//! fixtures; recorded responses and event streams served over real HTTP), streams that go wrong
//! (an error event inside the stream, an answer cut at the token limit, a stream cut midway), and
//! failover between providers that fail in each way a provider fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use concord_llm::{
    Api, ChatRequest, FinishReason, LlmError, Message, Provider, ProviderConfig, Role, ToolCall,
    ToolSpec, chat_with_failover, wire,
};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn weather_conversation() -> ChatRequest {
    let call = ToolCall {
        id: "toolu_01A09q90qw90lq917835lq9".into(),
        name: "get_weather".into(),
        arguments: r#"{"city": "Paris"}"#.into(),
    };
    let mut assistant = Message::assistant("Let me look.");
    assistant.tool_calls = vec![call.clone()];
    ChatRequest {
        messages: vec![
            Message::system("You answer with the weather tool."),
            Message::user("Weather in Paris?"),
            assistant,
            Message::tool_result(&call, "18 C, light rain"),
        ],
        tools: vec![ToolSpec {
            name: "get_weather".into(),
            description: "Current weather of a city".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false}),
        }],
        max_tokens: Some(1024),
        temperature: None,
    }
}

#[test]
fn anthropic_request_matches_the_recorded_wire_format() {
    let mut request = weather_conversation();
    // Anthropic's recorded request has no additionalProperties: it takes the schema as given.
    request.tools[0].parameters =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let body = wire::anthropic_request("claude-sonnet-4-5", &request, false, 4096);
    let expected: Value = serde_json::from_str(&fixture("anthropic_request.json")).unwrap();
    assert_eq!(body, expected);
}

#[test]
fn anthropic_response_with_tool_use() {
    let value: Value = serde_json::from_str(&fixture("anthropic_response_tool_use.json")).unwrap();
    let response = wire::anthropic_parse(&value).unwrap();
    assert_eq!(response.finish, FinishReason::ToolCalls);
    assert_eq!(response.message.content, "I'll check the weather in Paris.");
    assert_eq!(response.message.tool_calls[0].name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&response.message.tool_calls[0].arguments).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(response.usage.input_tokens, 472);
    assert_eq!(response.usage.output_tokens, 89);
}

#[test]
fn gemini_request_matches_the_recorded_wire_format() {
    // additionalProperties is outside Gemini's schema subset: it is left out.
    let body = wire::gemini_request(&weather_conversation());
    let mut expected: Value = serde_json::from_str(&fixture("gemini_request.json")).unwrap();
    // The assistant's text before its call is a part of the model turn.
    expected["contents"][1]["parts"] = json!([{"text": "Let me look."}, {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]);
    assert_eq!(body, expected);
}

#[test]
fn gemini_response_with_a_function_call() {
    let value: Value =
        serde_json::from_str(&fixture("gemini_response_function_call.json")).unwrap();
    let response = wire::gemini_parse(&value, "gemini-2.5-flash").unwrap();
    assert_eq!(response.finish, FinishReason::ToolCalls);
    assert_eq!(response.message.tool_calls.len(), 1);
    assert_eq!(response.message.tool_calls[0].id, "call_0");
    assert_eq!(response.usage.input_tokens, 61);
    assert_eq!(response.model, "gemini-2.5-flash");
}

#[test]
fn openai_request_carries_tool_calls_and_results() {
    let body = wire::openai_request("local", &weather_conversation(), true);
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        body["messages"][2]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(body["messages"][2]["tool_calls"][0]["type"], "function");
    assert_eq!(
        body["messages"][3],
        json!({"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "18 C, light rain"})
    );
    assert_eq!(
        body["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );
}

/// Serves one recorded body (JSON or an event stream) at every path, counting requests and
/// keeping the last request's headers and body.
type LastRequest = std::sync::Mutex<Option<(HeaderMap, Value)>>;

#[derive(Clone, Default)]
struct Recorded {
    hits: Arc<AtomicUsize>,
    last: Arc<LastRequest>,
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{address}")
}

async fn recorded_server(
    status: StatusCode,
    content_type: &'static str,
    body: String,
    delay: Duration,
) -> (String, Recorded) {
    let recorded = Recorded::default();
    let seen = recorded.clone();
    let handler = move |headers: HeaderMap, request: axum::Json<Value>| {
        let seen = seen.clone();
        let body = body.clone();
        async move {
            seen.hits.fetch_add(1, Ordering::SeqCst);
            *seen.last.lock().unwrap() = Some((headers, request.0));
            tokio::time::sleep(delay).await;
            let mut response: Response = (status, body).into_response();
            response
                .headers_mut()
                .insert("content-type", content_type.parse().unwrap());
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert("retry-after", "7".parse().unwrap());
            }
            response
        }
    };
    let url = serve(Router::new().fallback(post(handler))).await;
    (url, recorded)
}

fn provider(name: &str, api: Api, base_url: &str, stream: bool) -> Arc<Provider> {
    Arc::new(
        Provider::new(ProviderConfig {
            name: name.into(),
            api,
            base_url: base_url.into(),
            model: format!("{name}-model"),
            api_key: Some(format!("secret-of-{name}")),
            timeout: Duration::from_secs(10),
            stream,
            price_input: 3.0,
            price_output: 15.0,
            default_max_tokens: 1024,
            temperature: None,
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn streams_of_all_three_apis_assemble_into_one_answer() {
    let (openai, seen) = recorded_server(
        StatusCode::OK,
        "text/event-stream",
        fixture("openai_stream_tool_calls.txt"),
        Duration::ZERO,
    )
    .await;
    let answer = provider("oa", Api::OpenAi, &format!("{openai}/v1"), true)
        .chat(&weather_conversation(), None)
        .await
        .unwrap();
    assert_eq!(answer.finish, FinishReason::ToolCalls);
    assert_eq!(answer.message.tool_calls[0].id, "call_abc");
    assert_eq!(
        answer.message.tool_calls[0].arguments,
        r#"{"path": "notes.txt"}"#
    );
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (120, 18)
    );
    let (headers, body) = seen.last.lock().unwrap().clone().unwrap();
    assert_eq!(headers["authorization"], "Bearer secret-of-oa");
    assert_eq!(body["model"], "oa-model");

    let (anthropic, seen) = recorded_server(
        StatusCode::OK,
        "text/event-stream",
        fixture("anthropic_stream.txt"),
        Duration::ZERO,
    )
    .await;
    let answer = provider("an", Api::Anthropic, &anthropic, true)
        .chat(&weather_conversation(), None)
        .await
        .unwrap();
    assert_eq!(answer.message.content, "Okay, let's check the weather.");
    assert_eq!(
        answer.message.tool_calls[0].id,
        "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&answer.message.tool_calls[0].arguments).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(answer.finish, FinishReason::ToolCalls);
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (472, 89)
    );
    let (headers, body) = seen.last.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-api-key"], "secret-of-an");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(body["stream"], true);

    let (gemini, seen) = recorded_server(
        StatusCode::OK,
        "text/event-stream",
        fixture("gemini_stream.txt"),
        Duration::ZERO,
    )
    .await;
    let answer = provider("ge", Api::Gemini, &gemini, true)
        .chat(&weather_conversation(), None)
        .await
        .unwrap();
    assert_eq!(
        answer.message.content,
        "It is 18 C with light rain in Paris."
    );
    assert_eq!(answer.finish, FinishReason::Stop);
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (80, 12)
    );
    let (headers, _) = seen.last.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-goog-api-key"], "secret-of-ge");
}

#[tokio::test]
async fn failover_on_server_error_timeout_and_rate_limit_with_every_attempt_recorded() {
    let ok_body = json!({"id": "x", "object": "chat.completion", "model": "b-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "from B"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}).to_string();
    let (b_url, b_seen) =
        recorded_server(StatusCode::OK, "application/json", ok_body, Duration::ZERO).await;
    let b = provider("b", Api::OpenAi, &b_url, false);
    let request = ChatRequest {
        messages: vec![Message::user("hi")],
        ..ChatRequest::default()
    };

    for (status, delay, expect) in [
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Duration::ZERO,
            "HTTP 500",
        ),
        (
            StatusCode::TOO_MANY_REQUESTS,
            Duration::ZERO,
            "rate limiting (HTTP 429); retry after 7 s",
        ),
        (
            StatusCode::OK,
            Duration::from_secs(30),
            "did not answer within",
        ),
    ] {
        let (a_url, a_seen) = recorded_server(
            status,
            "application/json",
            "{\"error\": \"boom\"}".into(),
            delay,
        )
        .await;
        let mut a_config = provider("a", Api::OpenAi, &a_url, false).config.clone();
        a_config.timeout = Duration::from_millis(300);
        let a = Arc::new(Provider::new(a_config).unwrap());
        let outcome = chat_with_failover(&[a, b.clone()], &request, None).await;
        let (answer, index) = outcome.result.expect("B answers");
        assert_eq!((answer.message.content.as_str(), index), ("from B", 1));
        assert_eq!(a_seen.hits.load(Ordering::SeqCst), 1);
        assert_eq!(outcome.attempts.len(), 2, "{:?}", outcome.attempts);
        let failed = &outcome.attempts[0];
        assert_eq!(failed.provider, "a");
        assert!(
            failed.error.as_deref().unwrap().contains(expect),
            "{failed:?}"
        );
        let answered = &outcome.attempts[1];
        assert_eq!(
            (answered.provider.as_str(), answered.error.as_deref()),
            ("b", None)
        );
        assert_eq!(answered.usage.input_tokens, 1000);
        // 1000 in at $3/M + 100 out at $15/M
        assert!(
            (answered.cost_usd - 0.0045).abs() < 1e-12,
            "{}",
            answered.cost_usd
        );
    }
    assert_eq!(b_seen.hits.load(Ordering::SeqCst), 3);
}

/// The timeout a `LlmError::Timeout` message names ("... did not answer within 399.8ms").
fn named_timeout(error: &str) -> Duration {
    let text = error
        .rsplit("within ")
        .next()
        .unwrap_or_else(|| panic!("no timeout in {error:?}"));
    let (number, unit) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| text.split_at(i))
        .unwrap_or_else(|| panic!("no unit in {error:?}"));
    let number: f64 = number.parse().unwrap();
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        other => panic!("unit {other:?} in {error:?}"),
    };
    Duration::from_secs_f64(seconds)
}

#[tokio::test]
async fn the_deadline_bounds_failover_and_keys_never_show_in_errors() {
    // Both providers would take 30 s and allow themselves 600 s; the deadline allows 500 ms.
    let (slow_a, _) = recorded_server(
        StatusCode::OK,
        "application/json",
        "{}".into(),
        Duration::from_secs(30),
    )
    .await;
    let (slow_b, b_seen) = recorded_server(
        StatusCode::OK,
        "application/json",
        "{}".into(),
        Duration::from_secs(30),
    )
    .await;
    let patient = |name: &str, url: &str| {
        let mut config = provider(name, Api::OpenAi, url, false).config.clone();
        config.timeout = Duration::from_secs(600);
        Arc::new(Provider::new(config).unwrap())
    };
    let a = patient("a", &slow_a);
    let b = patient("b", &slow_b);
    let budget = Duration::from_millis(500);
    let outcome = chat_with_failover(
        &[a.clone(), b],
        &ChatRequest {
            messages: vec![Message::user("hi")],
            ..ChatRequest::default()
        },
        Some(Instant::now() + budget),
    )
    .await;
    // A was given what was left of the deadline, not its own 600 s; when it ran out the deadline
    // had passed, so B was never asked.
    let error = outcome.result.unwrap_err();
    assert_eq!(error, LlmError::DeadlinePassed);
    assert_eq!(outcome.attempts.len(), 1, "{:?}", outcome.attempts);
    let attempt = &outcome.attempts[0];
    assert_eq!(attempt.provider, "a");
    let timed_out = attempt.error.as_deref().unwrap();
    assert!(
        timed_out.contains("provider a did not answer within"),
        "{timed_out}"
    );
    assert!(named_timeout(timed_out) <= budget, "{timed_out}");
    assert_eq!(b_seen.hits.load(Ordering::SeqCst), 0, "B was never asked");

    let (unauthorized, _) = recorded_server(
        StatusCode::UNAUTHORIZED,
        "application/json",
        "{\"error\":{\"message\":\"bad key\"}}".into(),
        Duration::ZERO,
    )
    .await;
    let error = provider("c", Api::Anthropic, &unauthorized, false)
        .chat(
            &ChatRequest {
                messages: vec![Message::user("hi")],
                ..ChatRequest::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("HTTP 401"), "{error}");
    assert!(!error.to_string().contains("secret-of-c"));
    assert!(
        !format!("{a:?}").contains("secret-of-a"),
        "Debug leaks the key"
    );
    let _ = Role::Tool;
}

#[tokio::test]
async fn a_provider_that_keeps_failing_is_asked_last_until_it_has_rested() {
    let ok_body = json!({"id": "x", "object": "chat.completion", "model": "b-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "from B"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    .to_string();
    let (a_url, a_seen) = recorded_server(
        StatusCode::BAD_GATEWAY,
        "application/json",
        "{}".into(),
        Duration::ZERO,
    )
    .await;
    let (b_url, _) =
        recorded_server(StatusCode::OK, "application/json", ok_body, Duration::ZERO).await;
    let a = provider("a", Api::OpenAi, &a_url, false);
    let b = provider("b", Api::OpenAi, &b_url, false);
    let request = ChatRequest {
        messages: vec![Message::user("hi")],
        ..ChatRequest::default()
    };
    for round in 1..=5 {
        let outcome = chat_with_failover(&[a.clone(), b.clone()], &request, None).await;
        assert_eq!(outcome.result.unwrap().1, 1, "B answers round {round}");
        let first = &outcome.attempts[0].provider;
        // Three failures in a row put A aside: from the fourth round on, B is asked first.
        assert_eq!(first, if round <= 3 { "a" } else { "b" }, "round {round}");
    }
    assert_eq!(a_seen.hits.load(Ordering::SeqCst), 3);
    assert!(!a.is_available() && b.is_available());
}

/// The events of a recorded stream, each with its blank line.
fn events_of(stream: &str) -> Vec<String> {
    stream
        .split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| format!("{event}\n\n"))
        .collect()
}

/// Serves `body` as an event stream to one provider of `api` and asks it once.
async fn ask_stream(api: Api, body: String) -> Result<concord_llm::ChatResponse, LlmError> {
    let (url, seen) =
        recorded_server(StatusCode::OK, "text/event-stream", body, Duration::ZERO).await;
    let base = if api == Api::OpenAi {
        format!("{url}/v1")
    } else {
        url
    };
    let answer = provider("p", api, &base, true)
        .chat(&weather_conversation(), None)
        .await;
    assert_eq!(seen.hits.load(Ordering::SeqCst), 1);
    answer
}

fn openai_chunk(delta: Value, finish: Value) -> String {
    let chunk = json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

fn openai_usage(input: u64, output: u64) -> String {
    let chunk = json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}});
    format!("data: {chunk}\n\n")
}

#[tokio::test]
async fn an_error_inside_a_stream_is_an_error_and_failover_moves_on() {
    // OpenAI (and vLLM, LiteLLM) put an error object in a data chunk when the model fails
    // after the answer began.
    let openai = [
        openai_chunk(
            json!({"role": "assistant", "content": "It is"}),
            Value::Null,
        ),
        format!(
            "data: {}\n\n",
            json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}})
        ),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let error = ask_stream(Api::OpenAi, openai.clone()).await.unwrap_err();
    assert!(
        matches!(&error, LlmError::Protocol(m) if m.contains("error in the stream") && m.contains("while processing your request")),
        "{error:?}"
    );

    // Anthropic: an `error` event (overloaded) after the message started.
    let recorded = events_of(&fixture("anthropic_stream.txt"));
    let anthropic = [
        recorded[..4].concat(),
        "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n".to_string(),
    ]
    .concat();
    let error = ask_stream(Api::Anthropic, anthropic).await.unwrap_err();
    assert!(
        matches!(&error, LlmError::Protocol(m) if m.contains("overloaded_error") && m.contains("Overloaded")),
        "{error:?}"
    );

    // Gemini: an error object in a chunk.
    let recorded = events_of(&fixture("gemini_stream.txt"));
    let gemini = [
        recorded[0].clone(),
        "data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\n\n".to_string(),
    ]
    .concat();
    let error = ask_stream(Api::Gemini, gemini).await.unwrap_err();
    assert!(
        matches!(&error, LlmError::Protocol(m) if m.contains("UNAVAILABLE")),
        "{error:?}"
    );

    // In failover the broken stream is a failed attempt, recorded, and the next provider answers.
    let (broken, _) =
        recorded_server(StatusCode::OK, "text/event-stream", openai, Duration::ZERO).await;
    let (good, _) = recorded_server(
        StatusCode::OK,
        "text/event-stream",
        fixture("openai_stream_tool_calls.txt"),
        Duration::ZERO,
    )
    .await;
    let outcome = chat_with_failover(
        &[
            provider("a", Api::OpenAi, &format!("{broken}/v1"), true),
            provider("b", Api::OpenAi, &format!("{good}/v1"), true),
        ],
        &weather_conversation(),
        None,
    )
    .await;
    let (answer, index) = outcome.result.unwrap();
    assert_eq!((index, answer.finish), (1, FinishReason::ToolCalls));
    assert_eq!(outcome.attempts.len(), 2);
    assert!(
        outcome.attempts[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("error in the stream")),
        "{:?}",
        outcome.attempts[0]
    );
    assert_eq!(outcome.attempts[0].usage.total(), 0);
}

#[tokio::test]
async fn an_answer_cut_at_the_token_limit_says_so() {
    // OpenAI: finish_reason "length", streamed and whole.
    let openai = [
        openai_chunk(
            json!({"role": "assistant", "content": "It is 18 C"}),
            Value::Null,
        ),
        openai_chunk(json!({"content": " with"}), Value::Null),
        openai_chunk(json!({}), json!("length")),
        openai_usage(120, 4),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let answer = ask_stream(Api::OpenAi, openai).await.unwrap();
    assert_eq!(answer.finish, FinishReason::Length);
    assert_eq!(answer.message.content, "It is 18 C with");
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (120, 4)
    );
    let whole = json!({"id": "x", "object": "chat.completion", "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is 18 C with"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 4}});
    assert_eq!(
        wire::openai_parse(&whole).unwrap().finish,
        FinishReason::Length
    );

    // Anthropic: stop_reason "max_tokens".
    let anthropic = fixture("anthropic_stream.txt").replace(
        "\"stop_reason\":\"tool_use\"",
        "\"stop_reason\":\"max_tokens\"",
    );
    let answer = ask_stream(Api::Anthropic, anthropic).await.unwrap();
    assert_eq!(answer.finish, FinishReason::Length);
    assert_eq!(answer.message.content, "Okay, let's check the weather.");

    // Gemini: finishReason "MAX_TOKENS".
    let gemini = fixture("gemini_stream.txt").replace(
        "\"finishReason\": \"STOP\"",
        "\"finishReason\": \"MAX_TOKENS\"",
    );
    let answer = ask_stream(Api::Gemini, gemini).await.unwrap();
    assert_eq!(answer.finish, FinishReason::Length);
    assert_eq!(
        answer.message.content,
        "It is 18 C with light rain in Paris."
    );
}

#[tokio::test]
async fn a_stream_cut_midway_is_an_error_never_a_shorter_answer() {
    // The server ends the response before the stream's end marker: after a few events, just
    // before the marker, and in the middle of an event.
    let openai = events_of(&fixture("openai_stream_tool_calls.txt"));
    assert_eq!(openai.last().unwrap(), "data: [DONE]\n\n");
    let anthropic = events_of(&fixture("anthropic_stream.txt"));
    assert!(anthropic.last().unwrap().contains("message_stop"));
    let gemini = events_of(&fixture("gemini_stream.txt"));
    assert!(gemini.last().unwrap().contains("finishReason"));
    for (api, events) in [
        (Api::OpenAi, &openai),
        (Api::Anthropic, &anthropic),
        (Api::Gemini, &gemini),
    ] {
        let whole = events.concat();
        let mut cuts = vec![events[..1].concat(), events[..events.len() - 1].concat()];
        let last = events.last().unwrap();
        cuts.push(format!(
            "{}{}",
            events[..events.len() - 1].concat(),
            &last[..last.len() / 2]
        ));
        for cut in cuts {
            let result = ask_stream(api, cut.clone()).await;
            assert!(
                matches!(&result, Err(LlmError::Protocol(_))),
                "{api:?} cut after {} of {} bytes: {result:?}",
                cut.len(),
                whole.len()
            );
        }
        // The whole stream, served the same way, is an answer.
        ask_stream(api, whole).await.unwrap();
    }
    let error = ask_stream(Api::OpenAi, openai[..openai.len() - 1].concat())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("before [DONE]"), "{error}");
    let error = ask_stream(Api::Anthropic, anthropic[..anthropic.len() - 1].concat())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("before message_stop"), "{error}");
    let error = ask_stream(Api::Gemini, gemini[..1].concat())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("before a finishReason"),
        "{error}"
    );
}

#[tokio::test]
async fn a_stream_whose_connection_breaks_is_an_error() {
    // The connection is aborted mid-body (no end of the chunked body at all).
    let head = events_of(&fixture("openai_stream_tool_calls.txt"))[..3].concat();
    let handler = move || {
        let head = head.clone();
        async move {
            let parts: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
                Ok(head.into()),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "the server went away",
                )),
            ];
            let mut response =
                axum::body::Body::from_stream(futures::stream::iter(parts)).into_response();
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
    };
    let url = serve(Router::new().fallback(post(handler))).await;
    let result = provider("p", Api::OpenAi, &format!("{url}/v1"), true)
        .chat(&weather_conversation(), None)
        .await;
    assert!(
        matches!(&result, Err(LlmError::Connect(_) | LlmError::Protocol(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_blocked_prompt_in_a_gemini_stream_is_an_error() {
    let blocked = "data: {\"promptFeedback\": {\"blockReason\": \"SAFETY\"}, \"usageMetadata\": {\"promptTokenCount\": 8, \"totalTokenCount\": 8}, \"modelVersion\": \"gemini-2.5-flash\"}\n\n";
    let error = ask_stream(Api::Gemini, blocked.to_string())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, LlmError::Protocol(m) if m.contains("SAFETY")),
        "{error:?}"
    );
}

#[path = "integration/local_model.rs"]
mod local_model;

#[path = "integration/hostile.rs"]
mod hostile;
