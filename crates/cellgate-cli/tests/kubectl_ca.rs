//! `kubectl cellgate ca rotate|status` against kube-rs's mocked API service (every call asserted:
//! method, URI, body), and `cellgate keys jwks` as a user runs it.

use std::process::Command;
use std::time::Duration;

use cellgate_cli::kubectl_ca;
use cellgate_tls::Ca;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

struct Call {
    method: Method,
    uri: &'static str,
    body: Option<Value>,
    status: StatusCode,
    answer: Value,
}

fn get(uri: &'static str, answer: Value) -> Call {
    Call {
        method: Method::GET,
        uri,
        body: None,
        status: StatusCode::OK,
        answer,
    }
}

async fn serve(mut handle: Handle, script: Vec<Call>) {
    let total = script.len();
    for (i, c) in script.into_iter().enumerate() {
        let what = format!("call {}/{total} ({} {})", i + 1, c.method, c.uri);
        let (req, send) = handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("{what}: not made"));
        assert_eq!(req.method(), c.method, "{what}");
        assert_eq!(req.uri().to_string(), c.uri, "{what}");
        let bytes = req.into_body().collect_bytes().await.expect("body");
        match c.body {
            Some(want) => {
                let got: Value = serde_json::from_slice(&bytes).expect("json body");
                assert_eq!(got, want, "{what}: body");
            }
            None => assert!(bytes.is_empty(), "{what}: unexpected body"),
        }
        send.send_response(
            Response::builder()
                .status(c.status)
                .body(Body::from(serde_json::to_vec(&c.answer).expect("json")))
                .expect("response"),
        );
    }
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await
    {
        panic!("unexpected extra call: {} {}", req.method(), req.uri());
    }
}

/// Runs `f` against the script; the script must be played out whole.
async fn with_api<T>(
    script: Vec<Call>,
    f: impl FnOnce(kube::Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>,
) -> T {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, script));
    let out = f(kube::Client::new(svc, "default")).await;
    server.await.expect("the scripted server");
    out
}

const ROT: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-ca-rotation";
const REQ: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-ca-rotation-request";
const REQ_APPLY: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-ca-rotation-request?&fieldManager=kubectl-cellgate";
const PODS: &str = "/api/v1/namespaces/cellgate-system/pods?&labelSelector=app.kubernetes.io%2Fname%3Dcellgate%2Capp.kubernetes.io%2Fcomponent%3Dnode";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/cellgate-system/leases?&labelSelector=cellgate.dev%2Fnode-report%3Dca";

fn state(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cellgate-ca-rotation", "namespace": "cellgate-system", "resourceVersion": "41"},
           "data": data})
}

/// The request ConfigMap, with `request` (JSON text) when given.
fn requests(request: Option<&str>) -> Value {
    let mut data = serde_json::Map::new();
    if let Some(r) = request {
        data.insert("request".into(), r.into());
    }
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cellgate-ca-rotation-request", "namespace": "cellgate-system",
                        "resourceVersion": "41"},
           "data": data})
}

/// The request the plugin writes.
fn request_apply(grace: &str, force: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cellgate-ca-rotation-request", "namespace": "cellgate-system",
                     "resourceVersion": "41"},
        "data": {"request": format!("{{\"id\":\"2030-01-01T00:00:00.000000001Z\",\"grace\":\"{grace}\",\"force\":{force}}}")},
    })
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

async fn rotate(script: Vec<Call>, grace: &'static str, force: bool) -> Result<String, String> {
    with_api(script, move |c| {
        Box::pin(async move {
            kubectl_ca::request_rotation(
                c,
                "cellgate-system",
                grace,
                force,
                "2030-01-01T00:00:00.000000001Z",
            )
            .await
            .map_err(|e| format!("{e:#}"))
        })
    })
    .await
}

#[tokio::test]
async fn rotate_writes_only_its_request_on_the_version_it_read() {
    let ca = Ca::generate("Cellgate CA").expect("ca");
    let idle =
        json!({"phase": "Idle", "signing.crt": ca.cert_pem(), "since": "2030-01-01T00:00:00Z"});
    let text = rotate(
        vec![
            get(ROT, state(idle)),
            get(REQ, requests(None)),
            Call {
                method: Method::PATCH,
                uri: REQ_APPLY,
                body: Some(request_apply("2h", false)),
                status: StatusCode::OK,
                answer: requests(Some("{}")),
            },
        ],
        "2h",
        false,
    )
    .await
    .expect("requested");
    assert!(
        text.contains("CA rotation requested") && text.contains("grace 2h"),
        "{text}"
    );
    assert!(text.contains("kubectl cellgate ca status"), "{text}");
}

#[tokio::test]
async fn rotate_refuses_what_it_must() {
    let old = Ca::generate("Old").expect("old");
    let new = Ca::generate("New").expect("new");
    // A bad grace: refused before any call.
    let err = rotate(vec![], "45d", false).await.expect_err("grace");
    assert!(err.contains("--grace") && err.contains("30 days"), "{err}");
    // No state: the operator is not there.
    let err = rotate(
        vec![Call {
            method: Method::GET,
            uri: ROT,
            body: None,
            status: StatusCode::NOT_FOUND,
            answer: not_found(),
        }],
        "24h",
        false,
    )
    .await
    .expect_err("no state");
    assert!(err.contains("no CA rotation state"), "{err}");
    // In progress.
    let introduced = json!({"phase": "Introduced", "signing.crt": old.cert_pem(),
                            "next.crt": new.cert_pem(), "since": "2030-01-01T00:00:00Z",
                            "handledRequest": "r1"});
    let err = rotate(
        vec![
            get(ROT, state(introduced.clone())),
            get(REQ, requests(None)),
        ],
        "24h",
        false,
    )
    .await
    .expect_err("in progress");
    assert!(
        err.contains("phase Introduced since 2030-01-01T00:00:00Z") && err.contains("--force"),
        "{err}"
    );
    let active = json!({"phase": "Active", "signing.crt": new.cert_pem(),
                        "previous.crt": old.cert_pem(), "since": "2030-01-01T01:00:00Z"});
    let err = rotate(
        vec![get(ROT, state(active)), get(REQ, requests(None))],
        "24h",
        true,
    )
    .await
    .expect_err("force cannot undo a signing CA");
    assert!(err.contains("already signs"), "{err}");
    // A request the operator has not acted on.
    let idle = json!({"phase": "Idle", "signing.crt": old.cert_pem(), "handledRequest": "before"});
    let err = rotate(
        vec![
            get(ROT, state(idle.clone())),
            get(REQ, requests(Some(r#"{"id":"earlier"}"#))),
        ],
        "24h",
        false,
    )
    .await
    .expect_err("pending");
    assert!(
        err.contains("earlier") && err.contains("not acted on"),
        "{err}"
    );
    // A concurrent change: the write conflicts and nothing is assumed.
    let err = rotate(
        vec![
            get(ROT, state(idle.clone())),
            get(REQ, requests(Some(r#"{"id":"before"}"#))),
            Call {
                method: Method::PATCH,
                uri: REQ_APPLY,
                body: Some(request_apply("24h", false)),
                status: StatusCode::CONFLICT,
                answer: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": "the object has been modified", "reason": "Conflict", "code": 409}),
            },
        ],
        "24h",
        false,
    )
    .await
    .expect_err("conflict");
    assert!(err.contains("run the command again"), "{err}");
    // --force while Introduced is allowed.
    let forced = rotate(
        vec![
            get(ROT, state(introduced)),
            get(REQ, requests(Some(r#"{"id":"r1"}"#))),
            Call {
                method: Method::PATCH,
                uri: REQ_APPLY,
                body: Some(request_apply("24h", true)),
                status: StatusCode::OK,
                answer: requests(Some("{}")),
            },
        ],
        "24h",
        true,
    )
    .await
    .expect("forced");
    assert!(forced.contains("forced"), "{forced}");
}

fn node_pod(node: &str, pod: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod, "namespace": "cellgate-system"},
           "spec": {"nodeName": node, "containers": [{"name": "node", "image": "n"}]},
           "status": {"phase": "Running"}})
}

fn lease(node: &str, pod: &str, loaded: &[&str], signing: &str, keys: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": format!("cellgate-node-{node}"), "namespace": "cellgate-system",
                        "annotations": {"cellgate.dev/pod": pod,
                                        "cellgate.dev/ca-loaded": loaded.join(","),
                                        "cellgate.dev/ca-signing": signing,
                                        "cellgate.dev/token-keys": keys}},
           "spec": {"holderIdentity": node, "renewTime": "2030-01-01T00:05:00.000000Z"}})
}

#[tokio::test]
async fn status_shows_the_phase_the_cas_and_which_node_has_which() {
    let old = Ca::generate("Cellgate CA").expect("old");
    let new = Ca::generate("Cellgate CA rotated 2030-01-01T00:00:00Z").expect("new");
    let (o, n) = (old.fingerprint(), new.fingerprint());
    let introduced = json!({"phase": "Introduced", "signing.crt": old.cert_pem(),
        "next.crt": new.cert_pem(), "since": "2030-01-01T00:00:00Z", "grace": "24h",
        "waitingFor": "node node-b (pod cellgate-node-b) has not loaded the new CA",
        "handledRequest": "r1", "requestOutcome": "started"});
    let text = with_api(
        vec![
            get(ROT, state(introduced)),
            get(REQ, requests(Some(r#"{"id":"r1"}"#))),
            get(
                PODS,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                    node_pod("node-a", "cellgate-node-a"),
                    node_pod("node-b", "cellgate-node-b"),
                    node_pod("node-c", "cellgate-node-c"),
                ]}),
            ),
            get(
                LEASES,
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": [
                    lease("node-a", "cellgate-node-a", &[o, n], o, "k1,k2"),
                    lease("node-b", "cellgate-node-b", &[o], o, "k1"),
                ]}),
            ),
        ],
        |c| {
            Box::pin(async move {
                kubectl_ca::status_text(c, "cellgate-system")
                    .await
                    .expect("status")
            })
        },
    )
    .await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "Phase:        Introduced (since 2030-01-01T00:00:00Z)"
    );
    assert_eq!(lines[1], "Grace:        24h");
    assert_eq!(
        lines[2],
        "Waiting for:  node node-b (pod cellgate-node-b) has not loaded the new CA"
    );
    assert_eq!(lines[3], "Last request: r1: started");
    let signing = lines
        .iter()
        .find(|l| l.starts_with("signing "))
        .expect(&text);
    assert!(
        signing.contains(o) && signing.contains("Cellgate CA"),
        "{text}"
    );
    let next = lines.iter().find(|l| l.starts_with("next ")).expect(&text);
    assert!(next.contains(n) && next.contains("rotated"), "{text}");
    assert!(
        text.contains("Nodes (3: each must have loaded the next CA):"),
        "{text}"
    );
    let row = |node: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{node} in {text}"))
    };
    let a: Vec<&str> = row("node-a").split_whitespace().collect();
    assert_eq!(
        a,
        vec![
            "node-a",
            "cellgate-node-a",
            "signing,next",
            "signing",
            "k1,k2",
            "2030-01-01T00:05:00Z",
            "yes"
        ],
        "{text}"
    );
    assert!(
        row("node-b").ends_with("no: has not loaded the new CA"),
        "{text}"
    );
    assert!(row("node-c").contains("no: has not reported"), "{text}");

    // No state yet.
    let text = with_api(
        vec![Call {
            method: Method::GET,
            uri: ROT,
            body: None,
            status: StatusCode::NOT_FOUND,
            answer: not_found(),
        }],
        |c| {
            Box::pin(async move {
                kubectl_ca::status_text(c, "cellgate-system")
                    .await
                    .expect("status")
            })
        },
    )
    .await;
    assert!(
        text.starts_with("no CA rotation state in cellgate-system yet"),
        "{text}"
    );
}

#[test]
fn the_plugin_knows_the_ca_commands() {
    let help = Command::new(env!("CARGO_BIN_EXE_kubectl-cellgate"))
        .args(["ca", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("rotate") && text.contains("status"), "{text}");
    let help = Command::new(env!("CARGO_BIN_EXE_kubectl-cellgate"))
        .args(["ca", "rotate", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--grace") && text.contains("--force"),
        "{text}"
    );
}

#[test]
fn keys_jwks_makes_one_trust_set_of_two_keys() {
    let dir = tempfile::tempdir().expect("dir");
    let old = cellgate_identity::SigningKey::generate().expect("old");
    let new = cellgate_identity::SigningKey::generate().expect("new");
    old.write_pair(&dir.path().join("old")).expect("old");
    new.write_pair(&dir.path().join("new")).expect("new");
    let out = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["keys", "jwks"])
        .arg(dir.path().join("old/signing.pub"))
        .arg(dir.path().join("new/signing.pub"))
        .arg(dir.path().join("old/signing.pub"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = cellgate_identity::PublicKey::parse_all(&String::from_utf8_lossy(&out.stdout))
        .expect("a JWK set");
    assert_eq!(keys, vec![old.public_key(), new.public_key()]);
    let bad = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["keys", "jwks", "/nonexistent.pub"])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(2));
}
