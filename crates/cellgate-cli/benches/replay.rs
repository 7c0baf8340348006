//! `cellgate policy replay` throughput: verify the chain, read and re-decide a log of 20,000
//! schema 2 records (50 cells, 3 capabilities each; allows, denials of every policy kind,
//! follow-ups and pre-policy refusals mixed) with the shipped policies.
//!
//! `cargo bench -p cellgate-cli --bench replay -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cellgate_api::policy::IdentityDoc;
use cellgate_audit::{AuditLog, AuditOptions, Decision, Record};
use cellgate_cli::replay::{replay_logs, Cells, Log};
use cellgate_node::recorded::{fill_record, Request};
use cellgate_policy::PolicySet;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const RECORDS: usize = 20_000;
const CELLS: usize = 50;

fn cell_yaml(i: usize) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: agent-{i}, namespace: team-{}}}\nspec:\n  role: researcher\n  capabilities:\n    - name: github\n      destinations: [{{host: api.github.com, ports: [443]}}]\n      http: {{methods: [GET], paths: [\"/repos/**\", \"/users/*\"]}}\n    - name: llm\n      destinations: [{{host: api.openai.com, ports: [443]}}]\n      http: {{methods: [POST], paths: [\"/v1/chat/completions\"]}}\n    - name: docs\n      destinations: [{{host: \"*.docs.example.com\", ports: [443]}}]\n",
        i % 5
    )
}

fn record(n: usize) -> Record {
    let cell = n % CELLS;
    let (host, method, path, decision, reason) = match n % 10 {
        0..=3 => (
            "api.github.com",
            "GET",
            format!("/repos/o/r{n}/issues"),
            Decision::Allow,
            "allowed",
        ),
        4 => (
            "api.openai.com",
            "POST",
            "/v1/chat/completions".into(),
            Decision::Allow,
            "allowed",
        ),
        5 => (
            "eu.docs.example.com",
            "GET",
            format!("/p/{n}"),
            Decision::Allow,
            "allowed",
        ),
        6 => (
            "api.github.com",
            "DELETE",
            format!("/repos/o/r{n}"),
            Decision::Deny,
            "http_rule_mismatch",
        ),
        7 => (
            "evil.example.net",
            "GET",
            "/".into(),
            Decision::Deny,
            "no_capability",
        ),
        8 => (
            "api.openai.com",
            "POST",
            "/v1/chat/completions".into(),
            Decision::Deny,
            "budget_exhausted",
        ),
        _ => (
            "api.github.com",
            "GET",
            "/repos/o/r".into(),
            Decision::Error,
            "upstream_timeout",
        ),
    };
    let mut r = Record::new("node-a", "intake", "https", decision, reason);
    r.cell = Some(format!("agent-{cell}"));
    r.namespace = Some(format!("team-{}", cell % 5));
    r.token_id = Some(format!("jti-{cell}"));
    r.source = Some(format!("10.0.{}.{}:40000", cell / 200, cell % 200 + 1));
    r.destination = Some("140.82.112.3:443".into());
    r.method = Some(method.into());
    r.host = Some(host.into());
    r.path = Some(path.clone());
    r.policy_version = Some("0123456789ab".into());
    r.latency_us = Some(9);
    r.request_id = Some(format!("{n:032x}"));
    let req = Request {
        time_ns: 0,
        front_door: "intake".into(),
        source: r.source.as_deref().and_then(|s| s.parse().ok()),
        destination: r.destination.as_deref().and_then(|s| s.parse().ok()),
        identity: IdentityDoc {
            jti: format!("jti-{cell}"),
            cell_uid: format!("local:team-{}:agent-{cell}", cell % 5),
            namespace: format!("team-{}", cell % 5),
            name: format!("agent-{cell}"),
            role: Some("researcher".into()),
        },
        protocol: "https".into(),
        host: Some(host.into()),
        port: 443,
        sni: Some(host.into()),
        method: Some(method.into()),
        path: Some(path),
        query: n.is_multiple_of(3).then(|| "page=2".into()),
        headers: BTreeMap::from([
            ("accept".into(), "application/json".into()),
            ("user-agent".into(), "python-requests/2.32".into()),
        ]),
        dns_type: None,
    };
    fill_record(&mut r, &req, Some(1), None, false, false);
    r
}

fn write_log(path: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, writer) = AuditLog::open(path, AuditOptions::default()).await.unwrap();
        for n in 0..RECORDS {
            log.submit(record(n)).unwrap();
        }
        log.close().await.unwrap();
        writer.await.unwrap().unwrap();
    });
}

fn replay(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cells_dir = dir.path().join("cells");
    std::fs::create_dir(&cells_dir).unwrap();
    for i in 0..CELLS {
        std::fs::write(cells_dir.join(format!("{i}.yaml")), cell_yaml(i)).unwrap();
    }
    let log = dir.path().join("audit.jsonl");
    write_log(&log);
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let set = PolicySet::load(&policies, &[]).unwrap();
    let cells = Cells::load(&cells_dir).unwrap();

    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.sample_size(10);
    g.bench_function("verify_read_redecide_20k", |b| {
        b.iter(|| {
            // What `cellgate policy replay` does: read, then verify and re-decide at once.
            let logs = [Log {
                path: log.clone(),
                text: std::fs::read_to_string(&log).unwrap(),
                head: cellgate_audit::read_head(&cellgate_audit::head_path(&log)).unwrap(),
            }];
            let (r, broken) = replay_logs(&set, &cells, &logs, true);
            assert!(broken.is_empty(), "{broken:?}");
            assert_eq!(r.records as usize, RECORDS);
            assert_eq!(r.redecided as usize, RECORDS / 10 * 9);
            assert!(r.changes.is_empty(), "{:?}", r.changes);
            r
        })
    });
    g.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
