//! The Anthropic Messages wire format: the system prompt apart, content as typed blocks,
//! tool calls as `tool_use` blocks and their results as `tool_result` blocks in a user turn
//! (consecutive results share one turn; turns alternate).

use serde_json::{Value, json};

use crate::limits::ResponseLimits;
use crate::model::{ChatRequest, ChatResponse, FinishReason, Message, Role, ToolCall, Usage};
use crate::provider::LlmError;

pub fn request_body(model: &str, request: &ChatRequest, stream: bool, default_max: u32) -> Value {
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in request.messages.iter().filter(|m| m.role != Role::System) {
        let (role, blocks) = match m.role {
            Role::User => ("user", vec![json!({"type": "text", "text": m.content})]),
            Role::Tool => (
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}),
                ],
            ),
            _ => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(json!({"type": "text", "text": m.content}));
                }
                for call in &m.tool_calls {
                    let input: Value =
                        serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
                }
                ("assistant", blocks)
            }
        };
        match turns.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let mut body = json!({
        "model": model,
        "max_tokens": request.max_tokens.unwrap_or(default_max),
        "messages": turns.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect::<Vec<_>>(),
    });
    if let Some(system) = request.system_text() {
        body["system"] = json!(system);
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
            .collect();
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if stream {
        body["stream"] = json!(true);
    }
    body
}

fn finish(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("end_turn") | Some("stop_sequence") | None => FinishReason::Stop,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("max_tokens") => FinishReason::Length,
        Some(other) => FinishReason::Other(other.to_string()),
    }
}

pub fn parse_response(value: &Value) -> Result<ChatResponse, LlmError> {
    if value["type"] == "error" {
        return Err(LlmError::Protocol(format!(
            "error answer: {}",
            value["error"]
        )));
    }
    let blocks = value["content"]
        .as_array()
        .ok_or_else(|| LlmError::Protocol("no content in the answer".into()))?;
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for block in blocks {
        match block["type"].as_str() {
            Some("text") => content.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: block["id"].as_str().unwrap_or_default().to_string(),
                name: block["name"].as_str().unwrap_or_default().to_string(),
                arguments: block["input"].to_string(),
            }),
            _ => {}
        }
    }
    Ok(ChatResponse {
        message: Message::assistant_with_calls(content, tool_calls),
        finish: finish(value["stop_reason"].as_str()),
        usage: Usage {
            input_tokens: Usage::reported(&value["usage"]["input_tokens"]),
            output_tokens: Usage::reported(&value["usage"]["output_tokens"]),
        },
        model: value["model"].as_str().unwrap_or_default().to_string(),
    })
}

/// Rebuilds the final message from the stream's events, within the limits.
pub(crate) struct StreamState {
    limits: ResponseLimits,
    blocks: Vec<(String, String, String, String)>, // type, id, name, text-or-json
    stop_reason: Option<String>,
    usage: Usage,
    model: String,
}

impl StreamState {
    pub fn new(limits: ResponseLimits) -> Self {
        Self {
            limits,
            blocks: Vec::new(),
            stop_reason: None,
            usage: Usage::default(),
            model: String::new(),
        }
    }

    pub fn push(&mut self, event: &Value) -> Result<(), LlmError> {
        match event["type"].as_str() {
            Some("message_start") => {
                let message = &event["message"];
                self.model = message["model"].as_str().unwrap_or_default().to_string();
                self.usage.input_tokens = Usage::reported(&message["usage"]["input_tokens"]);
            }
            Some("content_block_start") => {
                // The next block or one already begun: never a jump ahead (no padding up to an
                // index a provider made up).
                let index =
                    self.limits
                        .slot(&event["index"], self.blocks.len(), "content block")?;
                let block = &event["content_block"];
                let text = block["text"].as_str().unwrap_or_default();
                self.limits
                    .check_field(text.len(), "a content block's text")?;
                let started = (
                    block["type"].as_str().unwrap_or_default().to_string(),
                    block["id"].as_str().unwrap_or_default().to_string(),
                    block["name"].as_str().unwrap_or_default().to_string(),
                    text.to_string(),
                );
                if index == self.blocks.len() {
                    self.blocks.push(started);
                } else {
                    self.blocks[index] = started;
                }
            }
            Some("content_block_delta") => {
                let delta = &event["delta"];
                let piece = delta["text"]
                    .as_str()
                    .or_else(|| delta["partial_json"].as_str())
                    .unwrap_or_default();
                let index = &event["index"];
                let block = index
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| self.blocks.get_mut(i))
                    .ok_or_else(|| {
                        LlmError::Protocol(format!(
                            "a delta for content block {index}, which never started"
                        ))
                    })?;
                self.limits
                    .append(&mut block.3, piece, "a content block's text")?;
            }
            Some("message_delta") => {
                if let Some(reason) = event["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(reason.to_string());
                }
                if !event["usage"]["output_tokens"].is_null() {
                    self.usage.output_tokens = Usage::reported(&event["usage"]["output_tokens"]);
                }
            }
            Some("error") => {
                return Err(LlmError::Protocol(format!(
                    "error in the stream: {}",
                    event["error"]
                )));
            }
            _ => {}
        }
        Ok(())
    }

    pub fn finish(self) -> ChatResponse {
        let mut content = String::new();
        let mut tool_calls = Vec::new();
        for (kind, id, name, text) in self.blocks {
            match kind.as_str() {
                "text" => content.push_str(&text),
                "tool_use" => tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: if text.is_empty() {
                        "{}".to_string()
                    } else {
                        text
                    },
                }),
                _ => {}
            }
        }
        ChatResponse {
            message: Message::assistant_with_calls(content, tool_calls),
            finish: finish(self.stop_reason.as_deref()),
            usage: self.usage,
            model: self.model,
        }
    }
}

/// Reads a stream to its `message_stop`: a stream that ends before it (the connection closed
/// midway) is an error, never the truncated answer.
pub(crate) async fn read_stream(
    response: reqwest::Response,
    limits: &ResponseLimits,
) -> Result<ChatResponse, LlmError> {
    let mut state = StreamState::new(*limits);
    let mut stopped = false;
    crate::sse::read_events(response, limits, |event| {
        let value: Value = serde_json::from_str(&event.data)
            .map_err(|e| LlmError::Protocol(format!("a streamed event is not JSON: {e}")))?;
        state.push(&value)?;
        stopped = value["type"] == "message_stop";
        Ok(!stopped)
    })
    .await?;
    if !stopped {
        return Err(LlmError::Protocol(
            "the stream ended before message_stop: the answer is incomplete".into(),
        ));
    }
    Ok(state.finish())
}
