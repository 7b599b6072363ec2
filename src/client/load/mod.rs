//! `reactor load`: being written (issue 4). Until then it says so.
use std::process::ExitCode;

/// `reactor load`'s flags.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {}

/// Reports that the load generator is not there yet.
pub fn run(_args: &LoadArgs) -> ExitCode {
    eprintln!("reactor load: not implemented yet");
    ExitCode::FAILURE
}
