//! `--audit-durability strict` and `--audit-anchor-key`, as an upstream and an auditor see them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use cellgate_audit::AuditLog;
use cellgate_node::config::AuditDurability;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the upstream found when a request arrived: its path, whether the audit file held that
/// request's record then, and whether that record was durable (synced) then.
#[derive(Debug)]
struct Arrival {
    path: String,
    in_file: bool,
    durable: bool,
}

/// A plain HTTP upstream that, as each request arrives and before it answers, looks for the
/// request's record (by its unique path) in the audit file and compares its `seq` with the
/// log's durable head.
async fn auditing_upstream(
    audit: PathBuf,
    log: AuditLog,
) -> (u16, mpsc::UnboundedReceiver<Arrival>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let (tx, audit, log) = (tx.clone(), audit.clone(), log.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split(' ').nth(1).unwrap_or("").to_string();
                // Durable head first: a record it covers is synced.
                let durable_seq = log.durable_head().seq;
                let rec = audit_records(&audit)
                    .into_iter()
                    .find(|r| r["path"] == path.as_str());
                let _ = tx.send(Arrival {
                    path,
                    in_file: rec.is_some(),
                    durable: rec.is_some_and(|r| r["seq"].as_u64().unwrap() <= durable_seq),
                });
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (port, rx)
}

fn plain_cell(name: &str, port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: {name}, namespace: agents}}\nspec:\n  capabilities:\n    - name: plain\n      destinations: [{{host: plain.test, ports: [{port}]}}]\n      http: {{methods: [GET], paths: [\"/public/**\"]}}\n"
    )
}

async fn get(f: &Fixture, cell: &str, port: u16, path: &str) -> Resp {
    let tcp = tagged_connect_port(f, port, cell).await;
    let req = http::Request::builder()
        .uri(path)
        .header("host", format!("plain.test:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    send_h1(tcp, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_forwards_an_allowed_request_only_once_its_record_is_on_disk() {
    let f = Fixture::start_with(|c| c.audit_durability = AuditDurability::Strict).await;
    let (port, mut arrivals) =
        auditing_upstream(f.audit.clone(), f.node().shared.audit.clone()).await;
    install_cell(&f, "strict", &plain_cell("strict", port)).await;
    let syncs_before = f.node().shared.audit.stats().durable_syncs;

    // 32 requests, 16 at a time: they share group commits.
    const N: usize = 32;
    let f = std::sync::Arc::new(f);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..N).step_by(16) {
                let r = get(&f, "strict", port, &format!("/public/strict-{i}")).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen = Vec::new();
    while let Ok(a) = arrivals.try_recv() {
        seen.push(a);
    }
    assert_eq!(seen.len(), N, "{seen:?}");
    for a in &seen {
        assert!(
            a.in_file && a.durable,
            "the upstream saw {} before its record was durable: {a:?}",
            a.path
        );
    }
    // Each record is an allow, written once.
    let recs = f.audit_records();
    for i in 0..N {
        let path = format!("/public/strict-{i}");
        let mine: Vec<_> = recs.iter().filter(|r| r["path"] == path.as_str()).collect();
        assert_eq!(mine.len(), 1, "{path}");
        assert_eq!(mine[0]["decision"], "allow");
    }
    // Durability came from syncs made for waiters, at most one per request.
    let syncs = f.node().shared.audit.stats().durable_syncs - syncs_before;
    assert!(
        (1..=N as u64).contains(&syncs),
        "{syncs} syncs for {N} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_still_forwards_and_records_every_allow() {
    // Relaxed makes no promise about the moment the upstream sees the request; only that the
    // request goes on and its record follows.
    let f = Fixture::start().await;
    assert_eq!(
        f.node().shared.config.audit_durability,
        AuditDurability::Relaxed
    );
    let (port, mut arrivals) =
        auditing_upstream(f.audit.clone(), f.node().shared.audit.clone()).await;
    install_cell(&f, "relaxed", &plain_cell("relaxed", port)).await;
    let r = get(&f, "relaxed", port, "/public/relaxed-1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(arrivals.recv().await.unwrap().path, "/public/relaxed-1");
    let rec = f.wait_audit(|r| r["path"] == "/public/relaxed-1").await;
    assert_eq!(rec["decision"], "allow");
}

fn write_anchor_key(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let out = dir.join("anchor-keys");
    let key = cellgate_identity::SigningKey::generate().unwrap();
    key.write_pair(&out).unwrap();
    (out.join("signing.key"), out.join("signing.pub"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_anchors_the_head_at_the_interval_and_at_shutdown() {
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = write_anchor_key(keys.path());
    let mut f = Fixture::start_with(|c| {
        c.audit_anchor_key = Some(private.clone());
        c.audit_anchor_interval = Duration::from_secs(1);
    })
    .await;
    let anchors = cellgate_audit::anchors_path(&f.audit);
    let anchorer = f.node().shared.anchorer.clone().expect("an anchorer");
    let mut rx = anchorer.subscribe();
    let r = f.http_get("plain.test", "/public/one").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The timer anchors the record once it is durable (relaxed: within the sync interval).
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            rx.changed().await.unwrap();
            if let Some(a) = rx.borrow_and_update().clone() {
                return a;
            }
        }
    })
    .await
    .expect("an anchor within 5 s");
    assert!(first.seq >= 1);
    assert_eq!(first.node, "test-node");
    assert_eq!(first.key_id, anchorer.key_id());

    // More traffic, then shutdown: the last anchor names the last record.
    for i in 0..3 {
        let r = f.http_get("plain.test", &format!("/public/more-{i}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = f.http_get("plain.test", "/private/no").await;
    assert_eq!(r.status, 403, "{}", r.body);
    f.node.take().unwrap().shutdown().await;
    let records = audit_records(&f.audit);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&anchors)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["seq"].as_u64().unwrap(), records.len() as u64);
    assert_eq!(last["hash"], records.last().unwrap()["hash"]);

    let key = cellgate_audit::AnchorPublicKey::load(&public).unwrap();
    let report = cellgate_audit::verify_anchored(&f.audit, &anchors, &key).unwrap();
    assert_eq!(report.last_anchored, records.len() as u64);
    assert_eq!(report.anchors, lines.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_anchor_key_keeps_the_node_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.key");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    for key in [bad, dir.path().join("missing.key")] {
        let mut config = cellgate_node::NodeConfig::defaults();
        let keys = cellgate_identity::SigningKey::generate().unwrap();
        let keydir = dir.path().join(format!("trust-{}", keys.kid()));
        keys.write_pair(&keydir).unwrap();
        config.trust = vec![keydir.join("signing.pub")];
        config.audit = dir.path().join(format!("audit-{}.jsonl", keys.kid()));
        config.state_dir = Some(dir.path().join(format!("state-{}", keys.kid())));
        config.audit_anchor_key = Some(key.clone());
        let err = cellgate_node::run(config).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--audit-anchor-key") && msg.contains(key.to_str().unwrap()),
            "{msg}"
        );
    }
}
