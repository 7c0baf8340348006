//! Cellgate's policy engine: Rego policy sets evaluated with regorus.
//!
//! - [`PolicySet`] ([`set`]): loads every `*.rego` of a base directory and of pack directories,
//!   refuses a set that does not parse (`path:line:col: message`) or fails one of its own
//!   `test_*` rules (`path:line: test name failed`), compiles `data.cellgate.authz.decision`
//!   once, and evaluates requests with no I/O, one regorus VM per worker thread.
//! - [`PolicyStore`] ([`store`]): the node's current set, swapped atomically and only on
//!   success, with a polling watcher. No valid set means every request is denied.
//! - [`convert`]: [`cellgate_api::policy::InputDoc`] to a regorus value without JSON text, and
//!   the strict parsing of the decision.
//!
//! - [`pack`]: a set is made of packs (directories), each with a name, a version (hash of its
//!   files) and a mode (`enforce` or `shadow`, from its `pack.yaml`); [`PolicySet::packs`] lists
//!   them and [`PolicySet::decide_with_cell`] names the packs that denied a request or would have.
//! - [`cases`]: the YAML case runner shared by the tests and `cellgate policy test`;
//!   [`explain`]: the rules behind one decision, for `cellgate explain`.
//!
//! Start reading at [`PolicySet::load`]; the policy language itself is documented in
//! `docs/policy.md`, the base policy lives in `policies/base/cellgate.rego`.

pub mod cases;
pub mod convert;
pub mod error;
pub mod explain;
pub mod pack;
pub mod set;
pub mod store;

pub use convert::CellValue;
pub use error::{EvalError, PolicyError};
pub use explain::{Explanation, Layer, LayerVerdict, RuleHit};
pub use pack::{PackEffect, PackInfo, PackManifest, PackMode, PackVerdict, MANIFEST_NAME};
pub use set::{
    Decided, PolicyFile, PolicySet, RegoTest, TestRun, ENTRYPOINT, EVAL_TIME_LIMIT,
    MAX_INSTRUCTIONS, MAX_POLICY_FILES, MAX_POLICY_FILE_BYTES, SHADOW_DENY_RULE,
};
pub use store::{PolicyStatus, PolicyStore, DEFAULT_WATCH_INTERVAL};
