//! The KVM-slot subscriber: keeps the VM's memory slots equal to the shared, backed runs of
//! each file's plans.
//!
//! Without private memory attributes (`KVM_SET_MEMORY_ATTRIBUTES` with
//! `KVM_MEMORY_ATTRIBUTE_PRIVATE`, which this kernel's KVM does not offer for ordinary VMs),
//! KVM maps guest memory only through the host mapping of a slot, so the one thing a VMM can
//! do for a private range is take it away from the guest's shared view. The store already
//! revokes (`PROT_NONE`) every protection unit of a file that holds no shared page, and the
//! kernel's MMU notifier zaps KVM's translations of it. That does nothing for a 4 KiB page
//! converted inside a unit that stays shared (a 1 GiB hugetlb page, or 2 MiB on the
//! fallbacks). So this subscriber re-registers slots: every slot covers one maximal run of
//! shared, backed offsets of one file, at the file's guest address, over the file's host
//! mapping. A guest access to a private page then finds no slot and reaches the VMM as an
//! MMIO exit, which is what a confidential guest's shared access to a private page is
//! (`KVM_EXIT_MEMORY_FAULT` there).
//!
//! The steps, per change: `unmap` deletes the slots that overlap the plan's region (before
//! the store revokes anything or the metadata flips) and re-creates their parts outside it;
//! `map` adds the plan's shared runs and merges them with the slots they touch; `restore`
//! puts the old shared runs back; `prepare` vetoes a conversion that could need more slots
//! than KVM has. KVM keeps huge mappings inside a slot, so cutting a 4 KiB hole into a
//! 1 GiB slot leaves the rest mapped with 2 MiB pages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use pfnstore::{Change, FileId, GuestFile, PlanEntry, Shareability, Subscriber, UnmapError, Veto};

/// Counts of what the subscriber did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SlotStats {
    /// Slots created.
    pub created: u64,
    /// Slots deleted.
    pub deleted: u64,
    /// Slots present now.
    pub live: usize,
    /// Conversions vetoed for want of slots.
    pub vetoed: u64,
    /// Time spent in `KVM_SET_USER_MEMORY_REGION`.
    pub ioctl_time: Duration,
}

/// The subscriber (see the module docs).
pub(crate) struct KvmSlots {
    vm: Arc<VmFd>,
    max_slots: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    files: BTreeMap<FileId, FileSlots>,
    free: Vec<u32>,
    next: u32,
    stats: SlotStats,
    errors: Vec<String>,
}

struct FileSlots {
    /// Holds the file (and so its host mapping) for as long as slots may point into it.
    _file: GuestFile,
    gpa: u64,
    host: u64,
    /// File byte offset -> (bytes, slot).
    slots: BTreeMap<u64, (u64, u32)>,
}

impl KvmSlots {
    /// A subscriber for `vm`, which has `max_slots` slots.
    pub(crate) fn new(vm: Arc<VmFd>, max_slots: usize) -> KvmSlots {
        KvmSlots {
            vm,
            max_slots,
            state: Mutex::new(State::default()),
        }
    }

    /// Places `file` at guest address `gpa`; its slots are made when the store replays it
    /// (subscribe after this).
    pub(crate) fn add_file(&self, gpa: u64, file: &GuestFile) {
        let host = file
            .host_mapping()
            .expect("a file with host memory")
            .as_ptr() as u64;
        self.state.lock().unwrap().files.insert(
            file.id(),
            FileSlots {
                _file: file.clone(),
                gpa,
                host,
                slots: BTreeMap::new(),
            },
        );
    }

    /// What the subscriber did so far.
    pub(crate) fn stats(&self) -> SlotStats {
        let state = self.state.lock().unwrap();
        SlotStats {
            live: state.files.values().map(|f| f.slots.len()).sum(),
            ..state.stats
        }
    }

    /// The slots now: (guest address, bytes), ascending.
    pub(crate) fn layout(&self) -> Vec<(u64, u64)> {
        let state = self.state.lock().unwrap();
        let mut out: Vec<(u64, u64)> = state
            .files
            .values()
            .flat_map(|f| f.slots.iter().map(|(off, (len, _))| (f.gpa + off, *len)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Failed ioctls (none expected).
    pub(crate) fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    fn set(&self, state: &mut State, slot: u32, gpa: u64, host: u64, len: u64) {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        let started = Instant::now();
        // SAFETY: `host..host + len` lies in the host mapping of a file this subscriber holds
        // a handle of (`FileSlots::_file`), which stays reserved for the file's whole life, and
        // the subscriber deletes every slot it made before it lets the handle go (`Drop`).
        // The run is shared and backed, so the mapping is accessible there now; if it stops
        // being so, the store's plans delete the slot first. A size of 0 deletes the slot.
        let result = unsafe { self.vm.set_user_memory_region(region) };
        state.stats.ioctl_time += started.elapsed();
        if let Err(e) = result {
            state.errors.push(format!(
                "KVM_SET_USER_MEMORY_REGION slot {slot} {gpa:#x}+{len:#x}: {e}"
            ));
        }
    }

    fn create(&self, state: &mut State, file: FileId, offset: u64, len: u64) {
        let slot = state.free.pop().unwrap_or_else(|| {
            state.next += 1;
            state.next - 1
        });
        let Some(f) = state.files.get(&file) else {
            return;
        };
        let (gpa, host) = (f.gpa + offset, f.host + offset);
        self.set(state, slot, gpa, host, len);
        state.stats.created += 1;
        if let Some(f) = state.files.get_mut(&file) {
            f.slots.insert(offset, (len, slot));
        }
    }

    fn delete(&self, state: &mut State, file: FileId, offset: u64) -> Option<u64> {
        let (len, slot) = state.files.get_mut(&file)?.slots.remove(&offset)?;
        self.set(state, slot, 0, 0, 0);
        state.free.push(slot);
        state.stats.deleted += 1;
        Some(len)
    }

    /// Takes `start..end` of `file` out of the slots.
    fn remove(&self, state: &mut State, file: FileId, start: u64, end: u64) {
        let Some(f) = state.files.get(&file) else {
            return;
        };
        let hit: Vec<(u64, u64)> = f
            .slots
            .iter()
            .filter(|(off, (len, _))| **off < end && **off + *len > start)
            .map(|(off, (len, _))| (*off, *len))
            .collect();
        for (off, len) in hit {
            self.delete(state, file, off);
            if off < start {
                self.create(state, file, off, start - off);
            }
            if off + len > end {
                self.create(state, file, end, off + len - end);
            }
        }
    }

    /// Adds `start..end` of `file` to the slots, merged with the slots it touches.
    fn add(&self, state: &mut State, file: FileId, start: u64, end: u64) {
        let Some(f) = state.files.get(&file) else {
            return;
        };
        let touching: Vec<(u64, u64)> = f
            .slots
            .iter()
            .filter(|(off, (len, _))| **off <= end && **off + *len >= start)
            .map(|(off, (len, _))| (*off, *len))
            .collect();
        let (mut lo, mut hi) = (start, end);
        for (off, len) in touching {
            self.delete(state, file, off);
            lo = lo.min(off);
            hi = hi.max(off + len);
        }
        self.create(state, file, lo, hi - lo);
    }

    fn add_shared(&self, change: &Change<'_>, entries: &[PlanEntry]) {
        let geometry = change.plan.geometry();
        let mut state = self.state.lock().unwrap();
        // Merge the plan's shared entries into runs first: one slot per run, not per block.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for entry in entries
            .iter()
            .filter(|e| e.shareability == Shareability::Shared)
        {
            let range = entry.run.range(&geometry);
            let (s, e) = (range.start().byte(), range.end().byte());
            match runs.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => runs.push((s, e)),
            }
        }
        for (s, e) in runs {
            self.add(&mut state, change.file, s, e);
        }
    }
}

impl Subscriber for KvmSlots {
    fn name(&self) -> &str {
        "kvm-slots"
    }

    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        let mut state = self.state.lock().unwrap();
        let live: usize = state.files.values().map(|f| f.slots.len()).sum();
        // The worst case: every map entry a slot of its own, plus the two ends of the region.
        let need = live + change.plan.map().len() + 2;
        if need > self.max_slots {
            state.stats.vetoed += 1;
            return Err(Veto::new(format!(
                "KVM has {} memory slots; this conversion could need {need}",
                self.max_slots
            )));
        }
        Ok(())
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if let Some(region) = change.plan.region() {
            let mut state = self.state.lock().unwrap();
            self.remove(
                &mut state,
                change.file,
                region.start().byte(),
                region.end().byte(),
            );
        }
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        self.add_shared(change, change.plan.map());
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.add_shared(change, change.plan.unmap());
        Ok(())
    }
}

impl Drop for KvmSlots {
    fn drop(&mut self) {
        let mut state = std::mem::take(&mut *self.state.lock().unwrap());
        let all: Vec<(FileId, u64)> = state
            .files
            .iter()
            .flat_map(|(id, f)| f.slots.keys().map(move |off| (*id, *off)))
            .collect();
        for (file, offset) in all {
            self.delete(&mut state, file, offset);
        }
        // Only now do the file handles go (with `state`).
    }
}
