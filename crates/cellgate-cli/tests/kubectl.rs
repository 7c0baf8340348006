//! `kubectl cellgate` against kube-rs's mocked API service: each scenario scripts the API server's
//! answers and asserts every call the plugin makes (method, URI with its query, body).

use std::time::Duration;

use cellgate_cli::kubectl;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected call and the answer to give.
struct Call {
    method: Method,
    uri: String,
    body: Option<Value>,
    status: StatusCode,
    answer: Value,
}

fn call(method: Method, uri: &str, body: Option<Value>, answer: Value) -> Call {
    Call {
        method,
        uri: uri.into(),
        body,
        status: StatusCode::OK,
        answer,
    }
}

/// Serves the scripted calls in order, asserting each; returns the number served. A call the
/// script does not expect fails the test, as does a script left unfinished.
async fn serve(mut handle: Handle, script: Vec<Call>) -> usize {
    serve_on(&mut handle, script).await
}

async fn serve_on(handle: &mut Handle, script: Vec<Call>) -> usize {
    let mut served = 0;
    for expected in script {
        let (request, send) = handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("missing call: {} {}", expected.method, expected.uri));
        assert_eq!(request.method(), expected.method, "call {served}");
        assert_eq!(request.uri().to_string(), expected.uri, "call {served}");
        let bytes = request.into_body().collect_bytes().await.expect("body");
        if let Some(want) = &expected.body {
            let got: Value = serde_json::from_slice(&bytes).expect("json body");
            assert_eq!(&got, want, "body of call {served} ({})", expected.uri);
        }
        let answer = serde_json::to_vec(&expected.answer).expect("json");
        send.send_response(
            Response::builder()
                .status(expected.status)
                .header("content-type", "application/json")
                .body(Body::from(answer))
                .expect("response"),
        );
        served += 1;
    }
    served
}

fn client() -> (kube::Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "agents"), handle)
}

const CELL_URI: &str = "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells/triage";

fn cell(generation: i64, caps: &[&str], suspended: bool, enforced: Option<i64>) -> Value {
    let capabilities: Vec<Value> = caps
        .iter()
        .map(|c| json!({"name": c, "destinations": [{"host": format!("{c}.example.com"), "ports": [443]}]}))
        .collect();
    let mut status = json!({
        "phase": if suspended { "Suspended" } else { "Running" },
        "capabilities": caps.len(),
        "tokenId": "jti-1", "tokenExpiry": "2026-11-21T12:00:00Z",
        "node": "node-a", "podIP": "10.1.2.3",
        "conditions": [
            {"type": "TokenIssued", "status": "True", "reason": "TokenValid", "message": ""},
            {"type": "PodReady", "status": "True", "reason": "PodRunning", "message": ""},
            {"type": "Enforced", "status": if enforced == Some(generation) {"True"} else {"False"},
             "reason": "NodeReported", "message": ""}
        ]
    });
    if let Some(g) = enforced {
        status["enforcement"] =
            json!({"node": "node-a", "observedGeneration": g, "time": "2026-11-21T10:00:00.123Z"});
    }
    json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
        "metadata": {"name": "triage", "namespace": "agents", "uid": "u-1", "generation": generation},
        "spec": {"suspended": suspended, "capabilities": capabilities},
        "status": status,
    })
}

#[tokio::test]
async fn revoke_tests_then_removes_the_capability_and_waits_for_the_node() {
    let (client, handle) = client();
    let script = vec![
        call(
            Method::GET,
            CELL_URI,
            None,
            cell(4, &["github", "slack"], false, Some(4)),
        ),
        call(
            Method::PATCH,
            &format!("{CELL_URI}?&fieldManager=kubectl-cellgate"),
            Some(json!([
                {"op": "test", "path": "/spec/capabilities/1/name", "value": "slack"},
                {"op": "remove", "path": "/spec/capabilities/1"}
            ])),
            cell(5, &["github"], false, Some(4)),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    let generation = kubectl::revoke_capability(client.clone(), "agents", "triage", "slack")
        .await
        .expect("revoke");
    assert_eq!(generation, 5);
    assert_eq!(server.await.expect("server"), 2);

    // The node has not caught up on the first read, then reports generation 5.
    let (client, handle) = self::client();
    let script = vec![
        call(
            Method::GET,
            CELL_URI,
            None,
            cell(5, &["github"], false, Some(4)),
        ),
        call(
            Method::GET,
            CELL_URI,
            None,
            cell(5, &["github"], false, Some(5)),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    let outcome = kubectl::wait_enforced(
        client,
        "agents",
        "triage",
        5,
        Duration::from_secs(5),
        Duration::from_millis(10),
    )
    .await
    .expect("wait");
    match outcome {
        kubectl::Enforced::Yes { node, .. } => assert_eq!(node, "node-a"),
        other => panic!("expected enforced, got {other:?}"),
    }
    assert_eq!(server.await.expect("server"), 2);
}

#[tokio::test]
async fn revoke_of_a_missing_capability_names_the_ones_there_are_and_edits_nothing() {
    let (client, handle) = client();
    let script = vec![call(
        Method::GET,
        CELL_URI,
        None,
        cell(4, &["github", "slack"], false, Some(4)),
    )];
    let server = tokio::spawn(serve(handle, script));
    let err = kubectl::revoke_capability(client, "agents", "triage", "jira")
        .await
        .expect_err("no such capability");
    let msg = err.to_string();
    assert!(msg.contains("no capability \"jira\""), "{msg}");
    assert!(msg.contains("github, slack"), "{msg}");
    // Exactly one call (the GET): no PATCH was sent. The mock's handle is dropped with the
    // server task, so an extra call would have failed the client instead.
    assert_eq!(server.await.expect("server"), 1);
}

#[tokio::test]
async fn revoke_of_a_missing_cell_says_so() {
    let (client, handle) = client();
    let mut not_found = call(
        Method::GET,
        CELL_URI,
        None,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
               "code": 404, "message": "agentcells.cellgate.dev \"triage\" not found"}),
    );
    not_found.status = StatusCode::NOT_FOUND;
    let server = tokio::spawn(serve(handle, vec![not_found]));
    let err = kubectl::revoke_capability(client, "agents", "triage", "slack")
        .await
        .expect_err("missing");
    assert_eq!(err.to_string(), "agentcell agents/triage not found");
    server.await.expect("server");
}

#[tokio::test]
async fn suspend_and_resume_merge_patch_spec_suspended() {
    for suspended in [true, false] {
        let (client, handle) = client();
        let script = vec![call(
            Method::PATCH,
            &format!("{CELL_URI}?&fieldManager=kubectl-cellgate"),
            Some(json!({"spec": {"suspended": suspended}})),
            cell(7, &["github"], suspended, Some(6)),
        )];
        let server = tokio::spawn(serve(handle, script));
        let generation = kubectl::set_suspended(client, "agents", "triage", suspended)
            .await
            .expect("patch");
        assert_eq!(generation, 7);
        assert_eq!(server.await.expect("server"), 1);
    }
}

#[tokio::test]
async fn wait_reports_a_timeout_with_what_the_status_said() {
    let (client, handle) = client();
    // Whatever the number of polls, the node stays at generation 4.
    let script: Vec<Call> = (0..50)
        .map(|_| {
            call(
                Method::GET,
                CELL_URI,
                None,
                cell(5, &["github"], false, Some(4)),
            )
        })
        .collect();
    let server = tokio::spawn(async move {
        // The client stops polling at the timeout; the rest of the script is never asked for.
        let _ = tokio::time::timeout(Duration::from_secs(3), serve(handle, script)).await;
    });
    let outcome = kubectl::wait_enforced(
        client,
        "agents",
        "triage",
        5,
        Duration::from_millis(200),
        Duration::from_millis(50),
    )
    .await
    .expect("wait");
    match outcome {
        kubectl::Enforced::TimedOut { last } => {
            assert_eq!(last, "node node-a still reports generation 4 (want 5)")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    server.abort();
}

#[tokio::test]
async fn status_lists_cells_and_shows_one_in_detail() {
    let (client, handle) = client();
    let list = json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCellList", "metadata": {},
        "items": [cell(3, &["github", "slack"], false, Some(3))]
    });
    let script = vec![
        call(
            Method::GET,
            "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentcells?",
            None,
            list,
        ),
        call(Method::GET, CELL_URI, None, {
            let mut c = cell(3, &["github"], true, Some(2));
            c["status"]["usage"] = json!({"node": "node-a", "time": "2026-11-21T10:00:05Z",
                "summary": "cell requests 120/10000; github requestsPerWindow 3/60",
                "budgets": [{"scope": "cell", "requests": 120}]});
            c
        }),
    ];
    let server = tokio::spawn(serve(handle, script));
    let table = kubectl::status_table(client.clone(), Some("agents"))
        .await
        .expect("table");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("NAMESPACE"), "{table}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "agents",
            "triage",
            "Running",
            "2",
            "false",
            "True",
            "2026-11-21T12:00:00Z",
            "node-a"
        ]
    );
    let detail = kubectl::status_one(client, "agents", "triage")
        .await
        .expect("detail");
    assert!(detail.contains("phase:        Suspended"), "{detail}");
    assert!(
        detail.contains("node node-a enforces generation 2"),
        "{detail}"
    );
    assert!(detail.contains("Enforced     False"), "{detail}");
    assert!(
        detail.contains("budgets:      counted by node node-a at 2026-11-21T10:00:05Z"),
        "{detail}"
    );
    assert!(detail.contains("    cell requests 120/10000\n"), "{detail}");
    assert!(
        detail.contains("    github requestsPerWindow 3/60\n"),
        "{detail}"
    );
    assert!(detail.contains("github"), "{detail}");
    assert!(!detail.contains("slack"), "{detail}");
    assert_eq!(server.await.expect("server"), 2);
}

#[tokio::test]
async fn audit_reads_the_cells_node_through_the_pod_proxy() {
    let (client, handle) = client();
    let records = "{\"time\":\"2026-11-21T10:00:01Z\",\"decision\":\"deny\",\"reasons\":[\"revoked\"],\"capability\":\"slack\",\"method\":\"POST\",\"host\":\"slack.example.com\",\"path\":\"/api/chat.postMessage\"}\n";
    let server = tokio::spawn(async move {
        let mut handle = handle;
        // The cell (for its node) and the node proxy's pod there, then the proxied read, whose
        // answer is JSON lines.
        let served = serve_on(&mut handle, audit_lookups()).await;
        let (request, send) = handle.next_request().await.expect("proxy call");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(
            request.uri().to_string(),
            "/api/v1/namespaces/cellgate-system/pods/cellgate-node-x7k2p:15021/proxy/audit?cell=agents%2Ftriage&limit=20"
        );
        assert_eq!(
            request.headers()["x-cellgate-admin-token"],
            "4dm1n-t0ken",
            "the node's admin token, from its Secret"
        );
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(records.as_bytes().to_vec()))
                .expect("response"),
        );
        served + 1
    });
    let text = kubectl::audit_text(
        client.clone(),
        "agents",
        "triage",
        "cellgate-system",
        20,
        false,
    )
    .await
    .expect("audit");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "2026-11-21T10:00:01Z",
            "deny",
            "revoked",
            "slack",
            "POST",
            "slack.example.com",
            "/api/chat.postMessage"
        ]
    );
    assert_eq!(server.await.expect("server"), 4);
}

fn audit_lookups() -> Vec<Call> {
    vec![
        call(Method::GET, CELL_URI, None, cell(5, &["github"], false, Some(5))),
        call(
            Method::GET,
            "/api/v1/namespaces/cellgate-system/pods?&fieldSelector=spec.nodeName%3Dnode-a&labelSelector=app.kubernetes.io%2Fname%3Dcellgate%2Capp.kubernetes.io%2Fcomponent%3Dnode",
            None,
            json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": [{"metadata": {"name": "cellgate-node-x7k2p", "namespace": "cellgate-system"}}]
            }),
        ),
        call(
            Method::GET,
            "/api/v1/namespaces/cellgate-system/secrets/cellgate-admin-token",
            None,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "cellgate-admin-token", "namespace": "cellgate-system"},
                // base64 of "4dm1n-t0ken\n"
                "data": {"token": "NGRtMW4tdDBrZW4K"}
            }),
        ),
    ]
}

#[tokio::test]
async fn audit_of_a_cell_without_a_node_says_why() {
    let (client, handle) = client();
    let mut c = cell(1, &["github"], false, None);
    c["status"] = json!({"phase": "Pending"});
    let server = tokio::spawn(serve(handle, vec![call(Method::GET, CELL_URI, None, c)]));
    let err = kubectl::audit_text(client, "agents", "triage", "cellgate-system", 20, false)
        .await
        .expect_err("no node");
    assert!(err.to_string().contains("no pod on a node yet"), "{err}");
    server.await.expect("server");
}

fn review(user: &str) -> Value {
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {},
           "status": {"userInfo": {"username": user, "groups": ["system:authenticated"]}}})
}

const LOCKDOWN_URI: &str = "/api/v1/namespaces/cellgate-system/configmaps/cellgate-lockdown";

#[tokio::test]
async fn cluster_lockdown_records_the_caller_the_api_server_names() {
    // No ConfigMap yet: created with the one entry, the caller from SelfSubjectReview.
    let (kc, handle) = client();
    let script = vec![
        call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews?",
            Some(
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}}),
            ),
            review("alice@example.com"),
        ),
        Call {
            status: StatusCode::NOT_FOUND,
            ..call(
                Method::GET,
                LOCKDOWN_URI,
                None,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "metadata": {}}),
            )
        },
        call(
            Method::POST,
            "/api/v1/namespaces/cellgate-system/configmaps?",
            None,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cellgate-lockdown", "namespace": "cellgate-system"}}),
        ),
    ];
    let served = tokio::spawn(serve_capture(handle, script));
    let text = cellgate_cli::admin::lockdown_cluster(
        kc,
        "cellgate-system",
        Some("agents"),
        true,
        "incident 12",
    )
    .await
    .unwrap();
    let (n, bodies) = served.await.unwrap();
    assert_eq!(n, 3);
    assert!(
        text.contains("lockdown on for namespace agents (by alice@example.com)"),
        "{text}"
    );
    let created = &bodies[2];
    assert_eq!(created["metadata"]["name"], "cellgate-lockdown");
    let entry: Value =
        serde_json::from_str(created["data"]["namespace.agents"].as_str().unwrap()).unwrap();
    assert_eq!(entry["reason"], "incident 12");
    assert_eq!(entry["by"], "alice@example.com");
    assert!(entry["since"].as_str().unwrap().ends_with('Z'));

    // It exists: lifting is a merge patch removing exactly that key.
    let (kc, handle) = client();
    let script = vec![
        call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews?",
            None,
            review("bob"),
        ),
        call(
            Method::GET,
            LOCKDOWN_URI,
            None,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cellgate-lockdown", "namespace": "cellgate-system"}, "data": {"cluster": "{}"}}),
        ),
        call(
            Method::PATCH,
            &format!("{LOCKDOWN_URI}?"),
            Some(json!({"data": {"cluster": null}})),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cellgate-lockdown"}}),
        ),
    ];
    let served = tokio::spawn(serve(handle, script));
    let text =
        cellgate_cli::admin::lockdown_cluster(kc, "cellgate-system", None, false, "resolved")
            .await
            .unwrap();
    assert_eq!(served.await.unwrap(), 3);
    assert!(
        text.contains("lockdown off for every cell in the cluster (by bob)"),
        "{text}"
    );

    // No caller named: nothing is changed.
    let (kc, handle) = client();
    let script = vec![call(
        Method::POST,
        "/apis/authentication.k8s.io/v1/selfsubjectreviews?",
        None,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}, "status": {"userInfo": {}}}),
    )];
    let served = tokio::spawn(serve(handle, script));
    let e = cellgate_cli::admin::lockdown_cluster(kc, "cellgate-system", None, true, "x")
        .await
        .unwrap_err();
    assert_eq!(served.await.unwrap(), 1);
    assert!(e.to_string().contains("did not name the caller"), "{e}");
}

/// As [`serve`], also returning each request's JSON body.
async fn serve_capture(mut handle: Handle, script: Vec<Call>) -> (usize, Vec<Value>) {
    let mut served = 0;
    let mut bodies = Vec::new();
    for expected in script {
        let (request, send) = handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("missing call: {} {}", expected.method, expected.uri));
        assert_eq!(request.method(), expected.method, "call {served}");
        assert_eq!(request.uri().to_string(), expected.uri, "call {served}");
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let got: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if let Some(want) = &expected.body {
            assert_eq!(&got, want, "body of call {served} ({})", expected.uri);
        }
        bodies.push(got);
        let answer = serde_json::to_vec(&expected.answer).expect("json");
        send.send_response(
            Response::builder()
                .status(expected.status)
                .header("content-type", "application/json")
                .body(Body::from(answer))
                .expect("response"),
        );
        served += 1;
    }
    (served, bodies)
}

fn approval(decision: Option<Value>) -> Value {
    let mut a = json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentApproval",
        "metadata": {"name": "ap-1234", "namespace": "agents"},
        "spec": {"cell": "triage", "capability": "deploy", "method": "POST", "host": "api.example.com",
                 "path": "/v1/deploy", "bodyDigest": "ab", "mode": "hold", "requestedAt": "2026-12-02T08:00:00Z",
                 "expiresAt": "2026-12-02T08:02:00Z", "node": "node-a", "requestId": "r1"}});
    if let Some(d) = decision {
        a["status"] = json!({"decision": d});
    }
    a
}

const APPROVAL_URI: &str = "/apis/cellgate.dev/v1alpha1/namespaces/agents/agentapprovals/ap-1234";

#[tokio::test]
async fn approvals_are_listed_and_decided_as_the_caller_the_api_server_names() {
    let (kc, handle) = client();
    let list = json!({"apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentApprovalList", "metadata": {},
                      "items": [approval(None)]});
    let script = vec![call(
        Method::GET,
        "/apis/cellgate.dev/v1alpha1/agentapprovals?",
        None,
        list,
    )];
    let served = tokio::spawn(serve(handle, script));
    let rows = cellgate_cli::admin::list_cluster_approvals(kc, None)
        .await
        .unwrap();
    assert_eq!(served.await.unwrap(), 1);
    let table = cellgate_cli::admin::approvals_table(&rows);
    assert!(table.contains("ap-1234"), "{table}");
    assert!(table.contains("agents/triage"), "{table}");
    assert!(table.contains("api.example.com/v1/deploy"), "{table}");

    // Approve: SelfSubjectReview, read it, patch the status with the caller's name.
    let (kc, handle) = client();
    let script = vec![
        call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews?",
            None,
            review("alice@example.com"),
        ),
        call(Method::GET, APPROVAL_URI, None, approval(None)),
        call(
            Method::PATCH,
            &format!("{APPROVAL_URI}/status?"),
            None,
            approval(None),
        ),
    ];
    let served = tokio::spawn(serve_capture(handle, script));
    let text = cellgate_cli::admin::decide_cluster(
        kc,
        "agents",
        "ap-1234",
        true,
        None,
        Some("10m"),
        Some(2),
    )
    .await
    .unwrap();
    let (n, bodies) = served.await.unwrap();
    assert_eq!(n, 3);
    assert!(
        text.contains(
            "approved agents/ap-1234 (POST api.example.com/v1/deploy) as alice@example.com"
        ),
        "{text}"
    );
    let d = &bodies[2]["status"]["decision"];
    assert_eq!(d["approved"], true);
    assert_eq!(d["by"], "alice@example.com");
    assert_eq!(
        (d["validFor"].as_str(), d["uses"].as_u64()),
        (Some("10m"), Some(2))
    );
    assert_eq!(bodies[2]["status"]["conditions"][0]["type"], "Approved");

    // Decided already: refused, nothing patched.
    let (kc, handle) = client();
    let script = vec![
        call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews?",
            None,
            review("bob"),
        ),
        call(
            Method::GET,
            APPROVAL_URI,
            None,
            approval(Some(
                json!({"approved": false, "by": "carol", "at": "t", "reason": "no"}),
            )),
        ),
    ];
    let served = tokio::spawn(serve(handle, script));
    let e = cellgate_cli::admin::decide_cluster(kc, "agents", "ap-1234", true, None, None, None)
        .await
        .unwrap_err();
    assert_eq!(served.await.unwrap(), 2);
    assert!(e.to_string().contains("already denied by carol"), "{e}");

    // A denial needs a reason, before any call.
    let (kc, _handle) = client();
    let e =
        cellgate_cli::admin::decide_cluster(kc, "agents", "ap-1234", false, Some(" "), None, None)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("reason is required"), "{e}");
}

#[tokio::test]
async fn status_shows_the_lockdowns_in_force() {
    let (kc, handle) = client();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cellgate-lockdown", "namespace": "cellgate-system"},
        "data": {"cluster": "{\"reason\":\"drill\",\"since\":\"2026-12-02T08:00:00Z\",\"by\":\"alice\"}",
                 "namespace.agents": "{\"reason\":\"runaway\",\"since\":\"t\",\"by\":\"bob\"}"}});
    let served = tokio::spawn(serve(
        handle,
        vec![call(Method::GET, LOCKDOWN_URI, None, cm)],
    ));
    let text = kubectl::lockdown_status(kc, "cellgate-system")
        .await
        .unwrap();
    assert_eq!(served.await.unwrap(), 1);
    assert!(
        text.contains(
            "LOCKDOWN every cell in the cluster: drill (by alice, since 2026-12-02T08:00:00Z)"
        ),
        "{text}"
    );
    assert!(
        text.contains("LOCKDOWN namespace agents: runaway (by bob"),
        "{text}"
    );
    // None: nothing printed.
    let (kc, handle) = client();
    let script = vec![Call {
        status: StatusCode::NOT_FOUND,
        ..call(
            Method::GET,
            LOCKDOWN_URI,
            None,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "metadata": {}}),
        )
    }];
    let served = tokio::spawn(serve(handle, script));
    assert_eq!(
        kubectl::lockdown_status(kc, "cellgate-system")
            .await
            .unwrap(),
        ""
    );
    assert_eq!(served.await.unwrap(), 1);
}
