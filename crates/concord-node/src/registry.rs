//! `/api/v1/registry`: entities register with one HTTP call (any language), heartbeat, and
//! deregister; anyone can list them and resolve a selector to ranked candidates with reasons.
//! Registrations live in the store, so a restart keeps them and nodes sharing a PostgreSQL see
//! one catalog.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use concord_mesh::{Entity, Health, Kind, Registration, Selector, resolve};
use concord_store::{RegistryRow, Store};
use serde::Deserialize;
use serde_json::{Value, json};

/// How long a registration waits for its endpoint to answer MCP `initialize`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn store_error(e: concord_store::StoreError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("registry store: {e}"),
    )
}

/// A stable id for one replica: the same name, version and endpoint re-register in place.
fn entity_id(registration: &Registration) -> String {
    // FNV-1a: short, stable across processes, and not a security boundary.
    let endpoint = serde_json::to_string(&registration.endpoint).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in endpoint.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "{}.{}.{}.{:08x}",
        registration.namespace, registration.name, registration.version, hash as u32
    )
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Unhealthy => "unhealthy",
    }
}

fn entity_of(row: &RegistryRow) -> Option<Entity> {
    let registration: Registration = serde_json::from_str(&row.body).ok()?;
    let health = match row.health.as_str() {
        "degraded" => Health::Degraded,
        "unhealthy" => Health::Unhealthy,
        _ => Health::Healthy,
    };
    Some(Entity {
        id: row.id.clone(),
        registration,
        health,
        registered_at_ms: row.registered_at_ms,
        last_heartbeat_ms: row.last_heartbeat_ms,
    })
}

/// Heartbeats are the registry's hottest write and need no fsync each: they are kept here and
/// written in one transaction per sync tick (every 250 ms). An entity's TTL is seconds, so the
/// lag never decides an expiry.
#[derive(Default)]
pub struct Heartbeats {
    pending: parking_lot::Mutex<std::collections::HashMap<String, (Health, u64)>>,
    /// Ids known to exist (refreshed every tick), so a heartbeat for one is taken in memory.
    known: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Heartbeats {
    async fn flush(&self, store: &Store) -> Result<(), concord_store::StoreError> {
        let drained: Vec<(String, String, u64)> = self
            .pending
            .lock()
            .drain()
            .map(|(id, (health, at))| (id, health_name(health).to_string(), at))
            .collect();
        store.heartbeats(&drained).await
    }
}

/// What the registry handlers share.
#[derive(Clone)]
pub struct RegistryState {
    pub store: Store,
    pub beats: std::sync::Arc<Heartbeats>,
}

pub async fn entities(store: &Store) -> Result<Vec<Entity>, concord_store::StoreError> {
    Ok(store
        .registry()
        .await?
        .iter()
        .filter_map(entity_of)
        .collect())
}

/// Checks that an MCP endpoint answers `initialize` before it joins the catalog.
async fn probe(registration: &Registration) -> Result<(), String> {
    let Some(url) = &registration.endpoint.url else {
        return Ok(());
    };
    if registration.kind == Kind::Llm {
        return Ok(());
    }
    match tokio::time::timeout(PROBE_TIMEOUT, concord_mcp::NodeClient::connect(url)).await {
        Ok(Ok(client)) => {
            client.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// Registers the entities declared in the config (no handshake probe: they may start after the
/// node) and returns their ids, which the sync loop keeps alive.
/// What the node reports as the health of an entity it keeps alive itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Liveness {
    /// Declared in `[registry.NAME]`: healthy while the node runs.
    Declared,
    /// A configured server: healthy while its upstream is connected (degraded while it starts).
    Upstream(String),
    /// A configured LLM provider: degraded while it rests after repeated failures.
    Provider(String),
}

/// The configured servers as the mesh lists them (kind `server`, their `capabilities` and
/// `tags`, version 0.0.0: unversioned), so selectors resolve over them and registered servers
/// alike. They are never routed as registered replicas: the gateway has them already.
pub fn server_registrations(servers: &[concord_config::ServerSpec]) -> Vec<Registration> {
    servers
        .iter()
        .filter_map(|spec| {
            let endpoint = match &spec.transport {
                concord_config::TransportSpec::Stdio { command, args, .. } => {
                    json!({"command": std::iter::once(command).chain(args).collect::<Vec<_>>()})
                }
                concord_config::TransportSpec::StreamableHttp { url, .. }
                | concord_config::TransportSpec::Sse { url, .. } => json!({"url": url}),
            };
            let capabilities = if spec.capabilities.is_empty() {
                vec![concord_mesh::ANY_SERVER_CAPABILITY.to_string()]
            } else {
                spec.capabilities.clone()
            };
            serde_json::from_value(json!({
                "name": spec.name,
                "version": "0.0.0",
                "kind": "server",
                "capabilities": capabilities,
                "tags": spec.tags,
                "endpoint": endpoint,
            }))
            .ok()
        })
        .collect()
}

pub async fn register_configured(
    store: &Store,
    registrations: &[Registration],
) -> Result<Vec<String>, concord_store::StoreError> {
    let now = now_ms();
    let mut ids = Vec::with_capacity(registrations.len());
    for registration in registrations {
        let id = entity_id(registration);
        store
            .register(&RegistryRow {
                id: id.clone(),
                namespace: registration.namespace.clone(),
                name: registration.name.clone(),
                body: serde_json::to_string(registration).unwrap_or_default(),
                health: "healthy".into(),
                registered_at_ms: now,
                last_heartbeat_ms: now,
            })
            .await?;
        ids.push(id);
    }
    Ok(ids)
}

pub async fn register(
    State(registry): State<RegistryState>,
    body: Result<Json<Registration>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(registration) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if let Err(e) = registration.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    if let Err(reason) = probe(&registration).await {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "endpoint {} does not speak MCP: {reason}",
                registration.endpoint.url.as_deref().unwrap_or("?")
            ),
        );
    }
    let id = entity_id(&registration);
    let now = now_ms();
    let row = RegistryRow {
        id: id.clone(),
        namespace: registration.namespace.clone(),
        name: registration.name.clone(),
        body: serde_json::to_string(&registration).unwrap_or_default(),
        health: "healthy".into(),
        registered_at_ms: now,
        last_heartbeat_ms: now,
    };
    match registry.store.register(&row).await {
        Ok(()) => {
            registry.beats.known.lock().insert(id.clone());
            (
                StatusCode::CREATED,
                Json(
                    json!({"id": id, "status": "healthy", "ttl_seconds": registration.ttl_seconds}),
                ),
            )
                .into_response()
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    health: Health,
}

pub async fn heartbeat(
    State(registry): State<RegistryState>,
    Path(id): Path<String>,
    body: Option<Json<Heartbeat>>,
) -> Response {
    let health = body.map(|Json(b)| b.health).unwrap_or_default();
    if registry.beats.known.lock().contains(&id) {
        registry
            .beats
            .pending
            .lock()
            .insert(id.clone(), (health, now_ms()));
        return Json(json!({"id": id, "status": health_name(health)})).into_response();
    }
    match registry
        .store
        .heartbeat(&id, health_name(health), now_ms())
        .await
    {
        Ok(true) => Json(json!({"id": id, "status": health_name(health)})).into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no entity {id}: register it again (it may have been deregistered)"),
        ),
        Err(e) => store_error(e),
    }
}

pub async fn deregister(State(registry): State<RegistryState>, Path(id): Path<String>) -> Response {
    registry.beats.known.lock().remove(&id);
    registry.beats.pending.lock().remove(&id);
    match registry.store.deregister(&id).await {
        Ok(true) => Json(json!({"id": id, "deregistered": true})).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no entity {id}")),
        Err(e) => store_error(e),
    }
}

pub async fn list(State(registry): State<RegistryState>) -> Response {
    let now = now_ms();
    match entities(&registry.store).await {
        Ok(entities) => {
            let listed: Vec<Value> = entities
                .iter()
                .map(|e| {
                    let r = &e.registration;
                    json!({
                        "id": e.id, "name": r.name, "version": r.version, "kind": r.kind,
                        "namespace": r.namespace, "status": e.status(now),
                        "capabilities": r.capabilities, "tags": r.tags, "endpoint": r.endpoint,
                        "uptime_seconds": now.saturating_sub(e.registered_at_ms) / 1000,
                        "last_heartbeat_ms": e.last_heartbeat_ms,
                        "dependencies": r.dependencies, "metadata": r.metadata,
                    })
                })
                .collect();
            Json(json!({"entities": listed})).into_response()
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveQuery {
    capability: String,
    /// Comma-separated: `t` required, `+t` preferred, `-t` excluded.
    #[serde(default)]
    tags: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

pub async fn resolve_selector(
    State(registry): State<RegistryState>,
    query: Result<Query<ResolveQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let selector = Selector {
        capability: query.capability,
        tags: query
            .tags
            .map(|t| {
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        version: query.version,
        namespace: query.namespace,
    };
    let entities = match entities(&registry.store).await {
        Ok(entities) => entities,
        Err(e) => return store_error(e),
    };
    match resolve(&selector, &entities, now_ms()) {
        Ok(resolution) => Json(resolution).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// How often the gateway's upstreams are reconciled with the registry: a registration, an
/// expiry or a deregistration reaches connected clients as `list_changed` within this (plus the
/// time to connect).
const SYNC_EVERY: Duration = Duration::from_millis(250);

/// The upstream name of one replica: the entity's name and the hash that ends its id.
fn replica_name(entity: &Entity) -> String {
    let suffix = entity.id.rsplit('.').next().unwrap_or_default();
    format!("{}@{suffix}", entity.registration.name)
}

/// Versions that may stand in for each other: the same major version (for 0.x, the same minor),
/// as a caret requirement would accept.
fn compatibility_line(version: &semver::Version) -> (u64, u64) {
    if version.major > 0 {
        (version.major, 0)
    } else {
        (0, version.minor)
    }
}

/// Keeps the gateway's upstreams in step with the registry: every live server or agent with a
/// URL endpoint is a replica of the logical server named after it (its tools as `NAME__tool`);
/// replicas with one name and compatible versions (of several lines, the newest) share the
/// calls, balanced by load. One that expires, reports itself unhealthy or is deregistered
/// leaves. Names taken by configured servers stay theirs.
pub async fn sync_upstreams(
    registry: RegistryState,
    gateway: concord_mcp::Gateway,
    agents: std::sync::Arc<crate::agents::Agents>,
    configured_entities: Vec<(String, Liveness)>,
    configured: Vec<String>,
    request_timeout: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    // replica upstream name → (pool, url)
    let mut routed: std::collections::BTreeMap<String, (String, String)> = Default::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
        // Entities declared in the config live as long as the node does, with the health the
        // node sees of them.
        {
            let now = now_ms();
            let upstreams = gateway.status();
            let upstream_health =
                |name: &str| match upstreams.iter().find(|u| u.name == name).map(|u| u.state) {
                    Some("healthy") => Health::Healthy,
                    Some("starting") => Health::Degraded,
                    _ => Health::Unhealthy,
                };
            let mut pending = registry.beats.pending.lock();
            for (id, liveness) in &configured_entities {
                let health = match liveness {
                    Liveness::Declared => Health::Healthy,
                    Liveness::Upstream(name) => upstream_health(name),
                    Liveness::Provider(name) => match agents.provider_available(name) {
                        Some(false) => Health::Degraded,
                        _ => Health::Healthy,
                    },
                };
                pending.insert(id.clone(), (health, now));
            }
        }
        if let Err(e) = registry.beats.flush(&registry.store).await {
            tracing::warn!(error = %e, "writing heartbeats failed");
        }
        let entities = match entities(&registry.store).await {
            Ok(entities) => entities,
            Err(e) => {
                tracing::warn!(error = %e, "reading the registry failed");
                continue;
            }
        };
        *registry.beats.known.lock() = entities.iter().map(|e| e.id.clone()).collect();
        let now = now_ms();
        // name → the newest compatibility line seen, and its live replicas
        type Line = ((u64, u64), Vec<(String, String)>);
        let mut lines: std::collections::BTreeMap<String, Line> = Default::default();
        for entity in &entities {
            let registration = &entity.registration;
            let live = matches!(
                entity.status(now),
                concord_mesh::Status::Healthy | concord_mesh::Status::Degraded
            );
            let Some(url) = &registration.endpoint.url else {
                continue;
            };
            if !live || registration.kind == Kind::Llm || configured.contains(&registration.name) {
                continue;
            }
            let Ok(version) = semver::Version::parse(&registration.version) else {
                continue;
            };
            let line = compatibility_line(&version);
            let replica = (replica_name(entity), url.clone());
            match lines.get_mut(&registration.name) {
                Some((current, replicas)) if *current == line => replicas.push(replica),
                Some((current, _)) if *current > line => {}
                _ => {
                    lines.insert(registration.name.clone(), (line, vec![replica]));
                }
            }
        }
        let desired: std::collections::BTreeMap<String, (String, String)> = lines
            .into_iter()
            .flat_map(|(pool, (_, replicas))| {
                replicas
                    .into_iter()
                    .map(move |(replica, url)| (replica, (pool.clone(), url)))
            })
            .collect();
        let stale: Vec<String> = routed
            .iter()
            .filter(|(name, target)| desired.get(*name) != Some(*target))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            gateway.remove_upstream(&name);
            routed.remove(&name);
        }
        for (name, (pool, url)) in desired {
            if routed.contains_key(&name) {
                continue;
            }
            let spec = concord_config::ServerSpec::new(
                name.clone(),
                concord_config::TransportSpec::StreamableHttp {
                    url: url.clone(),
                    headers: Default::default(),
                },
                request_timeout,
            );
            match gateway.add_replica(spec, Some(&pool)) {
                Ok(()) => {
                    routed.insert(name, (pool, url));
                }
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "a registered server cannot be routed")
                }
            }
        }
    }
}
