//! The f32 softmax of one row and exp over a slice, vectorised: attention spends a third of its
//! time in `exp` when it goes through libm one element at a time (84M exponentials a 64x64
//! self-attention layer), and SiLU and GELU were as slow for the same reason.
//!
//! `exp` is Cephes' `expf`: range reduction by ln 2 in two parts, a degree-5 polynomial, and the
//! power of two assembled in the exponent bits; relative error about 1e-7 (2 ulp) over the range
//! where the result is a normal f32 (up to exp(88.37)), 0 below it (so masked logits, -inf, give exactly 0), NaN
//! for NaN. With AVX2 and FMA (detected at run time, so the crate stays portable) it runs 8
//! lanes at a time; elsewhere the softmax is the generic one and exp is libm's expf.

/// Above this the result is infinity (n would reach 128; exp(88.72) = f32::MAX is lost, which no
/// softmax comes near: its arguments are at most 0).
const EXP_HI: f32 = 88.376_26;
/// Below this exp is subnormal; the result is flushed to 0.
const EXP_LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so n * LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// exp(r) ~ 1 + r + r^2 * P(r) on |r| <= ln2 / 2, P's coefficients from the highest power.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// exp(x) by the formula above, one element: the lanes' reference, and the rows' tails.
fn exp_scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < EXP_LO {
        return 0.0;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = P.iter().fold(0.0, |acc, &c| acc * r + c);
    let y = p * r * r + r + 1.0;
    // n + 127 lies in 1..=255 here.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Softmax of `scale * row`, in place: exp(scale * x - max) / sum. An empty row is left alone.
pub(crate) fn softmax_f32(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx2::softmax(row, scale) };
        return;
    }
    super::activation::softmax_row_generic(row, scale);
}

/// Whether this CPU runs the 8-lane kernels (AVX2 and FMA).
pub(crate) fn lanes_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs 16-lane f32 kernels (AVX-512F): the direct convolution's wide tiles.
pub(crate) fn wide_lanes_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// exp of each element in place: the activations' exponentials (SiLU, GELU) for f32.
pub(crate) fn exp_f32(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx2::exp_in_place(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = x.exp());
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// exp of 8 lanes, as `exp_scalar`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        // min/max return their second operand when either is NaN: x second keeps a NaN.
        let xc = _mm256_max_ps(
            _mm256_set1_ps(EXP_LO),
            _mm256_min_ps(_mm256_set1_ps(EXP_HI), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
        let above = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_HI));
        let y = _mm256_andnot_ps(below, _mm256_mul_ps(y, pow2n));
        _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), above)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The softmax 8 lanes at a time; the tail (len % 8) through `exp_scalar`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax(row: &mut [f32], scale: f32) {
        let (body, tail) = row.split_at_mut(row.len() / 8 * 8);
        let vs = _mm256_set1_ps(scale);
        let mut vm = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(8) {
            vm = _mm256_max_ps(vm, _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vs));
        }
        let m = tail.iter().fold(hmax(vm), |m, &x| m.max(scale * x));
        let vmax = _mm256_set1_ps(m);
        let mut vsum = _mm256_setzero_ps();
        for c in body.chunks_exact_mut(8) {
            let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(c.as_ptr()), vs, vmax));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            vsum = _mm256_add_ps(vsum, e);
        }
        let mut sum = hsum(vsum);
        for x in tail.iter_mut() {
            *x = exp_scalar(scale * *x - m);
            sum += *x;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        for c in body.chunks_exact_mut(8) {
            _mm256_storeu_ps(
                c.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv),
            );
        }
        tail.iter_mut().for_each(|x| *x *= 1.0 / sum);
    }

    /// exp of each element in place, 8 lanes at a time; the tail through `exp_scalar`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place(xs: &mut [f32]) {
        let (body, tail) = xs.split_at_mut(xs.len() / 8 * 8);
        for c in body.chunks_exact_mut(8) {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
        }
        tail.iter_mut().for_each(|x| *x = exp_scalar(*x));
    }

    /// Whether this CPU runs the lanes.
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// exp through the 8 lanes (every input in a full lane group: padded to a multiple of 8),
    /// where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    fn lanes_exp(xs: &[f32]) -> Option<Vec<f32>> {
        if !avx2::available() {
            return None;
        }
        let mut ys = xs.to_vec();
        ys.resize(xs.len().next_multiple_of(8), 0.0);
        // SAFETY: the features were detected above.
        unsafe { avx2::exp_in_place(&mut ys) };
        ys.truncate(xs.len());
        Some(ys)
    }

    /// Inputs across exp's whole range and its edges.
    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.009).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, EXP_LO, EXP_HI, -87.0, 88.0, 0.346_5, -0.346_6,
        ]);
        xs
    }

    /// Against f64's exp: within 3e-7 relative (2.5 ulp; Cephes states 2 ulp for its expf)
    /// wherever the result is a normal f32; 0 below EXP_LO.
    fn check(name: &str, xs: &[f32], ys: &[f32]) {
        for (&x, &y) in xs.iter().zip(ys) {
            let want = (x as f64).exp();
            if x < EXP_LO {
                assert_eq!(y, 0.0, "{name}: exp({x})");
            } else if x > EXP_HI {
                assert_eq!(y, f32::INFINITY, "{name}: exp({x})");
            } else {
                let rel = ((y as f64 - want) / want).abs();
                assert!(
                    rel < 3e-7,
                    "{name}: exp({x}) = {y}, want {want} (rel {rel:e})"
                );
            }
        }
    }

    #[test]
    fn exp_matches_f64() {
        let xs = inputs();
        let ys: Vec<f32> = xs.iter().map(|&x| exp_scalar(x)).collect();
        check("scalar", &xs, &ys);
        #[cfg(target_arch = "x86_64")]
        if let Some(ys) = lanes_exp(&xs) {
            check("avx2", &xs, &ys);
        }
    }

    #[test]
    fn exp_edges() {
        let special = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -100.0, 100.0];
        let scalar: Vec<f32> = special.iter().map(|&x| exp_scalar(x)).collect();
        let mut all = vec![scalar];
        #[cfg(target_arch = "x86_64")]
        all.extend(lanes_exp(&special));
        for ys in all {
            assert_eq!(ys[0], 0.0);
            assert_eq!(ys[1], f32::INFINITY);
            assert!(ys[2].is_nan());
            assert_eq!(ys[3], 0.0);
            assert_eq!(ys[4], f32::INFINITY);
        }
    }

    /// The softmax of random rows (lengths around the 8-lane width, a masked -inf entry) against
    /// the same softmax in f64: 1e-6 relative to the row's largest probability.
    #[test]
    fn softmax_matches_f64() {
        let mut rng = crate::rng::Rng::new(7);
        for len in [1, 7, 8, 9, 77, 300] {
            for &scale in &[1.0f32, 0.125, -0.5] {
                let mut row: Vec<f32> = (0..len).map(|_| 6.0 * rng.normal() as f32).collect();
                if len > 3 {
                    row[2] = f32::NEG_INFINITY * scale.signum();
                }
                let m = row
                    .iter()
                    .map(|&x| (scale * x) as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row
                    .iter()
                    .map(|&x| ((scale * x) as f64 - m).exp())
                    .collect();
                let sum: f64 = e.iter().sum();
                let mut ours = row.clone();
                softmax_f32(&mut ours, scale);
                let mut generic = row.clone();
                crate::ops::activation::softmax_row_generic(&mut generic, scale);
                for (i, &want) in e.iter().enumerate() {
                    let want = want / sum;
                    for (name, got) in [("dispatched", ours[i]), ("generic", generic[i])] {
                        assert!(
                            (got as f64 - want).abs() < 1e-6,
                            "{name} len {len} scale {scale} [{i}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
