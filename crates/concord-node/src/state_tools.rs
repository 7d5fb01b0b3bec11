//! The shared-state service as built-in MCP tools (`concord__state_*`): JSON in, structured
//! content out, refusals (conflicts, bad input) as tool errors whose structured content says
//! what happened, so an agent can read it and rebase.

use std::sync::Arc;

use concord_mcp::builtin::{
    BuiltinFuture, BuiltinOutcome, BuiltinTemplate, BuiltinTool, BuiltinTools, Caller,
    ResourceFuture,
};
use concord_state::{Author, Change, Op, StateError, StateService, error_details};

use crate::governance::{Governance, principal_of};
use serde_json::{Map, Value, json};

pub struct StateTools {
    state: Arc<StateService>,
    governance: Option<Arc<Governance>>,
}

impl StateTools {
    pub fn new(state: Arc<StateService>, governance: Option<Arc<Governance>>) -> Self {
        Self { state, governance }
    }
}

/// The names of operations (`set`, `merge_patch`, …), as policy rules see them.
pub(crate) fn op_names(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|op| {
            serde_json::to_value(op)
                .ok()
                .and_then(|v| v["op"].as_str().map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

/// The keys and operation names of a write, for the policy engine.
fn write_targets(changes: &[Change]) -> Vec<(String, Vec<String>)> {
    changes
        .iter()
        .map(|change| (change.key.clone(), op_names(&change.ops)))
        .collect()
}

/// With auth on, every key of a write must be allowed for the caller (`state/write` rules);
/// the first that is not is named in the refusal.
pub(crate) fn check_write(
    governance: Option<&Governance>,
    principal: Option<&concord_governance::Principal>,
    targets: &[(String, Vec<String>)],
) -> Result<(), String> {
    let Some(governance) = governance else {
        return Ok(());
    };
    let Some(principal) = principal else {
        return Err("not authenticated".into());
    };
    for (key, operations) in targets {
        if !governance.allows_state_write(principal, key, operations) {
            return Err(format!("{} may not write {key}", principal.id));
        }
    }
    Ok(())
}

/// With auth on, whether `principal` may read `key` (or every key under a prefix): the same
/// `state/read` decision as the REST routes, so no way of reading state skips it.
pub(crate) fn check_read(
    governance: Option<&Governance>,
    principal: Option<&concord_governance::Principal>,
    key: &str,
) -> Result<(), String> {
    let Some(governance) = governance else {
        return Ok(());
    };
    let Some(principal) = principal else {
        return Err("not authenticated".into());
    };
    let namespace = key.split('/').next().unwrap_or_default();
    if governance.decide_route(principal, "state/read", key, Some(namespace)) {
        Ok(())
    } else {
        Err(format!("forbidden: {} may not read {key}", principal.id))
    }
}

/// With auth on, a commit and a conflict go on the audit trail.
fn audit_write(
    governance: Option<&Governance>,
    principal: &str,
    result: &Result<concord_state::CommitResult, StateError>,
) {
    let Some(governance) = governance else {
        return;
    };
    match result {
        Ok(committed) => governance.audit.record(
            "state_commit",
            principal,
            json!({"seq": committed.seq, "versions": committed.versions, "proposal_id": committed.proposal_id, "replayed": committed.replayed}),
        ),
        Err(StateError::Conflict(conflicts)) => governance.audit.record(
            "state_conflict",
            principal,
            json!({"keys": conflicts.iter().map(|c| json!({"key": c.key, "base_version": c.base_version, "current_version": c.current_version})).collect::<Vec<_>>()}),
        ),
        Err(_) => {}
    }
}

fn forbidden(reason: String) -> BuiltinOutcome {
    BuiltinOutcome {
        structured: json!({"conflict": false, "forbidden": true, "error": reason}),
        is_error: true,
    }
}

fn ops_schema() -> Value {
    json!({
        "type": "array",
        "description": "Operations applied in order: {op: set, value} | {op: merge_patch, patch} (RFC 7396) | {op: json_patch, patch} (RFC 6902) | {op: increment, path, by} | {op: append, path, value}. Paths are JSON Pointers (\"\" = the whole value).",
        "items": {"type": "object", "required": ["op"], "properties": {"op": {"enum": ["set", "merge_patch", "json_patch", "increment", "append"]}}}
    })
}

fn changes_schema() -> Value {
    json!({
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["key", "base_version", "ops"],
            "properties": {
                "key": {"type": "string", "description": "namespace/path"},
                "base_version": {"type": "integer", "minimum": 0, "description": "The version you read (0: the key was absent)."},
                "ops": ops_schema(),
                "lease_token": {"type": "integer", "description": "Your fencing token, when you hold the key's lease."}
            }
        }
    })
}

fn entry_schema() -> Value {
    json!({"type": "object", "properties": {
        "key": {"type": "string"}, "version": {"type": "integer"}, "value": {}
    }, "required": ["key", "version"]})
}

fn commit_schema() -> Value {
    json!({"type": "object", "properties": {
        "seq": {"type": "integer"}, "proposal_id": {"type": "string"},
        "versions": {"type": "object", "additionalProperties": {"type": "integer"}},
        "replayed": {"type": "boolean"},
        "conflict": {"type": "boolean"}, "current_version": {"type": "integer"}, "current_value": {},
        "error": {"type": "string"}
    }})
}

fn tool(
    name: &str,
    description: &str,
    input: Value,
    output: Value,
    read_only: bool,
    idempotent: bool,
) -> BuiltinTool {
    BuiltinTool {
        name: name.to_string(),
        description: description.to_string(),
        input_schema: input,
        output_schema: Some(output),
        read_only,
        idempotent,
    }
}

fn refused(error: StateError) -> BuiltinOutcome {
    BuiltinOutcome {
        structured: error_details(&error),
        is_error: true,
    }
}

fn ok(structured: Value) -> BuiltinOutcome {
    BuiltinOutcome {
        structured,
        is_error: false,
    }
}

fn bad_arguments(message: String) -> BuiltinOutcome {
    BuiltinOutcome {
        structured: json!({"conflict": false, "error": message}),
        is_error: true,
    }
}

fn arg<T: serde::de::DeserializeOwned>(
    arguments: &Map<String, Value>,
    name: &str,
) -> Result<T, String> {
    let value = arguments
        .get(name)
        .cloned()
        .ok_or_else(|| format!("missing argument `{name}`"))?;
    serde_json::from_value(value).map_err(|e| format!("argument `{name}`: {e}"))
}

fn optional<T: serde::de::DeserializeOwned>(
    arguments: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, String> {
    match arguments.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => arg(arguments, name).map(Some),
    }
}

/// `state_put` takes either `changes`, or one key's `key` + `base_version` + `value`/`ops`.
fn put_changes(arguments: &Map<String, Value>) -> Result<Vec<Change>, String> {
    if arguments.contains_key("changes") {
        return arg(arguments, "changes");
    }
    let key: String = arg(arguments, "key")?;
    let base_version: u64 = arg(arguments, "base_version")?;
    let lease_token: Option<u64> = optional(arguments, "lease_token")?;
    let ops: Vec<Op> = match (
        optional::<Vec<Op>>(arguments, "ops")?,
        arguments.get("value"),
    ) {
        (Some(ops), _) => ops,
        (None, Some(value)) => vec![Op::Set {
            value: value.clone(),
        }],
        (None, None) => return Err("give `value` or `ops` (or `changes`)".into()),
    };
    Ok(vec![Change {
        key,
        base_version,
        ops,
        lease_token,
    }])
}

/// Shared-state keys as MCP resources: `concord://state/{namespace}/{path}`.
pub const STATE_URI_PREFIX: &str = "concord://state/";

impl BuiltinTools for StateTools {
    fn resource_templates(&self) -> Vec<BuiltinTemplate> {
        vec![BuiltinTemplate {
            uri_template: format!("{STATE_URI_PREFIX}{{+key}}"),
            name: "shared-state".to_string(),
            description: "A shared-state key (namespace/path) as JSON: {key, version, value}. Subscribe to hear of every commit to it.".to_string(),
            mime_type: "application/json".to_string(),
        }]
    }

    fn resource_policy(&self, uri: &str) -> Option<(&'static str, String)> {
        uri.strip_prefix(STATE_URI_PREFIX)
            .map(|key| ("state/read", key.to_string()))
    }

    fn read_resource(&self, uri: &str) -> ResourceFuture {
        let state = self.state.clone();
        let key = uri.strip_prefix(STATE_URI_PREFIX).map(str::to_string);
        Box::pin(async move {
            let key = key.ok_or_else(|| "not a concord://state/ URI".to_string())?;
            let entry = state.get(&key).await.map_err(|e| e.to_string())?;
            serde_json::to_string(&entry).map_err(|e| e.to_string())
        })
    }

    fn tools(&self) -> Vec<BuiltinTool> {
        vec![
            tool(
                "state_get",
                "Read a shared-state key: its JSON value and version (version 0: absent). Keep the version: writes must name it.",
                json!({"type": "object", "required": ["key"], "properties": {"key": {"type": "string", "description": "namespace/path"}}}),
                entry_schema(),
                true,
                true,
            ),
            tool(
                "state_list",
                "List shared-state keys under a prefix (namespace/ or namespace/partial-path) with values and versions.",
                json!({"type": "object", "required": ["prefix"], "properties": {
                    "prefix": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 1000}}}),
                json!({"type": "object", "properties": {"entries": {"type": "array", "items": entry_schema()}}}),
                true,
                true,
            ),
            tool(
                "state_propose",
                "Propose a write: keys, the version each was read at, and operations. Checked now; committed later with state_commit.",
                json!({"type": "object", "required": ["changes"], "properties": {"changes": changes_schema()}}),
                json!({"type": "object", "properties": {
                    "proposal_id": {"type": "string"}, "status": {"type": "string"}, "expires_at_ms": {"type": "integer"}}}),
                false,
                false,
            ),
            tool(
                "state_commit",
                "Commit a proposal atomically. Refused with conflict=true, the current version and value if any key moved since it was read. A proposal commits once: retrying with the same idempotency_key (yours alone; by default one per proposal) returns the first result, any other second commit is refused with already_committed=true.",
                json!({"type": "object", "required": ["proposal_id"], "properties": {
                    "proposal_id": {"type": "string"}, "idempotency_key": {"type": "string"}}}),
                commit_schema(),
                false,
                true,
            ),
            tool(
                "state_put",
                "Propose and commit in one call: {key, base_version, value} (or ops), or {changes}. Refused with conflict=true if the key moved since base_version.",
                json!({"type": "object", "properties": {
                    "key": {"type": "string"}, "base_version": {"type": "integer", "minimum": 0}, "value": {},
                    "lease_token": {"type": "integer"},
                    "ops": ops_schema(), "changes": changes_schema(), "idempotency_key": {"type": "string"}}}),
                commit_schema(),
                false,
                false,
            ),
            tool(
                "state_claim",
                "Claim a key for exclusive work: granted with a fencing token to carry in writes (lease_token), or told who holds it. Pass your token to renew.",
                json!({"type": "object", "required": ["key"], "properties": {
                    "key": {"type": "string"}, "ttl_ms": {"type": "integer", "minimum": 1, "default": 30000},
                    "token": {"type": "integer", "description": "Renew the lease held under this token."}}}),
                json!({"type": "object", "properties": {
                    "granted": {"type": "boolean"}, "token": {"type": "integer"}, "holder": {"type": "string"},
                    "expires_at_ms": {"type": "integer"}}}),
                false,
                false,
            ),
            tool(
                "state_release",
                "Release a lease you hold (by its fencing token).",
                json!({"type": "object", "required": ["key", "token"], "properties": {
                    "key": {"type": "string"}, "token": {"type": "integer"}}}),
                json!({"type": "object", "properties": {"released": {"type": "boolean"}}}),
                false,
                true,
            ),
            tool(
                "state_changes",
                "The change feed: committed versions under a prefix with a sequence number above since_seq, oldest first. Poll again with next_seq to resume without gaps or duplicates.",
                json!({"type": "object", "required": ["prefix"], "properties": {
                    "prefix": {"type": "string"}, "since_seq": {"type": "integer", "minimum": 0, "default": 0},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1000}}}),
                json!({"type": "object", "properties": {"changes": {"type": "array"}, "next_seq": {"type": "integer"}}}),
                true,
                true,
            ),
            tool(
                "state_diff",
                "RFC 6902 JSON Patch from one version of a key to another.",
                json!({"type": "object", "required": ["key", "from_version", "to_version"], "properties": {
                    "key": {"type": "string"}, "from_version": {"type": "integer", "minimum": 0},
                    "to_version": {"type": "integer", "minimum": 0}}}),
                json!({"type": "object", "properties": {"patch": {"type": "array"}}}),
                true,
                true,
            ),
            tool(
                "state_history",
                "Every kept version of a key, newest first, with author, time, proposal and trace id.",
                json!({"type": "object", "required": ["key"], "properties": {
                    "key": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 1000}}}),
                json!({"type": "object", "properties": {"versions": {"type": "array"}}}),
                true,
                true,
            ),
        ]
    }

    fn call(&self, name: &str, arguments: Map<String, Value>, caller: Caller) -> BuiltinFuture {
        let state = self.state.clone();
        let governance = self.governance.clone();
        let name = name.to_string();
        Box::pin(async move {
            let principal = caller.identity.as_ref().map(principal_of);
            let may_write = |targets: &[(String, Vec<String>)]| {
                check_write(governance.as_deref(), principal.as_ref(), targets)
            };
            let author = Author {
                principal: caller.principal,
                trace_id: caller.trace_id,
            };
            // Every read tool names the key or prefix it reads; it is decided before the read.
            let read_subject = match name.as_str() {
                "state_get" | "state_diff" | "state_history" => Some("key"),
                "state_list" | "state_changes" => Some("prefix"),
                _ => None,
            };
            if let Some(field) = read_subject {
                let subject = arguments
                    .get(field)
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if let Err(refusal) = check_read(governance.as_deref(), principal.as_ref(), subject)
                {
                    return bad_arguments(refusal);
                }
            }
            let run = async {
                Ok::<BuiltinOutcome, String>(match name.as_str() {
                    "state_get" => match state.get(&arg::<String>(&arguments, "key")?).await {
                        Ok(entry) => ok(serde_json::to_value(entry).unwrap_or_default()),
                        Err(e) => refused(e),
                    },
                    "state_list" => {
                        let limit = optional::<u32>(&arguments, "limit")?
                            .unwrap_or(100)
                            .min(1000);
                        match state
                            .list(&arg::<String>(&arguments, "prefix")?, limit)
                            .await
                        {
                            Ok(entries) => ok(json!({"entries": entries})),
                            Err(e) => refused(e),
                        }
                    }
                    "state_propose" => {
                        let changes: Vec<Change> = arg(&arguments, "changes")?;
                        if let Err(reason) = may_write(&write_targets(&changes)) {
                            return Ok(forbidden(reason));
                        }
                        match state.propose_as(changes, &author).await {
                            Ok(p) => ok(
                                json!({"proposal_id": p.id, "status": p.status, "expires_at_ms": p.expires_at_ms}),
                            ),
                            Err(e) => refused(e),
                        }
                    }
                    "state_commit" => {
                        let id: String = arg(&arguments, "proposal_id")?;
                        let idempotency = optional(&arguments, "idempotency_key")?;
                        // The committer must be allowed to write what the proposal writes, as
                        // if it were proposing it now (the proposer may be someone else, or
                        // the policy may have changed since).
                        let proposal = match state.proposal(&id).await {
                            Ok(proposal) => proposal,
                            Err(e) => return Ok(refused(e)),
                        };
                        if let Err(reason) = may_write(&write_targets(&proposal.changes)) {
                            return Ok(forbidden(reason));
                        }
                        let result = state.commit(&id, idempotency, &author).await;
                        audit_write(governance.as_deref(), &author.principal, &result);
                        match result {
                            Ok(result) => ok(serde_json::to_value(result).unwrap_or_default()),
                            Err(e) => refused(e),
                        }
                    }
                    "state_put" => {
                        let changes = put_changes(&arguments)?;
                        if let Err(reason) = may_write(&write_targets(&changes)) {
                            return Ok(forbidden(reason));
                        }
                        let idempotency = optional(&arguments, "idempotency_key")?;
                        let result = state.put(changes, idempotency, &author).await;
                        audit_write(governance.as_deref(), &author.principal, &result);
                        match result {
                            Ok(result) => ok(serde_json::to_value(result).unwrap_or_default()),
                            Err(e) => refused(e),
                        }
                    }
                    "state_claim" => {
                        let key: String = arg(&arguments, "key")?;
                        if let Err(reason) = may_write(&[(key, vec!["claim".to_string()])]) {
                            return Ok(forbidden(reason));
                        }
                        let ttl = optional::<u64>(&arguments, "ttl_ms")?.unwrap_or(30_000);
                        let token = optional(&arguments, "token")?;
                        match state
                            .claim(
                                &arg::<String>(&arguments, "key")?,
                                &author.principal,
                                std::time::Duration::from_millis(ttl),
                                token,
                            )
                            .await
                        {
                            Ok(outcome) => ok(serde_json::to_value(outcome).unwrap_or_default()),
                            Err(e) => refused(e),
                        }
                    }
                    "state_release" => {
                        let key: String = arg(&arguments, "key")?;
                        if let Err(reason) = may_write(&[(key, vec!["release".to_string()])]) {
                            return Ok(forbidden(reason));
                        }
                        match state
                            .release(
                                &arg::<String>(&arguments, "key")?,
                                arg(&arguments, "token")?,
                            )
                            .await
                        {
                            Ok(()) => ok(json!({"released": true})),
                            Err(e) => refused(e),
                        }
                    }
                    "state_changes" => {
                        let since = optional::<u64>(&arguments, "since_seq")?.unwrap_or(0);
                        let limit = optional::<u32>(&arguments, "limit")?
                            .unwrap_or(100)
                            .min(1000);
                        match state
                            .changes(&arg::<String>(&arguments, "prefix")?, since, limit)
                            .await
                        {
                            Ok(changes) => {
                                let next_seq = changes.last().map_or(since, |c| c.seq);
                                ok(json!({"changes": changes, "next_seq": next_seq}))
                            }
                            Err(e) => refused(e),
                        }
                    }
                    "state_diff" => {
                        match state
                            .diff(
                                &arg::<String>(&arguments, "key")?,
                                arg(&arguments, "from_version")?,
                                arg(&arguments, "to_version")?,
                            )
                            .await
                        {
                            Ok(patch) => ok(json!({"patch": patch})),
                            Err(e) => refused(e),
                        }
                    }
                    "state_history" => {
                        let limit = optional::<u32>(&arguments, "limit")?
                            .unwrap_or(100)
                            .min(1000);
                        match state
                            .history(&arg::<String>(&arguments, "key")?, limit)
                            .await
                        {
                            Ok(versions) => ok(json!({"versions": versions})),
                            Err(e) => refused(e),
                        }
                    }
                    other => bad_arguments(format!("unknown state tool {other}")),
                })
            };
            run.await.unwrap_or_else(bad_arguments)
        })
    }
}
