//! The fused kernels on plain `f32` slices, split across the cores on rayon's pool.
//!
//! Every split is by a fixed number of elements or rows, never by the number of
//! threads, and partial sums are added in the order of their chunks: a result is the
//! same bit for bit on any machine, which exact resume and the equality of runs
//! depend on.

use rayon::prelude::*;

use crate::adamw_step::Coefficients;
use crate::gemm::{Mat, MatMut, matmul};
use crate::math;

/// Elements per task of an element-wise kernel: large enough that a task costs far
/// more than handing it to another thread.
const CHUNK: usize = 16 * 1024;

/// Rows per task of a row-wise kernel, at least (more for short rows).
const MIN_ROWS: usize = 16;

/// `1/√2`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `out = gelu(x) = x/2 · (1 + erf(x/√2))`, the exact GELU.
pub fn gelu(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(out, x)| {
            math::vectorized(
                #[inline(always)]
                || {
                    for (o, &v) in out.iter_mut().zip(x) {
                        let e = math::exp(-0.5 * v * v);
                        *o = 0.5 * v * (1.0 + math::erf_with_exp(v * FRAC_1_SQRT_2, e));
                    }
                },
            )
        });
}

/// `out = gelu(x)` as [`gelu`] computes it, and `slope = gelu'(x)` as
/// [`gelu_backward`] computes it, from the same exponential and erf: a backward pass
/// that kept `slope` only multiplies ([`multiply`]), with the same bits.
pub fn gelu_and_slope(x: &[f32], out: &mut [f32], slope: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(slope.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((out, slope), x)| {
            math::vectorized(
                #[inline(always)]
                || {
                    for ((o, s), &v) in out.iter_mut().zip(slope.iter_mut()).zip(x) {
                        let e = math::exp(-0.5 * v * v);
                        let erf = math::erf_with_exp(v * FRAC_1_SQRT_2, e);
                        *o = 0.5 * v * (1.0 + erf);
                        *s = 0.5 * (1.0 + erf) + v * FRAC_1_SQRT_2PI * e;
                    }
                },
            )
        });
}

/// `grad ← grad · by`, element by element.
pub fn multiply(grad: &mut [f32], by: &[f32]) {
    grad.par_chunks_mut(CHUNK)
        .zip(by.par_chunks(CHUNK))
        .for_each(|(grad, by)| {
            math::vectorized(
                #[inline(always)]
                || {
                    for (g, &b) in grad.iter_mut().zip(by) {
                        *g *= b;
                    }
                },
            )
        });
}

/// `grad ← grad · gelu'(x)`, with `gelu'(x) = (1 + erf(x/√2))/2 + x · e^{-x²/2}/√(2π)`:
/// one `exp` serves both terms. In place: the output gradient becomes the input's.
pub fn gelu_backward(x: &[f32], grad: &mut [f32]) {
    grad.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(grad, x)| {
            math::vectorized(
                #[inline(always)]
                || {
                    for (g, &v) in grad.iter_mut().zip(x) {
                        let e = math::exp(-0.5 * v * v);
                        let cdf = 0.5 * (1.0 + math::erf_with_exp(v * FRAC_1_SQRT_2, e));
                        *g *= cdf + v * FRAC_1_SQRT_2PI * e;
                    }
                },
            )
        });
}

/// One AdamW step over a parameter's elements, in place on the parameter and its two
/// moments (`first`: the moments are the gradient's alone, whatever they hold), with
/// burn-optim's operations in burn-optim's order: the same bits as its `AdamW`, in
/// one pass over memory instead of about fifteen.
pub(crate) fn adamw(
    param: &mut [f32],
    grad: &[f32],
    moment_1: &mut [f32],
    moment_2: &mut [f32],
    c: Coefficients,
    first: bool,
) {
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(moment_1.par_chunks_mut(CHUNK))
        .zip(moment_2.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            math::vectorized(
                #[inline(always)]
                || {
                    // `p · 1` is `p`, bit for bit: no decay is no multiplication.
                    let decay = c.decay.unwrap_or(1.0);
                    let step = |p: &mut f32, m: f32, v: f32| {
                        let delta =
                            (m / c.correction_1) / ((v / c.correction_2).sqrt() + c.epsilon);
                        *p = *p * decay - delta * c.lr;
                    };
                    let elements = p.iter_mut().zip(g).zip(m).zip(v);
                    if first {
                        for (((p, &g), m), v) in elements {
                            (*m, *v) = (g * c.factor_1, (g * g) * c.factor_2);
                            step(p, *m, *v);
                        }
                    } else {
                        for (((p, &g), m), v) in elements {
                            *m = *m * c.beta_1 + g * c.factor_1;
                            *v = *v * c.beta_2 + (g * g) * c.factor_2;
                            step(p, *m, *v);
                        }
                    }
                },
            )
        });
}

/// The row's maximum and `Σ e^(x - max)`: a numerically safe softmax's two sums.
#[inline(always)]
fn max_and_exp_sum(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0;
    for &x in row {
        sum += math::exp(x - max);
    }
    (max, sum)
}

/// The mean cross-entropy of rows of `width` logits against their `targets` (each
/// below `width`): `mean(max + ln Σ e^(x - max) - x[target])`, the rows' losses
/// summed in f64, block by block in order.
pub(crate) fn cross_entropy(logits: &[f32], targets: &[usize], width: usize) -> f32 {
    let rows = rows_per_task(width);
    let partials: Vec<f64> = logits
        .par_chunks(rows * width)
        .zip(targets.par_chunks(rows))
        .map(|(logits, targets)| {
            math::vectorized(
                #[inline(always)]
                || {
                    let mut total = 0.0f64;
                    for (row, &target) in logits.chunks_exact(width).zip(targets) {
                        let (max, sum) = max_and_exp_sum(row);
                        total += f64::from(max + sum.ln() - row[target]);
                    }
                    total
                },
            )
        })
        .collect();
    (partials.iter().sum::<f64>() / targets.len().max(1) as f64) as f32
}

/// The logits' gradient of [`cross_entropy`] scaled by `scale` (the loss's gradient
/// over the number of rows), in place on the logits: `(softmax(row) -
/// onehot(target)) · scale`.
pub(crate) fn cross_entropy_backward(
    logits: &mut [f32],
    targets: &[usize],
    width: usize,
    scale: f32,
) {
    let rows = rows_per_task(width);
    logits
        .par_chunks_mut(rows * width)
        .zip(targets.par_chunks(rows))
        .for_each(|(logits, targets)| {
            math::vectorized(
                #[inline(always)]
                || {
                    for (row, &target) in logits.chunks_exact_mut(width).zip(targets) {
                        let (max, sum) = max_and_exp_sum(row);
                        let inv = 1.0 / sum;
                        for x in row.iter_mut() {
                            *x = math::exp(*x - max) * inv;
                        }
                        // `p - 1` is exact near 1, where `p·scale - scale` would cancel.
                        row[target] -= 1.0;
                        for x in row.iter_mut() {
                            *x *= scale;
                        }
                    }
                },
            )
        });
}

/// Rows per task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / 4 / width.max(1)).max(MIN_ROWS)
}

/// Gradients of `y = (x - mean)/√(var + ε) · γ + β` over rows of `width` elements.
///
/// Overwrites the output gradient `grad` with the input's and returns `(dγ, dβ)`
/// (each row of `grad` is read once, into `grad · γ`, before it is written). Mean and
/// variance are recomputed from `x` (two passes over a row in cache) rather than kept
/// from the forward pass.
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    grad: &mut [f32],
    epsilon: f32,
) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let block = rows_per_task(width) * width;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = grad
        .par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .map(|(grad, x)| {
            math::vectorized(
                #[inline(always)]
                || {
                    let mut dgamma = vec![0.0f32; width];
                    let mut dbeta = vec![0.0f32; width];
                    let mut g = vec![0.0f32; width];
                    let mut xhat = vec![0.0f32; width];
                    for (dy, x) in grad.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                        let n = width as f32;
                        let mean = math::sum(x) / n;
                        for (h, &v) in xhat.iter_mut().zip(x) {
                            *h = v - mean;
                        }
                        let var = math::dot(&xhat, &xhat) / n;
                        let rstd = 1.0 / (var + epsilon).sqrt();
                        for h in xhat.iter_mut() {
                            *h *= rstd;
                        }
                        for (((gi, &dyi), &gam), ((dg, db), &h)) in g
                            .iter_mut()
                            .zip(dy.iter())
                            .zip(gamma)
                            .zip(dgamma.iter_mut().zip(dbeta.iter_mut()).zip(&xhat))
                        {
                            *gi = dyi * gam;
                            *dg += dyi * h;
                            *db += dyi;
                        }
                        let mean_g = math::sum(&g) / n;
                        let mean_gx = math::dot(&g, &xhat) / n;
                        for ((d, &gi), &h) in dy.iter_mut().zip(&g).zip(&xhat) {
                            *d = rstd * (gi - mean_g - h * mean_gx);
                        }
                    }
                    (dgamma, dbeta)
                },
            )
        })
        .collect();
    let mut dgamma = vec![0.0f32; width];
    let mut dbeta = vec![0.0f32; width];
    for (pg, pb) in &partials {
        for ((total_g, total_b), (&g, &b)) in dgamma
            .iter_mut()
            .zip(dbeta.iter_mut())
            .zip(pg.iter().zip(pb))
        {
            *total_g += g;
            *total_b += b;
        }
    }
    (dgamma, dbeta)
}

/// Gradient of a softmax over rows of `width` elements from its output `y`:
/// `g ← y · (g - Σ g·y)` per row, in place on the output gradient `grad`.
pub fn softmax_backward(y: &[f32], grad: &mut [f32], width: usize) {
    let block = rows_per_task(width) * width;
    grad.par_chunks_mut(block)
        .zip(y.par_chunks(block))
        .for_each(|(grad, y)| {
            math::vectorized(
                #[inline(always)]
                || {
                    for (g, y) in grad.chunks_exact_mut(width).zip(y.chunks_exact(width)) {
                        let s = math::dot(g, y);
                        for (gi, &yi) in g.iter_mut().zip(y) {
                            *gi = yi * (*gi - s);
                        }
                    }
                },
            )
        });
}

/// Queries per block of a causal attention. A block's scores are computed only for
/// the keys up to its last query, and a block of keys meets only the queries from its
/// first one on: about 5/8 of the full products at 128 tokens. The skipped terms are
/// the mask's zeros, so the sums are the same.
const QUERY_BLOCK: usize = 32;

/// The `[start, end)` rows of each block of `t` queries (or keys).
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(QUERY_BLOCK)
        .map(move |start| (start, (start + QUERY_BLOCK).min(t)))
}

/// Rows `[start, end)` of a head's `t × hd` column block at `at` in a `[t, d]` buffer.
fn head_rows(
    data: &[f32],
    at: usize,
    (start, end): (usize, usize),
    hd: usize,
    d: usize,
) -> Mat<'_> {
    Mat::rows(data, at + start * d, end - start, hd, d)
}

/// Rows `[start, end)` of a head's column block at `col` in a `[t, d]` buffer.
fn head_rows_mut(
    data: &mut [f32],
    col: usize,
    (start, end): (usize, usize),
    hd: usize,
    d: usize,
) -> MatMut<'_> {
    MatMut {
        data,
        offset: col + start * d,
        rows: end - start,
        cols: hd,
        row_stride: d,
    }
}

/// Rows `[start, end)` of a `t × t` square of scores, the columns up to `end`: the
/// keys a block of queries sees.
fn block_of_square(data: &[f32], (start, end): (usize, usize), t: usize) -> Mat<'_> {
    Mat::rows(data, start * t, end - start, end, t)
}

/// Columns `[start, end)` of a `t × t` square of scores, from row `start` on: a block
/// of keys and the queries that see it.
fn keys_of_square(data: &[f32], (start, end): (usize, usize), t: usize) -> Mat<'_> {
    Mat::rows(data, start * t + start, t - start, end - start, t)
}

/// [`block_of_square`], writable.
fn block_of_square_mut(data: &mut [f32], (start, end): (usize, usize), t: usize) -> MatMut<'_> {
    MatMut {
        data,
        offset: start * t,
        rows: end - start,
        cols: end,
        row_stride: t,
    }
}

/// The causal attention probabilities of one head:
/// `p = softmax(Q Kᵀ / √hd)` with every key after its query at 0. `Q` and `K` are the
/// head's `t × hd` column blocks at `at` in `[t, d]` buffers; `p` is `t × t`.
fn probabilities(q: &[f32], k: &[f32], at: usize, shape: AttentionShape, p: &mut [f32]) {
    let AttentionShape { t, d, .. } = shape;
    let (hd, scale) = (shape.head_width(), shape.scale());
    for rows @ (_, end) in blocks(t) {
        matmul(
            block_of_square_mut(p, rows, t),
            head_rows(q, at, rows, hd, d),
            head_rows(k, at, (0, end), hd, d).t(),
            scale,
            false,
        );
    }
    // Each row's keys after its query, uncomputed past its block, become zeros.
    math::vectorized(
        #[inline(always)]
        || {
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                let (keep, masked) = row.split_at_mut(i + 1);
                let max = keep.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                for x in keep.iter_mut() {
                    *x = math::exp(*x - max);
                }
                let inv = 1.0 / math::sum(keep);
                for x in keep.iter_mut() {
                    *x *= inv;
                }
                masked.fill(0.0);
            }
        },
    );
}

/// The shape of a causal self-attention: sequences of `t` tokens of `d` features in
/// `heads` heads of `d / heads` columns each.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Tokens per sequence.
    pub t: usize,
    /// Features per token.
    pub d: usize,
    /// Heads (dividing `d`).
    pub heads: usize,
}

impl AttentionShape {
    fn head_width(&self) -> usize {
        self.d / self.heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_width() as f32).sqrt()
    }
}

/// Causal multi-head self-attention over `[b, t, d]` buffers:
/// `out_h = softmax(causal(Q_h K_hᵀ / √hd)) V_h` for each head `h`.
///
/// Each head reads its columns where the projections left them and writes its output
/// the same way: no head split or merge is ever copied. The batch's sequences are
/// split across the cores.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, out: &mut [f32]) {
    let AttentionShape { t, d, heads } = shape;
    let hd = shape.head_width();
    out.par_chunks_mut(t * d).enumerate().for_each(|(b, out)| {
        let base = b * t * d;
        let mut p = vec![0.0; t * t];
        for col in (0..heads).map(|h| h * hd) {
            probabilities(q, k, base + col, shape, &mut p);
            // out = P V, each block of queries over the keys up to its end.
            for rows @ (_, end) in blocks(t) {
                matmul(
                    head_rows_mut(out, col, rows, hd, d),
                    block_of_square(&p, rows, t),
                    head_rows(v, base + col, (0, end), hd, d),
                    1.0,
                    false,
                );
            }
        }
    });
}

/// The gradients of [`causal_attention`] for the output gradient `grad`, written to
/// `dq`, `dk` and `dv`. The probabilities are recomputed from `q` and `k`, one head at
/// a time, rather than kept from the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    grad: &[f32],
    shape: AttentionShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttentionShape { t, d, heads } = shape;
    let (hd, scale) = (shape.head_width(), shape.scale());
    let block = t * d;
    dq.par_chunks_mut(block)
        .zip(dk.par_chunks_mut(block))
        .zip(dv.par_chunks_mut(block))
        .enumerate()
        .for_each(|(b, ((dq, dk), dv))| {
            let base = b * block;
            let mut p = vec![0.0; t * t];
            let mut ds = vec![0.0; t * t];
            // A block of keys is seen by the queries from its first one on.
            let seen_by = |(start, _)| (start, t);
            for col in (0..heads).map(|h| h * hd) {
                let at = base + col;
                probabilities(q, k, at, shape, &mut p);
                for rows @ (start, end) in blocks(t) {
                    // dP = dO Vᵀ
                    matmul(
                        block_of_square_mut(&mut ds, rows, t),
                        head_rows(grad, at, rows, hd, d),
                        head_rows(v, at, (0, end), hd, d).t(),
                        1.0,
                        false,
                    );
                    // dS = P ∘ (dP - Σ_j dP·P), zero wherever P is.
                    math::vectorized(
                        #[inline(always)]
                        || {
                            for i in start..end {
                                let dsr = &mut ds[i * t..i * t + end];
                                let pr = &p[i * t..i * t + end];
                                let s = math::dot(dsr, pr);
                                for (x, &pi) in dsr.iter_mut().zip(pr) {
                                    *x = pi * (*x - s);
                                }
                            }
                        },
                    );
                    // dQ = scale · dS K
                    matmul(
                        head_rows_mut(dq, col, rows, hd, d),
                        block_of_square(&ds, rows, t),
                        head_rows(k, at, (0, end), hd, d),
                        scale,
                        false,
                    );
                }
                for keys in blocks(t) {
                    // dV = Pᵀ dO
                    matmul(
                        head_rows_mut(dv, col, keys, hd, d),
                        keys_of_square(&p, keys, t).t(),
                        head_rows(grad, at, seen_by(keys), hd, d),
                        1.0,
                        false,
                    );
                    // dK = scale · dSᵀ Q
                    matmul(
                        head_rows_mut(dk, col, keys, hd, d),
                        keys_of_square(&ds, keys, t).t(),
                        head_rows(q, at, seen_by(keys), hd, d),
                        scale,
                        false,
                    );
                }
            }
        });
}
