//! A vector that keeps its first few elements inline, so the common small results of the hot
//! paths (one split mid, one chunk) never touch the heap.

#[derive(Clone, Debug)]
pub(crate) enum InlineVec<T: Copy + Default, const N: usize> {
    Inline { len: usize, items: [T; N] },
    Heap(Vec<T>),
}

impl<T: Copy + Default, const N: usize> Default for InlineVec<T, N> {
    fn default() -> Self {
        InlineVec::Inline {
            len: 0,
            items: [T::default(); N],
        }
    }
}

impl<T: Copy + Default, const N: usize> InlineVec<T, N> {
    pub(crate) fn push(&mut self, value: T) {
        match self {
            InlineVec::Inline { len, items } if *len < N => {
                items[*len] = value;
                *len += 1;
            }
            InlineVec::Inline { items, .. } => {
                let mut spilled = Vec::with_capacity(2 * N + 1);
                spilled.extend_from_slice(items);
                spilled.push(value);
                *self = InlineVec::Heap(spilled);
            }
            InlineVec::Heap(v) => v.push(value),
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            InlineVec::Inline { len, items } => &items[..*len],
            InlineVec::Heap(v) => v,
        }
    }

    /// The last element that satisfies `pred`.
    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        match self {
            InlineVec::Inline { len, items } => items[..*len].get_mut(index),
            InlineVec::Heap(v) => v.get_mut(index),
        }
    }

    pub(crate) fn last_mut(&mut self) -> Option<&mut T> {
        match self {
            InlineVec::Inline { len, items } => items[..*len].last_mut(),
            InlineVec::Heap(v) => v.last_mut(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl<T: Copy + Default + PartialEq, const N: usize> PartialEq for InlineVec<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Default + Eq, const N: usize> Eq for InlineVec<T, N> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_past_capacity_and_compares_by_content() {
        let mut a: InlineVec<u32, 2> = InlineVec::default();
        let mut b: InlineVec<u32, 2> = InlineVec::default();
        for i in 0..5 {
            a.push(i);
        }
        b.push(0);
        assert!(matches!(a, InlineVec::Heap(_)));
        assert_eq!(a.as_slice(), &[0, 1, 2, 3, 4]);
        assert_ne!(a, b);
        *b.get_mut(0).unwrap() = 9;
        assert_eq!(b.get_mut(1), None);
        assert_eq!(a.get_mut(2).copied(), Some(2));
        assert_eq!(b.as_slice(), &[9]);
        assert!(!b.is_empty());
    }
}
