//! What each thread knows of the pages it owns, and how a scenario is laid out.

use std::ops::Range;

use crate::stamps::Content;

#[derive(Clone, Debug)]
pub(crate) struct PageModel {
    pub(crate) shared: bool,
    pub(crate) content: Content,
    /// Known to be backed (a lower bound: populations of neighbouring pages back more).
    pub(crate) backed: bool,
    pub(crate) pins: u32,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Owner {
    /// The whole file belongs to one thread.
    Thread(usize),
    /// Segments of this many pages belong to the threads in turn.
    Striped(u64),
}

#[derive(Clone, Debug)]
pub(crate) struct FileSpec {
    pub(crate) pages: u64,
    pub(crate) shared: bool,
    pub(crate) owner: Owner,
    /// The pages operations touch (the rest of the file stays as population left it).
    pub(crate) windows: Vec<Range<u64>>,
}

impl FileSpec {
    pub(crate) fn whole(pages: u64, shared: bool, owner: Owner) -> FileSpec {
        FileSpec {
            pages,
            shared,
            owner,
            windows: std::iter::once(0..pages).collect(),
        }
    }

    pub(crate) fn owner_of(&self, page: u64, threads: usize) -> usize {
        match self.owner {
            Owner::Thread(t) => t,
            Owner::Striped(segment) => ((page / segment) % threads as u64) as usize,
        }
    }

    pub(crate) fn slot(&self, page: u64) -> Option<usize> {
        let mut base = 0;
        for w in &self.windows {
            if w.contains(&page) {
                return Some(base + (page - w.start) as usize);
            }
            base += (w.end - w.start) as usize;
        }
        None
    }

    pub(crate) fn slots(&self) -> usize {
        self.windows
            .iter()
            .map(|w| (w.end - w.start) as usize)
            .sum()
    }

    pub(crate) fn touches(&self, thread: usize) -> bool {
        match self.owner {
            Owner::Thread(t) => t == thread,
            Owner::Striped(_) => true,
        }
    }
}

/// One thread's model: every page of every file (only the pages it owns mean anything).
#[derive(Debug)]
pub(crate) struct ThreadModel {
    pub(crate) files: Vec<Vec<PageModel>>,
    /// Its pins: (file, first page, pages).
    pub(crate) pins: Vec<(usize, u64, u64)>,
}

/// How long a scenario runs and what it aims at.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) threads: usize,
    pub(crate) rounds: usize,
    pub(crate) ops: usize,
    /// Pages between the places worth straddling (memfd discontinuities, protection units).
    pub(crate) boundary: u64,
    /// The longest range an operation on a thread's own file takes.
    pub(crate) long: u64,
    pub(crate) seed: u64,
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok())
}

/// `ops` times `PFNSTORE_STRESS_SCALE`, divided by `PFNSTORE_STRESS_DIVISOR` (both 1 unless
/// set).
pub(crate) fn scaled(ops: usize) -> usize {
    let scale = env_number("PFNSTORE_STRESS_SCALE").unwrap_or(1).max(1) as usize;
    let divisor = env_number("PFNSTORE_STRESS_DIVISOR").unwrap_or(1).max(1) as usize;
    (ops * scale / divisor).max(20)
}

/// A scenario's seed, mixed with `PFNSTORE_STRESS_SEED` for soak runs that want other
/// sequences (0, the same every run, unless set).
pub(crate) fn seeded(seed: u64) -> u64 {
    seed ^ env_number("PFNSTORE_STRESS_SEED").unwrap_or(0)
}
