//! End-to-end tests of Cellgate. The tests live in `tests/` and need the workspace's binaries
//! (`cargo build --bins`) and root (network namespaces, iptables); this library holds what they
//! share.
//!
//! - `tests/bypass.rs`: a real cell made by `cellgate run`, an allowed and a denied request, and
//!   every bypass attempt of `docs/bypass.md`, each checked by an observer outside the cell.

use std::path::{Path, PathBuf};

/// The workspace's root directory.
#[must_use]
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The debug build of the workspace binary `name`.
///
/// # Panics
/// When it is not built, saying how to build it.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    let p = workspace().join("target/debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --bins)",
        p.display()
    );
    p
}
