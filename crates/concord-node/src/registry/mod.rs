//! `/api/v1/registry`: entities register with one HTTP call (any language), heartbeat, and
//! deregister; anyone allowed can list them and resolve a selector to ranked candidates with
//! reasons. Registrations live in the store, so a restart keeps them and nodes sharing a
//! PostgreSQL see one catalog.
//!
//! What a registration may do, since a registered server receives callers' tool calls:
//! - **Names have owners.** A name (in its namespace) belongs to the principal that first
//!   registered it; another principal's registration, heartbeat or deregistration of it is
//!   refused (403). With auth off there is one principal, `anonymous`. Names the node's config
//!   declares (`[servers.*]`, `[registry.*]`, `[agents.*]`, `[providers.*]`) are reserved in
//!   every namespace.
//! - **Only the default namespace is routed.** The gateway has one catalog (`NAME__tool`), which
//!   is the namespace `default`; registrations in other namespaces are listed and resolved, never
//!   routed, so they cannot join a pool of the default namespace.
//! - **The node connects only where it may.** A URL endpoint's host is resolved and every address
//!   checked: link-local and metadata addresses never, private ranges only in
//!   `[node] registry_private_networks`, loopback yes — except this node itself (a registration of
//!   its own `/mcp` made the catalog grow without bound). Over plain HTTP the node then connects
//!   to the checked address, never to a second DNS answer; over HTTPS the certificate must match
//!   the name. The probe's refusal says what failed, never what the endpoint answered.
//! - **No process is spawned for anyone.** `command` endpoints cannot be registered over the
//!   API (only in the config): a remote principal must not make the node run programs.
//! - **Bounded.** A principal holds at most `[node] registry_max_per_principal` registrations
//!   (429 past it; its own expired ones make room), a registration is at most 64 KiB (metadata
//!   16 KiB, 413), expired rows are deleted an hour after they expired, and the sync reads only
//!   the bodies that changed.
//! - **Nothing secret is published.** Listed endpoints carry no user information, query string
//!   or command arguments; configured servers are registered with their URL so reduced and their
//!   command's program name only (no arguments, environment or headers).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use concord_governance::Principal;
use concord_mesh::net::{AddressPolicy, Host, HttpUrl, Scheme};
use concord_mesh::{Entity, Health, Kind, MeshError, Registration, Selector, resolve};
use concord_store::{Owned, Registered, RegistryRow, Store};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a registration waits for its endpoint to answer MCP `initialize`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long resolving an endpoint's host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of a probed endpoint's answer that is read.
const MAX_PROBE_ANSWER: usize = 64 * 1024;
/// The largest registration body accepted.
const MAX_REGISTRATION_BYTES: usize = 64 * 1024;
/// How often expired registrations are pruned, and how long after their expiry.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_GRACE: Duration = Duration::from_secs(3600);
/// How long a replica that could not be routed (refused address, unresolvable host) waits
/// before the sync tries it again.
const RETRY_HELD_BACK: Duration = Duration::from_secs(30);
/// The owner of the entities the node declares itself (from its config).
const CONFIG_OWNER: &str = "concord:config";
/// The one principal when authentication is off.
const ANONYMOUS: &str = "anonymous";
/// The namespace the gateway's catalog is.
const ROUTED_NAMESPACE: &str = "default";

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

fn not_owner(principal: &str, what: &str) -> Response {
    tracing::info!(%principal, %what, "registry write refused: another principal's name");
    error(
        StatusCode::FORBIDDEN,
        format!(
            "forbidden: {what} belongs to another principal; only the principal that first registered a name may register, heartbeat or deregister it"
        ),
    )
}

fn declared_in_config(what: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        format!(
            "forbidden: {what} is declared in the node's configuration; it cannot be registered, heartbeated or deregistered over the API"
        ),
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

fn health_of(text: &str) -> Health {
    match text {
        "degraded" => Health::Degraded,
        "unhealthy" => Health::Unhealthy,
        _ => Health::Healthy,
    }
}

fn entity_of(row: &RegistryRow) -> Option<Entity> {
    let registration: Registration = serde_json::from_str(&row.body).ok()?;
    Some(Entity {
        id: row.id.clone(),
        registration,
        health: health_of(&row.health),
        registered_at_ms: row.registered_at_ms,
        last_heartbeat_ms: row.last_heartbeat_ms,
    })
}

fn row_of(registration: &Registration, owner: &str, now: u64) -> RegistryRow {
    RegistryRow {
        id: entity_id(registration),
        namespace: registration.namespace.clone(),
        name: registration.name.clone(),
        body: serde_json::to_string(registration).unwrap_or_default(),
        health: "healthy".into(),
        registered_at_ms: now,
        last_heartbeat_ms: now,
        owner: owner.to_string(),
        ttl_ms: registration.ttl_seconds * 1000,
    }
}

/// Heartbeats are the registry's hottest write and need no fsync each: they are kept here and
/// written in one transaction per sync tick (every 250 ms). An entity's TTL is seconds, so the
/// lag never decides an expiry.
#[derive(Default)]
pub struct Heartbeats {
    pending: parking_lot::Mutex<HashMap<String, (Health, u64)>>,
    /// Ids known to exist (refreshed every tick) with their owners, so a heartbeat of its
    /// owner is taken in memory.
    known: parking_lot::Mutex<HashMap<String, String>>,
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

/// What the node's configuration says registrations may do.
pub struct RegistryPolicy {
    /// Names declared in the config: nobody registers them over the API.
    reserved: HashSet<String>,
    addresses: AddressPolicy,
    max_per_principal: usize,
    /// Where this node listens (set once it is bound), so it is never its own upstream.
    local_addr: OnceLock<SocketAddr>,
}

impl RegistryPolicy {
    pub fn new(config: &concord_config::Config) -> Self {
        let reserved = config
            .servers
            .iter()
            .map(|s| s.name.clone())
            .chain(config.registry.iter().map(|r| r.name.clone()))
            .chain(config.agents.iter().map(|a| a.name.clone()))
            .chain(config.providers.iter().map(|p| p.name.clone()))
            .collect();
        Self {
            reserved,
            addresses: AddressPolicy {
                private_networks: config.node.registry_private_networks.clone(),
            },
            max_per_principal: config.node.registry_max_per_principal,
            local_addr: OnceLock::new(),
        }
    }
}

/// What the registry handlers share.
#[derive(Clone)]
pub struct RegistryState {
    pub store: Store,
    pub beats: Arc<Heartbeats>,
    pub policy: Arc<RegistryPolicy>,
}

impl RegistryState {
    pub fn new(store: Store, config: &concord_config::Config) -> Self {
        Self {
            store,
            beats: Arc::default(),
            policy: Arc::new(RegistryPolicy::new(config)),
        }
    }

    /// Records where the node listens, so no endpoint resolving there is registered or routed.
    pub fn set_local_addr(&self, addr: SocketAddr) {
        let _ = self.policy.local_addr.set(addr);
    }
}

pub async fn entities(store: &Store) -> Result<Vec<Entity>, concord_store::StoreError> {
    Ok(store
        .registry()
        .await?
        .iter()
        .filter_map(entity_of)
        .collect())
}

/// The owner a request acts as: its principal, or the one principal when auth is off.
fn owner_of(principal: Option<axum::Extension<Principal>>) -> String {
    principal.map_or_else(|| ANONYMOUS.to_string(), |axum::Extension(p)| p.id)
}

mod endpoint;
mod sync;

use endpoint::*;
pub use sync::sync_upstreams;
#[cfg(test)]
use sync::*;

// --- Entities the node declares itself --------------------------------------------------------

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
/// alike. They are never routed as registered replicas: the gateway has them already. What is
/// stored (and listed) of their transport holds no secret: a command's program name only (no
/// arguments, no environment), a URL without user information or query, never headers.
pub fn server_registrations(servers: &[concord_config::ServerSpec]) -> Vec<Registration> {
    servers
        .iter()
        .filter_map(|spec| {
            let endpoint = match &spec.transport {
                concord_config::TransportSpec::Stdio { command, .. } => {
                    json!({"command": [concord_mesh::net::program_name(command)]})
                }
                concord_config::TransportSpec::StreamableHttp { url, .. }
                | concord_config::TransportSpec::Sse { url, .. } => {
                    json!({"url": concord_mesh::net::public_url(url)})
                }
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

/// Registers the entities declared in the config (no handshake probe: they may start after the
/// node) and returns their ids, which the sync loop keeps alive.
pub async fn register_configured(
    store: &Store,
    registrations: &[Registration],
) -> Result<Vec<String>, concord_store::StoreError> {
    let now = now_ms();
    let mut ids = Vec::with_capacity(registrations.len());
    for registration in registrations {
        let row = row_of(registration, CONFIG_OWNER, now);
        store.register(&row).await?;
        ids.push(row.id);
    }
    Ok(ids)
}

// --- The API ---------------------------------------------------------------------------------

pub async fn register(
    State(registry): State<RegistryState>,
    principal: Option<axum::Extension<Principal>>,
    body: axum::body::Body,
) -> Response {
    let owner = owner_of(principal);
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REGISTRATION_BYTES).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a registration is at most {MAX_REGISTRATION_BYTES} bytes"),
        );
    };
    let registration: Registration = match serde_json::from_slice(&bytes) {
        Ok(registration) => registration,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid registration: {e}"),
            );
        }
    };
    match registration.validate() {
        Ok(_) => {}
        Err(e @ MeshError::TooLarge { .. }) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    }
    if !registration.endpoint.command.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "endpoint.command: command endpoints cannot be registered over the API (the node would run the program); register a URL, or declare the entity in the node's config ([registry.NAME] or [servers.NAME])",
        );
    }
    let name = &registration.name;
    let namespace = &registration.namespace;
    if registry.policy.reserved.contains(name) || owner == CONFIG_OWNER {
        return declared_in_config(&format!("the name {name}"));
    }
    // Refused before the probe: the node connects nowhere on a hijacker's behalf.
    match registry.store.registry_name_owner(namespace, name).await {
        Ok(Some(holder)) if holder != owner => {
            return not_owner(&owner, &format!("the name {name} (namespace {namespace})"));
        }
        Ok(_) => {}
        Err(e) => return store_error(e),
    }
    if let Some(url) = &registration.endpoint.url
        && registration.kind != Kind::Llm
    {
        // LLM entities are a directory entry: the node never connects to them.
        let shown = concord_mesh::net::public_url(url);
        let checked = match check_endpoint(
            url,
            registry.policy.local_addr.get().copied(),
            Some(&registry.policy.addresses),
        )
        .await
        {
            Ok(checked) => checked,
            Err(refusal) => {
                tracing::info!(%owner, endpoint = %shown, %refusal, "registration refused");
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("endpoint {shown} is not allowed: {refusal}"),
                );
            }
        };
        if let Err(failure) = probe(&checked).await {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("endpoint {shown} does not speak MCP: {failure}"),
            );
        }
    }
    let row = row_of(&registration, &owner, now_ms());
    match registry
        .store
        .register_owned(&row, registry.policy.max_per_principal, now_ms())
        .await
    {
        Ok(Registered::Done) => {
            registry.beats.known.lock().insert(row.id.clone(), owner);
            (
                StatusCode::CREATED,
                Json(
                    json!({"id": row.id, "status": "healthy", "ttl_seconds": registration.ttl_seconds}),
                ),
            )
                .into_response()
        }
        Ok(Registered::Owned { .. }) => {
            not_owner(&owner, &format!("the name {name} (namespace {namespace})"))
        }
        Ok(Registered::Full { limit }) => error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{owner} already holds {limit} registrations, the most one principal may ([node] registry_max_per_principal): deregister some first (expired ones make room)"
            ),
        ),
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
    principal: Option<axum::Extension<Principal>>,
    body: Option<Json<Heartbeat>>,
) -> Response {
    let owner = owner_of(principal);
    let health = body.map(|Json(b)| b.health).unwrap_or_default();
    let known = registry.beats.known.lock().get(&id).cloned();
    match known.as_deref() {
        Some(CONFIG_OWNER) => return declared_in_config(&format!("entity {id}")),
        _ if owner == CONFIG_OWNER => return declared_in_config(&format!("entity {id}")),
        Some(holder) if holder == owner => {
            registry
                .beats
                .pending
                .lock()
                .insert(id.clone(), (health, now_ms()));
            return Json(json!({"id": id, "status": health_name(health)})).into_response();
        }
        Some(holder) if holder != concord_store::LEGACY_OWNER => {
            return not_owner(&owner, &format!("entity {id}"));
        }
        _ => {}
    }
    match registry
        .store
        .heartbeat_owned(&id, &owner, health_name(health), now_ms())
        .await
    {
        Ok(Owned::Done) => {
            registry.beats.known.lock().insert(id.clone(), owner);
            Json(json!({"id": id, "status": health_name(health)})).into_response()
        }
        Ok(Owned::Missing) => error(
            StatusCode::NOT_FOUND,
            format!("no entity {id}: register it again (it may have been deregistered)"),
        ),
        Ok(Owned::Other { owner }) if owner == CONFIG_OWNER => {
            declared_in_config(&format!("entity {id}"))
        }
        Ok(Owned::Other { .. }) => not_owner(&owner, &format!("entity {id}")),
        Err(e) => store_error(e),
    }
}

pub async fn deregister(
    State(registry): State<RegistryState>,
    Path(id): Path<String>,
    principal: Option<axum::Extension<Principal>>,
) -> Response {
    let owner = owner_of(principal);
    if owner == CONFIG_OWNER {
        return declared_in_config(&format!("entity {id}"));
    }
    match registry.store.deregister_owned(&id, &owner, now_ms()).await {
        Ok(Owned::Done) => {
            registry.beats.known.lock().remove(&id);
            registry.beats.pending.lock().remove(&id);
            Json(json!({"id": id, "deregistered": true})).into_response()
        }
        Ok(Owned::Missing) => error(StatusCode::NOT_FOUND, format!("no entity {id}")),
        Ok(Owned::Other { owner }) if owner == CONFIG_OWNER => {
            declared_in_config(&format!("entity {id}"))
        }
        Ok(Owned::Other { .. }) => not_owner(&owner, &format!("entity {id}")),
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
                        "capabilities": r.capabilities, "tags": r.tags,
                        "endpoint": r.endpoint.public(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn this_node_is_its_address_its_loopback_aliases_and_when_unbound_its_own_addresses() {
        let local = addr("127.0.0.1:8811");
        for same in [
            "127.0.0.1:8811",
            "127.0.0.2:8811",
            "[::1]:8811",
            "[::ffff:127.0.0.1]:8811",
            "0.0.0.0:8811",
        ] {
            assert!(is_this_node(addr(same), local), "{same}");
        }
        assert!(!is_this_node(addr("127.0.0.1:9000"), local));
        assert!(!is_this_node(addr("8.8.8.8:8811"), local));
        let everywhere = addr("0.0.0.0:8811");
        assert!(is_this_node(addr("127.0.0.1:8811"), everywhere));
        // 192.0.2.1 (documentation) is no address of this machine.
        assert!(!is_this_node(addr("192.0.2.1:8811"), everywhere));
    }

    #[tokio::test]
    async fn every_resolved_address_is_checked() {
        let local = Some(addr("127.0.0.1:8811"));
        let policy = AddressPolicy::default();
        // `localhost` resolves to loopback addresses only: allowed, on another port.
        let ok = check_endpoint("http://localhost:9000/mcp", local, Some(&policy))
            .await
            .unwrap();
        assert!(ok.addrs.iter().all(|a| a.ip().is_loopback()));
        for (url, expected) in [
            ("http://localhost:8811/mcp", "this node itself"),
            ("http://127.0.0.1:8811/agents/x/mcp", "this node itself"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://[fe80::1]:80/", "link-local"),
            ("http://10.0.0.8:9000/mcp", "private address"),
            ("http://[::ffff:192.168.1.2]:9000/mcp", "private address"),
            ("http://100.100.100.200/", "metadata"),
        ] {
            let refusal = check_endpoint(url, local, Some(&policy))
                .await
                .err()
                .unwrap_or_else(|| panic!("{url} was allowed"))
                .to_string();
            assert!(refusal.contains(expected), "{url}: {refusal}");
        }
        let open = AddressPolicy {
            private_networks: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(
            check_endpoint("http://10.0.0.8:9000/mcp", local, Some(&open))
                .await
                .is_ok()
        );
        // Declared entities are trusted with any address, never with this node's.
        assert!(
            check_endpoint("http://10.0.0.8:9000/mcp", local, None)
                .await
                .is_ok()
        );
        assert!(
            check_endpoint("http://127.0.0.1:8811/mcp", local, None)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn the_sync_reads_only_the_bodies_that_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db").display().to_string())
            .await
            .unwrap();
        let registration = |name: &str, tag: &str| -> Registration {
            serde_json::from_value(json!({"name": name, "version": "1.0.0", "kind": "server",
                "capabilities": ["x"], "tags": [tag], "endpoint": {"url": "http://127.0.0.1:1/mcp"}}))
            .unwrap()
        };
        let now = now_ms();
        let a = row_of(&registration("a", "one"), "alice", now);
        let b = row_of(&registration("b", "one"), "alice", now);
        store.register(&a).await.unwrap();
        store.register(&b).await.unwrap();
        let mut mirror = Mirror::default();
        mirror.refresh(&store).await.unwrap();
        assert_eq!((mirror.rows.len(), mirror.bodies_read), (2, 2));
        // Heartbeats change no body: none is read again, the health is taken from the heads.
        store
            .heartbeats(&[(a.id.clone(), "degraded".into(), now + 5)])
            .await
            .unwrap();
        mirror.refresh(&store).await.unwrap();
        assert_eq!(mirror.bodies_read, 2);
        let entity = mirror.rows[&a.id].entity.as_ref().unwrap();
        assert_eq!(
            (entity.health, entity.last_heartbeat_ms),
            (Health::Degraded, now + 5)
        );
        // A registration again with another body is read again; a removed row leaves.
        let a_again = row_of(&registration("a", "two"), "alice", now);
        assert_eq!(a_again.id, a.id);
        store.register(&a_again).await.unwrap();
        store.deregister(&b.id).await.unwrap();
        mirror.refresh(&store).await.unwrap();
        assert_eq!((mirror.rows.len(), mirror.bodies_read), (1, 3));
        let entity = mirror.rows[&a.id].entity.as_ref().unwrap();
        assert_eq!(entity.registration.tags, ["two"]);
        store.close().await;
    }

    #[test]
    fn probe_answers_are_read_from_json_sse_and_chunks() {
        let json = br#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18"}}"#;
        assert!(initialize_answer(json).is_some());
        let sse = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        assert!(initialize_answer(sse).is_some());
        assert!(initialize_answer(b"<html>nope</html>").is_none());
        let chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(dechunk(chunked), b"hello world");
        assert_eq!(dechunk(b"5\r\nhel"), b"hel");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
