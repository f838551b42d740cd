//! The `pfnstore` command: what this machine offers a store, and what a store would look like.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser, Debug)]
#[command(
    name = "pfnstore",
    version,
    about = "Backing store for confidential-VM guest memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The hugetlb situation of this machine and the configuration of a store (the default).
    Status(cli::status::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Status(args)) => cli::status::run(&args),
        None => cli::status::run(&cli::status::Args::default()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pfnstore: {e}");
            ExitCode::FAILURE
        }
    }
}
