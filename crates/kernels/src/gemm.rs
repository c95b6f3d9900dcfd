//! Matrix products on strided views of slices, through the `gemm` crate (the one
//! Flex uses): the kernels' only `unsafe` code (the other is the CUDA driver probe).
//!
//! `gemm::gemm` takes raw pointers and strides, so that a product can read a head's
//! columns straight out of a `[tokens, d]` buffer, or a matrix transposed, without
//! copying it. [`matmul`] checks, before the call, that every element each view can
//! reach lies inside its slice and that the shapes agree; what remains is `gemm`'s own
//! contract, which holds for in-bounds, non-overlapping views (the destination is a
//! `&mut` borrow, so it cannot overlap the inputs).
#![allow(unsafe_code)]

/// A read-only matrix inside a slice: element `(i, j)` is
/// `data[offset + i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    /// The storage.
    pub data: &'a [f32],
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// The `rows × cols` row-major matrix at `offset` whose rows are `row_stride` apart.
    pub fn rows(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// A writable matrix inside a slice, laid out like [`Mat`].
#[derive(Debug)]
pub struct MatMut<'a> {
    /// The storage.
    pub data: &'a mut [f32],
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
}

/// Whether every element of a `rows × cols` view lies inside `len` elements.
fn fits(len: usize, offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
        .and_then(|rc| rc.checked_add(offset));
    matches!(last, Some(last) if last < len)
}

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` when `accumulate`.
///
/// # Panics
/// If the shapes do not agree or a view reaches outside its slice.
pub fn matmul(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>, scale: f32, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && dst.rows == m && dst.cols == n,
        "matmul of {m}x{k} by {}x{n} into {}x{}",
        rhs.rows,
        dst.rows,
        dst.cols
    );
    assert!(fits(
        lhs.data.len(),
        lhs.offset,
        m,
        k,
        lhs.row_stride,
        lhs.col_stride
    ));
    assert!(fits(
        rhs.data.len(),
        rhs.offset,
        k,
        n,
        rhs.row_stride,
        rhs.col_stride
    ));
    assert!(fits(dst.data.len(), dst.offset, m, n, dst.row_stride, 1));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                let start = dst.offset + i * dst.row_stride;
                dst.data[start..start + n].fill(0.0);
            }
        }
        return;
    }
    let stride = |s: usize| s as isize;
    // SAFETY: the three views were checked above to lie inside their slices, and
    // `dst` is borrowed mutably, so it overlaps neither input. Strides fit `isize`
    // because every reachable index is below a slice's length.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr().add(dst.offset),
            1,
            stride(dst.row_stride),
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr().add(rhs.offset),
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_of_strided_and_transposed_views_match_a_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let want = naive(&a, &b, m, k, n);
        // a as a column block of a wider buffer, b stored transposed.
        let mut wide = vec![9.0; m * (k + 2)];
        for i in 0..m {
            wide[i * (k + 2) + 1..i * (k + 2) + 1 + k].copy_from_slice(&a[i * k..(i + 1) * k]);
        }
        let mut bt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        let mut c = vec![1.0; m * n];
        let dst = MatMut {
            data: &mut c,
            offset: 0,
            rows: m,
            cols: n,
            row_stride: n,
        };
        matmul(
            dst,
            Mat::rows(&wide, 1, m, k, k + 2),
            Mat::rows(&bt, 0, n, k, k).t(),
            2.0,
            true,
        );
        for (got, want) in c.iter().zip(&want) {
            assert!((got - (1.0 + 2.0 * want)).abs() < 1e-4, "{got} vs {want}");
        }
    }

    #[test]
    #[should_panic(expected = "assertion failed")]
    fn a_view_outside_its_slice_is_refused() {
        let a = vec![0.0; 6];
        let mut c = vec![0.0; 4];
        let dst = MatMut {
            data: &mut c,
            offset: 0,
            rows: 2,
            cols: 2,
            row_stride: 2,
        };
        matmul(
            dst,
            Mat::rows(&a, 1, 2, 3, 3),
            Mat::rows(&a, 0, 3, 2, 2),
            1.0,
            false,
        );
    }
}
