//! The upstream HTTP client: pooled, HTTP/1.1 and HTTP/2 (ALPN), TLS verified against the system
//! roots plus `--upstream-ca`, SNI preserved, and addresses resolved by the node itself
//! (`--resolve` first, then the system resolver), never the address the agent dialled.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{NodeConfig, ResolveEntry};
use crate::reason::Reason;

/// Connects to the node-resolved address of a URI's host and port.
#[derive(Debug, Clone)]
pub struct ResolvingConnector {
    resolve: Arc<Vec<ResolveEntry>>,
    connect_timeout: Duration,
    /// Whether resolved addresses inside the node's own reach are refused ([`forbidden`]).
    filter: bool,
}

/// The label of a refused resolved address (audit, metrics, the agent's 403).
pub const DESTINATION_FORBIDDEN: &str = "destination_forbidden";

/// Why a resolved address is never connected to, or `None` when it may be: loopback,
/// unspecified, link-local (cloud metadata services live there: 169.254.169.254), the AWS IPv6
/// metadata address `fd00:ec2::254`, multicast and broadcast. The node's own other addresses
/// are refused by [`check_resolved`] before connecting, and on the intake again after
/// connecting ([`refuse_own_address`]).
pub fn forbidden(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address (cloud metadata)"),
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => {
            Some("a multicast or broadcast address")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => {
            Some("a cloud metadata address")
        }
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

/// The error of a refused destination: `PermissionDenied` carrying [`DESTINATION_FORBIDDEN`].
fn forbidden_error(host: &str, addr: SocketAddr, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("{DESTINATION_FORBIDDEN}: {host} resolves to {addr}, {why}, which the node never connects to for a name"),
    )
}

/// Resolves `host:port` and, with `filter`, refuses addresses in the node's own reach
/// ([`forbidden`]). Addresses pinned with `--resolve` are the operator's and pass, and so does
/// a host that is an address (policy decided on that very address). Returns the addresses and
/// whether they were filtered.
///
/// # Errors
/// When the name does not resolve, or (filtered) resolves to a forbidden address.
pub async fn resolve_checked(
    static_entries: &[ResolveEntry],
    host: &str,
    port: u16,
    filter: bool,
) -> std::io::Result<(Vec<SocketAddr>, bool)> {
    if let Some(ip) = crate::config::lookup_static(static_entries, host, port) {
        return Ok((vec![SocketAddr::new(ip, port)], false));
    }
    // An address is not a name: the decision was made on it (an address capability names it).
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok((vec![SocketAddr::new(ip, port)], false));
    }
    let addrs = resolve(&[], host, port).await?;
    if filter {
        check_resolved(host, &addrs, own_addresses())?;
    }
    Ok((addrs, filter))
}

/// Refuses a name whose answers hold a forbidden address ([`forbidden`]) or one of the node's
/// own ([`OwnAddresses`]). One such answer refuses the name: an attacker-controlled zone could
/// mix them. The own-address check runs before connecting, for both front doors: in Envoy mode
/// Envoy dials the pinned address, so the node's check after connecting could not cover it.
///
/// # Errors
/// `PermissionDenied` carrying [`DESTINATION_FORBIDDEN`], naming the address and why.
pub fn check_resolved(host: &str, addrs: &[SocketAddr], own: &OwnAddresses) -> std::io::Result<()> {
    if let Some((a, why)) = addrs.iter().find_map(|a| forbidden(a.ip()).map(|w| (a, w))) {
        return Err(forbidden_error(host, *a, why));
    }
    if let Some(a) = addrs.iter().find(|a| own.contains(a.ip())) {
        return Err(forbidden_error(host, *a, "one of the node's own addresses"));
    }
    Ok(())
}

/// How long an answer of [`OwnAddresses::contains`] is reused.
const OWN_ADDRESS_TTL: Duration = Duration::from_secs(5);
/// Most addresses [`OwnAddresses`] remembers; past it the memory starts again.
const OWN_ADDRESS_CACHE: usize = 4096;

/// Which addresses are this host's own, found by asking the kernel: binding a socket to an
/// address succeeds only when the host holds it (with `net.ipv4.ip_nonlocal_bind` or
/// `net.ipv6.ip_nonlocal_bind` set it succeeds for every address, and every name is then refused:
/// closed, not open). Answers are kept for [`OWN_ADDRESS_TTL`], so an address added to or
/// removed from the host is seen within seconds, at the cost of one `bind` per address and period.
#[derive(Debug, Default)]
pub struct OwnAddresses {
    seen: std::sync::Mutex<HashMap<IpAddr, (bool, std::time::Instant)>>,
}

impl OwnAddresses {
    /// Whether `ip` is one of this host's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let now = std::time::Instant::now();
        if let Ok(seen) = self.seen.lock() {
            if let Some((own, at)) = seen.get(&ip) {
                if now.duration_since(*at) < OWN_ADDRESS_TTL {
                    return *own;
                }
            }
        }
        let own = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok();
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() >= OWN_ADDRESS_CACHE {
                seen.clear();
            }
            seen.insert(ip, (own, now));
        }
        own
    }
}

/// The process's [`OwnAddresses`].
pub fn own_addresses() -> &'static OwnAddresses {
    static OWN: std::sync::OnceLock<OwnAddresses> = std::sync::OnceLock::new();
    OWN.get_or_init(OwnAddresses::default)
}

impl ResolvingConnector {
    async fn connect(self, uri: Uri) -> std::io::Result<TokioIo<TcpStream>> {
        let host = uri
            .host()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no host in the upstream URI",
                )
            })?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let (addrs, filtered) = resolve_checked(&self.resolve, &host, port, self.filter).await?;
        let stream = connect_any(&addrs, self.connect_timeout).await?;
        if filtered {
            refuse_own_address(&stream, &host)?;
        }
        Ok(TokioIo::new(stream))
    }
}

/// Resolves `host:port` the node's way: `--resolve` first, then the system resolver. The address
/// an agent dialled is never used for a host decision.
///
/// # Errors
/// When the name does not resolve.
pub async fn resolve(
    static_entries: &[ResolveEntry],
    host: &str,
    port: u16,
) -> std::io::Result<Vec<SocketAddr>> {
    if let Some(ip) = crate::config::lookup_static(static_entries, host, port) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
    }
    Ok(addrs)
}

/// Refuses a connection that reached one of the node's own addresses (the kernel then picks
/// the same address as the source): its admin port or anything else listening on the node.
///
/// # Errors
/// `PermissionDenied` ([`DESTINATION_FORBIDDEN`]) for such a connection.
pub fn refuse_own_address(stream: &TcpStream, host: &str) -> std::io::Result<()> {
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    if local.ip().to_canonical() == peer.ip().to_canonical() {
        return Err(forbidden_error(
            host,
            peer,
            "one of the node's own addresses",
        ));
    }
    Ok(())
}

/// Connects to the first address that answers, each within `timeout`.
///
/// # Errors
/// The last connection error, or a timeout.
pub async fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {a} timed out"),
                )
            }
        }
    }
    Err(last)
}

impl tower_service::Service<Uri> for ResolvingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // A traced request that needs a new connection gets its timing: the connector is
        // called from the request's own task when no pooled connection is free.
        let trace = CONNECT_TRACE.try_with(Arc::clone).ok();
        let this = self.clone();
        Box::pin(async move {
            let start = std::time::SystemTime::now();
            let r = this.connect(uri).await;
            if let Some(t) = trace {
                if let Ok(mut slot) = t.lock() {
                    *slot = Some(ConnectTiming {
                        start,
                        end: std::time::SystemTime::now(),
                        peer: r.as_ref().ok().and_then(|s| s.inner().peer_addr().ok()),
                        error: r.as_ref().err().map(ToString::to_string),
                    });
                }
            }
            r
        })
    }
}

/// How a new upstream connection went, for the request's span.
#[derive(Debug, Clone)]
pub struct ConnectTiming {
    /// Before resolving.
    pub start: std::time::SystemTime,
    /// After the TCP connection was made (or failed).
    pub end: std::time::SystemTime,
    /// The address connected to.
    pub peer: Option<SocketAddr>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Where the connector reports a connection it opened for a traced request.
pub type ConnectTrace = Arc<std::sync::Mutex<Option<ConnectTiming>>>;

tokio::task_local! {
    /// Set around a traced request's upstream call ([`ConnectTrace`]).
    pub static CONNECT_TRACE: ConnectTrace;
}

/// A request body sent upstream: streamed from the agent, or read (in part or whole) before the
/// decision and sent on as it was ([`crate::inspect`]: a body a capability inspects, or one
/// bound to an approval, which must be exactly the one approved).
pub type UpBody = http_body_util::Either<Incoming, crate::inspect::ReadBody>;

type HttpClient = Client<HttpsConnector<ResolvingConnector>, UpBody>;

/// The pooled upstream clients: resolved addresses filtered ([`forbidden`]) by default, and
/// unfiltered for capabilities with `allowInternalAddresses` (separate pools, so a connection
/// made for one never serves the other).
#[derive(Clone)]
pub struct Upstream {
    /// hyper client over the resolving, TLS-verifying connector (ALPN h2 and http/1.1).
    pub client: HttpClient,
    /// The same, HTTP/1.1 only: upgrades (WebSocket) exist only there.
    pub http1: HttpClient,
    /// `client` without the address filter.
    pub client_internal: HttpClient,
    /// `http1` without the address filter.
    pub http1_internal: HttpClient,
}

impl Upstream {
    /// The client for a request: HTTP/1.1 only for an upgrade; unfiltered when the capability
    /// allows internal addresses.
    pub fn pick(&self, upgrade: bool, internal: bool) -> &HttpClient {
        match (upgrade, internal) {
            (false, false) => &self.client,
            (true, false) => &self.http1,
            (false, true) => &self.client_internal,
            (true, true) => &self.http1_internal,
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

impl Upstream {
    /// Builds the client from the configuration.
    ///
    /// # Errors
    /// When no trust roots can be loaded or an `--upstream-ca` file is unusable.
    pub fn new(config: &NodeConfig) -> anyhow::Result<Self> {
        let tls = cellgate_tls::upstream::client_config(&config.upstream_ca, true)?;
        // The connector sets ALPN itself (h2, http/1.1) from the enabled versions.
        let mut tls = (*tls).clone();
        tls.alpn_protocols.clear();
        let resolve = Arc::new(config.resolve.clone());
        let build = |filter: bool, http1_only: bool| {
            let connector = ResolvingConnector {
                resolve: resolve.clone(),
                connect_timeout: config.connect_timeout,
                filter,
            };
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            let connector = if http1_only {
                builder.enable_http1().wrap_connector(connector)
            } else {
                builder.enable_all_versions().wrap_connector(connector)
            };
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(64)
                .build(connector)
        };
        Ok(Self {
            client: build(true, false),
            http1: build(true, true),
            client_internal: build(false, false),
            http1_internal: build(false, true),
        })
    }
}

/// Why an upstream could not be reached (for the 502 body, the audit record and metrics), or
/// `destination_forbidden` for an address the node never connects to for a name.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> Reason {
    if let Some(label) = cellgate_tls::upstream::classify_error(err) {
        return Reason::from_label(label);
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::PermissionDenied
                    if io.to_string().starts_with(DESTINATION_FORBIDDEN) =>
                {
                    Reason::DestinationForbidden
                }
                std::io::ErrorKind::NotFound => Reason::UpstreamResolveFailed,
                std::io::ErrorKind::TimedOut => Reason::UpstreamTimeout,
                std::io::ErrorKind::ConnectionRefused => Reason::UpstreamConnectRefused,
                _ => Reason::UpstreamConnectFailed,
            };
        }
        cur = e.source();
    }
    Reason::UpstreamError
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's global addresses, as `ip` lists them.
    fn global_addresses() -> Vec<IpAddr> {
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "scope", "global"])
            .output()
            .expect("ip (iproute2) is installed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }

    #[test]
    fn the_hosts_own_addresses_are_recognized_and_others_are_not() {
        let own = OwnAddresses::default();
        assert!(own.contains("127.0.0.1".parse().unwrap()));
        assert!(own.contains("::ffff:127.0.0.1".parse().unwrap()));
        // Documentation ranges no host here holds.
        assert!(!own.contains("203.0.113.77".parse().unwrap()));
        assert!(!own.contains("2001:db8::77".parse().unwrap()));
        let global = global_addresses();
        assert!(
            !global.is_empty(),
            "this host has no global address to check against (ip -o addr show scope global)"
        );
        for ip in global {
            assert!(
                own.contains(ip),
                "{ip} is this host's and was not recognized"
            );
            // Remembered: the same answer without asking the kernel again.
            assert!(own.contains(ip));
        }
    }

    #[test]
    fn answers_holding_one_of_the_nodes_own_addresses_refuse_the_name() {
        let own = OwnAddresses::default();
        let outside: SocketAddr = "203.0.113.9:443".parse().unwrap();
        assert!(check_resolved("api.example", &[outside], &own).is_ok());
        let global = global_addresses();
        assert!(!global.is_empty(), "this host has no global address");
        for ip in global {
            let mine = SocketAddr::new(ip, 443);
            // Alone, or mixed with an outside answer: refused.
            for answers in [vec![mine], vec![outside, mine]] {
                let err = check_resolved("evil.example", &answers, &own).unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
                let text = err.to_string();
                assert!(text.contains(DESTINATION_FORBIDDEN), "{text}");
                assert!(text.contains("one of the node's own addresses"), "{text}");
                assert!(text.contains(&ip.to_string()), "{text}");
            }
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_the_nodes_own_address_is_refused_before_connecting() {
        // `localhost` resolves through the system resolver; whatever the host's files say, it is
        // the node's own (loopback): refused, and with the own-address reason when the loopback
        // filter is not what caught it.
        let err = resolve_checked(&[], "localhost", 80, true)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains(DESTINATION_FORBIDDEN), "{err}");
        // Unfiltered (a capability allowing internal addresses), it resolves.
        let (addrs, filtered) = resolve_checked(&[], "localhost", 80, false).await.unwrap();
        assert!(!filtered && !addrs.is_empty());
    }
}
