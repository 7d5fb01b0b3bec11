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

// --- Where the node may connect --------------------------------------------------------------

/// `ip` without an IPv4-mapped IPv6 wrapping.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a connection to `addr` reaches the node listening at `local`: its own address, a
/// loopback or unspecified address on its port, or (when it listens on every interface) any
/// address of this machine on its port.
fn is_this_node(addr: SocketAddr, local: SocketAddr) -> bool {
    if addr.port() != local.port() {
        return false;
    }
    let ip = unmapped(addr.ip());
    let own = unmapped(local.ip());
    ip == own
        || ip.is_loopback()
        || ip.is_unspecified()
        // An address this machine has: binding to it succeeds only here.
        || (own.is_unspecified() && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
}

/// Why the node will not connect to an endpoint.
#[derive(Debug, thiserror::Error)]
enum EndpointRefusal {
    #[error("{0}")]
    Url(String),
    #[error("cannot resolve {0}")]
    Unresolvable(String),
    #[error("it is this node itself ({0}): a node never routes to itself")]
    ThisNode(SocketAddr),
    #[error("{host} resolves to {refusal}")]
    Address {
        host: String,
        refusal: concord_mesh::net::AddressRefusal,
    },
}

/// An endpoint whose every address was checked.
struct Checked {
    url: HttpUrl,
    addrs: Vec<SocketAddr>,
}

/// Resolves `url`'s host and checks every address: never this node; with `addresses`, only
/// where that policy allows (entities declared in the config are trusted with any address).
async fn check_endpoint(
    url: &str,
    local: Option<SocketAddr>,
    addresses: Option<&AddressPolicy>,
) -> Result<Checked, EndpointRefusal> {
    let url = HttpUrl::parse(url).map_err(EndpointRefusal::Url)?;
    let addrs: Vec<SocketAddr> = match &url.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, url.port)],
        Host::Name(name) => {
            let unresolvable = || EndpointRefusal::Unresolvable(name.clone());
            tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((name.as_str(), url.port)),
            )
            .await
            .map_err(|_| unresolvable())?
            .map_err(|_| unresolvable())?
            .collect()
        }
    };
    if addrs.is_empty() {
        return Err(match &url.host {
            Host::Name(name) => EndpointRefusal::Unresolvable(name.clone()),
            Host::Ip(ip) => EndpointRefusal::Unresolvable(ip.to_string()),
        });
    }
    let host = match &url.host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    for addr in &addrs {
        if let Some(local) = local
            && is_this_node(*addr, local)
        {
            return Err(EndpointRefusal::ThisNode(*addr));
        }
        if let Some(policy) = addresses {
            policy
                .check(addr.ip())
                .map_err(|refusal| EndpointRefusal::Address {
                    host: host.clone(),
                    refusal,
                })?;
        }
    }
    Ok(Checked { url, addrs })
}

impl Checked {
    /// The URL to connect to: over plain HTTP a host name is replaced by its checked address
    /// (the first that accepts a connection), so no later DNS answer can redirect the node; over
    /// HTTPS the name stays (the certificate must match it, so a rebound name fails its TLS
    /// handshake before any request is sent).
    async fn connect_url(&self) -> String {
        if self.url.scheme == Scheme::Https || matches!(self.url.host, Host::Ip(_)) {
            return self.url.to_string();
        }
        let mut chosen = self.addrs[0];
        for addr in &self.addrs {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                    .await
            {
                chosen = *addr;
                break;
            }
        }
        self.url.pinned(chosen.ip())
    }
}

// --- The MCP probe ---------------------------------------------------------------------------

/// What a probe found wrong, in the node's words: never the endpoint's.
#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    #[error("cannot connect: {0}")]
    Connect(std::io::ErrorKind),
    #[error("no answer within {} s", PROBE_TIMEOUT.as_secs())]
    Timeout,
    #[error("it answered initialize with HTTP status {0}")]
    Status(u16),
    #[error("it answered initialize with JSON-RPC error {0}")]
    RpcError(i64),
    #[error("not an MCP server: its answer to initialize is not an MCP initialize result")]
    NotMcp,
    #[error("no MCP handshake over HTTPS completed (TLS, HTTP or initialize failed)")]
    Https,
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"concord-registry-probe","version":"1"}}}"#;

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `Host` header for a connection to `addr` (the checked address): what the routed
/// replica's client sends too, since it connects to the same address.
fn host_header(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    if addr.port() == 80 {
        host
    } else {
        format!("{host}:{}", addr.port())
    }
}

/// The body of an HTTP/1.1 chunked message as far as it has arrived.
fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = bytes.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&bytes[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return out;
        };
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        let available = bytes.len().saturating_sub(start).min(size);
        out.extend_from_slice(&bytes[start..start + available]);
        if available < size || bytes.len() < start + size + 2 {
            return out;
        }
        bytes = &bytes[start + size + 2..];
    }
}

/// The JSON-RPC answer with id 1 in `body` (plain JSON, or an SSE stream's `data:` lines).
fn initialize_answer(body: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(body);
    let is_ours = |v: &Value| v.get("id") == Some(&json!(1));
    if let Ok(value) = serde_json::from_str::<Value>(text.trim()) {
        return is_ours(&value).then_some(value);
    }
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find(is_ours)
}

/// Sends MCP `initialize` to `url` over a connection to `addr` (already checked) and reads at
/// most [`MAX_PROBE_ANSWER`] of the answer. Returns the session id the endpoint opened, if any.
async fn probe_http(url: &HttpUrl, addr: SocketAddr) -> Result<Option<String>, ProbeFailure> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| ProbeFailure::Connect(e.kind()))?;
    let mut target = url.path.clone();
    if let Some(query) = &url.query {
        target.push('?');
        target.push_str(query);
    }
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\
         User-Agent: concord-registry-probe\r\nConnection: close\r\n",
        host_header(addr),
        INITIALIZE.len()
    );
    if let Some(userinfo) = &url.userinfo {
        request.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64(userinfo.as_bytes())
        ));
    }
    request.push_str("\r\n");
    request.push_str(INITIALIZE);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ProbeFailure::Connect(e.kind()))?;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut head: Option<(usize, bool, Option<String>)> = None;
    loop {
        let read = stream.read(&mut chunk).await.unwrap_or(0);
        let room = MAX_PROBE_ANSWER.saturating_sub(buffer.len());
        buffer.extend_from_slice(&chunk[..read.min(room)]);
        if head.is_none()
            && let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let text = String::from_utf8_lossy(&buffer[..end]).to_string();
            let mut lines = text.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|line| line.split(' ').nth(1))
                .and_then(|code| code.parse().ok())
                .ok_or(ProbeFailure::NotMcp)?;
            if !(200..300).contains(&status) {
                return Err(ProbeFailure::Status(status));
            }
            let mut chunked = false;
            let mut session = None;
            for line in lines {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
                if name == "mcp-session-id" && value.len() <= 256 {
                    session = Some(value.to_string());
                }
            }
            head = Some((end + 4, chunked, session));
        }
        if let Some((start, chunked, session)) = &head {
            let raw = &buffer[*start..];
            let body = if *chunked { dechunk(raw) } else { raw.to_vec() };
            if let Some(answer) = initialize_answer(&body) {
                if let Some(code) = answer.pointer("/error/code").and_then(Value::as_i64) {
                    return Err(ProbeFailure::RpcError(code));
                }
                let version = answer.pointer("/result/protocolVersion");
                return match version {
                    Some(Value::String(_)) => Ok(session.clone()),
                    _ => Err(ProbeFailure::NotMcp),
                };
            }
        }
        if read == 0 || buffer.len() >= MAX_PROBE_ANSWER {
            return Err(ProbeFailure::NotMcp);
        }
    }
}

/// Ends the session a probe opened (best effort, in the background).
fn close_probe_session(url: HttpUrl, addr: SocketAddr, session: String) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            let request = format!(
                "DELETE {} HTTP/1.1\r\nHost: {}\r\nMcp-Session-Id: {session}\r\n\
                 User-Agent: concord-registry-probe\r\nConnection: close\r\n\r\n",
                url.path,
                host_header(addr),
            );
            stream.write_all(request.as_bytes()).await?;
            let mut sink = [0u8; 1024];
            let _ = stream.read(&mut sink).await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// Checks that an MCP endpoint answers `initialize` before it joins the catalog: over plain
/// HTTP at the checked address it will be routed to, over HTTPS by name.
async fn probe(checked: &Checked) -> Result<(), ProbeFailure> {
    let attempt = async {
        if checked.url.scheme == Scheme::Https {
            return match concord_mcp::NodeClient::connect(&checked.url.to_string()).await {
                Ok(client) => {
                    client.close().await;
                    Ok(())
                }
                Err(_) => Err(ProbeFailure::Https),
            };
        }
        let mut failure = ProbeFailure::NotMcp;
        for addr in &checked.addrs {
            match probe_http(&checked.url, *addr).await {
                Ok(session) => {
                    if let Some(session) = session {
                        close_probe_session(checked.url.clone(), *addr, session);
                    }
                    return Ok(());
                }
                // Another address of the name may be the one that listens.
                Err(e @ ProbeFailure::Connect(_)) => failure = e,
                Err(e) => return Err(e),
            }
        }
        Err(failure)
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout))
}

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

// --- The gateway's upstreams from the registry -----------------------------------------------

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

/// One registry row as the sync keeps it between ticks.
struct Cached {
    etag: i64,
    owner: String,
    /// None when the body does not parse (kept, so it is not read again every tick).
    entity: Option<Entity>,
}

/// The registry as the sync last read it: every tick it reads each row's id, owner, body hash,
/// health and last heartbeat, and the bodies only of rows that are new or changed.
#[derive(Default)]
struct Mirror {
    rows: HashMap<String, Cached>,
    /// How many bodies were read so far.
    bodies_read: usize,
}

impl Mirror {
    async fn refresh(&mut self, store: &Store) -> Result<(), concord_store::StoreError> {
        let heads = store.registry_heads().await?;
        let changed: Vec<String> = heads
            .iter()
            .filter(|h| self.rows.get(&h.id).is_none_or(|c| c.etag != h.etag))
            .map(|h| h.id.clone())
            .collect();
        let mut bodies: HashMap<String, RegistryRow> = HashMap::new();
        for ids in changed.chunks(500) {
            for row in store.registry_rows(ids).await? {
                self.bodies_read += 1;
                bodies.insert(row.id.clone(), row);
            }
        }
        let present: HashSet<&str> = heads.iter().map(|h| h.id.as_str()).collect();
        self.rows.retain(|id, _| present.contains(id.as_str()));
        for head in &heads {
            if let Some(row) = bodies.remove(&head.id) {
                self.rows.insert(
                    head.id.clone(),
                    Cached {
                        etag: head.etag,
                        owner: head.owner.clone(),
                        entity: entity_of(&row),
                    },
                );
            }
            if let Some(cached) = self.rows.get_mut(&head.id) {
                cached.owner.clone_from(&head.owner);
                if let Some(entity) = &mut cached.entity {
                    entity.health = health_of(&head.health);
                    entity.last_heartbeat_ms = head.last_heartbeat_ms;
                }
            }
        }
        Ok(())
    }
}

/// Keeps the gateway's upstreams in step with the registry: every live server or agent of the
/// default namespace with a URL endpoint is a replica of the logical server named after it (its
/// tools as `NAME__tool`); replicas with one name and compatible versions (of several lines, the
/// newest) share the calls, balanced by load. One that expires, reports itself unhealthy or is
/// deregistered leaves. Names taken by configured servers stay theirs. Before a replica is
/// added its endpoint is checked again (this node's own address never; registrations made over
/// the API only where the address policy allows) and, over plain HTTP, pinned to the checked
/// address. Expired rows are pruned every minute, an hour after they expired.
pub async fn sync_upstreams(
    registry: RegistryState,
    gateway: concord_mcp::Gateway,
    agents: std::sync::Arc<crate::agents::Agents>,
    configured_entities: Vec<(String, Liveness)>,
    configured: Vec<String>,
    request_timeout: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    // replica upstream name → (pool, url as registered)
    let mut routed: BTreeMap<String, (String, String)> = Default::default();
    // replica upstream name → (url, when) of a replica that could not be routed
    let mut held_back: HashMap<String, (String, Instant)> = HashMap::new();
    let mut mirror = Mirror::default();
    let mut last_prune: Option<Instant> = None;
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
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            match registry
                .store
                .prune_registry(now_ms(), PRUNE_GRACE.as_millis() as u64)
                .await
            {
                Ok((0, 0)) => {}
                Ok((rows, names)) => {
                    tracing::info!(rows, names, "pruned expired registrations and free names")
                }
                Err(e) => tracing::warn!(error = %e, "pruning the registry failed"),
            }
        }
        if let Err(e) = mirror.refresh(&registry.store).await {
            tracing::warn!(error = %e, "reading the registry failed");
            continue;
        }
        *registry.beats.known.lock() = mirror
            .rows
            .iter()
            .map(|(id, cached)| (id.clone(), cached.owner.clone()))
            .collect();
        let now = now_ms();
        // name → the newest compatibility line seen, and its live replicas
        type Line = ((u64, u64), Vec<(String, String, bool)>);
        let mut lines: BTreeMap<String, Line> = Default::default();
        for cached in mirror.rows.values() {
            let Some(entity) = &cached.entity else {
                continue;
            };
            let registration = &entity.registration;
            let live = matches!(
                entity.status(now),
                concord_mesh::Status::Healthy | concord_mesh::Status::Degraded
            );
            let Some(url) = &registration.endpoint.url else {
                continue;
            };
            if !live
                || registration.kind == Kind::Llm
                || registration.namespace != ROUTED_NAMESPACE
                || configured.contains(&registration.name)
            {
                continue;
            }
            let Ok(version) = semver::Version::parse(&registration.version) else {
                continue;
            };
            let line = compatibility_line(&version);
            let replica = (
                replica_name(entity),
                url.clone(),
                cached.owner == CONFIG_OWNER,
            );
            match lines.get_mut(&registration.name) {
                Some((current, replicas)) if *current == line => replicas.push(replica),
                Some((current, _)) if *current > line => {}
                _ => {
                    lines.insert(registration.name.clone(), (line, vec![replica]));
                }
            }
        }
        let desired: BTreeMap<String, (String, String, bool)> = lines
            .into_iter()
            .flat_map(|(pool, (_, replicas))| {
                replicas
                    .into_iter()
                    .map(move |(replica, url, declared)| (replica, (pool.clone(), url, declared)))
            })
            .collect();
        let stale: Vec<String> = routed
            .iter()
            .filter(|(name, (pool, url))| {
                desired
                    .get(*name)
                    .is_none_or(|(p, u, _)| p != pool || u != url)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            gateway.remove_upstream(&name);
            routed.remove(&name);
        }
        held_back.retain(|name, (url, at)| {
            desired.get(name).is_some_and(|(_, u, _)| u == url) && at.elapsed() < RETRY_HELD_BACK
        });
        for (name, (pool, url, declared)) in desired {
            if routed.contains_key(&name) || held_back.contains_key(&name) {
                continue;
            }
            let local = registry.policy.local_addr.get().copied();
            let addresses = (!declared).then_some(&registry.policy.addresses);
            let connect_url = match check_endpoint(&url, local, addresses).await {
                Ok(checked) if declared => checked.url.to_string(),
                Ok(checked) => checked.connect_url().await,
                Err(refusal) => {
                    tracing::warn!(replica = %name, endpoint = %concord_mesh::net::public_url(&url), %refusal, "a registered server is not routed");
                    held_back.insert(name, (url, Instant::now()));
                    continue;
                }
            };
            let spec = concord_config::ServerSpec::new(
                name.clone(),
                concord_config::TransportSpec::StreamableHttp {
                    url: connect_url,
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
