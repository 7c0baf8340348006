//! Audit log throughput and durable latency on the filesystem at hand.
//!
//! - `submit_1000_then_flush`: 1000 plain submissions, then one flush (a single group commit
//!   and sync in the best case): the cost of auditing allows.
//! - `submit_durable`: one durable submission, written and synced: what a denial waits for.
//! - `verify_10000`: `verify_path` over 10 000 records (parse, canonicalize, hash).
//! - `durability/relaxed_16x64` and `durability/strict_16x64`: 16 concurrent submitters (as
//!   16 requests in flight on the node) each recording 64 allows one after the other, as
//!   `--audit-durability relaxed` (`submit`: queued) and `strict` (`submit_durable`: written and
//!   synced by group commit) do. The time is that of the 1024 allows; divided by 64 it is what
//!   one request waits for its record.
//!
//! The log goes to a temporary directory under `CELLGATE_BENCH_DIR` (default: the system temp
//! dir, often tmpfs, where a sync is nearly free; point it at a real disk to see fsync cost).

use std::time::{Duration, Instant};

use cellgate_audit::{AuditLog, AuditOptions, Record};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "support/record.rs"]
mod support;
use support::record;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("CELLGATE_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = bench_dir();
    let (log, writer) = rt
        .block_on(AuditLog::open(
            dir.path().join("audit.jsonl"),
            AuditOptions::default(),
        ))
        .unwrap();

    let mut group = c.benchmark_group("audit");
    group.measurement_time(Duration::from_secs(5));
    let mut i = 0_u64;

    group.throughput(Throughput::Elements(1000));
    group.bench_function("submit_1000_then_flush", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let records: Vec<Record> = (0..1000)
                    .map(|_| {
                        i += 1;
                        record(i)
                    })
                    .collect();
                let start = Instant::now();
                rt.block_on(async {
                    for r in records {
                        log.submit(r).unwrap();
                    }
                    log.flush().await.unwrap();
                });
                total += start.elapsed();
            }
            total
        });
    });

    group.throughput(Throughput::Elements(1));
    group.bench_function("submit_durable", |b| {
        b.iter_batched(
            || {
                i += 1;
                record(i)
            },
            |r| rt.block_on(log.submit_durable(r)).unwrap(),
            BatchSize::SmallInput,
        );
    });
    group.finish();

    let stats = log.stats();
    eprintln!(
        "{} records in {} writes and {} syncs",
        stats.written, stats.writes, stats.syncs
    );
    rt.block_on(async {
        log.close().await.unwrap();
        writer.await.unwrap().unwrap();
    });
}

/// Verification speed (parse, canonicalize, hash) over a log of 10 000 records.
fn verify(c: &mut Criterion) {
    const N: u64 = 10_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = bench_dir();
    let path = dir.path().join("audit.jsonl");
    rt.block_on(async {
        let (log, writer) = AuditLog::open(&path, AuditOptions::default())
            .await
            .unwrap();
        for i in 0..N {
            log.submit(record(i)).unwrap();
            if i % 1000 == 0 {
                log.flush().await.unwrap();
            }
        }
        log.close().await.unwrap();
        writer.await.unwrap().unwrap();
    });
    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(N));
    group.bench_function("verify_10000", |b| {
        b.iter(|| assert_eq!(cellgate_audit::verify_path(&path).unwrap().records, N));
    });
    group.finish();
}

/// Relaxed against strict durability for allows from 16 concurrent submitters.
fn durability(c: &mut Criterion) {
    const SUBMITTERS: u64 = 16;
    const EACH: u64 = 64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = bench_dir();
    let (log, writer) = rt
        .block_on(AuditLog::open(
            dir.path().join("audit.jsonl"),
            AuditOptions::default(),
        ))
        .unwrap();
    let mut group = c.benchmark_group("durability");
    group.throughput(Throughput::Elements(SUBMITTERS * EACH));
    for strict in [false, true] {
        let name = if strict {
            "strict_16x64"
        } else {
            "relaxed_16x64"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..SUBMITTERS)
                            .map(|t| {
                                let log = log.clone();
                                tokio::spawn(async move {
                                    for i in 0..EACH {
                                        let r = record(t * EACH + i);
                                        if strict {
                                            log.submit_durable(r).await.unwrap();
                                        } else {
                                            log.submit(r).unwrap();
                                        }
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    total += start.elapsed();
                    // Relaxed records are still queued: written before the next round (and
                    // outside the timing), so both modes start each round with an idle writer.
                    rt.block_on(log.flush()).unwrap();
                }
                total
            });
        });
        let stats = log.stats();
        eprintln!(
            "{name}: so far {} records in {} writes and {} syncs ({} for waiters)",
            stats.written, stats.writes, stats.syncs, stats.durable_syncs
        );
    }
    group.finish();
    rt.block_on(async {
        log.close().await.unwrap();
        writer.await.unwrap().unwrap();
    });
}

criterion_group!(benches, append, verify, durability);
criterion_main!(benches);
