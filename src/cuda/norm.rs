//! Host side of kernels/norm.cu (group, layer and RMS norm: forward, and the input gradient), for
//! any [`Memory`]. The `ops` functions that dispatch here check the shapes and describe the rows.

use half::bf16;

use super::launch::{Arg, KernelCall};
use super::memory::Memory;
use crate::error::Result;
use crate::ops::norm::Rows;
use crate::Tensor;

pub(crate) fn norm<M: Memory>(
    m: &M,
    op: &'static str,
    x: &Tensor,
    rows: &Rows,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
) -> Result<Tensor> {
    let xa = m.tensor_addr::<bf16>(op, x)?;
    let param = |p: Option<&Tensor>| p.map_or(Ok(0), |p| m.tensor_addr::<bf16>(op, p));
    let (ga, ba) = (param(gamma)?, param(beta)?);
    let count = x.numel() / rows.n.max(1);
    let mut out = m.zeros::<bf16>(x.numel())?;
    if count > 0 {
        m.launch(&KernelCall {
            module: "norm",
            name: "norm_rows",
            grid: [count as u32, 1, 1],
            block: [256, 1, 1],
            smem: 0,
            args: vec![
                Arg::Ptr(m.addr_mut(&mut out)),
                Arg::Ptr(xa),
                Arg::Ptr(ga),
                Arg::Ptr(ba),
                Arg::I64(rows.n as i64),
                Arg::I32(rows.blocks as i32),
                Arg::I32((rows.n / rows.per) as i32),
                Arg::I64(rows.per as i64),
                Arg::I32(rows.center as i32),
                Arg::F32(rows.eps as f32),
            ],
        })?;
    }
    m.tensor(out, x.shape())
}

/// The input gradient of `norm` (no parameter gradients).
pub(crate) fn norm_backward<M: Memory>(
    m: &M,
    op: &'static str,
    x: &Tensor,
    rows: &Rows,
    gamma: Option<&Tensor>,
    dy: &Tensor,
) -> Result<Tensor> {
    let (xa, da) = (
        m.tensor_addr::<bf16>(op, x)?,
        m.tensor_addr::<bf16>(op, dy)?,
    );
    let ga = gamma.map_or(Ok(0), |p| m.tensor_addr::<bf16>(op, p))?;
    let count = x.numel() / rows.n.max(1);
    let mut out = m.zeros::<bf16>(x.numel())?;
    if count > 0 {
        m.launch(&KernelCall {
            module: "norm",
            name: "norm_rows_backward",
            grid: [count as u32, 1, 1],
            block: [256, 1, 1],
            smem: 0,
            args: vec![
                Arg::Ptr(m.addr_mut(&mut out)),
                Arg::Ptr(xa),
                Arg::Ptr(da),
                Arg::Ptr(ga),
                Arg::I64(rows.n as i64),
                Arg::I32(rows.blocks as i32),
                Arg::I32((rows.n / rows.per) as i32),
                Arg::I64(rows.per as i64),
                Arg::I32(rows.center as i32),
                Arg::F32(rows.eps as f32),
            ],
        })?;
    }
    m.tensor(out, x.shape())
}
