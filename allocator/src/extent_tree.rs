//! A set of disjoint, coalesced PFN runs in a treap whose nodes carry, for every subtree, the
//! maximum of each [`Field`] capacity.
//!
//! The maxima make "the lowest-addressed run with capacity `field >= n`" a single root-to-leaf
//! descent, O(log runs), whatever the number of holes: that is the query every placement rule
//! is made of. A run is one node, however many pages it spans; nothing is kept per page.
//!
//! The tree is an arena (`Vec<Node>` with a free list threaded through the vacant nodes) so
//! that node churn on the hot path does not go through the global allocator. Everything the
//! hot path writes is either in the tree's own struct (inside its shard's padded lock) or in
//! cache-line aligned heap blocks: the shards' trees are usually created by one thread, one
//! after another, so their first allocations sit side by side in the C allocator's arena, and
//! a cache line shared by two shards would be written by two threads.

use crate::shape::{Capacities, FIELDS, Field, RunShape, Shape};

const NIL: u32 = u32::MAX;

/// A run's bounds, `(start, end)`.
type Run = (u64, u64);

/// Two cache lines exactly: the arena shares no line with another allocation (such as
/// another shard's arena, written by another thread), and no node straddles three lines.
#[derive(Debug, Clone)]
#[repr(align(64))]
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
    /// The first vacant node (NIL if none); each vacant node's `left` names the next.
    vacant: u32,
    root: u32,
    totals: Totals,
    /// Scratch: the ancestors of the node being changed, root first (kept to avoid an
    /// allocation per operation).
    path: Path,
}

impl ExtentTree {
    pub(crate) fn new(shape: Shape) -> ExtentTree {
        ExtentTree {
            shape,
            nodes: Vec::new(),
            vacant: NIL,
            root: NIL,
            totals: Totals::default(),
            path: Path::default(),
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

    /// The node of the run with the greatest start `<= pfn` and that of the run with the least
    /// start `> pfn` (NIL where there is none), in one descent.
    fn around(&self, pfn: u64) -> (u32, u32) {
        let mut t = self.root;
        let (mut below, mut above) = (NIL, NIL);
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.start <= pfn {
                below = t;
                t = n.right;
            } else {
                above = t;
                t = n.left;
            }
        }
        (below, above)
    }

    /// The node of the run with the least start `>= pfn` (NIL if there is none).
    fn node_ge(&self, pfn: u64) -> u32 {
        let mut t = self.root;
        let mut found = NIL;
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.start >= pfn {
                found = t;
                t = n.left;
            } else {
                t = n.right;
            }
        }
        found
    }

    fn bounds(&self, t: u32) -> Run {
        let n = &self.nodes[t as usize];
        (n.start, n.end)
    }

    /// Adds `[start, end)`, merging it with every run it overlaps or touches.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        debug_assert!(start < end);
        let (below, mut next) = self.around(start);
        let (mut lo, mut hi) = (start, end);
        // The first two runs merged (in address order) and how many there are.
        let mut merged = [NIL; 2];
        let mut count = 0;
        if below != NIL && self.nodes[below as usize].end >= start {
            let (ls, le) = self.bounds(below);
            lo = ls;
            hi = hi.max(le);
            merged[0] = below;
            count = 1;
        }
        // Runs never touch, so the run after `(ns, ne)` starts beyond `ne`: once `hi <= ne`
        // nothing further can be absorbed and no descent is needed to see it.
        while next != NIL {
            let (ns, ne) = self.bounds(next);
            if ns > hi {
                break;
            }
            if count < 2 {
                merged[count] = next;
            }
            count += 1;
            if hi <= ne {
                hi = ne;
                break;
            }
            next = self.node_ge(ns + 1);
        }
        // The kept run grows first and the absorbed ones go after: the tree's maxima then
        // never dip below their final values, so the removals stop refreshing early.
        match count {
            0 => self.insert_node(lo, hi),
            1 => self.update_node(merged[0], lo, hi),
            2 => {
                // Of two neighbours, the one higher in the tree (higher priority) keeps the
                // merged run: its path is the shorter to refresh, the other is nearer the
                // leaves and cheaper to unlink, and a long run that was created near the
                // root stays there (see `prio_for`).
                let (left, right) = (merged[0], merged[1]);
                if self.nodes[left as usize].prio >= self.nodes[right as usize].prio {
                    let absorbed = self.nodes[right as usize].start;
                    self.update_node(left, lo, hi);
                    // Starts stay unique while the grown left run overlaps the right one.
                    let t = self.descend_to(absorbed, |n| n.start);
                    self.remove_found(t);
                } else {
                    let absorbed = self.nodes[left as usize].end;
                    self.update_node(right, lo, hi);
                    // The grown right run now starts where the left one does; ends are
                    // still unique and in the same order as the starts.
                    let t = self.descend_to(absorbed, |n| n.end);
                    self.remove_found(t);
                }
            }
            _ => {
                // Several runs (only a long insert, e.g. a scrub report, covers more than
                // two): the first keeps the union; every other one starts in `(lo, hi]`.
                self.update_node(merged[0], lo, hi);
                loop {
                    let t = self.node_ge(lo + 1);
                    if t == NIL || self.nodes[t as usize].start > hi {
                        break;
                    }
                    let start = self.nodes[t as usize].start;
                    let t = self.descend_to(start, |n| n.start);
                    self.remove_found(t);
                }
            }
        }
    }

    /// Removes `[start, end)`, which must lie inside one run.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        let t = self
            .descend_le(start)
            .filter(|&t| self.nodes[t as usize].end >= end)
            .expect("callers remove only ranges they found inside one run");
        let (rs, re) = (self.nodes[t as usize].start, self.nodes[t as usize].end);
        // `self.path` now holds the ancestors of `t`: the bounds can be moved without a
        // second descent.
        match (rs == start, re == end) {
            (true, true) => self.remove_found(t),
            (true, false) => self.set_bounds(t, (rs, re), end, re),
            (false, true) => self.set_bounds(t, (rs, re), rs, start),
            (false, false) => {
                self.set_bounds(t, (rs, re), rs, start);
                // Inserting only raises maxima on the way down: no child is read.
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

    /// Adds the run `[start, end)` to the totals, or takes it out; returns its shape so that
    /// callers need not work it out again.
    fn account(&mut self, start: u64, end: u64, add: bool) -> RunShape {
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
        r
    }

    /// The priority of a node created for the run `[start, end)` with capacities `own`.
    ///
    /// The top two bits are the run's class when the node is made, hottest first:
    ///
    /// * 2: it holds a whole mid block but no whole chunk: a partly used chunk with room for
    ///   mid requests, where the placement rules send mid and small requests first;
    /// * 1: it holds a whole chunk: broken only by chunk requests or when nothing else fits;
    /// * 0: it holds no whole mid block: the slivers, which are most of the runs when memory
    ///   is fragmented (10,000 one-page holes are 10,000 nodes).
    ///
    /// A higher class sits above every lower one, so the runs that mid requests carve from
    /// and that frees next to them grow are a few nodes from the root however many slivers
    /// lie below, and their maxima refreshes stop there; and a piece split off one of them
    /// (the tail left by carving in its middle) is inserted among the long runs instead of
    /// cutting through the slivers. Whole free chunks go below the partly used runs because
    /// in a shard with many chunks most of them sit untouched, and above them they would
    /// lengthen every path to the runs in use (measured: 10 % more instructions per
    /// operation in the bench's mixed workload, and a spread of 10 % between shards whose
    /// chunks happen to hash into different shapes).
    ///
    /// The other 30 bits are a hash of the start (splitmix64's finaliser). Within a class the
    /// treap only needs priorities that look independent of the key order, which a good mix
    /// gives as well as a random generator does; three ordered classes on top of that cost
    /// at most three expected O(log runs) stretches of path. Being a function of the run, a
    /// run that is removed and put back (a chunk allocated and freed, a tail split off and
    /// merged again) gets its old priority back, so the tree returns to the same shape and
    /// the hot paths stay the same from one operation to the next.
    fn prio_for(&self, start: u64, own: &Capacities) -> u32 {
        let class = if own[Field::Chunk as usize] >= self.shape.chunk {
            1
        } else if own[Field::Mid as usize] >= self.shape.mid {
            2
        } else {
            0
        };
        let mut z = start ^ 0x9E37_79B9_7F4A_7C15;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (class << 30) | ((z ^ (z >> 31)) >> 34) as u32
    }

    fn insert_node(&mut self, start: u64, end: u64) {
        let own = self.account(start, end, true).capacities();
        let prio = self.prio_for(start, &own);
        let node = Node {
            start,
            end,
            prio,
            left: NIL,
            right: NIL,
            own,
            best: own,
        };
        let i = if self.vacant != NIL {
            let i = self.vacant;
            self.vacant = self.nodes[i as usize].left;
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            u32::try_from(self.nodes.len() - 1)
                .expect("a shard holds fewer than 2^32 runs: each spans a page of its chunks")
        };
        // Down to where the new node's priority puts it. Every node passed gains the new run
        // in its subtree, so its maxima only rise: no child needs to be read.
        let mut parent = NIL;
        let mut t = self.root;
        while t != NIL && self.nodes[t as usize].prio >= prio {
            let n = &mut self.nodes[t as usize];
            raise(&mut n.best, &own);
            parent = t;
            t = if start < n.start { n.left } else { n.right };
        }
        let (l, r) = self.split(t, start);
        self.nodes[i as usize].left = l;
        self.nodes[i as usize].right = r;
        self.pull(i);
        self.link(parent, start, i);
    }

    /// Makes `child` the child of `parent` on the side of `key` (the root if `parent` is NIL).
    fn link(&mut self, parent: u32, key: u64, child: u32) {
        if parent == NIL {
            self.root = child;
        } else if key < self.nodes[parent as usize].start {
            self.nodes[parent as usize].left = child;
        } else {
            self.nodes[parent as usize].right = child;
        }
    }

    /// Walks from the root to the node whose `key(node)` is `key`, which must exist, leaving
    /// its ancestors in `self.path` (root first). `key` must give every node a distinct value
    /// in the tree's order: the start, or (while a grown run overlaps one it absorbs from
    /// the left) the end.
    fn descend_to(&mut self, key: u64, key_of: impl Fn(&Node) -> u64) -> u32 {
        self.path.clear();
        let mut t = self.root;
        loop {
            debug_assert!(t != NIL, "callers name a run that is in the tree");
            let n = &self.nodes[t as usize];
            let k = key_of(n);
            if k == key {
                return t;
            }
            self.path.push(t);
            t = if key < k { n.left } else { n.right };
        }
    }

    /// Refreshes the maxima of the nodes in `self.path`, deepest first, stopping at the first
    /// that does not change: its ancestors then see the same inputs as before.
    fn refresh_path(&mut self) {
        while let Some(t) = self.path.pop() {
            if !self.pull(t) {
                break;
            }
        }
    }

    /// Removes node `t`; `self.path` holds its ancestors, root first.
    fn remove_found(&mut self, t: u32) {
        let (start, end, left, right) = {
            let n = &self.nodes[t as usize];
            (n.start, n.end, n.left, n.right)
        };
        self.account(start, end, false);
        let merged = self.merge(left, right);
        self.nodes[t as usize].left = self.vacant;
        self.vacant = t;
        // The side is read from the parent, not found by comparing starts: while a grown run
        // overlaps the one it absorbs, the two may share a start.
        match self.path.last() {
            None => self.root = merged,
            Some(p) if self.nodes[p as usize].left == t => self.nodes[p as usize].left = merged,
            Some(p) => self.nodes[p as usize].right = merged,
        }
        self.refresh_path();
    }

    /// Moves the bounds of node `t`, which callers have just found in the tree, to
    /// `[start, end)` without passing another run.
    fn update_node(&mut self, t: u32, start: u64, end: u64) {
        let old = self.bounds(t);
        let found = self.descend_to(old.0, |n| n.start);
        debug_assert_eq!(found, t);
        self.set_bounds(t, old, start, end);
    }

    /// Moves the bounds of node `t`, the run `old`, to `[start, end)` (passing no other run);
    /// `self.path` holds the ancestors of `t`, root first.
    fn set_bounds(&mut self, t: u32, old: (u64, u64), start: u64, end: u64) {
        self.account(old.0, old.1, false);
        let own = self.account(start, end, true).capacities();
        let n = &mut self.nodes[t as usize];
        let grows = (0..FIELDS).all(|f| own[f] >= n.own[f]);
        n.start = start;
        n.end = end;
        n.own = own;
        if grows {
            // No capacity fell, so no maximum on the path can fall: raising them to the new
            // run's capacities is exact and reads no child.
            raise(&mut n.best, &own);
            for i in 0..self.path.len() {
                raise(&mut self.nodes[self.path.get(i) as usize].best, &own);
            }
        } else if self.pull(t) {
            self.refresh_path();
        }
    }

    /// Like [`ExtentTree::find_le`], but returns the node and leaves its ancestors in
    /// `self.path` (root first).
    fn descend_le(&mut self, pfn: u64) -> Option<u32> {
        self.path.clear();
        let mut t = self.root;
        let mut found = None;
        let mut depth = 0;
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.start <= pfn {
                found = Some(t);
                depth = self.path.len();
                self.path.push(t);
                t = n.right;
            } else {
                self.path.push(t);
                t = n.left;
            }
        }
        self.path.truncate(depth);
        found
    }

    /// Recomputes the maxima of `t` from its own run and its children; says whether they
    /// changed. On every changed node's path: written out field by field, because this is
    /// where the tree spends its time.
    fn pull(&mut self, t: u32) -> bool {
        let n = &self.nodes[t as usize];
        let mut best = n.own;
        if n.left != NIL {
            raise(&mut best, &self.nodes[n.left as usize].best);
        }
        if n.right != NIL {
            raise(&mut best, &self.nodes[n.right as usize].best);
        }
        let slot = &mut self.nodes[t as usize].best;
        let mut diff = 0;
        for f in 0..FIELDS {
            diff |= slot[f] ^ best[f];
        }
        *slot = best;
        diff != 0
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
}

/// A stack of node indices, written on every operation: the first [`PATH_INLINE`] entries
/// (deeper than any path of a tree with a sane number of runs) live in the tree's own struct,
/// inside its shard's padded lock, so that they share no cache line with another thread's
/// data; deeper entries spill to the heap.
#[derive(Debug)]
struct Path {
    len: usize,
    inline: [u32; PATH_INLINE],
    spill: Vec<u32>,
}

const PATH_INLINE: usize = 64;

impl Default for Path {
    fn default() -> Path {
        Path {
            len: 0,
            inline: [NIL; PATH_INLINE],
            spill: Vec::new(),
        }
    }
}

impl Path {
    fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }

    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.spill.truncate(self.len.saturating_sub(PATH_INLINE));
    }

    #[inline(always)]
    fn push(&mut self, t: u32) {
        if self.len < PATH_INLINE {
            self.inline[self.len] = t;
        } else {
            self.spill.push(t);
        }
        self.len += 1;
    }

    #[inline(always)]
    fn get(&self, i: usize) -> u32 {
        if i < PATH_INLINE {
            self.inline[i]
        } else {
            self.spill[i - PATH_INLINE]
        }
    }

    fn last(&self) -> Option<u32> {
        Some(self.get(self.len.checked_sub(1)?))
    }

    fn pop(&mut self) -> Option<u32> {
        let t = self.last()?;
        self.len -= 1;
        if self.len >= PATH_INLINE {
            self.spill.pop();
        }
        Some(t)
    }
}

/// `best` becomes the fieldwise maximum of itself and `other`.
#[inline(always)]
fn raise(best: &mut Capacities, other: &Capacities) {
    for f in 0..FIELDS {
        best[f] = best[f].max(other[f]);
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

    /// Each run with its depth, in address order: the shape of the tree.
    fn shape_of(t: &ExtentTree) -> Vec<(u64, u64, usize)> {
        fn walk(t: &ExtentTree, i: u32, depth: usize, out: &mut Vec<(u64, u64, usize)>) {
            if i == NIL {
                return;
            }
            let n = &t.nodes[i as usize];
            walk(t, n.left, depth + 1, out);
            out.push((n.start, n.end, depth));
            walk(t, n.right, depth + 1, out);
        }
        let mut out = Vec::new();
        walk(t, t.root, 0, &mut out);
        out
    }

    #[test]
    fn carving_the_same_piece_again_gives_the_same_tree() {
        // Priorities are a function of the start: the tail split off by a carve gets the same
        // priority every time, so the tree takes the same shape on every alloc+free of the
        // same range (the hot path stays the same from one call to the next), and freeing the
        // piece restores the shape from before.
        let mut t = ExtentTree::new(S);
        for i in 0..200 {
            t.insert(i * 4, i * 4 + 2);
        }
        t.insert(1000, 5000);
        let before = shape_of(&t);
        let mut carved = None;
        for _ in 0..5 {
            t.remove(1500, 1600);
            t.check("carved").unwrap();
            let now = shape_of(&t);
            assert_eq!(*carved.get_or_insert_with(|| now.clone()), now);
            t.insert(1500, 1600);
            t.check("given back").unwrap();
            assert_eq!(shape_of(&t), before);
        }
    }

    #[test]
    fn long_partly_used_runs_sit_above_chunks_and_chunks_above_slivers() {
        let mut t = ExtentTree::new(S);
        for i in 0..300 {
            t.insert(i * 4 + 1, i * 4 + 3); // slivers: no whole mid block
        }
        t.insert(2000, 2000 + 4 * 16); // whole chunks
        t.insert(1210, 1230); // whole mid blocks, no whole chunk
        t.check("classes").unwrap();
        let depth = |run: (u64, u64)| {
            shape_of(&t)
                .into_iter()
                .find(|&(s, e, _)| (s, e) == run)
                .map(|(_, _, d)| d)
        };
        assert_eq!(depth((1210, 1230)), Some(0));
        assert_eq!(depth((2000, 2064)), Some(1));
        assert!(
            shape_of(&t).iter().all(|&(s, _, d)| s >= 1210 || d >= 1),
            "every sliver is below the long runs"
        );
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
