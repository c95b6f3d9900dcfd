//! The fused operations against Burn's own ops: outputs and every gradient, on each
//! backend kiln implements, for shapes below and above one parallel chunk.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorData, activation};
use rstest::rstest;

use crate::FusedOps;

#[derive(Debug, Clone, Copy)]
enum Op {
    Gelu,
    Softmax,
    LayerNorm,
    Linear,
}

const EPS: f64 = 1e-5;

/// How far a fused op's output or gradient may be from Burn's: 1e-5 relative
/// (absolute near zero). The two add the terms of a mean or a sum in their own
/// orders, which is all that separates them.
const TOLERANCE: f32 = 1e-5;

/// The same on NdArray, where both sides are Burn's own ops (NdArray has no kiln
/// kernels: the trait's defaults) and NdArray's SIMD functions, unified into a
/// workspace build, round differently in each composition (2.5e-5 relative seen).
const NDARRAY_TOLERANCE: f32 = 1e-4;

/// NdArray's attention, the same two compositions of Burn's ops: the softmax's
/// approximate SIMD exponential and reciprocal meet the causal mask and three
/// products, and a key's gradient drifted 1.2e-4 relative in a workspace build
/// (`[3, 17, 30]`, 5 heads). kiln's own kernels are held to [`TOLERANCE`] on Flex.
const NDARRAY_ATTENTION_TOLERANCE: f32 = 5e-4;

/// Outputs and gradients (of x, and of γ and β for the layer norm, of the weight
/// `gamma · gammaᵀ` and the bias β for the linear layer) of `op` on `x`, fused or
/// through Burn's ops, under the upstream gradient `w`.
fn run<B: AutodiffBackend + FusedOps>(
    op: Op,
    fused: bool,
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
) -> Vec<Vec<f32>> {
    let x = x.require_grad();
    let d = gamma.dims()[0];
    let weight = (gamma
        .clone()
        .reshape([d, 1])
        .matmul(gamma.clone().reshape([1, d]))
        / d as f64)
        .require_grad();
    let gamma = gamma.require_grad();
    let beta = beta.require_grad();
    let y = match (op, fused) {
        (Op::Gelu, true) => crate::gelu(x.clone()),
        (Op::Gelu, false) => activation::gelu(x.clone()),
        (Op::Softmax, true) => crate::softmax(x.clone(), 1),
        (Op::Softmax, false) => {
            // Burn's decomposition (Autodiff's own softmax is it).
            let e = (x.clone() - x.clone().detach().max_dim(1)).exp();
            e.clone() / e.sum_dim(1)
        }
        (Op::LayerNorm, true) => crate::layer_norm(x.clone(), gamma.clone(), beta.clone(), EPS),
        (Op::LayerNorm, false) => {
            let centered = x.clone() - x.clone().mean_dim(1);
            let var = (centered.clone() * centered.clone()).mean_dim(1);
            centered / (var + EPS).sqrt() * gamma.clone().unsqueeze::<2>()
                + beta.clone().unsqueeze::<2>()
        }
        (Op::Linear, true) => crate::linear(x.clone(), weight.clone(), beta.clone()),
        (Op::Linear, false) => {
            burn::tensor::module::linear(x.clone(), weight.clone(), Some(beta.clone()))
        }
    };
    let grads = (y.clone() * w).sum().backward();
    let mut out = vec![values(y), values(x.grad(&grads).unwrap())];
    match op {
        Op::LayerNorm => {
            out.push(values(gamma.grad(&grads).unwrap()));
            out.push(values(beta.grad(&grads).unwrap()));
        }
        Op::Linear => {
            out.push(values(weight.grad(&grads).unwrap()));
            out.push(values(beta.grad(&grads).unwrap()));
        }
        Op::Gelu | Op::Softmax => {}
    }
    out
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn compare<B: AutodiffBackend + FusedOps>(op: Op, [rows, d]: [usize; 2], tolerance: f32) {
    let device = Default::default();
    B::seed(&device, 7);
    let x = Tensor::<B, 2>::random([rows, d], Distribution::Normal(0.0, 2.0), &device);
    let w = Tensor::<B, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
    let gamma = Tensor::<B, 1>::random([d], Distribution::Normal(1.0, 0.5), &device);
    let beta = Tensor::<B, 1>::random([d], Distribution::Normal(0.0, 0.5), &device);
    let fused = run(op, true, x.clone(), w.clone(), gamma.clone(), beta.clone());
    let burn = run(op, false, x, w, gamma, beta);
    let names = [
        "output",
        "grad x",
        "grad gamma (weight)",
        "grad beta (bias)",
    ];
    for ((name, got), want) in names.iter().zip(&fused).zip(&burn) {
        assert_eq!(got.len(), want.len());
        // Relative, with the same bound as an absolute floor near zero (where a
        // relative error means nothing): `torch.allclose(rtol=1e-5, atol=1e-5)`.
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * (1.0 + w.abs()),
                "{op:?} {rows}x{d} {name}[{i}]: fused {g}, Burn {w}"
            );
        }
    }
}

#[rstest]
fn fused_ops_equal_burns_ops(
    #[values(Op::Gelu, Op::Softmax, Op::LayerNorm, Op::Linear)] op: Op,
    #[values(
        (compare::<Autodiff<Flex>> as Compare, TOLERANCE),
        (compare::<Autodiff<NdArray>> as Compare, NDARRAY_TOLERANCE)
    )]
    backend: (Compare, f32),
    #[values([1, 7], [3, 5], [64, 128], [300, 130])] shape: [usize; 2],
) {
    let (compare, tolerance) = backend;
    compare(op, shape, tolerance);
}

#[test]
fn a_transposed_input_gives_what_its_contiguous_copy_gives() {
    type B = Autodiff<Flex>;
    let device = Default::default();
    let x = Tensor::<B, 2>::random([40, 24], Distribution::Normal(0.0, 1.0), &device);
    let contiguous = Tensor::<B, 2>::from_data(x.clone().transpose().into_data(), &device);
    for f in [
        |t: Tensor<B, 2>| crate::gelu(t),
        |t: Tensor<B, 2>| crate::softmax(t, 1),
    ] {
        assert_eq!(
            values(f(x.clone().transpose())),
            values(f(contiguous.clone()))
        );
    }
}

#[test]
fn a_bf16_tensor_takes_burns_ops_on_flex() {
    let device = Default::default();
    let x = Tensor::<Flex, 2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
    let half = x.clone().cast(burn::tensor::FloatDType::BF16);
    let got = values(crate::gelu(half.clone()));
    let want = values(activation::gelu(half));
    assert_eq!(got, want);
}

/// The CPU kernels split work by size, never by thread count: one thread and three
/// give the same bits.
#[cfg(feature = "flex")]
#[test]
fn cpu_kernels_give_the_same_bits_on_any_number_of_threads() {
    use crate::gemm::Mat;
    use crate::products::par_matmul;

    let rows = 700;
    let d = 96;
    let x: Vec<f32> = (0..rows * d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let g: Vec<f32> = (0..rows * d)
        .map(|i| ((i * 13 % 89) as f32 - 44.0) / 23.0)
        .collect();
    let gamma: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / 100.0).collect();
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut dx = g.clone();
            let (dgamma, dbeta) = crate::cpu::layer_norm_backward(&x, &gamma, &mut dx, 1e-5);
            let mut ds = g.clone();
            crate::cpu::softmax_backward(&x, &mut ds, d);
            let mut gelu = g.clone();
            crate::cpu::gelu_backward(&x, &mut gelu);
            let shape = crate::products::LinearShape {
                rows,
                d_in: d,
                d_out: d,
            };
            let y = crate::products::linear(&x, &g[..d * d], &gamma, shape);
            let mut lx = x.clone();
            let (lw, lb) = crate::products::linear_backward(&mut lx, &g[..d * d], &g, shape);
            // A product split by rows and one split by columns.
            let (x_t, g_t) = (
                Mat::rows(&x, 0, rows, d, d).t(),
                Mat::rows(&g, 0, rows, 5, 5).t(),
            );
            let mut tall = vec![0.0; d * 5];
            par_matmul(&mut tall, x_t, Mat::rows(&g, 0, rows, 5, 5), false);
            let mut wide = vec![0.0; 5 * d];
            par_matmul(&mut wide, g_t, Mat::rows(&x, 0, rows, d, d), false);
            [dx, dgamma, dbeta, ds, gelu, y, lx, lw, lb, tall, wide]
        })
    };
    assert_eq!(on(1), on(3));
}

/// `n` draws from N(0, 1), the same for one `seed` whatever else runs (SplitMix64
/// and Box-Muller).
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Output and the gradients of q, k and v of a causal self-attention, fused or in
/// Burn's ops (the tiny GPT's attention as it was written before the fused op).
fn attention<B: AutodiffBackend + FusedOps>(
    [b, t, d]: [usize; 3],
    heads: usize,
    fused: bool,
) -> Vec<Vec<f32>> {
    let device = Default::default();
    // Both runs (fused and Burn's) must get the same inputs: drawn here, not from
    // Burn's RNG, which is one per process and which the other tests reseed and
    // draw from on parallel threads.
    let input = |seed| {
        Tensor::<B, 3>::from_data(TensorData::new(normal(b * t * d, seed), [b, t, d]), &device)
    };
    let (q, k, v, w) = (
        input(1).require_grad(),
        input(2).require_grad(),
        input(3).require_grad(),
        input(4),
    );
    let y = if fused {
        crate::causal_attention(q.clone(), k.clone(), v.clone(), heads)
    } else {
        let hd = d / heads;
        let split = |x: Tensor<B, 3>| x.reshape([b, t, heads, hd]).swap_dims(1, 2);
        let mut mask = vec![0.0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, t, t]), &device);
        let scores = split(q.clone())
            .matmul(split(k.clone()).swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt())
            + mask;
        activation::softmax(scores, 3)
            .matmul(split(v.clone()))
            .swap_dims(1, 2)
            .reshape([b, t, d])
    };
    let grads = (y.clone() * w).sum().backward();
    vec![
        values(y),
        values(q.grad(&grads).unwrap()),
        values(k.grad(&grads).unwrap()),
        values(v.grad(&grads).unwrap()),
    ]
}

/// [`compare`] on one backend.
type Compare = fn(Op, [usize; 2], f32);

/// Outputs and gradients of an attention of that shape and head count, fused or not.
type Attention = fn([usize; 3], usize, bool) -> Vec<Vec<f32>>;

#[rstest]
#[case::one_head([1, 3, 4], 1)]
#[case::tiny_gpt([4, 64, 128], 4)]
#[case::odd_sizes([3, 17, 30], 5)]
fn fused_attention_equals_burns_ops(
    #[values(
        (attention::<Autodiff<Flex>> as Attention, TOLERANCE),
        (attention::<Autodiff<NdArray>> as Attention, NDARRAY_ATTENTION_TOLERANCE)
    )]
    backend: (Attention, f32),
    #[case] shape: [usize; 3],
    #[case] heads: usize,
) {
    let (run, tolerance) = backend;
    let (fused, burn) = (run(shape, heads, true), run(shape, heads, false));
    for ((name, got), want) in ["output", "grad q", "grad k", "grad v"]
        .iter()
        .zip(&fused)
        .zip(&burn)
    {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * (1.0 + w.abs()),
                "{shape:?} {heads} heads {name}[{i}]: fused {g}, Burn {w}"
            );
        }
    }
}

/// [`crate::math::vectorized`] changes the instruction set, never the bits: the GELU
/// kernel (dispatched) against the same formula in a plain loop (baseline build).
#[cfg(feature = "flex")]
#[test]
fn vectorised_kernels_give_the_bits_of_the_baseline_build() {
    let x: Vec<f32> = (0..40_000)
        .map(|i| ((i * 7919 % 20_011) as f32 - 10_005.0) / 1_500.0)
        .collect();
    let mut got = vec![0.0; x.len()];
    crate::cpu::gelu(&x, &mut got);
    let want: Vec<f32> = x
        .iter()
        .map(|&v| {
            let e = crate::math::exp(-0.5 * v * v);
            0.5 * v * (1.0 + crate::math::erf_with_exp(v * std::f32::consts::FRAC_1_SQRT_2, e))
        })
        .collect();
    assert_eq!(got, want);
}
