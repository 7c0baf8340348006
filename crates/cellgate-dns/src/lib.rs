//! The DNS resolver cells use.
//!
//! `cellgate-init` redirects every DNS query from a cell's pod to this resolver. It answers only
//! what the cell could use anyway: `A` and `AAAA` for names some capability of the cell names as a
//! host destination. Everything else is refused, which closes DNS as a side channel: an agent
//! cannot tunnel data out in `TXT` (or `NULL`, `CNAME`, `ANY`...) queries to a domain it controls,
//! because those are never forwarded anywhere.
//!
//! | query | answer | audit reason |
//! |---|---|---|
//! | unparseable, id readable | FORMERR (nothing if no id) | `dns_malformed` |
//! | opcode other than QUERY | NOTIMP | `dns_opcode_not_implemented` |
//! | name > 253 chars or label > 63 | REFUSED | `dns_name_too_long` |
//! | source is not a cell's pod | REFUSED | `dns_unknown_source` |
//! | class other than IN | REFUSED | `dns_class_refused` |
//! | `ANY` | REFUSED | `dns_qtype_refused` |
//! | allowed name, `A`/`AAAA` | the addresses of that family (empty: NODATA) | (`dns_allowed` if `audit_allows`) |
//! | allowed name, upstream error or timeout | SERVFAIL | `dns_upstream_failed` |
//! | allowed name, other type | NOERROR, no answers (never resolved) | |
//! | other name, `A`/`AAAA` | NXDOMAIN | `dns_name_not_allowed` |
//! | other name, other type | REFUSED | `dns_qtype_refused` |
//!
//! The node plugs in through three traits: [`Cells`] (which cell a source address is),
//! [`Resolve`] (the node's own resolution of a name it decided to answer) and [`Audit`].
//! [`DnsHandler::answer`] is the transport-free core; [`serve`] runs it on UDP and TCP.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod handler;
mod server;
pub mod wire;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use handler::{DnsHandler, Transport, MAX_ANSWERS, MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD};
pub use server::{serve, DnsServer, MAX_TCP_QUERY, MAX_UDP_IN_FLIGHT, MAX_UDP_QUERY};

/// The cells this resolver serves.
pub trait Cells: Send + Sync + 'static {
    /// The cell whose pod has this source address, if any (cells are told apart by source address).
    fn cell_for(&self, source: IpAddr) -> Option<Arc<cellgate_api::model::Cell>>;

    /// Whether `cell` may learn the addresses of `host` (`qtype` as asked, e.g. `A`), decided by
    /// the same engine as every other request (the node: the policy's `dns` branch, layers and
    /// lockdown included). `Err` says why not. This crate has no host matcher of its own.
    ///
    /// # Errors
    /// The reason the name is refused.
    fn may_resolve(
        &self,
        cell: &cellgate_api::model::Cell,
        source: IpAddr,
        host: &str,
        qtype: &str,
    ) -> Result<(), String>;
}

/// The node's resolution of names it has decided to answer.
pub trait Resolve: Send + Sync + 'static {
    /// Resolves a name the node has decided to answer (A and AAAA); errors mean "cannot answer"
    /// (SERVFAIL).
    fn lookup(
        &self,
        name: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>>;
}

/// Resolves once an audit record is kept (a refusal: written and synced), or says why it
/// could not be.
pub type AuditAck = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where refusals and failures are recorded.
pub trait Audit: Send + Sync + 'static {
    /// Called once per refusal or failure (never for answered allowed queries unless
    /// [`DnsConfig::audit_allows`]), with a reason label. The answer is held until the returned
    /// future resolves, so a refusal is on record before the asker learns of it; an error turns
    /// the answer into SERVFAIL (fail closed: nothing answered that was not recorded).
    ///
    /// The record must be submitted by the call itself, not by the returned future: a query
    /// that gets no answer (a closed connection) drops the future unpolled.
    fn refused(&self, event: DnsEvent) -> AuditAck;
}

/// One audited DNS event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEvent {
    /// Who asked.
    pub source: SocketAddr,
    /// The cell, as `(namespace, name)`, when the source is one.
    pub cell: Option<(String, String)>,
    /// The name asked for (lowercase, no trailing dot, non-printable bytes escaped); empty when
    /// the query could not be parsed.
    pub name: String,
    /// The query type (`A`, `TXT`, ...); empty when the query could not be parsed.
    pub qtype: String,
    /// A stable label: `dns_malformed`, `dns_opcode_not_implemented`, `dns_name_too_long`,
    /// `dns_unknown_source`, `dns_class_refused`, `dns_qtype_refused`, `dns_name_not_allowed`,
    /// `dns_upstream_failed`, or `dns_allowed`.
    pub reason: &'static str,
    /// Human-readable detail (never secrets: it holds parse errors and resolver errors).
    pub detail: String,
}

/// Settings of the resolver.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where UDP and TCP listen (port 0 picks one; see [`DnsServer::local_addr`]).
    pub listen: SocketAddr,
    /// How long one [`Resolve::lookup`] may take before the answer is SERVFAIL.
    pub upstream_timeout: Duration,
    /// TTL of answers. Short, so that a revoked capability stops resolving soon in caches.
    pub ttl: u32,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Concurrent TCP connections; more are closed on accept.
    pub max_tcp_connections: usize,
    /// Consecutive upstream failures (with no success since) after which [`DnsHandler::health`]
    /// reports unhealthy.
    pub unhealthy_after: u64,
    /// Also audit answered queries for allowed names (`dns_allowed`).
    pub audit_allows: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 53)),
            upstream_timeout: Duration::from_secs(2),
            ttl: 30,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 256,
            unhealthy_after: 3,
            audit_allows: false,
        }
    }
}

/// Counters, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Messages received (including malformed ones).
    pub queries: AtomicU64,
    /// NOERROR responses (with or without answers).
    pub answered: AtomicU64,
    /// NXDOMAIN responses.
    pub nxdomain: AtomicU64,
    /// REFUSED responses.
    pub refused: AtomicU64,
    /// SERVFAIL responses.
    pub servfail: AtomicU64,
    /// FORMERR responses.
    pub formerr: AtomicU64,
    /// NOTIMP responses.
    pub notimp: AtomicU64,
    /// Messages given no response: no readable id, a response instead of a query, or UDP overload.
    pub dropped: AtomicU64,
}

/// A copy of [`DnsStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsCounts {
    /// See [`DnsStats::queries`].
    pub queries: u64,
    /// See [`DnsStats::answered`].
    pub answered: u64,
    /// See [`DnsStats::nxdomain`].
    pub nxdomain: u64,
    /// See [`DnsStats::refused`].
    pub refused: u64,
    /// See [`DnsStats::servfail`].
    pub servfail: u64,
    /// See [`DnsStats::formerr`].
    pub formerr: u64,
    /// See [`DnsStats::notimp`].
    pub notimp: u64,
    /// See [`DnsStats::dropped`].
    pub dropped: u64,
}

impl DnsStats {
    /// The current values.
    pub fn snapshot(&self) -> DnsCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsCounts {
            queries: get(&self.queries),
            answered: get(&self.answered),
            nxdomain: get(&self.nxdomain),
            refused: get(&self.refused),
            servfail: get(&self.servfail),
            formerr: get(&self.formerr),
            notimp: get(&self.notimp),
            dropped: get(&self.dropped),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
