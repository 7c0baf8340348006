//! An OTLP receiver for tests, built from the opentelemetry-proto definitions: real OTLP/gRPC
//! (tonic) and OTLP/HTTP (protobuf bodies on `/v1/logs` and `/v1/traces`) on loopback sockets.
//!
//! It keeps every log record and span it accepted, flattened for assertions, and the raw bytes
//! of every payload (so a test can grep everything that was exported). It can be stopped (the
//! port refuses connections) and started again on the same ports, or made to answer
//! `UNAVAILABLE`/503 while it listens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One log record as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedLog {
    /// Attributes, values rendered as text (lists as `a,b`).
    pub attrs: BTreeMap<String, String>,
    /// Resource attributes of its batch.
    pub resource: BTreeMap<String, String>,
    /// The body as text.
    pub body: String,
    /// `event_name`.
    pub event_name: String,
    /// `severity_number`.
    pub severity: i32,
    /// `time_unix_nano`.
    pub time_unix_nano: u64,
    /// `trace_id` (hex; empty when none).
    pub trace_id: String,
    /// Which transport brought it: `grpc` or `http`.
    pub transport: &'static str,
}

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// Span name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root).
    pub parent_span_id: String,
    /// `kind` as the protocol numbers it (2 server, 3 client, 1 internal).
    pub kind: i32,
    /// Attributes, values as text.
    pub attrs: BTreeMap<String, String>,
    /// Resource attributes.
    pub resource: BTreeMap<String, String>,
    /// Start and end, Unix nanoseconds.
    pub start: u64,
    /// End, Unix nanoseconds.
    pub end: u64,
    /// Which transport brought it.
    pub transport: &'static str,
}

#[derive(Debug, Default)]
struct Received {
    logs: Vec<ReceivedLog>,
    spans: Vec<ReceivedSpan>,
    payloads: Vec<Vec<u8>>,
    requests: u64,
}

#[derive(Debug, Default)]
struct Shared {
    received: Mutex<Received>,
    unavailable: AtomicBool,
}

/// A running receiver.
#[derive(Debug)]
pub struct OtlpReceiver {
    /// OTLP/gRPC address.
    pub grpc: SocketAddr,
    /// OTLP/HTTP address.
    pub http: SocketAddr,
    shared: Arc<Shared>,
    stop: Mutex<Vec<oneshot::Sender<()>>>,
}

impl OtlpReceiver {
    /// Starts both transports on loopback ports.
    ///
    /// # Panics
    /// When a port cannot be bound.
    pub async fn start() -> OtlpReceiver {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = OtlpReceiver {
            grpc: grpc.local_addr().unwrap(),
            http: http.local_addr().unwrap(),
            shared: Arc::default(),
            stop: Mutex::new(Vec::new()),
        };
        r.serve(grpc, http);
        r
    }

    /// `http://ADDR` of the gRPC transport.
    #[must_use]
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://ADDR` of the HTTP transport (append `/v1/logs`).
    #[must_use]
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    fn serve(&self, grpc: TcpListener, http: TcpListener) {
        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let (stop_http, http_stopped) = oneshot::channel::<()>();
        let shared = Arc::clone(&self.shared);
        let routes = tonic::service::Routes::new(LogsServiceServer::new(Grpc(Arc::clone(&shared))))
            .add_service(TraceServiceServer::new(Grpc(Arc::clone(&shared))))
            .prepare();
        // A stop closes the listener and every open connection at once, as a collector that goes
        // away does (a graceful shutdown would keep serving the connections already open).
        tokio::spawn(accept_loop(grpc, grpc_stopped, move |stream| {
            let svc = hyper_util::service::TowerToHyperService::new(routes.clone());
            async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        }));
        tokio::spawn(accept_loop(http, http_stopped, move |stream| {
            let shared = Arc::clone(&shared);
            async move {
                let svc =
                    hyper::service::service_fn(move |req| http_export(Arc::clone(&shared), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        }));
        if let Ok(mut s) = self.stop.lock() {
            s.push(stop_grpc);
            s.push(stop_http);
        }
    }

    /// Closes both ports: exports now fail with "connection refused".
    pub async fn stop(&self) {
        let stops: Vec<_> = self.stop.lock().unwrap().drain(..).collect();
        for s in stops {
            let _ = s.send(());
        }
        // Until the listeners are really gone.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.grpc).await.is_err()
                && tokio::net::TcpStream::connect(self.http).await.is_err()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the OTLP receiver's ports stayed open");
    }

    /// Listens again on the same ports.
    ///
    /// # Panics
    /// When a port cannot be bound again.
    pub async fn restart(&self) {
        let grpc = TcpListener::bind(self.grpc).await.unwrap();
        let http = TcpListener::bind(self.http).await.unwrap();
        self.serve(grpc, http);
    }

    /// While `true`, every export is refused (`UNAVAILABLE` / 503) and nothing is kept.
    pub fn set_unavailable(&self, v: bool) {
        self.shared.unavailable.store(v, Ordering::SeqCst);
    }

    /// Every log record accepted so far, in arrival order.
    #[must_use]
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.shared.received.lock().unwrap().logs.clone()
    }

    /// Every span accepted so far, in arrival order.
    #[must_use]
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.received.lock().unwrap().spans.clone()
    }

    /// The raw protobuf of every accepted export request.
    #[must_use]
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.shared.received.lock().unwrap().payloads.clone()
    }

    /// Export requests answered (accepted or refused).
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.shared.received.lock().unwrap().requests
    }
}

/// Accepts connections and serves each with `serve` until `stopped`, then aborts them all.
async fn accept_loop<F, Fut>(listener: TcpListener, mut stopped: oneshot::Receiver<()>, serve: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                conns.spawn(serve(stream));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.abort_all();
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| text(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn keep_logs(shared: &Shared, req: &ExportLogsServiceRequest, transport: &'static str) {
    let mut r = shared.received.lock().unwrap();
    r.payloads.push(req.encode_to_vec());
    for rl in &req.resource_logs {
        let resource = rl
            .resource
            .as_ref()
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for sl in &rl.scope_logs {
            for l in &sl.log_records {
                r.logs.push(ReceivedLog {
                    attrs: attrs(&l.attributes),
                    resource: resource.clone(),
                    body: text(l.body.as_ref()),
                    event_name: l.event_name.clone(),
                    severity: l.severity_number,
                    time_unix_nano: l.time_unix_nano,
                    trace_id: hex(&l.trace_id),
                    transport,
                });
            }
        }
    }
}

fn keep_spans(shared: &Shared, req: &ExportTraceServiceRequest, transport: &'static str) {
    let mut r = shared.received.lock().unwrap();
    r.payloads.push(req.encode_to_vec());
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                r.spans.push(ReceivedSpan {
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attrs: attrs(&s.attributes),
                    resource: resource.clone(),
                    start: s.start_time_unix_nano,
                    end: s.end_time_unix_nano,
                    transport,
                });
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug)]
struct Grpc(Arc<Shared>);

#[tonic::async_trait]
impl LogsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.0.received.lock().unwrap().requests += 1;
        if self.0.unavailable.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("test receiver made unavailable"));
        }
        keep_logs(&self.0, request.get_ref(), "grpc");
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.received.lock().unwrap().requests += 1;
        if self.0.unavailable.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("test receiver made unavailable"));
        }
        keep_spans(&self.0, request.get_ref(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let answer = |status: u16, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        Ok(r)
    };
    let path = req.uri().path().to_owned();
    let ctype = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(body) = req.into_body().collect().await else {
        return answer(400, Vec::new());
    };
    let body = body.to_bytes();
    shared.received.lock().unwrap().requests += 1;
    if ctype != "application/x-protobuf" {
        return answer(415, Vec::new());
    }
    if shared.unavailable.load(Ordering::SeqCst) {
        return answer(503, Vec::new());
    }
    match path.as_str() {
        "/v1/logs" => match ExportLogsServiceRequest::decode(body) {
            Ok(req) => {
                keep_logs(&shared, &req, "http");
                answer(200, ExportLogsServiceResponse::default().encode_to_vec())
            }
            Err(_) => answer(400, Vec::new()),
        },
        "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
            Ok(req) => {
                keep_spans(&shared, &req, "http");
                answer(200, ExportTraceServiceResponse::default().encode_to_vec())
            }
            Err(_) => answer(400, Vec::new()),
        },
        _ => answer(404, Vec::new()),
    }
}
