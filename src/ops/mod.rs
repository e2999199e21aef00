//! The op set. Every op has a forward and an explicit backward: the backward takes what the
//! forward took (cheap activations are recomputed rather than saved) plus the gradient of the
//! output, and returns gradients to the inputs, and to the weights where training needs them.
//! The gradient convention everywhere: given `dy`, return the gradient of `sum(y * dy)`.
//!
//! Host tensors of dtype f32 (models) or f64 (gradient checks) run on the CPU kernels in these
//! files, which are the numerical reference for every CUDA kernel. Shapes are never broadcast
//! silently: a mismatch is an error naming the op and the shapes.

mod activation;
pub(crate) mod attention;
mod conv;
mod conv_direct;
pub(crate) mod elementwise;
mod embedding;
mod latent;
mod linalg;
mod loss;
pub(crate) mod norm;
mod pad;
pub(crate) mod resize;
mod shape;
pub(crate) mod simd;

pub use activation::*;
pub use attention::*;
pub use conv::*;
pub use elementwise::*;
pub use embedding::*;
pub use latent::*;
pub use linalg::*;
pub use loss::*;
pub use norm::*;
pub use pad::*;
pub use resize::*;
pub use shape::*;

/// Run `$body` with `$T` bound to the Rust type of a float dtype (f32 or f64); any other dtype is
/// an error naming `$op`.
macro_rules! float_dispatch {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err($crate::Error::DType {
                op: $op,
                got: other,
                expected: "f32 or f64",
            }),
        }
    };
}
pub(crate) use float_dispatch;

use crate::{Error, Result, Tensor};

/// Error unless `a` and `b` have the same shape and dtype.
pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(
            op,
            format!("{:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    same_dtype(op, a, b)
}

pub(crate) fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::Invalid(format!(
            "{op}: dtypes differ: {:?} vs {:?}",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok(())
}

/// Error unless `t` has rank `rank`; `what` names the argument.
pub(crate) fn expect_rank(op: &'static str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(
            op,
            format!("{what} must have rank {rank}, got shape {:?}", t.shape()),
        ));
    }
    Ok(())
}

/// Minimum work (multiply-adds) before a kernel splits across threads.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

/// Elements from which [`repeated`] fills a buffer on the worker threads.
const PAR_FILL: usize = 1 << 18;

/// `n` elements repeating `pattern` (`n` a multiple of its length), filled in parallel when
/// large: an op's zeroed result, or a linear layer's bias rows. glibc's calloc clears a reused
/// block with one memset on the calling thread while the other cores wait (2% of a UNet pass).
/// Panics if `n` > 0 and the pattern is empty.
pub(crate) fn repeated<T: Copy + Send + Sync>(n: usize, pattern: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    assert!(n == 0 || !pattern.is_empty(), "repeated: nothing to repeat");
    let mut v = Vec::with_capacity(n);
    // Every element is written: chunks hold whole copies of the pattern (the last one, if `n`
    // is not a multiple of it, a part).
    let fill = |c: &mut [MaybeUninit<T>]| match pattern {
        [p] => c.fill(MaybeUninit::new(*p)),
        _ => c.chunks_mut(pattern.len()).for_each(|row| {
            row.iter_mut().zip(pattern).for_each(|(d, &p)| {
                d.write(p);
            })
        }),
    };
    if n < PAR_FILL {
        fill(&mut v.spare_capacity_mut()[..n]);
    } else {
        let chunk = PAR_FILL.next_multiple_of(pattern.len());
        v.spare_capacity_mut()[..n]
            .par_chunks_mut(chunk)
            .for_each(fill);
    }
    // SAFETY: `fill` initialised all `n` elements of the capacity.
    unsafe { v.set_len(n) };
    v
}

/// `n` elements made `chunk` at a time on the worker threads by `f(i, c)`, chunk `i` starting at
/// element `i * chunk` (a chunk of 0 taken as 1), for ops that write every element of their
/// result. Each chunk is zeroed just before `f` writes it, while it sits in cache, rather than in
/// a pass of its own over the whole buffer first: that pass cost a UNet forward + backward 4 GB
/// of extra memory traffic.
pub(crate) fn made_in_chunks<T: crate::Float>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c): (usize, &mut [MaybeUninit<T>])| {
            c.fill(MaybeUninit::new(T::ZERO));
            // SAFETY: every element of `c` was just written.
            f(i, unsafe { &mut *(c as *mut [MaybeUninit<T>] as *mut [T]) });
        });
    // SAFETY: the chunks cover all `n` elements, each written above.
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros, as [`repeated`].
pub(crate) fn zeros<T: crate::Float>(n: usize) -> Vec<T> {
    repeated(n, &[T::ZERO])
}

#[cfg(test)]
mod tests {
    /// Every element comes from the call for its chunk: index and length right at a partial
    /// last chunk, on one chunk, and on none.
    #[test]
    fn made_in_chunks_covers_every_element_once() {
        for (n, chunk) in [(10_007, 1000), (999, 1000), (0, 7), (5, 0)] {
            let v = super::made_in_chunks::<f64>(n, chunk, |i, c| {
                assert_eq!(c.len(), chunk.max(1).min(n - i * chunk.max(1)), "chunk {i}");
                for (j, x) in c.iter_mut().enumerate() {
                    assert_eq!(*x, 0.0, "chunk {i} arrives zeroed");
                    *x = (i * chunk.max(1) + j) as f64;
                }
            });
            assert_eq!(
                v,
                (0..n).map(|k| k as f64).collect::<Vec<_>>(),
                "n {n} chunk {chunk}"
            );
        }
    }
}
