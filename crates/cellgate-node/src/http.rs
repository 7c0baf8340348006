//! HTTP through the node: each request on a plaintext or intercepted TLS connection is decided on
//! its own (method, host, path), audited, then forwarded with bodies streamed both ways.
//!
//! The node refuses before policy: `CONNECT` (a tunnel would bypass per-request decisions), a
//! request with no host, a Host or `:authority` that disagrees with the TLS SNI (domain fronting)
//! or with itself, and a port that is not the one the agent dialled.
//!
//! A response body stays authorized only as long as its decision holds: every change of cells,
//! policy or revocations re-decides the request of each open response ([`Rechecked`]), and a
//! stream now denied (server-sent events, a long download) is cut and audited with reason
//! `revoked`. The next request on a keep-alive connection is decided anew like any other.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use cellgate_audit::Decision;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::Instrument as _;

use crate::decide::{self, Concluded, ConnIdentity, Facts, Outcome, Reason};
use crate::{tunnel, upstream, usage, Shared};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body: streamed from upstream or a small JSON document.
pub type Body = BoxBody<Bytes, BoxError>;

/// Request headers copied into the policy input (never credentials).
const POLICY_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "user-agent",
    "accept",
    "upgrade",
    "x-request-id",
];
/// Header carrying the request id back to the agent.
pub const REQUEST_ID_HEADER: &str = "x-cellgate-request-id";

#[derive(Debug)]
struct ConnCtx {
    ident: Arc<ConnIdentity>,
    /// SNI of the intercepted TLS connection; `None` for plaintext.
    sni: Option<String>,
}

/// Serves plaintext HTTP (HTTP/1.1, or HTTP/2 with prior knowledge).
pub async fn serve_plain(shared: Arc<Shared>, stream: TcpStream, ident: Arc<ConnIdentity>) {
    serve_http(shared, stream, ConnCtx { ident, sni: None }).await;
}

/// Terminates TLS with a leaf minted for `sni` and serves HTTP inside.
pub async fn serve_intercepted(
    shared: Arc<Shared>,
    stream: TcpStream,
    ident: Arc<ConnIdentity>,
    hello: Vec<u8>,
    sni: String,
    minter: Arc<cellgate_tls::mint::LeafMinter>,
) {
    let config = match minter.server_config(&sni).await {
        Ok(c) => c,
        Err(e) => {
            let facts = Facts {
                protocol: "tls",
                host: Some(sni.clone()),
                sni: Some(sni),
                port: ident.original_dst.port(),
                front_door: "intake",
                ..Facts::default()
            };
            let out = Outcome::deny(Reason::TlsMintFailed, e.to_string(), None);
            let _ = decide::commit(&shared, (&*ident).into(), &facts, &out).await;
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let io = cellgate_tls::client_hello::Rewind::new(hello, stream);
    let tls =
        match tokio::time::timeout(shared.config.first_bytes_timeout, acceptor.accept(io)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                // Usually a client that does not trust the cell's CA; nothing was decided yet.
                tracing::info!(sni = %sni, error = %e, "TLS handshake with the agent failed");
                return;
            }
            Err(_) => return,
        };
    serve_http(
        shared,
        tls,
        ConnCtx {
            ident,
            sni: Some(sni),
        },
    )
    .await;
}

async fn serve_http<S>(shared: Arc<Shared>, io: S, ctx: ConnCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ident = ctx.ident.clone();
    let (tls, sni) = (ctx.sni.is_some(), ctx.sni.clone());
    let ctx = Arc::new(ctx);
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(shared, ctx, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.http_header_timeout)
        .max_buf_size(shared.config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.config.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    let activity = crate::tunnel::Activity::new();
    let io = crate::tunnel::Tracked::new(io, activity.clone());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = shared.draining.subscribe();
    let idle_limit = shared.config.http_idle_timeout;
    let idle = async {
        // An idle HTTP/1.1 keep-alive or HTTP/2 connection holds a slot of its cell: closed
        // once no byte has moved either way for the limit.
        let mut tick = tokio::time::interval(idle_limit / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if activity.idle_for() >= idle_limit {
                return;
            }
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        () = idle => {
            tracing::info!(idle_s = idle_limit.as_secs(), "closing an idle HTTP connection");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.as_mut()).await;
        }
        _ = crate::until_draining(&mut draining) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        // An open connection (HTTP/2 above all, which multiplexes for as long as the agent
        // likes) does not outlive its token: dropping it closes it, and every stream on it.
        () = tokio::time::sleep_until(decide::expiry_deadline(&ident.claims)) => {
            let facts = Facts {
                protocol: if tls { "https" } else { "http" },
                host: sni,
                port: ident.original_dst.port(),
                front_door: "intake",
                ..Facts::default()
            };
            decide::record_expired_close(&shared, &ident, &facts, "HTTP connection").await;
        }
    }
}

/// Splits `host[:port]` (IPv6 in brackets), lowercases and drops a trailing dot.
pub(crate) fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if tail.is_empty() => None,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (a.to_string(), None),
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@' || c == '/') {
        return None;
    }
    Some((host, port))
}

/// A refusal decided before policy: reason label, detail, hint for the agent.
pub(crate) type PreDeny = (Reason, String, Option<String>);

/// The checks both front doors (intake and ext_authz) make of a request's authority: it parses
/// as a host (recorded in `facts.host`), the method is not CONNECT, and the host is the TLS SNI
/// when there is one (domain fronting). Returns the authority's port, if it names one.
pub(crate) fn check_authority(
    authority: &str,
    is_connect: bool,
    sni: Option<&str>,
    facts: &mut Facts,
) -> Result<Option<u16>, PreDeny> {
    let Some((host, port)) = split_authority(authority) else {
        return Err((
            Reason::BadHost,
            format!("{authority:?} is not a host"),
            None,
        ));
    };
    facts.host = Some(host.clone());
    if is_connect {
        return Err((
            Reason::ConnectNotAllowed,
            format!("CONNECT to {authority} refused: tunnels would bypass per-request decisions"),
            Some("send the request directly to the destination; the cell's boundary decides each request".into()),
        ));
    }
    if let Some(sni) = sni {
        if host != sni {
            return Err((
                Reason::SniHostMismatch,
                format!("TLS SNI {sni} but Host {host}: domain fronting is refused"),
                Some("use the same host name for the connection and the request".into()),
            ));
        }
    }
    Ok(port)
}

/// The refusal of a path that has no unambiguous canonical form.
pub(crate) fn path_refusal(e: &cellgate_api::path::PathError) -> PreDeny {
    (
        Reason::from_label(e.reason()),
        e.to_string(),
        Some("send the path in its plain form: no dot segments with parameters, no encoded / or \\, no control characters".into()),
    )
}

/// The one upgrade protocol the node relays (RFC 6455). Every other `Upgrade` (`h2c`, TLS,
/// invented protocols) would turn the connection into a tunnel no request rule sees.
const WEBSOCKET: &str = "websocket";

/// Whether a request's `Upgrade` header (all its values) asks for WebSocket and nothing else:
/// `Ok(false)` without the header, `Ok(true)` for WebSocket, a refusal for anything else.
pub(crate) fn check_upgrade<'a>(
    mut values: impl Iterator<Item = Option<&'a str>>,
) -> Result<bool, PreDeny> {
    let mut any = false;
    for v in values.by_ref() {
        let Some(v) = v else {
            return Err((
                Reason::UpgradeNotAllowed,
                "the Upgrade header is not valid text".into(),
                None,
            ));
        };
        for token in v.split(',').map(str::trim) {
            let name = token.split('/').next().unwrap_or_default();
            if !name.eq_ignore_ascii_case(WEBSOCKET) {
                return Err((
                    Reason::UpgradeNotAllowed,
                    format!("Upgrade {token:?} refused: only WebSocket upgrades are relayed"),
                    Some(
                        "send the request without Upgrade; HTTP/2 is negotiated with TLS ALPN"
                            .into(),
                    ),
                ));
            }
            any = true;
        }
    }
    Ok(any)
}

/// The facts of a request, or the reason the node refuses it before policy.
fn request_facts(ctx: &ConnCtx, req: &Request<Incoming>) -> (Facts, Option<PreDeny>) {
    let tls = ctx.sni.is_some();
    let dst_port = ctx.ident.original_dst.port();
    let mut facts = Facts {
        protocol: if tls { "https" } else { "http" },
        port: dst_port,
        sni: ctx.sni.clone(),
        method: Some(req.method().as_str().to_string()),
        path: None,
        query: req.uri().query().map(str::to_string),
        front_door: "intake",
        headers: BTreeMap::new(),
        ..Facts::default()
    };
    for name in POLICY_HEADERS {
        if let Some(v) = req.headers().get(*name).and_then(|v| v.to_str().ok()) {
            facts
                .headers
                .insert((*name).to_string(), v.chars().take(256).collect());
        }
    }
    let host_header = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().map(str::to_string));
    let uri_auth = req.uri().authority().map(|a| a.as_str().to_string());
    let authority = match (&uri_auth, &host_header) {
        (_, Some(Err(_))) => {
            return (
                facts,
                Some((
                    Reason::BadHost,
                    "the Host header is not valid text".into(),
                    None,
                )),
            )
        }
        (Some(u), Some(Ok(h))) if !u.eq_ignore_ascii_case(h) => {
            return (
                facts,
                Some((
                    Reason::HostMismatch,
                    format!("request target authority {u} disagrees with Host {h}"),
                    None,
                )),
            )
        }
        (Some(u), _) => u.clone(),
        (None, Some(Ok(h))) => h.clone(),
        (None, None) => {
            return (
                facts,
                Some((
                    Reason::MissingHost,
                    "the request names no host".into(),
                    Some("send a Host header".into()),
                )),
            )
        }
    };
    let port = match check_authority(
        &authority,
        req.method() == Method::CONNECT,
        ctx.sni.as_deref(),
        &mut facts,
    ) {
        Ok(port) => port,
        Err(deny) => return (facts, Some(deny)),
    };
    // Decided on, and forwarded as, the path the upstream will serve.
    match cellgate_api::path::canonicalize(req.uri().path()) {
        Ok(p) => facts.path = Some(p.into_owned()),
        Err(e) => {
            facts.path = Some(req.uri().path().chars().take(256).collect());
            return (facts, Some(path_refusal(&e)));
        }
    }
    if let Err(deny) = check_upgrade(
        req.headers()
            .get_all(header::UPGRADE)
            .iter()
            .map(|v| v.to_str().ok()),
    ) {
        return (facts, Some(deny));
    }
    let default_port = if tls { 443 } else { 80 };
    if let Some(p) = port {
        if p != dst_port {
            return (
                facts,
                Some((
                    Reason::AuthorityPortMismatch,
                    format!("Host names port {p} but the connection is to port {dst_port}"),
                    None,
                )),
            );
        }
    } else if default_port != dst_port && uri_auth.is_none() && host_header.is_none() {
        return (
            facts,
            Some((
                Reason::MissingHost,
                "the request names no host".into(),
                None,
            )),
        );
    }
    (facts, None)
}

async fn handle(shared: Arc<Shared>, ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<Body> {
    let ident = &ctx.ident.clone();
    // Subscribed before deciding: a change between the decision and the response is seen.
    let generation = shared.generation.subscribe();
    let (mut facts, pre) = request_facts(&ctx, &req);
    // The request's span, a child of the agent's when it sent `traceparent` (which goes
    // upstream unchanged).
    let otel = shared.tracer.as_ref().map(|t| {
        t.request(
            req.headers(),
            req.method().as_str(),
            facts.host.as_deref().unwrap_or_default(),
            facts.path.as_deref().unwrap_or("/"),
        )
    });
    let started = std::time::SystemTime::now();
    let (parts, incoming) = req.into_parts();
    let mut body = http_body_util::Either::Left(incoming);
    // What was read of the body before deciding: the bytes, and whether there were more.
    let mut read: Option<(Bytes, bool)> = None;
    let out = match pre {
        Some((reason, detail, hint)) => Outcome::deny(reason, detail, hint),
        None => {
            // A capability that could grant this request reads bodies: read to its bound.
            let bound = shared.cells.get(&ident.claims.cell_uid).and_then(|e| {
                let dst = ident.original_dst.ip();
                crate::inspect::bound(&e.cell, facts.host.as_deref(), facts.port, dst)
            });
            match read_body(&mut body, bound).await {
                Ok(r) => {
                    if let Some((head, oversize)) = &r {
                        facts.body_oversize = *oversize;
                        facts.body_read = head.len();
                        facts.json = (!oversize)
                            .then(|| serde_json::from_slice(head).ok())
                            .flatten();
                    }
                    let head = r.as_ref().map(|(h, _)| &h[..]);
                    facts.secrets_of = carried_secrets(&shared, ident, &parts, head);
                    (facts.detected, facts.detectors) =
                        detections(&shared, ident, &parts, &facts, head);
                    read = r;
                    decide::admit(&shared, ident, &facts).await
                }
                Err(e) => Outcome::deny(Reason::BodyUnreadable, e.to_string(), None),
            }
        }
    };
    let mut out = out;
    // The MCP session the request belongs to, in its audit record.
    if out.granting_capability().is_some_and(|c| c.mcp.is_some()) {
        if let Some(s) = parts
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            let s: String = s.chars().take(128).collect();
            out.notes.push(format!("mcp_session={s}"));
        }
    }
    let traced = otel.map(|span| (span, started));
    handle_decided(
        shared, ctx, parts, body, read, facts, out, generation, traced,
    )
    .await
}

/// Shortest injected secret looked for in requests: shorter ones would match by chance.
const MIN_SCANNED_SECRET: usize = 8;

/// The capabilities of the request's cell whose injected secret the request carries, in its
/// URL, a header, or the part of its body that was read.
fn carried_secrets(
    shared: &Shared,
    ident: &ConnIdentity,
    parts: &http::request::Parts,
    body: Option<&[u8]>,
) -> Vec<String> {
    let uid = &ident.claims.cell_uid;
    let has_credentials = shared
        .cells
        .get(uid)
        .is_some_and(|e| e.cell.capabilities.iter().any(|c| c.credential.is_some()));
    if !has_credentials {
        return Vec::new();
    }
    let contains = |hay: &[u8], needle: &[u8]| memchr::memmem::find(hay, needle).is_some();
    let uri = parts.uri.to_string();
    shared
        .credentials
        .known(uid)
        .into_iter()
        .filter(|(_, s)| {
            let s = s.expose().as_bytes();
            s.len() >= MIN_SCANNED_SECRET
                && (contains(uri.as_bytes(), s)
                    || parts.headers.values().any(|v| contains(v.as_bytes(), s))
                    || body.is_some_and(|b| contains(b, s)))
        })
        .map(|(cap, _)| cap)
        .collect()
}

/// What the detectors of the cell's `detect` capabilities find in the request: its canonical
/// path, its query, every header, the part of its body that was read; and those detectors.
/// Nothing when no capability of the cell detects.
fn detections(
    shared: &Shared,
    ident: &ConnIdentity,
    parts: &http::request::Parts,
    facts: &Facts,
    body: Option<&[u8]>,
) -> (
    Vec<crate::detect::Found>,
    Option<Arc<crate::detect::Detectors>>,
) {
    use crate::detect::{Detectors, Found, Place};
    let Some(entry) = shared.cells.get(&ident.claims.cell_uid) else {
        return (Vec::new(), None);
    };
    let detects = entry
        .cell
        .capabilities
        .iter()
        .filter_map(|c| c.detect.as_ref());
    let ds = Detectors::union(detects, |_| true);
    if ds.is_empty() {
        return (Vec::new(), None);
    }
    let mut found = Vec::new();
    let mut look = |text: &str, place: Place| {
        for (detector, class) in ds.scan(text) {
            found.push(Found {
                detector,
                class,
                place: place.clone(),
            });
        }
    };
    if let Some(p) = &facts.path {
        look(p, Place::Path);
    }
    if let Some(q) = &facts.query {
        look(q, Place::Query);
    }
    for (name, value) in &parts.headers {
        if let Ok(v) = value.to_str() {
            look(v, Place::Header(name.as_str().to_string()));
        }
    }
    if let Some(b) = body {
        look(&String::from_utf8_lossy(b), Place::Body);
    }
    (found, Some(Arc::new(ds)))
}

/// Applies a `detect: redact` decision: the query, the headers and the body read, with what the
/// detectors found replaced (the body's length fixed up).
fn redact(
    plan: &crate::detect::Detectors,
    facts: &mut Facts,
    headers: &mut HeaderMap,
    body: &mut upstream::UpBody,
) {
    let clean = |t: &str| plan.redact(t);
    if let Some(q) = facts.query.as_mut() {
        // Brackets are not query characters: the marks go percent-encoded.
        *q = clean(q).replace('[', "%5B").replace(']', "%5D");
    }
    for v in headers.values_mut() {
        if let Ok(text) = v.to_str() {
            let cleaned = clean(text);
            if cleaned != text {
                if let Ok(nv) = HeaderValue::from_str(&cleaned) {
                    *v = nv;
                }
            }
        }
    }
    if let http_body_util::Either::Right(read) = body {
        let changed = read.rewrite_head(|head| {
            let text = std::str::from_utf8(head).ok()?;
            let cleaned = clean(text);
            (cleaned != text).then(|| Bytes::from(cleaned))
        });
        if let Some((before, after)) = changed {
            let length = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
            if let Some(len) = length {
                let fixed = len.saturating_sub(before).saturating_add(after);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(fixed));
            }
        }
    }
}

/// Reads the body to `bound` (when some capability inspects it and there is a body).
async fn read_body(
    body: &mut upstream::UpBody,
    bound: Option<usize>,
) -> Result<Option<(Bytes, bool)>, hyper::Error> {
    let Some(max) = bound else { return Ok(None) };
    let http_body_util::Either::Left(incoming) = std::mem::replace(
        body,
        http_body_util::Either::Right(crate::inspect::ReadBody::default()),
    ) else {
        return Ok(None);
    };
    if hyper::body::Body::is_end_stream(&incoming) {
        *body = http_body_util::Either::Left(incoming);
        return Ok(Some((Bytes::new(), false)));
    }
    let r = crate::inspect::read(incoming, max).await?;
    *body = http_body_util::Either::Right(r.body);
    Ok(Some((r.head, r.oversize)))
}

#[allow(clippy::too_many_arguments)]
async fn handle_decided(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    parts: http::request::Parts,
    mut body: upstream::UpBody,
    read: Option<(Bytes, bool)>,
    facts: Facts,
    out: Outcome,
    generation: tokio::sync::watch::Receiver<u64>,
    traced: Option<(cellgate_otel::RequestSpan, std::time::SystemTime)>,
) -> Response<Body> {
    let ident = &ctx.ident.clone();
    // A path a detector found something in is logged with it redacted.
    let in_path = facts
        .detected
        .iter()
        .any(|f| f.place == crate::detect::Place::Path);
    let logged_path = match (&facts.path, &facts.detectors) {
        (Some(p), Some(ds)) if in_path => Some(ds.redact(p)),
        (other, _) => other.clone(),
    };
    let span = tracing::info_span!("request", request.id = %out.request_id, http.method = %parts.method, host = ?facts.host, path = ?logged_path);
    async move {
        let (out, req) = if out.awaiting_approval.is_none() {
            (out, Request::from_parts(parts, body))
        } else {
            // An approval binds the body: read it whole (bounded), approve exactly it, send it.
            let whole = match read {
                Some((head, false)) => Some(head),
                Some((_, true)) => None,
                None => match read_body(&mut body, Some(decide::APPROVAL_MAX_BODY)).await {
                    Ok(Some((head, false))) => Some(head),
                    _ => None,
                },
            };
            let digest = whole.as_deref().map(crate::approvals::body_digest);
            let out = decide::approve(&shared, &ctx.ident, &facts, out, digest).await;
            (out, Request::from_parts(parts, body))
        };
        let concluded = decide::conclude(&shared, (&**ident).into(), &facts, out).await;
        let otel = traced.map(|(span, started)| {
            let out = match &concluded {
                Concluded::Forward(out, _) | Concluded::Answer(out) => out,
            };
            span.set(otel_attributes(out));
            span.decision(
                started,
                std::time::SystemTime::now(),
                out.result.as_str(),
                out.reason.as_str(),
                out.capability.as_deref(),
            );
            span
        });
        match concluded {
            Concluded::Forward(out, injected) => {
                forward(
                    shared,
                    ctx.clone(),
                    req,
                    facts,
                    out,
                    injected,
                    generation,
                    otel,
                )
                .await
            }
            Concluded::Answer(out) => refusal(Some(ident), &out),
        }
    }
    .instrument(span)
    .await
}

/// The request span's `cellgate.*` attributes: what the audit record of the decision says.
fn otel_attributes(out: &Outcome) -> Vec<cellgate_otel::KeyValue> {
    use cellgate_otel::KeyValue;
    let mut v = vec![KeyValue::new("cellgate.request.id", out.request_id.clone())];
    if let Some(entry) = &out.cell {
        v.push(KeyValue::new("cellgate.cell", entry.cell.name.clone()));
        v.push(KeyValue::new(
            "k8s.namespace.name",
            entry.cell.namespace.clone(),
        ));
    }
    if let Some(p) = &out.policy_version {
        v.push(KeyValue::new("cellgate.policy.version", p.clone()));
    }
    v
}

/// The answer to a refused request ([`crate::answer`]), as an HTTP response.
fn refusal(ident: Option<&ConnIdentity>, out: &Outcome) -> Response<Body> {
    let answer = crate::answer::of(ident, out);
    let mut r = Response::new(
        Full::new(Bytes::from(answer.text()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::FORBIDDEN);
    for (name, value) in answer.headers(&out.request_id) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    r
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any the Connection header names.
/// On an upgrade, `connection: upgrade` and `upgrade` are kept.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        // Only meaningful with `Upgrade: h2c`, which is never forwarded.
        "http2-settings",
    ] {
        headers.remove(n);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut req: Request<upstream::UpBody>,
    facts: Facts,
    out: Outcome,
    injected: Option<crate::credentials::Injected>,
    generation: tokio::sync::watch::Receiver<u64>,
    otel: Option<cellgate_otel::RequestSpan>,
) -> Response<Body> {
    let upgrade = is_upgrade(&req);
    let agent_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, mut body) = req.into_parts();
    let mut facts = facts;
    if let Some(plan) = &out.redact {
        redact(plan, &mut facts, &mut parts.headers, &mut body);
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(i) = &injected {
        // Whatever the agent put in this header is replaced, every value of it.
        parts.headers.remove(&i.name);
        parts.headers.insert(i.name.clone(), i.value.clone());
    }
    let host = facts.host.clone().unwrap_or_default();
    let scheme = if ctx.sni.is_some() { "https" } else { "http" };
    let host_part = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let authority =
        if (scheme == "https" && facts.port == 443) || (scheme == "http" && facts.port == 80) {
            host_part
        } else {
            format!("{host_part}:{}", facts.port)
        };
    // The canonical path the decision was made on, never the raw one.
    let path = facts.path.as_deref().unwrap_or("/");
    let pq = match &facts.query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    parts.uri = match Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
    {
        Ok(u) => u,
        Err(e) => {
            let who = (&*ctx.ident).into();
            let o = decide::after_allow(&shared, who, &facts, &out, Reason::BadUri, e.to_string())
                .await;
            return refusal(Some(&ctx.ident), &o);
        }
    };
    // The client picks HTTP/2 or HTTP/1.1 per upstream by ALPN.
    parts.version = Version::HTTP_11;
    // The client writes the authority itself: `Host` on HTTP/1.1, `:authority` on HTTP/2 (where
    // a second, explicit `host` header is refused by some servers, nginx among them).
    parts.headers.remove(header::HOST);
    let internal = out
        .granting_capability()
        .is_some_and(|c| c.allow_internal_addresses);
    // Token and spend budgets and MCP list filtering read the response: it must come
    // uncompressed.
    let meter = Meter::of(&shared, &out, &ctx.ident, &facts);
    // The injected secret is masked if the upstream sends it back: that needs the response
    // uncompressed too.
    let mut scrubber = injected
        .as_ref()
        .map(|i| crate::scrub::Scrubber::new(i.scrub.clone()));
    if meter.is_some() || !out.mcp_lists.is_empty() || scrubber.is_some() {
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    let client = shared.upstream.pick(upgrade, internal);
    let resp = match &otel {
        None => client.request(Request::from_parts(parts, body)).await,
        Some(span) => {
            let sent = std::time::SystemTime::now();
            let trace = upstream::ConnectTrace::default();
            let resp = upstream::CONNECT_TRACE
                .scope(
                    trace.clone(),
                    client.request(Request::from_parts(parts, body)),
                )
                .await;
            let timing = trace.lock().ok().and_then(|mut t| t.take());
            if let Some(t) = timing {
                span.connect(t.start, t.end, t.peer, t.error.as_deref());
            }
            let status = resp.as_ref().ok().map(|r| r.status().as_u16());
            span.response(sent, std::time::SystemTime::now(), status);
            resp
        }
    };
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            // Nothing was sent. A forbidden address is a refusal like any other (403, durable
            // before the answer); anything else a failure of the upstream (502).
            let reason = upstream::classify(&e);
            let who = (&*ctx.ident).into();
            let o = decide::after_allow(&shared, who, &facts, &out, reason, error_chain(&e)).await;
            return refusal(Some(&ctx.ident), &o);
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 turns the connection into a relay: only for the WebSocket upgrade the agent
        // asked for and the upstream accepted, never for one the upstream invents.
        let accepted = agent_upgrade.is_some()
            && matches!(
                check_upgrade(
                    resp.headers()
                        .get_all(header::UPGRADE)
                        .iter()
                        .map(|v| v.to_str().ok()),
                ),
                Ok(true)
            );
        if !accepted {
            let detail = "the upstream switched protocols to something other than the WebSocket upgrade requested".to_string();
            let who = (&*ctx.ident).into();
            let reason = Reason::UpstreamUpgradeRefused;
            let o = decide::after_allow(&shared, who, &facts, &out, reason, detail).await;
            return refusal(Some(&ctx.ident), &o);
        }
        if let Some(m) = meter {
            // What flows over a WebSocket cannot be metered: never counted as free.
            m.charge(usage::Reading::Unreadable("WebSocket upgrade"));
        }
        if let Some(agent_up) = agent_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            let ident = ctx.ident.clone();
            tokio::spawn(async move {
                match (agent_up.await, up.await) {
                    (Ok(a), Ok(b)) => {
                        tunnel::relay(shared, TokioIo::new(a), TokioIo::new(b), &ident, &facts)
                            .await
                    }
                    (a, b) => {
                        tracing::info!(agent = a.is_ok(), upstream = b.is_ok(), "upgrade failed")
                    }
                }
            });
        }
        // The relay re-checks on its own; the 101 has no body to watch.
        if let Ok(v) = HeaderValue::from_str(&out.request_id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        return resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    if let Some(s) = scrubber.as_mut() {
        for v in resp.headers_mut().values_mut() {
            if let Some(masked) = s.mask_all(v.as_bytes()) {
                if let Ok(m) = HeaderValue::from_bytes(&masked) {
                    *v = m;
                }
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&out.request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let ident = ctx.ident.clone();
    let scrubbed = scrubber.map(|s| {
        let (shared, ident, facts, out) = (shared.clone(), ident.clone(), facts.clone(), out.clone());
        let report: Box<dyn FnOnce(usize) + Send + Sync> = Box::new(move |n| {
            let mut o = out.refused(
                Decision::Control,
                Reason::SecretScrubbed,
                format!("the upstream sent the injected credential back {n} time(s); masked before the agent read it"),
            );
            o.notes.clear();
            decide::record_in_background(&shared, &ident, &facts, &o);
        });
        (s, report)
    });
    let reader = meter.map(|m| {
        let get = |h| resp.headers().get(h).and_then(|v| v.to_str().ok());
        let r = usage::UsageReader::new(get(header::CONTENT_TYPE), get(header::CONTENT_ENCODING));
        (m, r)
    });
    // An MCP list's answer shows only what the capability's rules allow.
    let listed = mcp_filter(&out).and_then(|f| {
        let ct = resp.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
        let sse = ct.starts_with("text/event-stream");
        (sse || ct.starts_with("application/json")).then_some((f, sse))
    });
    if listed.is_some() {
        // Rewritten: the length changes.
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    resp.map(|b| {
        let mut body = b.map_err(|e| Box::new(e) as BoxError).boxed();
        if let Some((scrubber, report)) = scrubbed {
            let scrub = Scrub {
                scrubber,
                report: Some(report),
            };
            body = Rewritten::new(body, scrub).boxed();
        }
        if let Some((filter, sse)) = listed {
            body = Rewritten::new(body, McpFiltered::new(filter, sse)).boxed();
        }
        if let Some((meter, reader)) = reader {
            body = Metered {
                inner: body,
                reader: Some(reader),
                meter,
            }
            .boxed();
        }
        if hyper::body::Body::is_end_stream(&body) {
            return body;
        }
        Rechecked::new(shared, ident, facts, out.request_id, generation, body).boxed()
    })
}

/// A rewrite of a response body as it streams: what to send for each chunk that came (maybe
/// nothing yet), and what is left at the end. An error cuts the response.
trait Rewrite: Send + Sync + Unpin + 'static {
    fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, BoxError>;
    fn finish(&mut self) -> Bytes;
}

/// A response body passed through a [`Rewrite`]; trailers go after what was held back.
struct Rewritten<R> {
    inner: Body,
    rewrite: R,
    done: bool,
    trailers: Option<hyper::body::Frame<Bytes>>,
}

impl<R: Rewrite> Rewritten<R> {
    fn new(inner: Body, rewrite: R) -> Self {
        Self {
            inner,
            rewrite,
            done: false,
            trailers: None,
        }
    }
}

impl<R: Rewrite> hyper::body::Body for Rewritten<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            let end = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => match this.rewrite.feed(&d) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(hyper::body::Frame::data(out)))),
                        Err(e) => {
                            this.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    },
                    Err(trailers) => Some(trailers),
                },
                Poll::Ready(None) => None,
            };
            this.done = true;
            this.trailers = end;
            let rest = this.rewrite.finish();
            if !rest.is_empty() {
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(rest))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }
}

/// The injected secret masked ([`crate::scrub`]); one audit record (`secret_scrubbed`) when
/// something was masked, headers included, once the response ends or is dropped.
struct Scrub {
    scrubber: crate::scrub::Scrubber,
    report: Option<Box<dyn FnOnce(usize) + Send + Sync>>,
}

impl Scrub {
    fn report(&mut self) {
        if self.scrubber.masked > 0 {
            if let Some(r) = self.report.take() {
                r(self.scrubber.masked);
            }
        }
    }
}

impl Drop for Scrub {
    fn drop(&mut self) {
        self.report();
    }
}

impl Rewrite for Scrub {
    fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, BoxError> {
        Ok(self.scrubber.feed(chunk))
    }

    fn finish(&mut self) -> Bytes {
        let rest = self.scrubber.finish();
        self.report();
        rest
    }
}

/// The filter of an MCP list's answer, when the request asked for a list of an MCP capability.
fn mcp_filter(out: &Outcome) -> Option<crate::mcp::Filter> {
    if out.mcp_lists.is_empty() {
        return None;
    }
    let rules = out.granting_capability()?.mcp.clone()?;
    Some(crate::mcp::Filter::new(
        Arc::new(rules),
        out.mcp_lists.clone(),
    ))
}

/// Largest MCP list answer (a JSON body, or one SSE event) the node filters; a larger one is
/// cut, never passed unfiltered.
const MCP_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// An MCP answer with its lists filtered ([`crate::mcp::Filter`]): a JSON body is read whole
/// (bounded) and rewritten; an SSE stream is rewritten event by event as it flows.
struct McpFiltered {
    filter: crate::mcp::Filter,
    sse: bool,
    buf: Vec<u8>,
}

impl McpFiltered {
    fn new(filter: crate::mcp::Filter, sse: bool) -> Self {
        Self {
            filter,
            sse,
            buf: Vec::new(),
        }
    }

    /// The complete SSE events in the buffer (all of it when `all`), filtered, each with its
    /// blank line.
    fn events(&mut self, all: bool) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let end = find_event_end(&self.buf).or(if all && !self.buf.is_empty() {
                Some((self.buf.len(), 0))
            } else {
                None
            });
            let Some((at, sep)) = end else {
                break;
            };
            let event: Vec<u8> = self.buf.drain(..at + sep).collect();
            let text = String::from_utf8_lossy(&event[..at]);
            out.extend_from_slice(self.filter.event(&text).as_bytes());
            out.extend_from_slice(&event[at..]);
            if sep == 0 {
                break;
            }
        }
        out
    }
}

impl Rewrite for McpFiltered {
    fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, BoxError> {
        self.buf.extend_from_slice(chunk);
        let out = if self.sse {
            self.events(false)
        } else {
            Vec::new()
        };
        if self.buf.len() > MCP_MAX_MESSAGE {
            return Err("an MCP answer over the bound the node filters".into());
        }
        Ok(Bytes::from(out))
    }

    fn finish(&mut self) -> Bytes {
        if self.sse {
            return Bytes::from(self.events(true));
        }
        let whole = std::mem::take(&mut self.buf);
        // Not JSON: nothing a list could hide in; passed as it came.
        Bytes::from(self.filter.json(&whole).unwrap_or(whole))
    }
}

/// Where the first SSE event in `b` ends: its length and the length of the blank line after.
fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The budgets a response's LLM usage is counted against.
struct Meter {
    shared: Arc<Shared>,
    ident: Arc<ConnIdentity>,
    facts: Facts,
    out: Outcome,
}

impl Meter {
    /// A meter when a token or spend budget governs the request.
    fn of(
        shared: &Arc<Shared>,
        out: &Outcome,
        ident: &Arc<ConnIdentity>,
        facts: &Facts,
    ) -> Option<Self> {
        let entry = out.cell.as_ref()?;
        let scopes = decide::budget_scopes(&entry.cell, out.granting_capability());
        scopes
            .iter()
            .any(|s| crate::budget::meters_usage(s.spec))
            .then(|| Self {
                shared: shared.clone(),
                ident: ident.clone(),
                facts: facts.clone(),
                out: out.clone(),
            })
    }

    /// Counts what a finished response reported, and audits it (reason `llm_usage`); usage
    /// that could not be read uses the token and spend budgets up until they reset.
    fn charge(&self, reading: usage::Reading) {
        let Some(entry) = self.out.cell.clone() else {
            return;
        };
        let scopes = decide::budget_scopes(&entry.cell, self.out.granting_capability());
        let now = decide::now_ms();
        let (reason, detail) = match &reading {
            usage::Reading::None => return,
            usage::Reading::Reported(u) => {
                let cost = self.shared.prices.cost_micros(u);
                self.shared
                    .ledger
                    .add_usage(&entry.cell.uid, &scopes, u.total(), cost, now);
                (
                    Reason::LlmUsage,
                    format!(
                        "model {}: {} input and {} output tokens, {} USD",
                        u.model.as_deref().unwrap_or("(unnamed)"),
                        u.input,
                        u.output,
                        crate::budget::micros_text(cost)
                    ),
                )
            }
            usage::Reading::Unreadable(why) => {
                self.shared
                    .ledger
                    .exhaust_usage(&entry.cell.uid, &scopes, now);
                tracing::warn!(request.id = %self.out.request_id, why, "LLM usage unreadable: the token and spend budgets are used up until they reset");
                (
                    Reason::LlmUsageUnreadable,
                    format!("usage of the response could not be read ({why}); the token and spend budgets it falls under are used up until they reset"),
                )
            }
        };
        let mut o = self.out.clone();
        o.result = Decision::Control;
        o.reason = reason;
        o.reasons = vec![detail];
        o.budget = Some(self.shared.ledger.state(&entry.cell.uid, &scopes));
        decide::record_in_background(&self.shared, &self.ident, &self.facts, &o);
    }
}

/// A response body whose LLM usage is read as it flows (never held back from the agent) and
/// counted when it ends, or when it is dropped cut short.
struct Metered {
    inner: Body,
    reader: Option<usage::UsageReader>,
    meter: Meter,
}

impl Metered {
    fn finish(&mut self, complete: bool) {
        if let Some(r) = self.reader.take() {
            self.meter.charge(r.finish(complete));
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let complete = hyper::body::Body::is_end_stream(&self.inner);
        self.finish(complete);
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(r), Some(d)) = (this.reader.as_mut(), frame.data_ref()) {
                    r.feed(d);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

type Changed = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<tokio::sync::watch::Receiver<u64>>> + Send>,
>;

fn next_change(mut rx: tokio::sync::watch::Receiver<u64>) -> Changed {
    Box::pin(async move { rx.changed().await.ok().map(|()| rx) })
}

/// A response body re-decided on every change of the node's state; cut (an error frame, which
/// aborts the HTTP/1.1 message or resets the HTTP/2 stream) when the decision no longer allows
/// it, with one audit record of reason `revoked`.
pub struct Rechecked {
    inner: Body,
    /// The next state change; a `Mutex` only to make the body `Sync` (it is never contended:
    /// `poll_frame` has `&mut self`).
    changed: Option<std::sync::Mutex<Changed>>,
    /// The token's expiry: the stream is cut then (`token_expired`). In a `Mutex` for `Sync`.
    expiry: std::sync::Mutex<std::pin::Pin<Box<tokio::time::Sleep>>>,
    shared: Arc<Shared>,
    ident: Arc<ConnIdentity>,
    facts: Facts,
    request_id: String,
    revoked: bool,
}

impl std::fmt::Debug for Rechecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rechecked")
            .field("request_id", &self.request_id)
            .field("revoked", &self.revoked)
            .finish()
    }
}

impl Rechecked {
    fn new(
        shared: Arc<Shared>,
        ident: Arc<ConnIdentity>,
        facts: Facts,
        request_id: String,
        generation: tokio::sync::watch::Receiver<u64>,
        inner: Body,
    ) -> Self {
        Self {
            inner,
            changed: Some(std::sync::Mutex::new(next_change(generation))),
            expiry: std::sync::Mutex::new(Box::pin(tokio::time::sleep_until(
                decide::expiry_deadline(&ident.claims),
            ))),
            shared,
            ident,
            facts,
            request_id,
            revoked: false,
        }
    }

    /// Re-decides after a change; `false` when the response must be cut.
    fn still_allowed(&self) -> bool {
        let mut out = decide::decide(&self.shared, &self.ident, &self.facts);
        if out.allowed() {
            return true;
        }
        out.reasons.insert(
            0,
            format!(
                "open {} response stream closed: {}",
                self.facts.protocol, out.reason
            ),
        );
        out.reason = Reason::Revoked;
        out.request_id = self.request_id.clone();
        tracing::info!(request.id = %self.request_id, reason = %out.reason, "cutting a response stream its authorization no longer allows");
        decide::record_in_background(&self.shared, &self.ident, &self.facts, &out);
        false
    }
}

impl hyper::body::Body for Rechecked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        // A body already delivered whole is not cut: the agent has the complete response.
        if this.revoked || this.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        let expiry = this.expiry.get_mut().unwrap_or_else(|p| p.into_inner());
        if std::future::Future::poll(expiry.as_mut(), cx).is_ready() {
            this.revoked = true;
            let (shared, ident, facts) =
                (this.shared.clone(), this.ident.clone(), this.facts.clone());
            tokio::spawn(async move {
                decide::record_expired_close(&shared, &ident, &facts, "response stream").await;
            });
            return Poll::Ready(Some(Err(
                "token_expired: the response's token expired".into()
            )));
        }
        while let Some(slot) = this.changed.as_mut() {
            let fut = slot.get_mut().unwrap_or_else(|p| p.into_inner());
            match fut.as_mut().poll(cx) {
                Poll::Pending => break,
                // The node is gone: nothing will change any more.
                Poll::Ready(None) => this.changed = None,
                Poll::Ready(Some(rx)) => {
                    *fut = next_change(rx);
                    if !this.still_allowed() {
                        this.revoked = true;
                        return Poll::Ready(Some(Err(
                            "revoked: the response's authorization was withdrawn".into(),
                        )));
                    }
                }
            }
        }
        std::pin::Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.revoked || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_parsing() {
        assert_eq!(
            split_authority("Example.COM."),
            Some(("example.com".into(), None))
        );
        assert_eq!(
            split_authority("example.com:8443"),
            Some(("example.com".into(), Some(8443)))
        );
        assert_eq!(
            split_authority("[::1]:443"),
            Some(("::1".into(), Some(443)))
        );
        assert_eq!(split_authority("[::1]"), Some(("::1".into(), None)));
        assert_eq!(split_authority("example.com:x"), None);
        assert_eq!(split_authority("user@example.com"), None);
        assert_eq!(split_authority(""), None);
        assert_eq!(split_authority("[::1]x"), None);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let mut up = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(up.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!up.contains_key("x-secret-hop"));
    }
}
