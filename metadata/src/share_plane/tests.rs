use super::*;
use Shareability::*;
use proptest::prelude::*;

fn naive(plane: &SharePlane, pages: u32) -> Vec<Shareability> {
    (0..pages).map(|p| plane.value_at(p)).collect()
}

#[test]
fn one_page_inline_then_back_to_uniform() {
    let shape = PlaneShape::new(64, 3);
    let mut plane = SharePlane::Uniform(Shared);
    plane.set(7, 8, Private, shape);
    assert!(matches!(plane, SharePlane::Inline { len: 2, .. }));
    assert_eq!(plane.value_at(7), Private);
    assert_eq!(plane.value_at(8), Shared);
    assert_eq!(plane.next_flip(0, 64), Some(7));
    plane.set(7, 8, Shared, shape);
    assert!(matches!(plane, SharePlane::Uniform(Shared)));
}

/// An x86-64 chunk (2^18 pages, 512 middle blocks): the list gains its 64-byte index at
/// 256 flips, loses it below, and becomes the bitmap past 8192 - 16 flips.
#[test]
fn the_mid_index_follows_the_flip_count() {
    let shape = PlaneShape::new(1 << 18, 9);
    assert_eq!(shape.index_words(), 16);
    assert!(!shape.indexed(255) && shape.indexed(256));
    assert!(!shape.dense_wanted(8192 - 16) && shape.dense_wanted(8192 - 15));
    let mut plane = SharePlane::Uniform(Shared);
    // Pages 1000 * k + 1 for k in 0..128: 256 flips, in middle blocks 1000 * k / 512.
    for k in 0..128u32 {
        plane.set(1000 * k + 1, 1000 * k + 2, Private, shape);
        let flips = 2 * (k as usize + 1);
        assert_eq!(
            matches!(plane, SharePlane::Indexed { .. }),
            flips >= 256,
            "{flips} flips"
        );
        let heap = if flips <= INLINE_FLIPS {
            0
        } else {
            shape.list_bytes(flips)
        };
        assert_eq!(plane.heap_bytes(), heap);
        plane.check_canonical(shape).unwrap();
    }
    assert_eq!(plane.heap_bytes(), 4 * (256 + 16));
    for mid in 0..512u32 {
        let mixed = (0..128u32).any(|k| (1000 * k + 1) >> 9 == mid);
        assert_eq!(plane.mid_uniform(mid, 9), !mixed, "mid {mid}");
    }
    plane.set(1, 2, Shared, shape);
    assert!(matches!(plane, SharePlane::Runs { .. }));
    assert!(plane.mid_uniform(0, 9));
    assert!(!plane.mid_uniform(1, 9));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    #[test]
    fn small_plane_set_matches_the_general_set(
        ops in prop::collection::vec((0u32..64, 1u32..20, any::<bool>()), 1..12),
    ) {
        let pages = 64;
        let shape = PlaneShape::new(pages, 3);
        let mut plane = SharePlane::Uniform(Shared);
        for (start, len, private) in ops {
            let (lo, to) = (start % pages, if private { Private } else { Shared });
            let hi = (lo + len).min(pages);
            let small = plane.small().map(|s| s.with_set(lo, hi, to, pages));
            plane.set(lo, hi, to, shape);
            match (small, plane.small()) {
                (Some(Some(fast)), Some(general)) => {
                    prop_assert_eq!(fast.flips(), general.flips());
                    prop_assert_eq!(fast.flips().to_array(), general.flips().to_array());
                    prop_assert_eq!(fast.first, general.first);
                    let rebuilt = SharePlane::from_small(fast);
                    prop_assert_eq!(naive(&rebuilt, pages), naive(&plane, pages));
                    rebuilt.check_canonical(shape).map_err(TestCaseError::fail)?;
                }
                // Too many flips for the fast path: the general plane is a list.
                (Some(None), general) => prop_assert!(general.is_none()),
                (None, _) => {}
                (Some(Some(_)), None) => prop_assert!(false, "fast path kept a big plane"),
            }
        }
    }
}

/// Disjoint, non-adjacent ascending ranges inside `pages` from arbitrary cut points.
fn disjoint_ranges(cuts: &[u32], pages: u32) -> Vec<(u32, u32)> {
    let mut points: Vec<u32> = cuts.iter().map(|c| c % (pages + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for pair in points.chunks_exact(2) {
        let (lo, hi) = (pair[0], pair[1]);
        match ranges.last() {
            // Touching the previous range: skip, the caller merges adjacent ranges.
            Some(&(_, end)) if end >= lo => {}
            _ => ranges.push((lo, hi)),
        }
    }
    ranges
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    /// `set_many` of several ranges gives the plane (value and canonical form) that as
    /// many `set`s give, from every shape of plane.
    #[test]
    fn set_many_matches_one_set_per_range(
        pages_log in 2u32..13,
        mid_pick in 0u32..16,
        start in prop::collection::vec((0u32..8192, 1u32..64, any::<bool>()), 0..600),
        batches in prop::collection::vec(
            (prop::collection::vec(0u32..8193, 0..400), any::<bool>()),
            1..4,
        ),
    ) {
        let pages = 1u32 << pages_log;
        let mid_order = 1 + mid_pick % (pages_log - 1);
        let shape = PlaneShape::new(pages, mid_order);
        let mut plane = SharePlane::Uniform(Shared);
        let mut model = vec![Shared; pages as usize];
        for (at, len, private) in start {
            let lo = at % pages;
            let hi = (lo + len).min(pages);
            let to = if private { Private } else { Shared };
            plane.set(lo, hi, to, shape);
            model[lo as usize..hi as usize].fill(to);
        }
        for (cuts, private) in batches {
            let to = if private { Private } else { Shared };
            let ranges = disjoint_ranges(&cuts, pages);
            plane.set_many(&ranges, to, shape);
            for &(lo, hi) in &ranges {
                model[lo as usize..hi as usize].fill(to);
            }
            prop_assert_eq!(&naive(&plane, pages), &model);
            plane.check_canonical(shape).map_err(TestCaseError::fail)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn plane_matches_a_page_array(
        pages_log in 2u32..12,
        mid_pick in 0u32..16,
        ops in prop::collection::vec(
            (0u32..4096, prop_oneof![1u32..3, 1u32..200], any::<bool>()),
            1..80,
        ),
    ) {
        let pages = 1u32 << pages_log;
        let mid_order = 1 + mid_pick % (pages_log - 1);
        let shape = PlaneShape::new(pages, mid_order);
        let mut plane = SharePlane::Uniform(Shared);
        let mut model = vec![Shared; pages as usize];
        for (start, len, private) in ops {
            let lo = start % pages;
            let hi = (lo + len).min(pages);
            let to = if private { Private } else { Shared };
            plane.set(lo, hi, to, shape);
            model[lo as usize..hi as usize].fill(to);
            prop_assert_eq!(&naive(&plane, pages), &model);
            plane.check_canonical(shape).map_err(TestCaseError::fail)?;
            for mid in 0..pages >> mid_order {
                let block = &model[(mid << mid_order) as usize..((mid + 1) << mid_order) as usize];
                let uniform = block.iter().all(|v| *v == block[0]);
                prop_assert_eq!(plane.mid_uniform(mid, mid_order), uniform);
            }
            let private_pages = model.iter().filter(|v| **v == Private).count() as u64;
            prop_assert_eq!(plane.private_pages(pages), private_pages);
            let flips: Vec<u32> = (1..pages).filter(|&p| model[p as usize] != model[p as usize - 1]).collect();
            prop_assert_eq!(plane.flip_count(), flips.len());
            for probe in [0, lo, hi - 1, pages / 2] {
                let expect = flips.iter().copied().find(|&p| p > probe && p < hi.max(probe + 1));
                prop_assert_eq!(plane.next_flip(probe, hi.max(probe + 1)), expect);
            }
        }
    }
}
