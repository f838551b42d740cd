//! A KVM VMM whose guest memory is pfnstore files: see `vmm.rs` for what it does.
//!
//! ```sh
//! cargo run --release --features vm-memory --example kvm_vmm -- [--grow-pool] [--page-size 1G|2M|4K]
//! cargo run --release --features vm-memory --example kvm_vmm -- --guest-source   # the guest's assembly
//! ```
//!
//! `--grow-pool` grows the 1 GiB hugetlb pool by what is missing (root only; the pages are
//! given back at the end); without it the store takes what the pool has and falls back to
//! 2 MiB pages, then ordinary memory, and the report says which.

mod vmm;

use pfnstore::hugetlb::HugePageSize;

fn main() {
    let mut options = vmm::Options {
        page_size: HugePageSize::Huge1G,
        grow_pool: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--grow-pool" => options.grow_pool = true,
            "--guest-source" => {
                print!("{}", vmm::guest::SOURCE);
                return;
            }
            "--page-size" => {
                options.page_size = match args.next().as_deref() {
                    Some("1G") => HugePageSize::Huge1G,
                    Some("2M") => HugePageSize::Huge2M,
                    Some("4K") => HugePageSize::Base4K,
                    other => usage(&format!("--page-size takes 1G, 2M or 4K, not {other:?}")),
                }
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    match vmm::run(&options) {
        Ok(report) => {
            println!("{report}");
            let failed = report.checks.iter().any(|c| c.expected != c.observed);
            if failed || report.invariants.is_err() || !report.slot_errors.is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("kvm_vmm: {e}");
            std::process::exit(1);
        }
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "kvm_vmm: {problem}\nusage: kvm_vmm [--grow-pool] [--page-size 1G|2M|4K] | --guest-source"
    );
    std::process::exit(2);
}
