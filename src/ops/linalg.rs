//! Matrix products: `matmul` (batched) and `linear` (torch.nn.Linear's layout), and the one GEMM
//! entry point every other op (convolution, attention) goes through.

use super::{float_dispatch, same_dtype, PAR_THRESHOLD};
use crate::{Error, Float, Result, Tensor};

/// How an operand is stored: as the matrix itself (row-major) or as its transpose.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    N,
    T,
}

/// A matrix inside a slice: element (i, j) at `i * rs + j * cs`.
pub(crate) struct Strided<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Strided<'a, T> {
    /// Rows `rs` apart, each contiguous.
    pub fn rows(data: &'a [T], rs: usize) -> Self {
        Strided { data, rs, cs: 1 }
    }

    /// A contiguous row-major (rows, cols) matrix, or its transpose when `layout` is `T` (then
    /// the slice holds the (cols, rows) matrix).
    fn contiguous(data: &'a [T], layout: Layout, rows: usize, cols: usize) -> Self {
        match layout {
            Layout::N => Strided::rows(data, cols),
            Layout::T => Strided::rows(data, rows).t(),
        }
    }

    /// The transpose: the same elements with rows and columns swapped.
    pub fn t(self) -> Self {
        Strided {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A mutable matrix inside a slice, as [`Strided`].
pub(crate) struct StridedMut<'a, T> {
    pub data: &'a mut [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> StridedMut<'a, T> {
    /// Rows `rs` apart, each contiguous.
    pub fn rows(data: &'a mut [T], rs: usize) -> Self {
        StridedMut { data, rs, cs: 1 }
    }
}

/// Whether a (rows, cols) matrix with these strides lies inside `len` elements.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `c = c + a @ b` (or `c = a @ b` without `accumulate`) for `a`: (m, k), `b`: (k, n),
/// `c`: (m, n), each with its own strides. Multithreaded above a size threshold. Panics if a
/// matrix does not fit its slice (a bug in the calling op, never a user error).
pub(crate) fn gemm_strided<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<T>,
    b: Strided<T>,
    c: StridedMut<T>,
    accumulate: bool,
) {
    let parallel = m * n * k >= PAR_THRESHOLD * 4 && rayon::current_num_threads() > 1;
    gemm_strided_with(m, n, k, a, b, c, accumulate, parallel)
}

/// `gemm_strided`, multithreaded only when `parallel` (false for callers that parallelise over
/// tiles themselves).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided_with<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<T>,
    b: Strided<T>,
    c: StridedMut<T>,
    accumulate: bool,
    parallel: bool,
) {
    assert!(
        fits(a.data.len(), m, k, a.rs, a.cs),
        "gemm: lhs out of bounds"
    );
    assert!(
        fits(b.data.len(), k, n, b.rs, b.cs),
        "gemm: rhs out of bounds"
    );
    assert!(
        fits(c.data.len(), m, n, c.rs, c.cs),
        "gemm: dst out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[i * c.rs + j * c.cs] = T::ZERO;
                }
            }
        }
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every matrix was checked to lie inside its slice; `c` is a distinct mutable
    // borrow, so it aliases neither `a` nor `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.cs as isize,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// `c = op(a) @ op(b)` (or `c += ...` with `accumulate`) with `op(a)`: (m, k), `op(b)`: (k, n),
/// all stored contiguously row-major, `op` the identity (`N`) or a transpose (`T`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    la: Layout,
    b: &[T],
    lb: Layout,
    c: &mut [T],
    accumulate: bool,
) {
    gemm_with(m, n, k, a, la, b, lb, c, accumulate, None)
}

/// [`gemm`] with a say over threading: `Some(false)` for callers that parallelise over blocks
/// themselves; `None` decides by size, as [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_with<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    la: Layout,
    b: &[T],
    lb: Layout,
    c: &mut [T],
    accumulate: bool,
    parallel: Option<bool>,
) {
    let a = Strided::contiguous(a, la, m, k);
    let b = Strided::contiguous(b, lb, k, n);
    let c = StridedMut::rows(c, n);
    match parallel {
        None => gemm_strided(m, n, k, a, b, c, accumulate),
        Some(p) => gemm_strided_with(m, n, k, a, b, c, accumulate, p),
    }
}

/// Split `shape` into (batch dims, rows, cols) for a matrix operand.
fn matrix_dims<'a>(
    op: &'static str,
    what: &str,
    t: &'a Tensor,
) -> Result<(&'a [usize], usize, usize)> {
    let s = t.shape();
    if s.len() < 2 {
        return Err(Error::shape(
            op,
            format!("{what} must have rank >= 2, got {s:?}"),
        ));
    }
    Ok((&s[..s.len() - 2], s[s.len() - 2], s[s.len() - 1]))
}

/// `a @ b` for `a`: (..., m, k) and `b`: (..., k, n) with identical batch dims, or `b`: (k, n)
/// shared by every batch entry.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul";
    same_dtype(OP, a, b)?;
    let (batch, m, k) = matrix_dims(OP, "a", a)?;
    let (bbatch, k2, n) = matrix_dims(OP, "b", b)?;
    if k != k2 || (!bbatch.is_empty() && bbatch != batch) {
        return Err(Error::shape(
            OP,
            format!("a {:?} @ b {:?}", a.shape(), b.shape()),
        ));
    }
    let nb: usize = batch.iter().product();
    let shared_b = bbatch.is_empty();
    let mut shape = batch.to_vec();
    shape.extend([m, n]);
    float_dispatch!(OP, a.dtype(), T => {
        let (av, bv) = (a.slice::<T>(OP)?, b.slice::<T>(OP)?);
        let mut out = super::zeros::<T>(nb * m * n);
        if shared_b {
            // One GEMM over all batch rows at once.
            gemm(nb * m, n, k, av, Layout::N, bv, Layout::N, &mut out, false);
        } else {
            for i in 0..nb {
                gemm(m, n, k, &av[i * m * k..], Layout::N, &bv[i * k * n..], Layout::N,
                     &mut out[i * m * n..], false);
            }
        }
        Tensor::from_vec(out, &shape)
    })
}

/// Gradients of `sum(matmul(a, b) * dc)`: `(da, db)`.
pub fn matmul_backward(a: &Tensor, b: &Tensor, dc: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "matmul_backward";
    same_dtype(OP, a, b)?;
    same_dtype(OP, a, dc)?;
    let (batch, m, k) = matrix_dims(OP, "a", a)?;
    let (bbatch, _, n) = matrix_dims(OP, "b", b)?;
    let mut cshape = batch.to_vec();
    cshape.extend([m, n]);
    if dc.shape() != cshape {
        return Err(Error::shape(
            OP,
            format!("dc {:?}, expected {cshape:?}", dc.shape()),
        ));
    }
    let nb: usize = batch.iter().product();
    let shared_b = bbatch.is_empty();
    float_dispatch!(OP, a.dtype(), T => {
        let (av, bv, dcv) = (a.slice::<T>(OP)?, b.slice::<T>(OP)?, dc.slice::<T>(OP)?);
        let mut da = super::zeros::<T>(av.len());
        let mut db = super::zeros::<T>(bv.len());
        if shared_b {
            gemm(nb * m, k, n, dcv, Layout::N, bv, Layout::T, &mut da, false);
            gemm(k, n, nb * m, av, Layout::T, dcv, Layout::N, &mut db, false);
        } else {
            for i in 0..nb {
                let dci = &dcv[i * m * n..];
                gemm(m, k, n, dci, Layout::N, &bv[i * k * n..], Layout::T, &mut da[i * m * k..], false);
                gemm(k, n, m, &av[i * m * k..], Layout::T, dci, Layout::N, &mut db[i * k * n..], false);
            }
        }
        Ok((Tensor::from_vec(da, a.shape())?, Tensor::from_vec(db, b.shape())?))
    })
}

/// `x @ w^T + b` for `x`: (..., in), `w`: (out, in), `b`: (out) — torch.nn.Linear's layout, so
/// checkpoint weights load without transposing.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let (rows, inf, outf) = linear_dims(OP, x, w, b)?;
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::gemm::linear(m, x, w, b));
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = outf;
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, wv) = (x.slice::<T>(OP)?, w.slice::<T>(OP)?);
        let mut out = match b {
            Some(b) => super::repeated(rows * outf, b.slice::<T>(OP)?),
            None => super::zeros::<T>(rows * outf),
        };
        gemm(rows, outf, inf, xv, Layout::N, wv, Layout::T, &mut out, b.is_some());
        Tensor::from_vec(out, &shape)
    })
}

/// Gradients of `sum(linear(x, w, b) * dy)`.
pub struct LinearGrads {
    pub dx: Tensor,
    /// Present when asked for (`weight_grads`).
    pub dw: Option<Tensor>,
    /// Present when asked for; the bias gradient does not depend on whether the forward had one.
    pub db: Option<Tensor>,
}

pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    weight_grads: bool,
) -> Result<LinearGrads> {
    const OP: &str = "linear_backward";
    let (rows, inf, outf) = linear_dims(OP, x, w, None)?;
    same_dtype(OP, x, dy)?;
    let mut yshape = x.shape().to_vec();
    *yshape.last_mut().expect("rank >= 1") = outf;
    if dy.shape() != yshape {
        return Err(Error::shape(
            OP,
            format!("dy {:?}, expected {yshape:?}", dy.shape()),
        ));
    }
    if !weight_grads {
        crate::cuda::kernel_dispatch!(x, m => Ok(LinearGrads {
            dx: crate::cuda::gemm::linear_backward_input(m, x, w, dy)?,
            dw: None,
            db: None,
        }));
    } else if crate::cuda::target(x, &[crate::DType::BF16]).is_some() {
        return Err(crate::cuda::no_kernel(OP, "weight gradients"));
    }
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, wv, dyv) = (x.slice::<T>(OP)?, w.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let mut dx = super::zeros::<T>(rows * inf);
        gemm(rows, inf, outf, dyv, Layout::N, wv, Layout::N, &mut dx, false);
        let dx = Tensor::from_vec(dx, x.shape())?;
        if !weight_grads {
            return Ok(LinearGrads { dx, dw: None, db: None });
        }
        let mut dw = super::zeros::<T>(outf * inf);
        gemm(outf, inf, rows, dyv, Layout::T, xv, Layout::N, &mut dw, false);
        let mut db = super::zeros::<T>(outf);
        for r in dyv.chunks(outf) {
            db.iter_mut().zip(r).for_each(|(d, &g)| *d += g);
        }
        Ok(LinearGrads {
            dx,
            dw: Some(Tensor::from_vec(dw, w.shape())?),
            db: Some(Tensor::from_vec(db, &[outf])?),
        })
    })
}

/// (rows, in_features, out_features) of a linear layer, after checking every shape.
fn linear_dims(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<(usize, usize, usize)> {
    same_dtype(op, x, w)?;
    if w.rank() != 2 || x.rank() < 1 || x.shape()[x.rank() - 1] != w.shape()[1] {
        return Err(Error::shape(
            op,
            format!(
                "x {:?} does not fit weight {:?} (out, in)",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let (outf, inf) = (w.shape()[0], w.shape()[1]);
    if let Some(b) = b {
        same_dtype(op, x, b)?;
        if b.shape() != [outf] {
            return Err(Error::shape(
                op,
                format!("bias {:?}, expected [{outf}]", b.shape()),
            ));
        }
    }
    Ok((x.numel() / inf.max(1), inf, outf))
}
