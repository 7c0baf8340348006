//! `cellgate-init`: the pod's init step, and the only Cellgate component with `CAP_NET_ADMIN`.
//!
//! It installs, in the current network namespace, the egress rules of a cell: every outbound
//! TCP connection from any user but the tagger's is redirected to the tagger; DNS goes to
//! Cellgate's resolver; the tagger may reach the node proxy and nothing else; every other packet
//! leaving the namespace is dropped. IPv6 gets the same treatment, or is dropped entirely when it
//! cannot (never left open).
//!
//! Start reading at [`render`] (pure: the exact `iptables-restore` input, see [`rules`]) and
//! [`apply`] (runs `iptables-save`/`iptables-restore --noflush` and their IPv6 twins). Running it
//! twice leaves exactly the same rules. `docs/init-rules.md` explains each rule and the threat
//! model.

pub mod config;
pub mod rules;

use std::fmt;
use std::io::{self, Write};
use std::process::{Command as Process, Stdio};

pub use config::{Command, ConfigError, InitConfig, Ipv6Mode};
pub use rules::{render, render_ipv6_drop, Rules};

use rules::{egress, ipv6_drop, present_hooks, Family, Ruleset};

/// `CAP_NET_ADMIN`'s bit in the capability sets (linux/capability.h).
const CAP_NET_ADMIN_BIT: u32 = 12;

/// How long `iptables-restore` waits for the legacy backend's lock before giving up.
const XTABLES_WAIT: &str = "--wait=5";

/// Exit status for a missing `CAP_NET_ADMIN`.
pub const EXIT_NO_CAPABILITY: u8 = 3;

/// Why the rules were not applied.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The process cannot change the namespace's rules.
    #[error(
        "needs CAP_NET_ADMIN in the pod's network namespace (run as root, or grant NET_ADMIN to the init container only)"
    )]
    MissingNetAdmin,
    /// `/proc/self/status` could not be read or has no `CapEff` line.
    #[error("cannot read the capabilities from {path}: {reason}")]
    Capabilities {
        /// The file read.
        path: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A tool could not be started.
    #[error("cannot run {program}: {source} (is iptables installed in the init image?)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `--ipv6 on` and the IPv6 rules could not be applied.
    #[error("--ipv6 on: the ipv6 rules could not be applied: {reason}")]
    Ipv6Required {
        /// Why.
        reason: String,
    },
    /// IPv6 is up, could not get the rules, and could not be dropped or disabled either.
    #[error("ipv6 egress would be left open: {reason}; refusing to continue")]
    Ipv6Open {
        /// Why.
        reason: String,
    },
}

impl InitError {
    /// The process exit status for this error: 3 for a missing capability, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::MissingNetAdmin => EXIT_NO_CAPABILITY,
            _ => 1,
        }
    }
}

/// One family's ruleset as it was handed to `*tables-restore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRuleset {
    /// The restore input, exactly as applied.
    pub input: String,
    /// Jumps from built-in chains that this run added (`table: -A CHAIN -j CELLGATE_*`); empty
    /// when a previous run had installed them.
    pub hooks_added: Vec<String>,
}

/// What happened to IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Outcome {
    /// The IPv4 treatment.
    Applied(AppliedRuleset),
    /// All IPv6 except loopback dropped with ip6tables.
    Dropped {
        /// Why not the full treatment.
        reason: String,
        /// The drop ruleset.
        ruleset: AppliedRuleset,
    },
    /// ip6tables unusable: IPv6 switched off in this namespace through `disable_ipv6`.
    Disabled {
        /// Why.
        reason: String,
    },
    /// The kernel has no IPv6: nothing to do.
    Absent,
}

/// The result of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The IPv4 rules.
    pub v4: AppliedRuleset,
    /// IPv6.
    pub v6: Ipv6Outcome,
}

impl fmt::Display for Applied {
    /// A short summary, then the rules.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hooks = |r: &AppliedRuleset| {
            if r.hooks_added.is_empty() {
                "jumps already installed by an earlier run".to_owned()
            } else {
                format!("jumps added: {}", r.hooks_added.join(", "))
            }
        };
        writeln!(f, "ipv4: egress rules applied ({})", hooks(&self.v4))?;
        match &self.v6 {
            Ipv6Outcome::Applied(r) => writeln!(f, "ipv6: egress rules applied ({})", hooks(r))?,
            Ipv6Outcome::Dropped { reason, ruleset } => writeln!(
                f,
                "ipv6: ALL ipv6 egress dropped except loopback ({reason}; {})",
                hooks(ruleset)
            )?,
            Ipv6Outcome::Disabled { reason } => writeln!(
                f,
                "ipv6: disabled in this namespace with disable_ipv6 ({reason})"
            )?,
            Ipv6Outcome::Absent => writeln!(f, "ipv6: not present in this kernel; nothing to do")?,
        }
        write!(f, "--- iptables-restore --noflush ---\n{}", self.v4.input)?;
        match &self.v6 {
            Ipv6Outcome::Applied(r) | Ipv6Outcome::Dropped { ruleset: r, .. } => {
                write!(f, "--- ip6tables-restore --noflush ---\n{}", r.input)
            }
            Ipv6Outcome::Disabled { .. } | Ipv6Outcome::Absent => Ok(()),
        }
    }
}

/// Where the tools are: names looked up in `PATH` by default.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `iptables-save`.
    pub iptables_save: String,
    /// `iptables-restore`.
    pub iptables_restore: String,
    /// `ip6tables-save`.
    pub ip6tables_save: String,
    /// `ip6tables-restore`.
    pub ip6tables_restore: String,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            iptables_save: "iptables-save".to_owned(),
            iptables_restore: "iptables-restore".to_owned(),
            ip6tables_save: "ip6tables-save".to_owned(),
            ip6tables_restore: "ip6tables-restore".to_owned(),
        }
    }
}

/// Applies the rules of `config` in the current network namespace with the tools in `PATH`.
///
/// # Errors
/// [`InitError::MissingNetAdmin`] before touching anything when the process lacks
/// `CAP_NET_ADMIN`; otherwise the first tool failure. Each family's ruleset is one atomic
/// `*tables-restore` transaction: a failure leaves that family as it was.
///
/// # Caveats
/// Runs in whatever network namespace the process is in: call it from the pod's init container
/// (or under `ip netns exec`), never in a test process on the host.
pub fn apply(config: &InitConfig) -> Result<Applied, InitError> {
    apply_with(config, &Tools::default())
}

/// [`apply`] with explicit tools.
///
/// # Errors
/// As [`apply`].
pub fn apply_with(config: &InitConfig, tools: &Tools) -> Result<Applied, InitError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|e| InitError::Capabilities {
            path: "/proc/self/status",
            reason: e.to_string(),
        })?;
    if !has_net_admin(&status)? {
        return Err(InitError::MissingNetAdmin);
    }
    let v4 = install(
        &egress(config, Family::V4),
        &tools.iptables_save,
        &tools.iptables_restore,
    )?;
    let v6 = match config.ipv6 {
        Ipv6Mode::On => Ipv6Outcome::Applied(
            install(
                &egress(config, Family::V6),
                &tools.ip6tables_save,
                &tools.ip6tables_restore,
            )
            .map_err(|e| InitError::Ipv6Required {
                reason: e.to_string(),
            })?,
        ),
        Ipv6Mode::Drop => drop_ipv6("--ipv6 drop".to_owned(), tools)?,
        Ipv6Mode::Auto if !ipv6_present() => Ipv6Outcome::Absent,
        Ipv6Mode::Auto => match install(
            &egress(config, Family::V6),
            &tools.ip6tables_save,
            &tools.ip6tables_restore,
        ) {
            Ok(applied) => Ipv6Outcome::Applied(applied),
            // The transaction failed as a whole, so nothing half-applied is left behind.
            Err(e) => drop_ipv6(format!("--ipv6 auto: no ipv6 nat ({e})"), tools)?,
        },
    };
    Ok(Applied { v4, v6 })
}

/// Drops all IPv6 but loopback; without ip6tables, switches IPv6 off; fails rather than leave
/// it open.
fn drop_ipv6(reason: String, tools: &Tools) -> Result<Ipv6Outcome, InitError> {
    if !ipv6_present() {
        return Ok(Ipv6Outcome::Absent);
    }
    match install(
        &ipv6_drop(),
        &tools.ip6tables_save,
        &tools.ip6tables_restore,
    ) {
        Ok(ruleset) => Ok(Ipv6Outcome::Dropped { reason, ruleset }),
        Err(e) => {
            let reason = format!("{reason}; ip6tables unusable ({e})");
            // Per network namespace: /proc/sys/net belongs to the namespace of the process.
            for scope in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
                std::fs::write(&path, "1\n").map_err(|e| InitError::Ipv6Open {
                    reason: format!("{reason}; cannot write {path}: {e}"),
                })?;
            }
            Ok(Ipv6Outcome::Disabled { reason })
        }
    }
}

/// Whether the kernel has IPv6 in this namespace.
fn ipv6_present() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Installs one family's ruleset: reads what is there, then one `--noflush` transaction.
fn install(ruleset: &Ruleset, save: &str, restore: &str) -> Result<AppliedRuleset, InitError> {
    let saved = run(save, &[], None)?;
    let present = present_hooks(&saved);
    let input = ruleset.restore_input(&present);
    run(restore, &["--noflush", XTABLES_WAIT], Some(&input))?;
    let hooks_added = ruleset
        .hooks()
        .into_iter()
        .filter(|hook| !present.contains(hook))
        .map(|(table, line)| format!("{table}: {line}"))
        .collect();
    Ok(AppliedRuleset { input, hooks_added })
}

/// Runs `program` with `stdin`, returning its stdout.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let spawn_error = |source| InitError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = Process::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes its end; its status and stderr say why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    if !out.status.success() {
        return Err(InitError::Tool {
            program: program.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the `CapEff` line of a `/proc/<pid>/status` text has `CAP_NET_ADMIN`.
///
/// # Errors
/// [`InitError::Capabilities`] when there is no parsable `CapEff` line.
pub fn has_net_admin(status: &str) -> Result<bool, InitError> {
    let bad = |reason: String| InitError::Capabilities {
        path: "/proc/self/status",
        reason,
    };
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| bad("no CapEff line".to_owned()))?
        .trim();
    let caps = u64::from_str_radix(value, 16)
        .map_err(|_| bad(format!("CapEff {value:?} is not hexadecimal")))?;
    Ok(caps & (1 << CAP_NET_ADMIN_BIT) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bit() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert!(has_net_admin(root).unwrap());
        // Everything but NET_ADMIN (0x1000).
        let no = "CapEff:\t000001ffffffefff\n";
        assert!(!has_net_admin(no).unwrap());
        assert!(has_net_admin("CapEff:\t0000000000001000\n").unwrap());
        assert!(!has_net_admin("CapEff:\t0000000000000000\n").unwrap());
        let err = has_net_admin("CapEff:\tzz\n").unwrap_err();
        assert!(
            err.to_string().contains("\"zz\" is not hexadecimal"),
            "{err}"
        );
        assert!(has_net_admin("Name: x\n").is_err());
    }

    #[test]
    fn missing_capability_message_and_code() {
        let err = InitError::MissingNetAdmin;
        assert_eq!(err.exit_code(), 3);
        assert_eq!(
            format!("cellgate-init: {err}"),
            "cellgate-init: needs CAP_NET_ADMIN in the pod's network namespace (run as root, or grant NET_ADMIN to the init container only)"
        );
    }

    #[test]
    fn summary_names_what_happened() {
        let applied = Applied {
            v4: AppliedRuleset {
                input: "*nat\nCOMMIT\n".to_owned(),
                hooks_added: vec!["nat: -A OUTPUT -j CELLGATE_OUTPUT".to_owned()],
            },
            v6: Ipv6Outcome::Dropped {
                reason: "--ipv6 drop".to_owned(),
                ruleset: AppliedRuleset {
                    input: "*filter\nCOMMIT\n".to_owned(),
                    hooks_added: vec![],
                },
            },
        };
        assert_eq!(
            applied.to_string(),
            "ipv4: egress rules applied (jumps added: nat: -A OUTPUT -j CELLGATE_OUTPUT)\n\
             ipv6: ALL ipv6 egress dropped except loopback (--ipv6 drop; jumps already installed by an earlier run)\n\
             --- iptables-restore --noflush ---\n*nat\nCOMMIT\n\
             --- ip6tables-restore --noflush ---\n*filter\nCOMMIT\n"
        );
    }
}
