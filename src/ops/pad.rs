//! Constant zero padding of the last two dims, possibly asymmetric: diffusers' `Downsample2D`
//! with `padding=0` (the VAE encoder's) pads right and bottom by one before its stride-2 conv,
//! which a symmetric conv padding cannot express.

use rayon::prelude::*;

use super::float_dispatch;
use super::resize::{planes, with_hw};
use crate::{Error, Result, Tensor};

/// Zeros added on each side of the last two dims (torch's `F.pad(x, (left, right, top, bottom))`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pad2d {
    pub left: usize,
    pub right: usize,
    pub top: usize,
    pub bottom: usize,
}

/// `x` (..., H, W) -> (..., top + H + bottom, left + W + right), zeros around the input.
pub fn pad2d(x: &Tensor, p: Pad2d) -> Result<Tensor> {
    const OP: &str = "pad2d";
    let (n, h, w) = planes(OP, x)?;
    let (ho, wo) = (p.top + h + p.bottom, p.left + w + p.right);
    crate::cuda::kernel_dispatch!([BF16, F32] x, m => crate::cuda::elementwise::pad2d(m, x, p));
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let mut y = super::zeros::<T>(n * ho * wo);
        if h * w > 0 {
            y.par_chunks_mut(ho * wo).zip(xv.par_chunks(h * w)).for_each(|(yp, xp)| {
                for (i, row) in xp.chunks(w).enumerate() {
                    let start = (p.top + i) * wo + p.left;
                    yp[start..start + w].copy_from_slice(row);
                }
            });
        }
        Tensor::from_vec(y, &with_hw(x.shape(), ho, wo))
    })
}

/// Gradient of `sum(pad2d(x, p) * dy)` with respect to `x`: `dy` with the padding cropped off.
pub fn pad2d_backward(dy: &Tensor, p: Pad2d) -> Result<Tensor> {
    const OP: &str = "pad2d_backward";
    let (n, ho, wo) = planes(OP, dy)?;
    if ho < p.top + p.bottom || wo < p.left + p.right {
        return Err(Error::shape(
            OP,
            format!("dy {:?} is smaller than the padding {p:?}", dy.shape()),
        ));
    }
    let (h, w) = (ho - p.top - p.bottom, wo - p.left - p.right);
    float_dispatch!(OP, dy.dtype(), T => {
        let dv = dy.slice::<T>(OP)?;
        let mut dx = super::zeros::<T>(n * h * w);
        if h * w > 0 {
            dx.par_chunks_mut(h * w).zip(dv.par_chunks(ho * wo)).for_each(|(xp, yp)| {
                for (i, row) in xp.chunks_mut(w).enumerate() {
                    let start = (p.top + i) * wo + p.left;
                    row.copy_from_slice(&yp[start..start + w]);
                }
            });
        }
        Tensor::from_vec(dx, &with_hw(dy.shape(), h, w))
    })
}
