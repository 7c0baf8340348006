//! Reconcile scenarios against kube-rs's mocked API service (`tower_test::mock`): each scenario
//! lists every call the reconciler must make, in order, with its method, URI (query included),
//! content type and body, and the reply the fake API server gives. A scenario fails when a call is
//! missing, extra, out of order, or carries a different body.
//!
//! The pattern is kube-rs's controller-rs `fixtures.rs` (ApiServerVerifier), with the expected
//! calls as data.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellgate_api::crd::AgentCellResource;
use cellgate_identity::{SigningKey, Verifier};
use cellgate_operator::desired::{self, Settings};
use cellgate_operator::metrics::Metrics;
use cellgate_operator::reconcile::{reconcile, Clock, Context, Error};
use cellgate_operator::token;
use cellgate_operator::trust::{poll_once, Poll, Trust, TrustFiles};
use cellgate_tls::TrustBundle;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};

const NS: &str = "agents";
const UID: &str = "0b1c2d3e-0000-4000-8000-000000000001";
const CELL: &str = "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells/triage";
const SA: &str = "/api/v1/namespaces/agents/serviceaccounts/cellgate-triage";
const SECRET: &str = "/api/v1/namespaces/agents/secrets/cellgate-triage-token";
const CA_CM: &str = "/api/v1/namespaces/agents/configmaps/cellgate-triage-ca";
const NETPOL: &str = "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies/cellgate-triage";
const POD: &str = "/api/v1/namespaces/agents/pods/triage";
const REVOCATIONS: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-revocations";
/// 2030-01-01T00:00:00Z
const T0: i64 = 1_893_456_000;
const TTL: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// The scripted API server.

enum Expect {
    Empty,
    Json(Value),
}

enum Reply {
    Json(Value),
    NotFound,
}

struct Call {
    method: Method,
    uri: String,
    content_type: Option<&'static str>,
    body: Expect,
    reply: Reply,
}

fn ssa_uri(path: &str) -> String {
    format!("{path}?&force=true&fieldManager=cellgate-operator")
}

fn get(path: &str, reply: Reply) -> Call {
    Call {
        method: Method::GET,
        uri: path.to_string(),
        content_type: None,
        body: Expect::Empty,
        reply,
    }
}

/// A server-side apply with the operator's field manager, forced.
fn apply(path: &str, body: Value, reply: Value) -> Call {
    Call {
        method: Method::PATCH,
        uri: ssa_uri(path),
        content_type: Some("application/apply-patch+yaml"),
        body: Expect::Json(body),
        reply: Reply::Json(reply),
    }
}

fn json_patch(path: &str, body: Value, reply: Value) -> Call {
    Call {
        method: Method::PATCH,
        uri: format!("{path}?"),
        content_type: Some("application/json-patch+json"),
        body: Expect::Json(body),
        reply: Reply::Json(reply),
    }
}

fn merge_patch(path: &str, body: Value, reply: Value) -> Call {
    Call {
        method: Method::PATCH,
        uri: format!("{path}?"),
        content_type: Some("application/merge-patch+json"),
        body: Expect::Json(body),
        reply: Reply::Json(reply),
    }
}

fn create(path: &str, body: Value, reply: Value) -> Call {
    Call {
        method: Method::POST,
        uri: format!("{path}?"),
        content_type: Some("application/json"),
        body: Expect::Json(body),
        reply: Reply::Json(reply),
    }
}

fn delete(path: &str, body: Value, reply: Value) -> Call {
    Call {
        method: Method::DELETE,
        uri: format!("{path}?"),
        content_type: Some("application/json"),
        body: Expect::Json(body),
        reply: Reply::Json(reply),
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

async fn serve(mut handle: Handle, calls: Vec<Call>) {
    let total = calls.len();
    for (i, call) in calls.into_iter().enumerate() {
        let n = i + 1;
        let Some((req, send)) = handle.next_request().await else {
            panic!(
                "call {n}/{total} missing: expected {} {}",
                call.method, call.uri
            );
        };
        let what = format!("call {n}/{total} ({} {})", call.method, call.uri);
        assert_eq!(req.method(), call.method, "{what}: method");
        assert_eq!(req.uri().to_string(), call.uri, "{what}: uri");
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(ct) = call.content_type {
            assert_eq!(content_type.as_deref(), Some(ct), "{what}: content type");
        }
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        match call.body {
            Expect::Empty => assert!(bytes.is_empty(), "{what}: unexpected body"),
            Expect::Json(expected) => {
                let actual: Value = serde_json::from_slice(&bytes).expect("json body");
                assert!(
                    actual == expected,
                    "{what}: body differs\n--- expected\n{}\n--- actual\n{}",
                    serde_json::to_string_pretty(&expected).unwrap_or_default(),
                    serde_json::to_string_pretty(&actual).unwrap_or_default()
                );
            }
        }
        let response = match call.reply {
            Reply::Json(v) => Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(serde_json::to_vec(&v).expect("reply")))
                .expect("response"),
            Reply::NotFound => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from(
                    serde_json::to_vec(&json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "not found", "reason": "NotFound",
                        "code": 404
                    }))
                    .expect("reply"),
                ))
                .expect("response"),
        };
        send.send_response(response);
    }
    if let Some((req, _)) = handle.next_request().await {
        panic!("unexpected extra call: {} {}", req.method(), req.uri());
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture: a signing key in a tempdir, a fixed clock, fixed token ids.

struct FixedClock {
    now: i64,
    ids: Mutex<VecDeque<String>>,
}

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        self.now
    }

    fn token_id(&self) -> String {
        self.ids
            .lock()
            .expect("ids")
            .pop_front()
            .expect("the scenario did not expect a token to be minted")
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    key: Arc<SigningKey>,
    settings: Settings,
    /// The trust bundle the operator writes (a throwaway cell CA, no system roots).
    ca: TrustBundle,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key_path, _) = SigningKey::generate()
            .expect("generate")
            .write_pair(dir.path())
            .expect("write key");
        let key = Arc::new(SigningKey::load(&key_path).expect("load key"));
        Self {
            _dir: dir,
            key,
            settings: Settings {
                init_image: "ghcr.io/cellgate/cellgate-init:test".into(),
                tagger_image: "ghcr.io/cellgate/cellgate-tagger:test".into(),
                node_cidrs: vec!["10.0.0.0/16".into()],
                cell_max_connections: 1024,
            },
            ca: TrustBundle::new(
                cellgate_tls::Ca::generate("Cellgate test CA")
                    .expect("ca")
                    .cert_pem(),
                None,
            )
            .expect("bundle"),
        }
    }

    /// Runs one reconcile against the scripted calls and checks the server saw exactly them.
    async fn run(
        &self,
        now: i64,
        ids: &[&str],
        cell: &AgentCellResource,
        calls: Vec<Call>,
    ) -> (Result<Action, Error>, Arc<Metrics>) {
        self.run_with(Trust::new(self.ca.clone()), now, ids, cell, calls)
            .await
    }

    /// [`Fixture::run`] with the operator's trust bundle held by `trust`.
    async fn run_with(
        &self,
        trust: Trust,
        now: i64,
        ids: &[&str],
        cell: &AgentCellResource,
        calls: Vec<Call>,
    ) -> (Result<Action, Error>, Arc<Metrics>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(Context::new(
            client,
            self.settings.clone(),
            trust,
            self.key.clone(),
            TTL,
            "cellgate-system".into(),
            metrics.clone(),
            Arc::new(FixedClock {
                now,
                ids: Mutex::new(ids.iter().map(|s| s.to_string()).collect()),
            }),
        ));
        let server = tokio::spawn(serve(handle, calls));
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            reconcile(Arc::new(cell.clone()), ctx.clone()),
        )
        .await
        .expect("reconcile timed out");
        // Dropping the client ends the mock service, so the server sees "no more calls".
        drop(ctx);
        match tokio::time::timeout(Duration::from_secs(10), server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("api server task: {e}"),
            Err(_) => panic!("api server task timed out"),
        }
        (result, metrics)
    }

    fn mint(&self, cell: &AgentCellResource, now: i64, jti: &str) -> token::CurrentToken {
        token::mint(
            &self.key,
            &cell.to_model().expect("model"),
            now,
            TTL,
            jti.into(),
        )
        .expect("mint")
    }

    fn secret(&self, cell: &AgentCellResource, t: &token::CurrentToken) -> Value {
        to_value(&desired::token_secret(cell, &t.issued).expect("secret"))
    }
}

fn to_value(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("json")
}

fn rfc(secs: i64) -> String {
    token::rfc3339(secs).expect("time")
}

// ---------------------------------------------------------------------------------------------
// Cells and the objects the fake server holds.

fn template() -> Value {
    json!({
        "metadata": {"labels": {"app": "triage"}},
        "spec": {"containers": [{"name": "agent", "image": "ghcr.io/example/agent:1.0",
                                  "securityContext": {"runAsUser": 1000}}]}
    })
}

fn github() -> Value {
    json!({"name": "github", "destinations": [{"host": "api.github.com"}]})
}

struct CellBuilder {
    generation: i64,
    spec: Value,
    status: Option<Value>,
    finalizer: bool,
    deleting: bool,
}

impl CellBuilder {
    fn new(generation: i64) -> Self {
        Self {
            generation,
            spec: json!({"role": "support", "capabilities": [github()], "template": template()}),
            status: None,
            finalizer: true,
            deleting: false,
        }
    }

    fn json(&self) -> Value {
        let mut meta = json!({
            "name": "triage", "namespace": NS, "uid": UID, "generation": self.generation,
            "resourceVersion": "100",
        });
        if self.finalizer {
            meta["finalizers"] = json!(["cellgate.dev/token-revocation"]);
        }
        if self.deleting {
            meta["deletionTimestamp"] = json!("2030-01-01T00:30:00Z");
        }
        let mut v = json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
            "metadata": meta, "spec": self.spec,
        });
        if let Some(st) = &self.status {
            v["status"] = st.clone();
        }
        v
    }

    fn build(&self) -> AgentCellResource {
        serde_json::from_value(self.json()).expect("cell")
    }
}

/// The status body the operator applies (enforcement never included).
fn status_body(status: Value) -> Value {
    json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell", "status": status})
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    t: &str,
    generation: i64,
) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": t, "observedGeneration": generation})
}

/// A pod as the API server returns it: the desired pod, scheduled and in a phase.
fn live_pod(desired_pod: &Value, phase: &str, ready: bool) -> Value {
    let mut p = desired_pod.clone();
    p["metadata"]["uid"] = json!("pod-uid-1");
    p["spec"]["nodeName"] = json!("node-1");
    p["status"] = json!({
        "phase": phase, "podIP": "10.1.0.5",
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
    });
    p
}

/// The status of a running cell at `generation` whose node enforces `enforced`.
fn running_status(generation: i64, t: &token::CurrentToken, enforced: i64, since: &str) -> Value {
    let enforced_cond = if enforced == generation {
        condition(
            "Enforced",
            "True",
            "GenerationEnforced",
            &format!("node node-1 enforces generation {generation}"),
            since,
            generation,
        )
    } else {
        condition(
            "Enforced",
            "False",
            "GenerationBehind",
            &format!("node node-1 enforces generation {enforced}, the cell is at {generation}"),
            since,
            generation,
        )
    };
    json!({
        "phase": "Running",
        "conditions": [
            condition("TokenIssued", "True", "TokenValid",
                      &format!("token {} expires at {}", t.issued.id, t.issued.expiry), since, generation),
            condition("PodReady", "True", "PodReady", "the pod is ready", since, generation),
            enforced_cond,
        ],
        "observedGeneration": generation,
        "capabilities": 1,
        "tokenId": t.issued.id,
        "tokenExpiry": t.issued.expiry,
        "node": "node-1",
        "podIP": "10.1.0.5",
    })
}

fn with_enforcement(mut status: Value, generation: i64) -> Value {
    status["enforcement"] = json!({"node": "node-1", "observedGeneration": generation, "time": "2030-01-01T00:00:01.5Z"});
    status
}

/// The calls of an apply up to and including the pod lookup, for a cell whose token `t` is in
/// its Secret (`existing`: what the GET returns) and whose pod is `pod` (None: 404).
fn child_calls(
    fx: &Fixture,
    cell: &AgentCellResource,
    existing_secret: Option<Value>,
    t: &token::CurrentToken,
    pod: Option<Value>,
) -> Vec<Call> {
    let sa = to_value(&desired::service_account(cell).expect("sa"));
    // The cell's bundle, annotated with the fingerprints of the cell CAs it holds (what a CA
    // rotation checks).
    let mut ca = desired::ca_bundle(cell, &fx.ca).expect("ca");
    cellgate_operator::ca::annotate_bundle(&mut ca, &fx.ca);
    let ca = to_value(&ca);
    let np = to_value(&desired::network_policy(cell, &fx.settings).expect("np"));
    let secret = fx.secret(cell, t);
    vec![
        apply(SA, sa.clone(), sa),
        get(
            SECRET,
            existing_secret.map(Reply::Json).unwrap_or(Reply::NotFound),
        ),
        apply(SECRET, secret.clone(), secret),
        apply(CA_CM, ca.clone(), ca),
        apply(NETPOL, np.clone(), np),
        get(POD, pod.map(Reply::Json).unwrap_or(Reply::NotFound)),
    ]
}

fn desired_pod(fx: &Fixture, cell: &AgentCellResource) -> Value {
    to_value(&desired::pod(cell, &fx.settings).expect("pod"))
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

#[tokio::test]
async fn create_adds_the_finalizer_then_applies_every_child_and_the_status() {
    let fx = Fixture::new();
    // First reconcile: only the finalizer, nothing else (the patch triggers the next reconcile).
    let fresh = CellBuilder {
        finalizer: false,
        ..CellBuilder::new(1)
    };
    let with_fin = CellBuilder::new(1);
    let (res, _) = fx
        .run(
            T0,
            &[],
            &fresh.build(),
            vec![json_patch(
                CELL,
                json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": ["cellgate.dev/token-revocation"]}
                ]),
                with_fin.json(),
            )],
        )
        .await;
    assert_eq!(res.expect("reconcile"), Action::await_change());

    // Second reconcile: SA, Secret (token minted), CA, NetworkPolicy, Pod, status.
    let cell = with_fin.build();
    let t = fx.mint(&cell, T0, "jti-1");
    let pod = desired_pod(&fx, &cell);
    let mut calls = child_calls(&fx, &cell, None, &t, None);
    calls.push(apply(POD, pod.clone(), live_pod(&pod, "Pending", false)));
    let now = rfc(T0);
    calls.push(apply(
        &format!("{CELL}/status"),
        status_body(json!({
            "phase": "Pending",
            "conditions": [
                condition("TokenIssued", "True", "TokenValid",
                          &format!("token jti-1 expires at {}", rfc(T0 + 3600)), &now, 1),
                condition("PodReady", "False", "PodPending", "the pod is not running yet", &now, 1),
                condition("Enforced", "Unknown", "NotReported",
                          "no node has reported enforcing this cell yet", &now, 1),
            ],
            "observedGeneration": 1,
            "capabilities": 1,
            "tokenId": "jti-1",
            "tokenExpiry": "2030-01-01T01:00:00Z",
            "node": "node-1",
            "podIP": "10.1.0.5",
        })),
        with_fin.json(),
    ));
    let (res, metrics) = fx.run(T0, &["jti-1"], &cell, calls).await;
    // Requeued for rotation when a third of the lifetime is left.
    assert_eq!(
        res.expect("reconcile"),
        Action::requeue(Duration::from_secs(2400))
    );
    assert!(metrics
        .encode()
        .contains("cellgate_operator_tokens_minted_total{reason=\"missing\"} 1"));

    // The minted token verifies with the control plane's public key and names the cell.
    let claims = Verifier::new(&[fx.key.public_key()])
        .verify(&t.issued.token, T0 + 1)
        .expect("token verifies");
    assert_eq!(
        (
            claims.iss.as_str(),
            claims.aud.as_str(),
            claims.cell_uid.as_str()
        ),
        ("cellgate-operator", "cellgate-node", UID)
    );
    assert_eq!(
        (claims.namespace.as_str(), claims.name.as_str()),
        (NS, "triage")
    );
    assert_eq!(claims.role.as_deref(), Some("support"));
    assert_eq!(claims.jti, "jti-1");
}

/// A cell that has been running at generation 1 with token `t`: its status, Secret and pod.
struct Running {
    t: token::CurrentToken,
    secret: Value,
    pod: Value,
    status: Value,
}

fn running(fx: &Fixture, generation_status: i64, enforced: i64) -> Running {
    let cell = CellBuilder::new(1).build();
    let t = fx.mint(&cell, T0, "jti-1");
    let secret = fx.secret(&cell, &t);
    let pod = live_pod(&desired_pod(fx, &cell), "Running", true);
    let status = with_enforcement(
        running_status(generation_status, &t, enforced, "2030-01-01T00:00:05Z"),
        enforced,
    );
    Running {
        t,
        secret,
        pod,
        status,
    }
}

#[tokio::test]
async fn steady_state_writes_no_status_and_keeps_the_pod() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let cell = CellBuilder {
        status: Some(r.status.clone()),
        ..CellBuilder::new(1)
    }
    .build();
    // Ten minutes later: token kept, pod untouched, status unchanged: no status write.
    let calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let (res, _) = fx.run(T0 + 600, &[], &cell, calls).await;
    assert_eq!(
        res.expect("reconcile"),
        Action::requeue(Duration::from_secs(1800))
    );
}

/// The watcher's part and the reconciler's: a new cell CA appended to the CA file (a rotation
/// starting), then new system roots, each seen by one poll of the files, trigger the bulk
/// reconcile and are written into the cell's CA ConfigMap (bundle.pem, truststore.p12, ca.crt),
/// while the pod stays (its template does not depend on the bundle: kubelet refreshes the
/// mounted files in place).
#[tokio::test]
async fn a_changed_ca_or_system_roots_file_is_written_into_the_configmap_and_the_pod_stays() {
    let mut fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let cell = CellBuilder {
        status: Some(r.status.clone()),
        ..CellBuilder::new(1)
    }
    .build();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = TrustFiles {
        ca_cert: dir.path().join("ca.crt"),
        system_roots: Some(dir.path().join("roots.pem")),
    };
    let pem = |name: &str| {
        cellgate_tls::Ca::generate(name)
            .expect("ca")
            .cert_pem()
            .to_string()
    };
    let (old_ca, root) = (fx.ca.cell_ca_pem().to_string(), pem("Test system root"));
    std::fs::write(&files.ca_cert, &old_ca).expect("write");
    std::fs::write(dir.path().join("roots.pem"), &root).expect("write");
    let (mut seen, bundle) = files.load().expect("load");
    let trust = Trust::new(bundle.clone());
    let mut changes = Box::pin(trust.changes());
    let mut refused = None;
    let ca_cm_body = |calls: &[Call]| -> Value {
        let call = calls
            .iter()
            .find(|c| c.uri.starts_with(CA_CM))
            .expect("the CA ConfigMap is applied");
        match &call.body {
            Expect::Json(v) => v.clone(),
            Expect::Empty => panic!("no body"),
        }
    };

    fx.ca = bundle;
    let calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let before = ca_cm_body(&calls);
    let (res, _) = fx
        .run_with(trust.clone(), T0 + 600, &[], &cell, calls)
        .await;
    res.expect("reconcile");

    // The rotation appends the new CA: the next poll sees it and fires the trigger.
    let new_ca = pem("Cellgate next CA");
    std::fs::write(&files.ca_cert, format!("{old_ca}{new_ca}")).expect("write");
    assert_eq!(
        poll_once(&files, &trust, &mut seen, &mut refused),
        Poll::Changed
    );
    tokio::time::timeout(Duration::from_secs(1), changes.next())
        .await
        .expect("the controller is triggered")
        .expect("open");
    fx.ca = (*trust.current()).clone();
    let calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let rotated = ca_cm_body(&calls);
    assert_eq!(rotated["data"]["ca.crt"], format!("{old_ca}{new_ca}"));
    let bundle_pem = rotated["data"]["bundle.pem"].as_str().expect("bundle.pem");
    let in_bundle = cellgate_tls::trust::parse_certificates(bundle_pem).expect("pem");
    assert_eq!(in_bundle.len(), 3, "the root and both cell CAs");
    assert_ne!(
        rotated["binaryData"]["truststore.p12"], before["binaryData"]["truststore.p12"],
        "the Java trust store follows"
    );
    // Exactly the scripted calls: the ConfigMap applied with the new content, the pod found
    // with its hash and left alone (no delete), no status write.
    let (res, _) = fx
        .run_with(trust.clone(), T0 + 660, &[], &cell, calls)
        .await;
    res.expect("reconcile");

    // New system roots in the operator's image or volume: the same path.
    let root2 = pem("Test system root 2");
    std::fs::write(dir.path().join("roots.pem"), format!("{root}{root2}")).expect("write");
    assert_eq!(
        poll_once(&files, &trust, &mut seen, &mut refused),
        Poll::Changed
    );
    tokio::time::timeout(Duration::from_secs(1), changes.next())
        .await
        .expect("the controller is triggered")
        .expect("open");
    fx.ca = (*trust.current()).clone();
    let calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let roots_changed = ca_cm_body(&calls);
    let bundle_pem = roots_changed["data"]["bundle.pem"]
        .as_str()
        .expect("bundle.pem");
    assert_eq!(
        cellgate_tls::trust::parse_certificates(bundle_pem)
            .expect("pem")
            .len(),
        4
    );
    let (res, _) = fx
        .run_with(trust.clone(), T0 + 720, &[], &cell, calls)
        .await;
    res.expect("reconcile");
}

#[tokio::test]
async fn capability_change_leaves_the_pod_and_reports_the_new_generation() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let mut b = CellBuilder::new(2);
    b.spec["capabilities"] =
        json!([github(), {"name": "pypi", "destinations": [{"host": "pypi.org"}]}]);
    b.status = Some(r.status.clone());
    let cell = b.build();
    // Same pod (its hash does not depend on capabilities): no pod write.
    let mut calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let mut st = running_status(2, &r.t, 1, "2030-01-01T00:00:05Z");
    st["capabilities"] = json!(2);
    // Enforced flips to False (the node still enforces 1): its transition time is now.
    st["conditions"][2]["lastTransitionTime"] = json!(rfc(T0 + 600));
    calls.push(apply(&format!("{CELL}/status"), status_body(st), b.json()));
    let (res, _) = fx.run(T0 + 600, &[], &cell, calls).await;
    res.expect("reconcile");
}

#[tokio::test]
async fn suspend_sets_the_phase_and_leaves_the_pod_running() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let mut b = CellBuilder::new(2);
    b.spec["suspended"] = json!(true);
    b.status = Some(r.status.clone());
    let cell = b.build();
    let mut calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let mut st = running_status(2, &r.t, 1, "2030-01-01T00:00:05Z");
    st["phase"] = json!("Suspended");
    st["message"] = json!("suspended: every request of the cell is denied; the pod keeps running");
    st["conditions"][2]["lastTransitionTime"] = json!(rfc(T0 + 60));
    calls.push(apply(&format!("{CELL}/status"), status_body(st), b.json()));
    let (res, _) = fx.run(T0 + 60, &[], &cell, calls).await;
    res.expect("reconcile");
}

#[tokio::test]
async fn revoking_a_capability_is_enforced_without_touching_the_pod() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let mut b = CellBuilder::new(3);
    b.spec["capabilities"] = json!([]);
    // The node already reports the new generation.
    let mut prev = r.status.clone();
    prev["enforcement"]["observedGeneration"] = json!(3);
    b.status = Some(prev);
    let cell = b.build();
    let mut calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let mut st = running_status(3, &r.t, 3, "2030-01-01T00:00:05Z");
    st["capabilities"] = json!(0);
    calls.push(apply(&format!("{CELL}/status"), status_body(st), b.json()));
    let (res, _) = fx.run(T0 + 120, &[], &cell, calls).await;
    res.expect("reconcile");
}

#[tokio::test]
async fn token_near_expiry_is_replaced_and_a_fresh_one_kept() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let cell = CellBuilder {
        status: Some(r.status.clone()),
        ..CellBuilder::new(1)
    }
    .build();

    // One second before two thirds of the lifetime: kept, requeued for that second.
    let calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    let (res, _) = fx.run(T0 + 2399, &[], &cell, calls).await;
    assert_eq!(
        res.expect("reconcile"),
        Action::requeue(Duration::from_secs(1))
    );

    // At two thirds: a new token (jti-2) replaces it, and the status names it.
    let now = T0 + 2400;
    let t2 = fx.mint(&cell, now, "jti-2");
    let mut calls = child_calls(&fx, &cell, Some(r.secret.clone()), &t2, Some(r.pod.clone()));
    let mut st = running_status(1, &t2, 1, "2030-01-01T00:00:05Z");
    st["tokenId"] = json!("jti-2");
    calls.push(apply(
        &format!("{CELL}/status"),
        status_body(st),
        CellBuilder::new(1).json(),
    ));
    let (res, metrics) = fx.run(now, &["jti-2"], &cell, calls).await;
    assert_eq!(
        res.expect("reconcile"),
        Action::requeue(Duration::from_secs(2400))
    );
    assert_ne!(t2.issued.token, r.t.issued.token);
    assert_eq!(t2.issued.expiry, rfc(now + 3600));
    assert!(metrics
        .encode()
        .contains("cellgate_operator_tokens_minted_total{reason=\"near_expiry\"} 1"));
}

#[tokio::test]
async fn template_change_deletes_the_pod_then_recreates_it() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let mut b = CellBuilder::new(2);
    b.spec["template"]["spec"]["containers"][0]["image"] = json!("ghcr.io/example/agent:2.0");
    b.status = Some(r.status.clone());
    let cell = b.build();
    let mut calls = child_calls(
        &fx,
        &cell,
        Some(r.secret.clone()),
        &r.t,
        Some(r.pod.clone()),
    );
    calls.push(delete(
        POD,
        json!({"preconditions": {"uid": "pod-uid-1"}}),
        r.pod.clone(),
    ));
    let mut st = running_status(2, &r.t, 1, "2030-01-01T00:00:05Z");
    st["phase"] = json!("Pending");
    st["message"] = json!("the template changed; the pod is being recreated");
    st["conditions"][1] = condition(
        "PodReady",
        "False",
        "PodRecreating",
        "the template changed; the pod is being recreated",
        &rfc(T0 + 60),
        2,
    );
    st["conditions"][2]["lastTransitionTime"] = json!(rfc(T0 + 60));
    st.as_object_mut().map(|o| {
        o.remove("node");
        o.remove("podIP")
    });
    calls.push(apply(&format!("{CELL}/status"), status_body(st), b.json()));
    let (res, _) = fx.run(T0 + 60, &[], &cell, calls).await;
    assert_eq!(
        res.expect("reconcile"),
        Action::requeue(Duration::from_secs(2))
    );

    // Once the old pod is gone, the new one is applied.
    let new_pod = desired_pod(&fx, &cell);
    assert_ne!(
        new_pod["metadata"]["annotations"]["cellgate.dev/template-hash"],
        r.pod["metadata"]["annotations"]["cellgate.dev/template-hash"]
    );
    let mut calls = child_calls(&fx, &cell, Some(r.secret.clone()), &r.t, None);
    calls.push(apply(
        POD,
        new_pod.clone(),
        live_pod(&new_pod, "Pending", false),
    ));
    let mut st = running_status(2, &r.t, 1, "2030-01-01T00:00:05Z");
    st["phase"] = json!("Pending");
    st["conditions"][1] = condition(
        "PodReady",
        "False",
        "PodPending",
        "the pod is not running yet",
        &rfc(T0 + 70),
        2,
    );
    st["conditions"][2]["lastTransitionTime"] = json!(rfc(T0 + 70));
    calls.push(apply(&format!("{CELL}/status"), status_body(st), b.json()));
    let (res, _) = fx.run(T0 + 70, &[], &cell, calls).await;
    res.expect("reconcile");
}

#[tokio::test]
async fn invalid_spec_writes_only_the_status_naming_the_field() {
    let fx = Fixture::new();
    let mut b = CellBuilder::new(1);
    b.spec["capabilities"] = json!([{"name": "github", "destinations": [{"host": ""}]}]);
    let cell = b.build();
    let now = rfc(T0);
    let calls = vec![apply(
        &format!("{CELL}/status"),
        status_body(json!({
            "phase": "Invalid",
            "message": "spec.capabilities[0].destinations[0].host: empty host",
            "conditions": [
                condition("TokenIssued", "False", "SpecInvalid", "no token is issued for an invalid spec", &now, 1),
                condition("PodReady", "False", "SpecInvalid", "the pod is not changed while the spec is invalid", &now, 1),
                condition("Enforced", "Unknown", "NotReported", "no node has reported enforcing this cell yet", &now, 1),
            ],
            "observedGeneration": 1,
            "capabilities": 1,
        })),
        b.json(),
    )];
    let (res, _) = fx.run(T0, &[], &cell, calls).await;
    assert_eq!(res.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn refused_template_writes_only_the_status() {
    for (patch, field) in [
        (
            json!({"privileged": true}),
            "spec.template.spec.containers[0].securityContext.privileged",
        ),
        (
            json!({"capabilities": {"add": ["NET_ADMIN"]}}),
            "spec.template.spec.containers[0].securityContext.capabilities.add",
        ),
        (
            json!({"runAsUser": 15006}),
            "spec.template.spec.containers[0].securityContext.runAsUser",
        ),
    ] {
        let fx = Fixture::new();
        let mut b = CellBuilder::new(1);
        b.spec["template"]["spec"]["containers"][0]["securityContext"] = patch;
        let cell = b.build();
        let err = desired::pod(&cell, &fx.settings).expect_err("refused");
        assert!(err.to_string().starts_with(field), "{err}");
        let now = rfc(T0);
        let calls = vec![apply(
            &format!("{CELL}/status"),
            status_body(json!({
                "phase": "Invalid",
                "message": err.to_string(),
                "conditions": [
                    condition("TokenIssued", "False", "SpecInvalid", "no token is issued for an invalid spec", &now, 1),
                    condition("PodReady", "False", "SpecInvalid", "the pod is not changed while the spec is invalid", &now, 1),
                    condition("Enforced", "Unknown", "NotReported", "no node has reported enforcing this cell yet", &now, 1),
                ],
                "observedGeneration": 1,
                "capabilities": 1,
            })),
            b.json(),
        )];
        let (res, _) = fx.run(T0, &[], &cell, calls).await;
        assert_eq!(res.expect("reconcile"), Action::await_change());
    }
}

#[tokio::test]
async fn delete_revokes_the_token_before_the_finalizer_goes() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let b = CellBuilder {
        status: Some(r.status.clone()),
        deleting: true,
        ..CellBuilder::new(1)
    };
    let cell = b.build();
    let mut terminating = r.status.clone();
    terminating.as_object_mut().map(|o| o.remove("enforcement"));
    terminating["phase"] = json!("Terminating");
    terminating["message"] = json!("deleted: revoking the cell's token");
    let existing = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cellgate-revocations", "namespace": "cellgate-system"},
        "data": {"expired-jti": "2029-12-31T00:00:00Z", "other-jti": "2031-01-01T00:00:00Z"}
    });
    let calls = vec![
        apply(
            &format!("{CELL}/status"),
            status_body(terminating),
            b.json(),
        ),
        get(SECRET, Reply::Json(r.secret.clone())),
        get(REVOCATIONS, Reply::Json(existing.clone())),
        // The token's jti → expiry, and the expired entry pruned; others untouched.
        merge_patch(
            REVOCATIONS,
            json!({"data": {"jti-1": "2030-01-01T01:00:00Z", "expired-jti": null}}),
            existing,
        ),
        // Only then the finalizer is removed.
        json_patch(
            CELL,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "cellgate.dev/token-revocation"},
                {"op": "remove", "path": "/metadata/finalizers/0"}
            ]),
            b.json(),
        ),
    ];
    let (res, _) = fx.run(T0 + 1800, &[], &cell, calls).await;
    assert_eq!(res.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn delete_creates_the_revocation_list_when_missing_and_keeps_the_finalizer_on_failure() {
    let fx = Fixture::new();
    let r = running(&fx, 1, 1);
    let mut st = r.status.clone();
    st["phase"] = json!("Terminating");
    st["message"] = json!("deleted: revoking the cell's token");
    let b = CellBuilder {
        status: Some(st),
        deleting: true,
        ..CellBuilder::new(1)
    };
    let cell = b.build();
    // Status is already Terminating: not written again. The Secret is gone: the status' token
    // id is revoked.
    let calls = vec![
        get(SECRET, Reply::NotFound),
        get(REVOCATIONS, Reply::NotFound),
        create(
            "/api/v1/namespaces/cellgate-system/configmaps",
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cellgate-revocations", "namespace": "cellgate-system",
                             "labels": {"app.kubernetes.io/managed-by": "cellgate-operator"}},
                "data": {"jti-1": "2030-01-01T01:00:00Z"}
            }),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cellgate-revocations", "namespace": "cellgate-system"}}),
        ),
        json_patch(
            CELL,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "cellgate.dev/token-revocation"},
                {"op": "remove", "path": "/metadata/finalizers/0"}
            ]),
            b.json(),
        ),
    ];
    let (res, _) = fx.run(T0 + 1800, &[], &cell, calls).await;
    assert_eq!(res.expect("reconcile"), Action::await_change());

    // When the revocation list cannot be read, the finalizer is NOT removed and the error is
    // labelled for the retry.
    let calls = vec![
        get(SECRET, Reply::NotFound),
        get(REVOCATIONS, Reply::Json(json!("garbage"))),
    ];
    let (res, _) = fx.run(T0 + 1800, &[], &cell, calls).await;
    let err = res.expect_err("cleanup fails");
    assert_eq!(err.label(), "kube_get");
}
