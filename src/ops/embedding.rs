//! Lookups and position encodings: embedding tables, the sinusoidal timestep embedding, and RoPE.

use rayon::prelude::*;

use super::{expect_rank, float_dispatch, same_dtype};
use crate::{Error, Float, Result, Tensor};

/// Rows of `weight` (V, D) at `ids` -> (ids.len(), D).
pub fn embedding(weight: &Tensor, ids: &[usize]) -> Result<Tensor> {
    const OP: &str = "embedding";
    expect_rank(OP, "weight", weight, 2)?;
    let (v, d) = (weight.shape()[0], weight.shape()[1]);
    if let Some(&bad) = ids.iter().find(|&&i| i >= v) {
        return Err(Error::Invalid(format!(
            "{OP}: id {bad} out of range for a table of {v} rows"
        )));
    }
    crate::cuda::kernel_dispatch!(weight, m => crate::cuda::elementwise::embedding(m, weight, ids));
    float_dispatch!(OP, weight.dtype(), T => {
        let w = weight.slice::<T>(OP)?;
        let mut out = Vec::with_capacity(ids.len() * d);
        ids.iter().for_each(|&i| out.extend_from_slice(&w[i * d..(i + 1) * d]));
        Tensor::from_vec(out, &[ids.len(), d])
    })
}

/// Gradient of `sum(embedding(weight, ids) * dy)` with respect to `weight` (V, D): rows of `dy`
/// added into the rows they were read from.
pub fn embedding_backward(weight_shape: &[usize], ids: &[usize], dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding_backward";
    let [v, d] = weight_shape else {
        return Err(Error::shape(
            OP,
            format!("weight shape {weight_shape:?} must be (V, D)"),
        ));
    };
    if dy.shape() != [ids.len(), *d] {
        return Err(Error::shape(
            OP,
            format!("dy {:?}, expected [{}, {d}]", dy.shape(), ids.len()),
        ));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i >= *v) {
        return Err(Error::Invalid(format!(
            "{OP}: id {bad} out of range for a table of {v} rows"
        )));
    }
    float_dispatch!(OP, dy.dtype(), T => {
        let g = dy.slice::<T>(OP)?;
        let mut dw = super::zeros::<T>(v * d);
        for (r, &i) in ids.iter().enumerate() {
            dw[i * d..(i + 1) * d].iter_mut().zip(&g[r * d..(r + 1) * d]).for_each(|(a, &b)| *a += b);
        }
        Tensor::from_vec(dw, weight_shape)
    })
}

/// diffusers' `get_timestep_embedding` (scale 1, max_period 10000): `t` (B) -> (B, dim),
/// `[sin(t f), cos(t f)]` (or `[cos, sin]` when `flip_sin_to_cos`) with
/// `f_i = exp(-ln(10000) i / (dim/2 - downscale_freq_shift))`; an odd `dim` gets a zero column.
/// Computed in the tensor's dtype in the same order as diffusers, so f32 results agree closely.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    const OP: &str = "timestep_embedding";
    expect_rank(OP, "t", t, 1)?;
    let half = dim / 2;
    if half == 0 || half as f64 - downscale_freq_shift == 0.0 {
        return Err(Error::Invalid(format!("{OP}: dim {dim} too small")));
    }
    float_dispatch!(OP, t.dtype(), T => {
        let freqs = frequencies::<T>(half, downscale_freq_shift);
        let mut out = super::zeros::<T>(t.numel() * dim);
        for (row, &tv) in out.chunks_mut(dim).zip(t.slice::<T>(OP)?) {
            let (a, b) = row[..2 * half].split_at_mut(half);
            let (sin, cos) = if flip_sin_to_cos { (b, a) } else { (a, b) };
            for (i, &f) in freqs.iter().enumerate() {
                sin[i] = (tv * f).sin();
                cos[i] = (tv * f).cos();
            }
        }
        Tensor::from_vec(out, &[t.numel(), dim])
    })
}

fn frequencies<T: Float>(half: usize, shift: f64) -> Vec<T> {
    let c = T::of(-(10000f64).ln());
    (0..half)
        .map(|i| (c * T::of(i as f64) / T::of(half as f64 - shift)).exp())
        .collect()
}

/// Gradient of `sum(timestep_embedding(t, ..) * dy)` with respect to `t`.
pub fn timestep_embedding_backward(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    dy: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "timestep_embedding_backward";
    expect_rank(OP, "t", t, 1)?;
    same_dtype(OP, t, dy)?;
    if dy.shape() != [t.numel(), dim] {
        return Err(Error::shape(
            OP,
            format!("dy {:?}, expected [{}, {dim}]", dy.shape(), t.numel()),
        ));
    }
    let half = dim / 2;
    float_dispatch!(OP, t.dtype(), T => {
        let freqs = frequencies::<T>(half, downscale_freq_shift);
        let g = dy.slice::<T>(OP)?;
        let dt: Vec<T> = t.slice::<T>(OP)?.iter().zip(g.chunks(dim)).map(|(&tv, gr)| {
            let (a, b) = gr[..2 * half].split_at(half);
            let (gs, gc) = if flip_sin_to_cos { (b, a) } else { (a, b) };
            freqs.iter().enumerate().map(|(i, &f)| f * (gs[i] * (tv * f).cos() - gc[i] * (tv * f).sin())).sum()
        }).collect();
        Tensor::from_vec(dt, t.shape())
    })
}

fn rope_dims(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(usize, usize)> {
    expect_rank(op, "x", x, 4)?;
    same_dtype(op, x, cos)?;
    same_dtype(op, x, sin)?;
    let (l, d) = (x.shape()[2], x.shape()[3]);
    if d % 2 != 0 || cos.shape() != [l, d / 2] || sin.shape() != [l, d / 2] {
        return Err(Error::shape(
            op,
            format!(
                "x {:?} (B, H, L, D even) with cos {:?} and sin {:?} (L, D/2)",
                x.shape(),
                cos.shape(),
                sin.shape()
            ),
        ));
    }
    Ok((l, d))
}

/// Rotary position embedding on interleaved pairs, as FLUX applies it: for each pair
/// `(x[2i], x[2i+1])` at position `p`, rotate by the angle whose cosine and sine are
/// `cos[p, i]`, `sin[p, i]`. `x`: (B, H, L, D); `cos`, `sin`: (L, D/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_rotate("rope", x, cos, sin, false)
}

/// Gradient of `sum(rope(x, cos, sin) * dy)` with respect to `x`: the inverse rotation of `dy`.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_rotate("rope_backward", dy, cos, sin, true)
}

fn rope_rotate(
    op: &'static str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    let (l, d) = rope_dims(op, x, cos, sin)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::rope(m, x, cos, sin, inverse));
    float_dispatch!(op, x.dtype(), T => {
        let (xv, c, s) = (x.slice::<T>(op)?, cos.slice::<T>(op)?, sin.slice::<T>(op)?);
        let mut out = super::zeros::<T>(xv.len());
        out.par_chunks_mut(d).zip(xv.par_chunks(d)).enumerate().for_each(|(r, (o, xr))| {
            let p = r % l;
            for i in 0..d / 2 {
                let (cv, sv) = (c[p * d / 2 + i], s[p * d / 2 + i]);
                let sv = if inverse { -sv } else { sv };
                let (a, b) = (xr[2 * i], xr[2 * i + 1]);
                o[2 * i] = a * cv - b * sv;
                o[2 * i + 1] = b * cv + a * sv;
            }
        });
        Tensor::from_vec(out, x.shape())
    })
}
