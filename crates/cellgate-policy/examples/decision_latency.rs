//! Decision latency percentiles over a fleet of 10,000 cells: N evaluations timed one by one
//! with `Instant` (criterion reports means and medians; the target is on p99).
//!
//! `cargo run --release -p cellgate-policy --example decision_latency [N] [POLICY_DIR]`
//! (default 100000 evaluations of the shipped `policies/`; give a directory to measure a draft).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cellgate_policy::PolicySet;

#[path = "../benches/fleet/mod.rs"]
mod fleet;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let dir = std::env::args().nth(2).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies"),
        PathBuf::from,
    );
    let set = PolicySet::load(&dir, &[]).expect("the shipped policies load");
    let fleet = fleet::fleet();
    let uids = fleet::uids(&fleet);
    println!(
        "policy {} ({} files, {} tests), {} cells, {n} evaluations per row",
        set.version(),
        set.files().len(),
        set.tests_run(),
        uids.len()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "case", "p50", "p90", "p99", "p99.9"
    );

    for (label, deny, prebuilt) in [
        ("allow, InputDoc converted whole", false, false),
        ("allow, cell value prebuilt (node path)", false, true),
        ("deny no_capability + hint, prebuilt", true, true),
    ] {
        let mut rng = fleet::Rng::new(42);
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let held = &fleet[&uids[rng.below(uids.len())]];
            let t = Instant::now();
            let input = fleet::request(&held.doc, i as u64, deny, !prebuilt);
            let d = if prebuilt {
                set.evaluate_with_cell(&input, &held.value)
            } else {
                set.evaluate(&input)
            }
            .expect("decides");
            times.push(t.elapsed());
            assert_eq!(d.allow, !deny);
        }
        times.sort_unstable();
        println!(
            "{label:<44} {:>9.1?} {:>9.1?} {:>9.1?} {:>9.1?}",
            pct(&times, 0.50),
            pct(&times, 0.90),
            pct(&times, 0.99),
            pct(&times, 0.999)
        );
    }
}
