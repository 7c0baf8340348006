//! UDP and TCP listeners around [`DnsHandler`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::handler::{DnsHandler, Transport};
use crate::{bump, Audit, Cells, DnsConfig, DnsStats, Resolve};

/// Receive buffer for one UDP datagram. Queries are a header, one name (at most 255 octets) and an
/// OPT record; 4 KiB is far above any honest query, and a longer datagram is cut here and then
/// fails to parse (FORMERR) rather than costing memory.
pub const MAX_UDP_QUERY: usize = 4096;
/// Largest query accepted over TCP (the 2-byte length prefix allows 65535). Same reasoning as
/// [`MAX_UDP_QUERY`]; a connection announcing more is closed before anything is read.
pub const MAX_TCP_QUERY: usize = 4096;
/// UDP queries being answered at once. Each may wait up to the upstream timeout; beyond this,
/// datagrams are dropped (clients retry) instead of piling up tasks without bound.
pub const MAX_UDP_IN_FLIGHT: usize = 1024;
/// Attempts at finding a port free for both UDP and TCP when `listen` has port 0.
const BIND_ATTEMPTS: usize = 16;
/// Pause after an accept or receive error (e.g. out of file descriptors), so the loop does not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A running resolver. Dropping it stops the listeners too; [`DnsServer::shutdown`] also waits
/// for queries in flight.
#[derive(Debug)]
pub struct DnsServer {
    handler: Arc<DnsHandler>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds UDP and TCP on `config.listen` (the same port on both; port 0 picks one) and serves.
pub async fn serve(
    config: DnsConfig,
    cells: Arc<dyn Cells>,
    resolver: Arc<dyn Resolve>,
    audit: Arc<dyn Audit>,
) -> io::Result<DnsServer> {
    let (udp, tcp) = bind(config.listen).await?;
    let local_addr = udp.local_addr()?;
    let grace = config
        .upstream_timeout
        .saturating_add(Duration::from_secs(1));
    let idle = config.tcp_idle_timeout;
    let max_tcp = config.max_tcp_connections.max(1);
    let handler = Arc::new(DnsHandler::new(config, cells, resolver, audit));
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(udp_loop(
            Arc::new(udp),
            handler.clone(),
            stopped.clone(),
            grace,
        )),
        tokio::spawn(tcp_loop(
            tcp,
            handler.clone(),
            stopped,
            idle,
            max_tcp,
            grace,
        )),
    ];
    tracing::info!(%local_addr, "DNS resolver listening (UDP and TCP)");
    Ok(DnsServer {
        handler,
        local_addr,
        stop,
        tasks,
    })
}

async fn bind(listen: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    if listen.port() != 0 {
        return Ok((
            UdpSocket::bind(listen).await?,
            TcpListener::bind(listen).await?,
        ));
    }
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no port free for UDP and TCP");
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(listen).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl DnsServer {
    /// Where UDP and TCP listen.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The handler (for its counters and health).
    pub fn handler(&self) -> &Arc<DnsHandler> {
        &self.handler
    }

    /// Counters.
    pub fn stats(&self) -> &DnsStats {
        self.handler.stats()
    }

    /// See [`DnsHandler::health`].
    pub fn health(&self) -> Result<(), String> {
        self.handler.health()
    }

    /// Stops accepting, lets queries in flight finish (bounded by the upstream timeout plus one
    /// second), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "DNS listener task ended abnormally");
            }
        }
        tracing::info!(local_addr = %self.local_addr, "DNS resolver stopped");
    }
}

async fn udp_loop(
    socket: Arc<UdpSocket>,
    handler: Arc<DnsHandler>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_UDP_QUERY];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            received = socket.recv_from(&mut buf) => {
                let (len, peer) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS UDP receive failed");
                        tokio::time::sleep(ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    bump(&handler.stats().dropped);
                    continue;
                };
                let query = buf.get(..len).unwrap_or_default().to_vec();
                let (socket, handler) = (socket.clone(), handler.clone());
                tasks.spawn(async move {
                    let response = handler.answer(&query, peer, Transport::Udp).await;
                    if !response.is_empty() {
                        if let Err(e) = socket.send_to(&response, peer).await {
                            tracing::debug!(%peer, error = %e, "DNS UDP send failed");
                        }
                    }
                    drop(permit);
                });
            }
        }
    }
    drain(tasks, grace).await;
}

async fn tcp_loop(
    listener: TcpListener,
    handler: Arc<DnsHandler>,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
    max_connections: usize,
    grace: Duration,
) {
    let connections = Arc::new(Semaphore::new(max_connections));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS TCP accept failed");
                        tokio::time::sleep(ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "DNS TCP connection limit reached; closing");
                    bump(&handler.stats().dropped);
                    continue;
                };
                tasks.spawn(connection(stream, peer, handler.clone(), stop.clone(), idle, permit));
            }
        }
    }
    drain(tasks, grace).await;
}

/// Serves one TCP connection: 2-byte length framing (RFC 1035 section 4.2.2), queries answered in
/// order, closed when idle for `idle`, on a bad frame, or on shutdown.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<DnsHandler>,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
    _permit: OwnedSemaphorePermit,
) {
    loop {
        let mut prefix = [0u8; 2];
        let read = tokio::select! {
            _ = stop.changed() => return,
            r = tokio::time::timeout(idle, stream.read_exact(&mut prefix)) => r,
        };
        if !matches!(read, Ok(Ok(_))) {
            return;
        }
        let len = usize::from(u16::from_be_bytes(prefix));
        if len == 0 || len > MAX_TCP_QUERY {
            handler.oversized(peer, len);
            return;
        }
        let mut query = vec![0u8; len];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let response = handler.answer(&query, peer, Transport::Tcp).await;
        if response.is_empty() {
            continue;
        }
        let Ok(response_len) = u16::try_from(response.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(response.len().saturating_add(2));
        framed.extend_from_slice(&response_len.to_be_bytes());
        framed.extend_from_slice(&response);
        if !matches!(
            tokio::time::timeout(idle, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Waits up to `grace` for tasks in flight, then aborts the rest (dropping the set aborts them).
async fn drain(mut tasks: JoinSet<()>, grace: Duration) {
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
}
