//! Data movement: concat, split, permute. (Reshape is `Tensor::reshape`: same data, so its
//! backward is a reshape back.) Each is exact for any element type, so they work on every dtype.

use crate::tensor::HostData;
use crate::{Error, Result, Tensor};

fn check_axis(op: &'static str, t: &Tensor, axis: usize) -> Result<()> {
    if axis >= t.rank() {
        return Err(Error::shape(
            op,
            format!("axis {axis} out of range for shape {:?}", t.shape()),
        ));
    }
    Ok(())
}

/// (outer, inner) element counts around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis + 1..].iter().product(),
    )
}

/// Apply `f` to the host data of a tensor whatever its dtype, producing new data of that dtype.
macro_rules! per_dtype {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            HostData::F32($v) => HostData::F32($body),
            HostData::F64($v) => HostData::F64($body),
            HostData::BF16($v) => HostData::BF16($body),
            HostData::F16($v) => HostData::F16($body),
            HostData::I64($v) => HostData::I64($body),
        }
    };
}

/// Concatenate along `axis`; every other dimension must agree.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let Some(first) = xs.first() else {
        return Err(Error::Invalid(format!("{OP}: no tensors given")));
    };
    check_axis(OP, first, axis)?;
    for x in xs {
        let ok = x.rank() == first.rank()
            && x.dtype() == first.dtype()
            && x.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b);
        if !ok {
            let shapes: Vec<_> = xs.iter().map(|x| x.shape().to_vec()).collect();
            return Err(Error::shape(
                OP,
                format!("cannot concatenate {shapes:?} on axis {axis}"),
            ));
        }
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = xs.iter().map(|x| x.shape()[axis]).sum();
    crate::cuda::kernel_dispatch!([BF16, F32] first, m => crate::cuda::elementwise::concat(m, xs, axis, &shape));
    let (outer, inner) = around(&shape, axis);
    let hosts: Vec<&HostData> = xs.iter().map(|x| x.host(OP)).collect::<Result<_>>()?;
    let data = per_dtype!(first.host(OP)?, _f => {
        let parts: Vec<_> = hosts.iter().map(|h| crate::Element::slice(h).expect("same dtype")).collect();
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for (x, p) in xs.iter().zip(&parts) {
                let n = x.shape()[axis] * inner;
                out.extend_from_slice(&p[o * n..(o + 1) * n]);
            }
        }
        out
    });
    Tensor::from_host(data, &shape)
}

/// Split along `axis` into pieces of the given sizes (which must add up). The backward of
/// `split` is `concat` of the pieces' gradients, and the backward of `concat` is `split`.
pub fn split(x: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    const OP: &str = "split";
    check_axis(OP, x, axis)?;
    if sizes.iter().sum::<usize>() != x.shape()[axis] {
        return Err(Error::shape(
            OP,
            format!(
                "sizes {sizes:?} do not add up to dim {axis} of {:?}",
                x.shape()
            ),
        ));
    }
    crate::cuda::kernel_dispatch!([BF16, F32] x, m => crate::cuda::elementwise::split(m, x, axis, sizes));
    let (outer, inner) = around(x.shape(), axis);
    let d = x.shape()[axis];
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let mut shape = x.shape().to_vec();
            shape[axis] = n;
            let data = per_dtype!(x.host(OP)?, v => {
                let mut out = Vec::with_capacity(outer * n * inner);
                for o in 0..outer {
                    out.extend_from_slice(&v[(o * d + start) * inner..(o * d + start + n) * inner]);
                }
                out
            });
            start += n;
            Tensor::from_host(data, &shape)
        })
        .collect()
}

/// Reorder dimensions: output dim `i` is input dim `perm[i]` (torch's `permute`).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    const OP: &str = "permute";
    let r = x.rank();
    let mut seen = vec![false; r];
    if perm.len() != r
        || perm
            .iter()
            .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
    {
        return Err(Error::shape(
            OP,
            format!(
                "{perm:?} is not a permutation of the dims of {:?}",
                x.shape()
            ),
        ));
    }
    crate::cuda::kernel_dispatch!([BF16, F32] x, m => crate::cuda::elementwise::permute(m, x, perm));
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    // Input strides, read in output order.
    let in_strides = crate::tensor::contiguous_strides(x.shape());
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let n = x.numel();
    let data = per_dtype!(x.host(OP)?, v => {
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; r];
        let mut off = 0usize;
        for _ in 0..n {
            out.push(v[off]);
            // Odometer increment over the output index, tracking the input offset.
            for d in (0..r).rev() {
                idx[d] += 1;
                off += strides[d];
                if idx[d] < shape[d] {
                    break;
                }
                off -= strides[d] * shape[d];
                idx[d] = 0;
            }
        }
        out
    });
    Tensor::from_host(data, &shape)
}

/// The permutation that undoes `perm`: `permute(permute(x, p), &inverse_permutation(p)) == x`,
/// so it is also the backward of `permute`.
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        if p < inv.len() {
            inv[p] = i;
        }
    }
    inv
}
