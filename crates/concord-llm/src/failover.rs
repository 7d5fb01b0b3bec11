//! Failover along an ordered list of providers (the resolution order): on an error, a timeout
//! or a rate limit the next one is asked, until one answers or the deadline passes. Every
//! attempt is recorded, so the usage ledger shows the failures too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{ChatRequest, ChatResponse, Usage};
use crate::provider::{LlmError, Provider};

/// One try at one provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub provider: String,
    pub model: String,
    pub usage: Usage,
    pub cost_usd: f64,
    pub latency: Duration,
    /// `None` when it answered.
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct FailoverOutcome {
    /// The answer and the index of the provider that gave it, or the last error.
    pub result: Result<(ChatResponse, usize), LlmError>,
    pub attempts: Vec<Attempt>,
}

pub async fn chat_with_failover(
    providers: &[Arc<Provider>],
    request: &ChatRequest,
    deadline: Option<Instant>,
) -> FailoverOutcome {
    let mut attempts = Vec::new();
    let mut last_error = None;
    // Providers resting after repeated failures go last (still tried if all else fails).
    let mut order: Vec<usize> = (0..providers.len()).collect();
    order.sort_by_key(|&i| !providers[i].is_available());
    for index in order {
        let provider = &providers[index];
        let left = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => {
                    last_error = Some(LlmError::DeadlinePassed);
                    break;
                }
            },
            None => None,
        };
        let started = Instant::now();
        let answer = provider.chat(request, left).await;
        let latency = started.elapsed();
        match answer {
            Ok(response) => {
                provider.record(true);
                attempts.push(Attempt {
                    provider: provider.config.name.clone(),
                    model: if response.model.is_empty() {
                        provider.config.model.clone()
                    } else {
                        response.model.clone()
                    },
                    usage: response.usage,
                    cost_usd: provider.cost(response.usage),
                    latency,
                    error: None,
                });
                return FailoverOutcome {
                    result: Ok((response, index)),
                    attempts,
                };
            }
            Err(error) => {
                provider.record(false);
                tracing::warn!(provider = %provider.config.name, %error, "provider failed; trying the next");
                attempts.push(Attempt {
                    provider: provider.config.name.clone(),
                    model: provider.config.model.clone(),
                    usage: Usage::default(),
                    cost_usd: 0.0,
                    latency,
                    error: Some(error.to_string()),
                });
                last_error = Some(error);
            }
        }
    }
    FailoverOutcome {
        result: Err(last_error.unwrap_or_else(|| {
            LlmError::Connect("no provider satisfies the selector".to_string())
        })),
        attempts,
    }
}
