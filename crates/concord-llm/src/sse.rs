//! Server-sent events as the three provider APIs send them: events separated by a blank line,
//! `data:` lines joined; `event:` names kept (Anthropic uses them), comments ignored.

use futures::StreamExt;

use crate::provider::LlmError;

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Event {
    pub name: Option<String>,
    pub data: String,
}

/// Splits a byte stream into events. `on_event` returns false to stop reading.
pub(crate) async fn read_events(
    response: reqwest::Response,
    mut on_event: impl FnMut(Event) -> Result<bool, LlmError>,
) -> Result<(), LlmError> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| LlmError::Connect(format!("stream broke: {e}")))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = event_end(&buffer) {
            let raw: String = buffer.drain(..end.0).collect();
            buffer.drain(..end.1);
            if let Some(event) = parse_event(&raw)
                && !on_event(event)?
            {
                return Ok(());
            }
        }
    }
    if let Some(event) = parse_event(&buffer) {
        on_event(event)?;
    }
    Ok(())
}

/// Where the first complete event ends: (length of the event, length of its separator).
fn event_end(buffer: &str) -> Option<(usize, usize)> {
    let lf = buffer.find("\n\n").map(|i| (i, 2));
    let crlf = buffer.find("\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

pub(crate) fn parse_event(raw: &str) -> Option<Event> {
    let mut event = Event::default();
    let mut has_data = false;
    for line in raw.lines() {
        if let Some(data) = line.strip_prefix("data:") {
            if has_data {
                event.data.push('\n');
            }
            event.data.push_str(data.strip_prefix(' ').unwrap_or(data));
            has_data = true;
        } else if let Some(name) = line.strip_prefix("event:") {
            event.name = Some(name.trim().to_string());
        }
    }
    has_data.then_some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_separators() {
        assert_eq!(event_end("data: a\n\ndata: b"), Some((7, 2)));
        assert_eq!(event_end("data: a\r\n\r\n"), Some((7, 4)));
        assert_eq!(event_end("data: a\n"), None);
        let event = parse_event("event: message_start\ndata: {\"a\":1}\n: comment").unwrap();
        assert_eq!(event.name.as_deref(), Some("message_start"));
        assert_eq!(event.data, "{\"a\":1}");
        assert_eq!(parse_event(": keep-alive"), None);
        assert_eq!(
            parse_event("data: one\ndata: two").unwrap().data,
            "one\ntwo"
        );
    }
}
