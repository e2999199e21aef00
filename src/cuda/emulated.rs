//! Running the CUDA kernels without a GPU: inside [`run`], ops on host tensors that have a kernel
//! (see `steer::cuda`'s module docs) run that kernel's host emulation (kernels/emu.h) instead of
//! the CPU backend: the same kernel sources and the same launch plans as on the GPU, with the GPU
//! path's dtypes (bf16 activations; f32 maps and latents). Ops without a kernel still run on the
//! CPU. Slow (each GPU thread is a fiber): for testing kernels on small shapes.
//!
//! ```
//! use steer::{cuda::emulated, ops, DType, Tensor};
//! # fn main() -> steer::Result<()> {
//! let q = Tensor::randn(&[1, 2, 20, 16], DType::BF16, 0);
//! let k = Tensor::randn(&[1, 2, 9, 16], DType::BF16, 1);
//! let v = Tensor::randn(&[1, 2, 9, 16], DType::BF16, 2);
//! let capture = ops::Capture { words: vec![vec![3], vec![4, 5]], softmax_cols: None };
//! // kernels/attention.cu, emulated; outside `run` the same call runs the CPU reference.
//! let out = emulated::run(|| ops::attention(&q, &k, &v, 0.25, Some(&capture)))?;
//! assert_eq!(out.maps.unwrap().shape(), &[1, 2, 2, 20]);
//! # Ok(()) }
//! ```

use std::cell::Cell;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is inside [`run`].
pub(crate) fn active() -> bool {
    ACTIVE.with(Cell::get)
}

/// Runs `f` with this thread's kernel ops emulated (see the module docs); the previous mode comes
/// back when `f` returns or panics.
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.replace(true)));
    f()
}
