//! The allocation records of a shard: an ordered map from an allocation's first PFN to its
//! end, as a B+ tree.
//!
//! `std`'s `BTreeMap` did this job first and cost a third of a 2M alloc+free among 10,000
//! records; and a map of a dozen records, the usual size per shard, kept splitting and
//! merging its 11-key nodes through the global allocator. Here nodes hold [`CAP`] keys, so
//! 10,000 records are three levels deep and a dozen fit in one leaf, and they live in two
//! arenas (leaves and inner nodes) addressed by index: once the arenas have grown, nothing is
//! allocated.
//!
//! A node is searched from its first key up. A branch-free binary search was tried first:
//! it makes each search a chain of five dependent loads per node, and measured slower than
//! the scan, whose branches the predictor gets right when the same region is used again and
//! again (the common case: a VM's memory is handed out and given back in one place).
//!
//! Unused key slots hold `u64::MAX`, above every PFN, so that a scan stops at the end of a
//! node without looking at its length. Nodes are cache-line aligned: a shard's nodes share no
//! line with another shard's (the first leaves of all shards are allocated together, and
//! two threads writing neighbouring leaves halved the throughput of two threads).

/// Keys per node (children per inner node).
const CAP: usize = 32;
/// A node other than the root that falls below this many keys (children) is refilled from a
/// sibling or merged with it. A quarter of `CAP`, not a half: a node that was just split or
/// merged is far from both limits, so alternating inserts and removes never thrash.
const MIN: usize = CAP / 4;
/// More levels than any map can need: every inner node below the root has at least `MIN`
/// children and nodes are indexed by `u32`.
const MAX_HEIGHT: usize = 16;
/// The key of an unused slot.
const VACANT: u64 = u64::MAX;

#[derive(Debug, Clone)]
#[repr(align(64))]
struct Leaf {
    len: usize,
    keys: [u64; CAP],
    values: [u64; CAP],
}

/// `kids[i]` holds the keys `>= keys[i - 1]` and `< keys[i]`: `keys[i]` separates child `i`
/// from child `i + 1`, so a node of `len` children uses `len - 1` keys.
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Inner {
    len: usize,
    keys: [u64; CAP],
    kids: [u32; CAP],
}

/// An ordered map `u64 -> u64` (allocation start -> end).
#[derive(Debug)]
pub(crate) struct Records {
    leaves: Vec<Leaf>,
    inners: Vec<Inner>,
    vacant_leaves: Vec<u32>,
    vacant_inners: Vec<u32>,
    root: u32,
    /// Inner levels above the leaves (0: the root is a leaf).
    height: usize,
    len: usize,
}

/// How many of `keys` (sorted, `VACANT` at the end) are `<= x`.
#[inline(always)]
fn rank(keys: &[u64; CAP], x: u64) -> usize {
    keys.iter().take_while(|&&k| k <= x).count()
}

/// Returns an index into an arena: arenas hold fewer than 2^32 nodes because a shard holds
/// fewer than 2^32 allocations (each spans a page of its chunks).
fn index(len: usize) -> u32 {
    u32::try_from(len).expect("a shard holds fewer than 2^32 allocations")
}

impl Records {
    pub(crate) fn new() -> Records {
        Records {
            leaves: vec![Leaf::empty()],
            inners: Vec::new(),
            vacant_leaves: Vec::new(),
            vacant_inners: Vec::new(),
            root: 0,
            height: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The leaf `key` belongs in, and the inner nodes above it with the child taken in each
    /// (root first, `height` of them).
    #[inline(always)]
    fn descend(&self, key: u64, path: &mut [(u32, usize); MAX_HEIGHT]) -> u32 {
        let mut node = self.root;
        for step in path.iter_mut().take(self.height) {
            let inner = &self.inners[node as usize];
            let c = rank(&inner.keys, key);
            *step = (node, c);
            node = inner.kids[c];
        }
        node
    }

    /// The leaf `key` belongs in.
    #[inline(always)]
    fn leaf_of(&self, key: u64) -> u32 {
        let mut node = self.root;
        for _ in 0..self.height {
            let inner = &self.inners[node as usize];
            node = inner.kids[rank(&inner.keys, key)];
        }
        node
    }

    /// The value of `key`, if it is in the map.
    pub(crate) fn get(&self, key: u64) -> Option<u64> {
        let leaf = &self.leaves[self.leaf_of(key) as usize];
        let r = rank(&leaf.keys, key);
        (r > 0 && leaf.keys[r - 1] == key).then(|| leaf.values[r - 1])
    }

    /// The entry with the greatest key `<= key`.
    pub(crate) fn last_at_or_below(&self, key: u64) -> Option<(u64, u64)> {
        let mut node = self.root;
        // The subtree just before the path, at the deepest level that has one: where the
        // answer is if the leaf reached holds no key `<= key` (separators are lower bounds,
        // not the least keys, once keys have been removed).
        let mut before = None;
        for level in 0..self.height {
            let inner = &self.inners[node as usize];
            let c = rank(&inner.keys, key);
            if c > 0 {
                before = Some((inner.kids[c - 1], level + 1));
            }
            node = inner.kids[c];
        }
        let leaf = &self.leaves[node as usize];
        let r = rank(&leaf.keys, key);
        if r > 0 {
            return Some((leaf.keys[r - 1], leaf.values[r - 1]));
        }
        let (mut node, level) = before?;
        for _ in level..self.height {
            let inner = &self.inners[node as usize];
            node = inner.kids[inner.len - 1];
        }
        let leaf = &self.leaves[node as usize];
        // Leaves other than the root hold at least `MIN` keys.
        Some((leaf.keys[leaf.len - 1], leaf.values[leaf.len - 1]))
    }

    /// Adds `key -> value`; `key` must not be in the map (callers check first).
    pub(crate) fn insert(&mut self, key: u64, value: u64) {
        debug_assert!(key != VACANT && self.get(key).is_none());
        let leaf = self.leaf_of(key);
        let l = &mut self.leaves[leaf as usize];
        if l.len == CAP {
            self.insert_splitting(key, value);
            return;
        }
        let pos = rank(&l.keys, key);
        l.insert_at(pos, key, value);
        self.len += 1;
    }

    /// [`Records::insert`] into a full leaf: the path is needed, so it descends again.
    #[cold]
    fn insert_splitting(&mut self, key: u64, value: u64) {
        let mut path = [(0, 0); MAX_HEIGHT];
        let leaf = self.descend(key, &mut path);
        self.len += 1;
        let l = &mut self.leaves[leaf as usize];
        let pos = rank(&l.keys, key);
        // The upper half moves to a new leaf, the new key goes to its side.
        let mut right = Leaf::empty();
        let h = CAP / 2;
        right.keys[..CAP - h].copy_from_slice(&l.keys[h..]);
        right.values[..CAP - h].copy_from_slice(&l.values[h..]);
        right.len = CAP - h;
        l.keys[h..].fill(VACANT);
        l.len = h;
        if pos <= h {
            l.insert_at(pos, key, value);
        } else {
            right.insert_at(pos - h, key, value);
        }
        let separator = right.keys[0];
        let right = self.new_leaf(right);
        self.insert_child(&path, self.height, separator, right);
    }

    /// Adds child `node`, holding the keys `>= separator`, right after the child taken at
    /// `path[level - 1]`; splits inner nodes up the path as needed.
    fn insert_child(
        &mut self,
        path: &[(u32, usize); MAX_HEIGHT],
        mut level: usize,
        mut separator: u64,
        mut node: u32,
    ) {
        while level > 0 {
            level -= 1;
            let (parent, c) = path[level];
            let p = &mut self.inners[parent as usize];
            if p.len < CAP {
                p.insert_at(c + 1, separator, node);
                return;
            }
            let h = CAP / 2;
            let mut right = Inner::empty();
            right.kids[..CAP - h].copy_from_slice(&p.kids[h..]);
            right.keys[..CAP - h - 1].copy_from_slice(&p.keys[h..CAP - 1]);
            right.len = CAP - h;
            let up = p.keys[h - 1];
            p.keys[h - 1..].fill(VACANT);
            p.len = h;
            if c < h {
                p.insert_at(c + 1, separator, node);
            } else {
                right.insert_at(c + 1 - h, separator, node);
            }
            separator = up;
            node = self.new_inner(right);
        }
        // The root was split: a new root above the two halves.
        let mut root = Inner::empty();
        root.kids[0] = self.root;
        root.kids[1] = node;
        root.keys[0] = separator;
        root.len = 2;
        self.root = self.new_inner(root);
        self.height += 1;
        assert!(
            self.height < MAX_HEIGHT,
            "MAX_HEIGHT levels hold more than 2^32 records"
        );
    }

    /// Removes `key` and returns its value, if it is in the map.
    pub(crate) fn remove(&mut self, key: u64) -> Option<u64> {
        let leaf = self.leaf_of(key);
        let l = &mut self.leaves[leaf as usize];
        let r = rank(&l.keys, key);
        if r == 0 || l.keys[r - 1] != key {
            return None;
        }
        let value = l.values[r - 1];
        l.remove_at(r - 1);
        self.len -= 1;
        if l.len < MIN && self.height > 0 {
            // Routing depends on the separators only, so the same key leads to the same leaf.
            let mut path = [(0, 0); MAX_HEIGHT];
            self.descend(key, &mut path);
            self.rebalance(&path, self.height);
        }
        Some(value)
    }

    /// The child taken at `path[level - 1]` is below `MIN`: refill it from a neighbour or
    /// merge the two, and carry on up if that leaves the parent below `MIN`.
    #[cold]
    fn rebalance(&mut self, path: &[(u32, usize); MAX_HEIGHT], mut level: usize) {
        loop {
            let (parent, c) = path[level - 1];
            // Pair the child with its left neighbour if it has one, else with its right one.
            let s = if c > 0 { c - 1 } else { c };
            let p = &self.inners[parent as usize];
            let (left, right, separator) = (p.kids[s], p.kids[s + 1], p.keys[s]);
            let merged = if level == self.height {
                self.balance_leaves(left, right)
            } else {
                self.balance_inners(left, right, separator)
            };
            let p = &mut self.inners[parent as usize];
            match merged {
                Some(separator) => {
                    p.keys[s] = separator;
                    return;
                }
                None => p.remove_at(s + 1),
            }
            if level == 1 {
                // The root: drop it once it has a single child.
                if p.len == 1 {
                    let only = p.kids[0];
                    self.vacant_inners.push(parent);
                    self.root = only;
                    self.height -= 1;
                }
                return;
            }
            if p.len >= MIN {
                return;
            }
            level -= 1;
        }
    }

    /// Spreads the keys of two neighbouring leaves evenly, or moves them all into `left` if
    /// they fit; returns the new separator, or `None` when `right` was merged (and freed).
    fn balance_leaves(&mut self, left: u32, right: u32) -> Option<u64> {
        let (l, r) = (&self.leaves[left as usize], &self.leaves[right as usize]);
        let total = l.len + r.len;
        let mut keys = [VACANT; 2 * CAP];
        let mut values = [0; 2 * CAP];
        keys[..l.len].copy_from_slice(&l.keys[..l.len]);
        keys[l.len..total].copy_from_slice(&r.keys[..r.len]);
        values[..l.len].copy_from_slice(&l.values[..l.len]);
        values[l.len..total].copy_from_slice(&r.values[..r.len]);
        let h = if total <= CAP { total } else { total / 2 };
        let l = &mut self.leaves[left as usize];
        l.keys = [VACANT; CAP];
        l.keys[..h].copy_from_slice(&keys[..h]);
        l.values[..h].copy_from_slice(&values[..h]);
        l.len = h;
        if h == total {
            self.vacant_leaves.push(right);
            return None;
        }
        let r = &mut self.leaves[right as usize];
        r.keys = [VACANT; CAP];
        r.keys[..total - h].copy_from_slice(&keys[h..total]);
        r.values[..total - h].copy_from_slice(&values[h..total]);
        r.len = total - h;
        Some(r.keys[0])
    }

    /// As [`Records::balance_leaves`] for two neighbouring inner nodes that `separator`
    /// separates.
    fn balance_inners(&mut self, left: u32, right: u32, separator: u64) -> Option<u64> {
        let (l, r) = (&self.inners[left as usize], &self.inners[right as usize]);
        let total = l.len + r.len;
        // The children of both in order, and the keys between them: the left node's, the
        // separator, the right node's.
        let mut kids = [0; 2 * CAP];
        let mut keys = [VACANT; 2 * CAP];
        kids[..l.len].copy_from_slice(&l.kids[..l.len]);
        kids[l.len..total].copy_from_slice(&r.kids[..r.len]);
        keys[..l.len - 1].copy_from_slice(&l.keys[..l.len - 1]);
        keys[l.len - 1] = separator;
        keys[l.len..total - 1].copy_from_slice(&r.keys[..r.len - 1]);
        let h = if total <= CAP { total } else { total / 2 };
        let l = &mut self.inners[left as usize];
        l.keys = [VACANT; CAP];
        l.kids[..h].copy_from_slice(&kids[..h]);
        l.keys[..h - 1].copy_from_slice(&keys[..h - 1]);
        l.len = h;
        if h == total {
            self.vacant_inners.push(right);
            return None;
        }
        let r = &mut self.inners[right as usize];
        r.keys = [VACANT; CAP];
        r.kids[..total - h].copy_from_slice(&kids[h..total]);
        r.keys[..total - h - 1].copy_from_slice(&keys[h..total - 1]);
        r.len = total - h;
        Some(keys[h - 1])
    }

    fn new_leaf(&mut self, leaf: Leaf) -> u32 {
        match self.vacant_leaves.pop() {
            Some(i) => {
                self.leaves[i as usize] = leaf;
                i
            }
            None => {
                self.leaves.push(leaf);
                index(self.leaves.len() - 1)
            }
        }
    }

    fn new_inner(&mut self, inner: Inner) -> u32 {
        match self.vacant_inners.pop() {
            Some(i) => {
                self.inners[i as usize] = inner;
                i
            }
            None => {
                self.inners.push(inner);
                index(self.inners.len() - 1)
            }
        }
    }

    /// Every entry in key order (for checks: O(entries)).
    pub(crate) fn entries(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.len);
        self.collect(self.root, self.height, &mut out);
        out
    }

    fn collect(&self, node: u32, height: usize, out: &mut Vec<(u64, u64)>) {
        if height == 0 {
            let l = &self.leaves[node as usize];
            out.extend(
                l.keys[..l.len]
                    .iter()
                    .copied()
                    .zip(l.values[..l.len].iter().copied()),
            );
        } else {
            let n = &self.inners[node as usize];
            for &kid in &n.kids[..n.len] {
                self.collect(kid, height - 1, out);
            }
        }
    }

    /// Verifies the tree: keys ascending and within their separators, unused slots vacant,
    /// every node but the root at least `MIN` full, all leaves at one depth, the count.
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut count = 0;
        self.check_node(self.root, self.height, (0, VACANT), true, &mut count)?;
        if count != self.len {
            return Err(format!("records: {count} entries, counted {}", self.len));
        }
        Ok(())
    }

    fn check_node(
        &self,
        node: u32,
        height: usize,
        (low, high): (u64, u64),
        root: bool,
        count: &mut usize,
    ) -> Result<(), String> {
        // The keys in use and the whole key array of the node.
        let (len, used, all) = if height == 0 {
            let l = &self.leaves[node as usize];
            *count += l.len;
            (l.len, l.len, &l.keys)
        } else {
            let n = &self.inners[node as usize];
            (n.len, n.len.saturating_sub(1), &n.keys)
        };
        let least = match (root, height) {
            (false, _) => MIN,
            (true, 0) => 0,
            (true, _) => 2,
        };
        if len > CAP || len < least {
            return Err(format!("records: a node at height {height} holds {len}"));
        }
        let keys = &all[..used];
        if all[used..].iter().any(|&k| k != VACANT) {
            return Err(format!(
                "records: a slot past the end in use at height {height}"
            ));
        }
        if keys.windows(2).any(|w| w[0] >= w[1]) || keys.iter().any(|&k| k < low || k >= high) {
            return Err(format!(
                "records: keys out of order or outside {low:#x}..{high:#x}"
            ));
        }
        if height > 0 {
            let n = &self.inners[node as usize];
            for (i, &kid) in n.kids[..n.len].iter().enumerate() {
                let lo = if i == 0 { low } else { n.keys[i - 1] };
                let hi = if i + 1 == n.len { high } else { n.keys[i] };
                self.check_node(kid, height - 1, (lo, hi), false, count)?;
            }
        }
        Ok(())
    }
}

impl Leaf {
    fn empty() -> Leaf {
        Leaf {
            len: 0,
            keys: [VACANT; CAP],
            values: [0; CAP],
        }
    }

    fn insert_at(&mut self, pos: usize, key: u64, value: u64) {
        // Skipped when there is nothing to move: a copy is a call to `memmove`.
        if pos < self.len {
            self.keys.copy_within(pos..self.len, pos + 1);
            self.values.copy_within(pos..self.len, pos + 1);
        }
        self.keys[pos] = key;
        self.values[pos] = value;
        self.len += 1;
    }

    fn remove_at(&mut self, pos: usize) {
        if pos + 1 < self.len {
            self.keys.copy_within(pos + 1..self.len, pos);
            self.values.copy_within(pos + 1..self.len, pos);
        }
        self.len -= 1;
        self.keys[self.len] = VACANT;
    }
}

impl Inner {
    fn empty() -> Inner {
        Inner {
            len: 0,
            keys: [VACANT; CAP],
            kids: [0; CAP],
        }
    }

    /// Inserts child `kid` at `pos` (>= 1) with `separator` as its lower bound.
    fn insert_at(&mut self, pos: usize, separator: u64, kid: u32) {
        debug_assert!(pos >= 1 && self.len < CAP);
        self.kids.copy_within(pos..self.len, pos + 1);
        self.keys.copy_within(pos - 1..self.len - 1, pos);
        self.kids[pos] = kid;
        self.keys[pos - 1] = separator;
        self.len += 1;
    }

    /// Removes child `pos` (>= 1) and the separator below it.
    fn remove_at(&mut self, pos: usize) {
        debug_assert!(pos >= 1 && pos < self.len);
        self.kids.copy_within(pos + 1..self.len, pos);
        self.keys.copy_within(pos..self.len - 1, pos - 1);
        self.len -= 1;
        self.keys[self.len - 1] = VACANT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pfnstore_core::testing::XorShift;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
    }

    fn op(keys: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..keys).prop_map(Op::Insert),
            2 => (0..keys).prop_map(Op::Remove),
        ]
    }

    /// Replays `ops` on the tree and on a `BTreeMap`, comparing every answer and checking
    /// the tree after every step.
    fn replay(ops: &[Op], probes: u64) -> Result<(), TestCaseError> {
        let mut tree = Records::new();
        let mut model = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Insert(k) => {
                    if let std::collections::btree_map::Entry::Vacant(e) = model.entry(k) {
                        e.insert(i as u64);
                        tree.insert(k, i as u64);
                    }
                }
                Op::Remove(k) => prop_assert_eq!(tree.remove(k), model.remove(&k)),
            }
            tree.check().map_err(TestCaseError::fail)?;
            prop_assert_eq!(tree.len(), model.len());
        }
        prop_assert_eq!(
            tree.entries(),
            model.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>()
        );
        for x in 0..probes {
            prop_assert_eq!(tree.get(x), model.get(&x).copied());
            prop_assert_eq!(
                tree.last_at_or_below(x),
                model.range(..=x).next_back().map(|(&k, &v)| (k, v))
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Few keys: one leaf, splits of the root and merges back.
        #[test]
        fn matches_a_btree_map_small(ops in prop::collection::vec(op(80), 1..300)) {
            replay(&ops, 81)?;
        }

        /// Enough keys for three levels, then removals (with some inserts) down to a few
        /// percent: splits, refills and merges of inner nodes at every level.
        #[test]
        fn matches_a_btree_map_deep(seed in any::<u64>(), n in 500u64..6000, keep in 0u64..20) {
            let mut rng = XorShift::new(seed | 1);
            let mut next = move |bound: u64| rng.below(bound);
            let mut tree = Records::new();
            let mut model = BTreeMap::new();
            let mut step = 0u64;
            let check = |tree: &Records, model: &BTreeMap<u64, u64>, step: u64| {
                if step.is_multiple_of(64) {
                    tree.check().map_err(TestCaseError::fail)?;
                    prop_assert_eq!(tree.len(), model.len());
                }
                Ok(())
            };
            while (model.len() as u64) < n {
                let k = next(4 * n);
                step += 1;
                if let std::collections::btree_map::Entry::Vacant(e) = model.entry(k) {
                    e.insert(step);
                    tree.insert(k, step);
                }
                check(&tree, &model, step)?;
            }
            while model.len() as u64 > n * keep / 100 {
                let k = next(4 * n);
                step += 1;
                if next(8) == 0 {
                    if let std::collections::btree_map::Entry::Vacant(e) = model.entry(k) {
                        e.insert(step);
                        tree.insert(k, step);
                    }
                } else {
                    // Mostly a key that is there (the next one up from `k`), sometimes `k`.
                    let k = match model.range(k..).next() {
                        Some((&present, _)) if next(4) != 0 => present,
                        _ => k,
                    };
                    prop_assert_eq!(tree.remove(k), model.remove(&k));
                }
                prop_assert_eq!(
                    tree.last_at_or_below(k),
                    model.range(..=k).next_back().map(|(&k, &v)| (k, v))
                );
                check(&tree, &model, step)?;
            }
            tree.check().map_err(TestCaseError::fail)?;
            prop_assert_eq!(
                tree.entries(),
                model.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn grows_and_shrinks_through_many_levels() {
        let mut tree = Records::new();
        let n = 40_000u64;
        // Interleaved order, so that splits happen everywhere, not only at the right edge.
        for i in 0..n {
            let k = (i * 7919) % n;
            tree.insert(k * 2, k);
        }
        tree.check().unwrap();
        assert!(tree.height >= 3);
        assert_eq!(tree.last_at_or_below(2 * 500 + 1), Some((1000, 500)));
        for i in 0..n {
            let k = (i * 104_729) % n;
            assert_eq!(tree.remove(k * 2), Some(k));
            if i % 997 == 0 {
                tree.check().unwrap();
            }
        }
        tree.check().unwrap();
        assert_eq!((tree.len(), tree.height), (0, 0));
        assert_eq!(tree.last_at_or_below(u64::MAX - 1), None);
    }
}
