//! Agents: the automatic agentic loop. The model gets the task and the tools' schemas; each
//! tool call it asks for is run (through whatever [`ToolBox`] the caller gives — in a node, the
//! gateway pipeline under the agent's identity and budget) and its result goes back to the
//! model; the loop ends on a final answer, at the iteration limit, when a budget runs out, or
//! when cancelled — each reported as such. A wrong tool name or arguments that are not JSON go
//! back to the model as tool errors. With an output schema, the answer must be JSON matching it;
//! the model is asked once more if it is not.

mod chain;
mod run;
pub mod workflow;

pub use chain::ProviderChain;

pub use run::{
    AgentSpec, ChatModel, Ending, Left, Limits, LoopContext, LoopEvent, ModelTurn, Report,
    SharedBudget, ToolBox, ToolOutcome, ToolReply, run,
};
