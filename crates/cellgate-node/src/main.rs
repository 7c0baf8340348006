//! `cellgate-node`: parses arguments, starts logging, runs the node until SIGTERM or Ctrl-C, then
//! drains. `cellgate-node self-check-prober ...` runs the privileged half of the enforcement
//! self-check instead (`cellgate_node::selfcheck::prober`).

use std::process::ExitCode;

use cellgate_node::{NodeArgs, NodeConfig};
use clap::Parser;

// The data path allocates and frees per request (headers, bodies, policy values) from several
// threads; mimalloc's thread-local free lists avoid glibc's arena locking and trimming, and
// musl's slow allocator in the static images.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off before anything allocates (an ELF constructor runs before
/// the Rust runtime's own start-up): the first heap pages are base pages too. See
/// `cellgate_node::memory` for why and the figures. `main` repeats the call to report a failure.
// A function pointer in `.init_array`, called once by the loader with no arguments.
#[allow(unsafe_code)]
#[used]
#[link_section = ".init_array"]
static HUGE_PAGES_OFF_AT_LOAD: extern "C" fn() = {
    extern "C" fn huge_pages_off() {
        let _ = cellgate_node::memory::disable_transparent_huge_pages();
    }
    huge_pages_off
};

fn main() -> ExitCode {
    // Already done at load; repeated here (idempotent) so that a failure can be logged.
    let huge_pages_off = cellgate_node::memory::disable_transparent_huge_pages();
    let env: std::collections::HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CELLGATE_") || k == "HOSTNAME")
        .collect();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "self-check-prober")
    {
        return prober(&env);
    }
    let args = NodeArgs::parse();
    let config = match NodeConfig::from_args_env(args, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cellgate-node: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_json);
    if let Err(e) = huge_pages_off {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off; the resident size may be larger");
    }
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

/// `cellgate-node self-check-prober`: serves the node's probe requests until SIGTERM.
fn prober(env: &std::collections::HashMap<String, String>) -> ExitCode {
    let argv = std::iter::once(std::ffi::OsString::from("cellgate-node self-check-prober"))
        .chain(std::env::args_os().skip(2));
    let args = cellgate_node::config::ProberArgs::parse_from(argv);
    let config = match cellgate_node::config::ProberConfig::from_args_env(args, env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cellgate-node self-check-prober: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_json);
    // Each probe runs on a thread of its own; the socket needs no more than one runtime thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cellgate-node self-check-prober: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cellgate_node::selfcheck::prober::serve(
        config,
        wait_for_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot serve: {e}");
            eprintln!("cellgate-node self-check-prober: {e}");
            ExitCode::FAILURE
        }
    }
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
