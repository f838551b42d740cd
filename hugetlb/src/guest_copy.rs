//! Copies between Rust buffers and guest memory that are never data races.
//!
//! Guest memory is written concurrently by the guest's vCPUs, by devices, and by other threads
//! of this process (another view of the same page, another caller of `read`/`write`). A plain
//! `memcpy` racing with a write is a data race, undefined behaviour in Rust's memory model and
//! what ThreadSanitizer reports. vm-memory solves this for VMMs by copying guest memory with
//! volatile or atomic-width accesses; this module does the same, within the rules of Rust's
//! memory model:
//!
//! **The rule.** Every access this process makes to guest memory goes through this module, and
//! every such access is a relaxed atomic load, store or compare-exchange of one naturally
//! aligned 8-byte word. Rust allows racing atomic accesses only if they have the same size,
//! so a copy never touches guest memory with a narrower access: a partial word at the head or
//! tail of a copy is read whole (and the wanted bytes taken out), or written by a
//! compare-exchange loop that replaces only the wanted bytes and leaves the others exactly as
//! the last value seen (a concurrent write to them makes the exchange fail and retry, so it is
//! never lost). An aligned 8-byte word lies inside one 4 KiB page, so widening an access to
//! whole words never reaches a page the caller did not check.
//!
//! A copy is not atomic as a whole: a concurrent writer can be seen half-way, as with any
//! shared memory. The guest's own accesses are outside Rust's model; what matters is that no
//! two accesses from Rust code race non-atomically.
//!
//! The atomics are `core`'s, not the sync facade's: guest memory is not memory the loom models
//! can own, and `from_ptr` over a foreign mapping has no loom counterpart.

use core::sync::atomic::{AtomicU64, Ordering};

const WORD: usize = 8;

/// How a byte range splits into words: a partial word before the first whole one, the whole
/// words, a partial word after them. A range inside one word is all `head`.
struct Split {
    /// Bytes before the first whole word (a partial word).
    head: usize,
    /// Whole aligned words after the head.
    words: usize,
    /// Bytes after the last whole word (a partial word).
    tail: usize,
}

impl Split {
    fn of(start: usize, len: usize) -> Split {
        let to_boundary = start.next_multiple_of(WORD) - start;
        if len <= to_boundary || len - to_boundary < WORD {
            // No whole word: at most two partial words, handled as head (and tail).
            let head = len.min(to_boundary);
            return Split {
                head,
                words: 0,
                tail: len - head,
            };
        }
        let rest = len - to_boundary;
        Split {
            head: to_boundary,
            words: rest / WORD,
            tail: rest % WORD,
        }
    }
}

/// Reads `dst.len()` bytes of guest memory at `src` into `dst`.
///
/// # Safety
///
/// The bytes `src..src + dst.len()`, widened to whole aligned 8-byte words, must be mapped
/// readable and backed (no fault) for the whole call, and must not be accessed by this process
/// other than through this module while the call runs.
pub(crate) unsafe fn read(src: *const u8, dst: &mut [u8]) {
    let start = src as usize;
    let split = Split::of(start, dst.len());
    let (head, rest) = dst.split_at_mut(split.head);
    let (middle, tail) = rest.split_at_mut(split.words * WORD);
    // SAFETY: the words read here and below are 8-aligned and cover only bytes the caller
    // vouched for, widened to their words (caller's contract).
    unsafe { read_partial(start, head) };
    let first = start + split.head;
    for (i, out) in middle.chunks_exact_mut(WORD).enumerate() {
        // SAFETY: as above; `first` is 8-aligned here.
        out.copy_from_slice(&unsafe { load(first + i * WORD) }.to_ne_bytes());
    }
    // SAFETY: as above.
    unsafe { read_partial(first + split.words * WORD, tail) };
}

/// Reads `dst.len()` bytes at `at`, which lie within one or two words, word by word.
///
/// # Safety
///
/// As for [`read`].
unsafe fn read_partial(at: usize, dst: &mut [u8]) {
    let end = at + dst.len();
    let mut word = at & !(WORD - 1);
    while word < end {
        // SAFETY: forwarded to the caller.
        let value = unsafe { load(word) }.to_ne_bytes();
        let lo = word.max(at);
        let hi = (word + WORD).min(end);
        dst[lo - at..hi - at].copy_from_slice(&value[lo - word..hi - word]);
        word += WORD;
    }
}

/// Writes `src` to guest memory at `dst`.
///
/// # Safety
///
/// As for [`read`], and the bytes must be mapped writable.
pub(crate) unsafe fn write(dst: *mut u8, src: &[u8]) {
    // SAFETY: the caller's contract is `store`'s.
    unsafe { store(dst, src.len(), Fill::Bytes(src)) }
}

/// Zeroes `len` bytes of guest memory at `dst`.
///
/// # Safety
///
/// As for [`write`].
pub(crate) unsafe fn zero(dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract is `store`'s.
    unsafe { store(dst, len, Fill::Zero) }
}

/// What a store writes.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Bytes(&'a [u8]),
    Zero,
}

impl<'a> Fill<'a> {
    /// The part `at..at + len` of what is written.
    fn part(self, at: usize, len: usize) -> Fill<'a> {
        match self {
            Fill::Bytes(b) => Fill::Bytes(&b[at..at + len]),
            Fill::Zero => Fill::Zero,
        }
    }

    /// Its bytes `at..at + out.len()`, into `out`.
    fn take(self, at: usize, out: &mut [u8]) {
        match self {
            Fill::Bytes(b) => out.copy_from_slice(&b[at..at + out.len()]),
            Fill::Zero => out.fill(0),
        }
    }
}

/// Stores `len` bytes of `fill` at `dst`: whole words with plain atomic stores, partial ones
/// with a compare-exchange that keeps the word's other bytes.
///
/// # Safety
///
/// As for [`write`].
unsafe fn store(dst: *mut u8, len: usize, fill: Fill<'_>) {
    let start = dst as usize;
    let split = Split::of(start, len);
    // SAFETY: the words written here and below are 8-aligned and cover only bytes the caller
    // vouched for, widened to their words (caller's contract).
    unsafe { store_partial(start, split.head, fill.part(0, split.head)) };
    let first = start + split.head;
    match fill.part(split.head, split.words * WORD) {
        Fill::Bytes(bytes) => {
            for (i, word) in bytes.chunks_exact(WORD).enumerate() {
                let value = u64::from_ne_bytes(word.try_into().expect("8-byte chunks"));
                // SAFETY: as above; `first` is 8-aligned here.
                unsafe { atomic(first + i * WORD) }.store(value, Ordering::Relaxed);
            }
        }
        Fill::Zero => {
            for i in 0..split.words {
                // SAFETY: as above.
                unsafe { atomic(first + i * WORD) }.store(0, Ordering::Relaxed);
            }
        }
    }
    let tail_at = split.head + split.words * WORD;
    // SAFETY: as above.
    unsafe {
        store_partial(
            first + split.words * WORD,
            split.tail,
            fill.part(tail_at, split.tail),
        )
    };
}

/// Stores `len` bytes of `fill` at `at`, within one or two words, each by compare-exchange.
///
/// # Safety
///
/// As for [`write`].
unsafe fn store_partial(at: usize, len: usize, fill: Fill<'_>) {
    let end = at + len;
    let mut word = at & !(WORD - 1);
    while word < end {
        let lo = word.max(at);
        let hi = (word + WORD).min(end);
        // SAFETY: forwarded to the caller.
        let cell = unsafe { atomic(word) };
        let mut seen = cell.load(Ordering::Relaxed);
        loop {
            let mut bytes = seen.to_ne_bytes();
            fill.take(lo - at, &mut bytes[lo - word..hi - word]);
            match cell.compare_exchange_weak(
                seen,
                u64::from_ne_bytes(bytes),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
        word += WORD;
    }
}

/// A relaxed atomic load of the aligned word at `addr`.
///
/// # Safety
///
/// As for [`atomic`].
unsafe fn load(addr: usize) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { atomic(addr) }.load(Ordering::Relaxed)
}

/// The aligned word at `addr` as an atomic.
///
/// # Safety
///
/// `addr` is 8-aligned, mapped (readable, and writable if the caller stores) for the returned
/// lifetime, and accessed by this process only through 8-byte atomics meanwhile.
unsafe fn atomic<'a>(addr: usize) -> &'a AtomicU64 {
    // SAFETY: alignment, validity and the no-mixed-access rule are the caller's contract,
    // which is exactly `AtomicU64::from_ptr`'s.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: usize = 64;

    /// Guest memory stand-in: 8-aligned, accessed through this module only while a copy runs.
    fn memory() -> Vec<u64> {
        vec![0u64; SPAN / WORD]
    }

    fn bytes_of(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn set_bytes(words: &mut [u64], bytes: &[u8]) {
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(WORD)) {
            *w = u64::from_ne_bytes(b.try_into().unwrap());
        }
    }

    fn pattern(seed: u8) -> Vec<u8> {
        (0..SPAN as u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(seed))
            .collect()
    }

    /// Every start (all alignments within three words) and every length up to 40 bytes, for
    /// read, write and zero, against the same operation on a plain byte slice.
    #[test]
    fn every_alignment_and_length_matches_a_plain_slice() {
        for start in 0..24 {
            for len in 0..=40 {
                let mut mem = memory();
                let initial = pattern(1);
                set_bytes(&mut mem, &initial);
                let base = mem.as_mut_ptr().cast::<u8>();

                let mut got = vec![0xAAu8; len];
                // SAFETY: `start + len <= 64`: inside `mem`, which no one else touches.
                unsafe { read(base.add(start), &mut got) };
                assert_eq!(got, &initial[start..start + len], "read {start}+{len}");

                let data: Vec<u8> = (0..len as u8).map(|i| 0x80 | i).collect();
                let mut model = initial.clone();
                model[start..start + len].copy_from_slice(&data);
                // SAFETY: as above.
                unsafe { write(base.add(start), &data) };
                assert_eq!(bytes_of(&mem), model, "write {start}+{len}");

                model[start..start + len].fill(0);
                // SAFETY: as above.
                unsafe { zero(base.add(start), len) };
                assert_eq!(bytes_of(&mem), model, "zero {start}+{len}");
            }
        }
    }

    /// Two threads write different bytes of the same words at once: the compare-exchange keeps
    /// every byte either wrote (a read-modify-write with plain loads and stores would lose
    /// some).
    #[test]
    fn concurrent_writes_to_neighbouring_bytes_of_a_word_are_all_kept() {
        let mut mem = memory();
        let addr = mem.as_mut_ptr() as usize;
        let rounds = 20_000u32;
        let writer = |first: usize| {
            move || {
                for round in 0..rounds {
                    let byte = [(round % 251) as u8 + 1];
                    for at in (first..SPAN).step_by(2) {
                        // SAFETY: `at < 64` lies in `mem`, which outlives the scope; both
                        // threads access it only through this module.
                        unsafe { write((addr + at) as *mut u8, &byte) };
                    }
                }
            }
        };
        // OS threads, not the sync facade's: this exercises real hardware atomics.
        std::thread::scope(|s| {
            s.spawn(writer(0));
            s.spawn(writer(1));
        });
        let mut back = [0u8; SPAN];
        // SAFETY: the writers are done; `mem` is alive.
        unsafe { read(addr as *const u8, &mut back) };
        let last = ((rounds - 1) % 251) as u8 + 1;
        assert!(back.iter().all(|b| *b == last), "{back:?}");
    }
}
