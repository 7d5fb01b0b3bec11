//! Register a service (an rmcp server, an agent, an LLM provider) with a Concord node and keep
//! it registered: one call to start, heartbeats in the background, deregistration on
//! `deregister` (or expiry after the TTL if the process dies).
//!
//! ```no_run
//! # async fn example() -> Result<(), concord_register::RegisterError> {
//! use concord_register::{Registration, Registrar};
//! let me: Registration = serde_json::from_value(serde_json::json!({
//!     "name": "search", "version": "1.6.0", "kind": "server",
//!     "capabilities": ["search"], "tags": ["prod"],
//!     "endpoint": {"url": "http://127.0.0.1:9000/mcp"}, "ttl_seconds": 15,
//! })).unwrap();
//! let registrar = Registrar::start("http://127.0.0.1:8811", me, None).await?;
//! // ... serve ...
//! registrar.deregister().await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

pub use concord_mesh::{Endpoint, Health, Kind, Registration, Selector};
use serde_json::{Value, json};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the node at {node} cannot be reached: {reason}")]
    Unreachable { node: String, reason: String },
    /// The node refused the registration (the message says which field and why).
    #[error("the node refused the registration ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// A live registration; heartbeats run until [`Registrar::deregister`] or drop.
pub struct Registrar {
    id: String,
    node: String,
    token: Option<String>,
    health: watch::Sender<Health>,
    heartbeat: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

fn api(node: &str) -> String {
    format!(
        "{}/api/v1/registry",
        node.trim_end_matches('/').trim_end_matches("/mcp")
    )
}

impl Registrar {
    /// Registers `registration` with the node at `node` (its base URL or its `/mcp` URL) and
    /// heartbeats at a third of the TTL. `token`: a JWT or API key when the node has auth on.
    pub async fn start(
        node: &str,
        registration: Registration,
        token: Option<String>,
    ) -> Result<Registrar, RegisterError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| RegisterError::Unreachable {
                node: node.to_string(),
                reason: e.to_string(),
            })?;
        let mut request = http.post(api(node)).json(&registration);
        if let Some(token) = &token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegisterError::Unreachable {
                node: node.to_string(),
                reason: e.to_string(),
            })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            return Err(RegisterError::Refused {
                status: status.as_u16(),
                message: body["error"].as_str().unwrap_or_default().to_string(),
            });
        }
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let (health, mut reported) = watch::channel(Health::Healthy);
        let every = Duration::from_secs(registration.ttl_seconds).max(Duration::from_secs(1)) / 3;
        let heartbeat = {
            let (http, url, token) = (
                http.clone(),
                format!("{}/{id}/heartbeat", api(node)),
                token.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        changed = reported.changed() => if changed.is_err() { return },
                    }
                    let health = *reported.borrow();
                    let mut request = http.post(&url).json(&json!({ "health": health }));
                    if let Some(token) = &token {
                        request = request.bearer_auth(token);
                    }
                    match request.send().await {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => tracing::warn!(status = %r.status(), "heartbeat refused"),
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                }
            })
        };
        Ok(Registrar {
            id,
            node: node.to_string(),
            token,
            health,
            heartbeat,
            http,
        })
    }

    /// The id the node gave this registration.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reports a health change at once (and in every heartbeat after).
    pub fn set_health(&self, health: Health) {
        let _ = self.health.send(health);
    }

    /// Stops heartbeating and removes the registration.
    pub async fn deregister(self) -> Result<(), RegisterError> {
        self.heartbeat.abort();
        let mut request = self.http.delete(format!("{}/{}", api(&self.node), self.id));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegisterError::Unreachable {
                node: self.node.clone(),
                reason: e.to_string(),
            })?;
        if !response.status().is_success() {
            return Err(RegisterError::Refused {
                status: response.status().as_u16(),
                message: response.text().await.unwrap_or_default(),
            });
        }
        Ok(())
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        // Without an explicit deregister, the entry expires after its TTL.
        self.heartbeat.abort();
    }
}
