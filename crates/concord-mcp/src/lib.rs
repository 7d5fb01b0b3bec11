//! The only crate that speaks MCP through rmcp: upstream connections (stdio children,
//! streamable HTTP, legacy SSE), the aggregating gateway server, the progress and cancellation
//! relay, and Concord's own MCP client. rmcp types never appear in this crate's public API.

// MCP logging (notifications/message, logging/setLevel) is deprecated for 2026-07-28 servers,
// but 2025-era clients and upstreams still use it and the gateway must carry it.
#![allow(deprecated)]

pub mod access;
mod breaker;
pub mod builtin;
mod catalog;
mod child;
mod client;
pub mod conformance;
mod error;
mod gateway;
mod http_client;
mod http_server;
mod internal;
pub mod methods;
mod parked;
mod result_budget;
mod result_cache;
mod session;
mod sse_client;
mod subscriptions;
mod tap;
mod upstream;

pub use access::{AccessControl, AccessRequest, Admission, CallOutcome, Identity, Throttled};
pub use client::{ClientError, NodeClient, run_stdio_bridge};
pub use error::{GatewayError, PeerError, codes};
pub use gateway::{ExposedTool, Gateway, GatewayOptions, UpstreamStatus};
pub use http_server::EdgeOptions;
pub use methods::{MCP_METHODS, McpAccess, McpMethod};
