//! rust-vmm's guest-memory traits over pfnstore files (the `vm-memory` feature).
//!
//! Device code written for [vm-memory](https://docs.rs/vm-memory/0.18) — `read_obj`,
//! `write_obj`, `get_slice`, [`VolatileSlice`], a [`GuestAddressSpace`] such as
//! [`GuestMemoryAtomic`] — reads and writes the *shared* memory of pfnstore files through this
//! module, and gets an error, never the bytes, for a private, quarantined or unbacked range.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use pfnstore::vm_memory::AddressSpace;
//! use pfnstore::FileOptions;
//! use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//! # let store: pfnstore::Store = unimplemented!();
//! let low = store.create_file(FileOptions::new(2 << 20).shared().populated())?;
//! let high = store.create_file(FileOptions::new(1 << 30).populated())?; // all private
//! let space: AddressSpace = AddressSpace::new([(GuestAddress(0), low), (GuestAddress(1 << 32), high)])?;
//! let mem = space.memory(); // what a virtio device holds
//! mem.write_obj(0x1234_u32, GuestAddress(0x1000))?; // shared: done
//! assert!(mem.read_obj::<u32>(GuestAddress(1 << 32)).is_err()); // private: refused
//! # Ok(())
//! # }
//! ```
//!
//! # Design
//!
//! * **Regions are the file's backed extents.** A region of vm-memory is one range of guest
//!   addresses mapped from one file at one offset ([`FileOffset`]): what vhost-user sends to a
//!   backend and what dirty-page code walks. A pfnstore file's memory lies in the store's memfd
//!   in pieces ([`GuestFile::extents`]), so the adapter makes one [`PfnstoreRegion`] per piece
//!   that is contiguous in the memfd, at the file's guest address plus the piece's file offset,
//!   carrying the memfd and the piece's memfd offset. Unbacked offsets are holes between
//!   regions: an access there gets vm-memory's own `InvalidGuestAddress`.
//! * **Layout follows the store's notifications.** [`AddressSpace`] subscribes to its files
//!   and publishes a new snapshot of regions (RCU-like, through [`GuestMemoryAtomic`]) when
//!   memory arrives (populate, replay) or leaves (punch-hole, destroy): a punched range leaves
//!   the snapshot in the `unmap` step, before its memory leaves the file. A region whose
//!   memory did not change is kept as it was (same `Arc`, same dirty bitmap); a region that
//!   appears after the address space was created starts all dirty, since migration code has
//!   never sent it.
//! * **Privacy is checked per access, against the store.** Conversions do not change the
//!   regions (they are in place: same memory, same memfd offsets). Every slice the adapter
//!   hands out — `get_slice`, and through it `read_obj`, `write_obj`, `read_slice`,
//!   `get_slices`, the `GuestMemory` permission API — is checked at that moment with
//!   [`GuestFile::host_view_address`]: every byte shared, backed, not quarantined, and
//!   accessible in the file's host mapping. The check takes the store's shared range lock, so
//!   it is ordered with conversions: it sees the state before a conversion or after it, never
//!   the middle, and waits (briefly) for a conversion of the same chunk under way. Shareability
//!   changes often and in small pieces, and the store already holds it exactly; a copy kept up
//!   to date by a subscriber would be a second truth that can only lag.
//! * **Why `GuestMemoryBackend`, not the new permission API.** vm-memory 0.18 renamed the old
//!   trait to [`GuestMemoryBackend`] and made [`GuestMemory`] (formerly `IoMemory`) the
//!   access-checked one, with [`Permissions`] per access, for IOMMU translation. Every
//!   `GuestMemoryBackend` is a `GuestMemory` through a blanket implementation (so one type
//!   cannot implement both), and only the backend trait carries regions, [`FileOffset`],
//!   `get_slice`, `get_host_address` and dirty bitmaps, which vhost-user and migration code
//!   need. Private memory is neither readable nor writable by the host, so an access mode adds
//!   nothing to "not accessible": the backend refuses the range whatever the mode, and
//!   `GuestMemory::check_range(addr, len, Permissions::Read)` answers `false` for it. A VMM
//!   with a vIOMMU stacks vm-memory's `IommuMemory` on top; the check below it still applies.
//!
//! # Errors
//!
//! A refused access is `GuestMemoryError::IOError` whose source is the store's
//! [`StoreError`] (`PrivateAccess`, `Quarantined`, `NotBacked`, `Destroyed`, ... naming the
//! file, the first offending offset and its frame); [`store_error`] gets it back. The
//! `io::ErrorKind` is `PermissionDenied` for private and quarantined memory, `WouldBlock` when
//! called from inside a subscriber callback on the pages being changed.
//!
//! # Slices taken before a conversion
//!
//! A [`VolatileSlice`] is an address and a length: once handed out, the store cannot take it
//! back. If its memory converts to private (or is punched) while the device still holds it:
//!
//! * where the whole protection unit of the file's mapping (the memfd's page, at least 2 MiB)
//!   became private or unbacked, the store revoked it (`PROT_NONE`), and the next access
//!   through the old slice **faults: the process gets SIGSEGV**. That is the kernel's own answer
//!   for guest_memfd (a host access to memory that became private faults), and it is never
//!   another file's memory: a file's mapping is reserved for the file's whole life;
//! * where the unit still holds a shared page, the mapping stays accessible and the old slice
//!   **still reaches the now-private bytes**: only the API check guards partly private units,
//!   and a slice is past it.
//!
//! So a device must not keep slices across a point where the guest may convert: take them
//! per request (as virtio devices do), or pin what it holds for longer
//! ([`AddressSpace::pin`]): a conversion or punch-hole of a pinned page then fails with
//! [`StoreError::Pinned`] naming the pin's owner and offset, before anything changes.
//!
//! `get_host_address` is checked like `get_slice` (one byte): a raw pointer is for reading
//! and writing. A VMM that registers whole regions with the kernel uses the file's
//! [`GuestFile::host_mapping`] (KVM) or [`PfnstoreRegion::file_offset`] (vhost-user). Note that
//! handing the memfd to another process hands it all the memory in it, private pages of every
//! file included: pfnstore's privacy ends at this process's mappings and API.

use std::fmt;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::vm_memory::bitmap::{BS, Bitmap, NewBitmap};
use ::vm_memory::{
    Address, AtomicAccess, Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic,
    GuestMemoryError, GuestMemoryLoadGuard, GuestMemoryRegion, GuestRegionCollection, GuestUsize,
    MemoryRegionAddress, ReadVolatile, VolatileSlice, WriteVolatile,
};
#[cfg(doc)]
use ::vm_memory::{GuestMemory, GuestMemoryBackend, Permissions};
use pfnstore_core::OffsetRange;
use pfnstore_core::sync::Mutex;

use crate::metadata::conversion::{
    Change, ChangeKind, Interest, Registration, Subscriber, UnmapError,
};
use crate::{FileId, GuestFile, PinOwner, StoreError};

/// vm-memory's guest memory over pfnstore files: a sorted collection of [`PfnstoreRegion`]s
/// (what [`AddressSpace::memory`] hands out a snapshot of).
pub type PfnstoreMemory<B = ()> = GuestRegionCollection<PfnstoreRegion<B>>;

/// A dirty bitmap the adapter can give each region: `()` (no tracking) or vm-memory's
/// `AtomicBitmap`, or any other [`NewBitmap`] that threads can share.
pub trait RegionBitmap: NewBitmap + Send + Sync + 'static {}

impl<B: NewBitmap + Send + Sync + 'static> RegionBitmap for B {}

/// The store's error behind a refused access, if that is why it was refused.
pub fn store_error(e: &GuestMemoryError) -> Option<&StoreError> {
    match e {
        GuestMemoryError::IOError(io) => io.get_ref()?.downcast_ref::<StoreError>(),
        _ => None,
    }
}

fn refused(e: StoreError) -> GuestMemoryError {
    let kind = match e {
        StoreError::PrivateAccess { .. } | StoreError::Quarantined { .. } => {
            io::ErrorKind::PermissionDenied
        }
        StoreError::WouldBlock { .. } | StoreError::Reentrant { .. } => io::ErrorKind::WouldBlock,
        StoreError::NotBacked { .. } => io::ErrorKind::AddrNotAvailable,
        _ => io::ErrorKind::Other,
    };
    GuestMemoryError::IOError(io::Error::new(kind, e))
}

/// A problem with an [`AddressSpace`] itself (its layout, a pin request).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddressSpaceError {
    /// Two files' guest address ranges overlap.
    #[error("the file at {second:#x} overlaps the one at {first:#x}")]
    Overlap {
        /// Guest address of the lower file.
        first: u64,
        /// Guest address of the file that overlaps it.
        second: u64,
    },
    /// A file placed at `base` would reach past the end of the guest address space.
    #[error("a file of {size:#x} bytes at {base:#x} reaches past the end of the address space")]
    AddressOverflow {
        /// Its guest address.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// A request that is not inside one file of the address space.
    #[error("{addr:#x}..+{len:#x} is not inside one file of the address space")]
    NotInOneFile {
        /// Its first guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The store refused (no host memory, a file that is gone, a pinned or private page, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The memfd could not be duplicated for [`FileOffset`].
    #[error("duplicating the store's memfd: {0}")]
    Memfd(#[source] io::Error),
}

/// One piece of a file that is backed and contiguous in the store's memfd, at its guest
/// address (see the [module docs](self)).
pub struct PfnstoreRegion<B = ()> {
    file: GuestFile,
    /// Guest address of the first byte.
    start: GuestAddress,
    /// Byte offset of the first byte in the file.
    offset: u64,
    len: u64,
    /// Address of the first byte in the file's host mapping.
    host: usize,
    memfd: Option<FileOffset>,
    bitmap: B,
}

impl<B> PfnstoreRegion<B> {
    /// The file the region is a piece of.
    pub fn file(&self) -> &GuestFile {
        &self.file
    }

    /// Byte offset of the region's first byte in its file.
    pub fn file_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }

    /// The region's bitmap (for dirty-page code that knows the concrete type).
    pub fn dirty_bitmap(&self) -> &B {
        &self.bitmap
    }

    /// Checks bytes `addr..addr + count` of the region now and returns their host address.
    fn checked(
        &self,
        addr: MemoryRegionAddress,
        count: usize,
    ) -> Result<*mut u8, GuestMemoryError> {
        let at = addr.raw_value();
        let end = at.checked_add(count as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        if count == 0 {
            return Ok((self.host + at as usize) as *mut u8);
        }
        self.file
            .host_view_address(self.offset + at, count as u64)
            .map(|p| p.as_ptr())
            .map_err(refused)
    }

    /// `count` clamped to what is left of the region from `addr`.
    fn clamp(&self, addr: MemoryRegionAddress, count: usize) -> Result<usize, GuestMemoryError> {
        let left = self
            .len
            .checked_sub(addr.raw_value())
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        Ok(count.min(usize::try_from(left).unwrap_or(usize::MAX)))
    }
}

impl<B: Bitmap> GuestMemoryRegion for PfnstoreRegion<B> {
    type B = B;

    fn len(&self) -> GuestUsize {
        self.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, B> {
        self.bitmap.slice_at(0)
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> Result<*mut u8, GuestMemoryError> {
        self.checked(addr, 1)
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.memfd.as_ref()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, B>>, GuestMemoryError> {
        let host = self.checked(offset, count)?;
        // SAFETY: `host..host + count` lies in the file's host mapping (the region is inside
        // the file, `checked` bounded the range by the region), and that mapping is reserved
        // for as long as the file lives; the region holds a handle of the file and the slice
        // borrows the region, so the range stays mapped (accessible or `PROT_NONE`, never
        // someone else's memory) for the slice's whole life. The bytes were checked shared,
        // backed and accessible just now; the guest and the store's own copies access them
        // with volatile or atomic operations only, as `VolatileSlice` requires. What a later
        // conversion does to the slice is in the module docs (a fault, never another file's
        // memory).
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                host,
                count,
                self.bitmap.slice_at(offset.raw_value() as usize),
                None,
            )
        })
    }

    #[cfg(target_os = "linux")]
    fn is_hugetlbfs(&self) -> Option<bool> {
        self.file
            .memfd()
            .map(|m| m.page_size() != pfnstore_hugetlb::HugePageSize::Base4K)
    }
}

/// Every access checked like [`GuestMemoryRegion::get_slice`], never on the whole region at
/// once (vm-memory's default would take the whole region as one slice).
impl<B: Bitmap> Bytes<MemoryRegionAddress> for PfnstoreRegion<B> {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<usize, Self::E> {
        let count = self.clamp(addr, buf.len())?;
        Ok(self.get_slice(addr, count)?.write(&buf[..count], 0)?)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<usize, Self::E> {
        let count = self.clamp(addr, buf.len())?;
        Ok(self.get_slice(addr, count)?.read(&mut buf[..count], 0)?)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<(), Self::E> {
        Ok(self.get_slice(addr, buf.len())?.write_slice(buf, 0)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<(), Self::E> {
        Ok(self.get_slice(addr, buf.len())?.read_slice(buf, 0)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        let count = self.clamp(addr, count)?;
        Ok(self
            .get_slice(addr, count)?
            .read_volatile_from(0, src, count)?)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        Ok(self
            .get_slice(addr, count)?
            .read_exact_volatile_from(0, src, count)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        let count = self.clamp(addr, count)?;
        Ok(self
            .get_slice(addr, count)?
            .write_volatile_to(0, dst, count)?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        Ok(self
            .get_slice(addr, count)?
            .write_all_volatile_to(0, dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<(), Self::E> {
        Ok(self.get_slice(addr, size_of::<T>())?.store(val, 0, order)?)
    }

    fn load<T: AtomicAccess>(
        &self,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<T, Self::E> {
        Ok(self.get_slice(addr, size_of::<T>())?.load(0, order)?)
    }
}

impl<B> fmt::Debug for PfnstoreRegion<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PfnstoreRegion")
            .field("file", &self.file.id())
            .field("start", &format_args!("{:#x}", self.start.0))
            .field("file_offset", &format_args!("{:#x}", self.offset))
            .field("len", &format_args!("{:#x}", self.len))
            .field(
                "memfd_offset",
                &self.memfd.as_ref().map(|m| format!("{:#x}", m.start())),
            )
            .finish_non_exhaustive()
    }
}

/// The guest address space of a VM whose memory is pfnstore files: one file per memory
/// region, each at its guest address. It is a [`GuestAddressSpace`] (cheap to clone; hand it
/// to devices where they take a `GuestMemoryAtomic`), keeps its snapshot of regions up to date
/// with the files' backing, and lets devices pin what they hold (see the
/// [module docs](self)). `B` is the dirty bitmap of each region (`()` for none, vm-memory's
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
        let (file, offset) = self.locate(addr).ok_or_else(|| not_inside)?;
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
            .map_or(0, |h| h.addr.as_ptr() as usize + offset as usize);
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
