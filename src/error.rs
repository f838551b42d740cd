//! The errors a VMM sees from the store, and their translation from the layers underneath.
//!
//! Every variant about a file names the file and the first offending byte offset, and the
//! frame behind it where memory backs it. Unless a variant says otherwise, the operation that
//! failed changed nothing. `Internal` means a bug in pfnstore: every input the API accepts
//! maps to another variant. It carries the layer's own error ([`LayerError`]) as its source.

use std::fmt;
use std::sync::Arc;

use pfnstore_core::{OffsetRange, PageOffset, Pfn, RangeError};
use pfnstore_hugetlb::HugetlbError;
use pfnstore_metadata::conversion::ConversionError;
use pfnstore_metadata::{FileId, MetadataError, PinOwner};

/// " (pfn 0x...)" when a frame backs the offset, else nothing.
fn at(pfn: &Option<Pfn>) -> String {
    pfn.map(|p| format!(" ({p})")).unwrap_or_default()
}

fn quarantined_note(ranges: &[(u64, u64)]) -> String {
    if ranges.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ranges
            .iter()
            .map(|(a, b)| format!("{a:#x}..{b:#x}"))
            .collect();
        format!(
            "; could not be restored and are quarantined: {}",
            list.join(", ")
        )
    }
}

/// An operation on a store or a guest-memory file failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
    /// A file of this size cannot be created.
    #[error("a file of {size:#x} bytes is larger than {limit:#x} bytes ({why})")]
    FileTooLarge {
        /// The size asked for.
        size: u64,
        /// The largest size allowed.
        limit: u64,
        /// Which limit: the store's capacity (without overcommit) or what the metadata can
        /// describe.
        why: &'static str,
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
    /// A page of the range is quarantined: its memory is never handed out again, and the
    /// offset is never backed again.
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
    /// A subscriber failed to unmap: the operation was rolled back (the subscribers that had
    /// unmapped were told to map the old blocks again). `quarantined` lists the byte ranges
    /// that could not be restored; they are quarantined, everything else is as it was.
    #[error("{subscriber} failed to unmap offsets {offset:#x}..{end:#x}{} of {file}: {reason}; rolled back{}", at(.pfn), quarantined_note(.quarantined))]
    UnmapFailed {
        /// The file.
        file: FileId,
        /// The first offset the subscriber failed on (the error offset).
        offset: u64,
        /// The end of the offsets it failed on.
        end: u64,
        /// The frame behind `offset`.
        pfn: Option<Pfn>,
        /// The subscriber's name.
        subscriber: String,
        /// Its reason.
        reason: String,
        /// Byte ranges quarantined because they could not be restored.
        quarantined: Vec<(u64, u64)>,
    },
    /// The host was asked to access private memory.
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
    /// The file's host mapping would need more kernel memory regions (VMAs) than the process
    /// may hold (`vm.max_map_count`): the operation was refused before anything changed.
    #[error(
        "offset {offset:#x} of {file}: the host mapping would need {regions} memory regions, more than the limit of {limit}"
    )]
    MappingLimit {
        /// The file.
        file: FileId,
        /// The offset whose change was refused.
        offset: u64,
        /// Regions that would be needed.
        regions: u64,
        /// The limit.
        limit: u64,
    },
    /// A subscriber callback operated on the pages of the operation that called it (or
    /// changed another range of its chunk).
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
    /// The operation would have to wait for another thread's change of these pages, and the
    /// calling thread may not wait (it is inside a subscriber callback). Retry later.
    #[error(
        "offsets {offset:#x}..{end:#x} of {file} are being changed by another operation; a callback may not wait for it"
    )]
    WouldBlock {
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
    /// The file was destroyed (through this handle or another).
    #[error("{file} was destroyed")]
    Destroyed {
        /// The file.
        file: FileId,
    },
    /// The store is being handed over to another process: it takes no operation until the
    /// receiver confirmed (then [`StoreError::HandedOver`]) or failed (then it is live again).
    #[error("the store is being handed over to another process")]
    HandoverInProgress,
    /// The store was handed over to another process, which owns its memory now.
    #[error("the store was handed over to another process")]
    HandedOver,
    /// No open file has this id.
    #[error("{file} is not an open file of this store")]
    NoSuchFile {
        /// The id asked for.
        file: FileId,
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
    /// The memory source or the host mapping failed (mmap, mprotect, sysfs...): the source
    /// error says which call and errno.
    #[error("{0}")]
    Memory(#[source] MemoryError),
    /// The memory source's chunk at `base` cannot be managed: it is not aligned to a chunk,
    /// lies outside the PFN space the store can manage, or repeats another chunk. A
    /// [`MemorySource`](crate::hugetlb::MemorySource) implemented outside pfnstore can say so.
    #[error("the memory source's chunk at {base} cannot be managed: {source}")]
    BadSource {
        /// The chunk's first frame.
        base: Pfn,
        /// What the layer that refused it said.
        #[source]
        source: LayerError,
    },
    /// The store was dropped: a weak handle (a subscriber's) outlived it.
    #[error("the store is gone")]
    StoreGone,
    /// Every file id of the store was used (2^32 - 2 files were created in its life).
    #[error("the store has used all its file ids")]
    FileIdsExhausted,
    /// A bug in pfnstore: a layer failed in a way the store does not expect on validated
    /// input. Reported rather than panicking; `context` says what was being done, `source` is
    /// the layer's own error.
    #[error("internal error (a bug in pfnstore): {context}: {source}")]
    Internal {
        /// What the store was doing.
        context: String,
        /// The layer's error.
        #[source]
        source: LayerError,
    },
}

/// An error of a layer underneath the store, kept whole as the source of
/// [`StoreError::Internal`] and [`StoreError::BadSource`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The page metadata.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The frame allocator.
    #[error(transparent)]
    Allocator(#[from] pfnstore_allocator::AllocError),
    /// A conversion transaction.
    #[error(transparent)]
    Conversion(#[from] ConversionError),
    /// A range computation.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The store's own bookkeeping disagrees with itself.
    #[error("{0}")]
    Bookkeeping(String),
}

/// [`StoreError::Internal`] for a disagreement in the store's own bookkeeping.
pub(crate) fn broken(what: impl fmt::Display) -> StoreError {
    StoreError::Internal {
        context: "bookkeeping".into(),
        source: LayerError::Bookkeeping(what.to_string()),
    }
}

/// [`StoreError::Internal`] with the layer's error and what was being done.
pub(crate) fn internal(context: impl fmt::Display, source: impl Into<LayerError>) -> StoreError {
    StoreError::Internal {
        context: context.to_string(),
        source: source.into(),
    }
}

/// An error of the memory layer ([`HugetlbError`]), shared so that [`StoreError`] stays
/// `Clone` and comparable (two are equal when they say the same).
#[derive(Debug, Clone)]
pub struct MemoryError(pub Arc<HugetlbError>);

impl MemoryError {
    /// The error of the memory layer.
    pub fn get(&self) -> &HugetlbError {
        &self.0
    }
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for MemoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl PartialEq for MemoryError {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for MemoryError {}

impl From<HugetlbError> for StoreError {
    fn from(e: HugetlbError) -> Self {
        StoreError::Memory(MemoryError(Arc::new(e)))
    }
}

/// What the error translation needs to know about a file.
pub(crate) struct FileContext<F: Fn(PageOffset) -> Option<Pfn>> {
    pub(crate) file: FileId,
    /// The frame behind a page offset, if backed.
    pub(crate) pfn: F,
}

impl<F: Fn(PageOffset) -> Option<Pfn>> FileContext<F> {
    fn pfn_at(&self, page: u64) -> Option<Pfn> {
        (self.pfn)(PageOffset(page))
    }

    /// A metadata error of the file's metadata (keyed by page offset).
    pub(crate) fn metadata(&self, e: MetadataError) -> StoreError {
        let file = self.file;
        let offset = |p: Pfn| PageOffset(p.0).byte();
        match e {
            MetadataError::Pinned { first_pfn, owner } => StoreError::Pinned {
                file,
                offset: offset(first_pfn),
                pfn: self.pfn_at(first_pfn.0),
                owner,
            },
            MetadataError::Quarantined { first_pfn } => StoreError::Quarantined {
                file,
                offset: offset(first_pfn),
                pfn: self.pfn_at(first_pfn.0),
            },
            MetadataError::NotPinned { first_pfn, owner } => StoreError::NotPinned {
                file,
                offset: offset(first_pfn),
                pfn: self.pfn_at(first_pfn.0),
                owner,
            },
            MetadataError::PinOverflow { first_pfn, owner } => StoreError::PinOverflow {
                file,
                offset: offset(first_pfn),
                pfn: self.pfn_at(first_pfn.0),
                owner,
            },
            other => internal(file, other),
        }
    }

    /// A transaction error of the file's domain.
    pub(crate) fn conversion(&self, e: ConversionError) -> StoreError {
        let file = self.file;
        let bytes = |r: OffsetRange| (r.start().byte(), r.end().byte());
        match e {
            ConversionError::Metadata(m) => self.metadata(m),
            ConversionError::Vetoed {
                first_page,
                subscriber,
                reason,
            } => StoreError::Vetoed {
                file,
                offset: first_page.byte(),
                pfn: self.pfn_at(first_page.0),
                subscriber,
                reason,
            },
            ConversionError::UnmapFailed {
                subscriber,
                range,
                reason,
                quarantined,
            } => StoreError::UnmapFailed {
                file,
                offset: range.start().byte(),
                end: range.end().byte(),
                pfn: self.pfn_at(range.start().0),
                subscriber,
                reason,
                quarantined: quarantined.into_iter().map(bytes).collect(),
            },
            ConversionError::Reentrant { requested, .. } => StoreError::Reentrant {
                file,
                offset: requested.start().byte(),
                end: requested.end().byte(),
            },
            ConversionError::WouldBlock { requested, .. } => StoreError::WouldBlock {
                file,
                offset: requested.start().byte(),
                end: requested.end().byte(),
            },
            ConversionError::NoSuchFile { file } => StoreError::NoSuchFile { file },
            other => internal(file, other),
        }
    }
}
