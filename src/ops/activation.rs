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

fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// The standard normal's CDF, Phi(x): exact GELU is x * Phi(x).
fn normal_cdf<T: Float>(x: T) -> T {
    T::of(0.5) * (T::ONE + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// The standard normal's density, phi(x): exact GELU's derivative is Phi(x) + x phi(x).
fn normal_pdf<T: Float>(x: T) -> T {
    (T::of(-0.5) * x * x).exp() * T::of(0.398_942_280_401_432_7)
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
        let mut y = vec![T::ZERO; xv.len()];
        y.par_chunks_mut(CHUNK).zip(xv.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            yc.iter_mut().zip(xc).for_each(|(o, &v)| *o = act.f(v));
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
        let mut dx = vec![T::ZERO; xv.len()];
        dx.par_chunks_mut(CHUNK).zip(xv.par_chunks(CHUNK).zip(dyv.par_chunks(CHUNK))).for_each(
            |(o, (xc, dc))| {
                o.iter_mut().zip(xc.iter().zip(dc)).for_each(|(o, (&v, &d))| *o = d * act.df(v));
            },
        );
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
        let mut y = vec![T::ZERO; xv.len() / 2];
        y.par_chunks_mut(d).zip(xv.par_chunks(2 * d)).for_each(|(yr, xr)| {
            let (h, g) = xr.split_at(d);
            yr.iter_mut().zip(h.iter().zip(g)).for_each(|(o, (&h, &g))| *o = h * Activation::Gelu.f(g));
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
        let mut dx = vec![T::ZERO; xv.len()];
        dx.par_chunks_mut(2 * d).zip(xv.par_chunks(2 * d).zip(dyv.par_chunks(d))).for_each(
            |(dxr, (xr, dyr))| {
                let (h, g) = xr.split_at(d);
                let (dh, dg) = dxr.split_at_mut(d);
                // Phi(g) once for both halves (erf is most of this loop's time).
                for i in 0..d {
                    let cdf = normal_cdf(g[i]);
                    dh[i] = dyr[i] * g[i] * cdf;
                    dg[i] = dyr[i] * h[i] * (cdf + g[i] * normal_pdf(g[i]));
                }
            },
        );
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
        let mut dx = vec![T::ZERO; yv.len()];
        dx.par_chunks_mut(d).zip(yv.par_chunks(d).zip(dyv.par_chunks(d)))
            .for_each(|(o, (y, dy))| softmax_row_backward(y, dy, o));
        Tensor::from_vec(dx, y.shape())
    })
}
