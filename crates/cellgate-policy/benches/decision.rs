//! Decision latency over a fleet of 10,000 cells (3 to 5 capabilities each): pick a cell
//! pseudo-randomly from the uid map, build the input of one request, evaluate.
//!
//! `cargo bench -p cellgate-policy --bench decision`. Percentiles (p50, p99):
//! `cargo run --release -p cellgate-policy --example decision_latency`.

use std::path::PathBuf;

use cellgate_policy::PolicySet;
use criterion::{criterion_group, criterion_main, Criterion};

mod fleet;

fn policies() -> PolicySet {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    PolicySet::load(&dir, &[]).expect("the shipped policies load")
}

fn decision(c: &mut Criterion) {
    let set = policies();
    let fleet = fleet::fleet();
    let uids = fleet::uids(&fleet);
    let mut rng = fleet::Rng::new(42);
    let mut n = 0u64;

    c.bench_function("allow/input_with_cell_conversion", |b| {
        b.iter(|| {
            n += 1;
            let held = &fleet[&uids[rng.below(uids.len())]];
            let input = fleet::request(&held.doc, n, false, true);
            let d = set.evaluate(&input).expect("decides");
            assert!(d.allow);
        })
    });
    c.bench_function("allow/prebuilt_cell_value", |b| {
        b.iter(|| {
            n += 1;
            let held = &fleet[&uids[rng.below(uids.len())]];
            let input = fleet::request(&held.doc, n, false, false);
            let d = set
                .evaluate_with_cell(&input, &held.value)
                .expect("decides");
            assert!(d.allow);
        })
    });
    c.bench_function("deny_with_hint/prebuilt_cell_value", |b| {
        b.iter(|| {
            n += 1;
            let held = &fleet[&uids[rng.below(uids.len())]];
            let input = fleet::request(&held.doc, n, true, false);
            let d = set
                .evaluate_with_cell(&input, &held.value)
                .expect("decides");
            assert!(!d.allow);
        })
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
