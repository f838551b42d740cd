//! Live update: hand a running store to another process without touching guest memory.
//!
//! A VMM that updates itself (or the host kernel, through a successor process) passes its
//! store on: the memory stays where it is, in the source's memfd, which travels as a file
//! descriptor (`SCM_RIGHTS`); everything else travels as a snapshot: the source's record
//! (page size, chunks and their PFNs, the pool growth it owns), the allocator's and the
//! physical metadata's state, and every file (attribute runs, pins with owners, quarantine,
//! the extents it holds). Subscribers do not travel: they register again in the new process
//! and get the replay of the current state.
//!
//! # The ownership protocol
//!
//! 1. The sender closes its store's gate (`crate::gate`): new operations get
//!    [`crate::StoreError::HandoverInProgress`], operations
//!    under way finish.
//! 2. It writes the snapshot and the memfd to the socket, and waits for the answer.
//! 3. The receiver checks the snapshot (magic, version, length, CRC-32), maps the memfd
//!    without copying or zeroing anything, re-reads the PFNs through pagemap and checks them
//!    against the record, takes over the pool growth, rebuilds the allocator, the metadata and
//!    the files, checks its totals against the sender's and every invariant, and answers.
//! 4. On a confirmation the sender seals its store: every handle answers
//!    [`crate::StoreError::HandedOver`], and dropping it gives nothing
//!    back to the system (no pool shrink, no frees). On a refusal, or if the receiver goes away
//!    before answering (a crash closes the socket), the sender opens the gate again: nothing
//!    was lost.
//!
//! The receiver continues once it has answered, even if the sender dies then. The sender
//! waits for the answer without a timeout: a sender that gave up on a receiver that then
//! confirmed would leave two owners of the same memory. (A receiver that cannot deliver its
//! confirmation can only be talking to a sender that is gone.)

mod codec;
mod export;
mod rebuild;
mod snapshot;
mod source_record;
mod wire;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub use snapshot::VERSION;
pub(crate) use snapshot::{FileImage, FileRuns};

use crate::{Store, StoreError, StoreOptions};

/// Why a handover did not happen. On the sender's side, the store is live again unless the
/// variant says otherwise; on the receiver's side, nothing was taken over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// The store could not be handed over or rebuilt (not live, a rebuild that failed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The socket failed.
    #[error("handover socket: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a pfnstore snapshot.
    #[error("not a pfnstore snapshot (bad magic)")]
    NotASnapshot,
    /// A snapshot of another version.
    #[error("snapshot version {found}; this pfnstore reads version {supported}")]
    Version {
        /// The version found.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// The snapshot ends early.
    #[error("snapshot truncated at byte {at}")]
    Truncated {
        /// Where the input ran out.
        at: u64,
    },
    /// The checksum does not match: the snapshot was damaged.
    #[error("snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The CRC-32 the snapshot carries.
        stored: u32,
        /// The CRC-32 of what arrived.
        computed: u32,
    },
    /// The snapshot is well formed but says something impossible.
    #[error("snapshot malformed at byte {at}: {what}")]
    Malformed {
        /// Where.
        at: u64,
        /// What.
        what: String,
    },
    /// The memory layer refused the memfd or the record (wrong page size or length, a PFN
    /// that changed since the sender read it).
    #[error("the memory does not match the snapshot: {0}")]
    Memory(#[from] pfnstore_hugetlb::HugetlbError),
    /// The rebuilt store does not add up to what the sender had.
    #[error("the rebuilt store differs from the sender's: {0}")]
    Mismatch(String),
    /// The store's memory source cannot be handed over (a source of the caller's own that
    /// gives no record); the store is live again.
    #[error("this store's memory source cannot be handed over")]
    Unsupported,
    /// The receiver refused; the sender's store is live again.
    #[error("the receiver refused the store: {0}")]
    Refused(String),
    /// The receiver went away before answering; the sender's store is live again.
    #[error("the receiver went away before confirming")]
    ReceiverGone,
}

/// What a handover cost, as the sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandoverReport {
    /// Bytes of the snapshot.
    pub snapshot_bytes: u64,
    /// Waiting for the operations under way to end.
    pub quiesce: Duration,
    /// Building the snapshot.
    pub encode: Duration,
    /// From closing the gate to the receiver's confirmation.
    pub total: Duration,
}

impl crate::store::StoreInner {
    /// Lets the memory go after the receiver confirmed: the source gives nothing back when it
    /// is dropped, and every handle answers `HandedOver`. Fails (changing nothing) if the
    /// receiver did not in fact take the memory's pool growth over.
    pub(crate) fn relinquish(&self) -> Result<(), HandoverError> {
        self.memory().source().relinquish()?;
        self.gate().seal();
        Ok(())
    }
}

/// A store taken over from another process, with its files (the store holds files weakly:
/// these handles keep them).
#[derive(Debug)]
#[non_exhaustive]
pub struct Received {
    /// The store.
    pub store: Store,
    /// Every file it had, by id order.
    pub files: Vec<crate::GuestFile>,
}

impl Store {
    /// Hands the store to the process at the other end of `socket` (see the module docs):
    /// on success, every handle of this store answers `HandedOver` from now on, and dropping
    /// it gives nothing back. On failure the store is live again, nothing lost.
    pub fn hand_over(&self, socket: &UnixStream) -> Result<HandoverReport, HandoverError> {
        let inner = &self.inner;
        let start = Instant::now();
        inner.close_gate()?;
        let quiesce = start.elapsed();
        let result = (|| {
            let t = Instant::now();
            let image = inner.image()?;
            let bytes = snapshot::encode(&image);
            let encode = t.elapsed();
            let memfd = inner.memory().memfd();
            wire::send(socket, &bytes, memfd.as_ref().map(|m| m.fd())).map_err(|e| {
                match e.kind() {
                    std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof => HandoverError::ReceiverGone,
                    _ => HandoverError::Io(e),
                }
            })?;
            match wire::await_answer(socket) {
                Ok(Ok(())) => Ok((bytes.len() as u64, encode)),
                Ok(Err(reason)) => Err(HandoverError::Refused(reason)),
                Err(_) => Err(HandoverError::ReceiverGone),
            }
        })();
        match result {
            Ok((snapshot_bytes, encode)) => {
                if let Err(e) = inner.relinquish() {
                    // The receiver confirmed but did not take the memory over: it is still ours.
                    inner.gate().reopen();
                    return Err(e);
                }
                Ok(HandoverReport {
                    snapshot_bytes,
                    quiesce,
                    encode,
                    total: start.elapsed(),
                })
            }
            Err(e) => {
                inner.gate().reopen();
                Err(e)
            }
        }
    }

    /// The snapshot of this store as [`Store::hand_over`] would send it, without handing
    /// anything over (for measuring and inspection). The store stops operations while it is
    /// taken.
    pub fn snapshot(&self) -> Result<Vec<u8>, HandoverError> {
        let inner = &self.inner;
        inner.close_gate()?;
        let bytes = inner.image().map(|image| snapshot::encode(&image));
        inner.gate().reopen();
        bytes
    }

    /// Receives a store handed over by the process at the other end of `socket` and takes it
    /// over (see the module docs). `options` are this process's (the shards, say).
    pub fn receive(socket: &UnixStream, options: StoreOptions) -> Result<Received, HandoverError> {
        let (bytes, fd) = wire::receive(socket)?;
        let built = (|| {
            let image = snapshot::decode(&bytes)?;
            let source = pfnstore_hugetlb::rebuild(&image.source, fd)?;
            Store::rebuild(image, source, options)
        })();
        match built {
            Ok(received) => {
                // A confirmation that cannot be delivered goes to a sender that is gone (see
                // the module docs): this process owns the store either way.
                let _ = wire::answer(socket, Ok(()));
                Ok(received)
            }
            Err(e) => {
                let _ = wire::answer(socket, Err(&e.to_string()));
                Err(e)
            }
        }
    }

    /// Rebuilds a store from snapshot bytes (what [`Store::snapshot`] gives) and the memfd of
    /// its memory (`None` for a synthetic store), without a socket: the receiving half of
    /// [`Store::receive`], for a VMM that moves the snapshot its own way (and for tests and
    /// benches of the format). The same checks apply; nothing is confirmed to anyone.
    pub fn receive_snapshot(
        bytes: &[u8],
        memfd: Option<std::os::fd::OwnedFd>,
        options: StoreOptions,
    ) -> Result<Received, HandoverError> {
        let image = snapshot::decode(bytes)?;
        let source = pfnstore_hugetlb::rebuild(&image.source, memfd)?;
        Store::rebuild(image, source, options)
    }
}
