//! Runs the data-driven cases of `policies/tests/*.yaml` against the real `policies/` directory
//! (base policy and packs), through the compiled path the node uses. Also runs them from eight
//! threads at once.

use std::path::PathBuf;
use std::sync::Arc;

use cellgate_api::policy::InputDoc;
use cellgate_policy::PolicySet;
use serde::Deserialize;
use serde_json::{json, Value as Json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    input: Json,
    expect: Option<Expect>,
    expect_error: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Expect {
    allow: bool,
    outcome: String,
    capability: Option<String>,
    reason: String,
    mode: Option<String>,
}

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn cap(name: &str, mode: &str, tls: &str, dest: Json, http: Json) -> Json {
    json!({"name": name, "mode": mode, "tls": tls, "destinations": [dest], "http": http,
           "approval": false, "credential": false})
}

/// `cap` with `protocol: tcp`.
fn tcp(mut cap: Json) -> Json {
    cap["protocol"] = json!("tcp");
    cap
}

/// The input every case starts from; see `policies/tests/README.md`.
fn default_input() -> Json {
    json!({
        "version": cellgate_api::policy::INPUT_VERSION,
        "time_ns": 1_700_000_000_000_000_000_i64,
        "front_door": "intake",
        "source": {"address": "10.1.0.2", "port": 40000},
        "identity": {"jti": "jti-1", "cell_uid": "uid-1", "namespace": "dev", "name": "agent", "role": null},
        "cell": {
            "uid": "uid-1", "namespace": "dev", "name": "agent", "role": null,
            "suspended": false, "labels": {},
            "capabilities": [
                cap("github", "enforce", "intercept",
                    json!({"host": "api.github.com", "cidr": null, "ports": [443]}),
                    json!({"methods": ["GET", "HEAD"], "paths": ["/repos/**", "/user"]})),
                cap("example", "enforce", "intercept",
                    json!({"host": "*.example.com", "cidr": null, "ports": [443, 80]}), Json::Null),
                tcp(cap("db", "enforce", "intercept",
                    json!({"host": null, "cidr": "10.0.0.0/8", "ports": [5432]}), Json::Null)),
                cap("vpn", "enforce", "passthrough",
                    json!({"host": "vpn.corp.test", "cidr": null, "ports": [443]}), Json::Null),
                cap("trial", "shadow", "intercept",
                    json!({"host": "trial.test", "cidr": null, "ports": [443]}),
                    json!({"methods": ["GET"], "paths": ["/v1/*"]})),
            ],
        },
        "request": {
            "protocol": "https", "host": "api.github.com", "port": 443, "sni": "api.github.com",
            "method": "GET", "path": "/repos/a/b", "query": null, "headers": {},
            "destination": {"address": "140.82.112.6", "port": 443}, "dns_type": null,
        },
    })
}

/// Objects merge key by key; anything else replaces.
fn merge(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn load_cases() -> Vec<(String, Case)> {
    let dir = policies_dir().join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let cases: Vec<Case> =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        out.extend(cases.into_iter().map(|c| (file.clone(), c)));
    }
    out
}

/// Runs one case; `Err` describes the mismatch.
fn run(set: &PolicySet, file: &str, case: &Case) -> Result<(), String> {
    let mut input = default_input();
    merge(&mut input, &case.input);
    let result = serde_json::from_value::<InputDoc>(input)
        .map_err(|e| e.to_string())
        .and_then(|doc| set.evaluate(&doc).map_err(|e| e.to_string()));
    let label = format!("{file}: {}", case.name);
    match (&case.expect, &case.expect_error, result) {
        (Some(want), None, Ok(d)) => {
            let got = Expect {
                allow: d.allow,
                outcome: d.outcome.clone(),
                capability: d.capability.clone(),
                reason: d.reason.clone(),
                mode: if want.mode.is_some() {
                    d.mode.clone()
                } else {
                    None
                },
            };
            if &got == want {
                Ok(())
            } else {
                Err(format!("{label}: want {want:?}, got {got:?} (full: {d:?})"))
            }
        }
        (None, Some(want), Err(e)) if e.contains(want.as_str()) => Ok(()),
        (None, Some(want), other) => Err(format!(
            "{label}: want error containing {want:?}, got {other:?}"
        )),
        (Some(_), None, Err(e)) => Err(format!("{label}: unexpected error: {e}")),
        _ => Err(format!(
            "{label}: a case needs exactly one of expect and expect_error"
        )),
    }
}

#[test]
fn yaml_cases_pass_on_the_real_policies() {
    let set = PolicySet::load(&policies_dir(), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        set.tests_run() >= 10,
        "the Rego tests did not run: {}",
        set.tests_run()
    );
    let cases = load_cases();
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(file, case)| run(&set, file, case).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn evaluates_from_eight_threads() {
    let set = Arc::new(PolicySet::load(&policies_dir(), &[]).unwrap());
    let cases = Arc::new(load_cases());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (set, cases) = (Arc::clone(&set), Arc::clone(&cases));
            std::thread::spawn(move || {
                for round in 0..20 {
                    // Each thread walks the cases from a different offset, so neighbouring
                    // evaluations on one thread's VM differ.
                    for i in 0..cases.len() {
                        let (file, case) = &cases[(i + t * 7 + round) % cases.len()];
                        run(&set, file, case).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn the_hint_speaks_to_the_agent() {
    let set = PolicySet::load(&policies_dir(), &[]).unwrap();
    let mut input = default_input();
    merge(&mut input, &json!({"request": {"host": "evil.test"}}));
    let d = set
        .evaluate(&serde_json::from_value(input).unwrap())
        .unwrap();
    let hint = d.hint.unwrap();
    assert!(hint.contains("This cell may call: api.github.com:443 via capability github (GET|HEAD /repos/**|/user)"), "{hint}");
    assert_eq!(
        d.reasons,
        vec!["no capability of this cell reaches GET evil.test:443/repos/a/b".to_string()]
    );
}
