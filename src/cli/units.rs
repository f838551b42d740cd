//! Sizes on the command line: one way to read them, one rule they must meet, one way to print
//! them.
//!
//! Every command takes a size as `--size` (the older `--size-gib` and `--gib` are aliases):
//! a whole number with an optional binary unit (`4K`, `2M`, `1G`, `16T`, also `GiB` and the
//! like, any case, a space allowed). A bare number is GiB, which is what the old flags meant.
//! Every size must then meet [`SIZE_RULE`]: a whole number of GiB (a store is made of 1 GiB
//! chunks) from 1 GiB up to a [`SizeLimit`] that the message names, either the most chunks a
//! store manages or, for commands that obtain real memory, this machine's memory.

use std::fmt;

use pfnstore::hugetlb::pool::Sysfs;
use pfnstore::metadata::MAX_CHUNKS;

/// Bytes in a GiB: the chunk of a store, and so the granularity of every size.
pub(crate) const GIB: u64 = 1 << 30;

/// The start of the message for every size that breaks the rule; the limit and the size
/// given follow.
pub(crate) const SIZE_RULE: &str = "a size is a whole number of GiB from 1 GiB to";

/// How a size is written, for messages.
const HOW_TO_WRITE: &str = "write a whole number with an optional binary unit, as in 4K, 2M, 1G or 16T (a bare number is GiB)";

/// A byte count, shown in the largest binary unit it reaches (`4 KiB`, `2 MiB`, `1.5 GiB`,
/// `16 TiB`); fractions are cut, not rounded, to two decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Bytes(pub u64);

const UNITS: [(&str, u32); 7] = [
    ("B", 0),
    ("KiB", 10),
    ("MiB", 20),
    ("GiB", 30),
    ("TiB", 40),
    ("PiB", 50),
    ("EiB", 60),
];

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, shift) = UNITS
            .iter()
            .rev()
            .find(|(_, shift)| self.0 >> shift > 0)
            .unwrap_or(&UNITS[0]);
        let whole = self.0 >> shift;
        let rest = self.0 & ((1u64 << shift) - 1);
        if rest == 0 {
            return write!(f, "{whole} {name}");
        }
        // Hundredths of the unit, cut (never rounds up to 1024 of a unit); below 100, so the
        // cast is exact, and u128 because `rest * 100` can exceed 64 bits.
        let hundredths = ((u128::from(rest) * 100) >> shift) as u64;
        let fraction = format!("{hundredths:02}");
        let fraction = fraction.trim_end_matches('0');
        if fraction.is_empty() {
            write!(f, "{whole} {name}")
        } else {
            write!(f, "{whole}.{fraction} {name}")
        }
    }
}

/// The largest size a command accepts, and what sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SizeLimit {
    /// Bytes, a whole number of GiB.
    pub max: u64,
    /// What the limit is, for the message.
    pub what: &'static str,
}

impl SizeLimit {
    /// The most 1 GiB chunks a store keeps metadata slots for.
    pub(crate) const STORE: SizeLimit = SizeLimit {
        max: MAX_CHUNKS * GIB,
        what: "the most 1 GiB chunks a store manages",
    };

    /// This machine's memory (MemTotal, cut to whole GiB), for commands that obtain real
    /// memory; never more than [`SizeLimit::STORE`].
    pub(crate) fn machine() -> Result<SizeLimit, String> {
        let total = Sysfs::system().mem_total().map_err(|e| e.to_string())?;
        Ok(SizeLimit {
            max: (total / GIB * GIB).min(SizeLimit::STORE.max),
            what: "this machine's memory",
        })
    }

    /// Checks `size` against the rule and this limit; the error is the one message every
    /// command gives.
    pub(crate) fn check(&self, size: Bytes) -> Result<Bytes, String> {
        if size.0 >= GIB && size.0.is_multiple_of(GIB) && size.0 <= self.max {
            Ok(size)
        } else {
            Err(self.refusal(&size.to_string()))
        }
    }

    fn refusal(&self, given: &str) -> String {
        format!(
            "{SIZE_RULE} {} ({}); got {given}",
            Bytes(self.max),
            self.what
        )
    }
}

/// What a size argument says, before the rule is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// A byte count.
    Bytes(u64),
    /// More bytes than 64 bits hold.
    TooLarge,
}

/// Reads `text` as a size (see the module docs), without judging it.
fn read(text: &str) -> Result<Written, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 30,
        "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        _ => return Err(format!("'{text}' is not a size: {HOW_TO_WRITE}")),
    };
    if number.is_empty() {
        return Err(format!("'{text}' is not a size: {HOW_TO_WRITE}"));
    }
    // Only digits are left, so a parse failure is an overflow.
    let Ok(number) = number.parse::<u64>() else {
        return Ok(Written::TooLarge);
    };
    Ok(number
        .checked_mul(1 << shift)
        .map_or(Written::TooLarge, Written::Bytes))
}

/// Reads `text` and checks it against `limit`: the one place a size argument is judged.
pub(crate) fn parse_size(text: &str, limit: &SizeLimit) -> Result<Bytes, String> {
    match read(text)? {
        Written::Bytes(bytes) => limit.check(Bytes(bytes)),
        Written::TooLarge => {
            let bare = text.trim().bytes().all(|b| b.is_ascii_digit());
            let given = if bare {
                format!("{} GiB", text.trim())
            } else {
                text.trim().to_string()
            };
            Err(limit.refusal(&given))
        }
    }
}

/// clap value parser: a size of a store on synthetic or real memory (at most
/// [`SizeLimit::STORE`]).
pub(crate) fn store_size(text: &str) -> Result<Bytes, String> {
    parse_size(text, &SizeLimit::STORE)
}

/// clap value parser: a size of real memory to obtain here (at most [`SizeLimit::machine`]).
pub(crate) fn machine_size(text: &str) -> Result<Bytes, String> {
    parse_size(text, &SizeLimit::machine()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_the_largest_unit() {
        let shown = |b| Bytes(b).to_string();
        assert_eq!(shown(0), "0 B");
        assert_eq!(shown(100), "100 B");
        assert_eq!(shown(4096), "4 KiB");
        assert_eq!(shown(2 << 20), "2 MiB");
        assert_eq!(shown(1 << 30), "1 GiB");
        assert_eq!(shown(1536 << 20), "1.5 GiB");
        assert_eq!(shown(16 << 40), "16 TiB");
        assert_eq!(shown(1 << 50), "1 PiB");
        assert_eq!(shown((1 << 40) - 1), "1023.99 GiB");
        assert_eq!(shown((1 << 30) + 1), "1 GiB");
        assert_eq!(shown(1_000_000 * GIB), "976.56 TiB");
        assert_eq!(shown(u64::MAX), "15.99 EiB");
    }

    #[test]
    fn sizes_read_with_and_without_units() {
        let store = |t| store_size(t).map(|b| b.0);
        assert_eq!(store("2"), Ok(2 * GIB));
        assert_eq!(store("2G"), Ok(2 * GIB));
        assert_eq!(store("2 GiB"), Ok(2 * GIB));
        assert_eq!(store("2gib"), Ok(2 * GIB));
        assert_eq!(store("16T"), Ok(16 << 40));
        assert_eq!(store("1P"), Ok(1 << 50));
        assert_eq!(store("4096M"), Ok(4 * GIB));
        assert_eq!(store("1048576K"), Ok(GIB));
        assert_eq!(store("1073741824B"), Ok(GIB));
    }

    #[test]
    fn every_broken_rule_gets_the_one_message() {
        let limit = SizeLimit {
            max: 8 * GIB,
            what: "a test limit",
        };
        let message = |t| parse_size(t, &limit).unwrap_err();
        let expected = |got: &str| format!("{SIZE_RULE} 8 GiB (a test limit); got {got}");
        assert_eq!(message("0"), expected("0 B"));
        assert_eq!(message("512M"), expected("512 MiB"));
        assert_eq!(message("1536M"), expected("1.5 GiB"));
        assert_eq!(message("9G"), expected("9 GiB"));
        assert_eq!(message("1000000000000"), expected("1000000000000 GiB"));
        assert_eq!(
            message("99999999999999999999T"),
            expected("99999999999999999999T")
        );
        assert_eq!(message("16384P"), expected("16384P"));
        assert_eq!(parse_size("8G", &limit), Ok(Bytes(8 * GIB)));
        assert!(store_size("1024T").is_ok());
        assert!(
            store_size("1025T")
                .unwrap_err()
                .contains("1 PiB (the most 1 GiB chunks a store manages)")
        );
    }

    #[test]
    fn malformed_sizes_say_how_to_write_one() {
        for bad in ["", "G", "2X", "1.5G", "-1G", "2 G B", "0x10G", "KiB"] {
            let message = store_size(bad).unwrap_err();
            assert!(message.contains("is not a size"), "{bad:?}: {message}");
            assert!(message.contains("16T"), "{bad:?}: {message}");
        }
    }
}
