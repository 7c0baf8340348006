//! `cellgate lockdown` against a running node's admin API (local mode).

use std::process::Command;

fn cellgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(args)
        .output()
        .unwrap()
}

async fn node(dir: &std::path::Path, token: Option<&str>) -> cellgate_node::NodeHandle {
    let mut config = cellgate_node::NodeConfig::defaults();
    config.audit = dir.join("audit.jsonl");
    if let Some(t) = token {
        std::fs::write(dir.join("admin-token"), t).unwrap();
        config.admin_token_file = Some(dir.join("admin-token"));
    }
    cellgate_node::run(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdown_on_and_off_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), None).await;
    let admin = n.admin_addr.to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            cellgate(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let out = run(a(&[
        "lockdown",
        "on",
        "--reason",
        "incident 9",
        "--admin",
        &admin,
    ]))
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("lockdown on for every cell on the node"),
        "{stdout}"
    );
    let lock = n.shared.lockdown.applies("any").unwrap();
    assert_eq!(lock.reason, "incident 9");
    assert!(lock.by.unwrap().starts_with("admin API from 127.0.0.1"));

    let out = run(a(&[
        "lockdown", "on", "-n", "agents", "--reason", "r", "--admin", &admin,
    ]))
    .await
    .unwrap();
    assert!(out.status.success());
    let out = run(a(&[
        "lockdown", "off", "--reason", "done", "--admin", &admin,
    ]))
    .await
    .unwrap();
    assert!(out.status.success());
    assert!(n.shared.lockdown.applies("other").is_none());
    assert!(
        n.shared.lockdown.applies("agents").is_some(),
        "the namespace's stays"
    );

    // A reason is required, by the command and by the node.
    let out = run(a(&["lockdown", "on", "--admin", &admin]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = run(a(&["lockdown", "on", "--reason", " ", "--admin", &admin]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a reason is required"));
    assert!(n.shared.lockdown.applies("other").is_none());
    n.shutdown().await;

    // No node there: a clear error.
    let out = run(a(&["lockdown", "on", "--reason", "x", "--admin", &admin]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the node running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdown_needs_the_admin_token_when_the_node_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), Some("s3cret")).await;
    let admin = n.admin_addr.to_string();
    let token_file = dir.path().join("admin-token").display().to_string();
    let (admin2, tf) = (admin.clone(), token_file.clone());
    let out = tokio::task::spawn_blocking(move || {
        cellgate(&["lockdown", "on", "--reason", "x", "--admin", &admin2])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(n.shared.lockdown.applies("a").is_none());
    let out = tokio::task::spawn_blocking(move || {
        cellgate(&[
            "lockdown",
            "on",
            "--reason",
            "x",
            "--admin",
            &admin,
            "--admin-token-file",
            &tf,
        ])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(n.shared.lockdown.applies("a").is_some());
}
