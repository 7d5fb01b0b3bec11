use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use parking_lot::Mutex;

/// Latency bucket bounds in seconds: fine at the sub-millisecond end, where gateway overhead lives.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// How one request ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// The tool ran and reported `isError: true`.
    ToolError,
    /// Protocol error, timeout, unreachable upstream, cancelled.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ToolError => "tool_error",
            Outcome::Error => "error",
        }
    }
}

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, slot) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *slot += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Default)]
struct Inner {
    /// (method, server, outcome) -> count, for every MCP request the gateway answers.
    requests: BTreeMap<(String, String, Outcome), u64>,
    /// (server, tool, outcome) -> count of tool calls.
    tool_calls: BTreeMap<(String, String, Outcome), u64>,
    /// (server, tool) -> latency of tool calls.
    tool_latency: BTreeMap<(String, String), Histogram>,
    /// server -> 1 when healthy.
    upstream_up: BTreeMap<String, bool>,
    upstream_restarts: BTreeMap<String, u64>,
    /// (server, hit) → count.
    cache_lookups: BTreeMap<(String, bool), u64>,
    /// (server, replica, new state) → count of circuit-breaker transitions.
    breaker_transitions: BTreeMap<(String, String, String), u64>,
    /// (server, replica) → current breaker state (0 closed, 1 half-open, 2 open).
    breaker_state: BTreeMap<(String, String), u8>,
    /// (server, tool or method) → requests sent again to another replica.
    retries: BTreeMap<(String, String), u64>,
}

/// The node's metrics registry. Cheap to update from many tasks; rendered on demand.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one MCP request (any method) answered for `server` (empty for node-level methods).
    pub fn observe_request(&self, method: &str, server: &str, outcome: Outcome) {
        let mut inner = self.inner.lock();
        *inner
            .requests
            .entry((method.to_string(), server.to_string(), outcome))
            .or_default() += 1;
    }

    /// Records one `tools/call` routed to `server`.
    pub fn observe_tool_call(&self, server: &str, tool: &str, outcome: Outcome, elapsed: Duration) {
        let mut inner = self.inner.lock();
        *inner
            .tool_calls
            .entry((server.to_string(), tool.to_string(), outcome))
            .or_default() += 1;
        inner
            .tool_latency
            .entry((server.to_string(), tool.to_string()))
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_upstream_up(&self, server: &str, up: bool) {
        self.inner.lock().upstream_up.insert(server.to_string(), up);
    }

    pub fn count_upstream_restart(&self, server: &str) {
        *self
            .inner
            .lock()
            .upstream_restarts
            .entry(server.to_string())
            .or_default() += 1;
    }

    /// One result-cache lookup for a tool of `server`.
    pub fn count_cache(&self, server: &str, hit: bool) {
        *self
            .inner
            .lock()
            .cache_lookups
            .entry((server.to_string(), hit))
            .or_default() += 1;
    }

    /// The Prometheus text exposition format (version 0.0.4).
    /// A replica's circuit breaker changed to `state` (`closed`, `half_open`, `open`).
    pub fn count_breaker_transition(&self, server: &str, replica: &str, state: &str) {
        let mut inner = self.inner.lock();
        *inner
            .breaker_transitions
            .entry((server.to_string(), replica.to_string(), state.to_string()))
            .or_default() += 1;
        let level = match state {
            "open" => 2,
            "half_open" => 1,
            _ => 0,
        };
        inner
            .breaker_state
            .insert((server.to_string(), replica.to_string()), level);
    }

    /// A request to `server` (a call of tool `name`, or a method) was sent again after a
    /// replica failed it.
    pub fn count_retry(&self, server: &str, name: &str) {
        *self
            .inner
            .lock()
            .retries
            .entry((server.to_string(), name.to_string()))
            .or_default() += 1;
    }

    pub fn render(&self) -> String {
        let inner = self.inner.lock();
        let mut out = String::new();
        out.push_str("# HELP concord_mcp_requests_total MCP requests answered by the gateway.\n");
        out.push_str("# TYPE concord_mcp_requests_total counter\n");
        for ((method, server, outcome), n) in &inner.requests {
            let _ = writeln!(
                out,
                "concord_mcp_requests_total{{method=\"{}\",server=\"{}\",outcome=\"{}\"}} {n}",
                escape(method),
                escape(server),
                outcome.label()
            );
        }
        out.push_str("# HELP concord_tool_calls_total Tool calls routed to upstream servers.\n");
        out.push_str("# TYPE concord_tool_calls_total counter\n");
        for ((server, tool, outcome), n) in &inner.tool_calls {
            let _ = writeln!(
                out,
                "concord_tool_calls_total{{server=\"{}\",tool=\"{}\",outcome=\"{}\"}} {n}",
                escape(server),
                escape(tool),
                outcome.label()
            );
        }
        out.push_str(
            "# HELP concord_tool_call_duration_seconds Tool call latency through the gateway.\n",
        );
        out.push_str("# TYPE concord_tool_call_duration_seconds histogram\n");
        for ((server, tool), h) in &inner.tool_latency {
            let labels = format!("server=\"{}\",tool=\"{}\"", escape(server), escape(tool));
            for (bound, n) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(
                    out,
                    "concord_tool_call_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "concord_tool_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "concord_tool_call_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "concord_tool_call_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out.push_str(
            "# HELP concord_upstream_up Whether an upstream server is healthy (1) or not (0).\n",
        );
        out.push_str("# TYPE concord_upstream_up gauge\n");
        for (server, up) in &inner.upstream_up {
            let _ = writeln!(
                out,
                "concord_upstream_up{{server=\"{}\"}} {}",
                escape(server),
                u8::from(*up)
            );
        }
        out.push_str(
            "# HELP concord_upstream_restarts_total Reconnections or restarts of an upstream.\n",
        );
        out.push_str("# TYPE concord_upstream_restarts_total counter\n");
        for (server, n) in &inner.upstream_restarts {
            let _ = writeln!(
                out,
                "concord_upstream_restarts_total{{server=\"{}\"}} {n}",
                escape(server)
            );
        }
        out.push_str("# HELP concord_result_cache_lookups_total Result-cache lookups by server and outcome.\n");
        out.push_str("# TYPE concord_result_cache_lookups_total counter\n");
        for ((server, hit), n) in &inner.cache_lookups {
            let _ = writeln!(
                out,
                "concord_result_cache_lookups_total{{server=\"{}\",outcome=\"{}\"}} {n}",
                escape(server),
                if *hit { "hit" } else { "miss" }
            );
        }
        out.push_str("# HELP concord_breaker_transitions_total Circuit-breaker state changes by replica and new state.\n");
        out.push_str("# TYPE concord_breaker_transitions_total counter\n");
        for ((server, replica, state), n) in &inner.breaker_transitions {
            let _ = writeln!(
                out,
                "concord_breaker_transitions_total{{server=\"{}\",replica=\"{}\",state=\"{}\"}} {n}",
                escape(server),
                escape(replica),
                escape(state)
            );
        }
        out.push_str("# HELP concord_breaker_state A replica's circuit breaker: 0 closed, 1 half-open, 2 open.\n");
        out.push_str("# TYPE concord_breaker_state gauge\n");
        for ((server, replica), level) in &inner.breaker_state {
            let _ = writeln!(
                out,
                "concord_breaker_state{{server=\"{}\",replica=\"{}\"}} {level}",
                escape(server),
                escape(replica)
            );
        }
        out.push_str("# HELP concord_upstream_retries_total Requests sent again to another replica after a failure.\n");
        out.push_str("# TYPE concord_upstream_retries_total counter\n");
        for ((server, name), n) in &inner.retries {
            let _ = writeln!(
                out,
                "concord_upstream_retries_total{{server=\"{}\",name=\"{}\"}} {n}",
                escape(server),
                escape(name)
            );
        }
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::new();
        m.observe_tool_call("fs", "read", Outcome::Ok, Duration::from_millis(2));
        m.observe_tool_call("fs", "read", Outcome::Error, Duration::from_millis(30));
        m.observe_request("tools/call", "fs", Outcome::Ok);
        m.set_upstream_up("fs", true);
        let text = m.render();
        assert!(
            text.contains("concord_tool_calls_total{server=\"fs\",tool=\"read\",outcome=\"ok\"} 1")
        );
        assert!(
            text.contains(
                "concord_tool_calls_total{server=\"fs\",tool=\"read\",outcome=\"error\"} 1"
            )
        );
        assert!(text.contains(
            "concord_tool_call_duration_seconds_bucket{server=\"fs\",tool=\"read\",le=\"0.0025\"} 1"
        ));
        assert!(text.contains(
            "concord_tool_call_duration_seconds_bucket{server=\"fs\",tool=\"read\",le=\"0.05\"} 2"
        ));
        assert!(
            text.contains(
                "concord_tool_call_duration_seconds_count{server=\"fs\",tool=\"read\"} 2"
            )
        );
        assert!(text.contains("concord_upstream_up{server=\"fs\"} 1"));
    }

    #[test]
    fn breaker_transitions_and_retries_render() {
        let m = Metrics::new();
        m.count_breaker_transition("echo", "echo@1", "open");
        m.count_breaker_transition("echo", "echo@1", "half_open");
        m.count_retry("echo", "echo");
        let text = m.render();
        assert!(text.contains(
            "concord_breaker_transitions_total{server=\"echo\",replica=\"echo@1\",state=\"open\"} 1"
        ));
        assert!(text.contains("concord_breaker_state{server=\"echo\",replica=\"echo@1\"} 1"));
        assert!(text.contains("concord_upstream_retries_total{server=\"echo\",name=\"echo\"} 1"));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.observe_request("tools/call", "a\"b", Outcome::Ok);
        assert!(m.render().contains("server=\"a\\\"b\""));
    }
}
