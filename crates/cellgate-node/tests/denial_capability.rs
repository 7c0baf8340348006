//! The denial body names the capability that refused when one reaches the destination (null
//! when none does), and a policy pack in shadow mode records what it would deny while the
//! request goes through.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_403_names_the_capability_that_refused() {
    let f = Fixture::start().await;
    // `api` reaches api.test but allows GET and POST on /v1/** only.
    let r = f
        .https_get("api.test", "api.test", "/admin/users", "DELETE")
        .await;
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["reason"], "http_rule_mismatch", "{j}");
    assert_eq!(j["capability"], "api", "{j}");
    let rid = j["request_id"].as_str().unwrap().to_string();
    let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["capability"], "api");

    // Plain HTTP: `plain` allows GET /public/** only.
    let r = f.http_get("plain.test", "/private/x").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["capability"], "plain", "{}", r.body);

    // No capability reaches evil.test: null.
    let r = f.https_get("evil.test", "evil.test", "/", "GET").await;
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["reason"], "no_capability");
    assert!(j["capability"].is_null(), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_denial_names_the_capability_and_a_shadow_pack_only_records() {
    let f = Fixture::start().await;
    let enforce = f.policies_dir.join("closed");
    std::fs::create_dir_all(&enforce).unwrap();
    std::fs::write(
        enforce.join("closed.rego"),
        "package cellgate.layers.closed\nimport rego.v1\n\ndeny contains {\"reason\": \"closed_path\", \"message\": \"closed\"} if input.request.path == \"/public/closed\"\n",
    )
    .unwrap();
    let shadow = f.policies_dir.join("watch");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::write(shadow.join("pack.yaml"), "mode: shadow\n").unwrap();
    std::fs::write(
        shadow.join("watch.rego"),
        "package cellgate.layers.watch\nimport rego.v1\n\ndeny contains {\"reason\": \"watched_path\", \"message\": \"watched\"} if input.request.path == \"/public/watched\"\n",
    )
    .unwrap();
    let start = Instant::now();
    loop {
        let packs = f
            .node()
            .shared
            .policy
            .current()
            .map(|s| s.packs().iter().map(|p| p.name.clone()).collect::<Vec<_>>())
            .unwrap_or_default();
        if packs.contains(&"watch".to_string()) && packs.contains(&"closed".to_string()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "packs not loaded: {packs:?} {:?}",
            f.node().shared.policy_source.last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let r = f.http_get("plain.test", "/public/closed").await;
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["reason"], "closed_path", "{j}");
    assert_eq!(j["capability"], "plain", "{j}");

    // The shadow pack's denial is recorded; the request reaches the upstream.
    let r = f.http_get("plain.test", "/public/watched").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(f.http.requests().last().unwrap().uri, "/public/watched");
    let rid = r
        .headers
        .get("x-cellgate-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
    assert_eq!(rec["decision"], "shadow_deny");
    assert_eq!(rec["reason"], "watched_path");
    assert_eq!(rec["capability"], "plain");
}
