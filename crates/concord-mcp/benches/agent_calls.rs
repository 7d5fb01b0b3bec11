//! What the gateway's pipeline costs an agent's tool call: `Gateway::call_tool_as` (the node's
//! own in-process MCP client through the whole pipeline: policy hook, budgets, cache, replica
//! choice, audit hook) against `Gateway::call_tool` (straight to the upstream's connection, as
//! agents called tools before), both calling `echo` on a stdio `concord-fixture`, one call at a
//! time, alternating blocks in the same run. Run: `cargo build --release --workspace --bins &&
//! cargo bench -p concord-mcp --bench agent_calls` (BENCH_SECONDS per side, default 4).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use concord_config::{Config, ServerSpec, TransportSpec};
use concord_mcp::builtin::Caller;
use concord_mcp::{Gateway, GatewayOptions};
use serde_json::{Map, Value, json};

fn arguments() -> Map<String, Value> {
    let mut arguments = Map::new();
    arguments.insert("message".into(), json!("bench"));
    arguments
}

fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let fixture = concord_testkit::workspace_bin("concord-fixture");
    let config = Config {
        servers: vec![ServerSpec::new(
            "fx",
            TransportSpec::Stdio {
                command: fixture.to_string_lossy().into_owned(),
                args: vec!["--name".into(), "fx".into()],
                env: BTreeMap::new(),
                cwd: None,
            },
            Duration::from_secs(20),
        )],
        ..Config::default()
    };
    let gateway = Gateway::new(&config, GatewayOptions::default(), Default::default());
    gateway.start();
    gateway
        .wait_first_attempts(Duration::from_secs(30))
        .await
        .expect("the fixture connects");

    // Warm both paths (the in-process client connects on first use).
    for _ in 0..200 {
        gateway.call_tool("fx__echo", arguments()).await.unwrap();
        gateway
            .call_tool_as("fx__echo", arguments(), Caller::default())
            .await
            .unwrap();
    }
    let mut direct = Vec::new();
    let mut pipeline = Vec::new();
    // Alternating half-second blocks, so both sides see the same machine.
    let block = Duration::from_millis(500);
    let blocks = (seconds * 2).max(2);
    for _ in 0..blocks {
        let until = Instant::now() + block;
        while Instant::now() < until {
            let started = Instant::now();
            gateway.call_tool("fx__echo", arguments()).await.unwrap();
            direct.push(started.elapsed());
        }
        let until = Instant::now() + block;
        while Instant::now() < until {
            let started = Instant::now();
            let answer = gateway
                .call_tool_as("fx__echo", arguments(), Caller::default())
                .await
                .unwrap();
            pipeline.push(started.elapsed());
            assert_eq!(answer["content"][0]["text"], "Echo: bench", "{answer}");
        }
    }
    let report = |label: &str, samples: &mut Vec<Duration>| {
        let total: Duration = samples.iter().sum();
        let rate = samples.len() as f64 / total.as_secs_f64();
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        println!(
            "{label:<40} {rate:>8.0} calls/s   p50 {:>7.1} µs   p99 {:>7.1} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        (rate, p50)
    };
    println!("agent tool calls, echo on a stdio concord-fixture, one at a time:");
    let (direct_rate, direct_p50) = report("direct to the upstream (call_tool)", &mut direct);
    let (pipeline_rate, pipeline_p50) =
        report("through the pipeline (call_tool_as)", &mut pipeline);
    println!(
        "pipeline / direct: {:.2} of the throughput, +{:.1} µs at p50",
        pipeline_rate / direct_rate,
        (pipeline_p50.as_secs_f64() - direct_p50.as_secs_f64()) * 1e6
    );
    gateway.shutdown().await;
}
