//! A span per forwarded request, joined to the agent's trace.
//!
//! When the agent sent a W3C `traceparent` (and `tracestate`), the request's span is a child of
//! the agent's span, so the agent's trace shows what the boundary did; the headers themselves go
//! upstream unchanged (the node does not rewrite them). Without one, the span starts a trace.
//!
//! The request span (`SERVER`, named after the method, with `http.request.method`,
//! `server.address`, `url.path`, `cellgate.cell`, `cellgate.request.id`, ...) has three
//! children with their real start and end times: `cellgate.decide` (the decision, its result,
//! reason and capability), `cellgate.upstream.connect` (resolve, connect and TLS toward the
//! upstream) and `cellgate.upstream` (`CLIENT`, from sending the request to the response head,
//! with `http.response.status_code`). A request that was refused has only `cellgate.decide`.
//!
//! Spans are sent by a task of the caller's runtime through a bounded queue: a slow collector
//! makes spans drop (counted in [`RequestTracer::dropped`]), never requests wait. The audit
//! record, not the span, is the evidence: records are never dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tokio::sync::mpsc;

use crate::config::{OtlpConfig, Protocol};
use crate::export::{grpc_setup, http_setup, resource, ExportError};

/// Finished spans waiting for the export task; past it spans are dropped and counted.
const QUEUE: usize = 4096;
/// Most spans per export request.
const BATCH: usize = 512;
/// Longest time a finished span waits for company before it is sent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Makes the spans of forwarded requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RequestTracer {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    dropped: Arc<AtomicU64>,
}

impl RequestTracer {
    /// Starts the span export, or `Ok(None)` when no traces endpoint is configured.
    ///
    /// # Errors
    /// The exporter cannot be built. Must be called inside a tokio runtime.
    pub fn start(config: &OtlpConfig, instance: &str) -> Result<Option<Self>, ExportError> {
        let Some(endpoint) = config.traces_endpoint.clone() else {
            return Ok(None);
        };
        let err = |e: &dyn std::fmt::Display| ExportError(format!("{endpoint}: {e}"));
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let mut exporter = match config.protocol {
            Protocol::Grpc => grpc_setup(builder.with_tonic(), config, &endpoint)?.build(),
            Protocol::HttpProtobuf => http_setup(builder.with_http(), config, &endpoint)?.build(),
        }
        .map_err(|e| err(&e))?;
        let resource = resource(&config.service_name, instance);
        exporter.set_resource(&resource);
        let (tx, mut rx) = mpsc::channel::<SpanData>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                let first = rx.recv().await;
                let Some(first) = first else { break };
                batch.push(first);
                let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(s)) => batch.push(s),
                        Ok(None) | Err(_) => break,
                    }
                }
                if let Err(e) = exporter.export(std::mem::take(&mut batch)).await {
                    tracing::debug!(error = %e, "span export failed; those spans are lost (the audit records are not)");
                }
            }
            let _ = exporter.shutdown();
        });
        let processor = Queue {
            tx,
            dropped: Arc::clone(&dropped),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer_with_scope(
            &provider,
            opentelemetry::InstrumentationScope::builder("cellgate.node")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        tracing::info!(endpoint = %endpoint, "exporting request spans over OTLP");
        Ok(Some(RequestTracer {
            provider,
            tracer,
            dropped,
        }))
    }

    /// Spans dropped because the export queue was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Starts the span of one request, a child of the agent's span when `headers` carry a
    /// valid `traceparent`.
    pub fn request(
        &self,
        headers: &http::HeaderMap,
        method: &str,
        host: &str,
        path: &str,
    ) -> RequestSpan {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let span = self
            .tracer
            .span_builder(method.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("server.address", host.to_owned()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
        }
    }

    /// Sends what is queued and stops.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// The span of one request; ends when dropped (or at [`RequestSpan::end`]).
#[derive(Debug)]
pub struct RequestSpan {
    cx: Context,
    tracer: SdkTracer,
}

impl RequestSpan {
    /// The trace id (hex) of this span, for logs.
    #[must_use]
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// Adds attributes to the request span.
    pub fn set(&self, attrs: Vec<KeyValue>) {
        self.cx.span().set_attributes(attrs);
    }

    fn child(
        &self,
        name: &'static str,
        kind: SpanKind,
        start: SystemTime,
        end: SystemTime,
        attrs: Vec<KeyValue>,
        error: Option<&str>,
    ) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &self.cx);
        if let Some(e) = error {
            span.set_status(Status::error(e.to_owned()));
        }
        span.end_with_timestamp(end);
    }

    /// The decision: its result, reason and the capability that matched.
    pub fn decision(
        &self,
        start: SystemTime,
        end: SystemTime,
        result: &str,
        reason: &str,
        capability: Option<&str>,
    ) {
        let mut attrs = vec![
            KeyValue::new("cellgate.decision", result.to_owned()),
            KeyValue::new("cellgate.reason", reason.to_owned()),
        ];
        if let Some(c) = capability {
            attrs.push(KeyValue::new("cellgate.capability", c.to_owned()));
        }
        self.child(
            "cellgate.decide",
            SpanKind::Internal,
            start,
            end,
            attrs,
            None,
        );
        if result != "allow" {
            self.cx
                .span()
                .set_status(Status::error(format!("{result}: {reason}")));
        }
    }

    /// Resolving, connecting and the TLS handshake toward the upstream.
    pub fn connect(
        &self,
        start: SystemTime,
        end: SystemTime,
        peer: Option<std::net::SocketAddr>,
        error: Option<&str>,
    ) {
        let mut attrs = Vec::new();
        if let Some(p) = peer {
            attrs.push(KeyValue::new("network.peer.address", p.ip().to_string()));
            attrs.push(KeyValue::new("network.peer.port", i64::from(p.port())));
        }
        self.child(
            "cellgate.upstream.connect",
            SpanKind::Internal,
            start,
            end,
            attrs,
            error,
        );
    }

    /// The upstream exchange, from sending the request to the response head.
    pub fn response(&self, start: SystemTime, end: SystemTime, status: Option<u16>) {
        let mut attrs = Vec::new();
        if let Some(s) = status {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
            self.cx
                .span()
                .set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        let error = match status {
            None => Some("no response from the upstream"),
            Some(_) => None,
        };
        self.child(
            "cellgate.upstream",
            SpanKind::Client,
            start,
            end,
            attrs,
            error,
        );
    }

    /// Ends the request span now.
    pub fn end(self) {
        self.cx.span().end();
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        // Ending twice is a no-op; a span dropped on an early return still ends.
        self.cx.span().end();
    }
}

#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Arc<AtomicU64>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
