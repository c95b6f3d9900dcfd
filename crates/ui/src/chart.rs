//! Line charts as inline SVG, drawn on the server: one polyline per run, with axes,
//! ticks and a legend. Every curve is marked (`class="curve"`, `data-run`,
//! `data-points`) so that a script or a test can read what is drawn.

use std::fmt::Write;

use kiln_experiment_db::RunId;

use crate::html::{escape, number};

/// One run's curve of one metric series.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Curve {
    /// Legend label.
    pub(crate) label: String,
    /// The run it belongs to.
    pub(crate) run: RunId,
    /// `(step, value)` in step order; non-finite values are not drawn.
    pub(crate) points: Vec<(u64, f64)>,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 36.0;
const TICKS: u32 = 5;

/// Colours of the curves, in order (Tableau 10).
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// A chart of `series` (`split/key`) with one polyline per curve; a note instead of a
/// plot when no curve has a finite point.
pub(crate) fn line_chart(series: &str, curves: &[Curve]) -> String {
    let finite = || {
        curves
            .iter()
            .flat_map(|c| c.points.iter())
            .filter(|(_, v)| v.is_finite())
    };
    let mut out = format!(
        "<figure class=\"chart\" data-series=\"{s}\"><figcaption>{s}</figcaption>",
        s = escape(series)
    );
    let (mut x0, mut x1, mut y0, mut y1) = (u64::MAX, 0u64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in finite() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        out.push_str("<p class=\"empty\">no finite point yet</p></figure>");
        return out;
    }
    if x1 == x0 {
        x1 = x0 + 1;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9 * y1.abs().max(1.0));
    let (y0, y1) = (y0 - pad, y1 + pad);
    #[allow(clippy::cast_precision_loss)] // steps far below 2^52
    let sx = |x: u64| LEFT + (x - x0) as f64 / (x1 - x0) as f64 * (WIDTH - LEFT - RIGHT);
    let sy = |y: f64| TOP + (y1 - y) / (y1 - y0) * (HEIGHT - TOP - BOTTOM);
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"{}\"><rect class=\"plot\" x=\"{LEFT}\" y=\"{TOP}\" \
         width=\"{}\" height=\"{}\"/>",
        escape(series),
        WIDTH - LEFT - RIGHT,
        HEIGHT - TOP - BOTTOM
    );
    for i in 0..=TICKS {
        let f = f64::from(i) / f64::from(TICKS);
        let y = y0 + f * (y1 - y0);
        let py = sy(y);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{py:.1}\" y2=\"{py:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            tick(y, y1 - y0)
        );
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // in x0..=x1
        let x = x0 + ((x1 - x0) as f64 * f).round() as u64;
        let _ = write!(
            out,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x}</text>",
            sx(x),
            HEIGHT - BOTTOM + 16.0
        );
    }
    let _ = write!(
        out,
        "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">optimizer step</text>",
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        HEIGHT - 4.0
    );
    let mut legend = String::from("<ul class=\"legend\">");
    for (i, curve) in curves.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let drawn: Vec<String> = curve
            .points
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            out,
            "<polyline class=\"curve\" data-run=\"{}\" data-points=\"{}\" stroke=\"{colour}\" \
             points=\"{}\"/>",
            curve.run,
            drawn.len(),
            drawn.join(" ")
        );
        let _ = write!(
            legend,
            "<li><span class=\"swatch\" style=\"background:{colour}\"></span>{}</li>",
            escape(&curve.label)
        );
    }
    legend.push_str("</ul>");
    out.push_str("</svg>");
    out.push_str(&legend);
    out.push_str("</figure>");
    out
}

/// A tick label with as many decimals as the range needs.
fn tick(value: f64, range: f64) -> String {
    let decimals = if range > 0.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped
        let d = (2.0 - range.log10().floor()).clamp(0.0, 8.0) as usize;
        d
    } else {
        3
    };
    let s = format!("{value:.decimals$}");
    if s.contains('.') { s } else { number(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(run: RunId, points: &[(u64, f64)]) -> Curve {
        Curve {
            label: format!("<run {run}>"),
            run,
            points: points.to_vec(),
        }
    }

    /// The attribute `name` of every `<polyline>`.
    fn polylines(svg: &str, name: &str) -> Vec<String> {
        svg.split("<polyline")
            .skip(1)
            .map(|p| {
                let start = p.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                p[start..start + p[start..].find('"').unwrap()].to_string()
            })
            .collect()
    }

    #[test]
    fn each_curve_is_one_polyline_with_its_finite_points() {
        let svg = line_chart(
            "train/loss",
            &[
                curve(1, &[(0, 2.0), (1, 1.5), (2, f64::NAN), (3, 1.0)]),
                curve(2, &[(0, 3.0), (5, 0.5)]),
            ],
        );
        assert_eq!(polylines(&svg, "data-run"), ["1", "2"]);
        assert_eq!(polylines(&svg, "data-points"), ["3", "2"]);
        let first = &polylines(&svg, "points")[0];
        assert_eq!(first.split(' ').count(), 3);
        // Step 0 at the left edge, step 5 at the right; the top value at the top.
        assert!(first.starts_with("64.0,"), "{first}");
        assert!(polylines(&svg, "points")[1].contains("624.0,"), "{svg}");
        assert!(svg.contains("&lt;run 1&gt;"), "labels are escaped");
    }

    #[test]
    fn a_chart_without_finite_points_says_so() {
        let html = line_chart("valid/loss", &[curve(1, &[(0, f64::NAN)])]);
        assert!(
            html.contains("no finite point yet") && !html.contains("<svg"),
            "{html}"
        );
        let one = line_chart("valid/loss", &[curve(1, &[(4, 1.0)])]);
        assert_eq!(polylines(&one, "data-points"), ["1"]);
    }
}
