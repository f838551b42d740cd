//! Bit operations on little bitmaps held as `[u64]` words, bit `i` in word `i / 64`.
//!
//! A mid block's page bitmap holds `pages` bits (the geometry's mid size); when that is below
//! 64 only the low bits of the single word are used, so every "all" test takes the bit count.

/// Mask of bits `[lo, hi)` of one word (`lo < hi <= 64`).
#[inline]
pub(crate) const fn mask(lo: u32, hi: u32) -> u64 {
    let high = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    high & !((1u64 << lo) - 1)
}

#[inline]
pub(crate) fn test(words: &[u64], i: u64) -> bool {
    words[(i / 64) as usize] & (1 << (i % 64)) != 0
}

#[inline]
pub(crate) fn set(words: &mut [u64], i: u64) {
    words[(i / 64) as usize] |= 1 << (i % 64);
}

/// Calls `f(word index, mask)` for the words that bits `[lo, hi)` touch.
#[inline]
fn for_words(lo: u64, hi: u64, mut f: impl FnMut(usize, u64)) {
    let mut i = lo;
    while i < hi {
        let word = i / 64;
        let end = hi.min((word + 1) * 64);
        f(
            word as usize,
            mask((i % 64) as u32, (end - word * 64) as u32),
        );
        i = end;
    }
}

/// Sets bits `[lo, hi)`.
pub(crate) fn set_range(words: &mut [u64], lo: u64, hi: u64) {
    for_words(lo, hi, |w, m| words[w] |= m);
}

/// Clears bits `[lo, hi)`.
pub(crate) fn clear_range(words: &mut [u64], lo: u64, hi: u64) {
    for_words(lo, hi, |w, m| words[w] &= !m);
}

/// Set bits in `[lo, hi)`.
pub(crate) fn count_in(words: &[u64], lo: u64, hi: u64) -> u64 {
    let mut n = 0;
    for_words(lo, hi, |w, m| n += u64::from((words[w] & m).count_ones()));
    n
}

/// The first set bit in `[lo, hi)`.
pub(crate) fn first_set_in(words: &[u64], lo: u64, hi: u64) -> Option<u64> {
    let mut i = lo;
    while i < hi {
        let word = i / 64;
        let end = hi.min((word + 1) * 64);
        let bits = words[word as usize] & mask((i % 64) as u32, (end - word * 64) as u32);
        if bits != 0 {
            return Some(word * 64 + u64::from(bits.trailing_zeros()));
        }
        i = end;
    }
    None
}

/// The first clear bit in `[lo, hi)`.
pub(crate) fn first_clear_in(words: &[u64], lo: u64, hi: u64) -> Option<u64> {
    let mut i = lo;
    while i < hi {
        let word = i / 64;
        let end = hi.min((word + 1) * 64);
        let bits = !words[word as usize] & mask((i % 64) as u32, (end - word * 64) as u32);
        if bits != 0 {
            return Some(word * 64 + u64::from(bits.trailing_zeros()));
        }
        i = end;
    }
    None
}

/// The first set bit of the whole bitmap.
#[inline]
pub(crate) fn first_set(words: &[u64]) -> Option<u64> {
    for (i, &w) in words.iter().enumerate() {
        if w != 0 {
            return Some(i as u64 * 64 + u64::from(w.trailing_zeros()));
        }
    }
    None
}

/// Whether all of the first `n` bits are clear.
#[inline]
pub(crate) fn all_clear(words: &[u64], n: u64) -> bool {
    if n < 64 {
        return words[0] & mask(0, n as u32) == 0;
    }
    words.iter().fold(0, |acc, w| acc | w) == 0
}

/// Whether all of the first `n` bits are set.
#[inline]
pub(crate) fn all_set(words: &[u64], n: u64) -> bool {
    if n < 64 {
        let m = mask(0, n as u32);
        return words[0] & m == m;
    }
    words.iter().fold(u64::MAX, |acc, w| acc & w) == u64::MAX
}

/// The lowest `p` in `[0, n)` with `p % align == 0` such that bits `[p, p + len)` are all clear
/// and `p + len <= n`.
pub(crate) fn find_clear_run(words: &[u64], n: u64, len: u64, align: u64) -> Option<u64> {
    let mut p = 0;
    while p + len <= n {
        let start = first_clear_in(words, p, n)?;
        let start = start.next_multiple_of(align);
        if start + len > n {
            return None;
        }
        match first_set_in(words, start, start + len) {
            None => return Some(start),
            Some(taken) => p = taken + 1,
        }
    }
    None
}

/// Calls `f(lo, hi)` for every maximal run of set bits of `word_of(i)` over bits `[0, n)`,
/// where `word_of` gives word `i` of the bitmap (so that callers can combine bitmaps).
pub(crate) fn runs(n: u64, word_of: impl Fn(usize) -> u64, mut f: impl FnMut(u64, u64)) {
    let words = n.div_ceil(64) as usize;
    let mut open: Option<u64> = None;
    for i in 0..words {
        let base = i as u64 * 64;
        let width = (n - base).min(64) as u32;
        let w = word_of(i) & mask(0, width);
        let mut pos = 0u32;
        while pos < 64 {
            match open {
                None => {
                    let rest = w >> pos;
                    if rest == 0 {
                        break;
                    }
                    pos += rest.trailing_zeros();
                    open = Some(base + u64::from(pos));
                }
                Some(s) => {
                    let rest = !w >> pos;
                    if rest == 0 {
                        break; // the run goes on into the next word
                    }
                    pos += rest.trailing_zeros();
                    f(s, base + u64::from(pos.min(width)));
                    open = None;
                }
            }
        }
    }
    if let Some(s) = open {
        f(s, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_runs(bits: &[bool]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            if b {
                match out.last_mut() {
                    Some(last) if last.1 == i as u64 => last.1 += 1,
                    _ => out.push((i as u64, i as u64 + 1)),
                }
            }
        }
        out
    }

    #[test]
    fn runs_and_searches_match_a_bool_array() {
        let mut rng = pfnstore_core::testing::XorShift::new(0x5eed);
        for n in [1u64, 2, 4, 8, 63, 64, 65, 128, 512] {
            for _ in 0..200 {
                let density = rng.below(5);
                let bits: Vec<bool> = (0..n).map(|_| rng.below(5) < density).collect();
                let mut words = vec![0u64; n.div_ceil(64) as usize];
                for (i, &b) in bits.iter().enumerate() {
                    if b {
                        set(&mut words, i as u64);
                    }
                }
                let mut got = Vec::new();
                runs(n, |i| words[i], |a, b| got.push((a, b)));
                assert_eq!(got, naive_runs(&bits), "n {n} bits {bits:?}");
                let lo = rng.below(n);
                let hi = lo + 1 + rng.below(n - lo);
                let want_set = (lo..hi).find(|&i| bits[i as usize]);
                let want_clear = (lo..hi).find(|&i| !bits[i as usize]);
                assert_eq!(first_set_in(&words, lo, hi), want_set);
                assert_eq!(first_clear_in(&words, lo, hi), want_clear);
                assert_eq!(
                    count_in(&words, lo, hi),
                    (lo..hi).filter(|&i| bits[i as usize]).count() as u64
                );
                assert_eq!(all_clear(&words, n), bits.iter().all(|b| !b));
                assert_eq!(all_set(&words, n), bits.iter().all(|b| *b));
                for (len, align) in [(1u64, 1u64), (2, 1), (3, 2), (5, 4), (9, 1), (16, 8)] {
                    let want = (0..n)
                        .step_by(align as usize)
                        .find(|&p| p + len <= n && (p..p + len).all(|i| !bits[i as usize]));
                    assert_eq!(find_clear_run(&words, n, len, align), want, "{len} {align}");
                }
                let mut w2 = words.clone();
                set_range(&mut w2, lo, hi);
                assert!((lo..hi).all(|i| test(&w2, i)));
                clear_range(&mut w2, lo, hi);
                assert!((lo..hi).all(|i| !test(&w2, i)));
            }
        }
    }
}
