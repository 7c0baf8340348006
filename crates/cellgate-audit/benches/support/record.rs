//! A typical allow record, shared by the append bench and the `append_count` example.

use cellgate_audit::{Decision, Record};

/// The `i`-th record of a run: a GET to the GitHub API through a capability, with a budget.
pub fn record(i: u64) -> Record {
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
