//! `concord-conformance-fixture`: an MCP server, written without any SDK, that implements every
//! tool, prompt and resource the official conformance suite (`@modelcontextprotocol/conformance`,
//! server mode) calls by name, so that the suite can be pointed at it directly or through the
//! gateway.
//!
//! It speaks newline-delimited JSON-RPC on stdin/stdout (logs go to stderr), or streamable HTTP
//! on `/mcp` with `--http ADDR`. Over HTTP every request is answered with an SSE stream that
//! carries, in order, the messages the request causes (log and progress notifications, the
//! server's own `sampling/createMessage` and `elicitation/create` requests) and finally the
//! response. The client answers the server's requests with separate POSTs. Sessions are kept in
//! memory; GET opens the session's stream for unsolicited messages; every SSE event has an id
//! so that a client that lost a stream can resume it with `Last-Event-ID`; DELETE ends a
//! session. When bound to a loopback address it rejects requests whose Host or Origin is not
//! loopback (DNS rebinding protection).
//!
//! Usage: `concord-conformance-fixture [--http ADDR]`

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

const LATEST_VERSION: &str = "2025-11-25";
const SUPPORTED_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// Protocol versions from this one on get SSE priming events (an id and empty data).
const PRIMING_SINCE: &str = "2025-11-25";
const LEVELS: [&str; 8] = [
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
];
/// Reconnection delay advertised in the priming event's `retry` field, in milliseconds.
const RETRY_MS: u64 = 500;
/// How long a tool waits for the client to answer a sampling or elicitation request.
const CLIENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Events of the standalone (GET) stream kept for resumption.
const STANDALONE_REPLAY: usize = 256;
const SESSION_HEADER: &str = "mcp-session-id";

/// A 1x1 red PNG.
const PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR42mP4z8AAAAMBAQD3A0FDAAAAAElFTkSuQmCC";
/// Eight samples of silence: 8 kHz, mono, 8-bit PCM.
const WAV_BASE64: &str = "UklGRiwAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQgAAACAgICAgICAgA==";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// SSE streams
// ---------------------------------------------------------------------------------------------

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// One SSE stream of an HTTP session: the response stream of one POSTed request, or the
/// session's standalone GET stream. Each message written to it is kept under an event id
/// (`STREAM-SEQ`) so that a client whose connection dropped can resume with `Last-Event-ID`;
/// the connection currently reading it, if any, is `live`.
struct SseStream {
    id: u64,
    keep: usize,
    inner: Mutex<SseInner>,
}

struct SseInner {
    events: VecDeque<(u64, Bytes)>,
    next_seq: u64,
    live: Option<mpsc::UnboundedSender<Bytes>>,
    finished: bool,
}

impl SseStream {
    fn new(keep: usize) -> Arc<Self> {
        Arc::new(SseStream {
            id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            keep,
            inner: Mutex::new(SseInner {
                events: VecDeque::new(),
                next_seq: 1,
                live: None,
                finished: false,
            }),
        })
    }

    /// Writes one message; `last` ends the stream (the connection closes once it is flushed).
    /// Returns whether a live connection took the message.
    fn send(&self, message: &Value, last: bool) -> bool {
        let mut inner = lock(&self.inner);
        if inner.finished {
            return false;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let frame = Bytes::from(format!(
            "id: {}-{seq}\nevent: message\ndata: {message}\n\n",
            self.id
        ));
        inner.events.push_back((seq, frame.clone()));
        while inner.events.len() > self.keep {
            inner.events.pop_front();
        }
        let delivered = inner
            .live
            .as_ref()
            .is_some_and(|live| live.send(frame).is_ok());
        if !delivered || last {
            inner.live = None;
        }
        if last {
            inner.finished = true;
        }
        delivered
    }

    /// Starts a connection on this stream: an optional priming event (the current event id and
    /// a `retry` field, empty data), then every kept event after `after`, then what comes next,
    /// unless the stream has already finished. Replaces any previous connection.
    fn attach(&self, after: Option<u64>, priming: bool) -> mpsc::UnboundedReceiver<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = lock(&self.inner);
        if priming {
            let _ = tx.send(Bytes::from(format!(
                "id: {}-{}\nretry: {RETRY_MS}\ndata: \n\n",
                self.id,
                inner.next_seq - 1
            )));
        }
        if let Some(after) = after {
            for (_, frame) in inner.events.iter().filter(|(seq, _)| *seq > after) {
                let _ = tx.send(frame.clone());
            }
        }
        if !inner.finished {
            inner.live = Some(tx);
        }
        rx
    }

    /// Closes the current connection without ending the stream (the client may resume it).
    fn detach(&self) {
        lock(&self.inner).live = None;
    }

    /// Ends the stream without a further message.
    fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.finished = true;
        inner.live = None;
    }

    fn finished(&self) -> bool {
        lock(&self.inner).finished
    }
}

// ---------------------------------------------------------------------------------------------
// Peers and calls
// ---------------------------------------------------------------------------------------------

/// One connected client: the stdio peer, or one HTTP session.
#[derive(Default)]
struct Peer {
    next_request: AtomicU64,
    /// The server's own requests awaiting the client's answer, by JSON-encoded id.
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// In-flight client requests, by JSON-encoded id, so a cancellation can stop them.
    running: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// Index into `LEVELS` of the least severe level sent.
    min_level: AtomicUsize,
    protocol_version: Mutex<String>,
    client_capabilities: Mutex<Value>,
    subscriptions: Mutex<HashSet<String>>,
    /// Stdio mode: the writer of stdout.
    stdout: Option<mpsc::UnboundedSender<Value>>,
    /// HTTP mode: the standalone GET stream, once the client opened it.
    standalone: Mutex<Option<Arc<SseStream>>>,
    /// HTTP mode: every stream that may still be resumed, by stream id.
    streams: Mutex<HashMap<u64, Arc<SseStream>>>,
}

impl Peer {
    fn protocol_version(&self) -> String {
        lock(&self.protocol_version).clone()
    }

    fn primes_streams(&self) -> bool {
        self.protocol_version().as_str() >= PRIMING_SINCE
    }

    /// Sends a message that belongs to no request: on stdout, or on the GET stream (dropped
    /// when the client has not opened one).
    fn send_unsolicited(&self, message: Value) {
        if let Some(stdout) = &self.stdout {
            let _ = stdout.send(message);
        } else if let Some(stream) = lock(&self.standalone).clone() {
            stream.send(&message, false);
        } else {
            eprintln!("conformance-fixture: no GET stream open; dropped {message}");
        }
    }

    /// Hands the client's answer to the server request waiting for it.
    fn resolve(&self, message: Value) {
        let key = message["id"].to_string();
        match lock(&self.pending).remove(&key) {
            Some(waiter) => {
                let _ = waiter.send(message);
            }
            None => eprintln!("conformance-fixture: answer to unknown request {key}"),
        }
    }

    fn log_enabled(&self, level: &str) -> bool {
        let rank = LEVELS.iter().position(|l| *l == level).unwrap_or(0);
        rank >= self.min_level.load(Ordering::Relaxed)
    }
}

/// Where the messages that one request causes go.
#[derive(Clone)]
enum Route {
    Stdout(mpsc::UnboundedSender<Value>),
    /// The request's own SSE response stream.
    Stream(Arc<SseStream>),
    /// An HTTP request answered with plain JSON: related messages go to the GET stream.
    Standalone,
}

/// One client request being handled.
struct Call {
    peer: Arc<Peer>,
    route: Route,
}

impl Call {
    fn send(&self, message: Value) {
        match &self.route {
            Route::Stdout(stdout) => {
                let _ = stdout.send(message);
            }
            Route::Stream(stream) => {
                stream.send(&message, false);
            }
            Route::Standalone => self.peer.send_unsolicited(message),
        }
    }

    fn notify(&self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn log(&self, level: &str, data: &str) {
        if self.peer.log_enabled(level) {
            self.notify(
                "notifications/message",
                json!({"level": level, "logger": "conformance-fixture", "data": data}),
            );
        }
    }

    /// Sends a request to the client on this call's route and waits for its answer.
    async fn request(&self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.peer.next_request.fetch_add(1, Ordering::Relaxed);
        let key = json!(id).to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.peer.pending).insert(key.clone(), tx);
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let answer = tokio::time::timeout(CLIENT_ANSWER_TIMEOUT, rx).await;
        lock(&self.peer.pending).remove(&key);
        match answer {
            Ok(Ok(reply)) => match reply.get("result") {
                Some(result) => Ok(result.clone()),
                None => Err(reply["error"]["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| reply["error"].to_string())),
            },
            Ok(Err(_)) => Err("the session ended before the client answered".into()),
            Err(_) => Err(format!("the client did not answer {method} in time")),
        }
    }

    /// Closes the connection carrying this call's stream, leaving the stream resumable.
    fn disconnect(&self) {
        if let Route::Stream(stream) = &self.route {
            stream.detach();
        }
    }

    fn client_supports(&self, capability: &str) -> bool {
        lock(&self.peer.client_capabilities)
            .get(capability)
            .is_some_and(Value::is_object)
    }
}

// ---------------------------------------------------------------------------------------------
// The fixtures
// ---------------------------------------------------------------------------------------------

fn text(text: impl Into<String>) -> Value {
    json!({"type": "text", "text": text.into()})
}

fn text_result(message: impl Into<String>) -> Value {
    json!({"content": [text(message)]})
}

fn error_result(message: impl Into<String>) -> Value {
    json!({"content": [text(message)], "isError": true})
}

fn invalid_params(message: impl Into<String>) -> Value {
    json!({"code": -32602, "message": message.into()})
}

fn tool(name: &str, description: &str, properties: Value, required: &[&str]) -> Value {
    json!({
        "name": name,
        "description": description,
        "inputSchema": {"type": "object", "properties": properties, "required": required},
    })
}

fn tools() -> Value {
    let none = || json!({});
    json!({"tools": [
        tool("test_simple_text", "Returns a simple text response", none(), &[]),
        tool("test_image_content", "Returns a 1x1 PNG image", none(), &[]),
        tool("test_audio_content", "Returns a short WAV clip", none(), &[]),
        tool("test_embedded_resource", "Returns an embedded text resource", none(), &[]),
        tool("test_multiple_content_types", "Returns text, image and resource content", none(), &[]),
        tool("test_tool_with_logging", "Sends three info log messages while running", none(), &[]),
        tool("test_tool_with_progress", "Reports progress 0, 50 and 100 of 100", none(), &[]),
        tool("test_error_handling", "Always fails with isError: true", none(), &[]),
        tool(
            "test_sampling",
            "Asks the client's LLM (sampling/createMessage) and returns its answer",
            json!({"prompt": {"type": "string", "description": "The prompt to send to the LLM"}}),
            &["prompt"],
        ),
        tool(
            "test_elicitation",
            "Asks the user for a username and email (elicitation/create)",
            json!({"message": {"type": "string", "description": "The message to show the user"}}),
            &["message"],
        ),
        tool(
            "test_elicitation_sep1034_defaults",
            "Elicitation whose schema has defaults for every primitive type (SEP-1034)",
            none(),
            &[],
        ),
        tool(
            "test_elicitation_sep1330_enums",
            "Elicitation with all five enum schema variants (SEP-1330)",
            none(),
            &[],
        ),
        tool(
            "test_list_roots",
            "Asks the client for its roots (roots/list) while running and returns them (not a suite fixture)",
            none(),
            &[],
        ),
        tool(
            "test_reconnection",
            "Closes the SSE stream mid-call; the result arrives after the client resumes (SEP-1699)",
            none(),
            &[],
        ),
        {
            "name": "json_schema_2020_12_tool",
            "description": "Tool with JSON Schema 2020-12 features",
            "inputSchema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "$defs": {
                    "address": {
                        "type": "object",
                        "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    },
                },
                "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
                "additionalProperties": false,
            },
        },
    ]})
}

fn embedded(uri: &str, mime_type: &str, body: &str) -> Value {
    json!({"type": "resource", "resource": {"uri": uri, "mimeType": mime_type, "text": body}})
}

fn image() -> Value {
    json!({"type": "image", "data": PNG_BASE64, "mimeType": "image/png"})
}

async fn elicit(call: &Call, message: &str, schema: Value, label: &str) -> Value {
    if !call.client_supports("elicitation") {
        return error_result("The client does not support elicitation");
    }
    let params = json!({"message": message, "requestedSchema": schema});
    match call.request("elicitation/create", params).await {
        Ok(answer) => {
            let content = answer.get("content").cloned().unwrap_or(Value::Null);
            text_result(format!(
                "{label}: action={}, content={content}",
                answer["action"].as_str().unwrap_or("unknown")
            ))
        }
        Err(error) => error_result(format!("Elicitation failed: {error}")),
    }
}

async fn call_tool(call: &Call, params: &Value) -> Result<Value, Value> {
    let args = &params["arguments"];
    let name = params["name"].as_str().unwrap_or_default();
    Ok(match name {
        "test_simple_text" => text_result("This is a simple text response for testing."),
        "test_image_content" => json!({"content": [image()]}),
        "test_audio_content" => {
            json!({"content": [{"type": "audio", "data": WAV_BASE64, "mimeType": "audio/wav"}]})
        }
        "test_embedded_resource" => json!({"content": [embedded(
            "test://embedded-resource",
            "text/plain",
            "This is an embedded resource content.",
        )]}),
        "test_multiple_content_types" => json!({"content": [
            text("Multiple content types test:"),
            image(),
            embedded(
                "test://mixed-content-resource",
                "application/json",
                r#"{"test":"data","value":123}"#,
            ),
        ]}),
        "test_tool_with_logging" => {
            call.log("info", "Tool execution started");
            tokio::time::sleep(Duration::from_millis(50)).await;
            call.log("info", "Tool processing data");
            tokio::time::sleep(Duration::from_millis(50)).await;
            call.log("info", "Tool execution completed");
            text_result("Tool with logging executed successfully")
        }
        "test_tool_with_progress" => {
            let token = params["_meta"]["progressToken"].clone();
            for (step, progress) in [0, 50, 100].into_iter().enumerate() {
                if step > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if !token.is_null() {
                    call.notify(
                        "notifications/progress",
                        json!({"progressToken": token, "progress": progress, "total": 100}),
                    );
                }
            }
            text_result("Tool with progress executed successfully")
        }
        "test_error_handling" => {
            error_result("This tool intentionally returns an error for testing")
        }
        "test_sampling" => {
            if !call.client_supports("sampling") {
                return Ok(error_result("The client does not support sampling"));
            }
            let prompt = args["prompt"]
                .as_str()
                .unwrap_or("Test prompt for sampling");
            let request = json!({
                "messages": [{"role": "user", "content": {"type": "text", "text": prompt}}],
                "maxTokens": 100,
            });
            match call.request("sampling/createMessage", request).await {
                Ok(answer) => {
                    let reply = match answer["content"]["text"].as_str() {
                        Some(reply) => reply.to_string(),
                        None => answer["content"].to_string(),
                    };
                    text_result(format!("LLM response: {reply}"))
                }
                Err(error) => error_result(format!("Sampling failed: {error}")),
            }
        }
        "test_list_roots" => {
            if !call.client_supports("roots") {
                return Ok(error_result("The client does not support roots"));
            }
            match call.request("roots/list", json!({})).await {
                Ok(answer) => {
                    let mut result = text_result(format!("Roots: {}", answer["roots"]));
                    result["structuredContent"] = json!({"roots": answer["roots"]});
                    result
                }
                Err(error) => error_result(format!("roots/list failed: {error}")),
            }
        }
        "test_elicitation" => {
            let message = args["message"]
                .as_str()
                .unwrap_or("Please provide your information");
            let schema = json!({
                "type": "object",
                "properties": {
                    "username": {"type": "string", "description": "User's response"},
                    "email": {"type": "string", "description": "User's email address"},
                },
                "required": ["username", "email"],
            });
            elicit(call, message, schema, "User response").await
        }
        "test_elicitation_sep1034_defaults" => {
            let schema = json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "User name", "default": "John Doe"},
                    "age": {"type": "integer", "description": "User age", "default": 30},
                    "score": {"type": "number", "description": "User score", "default": 95.5},
                    "status": {
                        "type": "string",
                        "description": "User status",
                        "enum": ["active", "inactive", "pending"],
                        "default": "active",
                    },
                    "verified": {"type": "boolean", "description": "Verification status", "default": true},
                },
                "required": [],
            });
            let message = "Please review and update the form fields with defaults";
            elicit(call, message, schema, "Elicitation completed").await
        }
        "test_elicitation_sep1330_enums" => {
            let schema = json!({
                "type": "object",
                "properties": {
                    "untitledSingle": {
                        "type": "string",
                        "description": "Untitled single-select",
                        "enum": ["option1", "option2", "option3"],
                    },
                    "titledSingle": {
                        "type": "string",
                        "description": "Titled single-select",
                        "oneOf": [
                            {"const": "value1", "title": "First Option"},
                            {"const": "value2", "title": "Second Option"},
                            {"const": "value3", "title": "Third Option"},
                        ],
                    },
                    "legacyEnum": {
                        "type": "string",
                        "description": "Legacy titled enum",
                        "enum": ["opt1", "opt2", "opt3"],
                        "enumNames": ["Option One", "Option Two", "Option Three"],
                    },
                    "untitledMulti": {
                        "type": "array",
                        "description": "Untitled multi-select",
                        "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                    },
                    "titledMulti": {
                        "type": "array",
                        "description": "Titled multi-select",
                        "items": {"anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]},
                    },
                },
                "required": [],
            });
            let message = "Please choose from the enum fields";
            elicit(call, message, schema, "Elicitation completed").await
        }
        "test_reconnection" => {
            call.disconnect();
            tokio::time::sleep(Duration::from_millis(100)).await;
            text_result("Reconnection test completed successfully")
        }
        "json_schema_2020_12_tool" => text_result(format!("Received {args}")),
        other => return Err(invalid_params(format!("Unknown tool: {other}"))),
    })
}

fn prompts() -> Value {
    let argument = |name: &str, description: &str| json!({"name": name, "description": description, "required": true});
    json!({"prompts": [
        {"name": "test_simple_prompt", "description": "A simple prompt without arguments"},
        {
            "name": "test_prompt_with_arguments",
            "description": "A prompt with two required arguments",
            "arguments": [argument("arg1", "First test argument"), argument("arg2", "Second test argument")],
        },
        {
            "name": "test_prompt_with_embedded_resource",
            "description": "A prompt that embeds a resource",
            "arguments": [argument("resourceUri", "URI of the resource to embed")],
        },
        {"name": "test_prompt_with_image", "description": "A prompt with image content"},
    ]})
}

fn get_prompt(params: &Value) -> Result<Value, Value> {
    let args = &params["arguments"];
    let user = |content: Value| json!({"role": "user", "content": content});
    let messages = match params["name"].as_str().unwrap_or_default() {
        "test_simple_prompt" => vec![user(text("This is a simple prompt for testing."))],
        "test_prompt_with_arguments" => {
            let (Some(arg1), Some(arg2)) = (args["arg1"].as_str(), args["arg2"].as_str()) else {
                return Err(invalid_params("arg1 and arg2 are required"));
            };
            vec![user(text(format!(
                "Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
            )))]
        }
        "test_prompt_with_embedded_resource" => {
            let Some(uri) = args["resourceUri"].as_str() else {
                return Err(invalid_params("resourceUri is required"));
            };
            vec![
                user(embedded(
                    uri,
                    "text/plain",
                    "Embedded resource content for testing.",
                )),
                user(text("Please process the embedded resource above.")),
            ]
        }
        "test_prompt_with_image" => {
            vec![user(image()), user(text("Please analyze the image above."))]
        }
        other => return Err(invalid_params(format!("Unknown prompt: {other}"))),
    };
    Ok(json!({ "messages": messages }))
}

fn resources() -> Value {
    json!({"resources": [
        {
            "uri": "test://static-text",
            "name": "static-text",
            "description": "A static text resource",
            "mimeType": "text/plain",
        },
        {
            "uri": "test://static-binary",
            "name": "static-binary",
            "description": "A static binary resource (a PNG)",
            "mimeType": "image/png",
        },
        {
            "uri": "test://watched-resource",
            "name": "watched-resource",
            "description": "A resource that can be subscribed to",
            "mimeType": "text/plain",
        },
    ]})
}

fn read_resource(params: &Value) -> Result<Value, Value> {
    let uri = params["uri"].as_str().unwrap_or_default();
    let content = match uri {
        "test://static-text" => json!({
            "uri": uri, "mimeType": "text/plain",
            "text": "This is the content of the static text resource.",
        }),
        "test://static-binary" => json!({"uri": uri, "mimeType": "image/png", "blob": PNG_BASE64}),
        "test://watched-resource" => json!({
            "uri": uri, "mimeType": "text/plain", "text": "Watched resource content",
        }),
        _ => match uri
            .strip_prefix("test://template/")
            .and_then(|rest| rest.strip_suffix("/data"))
            .filter(|id| !id.is_empty() && !id.contains('/'))
        {
            Some(id) => json!({
                "uri": uri,
                "mimeType": "application/json",
                "text": json!({"id": id, "templateTest": true, "data": format!("Data for ID: {id}")}).to_string(),
            }),
            None => {
                return Err(json!({
                    "code": -32002, "message": format!("Resource not found: {uri}"), "data": {"uri": uri},
                }));
            }
        },
    };
    Ok(json!({ "contents": [content] }))
}

fn complete(params: &Value) -> Value {
    let typed = params["argument"]["value"].as_str().unwrap_or_default();
    let candidates: &[&str] = match (
        params["ref"]["type"].as_str(),
        params["argument"]["name"].as_str(),
    ) {
        (Some("ref/prompt"), Some("arg1" | "arg2")) => {
            &["paris", "park", "party", "test", "testing", "tested"]
        }
        (Some("ref/resource"), Some("id")) => &["1", "2", "3", "123"],
        _ => &[],
    };
    let values: Vec<&str> = candidates
        .iter()
        .copied()
        .filter(|c| c.starts_with(typed))
        .collect();
    json!({"completion": {"values": values, "total": values.len(), "hasMore": false}})
}

fn negotiate(requested: Option<&str>) -> &'static str {
    SUPPORTED_VERSIONS
        .iter()
        .find(|v| Some(**v) == requested)
        .copied()
        .unwrap_or(LATEST_VERSION)
}

async fn handle_request(call: &Call, method: &str, params: &Value) -> Result<Value, Value> {
    let peer = &call.peer;
    match method {
        "initialize" => {
            let version = negotiate(params["protocolVersion"].as_str());
            *lock(&peer.protocol_version) = version.to_string();
            *lock(&peer.client_capabilities) = params["capabilities"].clone();
            Ok(json!({
                "protocolVersion": version,
                "capabilities": {
                    "tools": {"listChanged": false},
                    "prompts": {"listChanged": false},
                    "resources": {"subscribe": true, "listChanged": false},
                    "logging": {},
                    "completions": {},
                },
                "serverInfo": {"name": "concord-conformance-fixture", "version": env!("CARGO_PKG_VERSION")},
            }))
        }
        "ping" => Ok(json!({})),
        "logging/setLevel" => {
            let level = params["level"].as_str().unwrap_or_default();
            let rank = LEVELS
                .iter()
                .position(|l| *l == level)
                .ok_or_else(|| invalid_params(format!("Unknown log level: {level}")))?;
            peer.min_level.store(rank, Ordering::Relaxed);
            Ok(json!({}))
        }
        "completion/complete" => Ok(complete(params)),
        "tools/list" => Ok(tools()),
        "tools/call" => call_tool(call, params).await,
        "prompts/list" => Ok(prompts()),
        "prompts/get" => get_prompt(params),
        "resources/list" => Ok(resources()),
        "resources/templates/list" => Ok(json!({"resourceTemplates": [{
            "uriTemplate": "test://template/{id}/data",
            "name": "template",
            "description": "A resource template whose content names its id",
            "mimeType": "application/json",
        }]})),
        "resources/read" => read_resource(params),
        "resources/subscribe" => {
            let uri = params["uri"].as_str().unwrap_or_default().to_string();
            lock(&peer.subscriptions).insert(uri.clone());
            // Announce one update shortly after, as a real watched resource would; it travels
            // outside any request (stdout, or the session's GET stream).
            let peer = peer.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if lock(&peer.subscriptions).contains(&uri) {
                    peer.send_unsolicited(json!({
                        "jsonrpc": "2.0",
                        "method": "notifications/resources/updated",
                        "params": {"uri": uri},
                    }));
                }
            });
            Ok(json!({}))
        }
        "resources/unsubscribe" => {
            let uri = params["uri"].as_str().unwrap_or_default();
            lock(&peer.subscriptions).remove(uri);
            Ok(json!({}))
        }
        other => Err(json!({"code": -32601, "message": format!("Method not found: {other}")})),
    }
}

/// Handles one request unless the client cancels it first; `None` means cancelled (no answer is
/// sent then).
async fn run_request(peer: Arc<Peer>, route: Route, message: Value) -> Option<Value> {
    let id = message["id"].clone();
    let key = id.to_string();
    let (cancel_tx, cancel_rx) = oneshot::channel();
    lock(&peer.running).insert(key.clone(), cancel_tx);
    let call = Call {
        peer: peer.clone(),
        route,
    };
    let method = message["method"].as_str().unwrap_or_default();
    let outcome = tokio::select! {
        outcome = handle_request(&call, method, &message["params"]) => Some(outcome),
        _ = cancel_rx => None,
    };
    lock(&peer.running).remove(&key);
    outcome.map(|outcome| match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
    })
}

fn handle_notification(peer: &Peer, message: &Value) {
    match message["method"].as_str() {
        Some("notifications/cancelled") => {
            let key = message["params"]["requestId"].to_string();
            eprintln!("conformance-fixture: request {key} cancelled");
            if let Some(stop) = lock(&peer.running).remove(&key) {
                let _ = stop.send(());
            }
        }
        Some(method) => eprintln!("conformance-fixture: notification {method}"),
        None => {}
    }
}

fn is_request(message: &Value) -> bool {
    message.get("method").is_some() && message.get("id").is_some()
}

fn is_response(message: &Value) -> bool {
    message.get("method").is_none()
        && message.get("id").is_some()
        && (message.get("result").is_some() || message.get("error").is_some())
}

// ---------------------------------------------------------------------------------------------
// Stdio
// ---------------------------------------------------------------------------------------------

async fn run_stdio() {
    let (outbox, mut outgoing) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(message) = outgoing.recv().await {
            let mut line = message.to_string();
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            let _ = stdout.flush().await;
        }
    });
    let peer = Arc::new(Peer {
        stdout: Some(outbox.clone()),
        ..Peer::default()
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            let _ = outbox.send(json!({
                "jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"},
            }));
            continue;
        };
        if is_request(&message) {
            let (peer, outbox) = (peer.clone(), outbox.clone());
            tokio::spawn(async move {
                if let Some(response) =
                    run_request(peer, Route::Stdout(outbox.clone()), message).await
                {
                    let _ = outbox.send(response);
                }
            });
        } else if is_response(&message) {
            peer.resolve(message);
        } else {
            handle_notification(&peer, &message);
        }
    }
    // Stdin closed: the client is gone. Whatever is still running has no one to answer to.
    drop(outbox);
    drop(peer);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP
// ---------------------------------------------------------------------------------------------

struct App {
    sessions: Mutex<HashMap<String, Arc<Peer>>>,
    /// Reject non-loopback Host and Origin headers (set when bound to a loopback address).
    loopback_only: bool,
}

fn new_session_id() -> String {
    let random = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    format!("{:016x}{:016x}", random(), random())
}

fn http_error(status: StatusCode, code: i64, message: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether an authority (`host[:port]`) names the loopback interface.
fn loopback_authority(authority: &str) -> bool {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, _)) => return inside == "::1",
            None => return false,
        }
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1"
}

fn loopback_request(headers: &HeaderMap) -> bool {
    let host_ok = header_str(headers, "host").is_none_or(loopback_authority);
    let origin_ok = header_str(headers, "origin").is_none_or(|origin| {
        origin
            .split_once("://")
            .is_some_and(|(_, authority)| loopback_authority(authority.trim_end_matches('/')))
    });
    host_ok && origin_ok
}

fn sse_response(rx: mpsc::UnboundedReceiver<Bytes>, session: Option<&str>) -> Response {
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    });
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(value) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.insert(SESSION_HEADER, value);
    }
    response
}

/// The session a non-initialize request belongs to, or the error response to send instead.
#[allow(clippy::result_large_err)]
fn session_of(app: &App, headers: &HeaderMap) -> Result<Arc<Peer>, Response> {
    let Some(id) = header_str(headers, SESSION_HEADER) else {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            -32000,
            "Bad Request: Mcp-Session-Id header is required",
        ));
    };
    let Some(peer) = lock(&app.sessions).get(id).cloned() else {
        return Err(http_error(
            StatusCode::NOT_FOUND,
            -32001,
            "Session not found",
        ));
    };
    if let Some(version) = header_str(headers, "mcp-protocol-version")
        && !SUPPORTED_VERSIONS.contains(&version)
    {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            -32000,
            &format!("Bad Request: unsupported MCP-Protocol-Version {version}"),
        ));
    }
    Ok(peer)
}

async fn mcp_endpoint(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if app.loopback_only && !loopback_request(&headers) {
        eprintln!(
            "conformance-fixture: rejected Host {:?} Origin {:?}",
            header_str(&headers, "host"),
            header_str(&headers, "origin")
        );
        return http_error(
            StatusCode::FORBIDDEN,
            -32000,
            "Forbidden: Host or Origin is not a loopback address",
        );
    }
    match method {
        Method::POST => http_post(&app, &headers, &body).await,
        Method::GET => http_get(&app, &headers),
        Method::DELETE => http_delete(&app, &headers),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, POST, DELETE")],
        )
            .into_response(),
    }
}

async fn http_post(app: &App, headers: &HeaderMap, body: &Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(body) else {
        return http_error(StatusCode::BAD_REQUEST, -32700, "Parse error");
    };
    if !message.is_object() {
        return http_error(
            StatusCode::BAD_REQUEST,
            -32600,
            "Invalid Request: send one JSON-RPC message per POST",
        );
    }
    let initialize = is_request(&message) && message["method"] == "initialize";
    let (peer, new_session) = if initialize {
        let peer = Arc::new(Peer::default());
        let version = negotiate(message["params"]["protocolVersion"].as_str());
        *lock(&peer.protocol_version) = version.to_string();
        let id = new_session_id();
        lock(&app.sessions).insert(id.clone(), peer.clone());
        eprintln!("conformance-fixture: new session {id} ({version})");
        (peer, Some(id))
    } else {
        match session_of(app, headers) {
            Ok(peer) => (peer, None),
            Err(response) => return response,
        }
    };
    if !is_request(&message) {
        if is_response(&message) {
            peer.resolve(message);
        } else {
            handle_notification(&peer, &message);
        }
        return StatusCode::ACCEPTED.into_response();
    }
    let accepts_sse =
        header_str(headers, "accept").is_some_and(|a| a.contains("text/event-stream"));
    if accepts_sse {
        let stream = SseStream::new(usize::MAX);
        lock(&peer.streams).insert(stream.id, stream.clone());
        let rx = stream.attach(None, peer.primes_streams());
        tokio::spawn(async move {
            let answer = run_request(peer.clone(), Route::Stream(stream.clone()), message).await;
            let delivered = match answer {
                Some(response) => stream.send(&response, true),
                None => {
                    stream.close();
                    true
                }
            };
            if delivered {
                lock(&peer.streams).remove(&stream.id);
            }
        });
        sse_response(rx, new_session.as_deref())
    } else {
        let answer = run_request(peer, Route::Standalone, message).await;
        let mut response = match answer {
            Some(answer) => (
                [(header::CONTENT_TYPE, "application/json")],
                answer.to_string(),
            )
                .into_response(),
            None => StatusCode::ACCEPTED.into_response(),
        };
        if let Some(value) = new_session.and_then(|s| HeaderValue::from_str(&s).ok()) {
            response.headers_mut().insert(SESSION_HEADER, value);
        }
        response
    }
}

fn http_get(app: &App, headers: &HeaderMap) -> Response {
    if !header_str(headers, "accept").is_some_and(|a| a.contains("text/event-stream")) {
        return http_error(
            StatusCode::NOT_ACCEPTABLE,
            -32000,
            "Not Acceptable: the client must accept text/event-stream",
        );
    }
    let peer = match session_of(app, headers) {
        Ok(peer) => peer,
        Err(response) => return response,
    };
    if let Some(last) = header_str(headers, "last-event-id") {
        let parsed = last
            .split_once('-')
            .and_then(|(s, n)| Some((s.parse::<u64>().ok()?, n.parse::<u64>().ok()?)));
        let stream = parsed.and_then(|(s, _)| lock(&peer.streams).get(&s).cloned());
        let (Some((_, seq)), Some(stream)) = (parsed, stream) else {
            return http_error(
                StatusCode::NOT_FOUND,
                -32000,
                "No stream to resume for that Last-Event-ID",
            );
        };
        eprintln!(
            "conformance-fixture: resuming stream {} after {seq}",
            stream.id
        );
        let rx = stream.attach(Some(seq), false);
        if stream.finished() {
            lock(&peer.streams).remove(&stream.id);
        }
        return sse_response(rx, None);
    }
    let stream = lock(&peer.standalone)
        .get_or_insert_with(|| SseStream::new(STANDALONE_REPLAY))
        .clone();
    lock(&peer.streams).insert(stream.id, stream.clone());
    sse_response(stream.attach(None, peer.primes_streams()), None)
}

fn http_delete(app: &App, headers: &HeaderMap) -> Response {
    let peer = match session_of(app, headers) {
        Ok(peer) => peer,
        Err(response) => return response,
    };
    if let Some(id) = header_str(headers, SESSION_HEADER) {
        lock(&app.sessions).remove(id);
        eprintln!("conformance-fixture: session {id} ended");
    }
    for stream in lock(&peer.streams).drain().map(|(_, s)| s) {
        stream.close();
    }
    lock(&peer.pending).clear();
    for (_, stop) in lock(&peer.running).drain() {
        let _ = stop.send(());
    }
    StatusCode::OK.into_response()
}

async fn run_http(addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let local = listener.local_addr().expect("local address");
    let app = Arc::new(App {
        sessions: Mutex::new(HashMap::new()),
        loopback_only: local.ip().is_loopback(),
    });
    eprintln!("concord-conformance-fixture listening on http://{local}/mcp");
    let router = Router::new()
        .route("/mcp", any(mcp_endpoint))
        .with_state(app);
    axum::serve(listener, router).await.expect("serve");
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut http = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--http" => http = args.next(),
            "--help" | "-h" => {
                println!("usage: concord-conformance-fixture [--http ADDR]");
                return;
            }
            other => {
                eprintln!("concord-conformance-fixture: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    match http {
        None => run_stdio().await,
        Some(addr) => run_http(&addr).await,
    }
}
