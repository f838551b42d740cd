//! The VMM: a store on 1 GiB hugetlb pages (or the fallback the source reports), one file
//! per guest memory region, one KVM memory slot per shared run of each file (the
//! [`slots::KvmSlots`] subscriber), a 32-bit guest ([`guest`]) that asks for conversions
//! through port I/O, and a checksum device ([`device`]) served through the vm-memory adapter.
//! [`run`] returns a [`Report`]; `main.rs` prints it, `tests/kvm_example.rs` checks it.
//!
//! Ports (32-bit `out`/`in`): 0x10 guest address, 0x11 length, 0x12 convert (bit 0: to
//! private, bit 1: ZERO mode), 0x13 (in) the result code ([`result_code`]), 0x14 notify the
//! device, 0x15 a check ((check << 16) | (expected << 8) | observed), 0x16 done, 0x18 the
//! device pins its DMA window at the given address, 0x19 it lets go.
//!
//! A guest read of a private page finds no slot and exits as MMIO; the VMM answers all ones
//! (what a read of nothing returns on a bus) and records it, a write is dropped and recorded.
//! So in this VM a private range is gone for the guest too: without private memory
//! attributes KVM can map guest memory only through the host's mapping (see README.md, "What
//! private means"). Each conversion costs what re-registering slots costs (one or two
//! `KVM_SET_USER_MEMORY_REGION` per slot touched, milliseconds each on this machine, far
//! more than the store's own work: the report shows both); private attributes would turn that
//! into a range zap.
//!
//! # Handing the store to another process (live update, issue #17)
//!
//! The guest could keep running across a handover only with a short pause; what it needs:
//!
//! * KVM binds a VM to the process that created it (its ioctls fail in another `mm`), so the
//!   new process creates a new VM and vCPUs: the old one pauses the vCPUs, saves their state
//!   and the devices' (the queue's `last_avail`, the pinned window), and the new one restores
//!   them, as QEMU's CPR does. Guest memory is not copied.
//! * The store's memfd passed over a Unix socket (`SCM_RIGHTS`) and its state serialised: each
//!   file's extents (file offset to memfd offset), shareability, pins with their owners,
//!   quarantine and scrub state. The new process maps the same memfd offsets into new file
//!   mappings (any address: KVM slots take the new one) and its subscribers get the state as
//!   a replay, which is how these slots and the vm-memory regions are built here anyway; a
//!   vhost-user backend keeps its own mapping, since the memfd offsets do not change.
//! * Ownership of the hugetlb pool pages the old process added (its pool ledger entry and
//!   guardian): a source gives its growth back when it ends, which must not happen while the
//!   new process uses the pages.
//! * Pins held by devices (VFIO/iommufd mappings of the memfd) survive only if the device's
//!   file descriptors go along too.

#[path = "device.rs"]
pub(crate) mod device;
#[path = "guest.rs"]
pub(crate) mod guest;
#[path = "slots.rs"]
pub(crate) mod slots;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use pfnstore::core::PageSize;
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource};
use pfnstore::vm_memory::AddressSpace;
use pfnstore::{
    AttributeRun, ConvertMode, FileOptions, GuestFile, Interest, PinOwner, Shareability, Store,
    StoreError, StoreOptions, Subscriber,
};
use vm_memory::GuestAddress;

use device::ChecksumDevice;
use slots::{KvmSlots, SlotStats};

/// Guest address and size of the boot region (code, stack, the device's queue).
pub(crate) const LOW: u64 = 0;
pub(crate) const LOW_SIZE: u64 = 2 << 20;
/// Guest address and size of the test region.
pub(crate) const RAM: u64 = 1 << 30;
pub(crate) const RAM_SIZE: u64 = 1 << 30;
/// The device's pin owner.
pub(crate) const DEVICE_OWNER: PinOwner = PinOwner(0x7d);
/// The guest's DMA window for the device (offset in the test region).
pub(crate) const WINDOW_OFFSET: u64 = 0x0800_0000;

const PORT_ADDR: u16 = 0x10;
const PORT_LEN: u16 = 0x11;
const PORT_CONVERT: u16 = 0x12;
const PORT_RESULT: u16 = 0x13;
const PORT_NOTIFY: u16 = 0x14;
const PORT_CHECK: u16 = 0x15;
const PORT_DONE: u16 = 0x16;
const PORT_PIN: u16 = 0x18;
const PORT_UNPIN: u16 = 0x19;

/// How to run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The page size to try first (falls back from there, and says so).
    pub page_size: HugePageSize,
    /// Grow the hugetlb pool by what is missing (root; given back at the end).
    pub grow_pool: bool,
}

/// One conversion the guest asked for.
#[derive(Debug, Clone)]
pub(crate) struct Conversion {
    /// Guest address and length.
    pub gpa: u64,
    pub len: u64,
    pub to: Shareability,
    pub mode: ConvertMode,
    /// Blocks split and merged, or the store's refusal.
    pub outcome: Result<Blocks, StoreError>,
    /// `GuestFile::convert` with every subscriber (KVM slots, the adapter).
    pub store_time: Duration,
    /// From the guest's request exit to its reading the result (re-entering the guest
    /// included).
    pub round_trip: Option<Duration>,
    /// Whether the store revoked the range's first page from the file's host mapping.
    pub revoked: bool,
    /// Slots after it.
    pub slots: usize,
    /// Of `store_time`, the time spent in `KVM_SET_USER_MEMORY_REGION`.
    pub slot_time: Duration,
}

/// Split and merged blocks of a conversion, as "count x size" per run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Blocks {
    pub splits: Vec<(u64, PageSize)>,
    pub merges: Vec<(u64, PageSize)>,
    pub unmapped: u64,
    pub mapped: u64,
}

/// One check the guest reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Check {
    pub id: u32,
    pub expected: u8,
    pub observed: u8,
}

/// What the run did.
#[derive(Debug)]
pub(crate) struct Report {
    /// The memory source's story (the fallback ladder).
    pub source: String,
    pub obtained: Option<HugePageSize>,
    /// Bytes per protection unit of the files' host mappings.
    pub protection_unit: u64,
    pub conversions: Vec<Conversion>,
    pub checks: Vec<Check>,
    /// Guest reads (and writes) that found no slot: guest addresses.
    pub refused_reads: Vec<u64>,
    pub refused_writes: Vec<u64>,
    /// Requests the device served, and those it was refused.
    pub device_served: u64,
    pub device_refused: Vec<(u64, StoreError)>,
    pub slots: SlotStats,
    pub slot_layout: Vec<(u64, u64)>,
    pub slot_errors: Vec<String>,
    /// The test region's attributes at the end.
    pub final_attributes: Vec<AttributeRun>,
    pub exits: u64,
    pub guest_time: Duration,
    pub invariants: Result<(), String>,
}

/// The guest's result code for a conversion: 0 done, 1 pinned, 2 vetoed, 3 anything else.
pub(crate) fn result_code(outcome: &Result<Blocks, StoreError>) -> u32 {
    match outcome {
        Ok(_) => 0,
        Err(StoreError::Pinned { .. }) => 1,
        Err(StoreError::Vetoed { .. }) => 2,
        Err(_) => 3,
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The store: 2 GiB (two files of whole 1 GiB pages), prefaulted.
fn store(options: &Options) -> Result<Store, Error> {
    let source = HugetlbSource::new(
        HugetlbConfig::new(2 << 30)
            .with_page_size(options.page_size)
            .with_grow_pool(options.grow_pool),
    )?;
    Ok(Store::from_hugetlb(source, StoreOptions::default())?)
}

/// 32-bit protected mode, flat 4 GiB segments, no paging, at the guest's entry.
fn enter_protected_mode(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs()?;
    let mut segment = sregs.cs;
    segment.base = 0;
    segment.limit = 0xffff_ffff;
    segment.present = 1;
    segment.dpl = 0;
    segment.db = 1;
    segment.s = 1;
    segment.l = 0;
    segment.g = 1;
    segment.avl = 0;
    let mut code = segment;
    code.selector = 0x08;
    code.type_ = 0xb; // execute/read, accessed
    let mut data = segment;
    data.selector = 0x10;
    data.type_ = 0x3; // read/write, accessed
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 |= 1; // PE
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = guest::LOAD;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// Runs the guest to its end and reports.
pub(crate) fn run(options: &Options) -> Result<Report, Error> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let store = store(options)?;
    let low = store.create_file(FileOptions::new(LOW_SIZE).shared().populated())?;
    let ram = store.create_file(FileOptions::new(RAM_SIZE).shared().populated())?;
    low.write(guest::LOAD, &guest::CODE)?;

    let vm = Arc::new(kvm.create_vm()?);
    let slots = Arc::new(KvmSlots::new(Arc::clone(&vm), kvm.get_nr_memslots()));
    slots.add_file(LOW, &low);
    slots.add_file(RAM, &ram);
    let as_subscriber: Arc<dyn Subscriber> = slots.clone();
    // Registering replays what is mapped now: the slots are made here.
    let _low_slots = store.subscribe(&as_subscriber, Interest::File(low.id()))?;
    let _ram_slots = store.subscribe(&as_subscriber, Interest::File(ram.id()))?;
    let space: AddressSpace = AddressSpace::new([
        (GuestAddress(LOW), low.clone()),
        (GuestAddress(RAM), ram.clone()),
    ])?;
    let mut device = ChecksumDevice::new(space.clone(), DEVICE_OWNER);

    let mut vcpu = vm.create_vcpu(0)?;
    enter_protected_mode(&vcpu)?;

    let files = [(LOW, &low), (RAM, &ram)];
    let mut vmm = Vmm {
        files: &files,
        slots: &slots,
        request: (0, 0),
        last: None,
        conversions: Vec::new(),
        checks: Vec::new(),
        refused_reads: Vec::new(),
        refused_writes: Vec::new(),
    };
    let started = Instant::now();
    let mut exits = 0u64;
    let mut done = false;
    loop {
        exits += 1;
        match vcpu.run()? {
            VcpuExit::IoOut(port, data) => {
                let value = u32::from_le_bytes(data[..4].try_into()?);
                match port {
                    PORT_ADDR => vmm.request.0 = u64::from(value),
                    PORT_LEN => vmm.request.1 = u64::from(value),
                    PORT_CONVERT => vmm.convert(value),
                    PORT_NOTIFY => device.notify()?,
                    PORT_CHECK => vmm.checks.push(Check {
                        id: value >> 16,
                        expected: (value >> 8) as u8,
                        observed: value as u8,
                    }),
                    PORT_PIN if u64::from(value) == RAM + WINDOW_OFFSET => {
                        device.pin_window(u64::from(value))?
                    }
                    PORT_UNPIN => device.unpin_window(),
                    PORT_DONE => done = true,
                    other => return Err(format!("guest wrote unknown port {other:#x}").into()),
                }
            }
            VcpuExit::IoIn(PORT_RESULT, data) => {
                let code = vmm.answer();
                data.copy_from_slice(&code.to_le_bytes()[..data.len()]);
            }
            VcpuExit::MmioRead(addr, data) => {
                vmm.refused_reads.push(addr);
                data.fill(0xff);
            }
            VcpuExit::MmioWrite(addr, _) => vmm.refused_writes.push(addr),
            VcpuExit::Hlt if done => break,
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
    let guest_time = started.elapsed();
    drop(vcpu);

    let final_attributes = ram.attribute_runs(0, RAM_SIZE)?;
    let report = Report {
        source: store.source_report().to_string(),
        obtained: store.source_report().obtained,
        protection_unit: ram.stats().protection_unit,
        conversions: vmm.conversions,
        checks: vmm.checks,
        refused_reads: vmm.refused_reads,
        refused_writes: vmm.refused_writes,
        device_served: device.served,
        device_refused: std::mem::take(&mut device.refused),
        slots: slots.stats(),
        slot_layout: slots.layout(),
        slot_errors: slots.errors(),
        final_attributes,
        exits,
        guest_time,
        invariants: store.check_invariants().map_err(|e| e.to_string()),
    };
    Ok(report)
}

/// The VMM's state between exits.
struct Vmm<'a> {
    files: &'a [(u64, &'a GuestFile)],
    slots: &'a KvmSlots,
    /// The guest address and length of the next conversion.
    request: (u64, u64),
    /// The last conversion, until the guest reads its result.
    last: Option<Instant>,
    conversions: Vec<Conversion>,
    checks: Vec<Check>,
    refused_reads: Vec<u64>,
    refused_writes: Vec<u64>,
}

impl Vmm<'_> {
    /// The file and offset of a guest range, if one file holds all of it.
    fn locate(&self, gpa: u64, len: u64) -> Option<(&GuestFile, u64)> {
        self.files.iter().find_map(|(base, file)| {
            let offset = gpa.checked_sub(*base)?;
            (offset.checked_add(len)? <= file.size()).then_some((*file, offset))
        })
    }

    fn convert(&mut self, flags: u32) {
        let (gpa, len) = self.request;
        let to = if flags & 1 != 0 {
            Shareability::Private
        } else {
            Shareability::Shared
        };
        let mode = if flags & 2 != 0 {
            ConvertMode::Zero
        } else {
            ConvertMode::Preserve
        };
        let ioctls_before = self.slots.stats().ioctl_time;
        let entered = Instant::now();
        let (outcome, revoked) = match self.locate(gpa, len) {
            Some((file, offset)) => {
                let outcome = file.convert(offset, len, to, mode).map(|done| Blocks {
                    splits: done.splits().map(|r| (r.count(), r.size())).collect(),
                    merges: done.merges().map(|r| (r.count(), r.size())).collect(),
                    unmapped: done.plan.unmap_blocks(),
                    mapped: done.plan.map_blocks(),
                });
                (outcome, file.host_revoked(offset).unwrap_or(false))
            }
            None => (
                // Not inside one file: the guest frame is outside the memory the store manages.
                Err(StoreError::Range(pfnstore::core::RangeError::OutOfBounds {
                    pfn: pfnstore::core::Pfn(gpa / pfnstore::core::PAGE_SIZE),
                })),
                false,
            ),
        };
        let store_time = entered.elapsed();
        let slots = self.slots.stats();
        self.last = Some(entered);
        self.conversions.push(Conversion {
            gpa,
            len,
            to,
            mode,
            outcome,
            store_time,
            round_trip: None,
            revoked,
            slots: slots.live,
            slot_time: slots.ioctl_time - ioctls_before,
        });
    }

    fn answer(&mut self) -> u32 {
        let Some(last) = self.conversions.last_mut() else {
            return 3;
        };
        if let Some(entered) = self.last.take() {
            last.round_trip = Some(entered.elapsed());
        }
        result_code(&last.outcome)
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

fn block(size: PageSize) -> &'static str {
    match size {
        PageSize::Size1G => "1G",
        PageSize::Size2M => "2M",
        _ => "4K",
    }
}

fn runs(list: &[(u64, PageSize)]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(|(n, s)| format!("{n}x{}", block(*s)))
        .collect::<Vec<_>>()
        .join("+")
}

fn micros(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let obtained = self
            .obtained
            .map_or("nothing".to_string(), |p| p.to_string());
        writeln!(
            f,
            "memory: {obtained} pages; protection unit of a file's host mapping {}",
            size(self.protection_unit)
        )?;
        for line in self.source.lines() {
            writeln!(f, "  {line}")?;
        }
        writeln!(
            f,
            "guest: 1 vCPU, 32-bit; files: {} at {LOW:#x}, {} at {RAM:#x}; {} exits in {:.1} ms",
            size(LOW_SIZE),
            size(RAM_SIZE),
            self.exits,
            self.guest_time.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "conversions (store: GuestFile::convert with its subscribers; ioctls: the part of it in KVM_SET_USER_MEMORY_REGION; end to end: guest request to guest reading the result):"
        )?;
        writeln!(
            f,
            "  {:<20} {:<8} {:<9} {:<34} {:<10} {:<10} {:>5} {:>7} {:>9} {:>9} {:>10}",
            "range",
            "to",
            "mode",
            "result",
            "split",
            "merged",
            "slots",
            "revoked",
            "store",
            "ioctls",
            "end to end"
        )?;
        for c in &self.conversions {
            let (result, split, merged) = match &c.outcome {
                Ok(b) => (
                    format!("ok, -{} +{} blocks", b.unmapped, b.mapped),
                    runs(&b.splits),
                    runs(&b.merges),
                ),
                Err(StoreError::Pinned { offset, owner, .. }) => (
                    format!("pinned: {owner} @{offset:#x}"),
                    "-".into(),
                    "-".into(),
                ),
                Err(e) => (format!("refused: {e}"), "-".into(), "-".into()),
            };
            writeln!(
                f,
                "  {:<20} {:<8} {:<9} {:<34} {:<10} {:<10} {:>5} {:>7} {:>9} {:>9} {:>10}",
                format!("{:#x} +{}", c.gpa, size(c.len)),
                format!("{:?}", c.to).to_lowercase(),
                format!("{:?}", c.mode).to_lowercase(),
                result,
                split,
                merged,
                c.slots,
                if c.revoked { "yes" } else { "no" },
                micros(c.store_time),
                micros(c.slot_time),
                c.round_trip.map_or("-".into(), micros),
            )?;
        }
        let bad: Vec<_> = self
            .checks
            .iter()
            .filter(|c| c.expected != c.observed)
            .collect();
        writeln!(
            f,
            "guest checks: {} reported, {} as expected{}",
            self.checks.len(),
            self.checks.len() - bad.len(),
            if bad.is_empty() {
                String::new()
            } else {
                format!(", failed: {bad:?}")
            }
        )?;
        writeln!(
            f,
            "guest accesses to private pages (no slot, answered as MMIO): {} reads {:x?}, {} writes",
            self.refused_reads.len(),
            self.refused_reads,
            self.refused_writes.len()
        )?;
        writeln!(
            f,
            "device (vm-memory adapter): {} requests, {} refused{}",
            self.device_served,
            self.device_refused.len(),
            self.device_refused
                .iter()
                .map(|(gpa, e)| format!(" [{gpa:#x}: {e}]"))
                .collect::<String>()
        )?;
        writeln!(
            f,
            "KVM slots: {} created, {} deleted, {} vetoes, {} now: {}{}",
            self.slots.created,
            self.slots.deleted,
            self.slots.vetoed,
            self.slots.live,
            self.slot_layout
                .iter()
                .map(|(gpa, len)| format!("{gpa:#x}+{}", size(*len)))
                .collect::<Vec<_>>()
                .join(", "),
            if self.slot_errors.is_empty() {
                String::new()
            } else {
                format!("; errors: {:?}", self.slot_errors)
            }
        )?;
        write!(f, "final attributes of the test region:")?;
        for run in &self.final_attributes {
            write!(
                f,
                " [{:#x}..{:#x} {:?}{}{}]",
                run.range.start().byte(),
                run.range.end().byte(),
                run.shareability,
                if run.backed { " backed" } else { " unbacked" },
                if run.pins.is_empty() { "" } else { " pinned" }
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "store invariants: {}",
            match &self.invariants {
                Ok(()) => "hold".to_string(),
                Err(e) => e.clone(),
            }
        )
    }
}
