//! The registration crate against a real node (in-process) and a real MCP server (the testkit
//! fixture over streamable HTTP).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use concord_register::{Health, RegisterError, Registrar, Registration};
use serde_json::{Value, json};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn listed(base: &str) -> Vec<Value> {
    let body: Value = reqwest::get(format!("{base}/api/v1/registry"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["entities"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_registers_heartbeats_reports_health_and_deregisters() {
    let port = concord_testkit::free_port();
    let _fixture = Child(
        Command::new(concord_testkit::workspace_bin("concord-fixture"))
            .args(["--name", "search", "--http", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .expect("concord-fixture (cargo build --workspace --bins)"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config =
        concord_config::Config::from_str_at("", Path::new("concord.toml"), &|_| None).unwrap();
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
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let me: Registration = serde_json::from_value(json!({
        "name": "search", "version": "1.2.0", "kind": "server", "capabilities": ["search"],
        "tags": ["prod"], "endpoint": {"url": format!("http://127.0.0.1:{port}/mcp")},
        "ttl_seconds": 3,
    }))
    .unwrap();
    let registrar = Registrar::start(&node.mcp_url(), me.clone(), None)
        .await
        .unwrap();
    assert!(
        registrar.id().starts_with("default.search.1.2.0."),
        "{}",
        registrar.id()
    );

    // Heartbeats keep it alive past its TTL.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let entities = listed(&base).await;
    assert_eq!(entities.len(), 1);
    assert_eq!(entities[0]["status"], "healthy");
    // And it is routed: a replica of the logical server `search`, named after its endpoint.
    let suffix = registrar.id().rsplit('.').next().unwrap().to_string();
    assert!(
        node.gateway()
            .status()
            .iter()
            .any(|s| s.server == "search" && s.name == format!("search@{suffix}")),
        "{:?}",
        node.gateway().status()
    );

    registrar.set_health(Health::Degraded);
    let mut status = Value::Null;
    for _ in 0..50 {
        status = listed(&base).await[0]["status"].clone();
        if status == "degraded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "degraded");

    registrar.deregister().await.unwrap();
    assert!(listed(&base).await.is_empty());

    let mut bad = me;
    bad.version = "latest".into();
    match Registrar::start(&node.mcp_url(), bad, None).await {
        Err(RegisterError::Refused { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.starts_with("version:"), "{message}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("an invalid version was accepted"),
    }
    node.shutdown().await;
}
