//! Data movement: concat, split, permute. (Reshape is `Tensor::reshape`: same data, so its
//! backward is a reshape back.) Each is exact for any element type, so they work on every dtype.

use rayon::prelude::*;

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
    let dims = coalesce(x.shape(), perm);
    let data = per_dtype!(x.host(OP)?, v => permuted(v, &dims));
    Tensor::from_host(data, &shape)
}

/// The output's dims as (size, input stride), outermost first: size-1 dims dropped, and output
/// neighbours that are also input neighbours merged. SD2.1's permutes become a row copy
/// (heads split and merged: runs of the head width) or a batched 2-D transpose (channels to
/// tokens and back).
fn coalesce(shape: &[usize], perm: &[usize]) -> Vec<(usize, usize)> {
    let strides = crate::tensor::contiguous_strides(shape);
    let mut dims: Vec<(usize, usize)> = Vec::new();
    for &p in perm.iter().filter(|&&p| shape[p] != 1) {
        match dims.last_mut() {
            Some(last) if last.1 == shape[p] * strides[p] => {
                *last = (last.0 * shape[p], strides[p])
            }
            _ => dims.push((shape[p], strides[p])),
        }
    }
    dims
}

/// The input offset of element `i` of the output dims `dims` (the whole output's row-major
/// index).
fn input_offset(dims: &[(usize, usize)], mut i: usize) -> usize {
    let mut off = 0;
    for &(n, s) in dims.iter().rev() {
        off += i % n * s;
        i /= n;
    }
    off
}

/// `v` permuted as `coalesce` describes. Contiguous runs are copied whole; a last dim read with
/// a stride, whose input-contiguous partner is the dim before it, is a tiled transpose; other
/// orders walk the output one element at a time (`permuted_elementwise`). Parallel over output
/// rows.
fn permuted<T: Copy + Send + Sync>(v: &[T], dims: &[(usize, usize)]) -> Vec<T> {
    const TILE: usize = 32;
    let Some(&(n_last, s_last)) = dims.last().filter(|_| !v.is_empty()) else {
        return v.to_vec();
    };
    if s_last == 1 {
        let mut out = v.to_vec();
        out.par_chunks_mut(n_last).enumerate().for_each(|(row, o)| {
            let off = input_offset(&dims[..dims.len() - 1], row);
            o.copy_from_slice(&v[off..off + n_last]);
        });
        return out;
    }
    match dims.len().checked_sub(2).map(|j| dims[j]) {
        Some((n_j, 1)) => {
            // Blocks of (n_j, n_last) output, each the transpose of an input block whose rows
            // are n_last strided runs of n_j; TILE output rows a task (a TILE x n_last tile
            // written column by column stays in L1).
            let outer = &dims[..dims.len() - 2];
            let mut out = v.to_vec();
            out.par_chunks_mut(n_j * n_last)
                .enumerate()
                .for_each(|(block, ob)| {
                    let base = input_offset(outer, block);
                    ob.par_chunks_mut(TILE * n_last)
                        .enumerate()
                        .for_each(|(t, o)| {
                            let (j0, rows) = (t * TILE, o.len() / n_last);
                            for k in 0..n_last {
                                let src = base + k * s_last + j0;
                                for (r, &x) in v[src..src + rows].iter().enumerate() {
                                    o[r * n_last + k] = x;
                                }
                            }
                        });
                });
            out
        }
        _ => permuted_elementwise(v, dims),
    }
}

/// The definition: walk the output in order, tracking the input offset (an odometer over the
/// output index).
fn permuted_elementwise<T: Copy>(v: &[T], dims: &[(usize, usize)]) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    let mut idx = vec![0usize; dims.len()];
    let mut off = 0usize;
    for _ in 0..v.len() {
        out.push(v[off]);
        for (d, &(n, s)) in dims.iter().enumerate().rev() {
            idx[d] += 1;
            off += s;
            if idx[d] < n {
                break;
            }
            off -= s * n;
            idx[d] = 0;
        }
    }
    out
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

#[cfg(test)]
mod permute_tests {
    use super::*;

    /// Every permutation of a few shapes (with size-1 dims, and sizes that are not multiples of
    /// the transpose tile) against the element-by-element walk over the uncoalesced dims.
    #[test]
    fn fast_paths_match_the_definition() {
        fn perms(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut all = Vec::new();
            for p in perms(n - 1) {
                for i in 0..n {
                    let mut q = p.clone();
                    q.insert(i, n - 1);
                    all.push(q);
                }
            }
            all
        }
        for shape in [
            &[2, 3, 40, 5][..],
            &[1, 70, 33, 1],
            &[3, 1, 64, 2],
            &[2, 5, 7],
        ] {
            let n: usize = shape.iter().product();
            let v: Vec<i64> = (0..n as i64).collect();
            let strides = crate::tensor::contiguous_strides(shape);
            for perm in perms(shape.len()) {
                let plain: Vec<(usize, usize)> =
                    perm.iter().map(|&p| (shape[p], strides[p])).collect();
                assert_eq!(
                    permuted(&v, &coalesce(shape, &perm)),
                    permuted_elementwise(&v, &plain),
                    "shape {shape:?} perm {perm:?}"
                );
            }
        }
    }
}
