//! The demo's pictures (PNG, drawn with plotters): each 1 GiB chunk's layout at the end, and
//! the block plan of one conversion.

use std::path::{Path, PathBuf};

use pfnstore::core::PageSize;
use pfnstore::{MappingPlan, Shareability, Store};
use plotters::prelude::*;

use super::life::Outcome;
use crate::cli::tour::Tour;

const WIDTH: u32 = 1024;
const ROW: u32 = 12;
const GAP: u32 = 6;
/// At most this many chunk rows per VM (a 16 TiB synthetic store has thousands).
const MAX_ROWS: u64 = 16;

/// The state a pixel shows; a larger one wins where several share a pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Unbacked,
    Private,
    Shared,
    Pinned,
    Quarantined,
}

impl State {
    fn color(self) -> RGBColor {
        match self {
            State::Unbacked => RGBColor(245, 245, 245),
            State::Private => RGBColor(90, 90, 110),
            State::Shared => RGBColor(60, 180, 75),
            State::Pinned => RGBColor(245, 130, 48),
            State::Quarantined => RGBColor(220, 20, 60),
        }
    }
}

type Failure = Box<dyn std::error::Error>;

fn draw_error<E: std::fmt::Debug>(e: E) -> Failure {
    format!("drawing failed: {e:?}").into()
}

/// Draws both pictures into `dir`; returns each path with what it shows.
pub(super) fn draw(
    dir: &Path,
    outcome: &Outcome,
    tour: &Tour,
    store: &Store,
) -> Result<Vec<(PathBuf, String)>, Failure> {
    std::fs::create_dir_all(dir)?;
    let layout = dir.join("layout.png");
    let rows = layout_picture(&layout, outcome, store)?;
    let plan = dir.join("plan.png");
    plan_picture(&plan, tour, store)?;
    Ok(vec![
        (
            layout,
            format!(
                "{rows} rows, one per 1 GiB chunk of each VM: green shared, grey private, orange pinned, red quarantined, white unbacked"
            ),
        ),
        (
            plan,
            "the plan of the 4 KiB conversion above: unmap (top), map (middle), the 2 MiB block around the page zoomed (bottom); green shared, grey private".to_string(),
        ),
    ])
}

fn layout_picture(path: &Path, outcome: &Outcome, store: &Store) -> Result<usize, Failure> {
    let chunk_bytes = store.geometry().chunk_pages() * 4096;
    let mut rows: Vec<Option<Vec<State>>> = Vec::new();
    for file in &outcome.vms {
        let chunks = file.size().div_ceil(chunk_bytes).min(MAX_ROWS);
        for c in 0..chunks {
            let start = c * chunk_bytes;
            let len = chunk_bytes.min(file.size() - start);
            let mut columns = vec![State::Unbacked; WIDTH as usize];
            for run in file.attribute_runs(start, len)? {
                let state = if run.quarantined.is_some() {
                    State::Quarantined
                } else if !run.pins.is_empty() {
                    State::Pinned
                } else if !run.backed {
                    State::Unbacked
                } else if run.shareability == Shareability::Shared {
                    State::Shared
                } else {
                    State::Private
                };
                let bytes = run.range.bytes();
                let column = |b: u64| ((b - start) * u64::from(WIDTH) / chunk_bytes) as usize;
                let first = column(bytes.start);
                let last = column(bytes.end - 1).min(WIDTH as usize - 1);
                for c in &mut columns[first..=last] {
                    *c = (*c).max(state);
                }
            }
            rows.push(Some(columns));
        }
        rows.push(None);
    }
    let height = rows
        .iter()
        .map(|r| if r.is_some() { ROW } else { GAP })
        .sum::<u32>()
        .max(1);
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut y = 0i32;
    let mut drawn = 0;
    for row in &rows {
        let Some(columns) = row else {
            y += GAP as i32;
            continue;
        };
        drawn += 1;
        let mut x = 0usize;
        while x < columns.len() {
            let state = columns[x];
            let end = (x..columns.len())
                .find(|i| columns[*i] != state)
                .unwrap_or(columns.len());
            root.draw(&Rectangle::new(
                [(x as i32, y), (end as i32, y + ROW as i32 - 2)],
                state.color().filled(),
            ))
            .map_err(draw_error)?;
            x = end;
        }
        y += ROW as i32;
    }
    root.present().map_err(draw_error)?;
    Ok(drawn)
}

fn plan_picture(path: &Path, tour: &Tour, store: &Store) -> Result<(), Failure> {
    let geometry = store.geometry();
    let plan = &tour.plan;
    let Some(region) = plan.region() else {
        return Err("the tour's plan is empty".into());
    };
    let height = 3 * 40 + 2 * 10;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let page = tour.offset / 4096;
    let mid = geometry.pages(PageSize::Size2M);
    let zoom = (page / mid * mid, page / mid * mid + mid);
    let full = (region.start().0, region.end().0);
    draw_blocks(&root, plan, true, full, 0)?;
    draw_blocks(&root, plan, false, full, 50)?;
    draw_blocks(&root, plan, false, zoom, 100)?;
    root.present().map_err(draw_error)?;
    Ok(())
}

/// Draws the unmap (or map) blocks of `plan` that lie in pages `window`, scaled to the
/// width, in a 40-pixel row at `y`.
fn draw_blocks<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    plan: &MappingPlan,
    unmap: bool,
    window: (u64, u64),
    y: i32,
) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    let geometry = plan.geometry();
    let list = if unmap { plan.unmap() } else { plan.map() };
    let span = (window.1 - window.0) as f64;
    let x_of = |page: u64| {
        ((page.clamp(window.0, window.1) - window.0) as f64 / span * f64::from(WIDTH)) as i32
    };
    for entry in list {
        let color = match entry.shareability {
            Shareability::Shared => State::Shared.color(),
            Shareability::Private => State::Private.color(),
        };
        for block in entry.run.blocks(&geometry) {
            let r = block.range(&geometry);
            if r.end().0 <= window.0 || r.start().0 >= window.1 {
                continue;
            }
            let (x0, x1) = (
                x_of(r.start().0),
                x_of(r.end().0).max(x_of(r.start().0) + 1),
            );
            root.draw(&Rectangle::new([(x0, y), (x1, y + 40)], color.filled()))
                .map_err(draw_error)?;
            // Block boundaries, where they fit.
            if x1 - x0 >= 3 {
                root.draw(&Rectangle::new(
                    [(x0, y), (x1, y + 40)],
                    BLACK.stroke_width(1),
                ))
                .map_err(draw_error)?;
            }
        }
    }
    Ok(())
}
