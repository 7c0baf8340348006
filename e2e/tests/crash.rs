//! A crash loses no denial and never corrupts the chain: the real node binary is killed with
//! SIGKILL while clients hammer it with allowed and denied requests, again and again. After each
//! kill the log verifies up to its last complete record, every request the agent saw a 403 for
//! is in it, and the node starts again on that same log.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellgate_e2e::{bin, cellgate, free_port, Kill};

/// Kill-and-restart rounds.
const ROUNDS: usize = 6;
/// Client threads sending requests during a round.
const CLIENTS: usize = 6;

/// Starts the node on `audit` and waits until its intake answers.
fn start_node(d: &Path, intake: u16, audit: &Path, resolve: &str) -> Kill {
    let p = |x: &str| d.join(x).to_str().expect("utf-8").to_string();
    let child = Command::new(bin("cellgate-node"))
        .args(["--listen", &format!("127.0.0.1:{intake}")])
        .args(["--admin", "127.0.0.1:0"])
        .args(["--cells", &p("cells"), "--ca", &p("ca")])
        .args(["--trust", &p("keys/signing.pub")])
        .args(["--audit", audit.to_str().expect("utf-8")])
        .args(["--resolve", resolve])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join("node.log"))
                .expect("node log"),
        ))
        .spawn()
        .expect("node");
    let mut node = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", intake)).is_err() {
        if let Ok(Some(status)) = node.0.try_wait() {
            let log = std::fs::read_to_string(d.join("node.log")).unwrap_or_default();
            panic!("the node exited ({status}) instead of starting on its log:\n{log}");
        }
        assert!(Instant::now() < deadline, "the node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    node
}

/// One tagged plain-HTTP request; the response head and body, or what arrived before the
/// connection broke.
fn request(intake: u16, upstream: SocketAddr, token: &str, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", intake)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let header =
        cellgate_proxy_protocol::encode("127.0.0.1:40000".parse().expect("addr"), upstream, token)
            .expect("PPv2");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: up.test:{}\r\nConnection: close\r\n\r\n",
        upstream.port()
    );
    if s.write_all(&header).is_err() || s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The request id of a complete JSON 403 (the denial the agent saw), if `resp` is one.
fn denial_id(resp: &str) -> Option<String> {
    if !resp.starts_with("HTTP/1.1 403") {
        return None;
    }
    let body = resp.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    v["request_id"].as_str().map(str::to_string)
}

/// The log cut after its last complete line, as a file of its own.
fn complete_prefix(log: &Path, out: &Path) -> usize {
    let bytes = std::fs::read(log).expect("read log");
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    std::fs::write(out, &bytes[..keep]).expect("write prefix");
    bytes.len() - keep
}

#[test]
fn sigkill_under_load_loses_no_denial_and_never_breaks_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let up_port = free_port();
    let _upstream = Kill(
        Command::new(bin("cellgate-demo-upstream"))
            .args(["--plain", "--listen", &format!("127.0.0.1:{up_port}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("upstream"),
    );
    std::fs::create_dir_all(d.join("cells")).expect("cells");
    std::fs::write(
        d.join("cells/cell.yaml"),
        format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: crash, namespace: agents}}\nspec:\n  capabilities:\n    - name: up\n      destinations: [{{host: up.test, ports: [{up_port}]}}]\n      http: {{methods: [GET], paths: [\"/ok/**\"]}}\n"
        ),
    )
    .expect("cell");
    let p = |x: &str| d.join(x).to_str().expect("utf-8").to_string();
    cellgate(&["keys", "init", "--out", &p("keys")]);
    cellgate(&["ca", "init", "--out", &p("ca")]);
    let token = cellgate(&[
        "token",
        "issue",
        "--key",
        &p("keys/signing.key"),
        "--cell",
        &p("cells/cell.yaml"),
        "--ttl",
        "30m",
        "--bind",
        "127.0.0.1",
    ]);
    // `up.test` is a name the node resolves: pinned to the upstream.
    let resolve = format!("up.test:{up_port}:127.0.0.1");
    let audit = d.join("audit.jsonl");
    let upstream: SocketAddr = format!("127.0.0.1:{up_port}").parse().expect("addr");
    let mut denied_total = 0usize;
    let mut allowed_total = 0usize;

    for round in 0..ROUNDS {
        let intake = free_port();
        let node = start_node(d, intake, &audit, &resolve);
        let stop = Arc::new(AtomicBool::new(false));
        let denials = Arc::new(Mutex::new(Vec::new()));
        let allowed = Arc::new(Mutex::new(0usize));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (stop, denials, allowed, token) = (
                    stop.clone(),
                    denials.clone(),
                    allowed.clone(),
                    token.clone(),
                );
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let path = if (i + c as u64).is_multiple_of(2) {
                            format!("/ok/{round}/{c}/{i}")
                        } else {
                            format!("/secret/{round}/{c}/{i}")
                        };
                        let r = request(intake, upstream, &token, &path);
                        if let Some(id) = denial_id(&r) {
                            denials.lock().expect("lock").push(id);
                        } else if r.starts_with("HTTP/1.1 200") {
                            *allowed.lock().expect("lock") += 1;
                        }
                    }
                })
            })
            .collect();
        // Under load for a moment that differs per round, then SIGKILL.
        std::thread::sleep(Duration::from_millis(300 + 90 * round as u64));
        drop(node);
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().expect("client");
        }
        let denials = denials.lock().expect("lock").clone();
        assert!(!denials.is_empty(), "round {round}: no denial was seen");
        denied_total += denials.len();
        allowed_total += *allowed.lock().expect("lock");

        // (1) The log verifies up to its last complete record.
        let prefix = d.join(format!("prefix-{round}.jsonl"));
        let torn = complete_prefix(&audit, &prefix);
        let out = Command::new(bin("cellgate"))
            .args(["audit", "verify"])
            .arg(&prefix)
            .output()
            .expect("verify");
        // No head anchor beside the prefix: it is checked as a chain on its own.
        assert!(
            out.status.success(),
            "round {round}: the log up to its last complete record does not verify ({torn} torn bytes): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // (2) Every denial the agent saw is in it.
        let text = std::fs::read_to_string(&prefix).expect("prefix");
        let ids: HashSet<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["decision"] == "deny")
            .filter_map(|r| r["request_id"].as_str().map(str::to_string))
            .collect();
        let missing: Vec<&String> = denials.iter().filter(|id| !ids.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} denials the agent saw are not in the log: {missing:?}",
            missing.len(),
            denials.len()
        );
    }
    // (3) The node started on the killed log every round; a last clean start and stop leaves
    // a log that verifies whole, head anchor included.
    let node = start_node(d, free_port(), &audit, &resolve);
    std::thread::sleep(Duration::from_millis(300));
    drop(node);
    let prefix = d.join("final.jsonl");
    complete_prefix(&audit, &prefix);
    let out = Command::new(bin("cellgate"))
        .args(["audit", "verify"])
        .arg(&prefix)
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "crash test: {ROUNDS} SIGKILLs under load, {denied_total} denials and {allowed_total} allows seen by the agents, all denials in the log: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}
