//! The tiny GPT's matrix products, timed four ways (issue 18, item 3):
//!
//! - `flex`: Burn's `matmul` on `Flex` (the `gemm` crate, its own rayon split);
//! - `gemm-rayon`: the `gemm` crate called directly with `Parallelism::Rayon(threads)`;
//! - `gemm-split`: kiln's [`par_matmul`]: the `gemm` crate on one thread per piece,
//!   kiln splitting the output's rows (or columns, when there are fewer rows) in four
//!   across rayon's pool;
//! - `openblas`: Debian's OpenBLAS through CBLAS (`--features openblas`, which needs
//!   `libopenblas-dev`), at the same thread count.
//!
//! Each linear layer `Y = X·W` (X: m×k, W: k×n) has three products: the forward
//! one, `dX = dY·Wᵀ` and `dW = Xᵀ·dY`, each read through transposed views as autodiff
//! does. The attention products are one per sequence and head.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p kiln-kernels --example matmul_shapes
//! RAYON_NUM_THREADS=2 cargo run --release -p kiln-kernels --example matmul_shapes --features openblas
//! ```
#![allow(unsafe_code, clippy::print_stdout, missing_docs)]

use std::time::Instant;

use burn::backend::Flex;
use burn::prelude::*;
use kiln_kernels::gemm::Mat;
use kiln_kernels::products::par_matmul;

/// The allocator `kiln` itself runs with, so that Flex's fresh output buffers cost
/// what they cost in training.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One product `m×k · k×n`, its operands' layouts as `(transposed lhs, transposed rhs)`.
#[derive(Clone, Copy)]
struct Product {
    what: &'static str,
    m: usize,
    k: usize,
    n: usize,
    lhs_t: bool,
    rhs_t: bool,
}

fn linear(name: &'static str, tokens: usize, d_in: usize, d_out: usize) -> [Product; 3] {
    [
        Product {
            what: name,
            m: tokens,
            k: d_in,
            n: d_out,
            lhs_t: false,
            rhs_t: false,
        },
        Product {
            what: "  dX",
            m: tokens,
            k: d_out,
            n: d_in,
            lhs_t: false,
            rhs_t: true,
        },
        Product {
            what: "  dW",
            m: d_in,
            k: tokens,
            n: d_out,
            lhs_t: true,
            rhs_t: false,
        },
    ]
}

fn shapes(
    config: &str,
    tokens: usize,
    d: usize,
    seq: usize,
    heads: usize,
    vocab: usize,
) -> Vec<(String, Product)> {
    let hd = d / heads;
    let mut out = Vec::new();
    for (name, d_in, d_out) in [
        ("qkv", d, 3 * d),
        ("proj", d, d),
        ("fc1", d, 4 * d),
        ("fc2", 4 * d, d),
        ("head", d, vocab),
    ] {
        for p in linear(name, tokens, d_in, d_out) {
            out.push((format!("{config} {}", p.what), p));
        }
    }
    // Attention: scores = Q·Kᵀ (seq×hd·hd×seq), out = P·V (seq×seq·seq×hd).
    out.push((
        format!("{config} q·kᵀ"),
        Product {
            what: "attn",
            m: seq,
            k: hd,
            n: seq,
            lhs_t: false,
            rhs_t: true,
        },
    ));
    out.push((
        format!("{config} p·v"),
        Product {
            what: "attn",
            m: seq,
            k: seq,
            n: hd,
            lhs_t: false,
            rhs_t: false,
        },
    ));
    out
}

/// Row-major storage of the operands, with strides for the transposed reads.
struct Operands {
    lhs: Vec<f32>,
    rhs: Vec<f32>,
    out: Vec<f32>,
}

fn operands(p: Product) -> Operands {
    let fill = |len: usize, seed: u32| {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0
                    - 0.5
            })
            .collect::<Vec<_>>()
    };
    Operands {
        lhs: fill(p.m * p.k, 1),
        rhs: fill(p.k * p.n, 2),
        out: vec![0.0; p.m * p.n],
    }
}

/// `(row stride, column stride)` of an `r×c` operand stored row-major, or stored
/// as its `c×r` transpose.
fn strides(rows: usize, cols: usize, transposed: bool) -> (isize, isize) {
    if transposed {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

/// `out[rows, cols] = lhs · rhs` for the output block starting at `(row0, col0)`.
fn gemm_block(
    p: Product,
    o: &Operands,
    out: *mut f32,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    par: gemm::Parallelism,
) {
    let (lrs, lcs) = strides(p.m, p.k, p.lhs_t);
    let (rrs, rcs) = strides(p.k, p.n, p.rhs_t);
    // SAFETY: every index below stays inside the operands (rows < m, cols < n),
    // and the blocks of `out` that concurrent calls write are disjoint.
    unsafe {
        gemm::gemm(
            rows.len(),
            cols.len(),
            p.k,
            out.add(rows.start * p.n + cols.start),
            1,
            p.n as isize,
            false,
            o.lhs.as_ptr().offset(rows.start as isize * lrs),
            lcs,
            lrs,
            o.rhs.as_ptr().offset(cols.start as isize * rcs),
            rcs,
            rrs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// kiln's split: [`kiln_kernels::products::par_matmul`].
fn gemm_split(p: Product, o: &mut Operands) {
    let lhs = if p.lhs_t {
        Mat::rows(&o.lhs, 0, p.k, p.m, p.m).t()
    } else {
        Mat::rows(&o.lhs, 0, p.m, p.k, p.k)
    };
    let rhs = if p.rhs_t {
        Mat::rows(&o.rhs, 0, p.n, p.k, p.k).t()
    } else {
        Mat::rows(&o.rhs, 0, p.k, p.n, p.n)
    };
    par_matmul(&mut o.out, lhs, rhs, false);
}

#[cfg(feature = "openblas")]
mod openblas {
    #[link(name = "openblas")]
    unsafe extern "C" {
        pub fn cblas_sgemm(
            layout: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        pub fn openblas_set_num_threads(n: i32);
    }

    pub fn sgemm(p: super::Product, o: &mut super::Operands) {
        const ROW_MAJOR: i32 = 101;
        const NO: i32 = 111;
        const TRANS: i32 = 112;
        let lda = if p.lhs_t { p.m } else { p.k } as i32;
        let ldb = if p.rhs_t { p.k } else { p.n } as i32;
        // SAFETY: the operands have exactly the sizes these leading dimensions describe.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                if p.lhs_t { TRANS } else { NO },
                if p.rhs_t { TRANS } else { NO },
                p.m as i32,
                p.n as i32,
                p.k as i32,
                1.0,
                o.lhs.as_ptr(),
                lda,
                o.rhs.as_ptr(),
                ldb,
                0.0,
                o.out.as_mut_ptr(),
                p.n as i32,
            );
        }
    }
}

/// Median seconds of `f` over enough calls to last about 0.3 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.3 / once) as usize).clamp(5, 2000);
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[reps / 2]
}

fn main() {
    let threads = rayon::current_num_threads();
    #[cfg(feature = "openblas")]
    // SAFETY: a plain setter of OpenBLAS's thread count.
    unsafe {
        openblas::openblas_set_num_threads(threads as i32);
    }
    println!(
        "{threads} threads; GFLOP/s (higher is better), batched attention products are per sequence and head"
    );
    println!(
        "{:<16} {:>16} {:>8} {:>11} {:>11} {:>9}",
        "product", "m×k×n", "flex", "gemm-rayon", "gemm-split", "openblas"
    );
    let device = Default::default();
    let mut all = shapes("tiny", 32 * 64, 128, 64, 4, 65);
    all.extend(shapes("small", 32 * 128, 256, 128, 4, 65));
    for (name, p) in all {
        let flops = 2.0 * (p.m * p.k * p.n) as f64 / 1e9;
        let mut o = operands(p);
        let lhs_shape = if p.lhs_t { [p.k, p.m] } else { [p.m, p.k] };
        let rhs_shape = if p.rhs_t { [p.n, p.k] } else { [p.k, p.n] };
        let lhs = Tensor::<Flex, 2>::from_data(TensorData::new(o.lhs.clone(), lhs_shape), &device);
        let rhs = Tensor::<Flex, 2>::from_data(TensorData::new(o.rhs.clone(), rhs_shape), &device);
        let flex = time(|| {
            let l = if p.lhs_t {
                lhs.clone().transpose()
            } else {
                lhs.clone()
            };
            let r = if p.rhs_t {
                rhs.clone().transpose()
            } else {
                rhs.clone()
            };
            std::hint::black_box(l.matmul(r));
        });
        let rayon_par = time(|| {
            let out = o.out.as_mut_ptr();
            gemm_block(
                p,
                &o,
                out,
                0..p.m,
                0..p.n,
                gemm::Parallelism::Rayon(threads),
            );
        });
        let split = time(|| gemm_split(p, &mut o));
        #[cfg(feature = "openblas")]
        let blas = format!("{:>9.1}", flops / time(|| openblas::sgemm(p, &mut o)));
        #[cfg(not(feature = "openblas"))]
        let blas = format!("{:>9}", "-");
        println!(
            "{name:<16} {:>16} {:>8.1} {:>11.1} {:>11.1} {blas}",
            format!("{}×{}×{}", p.m, p.k, p.n),
            flops / flex,
            flops / rayon_par,
            flops / split,
        );
    }
}
