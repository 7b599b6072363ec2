//! The `reactor` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = reactor::cli::Cli::parse();
    reactor::cli::init_logging(&cli);
    reactor::cli::run(cli)
}
