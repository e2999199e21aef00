//! Spatial resampling over the last two dims: nearest 2x upsampling (UNet, VAE up blocks) and
//! bilinear resize with align_corners = false (the attention maps' resize to 16x16; f32 on every
//! target, kernels/maps.cu on a GPU).

use rayon::prelude::*;

use super::float_dispatch;
use crate::{Error, Float, Result, Tensor};

/// (planes, H, W) of a tensor (..., H, W).
pub(crate) fn planes(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize)> {
    if x.rank() < 2 {
        return Err(Error::shape(
            op,
            format!("x must be (..., H, W), got {:?}", x.shape()),
        ));
    }
    let s = x.shape();
    let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
    Ok((x.numel() / (h * w).max(1), h, w))
}

/// `shape` with its last two dims replaced by (h, w).
pub(crate) fn with_hw(shape: &[usize], h: usize, w: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    let r = s.len();
    s[r - 2] = h;
    s[r - 1] = w;
    s
}

/// Nearest-neighbour upsampling by 2 in H and W.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x";
    let (_, h, w) = planes(OP, x)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::elementwise::upsample_nearest2x(m, x));
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let mut y = super::zeros::<T>(xv.len() * 4);
        y.par_chunks_mut(4 * h * w).zip(xv.par_chunks(h * w)).for_each(|(yp, xp)| {
            for (i, row) in yp.chunks_mut(2 * w).enumerate() {
                let src = &xp[(i / 2) * w..(i / 2 + 1) * w];
                row.iter_mut().enumerate().for_each(|(j, o)| *o = src[j / 2]);
            }
        });
        Tensor::from_vec(y, &with_hw(x.shape(), 2 * h, 2 * w))
    })
}

/// Gradient of `sum(upsample_nearest2x(x) * dy)`: each input sums its 2x2 block of `dy`.
pub fn upsample_nearest2x_backward(dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x_backward";
    let (_, h2, w2) = planes(OP, dy)?;
    if h2 % 2 != 0 || w2 % 2 != 0 {
        return Err(Error::shape(
            OP,
            format!("dy {:?} must have even H and W", dy.shape()),
        ));
    }
    let (h, w) = (h2 / 2, w2 / 2);
    crate::cuda::kernel_dispatch!(dy, m => crate::cuda::elementwise::upsample_nearest2x_backward(m, dy));
    float_dispatch!(OP, dy.dtype(), T => {
        let dv = dy.slice::<T>(OP)?;
        let mut dx = super::zeros::<T>(dv.len() / 4);
        dx.par_chunks_mut(h * w).zip(dv.par_chunks(h2 * w2)).for_each(|(xp, yp)| {
            for (i, row) in yp.chunks(w2).enumerate() {
                for (j, &g) in row.iter().enumerate() {
                    xp[(i / 2) * w + j / 2] += g;
                }
            }
        });
        Tensor::from_vec(dx, &with_hw(dy.shape(), h, w))
    })
}

/// For each output index along one axis: (i0, i1, weight of i0, weight of i1), as PyTorch's
/// bilinear interpolation with align_corners = false computes them.
fn taps(input: usize, output: usize) -> Vec<(usize, usize, f64, f64)> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f64;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

fn check_size(op: &'static str, h: usize, w: usize, oh: usize, ow: usize) -> Result<()> {
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::shape(
            op,
            format!("cannot resize {h}x{w} to {oh}x{ow}"),
        ));
    }
    Ok(())
}

/// Bilinear resize of the last two dims to (out_h, out_w): torch's
/// `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    const OP: &str = "resize_bilinear";
    let (_, h, w) = planes(OP, x)?;
    check_size(OP, h, w, out_h, out_w)?;
    // f32 on every target: it resizes attention maps, which stay f32 beside bf16 activations.
    crate::cuda::kernel_dispatch!([F32] x, m => crate::cuda::maps::resize_bilinear(m, x, out_h, out_w));
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let mut y = super::zeros::<T>(xv.len() / (h * w) * out_h * out_w);
        y.par_chunks_mut(out_h * out_w).zip(xv.par_chunks(h * w)).for_each(|(yp, xp)| {
            for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
                for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
                    let at = |yy: usize, xx: usize| xp[yy * w + xx];
                    yp[oy * out_w + ox] = T::of(wy0) * (T::of(wx0) * at(y0, x0) + T::of(wx1) * at(y0, x1))
                        + T::of(wy1) * (T::of(wx0) * at(y1, x0) + T::of(wx1) * at(y1, x1));
                }
            }
        });
        Tensor::from_vec(y, &with_hw(x.shape(), out_h, out_w))
    })
}

/// Gradient of `sum(resize_bilinear(x, ..) * dy)` with respect to `x` of spatial size (in_h, in_w).
pub fn resize_bilinear_backward(dy: &Tensor, in_h: usize, in_w: usize) -> Result<Tensor> {
    const OP: &str = "resize_bilinear_backward";
    let (_, oh, ow) = planes(OP, dy)?;
    check_size(OP, in_h, in_w, oh, ow)?;
    crate::cuda::kernel_dispatch!([F32] dy, m => crate::cuda::maps::resize_bilinear_backward(m, dy, in_h, in_w));
    let (ty, tx) = (taps(in_h, oh), taps(in_w, ow));
    float_dispatch!(OP, dy.dtype(), T => {
        let dv = dy.slice::<T>(OP)?;
        let mut dx = super::zeros::<T>(dv.len() / (oh * ow) * in_h * in_w);
        dx.par_chunks_mut(in_h * in_w).zip(dv.par_chunks(oh * ow)).for_each(|(xp, yp)| {
            for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
                for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
                    let g = yp[oy * ow + ox];
                    xp[y0 * in_w + x0] += T::of(wy0 * wx0) * g;
                    xp[y0 * in_w + x1] += T::of(wy0 * wx1) * g;
                    xp[y1 * in_w + x0] += T::of(wy1 * wx0) * g;
                    xp[y1 * in_w + x1] += T::of(wy1 * wx1) * g;
                }
            }
        });
        Tensor::from_vec(dx, &with_hw(dy.shape(), in_h, in_w))
    })
}
