//! Webhook alerts, delivered to a real HTTP receiver on 127.0.0.1 that checks the HMAC of
//! every body it gets: alerts derived from records submitted to a real audit log, and through a
//! running node (denial bursts, budgets, the backlog call, a hung receiver while requests flow).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cellgate_audit::{AuditLog, Decision, Record};
use cellgate_node::alerts::{Alerts, AlertsConfig, SigningKey};
use cellgate_node::metrics::{AlertLabels, AlertMetrics, SinkLabels};
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const KEY: &str = "test-hmac-key-0123456789";

/// What the receiver does with each request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// 200.
    Accept,
    /// 503 for the first `n` requests, then 200.
    FailFirst(usize),
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
struct Got {
    event: String,
    delivery: String,
    signature_ok: bool,
    signed: bool,
    body: serde_json::Value,
}

struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let seen = got.clone();
        let key = SigningKey::new(KEY.as_bytes());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (seen, key) = (seen.clone(), key.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, key) = (seen.clone(), key.clone());
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let (event, delivery, sig) = (
                                h("x-cellgate-event"),
                                h("x-cellgate-delivery"),
                                h("x-cellgate-signature"),
                            );
                            assert_eq!(req.method(), http::Method::POST);
                            assert_eq!(h("content-type"), "application/json");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let n = {
                                let mut g = seen.lock().unwrap();
                                g.push(Got {
                                    event,
                                    delivery,
                                    signature_ok: sig == key.sign(&body),
                                    signed: !sig.is_empty(),
                                    body: serde_json::from_slice(&body).unwrap(),
                                });
                                g.len()
                            };
                            let status = match mode {
                                Mode::Accept => 200,
                                Mode::FailFirst(k) if n <= k => 503,
                                Mode::FailFirst(_) => 200,
                                Mode::Hang => {
                                    std::future::pending::<()>().await;
                                    200
                                }
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Empty::<Bytes>::new())
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { url, got }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` requests arrived; returns them all.
    async fn wait(&self, n: usize) -> Vec<Got> {
        for _ in 0..250 {
            let g = self.got();
            if g.len() >= n {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("expected {n} deliveries, got {:#?}", self.got());
    }
}

/// An alerts file in `dir` with one sink posting to `url`; `extra` is appended to the sink
/// (indented two spaces) and `tail` to the file.
fn alerts_file(
    dir: &std::path::Path,
    url: &str,
    sink_extra: &str,
    tail: &str,
) -> std::path::PathBuf {
    std::fs::write(dir.join("hmac.key"), format!("{KEY}\n")).unwrap();
    let path = dir.join("alerts.yaml");
    std::fs::write(
        &path,
        format!(
            "sinks:\n  - name: ops\n    url: {url}\n    secretFile: {}\n{sink_extra}{tail}",
            dir.join("hmac.key").display()
        ),
    )
    .unwrap();
    path
}

/// A real audit log in a tempdir with the alerter reading it.
struct Logged {
    _dir: tempfile::TempDir,
    log: AuditLog,
    alerts: Alerts,
    metrics: AlertMetrics,
}

async fn logged(url: &str, sink_extra: &str, tail: &str) -> Logged {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AlertsConfig::load(&alerts_file(dir.path(), url, sink_extra, tail)).unwrap();
    let (log, _writer) = AuditLog::open(dir.path().join("audit.jsonl"), Default::default())
        .await
        .unwrap();
    let alerts = Alerts::default();
    let metrics = AlertMetrics::default();
    alerts.start(cfg, "n1", &metrics, log.subscribe()).unwrap();
    Logged {
        _dir: dir,
        log,
        alerts,
        metrics,
    }
}

fn record(cell: &str, decision: Decision, reason: &str) -> Record {
    let mut r = Record::new("n1", "intake", "https", decision, reason);
    r.cell = Some(cell.into());
    r.namespace = Some("agents".into());
    r
}

fn sent(m: &AlertMetrics, event: &str) -> u64 {
    m.sent
        .get_or_create(&AlertLabels {
            sink: "ops".into(),
            event: event.into(),
        })
        .get()
}

fn sink_count(
    f: &prometheus_client::metrics::family::Family<
        SinkLabels,
        prometheus_client::metrics::counter::Counter,
    >,
) -> u64 {
    f.get_or_create(&SinkLabels { sink: "ops".into() }).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_burst_over_the_rate_raises_one_alert_for_that_cell_only() {
    let rx = Receiver::start(Mode::Accept).await;
    let l = logged(&rx.url, "", "denialRate: {perCell: 5, window: 60s}\n").await;
    for _ in 0..12 {
        l.log
            .submit(record("noisy", Decision::Deny, "no_capability"))
            .unwrap();
    }
    for _ in 0..5 {
        l.log
            .submit(record("quiet", Decision::Deny, "no_capability"))
            .unwrap();
    }
    l.log
        .submit(record("quiet", Decision::Allow, "allowed"))
        .unwrap();
    l.log.flush().await.unwrap();
    let got = rx.wait(1).await;
    // Nothing else comes: the rest of the burst and the quiet cell raise nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let got_after = rx.got();
    assert_eq!(got_after.len(), 1, "{got_after:#?}");
    let a = &got[0];
    assert!(a.signature_ok, "HMAC of the body checks");
    assert_eq!(a.event, "denial_rate");
    assert_eq!(a.body["event"], "denial_rate");
    assert_eq!(a.body["cell"], "noisy");
    assert_eq!(a.body["namespace"], "agents");
    assert_eq!(a.body["node"], "n1");
    assert_eq!(a.body["count"], 6);
    assert_eq!(a.body["threshold"], 5);
    assert_eq!(a.body["window_seconds"], 60);
    assert_eq!(a.body["reason"], "no_capability");
    assert_eq!(a.body["delivery"], a.delivery.as_str());
    assert!(a.body["seq"].as_u64().unwrap() >= 6, "{}", a.body);
    assert_eq!(sent(&l.metrics, "denial_rate"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_approval_and_lockdown_records_raise_their_events() {
    let rx = Receiver::start(Mode::Accept).await;
    let l = logged(&rx.url, "", "").await;
    let mut budget = record("a", Decision::Deny, "budget_exhausted");
    budget.capability = Some("windowed".into());
    budget.reasons =
        vec!["the capability's budget requestsPerWindow of windowed is used up (3 of 3)".into()];
    l.log.submit(budget.clone()).unwrap();
    l.log.submit(budget).unwrap(); // within the cooldown: no second alert
    let mut approval = record("a", Decision::Approval, "approval_requested");
    approval.reasons = vec![
        "approval ap-1 requested (hold mode, 30s)".into(),
        "approval_id=ap-1".into(),
    ];
    l.log.submit(approval).unwrap();
    let mut lock = Record::new("n1", "admin", "control", Decision::Control, "lockdown_on");
    lock.reasons = vec![
        "lockdown on for every cell on the node".into(),
        "incident 7".into(),
    ];
    l.log.submit(lock).unwrap();
    l.log.flush().await.unwrap();
    let got = rx.wait(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_all = rx.got();
    assert_eq!(got_all.len(), 3, "{got_all:#?}");
    let by = |e: &str| {
        got.iter()
            .find(|g| g.event == e)
            .unwrap_or_else(|| panic!("no {e}: {got:#?}"))
    };
    let b = by("budget_exhausted");
    assert_eq!(b.body["capability"], "windowed");
    assert!(b.body["detail"].as_str().unwrap().contains("used up"));
    let a = by("approval_waiting");
    assert!(a.body["detail"]
        .as_str()
        .unwrap()
        .contains("approval_id=ap-1"));
    let k = by("lockdown");
    assert_eq!(k.body["reason"], "lockdown_on");
    assert!(k.body["detail"].as_str().unwrap().contains("incident 7"));
    assert!(k.body.get("cell").is_none());
    assert!(got.iter().all(|g| g.signature_ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_twice_gets_the_same_delivery_three_times_and_the_alert_once() {
    let rx = Receiver::start(Mode::FailFirst(2)).await;
    let l = logged(
        &rx.url,
        "",
        "retry: {attempts: 4, backoffBase: 20ms, backoffMax: 100ms, timeout: 2s}\n",
    )
    .await;
    l.log
        .submit(record("a", Decision::Control, "lockdown_off"))
        .unwrap();
    l.log.flush().await.unwrap();
    rx.wait(3).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let got = {
        let all = rx.got();
        assert_eq!(
            all.len(),
            3,
            "delivered on the third attempt, then no more: {all:#?}"
        );
        all
    };
    assert!(got
        .iter()
        .all(|g| g.delivery == got[0].delivery && g.signature_ok));
    assert!(
        got.iter().all(|g| g.body == got[0].body),
        "the same body each time"
    );
    assert_eq!(sent(&l.metrics, "lockdown"), 1);
    assert_eq!(sink_count(&l.metrics.failed), 0);
    assert_eq!(sink_count(&l.metrics.dropped), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_refusing_every_attempt_is_given_up_and_counted() {
    let rx = Receiver::start(Mode::FailFirst(usize::MAX)).await;
    let l = logged(
        &rx.url,
        "",
        "retry: {attempts: 3, backoffBase: 10ms, backoffMax: 20ms}\n",
    )
    .await;
    l.log
        .submit(record("a", Decision::Control, "lockdown_on"))
        .unwrap();
    l.log.flush().await.unwrap();
    for _ in 0..250 {
        if sink_count(&l.metrics.failed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink_count(&l.metrics.failed), 1);
    assert_eq!(rx.got().len(), 3, "attempts are bounded");
    assert_eq!(sent(&l.metrics, "lockdown"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_format_is_one_text_line_signed_when_keyed() {
    let rx = Receiver::start(Mode::Accept).await;
    let l = logged(&rx.url, "    format: slack\n", "").await;
    let mut lock = Record::new("n1", "admin", "control", Decision::Control, "lockdown_on");
    lock.namespace = Some("agents".into());
    lock.reasons = vec![
        "lockdown on for namespace agents".into(),
        "incident 9".into(),
    ];
    l.log.submit(lock).unwrap();
    l.log.flush().await.unwrap();
    let got = rx.wait(1).await;
    let text = got[0].body["text"].as_str().unwrap();
    assert_eq!(
        got[0].body.as_object().unwrap().len(),
        1,
        "only text: {}",
        got[0].body
    );
    assert!(
        text.starts_with("[cellgate] lockdown on node n1, namespace agents: lockdown on for namespace agents; incident 9"),
        "{text}"
    );
    assert!(got[0].signed && got[0].signature_ok);
    assert_eq!(got[0].event, "lockdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alerter_that_falls_behind_says_how_many_records_it_skipped() {
    let rx = Receiver::start(Mode::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AlertsConfig::load(&alerts_file(
        dir.path(),
        &rx.url,
        "    events: [lockdown]\n",
        "",
    ))
    .unwrap();
    // A stream of capacity 2 that 10 records have already passed.
    let (tx, records) = tokio::sync::broadcast::channel(2);
    for _ in 0..10 {
        tx.send(Arc::new(record("a", Decision::Deny, "no_capability")))
            .unwrap();
    }
    let metrics = AlertMetrics::default();
    Alerts::default()
        .start(cfg, "n1", &metrics, records)
        .unwrap();
    let got = rx.wait(1).await;
    assert_eq!(
        got[0].event, "records_skipped",
        "sent even to a sink that did not list it"
    );
    assert_eq!(got[0].body["count"], 8);
    assert!(got[0].signature_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_backlog_is_rate_limited() {
    let rx = Receiver::start(Mode::Accept).await;
    let l = logged(&rx.url, "", "cooldown: 1h\n").await;
    for i in 0..100 {
        l.alerts.audit_backlog(5000 + i, 42.5);
    }
    let got = rx.wait(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.got().len(), 1);
    assert_eq!(got[0].event, "audit_backlog");
    assert_eq!(got[0].body["count"], 5000);
    assert_eq!(got[0].body["lag_seconds"], 42.5);
}

// ---- through a running node ----

/// One plain request through the node as `cell`.
async fn plain_as(f: &Fixture, cell: &str, path: &str) -> Resp {
    let tcp = f.connect(f.http.addr.port(), &f.token(cell)).await;
    let req = http::Request::builder()
        .uri(path)
        .header("host", format!("plain.test:{}", f.http.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    send_h1(tcp, req).await
}

/// A node started with an alerts file (in the returned directory) posting to `url`.
async fn node_with_alerts(url: &str, sink_extra: &str, tail: &str) -> (Fixture, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = alerts_file(dir.path(), url, sink_extra, tail);
    (Fixture::start_with(|c| c.alerts = Some(path)).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_alerts_on_a_denial_burst_a_budget_and_the_backlog() {
    let rx = Receiver::start(Mode::Accept).await;
    let (f, _alerts) =
        node_with_alerts(&rx.url, "", "denialRate: {perCell: 4, window: 60s}\n").await;
    install_cell(&f, "gov", &governed_cell("gov", f.https.addr.port(), false)).await;
    for _ in 0..6 {
        assert_eq!(plain_as(&f, "demo", "/private").await.status, 403);
    }
    for _ in 0..2 {
        assert_eq!(plain_as(&f, "other", "/private").await.status, 403);
    }
    // The budgeted capability allows 2 a minute: the third is refused and alerted.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let tls = f.tls("api.test", &f.token("gov"), &[b"http/1.1"]).await;
        let req = http::Request::get("/v1/budget/x")
            .header("host", format!("api.test:{}", f.https.addr.port()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        statuses.push(send_h1(tls, req).await.status);
    }
    assert_eq!(statuses, [200, 200, 429]);
    // What the OTLP exporter reports when its backlog passes its threshold.
    f.node().shared.alerts.audit_backlog(12_000, 31.0);
    f.node().shared.alerts.audit_backlog(13_000, 32.0);
    rx.wait(3).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let got_all = rx.got();
    let events: Vec<&str> = got_all.iter().map(|g| g.event.as_str()).collect();
    assert_eq!(got_all.len(), 3, "{events:?}");
    assert!(got_all.iter().all(|g| g.signature_ok));
    let rate = got_all
        .iter()
        .find(|g| g.event == "denial_rate")
        .expect("denial_rate");
    assert_eq!(rate.body["cell"], "demo");
    assert_eq!(rate.body["node"], "test-node");
    assert_eq!(rate.body["reason"], "http_rule_mismatch");
    let budget = got_all
        .iter()
        .find(|g| g.event == "budget_exhausted")
        .expect("budget_exhausted");
    assert_eq!(budget.body["cell"], "gov");
    assert_eq!(budget.body["capability"], "budgeted");
    let backlog = got_all
        .iter()
        .find(|g| g.event == "audit_backlog")
        .expect("audit_backlog");
    assert_eq!(backlog.body["count"], 12_000);
    // The record behind an alert is in the audit log under its seq.
    let seq = rate.body["seq"].as_u64().unwrap();
    let rec = f.wait_audit(|r| r["seq"] == seq).await;
    assert_eq!(rec["cell"], "demo");
    assert_eq!(rec["decision"], "deny");
    let metrics = f.admin_get("/metrics").await.body;
    for line in [
        r#"cellgate_alerts_sent_total{sink="ops",event="denial_rate"} 1"#,
        r#"cellgate_alerts_sent_total{sink="ops",event="budget_exhausted"} 1"#,
        r#"cellgate_alerts_sent_total{sink="ops",event="audit_backlog"} 1"#,
        r#"cellgate_alerts_dropped_total{sink="ops"} 0"#,
        r#"cellgate_alerts_failed_total{sink="ops"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_receiver_loses_alerts_not_decisions() {
    let rx = Receiver::start(Mode::Hang).await;
    let (f, _alerts) = node_with_alerts(
        &rx.url,
        "    events: [denial_rate]\n",
        "denialRate: {perCell: 1, window: 60s}\nqueue: {capacity: 1}\nretry: {attempts: 1, timeout: 200ms}\n",
    )
    .await;
    // 30 cells the node does not know, two denials each: 30 denial_rate alerts for a sink that
    // never answers and holds one at a time.
    let started = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        for _ in 0..2 {
            // Refused on admission: the node closes the connection, answering nothing.
            let t = std::time::Instant::now();
            let mut s = f
                .connect(f.http.addr.port(), &f.token(&format!("ghost-{i}")))
                .await;
            let _ = s
                .write_all(b"GET /public/x HTTP/1.1\r\nHost: plain.test\r\n\r\n")
                .await;
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "the node did not close a refused connection");
            assert!(rest.is_empty());
            slowest = slowest.max(t.elapsed());
        }
    }
    let took = started.elapsed();
    let alerts = &f.node().shared.metrics.alerts;
    for _ in 0..250 {
        if sink_count(&alerts.dropped) >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = sink_count(&alerts.dropped);
    assert!(dropped >= 20, "dropped {dropped}");
    // Every decision is in the audit log.
    let _ = f.node().shared.audit.flush().await;
    let ghosts = f
        .audit_records()
        .into_iter()
        .filter(|r| {
            r["reason"] == "cell_unknown"
                && r["cell"].as_str().is_some_and(|c| c.starts_with("ghost-"))
        })
        .count();
    assert_eq!(ghosts, 60);
    // The receiver holds connections open; nothing on the data path waited for it.
    assert!(
        slowest < Duration::from_secs(2),
        "slowest request {slowest:?} (all: {took:?})"
    );
    let metrics = f.admin_get("/metrics").await.body;
    let scraped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"cellgate_alerts_dropped_total{sink="ops"} "#))
        .unwrap_or_else(|| panic!("no dropped counter in:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(scraped >= dropped, "{scraped} < {dropped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_alerts_file_stops_the_node() {
    let f = Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (text, wanted) in [
        ("sinks:\n  - name: ops\n    url: http://127.0.0.1:9/\n    secretFile: /nonexistent\n    retries: 3\n", "unknown field `retries`"),
        ("sinks:\n  - name: ops\n    url: http://127.0.0.1:9/\n", "secretFile: required for format json"),
        ("sinks:\n  - name: ops\n    url: file:///etc/passwd\n    format: slack\n", "sinks[0].url"),
    ] {
        let path = dir.path().join("alerts.yaml");
        std::fs::write(&path, text).unwrap();
        let mut config = f.node().shared.config.clone();
        config.alerts = Some(path);
        let e = format!("{:#}", cellgate_node::run(config).await.unwrap_err());
        assert!(e.contains("--alerts") && e.contains(wanted), "{e}");
    }
}
