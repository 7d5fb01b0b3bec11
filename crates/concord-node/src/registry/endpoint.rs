//! Where the node may connect for a registration, and the MCP probe of an endpoint: every
//! resolved address checked, this node itself refused, a bounded `initialize` over the checked
//! address that never echoes what the endpoint answered.

use super::*;

/// `ip` without an IPv4-mapped IPv6 wrapping.
pub(super) fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a connection to `addr` reaches the node listening at `local`: its own address, a
/// loopback or unspecified address on its port, or (when it listens on every interface) any
/// address of this machine on its port.
pub(super) fn is_this_node(addr: SocketAddr, local: SocketAddr) -> bool {
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
pub(super) enum EndpointRefusal {
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
pub(super) struct Checked {
    pub(super) url: HttpUrl,
    pub(super) addrs: Vec<SocketAddr>,
}

/// Resolves `url`'s host and checks every address: never this node; with `addresses`, only
/// where that policy allows (entities declared in the config are trusted with any address).
pub(super) async fn check_endpoint(
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
    pub(super) async fn connect_url(&self) -> String {
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
pub(super) enum ProbeFailure {
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

pub(super) const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"concord-registry-probe","version":"1"}}}"#;

pub(super) fn base64(bytes: &[u8]) -> String {
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
pub(super) fn host_header(addr: SocketAddr) -> String {
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
pub(super) fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
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
pub(super) fn initialize_answer(body: &[u8]) -> Option<Value> {
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
pub(super) async fn probe_http(
    url: &HttpUrl,
    addr: SocketAddr,
) -> Result<Option<String>, ProbeFailure> {
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
pub(super) fn close_probe_session(url: HttpUrl, addr: SocketAddr, session: String) {
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
pub(super) async fn probe(checked: &Checked) -> Result<(), ProbeFailure> {
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
