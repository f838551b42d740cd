//! `pfnstore status` (the default): this machine's hugetlb situation, the configuration of a
//! store of the requested size, and a short demonstration of what the store does, on
//! synthetic memory (nothing on the machine is changed).

use std::io::Write;

use pfnstore::core::{Geometry, PageSize, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::hugetlb::pool::Sysfs;
use pfnstore::{Store, StoreOptions};

use super::Outcome;
use super::show::{Source, block_bytes, indent};
use super::units::{self, Bytes, GIB, SizeLimit};

/// Arguments of `pfnstore status`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Size of the store: 2G, 16T, ... (a bare number is GiB; --size-gib is the same flag).
    /// A whole number of GiB up to 1 PiB: the run is on synthetic memory, so it may exceed
    /// this machine's.
    #[arg(long, alias = "size-gib", value_name = "SIZE", default_value = "2G",
          value_parser = units::store_size)]
    pub size: Bytes,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            size: Bytes(2 * GIB),
        }
    }
}

/// Prints the hugetlb situation, the configuration and the demonstration.
pub(crate) fn run(args: &Args, out: &mut dyn Write) -> Outcome {
    let sysfs = Sysfs::system();
    let machine = SizeLimit::machine()?;
    writeln!(out, "== this machine")?;
    super::hugetlb::print_pools(&sysfs, out)?;
    if machine.check(args.size).is_ok() {
        super::hugetlb::print_preview(&sysfs, args.size, None, out)?;
    } else {
        writeln!(
            out,
            "a store of {}: more than this machine's memory ({}), so only on synthetic memory",
            args.size,
            Bytes(machine.max)
        )?;
    }
    writeln!(out)?;
    writeln!(out, "== store configuration")?;
    let geometry = Geometry::X86_64;
    let chunk = block_bytes(&geometry, PageSize::Size1G);
    writeln!(
        out,
        "store size:      {} ({} chunks of {chunk})",
        args.size,
        args.size.0 / chunk.0
    )?;
    writeln!(
        out,
        "block sizes:     {} / {} / {chunk}",
        block_bytes(&geometry, PageSize::Size4K),
        block_bytes(&geometry, PageSize::Size2M),
    )?;
    writeln!(out, "lock shards:     {}", StoreOptions::default().shards)?;
    writeln!(out)?;
    writeln!(
        out,
        "== what a store does (synthetic memory; `pfnstore demo` runs VMs on real memory)"
    )?;
    let source = SyntheticSource::new(geometry, Pfn(1 << 20), args.size.0 / chunk.0)?;
    let store = Store::synthetic(source, StoreOptions::default())?;
    writeln!(
        out,
        "memory source:\n{}",
        indent(&Source(store.source_report()).to_string())
    )?;
    super::tour::show(&store, out)
}
