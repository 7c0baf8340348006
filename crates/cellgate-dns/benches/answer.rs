//! `DnsHandler::answer` for an allowed name with a resolver that answers at once (as a cached one
//! does), and for a refused TXT query to a name no capability names.
//!
//! Run with `cargo bench -p cellgate-dns --bench answer`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use cellgate_api::model::{
    Capability, Cell, Destination, DestinationTarget, HostPattern, Mode, TlsMode,
};
use cellgate_dns::{Audit, AuditAck, Cells, DnsConfig, DnsEvent, DnsHandler, Resolve, Transport};
use criterion::{criterion_group, criterion_main, Criterion};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

struct OneCell(HashMap<IpAddr, Arc<Cell>>);
impl Cells for OneCell {
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

struct Cached(Vec<IpAddr>);
impl Resolve for Cached {
    fn lookup(
        &self,
        _: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>> {
        let addrs = self.0.clone();
        Box::pin(async move { Ok(addrs) })
    }
}

struct Discard;
impl Audit for Discard {
    fn refused(&self, event: DnsEvent) -> AuditAck {
        std::hint::black_box(event);
        Box::pin(async { Ok(()) })
    }
}

fn cell() -> Cell {
    let hosts = [
        "api.example.com",
        "api.github.com",
        "pypi.org",
        "files.pythonhosted.org",
    ];
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
        capabilities: hosts
            .iter()
            .map(|h| Capability {
                name: (*h).into(),
                mode: Mode::Enforce,
                tls: TlsMode::Intercept,
                protocol: cellgate_api::model::Protocol::Http,
                allow_internal_addresses: false,
                destinations: vec![Destination {
                    target: DestinationTarget::Host(HostPattern::Exact((*h).into())),
                    ports: vec![443],
                }],
                http: None,
                credential: None,
                budget: None,
                approval: false,
                approval_policy: Default::default(),
                inspect: None,
                mcp: None,
                detect: None,
            })
            .collect(),
    }
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn bench(c: &mut Criterion) {
    let source: SocketAddr = "10.0.0.7:40000".parse().unwrap();
    let handler = DnsHandler::new(
        DnsConfig::default(),
        Arc::new(OneCell(HashMap::from([(source.ip(), Arc::new(cell()))]))),
        Arc::new(Cached(vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ])),
        Arc::new(Discard),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let allowed = query("files.pythonhosted.org.", RecordType::A);
    let refused = query(
        "mzxw6ytboi2dsnzzgezdgnbvgy3tqojqgezdgnbvgy3tqojqgezdgnbvgy3tqoj.data.attacker.test.",
        RecordType::TXT,
    );
    c.bench_function("answer/allowed_a_cached", |b| {
        b.iter(|| rt.block_on(handler.answer(&allowed, source, Transport::Udp)))
    });
    c.bench_function("answer/refused_txt", |b| {
        b.iter(|| rt.block_on(handler.answer(&refused, source, Transport::Udp)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
