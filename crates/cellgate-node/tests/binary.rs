//! The `cellgate-node` binary: configuration errors, start-up, and a graceful drain on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn refuses_to_start_without_a_trusted_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_cellgate-node"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--trust"), "{err}");
}

#[test]
fn starts_serves_admin_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let key = cellgate_identity::SigningKey::generate().unwrap();
    key.write_pair(dir.path()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellgate-node"))
        .env_clear()
        .env("CELLGATE_LOG", "info")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--drain",
            "2s",
        ])
        .arg("--trust")
        .arg(dir.path().join("signing.pub"))
        .arg("--audit")
        .arg(dir.path().join("audit.jsonl"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut admin = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains("cellgate-node started") {
                admin = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("admin="))
                    .map(str::to_string);
            }
        }
    }
    let admin = admin.expect("start-up line with the admin address");
    let out = Command::new("curl")
        .args(["-s", &format!("http://{admin}/readyz")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ready: policy "),
        "{:?}",
        out
    );
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let logs: Vec<String> = rx.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("draining")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("drained")), "{logs:?}");
}

/// Kills the node if the test fails half-way, so no process outlives it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
