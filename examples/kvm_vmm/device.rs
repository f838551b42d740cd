//! The simulated device: a checksum device on a virtio-like split queue, written against
//! rust-vmm's vm-memory only (it reaches guest memory through pfnstore's adapter, an
//! [`AddressSpace`]). For each request it sums the bytes of the readable buffer and writes
//! `(status, sum)` into the writable one: status 0 done, 1 refused (the buffer was private or
//! unbacked: the adapter refused it, the device never saw its bytes). It can also pin a DMA
//! window, as a device that keeps slices of guest memory between requests must.

use std::sync::atomic::Ordering;

use pfnstore::vm_memory::{AddressSpace, DevicePin, store_error};
use pfnstore::{PinOwner, StoreError};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryError};

/// Where the guest's queue lives (the guest's `DESC`, `AVAIL`; the used ring after them).
pub(crate) const DESC: GuestAddress = GuestAddress(0x10000);
pub(crate) const AVAIL: GuestAddress = GuestAddress(0x11000);
pub(crate) const USED: GuestAddress = GuestAddress(0x12000);
const QUEUE: u64 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Bytes of the DMA window the device pins.
pub(crate) const WINDOW: u64 = 64 << 10;

/// A virtio split-queue descriptor.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: plain integers, no padding (8 + 4 + 2 + 2 bytes); every bit pattern is valid.
unsafe impl ByteValued for Descriptor {}

/// The device.
pub(crate) struct ChecksumDevice {
    space: AddressSpace,
    owner: PinOwner,
    last_avail: u16,
    window: Option<DevicePin>,
    /// Requests served.
    pub served: u64,
    /// Requests refused: the buffer's guest address and the store's error.
    pub refused: Vec<(u64, StoreError)>,
}

impl ChecksumDevice {
    /// A device over `space` that pins as `owner`.
    pub(crate) fn new(space: AddressSpace, owner: PinOwner) -> ChecksumDevice {
        ChecksumDevice {
            space,
            owner,
            last_avail: 0,
            window: None,
            served: 0,
            refused: Vec::new(),
        }
    }

    /// The guest notified the queue: serve every new request.
    pub(crate) fn notify(&mut self) -> Result<(), GuestMemoryError> {
        let mem = self.space.memory();
        let avail: u16 = mem.load(AVAIL.unchecked_add(2), Ordering::Acquire)?;
        while self.last_avail != avail {
            let slot = u64::from(self.last_avail) % QUEUE;
            let head: u16 = mem.read_obj(AVAIL.unchecked_add(4 + 2 * slot))?;
            self.request(&*mem, head)?;
            let used = USED.unchecked_add(4 + 8 * slot);
            mem.write_obj(u32::from(head), used)?;
            mem.write_obj(8u32, used.unchecked_add(4))?;
            self.last_avail = self.last_avail.wrapping_add(1);
            mem.store(self.last_avail, USED.unchecked_add(2), Ordering::Release)?;
            self.served += 1;
        }
        Ok(())
    }

    /// One request. Errors on the queue itself (shared memory the driver owns) are the
    /// device's own failure; a refused buffer is the request's.
    fn request<M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
    ) -> Result<(), GuestMemoryError> {
        let mut index = head;
        let (mut status, mut sum) = (0u32, 0u32);
        for _ in 0..QUEUE {
            let desc: Descriptor = mem.read_obj(DESC.unchecked_add(16 * u64::from(index)))?;
            if desc.flags & WRITE != 0 {
                mem.write_obj(status, GuestAddress(desc.addr))?;
                mem.write_obj(sum, GuestAddress(desc.addr).unchecked_add(4))?;
            } else {
                let mut bytes = vec![0u8; desc.len as usize];
                match mem.read_slice(&mut bytes, GuestAddress(desc.addr)) {
                    Ok(()) => {
                        sum = bytes.iter().fold(sum, |s, b| s.wrapping_add(u32::from(*b)));
                    }
                    Err(e) => {
                        status = 1;
                        // An error of vm-memory's own (an address outside guest memory): the
                        // frame is outside the memory the store manages.
                        let why = store_error(&e).cloned().unwrap_or(StoreError::Range(
                            pfnstore::core::RangeError::OutOfBounds {
                                pfn: pfnstore::core::Pfn(desc.addr / pfnstore::core::PAGE_SIZE),
                            },
                        ));
                        self.refused.push((desc.addr, why));
                    }
                }
            }
            if desc.flags & NEXT == 0 {
                break;
            }
            index = desc.next;
        }
        Ok(())
    }

    /// The guest set the DMA window at `gpa`: pin it.
    pub(crate) fn pin_window(
        &mut self,
        gpa: u64,
    ) -> Result<(), pfnstore::vm_memory::AddressSpaceError> {
        self.window = Some(self.space.pin(GuestAddress(gpa), WINDOW, self.owner)?);
        Ok(())
    }

    /// The guest released the window.
    pub(crate) fn unpin_window(&mut self) {
        self.window = None;
    }
}
