//! A real KVM guest running on memory from the store: a real-mode guest writes into a shared
//! page of a guest-memory file, the VMM reads it through the store; after the page converts to
//! private, the host view is revoked and the guest's access through that memory slot fails
//! instead of reaching the page. Skipped where /dev/kvm cannot be opened.
#![cfg(target_arch = "x86_64")]

mod common;

use common::*;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault};
use pfnstore::{ConvertMode, FileOptions, Shareability, Store, StoreError, StoreOptions};

const CODE: u64 = 0x1000;
/// The data page, in a protection unit (2 MiB on ordinary memory) of its own.
const DATA: u64 = 2 << 20;
/// Two units: the code's and the data's.
const UNIT: u64 = 2 << 20;
const SLOT_BYTES: u64 = 2 * UNIT;

/// `mov al, 0x42; mov [ds:0], al; hlt` (DS's base is the data page).
const GUEST: [u8; 6] = [0xb0, 0x42, 0xa2, 0x00, 0x00, 0xf4];

fn start_at(vcpu: &VcpuFd, rip: u64) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = DATA;
    sregs.ds.selector = (DATA >> 4) as u16;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
}

#[test]
fn a_real_mode_guest_writes_shared_memory_and_loses_it_when_private() {
    let test = "a_real_mode_guest_writes_shared_memory_and_loses_it_when_private";
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            return pfnstore::core::testing::skip(test, &format!("/dev/kvm cannot be opened: {e}"));
        }
    };
    // Ordinary memory (4 KiB host pages): no hugetlb pool needed, and the host view can be
    // revoked page by page.
    let source = HugetlbSource::new(
        HugetlbConfig::new(GIB)
            .with_page_size(HugePageSize::Base4K)
            .with_strict(true)
            .with_prefault(Prefault::None),
    )
    .unwrap();
    let store = Store::from_hugetlb(source, StoreOptions::default().with_shards(1)).unwrap();
    let file = store
        .create_file(FileOptions::new(GIB).shared().populated())
        .unwrap();
    file.write(CODE, &GUEST).unwrap();
    let host = file.host_view_address(0, SLOT_BYTES).unwrap();

    let vm = kvm.create_vm().unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: SLOT_BYTES,
        userspace_addr: host.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region is the first 4 MiB of the file's host mapping (backed and shared,
    // checked by host_view_address); the file and the store outlive the VM, which is dropped
    // at the end of this test before them.
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let mut vcpu = vm.create_vcpu(0).unwrap();

    start_at(&vcpu, CODE);
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    let mut byte = [0u8];
    file.read(DATA, &mut byte).unwrap();
    assert_eq!(
        byte,
        [0x42],
        "the guest's write is visible through the store"
    );

    // Private now (the whole unit): the VMM may not read it, the unit is revoked from the
    // file's host mapping, and the guest's next access through the memory slot over that
    // mapping cannot reach the page.
    file.write(DATA, &[0]).unwrap();
    file.convert(DATA, UNIT, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(matches!(
        file.read(DATA, &mut byte),
        Err(StoreError::PrivateAccess { .. })
    ));
    assert!(file.host_revoked(DATA).unwrap());
    start_at(&vcpu, CODE);
    // KVM cannot map the revoked page: it hands the write to the VMM (as MMIO) or fails.
    match vcpu.run() {
        Ok(VcpuExit::MmioWrite(address, data)) => {
            assert_eq!((address, data), (DATA, &[0x42][..]))
        }
        Err(_) => {}
        other => panic!("the guest reached a revoked page: {other:?}"),
    }

    // Shared again: the blocked write never landed; the next run's write does.
    file.convert(DATA, UNIT, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    file.read(DATA, &mut byte).unwrap();
    assert_eq!(
        byte,
        [0],
        "the write to the private page did not reach memory"
    );
    start_at(&vcpu, CODE);
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    file.read(DATA, &mut byte).unwrap();
    assert_eq!(byte, [0x42]);
    drop(vcpu);
    drop(vm);
    store.check_invariants().unwrap();
}
