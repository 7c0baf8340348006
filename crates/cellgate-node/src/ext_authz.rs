//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`, gRPC) served
//! from the same engine, cells, credentials and audit as the tagged intake.
//!
//! In Envoy mode a per-node Envoy terminates the tagged connections (its `proxy_protocol`
//! listener filter reads the PPv2 header) and asks this service about every HTTP request before
//! forwarding it (see `deploy/envoy/` and `docs/envoy.md`).
//!
//! ## Identity
//! The token is the value of TLV 0xE0, which Envoy's `proxy_protocol` listener filter stores as
//! connection dynamic metadata under the rule key [`TOKEN_METADATA_KEY`] in its namespace
//! [`TOKEN_METADATA_NAMESPACE`]; the HTTP ext_authz filter forwards connection metadata of the
//! namespaces listed in `metadata_context_namespaces` (as a `Struct` string) and
//! `typed_metadata_context_namespaces` (as an `Any` of `envoy.data.core.v3.TlvsMetadata`), so it
//! arrives in `attributes.metadata_context`. Both forms are read. When the node is started with
//! `--ext-authz-token-header NAME`, a request header is the fallback (and is always removed before
//! Envoy forwards the request). The source address is `attributes.source` (with the
//! `proxy_protocol` filter: the PPv2 source, the pod) and the destination `attributes.destination`
//! (the PPv2 destination, what the agent dialled). The token goes through every check of the
//! intake: signature, key, audience, validity, revocation, known cell, bound source address.
//!
//! ## Answers
//! | case | gRPC | `CheckResponse` |
//! |---|---|---|
//! | allow, shadow_deny | OK | `status` 0, `OkHttpResponse`: in `headers` (`OVERWRITE_IF_EXISTS_OR_ADD`, replacing every value the agent sent) the pinned upstream address ([`UPSTREAM_HEADER`]), the credential, and the token's remaining life ([`ENVOY_TIMEOUT_HEADER`]); the token header (when configured) in `headers_to_remove`, the request id in `response_headers_to_add`; `dynamic_metadata` naming cell and capability |
//! | deny (policy, token, pre-policy checks, forbidden destination) | OK | `status` 7, `DeniedHttpResponse` 403 with the intake's JSON body (429 with `Retry-After` over the cell's rate) |
//! | destination does not resolve | OK | `status` 14, `DeniedHttpResponse` 502 |
//! | body over [`MAX_BODY_BYTES`] | OK | `status` 7, `DeniedHttpResponse` 413 |
//! | credential unavailable | OK | `status` 14, `DeniedHttpResponse` 503 |
//! | audit unavailable | OK | `status` 14, `DeniedHttpResponse` 503 (`audit_unavailable`) |
//! | draining | `UNAVAILABLE` | none: Envoy with `failure_mode_allow: false` fails closed |
//!
//! Every `DeniedHttpResponse` is [`crate::answer::of`] the outcome, as on the intake. An allowed
//! request is kept for [`crate::ext_proc`], which watches its response.
//!
//! The credential's header is deliberately *not* listed in `headers_to_remove`: Envoy applies
//! removals after sets, so listing it would strip the credential just injected.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use cellgate_audit::Decision;
use cellgate_identity::{Claims, TokenError};
use envoy_types::pb::envoy::config::core::v3::{
    address, header_value_option::HeaderAppendAction, socket_address::PortSpecifier, HeaderValue,
    HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::data::core::v3::TlvsMetadata;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer};
use envoy_types::pb::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::config::ListenAddr;
use crate::decide::{self, Concluded, ConnIdentity, Facts, Outcome, Reason, Subject};
use crate::Shared;

/// The gRPC service name (also the name reported by gRPC health checking).
pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
/// Namespace the `proxy_protocol` listener filter writes TLVs into by default.
pub const TOKEN_METADATA_NAMESPACE: &str = "envoy.filters.listener.proxy_protocol";
/// The rule key configured for TLV 0xE0 in `deploy/envoy/envoy.yaml`.
pub const TOKEN_METADATA_KEY: &str = "cellgate_token";
/// The request header the shipped Envoy bootstrap sets (first HTTP filter, overwriting any
/// value the agent sent) to the connection's physical peer, the address the PPv2 header came
/// from. The node refuses a check whose PPv2 source is not that peer (`source_mismatch`), as the
/// intake does, and one without the header: a bootstrap that does not set it is not trusted.
pub const DIRECT_PEER_HEADER: &str = "x-cellgate-direct-peer";
/// Set on every allowed request to the milliseconds left until its token expires: Envoy's
/// router ends the request then, a streamed response included (the bootstrap's routes have no
/// timeout of their own). The connection manager removes `x-envoy-*` headers an agent sends.
pub const ENVOY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-timeout-ms";
/// The request header Envoy's ORIGINAL_DST clusters route on (`use_http_header`): the node
/// sets it on every allowed request to the address it resolved and checked, so Envoy connects
/// there and nowhere else.
pub const UPSTREAM_HEADER: &str = "x-envoy-original-dst-host";
/// Largest request body accepted in a `CheckRequest` (Envoy's `with_request_body`); bigger
/// bodies are denied 413 without evaluating anything else.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest `CheckRequest` decoded at all: the body bound plus room for headers and metadata.
pub const MAX_MESSAGE_BYTES: usize = MAX_BODY_BYTES + 256 * 1024;
/// Verified tokens remembered (signature checks are the expensive part of a check).
const TOKEN_CACHE_ENTRIES: usize = 4096;
const FRONT_DOOR: &str = "ext_authz";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Request headers copied into the policy input: the intake's list.
const POLICY_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "user-agent",
    "accept",
    "upgrade",
    "x-request-id",
];

// google.rpc.Code values.
const CODE_OK: i32 = 0;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAVAILABLE: i32 = 14;

/// Tokens whose signature verified, by their exact text. Expiry and revocation are re-checked on
/// every use (here and again in [`decide::decide`]).
#[derive(Debug, Default)]
struct TokenCache {
    map: RwLock<HashMap<String, Claims>>,
}

impl TokenCache {
    fn verify(&self, shared: &Shared, token: &str, now: i64) -> Result<Claims, TokenError> {
        let cached = self.map.read().ok().and_then(|m| m.get(token).cloned());
        if let Some(c) = cached {
            if shared.verifier.is_revoked(&c.jti) {
                return Err(TokenError::Revoked(c.jti));
            }
            if cellgate_identity::token::is_past_expiry(c.exp, now) {
                if let Ok(mut m) = self.map.write() {
                    m.remove(token);
                }
                return Err(TokenError::Expired { exp: c.exp, now });
            }
            return Ok(c);
        }
        let c = shared.verifier.verify(token, now)?;
        if let Ok(mut m) = self.map.write() {
            if m.len() >= TOKEN_CACHE_ENTRIES {
                m.retain(|_, v| !cellgate_identity::token::is_past_expiry(v.exp, now));
                if m.len() >= TOKEN_CACHE_ENTRIES {
                    m.clear();
                }
            }
            m.insert(token.to_string(), c.clone());
        }
        Ok(c)
    }
}

/// The `Authorization` service.
#[derive(Debug, Clone)]
pub struct CheckService {
    shared: Arc<Shared>,
    tokens: Arc<TokenCache>,
}

impl CheckService {
    /// A service deciding with `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            tokens: Arc::new(TokenCache::default()),
        }
    }

    /// Decides one `CheckRequest`.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the decision cannot be recorded or the node is draining: Envoy must
    /// fail closed.
    pub async fn check(&self, req: CheckRequest) -> Result<CheckResponse, Status> {
        let shared = &*self.shared;
        if *shared.draining.borrow() {
            return Err(Status::unavailable("cellgate-node is draining"));
        }
        let attrs = req.attributes.unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        let source = attrs.source.as_ref().and_then(peer_addr);
        let dst = attrs
            .destination
            .as_ref()
            .and_then(peer_addr)
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        let sni = attrs
            .tls_session
            .as_ref()
            .map(|t| t.sni.trim_end_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty());
        let (mut facts, pre) = request_facts(&http, sni, dst.port());

        let token = attrs
            .metadata_context
            .as_ref()
            .and_then(token_from_metadata)
            .or_else(|| {
                let h = shared.config.ext_authz_token_header.as_deref()?;
                http.headers
                    .get(h)
                    .cloned()
                    .or_else(|| raw_header(&http, h))
                    .filter(|t| !t.is_empty())
            });

        let Some(source) = source else {
            let out = Outcome::deny(
                Reason::SourceUnknown,
                "the CheckRequest names no source address",
                None,
            );
            return self
                .deny(
                    None,
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                    dst,
                    &facts,
                    out,
                )
                .await;
        };
        // The tagger runs in the pod's network namespace, so the PPv2 source is the physical
        // peer Envoy saw; another source is a header (or token) replayed from elsewhere.
        let direct_peer = http
            .headers
            .get(DIRECT_PEER_HEADER)
            .cloned()
            .or_else(|| raw_header(&http, DIRECT_PEER_HEADER));
        let peer_ip = direct_peer
            .as_deref()
            .and_then(|p| p.trim().parse::<IpAddr>().ok());
        if peer_ip.map(|ip| ip.to_canonical()) != Some(source.ip().to_canonical()) {
            let detail = match &direct_peer {
                Some(p) => format!("the PPv2 source {source} is not the connection's peer {p:?}"),
                None => format!(
                    "Envoy passed no {DIRECT_PEER_HEADER} header: the connection's peer is unknown (see docs/envoy.md, trust boundary)"
                ),
            };
            let out = Outcome::deny(Reason::SourceMismatch, detail, None);
            return self.deny(None, source, dst, &facts, out).await;
        }
        let Some(token) = token else {
            let out = Outcome::deny(
                Reason::TokenMissing,
                "no cell token: Envoy passed no proxy_protocol TLV 0xE0 metadata",
                None,
            );
            return self.deny(None, source, dst, &facts, out).await;
        };
        let verified = self.tokens.verify(shared, &token, decide::now_secs());
        let ident = match decide::identify(shared, verified, source, dst) {
            Ok(i) => i,
            Err(r) => {
                let (ident, out) = (r.ident, r.out);
                return self.deny(ident.as_ref(), source, dst, &facts, out).await;
            }
        };
        if let Some((reason, detail, hint)) = pre {
            let out = Outcome::deny(reason, detail, hint);
            return self.deny(Some(&ident), source, dst, &facts, out).await;
        }
        let body_len = http.raw_body.len().max(http.body.len());
        if body_len > MAX_BODY_BYTES {
            let out = Outcome::deny(
                Reason::BodyTooLarge,
                format!("request body of {body_len} bytes is over the {MAX_BODY_BYTES} byte limit of ext_authz checks"),
                Some("lower with_request_body.max_request_bytes in Envoy, or send a smaller body".into()),
            );
            return self.deny(Some(&ident), source, dst, &facts, out).await;
        }
        if facts.port == 0 {
            facts.port = if facts.protocol == "https" { 443 } else { 80 };
        }

        let out = decide::admit(shared, &ident, &facts).await;
        let mut out = if out.awaiting_approval.is_some() {
            decide::approve(shared, &ident, &facts, out, whole_body_digest(&http)).await
        } else {
            out
        };
        // Where Envoy connects is decided here, as on the intake: the node resolves the host
        // (filtered like the intake's), and Envoy's ORIGINAL_DST clusters connect to exactly
        // that address, taken from UPSTREAM_HEADER (set below, replacing any value the agent
        // sent). No second resolution can send the request elsewhere.
        let mut pinned = None;
        if out.allowed() {
            match self.upstream_for(&facts, &out).await {
                Ok(a) => pinned = Some(a),
                Err((reason, detail)) => {
                    let result = if reason == Reason::DestinationForbidden {
                        Decision::Deny
                    } else {
                        Decision::Error
                    };
                    out = out.refused(result, reason, detail);
                }
            }
        }
        let (out, injected) = match decide::conclude(shared, (&ident).into(), &facts, out).await {
            Concluded::Forward(out, injected) => (out, injected),
            Concluded::Answer(out) => return Ok(denied(Some(&ident), &out)),
        };
        let pinned = pinned.ok_or_else(|| Status::internal("an allowed request has no address"))?;
        // Its response is watched through ext_proc: revoked, it is cut.
        shared.guards.keep(&out.request_id, &ident, &facts);
        let mut headers = vec![header(UPSTREAM_HEADER, &pinned.to_string())];
        if let Some(i) = injected {
            headers.push(HeaderValueOption {
                header: Some(HeaderValue {
                    key: i.name.as_str().to_string(),
                    value: String::from_utf8_lossy(i.value.as_bytes()).into_owned(),
                    raw_value: Vec::new(),
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            });
        }
        let headers_to_remove = shared
            .config
            .ext_authz_token_header
            .iter()
            .cloned()
            .collect();
        Ok(CheckResponse {
            status: Some(rpc::Status {
                code: CODE_OK,
                ..Default::default()
            }),
            dynamic_metadata: Some(dynamic_metadata(Some(&ident), &out)),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers_to_remove,
                response_headers_to_add: vec![header(
                    crate::http::REQUEST_ID_HEADER,
                    &out.request_id,
                )],
                // Nothing outlives its token: Envoy's router ends the request (a streamed
                // response included) when the token expires.
                headers: headers
                    .into_iter()
                    .chain(std::iter::once(header(
                        ENVOY_TIMEOUT_HEADER,
                        &decide::expiry_deadline(&ident.claims)
                            .saturating_duration_since(tokio::time::Instant::now())
                            .as_millis()
                            .max(1)
                            .to_string(),
                    )))
                    .collect(),
                ..Default::default()
            })),
        })
    }

    /// The address Envoy must connect to for an allowed request: the host resolved by the node
    /// (`--resolve` first), refused when it is in the node's own reach unless the capability
    /// allows internal addresses; the first address is pinned. Errors carry the reason label,
    /// and a detail.
    async fn upstream_for(
        &self,
        facts: &Facts,
        out: &Outcome,
    ) -> Result<SocketAddr, (Reason, String)> {
        let shared = &*self.shared;
        let host = facts.host.as_deref().unwrap_or_default();
        let filter = !out
            .granting_capability()
            .is_some_and(|c| c.allow_internal_addresses);
        match crate::upstream::resolve_checked(&shared.config.resolve, host, facts.port, filter)
            .await
        {
            // IPv4 first: one address is pinned.
            Ok((addrs, _)) => addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or((
                    Reason::UpstreamResolveFailed,
                    format!("{host} has no address"),
                )),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                Err((Reason::DestinationForbidden, e.to_string()))
            }
            Err(e) => Err((Reason::UpstreamResolveFailed, e.to_string())),
        }
    }

    /// A refusal before the pipeline's decision (admission, the request's shape): recorded
    /// (durably, before answering) and answered like every other.
    async fn deny(
        &self,
        ident: Option<&ConnIdentity>,
        source: SocketAddr,
        dst: SocketAddr,
        facts: &Facts,
        out: Outcome,
    ) -> Result<CheckResponse, Status> {
        let who = Subject { ident, source, dst };
        match decide::conclude(&self.shared, who, facts, out).await {
            Concluded::Answer(out) => Ok(denied(ident, &out)),
            Concluded::Forward(..) => Err(Status::internal("a refusal concluded as allowed")),
        }
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The answer to a refused request ([`crate::answer`]) as Envoy sends it. The gRPC status
/// says whether the node refused (`PERMISSION_DENIED`) or could not complete the request
/// (`UNAVAILABLE`); Envoy sends the HTTP answer either way.
fn denied(ident: Option<&ConnIdentity>, out: &Outcome) -> CheckResponse {
    let answer = crate::answer::of(ident, out);
    let code = if out.result == Decision::Error {
        CODE_UNAVAILABLE
    } else {
        CODE_PERMISSION_DENIED
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: out.reason.to_string(),
            details: Vec::new(),
        }),
        dynamic_metadata: Some(dynamic_metadata(ident, out)),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(answer.status),
            }),
            headers: answer
                .headers(&out.request_id)
                .map(|(k, v)| header(k, &v))
                .collect(),
            body: answer.text(),
        })),
    }
}

/// What Envoy stores under `envoy.filters.http.ext_authz` for its access log.
fn dynamic_metadata(ident: Option<&ConnIdentity>, out: &Outcome) -> Struct {
    let mut fields = HashMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            fields.insert(
                k.to_string(),
                Value {
                    kind: Some(Kind::StringValue(v)),
                },
            );
        }
    };
    put(
        "cell",
        out.cell
            .as_ref()
            .map(|e| e.cell.key())
            .or_else(|| ident.map(|i| format!("{}/{}", i.claims.namespace, i.claims.name))),
    );
    put("capability", out.capability.clone());
    put(
        "decision",
        Some(decide::decision_label(out.result).to_string()),
    );
    put("reason", Some(out.reason.to_string()));
    put("request_id", Some(out.request_id.clone()));
    put("policy_version", out.policy_version.clone());
    Struct { fields }
}

/// The token from the `proxy_protocol` filter's metadata, untyped (`Struct`) or typed
/// (`TlvsMetadata`).
fn token_from_metadata(md: &Metadata) -> Option<String> {
    if let Some(Value {
        kind: Some(Kind::StringValue(v)),
    }) = md
        .filter_metadata
        .get(TOKEN_METADATA_NAMESPACE)
        .and_then(|s| s.fields.get(TOKEN_METADATA_KEY))
    {
        if !v.is_empty() {
            return Some(v.clone());
        }
    }
    let any = md.typed_filter_metadata.get(TOKEN_METADATA_NAMESPACE)?;
    if !any.type_url.ends_with("/envoy.data.core.v3.TlvsMetadata") {
        return None;
    }
    let tlvs = TlvsMetadata::decode(any.value.as_slice()).ok()?;
    let v = tlvs.typed_metadata.get(TOKEN_METADATA_KEY)?;
    (!v.is_empty()).then(|| String::from_utf8_lossy(v).into_owned())
}

/// A header from `header_map` (Envoy's `encode_raw_headers: true`).
fn raw_header(http: &HttpRequest, name: &str) -> Option<String> {
    http.header_map.as_ref()?.headers.iter().find_map(|h| {
        h.key.eq_ignore_ascii_case(name).then(|| {
            if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            }
        })
    })
}

fn peer_addr(p: &Peer) -> Option<SocketAddr> {
    let address::Address::SocketAddress(sa) = p.address.as_ref()?.address.as_ref()? else {
        return None;
    };
    let ip: IpAddr = sa.address.parse().ok()?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).ok()?,
        _ => 0,
    };
    Some(SocketAddr::new(ip, port))
}

use crate::http::{check_authority, PreDeny};

/// The facts of the request Envoy describes, and the reason to refuse it before policy (the
/// intake's checks: no host, CONNECT, SNI/Host disagreement, a port other than the dialled one).
fn request_facts(
    http: &HttpRequest,
    sni: Option<String>,
    dst_port: u16,
) -> (Facts, Option<PreDeny>) {
    let hdr = |name: &str| -> Option<String> {
        http.headers
            .get(name)
            .cloned()
            .or_else(|| raw_header(http, name))
    };
    let scheme = if http.scheme.is_empty() {
        hdr(":scheme").unwrap_or_default()
    } else {
        http.scheme.clone()
    };
    let tls = scheme.eq_ignore_ascii_case("https") || sni.is_some();
    let method = if http.method.is_empty() {
        hdr(":method").unwrap_or_default()
    } else {
        http.method.clone()
    };
    let target = if http.path.is_empty() {
        hdr(":path").unwrap_or_default()
    } else {
        http.path.clone()
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target, None),
    };
    let path = if path.is_empty() { "/".into() } else { path };
    // Envoy normalizes the path before this filter (normalize_path, merge_slashes, escaped
    // slashes rejected: deploy/envoy/envoy.yaml) and forwards what it normalized, which this
    // answer cannot rewrite. So a path the node's canonical form would still change is refused:
    // the decision is then always made on the exact path Envoy sends upstream.
    let canonical = match cellgate_api::path::canonicalize(&path) {
        Ok(c) if c == path => Ok(()),
        Ok(c) => Err((
            Reason::PathNotCanonical,
            format!("path {path:?} is not in canonical form ({c:?}); Envoy would forward it as it is"),
            Some("check Envoy's path normalization (normalize_path, merge_slashes) against docs/envoy.md".into()),
        )),
        Err(e) => Err(crate::http::path_refusal(&e)),
    };
    let mut facts = Facts {
        protocol: if tls { "https" } else { "http" },
        port: dst_port,
        sni: sni.clone(),
        method: (!method.is_empty()).then(|| method.clone()),
        path: Some(path.chars().take(8192).collect()),
        query,
        front_door: FRONT_DOOR,
        headers: BTreeMap::new(),
        ..Facts::default()
    };
    for name in POLICY_HEADERS {
        if let Some(v) = hdr(name) {
            facts
                .headers
                .insert((*name).to_string(), v.chars().take(256).collect());
        }
    }
    let authority = if http.host.is_empty() {
        hdr(":authority").or_else(|| hdr("host"))
    } else {
        Some(http.host.clone())
    };
    let Some(authority) = authority.filter(|a| !a.is_empty()) else {
        return (
            facts,
            Some((
                Reason::MissingHost,
                "the request names no host".into(),
                Some("send a Host header".into()),
            )),
        );
    };
    let port = match check_authority(
        &authority,
        method.eq_ignore_ascii_case("CONNECT"),
        sni.as_deref(),
        &mut facts,
    ) {
        Ok(port) => port,
        Err(deny) => return (facts, Some(deny)),
    };
    if let Err(deny) = crate::http::check_upgrade(hdr("upgrade").as_deref().map(Some).into_iter()) {
        return (facts, Some(deny));
    }
    if let Err(deny) = canonical {
        return (facts, Some(deny));
    }
    // Envoy connects (to the pinned address) on the port the authority names, or the scheme's
    // default when it names none: that is the port decided on, and it must be the one the agent
    // dialled (else a request dialled to an allowed port would be sent to another one).
    let upstream_port = port.unwrap_or(if tls { 443 } else { 80 });
    match dst_port {
        0 => facts.port = upstream_port,
        d if d != upstream_port => {
            let detail = match port {
                Some(p) => format!("Host names port {p} but the connection is to port {d}"),
                None => format!(
                    "Host names no port, so the request would go to port {upstream_port}, but the connection is to port {d}"
                ),
            };
            return (
                facts,
                Some((
                    Reason::AuthorityPortMismatch,
                    detail,
                    Some("name the port in the Host header".into()),
                )),
            );
        }
        _ => {}
    }
    (facts, None)
}

// ---------------------------------------------------------------------------------------------
// gRPC plumbing: the generated server decodes with prost, which refuses a `body` string that is
// not UTF-8 (Envoy sends the bytes as they came unless `pack_as_bytes` is set). This codec
// decodes such a request by reading that field as `raw_body` ([`wire`]).

mod wire;

/// The SHA-256 of the request's whole body as Envoy passed it, for binding an approval; `None`
/// when Envoy passed part of it (`x-envoy-auth-partial-body: true`) or none of a body the
/// request has (`with_request_body` not configured).
fn whole_body_digest(http: &HttpRequest) -> Option<String> {
    let partial = http
        .headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let bytes: &[u8] = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    if partial {
        return None;
    }
    if bytes.is_empty() {
        let declared = http
            .headers
            .get("content-length")
            .is_some_and(|v| v.trim() != "0")
            || http.headers.contains_key("transfer-encoding")
            || http.size > 0;
        if declared {
            return None;
        }
    }
    Some(crate::approvals::body_digest(bytes))
}

/// Decodes a `CheckRequest`, tolerating a non-UTF-8 `body`.
///
/// # Errors
/// `INVALID_ARGUMENT` when the bytes are not a `CheckRequest` even so.
pub fn decode_check_request(bytes: Bytes) -> Result<CheckRequest, Status> {
    match CheckRequest::decode(bytes.clone()) {
        Ok(r) => Ok(r),
        Err(first) => {
            let mut v = bytes.to_vec();
            if wire::body_to_raw(&mut v) {
                if let Ok(r) = CheckRequest::decode(v.as_slice()) {
                    return Ok(r);
                }
            }
            Err(Status::invalid_argument(format!(
                "not a CheckRequest: {first}"
            )))
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct CheckCodec;

#[derive(Debug, Clone, Copy, Default)]
struct CheckEncoder;

#[derive(Debug, Clone, Copy, Default)]
struct CheckDecoder;

impl Codec for CheckCodec {
    type Encode = CheckResponse;
    type Decode = CheckRequest;
    type Encoder = CheckEncoder;
    type Decoder = CheckDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        CheckEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckDecoder
    }
}

impl Encoder for CheckEncoder {
    type Item = CheckResponse;
    type Error = Status;

    fn encode(&mut self, item: CheckResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the CheckResponse: {e}")))
    }
}

impl Decoder for CheckDecoder {
    type Item = CheckRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckRequest>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        decode_check_request(bytes).map(Some)
    }
}

struct Unary(CheckService);

impl tonic::server::UnaryService<CheckRequest> for Unary {
    type Response = CheckResponse;
    type Future = tonic::codegen::BoxFuture<tonic::Response<CheckResponse>, Status>;

    fn call(&mut self, request: tonic::Request<CheckRequest>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            svc.check(request.into_inner())
                .await
                .map(tonic::Response::new)
        })
    }
}

impl tonic::server::NamedService for CheckService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> tower_service::Service<http::Request<B>> for CheckService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let svc = self.clone();
        Box::pin(async move {
            let start = std::time::Instant::now();
            let shared = Arc::clone(&svc.shared);
            let mut grpc = tonic::server::Grpc::new(CheckCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), None);
            let response = grpc.unary(Unary(svc), req).await;
            shared
                .metrics
                .ext_authz_check_seconds
                .observe(start.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// A bound ext_authz listener.
pub struct Server {
    /// Where it listens (the real port when 0 was asked for).
    pub local_addr: ListenAddr,
    /// Serves until the node drains.
    pub serve: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// Binds the ext_authz listener (TCP or Unix socket) with the Check and gRPC health services.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(shared: &Arc<Shared>, addr: &ListenAddr) -> anyhow::Result<Server> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(health)
        .add_service(CheckService::new(shared.clone()))
        .add_service(crate::ext_proc::ProcessService::server(shared.clone()));
    let mut draining = shared.draining.subscribe();
    let signal = async move {
        crate::until_draining(&mut draining).await;
        reporter
            .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    match addr {
        ListenAddr::Tcp(a) => {
            let listener = tokio::net::TcpListener::bind(a).await?;
            let local = listener.local_addr()?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            Ok(Server {
                local_addr: ListenAddr::Tcp(local),
                serve: Box::pin(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                        tracing::error!(error = %e, "ext_authz server stopped");
                    }
                }),
            })
        }
        ListenAddr::Unix(p) => {
            use std::os::unix::fs::FileTypeExt as _;
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if m.file_type().is_socket() {
                    std::fs::remove_file(p)?;
                }
            }
            let listener = tokio::net::UnixListener::bind(p)?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let path = p.clone();
            Ok(Server {
                local_addr: ListenAddr::Unix(p.clone()),
                serve: Box::pin(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                        tracing::error!(error = %e, "ext_authz server stopped");
                    }
                    let _ = std::fs::remove_file(path);
                }),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::split_authority;
    use envoy_types::pb::envoy::service::auth::v3::{attribute_context, AttributeContext};

    #[test]
    fn authority_parsing() {
        assert_eq!(
            split_authority("Api.Test.:8443"),
            Some(("api.test".into(), Some(8443)))
        );
        assert_eq!(split_authority("[::1]"), Some(("::1".into(), None)));
        assert_eq!(split_authority("a@b"), None);
    }

    #[test]
    fn a_non_utf8_body_is_read_as_raw_bytes() {
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        raw_body: vec![b'o', b'k', 0xff, 0xfe],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let mut wire = req.encode_to_vec();
        // Turn raw_body (12) into body (11), as Envoy sends it without pack_as_bytes.
        let pos = wire
            .windows(2)
            .position(|w| w == [0x62, 4])
            .expect("raw_body tag");
        wire[pos] = 0x5a;
        assert!(CheckRequest::decode(wire.as_slice()).is_err());
        let got = decode_check_request(Bytes::from(wire)).unwrap();
        let http = got.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.raw_body, vec![b'o', b'k', 0xff, 0xfe]);
        assert_eq!(http.method, "POST");
        assert!(decode_check_request(Bytes::from_static(&[0x0a, 0x05, 1])).is_err());
    }
}
