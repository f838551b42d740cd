//! One region: a backed piece of a file at its guest address, and its accesses, each
//! checked against the store.

use std::fmt;
use std::mem::size_of;
use std::sync::atomic::Ordering;

use ::vm_memory::bitmap::{BS, Bitmap};
use ::vm_memory::{
    Address, AtomicAccess, Bytes, FileOffset, GuestAddress, GuestMemoryError, GuestMemoryRegion,
    GuestUsize, MemoryRegionAddress, ReadVolatile, VolatileSlice, WriteVolatile,
};

use super::refused;
use crate::GuestFile;

/// One piece of a file that is backed and contiguous in the store's memfd, at its guest
/// address (see the [module docs](super)).
pub struct PfnstoreRegion<B = ()> {
    pub(super) file: GuestFile,
    /// Guest address of the first byte.
    pub(super) start: GuestAddress,
    /// Byte offset of the first byte in the file.
    pub(super) offset: u64,
    pub(super) len: u64,
    /// Address of the first byte in the file's host mapping.
    pub(super) host: usize,
    pub(super) memfd: Option<FileOffset>,
    pub(super) bitmap: B,
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
