//! The adapters against recorded wire traffic of the three APIs (request bodies compared with
//! fixtures; recorded responses and event streams served over real HTTP), and failover between
//! providers that fail in each way a provider fails.

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

#[tokio::test]
async fn the_deadline_bounds_failover_and_keys_never_show_in_errors() {
    let (slow, _) = recorded_server(
        StatusCode::OK,
        "application/json",
        "{}".into(),
        Duration::from_secs(30),
    )
    .await;
    let a = provider("a", Api::OpenAi, &slow, false);
    let b = provider("b", Api::OpenAi, &slow, false);
    let started = Instant::now();
    let outcome = chat_with_failover(
        &[a.clone(), b],
        &ChatRequest {
            messages: vec![Message::user("hi")],
            ..ChatRequest::default()
        },
        Some(Instant::now() + Duration::from_millis(400)),
    )
    .await;
    let error = outcome.result.unwrap_err();
    assert!(
        matches!(error, LlmError::Timeout { .. } | LlmError::DeadlinePassed),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(outcome.attempts.iter().all(|a| a.error.is_some()));

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
