//! The life of the demo's VMs: boot, swiotlb and vCPU pages, bounce buffers with pins,
//! vetoes and a device that fails to unmap, then the teardown of one VM and the reuse of its
//! memory by the next.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pfnstore::core::PageSize;
use pfnstore::core::testing::XorShift;
use pfnstore::subscribers::{DmaPolicy, IommuMapper, KvmMmu, MapperStats, Misbehaviour};
use pfnstore::{
    Change, ChangeOutcome, ConvertMode, FileOptions, GuestFile, Interest, OffsetRange, PageOffset,
    PinOwner, Registration, Shareability, Store, StoreError, Subscriber, UnmapError, Veto,
};

use super::Args;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Time samples per kind of operation, in nanoseconds.
#[derive(Debug, Default)]
pub(super) struct Timings(pub BTreeMap<&'static str, Vec<u64>>);

impl Timings {
    fn time<T>(&mut self, what: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let result = f();
        self.0
            .entry(what)
            .or_default()
            .push(start.elapsed().as_nanos() as u64);
        result
    }
}

/// What happened, for the report and the pictures.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub timings: Timings,
    pub conversions: u64,
    pub refused_pinned: u64,
    pub refused_vetoed: u64,
    pub quarantined_pages: u64,
    pub split_blocks: u64,
    pub merged_blocks: u64,
    pub vfio: MapperStats,
    pub per_page: MapperStats,
    pub vms: Vec<GuestFile>,
    /// Pages of the torn-down VM that the next one got after a scrub.
    pub scrubbed_pages: u64,
    /// Whether the next VM read zeros from the memory it inherited (`None`: no bytes).
    pub reused_reads_zero: Option<bool>,
    pub problems: Vec<String>,
}

/// Vetoes every `every`-th conversion it is asked about (a device that is busy now and then).
#[derive(Debug)]
struct Vetoer {
    every: u64,
    asked: AtomicU64,
}

impl Subscriber for Vetoer {
    fn name(&self) -> &str {
        "busy-device"
    }
    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        if self.asked.fetch_add(1, Ordering::Relaxed) % self.every == self.every - 1 {
            return Err(Veto::at(change.range.start(), "busy, try again"));
        }
        Ok(())
    }
    fn unmap(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
    fn map(&self, _: &Change<'_>) {}
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

/// One VM: its file and where its shared memory is.
struct Vm {
    file: GuestFile,
    swiotlb: OffsetRange,
    owner: PinOwner,
}

/// Runs the life of `args.vms` VMs on `store`.
pub(super) fn run(
    store: &Store,
    args: &Args,
    out: &mut dyn Write,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut outcome = Outcome::default();
    let geometry = store.geometry();
    let kvm = Arc::new(KvmMmu::lazy("kvm", store));
    let vfio = Arc::new(IommuMapper::with_policy(
        "vfio",
        geometry,
        DmaPolicy::Runs(PageSize::Size2M),
    ));
    let per_page = Arc::new(IommuMapper::with_policy(
        "per-4k",
        geometry,
        DmaPolicy::PerPage,
    ));
    let flaky = Arc::new(IommuMapper::new("flaky-device", geometry));
    let vetoer = Arc::new(Vetoer {
        every: 97,
        asked: AtomicU64::new(0),
    });
    let subscribers: [Arc<dyn Subscriber>; 5] = [
        kvm.clone(),
        vfio.clone(),
        per_page.clone(),
        flaky.clone(),
        vetoer,
    ];
    let _registrations: Vec<Registration> = subscribers
        .iter()
        .map(|s| store.subscribe(s, Interest::All))
        .collect::<Result<_, _>>()?;

    // Whole GiB each where the store allows, else whole 2 MiB.
    let share = store.capacity() / args.vms;
    let unit = if share >= GIB { GIB } else { 2 * MIB };
    let vm_size = (share / unit * unit).max(2 * MIB);
    let mut rng = XorShift::new(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut vms = Vec::new();
    for i in 0..args.vms {
        vms.push(boot(
            store,
            &mut outcome,
            vm_size,
            args.vcpus,
            i,
            &kvm,
            &mut rng,
        )?);
    }
    writeln!(
        out,
        "booted {} VMs of {} each, all private; a 64 MiB swiotlb and {} vCPU pages shared per VM",
        args.vms,
        super::units::Bytes(vm_size),
        args.vcpus
    )?;

    bounce_buffers(store, args, &vms, &flaky, &kvm, &mut rng, &mut outcome)?;
    writeln!(
        out,
        "{} bounce-buffer conversions: {} refused while pinned, {} vetoed, {} pages quarantined",
        outcome.conversions,
        outcome.refused_pinned,
        outcome.refused_vetoed,
        outcome.quarantined_pages
    )?;

    // Teardown of the first VM, and a new one on its memory.
    let gone = vms.remove(0);
    let dirty_before = store.stats().allocator.total.dirty_pages;
    outcome
        .timings
        .time("teardown (punch + free)", || gone.file.destroy())?;
    let after = store.stats().allocator.total;
    let dirty_after_teardown = after.dirty_pages;
    // The next VM gets what is free (less than the old one's memory by what was quarantined).
    let next_size = (after.free_pages * PAGE / (2 * MIB) * (2 * MIB)).min(vm_size);
    let next = boot(
        store,
        &mut outcome,
        next_size,
        args.vcpus,
        args.vms,
        &kvm,
        &mut rng,
    )?;
    let dirty_now = store.stats().allocator.total.dirty_pages;
    outcome.scrubbed_pages = dirty_after_teardown.saturating_sub(dirty_now);
    outcome.reused_reads_zero = reads_zero(store, &next.file, &mut rng, &mut outcome)?;
    writeln!(
        out,
        "tore down VM 0 ({} freed, dirty), booted VM {} on {} of it, scrubbed first{}",
        super::units::Bytes((dirty_after_teardown - dirty_before) * PAGE),
        args.vms,
        super::units::Bytes(outcome.scrubbed_pages * PAGE),
        match outcome.reused_reads_zero {
            Some(true) => ": it reads zeros",
            Some(false) => ": it read NON-ZERO bytes (a bug)",
            None => " (synthetic memory: no bytes to read)",
        }
    )?;
    vms.push(next);

    outcome.vfio = vfio.stats();
    outcome.per_page = per_page.stats();
    outcome.problems = vfio
        .violations()
        .into_iter()
        .chain(flaky.violations())
        .chain(kvm.violations())
        .chain(kvm.audit())
        .collect();
    outcome.vms = vms.into_iter().map(|vm| vm.file).collect();
    Ok(outcome)
}

fn boot(
    store: &Store,
    outcome: &mut Outcome,
    size: u64,
    vcpus: u64,
    index: u64,
    kvm: &KvmMmu,
    rng: &mut XorShift,
) -> Result<Vm, StoreError> {
    let file = store.create_file(FileOptions::new(size))?;
    outcome
        .timings
        .time("boot: populate", || file.populate(0, size))?;
    // The guest touches some of its memory: KVM faults.
    for _ in 0..64 {
        let page = rng.below(size / PAGE);
        outcome.timings.time("KVM fault", || {
            kvm.fault(file.id(), page * PAGE, Shareability::Private)
        })?;
    }
    let swiotlb_start = (size / 2) / (2 * MIB) * (2 * MIB);
    let swiotlb_len = (64 * MIB).min(size / 4);
    let swiotlb = OffsetRange::from_len(PageOffset::from_byte(swiotlb_start), swiotlb_len / PAGE)?;
    share(outcome, &file, swiotlb_start, swiotlb_len)?;
    for cpu in 0..vcpus {
        let offset = (cpu + 1) * 16 * MIB % (size / 2) + cpu * PAGE;
        share(outcome, &file, offset, PAGE)?;
    }
    Ok(Vm {
        file,
        swiotlb,
        owner: PinOwner(index as u32 + 1),
    })
}

/// Converts `offset..offset + len` of `file` to shared (zeroed), asking again when the busy
/// device vetoes (it does now and then).
fn share(outcome: &mut Outcome, file: &GuestFile, offset: u64, len: u64) -> Result<(), StoreError> {
    loop {
        match outcome.timings.time("convert to shared", || {
            file.convert(offset, len, Shareability::Shared, ConvertMode::Zero)
        }) {
            Ok(done) => {
                count(outcome, &done);
                return Ok(());
            }
            Err(StoreError::Vetoed { .. }) => outcome.refused_vetoed += 1,
            Err(e) => return Err(e),
        }
    }
}

fn count(outcome: &mut Outcome, done: &ChangeOutcome) {
    outcome.split_blocks += done.split_blocks();
    outcome.merged_blocks += done.merged_blocks();
}

#[allow(clippy::too_many_arguments)]
fn bounce_buffers(
    store: &Store,
    args: &Args,
    vms: &[Vm],
    flaky: &IommuMapper,
    kvm: &KvmMmu,
    rng: &mut XorShift,
    outcome: &mut Outcome,
) -> Result<(), StoreError> {
    let bar = ProgressBar::with_draw_target(Some(args.conversions), ProgressDrawTarget::hidden());
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} conversions, {elapsed}") {
        bar.set_style(style);
    }
    let started = Instant::now();
    let mut shown = false;
    // Buffers a device holds pinned, released a while later.
    let mut pinned: VecDeque<(usize, u64, u64)> = VecDeque::new();
    let quarantine_at = args.conversions / 2;
    for i in 0..args.conversions {
        if !shown && started.elapsed() > Duration::from_secs(1) {
            // Work longer than a second gets a progress bar (on a terminal only).
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        let which = rng.below(vms.len() as u64) as usize;
        let vm = &vms[which];
        let size = vm.file.size();
        let len = PAGE << rng.below(10);
        let offset = rng.below(size / len) * len;
        let range = OffsetRange::from_len(PageOffset::from_byte(offset), len / PAGE)?;
        if range.overlaps(&vm.swiotlb) {
            continue;
        }
        if i == quarantine_at {
            // A device that can neither unmap this buffer nor map it back.
            flaky.inject(Misbehaviour::fail_unmap(range, true));
        }
        outcome.conversions += 1;
        match outcome.timings.time("convert to shared", || {
            vm.file
                .convert(offset, len, Shareability::Shared, ConvertMode::Preserve)
        }) {
            Ok(done) => count(outcome, &done),
            Err(StoreError::Vetoed { .. }) => {
                outcome.refused_vetoed += 1;
                continue;
            }
            Err(StoreError::UnmapFailed { quarantined, .. }) => {
                outcome.quarantined_pages +=
                    quarantined.iter().map(|(a, b)| (b - a) / PAGE).sum::<u64>();
                flaky.inject(Misbehaviour::none());
                continue;
            }
            Err(StoreError::Pinned { .. } | StoreError::Quarantined { .. }) => {
                outcome.refused_pinned += 1;
                continue;
            }
            Err(e) => return Err(e),
        }
        if store.has_host_memory() {
            let stamp = [0xA5u8; 64];
            outcome
                .timings
                .time("host write 64 B", || vm.file.write(offset, &stamp))?;
        }
        let page = offset / PAGE + rng.below(len / PAGE);
        outcome.timings.time("KVM fault", || {
            kvm.fault(vm.file.id(), page * PAGE, Shareability::Shared)
        })?;
        if rng.below(20) == 0 {
            outcome
                .timings
                .time("pin", || vm.file.pin(offset, len, vm.owner))?;
            pinned.push_back((which, offset, len));
        }
        back_to_private(outcome, vm, offset, len)?;
        if pinned.len() > 8 {
            release(outcome, vms, &mut pinned)?;
        }
        bar.inc(1);
    }
    release(outcome, vms, &mut pinned)?;
    bar.finish_and_clear();
    Ok(())
}

/// The device lets go of the buffers it pinned; they go back to private.
fn release(
    outcome: &mut Outcome,
    vms: &[Vm],
    pinned: &mut VecDeque<(usize, u64, u64)>,
) -> Result<(), StoreError> {
    while let Some((which, offset, len)) = pinned.pop_front() {
        let vm = &vms[which];
        outcome
            .timings
            .time("unpin", || vm.file.unpin(offset, len, vm.owner))?;
        back_to_private(outcome, vm, offset, len)?;
    }
    Ok(())
}

/// Converts a bounce buffer back to private, its bytes in place (the guest keeps them):
/// refused while a device pins it.
fn back_to_private(
    outcome: &mut Outcome,
    vm: &Vm,
    offset: u64,
    len: u64,
) -> Result<(), StoreError> {
    match outcome.timings.time("convert to private", || {
        vm.file
            .convert(offset, len, Shareability::Private, ConvertMode::Zero)
    }) {
        Ok(done) => {
            count(outcome, &done);
            Ok(())
        }
        Err(StoreError::Pinned { .. }) => {
            outcome.refused_pinned += 1;
            Ok(())
        }
        Err(StoreError::Vetoed { .. }) => {
            outcome.refused_vetoed += 1;
            // Try once more: the device is busy only now and then.
            back_to_private(outcome, vm, offset, len)
        }
        Err(StoreError::Quarantined { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Converts a sample of pages of `file` to shared and reads them: memory that came from
/// another VM must read as zeros. `None` for a store without bytes.
fn reads_zero(
    store: &Store,
    file: &GuestFile,
    rng: &mut XorShift,
    outcome: &mut Outcome,
) -> Result<Option<bool>, StoreError> {
    if !store.has_host_memory() {
        return Ok(None);
    }
    let mut zero = true;
    for _ in 0..64 {
        let offset = rng.below(file.size() / PAGE) * PAGE;
        if file.shareability(offset)? == Shareability::Private {
            // Preserve: whatever the memory holds must already be zeros.
            loop {
                match file.convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve) {
                    Err(StoreError::Vetoed { .. }) => outcome.refused_vetoed += 1,
                    other => break other.map(drop)?,
                }
            }
        }
        let mut buf = vec![0u8; PAGE as usize];
        file.read(offset, &mut buf)?;
        zero &= buf.iter().all(|b| *b == 0);
    }
    Ok(Some(zero))
}
