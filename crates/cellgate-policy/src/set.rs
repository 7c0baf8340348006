//! [`PolicySet`]: a loaded, tested and compiled set of Rego files, and the evaluation of one
//! request against it.
//!
//! Loading ([`PolicySet::load`]) reads every `*.rego` file under the base directory and the
//! extra directories (recursively, sorted), parses each with regorus, runs every `test_*` rule of
//! every `*_test.rego` file, and compiles `data.cellgate.authz.decision` to a regorus RVM
//! program. Evaluating ([`PolicySet::evaluate`]) does no I/O: each worker thread keeps its own VM
//! with the program loaded (the VM is not `Sync`), and only the input changes between requests.

use std::cell::RefCell;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cellgate_api::policy::{DecisionDoc, InputDoc};
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::{Program, RegoVM};
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Value};
use sha2::{Digest, Sha256};

use crate::convert::{decision_from_value, eval_cell_value, CellValue, InputSlot};
use crate::error::{EvalError, PolicyError};

/// The rule every policy set must define.
pub const ENTRYPOINT: &str = "data.cellgate.authz.decision";
/// A policy file larger than this is refused before it is read: policies are small, and the
/// directory may be writable by people who should not be able to exhaust the node's memory.
pub const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;
/// Most `.rego` files in one set (same reason).
pub const MAX_POLICY_FILES: usize = 1024;
/// Instruction budget of one evaluation. The base policy needs a few thousand for an allow and
/// a few tens of thousands to write the hint of a denial for a cell with many capabilities; a
/// pack that loops beyond this is stopped and the request denied with `policy_error`.
pub const MAX_INSTRUCTIONS: usize = 1_000_000;
/// Wall-clock budget of one evaluation, checked cooperatively by the VM. A backstop behind
/// [`MAX_INSTRUCTIONS`] (which is deterministic): wall-clock time includes preemption, so it is
/// set far above a decision's tens of microseconds to never deny a request because the node was
/// busy.
pub const EVAL_TIME_LIMIT: Duration = Duration::from_secs(2);
/// VM instructions between two clock reads.
const TIMER_CHECK_INTERVAL: u32 = 256;
/// Length of [`PolicySet::version`] in hex digits.
const VERSION_HEX_LEN: usize = 12;
/// Suffix of files whose `test_*` rules must pass.
const TEST_SUFFIX: &str = "_test.rego";
/// Package prefix of user layers; test packages may not live there.
const LAYERS_PACKAGE: [&str; 2] = ["cellgate", "layers"];
/// Package prefix reserved for what the loader generates; no policy file may declare it.
const RESERVED_PACKAGE: [&str; 2] = ["cellgate", "internal"];
/// Shown as the path of the generated layer package in errors.
const GENERATED_LAYERS_PATH: &str = "<generated>/cellgate/internal/layers.rego";

/// Distinguishes sets loaded in this process, so that a thread's cached VM is never used with a
/// different program, even one with the same version.
static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

/// VMs cached per thread: the current set and, during a swap, the previous one.
const VMS_PER_THREAD: usize = 2;

/// A worker thread's evaluator for one set: the VM with the program loaded, and two input slots
/// used in turn, so that the one being filled is no longer referenced by the VM (which keeps the
/// previous input until its next run).
struct Worker {
    set_id: u64,
    vm: RegoVM,
    slots: [InputSlot; 2],
    next: usize,
}

thread_local! {
    static VMS: RefCell<Vec<Worker>> = const { RefCell::new(Vec::new()) };
}

/// One `.rego` file of a set.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    /// The path as read (shown in errors).
    pub path: PathBuf,
    /// Path relative to its root directory, `/`-separated (hashed into the version).
    pub relative: String,
    /// The source.
    pub source: String,
}

/// A loaded, tested and compiled policy set. Cheap to share behind an `Arc`.
pub struct PolicySet {
    id: u64,
    version: String,
    files: Vec<PathBuf>,
    tests_run: usize,
    compiled: CompiledPolicy,
    program: Arc<Program>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("files", &self.files)
            .field("tests_run", &self.tests_run)
            .finish_non_exhaustive()
    }
}

impl PolicySet {
    /// Reads, parses, tests and compiles every `*.rego` under `base_dir` and `extra_dirs`.
    ///
    /// # Errors
    ///
    /// [`PolicyError`]: unreadable file, no policy at all, a parse error (`path:line:col:
    /// message`), a failing test (`path:line: test name failed`), a missing entry point.
    pub fn load(base_dir: &Path, extra_dirs: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        let files = read_policy_files(base_dir, extra_dirs)?;
        Self::from_files(files)
    }

    /// Like [`PolicySet::load`], from sources already in memory (tests, replay of a draft).
    ///
    /// # Errors
    ///
    /// As [`PolicySet::load`], without the I/O ones.
    pub fn from_files(files: Vec<PolicyFile>) -> Result<PolicySet, PolicyError> {
        let version = version_of(&files);
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        for f in &files {
            let path = f.path.display().to_string();
            engine
                .add_policy(path.clone(), f.source.clone())
                .map_err(|e| PolicyError::from_regorus(&path, &e))?;
        }
        if let Some(module) = layers_module(&engine, &files)? {
            engine
                .add_policy(GENERATED_LAYERS_PATH.into(), module)
                .map_err(|e| PolicyError::from_regorus(GENERATED_LAYERS_PATH, &e))?;
        }
        let tests_run = run_tests(&mut engine, &files)?;
        let compiled = engine
            .compile_with_entrypoint(&ENTRYPOINT.into())
            .map_err(|e| compile_error(&e))?;
        let program = Compiler::compile_from_policy(&compiled, &[ENTRYPOINT])
            .map_err(|e| compile_error(&e))?;
        Ok(PolicySet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            version,
            files: files.into_iter().map(|f| f.path).collect(),
            tests_run,
            compiled,
            program,
        })
    }

    /// First 12 hex digits of SHA-256 over the sorted (relative path, content) pairs.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The files of the set, in load order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// How many `test_*` rules passed when the set was loaded.
    pub fn tests_run(&self) -> usize {
        self.tests_run
    }

    /// Decides one request. No I/O; safe to call from any number of threads.
    ///
    /// # Errors
    ///
    /// [`EvalError`] when the policy fails, exceeds [`MAX_INSTRUCTIONS`] or [`EVAL_TIME_LIMIT`],
    /// or answers something that is not a valid decision document.
    ///
    /// # Caveats
    ///
    /// The time limit is cooperative (checked every few hundred VM instructions); a single
    /// builtin call (a huge regex) is not interrupted.
    pub fn evaluate(&self, input: &InputDoc) -> Result<DecisionDoc, EvalError> {
        self.run(input, eval_cell_value(input, None))
    }

    /// Like [`PolicySet::evaluate`], with the cell part of the input prebuilt by the caller
    /// (`input.cell` is ignored): the node converts a cell once, not once per request.
    ///
    /// # Errors
    ///
    /// As [`PolicySet::evaluate`].
    pub fn evaluate_with_cell(
        &self,
        input: &InputDoc,
        cell: &CellValue,
    ) -> Result<DecisionDoc, EvalError> {
        cell.warm();
        self.run(input, eval_cell_value(input, Some(cell)))
    }

    fn run(&self, input: &InputDoc, cell_value: Value) -> Result<DecisionDoc, EvalError> {
        let result = VMS.with(|cell| {
            let mut vms = cell.borrow_mut();
            let pos = match vms.iter().position(|w| w.set_id == self.id) {
                Some(pos) => pos,
                None => {
                    if vms.len() >= VMS_PER_THREAD {
                        vms.remove(0);
                    }
                    vms.push(Worker {
                        set_id: self.id,
                        vm: self.new_vm(),
                        slots: [InputSlot::new(), InputSlot::new()],
                        next: 0,
                    });
                    vms.len().saturating_sub(1)
                }
            };
            let Some(w) = vms.get_mut(pos) else {
                return Err(EvalError::Engine("thread-local vm cache is empty".into()));
            };
            w.next ^= 1;
            let Some(slot) = w.slots.get_mut(w.next) else {
                return Err(EvalError::Engine("input slot out of range".into()));
            };
            w.vm.set_input(slot.fill(input, cell_value));
            let out = w.vm.execute();
            if out.is_err() {
                // A VM stopped mid-flight (limit, builtin error) is not trusted with the next
                // request: rebuild it.
                vms.remove(pos);
            }
            out.map_err(|e| EvalError::Engine(e.to_string()))
        })?;
        decision_from_value(&result)
    }

    fn new_vm(&self) -> RegoVM {
        let mut vm = RegoVM::new_with_policy(self.compiled.clone());
        vm.load_program(self.program.clone());
        vm.set_max_instructions(MAX_INSTRUCTIONS);
        vm.set_execution_timer_config(Some(ExecutionTimerConfig {
            limit: EVAL_TIME_LIMIT,
            check_interval: NonZeroU32::new(TIMER_CHECK_INTERVAL).unwrap_or(NonZeroU32::MIN),
        }));
        vm
    }
}

fn compile_error(e: &impl fmt::Display) -> PolicyError {
    PolicyError::Compile {
        entrypoint: ENTRYPOINT,
        message: e.to_string(),
    }
}

/// Every `*.rego` under the roots, each root sorted by relative path.
///
/// # Errors
///
/// [`PolicyError::Io`], [`PolicyError::TooLarge`], [`PolicyError::NoPolicies`] when the base
/// holds none.
pub fn read_policy_files(
    base_dir: &Path,
    extra_dirs: &[PathBuf],
) -> Result<Vec<PolicyFile>, PolicyError> {
    let mut out = Vec::new();
    let roots = std::iter::once(base_dir).chain(extra_dirs.iter().map(PathBuf::as_path));
    for (n, root) in roots.enumerate() {
        let mut paths = Vec::new();
        collect_rego(root, &mut paths)?;
        paths.sort();
        if n == 0 && paths.is_empty() {
            return Err(PolicyError::NoPolicies(root.to_path_buf()));
        }
        for path in paths {
            if out.len() >= MAX_POLICY_FILES {
                return Err(PolicyError::TooLarge {
                    path,
                    size: u64::try_from(out.len()).unwrap_or(u64::MAX),
                    limit: u64::try_from(MAX_POLICY_FILES).unwrap_or(u64::MAX),
                });
            }
            let io = |source| PolicyError::Io {
                path: path.clone(),
                source,
            };
            let size = std::fs::metadata(&path).map_err(io)?.len();
            if size > MAX_POLICY_FILE_BYTES {
                return Err(PolicyError::TooLarge {
                    path,
                    size,
                    limit: MAX_POLICY_FILE_BYTES,
                });
            }
            let source = std::fs::read_to_string(&path).map_err(io)?;
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let relative = format!(
                "{n}/{}",
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/")
            );
            out.push(PolicyFile {
                path,
                relative,
                source,
            });
        }
    }
    Ok(out)
}

fn collect_rego(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PolicyError> {
    let io = |source| PolicyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io)?;
        if kind.is_dir() {
            collect_rego(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rego") {
            out.push(path);
        }
    }
    Ok(())
}

/// First 12 hex digits of SHA-256 over (relative path, NUL, content, NUL) in sorted order.
pub(crate) fn version_of(files: &[PolicyFile]) -> String {
    let mut pairs: Vec<(&str, &str)> = files
        .iter()
        .map(|f| (f.relative.as_str(), f.source.as_str()))
        .collect();
    pairs.sort_unstable();
    let mut h = Sha256::new();
    for (path, source) in pairs {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(source.as_bytes());
        h.update([0]);
    }
    let mut v = hex::encode(h.finalize());
    v.truncate(VERSION_HEX_LEN);
    v
}

/// The package `cellgate.internal.layers`, naming every layer package of the set so that the base
/// policy looks each one up directly instead of walking `data.cellgate.layers` (which makes the
/// VM build the whole virtual document on every request); see "Layers" in
/// `policies/base/cellgate.rego`. `None` when the layers cannot be named from the package
/// declarations alone: a package `cellgate` or `cellgate.layers` may define rules anywhere under
/// `data.cellgate.layers`, and the base policy then walks it.
///
/// # Errors
///
/// [`PolicyError::ReservedPackage`] when a file declares a package under `cellgate.internal`.
fn layers_module(engine: &Engine, files: &[PolicyFile]) -> Result<Option<String>, PolicyError> {
    let packages = engine
        .get_policy_package_components()
        .map_err(|e| compile_error(&e))?;
    let mut names = std::collections::BTreeSet::new();
    let mut resolvable = true;
    for (f, pkg) in files.iter().zip(&packages) {
        let c = &pkg.components;
        if c.get(..RESERVED_PACKAGE.len()) == Some(&RESERVED_PACKAGE.map(String::from)[..]) {
            return Err(PolicyError::ReservedPackage {
                path: f.path.display().to_string(),
                package: c.join("."),
            });
        }
        if LAYERS_PACKAGE.starts_with(&c.iter().map(String::as_str).collect::<Vec<_>>()) {
            resolvable = false; // `cellgate` or `cellgate.layers` itself
        } else if c.get(..LAYERS_PACKAGE.len()) == Some(&LAYERS_PACKAGE.map(String::from)[..]) {
            if let Some(name) = c.get(LAYERS_PACKAGE.len()) {
                names.insert(name.clone());
            }
        }
    }
    if !resolvable {
        return Ok(None);
    }
    let mut out = String::from(
        "# Generated by cellgate-policy when the set is loaded: the layer packages of this set.\n\
         package cellgate.internal.layers\n\nimport rego.v1\n\nresolved := true\n\n",
    );
    if names.is_empty() {
        out.push_str("quiet := true\n\ndenies := set()\n");
        return Ok(Some(out));
    }
    let refs: Vec<String> = names
        .iter()
        .map(|n| {
            let quoted = serde_json::to_string(n).unwrap_or_default();
            format!("data.cellgate.layers[{quoted}].deny")
        })
        .collect();
    out.push_str("quiet if {\n");
    for r in &refs {
        out.push_str(&format!("\tnot {r} != set()\n"));
    }
    out.push_str("}\n");
    for (n, r) in names.iter().zip(&refs) {
        let quoted = serde_json::to_string(n).unwrap_or_default();
        out.push_str(&format!("\ndenies contains [{quoted}, d] if d := {r}\n"));
    }
    Ok(Some(out))
}

/// Runs every `test_*` rule declared in the `*_test.rego` files; returns how many passed.
fn run_tests(engine: &mut Engine, files: &[PolicyFile]) -> Result<usize, PolicyError> {
    let packages = engine
        .get_policy_package_components()
        .map_err(|e| compile_error(&e))?;
    let mut run = 0;
    for (f, pkg) in files.iter().zip(packages) {
        let path = f.path.display().to_string();
        if !path.ends_with(TEST_SUFFIX) {
            continue;
        }
        if pkg.components.get(..LAYERS_PACKAGE.len()) == Some(&LAYERS_PACKAGE.map(String::from)[..])
        {
            return Err(PolicyError::TestPackageInLayers {
                path,
                package: pkg.components.join("."),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for (line, name) in test_rule_heads(&f.source) {
            if !seen.insert(name.clone()) {
                continue; // several bodies of one test rule are evaluated together
            }
            let declared = engine
                .has_declared_rule_rooted_at(&path, &name)
                .unwrap_or(false);
            if !declared {
                continue; // the scan matched something that is not a rule head
            }
            let rule = format!("data.{}.{}", pkg.components.join("."), name);
            let fail = |detail: String| PolicyError::TestFailed {
                path: path.clone(),
                line,
                name: name.clone(),
                detail,
            };
            match engine.eval_rule(rule) {
                Ok(Value::Bool(true)) => run += 1,
                Ok(Value::Undefined) => {
                    return Err(fail("undefined (a condition did not hold)".into()))
                }
                Ok(other) => return Err(fail(format!("evaluated to {other}, not true"))),
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    }
    Ok(run)
}

/// `(line, name)` of every line that starts, at column 0, with a `test_` identifier: the OPA
/// convention for test rule heads. Candidates are confirmed with regorus before being run.
fn test_rule_heads(source: &str) -> Vec<(usize, String)> {
    source
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name.starts_with("test_")
                .then(|| (i.saturating_add(1), name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, source: &str) -> PolicyFile {
        PolicyFile {
            path: PathBuf::from(path),
            relative: format!("0/{path}"),
            source: source.into(),
        }
    }

    const MINI: &str = r#"package cellgate.authz
import rego.v1
decision := {"allow": true, "outcome": "allow", "capability": null, "mode": null,
  "reason": "allowed", "reasons": [], "hint": null} if input.request.port == 443
"#;

    #[test]
    fn finds_test_heads() {
        let src = "package x\ntest_a if {\n  true\n}\n  test_not_a_head\ntest_b := true\n";
        assert_eq!(
            test_rule_heads(src),
            vec![(2, "test_a".to_string()), (6, "test_b".to_string())]
        );
    }

    #[test]
    fn version_ignores_order_and_changes_with_content() {
        let a = vec![file("a.rego", "x"), file("b.rego", "y")];
        let b = vec![file("b.rego", "y"), file("a.rego", "x")];
        assert_eq!(version_of(&a), version_of(&b));
        assert_eq!(version_of(&a).len(), 12);
        let c = vec![file("a.rego", "x2"), file("b.rego", "y")];
        assert_ne!(version_of(&a), version_of(&c));
    }

    #[test]
    fn parse_error_carries_position() {
        let err = PolicySet::from_files(vec![file(
            "bad.rego",
            "package x\nimport rego.v1\nallow if {\n",
        )])
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("bad.rego:"), "{msg}");
        assert!(matches!(err, PolicyError::Parse { .. }));
    }

    #[test]
    fn failing_test_is_reported_with_line() {
        let tests = "package cellgate.tests.mini\nimport rego.v1\n\ntest_ok if data.cellgate.authz.decision.allow with input as {\"request\": {\"port\": 443}}\ntest_bad if data.cellgate.authz.decision.allow with input as {\"request\": {\"port\": 80}}\n";
        let err = PolicySet::from_files(vec![file("m.rego", MINI), file("m_test.rego", tests)])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "m_test.rego:5: test test_bad failed: undefined (a condition did not hold)"
        );
        let good = tests
            .replace("test_bad", "test_also_ok")
            .replace("80}", "443}");
        let set =
            PolicySet::from_files(vec![file("m.rego", MINI), file("m_test.rego", &good)]).unwrap();
        assert_eq!(set.tests_run(), 2);
    }

    #[test]
    fn test_package_under_layers_is_refused() {
        let tests = "package cellgate.layers.x\nimport rego.v1\ntest_a if true\n";
        let err = PolicySet::from_files(vec![file("m.rego", MINI), file("x_test.rego", tests)])
            .unwrap_err();
        assert!(
            matches!(err, PolicyError::TestPackageInLayers { .. }),
            "{err}"
        );
    }

    #[test]
    fn reserved_package_is_refused() {
        let src = "package cellgate.internal.layers\nimport rego.v1\nquiet := true\n";
        let err =
            PolicySet::from_files(vec![file("m.rego", MINI), file("x.rego", src)]).unwrap_err();
        assert!(matches!(err, PolicyError::ReservedPackage { .. }), "{err}");
    }

    /// Layer packages are named in the generated package; a package that may define rules
    /// anywhere under `data.cellgate.layers` leaves the base policy walking it.
    #[test]
    fn layers_are_resolved_when_packages_name_them() {
        let layer = |pkg: &str| {
            file(
                &format!("{pkg}.rego"),
                &format!("package {pkg}\nimport rego.v1\ndeny contains \"no\" if input.request.port == 1\n"),
            )
        };
        let module = |files: Vec<PolicyFile>| {
            let mut engine = Engine::new();
            engine.set_rego_v0(false);
            for f in &files {
                engine
                    .add_policy(f.path.display().to_string(), f.source.clone())
                    .unwrap();
            }
            layers_module(&engine, &files).unwrap()
        };
        let m = module(vec![file("m.rego", MINI)]).unwrap();
        assert!(m.contains("quiet := true"), "{m}");
        let m = module(vec![
            layer("cellgate.layers.a"),
            layer("cellgate.layers.b.c"),
        ])
        .unwrap();
        assert!(
            m.contains("not data.cellgate.layers[\"a\"].deny != set()"),
            "{m}"
        );
        assert!(
            m.contains("denies contains [\"b\", d] if d := data.cellgate.layers[\"b\"].deny"),
            "{m}"
        );
        assert!(module(vec![layer("cellgate.layers")]).is_none());
        assert!(module(vec![layer("cellgate")]).is_none());
        // Either way the set loads and decides.
        for pkg in ["cellgate.layers.a", "cellgate.layers"] {
            let set = PolicySet::from_files(vec![file("m.rego", MINI), layer(pkg)]).unwrap();
            let mut input = InputDoc::default();
            input.request.port = 443;
            assert!(set.evaluate(&input).unwrap().allow, "{pkg}");
        }
    }

    #[test]
    fn missing_entrypoint_is_refused() {
        let err = PolicySet::from_files(vec![file(
            "m.rego",
            "package other\nimport rego.v1\nx := 1\n",
        )])
        .unwrap_err();
        assert!(matches!(err, PolicyError::Compile { .. }), "{err}");
    }

    #[test]
    fn malformed_decision_is_an_eval_error() {
        let src = "package cellgate.authz\nimport rego.v1\ndecision := {\"allow\": \"yes\"}\n";
        let set = PolicySet::from_files(vec![file("m.rego", src)]).unwrap();
        let err = set.evaluate(&InputDoc::default()).unwrap_err();
        assert!(matches!(err, EvalError::Malformed { .. }), "{err}");
    }

    #[test]
    fn runaway_policy_hits_the_limit() {
        let src = "package cellgate.authz\nimport rego.v1\nn := count([x | some a in numbers.range(1, 3000); some b in numbers.range(1, 3000); x := a * b])\ndecision := {\"allow\": n > 0}\n";
        let set = PolicySet::from_files(vec![file("m.rego", src)]).unwrap();
        let err = set.evaluate(&InputDoc::default()).unwrap_err();
        assert!(matches!(err, EvalError::Engine(_)), "{err}");
    }
}
