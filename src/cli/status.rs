//! `pfnstore status`: the store configuration for a requested size.

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

/// Prints the configuration.
pub fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = StoreConfig::new(args.size_gib.checked_mul(1 << 30).ok_or("size overflows")?)?;
    println!("{config}");
    Ok(())
}
