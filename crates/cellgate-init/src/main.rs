//! The `cellgate-init` binary: parses arguments and environment, then prints the rules
//! (`--dry-run`) or applies them, and maps failure to an exit code (2 bad usage, 3 missing
//! `CAP_NET_ADMIN`, 1 anything else).

use std::collections::HashMap;
use std::process::ExitCode;

use cellgate_init::config::USAGE;
use cellgate_init::{Command, InitConfig, Ipv6Mode};

fn main() -> ExitCode {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => return usage_error(&format!("argument {arg:?} is not valid utf-8")),
        }
    }
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CELLGATE_INIT_"))
        .collect();
    let (config, dry_run) = match Command::parse(args, &env) {
        Ok(Command::Run { config, dry_run }) => (config, dry_run),
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("cellgate-init {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e.to_string()),
    };
    if dry_run {
        print!("{}", dry_run_text(&config));
        return ExitCode::SUCCESS;
    }
    match cellgate_init::apply(&config) {
        Ok(applied) => {
            println!("cellgate-init: applied; {}", describe(&config));
            print!("{applied}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cellgate-init: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn describe(config: &InitConfig) -> String {
    let inbound = if config.allow_inbound.is_empty() {
        "none".to_owned()
    } else {
        let ports: Vec<String> = config.allow_inbound.iter().map(u16::to_string).collect();
        ports.join(",")
    };
    format!(
        "tagger uid {}, tagger port {}, node {}, dns {}, inbound tcp ports {inbound}, ipv6 {}",
        config.tagger_uid, config.tagger_port, config.node, config.dns, config.ipv6
    )
}

fn dry_run_text(config: &InitConfig) -> String {
    let rules = cellgate_init::render(config);
    let mut out = format!(
        "cellgate-init: dry run, nothing changed; {}\n--- iptables-restore --noflush ---\n{}--- ip6tables-restore --noflush ---\n{}",
        describe(config),
        rules.v4,
        rules.v6
    );
    if config.ipv6 == Ipv6Mode::Auto {
        out.push_str(&format!(
            "--- ip6tables-restore --noflush, instead, if ip6tables or ipv6 nat is unavailable ---\n{}",
            cellgate_init::render_ipv6_drop()
        ));
    }
    out.push_str(
        "(jumps from built-in chains that an earlier run installed are left out when applying)\n",
    );
    out
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("cellgate-init: {message}");
    ExitCode::from(2)
}
