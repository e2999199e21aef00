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

/// Elements of a run of rows in the backward (`Rows::backward`).
const ROW_RUN: usize = 1 << 14;

/// Elements summed in the working precision before the partial sum joins an f64 total.
const SUM_BLOCK: usize = 256;

/// sum(f(a, b)) over two slices of one length in f64 precision at f32 speed: blocks of
/// SUM_BLOCK summed in 8 interleaved lanes of `T` (which the compiler vectorises), each block's
/// sum added in f64. A VAE group holds ~1M elements at 512 px, where a plain f32 sum drifts by
/// ~1e-4; a block's f32 sum is off by ~SUM_BLOCK/8 ulp at most.
fn sum2_f64<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    let mut total = 0.0;
    for (ab, bb) in a.chunks(SUM_BLOCK).zip(b.chunks(SUM_BLOCK)) {
        let mut lanes = [T::ZERO; 8];
        let (mut ia, mut ib) = (ab.chunks_exact(8), bb.chunks_exact(8));
        for (va, vb) in (&mut ia).zip(&mut ib) {
            for (l, (&x, &y)) in lanes.iter_mut().zip(va.iter().zip(vb)) {
                *l += f(x, y);
            }
        }
        let tail = ia
            .remainder()
            .iter()
            .zip(ib.remainder())
            .fold(T::ZERO, |s, (&x, &y)| s + f(x, y));
        total += lanes.iter().fold(tail, |s, &l| s + l).to_f64();
    }
    total
}

/// sum(f(x)) as [`sum2_f64`].
fn sum_f64<T: Float>(x: &[T], f: impl Fn(T) -> T) -> f64 {
    sum2_f64(x, x, |v, _| f(v))
}

impl Rows {
    /// The first affine parameter of row `row`: a row covers parameters p0 .. p0 + n / per,
    /// each for `per` consecutive elements.
    fn first_param(&self, row: usize) -> usize {
        (row % self.blocks) * (self.n / self.per)
    }

    /// (mean, 1/sqrt(var + eps)) of one row; the mean is 0 for RMS norm.
    fn stats<T: Float>(&self, x: &[T]) -> (T, T) {
        let n = self.n as f64;
        let mean = if self.center {
            sum_f64(x, |v| v) / n
        } else {
            0.0
        };
        let m = T::of(mean);
        let var = sum_f64(x, |v| (v - m) * (v - m)) / n;
        (m, T::of(1.0 / (var + self.eps).sqrt()))
    }

    /// A row's `gamma` and `beta`, ones and zeros where absent.
    fn row_params<'a, T: Float>(&self, r: usize, p: Option<&'a [T]>, absent: &'a [T]) -> &'a [T] {
        let p0 = self.first_param(r);
        p.map_or(absent, |p| &p[p0..p0 + self.n / self.per])
    }

    fn forward<T: Float>(&self, x: &[T], gamma: Option<&[T]>, beta: Option<&[T]>) -> Vec<T> {
        let (no_gamma, no_beta) = (
            vec![T::ONE; self.n / self.per],
            vec![T::ZERO; self.n / self.per],
        );
        super::made_in_chunks(x.len(), self.n, |r, yr: &mut [T]| {
            let xr = &x[r * self.n..(r + 1) * self.n];
            let (mean, rstd) = self.stats(xr);
            let (g, b) = (
                self.row_params(r, gamma, &no_gamma),
                self.row_params(r, beta, &no_beta),
            );
            // y = (x - mean) * rstd * gamma + beta: an element at a time where each has its
            // own parameters (layer and RMS norm), else a run of `per` at a time.
            if self.per == 1 {
                for (((o, &v), &gi), &bi) in yr.iter_mut().zip(xr).zip(g).zip(b) {
                    *o = (v - mean) * rstd * gi + bi;
                }
                return;
            }
            for (((yc, xc), &gi), &bi) in yr
                .chunks_mut(self.per)
                .zip(xr.chunks(self.per))
                .zip(g)
                .zip(b)
            {
                let a = rstd * gi;
                yc.iter_mut()
                    .zip(xc)
                    .for_each(|(o, &v)| *o = (v - mean) * a + bi);
            }
        })
    }

    /// dx, and the per-parameter sums (sum dy * xhat, sum dy) for the affine gradients.
    fn backward<T: Float>(
        &self,
        x: &[T],
        gamma: Option<&[T]>,
        dy: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (nparams, row_params) = (self.blocks * self.n / self.per, self.n / self.per);
        let mut dx = super::zeros::<T>(x.len());
        let n = T::of(self.n as f64);
        let no_gamma = vec![T::ONE; row_params];
        // Row r's dx, and its parameter gradients added to (dgamma, dbeta).
        let row_backward =
            |dgamma: &mut [T], dbeta: &mut [T], r: usize, dxr: &mut [T], xr: &[T], dyr: &[T]| {
                let (mean, rstd) = self.stats(xr);
                let g = self.row_params(r, gamma, &no_gamma);
                let p0 = self.first_param(r);
                // With xhat = (x - mean) * rstd and dxhat = dy * gamma:
                // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
                // A parameter's sum(dy) and sum(dy * xhat) are its bias and scale gradients.
                let stat_means =
                    |s1: T, s2: T| (if self.center { s1 / n } else { T::ZERO }, s2 / n);
                if self.per == 1 {
                    // An element a parameter: dxhat is kept in dx until dx is known.
                    let (dg, db) = (&mut dgamma[p0..p0 + self.n], &mut dbeta[p0..p0 + self.n]);
                    for (((((o, &v), &d), &gi), dgi), dbi) in
                        dxr.iter_mut().zip(xr).zip(dyr).zip(g).zip(dg).zip(db)
                    {
                        *o = d * gi;
                        *dgi += d * (v - mean) * rstd;
                        *dbi += d;
                    }
                    let s1 = T::of(sum_f64(dxr, |dh| dh));
                    let s2 = T::of(sum2_f64(xr, dxr, |v, dh| dh * (v - mean))) * rstd;
                    let (m1, m2) = stat_means(s1, s2);
                    for (o, &v) in dxr.iter_mut().zip(xr) {
                        *o = rstd * (*o - m1 - (v - mean) * rstd * m2);
                    }
                    return;
                }
                let (mut s1, mut s2) = (T::ZERO, T::ZERO);
                for (j, (xc, dyc)) in xr.chunks(self.per).zip(dyr.chunks(self.per)).enumerate() {
                    let sd = T::of(sum_f64(dyc, |d| d));
                    let sdx = T::of(sum2_f64(xc, dyc, |v, d| d * (v - mean))) * rstd;
                    s1 += g[j] * sd;
                    s2 += g[j] * sdx;
                    dbeta[p0 + j] += sd;
                    dgamma[p0 + j] += sdx;
                }
                let (m1, m2) = stat_means(s1, s2);
                for (((dxc, xc), dyc), &gi) in dxr
                    .chunks_mut(self.per)
                    .zip(xr.chunks(self.per))
                    .zip(dyr.chunks(self.per))
                    .zip(g)
                {
                    for (o, (&v, &d)) in dxc.iter_mut().zip(xc.iter().zip(dyc)) {
                        *o = rstd * (d * gi - m1 - (v - mean) * rstd * m2);
                    }
                }
            };
        // Rows go in runs of `run` (at least ROW_RUN elements); each run sums its rows' parameter
        // gradients, and the runs' sums are added in order: the same summation order on any
        // number of threads, so that training stays bit-reproducible.
        let run = ROW_RUN.div_ceil(self.n).max(1);
        let per_run: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(self.n * run)
            .zip(x.par_chunks(self.n * run).zip(dy.par_chunks(self.n * run)))
            .enumerate()
            .map(|(k, (dxk, (xk, dyk)))| {
                let (mut dg, mut db) = (vec![T::ZERO; nparams], vec![T::ZERO; nparams]);
                let rows = dxk
                    .chunks_mut(self.n)
                    .zip(xk.chunks(self.n).zip(dyk.chunks(self.n)));
                for (i, (dxr, (xr, dyr))) in rows.enumerate() {
                    row_backward(&mut dg, &mut db, k * run + i, dxr, xr, dyr);
                }
                (dg, db)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![T::ZERO; nparams], vec![T::ZERO; nparams]);
        for (g, b) in &per_run {
            dgamma.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
            dbeta.iter_mut().zip(b).for_each(|(a, &v)| *a += v);
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
    if x.rank() < 2 || groups == 0 || !x.shape()[1].is_multiple_of(groups) {
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
