//! Hostile clients of the issue "Hostile peers", written in raw bytes over sockets against a
//! real node: connections that never finish their request headers (slowloris), more connections
//! than the node serves, more MCP sessions than it holds, and sessions left idle. Each test
//! asserts the bound that now holds, that the node keeps serving a legitimate client, and that
//! what is refused is told why.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TestNode, assert_still_serving, call_echo, client, open_session};

/// How long a test waits for something that must happen before it calls it a hang. Generous:
/// it only decides failure, never success.
const DEADLINE: Duration = Duration::from_secs(60);
/// The JSON-RPC code of a refusal at a configured capacity.
const AT_CAPACITY: i64 = -32031;

fn addr(node: &TestNode) -> String {
    node.node.local_addr().to_string()
}

/// Reads until the peer closes the connection (EOF or reset); returns what came before. Fails
/// the test if the node keeps the connection past [`DEADLINE`].
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "the node kept the connection open; it sent {:?}",
                String::from_utf8_lossy(&seen)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&seen).into_owned(),
            Ok(Ok(n)) => seen.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The JSON body of a raw HTTP answer.
fn json_body(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// A POST of `body` to `/mcp` in raw HTTP (`Connection: close`); the whole answer.
async fn raw_post(addr: &str, session: Option<&str>, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(session) = session {
        request.push_str(&format!(
            "Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-11-25\r\n"
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    read_until_closed(&mut stream).await
}

fn initialize() -> String {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}})
    .to_string()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[tokio::test]
async fn connections_that_never_finish_their_headers_are_closed_and_others_are_served() {
    let node = TestNode::start("[node]\nheader_read_timeout = \"500ms\"\n")
        .await
        .unwrap();
    let url = node.url();
    let addr = addr(&node);
    // Slowloris: 50 connections that send part of a request head and never the rest, and one
    // that keeps dripping a header byte at a time.
    let mut slow = Vec::new();
    for i in 0..50 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(format!("POST /mcp HTTP/1.1\r\nHost: {addr}\r\nX-Slow-{i}: ").as_bytes())
            .await
            .unwrap();
        slow.push(stream);
    }
    let mut dripping = TcpStream::connect(&addr).await.unwrap();
    dripping
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Drip: ").as_bytes())
        .await
        .unwrap();
    let drip = tokio::spawn(async move {
        // The hostile peer's own pace: a byte every 100 ms for as long as the node listens.
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        loop {
            interval.tick().await;
            if dripping.write_all(b"a").await.is_err() {
                return read_until_closed(&mut dripping).await;
            }
        }
    });
    // The legitimate client is served meanwhile.
    let session = open_session(&url).await;
    for i in 0..5 {
        let answer = call_echo(&url, &session, &format!("call {i}")).await;
        assert_eq!(
            answer["result"]["content"][0]["text"],
            format!("Echo: call {i}")
        );
    }
    // Every slow connection is closed by the node (before, they were held indefinitely).
    for stream in &mut slow {
        let answer = read_until_closed(stream).await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let dripped = tokio::time::timeout(DEADLINE, drip)
        .await
        .expect("the dripping connection was never closed")
        .unwrap();
    assert!(!dripped.starts_with("HTTP/1.1 200"), "{dripped}");
    assert_still_serving(&url).await;
    let answer = call_echo(&url, &session, "after").await;
    assert_eq!(answer["result"]["content"][0]["text"], "Echo: after");
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_and_the_connection_closed() {
    let node = TestNode::start("").await.unwrap();
    let addr = addr(&node);
    // 300 KB of headers: far past the 64 KiB a connection reads a head into (hyper's own
    // default, about 400 KiB, would take it).
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(300_000)
    );
    // The node may stop reading before it has it all.
    let _ = stream.write_all(head.as_bytes()).await;
    let answer = read_until_closed(&mut stream).await;
    assert!(
        answer.is_empty() || status_of(&answer) == 431,
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_still_serving(&node.url()).await;
}

#[tokio::test]
async fn connections_past_the_cap_are_answered_503_and_closed() {
    // A long header timeout: the hostile connections hold their slots for the whole test.
    let node = TestNode::start("[node]\nmax_connections = 8\nheader_read_timeout = \"600s\"\n")
        .await
        .unwrap();
    let url = node.url();
    let addr = addr(&node);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // The ninth is answered at once, and closed.
    let mut ninth = TcpStream::connect(&addr).await.unwrap();
    ninth
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_until_closed(&mut ninth).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    let error = &json_body(&answer)["error"];
    assert_eq!(error["code"], AT_CAPACITY, "{answer}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("maximum of 8 connections ([node] max_connections)"),
        "{answer}"
    );
    // A client that sends its request at once hears the same.
    let refused = client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("a 503, not a reset");
    assert_eq!(refused.status(), 503);
    // The hostile connections go: their slots come back.
    drop(held);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = client()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if matches!(status, Ok(200)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never came back: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_still_serving(&url).await;
}

#[tokio::test]
async fn sessions_past_the_cap_are_refused_with_503_and_a_json_rpc_error() {
    let node = TestNode::start("[node]\nmax_sessions = 3\n").await.unwrap();
    let url = node.url();
    let addr = addr(&node);
    let sessions = [
        open_session(&url).await,
        open_session(&url).await,
        open_session(&url).await,
    ];
    // The fourth `initialize`, in raw bytes: 503 and a JSON-RPC error saying why.
    let answer = raw_post(&addr, None, &initialize()).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    let refusal = json_body(&answer);
    assert_eq!(refusal["jsonrpc"], "2.0", "{refusal}");
    assert_eq!(refusal["error"]["code"], AT_CAPACITY, "{refusal}");
    assert!(
        refusal["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum of 3 MCP sessions ([node] max_sessions)"),
        "{refusal}"
    );
    // The sessions held are served as before.
    for session in &sessions {
        let answer = call_echo(&url, session, "held").await;
        assert_eq!(answer["result"]["content"][0]["text"], "Echo: held");
    }
    // One ends (DELETE): its slot is free at once.
    let deleted = client()
        .delete(&url)
        .header("mcp-session-id", &sessions[1])
        .header("mcp-protocol-version", "2025-11-25")
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    let fourth = open_session(&url).await;
    let answer = call_echo(&url, &fourth, "fourth").await;
    assert_eq!(answer["result"]["content"][0]["text"], "Echo: fourth");
}

#[tokio::test]
async fn idle_sessions_expire_and_give_their_slot_back() {
    let node = TestNode::start("[node]\nmax_sessions = 2\nsession_idle_timeout = \"300ms\"\n")
        .await
        .unwrap();
    let url = node.url();
    let addr = addr(&node);
    // A listens on its event stream (a client that is there); B does nothing.
    let listening = open_session(&url).await;
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /mcp HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nMcp-Session-Id: {listening}\r\nMcp-Protocol-Version: 2025-11-25\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut head))
        .await
        .expect("no answer to the GET")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let idle = open_session(&url).await;
    // New sessions are refused until the idle one has expired.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answer = raw_post(&addr, None, &initialize()).await;
        match status_of(&answer) {
            200 => break,
            503 => {}
            other => panic!("{other}: {answer}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle session never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The idle one is gone; the listening one, older than the idle timeout, is not.
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
    let answer = raw_post(&addr, Some(&idle), &request).await;
    assert_eq!(status_of(&answer), 404, "{answer}");
    let answer = call_echo(&url, &listening, "still listening").await;
    assert_eq!(
        answer["result"]["content"][0]["text"],
        "Echo: still listening"
    );
    drop(stream);
}

#[tokio::test]
async fn the_audit_still_hears_the_peer_address() {
    // The node's own accept loop puts the peer's address on each request, as axum's connect
    // info did: an unauthenticated request is audited with its source.
    let (node, _) = TestNode::start_with_keys("[auth]\nenabled = true\n", &[]).await;
    let answer = raw_post(&addr(&node), None, &initialize()).await;
    assert_eq!(status_of(&answer), 401, "{answer}");
    let TestNode { node, _dir } = node;
    node.shutdown().await;
    let store = concord_store::Store::open(&concord_node::store_location(
        None,
        None,
        &_dir.path().join("data"),
    ))
    .await
    .unwrap();
    let rows = store.audit_rows(0, 1000).await.unwrap();
    let failure = rows
        .iter()
        .find(|r| r.kind == "auth_failure")
        .expect("the refusal is audited");
    let data: Value = serde_json::from_str(&failure.data).unwrap();
    assert_eq!(data["source"], "127.0.0.1", "{data}");
}
