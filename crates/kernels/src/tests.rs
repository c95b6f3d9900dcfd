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
    let want = values(activation::gelu(half.clone()));
    assert_eq!(got, want);
    let targets = Tensor::<Flex, 1, Int>::from_ints([0, 7, 3, 1], &device);
    let got = values(crate::cross_entropy(half.clone(), targets.clone()));
    let want = values(burns_cross_entropy(half, targets));
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
            let targets: Vec<usize> = (0..rows).map(|i| i * 7 % d).collect();
            let loss = vec![crate::cpu::cross_entropy(&x, &targets, d)];
            let mut dlogits = x.clone();
            crate::cpu::cross_entropy_backward(&mut dlogits, &targets, d, 0.3);
            // A second moment is never negative.
            let (mut p, mut m, mut v) = (
                x.clone(),
                g.clone(),
                x.iter().map(|a| a * a).collect::<Vec<_>>(),
            );
            let step = crate::AdamWStep {
                lr: 1e-3,
                time: 3,
                beta_1: 0.9,
                beta_2: 0.95,
                epsilon: 1e-8,
                weight_decay: 0.1,
            };
            crate::cpu::adamw(&mut p, &g, &mut m, &mut v, step.coefficients(), false);
            [
                dx, dgamma, dbeta, ds, gelu, y, lx, lw, lb, tall, wide, loss, dlogits, p, m, v,
            ]
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
#[case::blocks_of_queries([2, 77, 24], 3)]
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

/// The derivative the GELU's forward pass keeps gives the backward pass that
/// recomputes it, bit for bit; the output is [`crate::cpu::gelu`]'s.
#[cfg(feature = "flex")]
#[test]
fn the_kept_gelu_slope_gives_the_recomputed_gradient_bit_for_bit() {
    let x: Vec<f32> = normal(40_000, 3).iter().map(|v| v * 3.0).collect();
    let g = normal(40_000, 4);
    let (mut out, mut slope) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    crate::cpu::gelu_and_slope(&x, &mut out, &mut slope);
    let mut want_out = vec![0.0; x.len()];
    crate::cpu::gelu(&x, &mut want_out);
    assert_eq!(out, want_out);
    let mut kept = g.clone();
    crate::cpu::multiply(&mut kept, &slope);
    let mut recomputed = g;
    crate::cpu::gelu_backward(&x, &mut recomputed);
    assert_eq!(kept, recomputed);
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

/// Burn's cross-entropy, as `CrossEntropyLoss` composes it: `-mean(gather(log_softmax))`.
fn burns_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let picked = activation::log_softmax(logits, 1).gather(1, targets.reshape([n, 1]));
    picked.mean().neg()
}

/// [`FusedOps::fused_cross_entropy`] of `B` itself (no dispatch).
fn trait_cross_entropy<B: FusedOps>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(
        B::fused_cross_entropy(logits.into_primitive().tensor(), targets.into_primitive()),
    ))
}

type CrossEntropy<B> = fn(Tensor<B, 2>, Tensor<B, 1, Int>) -> Tensor<B, 1>;

/// The loss and the logits' gradient (under an upstream gradient of 2.5) of `loss`
/// on `[n, c]` logits with confident rows (some probabilities near 1).
fn cross_entropy_run<B: AutodiffBackend>(
    loss: CrossEntropy<B>,
    [n, c]: [usize; 2],
) -> [Vec<f32>; 2] {
    let device = Default::default();
    let values_in: Vec<f32> = normal(n * c, 11).iter().map(|v| v * 4.0).collect();
    let logits =
        Tensor::<B, 2>::from_data(TensorData::new(values_in, [n, c]), &device).require_grad();
    let ids: Vec<i64> = (0..n).map(|i| ((i * 7 + 3) % c) as i64).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &device);
    let l = loss(logits.clone(), targets);
    let grads = (l.clone() * 2.5).backward();
    [values(l), values(logits.grad(&grads).unwrap())]
}

fn compare_cross_entropy<B: AutodiffBackend + FusedOps>(
    fused: CrossEntropy<B>,
    shape: [usize; 2],
    tolerance: f32,
) {
    let got = cross_entropy_run(fused, shape);
    let want = cross_entropy_run::<B>(burns_cross_entropy, shape);
    for ((name, got), want) in ["loss", "grad logits"].iter().zip(&got).zip(&want) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * (1.0 + w.abs()),
                "{shape:?} {name}[{i}]: fused {g}, Burn {w}"
            );
        }
    }
}

/// The fused cross-entropy against Burn's, loss and gradient: through the generic
/// [`crate::cross_entropy`] (which finds Flex's kernels) and through each backend's
/// trait method (NdArray: one node over Burn's ops).
#[rstest]
fn fused_cross_entropy_equals_burns(
    #[values(
        (crate::cross_entropy::<Autodiff<Flex>> as CrossEntropy<Autodiff<Flex>>, TOLERANCE),
        (trait_cross_entropy::<Autodiff<Flex>> as CrossEntropy<Autodiff<Flex>>, TOLERANCE),
    )]
    flex: (CrossEntropy<Autodiff<Flex>>, f32),
    #[values([1, 7], [3, 5], [64, 65], [300, 130])] shape: [usize; 2],
) {
    compare_cross_entropy(flex.0, shape, flex.1);
    compare_cross_entropy::<Autodiff<NdArray>>(trait_cross_entropy, shape, NDARRAY_TOLERANCE);
    compare_cross_entropy::<Autodiff<NdArray>>(crate::cross_entropy, shape, NDARRAY_TOLERANCE);
}

/// Flex without autodiff (validation) takes the fused forward too.
#[test]
fn the_cross_entropy_of_inner_flex_is_the_fused_one() {
    let device = Default::default();
    let logits = Tensor::<Flex, 2>::from_data(TensorData::new(normal(40 * 9, 5), [40, 9]), &device);
    let targets = Tensor::<Flex, 1, Int>::from_data(
        TensorData::new((0..40i64).map(|i| i % 9).collect::<Vec<_>>(), [40]),
        &device,
    );
    let fused = values(crate::cross_entropy(logits.clone(), targets.clone()))[0];
    let burn = values(burns_cross_entropy(logits, targets))[0];
    assert!(
        (fused - burn).abs() <= TOLERANCE * burn.abs(),
        "{fused} vs {burn}"
    );
}

#[test]
#[should_panic(expected = "class id 9 is out of range: the logits have 9 classes")]
fn an_out_of_range_class_id_is_named() {
    let device = Default::default();
    let logits = Tensor::<Flex, 2>::zeros([2, 9], &device);
    let targets = Tensor::<Flex, 1, Int>::from_ints([0, 9], &device);
    let _ = crate::cross_entropy(logits, targets);
}

/// One AdamW step of a `[rows, cols]` tensor, by one optimizer or the other.
type AdamWStepFn<'a, B> = dyn Fn(
        f64,
        Tensor<B, 2>,
        Tensor<B, 2>,
        Option<burn::optim::AdamWState<B, 2>>,
    ) -> (Tensor<B, 2>, Option<burn::optim::AdamWState<B, 2>>)
    + 'a;

/// Parameters after each of `steps` AdamW steps from fixed values, then both moments
/// and the step count, as bits.
fn adamw_steps<B: Backend>(
    step: &AdamWStepFn<'_, B>,
    shape: [usize; 2],
    steps: usize,
) -> Vec<Vec<u32>> {
    let device = Default::default();
    let n = shape[0] * shape[1];
    let tensor = |seed| Tensor::<B, 2>::from_data(TensorData::new(normal(n, seed), shape), &device);
    let mut param = tensor(1);
    let mut state = None;
    let mut out = Vec::new();
    for i in 0..steps {
        let grad = tensor(100 + i as u64) * 0.1;
        let (p, s) = step(1e-3 * (i + 1) as f64, param, grad, state);
        param = p;
        state = s;
        out.push(values(param.clone()));
    }
    let momentum = state.expect("a state after a step").momentum;
    out.push(values(momentum.moment_1));
    out.push(values(momentum.moment_2));
    out.push(vec![momentum.time as f32]);
    out.into_iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn both_adamws<B: Backend>(weight_decay: f32, shape: [usize; 2]) {
    use burn::optim::SimpleOptimizer;
    let burn = burn::optim::AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
        .build();
    let kiln = crate::AdamW::new(0.9, 0.95, 1e-8, weight_decay);
    let kilns = adamw_steps::<B>(&|lr, p, g, s| kiln.step(lr, p, g, s), shape, 4);
    let burns = adamw_steps::<B>(&|lr, p, g, s| burn.step(lr, p, g, s), shape, 4);
    assert!(
        kilns == burns,
        "{shape:?}, weight decay {weight_decay}: kiln's AdamW differs from burn-optim's"
    );
}

/// kiln's AdamW takes burn-optim's steps bit for bit: parameters after each step,
/// both moments and the step count, with and without weight decay, for a tensor of
/// one chunk and one of several, on Flex (fused, in place) and NdArray (Burn's ops).
#[rstest]
fn kilns_adamw_takes_burns_steps_bit_for_bit(
    #[values(0.0, 0.1)] weight_decay: f32,
    #[values([1, 5], [33, 17], [300, 130])] shape: [usize; 2],
) {
    both_adamws::<Flex>(weight_decay, shape);
    both_adamws::<NdArray>(weight_decay, shape);
}
