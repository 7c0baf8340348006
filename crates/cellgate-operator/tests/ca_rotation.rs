//! The CA rotation's phase machine against kube-rs's mocked API service: each tick's calls are
//! listed in order with method, URI and body (exact, or checked where the body carries the new
//! CA, which is generated during the test), and the reply the fake API server gives. A call
//! missing, extra, out of order or with another body fails the scenario.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellgate_api::ca_rotation::{Phase, ANNOTATION_BUNDLE_CAS};
use cellgate_operator::ca::{Rotation, Step};
use cellgate_operator::reconcile::Clock;
use cellgate_tls::Ca;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

const CNS: &str = "cellgate-system";
const ROT: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-ca-rotation";
const REQ: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-ca-rotation-request";
const SECRET: &str = "/api/v1/namespaces/cellgate-system/secrets/cellgate-ca";
const BUNDLE: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-ca-bundle";
const PODS: &str = "/api/v1/namespaces/cellgate-system/pods?&labelSelector=app.kubernetes.io%2Fname%3Dcellgate%2Capp.kubernetes.io%2Fcomponent%3Dnode";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/cellgate-system/leases?&labelSelector=cellgate.dev%2Fnode-report%3Dca";
const CELL_CMS: &str = "/api/v1/configmaps?&labelSelector=cellgate.dev%2Fcell";
/// 2030-01-01T00:00:00Z
const T0: i64 = 1_893_456_000;

// ---------------------------------------------------------------------------------------------
// The scripted API server.

type Check = Box<dyn Fn(&Value) + Send>;

enum Expect {
    Empty,
    Json(Value),
    Check(Check),
}

enum Reply {
    Json(Value),
    /// The request's body, as the object the server stored.
    Echo,
    NotFound,
}

struct Call {
    method: Method,
    uri: String,
    body: Expect,
    reply: Reply,
}

fn get(path: &str, reply: Reply) -> Call {
    Call {
        method: Method::GET,
        uri: path.into(),
        body: Expect::Empty,
        reply,
    }
}

fn apply(path: &str, body: Expect) -> Call {
    Call {
        method: Method::PATCH,
        uri: format!("{path}?&force=true&fieldManager=cellgate-operator"),
        body,
        reply: Reply::Echo,
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers `calls` in order, asserting each, then asserts nothing more is asked.
async fn serve(handle: &mut Handle, calls: Vec<Call>) {
    let total = calls.len();
    for (i, call) in calls.into_iter().enumerate() {
        let what = format!("call {}/{total} ({} {})", i + 1, call.method, call.uri);
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("{what}: not made"))
            .unwrap_or_else(|| panic!("{what}: the client is gone"));
        assert_eq!(req.method(), call.method, "{what}: method");
        assert_eq!(req.uri().to_string(), call.uri, "{what}: uri");
        if call.method == Method::PATCH {
            assert_eq!(
                req.headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok()),
                Some("application/apply-patch+yaml"),
                "{what}: a server-side apply"
            );
        }
        let bytes = req.into_body().collect_bytes().await.expect("body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json body")
        };
        match call.body {
            Expect::Empty => assert!(bytes.is_empty(), "{what}: unexpected body {body}"),
            Expect::Json(want) => assert!(
                body == want,
                "{what}: body differs\n--- expected\n{}\n--- actual\n{}",
                serde_json::to_string_pretty(&want).unwrap_or_default(),
                serde_json::to_string_pretty(&body).unwrap_or_default()
            ),
            Expect::Check(check) => check(&body),
        }
        let (status, reply) = match call.reply {
            Reply::Json(v) => (StatusCode::OK, v),
            Reply::Echo => (StatusCode::OK, body),
            Reply::NotFound => (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "not found", "reason": "NotFound", "code": 404}),
            ),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&reply).expect("reply")))
                .expect("response"),
        );
    }
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
    {
        panic!("unexpected extra call: {} {}", req.method(), req.uri());
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture.

struct FixedClock(AtomicI64);

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
    fn token_id(&self) -> String {
        unreachable!("the rotation mints no token")
    }
}

struct Fx {
    rot: Rotation,
    handle: Handle,
    clock: Arc<FixedClock>,
    old: Ca,
}

impl Fx {
    fn new() -> Self {
        let old = Ca::generate("Cellgate CA").expect("ca");
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let clock = Arc::new(FixedClock(AtomicI64::new(T0)));
        let rot = Rotation::new(
            client,
            CNS.into(),
            "cellgate-ca".into(),
            "cellgate-ca-bundle".into(),
            clock.clone(),
        );
        Self {
            rot,
            handle,
            clock,
            old,
        }
    }

    fn at(&self, t: i64) {
        self.clock.0.store(t, Ordering::SeqCst);
    }

    /// One tick against `calls`. Every tick reads the state, then the request ConfigMap: when
    /// the script's first call answers the state, a `request` key in its data is moved into the
    /// answer of that second GET, inserted here.
    async fn tick(&mut self, mut calls: Vec<Call>) -> Result<Step, String> {
        if let Some(Call {
            method: Method::GET,
            uri,
            reply: Reply::Json(state),
            ..
        }) = calls.first_mut()
        {
            if uri.as_str() == ROT {
                let request = state["data"]
                    .as_object_mut()
                    .and_then(|d| d.remove("request"));
                let mut data = serde_json::Map::new();
                if let Some(r) = request {
                    data.insert("request".into(), r);
                }
                calls.insert(1, get(REQ, Reply::Json(request_cm(Value::Object(data)))));
            }
        }
        self.tick_exact(calls).await
    }

    /// One tick against exactly `calls`.
    async fn tick_exact(&mut self, calls: Vec<Call>) -> Result<Step, String> {
        let (step, ()) = tokio::join!(self.rot.tick(), serve(&mut self.handle, calls));
        step.map_err(|e| format!("{}: {e}", e.label()))
    }
}

fn rfc(t: i64) -> String {
    cellgate_operator::token::rfc3339(t).expect("time")
}

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The state ConfigMap as the server holds it: `data` at resourceVersion `rv`.
fn state_cm(data: Value, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cellgate-ca-rotation", "namespace": CNS, "resourceVersion": rv,
                        "labels": {"app.kubernetes.io/managed-by": "cellgate-operator"}},
           "data": data})
}

/// The request ConfigMap with `data`.
fn request_cm(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cellgate-ca-rotation-request", "namespace": CNS, "resourceVersion": "5"},
           "data": data})
}

/// The body of the operator's apply of the state.
fn state_apply(data: Value, rv: Option<&str>) -> Value {
    let mut meta = json!({"name": "cellgate-ca-rotation", "namespace": CNS,
                          "labels": {"app.kubernetes.io/managed-by": "cellgate-operator"}});
    if let Some(rv) = rv {
        meta["resourceVersion"] = rv.into();
    }
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
}

fn secret(files: &[(&str, String)], rv: &str) -> Value {
    let data: serde_json::Map<String, Value> = files
        .iter()
        .map(|(k, v)| (k.to_string(), b64(v).into()))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": "cellgate-ca", "namespace": CNS, "resourceVersion": rv},
           "data": data})
}

fn secret_apply(files: &[(&str, String)], rv: &str) -> Value {
    let data: serde_json::Map<String, Value> = files
        .iter()
        .map(|(k, v)| (k.to_string(), b64(v).into()))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "cellgate-ca", "namespace": CNS, "resourceVersion": rv},
           "data": data})
}

fn bundle(pem: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cellgate-ca-bundle", "namespace": CNS},
           "data": {"ca.crt": pem}})
}

fn node_pod(node: &str, pod: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod, "namespace": CNS,
                        "labels": {"app.kubernetes.io/name": "cellgate", "app.kubernetes.io/component": "node"}},
           "spec": {"nodeName": node, "containers": [{"name": "node", "image": "cellgate-node"}]},
           "status": {"phase": "Running"}})
}

fn pods(list: &[(&str, &str)]) -> Reply {
    Reply::Json(
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
        "items": list.iter().map(|(n, p)| node_pod(n, p)).collect::<Vec<_>>()}),
    )
}

/// A node's report: `(node, pod, loaded, signing)`.
fn leases(list: &[(&str, &str, Vec<&str>, &str)]) -> Reply {
    let items: Vec<Value> = list
        .iter()
        .map(|(node, pod, loaded, signing)| {
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": format!("cellgate-node-{node}"), "namespace": CNS,
                                "labels": {"cellgate.dev/node-report": "ca"},
                                "annotations": {"cellgate.dev/pod": pod,
                                                "cellgate.dev/ca-loaded": loaded.join(","),
                                                "cellgate.dev/ca-signing": signing,
                                                "cellgate.dev/token-keys": "k1"}},
                   "spec": {"holderIdentity": node, "renewTime": "2030-01-01T00:00:00.000000Z"}})
        })
        .collect();
    Reply::Json(
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": items}),
    )
}

/// The cell CA ConfigMaps (metadata only), each with the fingerprints it holds.
fn cell_cms(list: &[(&str, &str, Vec<&str>)]) -> Reply {
    let items: Vec<Value> = list
        .iter()
        .map(|(ns, cell, fps)| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": format!("cellgate-{cell}-ca"), "namespace": ns,
                                "labels": {"cellgate.dev/cell": cell},
                                "annotations": {ANNOTATION_BUNDLE_CAS: fps.join(",")}}})
        })
        .collect();
    Reply::Json(
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                       "metadata": {}, "items": items}),
    )
}

/// A slot filled by one call's check and read by later ones.
type Slot = Arc<Mutex<Option<String>>>;

fn slot_get(s: &Slot) -> String {
    s.lock()
        .expect("slot")
        .clone()
        .expect("filled by an earlier call")
}

fn decode(v: &Value) -> String {
    use base64::Engine as _;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 text"))
            .expect("base64"),
    )
    .expect("utf8")
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

#[tokio::test]
async fn a_rotation_from_start_to_the_old_cas_removal() {
    let mut fx = Fx::new();
    let old_pem = fx.old.cert_pem().to_string();
    let old_key = fx.old.key_pem();
    let old_fp = fx.old.fingerprint().to_string();
    let old_secret = vec![("ca.crt", old_pem.clone()), ("ca.key", old_key.clone())];

    // Tick 1: no state yet; it is made from the nodes' Secret, and the bundle already holds it.
    let idle = json!({"phase": "Idle", "signing.crt": old_pem, "since": rfc(T0)});
    let step = fx
        .tick(vec![
            get(ROT, Reply::NotFound),
            get(SECRET, Reply::Json(secret(&old_secret, "10"))),
            apply(ROT, Expect::Json(state_apply(idle.clone(), None))),
            get(REQ, Reply::NotFound),
            apply(
                REQ,
                Expect::Json(json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "cellgate-ca-rotation-request", "namespace": CNS,
                                 "labels": {"app.kubernetes.io/managed-by": "cellgate-operator"}}})),
            ),
            get(BUNDLE, Reply::Json(bundle(&old_pem))),
        ])
        .await;
    assert_eq!(step, Ok(Step::Idle));

    // Tick 2: nothing asked: the state and the request are read, nothing else.
    let step = fx
        .tick(vec![get(ROT, Reply::Json(state_cm(idle.clone(), "1")))])
        .await;
    assert_eq!(step, Ok(Step::Idle));

    // Tick 3: `kubectl cellgate ca rotate --grace 1h` wrote a request. The new CA goes into the
    // Secret as next.*, then the state, then the bundles.
    let mut requested = idle.clone();
    requested["request"] = json!(r#"{"id":"r1","grace":"1h"}"#);
    let new_pem: Slot = Arc::default();
    let new_key: Slot = Arc::default();
    let (np, nk, okey, opem) = (
        new_pem.clone(),
        new_key.clone(),
        old_key.clone(),
        old_pem.clone(),
    );
    let check_secret = Box::new(move |b: &Value| {
        assert_eq!(b["metadata"]["resourceVersion"], "10", "{b}");
        let d = &b["data"];
        assert_eq!(decode(&d["ca.crt"]), opem);
        assert_eq!(decode(&d["ca.key"]), okey);
        let cert = decode(&d["next.crt"]);
        let key = decode(&d["next.key"]);
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(d.as_object().expect("data").len(), 4);
        // A usable CA, issued like the old one.
        let ca = Ca::from_pem(cert.clone(), &key, "n.crt".into(), "n.key".into()).expect("loads");
        let info = &cellgate_tls::rotation::describe(ca.cert_pem()).expect("describe")[0];
        assert_eq!(info.subject, "Cellgate CA rotated 2030-01-01T00:01:00Z");
        *np.lock().expect("slot") = Some(cert);
        *nk.lock().expect("slot") = Some(key);
    });
    let (np, opem) = (new_pem.clone(), old_pem.clone());
    let check_state = Box::new(move |b: &Value| {
        let new = slot_get(&np);
        let want = state_apply(
            json!({"phase": "Introduced", "signing.crt": opem, "next.crt": new,
                   "since": rfc(T0 + 60), "grace": "1h",
                   "waitingFor": "every cell's bundle to hold the new CA",
                   "handledRequest": "r1", "requestOutcome": "started"}),
            Some("2"),
        );
        assert_eq!(b, &want);
    });
    let (np, opem) = (new_pem.clone(), old_pem.clone());
    let check_bundle = Box::new(move |b: &Value| {
        assert_eq!(b, &bundle(&format!("{opem}{}", slot_get(&np))));
    });
    fx.at(T0 + 60);
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(requested, "2"))),
            get(SECRET, Reply::Json(secret(&old_secret, "10"))),
            apply(SECRET, Expect::Check(check_secret)),
            apply(ROT, Expect::Check(check_state)),
            get(BUNDLE, Reply::Json(bundle(&old_pem))),
            apply(BUNDLE, Expect::Check(check_bundle)),
        ])
        .await
        .expect("tick");
    let new_pem = slot_get(&new_pem);
    let new_key = slot_get(&new_key);
    let new_fp = cellgate_tls::rotation::fingerprints(&new_pem)[0].clone();
    assert_eq!(step, Step::Introduced(new_fp.clone()));

    let introduced = |waiting: &str, bundles_ready: Option<i64>| {
        let mut d = json!({"phase": "Introduced", "signing.crt": old_pem, "next.crt": new_pem,
                           "since": rfc(T0 + 60), "grace": "1h",
                           "handledRequest": "r1", "requestOutcome": "started",
                           "request": r#"{"id":"r1","grace":"1h"}"#});
        d["waitingFor"] = waiting.into();
        if let Some(t) = bundles_ready {
            d["bundlesReady"] = rfc(t).into();
        }
        d
    };
    let written = |mut d: Value| {
        d.as_object_mut().expect("map").remove("request");
        d
    };
    let two_nodes = [("node-a", "cellgate-node-a"), ("node-b", "cellgate-node-b")];

    // Tick 4: one cell bundle lacks the new CA (the operator's trust bundle follows
    // cellgate-ca-bundle through its mount), and node-b has not loaded it.
    fx.at(T0 + 90);
    let waiting = "1 cell bundle(s) to hold the new CA: agents/cellgate-triage-ca; node node-b (pod cellgate-node-b) has not loaded the new CA";
    let step = fx
        .tick(vec![
            get(
                ROT,
                Reply::Json(state_cm(
                    introduced("every cell's bundle to hold the new CA", None),
                    "3",
                )),
            ),
            get(
                CELL_CMS,
                cell_cms(&[
                    ("agents", "triage", vec![&old_fp]),
                    ("agents", "other", vec![&old_fp, &new_fp]),
                ]),
            ),
            get(PODS, pods(&two_nodes)),
            get(
                LEASES,
                leases(&[
                    ("node-a", "cellgate-node-a", vec![&old_fp, &new_fp], &old_fp),
                    ("node-b", "cellgate-node-b", vec![&old_fp], &old_fp),
                ]),
            ),
            apply(
                ROT,
                Expect::Json(state_apply(written(introduced(waiting, None)), Some("3"))),
            ),
        ])
        .await;
    assert_eq!(step, Ok(Step::Waiting(waiting.into())));

    // Tick 5: every bundle holds it now: the time kubelet needs to bring it into the pods starts.
    // node-b has loaded it too, but its report comes from its previous pod: a node that has not
    // reported for the pod running now keeps the phase (and the Secret is not touched).
    fx.at(T0 + 400);
    let waiting2 = format!(
        "the bundles to reach the pods (until {}); node node-b (pod cellgate-node-b) the report is from pod cellgate-node-b-old, not this one",
        rfc(T0 + 520)
    );
    let all_bundles = || {
        cell_cms(&[
            ("agents", "triage", vec![&old_fp, &new_fp]),
            ("agents", "other", vec![&old_fp, &new_fp]),
        ])
    };
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(introduced(waiting, None), "4"))),
            get(CELL_CMS, all_bundles()),
            get(PODS, pods(&two_nodes)),
            get(
                LEASES,
                leases(&[
                    ("node-a", "cellgate-node-a", vec![&old_fp, &new_fp], &old_fp),
                    (
                        "node-b",
                        "cellgate-node-b-old",
                        vec![&old_fp, &new_fp],
                        &old_fp,
                    ),
                ]),
            ),
            apply(
                ROT,
                Expect::Json(state_apply(
                    written(introduced(&waiting2, Some(T0 + 400))),
                    Some("4"),
                )),
            ),
        ])
        .await;
    assert_eq!(step, Ok(Step::Waiting(waiting2.clone())));

    // Tick 6: every node pod reports it, but the pods may not have the new bundle yet.
    fx.at(T0 + 519);
    let waiting3 = format!("the bundles to reach the pods (until {})", rfc(T0 + 520));
    let loaded_all = || {
        leases(&[
            ("node-a", "cellgate-node-a", vec![&old_fp, &new_fp], &old_fp),
            ("node-b", "cellgate-node-b", vec![&old_fp, &new_fp], &old_fp),
        ])
    };
    let step = fx
        .tick(vec![
            get(
                ROT,
                Reply::Json(state_cm(introduced(&waiting2, Some(T0 + 400)), "5")),
            ),
            get(CELL_CMS, all_bundles()),
            get(PODS, pods(&two_nodes)),
            get(LEASES, loaded_all()),
            apply(
                ROT,
                Expect::Json(state_apply(
                    written(introduced(&waiting3, Some(T0 + 400))),
                    Some("5"),
                )),
            ),
        ])
        .await;
    assert_eq!(step, Ok(Step::Waiting(waiting3.clone())));

    // Tick 7: all of it: the new CA signs. The Secret first (ca.* = new, next.* gone), then the
    // state.
    fx.at(T0 + 520);
    let introduced_secret = vec![
        ("ca.crt", old_pem.clone()),
        ("ca.key", old_key.clone()),
        ("next.crt", new_pem.clone()),
        ("next.key", new_key.clone()),
    ];
    let active = |waiting: &str, since: i64| {
        json!({"phase": "Active", "signing.crt": new_pem, "previous.crt": old_pem,
               "since": rfc(since), "grace": "1h", "waitingFor": waiting,
               "handledRequest": "r1", "requestOutcome": "started"})
    };
    let step = fx
        .tick(vec![
            get(
                ROT,
                Reply::Json(state_cm(introduced(&waiting3, Some(T0 + 400)), "5")),
            ),
            get(CELL_CMS, all_bundles()),
            get(PODS, pods(&two_nodes)),
            get(LEASES, loaded_all()),
            get(SECRET, Reply::Json(secret(&introduced_secret, "11"))),
            apply(
                SECRET,
                Expect::Json(secret_apply(
                    &[("ca.crt", new_pem.clone()), ("ca.key", new_key.clone())],
                    "11",
                )),
            ),
            apply(
                ROT,
                Expect::Json(state_apply(
                    active("every node to sign with the new CA", T0 + 520),
                    Some("5"),
                )),
            ),
        ])
        .await;
    assert_eq!(
        step,
        Ok(Step::Advanced {
            from: Phase::Introduced,
            to: Phase::Active
        })
    );

    // Tick 8: node-b still signs with the old CA (kubelet has not updated its volume yet).
    fx.at(T0 + 540);
    let waiting4 = "node node-b (pod cellgate-node-b) does not sign with the new CA yet";
    let step = fx
        .tick(vec![
            get(
                ROT,
                Reply::Json(state_cm(
                    active("every node to sign with the new CA", T0 + 520),
                    "6",
                )),
            ),
            get(PODS, pods(&two_nodes)),
            get(
                LEASES,
                leases(&[
                    ("node-a", "cellgate-node-a", vec![&new_fp], &new_fp),
                    ("node-b", "cellgate-node-b", vec![&old_fp, &new_fp], &old_fp),
                ]),
            ),
            apply(
                ROT,
                Expect::Json(state_apply(active(waiting4, T0 + 520), Some("6"))),
            ),
        ])
        .await;
    assert_eq!(step, Ok(Step::Waiting(waiting4.into())));

    // Tick 9: every node signs with the new CA: the grace period starts.
    fx.at(T0 + 600);
    let signing_all = || {
        leases(&[
            ("node-a", "cellgate-node-a", vec![&new_fp], &new_fp),
            ("node-b", "cellgate-node-b", vec![&new_fp], &new_fp),
        ])
    };
    let retiring = json!({"phase": "Retiring", "signing.crt": new_pem, "previous.crt": old_pem,
        "since": rfc(T0 + 600), "grace": "1h", "retireAfter": rfc(T0 + 4200),
        "waitingFor": format!("the grace period to end ({})", rfc(T0 + 4200)),
        "handledRequest": "r1", "requestOutcome": "started"});
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(active(waiting4, T0 + 520), "7"))),
            get(PODS, pods(&two_nodes)),
            get(LEASES, signing_all()),
            apply(ROT, Expect::Json(state_apply(retiring.clone(), Some("7")))),
        ])
        .await;
    assert_eq!(
        step,
        Ok(Step::Advanced {
            from: Phase::Active,
            to: Phase::Retiring
        })
    );

    // Tick 10: during the grace period, the two GETs and nothing else.
    fx.at(T0 + 4199);
    let step = fx
        .tick(vec![get(ROT, Reply::Json(state_cm(retiring.clone(), "8")))])
        .await;
    assert!(matches!(step, Ok(Step::Waiting(_))), "{step:?}");

    // Tick 11: the grace is over and every node still signs with the new CA: the old CA leaves
    // the state, then the published set (and so, every cell's bundle).
    fx.at(T0 + 4200);
    let done = json!({"phase": "Idle", "signing.crt": new_pem, "since": rfc(T0 + 4200),
                      "handledRequest": "r1", "requestOutcome": "started"});
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(retiring, "8"))),
            get(PODS, pods(&two_nodes)),
            get(LEASES, signing_all()),
            apply(ROT, Expect::Json(state_apply(done, Some("8")))),
            get(BUNDLE, Reply::Json(bundle(&format!("{old_pem}{new_pem}")))),
            apply(BUNDLE, Expect::Json(bundle(&new_pem))),
        ])
        .await;
    assert_eq!(
        step,
        Ok(Step::Advanced {
            from: Phase::Retiring,
            to: Phase::Idle
        })
    );
}

#[tokio::test]
async fn the_grace_period_waits_for_a_node_that_went_back_and_for_zero_node_pods() {
    let mut fx = Fx::new();
    let new = Ca::generate("New CA").expect("new");
    let (old_pem, new_pem) = (fx.old.cert_pem().to_string(), new.cert_pem().to_string());
    let (old_fp, new_fp) = (
        fx.old.fingerprint().to_string(),
        new.fingerprint().to_string(),
    );
    let retiring = json!({"phase": "Retiring", "signing.crt": new_pem, "previous.crt": old_pem,
        "since": rfc(T0), "grace": "1h", "retireAfter": rfc(T0 + 3600),
        "waitingFor": format!("the grace period to end ({})", rfc(T0 + 3600))});
    fx.at(T0 + 3600);
    // A new node pod (node-c) that has loaded only the old CA: the old CA stays.
    let waiting = "node node-c (pod cellgate-node-c) does not sign with the new CA yet";
    let mut written = retiring.clone();
    written["waitingFor"] = waiting.into();
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(retiring.clone(), "3"))),
            get(BUNDLE, Reply::Json(bundle(&format!("{old_pem}{new_pem}")))),
            get(
                PODS,
                pods(&[("node-a", "cellgate-node-a"), ("node-c", "cellgate-node-c")]),
            ),
            get(
                LEASES,
                leases(&[
                    ("node-a", "cellgate-node-a", vec![&new_fp], &new_fp),
                    ("node-c", "cellgate-node-c", vec![&old_fp], &old_fp),
                ]),
            ),
            apply(ROT, Expect::Json(state_apply(written.clone(), Some("3")))),
        ])
        .await;
    assert_eq!(step, Ok(Step::Waiting(waiting.into())));

    // No node pod at all: a selector that finds nothing is not "every node is ready".
    let none = "a node pod to report (none found in cellgate-system with labels app.kubernetes.io/name=cellgate,app.kubernetes.io/component=node)";
    let mut written2 = retiring.clone();
    written2["waitingFor"] = none.into();
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(written, "4"))),
            get(PODS, pods(&[])),
            get(LEASES, leases(&[])),
            apply(ROT, Expect::Json(state_apply(written2, Some("4")))),
        ])
        .await;
    assert_eq!(step, Ok(Step::Waiting(none.into())));
}

#[tokio::test]
async fn requests_during_a_rotation_are_refused_except_force_while_introduced() {
    let mut fx = Fx::new();
    let new = Ca::generate("New CA").expect("new");
    let (old_pem, new_pem) = (fx.old.cert_pem().to_string(), new.cert_pem().to_string());
    // Active: refused, recorded as handled, nothing else written.
    let active = json!({"phase": "Active", "signing.crt": new_pem, "previous.crt": old_pem,
                        "since": rfc(T0), "grace": "1h", "waitingFor": "x"});
    let mut asked = active.clone();
    asked["request"] = json!(r#"{"id":"r2","force":true}"#);
    let mut refused = active.clone();
    refused["handledRequest"] = "r2".into();
    refused["requestOutcome"] = "refused: a rotation is in progress and its new CA already signs; wait until the phase is Idle".into();
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(asked.clone(), "3"))),
            get(BUNDLE, Reply::Json(bundle(&format!("{old_pem}{new_pem}")))),
            apply(ROT, Expect::Json(state_apply(refused.clone(), Some("3")))),
        ])
        .await;
    assert!(matches!(step, Ok(Step::Refused(_))), "{step:?}");
    // Handled once: the next tick just waits.
    let mut handled = refused.clone();
    handled["request"] = asked["request"].clone();
    fx.at(T0 + 10);
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(handled, "4"))),
            get(PODS, pods(&[])),
            get(LEASES, leases(&[])),
            apply(
                ROT,
                Expect::Check(Box::new(|b| {
                    assert!(b["data"]["waitingFor"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with("a node pod to report"));
                    assert_eq!(b["data"]["handledRequest"], "r2");
                })),
            ),
        ])
        .await;
    assert!(matches!(step, Ok(Step::Waiting(_))), "{step:?}");

    // Idle with a grace over the limit: refused, nothing generated.
    let mut fx = Fx::new();
    let old_pem = fx.old.cert_pem().to_string();
    let mut idle = json!({"phase": "Idle", "signing.crt": old_pem, "since": rfc(T0)});
    idle["request"] = json!(r#"{"id":"r3","grace":"45d"}"#);
    let mut refused = idle.clone();
    refused.as_object_mut().expect("map").remove("request");
    refused["handledRequest"] = "r3".into();
    refused["requestOutcome"] = "refused: grace \"45d\" is longer than 30 days".into();
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(idle, "3"))),
            get(BUNDLE, Reply::Json(bundle(&old_pem))),
            apply(ROT, Expect::Json(state_apply(refused, Some("3")))),
        ])
        .await;
    assert!(matches!(step, Ok(Step::Refused(_))), "{step:?}");

    // Introduced with --force: the introduced CA (not signing) is replaced by a fresh one.
    let mut fx = Fx::new();
    let old_pem = fx.old.cert_pem().to_string();
    let old_key2 = fx.old.key_pem();
    let introduced = json!({"phase": "Introduced", "signing.crt": old_pem, "next.crt": new_pem,
                            "since": rfc(T0), "grace": "1h", "handledRequest": "r1",
                            "requestOutcome": "started",
                            "request": r#"{"id":"r4","force":true,"grace":"2h"}"#});
    let secret_files = vec![
        ("ca.crt", old_pem.clone()),
        ("ca.key", old_key2.clone()),
        ("next.crt", new_pem.clone()),
        ("next.key", new.key_pem()),
    ];
    let fresh: Slot = Arc::default();
    let (f1, replaced) = (fresh.clone(), new_pem.clone());
    let check_secret = Box::new(move |b: &Value| {
        let next = decode(&b["data"]["next.crt"]);
        assert_ne!(next, replaced, "a fresh CA");
        *f1.lock().expect("slot") = Some(next);
    });
    let f2 = fresh.clone();
    let check_state = Box::new(move |b: &Value| {
        assert_eq!(b["data"]["phase"], "Introduced");
        assert_eq!(b["data"]["next.crt"], slot_get(&f2).as_str());
        assert_eq!(b["data"]["grace"], "2h");
        assert_eq!(b["data"]["handledRequest"], "r4");
    });
    fx.at(T0 + 30);
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(introduced, "3"))),
            get(BUNDLE, Reply::Json(bundle(&format!("{old_pem}{new_pem}")))),
            get(SECRET, Reply::Json(secret(&secret_files, "12"))),
            apply(SECRET, Expect::Check(check_secret)),
            apply(ROT, Expect::Check(check_state)),
            get(BUNDLE, Reply::Json(bundle(&format!("{old_pem}{new_pem}")))),
            apply(
                BUNDLE,
                Expect::Check(Box::new(move |b| {
                    assert_eq!(
                        b["data"]["ca.crt"],
                        format!("{}{}", old_pem, slot_get(&fresh))
                    );
                })),
            ),
        ])
        .await;
    assert!(matches!(step, Ok(Step::Introduced(_))), "{step:?}");
}

#[tokio::test]
async fn a_secret_changed_outside_the_rotation_stops_it_before_any_write() {
    let mut fx = Fx::new();
    let old_pem = fx.old.cert_pem().to_string();
    let other = Ca::generate("Someone else's CA").expect("other");
    let mut idle = json!({"phase": "Idle", "signing.crt": old_pem, "since": rfc(T0)});
    idle["request"] = json!(r#"{"id":"r1"}"#);
    let step = fx
        .tick(vec![
            get(ROT, Reply::Json(state_cm(idle, "3"))),
            get(BUNDLE, Reply::Json(bundle(&old_pem))),
            get(
                SECRET,
                Reply::Json(secret(
                    &[
                        ("ca.crt", other.cert_pem().to_string()),
                        ("ca.key", other.key_pem()),
                    ],
                    "9",
                )),
            ),
        ])
        .await;
    let err = step.expect_err("refused");
    assert!(err.starts_with("ca_rotation_secret: "), "{err}");
    assert!(err.contains("changed outside the rotation"), "{err}");

    // A state that does not fit its phase is not acted on either: not even the request is read.
    let mut fx = Fx::new();
    let bad = json!({"phase": "Introduced", "signing.crt": old_pem});
    let err = fx
        .tick_exact(vec![get(ROT, Reply::Json(state_cm(bad, "1")))])
        .await
        .expect_err("refused");
    assert!(err.starts_with("ca_rotation_state: "), "{err}");
}
