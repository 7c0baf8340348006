//! [`PolicySet`]: a loaded, tested and compiled set of Rego files, and the evaluation of one
//! request against it.
//!
//! Loading ([`PolicySet::load`]) reads every `*.rego` file (and every `pack.yaml`) under the
//! base directory and the extra directories (recursively, sorted), groups them into packs
//! ([`crate::pack`]), parses each with regorus, runs every `test_*` rule of every `*_test.rego`
//! file, and compiles `data.cellgate.authz.decision` to a regorus RVM program. Evaluating ([`PolicySet::evaluate`]) does no I/O: each worker thread keeps its own VM
//! with the program loaded (the VM is not `Sync`), and only the input changes between requests.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
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

use crate::convert::{decision_and_layers, eval_cell_value, CellValue, InputSlot, LayerNames};
use crate::error::{EvalError, PolicyError};
use crate::pack::{self, hash_pairs, PackEffect, PackInfo, PackMode, PackVerdict, MANIFEST_NAME};

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
/// Suffix of files whose `test_*` rules must pass.
const TEST_SUFFIX: &str = "_test.rego";
/// Package prefix of user layers; test packages may not live there.
const LAYERS_PACKAGE: [&str; 2] = ["cellgate", "layers"];
/// Package prefix reserved for what the loader generates; no policy file may declare it.
const RESERVED_PACKAGE: [&str; 2] = ["cellgate", "internal"];
/// Shown as the path of the generated layer package in errors.
pub(crate) const GENERATED_LAYERS_PATH: &str = "<generated>/cellgate/internal/layers.rego";
/// The per-rule shadow convention: a layer's `shadow_deny` set only records what it would deny.
pub const SHADOW_DENY_RULE: &str = "shadow_deny";

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

/// One file of a set: a `.rego` module, or a pack's `pack.yaml`.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    /// The path as read (shown in errors).
    pub path: PathBuf,
    /// Path relative to its root directory, `/`-separated (hashed into the version).
    pub relative: String,
    /// The source.
    pub source: String,
}

impl PolicyFile {
    /// Whether this is a pack manifest (`pack.yaml`) rather than a Rego module.
    pub fn is_manifest(&self) -> bool {
        pack::is_manifest(self)
    }
}

/// One decision with the packs that denied it or would have ([`PolicySet::decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The decision document.
    pub decision: DecisionDoc,
    /// Each pack whose layer denied (`deny`) or would have (`shadow_deny`); empty on the
    /// common path, where no layer has anything to say. Sorted by pack, deny first.
    pub packs: Vec<PackVerdict>,
}

/// One `test_*` rule of a `*_test.rego` file, and how it went ([`PolicySet::test_files`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegoTest {
    /// The test file, as read.
    pub path: String,
    /// Line of the rule head.
    pub line: usize,
    /// The rule name.
    pub name: String,
    /// `None` when it passed; what it evaluated to, or the error, otherwise.
    pub failure: Option<String>,
}

/// What [`PolicySet::test_files`] found: every Rego test, and the set compiled in spite of
/// failing tests (so that data-driven cases can still run), or why it could not be.
#[derive(Debug)]
pub struct TestRun {
    /// Every `test_*` rule, in file order; empty when the set did not parse.
    pub tests: Vec<RegoTest>,
    /// The compiled set, or the error that stopped loading before the tests (parse, manifest,
    /// packages) or at compilation.
    pub set: Result<PolicySet, PolicyError>,
}

/// A loaded, tested and compiled policy set. Cheap to share behind an `Arc`.
pub struct PolicySet {
    id: u64,
    version: String,
    files: Vec<PathBuf>,
    tests_run: usize,
    compiled: CompiledPolicy,
    program: Arc<Program>,
    packs: Vec<PackInfo>,
    /// Layer name → the packs declaring it.
    layer_packs: BTreeMap<String, Vec<usize>>,
    /// The sources and the generated layer package, for [`PolicySet::explain`].
    pub(crate) sources: Vec<PolicyFile>,
    pub(crate) layers_module: Option<String>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("files", &self.files)
            .field("tests_run", &self.tests_run)
            .field("packs", &self.packs)
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
    ///
    /// Files are grouped into packs ([`crate::pack`]); a pack in shadow mode has its `deny`
    /// entries turned into shadow denials. The tests of every pack run as if every pack
    /// enforced, so that switching a pack's mode never breaks its tests.
    pub fn from_files(files: Vec<PolicyFile>) -> Result<PolicySet, PolicyError> {
        let mut prepared = Prepared::new(files)?;
        let mut failed = None;
        let tests = run_tests(prepared.test_engine()?, &prepared, &mut |t| {
            failed = Some(t);
            false
        })?;
        if let Some(t) = failed {
            return Err(PolicyError::TestFailed {
                path: t.path,
                line: t.line,
                name: t.name,
                detail: t.failure.unwrap_or_default(),
            });
        }
        prepared.compile(tests.len())
    }

    /// Loads `files` as [`PolicySet::from_files`] does, but runs every Rego test instead of
    /// stopping at the first failure, and compiles the set even when some fail: what
    /// `cellgate policy test` reports. A set with failing tests must not serve requests.
    pub fn test_files(files: Vec<PolicyFile>) -> TestRun {
        let mut prepared = match Prepared::new(files) {
            Ok(p) => p,
            Err(e) => {
                return TestRun {
                    tests: Vec::new(),
                    set: Err(e),
                }
            }
        };
        let engine = match prepared.test_engine() {
            Ok(e) => e,
            Err(e) => {
                return TestRun {
                    tests: Vec::new(),
                    set: Err(e),
                }
            }
        };
        let tests = match run_tests(engine, &prepared, &mut |_| true) {
            Ok(t) => t,
            Err(e) => {
                return TestRun {
                    tests: Vec::new(),
                    set: Err(e),
                }
            }
        };
        let passed = tests.iter().filter(|t| t.failure.is_none()).count();
        TestRun {
            set: prepared.compile(passed),
            tests,
        }
    }

    /// First 12 hex digits of SHA-256 over the sorted (relative path, content) pairs of every
    /// file, manifests included.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The packs of the set, in load order: name, version, mode, files, layer packages.
    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// The packs declaring layer package `cellgate.layers.<layer>`.
    pub fn packs_of_layer(&self, layer: &str) -> impl Iterator<Item = &PackInfo> {
        self.layer_packs
            .get(layer)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.packs.get(i))
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
            .map(|(d, _)| d)
    }

    /// Like [`PolicySet::evaluate`], with the packs that denied or would have denied.
    ///
    /// # Errors
    ///
    /// As [`PolicySet::evaluate`].
    pub fn decide(&self, input: &InputDoc) -> Result<Decided, EvalError> {
        let (decision, layers) = self.run(input, eval_cell_value(input, None))?;
        Ok(self.decided(decision, &layers))
    }

    /// Like [`PolicySet::evaluate_with_cell`], with the packs that denied or would have
    /// denied. The node's path: the attribution costs nothing when no layer spoke.
    ///
    /// # Errors
    ///
    /// As [`PolicySet::evaluate`].
    pub fn decide_with_cell(
        &self,
        input: &InputDoc,
        cell: &CellValue,
    ) -> Result<Decided, EvalError> {
        cell.warm();
        let (decision, layers) = self.run(input, eval_cell_value(input, Some(cell)))?;
        Ok(self.decided(decision, &layers))
    }

    fn decided(&self, decision: DecisionDoc, layers: &LayerNames) -> Decided {
        let mut packs: Vec<PackVerdict> = Vec::new();
        for (names, effect) in [
            (&layers.deny, PackEffect::Deny),
            (&layers.shadow_deny, PackEffect::ShadowDeny),
        ] {
            for name in names {
                for p in self.packs_of_layer(name) {
                    let v = PackVerdict {
                        name: p.name.clone(),
                        version: p.version.clone(),
                        effect,
                    };
                    if !packs.contains(&v) {
                        packs.push(v);
                    }
                }
            }
        }
        packs.sort_by(|a, b| (&a.name, a.effect as u8).cmp(&(&b.name, b.effect as u8)));
        Decided { decision, packs }
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
            .map(|(d, _)| d)
    }

    fn run(
        &self,
        input: &InputDoc,
        cell_value: Value,
    ) -> Result<(DecisionDoc, LayerNames), EvalError> {
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
        decision_and_layers(&result)
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

/// Every `*.rego` and `pack.yaml` under the roots, each root sorted by relative path.
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
        if n == 0
            && !paths
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "rego"))
        {
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
        } else if path.extension().is_some_and(|e| e == "rego")
            || path.file_name().is_some_and(|n| n == MANIFEST_NAME)
        {
            out.push(path);
        }
    }
    Ok(())
}

/// First 12 hex digits of SHA-256 over (relative path, NUL, content, NUL) in sorted order.
pub(crate) fn version_of(files: &[PolicyFile]) -> String {
    hash_pairs(
        files
            .iter()
            .map(|f| (f.relative.as_str(), f.source.as_str()))
            .collect(),
    )
}

/// A set parsed and grouped into packs, before its tests and compilation.
struct Prepared {
    files: Vec<PolicyFile>,
    /// Indices (into `files`) of the Rego modules, in the order they were added to `engine`.
    rego: Vec<usize>,
    /// Package components of each module of `rego`.
    packages: Vec<Vec<String>>,
    packs: Vec<PackInfo>,
    layer_packs: BTreeMap<String, Vec<usize>>,
    /// The modules without the generated package.
    engine: Engine,
    /// The generated package with the packs' modes, and with every pack enforcing (for the
    /// tests); equal when no pack is in shadow mode.
    module: Option<String>,
    test_module: Option<String>,
}

impl Prepared {
    fn new(files: Vec<PolicyFile>) -> Result<Self, PolicyError> {
        let grouped = pack::group(&files)?;
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        let mut rego = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if f.is_manifest() {
                continue;
            }
            let path = f.path.display().to_string();
            engine
                .add_policy(path.clone(), f.source.clone())
                .map_err(|e| PolicyError::from_regorus(&path, &e))?;
            rego.push(i);
        }
        let packages: Vec<Vec<String>> = engine
            .get_policy_package_components()
            .map_err(|e| compile_error(&e))?
            .into_iter()
            .map(|p| p.components)
            .collect();
        let mut pack_of = vec![0; files.len()];
        for (n, p) in grouped.packs.iter().enumerate() {
            for &i in &p.files {
                if let Some(slot) = pack_of.get_mut(i) {
                    *slot = n;
                }
            }
        }
        let mut plan = LayerPlan {
            resolvable: true,
            ..LayerPlan::default()
        };
        let mut layer_packs: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut broad: Option<(String, String)> = None;
        for (&i, c) in rego.iter().zip(&packages) {
            let Some(f) = files.get(i) else { continue };
            let path = f.path.display().to_string();
            if c.get(..RESERVED_PACKAGE.len()) == Some(&RESERVED_PACKAGE.map(String::from)[..]) {
                return Err(PolicyError::ReservedPackage {
                    path,
                    package: c.join("."),
                });
            }
            if LAYERS_PACKAGE.starts_with(&c.iter().map(String::as_str).collect::<Vec<_>>()) {
                plan.resolvable = false; // `cellgate` or `cellgate.layers` itself
                broad.get_or_insert((path, c.join(".")));
            } else if c.get(..LAYERS_PACKAGE.len()) == Some(&LAYERS_PACKAGE.map(String::from)[..]) {
                if let Some(name) = c.get(LAYERS_PACKAGE.len()) {
                    let pack = pack_of.get(i).copied().unwrap_or(0);
                    let owners = layer_packs.entry(name.clone()).or_default();
                    if !owners.contains(&pack) {
                        owners.push(pack);
                    }
                    if engine
                        .has_declared_rule_rooted_at(&path, SHADOW_DENY_RULE)
                        .unwrap_or(false)
                    {
                        plan.shadow_rules.insert(name.clone());
                    }
                }
            }
        }
        let mode = |n: usize| grouped.packs.get(n).map_or(PackMode::Enforce, |p| p.mode);
        for (layer, owners) in &layer_packs {
            let enforce = owners.iter().find(|&&n| mode(n) == PackMode::Enforce);
            let shadow = owners.iter().find(|&&n| mode(n) == PackMode::Shadow);
            let name = |n: usize| {
                grouped
                    .packs
                    .get(n)
                    .map(|p| p.name.clone())
                    .unwrap_or_default()
            };
            match (enforce, shadow) {
                (Some(&e), Some(&s)) => {
                    return Err(PolicyError::LayerModeConflict {
                        layer: layer.clone(),
                        enforce: name(e),
                        shadow: name(s),
                    })
                }
                (None, Some(_)) => {
                    plan.shadow.insert(layer.clone());
                }
                _ => {}
            }
            plan.names.insert(layer.clone());
        }
        if let (Some((path, package)), Some(p)) = (
            &broad,
            grouped.packs.iter().find(|p| p.mode == PackMode::Shadow),
        ) {
            return Err(PolicyError::ShadowUnresolved {
                pack: p.name.clone(),
                path: path.clone(),
                package: package.clone(),
            });
        }
        let module = layers_module(&plan);
        let test_module = if plan.shadow.is_empty() {
            module.clone()
        } else {
            layers_module(&LayerPlan {
                shadow: BTreeSet::new(),
                ..plan.clone()
            })
        };
        let packs = grouped
            .packs
            .iter()
            .enumerate()
            .map(|(n, p)| PackInfo {
                name: p.name.clone(),
                version: p.version.clone(),
                mode: p.mode,
                files: p
                    .files
                    .iter()
                    .filter_map(|&i| files.get(i).map(|f| f.path.clone()))
                    .collect(),
                layers: layer_packs
                    .iter()
                    .filter(|(_, owners)| owners.contains(&n))
                    .map(|(l, _)| l.clone())
                    .collect(),
            })
            .collect();
        Ok(Prepared {
            files,
            rego,
            packages,
            packs,
            layer_packs,
            engine,
            module,
            test_module,
        })
    }

    /// An engine with the modules and the generated package in which every pack enforces.
    fn test_engine(&self) -> Result<Engine, PolicyError> {
        let mut engine = self.engine.clone();
        add_generated(&mut engine, self.test_module.as_ref())?;
        Ok(engine)
    }

    /// Compiles the set with the packs' modes.
    fn compile(&mut self, tests_run: usize) -> Result<PolicySet, PolicyError> {
        let mut engine = std::mem::take(&mut self.engine);
        add_generated(&mut engine, self.module.as_ref())?;
        let compiled = engine
            .compile_with_entrypoint(&ENTRYPOINT.into())
            .map_err(|e| compile_error(&e))?;
        let program = Compiler::compile_from_policy(&compiled, &[ENTRYPOINT])
            .map_err(|e| compile_error(&e))?;
        let files = std::mem::take(&mut self.files);
        Ok(PolicySet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            version: version_of(&files),
            files: files.iter().map(|f| f.path.clone()).collect(),
            tests_run,
            compiled,
            program,
            packs: std::mem::take(&mut self.packs),
            layer_packs: std::mem::take(&mut self.layer_packs),
            sources: files,
            layers_module: self.module.take(),
        })
    }
}

fn add_generated(engine: &mut Engine, module: Option<&String>) -> Result<(), PolicyError> {
    if let Some(module) = module {
        engine
            .add_policy(GENERATED_LAYERS_PATH.into(), module.clone())
            .map_err(|e| PolicyError::from_regorus(GENERATED_LAYERS_PATH, &e))?;
    }
    Ok(())
}

/// What the generated layer package names.
#[derive(Debug, Clone, Default)]
struct LayerPlan {
    /// Whether every layer package is `cellgate.layers.<name>...` (no `cellgate` or
    /// `cellgate.layers` package that could define any layer).
    resolvable: bool,
    /// Every layer name.
    names: BTreeSet<String>,
    /// Layers of packs in shadow mode: their `deny` is a shadow denial.
    shadow: BTreeSet<String>,
    /// Layers declaring a `shadow_deny` rule.
    shadow_rules: BTreeSet<String>,
}

/// The package `cellgate.internal.layers`, naming every layer package of the set so that the base
/// policy looks each one up directly instead of walking `data.cellgate.layers` (which makes the
/// VM build the whole virtual document on every request); see "Layers" in
/// `policies/base/cellgate.rego`. `None` when the layers cannot be named from the package
/// declarations alone: a package `cellgate` or `cellgate.layers` may define rules anywhere under
/// `data.cellgate.layers`, and the base policy then walks it.
///
/// `quiet` checks the `deny` of every layer and the `shadow_deny` of the layers that declare
/// one, so the common path costs what it did before for a set without shadow rules; `denies`
/// lists the enforced `deny` sets, `shadow_denies` the `deny` of shadow packs and every
/// `shadow_deny`.
fn layers_module(plan: &LayerPlan) -> Option<String> {
    if !plan.resolvable {
        return None;
    }
    let mut out = String::from(
        "# Generated by cellgate-policy when the set is loaded: the layer packages of this set.\n\
         package cellgate.internal.layers\n\nimport rego.v1\n\nresolved := true\n\n",
    );
    let reference = |n: &str, rule: &str| {
        let quoted = serde_json::to_string(n).unwrap_or_default();
        format!("data.cellgate.layers[{quoted}].{rule}")
    };
    let quoted = |n: &str| serde_json::to_string(n).unwrap_or_default();
    let mut quiet = Vec::new();
    let mut denies = Vec::new();
    let mut shadow = Vec::new();
    for n in &plan.names {
        let deny = reference(n, "deny");
        quiet.push(format!("\tnot {deny} != set()\n"));
        let line = format!("contains [{}, d] if d := {deny}\n", quoted(n));
        if plan.shadow.contains(n) {
            shadow.push(line);
        } else {
            denies.push(line);
        }
        if plan.shadow_rules.contains(n) {
            let rule = reference(n, SHADOW_DENY_RULE);
            quiet.push(format!("\tnot {rule} != set()\n"));
            shadow.push(format!("contains [{}, d] if d := {rule}\n", quoted(n)));
        }
    }
    if quiet.is_empty() {
        out.push_str("quiet := true\n");
    } else {
        out.push_str("quiet if {\n");
        for q in &quiet {
            out.push_str(q);
        }
        out.push_str("}\n");
    }
    for (rule, lines) in [("denies", &denies), ("shadow_denies", &shadow)] {
        if lines.is_empty() {
            out.push_str(&format!("\n{rule} := set()\n"));
        }
        for l in lines {
            out.push_str(&format!("\n{rule} {l}"));
        }
    }
    Some(out)
}

/// Runs every `test_*` rule declared in the `*_test.rego` files, in file order; `on_failure`
/// says whether to go on after a failure. Returns every test run.
fn run_tests(
    mut engine: Engine,
    prepared: &Prepared,
    on_failure: &mut dyn FnMut(RegoTest) -> bool,
) -> Result<Vec<RegoTest>, PolicyError> {
    let mut out = Vec::new();
    for (&i, pkg) in prepared.rego.iter().zip(&prepared.packages) {
        let Some(f) = prepared.files.get(i) else {
            continue;
        };
        let path = f.path.display().to_string();
        if !path.ends_with(TEST_SUFFIX) {
            continue;
        }
        if pkg.get(..LAYERS_PACKAGE.len()) == Some(&LAYERS_PACKAGE.map(String::from)[..]) {
            return Err(PolicyError::TestPackageInLayers {
                path,
                package: pkg.join("."),
            });
        }
        let mut seen = BTreeSet::new();
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
            let rule = format!("data.{}.{}", pkg.join("."), name);
            let failure = match engine.eval_rule(rule) {
                Ok(Value::Bool(true)) => None,
                Ok(Value::Undefined) => Some("undefined (a condition did not hold)".to_owned()),
                Ok(other) => Some(format!("evaluated to {other}, not true")),
                Err(e) => Some(e.to_string()),
            };
            let test = RegoTest {
                path: path.clone(),
                line,
                name,
                failure,
            };
            if test.failure.is_some() && !on_failure(test.clone()) {
                out.push(test);
                return Ok(out);
            }
            out.push(test);
        }
    }
    Ok(out)
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
        let module = |files: Vec<PolicyFile>| Prepared::new(files).unwrap().module;
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
