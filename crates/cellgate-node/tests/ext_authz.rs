//! Envoy mode: a tonic client sends `CheckRequest`s shaped as Envoy's HTTP ext_authz filter fills
//! them (attributes from the proxy_protocol listener filter, `metadata_context` carrying TLV 0xE0,
//! request headers with pseudo-headers, optional body) and reads the answers Envoy would act on.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use cellgate_node::config::ListenAddr;
use cellgate_node::ext_authz::{
    CheckService, DIRECT_PEER_HEADER, MAX_BODY_BYTES, SERVICE_NAME, TOKEN_METADATA_KEY,
    TOKEN_METADATA_NAMESPACE,
};
use common::*;
use envoy_types::pb::envoy::config::core::v3::{
    address, header_value_option::HeaderAppendAction, socket_address::PortSpecifier, Address,
    Metadata, SocketAddress,
};
use envoy_types::pb::envoy::data::core::v3::TlvsMetadata;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    check_response::HttpResponse, AttributeContext, CheckRequest, CheckResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use prost::Message as _;
use tonic::transport::Channel;

const SECRET: &str = "sk-live-envoy-0123456789";
const TOKEN_HEADER: &str = "x-cellgate-token";

fn cred_cell(name: &str, port: u16, file: &str) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: {name}, namespace: agents}}\nspec:\n  capabilities:\n    - name: llm\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{methods: [POST, GET], paths: [\"/v1/**\"]}}\n      credential:\n        file: {{name: {file}}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n"
    )
}

struct Env {
    f: Fixture,
    _secrets: tempfile::TempDir,
    addr: SocketAddr,
}

async fn start() -> Env {
    start_with(|_| {}).await
}

async fn start_with(tweak: impl FnOnce(&mut cellgate_node::NodeConfig)) -> Env {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("openai"), format!("{SECRET}\n")).unwrap();
    let dir = secrets.path().to_path_buf();
    let f = Fixture::start_with(move |c| {
        c.ext_authz = Some(ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()));
        c.ext_authz_token_header = Some(TOKEN_HEADER.into());
        c.secrets_dir = Some(dir);
        tweak(c);
    })
    .await;
    let port = f.https.addr.port();
    std::fs::write(
        f.cells_dir.join("creds.yaml"),
        cred_cell("creds", port, "openai"),
    )
    .unwrap();
    std::fs::write(
        f.cells_dir.join("nocreds.yaml"),
        cred_cell("nocreds", port, "missing"),
    )
    .unwrap();
    for _ in 0..100 {
        if f.node().shared.cells.get("local:agents:creds").is_some()
            && f.node().shared.cells.get("local:agents:nocreds").is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let Some(ListenAddr::Tcp(addr)) = f.node().ext_authz_addr.clone() else {
        panic!("no ext_authz address");
    };
    Env {
        f,
        _secrets: secrets,
        addr,
    }
}

async fn client(addr: SocketAddr) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn peer(addr: &str, port: u32) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// A request as Envoy's HTTP ext_authz filter builds it for an intercepted HTTPS request.
#[derive(Clone)]
struct Req {
    token: Option<String>,
    typed: bool,
    source: &'static str,
    dst_port: u16,
    dst_addr: &'static str,
    method: &'static str,
    host: String,
    path: &'static str,
    sni: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    raw_body: Option<Vec<u8>>,
}

impl Req {
    fn new(env: &Env, cell: &str, method: &'static str, host: &str, path: &'static str) -> Self {
        let port = env.f.https.addr.port();
        Self {
            token: Some(env.f.token(cell)),
            typed: false,
            source: "127.0.0.1",
            dst_port: port,
            dst_addr: "127.0.0.1",
            method,
            host: format!("{host}:{port}"),
            path,
            sni: Some(if host == "shadow.test" {
                "shadow.test"
            } else {
                "api.test"
            }),
            headers: Vec::new(),
            raw_body: None,
        }
    }

    fn build(&self) -> CheckRequest {
        let mut headers: HashMap<String, String> = [
            (":authority", self.host.clone()),
            (":method", self.method.into()),
            (":path", self.path.into()),
            (":scheme", "https".into()),
            ("user-agent", "curl/8.5.0".into()),
            ("accept", "*/*".into()),
            ("x-request-id", "0b8e7c6a-envoy".into()),
            ("x-forwarded-proto", "https".into()),
            // What the shipped bootstrap's header_mutation filter sets: the physical peer.
            (DIRECT_PEER_HEADER, self.source.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in &self.headers {
            headers.insert(k.to_string(), v.clone());
        }
        let mut md = Metadata::default();
        if let Some(t) = &self.token {
            if self.typed {
                md.typed_filter_metadata.insert(
                    TOKEN_METADATA_NAMESPACE.into(),
                    Any {
                        type_url: "type.googleapis.com/envoy.data.core.v3.TlvsMetadata".into(),
                        value: TlvsMetadata {
                            typed_metadata: [(
                                TOKEN_METADATA_KEY.to_string(),
                                t.as_bytes().to_vec(),
                            )]
                            .into(),
                        }
                        .encode_to_vec(),
                    },
                );
            } else {
                md.filter_metadata.insert(
                    TOKEN_METADATA_NAMESPACE.into(),
                    Struct {
                        fields: [(
                            TOKEN_METADATA_KEY.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(t.clone())),
                            },
                        )]
                        .into(),
                    },
                );
            }
        }
        let size = self.raw_body.as_ref().map(|b| b.len() as i64).unwrap_or(0);
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(self.source, 40000)),
                destination: Some(peer(self.dst_addr, u32::from(self.dst_port))),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        id: "1234567890".into(),
                        method: self.method.into(),
                        headers,
                        path: self.path.into(),
                        host: self.host.clone(),
                        scheme: "https".into(),
                        size,
                        protocol: "HTTP/1.1".into(),
                        raw_body: self.raw_body.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                }),
                metadata_context: Some(md),
                tls_session: self.sni.map(|s| TlsSession { sni: s.into() }),
                ..Default::default()
            }),
        }
    }
}

async fn check(c: &mut AuthorizationClient<Channel>, r: &Req) -> CheckResponse {
    c.check(r.build()).await.unwrap().into_inner()
}

fn code(r: &CheckResponse) -> i32 {
    r.status.as_ref().map(|s| s.code).unwrap_or(-1)
}

fn denied(r: &CheckResponse) -> (i32, serde_json::Value) {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => (
            d.status.as_ref().unwrap().code,
            serde_json::from_str(&d.body).unwrap(),
        ),
        other => panic!("not denied: {other:?}"),
    }
}

fn meta(r: &CheckResponse, k: &str) -> Option<String> {
    match r.dynamic_metadata.as_ref()?.fields.get(k)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_injects_the_credential_for_envoy_to_set() {
    let env = start().await;
    let mut c = client(env.addr).await;
    let mut req = Req::new(&env, "creds", "POST", "api.test", "/v1/chat/completions");
    req.headers
        .push(("authorization", "Bearer agent-made-this-up".into()));
    let r = check(&mut c, &req).await;
    assert_eq!(code(&r), 0, "{r:?}");
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
        panic!("{r:?}")
    };
    let set: Vec<_> = ok
        .headers
        .iter()
        .map(|h| {
            let hv = h.header.as_ref().unwrap();
            (hv.key.as_str(), hv.value.as_str(), h.append_action)
        })
        .collect();
    let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
    let pinned = format!("127.0.0.1:{}", env.f.https.addr.port());
    assert_eq!(
        set[..2],
        [
            // Where Envoy connects: the address the node resolved for api.test.
            ("x-envoy-original-dst-host", pinned.as_str(), overwrite),
            (
                "authorization",
                format!("Bearer {SECRET}").as_str(),
                overwrite
            ),
        ],
        "the credential replaces whatever the agent sent"
    );
    // The request ends with the token: 10 minutes (plus 5 s leeway) at most from now.
    assert_eq!(set.len(), 3, "{set:?}");
    assert_eq!(set[2].0, "x-envoy-upstream-rq-timeout-ms");
    let ms: u64 = set[2].1.parse().unwrap();
    assert!(ms > 590_000 && ms <= 605_000, "{ms}");
    // Envoy removes after it sets: the credential's own name must not be in the removals.
    assert_eq!(ok.headers_to_remove, vec![TOKEN_HEADER.to_string()]);
    assert_eq!(meta(&r, "cell").as_deref(), Some("agents/creds"));
    assert_eq!(meta(&r, "capability").as_deref(), Some("llm"));
    assert_eq!(meta(&r, "decision").as_deref(), Some("allow"));
    let rid = meta(&r, "request_id").unwrap();
    assert!(ok
        .response_headers_to_add
        .iter()
        .any(|h| h.header.as_ref().unwrap().value == rid));
    let rec = env.f.wait_audit(|x| x["request_id"] == rid.as_str()).await;
    assert_eq!(rec["front_door"], "ext_authz");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["cell"], "creds");
    assert_eq!(rec["capability"], "llm");
    assert_eq!(rec["method"], "POST");
    assert_eq!(rec["host"], "api.test");
    assert_eq!(rec["path"], "/v1/chat/completions");
    assert_eq!(rec["source"], "127.0.0.1:40000");
    assert!(
        env.f.https.requests().is_empty(),
        "Envoy forwards, not the node"
    );

    // A capability without a credential: allowed, no credential to set (only where to connect
    // and for how long); the typed TLV metadata form.
    let mut req = Req::new(&env, "demo", "GET", "api.test", "/v1/models");
    req.typed = true;
    let r = check(&mut c, &req).await;
    assert_eq!(code(&r), 0, "{r:?}");
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
        panic!("{r:?}")
    };
    let keys: Vec<&str> = ok
        .headers
        .iter()
        .map(|h| h.header.as_ref().unwrap().key.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "x-envoy-original-dst-host",
            "x-envoy-upstream-rq-timeout-ms"
        ]
    );
    assert_eq!(meta(&r, "capability").as_deref(), Some("api"));

    // The secret is in no audit record and no metric; decisions are counted by front door.
    let _ = env.f.node().shared.audit.flush().await;
    assert!(!std::fs::read_to_string(&env.f.audit)
        .unwrap()
        .contains(SECRET));
    let metrics = env.f.admin_get("/metrics").await.body;
    assert!(!metrics.contains(SECRET));
    assert!(
        metrics.contains("front_door=\"ext_authz\""),
        "decisions counted: {metrics}"
    );
    // Both Checks above were timed by the handler histogram.
    assert!(
        metrics
            .lines()
            .any(|l| l == "cellgate_ext_authz_check_duration_seconds_count 2"),
        "handler time: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_is_a_403_with_the_intakes_body_recorded_before_the_answer() {
    let env = start().await;
    let mut c = client(env.addr).await;
    let r = check(
        &mut c,
        &Req::new(&env, "demo", "DELETE", "api.test", "/admin/users"),
    )
    .await;
    assert_eq!(code(&r), 7);
    let (status, j) = denied(&r);
    assert_eq!(status, 403);
    assert_eq!(j["error"], "cellgate_denied");
    assert_eq!(j["cell"], "agents/demo");
    let rid = j["request_id"].as_str().unwrap().to_string();
    let on_disk = std::fs::read_to_string(&env.f.audit).unwrap();
    assert!(
        on_disk.contains(&rid),
        "deny record not durable before the answer"
    );
    let rec = env.f.wait_audit(|x| x["request_id"] == rid.as_str()).await;
    assert_eq!(rec["front_door"], "ext_authz");
    assert_eq!(rec["decision"], "deny");
    // The same request through the intake: the same body, field for field but the request id.
    let intake = env
        .f
        .https_get("api.test", "api.test", "/admin/users", "DELETE")
        .await;
    assert_eq!(intake.status, 403);
    let mut a = intake.json();
    let mut b = j.clone();
    a["request_id"] = serde_json::Value::Null;
    b["request_id"] = serde_json::Value::Null;
    assert_eq!(a, b);
    let rec = env
        .f
        .wait_audit(|x| x["front_door"] == "intake" && x["decision"] == "deny")
        .await;
    assert_eq!(rec["reason"], j["reason"]);

    // Refused before policy, as by the intake: SNI and Host disagree (domain fronting).
    let mut fronted = Req::new(&env, "demo", "GET", "evil.test", "/v1/x");
    fronted.sni = Some("api.test");
    let (status, j) = denied(&check(&mut c, &fronted).await);
    assert_eq!(
        (status, j["reason"].as_str()),
        (403, Some("sni_host_mismatch"))
    );
    // A Host port other than the dialled one.
    let mut port = Req::new(&env, "demo", "GET", "api.test", "/v1/x");
    port.host = "api.test:1".into();
    let (_, j) = denied(&check(&mut c, &port).await);
    assert_eq!(j["reason"], "authority_port_mismatch");
    // Unknown host.
    let mut evil = Req::new(&env, "demo", "GET", "evil.test", "/");
    evil.sni = Some("evil.test");
    let (_, j) = denied(&check(&mut c, &evil).await);
    assert_eq!(j["reason"], "no_capability");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_allows_and_records_shadow_deny() {
    let env = start().await;
    let mut c = client(env.addr).await;
    let r = check(
        &mut c,
        &Req::new(&env, "demo", "GET", "shadow.test", "/not-ok"),
    )
    .await;
    assert_eq!(code(&r), 0, "shadow mode must not deny: {r:?}");
    assert!(matches!(r.http_response, Some(HttpResponse::OkResponse(_))));
    assert_eq!(meta(&r, "decision").as_deref(), Some("shadow_deny"));
    let rid = meta(&r, "request_id").unwrap();
    let rec = env.f.wait_audit(|x| x["request_id"] == rid.as_str()).await;
    assert_eq!(rec["decision"], "shadow_deny");
    assert_eq!(rec["capability"], "shadowcap");
    assert_eq!(rec["front_door"], "ext_authz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_rule_applies() {
    let env = start().await;
    let mut c = client(env.addr).await;
    let base = Req::new(&env, "demo", "GET", "api.test", "/v1/models");
    let now = cellgate_node::decide::now_secs();
    let expect = |r: CheckResponse, reason: &str| {
        assert_eq!(code(&r), 7, "{reason}: {r:?}");
        let (status, j) = denied(&r);
        assert_eq!(status, 403, "{reason}");
        assert_eq!(j["reason"], reason, "{j}");
        assert_eq!(j["error"], "cellgate_denied");
        j["request_id"].as_str().unwrap().to_string()
    };

    let mut r = base.clone();
    r.token = None;
    let rid = expect(check(&mut c, &r).await, "token_missing");
    let rec = env.f.wait_audit(|x| x["request_id"] == rid.as_str()).await;
    assert_eq!(rec["front_door"], "ext_authz");
    assert_eq!(rec["reason"], "token_missing");

    let mut r = base.clone();
    r.token = Some("not-a-jwt".into());
    expect(check(&mut c, &r).await, "token_malformed");

    // A flipped signature.
    let good = env.f.token("demo");
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[3] = if sig[3] == b'A' { b'B' } else { b'A' };
    let mut r = base.clone();
    r.token = Some(format!("{head}.{}", String::from_utf8(sig).unwrap()));
    expect(check(&mut c, &r).await, "token_bad_signature");

    let mut claims = env.f.claims("demo");
    claims.iat = now - 7200;
    claims.nbf = now - 7200;
    claims.exp = now - 3600;
    let mut r = base.clone();
    r.token = Some(env.f.sign(&claims));
    let rid = expect(check(&mut c, &r).await, "token_expired");
    env.f
        .wait_audit(|x| x["request_id"] == rid.as_str() && x["reason"] == "token_expired")
        .await;

    let mut claims = env.f.claims("demo");
    claims.aud = "someone-else".into();
    let mut r = base.clone();
    r.token = Some(env.f.sign(&claims));
    expect(check(&mut c, &r).await, "token_wrong_audience");

    // Revoked after first use: the verified-token cache must not keep it alive.
    let claims = env.f.claims("demo");
    let tok = env.f.sign(&claims);
    let mut r = base.clone();
    r.token = Some(tok);
    assert_eq!(code(&check(&mut c, &r).await), 0);
    env.f.node().shared.verifier.revoke(&claims.jti);
    expect(check(&mut c, &r).await, "token_revoked");

    // Bound to 127.0.0.1, presented from another source.
    let mut r = base.clone();
    r.source = "10.9.9.9";
    let rid = expect(check(&mut c, &r).await, "source_not_bound");
    let rec = env.f.wait_audit(|x| x["request_id"] == rid.as_str()).await;
    assert_eq!(rec["source"], "10.9.9.9:40000");
    assert_eq!(rec["cell"], "demo");

    let mut r = base.clone();
    r.token = Some(env.f.token("ghost"));
    expect(check(&mut c, &r).await, "cell_unknown");

    // The configured header is the fallback when Envoy passes no TLV metadata, and is removed.
    let mut r = base.clone();
    r.token = None;
    r.headers.push((TOKEN_HEADER, env.f.token("demo")));
    let resp = check(&mut c, &r).await;
    assert_eq!(code(&resp), 0, "{resp:?}");
    let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
        panic!()
    };
    assert!(ok.headers_to_remove.contains(&TOKEN_HEADER.to_string()));
    // Metadata wins over the header: a garbage header does not matter.
    let mut r = base.clone();
    r.headers.push((TOKEN_HEADER, "garbage".into()));
    assert_eq!(code(&check(&mut c, &r).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_outage_is_a_503_and_never_an_allow() {
    let env = start().await;
    let mut c = client(env.addr).await;
    let r = check(
        &mut c,
        &Req::new(&env, "nocreds", "GET", "api.test", "/v1/models"),
    )
    .await;
    assert_eq!(code(&r), 14);
    let (status, j) = denied(&r);
    assert_eq!(status, 503);
    assert_eq!(j["error"], "cellgate_credential_unavailable");
    assert_eq!(j["capability"], "llm");
    let rid = j["request_id"].as_str().unwrap().to_string();
    let rec = env
        .f
        .wait_audit(|x| x["request_id"] == rid.as_str() && x["reason"] == "credential_unavailable")
        .await;
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["front_door"], "ext_authz");
    // Why is in the record, never in the answer; and it is the request's only record.
    assert!(!j.to_string().contains("could not provide"), "{j}");
    assert!(
        rec["reasons"].to_string().contains("could not provide"),
        "{rec}"
    );
    let _ = env.f.node().shared.audit.flush().await;
    let records = std::fs::read_to_string(&env.f.audit).unwrap();
    assert_eq!(records.matches(rid.as_str()).count(), 1, "{records}");
}

/// A client that sends pre-encoded bytes, for requests prost cannot build (a `body` string that
/// is not UTF-8, as Envoy sends one without `pack_as_bytes`).
#[derive(Debug, Clone, Default)]
struct RawCodec;
#[derive(Debug, Clone, Default)]
struct RawEnc;
#[derive(Debug, Clone, Default)]
struct RespDec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = CheckResponse;
    type Encoder = RawEnc;
    type Decoder = RespDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RespDec {
        RespDec
    }
}

impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RespDec {
    type Item = CheckResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<CheckResponse>, tonic::Status> {
        let b = src.copy_to_bytes(src.remaining());
        CheckResponse::decode(b)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

async fn check_raw(addr: SocketAddr, wire: Vec<u8>) -> Result<CheckResponse, tonic::Status> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = tonic::client::Grpc::new(ch).max_encoding_message_size(usize::MAX);
    g.ready().await.unwrap();
    g.unary(
        tonic::Request::new(wire),
        http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check"),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_bounded_and_need_not_be_utf8() {
    let env = start().await;
    let mut c = client(env.addr).await;
    // Non-UTF-8 bytes in `body` (field 11), as Envoy sends them: decoded, decided, allowed.
    let mut req = Req::new(&env, "demo", "POST", "api.test", "/v1/upload");
    let payload = vec![0xffu8, 0xfe, b'{', 0x80, b'}', 0xc3];
    req.raw_body = Some(payload.clone());
    req.headers
        .push(("content-type", "application/octet-stream".into()));
    let mut wire = req.build().encode_to_vec();
    let tag = [0x62u8, payload.len() as u8];
    let pos = wire
        .windows(2)
        .position(|w| w == tag)
        .expect("raw_body on the wire");
    wire[pos] = 0x5a; // raw_body (12) -> body (11)
    assert!(
        CheckRequest::decode(wire.as_slice()).is_err(),
        "prost alone refuses it"
    );
    let r = check_raw(env.addr, wire).await.unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    // The same bytes as raw_body (pack_as_bytes: true).
    assert_eq!(code(&check(&mut c, &req).await), 0);

    // Over the bound: 413, recorded, nothing else evaluated.
    let mut big = Req::new(&env, "demo", "POST", "api.test", "/v1/upload");
    big.raw_body = Some(vec![b'x'; MAX_BODY_BYTES + 1]);
    let r = check(&mut c, &big).await;
    let (status, j) = denied(&r);
    assert_eq!(status, 413);
    assert_eq!(j["reason"], "body_too_large");
    let rid = j["request_id"].as_str().unwrap().to_string();
    env.f.wait_audit(|x| x["request_id"] == rid.as_str()).await;
    // Far over it: refused at the gRPC layer, an error for Envoy (fails closed), not an allow.
    let mut huge = Req::new(&env, "demo", "POST", "api.test", "/v1/upload");
    huge.raw_body = Some(vec![b'x'; 3 * MAX_BODY_BYTES]);
    let mut big_client = client(env.addr).await.max_encoding_message_size(usize::MAX);
    let e = big_client.check(huge.build()).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    // Bytes that are not a CheckRequest at all: an error, never an allow.
    let e = check_raw(env.addr, vec![0x0a, 0x05, 0x01])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_are_all_decided_and_recorded() {
    let env = start().await;
    let c = client(env.addr).await;
    let allow = Req::new(&env, "demo", "GET", "api.test", "/v1/models");
    let deny = Req::new(&env, "demo", "DELETE", "api.test", "/admin");
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = c.clone();
        let (allow, deny) = (allow.build(), deny.build());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut no) = (0, 0);
            for i in 0..100 {
                let req = if (i + t) % 10 == 0 {
                    deny.clone()
                } else {
                    allow.clone()
                };
                let r = c.check(req).await.unwrap().into_inner();
                match r.status.unwrap().code {
                    0 => ok += 1,
                    7 => no += 1,
                    other => panic!("unexpected code {other}"),
                }
            }
            (ok, no)
        }));
    }
    let (mut ok, mut no) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        ok += a;
        no += b;
    }
    assert_eq!((ok, no), (1440, 160));
    let _ = env.f.node().shared.audit.flush().await;
    let recs = env.f.audit_records();
    let count = |d: &str| {
        recs.iter()
            .filter(|r| r["front_door"] == "ext_authz" && r["decision"] == d)
            .count()
    };
    assert_eq!((count("allow"), count("deny")), (1440, 160));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_durability_answers_ok_only_once_the_record_is_on_disk() {
    let env = start_with(|c| {
        c.audit_durability = cellgate_node::config::AuditDurability::Strict;
    })
    .await;
    let c = client(env.addr).await;
    let allow = Req::new(&env, "demo", "GET", "api.test", "/v1/models");
    let log = env.f.node().shared.audit.clone();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut c, req, log, audit) = (c.clone(), allow.build(), log.clone(), env.f.audit.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let r = c.check(req.clone()).await.unwrap().into_inner();
                assert_eq!(code(&r), 0);
                // At the moment Envoy hears OK, the record is in the file and synced.
                let durable = log.durable_head().seq;
                let rid = meta(&r, "request_id").unwrap();
                let rec = audit_records(&audit)
                    .into_iter()
                    .find(|x| x["request_id"] == rid.as_str())
                    .unwrap_or_else(|| panic!("no record of {rid} when OK was answered"));
                assert_eq!(rec["decision"], "allow");
                assert!(
                    rec["seq"].as_u64().unwrap() <= durable,
                    "{rec} not durable ({durable})"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_unix_socket_and_fail_closed_when_draining() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let env = start().await;
    let ch = Channel::from_shared(format!("http://{}", env.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(ch);
    for service in [SERVICE_NAME, ""] {
        let s = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "{service:?}");
    }

    // A Unix socket listener serves the same API.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ext_authz.sock");
    let sock2 = sock.clone();
    let f = Fixture::start_with(move |c| c.ext_authz = Some(ListenAddr::Unix(sock2))).await;
    assert_eq!(
        f.node().ext_authz_addr,
        Some(ListenAddr::Unix(sock.clone()))
    );
    let ch = tonic::transport::Endpoint::from_static("http://unix")
        .connect_with_connector(UnixConnector(sock))
        .await
        .unwrap();
    let mut c = AuthorizationClient::new(ch);
    let port = f.https.addr.port();
    let mut req = Req::new(&env, "demo", "GET", "api.test", "/v1/models");
    req.token = Some(f.token("demo"));
    req.dst_port = port;
    req.host = format!("api.test:{port}");
    let r = c.check(req.build()).await.unwrap().into_inner();
    assert_eq!(code(&r), 0, "{r:?}");

    // Draining (or any internal failure): UNAVAILABLE, so Envoy with failure_mode_allow: false
    // refuses the request.
    let svc = CheckService::new(f.node().shared.clone());
    f.node().shared.draining.send_replace(true);
    let e = svc.check(req.build()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
}

#[derive(Clone)]
struct UnixConnector(std::path::PathBuf);

impl tower_service::Service<http::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: http::Uri) -> Self::Future {
        let p = self.0.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(p).await?,
            ))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_in_envoy_mode_retry_approvals_request_budgets_and_what_fails_closed() {
    let env = start().await;
    let port = env.f.https.addr.port();
    install_cell(&env.f, "gov", &governed_cell("gov", port, false)).await;
    install_cell(&env.f, "govcell", &governed_cell("govcell", port, true)).await;
    let mut c = client(env.addr).await;
    let ok = check(
        &mut c,
        &Req::new(&env, "gov", "GET", "api.test", "/v1/free/x"),
    )
    .await;
    assert_eq!(code(&ok), 0, "{ok:?}");
    // Approvals are not held yet; Envoy's responses are not read, so tokens cannot be metered.
    for (path, cap, why) in [
        ("/v1/approve/x", "approved", "holds requests for approval"),
        ("/v1/shadow/x", "shadowed", "holds requests for approval"),
        ("/llm/x", "metered", "cannot read the usage"),
    ] {
        let r = check(&mut c, &Req::new(&env, "gov", "GET", "api.test", path)).await;
        assert_eq!(code(&r), 7, "{path}: {r:?}");
        let (status, body) = denied(&r);
        assert_eq!(status, 403);
        assert_eq!(body["reason"], "governance_unavailable", "{body}");
        assert_eq!(body["capability"], cap, "{body}");
        assert!(body["message"].as_str().unwrap().contains(why), "{body}");
        let rid = body["request_id"].as_str().unwrap().to_string();
        let on_disk = std::fs::read_to_string(&env.f.audit).unwrap();
        assert!(
            on_disk.contains(&rid),
            "denial not durable before the answer"
        );
        let rec = env.f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
        assert_eq!(rec["reason"], "governance_unavailable");
        assert_eq!(rec["front_door"], "ext_authz");
    }
    // Retry-mode approvals: bound to the body Envoy passes; without it, refused.
    let mut post = Req::new(&env, "gov", "POST", "api.test", "/v1/retry/pay");
    post.headers.push(("content-length", "11".into()));
    let r = check(&mut c, &post).await;
    let (_, body) = denied(&r);
    assert_eq!(body["reason"], "governance_unavailable", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("body could not be read whole"),
        "{body}"
    );
    post.raw_body = Some(b"{\"amount\":5}".to_vec());
    let r = check(&mut c, &post).await;
    let (status, body) = denied(&r);
    assert_eq!(status, 403);
    assert_eq!(body["error"], "cellgate_approval_required", "{body}");
    let id = body["approval_id"].as_str().unwrap().to_string();
    let pending = env
        .f
        .node()
        .shared
        .approvals
        .list(cellgate_node::decide::now_ms());
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].key.body_digest,
        cellgate_node::approvals::body_digest(b"{\"amount\":5}")
    );
    env.f
        .node()
        .shared
        .approvals
        .decide(
            &id,
            cellgate_node::approvals::Verdict::Approved { by: "test".into() },
            60,
            1,
            cellgate_node::decide::now_ms(),
        )
        .unwrap();
    let mut other = Req::new(&env, "gov", "POST", "api.test", "/v1/retry/pay");
    other.raw_body = Some(b"{\"amount\":9}".to_vec());
    let r = check(&mut c, &other).await;
    assert_eq!(
        denied(&r).1["reason"],
        "approval_required",
        "another body is not approved"
    );
    let r = check(&mut c, &post).await;
    assert_eq!(code(&r), 0, "the approved request: {r:?}");
    let r = check(&mut c, &post).await;
    assert_eq!(denied(&r).1["reason"], "approval_required", "one use");
    // A request budget: the capability's window (2), and the cell's total (3).
    for (cell, path, allowed, budget, limit) in [
        ("gov", "/v1/budget/x", 2, "requestsPerWindow", 2),
        ("govcell", "/v1/free/x", 3, "requests", 3),
    ] {
        for i in 0..allowed {
            let r = check(&mut c, &Req::new(&env, cell, "GET", "api.test", path)).await;
            assert_eq!(code(&r), 0, "{cell} request {i}: {r:?}");
        }
        let r = check(&mut c, &Req::new(&env, cell, "GET", "api.test", path)).await;
        assert_eq!(code(&r), 7, "{r:?}");
        let (status, body) = denied(&r);
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"], "cellgate_budget_exhausted", "{body}");
        assert_eq!(body["budget"], budget, "{body}");
        assert_eq!(body["limit"], limit, "{body}");
        let rid = body["request_id"].as_str().unwrap().to_string();
        let rec = env.f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
        assert_eq!(rec["reason"], "budget_exhausted");
        assert!(rec["budget"].is_array(), "{rec}");
    }
}

/// A cell whose one capability names an address and injects the `openai` file secret.
fn address_cell(port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: addr, namespace: agents}}\nspec:\n  capabilities:\n    - name: internal\n      destinations: [{{cidr: 127.0.9.6/32, ports: [{port}]}}]\n      credential:\n        file: {{name: openai}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_capability_binds_the_host_to_the_dialled_address_in_envoy_mode() {
    let env = start().await;
    let port = env.f.http.addr.port();
    install_cell(&env.f, "addr", &address_cell(port)).await;
    let mut c = client(env.addr).await;
    let plain = |host: String| {
        let mut r = Req::new(&env, "addr", "GET", "x", "/steal");
        r.host = host;
        r.sni = None;
        r.dst_addr = "127.0.9.6";
        r.dst_port = port;
        r.headers.push((":scheme", "http".into()));
        r
    };
    // Envoy connects to what the Host names: it must be the dialled address itself.
    let ok = check(&mut c, &plain(format!("127.0.9.6:{port}"))).await;
    assert_eq!(code(&ok), 0, "{ok:?}");
    for host in [format!("evil.test:{port}"), format!("localhost:{port}")] {
        let r = check(&mut c, &plain(host.clone())).await;
        assert_eq!(code(&r), 7, "Host {host}: {r:?}");
        let (status, body) = denied(&r);
        assert_eq!(status, 403);
        assert_eq!(body["reason"], "no_capability", "{body}");
        assert!(
            !format!("{r:?}").contains(SECRET),
            "no credential in a denial"
        );
    }
}

/// The enforcement self-check's must-deny destination stays closed through Envoy too, even for
/// a capability that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_check_destination_is_refused_in_envoy_mode() {
    let env = start().await;
    install_cell(
        &env.f,
        "testnet",
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: testnet, namespace: agents}\nspec:\n  capabilities:\n    - name: testnet\n      destinations: [{cidr: 192.0.2.0/24, ports: [9]}]\n",
    )
    .await;
    let mut c = client(env.addr).await;
    let mut r = Req::new(&env, "testnet", "GET", "x", "/");
    r.host = "192.0.2.1:9".into();
    r.sni = None;
    r.dst_addr = "192.0.2.1";
    r.dst_port = 9;
    r.headers.push((":scheme", "http".into()));
    let got = check(&mut c, &r).await;
    assert_eq!(code(&got), 7, "{got:?}");
    let (status, body) = denied(&got);
    assert_eq!(status, 403);
    assert_eq!(body["reason"], "self_check_reserved", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_port_is_decided_for_the_port_envoy_connects_to() {
    let env = start().await;
    let mut c = client(env.addr).await;
    // Dialled to the upstream's port (not 443), Host without a port: Envoy's forward proxy
    // would connect to 443, so the request is refused rather than decided for the dialled port.
    let r = check(&mut c, &Req::new(&env, "creds", "GET", "api.test", "/v1/x")).await;
    assert_eq!(code(&r), 0, "control: with the port named, allowed: {r:?}");
    let mut no_port = Req::new(&env, "creds", "GET", "api.test", "/v1/x");
    no_port.host = "api.test".into();
    let r = check(&mut c, &no_port).await;
    assert_eq!(code(&r), 7, "{r:?}");
    let (status, body) = denied(&r);
    assert_eq!(status, 403);
    assert_eq!(body["reason"], "authority_port_mismatch", "{body}");
    assert!(!format!("{r:?}").contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_pass_in_envoy_mode() {
    let env = start().await;
    let mut c = client(env.addr).await;
    for up in ["h2c", "tls/1.2", "x-tunnel", "websocket, h2c"] {
        let mut r = Req::new(&env, "creds", "GET", "api.test", "/v1/x");
        r.headers.push(("upgrade", up.into()));
        let resp = check(&mut c, &r).await;
        assert_eq!(code(&resp), 7, "Upgrade {up}: {resp:?}");
        assert_eq!(denied(&resp).1["reason"], "upgrade_not_allowed");
    }
    let mut ws = Req::new(&env, "creds", "GET", "api.test", "/v1/x");
    ws.headers.push(("upgrade", "websocket".into()));
    assert_eq!(code(&check(&mut c, &ws).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_envoy_would_forward_unnormalized_are_refused() {
    let env = start().await;
    let mut c = client(env.addr).await;
    // The allowed prefix is /v1/**. Each of these would reach /secret or an ambiguous path.
    for (path, reason) in [
        ("/v1/../secret", "path_not_canonical"),
        ("/v1/%2e%2e/secret", "path_not_canonical"),
        ("/v1//x", "path_not_canonical"),
        ("/v1/..;/secret", "path_dot_segment_parameters"),
        ("/v1/%2fsecret", "path_encoded_slash"),
        ("/v1/%5c..", "path_backslash"),
        ("/v1/%00", "path_control_character"),
    ] {
        let r = check(&mut c, &Req::new(&env, "creds", "GET", "api.test", path)).await;
        assert_eq!(code(&r), 7, "{path}: {r:?}");
        let (status, body) = denied(&r);
        assert_eq!(status, 403);
        assert_eq!(body["reason"], reason, "{path}: {body}");
        assert!(!format!("{r:?}").contains(SECRET));
    }
    // A canonical path with a query is decided as usual.
    let ok = check(
        &mut c,
        &Req::new(&env, "creds", "GET", "api.test", "/v1/x?a=%2e%2e"),
    )
    .await;
    assert_eq!(code(&ok), 0, "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cells_request_rate_is_capped_with_429_in_envoy_mode() {
    let env = start().await;
    let port = env.f.https.addr.port();
    install_cell(
        &env.f,
        "slow",
        &format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: slow, namespace: agents}}\nspec:\n  limits: {{requestsPerSecond: 3}}\n  capabilities:\n    - name: api\n      destinations: [{{host: api.test, ports: [{port}]}}]\n"
        ),
    )
    .await;
    let mut c = client(env.addr).await;
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let r = check(&mut c, &Req::new(&env, "slow", "GET", "api.test", "/x")).await;
        statuses.push(if code(&r) == 0 {
            200
        } else {
            let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
                panic!("{r:?}")
            };
            assert!(d
                .headers
                .iter()
                .any(|h| h.header.as_ref().is_some_and(|h| h.key == "retry-after")));
            denied(&r).0
        });
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // One second's worth (3), plus what refills (3 a second) while the checks are made.
    let refilled = (started.elapsed().as_secs_f64() * 3.0).ceil() as usize;
    assert!(
        ok >= 3 && ok <= 3 + refilled,
        "{statuses:?} in {:?}",
        started.elapsed()
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ppv2_source_that_is_not_the_physical_peer_is_refused() {
    let env = start().await;
    let mut c = client(env.addr).await;
    let ok = check(&mut c, &Req::new(&env, "creds", "GET", "api.test", "/v1/x")).await;
    assert_eq!(code(&ok), 0, "control: {ok:?}");
    // Envoy says the connection came from another address than the PPv2 header claims (a
    // header written by someone other than the pod's tagger), or says nothing at all.
    for peer in [Some("10.9.9.9"), Some("not-an-address"), None] {
        let mut r = Req::new(&env, "creds", "GET", "api.test", "/v1/x");
        let mut built = r.build();
        let headers = &mut built
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap()
            .headers;
        match peer {
            Some(p) => {
                headers.insert(DIRECT_PEER_HEADER.into(), p.into());
            }
            None => {
                headers.remove(DIRECT_PEER_HEADER);
            }
        }
        r.token = None; // unused: the built request carries its own
        let resp = c.check(built).await.unwrap().into_inner();
        assert_eq!(code(&resp), 7, "peer {peer:?}: {resp:?}");
        let (status, body) = denied(&resp);
        assert_eq!(status, 403);
        assert_eq!(body["reason"], "source_mismatch", "{body}");
        assert!(!format!("{resp:?}").contains(SECRET));
    }
    env.f
        .wait_audit(|r| r["reason"] == "source_mismatch" && r["front_door"] == "ext_authz")
        .await;
}

// ---- ext_proc: the node's handle on the responses Envoy streams ----

mod ext_proc_stream {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        processing_request, processing_response, HttpBody, HttpHeaders, ProcessingRequest,
        ProcessingResponse,
    };
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    /// ext_authz's dynamic metadata as Envoy forwards it to ext_proc.
    fn metadata(request_id: &str, decision: &str) -> Metadata {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.into())),
        };
        Metadata {
            filter_metadata: [(
                "envoy.filters.http.ext_authz".to_string(),
                Struct {
                    fields: [
                        ("request_id".to_string(), s(request_id)),
                        ("decision".to_string(), s(decision)),
                    ]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn response_headers(md: Metadata, pairs: &[(&str, &str)]) -> ProcessingRequest {
        ProcessingRequest {
            metadata_context: Some(md),
            request: Some(processing_request::Request::ResponseHeaders(HttpHeaders {
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
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn chunk(data: &str) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(processing_request::Request::ResponseBody(HttpBody {
                body: data.as_bytes().to_vec(),
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// One ext_proc conversation: what Envoy sends, and what the node answers.
    struct Conversation {
        tx: mpsc::Sender<ProcessingRequest>,
        rx: tonic::Streaming<ProcessingResponse>,
    }

    impl Conversation {
        async fn open(addr: SocketAddr) -> Self {
            let mut c = ExternalProcessorClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let (tx, rx) = mpsc::channel(4);
            let rx = c
                .process(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            Self { tx, rx }
        }

        async fn say(&mut self, m: ProcessingRequest) -> Result<ProcessingResponse, tonic::Status> {
            self.tx.send(m).await.unwrap();
            self.next().await
        }

        async fn next(&mut self) -> Result<ProcessingResponse, tonic::Status> {
            tokio::time::timeout(Duration::from_secs(5), self.rx.message())
                .await
                .expect("the node answers")
                .map(|m| m.expect("a message"))
        }
    }

    async fn allowed_id(env: &Env, c: &mut AuthorizationClient<Channel>) -> String {
        let r = check(c, &Req::new(env, "creds", "GET", "api.test", "/v1/models")).await;
        assert_eq!(code(&r), 0, "{r:?}");
        meta(&r, "request_id").unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_cuts_what_envoy_streams_and_refuses_what_has_not_started() {
        let env = start().await;
        let mut c = client(env.addr).await;
        let streaming = allowed_id(&env, &mut c).await;
        let pending = allowed_id(&env, &mut c).await;
        let sized = allowed_id(&env, &mut c).await;

        // A response with a length: passed, nothing more asked.
        let mut conv = Conversation::open(env.addr).await;
        let r = conv
            .say(response_headers(
                metadata(&sized, "allow"),
                &[(":status", "200"), ("content-length", "2")],
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                r.response,
                Some(processing_response::Response::ResponseHeaders(_))
            ),
            "{r:?}"
        );
        assert!(r.mode_override.is_none(), "{r:?}");

        // A stream: its body is asked for, and each chunk passed on unchanged.
        let mut sse = Conversation::open(env.addr).await;
        let r = sse
            .say(response_headers(
                metadata(&streaming, "allow"),
                &[(":status", "200"), ("content-type", "text/event-stream")],
            ))
            .await
            .unwrap();
        assert_eq!(
            r.mode_override.as_ref().map(|m| m.response_body_mode),
            Some(1),
            "STREAMED: {r:?}"
        );
        let r = sse.say(chunk("data: event 0\n\n")).await.unwrap();
        match r.response {
            Some(processing_response::Response::ResponseBody(b)) => {
                assert!(b.response.is_none_or(|c| c.body_mutation.is_none()));
            }
            other => panic!("{other:?}"),
        }

        // The cell is suspended: the stream ends with an error (Envoy resets the response).
        let file = env.f.cells_dir.join("creds.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("spec:\n", "spec:\n  suspended: true\n")).unwrap();
        let err = sse.next().await.expect_err("the stream is cut");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert_eq!(err.message(), "revoked");
        let rec = env
            .f
            .wait_audit(|x| x["request_id"] == streaming.as_str() && x["reason"] == "revoked")
            .await;
        assert_eq!(rec["front_door"], "ext_authz");
        assert!(
            rec["reasons"].to_string().contains("cell_suspended"),
            "{rec}"
        );

        // The response that had not started yet is replaced by a 403.
        let mut late = Conversation::open(env.addr).await;
        let r = late
            .say(response_headers(
                metadata(&pending, "allow"),
                &[(":status", "200"), ("content-length", "2")],
            ))
            .await
            .unwrap();
        let Some(processing_response::Response::ImmediateResponse(i)) = r.response else {
            panic!("not refused: {r:?}");
        };
        assert_eq!(i.status.unwrap().code, 403);
        let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(body["reason"], "revoked");
        assert_eq!(body["request_id"], pending.as_str());
        env.f
            .wait_audit(|x| x["request_id"] == pending.as_str() && x["reason"] == "revoked")
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_what_ext_authz_allowed_reaches_the_agent() {
        let env = start().await;
        let mut c = client(env.addr).await;
        // Envoy's own answers (a refusal by the node, or before it) pass unchanged.
        for md in [metadata("whatever", "deny"), Metadata::default()] {
            let mut conv = Conversation::open(env.addr).await;
            let r = conv
                .say(response_headers(md, &[(":status", "403")]))
                .await
                .unwrap();
            assert!(
                matches!(
                    r.response,
                    Some(processing_response::Response::ResponseHeaders(_))
                ),
                "{r:?}"
            );
        }
        // A response claiming an allow the node never gave: refused.
        let mut conv = Conversation::open(env.addr).await;
        let r = conv
            .say(response_headers(
                metadata("0123456789abcdef0123456789abcdef", "allow"),
                &[(":status", "200")],
            ))
            .await
            .unwrap();
        let Some(processing_response::Response::ImmediateResponse(i)) = r.response else {
            panic!("not refused: {r:?}");
        };
        assert_eq!(i.status.unwrap().code, 403);
        // An id is good for one response only.
        let id = allowed_id(&env, &mut c).await;
        let mut first = Conversation::open(env.addr).await;
        let r = first
            .say(response_headers(
                metadata(&id, "allow"),
                &[(":status", "200"), ("content-length", "0")],
            ))
            .await
            .unwrap();
        assert!(matches!(
            r.response,
            Some(processing_response::Response::ResponseHeaders(_))
        ));
        let mut again = Conversation::open(env.addr).await;
        let r = again
            .say(response_headers(
                metadata(&id, "allow"),
                &[(":status", "200")],
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                r.response,
                Some(processing_response::Response::ImmediateResponse(_))
            ),
            "{r:?}"
        );
    }
}

/// Envoy mode does not read requests' content: a capability that must (inspect, mcp, detect) is
/// refused, never let through unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_capabilities_are_refused_in_envoy_mode() {
    let env = start().await;
    let port = env.f.https.addr.port();
    let cell = format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: content, namespace: agents}}\nspec:\n  capabilities:\n    - name: inspected\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{paths: [\"/v1/inspect/**\"]}}\n      inspect: {{json: true}}\n    - name: tools\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{paths: [\"/mcp\"]}}\n      mcp: {{tools: {{allow: [\"a\"]}}}}\n    - name: detected\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{paths: [\"/v1/detect/**\"]}}\n      detect: {{secrets: deny}}\n    - name: plain\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{paths: [\"/v1/plain/**\"]}}\n"
    );
    install_cell(&env.f, "content", &cell).await;
    let mut c = client(env.addr).await;
    for (path, cap) in [
        ("/v1/inspect/x", "inspected"),
        ("/mcp", "tools"),
        ("/v1/detect/x", "detected"),
    ] {
        let r = check(&mut c, &Req::new(&env, "content", "POST", "api.test", path)).await;
        assert_eq!(code(&r), 7, "{path}: {r:?}");
        let (status, body) = denied(&r);
        assert_eq!(status, 403);
        assert_eq!(body["reason"], "governance_unavailable", "{body}");
        assert_eq!(body["capability"], cap, "{body}");
    }
    let ok = check(
        &mut c,
        &Req::new(&env, "content", "POST", "api.test", "/v1/plain/x"),
    )
    .await;
    assert_eq!(code(&ok), 0, "{ok:?}");
}
