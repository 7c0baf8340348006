//! End-to-end tests of Cellgate. Nothing here: the tests live in `tests/` and need the workspace's
//! binaries (`cargo build --bins`) and root (network namespaces, iptables).
//!
//! - `tests/bypass.rs`: a real cell made by `cellgate run`, an allowed and a denied request, and
//!   every bypass attempt of `docs/bypass.md`, each checked by an observer outside the cell.
