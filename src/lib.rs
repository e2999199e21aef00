//! # steer
//!
//! Learn-to-Steer for text-to-image diffusion in Rust: capture the denoiser's cross-attention maps,
//! score them with a small relation classifier, and steer the noisy latent by the classifier's
//! gradient so that the image obeys spatial words ("a dog to the right of a teddy bear").
//!
//! This is the foundation layer: a small [`Tensor`], an op set ([`ops`]) in which every operation
//! has a forward and an explicit backward (no general autograd: the denoiser is frozen, so
//! steering needs input gradients only), a CPU backend that is the numerical reference for every
//! op, and a CUDA backend ([`cuda`]) whose kernels are compiled to PTX by `build.rs`.
//!
//! ```
//! use steer::{ops, DType, Tensor};
//! # fn main() -> steer::Result<()> {
//! let x = Tensor::randn(&[4, 8], DType::F32, 0);
//! let w = Tensor::randn(&[16, 8], DType::F32, 1); // (out, in), as torch.nn.Linear stores it
//! let b = Tensor::randn(&[16], DType::F32, 2);
//! let y = ops::linear(&x, &w, Some(&b))?;
//! assert_eq!(y.shape(), &[4, 16]);
//! // Gradient of sum(y * dy) with respect to x, w and b:
//! let dy = Tensor::randn(&[4, 16], DType::F32, 3);
//! let g = ops::linear_backward(&x, &w, &dy, true)?;
//! assert_eq!(g.dx.shape(), x.shape());
//! # Ok(()) }
//! ```

pub mod cuda;
pub mod data;
pub mod dtype;
pub mod error;
pub mod hash;
pub mod host_memory;
pub mod image;
pub mod models;
pub mod nn;
pub mod ops;
pub mod pipelines;
pub mod rng;
pub mod safetensors_io;
pub mod sched;
pub mod shapes;
pub mod steering;
pub mod tensor;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use dtype::{DType, Element, Float};
pub use error::{Error, Result};
pub use host_memory::keep_freed_memory;
pub use tensor::Tensor;
