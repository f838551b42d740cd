//! One module per subcommand, and what they share: the output writer, sizes, and how library
//! values are shown.

use std::fmt;

pub(crate) mod demo;
pub(crate) mod hugetlb;
pub(crate) mod output;
pub(crate) mod prefault;
pub(crate) mod show;
pub(crate) mod status;
pub(crate) mod tour;
pub(crate) mod units;

/// What a command returns: `Ok` once its report is written.
pub(crate) type Outcome = Result<(), Box<dyn std::error::Error>>;

/// Bad input that clap cannot see while parsing because it depends on another argument (a
/// demo size is limited by this machine's memory only with `--hugetlb`). `main` reports it
/// as clap reports its own errors, with exit status 2, before the command has printed
/// anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UsageError {
    /// The subcommand, for the usage line.
    pub command: &'static str,
    /// What is wrong, naming the argument.
    pub message: String,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {}
