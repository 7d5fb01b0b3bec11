//! The registry against the attacks of the issue "One front door": a principal hijacking
//! another's name (or a configured one), the node registered as its own upstream, the
//! registration probe used to reach metadata and private addresses or to read what an endpoint
//! answers, secrets of configured servers published in the listing, and a registry grown
//! without bound. Each test reproduces the attack and asserts it now fails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{TestNode, client};

/// How long a test waits for something that must happen before failing.
const DEADLINE: Duration = Duration::from_secs(30);

struct Fixture {
    child: Child,
    url: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The testkit's MCP server over streamable HTTP, once it accepts connections.
async fn fixture(name: &str) -> Fixture {
    let port = concord_testkit::free_port();
    let child = Command::new(concord_testkit::workspace_bin("concord-fixture"))
        .args(["--name", name, "--http", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .expect("concord-fixture (cargo build --workspace --bins)");
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the fixture never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Fixture {
        child,
        url: format!("http://127.0.0.1:{port}/mcp"),
    }
}

fn api(node: &TestNode) -> String {
    format!("http://{}/api/v1/registry", node.node.local_addr())
}

fn server(name: &str, version: &str, url: &str) -> Value {
    json!({"name": name, "version": version, "kind": "server", "capabilities": ["search"],
           "endpoint": {"url": url}, "ttl_seconds": 600})
}

fn llm(name: &str) -> Value {
    json!({"name": name, "version": "1.0.0", "kind": "llm", "capabilities": ["llm"],
           "endpoint": {"url": "http://127.0.0.1:9/v1"}, "ttl_seconds": 600})
}

async fn send(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, Value) {
    let mut request = client().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.expect("node answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn register(node: &TestNode, token: Option<&str>, body: &Value) -> (u16, Value) {
    send(
        reqwest::Method::POST,
        &api(node),
        token,
        Some(body.to_string()),
    )
    .await
}

async fn heartbeat(node: &TestNode, token: Option<&str>, id: &str) -> (u16, Value) {
    let url = format!("{}/{id}/heartbeat", api(node));
    send(reqwest::Method::POST, &url, token, Some("{}".into())).await
}

async fn deregister(node: &TestNode, token: Option<&str>, id: &str) -> (u16, Value) {
    let url = format!("{}/{id}", api(node));
    send(reqwest::Method::DELETE, &url, token, None).await
}

async fn listed(node: &TestNode) -> Value {
    send(reqwest::Method::GET, &api(node), None, None).await.1
}

/// The gateway's upstreams that are replicas of the logical server `pool`.
fn replicas(node: &TestNode, pool: &str) -> Vec<String> {
    node.node
        .gateway()
        .status()
        .into_iter()
        .filter(|u| u.server == pool && u.name != pool)
        .map(|u| u.name)
        .collect()
}

/// The replica upstream name of an entity id (`NAME@HASH`).
fn replica_of(name: &str, id: &str) -> String {
    format!("{name}@{}", id.rsplit('.').next().unwrap())
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

const REGISTRY_RULE: &str = "[[policy.rules]]\nname = \"registry\"\neffect = \"allow\"\nwhen = 'method.startsWith(\"registry/\")'\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_belongs_to_its_first_registrant_and_another_principal_cannot_take_its_calls() {
    let (node, tokens) = TestNode::start_with_keys(
        &format!("[auth]\nenabled = true\n{REGISTRY_RULE}"),
        &["alice".to_string(), "mallory".to_string()],
    )
    .await;
    let (alice, mallory) = (tokens["alice"].as_str(), tokens["mallory"].as_str());
    let honest = fixture("search").await;
    let rogue = fixture("rogue").await;

    let (status, body) =
        register(&node, Some(alice), &server("search", "1.0.0", &honest.url)).await;
    assert_eq!(status, 201, "{body}");
    let alices = body["id"].as_str().unwrap().to_string();

    // The attack: a newer version line of the same name, which used to win the pool.
    let (status, body) =
        register(&node, Some(mallory), &server("search", "9.0.0", &rogue.url)).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        error_of(&body).contains("belongs to another principal"),
        "{body}"
    );
    // Nor may she keep alice's replica alive or remove it.
    let (status, body) = heartbeat(&node, Some(mallory), &alices).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = deregister(&node, Some(mallory), &alices).await;
    assert_eq!(status, 403, "{body}");
    // Her own namespace is hers, but it is never routed into the default catalog.
    let mut elsewhere = server("search", "9.0.0", &rogue.url);
    elsewhere["namespace"] = json!("mallory");
    let (status, body) = register(&node, Some(mallory), &elsewhere).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = heartbeat(&node, Some(alice), body["id"].as_str().unwrap()).await;
    assert_eq!(status, 403, "{body}");

    let honest_replica = replica_of("search", &alices);
    wait_for("alice's replica to be routed", || {
        replicas(&node, "search") == vec![honest_replica.clone()]
    })
    .await;
    // Several sync ticks later the pool is still alice's alone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replicas(&node, "search"), vec![honest_replica]);

    let (status, body) = heartbeat(&node, Some(alice), &alices).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = deregister(&node, Some(alice), &alices).await;
    assert_eq!(status, 200, "{body}");
    // Leaving does not hand the name over: the claim outlives the last replica.
    let (status, body) =
        register(&node, Some(mallory), &server("search", "9.0.0", &rogue.url)).await;
    assert_eq!(status, 403, "{body}");
    wait_for("alice's replica to leave", || {
        replicas(&node, "search").is_empty()
    })
    .await;
    node.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_config_declares_are_reserved() {
    let node = TestNode::start(
        "[registry.declared]\nversion = \"1.0.0\"\nkind = \"llm\"\ncapabilities = [\"llm\"]\nendpoint = { url = \"http://127.0.0.1:9/v1\" }\n",
    )
    .await
    .unwrap();
    let upstream = fixture("alpha").await;
    for name in ["alpha", "declared"] {
        let (status, body) = register(&node, None, &server(name, "2.0.0", &upstream.url)).await;
        assert_eq!(status, 403, "{name}: {body}");
        assert!(
            error_of(&body).contains("declared in the node's configuration"),
            "{body}"
        );
        // In any namespace.
        let mut elsewhere = server(name, "2.0.0", &upstream.url);
        elsewhere["namespace"] = json!("other");
        assert_eq!(register(&node, None, &elsewhere).await.0, 403, "{name}");
    }
    let ids = |listing: &Value| -> Vec<String> {
        listing["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&listed(&node).await);
    assert_eq!(before.len(), 2, "{before:?}");
    for id in &before {
        assert_eq!(heartbeat(&node, None, id).await.0, 403, "{id}");
        assert_eq!(deregister(&node, None, id).await.0, 403, "{id}");
    }
    assert_eq!(ids(&listed(&node).await), before);
    node.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_is_never_its_own_upstream() {
    let node = TestNode::start("").await.unwrap();
    let port = node.node.local_addr().port();
    for url in [
        node.url(),
        format!("http://localhost:{port}/mcp"),
        format!("http://localhost:{port}/agents/helper/mcp"),
        format!("http://[::1]:{port}/mcp"),
        format!("http://127.0.0.1:{port}/healthz"),
    ] {
        let (status, body) = register(&node, None, &server("loop", "1.0.0", &url)).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert!(error_of(&body).contains("this node itself"), "{body}");
    }
    // Nothing was registered, and the catalog did not grow.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let names: Vec<String> = node
        .node
        .gateway()
        .status()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alpha"]);
    let entities = listed(&node).await;
    assert!(
        entities["entities"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "loop"),
        "{entities}"
    );
    node.node.shutdown().await;
}

/// A one-request HTTP server that answers `status` with `body`, and counts requests.
async fn answering(
    status: u16,
    content_type: &str,
    body: &str,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let answer = format!(
        "HTTP/1.1 {status} Whatever\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = vec![0u8; 8192];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_reaches_no_forbidden_address_and_never_echoes_an_answer() {
    let node = TestNode::start("").await.unwrap();
    for (url, expected) in [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]:8080/mcp", "link-local"),
        ("http://100.100.100.200/latest/meta-data/", "metadata"),
        ("http://10.1.2.3:9000/mcp", "private address"),
        ("http://192.168.0.10:9000/mcp", "private address"),
        ("http://[::ffff:172.16.0.1]:9000/mcp", "private address"),
        ("http://0.0.0.0:9000/mcp", "never allowed"),
    ] {
        let started = Instant::now();
        let (status, body) = register(&node, None, &server("probe", "1.0.0", url)).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert!(error_of(&body).contains(expected), "{url}: {body}");
        // Refused before any connection was tried (a probe would wait for its timeout).
        assert!(started.elapsed() < Duration::from_secs(2), "{url}");
    }
    // What an endpoint answers stays with the node: only what failed is said.
    let secret = "SECRET-db-password-hunter2";
    let (failing, failing_task) = answering(500, "text/plain", secret).await;
    let (status, body) = register(&node, None, &server("probe", "1.0.0", &failing)).await;
    assert_eq!(status, 422, "{body}");
    assert!(error_of(&body).contains("HTTP status 500"), "{body}");
    assert!(!body.to_string().contains("SECRET"), "{body}");
    let (chatty, chatty_task) = answering(
        200,
        "application/json",
        &json!({"leaked": secret}).to_string(),
    )
    .await;
    let (status, body) = register(&node, None, &server("probe", "1.0.0", &chatty)).await;
    assert_eq!(status, 422, "{body}");
    assert!(error_of(&body).contains("not an MCP server"), "{body}");
    assert!(!body.to_string().contains("SECRET"), "{body}");
    failing_task.abort();
    chatty_task.abort();
    // A real MCP server on loopback is fine.
    let upstream = fixture("probe").await;
    let (status, body) = register(&node, None, &server("probe", "1.0.0", &upstream.url)).await;
    assert_eq!(status, 201, "{body}");
    node.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_servers_are_published_without_secrets() {
    let fixture_bin = concord_testkit::workspace_bin("concord-fixture");
    let node = TestNode::start(&format!(
        "[servers.db]\nurl = \"http://app:hunter2@127.0.0.1:9/mcp?token=s3cret-token\"\n\
         headers = {{ Authorization = \"Bearer s3cret-bearer\" }}\n\
         [servers.tool]\ncommand = {fixture_bin:?}\nargs = [\"--name\", \"tool\", \"--stderr-flood\", \"1\"]\n\
         env = {{ API_KEY = \"s3cret-env\" }}\n"
    ))
    .await
    .unwrap();
    let listing = listed(&node).await;
    let text = listing.to_string();
    for secret in [
        "hunter2",
        "s3cret",
        "--name",
        "--stderr-flood",
        "API_KEY",
        "app:",
    ] {
        assert!(!text.contains(secret), "{secret} published: {text}");
    }
    let endpoint = |name: &str| {
        listing["entities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {listing}"))["endpoint"]
            .clone()
    };
    assert_eq!(endpoint("db"), json!({"url": "http://127.0.0.1:9/mcp"}));
    assert_eq!(endpoint("tool"), json!({"command": ["concord-fixture"]}));
    assert_eq!(endpoint("alpha"), json!({"command": ["concord-fixture"]}));
    // A registrant's own URL is listed the same way.
    let upstream = fixture("search").await;
    let with_query = format!("{}?key=s3cret-query", upstream.url);
    let (status, body) = register(&node, None, &server("search", "1.0.0", &with_query)).await;
    assert_eq!(status, 201, "{body}");
    assert!(!listed(&node).await.to_string().contains("s3cret"));
    node.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_bounded() {
    let (node, tokens) = TestNode::start_with_keys(
        &format!("[auth]\nenabled = true\n[node]\nregistry_max_per_principal = 3\n{REGISTRY_RULE}"),
        &["bob".to_string(), "carol".to_string()],
    )
    .await;
    let (bob, carol) = (tokens["bob"].as_str(), tokens["carol"].as_str());
    for i in 0..3 {
        let (status, body) = register(&node, Some(bob), &llm(&format!("model{i}"))).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = register(&node, Some(bob), &llm("model3")).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        error_of(&body).contains("registry_max_per_principal"),
        "{body}"
    );
    // Registering one of his own again adds nothing; another principal has a cap of her own.
    assert_eq!(register(&node, Some(bob), &llm("model0")).await.0, 201);
    assert_eq!(register(&node, Some(carol), &llm("other")).await.0, 201);

    // No process is spawned for a remote principal.
    let command = json!({"name": "spawn", "version": "1.0.0", "kind": "server",
        "capabilities": ["x"], "endpoint": {"command": ["/bin/sh", "-c", "touch /tmp/owned"]}});
    let (status, body) = register(&node, Some(carol), &command).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).contains("command endpoints cannot be registered"),
        "{body}"
    );
    // Metadata and the registration itself are bounded.
    let mut fat = llm("fat");
    fat["metadata"] = json!({"blob": "x".repeat(20 * 1024)});
    let (status, body) = register(&node, Some(carol), &fat).await;
    assert_eq!(status, 413, "{body}");
    assert!(error_of(&body).starts_with("metadata:"), "{body}");
    let mut huge = llm("huge");
    huge["tags"] = json!(vec!["t".repeat(100); 2000]);
    let (status, _) = register(&node, Some(carol), &huge).await;
    assert_eq!(status, 413);
    let names: Vec<String> = listed_as(&node, carol)
        .await
        .into_iter()
        .filter(|n| n != "alpha")
        .collect();
    assert_eq!(names, ["model0", "model1", "model2", "other"]);
    node.node.shutdown().await;
}

async fn listed_as(node: &TestNode, token: &str) -> Vec<String> {
    let (status, body) = send(reqwest::Method::GET, &api(node), Some(token), None).await;
    assert_eq!(status, 200, "{body}");
    let mut names: Vec<String> = body["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}
