//! Load client for the ext_authz Check API: latency at a fixed rate and closed-loop throughput.
//!
//! Starts a node in-process (its own runtime, `--server-threads` workers, default 1 = one core)
//! with a demo cell, a temporary signing key and audit log, and the ext_authz listener on
//! loopback; then a client runtime (`--client-threads`, default 1) sends `CheckRequest`s shaped as
//! Envoy's HTTP ext_authz filter fills them (TLV 0xE0 token in `metadata_context`, pseudo-headers,
//! TLS SNI), all allowed by policy and audited like any other decision.
//!
//! ```text
//! cargo run --release -p cellgate-node --example check_load -- \
//!     [--rate 5000] [--seconds 10] [--concurrency 64] [--connections 4] [--server-threads 1]
//! ```
//!
//! Phase 0: `CheckService::check` in-process, no gRPC. Phase 1 (open loop): one request every
//! 1/rate s, paced by a plain thread and each sent on its own task, latency from send to answer
//! (and, separately, from the moment it was due). Phase 2 (closed loop): `--concurrency`
//! requests in flight over `--connections` HTTP/2 connections for the same duration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellgate_node::config::ListenAddr;
use cellgate_node::ext_authz::{TOKEN_METADATA_KEY, TOKEN_METADATA_NAMESPACE};
use cellgate_node::NodeConfig;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use tonic::transport::Channel;

const CELL: &str = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: bench, namespace: agents}
spec:
  capabilities:
    - name: api
      destinations: [{host: api.bench, ports: [443]}]
      http: {methods: [GET, POST], paths: [\"/v1/**\"]}
";

struct Args {
    rate: u64,
    seconds: u64,
    concurrency: usize,
    connections: usize,
    server_threads: usize,
    client_threads: usize,
}

fn args() -> Args {
    let mut a = Args {
        rate: 5000,
        seconds: 10,
        concurrency: 64,
        connections: 4,
        server_threads: 1,
        client_threads: 1,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let n = || pair.get(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        match pair[0].as_str() {
            "--rate" => a.rate = n().max(1),
            "--seconds" => a.seconds = n().max(1),
            "--concurrency" => a.concurrency = n().max(1) as usize,
            "--connections" => a.connections = n().max(1) as usize,
            "--server-threads" => a.server_threads = n().max(1) as usize,
            "--client-threads" => a.client_threads = n().max(1) as usize,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn peer(addr: &str, port: u32) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

fn request(token: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "api.bench"),
        (":method", "GET"),
        (":path", "/v1/models?limit=10"),
        (":scheme", "https"),
        ("user-agent", "python-httpx/0.27"),
        ("accept", "application/json"),
        ("x-request-id", "5b0c0f5e-7d1e-4c55-9a55-0d9f6b1b2c3d"),
        ("x-forwarded-proto", "https"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        TOKEN_METADATA_NAMESPACE.into(),
        Struct {
            fields: [(
                TOKEN_METADATA_KEY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(token.into())),
                },
            )]
            .into(),
        },
    );
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("127.0.0.1", 40000)),
            destination: Some(peer("127.0.0.1", 443)),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "1".into(),
                    method: "GET".into(),
                    headers,
                    path: "/v1/models?limit=10".into(),
                    host: "api.bench".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    size: 0,
                    ..Default::default()
                }),
            }),
            metadata_context: Some(md),
            tls_session: Some(TlsSession {
                sni: "api.bench".into(),
            }),
            ..Default::default()
        }),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("temp dir");
    let key = cellgate_identity::SigningKey::generate().expect("key");
    key.write_pair(&dir.path().join("keys")).expect("keys");
    std::fs::create_dir_all(dir.path().join("cells")).expect("cells dir");
    std::fs::write(dir.path().join("cells/bench.yaml"), CELL).expect("cell");
    let mut config = NodeConfig::defaults();
    config.cells_dir = Some(dir.path().join("cells"));
    config.trust = vec![dir.path().join("keys/signing.pub")];
    config.audit = dir.path().join("audit.jsonl");
    config.ext_authz = Some(ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")));
    config.node_name = "bench".into();
    config.drain = Duration::from_secs(1);

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.server_threads)
        .thread_name("node")
        .enable_all()
        .build()
        .expect("server runtime");
    let node = server_rt
        .block_on(cellgate_node::run(config))
        .expect("node starts");
    let Some(ListenAddr::Tcp(addr)) = node.ext_authz_addr.clone() else {
        panic!("no ext_authz listener")
    };
    let now = cellgate_node::decide::now_secs();
    let claims = cellgate_identity::Claims::for_cell(
        "bench",
        "local:agents:bench",
        "agents",
        "bench",
        None,
        now,
        3600,
        Some("127.0.0.1".parse().expect("ip")),
    );
    let token = cellgate_identity::token::issue(&key, &claims).expect("token");
    let req = request(&token);

    // Phase 0: the decision alone, in-process on the server runtime (no gRPC): one task,
    // sequential calls of CheckService::check (token cache, policy, audit submission).
    {
        let svc = cellgate_node::ext_authz::CheckService::new(node.shared.clone());
        let req = req.clone();
        server_rt.block_on(async move {
            let mut l = Vec::with_capacity(20_000);
            for i in 0..22_000 {
                let t = Instant::now();
                let r = svc.check(req.clone()).await.expect("check");
                assert_eq!(r.status.map(|s| s.code), Some(0));
                if i >= 2000 {
                    l.push(t.elapsed().as_nanos() as u64);
                }
            }
            l.sort_unstable();
            let mean = l.iter().sum::<u64>() as f64 / l.len() as f64;
            println!(
                "in-process check (no gRPC): mean {:.1} us, p50 {:.1} us, p99 {:.1} us ({:.0} checks/s on one task)",
                mean / 1e3,
                percentile(&l, 0.5) as f64 / 1e3,
                percentile(&l, 0.99) as f64 / 1e3,
                1e9 / mean
            );
        });
    }

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads)
        .thread_name("client")
        .enable_all()
        .build()
        .expect("client runtime");
    client_rt.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..a.connections {
            let ch = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect");
            clients.push(AuthorizationClient::new(ch));
        }
        // Sanity + warm-up.
        let r = clients[0].clone().check(req.clone()).await.expect("check");
        assert_eq!(r.into_inner().status.map(|s| s.code), Some(0), "bench request must be allowed");
        for _ in 0..2000 {
            let _ = clients[0].clone().check(req.clone()).await;
        }

        // Phase 1: open loop at `rate`.
        let total = a.rate * a.seconds;
        let interval = Duration::from_nanos(1_000_000_000 / a.rate);
        let lat = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
        let errors = Arc::new(AtomicU64::new(0));
        // Paced from a plain thread: `std::thread::sleep` wakes within tens of microseconds,
        // where tokio's timer wheel has a 1 ms granularity and would send requests in bursts.
        let start = Instant::now();
        let rt = tokio::runtime::Handle::current();
        let pacer_clients = clients.clone();
        let (pacer_req, pacer_lat, pacer_errors) = (req.clone(), lat.clone(), errors.clone());
        let handles = tokio::task::spawn_blocking(move || {
            let mut handles = Vec::with_capacity(total as usize);
            for i in 0..total {
                let due = start + interval * (i as u32);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut c = pacer_clients[(i as usize) % pacer_clients.len()].clone();
                let (req, lat, errors) =
                    (pacer_req.clone(), pacer_lat.clone(), pacer_errors.clone());
                handles.push(rt.spawn(async move {
                    let sent = Instant::now();
                    match c.check(req).await {
                        Ok(r) if r.get_ref().status.as_ref().map(|s| s.code) == Some(0) => {
                            let us = sent.elapsed().as_micros() as u64;
                            let from_due = due.elapsed().as_micros() as u64;
                            lat.lock().expect("lock").push((us, from_due));
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            handles
        })
        .await
        .expect("pacer");
        for h in handles {
            let _ = h.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let pairs = std::mem::take(&mut *lat.lock().expect("lock"));
        let mut l: Vec<u64> = pairs.iter().map(|p| p.0).collect();
        let mut d: Vec<u64> = pairs.iter().map(|p| p.1).collect();
        l.sort_unstable();
        d.sort_unstable();
        println!(
            "open loop: target {} checks/s for {}s: {} ok, {} errors, achieved {:.0}/s; latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
            a.rate, a.seconds, l.len(), errors.load(Ordering::Relaxed),
            l.len() as f64 / elapsed,
            percentile(&l, 0.50), percentile(&l, 0.90), percentile(&l, 0.99),
            percentile(&l, 0.999), l.last().copied().unwrap_or(0),
        );
        println!(
            "  (from the scheduled time, including the pacing thread's wake-up: p50 {} p99 {})",
            percentile(&d, 0.50), percentile(&d, 0.99),
        );

        // Phase 2: closed loop.
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(a.seconds);
        let start = Instant::now();
        let mut handles = Vec::new();
        for w in 0..a.concurrency {
            let mut c = clients[w % clients.len()].clone();
            let (req, done, errors) = (req.clone(), done.clone(), errors.clone());
            handles.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    match c.check(req.clone()).await {
                        Ok(r) if r.get_ref().status.as_ref().map(|s| s.code) == Some(0) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let n = done.load(Ordering::Relaxed);
        println!(
            "closed loop: {} in flight over {} connections, server {} worker thread(s): {} ok, {} errors in {:.1}s = {:.0} checks/s",
            a.concurrency, a.connections, a.server_threads, n,
            errors.load(Ordering::Relaxed), elapsed, n as f64 / elapsed,
        );
    });
    server_rt.block_on(async move {
        let written = node.shared.audit.stats().written;
        println!("audit records written: {written}");
        node.shutdown().await;
    });
}
