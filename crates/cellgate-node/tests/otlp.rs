//! The node's OTLP export, against a real OTLP receiver (gRPC and HTTP/protobuf on loopback):
//! every decision as a log record, a span per forwarded request joined to the agent's trace, a
//! collector outage under load that loses nothing, and the backlog bound that fails closed.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cellgate_otel::{OtlpConfig, OtlpFlags};
use cellgate_testing::otlp::{OtlpReceiver, ReceivedLog};
use common::*;
use http_body_util::Empty;

/// The credential a capability injects in the first test.
const CREDENTIAL: &str = "sk-otlp-test-credential-7f3a9c";

fn otlp(endpoint: &str, protocol: &str, max_backlog: u64, stall_after: Duration) -> OtlpConfig {
    let flags = OtlpFlags {
        endpoint: Some(endpoint.to_owned()),
        protocol: Some(protocol.to_owned()),
        max_backlog: Some(max_backlog),
        stall_after: Some(stall_after),
        traces: Some(true),
    };
    let mut env = HashMap::new();
    env.insert("OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(), "2000".to_owned());
    OtlpConfig::resolve(&flags, &env, "cellgate-node")
        .unwrap()
        .unwrap()
}

fn dedupe(logs: &[ReceivedLog]) -> Vec<ReceivedLog> {
    let mut seen = HashSet::new();
    logs.iter()
        .filter(|l| {
            l.event_name != "cellgate.audit.anchor"
                && seen.insert(l.attrs["cellgate.record.hash"].clone())
        })
        .cloned()
        .collect()
}

fn seqs(logs: &[ReceivedLog]) -> Vec<u64> {
    logs.iter()
        .map(|l| l.attrs["cellgate.record.seq"].parse().unwrap())
        .collect()
}

/// Waits (bounded) until the receiver holds every record of the log, deduplicated.
async fn wait_all(rx: &OtlpReceiver, f: &Fixture, within: Duration) -> Vec<ReceivedLog> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let _ = f.node().shared.audit.flush().await;
        let want = f.node().shared.audit.stats().last_seq;
        let got = dedupe(&rx.logs());
        if got.len() as u64 >= want || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn plain_get(f: &Fixture, path: &str, headers: &[(&str, &str)]) -> Resp {
    let tcp = f.connect(f.http.addr.port(), &f.token("demo")).await;
    let mut req = http::Request::builder()
        .uri(path)
        .header("host", format!("plain.test:{}", f.http.addr.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send_h1(tcp, req.body(Empty::<Bytes>::new()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_go_out_as_log_records_and_a_forwarded_request_joins_the_agents_trace() {
    let rx = OtlpReceiver::start().await;
    let cfg = otlp(&rx.grpc_url(), "grpc", 1000, Duration::from_secs(60));
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("key"), format!("{CREDENTIAL}\n")).unwrap();
    let dir = secrets.path().to_path_buf();
    let f = Fixture::start_with(move |c| {
        c.otlp = Some(cfg);
        c.secrets_dir = Some(dir);
    })
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let agent_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{agent_span}-01");
    let allowed = plain_get(
        &f,
        "/public/item?api_key=SECRETQUERYVALUE",
        &[("traceparent", &traceparent), ("tracestate", "vendor=x")],
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let denied = plain_get(&f, "/private/thing", &[]).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    // After the traced request: a pooled connection reused here would leave it no connect span.
    // A cell whose capability injects a credential: the credential must never be exported.
    let port = f.http.addr.port();
    install_cell(
        &f,
        "creds",
        &format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: creds, namespace: agents}}\nspec:\n  capabilities:\n    - name: keyed\n      destinations: [{{host: plain.test, ports: [{port}]}}]\n      http: {{methods: [GET], paths: [\"/public/**\"]}}\n      credential:\n        file: {{name: key}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n"
        ),
    )
    .await;
    let tcp = tagged_connect_port(&f, port, "creds").await;
    let req = http::Request::builder()
        .uri("/public/keyed")
        .header("host", format!("plain.test:{port}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let keyed = send_h1(tcp, req).await;
    assert_eq!(keyed.status, 200, "{}", keyed.body);
    let auth = f
        .http
        .requests()
        .last()
        .unwrap()
        .header("authorization")
        .map(str::to_owned);
    assert_eq!(
        auth.as_deref(),
        Some(format!("Bearer {CREDENTIAL}").as_str())
    );

    // The upstream saw the agent's trace headers unchanged.
    let seen = f.http.requests();
    let up = seen
        .iter()
        .find(|r| r.header("traceparent").is_some())
        .expect("the traced request reached the upstream");
    assert_eq!(up.header("traceparent"), Some(traceparent.as_str()));
    assert_eq!(up.header("tracestate"), Some("vendor=x"));

    let logs = wait_all(&rx, &f, Duration::from_secs(15)).await;
    let by_reason = |decision: &str| {
        logs.iter()
            .find(|l| {
                l.attrs.get("cellgate.decision").map(String::as_str) == Some(decision)
                    && l.attrs.get("cellgate.cell").map(String::as_str) == Some("demo")
            })
            .unwrap_or_else(|| panic!("no {decision} record in {logs:#?}"))
            .clone()
    };
    let allow = by_reason("allow");
    assert_eq!(allow.attrs["http.request.method"], "GET");
    assert_eq!(allow.attrs["server.address"], "plain.test");
    assert_eq!(allow.attrs["server.port"], f.http.addr.port().to_string());
    assert_eq!(allow.attrs["url.path"], "/public/item");
    assert_eq!(allow.attrs["cellgate.cell"], "demo");
    assert_eq!(allow.attrs["k8s.namespace.name"], "agents");
    assert_eq!(allow.attrs["cellgate.capability"], "plain");
    assert!(allow.attrs.contains_key("cellgate.policy.version"));
    assert!(allow.attrs.contains_key("cellgate.token.id"));
    assert!(allow.attrs.contains_key("client.address"));
    assert_eq!(allow.attrs["cellgate.record.hash"].len(), 64);
    assert_eq!(allow.resource["service.name"], "cellgate-node");
    assert_eq!(allow.resource["service.instance.id"], "test-node");
    let deny = by_reason("deny");
    assert_eq!(deny.attrs["url.path"], "/private/thing");
    assert_eq!(deny.severity, 13);
    // In chain order, and nothing else than what the log holds.
    assert_eq!(seqs(&logs), (1..=logs.len() as u64).collect::<Vec<_>>());

    // The spans: the request's is a child of the agent's, in the agent's trace; its children
    // are the decision, the upstream connection and the upstream exchange.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans: Vec<_> = rx
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        if spans.len() >= 4 || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let root = spans
        .iter()
        .find(|s| s.parent_span_id == agent_span)
        .unwrap_or_else(|| panic!("no span joined the agent's: {spans:#?}"));
    assert_eq!(root.name, "GET");
    assert_eq!(root.kind, 2, "SERVER");
    assert_eq!(root.attrs["url.path"], "/public/item");
    assert_eq!(root.attrs["http.response.status_code"], "200");
    assert_eq!(
        root.attrs["cellgate.request.id"],
        allow.attrs["cellgate.request.id"]
    );
    let child = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.parent_span_id == root.span_id)
            .unwrap_or_else(|| panic!("no {name} under the request span: {spans:#?}"))
    };
    let decide = child("cellgate.decide");
    assert_eq!(decide.attrs["cellgate.decision"], "allow");
    assert!(decide.start >= root.start && decide.end <= root.end);
    assert!(child("cellgate.upstream.connect")
        .attrs
        .contains_key("network.peer.address"));
    let upstream = child("cellgate.upstream");
    assert_eq!(upstream.kind, 3, "CLIENT");
    assert!(upstream.start >= root.start && upstream.end <= root.end);

    // Nothing exported carries the query, a token or a credential.
    let token = f.token("demo");
    for p in rx.payloads() {
        let text = String::from_utf8_lossy(&p);
        assert!(
            !text.contains("SECRETQUERYVALUE"),
            "a query value was exported"
        );
        assert!(!text.contains("api_key"), "a query key was exported");
        assert!(!text.contains(&token[..40]), "a token was exported");
        assert!(
            !text.contains(CREDENTIAL),
            "an injected credential was exported"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_30s_under_load_loses_nothing_and_the_backlog_arrives_in_order() {
    let rx = OtlpReceiver::start().await;
    let cfg = otlp(
        &rx.http_url(),
        "http/protobuf",
        1_000_000,
        Duration::from_secs(3),
    );
    let f = Arc::new(Fixture::start_with(|c| c.otlp = Some(cfg)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for t in 0..4 {
        let (f, stop, sent) = (f.clone(), stop.clone(), sent.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let path = if i.is_multiple_of(5) {
                    format!("/private/{t}-{i}")
                } else {
                    format!("/public/{t}-{i}")
                };
                let r = plain_get(&f, &path, &[]).await;
                assert!(
                    r.status == 200 || r.status == 403,
                    "{} {}",
                    r.status,
                    r.body
                );
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rx.stop().await;
    let down_at = sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Meanwhile: behind, stalled, not ready, nothing dropped.
    let status = f.node().shared.export.as_ref().unwrap().status();
    assert!(status.backlog > 0 && status.stalled, "{status:?}");
    assert!(status.lag_seconds > 20.0, "{status:?}");
    let ready = f.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.body.contains("audit export is stalled"),
        "{}",
        ready.body
    );
    let metrics = f.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("cellgate_audit_export_stalled 1"),
        "{metrics}"
    );
    rx.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let total = sent.load(Ordering::Relaxed);
    assert!(
        total > down_at + 100,
        "the load went on while the collector was down: {down_at} then {total}"
    );

    let logs = wait_all(&rx, &f, Duration::from_secs(60)).await;
    let written = f.node().shared.audit.stats().last_seq;
    assert!(written >= total, "every request has its record");
    assert_eq!(
        seqs(&logs),
        (1..=written).collect::<Vec<_>>(),
        "every record arrived, exactly once after dedupe by hash, in chain order"
    );
    // The hashes the collector holds are the log's.
    let file = f.audit_records();
    for (l, r) in logs.iter().zip(&file) {
        assert_eq!(l.attrs["cellgate.record.hash"], r["hash"].as_str().unwrap());
    }
    let ready = f.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_backlog_bound_new_requests_are_refused_and_audited_until_the_export_catches_up() {
    let rx = OtlpReceiver::start().await;
    let cfg = otlp(&rx.grpc_url(), "grpc", 5, Duration::from_secs(60));
    let f = Fixture::start_with(|c| c.otlp = Some(cfg)).await;
    let r = plain_get(&f, "/public/first", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    rx.set_unavailable(true);
    let mut refused = None;
    for i in 0..20 {
        let r = plain_get(&f, &format!("/public/n{i}"), &[]).await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let refused = refused.expect("the node kept allowing past the backlog bound");
    let body = refused.json();
    assert_eq!(body["reason"], "audit_backlog", "{body}");
    // The refusal itself is in the log (durable before the answer), never dropped.
    f.wait_audit(|r| r["reason"] == "audit_backlog").await;
    let ready = f.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("past its bound"), "{}", ready.body);

    rx.set_unavailable(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = plain_get(&f, "/public/after", &[]).await;
        if r.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after the collector returned: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = wait_all(&rx, &f, Duration::from_secs(15)).await;
    let written = f.node().shared.audit.stats().last_seq;
    assert_eq!(seqs(&logs), (1..=written).collect::<Vec<_>>());
}

/// The same scenario against a real OpenTelemetry Collector: `OTELCOL_BIN` names an
/// `otelcol-contrib` binary (it needs the `file` exporter). The collector receives OTLP/gRPC
/// and writes what it received as OTLP JSON lines; every audit record of the node and the
/// request's span must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_collector_receives_every_record_and_the_span_when_otelcol_bin_is_set() {
    let Some(bin) = std::env::var_os("OTELCOL_BIN") else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "NOTE real_collector suite not run: OTELCOL_BIN is not set (an otelcol-contrib \
             binary; see docs/observability.md)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = dir.path().join("received.jsonl");
    let config = dir.path().join("otelcol.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:{port}\n\
             exporters:\n  file:\n    path: {}\n    flush_interval: 100ms\n\
             service:\n  pipelines:\n    logs: {{receivers: [otlp], exporters: [file]}}\n    traces: {{receivers: [otlp], exporters: [file]}}\n",
            out.display()
        ),
    )
    .unwrap();
    let mut collector = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&config)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = otlp(
        &format!("http://127.0.0.1:{port}"),
        "grpc",
        1000,
        Duration::from_secs(60),
    );
    let f = Fixture::start_with(|c| c.otlp = Some(cfg)).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    for i in 0..10 {
        let r = plain_get(
            &f,
            &format!("/public/{i}"),
            &[("traceparent", &traceparent)],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let _ = plain_get(&f, "/private/x", &[]).await;
    f.node().shared.audit.flush().await.unwrap();
    let want: HashSet<String> = f
        .audit_records()
        .iter()
        .map(|r| r["hash"].as_str().unwrap().to_owned())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let missing: Vec<_> = want.iter().filter(|h| !text.contains(h.as_str())).collect();
        if missing.is_empty() && text.contains(trace_id) && text.contains("cellgate.decide") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector did not receive {} records (or the span): {text}",
            missing.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = collector.kill().await;
}
