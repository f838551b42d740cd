//! The snapshot a store is handed over with: a versioned, checksummed image of everything
//! but the memory itself (which travels as the memfd).
//!
//! # Format (version 1)
//!
//! Fixed-size integers are little-endian; run lengths, gaps and PFNs are LEB128 varints (7 bits
//! a byte), so that a run costs a few bytes whatever the size of its numbers.
//!
//! ```text
//! magic    8 bytes  "PFNSTORE"
//! version  u32      1
//! length   u64      bytes of the body
//! body     ...      the sections below, in order
//! crc32    u32      CRC-32 (IEEE) of everything before it
//! ```
//!
//! The body: the store (geometry orders, next file id), the memory source's record
//! ([`pfnstore_hugetlb::SourceRecord`]: page size, memfd length, each chunk's base PFN and
//! memfd offset, the pool growth it owns), the allocator's totals (to check the rebuild), the
//! physical metadata as runs (owner, quarantine, dirty), and every file: id, size, attribute
//! runs (shareability, backed, quarantine, pins with owners) and the extents it holds. Every
//! list is a `u64` count followed by its records, and every list is of *runs*, so a uniform
//! 1 TiB costs a few records whatever its size: the snapshot grows with the boundaries in the
//! memory, not with the memory. The allocator's state is not written separately: free,
//! allocated, quarantined and dirty extents follow from the physical runs and the files'
//! extents (each extent is one allocation on the receiving side), and the receiver checks its
//! rebuilt totals against the sender's.

use pfnstore_core::{Geometry, OffsetRange, PageOffset, Pfn, PfnRange};
use pfnstore_metadata::{FileId, PinOwner, QuarantineReason};

use super::HandoverError;
use super::codec::{Reader, Writer};

const MAGIC: &[u8; 8] = b"PFNSTORE";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;

/// One run of the physical metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PhysicalRun {
    pub(crate) pfns: PfnRange,
    pub(crate) owner: Option<FileId>,
    pub(crate) quarantined: Option<QuarantineReason>,
    pub(crate) dirty: bool,
}

/// A file's attribute runs (shareability, backed, quarantine, pins with owners), covering it
/// from offset 0 one after the other. Kept as columns, not as one record per run: a fragmented
/// file has millions of runs, and a 48-byte record each made building the image and decoding
/// the snapshot mostly page faults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FileRuns {
    /// Where each run ends (exclusive, in pages), ascending.
    ends: Vec<u64>,
    /// Each run's flags: bit 0 shared, bit 1 backed, bits 2.. the quarantine code.
    flags: Vec<u8>,
    /// The pins of the runs that have any: (run index, owner, count), by run index.
    pins: Vec<(usize, PinOwner, u32)>,
}

/// One run of [`FileRuns`], as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileRun<'a> {
    pub(crate) pages: OffsetRange,
    pub(crate) shared: bool,
    pub(crate) backed: bool,
    pub(crate) quarantined: Option<QuarantineReason>,
    /// (run index, owner, count): the index is this run's.
    pub(crate) pins: &'a [(usize, PinOwner, u32)],
}

impl FileRuns {
    /// Appends the run that ends at `end` (after the last one).
    pub(crate) fn push(
        &mut self,
        end: u64,
        shared: bool,
        backed: bool,
        quarantined: Option<QuarantineReason>,
        pins: impl IntoIterator<Item = (PinOwner, u32)>,
    ) {
        let index = self.ends.len();
        self.ends.push(end);
        self.flags.push(run_flags(shared, backed, quarantined));
        self.pins
            .extend(pins.into_iter().map(|(owner, count)| (index, owner, count)));
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Where the last run ends (0 without runs).
    fn end(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// The runs, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = FileRun<'_>> + '_ {
        let mut start = 0u64;
        let mut pins = &self.pins[..];
        self.ends
            .iter()
            .zip(&self.flags)
            .enumerate()
            .map(move |(index, (&end, &flags))| {
                let n = pins.iter().take_while(|p| p.0 == index).count();
                let (these, rest) = pins.split_at(n);
                pins = rest;
                let pages = OffsetRange::new(PageOffset(start), PageOffset(end))
                    .expect("runs are checked non-empty and ascending when pushed or decoded");
                start = end;
                FileRun {
                    pages,
                    shared: flags & 1 != 0,
                    backed: flags & 2 != 0,
                    quarantined: quarantine_reason(flags >> 2)
                        .expect("quarantine codes are checked when decoded"),
                    pins: these,
                }
            })
    }
}

/// A run's flags byte, as the snapshot stores it.
fn run_flags(shared: bool, backed: bool, quarantined: Option<QuarantineReason>) -> u8 {
    u8::from(shared) | (u8::from(backed) << 1) | (quarantine_code(quarantined) << 2)
}

/// A file: its attributes and the memory it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileImage {
    pub(crate) id: FileId,
    pub(crate) pages: u64,
    pub(crate) runs: FileRuns,
    /// (offsets, first PFN): runs of held memory, contiguous in both.
    pub(crate) extents: Vec<(OffsetRange, Pfn)>,
}

/// The allocator's totals, to check a rebuild against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Totals {
    pub(crate) free: u64,
    pub(crate) allocated: u64,
    pub(crate) quarantined: u64,
    pub(crate) dirty: u64,
}

/// Everything a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub(crate) geometry: Geometry,
    pub(crate) next_file: u32,
    pub(crate) source: pfnstore_hugetlb::SourceRecord,
    pub(crate) totals: Totals,
    pub(crate) physical: Vec<PhysicalRun>,
    pub(crate) files: Vec<FileImage>,
}

fn quarantine_code(q: Option<QuarantineReason>) -> u8 {
    match q {
        None => 0,
        Some(QuarantineReason::UnmapFailed) => 1,
        Some(QuarantineReason::ScrubFailed) => 2,
        Some(QuarantineReason::Operator) => 3,
        Some(QuarantineReason::StillPinned) => 4,
    }
}

/// The reason a quarantine code stands for (`None` for a code no version writes).
fn quarantine_reason(code: u8) -> Option<Option<QuarantineReason>> {
    Some(match code {
        0 => None,
        1 => Some(QuarantineReason::UnmapFailed),
        2 => Some(QuarantineReason::ScrubFailed),
        3 => Some(QuarantineReason::Operator),
        4 => Some(QuarantineReason::StillPinned),
        _ => return None,
    })
}

fn quarantine_of(code: u8, r: &Reader<'_>) -> Result<Option<QuarantineReason>, HandoverError> {
    quarantine_reason(code).ok_or_else(|| r.malformed(format!("quarantine reason {code}")))
}

/// Encodes `image` as a snapshot.
pub(crate) fn encode(image: &Image) -> Vec<u8> {
    // The header goes first and its length is filled in at the end: the body is not copied.
    let mut body = Writer(Vec::new());
    body.0.extend_from_slice(MAGIC);
    body.0.extend_from_slice(&VERSION.to_le_bytes());
    body.0.extend_from_slice(&0u64.to_le_bytes());
    let g = &image.geometry;
    body.u32(g.order(pfnstore_core::PageSize::Size2M));
    body.u32(g.order(pfnstore_core::PageSize::Size1G));
    body.u32(image.next_file);
    super::source_record::encode(&image.source, &mut body);
    let t = image.totals;
    for v in [t.free, t.allocated, t.quarantined, t.dirty] {
        body.u64(v);
    }
    // Runs are written as (gap from the previous run's end, length): within a chunk the gap
    // is 0, so a run costs a few bytes however large its numbers.
    body.u64(image.physical.len() as u64);
    let mut end = 0u64;
    for run in &image.physical {
        body.varint(run.pfns.start().0 - end);
        body.varint(run.pfns.len());
        body.u32(run.owner.map_or(u32::MAX, |f| f.0));
        body.u8(quarantine_code(run.quarantined) | (u8::from(run.dirty) << 7));
        end = run.pfns.end().0;
    }
    body.u64(image.files.len() as u64);
    for file in &image.files {
        body.u32(file.id.0);
        body.u64(file.pages);
        // A file's runs cover it from offset 0, one after the other: lengths only.
        body.u64(file.runs.len() as u64);
        for run in file.runs.iter() {
            body.varint(run.pages.len());
            body.u8(run_flags(run.shared, run.backed, run.quarantined));
            body.varint(run.pins.len() as u64);
            for (_, owner, count) in run.pins {
                body.u32(owner.0);
                body.u32(*count);
            }
        }
        body.u64(file.extents.len() as u64);
        let mut end = 0u64;
        for (offsets, pfn) in &file.extents {
            body.varint(offsets.start().0 - end);
            body.varint(offsets.len());
            body.varint(pfn.0);
            end = offsets.end().0;
        }
    }
    let mut out = body.0;
    let len = (out.len() - 20) as u64;
    out[12..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a snapshot, checking its magic, version, length and checksum first.
pub(crate) fn decode(bytes: &[u8]) -> Result<Image, HandoverError> {
    if bytes.len() < 24 {
        return Err(HandoverError::Truncated {
            at: bytes.len() as u64,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(HandoverError::NotASnapshot);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(HandoverError::Version {
            found: version,
            supported: VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    let expected = 20u64.saturating_add(len).saturating_add(4);
    if (bytes.len() as u64) < expected {
        return Err(HandoverError::Truncated {
            at: bytes.len() as u64,
        });
    }
    if (bytes.len() as u64) > expected {
        return Err(HandoverError::Malformed {
            at: expected,
            what: format!("{} bytes after the checksum", bytes.len() as u64 - expected),
        });
    }
    let body_end = 20 + len as usize;
    let stored = u32::from_le_bytes([
        bytes[body_end],
        bytes[body_end + 1],
        bytes[body_end + 2],
        bytes[body_end + 3],
    ]);
    let computed = crc32(&bytes[..body_end]);
    if stored != computed {
        return Err(HandoverError::Checksum { stored, computed });
    }
    let mut r = Reader::new(&bytes[20..body_end]);
    let (mid, chunk) = (r.u32()?, r.u32()?);
    let geometry = Geometry::new(mid, chunk).map_err(|e| r.malformed(e.to_string()))?;
    let next_file = r.u32()?;
    let source = super::source_record::decode(&mut r)?;
    let totals = Totals {
        free: r.u64()?,
        allocated: r.u64()?,
        quarantined: r.u64()?,
        dirty: r.u64()?,
    };
    let n = r.count(7)?;
    let mut physical = Vec::with_capacity(n);
    let mut end = 0u64;
    for _ in 0..n {
        let start = end
            .checked_add(r.varint()?)
            .ok_or_else(|| r.malformed("a run past the PFN space"))?;
        let len = r.varint()?;
        let pfns = PfnRange::from_len(Pfn(start), len)
            .map_err(|e| r.malformed(format!("bad run: {e}")))?;
        let owner = match r.u32()? {
            u32::MAX => None,
            id => Some(FileId(id)),
        };
        let code = r.u8()?;
        let quarantined = quarantine_of(code & 0x7f, &r)?;
        let dirty = code & 0x80 != 0;
        end = pfns.end().0;
        physical.push(PhysicalRun {
            pfns,
            owner,
            quarantined,
            dirty,
        });
    }
    let n = r.count(28)?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let id = FileId(r.u32()?);
        let pages = r.u64()?;
        let runs_n = r.count(3)?;
        let mut runs = FileRuns {
            ends: Vec::with_capacity(runs_n),
            flags: Vec::with_capacity(runs_n),
            pins: Vec::new(),
        };
        for _ in 0..runs_n {
            let len = r.varint()?;
            let range = OffsetRange::from_len(PageOffset(runs.end()), len)
                .map_err(|e| r.malformed(format!("bad run: {e}")))?;
            let flags = r.u8()?;
            quarantine_of(flags >> 2, &r)?;
            let pins_n = r.varint()?;
            if pins_n > 1 << 16 {
                return Err(r.malformed(format!("{pins_n} pin owners on one run")));
            }
            for _ in 0..pins_n {
                runs.pins
                    .push((runs.ends.len(), PinOwner(r.u32()?), r.u32()?));
            }
            runs.ends.push(range.end().0);
            runs.flags.push(flags);
        }
        let at = runs.end();
        if !runs.is_empty() && at != pages {
            return Err(r.malformed(format!("{id}'s runs cover {at} of its {pages} pages")));
        }
        let ext_n = r.count(3)?;
        let mut extents = Vec::with_capacity(ext_n);
        let mut end = 0u64;
        for _ in 0..ext_n {
            let start = end
                .checked_add(r.varint()?)
                .ok_or_else(|| r.malformed("an extent past the end"))?;
            let len = r.varint()?;
            let offsets = OffsetRange::from_len(pfnstore_core::PageOffset(start), len)
                .map_err(|e| r.malformed(format!("bad extent: {e}")))?;
            end = offsets.end().0;
            extents.push((offsets, Pfn(r.varint()?)));
        }
        files.push(FileImage {
            id,
            pages,
            runs,
            extents,
        });
    }
    r.finished()?;
    Ok(Image {
        geometry,
        next_file,
        source,
        totals,
        physical,
        files,
    })
}

/// The CRC-32 tables for eight bytes at a time ("slicing by 8"): `TABLES[0]` is the classic
/// byte table, `TABLES[k][b]` the CRC of byte `b` followed by `k` zero bytes. A byte at a time
/// was a third of the time to encode a fragmented store's snapshot.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
};

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let lo = crc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][w[4] as usize]
            ^ t[2][w[5] as usize]
            ^ t[1][w[6] as usize]
            ^ t[0][w[7] as usize];
    }
    for &b in words.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_runs_give_back_what_was_pushed_pins_and_all() {
        let mut runs = FileRuns::default();
        runs.push(3, true, true, None, [(PinOwner(1), 2), (PinOwner(7), 1)]);
        runs.push(4, false, true, Some(QuarantineReason::Operator), []);
        runs.push(10, false, false, None, [(PinOwner(9), 5)]);
        runs.push(11, true, false, Some(QuarantineReason::StillPinned), []);
        let got: Vec<_> = runs
            .iter()
            .map(|r| {
                let pins: Vec<_> = r.pins.iter().map(|p| (p.1.0, p.2)).collect();
                (
                    r.pages.start().0,
                    r.pages.end().0,
                    r.shared,
                    r.backed,
                    r.quarantined,
                    pins,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 3, true, true, None, vec![(1, 2), (7, 1)]),
                (3, 4, false, true, Some(QuarantineReason::Operator), vec![]),
                (4, 10, false, false, None, vec![(9, 5)]),
                (
                    10,
                    11,
                    true,
                    false,
                    Some(QuarantineReason::StillPinned),
                    vec![]
                ),
            ]
        );
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn crc32_eight_bytes_at_a_time_matches_a_byte_at_a_time() {
        let bytewise = |bytes: &[u8]| {
            let mut crc = !0u32;
            for &b in bytes {
                crc = CRC_TABLES[0][((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
            }
            !crc
        };
        let bytes: Vec<u8> = (0u32..1000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..40).chain([255, 256, 999, 1000]) {
            assert_eq!(crc32(&bytes[..len]), bytewise(&bytes[..len]), "{len} bytes");
        }
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }
}
