//! Bounds on what one provider answer may make this process hold. A provider is outside input:
//! an answer that never ends, a line that never ends or a tool-call index of four billion is a
//! provider error, never an allocation.

use serde_json::Value;

use crate::model::ChatResponse;
use crate::provider::LlmError;

/// The most one answer may take. [`Default`] gives the limits a provider has unless
/// [`Provider::with_limits`](crate::Provider::with_limits) says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLimits {
    /// Bytes of one answer's body, streamed or not (8 MiB).
    pub max_body_bytes: usize,
    /// Bytes of any one accumulated field: the answer's text, one tool call's name or its
    /// arguments (8 MiB).
    pub max_field_bytes: usize,
    /// Bytes of one event-stream line, held while its newline has not come (1 MiB).
    pub max_line_bytes: usize,
    /// Tool calls in one answer, and content blocks in one Anthropic answer (128). A streamed
    /// index at or past it, or one that skips ahead of those seen so far, is refused.
    pub max_tool_calls: usize,
}

impl Default for ResponseLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_field_bytes: 8 << 20,
            max_line_bytes: 1 << 20,
            max_tool_calls: 128,
        }
    }
}

impl ResponseLimits {
    /// Appends `piece` to an accumulated field, unless that takes it past `max_field_bytes`.
    pub(crate) fn append(
        &self,
        field: &mut String,
        piece: &str,
        what: &'static str,
    ) -> Result<(), LlmError> {
        self.check_field(field.len().saturating_add(piece.len()), what)?;
        field.push_str(piece);
        Ok(())
    }

    pub(crate) fn check_field(&self, len: usize, what: &'static str) -> Result<(), LlmError> {
        if len > self.max_field_bytes {
            return Err(LlmError::TooLarge {
                what,
                limit: self.max_field_bytes,
            });
        }
        Ok(())
    }

    /// The slot a streamed `index` names among the `len` seen so far: an existing one or the
    /// next; an index past the limit, one that skips ahead, or one that is not a non-negative
    /// integer is a provider error. An absent index is 0 (some compatible servers leave it out
    /// when there is one call).
    pub(crate) fn slot(&self, index: &Value, len: usize, what: &str) -> Result<usize, LlmError> {
        let index = match index {
            Value::Null => 0,
            value => value.as_u64().ok_or_else(|| {
                LlmError::Protocol(format!(
                    "{what} index {value} is not a non-negative integer"
                ))
            })?,
        };
        if index >= self.max_tool_calls as u64 {
            return Err(LlmError::Protocol(format!(
                "{what} index {index} is past the limit of {} per answer",
                self.max_tool_calls
            )));
        }
        if index > len as u64 {
            return Err(LlmError::Protocol(format!(
                "{what} index {index} skips ahead: only {len} seen so far"
            )));
        }
        Ok(index as usize)
    }

    /// A new tool call (or content block) beyond the `len` there are, unless that is too many.
    pub(crate) fn check_count(&self, len: usize, what: &str) -> Result<(), LlmError> {
        if len > self.max_tool_calls {
            return Err(LlmError::Protocol(format!(
                "more than {} {what}s in one answer",
                self.max_tool_calls
            )));
        }
        Ok(())
    }

    /// A whole answer (read from one body) within the field and count limits.
    pub(crate) fn check_answer(&self, answer: &ChatResponse) -> Result<(), LlmError> {
        self.check_field(answer.message.content.len(), "the answer's text")?;
        self.check_count(answer.message.tool_calls.len(), "tool call")?;
        for call in &answer.message.tool_calls {
            self.check_field(call.name.len(), "a tool call's name")?;
            self.check_field(call.arguments.len(), "a tool call's arguments")?;
        }
        Ok(())
    }
}

/// Whether a response says its body is longer than `cap` (known before reading it).
pub(crate) fn declared_past(response: &reqwest::Response, cap: usize) -> bool {
    response
        .content_length()
        .is_some_and(|declared| declared > cap as u64)
}

/// Reads a body in chunks, keeping at most `cap` bytes: `Ok((bytes, true))` when the body had
/// more (the rest is left unread).
pub(crate) async fn read_capped(
    response: &mut reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn indexes_are_bounded_and_contiguous() {
        let limits = ResponseLimits::default();
        assert_eq!(limits.slot(&Value::Null, 0, "tool call"), Ok(0));
        assert_eq!(limits.slot(&json!(0), 1, "tool call"), Ok(0));
        assert_eq!(limits.slot(&json!(1), 1, "tool call"), Ok(1));
        assert_eq!(limits.slot(&json!(127), 127, "tool call"), Ok(127));
        for (index, len, says) in [
            (json!(128), 128, "past the limit of 128"),
            (json!(4_000_000_000u64), 0, "past the limit of 128"),
            (json!(u64::MAX), 0, "past the limit of 128"),
            (json!(2), 1, "skips ahead: only 1 seen so far"),
            (json!(-1), 0, "not a non-negative integer"),
            (json!(1.5), 0, "not a non-negative integer"),
            (json!("0"), 0, "not a non-negative integer"),
        ] {
            match limits.slot(&index, len, "tool call") {
                Err(LlmError::Protocol(m)) => assert!(m.contains(says), "{index}: {m}"),
                other => panic!("{index}: {other:?}"),
            }
        }
    }

    #[test]
    fn fields_stop_at_their_limit() {
        let limits = ResponseLimits {
            max_field_bytes: 4,
            ..ResponseLimits::default()
        };
        let mut field = String::new();
        limits.append(&mut field, "ab", "text").unwrap();
        limits.append(&mut field, "cd", "text").unwrap();
        assert_eq!(
            limits.append(&mut field, "e", "text"),
            Err(LlmError::TooLarge {
                what: "text",
                limit: 4
            })
        );
        assert_eq!(field, "abcd");
    }
}
