//! Server-sent events as the three provider APIs send them: events separated by a blank line,
//! `data:` lines joined; `event:` names kept (Anthropic uses them), comments ignored.
//!
//! Bytes are split into lines at `\n` (a trailing `\r` dropped) before anything is decoded, so a
//! character split across two reads arrives whole; each complete line is decoded as UTF-8. The
//! line still waiting for its newline is bounded, and so is the whole body.

use crate::limits::ResponseLimits;
use crate::provider::LlmError;

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Event {
    pub name: Option<String>,
    pub data: String,
}

/// Reads a response's events within `limits`. `on_event` returns false to stop reading.
pub(crate) async fn read_events(
    mut response: reqwest::Response,
    limits: &ResponseLimits,
    mut on_event: impl FnMut(Event) -> Result<bool, LlmError>,
) -> Result<(), LlmError> {
    let too_large = || LlmError::TooLarge {
        what: "the whole body",
        limit: limits.max_body_bytes,
    };
    if crate::limits::declared_past(&response, limits.max_body_bytes) {
        return Err(too_large());
    }
    let mut decoder = Decoder::new(limits.max_line_bytes);
    let mut read = 0usize;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| LlmError::Connect(format!("stream broke: {e}")))?
    {
        read = read.saturating_add(chunk.len());
        if read > limits.max_body_bytes {
            return Err(too_large());
        }
        if !decoder.feed(&chunk, &mut on_event)? {
            return Ok(());
        }
    }
    decoder.finish(&mut on_event)
}

/// Turns bytes, in pieces cut anywhere, into events.
pub(crate) struct Decoder {
    /// The bytes of the line whose newline has not come yet.
    line: Vec<u8>,
    max_line: usize,
    event: Event,
    has_data: bool,
}

impl Decoder {
    pub fn new(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            max_line,
            event: Event::default(),
            has_data: false,
        }
    }

    /// Takes the next bytes; false when `on_event` asked to stop.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        on_event: &mut impl FnMut(Event) -> Result<bool, LlmError>,
    ) -> Result<bool, LlmError> {
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            self.hold(&bytes[..at])?;
            bytes = &bytes[at + 1..];
            let line = std::mem::take(&mut self.line);
            let go_on = self.complete_line(&line, on_event)?;
            // Keep the allocation for the next line.
            self.line = line;
            self.line.clear();
            if !go_on {
                return Ok(false);
            }
        }
        self.hold(bytes)?;
        Ok(true)
    }

    /// The end of the stream: a last line without its newline, and a last event without its
    /// blank line, still count.
    pub fn finish(
        mut self,
        on_event: &mut impl FnMut(Event) -> Result<bool, LlmError>,
    ) -> Result<(), LlmError> {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() && !self.complete_line(&line, on_event)? {
            return Ok(());
        }
        self.dispatch(on_event)?;
        Ok(())
    }

    fn hold(&mut self, bytes: &[u8]) -> Result<(), LlmError> {
        if self.line.len().saturating_add(bytes.len()) > self.max_line {
            return Err(LlmError::TooLarge {
                what: "one event-stream line",
                limit: self.max_line,
            });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// One complete line (without its `\n`).
    fn complete_line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(Event) -> Result<bool, LlmError>,
    ) -> Result<bool, LlmError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.event.data.push('\n');
                }
                self.event.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event.name = Some(value.trim().to_string()),
            // Comments (an empty field name), `id`, `retry` and unknown fields.
            _ => {}
        }
        Ok(true)
    }

    /// The blank line: the event so far goes out if it had data.
    fn dispatch(
        &mut self,
        on_event: &mut impl FnMut(Event) -> Result<bool, LlmError>,
    ) -> Result<bool, LlmError> {
        let event = std::mem::take(&mut self.event);
        if std::mem::take(&mut self.has_data) {
            on_event(event)
        } else {
            Ok(true)
        }
    }
}

#[cfg(test)]
#[path = "sse_proptests.rs"]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of `pieces` fed one after the other, then the end.
    fn events(pieces: &[&[u8]], max_line: usize) -> Result<Vec<Event>, LlmError> {
        let mut decoder = Decoder::new(max_line);
        let mut events = Vec::new();
        let mut collect = |event| {
            events.push(event);
            Ok(true)
        };
        for piece in pieces {
            decoder.feed(piece, &mut collect)?;
        }
        decoder.finish(&mut collect)?;
        Ok(events)
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn events_names_comments_and_separators() {
        let events = events(
            &[b"event: message_start\ndata: {\"a\":1}\n: comment\n\n: keep-alive\n\ndata: one\r\ndata:two\r\n\r\ndata: last"],
            1024,
        )
        .unwrap();
        assert_eq!(events[0].name.as_deref(), Some("message_start"));
        assert_eq!(data(&events), ["{\"a\":1}", "one\ntwo", "last"]);
        assert_eq!(events[1].name, None);
    }

    #[test]
    fn characters_split_across_pieces_arrive_whole() {
        let text = "data: 5 €, 😀 ü\n\n".as_bytes();
        let whole = events(&[text], 1024).unwrap();
        assert_eq!(data(&whole), ["5 €, 😀 ü"]);
        // Every way of cutting the bytes in two, and one byte at a time.
        for cut in 0..=text.len() {
            assert_eq!(events(&[&text[..cut], &text[cut..]], 1024).unwrap(), whole);
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(events(&bytes, 1024).unwrap(), whole);
    }

    #[test]
    fn a_line_longer_than_the_limit_is_an_error() {
        let line = format!("data: {}", "a".repeat(100));
        assert!(events(&[line.as_bytes(), b"\n\n"], 106).is_ok());
        let error = events(&[line.as_bytes()], 105).unwrap_err();
        assert_eq!(
            error,
            LlmError::TooLarge {
                what: "one event-stream line",
                limit: 105
            }
        );
        // Held across pieces, too, and without a newline ever coming.
        let pieces: Vec<&[u8]> = line.as_bytes().chunks(7).collect();
        assert!(events(&pieces, 105).is_err());
    }

    #[test]
    fn stops_when_asked() {
        let mut decoder = Decoder::new(1024);
        let mut seen = 0;
        let go_on = decoder
            .feed(b"data: 1\n\ndata: 2\n\n", &mut |_| {
                seen += 1;
                Ok(false)
            })
            .unwrap();
        assert!(!go_on);
        assert_eq!(seen, 1);
    }
}
