//! `cellgate-tagger`: the sidecar in every agent pod.
//!
//! `cellgate-init` redirects all of the agent's outbound TCP to this process. For each
//! connection it recovers the address the agent dialled ([`orig_dst`]), connects to the node
//! proxy, writes a Proxy Protocol v2 header carrying the agent's address, that destination and
//! the cell's identity token ([`token`]), then copies bytes both ways until both sides are done.
//! It holds the token and nothing else: no policy, no secrets, no TLS keys.
//!
//! With `--max-connections N` it is also the cell's connection ceiling: at most N agent
//! connections are open at once, and one more is closed before the node is contacted. The agent
//! cannot get around the tagger (every outbound connection is redirected to it, and it runs as
//! its own user), so the ceiling holds whatever the tagger forwards to: the node's intake or, in
//! Envoy mode, Envoy, which has no ceiling per cell of its own.
//!
//! Start reading at [`bind`] and [`Tagger::serve`]; `main.rs` only parses arguments and waits
//! for a signal. Everything fails closed: no destination, no node, no token means no
//! connection.

#![deny(unsafe_code)]

pub mod config;
mod log;
pub mod orig_dst;
pub mod token;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

pub use config::{Command, Config, ConfigError};
pub use token::{Token, TokenFileError, TokenSource};

/// How long to wait for the node proxy to accept a connection. The node runs on the same host;
/// if it has not answered by then it is down, and the agent should see a failure rather than a
/// hang.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (for example out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per this interval about connections closed at the ceiling, so an agent
/// that keeps opening connections cannot flood the log; the next line counts those not logged.
const CEILING_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What every connection needs, shared by reference count.
#[derive(Debug)]
struct Shared {
    config: Config,
    local: SocketAddr,
    token: TokenSource,
}

/// A bound tagger, not yet serving. Tests bind port 0 and ask [`Tagger::local_addr`].
#[derive(Debug)]
pub struct Tagger {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Validates `config`, reads the token file and binds the listener.
///
/// # Errors
/// `InvalidInput` if the configuration does not validate, `InvalidData`/`NotFound`/... if the
/// token file is unusable (the message names the file and the problem), or the bind error.
pub async fn bind(config: Config) -> io::Result<Tagger> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let token = TokenSource::load(&config.token_file).map_err(|e| {
        let kind = match &e {
            TokenFileError::Read { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    })?;
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
    })?;
    let local = listener.local_addr()?;
    log::info(format_args!(
        "listening on {local}; node {}; token file {}; fallback destination {}; connection ceiling {}",
        config.node,
        config.token_file.display(),
        config.destination.map_or_else(
            || "none (unredirected connections are closed)".to_owned(),
            |d| d.to_string()
        ),
        config
            .max_connections
            .map_or_else(|| "none".to_owned(), |max| max.to_string()),
    ));
    Ok(Tagger {
        listener,
        shared: Arc::new(Shared {
            config,
            local,
            token,
        }),
    })
}

/// Binds and serves until `shutdown` completes; see [`bind`] and [`Tagger::serve`].
///
/// # Errors
/// As [`bind`].
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> io::Result<()> {
    bind(config).await?.serve(shutdown).await
}

impl Tagger {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// Accepts connections until `shutdown` completes, then stops accepting and gives open
    /// connections [`Config::drain_grace`] to finish before closing them.
    ///
    /// With [`Config::max_connections`], a connection accepted while that many are open is
    /// closed at once, without contacting the node; a slot frees when a connection ends.
    ///
    /// # Errors
    /// None today: accept errors are logged and retried. The `Result` leaves room for fatal ones.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Self { listener, shared } = self;
        let mut connections = JoinSet::new();
        // `bind` validated the count, so `Semaphore::new` cannot panic.
        let ceiling = shared
            .config
            .max_connections
            .map(|max| (max, Arc::new(Semaphore::new(max))));
        let mut ceiling_log = log::Throttle::new(CEILING_LOG_INTERVAL);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((agent, peer)) => match take_slot(ceiling.as_ref()) {
                        Ok(slot) => {
                            let shared = Arc::clone(&shared);
                            connections.spawn(async move {
                                handle(agent, peer, shared).await;
                                // The slot frees only once the connection is over.
                                drop(slot);
                            });
                        }
                        Err(max) => {
                            if let Some(held_back) = ceiling_log.admit(std::time::Instant::now()) {
                                log_ceiling(peer, max, held_back);
                            }
                            // Dropping the stream closes it: the node never hears of it.
                            drop(agent);
                        }
                    },
                    Err(e) => {
                        log::warn(format_args!("accept failed: {e}"));
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
                // Reap finished connections so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let open = connections.len();
        log::info(format_args!(
            "shutting down: stopped accepting; {open} open connection(s) get {:?} to finish",
            shared.config.drain_grace
        ));
        let drained = tokio::time::timeout(shared.config.drain_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            log::info(format_args!(
                "grace period over: closing {} connection(s)",
                connections.len()
            ));
            connections.shutdown().await;
        } else {
            log::info(format_args!("all connections finished"));
        }
        Ok(())
    }
}

/// One of the ceiling's slots, or no ceiling (`Ok(None)`); `Err(max)` when all `max` are taken.
fn take_slot(
    ceiling: Option<&(usize, Arc<Semaphore>)>,
) -> Result<Option<OwnedSemaphorePermit>, usize> {
    match ceiling {
        None => Ok(None),
        Some((max, slots)) => Arc::clone(slots)
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| *max),
    }
}

fn log_ceiling(peer: SocketAddr, max: usize, held_back: u64) {
    let held_back = if held_back == 0 {
        String::new()
    } else {
        format!(
            "; {held_back} more closed the same way since the last such message (at most one per {CEILING_LOG_INTERVAL:?})"
        )
    };
    log::warn(format_args!(
        "closing connection from {peer} without contacting the node: {max} connection(s) already open, the ceiling (--max-connections {max}){held_back}"
    ));
}

/// Serves one agent connection. Every early return drops `agent`, which closes it: fail closed.
async fn handle(mut agent: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Some(destination) = destination_of(&agent, &shared) else {
        log::warn(format_args!(
            "closing connection from {peer}: it was not redirected (no SO_ORIGINAL_DST) and no --destination is configured"
        ));
        return;
    };
    let token = shared.token.current();
    let header = match cellgate_proxy_protocol::encode(peer, destination, token.expose()) {
        Ok(header) => header,
        Err(e) => {
            // Unreachable in practice: the token was validated when it was read.
            log::warn(format_args!(
                "closing connection from {peer} to {destination}: {e}"
            ));
            return;
        }
    };
    let node = shared.config.node;
    let mut upstream = match tokio::time::timeout(NODE_CONNECT_TIMEOUT, TcpStream::connect(node))
        .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            log::warn(format_args!(
                "closing connection from {peer} to {destination}: node proxy {node} unreachable: {e}"
            ));
            return;
        }
        Err(_) => {
            log::warn(format_args!(
                "closing connection from {peer} to {destination}: node proxy {node} did not answer within {NODE_CONNECT_TIMEOUT:?}"
            ));
            return;
        }
    };
    // Interactive protocols (TLS handshakes, request/response) suffer from Nagle's delay; the
    // agent's own stack already decided how to segment its writes.
    for stream in [&agent, &upstream] {
        if let Err(e) = stream.set_nodelay(true) {
            log::warn(format_args!(
                "cannot set TCP_NODELAY on connection from {peer}: {e}"
            ));
        }
    }
    if let Err(e) = upstream.write_all(&header).await {
        log::warn(format_args!(
            "closing connection from {peer} to {destination}: writing the header to node proxy {node} failed: {e}"
        ));
        return;
    }
    // copy_bidirectional propagates each side's EOF as a write shutdown on the other side, so an
    // agent that half-closes still receives the whole response.
    if let Err(e) = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
        log::info(format_args!(
            "connection from {peer} to {destination} ended with an error: {e}"
        ));
    }
}

/// The destination to announce: the original one if iptables redirected the connection,
/// otherwise the configured fallback.
fn destination_of(agent: &TcpStream, shared: &Shared) -> Option<SocketAddr> {
    // The accepted socket's own address; with a wildcard listener it differs from `shared.local`.
    let local = agent.local_addr().unwrap_or(shared.local);
    match orig_dst::original_destination(agent, local) {
        // Conntrack saw the connection but nothing rewrote it: not redirected.
        Ok(original) if same_endpoint(original, local) => shared.config.destination,
        Ok(original) => Some(original),
        Err(_) => shared.config.destination,
    }
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
}
