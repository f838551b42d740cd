//! rust-vmm's guest-memory traits over pfnstore files (the `vm-memory` feature).
//!
//! Device code written for [vm-memory](https://docs.rs/vm-memory/0.18) — `read_obj`,
//! `write_obj`, `get_slice`, [`VolatileSlice`], a [`GuestAddressSpace`] such as
//! [`GuestMemoryAtomic`] — reads and writes the *shared* memory of pfnstore files through this
//! module, and gets an error, never the bytes, for a private, quarantined or unbacked range.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault};
//! use pfnstore::vm_memory::{AddressSpace, store_error};
//! use pfnstore::{FileOptions, Store, StoreError, StoreOptions};
//! use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//!
//! // 1 GiB of ordinary memory here; a VMM asks for 1 GiB hugetlb pages.
//! let mut config = HugetlbConfig::new(1 << 30);
//! (config.page_size, config.prefault) = (HugePageSize::Base4K, Prefault::None);
//! let store = Store::from_hugetlb(HugetlbSource::new(config)?, StoreOptions::default())?;
//! let low = store.create_file(FileOptions::new(2 << 20).shared().populated())?;
//! let high = store.create_file(FileOptions::new(4 << 20).populated())?; // all private
//! let space: AddressSpace =
//!     AddressSpace::new([(GuestAddress(0), low), (GuestAddress(1 << 32), high)])?;
//!
//! let mem = space.memory(); // what a virtio device holds
//! mem.write_obj(0x1234_u32, GuestAddress(0x1000))?; // shared: done
//! let refused = mem.read_obj::<u32>(GuestAddress(1 << 32)).unwrap_err(); // private
//! assert!(matches!(store_error(&refused), Some(StoreError::PrivateAccess { offset: 0, .. })));
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
//!   the middle, and waits (briefly) for a conversion of the same chunk under way (what an
//!   access does after its check is below). Shareability
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
//! # Slices and accesses across a conversion
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
//! The same holds, with a window of a few instructions, for every access: vm-memory's
//! `read_obj`, `write_obj` and `read_slice` take a slice (the check) and then copy, and the
//! store's lock is not held across the copy (vm-memory has no hook after it). An access that
//! races with a conversion of the same page is done before it, refused after it, or lands in
//! the middle with the consequences above. The guest does not convert memory it handed to a
//! device while the device may use it (a virtio driver does not); a device that cannot rely
//! on that, or keeps slices between requests, pins what it uses ([`AddressSpace::pin`]): a
//! conversion or punch-hole of a pinned page then fails with [`StoreError::Pinned`] naming the
//! pin's owner and offset, before anything changes.
//!
//! `get_host_address` is checked like `get_slice` (one byte): a raw pointer is for reading
//! and writing. A VMM that registers whole regions with the kernel uses the file's
//! [`GuestFile::host_mapping`] (KVM) or `GuestMemoryRegion::file_offset` (vhost-user). Note that
//! handing the memfd to another process hands it all the memory in it, private pages of every
//! file included: pfnstore's privacy ends at this process's mappings and API.
//!
//! The modules: `region` (one region and its checked accesses), `space` (the address space,
//! the subscriber that keeps its regions, device pins).

#[allow(unsafe_code)] // SAFETY arguments are on each block in the module.
mod region;
mod space;

pub use region::PfnstoreRegion;
pub use space::{AddressSpace, DevicePin};

use std::io;

use ::vm_memory::GuestMemoryError;
use ::vm_memory::GuestRegionCollection;
use ::vm_memory::bitmap::NewBitmap;
#[cfg(doc)]
use ::vm_memory::{
    FileOffset, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend, Permissions,
    VolatileSlice,
};

#[cfg(doc)]
use crate::GuestFile;
use crate::StoreError;

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
    /// The same file twice (one file is one memory region).
    #[error("{file} is placed twice")]
    FileTwice {
        /// The file.
        file: crate::FileId,
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
