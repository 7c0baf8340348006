//! Envoy's external processing API (`envoy.service.ext_proc.v3.ExternalProcessor/Process`):
//! the node's handle on the responses Envoy streams, so a revocation closes them in Envoy mode
//! as it does on the intake.
//!
//! ext_authz decides a request once, before Envoy forwards it; what Envoy then streams back (an
//! SSE stream, a long download) is out of the node's reach. With the `ext_proc` filter after
//! ext_authz (`deploy/envoy/envoy.yaml`), Envoy opens a gRPC stream to this service at the
//! response's headers, carrying the ext_authz dynamic metadata (the request id). The node then:
//!
//! 1. finds the request ext_authz allowed under that id ([`Guards`]; none: refused, 403);
//! 2. re-decides it ([`crate::decide::decide`]): a request revoked while it waited for its
//!    response is answered 403 (`revoked`) instead of the response;
//! 3. for a response without a length (SSE, chunked, an HTTP/2 stream without
//!    `content-length`) or an upgrade (a WebSocket's `101`), asks Envoy to stream the body through it (`mode_override`
//!    `STREAMED`), passes every chunk on unchanged, and re-decides at every change of cells,
//!    policy or revocations: when the decision no longer allows the request, the node records
//!    `revoked` and ends the gRPC stream with an error, which makes Envoy reset the response
//!    (the agent sees the stream cut, nothing more). The token's expiry does the same
//!    (`token_expired`), besides the route timeout ext_authz sets.
//!
//! A response with a length passes with no further message. Envoy is configured with
//! `failure_mode_allow: false`: an unreachable node fails the response closed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellgate_audit::Decision;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    processing_mode::BodySendMode, ProcessingMode,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, BodyResponse, HeaderMutation, HeadersResponse,
    HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::decide::{self, ConnIdentity, Facts, Outcome, Reason};
use crate::Shared;

/// The gRPC service name Envoy's `ext_proc` filter calls.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// Where ext_authz's dynamic metadata arrives (`metadata_options.forwarding_namespaces`).
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// Requests allowed by ext_authz whose responses have not started yet, at most this many; the
/// oldest is dropped beyond (its response, should it still come, is refused).
const MAX_GUARDS: usize = 65_536;

/// How long an allowed request waits for its response's headers at most before it is
/// forgotten (and that response refused): an upstream that answers later than this has long
/// been given up on by any agent.
const RESPONSE_WAIT: Duration = Duration::from_secs(3600);

/// What ext_authz allowed, kept until its response starts.
#[derive(Debug, Clone)]
pub struct Guarded {
    /// Who asked.
    pub ident: Arc<ConnIdentity>,
    /// What was decided.
    pub facts: Facts,
    /// Forgotten after this.
    until: tokio::time::Instant,
}

/// Requests allowed through ext_authz, by request id, until their response starts.
#[derive(Debug, Default)]
pub struct Guards {
    map: Mutex<HashMap<String, Guarded>>,
}

impl Guards {
    /// Keeps what ext_authz allowed under `request_id`.
    pub fn keep(&self, request_id: &str, ident: &ConnIdentity, facts: &Facts) {
        let now = tokio::time::Instant::now();
        let until = decide::expiry_deadline(&ident.claims).min(now + RESPONSE_WAIT);
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= MAX_GUARDS {
            map.retain(|_, g| g.until > now);
            if map.len() >= MAX_GUARDS {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, g)| g.until)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(
            request_id.to_string(),
            Guarded {
                ident: Arc::new(ident.clone()),
                facts: facts.clone(),
                until,
            },
        );
    }

    /// Takes what was kept under `request_id`, if it is still current.
    pub fn take(&self, request_id: &str) -> Option<Guarded> {
        let g = self.map.lock().ok()?.remove(request_id)?;
        (g.until > tokio::time::Instant::now()).then_some(g)
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `ExternalProcessor` service.
#[derive(Debug, Clone)]
pub struct ProcessService {
    shared: Arc<Shared>,
}

impl ProcessService {
    /// The service, as a tonic server.
    pub fn server(shared: Arc<Shared>) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(Self { shared })
    }
}

type Out = tokio::sync::mpsc::Sender<Result<ProcessingResponse, Status>>;

#[tonic::async_trait]
impl ExternalProcessor for ProcessService {
    type ProcessStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static>,
    >;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(converse(self.shared.clone(), inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One response's conversation with Envoy.
async fn converse(shared: Arc<Shared>, mut inbound: Streaming<ProcessingRequest>, tx: Out) {
    let mut generation = shared.generation.subscribe();
    // Set once the response's headers passed and its body streams through here.
    let mut watched: Option<(Guarded, String)> = None;
    let expiry = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(expiry);
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            changed = generation.changed(), if watched.is_some() => {
                if changed.is_err() {
                    return;
                }
                let Some((g, rid)) = &watched else { continue };
                let out = decide::decide(&shared, &g.ident, &g.facts);
                if !out.allowed() {
                    revoke(&shared, g, rid, out).await;
                    let _ = tx.send(Err(Status::permission_denied("revoked"))).await;
                    return;
                }
                continue;
            }
            () = &mut expiry, if watched.is_some() => {
                if let Some((g, _)) = &watched {
                    decide::record_expired_close(&shared, &g.ident, &g.facts, "response stream").await;
                }
                let _ = tx.send(Err(Status::permission_denied("token_expired"))).await;
                return;
            }
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            // Envoy ended the stream: the response is over.
            Ok(None) | Err(_) => return,
        };
        let reply = match msg.request {
            Some(processing_request::Request::ResponseHeaders(h)) => {
                let md = msg.metadata_context.as_ref();
                if !allowed_by_ext_authz(md) {
                    // Envoy's own answer (the node's refusal, a refused source, a bad request):
                    // nothing went upstream, nothing to watch.
                    let _ = tx
                        .send(Ok(response(
                            processing_response::Response::ResponseHeaders(
                                HeadersResponse::default(),
                            ),
                        )))
                        .await;
                    return;
                }
                let rid = metadata_text(md, "request_id");
                match headers(&shared, rid.as_deref(), &h).await {
                    Step::Pass(r) => r,
                    Step::Refuse(r) => {
                        let _ = tx.send(Ok(r)).await;
                        return;
                    }
                    Step::Watch(r, watch) => {
                        let (g, rid) = *watch;
                        expiry
                            .as_mut()
                            .reset(decide::expiry_deadline(&g.ident.claims));
                        watched = Some((g, rid));
                        r
                    }
                }
            }
            Some(processing_request::Request::ResponseBody(_)) => response(
                processing_response::Response::ResponseBody(BodyResponse::default()),
            ),
            // Phases the shipped configuration does not send: passed on unchanged.
            Some(processing_request::Request::RequestHeaders(_)) => response(
                processing_response::Response::RequestHeaders(HeadersResponse::default()),
            ),
            Some(processing_request::Request::RequestBody(_)) => response(
                processing_response::Response::RequestBody(BodyResponse::default()),
            ),
            Some(processing_request::Request::RequestTrailers(_)) => response(
                processing_response::Response::RequestTrailers(Default::default()),
            ),
            Some(processing_request::Request::ResponseTrailers(_)) => response(
                processing_response::Response::ResponseTrailers(Default::default()),
            ),
            None => return,
        };
        if tx.send(Ok(reply)).await.is_err() {
            return;
        }
    }
}

enum Step {
    /// Passed; nothing more to watch.
    Pass(ProcessingResponse),
    /// Refused: the answer replaces the response.
    Refuse(ProcessingResponse),
    /// Passed, and its body streams through the node.
    Watch(ProcessingResponse, Box<(Guarded, String)>),
}

/// The response's headers: refused when no allowed request is known under its id or its
/// decision no longer holds; watched when it streams.
async fn headers(shared: &Shared, rid: Option<&str>, h: &HttpHeaders) -> Step {
    let Some((rid, g)) = rid.and_then(|r| Some((r, shared.guards.take(r)?))) else {
        let out = Outcome::deny(
            Reason::Revoked,
            format!(
                "a response for request {} reached ext_proc, and no request allowed by ext_authz is known under that id",
                rid.unwrap_or("(none)")
            ),
            None,
        );
        tracing::warn!(
            request.id = rid.unwrap_or("(none)"),
            "response without an allowed request; refused"
        );
        return Step::Refuse(immediate(None, &out));
    };
    let out = decide::decide(shared, &g.ident, &g.facts);
    if !out.allowed() {
        let mut out = revoke(shared, &g, rid, out).await;
        out.request_id = rid.to_string();
        return Step::Refuse(immediate(Some(&g.ident), &out));
    }
    let pass = HeadersResponse::default();
    if !streams(h) {
        return Step::Pass(response(processing_response::Response::ResponseHeaders(
            pass,
        )));
    }
    let mut r = response(processing_response::Response::ResponseHeaders(pass));
    r.mode_override = Some(ProcessingMode {
        response_body_mode: BodySendMode::Streamed as i32,
        ..Default::default()
    });
    Step::Watch(r, Box::new((g, rid.to_string())))
}

/// Records that what `g` had open was closed because `out` no longer allows it.
async fn revoke(shared: &Shared, g: &Guarded, rid: &str, mut out: Outcome) -> Outcome {
    out.reasons.insert(
        0,
        format!(
            "open {} response stream closed (Envoy): {}",
            g.facts.protocol, out.reason
        ),
    );
    out.reason = Reason::Revoked;
    out.request_id = rid.to_string();
    if out.result != Decision::Error {
        out.result = Decision::Deny;
    }
    tracing::info!(request.id = %rid, "cutting a response Envoy streams: its authorization was withdrawn");
    let _ = decide::commit(shared, (&*g.ident).into(), &g.facts, &out).await;
    out
}

/// Whether a response streams: not ended with its headers, and no length announced; an
/// upgrade (`101`, a WebSocket) always does: what follows is the upgraded connection's bytes.
fn streams(h: &HttpHeaders) -> bool {
    if h.end_of_stream {
        return false;
    }
    let Some(map) = &h.headers else { return true };
    let upgraded = map
        .headers
        .iter()
        .any(|hv| hv.key == ":status" && header_text(hv) == "101");
    upgraded
        || !map
            .headers
            .iter()
            .any(|hv| hv.key.eq_ignore_ascii_case("content-length"))
}

fn header_text(hv: &HeaderValue) -> String {
    if hv.raw_value.is_empty() {
        hv.value.clone()
    } else {
        String::from_utf8_lossy(&hv.raw_value).into_owned()
    }
}

/// A text ext_authz put in its dynamic metadata (`request_id`, `decision`).
fn metadata_text(md: Option<&Metadata>, key: &str) -> Option<String> {
    let fields = &md?.filter_metadata.get(METADATA_NAMESPACE)?.fields;
    match fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Whether the response is to a request ext_authz allowed, so that the upstream answers it. Any
/// other response is Envoy's own: a request ext_authz refused (its decision in the metadata is
/// a refusal), or one refused before ext_authz was asked (no metadata at all), which cannot
/// have reached an upstream: the route is behind ext_authz.
fn allowed_by_ext_authz(md: Option<&Metadata>) -> bool {
    matches!(
        metadata_text(md, "decision").as_deref(),
        Some("allow" | "shadow_deny")
    )
}

fn response(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

/// The refusal's answer ([`crate::answer`]) in place of the response.
fn immediate(ident: Option<&ConnIdentity>, out: &Outcome) -> ProcessingResponse {
    let answer = crate::answer::of(ident, out);
    let set_headers = answer
        .headers(&out.request_id)
        .map(|(k, v)| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.to_string(),
                raw_value: v.into_bytes(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    response(processing_response::Response::ImmediateResponse(
        ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(answer.status),
            }),
            headers: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            body: answer.text().into_bytes(),
            details: format!("cellgate_{}", out.reason),
            ..Default::default()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn hdrs(pairs: &[(&str, &str)], end: bool) -> HttpHeaders {
        HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream: end,
            ..Default::default()
        }
    }

    #[test]
    fn only_responses_without_a_length_stream_through_the_node() {
        assert!(streams(&hdrs(
            &[(":status", "200"), ("content-type", "text/event-stream")],
            false
        )));
        assert!(!streams(&hdrs(
            &[(":status", "200"), ("content-length", "12")],
            false
        )));
        assert!(!streams(&hdrs(&[(":status", "204")], true)));
        assert!(streams(&hdrs(
            &[(":status", "101"), ("content-length", "0")],
            false
        )));
    }

    fn md(ns: &str, pairs: &[(&str, &str)]) -> Metadata {
        let fields = pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    Value {
                        kind: Some(Kind::StringValue((*v).into())),
                    },
                )
            })
            .collect();
        Metadata {
            filter_metadata: [(ns.to_string(), Struct { fields })].into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_request_id_comes_from_ext_authz_metadata_only() {
        let ns = METADATA_NAMESPACE;
        let rid = |m: &Metadata| metadata_text(Some(m), "request_id");
        assert_eq!(
            rid(&md(ns, &[("request_id", "abc")])).as_deref(),
            Some("abc")
        );
        assert_eq!(rid(&md("other", &[("request_id", "abc")])), None);
        assert_eq!(rid(&md(ns, &[("request_id", "")])), None);
        assert_eq!(metadata_text(None, "request_id"), None);
    }

    #[test]
    fn only_what_ext_authz_allowed_is_watched() {
        let ns = METADATA_NAMESPACE;
        assert!(allowed_by_ext_authz(Some(&md(
            ns,
            &[("decision", "allow")]
        ))));
        assert!(allowed_by_ext_authz(Some(&md(
            ns,
            &[("decision", "shadow_deny")]
        ))));
        assert!(!allowed_by_ext_authz(Some(&md(
            ns,
            &[("decision", "deny")]
        ))));
        assert!(!allowed_by_ext_authz(Some(&md(
            ns,
            &[("decision", "error")]
        ))));
        assert!(!allowed_by_ext_authz(Some(&md(
            "other",
            &[("decision", "allow")]
        ))));
        assert!(!allowed_by_ext_authz(None));
    }
}
