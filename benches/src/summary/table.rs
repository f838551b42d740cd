//! The summary's rows: pfnstore's figure, each baseline's, the ratio; rendered as markdown and
//! serialised as JSON.

use serde::Serialize;

/// What a figure measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Nanoseconds (lower is better).
    Ns,
    /// Bytes of metadata per GiB of memory (lower is better).
    BytesPerGib,
    /// Bytes (lower is better).
    Bytes,
}

/// Where a baseline's figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Measured in this run.
    Measured,
    /// Published figures from another machine, quoted for comparison.
    Published,
}

/// A baseline next to pfnstore in one row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Baseline {
    /// Its name (`bitmap`, `vm-allocator`, `LLFree (published, another machine)`).
    pub name: String,
    /// Its figure in the row's unit; `None` where only `text` applies.
    pub value: Option<f64>,
    /// Measured here or published.
    pub source: Source,
    /// Words instead of (or beside) a figure, e.g. a published qualitative claim.
    pub text: Option<String>,
    /// `value / pfnstore's figure` (set when the baseline joins a row; see [`ratio`]).
    pub ratio: Option<f64>,
}

impl Baseline {
    /// A baseline measured in this run.
    pub fn measured(name: impl Into<String>, value: f64) -> Baseline {
        Baseline {
            name: name.into(),
            value: Some(value),
            source: Source::Measured,
            text: None,
            ratio: None,
        }
    }

    /// A published figure.
    pub fn published(name: impl Into<String>, value: Option<f64>, text: &str) -> Baseline {
        Baseline {
            name: name.into(),
            value,
            source: Source::Published,
            text: Some(text.to_string()),
            ratio: None,
        }
    }
}

/// A goal a row is held to, with where it was set, and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The goal in words, with its source (`≤ 38 ns (allocator target: LLFree on this machine)`).
    pub text: String,
    /// Whether this run's figures meet it; `None` when a figure it needs is missing.
    pub met: Option<bool>,
}

/// One benchmark.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// What is measured, in words.
    pub benchmark: String,
    /// The unit of every figure of the row.
    pub unit: Unit,
    /// pfnstore's figure; `None` when it was not measured (see `note`).
    pub pfnstore: Option<f64>,
    /// The baselines, in table order.
    pub baselines: Vec<Baseline>,
    /// Why a figure is missing, or how to read the row.
    pub note: Option<String>,
    /// The criterion ids (or other sources) the figures come from.
    pub sources: Vec<String>,
    /// The goal set for it, if a document sets one.
    pub target: Option<Target>,
}

impl Row {
    /// A row of `unit` with pfnstore's figure and no baselines yet.
    pub fn new(benchmark: impl Into<String>, unit: Unit, pfnstore: Option<f64>) -> Row {
        Row {
            benchmark: benchmark.into(),
            unit,
            pfnstore,
            baselines: Vec::new(),
            note: None,
            sources: Vec::new(),
            target: None,
        }
    }

    /// Adds a baseline, with its ratio to pfnstore's figure.
    pub fn with(mut self, mut baseline: Baseline) -> Row {
        baseline.ratio = ratio(self.pfnstore, baseline.value);
        self.baselines.push(baseline);
        self
    }

    /// Sets the note.
    pub fn noted(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }

    /// Holds the row to `text`, met (or not) as `met` says.
    pub fn target(mut self, text: impl Into<String>, met: Option<bool>) -> Row {
        self.target = Some(Target {
            text: text.into(),
            met,
        });
        self
    }

    /// Holds pfnstore's figure to at most `limit` (in the row's unit); `why` says who set it.
    pub fn target_at_most(self, limit: f64, why: &str) -> Row {
        let met = self.pfnstore.map(|v| v <= limit);
        let text = format!("≤ {} ({why})", human(self.unit, limit));
        self.target(text, met)
    }

    /// Holds the row to a ratio of at least `min` against the baseline called `baseline`
    /// (1: pfnstore at least as fast or as small); `text` says the goal and who set it.
    pub fn target_ratio(self, baseline: &str, min: f64, text: impl Into<String>) -> Row {
        let met = self
            .baselines
            .iter()
            .find(|b| b.name == baseline)
            .and_then(|b| b.ratio)
            .map(|r| r >= min);
        self.target(text, met)
    }

    /// Records where the figures come from.
    pub fn from_sources(mut self, sources: impl IntoIterator<Item = String>) -> Row {
        self.sources.extend(sources);
        self
    }
}

/// `baseline / pfnstore`: above 1, pfnstore is faster (or smaller). `None` unless both are
/// positive figures.
pub fn ratio(pfnstore: Option<f64>, baseline: Option<f64>) -> Option<f64> {
    match (pfnstore, baseline) {
        (Some(ours), Some(theirs)) if ours > 0.0 && theirs > 0.0 => Some(theirs / ours),
        _ => None,
    }
}

/// A figure in its unit, for people.
pub fn human(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Ns => {
            if value >= 1e9 {
                format!("{:.2} s", value / 1e9)
            } else if value >= 1e6 {
                format!("{:.2} ms", value / 1e6)
            } else if value >= 1e3 {
                format!("{:.2} µs", value / 1e3)
            } else {
                format!("{value:.1} ns")
            }
        }
        Unit::BytesPerGib => format!("{} per GiB", bytes(value)),
        Unit::Bytes => bytes(value),
    }
}

fn bytes(value: f64) -> String {
    const KIB: f64 = 1024.0;
    if value >= KIB * KIB * KIB {
        format!("{:.2} GiB", value / (KIB * KIB * KIB))
    } else if value >= KIB * KIB {
        format!("{:.2} MiB", value / (KIB * KIB))
    } else if value >= KIB {
        format!("{:.1} KiB", value / KIB)
    } else {
        format!("{value:.0} B")
    }
}

/// A ratio with three significant digits or more (`0.80x`, `12.5x`, `4604x`).
fn ratio_text(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2}x")
    }
}

/// `yes`, `no`, or `—` (no target, or a figure it needs is missing).
fn met(target: Option<&Target>) -> &'static str {
    match target.and_then(|t| t.met) {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    }
}

/// The rows as one markdown table: benchmark, pfnstore's median, baseline, the baseline's
/// median, `baseline / pfnstore`, the target and whether it was met. A row with several
/// baselines takes one line per baseline; its target is on its first line.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| benchmark | pfnstore | baseline | baseline's figure | baseline / pfnstore | target | met? |\n\
         |---|---:|---|---:|---:|---|---|\n",
    );
    for row in rows {
        let ours = match (row.pfnstore, &row.note) {
            (Some(v), _) => human(row.unit, v),
            (None, Some(note)) => note.clone(),
            (None, None) => "not measured".to_string(),
        };
        let name = match (&row.note, row.pfnstore) {
            (Some(note), Some(_)) => format!("{} ({note})", row.benchmark),
            _ => row.benchmark.clone(),
        };
        let target = row.target.as_ref().map_or("—", |t| t.text.as_str());
        let met = met(row.target.as_ref());
        if row.baselines.is_empty() {
            out.push_str(&format!(
                "| {name} | {ours} | — | — | — | {target} | {met} |\n"
            ));
            continue;
        }
        for (i, b) in row.baselines.iter().enumerate() {
            let figure = match (b.value, &b.text) {
                (Some(v), Some(t)) => format!("{} ({t})", human(row.unit, v)),
                (Some(v), None) => human(row.unit, v),
                (None, Some(t)) => t.clone(),
                (None, None) => "not measured".to_string(),
            };
            let r = b.ratio.map_or("—".to_string(), ratio_text);
            let (target, met) = if i == 0 { (target, met) } else { ("", "") };
            out.push_str(&format!(
                "| {name} | {ours} | {} | {figure} | {r} | {target} | {met} |\n",
                b.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_need_two_positive_figures() {
        assert_eq!(ratio(Some(50.0), Some(100.0)), Some(2.0));
        assert_eq!(ratio(Some(100.0), Some(50.0)), Some(0.5));
        assert_eq!(ratio(None, Some(50.0)), None);
        assert_eq!(ratio(Some(50.0), None), None);
        assert_eq!(ratio(Some(0.0), Some(50.0)), None);
    }

    #[test]
    fn ratios_read_with_three_digits() {
        assert_eq!(ratio_text(0.8), "0.80x");
        assert_eq!(ratio_text(9.999), "10.00x");
        assert_eq!(ratio_text(12.54), "12.5x");
        assert_eq!(ratio_text(4604.02), "4604x");
    }

    #[test]
    fn figures_read_in_their_units() {
        assert_eq!(human(Unit::Ns, 52.74), "52.7 ns");
        assert_eq!(human(Unit::Ns, 1500.0), "1.50 µs");
        assert_eq!(human(Unit::Ns, 2.5e6), "2.50 ms");
        assert_eq!(human(Unit::Ns, 7.2e9), "7.20 s");
        assert_eq!(human(Unit::BytesPerGib, 64.0), "64 B per GiB");
        assert_eq!(human(Unit::Bytes, 16_616_059.0), "15.85 MiB");
    }

    #[test]
    fn one_line_per_baseline() {
        let rows = vec![
            Row::new("4K convert-and-back", Unit::Ns, Some(50.0))
                .with(Baseline::measured("bitmap", 40.0))
                .with(Baseline::published(
                    "LLFree",
                    Some(100.0),
                    "another machine",
                ))
                .target_ratio("bitmap", 1.0, "≤ bitmap"),
            Row::new("prefault, 1 GiB pages", Unit::Ns, None).noted("skipped: no pool"),
            Row::new("snapshot bytes", Unit::Bytes, Some(2048.0))
                .target_at_most(1024.0 * 1024.0, "live-update target"),
        ];
        let table = markdown(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 4);
        assert_eq!(
            lines[2],
            "| 4K convert-and-back | 50.0 ns | bitmap | 40.0 ns | 0.80x | ≤ bitmap | **no** |"
        );
        assert_eq!(
            lines[3],
            "| 4K convert-and-back | 50.0 ns | LLFree | 100.0 ns (another machine) | 2.00x |  |  |"
        );
        assert_eq!(
            lines[4],
            "| prefault, 1 GiB pages | skipped: no pool | — | — | — | — | — |"
        );
        assert_eq!(
            lines[5],
            "| snapshot bytes | 2.0 KiB | — | — | — | ≤ 1.00 MiB (live-update target) | yes |"
        );
    }

    #[test]
    fn targets_are_judged_on_the_figures() {
        let row = |ours: Option<f64>| {
            Row::new("r", Unit::Ns, ours).with(Baseline::measured("bitmap", 40.0))
        };
        let met = |r: Row| r.target.and_then(|t| t.met);
        assert_eq!(met(row(Some(40.0)).target_at_most(40.0, "x")), Some(true));
        assert_eq!(met(row(Some(40.5)).target_at_most(40.0, "x")), Some(false));
        assert_eq!(met(row(None).target_at_most(40.0, "x")), None);
        assert_eq!(
            met(row(Some(20.0)).target_ratio("bitmap", 1.8, "x")),
            Some(true)
        );
        assert_eq!(
            met(row(Some(30.0)).target_ratio("bitmap", 1.8, "x")),
            Some(false)
        );
        assert_eq!(
            met(row(Some(20.0)).target_ratio("rangemap", 1.0, "x")),
            None
        );
        assert_eq!(met(row(None).target_ratio("bitmap", 1.0, "x")), None);
    }
}
