//! The `cellgate-tagger` binary: parses arguments and environment, runs the tagger on a
//! single-threaded runtime until SIGTERM or Ctrl-C, and maps failures to exit codes
//! (2 for bad usage, 1 for anything else).

use std::collections::HashMap;
use std::process::ExitCode;

use cellgate_tagger::{config::USAGE, Command};

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
        .filter(|(k, _)| k.starts_with("CELLGATE_TAGGER_"))
        .collect();
    let config = match Command::parse(args, &env) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("cellgate-tagger {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cellgate-tagger error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cellgate_tagger::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellgate-tagger error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("cellgate-tagger: {message}\nusage: cellgate-tagger --listen ADDR --node ADDR --token-file FILE [--destination ADDR] [--max-connections N] (see --help)");
    ExitCode::from(2)
}

/// Completes on SIGTERM (how the kubelet stops a container) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("cellgate-tagger warn: cannot listen for SIGTERM ({e}); only Ctrl-C stops the tagger");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => eprintln!("cellgate-tagger info: SIGTERM received"),
        _ = tokio::signal::ctrl_c() => eprintln!("cellgate-tagger info: interrupt received"),
    }
}
