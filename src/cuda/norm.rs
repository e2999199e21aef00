//! Host side of kernels/norm.cu (group, layer and RMS norm: forward, and the input gradient), for
//! any [`Memory`]. The `ops` functions that dispatch here check the shapes and describe the rows.

use half::bf16;

use super::launch::{Arg, KernelCall};
use super::memory::{optional_bf16_addr, Memory};
use crate::error::Result;
use crate::ops::norm::Rows;
use crate::Tensor;

/// One block a row: `name` writes a fresh tensor like `x`; `lead` are its arguments between the
/// output and the row description.
fn launch_rows<M: Memory>(
    m: &M,
    name: &'static str,
    x: &Tensor,
    rows: &Rows,
    lead: Vec<Arg>,
) -> Result<Tensor> {
    let count = x.numel() / rows.n.max(1);
    let mut out = m.zeros::<bf16>(x.numel())?;
    let mut args = vec![Arg::Ptr(m.addr_mut(&mut out))];
    args.extend(lead);
    args.extend([
        Arg::I64(rows.n as i64),
        Arg::I32(rows.blocks as i32),
        Arg::I32((rows.n / rows.per) as i32),
        Arg::I64(rows.per as i64),
        Arg::I32(rows.center as i32),
        Arg::F32(rows.eps as f32),
    ]);
    if count > 0 {
        m.launch(&KernelCall::per_row("norm", name, count, args))?;
    }
    m.tensor(out, x.shape())
}

pub(crate) fn norm<M: Memory>(
    m: &M,
    op: &'static str,
    x: &Tensor,
    rows: &Rows,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
) -> Result<Tensor> {
    let lead = vec![
        Arg::Ptr(m.tensor_addr::<bf16>(op, x)?),
        Arg::Ptr(optional_bf16_addr(m, op, gamma)?),
        Arg::Ptr(optional_bf16_addr(m, op, beta)?),
    ];
    launch_rows(m, "norm_rows", x, rows, lead)
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
    let lead = vec![
        Arg::Ptr(m.tensor_addr::<bf16>(op, x)?),
        Arg::Ptr(m.tensor_addr::<bf16>(op, dy)?),
        Arg::Ptr(optional_bf16_addr(m, op, gamma)?),
    ];
    launch_rows(m, "norm_rows_backward", x, rows, lead)
}
