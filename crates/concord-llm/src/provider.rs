//! One configured provider: which API it speaks, where, which model, its key and its prices.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::limits::{ResponseLimits, declared_past, read_capped};
use crate::model::{ChatRequest, ChatResponse, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST {base_url}/chat/completions` (base URL usually ends in `/v1`).
    OpenAi,
    /// `POST {base_url}/v1/messages`.
    Anthropic,
    /// `POST {base_url}/v1beta/models/{model}:generateContent`.
    Gemini,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub api: Api,
    pub base_url: String,
    pub model: String,
    /// Read from the environment by the node; never logged.
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// Stream answers (server-sent events) instead of waiting for the whole body.
    pub stream: bool,
    /// US dollars per million input / output tokens.
    pub price_input: f64,
    pub price_output: f64,
    /// Output tokens to ask for when the request does not say (Anthropic requires a number),
    /// and the most a request may ask for.
    pub default_max_tokens: u32,
    /// Sampling temperature when the request does not say (0: the most likely tokens, the
    /// same answer each time — what tests of a local model need).
    pub temperature: Option<f32>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum LlmError {
    #[error("provider {provider} answered HTTP {status}: {body}")]
    Http {
        provider: String,
        status: u16,
        body: String,
    },
    #[error("provider {provider} is rate limiting (HTTP 429){}", retry_after.map(|s| format!("; retry after {s} s")).unwrap_or_default())]
    RateLimited {
        provider: String,
        retry_after: Option<u64>,
    },
    #[error("provider {provider} did not answer within {timeout:?}")]
    Timeout { provider: String, timeout: Duration },
    #[error("cannot reach the provider: {0}")]
    Connect(String),
    #[error("the provider's answer could not be read: {0}")]
    Protocol(String),
    #[error("no provider could answer before the deadline")]
    DeadlinePassed,
    /// The answer, one of its lines or one of its fields was longer than the provider's
    /// [`ResponseLimits`] allow; the rest was not read.
    #[error("the provider's answer exceeded {limit} bytes ({what})")]
    TooLarge { what: &'static str, limit: usize },
}

pub struct Provider {
    pub config: ProviderConfig,
    client: reqwest::Client,
    limits: ResponseLimits,
    health: parking_lot::Mutex<Health>,
}

/// How much of an error answer's body is read (its first 500 characters are kept).
const ERROR_BODY_BYTES: usize = 4096;

/// Consecutive failures that put a provider aside, and for how long.
const FAILURES_TO_REST: u32 = 3;
const REST: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    resting_until: Option<Instant>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of every debug print.
        f.debug_struct("Provider")
            .field("name", &self.config.name)
            .field("api", &self.config.api)
            .field("model", &self.config.model)
            .finish()
    }
}

impl Provider {
    pub fn new(config: ProviderConfig) -> Result<Self, LlmError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| LlmError::Connect(e.to_string()))?;
        Ok(Self {
            config,
            client,
            limits: ResponseLimits::default(),
            health: parking_lot::Mutex::default(),
        })
    }

    /// The same provider with other bounds on what one answer may take.
    pub fn with_limits(mut self, limits: ResponseLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> ResponseLimits {
        self.limits
    }

    /// False while the provider rests after repeated failures: failover asks the others first.
    pub fn is_available(&self) -> bool {
        self.health
            .lock()
            .resting_until
            .is_none_or(|until| Instant::now() >= until)
    }

    /// Records how a call went; the third failure in a row rests the provider for 30 s.
    pub fn record(&self, ok: bool) {
        let mut health = self.health.lock();
        if ok {
            *health = Health::default();
            return;
        }
        health.consecutive_failures += 1;
        if health.consecutive_failures >= FAILURES_TO_REST {
            health.resting_until = Some(Instant::now() + REST);
            health.consecutive_failures = 0;
            tracing::warn!(provider = %self.config.name, rest_s = REST.as_secs(), "provider failed repeatedly; asking the others first");
        }
    }

    /// What `usage` costs at this provider's prices, in US dollars.
    pub fn cost(&self, usage: Usage) -> f64 {
        (usage.input_tokens as f64 * self.config.price_input
            + usage.output_tokens as f64 * self.config.price_output)
            / 1_000_000.0
    }

    /// One chat completion, within `timeout` (at most the provider's own).
    pub async fn chat(
        &self,
        request: &ChatRequest,
        timeout: Option<Duration>,
    ) -> Result<ChatResponse, LlmError> {
        let timeout = timeout.map_or(self.config.timeout, |t| t.min(self.config.timeout));
        let started = Instant::now();
        let work = self.send(request);
        let answer = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| LlmError::Timeout {
                provider: self.config.name.clone(),
                timeout,
            })?;
        tracing::debug!(provider = %self.config.name, elapsed_ms = started.elapsed().as_millis() as u64, ok = answer.is_ok(), "llm call");
        answer
    }

    async fn send(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        let config = &self.config;
        // The provider's own settings fill in what the request leaves open, and its
        // `max_tokens` caps what a request asks (a budget's remainder may be larger than the
        // model allows).
        let capped = request
            .max_tokens
            .map(|asked| asked.min(config.default_max_tokens));
        let defaulted;
        let request = if (request.temperature.is_none() && config.temperature.is_some())
            || capped != request.max_tokens
        {
            defaulted = ChatRequest {
                temperature: request.temperature.or(config.temperature),
                max_tokens: capped,
                ..request.clone()
            };
            &defaulted
        } else {
            request
        };
        let stream = config.stream;
        let base = config.base_url.trim_end_matches('/');
        let (url, body) = match config.api {
            Api::OpenAi => (
                format!("{base}/chat/completions"),
                crate::openai::request_body(&config.model, request, stream),
            ),
            Api::Anthropic => (
                format!("{base}/v1/messages"),
                crate::anthropic::request_body(
                    &config.model,
                    request,
                    stream,
                    config.default_max_tokens,
                ),
            ),
            Api::Gemini => (
                if stream {
                    format!(
                        "{base}/v1beta/models/{}:streamGenerateContent?alt=sse",
                        config.model
                    )
                } else {
                    format!("{base}/v1beta/models/{}:generateContent", config.model)
                },
                crate::gemini::request_body(request),
            ),
        };
        let mut http = self.client.post(&url).json(&body);
        if let Some(key) = &config.api_key {
            http = match config.api {
                Api::OpenAi => http.bearer_auth(key),
                Api::Anthropic => http.header("x-api-key", key),
                Api::Gemini => http.header("x-goog-api-key", key),
            };
        }
        if config.api == Api::Anthropic {
            http = http.header("anthropic-version", "2023-06-01");
        }
        let mut response = http.send().await.map_err(|e| {
            // The URL can carry nothing secret (keys go in headers), but keep the message short.
            LlmError::Connect(format!("{}: {}", config.name, without_url(&e)))
        })?;
        let status = response.status();
        if status.as_u16() == 429 {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            return Err(LlmError::RateLimited {
                provider: config.name.clone(),
                retry_after,
            });
        }
        if !status.is_success() {
            // Only the start of an error body is kept; an endless one is not read to its end.
            let (bytes, _) = read_capped(&mut response, ERROR_BODY_BYTES)
                .await
                .unwrap_or_default();
            return Err(LlmError::Http {
                provider: config.name.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        // Read what came, not what was asked for: some compatible servers stream when not asked
        // (and answer in one body when they cannot stream).
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let limits = &self.limits;
        if streamed {
            return match config.api {
                Api::OpenAi => crate::openai::read_stream(response, limits).await,
                Api::Anthropic => crate::anthropic::read_stream(response, limits).await,
                Api::Gemini => crate::gemini::read_stream(response, limits, &config.model).await,
            };
        }
        let (body, more) = if declared_past(&response, limits.max_body_bytes) {
            (Vec::new(), true)
        } else {
            read_capped(&mut response, limits.max_body_bytes)
                .await
                .map_err(|e| {
                    LlmError::Connect(format!("{}: body broke: {}", config.name, without_url(&e)))
                })?
        };
        if more {
            return Err(LlmError::TooLarge {
                what: "the whole body",
                limit: limits.max_body_bytes,
            });
        }
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| LlmError::Protocol(format!("{}: not JSON: {e}", config.name)))?;
        let answer = match config.api {
            Api::OpenAi => crate::openai::parse_response(&value),
            Api::Anthropic => crate::anthropic::parse_response(&value),
            Api::Gemini => crate::gemini::parse_response(&value, &config.model),
        }?;
        limits.check_answer(&answer)?;
        Ok(answer)
    }
}

fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "(url)");
    }
    if let Some(source) = std::error::Error::source(error) {
        text.push_str(&format!(": {source}"));
    }
    text
}
