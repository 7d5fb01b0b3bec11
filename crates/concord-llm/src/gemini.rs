//! The Google Gemini `generateContent` wire format: `user`/`model` turns of parts, a system
//! instruction apart, `functionCall` parts for tool calls and `functionResponse` parts (named
//! by the tool, in a user turn) for their results.

use serde_json::{Map, Value, json};

use crate::limits::ResponseLimits;
use crate::model::{ChatRequest, ChatResponse, FinishReason, Message, Role, ToolCall, Usage};
use crate::provider::LlmError;

/// Gemini takes an OpenAPI subset of JSON Schema: keys outside it are refused.
fn schema_for_gemini(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                if matches!(
                    key.as_str(),
                    "$schema" | "additionalProperties" | "$id" | "$defs"
                ) {
                    continue;
                }
                out.insert(key.clone(), schema_for_gemini(value));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(schema_for_gemini).collect()),
        other => other.clone(),
    }
}

pub fn request_body(request: &ChatRequest) -> Value {
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in request.messages.iter().filter(|m| m.role != Role::System) {
        let (role, parts) = match m.role {
            Role::User => ("user", vec![json!({"text": m.content})]),
            Role::Tool => {
                let response = serde_json::from_str::<Value>(&m.content)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"content": m.content}));
                (
                    "user",
                    vec![json!({"functionResponse": {"name": m.tool_name, "response": response}})],
                )
            }
            _ => {
                let mut parts = Vec::new();
                if !m.content.is_empty() {
                    parts.push(json!({"text": m.content}));
                }
                for call in &m.tool_calls {
                    let args: Value =
                        serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
                    parts.push(json!({"functionCall": {"name": call.name, "args": args}}));
                }
                ("model", parts)
            }
        };
        match contents.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(parts),
            _ => contents.push((role, parts)),
        }
    }
    let mut body = json!({
        "contents": contents.into_iter().map(|(role, parts)| json!({"role": role, "parts": parts})).collect::<Vec<_>>(),
    });
    if let Some(system) = request.system_text() {
        body["systemInstruction"] = json!({"parts": [{"text": system}]});
    }
    if !request.tools.is_empty() {
        body["tools"] = json!([{"functionDeclarations": request.tools.iter().map(|t| json!({
            "name": t.name, "description": t.description, "parameters": schema_for_gemini(&t.parameters)
        })).collect::<Vec<_>>()}]);
    }
    let mut generation = Map::new();
    if let Some(max) = request.max_tokens {
        generation.insert("maxOutputTokens".into(), json!(max));
    }
    if let Some(t) = request.temperature {
        generation.insert("temperature".into(), json!(t));
    }
    if !generation.is_empty() {
        body["generationConfig"] = Value::Object(generation);
    }
    body
}

fn finish(reason: Option<&str>, has_calls: bool) -> FinishReason {
    match reason {
        _ if has_calls => FinishReason::ToolCalls,
        Some("STOP") | None => FinishReason::Stop,
        Some("MAX_TOKENS") => FinishReason::Length,
        Some(other) => FinishReason::Other(other.to_string()),
    }
}

/// Accumulates one answer from one or more `GenerateContentResponse` chunks, within the
/// limits.
pub(crate) struct Accumulator {
    limits: ResponseLimits,
    content: String,
    calls: Vec<ToolCall>,
    finish: Option<String>,
    usage: Usage,
    model: String,
}

impl Accumulator {
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

    pub fn push(&mut self, value: &Value) -> Result<(), LlmError> {
        if let Some(error) = value.get("error") {
            return Err(LlmError::Protocol(format!("error answer: {error}")));
        }
        if let Some(reason) = value["promptFeedback"]["blockReason"].as_str() {
            return Err(LlmError::Protocol(format!(
                "the prompt was blocked: {reason}"
            )));
        }
        if let Some(model) = value["modelVersion"].as_str() {
            self.model = model.to_string();
        }
        if let Some(meta) = value.get("usageMetadata") {
            self.usage = Usage {
                input_tokens: Usage::reported(&meta["promptTokenCount"]),
                output_tokens: Usage::reported(&meta["candidatesTokenCount"]),
            };
        }
        let Some(candidate) = value["candidates"].get(0) else {
            return Ok(());
        };
        if let Some(reason) = candidate["finishReason"].as_str() {
            self.finish = Some(reason.to_string());
        }
        for part in candidate["content"]["parts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(text) = part["text"].as_str() {
                self.limits
                    .append(&mut self.content, text, "the answer's text")?;
            }
            if let Some(call) = part.get("functionCall") {
                let index = self.calls.len();
                self.limits.check_count(index + 1, "tool call")?;
                let call = ToolCall {
                    id: call["id"]
                        .as_str()
                        .map_or_else(|| format!("call_{index}"), str::to_string),
                    name: call["name"].as_str().unwrap_or_default().to_string(),
                    arguments: call
                        .get("args")
                        .map_or_else(|| "{}".to_string(), Value::to_string),
                };
                self.limits
                    .check_field(call.name.len(), "a tool call's name")?;
                self.limits
                    .check_field(call.arguments.len(), "a tool call's arguments")?;
                self.calls.push(call);
            }
        }
        Ok(())
    }

    pub fn finish(self, requested_model: &str) -> ChatResponse {
        let finish = finish(self.finish.as_deref(), !self.calls.is_empty());
        ChatResponse {
            message: Message::assistant_with_calls(self.content, self.calls),
            finish,
            usage: self.usage,
            model: if self.model.is_empty() {
                requested_model.to_string()
            } else {
                self.model
            },
        }
    }
}

pub fn parse_response(value: &Value, requested_model: &str) -> Result<ChatResponse, LlmError> {
    if value["candidates"].get(0).is_none() {
        let why = value["promptFeedback"]["blockReason"]
            .as_str()
            .unwrap_or("no candidates in the answer");
        return Err(LlmError::Protocol(why.to_string()));
    }
    // Read from one bounded body; the provider checks the whole answer against its limits.
    let mut accumulator = Accumulator::new(ResponseLimits {
        max_tool_calls: usize::MAX,
        max_field_bytes: usize::MAX,
        ..ResponseLimits::default()
    });
    accumulator.push(value)?;
    Ok(accumulator.finish(requested_model))
}

/// Reads a stream to its end. Gemini marks the last chunk only by its `finishReason`: a stream
/// that ends without one (the connection closed midway) is an error, never the truncated answer.
pub(crate) async fn read_stream(
    response: reqwest::Response,
    limits: &ResponseLimits,
    requested_model: &str,
) -> Result<ChatResponse, LlmError> {
    let mut accumulator = Accumulator::new(*limits);
    crate::sse::read_events(response, limits, |event| {
        let value: Value = serde_json::from_str(&event.data)
            .map_err(|e| LlmError::Protocol(format!("a streamed chunk is not JSON: {e}")))?;
        accumulator.push(&value)?;
        Ok(true)
    })
    .await?;
    if accumulator.finish.is_none() {
        return Err(LlmError::Protocol(
            "the stream ended before a finishReason: the answer is incomplete".into(),
        ));
    }
    Ok(accumulator.finish(requested_model))
}
