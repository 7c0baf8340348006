//! Cellgate's OpenTelemetry export.
//!
//! - [`AuditExporter`]: every audit record as an OTLP log record, read from the audit file
//!   itself (the spool) after a durable cursor, so a collector that is down or slow makes the
//!   export fall behind, never drop; the backlog has a bound past which the node fails closed.
//!   Attribute names: [`attrs`].
//! - [`RequestTracer`]: a span per forwarded request (decision, upstream connect, response)
//!   that joins the agent's own trace when it sent W3C `traceparent`.
//! - [`OtlpConfig`]: the standard `OTEL_EXPORTER_OTLP_*` variables and the flags that override
//!   them; gRPC (tonic) and HTTP/protobuf.

pub mod attrs;
mod config;
mod export;
mod http_client;
pub mod spool;
mod tls;
mod trace;

pub use config::{OtlpConfig, OtlpFlags, Protocol, DEFAULT_MAX_BACKLOG, DEFAULT_STALL_AFTER};
pub use export::{resource, AuditExporter, ExportError, ExportStatus};
pub use opentelemetry::KeyValue;
pub use trace::{RequestSpan, RequestTracer};
