//! The budget ledger: requests, wall-clock lifetime, LLM tokens and spend, per cell
//! (`spec.budget`) and per capability (`capabilities[].budget`).
//!
//! Counting is exact: one lock covers the check and the increment of every budget a request
//! falls under, so with a limit of M a burst of any size gets exactly M through.
//!
//! The ledger survives a restart without ever giving budget back. Request counts are reserved
//! ahead on disk: before a request is granted, the file must already hold a count at least as
//! high as the one the grant reaches (a small block is reserved per write, so most requests
//! never wait on the disk). A crash therefore loses at most the unused part of a block, never
//! a used request. Token and spend usage arrives after a response and is written within
//! [`FLUSH_EVERY`]. Every write goes to a temporary file that is synced and renamed over the
//! ledger; a ledger that cannot be read stops the node with an error naming the file, it is
//! never reset to zero.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cellgate_api::manifest::{parse_duration, parse_micros, BudgetSpec};
use serde::{Deserialize, Serialize};

/// The ledger's file in the state directory.
pub const LEDGER_FILE: &str = "budgets.json";
/// The ledger's format version.
const LEDGER_VERSION: u32 = 1;
/// Token and spend usage is written at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Largest ledger file read, bytes (a counter is about 300 bytes; 100k counters fit).
const MAX_LEDGER_BYTES: u64 = 64 * 1024 * 1024;
/// A write reserves 1/RESERVE_DIVISOR of a limit ahead (at least one request).
const RESERVE_DIVISOR: u64 = 64;
/// The scope key of a cell-wide budget (capability names are DNS labels: never `*`).
pub const CELL_SCOPE: &str = "*";

/// Why the ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file exists and cannot be read or parsed: the node refuses to start.
    #[error("budget ledger {path} is unreadable ({why}); it is never reset to zero: restore it from a backup, or move it aside deliberately to start every budget afresh")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The ledger could not be written: requests a budget governs are refused.
    #[error("budget ledger {path} cannot be written: {why}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// One budget's counters, as written to disk (request counts are the reserved values).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Counter {
    cell: String,
    scope: String,
    /// When the cell's first request through this node was counted (unix ms).
    started_ms: i64,
    requests: u64,
    window_start_ms: i64,
    window_requests: u64,
    tokens_start_ms: i64,
    tokens: u64,
    spend_start_ms: i64,
    spend_micros: u64,
    /// Requests counted into the reserved values on disk (not written).
    #[serde(skip)]
    durable_requests: u64,
    #[serde(skip)]
    durable_window: u64,
    #[serde(skip)]
    durable_window_start_ms: i64,
    #[serde(skip)]
    on_disk: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    version: u32,
    counters: Vec<Counter>,
}

/// Which budget was exhausted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// `requests`, `requestsPerWindow`, `lifetime`, `tokens` or `spend`.
    pub budget: &'static str,
    /// `cell` or the capability's name.
    pub scope: String,
    /// The limit (requests, seconds, tokens, or millionths of the currency for spend).
    pub limit: u64,
    /// What was used, in the same unit.
    pub used: u64,
    /// When the window resets (unix ms), for windowed budgets.
    pub resets_at_ms: Option<i64>,
}

impl Exhausted {
    /// How long until the window resets, for `Retry-After`.
    pub fn retry_after(&self, now_ms: i64) -> Option<Duration> {
        self.resets_at_ms
            .map(|r| Duration::from_millis(u64::try_from(r.saturating_sub(now_ms)).unwrap_or(0)))
    }

    /// The amounts as the agent reads them (spend as a decimal string).
    pub fn amounts(&self) -> (serde_json::Value, serde_json::Value) {
        if self.budget == "spend" {
            (
                micros_text(self.limit).into(),
                micros_text(self.used).into(),
            )
        } else {
            (self.limit.into(), self.used.into())
        }
    }
}

/// What a request asks of the ledger: the budgets it falls under, by scope.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// [`CELL_SCOPE`] or a capability name.
    pub name: &'a str,
    /// The budget.
    pub spec: &'a BudgetSpec,
}

/// The outcome of [`Ledger::take`].
#[derive(Debug)]
pub enum Take {
    /// Counted; the state of every budget, for the audit record.
    Granted(serde_json::Value),
    /// Refused: a budget is used up.
    Exhausted(Exhausted),
    /// The disk reservation must grow first: call [`Ledger::persist`] and take again.
    Persist,
}

/// Parsed limits of one budget.
#[derive(Debug, Default, Clone, Copy)]
struct Limits {
    requests: Option<u64>,
    window: Option<(u64, i64)>,
    lifetime_ms: Option<i64>,
    tokens: Option<(u64, Option<i64>)>,
    spend: Option<(u64, Option<i64>)>,
}

fn secs_to_ms(s: &str) -> Option<i64> {
    parse_duration(s).and_then(|v| i64::try_from(v).ok()?.checked_mul(1000))
}

impl Limits {
    /// Validated manifests only reach here; a value that does not parse counts as zero
    /// (refusing everything), never as no limit.
    fn of(spec: &BudgetSpec) -> Self {
        let per = |p: &Option<String>| p.as_deref().map(|p| secs_to_ms(p).unwrap_or(1));
        Self {
            requests: spec.requests,
            window: spec
                .requests_per_window
                .map(|n| (n, spec.window.as_deref().and_then(secs_to_ms).unwrap_or(1))),
            lifetime_ms: spec.lifetime.as_deref().map(|l| secs_to_ms(l).unwrap_or(0)),
            tokens: spec.tokens.as_ref().map(|t| (t.max, per(&t.per))),
            spend: spec
                .spend
                .as_ref()
                .map(|s| (parse_micros(&s.max).unwrap_or(0), per(&s.per))),
        }
    }
}

/// Whether a budget meters LLM usage (tokens or spend).
pub fn meters_usage(spec: &BudgetSpec) -> bool {
    spec.tokens.is_some() || spec.spend.is_some()
}

fn reserve(limit: u64) -> u64 {
    (limit / RESERVE_DIVISOR).max(1)
}

/// Merges a reported window into ours: the later window wins; in the same window, the higher
/// count.
fn merge_window(start: &mut i64, used: &mut u64, their_start: i64, their_used: u64) {
    if their_start > *start {
        *start = their_start;
        *used = their_used;
    } else if their_start == *start {
        *used = (*used).max(their_used);
    }
}

/// Rolls a fixed window forward when it has ended.
fn roll(start: &mut i64, used: &mut u64, len_ms: i64, now_ms: i64) {
    if now_ms.saturating_sub(*start) >= len_ms {
        *start = now_ms;
        *used = 0;
    }
}

/// Millionths as a decimal string with two to six decimals (`25000000` → `"25.00"`).
pub fn micros_text(m: u64) -> String {
    let (whole, frac) = (m / 1_000_000, m % 1_000_000);
    let mut f = format!("{frac:06}");
    while f.len() > 2 && f.ends_with('0') {
        f.pop();
    }
    format!("{whole}.{f}")
}

/// Unix milliseconds as RFC 3339.
pub fn rfc3339_ms(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    cellgate_audit::format_rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

/// The ledger.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    state: Mutex<HashMap<(String, String), Counter>>,
    /// One write at a time.
    write: tokio::sync::Mutex<()>,
    /// Usage was added since the last write.
    dirty: AtomicBool,
}

impl Ledger {
    /// Opens the ledger in `dir` (created if missing); an unreadable ledger is an error.
    ///
    /// # Errors
    /// [`LedgerError::Corrupt`] when the file exists and cannot be read or parsed;
    /// [`LedgerError::Write`] when the directory cannot be created.
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        let path = dir.join(LEDGER_FILE);
        std::fs::create_dir_all(dir).map_err(|e| LedgerError::Write {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let corrupt = |why: String| LedgerError::Corrupt {
            path: path.clone(),
            why,
        };
        let mut state = HashMap::new();
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(corrupt(e.to_string())),
            Ok(m) if m.len() > MAX_LEDGER_BYTES => {
                return Err(corrupt(format!(
                    "{} bytes, over the {MAX_LEDGER_BYTES} byte limit",
                    m.len()
                )))
            }
            Ok(_) => {
                let bytes = std::fs::read(&path).map_err(|e| corrupt(e.to_string()))?;
                let file: LedgerFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if file.version != LEDGER_VERSION {
                    return Err(corrupt(format!(
                        "format version {} (this node reads {LEDGER_VERSION})",
                        file.version
                    )));
                }
                for mut c in file.counters {
                    c.durable_requests = c.requests;
                    c.durable_window = c.window_requests;
                    c.durable_window_start_ms = c.window_start_ms;
                    c.on_disk = true;
                    state.insert((c.cell.clone(), c.scope.clone()), c);
                }
            }
        }
        Ok(Self {
            path,
            state: Mutex::new(state),
            write: tokio::sync::Mutex::new(()),
            dirty: AtomicBool::new(false),
        })
    }

    /// The ledger's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Counter>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request of `cell` against every budget in `scopes`, or refuses it; never
    /// counts a request some budget refuses.
    pub fn take(&self, cell: &str, scopes: &[Scope<'_>], now_ms: i64) -> Take {
        // Each budget's limits and ledger key, once per request.
        let scopes: Vec<(Limits, (String, String), &str)> = scopes
            .iter()
            .map(|s| {
                let key = (cell.to_string(), s.name.to_string());
                (Limits::of(s.spec), key, s.name)
            })
            .collect();
        let mut state = self.lock();
        // Check every budget first, count only when all of them allow.
        for (limits, key, name) in &scopes {
            let c = state.entry(key.clone()).or_insert_with(|| Counter {
                cell: key.0.clone(),
                scope: key.1.clone(),
                started_ms: now_ms,
                window_start_ms: now_ms,
                tokens_start_ms: now_ms,
                spend_start_ms: now_ms,
                ..Counter::default()
            });
            if let Some(e) = exhausted(c, limits, name, now_ms) {
                return Take::Exhausted(e);
            }
        }
        for (limits, key, _) in &scopes {
            let Some(c) = state.get(key) else {
                return Take::Persist;
            };
            let short = !c.on_disk
                || (limits.requests.is_some() && c.requests >= c.durable_requests)
                || (limits.window.is_some()
                    && (c.window_start_ms != c.durable_window_start_ms
                        || c.window_requests >= c.durable_window));
            if short {
                return Take::Persist;
            }
        }
        let mut doc = Vec::with_capacity(scopes.len());
        for (limits, key, name) in &scopes {
            if let Some(c) = state.get_mut(key) {
                c.requests = c.requests.saturating_add(1);
                c.window_requests = c.window_requests.saturating_add(1);
                doc.push(state_doc(c, limits, name));
            }
        }
        Take::Granted(serde_json::Value::Array(doc))
    }

    /// The state of every budget in `scopes`, without counting (for records of usage).
    pub fn state(&self, cell: &str, scopes: &[Scope<'_>]) -> serde_json::Value {
        let state = self.lock();
        let doc = scopes
            .iter()
            .filter_map(|s| {
                let c = state.get(&(cell.to_string(), s.name.to_string()))?;
                Some(state_doc(c, &Limits::of(s.spec), s.name))
            })
            .collect();
        serde_json::Value::Array(doc)
    }

    /// Adds LLM usage (tokens, and spend in millionths) to every budget in `scopes` that
    /// meters it. The request that crosses a limit has completed; the next one is refused.
    pub fn add_usage(
        &self,
        cell: &str,
        scopes: &[Scope<'_>],
        tokens: u64,
        spend_micros: u64,
        now_ms: i64,
    ) {
        let mut state = self.lock();
        for s in scopes {
            let limits = Limits::of(s.spec);
            if let Some(c) = state.get_mut(&(cell.to_string(), s.name.to_string())) {
                if let Some((_, Some(per))) = limits.tokens {
                    roll(&mut c.tokens_start_ms, &mut c.tokens, per, now_ms);
                }
                if let Some((_, Some(per))) = limits.spend {
                    roll(&mut c.spend_start_ms, &mut c.spend_micros, per, now_ms);
                }
                c.tokens = c.tokens.saturating_add(tokens);
                c.spend_micros = c.spend_micros.saturating_add(spend_micros);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Marks the token (and spend) budgets in `scopes` used up until their window ends: a
    /// response whose usage could not be read is never counted as free.
    pub fn exhaust_usage(&self, cell: &str, scopes: &[Scope<'_>], now_ms: i64) {
        let mut state = self.lock();
        for s in scopes {
            let limits = Limits::of(s.spec);
            if let Some(c) = state.get_mut(&(cell.to_string(), s.name.to_string())) {
                if let Some((max, per)) = limits.tokens {
                    if let Some(per) = per {
                        roll(&mut c.tokens_start_ms, &mut c.tokens, per, now_ms);
                    }
                    c.tokens = c.tokens.max(max);
                }
                if let Some((max, per)) = limits.spend {
                    if let Some(per) = per {
                        roll(&mut c.spend_start_ms, &mut c.spend_micros, per, now_ms);
                    }
                    c.spend_micros = c.spend_micros.max(max);
                }
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// The counters of every budget of `cell`, as `status.usage` reports them.
    pub fn usage_of(&self, cell: &str) -> Vec<cellgate_api::crd::BudgetUsage> {
        let state = self.lock();
        let mut v: Vec<_> = state
            .values()
            .filter(|c| c.cell == cell)
            .map(|c| cellgate_api::crd::BudgetUsage {
                scope: if c.scope == CELL_SCOPE {
                    "cell".into()
                } else {
                    c.scope.clone()
                },
                started_ms: c.started_ms,
                requests: c.requests,
                window_start_ms: c.window_start_ms,
                window_requests: c.window_requests,
                tokens_start_ms: c.tokens_start_ms,
                tokens: c.tokens,
                spend_start_ms: c.spend_start_ms,
                spend_micros: c.spend_micros,
            })
            .collect();
        v.sort_by(|a, b| a.scope.cmp(&b.scope));
        v
    }

    /// Starts `cell`'s counters from what a node reported (`status.usage`, e.g. the node that
    /// hosted the cell before): each count becomes the higher of the two, the cell's start the
    /// earlier, a window the later. Never gives budget back. Returns how many counters grew.
    pub fn seed(&self, cell: &str, usage: &[cellgate_api::crd::BudgetUsage]) -> usize {
        let mut state = self.lock();
        let mut grew = 0;
        for u in usage {
            let scope = if u.scope == "cell" {
                CELL_SCOPE.to_string()
            } else {
                u.scope.clone()
            };
            let c = state
                .entry((cell.to_string(), scope.clone()))
                .or_insert_with(|| Counter {
                    cell: cell.to_string(),
                    scope,
                    started_ms: u.started_ms,
                    window_start_ms: u.window_start_ms,
                    tokens_start_ms: u.tokens_start_ms,
                    spend_start_ms: u.spend_start_ms,
                    ..Counter::default()
                });
            let before = c.clone();
            c.started_ms = c.started_ms.min(u.started_ms);
            c.requests = c.requests.max(u.requests);
            merge_window(
                &mut c.window_start_ms,
                &mut c.window_requests,
                u.window_start_ms,
                u.window_requests,
            );
            merge_window(
                &mut c.tokens_start_ms,
                &mut c.tokens,
                u.tokens_start_ms,
                u.tokens,
            );
            merge_window(
                &mut c.spend_start_ms,
                &mut c.spend_micros,
                u.spend_start_ms,
                u.spend_micros,
            );
            if *c != before {
                grew += 1;
            }
        }
        if grew > 0 {
            self.dirty.store(true, Ordering::Release);
        }
        grew
    }

    /// Whether usage was added since the last write.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Writes the ledger, reserving a block of requests ahead for every counter.
    ///
    /// # Errors
    /// When the file cannot be written; nothing is then granted against the new block.
    pub async fn persist(&self) -> Result<(), LedgerError> {
        self.write_file(true).await
    }

    /// Writes the ledger as it is, reserving nothing ahead: for a clean shutdown, so a restart
    /// resumes at exactly the counts used.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub async fn persist_exact(&self) -> Result<(), LedgerError> {
        self.write_file(false).await
    }

    async fn write_file(&self, ahead: bool) -> Result<(), LedgerError> {
        let _one = self.write.lock().await;
        self.dirty.store(false, Ordering::Release);
        let (file, reserved) = {
            let state = self.lock();
            let mut counters = Vec::with_capacity(state.len());
            let mut reserved = Vec::with_capacity(state.len());
            for (key, c) in state.iter() {
                let mut w = c.clone();
                // The limits are not at hand here: reserve relative to what is used, by at
                // least one request and by a share of the count so far.
                if ahead {
                    w.requests = c
                        .requests
                        .saturating_add(reserve(c.requests.max(RESERVE_DIVISOR)));
                    w.window_requests = c
                        .window_requests
                        .saturating_add(reserve(c.window_requests.max(RESERVE_DIVISOR)));
                }
                reserved.push((
                    key.clone(),
                    w.requests,
                    w.window_requests,
                    w.window_start_ms,
                ));
                counters.push(w);
            }
            counters.sort_by(|a, b| (&a.cell, &a.scope).cmp(&(&b.cell, &b.scope)));
            (
                LedgerFile {
                    version: LEDGER_VERSION,
                    counters,
                },
                reserved,
            )
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| LedgerError::Write {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(why) = written {
            self.dirty.store(true, Ordering::Release);
            return Err(LedgerError::Write {
                path: self.path.clone(),
                why,
            });
        }
        let mut state = self.lock();
        for (key, requests, window, window_start) in reserved {
            if let Some(c) = state.get_mut(&key) {
                c.on_disk = true;
                c.durable_requests = c.durable_requests.max(requests);
                if c.durable_window_start_ms != window_start {
                    c.durable_window_start_ms = window_start;
                    c.durable_window = window;
                } else {
                    c.durable_window = c.durable_window.max(window);
                }
            }
        }
        Ok(())
    }

    /// Writes usage every [`FLUSH_EVERY`] while it changes; a failed write is retried.
    pub async fn flush_loop(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tick.tick().await;
            if self.is_dirty() {
                if let Err(e) = self.persist().await {
                    tracing::error!(error = %e, "budget usage not written; retrying");
                }
            }
        }
    }
}

/// The first budget `c` has used up, if any (rolling windows that ended).
fn exhausted(c: &mut Counter, l: &Limits, scope: &str, now_ms: i64) -> Option<Exhausted> {
    let scope_label = if scope == CELL_SCOPE {
        "cell".to_string()
    } else {
        scope.to_string()
    };
    let hit = |budget, limit, used, resets_at_ms| {
        Some(Exhausted {
            budget,
            scope: scope_label.clone(),
            limit,
            used,
            resets_at_ms,
        })
    };
    if let Some(life) = l.lifetime_ms {
        let age = now_ms.saturating_sub(c.started_ms);
        if age >= life {
            let secs = |ms: i64| u64::try_from(ms / 1000).unwrap_or(0);
            return hit("lifetime", secs(life), secs(age), None);
        }
    }
    if let Some(max) = l.requests {
        if c.requests >= max {
            return hit("requests", max, c.requests, None);
        }
    }
    if let Some((max, len)) = l.window {
        roll(&mut c.window_start_ms, &mut c.window_requests, len, now_ms);
        if c.window_requests >= max {
            let ends = c.window_start_ms.saturating_add(len);
            return hit("requestsPerWindow", max, c.window_requests, Some(ends));
        }
    }
    if let Some((max, per)) = l.tokens {
        if let Some(per) = per {
            roll(&mut c.tokens_start_ms, &mut c.tokens, per, now_ms);
        }
        if c.tokens >= max {
            let ends = per.map(|p| c.tokens_start_ms.saturating_add(p));
            return hit("tokens", max, c.tokens, ends);
        }
    }
    if let Some((max, per)) = l.spend {
        if let Some(per) = per {
            roll(&mut c.spend_start_ms, &mut c.spend_micros, per, now_ms);
        }
        if c.spend_micros >= max {
            let ends = per.map(|p| c.spend_start_ms.saturating_add(p));
            return hit("spend", max, c.spend_micros, ends);
        }
    }
    None
}

/// One budget's state for an audit record: used, max and window end of each limit.
fn state_doc(c: &Counter, l: &Limits, scope: &str) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert(
        "scope".into(),
        if scope == CELL_SCOPE {
            "cell".into()
        } else {
            format!("capability:{scope}").into()
        },
    );
    if let Some(max) = l.requests {
        m.insert(
            "requests".into(),
            serde_json::json!({"used": c.requests, "max": max}),
        );
    }
    if let Some((max, len)) = l.window {
        m.insert(
            "requestsPerWindow".into(),
            serde_json::json!({"used": c.window_requests, "max": max, "resets_at": rfc3339_ms(c.window_start_ms.saturating_add(len))}),
        );
    }
    if let Some(life) = l.lifetime_ms {
        m.insert(
            "lifetime".into(),
            serde_json::json!({"ends_at": rfc3339_ms(c.started_ms.saturating_add(life))}),
        );
    }
    if let Some((max, per)) = l.tokens {
        m.insert(
            "tokens".into(),
            serde_json::json!({"used": c.tokens, "max": max, "resets_at": per.map(|p| rfc3339_ms(c.tokens_start_ms.saturating_add(p)))}),
        );
    }
    if let Some((max, per)) = l.spend {
        m.insert(
            "spend".into(),
            serde_json::json!({"used": micros_text(c.spend_micros), "max": micros_text(max), "resets_at": per.map(|p| rfc3339_ms(c.spend_start_ms.saturating_add(p)))}),
        );
    }
    serde_json::Value::Object(m)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellgate_api::manifest::{SpendBudgetSpec, TokenBudgetSpec};

    fn spec() -> BudgetSpec {
        BudgetSpec {
            requests: Some(5),
            requests_per_window: Some(3),
            window: Some("1m".into()),
            ..BudgetSpec::default()
        }
    }

    async fn take(l: &Ledger, scopes: &[Scope<'_>], now: i64) -> Take {
        loop {
            match l.take("c1", scopes, now) {
                Take::Persist => l.persist().await.unwrap(),
                t => return t,
            }
        }
    }

    #[tokio::test]
    async fn windows_and_totals_are_exact_and_reset() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let s = spec();
        let scopes = [Scope {
            name: CELL_SCOPE,
            spec: &s,
        }];
        for _ in 0..3 {
            assert!(matches!(take(&l, &scopes, 1_000).await, Take::Granted(_)));
        }
        match take(&l, &scopes, 1_000).await {
            Take::Exhausted(e) => {
                assert_eq!(e.budget, "requestsPerWindow");
                assert_eq!((e.limit, e.used), (3, 3));
                assert_eq!(e.resets_at_ms, Some(61_000));
                assert_eq!(e.retry_after(31_000), Some(Duration::from_secs(30)));
            }
            t => panic!("{t:?}"),
        }
        // The next window: two more, then the total of five is used up.
        for _ in 0..2 {
            assert!(matches!(take(&l, &scopes, 61_000).await, Take::Granted(_)));
        }
        match take(&l, &scopes, 61_000).await {
            Take::Exhausted(e) => assert_eq!((e.budget, e.limit, e.used), ("requests", 5, 5)),
            t => panic!("{t:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_scope_counts_in_no_other_scope() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let cell = BudgetSpec {
            requests: Some(100),
            ..BudgetSpec::default()
        };
        let cap = BudgetSpec {
            requests: Some(1),
            ..BudgetSpec::default()
        };
        let scopes = [
            Scope {
                name: CELL_SCOPE,
                spec: &cell,
            },
            Scope {
                name: "api",
                spec: &cap,
            },
        ];
        assert!(matches!(take(&l, &scopes, 0).await, Take::Granted(_)));
        for _ in 0..5 {
            assert!(matches!(take(&l, &scopes, 0).await, Take::Exhausted(_)));
        }
        let st = l.state("c1", &scopes);
        assert_eq!(st[0]["requests"]["used"], 1, "{st}");
        assert_eq!(st[1]["scope"], "capability:api");
    }

    #[tokio::test]
    async fn lifetime_ends_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let s = BudgetSpec {
            lifetime: Some("2h".into()),
            ..BudgetSpec::default()
        };
        let scopes = [Scope {
            name: CELL_SCOPE,
            spec: &s,
        }];
        assert!(matches!(take(&l, &scopes, 0).await, Take::Granted(_)));
        assert!(matches!(
            take(&l, &scopes, 7_199_999).await,
            Take::Granted(_)
        ));
        match take(&l, &scopes, 7_200_000).await {
            Take::Exhausted(e) => assert_eq!((e.budget, e.limit, e.used), ("lifetime", 7200, 7200)),
            t => panic!("{t:?}"),
        }
    }

    #[tokio::test]
    async fn usage_crossing_the_limit_refuses_the_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let s = BudgetSpec {
            tokens: Some(TokenBudgetSpec {
                max: 1000,
                per: Some("1h".into()),
            }),
            spend: Some(SpendBudgetSpec {
                max: "1.50".into(),
                per: None,
                currency: Some("USD".into()),
            }),
            ..BudgetSpec::default()
        };
        let scopes = [Scope {
            name: "llm",
            spec: &s,
        }];
        assert!(matches!(take(&l, &scopes, 0).await, Take::Granted(_)));
        l.add_usage("c1", &scopes, 999, 10, 10);
        assert!(matches!(take(&l, &scopes, 20).await, Take::Granted(_)));
        l.add_usage("c1", &scopes, 500, 10, 30);
        match take(&l, &scopes, 40).await {
            Take::Exhausted(e) => {
                assert_eq!((e.budget, e.limit, e.used), ("tokens", 1000, 1499));
                assert_eq!(e.resets_at_ms, Some(3_600_000));
            }
            t => panic!("{t:?}"),
        }
        // A new hour: tokens reset, spend (no window) does not.
        assert!(matches!(
            take(&l, &scopes, 3_600_000).await,
            Take::Granted(_)
        ));
        l.add_usage("c1", &scopes, 1, 1_500_000, 3_600_001);
        match take(&l, &scopes, 3_600_002).await {
            Take::Exhausted(e) => {
                assert_eq!(e.budget, "spend");
                assert_eq!(e.amounts(), ("1.50".into(), "1.50002".into()));
            }
            t => panic!("{t:?}"),
        }
        // Unreadable usage is never free.
        let t = BudgetSpec {
            tokens: Some(TokenBudgetSpec { max: 10, per: None }),
            ..BudgetSpec::default()
        };
        let other = [Scope {
            name: "other",
            spec: &t,
        }];
        assert!(matches!(take(&l, &other, 0).await, Take::Granted(_)));
        l.exhaust_usage("c1", &other, 1);
        assert!(matches!(take(&l, &other, 2).await, Take::Exhausted(_)));
    }

    #[tokio::test]
    async fn the_ledger_survives_a_restart_and_never_gives_budget_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec();
        let scopes = [Scope {
            name: CELL_SCOPE,
            spec: &s,
        }];
        {
            let l = Ledger::open(dir.path()).unwrap();
            assert!(matches!(take(&l, &scopes, 0).await, Take::Granted(_)));
            assert!(matches!(take(&l, &scopes, 0).await, Take::Granted(_)));
            // No final write: as after a crash.
        }
        let l = Ledger::open(dir.path()).unwrap();
        // At least the two used are still counted (the reservation may count more).
        let mut granted = 0;
        while let Take::Granted(_) = take(&l, &scopes, 0).await {
            granted += 1;
        }
        assert!(
            granted <= 1,
            "{granted} granted after a restart with 2 of 3 used"
        );
    }

    #[test]
    fn a_corrupt_ledger_is_refused_not_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        for bad in [
            &b"{\"version\":1,\"counters\":[{\"cell\":"[..],
            b"not json",
            b"{\"version\":2,\"counters\":[]}",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Ledger::open(dir.path()).unwrap_err();
            assert!(matches!(e, LedgerError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains("never reset to zero"), "{e}");
            // The file is left as it was.
            assert_eq!(std::fs::read(&path).unwrap(), bad);
        }
    }

    #[tokio::test]
    async fn a_cell_taken_over_starts_from_the_reported_usage_and_never_lower() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let s = spec();
        let scopes = [Scope {
            name: CELL_SCOPE,
            spec: &s,
        }];
        assert!(matches!(take(&l, &scopes, 1_000).await, Take::Granted(_)));
        let reported = vec![cellgate_api::crd::BudgetUsage {
            scope: "cell".into(),
            started_ms: 500,
            requests: 4,
            window_start_ms: 1_000,
            window_requests: 2,
            ..Default::default()
        }];
        assert_eq!(l.seed("c1", &reported), 1);
        let u = l.usage_of("c1");
        assert_eq!(
            (u[0].requests, u[0].window_requests, u[0].started_ms),
            (4, 2, 500)
        );
        // One more in this window (3), then the total (5) ends it.
        assert!(matches!(take(&l, &scopes, 1_000).await, Take::Granted(_)));
        assert!(matches!(take(&l, &scopes, 1_000).await, Take::Exhausted(_)));
        // A lower report changes nothing.
        let lower = vec![cellgate_api::crd::BudgetUsage {
            scope: "cell".into(),
            started_ms: 900,
            requests: 1,
            window_start_ms: 1_000,
            window_requests: 1,
            ..Default::default()
        }];
        assert_eq!(l.seed("c1", &lower), 0);
        assert_eq!(l.usage_of("c1")[0].requests, 5);
    }

    #[test]
    fn amounts() {
        assert_eq!(micros_text(25_000_000), "25.00");
        assert_eq!(micros_text(1), "0.000001");
        assert_eq!(micros_text(1_230_000), "1.23");
        assert_eq!(parse_micros("25.00"), Some(25_000_000));
        assert_eq!(parse_micros("0.000001"), Some(1));
        assert_eq!(parse_micros("25"), Some(25_000_000));
        for bad in ["", ".5", "5.", "1.0000001", "-1", "1e3", "abc"] {
            assert_eq!(parse_micros(bad), None, "{bad}");
        }
    }
}
