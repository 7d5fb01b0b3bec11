//! Gateway overhead benchmark: `tools/call` of a trivial echo tool through a Concord node vs
//! directly against the same streamable HTTP upstream, measured in the same run, at
//! concurrency 1, 16 and 64; plus the node's CPU time per request and the idle RSS of a node
//! with three upstreams.
//!
//! Two upstreams: the reference `server-everything` (Node.js; it saturates one core, so it
//! hides gateway cost at high concurrency) and the testkit's `concord-fixture` (Rust; fast, so
//! the gateway's own cost shows).
//!
//! The load generator is closed-loop (each worker sends its next request when the previous
//! answer arrives), so latencies do not include coordinated-omission queueing.
//!
//! Run: `./scripts/bench.sh` (or `cargo bench -p concord-cli --bench gateway` after
//! `cargo build --release --workspace --bins`). `BENCH_SECONDS` sets the time per point.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> std::path::PathBuf {
    concord_testkit::workspace_bin(name)
}

async fn wait_http(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

/// One initialized MCP session over raw HTTP, cheap enough to measure others with.
#[derive(Clone)]
struct Session {
    client: reqwest::Client,
    url: String,
    id: Option<String>,
    next_id: Arc<AtomicU64>,
    authorization: Option<String>,
}

impl Session {
    async fn open(url: &str) -> Session {
        Self::open_as(url, None).await
    }

    /// A session presenting `token` as a bearer token on every request.
    async fn open_as(url: &str, token: Option<&str>) -> Session {
        let authorization = token.map(|t| format!("Bearer {t}"));
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap();
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "concord-bench", "version": "1"}}});
        let mut request = client
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some(authorization) = &authorization {
            request = request.header("authorization", authorization);
        }
        let response = request
            .body(init.to_string())
            .send()
            .await
            .expect("initialize");
        let id = response
            .headers()
            .get("mcp-session-id")
            .map(|v| v.to_str().unwrap().to_string());
        let _ = response.text().await;
        let session = Session {
            client,
            url: url.to_string(),
            id,
            next_id: Arc::new(AtomicU64::new(1)),
            authorization,
        };
        session
            .post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        session
    }

    async fn post(&self, body: Value) -> String {
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25");
        if let Some(id) = &self.id {
            request = request.header("mcp-session-id", id);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        request
            .body(body.to_string())
            .send()
            .await
            .expect("post")
            .text()
            .await
            .expect("body")
    }

    async fn echo(&self, tool: &str) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = self
            .post(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": tool, "arguments": {"message": "hello"}}}))
            .await;
        assert!(body.contains("Echo: hello"), "unexpected answer: {body}");
    }
}

struct Point {
    requests: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Point {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

async fn measure(session: &Session, tool: &str, concurrency: usize, duration: Duration) -> Point {
    // Warm up connections and caches.
    for _ in 0..50 {
        session.echo(tool).await;
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let session = session.clone();
        let tool = tool.to_string();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                session.echo(&tool).await;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
    Point {
        requests: all.len() as u64,
        seconds,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
    }
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024.0
}

fn start_node(config: &str, dir: &std::path::Path, port: u16) -> Proc {
    let path = dir.join(format!("concord-{port}.toml"));
    std::fs::write(&path, config).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(["up", "--config", path.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", dir.join("data").to_str().unwrap()])
            .env("CONCORD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

async fn wait_ready(port: u16) {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node on {port} did not become ready");
}

const BENCH_SECRET: &str = "bench-secret-bench-secret-bench-secret";

/// An HS256 JWT for the governed node, valid for an hour.
fn bench_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("bench".into());
    jsonwebtoken::encode(
        &header,
        &json!({"sub": "bench-user", "roles": ["bench"], "iss": "https://idp.bench",
                "aud": "concord", "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(BENCH_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let duration = Duration::from_secs(seconds);
    let dir = tempfile::tempdir().unwrap();
    let peers = concord_testkit::peers_node_modules();
    let everything_js = peers.join("@modelcontextprotocol/server-everything/dist/index.js");

    let everything_port = concord_testkit::free_port();
    let _everything = Proc(
        Command::new("node")
            .arg(&everything_js)
            .arg("streamableHttp")
            .env("PORT", everything_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node (Node.js) on PATH"),
    );
    let fixture_port = concord_testkit::free_port();
    let _fixture = Proc(
        Command::new(bin("concord-fixture"))
            .args(["--http", &format!("127.0.0.1:{fixture_port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let everything_url = format!("http://127.0.0.1:{everything_port}/mcp");
    let fixture_url = format!("http://127.0.0.1:{fixture_port}/mcp");
    wait_http(&everything_url).await;
    wait_http(&fixture_url).await;

    let node_port = concord_testkit::free_port();
    let node = start_node(
        &format!(
            "[servers.everything]\nurl = \"{everything_url}\"\n[servers.fixture]\nurl = \"{fixture_url}\"\n"
        ),
        dir.path(),
        node_port,
    );
    wait_ready(node_port).await;
    let node_pid = node.0.id();
    let node_url = format!("http://127.0.0.1:{node_port}/mcp");

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let mut report = String::new();
    if only.is_empty() || only == "routing" {
        report.push_str(&routing_section(dir.path(), &fixture_url, &node_url, duration).await);
    }
    if only == "routing" {
        drop(node);
        write_report(&report, "gateway-routing.md");
        return;
    }
    report.push_str(&format!(
        "\ntools/call echo, closed-loop, {seconds} s per point, one session per target, unique ids\n\n"
    ));
    report.push_str("| upstream | c | direct req/s | gateway req/s | gateway/direct | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 ms | gateway CPU ms/req |\n");
    report.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for (label, direct_url, direct_tool, gateway_tool) in [
        (
            "server-everything (Node)",
            &everything_url,
            "echo",
            "everything__echo",
        ),
        (
            "concord-fixture (Rust)",
            &fixture_url,
            "echo",
            "fixture__echo",
        ),
    ] {
        let direct = Session::open(direct_url).await;
        let gateway = Session::open(&node_url).await;
        for concurrency in [1usize, 16, 64] {
            let d = measure(&direct, direct_tool, concurrency, duration).await;
            let cpu_before = cpu_seconds(node_pid);
            let g = measure(&gateway, gateway_tool, concurrency, duration).await;
            let cpu_ms_per_request =
                (cpu_seconds(node_pid) - cpu_before) * 1000.0 / g.requests as f64;
            let line = format!(
                "| {label} | {concurrency} | {:.0} | {:.0} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {:+.3} | {:.3} |\n",
                d.rps(),
                g.rps(),
                g.rps() / d.rps(),
                d.p50_ms,
                d.p99_ms,
                g.p50_ms,
                g.p99_ms,
                g.p50_ms - d.p50_ms,
                cpu_ms_per_request,
            );
            eprint!("{line}");
            report.push_str(&line);
        }
    }

    // Governance overhead: the same node configuration with authentication (a JWT verified on
    // every request), the policy engine (three rules), a standing budget with a deadline (a
    // reservation and settlement per call) and the audit trail on, in front of the fast
    // upstream where the gateway's own cost shows, against the node above (auth off).
    let auth_dir = dir.path().join("auth");
    std::fs::create_dir_all(&auth_dir).unwrap();
    let auth_port = concord_testkit::free_port();
    let auth_node = start_node(
        &format!(
            "[auth]\nenabled = true\nissuer = \"https://idp.bench\"\naudience = \"concord\"\n\
             [[auth.keys]]\nkid = \"bench\"\nalgorithm = \"HS256\"\nsecret = \"{BENCH_SECRET}\"\n\
             [policy]\n\
             [[policy.rules]]\nname = \"no-secrets\"\neffect = \"deny\"\nwhen = 'has(arguments.path) && arguments.path.startsWith(\"/secrets\")'\n\
             [[policy.rules]]\nname = \"bench-echo\"\neffect = \"allow\"\nwhen = '\"bench\" in principal.roles && tool == \"fixture__echo\"'\n\
             [[policy.rules]]\nname = \"admins\"\neffect = \"allow\"\nwhen = '\"admin\" in principal.roles'\n\
             [budgets.default]\ntool_calls = 100000000\ndeadline = \"1h\"\n\
             [servers.fixture]\nurl = \"{fixture_url}\"\n"
        ),
        &auth_dir,
        auth_port,
    );
    wait_ready(auth_port).await;
    let auth_pid = auth_node.0.id();
    let token = bench_token();
    let plain = Session::open(&node_url).await;
    let governed =
        Session::open_as(&format!("http://127.0.0.1:{auth_port}/mcp"), Some(&token)).await;
    report.push_str(
        "\nGovernance overhead (auth + policy + budget + audit on vs off), concord-fixture upstream:\n\n",
    );
    report.push_str("| c | auth off req/s | auth on req/s | on/off | off p50 / p99 ms | on p50 / p99 ms | added p50 ms | CPU ms/req off / on |\n");
    report.push_str("|---|---|---|---|---|---|---|---|\n");
    for concurrency in [1usize, 16, 64] {
        let cpu_before = cpu_seconds(node_pid);
        let off = measure(&plain, "fixture__echo", concurrency, duration).await;
        let cpu_off = (cpu_seconds(node_pid) - cpu_before) * 1000.0 / off.requests as f64;
        let cpu_before = cpu_seconds(auth_pid);
        let on = measure(&governed, "fixture__echo", concurrency, duration).await;
        let cpu_on = (cpu_seconds(auth_pid) - cpu_before) * 1000.0 / on.requests as f64;
        let line = format!(
            "| {concurrency} | {:.0} | {:.0} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {:+.3} | {:.3} / {:.3} |\n",
            off.rps(),
            on.rps(),
            on.rps() / off.rps(),
            off.p50_ms,
            off.p99_ms,
            on.p50_ms,
            on.p99_ms,
            on.p50_ms - off.p50_ms,
            cpu_off,
            cpu_on,
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    drop(auth_node);
    drop(node);

    // Idle RSS: a node with three stdio upstreams, after it settles.
    let fixture_bin = bin("concord-fixture");
    let idle_port = concord_testkit::free_port();
    let idle = start_node(
        &format!(
            "[servers.everything]\ncommand = \"node\"\nargs = [{everything_js:?}, \"stdio\"]\n\
             [servers.memory]\ncommand = \"node\"\nargs = [{:?}]\nenv = {{ MEMORY_FILE_PATH = {:?} }}\n\
             [servers.fixture]\ncommand = {fixture_bin:?}\n",
            peers.join("@modelcontextprotocol/server-memory/dist/index.js"),
            dir.path().join("memory.jsonl"),
        ),
        dir.path(),
        idle_port,
    );
    wait_ready(idle_port).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_mib(idle.0.id());
    let line = format!(
        "\nIdle node with three stdio upstreams (everything, memory, fixture): RSS {rss:.1} MiB\n"
    );
    eprint!("{line}");
    report.push_str(&line);
    drop(idle);

    write_report(&report, "gateway.md");
}

fn write_report(report: &str, file: &str) {
    let out = concord_testkit::workspace_root().join("bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join(file), report).unwrap();
    println!("{report}");
}

/// Mesh routing overhead: a logical server of three concord-fixture replicas registered over
/// REST (power-of-two-choices balancing, a breaker per replica, failover) against the same
/// fixture called directly and through a node with it as one configured upstream.
async fn routing_section(
    dir: &std::path::Path,
    direct_url: &str,
    single_node_url: &str,
    duration: Duration,
) -> String {
    let replicas: Vec<(Proc, String)> = (0..3)
        .map(|_| {
            let port = concord_testkit::free_port();
            let proc = Proc(
                Command::new(bin("concord-fixture"))
                    .args(["--http", &format!("127.0.0.1:{port}")])
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            (proc, format!("http://127.0.0.1:{port}/mcp"))
        })
        .collect();
    for (_, url) in &replicas {
        wait_http(url).await;
    }
    let mesh_dir = dir.join("mesh");
    std::fs::create_dir_all(&mesh_dir).unwrap();
    let port = concord_testkit::free_port();
    let node = start_node("", &mesh_dir, port);
    wait_ready(port).await;
    let client = reqwest::Client::new();
    for (_, url) in &replicas {
        let response = client
            .post(format!("http://127.0.0.1:{port}/api/v1/registry"))
            .json(
                &json!({"name": "replicated", "version": "1.0.0", "kind": "server",
                "capabilities": ["echo"], "ttl_seconds": 3600, "endpoint": {"url": url}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
    }
    for _ in 0..600 {
        let body: Value = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let healthy = body["servers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["server"] == "replicated" && s["state"] == "healthy")
            .count();
        if healthy == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let node_pid = node.0.id();
    let mesh_url = format!("http://127.0.0.1:{port}/mcp");
    let direct = Session::open(direct_url).await;
    let single = Session::open(single_node_url).await;
    let mesh = Session::open(&mesh_url).await;
    let mut report = String::from(
        "Routing over three registered replicas vs one direct upstream (concord-fixture, tools/call echo):\n\n",
    );
    report.push_str("| c | direct req/s | one upstream req/s | 3 replicas req/s | 3 replicas/direct | 3 replicas/one upstream | direct p50 / p99 ms | one upstream p50 / p99 ms | 3 replicas p50 / p99 ms | 3 replicas CPU ms/req |\n");
    report.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for concurrency in [1usize, 16, 64] {
        let d = measure(&direct, "echo", concurrency, duration).await;
        let one = measure(&single, "fixture__echo", concurrency, duration).await;
        let cpu_before = cpu_seconds(node_pid);
        let three = measure(&mesh, "replicated__echo", concurrency, duration).await;
        let cpu = (cpu_seconds(node_pid) - cpu_before) * 1000.0 / three.requests as f64;
        let line = format!(
            "| {concurrency} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {cpu:.3} |\n",
            d.rps(),
            one.rps(),
            three.rps(),
            three.rps() / d.rps(),
            three.rps() / one.rps(),
            d.p50_ms,
            d.p99_ms,
            one.p50_ms,
            one.p99_ms,
            three.p50_ms,
            three.p99_ms,
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    drop(node);
    drop(replicas);
    report
}
