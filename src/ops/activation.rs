//! Pointwise activations, GEGLU and the softmax.

use rayon::prelude::*;

use super::{float_dispatch, same_shape};
use crate::{Error, Float, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// x * sigmoid(x)
    Silu,
    /// Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
    Gelu,
    /// GELU, tanh approximation (torch's `approximate="tanh"`).
    GeluTanh,
    /// x * sigmoid(1.702 x) (CLIP's `quick_gelu`).
    QuickGelu,
    Relu,
    /// max(x, 0) + slope * min(x, 0).
    LeakyRelu(f64),
}

impl Activation {
    /// Every kind (LeakyRelu with slope 0.1): the tests' list.
    pub const ALL: [Activation; 6] = [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
        Activation::Relu,
        Activation::LeakyRelu(0.1),
    ];
}

fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// The standard normal's CDF, Phi(x): exact GELU is x * Phi(x).
fn normal_cdf<T: Float>(x: T) -> T {
    T::of(0.5) * (T::ONE + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// 1 / sqrt(2 pi), phi(0).
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// The standard normal's density, phi(x): exact GELU's derivative is Phi(x) + x phi(x).
fn normal_pdf<T: Float>(x: T) -> T {
    (T::of(-0.5) * x * x).exp() * T::of(INV_SQRT_2PI)
}

/// erfc(z) = t exp(-z^2 + P(t)) with t = 1 / (1 + z/2), for z >= 0: Numerical Recipes' Chebyshev
/// fit (erfcc), relative error under 1.2e-7 for every z >= 0. P's coefficients, constant term
/// first.
const ERFC_P: [f64; 10] = [
    -1.265_512_23,
    1.000_023_68,
    0.374_091_96,
    0.096_784_18,
    -0.186_288_06,
    0.278_868_07,
    -1.135_203_98,
    1.488_515_87,
    -0.822_152_23,
    0.170_872_77,
];

/// Phi(x) of each element into `cdf` and, with `pdf`, phi(x) into it. f64 goes through libm's
/// erf (the gradient checks' precision). f32 goes through `Float::exp_in_place` (vectorised):
/// Phi(x) = erfc(|x| / sqrt 2) / 2 for x <= 0 and 1 minus that above, with erfc from `ERFC_P`;
/// libm's erff one element at a time was 2% of a UNet pass.
fn normal_parts<T: Float>(x: &[T], cdf: &mut [T], pdf: Option<&mut [T]>) {
    if T::DTYPE == crate::DType::F64 {
        cdf.iter_mut().zip(x).for_each(|(c, &v)| *c = normal_cdf(v));
        if let Some(pdf) = pdf {
            pdf.iter_mut().zip(x).for_each(|(p, &v)| *p = normal_pdf(v));
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::lanes_available() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { erfc_parts_lanes(x, cdf, pdf) };
    }
    erfc_parts(x, cdf, pdf)
}

/// [`erfc_parts`] compiled for AVX2 and FMA: its polynomial then runs 8 lanes wide, not SSE's
/// 4 (the crate's baseline), which halved a GEGLU's time. Same operations, same results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn erfc_parts_lanes<T: Float>(x: &[T], cdf: &mut [T], pdf: Option<&mut [T]>) {
    erfc_parts(x, cdf, pdf)
}

/// The f32 path of [`normal_parts`].
#[inline(always)]
fn erfc_parts<T: Float>(x: &[T], cdf: &mut [T], pdf: Option<&mut [T]>) {
    let half = T::of(0.5);
    let z = |v: T| v.abs() * T::of(std::f64::consts::FRAC_1_SQRT_2);
    let t = |v: T| T::ONE / (T::ONE + half * z(v));
    for (c, &v) in cdf.iter_mut().zip(x) {
        let (z, t) = (z(v), t(v));
        *c = ERFC_P
            .iter()
            .rev()
            .fold(T::ZERO, |acc, &p| acc * t + T::of(p))
            - z * z;
    }
    T::exp_in_place(cdf);
    for (c, &v) in cdf.iter_mut().zip(x) {
        let tail = half * t(v) * *c;
        *c = if v > T::ZERO { T::ONE - tail } else { tail };
    }
    if let Some(pdf) = pdf {
        pdf.iter_mut()
            .zip(x)
            .for_each(|(p, &v)| *p = T::of(-0.5) * v * v);
        T::exp_in_place(pdf);
        pdf.iter_mut().for_each(|p| *p *= T::of(INV_SQRT_2PI));
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_TANH_C: f64 = 0.044_715;

impl Activation {
    fn f<T: Float>(self, x: T) -> T {
        let half = T::of(0.5);
        match self {
            Activation::Silu => x * sigmoid(x),
            Activation::Gelu => x * normal_cdf(x),
            Activation::GeluTanh => {
                let u = T::of(SQRT_2_OVER_PI) * (x + T::of(GELU_TANH_C) * x * x * x);
                half * x * (T::ONE + u.tanh())
            }
            Activation::QuickGelu => x * sigmoid(T::of(1.702) * x),
            Activation::Relu => x.max(T::ZERO),
            Activation::LeakyRelu(a) => {
                if x > T::ZERO {
                    x
                } else {
                    T::of(a) * x
                }
            }
        }
    }

    /// The sigmoid's slope inside a sigmoid-gated activation: x * sigmoid(k x).
    fn sigmoid_gate(self) -> Option<f64> {
        match self {
            Activation::Silu => Some(1.0),
            Activation::QuickGelu => Some(1.702),
            _ => None,
        }
    }

    /// `y = f(x)` over a chunk. The exponentials of SiLU, quick GELU and GELU go through one
    /// vectorised pass (`Float::exp_in_place`) instead of libm one element at a time.
    fn apply<T: Float>(self, x: &[T], y: &mut [T]) {
        if let Some(k) = self.sigmoid_gate() {
            let k = T::of(k);
            y.iter_mut().zip(x).for_each(|(o, &v)| *o = -(k * v));
            T::exp_in_place(y);
            y.iter_mut()
                .zip(x)
                .for_each(|(o, &v)| *o = v / (T::ONE + *o));
        } else if self == Activation::Gelu {
            normal_parts(x, y, None);
            y.iter_mut().zip(x).for_each(|(o, &v)| *o *= v);
        } else {
            y.iter_mut().zip(x).for_each(|(o, &v)| *o = self.f(v));
        }
    }

    /// `dx = dy * f'(x)` over a chunk, vectorised as [`Activation::apply`].
    fn apply_backward<T: Float>(self, x: &[T], dy: &[T], dx: &mut [T]) {
        if let Some(k) = self.sigmoid_gate() {
            let k = T::of(k);
            dx.iter_mut().zip(x).for_each(|(o, &v)| *o = -(k * v));
            T::exp_in_place(dx);
            for (o, (&v, &d)) in dx.iter_mut().zip(x.iter().zip(dy)) {
                let s = T::ONE / (T::ONE + *o);
                *o = d * (s + k * v * s * (T::ONE - s));
            }
        } else if self == Activation::Gelu {
            let mut pdf = vec![T::ZERO; x.len()];
            normal_parts(x, dx, Some(&mut pdf));
            for ((o, p), (&v, &d)) in dx.iter_mut().zip(&pdf).zip(x.iter().zip(dy)) {
                *o = d * (*o + v * *p);
            }
        } else {
            for (o, (&v, &d)) in dx.iter_mut().zip(x.iter().zip(dy)) {
                *o = d * self.df(v);
            }
        }
    }

    /// d f / d x.
    fn df<T: Float>(self, x: T) -> T {
        let half = T::of(0.5);
        match self {
            Activation::Silu => {
                let s = sigmoid(x);
                s * (T::ONE + x * (T::ONE - s))
            }
            Activation::Gelu => normal_cdf(x) + x * normal_pdf(x),
            Activation::GeluTanh => {
                let u = T::of(SQRT_2_OVER_PI) * (x + T::of(GELU_TANH_C) * x * x * x);
                let t = u.tanh();
                let du = T::of(SQRT_2_OVER_PI) * (T::ONE + T::of(3.0 * GELU_TANH_C) * x * x);
                half * (T::ONE + t) + half * x * (T::ONE - t * t) * du
            }
            Activation::QuickGelu => {
                let s = sigmoid(T::of(1.702) * x);
                s + T::of(1.702) * x * s * (T::ONE - s)
            }
            Activation::Relu => {
                if x > T::ZERO {
                    T::ONE
                } else {
                    T::ZERO
                }
            }
            Activation::LeakyRelu(a) => {
                if x > T::ZERO {
                    T::ONE
                } else {
                    T::of(a)
                }
            }
        }
    }
}

/// Elementwise work per thread chunk (small ops stay on one thread).
const CHUNK: usize = 1 << 14;

pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    const OP: &str = "activation";
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::activation(m, x, act));
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let y = super::made_in_chunks(xv.len(), CHUNK, |i, yc: &mut [T]| {
            act.apply(&xv[i * CHUNK..][..yc.len()], yc)
        });
        Tensor::from_vec(y, x.shape())
    })
}

/// Gradient of `sum(activation(x) * dy)` with respect to `x`.
pub fn activation_backward(x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
    const OP: &str = "activation_backward";
    same_shape(OP, x, dy)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::activation_backward(m, x, dy, act));
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, dyv) = (x.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let dx = super::made_in_chunks(xv.len(), CHUNK, |i, o: &mut [T]| {
            let at = i * CHUNK..i * CHUNK + o.len();
            act.apply_backward(&xv[at.clone()], &dyv[at], o)
        });
        Tensor::from_vec(dx, x.shape())
    })
}

fn geglu_half(op: &'static str, x: &Tensor) -> Result<usize> {
    match x.shape().last() {
        Some(&d) if d % 2 == 0 && d > 0 => Ok(d / 2),
        _ => Err(Error::shape(
            op,
            format!("last dim of x {:?} must be even", x.shape()),
        )),
    }
}

/// diffusers' GEGLU after its projection: `h, gate = x.chunk(2, -1); h * gelu(gate)`.
/// `x`: (..., 2D) -> (..., D).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu";
    let d = geglu_half(OP, x)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::geglu(m, x, d));
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = d;
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let y = super::made_in_chunks(xv.len() / 2, d, |r, yr: &mut [T]| {
            let (h, g) = xv[2 * d * r..2 * d * (r + 1)].split_at(d);
            normal_parts(g, yr, None);
            yr.iter_mut().zip(h.iter().zip(g)).for_each(|(o, (&h, &g))| *o *= h * g);
        });
        Tensor::from_vec(y, &shape)
    })
}

/// Gradient of `sum(geglu(x) * dy)` with respect to `x`.
pub fn geglu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu_backward";
    let d = geglu_half(OP, x)?;
    if dy.numel() * 2 != x.numel()
        || dy.shape()[..dy.rank().saturating_sub(1)] != x.shape()[..x.rank() - 1]
    {
        return Err(Error::shape(
            OP,
            format!("dy {:?} does not fit x {:?}", dy.shape(), x.shape()),
        ));
    }
    super::same_dtype(OP, x, dy)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::geglu_backward(m, x, dy, d));
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, dyv) = (x.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let dx = super::made_in_chunks(xv.len(), 2 * d, |r, dxr: &mut [T]| {
            let (h, g) = xv[2 * d * r..2 * d * (r + 1)].split_at(d);
            let dyr = &dyv[d * r..d * (r + 1)];
            let (dh, dg) = dxr.split_at_mut(d);
            // Phi(g) and phi(g) first, in the two halves' places.
            normal_parts(g, dh, Some(dg));
            let terms = dh.iter_mut().zip(dg.iter_mut()).zip(h.iter().zip(g).zip(dyr));
            for ((dh, dg), ((&h, &g), &dy)) in terms {
                let cdf = *dh;
                *dh = dy * g * cdf;
                *dg = dy * h * (cdf + g * *dg);
            }
        });
        Tensor::from_vec(dx, x.shape())
    })
}

/// Softmax of one row in place (max-subtracted for stability).
pub(crate) fn softmax_row<T: Float>(row: &mut [T]) {
    T::softmax_scaled(row, T::ONE)
}

/// Softmax of `scale * row` in place, by the definition (f64's `Float::softmax_scaled`).
pub(crate) fn softmax_row_generic<T: Float>(row: &mut [T], scale: T) {
    let m = row.iter().fold(T::NEG_INFINITY, |m, &x| m.max(scale * x));
    let mut s = T::ZERO;
    for v in row.iter_mut() {
        *v = (scale * *v - m).exp();
        s += *v;
    }
    let inv = T::ONE / s;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// dx = y * (dy - sum(dy * y)) for one row, written into `dy`'s place in `out`.
pub(crate) fn softmax_row_backward<T: Float>(y: &[T], dy: &[T], out: &mut [T]) {
    out.copy_from_slice(dy);
    softmax_row_backward_in_place(y, out, T::ONE);
}

/// `g` <- scale * y * (g - sum(g * y)): the gradient of softmax(scale * x) at x, from its output
/// `y` and the gradient `g` on it.
pub(crate) fn softmax_row_backward_in_place<T: Float>(y: &[T], g: &mut [T], scale: T) {
    let dot: T = y.iter().zip(g.iter()).map(|(&a, &b)| a * b).sum();
    g.iter_mut()
        .zip(y)
        .for_each(|(g, &y)| *g = scale * y * (*g - dot));
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax";
    let Some(&d) = x.shape().last() else {
        return Err(Error::shape(OP, "x must have rank >= 1"));
    };
    float_dispatch!(OP, x.dtype(), T => {
        let mut y = x.slice::<T>(OP)?.to_vec();
        y.par_chunks_mut(d.max(1)).for_each(softmax_row);
        Tensor::from_vec(y, x.shape())
    })
}

/// Gradient of `sum(softmax(x) * dy)` with respect to `x`, from the forward's output `y`.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_backward";
    same_shape(OP, y, dy)?;
    let d = y.shape().last().copied().unwrap_or(1).max(1);
    float_dispatch!(OP, y.dtype(), T => {
        let (yv, dyv) = (y.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let mut dx = super::zeros::<T>(yv.len());
        dx.par_chunks_mut(d).zip(yv.par_chunks(d).zip(dyv.par_chunks(d)))
            .for_each(|(o, (y, dy))| softmax_row_backward(y, dy, o));
        Tensor::from_vec(dx, y.shape())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 Phi and phi (vectorised exp, Numerical Recipes' erfc) against f64's libm erfc and
    /// exp over [-12, 12] (past that Phi is 0 or 1 in f32), relative, where Phi is a normal f32
    /// and phi above 1e-30: Phi within 5e-7 (the fit's 1.2e-7, exp's 2 ulp, rounding), phi within
    /// 3e-7; both plus x^2 * 2.4e-7: the exponent's argument, about x^2 / 2, carries the f32
    /// rounding of |x| / sqrt 2, of its square and of the sum (each up to 2^-24 relative, about
    /// x^2 * 1.5e-7 together), and exp turns that absolute error into a relative one.
    #[test]
    fn f32_normal_parts_match_f64() {
        let xs: Vec<f32> = (0..24_001).map(|i| -12.0 + i as f32 * 0.001).collect();
        let (mut cdf, mut pdf) = (vec![0.0f32; xs.len()], vec![0.0f32; xs.len()]);
        normal_parts(&xs, &mut cdf, Some(&mut pdf));
        for ((&x, &c), &p) in xs.iter().zip(&cdf).zip(&pdf) {
            // erfc, not 1 + erf: that cancels to nothing in the lower tail, even in f64.
            let want_c = 0.5 * libm::erfc(-(x as f64) * std::f64::consts::FRAC_1_SQRT_2);
            let want_p = normal_pdf(x as f64);
            if want_c > f32::MIN_POSITIVE as f64 {
                let rel = (c as f64 - want_c).abs() / want_c;
                let tol = 5e-7 + (x as f64).powi(2) * 2.4e-7;
                assert!(rel < tol, "Phi({x}) = {c}, want {want_c} (rel {rel:e})");
            }
            if want_p > 1e-30 {
                let rel = (p as f64 - want_p).abs() / want_p;
                let tol = 3e-7 + (x as f64).powi(2) * 2.4e-7;
                assert!(rel < tol, "phi({x}) = {p}, want {want_p} (rel {rel:e})");
            }
        }
    }

    /// Every activation's chunk paths (`apply`, `apply_backward`) against the element formulas
    /// (`f`, `df`) in f64, at random points: the same maths, 1e-12.
    #[test]
    fn chunk_paths_match_element_formulas() {
        let mut rng = crate::rng::Rng::new(3);
        let x: Vec<f64> = (0..1000).map(|_| 4.0 * rng.normal()).collect();
        let dy: Vec<f64> = (0..1000).map(|_| rng.normal()).collect();
        for act in Activation::ALL {
            let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            act.apply(&x, &mut y);
            act.apply_backward(&x, &dy, &mut dx);
            for i in 0..x.len() {
                let (wy, wdx) = (act.f(x[i]), dy[i] * act.df(x[i]));
                assert!(
                    (y[i] - wy).abs() <= 1e-12 * wy.abs().max(1.0),
                    "{act:?} f({})",
                    x[i]
                );
                assert!(
                    (dx[i] - wdx).abs() <= 1e-12 * wdx.abs().max(1.0),
                    "{act:?} df({})",
                    x[i]
                );
            }
        }
    }
}
