//! The tagger's configuration: a pure function of the command line and an environment map, so
//! tests pass a map instead of touching the process environment. Flags win over environment
//! variables; [`Config::validate`] is the one place that decides what is acceptable.

use std::collections::HashMap;
use std::net::{AddrParseError, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable for `--listen`.
pub const ENV_LISTEN: &str = "CELLGATE_TAGGER_LISTEN";
/// Environment variable for `--node`.
pub const ENV_NODE: &str = "CELLGATE_TAGGER_NODE";
/// Environment variable for `--token-file`.
pub const ENV_TOKEN_FILE: &str = "CELLGATE_TAGGER_TOKEN_FILE";
/// Environment variable for `--destination`.
pub const ENV_DESTINATION: &str = "CELLGATE_TAGGER_DESTINATION";
/// Environment variable for `--max-connections`.
pub const ENV_MAX_CONNECTIONS: &str = "CELLGATE_TAGGER_MAX_CONNECTIONS";

/// Largest `--max-connections` accepted: what a semaphore can count (hundreds of millions, far
/// beyond the file descriptors a process gets).
pub const MAX_CONNECTIONS_CEILING: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// How long open connections may run after a shutdown signal before they are closed. Short:
/// the pod is going away, and the kubelet's own grace period (30 s by default) must cover it.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Usage text for `--help`.
pub const USAGE: &str = "\
cellgate-tagger: tags redirected agent connections with a Proxy Protocol v2 header carrying the
cell's identity token and forwards them to the Cellgate node proxy.

usage: cellgate-tagger --listen ADDR --node ADDR --token-file FILE [--destination ADDR]
                       [--max-connections N]

options (each also read from the environment variable shown; a flag wins):
  --listen ADDR        address to accept redirected connections on, e.g. 127.0.0.1:15001
                       [CELLGATE_TAGGER_LISTEN]
  --node ADDR          the node proxy's tagged intake, e.g. 10.0.0.5:15008
                       [CELLGATE_TAGGER_NODE]
  --token-file FILE    file holding the identity token (a JWT); re-read when it changes
                       [CELLGATE_TAGGER_TOKEN_FILE]
  --destination ADDR   destination to announce for connections that were not redirected
                       (no SO_ORIGINAL_DST); without it such connections are closed
                       [CELLGATE_TAGGER_DESTINATION]
  --max-connections N  most agent connections open at once (N >= 1); one more is closed
                       before the node is contacted; without it there is no ceiling
                       [CELLGATE_TAGGER_MAX_CONNECTIONS]
  -h, --help           print this help
  -V, --version        print the version

addresses are IP:PORT; IPv6 as [ADDR]:PORT.";

/// Resolved configuration of one tagger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where redirected agent connections arrive.
    pub listen: SocketAddr,
    /// The node proxy's tagged intake.
    pub node: SocketAddr,
    /// File holding the identity token.
    pub token_file: PathBuf,
    /// Destination announced when a connection was not redirected.
    pub destination: Option<SocketAddr>,
    /// Most agent connections open at once; `None`: no ceiling.
    pub max_connections: Option<usize>,
    /// Grace period for open connections at shutdown. Not a flag; [`DEFAULT_DRAIN_GRACE`].
    pub drain_grace: Duration,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the tagger.
    Run(Config),
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
    /// A flag given twice.
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
    /// An address that does not parse.
    #[error(
        "{source_name} {value:?} is not an address of the form IP:PORT or [IPV6]:PORT: {error}"
    )]
    BadAddress {
        /// The flag or environment variable it came from.
        source_name: &'static str,
        /// What was given.
        value: String,
        /// Why it did not parse.
        error: AddrParseError,
    },
    /// A connection count that is not a whole number from 1 to [`MAX_CONNECTIONS_CEILING`].
    #[error("{source_name} {value:?} is not a whole number from 1 to {MAX_CONNECTIONS_CEILING}")]
    BadCount {
        /// The flag or environment variable it came from.
        source_name: &'static str,
        /// What was given.
        value: String,
    },
    /// A combination of settings that cannot work.
    #[error("{0}")]
    Invalid(String),
}

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
        let mut flags: [(&'static str, &'static str, Option<String>); 5] = [
            ("--listen", ENV_LISTEN, None),
            ("--node", ENV_NODE, None),
            ("--token-file", ENV_TOKEN_FILE, None),
            ("--destination", ENV_DESTINATION, None),
            ("--max-connections", ENV_MAX_CONNECTIONS, None),
        ];
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Self::Help),
                "-V" | "--version" => return Ok(Self::Version),
                _ => {}
            }
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (arg.as_str(), None),
            };
            let Some((flag, _, slot)) = flags.iter_mut().find(|(flag, _, _)| *flag == name) else {
                return Err(ConfigError::UnknownArgument(arg));
            };
            if slot.is_some() {
                return Err(ConfigError::Duplicate(flag));
            }
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .filter(|v| !v.starts_with("--"))
                    .ok_or(ConfigError::MissingValue(flag))?,
            };
            if value.is_empty() {
                return Err(ConfigError::MissingValue(flag));
            }
            *slot = Some(value);
        }
        let [listen, node, token_file, destination, max_connections] =
            flags.map(|(flag, env_name, value)| {
                let value = value.map(|v| (flag, v)).or_else(|| {
                    env.get(env_name)
                        .filter(|v| !v.is_empty())
                        .map(|v| (env_name, v.clone()))
                });
                (flag, env_name, value)
            });
        let required =
            |(flag, env, value): (&'static str, &'static str, Option<(&'static str, String)>)| {
                value.ok_or(ConfigError::Required { flag, env })
            };
        let config = Config {
            listen: address(required(listen)?)?,
            node: address(required(node)?)?,
            token_file: PathBuf::from(required(token_file)?.1),
            destination: destination.2.map(address).transpose()?,
            max_connections: max_connections.2.map(count).transpose()?,
            drain_grace: DEFAULT_DRAIN_GRACE,
        };
        config.validate()?;
        Ok(Self::Run(config))
    }
}

fn address((source_name, value): (&'static str, String)) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|error| ConfigError::BadAddress {
        source_name,
        value,
        error,
    })
}

/// A connection count: digits only (no sign, no spaces), from 1 to [`MAX_CONNECTIONS_CEILING`].
fn count((source_name, value): (&'static str, String)) -> Result<usize, ConfigError> {
    match value.parse::<usize>() {
        Ok(n)
            if (1..=MAX_CONNECTIONS_CEILING).contains(&n)
                && value.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(n)
        }
        _ => Err(ConfigError::BadCount { source_name, value }),
    }
}

impl Config {
    /// A configuration with the default grace period and no connection ceiling.
    pub fn new(listen: SocketAddr, node: SocketAddr, token_file: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            node,
            token_file: token_file.into(),
            destination: None,
            max_connections: None,
            drain_grace: DEFAULT_DRAIN_GRACE,
        }
    }

    /// Checks that the settings can work together.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting and the offending value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.node.ip().is_unspecified() || self.node.port() == 0 {
            return invalid(format!(
                "--node {} is not an address one can connect to (unspecified ip or port 0)",
                self.node
            ));
        }
        if self.node == self.listen {
            return invalid(format!(
                "--node {} is the --listen address: the tagger would connect to itself",
                self.node
            ));
        }
        if let Some(dest) = self.destination {
            if dest.ip().is_unspecified() || dest.port() == 0 {
                return invalid(format!(
                    "--destination {dest} is not an address one can connect to (unspecified ip or port 0)"
                ));
            }
        }
        if self.token_file.as_os_str().is_empty() {
            return invalid("--token-file is empty".to_owned());
        }
        if let Some(max) = self.max_connections {
            if !(1..=MAX_CONNECTIONS_CEILING).contains(&max) {
                return invalid(format!(
                    "--max-connections {max} is out of range: give a whole number from 1 to {MAX_CONNECTIONS_CEILING}, or leave it out for no ceiling"
                ));
            }
        }
        Ok(())
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

    fn run(args: &[&str], env_pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        match Command::parse(args.iter().copied(), &env(env_pairs))? {
            Command::Run(config) => Ok(config),
            other => panic!("expected run, got {other:?}"),
        }
    }

    const FULL: &[&str] = &[
        "--listen",
        "127.0.0.1:15001",
        "--node",
        "10.0.0.5:15008",
        "--token-file",
        "/var/run/cellgate/token",
    ];

    #[test]
    fn flags() {
        let config = run(FULL, &[]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(config.node, "10.0.0.5:15008".parse().unwrap());
        assert_eq!(config.token_file, PathBuf::from("/var/run/cellgate/token"));
        assert_eq!(config.destination, None);
        assert_eq!(config.drain_grace, DEFAULT_DRAIN_GRACE);
    }

    #[test]
    fn equals_form_and_ipv6() {
        let config = run(
            &[
                "--listen=[::1]:15001",
                "--node=[fd00::5]:15008",
                "--token-file=/t",
                "--destination=[2001:db8::1]:443",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.listen, "[::1]:15001".parse().unwrap());
        assert_eq!(
            config.destination,
            Some("[2001:db8::1]:443".parse().unwrap())
        );
    }

    #[test]
    fn environment_and_flags_win() {
        let env_pairs = [
            (ENV_LISTEN, "127.0.0.1:1"),
            (ENV_NODE, "10.0.0.9:2"),
            (ENV_TOKEN_FILE, "/env/token"),
            (ENV_DESTINATION, "1.2.3.4:443"),
        ];
        let config = run(&[], &env_pairs).unwrap();
        assert_eq!(config.node, "10.0.0.9:2".parse().unwrap());
        assert_eq!(config.token_file, PathBuf::from("/env/token"));
        assert_eq!(config.destination, Some("1.2.3.4:443".parse().unwrap()));
        let config = run(&["--node", "10.0.0.7:3"], &env_pairs).unwrap();
        assert_eq!(config.node, "10.0.0.7:3".parse().unwrap());
        assert_eq!(config.listen, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn help_and_version_win_over_errors() {
        let e = env(&[]);
        assert_eq!(
            Command::parse(["--bogus", "--help"], &e).unwrap_err(),
            ConfigError::UnknownArgument("--bogus".into())
        );
        assert_eq!(Command::parse(["--help"], &e).unwrap(), Command::Help);
        assert_eq!(Command::parse(["-V"], &e).unwrap(), Command::Version);
    }

    #[test]
    fn usage_errors() {
        let e = env(&[]);
        let err = |args: &[&str]| Command::parse(args.iter().copied(), &e).unwrap_err();
        assert_eq!(err(&["--listen"]), ConfigError::MissingValue("--listen"));
        assert_eq!(
            err(&["--listen", "--node", "1.1.1.1:1"]),
            ConfigError::MissingValue("--listen")
        );
        assert_eq!(err(&["--listen="]), ConfigError::MissingValue("--listen"));
        assert_eq!(
            err(&["extra"]),
            ConfigError::UnknownArgument("extra".into())
        );
        assert_eq!(
            err(&["--listen", "a:1", "--listen", "b:1"]),
            ConfigError::Duplicate("--listen")
        );
        assert_eq!(
            err(&["--listen", "127.0.0.1:1", "--token-file", "/t"]),
            ConfigError::Required {
                flag: "--node",
                env: ENV_NODE
            }
        );
        let bad = err(&[
            "--listen",
            "localhost:1",
            "--node",
            "1.1.1.1:1",
            "--token-file",
            "/t",
        ]);
        assert!(
            matches!(&bad, ConfigError::BadAddress { source_name: "--listen", value, .. } if value == "localhost:1"),
            "{bad}"
        );
        let bad = Command::parse(
            ["--listen", "127.0.0.1:1", "--token-file", "/t"],
            &env(&[(ENV_NODE, "nope")]),
        )
        .unwrap_err();
        assert!(
            matches!(
                &bad,
                ConfigError::BadAddress {
                    source_name: ENV_NODE,
                    ..
                }
            ),
            "{bad}"
        );
        assert!(bad.to_string().contains("\"nope\""), "{bad}");
    }

    #[test]
    fn max_connections_from_flag_or_environment() {
        assert_eq!(run(FULL, &[]).unwrap().max_connections, None, "no ceiling");
        let with = |extra: &[&str], env_pairs: &[(&str, &str)]| {
            let args: Vec<&str> = FULL.iter().chain(extra).copied().collect();
            run(&args, env_pairs)
        };
        assert_eq!(
            with(&["--max-connections", "64"], &[])
                .unwrap()
                .max_connections,
            Some(64)
        );
        assert_eq!(
            with(&["--max-connections=1"], &[]).unwrap().max_connections,
            Some(1)
        );
        assert_eq!(
            with(&[], &[(ENV_MAX_CONNECTIONS, "1024")])
                .unwrap()
                .max_connections,
            Some(1024)
        );
        assert_eq!(
            with(
                &["--max-connections", "8"],
                &[(ENV_MAX_CONNECTIONS, "1024")]
            )
            .unwrap()
            .max_connections,
            Some(8),
            "the flag wins"
        );
        let max = MAX_CONNECTIONS_CEILING.to_string();
        assert_eq!(
            with(&["--max-connections", &max], &[])
                .unwrap()
                .max_connections,
            Some(MAX_CONNECTIONS_CEILING)
        );
    }

    #[test]
    fn max_connections_refuses_zero_and_garbage() {
        let too_many = (MAX_CONNECTIONS_CEILING + 1).to_string();
        for value in ["0", "-1", "+5", " 5", "5 ", "ten", "1.5", "0x10", &too_many] {
            let args: Vec<&str> = FULL
                .iter()
                .copied()
                .chain(["--max-connections", value])
                .collect();
            let err = run(&args, &[]).unwrap_err();
            assert_eq!(
                err,
                ConfigError::BadCount {
                    source_name: "--max-connections",
                    value: value.to_owned()
                },
                "{value:?}"
            );
            assert!(err.to_string().contains("whole number from 1"), "{err}");
        }
        let err = run(FULL, &[(ENV_MAX_CONNECTIONS, "0")]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::BadCount {
                source_name: ENV_MAX_CONNECTIONS,
                value: "0".into()
            }
        );
        assert!(
            err.to_string()
                .contains("CELLGATE_TAGGER_MAX_CONNECTIONS \"0\""),
            "{err}"
        );
        let args: Vec<&str> = FULL
            .iter()
            .copied()
            .chain(["--max-connections", "2", "--max-connections", "3"])
            .collect();
        assert_eq!(
            run(&args, &[]).unwrap_err(),
            ConfigError::Duplicate("--max-connections")
        );
        let args: Vec<&str> = FULL.iter().copied().chain(["--max-connections"]).collect();
        assert_eq!(
            run(&args, &[]).unwrap_err(),
            ConfigError::MissingValue("--max-connections")
        );
        assert!(USAGE.contains("--max-connections N"));
        assert!(USAGE.contains(ENV_MAX_CONNECTIONS));
    }

    #[test]
    fn validation() {
        let base = || {
            Config::new(
                "127.0.0.1:15001".parse().unwrap(),
                "10.0.0.5:15008".parse().unwrap(),
                "/t",
            )
        };
        assert_eq!(base().validate(), Ok(()));
        let mut c = base();
        c.node = c.listen;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("connect to itself"));
        let mut c = base();
        c.node = "0.0.0.0:15008".parse().unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("0.0.0.0:15008"));
        let mut c = base();
        c.destination = Some("1.2.3.4:0".parse().unwrap());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--destination 1.2.3.4:0"));
        let mut c = base();
        c.token_file = PathBuf::new();
        assert!(c.validate().is_err());
        for max in [0, MAX_CONNECTIONS_CEILING + 1] {
            let mut c = base();
            c.max_connections = Some(max);
            assert!(
                c.validate()
                    .unwrap_err()
                    .to_string()
                    .contains(&format!("--max-connections {max} is out of range")),
                "{max}"
            );
        }
    }
}
