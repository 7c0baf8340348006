//! The writer and the verifier together: logs written through `AuditLog`, then tampered with
//! on disk the way an intruder would, then verified.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cellgate_audit::{
    head_path, verify_path, AuditError, AuditLog, AuditOptions, Decision, Fault, Record,
    VerifyError, ZERO_HASH,
};

fn rec(id: impl std::fmt::Display) -> Record {
    let mut r = Record::new(
        "node-a",
        "intake",
        "https",
        Decision::Allow,
        "capability_granted",
    );
    r.cell = Some("researcher".into());
    r.namespace = Some("agents".into());
    r.token_id = Some("jti-1".into());
    r.source = Some("10.0.0.7:41000".into());
    r.destination = Some("140.82.112.3:443".into());
    r.method = Some("GET".into());
    r.host = Some("api.github.com".into());
    r.path = Some(format!("/repos/{id}"));
    r.capability = Some("github-read".into());
    r.reasons = vec!["matched host api.github.com".into()];
    r.policy_version = Some("v42".into());
    r.budget = Some(serde_json::json!({"requests": {"used": 3, "limit": 100}}));
    r.latency_us = Some(120);
    r.request_id = Some(format!("req-{id}"));
    r
}

fn quiet() -> AuditOptions {
    AuditOptions {
        // Only explicit flushes and durable submissions sync, so tests control the head.
        sync_interval: Duration::from_secs(3600),
        ..AuditOptions::default()
    }
}

/// A queue of `capacity` and a writer that lingers a minute: once it has taken what woke it, it
/// takes nothing more until something urgent (a durable submission, a flush, a close) comes.
fn lingering(capacity: usize) -> AuditOptions {
    AuditOptions {
        queue_capacity: capacity,
        linger: Duration::from_secs(60),
        ..quiet()
    }
}

/// Waits (at most 5 s) until the writer has taken everything queued.
async fn writer_took_everything(log: &AuditLog) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.stats().queue_depth > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never woke"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes `n` records through the log and closes it.
async fn write_log(path: &Path, n: u32) {
    let (log, writer) = AuditLog::open(path, quiet()).await.unwrap();
    for i in 1..=n {
        if i % 7 == 0 {
            log.submit_durable(rec(i)).await.unwrap();
        } else {
            log.submit(rec(i)).unwrap();
        }
    }
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .split_inclusive('\n')
        .map(str::to_owned)
        .collect()
}

fn fault_at(path: &Path) -> (Fault, u64, u64) {
    let err = verify_path(path).unwrap_err();
    let (seq, line) = err
        .position()
        .unwrap_or_else(|| panic!("no position: {err}"));
    (err.fault().unwrap(), seq, line)
}

/// Copies the log and its head into a fresh directory so each tamper starts from the original.
fn copy_log(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst).unwrap();
    fs::copy(head_path(src), head_path(&dst)).unwrap();
    dst
}

#[tokio::test]
async fn a_chain_of_1000_records_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, 1000).await;
    let report = verify_path(&path).unwrap();
    assert_eq!(report.records, 1000);
    let head = report.head.unwrap();
    assert_eq!((head.seq, head.hash), (1000, report.last_hash));
    let all = lines(&path);
    assert_eq!(all.len(), 1000);
    let first: Record = serde_json::from_str(&all[0]).unwrap();
    assert_eq!((first.seq, first.prev.as_str()), (1, ZERO_HASH));
    assert_eq!(first.request_id.as_deref(), Some("req-1"));
}

#[tokio::test]
async fn each_tamper_is_named_at_the_right_record() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("audit.jsonl");
    write_log(&original, 10).await;
    let orig = lines(&original);

    // Modify a field of record 5, same length, bytes edited in place.
    let p = copy_log(&original, dir.path(), "modified.jsonl");
    let mut bytes = fs::read(&p).unwrap();
    let offset: usize = orig[..4].iter().map(String::len).sum();
    let at = offset + orig[4].find("/repos/5").unwrap() + "/repos/".len();
    bytes[at] = b'9';
    fs::write(&p, bytes).unwrap();
    assert_eq!(fault_at(&p), (Fault::Modified, 5, 5));
    assert_eq!(
        verify_path(&p).unwrap_err().to_string(),
        "record 5 (line 5): modified: hash does not match its content"
    );

    // Change the decision of record 3 from allow to deny.
    let p = copy_log(&original, dir.path(), "decision.jsonl");
    let mut edited = orig.clone();
    edited[2] = edited[2].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    fs::write(&p, edited.concat()).unwrap();
    assert_eq!(fault_at(&p), (Fault::Modified, 3, 3));

    // Delete record 4.
    let p = copy_log(&original, dir.path(), "deleted.jsonl");
    let mut edited = orig.clone();
    edited.remove(3);
    fs::write(&p, edited.concat()).unwrap();
    assert_eq!(fault_at(&p), (Fault::Deleted, 5, 4));

    // Swap records 6 and 7.
    let p = copy_log(&original, dir.path(), "swapped.jsonl");
    let mut edited = orig.clone();
    edited.swap(5, 6);
    fs::write(&p, edited.concat()).unwrap();
    assert_eq!(fault_at(&p), (Fault::Reordered, 7, 6));

    // Truncate in the middle of the last record.
    let p = copy_log(&original, dir.path(), "cut.jsonl");
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 40).unwrap();
    drop(f);
    assert_eq!(fault_at(&p), (Fault::Truncated, 10, 10));

    // Truncate in the middle of record 8 (dropping 9 and 10 as well).
    let p = copy_log(&original, dir.path(), "cut8.jsonl");
    let keep: usize = orig[..7].iter().map(String::len).sum::<usize>() + 20;
    fs::write(&p, &orig.concat().as_bytes()[..keep]).unwrap();
    assert_eq!(fault_at(&p), (Fault::Truncated, 8, 8));

    // Drop the last three records cleanly, at a line boundary: only the head notices.
    let p = copy_log(&original, dir.path(), "dropped.jsonl");
    fs::write(&p, orig[..7].concat()).unwrap();
    assert_eq!(fault_at(&p), (Fault::Truncated, 8, 8));
    fs::remove_file(head_path(&p)).unwrap();
    assert_eq!(verify_path(&p).unwrap().records, 7);

    // A line that is not a record.
    let p = copy_log(&original, dir.path(), "malformed.jsonl");
    let mut edited = orig.clone();
    edited.insert(2, "{\"hello\":1}\n".into());
    fs::write(&p, edited.concat()).unwrap();
    assert_eq!(fault_at(&p), (Fault::Malformed, 3, 3));
}

#[tokio::test]
async fn reopening_resumes_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, 5).await;
    let (log, writer) = AuditLog::open(&path, quiet()).await.unwrap();
    assert_eq!(log.stats().last_seq, 5);
    let mut events = log.subscribe();
    log.submit(rec("after")).unwrap();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    let sixth = events.recv().await.unwrap();
    let all = lines(&path);
    let fifth: Record = serde_json::from_str(&all[4]).unwrap();
    assert_eq!((sixth.seq, &sixth.prev), (6, &fifth.hash));
    assert_eq!(verify_path(&path).unwrap().records, 6);
    // Once more with nothing written: the file is unchanged and still verifies.
    write_log(&path, 0).await;
    assert_eq!(verify_path(&path).unwrap().records, 6);
}

#[tokio::test]
async fn open_refuses_a_tampered_log_and_a_locked_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, 4).await;
    let mut edited = lines(&path);
    edited.swap(1, 2);
    fs::write(&path, edited.concat()).unwrap();
    let err = AuditLog::open(&path, quiet()).await.unwrap_err();
    match &err {
        AuditError::Broken { source, .. } => {
            assert_eq!(source.fault(), Some(Fault::Reordered));
            assert_eq!(source.position(), Some((3, 2)));
        }
        other => panic!("expected Broken, got {other}"),
    }
    assert!(
        err.to_string().contains("record 3 (line 2): reordered"),
        "{err}"
    );

    let other = dir.path().join("other.jsonl");
    let (log, _writer) = AuditLog::open(&other, quiet()).await.unwrap();
    let err = AuditLog::open(&other, quiet()).await.unwrap_err();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
    log.close().await.unwrap();
    // Released once the writer is done.
    let (log, _writer) = AuditLog::open(&other, quiet()).await.unwrap();
    log.close().await.unwrap();
}

#[tokio::test]
async fn submit_durable_returns_after_the_record_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, quiet()).await.unwrap();
    for i in 0..20 {
        log.submit(rec(format!("plain-{i}"))).unwrap();
        let mut denial = rec(format!("deny-{i}"));
        denial.decision = Decision::Deny;
        denial.reason = "no_capability".into();
        log.submit_durable(denial).await.unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("\"req-deny-{i}\"")),
            "denial {i} not in the file"
        );
        assert!(
            text.contains(&format!("\"req-plain-{i}\"")),
            "chain order kept"
        );
    }
    let stats = log.stats();
    assert_eq!(stats.written, 40);
    assert!(stats.durable_syncs >= 20, "{stats:?}");
    log.flush().await.unwrap();
    let head = cellgate_audit::read_head(&head_path(&path))
        .unwrap()
        .unwrap();
    assert_eq!(head.seq, 40);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(verify_path(&path).unwrap().records, 40);
}

/// Each round first queues one record and waits until the writer has taken it: the writer then
/// lingers (a minute) and takes nothing more until the flush ends the linger, so of the next 50
/// submissions a queue of 4 accepts 4 and refuses the rest (5 if the writer's last look at the
/// queue raced with the first of them).
#[tokio::test]
async fn overflow_is_reported_and_accepted_records_are_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, lingering(4)).await.unwrap();
    let mut accepted = Vec::new();
    let mut overflowed = 0_u64;
    for round in 0..5 {
        let id = format!("{round}-first");
        log.submit(rec(&id)).unwrap();
        accepted.push(format!("req-{id}"));
        writer_took_everything(&log).await;
        let before = accepted.len();
        for i in 0..50 {
            let id = format!("{round}-{i}");
            match log.submit(rec(&id)) {
                Ok(()) => accepted.push(format!("req-{id}")),
                Err(AuditError::Overflow { capacity: 4 }) => overflowed += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        let in_round = accepted.len() - before;
        assert!((4..=5).contains(&in_round), "{in_round} accepted");
        assert!(log.stats().queue_depth <= 4);
        // Ends the linger; the writer drains the queue.
        log.flush().await.unwrap();
    }
    assert_eq!(accepted.len() as u64 + overflowed, 5 * 51);
    assert_eq!(log.stats().overflows, overflowed);
    let n = accepted.len();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(verify_path(&path).unwrap().records, n as u64);
    let written: Vec<String> = lines(&path)
        .iter()
        .map(|l| {
            serde_json::from_str::<Record>(l)
                .unwrap()
                .request_id
                .unwrap()
        })
        .collect();
    assert_eq!(written, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submitters_produce_a_valid_chain() {
    const TASKS: u32 = 32;
    const EACH: u32 = 100;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let options = AuditOptions {
        queue_capacity: 64,
        sync_interval: Duration::from_millis(5),
        ..AuditOptions::default()
    };
    let (log, writer) = AuditLog::open(&path, options).await.unwrap();
    let mut events = log.subscribe();
    let collector = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while let Ok(r) = events.recv().await {
            seqs.push(r.seq);
        }
        seqs
    });
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let r = rec(format!("{t}-{i}"));
                if i % 5 == 0 {
                    log.submit_durable(r).await.unwrap();
                } else {
                    loop {
                        match log.submit(r.clone()) {
                            Ok(()) => break,
                            Err(AuditError::Overflow { .. }) => {
                                tokio::time::sleep(Duration::from_micros(200)).await;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    let report = verify_path(&path).unwrap();
    assert_eq!(report.records, u64::from(TASKS * EACH));
    let ids: HashSet<String> = lines(&path)
        .iter()
        .map(|l| {
            serde_json::from_str::<Record>(l)
                .unwrap()
                .request_id
                .unwrap()
        })
        .collect();
    assert_eq!(ids.len(), (TASKS * EACH) as usize);
    // Subscribers see every record, in chain order (the capacity is larger than the test).
    let seqs = collector.await.unwrap();
    assert_eq!(seqs, (1..=u64::from(TASKS * EACH)).collect::<Vec<_>>());
}

#[tokio::test]
async fn subscribers_get_sealed_records_and_plain_records_get_synced_periodically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let options = AuditOptions {
        sync_interval: Duration::from_millis(20),
        ..AuditOptions::default()
    };
    let (log, writer) = AuditLog::open(&path, options).await.unwrap();
    let mut events = log.subscribe();
    log.submit(rec(1)).unwrap();
    log.submit(rec(2)).unwrap();
    let first: Arc<Record> = events.recv().await.unwrap();
    let second = events.recv().await.unwrap();
    assert_eq!((first.seq, first.prev.as_str()), (1, ZERO_HASH));
    assert_eq!((second.seq, &second.prev), (2, &first.hash));
    // No durable submission: the periodic sync still moves the head.
    let mut waited = Duration::ZERO;
    loop {
        if let Ok(Some(head)) = cellgate_audit::read_head(&head_path(&path)) {
            if head.seq == 2 {
                assert_eq!(head.hash, second.hash);
                break;
            }
        }
        assert!(
            waited < Duration::from_secs(5),
            "head never reached record 2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    assert!(log.stats().syncs >= 1);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert!(matches!(log_after_close(&path).await, AuditError::Closed));
}

async fn log_after_close(path: &Path) -> AuditError {
    let (log, writer) = AuditLog::open(path, quiet()).await.unwrap();
    let other = log.clone();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    other.submit(rec("late")).unwrap_err()
}

#[tokio::test]
async fn oversized_records_are_clamped_and_still_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, quiet()).await.unwrap();
    let mut big = rec("big");
    big.path = Some("/\u{1}x".repeat(100_000));
    log.submit_durable(big).await.unwrap();
    log.submit(rec("next")).unwrap();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(verify_path(&path).unwrap().records, 2);
    let first: Record = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(
        first.reasons.last().map(String::as_str),
        Some(cellgate_audit::CLAMPED_REASON)
    );
}

/// The verifier printed in the crate docs, run with Python on logs the writer produced.
#[tokio::test]
async fn the_documented_python_verifier_agrees() {
    let lib = include_str!("../src/lib.rs");
    let script: String = lib
        .lines()
        .skip_while(|l| !l.starts_with("//! ```python"))
        .skip(1)
        .take_while(|l| !l.starts_with("//! ```"))
        .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
        .collect();
    assert!(script.contains("hashlib"), "script not found in the docs");
    let dir = tempfile::tempdir().unwrap();
    let script_path = dir.path().join("verify.py");
    fs::write(&script_path, script).unwrap();
    let run = |log: &Path| {
        Command::new("python3")
            .arg(&script_path)
            .arg(log)
            .output()
            .expect("python3 is part of the development machine")
    };

    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, quiet()).await.unwrap();
    for i in 0..50 {
        let mut r = rec(i);
        // Characters that stress the canonical form: quotes, control bytes, non-ASCII,
        // a line separator, a non-integer budget number.
        r.reasons.push(format!(
            "quote \" back \\ tab \t nul \u{0} é 😀 \u{2028} {i}"
        ));
        r.budget = Some(serde_json::json!({"ratio": 0.5, "z": {"b": 1, "a": [true, null]}}));
        if i % 2 == 0 {
            // Schema 2 fields, with the same stress on their keys and values.
            r.schema = Some(cellgate_audit::SCHEMA_VERSION);
            r.port = Some(443);
            r.sni = Some("api.github.com".into());
            r.headers
                .insert("content-type".into(), "application/json".into());
            r.headers.insert("accept".into(), "é \"x\" \u{1}".into());
            r.withheld = vec!["query".into(), "header:user-agent".into()];
            r.cell_uid = Some("local:agents:researcher".into());
            r.cell_generation = Some(7);
            r.policy_packs = Some([("base".to_string(), "0123abcd".to_string())].into());
        }
        log.submit(r).unwrap();
    }
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    let out = run(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "50 records intact\n");

    let mut edited = lines(&path);
    edited[10] = edited[10].replace("req-10", "req-99");
    fs::write(&path, edited.concat()).unwrap();
    let out = run(&path);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("record 11 (line 11): modified"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = verify_path(&path).unwrap_err();
    assert!(matches!(
        ours,
        VerifyError::Record {
            seq: 11,
            line: 11,
            ..
        }
    ));
}

/// Plain records linger for company: two submissions 50 ms apart go out in one write, after
/// the linger, not before.
#[tokio::test]
async fn plain_records_linger_and_are_written_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let options = AuditOptions {
        linger: Duration::from_millis(400),
        ..quiet()
    };
    let (log, writer) = AuditLog::open(&path, options).await.unwrap();
    let t0 = std::time::Instant::now();
    log.submit(rec(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.submit(rec(2)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let early = log.stats();
    assert_eq!(
        (early.written, early.writes),
        (0, 0),
        "written during the linger"
    );
    while log.stats().written < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    let stats = log.stats();
    assert_eq!((stats.written, stats.writes), (2, 1));
    assert_eq!(lines(&path).len(), 2);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
}

/// A durable submission ends the linger at once: it does not wait behind plain records, and
/// it carries them to disk in the same write, in order.
#[tokio::test]
async fn a_durable_submission_ends_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let options = AuditOptions {
        linger: Duration::from_secs(60),
        ..quiet()
    };
    let (log, writer) = AuditLog::open(&path, options).await.unwrap();
    log.submit(rec(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::time::timeout(Duration::from_secs(5), log.submit_durable(rec(2)))
        .await
        .expect("the durable submission waited for the linger")
        .unwrap();
    let stats = log.stats();
    assert_eq!(
        (stats.written, stats.writes, stats.durable_syncs),
        (2, 1, 1)
    );
    let text = fs::read_to_string(&path).unwrap();
    let first = text.find("/repos/1").unwrap();
    assert!(text.find("/repos/2").unwrap() > first, "{text}");
    // A flush ends it too.
    log.submit(rec(3)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::time::timeout(Duration::from_secs(5), log.flush())
        .await
        .expect("the flush waited for the linger")
        .unwrap();
    assert_eq!(log.stats().written, 3);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
}

/// A durable submission (a denial) or a flush that finds the queue full while the writer lingers
/// does not wait the linger out: the queue empties only once the writer writes.
#[tokio::test]
async fn a_durable_submission_behind_a_full_queue_ends_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, lingering(2)).await.unwrap();
    for round in 0..2 {
        log.submit(rec(format!("{round}-a"))).unwrap();
        writer_took_everything(&log).await;
        // The writer lingers with one record; these two fill the queue.
        log.submit(rec(format!("{round}-b"))).unwrap();
        log.submit(rec(format!("{round}-c"))).unwrap();
        assert!(matches!(
            log.submit(rec("refused")),
            Err(AuditError::Overflow { capacity: 2 })
        ));
        let urgent = async {
            if round == 0 {
                log.submit_durable(rec(format!("{round}-d"))).await
            } else {
                log.flush().await
            }
        };
        tokio::time::timeout(Duration::from_secs(5), urgent)
            .await
            .expect("waited for the linger behind a full queue")
            .unwrap();
    }
    assert_eq!(log.stats().written, 7);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(verify_path(&path).unwrap().records, 7);
}

/// `submit_durable_now` queues at the call: the record is kept even when nobody awaits the
/// returned future, and awaiting it means written and synced.
#[tokio::test]
async fn submit_durable_now_queues_at_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, quiet()).await.unwrap();
    let dropped = log.submit_durable_now(rec(1)).unwrap();
    drop(dropped);
    let synced = log.submit_durable_now(rec(2)).unwrap();
    synced.await.unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("/repos/1") && text.contains("/repos/2"),
        "{text}"
    );
    assert!(log.stats().durable_syncs >= 1);
    let other = log.clone();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert!(matches!(
        other.submit_durable_now(rec(3)).map(|_| ()),
        Err(AuditError::Closed)
    ));
}

#[tokio::test]
async fn a_record_torn_by_a_crash_is_cut_and_the_chain_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, 5).await;
    let complete = fs::read(&path).unwrap();
    // What a crash in the middle of the next batch's `write` leaves: part of a line, after
    // the last sync (so the head anchor still names record 5).
    let mut torn = complete.clone();
    torn.extend_from_slice(b"{\"seq\":6,\"time\":\"2026-");
    fs::write(&path, &torn).unwrap();
    assert!(verify_path(&path).is_err(), "the torn line is not a record");
    let (log, writer) = AuditLog::open(&path, quiet()).await.unwrap();
    assert_eq!(log.stats().last_seq, 5);
    log.submit(rec("after the crash")).unwrap();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(verify_path(&path).unwrap().records, 6);
    assert!(fs::read(&path).unwrap().starts_with(&complete));
    let kept = fs::read_to_string(dir.path().join("audit.jsonl.torn")).unwrap();
    assert_eq!(
        kept, "{\"seq\":6,\"time\":\"2026-\n",
        "the torn bytes are kept aside"
    );

    // A record cut after it was synced (the head names it) is tampering, not a crash: refused,
    // and the file is left exactly as found.
    let synced = fs::read(&path).unwrap();
    let cut = &synced[..synced.len() - 30];
    fs::write(&path, cut).unwrap();
    let err = AuditLog::open(&path, quiet()).await.unwrap_err();
    assert!(matches!(err, AuditError::Broken { .. }), "{err}");
    assert_eq!(fs::read(&path).unwrap(), cut, "the refused log was changed");
}
