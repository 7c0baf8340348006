//! Policy pack scenarios against kube-rs's mocked API service (`tower_test::mock`): each scenario
//! lists every call the policy reconciler must make, in order, with its method, URI and body (or a
//! check of the body), and the reply the fake API server gives.

use std::sync::Arc;
use std::time::Duration;

use cellgate_api::policy_pack::{
    content_hash, CellgateClusterPolicyResource, CellgatePolicyResource, PackSpec, PolicyRef,
};
use cellgate_operator::policy::{
    reconcile_cluster, reconcile_namespaced, snapshot_configmap, PolicyContext, REFUSED_REQUEUE,
};
use cellgate_operator::reconcile::Clock;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};

const CP: &str = "/apis/cellgate.dev/v1alpha1/cellgateclusterpolicies";
const NP: &str = "/apis/cellgate.dev/v1alpha1/cellgatepolicies";
const CMS: &str = "/api/v1/namespaces/cellgate-system/configmaps";
/// 2030-01-01T00:00:00Z
const T0: i64 = 1_893_456_000;

enum Expect {
    Empty,
    Json(Value),
    Check(Box<dyn Fn(&Value) + Send>),
}

struct Call {
    method: Method,
    uri: String,
    body: Expect,
    reply: Value,
}

fn get(uri: &str, reply: Value) -> Call {
    Call {
        method: Method::GET,
        uri: uri.into(),
        body: Expect::Empty,
        reply,
    }
}

fn apply(path: &str, body: Expect, reply: Value) -> Call {
    Call {
        method: Method::PATCH,
        uri: format!("{path}?&force=true&fieldManager=cellgate-operator"),
        body,
        reply,
    }
}

fn delete(path: &str) -> Call {
    Call {
        method: Method::DELETE,
        uri: format!("{path}?"),
        body: Expect::Json(json!({})),
        reply: json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
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
        let bytes = req.into_body().collect_bytes().await.expect("body");
        match call.body {
            Expect::Empty => assert!(bytes.is_empty(), "{what}: unexpected body"),
            Expect::Json(want) => {
                let got: Value = serde_json::from_slice(&bytes).expect("json");
                assert!(
                    got == want,
                    "{what}: body differs\n--- expected\n{want:#}\n--- actual\n{got:#}"
                );
            }
            Expect::Check(f) => f(&serde_json::from_slice(&bytes).expect("json")),
        }
        send.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(serde_json::to_vec(&call.reply).expect("reply")))
                .expect("response"),
        );
    }
    if let Some((req, _)) = handle.next_request().await {
        panic!("unexpected extra call: {} {}", req.method(), req.uri());
    }
}

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        T0
    }
    fn token_id(&self) -> String {
        unreachable!("policies mint no tokens")
    }
}

async fn run<F, Fut>(calls: Vec<Call>, f: F) -> Action
where
    F: FnOnce(Arc<PolicyContext>) -> Fut,
    Fut: std::future::Future<
        Output = Result<Action, cellgate_operator::policy::PolicyReconcileError>,
    >,
{
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Arc::new(PolicyContext::new(
        Client::new(service, "default"),
        "cellgate-system".into(),
        Arc::new(FixedClock),
    ));
    let server = tokio::spawn(serve(handle, calls));
    let result = tokio::time::timeout(Duration::from_secs(60), f(ctx))
        .await
        .expect("reconcile timed out");
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        other => panic!("api server task: {other:?}"),
    }
    result.expect("reconcile")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../policies/{rel}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("policy file")
}

fn base_spec() -> PackSpec {
    serde_json::from_value(json!({"modules": {
        "cellgate.rego": read("base/cellgate.rego"),
        "cellgate_test.rego": read("base/cellgate_test.rego"),
    }}))
    .expect("spec")
}

fn base_ref() -> PolicyRef {
    PolicyRef {
        namespace: None,
        name: "base".into(),
    }
}

/// The base in force (snapshot named in its status), as the cluster list returns it.
fn base_listed() -> (Value, Value) {
    let spec = base_spec();
    let hash = content_hash(&spec);
    let snap = base_ref().snapshot_name(&hash);
    let obj = json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgateClusterPolicy",
        "metadata": {"name": "base"}, "spec": spec,
        "status": {"version": 1, "hash": hash, "snapshot": snap}});
    let cm = serde_json::to_value(snapshot_configmap(
        &base_ref(),
        "cellgate-system",
        &hash,
        &spec,
    ))
    .expect("cm");
    (obj, cm)
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": format!("{kind}List"), "metadata": {}, "items": items})
}

/// The first three calls of every validation: both lists, then the base's snapshot.
fn lookups(extra_cluster: Vec<Value>, namespaced: Vec<Value>) -> Vec<Call> {
    let (base, base_cm) = base_listed();
    let mut cluster = vec![base];
    cluster.extend(extra_cluster);
    vec![
        get(&format!("{CP}?"), list("CellgateClusterPolicy", cluster)),
        get(&format!("{NP}?"), list("CellgatePolicy", namespaced)),
        get(
            &format!(
                "{CMS}/{}",
                base_cm["metadata"]["name"].as_str().expect("name")
            ),
            base_cm,
        ),
    ]
}

fn nodel_spec(source: &str) -> PackSpec {
    serde_json::from_value(json!({
        "modules": {"nodel.rego": source},
        "tests": {"nodel_test.rego": NODEL_TEST},
    }))
    .expect("spec")
}

const NODEL: &str = "package cellgate.layers.nodel\n\nimport rego.v1\n\ndeny contains {\"reason\": \"destructive_method\", \"message\": \"no DELETE\"} if {\n\tinput.request.method == \"DELETE\"\n}\n";

const NODEL_TEST: &str = "package cellgate.tests.nodel\n\nimport rego.v1\n\n_in(ns, m) := {\"version\": \"cellgate.dev/input/v1\", \"time_ns\": 0, \"front_door\": \"intake\",\n\t\"source\": {\"address\": \"10.0.0.2\", \"port\": 1},\n\t\"identity\": {\"jti\": \"j\", \"cell_uid\": \"u\", \"namespace\": ns, \"name\": \"a\", \"role\": null},\n\t\"cell\": {\"uid\": \"u\", \"namespace\": ns, \"name\": \"a\", \"role\": null, \"suspended\": false, \"labels\": {},\n\t\t\"capabilities\": [{\"name\": \"api\", \"mode\": \"enforce\", \"tls\": \"intercept\",\n\t\t\t\"destinations\": [{\"host\": \"api.example.com\", \"cidr\": null, \"ports\": [443]}],\n\t\t\t\"http\": null, \"approval\": false, \"credential\": false}]},\n\t\"request\": {\"protocol\": \"https\", \"host\": \"api.example.com\", \"port\": 443, \"sni\": \"api.example.com\",\n\t\t\"method\": m, \"path\": \"/x\", \"query\": null, \"headers\": {},\n\t\t\"destination\": {\"address\": \"203.0.113.10\", \"port\": 443}, \"dns_type\": null}}\n\ntest_delete_denied_in_agents if {\n\td := data.cellgate.authz.decision with input as _in(\"agents\", \"DELETE\")\n\td.reason == \"destructive_method\"\n}\n\ntest_get_allowed if {\n\td := data.cellgate.authz.decision with input as _in(\"agents\", \"GET\")\n\td.allow == true\n}\n";

fn managed_fields(manager: &str) -> Value {
    json!([
        {"manager": "older-tool", "operation": "Update", "apiVersion": "cellgate.dev/v1alpha1",
         "time": "2029-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}},
        {"manager": manager, "operation": "Apply", "apiVersion": "cellgate.dev/v1alpha1",
         "time": "2029-06-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:modules": {}}}},
        {"manager": "cellgate-operator", "operation": "Apply", "apiVersion": "cellgate.dev/v1alpha1",
         "time": "2029-07-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}},
         "subresource": "status"}
    ])
}

fn namespaced(spec: &PackSpec, generation: i64, status: Value) -> CellgatePolicyResource {
    serde_json::from_value(json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgatePolicy",
        "metadata": {"name": "nodel", "namespace": "agents", "generation": generation,
            "finalizers": ["cellgate.dev/policy-snapshots"], "managedFields": managed_fields("kubectl")},
        "spec": spec, "status": status,
    }))
    .expect("policy")
}

fn nodel_ref() -> PolicyRef {
    PolicyRef {
        namespace: Some("agents".into()),
        name: "nodel".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_pack_is_accepted_with_a_snapshot_and_a_history_entry() {
    let spec = nodel_spec(NODEL);
    let hash = content_hash(&spec);
    let snap = nodel_ref().snapshot_name(&hash);
    assert_eq!(snap, format!("cellgate-policy.agents.nodel-{hash}"));
    let obj = namespaced(&spec, 1, json!(null));
    let obj_json = serde_json::to_value(&obj).expect("obj");
    let cm = serde_json::to_value(snapshot_configmap(
        &nodel_ref(),
        "cellgate-system",
        &hash,
        &spec,
    ))
    .expect("cm");
    let mut calls = lookups(vec![], vec![serde_json::to_value(&obj).expect("obj")]);
    let cm_check = cm.clone();
    calls.push(apply(
        &format!("{CMS}/{snap}"),
        Expect::Check(Box::new(move |got| {
            assert_eq!(
                got["metadata"]["labels"]["cellgate.dev/policy-namespace"],
                "agents"
            );
            assert_eq!(got["immutable"], true);
            assert_eq!(got["data"], cm_check["data"]);
            let kept: PackSpec =
                serde_json::from_str(got["data"]["spec.json"].as_str().expect("spec.json"))
                    .expect("spec");
            assert_eq!(content_hash(&kept), content_hash(&nodel_spec(NODEL)));
        })),
        cm,
    ));
    let want_status = json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgatePolicy",
        "status": {
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "", "lastTransitionTime": "2030-01-01T00:00:00Z", "observedGeneration": 1}],
            "observedGeneration": 1, "version": 1, "hash": hash, "mode": "enforce", "snapshot": snap,
            "history": [{"version": 1, "hash": hash, "time": "2030-01-01T00:00:00Z",
                "fieldManager": "kubectl", "generation": 1, "snapshot": snap}]
        }
    });
    calls.push(apply(
        &status_path(),
        Expect::Check(Box::new(move |got| {
            let mut got = got.clone();
            let msg = got["status"]["conditions"][0]["message"].take();
            let msg = msg.as_str().expect("message");
            assert!(
                msg.starts_with(&format!(
                    "version 1 ({}) in force; ",
                    want_status["status"]["hash"].as_str().unwrap_or("")
                )),
                "{msg}"
            );
            assert!(msg.ends_with("tests passed"), "{msg}");
            got["status"]["conditions"][0]["message"] = json!("");
            assert_eq!(got, want_status);
        })),
        obj_json,
    ));
    let action = run(calls, |ctx| reconcile_namespaced(Arc::new(obj), ctx)).await;
    assert_eq!(action, Action::await_change());
}

fn accepted_status(spec: &PackSpec, history: &[(u64, &str)]) -> Value {
    let hash = content_hash(spec);
    let snap = nodel_ref().snapshot_name(&hash);
    let last = history.last().map_or(1, |h| h.0);
    json!({
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
            "message": format!("version {last} ({hash}) in force; 9 tests passed"),
            "lastTransitionTime": "2029-12-01T00:00:00Z", "observedGeneration": 1}],
        "observedGeneration": 1, "version": last, "hash": hash, "mode": "enforce", "snapshot": snap,
        "history": history.iter().map(|(v, h)| json!({"version": v, "hash": h, "time": "2029-12-01T00:00:00Z",
            "fieldManager": "kubectl", "generation": v, "snapshot": nodel_ref().snapshot_name(h)})).collect::<Vec<_>>(),
    })
}

fn status_path() -> String {
    "/apis/cellgate.dev/v1alpha1/namespaces/agents/cellgatepolicies/nodel/status".into()
}

/// A refused edit: only the Accepted condition changes (to False, with `file:line`), and the
/// version in force stays.
async fn refused(source: &str, tests: Option<&str>, reason: &'static str, location: &'static str) {
    let good = nodel_spec(NODEL);
    let good_hash = content_hash(&good);
    let status = accepted_status(&good, &[(1, &good_hash)]);
    let mut bad = nodel_spec(source);
    if let Some(t) = tests {
        bad.tests.insert("nodel_test.rego".into(), t.into());
    }
    let obj = namespaced(&bad, 2, status.clone());
    let obj_json = serde_json::to_value(&obj).expect("obj");
    let mut calls = lookups(vec![], vec![serde_json::to_value(&obj).expect("obj")]);
    calls.push(apply(
        &status_path(),
        Expect::Check(Box::new(move |got| {
            let st = &got["status"];
            // What is in force is untouched.
            for k in ["version", "hash", "snapshot", "history", "mode"] {
                assert_eq!(st[k], status[k], "{k}");
            }
            assert_eq!(st["observedGeneration"], 2);
            let c = &st["conditions"][0];
            assert_eq!(c["type"], "Accepted");
            assert_eq!(c["status"], "False");
            assert_eq!(c["reason"], reason);
            assert_eq!(c["lastTransitionTime"], "2030-01-01T00:00:00Z");
            let msg = c["message"].as_str().expect("message");
            assert!(msg.starts_with(location), "{msg}");
            assert!(
                msg.ends_with(&format!("; version 1 ({good_hash}) stays in force")),
                "{msg}"
            );
        })),
        obj_json,
    ));
    let action = run(calls, |ctx| reconcile_namespaced(Arc::new(obj), ctx)).await;
    assert_eq!(action, Action::requeue(REFUSED_REQUEUE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_pack_is_refused_with_file_and_line_and_the_previous_version_stays() {
    refused(
        "package cellgate.layers.nodel\n\nimport rego.v1\n\ndeny contains \"x\" if {\n",
        None,
        "ParseError",
        "agents.nodel/nodel.rego:",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_whose_tests_fail_is_refused() {
    // The pack denies GET too: its own test_get_allowed (line 21 of the test file) fails.
    refused(
        &NODEL.replace(
            "input.request.method == \"DELETE\"",
            "input.request.method != \"\"",
        ),
        None,
        "TestFailed",
        "agents.nodel/nodel_test.rego:21: test test_get_allowed failed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_pack_may_not_declare_the_base_package() {
    refused(
        "package cellgate.authz\n\nimport rego.v1\n\ndecision := {}\n",
        None,
        "InvalidSpec",
        "agents.nodel/nodel.rego:1: package cellgate.authz is not allowed here",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_pruned_to_the_limit_and_unnamed_snapshots_deleted() {
    let mut spec = nodel_spec(NODEL);
    spec.history_limit = Some(3);
    let hash = content_hash(&spec);
    let snap = nodel_ref().snapshot_name(&hash);
    let old = [
        (1, "aaaaaaaaaaa1"),
        (2, "aaaaaaaaaaa2"),
        (3, "aaaaaaaaaaa3"),
    ];
    let mut status = accepted_status(&nodel_spec(NODEL), &old);
    status["hash"] = json!("aaaaaaaaaaa3");
    status["snapshot"] = json!(nodel_ref().snapshot_name("aaaaaaaaaaa3"));
    let obj = namespaced(&spec, 4, status);
    let obj_json = serde_json::to_value(&obj).expect("obj");
    let cm = serde_json::to_value(snapshot_configmap(
        &nodel_ref(),
        "cellgate-system",
        &hash,
        &spec,
    ))
    .expect("cm");
    let mut calls = lookups(vec![], vec![]);
    calls.push(apply(
        &format!("{CMS}/{snap}"),
        Expect::Check(Box::new(|_| {})),
        cm,
    ));
    calls.push(delete(&format!(
        "{CMS}/{}",
        nodel_ref().snapshot_name("aaaaaaaaaaa1")
    )));
    let hash2 = hash.clone();
    calls.push(apply(
        &status_path(),
        Expect::Check(Box::new(move |got| {
            let h = got["status"]["history"].as_array().expect("history");
            let versions: Vec<u64> = h.iter().filter_map(|e| e["version"].as_u64()).collect();
            assert_eq!(versions, [2, 3, 4]);
            assert_eq!(h[2]["hash"], hash2.as_str());
            assert_eq!(h[2]["fieldManager"], "kubectl");
            assert_eq!(h[2]["generation"], 4);
            assert_eq!(got["status"]["version"], 4);
        })),
        obj_json,
    ));
    run(calls, |ctx| reconcile_namespaced(Arc::new(obj), ctx)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_in_force_is_not_validated_again() {
    let spec = nodel_spec(NODEL);
    let hash = content_hash(&spec);
    let obj = namespaced(&spec, 1, accepted_status(&spec, &[(1, &hash)]));
    // No call at all: same hash, same generation, nothing to write.
    let action = run(vec![], |ctx| reconcile_namespaced(Arc::new(obj), ctx)).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_base_is_accepted_on_its_own() {
    let spec = base_spec();
    let hash = content_hash(&spec);
    let obj: CellgateClusterPolicyResource = serde_json::from_value(json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgateClusterPolicy",
        "metadata": {"name": "base", "generation": 1, "finalizers": ["cellgate.dev/policy-snapshots"],
            "managedFields": managed_fields("helm")},
        "spec": spec,
    }))
    .expect("obj");
    let obj_json = serde_json::to_value(&obj).expect("obj");
    let snap = base_ref().snapshot_name(&hash);
    let cm = serde_json::to_value(snapshot_configmap(
        &base_ref(),
        "cellgate-system",
        &hash,
        &base_spec(),
    ))
    .expect("cm");
    let calls = vec![
        get(
            &format!("{CP}?"),
            list(
                "CellgateClusterPolicy",
                vec![serde_json::to_value(&obj).expect("o")],
            ),
        ),
        get(&format!("{NP}?"), list("CellgatePolicy", vec![])),
        apply(&format!("{CMS}/{snap}"), Expect::Json(cm.clone()), cm),
        apply(
            &format!("{CP}/base/status"),
            Expect::Check(Box::new(|got| {
                assert_eq!(got["kind"], "CellgateClusterPolicy");
                assert_eq!(got["status"]["conditions"][0]["status"], "True");
                assert_eq!(got["status"]["history"][0]["fieldManager"], "helm");
            })),
            obj_json,
        ),
    ];
    run(calls, |ctx| reconcile_cluster(Arc::new(obj), ctx)).await;
}
