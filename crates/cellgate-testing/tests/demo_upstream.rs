//! The demo upstream binary serves HTTPS with the CA it writes (the quickstart and the end-to-end
//! tests start it), and reports what it received when asked.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn serves_https_with_the_ca_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellgate-demo-upstream"))
        .args([
            "--names",
            "api.demo",
            "--listen",
            "127.0.0.1:0",
            "--log-header",
            "x-probe",
            "--ca-out",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    let port = addr.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H", "x-probe: 42", "--cacert"])
        .arg(dir.path().join("upstream-ca.pem"))
        .args([
            "--resolve",
            &format!("api.demo:{port}:127.0.0.1"),
            &format!("https://api.demo:{port}/v1/hello"),
        ])
        .output()
        .expect("curl is needed for this test (apt-get install curl)");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"uri\":\"/v1/hello\""),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = lines.next().unwrap().unwrap();
    assert_eq!(seen, "seen GET /v1/hello x-probe=42");
    let _ = child.kill();
    let _ = child.wait();
}
