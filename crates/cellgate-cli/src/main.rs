//! The `cellgate` binary: see the library for the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    cellgate_cli::main()
}
