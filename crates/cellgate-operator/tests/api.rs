//! The control API over real HTTPS on a loopback socket, with a real TLS client (hyper-util and
//! hyper-rustls trusting the server's certificate), and the Kubernetes API answered by kube-rs's
//! mocked service: every TokenReview, SubjectAccessReview, list, get, patch and pod-proxy call
//! is asserted (method, URI, and the body fields that matter), in order, with the fan-out's
//! concurrent node calls matched in any order. Each test ends by checking that no call beyond
//! the script was made and that the operator's audit log holds one intact record per API call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cellgate_operator::api::{self, ApiServer, ApiState};
use cellgate_operator::oplog::OperatorAudit;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

const CNS: &str = "cellgate-system";
const TR: &str = "/apis/authentication.k8s.io/v1/tokenreviews?";
const SAR: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews?";
const NODE_PODS: &str = "/api/v1/namespaces/cellgate-system/pods?&labelSelector=app.kubernetes.io%2Fname%3Dcellgate%2Capp.kubernetes.io%2Fcomponent%3Dnode";
const ADMIN_SECRET: &str = "/api/v1/namespaces/cellgate-system/secrets/cellgate-admin-token";

// ---------------------------------------------------------------------------------------------
// The scripted API server.

type Check = Box<dyn Fn(&http::HeaderMap, &[u8]) + Send>;

struct Call {
    method: Method,
    uri: String,
    check: Option<Check>,
    status: StatusCode,
    reply: Vec<u8>,
}

impl Call {
    fn new(method: Method, uri: impl Into<String>, reply: Value) -> Self {
        Self {
            method,
            uri: uri.into(),
            check: None,
            status: StatusCode::OK,
            reply: serde_json::to_vec(&reply).expect("reply"),
        }
    }

    fn text(method: Method, uri: impl Into<String>, reply: &str) -> Self {
        Self {
            reply: reply.as_bytes().to_vec(),
            ..Self::new(method, uri, Value::Null)
        }
    }

    fn check(mut self, f: impl Fn(&http::HeaderMap, &[u8]) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }
}

fn body_json(b: &[u8]) -> Value {
    serde_json::from_slice(b).expect("json body")
}

/// TokenReview of `token`, answered with `user` (or rejected when `None`).
fn token_review(token: &'static str, user: Option<&'static str>) -> Call {
    let status = match user {
        Some(u) => {
            json!({"authenticated": true, "user": {"username": u, "uid": format!("uid-{u}"), "groups": ["sre", "system:authenticated"]}})
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    Call::new(
        Method::POST,
        TR,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {}, "spec": {"token": token}, "status": status}),
    )
    .check(move |_, b| {
        let v = body_json(b);
        assert_eq!(v["kind"], "TokenReview");
        assert_eq!(
            v["spec"]["token"], token,
            "the caller's bearer token is reviewed"
        );
    })
}

/// SubjectAccessReview for `user` doing `verb` on `resource` (cellgate.dev) in `ns`.
fn access_review(
    user: &'static str,
    verb: &'static str,
    resource: &'static str,
    ns: Option<&'static str>,
    name: Option<&'static str>,
    allowed: bool,
) -> Call {
    Call::new(
        Method::POST,
        SAR,
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
               "metadata": {}, "spec": {}, "status": {"allowed": allowed}}),
    )
    .check(move |_, b| {
        let v = body_json(b);
        let spec = &v["spec"];
        assert_eq!(spec["user"], user);
        assert_eq!(spec["uid"], format!("uid-{user}"));
        assert_eq!(spec["groups"], json!(["sre", "system:authenticated"]));
        let ra = &spec["resourceAttributes"];
        assert_eq!(ra["group"], "cellgate.dev");
        assert_eq!(ra["resource"], resource);
        assert_eq!(ra["verb"], verb);
        assert_eq!(ra.get("namespace").and_then(Value::as_str), ns, "{ra}");
        assert_eq!(ra.get("name").and_then(Value::as_str), name, "{ra}");
    })
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Serves each step (a set of calls answered in any order, for concurrent requests) in order,
/// then fails on any further call within a grace period.
async fn serve(mut handle: Handle, steps: Vec<Vec<Call>>) {
    let total: usize = steps.iter().map(Vec::len).sum();
    let mut n = 0;
    for mut step in steps {
        while !step.is_empty() {
            n += 1;
            let next = tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await;
            let Ok(Some((req, send))) = next else {
                let want: Vec<String> = step
                    .iter()
                    .map(|c| format!("{} {}", c.method, c.uri))
                    .collect();
                panic!("call {n}/{total} missing: expected one of {want:?}");
            };
            let uri = req.uri().to_string();
            let Some(i) = step
                .iter()
                .position(|c| c.method == req.method() && c.uri == uri)
            else {
                let want: Vec<String> = step
                    .iter()
                    .map(|c| format!("{} {}", c.method, c.uri))
                    .collect();
                panic!(
                    "call {n}/{total}: unexpected {} {uri}; expected one of {want:?}",
                    req.method()
                );
            };
            let call = step.remove(i);
            let headers = req.headers().clone();
            let bytes = req.into_body().collect_bytes().await.expect("request body");
            if let Some(check) = &call.check {
                check(&headers, &bytes);
            }
            send.send_response(
                Response::builder()
                    .status(call.status)
                    .body(Body::from(call.reply))
                    .expect("response"),
            );
        }
    }
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
    {
        panic!("unexpected extra call: {} {}", req.method(), req.uri());
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test and an HTTPS client.

struct Fixture {
    dir: tempfile::TempDir,
    server: Option<ApiServer>,
    audit: OperatorAudit,
    mock: tokio::task::JoinHandle<()>,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    base: String,
}

impl Fixture {
    async fn start(steps: Vec<Vec<Call>>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let (audit, _writer) = OperatorAudit::open(&dir.path().join("operator/audit.jsonl"))
            .await
            .expect("audit log");
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mock = tokio::spawn(serve(handle, steps));
        let tls = api::tls::self_signed(&["cellgate-operator-api.cellgate-system.svc".into()])
            .expect("certificate");
        let server = api::start(
            "127.0.0.1:0".parse().expect("addr"),
            tls.config.clone(),
            Arc::new(ApiState {
                client: Client::new(service, "default"),
                control_namespace: CNS.into(),
                audit: audit.clone(),
            }),
        )
        .await
        .expect("start");
        // The client trusts exactly the server's certificate.
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject as _;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        let base = format!("https://localhost:{}", server.addr.port());
        Self {
            dir,
            server: Some(server),
            audit,
            mock,
            client,
            base,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = tokio::time::timeout(
            Duration::from_secs(20),
            self.client.request(req.body(body).expect("request")),
        )
        .await
        .expect("answer in time")
        .expect("https request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("operator/audit.jsonl")
    }

    /// Checks the scripted calls were all made and no other, and returns the audit records.
    async fn finish(mut self) -> Vec<Value> {
        match tokio::time::timeout(Duration::from_secs(15), &mut self.mock).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("api server task: {e}"),
            Err(_) => panic!("api server task timed out"),
        }
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.audit.log().flush().await.expect("flush");
        let report = cellgate_audit::verify_path(&self.log_path()).expect("audit chain intact");
        let text = std::fs::read_to_string(self.log_path()).expect("read log");
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("record"))
            .collect();
        assert_eq!(report.records, records.len() as u64);
        records
    }
}

fn reasons(r: &Value) -> Vec<String> {
    r["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_api_record(r: &Value, method: &str, path: &str, reason: &str, user: &str, status: u16) {
    assert_eq!(r["front_door"], "control_api", "{r}");
    assert_eq!(r["decision"], "control", "{r}");
    assert_eq!(r["node"], "cellgate-operator", "{r}");
    assert_eq!(r["method"], method, "{r}");
    assert_eq!(r["path"], path, "{r}");
    assert_eq!(r["reason"], reason, "{r}");
    let rs = reasons(r);
    assert!(rs.contains(&format!("user={user}")), "{r}");
    assert!(rs.contains(&format!("status={status}")), "{r}");
    assert!(
        r["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{r}"
    );
    // Metadata only: no bearer token in any record.
    for secret in ["tok-alice", "tok-bad", "node-admin-secret"] {
        assert!(!r.to_string().contains(secret), "{r}");
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unauthenticated_forbidden_and_allowed_calls_are_answered_and_audited() {
    let cell = json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
        "metadata": {"name": "triage", "namespace": "agents", "uid": "u-1", "generation": 3},
        "spec": {"role": "support", "capabilities": [{"name": "github"}]},
        "status": {"phase": "Running", "enforcement": {"node": "node-a", "observedGeneration": 3, "time": "t"},
                   "usage": {"node": "node-a", "time": "t", "summary": "github: 3 requests"}}
    });
    let f = Fixture::start(vec![
        // 2: a token the API server rejects.
        vec![token_review("tok-bad", None)],
        // 3: alice may not read the audit of namespace agents.
        vec![token_review("tok-alice", Some("alice"))],
        vec![access_review(
            "alice",
            "list",
            "audit",
            Some("agents"),
            None,
            false,
        )],
        // 4: alice lists the cells of namespace agents.
        vec![token_review("tok-alice", Some("alice"))],
        vec![access_review(
            "alice",
            "list",
            "agentcells",
            Some("agents"),
            None,
            true,
        )],
        vec![Call::new(
            Method::GET,
            "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells?",
            json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCellList",
                   "metadata": {}, "items": [cell.clone()]}),
        )],
        // 5: alice gets one cell, with status, usage and enforcement.
        vec![token_review("tok-alice", Some("alice"))],
        vec![access_review(
            "alice",
            "get",
            "agentcells",
            Some("agents"),
            Some("triage"),
            true,
        )],
        vec![Call::new(
            Method::GET,
            "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells/triage",
            cell,
        )],
    ])
    .await;

    // 1: no token: 401 without asking the API server.
    let (s, h, body) = f
        .call(Method::GET, "/api/v1/cells?namespace=agents", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        h.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    assert_eq!(body_json(body.as_bytes())["error"], "unauthenticated");

    let (s, _, body) = f
        .call(
            Method::GET,
            "/api/v1/cells?namespace=agents",
            Some("tok-bad"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("invalid bearer token"), "{body}");

    let (s, _, body) = f
        .call(
            Method::GET,
            "/api/v1/audit?namespace=agents",
            Some("tok-alice"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let v = body_json(body.as_bytes());
    assert_eq!(v["error"], "forbidden");
    assert_eq!(
        v["message"],
        "alice may not list audit.cellgate.dev in namespace agents"
    );

    let (s, _, body) = f
        .call(
            Method::GET,
            "/api/v1/cells?namespace=agents",
            Some("tok-alice"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v = body_json(body.as_bytes());
    assert_eq!(v["items"][0]["name"], "triage");
    assert_eq!(v["items"][0]["capabilities"], json!(["github"]));
    assert_eq!(v["items"][0]["status"]["phase"], "Running");

    let (s, _, body) = f
        .call(
            Method::GET,
            "/api/v1/namespaces/agents/cells/triage",
            Some("tok-alice"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v = body_json(body.as_bytes());
    assert_eq!(v["status"]["enforcement"]["observedGeneration"], 3);
    assert_eq!(v["status"]["usage"]["summary"], "github: 3 requests");

    let records = f.finish().await;
    assert_eq!(records.len(), 5, "{records:#?}");
    assert_api_record(
        &records[0],
        "GET",
        "/api/v1/cells",
        "unauthenticated",
        "-",
        401,
    );
    assert_api_record(
        &records[1],
        "GET",
        "/api/v1/cells",
        "unauthenticated",
        "-",
        401,
    );
    assert_api_record(
        &records[2],
        "GET",
        "/api/v1/audit",
        "forbidden",
        "alice",
        403,
    );
    assert!(reasons(&records[2]).contains(&"verb=list".to_string()));
    assert!(reasons(&records[2]).contains(&"resource=audit.cellgate.dev".to_string()));
    assert_eq!(records[2]["namespace"], "agents");
    assert_api_record(&records[3], "GET", "/api/v1/cells", "ok", "alice", 200);
    assert_api_record(
        &records[4],
        "GET",
        "/api/v1/namespaces/agents/cells/triage",
        "ok",
        "alice",
        200,
    );
    assert_eq!(records[4]["cell"], "triage");
}

#[tokio::test]
async fn approving_writes_the_caller_as_approver_and_a_decided_one_conflicts() {
    let approval = |decided: bool| {
        let mut a = json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentApproval",
            "metadata": {"name": "ap-1", "namespace": "agents"},
            "spec": {"cell": "triage", "capability": "deploy", "method": "POST",
                     "host": "api.example.com", "path": "/deploy", "bodyDigest": "", "mode": "hold",
                     "requestedAt": "t", "expiresAt": "t", "node": "node-a", "requestId": "r-1"}
        });
        if decided {
            a["status"] = json!({"decision": {"approved": false, "by": "bob", "at": "t"}});
        }
        a
    };
    let path = "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentapprovals/ap-1";
    let f = Fixture::start(vec![
        vec![token_review("tok-alice", Some("alice"))],
        vec![access_review(
            "alice",
            "update",
            "agentapprovals",
            Some("agents"),
            Some("ap-1"),
            true,
        )],
        vec![Call::new(Method::GET, path, approval(false))],
        vec![
            Call::new(Method::PATCH, format!("{path}/status?"), approval(false)).check(|h, b| {
                assert_eq!(
                    h.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes()),
                    Some(&b"application/merge-patch+json"[..])
                );
                let d = &body_json(b)["status"]["decision"];
                assert_eq!(d["approved"], true);
                assert_eq!(d["by"], "alice", "the approver is who TokenReview names");
                assert_eq!(d["validFor"], "15m");
                assert_eq!(d["uses"], 2);
            }),
        ],
        vec![token_review("tok-alice", Some("alice"))],
        vec![access_review(
            "alice",
            "update",
            "agentapprovals",
            Some("agents"),
            Some("ap-1"),
            true,
        )],
        vec![Call::new(Method::GET, path, approval(true))],
    ])
    .await;
    let (s, _, body) = f
        .call(
            Method::POST,
            "/api/v1/namespaces/agents/approvals/ap-1/approve",
            Some("tok-alice"),
            Some(json!({"for": "15m", "uses": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v = body_json(body.as_bytes());
    assert_eq!(v["approved"], true);
    assert_eq!(v["by"], "alice");
    let (s, _, body) = f
        .call(
            Method::POST,
            "/api/v1/namespaces/agents/approvals/ap-1/deny",
            Some("tok-alice"),
            Some(json!({"reason": "too late"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("already denied by bob"), "{body}");
    let records = f.finish().await;
    assert_eq!(records.len(), 2);
    let path = "/api/v1/namespaces/agents/approvals/ap-1/approve";
    assert_api_record(&records[0], "POST", path, "ok", "alice", 200);
    assert!(reasons(&records[0]).contains(&"name=ap-1".to_string()));
    let path = "/api/v1/namespaces/agents/approvals/ap-1/deny";
    assert_api_record(&records[1], "POST", path, "conflict", "alice", 409);
}

fn node_pod(name: &str, node: &str, phase: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": CNS},
           "spec": {"nodeName": node, "containers": []},
           "status": {"phase": phase}})
}

fn rec(node: &str, seq: u64, secs: u32, decision: &str) -> String {
    json!({"node": node, "seq": seq, "time": format!("2030-01-01T00:00:{secs:02}.000000000Z"),
           "cell": "triage", "namespace": "agents", "decision": decision,
           "host": "api.example.com", "reason": "no_capability"})
    .to_string()
}

fn proxy(pod: &str, query: &str, reply: &str) -> Call {
    Call::text(
        Method::GET,
        format!("/api/v1/namespaces/cellgate-system/pods/{pod}:15021/proxy/audit?{query}"),
        reply,
    )
    .check(|h, _| {
        assert_eq!(
            h.get("x-cellgate-admin-token").map(|v| v.as_bytes()),
            Some(&b"node-admin-secret"[..]),
            "the node's admin token goes to the node"
        );
    })
}

fn fan_out_prefix() -> Vec<Vec<Call>> {
    vec![
        vec![token_review("tok-alice", Some("alice"))],
        vec![access_review("alice", "list", "audit", None, None, true)],
        vec![Call::new(
            Method::GET,
            NODE_PODS,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                node_pod("cellgate-node-aaaaa", "node-a", "Running"),
                node_pod("cellgate-node-bbbbb", "node-b", "Running"),
                node_pod("cellgate-node-ccccc", "node-c", "Pending"),
            ]}),
        )],
        vec![Call::new(
            Method::GET,
            ADMIN_SECRET,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "cellgate-admin-token", "namespace": CNS},
                   "data": {"token": "bm9kZS1hZG1pbi1zZWNyZXQ="}}),
        )],
    ]
}

#[tokio::test]
async fn audit_query_fans_out_to_every_node_merges_by_time_and_pages() {
    let filters = "since=2030-01-01T00%3A00%3A00Z&decision=deny&host=api.example.com&limit=3";
    let a1 = [
        rec("node-a", 11, 1, "deny"),
        rec("node-a", 12, 4, "deny"),
        rec("node-a", 13, 6, "deny"),
    ];
    let b1 = [
        rec("node-b", 7, 2, "deny"),
        rec("node-b", 8, 3, "deny"),
        rec("node-b", 9, 5, "deny"),
    ];
    let mut steps = fan_out_prefix();
    steps.push(vec![
        proxy(
            "cellgate-node-aaaaa",
            &format!("{filters}&after=0"),
            &a1.join("\n"),
        ),
        proxy(
            "cellgate-node-bbbbb",
            &format!("{filters}&after=0"),
            &b1.join("\n"),
        ),
    ]);
    // Page 2: each node is asked after the last record of it that page 1 returned.
    steps.extend(fan_out_prefix());
    steps.push(vec![
        proxy(
            "cellgate-node-aaaaa",
            &format!("{filters}&after=11"),
            &a1[1..].join("\n"),
        ),
        proxy(
            "cellgate-node-bbbbb",
            &format!("{filters}&after=8"),
            &b1[2..].join("\n"),
        ),
    ]);
    let f = Fixture::start(steps).await;
    let q = "/api/v1/audit?since=2030-01-01T00:00:00Z&decision=deny&host=api.example.com&limit=3";
    let (s, h, body) = f.call(Method::GET, q, Some("tok-alice"), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        h.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(&b"application/x-ndjson"[..])
    );
    assert_eq!(
        h.get("x-cellgate-nodes").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    let page = |body: &str| -> Vec<(String, u64)> {
        body.lines()
            .map(|l| {
                let v = body_json(l.as_bytes());
                (
                    v["node"].as_str().unwrap_or_default().to_string(),
                    v["seq"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(
        page(&body),
        [
            ("node-a".into(), 11),
            ("node-b".into(), 7),
            ("node-b".into(), 8)
        ]
    );
    let cursor = h
        .get("x-cellgate-cursor")
        .and_then(|v| v.to_str().ok())
        .expect("cursor")
        .to_string();
    let (s, _, body) = f
        .call(
            Method::GET,
            &format!("{q}&cursor={cursor}"),
            Some("tok-alice"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        page(&body),
        [
            ("node-a".into(), 12),
            ("node-b".into(), 9),
            ("node-a".into(), 13)
        ]
    );
    let records = f.finish().await;
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_api_record(r, "GET", "/api/v1/audit", "ok", "alice", 200);
        assert!(reasons(r).contains(&"resource=audit.cellgate.dev".to_string()));
        assert!(r.get("namespace").is_none(), "a cluster-wide query: {r}");
    }
}

#[tokio::test]
async fn a_node_that_does_not_answer_fails_the_query() {
    let mut steps = fan_out_prefix();
    let mut bad = proxy("cellgate-node-bbbbb", "limit=100", "");
    bad.status = StatusCode::SERVICE_UNAVAILABLE;
    bad.reply = serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "no endpoints", "reason": "ServiceUnavailable", "code": 503}))
        .expect("json");
    steps.push(vec![
        proxy(
            "cellgate-node-aaaaa",
            "limit=100",
            &rec("node-a", 1, 1, "deny"),
        ),
        bad,
    ]);
    let f = Fixture::start(steps).await;
    let (s, _, body) = f
        .call(Method::GET, "/api/v1/audit", Some("tok-alice"), None)
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("node node-b (pod cellgate-node-bbbbb)"),
        "{body}"
    );
    let records = f.finish().await;
    assert_api_record(
        &records[0],
        "GET",
        "/api/v1/audit",
        "node_error",
        "alice",
        502,
    );
}

#[tokio::test]
async fn every_documented_route_is_served_and_authorized() {
    // (method, path, body, SAR verb, resource, namespace, name)
    type Row = (
        &'static str,
        &'static str,
        Option<Value>,
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );
    let rows: Vec<Row> = vec![
        (
            "GET",
            "/api/v1/cells",
            None,
            "list",
            "agentcells",
            None,
            None,
        ),
        (
            "GET",
            "/api/v1/namespaces/agents/cells/triage",
            None,
            "get",
            "agentcells",
            Some("agents"),
            Some("triage"),
        ),
        (
            "GET",
            "/api/v1/revocations",
            None,
            "list",
            "revocations",
            None,
            None,
        ),
        (
            "POST",
            "/api/v1/revocations",
            Some(json!({"tokenId": "j", "expiry": "2030-01-01T00:00:00Z"})),
            "create",
            "revocations",
            None,
            None,
        ),
        (
            "GET",
            "/api/v1/approvals?namespace=agents",
            None,
            "list",
            "agentapprovals",
            Some("agents"),
            None,
        ),
        (
            "POST",
            "/api/v1/namespaces/agents/approvals/ap-1/approve",
            Some(json!({})),
            "update",
            "agentapprovals",
            Some("agents"),
            Some("ap-1"),
        ),
        (
            "POST",
            "/api/v1/namespaces/agents/approvals/ap-1/deny",
            Some(json!({"reason": "no"})),
            "update",
            "agentapprovals",
            Some("agents"),
            Some("ap-1"),
        ),
        (
            "GET",
            "/api/v1/lockdown",
            None,
            "get",
            "lockdowns",
            None,
            None,
        ),
        (
            "POST",
            "/api/v1/lockdown",
            Some(json!({"state": "on", "namespace": "agents", "reason": "incident"})),
            "update",
            "lockdowns",
            Some("agents"),
            None,
        ),
        (
            "GET",
            "/api/v1/audit?cell=agents/triage",
            None,
            "list",
            "audit",
            Some("agents"),
            None,
        ),
    ];
    let mut steps = Vec::new();
    for (_, _, _, verb, resource, ns, name) in &rows {
        steps.push(vec![token_review("tok-alice", Some("alice"))]);
        steps.push(vec![access_review(
            "alice", verb, resource, *ns, *name, false,
        )]);
    }
    steps.push(vec![token_review("tok-alice", Some("alice"))]);
    steps.push(vec![token_review("tok-alice", Some("alice"))]);
    let f = Fixture::start(steps).await;
    let mut seen: Vec<(String, String)> = Vec::new();
    for (method, path, body, ..) in &rows {
        let m: Method = method.parse().expect("method");
        let (s, _, text) = f.call(m, path, Some("tok-alice"), body.clone()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {text}");
        seen.push((method.to_string(), path.to_string()));
    }
    let (s, _, doc) = f
        .call(Method::GET, "/api/v1/openapi.json", Some("tok-alice"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let doc = body_json(doc.as_bytes());
    assert_eq!(doc["openapi"], "3.0.3");
    let (s, _, _) = f
        .call(Method::GET, "/api/v1/nothing", Some("tok-alice"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The rows above cover every documented operation but the document itself.
    let documented = doc["paths"].as_object().expect("paths").len();
    assert_eq!(
        documented,
        api::ROUTES
            .iter()
            .map(|(_, p)| p)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    assert_eq!(rows.len() + 1, api::ROUTES.len());
    let records = f.finish().await;
    assert_eq!(records.len(), rows.len() + 2);
    assert_api_record(
        &records[rows.len()],
        "GET",
        "/api/v1/openapi.json",
        "ok",
        "alice",
        200,
    );
    assert_api_record(
        &records[rows.len() + 1],
        "GET",
        "/api/v1/nothing",
        "not_found",
        "alice",
        404,
    );
}

#[tokio::test]
async fn a_call_that_cannot_be_recorded_is_refused() {
    let f = Fixture::start(vec![vec![token_review("tok-alice", Some("alice"))]]).await;
    f.audit.log().clone().close().await.expect("close");
    let (s, _, body) = f
        .call(Method::GET, "/api/v1/openapi.json", Some("tok-alice"), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body_json(body.as_bytes())["error"], "audit_unavailable");
    let mut f = f;
    match tokio::time::timeout(Duration::from_secs(15), &mut f.mock).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        other => panic!("api server task: {other:?}"),
    }
    assert_eq!(
        cellgate_audit::verify_path(&f.log_path())
            .expect("intact")
            .records,
        0
    );
}
