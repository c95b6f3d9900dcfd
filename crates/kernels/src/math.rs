//! Scalar `exp` and `erf` written so that the compiler vectorises the loops that call
//! them: no branches, no calls into libm, only adds, multiplies, one division and bit
//! operations.
//!
//! Burn's Flex backend computes the exact GELU with libm's `erff` and `expf`, one
//! element at a time; these two are what lets [`crate::cpu`] run it over whole SIMD
//! registers instead.

/// Runs `f` compiled for the widest SIMD instruction set this CPU has (AVX2 with FMA,
/// AVX-512, NEON), chosen at run time through `pulp` (as `gemm` does): a release
/// build otherwise targets the x86-64 baseline, SSE2, four lanes.
///
/// Results do not depend on the instruction set: Rust never fuses a multiply and an
/// add on its own, and every sum here has a fixed order.
#[cfg(feature = "flex")]
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `e^x` to within 2 ulp for `x` in [-87, 88]; 0 below, +inf-free (clamped) above.
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6 minimax
/// polynomial for `e^r`, and `2^n` built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n, n in [-126, 127].
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    e_r * scale
}

/// `erf(x)` to within 3e-7, given `e = e^{-x²}` computed by the caller.
///
/// For `|x| >= 0.5`, Abramowitz and Stegun 7.1.26 (1.5e-7, plus f32 rounding: the
/// formula PyTorch's vectorised CPU `erf` uses); below, where that formula loses
/// digits to cancellation, the Maclaurin series to `x¹¹` (relative error under 2e-7).
/// Both are computed and one is selected, which the compiler turns into a blend.
///
/// The GELU needs `e^{-x²/2}` for its derivative too, so taking it as an argument
/// lets one `exp` serve both.
#[inline(always)]
pub fn erf_with_exp(x: f32, e: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    // 2/√π · (1, -1/3, 1/10, -1/42, 1/216, -1/1320)
    const S0: f32 = std::f32::consts::FRAC_2_SQRT_PI;
    const S1: f32 = -0.376_126_4;
    const S2: f32 = 0.112_837_92;
    const S3: f32 = -0.026_866_17;
    const S4: f32 = 0.005_223_977;
    const S5: f32 = -8.548_327e-4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let far = (1.0 - poly * e).copysign(x);
    let x2 = x * x;
    let near = x * (((((S5 * x2 + S4) * x2 + S3) * x2 + S2) * x2 + S1) * x2 + S0);
    if a < 0.5 { near } else { far }
}

/// `erf(x)` to within 3e-7.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with_exp(x, exp(-x * x))
}

/// Sum of `values`, in eight independent lanes (which the compiler keeps in one SIMD
/// register) added together at the end. The order is fixed by the length alone, so
/// the result never depends on the machine's thread count.
#[inline]
pub fn sum(values: &[f32]) -> f32 {
    sum_of(values.len(), |i| values[i])
}

/// Sum of `a[i] · b[i]`, in the same eight lanes as [`sum`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    sum_of(n, |i| a[i] * b[i])
}

#[inline(always)]
fn sum_of(n: usize, term: impl Fn(usize) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let whole = n / 8 * 8;
    for start in (0..whole).step_by(8) {
        for (lane, acc) in lanes.iter_mut().enumerate() {
            *acc += term(start + lane);
        }
    }
    let mut total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for i in whole..n {
        total += term(i);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points from -10 to 10 in steps of 1/1024, plus the edges of the clamp.
    fn grid() -> impl Iterator<Item = f32> {
        (-10 * 1024..=10 * 1024)
            .map(|i| i as f32 / 1024.0)
            .chain([-100.0, -87.0, 0.0, -0.0, 1e-30, 88.0])
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        for x in grid().chain((-870..=880).map(|i| i as f32 / 10.0)) {
            let (got, want) = (exp(x), x.max(-87.3).exp());
            let ulp = (want.to_bits() as i64 - got.to_bits() as i64).abs();
            assert!(
                ulp <= 2 || (want - got).abs() < 1e-37,
                "exp({x}) = {got}, libm {want}"
            );
        }
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn erf_is_within_its_bound_of_libm() {
        for x in grid() {
            let want = libm_erf(x as f64);
            let got = erf(x) as f64;
            assert!((got - want).abs() < 3e-7, "erf({x}) = {got}, want {want}");
            if x.abs() < 0.5 {
                assert!(
                    (got - want).abs() <= 2e-7 * want.abs(),
                    "erf({x}) = {got}, want {want}"
                );
            }
        }
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(-3.0) < 0.0);
    }

    #[test]
    fn sums_match_a_plain_sum_within_rounding() {
        for n in [0usize, 1, 7, 8, 9, 63, 128, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().map(|&v| v as f64).sum();
            let plain_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((sum(&a) as f64 - plain).abs() < 1e-4, "n = {n}");
            assert!((dot(&a, &b) as f64 - plain_dot).abs() < 1e-4, "n = {n}");
        }
    }

    /// erf in f64 from its Taylor series (|x| < 3) or its asymptotic continued
    /// fraction's complement, good to 1e-12 on the grid: a reference independent of
    /// the code under test.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let value = if a < 3.0 {
            let (mut term, mut total, mut k) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                k += 1.0;
                term *= -a * a / k;
                total += term / (2.0 * k + 1.0);
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = e^{-a²}/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
            let mut frac = a;
            for k in (1..60).rev() {
                frac = a + (k as f64 / 2.0) / frac;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / frac
        };
        value.copysign(x)
    }
}
