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
