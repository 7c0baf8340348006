//! The rulesets: a pure function from [`InitConfig`] to `iptables-restore --noflush` input.
//!
//! Each family gets its own chains (`CELLGATE_OUTPUT` in `nat`; `CELLGATE_INPUT` and
//! `CELLGATE_OUTPUT` in `filter`) and one jump to each from the built-in chain of the same hook,
//! inserted first. With `--noflush`, declaring a user chain flushes it, so the chains' contents are
//! replaced atomically on every run; the jumps are the only lines that would pile up, so
//! [`Ruleset::restore_input`] leaves out the ones `iptables-save` already shows. Nothing else in
//! the namespace (other tables, other chains, built-in policies) is touched.
//!
//! `docs/init-rules.md` explains every rule; keep the two in step.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use crate::config::{InitConfig, Ipv6Mode};

/// Cellgate's chain in `nat` and in `filter` for locally generated packets.
pub const CHAIN_OUTPUT: &str = "CELLGATE_OUTPUT";
/// Cellgate's chain in `filter` for packets addressed to the pod.
pub const CHAIN_INPUT: &str = "CELLGATE_INPUT";

/// NDP messages a host sends: router solicitation, neighbor solicitation and advertisement.
const NDP_OUT: [u8; 3] = [133, 135, 136];
/// NDP messages a host receives: router advertisement, neighbor solicitation and advertisement.
const NDP_IN: [u8; 3] = [134, 135, 136];

/// The `iptables-restore` input for each family, as `--dry-run` prints it and as a first run
/// applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Input for `iptables-restore --noflush`.
    pub v4: String,
    /// Input for `ip6tables-restore --noflush`: the IPv4 treatment, or with `--ipv6 drop` the
    /// drop-everything ruleset of [`render_ipv6_drop`].
    pub v6: String,
}

/// Renders both families' rules for `config`. Pure: no I/O.
pub fn render(config: &InitConfig) -> Rules {
    Rules {
        v4: egress(config, Family::V4).restore_input(&HashSet::new()),
        v6: match config.ipv6 {
            Ipv6Mode::Drop => render_ipv6_drop(),
            Ipv6Mode::Auto | Ipv6Mode::On => {
                egress(config, Family::V6).restore_input(&HashSet::new())
            }
        },
    }
}

/// The IPv6 ruleset used when IPv6 cannot get the IPv4 treatment (`--ipv6 drop`, or `auto`
/// without ip6tables NAT): loopback only, in and out.
pub fn render_ipv6_drop() -> String {
    ipv6_drop().restore_input(&HashSet::new())
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    fn contains(self, addr: SocketAddr) -> bool {
        matches!(
            (self, addr.ip()),
            (Self::V4, IpAddr::V4(_)) | (Self::V6, IpAddr::V6(_))
        )
    }

    /// Where REDIRECT sends locally generated packets: the loopback address.
    fn redirect_host(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.1/32",
            Self::V6 => "::1/128",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }
}

/// A host match: `10.0.0.1/32`, `fd00::1/128`.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

/// A DNAT target: `10.0.0.1:53`, `[fd00::1]:53` (never a scope id; validation refuses those).
fn target(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// One of our chains, entered from the built-in chain `hook`.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    name: &'static str,
    hook: &'static str,
    rules: Vec<String>,
}

/// One table's worth of our chains.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    name: &'static str,
    chains: Vec<Chain>,
}

/// A family's rules, before they become text.
#[derive(Debug, Clone)]
pub(crate) struct Ruleset {
    family: Family,
    summary: &'static str,
    tables: Vec<Table>,
}

/// A jump from a built-in chain, as `iptables-save` prints it: (table, `-A OUTPUT -j CHAIN`).
pub(crate) type Hook = (String, String);

impl Ruleset {
    /// The jumps this ruleset needs, as `iptables-save` would print them.
    pub(crate) fn hooks(&self) -> Vec<Hook> {
        self.tables
            .iter()
            .flat_map(|t| {
                t.chains
                    .iter()
                    .map(|c| (t.name.to_owned(), format!("-A {} -j {}", c.hook, c.name)))
            })
            .collect()
    }

    /// `iptables-restore --noflush` input, leaving out the jumps in `present`.
    pub(crate) fn restore_input(&self, present: &HashSet<Hook>) -> String {
        let mut out = format!(
            "# cellgate-init: {} rules ({})\n",
            self.family.name(),
            self.summary
        );
        for table in &self.tables {
            out.push_str(&format!("*{}\n", table.name));
            for chain in &table.chains {
                out.push_str(&format!(":{} - [0:0]\n", chain.name));
            }
            for chain in &table.chains {
                for rule in &chain.rules {
                    out.push_str(&format!("-A {} {rule}\n", chain.name));
                }
            }
            for chain in &table.chains {
                let saved = format!("-A {} -j {}", chain.hook, chain.name);
                if !present.contains(&(table.name.to_owned(), saved)) {
                    out.push_str(&format!("-I {} 1 -j {}\n", chain.hook, chain.name));
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Jumps already installed, from `iptables-save` output.
pub(crate) fn present_hooks(saved: &str) -> HashSet<Hook> {
    let mut table = String::new();
    let mut present = HashSet::new();
    for line in saved.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            name.clone_into(&mut table);
        } else if line.starts_with("-A ") {
            let mut words = line.split_whitespace();
            // Exactly `-A BUILTIN -j CELLGATE_*`: a jump with extra matches is someone else's.
            if let (Some("-A"), Some(_), Some("-j"), Some(target), None) = (
                words.next(),
                words.next(),
                words.next(),
                words.next(),
                words.next(),
            ) {
                if target == CHAIN_OUTPUT || target == CHAIN_INPUT {
                    present.insert((table.clone(), line.to_owned()));
                }
            }
        }
    }
    present
}

/// The full treatment for one family.
pub(crate) fn egress(config: &InitConfig, family: Family) -> Ruleset {
    let uid = config.tagger_uid;
    let owner = format!("-m owner --uid-owner {uid}");
    let dns = family.contains(config.dns).then_some(config.dns);
    let node = family.contains(config.node).then_some(config.node);

    // nat OUTPUT: decides where a new connection goes. Only the first packet of a flow sees it.
    let mut nat = vec![
        // Loopback never leaves the namespace, and a loopback source cannot be sent elsewhere.
        format!("-d {} -j RETURN", family.loopback()),
        // The tagger's own connections must not loop back to itself.
        format!("{owner} -j RETURN"),
    ];
    match dns {
        Some(dns) => {
            for proto in ["udp", "tcp"] {
                nat.push(format!(
                    "-p {proto} -m {proto} --dport 53 -j DNAT --to-destination {}",
                    target(dns)
                ));
            }
        }
        // No resolver in this family: DNS over it is dropped by filter, not sent to the tagger.
        None => nat.push("-p tcp -m tcp --dport 53 -j RETURN".to_owned()),
    }
    nat.push(format!(
        "-p tcp -j REDIRECT --to-ports {}",
        config.tagger_port
    ));

    // filter OUTPUT: what may leave. Ends in DROP.
    let mut output = vec![
        // Loopback, and the pod's own addresses (routed through lo).
        "-o lo -j ACCEPT".to_owned(),
        // What REDIRECT sent to the tagger. Not caught by `-o lo`: the hook keeps the output
        // interface of the route taken before nat OUTPUT rewrote the destination.
        format!(
            "-d {} -p tcp -m tcp --dport {} -j ACCEPT",
            family.redirect_host(),
            config.tagger_port
        ),
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
    ];
    if family == Family::V6 {
        output.extend(NDP_OUT.iter().map(|t| ndp(*t)));
    }
    if let Some(node) = node {
        output.push(format!(
            "-d {} -p tcp {owner} -m tcp --dport {} -j ACCEPT",
            host(node.ip()),
            node.port()
        ));
    }
    output.push(format!("{owner} -j DROP"));
    if let Some(dns) = dns {
        for proto in ["udp", "tcp"] {
            output.push(format!(
                "-d {} -p {proto} -m {proto} --dport {} -j ACCEPT",
                host(dns.ip()),
                dns.port()
            ));
        }
    }
    output.push("-j DROP".to_owned());

    // filter INPUT: nothing new comes in but the declared pod ports.
    let mut input = vec![
        "-i lo -j ACCEPT".to_owned(),
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
    ];
    if family == Family::V6 {
        input.extend(NDP_IN.iter().map(|t| ndp(*t)));
    }
    input.extend(
        config
            .allow_inbound
            .iter()
            .map(|p| format!("-p tcp -m tcp --dport {p} -j ACCEPT")),
    );
    input.push("-j DROP".to_owned());

    Ruleset {
        family,
        summary: "tcp to the tagger, dns to the resolver, the rest dropped",
        tables: vec![
            Table {
                name: "nat",
                chains: vec![Chain {
                    name: CHAIN_OUTPUT,
                    hook: "OUTPUT",
                    rules: nat,
                }],
            },
            Table {
                name: "filter",
                chains: vec![
                    Chain {
                        name: CHAIN_INPUT,
                        hook: "INPUT",
                        rules: input,
                    },
                    Chain {
                        name: CHAIN_OUTPUT,
                        hook: "OUTPUT",
                        rules: output,
                    },
                ],
            },
        ],
    }
}

/// Neighbor discovery: link-local by construction (hop limit 255 is only possible on-link).
fn ndp(icmp_type: u8) -> String {
    format!("-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -m hl --hl-eq 255 -j ACCEPT")
}

/// IPv6 without NAT: loopback only.
pub(crate) fn ipv6_drop() -> Ruleset {
    Ruleset {
        family: Family::V6,
        summary: "everything but loopback dropped",
        tables: vec![Table {
            name: "filter",
            chains: vec![
                Chain {
                    name: CHAIN_INPUT,
                    hook: "INPUT",
                    rules: vec!["-i lo -j ACCEPT".to_owned(), "-j DROP".to_owned()],
                },
                Chain {
                    name: CHAIN_OUTPUT,
                    hook: "OUTPUT",
                    rules: vec!["-o lo -j ACCEPT".to_owned(), "-j DROP".to_owned()],
                },
            ],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InitConfig {
        InitConfig::new(
            1337,
            "10.77.0.1:15001".parse().unwrap(),
            "10.77.0.1:5353".parse().unwrap(),
        )
    }

    const SAMPLE_V4: &str = "\
# cellgate-init: ipv4 rules (tcp to the tagger, dns to the resolver, the rest dropped)
*nat
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A CELLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A CELLGATE_OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 10.77.0.1:5353
-A CELLGATE_OUTPUT -p tcp -m tcp --dport 53 -j DNAT --to-destination 10.77.0.1:5353
-A CELLGATE_OUTPUT -p tcp -j REDIRECT --to-ports 15006
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
*filter
:CELLGATE_INPUT - [0:0]
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_INPUT -i lo -j ACCEPT
-A CELLGATE_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CELLGATE_INPUT -j DROP
-A CELLGATE_OUTPUT -o lo -j ACCEPT
-A CELLGATE_OUTPUT -d 127.0.0.1/32 -p tcp -m tcp --dport 15006 -j ACCEPT
-A CELLGATE_OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CELLGATE_OUTPUT -d 10.77.0.1/32 -p tcp -m owner --uid-owner 1337 -m tcp --dport 15001 -j ACCEPT
-A CELLGATE_OUTPUT -m owner --uid-owner 1337 -j DROP
-A CELLGATE_OUTPUT -d 10.77.0.1/32 -p udp -m udp --dport 5353 -j ACCEPT
-A CELLGATE_OUTPUT -d 10.77.0.1/32 -p tcp -m tcp --dport 5353 -j ACCEPT
-A CELLGATE_OUTPUT -j DROP
-I INPUT 1 -j CELLGATE_INPUT
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
";

    /// IPv4 node and resolver: IPv6 TCP still goes to the tagger; IPv6 DNS and everything
    /// else is dropped; the tagger has nowhere to go over IPv6.
    const SAMPLE_V6: &str = "\
# cellgate-init: ipv6 rules (tcp to the tagger, dns to the resolver, the rest dropped)
*nat
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_OUTPUT -d ::1/128 -j RETURN
-A CELLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A CELLGATE_OUTPUT -p tcp -m tcp --dport 53 -j RETURN
-A CELLGATE_OUTPUT -p tcp -j REDIRECT --to-ports 15006
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
*filter
:CELLGATE_INPUT - [0:0]
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_INPUT -i lo -j ACCEPT
-A CELLGATE_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CELLGATE_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 134 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_INPUT -j DROP
-A CELLGATE_OUTPUT -o lo -j ACCEPT
-A CELLGATE_OUTPUT -d ::1/128 -p tcp -m tcp --dport 15006 -j ACCEPT
-A CELLGATE_OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CELLGATE_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 133 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_OUTPUT -m owner --uid-owner 1337 -j DROP
-A CELLGATE_OUTPUT -j DROP
-I INPUT 1 -j CELLGATE_INPUT
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
";

    const DROP_V6: &str = "\
# cellgate-init: ipv6 rules (everything but loopback dropped)
*filter
:CELLGATE_INPUT - [0:0]
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_INPUT -i lo -j ACCEPT
-A CELLGATE_INPUT -j DROP
-A CELLGATE_OUTPUT -o lo -j ACCEPT
-A CELLGATE_OUTPUT -j DROP
-I INPUT 1 -j CELLGATE_INPUT
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
";

    #[test]
    fn sample_golden() {
        let rules = render(&sample());
        assert_eq!(rules.v4, SAMPLE_V4);
        assert_eq!(rules.v6, SAMPLE_V6);
    }

    #[test]
    fn ipv6_modes() {
        let mut config = sample();
        config.ipv6 = Ipv6Mode::On;
        assert_eq!(render(&config).v6, SAMPLE_V6);
        config.ipv6 = Ipv6Mode::Drop;
        let rules = render(&config);
        assert_eq!(rules.v6, DROP_V6);
        assert_eq!(rules.v4, SAMPLE_V4, "ipv6 mode does not touch ipv4");
        assert_eq!(render_ipv6_drop(), DROP_V6);
    }

    #[test]
    fn tagger_port_uid_and_inbound() {
        let mut config = sample();
        config.tagger_port = 15100;
        config.tagger_uid = 4242;
        config.allow_inbound = vec![8080, 9090];
        let v4 = render(&config).v4;
        let expected = SAMPLE_V4
            .replace("--to-ports 15006", "--to-ports 15100")
            .replace("--dport 15006", "--dport 15100")
            .replace("--uid-owner 1337", "--uid-owner 4242")
            .replace(
                "-A CELLGATE_INPUT -j DROP",
                "-A CELLGATE_INPUT -p tcp -m tcp --dport 8080 -j ACCEPT\n\
                 -A CELLGATE_INPUT -p tcp -m tcp --dport 9090 -j ACCEPT\n\
                 -A CELLGATE_INPUT -j DROP",
            );
        assert_eq!(v4, expected);
        let v6 = render(&config).v6;
        assert!(v6.contains(
            "-A CELLGATE_INPUT -p tcp -m tcp --dport 9090 -j ACCEPT\n-A CELLGATE_INPUT -j DROP\n"
        ));
    }

    #[test]
    fn ipv6_node_and_resolver() {
        let config = InitConfig::new(
            1337,
            "[fd77::1]:15001".parse().unwrap(),
            "[fd77::1]:53".parse().unwrap(),
        );
        let rules = render(&config);
        let v6 = "\
# cellgate-init: ipv6 rules (tcp to the tagger, dns to the resolver, the rest dropped)
*nat
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_OUTPUT -d ::1/128 -j RETURN
-A CELLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A CELLGATE_OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination [fd77::1]:53
-A CELLGATE_OUTPUT -p tcp -m tcp --dport 53 -j DNAT --to-destination [fd77::1]:53
-A CELLGATE_OUTPUT -p tcp -j REDIRECT --to-ports 15006
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
*filter
:CELLGATE_INPUT - [0:0]
:CELLGATE_OUTPUT - [0:0]
-A CELLGATE_INPUT -i lo -j ACCEPT
-A CELLGATE_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CELLGATE_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 134 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_INPUT -j DROP
-A CELLGATE_OUTPUT -o lo -j ACCEPT
-A CELLGATE_OUTPUT -d ::1/128 -p tcp -m tcp --dport 15006 -j ACCEPT
-A CELLGATE_OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CELLGATE_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 133 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m hl --hl-eq 255 -j ACCEPT
-A CELLGATE_OUTPUT -d fd77::1/128 -p tcp -m owner --uid-owner 1337 -m tcp --dport 15001 -j ACCEPT
-A CELLGATE_OUTPUT -m owner --uid-owner 1337 -j DROP
-A CELLGATE_OUTPUT -d fd77::1/128 -p udp -m udp --dport 53 -j ACCEPT
-A CELLGATE_OUTPUT -d fd77::1/128 -p tcp -m tcp --dport 53 -j ACCEPT
-A CELLGATE_OUTPUT -j DROP
-I INPUT 1 -j CELLGATE_INPUT
-I OUTPUT 1 -j CELLGATE_OUTPUT
COMMIT
";
        assert_eq!(rules.v6, v6);
        // The IPv4 side has neither node nor resolver: the tagger reaches nothing, DNS is dropped.
        assert!(rules
            .v4
            .contains("-A CELLGATE_OUTPUT -p tcp -m tcp --dport 53 -j RETURN\n"));
        assert!(!rules.v4.contains("DNAT"));
        assert!(!rules.v4.contains("--dport 15001"));
    }

    #[test]
    fn installed_hooks_are_not_added_again() {
        let saved = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CELLGATE_OUTPUT - [0:0]
-A INPUT -p tcp -j CELLGATE_INPUT
-A OUTPUT -j CELLGATE_OUTPUT
-A CELLGATE_OUTPUT -j DROP
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j CELLGATE_OUTPUT
COMMIT
";
        let present = present_hooks(saved);
        assert_eq!(present.len(), 2, "{present:?}");
        let ruleset = egress(&sample(), Family::V4);
        let input = ruleset.restore_input(&present);
        assert_eq!(
            input,
            SAMPLE_V4.replace("-I OUTPUT 1 -j CELLGATE_OUTPUT\n", ""),
            "only the filter INPUT jump is missing (the one with -p tcp is not ours)"
        );
        assert_eq!(ruleset.hooks().len(), 3);
    }
}
