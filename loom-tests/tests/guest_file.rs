//! loom models of the facade's own concurrent paths (ARCHITECTURE.md's models 14-18): the
//! `pfnstore` crate built with `--cfg pfnstore_loom`, so that its range locks, extent map,
//! host mappings, allocator and metadata all use loom's primitives.
//!
//! Memory: a `HugetlbSource` of ordinary pages (`HugePageSize::Base4K`, not prefaulted): a
//! plain memfd, mapped with plain syscalls, touched only where the models write. Files of one
//! or two pages; their host mapping's protection unit covers the whole file.
//!
//! Planted bugs each model must find (under the cfg the model is `should_panic` with its own
//! message; see ARCHITECTURE.md, "Proving the models can fail"):
//!
//! * `write_unchecked_after_populate` (a write that had to back its pages writes without
//!   looking again): `write_retries_after_populate`;
//! * `pin_unlocked` (a pin takes no range lock): `pin_vs_punch_hole`;
//! * `refresh_unlocked` (a conversion applies the protection rule after releasing its range
//!   lock): `protection_follows_conversions`;
//! * `destroy_flag_late` (destroy marks the file destroyed only once its memory is gone):
//!   `file_drop_vs_populate_on_a_clone`;
//! * `release_before_unmap` (a punch-hole gives memory back before it leaves the file's host
//!   mapping): `two_files_never_share_bytes`;
//! * `no_range_lock` breaks several of them too.
#![cfg(pfnstore_loom)]

use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault};
use pfnstore::{ConvertMode, FileOptions, PinOwner, Shareability, Store, StoreError, StoreOptions};
use pfnstore_core::sync::thread;
use pfnstore_loom_tests::model_builder;

const PAGE: u64 = 4096;

/// A store over 1 GiB of ordinary memory (the least an ordinary source gives), one shard.
fn store() -> Store {
    let source = HugetlbSource::new(
        HugetlbConfig::new(1 << 30)
            .with_page_size(HugePageSize::Base4K)
            .with_strict(true)
            .with_prefault(Prefault::None),
    )
    .expect("an ordinary memfd");
    Store::from_hugetlb(source, StoreOptions::default().with_shards(1)).expect("a store")
}

/// Model 14: a write to an unbacked page backs it (exclusive lock), then writes under the
/// shared lock, looking again; a first-touch fault on the next page does the same. A ZERO
/// conversion of both pages to private may come in between: the write succeeds (before the
/// conversion, which then zeroes it) or is refused as private, and its bytes never survive the
/// conversion; the fault maps a shared page or is refused as private. Neither fails otherwise.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "write_unchecked_after_populate",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "write after populate")
)]
fn write_retries_after_populate() {
    model_builder().check(|| {
        let store = store();
        let file = store
            .create_file(FileOptions::new(2 * PAGE).shared())
            .expect("write after populate: creating the file");
        let guest = {
            let file = file.clone();
            thread::spawn(move || {
                let written = file.write(0, &[7; 16]);
                let faulted = file.fault(PAGE, Shareability::Shared);
                (written, faulted)
            })
        };
        file.convert(0, 2 * PAGE, Shareability::Private, ConvertMode::Zero)
            .expect("write after populate: the conversion failed");
        let (written, faulted) = guest.join().unwrap();
        assert!(
            matches!(
                written,
                Ok(()) | Err(StoreError::PrivateAccess { offset: 0, .. })
            ),
            "write after populate: the write returned {written:?}"
        );
        assert!(
            match &faulted {
                Ok(mapping) => mapping.shareability == Shareability::Shared,
                Err(e) => matches!(e, StoreError::PrivateAccess { offset: PAGE, .. }),
            },
            "write after populate: the fault returned {faulted:?}"
        );
        file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
            .expect("write after populate: converting back failed");
        let mut bytes = [1u8; 16];
        file.read(0, &mut bytes)
            .expect("write after populate: reading back failed");
        assert_eq!(
            bytes, [0; 16],
            "write after populate: the bytes survived a ZERO conversion"
        );
        store
            .check_invariants()
            .expect("write after populate: store invariants");
    });
}

/// Model 15: a pin (shared range lock) against a punch-hole of the same page: the pin lands
/// first and the punch-hole is refused, or the punch-hole lands first and the pin is refused
/// (nothing backed); never pinned memory given back.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "pin_unlocked",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "pin vs punch-hole")
)]
fn pin_vs_punch_hole() {
    model_builder().check(|| {
        let store = store();
        let file = store
            .create_file(FileOptions::new(PAGE).shared().populated())
            .expect("pin vs punch-hole: creating the file");
        let pinner = {
            let file = file.clone();
            thread::spawn(move || file.pin(0, PAGE, PinOwner(1)))
        };
        let punched = file.punch_hole(0, PAGE);
        let pinned = pinner.join().unwrap();
        let backed = file
            .pfn_at(0)
            .expect("pin vs punch-hole: translate")
            .is_some();
        match (&pinned, &punched) {
            (Ok(()), Err(StoreError::Pinned { .. })) => {
                assert!(backed, "pin vs punch-hole: the pinned page lost its memory")
            }
            (Err(StoreError::NotBacked { .. }), Ok(())) => {
                assert!(!backed, "pin vs punch-hole: the punched page is backed")
            }
            _ => panic!(
                "pin vs punch-hole: pin {pinned:?}, punch-hole {punched:?} (pinned memory given back?)"
            ),
        }
        store
            .check_invariants()
            .expect("pin vs punch-hole: store invariants");
    });
}

/// Model 16: the host mapping's protection follows conversions: two pages of one protection
/// unit convert to private on two threads; the unit holds no shared page afterwards, so it is
/// revoked, whatever the order (the rule is applied under each change's range lock).
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "refresh_unlocked",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "host view")
)]
fn protection_follows_conversions() {
    model_builder().check(|| {
        let store = store();
        let file = store
            .create_file(FileOptions::new(2 * PAGE).shared().populated())
            .expect("host view: creating the file");
        let other = {
            let file = file.clone();
            thread::spawn(move || {
                file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
                    .map(drop)
            })
        };
        file.convert(PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
            .expect("host view: a conversion failed");
        other
            .join()
            .unwrap()
            .expect("host view: a conversion failed");
        for offset in [0, PAGE] {
            assert!(
                file.host_revoked(offset).expect("host view: host_revoked"),
                "host view: private page {offset:#x} still accessible"
            );
        }
    });
}

/// Model 17: dropping a file (`destroy`, then the last handle's `release_all`) while a clone
/// backs a page of it: the population happens before (and its memory is given back) or is
/// refused with `Destroyed`; afterwards no memory is allocated and no file open.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "destroy_flag_late",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "file drop")
)]
fn file_drop_vs_populate_on_a_clone() {
    model_builder().check(|| {
        let store = store();
        let file = store
            .create_file(FileOptions::new(PAGE).shared())
            .expect("file drop: creating the file");
        let populator = {
            let clone = file.clone();
            thread::spawn(move || clone.populate(0, PAGE))
        };
        file.destroy().expect("file drop: destroy failed");
        let populated = populator.join().unwrap();
        assert!(
            matches!(populated, Ok(()) | Err(StoreError::Destroyed { .. })),
            "file drop: the population returned {populated:?}"
        );
        let stats = store.stats();
        assert_eq!(
            (stats.allocator.total.allocated_pages, stats.files),
            (0, 0),
            "file drop: memory or the file left behind: {stats:?}"
        );
        store
            .check_invariants()
            .expect("file drop: store invariants");
    });
}

/// What the host mapping shows at `addr` (8 bytes), or `None` if it is inaccessible: read with
/// `process_vm_readv`, which honours the protection instead of faulting.
fn peek(addr: usize) -> Option<[u8; 8]> {
    let mut out = [0u8; 8];
    let local = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: out.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: out.len(),
    };
    // SAFETY: `local` describes `out`, which lives across the call; the kernel reads the
    // remote range on our behalf and reports EFAULT, instead of faulting, where it is not
    // readable. Nothing in this process is accessed through `remote`.
    let read = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (read == out.len() as isize).then_some(out)
}

/// Model 18: two files of one store. File A punches its page (its frame goes back to the
/// allocator) while file B writes a secret into its own first page (taking a frame, possibly
/// A's old one): A's host mapping never shows B's bytes, no frame backs both files, and the
/// accounting adds up.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "release_before_unmap",
    should_panic(expected = "two files")
)]
fn two_files_never_share_bytes() {
    const SECRET: [u8; 8] = *b"B's only";
    model_builder().check(|| {
        let store = store();
        let a = store
            .create_file(FileOptions::new(PAGE).shared().populated())
            .expect("two files: creating A");
        let b = store
            .create_file(FileOptions::new(PAGE).shared())
            .expect("two files: creating B");
        let a_view = a.host_mapping().expect("two files: A has a mapping");
        let a_view = a_view.as_ptr() as usize;
        let puncher = {
            let a = a.clone();
            thread::spawn(move || a.punch_hole(0, PAGE))
        };
        b.write(0, &SECRET).expect("two files: B's write failed");
        // The host reads through A's mapping (as A's vCPUs would). A raw read is no loom
        // operation; reading A's statistics first takes its mapping's lock, so that loom
        // orders the read against the punch-hole's changes of that mapping.
        let _ = a.stats();
        assert_ne!(
            peek(a_view),
            Some(SECRET),
            "two files: A's host mapping shows B's bytes"
        );
        puncher
            .join()
            .unwrap()
            .expect("two files: A's punch-hole failed");
        let frames = (
            a.pfn_at(0).expect("two files: translate A"),
            b.pfn_at(0).expect("two files: translate B"),
        );
        assert!(
            frames.0.is_none() && frames.1.is_some(),
            "two files: frames {frames:?}"
        );
        store
            .check_invariants()
            .expect("two files: store invariants");
    });
}
