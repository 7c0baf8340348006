//! Real clients through the real sidecar: `curl` talks to the tagger, which adds PPv2 and the
//! token and forwards to the node, which decides and forwards to a real HTTPS upstream.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

async fn start_tagger(f: &Fixture, token: &str) -> std::net::SocketAddr {
    let token_file = f.dir.path().join("tagger-token");
    std::fs::write(&token_file, token).unwrap();
    let mut cfg = cellgate_tagger::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        f.node().intake_addr,
        &token_file,
    );
    cfg.destination = Some(f.https.addr);
    let tagger = cellgate_tagger::bind(cfg).await.unwrap();
    let addr = tagger.local_addr();
    tokio::spawn(tagger.serve(std::future::pending()));
    addr
}

fn curl(args: &[String]) -> (String, String) {
    let out = Command::new("curl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("curl is needed for this test (apt-get install curl): {e}"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_tagger_and_node_to_a_real_https_upstream() {
    let f = Fixture::start().await;
    let tagger = start_tagger(&f, &f.token("demo")).await;
    let ca = f.dir.path().join("ca/ca.crt").display().to_string();
    let port = f.https.addr.port();
    let base = |extra: &[&str], url: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &ca,
            "--connect-to",
            &format!("api.test:{port}:{tagger}"),
            "-w",
            "\n%{http_code} %{http_version}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(url.to_string());
        v
    };
    let url = |p: &str| format!("https://api.test:{port}{p}");
    let f2 = tokio::task::spawn_blocking({
        let (a1, a2, a3, a4) = (
            base(&["--http1.1"], &url("/v1/models")),
            base(&["--http2"], &url("/v1/models")),
            base(&["-X", "DELETE"], &url("/v1/models")),
            base(
                &["--http1.1", "-X", "POST", "--data-binary", "@-"],
                &url("/v1/upload"),
            ),
        );
        move || (curl(&a1), curl(&a2), curl(&a3), curl(&a4))
    });
    let ((h1, e1), (h2, e2), (del, _), (post, _)) =
        tokio::time::timeout(Duration::from_secs(60), f2)
            .await
            .unwrap()
            .unwrap();
    assert!(h1.ends_with("200 1.1"), "curl --http1.1: {h1} {e1}");
    assert!(h2.ends_with("200 2"), "curl --http2: {h2} {e2}");
    assert!(del.ends_with("403 1.1") || del.ends_with("403 2"), "{del}");
    let body: serde_json::Value = serde_json::from_str(del.lines().next().unwrap()).unwrap();
    assert_eq!(body["error"], "cellgate_denied");
    assert_eq!(body["reason"], "http_rule_mismatch");
    assert!(post.ends_with("200 1.1"), "{post}");
    let seen = f.https.requests();
    assert_eq!(
        seen.iter().filter(|s| s.uri == "/v1/models").count(),
        2,
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.method != "DELETE"));
    // The audit log the node wrote verifies with the CLI's verifier.
    let _ = f.node().shared.audit.flush().await;
    let report = cellgate_audit::verify_path(&f.audit).unwrap();
    assert!(report.records >= 4, "{report:?}");
}
