//! `kubectl cellgate policy history|rollback|promote` against kube-rs's mocked API service: each
//! scenario scripts the API server's answers and asserts every call (method, URI, body).

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use cellgate_api::policy::IdentityDoc;
use cellgate_api::policy_pack::{content_hash, PackSpec, PolicyRef};
use cellgate_audit::{Decision, Record};
use cellgate_cli::kubectl_policy::{self, AuditSource};
use cellgate_node::recorded::{fill_record, Request};
use http::{Method, Request as HttpRequest, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<HttpRequest<Body>, Response<Body>>;

/// One expected call and the answer to give (a JSON string answer is sent as raw text).
struct Call {
    method: Method,
    uri: String,
    body: Option<Value>,
    header: Option<(&'static str, &'static str)>,
    answer: Value,
}

fn call(method: Method, uri: &str, body: Option<Value>, answer: Value) -> Call {
    Call {
        method,
        uri: uri.into(),
        body,
        header: None,
        answer,
    }
}

/// Serves the scripted calls in order, asserting each; a call the script does not expect fails
/// the test (the client sees the handle dropped), as does a script left unfinished.
async fn serve(mut handle: Handle, script: Vec<Call>) -> usize {
    let mut served = 0;
    for expected in script {
        let (request, send) = handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("missing call: {} {}", expected.method, expected.uri));
        assert_eq!(request.method(), expected.method, "call {served}");
        assert_eq!(request.uri().to_string(), expected.uri, "call {served}");
        if let Some((k, v)) = expected.header {
            assert_eq!(
                request.headers().get(k).and_then(|h| h.to_str().ok()),
                Some(v),
                "header {k} of call {served}"
            );
        }
        let bytes = request.into_body().collect_bytes().await.expect("body");
        if let Some(want) = &expected.body {
            let got: Value = serde_json::from_slice(&bytes).expect("json body");
            assert_eq!(&got, want, "body of call {served} ({})", expected.uri);
        }
        let answer = match &expected.answer {
            Value::String(s) => s.clone().into_bytes(),
            v => serde_json::to_vec(v).expect("json"),
        };
        send.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from(answer))
                .expect("response"),
        );
        served += 1;
    }
    // Nothing more may be asked.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), handle.next_request())
            .await
            .map_or(true, |r| r.is_none()),
        "an unexpected call after the script"
    );
    served
}

fn client() -> (kube::Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<HttpRequest<Body>, Response<Body>>();
    (kube::Client::new(svc, "agents"), handle)
}

const CNS: &str = "cellgate-system";
const NS_POLICY_URI: &str = "/apis/cellgate.dev/v1alpha1/namespaces/agents/cellgatepolicies/nodel";

fn nodel() -> PolicyRef {
    PolicyRef {
        namespace: Some("agents".into()),
        name: "nodel".into(),
    }
}

fn spec(modules: &[(&str, &str)], mode: Option<&str>) -> PackSpec {
    let mut v = json!({"modules": modules.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()});
    if let Some(m) = mode {
        v["mode"] = json!(m);
    }
    serde_json::from_value(v).expect("spec")
}

const NODEL_V1: &str = "package cellgate.layers.nodel\nimport rego.v1\ndeny contains \"no deletes\" if input.request.method == \"DELETE\"\n";
const NODEL_V2: &str = "package cellgate.layers.nodel\nimport rego.v1\ndeny contains \"no deletes\" if input.request.method in {\"DELETE\", \"PUT\"}\n";

fn entry(version: u64, s: &PackSpec, manager: &str, generation: i64) -> Value {
    let hash = content_hash(s);
    json!({"version": version, "hash": hash, "time": format!("2030-01-0{version}T00:00:00Z"),
        "fieldManager": manager, "generation": generation,
        "snapshot": nodel().snapshot_name(&hash)})
}

/// The namespaced policy `agents/nodel`: `spec` now, version `in_force` of `history`.
fn policy(
    spec_now: &PackSpec,
    generation: i64,
    history: &[(u64, &PackSpec, &str, i64)],
    in_force: u64,
    accepted: bool,
) -> Value {
    let (v, s, _, _) = history
        .iter()
        .find(|h| h.0 == in_force)
        .expect("in force in history");
    let hash = content_hash(s);
    json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgatePolicy",
        "metadata": {"name": "nodel", "namespace": "agents", "generation": generation,
                     "resourceVersion": "77"},
        "spec": spec_now,
        "status": {
            "conditions": [{"type": "Accepted", "status": if accepted {"True"} else {"False"},
                "reason": if accepted {"Accepted"} else {"ParseError"},
                "message": if accepted {"in force".to_string()} else {"agents.nodel/nodel.rego:3: unexpected token; version 2 stays in force".to_string()},
                "observedGeneration": generation}],
            "observedGeneration": generation,
            "version": v, "hash": hash,
            "mode": s.mode.unwrap_or_default(),
            "snapshot": nodel().snapshot_name(&hash),
            "history": history.iter().map(|(v, s, m, g)| entry(*v, s, m, *g)).collect::<Vec<_>>(),
        },
    })
}

fn snapshot_cm(name: &str, s: &PackSpec) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": CNS},
        "data": {"spec.json": serde_json::to_string(s).expect("json")},
        "immutable": true})
}

#[tokio::test]
async fn history_marks_the_version_in_force_and_says_a_refused_edit() {
    let v1 = spec(&[("nodel.rego", NODEL_V1)], Some("shadow"));
    let v2 = spec(&[("nodel.rego", NODEL_V2)], Some("shadow"));
    let bad = spec(
        &[("nodel.rego", "package cellgate.layers.nodel\ndeny contains")],
        None,
    );
    let (client, handle) = client();
    let server = tokio::spawn(serve(
        handle,
        vec![call(
            Method::GET,
            NS_POLICY_URI,
            None,
            policy(
                &bad,
                5,
                &[
                    (1, &v1, "kubectl-client-side-apply", 1),
                    (2, &v2, "helm", 3),
                ],
                2,
                false,
            ),
        )],
    ));
    let text = kubectl_policy::history_text(client, &nodel())
        .await
        .expect("history");
    assert_eq!(server.await.expect("server"), 1);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "CellgatePolicy agents/nodel (generation 5, mode shadow)"
    );
    assert!(lines[1].starts_with("VERSION") && lines[1].contains("FIELD-MANAGER"));
    assert!(lines[2].starts_with("1 ") && lines[2].contains("kubectl-client-side-apply"));
    assert!(!lines[2].ends_with('*'), "{text}");
    assert!(lines[3].starts_with("2 ") && lines[3].contains(&content_hash(&v2)));
    assert!(
        lines[3].contains("helm") && lines[3].ends_with('*'),
        "{text}"
    );
    assert!(
        lines[4].starts_with("generation 5 is refused (ParseError): agents.nodel/nodel.rego:3"),
        "{text}"
    );
}

#[tokio::test]
async fn rollback_applies_the_snapshot_of_the_version_with_the_kubectl_field_manager() {
    let v1 = spec(&[("nodel.rego", NODEL_V1)], None);
    let v2 = spec(
        &[
            ("nodel.rego", NODEL_V2),
            ("extra.rego", "package cellgate.layers.extra\n"),
        ],
        Some("shadow"),
    );
    let snap1 = nodel().snapshot_name(&content_hash(&v1));
    let mut applied = serde_json::to_value(&v1).expect("json");
    applied["mode"] = json!("enforce");
    let (client, handle) = client();
    let server = tokio::spawn(serve(
        handle,
        vec![
            call(
                Method::GET,
                NS_POLICY_URI,
                None,
                policy(
                    &v2,
                    4,
                    &[
                        (1, &v1, "kubectl-client-side-apply", 1),
                        (2, &v2, "helm", 4),
                    ],
                    2,
                    true,
                ),
            ),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/configmaps/{snap1}"),
                None,
                snapshot_cm(&snap1, &v1),
            ),
            call(
                Method::PATCH,
                &format!("{NS_POLICY_URI}?&force=true&fieldManager=kubectl-cellgate"),
                Some(json!({
                    "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgatePolicy",
                    "metadata": {"name": "nodel", "namespace": "agents"},
                    "spec": {"modules": {"nodel.rego": NODEL_V1}, "tests": {}, "roles": [],
                             "mode": "enforce"},
                })),
                policy(
                    &v1,
                    5,
                    &[
                        (1, &v1, "kubectl-client-side-apply", 1),
                        (2, &v2, "helm", 4),
                    ],
                    2,
                    true,
                ),
            ),
        ],
    ));
    let r = kubectl_policy::rollback(client, &nodel(), CNS, 1)
        .await
        .expect("rollback");
    assert_eq!(server.await.expect("server"), 3);
    assert_eq!(r.version, 1);
    assert_eq!(r.hash, content_hash(&v1));
    assert_eq!(r.generation, 5);
    assert!(!r.replaced);
}

#[tokio::test]
async fn rollback_replaces_the_spec_when_another_manager_kept_a_module() {
    let v1 = spec(&[("nodel.rego", NODEL_V1)], None);
    let v2 = spec(
        &[
            ("nodel.rego", NODEL_V2),
            ("extra.rego", "package cellgate.layers.extra\n"),
        ],
        None,
    );
    // What an API server answers when `extra.rego` belongs to another field manager.
    let merged = spec(
        &[
            ("nodel.rego", NODEL_V1),
            ("extra.rego", "package cellgate.layers.extra\n"),
        ],
        None,
    );
    let snap1 = nodel().snapshot_name(&content_hash(&v1));
    let hist: &[(u64, &PackSpec, &str, i64)] = &[(1, &v1, "a", 1), (2, &v2, "b", 4)];
    let (client, handle) = client();
    let server = tokio::spawn(serve(
        handle,
        vec![
            call(
                Method::GET,
                NS_POLICY_URI,
                None,
                policy(&v2, 4, hist, 2, true),
            ),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/configmaps/{snap1}"),
                None,
                snapshot_cm(&snap1, &v1),
            ),
            call(
                Method::PATCH,
                &format!("{NS_POLICY_URI}?&force=true&fieldManager=kubectl-cellgate"),
                None,
                policy(&merged, 5, hist, 2, true),
            ),
            call(
                Method::PATCH,
                &format!("{NS_POLICY_URI}?&fieldManager=kubectl-cellgate"),
                Some(json!([
                    {"op": "test", "path": "/metadata/generation", "value": 5},
                    {"op": "replace", "path": "/spec", "value":
                        {"modules": {"nodel.rego": NODEL_V1}, "tests": {}, "roles": [], "mode": "enforce"}},
                ])),
                policy(&v1, 6, hist, 2, true),
            ),
        ],
    ));
    let r = kubectl_policy::rollback(client, &nodel(), CNS, 1)
        .await
        .expect("rollback");
    assert_eq!(server.await.expect("server"), 4);
    assert!(r.replaced);
    assert_eq!(r.generation, 6);
}

#[tokio::test]
async fn rollback_refuses_a_version_not_in_history_or_a_snapshot_that_does_not_match() {
    let v1 = spec(&[("nodel.rego", NODEL_V1)], None);
    let v2 = spec(&[("nodel.rego", NODEL_V2)], None);
    let hist: &[(u64, &PackSpec, &str, i64)] = &[(1, &v1, "a", 1), (2, &v2, "b", 2)];
    let (client, handle) = client();
    let server = tokio::spawn(serve(
        handle,
        vec![call(
            Method::GET,
            NS_POLICY_URI,
            None,
            policy(&v2, 2, hist, 2, true),
        )],
    ));
    let err = kubectl_policy::rollback(client, &nodel(), CNS, 7)
        .await
        .expect_err("not in history");
    assert_eq!(server.await.expect("server"), 1);
    assert_eq!(
        err.to_string(),
        "CellgatePolicy agents/nodel has no version 7 in its history (kept: 1, 2)"
    );

    // The snapshot named by version 1 holds other content: nothing is written.
    let snap1 = nodel().snapshot_name(&content_hash(&v1));
    let (client, handle) = self::client();
    let server = tokio::spawn(serve(
        handle,
        vec![
            call(
                Method::GET,
                NS_POLICY_URI,
                None,
                policy(&v2, 2, hist, 2, true),
            ),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/configmaps/{snap1}"),
                None,
                snapshot_cm(&snap1, &v2),
            ),
        ],
    ));
    let err = kubectl_policy::rollback(client, &nodel(), CNS, 1)
        .await
        .expect_err("mismatch");
    assert_eq!(server.await.expect("server"), 2);
    assert!(err.to_string().contains("refusing to use it"), "{err}");
}

/// A request of cell `agents/researcher` as the node records it.
fn rec(method: &str, decision: Decision, reason: &str) -> String {
    let mut r = Record::new("node-a", "intake", "https", decision, reason);
    r.cell = Some("researcher".into());
    r.namespace = Some("agents".into());
    r.token_id = Some("jti-1".into());
    r.source = Some("10.0.0.7:40000".into());
    r.destination = Some("203.0.113.10:443".into());
    r.method = Some(method.into());
    r.host = Some("docs.example.com".into());
    r.path = Some("/v1/a".into());
    r.policy_version = Some("0123456789ab".into());
    r.capability = Some("docs".into());
    let req = Request {
        time_ns: 0,
        front_door: "intake".into(),
        source: r.source.as_deref().map(|s| s.parse().expect("addr")),
        destination: r.destination.as_deref().map(|s| s.parse().expect("addr")),
        identity: IdentityDoc {
            jti: "jti-1".into(),
            cell_uid: "u-1".into(),
            namespace: "agents".into(),
            name: "researcher".into(),
            role: Some("reader".into()),
        },
        protocol: "https".into(),
        host: Some("docs.example.com".into()),
        port: 443,
        sni: Some("docs.example.com".into()),
        method: Some(method.into()),
        path: Some("/v1/a".into()),
        query: None,
        headers: BTreeMap::from([("accept".into(), "*/*".into())]),
        dns_type: None,
    };
    fill_record(&mut r, &req, Some(1), None, false, false);
    serde_json::to_string(&r).expect("json")
}

#[tokio::test]
async fn promote_replays_the_recent_audit_with_the_pack_enforcing_then_sets_the_mode() {
    let shadow = spec(&[("nodel.rego", NODEL_V1)], Some("shadow"));
    let base = spec(
        &[(
            "cellgate.rego",
            include_str!("../../../policies/base/cellgate.rego"),
        )],
        None,
    );
    let base_ref = PolicyRef {
        namespace: None,
        name: "base".into(),
    };
    let base_snap = base_ref.snapshot_name(&content_hash(&base));
    let own_snap = nodel().snapshot_name(&content_hash(&shadow));
    let hist: &[(u64, &PackSpec, &str, i64)] = &[(1, &shadow, "helm", 3)];
    let now_policy = policy(&shadow, 3, hist, 1, true);
    let cell = json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
        "metadata": {"name": "researcher", "namespace": "agents", "uid": "u-1", "generation": 1},
        "spec": {"role": "reader", "capabilities": [{"name": "docs",
            "destinations": [{"host": "docs.example.com", "ports": [443]}],
            "http": {"methods": ["GET", "DELETE"], "paths": ["/v1/**"]}}]},
    });
    let audit = format!(
        "{}\n{}\n{}\n",
        rec("GET", Decision::Allow, "allowed"),
        rec("DELETE", Decision::ShadowDeny, "policy_denied"),
        rec("DELETE", Decision::ShadowDeny, "policy_denied"),
    );
    let since = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let (client, handle) = client();
    let server = tokio::spawn(serve(
        handle,
        vec![
            call(Method::GET, NS_POLICY_URI, None, now_policy.clone()),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/configmaps/{own_snap}"),
                None,
                snapshot_cm(&own_snap, &shadow),
            ),
            call(
                Method::GET,
                "/apis/cellgate.dev/v1alpha1/cellgateclusterpolicies?",
                None,
                json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgateClusterPolicyList",
                    "metadata": {}, "items": [{
                        "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgateClusterPolicy",
                        "metadata": {"name": "base"}, "spec": base,
                        "status": {"snapshot": base_snap, "hash": content_hash(&base), "version": 1}}]}),
            ),
            call(
                Method::GET,
                "/apis/cellgate.dev/v1alpha1/cellgatepolicies?",
                None,
                json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgatePolicyList",
                    "metadata": {}, "items": [now_policy]}),
            ),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/configmaps/{base_snap}"),
                None,
                snapshot_cm(&base_snap, &base),
            ),
            call(
                Method::GET,
                "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells?",
                None,
                json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCellList",
                    "metadata": {}, "items": [cell]}),
            ),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/pods?&labelSelector=app.kubernetes.io%2Fname%3Dcellgate%2Capp.kubernetes.io%2Fcomponent%3Dnode"),
                None,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                    "items": [{"metadata": {"name": "cellgate-node-x1", "namespace": CNS}}]}),
            ),
            call(
                Method::GET,
                &format!("/api/v1/namespaces/{CNS}/secrets/cellgate-admin-token"),
                None,
                json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "cellgate-admin-token"},
                    "data": {"token": "c2VjcmV0LTE="}}),
            ),
            Call {
                header: Some((cellgate_api::crd::ADMIN_TOKEN_HEADER, "secret-1")),
                ..call(
                    Method::GET,
                    &format!("/api/v1/namespaces/{CNS}/pods/cellgate-node-x1:15021/proxy/audit?namespace=agents&since=2030-03-17T17%3A46%3A40Z&limit=500"),
                    None,
                    json!(audit),
                )
            },
        ],
    ));
    let plan = kubectl_policy::promote_plan(
        client.clone(),
        &nodel(),
        CNS,
        AuditSource::Nodes,
        since,
        500,
    )
    .await
    .expect("plan");
    assert_eq!(server.await.expect("server"), 9);
    let r = &plan.report;
    assert_eq!(r.records, 3, "{}", plan.text);
    assert_eq!(r.redecided, 3, "{}", plan.text);
    assert_eq!(r.new_denials, 2, "{}", plan.text);
    assert_eq!(r.would.get("deny"), Some(&2), "{}", plan.text);
    assert_eq!(r.would.get("allow"), Some(&1), "{}", plan.text);
    assert!(
        plan.text.starts_with("replay of 3 records since 2030-03-17T17:46:40Z from 1 node(s), with CellgatePolicy agents/nodel in enforce mode"),
        "{}",
        plan.text
    );
    assert!(plan.text.contains("2 new denials"), "{}", plan.text);

    // Then the switch, guarded by the generation replayed.
    let (client, handle) = self::client();
    let mut enforced = shadow.clone();
    enforced.mode = None;
    let server = tokio::spawn(serve(
        handle,
        vec![call(
            Method::PATCH,
            &format!("{NS_POLICY_URI}?&fieldManager=kubectl-cellgate"),
            Some(json!([
                {"op": "test", "path": "/metadata/generation", "value": 3},
                {"op": "add", "path": "/spec/mode", "value": "enforce"},
            ])),
            policy(&enforced, 4, hist, 1, true),
        )],
    ));
    let generation = kubectl_policy::set_enforce(client, &plan)
        .await
        .expect("switch");
    assert_eq!(server.await.expect("server"), 1);
    assert_eq!(generation, 4);
}

#[tokio::test]
async fn promote_refuses_a_pack_whose_spec_is_not_the_version_in_force() {
    let shadow = spec(&[("nodel.rego", NODEL_V1)], Some("shadow"));
    let edited = spec(&[("nodel.rego", NODEL_V2)], Some("shadow"));
    let hist: &[(u64, &PackSpec, &str, i64)] = &[(1, &shadow, "helm", 3)];
    let (client, handle) = client();
    let server = tokio::spawn(serve(
        handle,
        vec![call(
            Method::GET,
            NS_POLICY_URI,
            None,
            policy(&edited, 4, hist, 1, false),
        )],
    ));
    let err =
        kubectl_policy::promote_plan(client, &nodel(), CNS, AuditSource::Nodes, UNIX_EPOCH, 10)
            .await
            .expect_err("refused edit");
    assert_eq!(server.await.expect("server"), 1);
    assert!(
        err.to_string().contains("is not the version in force"),
        "{err}"
    );
}

#[test]
fn policy_commands_take_a_namespace_or_cluster_not_both() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["policy", "promote", "nodel", "--cluster", "-n", "x"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
}
