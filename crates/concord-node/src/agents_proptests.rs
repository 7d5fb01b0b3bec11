//! Property tests of the usage API's query (`/api/v1/usage?agent=&model=&since=24h`): any query
//! string, and any `since` however large its number, is read or refused with a 400, never a
//! panic or an overflow.

use axum::extract::Query;
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

/// `since` as people write it, and as they should not.
fn since_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,4}(ms|s|m|h)?",
        "[0-9]{0,4}\\.[0-9]{0,4}(ms|s|m|h)?",
        " ?[0-9]{8,400}(\\.[0-9]{0,3})?(ms|s|m|h)? ?",
        "[0-9]{1,3} ?(d|w|y|sec|e9|e400|µs|H)",
        "-[0-9]{1,3}(s|h)?",
        prop::sample::select(vec![
            "",
            ".",
            "0",
            "0s",
            "inf",
            "NaN",
            "1e3",
            "3153600000",
            "3153600001",
            "876000h",
            "876001h",
            "52560000m",
            "52560001m",
        ])
        .prop_map(str::to_string),
        ".{0,12}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any `since`: a duration of at most about 100 years, or a message saying why not.
    #[test]
    fn since_is_bounded_or_refused(text in since_text()) {
        match since_duration(&text) {
            Ok(back) => {
                prop_assert!(back.as_secs_f64() <= MAX_SINCE_SECS, "{text:?} gave {back:?}");
                // What the handler does with it cannot overflow either.
                let _ = now_ms().saturating_sub(u64::try_from(back.as_millis()).unwrap_or(u64::MAX));
            }
            Err(message) => prop_assert!(!message.is_empty()),
        }
    }

    /// Any query string: read as the usage query or refused by the extractor, never a panic;
    /// a `since` it holds goes through the same check.
    #[test]
    fn usage_queries_parse_or_refuse(pieces in prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(vec![
                "agent", "model", "since", "other", "=", "=", "&", "&", "+", "%", "%zz", "%C3%A9",
                "%FF", "24h", "99999999999999999999999h", "1e400", "reader",
            ])
            .prop_map(str::to_string),
            1 => "[a-z0-9%=&+.]{0,8}",
        ],
        0..10,
    )) {
        let uri = format!("/api/v1/usage?{}", pieces.concat());
        let Ok(uri) = uri.parse::<axum::http::Uri>() else {
            return Ok(());
        };
        if let Ok(Query(query)) = Query::<UsageQuery>::try_from_uri(&uri)
            && let Some(since) = &query.since
        {
            let _ = since_duration(since);
        }
    }
}
