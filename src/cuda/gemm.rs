//! Host side of kernels/gemm.cu: linear layers and convolutions (im2col + the tensor-core GEMM),
//! for any [`Memory`]. Shapes are checked by the `ops` functions that dispatch here.

use half::bf16;

use super::launch::{Arg, KernelCall};
use super::memory::{optional_bf16_addr, Memory};
use crate::error::{Error, Result};
use crate::ops::Conv2dParams;
use crate::Tensor;

const MODULE: &str = "gemm";
const TILE: usize = 64;

/// How gemm_bt reads B: element (n, k) at b[n * ldb_n + k * ldb_k].
#[derive(Clone, Copy)]
pub(super) enum BLayout {
    /// A weight (out, in) as is: B = W, strides (in, 1).
    Rows { k: usize },
    /// A weight (out, in) read as its transpose, for input gradients: B = W^T, strides (1, in).
    Transposed { inner: usize },
}

/// C = A B^T + bias into `c` (bf16 addresses): A (m, k) row-major, B (n, k) as `layout` says;
/// with `hw` > 0 C is NCHW.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_bt<M: Memory>(
    m: &M,
    c: u64,
    a: u64,
    b: u64,
    layout: BLayout,
    bias: u64,
    dims: (usize, usize, usize),
    hw: usize,
) -> Result<()> {
    let (rows, n, k) = dims;
    // The grid's y dimension (row tiles) is at most 65535 on every GPU.
    if rows.div_ceil(TILE) > 65535 {
        return Err(Error::shape(
            "gemm",
            format!("{rows} rows: at most {} in one product", 65535 * TILE),
        ));
    }
    let (ldb_n, ldb_k) = match layout {
        BLayout::Rows { k } => (k, 1),
        BLayout::Transposed { inner } => (1, inner),
    };
    for (what, v) in [("rows", rows), ("outputs", n), ("inputs", k)] {
        if v > i32::MAX as usize {
            return Err(Error::shape(
                "gemm",
                format!("{v} {what}: at most 2^31 - 1"),
            ));
        }
    }
    m.launch(&KernelCall {
        module: MODULE,
        name: "gemm_bt",
        grid: [n.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1],
        block: [128, 1, 1],
        smem: 0,
        args: vec![
            Arg::Ptr(c),
            Arg::Ptr(a),
            Arg::Ptr(b),
            Arg::Ptr(bias),
            Arg::I32(rows as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I64(ldb_n as i64),
            Arg::I64(ldb_k as i64),
            Arg::I32(hw as i32),
        ],
    })
}

/// A fresh (rows, n) product A B^T + bias (NCHW with `hw` > 0): see `gemm_bt`.
#[allow(clippy::too_many_arguments)]
fn times_weight<M: Memory>(
    m: &M,
    a: u64,
    b: u64,
    layout: BLayout,
    bias: u64,
    dims: (usize, usize, usize),
    hw: usize,
) -> Result<M::Buf<bf16>> {
    let (rows, n, _) = dims;
    let mut c = m.zeros::<bf16>(rows * n)?;
    if rows * n > 0 {
        gemm_bt(m, m.addr_mut(&mut c), a, b, layout, bias, dims, hw)?;
    }
    Ok(c)
}

/// `ops::linear`: x (..., in) with w (out, in) and bias (out).
pub(crate) fn linear<M: Memory>(
    m: &M,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "linear";
    let (outf, inf) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / inf.max(1);
    let (xa, wa) = (m.tensor_addr::<bf16>(OP, x)?, m.tensor_addr::<bf16>(OP, w)?);
    let ba = optional_bf16_addr(m, OP, b)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = outf;
    let out = times_weight(
        m,
        xa,
        wa,
        BLayout::Rows { k: inf },
        ba,
        (rows, outf, inf),
        0,
    )?;
    m.tensor(out, &shape)
}

/// `ops::conv2d`: x (B, C, H, W), w (O, C, kh, kw), bias (O).
pub(crate) fn conv2d<M: Memory>(
    m: &M,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let (g, o) = (Geometry::new(x, w, p), w.shape()[0]);
    let (xa, wa) = (m.tensor_addr::<bf16>(OP, x)?, m.tensor_addr::<bf16>(OP, w)?);
    let ba = optional_bf16_addr(m, OP, b)?;
    let (rows, kdim) = (g.rows(), g.kdim());
    let mut col = m.zeros::<bf16>(rows * kdim)?;
    patches(m, "im2col", m.addr_mut(&mut col), xa, &g, rows * kdim)?;
    let ca = m.addr(&col);
    let out = times_weight(
        m,
        ca,
        wa,
        BLayout::Rows { k: kdim },
        ba,
        (rows, o, kdim),
        g.oh * g.ow,
    )?;
    m.tensor(out, &[g.batch, o, g.oh, g.ow])
}

/// A convolution's geometry, as im2col and col2im take it.
struct Geometry {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// x (B, C, H, W) and w (O, C, kh, kw), as `ops::conv2d` checked them.
    fn new(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Geometry {
        let (s, ws) = (x.shape(), w.shape());
        let (h, wd, kh, kw) = (s[2], s[3], ws[2], ws[3]);
        Geometry {
            batch: s[0],
            c: s[1],
            h,
            w: wd,
            kh,
            kw,
            p,
            oh: (h + 2 * p.padding - kh) / p.stride + 1,
            ow: (wd + 2 * p.padding - kw) / p.stride + 1,
        }
    }

    /// Rows of the patch matrix (output pixels of all images).
    fn rows(&self) -> usize {
        self.batch * self.oh * self.ow
    }

    /// Columns of the patch matrix (one patch).
    fn kdim(&self) -> usize {
        self.c * self.kh * self.kw
    }
}

/// im2col (x -> col) or col2im (col -> x) over `n` output elements.
fn patches<M: Memory>(
    m: &M,
    name: &'static str,
    dst: u64,
    src: u64,
    g: &Geometry,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    m.launch(&KernelCall::grid_stride(
        MODULE,
        name,
        n,
        vec![
            Arg::Ptr(dst),
            Arg::Ptr(src),
            Arg::I32(g.c as i32),
            Arg::I32(g.h as i32),
            Arg::I32(g.w as i32),
            Arg::I32(g.kh as i32),
            Arg::I32(g.kw as i32),
            Arg::I32(g.p.stride as i32),
            Arg::I32(g.p.padding as i32),
            Arg::I32(g.oh as i32),
            Arg::I32(g.ow as i32),
            Arg::U64(n as u64),
        ],
    ))
}

/// The input gradient of `ops::linear`: dx = dy w, (..., out) -> (..., in).
pub(crate) fn linear_backward_input<M: Memory>(
    m: &M,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "linear_backward";
    let (outf, inf) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / inf.max(1);
    let (da, wa) = (
        m.tensor_addr::<bf16>(OP, dy)?,
        m.tensor_addr::<bf16>(OP, w)?,
    );
    let layout = BLayout::Transposed { inner: inf };
    let dx = times_weight(m, da, wa, layout, 0, (rows, inf, outf), 0)?;
    m.tensor(dx, x.shape())
}

/// The input gradient of `ops::conv2d`: dy's rows (pixels x out channels) times the weight give
/// each patch's gradient, which col2im gathers back onto the input pixels.
pub(crate) fn conv2d_backward_input<M: Memory>(
    m: &M,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_backward";
    let (g, o) = (Geometry::new(x, w, p), w.shape()[0]);
    let (rows, kdim) = (g.rows(), g.kdim());
    let dy_rows = super::elementwise::permute(m, dy, &[0, 2, 3, 1])?;
    let (da, wa) = (
        m.tensor_addr::<bf16>(OP, &dy_rows)?,
        m.tensor_addr::<bf16>(OP, w)?,
    );
    let layout = BLayout::Transposed { inner: kdim };
    let dcol = times_weight(m, da, wa, layout, 0, (rows, kdim, o), 0)?;
    let mut dx = m.zeros::<bf16>(x.numel())?;
    patches(
        m,
        "col2im",
        m.addr_mut(&mut dx),
        m.addr(&dcol),
        &g,
        x.numel(),
    )?;
    m.tensor(dx, x.shape())
}
