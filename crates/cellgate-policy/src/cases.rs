//! Data-driven policy cases: YAML files of requests and the decision each must get, run against
//! a compiled [`PolicySet`] through the path the node uses. `cellgate policy test` and the crate's
//! tests share this runner.
//!
//! A case file is a YAML list:
//!
//! ```yaml
//! - name: short description
//!   input:            # merged over [`default_input`] (objects merge, arrays and scalars replace)
//!     request: {method: POST}
//!   expect: {allow: false, outcome: deny, capability: github, reason: http_rule_mismatch}
//! - name: a case the policy cannot decide
//!   input: {request: {port: 70000}}
//!   expect_error: "substring of the error"
//! ```
//!
//! `expect.mode` is compared only when the case gives it. Case files are the `*.yaml` files of
//! a directory named `tests` ([`case_files`]); `policies/tests/README.md` describes the default
//! input.

use std::fmt;
use std::path::{Path, PathBuf};

use cellgate_api::policy::{InputDoc, INPUT_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::set::PolicySet;

/// The directory name whose `*.yaml` files are case files.
pub const CASES_DIR: &str = "tests";
/// A case file larger than this is refused: cases are small.
pub const MAX_CASE_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Shown in reports.
    pub name: String,
    /// Merged over [`default_input`].
    #[serde(default)]
    pub input: Json,
    /// The decision the policy must give.
    pub expect: Option<Expect>,
    /// A substring of the error the case must fail with (an invalid input, a policy error).
    pub expect_error: Option<String>,
}

/// The parts of a decision a case checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `allow` of the decision.
    pub allow: bool,
    /// `allow`, `deny` or `shadow_deny`.
    pub outcome: String,
    /// The capability named (null when none).
    pub capability: Option<String>,
    /// The reason label.
    pub reason: String,
    /// Compared only when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} capability={} reason={}",
            self.outcome,
            if self.allow { "(allowed)" } else { "(refused)" },
            self.capability.as_deref().unwrap_or("null"),
            self.reason
        )?;
        if let Some(m) = &self.mode {
            write!(f, " mode={m}")?;
        }
        Ok(())
    }
}

/// How one case went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseResult {
    /// The case file (its name, or its path relative to the directory tested).
    pub file: String,
    /// The case's name.
    pub name: String,
    /// Whether the decision (or error) was the expected one.
    pub passed: bool,
    /// What the case expects, in words.
    pub expected: String,
    /// What the policy gave, in words.
    pub got: String,
}

/// Why cases could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A case file is not a list of cases.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, with line and column.
        message: String,
    },
    /// A case file is too large.
    #[error("{path}: {size} bytes exceeds the {limit}-byte limit for a case file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// The input every case starts from: cell `dev/agent`, no role, five capabilities (github,
/// example, db, vpn, trial in shadow mode) and `GET https://api.github.com/repos/a/b`; see
/// `policies/tests/README.md`.
pub fn default_input() -> Json {
    fn cap(name: &str, mode: &str, tls: &str, dest: Json, http: Json) -> Json {
        json!({"name": name, "mode": mode, "tls": tls, "destinations": [dest], "http": http,
               "approval": false, "credential": false})
    }
    let mut db = cap(
        "db",
        "enforce",
        "intercept",
        json!({"host": null, "cidr": "10.0.0.0/8", "ports": [5432]}),
        Json::Null,
    );
    db["protocol"] = json!("tcp");
    json!({
        "version": INPUT_VERSION,
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
                db,
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

/// Merges `over` into `base`: objects merge key by key; anything else replaces.
pub fn merge(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The input of `case`: [`default_input`] with the case's input (when it has one) merged over it.
///
/// # Errors
///
/// serde's message when the result is not a valid input document.
pub fn case_input(case: &Case) -> Result<InputDoc, String> {
    let mut input = default_input();
    if !case.input.is_null() {
        merge(&mut input, &case.input);
    }
    serde_json::from_value::<InputDoc>(input).map_err(|e| e.to_string())
}

/// Every `*.yaml` in a directory named [`CASES_DIR`] under `dir` (or `dir` itself when it is
/// one), sorted.
///
/// # Errors
///
/// [`CaseError::Io`] for a directory that cannot be read.
pub fn case_files(dir: &Path) -> Result<Vec<PathBuf>, CaseError> {
    fn walk(dir: &Path, in_cases: bool, out: &mut Vec<PathBuf>) -> Result<(), CaseError> {
        let io = |source| CaseError::Io {
            path: dir.to_path_buf(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            if entry.file_type().map_err(io)?.is_dir() {
                let cases = path.file_name().is_some_and(|n| n == CASES_DIR);
                walk(&path, cases, out)?;
            } else if in_cases && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(
        dir,
        dir.file_name().is_some_and(|n| n == CASES_DIR),
        &mut out,
    )?;
    out.sort();
    Ok(out)
}

/// Reads one case file.
///
/// # Errors
///
/// [`CaseError`] when it cannot be read, is too large, or is not a list of cases.
pub fn load_case_file(path: &Path) -> Result<Vec<Case>, CaseError> {
    let io = |source| CaseError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_CASE_FILE_BYTES {
        return Err(CaseError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_CASE_FILE_BYTES,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_yaml::from_str(&text).map_err(|e| CaseError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Runs one case against `set`; `file` labels the result.
pub fn run_case(set: &PolicySet, file: &str, case: &Case) -> CaseResult {
    let result = case_input(case).and_then(|doc| set.evaluate(&doc).map_err(|e| e.to_string()));
    let (passed, expected, got) = match (&case.expect, &case.expect_error, result) {
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
            (&got == want, want.to_string(), got.to_string())
        }
        (None, Some(want), Err(e)) => (
            e.contains(want.as_str()),
            format!("error containing {want:?}"),
            format!("error: {e}"),
        ),
        (None, Some(want), Ok(d)) => (
            false,
            format!("error containing {want:?}"),
            format!("{} {}", d.outcome, d.reason),
        ),
        (Some(want), None, Err(e)) => (false, want.to_string(), format!("error: {e}")),
        _ => (
            false,
            "exactly one of expect and expect_error".to_owned(),
            "a malformed case".to_owned(),
        ),
    };
    CaseResult {
        file: file.to_owned(),
        name: case.name.clone(),
        passed,
        expected,
        got,
    }
}

/// Runs every case of every case file under `dir` ([`case_files`]); files are labelled by their
/// path relative to `dir`.
///
/// # Errors
///
/// [`CaseError`] when a case file cannot be read or parsed.
pub fn run_dir(set: &PolicySet, dir: &Path) -> Result<Vec<CaseResult>, CaseError> {
    let mut out = Vec::new();
    for path in case_files(dir)? {
        let label = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        for case in load_case_file(&path)? {
            out.push(run_case(set, &label, &case));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_arrays_and_merges_objects() {
        let mut a = json!({"x": {"y": 1, "z": [1, 2]}, "k": 1});
        merge(&mut a, &json!({"x": {"z": [3]}, "n": null}));
        assert_eq!(a, json!({"x": {"y": 1, "z": [3]}, "k": 1, "n": null}));
    }

    #[test]
    fn the_default_input_is_a_valid_input() {
        let case = Case {
            name: "x".into(),
            input: Json::Null,
            expect: None,
            expect_error: None,
        };
        let doc = case_input(&case).unwrap();
        assert_eq!(doc.cell.capabilities.len(), 5);
        let case = Case {
            input: json!({"request": {"port": 70000}}),
            ..case
        };
        assert!(case_input(&case).is_err());
    }
}
