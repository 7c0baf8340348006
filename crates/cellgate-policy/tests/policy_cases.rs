//! Runs the data-driven cases of `policies/tests/*.yaml` against the real `policies/` directory
//! (base policy and packs), through the compiled path the node uses, with the runner that
//! `cellgate policy test` uses ([`cellgate_policy::cases`]). Also runs them from eight threads at
//! once.

use std::path::PathBuf;
use std::sync::Arc;

use cellgate_policy::cases::{self, Case};
use cellgate_policy::PolicySet;
use serde_json::json;

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn load_cases() -> Vec<(String, Case)> {
    let mut out = Vec::new();
    for f in cases::case_files(&policies_dir()).unwrap() {
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        let cases = cases::load_case_file(&f).unwrap_or_else(|e| panic!("{e}"));
        out.extend(cases.into_iter().map(|c| (file.clone(), c)));
    }
    out
}

/// Runs one case; `Err` describes the mismatch.
fn run(set: &PolicySet, file: &str, case: &Case) -> Result<(), String> {
    let r = cases::run_case(set, file, case);
    if r.passed {
        Ok(())
    } else {
        Err(format!(
            "{}: {}: want {}, got {}",
            r.file, r.name, r.expected, r.got
        ))
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

/// The runner reports a wrong expectation as a failure with both sides, not as a pass.
#[test]
fn a_wrong_expectation_fails_with_expected_and_got() {
    let set = PolicySet::load(&policies_dir(), &[]).unwrap();
    let case: Case = serde_yaml::from_str(
        "name: wrong\ninput: {request: {method: DELETE}}\nexpect: {allow: true, outcome: allow, capability: github, reason: allowed}\n",
    )
    .unwrap();
    let r = cases::run_case(&set, "x.yaml", &case);
    assert!(!r.passed);
    assert_eq!(
        r.expected,
        "allow (allowed) capability=github reason=allowed"
    );
    assert_eq!(
        r.got,
        "deny (refused) capability=github reason=http_rule_mismatch"
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
    let mut input = cases::default_input();
    cases::merge(&mut input, &json!({"request": {"host": "evil.test"}}));
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
