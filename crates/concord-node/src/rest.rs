//! `/api/v1/state`: shared state over plain HTTP for anything that is not an MCP client, and the
//! change feed as Server-Sent Events (resumable with `Last-Event-ID` or `?since=`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use concord_state::{Author, Change, Op, StateError, StateService, error_details};
use serde::Deserialize;
use serde_json::{Value, json};

/// How often an open feed looks for new commits.
const FEED_POLL: Duration = Duration::from_millis(200);

fn status_of(error: &StateError) -> StatusCode {
    match error {
        StateError::Conflict(_) => StatusCode::CONFLICT,
        StateError::Leased { .. } | StateError::LeaseLost { .. } => StatusCode::LOCKED,
        StateError::TooLarge { .. } | StateError::TooManyChanges { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        StateError::UnknownProposal(_) => StatusCode::NOT_FOUND,
        StateError::ExpiredProposal(_)
        | StateError::ProposalNotOpen { .. }
        | StateError::AlreadyCommitted(_) => StatusCode::GONE,
        // The key was the caller's own, for another request: not a state conflict to rebase.
        StateError::IdempotencyKeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        StateError::InvalidKey { .. } | StateError::InvalidOperation { .. } => {
            StatusCode::BAD_REQUEST
        }
        StateError::SchemaViolation { .. } | StateError::Rejected { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        StateError::InvalidSchema { .. } | StateError::NeedBaseValues => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        StateError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn refusal(error: StateError) -> Response {
    (status_of(&error), Json(error_details(&error))).into_response()
}

/// What the REST handlers share.
#[derive(Clone)]
pub struct RestState {
    pub state: Arc<StateService>,
    pub governance: Option<Arc<crate::governance::Governance>>,
}

pub async fn get_key(State(rest): State<RestState>, Path(key): Path<String>) -> Response {
    let state = rest.state;
    match state.get(&key).await {
        Ok(entry) => Json(entry).into_response(),
        Err(e) => refusal(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    base_version: u64,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    ops: Option<Vec<Op>>,
    #[serde(default)]
    lease_token: Option<u64>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

pub async fn put_key(
    State(rest): State<RestState>,
    principal: Option<axum::Extension<concord_governance::Principal>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PutBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let state = rest.state;
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"conflict": false, "error": rejection.body_text()})),
            )
                .into_response();
        }
    };
    let ops = match (body.ops, body.value) {
        (Some(ops), _) => ops,
        (None, Some(value)) => vec![Op::Set { value }],
        (None, None) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"conflict": false, "error": "give `value` or `ops`"})),
            )
                .into_response();
        }
    };
    let principal = principal.map(|axum::Extension(p)| p);
    let operations = crate::state_tools::op_names(&ops);
    if let Err(reason) = crate::state_tools::check_write(
        rest.governance.as_deref(),
        principal.as_ref(),
        &[(key.clone(), operations)],
    ) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"conflict": false, "forbidden": true, "error": reason})),
        )
            .into_response();
    }
    let author = Author {
        // With auth on, the author is who authenticated; without, whoever the caller says.
        principal: match &principal {
            Some(principal) => principal.id.clone(),
            None => headers
                .get("x-concord-author")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("rest")
                .to_string(),
        },
        trace_id: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let change = Change {
        key,
        base_version: body.base_version,
        ops,
        lease_token: body.lease_token,
    };
    match state.put(vec![change], body.idempotency_key, &author).await {
        Ok(result) => Json(result).into_response(),
        Err(e) => refusal(e),
    }
}

#[derive(Deserialize)]
pub struct FeedQuery {
    prefix: String,
    #[serde(default)]
    since: Option<u64>,
}

/// Every commit under `prefix` after `since` (or the `Last-Event-ID` a reconnecting client
/// sends), then each new one as it lands. Event ids are commit sequence numbers.
pub async fn feed(
    State(rest): State<RestState>,
    Query(query): Query<FeedQuery>,
    headers: HeaderMap,
) -> Response {
    // A Last-Event-ID that is not one of our event ids is refused, not read as 0: replaying the
    // whole history to a client that meant to resume would hand it every change twice.
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(seq) => Some(seq),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({
                        "error": "Last-Event-ID must be a commit sequence number (an event id of this feed)"
                    })),
                )
                    .into_response();
            }
        },
    };
    let since = resume.or(query.since).unwrap_or(0);
    let state = rest.state;
    if let Err(e) = state.changes(&query.prefix, since, 1).await {
        return refusal(e);
    }
    // One event per commit (all its keys), with the commit's sequence number as the event id:
    // a client resuming from Last-Event-ID never receives half of a multi-key commit.
    let stream = futures::stream::unfold(
        (
            state,
            query.prefix,
            since,
            std::collections::VecDeque::<(u64, Vec<Value>)>::new(),
        ),
        |(state, prefix, mut since, mut pending)| async move {
            loop {
                if let Some((seq, changes)) = pending.pop_front() {
                    let data = json!({"seq": seq, "changes": changes}).to_string();
                    let event: Result<Event, Infallible> = Ok(Event::default()
                        .id(seq.to_string())
                        .event("commit")
                        .data(data));
                    return Some((event, (state, prefix, since, pending)));
                }
                match state.changes(&prefix, since, 500).await {
                    Ok(changes) if !changes.is_empty() => {
                        since = changes.last().map_or(since, |c| c.seq);
                        for change in changes {
                            let seq = change.seq;
                            let value = serde_json::to_value(change).unwrap_or_default();
                            match pending.back_mut() {
                                Some((last, group)) if *last == seq => group.push(value),
                                _ => pending.push_back((seq, vec![value])),
                            }
                        }
                    }
                    Ok(_) => tokio::time::sleep(FEED_POLL).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "change feed read failed; ending the stream");
                        return None;
                    }
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
