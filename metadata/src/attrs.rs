//! The attribute values the store keeps per page range.

use std::fmt;

/// Whether the host may map a page (shared) or only the guest (private).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord, Default)]
pub enum Shareability {
    /// The host (VMM, devices through the host view) may access the page.
    Shared,
    /// Only the guest may access the page: what confidential memory is unless converted.
    #[default]
    Private,
}

impl Shareability {
    /// The other value.
    pub const fn flipped(self) -> Shareability {
        match self {
            Shareability::Shared => Shareability::Private,
            Shareability::Private => Shareability::Shared,
        }
    }
}

/// Who holds a pin (a device, an IOMMU domain, a TD): an opaque id chosen by the caller.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct PinOwner(pub u32);

/// The guest-memory file that owns a page: an opaque id chosen by the caller.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// Why a range was quarantined (it must never be handed out again).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum QuarantineReason {
    /// A subscriber failed to unmap the range.
    UnmapFailed,
    /// Scrubbing (zeroing) the range failed.
    ScrubFailed,
    /// An operator asked for it.
    Operator,
    /// The memory was still pinned for DMA when its file went away: a device may reach it.
    StillPinned,
}

impl fmt::Display for PinOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pin owner {}", self.0)
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file {}", self.0)
    }
}

/// The pins held on a page: owner → count, sorted by owner, every count non-zero.
///
/// Several owners may pin the same page, and one owner may pin it several times. The set is
/// stored behind one thin pointer (null when empty) so that an unpinned range costs nothing
/// beyond the 8-byte field.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct PinSet {
    // Canonical: `None` when empty; the vector is sorted by owner, counts > 0, capacity == len.
    // The box keeps the field one pointer wide, which keeps a chunk slot in one cache line.
    #[allow(clippy::box_collection)]
    entries: Option<Box<Vec<(PinOwner, u32)>>>,
}

impl PinSet {
    /// The empty set.
    pub const EMPTY: PinSet = PinSet { entries: None };

    /// Whether nobody pins the page.
    pub fn is_empty(&self) -> bool {
        self.entries.is_none()
    }

    /// How many times `owner` pins the page.
    pub fn count(&self, owner: PinOwner) -> u32 {
        self.as_slice()
            .binary_search_by_key(&owner, |&(o, _)| o)
            .map_or(0, |i| self.as_slice()[i].1)
    }

    /// The owners and their counts, by ascending owner.
    pub fn iter(&self) -> impl Iterator<Item = (PinOwner, u32)> + '_ {
        self.as_slice().iter().copied()
    }

    /// The smallest owner holding a pin, if any (the one errors name).
    pub fn first_owner(&self) -> Option<PinOwner> {
        self.as_slice().first().map(|&(o, _)| o)
    }

    /// The set with `owner`'s count raised by `times`, or `None` if it would overflow a u32.
    pub fn with_added(&self, owner: PinOwner, times: u32) -> Option<PinSet> {
        let mut entries = self.as_slice().to_vec();
        match entries.binary_search_by_key(&owner, |&(o, _)| o) {
            Ok(i) => entries[i].1 = entries[i].1.checked_add(times)?,
            Err(i) if times > 0 => entries.insert(i, (owner, times)),
            Err(_) => {}
        }
        Some(PinSet::from_sorted(entries))
    }

    /// The set with one pin of `owner` dropped, or `None` if `owner` holds no pin.
    pub fn with_removed(&self, owner: PinOwner) -> Option<PinSet> {
        let mut entries = self.as_slice().to_vec();
        let i = entries.binary_search_by_key(&owner, |&(o, _)| o).ok()?;
        entries[i].1 -= 1;
        if entries[i].1 == 0 {
            entries.remove(i);
        }
        Some(PinSet::from_sorted(entries))
    }

    /// Heap bytes this set owns.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.entries.as_ref().map_or(0, |v| {
            std::mem::size_of::<Vec<(PinOwner, u32)>>()
                + v.capacity() * std::mem::size_of::<(PinOwner, u32)>()
        })
    }

    fn as_slice(&self) -> &[(PinOwner, u32)] {
        self.entries.as_deref().map_or(&[], |v| v.as_slice())
    }

    fn from_sorted(entries: Vec<(PinOwner, u32)>) -> PinSet {
        if entries.is_empty() {
            PinSet::EMPTY
        } else {
            // Exact capacity keeps the byte count a function of the content alone.
            PinSet {
                entries: Some(Box::new(entries.into_boxed_slice().into_vec())),
            }
        }
    }
}

impl fmt::Debug for PinSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(o, c)| (o.0, c)))
            .finish()
    }
}

/// Everything the store knows about one page.
#[derive(Clone, PartialEq, Eq, Debug, Hash)]
pub struct Attributes {
    /// Shared or private.
    pub shareability: Shareability,
    /// The guest-memory file the page belongs to, if any.
    pub owner: Option<FileId>,
    /// Set once the page must never be reused, with the reason.
    pub quarantined: Option<QuarantineReason>,
    /// The page held a VM's data and must be scrubbed before reuse.
    pub dirty: bool,
    /// Who pins the page for DMA, and how often.
    pub pins: PinSet,
}

impl Attributes {
    /// The part of the attributes that decides how the page may be mapped.
    pub fn mapping(&self) -> MappingAttributes {
        MappingAttributes {
            shareability: self.shareability,
            owner: self.owner,
        }
    }
}

/// The attributes that decide how memory may be mapped: a huge mapping must not span a
/// shareability change or two owners. Pins, quarantine and scrub state are deliberately
/// absent: a DMA pin on one 4K page must not split a 1G mapping, and quarantining a page
/// (its unmap could not be undone) must not change the shape of what the healthy users of
/// the memory have mapped, or the next plan would tell them to unmap blocks they never got.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct MappingAttributes {
    /// Shared or private.
    pub shareability: Shareability,
    /// The owning file, if any.
    pub owner: Option<FileId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_set_counts_and_canonical_empty() {
        let a = PinOwner(3);
        let b = PinOwner(1);
        let set = PinSet::EMPTY
            .with_added(a, 2)
            .unwrap()
            .with_added(b, 1)
            .unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(b, 1), (a, 2)]);
        assert_eq!(set.first_owner(), Some(b));
        assert_eq!(set.count(a), 2);
        assert_eq!(set.count(PinOwner(9)), 0);
        let set = set.with_removed(b).unwrap();
        assert_eq!(set.first_owner(), Some(a));
        assert!(set.with_removed(b).is_none());
        let empty = set.with_removed(a).unwrap().with_removed(a).unwrap();
        assert_eq!(empty, PinSet::EMPTY);
        assert!(empty.is_empty());
        assert_eq!(empty.heap_bytes(), 0);
    }

    #[test]
    fn pin_overflow_is_refused() {
        let set = PinSet::EMPTY.with_added(PinOwner(0), u32::MAX).unwrap();
        assert!(set.with_added(PinOwner(0), 1).is_none());
        assert!(set.with_added(PinOwner(1), 1).is_some());
    }
}
