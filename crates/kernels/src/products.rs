//! Matrix products split across the cores by kiln, and the linear layer's kernels on
//! them.
//!
//! `cargo run --release -p kiln-kernels --example matmul_shapes` times the tiny GPT's
//! products four ways: Flex's `matmul` (the `gemm` crate, splitting as it likes), the
//! `gemm` crate on its own rayon split, the `gemm` crate on one thread per piece of a
//! split made here, and OpenBLAS. The split made here was the fastest or level on
//! every shape (`docs/performance.md`): products whose output has few rows (the
//! weight gradients, `d_in × d_out` summed over thousands of tokens) gain most.
//!
//! The split depends on the shape alone, never on the number of threads, so a product
//! is the same bit for bit on any machine.

use rayon::prelude::*;

use crate::gemm::{Mat, MatMut, matmul};

/// Pieces the longer side of a product's output is cut into: four keep two cores
/// evenly busy (and four) while each piece stays large enough for `gemm`'s packing
/// to pay.
const PIECES: usize = 4;

/// Products with fewer multiply-adds than this run on one thread.
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// Length of one piece of a side of `len`: a multiple of 16 (`gemm`'s register
/// tiles), at least 32.
fn piece_len(len: usize) -> usize {
    (len.div_ceil(PIECES).div_ceil(16) * 16).max(32)
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `dst` being the
/// row-major `lhs.rows × rhs.cols` matrix, split across the cores by rows, or by
/// columns when it has fewer rows than columns.
///
/// # Panics
/// If the shapes disagree or a view reaches outside its slice.
pub fn par_matmul(dst: &mut [f32], lhs: Mat<'_>, rhs: Mat<'_>, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(
        dst.len(),
        m * n,
        "a {m}x{n} product into {} elements",
        dst.len()
    );
    let whole = |dst: &mut [f32]| {
        let out = MatMut {
            data: dst,
            offset: 0,
            rows: m,
            cols: n,
            row_stride: n,
        };
        matmul(out, lhs, rhs, 1.0, accumulate);
    };
    if m.saturating_mul(n).saturating_mul(k) < MIN_PARALLEL_WORK || m.max(n) <= 32 {
        whole(dst);
    } else if m >= n {
        let piece = piece_len(m);
        dst.par_chunks_mut(piece * n)
            .enumerate()
            .for_each(|(i, dst)| {
                let rows = dst.len() / n;
                let lhs = Mat {
                    offset: lhs.offset + i * piece * lhs.row_stride,
                    rows,
                    ..lhs
                };
                let out = MatMut {
                    data: dst,
                    offset: 0,
                    rows,
                    cols: n,
                    row_stride: n,
                };
                matmul(out, lhs, rhs, 1.0, accumulate);
            });
    } else {
        // Columns of a row-major matrix are not contiguous: each piece is computed
        // into a buffer of its own, then copied into place.
        let piece = piece_len(n);
        let pieces: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(piece))
            .into_par_iter()
            .map(|i| {
                let (start, cols) = (i * piece, piece.min(n - i * piece));
                let mut buffer = vec![0.0; m * cols];
                if accumulate {
                    for (row, out) in buffer.chunks_exact_mut(cols).enumerate() {
                        out.copy_from_slice(&dst[row * n + start..row * n + start + cols]);
                    }
                }
                let rhs = Mat {
                    offset: rhs.offset + start * rhs.col_stride,
                    cols,
                    ..rhs
                };
                let out = MatMut {
                    data: &mut buffer,
                    offset: 0,
                    rows: m,
                    cols,
                    row_stride: cols,
                };
                matmul(out, lhs, rhs, 1.0, accumulate);
                (start, buffer)
            })
            .collect();
        for (start, buffer) in pieces {
            let cols = buffer.len() / m;
            for (row, values) in buffer.chunks_exact(cols).enumerate() {
                dst[row * n + start..row * n + start + cols].copy_from_slice(values);
            }
        }
    }
}

/// Shape of a linear layer's product: `rows` inputs of `d_in` features to `d_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Number of input rows (tokens).
    pub rows: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// `x · w + b` for `x: [rows, d_in]`, `w: [d_in, d_out]`, `b: [d_out]`, all
/// row-major: the output starts as copies of the bias (never zero-filled first) and
/// the product is added onto it.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], shape: LinearShape) -> Vec<f32> {
    let LinearShape { rows, d_in, d_out } = shape;
    assert_eq!(b.len(), d_out, "a bias of {} for {d_out} outputs", b.len());
    let mut out = Vec::with_capacity(rows * d_out);
    for _ in 0..rows {
        out.extend_from_slice(b);
    }
    par_matmul(
        &mut out,
        Mat::rows(x, 0, rows, d_in, d_in),
        Mat::rows(w, 0, d_in, d_out, d_out),
        true,
    );
    out
}

/// The gradients of [`linear`] for the output gradient `grad: [rows, d_out]`:
/// `dw = xᵀ · grad` and `db = Σ_rows grad` are returned, then `x` is overwritten with
/// `dx = grad · wᵀ` (its shape): the input's buffer, which the backward pass no longer
/// needs, holds its gradient, and no buffer is allocated and zero-filled for it.
pub fn linear_backward(
    x: &mut [f32],
    w: &[f32],
    grad: &[f32],
    shape: LinearShape,
) -> (Vec<f32>, Vec<f32>) {
    let LinearShape { rows, d_in, d_out } = shape;
    let grad_view = Mat::rows(grad, 0, rows, d_out, d_out);
    let mut dw = vec![0.0; d_in * d_out];
    par_matmul(
        &mut dw,
        Mat::rows(x, 0, rows, d_in, d_in).t(),
        grad_view,
        false,
    );
    par_matmul(x, grad_view, Mat::rows(w, 0, d_in, d_out, d_out).t(), false);
    (dw, column_sums(grad, d_out))
}

/// Rows per partial sum of [`column_sums`].
const SUM_ROWS: usize = 256;

/// The sum of each column of a row-major matrix `width` wide: partial sums over
/// fixed blocks of rows, added in the blocks' order.
pub fn column_sums(values: &[f32], width: usize) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    let partials: Vec<Vec<f32>> = values
        .par_chunks(SUM_ROWS * width)
        .map(|block| {
            crate::math::vectorized(
                #[inline(always)]
                || {
                    let mut sums = vec![0.0f32; width];
                    for row in block.chunks_exact(width) {
                        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                    }
                    sums
                },
            )
        })
        .collect();
    let mut sums = vec![0.0f32; width];
    for partial in partials {
        sums.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
    }
    sums
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 997) as f32 / 997.0
                    - 0.5
            })
            .collect()
    }

    /// `a · b` in f64, `a: m×k`, `b: k×n`, both row-major.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j]))
                    .sum();
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "element {i}: {g} against {w}"
            );
        }
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| a[(i % rows) * cols + i / rows])
            .collect()
    }

    /// Shapes on each path: one thread, split by rows, split by columns (with a last
    /// short piece), and the degenerate ones.
    #[rstest]
    #[case::small(3, 5, 4)]
    #[case::by_rows(300, 70, 90)]
    #[case::by_columns(40, 300, 333)]
    #[case::tall_and_thin(2048, 128, 65)]
    #[case::empty_inner(5, 0, 7)]
    fn linear_forward_and_backward_match_a_naive_product(
        #[case] rows: usize,
        #[case] d_in: usize,
        #[case] d_out: usize,
    ) {
        let shape = LinearShape { rows, d_in, d_out };
        let (x, w, b) = (
            values(rows * d_in, 1),
            values(d_in * d_out, 2),
            values(d_out, 3),
        );
        let out = linear(&x, &w, &b, shape);
        let mut want = naive(&x, &w, rows, d_in, d_out);
        for (i, v) in want.iter_mut().enumerate() {
            *v += f64::from(b[i % d_out]);
        }
        assert_close(&out, &want);

        let grad = values(rows * d_out, 4);
        let mut dx = x.clone();
        let (dw, db) = linear_backward(&mut dx, &w, &grad, shape);
        assert_close(
            &dx,
            &naive(&grad, &transpose(&w, d_in, d_out), rows, d_out, d_in),
        );
        assert_close(
            &dw,
            &naive(&transpose(&x, rows, d_in), &grad, d_in, rows, d_out),
        );
        let sums: Vec<f64> = (0..d_out)
            .map(|j| (0..rows).map(|i| f64::from(grad[i * d_out + j])).sum())
            .collect();
        assert_close(&db, &sums);
    }

    #[test]
    fn an_accumulating_product_split_by_columns_adds_onto_the_destination() {
        let (m, k, n) = (40, 300, 333);
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let mut dst = values(m * n, 7);
        let mut want = naive(&a, &b, m, k, n);
        for (w, d) in want.iter_mut().zip(&dst) {
            *w += f64::from(*d);
        }
        par_matmul(
            &mut dst,
            Mat::rows(&a, 0, m, k, k),
            Mat::rows(&b, 0, k, n, n),
            true,
        );
        assert_close(&dst, &want);
    }
}
