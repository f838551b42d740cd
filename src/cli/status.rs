//! `pfnstore status` (the default): this machine's hugetlb situation, the configuration of a
//! store of the requested size, and a short demonstration of what the store does, on
//! synthetic memory (nothing on the machine is changed).

use pfnstore::StoreConfig;

/// Arguments of `pfnstore status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the store in GiB.
    #[arg(long, default_value_t = 2)]
    pub size_gib: u64,
}

impl Default for Args {
    fn default() -> Self {
        Args { size_gib: 2 }
    }
}

/// Prints the hugetlb situation, the configuration and the demonstration.
pub fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    println!("== this machine");
    super::hugetlb::run(&super::hugetlb::Args {
        size_gib: args.size_gib,
        numa_node: None,
    })?;
    println!();
    println!("== store configuration");
    let config = StoreConfig::new(args.size_gib.checked_mul(1 << 30).ok_or("size overflows")?)?;
    println!("{config}");
    println!();
    println!(
        "== what a store does (synthetic memory; `pfnstore demo --hugetlb` uses real 1 GiB pages)"
    );
    super::demo::run(&super::demo::Args {
        size_gib: args.size_gib,
        hugetlb: false,
        grow_pool: false,
    })
}
