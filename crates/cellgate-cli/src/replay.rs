//! `cellgate policy replay`: re-decides recorded requests with a draft policy.
//!
//! Each audit file's chain is verified, on a thread of its own while the records are re-decided
//! (a log that does not verify is not reported on, unless `--no-verify`); every decision record
//! is classified
//! ([`cellgate_node::recorded::classify`]): the ones the policy decided are rebuilt into the
//! policy input the node built ([`cellgate_node::recorded::Request::from_record`] and
//! [`cellgate_node::recorded::input_doc`], the node's own function) and decided again with the
//! draft set and the cell from `--cells`. The report counts would-allow and would-deny, lists
//! the decisions that change grouped by cell, host and reason, and says how many records could
//! not be re-decided and why. `--max-new-denials N` exits 1 when more than N requests the
//! policy allowed would now be denied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use cellgate_api::model::Cell;
use cellgate_api::policy::CellDoc;
use cellgate_audit::{Decision, Record};
use cellgate_node::recorded::{self, NotReplayable, Request};
use cellgate_policy::{CellValue, PolicySet};
use serde::Serialize;

/// `cellgate policy replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The draft policy set: a directory of `*.rego` (with their `test_*` rules), loaded as
    /// the node loads one (e.g. the repository's `policies/`, base and packs).
    #[arg(long)]
    pub policies: PathBuf,
    /// More pack directories to load with it.
    #[arg(long = "pack")]
    pub packs: Vec<PathBuf>,
    /// Directory of AgentCell manifests (`*.yaml`, `*.yml`) the requests are re-decided
    /// against; without it no record can be re-decided (its cell is unknown).
    #[arg(long)]
    pub cells: Option<PathBuf>,
    /// Exit 1 when more than N requests the recorded policy allowed would be denied.
    #[arg(long)]
    pub max_new_denials: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replay logs whose hash chain does not verify (the report says so).
    #[arg(long)]
    pub no_verify: bool,
    /// Audit logs (JSON lines).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// A decision that changes, as reported.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Change {
    /// `namespace/name`.
    pub cell: String,
    /// The request's host (`-` when none).
    pub host: String,
    /// The recorded policy outcome.
    pub from: &'static str,
    /// Its reason.
    pub from_reason: String,
    /// The draft's outcome.
    pub to: &'static str,
    /// Its reason.
    pub to_reason: String,
}

/// A change and how many requests it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Changed {
    /// The change.
    #[serde(flatten)]
    pub change: Change,
    /// How many requests.
    pub count: u64,
}

/// What a replay found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The draft set's version.
    pub policy_version: String,
    /// Records read.
    pub records: u64,
    /// Whether every file's chain verified.
    pub verified: bool,
    /// Records re-decided.
    pub redecided: u64,
    /// Their outcome under the draft: `allow`, `shadow_deny`, `deny`.
    pub would: BTreeMap<&'static str, u64>,
    /// Their outcome as recorded (the policy's part of it).
    pub recorded: BTreeMap<&'static str, u64>,
    /// Requests the recorded policy let through (allow, shadow_deny) that the draft denies.
    pub new_denials: u64,
    /// Requests the recorded policy denied that the draft lets through.
    pub new_allows: u64,
    /// Decisions that change, with how many times each.
    pub changes: Vec<Changed>,
    /// Records not re-decided, by why.
    pub not_redecided: BTreeMap<String, u64>,
    /// Cells named by records that `--cells` does not hold.
    pub unknown_cells: BTreeSet<String>,
    /// Re-decided records whose input is not complete (what the record withholds), by what.
    pub approximate: BTreeMap<String, u64>,
    /// Re-decided records whose cell generation differs from the manifest's.
    pub other_generation: u64,
}

/// The cells replay decides against, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Cells {
    by_name: HashMap<String, Cell>,
}

impl Cells {
    /// Reads every AgentCell manifest in `dir`.
    ///
    /// # Errors
    /// An unreadable directory or file, or a manifest that does not validate (path and field).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut cells = Cells::default();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading --cells {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        for p in paths {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            for m in cellgate_api::manifest::parse_agent_cells(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            {
                let cell = m
                    .to_model()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                cells.insert(cell);
            }
        }
        Ok(cells)
    }

    /// Adds (or replaces) a cell.
    pub fn insert(&mut self, cell: Cell) {
        self.by_name
            .insert(format!("{}/{}", cell.namespace, cell.name), cell);
    }
}

/// The outcome label of a decision.
fn label(d: Decision) -> &'static str {
    d.as_str()
}

fn lets_through(d: Decision) -> bool {
    matches!(d, Decision::Allow | Decision::ShadowDeny)
}

/// Per-thread state: cell values built once per (cell, uid).
struct Decider<'a> {
    set: &'a PolicySet,
    cells: &'a Cells,
    values: HashMap<(String, String), Arc<CellValue>>,
}

impl Decider<'_> {
    fn cell_value(&mut self, key: &str, uid: &str) -> Option<Arc<CellValue>> {
        let k = (key.to_owned(), uid.to_owned());
        if let Some(v) = self.values.get(&k) {
            return Some(v.clone());
        }
        let cell = self.cells.by_name.get(key)?;
        let mut doc = CellDoc::from_model(cell);
        // The uid the node knew the cell by (the API server's), not the manifest's local one.
        uid.clone_into(&mut doc.uid);
        let v = Arc::new(CellValue::new(&doc));
        self.values.insert(k, v.clone());
        Some(v)
    }

    fn one(&mut self, rec: &Record, report: &mut Report) {
        let old = match recorded::classify(rec) {
            Ok(v) => v,
            Err(why) => {
                *report.not_redecided.entry(why.label()).or_default() += 1;
                return;
            }
        };
        let req = match Request::from_record(rec) {
            Ok(r) => r,
            Err(why) => {
                *report.not_redecided.entry(why.label()).or_default() += 1;
                return;
            }
        };
        let key = format!("{}/{}", req.identity.namespace, req.identity.name);
        let uid = req.identity.cell_uid.clone();
        let Some(value) = self.cell_value(&key, &uid) else {
            *report
                .not_redecided
                .entry("cell not in --cells".into())
                .or_default() += 1;
            report.unknown_cells.insert(key);
            return;
        };
        if let (Some(g), Some(cell)) = (rec.cell_generation, self.cells.by_name.get(&key)) {
            if g != cell.generation {
                report.other_generation += 1;
            }
        }
        for w in &rec.withheld {
            let what = if w.starts_with(recorded::WITHHELD_HEADER) {
                "header values withheld"
            } else if w == recorded::WITHHELD_QUERY {
                "query string withheld"
            } else {
                "body not recorded"
            };
            *report.approximate.entry(what.into()).or_default() += 1;
        }
        let input = recorded::input_doc(req);
        let (new, new_reason) = match self.set.evaluate_with_cell(&input, &value) {
            Ok(d) => (recorded::decision_of(&d), d.reason),
            Err(_) => (Decision::Deny, "policy_error".to_owned()),
        };
        report.redecided += 1;
        *report.would.entry(label(new)).or_default() += 1;
        *report.recorded.entry(label(old.decision)).or_default() += 1;
        if new == old.decision {
            return;
        }
        if lets_through(old.decision) && !lets_through(new) {
            report.new_denials += 1;
        } else if !lets_through(old.decision) && lets_through(new) {
            report.new_allows += 1;
        }
        let change = Change {
            cell: key,
            host: input.request.host.unwrap_or_else(|| "-".into()),
            from: label(old.decision),
            from_reason: old.reason,
            to: label(new),
            to_reason: new_reason,
        };
        match report.changes.iter_mut().find(|c| c.change == change) {
            Some(c) => c.count += 1,
            None => report.changes.push(Changed { change, count: 1 }),
        }
    }
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.records += other.records;
        self.redecided += other.redecided;
        for (k, v) in other.would {
            *self.would.entry(k).or_default() += v;
        }
        for (k, v) in other.recorded {
            *self.recorded.entry(k).or_default() += v;
        }
        self.new_denials += other.new_denials;
        self.new_allows += other.new_allows;
        for c in other.changes {
            match self.changes.iter_mut().find(|x| x.change == c.change) {
                Some(x) => x.count += c.count,
                None => self.changes.push(c),
            }
        }
        for (k, v) in other.not_redecided {
            *self.not_redecided.entry(k).or_default() += v;
        }
        self.unknown_cells.extend(other.unknown_cells);
        for (k, v) in other.approximate {
            *self.approximate.entry(k).or_default() += v;
        }
        self.other_generation += other.other_generation;
    }
}

/// Re-decides the records on `lines` (one JSON record each) with `set` against `cells`, on
/// every CPU. Lines that are not records are counted as unreadable.
pub fn replay_lines(set: &PolicySet, cells: &Cells, lines: &[&str]) -> Report {
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, 16);
    let chunk = lines.len().div_ceil(workers).max(1);
    let mut report = Report {
        policy_version: set.version().to_owned(),
        ..Report::default()
    };
    let parts: Vec<Report> = std::thread::scope(|s| {
        let handles: Vec<_> = lines
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let mut d = Decider {
                        set,
                        cells,
                        values: HashMap::new(),
                    };
                    let mut r = Report::default();
                    for line in part {
                        r.records += 1;
                        match serde_json::from_str::<Record>(line) {
                            Ok(rec) => d.one(&rec, &mut r),
                            Err(_) => {
                                *r.not_redecided
                                    .entry(NotReplayable::Malformed("a readable record").label())
                                    .or_default() += 1;
                            }
                        }
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for p in parts {
        report.merge(p);
    }
    report
        .changes
        .sort_by(|a, b| b.count.cmp(&a.count).then(a.change.cmp(&b.change)));
    report
}

/// One audit log to replay: its text and the head anchor found beside it.
#[derive(Debug)]
pub struct Log {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its lines.
    pub text: String,
    /// `<log>.head`, when present: a log cut after it does not verify.
    pub head: Option<cellgate_audit::Head>,
}

/// Re-decides every record of `logs` ([`replay_lines`]) while, on a thread of its own, each
/// log's chain is verified (when `verify`): the two run at once, so verifying costs no time on a
/// machine with a core to spare. Returns the report and the logs that did not verify, with why;
/// the caller must not trust the report of a log that did not verify.
pub fn replay_logs(
    set: &PolicySet,
    cells: &Cells,
    logs: &[Log],
    verify: bool,
) -> (Report, Vec<(PathBuf, String)>) {
    std::thread::scope(|s| {
        let checker = verify.then(|| {
            s.spawn(|| {
                logs.iter()
                    .filter_map(|log| {
                        cellgate_audit::verify_reader_with_head(
                            log.text.as_bytes(),
                            log.head.clone(),
                        )
                        .err()
                        .map(|e| (log.path.clone(), e.to_string()))
                    })
                    .collect::<Vec<_>>()
            })
        });
        let lines: Vec<&str> = logs
            .iter()
            .flat_map(|l| l.text.lines())
            .filter(|l| !l.trim().is_empty())
            .collect();
        let report = replay_lines(set, cells, &lines);
        let broken = match checker.map(|c| c.join()) {
            Some(Ok(b)) => b,
            Some(Err(_)) => logs
                .iter()
                .map(|l| (l.path.clone(), "the verifier failed".to_owned()))
                .collect(),
            None => Vec::new(),
        };
        (report, broken)
    })
}

/// `cellgate policy replay`.
///
/// # Errors
/// Unreadable files, a draft set that does not load or pass its tests, bad manifests.
pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let set = PolicySet::load(&args.policies, &args.packs)
        .map_err(|e| anyhow::anyhow!("draft policy {}: {e}", args.policies.display()))?;
    let cells = match &args.cells {
        Some(dir) => Cells::load(dir)?,
        None => Cells::default(),
    };
    let mut logs = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let head = cellgate_audit::read_head(&cellgate_audit::head_path(file))?;
        logs.push(Log {
            path: file.clone(),
            text,
            head,
        });
    }
    let (mut report, broken) = replay_logs(&set, &cells, &logs, true);
    let mut verified = true;
    for (file, e) in &broken {
        if args.no_verify {
            eprintln!("{}: chain NOT verified: {e}", file.display());
            verified = false;
        } else {
            println!(
                "{}: {e}; not replaying an audit log that does not verify (--no-verify to replay it anyway)",
                file.display()
            );
            return Ok(ExitCode::from(1));
        }
    }
    report.verified = verified;
    if args.cells.is_none() {
        report.unknown_cells.insert("(no --cells given)".to_owned());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report, args.files.len()));
    }
    let over = args
        .max_new_denials
        .is_some_and(|max| report.new_denials > max);
    if over {
        eprintln!(
            "{} new denials, more than --max-new-denials {}",
            report.new_denials,
            args.max_new_denials.unwrap_or(0)
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn counts(m: &BTreeMap<&'static str, u64>) -> String {
    let g = |k| m.get(k).copied().unwrap_or(0);
    format!(
        "allow {}, shadow_deny {}, deny {}",
        g("allow"),
        g("shadow_deny"),
        g("deny")
    )
}

/// The report for people.
pub fn text(r: &Report, files: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "replayed {} records from {files} file(s) with policy {}; chain {}",
        r.records,
        r.policy_version,
        if r.verified {
            "verified"
        } else {
            "NOT verified"
        }
    );
    let _ = writeln!(
        s,
        "re-decided {}: would {} (recorded: {})",
        r.redecided,
        counts(&r.would),
        counts(&r.recorded)
    );
    let _ = writeln!(
        s,
        "changed {}: {} new denials, {} new allows",
        r.changes.iter().map(|c| c.count).sum::<u64>(),
        r.new_denials,
        r.new_allows
    );
    for Changed {
        change: c,
        count: n,
    } in &r.changes
    {
        let _ = writeln!(
            s,
            "  {n:>6}  {}  {}  {} ({}) -> {} ({})",
            c.cell, c.host, c.from, c.from_reason, c.to, c.to_reason
        );
    }
    let total: u64 = r.not_redecided.values().sum();
    let _ = writeln!(s, "cannot re-decide {total}:");
    for (why, n) in &r.not_redecided {
        let _ = writeln!(s, "  {n:>6}  {why}");
    }
    if !r.unknown_cells.is_empty() {
        let names: Vec<&str> = r.unknown_cells.iter().map(String::as_str).collect();
        let _ = writeln!(s, "cells not in --cells: {}", names.join(", "));
    }
    for (what, n) in &r.approximate {
        let _ = writeln!(
            s,
            "approximate: {n} re-decided with {what} (given to the policy as empty)"
        );
    }
    if r.other_generation > 0 {
        let _ = writeln!(
            s,
            "note: {} records were decided under another generation of their cell than the manifest given",
            r.other_generation
        );
    }
    s
}
