//! The OpenAI chat completions wire format (also spoken by vLLM, Ollama, llama.cpp's server and
//! LiteLLM).

use serde_json::{Value, json};

use crate::limits::ResponseLimits;
use crate::model::{ChatRequest, ChatResponse, FinishReason, Message, Role, ToolCall, Usage};
use crate::provider::LlmError;

pub fn request_body(model: &str, request: &ChatRequest, stream: bool) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| match m.role {
            Role::System => json!({"role": "system", "content": m.content}),
            Role::User => json!({"role": "user", "content": m.content}),
            Role::Assistant if m.tool_calls.is_empty() => {
                json!({"role": "assistant", "content": m.content})
            }
            Role::Assistant => json!({
                "role": "assistant",
                "content": if m.content.is_empty() { Value::Null } else { json!(m.content) },
                "tool_calls": m.tool_calls.iter().map(|c| json!({
                    "id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}
                })).collect::<Vec<_>>(),
            }),
            Role::Tool => json!({
                "role": "tool",
                "tool_call_id": m.tool_call_id,
                "content": m.content,
            }),
        })
        .collect();
    let mut body = json!({"model": model, "messages": messages});
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect();
    }
    if let Some(max) = request.max_tokens {
        body["max_tokens"] = json!(max);
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn finish(reason: Option<&str>, has_calls: bool) -> FinishReason {
    match reason {
        Some("tool_calls") | Some("function_call") => FinishReason::ToolCalls,
        Some("length") => FinishReason::Length,
        Some("stop") | None if has_calls => FinishReason::ToolCalls,
        Some("stop") | None => FinishReason::Stop,
        Some(other) => FinishReason::Other(other.to_string()),
    }
}

fn usage(value: &Value) -> Usage {
    Usage {
        input_tokens: Usage::reported(&value["prompt_tokens"]),
        output_tokens: Usage::reported(&value["completion_tokens"]),
    }
}

/// A tool call's arguments as text: OpenAI sends a JSON string; some compatible servers send
/// the object itself.
fn arguments_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub fn parse_response(value: &Value) -> Result<ChatResponse, LlmError> {
    if let Some(error) = value.get("error") {
        return Err(LlmError::Protocol(format!(
            "error in a 200 answer: {error}"
        )));
    }
    let choice = value["choices"]
        .get(0)
        .ok_or_else(|| LlmError::Protocol("no choices in the answer".into()))?;
    let message = &choice["message"];
    let tool_calls: Vec<ToolCall> = message["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .enumerate()
                .map(|(i, c)| ToolCall {
                    id: c["id"]
                        .as_str()
                        .map_or_else(|| format!("call_{i}"), str::to_string),
                    name: c["function"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    arguments: arguments_text(&c["function"]["arguments"]),
                })
                .collect()
        })
        .unwrap_or_default();
    let finish = finish(choice["finish_reason"].as_str(), !tool_calls.is_empty());
    Ok(ChatResponse {
        message: Message::assistant_with_calls(
            message["content"].as_str().unwrap_or_default().to_string(),
            tool_calls,
        ),
        finish,
        usage: usage(&value["usage"]),
        model: value["model"].as_str().unwrap_or_default().to_string(),
    })
}

/// Accumulates streamed chunks: content deltas appended, tool calls assembled by index, all
/// within the limits.
pub(crate) struct StreamState {
    limits: ResponseLimits,
    content: String,
    calls: Vec<(String, String, String)>,
    finish: Option<String>,
    usage: Usage,
    model: String,
}

impl StreamState {
    pub fn new(limits: ResponseLimits) -> Self {
        Self {
            limits,
            content: String::new(),
            calls: Vec::new(),
            finish: None,
            usage: Usage::default(),
            model: String::new(),
        }
    }

    pub fn push(&mut self, chunk: &Value) -> Result<(), LlmError> {
        if let Some(model) = chunk["model"].as_str() {
            self.model = model.to_string();
        }
        if chunk["usage"].is_object() {
            self.usage = usage(&chunk["usage"]);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return Ok(());
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish = Some(reason.to_string());
        }
        let delta = &choice["delta"];
        let limits = self.limits;
        if let Some(text) = delta["content"].as_str() {
            limits.append(&mut self.content, text, "the answer's text")?;
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            // The next call or one already begun: never a jump ahead (no padding up to an
            // index a provider made up).
            let index = limits.slot(&call["index"], self.calls.len(), "tool call")?;
            if index == self.calls.len() {
                self.calls.push(Default::default());
            }
            let slot = &mut self.calls[index];
            if let Some(id) = call["id"].as_str() {
                slot.0.clear();
                limits.append(&mut slot.0, id, "a tool call's id")?;
            }
            if let Some(name) = call["function"]["name"].as_str() {
                limits.append(&mut slot.1, name, "a tool call's name")?;
            }
            if let Some(arguments) = call["function"]["arguments"].as_str() {
                limits.append(&mut slot.2, arguments, "a tool call's arguments")?;
            }
        }
        Ok(())
    }

    pub fn finish(self) -> ChatResponse {
        let tool_calls: Vec<ToolCall> = self
            .calls
            .into_iter()
            .enumerate()
            .map(|(i, (id, name, arguments))| ToolCall {
                id: if id.is_empty() {
                    format!("call_{i}")
                } else {
                    id
                },
                name,
                arguments,
            })
            .collect();
        let finish = finish(self.finish.as_deref(), !tool_calls.is_empty());
        ChatResponse {
            message: Message::assistant_with_calls(self.content, tool_calls),
            finish,
            usage: self.usage,
            model: self.model,
        }
    }
}

/// Reads a stream to its `[DONE]`: a stream that ends before it (the connection closed
/// midway) is an error, never the truncated answer.
pub(crate) async fn read_stream(
    response: reqwest::Response,
    limits: &ResponseLimits,
) -> Result<ChatResponse, LlmError> {
    let mut state = StreamState::new(*limits);
    let mut done = false;
    crate::sse::read_events(response, limits, |event| {
        if event.data.trim() == "[DONE]" {
            done = true;
            return Ok(false);
        }
        let chunk: Value = serde_json::from_str(&event.data)
            .map_err(|e| LlmError::Protocol(format!("a streamed chunk is not JSON: {e}")))?;
        if let Some(error) = chunk.get("error") {
            return Err(LlmError::Protocol(format!("error in the stream: {error}")));
        }
        state.push(&chunk)?;
        Ok(true)
    })
    .await?;
    if !done {
        return Err(LlmError::Protocol(
            "the stream ended before [DONE]: the answer is incomplete".into(),
        ));
    }
    Ok(state.finish())
}
