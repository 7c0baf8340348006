//! Appends a fixed number of typical records and exits: a fixed amount of work to count
//! instructions on, which the time-based benches on a shared machine cannot give.
//!
//! ```text
//! cargo build --release -p cellgate-audit --example append_count
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out target/release/examples/append_count 20000
//! callgrind_annotate /tmp/cg.out | head -30     # total, and cellgate_audit::chain::seal inclusive
//! ```

use cellgate_audit::{AuditLog, AuditOptions};

#[path = "../benches/support/record.rs"]
mod support;
use support::record;

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
