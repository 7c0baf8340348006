//! Opaque relays decided at L4: TLS passthrough (on SNI and port), other TCP (on the dialled
//! address and port), and upgraded HTTP connections (WebSocket).
//!
//! A relay stays authorized only as long as its decision holds: every change of cells, policy or
//! revocations re-evaluates it, and a relay now denied is closed and audited with reason
//! `revoked`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::decide::{self, ConnIdentity, Facts};
use crate::Shared;

/// Relays bytes both ways until either side closes, the node drains, or a re-check denies.
pub async fn relay<A, B>(
    shared: Arc<Shared>,
    mut a: A,
    mut b: B,
    ident: &ConnIdentity,
    facts: &Facts,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut generation = shared.generation.subscribe();
    let mut draining = shared.draining.subscribe();
    let activity = Activity::new();
    let mut a = Tracked::new(&mut a, activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let expiry = tokio::time::sleep_until(decide::expiry_deadline(&ident.claims));
    tokio::pin!(expiry);
    let idle_limit = shared.config.tunnel_idle_timeout;
    let mut idle_check = tokio::time::interval(idle_limit / 4);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = idle_check.tick() => {
                if activity.idle_for() >= idle_limit {
                    tracing::info!(idle_s = idle_limit.as_secs(), "closing an idle relay");
                    return;
                }
            }
            () = &mut expiry => {
                decide::record_expired_close(&shared, ident, facts, &format!("{} connection", facts.protocol)).await;
                return;
            }
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "relay ended with an error");
                }
                return;
            }
            changed = generation.changed() => {
                if changed.is_err() { return; }
                let out = decide::decide(&shared, ident, facts);
                if !out.allowed() {
                    let mut out = out;
                    out.reasons.insert(0, format!("open {} connection closed: {}", facts.protocol, out.reason));
                    out.reason = decide::Reason::Revoked;
                    tracing::info!(reason = %out.reason, "closing a relay its authorization no longer allows");
                    let _ = decide::commit(&shared, ident.into(), facts, &out).await;
                    return;
                }
            }
            _ = crate::until_draining(&mut draining) => {
                // Give the drain grace period to the relay, then the task is aborted.
                let _ = (&mut copy).await;
                return;
            }
        }
    }
}

/// Other TCP: decided on the dialled address and port; connects to exactly that address.
pub async fn serve_tcp(
    shared: Arc<Shared>,
    stream: TcpStream,
    ident: ConnIdentity,
    prefix: Vec<u8>,
) {
    let facts = Facts {
        protocol: "tcp",
        port: ident.original_dst.port(),
        front_door: "intake",
        ..Facts::default()
    };
    let target = ident.original_dst;
    serve_l4(
        shared,
        stream,
        ident,
        prefix,
        facts,
        move |_, _| async move { Ok((vec![target], None)) },
    )
    .await;
}

/// TLS the node does not decrypt: decided on SNI and port (or address and port with no SNI).
pub async fn serve_tls_passthrough(
    shared: Arc<Shared>,
    stream: TcpStream,
    ident: ConnIdentity,
    hello: Vec<u8>,
    sni: Option<String>,
) {
    let port = ident.original_dst.port();
    let facts = Facts {
        protocol: "tls",
        host: sni.clone(),
        sni: sni.clone(),
        port,
        front_door: "intake",
        ..Facts::default()
    };
    let dialled = ident.original_dst;
    serve_l4(
        shared,
        stream,
        ident,
        hello,
        facts,
        move |shared: Arc<Shared>, filter: bool| async move {
            match sni {
                Some(h) => {
                    crate::upstream::resolve_checked(&shared.config.resolve, &h, port, filter)
                        .await
                        .map(|(addrs, filtered)| (addrs, filtered.then_some(h)))
                }
                // No name: only an address capability can have allowed it.
                None => Ok((vec![dialled], None)),
            }
        },
    )
    .await;
}

async fn serve_l4<F, Fut>(
    shared: Arc<Shared>,
    stream: TcpStream,
    ident: ConnIdentity,
    prefix: Vec<u8>,
    facts: Facts,
    targets: F,
) where
    F: FnOnce(Arc<Shared>, bool) -> Fut,
    // The addresses to try, and the name they were resolved from when they were filtered.
    Fut: std::future::Future<Output = std::io::Result<(Vec<SocketAddr>, Option<String>)>>,
{
    // A new relay counts against the cell's request rate, like an HTTP request.
    let out = decide::admit(&shared, &ident, &facts).await;
    let out = match decide::conclude(&shared, (&ident).into(), &facts, out).await {
        decide::Concluded::Forward(out, _) => out,
        // Nothing is forwarded; the agent sees the connection close.
        decide::Concluded::Answer(_) => return,
    };
    let internal = out
        .granting_capability()
        .is_some_and(|c| c.allow_internal_addresses);
    let (addrs, filtered_name) = match targets(shared.clone(), !internal).await {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return after_allow(&shared, &ident, &facts, &out, e).await;
        }
        Err(e) => return after_allow(&shared, &ident, &facts, &out, e).await,
    };
    let connected = crate::upstream::connect_any(&addrs, shared.config.connect_timeout)
        .await
        .and_then(|s| match &filtered_name {
            Some(name) => crate::upstream::refuse_own_address(&s, name).map(|()| s),
            None => Ok(s),
        });
    let mut up = match connected {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return after_allow(&shared, &ident, &facts, &out, e).await;
        }
        Err(e) => return after_allow(&shared, &ident, &facts, &out, e).await,
    };
    if !prefix.is_empty() && up.write_all(&prefix).await.is_err() {
        return;
    }
    relay(shared, stream, up, &ident, &facts).await;
}

/// A relay that cannot be opened after its allow: a resolved address the node never connects
/// to for a name (`destination_forbidden`, a denial), or an upstream that cannot be resolved or
/// reached. Recorded; the agent sees the connection close with nothing sent.
async fn after_allow(
    shared: &Shared,
    ident: &ConnIdentity,
    facts: &Facts,
    out: &decide::Outcome,
    e: std::io::Error,
) {
    let reason = crate::upstream::classify(&e);
    decide::after_allow(shared, ident.into(), facts, out, reason, e.to_string()).await;
}

/// When the last byte moved on a connection, either way.
#[derive(Debug, Clone)]
pub struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Activity {
    /// Starts counting now.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the last byte moved (or since the start).
    pub fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(
            self.last_ms.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.start.elapsed().saturating_sub(last)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream that records in an [`Activity`] each time a byte moves.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
