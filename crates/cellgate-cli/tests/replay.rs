//! `cellgate policy replay` and `cellgate advise`, run as a user runs them, on audit logs
//! written by the audit writer with records filled the way the node fills them
//! (`cellgate_node::recorded::fill_record`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellgate_api::policy::IdentityDoc;
use cellgate_audit::{AuditLog, AuditOptions, Decision, Record};
use cellgate_node::recorded::{fill_record, Request};

fn cellgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

const CELL: &str = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata:
  name: researcher
  namespace: agents
spec:
  role: reader
  capabilities:
    - name: docs
      destinations:
        - host: docs.example.com
          ports: [443]
      http:
        methods: [GET]
        paths: [\"/v1/**\"]
";

/// One request of cell `cell` (namespace `agents`) as the node records it.
fn rec(
    cell: &str,
    host: &str,
    method: &str,
    path: &str,
    decision: Decision,
    reason: &str,
) -> Record {
    let mut r = Record::new("node-a", "intake", "https", decision, reason);
    r.cell = Some(cell.into());
    r.namespace = Some("agents".into());
    r.token_id = Some("jti-1".into());
    r.source = Some("10.0.0.7:40000".into());
    r.destination = Some("203.0.113.10:443".into());
    r.method = Some(method.into());
    r.host = Some(host.into());
    r.path = Some(path.into());
    r.policy_version = Some("0123456789ab".into());
    if decision == Decision::Allow {
        r.capability = Some("docs".into());
    }
    let req = Request {
        time_ns: 0,
        front_door: "intake".into(),
        source: r.source.as_deref().map(|s| s.parse().unwrap()),
        destination: r.destination.as_deref().map(|s| s.parse().unwrap()),
        identity: IdentityDoc {
            jti: "jti-1".into(),
            cell_uid: format!("local:agents:{cell}"),
            namespace: "agents".into(),
            name: cell.into(),
            role: Some("reader".into()),
        },
        protocol: "https".into(),
        host: Some(host.into()),
        port: 443,
        sni: Some(host.into()),
        method: Some(method.into()),
        path: Some(path.into()),
        query: None,
        headers: BTreeMap::from([("accept".into(), "*/*".into())]),
        dns_type: None,
    };
    fill_record(&mut r, &req, Some(1), None, false, false);
    r
}

fn write_log(path: &Path, records: Vec<Record>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, writer) = AuditLog::open(path, AuditOptions::default()).await.unwrap();
        for r in records {
            log.submit_durable(r).await.unwrap();
        }
        log.close().await.unwrap();
        writer.await.unwrap().unwrap();
    });
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

struct Setup {
    _dir: tempfile::TempDir,
    cells: PathBuf,
    log: PathBuf,
    draft: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cells = dir.path().join("cells");
    std::fs::create_dir(&cells).unwrap();
    std::fs::write(cells.join("researcher.yaml"), CELL).unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut old = rec(
        "researcher",
        "docs.example.com",
        "GET",
        "/v1/a",
        Decision::Allow,
        "allowed",
    );
    old.schema = None;
    old.port = None;
    old.headers.clear();
    let mut before = rec(
        "researcher",
        "docs.example.com",
        "GET",
        "/v1/a",
        Decision::Deny,
        "token_expired",
    );
    before.policy_version = None;
    write_log(
        &log,
        vec![
            rec(
                "researcher",
                "docs.example.com",
                "GET",
                "/v1/public",
                Decision::Allow,
                "allowed",
            ),
            rec(
                "researcher",
                "docs.example.com",
                "GET",
                "/v1/private/a",
                Decision::Allow,
                "allowed",
            ),
            rec(
                "researcher",
                "docs.example.com",
                "GET",
                "/v1/private/b",
                Decision::Allow,
                "allowed",
            ),
            rec(
                "researcher",
                "other.example.com",
                "GET",
                "/",
                Decision::Deny,
                "no_capability",
            ),
            rec(
                "researcher",
                "docs.example.com",
                "POST",
                "/v1/x",
                Decision::Deny,
                "http_rule_mismatch",
            ),
            // The policy allowed; the budget refused.
            rec(
                "researcher",
                "docs.example.com",
                "GET",
                "/v1/private/c",
                Decision::Deny,
                "budget_exhausted",
            ),
            old,
            rec(
                "ghost",
                "docs.example.com",
                "GET",
                "/v1/a",
                Decision::Allow,
                "allowed",
            ),
            before,
            rec(
                "researcher",
                "docs.example.com",
                "GET",
                "/v1/public",
                Decision::Error,
                "upstream_timeout",
            ),
        ],
    );
    // The draft: the shipped policies plus a pack closing /v1/private.
    let draft = dir.path().join("draft");
    copy_dir(&policies(), &draft);
    std::fs::create_dir_all(draft.join("packs/no-private")).unwrap();
    std::fs::write(
        draft.join("packs/no-private/no_private.rego"),
        "package cellgate.layers.no_private\n\nimport rego.v1\n\ndeny contains {\"reason\": \"private_path\", \"message\": \"private paths are closed\"} if {\n\tis_string(input.request.path)\n\tstartswith(input.request.path, \"/v1/private/\")\n}\n",
    )
    .unwrap();
    Setup {
        _dir: dir,
        cells,
        log,
        draft,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn replay_with_the_recorded_policy_changes_nothing() {
    let s = setup();
    let o = cellgate(&[
        "policy",
        "replay",
        "--policies",
        policies().to_str().unwrap(),
        "--cells",
        s.cells.to_str().unwrap(),
        "--json",
        s.log.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["records"], 10);
    assert_eq!(r["verified"], true);
    // public, private a/b, other host, POST, budget-refused: the policy's own decisions.
    assert_eq!(r["redecided"], 6, "{r:#}");
    assert_eq!(r["changes"].as_array().unwrap().len(), 0, "{r:#}");
    assert_eq!(r["would"]["allow"], 4);
    assert_eq!(r["would"]["deny"], 2);
    let not = &r["not_redecided"];
    assert_eq!(not["schema 1 record (no request details)"], 1, "{not:#}");
    assert_eq!(not["cell not in --cells"], 1, "{not:#}");
    assert_eq!(not["decided before policy (token_expired)"], 1, "{not:#}");
    assert_eq!(not["not a decision (upstream_timeout)"], 1, "{not:#}");
    assert_eq!(r["unknown_cells"][0], "agents/ghost");
}

#[test]
fn replay_of_a_draft_reports_new_denials_and_gates_on_them() {
    let s = setup();
    let args = |max: &'static str| {
        vec![
            "policy".to_string(),
            "replay".into(),
            "--policies".into(),
            s.draft.to_str().unwrap().into(),
            "--cells".into(),
            s.cells.to_str().unwrap().into(),
            "--max-new-denials".into(),
            max.into(),
            s.log.to_str().unwrap().into(),
        ]
    };
    let run = |a: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(a)
            .output()
            .unwrap()
    };
    // /v1/private/a, /v1/private/b and the budget-refused /v1/private/c were allowed by policy.
    let o = run(args("3"));
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("changed 3: 3 new denials, 0 new allows"),
        "{out}"
    );
    assert!(
        out.contains(
            "3  agents/researcher  docs.example.com  allow (allowed) -> deny (private_path)"
        ),
        "{out}"
    );
    assert!(out.contains("cannot re-decide 4:"), "{out}");
    let o = run(args("2"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("3 new denials, more than --max-new-denials 2"));
}

#[test]
fn replay_refuses_a_tampered_log_and_without_cells_decides_nothing() {
    let s = setup();
    let o = cellgate(&[
        "policy",
        "replay",
        "--policies",
        policies().to_str().unwrap(),
        "--json",
        s.log.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["redecided"], 0);
    assert_eq!(r["not_redecided"]["cell not in --cells"], 7, "{r:#}");

    let body = std::fs::read_to_string(&s.log).unwrap();
    std::fs::write(&s.log, body.replacen("/v1/public", "/v1/publix", 1)).unwrap();
    let o = cellgate(&[
        "policy",
        "replay",
        "--policies",
        policies().to_str().unwrap(),
        "--cells",
        s.cells.to_str().unwrap(),
        s.log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("not replaying an audit log that does not verify"),
        "{}",
        text(&o)
    );
}

/// The advisor's draft, applied to the cell, grants the denied requests and nothing broader.
#[test]
fn advise_drafts_the_least_that_grants_the_denied_requests() {
    let dir = tempfile::tempdir().unwrap();
    let cell_file = dir.path().join("researcher.yaml");
    std::fs::write(&cell_file, CELL).unwrap();
    let denied = |host: &str, method: &str, path: &str| {
        let reason = if host == "docs.example.com" {
            "http_rule_mismatch"
        } else {
            "no_capability"
        };
        rec("researcher", host, method, path, Decision::Deny, reason)
    };
    let wanted = vec![
        denied("api.github.com", "GET", "/repos/a/issues"),
        denied("api.github.com", "GET", "/repos/b/issues"),
        denied("api.github.com", "GET", "/repos/c/issues"),
        denied("api.github.com", "POST", "/graphql"),
        denied("docs.example.com", "DELETE", "/v1/cache"),
        denied("uploads.example.net", "PUT", "/files/report.pdf"),
    ];
    let log = dir.path().join("denied.jsonl");
    write_log(&log, wanted.clone());

    let o = cellgate(&[
        "advise",
        log.to_str().unwrap(),
        "-f",
        cell_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let draft = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(draft.contains("/repos/*/issues"), "{draft}");
    assert!(
        !draft.contains("'*.github.com'") && !draft.contains("\"*.github.com\""),
        "{draft}"
    );
    // Nothing was applied.
    assert_eq!(std::fs::read_to_string(&cell_file).unwrap(), CELL);

    let cells = dir.path().join("advised");
    std::fs::create_dir(&cells).unwrap();
    std::fs::write(cells.join("researcher.yaml"), &draft).unwrap();
    let replay = |log: &Path| {
        let o = cellgate(&[
            "policy",
            "replay",
            "--policies",
            policies().to_str().unwrap(),
            "--cells",
            cells.to_str().unwrap(),
            "--json",
            log.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        json(&o)
    };
    let r = replay(&log);
    assert_eq!(r["redecided"], 6, "{r:#}");
    assert_eq!(r["would"]["allow"], 6, "{r:#}");
    assert_eq!(r["new_allows"], 6, "{r:#}");

    // Outside the draft: another path, method, host, port. Still denied.
    let mut other_port = denied("api.github.com", "GET", "/repos/a/issues");
    other_port.port = Some(8443);
    other_port.destination = Some("203.0.113.10:8443".into());
    let outside = vec![
        denied("api.github.com", "GET", "/repos/a/pulls"),
        denied("api.github.com", "GET", "/graphql"),
        denied("api.github.com", "DELETE", "/repos/a/issues"),
        denied("gist.github.com", "GET", "/repos/a/issues"),
        denied("uploads.example.net", "PUT", "/files/other.pdf"),
        denied("docs.example.com", "DELETE", "/v1/other"),
        other_port,
    ];
    let log2 = dir.path().join("outside.jsonl");
    write_log(&log2, outside);
    let r = replay(&log2);
    assert_eq!(r["redecided"], 7, "{r:#}");
    assert_eq!(r["would"]["deny"], 7, "{r:#}");
    assert_eq!(r["changes"].as_array().unwrap().len(), 0, "{r:#}");
}
