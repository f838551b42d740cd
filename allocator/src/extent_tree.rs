//! A set of disjoint, coalesced PFN runs in a treap whose nodes carry, for every subtree, the
//! maximum of each [`Field`] capacity.
//!
//! The maxima make "the lowest-addressed run with capacity `field >= n`" a single root-to-leaf
//! descent, O(log runs), whatever the number of holes: that is the query every placement rule
//! is made of. A run is one node, however many pages it spans; nothing is kept per page.
//!
//! The tree is an arena (`Vec<Node>` with a free list) so that node churn on the hot path does
//! not go through the global allocator.

use crate::shape::{Capacities, FIELDS, Field, RunShape, Shape};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node {
    start: u64,
    end: u64,
    prio: u32,
    left: u32,
    right: u32,
    own: Capacities,
    best: Capacities,
}

/// Sums over all runs of a tree, kept up to date on every change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub pages: u64,
    pub runs: u64,
    pub whole_mids: u64,
    pub whole_chunks: u64,
}

/// The runs of one kind (free, or free-and-clean) of one shard.
#[derive(Debug)]
pub(crate) struct ExtentTree {
    shape: Shape,
    nodes: Vec<Node>,
    vacant: Vec<u32>,
    root: u32,
    rng: u64,
    totals: Totals,
}

impl ExtentTree {
    pub(crate) fn new(shape: Shape) -> ExtentTree {
        ExtentTree {
            shape,
            nodes: Vec::new(),
            vacant: Vec::new(),
            root: NIL,
            rng: 0x9E37_79B9_7F4A_7C15,
            totals: Totals::default(),
        }
    }

    pub(crate) fn totals(&self) -> Totals {
        self.totals
    }

    /// The largest value of `field` over all runs (0 when empty).
    pub(crate) fn max(&self, field: Field) -> u64 {
        if self.root == NIL {
            0
        } else {
            self.nodes[self.root as usize].best[field as usize]
        }
    }

    /// The run with the greatest start `<= pfn`.
    pub(crate) fn find_le(&self, pfn: u64) -> Option<(u64, u64)> {
        let mut t = self.root;
        let mut found = None;
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.start <= pfn {
                found = Some((n.start, n.end));
                t = n.right;
            } else {
                t = n.left;
            }
        }
        found
    }

    /// The run with the least start `>= pfn`.
    pub(crate) fn find_ge(&self, pfn: u64) -> Option<(u64, u64)> {
        let mut t = self.root;
        let mut found = None;
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.start >= pfn {
                found = Some((n.start, n.end));
                t = n.left;
            } else {
                t = n.right;
            }
        }
        found
    }

    /// The run that contains `pfn`.
    pub(crate) fn containing(&self, pfn: u64) -> Option<(u64, u64)> {
        self.find_le(pfn).filter(|&(_, end)| end > pfn)
    }

    /// The lowest-addressed run whose `field` capacity is at least `min`.
    pub(crate) fn leftmost_with(&self, field: Field, min: u64) -> Option<(u64, u64)> {
        let f = field as usize;
        let mut t = self.root;
        if t == NIL || self.nodes[t as usize].best[f] < min {
            return None;
        }
        // Invariant: the subtree at `t` holds a qualifying run.
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.left != NIL && self.nodes[n.left as usize].best[f] >= min {
                t = n.left;
            } else if n.own[f] >= min {
                return Some((n.start, n.end));
            } else {
                t = n.right;
            }
        }
        None
    }

    /// Adds `[start, end)`, merging it with every run it overlaps or touches.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        debug_assert!(start < end);
        let (mut lo, mut hi) = (start, end);
        let mut kept = None;
        if let Some((ls, le)) = self.find_le(start)
            && le >= start
        {
            lo = ls;
            hi = hi.max(le);
            kept = Some((ls, le));
        }
        let mut probe = kept.map_or(start, |(ls, _)| ls + 1);
        while let Some((ns, ne)) = self.find_ge(probe) {
            if ns > hi {
                break;
            }
            hi = hi.max(ne);
            if kept.is_none() {
                kept = Some((ns, ne));
            } else {
                self.remove_node(ns, ne);
            }
            probe = ns + 1;
        }
        // Every run between `lo` and `hi` has been absorbed, so moving the kept run's bounds
        // keeps the order of the tree.
        match kept {
            Some(old) => self.update_node(old, lo, hi),
            None => self.insert_node(lo, hi),
        }
    }

    /// Removes `[start, end)`, which must lie inside one run.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        let (rs, re) = self
            .find_le(start)
            .filter(|&(_, re)| re >= end)
            .expect("callers remove only ranges they found inside one run");
        match (rs == start, re == end) {
            (true, true) => self.remove_node(rs, re),
            (true, false) => self.update_node((rs, re), end, re),
            (false, true) => self.update_node((rs, re), rs, start),
            (false, false) => {
                self.update_node((rs, re), rs, start);
                self.insert_node(end, re);
            }
        }
    }

    /// Removes every page of `[start, end)` that is in a run; calls `removed` with each
    /// removed piece, in ascending order.
    pub(crate) fn subtract(&mut self, start: u64, end: u64, mut removed: impl FnMut(u64, u64)) {
        let mut next = match self.find_le(start) {
            Some((rs, re)) if re > start => Some((rs, re)),
            _ => self.find_ge(start),
        };
        while let Some((rs, re)) = next {
            if rs >= end {
                break;
            }
            let (os, oe) = (rs.max(start), re.min(end));
            removed(os, oe);
            self.remove(os, oe);
            next = self.find_ge(re);
        }
    }

    /// All runs in ascending order (for checks, stats and tests: O(runs)).
    pub(crate) fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.totals.runs as usize);
        let mut stack = Vec::new();
        let mut t = self.root;
        while t != NIL || !stack.is_empty() {
            while t != NIL {
                stack.push(t);
                t = self.nodes[t as usize].left;
            }
            if let Some(top) = stack.pop() {
                let n = &self.nodes[top as usize];
                out.push((n.start, n.end));
                t = n.right;
            }
        }
        out
    }

    /// Verifies order, disjointness, coalescing, heap order, the subtree maxima and the totals.
    pub(crate) fn check(&self, what: &str) -> Result<(), String> {
        let runs = self.runs();
        let mut totals = Totals::default();
        for w in runs.windows(2) {
            if w[0].1 >= w[1].0 {
                return Err(format!(
                    "{what}: runs {:#x}..{:#x} and {:#x}..{:#x} overlap or touch",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
        for &(s, e) in &runs {
            if s >= e {
                return Err(format!("{what}: empty run at {s:#x}"));
            }
            let r = RunShape::new(self.shape, s, e);
            totals.pages += e - s;
            totals.runs += 1;
            totals.whole_mids += r.whole_mids(self.shape);
            totals.whole_chunks += r.whole_chunks(self.shape);
        }
        if totals != self.totals {
            return Err(format!(
                "{what}: totals {:?} but runs add up to {totals:?}",
                self.totals
            ));
        }
        if self.root != NIL {
            self.check_node(self.root, what)?;
        }
        Ok(())
    }

    fn check_node(&self, t: u32, what: &str) -> Result<Capacities, String> {
        let n = &self.nodes[t as usize];
        let own = RunShape::new(self.shape, n.start, n.end).capacities();
        if own != n.own {
            return Err(format!("{what}: stale capacities at {:#x}", n.start));
        }
        let mut best = own;
        for child in [n.left, n.right] {
            if child == NIL {
                continue;
            }
            if self.nodes[child as usize].prio > n.prio {
                return Err(format!("{what}: heap order broken at {:#x}", n.start));
            }
            let sub = self.check_node(child, what)?;
            for f in 0..FIELDS {
                best[f] = best[f].max(sub[f]);
            }
        }
        if best != n.best {
            return Err(format!("{what}: stale subtree maxima at {:#x}", n.start));
        }
        Ok(best)
    }

    // --- node primitives: the only code that touches `totals` and the arena ---

    fn account(&mut self, start: u64, end: u64, add: bool) {
        let r = RunShape::new(self.shape, start, end);
        let (pages, mids, chunks) = (
            end - start,
            r.whole_mids(self.shape),
            r.whole_chunks(self.shape),
        );
        let t = &mut self.totals;
        if add {
            t.pages += pages;
            t.runs += 1;
            t.whole_mids += mids;
            t.whole_chunks += chunks;
        } else {
            t.pages -= pages;
            t.runs -= 1;
            t.whole_mids -= mids;
            t.whole_chunks -= chunks;
        }
    }

    fn next_prio(&mut self) -> u32 {
        // xorshift64: the treap only needs priorities that are independent of the keys.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 32) as u32
    }

    fn insert_node(&mut self, start: u64, end: u64) {
        self.account(start, end, true);
        let own = RunShape::new(self.shape, start, end).capacities();
        let node = Node {
            start,
            end,
            prio: self.next_prio(),
            left: NIL,
            right: NIL,
            own,
            best: own,
        };
        let i = match self.vacant.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1)
                    .expect("a shard holds fewer than 2^32 runs: each spans a page of its chunks")
            }
        };
        self.root = self.insert_at(self.root, i);
    }

    /// Removes the run `[start, end)`, which callers have just found in the tree.
    fn remove_node(&mut self, start: u64, end: u64) {
        debug_assert_eq!(self.find_le(start), Some((start, end)));
        self.account(start, end, false);
        self.root = self.remove_at(self.root, start);
    }

    /// Moves the bounds of the run `old`, which callers have just found in the tree, to
    /// `[start, end)` without passing another run.
    fn update_node(&mut self, old: (u64, u64), start: u64, end: u64) {
        debug_assert_eq!(self.find_le(old.0), Some(old));
        self.account(old.0, old.1, false);
        self.account(start, end, true);
        let own = RunShape::new(self.shape, start, end).capacities();
        self.update_at(self.root, old.0, start, end, own);
    }

    fn pull(&mut self, t: u32) {
        let n = &self.nodes[t as usize];
        let mut best = n.own;
        for child in [n.left, n.right] {
            if child != NIL {
                let sub = &self.nodes[child as usize].best;
                for f in 0..FIELDS {
                    best[f] = best[f].max(sub[f]);
                }
            }
        }
        self.nodes[t as usize].best = best;
    }

    /// Splits the subtree at `t` into runs starting before `key` and the rest.
    fn split(&mut self, t: u32, key: u64) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.nodes[t as usize].start < key {
            let (l, r) = self.split(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = l;
            self.pull(t);
            (t, r)
        } else {
            let (l, r) = self.split(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = r;
            self.pull(t);
            (l, t)
        }
    }

    /// Joins two subtrees whose runs are all ordered `a` before `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio > self.nodes[b as usize].prio {
            let r = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = r;
            self.pull(a);
            a
        } else {
            let l = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = l;
            self.pull(b);
            b
        }
    }

    fn insert_at(&mut self, t: u32, i: u32) -> u32 {
        if t == NIL {
            return i;
        }
        let key = self.nodes[i as usize].start;
        if self.nodes[i as usize].prio > self.nodes[t as usize].prio {
            let (l, r) = self.split(t, key);
            self.nodes[i as usize].left = l;
            self.nodes[i as usize].right = r;
            self.pull(i);
            return i;
        }
        if key < self.nodes[t as usize].start {
            let l = self.insert_at(self.nodes[t as usize].left, i);
            self.nodes[t as usize].left = l;
        } else {
            let r = self.insert_at(self.nodes[t as usize].right, i);
            self.nodes[t as usize].right = r;
        }
        self.pull(t);
        t
    }

    fn remove_at(&mut self, t: u32, key: u64) -> u32 {
        debug_assert!(t != NIL);
        let n = &self.nodes[t as usize];
        if n.start == key {
            let (l, r) = (n.left, n.right);
            self.vacant.push(t);
            return self.merge(l, r);
        }
        if key < n.start {
            let l = self.remove_at(n.left, key);
            self.nodes[t as usize].left = l;
        } else {
            let r = self.remove_at(n.right, key);
            self.nodes[t as usize].right = r;
        }
        self.pull(t);
        t
    }

    fn update_at(&mut self, t: u32, key: u64, start: u64, end: u64, own: Capacities) {
        debug_assert!(t != NIL);
        let n = &mut self.nodes[t as usize];
        if n.start == key {
            n.start = start;
            n.end = end;
            n.own = own;
        } else if key < n.start {
            let l = n.left;
            self.update_at(l, key, start, end, own);
        } else {
            let r = n.right;
            self.update_at(r, key, start, end, own);
        }
        self.pull(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const S: Shape = Shape { mid: 4, chunk: 16 };

    fn pages_to_runs(pages: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in pages {
            match runs.last_mut() {
                Some(last) if last.1 == p => last.1 += 1,
                _ => runs.push((p, p + 1)),
            }
        }
        runs
    }

    #[test]
    fn insert_coalesces_and_remove_splits() {
        let mut t = ExtentTree::new(S);
        t.insert(0, 4);
        t.insert(8, 12);
        t.insert(4, 8);
        assert_eq!(t.runs(), vec![(0, 12)]);
        t.remove(5, 7);
        assert_eq!(t.runs(), vec![(0, 5), (7, 12)]);
        t.insert(2, 9); // overlapping union
        assert_eq!(t.runs(), vec![(0, 12)]);
        t.check("t").unwrap();
        assert_eq!(t.totals().pages, 12);
        assert_eq!(t.totals().whole_mids, 3);
    }

    #[test]
    fn leftmost_with_finds_the_lowest_qualifying_run() {
        let mut t = ExtentTree::new(S);
        t.insert(1, 3); // len 2
        t.insert(5, 12); // len 7, mid capacity 4
        t.insert(17, 40); // chunk capacity 8
        assert_eq!(t.leftmost_with(Field::Len, 2), Some((1, 3)));
        assert_eq!(t.leftmost_with(Field::Len, 3), Some((5, 12)));
        assert_eq!(t.leftmost_with(Field::Mid, 5), Some((17, 40)));
        assert_eq!(t.leftmost_with(Field::Chunk, 8), Some((17, 40)));
        assert_eq!(t.leftmost_with(Field::Chunk, 9), None);
        assert_eq!(t.max(Field::Len), 23);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Subtract(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..200, 1u64..40).prop_map(|(s, l)| Op::Insert(s, s + l)),
            (0u64..200, 1u64..40).prop_map(|(s, l)| Op::Subtract(s, s + l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// The tree against a page set: same runs, same removed pieces, same search answers,
        /// and its own invariants after every step.
        #[test]
        fn tree_matches_a_page_set(ops in prop::collection::vec(op(), 1..60), field in 0usize..FIELDS, min in 1u64..30) {
            let mut t = ExtentTree::new(S);
            let mut pages = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(s, e) => { t.insert(s, e); pages.extend(s..e); }
                    Op::Subtract(s, e) => {
                        let mut removed = Vec::new();
                        t.subtract(s, e, |a, b| removed.push((a, b)));
                        let gone: BTreeSet<u64> = pages.range(s..e).copied().collect();
                        prop_assert_eq!(removed, pages_to_runs(&gone));
                        for p in gone { pages.remove(&p); }
                    }
                }
                prop_assert_eq!(t.runs(), pages_to_runs(&pages));
                t.check("proptest").map_err(TestCaseError::fail)?;
            }
            let fields = [Field::Len, Field::Mid, Field::Chunk, Field::Sliver, Field::PartialMid];
            let f = fields[field];
            let expected = pages_to_runs(&pages)
                .into_iter()
                .find(|&(s, e)| RunShape::new(S, s, e).capacities()[f as usize] >= min);
            prop_assert_eq!(t.leftmost_with(f, min), expected);
        }
    }
}
