//! The example VMM (`examples/kvm_vmm`) end to end on real KVM: its guest's checks, the
//! conversions' result codes, splits and merges, the refusal of the pinned range with the
//! pin's owner and offset, the device's refusal of a private buffer, the final attributes and
//! slots. Runs on a real 1 GiB hugetlb pool where the machine can grow one (restored
//! afterwards), else on ordinary memory; skipped where /dev/kvm cannot be opened.
#![cfg(all(target_arch = "x86_64", feature = "vm-memory"))]

#[path = "../examples/kvm_vmm/vmm.rs"]
#[allow(dead_code)]
mod vmm;

use std::process::Command;

use pfnstore::core::PageSize;
use pfnstore::hugetlb::HugePageSize;
use pfnstore::hugetlb::testing::{can_reserve, hugetlb_lock};
use pfnstore::{ConvertMode, Shareability, StoreError};

const MIB: u64 = 1 << 20;

#[test]
fn the_example_vmm_runs_its_guest_through_every_conversion() {
    let test = "the_example_vmm_runs_its_guest_through_every_conversion";
    if let Err(e) = kvm_ioctls::Kvm::new() {
        return pfnstore::core::testing::skip(test, &format!("/dev/kvm cannot be opened: {e}"));
    }
    // Held until the store (and the pool pages it added) is gone.
    let _lock = hugetlb_lock();
    let options = match can_reserve(HugePageSize::Huge1G) {
        Ok(()) => vmm::Options {
            page_size: HugePageSize::Huge1G,
            grow_pool: true,
        },
        Err(why) => {
            eprintln!("{test}: no 1 GiB pages ({why}); running on ordinary memory");
            vmm::Options {
                page_size: HugePageSize::Base4K,
                grow_pool: false,
            }
        }
    };
    let report = vmm::run(&options).expect("the VMM runs");
    println!("{report}");
    assert_eq!(
        report.obtained,
        Some(options.page_size),
        "{}",
        report.source
    );

    // The guest saw what it expected, check by check, in order.
    let ids: Vec<u32> = report.checks.iter().map(|c| c.id).collect();
    assert_eq!(ids, (1..=25).collect::<Vec<_>>());
    for check in &report.checks {
        assert_eq!(check.observed, check.expected, "guest check {check:?}");
    }

    // The conversions it asked for, and what the VMM answered.
    let asked: Vec<(u64, u64, Shareability, ConvertMode)> = report
        .conversions
        .iter()
        .map(|c| (c.gpa, c.len, c.to, c.mode))
        .collect();
    let (ram, private, shared) = (vmm::RAM, Shareability::Private, Shareability::Shared);
    let (keep, zero) = (ConvertMode::Preserve, ConvertMode::Zero);
    let window = ram + vmm::WINDOW_OFFSET - MIB;
    assert_eq!(
        asked,
        vec![
            (ram + 0x3e8000, 4096, private, keep),
            (ram + 0x3e8000, 4096, shared, keep),
            (ram + 0x200000, 2 * MIB, private, zero),
            (ram + 0x200000, 2 * MIB, shared, keep),
            (ram, 1 << 30, private, keep),
            (ram, 1 << 30, shared, keep),
            (window, 2 * MIB, private, keep),
            (window, 2 * MIB, private, keep),
            (window, 2 * MIB, shared, keep),
        ]
    );
    let codes: Vec<u32> = report
        .conversions
        .iter()
        .map(|c| vmm::result_code(&c.outcome))
        .collect();
    assert_eq!(codes, vec![0, 0, 0, 0, 0, 0, 1, 0, 0]);

    // Splits and merges: the attributes' blocks (the same on every memory source).
    let blocks = |i: usize| report.conversions[i].outcome.as_ref().unwrap().clone();
    let (g1, m2) = (PageSize::Size1G, PageSize::Size2M);
    assert_eq!(
        blocks(0).splits,
        vec![(1, g1), (1, m2)],
        "4 KiB inside 1 GiB"
    );
    assert_eq!(
        blocks(1).merges,
        vec![(1, g1), (1, m2)],
        "and back, merged at once"
    );
    assert!(blocks(0).merges.is_empty() && blocks(1).splits.is_empty());
    assert_eq!(blocks(2).splits, vec![(1, g1)], "an aligned 2 MiB");
    assert_eq!(blocks(3).merges, vec![(1, g1)]);
    for i in [4, 5] {
        assert!(
            blocks(i).splits.is_empty() && blocks(i).merges.is_empty(),
            "the whole 1 GiB"
        );
    }
    assert_eq!(
        blocks(7).splits,
        vec![(1, g1), (2, m2)],
        "2 MiB across a 2 MiB boundary"
    );
    assert_eq!(blocks(8).merges, vec![(1, g1), (2, m2)]);

    // The pinned range was refused before anything changed, naming the device and the page.
    match &report.conversions[6].outcome {
        Err(StoreError::Pinned { offset, owner, .. }) => {
            assert_eq!((*offset, *owner), (vmm::WINDOW_OFFSET, vmm::DEVICE_OWNER))
        }
        other => panic!("the pinned conversion was not refused for the pin: {other:?}"),
    }

    // Revocation from the host mapping follows the protection unit; the whole 1 GiB always.
    let unit = report.protection_unit;
    let revoked: Vec<bool> = report.conversions.iter().map(|c| c.revoked).collect();
    assert!(revoked[4], "the whole 1 GiB private is revoked");
    assert!(!revoked[0], "a 4 KiB page inside a shared unit is not");
    assert_eq!(
        revoked[2],
        unit <= 2 * MIB,
        "2 MiB is revoked where it is a whole unit"
    );

    // Guest accesses to private pages found no slot; the device was refused the private page.
    assert_eq!(
        report.refused_reads,
        vec![
            ram + 0x3e8000,
            ram + 0x200000,
            ram + 0x3ff000,
            ram,
            ram + 0x3fff_f000
        ]
    );
    assert!(report.refused_writes.is_empty());
    assert_eq!(report.device_served, 2);
    assert_eq!(report.device_refused.len(), 1);
    let (gpa, why) = &report.device_refused[0];
    assert_eq!(*gpa, ram + 0x3e8000);
    assert!(
        matches!(
            why,
            StoreError::PrivateAccess {
                offset: 0x3e8000,
                ..
            }
        ),
        "{why:?}"
    );

    // The end: all shared again, one slot per file, nothing pinned, the store consistent.
    assert_eq!(report.final_attributes.len(), 1);
    let run = &report.final_attributes[0];
    assert_eq!(run.range.bytes(), 0..(1 << 30));
    assert!(run.shareability == Shareability::Shared && run.backed && run.pins.is_empty());
    assert_eq!(report.slot_layout, vec![(0, 2 * MIB), (ram, 1 << 30)]);
    assert!(report.slot_errors.is_empty(), "{:?}", report.slot_errors);
    assert_eq!(report.slots.vetoed, 0);
    report.invariants.expect("store invariants");
}

#[test]
fn the_guest_bytes_are_their_assembly_source() {
    let test = "the_guest_bytes_are_their_assembly_source";
    let dir = std::env::temp_dir().join(format!("pfnstore-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, object, binary) = (
        dir.join("guest.S"),
        dir.join("guest.o"),
        dir.join("guest.bin"),
    );
    std::fs::write(&source, vmm::guest::SOURCE).unwrap();
    let assembled = Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(&object)
        .arg(&source)
        .status();
    match assembled {
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return pfnstore::core::testing::skip(test, &format!("GNU as cannot run: {e}"));
        }
        Ok(status) => assert!(status.success(), "as failed on the guest's source"),
    }
    let copied = Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&object)
        .arg(&binary)
        .status()
        .expect("objcopy comes with as");
    assert!(copied.success());
    let bytes = std::fs::read(&binary).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        bytes,
        vmm::guest::CODE,
        "examples/kvm_vmm/guest.rs is out of date"
    );
}
