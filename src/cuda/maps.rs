//! Host side of kernels/maps.cu (bilinear resize of map planes and the maps' renormalisation,
//! forward and backward), for any [`Memory`]: f32 in, f32 out. The `ops` and `steering::capture`
//! functions that dispatch here check the shapes.

use super::launch::{Arg, KernelCall};
use super::memory::Memory;
use crate::error::Result;
use crate::ops::resize::{planes, with_hw};
use crate::Tensor;

const MODULE: &str = "maps";

/// `name` over (planes, h, w) -> (planes, oh, ow) or back: one thread an element of `out_shape`.
#[allow(clippy::too_many_arguments)]
fn resample<M: Memory>(
    m: &M,
    op: &'static str,
    name: &'static str,
    x: &Tensor,
    out_shape: &[usize],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    planes: usize,
) -> Result<Tensor> {
    let xa = m.tensor_addr::<f32>(op, x)?;
    let n: usize = out_shape.iter().product();
    let mut out = m.zeros::<f32>(n)?;
    if n > 0 {
        m.launch(&KernelCall::grid_stride(
            MODULE,
            name,
            n,
            vec![
                Arg::Ptr(m.addr_mut(&mut out)),
                Arg::Ptr(xa),
                Arg::I64(planes as i64),
                Arg::I32(h as i32),
                Arg::I32(w as i32),
                Arg::I32(oh as i32),
                Arg::I32(ow as i32),
            ],
        ))?;
    }
    m.tensor(out, out_shape)
}

/// `ops::resize_bilinear` of the trailing (H, W) planes to (oh, ow).
pub(crate) fn resize_bilinear<M: Memory>(
    m: &M,
    x: &Tensor,
    oh: usize,
    ow: usize,
) -> Result<Tensor> {
    const OP: &str = "resize_bilinear";
    let (p, h, w) = planes(OP, x)?;
    let shape = with_hw(x.shape(), oh, ow);
    resample(m, OP, "resize_bilinear", x, &shape, (h, w), (oh, ow), p)
}

/// `ops::resize_bilinear_backward`: `dy` (.., oh, ow) to the input planes (.., h, w).
pub(crate) fn resize_bilinear_backward<M: Memory>(
    m: &M,
    dy: &Tensor,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    const OP: &str = "resize_bilinear_backward";
    let (p, oh, ow) = planes(OP, dy)?;
    let shape = with_hw(dy.shape(), h, w);
    resample(
        m,
        OP,
        "resize_bilinear_backward",
        dy,
        &shape,
        (h, w),
        (oh, ow),
        p,
    )
}

/// One block a plane of `n` elements: `name` writes a fresh tensor like `first`.
fn per_plane<M: Memory>(
    m: &M,
    name: &'static str,
    first: &Tensor,
    inputs: Vec<Arg>,
    n: usize,
    eps: f64,
) -> Result<Tensor> {
    let count = first.numel() / n.max(1);
    let mut out = m.zeros::<f32>(first.numel())?;
    let mut args = vec![Arg::Ptr(m.addr_mut(&mut out))];
    args.extend(inputs);
    args.extend([Arg::I64(n as i64), Arg::F32(eps as f32)]);
    if count > 0 {
        m.launch(&KernelCall::per_row(MODULE, name, count, args))?;
    }
    m.tensor(out, first.shape())
}

/// `x / (sum(x) + eps)` over each plane of `n` trailing elements.
pub(crate) fn renormalise<M: Memory>(m: &M, x: &Tensor, n: usize, eps: f64) -> Result<Tensor> {
    let xa = m.tensor_addr::<f32>("renormalise", x)?;
    per_plane(m, "renormalise", x, vec![Arg::Ptr(xa)], n, eps)
}

/// The gradient of `sum(renormalise(maps) * dy)` with respect to `maps`.
pub(crate) fn renormalise_backward<M: Memory>(
    m: &M,
    maps: &Tensor,
    dy: &Tensor,
    n: usize,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "renormalise_backward";
    let inputs = vec![
        Arg::Ptr(m.tensor_addr::<f32>(OP, maps)?),
        Arg::Ptr(m.tensor_addr::<f32>(OP, dy)?),
    ];
    per_plane(m, "renormalise_backward", maps, inputs, n, eps)
}
