//! Where a node may connect on behalf of whoever registered an endpoint, and what of an
//! endpoint may be published. Pure: the node resolves host names and connects; this module
//! parses URLs, classifies addresses and decides.
//!
//! Address classes, decided on every address a host name resolves to (and on the IPv4 address
//! inside an IPv4-mapped, NAT64 or 6to4 IPv6 address):
//! - **denied always**: link-local (`169.254.0.0/16`, `fe80::/10`, where cloud metadata
//!   services answer), known metadata addresses (`100.100.100.200`, `fd00:ec2::254`),
//!   unspecified, "this network" (`0.0.0.0/8`), multicast, broadcast and reserved ranges;
//! - **private**: `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, `100.64.0.0/10`,
//!   `198.18.0.0/15`, `fc00::/7`, `fec0::/10` — refused unless a configured network holds them;
//! - **loopback** (`127.0.0.0/8`, `::1`) and **public**: allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// The host of a URL: a name to resolve, or an address written in the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

/// An `http://` or `https://` URL taken apart (no percent-decoding: a host name with `%` is
/// refused, and the rest is passed on as written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: Scheme,
    /// `user:password` before the host, when written.
    pub userinfo: Option<String>,
    pub host: Host,
    pub port: u16,
    /// Whether the URL wrote its port (else the scheme's default).
    explicit_port: bool,
    /// From the first `/` (`/` when the URL has none), without query and fragment.
    pub path: String,
    /// After `?`, without the fragment.
    pub query: Option<String>,
}

/// The longest endpoint URL a registration may carry.
pub const MAX_URL_LEN: usize = 2048;

impl HttpUrl {
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        if text.len() > MAX_URL_LEN {
            return Err(format!("longer than {MAX_URL_LEN} characters"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains whitespace or control characters".into());
        }
        // HTTP clients (WHATWG URL parsing, as reqwest does) read `\` as `/` in http(s) URLs,
        // so `http://A\@B/` would be checked as host B here and connected to as host A.
        if text.contains('\\') {
            return Err("contains a backslash".into());
        }
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = text.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err("expected an http:// or https:// URL".into());
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query.to_string())),
            None => (tail, None),
        };
        let path = if path.is_empty() { "/" } else { path }.to_string();
        // A percent-encoded authority is decoded by clients before they resolve it: refused,
        // so the host checked is the host connected to.
        if authority.contains('%') {
            return Err("the host part is percent-encoded".into());
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo.to_string()), hostport),
            None => (None, authority),
        };
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (inside, after) = bracketed
                .split_once(']')
                .ok_or("an IPv6 address needs its closing ']'")?;
            let ip: Ipv6Addr = inside
                .parse()
                .map_err(|_| format!("{inside:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or("expected ':PORT' after the IPv6 address")?,
                ),
            };
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = match hostport.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            };
            if host.is_empty() {
                return Err("the URL names no host".into());
            }
            if let Ok(ip) = host.parse::<Ipv4Addr>() {
                (Host::Ip(IpAddr::V4(ip)), port)
            } else {
                let valid = host.len() <= 253
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
                if !valid {
                    return Err(format!("{host:?} is not a valid host name"));
                }
                (Host::Name(host.to_ascii_lowercase()), port)
            }
        };
        let (port, explicit_port) = match port {
            None => (scheme.default_port(), false),
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port > 0 => (port, true),
                _ => return Err(format!("{text:?} is not a port (1 to 65535)")),
            },
        };
        Ok(HttpUrl {
            scheme,
            userinfo,
            host,
            port,
            explicit_port,
            path,
            query,
        })
    }

    /// The host as written in a URL (IPv6 in brackets).
    fn host_text(host: &Host) -> String {
        match host {
            Host::Name(name) => name.clone(),
            Host::Ip(IpAddr::V4(ip)) => ip.to_string(),
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
        }
    }

    fn render(&self, host: &Host, with_secrets: bool) -> String {
        let mut out = format!("{}://", self.scheme.as_str());
        if with_secrets && let Some(userinfo) = &self.userinfo {
            out.push_str(userinfo);
            out.push('@');
        }
        out.push_str(&Self::host_text(host));
        if self.explicit_port {
            out.push_str(&format!(":{}", self.port));
        }
        out.push_str(&self.path);
        if with_secrets && let Some(query) = &self.query {
            out.push('?');
            out.push_str(query);
        }
        out
    }

    /// The URL with its host replaced by `ip` (the address that was checked), everything else
    /// as written: connecting there cannot be redirected by a second DNS answer.
    pub fn pinned(&self, ip: IpAddr) -> String {
        self.render(&Host::Ip(ip), true)
    }

    /// What may be shown to others: no user information, no query string, no fragment.
    pub fn public(&self) -> String {
        self.render(&self.host, false)
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&self.host, true))
    }
}

/// `url` without user information, query string or fragment; an unparsable URL keeps only its
/// scheme and host-and-path text before any `?`, `#` or `@`-separated user information.
pub fn public_url(url: &str) -> String {
    if let Ok(parsed) = HttpUrl::parse(url) {
        return parsed.public();
    }
    let cut = url.split(['?', '#']).next().unwrap_or_default();
    match cut.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => cut.rsplit_once('@').map_or(cut, |(_, h)| h).to_string(),
    }
}

/// The program of a command line without its directory (`/usr/bin/python3` → `python3`).
pub fn program_name(command: &str) -> String {
    command
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(command)
        .to_string()
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a network like \"10.0.0.0/8\""))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= bits => p,
                _ => {
                    return Err(format!("{text:?}: the prefix length must be 0 to {bits}"));
                }
            },
        };
        let network = Network { addr, prefix };
        let base = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if base != addr {
            return Err(format!(
                "{text:?} has host bits set (did you mean \"{base}/{prefix}\"?)"
            ));
        }
        Ok(network)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What an address is, for deciding whether the node may connect there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    Public,
    /// A private range: allowed only when a configured network holds it.
    Private,
    /// Never: the reason names the range.
    Denied(&'static str),
}

/// The IPv4 address an IPv6 address carries (IPv4-mapped `::ffff:a.b.c.d`, NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16`), or the address itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let from = |high: u16, low: u16| {
        Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
    };
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(from(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(from(s[1], s[2]));
    }
    None
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(100, 100, 100, 200) {
        return AddressClass::Denied("a cloud metadata address");
    }
    match (a, b, c) {
        (0, _, _) => AddressClass::Denied("\"this network\" (0.0.0.0/8)"),
        (127, _, _) => AddressClass::Loopback,
        (169, 254, _) => AddressClass::Denied("link-local (169.254.0.0/16, cloud metadata)"),
        (10, _, _) | (192, 168, _) => AddressClass::Private,
        (172, 16..=31, _) | (100, 64..=127, _) | (198, 18..=19, _) => AddressClass::Private,
        (192, 0, 0) => AddressClass::Denied("reserved (192.0.0.0/24)"),
        (224..=239, _, _) => AddressClass::Denied("multicast"),
        (240..=255, _, _) => AddressClass::Denied("reserved (240.0.0.0/4, broadcast)"),
        _ => AddressClass::Public,
    }
}

/// The class of `ip` (an IPv6 address carrying an IPv4 address is classified as that).
pub fn classify(ip: IpAddr) -> AddressClass {
    let v6 = match canonical(ip) {
        IpAddr::V4(v4) => return classify_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    let first = v6.segments()[0];
    if v6 == Ipv6Addr::LOCALHOST {
        AddressClass::Loopback
    } else if v6 == Ipv6Addr::UNSPECIFIED {
        AddressClass::Denied("unspecified (::)")
    } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        AddressClass::Denied("a cloud metadata address")
    } else if first & 0xffc0 == 0xfe80 {
        AddressClass::Denied("link-local (fe80::/10)")
    } else if first & 0xff00 == 0xff00 {
        AddressClass::Denied("multicast")
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
        AddressClass::Private
    } else if v6.segments()[..6] == [0; 6] {
        // The deprecated IPv4-compatible form (::a.b.c.d) and the rest of ::/96.
        AddressClass::Denied("reserved (::/96)")
    } else {
        AddressClass::Public
    }
}

/// Why the node will not connect to an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressRefusal {
    #[error("{addr} is {why}: never allowed")]
    Denied { addr: IpAddr, why: &'static str },
    #[error(
        "{addr} is a private address: not allowed unless a network in [node] registry_private_networks holds it"
    )]
    Private { addr: IpAddr },
}

/// The addresses a registered endpoint may have: loopback and public ones, and private ones in
/// the configured networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    pub private_networks: Vec<Network>,
}

impl AddressPolicy {
    pub fn check(&self, ip: IpAddr) -> Result<AddressClass, AddressRefusal> {
        match classify(ip) {
            AddressClass::Denied(why) => Err(AddressRefusal::Denied { addr: ip, why }),
            AddressClass::Private if !self.private_networks.iter().any(|n| n.contains(ip)) => {
                Err(AddressRefusal::Private { addr: ip })
            }
            class => Ok(class),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn urls_are_taken_apart_and_published_without_secrets() {
        let url = HttpUrl::parse("http://user:pw@Search.Example:8080/mcp?token=abc#frag").unwrap();
        assert_eq!(url.host, Host::Name("search.example".into()));
        assert_eq!(url.port, 8080);
        assert_eq!(url.path, "/mcp");
        assert_eq!(url.query.as_deref(), Some("token=abc"));
        assert_eq!(url.public(), "http://search.example:8080/mcp");
        assert_eq!(
            url.pinned(ip("10.0.0.7")),
            "http://user:pw@10.0.0.7:8080/mcp?token=abc"
        );
        let v6 = HttpUrl::parse("https://[::1]/mcp").unwrap();
        assert_eq!((v6.host.clone(), v6.port), (Host::Ip(ip("::1")), 443));
        assert_eq!(v6.public(), "https://[::1]/mcp");
        let bare = HttpUrl::parse("http://x").unwrap();
        assert_eq!((bare.path.as_str(), bare.port), ("/", 80));
        assert_eq!(bare.pinned(ip("::1")), "http://[::1]/");
        assert_eq!(
            HttpUrl::parse("http://x?a=1").unwrap().public(),
            "http://x/"
        );
        for bad in [
            "ftp://x",
            "http://",
            "http://:80/",
            "http://x:0/",
            "http://x:99999/",
            "http://[::1/",
            "http://a b/",
            "http://ex%61mple.com/",
            "http://[zz]/",
            // Read by HTTP clients as host 0.0.0.0 (`\` is `/`), while the part after `@`
            // names another host: the checked host must be the connected one.
            "http://0.0.0.0:18901\\latest\\meta-data\\@127.0.0.1:18902/..",
            "http://169.254.169.254\\@example.com/",
            "http://127.0.0.1%2e/",
            "http://a%40b@example.com/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            public_url("postgres://app:secret@db:5432/main?sslmode=require"),
            "postgres://db:5432/main"
        );
        assert_eq!(
            program_name("/usr/local/bin/concord-fixture"),
            "concord-fixture"
        );
        assert_eq!(program_name("npx"), "npx");
    }

    #[test]
    fn addresses_are_classified_including_those_inside_ipv6() {
        for (text, class) in [
            ("127.0.0.1", AddressClass::Loopback),
            ("127.8.9.10", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("8.8.8.8", AddressClass::Public),
            ("2606:4700::1111", AddressClass::Public),
            ("10.1.2.3", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("172.31.255.255", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::Private),
            ("fd12::1", AddressClass::Private),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("64:ff9b::a00:1", AddressClass::Private),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
        ] {
            assert_eq!(classify(ip(text)), class, "{text}");
        }
        assert_eq!(classify(ip("172.32.0.1")), AddressClass::Public);
        for denied in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::169.254.169.254",
        ] {
            assert!(
                matches!(classify(ip(denied)), AddressClass::Denied(_)),
                "{denied}"
            );
        }
    }

    #[test]
    fn private_ranges_need_a_configured_network_and_denied_ones_never_pass() {
        let closed = AddressPolicy::default();
        assert!(matches!(
            closed.check(ip("10.0.0.5")),
            Err(AddressRefusal::Private { .. })
        ));
        assert_eq!(closed.check(ip("127.0.0.1")), Ok(AddressClass::Loopback));
        let open = AddressPolicy {
            private_networks: vec!["10.0.0.0/8".parse().unwrap(), "0.0.0.0/0".parse().unwrap()],
        };
        assert_eq!(open.check(ip("10.0.0.5")), Ok(AddressClass::Private));
        assert_eq!(open.check(ip("::ffff:10.0.0.5")), Ok(AddressClass::Private));
        assert!(matches!(
            open.check(ip("169.254.169.254")),
            Err(AddressRefusal::Denied { .. })
        ));
        let narrow = AddressPolicy {
            private_networks: vec!["10.1.0.0/16".parse().unwrap()],
        };
        assert!(narrow.check(ip("10.1.200.3")).is_ok());
        assert!(narrow.check(ip("10.2.0.1")).is_err());
    }

    #[test]
    fn networks_parse_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Network>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "fd00::1".parse::<Network>().unwrap().to_string(),
            "fd00::1/128"
        );
        assert!(
            "10.0.0.1/8"
                .parse::<Network>()
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("ten/8".parse::<Network>().is_err());
        let all: Network = "::/0".parse().unwrap();
        assert!(all.contains(ip("2001:db8::1")));
        assert!(!all.contains(ip("10.0.0.1")));
    }
}
