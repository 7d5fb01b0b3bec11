//! End-to-end tests of the `concord` binary: configuration errors as a user sees them, a node
//! started with `concord up`, the `tools` commands against it, and a clean SIGTERM shutdown
//! that leaves no upstream process behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn concord() -> Command {
    Command::new(env!("CARGO_BIN_EXE_concord"))
}

fn run(args: &[&str]) -> Output {
    concord().args(args).output().expect("concord runs")
}

#[test]
fn config_error_names_file_key_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("concord.toml");
    std::fs::write(&file, "[servers.fs]\ncommand = \"npx\"\nargz = [\"-y\"]\n").unwrap();
    let output = run(&[
        "up",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("servers.fs.argz"), "{stderr}");
    assert!(
        stderr.contains("unknown field `argz`, expected one of"),
        "{stderr}"
    );
}

#[test]
fn auth_off_beyond_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("concord.toml");
    std::fs::write(&file, "[node]\n").unwrap();
    let output = run(&[
        "up",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 with authentication off"),
        "{stderr}"
    );
}

#[test]
fn a_policy_that_does_not_compile_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("concord.toml");
    std::fs::write(
        &file,
        "[auth]\nenabled = true\n[policy]\n[[policy.rules]]\nname = \"bad\"\neffect = \"allow\"\nwhen = \"principal.roles.exists(\"\n",
    )
    .unwrap();
    let output = run(&[
        "up",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("[policy]: rule \"bad\""), "{stderr}");
}

#[test]
fn missing_config_file_is_named() {
    let output = run(&["up", "--config", "/nonexistent/concord.toml"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/concord.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn config_check_accepts_claude_desktop_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("claude_desktop_config.json");
    std::fs::write(
        &file,
        r#"{"mcpServers": {"memory": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-memory"]},
                           "remote": {"url": "http://127.0.0.1:9/mcp"}}}"#,
    )
    .unwrap();
    let output = run(&["config", "check", file.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("memory") && stdout.contains("stdio"),
        "{stdout}"
    );
    assert!(
        stdout.contains("remote") && stdout.contains("streamable-http"),
        "{stdout}"
    );
    assert!(stdout.contains("2 servers, 0 policy rules, OK"), "{stdout}");
}

fn config_check(file: &Path) -> Output {
    // The README's blocks refer to these variables; a check must not depend on the caller's shell.
    concord()
        .args(["config", "check", file.to_str().unwrap()])
        .env("GITHUB_TOKEN", "t")
        .env("SEARCH_TOKEN", "t")
        .env(
            "CONCORD_JWT_SECRET",
            "a-secret-of-at-least-32-bytes-for-hs256",
        )
        // What examples/dev-team/run.sh exports before it starts the node.
        .env("DEV_TEAM_DIR", "/tmp/dev-team")
        .env("DEV_TEAM_SANDBOX", "/tmp/dev-team/sandbox")
        .env("DEV_TEAM_PYTHON", "python3")
        .output()
        .expect("concord runs")
}

/// The ```toml blocks of the README, in order.
fn readme_toml_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), fence) if fence.starts_with("```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "README.md ends inside a ```toml block");
    blocks
}

/// Every TOML block a user may copy from the README is a configuration `concord config check`
/// accepts: the policy file's block is written where the `[auth]` block's `[policy] file` points,
/// and blocks that name agents defined elsewhere get a provider and those agents beside them.
#[test]
fn every_readme_toml_block_passes_config_check() {
    let blocks = readme_toml_blocks();
    assert!(
        blocks.len() >= 8,
        "{} toml blocks in the README",
        blocks.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let (policy, configs): (Vec<_>, Vec<_>) = blocks
        .iter()
        .partition(|block| block.starts_with("# policy.toml"));
    assert_eq!(policy.len(), 1, "one policy-file block in the README");
    std::fs::write(dir.path().join("policy.toml"), policy[0]).unwrap();
    let policy_rules = policy[0].matches("[[rules]]").count();
    let mut checked_policy = false;
    for (index, block) in configs.iter().enumerate() {
        let mut text = block.to_string();
        if text.contains("[workflows.") && !text.contains("[providers.") {
            text.push_str("\n[providers.local]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n");
            for agent in [
                "billing",
                "support",
                "dispatcher",
                "optimist",
                "skeptic",
                "editor",
                "developer",
                "qa",
            ] {
                text.push_str(&format!("[agents.{agent}]\ninstructions = \"x\"\n"));
            }
        }
        let file = dir.path().join(format!("block-{index}.toml"));
        std::fs::write(&file, &text).unwrap();
        let output = config_check(&file);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "README toml block {index} fails `concord config check`:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("OK"), "{stdout}");
        if text.contains("file = \"policy.toml\"") {
            checked_policy = true;
            assert!(
                stdout.contains(&format!("{policy_rules} policy rules, OK")),
                "{stdout}"
            );
        }
    }
    assert!(checked_policy, "no README block points at the policy file");
}

#[test]
fn every_example_config_passes_config_check() {
    let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples"));
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let file = entry.unwrap().path().join("concord.toml");
        if !file.exists() {
            continue;
        }
        let output = config_check(&file);
        assert!(
            output.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 2, "{checked} example configs found");
}

#[test]
fn config_check_refuses_a_policy_rule_that_does_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rules]]\nname = \"broken\"\neffect = \"allow\"\nwhen = \"principal.roles.exists(\"\n",
    )
    .unwrap();
    let file = dir.path().join("concord.toml");
    std::fs::write(&file, "[policy]\nfile = \"policy.toml\"\n").unwrap();
    let output = config_check(&file);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("[policy]") && stderr.contains("broken"),
        "{stderr}"
    );
}

/// Reads `output` line by line on its own thread (which keeps draining it afterwards, so the
/// child never blocks on a full pipe).
fn line_reader(output: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    rx
}

/// The next line, waiting at most two minutes: a child that prints nothing fails the test
/// instead of hanging it.
fn next_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    match lines.recv_timeout(Duration::from_secs(120)) {
        Ok(line) => line,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("waited 120 s for {what}: nothing was printed")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the output closed before {what}")
        }
    }
}

struct Node {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let fixture = concord_testkit::workspace_bin("concord-fixture");
        let config = dir.path().join("concord.toml");
        std::fs::write(
            &config,
            format!("[servers.fx]\ncommand = {fixture:?}\nargs = [\"--name\", \"fx\"]\n"),
        )
        .unwrap();
        let port = concord_testkit::free_port();
        let mut child = concord()
            .args(["up", "--config", config.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Lines are read on their own thread (which keeps draining stdout afterwards, so the
        // node never blocks on a full pipe); this thread waits for them with a deadline, so a
        // node that prints nothing fails the test instead of hanging it.
        let lines = line_reader(child.stdout.take().unwrap());
        let mut url = None;
        loop {
            let line = next_line(&lines, "the node's Ready line");
            if let Some(found) = line.strip_prefix("Concord node listening; MCP endpoint: ") {
                url = Some(found.to_string());
            }
            if line.starts_with("Ready:") {
                break;
            }
        }
        Node {
            child,
            url: url.expect("printed MCP URL"),
            _dir: dir,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        concord()
            .args(args)
            .args(["--url", &self.url])
            .output()
            .unwrap()
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn tools_commands_against_a_running_node_then_clean_shutdown() {
    let node = Node::start();

    let list = node.cli(&["tools", "list"]);
    assert!(list.status.success(), "{list:?}");
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("fx__echo") && table.contains("Echoes back the message"),
        "{table}"
    );

    let json_list = node.cli(&["tools", "list", "--json"]);
    let tools: Vec<Value> = serde_json::from_slice(&json_list.stdout).unwrap();
    let echo = tools
        .iter()
        .find(|t| t["name"] == "fx__echo")
        .expect("fx__echo listed");
    assert_eq!(echo["annotations"]["readOnlyHint"], true);

    let call = node.cli(&["tools", "call", "fx__echo", "--arg", "message=42"]);
    assert!(call.status.success(), "{call:?}");
    let text = String::from_utf8_lossy(&call.stdout);
    // The schema says `message` is a string, so 42 stays "42".
    assert!(text.contains("Echo: 42"), "{text}");

    let call = node.cli(&["tools", "call", "fx__stats", "--json"]);
    let stats: Value = serde_json::from_slice(&call.stdout).unwrap();
    let upstream_pid = stats["structuredContent"]["pid"]
        .as_u64()
        .expect("fixture pid") as i32;

    let unknown = node.cli(&["tools", "call", "fx__missing"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown tool: fx__missing"));

    let status = node.terminate();
    assert!(status.success(), "exit status {status:?}");
    // The upstream child was reaped, not orphaned.
    assert!(
        !Path::new(&format!("/proc/{upstream_pid}")).exists(),
        "upstream {upstream_pid} survived"
    );
}

#[test]
fn tools_list_against_no_node_is_a_clear_error() {
    let port = concord_testkit::free_port();
    let output = run(&[
        "tools",
        "list",
        "--url",
        &format!("http://127.0.0.1:{port}/mcp"),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to http://127.0.0.1:{port}/mcp")),
        "{stderr}"
    );
}

#[test]
fn state_commands_and_the_rest_feed() {
    let node = Node::start();
    let put = node.cli(&["state", "put", "team/plan", r#"{"step": 1}"#]);
    assert!(put.status.success(), "{put:?}");
    let committed: Value = serde_json::from_slice(&put.stdout).unwrap();
    assert_eq!(committed["versions"]["team/plan"], 1);

    let get = node.cli(&["state", "get", "team/plan"]);
    let entry: Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(entry["value"]["step"], 1);
    assert_eq!(entry["version"], 1);

    // A write based on a stale version is refused, and says what is there now.
    let stale = node.cli(&[
        "state",
        "put",
        "team/plan",
        r#"{"step": 99}"#,
        "--base",
        "0",
    ]);
    assert_eq!(stale.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(stderr.contains("conflict: current version 1"), "{stderr}");

    let proposed = node.cli(&["state", "propose", "team/plan", "two", "--base", "1"]);
    let proposal: Value = serde_json::from_slice(&proposed.stdout).unwrap();
    let id = proposal["proposal_id"].as_str().unwrap();
    let commit = node.cli(&["state", "commit", id]);
    assert!(commit.status.success(), "{commit:?}");

    let log = node.cli(&["state", "log", "team/plan"]);
    let history: Value = serde_json::from_slice(&log.stdout).unwrap();
    let values: Vec<&Value> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["value"])
        .collect();
    assert_eq!(
        values,
        [&serde_json::json!("two"), &serde_json::json!({"step": 1})]
    );

    // The change feed replays both commits from the start as Server-Sent Events.
    let mut watch = concord()
        .args([
            "state", "watch", "team/", "--since", "0", "--url", &node.url,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(watch.stdout.take().unwrap());
    let first: Value = serde_json::from_str(&next_line(&lines, "the first change")).unwrap();
    let second: Value = serde_json::from_str(&next_line(&lines, "the second change")).unwrap();
    assert_eq!(
        (first["version"].as_u64(), second["version"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(first["seq"].as_u64() < second["seq"].as_u64());
    let _ = watch.kill();
    let _ = watch.wait();
    node.terminate();
}
