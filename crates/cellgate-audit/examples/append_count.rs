//! Appends a fixed number of typical records and exits: a fixed amount of work to count
//! instructions on, which the time-based benches on a shared machine cannot give.
//!
//! ```text
//! cargo build --release -p cellgate-audit --example append_count
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out target/release/examples/append_count 20000
//! callgrind_annotate /tmp/cg.out | head -30     # total, and cellgate_audit::chain::seal inclusive
//! ```

use cellgate_audit::{AuditLog, AuditOptions, Decision, Record};

fn record(i: u64) -> Record {
    let mut r = Record::new(
        "node-a",
        "intake",
        "https",
        Decision::Allow,
        "capability_granted",
    );
    r.cell = Some("researcher".into());
    r.namespace = Some("agents".into());
    r.token_id = Some("0b6f0f3e-1c7d-4a53-9d2e-6c1f4b7a9e10".into());
    r.source = Some("10.244.1.17:41822".into());
    r.destination = Some("140.82.112.3:443".into());
    r.method = Some("GET".into());
    r.host = Some("api.github.com".into());
    r.path = Some(format!("/repos/cellgate/cellgate/issues/{i}"));
    r.capability = Some("github-read".into());
    r.policy_version = Some("sha256:5f1d".into());
    r.budget = Some(serde_json::json!({"requests": {"used": i, "limit": 1_000_000}}));
    r.latency_us = Some(87);
    r.request_id = Some(format!("req-{i}"));
    r
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let (log, writer) =
            AuditLog::open(dir.path().join("audit.jsonl"), AuditOptions::default()).await?;
        for i in 0..n {
            while log.submit(record(i)).is_err() {
                log.flush().await?;
            }
        }
        log.close().await?;
        drop(writer);
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    println!("{n} records");
    Ok(())
}
