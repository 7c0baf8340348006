//! The audit exporter against a real OTLP receiver (gRPC and HTTP/protobuf on loopback).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use cellgate_audit::{AuditLog, Decision, Record};
use cellgate_otel::{AuditExporter, OtlpConfig, OtlpFlags};
use cellgate_testing::otlp::{OtlpReceiver, ReceivedLog};

fn config(endpoint: &str, protocol: &str, max_backlog: u64) -> OtlpConfig {
    let flags = OtlpFlags {
        endpoint: Some(endpoint.to_owned()),
        protocol: Some(protocol.to_owned()),
        max_backlog: Some(max_backlog),
        stall_after: Some(Duration::from_secs(1)),
        traces: Some(false),
    };
    let mut env = HashMap::new();
    env.insert("OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(), "2000".to_owned());
    OtlpConfig::resolve(&flags, &env, "cellgate-node")
        .unwrap()
        .unwrap()
}

fn record(i: usize) -> Record {
    let decision = if i.is_multiple_of(3) {
        Decision::Deny
    } else {
        Decision::Allow
    };
    let mut r = Record::new("node-a", "intake", "https", decision, "some_reason");
    r.cell = Some("agent".into());
    r.namespace = Some("team".into());
    r.method = Some("GET".into());
    r.host = Some("api.example.com".into());
    r.destination = Some("93.184.216.34:443".into());
    r.source = Some("10.1.2.3:5555".into());
    // A query string must never be exported even if a caller left one in the path.
    r.path = Some(format!("/v1/items/{i}?api_key=SECRETQUERYVALUE"));
    r.request_id = Some(format!("req-{i}"));
    r
}

async fn wait_for(rx: &OtlpReceiver, n: usize, within: Duration) -> Vec<ReceivedLog> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let logs = rx.logs();
        if dedupe(&logs).len() >= n || tokio::time::Instant::now() > deadline {
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// First copy of each record, by its hash, in arrival order.
fn dedupe(logs: &[ReceivedLog]) -> Vec<ReceivedLog> {
    let mut seen = HashSet::new();
    logs.iter()
        .filter(|l| seen.insert(l.attrs["cellgate.record.hash"].clone()))
        .cloned()
        .collect()
}

fn seqs(logs: &[ReceivedLog]) -> Vec<u64> {
    logs.iter()
        .map(|l| l.attrs["cellgate.record.seq"].parse().unwrap())
        .collect()
}

/// The status once the exporter has saved its cursor after the last accepted batch.
async fn settled(exporter: &AuditExporter) -> cellgate_otel::ExportStatus {
    for _ in 0..100 {
        let s = exporter.status();
        if s.backlog == 0 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    exporter.status()
}

async fn open(dir: &Path) -> (AuditLog, std::path::PathBuf) {
    let path = dir.join("audit.jsonl");
    let (log, _w) = AuditLog::open(&path, Default::default()).await.unwrap();
    (log, path)
}

async fn exports_every_record_in_order(protocol: &str) {
    let rx = OtlpReceiver::start().await;
    let endpoint = if protocol == "grpc" {
        rx.grpc_url()
    } else {
        rx.http_url()
    };
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = open(dir.path()).await;
    let exporter = AuditExporter::start(
        &config(&endpoint, protocol, 1000),
        &path,
        log.clone(),
        "node-a",
        None,
    )
    .unwrap();
    for i in 0..300 {
        log.submit(record(i)).unwrap();
    }
    log.flush().await.unwrap();
    let logs = wait_for(&rx, 300, Duration::from_secs(20)).await;
    assert_eq!(
        logs.len(),
        300,
        "each record exactly once when nothing failed"
    );
    assert_eq!(seqs(&logs), (1..=300).collect::<Vec<_>>(), "in chain order");
    let expected_transport = if protocol == "grpc" { "grpc" } else { "http" };
    let first = &logs[0];
    assert_eq!(first.transport, expected_transport);
    assert_eq!(first.attrs["http.request.method"], "GET");
    assert_eq!(first.attrs["server.address"], "api.example.com");
    assert_eq!(first.attrs["server.port"], "443");
    assert_eq!(first.attrs["url.path"], "/v1/items/0");
    assert_eq!(first.attrs["client.address"], "10.1.2.3");
    assert_eq!(first.attrs["k8s.namespace.name"], "team");
    assert_eq!(first.attrs["cellgate.cell"], "agent");
    assert_eq!(first.attrs["cellgate.decision"], "deny");
    assert_eq!(first.attrs["cellgate.reason"], "some_reason");
    assert_eq!(first.attrs["cellgate.request.id"], "req-0");
    assert_eq!(first.attrs["cellgate.record.prev"], "0".repeat(64));
    assert_eq!(
        logs[1].attrs["cellgate.record.prev"],
        first.attrs["cellgate.record.hash"]
    );
    assert_eq!(first.event_name, "cellgate.decision");
    assert_eq!(first.severity, 13, "a denial is WARN");
    assert_eq!(logs[1].severity, 9, "an allow is INFO");
    assert!(first.time_unix_nano > 0);
    assert_eq!(first.resource["service.name"], "cellgate-node");
    assert_eq!(first.resource["service.instance.id"], "node-a");
    for p in rx.payloads() {
        let text = String::from_utf8_lossy(&p);
        assert!(
            !text.contains("SECRETQUERYVALUE") && !text.contains("api_key"),
            "a query string was exported"
        );
    }
    let status = settled(&exporter).await;
    assert_eq!(status.exported, 300);
    assert_eq!(status.backlog, 0);
    exporter.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_goes_out_once_in_chain_order_over_grpc() {
    exports_every_record_in_order("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_goes_out_once_in_chain_order_over_http_protobuf() {
    exports_every_record_in_order("http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_makes_the_export_fall_behind_then_catch_up_in_order() {
    let rx = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = open(dir.path()).await;
    let exporter = AuditExporter::start(
        &config(&rx.grpc_url(), "grpc", 50),
        &path,
        log.clone(),
        "n",
        None,
    )
    .unwrap();
    for i in 0..10 {
        log.submit(record(i)).unwrap();
    }
    log.flush().await.unwrap();
    assert_eq!(
        seqs(&wait_for(&rx, 10, Duration::from_secs(10)).await).len(),
        10
    );

    rx.stop().await;
    for i in 10..70 {
        log.submit(record(i)).unwrap();
    }
    log.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = exporter.status();
    assert_eq!(status.backlog, 60, "{status:?}");
    assert!(status.failed > 0, "{status:?}");
    assert!(status.over_bound, "60 waiting is past the bound of 50");
    assert!(exporter.over_bound());
    assert!(status.stalled, "no progress for over a second: {status:?}");
    assert!(status.lag_seconds > 1.0, "{status:?}");
    // The audit log holds everything meanwhile.
    assert_eq!(log.stats().last_seq, 70);

    rx.restart().await;
    let logs = dedupe(&wait_for(&rx, 70, Duration::from_secs(20)).await);
    assert_eq!(seqs(&logs), (1..=70).collect::<Vec<_>>());
    let status = settled(&exporter).await;
    assert_eq!(status.backlog, 0, "{status:?}");
    assert!(!status.over_bound && !status.stalled, "{status:?}");
    exporter.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_collector_loses_nothing_and_a_restarted_exporter_resumes_at_its_cursor() {
    let rx = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = open(dir.path()).await;
    let cfg = config(&rx.http_url(), "http/protobuf", 1000);
    let exporter = AuditExporter::start(&cfg, &path, log.clone(), "n", None).unwrap();
    rx.set_unavailable(true);
    for i in 0..20 {
        log.submit(record(i)).unwrap();
    }
    log.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(rx.logs().is_empty());
    assert!(rx.requests() > 0, "the exporter kept trying");
    rx.set_unavailable(false);
    assert_eq!(
        seqs(&dedupe(&wait_for(&rx, 20, Duration::from_secs(10)).await)),
        (1..=20).collect::<Vec<_>>()
    );
    exporter.shutdown(Duration::from_secs(5)).await;

    // A new exporter (a restarted node) starts after the saved cursor.
    for i in 20..25 {
        log.submit(record(i)).unwrap();
    }
    log.flush().await.unwrap();
    let before = rx.logs().len();
    let exporter = AuditExporter::start(&cfg, &path, log.clone(), "n", None).unwrap();
    let logs = wait_for(&rx, 25, Duration::from_secs(10)).await;
    assert_eq!(
        seqs(&logs[before..]),
        (21..=25).collect::<Vec<_>>(),
        "only what was not yet exported"
    );
    exporter.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_anchors_go_out_and_their_bodies_verify_against_the_node_key() {
    use cellgate_audit::{AnchorKey, Head};
    let rx = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = open(dir.path()).await;
    let key = AnchorKey::from_pkcs8(&AnchorKey::generate_pkcs8().unwrap()).unwrap();
    let (tx, anchors) = tokio::sync::watch::channel(None);
    let exporter = AuditExporter::start(
        &config(&rx.grpc_url(), "grpc", 1000),
        &path,
        log.clone(),
        "n",
        Some(anchors),
    )
    .unwrap();
    for i in 0..3 {
        log.submit(record(i)).unwrap();
    }
    log.flush().await.unwrap();
    let head: Head = log.durable_head();
    let anchor = key.sign("n", &head, std::time::SystemTime::now());
    tx.send(Some(anchor.clone())).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        let found: Vec<ReceivedLog> = rx
            .logs()
            .into_iter()
            .filter(|l| l.event_name == "cellgate.audit.anchor")
            .collect();
        if !found.is_empty() || tokio::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.len(), 1, "one anchor, sent once");
    assert_eq!(got[0].attrs["cellgate.anchor.seq"], "3");
    assert_eq!(got[0].attrs["cellgate.anchor.hash"], head.hash);
    let parsed: cellgate_audit::Anchor = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(parsed, anchor);
    assert!(
        parsed.verify(&key.public_key()),
        "the exported anchor verifies"
    );
    let mut counted = 0;
    for _ in 0..100 {
        counted = exporter.status().anchors;
        if counted == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 1);
    exporter.shutdown(Duration::from_secs(5)).await;
}
