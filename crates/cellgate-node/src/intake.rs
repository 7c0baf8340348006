//! The tagged intake: every connection starts with a PPv2 header carrying the cell's token.
//!
//! Order of checks on a new connection, each failure closing it with nothing forwarded and one
//! audit record naming the reason: connection limit; PPv2 header (present, v2, well formed,
//! carrying TLV 0xE0, within the time limit); token (signature, key id, audience, validity,
//! revocation); the cell it names; the source address it is bound to (in Kubernetes mode: a
//! Running pod of that cell on this node, from the pod watch). A connection to the destination
//! reserved for the enforcement self-check is then taken by [`crate::selfcheck::answer_probe`]
//! or refused (`self_check_reserved`), never forwarded. Then the first bytes (waited for
//! until they can be told apart, within the first-bytes time limit) tell TLS (a ClientHello:
//! take SNI), plaintext HTTP, or other TCP, which only a `protocol: tcp` capability relays.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use crate::decide::{self, ConnIdentity, Facts, Outcome, Reason};
use crate::{http, tunnel, Shared};

/// How many bytes are peeked to tell the protocol apart.
const SNIFF_BYTES: usize = 8;

/// Accept loop of the intake.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut draining = shared.draining.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::until_draining(&mut draining) => {
                tracing::info!("intake stops accepting: draining");
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
            shared.metrics.connection("over_limit");
            tracing::warn!(peer = %peer, limit = shared.config.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.metrics.open_connections.inc();
            handle(shared.clone(), stream, peer).await;
            shared.metrics.open_connections.dec();
            drop(permit);
        });
    }
}

/// A refusal of a whole connection: audited, counted, closed.
async fn refuse(
    shared: &Shared,
    ident: Option<&ConnIdentity>,
    peer: SocketAddr,
    src: SocketAddr,
    dst: SocketAddr,
    reason: Reason,
    detail: String,
) {
    let out = Outcome::deny(reason, detail, None);
    refused(shared, ident, peer, src, dst, out).await;
}

/// [`refuse`] with the refusal's outcome.
async fn refused(
    shared: &Shared,
    ident: Option<&ConnIdentity>,
    peer: SocketAddr,
    src: SocketAddr,
    dst: SocketAddr,
    out: Outcome,
) {
    let detail = out.reasons.first().map(String::as_str).unwrap_or_default();
    tracing::info!(peer = %peer, src.addr = %src, dst.addr = %dst, reason = %out.reason, detail, "connection refused");
    shared.metrics.connection(out.reason.as_str());
    let facts = Facts {
        protocol: "tcp",
        port: dst.port(),
        front_door: "intake",
        ..Facts::default()
    };
    let who = decide::Subject {
        ident,
        source: src,
        dst,
    };
    // A failure is logged inside; the connection is closed either way.
    let _ = decide::commit(shared, who, &facts, &out).await;
}

async fn handle(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let header = match tokio::time::timeout(
        shared.config.header_timeout,
        cellgate_proxy_protocol::read_header(&mut stream),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            return refuse(
                &shared,
                None,
                peer,
                peer,
                peer,
                Reason::from_label(e.reason()),
                e.to_string(),
            )
            .await
        }
        Err(_) => {
            return refuse(
                &shared,
                None,
                peer,
                peer,
                peer,
                Reason::Ppv2Timeout,
                format!(
                    "no complete PPv2 header within {:?}",
                    shared.config.header_timeout
                ),
            )
            .await
        }
    };
    let (src, dst) = (header.source, header.destination);
    // The tagger runs in the pod's network namespace, so its connection comes from the address it
    // writes as the source. A header claiming another source is someone replaying a token (or a
    // header) from elsewhere: the token's address binding must hold for the real peer too.
    if peer.ip().to_canonical() != src.ip().to_canonical() {
        let detail = format!("the PPv2 source {src} is not the connection's peer {peer}");
        return refuse(
            &shared,
            None,
            peer,
            src,
            dst,
            Reason::SourceMismatch,
            detail,
        )
        .await;
    }
    let verified = shared.verifier.verify(&header.token, decide::now_secs());
    let admitted = decide::identify(&shared, verified, src, dst);
    // The self-check's must-deny destination: a probe in flight is taken (before the cell's
    // slots, rates and budgets: it is not the cell's traffic), anything else refused. Nothing
    // connected to it is ever forwarded, whatever a capability says.
    if shared.self_check.reserves(dst) {
        if crate::selfcheck::answer_probe(&shared, &mut stream, &admitted).await {
            return;
        }
        let (ident, out) = match admitted {
            Err(r) => (r.ident, r.out),
            Ok(ident) => (Some(ident), crate::selfcheck::refusal(dst)),
        };
        return refused(&shared, ident.as_ref(), peer, src, dst, out).await;
    }
    let ident = match admitted {
        Ok(i) => i,
        Err(r) => {
            let (ident, out) = (r.ident, r.out);
            return refused(&shared, ident.as_ref(), peer, src, dst, out).await;
        }
    };
    // The cell's share of the node: one cell never takes every connection slot.
    let ceilings = shared
        .cells
        .get(&ident.claims.cell_uid)
        .map(|e| crate::limits::Ceilings::of(&e.cell, shared.ceilings()));
    let max = ceilings.map_or(0, |c| c.connections);
    let Some(slot) = shared.limits.connection(&ident.claims.cell_uid, max) else {
        let detail = format!(
            "cell {}/{} already holds its {max} connections on this node",
            ident.claims.namespace, ident.claims.name
        );
        return refuse(
            &shared,
            Some(&ident),
            peer,
            src,
            dst,
            Reason::CellConnectionLimit,
            detail,
        )
        .await;
    };
    shared.metrics.connection("accepted");
    let span = tracing::info_span!("conn", src.addr = %src, dst.addr = %dst, cell.name = %ident.claims.name, token.jti = %ident.claims.jti);
    dispatch(shared, stream, ident).instrument(span).await;
    drop(slot);
}

/// What the first bytes of a connection turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line (a known method and a space) or the h2c preface.
    Http,
    /// Bytes that are neither, or silence for the whole time limit (a protocol where the
    /// server speaks first): only a `tcp` capability can relay it.
    Other,
    /// A prefix of TLS or HTTP that stopped arriving before it could be told apart.
    Incomplete,
    /// Closed before sending anything.
    Closed,
}

/// Whether `first` (shorter than [`SNIFF_BYTES`]) may still become TLS or HTTP with more bytes.
fn may_grow_into_tls_or_http(first: &[u8]) -> bool {
    let tls = matches!(first, [0x16] | [0x16, 0x03]);
    tls || cellgate_tls::client_hello::HTTP_METHODS.iter().any(|m| {
        m.iter()
            .chain(std::iter::once(&b' '))
            .zip(first)
            .all(|(a, b)| a == b)
            && first.len() <= m.len()
    })
}

/// Peeks at the first bytes, without consuming them, until they tell TLS or HTTP apart from
/// anything else. A ClientHello or request line split across writes is waited for (bounded by
/// `limit`), never taken for other TCP because its first write was short.
async fn sniff(stream: &TcpStream, limit: std::time::Duration) -> std::io::Result<Sniffed> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; SNIFF_BYTES];
    let mut wait = std::time::Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Sniffed::Other),
        };
        let first = buf.get(..n).unwrap_or_default();
        if n == 0 {
            return Ok(Sniffed::Closed);
        }
        if cellgate_tls::client_hello::looks_like_tls(first) {
            return Ok(Sniffed::Tls);
        }
        if cellgate_tls::client_hello::looks_like_http(first) {
            return Ok(Sniffed::Http);
        }
        if n >= SNIFF_BYTES || !may_grow_into_tls_or_http(first) {
            return Ok(Sniffed::Other);
        }
        // `peek` answers at once while any byte is buffered: wait for more, backing off.
        if tokio::time::Instant::now() + wait >= deadline {
            return Ok(Sniffed::Incomplete);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_millis(50));
    }
}

async fn dispatch(shared: Arc<Shared>, stream: TcpStream, ident: ConnIdentity) {
    let sniffed = match sniff(&stream, shared.config.first_bytes_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "peek failed");
            return;
        }
    };
    match sniffed {
        Sniffed::Tls => tls(shared, stream, ident).await,
        Sniffed::Http => http::serve_plain(shared, stream, Arc::new(ident)).await,
        // Decided by policy as raw TCP: only a `tcp` capability grants it.
        Sniffed::Other => tunnel::serve_tcp(shared, stream, ident, Vec::new()).await,
        Sniffed::Incomplete => {
            let (src, dst) = (ident.source, ident.original_dst);
            let detail = format!(
                "the first bytes began like TLS or HTTP but did not complete within {:?}",
                shared.config.first_bytes_timeout
            );
            refuse(
                &shared,
                Some(&ident),
                src,
                src,
                dst,
                Reason::FirstBytesIncomplete,
                detail,
            )
            .await;
        }
        Sniffed::Closed => {}
    }
}

async fn tls(shared: Arc<Shared>, mut stream: TcpStream, ident: ConnIdentity) {
    let peek = match tokio::time::timeout(
        shared.config.first_bytes_timeout,
        cellgate_tls::client_hello::read_client_hello(&mut stream),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let (src, dst) = (ident.source, ident.original_dst);
            return refuse(
                &shared,
                Some(&ident),
                src,
                src,
                dst,
                Reason::from_label(e.reason()),
                e.to_string(),
            )
            .await;
        }
        Err(_) => {
            let (src, dst) = (ident.source, ident.original_dst);
            return refuse(
                &shared,
                Some(&ident),
                src,
                src,
                dst,
                Reason::TlsHelloTimeout,
                "no complete ClientHello in time".into(),
            )
            .await;
        }
    };
    let Some(sni) = peek
        .sni
        .clone()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
    else {
        // No SNI: only an address capability with passthrough can allow it.
        return tunnel::serve_tls_passthrough(shared, stream, ident, peek.bytes, None).await;
    };
    // Passthrough capabilities are decided on SNI and port, without decrypting.
    if passthrough_applies(&shared, &ident, &sni) {
        return tunnel::serve_tls_passthrough(shared, stream, ident, peek.bytes, Some(sni)).await;
    }
    // Leaves for names the cell may reach come from the main cache; any other name (the
    // request will be refused, with a readable 403) from a small one of its own.
    let named = shared
        .cells
        .get(&ident.claims.cell_uid)
        .is_some_and(|e| e.cell.allows_host(&sni));
    let minter = if named {
        shared.minter.clone()
    } else {
        shared.minter_unnamed.clone()
    };
    http::serve_intercepted(shared, stream, Arc::new(ident), peek.bytes, sni, minter).await;
}

/// Whether the cell has a passthrough capability naming this SNI and port: then the bytes are
/// relayed undecrypted and the decision is made at L4.
fn passthrough_applies(shared: &Shared, ident: &ConnIdentity, sni: &str) -> bool {
    use cellgate_api::model::{DestinationTarget, TlsMode};
    let Some(entry) = shared.cells.get(&ident.claims.cell_uid) else {
        return false;
    };
    let port = ident.original_dst.port();
    entry
        .cell
        .capabilities
        .iter()
        .filter(|c| c.tls == TlsMode::Passthrough)
        .any(|c| {
            c.destinations.iter().any(|d| match &d.target {
                DestinationTarget::Host(h) => h.matches(sni) && d.ports.contains(&port),
                DestinationTarget::Cidr(_) => false,
            })
        })
}
