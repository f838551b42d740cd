//! Up to four `u32`s packed in one `u128`: the small lists of the conversion fast path.
//!
//! An array built element by element with a variable index lives in memory, and copying it
//! afterwards with wide loads stalls on store forwarding (measured: most of the fast path's
//! time). Packed in an integer, the list stays in registers.

/// At most four `u32`s, in order.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Packed4 {
    bits: u128,
    len: u32,
}

impl Packed4 {
    pub(crate) const CAPACITY: usize = 4;

    /// The first `len` values of `values` (`len <= 4`).
    #[inline]
    pub(crate) fn from_array(values: [u32; 4], len: usize) -> Packed4 {
        let bits = values
            .iter()
            .rev()
            .fold(0u128, |acc, &v| (acc << 32) | u128::from(v));
        let keep = if len >= Self::CAPACITY {
            u128::MAX
        } else {
            (1u128 << (32 * len)) - 1
        };
        Packed4 {
            bits: bits & keep,
            len: len.min(Self::CAPACITY) as u32,
        }
    }

    /// The values, zero-padded to four.
    #[inline]
    pub(crate) fn to_array(self) -> [u32; 4] {
        [0, 1, 2, 3].map(|i| (self.bits >> (32 * i)) as u32)
    }

    #[inline]
    pub(crate) fn len(self) -> usize {
        self.len as usize
    }

    #[inline]
    pub(crate) fn is_empty(self) -> bool {
        self.len == 0
    }

    #[inline]
    pub(crate) fn first(self) -> Option<u32> {
        (self.len > 0).then_some(self.bits as u32)
    }

    #[inline]
    pub(crate) fn last(self) -> Option<u32> {
        self.len
            .checked_sub(1)
            .map(|i| (self.bits >> (32 * i)) as u32)
    }

    /// Appends `value`; `None` (and no change) when the list is full.
    #[inline]
    pub(crate) fn push(&mut self, value: u32) -> Option<()> {
        if self.len() == Self::CAPACITY {
            return None;
        }
        self.bits |= u128::from(value) << (32 * self.len);
        self.len += 1;
        Some(())
    }

    /// Whether `value` is in the list.
    #[inline]
    pub(crate) fn contains(self, value: u32) -> bool {
        self.iter().any(|v| v == value)
    }

    /// The values of `self` that are not in `other`, in order.
    #[inline]
    pub(crate) fn without(self, other: Packed4) -> Packed4 {
        let mut out = Packed4::default();
        for v in self.iter().filter(|&v| !other.contains(v)) {
            // A sub-list of a list of at most four.
            let _ = out.push(v);
        }
        out
    }

    /// The values in order.
    #[inline]
    pub(crate) fn iter(self) -> impl Iterator<Item = u32> + Clone {
        (0..self.len).map(move |i| (self.bits >> (32 * i)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_in_order_and_refuses_a_fifth() {
        let mut p = Packed4::default();
        assert!(p.is_empty());
        assert_eq!(p.last(), None);
        for v in [7, u32::MAX, 0, 9] {
            p.push(v).unwrap();
        }
        assert_eq!(p.push(1), None);
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![7, u32::MAX, 0, 9]);
        assert_eq!(p.last(), Some(9));
        assert_eq!(p.to_array(), [7, u32::MAX, 0, 9]);
        let q = Packed4::from_array([3, 4, 5, 6], 2);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(q.to_array(), [3, 4, 0, 0]);
        assert_eq!(q.len(), 2);
        let mut r = Packed4::default();
        for v in [1, 2, 3, 4] {
            r.push(v).unwrap();
        }
        assert_eq!(Packed4::from_array([1, 2, 3, 4], 4), r);
        assert_eq!((r.first(), Packed4::default().first()), (Some(1), None));
        assert!(r.contains(3) && !r.contains(5));
        assert_eq!(r.without(q).iter().collect::<Vec<_>>(), vec![1, 2]);
        assert!(q.without(r).is_empty());
    }
}
