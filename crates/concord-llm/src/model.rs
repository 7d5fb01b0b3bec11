//! One message and tool model for every provider API. Adapters translate to and from their
//! wire formats; nothing else sees those.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// The result of one tool call, answering the assistant message that asked for it.
    Tool,
}

/// A tool call the model asked for. `arguments` is the JSON text exactly as the model wrote it
/// (it may not parse: that is the caller's to report back to the model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool result: the call it answers, and that call's tool name (Gemini needs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<String>,
}

impl Message {
    pub fn system(text: impl Into<String>) -> Self {
        Self::plain(Role::System, text)
    }

    pub fn user(text: impl Into<String>) -> Self {
        Self::plain(Role::User, text)
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Self::plain(Role::Assistant, text)
    }

    /// An assistant turn as a provider answered it: text, tool calls, or both.
    pub fn assistant_with_calls(text: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls,
            ..Self::plain(Role::Assistant, text)
        }
    }

    pub fn tool_result(call: &ToolCall, text: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call.id.clone()),
            tool_name: Some(call.name.clone()),
        }
    }

    fn plain(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            tool_name: None,
        }
    }
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

impl ChatRequest {
    /// The system messages joined, for APIs that take the system prompt apart.
    pub(crate) fn system_text(&self) -> Option<String> {
        let parts: Vec<&str> = self
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
            .collect();
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model finished its answer.
    Stop,
    /// The model wants tools called.
    ToolCalls,
    /// The answer hit the token limit.
    Length,
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    /// The most tokens one count of one answer may say. A provider's numbers are outside input:
    /// a larger count is taken as this (about 4.3 billion, beyond any real answer), so sums over
    /// many answers and prices stay far from overflow.
    pub const MAX_REPORTED: u64 = u32::MAX as u64;

    /// Both counts; saturates rather than wrapping.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Adds another's counts; saturates rather than wrapping.
    pub fn add(&mut self, other: Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
    }

    /// A token count as a provider wrote it: absent, negative or not a number is 0, a fraction
    /// is rounded down, and anything past [`Usage::MAX_REPORTED`] (up to numbers beyond `u64`)
    /// is taken as that.
    pub(crate) fn reported(value: &Value) -> u64 {
        let count = match value {
            Value::Number(number) => number.as_u64().unwrap_or_else(|| {
                // Negative, fractional, or too large for u64 (read as a float): the cast
                // saturates, and NaN is 0.
                number.as_f64().map_or(0, |f| f.max(0.0) as u64)
            }),
            _ => 0,
        };
        if count > Self::MAX_REPORTED {
            tracing::warn!(
                count,
                "a provider reported an implausible token count; taken as {}",
                Self::MAX_REPORTED
            );
            return Self::MAX_REPORTED;
        }
        count
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// The assistant's message (text and/or tool calls).
    pub message: Message,
    pub finish: FinishReason,
    pub usage: Usage,
    /// The model that answered, as the provider names it.
    pub model: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reported_counts_never_wrap() {
        let max = Usage::MAX_REPORTED;
        for (value, count) in [
            (json!(12), 12),
            (json!(null), 0),
            (json!(-5), 0),
            (json!(i64::MIN), 0),
            (json!(12.9), 12),
            (json!(-0.5), 0),
            (json!("12"), 0),
            (json!(u64::MAX), max),
            (json!(1e300), max),
            (json!(max), max),
            (json!(max + 1), max),
        ] {
            assert_eq!(Usage::reported(&value), count, "{value}");
        }
        let huge: Value = serde_json::from_str("100000000000000000000000000000000").unwrap();
        assert_eq!(Usage::reported(&huge), max);
    }

    #[test]
    fn sums_saturate() {
        let mut usage = Usage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
        };
        assert_eq!(usage.total(), u64::MAX);
        usage.add(usage);
        assert_eq!(usage.input_tokens, u64::MAX);
        assert_eq!(usage.total(), u64::MAX);
    }
}
