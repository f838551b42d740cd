//! The errors a VMM sees from the store: each names the file offset, and the PFN behind it
//! where memory backs it.

use pfnstore_core::{Pfn, RangeError};
use pfnstore_metadata::{FileId, PinOwner};

/// " (pfn 0x...)" when a frame backs the offset, else nothing.
fn at(pfn: &Option<Pfn>) -> String {
    pfn.map(|p| format!(" ({p})")).unwrap_or_default()
}

/// An operation on a store or a guest-memory file failed. Unless the variant says otherwise,
/// nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// An offset or length is not a multiple of the 4 KiB page size.
    #[error("offset {offset:#x} (length {len:#x}) is not 4 KiB aligned")]
    Unaligned {
        /// The offending offset.
        offset: u64,
        /// The length asked for.
        len: u64,
    },
    /// A zero-length request.
    #[error("empty request at offset {offset:#x}")]
    Empty {
        /// The offset asked for.
        offset: u64,
    },
    /// The range reaches past the end of the file.
    #[error("offset {offset:#x} is beyond the end of {file} (size {size:#x})")]
    BeyondEnd {
        /// The file.
        file: FileId,
        /// The first offset outside the file.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// A page of the range is pinned.
    #[error("offset {offset:#x}{} of {file} is pinned by {owner}", at(.pfn))]
    Pinned {
        /// The file.
        file: FileId,
        /// The first pinned offset.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
        /// Who pins it.
        owner: PinOwner,
    },
    /// A page of the range is quarantined.
    #[error("offset {offset:#x}{} of {file} is quarantined", at(.pfn))]
    Quarantined {
        /// The file.
        file: FileId,
        /// The first quarantined offset.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
    },
    /// Unpin of a page that `owner` does not pin.
    #[error("offset {offset:#x}{} of {file} is not pinned by {owner}", at(.pfn))]
    NotPinned {
        /// The file.
        file: FileId,
        /// The first offset without such a pin.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
        /// The owner named in the request.
        owner: PinOwner,
    },
    /// Too many pins on one page.
    #[error("pin count overflow at offset {offset:#x}{} of {file} for {owner}", at(.pfn))]
    PinOverflow {
        /// The file.
        file: FileId,
        /// The offset.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
        /// The owner.
        owner: PinOwner,
    },
    /// A subscriber refused the conversion.
    #[error("conversion of {file} vetoed by {subscriber} at offset {offset:#x}{}: {reason}", at(.pfn))]
    Vetoed {
        /// The file.
        file: FileId,
        /// The first offset the veto is about.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
        /// The subscriber's name.
        subscriber: String,
        /// Its reason.
        reason: String,
    },
    /// A subscriber failed to unmap; the operation otherwise happened and the range named is
    /// quarantined.
    #[error("{subscriber} failed to unmap offsets {offset:#x}..{end:#x}{} of {file}: {reason} (quarantined)", at(.pfn))]
    UnmapFailed {
        /// The file.
        file: FileId,
        /// First quarantined offset.
        offset: u64,
        /// End of the quarantined offsets.
        end: u64,
        /// The frame behind the first quarantined offset.
        pfn: Option<Pfn>,
        /// The subscriber's name.
        subscriber: String,
        /// Its reason.
        reason: String,
    },
    /// The host view was asked for private memory (R4).
    #[error("offset {offset:#x}{} of {file} is private: the host may not access it", at(.pfn))]
    PrivateAccess {
        /// The file.
        file: FileId,
        /// The first private offset of the access.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
    },
    /// A private access (a guest fault on its private side) to a shared page.
    #[error("offset {offset:#x}{} of {file} is shared: a private access is refused", at(.pfn))]
    SharedAccess {
        /// The file.
        file: FileId,
        /// The offset.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
    },
    /// The operation needs memory behind the offset, and there is none.
    #[error("offset {offset:#x} of {file} has no memory behind it")]
    NotBacked {
        /// The file.
        file: FileId,
        /// The first unbacked offset.
        offset: u64,
    },
    /// The store's memory has no bytes behind it (a synthetic source).
    #[error("the store's memory source has no host mapping (synthetic PFNs): {what} is impossible")]
    NoHostMemory {
        /// What was attempted.
        what: &'static str,
    },
    /// Not enough free memory.
    #[error("out of memory: {pages} pages wanted for offset {offset:#x} of {file}")]
    OutOfMemory {
        /// The file.
        file: FileId,
        /// The offset being populated.
        offset: u64,
        /// Pages wanted.
        pages: u64,
    },
    /// A subscriber callback tried to operate on the range of the operation that called it.
    #[error(
        "re-entrant operation on offsets {offset:#x}..{end:#x} of {file} from a subscriber callback"
    )]
    Reentrant {
        /// The file.
        file: FileId,
        /// First offset asked for.
        offset: u64,
        /// End of the offsets asked for.
        end: u64,
    },
    /// The file still has pinned pages and cannot be destroyed.
    #[error("{file} has pinned pages (first at offset {offset:#x}{}) and cannot be destroyed", at(.pfn))]
    FileBusy {
        /// The file.
        file: FileId,
        /// The first pinned offset.
        offset: u64,
        /// The frame behind it.
        pfn: Option<Pfn>,
    },
    /// A PFN that the store does not manage.
    #[error("{pfn} is not managed by this store")]
    UnknownPfn {
        /// The PFN.
        pfn: Pfn,
    },
    /// An invalid range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The store's configuration cannot work.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// An internal layer failed in a way the store does not translate (a bug if it happens
    /// on validated input; reported rather than panicking).
    #[error("internal error: {0}")]
    Internal(String),
}
