//! `cellgate-node`: parses arguments, starts logging, runs the node until SIGTERM or Ctrl-C, then
//! drains.

use std::process::ExitCode;

use cellgate_node::{NodeArgs, NodeConfig};
use clap::Parser;

// The data path allocates and frees per request (headers, bodies, policy values) from several
// threads; mimalloc's thread-local free lists avoid glibc's arena locking and trimming, and
// musl's slow allocator in the static images.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = NodeArgs::parse();
    let env: std::collections::HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CELLGATE_") || k == "HOSTNAME")
        .collect();
    let config = match NodeConfig::from_args_env(args, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cellgate-node: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_json);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("cellgate-data");
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cellgate-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        tracing::info!(config = ?config, "resolved configuration");
        let node = match cellgate_node::run(config).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                eprintln!("cellgate-node: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        node.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
