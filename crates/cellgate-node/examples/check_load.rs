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
//! First, the machine's floor: a 1 KiB ping-pong over loopback TCP between two plain threads.
//! Phase 0: `CheckService::check` in-process, no gRPC. Open loops (one call every 1/rate s,
//! paced by a plain thread and each sent on its own task, latency from send to answer and,
//! separately, from the moment it was due): 1a, an empty gRPC call (health Check) for the gRPC
//! floor; 1, Check from tonic's client; 1b, Check from an Envoy-like `h2` client that sends
//! HEADERS and DATA in one write. Each Check loop also prints the node's handler time for the
//! same checks, from its `/metrics` histogram. Phase 2 (closed loop): `--concurrency` requests in
//! flight over `--connections` HTTP/2 connections for the same duration.

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
        ("x-cellgate-direct-peer", "127.0.0.1"),
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

/// Cumulative bucket counts of `cellgate_ext_authz_check_duration_seconds`, read from the
/// node's Prometheus text exactly as a scrape of `/metrics` returns it: (upper bound µs, count).
fn handler_buckets(node: &cellgate_node::Shared) -> Buckets {
    let prefix = "cellgate_ext_authz_check_duration_seconds_bucket{le=\"";
    node.metrics
        .encode()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1e6
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Percentile `p` of the observations between two bucket snapshots, interpolated linearly
/// inside its bucket (as Prometheus' `histogram_quantile` does).
fn bucket_percentile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> f64 {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1.saturating_sub(b.1)))
        .collect();
    let total = counts.last().map_or(0, |c| c.1);
    if total == 0 {
        return f64::NAN;
    }
    let rank = p * total as f64;
    let mut lower = (0.0, 0_u64);
    for &(le, cum) in &counts {
        if cum as f64 >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let inside = (cum - lower.1) as f64;
            let frac = if inside > 0.0 {
                (rank - lower.1 as f64) / inside
            } else {
                1.0
            };
            return lower.0 + (le - lower.0) * frac;
        }
        lower = (le, cum);
    }
    lower.0
}

/// The machine's own floor: a 1 KiB request and a 1 KiB answer over loopback TCP between two
/// plain threads blocked in `read`, paced at `rate` for up to 5 s. No gRPC, no tokio.
fn tcp_floor(rate: u64, seconds: u64) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0_u8; 1024];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let total = rate * seconds.min(5);
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut buf = [7_u8; 1024];
    let mut l = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval * (i as u32);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        c.write_all(&buf).expect("write");
        c.read_exact(&mut buf).expect("read");
        l.push(t.elapsed().as_micros() as u64);
    }
    drop(c);
    let _ = echo.join();
    l.sort_unstable();
    println!(
        "machine floor (1 KiB ping-pong over loopback TCP, two blocked threads, {rate} /s): latency us p50 {} p90 {} p99 {}",
        percentile(&l, 0.50), percentile(&l, 0.90), percentile(&l, 0.99),
    );
}

/// The request as gRPC puts it on the wire: uncompressed flag, big-endian length, message.
fn grpc_frame(msg: &CheckRequest) -> bytes::Bytes {
    use prost::Message;
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&u32::try_from(len).expect("small message").to_be_bytes());
    msg.encode(&mut buf).expect("encode");
    buf.into()
}

/// An HTTP/2 connection for [`envoy_like_check`].
async fn h2_connect(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One Check sent the way Envoy's own gRPC client sends it: HEADERS and the DATA frame with
/// END_STREAM queued together, so they leave in one write (tonic's client pipes the body from
/// a separate task, so HEADERS and DATA usually leave in two writes and wake the server twice).
/// Returns the CheckResponse's `status.code`.
async fn envoy_like_check(
    send: &h2::client::SendRequest<bytes::Bytes>,
    uri: &http::Uri,
    frame: bytes::Bytes,
) -> Result<i32, String> {
    use prost::Message;
    let mut send = send.clone().ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method("POST")
        .uri(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, mut stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
    stream.send_data(frame, true).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok());
    if grpc_status != Some("0") {
        return Err(format!("grpc-status {grpc_status:?}"));
    }
    let msg = data.get(5..).ok_or("short gRPC frame")?;
    let r = envoy_types::pb::envoy::service::auth::v3::CheckResponse::decode(msg)
        .map_err(|e| e.to_string())?;
    Ok(r.status.map_or(-1, |s| s.code))
}

/// Cumulative histogram buckets: (upper bound µs, count).
type Buckets = Vec<(f64, u64)>;

/// What one open loop measured.
struct OpenLoop {
    rate: u64,
    seconds: u64,
    /// Send to answer, µs, sorted.
    latency: Vec<u64>,
    /// Due time to answer, µs, sorted (includes the pacing thread's wake-up).
    from_due: Vec<u64>,
    errors: u64,
    elapsed: f64,
}

impl OpenLoop {
    /// Prints the figures; with bucket snapshots, the node's handler time for the same calls.
    fn print(&self, what: &str, handler: Option<(&Buckets, &Buckets)>) {
        let l = &self.latency;
        println!(
            "{what}: target {} /s for {}s: {} ok, {} errors, achieved {:.0}/s; latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
            self.rate, self.seconds, l.len(), self.errors, l.len() as f64 / self.elapsed,
            percentile(l, 0.50), percentile(l, 0.90), percentile(l, 0.99),
            percentile(l, 0.999), l.last().copied().unwrap_or(0),
        );
        println!(
            "  (from the scheduled time, including the pacing thread's wake-up: p50 {} p99 {})",
            percentile(&self.from_due, 0.50),
            percentile(&self.from_due, 0.99),
        );
        if let Some((before, after)) = handler {
            println!(
                "  node handler time, same calls (cellgate_ext_authz_check_duration_seconds, from /metrics buckets): p50 {:.1} us, p90 {:.1} us, p99 {:.1} us",
                bucket_percentile(before, after, 0.50),
                bucket_percentile(before, after, 0.90),
                bucket_percentile(before, after, 0.99),
            );
        }
    }
}

/// Sends `rate × seconds` calls, one every 1/rate s, each on its own task of the current
/// runtime. Paced from a plain thread: `std::thread::sleep` wakes within tens of microseconds,
/// where tokio's timer wheel has a 1 ms granularity and would send calls in bursts. `call(i)`
/// makes the i-th call; its future resolves to whether the answer was the expected one.
async fn open_loop<F, Fut>(rate: u64, seconds: u64, call: F) -> OpenLoop
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let total = rate * seconds;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let lat = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let rt = tokio::runtime::Handle::current();
    let (pacer_lat, pacer_errors) = (lat.clone(), errors.clone());
    let handles = tokio::task::spawn_blocking(move || {
        let mut handles = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = start + interval * (i as u32);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let fut = call(i as usize);
            let (lat, errors) = (pacer_lat.clone(), pacer_errors.clone());
            handles.push(rt.spawn(async move {
                let sent = Instant::now();
                if fut.await {
                    let us = sent.elapsed().as_micros() as u64;
                    let from_due = due.elapsed().as_micros() as u64;
                    lat.lock().expect("lock").push((us, from_due));
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
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
    let mut latency: Vec<u64> = pairs.iter().map(|p| p.0).collect();
    let mut from_due: Vec<u64> = pairs.iter().map(|p| p.1).collect();
    latency.sort_unstable();
    from_due.sort_unstable();
    OpenLoop {
        rate,
        seconds,
        latency,
        from_due,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
    }
}

fn main() {
    let a = args();
    tcp_floor(a.rate, a.seconds);
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
    let node_ref = node.shared.clone();
    client_rt.block_on(async move {
        let mut clients = Vec::new();
        let mut clients_ch = Vec::new();
        for _ in 0..a.connections {
            let ch = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect");
            clients_ch.push(ch.clone());
            clients.push(AuthorizationClient::new(ch));
        }
        // Sanity + warm-up.
        let r = clients[0].clone().check(req.clone()).await.expect("check");
        assert_eq!(r.into_inner().status.map(|s| s.code), Some(0), "bench request must be allowed");
        for _ in 0..2000 {
            let _ = clients[0].clone().check(req.clone()).await;
        }

        // Phase 1a: the transport floor: gRPC health Check (no Cellgate work) over the same
        // connections, at the same rate, paced the same way.
        let health: Vec<_> = clients_ch
            .iter()
            .map(|ch| tonic_health::pb::health_client::HealthClient::new(ch.clone()))
            .collect();
        let run = open_loop(a.rate, a.seconds.min(5), move |i| {
            let mut c = health[i % health.len()].clone();
            async move {
                c.check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .is_ok()
            }
        })
        .await;
        run.print("transport floor (grpc.health.v1 Check, same server)", None);

        // Phase 1: open loop at `rate`, tonic's client.
        let before = handler_buckets(&node_ref);
        let (tonic_clients, tonic_req) = (clients.clone(), req.clone());
        let run = open_loop(a.rate, a.seconds, move |i| {
            let mut c = tonic_clients[i % tonic_clients.len()].clone();
            let req = tonic_req.clone();
            async move {
                matches!(c.check(req).await,
                    Ok(r) if r.get_ref().status.as_ref().map(|s| s.code) == Some(0))
            }
        })
        .await;
        run.print("open loop, tonic client", Some((&before, &handler_buckets(&node_ref))));

        // Phase 1b: the same open loop from an Envoy-like HTTP/2 client (one write per Check).
        let uri: http::Uri = format!("http://{addr}/envoy.service.auth.v3.Authorization/Check")
            .parse()
            .expect("uri");
        let mut conns = Vec::new();
        for _ in 0..a.connections {
            conns.push(h2_connect(addr).await);
        }
        let frame = grpc_frame(&req);
        for _ in 0..2000 {
            assert_eq!(envoy_like_check(&conns[0], &uri, frame.clone()).await, Ok(0));
        }
        let before = handler_buckets(&node_ref);
        let run = open_loop(a.rate, a.seconds, move |i| {
            let send = conns[i % conns.len()].clone();
            let (uri, frame) = (uri.clone(), frame.clone());
            async move { envoy_like_check(&send, &uri, frame).await == Ok(0) }
        })
        .await;
        run.print("open loop, Envoy-like h2 client", Some((&before, &handler_buckets(&node_ref))));

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
