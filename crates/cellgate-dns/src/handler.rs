//! The transport-free core: one query's bytes in, one response's bytes out.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cellgate_api::model::Cell;
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::wire::{self, NameScan, RawHeader, MAX_LABEL_LEN, MAX_NAME_LEN};
use crate::{bump, Audit, AuditAck, Cells, DnsConfig, DnsEvent, DnsStats, Resolve};

/// The classic DNS limit for a UDP response to a client that did not say otherwise (RFC 1035).
pub const MIN_UDP_PAYLOAD: usize = 512;
/// The largest UDP response sent whatever the client advertises in EDNS: the DNS Flag Day 2020
/// value, which avoids IP fragmentation on any common path. Larger answers go over TCP (TC set).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Most addresses put in one answer. Real names have a handful; a resolver that returns thousands
/// must not make responses (and the work to build them) unbounded.
pub const MAX_ANSWERS: usize = 64;

/// Which transport a query came over; decides the response size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: responses over 512 bytes (or the EDNS size, at most [`MAX_UDP_PAYLOAD`]) are truncated
    /// with TC set.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// Answers queries for cells. Shared by both transports; cheap to call concurrently.
pub struct DnsHandler {
    config: DnsConfig,
    cells: Arc<dyn Cells>,
    resolver: Arc<dyn Resolve>,
    audit: Arc<dyn Audit>,
    stats: DnsStats,
    /// Upstream failures since the last success.
    consecutive_failures: AtomicU64,
    /// The last upstream failure, for [`DnsHandler::health`].
    last_failure: Mutex<String>,
}

impl fmt::Debug for DnsHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsHandler")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .field("consecutive_failures", &self.consecutive_failures)
            .finish_non_exhaustive()
    }
}

/// The question, once parsed and checked.
struct Asked<'q> {
    query: &'q Query,
    /// Lowercase, no trailing dot; bytes other than letters, digits, `-` and `_` escaped as `\DDD`.
    host: String,
    /// Whether `host` is made only of letters, digits, `-` and `_` (so it can name a destination).
    plain: bool,
}

/// Who asked, for audit records.
struct Asker<'a> {
    source: SocketAddr,
    cell: Option<&'a Cell>,
    /// Audit records this query produced, awaited before its answer leaves.
    acks: Mutex<Vec<AuditAck>>,
}

impl DnsHandler {
    /// A handler; [`crate::serve`] makes one, tests and benches may call it directly.
    pub fn new(
        config: DnsConfig,
        cells: Arc<dyn Cells>,
        resolver: Arc<dyn Resolve>,
        audit: Arc<dyn Audit>,
    ) -> Self {
        Self {
            config,
            cells,
            resolver,
            audit,
            stats: DnsStats::default(),
            consecutive_failures: AtomicU64::new(0),
            last_failure: Mutex::new(String::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// `Err` while the upstream has failed [`DnsConfig::unhealthy_after`] times in a row with no
    /// success since (for the node's `/readyz`).
    pub fn health(&self) -> Result<(), String> {
        let failures = self.consecutive_failures.load(Ordering::Relaxed);
        if failures >= self.config.unhealthy_after.max(1) {
            let last = match self.last_failure.lock() {
                Ok(l) => l.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            Err(format!(
                "DNS upstream failed {failures} times in a row (last: {last})"
            ))
        } else {
            Ok(())
        }
    }

    /// The response to one query from `source`. An empty vector means "send nothing" (the
    /// message had no readable id, or was itself a response).
    ///
    /// The answer leaves only once every audit record the query produced is kept; a record
    /// that cannot be kept turns the answer into SERVFAIL.
    pub async fn answer(&self, query: &[u8], source: SocketAddr, transport: Transport) -> Vec<u8> {
        bump(&self.stats.queries);
        let cell = self.cells.cell_for(source.ip().to_canonical());
        let asker = Asker {
            source,
            cell: cell.as_deref(),
            acks: Mutex::new(Vec::new()),
        };
        let response = self.decide(query, &asker, transport).await;
        let acks = match asker.acks.into_inner() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        };
        for ack in acks {
            if let Err(e) = ack.await {
                tracing::error!(source = %source, error = %e, "DNS audit record not kept: answering SERVFAIL");
                bump(&self.stats.servfail);
                return match wire::raw_header(query) {
                    Some(header) if !response.is_empty() => {
                        bare_response(&header, ResponseCode::ServFail)
                    }
                    _ => Vec::new(),
                };
            }
        }
        response
    }

    async fn decide(&self, query: &[u8], asker: &Asker<'_>, transport: Transport) -> Vec<u8> {
        let Some(header) = wire::raw_header(query) else {
            bump(&self.stats.dropped);
            self.record(
                asker,
                None,
                "dns_malformed",
                "shorter than a message id".into(),
            );
            return Vec::new();
        };
        if header.is_response == Some(true) {
            // Never answer a response: that is how two servers end up in a loop.
            bump(&self.stats.dropped);
            self.record(
                asker,
                None,
                "dns_malformed",
                "a response, not a query".into(),
            );
            return Vec::new();
        }
        if let Some(opcode) = header.opcode.filter(|&o| o != 0) {
            bump(&self.stats.notimp);
            self.record(
                asker,
                None,
                "dns_opcode_not_implemented",
                format!("opcode {}", OpCode::from_u8(opcode)),
            );
            return bare_response(&header, ResponseCode::NotImp);
        }
        if let NameScan::TooLong(len) = wire::scan_first_name(query) {
            return self.refuse_bare(
                asker,
                &header,
                "dns_name_too_long",
                format!("name of {len}+ characters"),
            );
        }
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                bump(&self.stats.formerr);
                self.record(asker, None, "dns_malformed", e.to_string());
                return bare_response(&header, ResponseCode::FormErr);
            }
        };
        let [question] = request.queries.as_slice() else {
            bump(&self.stats.formerr);
            self.record(
                asker,
                None,
                "dns_malformed",
                format!(
                    "{} questions (exactly one is supported)",
                    request.queries.len()
                ),
            );
            return bare_response(&header, ResponseCode::FormErr);
        };

        let asked = match describe(question) {
            Ok(a) => a,
            Err(detail) => {
                return self.refuse_bare(asker, &header, "dns_name_too_long", detail);
            }
        };
        let limit = response_limit(&request, transport);
        let respond = |code: ResponseCode, answers: Vec<Record>| {
            encode(&request, question, code, answers, limit)
        };

        let Some(cell) = asker.cell else {
            bump(&self.stats.refused);
            self.record(
                asker,
                Some(&asked),
                "dns_unknown_source",
                format!("no cell has address {}", asker.source.ip()),
            );
            return respond(ResponseCode::Refused, Vec::new());
        };
        if question.query_class() != DNSClass::IN {
            bump(&self.stats.refused);
            self.record(
                asker,
                Some(&asked),
                "dns_class_refused",
                format!("class {}", question.query_class()),
            );
            return respond(ResponseCode::Refused, Vec::new());
        }
        let qtype = question.query_type();
        if qtype == RecordType::ANY {
            bump(&self.stats.refused);
            self.record(
                asker,
                Some(&asked),
                "dns_qtype_refused",
                "ANY is never answered".into(),
            );
            return respond(ResponseCode::Refused, Vec::new());
        }

        let address_query = matches!(qtype, RecordType::A | RecordType::AAAA);
        let decided = if asked.plain {
            self.cells.may_resolve(
                cell,
                asker.source.ip().to_canonical(),
                &asked.host,
                &qtype.to_string(),
            )
        } else {
            Err("the name is not a plain host name".to_string())
        };
        if let Err(why) = decided {
            if address_query {
                bump(&self.stats.nxdomain);
                self.record(asker, Some(&asked), "dns_name_not_allowed", why);
                return respond(ResponseCode::NXDomain, Vec::new());
            }
            bump(&self.stats.refused);
            self.record(
                asker,
                Some(&asked),
                "dns_qtype_refused",
                format!("{qtype} for a name not allowed: {why}"),
            );
            return respond(ResponseCode::Refused, Vec::new());
        }
        if !address_query {
            // Allowed name, other type (MX, TXT, HTTPS...): an honest "no such data", never
            // forwarded, so nothing can ride out in it.
            bump(&self.stats.answered);
            if self.config.audit_allows {
                self.record(
                    asker,
                    Some(&asked),
                    "dns_allowed",
                    format!("{qtype}: no data served"),
                );
            }
            return respond(ResponseCode::NoError, Vec::new());
        }

        let lookup = tokio::time::timeout(
            self.config.upstream_timeout,
            self.resolver.lookup(&asked.host),
        )
        .await;
        let addrs = match lookup {
            Ok(Ok(addrs)) => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                addrs
            }
            Ok(Err(e)) => return self.upstream_failed(asker, &asked, e.to_string(), respond),
            Err(_) => {
                let detail = format!("no answer within {:?}", self.config.upstream_timeout);
                return self.upstream_failed(asker, &asked, detail, respond);
            }
        };

        let ttl = self.config.ttl;
        let name = question.name();
        let mut records: Vec<Record> = Vec::new();
        for addr in addrs {
            let rdata = match (qtype, addr.to_canonical()) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            if records.iter().any(|r| r.data == rdata) {
                continue;
            }
            records.push(Record::from_rdata(name.clone(), ttl, rdata));
            if records.len() >= MAX_ANSWERS {
                break;
            }
        }
        bump(&self.stats.answered);
        if self.config.audit_allows {
            self.record(
                asker,
                Some(&asked),
                "dns_allowed",
                format!("{} addresses", records.len()),
            );
        }
        respond(ResponseCode::NoError, records)
    }

    /// A TCP frame announced `len` bytes, outside what a query can be; the connection is closed.
    pub(crate) fn oversized(&self, source: SocketAddr, len: usize) {
        bump(&self.stats.queries);
        bump(&self.stats.dropped);
        let cell = self.cells.cell_for(source.ip().to_canonical());
        let asker = Asker {
            source,
            cell: cell.as_deref(),
            acks: Mutex::new(Vec::new()),
        };
        // Nothing is answered (the connection is closed), so nothing waits for the record.
        self.record(
            &asker,
            None,
            "dns_malformed",
            format!(
                "TCP frame of {len} bytes (1 to {} accepted)",
                crate::server::MAX_TCP_QUERY
            ),
        );
    }

    fn upstream_failed(
        &self,
        asker: &Asker<'_>,
        asked: &Asked<'_>,
        detail: String,
        respond: impl FnOnce(ResponseCode, Vec<Record>) -> Vec<u8>,
    ) -> Vec<u8> {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        match self.last_failure.lock() {
            Ok(mut l) => detail.clone_into(&mut l),
            Err(poisoned) => detail.clone_into(&mut poisoned.into_inner()),
        }
        bump(&self.stats.servfail);
        tracing::debug!(host = %asked.host, %detail, "DNS upstream failed");
        self.record(asker, Some(asked), "dns_upstream_failed", detail);
        respond(ResponseCode::ServFail, Vec::new())
    }

    fn refuse_bare(
        &self,
        asker: &Asker<'_>,
        header: &RawHeader,
        reason: &'static str,
        detail: String,
    ) -> Vec<u8> {
        bump(&self.stats.refused);
        self.record(asker, None, reason, detail);
        bare_response(header, ResponseCode::Refused)
    }

    fn record(
        &self,
        asker: &Asker<'_>,
        asked: Option<&Asked<'_>>,
        reason: &'static str,
        detail: String,
    ) {
        tracing::debug!(source = %asker.source, reason, %detail, "DNS query not answered normally");
        let ack = self.audit.refused(DnsEvent {
            source: asker.source,
            cell: asker.cell.map(|c| (c.namespace.clone(), c.name.clone())),
            name: asked.map(|a| a.host.clone()).unwrap_or_default(),
            qtype: asked
                .map(|a| a.query.query_type().to_string())
                .unwrap_or_default(),
            reason,
            detail,
        });
        match asker.acks.lock() {
            Ok(mut acks) => acks.push(ack),
            Err(poisoned) => poisoned.into_inner().push(ack),
        }
    }
}

/// The question's name as a host, with the explicit length checks (the parser enforces the wire
/// limits too, but this is the boundary and does not rely on it).
fn describe(query: &Query) -> Result<Asked<'_>, String> {
    let mut host = String::new();
    let mut plain = true;
    let mut text_len = 0usize;
    for (i, label) in query.name().iter().enumerate() {
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("label of {} characters", label.len()));
        }
        if i > 0 {
            host.push('.');
            text_len = text_len.saturating_add(1);
        }
        text_len = text_len.saturating_add(label.len());
        for &b in label {
            let b = b.to_ascii_lowercase();
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                host.push(char::from(b));
            } else {
                plain = false;
                host.push_str(&format!("\\{b:03}"));
            }
        }
    }
    if text_len > MAX_NAME_LEN {
        return Err(format!("name of {text_len} characters"));
    }
    Ok(Asked { query, host, plain })
}

/// Largest response for this request on this transport.
fn response_limit(request: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match &request.edns {
            Some(edns) => usize::from(edns.max_payload().min(MAX_UDP_PAYLOAD)).max(MIN_UDP_PAYLOAD),
            None => MIN_UDP_PAYLOAD,
        },
    }
}

/// A response echoing the question; truncated (TC, no answers) when over `limit`.
fn encode(
    request: &Message,
    question: &Query,
    code: ResponseCode,
    answers: Vec<Record>,
    limit: usize,
) -> Vec<u8> {
    let mut response = Message::response(request.id, OpCode::Query);
    response.metadata.recursion_desired = request.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = request.checking_disabled;
    response.metadata.response_code = code;
    response.add_query(question.clone());
    response.answers = answers;
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        response.set_edns(edns);
    }
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => match response.truncate().to_vec() {
            Ok(bytes) if bytes.len() <= limit => bytes,
            _ => fallback(
                request.id,
                request.recursion_desired,
                ResponseCode::ServFail,
            ),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a DNS response");
            fallback(
                request.id,
                request.recursion_desired,
                ResponseCode::ServFail,
            )
        }
    }
}

/// A response with no question section, for queries that could not be (or must not be) parsed.
fn bare_response(header: &RawHeader, code: ResponseCode) -> Vec<u8> {
    let opcode = header.opcode.unwrap_or(0);
    header_only(header.id, opcode, header.recursion_desired, code)
}

fn fallback(id: u16, rd: bool, code: ResponseCode) -> Vec<u8> {
    header_only(id, 0, rd, code)
}

/// Twelve bytes: id, QR, opcode, RD, RA, rcode (low 4 bits), all counts zero.
fn header_only(id: u16, opcode: u8, rd: bool, code: ResponseCode) -> Vec<u8> {
    let [id_hi, id_lo] = id.to_be_bytes();
    let flags_hi = 0x80 | ((opcode & 0x0f) << 3) | u8::from(rd);
    let flags_lo = 0x80 | (code.low() & 0x0f);
    vec![id_hi, id_lo, flags_hi, flags_lo, 0, 0, 0, 0, 0, 0, 0, 0]
}
