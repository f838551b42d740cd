//! The scale curve: what a 4 KiB conversion costs, and what the metadata weighs, as a store
//! grows from 1 to 16 TiB, uniform and with 1 % of its pages converted. It shows that cost
//! follows boundaries (converted pages), not memory.
//!
//! For each size: a synthetic store (`SyntheticSource`, no memory behind the PFNs) with 1,000
//! populated private files of equal size (the store's memory / 1,000, rounded down to 2 MiB);
//!
//! 1. metadata bytes (the store's physical metadata plus every file's, `Stats::bytes`) and a
//!    *storm* of timed 4 KiB conversions on the uniform store: a random page of a random file
//!    to shared and back, each conversion timed alone with `Instant` (median and p99 from the
//!    sorted samples);
//! 2. the *fill*: random 4 KiB pages of the files converted to shared, one `GuestFile::convert`
//!    each, until the target fraction (1 %) of the files' pages is shared (the facade has no
//!    bulk conversion of scattered pages, so this is the way a VMM would get there; it runs on
//!    one thread per CPU, each on its own files, and is not the figure reported);
//! 3. metadata bytes and the same storm at that fragmentation;
//! 4. one whole file converted: fragmented → all shared, → all private, → all shared.
//!
//! Prints a table, writes the points to `<out>/scale-curve.json` (read back by `bench-summary`)
//! and draws `<out>/scale-curve.png`: cost per conversion, metadata bytes and whole-file time
//! against the store's size.
//!
//! ```text
//! cargo run --release -p pfnstore-benches --bin scale-curve -- \
//!     [--sizes 1,4,16] [--files 1000] [--fraction 0.01] [--storm 200000] \
//!     [--max-fill PAGES] [--fill-threads N] [--out target/pfnstore-bench]
//! ```
//!
//! `--max-fill` caps the pages the fill converts per size (the reached fraction is reported);
//! `--storm` is the number of timed conversions per storm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pfnstore::core::testing::XorShift;
use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{ConvertMode, FileOptions, GuestFile, Shareability, Store, StoreOptions};
use pfnstore_benches::scale_curve::{ScalePoint, markdown, percentile};
use plotters::prelude::*;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

type Failure = Box<dyn std::error::Error>;

#[derive(Debug)]
struct Args {
    sizes: Vec<u64>,
    files: u64,
    fraction: f64,
    storm: u64,
    max_fill: Option<u64>,
    fill_threads: usize,
    out: PathBuf,
}

fn usage() -> String {
    "usage: scale-curve [--sizes 1,4,16] [--files 1000] [--fraction 0.01] [--storm 200000] \
     [--max-fill PAGES] [--fill-threads N] [--out DIR]"
        .to_string()
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        sizes: vec![1, 4, 16],
        files: 1000,
        fraction: 0.01,
        storm: 200_000,
        max_fill: None,
        fill_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        out: PathBuf::from("target/pfnstore-bench"),
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))?;
        let bad = |what: &str| format!("{flag} {value}: {what}\n{}", usage());
        match flag.as_str() {
            "--sizes" => {
                parsed.sizes = value
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("a list of TiB such as 1,4,16"))?;
                if parsed.sizes.is_empty() || parsed.sizes.iter().any(|&t| t == 0 || t > 64) {
                    return Err(bad("each size from 1 to 64 TiB"));
                }
            }
            "--files" => {
                parsed.files = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("a number of files, 1 or more"))?;
            }
            "--fraction" => {
                parsed.fraction = value
                    .parse()
                    .ok()
                    .filter(|f: &f64| (0.0..=0.5).contains(f))
                    .ok_or_else(|| bad("a fraction from 0 to 0.5"))?;
            }
            "--storm" => {
                parsed.storm = value
                    .parse()
                    .ok()
                    .filter(|&n| n >= 2)
                    .ok_or_else(|| bad("a number of conversions, 2 or more"))?;
            }
            "--max-fill" => {
                parsed.max_fill = Some(value.parse().map_err(|_| bad("a number of pages"))?);
            }
            "--fill-threads" => {
                parsed.fill_threads = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("a number of threads, 1 or more"))?;
            }
            "--out" => parsed.out = PathBuf::from(value),
            _ => return Err(format!("unknown argument {flag}\n{}", usage())),
        }
    }
    Ok(parsed)
}

/// Metadata bytes of the store (physical) and of its files (per offset).
fn metadata_bytes(store: &Store, files: &[GuestFile]) -> u64 {
    store.stats().physical.bytes + files.iter().map(|f| f.stats().metadata.bytes).sum::<u64>()
}

/// `ops` timed 4 KiB conversions (ns each): a random page of a random file to shared and back
/// to private, each direction timed alone. A page that is shared already is left alone, so the
/// fragmentation stays where it was.
fn storm(files: &[GuestFile], ops: u64, seed: u64) -> Result<Vec<u64>, Failure> {
    let mut rng = XorShift::new(seed);
    let mut samples = Vec::with_capacity(ops as usize + 1);
    let file_pages = files[0].size() / PAGE;
    let timed = |file: &GuestFile, offset: u64, to: Shareability| {
        let start = Instant::now();
        let outcome = file.convert(offset, PAGE, to, ConvertMode::Preserve);
        (start.elapsed(), outcome)
    };
    while (samples.len() as u64) < ops {
        let file = &files[rng.below(files.len() as u64) as usize];
        let offset = rng.below(file_pages) * PAGE;
        let (there, outcome) = timed(file, offset, Shareability::Shared);
        if outcome?.is_noop() {
            continue;
        }
        let (back, outcome) = timed(file, offset, Shareability::Private);
        outcome?;
        samples.push(nanos(there));
        samples.push(nanos(back));
    }
    samples.sort_unstable();
    Ok(samples)
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// Converts random pages of `files` to shared until `target` pages changed, on `threads`
/// threads (thread t takes the files whose index is t modulo `threads`). Returns the pages
/// converted.
fn fill(files: &[GuestFile], target: u64, threads: usize) -> Result<u64, String> {
    let file_pages = files[0].size() / PAGE;
    let threads = threads.min(files.len()).max(1);
    std::thread::scope(|scope| {
        // Each thread's share of the target, in proportion to its files; the shares add up
        // to the target exactly.
        let mut files_before = 0u64;
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<&GuestFile> = files.iter().skip(t).step_by(threads).collect();
                let n = files.len() as u128;
                let upto = |f: u64| (u128::from(target) * u128::from(f) / n) as u64;
                let share = upto(files_before + mine.len() as u64) - upto(files_before);
                files_before += mine.len() as u64;
                scope.spawn(move || -> Result<u64, String> {
                    let mut rng = XorShift::new(0x5CA1_E000 + t as u64);
                    let mut done = 0;
                    while done < share {
                        let file = mine[rng.below(mine.len() as u64) as usize];
                        let offset = rng.below(file_pages) * PAGE;
                        let outcome = file
                            .convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)
                            .map_err(|e| format!("converting offset {offset:#x}: {e}"))?;
                        if !outcome.is_noop() {
                            done += 1;
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| "a fill thread panicked".to_string())?)
            .sum()
    })
}

fn whole_file(file: &GuestFile, to: Shareability) -> Result<f64, Failure> {
    let start = Instant::now();
    file.convert(0, file.size(), to, ConvertMode::Preserve)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn median(sorted: &[u64]) -> f64 {
    percentile(sorted, 50.0).unwrap_or(0) as f64
}

fn p99(sorted: &[u64]) -> f64 {
    percentile(sorted, 99.0).unwrap_or(0) as f64
}

fn measure(tib: u64, args: &Args) -> Result<ScalePoint, Failure> {
    let chunks = tib * 1024;
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), chunks)?;
    let store = Store::synthetic(source, StoreOptions::default())?;
    let file_bytes = tib * TIB / args.files / (2 * MIB) * (2 * MIB);
    if file_bytes == 0 {
        return Err(format!("{} files do not fit in {tib} TiB", args.files).into());
    }
    let files = (0..args.files)
        .map(|_| store.create_file(FileOptions::new(file_bytes).populated()))
        .collect::<Result<Vec<_>, _>>()?;
    let uniform_metadata_bytes = metadata_bytes(&store, &files);
    let uniform = storm(&files, args.storm, 0x0_51AB)?;

    let pages = args.files * (file_bytes / PAGE);
    let wanted = (pages as f64 * args.fraction).round() as u64;
    let target = args.max_fill.map_or(wanted, |cap| wanted.min(cap));
    let start = Instant::now();
    let converted = fill(&files, target, args.fill_threads)?;
    let fill_seconds = start.elapsed().as_secs_f64();
    let metadata = metadata_bytes(&store, &files);
    let fragmented = storm(&files, args.storm, 0x0_57AB)?;

    let file = &files[0];
    let whole_file_fragmented_to_shared_ms = whole_file(file, Shareability::Shared)?;
    let whole_file_to_private_ms = whole_file(file, Shareability::Private)?;
    let whole_file_to_shared_ms = whole_file(file, Shareability::Shared)?;
    Ok(ScalePoint {
        tib,
        files: args.files,
        file_bytes,
        target_fraction: args.fraction,
        reached_fraction: converted as f64 / pages as f64,
        converted_pages: converted,
        fill_threads: args.fill_threads as u64,
        fill_seconds,
        uniform_metadata_bytes,
        metadata_bytes: metadata,
        storm_ops: args.storm,
        uniform_median_ns: median(&uniform),
        uniform_p99_ns: p99(&uniform),
        median_ns: median(&fragmented),
        p99_ns: p99(&fragmented),
        whole_file_fragmented_to_shared_ms,
        whole_file_to_private_ms,
        whole_file_to_shared_ms,
    })
}

/// Font files tried for the chart's labels, in order.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the first font found as plotters' "sans-serif"; false when there is none.
fn register_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn draw_error<E: std::fmt::Debug>(e: E) -> Failure {
    format!("drawing failed: {e:?}").into()
}

/// One panel: `series` (name, colour, y per point) against the store's TiB (on a log2 axis),
/// y on a log scale with labels written by `y_text`.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    points: &[ScalePoint],
    series: &[(&str, RGBColor, Vec<f64>)],
    y_text: &dyn Fn(f64) -> String,
    labels: bool,
) -> Result<(), Failure> {
    let log2 = |tib: u64| (tib as f64).log2();
    let x_max = points.iter().map(|p| log2(p.tib)).fold(1.0, f64::max);
    let ys = series.iter().flat_map(|s| s.2.iter().copied());
    let y_min = ys.clone().filter(|y| *y > 0.0).fold(f64::MAX, f64::min);
    let y_max = ys.fold(0.0, f64::max);
    let (y_min, y_max) = if y_max > 0.0 {
        (y_min / 3.0, y_max * 3.0)
    } else {
        (0.1, 1.0)
    };
    let mut builder = ChartBuilder::on(area);
    builder.margin(14);
    if labels {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(-0.3..x_max + 0.3, (y_min..y_max).log_scale())
        .map_err(draw_error)?;
    let x_text = |x: &f64| {
        let tib = x.exp2();
        if (tib - tib.round()).abs() < 1e-6 && tib >= 1.0 {
            format!("{tib:.0}")
        } else {
            String::new()
        }
    };
    let y_label = |y: &f64| y_text(*y);
    let mut mesh = chart.configure_mesh();
    mesh.max_light_lines(0);
    if labels {
        mesh.x_desc("store size, TiB (1,000 files)")
            .x_labels(((x_max + 0.6) as usize * 2).max(4))
            .x_label_formatter(&x_text)
            .y_labels(12)
            .y_label_formatter(&y_label);
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(draw_error)?;
    for (name, color, ys) in series {
        let data: Vec<(f64, f64)> = points
            .iter()
            .zip(ys)
            .filter(|(_, y)| **y > 0.0)
            .map(|(p, y)| (log2(p.tib), *y))
            .collect();
        let color = *color;
        let drawn = chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(draw_error)?;
        if labels {
            drawn.label(*name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(draw_error)?;
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(draw_error)?;
    }
    Ok(())
}

/// A time in ns for an axis.
fn ns_text(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{} ms", trim(ns / 1e6))
    } else if ns >= 1e3 {
        format!("{} µs", trim(ns / 1e3))
    } else {
        format!("{} ns", trim(ns))
    }
}

/// A time in ms for an axis.
fn ms_text(ms: f64) -> String {
    ns_text(ms * 1e6)
}

/// Bytes for an axis.
fn bytes_text(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{} GiB", trim(b / (1u64 << 30) as f64))
    } else if b >= MIB as f64 {
        format!("{} MiB", trim(b / MIB as f64))
    } else {
        format!("{} KiB", trim(b / 1024.0))
    }
}

/// Up to three significant digits, no trailing zeros.
fn trim(v: f64) -> String {
    let text = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);

/// What the fragmented series are: the fraction converted where every size reached its
/// target, else the number of pages (the fill capped by `--max-fill`).
fn fragmented_label(points: &[ScalePoint]) -> String {
    let reached = |p: &ScalePoint| (p.reached_fraction - p.target_fraction).abs() < 1e-6;
    match points.first() {
        None => "fragmented".to_string(),
        Some(first) if points.iter().all(reached) => {
            format!("{} % converted", first.target_fraction * 100.0)
        }
        Some(first)
            if points
                .iter()
                .all(|p| p.converted_pages == first.converted_pages) =>
        {
            format!(
                "{:.2} M pages converted",
                first.converted_pages as f64 / 1e6
            )
        }
        Some(_) => "fragmented (see the table)".to_string(),
    }
}

/// Draws the three panels; returns whether they have labels.
fn draw(path: &Path, points: &[ScalePoint]) -> Result<bool, Failure> {
    let labels = register_font();
    let root = BitMapBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let panels = root.split_evenly((1, 3));
    let fragmented = fragmented_label(points);
    let col = |f: fn(&ScalePoint) -> f64| points.iter().map(f).collect::<Vec<_>>();
    panel(
        &panels[0],
        "one 4 KiB conversion",
        points,
        &[
            (&format!("median, {fragmented}"), RED_, col(|p| p.median_ns)),
            (&format!("p99, {fragmented}"), ORANGE, col(|p| p.p99_ns)),
            ("median, uniform", BLUE_, col(|p| p.uniform_median_ns)),
            ("p99, uniform", GREEN_, col(|p| p.uniform_p99_ns)),
        ],
        &ns_text,
        labels,
    )?;
    panel(
        &panels[1],
        "metadata (store + files)",
        points,
        &[
            (&fragmented, RED_, col(|p| p.metadata_bytes as f64)),
            ("uniform", BLUE_, col(|p| p.uniform_metadata_bytes as f64)),
        ],
        &bytes_text,
        labels,
    )?;
    panel(
        &panels[2],
        "one whole file (store / 1,000)",
        points,
        &[
            (
                "fragmented -> shared",
                RED_,
                col(|p| p.whole_file_fragmented_to_shared_ms),
            ),
            (
                "shared -> private",
                BLUE_,
                col(|p| p.whole_file_to_private_ms),
            ),
            (
                "private -> shared",
                GREEN_,
                col(|p| p.whole_file_to_shared_ms),
            ),
        ],
        &ms_text,
        labels,
    )?;
    root.present().map_err(draw_error)?;
    Ok(labels)
}

fn run(args: &Args) -> Result<(), Failure> {
    std::fs::create_dir_all(&args.out)?;
    let mut points = Vec::new();
    for &tib in &args.sizes {
        let start = Instant::now();
        let point = measure(tib, args)?;
        eprintln!(
            "scale-curve: {tib} TiB measured in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        points.push(point);
    }
    print!("{}", markdown(&points));
    let json = args.out.join("scale-curve.json");
    std::fs::write(&json, serde_json::to_string_pretty(&points)?)?;
    let png = args.out.join("scale-curve.png");
    let labelled = draw(&png, &points)?;
    println!("points: {}", json.display());
    println!(
        "picture: {}{}",
        png.display(),
        if labelled {
            ""
        } else {
            " (no font file found: drawn without labels; left: ns per conversion, middle: bytes, right: whole-file ms; red fragmented, blue uniform)"
        }
    );
    Ok(())
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("scale-curve: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments_are_checked() {
        let a = args(&["--sizes", "1,4", "--storm", "1000", "--max-fill", "5"]).unwrap();
        assert_eq!(a.sizes, vec![1, 4]);
        assert_eq!(a.storm, 1000);
        assert_eq!(a.max_fill, Some(5));
        assert!(args(&["--sizes", "0"]).is_err());
        assert!(args(&["--fraction", "2"]).is_err());
        assert!(args(&["--storm"]).is_err());
        assert!(args(&["--bogus", "1"]).is_err());
    }

    #[test]
    fn fragmented_series_say_what_was_converted() {
        let point = |tib: u64, reached: f64, pages: u64| ScalePoint {
            tib,
            files: 1000,
            file_bytes: 1 << 30,
            target_fraction: 0.01,
            reached_fraction: reached,
            converted_pages: pages,
            fill_threads: 2,
            fill_seconds: 1.0,
            uniform_metadata_bytes: 1,
            metadata_bytes: 2,
            storm_ops: 2,
            uniform_median_ns: 1.0,
            uniform_p99_ns: 1.0,
            median_ns: 1.0,
            p99_ns: 1.0,
            whole_file_fragmented_to_shared_ms: 1.0,
            whole_file_to_private_ms: 1.0,
            whole_file_to_shared_ms: 1.0,
        };
        assert_eq!(
            fragmented_label(&[point(1, 0.01, 10), point(4, 0.01, 40)]),
            "1 % converted"
        );
        assert_eq!(
            fragmented_label(&[point(1, 0.01, 2_682_880), point(4, 0.0025, 2_682_880)]),
            "2.68 M pages converted"
        );
        assert_eq!(
            fragmented_label(&[point(1, 0.01, 10), point(4, 0.0025, 20)]),
            "fragmented (see the table)"
        );
    }

    #[test]
    fn axis_labels() {
        assert_eq!(ns_text(850.0), "850 ns");
        assert_eq!(ns_text(1500.0), "1.5 µs");
        assert_eq!(ms_text(0.002), "2 µs");
        assert_eq!(bytes_text(20.6 * MIB as f64), "20.6 MiB");
        assert_eq!(bytes_text(307.3 * 1024.0), "307 KiB");
    }

    #[test]
    fn a_small_store_gives_a_point() {
        // 1 TiB synthetic with 4 files and a tiny fill: checks the pipeline, not the speed.
        let a = args(&[
            "--sizes",
            "1",
            "--files",
            "4",
            "--fraction",
            "0.00001",
            "--storm",
            "20",
            "--fill-threads",
            "2",
        ])
        .unwrap();
        let p = measure(1, &a).unwrap();
        assert_eq!(p.files, 4);
        assert_eq!(p.file_bytes, TIB / 4);
        let pages = 4 * (TIB / 4 / PAGE);
        assert_eq!(p.converted_pages, (pages as f64 * 0.00001).round() as u64);
        assert!(p.metadata_bytes > p.uniform_metadata_bytes);
        assert!(p.median_ns <= p.p99_ns);
        assert!(markdown(&[p]).contains("| 1 TiB | 4 x 262144 MiB |"));
    }
}
