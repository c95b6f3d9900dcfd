//! Pure computations over one metric series: its summary and its downsampling.

use std::cmp::Ordering;

/// A summary built by scanning points in the order they were written, by the rules of
/// [`crate::MetricSummaryRecord`]: `last` is the value at the highest step (of points at
/// one step, the last written); `min` and `max` count finite values only, and of equal
/// extremes keep the first written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SummaryAcc {
    pub(crate) last: f64,
    pub(crate) last_step: u64,
    pub(crate) min: Option<(u64, f64)>,
    pub(crate) max: Option<(u64, f64)>,
}

impl SummaryAcc {
    /// The summary of a series whose only point is `(step, value)`.
    pub(crate) fn new(step: u64, value: f64) -> Self {
        let finite = value.is_finite().then_some((step, value));
        Self {
            last: value,
            last_step: step,
            min: finite,
            max: finite,
        }
    }

    /// Adds the next point written.
    pub(crate) fn push(&mut self, step: u64, value: f64) {
        if step >= self.last_step {
            self.last_step = step;
            self.last = value;
        }
        if value.is_finite() {
            if self.min.is_none_or(|(_, m)| value < m) {
                self.min = Some((step, value));
            }
            if self.max.is_none_or(|(_, m)| value > m) {
                self.max = Some((step, value));
            }
        }
    }
}

/// Downsamples points sorted by step (ties in the order written) whose steps lie in
/// `lo..=hi`: the step range is cut into `buckets` buckets of equal width and each
/// bucket keeps its smallest and its largest point (the first written of equals), in
/// their original order, so a spike survives. Values are ordered by
/// [`f64::total_cmp`]: a NaN counts as larger than any number (a divergence shows as the
/// bucket's maximum). Returns at most `2 * buckets` points; `buckets` is clamped to `1..=2^32`.
pub(crate) fn downsample(
    points: impl IntoIterator<Item = (u64, f64)>,
    lo: u64,
    hi: u64,
    buckets: usize,
) -> Vec<(u64, f64)> {
    // At most 2^32 buckets, so that `offset * buckets` fits in a u128.
    let buckets = u128::from(u32::try_from(buckets).unwrap_or(u32::MAX).max(1));
    let width = u128::from(hi.saturating_sub(lo)) + 1;
    let bucket_of = |step: u64| u128::from(step.saturating_sub(lo)) * buckets / width;

    // (position, point) of the current bucket's min and max.
    type Extremes = ((usize, (u64, f64)), (usize, (u64, f64)));
    fn emit(out: &mut Vec<(u64, f64)>, extremes: Extremes) {
        let ((i_min, min), (i_max, max)) = extremes;
        match i_min.cmp(&i_max) {
            Ordering::Equal => out.push(min),
            Ordering::Less => out.extend([min, max]),
            Ordering::Greater => out.extend([max, min]),
        }
    }

    let mut out = Vec::new();
    let mut current: Option<(u128, Extremes)> = None;
    for (i, point) in points.into_iter().enumerate() {
        let bucket = bucket_of(point.0);
        match &mut current {
            Some((b, (min, max))) if *b == bucket => {
                if point.1.total_cmp(&min.1.1) == Ordering::Less {
                    *min = (i, point);
                }
                if point.1.total_cmp(&max.1.1) == Ordering::Greater {
                    *max = (i, point);
                }
            }
            _ => {
                if let Some((_, extremes)) = current.take() {
                    emit(&mut out, extremes);
                }
                current = Some((bucket, ((i, point), (i, point))));
            }
        }
    }
    if let Some((_, extremes)) = current {
        emit(&mut out, extremes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_follows_the_rules() {
        let mut acc = SummaryAcc::new(5, f64::NAN);
        assert_eq!(acc.min, None);
        acc.push(3, 1.0);
        assert!(acc.last.is_nan(), "a lower step does not replace last");
        acc.push(5, 2.0);
        assert_eq!(
            (acc.last_step, acc.last),
            (5, 2.0),
            "the last written at a step"
        );
        acc.push(6, 1.0);
        acc.push(7, f64::NEG_INFINITY);
        assert_eq!(
            acc.min,
            Some((3, 1.0)),
            "ties keep the first; infinities ignored"
        );
        assert_eq!(acc.max, Some((5, 2.0)));
        assert_eq!((acc.last_step, acc.last), (7, f64::NEG_INFINITY));
    }

    #[test]
    fn downsample_keeps_spikes_and_order() {
        let mut points: Vec<(u64, f64)> = (0..100).map(|s| (s, 1.0)).collect();
        points[37].1 = 50.0;
        points[38].1 = -50.0;
        points[80].1 = f64::NAN;
        let out = downsample(points.iter().copied(), 0, 99, 10);
        assert!(out.len() <= 20, "{}", out.len());
        assert!(out.contains(&(37, 50.0)) && out.contains(&(38, -50.0)));
        assert!(out.iter().any(|&(s, v)| s == 80 && v.is_nan()));
        assert!(out.windows(2).all(|w| w[0].0 <= w[1].0), "{out:?}");
        // A flat bucket gives one point.
        assert_eq!(out.iter().filter(|(s, _)| (0..10).contains(s)).count(), 1);
    }

    #[test]
    fn downsample_handles_degenerate_ranges() {
        assert!(downsample(Vec::new(), 0, 0, 4).is_empty());
        let same_step = [(7, 3.0), (7, 1.0), (7, 2.0)];
        assert_eq!(downsample(same_step, 7, 7, 4), vec![(7, 3.0), (7, 1.0)]);
        let far = [(0, 1.0), (u64::MAX, 2.0)];
        assert_eq!(
            downsample(far, 0, u64::MAX, 0),
            vec![(0, 1.0), (u64::MAX, 2.0)]
        );
    }
}
