//! `concord-fixture`: a small MCP server speaking the real wire format (JSON-RPC 2.0 over stdio
//! lines or streamable HTTP with JSON responses), written without any SDK so that it can
//! misbehave on purpose: print garbage on stdout, hang, or crash mid-call. Tests use it where
//! no reference server can show a fault, and benchmarks use it as a fast upstream whose own
//! cost is negligible.
//!
//! Usage: `concord-fixture [--http ADDR] [--name NAME] [--garbage] [--stderr-invalid-utf8]
//! [--stderr-flood LINES] [--crash-after RESPONSES]`
//!
//! - `--garbage`: a non-JSON line on stdout before every message.
//! - `--stderr-invalid-utf8`: bytes that are not UTF-8 on stderr at start and before answering
//!   each request; a failed stderr write ends the process with status 141, as SIGPIPE ends a
//!   server whose stderr reader went away.
//! - `--stderr-flood LINES`: at start, one line of 1 MiB, then LINES short lines, then
//!   `flood done`, all on stderr.
//! - `--crash-after RESPONSES`: exits with status 3 right after writing that many responses
//!   (stdio only).

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};

#[derive(Default)]
struct State {
    name: String,
    calls: AtomicU64,
    cancelled: Mutex<Vec<Value>>,
    /// In-flight `slow` calls by request id, so a cancellation can stop them.
    running: Mutex<HashMap<String, oneshot::Sender<()>>>,
    extra_tools: Mutex<Vec<String>>,
    subscribed: Mutex<Vec<String>>,
    subscribe_calls: AtomicU64,
}

type Outbox = mpsc::UnboundedSender<Value>;

fn tool(name: &str, description: &str, properties: Value, read_only: bool) -> Value {
    json!({
        "name": name,
        "description": description,
        "inputSchema": {"type": "object", "properties": properties},
        "annotations": {"readOnlyHint": read_only},
    })
}

async fn tool_list(state: &State) -> Value {
    let mut tools = vec![
        tool(
            "echo",
            "Echoes back the message",
            json!({"message": {"type": "string"}}),
            true,
        ),
        tool(
            "slow",
            "Reports progress every 100 ms for `steps` steps; stops when cancelled",
            json!({"steps": {"type": "integer"}}),
            true,
        ),
        tool("hang", "Never answers", json!({}), true),
        tool(
            "review",
            "Approves a proposed state write unless its value mentions \"bad\"",
            json!({"key": {"type": "string"}, "proposed_value": {}}),
            true,
        ),
        tool(
            "touch",
            "Announces notifications/resources/updated for `uri` if it is subscribed",
            json!({"uri": {"type": "string"}}),
            false,
        ),
        tool(
            "log",
            "Sends `message` as a notifications/message log entry, then answers",
            json!({"message": {"type": "string"}}),
            true,
        ),
        tool(
            "crash",
            "Exits the server process without answering",
            json!({}),
            false,
        ),
        tool(
            "stats",
            "Counts calls and lists the request ids cancelled so far",
            json!({}),
            true,
        ),
        tool(
            "add_tool",
            "Adds a tool named `name` and announces tools/list_changed",
            json!({"name": {"type": "string"}}),
            false,
        ),
    ];
    if let Some(t) = tools.first_mut() {
        t["outputSchema"] = json!({"type": "object", "properties": {"echo": {"type": "string"}}});
    }
    for extra in state.extra_tools.lock().await.iter() {
        tools.push(tool(extra, "Added at run time", json!({}), true));
    }
    json!({ "tools": tools })
}

fn text_result(text: impl Into<String>) -> Value {
    json!({"content": [{"type": "text", "text": text.into()}]})
}

/// Answers one request; `None` means "send nothing" (hang).
async fn handle_request(
    state: &Arc<State>,
    outbox: Option<&Outbox>,
    message: &Value,
) -> Option<Value> {
    let id = message["id"].clone();
    let method = message["method"].as_str().unwrap_or_default();
    let params = &message["params"];
    let result = match method {
        "initialize" => Ok(json!({
            "protocolVersion": params["protocolVersion"].as_str().unwrap_or("2025-11-25"),
            "capabilities": {
                "tools": {"listChanged": true},
                "prompts": {"listChanged": false},
                "resources": {"listChanged": false, "subscribe": true},
                "logging": {},
                "completions": {},
            },
            "serverInfo": {"name": state.name, "version": "1.0.0"},
        })),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(tool_list(state).await),
        "prompts/list" => Ok(json!({"prompts": [{
            "name": "greet",
            "description": "A greeting",
            "arguments": [{"name": "who", "required": true}],
        }]})),
        "prompts/get" => Ok(json!({"messages": [{
            "role": "user",
            "content": {"type": "text", "text": format!("Hello, {}!", params["arguments"]["who"].as_str().unwrap_or("world"))},
        }]})),
        "resources/list" => Ok(json!({"resources": [{
            "uri": format!("fixture://{}/info", state.name), "name": "info", "mimeType": "text/plain",
        }]})),
        "resources/templates/list" => Ok(json!({"resourceTemplates": [{
            "uriTemplate": format!("fixture://{}/items/{{id}}", state.name), "name": "item",
        }]})),
        "resources/read" => Ok(json!({"contents": [{
            "uri": params["uri"], "mimeType": "text/plain",
            "text": format!("{} served {}", state.name, params["uri"].as_str().unwrap_or_default()),
        }]})),
        "logging/setLevel" => Ok(json!({})),
        "resources/subscribe" => {
            state.subscribe_calls.fetch_add(1, Ordering::Relaxed);
            let uri = params["uri"].as_str().unwrap_or_default().to_string();
            state.subscribed.lock().await.push(uri);
            Ok(json!({}))
        }
        "resources/unsubscribe" => {
            let uri = params["uri"].as_str().unwrap_or_default();
            state.subscribed.lock().await.retain(|u| u != uri);
            Ok(json!({}))
        }
        "completion/complete" => {
            // Prefixed with the server's name so tests can see which server answered.
            let typed = params["argument"]["value"].as_str().unwrap_or_default();
            let values: Vec<String> = ["Ada", "Alan", "Grace"]
                .iter()
                .filter(|c| c.starts_with(typed))
                .map(|c| format!("{}-{c}", state.name))
                .collect();
            Ok(json!({"completion": {"values": values, "total": values.len(), "hasMore": false}}))
        }
        "tools/call" => {
            state.calls.fetch_add(1, Ordering::Relaxed);
            let args = &params["arguments"];
            match params["name"].as_str().unwrap_or_default() {
                "echo" => {
                    let message = args["message"].as_str().unwrap_or_default();
                    let mut result = text_result(format!("Echo: {message}"));
                    result["structuredContent"] = json!({"echo": message});
                    if let Some(meta) = params.get("_meta") {
                        // Echo what arrived in _meta so tests can see what the gateway forwarded.
                        result["_meta"] = json!({"received": meta});
                    }
                    Ok(result)
                }
                "slow" => {
                    let steps = args["steps"].as_u64().unwrap_or(10);
                    let token = params["_meta"]["progressToken"].clone();
                    let (stop_tx, mut stop_rx) = oneshot::channel();
                    state.running.lock().await.insert(id.to_string(), stop_tx);
                    let mut done = 0;
                    while done < steps {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = &mut stop_rx => {
                                return None;
                            }
                        }
                        done += 1;
                        if let (Some(outbox), false) = (outbox, token.is_null()) {
                            let _ = outbox.send(json!({
                                "jsonrpc": "2.0",
                                "method": "notifications/progress",
                                "params": {"progressToken": token, "progress": done, "total": steps, "message": format!("step {done}")},
                            }));
                        }
                    }
                    state.running.lock().await.remove(&id.to_string());
                    Ok(text_result(format!("done after {steps} steps")))
                }
                "hang" => return None,
                "review" => {
                    let proposed = args["proposed_value"].to_string();
                    let approved = !proposed.contains("bad");
                    let reason = if approved {
                        "looks good".to_string()
                    } else {
                        format!(
                            "{} mentions something bad",
                            args["key"].as_str().unwrap_or("?")
                        )
                    };
                    let mut result = text_result(reason.clone());
                    result["structuredContent"] = json!({"approved": approved, "reason": reason});
                    Ok(result)
                }
                "touch" => {
                    let uri = args["uri"].as_str().unwrap_or_default().to_string();
                    let subscribed = state.subscribed.lock().await.contains(&uri);
                    if let (Some(outbox), true) = (outbox, subscribed) {
                        let _ = outbox.send(json!({
                            "jsonrpc": "2.0",
                            "method": "notifications/resources/updated",
                            "params": {"uri": uri},
                        }));
                    }
                    Ok(text_result(if subscribed {
                        "announced"
                    } else {
                        "not subscribed"
                    }))
                }
                "log" => {
                    let message = args["message"].as_str().unwrap_or_default().to_string();
                    if let Some(outbox) = outbox {
                        let _ = outbox.send(json!({
                            "jsonrpc": "2.0",
                            "method": "notifications/message",
                            "params": {"level": "warning", "data": message},
                        }));
                    }
                    Ok(text_result("logged"))
                }
                "crash" => {
                    eprintln!("fixture {}: crashing on purpose", state.name);
                    std::process::exit(3);
                }
                "stats" => {
                    let cancelled = state.cancelled.lock().await.clone();
                    let stats = json!({
                        "calls": state.calls.load(Ordering::Relaxed),
                        "cancelled": cancelled,
                        "pid": std::process::id(),
                        "subscribed": *state.subscribed.lock().await,
                        "subscribe_calls": state.subscribe_calls.load(Ordering::Relaxed),
                    });
                    let mut result = text_result(stats.to_string());
                    result["structuredContent"] = stats;
                    Ok(result)
                }
                "add_tool" => {
                    let name = args["name"].as_str().unwrap_or("extra").to_string();
                    state.extra_tools.lock().await.push(name.clone());
                    if let Some(outbox) = outbox {
                        let _ = outbox.send(
                            json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
                        );
                    }
                    Ok(text_result(format!("added {name}")))
                }
                other if state.extra_tools.lock().await.iter().any(|t| t == other) => {
                    Ok(text_result(format!("{other} ran")))
                }
                other => Err(json!({"code": -32602, "message": format!("Unknown tool: {other}")})),
            }
        }
        other => Err(json!({"code": -32601, "message": format!("Method not found: {other}")})),
    };
    Some(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
    })
}

async fn handle_notification(state: &Arc<State>, message: &Value) {
    if message["method"] == "notifications/cancelled" {
        let request_id = message["params"]["requestId"].clone();
        eprintln!("fixture {}: cancelled request {request_id}", state.name);
        state.cancelled.lock().await.push(request_id.clone());
        if let Some(stop) = state.running.lock().await.remove(&request_id.to_string()) {
            let _ = stop.send(());
        }
    }
}

/// Ways the stdio server misbehaves besides `--garbage`.
#[derive(Default, Clone, Copy)]
struct Misbehaviour {
    stderr_invalid_utf8: bool,
    stderr_flood: Option<u64>,
    crash_after: Option<u64>,
}

/// Writes to stderr; a closed stderr ends the process as SIGPIPE would.
fn write_stderr(bytes: &[u8]) {
    let mut stderr = std::io::stderr().lock();
    if stderr
        .write_all(bytes)
        .and_then(|()| stderr.flush())
        .is_err()
    {
        std::process::exit(141);
    }
}

fn stderr_at_start(misbehaviour: Misbehaviour) {
    if misbehaviour.stderr_invalid_utf8 {
        write_stderr(b"fixture starting \xff\xfe\xc3 (not UTF-8)\n");
    }
    if let Some(lines) = misbehaviour.stderr_flood {
        let mut huge = vec![b'h'; 1 << 20];
        huge.push(b'\n');
        write_stderr(&huge);
        let mut flood = Vec::new();
        for i in 0..lines {
            flood.extend_from_slice(format!("flood {i}\n").as_bytes());
            if flood.len() >= 64 * 1024 {
                write_stderr(&flood);
                flood.clear();
            }
        }
        flood.extend_from_slice(b"flood done\n");
        write_stderr(&flood);
    }
}

async fn run_stdio(state: Arc<State>, garbage: bool, misbehaviour: Misbehaviour) {
    stderr_at_start(misbehaviour);
    let (outbox, mut outgoing) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let mut responses = 0u64;
        while let Some(message) = outgoing.recv().await {
            if garbage {
                let _ = stdout.write_all(b"this line is not JSON-RPC {{{\n").await;
            }
            let mut line = message.to_string();
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            let _ = stdout.flush().await;
            if message.get("id").is_some() && message.get("method").is_none() {
                responses += 1;
                if misbehaviour.crash_after == Some(responses) {
                    eprintln!("fixture: crashing after {responses} responses");
                    std::process::exit(3);
                }
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message.get("id").is_some() && message.get("method").is_some() {
            if misbehaviour.stderr_invalid_utf8 {
                write_stderr(b"fixture \xc0\xaf request \xed\xa0\x80 (not UTF-8)\n");
            }
            let state = state.clone();
            let outbox = outbox.clone();
            tokio::spawn(async move {
                if let Some(response) = handle_request(&state, Some(&outbox), &message).await {
                    let _ = outbox.send(response);
                }
            });
        } else if message.get("method").is_some() {
            handle_notification(&state, &message).await;
        }
    }
    drop(outbox);
    let _ = writer.await;
}

async fn http_post(state: Arc<State>, headers: HeaderMap, body: Bytes) -> Response {
    let _ = headers;
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}})),
        )
            .into_response();
    };
    if message.get("id").is_some() && message.get("method").is_some() {
        match handle_request(&state, None, &message).await {
            Some(response) => (
                [(header::CONTENT_TYPE, "application/json")],
                response.to_string(),
            )
                .into_response(),
            None => std::future::pending().await,
        }
    } else {
        if message.get("method").is_some() {
            handle_notification(&state, &message).await;
        }
        StatusCode::ACCEPTED.into_response()
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut http = None;
    let mut name = "fixture".to_string();
    let mut garbage = false;
    let mut misbehaviour = Misbehaviour::default();
    let count = |flag: &str, value: Option<String>| -> u64 {
        value.and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("concord-fixture: {flag} needs a number");
            std::process::exit(2);
        })
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--http" => http = args.next(),
            "--name" => name = args.next().unwrap_or(name),
            "--garbage" => garbage = true,
            "--stderr-invalid-utf8" => misbehaviour.stderr_invalid_utf8 = true,
            "--stderr-flood" => misbehaviour.stderr_flood = Some(count(&arg, args.next())),
            "--crash-after" => misbehaviour.crash_after = Some(count(&arg, args.next())),
            other => {
                eprintln!("concord-fixture: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let state = Arc::new(State {
        name,
        ..State::default()
    });
    match http {
        None => run_stdio(state, garbage, misbehaviour).await,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
            eprintln!(
                "concord-fixture listening on http://{}/mcp",
                listener.local_addr().expect("addr")
            );
            let app = Router::new().route(
                "/mcp",
                post(move |headers: HeaderMap, body: Bytes| {
                    http_post(state.clone(), headers, body)
                })
                .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
                .delete(|| async { StatusCode::OK }),
            );
            axum::serve(listener, app).await.expect("serve");
        }
    }
}
