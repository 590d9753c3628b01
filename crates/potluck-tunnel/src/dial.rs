//! Dialing the hub: TCP with `TCP_NODELAY`, then TLS (rustls, webpki roots) for `https`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use url::Url;

/// How long a TCP connect plus TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A bidirectional byte stream (TCP or TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// A validated hub base URL: `http` or `https`, with a host, no query. It may be pinned
/// to one of its host's addresses ([`HubUrl::pinned`]): it then dials that address and
/// still names the host for TLS and `Host:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    url: Url,
    addr: Option<SocketAddr>,
}

/// Why dialing failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URL is not usable.
    #[error("invalid hub URL: {0}")]
    BadUrl(String),
    /// TCP or TLS failed.
    #[error("cannot reach {addr}")]
    Connect {
        /// host:port
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Connect or TLS handshake took longer than [`CONNECT_TIMEOUT`].
    #[error("timed out connecting to {0}")]
    Timeout(String),
}

impl HubUrl {
    /// Parse and check a hub URL.
    pub fn parse(s: &str) -> Result<Self, DialError> {
        let url = Url::parse(s).map_err(|e| DialError::BadUrl(format!("{s:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DialError::BadUrl(format!(
                "{s:?}: the scheme must be http or https"
            )));
        }
        if url.host_str().is_none() {
            return Err(DialError::BadUrl(format!("{s:?}: no host")));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(DialError::BadUrl(format!(
                "{s:?}: no query or fragment allowed"
            )));
        }
        Ok(Self { url, addr: None })
    }

    /// The same hub, dialed at `addr` (one of the addresses its name resolves to); TLS
    /// and `Host:` keep the name.
    pub fn pinned(&self, addr: SocketAddr) -> Self {
        Self {
            url: self.url.clone(),
            addr: Some(addr),
        }
    }

    /// The address this URL is pinned to, if any.
    pub fn pinned_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The tunnels to open to this hub: one per address when its name resolves now to
    /// several of one family ([`spread`]), each pinned; else this URL itself (resolved
    /// again at each connect, trying every address). At most `max`.
    pub async fn tunnel_targets(&self, max: usize) -> Vec<HubUrl> {
        if self.addr.is_some() {
            return vec![self.clone()];
        }
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((self.host(), self.port())).await
        {
            Ok(a) => a.collect(),
            Err(_) => Vec::new(),
        };
        let spread = spread(&addrs, max);
        if spread.len() < 2 {
            return vec![self.clone()];
        }
        spread.into_iter().map(|a| self.pinned(a)).collect()
    }

    /// Whether TLS is used.
    pub fn is_tls(&self) -> bool {
        self.url.scheme() == "https"
    }

    /// Whether the hub is this machine: `localhost`, or a loopback address.
    pub fn is_loopback(&self) -> bool {
        match self.url.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
    }

    /// Whether the provider token would cross a network in clear: `http` to a hub that
    /// is not this machine. The agent refuses such a hub unless told `insecure`.
    pub fn is_clear_text_remote(&self) -> bool {
        !self.is_tls() && !self.is_loopback()
    }

    /// Host name (for SNI and `Host:`).
    pub fn host(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }

    /// Port, defaulted from the scheme.
    pub fn port(&self) -> u16 {
        self.url.port_or_known_default().unwrap_or(80)
    }

    /// `host:port` for `Host:` headers.
    pub fn authority(&self) -> String {
        match self.url.port() {
            Some(p) => format!("{}:{p}", self.host()),
            None => self.host().to_owned(),
        }
    }

    /// Join a path (starting with `/`) below the base URL's path.
    pub fn path(&self, p: &str) -> String {
        format!("{}{p}", self.url.path().trim_end_matches('/'))
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }
}

impl std::fmt::Display for HubUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.url.as_str().trim_end_matches('/'))?;
        match self.addr {
            Some(a) => write!(f, " ({a})"),
            None => Ok(()),
        }
    }
}

/// The addresses that get a tunnel each: those of the family of the first (the
/// resolver's preferred), deduplicated, at most `max`. Only one family, so that a single
/// server with an IPv4 and an IPv6 address (or `localhost` as `::1` and `127.0.0.1`) is
/// not taken for two hubs; with fewer than two, the caller dials the name as usual.
pub fn spread(addrs: &[SocketAddr], max: usize) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addrs.iter().filter(|a| a.is_ipv4() == first.is_ipv4()) {
        if out.len() >= max {
            break;
        }
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    // The ring provider supports the default versions; this cannot fail in practice.
    Arc::new(cfg.unwrap_or_else(|_| {
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }))
}

/// Resolve and connect, trying each address in turn (only the pinned one if any). Takes
/// an owned name so that the future stays `Send` for every lifetime (it is boxed as a
/// `dyn Future + Send`).
async fn connect_tcp(addr: String, pinned: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let addrs: Vec<SocketAddr> = match pinned {
        Some(a) => vec![a],
        None => tokio::net::lookup_host(addr).await?.collect(),
    };
    for sa in addrs {
        match TcpStream::connect(sa).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Open a byte stream to the hub: TCP (`TCP_NODELAY` on), plus TLS for `https`.
pub fn dial(
    hub: &HubUrl,
) -> impl std::future::Future<Output = Result<BoxIo, DialError>> + Send + 'static {
    let addr = match hub.addr {
        Some(a) => a.to_string(),
        None => format!("{}:{}", hub.host(), hub.port()),
    };
    let fut = connect(
        addr.clone(),
        hub.addr,
        hub.is_tls().then(|| hub.host().to_owned()),
    );
    async move {
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| DialError::Timeout(addr))?
    }
}

async fn connect(
    addr: String,
    pinned: Option<SocketAddr>,
    tls_name: Option<String>,
) -> Result<BoxIo, DialError> {
    let tcp = match connect_tcp(addr.clone(), pinned).await {
        Ok(t) => t,
        Err(source) => return Err(DialError::Connect { addr, source }),
    };
    if let Err(source) = tcp.set_nodelay(true) {
        return Err(DialError::Connect { addr, source });
    }
    let Some(name) = tls_name else {
        return Ok(Box::new(tcp));
    };
    let server_name = match rustls::pki_types::ServerName::try_from(name.clone()) {
        Ok(n) => n,
        Err(e) => return Err(DialError::BadUrl(format!("{name}: {e}"))),
    };
    match tokio_rustls::TlsConnector::from(tls_config())
        .connect(server_name, tcp)
        .await
    {
        Ok(tls) => Ok(Box::new(tls)),
        Err(source) => Err(DialError::Connect { addr, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HubUrl::parse("https://hub.example.org/base/").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.port(), 443);
        assert_eq!(u.path("/v1/tunnel"), "/base/v1/tunnel");
        let u = HubUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(u.authority(), "127.0.0.1:8080");
        assert_eq!(u.path("/v1/tunnel"), "/v1/tunnel");
        assert!(HubUrl::parse("ftp://x").is_err());
        assert!(HubUrl::parse("http://x/?a=1").is_err());
        assert!(HubUrl::parse("nonsense").is_err());
    }

    /// A pinned URL dials its address but keeps the name for TLS and `Host:`; the
    /// name's other addresses are not tried.
    #[tokio::test]
    async fn pinned_dials_its_address_and_keeps_the_name() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let there = l.local_addr().unwrap();
        let u = HubUrl::parse("http://localhost:1/base")
            .unwrap()
            .pinned(there);
        assert_eq!(u.authority(), "localhost:1");
        assert_eq!(u.host(), "localhost");
        assert_eq!(u.pinned_addr(), Some(there));
        assert!(u.to_string().contains(&there.to_string()));
        let accepted = tokio::spawn(async move { l.accept().await.map(|_| ()) });
        dial(&u)
            .await
            .expect("dialed the pinned address, not port 1");
        accepted.await.unwrap().unwrap();
        // A literal address is one tunnel, the URL itself.
        let one = HubUrl::parse("http://127.0.0.1:9").unwrap();
        assert_eq!(one.tunnel_targets(8).await, vec![one.clone()]);
    }

    /// Several addresses of one family: one tunnel each (deduplicated, capped); a name
    /// with one address per family is one server, dialed by name.
    #[test]
    fn spread_takes_one_family() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let v4 = [
            a("10.0.0.1:443"),
            a("10.0.0.2:443"),
            a("10.0.0.1:443"),
            a("10.0.0.3:443"),
        ];
        assert_eq!(
            spread(&v4, 8),
            [a("10.0.0.1:443"), a("10.0.0.2:443"), a("10.0.0.3:443")]
        );
        assert_eq!(spread(&v4, 2).len(), 2);
        let dual = [a("[::1]:80"), a("127.0.0.1:80")];
        assert_eq!(spread(&dual, 8), [a("[::1]:80")]);
        let mixed = [a("10.0.0.1:443"), a("[2001:db8::1]:443"), a("10.0.0.2:443")];
        assert_eq!(spread(&mixed, 8), [a("10.0.0.1:443"), a("10.0.0.2:443")]);
        assert!(spread(&[], 8).is_empty());
    }
}
