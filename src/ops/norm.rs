//! Normalisations: group norm (UNet, VAE), layer norm (transformers, classifier) and RMS norm
//! (FLUX's QK-norm, T5). One row-wise core serves all three: a "row" is the set of elements that
//! share a mean and variance, and each element maps to an affine parameter.

use rayon::prelude::*;

use super::{float_dispatch, same_dtype, same_shape};
use crate::{Error, Float, Result, Tensor};

/// The structure of one normalisation, independent of dtype.
/// The CUDA kernel (kernels/norm.cu) takes the same description.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    /// Elements per row.
    pub n: usize,
    /// Consecutive elements sharing one affine parameter (spatial size for group norm, else 1).
    pub per: usize,
    /// Rows cycle through this many parameter blocks (the groups of group norm, else 1).
    pub blocks: usize,
    /// Subtract the mean (layer and group norm) or not (RMS norm).
    pub center: bool,
    pub eps: f64,
}

impl Rows {
    fn param(&self, row: usize, i: usize) -> usize {
        (row % self.blocks) * (self.n / self.per) + i / self.per
    }

    /// (mean, 1/sqrt(var + eps)) of one row; the mean is 0 for RMS norm. Accumulated in f64:
    /// a VAE group holds ~1M elements at 512 px, where f32 sums drift by ~1e-4.
    fn stats<T: Float>(&self, x: &[T]) -> (T, T) {
        let n = self.n as f64;
        let mean = if self.center {
            x.iter().map(|v| v.to_f64()).sum::<f64>() / n
        } else {
            0.0
        };
        let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
        (T::of(mean), T::of(1.0 / (var + self.eps).sqrt()))
    }

    fn forward<T: Float>(&self, x: &[T], gamma: Option<&[T]>, beta: Option<&[T]>) -> Vec<T> {
        let mut y = vec![T::ZERO; x.len()];
        y.par_chunks_mut(self.n)
            .zip(x.par_chunks(self.n))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let (mean, rstd) = self.stats(xr);
                for (i, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                    let p = self.param(r, i);
                    let g = gamma.map_or(T::ONE, |g| g[p]);
                    let b = beta.map_or(T::ZERO, |b| b[p]);
                    *o = (v - mean) * rstd * g + b;
                }
            });
        y
    }

    /// dx, and the per-parameter sums (sum dy * xhat, sum dy) for the affine gradients.
    fn backward<T: Float>(
        &self,
        x: &[T],
        gamma: Option<&[T]>,
        dy: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let nparams = self.blocks * self.n / self.per;
        let mut dx = vec![T::ZERO; x.len()];
        let n = T::of(self.n as f64);
        let stats: Vec<(T, T)> = dx
            .par_chunks_mut(self.n)
            .zip(x.par_chunks(self.n).zip(dy.par_chunks(self.n)))
            .enumerate()
            .map(|(r, (dxr, (xr, dyr)))| {
                let (mean, rstd) = self.stats(xr);
                let g = |i: usize| gamma.map_or(T::ONE, |g| g[self.param(r, i)]);
                // With xhat = (x - mean) * rstd and dxhat = dy * gamma:
                // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
                let (mut s1, mut s2) = (T::ZERO, T::ZERO);
                for (i, (&v, &d)) in xr.iter().zip(dyr).enumerate() {
                    let dxh = d * g(i);
                    s1 += dxh;
                    s2 += dxh * (v - mean) * rstd;
                }
                let m1 = if self.center { s1 / n } else { T::ZERO };
                let m2 = s2 / n;
                for (i, (o, (&v, &d))) in dxr.iter_mut().zip(xr.iter().zip(dyr)).enumerate() {
                    *o = rstd * (d * g(i) - m1 - (v - mean) * rstd * m2);
                }
                (mean, rstd)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![T::ZERO; nparams], vec![T::ZERO; nparams]);
        for (r, (xr, dyr)) in x.chunks(self.n).zip(dy.chunks(self.n)).enumerate() {
            let (mean, rstd) = stats[r];
            for (i, (&v, &d)) in xr.iter().zip(dyr).enumerate() {
                let p = self.param(r, i);
                dgamma[p] += d * (v - mean) * rstd;
                dbeta[p] += d;
            }
        }
        (dx, dgamma, dbeta)
    }
}

/// Gradients of a normalisation: to the input, and to its affine parameters when it has them.
pub struct NormGrads {
    pub dx: Tensor,
    pub dgamma: Option<Tensor>,
    pub dbeta: Option<Tensor>,
}

fn check_param(
    op: &'static str,
    what: &str,
    x: &Tensor,
    p: Option<&Tensor>,
    len: usize,
) -> Result<()> {
    if let Some(p) = p {
        same_dtype(op, x, p)?;
        if p.shape() != [len] {
            return Err(Error::shape(
                op,
                format!("{what} {:?}, expected [{len}]", p.shape()),
            ));
        }
    }
    Ok(())
}

fn run_forward(
    op: &'static str,
    rows: Rows,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
) -> Result<Tensor> {
    float_dispatch!(op, x.dtype(), T => {
        let g = gamma.map(|g| g.slice::<T>(op)).transpose()?;
        let b = beta.map(|b| b.slice::<T>(op)).transpose()?;
        Tensor::from_vec(rows.forward(x.slice::<T>(op)?, g, b), x.shape())
    })
}

fn run_backward(
    op: &'static str,
    rows: Rows,
    x: &Tensor,
    gamma: Option<&Tensor>,
    has_beta: bool,
    dy: &Tensor,
) -> Result<NormGrads> {
    same_shape(op, x, dy)?;
    float_dispatch!(op, x.dtype(), T => {
        let g = gamma.map(|g| g.slice::<T>(op)).transpose()?;
        let (dx, dg, db) = rows.backward(x.slice::<T>(op)?, g, dy.slice::<T>(op)?);
        let len = dg.len();
        Ok(NormGrads {
            dx: Tensor::from_vec(dx, x.shape())?,
            dgamma: gamma.map(|_| Tensor::from_vec(dg, &[len])).transpose()?,
            dbeta: if has_beta { Some(Tensor::from_vec(db, &[len])?) } else { None },
        })
    })
}

fn group_rows(op: &'static str, x: &Tensor, groups: usize, eps: f64) -> Result<Rows> {
    if x.rank() < 2 || groups == 0 || x.shape()[1] % groups != 0 {
        return Err(Error::shape(
            op,
            format!(
                "x {:?} must be (B, C, ...) with C divisible by {groups} groups",
                x.shape()
            ),
        ));
    }
    let c = x.shape()[1];
    let spatial: usize = x.shape()[2..].iter().product();
    if spatial == 0 {
        return Err(Error::shape(
            op,
            format!("x {:?} has nothing to normalise", x.shape()),
        ));
    }
    Ok(Rows {
        n: c / groups * spatial,
        per: spatial,
        blocks: groups,
        center: true,
        eps,
    })
}

fn last_dim_rows(op: &'static str, x: &Tensor, center: bool, eps: f64) -> Result<Rows> {
    let Some(&d) = x.shape().last() else {
        return Err(Error::shape(op, "x must have rank >= 1, got a scalar"));
    };
    if d == 0 {
        return Err(Error::shape(
            op,
            format!("x {:?} has nothing to normalise", x.shape()),
        ));
    }
    Ok(Rows {
        n: d,
        per: 1,
        blocks: 1,
        center,
        eps,
    })
}

/// torch.nn.GroupNorm: `x`: (B, C, ...), statistics over each group of C/groups channels and
/// all spatial positions; `gamma`, `beta`: (C).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "group_norm";
    let rows = group_rows(OP, x, groups, eps)?;
    check_param(OP, "gamma", x, gamma, x.shape()[1])?;
    check_param(OP, "beta", x, beta, x.shape()[1])?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::norm::norm(m, OP, x, &rows, gamma, beta));
    run_forward(OP, rows, x, gamma, beta)
}

/// Gradients of `sum(group_norm(x, ...) * dy)`; `dgamma`/`dbeta` are present when the forward
/// had `gamma`/`beta` (on host tensors; on a GPU only `dx` is computed).
pub fn group_norm_backward(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    has_beta: bool,
    eps: f64,
    dy: &Tensor,
) -> Result<NormGrads> {
    const OP: &str = "group_norm_backward";
    let rows = group_rows(OP, x, groups, eps)?;
    check_param(OP, "gamma", x, gamma, x.shape()[1])?;
    super::same_shape(OP, x, dy)?;
    // On a GPU only the input gradient (the frozen-model path): no parameter gradients.
    crate::cuda::kernel_dispatch!(x, m => Ok(NormGrads {
        dx: crate::cuda::norm::norm_backward(m, OP, x, &rows, gamma, dy)?,
        dgamma: None,
        dbeta: None,
    }));
    run_backward(OP, rows, x, gamma, has_beta, dy)
}

/// torch.nn.LayerNorm over the last dimension; `gamma`, `beta`: (D), each optional.
pub fn layer_norm(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let rows = last_dim_rows(OP, x, true, eps)?;
    check_param(OP, "gamma", x, gamma, rows.n)?;
    check_param(OP, "beta", x, beta, rows.n)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::norm::norm(m, OP, x, &rows, gamma, beta));
    run_forward(OP, rows, x, gamma, beta)
}

pub fn layer_norm_backward(
    x: &Tensor,
    gamma: Option<&Tensor>,
    has_beta: bool,
    eps: f64,
    dy: &Tensor,
) -> Result<NormGrads> {
    const OP: &str = "layer_norm_backward";
    let rows = last_dim_rows(OP, x, true, eps)?;
    check_param(OP, "gamma", x, gamma, rows.n)?;
    super::same_shape(OP, x, dy)?;
    // On a GPU only the input gradient (the frozen-model path): no parameter gradients.
    crate::cuda::kernel_dispatch!(x, m => Ok(NormGrads {
        dx: crate::cuda::norm::norm_backward(m, OP, x, &rows, gamma, dy)?,
        dgamma: None,
        dbeta: None,
    }));
    run_backward(OP, rows, x, gamma, has_beta, dy)
}

/// RMS norm over the last dimension: `x * rsqrt(mean(x^2) + eps) * weight` (diffusers RMSNorm,
/// T5LayerNorm); `weight`: (D), optional.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let rows = last_dim_rows(OP, x, false, eps)?;
    check_param(OP, "weight", x, weight, rows.n)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::norm::norm(m, OP, x, &rows, weight, None));
    run_forward(OP, rows, x, weight, None)
}

/// Gradients of `sum(rms_norm(x, weight) * dy)`: `dx`, and `dgamma` (the weight's) when given.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    eps: f64,
    dy: &Tensor,
) -> Result<NormGrads> {
    const OP: &str = "rms_norm_backward";
    let rows = last_dim_rows(OP, x, false, eps)?;
    check_param(OP, "weight", x, weight, rows.n)?;
    super::same_shape(OP, x, dy)?;
    // On a GPU only the input gradient (the frozen-model path): no parameter gradients.
    crate::cuda::kernel_dispatch!(x, m => Ok(NormGrads {
        dx: crate::cuda::norm::norm_backward(m, OP, x, &rows, weight, dy)?,
        dgamma: None,
        dbeta: None,
    }));
    run_backward(OP, rows, x, weight, false, dy)
}
