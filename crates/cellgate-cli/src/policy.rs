//! `cellgate policy test DIR`: a pack's (or a whole policy directory's) Rego tests and YAML
//! cases, as a pass/fail table; and the loading of policy directories the way the node loads
//! them, shared with [`crate::explain`].
//!
//! The `policy` subcommands are the variants of `PolicyCmd` in `lib.rs` (`replay`, `test`); a
//! new one is one variant there, one dispatch line in `run`, and its module.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use cellgate_policy::cases::{self, CaseResult};
use cellgate_policy::set::read_policy_files;
use cellgate_policy::{PolicyError, PolicyFile, PolicySet, RegoTest};
use serde::Serialize;

/// `cellgate policy test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// A pack, or a directory of packs; with the base policy inside it (a module of package
    /// `cellgate.authz`, as in `policies/`), that one is used instead of the built-in base.
    pub dir: PathBuf,
    /// Base policy directory (the built-in base policy when absent and DIR holds none).
    #[arg(long)]
    pub base_policy: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The files of a set as the node reads them: the base (`base`, or the built-in base policy)
/// and every pack under the `packs` directories.
///
/// # Errors
///
/// A directory or file that cannot be read.
pub fn load_files(base: Option<&Path>, packs: &[PathBuf]) -> Result<Vec<PolicyFile>, PolicyError> {
    let mut files = match base {
        Some(dir) => read_policy_files(dir, &[])?,
        None => cellgate_node::policy_source::BUILTIN_BASE_POLICY
            .iter()
            .map(|(name, source)| PolicyFile {
                path: PathBuf::from(format!("builtin/policies/base/{name}")),
                relative: format!("base/{name}"),
                source: (*source).to_string(),
            })
            .collect(),
    };
    for (n, dir) in packs.iter().enumerate() {
        match read_policy_files(dir, &[]) {
            Ok(more) => files.extend(more.into_iter().map(|mut f| {
                f.relative = format!("packs/{n}/{}", f.relative);
                f
            })),
            // A directory with only a manifest, or nothing: the base alone decides.
            Err(PolicyError::NoPolicies(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

/// Whether `files` hold the base policy (a module of package `cellgate.authz`).
fn holds_base(files: &[PolicyFile]) -> bool {
    files.iter().any(|f| {
        f.source
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["package", "cellgate.authz"])
    })
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    policy_version: Option<&'a str>,
    load_error: Option<String>,
    rego: &'a [RegoTest],
    cases: &'a [CaseResult],
    passed: usize,
    failed: usize,
}

/// Runs `cellgate policy test`: exit 0 when everything passed, 1 when a test, a case or the
/// loading failed.
///
/// # Errors
///
/// Directories or case files that cannot be read or parsed.
pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    let own = read_policy_files(&args.dir, &[]).or_else(|e| match e {
        PolicyError::NoPolicies(_) => Ok(Vec::new()),
        e => Err(e),
    })?;
    let files = if args.base_policy.is_none() && holds_base(&own) {
        own
    } else {
        load_files(args.base_policy.as_deref(), std::slice::from_ref(&args.dir))?
    };
    let run = PolicySet::test_files(files);
    let (set, load_error) = match run.set {
        Ok(set) => (Some(set), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let results = match &set {
        Some(set) => cases::run_dir(set, &args.dir)
            .with_context(|| format!("reading the cases under {}", args.dir.display()))?,
        None => Vec::new(),
    };
    let failed = run.tests.iter().filter(|t| t.failure.is_some()).count()
        + results.iter().filter(|r| !r.passed).count()
        + usize::from(load_error.is_some());
    let passed = run.tests.len() + results.len() + usize::from(load_error.is_some()) - failed;
    if args.json {
        let report = Report {
            policy_version: set.as_ref().map(|s| s.version()),
            load_error: load_error.clone(),
            rego: &run.tests,
            cases: &results,
            passed,
            failed,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!(
            "{}",
            table(set.as_ref(), load_error.as_deref(), &run.tests, &results)
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn table(
    set: Option<&PolicySet>,
    load_error: Option<&str>,
    rego: &[RegoTest],
    results: &[CaseResult],
) -> String {
    let mut rows: Vec<(&str, String, String)> = Vec::new();
    if let Some(e) = load_error {
        rows.push(("FAIL", "load".into(), e.to_owned()));
    }
    for t in rego {
        let what = format!("{}:{} {}", t.path, t.line, t.name);
        match &t.failure {
            None => rows.push(("pass", "rego".into(), what)),
            Some(f) => rows.push(("FAIL", "rego".into(), format!("{what}: {f}"))),
        }
    }
    for r in results {
        let what = format!("{}: {}", r.file, r.name);
        if r.passed {
            rows.push(("pass", "case".into(), what));
        } else {
            rows.push((
                "FAIL",
                "case".into(),
                format!(
                    "{what}\n              expected: {}\n              got:      {}",
                    r.expected, r.got
                ),
            ));
        }
    }
    let mut out = String::new();
    if let Some(set) = set {
        let packs: Vec<String> = set
            .packs()
            .iter()
            .map(|p| format!("{}@{} ({})", p.name, p.version, p.mode))
            .collect();
        out.push_str(&format!(
            "policy {}: {}\n\n",
            set.version(),
            packs.join(", ")
        ));
    }
    out.push_str("result  kind  test\n");
    for (result, kind, what) in &rows {
        out.push_str(&format!("{result:<6}  {kind:<4}  {what}\n"));
    }
    let failed = rows.iter().filter(|r| r.0 == "FAIL").count();
    out.push_str(&format!(
        "\n{} passed, {} failed\n",
        rows.len() - failed,
        failed
    ));
    out
}
