//! The MCP half of the front door: every method a client may send, with the policy decision
//! that admits it. Handlers ask this table (`access_of`) for their method's decision; a method
//! without a row is not served. The authorization matrix test (concord-node) walks
//! [`MCP_METHODS`] with a stranger, a principal no rule allows and a principal with the row's
//! rule, so a handler that skips its decision fails there.

#[cfg(test)]
use rmcp::model::ClientRequest;

/// How an MCP method is admitted (after authentication at the HTTP door).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpAccess {
    /// Session plumbing every authenticated principal needs and that reveals nothing
    /// (`initialize`, `ping`, `server/discover`, dropping one's own subscription).
    Session,
    /// Decided per item under this policy method: what the principal may not use is left out
    /// of lists and answers like something that does not exist.
    PerItem(&'static str),
    /// Decided once for the request under this policy method.
    Method(&'static str),
    /// Not served by Concord: method not found, whoever asks.
    NotServed,
}

/// One row of the MCP authorization matrix.
#[derive(Debug, Clone, Copy)]
pub struct McpMethod {
    pub name: &'static str,
    pub access: McpAccess,
}

const fn row(name: &'static str, access: McpAccess) -> McpMethod {
    McpMethod { name, access }
}

/// Every method rmcp can hand the gateway.
pub const MCP_METHODS: &[McpMethod] = &[
    row("initialize", McpAccess::Session),
    row("ping", McpAccess::Session),
    row("server/discover", McpAccess::Session),
    row("tools/list", McpAccess::PerItem("tools/call")),
    row("tools/call", McpAccess::PerItem("tools/call")),
    row("prompts/list", McpAccess::PerItem("prompts/get")),
    row("prompts/get", McpAccess::PerItem("prompts/get")),
    row("resources/list", McpAccess::PerItem("resources/read")),
    row(
        "resources/templates/list",
        McpAccess::PerItem("resources/read"),
    ),
    row("resources/read", McpAccess::PerItem("resources/read")),
    row("resources/subscribe", McpAccess::PerItem("resources/read")),
    row("resources/unsubscribe", McpAccess::Session),
    row(
        "completion/complete",
        McpAccess::PerItem("completion/complete"),
    ),
    row("logging/setLevel", McpAccess::Method("logging/setLevel")),
    row(
        "subscriptions/listen",
        McpAccess::Method("subscriptions/listen"),
    ),
    row("tasks/get", McpAccess::NotServed),
    row("tasks/update", McpAccess::NotServed),
    row("tasks/cancel", McpAccess::NotServed),
    row("skills/list", McpAccess::NotServed),
    row("skills/get", McpAccess::NotServed),
    row("resources/directory/read", McpAccess::NotServed),
];

/// The method a request is, for every variant rmcp knows: the test below checks each row
/// against rmcp's own decoding.
#[cfg(test)]
fn method_of(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::InitializeRequest(_) => "initialize",
        ClientRequest::PingRequest(_) => "ping",
        ClientRequest::DiscoverRequest(_) => "server/discover",
        ClientRequest::ListToolsRequest(_) => "tools/list",
        ClientRequest::CallToolRequest(_) => "tools/call",
        ClientRequest::ListPromptsRequest(_) => "prompts/list",
        ClientRequest::GetPromptRequest(_) => "prompts/get",
        ClientRequest::ListResourcesRequest(_) => "resources/list",
        ClientRequest::ListResourceTemplatesRequest(_) => "resources/templates/list",
        ClientRequest::ReadResourceRequest(_) => "resources/read",
        ClientRequest::SubscribeRequest(_) => "resources/subscribe",
        ClientRequest::UnsubscribeRequest(_) => "resources/unsubscribe",
        ClientRequest::CompleteRequest(_) => "completion/complete",
        ClientRequest::SetLevelRequest(_) => "logging/setLevel",
        ClientRequest::SubscriptionsListenRequest(_) => "subscriptions/listen",
        ClientRequest::GetTaskRequest(_) => "tasks/get",
        ClientRequest::UpdateTaskRequest(_) => "tasks/update",
        ClientRequest::CancelTaskRequest(_) => "tasks/cancel",
        ClientRequest::ListSkillsRequest(_) => "skills/list",
        ClientRequest::GetSkillRequest(_) => "skills/get",
        ClientRequest::ReadResourceDirectoryRequest(_) => "resources/directory/read",
        ClientRequest::CustomRequest(_) => "(custom)",
        // rmcp marks the enum non-exhaustive: a variant an upgrade adds lands here, has no row,
        // and is not served until it is given one (fail closed).
        _ => "(unknown)",
    }
}

/// The row of `method`; anything without one is not served.
pub fn access_of(method: &str) -> McpAccess {
    MCP_METHODS
        .iter()
        .find(|m| m.name == method)
        .map_or(McpAccess::NotServed, |m| m.access)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row decodes (with rmcp's own decoder) to the variant `method_of` names the same.
    #[test]
    fn every_row_is_the_method_rmcp_decodes() {
        for method in MCP_METHODS {
            let params = match method.name {
                "initialize" => serde_json::json!({"protocolVersion": "2025-11-25",
                    "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
                "tools/call" => serde_json::json!({"name": "x"}),
                "prompts/get" => serde_json::json!({"name": "x"}),
                "skills/get" => serde_json::json!({"uri": "skill://x"}),
                "resources/read"
                | "resources/subscribe"
                | "resources/unsubscribe"
                | "resources/directory/read" => serde_json::json!({"uri": "file:///x"}),
                "completion/complete" => {
                    serde_json::json!({"ref": {"type": "ref/prompt", "name": "x"},
                    "argument": {"name": "a", "value": "b"}})
                }
                "logging/setLevel" => serde_json::json!({"level": "info"}),
                "tasks/get" | "tasks/cancel" => serde_json::json!({"taskId": "t"}),
                "tasks/update" => serde_json::json!({"taskId": "t", "inputResponses": {}}),
                "subscriptions/listen" => serde_json::json!({"notifications": {}}),
                _ => serde_json::json!({}),
            };
            let message = serde_json::json!({"method": method.name, "params": params});
            let Ok(request) = serde_json::from_value::<ClientRequest>(message.clone()) else {
                // A row whose params this test does not know: at least it must not decode
                // as a custom request under another name.
                panic!("{}: rmcp does not decode {message}", method.name);
            };
            assert_eq!(method_of(&request), method.name, "{message}");
        }
    }

    #[test]
    fn unknown_methods_are_not_served() {
        assert_eq!(access_of("admin/shutdown"), McpAccess::NotServed);
        assert_eq!(access_of("(custom)"), McpAccess::NotServed);
        assert_eq!(
            access_of("logging/setLevel"),
            McpAccess::Method("logging/setLevel")
        );
    }
}
