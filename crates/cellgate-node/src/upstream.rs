//! The upstream HTTP client: pooled, HTTP/1.1 and HTTP/2 (ALPN), TLS verified against the system
//! roots plus `--upstream-ca`, SNI preserved, and addresses resolved by the node itself
//! (`--resolve` first, then the system resolver), never the address the agent dialled.

use std::future::Future;
use std::net::SocketAddr;
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

/// Connects to the node-resolved address of a URI's host and port.
#[derive(Debug, Clone)]
pub struct ResolvingConnector {
    resolve: Arc<Vec<ResolveEntry>>,
    connect_timeout: Duration,
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
        let addrs = resolve(&self.resolve, &host, port).await?;
        connect_any(&addrs, self.connect_timeout)
            .await
            .map(TokioIo::new)
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
        Box::pin(self.clone().connect(uri))
    }
}

/// The pooled upstream client.
#[derive(Clone)]
pub struct Upstream {
    /// hyper client over the resolving, TLS-verifying connector (ALPN h2 and http/1.1).
    pub client: Client<HttpsConnector<ResolvingConnector>, Incoming>,
    /// The same, HTTP/1.1 only: upgrades (WebSocket) exist only there.
    pub http1: Client<HttpsConnector<ResolvingConnector>, Incoming>,
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
        let connector = ResolvingConnector {
            resolve: Arc::new(config.resolve.clone()),
            connect_timeout: config.connect_timeout,
        };
        let both = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector.clone());
        let http1_only = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let build = |c| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(64)
                .build(c)
        };
        Ok(Self {
            client: build(both),
            http1: build(http1_only),
        })
    }
}

/// A stable label for an upstream failure (for the 502 body, the audit record and metrics).
pub fn classify(err: &(dyn std::error::Error + 'static)) -> &'static str {
    if let Some(label) = cellgate_tls::upstream::classify_error(err) {
        return label;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::NotFound => "upstream_resolve_failed",
                std::io::ErrorKind::TimedOut => "upstream_timeout",
                std::io::ErrorKind::ConnectionRefused => "upstream_connect_refused",
                _ => "upstream_connect_failed",
            };
        }
        cur = e.source();
    }
    "upstream_error"
}
