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

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port free on 127.0.0.1 at the time of asking.
///
/// # Panics
/// When no port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs the `cellgate` CLI with `args` and returns its trimmed standard output.
///
/// # Panics
/// When it cannot run or exits non-zero (with its standard error).
pub fn cellgate(args: &[&str]) -> String {
    let out = std::process::Command::new(bin("cellgate"))
        .args(args)
        .output()
        .expect("cellgate");
    assert!(
        out.status.success(),
        "cellgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Fails (never skips) when the test does not run as root: network namespaces and iptables
/// need it.
pub fn require_root() {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2)?.parse::<u32>().ok())
        })
        .unwrap_or(u32::MAX);
    assert!(
        euid == 0,
        "this test needs root (network namespaces, iptables); running as uid {euid}"
    );
}
