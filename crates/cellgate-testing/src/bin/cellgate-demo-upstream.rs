//! A small local HTTPS service for demos and the quickstart: answers every request with a JSON
//! description of it, streams server-sent events on `/sse`, echoes WebSocket bytes on `/ws`.
//!
//! `cellgate-demo-upstream --names api.demo --ca-out DIR [--listen ADDR]` writes the CA that
//! signed its certificate to `DIR/upstream-ca.pem`, prints `listening on ADDR`, and serves until
//! killed.

use std::net::SocketAddr;
use std::path::PathBuf;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut names = vec!["localhost".to_string()];
    let mut ca_out = PathBuf::from(".");
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut plain = false;
    let mut log_header: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--names" => {
                names = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "--ca-out" => ca_out = args.next().map(PathBuf::from).unwrap_or_default(),
            "--listen" => {
                listen = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| die("--listen takes ADDR:PORT"))
            }
            "--plain" => plain = true,
            "--log-header" => log_header = args.next().map(|h| h.to_ascii_lowercase()),
            "--help" | "-h" => {
                println!("usage: cellgate-demo-upstream [--names a,b] [--ca-out DIR] [--listen ADDR] [--plain] [--log-header NAME]");
                return;
            }
            other => die(&format!("unknown argument {other:?}")),
        }
    }
    let tls = if plain {
        None
    } else {
        let pki = cellgate_testing::TestPki::new();
        std::fs::create_dir_all(&ca_out)
            .unwrap_or_else(|e| die(&format!("{}: {e}", ca_out.display())));
        pki.write_ca(&ca_out);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        Some(pki.server_config(&refs, &[b"h2", b"http/1.1"]))
    };
    let up = cellgate_testing::Upstream::start_on(listen, tls).await;
    println!("listening on {}", up.addr);
    if let Some(name) = log_header {
        // One line per request received, with the value of one header (for tests that check what
        // the boundary injected).
        let seen = up.seen.clone();
        tokio::spawn(async move {
            let mut printed = 0;
            loop {
                let batch: Vec<_> = seen
                    .lock()
                    .map(|s| s.iter().skip(printed).cloned().collect())
                    .unwrap_or_default();
                for r in batch {
                    printed += 1;
                    println!(
                        "seen {} {} {name}={}",
                        r.method,
                        r.uri,
                        r.header(&name).unwrap_or("-")
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn die(msg: &str) -> ! {
    eprintln!("cellgate-demo-upstream: {msg}");
    std::process::exit(2)
}
