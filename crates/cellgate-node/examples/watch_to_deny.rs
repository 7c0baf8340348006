//! Watch to deny: how long from an AgentCell watch event removing a capability to the first
//! request the node denies, in-process, over kube-rs's mocked API service.
//!
//! ```text
//! cargo run --release -p cellgate-node --example watch_to_deny -- [--runs 200]
//! ```
//!
//! Starts a node in Kubernetes mode (real intake socket, real plain-HTTP upstream on loopback)
//! whose API client is the scripted API server of `cellgate_node::kubernetes::contract`, lists
//! one cell and its pod, then, `--runs` times: restores the capability (and waits until a
//! request passes), sends the `MODIFIED` event removing it, and measures
//!
//! - **apply**: event written to the open watch body → the first state generation bump that
//!   sees the cell's entry replaced in the registry (what relays and streams re-check on);
//! - **deny**: event written → the first `403` on a keep-alive HTTP/1.1 connection polled with
//!   back-to-back requests (includes one request round trip through the node: the resolution).
//!
//! Prints p50, p90, p99 and max of each.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_identity::{Claims, SigningKey};
use cellgate_node::kubernetes::contract::{agent_cell, cell_pod, ApiServer, Watched};
use cellgate_node::NodeConfig;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

const NODE: &str = "bench-node";
const UID: &str = "uid-bench";

fn spec(port: u16, with_cap: bool) -> serde_json::Value {
    let caps = if with_cap {
        serde_json::json!([{"name": "api", "destinations": [{"host": "api.bench", "ports": [port]}],
                            "http": {"methods": ["GET"], "paths": ["/v1/**"]}}])
    } else {
        serde_json::json!([])
    };
    serde_json::json!({"capabilities": caps})
}

async fn upstream() -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"ok\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(intake: SocketAddr, port: u16, token: &str) -> anyhow::Result<Sender> {
    let mut s = tokio::net::TcpStream::connect(intake).await?;
    s.set_nodelay(true)?;
    let src = s.local_addr()?;
    let dst = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port);
    s.write_all(&cellgate_proxy_protocol::encode(src, dst, token)?)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One request; `None` when the connection is gone (a response cut by the revocation).
async fn status(sender: &mut Sender, port: u16) -> Option<u16> {
    let req = http::Request::builder()
        .uri("/v1/ping")
        .header("host", format!("api.bench:{port}"))
        .body(Empty::<Bytes>::new())
        .ok()?;
    let r = sender.send_request(req).await.ok()?;
    let s = r.status().as_u16();
    r.into_body().collect().await.ok()?;
    Some(s)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn report(name: &str, v: &mut [Duration]) {
    println!(
        "{name:<6} n={:<4} p50 {:>9.3} ms  p90 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
        v.len(),
        pct(v, 0.5).as_secs_f64() * 1e3,
        pct(v, 0.9).as_secs_f64() * 1e3,
        pct(v, 0.99).as_secs_f64() * 1e3,
        pct(v, 1.0).as_secs_f64() * 1e3,
    );
}

fn main() -> anyhow::Result<()> {
    let mut runs = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other:?}; usage: watch_to_deny [--runs N]"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(runs))
}

async fn bench(runs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::generate()?;
    key.write_pair(&dir.path().join("keys"))?;
    let up = upstream().await?;
    let (client, api) = ApiServer::start();
    api.set_list(
        Watched::AgentCells,
        vec![agent_cell("agents", "bench", UID, 1, spec(up.port(), true))],
    );
    api.set_list(
        Watched::Pods,
        vec![cell_pod(
            "agents",
            "bench",
            UID,
            NODE,
            "127.0.0.1",
            "Running",
        )],
    );
    let mut config = NodeConfig::defaults();
    config.kubernetes = true;
    config.node_name = NODE.into();
    config.trust = vec![dir.path().join("keys/signing.pub")];
    config.audit = dir.path().join("audit.jsonl");
    config.resolve.push(
        cellgate_node::config::parse_resolve("api.bench:*:127.0.0.1")
            .map_err(anyhow::Error::msg)?,
    );
    let node = cellgate_node::run_with(config, Some(client)).await?;
    for w in [Watched::AgentCells, Watched::Pods, Watched::ConfigMaps] {
        api.watch_opened(w).await;
    }
    let claims = Claims::for_cell(
        "cellgate-operator",
        UID,
        "agents",
        "bench",
        None,
        cellgate_node::decide::now_secs(),
        3600,
        None,
    );
    let token = cellgate_identity::token::issue(&key, &claims).map_err(anyhow::Error::msg)?;
    let port = up.port();
    let mut sender = connect(node.intake_addr, port, &token).await?;
    let mut generation = 1i64;
    let (mut apply, mut deny) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        generation += 1;
        api.send(
            Watched::AgentCells,
            "MODIFIED",
            agent_cell("agents", "bench", UID, generation, spec(port, true)),
        );
        let ready = Instant::now();
        while status(&mut sender, port).await != Some(200) {
            sender = connect(node.intake_addr, port, &token).await?;
            anyhow::ensure!(
                ready.elapsed() < Duration::from_secs(5),
                "capability not restored"
            );
        }
        generation += 1;
        let mut gen_rx = node.shared.generation.subscribe();
        let start = Instant::now();
        api.send(
            Watched::AgentCells,
            "MODIFIED",
            agent_cell("agents", "bench", UID, generation, spec(port, false)),
        );
        let shared = node.shared.clone();
        let applied = tokio::spawn(async move {
            // The bump that follows the replaced entry (not a late one of the restore).
            let _ = gen_rx
                .wait_for(|_| {
                    shared
                        .cells
                        .get(UID)
                        .is_some_and(|e| e.cell.capabilities.is_empty())
                })
                .await;
            start.elapsed()
        });
        loop {
            match status(&mut sender, port).await {
                Some(403) => break,
                Some(_) => {}
                None => sender = connect(node.intake_addr, port, &token).await?,
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "never denied");
        }
        deny.push(start.elapsed());
        apply.push(applied.await?);
    }
    println!("watch to deny, {runs} runs (in-process, mocked API server, loopback)");
    report("apply", &mut apply);
    report("deny", &mut deny);
    node.shutdown().await;
    Ok(())
}
