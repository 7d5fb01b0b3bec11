//! Agents: the automatic agentic loop. The model gets the task and the tools' schemas; each
//! tool call it asks for is run (through whatever [`ToolBox`] the caller gives — in a node, the
//! gateway pipeline under the agent's identity and budget) and its result goes back to the
//! model; the loop ends on a final answer, at the iteration limit, when a budget runs out, or
//! when cancelled — each reported as such. A wrong tool name or arguments that are not JSON go
//! back to the model as tool errors. A turn runs at most a set number of the tool calls it asks
//! for, a few at a time; each call past the limit is answered with a tool error naming it. With
//! an output schema, the answer must be JSON matching it; the model is asked once more if it is
//! not.

mod chain;
mod run;
pub mod workflow;

pub use chain::ProviderChain;

pub use run::{
    AgentSpec, ChatModel, DEFAULT_MAX_PARALLEL_TOOL_CALLS, DEFAULT_MAX_TOOL_CALLS_PER_TURN, Ending,
    Left, Limits, LoopContext, LoopEvent, ModelTurn, Report, SharedBudget, ToolBox, ToolOutcome,
    ToolReply, run,
};
