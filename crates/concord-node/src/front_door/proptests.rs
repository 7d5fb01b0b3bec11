//! Property tests of what the front door reads from a request before anything else: the `Host`
//! and `Origin` headers (the DNS-rebinding guard) and the policy subject taken from the path
//! and query. Any text: a decision, never a panic; loopback always passes; a name nobody
//! allowed never does; and the subject is what the handler will read.

use axum::body::Body;
use axum::extract::Query;
use proptest::prelude::*;

use super::hosts::EdgeRefusal;
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

const ALLOWED_HOSTS: [&str; 3] = ["gateway.internal", "10.0.0.5:8811", "[fd00::1]"];
const ALLOWED_ORIGINS: [&str; 3] = [
    "https://console.example.com",
    "http://dev.example:*",
    "null",
];

fn policy() -> HostPolicy {
    HostPolicy::new(
        &ALLOWED_HOSTS.map(String::from),
        &ALLOWED_ORIGINS.map(String::from),
    )
}

/// Text a `Host` or `Origin` header might hold.
fn header_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => prop::sample::select(vec![
            "localhost", "LOCALHOST", "127.0.0.1", "[::1]", "::1", "gateway.internal", "10.0.0.5",
            "[fd00::1]", "http://", "https://", "ws://", ":", ":8811", ":*", ":99999", ":-1", "@",
            "user@", "/", "?", "#", "%", "[", "]", ".", "null", " ", "\t", "console.example.com",
        ])
        .prop_map(str::to_string),
        2 => "[a-z0-9.-]{0,12}",
        1 => ".{0,6}",
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

/// A host name that is neither loopback nor allowed.
fn foreign_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,15}(\\.[a-z][a-z0-9-]{0,10}){0,3}".prop_filter("a known name", |name| {
        ![
            "localhost",
            "gateway.internal",
            "console.example.com",
            "dev.example",
        ]
        .contains(&name.as_str())
    })
}

fn loopback() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "localhost",
        "LocalHost",
        "LOCALHOST",
        "127.0.0.1",
        "[::1]",
    ])
    .prop_map(str::to_string)
}

proptest! {
    #![proptest_config(config())]

    /// Any `Host` and `Origin`: allowed or refused with the reason, never a panic.
    #[test]
    fn any_host_and_origin_get_a_decision(
        host in prop::option::of(header_text()),
        origin in prop::option::of(header_text()),
        allowed_hosts in prop::collection::vec(header_text(), 0..3),
        allowed_origins in prop::collection::vec(header_text(), 0..3),
    ) {
        let policies = [policy(), HostPolicy::new(&allowed_hosts, &allowed_origins)];
        for policy in policies {
            match policy.check(host.as_deref(), origin.as_deref()) {
                Ok(()) => prop_assert!(host.is_some()),
                Err(EdgeRefusal::MissingHost) => prop_assert!(host.is_none()),
                Err(EdgeRefusal::Host(h)) => prop_assert_eq!(Some(h), host.clone()),
                Err(EdgeRefusal::Origin(o)) => prop_assert_eq!(Some(o), origin.clone()),
            }
        }
    }

    /// A loopback `Host` with any port (or none), and a loopback `Origin` of either scheme
    /// with any port, always pass, whatever the operator allowed.
    #[test]
    fn loopback_always_passes(
        host in loopback(),
        port in prop::option::of(any::<u16>()),
        origin in prop::option::of((prop::sample::select(vec!["http", "https", "HTTP"]), loopback(), prop::option::of(any::<u16>()))),
        allowed_hosts in prop::collection::vec(header_text(), 0..3),
    ) {
        let host = match port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        };
        let origin = origin.map(|(scheme, name, port)| match port {
            Some(port) => format!("{scheme}://{name}:{port}"),
            None => format!("{scheme}://{name}"),
        });
        for policy in [policy(), HostPolicy::new(&allowed_hosts, &[])] {
            prop_assert_eq!(policy.check(Some(&host), origin.as_deref()), Ok(()), "{} {:?}", host, origin);
        }
    }

    /// A name nobody allowed never passes as `Host`, with any port, nor as an `Origin`'s host
    /// with any scheme and port.
    #[test]
    fn foreign_names_never_pass(
        name in foreign_name(),
        port in prop::option::of(any::<u16>()),
        scheme in prop::sample::select(vec!["http", "https", "ws"]),
    ) {
        let policy = policy();
        let host = match port {
            Some(port) => format!("{name}:{port}"),
            None => name.clone(),
        };
        prop_assert_eq!(policy.check(Some(&host), None), Err(EdgeRefusal::Host(host.clone())));
        let origin = match port {
            Some(port) => format!("{scheme}://{name}:{port}"),
            None => format!("{scheme}://{name}"),
        };
        prop_assert_eq!(
            policy.check(Some("localhost"), Some(&origin)),
            Err(EdgeRefusal::Origin(origin.clone()))
        );
    }

    /// `%XX` decoding never panics, undoes encoding, and leaves text without `%` alone.
    #[test]
    fn percent_decoding_undoes_encoding(text in ".{0,24}", raw in ".{0,24}", escape in prop::collection::vec(any::<bool>(), 0..96)) {
        let _ = percent_decode(&raw);
        if !raw.contains('%') {
            prop_assert_eq!(percent_decode(&raw), raw);
        }
        // Each byte of `text` escaped or not, at random.
        let mut encoded = String::new();
        for (i, byte) in text.bytes().enumerate() {
            if escape.get(i).copied().unwrap_or(true) || byte == b'%' || !byte.is_ascii() {
                encoded.push_str(&format!("%{byte:02X}"));
            } else {
                encoded.push(byte as char);
            }
        }
        prop_assert_eq!(percent_decode(&encoded), text);
    }

    /// Any path and query on any route: a subject, never a panic; a state key's namespace is
    /// its first segment.
    #[test]
    fn subjects_of_any_request(
        row in prop::sample::select(SURFACES.to_vec()),
        tail in "[a-zA-Z0-9/%._~+-]{0,24}",
        query in prop::option::of("[a-zA-Z0-9=&%+/._-]{0,24}"),
    ) {
        let fixed = row.path.split('{').next().unwrap_or_default();
        let uri = match &query {
            Some(query) => format!("{fixed}{tail}?{query}"),
            None => format!("{fixed}{tail}"),
        };
        let Ok(request) = Request::builder().uri(&uri).body(Body::empty()) else {
            return Ok(());
        };
        let (name, namespace) = subject_of(&row, &request);
        match row.subject {
            Subject::Path => prop_assert_eq!(namespace, None),
            Subject::Segment => prop_assert_eq!(namespace, None),
            Subject::Tail | Subject::Query(_) => {
                prop_assert_eq!(namespace.as_deref(), name.split('/').next());
            }
        }
    }

    /// The change feed's `prefix` as the policy sees it is the `prefix` its handler reads,
    /// however the parameter's name and value are escaped.
    #[test]
    fn the_feed_subject_is_what_the_handler_reads(pairs in prop::collection::vec(
        (
            prop::sample::select(vec![
                "prefix", "prefix", "pre%66ix", "%70refix", "prefix%20", "pre+fix", "PREFIX",
                "since", "a", "", "%",
            ]),
            prop::option::weighted(0.9, prop::collection::vec(
                prop::sample::select(vec![
                    "tasks", "a", "/", "+", "%2F", "%2f", "%", "%zz", "%C3%A9", "%FF", "%00",
                    "=", "%26", "%3D", "1",
                ]),
                0..4,
            )),
        ),
        0..4,
    )) {
        let query = pairs
            .iter()
            .map(|(key, value)| match value {
                Some(value) => format!("{key}={}", value.concat()),
                None => key.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        let uri = format!("/api/v1/state/changes?{query}");
        let Ok(request) = Request::builder().uri(&uri).body(Body::empty()) else {
            return Ok(());
        };
        let feed = surface_of("/api/v1/state/changes", &Method::GET).unwrap();
        let (name, _) = subject_of(feed, &request);
        if Query::<crate::rest::FeedQuery>::try_from_uri(request.uri()).is_ok() {
            let pairs = Query::<Vec<(String, String)>>::try_from_uri(request.uri()).unwrap().0;
            let prefixes: Vec<&String> = pairs
                .iter()
                .filter(|(k, _)| k == "prefix")
                .map(|(_, v)| v)
                .collect();
            prop_assert_eq!(prefixes.len(), 1, "{}", query);
            prop_assert_eq!(&name, prefixes[0], "{}", query);
        }
    }
}
