//! The stamps every write leaves: 32-byte records naming the file, the page, the record's
//! place in the page and a generation no other write uses; what a page holds in the model; and
//! the comparisons that say whose bytes a read returned.

use std::ops::Range;

use crate::common::PAGE;

pub(crate) const RECORD: u64 = 32;
pub(crate) const RECORDS: usize = (PAGE / RECORD) as usize;
pub(crate) const MAGIC: u64 = 0x5EA1;

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The check word's key for record `r` of `page` of `file`.
pub(crate) fn key(file: u32, page: u64, r: u64) -> u64 {
    splitmix((u64::from(file) << 40) ^ (page << 8) ^ r)
}

/// The four words of record `r` of `page` of `file` written in generation `generation` (0: zeros).
pub(crate) fn record_words(file: u32, page: u64, r: u64, generation: u64) -> [u64; 4] {
    if generation == 0 {
        return [0; 4];
    }
    [
        (MAGIC << 48) | (r << 32) | u64::from(file),
        page,
        generation,
        generation ^ key(file, page, r),
    ]
}

pub(crate) fn record_bytes(file: u32, page: u64, r: u64, generation: u64) -> [u8; RECORD as usize] {
    let mut out = [0u8; RECORD as usize];
    for (i, w) in record_words(file, page, r, generation).iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Whose bytes a 32-byte record is, for failure messages.
pub(crate) fn describe(record: &[u8]) -> String {
    if record.iter().all(|b| *b == 0) {
        return "zeros".into();
    }
    if record.len() != RECORD as usize {
        return format!("{record:02x?}");
    }
    let w: Vec<u64> = record
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let (file, r, page, generation) = (w[0] as u32, (w[0] >> 32) & 0xFFFF, w[1], w[2]);
    if w[0] >> 48 == MAGIC && w[3] == generation ^ key(file, page, r) {
        format!("the stamp of file {file} page {page:#x} record {r} generation {generation}")
    } else {
        format!("unrecognised bytes {record:02x?}")
    }
}

/// What a page holds: the generation of each record (0: zeros).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    Uniform(u64),
    Mixed(Box<[u64; RECORDS]>),
}

impl Content {
    pub(crate) const ZERO: Content = Content::Uniform(0);

    pub(crate) fn generation(&self, r: usize) -> u64 {
        match self {
            Content::Uniform(g) => *g,
            Content::Mixed(records) => records[r],
        }
    }

    pub(crate) fn set(&mut self, records: Range<usize>, generation: u64) {
        if records == (0..RECORDS) {
            *self = Content::Uniform(generation);
            return;
        }
        let mut all = match self {
            Content::Uniform(g) => Box::new([*g; RECORDS]),
            Content::Mixed(r) => r.clone(),
        };
        all[records].fill(generation);
        *self = if all.iter().all(|g| *g == all[0]) {
            Content::Uniform(all[0])
        } else {
            Content::Mixed(all)
        };
    }

    pub(crate) fn is_zero(&self) -> bool {
        *self == Content::ZERO
    }
}

/// The bytes `start..end` of `file` should hold, given each page's content.
pub(crate) fn expected_bytes<'a>(
    file: u32,
    start: u64,
    end: u64,
    content: impl Fn(u64) -> &'a Content,
) -> Vec<u8> {
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut at = start / RECORD * RECORD;
    while at < end {
        let page = at / PAGE;
        let r = (at % PAGE) / RECORD;
        let bytes = record_bytes(file, page, r, content(page).generation(r as usize));
        let from = start.max(at) - at;
        let to = end.min(at + RECORD) - at;
        out.extend_from_slice(&bytes[from as usize..to as usize]);
        at += RECORD;
    }
    out
}

/// Compares what a read of `start..` returned with what it should have.
pub(crate) fn compare(
    what: &str,
    file: u32,
    start: u64,
    got: &[u8],
    want: &[u8],
) -> Result<(), String> {
    let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) else {
        return Ok(());
    };
    let at = start + i as u64;
    let record = at / RECORD * RECORD;
    let lo = (record.max(start) - start) as usize;
    let hi = ((record + RECORD).min(start + got.len() as u64) - start) as usize;
    let whole = lo == (record - start.min(record)) as usize && hi - lo == RECORD as usize;
    let found = if whole && record >= start {
        describe(&got[lo..hi])
    } else {
        format!("{:02x?}", &got[lo..hi])
    };
    Err(format!(
        "{what}: file {file} byte {at:#x} (page {:#x}) reads {found} where {} was expected",
        at / PAGE,
        if record >= start && whole {
            describe(&want[lo..hi])
        } else {
            format!("{:02x?}", &want[lo..hi])
        }
    ))
}

/// Checks bytes read at `start` of `file` whose writers may be writing them now: every whole
/// word is zero or the word this file's stamp for that place has in some generation so far.
pub(crate) fn check_words(
    file: u32,
    start: u64,
    got: &[u8],
    max_generation: u64,
) -> Result<(), String> {
    let first = start.div_ceil(8) * 8;
    let mut at = first;
    while at + 8 <= start + got.len() as u64 {
        let i = (at - start) as usize;
        let w = u64::from_le_bytes(got[i..i + 8].try_into().unwrap_or([0; 8]));
        let page = at / PAGE;
        let r = (at % PAGE) / RECORD;
        let ok = w == 0
            || match (at % RECORD) / 8 {
                0 => w == (MAGIC << 48) | (r << 32) | u64::from(file),
                1 => w == page,
                2 => (1..=max_generation).contains(&w),
                _ => (1..=max_generation).contains(&(w ^ key(file, page, r))),
            };
        if !ok {
            let record = at / RECORD * RECORD;
            let whole = record >= start && record + RECORD <= start + got.len() as u64;
            let context = if whole {
                describe(&got[(record - start) as usize..(record - start + RECORD) as usize])
            } else {
                format!("word {w:#018x}")
            };
            return Err(format!(
                "file {file} byte {at:#x} (page {page:#x}), read by another thread, holds {context}: not this file's bytes for that place"
            ));
        }
        at += 8;
    }
    Ok(())
}
