//! The registration crate against a real node (in-process) and a real MCP server (the testkit
//! fixture over streamable HTTP).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use concord_register::{Health, RegisterError, Registrar, Registration};
use serde_json::{Value, json};

/// How long a test waits for something that must happen before failing. Generous: it only
/// decides failure, never success.
const DEADLINE: Duration = Duration::from_secs(60);
/// The TTL of the test registrations: heartbeats every second.
const TTL_SECONDS: u64 = 3;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `probe` until it gives a value; fails the test after `DEADLINE`.
async fn wait_until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The testkit fixture serving MCP over streamable HTTP, once it accepts connections.
async fn fixture() -> (Child, u16) {
    let port = concord_testkit::free_port();
    let child = Child(
        Command::new(concord_testkit::workspace_bin("concord-fixture"))
            .args(["--name", "search", "--http", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .expect("concord-fixture (cargo build --workspace --bins)"),
    );
    wait_until("the fixture to listen", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    (child, port)
}

/// A node with an empty configuration and its own (fresh) store in `data_dir`.
async fn node(listen: SocketAddr, data_dir: &Path) -> concord_node::RunningNode {
    let config =
        concord_config::Config::from_str_at("", Path::new("concord.toml"), &|_| None).unwrap();
    let options = || concord_node::NodeOptions {
        listen,
        data_dir: data_dir.to_path_buf(),
        store: None,
    };
    // A node restarted on the same port may find it held for a moment by the last one.
    wait_until("the node to start", async || {
        match concord_node::start(&config, options()).await {
            Ok(node) => Some(node),
            Err(concord_node::NodeError::Bind { .. }) => None,
            Err(other) => panic!("{other}"),
        }
    })
    .await
}

fn base_of(node: &concord_node::RunningNode) -> String {
    node.mcp_url().trim_end_matches("/mcp").to_string()
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

/// The entity `id` as the node lists it, once `done` holds for it.
async fn wait_listed(base: &str, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, async || {
        listed(base)
            .await
            .into_iter()
            .find(|e| e["id"] == id && done(e))
    })
    .await
}

fn search_server(port: u16) -> Registration {
    serde_json::from_value(json!({
        "name": "search", "version": "1.2.0", "kind": "server", "capabilities": ["search"],
        "tags": ["prod"], "endpoint": {"url": format!("http://127.0.0.1:{port}/mcp")},
        "ttl_seconds": TTL_SECONDS,
    }))
    .unwrap()
}

/// Waits until the node routes the registration: a replica of the logical server `search`,
/// named after its endpoint.
async fn wait_routed(node: &concord_node::RunningNode, id: &str) {
    let replica = format!("search@{}", id.rsplit('.').next().unwrap());
    wait_until("the node to route the replica", async || {
        node.gateway()
            .status()
            .iter()
            .any(|s| s.server == "search" && s.name == replica)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_registers_heartbeats_reports_health_and_deregisters() {
    let (_fixture, port) = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let node = node("127.0.0.1:0".parse().unwrap(), dir.path()).await;
    let base = base_of(&node);

    let me = search_server(port);
    let registrar = Registrar::start(&node.mcp_url(), me.clone(), None)
        .await
        .unwrap();
    let id = registrar.id();
    assert!(id.starts_with("default.search.1.2.0."), "{id}");
    let entities = listed(&base).await;
    assert_eq!(entities.len(), 1, "{entities:?}");
    let registered_ms = entities[0]["last_heartbeat_ms"].as_u64().unwrap();

    // Heartbeats keep it alive past its TTL: one arrives later than the registration alone
    // would have lasted, and the entity is live.
    let alive = wait_listed(&base, &id, "a heartbeat past the TTL", |e| {
        e["last_heartbeat_ms"].as_u64().unwrap() > registered_ms + TTL_SECONDS * 1000
    })
    .await;
    assert_eq!(alive["status"], "healthy", "{alive}");
    assert_eq!(listed(&base).await.len(), 1);
    // And it is routed.
    wait_routed(&node, &id).await;

    registrar.set_health(Health::Degraded);
    wait_listed(&base, &id, "the degraded health", |e| {
        e["status"] == "degraded"
    })
    .await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_the_node_forgot_is_registered_again_with_its_health() {
    let (_fixture, port) = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let node = node("127.0.0.1:0".parse().unwrap(), dir.path()).await;
    let base = base_of(&node);

    let registrar = Registrar::start(&node.mcp_url(), search_server(port), None)
        .await
        .unwrap();
    let id = registrar.id();
    registrar.set_health(Health::Degraded);
    wait_listed(&base, &id, "the degraded health", |e| {
        e["status"] == "degraded"
    })
    .await;

    // The node forgets it (here: removed behind the registrar's back); the next heartbeat is
    // answered 404.
    let removed = reqwest::Client::new()
        .delete(format!("{base}/api/v1/registry/{id}"))
        .send()
        .await
        .unwrap();
    assert!(removed.status().is_success(), "{removed:?}");

    // Registered again, under the same id, and with the health it last reported.
    let again = wait_listed(&base, &id, "the registration again, degraded", |e| {
        e["status"] == "degraded"
    })
    .await;
    assert_eq!(again["name"], "search");
    assert_eq!(registrar.id(), id);

    registrar.deregister().await.unwrap();
    assert!(listed(&base).await.is_empty());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrar_registers_again_with_a_node_restarted_with_a_fresh_store() {
    let (_fixture, port) = fixture().await;
    let first_dir = tempfile::tempdir().unwrap();
    let first = node("127.0.0.1:0".parse().unwrap(), first_dir.path()).await;
    let addr = first.local_addr();

    let registrar = Registrar::start(&first.mcp_url(), search_server(port), None)
        .await
        .unwrap();
    let id = registrar.id();
    wait_routed(&first, &id).await;

    // The node restarts on the same address with an empty store: it knows nothing of the
    // registration until the registrar tells it again.
    first.shutdown().await;
    let second_dir = tempfile::tempdir().unwrap();
    let second = node(addr, second_dir.path()).await;
    let base = base_of(&second);
    let again = wait_listed(&base, &id, "the registration on the new node", |e| {
        e["status"] == "healthy"
    })
    .await;
    assert_eq!(again["version"], "1.2.0");
    wait_routed(&second, &id).await;

    registrar.deregister().await.unwrap();
    assert!(listed(&base).await.is_empty());
    second.shutdown().await;
}
