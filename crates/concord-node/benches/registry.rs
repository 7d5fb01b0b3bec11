//! Registry ingestion: heartbeats per second one node takes over HTTP (16 concurrent senders,
//! 1,000 registered entities), on its default SQLite store. Run:
//! `cargo bench -p concord-node --bench registry` (`BENCH_SECONDS`, default 3).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let config = concord_config::Config::from_str_at(
        // One principal (auth off) registers all of them.
        "[node]\nregistry_max_per_principal = 100000\n",
        Path::new("concord.toml"),
        &|_| None,
    )
    .unwrap();
    let node = concord_node::start(
        &config,
        concord_node::NodeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            store: None,
        },
    )
    .await
    .unwrap();
    let base = node.mcp_url().trim_end_matches("/mcp").to_string();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    // LLM providers are registered without an MCP probe, so a thousand are quick to add.
    let mut ids = Vec::new();
    for i in 0..1000 {
        let body: serde_json::Value = http
            .post(format!("{base}/api/v1/registry"))
            .json(&json!({
                "name": format!("llm{i}"), "version": "1.0.0", "kind": "llm",
                "capabilities": ["llm"], "endpoint": {"url": format!("http://10.0.0.1:{}/v1", 1000 + i)},
                "ttl_seconds": 3600,
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let ids = Arc::new(ids);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for worker in 0..16usize {
        let (http, base, ids, done) = (http.clone(), base.clone(), ids.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut i = worker;
            while Instant::now() < deadline {
                let id = &ids[i % ids.len()];
                let status = http
                    .post(format!("{base}/api/v1/registry/{id}/heartbeat"))
                    .json(&json!({"health": "healthy"}))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert!(status.is_success(), "{status}");
                done.fetch_add(1, Ordering::Relaxed);
                i += 16;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / seconds as f64;
    println!("heartbeats ingested: {rate:.0}/s (16 senders, 1000 entities, SQLite)");
    node.shutdown().await;
}
