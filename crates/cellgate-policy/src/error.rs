//! Errors of loading a policy set ([`PolicyError`]) and of evaluating one request
//! ([`EvalError`]). Both carry what an operator needs to fix the policy: the file, line and
//! column, the test that failed, the rule that misbehaved.

use std::path::PathBuf;

use cellgate_api::policy::DecisionError;

/// Why a policy set was refused. A refused set never replaces a working one.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A directory or file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The base directory holds no `.rego` file.
    #[error("no .rego files under {0}; the base policy is missing")]
    NoPolicies(PathBuf),
    /// A `.rego` file is larger than [`crate::MAX_POLICY_FILE_BYTES`].
    #[error("{path}: {size} bytes exceeds the {limit}-byte limit for a policy file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// regorus refused the source: `path:line:col: message`.
    #[error("{location}: {message}")]
    Parse {
        /// `path:line:col` (or just the path when regorus gave no position).
        location: String,
        /// regorus's message, e.g. `unexpected token`.
        message: String,
        /// regorus's full report, with the offending line and a caret.
        report: String,
    },
    /// A `_test.rego` file declares a package under `cellgate.layers`, where the base policy
    /// would evaluate its tests on every request.
    #[error("{path}: test package {package} must not live under cellgate.layers; use e.g. package cellgate.tests.<name>")]
    TestPackageInLayers {
        /// The file.
        path: String,
        /// Its package.
        package: String,
    },
    /// A `test_*` rule did not evaluate to `true`.
    #[error("{path}:{line}: test {name} failed: {detail}")]
    TestFailed {
        /// The test file.
        path: String,
        /// Line of the rule head.
        line: usize,
        /// The rule name.
        name: String,
        /// What it evaluated to, or the evaluation error.
        detail: String,
    },
    /// The set does not define the entry point, or regorus could not compile it.
    #[error("compiling {entrypoint}: {message}")]
    Compile {
        /// The entry point rule.
        entrypoint: &'static str,
        /// regorus's message.
        message: String,
    },
}

impl PolicyError {
    /// Builds a [`PolicyError::Parse`] from regorus's report, which looks like
    /// `\n--> path:line:col\n  |\n3 | source line\n  |   ^\nerror: message`.
    pub(crate) fn from_regorus(path: &str, err: &impl std::fmt::Display) -> Self {
        let report = err.to_string();
        let location = report
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("--> "))
            .map_or_else(|| path.to_owned(), |l| l.trim().to_owned());
        let message = report
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map_or_else(|| report.trim().to_owned(), |m| m.trim().to_owned());
        PolicyError::Parse {
            location,
            message,
            report,
        }
    }
}

/// Why one evaluation produced no usable decision. The node answers such a request with a
/// denial labelled `policy_error` (see [`crate::PolicyStore::decide`]).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// regorus failed: a builtin error, a conflict between rules, the instruction or time limit.
    #[error("policy evaluation failed: {0}")]
    Engine(String),
    /// `data.cellgate.authz.decision` is undefined for this input.
    #[error("the policy left data.cellgate.authz.decision undefined")]
    Undefined,
    /// The decision is not shaped like a decision document.
    #[error("malformed decision: {field}: {problem}")]
    Malformed {
        /// The offending field (`.` for the document itself).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The decision is well-formed but breaks an invariant.
    #[error("invalid decision: {0}")]
    Invalid(#[from] DecisionError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_report_becomes_location_and_message() {
        let report =
            "\n--> policies/x.rego:3:5\n  |\n3 | foo bar\n  |     ^\nerror: unexpected token";
        let e = PolicyError::from_regorus("policies/x.rego", &report);
        assert_eq!(e.to_string(), "policies/x.rego:3:5: unexpected token");
        let e = PolicyError::from_regorus("p.rego", &"file too large");
        assert_eq!(e.to_string(), "p.rego: file too large");
    }
}
