//! `cellgate-operator`: parses flags and `CELLGATE_*` variables, starts logging, calls
//! [`cellgate_operator::run`] and maps failure to an exit code (2: configuration, 1: runtime).

use std::collections::BTreeMap;
use std::process::ExitCode;

use cellgate_operator::{Args, Config, LogFormat};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    // What Config::resolve reads: CELLGATE_*, the OTLP variables, and the pod's name (the
    // replica's identity in the leader Lease).
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("CELLGATE_")
                || k.starts_with("OTEL_")
                || k == cellgate_operator::config::ENV_POD_NAME
        })
        .collect();
    let config = match Config::resolve(&args, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cellgate-operator: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cellgate-controller")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cellgate_operator::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(reason = e.label(), error = %e, "cellgate-operator failed");
            ExitCode::FAILURE
        }
    }
}
