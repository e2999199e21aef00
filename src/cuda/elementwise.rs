//! Host side of kernels/elementwise.cu, for any [`Memory`]: bf16 in, bf16 out (the copies also move
//! f32). Shapes are
//! checked by the `ops` functions that dispatch here.

use half::bf16;

use super::launch::{Arg, KernelCall, Strides6};
use super::memory::{Memory, TensorElem};
use crate::error::{Error, Result};
use crate::ops::elementwise::BinOp;
use crate::ops::resize::{planes, with_hw};
use crate::ops::{Activation, Pad2d};
use crate::tensor::contiguous_strides;
use crate::{DType, Tensor};

const MODULE: &str = "elementwise";

/// An element type of the kernels that have a bf16 and an f32 variant: bf16 activations, f32 maps
/// and latents; the consts name each kernel's variant.
trait KernelElem: TensorElem {
    const COPY: &'static str;
    const BINARY: &'static str;
    const SCALE: &'static str;
    const BYTES: u64 = std::mem::size_of::<Self>() as u64;
}
impl KernelElem for bf16 {
    const COPY: &'static str = "copy_strided";
    const BINARY: &'static str = "ew_binary";
    const SCALE: &'static str = "ew_scale";
}
impl KernelElem for f32 {
    const COPY: &'static str = "copy_strided32";
    const BINARY: &'static str = "ew_binary32";
    const SCALE: &'static str = "ew_scale32";
}

/// Run `$body` with `$T` the [`KernelElem`] of `$t`'s dtype; any other dtype is an error.
macro_rules! by_elem {
    ($op:expr, $t:expr, $T:ident => $body:expr) => {
        match $t.dtype() {
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F32 => {
                type $T = f32;
                $body
            }
            other => Err(Error::DType {
                op: $op,
                got: other,
                expected: "bf16 or f32",
            }),
        }
    };
}

/// A 1-D grid-stride launch of `name` writing a fresh bf16 tensor of `shape`; `args` follow the
/// output pointer.
fn pointwise<M: Memory>(
    m: &M,
    name: &'static str,
    shape: &[usize],
    args: impl FnOnce(&M) -> Result<Vec<Arg>>,
) -> Result<Tensor> {
    pointwise_as::<bf16, M>(m, name, shape, args)
}

/// `pointwise` writing elements of `T`.
fn pointwise_as<T: TensorElem, M: Memory>(
    m: &M,
    name: &'static str,
    shape: &[usize],
    args: impl FnOnce(&M) -> Result<Vec<Arg>>,
) -> Result<Tensor> {
    pointwise_over::<T, M>(m, name, shape, shape.iter().product(), args)
}

/// `pointwise_as` whose grid covers `threads` work items rather than one an output element (a
/// pair of outputs for rope, an output column's pair of inputs for geglu's backward).
fn pointwise_over<T: TensorElem, M: Memory>(
    m: &M,
    name: &'static str,
    shape: &[usize],
    threads: usize,
    args: impl FnOnce(&M) -> Result<Vec<Arg>>,
) -> Result<Tensor> {
    let mut out = m.zeros::<T>(shape.iter().product())?;
    let mut all = vec![Arg::Ptr(m.addr_mut(&mut out))];
    all.extend(args(m)?);
    if threads > 0 {
        m.launch(&KernelCall::grid_stride(MODULE, name, threads, all))?;
    }
    m.tensor(out, shape)
}

/// Pointer arguments for the bf16 tensors `ts`, in order.
fn bf16_ptrs<M: Memory>(m: &M, op: &'static str, ts: &[&Tensor]) -> Result<Vec<Arg>> {
    ts.iter()
        .map(|t| Ok(Arg::Ptr(m.tensor_addr::<bf16>(op, t)?)))
        .collect()
}

/// `ops::add`, `sub`, `mul` on bf16 (activations) or f32 (latents).
pub(crate) fn binary<M: Memory>(
    m: &M,
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    kind: BinOp,
) -> Result<Tensor> {
    by_elem!(op, a, T => binary_as::<T, M>(m, op, a, b, kind))
}

fn binary_as<T: KernelElem, M: Memory>(
    m: &M,
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    kind: BinOp,
) -> Result<Tensor> {
    let (aa, ba) = (m.tensor_addr::<T>(op, a)?, m.tensor_addr::<T>(op, b)?);
    pointwise_as::<T, M>(m, T::BINARY, a.shape(), |_| {
        Ok(vec![
            Arg::Ptr(aa),
            Arg::Ptr(ba),
            Arg::U64(a.numel() as u64),
            Arg::I32(kind as i32),
        ])
    })
}

/// `ops::scale` on bf16 or f32.
pub(crate) fn scale<M: Memory>(m: &M, x: &Tensor, s: f64) -> Result<Tensor> {
    by_elem!("scale", x, T => scale_as::<T, M>(m, x, s))
}

fn scale_as<T: KernelElem, M: Memory>(m: &M, x: &Tensor, s: f64) -> Result<Tensor> {
    let xa = m.tensor_addr::<T>("scale", x)?;
    pointwise_as::<T, M>(m, T::SCALE, x.shape(), |_| {
        Ok(vec![
            Arg::Ptr(xa),
            Arg::F32(s as f32),
            Arg::U64(x.numel() as u64),
        ])
    })
}

/// The activation's code and slope in kernels/elementwise.cu.
fn activation_code(op: &str, act: Activation) -> Result<(i32, f32)> {
    match act {
        Activation::Silu => Ok((0, 0.0)),
        Activation::Gelu => Ok((1, 0.0)),
        Activation::Relu => Ok((2, 0.0)),
        Activation::LeakyRelu(slope) => Ok((2, slope as f32)),
        Activation::QuickGelu => Ok((3, 0.0)),
        other => Err(Error::Invalid(format!(
            "{op}: {other:?} has no CUDA kernel yet (silu, gelu, quick gelu, relu and leaky relu do)"
        ))),
    }
}

pub(crate) fn activation<M: Memory>(m: &M, x: &Tensor, act: Activation) -> Result<Tensor> {
    let (code, slope) = activation_code("activation", act)?;
    let xa = m.tensor_addr::<bf16>("activation", x)?;
    pointwise(m, "ew_activation", x.shape(), |_| {
        Ok(vec![
            Arg::Ptr(xa),
            Arg::U64(x.numel() as u64),
            Arg::I32(code),
            Arg::F32(slope),
        ])
    })
}

/// `x`: (..., 2d) -> (..., d).
pub(crate) fn geglu<M: Memory>(m: &M, x: &Tensor, d: usize) -> Result<Tensor> {
    let xa = m.tensor_addr::<bf16>("geglu", x)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = d;
    pointwise(m, "geglu", &shape, |_| {
        Ok(vec![
            Arg::Ptr(xa),
            Arg::U64((x.numel() / 2) as u64),
            Arg::I32(d as i32),
        ])
    })
}

/// `ops::add_broadcast`: `x` viewed as (outer, mid, inner) plus `v` (outer, inner).
pub(crate) fn add_broadcast<M: Memory>(
    m: &M,
    x: &Tensor,
    v: &Tensor,
    mid: usize,
    inner: usize,
) -> Result<Tensor> {
    const OP: &str = "add_broadcast";
    let (xa, va) = (m.tensor_addr::<bf16>(OP, x)?, m.tensor_addr::<bf16>(OP, v)?);
    pointwise(m, "add_broadcast", x.shape(), |_| {
        Ok(vec![
            Arg::Ptr(xa),
            Arg::Ptr(va),
            Arg::U64(x.numel() as u64),
            Arg::U64(mid.max(1) as u64),
            Arg::U64(inner.max(1) as u64),
        ])
    })
}

/// `ops::modulate`: x (B, L, D), shift and scale (B, D).
pub(crate) fn modulate<M: Memory>(
    m: &M,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
) -> Result<Tensor> {
    let (l, d) = (x.shape()[1], x.shape()[2]);
    let mut args = bf16_ptrs(m, "modulate", &[x, shift, scale])?;
    pointwise(m, "modulate", x.shape(), |_| {
        args.extend([
            Arg::U64(x.numel() as u64),
            Arg::I64(l as i64),
            Arg::I32(d as i32),
        ]);
        Ok(args)
    })
}

/// `ops::modulate_backward`: (dx, dshift, dscale).
pub(crate) fn modulate_backward<M: Memory>(
    m: &M,
    x: &Tensor,
    scale: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (l, d) = (x.shape()[1], x.shape()[2]);
    let columns = scale.numel();
    let inputs = bf16_ptrs(m, "modulate_backward", &[x, scale, dy])?;
    let mut dx = m.zeros::<bf16>(x.numel())?;
    let mut dshift = m.zeros::<bf16>(columns)?;
    let mut dscale = m.zeros::<bf16>(columns)?;
    if columns > 0 {
        let mut args = vec![
            Arg::Ptr(m.addr_mut(&mut dx)),
            Arg::Ptr(m.addr_mut(&mut dshift)),
            Arg::Ptr(m.addr_mut(&mut dscale)),
        ];
        args.extend(inputs);
        args.extend([
            Arg::U64(columns as u64),
            Arg::I64(l as i64),
            Arg::I32(d as i32),
        ]);
        m.launch(&KernelCall::grid_stride(
            MODULE,
            "modulate_backward",
            columns,
            args,
        ))?;
    }
    Ok((
        m.tensor(dx, x.shape())?,
        m.tensor(dshift, scale.shape())?,
        m.tensor(dscale, scale.shape())?,
    ))
}

/// `ops::rope` (`inverse`: `ops::rope_backward`): x (B, H, L, D), cos and sin (L, D/2).
pub(crate) fn rope<M: Memory>(
    m: &M,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    let (l, d) = (x.shape()[2], x.shape()[3]);
    let mut args = bf16_ptrs(m, "rope", &[x, cos, sin])?;
    let pairs = x.numel() / 2;
    pointwise_over::<bf16, M>(m, "rope", x.shape(), pairs, |_| {
        args.extend([
            Arg::U64(pairs as u64),
            Arg::I64(l as i64),
            Arg::I32((d / 2) as i32),
            Arg::F32(if inverse { -1.0 } else { 1.0 }),
        ]);
        Ok(args)
    })
}

/// `ops::embedding` (ids already checked against the table).
pub(crate) fn embedding<M: Memory>(m: &M, w: &Tensor, ids: &[usize]) -> Result<Tensor> {
    let wa = m.tensor_addr::<bf16>("embedding", w)?;
    let (rows, d) = (ids.len(), w.shape()[1]);
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    // Lives until after the launch (the GPU frees it in stream order).
    let ids = m.upload(&ids)?;
    pointwise(m, "embedding", &[rows, d], |m| {
        Ok(vec![
            Arg::Ptr(wa),
            Arg::Ptr(m.addr(&ids)),
            Arg::U64((rows * d) as u64),
            Arg::I32(d as i32),
        ])
    })
}

/// Nearest 2x of the trailing (H, W) planes.
pub(crate) fn upsample_nearest2x<M: Memory>(m: &M, x: &Tensor) -> Result<Tensor> {
    let xa = m.tensor_addr::<bf16>("upsample_nearest2x", x)?;
    let r = x.rank();
    let (h, w) = (x.shape()[r - 2], x.shape()[r - 1]);
    let mut shape = x.shape().to_vec();
    shape[r - 2] *= 2;
    shape[r - 1] *= 2;
    pointwise(m, "upsample2x", &shape, |_| {
        Ok(vec![
            Arg::Ptr(xa),
            Arg::U64((x.numel() * 4) as u64),
            Arg::I32(h as i32),
            Arg::I32(w as i32),
        ])
    })
}

/// `shape` with its destination and source strides, right-aligned into the kernel's rank 6.
fn strides6(op: &'static str, shape: &[usize], dst: &[usize], src: &[usize]) -> Result<Strides6> {
    let r = shape.len();
    if r > 6 {
        return Err(Error::shape(
            op,
            format!("rank {r}: the CUDA copy takes at most 6"),
        ));
    }
    let mut s = Strides6 {
        shape: [1; 6],
        ..Default::default()
    };
    for i in 0..r {
        s.shape[6 - r + i] = shape[i] as i64;
        s.dst[6 - r + i] = dst[i] as i64;
        s.src[6 - r + i] = src[i] as i64;
    }
    Ok(s)
}

/// Copies the elements of `shape` from `src` (element strides `src_strides`) to `dst`
/// (`dst_strides`); addresses are in bytes.
fn copy<T: KernelElem, M: Memory>(
    m: &M,
    op: &'static str,
    dst: u64,
    dst_strides: &[usize],
    src: u64,
    src_strides: &[usize],
    shape: &[usize],
) -> Result<()> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Ok(());
    }
    m.launch(&KernelCall::grid_stride(
        MODULE,
        T::COPY,
        n,
        vec![
            Arg::Ptr(dst),
            Arg::Ptr(src),
            Arg::U64(n as u64),
            Arg::Strides(strides6(op, shape, dst_strides, src_strides)?),
        ],
    ))
}

/// `ops::permute` (the permutation already checked).
pub(crate) fn permute<M: Memory>(m: &M, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    by_elem!("permute", x, T => permute_as::<T, M>(m, x, perm))
}

fn permute_as<T: KernelElem, M: Memory>(m: &M, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let xa = m.tensor_addr::<T>("permute", x)?;
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let in_strides = contiguous_strides(x.shape());
    let src: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let mut out = m.zeros::<T>(x.numel())?;
    copy::<T, M>(
        m,
        "permute",
        m.addr_mut(&mut out),
        &contiguous_strides(&shape),
        xa,
        &src,
        &shape,
    )?;
    m.tensor(out, &shape)
}

/// `ops::concat` (shapes already checked) into `shape`.
pub(crate) fn concat<M: Memory>(
    m: &M,
    xs: &[&Tensor],
    axis: usize,
    shape: &[usize],
) -> Result<Tensor> {
    by_elem!("concat", xs[0], T => concat_as::<T, M>(m, xs, axis, shape))
}

fn concat_as<T: KernelElem, M: Memory>(
    m: &M,
    xs: &[&Tensor],
    axis: usize,
    shape: &[usize],
) -> Result<Tensor> {
    let mut out = m.zeros::<T>(shape.iter().product())?;
    let base = m.addr_mut(&mut out);
    let dst = contiguous_strides(shape);
    let mut start = 0;
    for x in xs {
        let xa = m.tensor_addr::<T>("concat", x)?;
        let offset = (start * dst[axis]) as u64 * T::BYTES;
        copy::<T, M>(
            m,
            "concat",
            base + offset,
            &dst,
            xa,
            &contiguous_strides(x.shape()),
            x.shape(),
        )?;
        start += x.shape()[axis];
    }
    m.tensor(out, shape)
}

/// `ops::pad2d`: the (n, h, w) planes of `x` copied into the interior of zeroed (n, ho, wo)
/// planes at (top, left).
pub(crate) fn pad2d<M: Memory>(m: &M, x: &Tensor, p: Pad2d) -> Result<Tensor> {
    by_elem!("pad2d", x, T => pad2d_as::<T, M>(m, x, p))
}

fn pad2d_as<T: KernelElem, M: Memory>(m: &M, x: &Tensor, p: Pad2d) -> Result<Tensor> {
    let xa = m.tensor_addr::<T>("pad2d", x)?;
    let (n, h, w) = planes("pad2d", x)?;
    let (ho, wo) = (p.top + h + p.bottom, p.left + w + p.right);
    let mut out = m.zeros::<T>(n * ho * wo)?;
    let offset = ((p.top * wo + p.left) as u64) * T::BYTES;
    copy::<T, M>(
        m,
        "pad2d",
        m.addr_mut(&mut out) + offset,
        &[ho * wo, wo, 1],
        xa,
        &[h * w, w, 1],
        &[n, h, w],
    )?;
    m.tensor(out, &with_hw(x.shape(), ho, wo))
}

/// `ops::split` (sizes already checked).
pub(crate) fn split<M: Memory>(
    m: &M,
    x: &Tensor,
    axis: usize,
    sizes: &[usize],
) -> Result<Vec<Tensor>> {
    by_elem!("split", x, T => split_as::<T, M>(m, x, axis, sizes))
}

fn split_as<T: KernelElem, M: Memory>(
    m: &M,
    x: &Tensor,
    axis: usize,
    sizes: &[usize],
) -> Result<Vec<Tensor>> {
    let xa = m.tensor_addr::<T>("split", x)?;
    let src = contiguous_strides(x.shape());
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let mut shape = x.shape().to_vec();
            shape[axis] = n;
            let mut out = m.zeros::<T>(shape.iter().product())?;
            let offset = (start * src[axis]) as u64 * T::BYTES;
            copy::<T, M>(
                m,
                "split",
                m.addr_mut(&mut out),
                &contiguous_strides(&shape),
                xa + offset,
                &src,
                &shape,
            )?;
            start += n;
            m.tensor(out, &shape)
        })
        .collect()
}

pub(crate) fn activation_backward<M: Memory>(
    m: &M,
    x: &Tensor,
    dy: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    const OP: &str = "activation_backward";
    let (code, slope) = activation_code(OP, act)?;
    let (xa, da) = (
        m.tensor_addr::<bf16>(OP, x)?,
        m.tensor_addr::<bf16>(OP, dy)?,
    );
    pointwise(m, "ew_activation_backward", x.shape(), |_| {
        Ok(vec![
            Arg::Ptr(xa),
            Arg::Ptr(da),
            Arg::U64(x.numel() as u64),
            Arg::I32(code),
            Arg::F32(slope),
        ])
    })
}

/// `x`: (..., 2d), `dy`: (..., d) -> dx (..., 2d).
pub(crate) fn geglu_backward<M: Memory>(
    m: &M,
    x: &Tensor,
    dy: &Tensor,
    d: usize,
) -> Result<Tensor> {
    let mut args = bf16_ptrs(m, "geglu_backward", &[x, dy])?;
    let n = dy.numel();
    pointwise_over::<bf16, M>(m, "geglu_backward", x.shape(), n, |_| {
        args.extend([Arg::U64(n as u64), Arg::I32(d as i32)]);
        Ok(args)
    })
}

/// The sum of each 2x2 block of `dy`'s trailing (2H, 2W) planes.
pub(crate) fn upsample_nearest2x_backward<M: Memory>(m: &M, dy: &Tensor) -> Result<Tensor> {
    let da = m.tensor_addr::<bf16>("upsample_nearest2x_backward", dy)?;
    let r = dy.rank();
    let mut shape = dy.shape().to_vec();
    shape[r - 2] /= 2;
    shape[r - 1] /= 2;
    let (h, w) = (shape[r - 2], shape[r - 1]);
    pointwise(m, "upsample2x_backward", &shape, |_| {
        Ok(vec![
            Arg::Ptr(da),
            Arg::U64((dy.numel() / 4) as u64),
            Arg::I32(h as i32),
            Arg::I32(w as i32),
        ])
    })
}

/// `x` (bf16 or f32) converted to `dtype` (f32 or bf16) in the same memory.
pub(crate) fn cast<M: Memory>(m: &M, x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "to_dtype";
    let (name, xa) = match (x.dtype(), dtype) {
        (DType::F32, DType::BF16) => ("cast_f32_to_bf16", m.tensor_addr::<f32>(OP, x)?),
        (DType::BF16, DType::F32) => ("cast_bf16_to_f32", m.tensor_addr::<bf16>(OP, x)?),
        (from, to) => {
            return Err(Error::Invalid(format!(
                "{OP}: {from:?} to {to:?} has no CUDA kernel (bf16 <-> f32 do)"
            )))
        }
    };
    let args = |_: &M| Ok(vec![Arg::Ptr(xa), Arg::U64(x.numel() as u64)]);
    match dtype {
        DType::F32 => pointwise_as::<f32, M>(m, name, x.shape(), args),
        _ => pointwise_as::<bf16, M>(m, name, x.shape(), args),
    }
}
