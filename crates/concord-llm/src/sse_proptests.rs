//! Property tests of the event-stream decoder: whatever bytes a provider sends, cut wherever the
//! network cuts them, the events (or the error) are those of the bytes read in one piece, and
//! nothing panics.

use proptest::prelude::*;

use super::*;

/// 256 cases a property (`PROPTEST_CASES` overrides, for a longer local run), and no
/// regression files written into the source tree: a failure prints its minimal input.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes that look like an event stream often enough to exercise every field, with arbitrary
/// bytes (invalid UTF-8, lone `\r`) mixed in.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "data:", "data: ", "event:", "event: ", ":", ": ping", "id: 7", "retry: 10",
            "\n", "\n", "\n\n", "\r\n", "\r", "data", "{\"a\":1}", "é", "😀", " ",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        2 => "[a-z :{}\"]{0,8}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

/// `bytes` cut at `cuts` (positions taken modulo the length, in any order, repeats allowed).
fn split_at(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    at.sort_unstable();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

/// The events of `pieces` fed in order, stopping after `stop_after` events when given.
fn decode(
    pieces: &[Vec<u8>],
    max_line: usize,
    stop_after: Option<usize>,
) -> (Vec<Event>, Result<(), LlmError>) {
    let mut decoder = Decoder::new(max_line);
    let mut events = Vec::new();
    let mut collect = |event| {
        events.push(event);
        Ok(stop_after.is_none_or(|n| events.len() < n))
    };
    let mut outcome = Ok(());
    let mut stopped = false;
    for piece in pieces {
        match decoder.feed(piece, &mut collect) {
            Ok(true) => {}
            Ok(false) => {
                stopped = true;
                break;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    if outcome.is_ok() && !stopped {
        outcome = decoder.finish(&mut collect);
    }
    (events, outcome)
}

proptest! {
    #![proptest_config(config())]

    /// Cutting the bytes anywhere changes nothing: the same events, the same error.
    #[test]
    fn cuts_change_nothing(
        bytes in stream_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        max_line in prop_oneof![Just(1 << 20), 0usize..48],
    ) {
        let whole = decode(std::slice::from_ref(&bytes), max_line, None);
        let pieces = split_at(&bytes, &cuts);
        prop_assert_eq!(decode(&pieces, max_line, None), whole.clone());
        // One byte at a time, too.
        let bytewise: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
        prop_assert_eq!(decode(&bytewise, max_line, None), whole);
    }

    /// Any bytes at all: events or an error, never a panic, and a stop is a stop.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        stop_after in 1usize..4,
    ) {
        let pieces = split_at(&bytes, &cuts);
        let _ = decode(&pieces, 64, None);
        let (whole, _) = decode(std::slice::from_ref(&bytes), usize::MAX, Some(stop_after));
        let (split, _) = decode(&pieces, usize::MAX, Some(stop_after));
        prop_assert!(whole.len() <= stop_after);
        prop_assert_eq!(split, whole);
    }

    /// Well-formed events come out as they were written, however the stream is cut.
    #[test]
    fn written_events_come_back(
        written in prop::collection::vec(
            (
                prop::option::of("[a-z_]{1,12}"),
                prop::collection::vec("[^\r\n]{0,12}", 0..4),
                any::<bool>(),
            ),
            0..6,
        ),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for (name, lines, crlf) in &written {
            let end = if *crlf { "\r\n" } else { "\n" };
            if let Some(name) = name {
                bytes.extend_from_slice(format!("event: {name}{end}").as_bytes());
            }
            for line in lines {
                bytes.extend_from_slice(format!("data: {line}{end}").as_bytes());
            }
            bytes.extend_from_slice(end.as_bytes());
            if !lines.is_empty() {
                expected.push(Event { name: name.clone(), data: lines.join("\n") });
            }
        }
        let (events, outcome) = decode(&split_at(&bytes, &cuts), 1 << 16, None);
        prop_assert_eq!(outcome, Ok(()));
        prop_assert_eq!(events, expected);
    }
}
