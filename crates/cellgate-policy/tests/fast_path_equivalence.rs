//! The common-case branches of the base policy (`input.cell.derived.single`, the layer package
//! the loader generates, the reused input slots) must never change a decision. This test decides
//! a few thousand generated requests twice and compares the whole decision documents:
//!
//! - through [`PolicySet::evaluate`]: regorus's VM, the derived index built in Rust, the
//!   generated layer package, the per-thread input slots (what the node runs);
//! - through regorus's interpreter on the plain JSON input, with only the policy files: no
//!   derived index (the policy derives it, and the `single` branches cannot apply), no generated
//!   package (the policy walks `data.cellgate.layers`).

use std::path::PathBuf;

use cellgate_api::policy::{
    AddrDoc, CapabilityDoc, CellDoc, DecisionDoc, DestinationDoc, HttpRuleDoc, IdentityDoc,
    InputDoc, RequestDoc, INPUT_VERSION,
};
use cellgate_policy::{set::read_policy_files, PolicySet};

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const HOSTS: [&str; 5] = [
    "api.example.com",
    "*.example.com",
    "other.test",
    "db.internal",
    "*.test",
];
const REQUEST_HOSTS: [&str; 7] = [
    "api.example.com",
    "x.example.com",
    "*.example.com",
    "other.test",
    "db.internal",
    "evil.test",
    "nowhere.invalid",
];
const PATHS: [&[&str]; 6] = [
    &[],
    &["/repos/**"],
    &["/repos/**", "/user"],
    &["/v1/chat/completions"],
    &["/buckets/*/objects/**"],
    &["/a,b/**", "/x/*"],
];
const REQUEST_PATHS: [Option<&str>; 9] = [
    Some("/repos/a/b"),
    Some("/repos"),
    Some("/reposx"),
    Some("/user"),
    Some("/v1/chat/completions"),
    Some("/buckets/b/objects/o/p"),
    Some("/admin/x"),
    Some("/repos/\u{0}x"),
    None,
];

fn capability(rng: &mut Rng, i: usize) -> CapabilityDoc {
    let destinations = (0..1 + rng.below(2))
        .map(|_| {
            if rng.below(4) == 0 {
                DestinationDoc {
                    host: None,
                    cidr: Some((*rng.pick(&["10.0.0.0/8", "203.0.113.0/24"])).into()),
                    ports: vec![*rng.pick(&[443, 5432])],
                }
            } else {
                DestinationDoc {
                    host: Some((*rng.pick(&HOSTS)).into()),
                    cidr: None,
                    ports: rng.pick(&[vec![443], vec![80, 443], vec![8443]]).clone(),
                }
            }
        })
        .collect();
    let http = (rng.below(3) != 0).then(|| HttpRuleDoc {
        methods: rng
            .pick(&[vec![], vec!["GET"], vec!["GET", "POST"], vec!["DELETE"]])
            .iter()
            .map(|m| (*m).into())
            .collect(),
        paths: rng.pick(&PATHS).iter().map(|p| (*p).into()).collect(),
    });
    CapabilityDoc {
        name: format!("cap{i}"),
        mode: (*rng.pick(&["enforce", "enforce", "shadow", "audit"])).into(),
        tls: (*rng.pick(&["intercept", "passthrough"])).into(),
        protocol: (*rng.pick(&["http", "http", "tcp"])).into(),
        destinations,
        http,
        approval: false,
        credential: rng.below(2) == 0,
    }
}

/// A request aimed at what a capability names, half of the time: most requests of a real cell
/// are allowed.
fn aim(rng: &mut Rng, caps: &[CapabilityDoc], req: &mut RequestDoc) {
    let Some(cap) = caps.get(rng.below(caps.len().max(1) * 2)) else {
        return;
    };
    let d = rng.pick(&cap.destinations);
    if let Some(host) = &d.host {
        let host = host.replace('*', "x");
        req.sni = Some(host.clone());
        req.host = Some(host);
    }
    req.port = *rng.pick(&d.ports);
    req.protocol = (*rng.pick(&["https", "https", "http", "tls"])).into();
    if let Some(m) = cap.http.as_ref().and_then(|h| h.methods.first()) {
        req.method = Some(m.clone());
    }
}

fn input(rng: &mut Rng, n: usize) -> InputDoc {
    let caps: Vec<CapabilityDoc> = (0..rng.below(5)).map(|i| capability(rng, i)).collect();
    let namespace = (*rng.pick(&["dev", "prod"])).to_string();
    let role = rng
        .pick(&[None, Some("readonly"), Some("writer")])
        .map(Into::into);
    let named = *rng.pick(&REQUEST_HOSTS);
    let host = rng.pick(&[Some(named), Some(named), None]).map(Into::into);
    let mut doc = InputDoc {
        version: INPUT_VERSION.into(),
        time_ns: 1_700_000_000_000_000_000 + n as i64,
        front_door: "intake".into(),
        source: AddrDoc {
            address: "10.1.0.2".into(),
            port: 40000,
        },
        identity: IdentityDoc {
            jti: format!("jti-{n}"),
            cell_uid: "uid-1".into(),
            namespace: namespace.clone(),
            name: "agent".into(),
            role: role.clone(),
        },
        cell: CellDoc {
            uid: "uid-1".into(),
            namespace,
            name: "agent".into(),
            role,
            suspended: rng.below(20) == 0,
            labels: Default::default(),
            capabilities: Vec::new(),
        },
        request: RequestDoc {
            protocol: (*rng.pick(&["https", "https", "http", "tls", "tcp", "dns"])).into(),
            sni: host.clone(),
            host,
            port: *rng.pick(&[443, 80, 5432, 8443]),
            method: rng
                .pick(&[Some("GET"), Some("POST"), Some("DELETE"), None])
                .map(Into::into),
            path: rng.pick(&REQUEST_PATHS).map(Into::into),
            query: None,
            headers: Default::default(),
            destination: AddrDoc {
                address: (*rng.pick(&["10.2.3.4", "203.0.113.9", "140.82.112.6", ""])).into(),
                port: 443,
            },
            dns_type: None,
            json: None,
        },
    };
    aim(rng, &caps, &mut doc.request);
    doc.cell.capabilities = caps;
    doc
}

#[test]
fn common_case_branches_decide_as_the_general_ones() {
    let dir = policies_dir();
    let set = PolicySet::load(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
    let mut engine = regorus::Engine::new();
    engine.set_rego_v0(false);
    for f in read_policy_files(&dir, &[])
        .unwrap()
        .into_iter()
        .filter(|f| !f.is_manifest())
    {
        engine
            .add_policy(f.path.display().to_string(), f.source)
            .unwrap();
    }
    let mut rng = Rng(0x5eed);
    let mut allowed = 0;
    for n in 0..3000 {
        let input = input(&mut rng, n);
        let fast = set.evaluate(&input).unwrap();
        let json = serde_json::to_string(&input).unwrap();
        engine.set_input(regorus::Value::from_json_str(&json).unwrap());
        let general = engine
            .eval_rule("data.cellgate.authz.decision".into())
            .unwrap();
        // `layers` (which packs denied) is not part of the decision document proper.
        let mut general: serde_json::Value =
            serde_json::from_str(&general.to_json_str().unwrap()).unwrap();
        general.as_object_mut().unwrap().remove("layers");
        let general: DecisionDoc = serde_json::from_value(general).unwrap();
        assert_eq!(fast, general, "input {n}: {json}");
        allowed += usize::from(fast.allow);
    }
    // The corpus exercises both answers.
    assert!((300..2700).contains(&allowed), "{allowed} of 3000 allowed");
}
