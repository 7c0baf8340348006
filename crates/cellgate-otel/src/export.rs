//! The audit exporter: the audit file is the spool, the cursor is durable, nothing is dropped.
//!
//! One task reads the records after the cursor (up to the log's durable head), sends them as
//! one OTLP logs request, and moves the cursor once the collector accepted them. When the
//! collector is down or slow the task retries the same batch with backoff (200 ms doubling to
//! 5 s) and the log keeps growing behind it: the export falls behind, it never drops. When the
//! collector returns the backlog goes out in chain order. Delivery is at least once (a crash
//! between the collector's answer and the cursor's save sends that batch again); the record's
//! hash (`cellgate.record.hash`) is the dedupe key.
//!
//! The backlog (records written but not exported) is bounded by
//! [`OtlpConfig::max_backlog`](crate::OtlpConfig::max_backlog): past it
//! [`AuditExporter::over_bound`] is true and the node refuses new requests (`audit_backlog`)
//! until the export catches up. An export that made no progress for
//! [`OtlpConfig::stall_after`](crate::OtlpConfig::stall_after) with records waiting is
//! [`ExportStatus::stalled`], and the node's `/readyz` fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cellgate_audit::{Anchor, AuditLog};
use opentelemetry::logs::{Logger as _, LoggerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLoggerProvider};
use opentelemetry_sdk::Resource;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{OtlpConfig, Protocol};
use crate::spool::{self, Cursor, Spooled};

/// How often the task looks for new durable records when it is caught up.
const POLL: Duration = Duration::from_millis(100);
/// First retry delay after a failed export; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP export: {0}")]
pub struct ExportError(pub String);

/// A snapshot of the export, read without locks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExportStatus {
    /// Records the collector accepted.
    pub exported: u64,
    /// Records in export requests that failed (each retry counts again).
    pub failed: u64,
    /// Records written to the log but not yet exported.
    pub backlog: u64,
    /// Age of the oldest record not yet exported, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// Records waiting and no progress for longer than the stall threshold.
    pub stalled: bool,
    /// The backlog is past its bound: new requests are refused.
    pub over_bound: bool,
    /// Times the cursor did not match the log and the export started again from record 1.
    pub restarts: u64,
    /// Signed chain-head anchors the collector accepted.
    pub anchors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    exported: AtomicU64,
    failed: AtomicU64,
    cursor_seq: AtomicU64,
    /// Unix milliseconds of the oldest record read but not yet exported; 0 when none.
    oldest_pending_ms: AtomicU64,
    /// Milliseconds since `started` of the last progress (an accepted batch, or caught up).
    progress_ms: AtomicU64,
    restarts: AtomicU64,
    anchors: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    counters: Counters,
    audit: AuditLog,
    max_backlog: u64,
    stall_after: Duration,
    started: Instant,
    shutdown: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Handle to a running audit exporter. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditExporter {
    inner: Arc<Inner>,
}

impl AuditExporter {
    /// Starts exporting the log at `log_path` (which `audit` writes) to the configured
    /// collector, as `component` (`cellgate-node`, `cellgate-operator`) on `instance`.
    ///
    /// # Errors
    /// The exporter cannot be built (bad endpoint, unreadable CA file). Must be called inside a
    /// tokio runtime.
    ///
    /// `anchors`, when the log is anchored, carries each new signed chain head: it goes out as
    /// a log record too (event `cellgate.audit.anchor`, body the anchor's line of the anchors
    /// file), retried until the collector takes it or a newer anchor replaces it.
    pub fn start(
        config: &OtlpConfig,
        log_path: &Path,
        audit: AuditLog,
        instance: &str,
        anchors: Option<watch::Receiver<Option<Anchor>>>,
    ) -> Result<AuditExporter, ExportError> {
        let mut exporter = build_log_exporter(config)?;
        let resource = resource(&config.service_name, instance);
        opentelemetry_sdk::logs::LogExporter::set_resource(&mut exporter, &resource);
        let cursor = spool::load_cursor(log_path);
        let inner = Arc::new(Inner {
            counters: Counters::default(),
            audit,
            max_backlog: config.max_backlog,
            stall_after: config.stall_after,
            started: Instant::now(),
            shutdown: Notify::new(),
            task: Mutex::new(None),
        });
        inner
            .counters
            .cursor_seq
            .store(cursor.seq, Ordering::Relaxed);
        tracing::info!(
            endpoint = %config.logs_endpoint, protocol = config.protocol.as_str(),
            from_record = cursor.seq + 1, max_backlog = config.max_backlog,
            "exporting the audit log over OTLP"
        );
        let task = Task {
            inner: Arc::clone(&inner),
            exporter,
            log: log_path.to_owned(),
            cursor,
            batch: config.batch.max(1),
            anchors,
            pending_anchor: None,
        };
        let handle = tokio::spawn(task.run());
        if let Ok(mut slot) = inner.task.lock() {
            *slot = Some(handle);
        }
        Ok(AuditExporter { inner })
    }

    /// The backlog is past its bound: the caller must refuse new requests (`audit_backlog`).
    /// Two atomic loads: cheap enough for every decision.
    #[must_use]
    pub fn over_bound(&self) -> bool {
        self.backlog() > self.inner.max_backlog
    }

    /// The configured bound on the backlog.
    #[must_use]
    pub fn max_backlog(&self) -> u64 {
        self.inner.max_backlog
    }

    fn backlog(&self) -> u64 {
        let written = self.inner.audit.stats().last_seq;
        written.saturating_sub(self.inner.counters.cursor_seq.load(Ordering::Relaxed))
    }

    /// Where the export stands.
    #[must_use]
    pub fn status(&self) -> ExportStatus {
        let c = &self.inner.counters;
        let backlog = self.backlog();
        let oldest = c.oldest_pending_ms.load(Ordering::Relaxed);
        let lag_seconds = if backlog == 0 || oldest == 0 {
            0.0
        } else {
            let now = unix_ms(SystemTime::now());
            // Milliseconds fit an f64 exactly for any realistic age.
            #[allow(clippy::cast_precision_loss)]
            let lag = now.saturating_sub(oldest) as f64 / 1000.0;
            lag
        };
        let since_progress = self
            .inner
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(c.progress_ms.load(Ordering::Relaxed)));
        ExportStatus {
            exported: c.exported.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            backlog,
            lag_seconds,
            stalled: backlog > 0 && since_progress > self.inner.stall_after,
            over_bound: backlog > self.inner.max_backlog,
            restarts: c.restarts.load(Ordering::Relaxed),
            anchors: c.anchors.load(Ordering::Relaxed),
        }
    }

    /// Stops the task after one last attempt, within `deadline`, to send what is durable.
    /// What is still not exported stays in the log and goes out at the next start.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.shutdown.notify_one();
        let handle = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut handle) = handle {
            if tokio::time::timeout(deadline, &mut handle).await.is_err() {
                handle.abort();
                tracing::warn!(
                    backlog = self.backlog(),
                    "OTLP export stopped before its backlog was sent; it resumes at the next start"
                );
            }
        }
    }
}

struct Task {
    inner: Arc<Inner>,
    exporter: opentelemetry_otlp::LogExporter,
    log: PathBuf,
    cursor: Cursor,
    batch: usize,
    anchors: Option<watch::Receiver<Option<Anchor>>>,
    pending_anchor: Option<Anchor>,
}

impl Task {
    async fn run(mut self) {
        let provider = SdkLoggerProvider::builder().build();
        let logger = provider.logger("cellgate.audit");
        let scope = InstrumentationScope::builder("cellgate.audit")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let mut backoff = MIN_BACKOFF;
        let mut stopping = false;
        let mut last_warning: Option<Instant> = None;
        loop {
            if let Some(rx) = &mut self.anchors {
                if rx.has_changed().unwrap_or(false) {
                    self.pending_anchor = rx.borrow_and_update().clone();
                }
            }
            if let Some(anchor) = self.pending_anchor.clone() {
                let mut r = logger.create_log_record();
                crate::attrs::fill_anchor(&mut r, &anchor);
                match self.exporter.export(LogBatch::new(&[(&r, &scope)])).await {
                    Ok(()) => {
                        self.pending_anchor = None;
                        self.inner.counters.anchors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, seq = anchor.seq, "anchor export failed; retrying");
                    }
                }
            }
            let batch = match self.read().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "the audit log cannot be read for export; retrying");
                    if self.pause(MAX_BACKOFF, &mut stopping).await {
                        break;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                self.progress();
                self.inner
                    .counters
                    .oldest_pending_ms
                    .store(0, Ordering::Relaxed);
                if stopping || self.pause(POLL, &mut stopping).await {
                    break;
                }
                continue;
            }
            if let Some(t) = batch
                .first()
                .and_then(|s| crate::attrs::parse_time(&s.record.time))
            {
                self.inner
                    .counters
                    .oldest_pending_ms
                    .store(unix_ms(t), Ordering::Relaxed);
            }
            let records: Vec<SdkLogRecord> = batch
                .iter()
                .map(|s| {
                    let mut r = logger.create_log_record();
                    crate::attrs::fill(&mut r, &s.record);
                    r
                })
                .collect();
            let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
                records.iter().map(|r| (r, &scope)).collect();
            let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            match self.exporter.export(LogBatch::new(&refs)).await {
                Ok(()) => {
                    let Some(last) = batch.last() else { continue };
                    self.cursor = last.after.clone();
                    self.save_cursor().await;
                    let c = &self.inner.counters;
                    c.cursor_seq.store(self.cursor.seq, Ordering::Relaxed);
                    c.exported.fetch_add(n, Ordering::Relaxed);
                    self.progress();
                    backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    self.inner.counters.failed.fetch_add(n, Ordering::Relaxed);
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, backlog = self.backlog(),
                            "OTLP export failed; the records stay in the audit log and are sent again");
                        last_warning = Some(Instant::now());
                    }
                    if stopping || self.pause(backoff, &mut stopping).await {
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let _ = self.exporter.shutdown();
    }

    /// Sleeps `d` or until shutdown is asked; `true` when the task should end now (asked
    /// while already stopping).
    async fn pause(&self, d: Duration, stopping: &mut bool) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => false,
            () = self.inner.shutdown.notified() => {
                let again = *stopping;
                *stopping = true;
                again
            }
        }
    }

    fn backlog(&self) -> u64 {
        self.inner
            .audit
            .stats()
            .last_seq
            .saturating_sub(self.cursor.seq)
    }

    fn progress(&self) {
        let ms = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.counters.progress_ms.store(ms, Ordering::Relaxed);
    }

    async fn read(&mut self) -> Result<Vec<Spooled>, spool::SpoolError> {
        let log = self.log.clone();
        let cursor = self.cursor.clone();
        let max = self.batch;
        let read = tokio::task::spawn_blocking(move || {
            let until = spool::durable_seq(&log)?;
            spool::read_batch(&log, &cursor, until, max)
        })
        .await
        .map_err(|e| spool::SpoolError::Io {
            path: self.log.clone(),
            source: std::io::Error::other(e),
        })?;
        let (batch, restarted) = read?;
        if restarted {
            tracing::warn!(log = %self.log.display(), cursor_seq = self.cursor.seq,
                "the export cursor does not match the audit log (replaced?): exporting again from record 1");
            self.inner.counters.restarts.fetch_add(1, Ordering::Relaxed);
            self.cursor = Cursor::start();
            self.inner.counters.cursor_seq.store(0, Ordering::Relaxed);
        }
        Ok(batch)
    }

    async fn save_cursor(&self) {
        let log = self.log.clone();
        let cursor = self.cursor.clone();
        match tokio::task::spawn_blocking(move || spool::save_cursor(&log, &cursor)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "export cursor not saved: a restart sends the last batches again");
            }
            Err(e) => tracing::warn!(error = %e, "export cursor not saved"),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The resource every record and span carries: `service.name`, `service.instance.id`,
/// `service.version`, plus `OTEL_RESOURCE_ATTRIBUTES`.
#[must_use]
pub fn resource(service_name: &str, instance: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attributes([
            KeyValue::new("service.instance.id", instance.to_owned()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build()
}

fn build_log_exporter(c: &OtlpConfig) -> Result<opentelemetry_otlp::LogExporter, ExportError> {
    let err = |e: &dyn std::fmt::Display| ExportError(format!("{}: {e}", c.logs_endpoint));
    let builder = opentelemetry_otlp::LogExporter::builder();
    match c.protocol {
        Protocol::Grpc => grpc_setup(builder.with_tonic(), c, &c.logs_endpoint)?.build(),
        Protocol::HttpProtobuf => http_setup(builder.with_http(), c, &c.logs_endpoint)?.build(),
    }
    .map_err(|e| err(&e))
}

/// An OTLP/gRPC exporter builder (logs or spans) aimed at `endpoint`: timeout, headers as
/// metadata, TLS for an `https` endpoint.
pub(crate) fn grpc_setup<B: WithExportConfig + WithTonicConfig>(
    builder: B,
    c: &OtlpConfig,
    endpoint: &str,
) -> Result<B, ExportError> {
    let b = builder
        .with_endpoint(endpoint.to_owned())
        .with_timeout(c.timeout)
        .with_metadata(metadata(&c.headers)?);
    Ok(if endpoint.starts_with("https://") {
        b.with_tls_config(grpc_tls(c)?)
    } else {
        b
    })
}

/// An OTLP/HTTP (protobuf) exporter builder (logs or spans) aimed at `endpoint`: timeout,
/// headers, and the hyper + rustls client trusting the configured CA or the system roots.
pub(crate) fn http_setup<B: WithExportConfig + WithHttpConfig>(
    builder: B,
    c: &OtlpConfig,
    endpoint: &str,
) -> Result<B, ExportError> {
    let client = crate::http_client::OtlpHttpClient::new(c.ca_file.as_deref(), c.timeout)
        .map_err(|e| ExportError(format!("{endpoint}: {e}")))?;
    Ok(builder
        .with_endpoint(endpoint.to_owned())
        .with_timeout(c.timeout)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_headers(c.headers.iter().cloned().collect::<HashMap<_, _>>())
        .with_http_client(client))
}

/// gRPC metadata from the configured headers.
fn metadata(headers: &[(String, String)]) -> Result<tonic::metadata::MetadataMap, ExportError> {
    let mut md = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
            .map_err(|_| ExportError(format!("bad header name {k:?}")))?;
        let value = tonic::metadata::MetadataValue::try_from(v.as_str())
            .map_err(|_| ExportError(format!("bad value for header {k:?}")))?;
        md.insert(key, value);
    }
    Ok(md)
}

/// TLS for a gRPC endpoint: the configured CA, else the system roots. Plain `http://`
/// endpoints ignore it.
fn grpc_tls(c: &OtlpConfig) -> Result<tonic::transport::ClientTlsConfig, ExportError> {
    let tls = tonic::transport::ClientTlsConfig::new();
    Ok(match &c.ca_file {
        Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(
            crate::tls::pem(ca).map_err(ExportError)?,
        )),
        None => tls.with_native_roots(),
    })
}
