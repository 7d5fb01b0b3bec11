//! Stdio upstreams that misbehave on purpose (the `concord-fixture` modes): stderr that is not
//! UTF-8, a stderr flood with one enormous line, and a server that crashes right after every
//! connection. The gateway must keep such a server alive where it can, keep its own log
//! bounded, and slow a crash loop down rather than restart as fast as the server dies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use concord_config::{Config, ServerSpec, TransportSpec};
use concord_mcp::{Gateway, GatewayOptions, UpstreamStatus};
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long a test waits for something that must happen before it calls it a hang. Generous:
/// it only decides failure, never success.
const DEADLINE: Duration = Duration::from_secs(60);
/// The upstreams' request timeout: far beyond `DEADLINE`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a test looks at the upstream's status while waiting for a condition on it.
const POLL: Duration = Duration::from_millis(10);

fn fixture(name: &str, flags: &[&str]) -> ServerSpec {
    let mut args = vec!["--name".to_string(), name.to_string()];
    args.extend(flags.iter().map(|f| f.to_string()));
    ServerSpec::new(
        name,
        TransportSpec::Stdio {
            command: concord_testkit::workspace_bin("concord-fixture")
                .to_string_lossy()
                .into_owned(),
            args,
            env: BTreeMap::new(),
            cwd: None,
        },
        REQUEST_TIMEOUT,
    )
}

fn start(server: ServerSpec) -> Gateway {
    let config = Config {
        servers: vec![server],
        ..Config::default()
    };
    let gateway = Gateway::new(&config, GatewayOptions::default(), Default::default());
    gateway.start();
    gateway
}

fn status_of(gateway: &Gateway, name: &str) -> UpstreamStatus {
    gateway
        .status()
        .into_iter()
        .find(|s| s.name == name)
        .expect("configured upstream")
}

async fn call(gateway: &Gateway, tool: &str, arguments: Value) -> Value {
    let arguments = arguments.as_object().cloned().unwrap_or_default();
    tokio::time::timeout(DEADLINE, gateway.call_tool(tool, arguments))
        .await
        .unwrap_or_else(|_| panic!("{tool} hung"))
        .unwrap_or_else(|e| panic!("{tool} failed: {e}"))
}

fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["text"].as_str())
        .collect()
}

#[tokio::test]
async fn stderr_that_is_not_utf8_does_not_kill_the_server() {
    // The fixture writes bytes that are not UTF-8 to stderr at start and before every answer,
    // and dies (as with SIGPIPE) if its stderr is no longer read.
    let gateway = start(fixture("garbled", &["--stderr-invalid-utf8"]));
    gateway.wait_first_attempts(DEADLINE).await.unwrap();
    assert_eq!(status_of(&gateway, "garbled").state, "healthy");
    let first = call(&gateway, "garbled__stats", json!({})).await;
    for i in 0..3 {
        let message = format!("still here {i}");
        let answer = call(&gateway, "garbled__echo", json!({"message": message})).await;
        assert_eq!(text(&answer), format!("Echo: {message}"));
    }
    let last = call(&gateway, "garbled__stats", json!({})).await;
    // The same process answered throughout: never killed, never restarted.
    assert_eq!(
        first["structuredContent"]["pid"],
        last["structuredContent"]["pid"]
    );
    let status = status_of(&gateway, "garbled");
    assert_eq!(
        (status.state, status.restarts),
        ("healthy", 0),
        "{status:?}"
    );
    gateway.shutdown().await;
}

/// What the gateway logged of upstream stderr (target `concord::upstream`).
#[derive(Default, Clone, Debug)]
struct Logged {
    lines: Vec<String>,
    /// The sum of the "suppressed" counts reported.
    suppressed: u64,
    reports: usize,
}

/// A subscriber for this test's thread only, recording upstream stderr as the node would log it.
struct Capture(Arc<watch::Sender<Logged>>);

#[derive(Default)]
struct Fields {
    message: Option<String>,
    suppressed: Option<u64>,
}

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "suppressed" {
            self.suppressed = Some(value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for Capture {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && metadata.target() == "concord::upstream"
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.send_modify(|logged| match fields.suppressed {
            Some(n) => {
                logged.suppressed += n;
                logged.reports += 1;
            }
            None => logged.lines.push(fields.message.unwrap_or_default()),
        });
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

// A current-thread runtime (the default): every task of the gateway runs on this thread, where
// the capturing subscriber is the default.
#[tokio::test]
async fn a_stderr_flood_is_read_whole_and_logged_at_a_bounded_rate() {
    let (logged, mut watch_logged) = {
        let tx = Arc::new(watch::Sender::new(Logged::default()));
        let rx = tx.subscribe();
        (tx, rx)
    };
    let _capture = tracing::subscriber::set_default(Capture(logged.clone()));
    const FLOOD: u64 = 20_000;
    // One line of 1 MiB, FLOOD short lines, then "flood done".
    let written = 1 + FLOOD + 1;
    let gateway = start(fixture("noisy", &["--stderr-flood", &FLOOD.to_string()]));
    gateway.wait_first_attempts(DEADLINE).await.unwrap();
    let answer = call(
        &gateway,
        "noisy__echo",
        json!({"message": "over the noise"}),
    )
    .await;
    assert_eq!(text(&answer), "Echo: over the noise");

    // Every line is accounted for, logged or counted as suppressed.
    let seen = tokio::time::timeout(
        DEADLINE,
        watch_logged.wait_for(|l| l.lines.len() as u64 + l.suppressed >= written),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not every stderr line was read: {:?}",
            logged.borrow().lines.len()
        )
    })
    .unwrap()
    .clone();
    assert_eq!(seen.lines.len() as u64 + seen.suppressed, written);
    // Most of the flood was suppressed, in a few reports rather than line by line.
    assert!(
        seen.suppressed > 0 && seen.reports > 0,
        "{:?}",
        seen.reports
    );
    assert!((seen.lines.len() as u64) < written);
    // The enormous line came through cut, not whole.
    let huge = &seen.lines[0];
    assert!(
        huge.starts_with("hhhh") && huge.ends_with("[concord: line cut at 8192 bytes]"),
        "{}",
        &huge[huge.len().saturating_sub(80)..]
    );
    assert!(huge.len() < 8192 + 64, "{}", huge.len());

    let status = status_of(&gateway, "noisy");
    assert_eq!(
        (status.state, status.restarts),
        ("healthy", 0),
        "{status:?}"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_server_that_crashes_after_connecting_is_retried_ever_more_slowly() {
    // The fixture answers initialize and the four lists the gateway fetches (five responses:
    // the connection is then healthy), and exits. Each connection is brief, so none of them
    // may reset the backoff.
    let gateway = start(fixture("flaky", &["--crash-after", "5"]));
    // Restart count → the backoff the supervisor reported while waiting after that restart.
    let mut waits: BTreeMap<u64, u64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = status_of(&gateway, "flaky");
    while waits.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only saw the waits {waits:?}; last status {last:?}"
        );
        last = status_of(&gateway, "flaky");
        if let (Some(backoff), Some(_)) = (last.retry_backoff_ms, last.next_retry_in_ms) {
            waits.insert(last.restarts, backoff);
            assert_eq!(last.state, "unhealthy", "{last:?}");
            assert!(
                last.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("exited with status 3")),
                "{last:?}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
    // Every wait followed a connection that became healthy and was lost (restarts counts those).
    assert!(waits.keys().all(|restarts| *restarts >= 1), "{waits:?}");
    let backoffs: Vec<u64> = waits.values().copied().collect();
    assert!(
        backoffs.windows(2).all(|pair| pair[1] > pair[0]),
        "the delay between restarts must grow while the server keeps crashing: {waits:?}"
    );
    gateway.shutdown().await;
}
