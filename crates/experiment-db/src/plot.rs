//! Metric curves as PNG and SVG files (feature `plot`).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::{Error, ExperimentDb, Result, RunId};

/// DejaVu Sans (see `assets/DejaVuSans.LICENSE`): the PNG backend draws text with
/// it, so plots look the same on every machine, fonts installed or not.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Points kept per curve: long runs are downsampled keeping each bucket's min and max.
pub const MAX_POINTS: usize = 2_000;

/// One curve: a label and its `(step, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in step order; non-finite values are skipped when drawn.
    pub points: Vec<(u64, f64)>,
}

/// Reads `split/key` of each run (downsampled to [`MAX_POINTS`]) and draws the curves
/// into `<stem>.png` and `<stem>.svg`. Returns both paths.
pub fn plot_runs(
    db: &ExperimentDb,
    runs: &[RunId],
    key: &str,
    split: &str,
    stem: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let mut series = Vec::with_capacity(runs.len());
    for &run in runs {
        let record = db.run(run)?;
        let points = db.metric_history_downsampled(run, key, split, MAX_POINTS)?;
        series.push(Series {
            label: format!("{} (run {})", record.name, record.id),
            points,
        });
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(Error::Invalid(format!(
            "no {split}/{key} points in runs {runs:?}"
        )));
    }
    let title = format!("{split}/{key}");
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw(
        BitMapBackend::new(&png, (1024, 640)).into_drawing_area(),
        &title,
        &series,
    )
    .map_err(|e| Error::Invalid(format!("cannot draw {}: {e}", png.display())))?;
    draw(
        SVGBackend::new(&svg, (1024, 640)).into_drawing_area(),
        &title,
        &series,
    )
    .map_err(|e| Error::Invalid(format!("cannot draw {}: {e}", svg.display())))?;
    Ok((png, svg))
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    // Registering twice is harmless; the first registration wins.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(_, v)| v.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (u64::MAX, 0u64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in finite() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err("no finite point to draw".into());
    }
    if x1 == x0 {
        x1 = x0 + 1;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let (y0, y1) = (y0 - pad, y1 + pad);
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 28))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(title)
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(u64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(_, v)| v.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())?;
    area.present().map_err(|e| e.to_string())
}
