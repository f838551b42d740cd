//! The address space: files at guest addresses, the snapshot of their regions (kept up to
//! date by a subscriber on populate, punch-hole and replay), and device pins.

use std::fmt;
use std::fs::File;
use std::sync::Arc;

use ::vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
};
use pfnstore_core::OffsetRange;
use pfnstore_core::sync::Mutex;

use super::{AddressSpaceError, PfnstoreMemory, PfnstoreRegion, RegionBitmap};
use crate::metadata::conversion::{
    Change, ChangeKind, Interest, Registration, Subscriber, UnmapError,
};
use crate::{FileId, GuestFile, PinOwner, StoreError};

/// The guest address space of a VM whose memory is pfnstore files: one file per memory
/// region, each at its guest address. It is a [`GuestAddressSpace`] (cheap to clone; hand it
/// to devices where they take a `GuestMemoryAtomic`), keeps its snapshot of regions up to date
/// with the files' backing, and lets devices pin what they hold (see the
/// [module docs](super)). `B` is the dirty bitmap of each region (`()` for none, vm-memory's
/// `AtomicBitmap` to track writes).
pub struct AddressSpace<B: RegionBitmap = ()> {
    inner: Arc<Inner<B>>,
}

struct Inner<B: RegionBitmap> {
    tracker: Arc<Tracker<B>>,
    /// Field order is drop order: unregister before the tracker goes.
    _registrations: Vec<Registration>,
}

/// The subscriber that keeps the snapshot's regions equal to the files' backed extents.
struct Tracker<B: RegionBitmap> {
    atomic: GuestMemoryAtomic<PfnstoreMemory<B>>,
    layout: Mutex<Layout<B>>,
}

struct Layout<B> {
    files: Vec<Placed<B>>,
    /// Regions made from now on start dirty (they appeared after the VMM first saw memory).
    started: bool,
}

/// One file at its guest address.
struct Placed<B> {
    file: GuestFile,
    base: u64,
    /// The memfd, duplicated once, for the regions' [`FileOffset`]s.
    memfd: Option<Arc<File>>,
    regions: Vec<Arc<PfnstoreRegion<B>>>,
    /// Ranges being punched: out of the snapshot from `unmap` until the punch ends.
    punching: Vec<OffsetRange>,
}

impl<B: RegionBitmap> AddressSpace<B> {
    /// An address space of `files`, each at its guest address. Files may come from different
    /// stores; each store must have host memory. Subscribes to every file (so the regions
    /// follow populate and punch-hole) and builds the first snapshot.
    pub fn new(
        files: impl IntoIterator<Item = (GuestAddress, GuestFile)>,
    ) -> Result<AddressSpace<B>, AddressSpaceError> {
        let mut placed = Vec::new();
        for (base, file) in files {
            let size = file.size();
            if base.0.checked_add(size).is_none() {
                return Err(AddressSpaceError::AddressOverflow { base: base.0, size });
            }
            if file.host_mapping().is_none() {
                return Err(StoreError::NoHostMemory {
                    what: "a vm-memory region",
                }
                .into());
            }
            let memfd = match file.memfd() {
                Some(memfd) => Some(Arc::new(File::from(
                    memfd
                        .fd()
                        .try_clone_to_owned()
                        .map_err(AddressSpaceError::Memfd)?,
                ))),
                None => None,
            };
            placed.push(Placed {
                file,
                base: base.0,
                memfd,
                regions: Vec::new(),
                punching: Vec::new(),
            });
        }
        let mut ids: Vec<FileId> = placed.iter().map(|p| p.file.id()).collect();
        ids.sort_unstable();
        if let Some(twice) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(AddressSpaceError::FileTwice { file: twice[0] });
        }
        placed.sort_by_key(|p| p.base);
        for pair in placed.windows(2) {
            if pair[0].base + pair[0].file.size() > pair[1].base {
                return Err(AddressSpaceError::Overlap {
                    first: pair[0].base,
                    second: pair[1].base,
                });
            }
        }
        let targets: Vec<GuestFile> = placed.iter().map(|p| p.file.clone()).collect();
        let tracker = Arc::new(Tracker {
            atomic: GuestMemoryAtomic::new(PfnstoreMemory::new()),
            layout: Mutex::new(Layout {
                files: placed,
                started: false,
            }),
        });
        let as_subscriber: Arc<dyn Subscriber> = tracker.clone();
        let mut registrations = Vec::with_capacity(targets.len());
        for file in &targets {
            // The registration replays what is backed now, which builds the file's regions.
            registrations.push(
                file.store()
                    .subscribe(&as_subscriber, Interest::File(file.id()))?,
            );
        }
        for file in &targets {
            tracker.rebuild(file.id());
        }
        tracker.layout.lock().started = true;
        Ok(AddressSpace {
            inner: Arc::new(Inner {
                tracker,
                _registrations: registrations,
            }),
        })
    }

    /// The snapshot of regions as a [`GuestMemoryAtomic`], for code that names that type.
    pub fn atomic(&self) -> GuestMemoryAtomic<PfnstoreMemory<B>> {
        self.inner.tracker.atomic.clone()
    }

    /// The file at guest address `addr`, and the byte offset of `addr` in it.
    pub fn locate(&self, addr: GuestAddress) -> Option<(GuestFile, u64)> {
        let layout = self.inner.tracker.layout.lock();
        layout
            .files
            .iter()
            .find(|p| addr.0 >= p.base && addr.0 - p.base < p.file.size())
            .map(|p| (p.file.clone(), addr.0 - p.base))
    }

    /// Pins `addr..addr + len` (4 KiB aligned, backed, inside one file) for `owner`, a device
    /// that holds slices of it for longer than one request: conversions and punch-holes of the
    /// pages fail with [`StoreError::Pinned`] naming `owner` until the returned pin is
    /// dropped.
    pub fn pin(
        &self,
        addr: GuestAddress,
        len: u64,
        owner: PinOwner,
    ) -> Result<DevicePin, AddressSpaceError> {
        let not_inside = AddressSpaceError::NotInOneFile { addr: addr.0, len };
        let (file, offset) = self.locate(addr).ok_or(not_inside)?;
        if offset.checked_add(len).is_none_or(|end| end > file.size()) {
            return Err(AddressSpaceError::NotInOneFile { addr: addr.0, len });
        }
        file.pin(offset, len, owner)?;
        Ok(DevicePin {
            file,
            offset,
            len,
            owner,
        })
    }
}

impl<B: RegionBitmap> Clone for AddressSpace<B> {
    fn clone(&self) -> Self {
        AddressSpace {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: RegionBitmap> GuestAddressSpace for AddressSpace<B> {
    type M = PfnstoreMemory<B>;
    type T = GuestMemoryLoadGuard<PfnstoreMemory<B>>;

    fn memory(&self) -> Self::T {
        self.inner.tracker.atomic.memory()
    }
}

impl<B: RegionBitmap> fmt::Debug for AddressSpace<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = self.inner.tracker.layout.lock();
        let mut list = f.debug_list();
        for placed in &layout.files {
            list.entry(&format_args!(
                "{} at {:#x}: {} regions",
                placed.file.id(),
                placed.base,
                placed.regions.len()
            ));
        }
        list.finish()
    }
}

/// A device's pin on guest memory ([`AddressSpace::pin`]); dropping it unpins.
#[derive(Debug)]
pub struct DevicePin {
    file: GuestFile,
    offset: u64,
    len: u64,
    owner: PinOwner,
}

impl DevicePin {
    /// The pinned bytes, as offsets in their file.
    pub fn file_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }

    /// The file they are in.
    pub fn file(&self) -> &GuestFile {
        &self.file
    }

    /// Who holds the pin.
    pub fn owner(&self) -> PinOwner {
        self.owner
    }
}

impl Drop for DevicePin {
    fn drop(&mut self) {
        // Fails only if the file is gone (destroyed files have no pins left to drop).
        let _ = self.file.unpin(self.offset, self.len, self.owner);
    }
}

impl<B: RegionBitmap> Tracker<B> {
    /// Makes the regions of `file` its backed extents now, minus what is being punched, and
    /// publishes a new snapshot.
    fn rebuild(&self, file: FileId) {
        let mut layout = self.layout.lock();
        let started = layout.started;
        let Some(placed) = layout.files.iter_mut().find(|p| p.file.id() == file) else {
            return;
        };
        // A file that is gone (destroyed) has no memory any more: no regions.
        let extents = placed.file.extents().unwrap_or_default();
        let mut regions = Vec::with_capacity(extents.len());
        for extent in extents {
            for (offset, len, memfd_offset) in without(
                (extent.offset, extent.len, extent.memfd_offset),
                &placed.punching,
            ) {
                regions.push(placed.region(offset, len, memfd_offset, started));
            }
        }
        placed.regions = regions;
        let all: Vec<_> = layout
            .files
            .iter()
            .flat_map(|p| p.regions.iter().cloned())
            .collect();
        // Sorted and disjoint by construction (files are sorted and disjoint, extents too).
        let snapshot = PfnstoreMemory::from_arc_regions(all).unwrap_or_default();
        match self.atomic.lock() {
            Ok(guard) => guard.replace(snapshot),
            Err(poisoned) => poisoned.into_inner().replace(snapshot),
        }
    }

    fn punching(&self, change: &Change<'_>, starts: bool) {
        {
            let mut layout = self.layout.lock();
            if let Some(placed) = layout.files.iter_mut().find(|p| p.file.id() == change.file) {
                if starts {
                    placed.punching.push(change.range);
                } else if let Some(i) = placed.punching.iter().position(|r| *r == change.range) {
                    placed.punching.remove(i);
                }
            }
        }
        self.rebuild(change.file);
    }
}

impl<B: RegionBitmap> Placed<B> {
    /// The region for `len` bytes at file offset `offset` (memfd offset `memfd_offset`): the
    /// one there already if it is the same memory, else a new one.
    fn region(
        &self,
        offset: u64,
        len: u64,
        memfd_offset: u64,
        dirty: bool,
    ) -> Arc<PfnstoreRegion<B>> {
        let same = |r: &&Arc<PfnstoreRegion<B>>| {
            r.offset == offset
                && r.len == len
                && r.memfd.as_ref().is_none_or(|m| m.start() == memfd_offset)
        };
        if let Some(existing) = self.regions.iter().find(same) {
            return Arc::clone(existing);
        }
        let host = self
            .file
            .host_mapping()
            .map_or(0, |h| h.as_ptr() as usize + offset as usize);
        let bitmap = B::with_len(len as usize);
        if dirty {
            bitmap.mark_dirty(0, len as usize);
        }
        Arc::new(PfnstoreRegion {
            file: self.file.clone(),
            start: GuestAddress(self.base + offset),
            offset,
            len,
            host,
            memfd: self
                .memfd
                .as_ref()
                .map(|f| FileOffset::from_arc(Arc::clone(f), memfd_offset)),
            bitmap,
        })
    }
}

/// The pieces of extent `(offset, len, memfd_offset)` outside every range of `holes`.
fn without(extent: (u64, u64, u64), holes: &[OffsetRange]) -> Vec<(u64, u64, u64)> {
    let mut pieces = vec![extent];
    for hole in holes {
        let (h0, h1) = (hole.start().byte(), hole.end().byte());
        pieces = pieces
            .into_iter()
            .flat_map(|(o, l, m)| {
                let end = o + l;
                let mut out = Vec::with_capacity(2);
                if h1 <= o || h0 >= end {
                    out.push((o, l, m));
                } else {
                    if h0 > o {
                        out.push((o, h0 - o, m));
                    }
                    if h1 < end {
                        out.push((h1, end - h1, m + (h1 - o)));
                    }
                }
                out
            })
            .collect();
    }
    pieces
}

/// Conversions change no region (they are in place; every access is checked against the
/// store), so only populations, punch-holes and the replay are followed.
impl<B: RegionBitmap> Subscriber for Tracker<B> {
    fn name(&self) -> &str {
        "vm-memory"
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if change.kind == ChangeKind::Punch {
            // Out of the snapshot before the memory leaves the file.
            self.punching(change, true);
        }
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        match change.kind {
            ChangeKind::Punch => self.punching(change, false),
            ChangeKind::Populate | ChangeKind::Replay => self.rebuild(change.file),
            _ => {}
        }
    }

    fn restore(&self, _change: &Change<'_>) -> Result<(), UnmapError> {
        // The memory stays; `abort` follows and puts the regions back.
        Ok(())
    }

    fn abort(&self, change: &Change<'_>) {
        if change.kind == ChangeKind::Punch {
            self.punching(change, false);
        }
    }
}
