//! A synthetic fleet shared by `benches/decision.rs` and `examples/decision_latency.rs`:
//! 10,000 cells of 3 to 5 capabilities each, held by uid as the node holds them.

#![allow(dead_code)]

use std::collections::HashMap;

use cellgate_api::policy::{
    AddrDoc, CapabilityDoc, CellDoc, DestinationDoc, HttpRuleDoc, IdentityDoc, InputDoc,
    RequestDoc, INPUT_VERSION,
};
use cellgate_policy::CellValue;

/// Cells in the fleet.
pub const CELLS: usize = 10_000;

/// A cell as the node keeps it: the document and its prebuilt policy value.
#[derive(Debug)]
pub struct Held {
    pub doc: CellDoc,
    pub value: CellValue,
}

/// xorshift64*: deterministic and dependency-free.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn capability(cell: usize, i: usize) -> CapabilityDoc {
    let (host, cidr, ports, http, tls) = match i % 5 {
        0 => (
            Some(format!("api{cell}.github.com")),
            None,
            vec![443],
            Some(HttpRuleDoc {
                methods: vec!["GET".into(), "POST".into()],
                paths: vec!["/repos/**".into(), "/user".into()],
            }),
            "intercept",
        ),
        1 => (
            Some(format!("*.svc{cell}.example.com")),
            None,
            vec![443, 80],
            None,
            "intercept",
        ),
        2 => (
            None,
            Some(format!("10.{}.{}.0/24", cell % 250, i)),
            vec![5432],
            None,
            "passthrough",
        ),
        3 => (
            Some(format!("llm{cell}.openai.test")),
            None,
            vec![443],
            Some(HttpRuleDoc {
                methods: vec!["POST".into()],
                paths: vec!["/v1/chat/completions".into(), "/v1/embeddings".into()],
            }),
            "intercept",
        ),
        _ => (
            Some(format!("files{cell}.storage.test")),
            None,
            vec![443],
            Some(HttpRuleDoc {
                methods: vec![],
                paths: vec!["/buckets/*/objects/**".into()],
            }),
            "intercept",
        ),
    };
    CapabilityDoc {
        name: format!("cap-{i}-{cell}"),
        mode: "enforce".into(),
        tls: tls.into(),
        protocol: "http".into(),
        destinations: vec![DestinationDoc { host, cidr, ports }],
        http,
        approval: false,
        credential: i.is_multiple_of(2),
    }
}

/// The fleet, by uid.
pub fn fleet() -> HashMap<String, Held> {
    let mut rng = Rng::new(7);
    (0..CELLS)
        .map(|n| {
            let caps = 3 + rng.below(3);
            let doc = CellDoc {
                uid: format!("uid-{n:05}"),
                namespace: format!("team-{}", n % 50),
                name: format!("agent-{n}"),
                role: n.is_multiple_of(3).then(|| "readonly".to_string()),
                suspended: false,
                labels: [("app".to_string(), "agent".to_string())].into(),
                capabilities: (0..caps).map(|i| capability(n, i)).collect(),
            };
            let value = CellValue::new(&doc);
            (doc.uid.clone(), Held { doc, value })
        })
        .collect()
}

/// Uids in a fixed order, to pick from.
pub fn uids(fleet: &HashMap<String, Held>) -> Vec<String> {
    let mut v: Vec<String> = fleet.keys().cloned().collect();
    v.sort();
    v
}

/// An allowed HTTPS request of cell `n` (to its first capability), or, when `deny`, a request to
/// a host it cannot reach (the slow path: the policy writes the hint). `with_cell` copies the
/// cell document into the input; the node path (`evaluate_with_cell`) does not need it.
pub fn request(doc: &CellDoc, n: u64, deny: bool, with_cell: bool) -> InputDoc {
    let idx: usize = doc.uid.trim_start_matches("uid-").parse().unwrap_or(0);
    let host = if deny {
        "evil.test".to_string()
    } else {
        format!("api{idx}.github.com")
    };
    InputDoc {
        version: INPUT_VERSION.into(),
        time_ns: 1_700_000_000_000_000_000 + n as i64,
        front_door: "intake".into(),
        source: AddrDoc {
            address: "10.244.1.7".into(),
            port: 40000 + (n % 20000) as u16,
        },
        identity: IdentityDoc {
            jti: format!("jti-{n}"),
            cell_uid: doc.uid.clone(),
            namespace: doc.namespace.clone(),
            name: doc.name.clone(),
            role: doc.role.clone(),
        },
        cell: if with_cell {
            doc.clone()
        } else {
            CellDoc::default()
        },
        request: RequestDoc {
            protocol: "https".into(),
            host: Some(host.clone()),
            port: 443,
            sni: Some(host),
            method: Some("GET".into()),
            path: Some(format!("/repos/org/repo{}/pulls", n % 100)),
            query: None,
            headers: [("user-agent".to_string(), "agent/1.0".to_string())].into(),
            destination: AddrDoc {
                address: "140.82.112.6".into(),
                port: 443,
            },
            dns_type: None,
            json: None,
        },
    }
}
