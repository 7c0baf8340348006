//! The admin endpoint: `/healthz` (the process is up), `/readyz` (it can decide: a valid policy,
//! a writable audit log) and `/metrics` (Prometheus text).
//!
//! It runs on its own thread and single-threaded runtime so that a flood of scrapes never takes
//! time from the data path, and a stalled data path never hides the admin view.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::Shared;

/// Why the node is not ready, or `None` when it is.
pub fn not_ready(shared: &Shared) -> Option<String> {
    if shared.policy.current().is_none() {
        let why = shared
            .policy_source
            .last_error()
            .unwrap_or_else(|| "no policy loaded".into());
        return Some(format!("no valid policy: {why}; every request is denied"));
    }
    if let Some(e) = shared.audit.failure() {
        return Some(format!(
            "audit log unavailable: {e}; every request is denied"
        ));
    }
    if let Some(Err(e)) = shared.dns.get().map(|d| d.health()) {
        return Some(format!("DNS cannot answer: {e}"));
    }
    if *shared.draining.borrow() {
        return Some("draining".into());
    }
    None
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match not_ready(shared) {
            None => {
                let version = shared
                    .policy
                    .current()
                    .map(|p| p.version().to_string())
                    .unwrap_or_default();
                (
                    StatusCode::OK,
                    "text/plain",
                    format!("ready: policy {version}, {} cells\n", shared.cells.len()),
                )
            }
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

/// Starts the admin server on its own thread.
///
/// # Errors
/// When the thread or its runtime cannot start.
pub fn spawn(shared: Arc<Shared>, listener: std::net::TcpListener) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("cellgate-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let r = respond(&shared, &req);
                            async move { Ok::<_, Infallible>(r) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(())
}
