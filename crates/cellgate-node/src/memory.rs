//! The node's memory footprint: transparent huge pages off for the process.
//!
//! mimalloc commits its arenas eagerly and advises the kernel to back them with huge pages
//! (`madvise(MADV_HUGEPAGE)`); on kernels whose THP mode is `madvise` or `always`, a node that
//! has touched a few MB of its heap then holds whole 2 MB pages. Measured with `bench/load.sh`
//! (docs/benchmarks.md, "Cellgate vs Envoy in one run"): RSS 53 MB idle and 58-68 MB after the load runs with huge
//! pages, 27 MB and 32-34 MB without, at the same CPU per request. The node is a long-lived
//! DaemonSet pod next to the agents: its resident size is what a node operator budgets.
//!
//! This module is the node's one `unsafe` for it: a `prctl(2)` with integer arguments only.

#![allow(unsafe_code)]

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`): memory faulted
/// from now on is backed by base pages. Inherited by children; pages already faulted stay.
///
/// # Errors
/// The `prctl` error (a kernel older than 3.15 has no such option).
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only (1 = disable, the rest must be
    // 0); no memory is passed to the kernel.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether transparent huge pages are off for this process (`PR_GET_THP_DISABLE`).
///
/// # Errors
/// The `prctl` error.
pub fn transparent_huge_pages_disabled() -> std::io::Result<bool> {
    // SAFETY: PR_GET_THP_DISABLE takes no pointer; its result is the return value.
    let rc = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_off_after_the_call() {
        // In a child process, so the test binary's other tests keep their setting.
        let exe = std::env::current_exe().expect("test binary");
        if std::env::var_os("CELLGATE_THP_CHILD").is_some() {
            disable_transparent_huge_pages().expect("prctl");
            assert!(transparent_huge_pages_disabled().expect("prctl"));
            return;
        }
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "memory::tests::huge_pages_are_off_after_the_call",
                "--nocapture",
            ])
            .env("CELLGATE_THP_CHILD", "1")
            .status()
            .expect("child");
        assert!(
            status.success(),
            "in the child, huge pages are off after the call"
        );
    }
}
