//! The operator's loop under test: the real kube-runtime `Controller`s that
//! [`cellgate_operator::controllers`] builds (watches, triggers, error policy, requeue) and the
//! leader election ([`cellgate_operator::leader`]), against kube-rs's mocked API service on
//! tokio's paused clock, so that backoff and lease timings are measured exactly.
//!
//! The fake API server speaks the API server's list+watch protocol: a list answers the items with
//! the list's `resourceVersion`, a watch (`watch=true`) answers 200 and keeps its body open,
//! streaming one JSON event per line (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) as the test
//! sends them. Every other call is checked against the scenario's script, in order: method, URI
//! (query included: `fieldManager`, `force`, ...), content type and JSON body; the reply is the
//! script's. Leases are kept as the API server keeps them (create refuses an existing one with
//! 409 AlreadyExists, update refuses a stale `resourceVersion` with 409 Conflict). A call that
//! is not the next one scripted fails the scenario.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cellgate_api::crd::AgentCellResource;
use cellgate_identity::SigningKey;
use cellgate_operator::admin::{readiness, AdminState};
use cellgate_operator::config::LeaseTimings;
use cellgate_operator::desired::{self, Settings};
use cellgate_operator::leader::{self, ElectionConfig, Elector, Lost, Outcome};
use cellgate_operator::metrics::Metrics;
use cellgate_operator::policy::PolicyContext;
use cellgate_operator::reconcile::{Clock, Context};
use cellgate_operator::status::{self, Observation, PodObservation};
use cellgate_operator::{controllers, never, token};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::time::Instant;

const NS: &str = "agents";
const CNS: &str = "cellgate-system";
const UID: &str = "0b1c2d3e-0000-4000-8000-000000000001";
const CELL: &str = "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells/triage";
const SA: &str = "/api/v1/namespaces/agents/serviceaccounts/cellgate-triage";
const SECRET: &str = "/api/v1/namespaces/agents/secrets/cellgate-triage-token";
const CA_CM: &str = "/api/v1/namespaces/agents/configmaps/cellgate-triage-ca";
const NETPOL: &str = "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies/cellgate-triage";
const POD: &str = "/api/v1/namespaces/agents/pods/triage";
const REVOCATIONS: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-revocations";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/cellgate-system/leases";
/// 2030-01-01T00:00:00Z
const T0: i64 = 1_893_456_000;
const TTL: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// The fake API server.

type MockBody = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<MockBody>>;

/// The collections the operator watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Watched {
    AgentCells,
    Pods,
    Secrets,
    ConfigMaps,
    ServiceAccounts,
    NetworkPolicies,
    ClusterPolicies,
    Policies,
}

const ALL: [Watched; 8] = [
    Watched::AgentCells,
    Watched::Pods,
    Watched::Secrets,
    Watched::ConfigMaps,
    Watched::ServiceAccounts,
    Watched::NetworkPolicies,
    Watched::ClusterPolicies,
    Watched::Policies,
];

impl Watched {
    fn path(self) -> &'static str {
        match self {
            Watched::AgentCells => "/apis/cellgate.dev/v1alpha1/agentcells",
            Watched::Pods => "/api/v1/pods",
            Watched::Secrets => "/api/v1/secrets",
            Watched::ConfigMaps => "/api/v1/configmaps",
            Watched::ServiceAccounts => "/api/v1/serviceaccounts",
            Watched::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Watched::ClusterPolicies => "/apis/cellgate.dev/v1alpha1/cellgateclusterpolicies",
            Watched::Policies => "/apis/cellgate.dev/v1alpha1/cellgatepolicies",
        }
    }

    fn of(path: &str) -> Option<Self> {
        ALL.into_iter().find(|w| w.path() == path)
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Watched::AgentCells => ("cellgate.dev/v1alpha1", "AgentCellList"),
            Watched::Pods => ("v1", "PodList"),
            Watched::Secrets => ("v1", "SecretList"),
            Watched::ConfigMaps => ("v1", "ConfigMapList"),
            Watched::ServiceAccounts => ("v1", "ServiceAccountList"),
            Watched::NetworkPolicies => ("networking.k8s.io/v1", "NetworkPolicyList"),
            Watched::ClusterPolicies => ("cellgate.dev/v1alpha1", "CellgateClusterPolicyList"),
            Watched::Policies => ("cellgate.dev/v1alpha1", "CellgatePolicyList"),
        }
    }

    /// Whether the collection is the operator's business (as opposed to the Lease).
    fn cell_related(path: &str) -> bool {
        !path.starts_with(LEASES)
    }
}

enum Expect {
    Empty,
    Json(Value),
    /// JSON whose fields at these pointers have these values.
    Fields(Vec<(&'static str, Value)>),
}

enum Reply {
    Json(StatusCode, Value),
    /// Never answered: the call stays in flight (an operator killed mid-call).
    Hang,
}

/// One scripted call and its reply.
struct Step {
    method: Method,
    uri: String,
    content_type: Option<&'static str>,
    body: Expect,
    reply: Reply,
}

/// A call as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    replica: usize,
    at: Duration,
    method: Method,
    uri: String,
    status: u16,
}

impl Seen {
    fn path(&self) -> &str {
        self.uri.split_once('?').map_or(&self.uri, |(p, _)| p)
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    lists: HashMap<Watched, Vec<Value>>,
    watches: Vec<(Watched, tokio::sync::mpsc::UnboundedSender<Bytes>)>,
    script: VecDeque<Step>,
    seen: Vec<Seen>,
    failures: Vec<String>,
    lease: Option<Value>,
    /// Replicas whose Lease calls are answered 500.
    lease_down: HashSet<usize>,
    hung: Vec<tower_test::mock::SendResponse<Response<MockBody>>>,
}

#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    start: Instant,
}

fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .expect("response")
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApi {
    fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State::default())),
            changed: Arc::new(tokio::sync::Notify::new()),
            start: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state")
    }

    /// A client for replica `replica`, answered by this server.
    fn client(&self, replica: usize) -> Client {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        tokio::spawn(self.clone().serve(replica, handle));
        Client::new(svc, "default")
    }

    fn set_list(&self, what: Watched, items: Vec<Value>) {
        let mut s = self.lock();
        let items = items
            .into_iter()
            .map(|mut o| {
                s.rv += 1;
                o["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                o
            })
            .collect();
        s.lists.insert(what, items);
    }

    fn script(&self, steps: Vec<Step>) {
        self.lock().script.extend(steps);
        self.changed.notify_waiters();
    }

    fn line(&self, what: Watched, line: Value) {
        let mut l = line.to_string();
        l.push('\n');
        let b = Bytes::from(l);
        let s = self.lock();
        let mut sent = false;
        for (w, tx) in &s.watches {
            if *w == what && tx.send(b.clone()).is_ok() {
                sent = true;
            }
        }
        assert!(sent, "no open watch of {what:?} to take the event");
    }

    /// Sends a watch event; the object gets the next resourceVersion, as the API server does.
    fn send(&self, what: Watched, type_: &str, mut object: Value) {
        {
            let mut s = self.lock();
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        }
        self.line(what, json!({"type": type_, "object": object}));
    }

    /// A BOOKMARK: only a resourceVersion, no object change.
    fn bookmark(&self, what: Watched) {
        let rv = {
            let mut s = self.lock();
            s.rv += 1;
            s.rv
        };
        let (api_version, list_kind) = what.list_kind();
        let kind = list_kind.trim_end_matches("List");
        self.line(
            what,
            json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": rv.to_string()}}}),
        );
    }

    fn now(&self) -> Duration {
        Instant::now() - self.start
    }

    fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    fn failures(&self) -> Vec<String> {
        self.lock().failures.clone()
    }

    /// Waits (on the paused clock, at most `within`) until `pred` holds.
    async fn until(&self, within: Duration, what: &str, pred: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            {
                let s = self.lock();
                assert!(s.failures.is_empty(), "{:#?}", s.failures);
                if pred(&s) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let s = self.lock();
                panic!(
                    "{what}: not within {within:?}; failures {:#?}; {} steps left (next: {:?}); calls:\n{}",
                    s.failures,
                    s.script.len(),
                    s.script.front().map(|c| format!("{} {}", c.method, c.uri)),
                    calls_text(&s.seen)
                );
            }
        }
    }

    /// Waits until every scripted step was called.
    async fn script_done(&self, within: Duration) {
        self.until(within, "the scripted calls", |s| s.script.is_empty())
            .await;
    }

    /// Lets `d` of virtual time pass and checks that no scripted call was left out and no
    /// unscripted one made.
    async fn quiet_for(&self, d: Duration) {
        tokio::time::sleep(d).await;
        let s = self.lock();
        assert!(s.failures.is_empty(), "{:#?}", s.failures);
        assert!(
            s.script.is_empty(),
            "{} scripted calls not made",
            s.script.len()
        );
    }

    async fn serve(self, replica: usize, mut handle: Handle) {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let uri = parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let answer = self.answer(replica, &parts.method, &uri, content_type, &bytes);
            let at = self.now();
            let mut s = self.lock();
            let status = match &answer {
                Some(r) => r.status().as_u16(),
                None => 0,
            };
            s.seen.push(Seen {
                replica,
                at,
                method: parts.method.clone(),
                uri,
                status,
            });
            match answer {
                Some(r) => send.send_response(r),
                None => s.hung.push(send),
            }
            drop(s);
            self.changed.notify_waiters();
        }
    }

    fn answer(
        &self,
        replica: usize,
        method: &Method,
        uri: &str,
        content_type: Option<String>,
        body: &[u8],
    ) -> Option<Response<MockBody>> {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let mut s = self.lock();
        if *method == Method::GET {
            if let Some(what) = Watched::of(path) {
                if query.split('&').any(|kv| kv == "watch=true") {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
                    s.watches.push((what, tx));
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        let b = rx.recv().await?;
                        Some((Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
                    });
                    return Some(
                        Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(StreamBody::new(stream).boxed_unsync())
                            .expect("response"),
                    );
                }
                let (api_version, kind) = what.list_kind();
                let items = s.lists.get(&what).cloned().unwrap_or_default();
                return Some(json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": api_version, "kind": kind,
                            "metadata": {"resourceVersion": s.rv.max(1).to_string()},
                            "items": items}),
                ));
            }
        }
        if path.starts_with(LEASES) {
            return Some(lease_call(&mut s, replica, method, path, body));
        }
        let Some(step) = s.script.pop_front() else {
            s.failures
                .push(format!("replica {replica}: unexpected call {method} {uri}"));
            return Some(json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status_body(500, "InternalError", "unexpected call"),
            ));
        };
        let what = format!("replica {replica}: {} {}", step.method, step.uri);
        let mut wrong = Vec::new();
        if *method != step.method || uri != step.uri {
            wrong.push(format!("called {method} {uri}"));
        }
        if let Some(ct) = step.content_type {
            if content_type.as_deref() != Some(ct) {
                wrong.push(format!("content type {content_type:?}, expected {ct}"));
            }
        }
        match &step.body {
            Expect::Empty => {
                if !body.is_empty() {
                    wrong.push("unexpected body".into());
                }
            }
            Expect::Fields(fields) => {
                let actual: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                for (pointer, want) in fields {
                    if actual.pointer(pointer) != Some(want) {
                        wrong.push(format!(
                            "{pointer} is {:?}, expected {want}",
                            actual.pointer(pointer)
                        ));
                    }
                }
            }
            Expect::Json(expected) => {
                let actual: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                if actual != *expected {
                    wrong.push(format!(
                        "body differs\n--- expected\n{}\n--- actual\n{}",
                        serde_json::to_string_pretty(expected).unwrap_or_default(),
                        serde_json::to_string_pretty(&actual).unwrap_or_default()
                    ));
                }
            }
        }
        if !wrong.is_empty() {
            s.failures.push(format!("{what}: {}", wrong.join("; ")));
        }
        match step.reply {
            Reply::Json(status, v) => Some(json_response(status, &v)),
            Reply::Hang => None,
        }
    }
}

/// The Lease endpoints, kept as the API server keeps them.
fn lease_call(
    s: &mut State,
    replica: usize,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Response<MockBody> {
    if s.lease_down.contains(&replica) {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status_body(500, "InternalError", "etcdserver: request timed out"),
        );
    }
    let named = format!("{LEASES}/{}", leader::LEASE_NAME);
    let sent: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match (method, path) {
        (&Method::GET, p) if p == named => match &s.lease {
            Some(l) => json_response(StatusCode::OK, l),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status_body(404, "NotFound", "leases \"cellgate-operator\" not found"),
            ),
        },
        (&Method::POST, p) if p == LEASES => {
            if s.lease.is_some() {
                return json_response(
                    StatusCode::CONFLICT,
                    &status_body(
                        409,
                        "AlreadyExists",
                        "leases \"cellgate-operator\" already exists",
                    ),
                );
            }
            s.rv += 1;
            let mut l = sent;
            l["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.lease = Some(l.clone());
            json_response(StatusCode::CREATED, &l)
        }
        (&Method::PUT, p) if p == named => {
            let current = s
                .lease
                .as_ref()
                .map(|l| l["metadata"]["resourceVersion"].clone());
            if current != Some(sent["metadata"]["resourceVersion"].clone()) {
                return json_response(
                    StatusCode::CONFLICT,
                    &status_body(
                        409,
                        "Conflict",
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"cellgate-operator\": the object has been modified; please apply your changes to the latest version and try again",
                    ),
                );
            }
            s.rv += 1;
            let mut l = sent;
            l["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.lease = Some(l.clone());
            json_response(StatusCode::OK, &l)
        }
        _ => {
            s.failures.push(format!(
                "replica {replica}: unexpected lease call {method} {path}"
            ));
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &status_body(405, "MethodNotAllowed", "unexpected"),
            )
        }
    }
}

fn calls_text(seen: &[Seen]) -> String {
    seen.iter()
        .map(|c| {
            format!(
                "  [{}] {:>9.3}s {} {} -> {}",
                c.replica,
                c.at.as_secs_f64(),
                c.method,
                c.uri,
                c.status
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ssa_uri(path: &str) -> String {
    format!("{path}?&force=true&fieldManager=cellgate-operator")
}

fn get(path: &str, status: StatusCode, reply: Value) -> Step {
    Step {
        method: Method::GET,
        uri: path.to_string(),
        content_type: None,
        body: Expect::Empty,
        reply: Reply::Json(status, reply),
    }
}

fn get_404(path: &str) -> Step {
    get(
        path,
        StatusCode::NOT_FOUND,
        status_body(404, "NotFound", "not found"),
    )
}

/// A server-side apply with the operator's field manager, forced.
fn apply(path: &str, body: Value, status: StatusCode, reply: Value) -> Step {
    Step {
        method: Method::PATCH,
        uri: ssa_uri(path),
        content_type: Some("application/apply-patch+yaml"),
        body: Expect::Json(body),
        reply: Reply::Json(status, reply),
    }
}

fn apply_ok(path: &str, body: Value) -> Step {
    apply(path, body.clone(), StatusCode::OK, body)
}

fn patch(path: &str, content_type: &'static str, body: Value, reply: Value) -> Step {
    Step {
        method: Method::PATCH,
        uri: format!("{path}?"),
        content_type: Some(content_type),
        body: Expect::Json(body),
        reply: Reply::Json(StatusCode::OK, reply),
    }
}

// ---------------------------------------------------------------------------------------------
// The operator under test.

/// Fixed wall time (T0) for the reconciler, token ids from a list.
struct FixedClock {
    ids: Mutex<VecDeque<String>>,
}

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        T0
    }

    fn token_id(&self) -> String {
        self.ids
            .lock()
            .expect("ids")
            .pop_front()
            .expect("the scenario did not expect a token to be minted")
    }
}

/// Wall time that follows tokio's (paused) clock from T0: the Lease's renewTime.
struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> i64 {
        T0 + i64::try_from((Instant::now() - self.start).as_secs()).unwrap_or(0)
    }

    fn token_id(&self) -> String {
        unreachable!("the elector mints no token")
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    key: Arc<SigningKey>,
    settings: Settings,
    ca: cellgate_tls::TrustBundle,
    api: FakeApi,
}

/// One operator process: its context and metrics.
struct Operator {
    ctx: Arc<Context>,
    policy: Arc<PolicyContext>,
    metrics: Arc<Metrics>,
    client: Client,
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
            ca: cellgate_tls::TrustBundle::new(
                cellgate_tls::Ca::generate("Cellgate test CA")
                    .expect("ca")
                    .cert_pem(),
                None,
            )
            .expect("bundle"),
            api: FakeApi::new(),
        }
    }

    fn operator(&self, replica: usize, ids: &[&str]) -> Operator {
        let client = self.api.client(replica);
        let metrics = Arc::new(Metrics::new());
        let clock: Arc<dyn Clock> = Arc::new(FixedClock {
            ids: Mutex::new(ids.iter().map(|s| s.to_string()).collect()),
        });
        let ctx = Arc::new(Context::new(
            client.clone(),
            self.settings.clone(),
            self.ca.clone(),
            self.key.clone(),
            TTL,
            CNS.into(),
            metrics.clone(),
            clock.clone(),
        ));
        let policy = Arc::new(PolicyContext::new(client.clone(), CNS.into(), clock));
        Operator {
            ctx,
            policy,
            metrics,
            client,
        }
    }

    /// Starts the real controllers of `op` (no leader election); abort the handle to stop them.
    fn start(&self, op: &Operator) -> tokio::task::JoinHandle<()> {
        tokio::spawn(controllers(
            op.client.clone(),
            op.ctx.clone(),
            op.policy.clone(),
            never(),
        ))
    }

    fn mint(&self, cell: &AgentCellResource, jti: &str) -> token::CurrentToken {
        token::mint(
            &self.key,
            &cell.to_model().expect("model"),
            T0,
            TTL,
            jti.into(),
        )
        .expect("mint")
    }

    fn secret(&self, cell: &AgentCellResource, t: &token::CurrentToken) -> Value {
        to_value(&desired::token_secret(cell, &t.issued).expect("secret"))
    }

    /// The calls of a full apply of `cell` whose Secret holds `existing` (None: 404) and whose
    /// pod is `pod` (None: 404, then applied and answered as `created`), ending with the status
    /// write when the status changes. Returns the steps and the status written (or kept).
    fn apply_calls(
        &self,
        cell: &AgentCellResource,
        existing: Option<&Value>,
        t: &token::CurrentToken,
        pod: Option<&Value>,
    ) -> (Vec<Step>, Value) {
        let sa = to_value(&desired::service_account(cell).expect("sa"));
        let mut ca = desired::ca_bundle(cell, &self.ca).expect("ca");
        // Annotated with the fingerprints of its cell CAs (what a CA rotation waits for).
        cellgate_operator::ca::annotate_bundle(&mut ca, &self.ca);
        let ca = to_value(&ca);
        let np = to_value(&desired::network_policy(cell, &self.settings).expect("np"));
        let secret = self.secret(cell, t);
        let mut steps = vec![
            apply_ok(SA, sa),
            match existing {
                Some(s) => get(SECRET, StatusCode::OK, s.clone()),
                None => get_404(SECRET),
            },
            apply_ok(SECRET, secret),
            apply_ok(CA_CM, ca),
            apply_ok(NETPOL, np),
        ];
        let live = match pod {
            Some(p) => {
                steps.push(get(POD, StatusCode::OK, p.clone()));
                p.clone()
            }
            None => {
                steps.push(get_404(POD));
                let want = self.desired_pod(cell);
                let live = live_pod(&want);
                steps.push(apply(POD, want, StatusCode::OK, live.clone()));
                live
            }
        };
        let pod: Pod = serde_json::from_value(live).expect("pod");
        let st = status::compute(&Observation {
            cell,
            validity: Ok(()),
            token: Some((t.issued.id.clone(), t.issued.expiry.clone())),
            pod: PodObservation::of(&pod),
            now: token::rfc3339(T0).expect("time"),
        });
        if status::needs_write(cell, &st) {
            steps.push(status_apply(cell, &st));
        }
        (steps, to_value(&st))
    }

    fn desired_pod(&self, cell: &AgentCellResource) -> Value {
        to_value(&desired::pod(cell, &self.settings).expect("pod"))
    }
}

/// The status write: the patch holds only the status; the API server answers the whole object.
fn status_apply(cell: &AgentCellResource, st: &cellgate_api::crd::AgentCellStatus) -> Step {
    let mut object = to_value(cell);
    object["status"] = to_value(st);
    apply(
        &format!("{CELL}/status"),
        status::status_patch(st),
        StatusCode::OK,
        object,
    )
}

fn to_value(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("json")
}

/// A pod as the API server returns it: scheduled, running.
fn live_pod(desired_pod: &Value) -> Value {
    let mut p = desired_pod.clone();
    p["metadata"]["uid"] = json!("pod-uid-1");
    p["spec"]["nodeName"] = json!("node-1");
    p["status"] = json!({"phase": "Running", "podIP": "10.1.0.5",
                         "conditions": [{"type": "Ready", "status": "True"}]});
    p
}

fn cell_json(generation: i64, finalizer: bool, status: Option<&Value>) -> Value {
    let mut meta = json!({"name": "triage", "namespace": NS, "uid": UID, "generation": generation});
    if finalizer {
        meta["finalizers"] = json!(["cellgate.dev/token-revocation"]);
    }
    let caps = if generation >= 2 {
        json!([{"name": "github", "destinations": [{"host": "api.github.com"}]},
               {"name": "pypi", "destinations": [{"host": "pypi.org"}]}])
    } else {
        json!([{"name": "github", "destinations": [{"host": "api.github.com"}]}])
    };
    let mut v = json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell", "metadata": meta,
        "spec": {"role": "support", "capabilities": caps, "template": {
            "metadata": {"labels": {"app": "triage"}},
            "spec": {"containers": [{"name": "agent", "image": "ghcr.io/example/agent:1.0",
                                      "securityContext": {"runAsUser": 1000}}]}}},
    });
    if let Some(st) = status {
        v["status"] = st.clone();
    }
    v
}

fn cell(v: &Value) -> AgentCellResource {
    serde_json::from_value(v.clone()).expect("cell")
}

/// A cell that has run at generation 1: its object (with status), Secret, token and pod.
struct Running {
    object: Value,
    secret: Value,
    token: token::CurrentToken,
    pod: Value,
}

fn running(fx: &Fixture) -> Running {
    let plain = cell(&cell_json(1, true, None));
    let t = fx.mint(&plain, "jti-1");
    let secret = fx.secret(&plain, &t);
    let pod = live_pod(&fx.desired_pod(&plain));
    let (_, st) = fx.apply_calls(&plain, Some(&secret), &t, Some(&pod));
    Running {
        object: cell_json(1, true, Some(&st)),
        secret,
        token: t,
        pod,
    }
}

fn cell_calls(seen: &[Seen], replica: usize) -> Vec<&Seen> {
    seen.iter()
        .filter(|c| c.replica == replica && Watched::cell_related(c.path()))
        .collect()
}

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Scenarios: one operator, no election.

#[tokio::test(start_paused = true)]
async fn create_lists_then_watches_and_applies_every_child_and_the_status() {
    let fx = Fixture::new();
    let op = fx.operator(0, &["jti-1"]);
    let run = fx.start(&op);
    // Every collection is listed once, then watched from the list's resourceVersion.
    fx.api
        .until(WAIT, "eight watches", |s| s.watches.len() == 8)
        .await;
    let seen = fx.api.seen();
    let uris: Vec<String> = seen.iter().map(|c| c.uri.clone()).collect();
    for expected in [
        "/apis/cellgate.dev/v1alpha1/agentcells?&limit=500",
        "/apis/cellgate.dev/v1alpha1/agentcells?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=1",
        "/api/v1/pods?&labelSelector=cellgate.dev%2Fcell&limit=500",
        "/api/v1/pods?&watch=true&timeoutSeconds=290&labelSelector=cellgate.dev%2Fcell&allowWatchBookmarks=true&resourceVersion=1",
        "/apis/networking.k8s.io/v1/networkpolicies?&watch=true&timeoutSeconds=290&labelSelector=cellgate.dev%2Fcell&allowWatchBookmarks=true&resourceVersion=1",
        "/apis/cellgate.dev/v1alpha1/cellgatepolicies?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=1",
        "/api/v1/secrets?&labelSelector=cellgate.dev%2Fcell&limit=500",
        "/api/v1/configmaps?&labelSelector=cellgate.dev%2Fcell&limit=500",
        "/api/v1/serviceaccounts?&labelSelector=cellgate.dev%2Fcell&limit=500",
        "/apis/networking.k8s.io/v1/networkpolicies?&labelSelector=cellgate.dev%2Fcell&limit=500",
        "/apis/cellgate.dev/v1alpha1/cellgateclusterpolicies?&limit=500",
        "/apis/cellgate.dev/v1alpha1/cellgatepolicies?&limit=500",
    ] {
        assert!(
            uris.iter().any(|u| u == expected),
            "{expected} not called; calls:\n{}",
            calls_text(&seen)
        );
    }
    assert_eq!(seen.len(), 16, "a list and a watch per collection");

    // ADDED, without the finalizer: the finalizer only (kube-rs's helper, a JSON patch).
    let fresh = cell_json(1, false, None);
    let with_fin = cell_json(1, true, None);
    fx.api.script(vec![patch(
        CELL,
        "application/json-patch+json",
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["cellgate.dev/token-revocation"]}
        ]),
        with_fin.clone(),
    )]);
    fx.api.send(Watched::AgentCells, "ADDED", fresh);
    fx.api.script_done(WAIT).await;

    // MODIFIED (the finalizer now on): every child, then the status.
    let c = cell(&with_fin);
    let t = fx.mint(&c, "jti-1");
    let (steps, st) = fx.apply_calls(&c, None, &t, None);
    assert_eq!(
        steps.len(),
        8,
        "SA, get+apply Secret, CA, NetworkPolicy, get+apply Pod, status"
    );
    fx.api.script(steps);
    fx.api.send(Watched::AgentCells, "MODIFIED", with_fin);
    fx.api.script_done(WAIT).await;
    let wrote_status = fx.api.now();

    // The status write comes back as MODIFIED: the same applies, no status write this time.
    let steady = cell_json(1, true, Some(&st));
    let secret = fx.secret(&c, &t);
    let pod = live_pod(&fx.desired_pod(&c));
    let (steps, _) = fx.apply_calls(&cell(&steady), Some(&secret), &t, Some(&pod));
    assert_eq!(steps.len(), 6, "no status write in the steady state");
    fx.api.script(steps);
    fx.api.send(Watched::AgentCells, "MODIFIED", steady.clone());
    fx.api.script_done(WAIT).await;

    // A BOOKMARK moves the resourceVersion only: no reconcile.
    fx.api.bookmark(Watched::AgentCells);
    fx.api.quiet_for(Duration::from_secs(600)).await;

    // The reconcile asked to be requeued when the token is due for rotation (2400 s after T0 on
    // the reconciler's clock): the controller comes back then, on its own.
    let (steps, _) = fx.apply_calls(&cell(&steady), Some(&secret), &t, Some(&pod));
    fx.api.script(steps);
    fx.api.script_done(Duration::from_secs(2400)).await;
    let back = fx.api.seen().last().expect("calls").at;
    let since = back - wrote_status;
    assert!(
        since >= Duration::from_secs(2400) && since < Duration::from_secs(2401),
        "requeued after {since:?}"
    );
    assert!(op
        .metrics
        .encode()
        .contains("cellgate_operator_tokens_minted_total{reason=\"missing\"} 1"));
    run.abort();
}

#[tokio::test(start_paused = true)]
async fn update_reapplies_at_the_new_generation_and_a_deleted_child_is_put_back() {
    let fx = Fixture::new();
    let r = running(&fx);
    fx.api.set_list(Watched::AgentCells, vec![r.object.clone()]);
    let op = fx.operator(0, &[]);
    // The listed cell is reconciled once the stores are synced: steady state, no write beyond
    // the idempotent applies.
    let (steps, st1) = fx.apply_calls(&cell(&r.object), Some(&r.secret), &r.token, Some(&r.pod));
    assert_eq!(steps.len(), 6);
    fx.api.script(steps);
    let run = fx.start(&op);
    fx.api.script_done(WAIT).await;

    // Generation 2 (a capability added): the same children (the pod's template is unchanged),
    // and the status at observedGeneration 2 with two capabilities.
    let v2 = cell_json(2, true, Some(&st1));
    let c2 = cell(&v2);
    let (steps, st2) = fx.apply_calls(&c2, Some(&r.secret), &r.token, Some(&r.pod));
    assert_eq!(steps.len(), 7, "the children again, then the status");
    assert_eq!(st2["observedGeneration"], json!(2));
    assert_eq!(st2["capabilities"], json!(2));
    fx.api.script(steps);
    fx.api.send(Watched::AgentCells, "MODIFIED", v2);
    fx.api.script_done(WAIT).await;

    // The NetworkPolicy is deleted by someone: its DELETED event (it is owned by the cell)
    // reconciles the cell, which applies it again.
    let v2s = cell_json(2, true, Some(&st2));
    let (steps, _) = fx.apply_calls(&cell(&v2s), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    fx.api.send(Watched::AgentCells, "MODIFIED", v2s.clone());
    fx.api.script_done(WAIT).await;
    let (steps, _) = fx.apply_calls(&cell(&v2s), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    let mut np = to_value(&desired::network_policy(&cell(&v2s), &fx.settings).expect("np"));
    np["metadata"]["uid"] = json!("np-uid-1");
    fx.api.send(Watched::NetworkPolicies, "DELETED", np);
    fx.api.script_done(WAIT).await;
    fx.api.quiet_for(Duration::from_secs(60)).await;
    run.abort();
}

#[tokio::test(start_paused = true)]
async fn delete_revokes_the_token_then_removes_the_finalizer_and_stops() {
    let fx = Fixture::new();
    let r = running(&fx);
    fx.api.set_list(Watched::AgentCells, vec![r.object.clone()]);
    let op = fx.operator(0, &[]);
    let (steps, _) = fx.apply_calls(&cell(&r.object), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    let run = fx.start(&op);
    fx.api.script_done(WAIT).await;

    // kubectl delete: the API server sets deletionTimestamp (the finalizer holds the object).
    let mut deleting = r.object.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2030-01-01T00:30:00Z");
    let c = cell(&deleting);
    fx.api.script(vec![
        status_apply(&c, &status::terminating(&c)),
        get(SECRET, StatusCode::OK, r.secret.clone()),
        get_404(REVOCATIONS),
        Step {
            method: Method::POST,
            uri: "/api/v1/namespaces/cellgate-system/configmaps?".into(),
            content_type: Some("application/json"),
            body: Expect::Json(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cellgate-revocations", "namespace": CNS,
                             "labels": {"app.kubernetes.io/managed-by": "cellgate-operator"}},
                "data": {"jti-1": "2030-01-01T01:00:00Z"}
            })),
            reply: Reply::Json(
                StatusCode::CREATED,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": "cellgate-revocations", "namespace": CNS}}),
            ),
        },
        patch(
            CELL,
            "application/json-patch+json",
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "cellgate.dev/token-revocation"},
                {"op": "remove", "path": "/metadata/finalizers/0"}
            ]),
            deleting.clone(),
        ),
    ]);
    fx.api
        .send(Watched::AgentCells, "MODIFIED", deleting.clone());
    fx.api.script_done(WAIT).await;

    // The object goes; garbage collection deletes the children. Nothing is reconciled: the
    // cell is no longer in the store, so its children's events find no owner to reconcile.
    let mut gone = deleting;
    if let Some(m) = gone["metadata"].as_object_mut() {
        m.remove("finalizers");
    }
    fx.api.send(Watched::AgentCells, "DELETED", gone);
    let mut pod = r.pod.clone();
    pod["metadata"]["deletionTimestamp"] = json!("2030-01-01T00:30:05Z");
    fx.api.send(Watched::Pods, "DELETED", pod);
    fx.api.quiet_for(Duration::from_secs(3600)).await;
    assert!(
        op.metrics
            .encode()
            .contains("cellgate_operator_reconciles_total{result=\"ok\"} 2"),
        "{}",
        op.metrics.encode()
    );
    run.abort();
}

#[tokio::test(start_paused = true)]
async fn a_conflict_on_apply_is_retried_after_the_backoff_with_a_fresh_token() {
    let fx = Fixture::new();
    let object = cell_json(1, true, None);
    let c = cell(&object);
    fx.api.set_list(Watched::AgentCells, vec![object.clone()]);
    // jti-1 is minted, but its Secret's apply is refused (409): it is never stored. The retry
    // finds no Secret again and mints jti-2: a retry redoes the whole reconcile from a fresh
    // read, it does not replay the failed call.
    let op = fx.operator(0, &["jti-1", "jti-2"]);
    let t1 = fx.mint(&c, "jti-1");
    let sa = to_value(&desired::service_account(&c).expect("sa"));
    fx.api.script(vec![
        apply_ok(SA, sa),
        get_404(SECRET),
        apply(
            SECRET,
            fx.secret(&c, &t1),
            StatusCode::CONFLICT,
            status_body(409, "Conflict", "Operation cannot be fulfilled on secrets \"cellgate-triage-token\": the object has been modified; please apply your changes to the latest version and try again"),
        ),
    ]);
    let run = fx.start(&op);
    fx.api.script_done(WAIT).await;
    let failed_at = fx.api.now();
    let t2 = fx.mint(&c, "jti-2");
    let (steps, _) = fx.apply_calls(&c, None, &t2, None);
    fx.api.script(steps);
    fx.api.script_done(WAIT).await;
    let retry = fx
        .api
        .seen()
        .into_iter()
        .find(|s| s.at > failed_at && s.method == Method::PATCH)
        .expect("retried");
    assert_eq!(
        retry.at - failed_at,
        Duration::from_secs(2),
        "first backoff"
    );
    let m = op.metrics.encode();
    assert!(
        m.contains("cellgate_operator_reconcile_errors_total{reason=\"kube_apply\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cellgate_operator_tokens_minted_total{reason=\"missing\"} 2"),
        "{m}"
    );
    run.abort();
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_retried_with_a_growing_backoff_that_resets_after_success() {
    let fx = Fixture::new();
    let r = running(&fx);
    fx.api.set_list(Watched::AgentCells, vec![r.object.clone()]);
    let op = fx.operator(0, &[]);
    let sa = to_value(&desired::service_account(&cell(&r.object)).expect("sa"));
    let failing = || {
        apply(
            SA,
            sa.clone(),
            StatusCode::INTERNAL_SERVER_ERROR,
            status_body(500, "InternalError", "etcdserver: leader changed"),
        )
    };
    // Four failures in a row, then the steady reconcile.
    fx.api
        .script(vec![failing(), failing(), failing(), failing()]);
    let (steps, _) = fx.apply_calls(&cell(&r.object), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    let run = fx.start(&op);
    fx.api.script_done(WAIT).await;
    let attempts: Vec<Duration> = fx
        .api
        .seen()
        .into_iter()
        .filter(|s| s.method == Method::PATCH && s.uri == ssa_uri(SA))
        .map(|s| s.at)
        .collect();
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [2, 4, 8, 16].map(Duration::from_secs),
        "backoff 2 s, doubled per failure"
    );

    // After the success, a new failure starts again from 2 s.
    fx.api.script(vec![failing()]);
    let (steps, _) = fx.apply_calls(&cell(&r.object), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    fx.api
        .send(Watched::AgentCells, "MODIFIED", r.object.clone());
    fx.api.script_done(WAIT).await;
    let attempts: Vec<Duration> = fx
        .api
        .seen()
        .into_iter()
        .filter(|s| s.method == Method::PATCH && s.uri == ssa_uri(SA))
        .map(|s| s.at)
        .collect();
    assert_eq!(attempts.len(), 7);
    assert_eq!(attempts[6] - attempts[5], Duration::from_secs(2), "reset");
    let m = op.metrics.encode();
    assert!(
        m.contains("cellgate_operator_reconcile_errors_total{reason=\"kube_apply\"} 5"),
        "{m}"
    );
    run.abort();
}

#[tokio::test(start_paused = true)]
async fn an_operator_restarted_mid_reconcile_makes_the_same_idempotent_calls() {
    let fx = Fixture::new();
    let object = cell_json(1, true, None);
    let c = cell(&object);
    fx.api.set_list(Watched::AgentCells, vec![object.clone()]);
    let t = fx.mint(&c, "jti-1");
    let (mut full, _) = fx.apply_calls(&c, None, &t, None);
    // The first operator gets as far as the NetworkPolicy apply and dies with it in flight.
    let rest = full.split_off(4);
    fx.api.script(full);
    let np = to_value(&desired::network_policy(&c, &fx.settings).expect("np"));
    fx.api.script(vec![Step {
        method: Method::PATCH,
        uri: ssa_uri(NETPOL),
        content_type: Some("application/apply-patch+yaml"),
        body: Expect::Json(np),
        reply: Reply::Hang,
    }]);
    let first = fx.operator(0, &["jti-1"]);
    let run = fx.start(&first);
    fx.api.script_done(WAIT).await;
    run.abort();
    let _ = run.await;
    drop(first);
    assert_eq!(
        rest.len(),
        4,
        "NetworkPolicy, get+apply Pod, status were not reached"
    );

    // A new process: the Secret written before the crash is there; its token is kept (no token
    // id is available to mint one), every apply has the same body, nothing is deleted.
    let secret = fx.secret(&c, &t);
    let (steps, _) = fx.apply_calls(&c, Some(&secret), &t, None);
    fx.api.script(steps);
    let second = fx.operator(1, &[]);
    let run = fx.start(&second);
    fx.api.script_done(WAIT).await;
    fx.api.quiet_for(Duration::from_secs(60)).await;
    let seen = fx.api.seen();
    assert!(
        !seen
            .iter()
            .any(|s| s.method == Method::DELETE || s.method == Method::POST),
        "{}",
        calls_text(&seen)
    );
    // The second process' writes repeat the first's, body for body (checked by the script),
    // and add the ones the first did not reach.
    let writes = |replica| -> Vec<String> {
        seen.iter()
            .filter(|s| s.replica == replica && s.method == Method::PATCH)
            .map(|s| s.uri.clone())
            .collect()
    };
    let (a, b) = (writes(0), writes(1));
    assert_eq!(b[..a.len()], a[..], "the same applies in the same order");
    assert_eq!(
        b[a.len()..],
        [ssa_uri(POD), ssa_uri(&format!("{CELL}/status"))]
    );
    run.abort();
}

// ---------------------------------------------------------------------------------------------
// Leader election: two replicas.

struct Replica {
    status: Arc<AdminState>,
    task: tokio::task::JoinHandle<Outcome>,
}

fn replica(fx: &Fixture, n: usize, name: &str) -> Replica {
    let op = fx.operator(n, &[]);
    let status = Arc::new(AdminState::default());
    status
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let mut elector = Elector::new(
        op.client.clone(),
        ElectionConfig {
            namespace: CNS.into(),
            name: leader::LEASE_NAME.into(),
            identity: name.into(),
            timings: LeaseTimings::default(),
        },
        Arc::new(TokioClock {
            start: fx.api.start,
        }),
        status.leadership.clone(),
    );
    let task = tokio::spawn(async move {
        let work = || {
            controllers(
                op.client.clone(),
                op.ctx.clone(),
                op.policy.clone(),
                never(),
            )
        };
        elector.lead(work, never()).await
    });
    Replica { status, task }
}

#[tokio::test(start_paused = true)]
async fn two_replicas_one_leads_and_the_standby_takes_over_when_renewals_stop() {
    let fx = Fixture::new();
    let r = running(&fx);
    fx.api.set_list(Watched::AgentCells, vec![r.object.clone()]);
    let (steps, _) = fx.apply_calls(&cell(&r.object), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    let names = ["cellgate-operator-a", "cellgate-operator-b"];
    let replicas = [replica(&fx, 0, names[0]), replica(&fx, 1, names[1])];

    // Both find no Lease and create one: the API server takes the first, refuses the second.
    fx.api.script_done(WAIT).await;
    let seen = fx.api.seen();
    let creates: Vec<&Seen> = seen.iter().filter(|s| s.method == Method::POST).collect();
    assert_eq!(creates.len(), 2, "{}", calls_text(&seen));
    let mut statuses: Vec<u16> = creates.iter().map(|s| s.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409]);
    let leader = creates
        .iter()
        .find(|s| s.status == 201)
        .expect("won")
        .replica;
    let standby = 1 - leader;
    assert_eq!(creates[0].at, Duration::ZERO);

    // Only the leader touches anything but the Lease; the standby re-reads the Lease every 2 s.
    fx.api.quiet_for(Duration::from_secs(31)).await;
    let seen = fx.api.seen();
    assert!(
        cell_calls(&seen, standby).is_empty(),
        "{}",
        calls_text(&seen)
    );
    assert!(
        cell_calls(&seen, leader).len() > 16,
        "{}",
        calls_text(&seen)
    );
    let standby_reads: Vec<Duration> = seen
        .iter()
        .filter(|s| s.replica == standby && s.method == Method::GET)
        .map(|s| s.at)
        .collect();
    assert_eq!(standby_reads.len(), 16, "at 0, then every 2 s to 30 s");
    assert!(seen
        .iter()
        .filter(|s| s.replica == standby)
        .all(|s| s.method == Method::GET || s.status == 409));
    let lease = fx.api.lock().lease.clone().expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], json!(names[leader]));
    assert_eq!(lease["spec"]["leaseDurationSeconds"], json!(15));
    assert_eq!(lease["spec"]["leaseTransitions"], json!(0));
    assert_eq!(
        lease["spec"]["acquireTime"],
        json!("2030-01-01T00:00:00.000000Z")
    );
    assert_eq!(
        lease["spec"]["renewTime"],
        json!("2030-01-01T00:00:30.000000Z")
    );
    let (code, text) = readiness(&replicas[leader].status);
    assert_eq!(
        (code.as_u16(), text.as_str()),
        (200, "ready: leader; the controllers run in this replica\n")
    );
    let (code, text) = readiness(&replicas[standby].status);
    assert_eq!(code.as_u16(), 200);
    assert!(
        text.starts_with(&format!(
            "ready: standby; the controllers run in the leader {}",
            names[leader]
        )),
        "{text}"
    );

    // The leader's Lease calls now fail (its API server connection is broken for the Lease).
    // It keeps trying every 2 s; 10 s after its last renewal it stops: its controllers are
    // dropped. The standby, which saw the Lease last change at that renewal, takes it over
    // 15 s after.
    let (steps, _) = fx.apply_calls(&cell(&r.object), Some(&r.secret), &r.token, Some(&r.pod));
    fx.api.script(steps);
    fx.api.lock().lease_down.insert(leader);
    let [a, b] = replicas;
    let (lead_task, standby_state) = if leader == 0 {
        (a.task, b)
    } else {
        (b.task, a)
    };
    let outcome = lead_task.await.expect("leader task");
    let lost_at = fx.api.now();
    match outcome {
        Outcome::Lost(Lost::RenewDeadline(Some(e))) => {
            assert!(e.contains("etcdserver: request timed out"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let seen = fx.api.seen();
    let renewed = seen
        .iter()
        .filter(|s| s.replica == leader && s.method == Method::PUT && s.status == 200)
        .map(|s| s.at)
        .max()
        .expect("renewals");
    assert_eq!(renewed, Duration::from_secs(30));
    assert_eq!(
        lost_at - renewed,
        Duration::from_secs(10),
        "the renew deadline"
    );
    fx.api.script_done(WAIT).await;
    let seen = fx.api.seen();
    let takeover = seen
        .iter()
        .find(|s| s.replica == standby && s.method == Method::PUT && s.status == 200)
        .expect("took over");
    // The standby saw that renewal at its next read (at most one retry period later), and takes
    // the Lease over at its first try once it has seen it unchanged for the lease duration.
    let after = takeover.at - renewed;
    assert!(
        after >= Duration::from_secs(15) && after <= Duration::from_secs(19),
        "taken over {after:?} after the last renewal"
    );
    assert!(takeover.at > lost_at);
    assert!(
        seen.iter()
            .filter(|s| s.replica == leader && s.at > lost_at)
            .count()
            == 0,
        "the old leader made no call after it stopped:\n{}",
        calls_text(&seen)
    );
    let first_cell_call = cell_calls(&seen, standby)
        .first()
        .map(|s| s.at)
        .expect("the new leader reconciles");
    assert!(first_cell_call >= takeover.at);
    let lease = fx.api.lock().lease.clone().expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], json!(names[standby]));
    assert_eq!(lease["spec"]["leaseTransitions"], json!(1));
    let (code, text) = readiness(&standby_state.status);
    assert_eq!(
        (code.as_u16(), text.as_str()),
        (200, "ready: leader; the controllers run in this replica\n")
    );
    standby_state.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_stops_releases_the_lease_and_the_standby_takes_it_at_once() {
    let fx = Fixture::new();
    let names = ["cellgate-operator-a", "cellgate-operator-b"];
    let clock = || -> Arc<dyn Clock> {
        Arc::new(TokioClock {
            start: fx.api.start,
        })
    };
    let config = |name: &str| ElectionConfig {
        namespace: CNS.into(),
        name: leader::LEASE_NAME.into(),
        identity: name.into(),
        timings: LeaseTimings::default(),
    };
    let status_a = Arc::new(leader::LeaderStatus::default());
    let mut a = Elector::new(
        fx.api.client(0),
        config(names[0]),
        clock(),
        status_a.clone(),
    );
    // A leads with work that ends at 5 s (its graceful shutdown): it releases the Lease.
    let task_a = tokio::spawn(async move {
        a.lead(
            || tokio::time::sleep(Duration::from_secs(5)),
            std::future::pending(),
        )
        .await
    });
    fx.api
        .until(WAIT, "a holds the lease", |s| s.lease.is_some())
        .await;
    let status_b = Arc::new(leader::LeaderStatus::default());
    let mut b = Elector::new(
        fx.api.client(1),
        config(names[1]),
        clock(),
        status_b.clone(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<Duration>();
    let start = fx.api.start;
    let task_b = tokio::spawn(async move {
        b.lead(
            || async move {
                let _ = tx.send(Instant::now() - start);
                std::future::pending::<()>().await
            },
            std::future::pending(),
        )
        .await
    });
    assert_eq!(task_a.await.expect("a"), Outcome::Finished);
    let lease = fx.api.lock().lease.clone().expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], json!(""));
    assert_eq!(lease["spec"]["leaseDurationSeconds"], json!(1));
    let led_at = rx.await.expect("b leads");
    // B re-reads every 2 s from 0 s: the release at 5 s is seen at 6 s, and taken at once.
    assert_eq!(led_at, Duration::from_secs(6));
    assert_eq!(status_b.get(), leader::Leadership::Leading);
    let lease = fx.api.lock().lease.clone().expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], json!(names[1]));
    assert_eq!(lease["spec"]["leaseTransitions"], json!(1));
    assert!(fx.api.failures().is_empty());
    task_b.abort();
}

// ---------------------------------------------------------------------------------------------
// A standby over real sockets: `run_with` while another replica holds the Lease.

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn a_standby_serves_readiness_and_the_control_api_and_does_not_reconcile() {
    use futures_util::FutureExt as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fx = Fixture::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let ca = rcgen::generate_simple_self_signed(vec!["cellgate-ca".to_string()]).expect("ca");
    let api_cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let signing_key = fx._dir.path().join("signing.key").display().to_string();
    let env: std::collections::BTreeMap<String, String> = [
        ("CELLGATE_NODE_CIDRS", "10.0.0.0/16".to_string()),
        ("CELLGATE_SIGNING_KEY", signing_key),
        ("CELLGATE_CA_CERT", write("ca.crt", &ca.cert.pem())),
        ("CELLGATE_SYSTEM_ROOTS", "none".to_string()),
        ("CELLGATE_ADMIN", "127.0.0.1:0".to_string()),
        ("CELLGATE_API_LISTEN", "127.0.0.1:0".to_string()),
        (
            "CELLGATE_API_TLS_CERT",
            write("api.crt", &api_cert.cert.pem()),
        ),
        (
            "CELLGATE_API_TLS_KEY",
            write("api.key", &api_cert.signing_key.serialize_pem()),
        ),
        (
            "CELLGATE_AUDIT_LOG",
            dir.path().join("audit.jsonl").display().to_string(),
        ),
        ("POD_NAME", "cellgate-operator-b".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = cellgate_operator::Config::resolve(&cellgate_operator::Args::default(), &env)
        .expect("config");
    // Replica a holds the Lease and renewed it just now.
    fx.api.lock().lease = Some(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "cellgate-operator", "namespace": CNS, "resourceVersion": "7"},
        "spec": {"holderIdentity": "cellgate-operator-a", "leaseDurationSeconds": 15,
                 "acquireTime": "2030-01-01T00:00:00.000000Z",
                 "renewTime": "2030-01-01T00:00:00.000000Z", "leaseTransitions": 0}
    }));
    let client = fx.api.client(1);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let graceful = async move {
        let _ = stop_rx.await;
    }
    .boxed()
    .shared();
    let task = tokio::spawn(cellgate_operator::run_with(
        config,
        std::future::ready(Ok(client)),
        graceful,
        never(),
        move |b| {
            let _ = bound_tx.send(b);
        },
    ));
    let bound = bound_rx.await.expect("started");

    // /readyz: 503 until the Lease has been read, then 200 naming the leader.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let r = http_get(bound.admin, "/readyz").await;
        if r.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break r;
        }
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ready.starts_with("HTTP/1.1 200")
            && ready
                .contains("ready: standby; the controllers run in the leader cellgate-operator-a"),
        "{ready}"
    );
    let metrics = http_get(bound.admin, "/metrics").await;
    assert!(metrics.contains("cellgate_operator_leader 0"), "{metrics}");

    // The control API answers on the standby: authentication, authorization, the read.
    fx.api.script(vec![
        Step {
            method: Method::POST,
            uri: "/apis/authentication.k8s.io/v1/tokenreviews?".into(),
            content_type: Some("application/json"),
            body: Expect::Fields(vec![("/spec/token", json!("t0ken"))]),
            reply: Reply::Json(
                StatusCode::CREATED,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                       "metadata": {}, "spec": {"token": "t0ken"},
                       "status": {"authenticated": true,
                                  "user": {"username": "alice", "uid": "uid-alice", "groups": ["sre"]}}}),
            ),
        },
        Step {
            method: Method::POST,
            uri: "/apis/authorization.k8s.io/v1/subjectaccessreviews?".into(),
            content_type: Some("application/json"),
            body: Expect::Fields(vec![
                ("/spec/user", json!("alice")),
                ("/spec/resourceAttributes/group", json!("cellgate.dev")),
                ("/spec/resourceAttributes/resource", json!("revocations")),
                ("/spec/resourceAttributes/verb", json!("list")),
            ]),
            reply: Reply::Json(
                StatusCode::CREATED,
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                       "metadata": {}, "spec": {}, "status": {"allowed": true}}),
            ),
        },
        get(
            REVOCATIONS,
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cellgate-revocations", "namespace": CNS},
                   "data": {"jti-9": "2030-01-01T01:00:00Z"}}),
        ),
    ]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(api_cert.cert.der().clone()).expect("root");
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only()
                .enable_http1()
                .build(),
        );
    let req = Request::get(format!(
        "https://localhost:{}/api/v1/revocations",
        bound.api.port()
    ))
    .header("authorization", "Bearer t0ken")
    .body(Full::new(Bytes::new()))
    .expect("request");
    let resp = https.request(req).await.expect("control API");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes())
            .expect("json");
    assert_eq!(
        body,
        json!({"items": [{"tokenId": "jti-9", "expiry": "2030-01-01T01:00:00Z"}]})
    );
    fx.api.script_done(Duration::from_secs(10)).await;

    // Stopped, the standby returns cleanly and writes nothing to the Lease it never held.
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .expect("task")
        .expect("a standby stops cleanly");
    let seen = fx.api.seen();
    assert!(fx.api.failures().is_empty(), "{:#?}", fx.api.failures());
    let others: Vec<&Seen> = seen
        .iter()
        .filter(|c| !(c.method == Method::GET && c.path().starts_with(LEASES)))
        .collect();
    assert_eq!(
        others.iter().map(|c| c.path()).collect::<Vec<_>>(),
        [
            "/apis/authentication.k8s.io/v1/tokenreviews",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            REVOCATIONS,
        ],
        "a standby reads the Lease and serves the control API, nothing else:\n{}",
        calls_text(&seen)
    );
    assert!(seen.iter().any(|c| c.path().starts_with(LEASES)));
}
