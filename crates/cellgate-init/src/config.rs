//! What `cellgate-init` is asked to do: a pure function of the command line and an environment
//! map, so tests pass a map instead of touching the process environment. Flags win over
//! environment variables; [`InitConfig::validate`] is the one place that decides what is
//! acceptable.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Environment variable for `--tagger-uid`.
pub const ENV_TAGGER_UID: &str = "CELLGATE_INIT_TAGGER_UID";
/// Environment variable for `--tagger-port`.
pub const ENV_TAGGER_PORT: &str = "CELLGATE_INIT_TAGGER_PORT";
/// Environment variable for `--node`.
pub const ENV_NODE: &str = "CELLGATE_INIT_NODE";
/// Environment variable for `--dns`.
pub const ENV_DNS: &str = "CELLGATE_INIT_DNS";
/// Environment variable for `--allow-inbound`: a comma-separated list of ports.
pub const ENV_ALLOW_INBOUND: &str = "CELLGATE_INIT_ALLOW_INBOUND";
/// Environment variable for `--ipv6`.
pub const ENV_IPV6: &str = "CELLGATE_INIT_IPV6";
/// Environment variable for `--dry-run` (`1`, `true`, `yes`, or `0`, `false`, `no`).
pub const ENV_DRY_RUN: &str = "CELLGATE_INIT_DRY_RUN";

/// The port the tagger listens on unless told otherwise.
pub const DEFAULT_TAGGER_PORT: u16 = 15006;

/// Usage text for `--help`.
pub const USAGE: &str = "\
cellgate-init: installs a cell's egress rules (iptables and ip6tables) in the current network
namespace: every outbound TCP connection goes to the tagger, DNS goes to Cellgate's resolver,
everything else leaving the namespace is dropped. Idempotent; prints what it applied.

usage: cellgate-init --tagger-uid UID --node ADDR:PORT --dns ADDR:PORT [--tagger-port PORT]
                     [--allow-inbound PORT]... [--ipv6 auto|on|drop] [--dry-run]

options (each also read from the environment variable shown; a flag wins):
  --tagger-uid UID       user the tagger runs as; its traffic is not redirected and may reach
                         the node only. Not 0.                    [CELLGATE_INIT_TAGGER_UID]
  --tagger-port PORT     port the tagger accepts redirected connections on (default 15006)
                                                                  [CELLGATE_INIT_TAGGER_PORT]
  --node ADDR:PORT       the node proxy's tagged intake           [CELLGATE_INIT_NODE]
  --dns ADDR:PORT        Cellgate's DNS resolver                  [CELLGATE_INIT_DNS]
  --allow-inbound PORT   accept new inbound TCP connections on this pod port; repeatable
                         (environment: comma-separated)           [CELLGATE_INIT_ALLOW_INBOUND]
  --ipv6 MODE            auto: IPv6 rules like IPv4's, or drop all IPv6 egress if ip6tables
                         or IPv6 NAT is missing (default); on: IPv6 rules or fail; drop: drop
                         all IPv6 except loopback                 [CELLGATE_INIT_IPV6]
  --dry-run              print the iptables-restore input and change nothing
                                                                  [CELLGATE_INIT_DRY_RUN]
  -h, --help             print this help
  -V, --version          print the version

addresses are IP:PORT; IPv6 as [ADDR]:PORT.
exit status: 0 applied, 1 failed, 2 bad usage, 3 missing CAP_NET_ADMIN.";

/// What to do about IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv6Mode {
    /// The IPv4 treatment with ip6tables; if ip6tables or the kernel's IPv6 NAT is missing,
    /// drop all IPv6 egress instead. Never leaves IPv6 open.
    #[default]
    Auto,
    /// The IPv4 treatment with ip6tables, or fail.
    On,
    /// Drop all IPv6 traffic except loopback.
    Drop,
}

impl fmt::Display for Ipv6Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Drop => "drop",
        })
    }
}

/// The inputs of a cell's egress rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// The tagger's user id: its traffic is exempt from the redirect and may reach the node only.
    pub tagger_uid: u32,
    /// Where the tagger accepts redirected connections (on loopback).
    pub tagger_port: u16,
    /// The node proxy's tagged intake.
    pub node: SocketAddr,
    /// Cellgate's DNS resolver.
    pub dns: SocketAddr,
    /// Pod ports that accept new inbound TCP connections, sorted, no duplicates.
    pub allow_inbound: Vec<u16>,
    /// What to do about IPv6.
    pub ipv6: Ipv6Mode,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Apply the rules, or with `dry_run` only print them.
    Run {
        /// The rules' inputs.
        config: InitConfig,
        /// Print, change nothing.
        dry_run: bool,
    },
    /// Print [`USAGE`].
    Help,
    /// Print the version.
    Version,
}

/// A usage error. The binary prints it and exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An argument that is not a known flag.
    #[error("unknown argument {0:?} (see --help)")]
    UnknownArgument(String),
    /// A flag without its value.
    #[error("{0} needs a value (see --help)")]
    MissingValue(&'static str),
    /// A single-valued flag given twice.
    #[error("{0} given more than once")]
    Duplicate(&'static str),
    /// A required setting given neither as a flag nor in the environment.
    #[error("{flag} is required (or set {env})")]
    Required {
        /// The flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// A value that does not parse.
    #[error("{source_name} {value:?} is not {expected}")]
    BadValue {
        /// The flag or environment variable it came from.
        source_name: &'static str,
        /// What was given.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A combination of settings that cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// One single-valued setting and where its value came from (the flag or the variable's name).
struct Setting {
    flag: &'static str,
    env: &'static str,
    value: Option<(&'static str, String)>,
}

/// Single-valued settings: flag, environment variable.
const SINGLE: [(&str, &str); 6] = [
    ("--tagger-uid", ENV_TAGGER_UID),
    ("--tagger-port", ENV_TAGGER_PORT),
    ("--node", ENV_NODE),
    ("--dns", ENV_DNS),
    ("--ipv6", ENV_IPV6),
    ("--dry-run", ENV_DRY_RUN),
];

impl Command {
    /// Parses the command line (without the program name) and environment, then validates the
    /// result.
    ///
    /// # Errors
    /// A [`ConfigError`] for the first problem found.
    pub fn parse<I, S>(args: I, env: &HashMap<String, String>) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut settings: Vec<Setting> = SINGLE
            .iter()
            .map(|&(flag, env)| Setting {
                flag,
                env,
                value: None,
            })
            .collect();
        let mut inbound_flags: Vec<String> = Vec::new();
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (arg.clone(), None),
            };
            let (flag, value) = match name.as_str() {
                "-h" | "--help" => return Ok(Self::Help),
                "-V" | "--version" => return Ok(Self::Version),
                // A switch: `--dry-run` alone means true; `--dry-run=false` is accepted too.
                "--dry-run" => ("--dry-run", inline.unwrap_or_else(|| "true".to_owned())),
                _ => {
                    let flag = match settings.iter().find(|s| s.flag == name) {
                        Some(setting) => setting.flag,
                        None if name == "--allow-inbound" => "--allow-inbound",
                        None => return Err(ConfigError::UnknownArgument(arg)),
                    };
                    let value = match inline {
                        Some(value) => value,
                        None => args
                            .next()
                            .filter(|v| !v.starts_with("--"))
                            .ok_or(ConfigError::MissingValue(flag))?,
                    };
                    (flag, value)
                }
            };
            if value.is_empty() {
                return Err(ConfigError::MissingValue(flag));
            }
            if flag == "--allow-inbound" {
                inbound_flags.push(value);
            } else if let Some(setting) = settings.iter_mut().find(|s| s.flag == flag) {
                if setting.value.is_some() {
                    return Err(ConfigError::Duplicate(flag));
                }
                setting.value = Some((flag, value));
            }
        }
        // A flag wins over its environment variable.
        for setting in &mut settings {
            if setting.value.is_none() {
                setting.value = env
                    .get(setting.env)
                    .filter(|v| !v.is_empty())
                    .map(|v| (setting.env, v.clone()));
            }
        }
        let get = |flag: &str| {
            settings
                .iter()
                .find(|s| s.flag == flag)
                .and_then(|s| s.value.clone())
        };
        let required = |flag: &str| {
            let setting = settings.iter().find(|s| s.flag == flag);
            match setting {
                Some(Setting {
                    value: Some(value), ..
                }) => Ok(value.clone()),
                Some(s) => Err(ConfigError::Required {
                    flag: s.flag,
                    env: s.env,
                }),
                None => Err(ConfigError::Invalid(format!("unknown setting {flag}"))),
            }
        };

        let tagger_uid = parse_num::<u32>(required("--tagger-uid")?, "a numeric user id")?;
        let tagger_port = match get("--tagger-port") {
            Some(v) => parse_num::<u16>(v, "a port number")?,
            None => DEFAULT_TAGGER_PORT,
        };
        let node = parse_addr(required("--node")?)?;
        let dns = parse_addr(required("--dns")?)?;
        let ipv6 = match get("--ipv6") {
            None => Ipv6Mode::default(),
            Some((source_name, value)) => match value.as_str() {
                "auto" => Ipv6Mode::Auto,
                "on" => Ipv6Mode::On,
                "drop" => Ipv6Mode::Drop,
                _ => {
                    return Err(ConfigError::BadValue {
                        source_name,
                        value,
                        expected: "one of auto, on, drop",
                    })
                }
            },
        };
        let dry_run = match get("--dry-run") {
            None => false,
            Some((source_name, value)) => match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(ConfigError::BadValue {
                        source_name,
                        value,
                        expected: "a boolean (true or false)",
                    })
                }
            },
        };
        let mut allow_inbound = Vec::new();
        if inbound_flags.is_empty() {
            if let Some(list) = env.get(ENV_ALLOW_INBOUND) {
                for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    allow_inbound.push(parse_num::<u16>(
                        (ENV_ALLOW_INBOUND, item.to_owned()),
                        "a port number",
                    )?);
                }
            }
        } else {
            for value in inbound_flags {
                allow_inbound.push(parse_num::<u16>(
                    ("--allow-inbound", value),
                    "a port number",
                )?);
            }
        }
        allow_inbound.sort_unstable();
        allow_inbound.dedup();

        let config = InitConfig {
            tagger_uid,
            tagger_port,
            node,
            dns,
            allow_inbound,
            ipv6,
        };
        config.validate()?;
        Ok(Self::Run { config, dry_run })
    }
}

fn parse_num<T: std::str::FromStr>(
    (source_name, value): (&'static str, String),
    expected: &'static str,
) -> Result<T, ConfigError> {
    value.parse().map_err(|_| ConfigError::BadValue {
        source_name,
        value,
        expected,
    })
}

fn parse_addr((source_name, value): (&'static str, String)) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::BadValue {
        source_name,
        value,
        expected: "an address of the form IP:PORT or [IPV6]:PORT",
    })
}

impl InitConfig {
    /// A configuration with the default tagger port, no inbound ports and `--ipv6 auto`.
    pub fn new(tagger_uid: u32, node: SocketAddr, dns: SocketAddr) -> Self {
        Self {
            tagger_uid,
            tagger_port: DEFAULT_TAGGER_PORT,
            node,
            dns,
            allow_inbound: Vec::new(),
            ipv6: Ipv6Mode::Auto,
        }
    }

    /// Checks that the settings can work together.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the offending value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.tagger_uid == 0 {
            // The exemption is by uid: uid 0 would exempt an agent running as root.
            return invalid(
                "tagger uid 0 would exempt root's traffic from the redirect; run the tagger as its own user"
                    .to_owned(),
            );
        }
        if self.tagger_port == 0 {
            return invalid("tagger port 0 is not a port".to_owned());
        }
        for (name, addr) in [("node", self.node), ("dns", self.dns)] {
            if addr.port() == 0 {
                return invalid(format!("{name} address {addr} has port 0"));
            }
            if addr.ip().is_unspecified() || is_multicast(addr.ip()) {
                return invalid(format!(
                    "{name} address {addr} is not a unicast address of the node"
                ));
            }
            if let SocketAddr::V6(v6) = addr {
                if v6.scope_id() != 0 {
                    return invalid(format!(
                        "{name} address {addr} has a scope id; use a global or unique-local address"
                    ));
                }
            }
        }
        if self.node.ip().is_loopback() {
            // Loopback in the pod is the pod itself: the node is never there.
            return invalid(format!(
                "node address {} is loopback; the node proxy is outside the pod's network namespace",
                self.node
            ));
        }
        for &port in &self.allow_inbound {
            if port == 0 {
                return invalid("inbound port 0 is not a port".to_owned());
            }
            if port == self.tagger_port {
                return invalid(format!(
                    "inbound port {port} is the tagger port; the tagger only takes redirected connections"
                ));
            }
        }
        Ok(())
    }
}

fn is_multicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn run(
        args: &[&str],
        env: &HashMap<String, String>,
    ) -> Result<(InitConfig, bool), ConfigError> {
        match Command::parse(args.iter().copied(), env)? {
            Command::Run { config, dry_run } => Ok((config, dry_run)),
            other => panic!("unexpected {other:?}"),
        }
    }

    const BASE: [&str; 6] = [
        "--tagger-uid",
        "1337",
        "--node",
        "10.77.0.1:15001",
        "--dns",
        "10.77.0.1:5353",
    ];

    #[test]
    fn flags_and_defaults() {
        let (config, dry_run) = run(&BASE, &env(&[])).unwrap();
        assert!(!dry_run);
        assert_eq!(config.tagger_uid, 1337);
        assert_eq!(config.tagger_port, DEFAULT_TAGGER_PORT);
        assert_eq!(config.node, "10.77.0.1:15001".parse().unwrap());
        assert_eq!(config.dns, "10.77.0.1:5353".parse().unwrap());
        assert!(config.allow_inbound.is_empty());
        assert_eq!(config.ipv6, Ipv6Mode::Auto);
    }

    #[test]
    fn repeated_inbound_dry_run_and_ipv6() {
        let mut args = BASE.to_vec();
        args.extend([
            "--allow-inbound",
            "9090",
            "--allow-inbound=8080",
            "--allow-inbound",
            "8080",
            "--dry-run",
            "--ipv6",
            "drop",
            "--tagger-port",
            "15100",
        ]);
        let (config, dry_run) = run(&args, &env(&[(ENV_ALLOW_INBOUND, "1")])).unwrap();
        assert!(dry_run);
        assert_eq!(
            config.allow_inbound,
            vec![8080, 9090],
            "flags win, sorted, deduplicated"
        );
        assert_eq!(config.ipv6, Ipv6Mode::Drop);
        assert_eq!(config.tagger_port, 15100);
    }

    #[test]
    fn environment_equivalents() {
        let e = env(&[
            (ENV_TAGGER_UID, "2000"),
            (ENV_TAGGER_PORT, "15007"),
            (ENV_NODE, "[fd77::1]:15001"),
            (ENV_DNS, "10.0.0.10:53"),
            (ENV_ALLOW_INBOUND, "80, 443"),
            (ENV_IPV6, "on"),
            (ENV_DRY_RUN, "true"),
        ]);
        let (config, dry_run) = run(&[], &e).unwrap();
        assert!(dry_run);
        assert_eq!(config.tagger_uid, 2000);
        assert_eq!(config.tagger_port, 15007);
        assert_eq!(config.node, "[fd77::1]:15001".parse().unwrap());
        assert_eq!(config.allow_inbound, vec![80, 443]);
        assert_eq!(config.ipv6, Ipv6Mode::On);
        // A flag wins over its variable.
        let (config, _) = run(&["--tagger-uid", "3000"], &e).unwrap();
        assert_eq!(config.tagger_uid, 3000);
    }

    #[test]
    fn errors_name_the_value() {
        let e = env(&[]);
        let err = run(&["--node", "10.77.0.1:15001"], &e).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tagger-uid is required (or set CELLGATE_INIT_TAGGER_UID)"
        );
        let mut args = BASE.to_vec();
        args.extend(["--ipv6", "maybe"]);
        assert_eq!(
            run(&args, &e).unwrap_err().to_string(),
            "--ipv6 \"maybe\" is not one of auto, on, drop"
        );
        let err = run(&["--tagger-uid", "x", "--node", "a", "--dns", "b"], &e).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tagger-uid \"x\" is not a numeric user id"
        );
        let err = run(&["--bogus"], &e).unwrap_err();
        assert_eq!(err, ConfigError::UnknownArgument("--bogus".to_owned()));
        let mut args = BASE.to_vec();
        args.push("--allow-inbound");
        assert_eq!(
            run(&args, &e).unwrap_err(),
            ConfigError::MissingValue("--allow-inbound")
        );
        let mut args = BASE.to_vec();
        args.extend(["--node", "10.0.0.1:1"]);
        assert_eq!(
            run(&args, &e).unwrap_err(),
            ConfigError::Duplicate("--node")
        );
    }

    #[test]
    fn validation() {
        let e = env(&[]);
        let mut args = BASE.to_vec();
        args[1] = "0";
        assert!(run(&args, &e)
            .unwrap_err()
            .to_string()
            .starts_with("tagger uid 0 would exempt root's traffic"));
        let mut args = BASE.to_vec();
        args[3] = "127.0.0.1:15001";
        assert!(run(&args, &e)
            .unwrap_err()
            .to_string()
            .contains("127.0.0.1:15001 is loopback"));
        let mut args = BASE.to_vec();
        args[5] = "0.0.0.0:53";
        assert!(run(&args, &e)
            .unwrap_err()
            .to_string()
            .contains("0.0.0.0:53"));
        let mut args = BASE.to_vec();
        args.extend(["--allow-inbound", "15006"]);
        assert!(run(&args, &e)
            .unwrap_err()
            .to_string()
            .contains("inbound port 15006 is the tagger port"));
    }

    #[test]
    fn help_and_version() {
        let e = env(&[]);
        assert_eq!(Command::parse(["--help"], &e).unwrap(), Command::Help);
        assert_eq!(Command::parse(["-V"], &e).unwrap(), Command::Version);
    }
}
