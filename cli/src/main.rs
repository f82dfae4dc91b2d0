//! `kvq`: parses the command line (usage errors exit 2), runs the command,
//! prints a failure on stderr and exits with its code.

use std::process::ExitCode;

use clap::Parser;
use kvq_cli::{Cli, CliError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvq: cannot start: {e}");
            return ExitCode::from(kvq_cli::error::exit::OTHER);
        }
    };
    match runtime.block_on(kvq_cli::run(cli)) {
        Ok(()) | Err(CliError::OutputClosed) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvq: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
