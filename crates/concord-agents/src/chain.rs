//! The model an agent uses in production: its resolved providers, tried in order.

use std::time::Instant;

use concord_llm::ChatRequest;
use futures::future::BoxFuture;

use crate::run::{ChatModel, ModelTurn};

/// A model that is an ordered list of providers, tried in order (failover).
pub struct ProviderChain(pub Vec<std::sync::Arc<concord_llm::Provider>>);

impl ChatModel for ProviderChain {
    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, ModelTurn> {
        Box::pin(async move {
            let outcome = concord_llm::chat_with_failover(&self.0, request, deadline).await;
            ModelTurn {
                result: outcome
                    .result
                    .map(|(response, _)| response)
                    .map_err(|e| e.to_string()),
                attempts: outcome.attempts,
            }
        })
    }
}
