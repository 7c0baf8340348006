//! Governance on the intake, through real sockets and TLS: budgets (requests, windows, LLM
//! tokens and spend read from responses) counted exactly and kept across restarts, approvals
//! held for a human (hold and retry), and the lockdown.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Empty;

async fn get(f: &Fixture, cell: &str, path: &str) -> Resp {
    let tls = f.tls("api.test", &f.token(cell), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .uri(path)
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .header("accept-encoding", "gzip, br")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send_h1(tls, req).await
}

async fn plain(f: &Fixture, cell: &str, path: &str) -> Resp {
    let tcp = f.connect(f.http.addr.port(), &f.token(cell)).await;
    let req = http::Request::builder()
        .uri(path)
        .header("host", format!("plain.test:{}", f.http.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    send_h1(tcp, req).await
}

/// A cell of the intake tests: approvals, a window, a total, token and spend budgets.
fn budget_cell(name: &str, https: u16, http: u16) -> String {
    format!(
        r#"apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: {name}, namespace: agents}}
spec:
  capabilities:
    - name: approved
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [GET, POST], paths: ["/v1/approve/**"]}}
      approval: {{required: true, timeout: 30s}}
    - name: quick
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [POST], paths: ["/v1/quick/**"]}}
      approval: {{required: true, timeout: 1s, mode: hold}}
    - name: retried
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [POST], paths: ["/v1/retry/**"]}}
      approval: {{required: true, mode: retry, timeout: 5m}}
    - name: shadowed
      mode: shadow
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [GET], paths: ["/v1/shadow/**"]}}
      approval: {{required: true, timeout: 1s}}
    - name: windowed
      destinations: [{{host: plain.test, ports: [{http}]}}]
      http: {{methods: [GET], paths: ["/w/**"]}}
      budget: {{requestsPerWindow: 3, window: 1h}}
    - name: burst
      destinations: [{{host: plain.test, ports: [{http}]}}]
      http: {{methods: [GET], paths: ["/b/**"]}}
      budget: {{requests: 50}}
    - name: tokens
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [GET], paths: ["/llm/openai/**"]}}
      budget: {{tokens: {{max: 2000, per: 24h}}}}
    - name: spend
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [GET], paths: ["/llm/anthropic/**"]}}
      budget: {{spend: {{max: "0.02", per: 30d, currency: USD}}}}
    - name: free
      destinations: [{{host: api.test, ports: [{https}]}}]
      http: {{methods: [GET], paths: ["/v1/free/**"]}}
"#
    )
}

/// The node's configuration for a restart on the same state directory (a fresh audit log: the
/// first node's admin thread keeps the old one's writer lock in this process).
fn restarted(f: &Fixture) -> cellgate_node::NodeConfig {
    let mut config = f.node().shared.config.clone();
    config.state_dir = Some(config.state_dir());
    config.audit = f.dir.path().join("audit-2.jsonl");
    config
}

async fn start() -> Fixture {
    let f = Fixture::start().await;
    let (https, http) = (f.https.addr.port(), f.http.addr.port());
    install_cell(&f, "gov", &budget_cell("gov", https, http)).await;
    f
}

/// One request over TLS through the node, with a body.
async fn send(f: &Fixture, method: &str, path: &str, body: &str) -> Resp {
    let tls = f.tls("api.test", &f.token("gov"), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send_h1(tls, req).await
}

/// POST `body` to `path` on the node's admin port.
async fn admin_post(f: &Fixture, path: &str, body: serde_json::Value) -> Resp {
    let tcp = tokio::net::TcpStream::connect(f.node().admin_addr)
        .await
        .unwrap();
    let req = http::Request::post(path)
        .header("host", "admin")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send_h1(tcp, req).await
}

/// Waits (bounded) until exactly one approval is pending, and returns it.
async fn pending_one(f: &Fixture) -> serde_json::Value {
    for _ in 0..200 {
        let list = f.admin_get("/approvals").await.json();
        if let Some(a) = list.as_array().filter(|l| l.len() == 1) {
            return a[0].clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no pending approval");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_waits_for_a_human_and_goes_on_exactly_as_approved() {
    let f = std::sync::Arc::new(start().await);
    let held = {
        let f = f.clone();
        tokio::spawn(
            async move { send(&f, "POST", "/v1/approve/deploy?env=prod", "{\"v\":2}").await },
        )
    };
    let a = pending_one(&f).await;
    assert_eq!(a["cell"], "agents/gov", "{a}");
    assert_eq!(
        (a["capability"].as_str(), a["mode"].as_str()),
        (Some("approved"), Some("hold"))
    );
    assert_eq!(
        (a["method"].as_str(), a["host"].as_str()),
        (Some("POST"), Some("api.test"))
    );
    assert_eq!(a["path"], "/v1/approve/deploy?env=prod");
    assert_eq!(
        a["body_digest"],
        cellgate_node::approvals::body_digest(b"{\"v\":2}").as_str()
    );
    assert_eq!(a["body_digest"].as_str().unwrap().len(), 64);
    assert!(f.https.requests().is_empty(), "sent before approval");
    assert!(!held.is_finished());
    let id = a["id"].as_str().unwrap().to_string();
    let r = admin_post(
        &f,
        &format!("/approvals/{id}"),
        serde_json::json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = f.https.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, b"{\"v\":2}", "the approved body, whole");
    assert_eq!(seen[0].uri, "/v1/approve/deploy?env=prod");
    // Three records: requested, decided (with the approver), and the request's own allow.
    let asked = f.wait_audit(|r| r["reason"] == "approval_requested").await;
    assert_eq!(asked["decision"], "approval");
    let decided = f.wait_audit(|r| r["reason"] == "approval_granted").await;
    assert!(
        decided["reasons"]
            .to_string()
            .contains("by admin API from 127.0.0.1"),
        "{decided}"
    );
    assert!(decided["reasons"].to_string().contains(&id), "{decided}");
    let own = f
        .wait_audit(|r| r["decision"] == "allow" && r["capability"] == "approved")
        .await;
    assert!(
        own["reasons"].to_string().contains("approved by admin API"),
        "{own}"
    );
    // Decided once.
    let r = admin_post(
        &f,
        &format!("/approvals/{id}"),
        serde_json::json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_refused_when_denied_or_when_nobody_decides() {
    let f = std::sync::Arc::new(start().await);
    let held = {
        let f = f.clone();
        tokio::spawn(async move { send(&f, "POST", "/v1/approve/drop", "x").await })
    };
    let id = pending_one(&f).await["id"].as_str().unwrap().to_string();
    let r = admin_post(
        &f,
        &format!("/approvals/{id}"),
        serde_json::json!({"decision": "deny"}),
    )
    .await;
    assert_eq!(r.status, 400, "a denial needs a reason: {}", r.body);
    let r = admin_post(
        &f,
        &format!("/approvals/{id}"),
        serde_json::json!({"decision": "deny", "reason": "not on a Friday"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = held.await.unwrap();
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["reason"], "approval_denied", "{j}");
    assert!(
        j["message"].as_str().unwrap().contains("not on a Friday"),
        "{j}"
    );
    assert_eq!(j["approval_id"], id.as_str());
    f.wait_audit(|r| r["reason"] == "approval_rejected").await;

    // Nobody decides within the capability's 1s.
    let r = send(&f, "POST", "/v1/quick/x", "y").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "approval_timeout", "{}", r.body);
    assert!(
        f.admin_get("/approvals")
            .await
            .json()
            .as_array()
            .unwrap()
            .is_empty(),
        "the expired approval is gone"
    );
    // Shadow mode relaxes policy, not approval.
    let r = get(&f, "gov", "/v1/shadow/x").await;
    assert_eq!(r.json()["reason"], "approval_timeout", "{}", r.body);
    assert!(
        f.https.requests().is_empty(),
        "nothing unapproved reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_mode_answers_at_once_and_allows_the_same_request_once_approved() {
    let f = start().await;
    let r = send(&f, "POST", "/v1/retry/pay", "{\"amount\":5}").await;
    assert_eq!(r.status, 403, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"], "cellgate_approval_required", "{j}");
    assert_eq!(j["reason"], "approval_required");
    let id = j["approval_id"].as_str().unwrap().to_string();
    // The same request again names the same approval; nothing was sent.
    let again = send(&f, "POST", "/v1/retry/pay", "{\"amount\":5}")
        .await
        .json();
    assert_eq!(again["approval_id"], id.as_str());
    assert_eq!(
        f.admin_get("/approvals")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = admin_post(
        &f,
        &format!("/approvals/{id}"),
        serde_json::json!({"decision": "approve", "for": "10m", "uses": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Another body is another request: not covered.
    let other = send(&f, "POST", "/v1/retry/pay", "{\"amount\":5000}").await;
    assert_eq!(other.json()["reason"], "approval_required");
    assert_ne!(other.json()["approval_id"], id.as_str());
    let r = send(&f, "POST", "/v1/retry/pay", "{\"amount\":5}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(f.https.requests().len(), 1);
    assert_eq!(f.https.requests()[0].body, b"{\"amount\":5}");
    // One use.
    let r = send(&f, "POST", "/v1/retry/pay", "{\"amount\":5}").await;
    assert_eq!(r.json()["reason"], "approval_required", "{}", r.body);
    assert_eq!(f.https.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_when_the_node_stops_is_refused_and_audited() {
    let mut f = start().await;
    let tls = f.tls("api.test", &f.token("gov"), &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/v1/approve/x")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(http_body_util::Full::new(Bytes::from_static(b"z")))
        .unwrap();
    let held = tokio::spawn(sender.send_request(req));
    pending_one(&f).await;
    let node = f.node.take().unwrap();
    let audit = f.audit.clone();
    node.shutdown().await;
    let resp = held.await.unwrap().unwrap();
    assert_eq!(resp.status(), 403);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["reason"], "approval_unavailable", "{j}");
    let recs = audit_records(&audit);
    assert!(
        recs.iter().any(|r| r["reason"] == "approval_unavailable"),
        "{recs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_budget_answers_429_with_its_state_and_audits_it() {
    let f = start().await;
    for i in 1..=3 {
        let r = plain(&f, "gov", "/w/x").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        let rid = r.headers["x-cellgate-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
        // Every record of a governed request carries the budget's state.
        let b = &rec["budget"][0];
        assert_eq!(b["scope"], "capability:windowed", "{rec}");
        assert_eq!(b["requestsPerWindow"]["used"], i, "{rec}");
        assert_eq!(b["requestsPerWindow"]["max"], 3, "{rec}");
        assert!(b["requestsPerWindow"]["resets_at"].is_string(), "{rec}");
    }
    let r = plain(&f, "gov", "/w/x").await;
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&retry), "Retry-After {retry}");
    let j = r.json();
    assert_eq!(j["error"], "cellgate_budget_exhausted", "{j}");
    assert_eq!(j["reason"], "budget_exhausted");
    assert_eq!(j["budget"], "requestsPerWindow");
    assert_eq!(j["capability"], "windowed");
    assert_eq!(j["limit"], 3);
    assert_eq!(j["used"], 3);
    assert!(j["resets_at"].as_str().unwrap().ends_with('Z'), "{j}");
    let rid = j["request_id"].as_str().unwrap().to_string();
    assert!(
        std::fs::read_to_string(&f.audit).unwrap().contains(&rid),
        "not durable"
    );
    let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["reason"], "budget_exhausted");
    assert_eq!(rec["budget"][0]["requestsPerWindow"]["used"], 3, "{rec}");
    assert_eq!(
        f.http.requests().len(),
        3,
        "the refused request reached the upstream"
    );
    // Another capability of the same cell is not governed by this budget.
    assert_eq!(get(&f, "gov", "/v1/free/y").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_concurrent_requests_gets_exactly_the_budget_through() {
    let f = std::sync::Arc::new(start().await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            plain(&f, "gov", "/b/x").await.status
        }));
    }
    let mut by_status = std::collections::BTreeMap::new();
    for t in tasks {
        *by_status.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(by_status.get(&200), Some(&50), "{by_status:?}");
    assert_eq!(by_status.get(&429), Some(&150), "{by_status:?}");
    assert_eq!(f.http.requests().len(), 50);
    // And it stays used up.
    let r = plain(&f, "gov", "/b/x").await;
    assert_eq!(r.json()["budget"], "requests");
    assert!(
        r.headers.get("retry-after").is_none(),
        "a total has no window to wait for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_a_restart_and_a_corrupt_one_stops_the_node() {
    let mut f = start().await;
    for _ in 0..2 {
        assert_eq!(plain(&f, "gov", "/w/x").await.status, 200);
    }
    let config = restarted(&f);
    f.node.take().unwrap().shutdown().await;
    f.node = Some(cellgate_node::run(config.clone()).await.unwrap());
    install_cell(
        &f,
        "gov",
        &budget_cell("gov", f.https.addr.port(), f.http.addr.port()),
    )
    .await;
    assert_eq!(plain(&f, "gov", "/w/x").await.status, 200);
    let r = plain(&f, "gov", "/w/x").await;
    assert_eq!(r.status, 429, "the restart gave budget back: {}", r.body);

    // A ledger that cannot be read: the node does not start, and the file is left alone.
    f.node.take().unwrap().shutdown().await;
    let mut config = config;
    config.audit = f.dir.path().join("audit-3.jsonl");
    let ledger = config.state_dir().join(cellgate_node::budget::LEDGER_FILE);
    std::fs::write(&ledger, b"{\"version\":1,\"counters\":[{").unwrap();
    let e = cellgate_node::run(config).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("budgets.json") && msg.contains("never reset to zero"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&ledger).unwrap(),
        b"{\"version\":1,\"counters\":[{"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_tokens_and_spend_are_read_from_responses_and_enforced() {
    let f = start().await;
    // 1500 tokens a response, a budget of 2000: the request that crosses it completes, the next
    // is refused.
    let r = get(&f, "gov", "/llm/openai/chat").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("chat.completion"),
        "the body reached the agent whole"
    );
    // Compression was refused on the agent's behalf: usage must be readable.
    let seen = f.https.requests();
    assert_eq!(
        seen.last().unwrap().header("accept-encoding"),
        Some("identity")
    );
    let rec = f.wait_audit(|r| r["reason"] == "llm_usage").await;
    assert_eq!(rec["decision"], "control");
    assert_eq!(rec["budget"][0]["tokens"]["used"], 1500, "{rec}");
    assert!(
        rec["reasons"][0]
            .as_str()
            .unwrap()
            .contains("gpt-4o: 1000 input and 500 output"),
        "{rec}"
    );
    let r = get(&f, "gov", "/llm/openai/stream").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("[DONE]"), "{}", r.body);
    let r = get(&f, "gov", "/llm/openai/chat").await;
    assert_eq!(r.status, 429, "{}", r.body);
    let j = r.json();
    assert_eq!(
        (j["budget"].as_str(), j["limit"].as_u64()),
        (Some("tokens"), Some(2000)),
        "{j}"
    );
    assert_eq!(j["used"], 3000, "the stream's usage counted too: {j}");

    // Spend: claude-sonnet-4 at 3 + 15 USD per million: 1000 in + 500 out = 0.0105 USD; a
    // budget of 0.02 allows two responses.
    for _ in 0..2 {
        let r = get(&f, "gov", "/llm/anthropic/stream").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("message_stop"));
    }
    // Usage is counted before the body's end is written to the agent.
    let r = get(&f, "gov", "/llm/anthropic/stream").await;
    assert_eq!(
        r.status, 429,
        "third response allowed over a 0.02 USD budget: {}",
        r.body
    );
    let j = r.json();
    assert_eq!(j["budget"], "spend", "{j}");
    assert_eq!(j["limit"], "0.02");
    assert_eq!(j["used"], "0.021");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_reports_no_usage_is_never_free() {
    let f = start().await;
    let r = get(&f, "gov", "/llm/openai/stream-without-usage").await;
    assert_eq!(r.status, 200);
    let rec = f
        .wait_audit(|r| r["reason"] == "llm_usage_unreadable")
        .await;
    assert!(
        rec["reasons"][0]
            .as_str()
            .unwrap()
            .contains("without usage"),
        "{rec}"
    );
    let r = get(&f, "gov", "/llm/openai/chat").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["budget"], "tokens");
}

/// POST `body` to `/lockdown` on the node's admin port.
async fn lockdown(f: &Fixture, body: serde_json::Value) -> Resp {
    admin_post(f, "/lockdown", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdown_refuses_everything_closes_what_is_open_and_lifts_exactly() {
    let mut f = start().await;
    assert_eq!(
        f.https_get("api.test", "api.test", "/v1/a", "GET")
            .await
            .status,
        200
    );
    let denied_before = f
        .https_get("api.test", "api.test", "/v2/a", "GET")
        .await
        .json()["reason"]
        .clone();
    assert!(denied_before.is_string() && denied_before != "lockdown");
    // A stream is open when the lockdown starts.
    let tls = f.tls("api.test", &f.token("demo"), &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/v1/sse-long")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut stream = sender.send_request(req).await.unwrap().into_body();
    let first = http_body_util::BodyExt::frame(&mut stream)
        .await
        .unwrap()
        .unwrap();
    assert!(first.data_ref().is_some());

    // Refused without a reason; nothing changes.
    let r = lockdown(&f, serde_json::json!({"state": "on", "reason": " "})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = lockdown(
        &f,
        serde_json::json!({"state": "on", "reason": "incident 7"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["all"]["reason"], "incident 7");

    // Every request of every cell, on plain HTTP and TLS.
    for (cell, path) in [("demo", "/v1/a"), ("gov", "/v1/free/x")] {
        let r = get(&f, cell, path).await;
        assert_eq!(r.status, 403, "{cell}: {}", r.body);
        assert_eq!(r.json()["reason"], "lockdown");
        assert!(r.json()["message"].as_str().unwrap().contains("incident 7"));
    }
    assert_eq!(
        f.http_get("plain.test", "/public/x").await.json()["reason"],
        "lockdown"
    );
    // The open stream is cut.
    let cut = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match http_body_util::BodyExt::frame(&mut stream).await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the open stream outlived the lockdown");
    let metrics = f.admin_get("/metrics").await.body;
    assert!(metrics.contains("cellgate_lockdowns 1"), "{metrics}");
    let rec = f.wait_audit(|r| r["reason"] == "lockdown_on").await;
    assert_eq!(rec["decision"], "control");
    assert!(rec["reasons"][1] == "incident 7", "{rec}");

    // A restart comes back locked.
    let config = restarted(&f);
    f.node.take().unwrap().shutdown().await;
    f.node = Some(cellgate_node::run(config).await.unwrap());
    install_cell(
        &f,
        "gov",
        &budget_cell("gov", f.https.addr.port(), f.http.addr.port()),
    )
    .await;
    assert_eq!(get(&f, "demo", "/v1/a").await.json()["reason"], "lockdown");

    // Lifting restores exactly what was: allowed is allowed, denied stays denied with its reason.
    let r = lockdown(
        &f,
        serde_json::json!({"state": "off", "reason": "resolved"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&f, "demo", "/v1/a").await.status, 200);
    assert_eq!(
        send(&f, "POST", "/v1/retry/x", "").await.json()["reason"],
        "approval_required"
    );
    assert_eq!(
        f.https_get("api.test", "api.test", "/v2/a", "GET")
            .await
            .json()["reason"],
        denied_before
    );

    // One namespace only.
    let r = lockdown(
        &f,
        serde_json::json!({"state": "on", "namespace": "other-ns", "reason": "x"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        get(&f, "demo", "/v1/a").await.status,
        200,
        "namespace agents is not locked"
    );
    let r = lockdown(
        &f,
        serde_json::json!({"state": "on", "namespace": "agents", "reason": "y"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&f, "demo", "/v1/a").await.json()["reason"], "lockdown");
    let state = f.admin_get("/lockdown").await.json();
    assert_eq!(state["namespaces"]["agents"]["reason"], "y", "{state}");
    assert!(state.get("all").is_none(), "{state}");
}
