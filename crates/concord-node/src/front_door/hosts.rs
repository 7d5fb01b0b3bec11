//! The DNS-rebinding guard of every route: the `Host` a request names must be this machine's
//! loopback name or one the operator allowed, and a browser's `Origin`, when sent, must be a
//! loopback origin or one the operator allowed. A page on `rebind.attacker.example` that
//! resolves to 127.0.0.1 sends its own name as `Host` and its own origin: both are refused.

/// Host names that always reach a loopback listener.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The allowed `Host` and `Origin` values, from `[node] allowed_hosts` / `allowed_origins`.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostPolicy {
    hosts: Vec<Authority>,
    origins: Vec<AllowedOrigin>,
    /// `Origin: null` (sandboxed frames, file pages) only when the operator listed "null".
    null_origin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Authority {
    host: String,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedOrigin {
    scheme: String,
    host: String,
    /// None: any port (an entry written `scheme://host:*` or without a port).
    port: Option<u16>,
}

/// Why a request was refused at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EdgeRefusal {
    #[error("the request names no Host")]
    MissingHost,
    #[error("Host {0:?} is not allowed here (add it to [node] allowed_hosts)")]
    Host(String),
    #[error("Origin {0:?} is not allowed here (add it to [node] allowed_origins)")]
    Origin(String),
}

impl HostPolicy {
    pub(crate) fn new(allowed_hosts: &[String], allowed_origins: &[String]) -> Self {
        let hosts = LOOPBACK_HOSTS
            .iter()
            .map(|h| Authority {
                host: (*h).to_string(),
                port: None,
            })
            .chain(allowed_hosts.iter().filter_map(|h| parse_authority(h)))
            .collect();
        let origins = allowed_origins
            .iter()
            .filter_map(|o| parse_origin(o))
            .collect();
        let null_origin = allowed_origins.iter().any(|o| o.trim() == "null");
        Self {
            hosts,
            origins,
            null_origin,
        }
    }

    /// Checks the `Host` (or HTTP/2 `:authority`) and the optional `Origin` of a request.
    pub(crate) fn check(
        &self,
        host: Option<&str>,
        origin: Option<&str>,
    ) -> Result<(), EdgeRefusal> {
        let host = host.ok_or(EdgeRefusal::MissingHost)?;
        let authority = parse_authority(host).ok_or_else(|| EdgeRefusal::Host(host.into()))?;
        let known = self.hosts.iter().any(|allowed| {
            allowed.host == authority.host && allowed.port.is_none_or(|p| authority.port == Some(p))
        });
        if !known {
            return Err(EdgeRefusal::Host(host.into()));
        }
        if let Some(origin) = origin {
            if origin.trim() == "null" && self.null_origin {
                return Ok(());
            }
            let parsed = parse_origin(origin).ok_or_else(|| EdgeRefusal::Origin(origin.into()))?;
            let loopback = LOOPBACK_HOSTS.contains(&parsed.host.as_str())
                && matches!(parsed.scheme.as_str(), "http" | "https");
            let allowed = self.origins.iter().any(|allowed| {
                allowed.scheme == parsed.scheme
                    && allowed.host == parsed.host
                    && allowed.port.is_none_or(|p| parsed.port == Some(p))
            });
            if !(loopback || allowed) {
                return Err(EdgeRefusal::Origin(origin.into()));
            }
        }
        Ok(())
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn parse_authority(text: &str) -> Option<Authority> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let authority = axum::http::uri::Authority::try_from(text).ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    Some(Authority {
        host: normalize_host(authority.host()),
        port: authority.port_u16(),
    })
}

fn parse_origin(text: &str) -> Option<AllowedOrigin> {
    let text = text.trim();
    let (text, any_port) = match text.strip_suffix(":*") {
        Some(base) => (base, true),
        None => (text, false),
    };
    let uri = axum::http::Uri::try_from(text).ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    let port = if any_port {
        None
    } else {
        authority.port_u16().or(match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })
    };
    Some(AllowedOrigin {
        scheme,
        host: normalize_host(authority.host()),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HostPolicy {
        HostPolicy::new(
            &["gateway.internal".into(), "10.0.0.5:8811".into()],
            &[
                "https://console.example.com".into(),
                "http://dev.example:*".into(),
            ],
        )
    }

    #[test]
    fn loopback_names_pass_with_any_port() {
        let policy = HostPolicy::new(&[], &[]);
        for host in ["localhost", "127.0.0.1:8811", "[::1]:9000", "LOCALHOST:1"] {
            assert_eq!(policy.check(Some(host), None), Ok(()), "{host}");
        }
    }

    #[test]
    fn a_rebound_name_is_refused() {
        let policy = policy();
        assert_eq!(
            policy.check(Some("rebind.attacker.example:8811"), None),
            Err(EdgeRefusal::Host("rebind.attacker.example:8811".into()))
        );
        assert_eq!(policy.check(None, None), Err(EdgeRefusal::MissingHost));
        assert!(policy.check(Some("user@localhost"), None).is_err());
        assert!(policy.check(Some(""), None).is_err());
    }

    #[test]
    fn allowed_hosts_match_with_or_without_port() {
        let policy = policy();
        assert_eq!(policy.check(Some("gateway.internal:443"), None), Ok(()));
        assert_eq!(policy.check(Some("10.0.0.5:8811"), None), Ok(()));
        assert!(policy.check(Some("10.0.0.5:9999"), None).is_err());
        assert!(policy.check(Some("10.0.0.5"), None).is_err());
    }

    #[test]
    fn origins_must_be_loopback_or_allowed() {
        let policy = policy();
        let host = Some("localhost:8811");
        for origin in [
            "http://localhost:3000",
            "https://127.0.0.1",
            "https://console.example.com",
            "https://console.example.com:443",
            "http://dev.example:5173",
        ] {
            assert_eq!(policy.check(host, Some(origin)), Ok(()), "{origin}");
        }
        for origin in [
            "http://rebind.attacker.example",
            "null",
            "https://console.example.com:8443",
            "http://console.example.com",
            "not an origin",
        ] {
            assert_eq!(
                policy.check(host, Some(origin)),
                Err(EdgeRefusal::Origin(origin.into())),
                "{origin}"
            );
        }
        let with_null = HostPolicy::new(&[], &["null".into()]);
        assert_eq!(with_null.check(host, Some("null")), Ok(()));
    }
}
