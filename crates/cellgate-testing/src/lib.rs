//! Test support shared by Cellgate's integration tests: a test PKI for upstream servers
//! ([`TestPki`]), a real HTTP and HTTPS upstream that records every request it receives
//! ([`Upstream`]), a client that opens tagged connections to a node ([`tagged_connect`]), and
//! an OTLP receiver built from the opentelemetry-proto definitions ([`otlp::OtlpReceiver`]).
//!
//! Everything speaks the real protocols over real sockets; nothing here is a mock of Cellgate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod otlp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CA for test upstream servers (not Cellgate's interception CA).
pub struct TestPki {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestPki")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    /// A fresh CA.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Cellgate test upstream CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/upstream-ca.pem`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let p = dir.join("upstream-ca.pem");
        std::fs::write(&p, self.ca_pem()).unwrap();
        p
    }

    /// A certificate and key for `names`, signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone(), self.issuer.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A rustls server config for `names` offering `alpn`.
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let (chain, key) = self.leaf(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A self-signed server config that no one trusts (for invalid-certificate tests).
    pub fn untrusted_server_config(names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Arc::new(cfg)
    }
}

/// What an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// HTTP version, e.g. `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    /// Headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Body bytes received.
    pub body: Vec<u8>,
    /// The request target's authority (HTTP/2 `:authority`), when there was one.
    pub authority: Option<String>,
}

impl Seen {
    /// The host the request named: its `Host` header, or its `:authority` on HTTP/2.
    pub fn host(&self) -> Option<&str> {
        self.header("host").or(self.authority.as_deref())
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// A real HTTP(S) server that records every request.
///
/// Routes: `/sse` streams three server-sent events 300 ms apart (`…/sse-long`: sixty); a path
/// ending in `/slow` is answered after 2 s; `…/echo` sends the `authorization` header back (in a
/// header and the body), `…/echo-sse` in an SSE stream three bytes a chunk; `/ws` answers a WebSocket
/// upgrade with 101 then echoes raw bytes; `/status/N` answers N; anything else answers 200 with
/// a JSON description of the request. Request bodies are read whole and recorded.
#[derive(Debug)]
pub struct Upstream {
    /// Bound address.
    pub addr: SocketAddr,
    /// Requests received, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Raw TCP connections accepted.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Starts a server on `127.0.0.1:0`, with TLS when `tls` is given.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tls).await
    }

    /// Starts a server on `addr`.
    pub async fn start_on(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(seen.clone(), req));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(cfg) => {
                            let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                            else {
                                return;
                            };
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                                .await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            task,
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    seen: Arc<Mutex<Vec<Seen>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = if upgrade {
        Vec::new()
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default()
    };
    let record = Seen {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body,
        authority: parts.uri.authority().map(|a| a.to_string()),
    };
    seen.lock().unwrap().push(record.clone());
    let path = parts.uri.path();
    if path == "/ws" {
        if let Some(on) = on_upgrade {
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert(http::header::UPGRADE, "websocket".parse().unwrap());
            r.headers_mut()
                .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
            return Ok(r);
        }
    }
    // Any path ending in `/echo`: the request's `authorization` header sent back, in a response
    // header and in a JSON body; `/echo-sse`: in an SSE stream, three bytes per chunk.
    let auth = record.header("authorization").unwrap_or("").to_string();
    if path.ends_with("/echo") {
        let body =
            serde_json::json!({"you_sent": auth, "body": String::from_utf8_lossy(&record.body)})
                .to_string();
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        if let Ok(v) = http::HeaderValue::from_str(&auth) {
            r.headers_mut().insert("x-echo-authorization", v);
        }
        return Ok(r);
    }
    if path.ends_with("/echo-sse") {
        let text = format!("data: {auth}\n\n").into_bytes();
        let chunks: Vec<Bytes> = text.chunks(3).map(Bytes::copy_from_slice).collect();
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Infallible>(Frame::data(c))),
        );
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "text/event-stream".parse().unwrap(),
        );
        return Ok(r);
    }
    // Any path ending in `/slow`: the answer comes after 2 s (a decision can change meanwhile).
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // `/sse`: three events; any path ending in `/sse-long`: sixty (18 s), for streams that
    // must be cut while they flow.
    let events = if path.ends_with("/sse-long") { 60 } else { 3 };
    if path == "/sse" || path.ends_with("/sse-long") {
        let stream = futures_util::stream::unfold(0u32, move |i| async move {
            if i >= events {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: event {i}\n\n")))),
                i + 1,
            ))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "text/event-stream".parse().unwrap(),
        );
        return Ok(r);
    }
    // LLM-provider shapes for usage metering: 1000 input and 500 output tokens of `gpt-4o`
    // (`claude-sonnet-4-20250514` for Anthropic) per response.
    if let Some(kind) = path.strip_prefix("/llm/") {
        let (ct, chunks): (&str, Vec<String>) = match kind {
            "openai/chat" => ("application/json", vec![r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500}}"#.into()]),
            "openai/stream" => ("text/event-stream", vec![
                "data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}],\"usage\":null}\n\n".into(),
                "data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":500,\"total_tokens\":1500}}\n\n".into(),
                "data: [DONE]\n\n".into(),
            ]),
            "openai/stream-without-usage" => ("text/event-stream", vec![
                "data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n".into(),
                "data: [DONE]\n\n".into(),
            ]),
            "anthropic/stream" => ("text/event-stream", vec![
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-20250514\",\"usage\":{\"input_tokens\":1000,\"output_tokens\":1}}}\n\n".into(),
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":500}}\n\n".into(),
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
            ]),
            _ => ("application/json", vec!["{\"object\":\"list\",\"data\":[]}".into()]),
        };
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c)))),
        );
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        return Ok(r);
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        let mut r = Response::new(Full::new(Bytes::from_static(b"status\n")).boxed());
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        return Ok(r);
    }
    let body = serde_json::json!({
        "method": record.method, "uri": record.uri, "version": record.version,
        "host": record.host(), "body_len": record.body.len(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    Ok(r)
}

/// Opens a connection to a node's intake and writes a PPv2 header with `token`.
pub async fn tagged_connect(
    node: SocketAddr,
    source: SocketAddr,
    destination: SocketAddr,
    token: &str,
) -> TcpStream {
    let mut s = TcpStream::connect(node).await.unwrap();
    let header = cellgate_proxy_protocol::encode(source, destination, token).unwrap();
    s.write_all(&header).await.unwrap();
    s
}

/// Reads everything until EOF or `timeout`, whichever first.
pub async fn read_to_end_timeout(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut buf)).await;
    buf
}

/// A rustls client config trusting exactly the PEM certificates in `ca_pem`, with `alpn`.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        let c: CertificateDer<'static> = c.unwrap();
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}
