//! Register a service (an rmcp server, an agent, an LLM provider) with a Concord node and keep
//! it registered: one call to start, heartbeats in the background (registering again when the
//! node has forgotten it), deregistration on `deregister` (or expiry after the TTL if the
//! process dies).
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

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use concord_mesh::{Endpoint, Health, Kind, Registration, Selector};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the node at {node} cannot be reached: {reason}")]
    Unreachable { node: String, reason: String },
    /// The node refused the registration (the message says which field and why).
    #[error("the node refused the registration ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// A live registration; heartbeats run until [`Registrar::deregister`] or drop. A node that
/// answers a heartbeat with 404 has forgotten the registration (it restarted with a fresh
/// store, or someone deregistered it): the registrar registers it again.
pub struct Registrar {
    /// The id the node gave the registration; a node that registers it again may give another.
    id: Arc<Mutex<String>>,
    node: String,
    token: Option<String>,
    health: watch::Sender<Health>,
    /// Ends the heartbeat loop between two requests (a registration in flight completes first).
    stop: Arc<Notify>,
    heartbeat: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

fn api(node: &str) -> String {
    format!(
        "{}/api/v1/registry",
        node.trim_end_matches('/').trim_end_matches("/mcp")
    )
}

/// Posts `registration` to the node's registry; returns the id the node gave it.
async fn register(
    http: &reqwest::Client,
    node: &str,
    registration: &Registration,
    token: Option<&str>,
) -> Result<String, RegisterError> {
    let mut request = http.post(api(node)).json(registration);
    if let Some(token) = token {
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
    Ok(body["id"].as_str().unwrap_or_default().to_string())
}

/// How the node took one heartbeat.
enum Beat {
    Taken,
    /// 404: the node does not know the registration (any more).
    Unknown,
    Failed,
}

async fn heartbeat(
    http: &reqwest::Client,
    node: &str,
    id: &str,
    health: Health,
    token: Option<&str>,
) -> Beat {
    let mut request = http
        .post(format!("{}/{id}/heartbeat", api(node)))
        .json(&json!({ "health": health }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => Beat::Taken,
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Beat::Unknown,
        Ok(r) => {
            tracing::warn!(status = %r.status(), "heartbeat refused");
            Beat::Failed
        }
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat failed");
            Beat::Failed
        }
    }
}

/// What the heartbeat task needs to keep a registration alive.
struct Keeper {
    http: reqwest::Client,
    node: String,
    registration: Registration,
    token: Option<String>,
    id: Arc<Mutex<String>>,
    stop: Arc<Notify>,
}

impl Keeper {
    /// Heartbeats at `every` and at once on a health change; registers again when the node
    /// has forgotten the registration.
    async fn run(self, mut reported: watch::Receiver<Health>, every: Duration) {
        let token = self.token.as_deref();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                changed = reported.changed() => if changed.is_err() { return },
                _ = self.stop.notified() => return,
            }
            let health = *reported.borrow_and_update();
            let id = self.id.lock().unwrap().clone();
            match heartbeat(&self.http, &self.node, &id, health, token).await {
                Beat::Taken | Beat::Failed => {}
                Beat::Unknown => {
                    tracing::info!(%id, "the node has forgotten the registration; registering again");
                    match register(&self.http, &self.node, &self.registration, token).await {
                        Ok(id) => {
                            *self.id.lock().unwrap() = id.clone();
                            // A registration starts healthy: tell the node at once if it is not.
                            if health != Health::Healthy {
                                heartbeat(&self.http, &self.node, &id, health, token).await;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "registering again failed"),
                    }
                }
            }
        }
    }
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
        let id = register(&http, node, &registration, token.as_deref()).await?;
        let id = Arc::new(Mutex::new(id));
        let (health, reported) = watch::channel(Health::Healthy);
        let stop = Arc::new(Notify::new());
        let every = Duration::from_secs(registration.ttl_seconds).max(Duration::from_secs(1)) / 3;
        let keeper = Keeper {
            http: http.clone(),
            node: node.to_string(),
            registration,
            token: token.clone(),
            id: id.clone(),
            stop: stop.clone(),
        };
        let heartbeat = tokio::spawn(keeper.run(reported, every));
        Ok(Registrar {
            id,
            node: node.to_string(),
            token,
            health,
            stop,
            heartbeat,
            http,
        })
    }

    /// The id the node gave this registration (the latest, if it had to be registered again).
    pub fn id(&self) -> String {
        self.id.lock().unwrap().clone()
    }

    /// Reports a health change at once (and in every heartbeat after).
    pub fn set_health(&self, health: Health) {
        let _ = self.health.send(health);
    }

    /// Stops heartbeating and removes the registration.
    pub async fn deregister(mut self) -> Result<(), RegisterError> {
        // Let a registration in flight finish first, so it cannot land after the removal.
        self.stop.notify_one();
        let _ = (&mut self.heartbeat).await;
        let id = self.id();
        let mut request = self.http.delete(format!("{}/{id}", api(&self.node)));
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
