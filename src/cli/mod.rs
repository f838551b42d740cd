//! One module per subcommand.

pub mod demo;
pub mod hugetlb;
pub mod prefault;
pub mod status;
