//! `kubectl-cellgate`: the same CLI, found by kubectl as the plugin `kubectl cellgate`.

use std::process::ExitCode;

fn main() -> ExitCode {
    cellgate_cli::main()
}
