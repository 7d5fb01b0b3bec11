//! The validator-tool step of shared-state writes: for namespaces configured with
//! `validator = "server__tool"`, each proposed value is put to that MCP tool (through the
//! gateway, like any call) and the write goes on only if the tool approves.
//!
//! The tool receives `{key, author, current_version, current_value, proposed_value}` and
//! approves unless it answers with `isError: true` or `structuredContent.approved == false`;
//! its text (or `structuredContent.reason`) becomes the rejection reason. A validator that
//! cannot be reached rejects the write: a review that did not happen is not an approval.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use concord_mcp::Gateway;
use concord_state::{WriteGuard, WriteReview};
use serde_json::{Value, json};

pub struct ToolValidator {
    by_namespace: BTreeMap<String, String>,
    /// Set once the gateway exists (the gateway serves the state tools, so it is built after).
    gateway: Arc<OnceLock<Gateway>>,
}

impl ToolValidator {
    pub fn new(by_namespace: BTreeMap<String, String>, gateway: Arc<OnceLock<Gateway>>) -> Self {
        Self {
            by_namespace,
            gateway,
        }
    }
}

fn reason_of(result: &Value) -> String {
    if let Some(reason) = result["structuredContent"]["reason"].as_str() {
        return reason.to_string();
    }
    let text: Vec<&str> = result["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["text"].as_str())
        .collect();
    if text.is_empty() {
        "no reason given".to_string()
    } else {
        text.join(" ")
    }
}

impl WriteGuard for ToolValidator {
    fn review<'a>(
        &'a self,
        review: &'a WriteReview,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let Some(tool) = self.by_namespace.get(&review.namespace) else {
                return Ok(());
            };
            let Some(gateway) = self.gateway.get() else {
                return Err(format!("validator {tool} is not ready yet"));
            };
            let arguments = json!({
                "key": review.key,
                "author": review.author,
                "current_version": review.current_version,
                "current_value": review.current_value,
                "proposed_value": review.proposed_value,
            });
            let result = gateway
                .call_tool(tool, arguments.as_object().cloned().unwrap_or_default())
                .await
                .map_err(|e| format!("validator {tool} could not review the write: {e}"))?;
            let refused = result["isError"].as_bool() == Some(true)
                || result["structuredContent"]["approved"].as_bool() == Some(false);
            if refused {
                Err(format!("{tool}: {}", reason_of(&result)))
            } else {
                Ok(())
            }
        })
    }
}
