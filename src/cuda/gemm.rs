//! Host side of kernels/gemm.cu: linear layers and convolutions (im2col + the tensor-core GEMM),
//! for any [`Memory`]. Shapes are checked by the `ops` functions that dispatch here.

use half::bf16;

use super::launch::{grid_1d, Arg, KernelCall, BLOCK_1D};
use super::memory::Memory;
use crate::error::{Error, Result};
use crate::ops::Conv2dParams;
use crate::Tensor;

const MODULE: &str = "gemm";
const TILE: usize = 64;

/// How gemm_bt reads B: element (n, k) at b[n * ldb_n + k * ldb_k].
#[derive(Clone, Copy)]
enum BLayout {
    /// A weight (out, in) as is: B = W, strides (in, 1).
    Rows { k: usize },
    /// A weight (out, in) read as its transpose, for input gradients: B = W^T, strides (1, in).
    Transposed { inner: usize },
}

/// C = A B^T + bias into `c` (bf16 addresses): A (m, k) row-major, B (n, k) as `layout` says;
/// with `hw` > 0 C is NCHW.
#[allow(clippy::too_many_arguments)]
fn gemm_bt<M: Memory>(
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
    let ba = b.map_or(Ok(0), |b| m.tensor_addr::<bf16>(OP, b))?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = outf;
    let mut out = m.zeros::<bf16>(rows * outf)?;
    if rows * outf > 0 {
        let layout = BLayout::Rows { k: inf };
        gemm_bt(
            m,
            m.addr_mut(&mut out),
            xa,
            wa,
            layout,
            ba,
            (rows, outf, inf),
            0,
        )?;
    }
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
    let (bs, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (o, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (oh, ow) = out_size(h, wd, kh, kw, p);
    let (xa, wa) = (m.tensor_addr::<bf16>(OP, x)?, m.tensor_addr::<bf16>(OP, w)?);
    let ba = b.map_or(Ok(0), |b| m.tensor_addr::<bf16>(OP, b))?;
    let (rows, kdim) = (bs * oh * ow, c * kh * kw);
    let mut col = m.zeros::<bf16>(rows * kdim)?;
    let geo = Geometry {
        c,
        h,
        w: wd,
        kh,
        kw,
        p,
        oh,
        ow,
    };
    patches(m, "im2col", m.addr_mut(&mut col), xa, &geo, rows * kdim)?;
    let mut out = m.zeros::<bf16>(bs * o * oh * ow)?;
    if rows * o > 0 {
        let layout = BLayout::Rows { k: kdim };
        let (oa, ca) = (m.addr_mut(&mut out), m.addr(&col));
        gemm_bt(m, oa, ca, wa, layout, ba, (rows, o, kdim), oh * ow)?;
    }
    m.tensor(out, &[bs, o, oh, ow])
}

fn out_size(h: usize, w: usize, kh: usize, kw: usize, p: Conv2dParams) -> (usize, usize) {
    (
        (h + 2 * p.padding - kh) / p.stride + 1,
        (w + 2 * p.padding - kw) / p.stride + 1,
    )
}

/// One image's convolution geometry, as im2col and col2im take it.
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
    oh: usize,
    ow: usize,
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
    m.launch(&KernelCall {
        module: MODULE,
        name,
        grid: grid_1d(n),
        block: [BLOCK_1D, 1, 1],
        smem: 0,
        args: vec![
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
    })
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
    let mut dx = m.zeros::<bf16>(rows * inf)?;
    if rows * inf > 0 {
        let layout = BLayout::Transposed { inner: inf };
        gemm_bt(
            m,
            m.addr_mut(&mut dx),
            da,
            wa,
            layout,
            0,
            (rows, inf, outf),
            0,
        )?;
    }
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
    let (bs, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (o, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (oh, ow) = out_size(h, wd, kh, kw, p);
    let (rows, kdim) = (bs * oh * ow, c * kh * kw);
    let dy_rows = super::elementwise::permute(m, dy, &[0, 2, 3, 1])?;
    let (da, wa) = (
        m.tensor_addr::<bf16>(OP, &dy_rows)?,
        m.tensor_addr::<bf16>(OP, w)?,
    );
    let mut dcol = m.zeros::<bf16>(rows * kdim)?;
    if rows * kdim > 0 {
        let layout = BLayout::Transposed { inner: kdim };
        gemm_bt(
            m,
            m.addr_mut(&mut dcol),
            da,
            wa,
            layout,
            0,
            (rows, kdim, o),
            0,
        )?;
    }
    let mut dx = m.zeros::<bf16>(x.numel())?;
    let geo = Geometry {
        c,
        h,
        w: wd,
        kh,
        kw,
        p,
        oh,
        ow,
    };
    patches(
        m,
        "col2im",
        m.addr_mut(&mut dx),
        m.addr(&dcol),
        &geo,
        x.numel(),
    )?;
    m.tensor(dx, x.shape())
}
