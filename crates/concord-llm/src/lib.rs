//! LLM providers behind one model: adapters for the OpenAI-compatible chat completions API
//! (OpenAI, vLLM, Ollama, llama.cpp's server, LiteLLM), the Anthropic Messages API and the
//! Google Gemini API, each with tool calling and streaming; and failover along an ordered list
//! of providers, recording every attempt. No MCP here, and no configuration parsing: the node
//! builds [`ProviderConfig`]s from its config. A provider's answer is outside input: its size,
//! lines, fields, tool-call indexes and token counts are bounded ([`ResponseLimits`],
//! [`Usage::MAX_REPORTED`]); past a bound it is a provider error, never an allocation or a panic.

mod anthropic;
mod failover;
mod gemini;
mod limits;
mod model;
mod openai;
mod provider;
mod sse;

pub use failover::{Attempt, FailoverOutcome, chat_with_failover};
pub use limits::ResponseLimits;
pub use model::{
    ChatRequest, ChatResponse, FinishReason, Message, Role, ToolCall, ToolSpec, Usage,
};
pub use provider::{Api, LlmError, Provider, ProviderConfig};

/// Wire-format translation, public so that tests and tools can check requests and responses
/// against recorded traffic without a network.
pub mod wire {
    pub use crate::anthropic::{
        parse_response as anthropic_parse, request_body as anthropic_request,
    };
    pub use crate::gemini::{parse_response as gemini_parse, request_body as gemini_request};
    pub use crate::openai::{parse_response as openai_parse, request_body as openai_request};
}
