//! One module per subcommand.

pub mod hugetlb;
pub mod prefault;
pub mod status;
