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
    /// The hugetlb pools, whether 1G pages can be reserved here, and what a store would get.
    Hugetlb(cli::hugetlb::Args),
    /// Builds a store and a file, converts 4 KiB inside 1 GiB and back, prints the plans.
    Demo(cli::demo::Args),
    /// Measures obtaining and prefaulting memory: MAP_POPULATE vs threads, 1G/2M/ordinary.
    Prefault(cli::prefault::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Status(args)) => cli::status::run(&args),
        Some(Command::Hugetlb(args)) => cli::hugetlb::run(&args),
        Some(Command::Prefault(args)) => cli::prefault::run(&args),
        Some(Command::Demo(args)) => cli::demo::run(&args),
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
