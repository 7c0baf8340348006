//! Policy and cell changes are picked up within a second; a broken policy is refused and the
//! previous one stays; `/readyz` and `/metrics` tell the operator.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn until(deadline: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within {deadline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_layer_denies_within_a_second_and_a_broken_one_is_refused() {
    let f = Fixture::start().await;
    assert_eq!(f.http_get("plain.test", "/public/a").await.status, 200);
    let ready = f.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let v1 = f
        .node()
        .shared
        .policy
        .current()
        .unwrap()
        .version()
        .to_string();

    // A layer that denies /public/secret* for namespace agents.
    std::fs::write(
        f.policies_dir.join("no-secrets.rego"),
        "package cellgate.layers.nosecrets\nimport rego.v1\n\ndeny contains {\"reason\": \"secret_path\", \"message\": \"secret paths are off limits\"} if {\n  input.cell.namespace == \"agents\"\n  startswith(input.request.path, \"/public/secret\")\n}\n",
    )
    .unwrap();
    let took = until(Duration::from_secs(3), async || {
        f.http_get("plain.test", "/public/secret-plan").await.status == 403
    })
    .await;
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
    let denied = f.http_get("plain.test", "/public/secret-plan").await;
    assert_eq!(denied.json()["error"], "cellgate_denied");
    assert_eq!(f.http_get("plain.test", "/public/a").await.status, 200);
    let v2 = f
        .node()
        .shared
        .policy
        .current()
        .unwrap()
        .version()
        .to_string();
    assert_ne!(v1, v2);

    // A syntax error: refused with file:line, the previous policy (v2) stays in force.
    std::fs::write(
        f.policies_dir.join("broken.rego"),
        "package cellgate.layers.broken\nimport rego.v1\n\ndeny contains x if {\n  x := \n}\n",
    )
    .unwrap();
    until(Duration::from_secs(3), async || {
        f.node().shared.policy_source.last_error().is_some()
    })
    .await;
    let err = f.node().shared.policy_source.last_error().unwrap();
    assert!(
        err.contains("broken.rego:"),
        "error must name file:line: {err}"
    );
    assert_eq!(f.node().shared.policy.current().unwrap().version(), v2);
    assert_eq!(
        f.http_get("plain.test", "/public/secret-plan").await.status,
        403
    );
    assert_eq!(f.http_get("plain.test", "/public/a").await.status, 200);
    let ready = f.admin_get("/readyz").await;
    assert_eq!(
        ready.status, 200,
        "a refused update does not make the node unready"
    );
    let metrics = f.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("cellgate_reload_failures_total{outcome=\"policy\"}"),
        "{metrics}"
    );

    // A pack whose own test fails is refused too.
    std::fs::remove_file(f.policies_dir.join("broken.rego")).unwrap();
    std::fs::write(
        f.policies_dir.join("selftest_test.rego"),
        "package cellgate.tests.selftest\nimport rego.v1\n\ntest_always_fails if {\n  1 == 2\n}\n",
    )
    .unwrap();
    until(Duration::from_secs(3), async || {
        f.node()
            .shared
            .policy_source
            .last_error()
            .is_some_and(|e| e.contains("test_always_fails"))
    })
    .await;
    let err = f.node().shared.policy_source.last_error().unwrap();
    assert!(err.contains("selftest_test.rego:"), "{err}");
    assert_eq!(f.node().shared.policy.current().unwrap().version(), v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_valid_policy_denies_everything_and_readyz_says_why() {
    let f = Fixture::start_with(|c| {
        let dir = std::env::temp_dir().join(format!("cellgate-broken-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("base.rego"),
            "package cellgate.authz\n\ndecision := {",
        )
        .unwrap();
        c.base_policy_dir = Some(dir);
    })
    .await;
    let r = f.http_get("plain.test", "/public/a").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "no_policy");
    assert!(f.http.requests().is_empty());
    let ready = f.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.body.contains("no valid policy") && ready.body.contains("base.rego:"),
        "{}",
        ready.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_changes_apply_without_restart() {
    let f = Fixture::start().await;
    assert_eq!(f.http_get("plain.test", "/public/a").await.status, 200);
    // Suspend the cell: the next request on a new connection is denied.
    let text = std::fs::read_to_string(f.cells_dir.join("demo.yaml"))
        .unwrap()
        .replace(
            "  role: researcher",
            "  role: researcher\n  suspended: true",
        );
    std::fs::write(f.cells_dir.join("demo.yaml"), text).unwrap();
    until(Duration::from_secs(3), async || {
        f.http_get("plain.test", "/public/a").await.status == 403
    })
    .await;
    assert_eq!(
        f.http_get("plain.test", "/public/a").await.json()["reason"],
        "cell_suspended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let f = Fixture::start().await;
    assert_eq!(f.admin_get("/healthz").await.status, 200);
    let _ = f.https_get("api.test", "api.test", "/v1/a", "GET").await;
    let _ = f.https_get("api.test", "api.test", "/v1/a", "GET").await;
    let _ = f.https_get("api.test", "api.test", "/nope", "GET").await;
    let m = f.admin_get("/metrics").await.body;
    for needle in [
        "cellgate_decisions_total{result=\"allow\",reason=\"",
        "cellgate_decisions_total{result=\"deny\"",
        "cellgate_decision_duration_seconds_bucket",
        "cellgate_open_connections",
        "cellgate_cert_cache_hits_total",
        "cellgate_cert_cache_misses_total",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    // Three TLS connections for one name: one mint, then cache hits.
    assert_eq!(f.node().shared.minter.mints(), 1);
    assert!(f.node().shared.minter.hits() >= 2);
    assert_eq!(f.admin_get("/nope").await.status, 404);
}
