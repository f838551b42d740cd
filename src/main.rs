//! The `pfnstore` command: what this machine offers a store, and what a store would look like.
//!
//! Built only with the `cli` feature (a default one), so that a library user who sets
//! `default-features = false` does not compile clap.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};

mod cli;

use cli::output::Output;
use cli::{Outcome, UsageError};

#[derive(Parser, Debug)]
#[command(
    name = "pfnstore",
    version,
    about = "Backing store for confidential-VM guest memory",
    after_help = "Sizes are written 4K, 2M, 1G, 16T (binary units; a bare number is GiB).\n\
        Exit status: 0 on success, also when the reader of the output goes away early \
        (`pfnstore status | head -1`); 1 when a command fails; 2 for bad arguments."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The hugetlb situation of this machine and the configuration of a store (the default).
    Status(cli::status::Args),
    /// The hugetlb pools, whether 1 GiB pages can be reserved here, and what a store would get.
    Hugetlb(cli::hugetlb::Args),
    /// Builds a store and a file, converts 4 KiB inside 1 GiB and back, prints the plans.
    Demo(cli::demo::Args),
    /// Measures obtaining and prefaulting memory: MAP_POPULATE vs threads, 1 GiB/2 MiB/4 KiB.
    Prefault(cli::prefault::Args),
}

fn run(command: Option<Command>, out: &mut dyn Write) -> Outcome {
    match command {
        Some(Command::Status(args)) => cli::status::run(&args, out),
        Some(Command::Hugetlb(args)) => cli::hugetlb::run(&args, out),
        Some(Command::Prefault(args)) => cli::prefault::run(&args, out),
        Some(Command::Demo(args)) => cli::demo::run(&args, out),
        None => cli::status::run(&cli::status::Args::default(), out),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = Output::new(io::stdout().lock());
    let result = run(cli.command, &mut out).and_then(|()| Ok(out.flush()?));
    if out.reader_gone() {
        // Whoever read the output stopped (`| head`): not a failure of ours, nothing to say.
        return ExitCode::SUCCESS;
    }
    let Err(error) = result else {
        return ExitCode::SUCCESS;
    };
    if let Some(usage) = error.downcast_ref::<UsageError>() {
        usage_error(usage);
    }
    // A closed stderr leaves nothing to report to; the exit status still says it failed.
    let _ = writeln!(io::stderr(), "pfnstore: {error}");
    ExitCode::FAILURE
}

/// Reports `usage` as clap reports its own argument errors (usage line, exit status 2).
fn usage_error(usage: &UsageError) -> ! {
    let mut command = Cli::command();
    command.build();
    let subcommand = command
        .find_subcommand_mut(usage.command)
        .expect("UsageError names one of Command's subcommands");
    subcommand
        .error(ErrorKind::ValueValidation, &usage.message)
        .exit()
}
