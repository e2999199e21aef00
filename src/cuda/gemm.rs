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

/// C = A B^T + bias into `c` (bf16 addresses): A (m, k), B (n, k); with `hw` > 0 C is NCHW.
#[allow(clippy::too_many_arguments)]
fn gemm_bt<M: Memory>(
    m: &M,
    c: u64,
    a: u64,
    b: u64,
    bias: u64,
    dims: (usize, usize, usize),
    hw: usize,
) -> Result<()> {
    let (rows, n, k) = dims;
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
        gemm_bt(m, m.addr_mut(&mut out), xa, wa, ba, (rows, outf, inf), 0)?;
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
    let oh = (h + 2 * p.padding - kh) / p.stride + 1;
    let ow = (wd + 2 * p.padding - kw) / p.stride + 1;
    let (xa, wa) = (m.tensor_addr::<bf16>(OP, x)?, m.tensor_addr::<bf16>(OP, w)?);
    let ba = b.map_or(Ok(0), |b| m.tensor_addr::<bf16>(OP, b))?;
    let (rows, kdim) = (bs * oh * ow, c * kh * kw);
    let mut col = m.zeros::<bf16>(rows * kdim)?;
    let n = rows * kdim;
    if n > 0 {
        m.launch(&KernelCall {
            module: MODULE,
            name: "im2col",
            grid: grid_1d(n),
            block: [BLOCK_1D, 1, 1],
            smem: 0,
            args: vec![
                Arg::Ptr(m.addr_mut(&mut col)),
                Arg::Ptr(xa),
                Arg::I32(c as i32),
                Arg::I32(h as i32),
                Arg::I32(wd as i32),
                Arg::I32(kh as i32),
                Arg::I32(kw as i32),
                Arg::I32(p.stride as i32),
                Arg::I32(p.padding as i32),
                Arg::I32(oh as i32),
                Arg::I32(ow as i32),
                Arg::U64(n as u64),
            ],
        })?;
    }
    let mut out = m.zeros::<bf16>(bs * o * oh * ow)?;
    if rows * o > 0 {
        gemm_bt(
            m,
            m.addr_mut(&mut out),
            m.addr(&col),
            wa,
            ba,
            (rows, o, kdim),
            oh * ow,
        )?;
    }
    m.tensor(out, &[bs, o, oh, ow])
}
