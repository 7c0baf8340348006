//! Entering a network namespace: the node's only `setns(2)`, for the enforcement self-check.
//!
//! This is the module's only `unsafe`: one `setns` call on a borrowed file descriptor.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Moves the calling thread into the network namespace `ns` refers to (a file under
/// `/var/run/netns`, or `/proc/PID/ns/net`).
///
/// # Errors
/// The `setns` error: `EPERM` without CAP_SYS_ADMIN, `EINVAL` when `ns` is not a network
/// namespace.
///
/// # Caveats
/// Only the calling thread moves, for the rest of its life: call it only on a thread made for
/// the purpose, which exits afterwards (never a runtime's worker or blocking-pool thread, which
/// would carry the namespace into unrelated work).
pub fn enter(ns: &impl AsFd) -> io::Result<()> {
    // SAFETY: `setns` reads two integers and touches no memory of ours; the descriptor is
    // borrowed from a live open file (`AsFd`) for the whole call, so it cannot be closed or
    // reused underneath it.
    let rc = unsafe { libc::setns(ns.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
