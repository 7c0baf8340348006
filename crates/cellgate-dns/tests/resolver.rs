//! The resolver over real UDP and TCP sockets on 127.0.0.1, with queries built by hickory-proto.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellgate_api::model::{
    Capability, Cell, Destination, DestinationTarget, HostPattern, Mode, TlsMode,
};
use cellgate_dns::{
    serve, Audit, AuditAck, Cells, DnsConfig, DnsEvent, DnsHandler, DnsServer, Resolve, Transport,
};
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const CELL_IP: &str = "127.0.0.1";
const STRANGER_IP: &str = "127.0.0.2";

fn cell() -> Cell {
    let dest = |p: HostPattern| Destination {
        target: DestinationTarget::Host(p),
        ports: vec![443],
    };
    Cell {
        uid: "local:team:agent".into(),
        namespace: "team".into(),
        name: "agent".into(),
        role: None,
        suspended: false,
        labels: Default::default(),
        generation: 0,
        budget: None,
        limits: None,
        capabilities: vec![Capability {
            name: "api".into(),
            mode: Mode::Enforce,
            tls: TlsMode::Intercept,
            protocol: cellgate_api::model::Protocol::Http,
            allow_internal_addresses: false,
            destinations: vec![
                dest(HostPattern::Exact("api.example.com".into())),
                dest(HostPattern::Wildcard("allowed.test".into())),
            ],
            http: None,
            credential: None,
            budget: None,
            approval: false,
            approval_policy: Default::default(),
            inspect: None,
            mcp: None,
            detect: None,
        }],
    }
}

struct FakeCells(HashMap<IpAddr, Arc<Cell>>);

impl Cells for FakeCells {
    fn cell_for(&self, source: IpAddr) -> Option<Arc<Cell>> {
        self.0.get(&source).cloned()
    }
    // A stand-in for the node's policy engine: the cell's host destinations.
    fn may_resolve(&self, cell: &Cell, _: IpAddr, host: &str, _: &str) -> Result<(), String> {
        if !cell.suspended && cell.allows_host(host) {
            Ok(())
        } else if cell.suspended {
            Err("the cell is suspended".into())
        } else {
            Err(format!("no capability of {} names this host", cell.key()))
        }
    }
}

#[derive(Default)]
struct FakeResolve {
    /// 0: answer; 1: fail; 2: hang.
    mode: AtomicUsize,
    calls: AtomicUsize,
    many: std::sync::atomic::AtomicBool,
}

impl Resolve for FakeResolve {
    fn lookup(
        &self,
        name: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let name = name.to_string();
        Box::pin(async move {
            match self.mode.load(Ordering::SeqCst) {
                1 => Err(io::Error::other(format!("upstream down for {name}"))),
                2 => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(Vec::new())
                }
                _ if self.many.load(Ordering::SeqCst) => {
                    Ok((1..=200u8).map(|i| IpAddr::from([10, 0, 0, i])).collect())
                }
                _ => Ok(vec![
                    "127.0.0.9".parse().unwrap(),
                    "2001:db8::9".parse().unwrap(),
                    "127.0.0.9".parse().unwrap(),
                ]),
            }
        })
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<DnsEvent>>);

impl Audit for Recorder {
    fn refused(&self, event: DnsEvent) -> AuditAck {
        self.0.lock().unwrap().push(event);
        Box::pin(async { Ok(()) })
    }
}

impl Recorder {
    fn take(&self) -> Vec<DnsEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Harness {
    server: DnsServer,
    resolver: Arc<FakeResolve>,
    audit: Arc<Recorder>,
}

fn config() -> DnsConfig {
    DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream_timeout: Duration::from_millis(200),
        tcp_idle_timeout: Duration::from_secs(2),
        ..DnsConfig::default()
    }
}

fn parts() -> (Arc<FakeCells>, Arc<FakeResolve>, Arc<Recorder>) {
    let cells = HashMap::from([(CELL_IP.parse().unwrap(), Arc::new(cell()))]);
    (Arc::new(FakeCells(cells)), Arc::default(), Arc::default())
}

async fn start_with(config: DnsConfig) -> Harness {
    let (cells, resolver, audit) = parts();
    let server = serve(config, cells, resolver.clone(), audit.clone())
        .await
        .unwrap();
    Harness {
        server,
        resolver,
        audit,
    }
}

async fn start() -> Harness {
    start_with(config()).await
}

fn handler() -> (DnsHandler, Arc<FakeResolve>, Arc<Recorder>) {
    let (cells, resolver, audit) = parts();
    (
        DnsHandler::new(config(), cells, resolver.clone(), audit.clone()),
        resolver,
        audit,
    )
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn query_edns(name: &str, qtype: RecordType, payload: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    m.set_edns(edns);
    m.to_vec().unwrap()
}

async fn udp_raw(server: SocketAddr, from: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind((from.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(Duration::from_millis(1500), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(h: &Harness, from: &str, bytes: &[u8]) -> Message {
    let raw = udp_raw(h.server.local_addr(), from, bytes)
        .await
        .expect("a response");
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.id, u16::from_be_bytes([bytes[0], bytes[1]]), "id echoed");
    m
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            other => panic!("unexpected record {other:?}"),
        })
        .collect()
}

fn reasons(events: &[DnsEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.reason).collect()
}

#[tokio::test]
async fn allowed_a_is_resolved() {
    let h = start().await;
    let m = udp(&h, CELL_IP, &query("API.Example.com.", RecordType::A)).await;
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.recursion_desired && m.recursion_available);
    assert_eq!(
        addrs(&m),
        vec!["127.0.0.9".parse::<IpAddr>().unwrap()],
        "v4 only, deduplicated"
    );
    assert_eq!(m.answers[0].ttl, 30);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "API.Example.com.",
        "name echoed as asked"
    );
    assert_eq!(m.queries.len(), 1);
    assert!(
        h.audit.take().is_empty(),
        "allowed answers are not audited by default"
    );
    let counts = h.server.stats().snapshot();
    assert_eq!((counts.queries, counts.answered), (1, 1));
    h.server.shutdown().await;
}

#[tokio::test]
async fn aaaa_gets_only_v6_and_wildcards_match() {
    let h = start().await;
    let m = udp(&h, CELL_IP, &query("x.allowed.test.", RecordType::AAAA)).await;
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec!["2001:db8::9".parse::<IpAddr>().unwrap()]);
    // The bare name is not covered by `*.allowed.test`.
    let m = udp(&h, CELL_IP, &query("allowed.test.", RecordType::AAAA)).await;
    assert_eq!(m.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn empty_resolution_is_nodata() {
    struct Nothing;
    impl Resolve for Nothing {
        fn lookup(
            &self,
            _: &str,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>> {
            Box::pin(async { Ok(vec![]) })
        }
    }
    let (cells, _, audit) = parts();
    let handler = DnsHandler::new(config(), cells, Arc::new(Nothing), audit.clone());
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let raw = handler
        .answer(
            &query("api.example.com.", RecordType::A),
            src,
            Transport::Udp,
        )
        .await;
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(audit.take().is_empty());
    assert!(handler.health().is_ok());
}

#[tokio::test]
async fn not_allowed_a_is_nxdomain_and_audited() {
    let h = start().await;
    let m = udp(&h, CELL_IP, &query("evil.example.net.", RecordType::A)).await;
    assert_eq!(m.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    let events = h.audit.take();
    assert_eq!(reasons(&events), ["dns_name_not_allowed"]);
    assert_eq!(events[0].name, "evil.example.net");
    assert_eq!(events[0].qtype, "A");
    assert_eq!(events[0].cell, Some(("team".into(), "agent".into())));
    assert_eq!(events[0].source.ip(), CELL_IP.parse::<IpAddr>().unwrap());
    assert_eq!(h.resolver.calls.load(Ordering::SeqCst), 0, "never resolved");
    assert_eq!(h.server.stats().snapshot().nxdomain, 1);
}

#[tokio::test]
async fn txt_exfiltration_is_refused_and_audited() {
    let h = start().await;
    let name =
        "mzxw6ytboi2dsnzzgezdgnbvgy3tqojqgezdgnbvgy3tqojqgezdgnbvgy3tqoj.data.attacker.test.";
    let m = udp(&h, CELL_IP, &query(name, RecordType::TXT)).await;
    assert_eq!(m.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());
    let events = h.audit.take();
    assert_eq!(reasons(&events), ["dns_qtype_refused"]);
    assert_eq!(events[0].qtype, "TXT");
    assert!(events[0].name.ends_with(".data.attacker.test"));
    for qtype in [RecordType::NULL, RecordType::CNAME, RecordType::MX] {
        let m = udp(&h, CELL_IP, &query(name, qtype)).await;
        assert_eq!(m.response_code, ResponseCode::Refused, "{qtype}");
    }
    assert_eq!(h.resolver.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn other_types_for_allowed_names_are_empty_and_not_resolved() {
    let h = start().await;
    for qtype in [
        RecordType::TXT,
        RecordType::MX,
        RecordType::HTTPS,
        RecordType::SVCB,
    ] {
        let m = udp(&h, CELL_IP, &query("api.example.com.", qtype)).await;
        assert_eq!(m.response_code, ResponseCode::NoError, "{qtype}");
        assert!(m.answers.is_empty());
    }
    assert_eq!(h.resolver.calls.load(Ordering::SeqCst), 0);
    assert!(h.audit.take().is_empty());
}

#[tokio::test]
async fn any_is_refused() {
    let h = start().await;
    for name in ["api.example.com.", "elsewhere.test."] {
        let m = udp(&h, CELL_IP, &query(name, RecordType::ANY)).await;
        assert_eq!(m.response_code, ResponseCode::Refused);
    }
    assert_eq!(
        reasons(&h.audit.take()),
        ["dns_qtype_refused", "dns_qtype_refused"]
    );
}

#[tokio::test]
async fn unknown_source_is_refused() {
    let h = start().await;
    let m = udp(&h, STRANGER_IP, &query("api.example.com.", RecordType::A)).await;
    assert_eq!(m.response_code, ResponseCode::Refused);
    let events = h.audit.take();
    assert_eq!(reasons(&events), ["dns_unknown_source"]);
    assert_eq!(events[0].cell, None);
    assert_eq!(h.resolver.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn upstream_failure_is_servfail_and_drives_health() {
    let h = start().await;
    h.resolver.mode.store(1, Ordering::SeqCst);
    for i in 1..=3 {
        assert!(h.server.health().is_ok(), "healthy before failure {i}");
        let m = udp(&h, CELL_IP, &query("api.example.com.", RecordType::A)).await;
        assert_eq!(m.response_code, ResponseCode::ServFail);
    }
    let err = h.server.health().unwrap_err();
    assert!(
        err.contains("3 times") && err.contains("upstream down"),
        "{err}"
    );
    let events = h.audit.take();
    assert_eq!(reasons(&events), ["dns_upstream_failed"; 3]);
    assert!(events[0].detail.contains("upstream down"));
    // A timeout counts too.
    h.resolver.mode.store(2, Ordering::SeqCst);
    let m = udp(&h, CELL_IP, &query("api.example.com.", RecordType::A)).await;
    assert_eq!(m.response_code, ResponseCode::ServFail);
    assert!(h.audit.take()[0].detail.contains("no answer within"));
    assert!(h.server.health().is_err());
    // One success clears it.
    h.resolver.mode.store(0, Ordering::SeqCst);
    let m = udp(&h, CELL_IP, &query("api.example.com.", RecordType::A)).await;
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(h.server.health().is_ok());
    assert_eq!(h.server.stats().snapshot().servfail, 4);
}

/// A query whose name is `labels` labels of 63 `a`s (hand-built: hickory will not encode it).
fn long_name_query(labels: usize) -> Vec<u8> {
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for _ in 0..labels {
        q.push(63);
        q.extend(std::iter::repeat_n(b'a', 63));
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

#[tokio::test]
async fn name_too_long_is_refused() {
    let h = start().await;
    let raw = udp_raw(h.server.local_addr(), CELL_IP, &long_name_query(5))
        .await
        .unwrap();
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.id, 0xabcd);
    assert_eq!(m.response_code, ResponseCode::Refused);
    assert_eq!(reasons(&h.audit.take()), ["dns_name_too_long"]);
    // 3 labels of 63 is within bounds: an ordinary not-allowed name.
    let m = Message::from_vec(
        &udp_raw(h.server.local_addr(), CELL_IP, &long_name_query(3))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn garbage_never_panics_and_gets_formerr_when_possible() {
    let h = start().await;
    // Too short for an id: nothing comes back.
    assert!(udp_raw(h.server.local_addr(), CELL_IP, &[0x42])
        .await
        .is_none());
    // An id, then garbage: FORMERR with that id.
    for garbage in [
        &[0x12u8, 0x34][..],
        &[
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0xff, 0xff, 0, 0, 0, 0, 0xff,
        ],
    ] {
        let raw = udp_raw(h.server.local_addr(), CELL_IP, garbage)
            .await
            .unwrap();
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.id, 0x1234);
        assert_eq!(m.response_code, ResponseCode::FormErr);
        assert_eq!(m.message_type, hickory_proto::op::MessageType::Response);
    }
    // A response is never answered.
    let mut resp = query("api.example.com.", RecordType::A);
    resp[2] |= 0x80;
    assert!(udp_raw(h.server.local_addr(), CELL_IP, &resp)
        .await
        .is_none());
    let events = h.audit.take();
    assert!(
        events.iter().all(|e| e.reason == "dns_malformed"),
        "{events:?}"
    );
    assert_eq!(events.len(), 4);
    // Still serving.
    let m = udp(&h, CELL_IP, &query("api.example.com.", RecordType::A)).await;
    assert_eq!(m.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn protocol_errors() {
    let (handler, _, audit) = handler();
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    // Two questions.
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii("api.example.com.").unwrap(),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("x.allowed.test.").unwrap(),
        RecordType::A,
    ));
    let r = Message::from_vec(
        &handler
            .answer(&m.to_vec().unwrap(), src, Transport::Udp)
            .await,
    )
    .unwrap();
    assert_eq!(r.response_code, ResponseCode::FormErr);
    // No question.
    let m = Message::query();
    let r = Message::from_vec(
        &handler
            .answer(&m.to_vec().unwrap(), src, Transport::Udp)
            .await,
    )
    .unwrap();
    assert_eq!(r.response_code, ResponseCode::FormErr);
    // Opcode other than QUERY.
    let mut m = Message::new(7, hickory_proto::op::MessageType::Query, OpCode::Update);
    m.add_query(Query::query(
        Name::from_ascii("api.example.com.").unwrap(),
        RecordType::SOA,
    ));
    let r = Message::from_vec(
        &handler
            .answer(&m.to_vec().unwrap(), src, Transport::Udp)
            .await,
    )
    .unwrap();
    assert_eq!(r.response_code, ResponseCode::NotImp);
    assert_eq!(r.op_code, OpCode::Update);
    // Class CH (version.bind and friends).
    let mut q = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    let mut m = Message::query();
    m.add_query(q);
    let r = Message::from_vec(
        &handler
            .answer(&m.to_vec().unwrap(), src, Transport::Udp)
            .await,
    )
    .unwrap();
    assert_eq!(r.response_code, ResponseCode::Refused);
    assert_eq!(
        reasons(&audit.take()),
        [
            "dns_malformed",
            "dns_malformed",
            "dns_opcode_not_implemented",
            "dns_class_refused"
        ]
    );
    let c = handler.stats().snapshot();
    assert_eq!((c.formerr, c.notimp, c.refused), (2, 1, 1));
}

#[tokio::test]
async fn names_with_odd_bytes_are_never_allowed() {
    let (handler, resolver, audit) = handler();
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    // A label holding a dot: `api.example` + `com` would look like the allowed host if joined naively.
    let name = Name::from_labels(vec![&b"api.example"[..], &b"com"[..]]).unwrap();
    let mut m = Message::query();
    m.add_query(Query::query(name, RecordType::A));
    let r = Message::from_vec(
        &handler
            .answer(&m.to_vec().unwrap(), src, Transport::Udp)
            .await,
    )
    .unwrap();
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 0);
    assert_eq!(audit.take()[0].name, "api\\046example.com");
}

#[tokio::test]
async fn udp_truncates_and_tcp_carries_large_answers() {
    let h = start().await;
    h.resolver.many.store(true, Ordering::SeqCst);
    let m = udp(&h, CELL_IP, &query("api.example.com.", RecordType::A)).await;
    assert!(m.truncation, "64 A records do not fit in 512 bytes");
    assert!(m.answers.is_empty());
    assert_eq!(m.queries.len(), 1);
    // With EDNS 4096 the limit is 1232 bytes: still too big for 64 records (~1 KiB + name).
    let raw = udp_raw(
        h.server.local_addr(),
        CELL_IP,
        &query_edns("api.example.com.", RecordType::A, 4096),
    )
    .await
    .unwrap();
    assert!(raw.len() <= 1232);
    let m = Message::from_vec(&raw).unwrap();
    assert!(m.edns.is_some(), "EDNS answered with EDNS");
    // Over TCP the whole answer comes back (capped at 64 records).
    let mut tcp = TcpStream::connect(h.server.local_addr()).await.unwrap();
    let m = tcp_exchange(&mut tcp, &query("api.example.com.", RecordType::A))
        .await
        .unwrap();
    assert!(!m.truncation);
    assert_eq!(m.answers.len(), 64);
}

async fn tcp_exchange(stream: &mut TcpStream, q: &[u8]) -> Option<Message> {
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    stream.write_all(&framed).await.ok()?;
    tcp_read(stream).await
}

async fn tcp_read(stream: &mut TcpStream) -> Option<Message> {
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(Message::from_vec(&body).unwrap())
}

#[tokio::test]
async fn tcp_framing_pipelining_and_limits() {
    let h = start().await;
    let mut tcp = TcpStream::connect(h.server.local_addr()).await.unwrap();
    // Two queries in one write, answered in order.
    let q1 = query("api.example.com.", RecordType::A);
    let q2 = query("nope.test.", RecordType::A);
    let mut both = Vec::new();
    for q in [&q1, &q2] {
        both.extend((q.len() as u16).to_be_bytes());
        both.extend_from_slice(q);
    }
    tcp.write_all(&both).await.unwrap();
    let r1 = tcp_read(&mut tcp).await.unwrap();
    let r2 = tcp_read(&mut tcp).await.unwrap();
    assert_eq!(
        (r1.response_code, r2.response_code),
        (ResponseCode::NoError, ResponseCode::NXDomain)
    );
    assert_eq!(addrs(&r1), vec!["127.0.0.9".parse::<IpAddr>().unwrap()]);
    // A frame split across writes.
    tcp.write_all(&(q1.len() as u16).to_be_bytes()[..1])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&(q1.len() as u16).to_be_bytes()[1..])
        .await
        .unwrap();
    tcp.write_all(&q1[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&q1[5..]).await.unwrap();
    assert_eq!(
        tcp_read(&mut tcp).await.unwrap().response_code,
        ResponseCode::NoError
    );
    // An oversized frame closes the connection.
    tcp.write_all(&60000u16.to_be_bytes()).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(tcp.read(&mut buf).await.unwrap_or(0), 0, "closed");
    assert!(reasons(&h.audit.take()).contains(&"dns_malformed"));
}

#[tokio::test]
async fn tcp_idle_timeout_and_connection_limit() {
    let h = start_with(DnsConfig {
        tcp_idle_timeout: Duration::from_millis(300),
        max_tcp_connections: 1,
        ..config()
    })
    .await;
    let mut first = TcpStream::connect(h.server.local_addr()).await.unwrap();
    assert!(
        tcp_exchange(&mut first, &query("api.example.com.", RecordType::A))
            .await
            .is_some()
    );
    // The second connection is over the limit: closed without an answer.
    let mut second = TcpStream::connect(h.server.local_addr()).await.unwrap();
    assert!(
        tcp_exchange(&mut second, &query("api.example.com.", RecordType::A))
            .await
            .is_none()
    );
    // The first one goes idle and is closed.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), first.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Its slot is free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(h.server.local_addr()).await.unwrap();
    assert!(
        tcp_exchange(&mut third, &query("api.example.com.", RecordType::A))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn truncations_and_mutations_never_panic() {
    let (handler, _, _) = handler();
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let full = query_edns("x.allowed.test.", RecordType::AAAA, 1232);
    for len in 0..=full.len() {
        let r = handler.answer(&full[..len], src, Transport::Udp).await;
        if len >= 2 && len < full.len() {
            let m = Message::from_vec(&r).unwrap();
            assert_eq!(m.response_code, ResponseCode::FormErr, "len {len}");
        }
    }
    // Deterministic byte flips over a few valid queries.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let samples = [
        full.clone(),
        query("api.example.com.", RecordType::A),
        query("evil.test.", RecordType::TXT),
        long_name_query(3),
    ];
    for _ in 0..5000 {
        let mut q = samples[(next() % samples.len() as u64) as usize].clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % q.len() as u64) as usize;
            q[i] = next() as u8;
        }
        let cut = (next() % (q.len() as u64 + 1)) as usize;
        let _ = handler.answer(&q[..cut], src, Transport::Udp).await;
    }
}

#[tokio::test]
async fn audit_allows_records_answers() {
    let (cells, resolver, audit) = parts();
    let handler = DnsHandler::new(
        DnsConfig {
            audit_allows: true,
            ..config()
        },
        cells,
        resolver,
        audit.clone(),
    );
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    handler
        .answer(
            &query("api.example.com.", RecordType::A),
            src,
            Transport::Udp,
        )
        .await;
    assert_eq!(reasons(&audit.take()), ["dns_allowed"]);
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let h = start().await;
    let addr = h.server.local_addr();
    assert_eq!(
        udp(&h, CELL_IP, &query("api.example.com.", RecordType::A))
            .await
            .response_code,
        ResponseCode::NoError
    );
    h.server.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(
        udp_raw(addr, CELL_IP, &query("api.example.com.", RecordType::A))
            .await
            .is_none()
    );
}

/// An audit whose records are kept only when the test says so, or never.
struct Gate {
    open: tokio::sync::watch::Receiver<Option<bool>>,
}

impl Audit for Gate {
    fn refused(&self, _: DnsEvent) -> AuditAck {
        let mut open = self.open.clone();
        Box::pin(async move {
            let kept = open
                .wait_for(Option::is_some)
                .await
                .map_err(|e| e.to_string())?
                .unwrap_or(false);
            if kept {
                Ok(())
            } else {
                Err("disk full".into())
            }
        })
    }
}

/// A refusal leaves only once its record is kept; a record that cannot be kept turns the
/// answer into SERVFAIL instead of an unrecorded NXDOMAIN.
#[tokio::test]
async fn a_refusal_waits_for_its_record_and_fails_closed_without_it() {
    let (cells, resolver, _) = parts();
    for kept in [true, false] {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let handler = Arc::new(DnsHandler::new(
            config(),
            cells.clone(),
            resolver.clone(),
            Arc::new(Gate { open: rx }),
        ));
        let h = handler.clone();
        let mut answer = tokio::spawn(async move {
            h.answer(
                &query("evil.example.net.", RecordType::A),
                "127.0.0.1:5353".parse().unwrap(),
                Transport::Udp,
            )
            .await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut answer)
                .await
                .is_err(),
            "answered before the record was kept"
        );
        tx.send(Some(kept)).unwrap();
        let raw = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect("answered once the audit replied")
            .unwrap();
        let m = Message::from_vec(&raw).unwrap();
        let want = if kept {
            ResponseCode::NXDomain
        } else {
            ResponseCode::ServFail
        };
        assert_eq!(m.response_code, want, "record kept: {kept}");
        assert!(m.answers.is_empty());
    }
}
