//! Elementwise arithmetic and reductions. No implicit broadcasting: same-shape ops require equal
//! shapes, and the broadcasts the models need are explicit ops (`add_broadcast`, `add_channels`,
//! `modulate`).
//!
//! Backwards that are trivial are stated rather than coded: `add(a, b)` passes `dy` to both,
//! `sub` passes `dy` and `-dy` (`scale(dy, -1)`), `scale(x, s)` passes `s * dy`.

use rayon::prelude::*;

use super::{expect_rank, float_dispatch, same_dtype, same_shape};
use crate::{Error, Float, Result, Tensor};

const CHUNK: usize = 1 << 14;

/// The discriminants are kernels/elementwise.cu's op codes.
#[derive(Clone, Copy)]
pub(crate) enum BinOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
}

impl BinOp {
    fn apply<T: Float>(self, x: T, y: T) -> T {
        match self {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
        }
    }
}

fn zip_map(op: &'static str, a: &Tensor, b: &Tensor, f: BinOp) -> Result<Tensor> {
    same_shape(op, a, b)?;
    crate::cuda::kernel_dispatch!([BF16, F32] a, m => crate::cuda::elementwise::binary(m, op, a, b, f));
    float_dispatch!(op, a.dtype(), T => {
        let (av, bv) = (a.slice::<T>(op)?, b.slice::<T>(op)?);
        let out = super::made_in_chunks::<T>(av.len(), CHUNK, |i, o| {
            let (x, y) = (&av[i * CHUNK..], &bv[i * CHUNK..]);
            o.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (&x, &y))| *o = f.apply(x, y))
        });
        Tensor::from_vec(out, a.shape())
    })
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_map("add", a, b, BinOp::Add)
}

pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_map("sub", a, b, BinOp::Sub)
}

pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_map("mul", a, b, BinOp::Mul)
}

/// Gradients of `sum(mul(a, b) * dy)`: `(dy * b, dy * a)`.
pub fn mul_backward(a: &Tensor, b: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    same_shape("mul_backward", a, dy)?;
    Ok((mul(dy, b)?, mul(dy, a)?))
}

/// `s * x`.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    const OP: &str = "scale";
    crate::cuda::kernel_dispatch!([BF16, F32] x, m => crate::cuda::elementwise::scale(m, x, s));
    float_dispatch!(OP, x.dtype(), T => {
        let v: Vec<T> = x.slice::<T>(OP)?.iter().map(|&e| e * T::of(s)).collect();
        Tensor::from_vec(v, x.shape())
    })
}

/// `x + v` with `v` repeated along `axis` of `x`: `v`'s shape is `x`'s without that axis (the
/// classifier's positional and step-embedding adds).
pub fn add_broadcast(x: &Tensor, v: &Tensor, axis: usize) -> Result<Tensor> {
    const OP: &str = "add_broadcast";
    let (mid, inner) = broadcast_dims(OP, x.shape(), v, axis)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::add_broadcast(m, x, v, mid, inner));
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, vv) = (x.slice::<T>(OP)?, v.slice::<T>(OP)?);
        let mut out = xv.to_vec();
        if inner > 0 {
            out.par_chunks_mut((mid * inner).max(1)).zip(vv.par_chunks(inner)).for_each(|(o, vr)| {
                o.chunks_mut(inner).for_each(|r| r.iter_mut().zip(vr).for_each(|(e, &c)| *e += c))
            });
        }
        Tensor::from_vec(out, x.shape())
    })
}

/// Gradient of `sum(add_broadcast(x, v, axis) * dy)` with respect to `v`: `dy` summed over
/// `axis` (to `x` it is `dy`).
pub fn add_broadcast_backward(dy: &Tensor, axis: usize) -> Result<Tensor> {
    const OP: &str = "add_broadcast_backward";
    if axis >= dy.rank() {
        return Err(Error::shape(
            OP,
            format!("axis {axis} of dy {:?}", dy.shape()),
        ));
    }
    let mut v_shape = dy.shape().to_vec();
    let mid = v_shape.remove(axis);
    let inner: usize = dy.shape()[axis + 1..].iter().product();
    float_dispatch!(OP, dy.dtype(), T => {
        let g = dy.slice::<T>(OP)?;
        let mut dv = super::zeros::<T>(g.len() / mid.max(1));
        if inner > 0 {
            dv.par_chunks_mut(inner).zip(g.par_chunks((mid * inner).max(1))).for_each(|(o, blk)| {
                blk.chunks(inner).for_each(|r| o.iter_mut().zip(r).for_each(|(a, &b)| *a += b))
            });
        }
        Tensor::from_vec(dv, &v_shape)
    })
}

/// (size of `axis`, elements after it) for `x` of `shape` and `v` of `shape` without `axis`.
fn broadcast_dims(
    op: &'static str,
    shape: &[usize],
    v: &Tensor,
    axis: usize,
) -> Result<(usize, usize)> {
    let mut want = shape.to_vec();
    if axis < want.len() {
        want.remove(axis);
    }
    if axis >= shape.len() || v.shape() != want {
        return Err(Error::shape(
            op,
            format!("x {shape:?} + v {:?} repeated along axis {axis}", v.shape()),
        ));
    }
    Ok((shape[axis], shape[axis + 1..].iter().product()))
}

/// `x + v[:, :, None, ...]` for `x`: (B, C, ...) and `v`: (B, C) — the UNet's time-embedding add.
pub fn add_channels(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let x3 = channels_3d("add_channels", x, v)?;
    add_broadcast(&x3, v, 2)?.reshape(x.shape())
}

/// Gradient of `sum(add_channels(x, v) * dy)` with respect to `v` (to `x` it is `dy`).
pub fn add_channels_backward(dy: &Tensor, v_shape: &[usize]) -> Result<Tensor> {
    let v = Tensor::zeros(v_shape, dy.dtype());
    add_broadcast_backward(&channels_3d("add_channels_backward", dy, &v)?, 2)
}

/// `x` (B, C, ...) as (B, C, rest), checked against `v` (B, C).
fn channels_3d(op: &'static str, x: &Tensor, v: &Tensor) -> Result<Tensor> {
    same_dtype(op, x, v)?;
    if x.rank() < 2 || v.shape() != &x.shape()[..2] {
        return Err(Error::shape(
            op,
            format!(
                "x {:?} (B, C, ...) with v {:?} (B, C)",
                x.shape(),
                v.shape()
            ),
        ));
    }
    let s = x.shape();
    x.reshape(&[s[0], s[1], s[2..].iter().product()])
}

/// adaLN modulation: `x * (1 + scale[:, None]) + shift[:, None]` for `x`: (B, L, D) and
/// `shift`, `scale`: (B, D) (FLUX, SD3).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    const OP: &str = "modulate";
    let (l, d) = modulate_dims(OP, x, shift, scale)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::modulate(m, x, shift, scale));
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, sh, sc) = (x.slice::<T>(OP)?, shift.slice::<T>(OP)?, scale.slice::<T>(OP)?);
        let mut out = super::zeros::<T>(xv.len());
        out.par_chunks_mut(d.max(1)).zip(xv.par_chunks(d.max(1))).enumerate().for_each(|(r, (o, xr))| {
            let b = r / l.max(1);
            for i in 0..d {
                o[i] = xr[i] * (T::ONE + sc[b * d + i]) + sh[b * d + i];
            }
        });
        Tensor::from_vec(out, x.shape())
    })
}

/// Gradients of `sum(modulate(x, shift, scale) * dy)`: `(dx, dshift, dscale)`.
pub fn modulate_backward(
    x: &Tensor,
    scale: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "modulate_backward";
    let (l, d) = modulate_dims(OP, x, scale, scale)?;
    same_shape(OP, x, dy)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::modulate_backward(m, x, scale, dy));
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, sc, g) = (x.slice::<T>(OP)?, scale.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let mut dx = super::zeros::<T>(xv.len());
        let mut dsh = super::zeros::<T>(sc.len());
        let mut dsc = super::zeros::<T>(sc.len());
        for (r, (xr, gr)) in xv.chunks(d.max(1)).zip(g.chunks(d.max(1))).enumerate() {
            let b = r / l.max(1);
            for i in 0..d {
                dx[r * d + i] = gr[i] * (T::ONE + sc[b * d + i]);
                dsh[b * d + i] += gr[i];
                dsc[b * d + i] += gr[i] * xr[i];
            }
        }
        Ok((Tensor::from_vec(dx, x.shape())?, Tensor::from_vec(dsh, scale.shape())?,
            Tensor::from_vec(dsc, scale.shape())?))
    })
}

fn modulate_dims(
    op: &'static str,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
) -> Result<(usize, usize)> {
    expect_rank(op, "x", x, 3)?;
    same_dtype(op, x, shift)?;
    same_dtype(op, x, scale)?;
    let (b, l, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    if shift.shape() != [b, d] || scale.shape() != [b, d] {
        return Err(Error::shape(
            op,
            format!(
                "x {:?} with shift {:?} and scale {:?} (expected [{b}, {d}])",
                x.shape(),
                shift.shape(),
                scale.shape()
            ),
        ));
    }
    Ok((l, d))
}

/// Sum of all elements, as a scalar tensor (shape []).
pub fn sum(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "sum";
    float_dispatch!(OP, x.dtype(), T => {
        let s: T = x.slice::<T>(OP)?.iter().copied().sum();
        Tensor::from_vec(vec![s], &[])
    })
}

/// Mean of all elements, as a scalar tensor. Its backward fills `x`'s shape with `dy / numel`
/// (see `mean_axis_backward` for the per-axis form).
pub fn mean(x: &Tensor) -> Result<Tensor> {
    if x.numel() == 0 {
        return Err(Error::shape("mean", "mean of an empty tensor"));
    }
    scale(&sum(x)?, 1.0 / x.numel() as f64)
}

/// Mean over one axis, which is removed from the shape.
pub fn mean_axis(x: &Tensor, axis: usize) -> Result<Tensor> {
    const OP: &str = "mean_axis";
    if axis >= x.rank() || x.shape()[axis] == 0 {
        return Err(Error::shape(OP, format!("axis {axis} of {:?}", x.shape())));
    }
    let (outer, n, inner) = (
        x.shape()[..axis].iter().product::<usize>(),
        x.shape()[axis],
        x.shape()[axis + 1..].iter().product::<usize>(),
    );
    let mut shape = x.shape().to_vec();
    shape.remove(axis);
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let mut out = super::zeros::<T>(outer * inner);
        for o in 0..outer {
            for k in 0..n {
                let src = &xv[(o * n + k) * inner..(o * n + k + 1) * inner];
                out[o * inner..(o + 1) * inner].iter_mut().zip(src).for_each(|(a, &b)| *a += b);
            }
        }
        let inv = T::ONE / T::of(n as f64);
        out.iter_mut().for_each(|v| *v *= inv);
        Tensor::from_vec(out, &shape)
    })
}

/// Gradient of `sum(mean_axis(x, axis) * dy)` with respect to `x` of shape `x_shape`.
pub fn mean_axis_backward(dy: &Tensor, x_shape: &[usize], axis: usize) -> Result<Tensor> {
    const OP: &str = "mean_axis_backward";
    let mut expect = x_shape.to_vec();
    if axis >= expect.len() {
        return Err(Error::shape(OP, format!("axis {axis} of {x_shape:?}")));
    }
    let n = expect.remove(axis);
    if dy.shape() != expect {
        return Err(Error::shape(
            OP,
            format!("dy {:?}, expected {expect:?}", dy.shape()),
        ));
    }
    let inner: usize = x_shape[axis + 1..].iter().product();
    float_dispatch!(OP, dy.dtype(), T => {
        let g = dy.slice::<T>(OP)?;
        let inv = T::ONE / T::of(n as f64);
        let mut dx = Vec::with_capacity(g.len() * n);
        for row in g.chunks(inner.max(1)) {
            for _ in 0..n {
                dx.extend(row.iter().map(|&v| v * inv));
            }
        }
        Tensor::from_vec(dx, x_shape)
    })
}
