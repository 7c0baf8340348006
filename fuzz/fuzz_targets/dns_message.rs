//! Fuzzes the DNS front door: arbitrary bytes as one query to `DnsHandler::answer` (the raw
//! header and name scan, then the full parser and the decision), from a cell's address, over
//! UDP and TCP. It must never panic, and whatever it answers must be a DNS message that keeps
//! the query's id, is a response, and never grants a name no capability names.

#![no_main]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use cellgate_api::model::{
    Capability, Cell, Destination, DestinationTarget, HostPattern, Mode, Protocol, TlsMode,
};
use cellgate_dns::{Audit, AuditAck, Cells, DnsConfig, DnsEvent, DnsHandler, Resolve, Transport};
use hickory_proto::op::{Message, ResponseCode};
use libfuzzer_sys::fuzz_target;

/// The one name the cell may resolve.
const ALLOWED: &str = "api.example.com";

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

/// Answers every lookup at once with a fixed address, so only the handler is exercised.
struct Fixed;
impl Resolve for Fixed {
    fn lookup(&self, _: &str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>> {
        Box::pin(async { Ok(vec!["192.0.2.10".parse().expect("addr")]) })
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
    Cell {
        uid: "local:fuzz:agent".into(),
        namespace: "fuzz".into(),
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
            protocol: Protocol::Http,
            allow_internal_addresses: false,
            destinations: vec![Destination {
                target: DestinationTarget::Host(HostPattern::Exact(ALLOWED.into())),
                ports: vec![443],
            }],
            http: None,
            credential: None,
            budget: None,
            approval: false,
            approval_policy: Default::default(),
        }],
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    handler: DnsHandler,
    source: SocketAddr,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let source: SocketAddr = "10.0.0.7:40000".parse().expect("addr");
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime"),
            handler: DnsHandler::new(
                DnsConfig::default(),
                Arc::new(OneCell(HashMap::from([(source.ip(), Arc::new(cell()))]))),
                Arc::new(Fixed),
                Arc::new(Discard),
            ),
            source,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    for transport in [Transport::Udp, Transport::Tcp] {
        let out = w.rt.block_on(w.handler.answer(data, w.source, transport));
        if out.is_empty() {
            continue; // no readable id, or the message was itself a response
        }
        let reply = Message::from_vec(&out).expect("every answer is a DNS message");
        assert!(reply.metadata.message_type == hickory_proto::op::MessageType::Response);
        let id = u16::from_be_bytes([data[0], data[1]]);
        assert_eq!(reply.metadata.id, id, "the answer keeps the query's id");
        if reply.metadata.response_code == ResponseCode::NoError && !reply.answers.is_empty() {
            for q in &reply.queries {
                let name = q.name().to_ascii().to_ascii_lowercase();
                assert_eq!(
                    name.trim_end_matches('.'),
                    ALLOWED,
                    "an answer for a name no capability names"
                );
            }
        }
    }
});
