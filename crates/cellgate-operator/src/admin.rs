//! The admin listener (`/healthz`, `/readyz`, `/metrics`), served by axum on its own thread and
//! single-threaded runtime so that a busy controller never starves health checks, and the other
//! way round.
//!
//! `/readyz` answers 200 on the leader (`ready: leader ...`) and on a standby (`ready: standby
//! ...`, naming the leader): a standby serves the control API and must be ready for a rolling
//! update to proceed. It answers 503 before startup is done, until the leader election has
//! reached the API server once, and once shutdown has begun.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::leader::{LeaderStatus, Leadership};
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Debug, Default)]
pub struct AdminState {
    /// Set once the control API serves and the election runs, cleared at shutdown; `/readyz`
    /// answers 503 while it is not set.
    pub ready: AtomicBool,
    /// What the leader election last saw.
    pub leadership: Arc<LeaderStatus>,
    /// The controller's metrics.
    pub metrics: Arc<Metrics>,
}

/// Why the admin listener did not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound.
    #[error("cannot bind the admin listener on {addr}: {source}; choose another --admin")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The admin thread or its runtime could not start.
    #[error("cannot start the admin thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running admin listener. Dropping it leaves the thread running; call [`Admin::shutdown`].
#[derive(Debug)]
pub struct Admin {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Admin {
    /// Stops accepting and waits for the thread to end.
    pub fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The admin routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    readiness(&state)
}

/// What `/readyz` answers.
pub fn readiness(state: &AdminState) -> (StatusCode, String) {
    if !state.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the operator is starting or shutting down\n".into(),
        );
    }
    match state.leadership.get() {
        Leadership::Unknown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the leader election has not reached the API server yet\n".into(),
        ),
        Leadership::Leading => (
            StatusCode::OK,
            "ready: leader; the controllers run in this replica\n".into(),
        ),
        Leadership::Standby { holder } => (
            StatusCode::OK,
            format!(
                "ready: standby; the controllers run in the leader {}; this replica serves the control API and takes over when the lease expires\n",
                holder.as_deref().unwrap_or("(none: the lease is free)")
            ),
        ),
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Binds `addr` now (so a bad address fails startup) and serves on a dedicated thread.
///
/// # Errors
/// [`AdminError`] when the address cannot be bound or the thread cannot start.
pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> Result<Admin, AdminError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AdminError::Thread)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("cellgate-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener unusable");
                        return;
                    }
                };
                let served = axum::serve(listener, router(state))
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "admin listener stopped");
                }
            });
        })
        .map_err(AdminError::Thread)?;
    Ok(Admin {
        addr: bound,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let state = Arc::new(AdminState::default());
        state.metrics.failed("kube_get");
        let admin = start("127.0.0.1:0".parse().expect("addr"), state.clone()).expect("start");
        assert!(get(admin.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(admin.addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        state.ready.store(true, Ordering::Release);
        let r = get(admin.addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("the leader election has not reached"),
            "{r}"
        );
        state.leadership.set(Leadership::Standby {
            holder: Some("cellgate-operator-a".into()),
        });
        let r = get(admin.addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200")
                && r.contains(
                    "ready: standby; the controllers run in the leader cellgate-operator-a"
                ),
            "{r}"
        );
        state.leadership.set(Leadership::Leading);
        let r = get(admin.addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("ready: leader"),
            "{r}"
        );
        let m = get(admin.addr, "/metrics").await;
        assert!(
            m.contains("cellgate_operator_reconcile_errors_total{reason=\"kube_get\"} 1"),
            "{m}"
        );
        tokio::task::spawn_blocking(move || admin.shutdown())
            .await
            .expect("join");
    }
}
