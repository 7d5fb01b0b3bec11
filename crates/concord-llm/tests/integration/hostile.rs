//! Hostile providers: fake servers that speak the three wire formats and abuse them — a
//! tool-call index of four billion, an answer that never ends (streamed, whole, or as an error
//! body), a body longer than it says nothing about or one that claims a terabyte, a line that
//! never ends, characters cut between reads, token counts that would wrap. The byte-level ones
//! are written over raw TCP, chunk by chunk in HTTP/1.1 chunked encoding (the client reads never
//! span two chunks, so the cuts are where the test puts them). Each is a provider error, never an
//! allocation or a panic, and failover moves on past it.

use std::future::Future;
use std::sync::Arc;

use concord_llm::{
    Api, ChatResponse, FinishReason, LlmError, Provider, ResponseLimits, Usage, chat_with_failover,
    wire,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{
    Recorded, ask_stream, fixture, openai_chunk, provider, recorded_server, weather_conversation,
};

const MIB: usize = 1 << 20;

/// A fake provider over raw TCP: each connection's request is read whole, then `answer` writes
/// whatever it likes on the socket.
async fn fake_provider<F, Fut>(answer: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_some() {
                    answer(socket).await;
                }
            });
        }
    });
    url
}

/// Reads one HTTP/1.1 request (head and `content-length` body); `None` if the client left.
async fn read_request(socket: &mut TcpStream) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while bytes.len() < head_end + length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    Some(bytes[head_end..].to_vec())
}

/// A response head announcing a chunked body.
async fn write_head(socket: &mut TcpStream, status: &str, content_type: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
}

/// One chunk of a chunked body: the client reads it apart from its neighbours.
async fn write_chunk(socket: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    assert!(!bytes.is_empty(), "an empty chunk ends the body");
    let mut frame = format!("{:x}\r\n", bytes.len()).into_bytes();
    frame.extend_from_slice(bytes);
    frame.extend_from_slice(b"\r\n");
    socket.write_all(&frame).await
}

/// Waits until the client closes the connection (it gave up), reading whatever it sends.
async fn until_the_client_leaves(mut socket: TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Serves `pieces` as the chunks of one 200 answer of `content_type`, then ends the body.
async fn serve_pieces(content_type: &'static str, pieces: Vec<Vec<u8>>) -> String {
    let pieces = Arc::new(pieces);
    fake_provider(move |mut socket| {
        let pieces = pieces.clone();
        async move {
            write_head(&mut socket, "200 OK", content_type).await;
            for piece in pieces.iter() {
                write_chunk(&mut socket, piece).await.unwrap();
            }
            socket.write_all(b"0\r\n\r\n").await.unwrap();
        }
    })
    .await
}

/// Serves an answer that never ends: `start`, then `piece` again and again until the client
/// hangs up.
async fn serve_endless(
    status: &'static str,
    content_type: &'static str,
    start: String,
    piece: String,
) -> String {
    fake_provider(move |mut socket| {
        let start = start.clone();
        let piece = piece.clone();
        async move {
            write_head(&mut socket, status, content_type).await;
            if write_chunk(&mut socket, start.as_bytes()).await.is_err() {
                return;
            }
            while write_chunk(&mut socket, piece.as_bytes()).await.is_ok() {}
        }
    })
    .await
}

fn base(api: Api, url: &str) -> String {
    if api == Api::OpenAi {
        format!("{url}/v1")
    } else {
        url.to_string()
    }
}

async fn ask(api: Api, url: &str, stream: bool) -> Result<ChatResponse, LlmError> {
    provider("hostile", api, &base(api, url), stream)
        .chat(&weather_conversation(), None)
        .await
}

async fn ask_within(api: Api, url: &str, limits: ResponseLimits) -> Result<ChatResponse, LlmError> {
    let config = provider("hostile", api, &base(api, url), true)
        .config
        .clone();
    Provider::new(config)
        .unwrap()
        .with_limits(limits)
        .chat(&weather_conversation(), None)
        .await
}

fn protocol_error_saying(result: Result<ChatResponse, LlmError>, says: &[&str]) {
    match &result {
        Err(LlmError::Protocol(message)) if says.iter().all(|s| message.contains(s)) => {}
        other => panic!("expected a protocol error saying {says:?}, got {other:?}"),
    }
}

fn openai_call(index: Value, id: &str, name: &str, arguments: &str) -> String {
    openai_chunk(
        json!({"tool_calls": [{"index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": arguments}}]}),
        Value::Null,
    )
}

const OPENAI_END: &str = "data: [DONE]\n\n";

fn anthropic_event(value: Value) -> String {
    format!(
        "event: {}\ndata: {value}\n\n",
        value["type"].as_str().unwrap()
    )
}

fn anthropic_start() -> String {
    anthropic_event(
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
        "role": "assistant", "model": "claude-sonnet-4-5", "content": [], "stop_reason": null,
        "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    )
}

fn anthropic_end() -> String {
    [
        anthropic_event(json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}})),
        anthropic_event(json!({"type": "message_stop"})),
    ]
    .concat()
}

fn anthropic_block(index: Value, block: Value) -> String {
    anthropic_event(json!({"type": "content_block_start", "index": index, "content_block": block}))
}

fn anthropic_text(index: Value, text: &str) -> String {
    anthropic_event(json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "text_delta", "text": text}}))
}

fn gemini_chunk(parts: Value, finish: Option<&str>) -> String {
    let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(finish);
    }
    format!(
        "data: {}\n\n",
        json!({"candidates": [candidate], "modelVersion": "gemini-2.5-flash"})
    )
}

fn gemini_calls(count: usize) -> Value {
    (0..count)
        .map(
            |i| json!({"functionCall": {"name": "get_weather", "args": {"city": format!("c{i}")}}}),
        )
        .collect()
}

#[tokio::test]
async fn an_openai_tool_call_index_of_four_billion_is_an_error_not_an_allocation() {
    let huge = [
        openai_chunk(json!({"role": "assistant", "content": null}), Value::Null),
        openai_call(json!(4_000_000_000u64), "call_1", "get_weather", "{}"),
        openai_chunk(json!({}), json!("tool_calls")),
        OPENAI_END.to_string(),
    ]
    .concat();
    protocol_error_saying(
        ask_stream(Api::OpenAi, huge.clone()).await,
        &["tool call index 4000000000", "limit of 128"],
    );

    // Sparse: call 0, then call 5 — never padded with four empty calls.
    let sparse = [
        openai_call(json!(0), "call_0", "get_weather", "{}"),
        openai_call(json!(5), "call_5", "get_weather", "{}"),
        OPENAI_END.to_string(),
    ]
    .concat();
    protocol_error_saying(
        ask_stream(Api::OpenAi, sparse).await,
        &["tool call index 5 skips ahead: only 1 seen so far"],
    );
    let negative = [
        openai_call(json!(-1), "c", "f", "{}"),
        OPENAI_END.to_string(),
    ]
    .concat();
    protocol_error_saying(
        ask_stream(Api::OpenAi, negative).await,
        &["index -1 is not a non-negative integer"],
    );

    // 128 calls (each begun, then continued by index) are an answer; a 129th is refused.
    let calls = |count: usize| {
        let mut stream: Vec<String> = (0..count)
            .map(|i| openai_call(json!(i), &format!("call_{i}"), "get_weather", "{\"city\": "))
            .collect();
        stream.extend((0..count).map(|i| {
            openai_chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": format!("\"c{i}\"}}")}}]}),
                Value::Null,
            )
        }));
        stream.push(openai_chunk(json!({}), json!("tool_calls")));
        stream.push(OPENAI_END.to_string());
        stream.concat()
    };
    let answer = ask_stream(Api::OpenAi, calls(128)).await.unwrap();
    assert_eq!(answer.finish, FinishReason::ToolCalls);
    assert_eq!(answer.message.tool_calls.len(), 128);
    assert_eq!(answer.message.tool_calls[127].id, "call_127");
    assert_eq!(
        answer.message.tool_calls[127].arguments,
        "{\"city\": \"c127\"}"
    );
    protocol_error_saying(
        ask_stream(Api::OpenAi, calls(129)).await,
        &["tool call index 128 is past the limit of 128"],
    );

    // The same bound on a whole (not streamed) answer.
    let whole = |count: usize| {
        json!({"id": "x", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": (0..count).map(|i| json!({"id": format!("call_{i}"), "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"}})).collect::<Vec<_>>()}}]})
        .to_string()
    };
    for (count, ok) in [(128, true), (129, false)] {
        let (url, _) = recorded_server(
            axum::http::StatusCode::OK,
            "application/json",
            whole(count),
            std::time::Duration::ZERO,
        )
        .await;
        let result = ask(Api::OpenAi, &url, false).await;
        if ok {
            assert_eq!(result.unwrap().message.tool_calls.len(), 128);
        } else {
            protocol_error_saying(result, &["more than 128 tool calls"]);
        }
    }

    // In failover the hostile stream is a failed attempt and the next provider answers.
    let (hostile, _) = recorded_server(
        axum::http::StatusCode::OK,
        "text/event-stream",
        huge,
        std::time::Duration::ZERO,
    )
    .await;
    let (good, _) = recorded_server(
        axum::http::StatusCode::OK,
        "text/event-stream",
        fixture("openai_stream_tool_calls.txt"),
        std::time::Duration::ZERO,
    )
    .await;
    let outcome = chat_with_failover(
        &[
            provider("a", Api::OpenAi, &base(Api::OpenAi, &hostile), true),
            provider("b", Api::OpenAi, &base(Api::OpenAi, &good), true),
        ],
        &weather_conversation(),
        None,
    )
    .await;
    assert_eq!(outcome.result.unwrap().1, 1);
    assert!(
        outcome.attempts[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("4000000000")),
        "{:?}",
        outcome.attempts[0]
    );
}

#[tokio::test]
async fn an_anthropic_content_block_index_of_four_billion_is_an_error_not_an_allocation() {
    let stream = |middle: Vec<String>| {
        let mut events = vec![anthropic_start()];
        events.extend(middle);
        events.push(anthropic_end());
        events.concat()
    };
    let text = json!({"type": "text", "text": ""});
    protocol_error_saying(
        ask_stream(
            Api::Anthropic,
            stream(vec![
                anthropic_block(json!(4_000_000_000u64), text.clone()),
                anthropic_text(json!(4_000_000_000u64), "hi"),
            ]),
        )
        .await,
        &["content block index 4000000000", "limit of 128"],
    );
    protocol_error_saying(
        ask_stream(
            Api::Anthropic,
            stream(vec![
                anthropic_block(json!(0), text.clone()),
                anthropic_block(json!(2), text.clone()),
            ]),
        )
        .await,
        &["content block index 2 skips ahead: only 1 seen so far"],
    );
    // A delta for a block that never started was silently dropped (a shorter answer).
    protocol_error_saying(
        ask_stream(
            Api::Anthropic,
            stream(vec![
                anthropic_block(json!(0), text.clone()),
                anthropic_text(json!(0), "Hello"),
                anthropic_text(json!(4_000_000_000u64), " world"),
            ]),
        )
        .await,
        &["a delta for content block 4000000000, which never started"],
    );

    // 128 blocks are an answer; a 129th is refused.
    let blocks = |count: usize| {
        stream(
            (0..count)
                .flat_map(|i| {
                    [
                        anthropic_block(json!(i), text.clone()),
                        anthropic_text(json!(i), &format!("{i} ")),
                    ]
                })
                .collect(),
        )
    };
    let answer = ask_stream(Api::Anthropic, blocks(128)).await.unwrap();
    assert!(answer.message.content.starts_with("0 1 2 "));
    assert!(answer.message.content.ends_with(" 127 "));
    protocol_error_saying(
        ask_stream(Api::Anthropic, blocks(129)).await,
        &["content block index 128 is past the limit of 128"],
    );
}

#[tokio::test]
async fn more_gemini_function_calls_than_the_limit_are_an_error() {
    let answer = ask_stream(Api::Gemini, gemini_chunk(gemini_calls(128), Some("STOP")))
        .await
        .unwrap();
    assert_eq!(answer.message.tool_calls.len(), 128);
    assert_eq!(answer.message.tool_calls[127].id, "call_127");
    // Streamed across chunks: counted over the whole answer.
    let streamed = [
        gemini_chunk(gemini_calls(100), None),
        gemini_chunk(gemini_calls(29), Some("STOP")),
    ]
    .concat();
    protocol_error_saying(
        ask_stream(Api::Gemini, streamed).await,
        &["more than 128 tool calls"],
    );
    // A whole answer.
    let whole = json!({"candidates": [{"content": {"role": "model", "parts": gemini_calls(129)},
        "finishReason": "STOP", "index": 0}]})
    .to_string();
    let (url, _) = recorded_server(
        axum::http::StatusCode::OK,
        "application/json",
        whole,
        std::time::Duration::ZERO,
    )
    .await;
    protocol_error_saying(
        ask(Api::Gemini, &url, false).await,
        &["more than 128 tool calls"],
    );
}

fn too_large(result: Result<ChatResponse, LlmError>, what: &str, limit: usize) {
    match &result {
        Err(error @ LlmError::TooLarge { what: w, limit: l }) if *w == what && *l == limit => {
            assert_eq!(
                error.to_string(),
                format!("the provider's answer exceeded {limit} bytes ({what})")
            );
        }
        other => panic!("expected the answer to exceed {limit} bytes ({what}), got {other:?}"),
    }
}

#[tokio::test]
async fn an_endless_stream_stops_at_the_body_limit() {
    // Each API's stream begins properly, then sends text deltas until the client hangs up. The
    // provider's timeout (10 s) is not what ends it: that would be a different error.
    let openai_piece = openai_chunk(
        json!({"content": "All work and no play. ".repeat(100)}),
        Value::Null,
    );
    let anthropic_piece = anthropic_text(json!(0), &"All work and no play. ".repeat(100));
    let gemini_piece = gemini_chunk(
        json!([{"text": "All work and no play. ".repeat(100)}]),
        None,
    );
    for (api, start, piece) in [
        (
            Api::OpenAi,
            openai_chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            openai_piece,
        ),
        (
            Api::Anthropic,
            [
                anthropic_start(),
                anthropic_block(json!(0), json!({"type": "text", "text": ""})),
            ]
            .concat(),
            anthropic_piece,
        ),
        (
            Api::Gemini,
            gemini_chunk(json!([{"text": "A"}]), None),
            gemini_piece,
        ),
    ] {
        let url = serve_endless("200 OK", "text/event-stream", start, piece).await;
        too_large(ask(api, &url, true).await, "the whole body", 8 * MIB);
    }
}

#[tokio::test]
async fn an_endless_or_oversized_whole_body_stops_at_the_body_limit() {
    // A JSON answer that never ends.
    let url = serve_endless(
        "200 OK",
        "application/json",
        r#"{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": ""#.to_string(),
        "All work and no play. ".repeat(1000),
    )
    .await;
    too_large(
        ask(Api::OpenAi, &url, false).await,
        "the whole body",
        8 * MIB,
    );

    // A body that says it is a terabyte is refused before it is read: this server sends the
    // head only and waits (a client reading the body would wait with it until its timeout).
    let url = fake_provider(|mut socket| async move {
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1099511627776\r\n\r\n{")
            .await
            .unwrap();
        until_the_client_leaves(socket).await;
    })
    .await;
    too_large(
        ask(Api::Anthropic, &url, false).await,
        "the whole body",
        8 * MIB,
    );
    let url = fake_provider(|mut socket| async move {
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1099511627776\r\n\r\n")
            .await
            .unwrap();
        until_the_client_leaves(socket).await;
    })
    .await;
    too_large(
        ask(Api::Gemini, &url, true).await,
        "the whole body",
        8 * MIB,
    );

    // An error answer whose body never ends: the status is reported with the body's start.
    let url = serve_endless(
        "500 Internal Server Error",
        "text/plain",
        "upstream exploded: ".to_string(),
        "€".repeat(1000),
    )
    .await;
    match ask(Api::Gemini, &url, false).await {
        Err(LlmError::Http {
            provider,
            status: 500,
            body,
        }) => {
            assert_eq!(provider, "hostile");
            assert_eq!(body.chars().count(), 500);
            assert!(body.starts_with("upstream exploded: €€€"), "{body}");
        }
        other => panic!("{other:?}"),
    }

    // An error answer that says it is a terabyte, sends a page of it and waits: its start is
    // reported all the same, without waiting for the rest.
    let url = fake_provider(|mut socket| async move {
        let mut answer = b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 1099511627776\r\n\r\n<html><body>Bad gateway ".to_vec();
        answer.resize(answer.len() + 5000, b'.');
        socket.write_all(&answer).await.unwrap();
        until_the_client_leaves(socket).await;
    })
    .await;
    match ask(Api::OpenAi, &url, true).await {
        Err(LlmError::Http {
            status: 502, body, ..
        }) => {
            assert!(body.starts_with("<html><body>Bad gateway ..."), "{body}");
            assert_eq!(body.len(), 500);
        }
        other => panic!("{other:?}"),
    }

    // In failover the endless provider is a failed attempt and the next one answers.
    let endless = serve_endless(
        "200 OK",
        "text/event-stream",
        openai_chunk(json!({"role": "assistant"}), Value::Null),
        openai_chunk(json!({"content": "la ".repeat(1000)}), Value::Null),
    )
    .await;
    let (good, _): (String, Recorded) = recorded_server(
        axum::http::StatusCode::OK,
        "text/event-stream",
        fixture("openai_stream_tool_calls.txt"),
        std::time::Duration::ZERO,
    )
    .await;
    let outcome = chat_with_failover(
        &[
            provider("a", Api::OpenAi, &base(Api::OpenAi, &endless), true),
            provider("b", Api::OpenAi, &base(Api::OpenAi, &good), true),
        ],
        &weather_conversation(),
        None,
    )
    .await;
    assert_eq!(outcome.result.unwrap().1, 1);
    assert_eq!(
        outcome.attempts[0].error.as_deref(),
        Some("the provider's answer exceeded 8388608 bytes (the whole body)")
    );
}

#[tokio::test]
async fn an_accumulated_field_stops_at_its_limit() {
    // A small field limit (the body limit stays 8 MiB): text or arguments past 1 KiB in total
    // are refused however they are cut.
    let limits = ResponseLimits {
        max_field_bytes: 1024,
        ..ResponseLimits::default()
    };
    let pieces = |make: &dyn Fn(&str) -> String, count: usize| {
        (0..count)
            .map(|_| make(&"x".repeat(100)))
            .collect::<String>()
    };
    let openai_text = |text: &str| openai_chunk(json!({"content": text}), Value::Null);
    let openai_arguments = |text: &str| {
        openai_chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}),
            Value::Null,
        )
    };
    let anthropic = |text: &str| anthropic_text(json!(0), text);
    let gemini = |text: &str| gemini_chunk(json!([{"text": text}]), None);
    let openai_stream = |middle: String| {
        [
            openai_call(json!(0), "call_0", "get_weather", ""),
            middle,
            openai_chunk(json!({}), json!("tool_calls")),
            OPENAI_END.to_string(),
        ]
        .concat()
    };
    let anthropic_stream = |middle: String| {
        [
            anthropic_start(),
            anthropic_block(json!(0), json!({"type": "text", "text": ""})),
            middle,
            anthropic_end(),
        ]
        .concat()
    };
    let gemini_stream =
        |middle: String| [middle, gemini_chunk(json!([{"text": "."}]), Some("STOP"))].concat();
    for (api, stream, what) in [
        (
            Api::OpenAi,
            openai_stream(pieces(&openai_text, 11)),
            "the answer's text",
        ),
        (
            Api::OpenAi,
            openai_stream(pieces(&openai_arguments, 11)),
            "a tool call's arguments",
        ),
        (
            Api::Anthropic,
            anthropic_stream(pieces(&anthropic, 11)),
            "a content block's text",
        ),
        (
            Api::Gemini,
            gemini_stream(pieces(&gemini, 11)),
            "the answer's text",
        ),
    ] {
        let url = serve_pieces("text/event-stream", vec![stream.into_bytes()]).await;
        too_large(ask_within(api, &url, limits).await, what, 1024);
    }
    // Within the limit (10 pieces of 100 bytes, plus Gemini's last ".") they are answers.
    for (api, stream, length) in [
        (Api::OpenAi, openai_stream(pieces(&openai_text, 10)), 1000),
        (
            Api::Anthropic,
            anthropic_stream(pieces(&anthropic, 10)),
            1000,
        ),
        (Api::Gemini, gemini_stream(pieces(&gemini, 10)), 1001),
    ] {
        let url = serve_pieces("text/event-stream", vec![stream.into_bytes()]).await;
        let answer = ask_within(api, &url, limits).await.unwrap();
        assert_eq!(answer.message.content.len(), length, "{api:?}");
    }
    // A whole answer is held to the same limit.
    let whole = json!({"id": "x", "object": "chat.completion", "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x".repeat(1025)}}]});
    let url = serve_pieces("application/json", vec![whole.to_string().into_bytes()]).await;
    let config = provider("hostile", Api::OpenAi, &base(Api::OpenAi, &url), false)
        .config
        .clone();
    let result = Provider::new(config)
        .unwrap()
        .with_limits(limits)
        .chat(&weather_conversation(), None)
        .await;
    too_large(result, "the answer's text", 1024);
}

/// `text` as the three APIs stream it, each delta a few characters.
fn streams_of(text: &str, arguments: &str) -> [(Api, String); 3] {
    let chars: Vec<char> = text.chars().collect();
    let deltas: Vec<String> = chars.chunks(3).map(|c| c.iter().collect()).collect();
    let openai = [
        openai_chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        deltas
            .iter()
            .map(|d| openai_chunk(json!({"content": d}), Value::Null))
            .collect(),
        openai_call(json!(0), "call_1", "get_weather", &arguments[..4]),
        openai_chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": &arguments[4..]}}]}),
            Value::Null,
        ),
        openai_chunk(json!({}), json!("tool_calls")),
        OPENAI_END.to_string(),
    ]
    .concat();
    let anthropic = [
        anthropic_start(),
        anthropic_block(json!(0), json!({"type": "text", "text": ""})),
        deltas.iter().map(|d| anthropic_text(json!(0), d)).collect(),
        anthropic_block(
            json!(1),
            json!({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
        ),
        anthropic_event(json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": arguments}})),
        anthropic_event(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}})),
        anthropic_event(json!({"type": "message_stop"})),
    ]
    .concat();
    let gemini: String = [
        deltas
            .iter()
            .map(|d| gemini_chunk(json!([{"text": d}]), None))
            .collect(),
        gemini_chunk(
            json!([{"functionCall": {"name": "get_weather", "args": serde_json::from_str::<Value>(arguments).unwrap()}}]),
            Some("STOP"),
        ),
    ]
    .concat();
    [
        (Api::OpenAi, openai),
        (Api::Anthropic, anthropic),
        (Api::Gemini, gemini),
    ]
}

#[tokio::test]
async fn characters_cut_between_reads_arrive_whole() {
    let text = "Le café coûte 5 €, le thé 4 € 😀 — 🇫🇷 ok";
    let arguments = r#"{"city": "Zürich €😀"}"#;
    for (api, stream) in streams_of(text, arguments) {
        let bytes = stream.into_bytes();
        // Cut inside every '€' after its first byte and inside every '😀' after its second.
        let mut cuts = Vec::new();
        for (euro, _) in String::from_utf8_lossy(&bytes).match_indices('€') {
            cuts.push(euro + 1);
        }
        for (smile, _) in String::from_utf8_lossy(&bytes).match_indices('😀') {
            cuts.push(smile + 2);
        }
        cuts.sort();
        assert!(cuts.len() >= 4, "{api:?}: {cuts:?}");
        let mut pieces = Vec::new();
        let mut from = 0;
        for cut in cuts {
            pieces.push(bytes[from..cut].to_vec());
            from = cut;
        }
        pieces.push(bytes[from..].to_vec());
        // And the same stream one byte per read, which cuts every character everywhere.
        let one_by_one: Vec<Vec<u8>> = bytes.chunks(1).map(<[u8]>::to_vec).collect();
        for pieces in [pieces, one_by_one] {
            let url = serve_pieces("text/event-stream", pieces).await;
            let answer = ask(api, &url, true).await.unwrap();
            assert_eq!(answer.message.content, text, "{api:?}");
            assert_eq!(answer.message.tool_calls.len(), 1, "{api:?}");
            assert_eq!(
                serde_json::from_str::<Value>(&answer.message.tool_calls[0].arguments).unwrap(),
                serde_json::from_str::<Value>(arguments).unwrap(),
                "{api:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_line_that_never_ends_is_an_error() {
    // 2 MiB of one `data:` line with no newline, in 64 KiB reads; the server then waits. The
    // client must give up on the line, not on the body (8 MiB) nor its timeout.
    let url = fake_provider(|mut socket| async move {
        write_head(&mut socket, "200 OK", "text/event-stream").await;
        let mut line = b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"".to_vec();
        line.resize(2 * MIB, b'a');
        for piece in line.chunks(64 * 1024) {
            if write_chunk(&mut socket, piece).await.is_err() {
                return;
            }
        }
        until_the_client_leaves(socket).await;
    })
    .await;
    too_large(
        ask(Api::OpenAi, &url, true).await,
        "one event-stream line",
        MIB,
    );
    // A line under the limit but over what one read brings is fine.
    let line = openai_chunk(json!({"content": "b".repeat(MIB - 1000)}), Value::Null);
    let pieces = [
        line,
        openai_chunk(json!({}), json!("stop")),
        OPENAI_END.to_string(),
    ]
    .concat()
    .into_bytes()
    .chunks(64 * 1024)
    .map(<[u8]>::to_vec)
    .collect();
    let url = serve_pieces("text/event-stream", pieces).await;
    let answer = ask(Api::OpenAi, &url, true).await.unwrap();
    assert_eq!(answer.message.content.len(), MIB - 1000);
}

#[tokio::test]
async fn token_counts_from_a_provider_never_wrap() {
    let max = Usage::MAX_REPORTED;
    // OpenAI, whole: u64::MAX completion tokens, negative prompt tokens.
    let whole = r#"{"id": "x", "object": "chat.completion", "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": -5, "completion_tokens": 18446744073709551615, "total_tokens": 18446744073709551610}}"#;
    let url = serve_pieces("application/json", vec![whole.as_bytes().to_vec()]).await;
    let answer = ask(Api::OpenAi, &url, false).await.unwrap();
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (0, max)
    );

    // OpenAI, streamed: a count past u64 (read as a float) and u64::MAX.
    let stream = [
        openai_chunk(json!({"role": "assistant", "content": "hi"}), json!("stop")),
        "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 100000000000000000000000000000, \"completion_tokens\": 18446744073709551615}}\n\n".to_string(),
        OPENAI_END.to_string(),
    ]
    .concat();
    let answer = ask_stream(Api::OpenAi, stream).await.unwrap();
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (max, max)
    );

    // Anthropic, streamed: u64::MAX in, a fraction out.
    let stream = [
        "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\"model\": \"claude\", \"content\": [], \"usage\": {\"input_tokens\": 18446744073709551615, \"output_tokens\": 1}}}\n\n".to_string(),
        anthropic_block(json!(0), json!({"type": "text", "text": "hi"})),
        "event: message_delta\ndata: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\"}, \"usage\": {\"output_tokens\": 12.5}}\n\n".to_string(),
        anthropic_event(json!({"type": "message_stop"})),
    ]
    .concat();
    let answer = ask_stream(Api::Anthropic, stream).await.unwrap();
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (max, 12)
    );

    // Gemini, whole: a string and a negative count.
    let value: Value = serde_json::from_str(r#"{"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": "12", "candidatesTokenCount": -3}}"#).unwrap();
    let answer = wire::gemini_parse(&value, "gemini").unwrap();
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (0, 0)
    );

    // Failover twice (A fails, B claims u64::MAX each time), adding up every attempt as the
    // agent loop does: nothing wraps or panics, and the cost stays a finite number.
    let (down, _) = recorded_server(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "application/json",
        "{}".into(),
        std::time::Duration::ZERO,
    )
    .await;
    let greedy = serve_pieces("application/json", vec![whole.as_bytes().to_vec()]).await;
    let providers = [
        provider("a", Api::OpenAi, &down, false),
        provider("b", Api::OpenAi, &greedy, false),
    ];
    let mut spent = Usage::default();
    let mut cost = 0.0;
    for _ in 0..2 {
        let outcome = chat_with_failover(&providers, &weather_conversation(), None).await;
        assert_eq!(outcome.result.unwrap().1, 1);
        for attempt in &outcome.attempts {
            spent.add(attempt.usage);
            cost += attempt.cost_usd;
        }
    }
    assert_eq!(spent.output_tokens, 2 * max);
    assert_eq!(spent.total(), 2 * max);
    // max output tokens at $15/M, twice.
    assert!(
        cost.is_finite() && (cost - 2.0 * max as f64 * 15.0 / 1e6).abs() < 1e-6,
        "{cost}"
    );
    // What others add (a delegated agent's reported usage) saturates too.
    spent.add(Usage {
        input_tokens: u64::MAX,
        output_tokens: u64::MAX,
    });
    assert_eq!((spent.input_tokens, spent.total()), (u64::MAX, u64::MAX));
}
